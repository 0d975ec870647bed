//! Per-subtask counters, updated once per batch and read by the JobManager for progress and status.
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Live counters of one subtask. Cheap to share (`Arc`), updated with relaxed atomics.
#[derive(Debug)]
pub struct SubtaskMetrics {
    /// Records received from input channels (or produced by the source).
    pub records_in: AtomicU64,
    /// Records sent on the main output.
    pub records_out: AtomicU64,
    /// Records written by sinks.
    pub records_written: AtomicU64,
    /// Records routed to a late-data side output.
    pub late_records: AtomicU64,
    /// Records routed to a dead-letter output (bad input, unmatched join rows).
    pub dead_letters: AtomicU64,
    /// Nanoseconds spent blocked because a downstream channel was full.
    pub backpressured_ns: AtomicU64,
    /// The subtask's current combined input watermark (ms; `i64::MIN` before the first).
    pub watermark: AtomicI64,
}

impl Default for SubtaskMetrics {
    fn default() -> Self {
        SubtaskMetrics {
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            late_records: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            backpressured_ns: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
        }
    }
}

impl SubtaskMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            records_in: self.records_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            records_written: self.records_written.load(Ordering::Relaxed),
            late_records: self.late_records.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
            backpressured_ns: self.backpressured_ns.load(Ordering::Relaxed),
            watermark: self.watermark.load(Ordering::Relaxed),
        }
    }
}

/// A copy of [`SubtaskMetrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MetricsSnapshot {
    /// See [`SubtaskMetrics::records_in`].
    pub records_in: u64,
    /// See [`SubtaskMetrics::records_out`].
    pub records_out: u64,
    /// See [`SubtaskMetrics::records_written`].
    pub records_written: u64,
    /// See [`SubtaskMetrics::late_records`].
    pub late_records: u64,
    /// See [`SubtaskMetrics::dead_letters`].
    pub dead_letters: u64,
    /// See [`SubtaskMetrics::backpressured_ns`].
    pub backpressured_ns: u64,
    /// See [`SubtaskMetrics::watermark`].
    pub watermark: i64,
}

impl MetricsSnapshot {
    /// The counters of several subtasks added up, and their lowest watermark (`i64::MIN` when
    /// there are none).
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a MetricsSnapshot>) -> MetricsSnapshot {
        let mut out = MetricsSnapshot {
            watermark: i64::MAX,
            ..Default::default()
        };
        let mut any = false;
        for m in all {
            any = true;
            out.records_in += m.records_in;
            out.records_out += m.records_out;
            out.records_written += m.records_written;
            out.late_records += m.late_records;
            out.dead_letters += m.dead_letters;
            out.backpressured_ns += m.backpressured_ns;
            out.watermark = out.watermark.min(m.watermark);
        }
        if !any {
            out.watermark = i64::MIN;
        }
        out
    }
}

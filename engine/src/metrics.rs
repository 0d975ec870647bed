//! Per-subtask counters, updated once per batch and read by the JobManager for progress and
//! status and by the TaskManager's metric exporters.
use arrow::record_batch::RecordBatch;
use parking_lot::Mutex;
use std::sync::Weak;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use crate::state::{CacheCounts, KeyedBackend};

/// Live counters of one subtask. Cheap to share (`Arc`), updated with relaxed atomics.
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
    /// Nanoseconds spent waiting for input (or, in a source, for its input to have more).
    pub idle_ns: AtomicU64,
    /// The subtask's current combined input watermark (ms; `i64::MIN` before the first). A
    /// source's is the watermark it emitted.
    pub watermark: AtomicI64,
    /// The watermark the subtask last sent on its main output (ms; `i64::MIN` before the first).
    pub output_watermark: AtomicI64,
    /// Bytes of the Arrow arrays of the records received (see [`batch_bytes`]).
    pub bytes_in: AtomicU64,
    /// Bytes of the Arrow arrays of the records sent on the main output.
    pub bytes_out: AtomicU64,
    /// Nanoseconds from the subtask's start until its operators were open and their state
    /// restored (0 until then).
    pub open_ns: AtomicU64,
    /// A source with every split idle (see the watermark's `idle_timeout`): it holds back no
    /// watermark, nor its alignment group.
    pub idle: std::sync::atomic::AtomicBool,
    /// Nanoseconds a source spent paused by watermark alignment, ahead of its group.
    pub aligned_ns: AtomicU64,
    /// When the subtask started: busy time is the time since, less idle and backpressured time.
    started: Instant,
    /// The keyed-state instances of the subtask's operators, for state size.
    state: Mutex<Vec<Weak<KeyedBackend>>>,
    /// The cache counts of every keyed-state instance the subtask opened.
    caches: Mutex<Vec<std::sync::Arc<CacheCounts>>>,
    /// A source's records behind the end of each split it reads (a Kafka partition's high
    /// watermark, or last stable offset when reading committed records, less its position).
    split_lag: Mutex<std::collections::BTreeMap<String, i64>>,
}

impl std::fmt::Debug for SubtaskMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

/// The bytes of a batch's arrays (the part of their buffers the batch covers; a slice of a larger
/// batch counts only its rows). Costs a walk over the columns, not the rows.
pub fn batch_bytes(batch: &RecordBatch) -> u64 {
    batch
        .columns()
        .iter()
        .map(|c| array_bytes(c.as_ref()))
        .sum()
}

/// What `ArrayData::get_slice_memory_size` says, without building the `ArrayData` for the
/// column types batches mostly hold (fixed-width, strings, bytes and dictionaries of them:
/// building it clones the types and allocates, once per batch and receiver).
fn array_bytes(a: &dyn arrow::array::Array) -> u64 {
    use arrow::array::AsArray;
    use arrow::datatypes::DataType;
    fn offsets<O: Copy + Into<i64>>(o: &[O]) -> usize {
        size_of_val(o) + (o[o.len() - 1].into() - o[0].into()) as usize
    }
    // (arrow leaves out the bitmap of a slice without nulls)
    let nulls = a
        .nulls()
        .filter(|n| n.null_count() > 0)
        .map_or(0, |n| n.len().div_ceil(8));
    let values = match a.data_type() {
        DataType::Boolean => a.len().div_ceil(8),
        DataType::Utf8 => offsets(a.as_string::<i32>().value_offsets()),
        DataType::LargeUtf8 => offsets(a.as_string::<i64>().value_offsets()),
        DataType::Binary => offsets(a.as_binary::<i32>().value_offsets()),
        DataType::LargeBinary => offsets(a.as_binary::<i64>().value_offsets()),
        // the keys' buffer (with the dictionary's nulls, which are its keys') and the whole
        // dictionary of values
        DataType::Dictionary(..) => {
            let d = a.as_any_dictionary();
            return array_bytes(d.keys()) + array_bytes(d.values().as_ref());
        }
        t => match t.primitive_width() {
            Some(width) => a.len() * width,
            None => {
                return a.to_data().get_slice_memory_size().map_or(0, |n| n as u64);
            }
        },
    };
    (nulls + values) as u64
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
            idle_ns: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
            output_watermark: AtomicI64::new(i64::MIN),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            open_ns: AtomicU64::new(0),
            idle: Default::default(),
            aligned_ns: AtomicU64::new(0),
            started: Instant::now(),
            state: Mutex::new(Vec::new()),
            caches: Mutex::new(Vec::new()),
            split_lag: Mutex::new(std::collections::BTreeMap::new()),
        }
    }
}

impl SubtaskMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a batch received: its records and bytes.
    pub fn received(&self, batch: &RecordBatch) {
        Self::add(&self.records_in, batch.num_rows() as u64);
        Self::add(&self.bytes_in, batch_bytes(batch));
    }

    /// Counts selected rows of a shared batch received: the rows, and the batch's bytes in
    /// proportion.
    pub fn received_rows(&self, rows: &crate::element::Selection) {
        let all = rows.batch.num_rows().max(1) as u64;
        let n = rows.num_rows() as u64;
        Self::add(&self.records_in, n);
        Self::add(&self.bytes_in, batch_bytes(&rows.batch) * n / all);
    }

    /// Counts a batch sent on the main output: its records and bytes.
    pub fn sent(&self, batch: &RecordBatch) {
        Self::add(&self.records_out, batch.num_rows() as u64);
        Self::add(&self.bytes_out, batch_bytes(batch));
    }

    /// Records that the subtask's operators are open (its state restored).
    pub fn opened(&self) {
        let ns = self.started.elapsed().as_nanos().max(1) as u64;
        self.open_ns.store(ns, Ordering::Relaxed);
    }

    /// Sets how many records split `split` has beyond the source's position; `None` forgets
    /// the split (finished, or no longer read here).
    pub fn set_split_lag(&self, split: &str, lag: Option<i64>) {
        let mut l = self.split_lag.lock();
        match lag {
            Some(n) => {
                l.insert(split.to_string(), n.max(0));
            }
            None => {
                l.remove(split);
            }
        }
    }

    /// Every split's lag (see [`SubtaskMetrics::set_split_lag`]).
    pub fn split_lags(&self) -> Vec<(String, i64)> {
        self.split_lag
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Adds the time since `since` to the idle time.
    pub fn idled(&self, since: Instant) {
        Self::add(&self.idle_ns, since.elapsed().as_nanos() as u64);
    }

    /// Counts a keyed-state instance of the subtask in its state size (while it is open), and
    /// its cache accesses (for good).
    pub fn track_state(&self, backend: &std::sync::Arc<KeyedBackend>) {
        let mut all = self.state.lock();
        all.retain(|b| b.strong_count() > 0);
        all.push(std::sync::Arc::downgrade(backend));
        self.caches.lock().push(backend.cache_counts());
    }

    /// The subtask's keyed state: estimated RocksDB rows, and bytes of its files on disk. Asks
    /// RocksDB, so it is read when metrics are collected, not per batch.
    pub fn state_size(&self) -> StateSize {
        let all: Vec<_> = self.state.lock().iter().filter_map(Weak::upgrade).collect();
        let (cache_lookups, cache_misses) = self.cache_counts();
        let mut size = StateSize {
            cache_lookups,
            cache_misses,
            ..StateSize::default()
        };
        for b in all {
            let s = b.size();
            size.rows += s.rows;
            size.disk_bytes += s.disk_bytes;
        }
        size
    }

    /// Accesses of the subtask's state caches, and those that read RocksDB, over every
    /// instance it has had (counters only: no question to RocksDB).
    fn cache_counts(&self) -> (u64, u64) {
        self.caches
            .lock()
            .iter()
            .map(|c| c.get())
            .fold((0, 0), |(l, m), (cl, cm)| (l + cl, m + cm))
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let idle_ns = self.idle_ns.load(Ordering::Relaxed);
        let backpressured_ns = self.backpressured_ns.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_nanos() as u64;
        let (state_lookups, state_reads) = self.cache_counts();
        MetricsSnapshot {
            records_in: self.records_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            records_written: self.records_written.load(Ordering::Relaxed),
            late_records: self.late_records.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
            backpressured_ns,
            idle_ns,
            busy_ns: elapsed.saturating_sub(idle_ns + backpressured_ns),
            watermark: self.watermark.load(Ordering::Relaxed),
            output_watermark: self.output_watermark.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            open_ns: self.open_ns.load(Ordering::Relaxed),
            state_lookups,
            state_reads,
            idle: self.idle.load(Ordering::Relaxed),
            aligned_ns: self.aligned_ns.load(Ordering::Relaxed),
        }
    }
}

/// Size of a subtask's keyed state, as RocksDB estimates it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateSize {
    /// Rows (one per key and namespace, and per timer), estimated.
    pub rows: u64,
    /// Bytes of the live SST files.
    pub disk_bytes: u64,
    /// Accesses of the state caches in front of RocksDB.
    pub cache_lookups: u64,
    /// Accesses that missed the cache and read RocksDB (a batch read ahead counts each key).
    pub cache_misses: u64,
}

/// A copy of [`SubtaskMetrics`] at one moment.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
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
    /// See [`SubtaskMetrics::idle_ns`].
    #[serde(default)]
    pub idle_ns: u64,
    /// Nanoseconds the subtask has run, less its idle and backpressured time.
    #[serde(default)]
    pub busy_ns: u64,
    /// See [`SubtaskMetrics::output_watermark`].
    #[serde(default = "no_watermark")]
    pub output_watermark: i64,
    /// See [`SubtaskMetrics::bytes_in`].
    #[serde(default)]
    pub bytes_in: u64,
    /// See [`SubtaskMetrics::bytes_out`].
    #[serde(default)]
    pub bytes_out: u64,
    /// See [`SubtaskMetrics::open_ns`].
    #[serde(default)]
    pub open_ns: u64,
    /// Accesses of the subtask's keyed-state caches in front of RocksDB (a table adds its
    /// count every 4 096 accesses, whenever it writes to RocksDB and when it closes).
    #[serde(default)]
    pub state_lookups: u64,
    /// Of those, the accesses that read RocksDB: keys the cache did not hold (a key read ahead
    /// for a batch counts once).
    #[serde(default)]
    pub state_reads: u64,
    /// See [`SubtaskMetrics::idle`] (summed: whether every subtask is idle).
    #[serde(default)]
    pub idle: bool,
    /// See [`SubtaskMetrics::aligned_ns`].
    #[serde(default)]
    pub aligned_ns: u64,
}

fn no_watermark() -> i64 {
    i64::MIN
}

impl MetricsSnapshot {
    /// The counters of several subtasks added up, and their lowest watermark (`i64::MIN` when
    /// there are none).
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a MetricsSnapshot>) -> MetricsSnapshot {
        let mut out = MetricsSnapshot {
            watermark: i64::MAX,
            output_watermark: i64::MAX,
            ..Default::default()
        };
        let mut any = false;
        for m in all {
            out.idle = if any { out.idle && m.idle } else { m.idle };
            any = true;
            out.records_in += m.records_in;
            out.records_out += m.records_out;
            out.records_written += m.records_written;
            out.late_records += m.late_records;
            out.dead_letters += m.dead_letters;
            out.backpressured_ns += m.backpressured_ns;
            out.idle_ns += m.idle_ns;
            out.busy_ns += m.busy_ns;
            out.bytes_in += m.bytes_in;
            out.bytes_out += m.bytes_out;
            out.open_ns = out.open_ns.max(m.open_ns);
            out.state_lookups += m.state_lookups;
            out.state_reads += m.state_reads;
            out.aligned_ns += m.aligned_ns;
            out.watermark = out.watermark.min(m.watermark);
            out.output_watermark = out.output_watermark.min(m.output_watermark);
        }
        if !any {
            out.watermark = i64::MIN;
            out.output_watermark = i64::MIN;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        ArrayRef, BinaryArray, BooleanArray, DictionaryArray, Int64Array, ListArray, StringArray,
    };
    use arrow::datatypes::{Int32Type, UInt8Type};
    use std::sync::Arc;

    #[test]
    fn batch_bytes_are_what_arrow_counts_for_the_slice() {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![
                Some(1),
                None,
                Some(3),
                Some(4),
                None,
            ])),
            Arc::new(StringArray::from(vec!["a", "bcd", "", "efgh", "ij"])),
            Arc::new(BooleanArray::from(vec![true, false, true, true, false])),
            Arc::new(BinaryArray::from_opt_vec(vec![
                Some(b"xy".as_slice()),
                None,
                Some(b"z"),
                Some(b""),
                Some(b"uvw"),
            ])),
            Arc::new(
                vec![Some("red"), Some("blue"), None, Some("red"), Some("green")]
                    .into_iter()
                    .collect::<DictionaryArray<UInt8Type>>(),
            ),
            Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
                Some(vec![Some(1)]),
                None,
                Some(vec![Some(2), Some(3)]),
                Some(vec![]),
                Some(vec![Some(4)]),
            ])),
        ];
        let batch =
            RecordBatch::try_from_iter(["i", "s", "b", "y", "d", "l"].into_iter().zip(columns))
                .unwrap();
        for (offset, len) in [(0, 5), (1, 3), (2, 0), (2, 2), (4, 1)] {
            let slice = batch.slice(offset, len);
            let mut expected = 0;
            for (c, f) in slice.columns().iter().zip(slice.schema().fields()) {
                let arrow = c.to_data().get_slice_memory_size().unwrap() as u64;
                assert_eq!(
                    array_bytes(c.as_ref()),
                    arrow,
                    "{} {offset}+{len}",
                    f.name()
                );
                expected += arrow;
            }
            assert_eq!(batch_bytes(&slice), expected, "{offset}+{len}");
        }
    }
}

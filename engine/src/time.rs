//! Event time and watermarks.
//!
//! Event time is milliseconds since the Unix epoch (`i64`). A [`Watermark`] `w` asserts that no
//! more records with timestamp `<= w` are expected on the stream that carries it (the convention of
//! Apache Flink, so results agree with it): a source that has seen a maximum timestamp `m` with an
//! out-of-orderness bound `b` emits `m - b - 1`. A window `[start, end)` fires once the watermark
//! reaches `end - 1`.
//!
//! Invariants kept by [`WatermarkTracker`]: a subtask's combined watermark is the minimum over its
//! live, non-idle input channels; finished channels and idle channels do not hold it back; it never
//! goes backwards.

/// A watermark: no more records at or before this event time (ms) are expected.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Watermark(pub i64);

impl Watermark {
    /// Before any input: nothing is known yet.
    pub const MIN: Watermark = Watermark(i64::MIN);
    /// End of event time: emitted when a bounded input is exhausted, fires every pending window.
    pub const MAX: Watermark = Watermark(i64::MAX);

    /// The watermark's event time in milliseconds.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// Whether a record with timestamp `ts` is late with respect to this watermark.
    pub fn is_late(self, ts: i64) -> bool {
        ts <= self.0
    }
}

impl std::fmt::Display for Watermark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Watermark::MIN => f.write_str("-inf"),
            Watermark::MAX => f.write_str("+inf"),
            Watermark(ms) => f.write_str(&format_millis(ms)),
        }
    }
}

/// Formats epoch milliseconds as an RFC 3339 UTC timestamp with millisecond precision.
pub fn format_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// State of one input channel as seen by the receiving subtask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChannelStatus {
    Active,
    Idle,
    Finished,
}

/// Combines the watermarks of a subtask's input channels.
///
/// The combined watermark is the minimum over active channels; idle and finished channels are
/// left out; if every channel is idle, the watermark stays where it is. It never decreases.
#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    channels: Vec<(Watermark, ChannelStatus)>,
    combined: Watermark,
}

impl WatermarkTracker {
    /// A tracker for `channels` inputs, all active and at [`Watermark::MIN`].
    pub fn new(channels: usize) -> Self {
        WatermarkTracker {
            channels: vec![(Watermark::MIN, ChannelStatus::Active); channels],
            combined: Watermark::MIN,
        }
    }

    /// The current combined watermark.
    pub fn combined(&self) -> Watermark {
        self.combined
    }

    /// The last watermark received on `channel` (what records on that channel are judged against).
    pub fn channel(&self, channel: usize) -> Watermark {
        self.channels[channel].0
    }

    /// Records a watermark on `channel`; returns the new combined watermark if it advanced.
    /// A watermark lower than the channel's previous one is ignored (watermarks never regress).
    pub fn update(&mut self, channel: usize, wm: Watermark) -> Option<Watermark> {
        let c = &mut self.channels[channel];
        if wm > c.0 {
            c.0 = wm;
        }
        if c.1 == ChannelStatus::Idle {
            c.1 = ChannelStatus::Active;
        }
        self.recompute()
    }

    /// Marks `channel` idle: it stops holding back the combined watermark until it sends again.
    pub fn mark_idle(&mut self, channel: usize) -> Option<Watermark> {
        if self.channels[channel].1 == ChannelStatus::Active {
            self.channels[channel].1 = ChannelStatus::Idle;
        }
        self.recompute()
    }

    /// Marks `channel` active again because it delivered data.
    pub fn mark_active(&mut self, channel: usize) {
        if self.channels[channel].1 == ChannelStatus::Idle {
            self.channels[channel].1 = ChannelStatus::Active;
        }
    }

    /// Marks `channel` finished; returns the new combined watermark if it advanced.
    pub fn finish(&mut self, channel: usize) -> Option<Watermark> {
        self.channels[channel].1 = ChannelStatus::Finished;
        self.recompute()
    }

    /// True when no channel is active and at least one is idle: the subtask itself is idle and
    /// should say so downstream.
    pub fn all_idle(&self) -> bool {
        self.channels.iter().all(|c| c.1 != ChannelStatus::Active)
            && self.channels.iter().any(|c| c.1 == ChannelStatus::Idle)
    }

    /// True when every channel has finished.
    pub fn all_finished(&self) -> bool {
        self.channels.iter().all(|c| c.1 == ChannelStatus::Finished)
    }

    fn recompute(&mut self) -> Option<Watermark> {
        let active = self
            .channels
            .iter()
            .filter(|c| c.1 == ChannelStatus::Active)
            .map(|c| c.0)
            .min();
        let candidate = match active {
            Some(w) => w,
            None if self.channels.iter().all(|c| c.1 == ChannelStatus::Finished) => {
                // Every input finished: whatever they last said is final.
                self.channels
                    .iter()
                    .map(|c| c.0)
                    .max()
                    .unwrap_or(Watermark::MIN)
                    .max(self.combined)
            }
            None => return None, // all idle (or idle + finished): hold
        };
        if candidate > self.combined {
            self.combined = candidate;
            Some(candidate)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_is_min_of_active_and_never_regresses() {
        let mut t = WatermarkTracker::new(2);
        assert_eq!(t.update(0, Watermark(10)), None, "channel 1 still at MIN");
        assert_eq!(t.update(1, Watermark(5)), Some(Watermark(5)));
        assert_eq!(
            t.update(1, Watermark(3)),
            None,
            "a lower watermark is ignored"
        );
        assert_eq!(t.channel(1), Watermark(5));
        assert_eq!(t.update(1, Watermark(20)), Some(Watermark(10)));
    }

    #[test]
    fn idle_channel_does_not_hold_back_and_rejoins() {
        let mut t = WatermarkTracker::new(2);
        t.update(0, Watermark(100));
        assert_eq!(t.mark_idle(1), Some(Watermark(100)));
        // channel 1 comes back behind: combined must not go backwards
        assert_eq!(t.update(1, Watermark(50)), None);
        assert_eq!(t.combined(), Watermark(100));
        assert_eq!(t.update(1, Watermark(150)), None);
        assert_eq!(t.update(0, Watermark(200)), Some(Watermark(150)));
    }

    #[test]
    fn finished_channels_are_excluded() {
        let mut t = WatermarkTracker::new(3);
        t.finish(1);
        t.finish(2);
        assert_eq!(t.update(0, Watermark(7)), Some(Watermark(7)));
        assert!(!t.all_finished());
        t.finish(0);
        assert!(t.all_finished());
    }

    #[test]
    fn all_idle_holds() {
        let mut t = WatermarkTracker::new(1);
        t.update(0, Watermark(5));
        assert!(!t.all_idle());
        assert_eq!(t.mark_idle(0), None);
        assert_eq!(t.combined(), Watermark(5));
        assert!(t.all_idle(), "an idle subtask reports idle downstream");
    }

    #[test]
    fn formats_millis() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_millis(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(Watermark::MAX.to_string(), "+inf");
    }
}

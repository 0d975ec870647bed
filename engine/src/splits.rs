//! Per-split watermarks of a source subtask.
//!
//! A source subtask may read several splits (files, partitions). Each split has its own
//! watermark generator, so out-of-orderness is bounded per split, and its records are judged
//! against their own split's watermark. The subtask's watermark is the minimum over its live
//! splits: a split it will read but has not started holds it back (so reading splits one after
//! the other never makes a later split's records late), a finished split stops counting, and
//! a split without data for the idle timeout stops counting until it has data again. The
//! subtask's watermark never goes back.
//!
//! Snapshots keep each split's generator by split id, so a restore at any parallelism gives
//! every split back its own position, whichever subtask reads it now.
use arrow::record_batch::RecordBatch;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::task::{WatermarkConfig, WatermarkGenerator};
use crate::{EngineError, Result, Watermark};

/// The split a source that does not name its splits reads.
pub const WHOLE: &str = "";

struct Split {
    generator: WatermarkGenerator,
    last_data: Instant,
    idle: bool,
}

/// The per-split watermarks of one source subtask.
pub struct SplitWatermarks {
    config: WatermarkConfig,
    splits: BTreeMap<String, Split>,
    emitted: Watermark,
}

/// A piece of a batch: the records, the watermark they are judged against (their split's), and
/// the subtask watermark to emit after them, if it advanced.
pub type Piece = (RecordBatch, Watermark, Option<Watermark>);

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    /// The subtask's emitted watermark.
    emitted: i64,
    /// Per split: its generator's state.
    splits: BTreeMap<String, Vec<u8>>,
}

impl SplitWatermarks {
    /// No splits yet, nothing emitted.
    pub fn new(config: WatermarkConfig) -> Self {
        SplitWatermarks {
            config,
            splits: BTreeMap::new(),
            emitted: Watermark::MIN,
        }
    }

    fn fresh(&self) -> Split {
        Split {
            generator: WatermarkGenerator::new(&self.config),
            last_data: Instant::now(),
            idle: false,
        }
    }

    /// Splits the subtask will read: each holds the watermark back until it is read, finished
    /// or idle. Known splits keep their state.
    pub fn declare<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) {
        for id in ids {
            if !self.splits.contains_key(id) {
                let s = self.fresh();
                self.splits.insert(id.to_string(), s);
            }
        }
    }

    /// The subtask's last emitted watermark.
    pub fn emitted(&self) -> Watermark {
        self.emitted
    }

    /// The watermark records of split `id` are judged against.
    pub fn of(&self, id: &str) -> Watermark {
        self.splits
            .get(id)
            .map_or(self.emitted, |s| s.generator.emitted())
    }

    /// The minimum over the splits that count, if it is ahead of what was emitted (then it is
    /// the new emitted watermark).
    fn advance(&mut self) -> Option<Watermark> {
        let min = self
            .splits
            .values()
            .filter(|s| !s.idle)
            .map(|s| s.generator.emitted())
            .min()?;
        (min > self.emitted).then(|| {
            self.emitted = min;
            min
        })
    }

    /// Cuts a batch of split `id` at the points where the subtask's watermark advances.
    pub fn cut(&mut self, id: &str, batch: &RecordBatch) -> Vec<Piece> {
        // the other splits do not move while this batch is cut
        let others = self
            .splits
            .iter()
            .filter(|(k, s)| k.as_str() != id && !s.idle)
            .map(|(_, s)| s.generator.emitted())
            .min();
        if !self.splits.contains_key(id) {
            let s = self.fresh();
            self.splits.insert(id.to_string(), s);
        }
        let split = self.splits.get_mut(id).expect("inserted above");
        split.last_data = Instant::now();
        split.idle = false;
        let mut judge = split.generator.emitted();
        let mut out = Vec::new();
        for (piece, wm) in split.generator.split(batch) {
            let mut emit = None;
            let before = judge;
            if let Some(wm) = wm {
                judge = wm;
                let candidate = others.map_or(wm, |o| o.min(wm));
                if candidate > self.emitted {
                    self.emitted = candidate;
                    emit = Some(candidate);
                }
            }
            out.push((piece, before, emit));
        }
        out
    }

    /// Split `id` is read to its end: it stops counting. Returns the watermark to emit, if it
    /// advanced.
    pub fn finish(&mut self, id: &str) -> Option<Watermark> {
        self.splits.remove(id)?;
        self.advance()
    }

    /// Marks splits without data for the idle timeout idle. Returns the watermark to emit if
    /// that advanced it, and whether every split is idle now. A subtask without any split (a
    /// Kafka subtask with no partition yet) is idle, with or without a timeout.
    pub fn idle_check(&mut self) -> (Option<Watermark>, bool) {
        if self.splits.is_empty() {
            return (None, true);
        }
        let Some(timeout) = self.config.idle_timeout else {
            return (None, false);
        };
        let now = Instant::now();
        for s in self.splits.values_mut() {
            if now.duration_since(s.last_data) >= timeout {
                s.idle = true;
            }
        }
        let all = self.splits.values().all(|s| s.idle);
        (self.advance(), all)
    }

    /// The time until the next split may turn idle (for a source that waits).
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.config.idle_timeout
    }

    /// State for a snapshot.
    pub fn save(&self) -> Vec<u8> {
        let saved = Saved {
            emitted: self.emitted.0,
            splits: self
                .splits
                .iter()
                .map(|(id, s)| (id.clone(), s.generator.save()))
                .collect(),
        };
        serde_json::to_vec(&saved).expect("plain data")
    }

    /// Restores from the snapshots of the former subtasks, given as (index, parallelism,
    /// state). A split takes its own former subtask's position when this subtask had the same
    /// index at the same parallelism, else the lowest any former subtask saved for it (a split
    /// read by one subtask is saved by that one only; the implicit split of a source that does
    /// not name its splits is in every one). The emitted watermark follows the same rule, so it
    /// is never ahead of a restored split. `legacy` are states of the earlier format (one
    /// generator per subtask), restored into every declared split by the same rule.
    pub fn restore<'a>(
        &mut self,
        me: (u32, u32),
        saved: impl IntoIterator<Item = (u32, u32, &'a [u8])>,
        legacy: impl IntoIterator<Item = (u32, u32, &'a [u8])>,
    ) -> Result<()> {
        // per split: (own, generator) candidates
        let mut found: BTreeMap<String, Vec<(bool, WatermarkGenerator)>> = BTreeMap::new();
        let mut emitted: Vec<(bool, Watermark)> = Vec::new();
        for (index, parallelism, data) in saved {
            let own = (index, parallelism) == me;
            let s: Saved = serde_json::from_slice(data)
                .map_err(|e| EngineError::State(format!("split watermarks: {e}")))?;
            emitted.push((own, Watermark(s.emitted)));
            for (id, g) in s.splits {
                if self.splits.contains_key(&id) {
                    let mut generator = WatermarkGenerator::new(&self.config);
                    generator.restore(&g)?;
                    found.entry(id).or_default().push((own, generator));
                }
            }
        }
        for (index, parallelism, data) in legacy {
            let own = (index, parallelism) == me;
            let mut generator = WatermarkGenerator::new(&self.config);
            generator.restore(data)?;
            emitted.push((own, generator.emitted()));
            for id in self.splits.keys() {
                found
                    .entry(id.clone())
                    .or_default()
                    .push((own, generator.clone()));
            }
        }
        let pick = |c: Vec<(bool, WatermarkGenerator)>| -> Option<WatermarkGenerator> {
            let own = c.iter().position(|(o, _)| *o);
            match own {
                Some(i) => c.into_iter().nth(i).map(|(_, g)| g),
                None => c.into_iter().map(|(_, g)| g).min_by_key(|g| g.emitted()),
            }
        };
        for (id, candidates) in found {
            if let (Some(split), Some(g)) = (self.splits.get_mut(&id), pick(candidates)) {
                split.generator = g;
            }
        }
        let own = emitted.iter().find(|(o, _)| *o).map(|(_, w)| *w);
        if let Some(e) = own.or_else(|| emitted.iter().map(|(_, w)| *w).min()) {
            self.emitted = e;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::tests::batch;

    fn config(idle: Option<Duration>) -> WatermarkConfig {
        WatermarkConfig {
            max_out_of_orderness: Duration::ZERO,
            interval: Duration::from_millis(1),
            idle_timeout: idle,
            aligned: false,
        }
    }

    /// (rows, judged against, emitted after) per piece.
    fn cut(w: &mut SplitWatermarks, id: &str, times: &[i64]) -> Vec<(usize, i64, Option<i64>)> {
        w.cut(id, &batch(times))
            .into_iter()
            .map(|(b, j, e)| (b.num_rows(), j.0, e.map(|e| e.0)))
            .collect()
    }

    /// A split read after another is judged against its own watermark, and the subtask's
    /// watermark waits for every split it will read.
    #[test]
    fn a_later_split_is_not_judged_by_an_earlier_one() {
        let mut w = SplitWatermarks::new(config(None));
        w.declare(["a", "b"]);
        // a runs ahead; b (not started) holds the subtask back
        let a = cut(&mut w, "a", &[100, 200]);
        assert!(a.iter().all(|p| p.2.is_none()), "{a:?}");
        assert_eq!(w.emitted(), Watermark::MIN);
        assert_eq!(w.of("a"), Watermark(199));
        // a ends: only b counts, and b has not started
        assert_eq!(w.finish("a"), None);
        // b's early records are judged against b's own watermark, not a's
        let b = cut(&mut w, "b", &[10, 20]);
        assert_eq!(b[0].1, i64::MIN, "{b:?}");
        assert_eq!(b.last().unwrap().2, Some(19), "{b:?}");
        assert_eq!(w.emitted(), Watermark(19));
        // the subtask's watermark never goes back
        w.declare(["c"]);
        assert_eq!(cut(&mut w, "c", &[5]), vec![(1, i64::MIN, None)]);
        assert_eq!(w.emitted(), Watermark(19));
    }

    /// The subtask's watermark is the minimum over its splits, emitted after the piece that
    /// moved it.
    #[test]
    fn the_subtask_watermark_is_the_minimum_of_its_splits() {
        let mut w = SplitWatermarks::new(config(None));
        w.declare(["a", "b"]);
        cut(&mut w, "a", &[50]);
        let b = cut(&mut w, "b", &[10, 30, 70]);
        // b passes 10 and 30 (below a's 49): the subtask follows; at 70 it stops at a's 49
        let emitted: Vec<Option<i64>> = b.iter().map(|p| p.2).collect();
        assert_eq!(emitted, vec![Some(9), Some(29), Some(49)], "{b:?}");
        assert_eq!(w.finish("a"), Some(Watermark(69)));
    }

    /// A split without data for the idle timeout stops holding the watermark back; with every
    /// split idle the subtask is idle.
    #[test]
    fn idle_splits_stop_holding_back() {
        let mut w = SplitWatermarks::new(config(Some(Duration::from_millis(30))));
        w.declare(["a", "b"]);
        std::thread::sleep(Duration::from_millis(40));
        cut(&mut w, "a", &[100]);
        let (advanced, all) = w.idle_check();
        assert_eq!(advanced, Some(Watermark(99)));
        assert!(!all);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(w.idle_check(), (None, true));
        // data makes a split count again (it cannot pull the watermark back)
        cut(&mut w, "b", &[20]);
        assert_eq!(w.idle_check(), (None, false));
        assert_eq!(w.emitted(), Watermark(99));
    }

    /// Each split gets its own position back, whichever former subtask read it; state of the
    /// earlier format (one generator per subtask) still restores.
    #[test]
    fn restores_per_split_at_any_parallelism() {
        let mut one = SplitWatermarks::new(config(None));
        one.declare(["a"]);
        cut(&mut one, "a", &[100]);
        let mut two = SplitWatermarks::new(config(None));
        two.declare(["b"]);
        cut(&mut two, "b", &[40]);
        let (s1, s2) = (one.save(), two.save());
        let mut both = SplitWatermarks::new(config(None));
        both.declare(["a", "b"]);
        both.restore((0, 1), [(0, 2, s1.as_slice()), (1, 2, s2.as_slice())], [])
            .unwrap();
        assert_eq!(both.of("a"), Watermark(99));
        assert_eq!(both.of("b"), Watermark(39));
        assert_eq!(both.emitted(), Watermark(39));
        // a record of a at 60 is late for a, b's at 60 is not (and moves the subtask on)
        assert_eq!(cut(&mut both, "a", &[60]), vec![(1, 99, None)]);
        assert_eq!(cut(&mut both, "b", &[60]), vec![(1, 39, Some(59))]);

        let mut legacy = WatermarkGenerator::new(&config(None));
        legacy.split(&batch(&[7]));
        let mut w = SplitWatermarks::new(config(None));
        w.declare(["x", "y"]);
        w.restore((0, 1), [], [(0, 1, legacy.save().as_slice())])
            .unwrap();
        assert_eq!(
            (w.of("x"), w.of("y"), w.emitted()),
            (Watermark(6), Watermark(6), Watermark(6))
        );
        assert!(
            w.restore((0, 1), [(0, 1, b"nonsense".as_slice())], [])
                .is_err()
        );

        // the implicit split of a source that names none is in every former subtask: at the
        // same parallelism a subtask takes its own, else the lowest
        let whole = |t: i64| {
            let mut w = SplitWatermarks::new(config(None));
            w.declare([WHOLE]);
            cut(&mut w, WHOLE, &[t]);
            w.save()
        };
        let (a, b) = (whole(100), whole(50));
        let saved = || [(0, 2, a.as_slice()), (1, 2, b.as_slice())];
        let mut mine = SplitWatermarks::new(config(None));
        mine.declare([WHOLE]);
        mine.restore((0, 2), saved(), []).unwrap();
        assert_eq!(
            (mine.of(WHOLE), mine.emitted()),
            (Watermark(99), Watermark(99))
        );
        let mut other = SplitWatermarks::new(config(None));
        other.declare([WHOLE]);
        other.restore((1, 2), saved(), []).unwrap();
        assert_eq!(
            (other.of(WHOLE), other.emitted()),
            (Watermark(49), Watermark(49))
        );
        let mut rescaled = SplitWatermarks::new(config(None));
        rescaled.declare([WHOLE]);
        rescaled.restore((0, 3), saved(), []).unwrap();
        assert_eq!(
            (rescaled.of(WHOLE), rescaled.emitted()),
            (Watermark(49), Watermark(49))
        );
    }
}

//! Event-time timers: "call me back for this key when the watermark reaches t".
//!
//! A [`Timers`] queue is ordered by *(time, key)*: timers due at the same time fire in key order,
//! so a rerun, or a run restored from a snapshot, fires them alike, and registering the same
//! (time, key) twice keeps one timer.
//!
//! **Storage.** Once [attached](Timers::attach) to its operator's [`KeyedBackend`], the queue
//! lives in RocksDB, one empty row per timer under `[ff ff 01][table][time][key]` (time-ordered
//! across key groups), and memory holds only the registrations since the last write, at most
//! [`SPILL_AT`] of them. Memory therefore does not grow with the number of keys or windows, a
//! checkpoint writes only the timers registered since the previous one, and a restore reads
//! nothing up front. Timers that fired are deleted with one range tombstone per call of
//! [`due`](Timers::due), and reads start at a cursor past them, so a queue that is consumed from
//! its head does not make RocksDB step over deleted rows.
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Arc;

use super::StateKey;
use super::backend::{self, KeyedBackend};
use crate::{EngineError, Result, Watermark};

/// Registrations kept in memory before they are written to RocksDB.
pub const SPILL_AT: usize = 1 << 16;

/// How many due timers operators take at a time, so that firing a watermark that makes millions
/// due (the end of a bounded input) holds one batch of them, not all, in memory.
pub const FIRE_BATCH: usize = 4096;

/// Event-time timers per (time, key).
#[derive(Debug)]
pub struct Timers {
    name: String,
    /// Timers not yet written to the backend (all of them while detached).
    pending: BTreeSet<(i64, StateKey)>,
    backing: Option<Backing>,
}

#[derive(Debug)]
struct Backing {
    backend: Arc<KeyedBackend>,
    table: [u8; 4],
    /// The backend holds no timer row below this key: everything before it fired.
    cursor: Vec<u8>,
    /// The backend holds no timer earlier than this (a lower bound; `i64::MAX` when empty), so a
    /// watermark before it needs no read.
    earliest: i64,
}

impl Timers {
    /// An empty queue called `name` (unique within its operator), in memory until attached.
    pub fn new(name: impl Into<String>) -> Self {
        Timers {
            name: name.into(),
            pending: BTreeSet::new(),
            backing: None,
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the queue into `backend`. If the backend was restored from a snapshot, its timers
    /// are there; a snapshot of layout 0 kept them per key group, and they are moved into the
    /// time-ordered layout here.
    pub fn attach(&mut self, backend: &Arc<KeyedBackend>) -> Result<()> {
        let table = backend::table_id(&format!("timers/{}", self.name));
        if backend.restored() && backend.format() == 0 {
            let (name, pending) = (&self.name, &mut self.pending);
            backend.for_each_in_table(table, |k, _| {
                let (Some(t), Some(key)) = (k.get(..8), k.get(8..)) else {
                    return Err(EngineError::State(format!(
                        "timer row of {name} is too short"
                    )));
                };
                let t = backend::time_from_bytes(t.try_into().expect("8 bytes"));
                pending.insert((t, key.into()));
                Ok(())
            })?;
            backend.clear_table(table)?;
        }
        self.backing = Some(Backing {
            backend: backend.clone(),
            table,
            cursor: backend::timer_prefix(table),
            earliest: if backend.restored() {
                i64::MIN
            } else {
                i64::MAX
            },
        });
        self.flush()
    }

    /// Registers a timer for `key` at event time `t`.
    pub fn register(&mut self, t: i64, key: &[u8]) -> Result<()> {
        self.pending.insert((t, key.into()));
        if self.backing.is_some() && self.pending.len() >= SPILL_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the registrations held in memory to the backend (called before a snapshot, and
    /// whenever [`SPILL_AT`] of them accumulate). A detached queue keeps them.
    pub fn flush(&mut self) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            return Ok(());
        };
        let Some((first, _)) = self.pending.first() else {
            return Ok(());
        };
        b.earliest = b.earliest.min(*first);
        let mut batch = rocksdb::WriteBatch::default();
        for (i, (t, key)) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let row = backend::timer_key(b.table, t, &key);
            // a timer registered behind the cursor (for a time that already passed) moves it
            // back; everything between was deleted, so nothing else reappears
            if i == 0 && row < b.cursor {
                b.cursor = row.clone();
            }
            batch.put(&row, []);
        }
        b.backend.write(batch)
    }

    /// Removes and returns, in (time, key) order, up to `limit` timers at or before `wm`; call
    /// again until it returns none.
    pub fn due(&mut self, wm: Watermark, limit: usize) -> Result<Vec<(i64, StateKey)>> {
        loop {
            let (out, more) = self.take_due(wm, limit.max(1))?;
            if !out.is_empty() || !more {
                return Ok(out);
            }
        }
    }

    /// One pass of [`Timers::due`]; also says whether it skipped timers of keys the backend no
    /// longer owns (left behind by a rescale) and more may be due.
    fn take_due(&mut self, wm: Watermark, limit: usize) -> Result<(Vec<(i64, StateKey)>, bool)> {
        // timers in the backend, one more than needed to learn whether more are due
        let mut stored = Vec::new();
        if let Some(b) = self.backing.as_ref().filter(|b| b.earliest <= wm.0) {
            let rows =
                b.backend
                    .scan_keys(&b.cursor, backend::timer_upper(b.table, wm.0), limit + 1)?;
            for k in rows {
                let (t, key) = backend::decode_timer_key(&k).ok_or_else(|| {
                    EngineError::State(format!("timer row of {} is too short", self.name))
                })?;
                stored.push((t, StateKey::from(key), b.backend.owns(key)));
            }
        }
        let exhausted = stored.len() <= limit;
        let hi = match wm.0.checked_add(1) {
            Some(next) => Bound::Excluded((next, StateKey::new())),
            None => Bound::Unbounded,
        };
        let mut stored_iter = stored.into_iter().peekable();
        let mut mem = self.pending.range((Bound::Unbounded, hi)).peekable();
        let mut out: Vec<(i64, StateKey)> = Vec::new();
        // the last timer taken from either side, handed out or skipped
        let mut last: Option<(i64, StateKey)> = None;
        let mut skipped = false;
        while out.len() < limit {
            let from_store = match (stored_iter.peek(), mem.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((t, k, _)), Some((mt, mk))) => match (t, k).cmp(&(mt, mk)) {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Greater => false,
                    std::cmp::Ordering::Equal => {
                        mem.next();
                        true
                    }
                },
            };
            let (next, own) = if from_store {
                let (t, k, own) = stored_iter.next().expect("peeked");
                ((t, k), own)
            } else {
                (mem.next().expect("peeked").clone(), true)
            };
            last = Some(next.clone());
            if own {
                out.push(next);
            } else {
                skipped = true;
            }
        }
        let next_stored = stored_iter.peek().map(|(t, _, _)| *t);
        let more = skipped && (next_stored.is_some() || !exhausted);
        let Some(last) = last else {
            if let Some(b) = self.backing.as_mut() {
                b.earliest = b.earliest.max(wm.0.saturating_add(1));
            }
            return Ok((out, false));
        };
        // what remains due in the backend starts at the first row not taken
        let mut rest = self.pending.split_off(&last);
        rest.remove(&last);
        self.pending = rest;
        if let Some(b) = self.backing.as_mut() {
            let mut upto = backend::timer_key(b.table, last.0, &last.1);
            upto.push(0);
            if upto > b.cursor {
                b.backend.delete_range(&b.cursor, &upto)?;
                b.cursor = upto;
            }
            b.earliest = match next_stored {
                Some(t) => t,
                None if exhausted => b.earliest.max(wm.0.saturating_add(1)),
                None => b.earliest,
            };
        }
        Ok((out, more))
    }

    /// Timers held in memory (not yet written to the backend).
    pub fn in_memory(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateConfig;

    fn backend(dir: &std::path::Path, name: &str) -> Arc<KeyedBackend> {
        let cfg = StateConfig {
            local_dir: dir.to_path_buf(),
            ..StateConfig::default()
        };
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        Arc::new(KeyedBackend::open(&dir.join(name), &cfg, range, 128).unwrap())
    }

    fn all_due(timers: &mut Timers, wm: i64, limit: usize) -> Vec<(i64, StateKey)> {
        let mut out = Vec::new();
        loop {
            let chunk = timers.due(Watermark(wm), limit).unwrap();
            if chunk.is_empty() {
                return out;
            }
            out.extend(chunk);
            assert!(out.len() < 1 << 20, "timers keep firing");
        }
    }

    #[test]
    fn timers_fire_in_order_once() {
        let mut timers = Timers::new("t");
        timers.register(20, b"b").unwrap();
        timers.register(10, b"a").unwrap();
        timers.register(10, b"a").unwrap();
        assert_eq!(timers.in_memory(), 2);
        let due = timers.due(Watermark(15), 100).unwrap();
        assert_eq!(due, vec![(10, StateKey::from(&b"a"[..]))]);
        assert_eq!(timers.due(Watermark(25), 100).unwrap()[0].0, 20);
        assert!(timers.due(Watermark(i64::MAX), 100).unwrap().is_empty());
    }

    /// Memory holds at most [`SPILL_AT`] registrations however many timers wait; they fire in
    /// (time, key) order, each once, merged from RocksDB and memory, in chunks of any size.
    #[test]
    fn timers_spill_to_rocksdb_and_fire_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), "db");
        let mut timers = Timers::new("fire");
        timers.attach(&b).unwrap();
        let n = 3 * SPILL_AT as u32 + 17;
        let mut expected = Vec::new();
        for i in 0..n {
            // times out of order, several keys per time, and duplicates across spills
            let t = ((i * 7919) % 5000) as i64;
            let key = format!("k{}", i % 977).into_bytes();
            timers.register(t, &key).unwrap();
            expected.push((t, StateKey::from(key.as_slice())));
            assert!(timers.in_memory() < SPILL_AT);
        }
        for i in 0..100u32 {
            let t = ((i * 7919) % 5000) as i64;
            timers
                .register(t, format!("k{}", i % 977).as_bytes())
                .unwrap();
        }
        expected.sort();
        expected.dedup();
        let mut got = all_due(&mut timers, 2499, 1000);
        // a timer for a time that already passed still fires, at the next watermark
        timers.register(5, b"late").unwrap();
        timers.flush().unwrap();
        got.extend(all_due(&mut timers, 4000, 333));
        got.extend(all_due(&mut timers, i64::MAX, 4096));
        let mut want: Vec<_> = expected
            .iter()
            .filter(|(t, _)| *t <= 2499)
            .cloned()
            .collect();
        want.push((5, StateKey::from(&b"late"[..])));
        want.extend(expected.iter().filter(|(t, _)| *t > 2499).cloned());
        assert_eq!(got.len(), want.len());
        assert!(got == want, "timers fired out of order or more than once");
        assert!(all_due(&mut timers, i64::MAX, 10).is_empty());
    }

    /// A snapshot holds exactly the timers that had not fired, and a restored queue reads them
    /// from RocksDB without loading them first.
    #[test]
    fn timers_survive_a_snapshot_with_nothing_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), "db");
        let mut timers = Timers::new("fire");
        timers.attach(&b).unwrap();
        for i in 0..1000i64 {
            timers.register(i, format!("k{i}").as_bytes()).unwrap();
        }
        assert_eq!(all_due(&mut timers, 499, 64).len(), 500);
        timers.flush().unwrap();
        let snap = dir.path().join("snap");
        b.checkpoint(&snap).unwrap();
        let cfg = StateConfig {
            local_dir: dir.path().to_path_buf(),
            ..StateConfig::default()
        };
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let restored = Arc::new(
            KeyedBackend::restore(
                &dir.path().join("db2"),
                &cfg,
                range,
                128,
                vec![(snap, range)],
            )
            .unwrap(),
        );
        let mut timers = Timers::new("fire");
        timers.attach(&restored).unwrap();
        assert_eq!(timers.in_memory(), 0);
        let got = all_due(&mut timers, i64::MAX, 100);
        let want: Vec<_> = (500..1000i64)
            .map(|i| (i, StateKey::from(format!("k{i}").as_bytes())))
            .collect();
        assert_eq!(got, want);
    }
}

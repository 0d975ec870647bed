//! Event-time timers: "call me back for this key when the watermark reaches t".
//!
//! A [`Timers`] queue is ordered by time, and timers due at the same time by their keys'
//! [`timer_order`](backend::timer_order) (key group, then key), which is the order the keys'
//! rows are stored in: so a rerun, or a run restored from a snapshot, fires them alike,
//! and registering the same (time, key) twice keeps one timer.
//!
//! **Storage.** Once [attached](Timers::attach) to its operator's [`KeyedBackend`], the queue
//! lives in RocksDB, one empty row per timer under `[ff ff 02][table][time][key order]`
//! (time-ordered across key groups), and memory holds only the registrations and deletes since
//! the last write, at most [`SPILL_AT`] of them (a deleted timer whose row is not yet deleted is
//! passed over when it comes due). Memory therefore does not grow with the number of keys or
//! windows, a checkpoint writes only the timers registered since the previous one, and a restore
//! reads nothing up front. Reads start at a cursor past the timers that fired, so a queue that
//! is consumed from its head does not make RocksDB step over their rows, which are deleted with
//! one range delete per [`DELETE_EVERY`] fired timers and at every flush: a range tombstone per
//! firing would be sorted again by every read of the queue until RocksDB flushes its memtable.
//! The queue keeps an upper bound of its timers' times ([`Timers::latest`]), so an operator
//! knows when a watermark makes every timer due; one that then does what they were for by
//! other means (reading all of its state in order) deletes them through a time with one range
//! delete ([`Timers::clear_through`]).
//! A snapshot of layout 1 or 2 kept timers in (time, key) order under `[ff ff 01]`; they move
//! to this layout when their queue attaches.
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Arc;

use super::StateKey;
use super::backend::{self, KeyedBackend};
use crate::keys::{hash_key, key_group};
use crate::{EngineError, Result, Watermark};

/// Registrations kept in memory before they are written to RocksDB.
pub const SPILL_AT: usize = 1 << 16;

/// Fired timers after which their rows are deleted from the backend (see `Backing::deleted`).
const DELETE_EVERY: usize = 1 << 16;

/// How many due timers operators take at a time, so that firing a watermark that makes millions
/// due (the end of a bounded input) holds one batch of them, not all, in memory.
pub const FIRE_BATCH: usize = 4096;

/// Event-time timers per (time, key).
#[derive(Debug)]
pub struct Timers {
    name: String,
    /// Timers not yet written to the backend (all of them while detached), by time and key
    /// order.
    pending: BTreeSet<(i64, StateKey)>,
    /// Timers deleted that the backend may hold, by time and key order: they are not handed out,
    /// and their rows are deleted at the next write.
    cancelled: BTreeSet<(i64, StateKey)>,
    /// The job's number of key groups, which the key order starts with (detached: one).
    max_parallelism: u32,
    /// No timer is later than this (an upper bound: deletes do not lower it); `None` when the
    /// queue is empty.
    latest: Option<i64>,
    backing: Option<Backing>,
}

#[derive(Debug)]
struct Backing {
    backend: Arc<KeyedBackend>,
    table: [u8; 4],
    /// Every timer row below this key fired: reads start here.
    cursor: Vec<u8>,
    /// The backend holds no timer row below this key. Rows between it and `cursor` fired and
    /// are deleted with one range delete once [`DELETE_EVERY`] of them accumulate, or at the
    /// next [`Timers::flush`] (so no snapshot holds them): a range tombstone per firing would
    /// make every later read of the queue sort through all of them until RocksDB's memtable
    /// is flushed.
    deleted: Vec<u8>,
    /// Timers fired since the last range delete.
    undeleted: usize,
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
            cancelled: BTreeSet::new(),
            max_parallelism: 1,
            latest: None,
            backing: None,
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the queue into `backend`. If the backend was restored from a snapshot, its timers
    /// are there; a snapshot of layout 0 kept them per key group, and one of layouts 1 and 2 in
    /// (time, key) order: they are moved into this layout here.
    pub fn attach(&mut self, backend: &Arc<KeyedBackend>) -> Result<()> {
        let table = backend::table_id(&format!("timers/{}", self.name));
        self.max_parallelism = backend.max_parallelism();
        // registrations while detached, ordered again by the backend's key groups
        let detached = std::mem::take(&mut self.pending);
        for (t, order) in detached {
            let key = backend::key_of_order(&order).expect("made by `order`");
            self.pending.insert((t, self.order(key)));
        }
        if backend.restored() && backend.format() == 0 {
            let (name, pending) = (&self.name, &mut self.pending);
            let mp = self.max_parallelism;
            backend.for_each_in_table(table, |k, _| {
                let (Some(t), Some(key)) = (k.get(..8), k.get(8..)) else {
                    return Err(EngineError::State(format!(
                        "timer row of {name} is too short"
                    )));
                };
                let t = backend::time_from_bytes(t.try_into().expect("8 bytes"));
                pending.insert((t, order_in(mp, key)));
                Ok(())
            })?;
            backend.clear_table(table)?;
        }
        if backend.restored() && backend.format() < 3 {
            self.move_legacy(backend, table)?;
        }
        if backend.restored() {
            let prefix = backend::timer_prefix(table);
            if let Some(row) = backend.last_key(&prefix, backend::prefix_upper(&prefix))? {
                let (t, _) = backend::decode_timer_key(&row).ok_or_else(|| {
                    EngineError::State(format!("timer row of {} is malformed", self.name))
                })?;
                self.latest = self.latest.max(Some(t));
            }
        }
        self.latest = self.latest.max(self.pending.last().map(|(t, _)| *t));
        self.backing = Some(Backing {
            backend: backend.clone(),
            table,
            cursor: backend::timer_prefix(table),
            deleted: backend::timer_prefix(table),
            undeleted: 0,
            earliest: if backend.restored() {
                i64::MIN
            } else {
                i64::MAX
            },
        });
        self.flush()
    }

    /// Rewrites the timers of a restored snapshot of layout 1 or 2 (in (time, key) order) in
    /// this layout, a chunk at a time, and deletes them.
    fn move_legacy(&self, backend: &KeyedBackend, table: [u8; 4]) -> Result<()> {
        const CHUNK: usize = 1 << 16;
        let from = backend::legacy_timer_prefix(table);
        let upper = backend::prefix_upper(&from);
        let mut cursor = from.clone();
        loop {
            let rows = backend.scan_keys(&cursor, upper.clone(), CHUNK)?;
            let Some(last) = rows.last() else {
                break;
            };
            let mut batch = rocksdb::WriteBatch::default();
            for row in &rows {
                let (t, key) = backend::decode_timer_key(row).ok_or_else(|| {
                    EngineError::State(format!("timer row of {} is too short", self.name))
                })?;
                if backend.owns(key) {
                    batch.put(backend::timer_key(table, t, &self.order(key)), []);
                }
            }
            cursor = last.to_vec();
            cursor.push(0);
            backend.write(batch)?;
            if rows.len() < CHUNK {
                break;
            }
        }
        backend.delete_range(&from, &upper)
    }

    /// `key`'s place among the timers due at one time.
    fn order(&self, key: &[u8]) -> StateKey {
        order_in(self.max_parallelism, key)
    }

    /// Registers a timer for `key` at event time `t`.
    pub fn register(&mut self, t: i64, key: &[u8]) -> Result<()> {
        self.latest = self.latest.max(Some(t));
        let timer = (t, self.order(key));
        self.cancelled.remove(&timer);
        self.pending.insert(timer);
        self.flush_if_full()
    }

    /// Deletes the timer for `key` at event time `t`, if there is one (an operator whose state
    /// for the key no longer needs it, so that it neither fires nor reads the key's state).
    pub fn delete(&mut self, t: i64, key: &[u8]) -> Result<()> {
        let timer = (t, self.order(key));
        self.pending.remove(&timer);
        if self.backing.is_some() {
            // the backend may hold it from an earlier write
            self.cancelled.insert(timer);
        }
        self.flush_if_full()
    }

    /// Writes the registrations and deletes held in memory once [`SPILL_AT`] of them accumulate.
    fn flush_if_full(&mut self) -> Result<()> {
        if self.backing.is_some() && self.pending.len() + self.cancelled.len() >= SPILL_AT {
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
        let mut batch = rocksdb::WriteBatch::default();
        // the rows of fired timers go first (a row written below is written after their
        // delete, so it stays)
        if b.deleted < b.cursor {
            batch.delete_range(&b.deleted, &b.cursor);
            b.deleted = b.cursor.clone();
            b.undeleted = 0;
        }
        for (t, order) in std::mem::take(&mut self.cancelled) {
            let row = backend::timer_key(b.table, t, &order);
            if row >= b.cursor {
                batch.delete(&row);
            }
        }
        if let Some((first, _)) = self.pending.first() {
            b.earliest = b.earliest.min(*first);
        }
        for (i, (t, order)) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let row = backend::timer_key(b.table, t, &order);
            // a timer registered behind the cursor (for a time that already passed) moves it
            // back; everything between was deleted, so nothing else reappears
            if i == 0 && row < b.cursor {
                b.cursor = row.clone();
                b.deleted = row.clone();
            }
            batch.put(&row, []);
        }
        if batch.is_empty() {
            return Ok(());
        }
        b.backend.write(batch)
    }

    /// Removes and returns, in (time, key order) order, up to `limit` timers at or before `wm`:
    /// fewer only when no more are due, so an operator that got fewer has fired them all.
    pub fn due(&mut self, wm: Watermark, limit: usize) -> Result<Vec<(i64, StateKey)>> {
        let limit = limit.max(1);
        let mut out = Vec::new();
        loop {
            let (chunk, more) = self.take_due(wm, limit - out.len())?;
            out.extend(chunk);
            if out.len() >= limit || !more {
                break;
            }
        }
        if out.len() < limit && self.latest.is_some_and(|l| l <= wm.0) {
            // every timer was due, and all were taken
            self.latest = None;
        }
        Ok(out)
    }

    /// No timer of the queue is later than this (an upper bound); `None` if it holds none.
    /// Once it is at or before the watermark, every timer is due.
    pub fn latest(&self) -> Option<i64> {
        self.latest
    }

    /// Deletes every timer at or before `t` without handing it out: for an operator that did
    /// what they were for another way (read all of its state in order).
    pub fn clear_through(&mut self, t: i64) -> Result<()> {
        match t.checked_add(1) {
            Some(next) => {
                let later = (next, StateKey::new());
                self.pending = self.pending.split_off(&later);
                self.cancelled = self.cancelled.split_off(&later);
            }
            None => {
                self.pending.clear();
                self.cancelled.clear();
            }
        }
        if let Some(b) = self.backing.as_mut() {
            let upper = backend::timer_upper(b.table, t);
            if upper > b.cursor {
                b.backend.delete_range(&b.deleted, &upper)?;
                b.cursor = upper.clone();
                b.deleted = upper;
                b.undeleted = 0;
            }
            b.earliest = b.earliest.max(t.saturating_add(1));
        }
        if self.latest.is_some_and(|l| l <= t) {
            self.latest = None;
        }
        Ok(())
    }

    /// One pass of [`Timers::due`]; also says whether it skipped timers (deleted ones, or of
    /// keys the backend no longer owns, left behind by a rescale) and more may be due.
    fn take_due(&mut self, wm: Watermark, limit: usize) -> Result<(Vec<(i64, StateKey)>, bool)> {
        // timers in the backend, one more than needed to learn whether more are due
        let mut stored = Vec::new();
        if let Some(b) = self.backing.as_ref().filter(|b| b.earliest <= wm.0) {
            let rows =
                b.backend
                    .scan_keys(&b.cursor, backend::timer_upper(b.table, wm.0), limit + 1)?;
            for k in rows {
                let (t, key, order) = backend::decode_timer_key(&k)
                    .and_then(|(t, order)| Some((t, backend::key_of_order(order)?, order)))
                    .ok_or_else(|| {
                        EngineError::State(format!("timer row of {} is malformed", self.name))
                    })?;
                stored.push((t, StateKey::from(order), b.backend.owns(key)));
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
                // every row read was passed over and the backend has more, which may come
                // before what memory holds: read on first
                (None, Some(_)) if !exhausted => break,
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
                // a deleted timer whose row is not yet deleted is passed over
                let live = !self.cancelled.remove(&(t, k.clone()));
                ((t, k), own && live)
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
            return Ok((keys_of(out), false));
        };
        // what remains due in the backend starts at the first row not taken
        let mut rest = self.pending.split_off(&last);
        rest.remove(&last);
        self.pending = rest;
        if let Some(b) = self.backing.as_mut() {
            let mut upto = backend::timer_key(b.table, last.0, &last.1);
            upto.push(0);
            if upto > b.cursor {
                b.cursor = upto;
                b.undeleted += out.len().max(1);
                if b.undeleted >= DELETE_EVERY {
                    b.backend.delete_range(&b.deleted, &b.cursor)?;
                    b.deleted = b.cursor.clone();
                    b.undeleted = 0;
                }
            }
            b.earliest = match next_stored {
                Some(t) => t,
                None if exhausted => b.earliest.max(wm.0.saturating_add(1)),
                None => b.earliest,
            };
        }
        Ok((keys_of(out), more))
    }

    /// Timers held in memory (registrations and deletes not yet written to the backend).
    pub fn in_memory(&self) -> usize {
        self.pending.len() + self.cancelled.len()
    }
}

/// `key`'s [`backend::timer_order`] in a job of `max_parallelism` key groups.
fn order_in(max_parallelism: u32, key: &[u8]) -> StateKey {
    backend::timer_order(key_group(hash_key(key), max_parallelism), key)
}

/// Timers as (time, key order) with the orders replaced by their keys.
fn keys_of(timers: Vec<(i64, StateKey)>) -> Vec<(i64, StateKey)> {
    timers
        .into_iter()
        .map(|(t, order)| {
            let key = backend::key_of_order(&order).expect("checked when read or made");
            (t, StateKey::from(key))
        })
        .collect()
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

    /// Snapshots `b` (which owns every key group) and restores the snapshot for `range`.
    fn restored(
        dir: &std::path::Path,
        b: &KeyedBackend,
        range: crate::KeyGroupRange,
    ) -> Arc<KeyedBackend> {
        let snap = dir.join("snap");
        b.checkpoint(&snap).unwrap();
        let cfg = StateConfig {
            local_dir: dir.to_path_buf(),
            ..StateConfig::default()
        };
        let whole = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let into = dir.join("restored");
        Arc::new(KeyedBackend::restore(&into, &cfg, range, 128, vec![(snap, whole)]).unwrap())
    }

    fn all_due(timers: &mut Timers, wm: i64, limit: usize) -> Vec<(i64, StateKey)> {
        let mut out = Vec::new();
        loop {
            let chunk = timers.due(Watermark(wm), limit).unwrap();
            let last = chunk.len() < limit;
            out.extend(chunk);
            // fewer than asked for means none are left (operators stop asking then)
            if last {
                assert!(timers.due(Watermark(wm), limit).unwrap().is_empty());
                return out;
            }
            assert!(out.len() < 1 << 20, "timers keep firing");
        }
    }

    /// A queue knows no timer is later than the latest registered, after a restore too, and
    /// forgets it once all fired; deleting the timers through a time, in RocksDB and in
    /// memory, leaves the later ones to fire.
    #[test]
    fn the_latest_timer_is_known_and_the_timers_through_a_time_can_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), "a");
        let mut t = Timers::new("t");
        t.attach(&b).unwrap();
        assert_eq!(t.latest(), None);
        for (time, k) in [(30, "a"), (10, "b"), (20, "c"), (50, "d")] {
            t.register(time, k.as_bytes()).unwrap();
        }
        t.flush().unwrap();
        t.register(25, b"e").unwrap();
        t.delete(50, b"d").unwrap();
        assert_eq!(
            t.latest(),
            Some(50),
            "an upper bound: a delete does not lower it"
        );
        t.flush().unwrap();
        let mut r = Timers::new("t");
        r.attach(&restored(
            dir.path(),
            &b,
            crate::KeyGroupRange::for_subtask(128, 1, 0),
        ))
        .unwrap();
        assert_eq!(r.latest(), Some(30), "read from the restored rows");
        // 10 and 20 fire; then 25 and 30 are deleted unfired, and 40 (in memory) stays
        assert_eq!(all_due(&mut r, 20, 1).len(), 2);
        r.register(40, b"f").unwrap();
        r.clear_through(30).unwrap();
        assert_eq!(r.latest(), Some(40));
        assert!(all_due(&mut r, 39, 8).is_empty());
        assert_eq!(
            all_due(&mut r, 40, 8),
            vec![(40, StateKey::from(&b"f"[..]))]
        );
        assert_eq!(r.latest(), None, "every timer fired");
        // the same in RocksDB: 60 and 70 written, 60 deleted, 70 fires
        r.register(60, b"g").unwrap();
        r.register(70, b"h").unwrap();
        r.flush().unwrap();
        r.clear_through(65).unwrap();
        assert!(all_due(&mut r, 69, 8).is_empty());
        assert_eq!(
            all_due(&mut r, i64::MAX, 8),
            vec![(70, StateKey::from(&b"h"[..]))]
        );
        r.register(80, b"i").unwrap();
        r.clear_through(i64::MAX).unwrap();
        assert_eq!(r.latest(), None);
        assert!(all_due(&mut r, i64::MAX, 8).is_empty());
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

    /// A deleted timer never fires: registered and deleted in memory, deleted after it was
    /// written to RocksDB (before and after the delete itself is written), registered again
    /// after its delete, detached or attached, and across a snapshot.
    #[test]
    fn deleted_timers_do_not_fire() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), "db");
        let key = |i: i64| format!("k{i}").into_bytes();
        let mut detached = Timers::new("d");
        detached.register(1, b"a").unwrap();
        detached.register(2, b"b").unwrap();
        detached.delete(1, b"a").unwrap();
        detached.delete(9, b"never").unwrap();
        assert_eq!(
            all_due(&mut detached, 10, 4),
            vec![(2, StateKey::from(&b"b"[..]))]
        );
        let mut timers = Timers::new("fire");
        timers.attach(&b).unwrap();
        for i in 0..100 {
            timers.register(i, &key(i)).unwrap();
        }
        // 0..50 are in RocksDB; the deletes of the even ones among them are written too
        timers.flush().unwrap();
        for i in (0..50).step_by(2) {
            timers.delete(i, &key(i)).unwrap();
        }
        timers.flush().unwrap();
        for i in 50..100 {
            timers.register(i + 100, &key(i)).unwrap();
        }
        timers.flush().unwrap();
        // deletes held in memory: of timers in RocksDB (odd ones below 50), of ones registered
        // since the last write (150..200), and one registered again after its delete
        for i in (1..50).step_by(2) {
            timers.delete(i, &key(i)).unwrap();
        }
        timers.delete(7, &key(7)).unwrap();
        timers.register(7, &key(7)).unwrap();
        for i in 50..100 {
            timers.delete(i + 100, &key(i)).unwrap();
        }
        // a full chunk, although deleted timers were passed over to fill it
        assert_eq!(timers.due(Watermark(60), 8).unwrap().len(), 8);
        let due = all_due(&mut timers, 60, 8);
        let want: Vec<(i64, StateKey)> = [7]
            .into_iter()
            .chain(50..61)
            .map(|i| (i, StateKey::from(key(i).as_slice())))
            .skip(8)
            .collect();
        assert_eq!(due, want);
        // the rest, after a snapshot: 61..100, none of the deleted ones
        timers.flush().unwrap();
        let whole = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let restored = restored(dir.path(), &b, whole);
        let mut again = Timers::new("fire");
        again.attach(&restored).unwrap();
        let due = all_due(&mut again, i64::MAX, 16);
        let want: Vec<(i64, StateKey)> = (61..100)
            .map(|i| (i, StateKey::from(key(i).as_slice())))
            .collect();
        assert_eq!(due, want);
    }

    /// Fired timers' rows are deleted lazily, but never make it into a snapshot: a restore fires
    /// only what had not fired. (Unlike `timers_survive_a_snapshot_with_nothing_loaded`, the
    /// timers are in RocksDB before they fire, so their rows are there to delete.)
    #[test]
    fn a_snapshot_holds_no_fired_timer() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), "db");
        let mut timers = Timers::new("fire");
        timers.attach(&b).unwrap();
        for i in 0..1000i64 {
            timers.register(i, format!("k{i}").as_bytes()).unwrap();
        }
        timers.flush().unwrap();
        // fired in small steps, each well below the count that deletes rows at once
        for wm in (0..600).step_by(7) {
            all_due(&mut timers, wm, 5);
        }
        assert_eq!(all_due(&mut timers, 599, 64).len(), 600 - 596);
        timers.flush().unwrap();
        let whole = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let restored = restored(dir.path(), &b, whole);
        let mut again = Timers::new("fire");
        again.attach(&restored).unwrap();
        let due = all_due(&mut again, i64::MAX, 100);
        let want: Vec<(i64, StateKey)> = (600..1000i64)
            .map(|i| (i, StateKey::from(format!("k{i}").as_bytes())))
            .collect();
        assert_eq!(due, want);
    }

    /// Timers passed over (deleted, or of key groups the backend no longer owns) do not let a
    /// later timer held in memory go ahead of earlier ones in RocksDB behind them.
    #[test]
    fn timers_passed_over_keep_the_order_of_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), "db");
        let mut timers = Timers::new("fire");
        timers.attach(&b).unwrap();
        let key = |i: i64| format!("k{i}").into_bytes();
        for i in 0..20 {
            timers.register(i, &key(i)).unwrap();
        }
        timers.flush().unwrap();
        timers.register(100, &key(100)).unwrap();
        for i in 0..10 {
            timers.delete(i, &key(i)).unwrap();
        }
        let due = all_due(&mut timers, i64::MAX, 4);
        let want: Vec<(i64, StateKey)> = (10..20)
            .chain([100])
            .map(|i| (i, StateKey::from(key(i).as_slice())))
            .collect();
        assert_eq!(due, want);
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
        // by time, then as the keys' rows are stored
        expected.sort_by_key(|(t, k)| (*t, order_in(128, k)));
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
        let restored = restored(dir.path(), &b, crate::KeyGroupRange::for_subtask(128, 1, 0));
        let mut timers = Timers::new("fire");
        timers.attach(&restored).unwrap();
        assert_eq!(timers.in_memory(), 0);
        let got = all_due(&mut timers, i64::MAX, 100);
        let want: Vec<_> = (500..1000i64)
            .map(|i| (i, StateKey::from(format!("k{i}").as_bytes())))
            .collect();
        assert_eq!(got, want);
    }

    /// Timers due at one time come in the order their keys' rows are stored: by key group, then
    /// by key length and bytes.
    #[test]
    fn timers_due_together_come_in_the_order_of_their_keys_rows() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), "db");
        let mut timers = Timers::new("fire");
        timers.attach(&b).unwrap();
        let keys: Vec<Vec<u8>> = (0..500u32)
            .map(|i| format!("{}", i * 37).into_bytes())
            .collect();
        for k in &keys {
            timers.register(7, k).unwrap();
        }
        timers.flush().unwrap();
        for k in keys.iter().take(50) {
            // some in RocksDB, some in memory, merged
            timers.register(7, k).unwrap();
            timers.register(8, k).unwrap();
        }
        let got = all_due(&mut timers, 7, 64);
        let rows: Vec<Vec<u8>> = got
            .iter()
            .map(|(_, k)| {
                let kg = crate::keys::key_group(hash_key(k), 128);
                backend::key_prefix(kg, backend::value_table_id("slices"), k)
            })
            .collect();
        assert_eq!(got.len(), keys.len());
        assert!(rows.windows(2).all(|w| w[0] < w[1]), "not in row order");
        assert_eq!(all_due(&mut timers, 8, 64).len(), 50);
    }

    /// Timers a snapshot of layout 2 kept in (time, key) order move to this layout when their
    /// queue attaches, keys of other key groups left out, and fire as if registered now.
    #[test]
    fn timers_of_layout_2_are_moved_on_restore() {
        let dir = tempfile::tempdir().unwrap();
        let old = backend(dir.path(), "old");
        old.set_format(2);
        let table = backend::table_id("timers/fire");
        let mut batch = rocksdb::WriteBatch::default();
        let mut all = Vec::new();
        for i in 0..3000i64 {
            let (t, key) = (i % 70, format!("key-{i}").into_bytes());
            let mut row = backend::legacy_timer_prefix(table);
            row.extend_from_slice(&backend::time_bytes(t));
            row.extend_from_slice(&key);
            batch.put(row, []);
            all.push((t, key));
        }
        old.write(batch).unwrap();
        // the second half of the key groups, as a rescale to 2 gives it
        let restored = restored(
            dir.path(),
            &old,
            crate::KeyGroupRange::for_subtask(128, 2, 1),
        );
        assert_eq!(restored.format(), 2);
        let mut timers = Timers::new("fire");
        timers.attach(&restored).unwrap();
        let legacy = backend::legacy_timer_prefix(table);
        let left = restored
            .scan_keys(&legacy, backend::prefix_upper(&legacy), 10)
            .unwrap();
        assert!(left.is_empty(), "timers of layout 2 stay behind");
        let mut want: Vec<(i64, StateKey)> = all
            .iter()
            .filter(|(_, k)| restored.owns(k))
            .map(|(t, k)| (*t, StateKey::from(k.as_slice())))
            .collect();
        assert!(want.len() > 1000 && want.len() < 2000);
        want.sort_by_key(|(t, k)| (*t, order_in(128, k)));
        assert_eq!(all_due(&mut timers, i64::MAX, 500), want);
    }
}

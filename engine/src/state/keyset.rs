//! Key sets: the keys an operator has seen, each with the event time it was last touched (for a
//! TTL) and nothing else — a `keep: first` deduplication's state.
//!
//! A [`KeySet`] keeps what a [`super::KeyedTable`] of one value per key would, in a fraction of
//! its memory: a key costs one 16-byte slot of an open-addressing index ([`super::key_slots`]:
//! keys of up to 9 bytes inline, the touched time in 32 bits ([`TimeScale`]) and the cache
//! flags beside them) where a keyed table spends an entry of 96 bytes on a deduplication's key,
//! and the index is sized to the memory it may use rather than to a power of two. So the same
//! budget holds six times as many keys or more, and a lookup touches one cache line or two.
//!
//! **RocksDB.** Rows are those of a one-value keyed table of the same name — one per key, at
//! namespace 0, with the key's deadline and touched time in the header and a fixed value the
//! owner gives ([`KeySet::new`]) — so state moves between the two unchanged (a savepoint of
//! either restores into the other) and restore, rescale and expiry by compaction work as for
//! keyed tables. As for those, a miss reads RocksDB only if the spill filters
//! ([`super::spilled`]) say it may hold the key, a batch's misses are read with one `MultiGet`
//! ([`KeySet::prefetch`]), and a flush writes the dirty keys in row order. A restored set
//! reads its snapshot's keys into the spill filters as prefetches come, so that once it has, a
//! key new to it reads nothing, as before the restore (see [`Spilled::learn_from`]).
//!
//! **Memory.** The index is charged by its allocation, long keys by their bytes, the spill
//! filters by theirs, against the job's [`super::StateMemory`]. The index grows (in place, see
//! [`Index::resize`]) while the budget has room for it, and, once the set has evicted a key and
//! while the filters filter, for the filters' share (and gives them more as they grow, up to
//! half the budget); once it cannot, a full index writes its dirty keys and evicts an eighth
//! of them by CLOCK: expired keys first, then keys not used since the last eviction (a key
//! read back but not used again among them), spread evenly over the slots; a key kept loses
//! its used mark.
use std::sync::Arc;
use std::time::Duration;

use super::backend::{self, KeyedBackend, TableScan};
use super::key_slots::{
    Class, DIRTY, Index, KeyBuf, LongKeys, PERSISTED, Pass, READ_AHEAD, SLOT_INLINE, Slot, USED,
};
use super::spilled::{ALL, Spilled, rows_for_prefetch};
use super::{FILTER_CAP, FILTER_SHARE, FLUSH_BATCH_BYTES, PUBLISH_EVERY, StateKey};
use crate::keys::{hash_key, key_group};
use crate::{EngineError, KeyGroup, Result, Watermark};

/// Slots of a new index.
const FIRST_SLOTS: usize = 1024;

/// Where an attached set's rows live.
#[derive(Debug)]
struct Backing {
    backend: Arc<KeyedBackend>,
    table: [u8; 4],
    spilled: Spilled,
    /// The namespace range recorded for the table (only 0 is ever written).
    written: Option<(i64, i64)>,
    /// Keys with the [`DIRTY`] flag.
    dirty: usize,
    /// A restored set's reading of its snapshot's keys, until it has read them all (see
    /// [`Spilled::learn_from`]).
    scan: Option<TableScan>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct KeySet {
    name: String,
    ttl: Option<i64>,
    /// The value version and encoded value every row holds.
    version: u8,
    value: Vec<u8>,
    index: Index,
    /// The ticks slots count touched times in.
    scale: TimeScale,
    long: LongKeys,
    /// Bytes charged: the index's allocation, the long keys and the spill filters.
    bytes: usize,
    /// Keys the last prefetch found in neither memory nor RocksDB and not added since.
    absent: hashbrown::HashSet<StateKey, foldhash::fast::FixedState>,
    lookups: u64,
    reads: u64,
    loads: u64,
    published: (u64, u64),
    rows_written: u64,
    /// Keys the index refused, kept in RocksDB alone.
    outside: u64,
    /// The latest watermark passed to [`KeySet::expire`].
    clock: Watermark,
    backing: Option<Backing>,
}

impl KeySet {
    /// An empty set called `name` (a keyed table's name: its rows are that table's), whose rows
    /// hold `value`, encoded in value version `version`; with an optional TTL after each key's
    /// touched time. In memory until [attached](Self::attach).
    pub fn new(
        name: impl Into<String>,
        ttl: Option<Duration>,
        version: u8,
        value: Vec<u8>,
    ) -> Self {
        let ttl = ttl.map(|d| d.as_millis().min(i64::MAX as u128) as i64);
        KeySet {
            name: name.into(),
            ttl,
            scale: TimeScale::new(ttl),
            version,
            value,
            index: Index::default(),
            long: LongKeys::default(),
            bytes: 0,
            absent: Default::default(),
            lookups: 0,
            reads: 0,
            loads: 0,
            published: (0, 0),
            rows_written: 0,
            outside: 0,
            clock: Watermark::MIN,
            backing: None,
        }
    }

    /// Moves the set into `backend`: RocksDB holds it from now on and memory caches it. Keys
    /// added before are written at the next flush. Rows of layouts before
    /// [`backend::FORMAT`] 2 must have been moved first, by attaching a one-value keyed table
    /// of the same name: a set does not see them.
    pub fn attach(&mut self, backend: &Arc<KeyedBackend>) -> Result<()> {
        let table = backend::value_table_id(&self.name);
        let written = if backend.restored() {
            backend.namespace_range(table)?
        } else {
            None
        };
        let mut dirty = 0;
        for s in self.index.iter_mut() {
            s.flags |= DIRTY;
            dirty += 1;
        }
        self.absent.clear();
        backend.memory().add_table();
        backend.memory().charge(0, self.bytes);
        self.backing = Some(Backing {
            backend: backend.clone(),
            table,
            spilled: Spilled::new(written, backend.memory().decoded_budget() / FILTER_CAP)
                .expiring(self.ttl),
            written,
            dirty,
            scan: written.map(|_| TableScan::new(table)),
        });
        Ok(())
    }

    /// The tick a slot records for touched time `t` (see [`TimeScale`]); moves the scale's
    /// epoch forward if `t` is past its end and the clock lets it.
    fn tick(&mut self, t: i64) -> u32 {
        if let Some(tick) = self.scale.tick(t) {
            return tick;
        }
        // as far as puts `t` mid-range, but no key live as of the clock may fall before it
        let mut to = t.saturating_sub(self.scale.unit.saturating_mul(1 << 31));
        if let Some(ttl) = self.ttl {
            to = to.min(self.clock.0.saturating_sub(ttl));
        }
        let shift = self.scale.advance(to);
        if shift > 0 {
            for s in self.index.iter_mut() {
                s.touched = s.touched.saturating_sub(shift);
            }
        }
        self.scale.tick(t).unwrap_or(u32::MAX)
    }

    fn error(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::State(format!("{}: {e}", self.name))
    }

    /// Keys in memory (live or expired, not yet evicted).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True if memory holds no key.
    pub fn is_empty(&self) -> bool {
        self.index.len() == 0
    }

    /// Bytes charged to the job's memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Accesses so far.
    pub fn lookups(&self) -> u64 {
        self.lookups
    }

    /// Misses that read RocksDB so far, whether or not they found the key.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Keys read back from RocksDB into memory so far.
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// Rows written to RocksDB so far.
    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Whether `key` (not in memory) must be read from RocksDB: it may hold it, and the last
    /// prefetch did not find it missing.
    fn may_be_stored(&self, key: &[u8]) -> bool {
        self.backing.as_ref().is_some_and(|b| {
            !b.spilled.is_empty()
                && b.spilled.may_hold(hash_key(key), ALL)
                && (self.absent.is_empty() || !self.absent.contains(key))
        })
    }

    /// Marks a slot used by an access.
    fn touch_use(s: &mut Slot) {
        s.flags = if s.flags & READ_AHEAD != 0 {
            s.flags & !READ_AHEAD
        } else {
            s.flags | USED
        };
    }

    fn count_lookup(&mut self) {
        self.lookups += 1;
        if self.lookups.is_multiple_of(PUBLISH_EVERY) {
            self.publish_counts();
        }
    }

    /// Adds `key` unless memory holds it live as of `clock`, touching it at `now`; `None` if
    /// memory lacks it and RocksDB may hold it (then nothing changed: read it with
    /// [`Self::prefetch`] or [`Self::insert_if_absent`]). Whether it was added otherwise.
    pub fn try_insert(&mut self, key: &[u8], now: i64, clock: Watermark) -> Result<Option<bool>> {
        let probe = Slot::of(key, self.tick(now));
        if let Some(i) = self.index.find(key, &probe, &self.long) {
            let (ttl, scale) = (self.ttl, self.scale);
            let s = self.index.get_mut(i);
            Self::touch_use(s);
            let live = ttl.is_none_or(|ttl| clock.0 < scale.time(s.touched).saturating_add(ttl));
            if !live {
                // expired: it starts over, and its row is rewritten with the new deadline
                s.touched = probe.0.touched;
                let was_dirty = s.flags & DIRTY != 0;
                s.flags |= DIRTY;
                if !was_dirty && let Some(b) = self.backing.as_mut() {
                    b.dirty += 1;
                }
            }
            self.count_lookup();
            return Ok(Some(!live));
        }
        if self.may_be_stored(key) {
            return Ok(None);
        }
        self.count_lookup();
        self.add(key, probe, DIRTY)?;
        Ok(Some(true))
    }

    /// Adds `key` unless it is held live as of `clock` (reading RocksDB if need be), touching
    /// it at `now`; whether it was added.
    pub fn insert_if_absent(&mut self, key: &[u8], now: i64, clock: Watermark) -> Result<bool> {
        if let Some(added) = self.try_insert(key, now, clock)? {
            return Ok(added);
        }
        // the key is read into memory (a read makes room before it adds), or found missing
        let found = self.read(&[key])?;
        if let Some(added) = self.try_insert(key, now, clock)? {
            return Ok(added);
        }
        // found, but the index refused it: RocksDB alone holds it
        let live =
            found[0].is_some_and(|t| self.ttl.is_none_or(|ttl| clock.0 < t.saturating_add(ttl)));
        if !live {
            let (mut slot, _) = Slot::of(key, self.tick(now));
            slot.flags = DIRTY;
            self.keep_outside(key, slot)?;
        }
        Ok(!live)
    }

    /// Reads the keys of `keys` that memory lacks and RocksDB may hold with one batched
    /// lookup: keys found are kept in memory (the access that follows is their first use), and
    /// keys missing are remembered until the next prefetch, so the accesses that follow read
    /// nothing.
    pub fn prefetch<'k>(&mut self, keys: impl IntoIterator<Item = &'k [u8]>) -> Result<()> {
        let keys: Vec<&[u8]> = keys.into_iter().collect();
        if let Some(b) = self.backing.as_mut()
            && b.spilled.learn_from(
                &b.backend,
                &mut b.scan,
                rows_for_prefetch(keys.len()),
                &self.name,
            )?
        {
            self.charge();
        }
        self.absent.clear();
        let wanted: Vec<&[u8]> = keys
            .into_iter()
            .filter(|k| {
                self.index.find(k, &Slot::of(k, 0), &self.long).is_none() && self.may_be_stored(k)
            })
            .collect();
        self.read(&wanted).map(drop)
    }

    /// Reads `keys` (none in memory) from RocksDB with one batched lookup, see
    /// [`Self::prefetch`]; returns the touched time of each key found (of a key listed twice,
    /// at one of its places).
    fn read(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<i64>>> {
        let mut touched_at = vec![None; keys.len()];
        let Some(b) = self.backing.as_ref() else {
            return Ok(touched_at);
        };
        if keys.is_empty() {
            return Ok(touched_at);
        }
        let (backend, table) = (b.backend.clone(), b.table);
        let mp = backend.max_parallelism();
        let mut rows = RowKeys::default();
        for k in keys {
            rows.push(key_group(hash_key(k), mp), table, k);
        }
        // in row order, each key once: RocksDB walks its files' indexes forward
        let mut order = rows.sorted();
        order.dedup_by(|a, b| rows.get(*a) == rows.get(*b));
        self.reads += order.len() as u64;
        let row_keys: Vec<&[u8]> = order.iter().map(|&i| rows.get(i)).collect();
        let mut found: Vec<(usize, i64)> = Vec::new();
        backend.multi_get(&row_keys, |i, row| {
            let touched = row
                .get(8..16)
                .ok_or_else(|| self.error("a state row shorter than its header"))?;
            found.push((i, i64::from_be_bytes(touched.try_into().expect("8 bytes"))));
            Ok(())
        })?;
        let mut found = found.into_iter().peekable();
        for (n, &i) in order.iter().enumerate() {
            let key = keys[i];
            match found.next_if(|f| f.0 == n) {
                Some((_, touched)) => {
                    touched_at[i] = Some(touched);
                    let slot = Slot::of(key, self.tick(touched));
                    self.add(key, slot, PERSISTED | READ_AHEAD)?;
                    self.loads += 1;
                    if let Some(b) = self.backing.as_mut() {
                        b.spilled.read_back(0);
                    }
                }
                None => {
                    self.absent.insert(StateKey::from_slice(key));
                }
            }
        }
        self.charge();
        Ok(touched_at)
    }

    /// Puts `key` (not in memory) into the index with `flags`, making room for it first.
    fn add(&mut self, key: &[u8], (mut slot, hash): (Slot, u32), flags: u8) -> Result<()> {
        self.make_room()?;
        if !self.absent.is_empty() {
            self.absent.remove(key);
        }
        if slot.is_long() {
            self.long.add(&mut slot, key)?;
        }
        slot.flags = flags;
        if !self.index.insert(slot, hash) {
            self.long.remove(&slot);
            return self.keep_outside(key, slot);
        }
        if flags & DIRTY != 0
            && let Some(b) = self.backing.as_mut()
        {
            b.dirty += 1;
        }
        self.charge();
        self.give_back()
    }

    /// Keeps a key the index refused (see [`Index::insert`]) in RocksDB alone: its row is
    /// written now if it changed, and the spill filters learn of it, so the next access reads
    /// it. A set in memory has nowhere to keep it.
    fn keep_outside(&mut self, key: &[u8], slot: Slot) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            return Err(
                self.error("too many keys whose hashes fall together for a key set in memory")
            );
        };
        if slot.flags & DIRTY != 0 {
            let mut batch = rocksdb::WriteBatch::default();
            if b.written.is_none() {
                b.written = Some((0, 0));
                batch.put(backend::range_row(b.table), backend::range_value((0, 0)));
            }
            let kg = key_group(hash_key(key), b.backend.max_parallelism());
            let row = backend::row_key(kg, b.table, key, 0);
            batch.put(
                &row,
                row_value(
                    self.ttl,
                    self.scale.time(slot.touched),
                    self.version,
                    &self.value,
                ),
            );
            b.backend.write(batch)?;
            self.rows_written += 1;
        }
        b.spilled
            .evicted(hash_key(key), 0, self.scale.time(slot.touched));
        self.outside += 1;
        Ok(())
    }

    /// Keeps outside the index the keys a resize refused.
    fn keep_refused(&mut self, refused: Vec<Slot>) -> Result<()> {
        for s in refused {
            let mut buf: KeyBuf = Default::default();
            let key = StateKey::from_slice(s.key(&mut buf, &self.long));
            self.long.remove(&s);
            if s.flags & DIRTY != 0
                && let Some(b) = self.backing.as_mut()
            {
                b.dirty -= 1;
            }
            self.keep_outside(&key, s)?;
        }
        Ok(())
    }

    /// Brings the charge up to date with the index's allocation, the long keys and the filters.
    fn charge(&mut self) {
        let now = self.index.bytes()
            + self.long.charge()
            + self.backing.as_ref().map_or(0, |b| b.spilled.bytes());
        if now != self.bytes {
            let old = std::mem::replace(&mut self.bytes, now);
            if let Some(b) = &self.backing {
                b.backend.memory().charge(old, now);
            }
        }
    }

    /// Makes room for one more key: grows the index while the budget allows (leaving what the
    /// job's other tables hold, and room for the spill filters' share), else writes the dirty
    /// keys and evicts an eighth of the keys;
    /// shrinks the index if the job's memory asks this set to give some back.
    fn make_room(&mut self) -> Result<()> {
        let (len, slots) = (self.index.len(), self.index.slots());
        let Some(b) = self.backing.as_ref() else {
            if len + 1 > self.index.max_len() {
                let refused = self.index.resize((slots * 2).max(FIRST_SLOTS));
                self.keep_refused(refused)?;
            }
            return Ok(());
        };
        let memory = b.backend.memory().clone();
        let cap = b.backend.cache_keys();
        if slots == 0 {
            // however full the budget, a set holds a few keys (24 KB)
            let refused = self.index.resize(FIRST_SLOTS);
            return self.keep_refused(refused);
        }
        if len + 1 > cap {
            self.flush()?;
            self.evict((len + 1).saturating_sub(cap * 3 / 4));
            return Ok(());
        }
        let slot_bytes = std::mem::size_of::<Slot>();
        if len + 1 > self.index.max_len() {
            let budget = memory.decoded_budget();
            let filters = b.spilled.bytes();
            // what the job's other tables hold is not this set's to take
            let tables = memory.decoded().saturating_sub(self.bytes);
            // room for the filters to grow into once the set evicts, unless they gave up on the
            // set's rows (or cannot filter them: a restored set's that is not reading them); a
            // set that has not evicted needs none beyond what its filters hold (a restored
            // set's, of the keys it read), and one that does shrinks its index when the filters
            // grow into it
            let filters = match !b.spilled.evicts() || b.spilled.unfiltered(0) {
                true => filters,
                false => filters.max(budget / FILTER_SHARE),
            };
            let others = tables + self.long.charge() + filters;
            let fit = budget.saturating_sub(others) / slot_bytes;
            let grown = (slots * 2).max(FIRST_SLOTS).min(fit);
            let projected = self.bytes - self.index.bytes() + grown * slot_bytes;
            if grown > slots + slots / 8 && !memory.must_evict(projected) {
                let refused = self.index.resize(grown);
                return self.keep_refused(refused);
            }
            self.flush()?;
            self.evict(len + 1 - self.index.max_len() * 7 / 8);
            return Ok(());
        }
        self.give_back()
    }

    /// Shrinks the index while the job's memory asks this set to give some back: its other
    /// tables grew, or this set's long keys or filters did since the index last grew.
    fn give_back(&mut self) -> Result<()> {
        while self.index.slots() > FIRST_SLOTS
            && self
                .backing
                .as_ref()
                .is_some_and(|b| b.backend.memory().must_evict(self.bytes))
        {
            self.flush()?;
            let smaller = self.index.slots() * 3 / 4;
            self.evict(self.index.len().saturating_sub(smaller / 8 * 7 * 7 / 8));
            let refused = self.index.resize(smaller);
            self.keep_refused(refused)?;
            self.charge();
        }
        Ok(())
    }

    /// Evicts `n` keys by CLOCK: expired keys and keys not used since the last eviction first
    /// (see [`Index::evict`]); never a dirty one.
    fn evict(&mut self, n: usize) {
        let (ttl, clock, scale, long) = (self.ttl, self.clock, self.scale, &mut self.long);
        let Some(b) = self.backing.as_mut() else {
            return;
        };
        let spilled = &mut b.spilled;
        self.index.evict(
            n,
            |s| {
                if s.flags & DIRTY != 0 {
                    Class::Pinned
                } else if ttl
                    .is_some_and(|ttl| clock.0 >= scale.time(s.touched).saturating_add(ttl))
                {
                    Class::Expired
                } else if s.flags & USED != 0 {
                    Class::Used
                } else {
                    Class::Idle
                }
            },
            |s| {
                // clean: RocksDB has its row (or, expired, may drop it)
                let mut buf: KeyBuf = Default::default();
                spilled.evicted(hash_key(s.key(&mut buf, long)), 0, scale.time(s.touched));
                long.remove(s);
            },
        );
        self.charge();
    }

    /// Writes every changed key to the backend (called before a snapshot and when evicting);
    /// an expired key's row is deleted instead, and the key forgotten. A set in memory has
    /// nothing to write. Passes over the index find the dirty keys (a lookup each would be a
    /// cache miss), each collecting at most [`dirty_limit`] of them from where the last
    /// stopped (more may be dirty: every key of a set just attached, keys that expired and
    /// started over), and each pass's rows go in row-key order, which RocksDB's memtable
    /// inserts fastest.
    pub fn flush(&mut self) -> Result<()> {
        self.publish_counts();
        let Some(b) = self.backing.as_ref() else {
            return Ok(());
        };
        if b.dirty == 0 {
            return Ok(());
        }
        let limit = dirty_limit(&b.backend);
        let mut from = 0;
        while from < self.index.slots() {
            from = self.flush_chunk(from, limit)?;
        }
        self.charge();
        Ok(())
    }

    /// Writes up to `limit` dirty keys, looking from slot `from` on; returns the slot to go on
    /// from (the number of slots once the pass reached the end).
    fn flush_chunk(&mut self, from: usize, limit: usize) -> Result<usize> {
        let Some(b) = self.backing.as_mut() else {
            return Ok(usize::MAX);
        };
        let backend = b.backend.clone();
        let (table, mp) = (b.table, backend.max_parallelism());
        let (ttl, clock, scale) = (self.ttl, self.clock, self.scale);
        // per dirty key 32 bytes: its row order, touched time, long key, and whether it is
        // live (written) or expired (deleted)
        let mut dirty: Vec<Dirty> = Vec::with_capacity(b.dirty.min(limit));
        let mut expired_long = Vec::new();
        let mut cleaned = 0;
        let long = &self.long;
        let next = self.index.retain_from(from, |s| {
            if s.flags & DIRTY == 0 {
                return Pass::Keep;
            }
            if cleaned == limit {
                return Pass::Stop;
            }
            cleaned += 1;
            s.flags &= !DIRTY;
            let mut buf: KeyBuf = Default::default();
            let key = s.key(&mut buf, long);
            let touched = scale.time(s.touched);
            let expired = ttl.is_some_and(|ttl| clock.0 >= touched.saturating_add(ttl));
            if !expired || s.flags & PERSISTED != 0 {
                dirty.push(Dirty {
                    order: row_order(key_group(hash_key(key), mp), key),
                    touched,
                    long: if s.is_long() {
                        s.long_index() as u32
                    } else {
                        u32::MAX
                    },
                    live: !expired,
                });
            }
            if expired {
                expired_long.push(*s);
                return Pass::Evict;
            }
            s.flags |= PERSISTED;
            Pass::Keep
        });
        b.dirty = b.dirty.saturating_sub(cleaned);
        dirty.sort_unstable_by(|a, b| {
            a.order.cmp(&b.order).then_with(|| match (a.long, b.long) {
                (u32::MAX, _) | (_, u32::MAX) => std::cmp::Ordering::Equal,
                (a, b) => long.key_at(a as usize).cmp(long.key_at(b as usize)),
            })
        });
        let mut batch = rocksdb::WriteBatch::default();
        if b.written.is_none() {
            // in the first batch, so no snapshot holds a row without the range
            b.written = Some((0, 0));
            batch.put(backend::range_row(table), backend::range_value((0, 0)));
        }
        let mut row = Vec::new();
        for d in &dirty {
            row.clear();
            let kg = KeyGroup((d.order >> 112) as u16 as u32);
            let bytes = d.order.to_be_bytes();
            let key: &[u8] = match d.long {
                u32::MAX => &bytes[3..3 + bytes[2] as usize],
                i => long.key_at(i as usize),
            };
            backend::push_row_key(&mut row, kg, table, key, 0);
            if !d.live {
                batch.delete(&row);
                continue;
            }
            batch.put(&row, row_value(ttl, d.touched, self.version, &self.value));
            self.rows_written += 1;
            if batch.size_in_bytes() >= FLUSH_BATCH_BYTES {
                backend.write(std::mem::take(&mut batch))?;
            }
        }
        backend.write(batch)?;
        for s in expired_long {
            self.long.remove(&s);
        }
        Ok(next)
    }

    /// Records the event-time clock: keys whose TTL passed are invisible from now on; an
    /// attached set leaves their rows to RocksDB's compaction and their slots to eviction.
    pub fn expire(&mut self, clock: Watermark) {
        self.clock = self.clock.max(clock);
        if let Some(b) = &mut self.backing {
            b.backend.advance_clock(clock.0);
            b.spilled.expire(self.clock.0);
        }
        self.charge();
    }

    /// Adds the accesses and RocksDB reads since the last call to the backend's counters.
    fn publish_counts(&mut self) {
        if let Some(b) = &self.backing {
            super::publish(&b.backend, (self.lookups, self.reads), &mut self.published);
        }
    }
}

impl Drop for KeySet {
    fn drop(&mut self) {
        // the last accesses count too
        self.publish_counts();
        if let Some(b) = &self.backing {
            b.backend.memory().remove_table(self.bytes);
        }
    }
}

/// Touched times as a slot holds them, in 32 bits: ticks of `unit` milliseconds after `epoch`,
/// rounded up, so a key lives at most a tick past its TTL and not less (but see the last tick
/// below). A tick is a millisecond unless the TTL is longer than 2^28 ms (3.1 days), then
/// 2^-28 of the TTL (322 ms for 1 000 days); 2^32 ticks span 49 days or 16 TTLs. The epoch is
/// set 2^30 ticks before the first time seen and moves forward when a later time needs it to,
/// as far as the clock allows: a key touched before the new epoch counts as touched at it,
/// which must not make a key expired as of the clock live again (see [`KeySet::tick`]). A time
/// earlier than the epoch counts as the epoch (its key lives longer); one later than the last
/// tick counts as that tick (its key expires early: only a time 2^32 ticks ahead of the oldest
/// key still live).
#[derive(Debug, Clone, Copy)]
struct TimeScale {
    epoch: Option<i64>,
    unit: i64,
}

impl TimeScale {
    fn new(ttl: Option<i64>) -> Self {
        let unit = ttl.map_or(1, |ttl| (ttl >> 28) + i64::from(ttl & ((1 << 28) - 1) != 0));
        TimeScale {
            epoch: None,
            unit: unit.max(1),
        }
    }

    /// The tick of time `t`, or `None` if it is past the last.
    fn tick(&mut self, t: i64) -> Option<u32> {
        let unit = self.unit;
        let epoch = *self
            .epoch
            .get_or_insert(t.saturating_sub(unit.saturating_mul(1 << 30)));
        let ticks = match t.checked_sub(epoch) {
            Some(d) if d <= 0 => return Some(0),
            Some(d) => i128::from(d / unit + i64::from(d % unit != 0)),
            // in 128 bits: the span of two times may not fit 64
            None => {
                let (d, unit) = (i128::from(t) - i128::from(epoch), i128::from(unit));
                if d <= 0 {
                    return Some(0);
                }
                d / unit + i128::from(d % unit != 0)
            }
        };
        u32::try_from(ticks).ok()
    }

    /// The time of a tick (at most the latest time there is).
    fn time(&self, tick: u32) -> i64 {
        let t = i128::from(self.epoch.unwrap_or(0)) + i128::from(tick) * i128::from(self.unit);
        t.min(i128::from(i64::MAX)) as i64
    }

    /// Moves the epoch forward to at most `to`, by whole ticks; returns the ticks moved.
    fn advance(&mut self, to: i64) -> u32 {
        let Some(epoch) = self.epoch else { return 0 };
        let unit = i128::from(self.unit);
        let shift = ((i128::from(to) - i128::from(epoch)) / unit).clamp(0, u32::MAX.into());
        self.epoch = Some((i128::from(epoch) + shift * unit) as i64);
        shift as u32
    }
}

/// A row's value: the key's deadline and touched time, then the set's value and its version.
fn row_value(ttl: Option<i64>, touched: i64, version: u8, value: &[u8]) -> Vec<u8> {
    let deadline = ttl.map_or(backend::NO_DEADLINE, |t| touched.saturating_add(t));
    let mut row = Vec::with_capacity(backend::HEADER + value.len());
    row.extend_from_slice(&deadline.to_be_bytes());
    row.extend_from_slice(&touched.to_be_bytes());
    row.push(version);
    row.extend_from_slice(value);
    row
}

/// Dirty keys a flush writes at a time: what it sorts takes at most a thirty-second of the decoded
/// caches' budget.
fn dirty_limit(backend: &KeyedBackend) -> usize {
    (backend.memory().decoded_budget() / 32 / std::mem::size_of::<Dirty>()).max(4096)
}

/// Bytes of a key [`row_order`] holds: what fits beside the key group and the length.
const ORDER_BYTES: usize = 13;
const _: () = assert!(ORDER_BYTES >= SLOT_INLINE);

/// A key a flush writes or deletes.
struct Dirty {
    /// [`row_order`] of the key.
    order: u128,
    touched: i64,
    /// The key's index among the long keys, or `u32::MAX` for a short key (which `order`
    /// holds whole).
    long: u32,
    live: bool,
}

/// The order of a key's row among a table's rows as an integer: key group, length (a short
/// key's is its row's length byte), and the first [`ORDER_BYTES`] bytes of the key, big-endian;
/// it holds a short key whole. Longer keys that agree in it are ordered by their bytes.
fn row_order(kg: KeyGroup, key: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    b[..2].copy_from_slice(&(kg.0 as u16).to_be_bytes());
    b[2] = key.len().min(255) as u8;
    let n = key.len().min(ORDER_BYTES);
    b[3..3 + n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(b)
}

/// Row keys of namespace 0, one after another in one buffer, to be sorted.
#[derive(Default)]
struct RowKeys {
    buf: Vec<u8>,
    /// Per row: its first 16 bytes as an integer (to sort by), and its end in `buf`.
    rows: Vec<(u128, usize)>,
}

impl RowKeys {
    fn push(&mut self, kg: KeyGroup, table: [u8; 4], key: &[u8]) {
        let start = self.buf.len();
        backend::push_row_key(&mut self.buf, kg, table, key, 0);
        let row = &self.buf[start..];
        let mut prefix = [0u8; 16];
        let n = row.len().min(16);
        prefix[..n].copy_from_slice(&row[..n]);
        self.rows
            .push((u128::from_be_bytes(prefix), self.buf.len()));
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.rows[i - 1].1 };
        &self.buf[start..self.rows[i].1]
    }

    /// The rows' indexes in row-key order.
    fn sorted(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_unstable_by(|&a, &b| {
            self.rows[a]
                .0
                .cmp(&self.rows[b].0)
                .then_with(|| self.get(a).cmp(self.get(b)))
        });
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::table::tests::{
        capped_backend, config, layout_1_snapshot, snapshot_and_restore,
    };
    use crate::state::{KeyedTable, StateConfig, StateMemory};
    use std::collections::HashMap;

    /// A set without a TTL, attached to `backend`.
    fn attached(backend: &Arc<KeyedBackend>) -> KeySet {
        let mut set = KeySet::new("s", None, 0, NONE.to_vec());
        set.attach(backend).unwrap();
        set
    }

    /// An empty instance in `dir` for task slot `slot`, sharing `memory`, with no cap on the
    /// keys in memory.
    fn in_slot(dir: &std::path::Path, memory: &Arc<StateMemory>, slot: u32) -> Arc<KeyedBackend> {
        let cfg = StateConfig {
            memory: Some(memory.clone()),
            slot,
            cache_keys: None,
            ..config(dir, 0)
        };
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let db = dir.join(format!("db{slot}"));
        Arc::new(KeyedBackend::open(&db, &cfg, range, 128).unwrap())
    }

    /// Numbers below a bound from a fixed seed.
    fn random(mut x: u64) -> impl FnMut(u64) -> u64 {
        move |bound| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % bound
        }
    }

    /// The row value of a one-value table of `Option<u8>` holding `None`.
    const NONE: [u8; 1] = [0];

    /// Keys of both kinds: short ones kept in their slot, long ones in the side store.
    fn key(i: u64) -> Vec<u8> {
        if i.is_multiple_of(3) {
            format!("a long key, number {i}").into_bytes()
        } else {
            i.to_be_bytes().to_vec()
        }
    }

    /// With at most 300 keys in memory and 4 000 in play, under a TTL and a moving clock, the
    /// set answers as a map of every key's last accepted time does: through single reads,
    /// batched reads ahead, flushes, evictions and expiry.
    #[test]
    fn a_set_far_larger_than_its_memory_agrees_with_a_map() {
        far_larger_than_memory(Index::default());
    }

    /// The same with an index that refuses any key it cannot place next to its home, so that
    /// many keys are kept in RocksDB alone (as many keys whose hashes fall together would be).
    #[test]
    fn keys_the_index_refuses_are_kept_in_rocksdb() {
        let outside = far_larger_than_memory(Index::with_max_dist(1));
        assert!(outside > 500, "{outside} keys refused");
    }

    /// Runs the model comparison with `index`; returns the keys it refused.
    fn far_larger_than_memory(index: Index) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let backend = capped_backend(dir.path(), 300);
        let ttl = 5_000;
        let mut set = KeySet::new("s", Some(Duration::from_millis(ttl)), 0, NONE.to_vec());
        set.index = index;
        set.attach(&backend).unwrap();
        let mut model: HashMap<Vec<u8>, i64> = HashMap::new();
        let mut next = random(0x9e37_79b9_7f4a_7c15);
        let mut clock = 0i64;
        let (mut accepted, mut batches) = (0, 0);
        for round in 0..400 {
            let rows: Vec<(Vec<u8>, i64)> = (0..64)
                .map(|_| (key(next(4000)), clock + next(1000) as i64))
                .collect();
            let wm = Watermark(clock);
            let mut want = Vec::new();
            for (k, t) in &rows {
                let live = model
                    .get(k)
                    .is_some_and(|&touched| clock < touched + ttl as i64);
                if !live {
                    model.insert(k.clone(), *t);
                }
                want.push(!live);
            }
            let got: Vec<bool> = if round % 2 == 0 {
                rows.iter()
                    .map(|(k, t)| set.insert_if_absent(k, *t, wm).unwrap())
                    .collect()
            } else {
                // as a deduplication does: rows whose key must be read wait for one batched
                // read, with the later rows of their key
                let mut got = vec![None; rows.len()];
                let mut waiting: Vec<usize> = Vec::new();
                let mut waiting_keys: std::collections::HashSet<&[u8]> = Default::default();
                for (i, (k, t)) in rows.iter().enumerate() {
                    if !waiting_keys.contains(&k[..])
                        && let Some(added) = set.try_insert(k, *t, wm).unwrap()
                    {
                        got[i] = Some(added);
                        continue;
                    }
                    waiting_keys.insert(k);
                    waiting.push(i);
                }
                set.prefetch(waiting_keys.iter().copied()).unwrap();
                for i in waiting {
                    got[i] = Some(set.insert_if_absent(&rows[i].0, rows[i].1, wm).unwrap());
                }
                batches += 1;
                got.into_iter().map(Option::unwrap).collect()
            };
            assert_eq!(got, want, "round {round}");
            accepted += want.iter().filter(|a| **a).count();
            clock += 100;
            set.expire(Watermark(clock));
            if round % 50 == 49 {
                set.flush().unwrap();
                backend.compact();
            }
            assert!(set.len() <= 300, "{} keys in memory", set.len());
        }
        assert!(accepted > 5_000 && batches == 200, "{accepted} accepted");
        assert!(set.loads() > 1_000, "{} keys read back", set.loads());
        assert!(set.reads() > set.loads(), "some reads found nothing");
        assert!(
            set.rows_written() > 4_000,
            "{} rows written",
            set.rows_written()
        );
        set.outside
    }

    /// Keys added before a set is attached all become changed at once; a flush writes them
    /// all, in passes of at most what it sorts at a time. A set writes changed keys only when
    /// asked (a snapshot, an eviction), and a snapshot's flush keeps at most a sixteenth of the
    /// slot's memory of rows aside for the snapshot's thread: the rest go in on the subtask's
    /// thread, and the snapshot holds every key either way.
    #[test]
    fn a_flush_writes_every_changed_key_in_passes() {
        let dir = tempfile::tempdir().unwrap();
        let memory = StateMemory::new(8 << 20);
        let backend = in_slot(dir.path(), &memory, 0);
        let cfg = StateConfig {
            memory: Some(memory.clone()),
            ..config(dir.path(), 0)
        };
        let limit = dirty_limit(&backend) as u64;
        let n = 3 * limit + 1_000;
        let mut set = KeySet::new("s", None, 0, NONE.to_vec());
        for i in 0..n {
            assert!(set.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap());
        }
        set.attach(&backend).unwrap();
        assert_eq!(set.rows_written(), 0, "nothing asked for a write yet");
        // a snapshot's flush: its rows are more than may be kept aside
        backend.defer_writes();
        set.flush().unwrap();
        assert_eq!(set.rows_written(), n);
        let kept = backend.deferred_bytes();
        assert!(kept <= backend.deferred_limit(), "{kept} bytes kept aside");
        assert_eq!(backend.deferred_limit(), (8 << 20) / 16);
        let snap = dir.path().join("first");
        backend.begin_snapshot().unwrap().take(&snap).unwrap();
        assert_eq!(backend.deferred_bytes(), 0);
        set.flush().unwrap();
        assert_eq!(set.rows_written(), n, "nothing left to write");
        let more = n + limit + 10;
        for i in n..more {
            assert!(set.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap());
        }
        assert_eq!(set.rows_written(), n, "new keys wait for a flush");
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let at_snapshot = Arc::new(
            KeyedBackend::restore(
                &dir.path().join("db1"),
                &cfg,
                range,
                128,
                vec![(snap, range)],
            )
            .unwrap(),
        );
        let mut back = attached(&at_snapshot);
        for i in 0..n {
            assert!(
                !back.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap(),
                "key {i} in the snapshot"
            );
        }
        assert!(back.insert_if_absent(&key(n), 0, Watermark::MIN).unwrap());
        set.flush().unwrap();
        assert_eq!(set.rows_written(), more);
        let restored = snapshot_and_restore(&backend, dir.path(), &cfg);
        let mut back = attached(&restored);
        for i in 0..more {
            assert!(
                !back.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap(),
                "key {i}"
            );
        }
        assert!(
            back.insert_if_absent(&key(more), 0, Watermark::MIN)
                .unwrap()
        );
    }

    /// A set's rows are those of a one-value keyed table of the same name holding the set's
    /// value: a savepoint of either restores into the other, deadlines included.
    #[test]
    fn a_set_and_a_one_value_table_read_each_others_rows() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let ttl = Some(Duration::from_millis(100));
        let backend = capped_backend(dir.path(), 1000);
        let mut table: KeyedTable<Option<u8>> = KeyedTable::one_value("dedup", ttl);
        table.attach(&backend).unwrap();
        for (k, t) in [
            (&b"short"[..], 1000),
            (b"a key longer than eleven bytes", 1050),
        ] {
            table
                .update(k, 0, t, Watermark::MIN, || None, |_| ())
                .unwrap();
        }
        table.flush().unwrap();
        let restored = snapshot_and_restore(&backend, dir.path(), &cfg);
        let mut set = KeySet::new("dedup", ttl, 0, NONE.to_vec());
        set.attach(&restored).unwrap();
        let wm = Watermark(1099);
        assert!(!set.insert_if_absent(b"short", 1099, wm).unwrap(), "held");
        assert!(
            !set.insert_if_absent(b"a key longer than eleven bytes", 1099, wm)
                .unwrap()
        );
        assert!(set.insert_if_absent(b"new", 1099, wm).unwrap());
        // past the first key's deadline (1000 + 100) it is gone, and starts over
        assert!(
            set.insert_if_absent(b"short", 1120, Watermark(1100))
                .unwrap()
        );
        assert_eq!(set.reads(), 3, "one read per key restored or new");
        set.flush().unwrap();

        let dir2 = tempfile::tempdir().unwrap();
        let cfg2 = config(dir2.path(), 1000);
        let back = snapshot_and_restore(&restored, dir2.path(), &cfg2);
        let mut table: KeyedTable<Option<u8>> = KeyedTable::one_value("dedup", ttl);
        table.attach(&back).unwrap();
        let wm = Watermark(1150);
        assert_eq!(
            table.get(b"short", 0, wm).unwrap(),
            Some(&None),
            "touched again at 1120"
        );
        assert_eq!(table.get(b"new", 0, wm).unwrap(), Some(&None));
        assert_eq!(
            table.get(b"a key longer than eleven bytes", 0, wm).unwrap(),
            None,
            "1050 + 100 passed"
        );
    }

    /// Rows of layout 1 (a key's namespaces in one row), moved by a keyed table of the same
    /// name as it attaches, are the set's keys afterwards.
    #[test]
    fn a_set_reads_keys_of_layout_1_once_a_keyed_table_moved_them() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let rows = (0..20u64).map(|i| (key(i), 1000, vec![(0i64, None::<u8>)]));
        let snap = layout_1_snapshot(dir.path(), "dedup", rows);
        let restored = Arc::new(
            KeyedBackend::restore(
                &dir.path().join("new"),
                &cfg,
                range,
                128,
                vec![(snap, range)],
            )
            .unwrap(),
        );
        KeyedTable::<Option<u8>>::one_value("dedup", None)
            .attach(&restored)
            .unwrap();
        let mut set = KeySet::new("dedup", None, 0, NONE.to_vec());
        set.attach(&restored).unwrap();
        for i in 0..20u64 {
            assert!(
                !set.insert_if_absent(&key(i), 2000, Watermark::MIN).unwrap(),
                "key {i}"
            );
        }
        assert!(
            set.insert_if_absent(&key(20), 2000, Watermark::MIN)
                .unwrap()
        );
    }

    /// When the job's other tables hold its whole budget, a set still keeps a few keys in
    /// memory and the rest in RocksDB, and answers right.
    #[test]
    fn a_set_works_when_other_tables_hold_the_whole_budget() {
        let dir = tempfile::tempdir().unwrap();
        let memory = StateMemory::new(256 << 20);
        let backend = in_slot(dir.path(), &memory, 0);
        memory.add_table();
        memory.charge(0, memory.decoded_budget());
        let mut set = attached(&backend);
        for round in 0..2 {
            for i in 0..5_000u64 {
                let added = set.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap();
                assert_eq!(added, round == 0, "key {i} in round {round}");
            }
        }
        assert!(set.len() <= 1024, "{} keys in memory", set.len());
        assert!(set.loads() > 1_000, "{} keys read back", set.loads());
    }

    /// Two sets of one job in one process (two slots) share its budget: neither grows into
    /// what the other holds, so together they stay inside it.
    #[test]
    fn two_sets_of_a_job_stay_inside_its_budget_together() {
        let dir = tempfile::tempdir().unwrap();
        let memory = StateMemory::new(16 << 20);
        let mut sets: Vec<KeySet> = (0..2u32)
            .map(|slot| attached(&in_slot(dir.path(), &memory, slot)))
            .collect();
        let budget = memory.decoded_budget();
        assert_eq!(
            budget,
            24 << 20,
            "two slots of 12 MB each for decoded state"
        );
        for i in 0..600_000u64 {
            // the first set gets three keys for each of the second's
            let s = usize::from(i % 4 == 3);
            let k = [&[s as u8][..], &i.to_be_bytes()[..]].concat();
            assert!(sets[s].insert_if_absent(&k, 0, Watermark::MIN).unwrap());
            assert!(
                memory.decoded() <= budget,
                "{} + {} bytes at key {i}",
                sets[0].bytes(),
                sets[1].bytes()
            );
        }
        assert!(sets.iter().all(|s| s.len() > 50_000), "each keeps a share");
    }

    /// A set whose budget shrinks (the job's other slot closed its state) gives memory back:
    /// its index moves into a smaller one until it fits.
    #[test]
    fn a_set_gives_memory_back_when_its_budget_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let memory = StateMemory::new(16 << 20);
        let (a, b) = (
            in_slot(dir.path(), &memory, 0),
            in_slot(dir.path(), &memory, 1),
        );
        assert_eq!(memory.decoded_budget(), 24 << 20);
        let mut set = attached(&a);
        let mut i = 0u64;
        while set.bytes() <= 12 << 20 {
            assert!(set.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap());
            i += 1;
        }
        drop(b);
        assert_eq!(memory.decoded_budget(), 12 << 20, "one slot left");
        for _ in 0..10 {
            assert!(set.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap());
            i += 1;
        }
        assert!(set.bytes() <= 12 << 20, "{} bytes", set.bytes());
        // every key is still there, in memory or in RocksDB
        for k in (0..i).step_by(97) {
            assert!(
                !set.insert_if_absent(&key(k), 0, Watermark::MIN).unwrap(),
                "key {k}"
            );
        }
    }

    /// Under a byte budget the set keeps its charge inside it, and holds several times the
    /// keys a keyed table would (an entry of one of those takes 96 bytes for a dedup key).
    #[test]
    fn a_set_stays_inside_its_budget_and_holds_many_keys_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let backend = in_slot(dir.path(), &StateMemory::new(32 << 20), 0);
        let budget = backend.memory().decoded_budget();
        assert_eq!(budget, 24 << 20);
        let mut set = attached(&backend);
        let (mut least, mut most, mut peak) = (usize::MAX, 0, 0);
        for i in 0..2_000_000u64 {
            let k = [&[1u8][..], &i.to_be_bytes()[..]].concat();
            assert!(set.insert_if_absent(&k, 0, Watermark::MIN).unwrap());
            assert!(set.bytes() <= budget, "{} bytes at key {i}", set.bytes());
            peak = peak.max(set.len());
            if i > 1_500_000 {
                least = least.min(set.len());
                most = most.max(set.len());
            }
        }
        // until it first evicts, the index takes the whole 24 MB: 1 572 864 slots of 16 bytes,
        // 1 376 256 keys at seven eighths; the filters of the keys it then evicts take their
        // share, and the index shrinks to three quarters (1 179 648 slots), of which seven
        // eighths fill before an eighth of those is evicted
        assert_eq!(peak, 1_376_256);
        assert!(
            least >= 900_000 && most >= 1_030_000,
            "{least}..{most} keys in memory"
        );
        // every key is new: a read is a false positive of the spill filters
        assert_eq!(set.loads(), 0);
        assert!(set.reads() < 15_000, "{} reads", set.reads());
    }

    /// Until it first evicts, a set keeps no room for the spill filters: keys that need more
    /// than what the filters' share would leave, but fit the whole decoded budget, all stay in
    /// memory, and a second visit of every key reads nothing from RocksDB.
    #[test]
    fn keys_that_fit_the_whole_budget_all_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let backend = in_slot(dir.path(), &StateMemory::new(32 << 20), 0);
        let budget = backend.memory().decoded_budget();
        let slots = budget / std::mem::size_of::<Slot>();
        // more keys than seven eighths of the slots the filters' share would leave
        let n = (slots - slots / FILTER_SHARE) as u64 / 8 * 7 + 100_000;
        assert!(n < slots as u64 / 8 * 7, "{n} keys must fit {slots} slots");
        let mut set = attached(&backend);
        for round in 0..2 {
            for i in 0..n {
                let added = set
                    .insert_if_absent(&i.to_be_bytes(), 0, Watermark::MIN)
                    .unwrap();
                assert_eq!(added, round == 0, "key {i} in round {round}");
                assert!(set.bytes() <= budget, "{} bytes at key {i}", set.bytes());
            }
        }
        assert_eq!(set.len() as u64, n, "every key in memory");
        assert_eq!((set.reads(), set.loads()), (0, 0));
    }

    /// Once the spill filters gave up on the set's keys (one more key would take them past
    /// their cap), the index grows into their room: the whole decoded budget.
    #[test]
    fn the_index_takes_the_filters_share_once_they_gave_up() {
        let dir = tempfile::tempdir().unwrap();
        // 6 MB decoded: the filters' cap is 3 MB, which holds 2 376 256 keys (stages of 16k,
        // 64k, 256k and 1M, 2 bytes each; a fifth stage would have to hold 1M keys more, so the
        // largest takes twice its capacity instead), and the share kept for them leaves the
        // index 294 912 slots until they give up
        let backend = in_slot(dir.path(), &StateMemory::new(8 << 20), 0);
        let budget = backend.memory().decoded_budget();
        assert_eq!(budget, 6 << 20);
        let mut set = attached(&backend);
        let share = budget / FILTER_SHARE / std::mem::size_of::<Slot>();
        let mut most = 0;
        let key = |i: u64| i.to_be_bytes();
        for i in 0..3_000_000u64 {
            assert!(set.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap());
            assert!(set.bytes() <= budget, "{} bytes at key {i}", set.bytes());
            most = most.max(set.index.slots());
        }
        assert!(set.backing.as_ref().unwrap().spilled.unfiltered(0));
        assert!(most >= budget / 16 / 8 * 7, "{most} slots");
        assert!(most > (budget / 16 - share) / 8 * 9, "{most} slots");
        for k in (0..3_000_000).step_by(997) {
            assert!(!set.insert_if_absent(&key(k), 0, Watermark::MIN).unwrap());
        }
    }

    /// A set with a TTL over an endless stream of new keys filters only the keys that can
    /// still be live: the spill filters count evicted keys by deadline and forget those whose
    /// deadlines all passed. 3M keys, one a millisecond, under a TTL of 500 000 ms: without
    /// that the filters took every evicted key and gave up past their cap (2.4M keys, see
    /// above), after which every new key read RocksDB. Live keys evicted are still found, and
    /// expired ones start over.
    #[test]
    fn a_set_with_a_ttl_forgets_the_filters_of_expired_keys() {
        let dir = tempfile::tempdir().unwrap();
        let backend = in_slot(dir.path(), &StateMemory::new(8 << 20), 0);
        let ttl = 500_000i64;
        let mut set = KeySet::new(
            "s",
            Some(Duration::from_millis(ttl as u64)),
            0,
            NONE.to_vec(),
        );
        set.attach(&backend).unwrap();
        let n = 3_000_000i64;
        let key = |i: i64| i.to_be_bytes();
        let mut most = 0;
        for i in 0..n {
            assert!(set.insert_if_absent(&key(i), i, Watermark(i - 1)).unwrap());
            if i % 1_000 == 0 {
                set.expire(Watermark(i));
                most = most.max(set.backing.as_ref().unwrap().spilled.bytes());
            }
        }
        let spilled = &set.backing.as_ref().unwrap().spilled;
        assert!(!spilled.unfiltered(0), "the filters gave up");
        // the keys of a TTL and an eighth, two bytes each, in stages that grow fourfold
        assert!(most < 2 << 20, "{most} bytes of filter");
        let (reads, clock) = (set.reads(), Watermark(n));
        set.expire(clock);
        for i in n..n + 10_000 {
            assert!(set.insert_if_absent(&key(i), i, clock).unwrap());
        }
        let new_reads = set.reads() - reads;
        // a key new to the set is looked up in the filter of each bucket of deadlines (nine
        // here; 18 reads in all when written)
        assert!(new_reads < 100, "{new_reads} reads for 10 000 new keys");
        // live, evicted or not: duplicates; expired: new again
        for i in (n - ttl + 1..n).step_by(1_009) {
            assert!(!set.insert_if_absent(&key(i), n, clock).unwrap(), "key {i}");
        }
        for i in (0..n - ttl).step_by(100_003) {
            assert!(set.insert_if_absent(&key(i), n, clock).unwrap(), "key {i}");
        }
        assert!(set.loads() > 100, "{} live keys read back", set.loads());
    }

    /// The keys 0..`n` of a set in an instance of 8 MB (6 MB decoded), written, snapshotted
    /// and restored into another instance of the same budget.
    fn restored_keys(dir: &std::path::Path, n: u64) -> Arc<KeyedBackend> {
        let backend = in_slot(dir, &StateMemory::new(8 << 20), 0);
        let mut set = attached(&backend);
        for i in 0..n {
            assert!(
                set.insert_if_absent(&i.to_be_bytes(), 0, Watermark::MIN)
                    .unwrap()
            );
        }
        set.flush().unwrap();
        let cfg = StateConfig {
            memory: Some(StateMemory::new(8 << 20)),
            cache_keys: None,
            ..config(dir, 0)
        };
        snapshot_and_restore(&backend, dir, &cfg)
    }

    /// Inserts the 1 000 keys from `next` on, none of which the set holds, as a batch that is
    /// prefetched first, as the operator does.
    fn insert_new_keys(set: &mut KeySet, next: &mut u64) {
        let keys: Vec<[u8; 8]> = (*next..*next + 1_000).map(u64::to_be_bytes).collect();
        set.prefetch(keys.iter().map(|k| &k[..])).unwrap();
        for k in &keys {
            assert!(set.insert_if_absent(k, 0, Watermark::MIN).unwrap());
        }
        *next += 1_000;
    }

    /// A restored set reads its snapshot's keys into the spill filters, 16 rows per key a
    /// prefetch asks for, so that once it has read them all a key new to it reads nothing from
    /// RocksDB (before, every miss did, for as long as the job ran), and every key, restored
    /// or added meanwhile (and evicted: the set holds half of them), is found.
    #[test]
    fn a_restored_set_reads_its_snapshot_and_new_keys_stop_reading_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        // 6 MB decoded: about 300k keys in memory
        let n = 600_000u64;
        let restored = restored_keys(dir.path(), n);
        let key = |i: u64| i.to_be_bytes();
        // the rows of one key group of 128 (about 4 700), scaled; all of them, counted
        let table = backend::value_table_id("s");
        let estimate = restored.estimate_table_rows(table, 4096).unwrap();
        assert!(estimate.abs_diff(n) < n / 10, "{estimate} rows estimated");
        assert_eq!(restored.estimate_table_rows(table, 1 << 20).unwrap(), n);
        let mut back = attached(&restored);
        let mut next = n;
        let mut batch = |back: &mut KeySet| insert_new_keys(back, &mut next);
        let mut batches = 0;
        while back.backing.as_ref().unwrap().scan.is_some() {
            batch(&mut back);
            batches += 1;
            assert!(
                batches <= 60,
                "still reading the snapshot after {batches} batches"
            );
        }
        // 16 000 rows a prefetch of 1 000 keys
        assert!(batches >= 30, "{batches} batches for 600k rows");
        let spilled = &back.backing.as_ref().unwrap().spilled;
        assert!(!spilled.unfiltered(0) && !spilled.is_empty());
        // one filter sized for the rows estimated (two bytes a key, an eighth more), not
        // growing stages of which the last would hold a million keys (2.7 MB in all)
        assert!(
            spilled.bytes() < 1_600_000,
            "{} bytes of filter for 600k keys",
            spilled.bytes()
        );
        let reads = back.reads();
        for _ in 0..100 {
            batch(&mut back);
        }
        let new_reads = back.reads() - reads;
        assert!(new_reads < 1_000, "{new_reads} reads for 100 000 new keys");
        for i in (0..next).step_by(7) {
            assert!(
                !back.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap(),
                "key {i} lost"
            );
        }
    }

    /// A restored set with a TTL reads its snapshot's keys into filters by deadline, each made
    /// for an even share of the rows (not the first for all of them and the others grown from
    /// 16k keys): new keys then skip RocksDB, live restored keys are found, and once the clock
    /// passes the restored keys' deadlines their filters are forgotten.
    #[test]
    fn a_restored_set_with_a_ttl_learns_its_keys_by_deadline_and_forgets_them() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = 80_000i64;
        let n = 200_000i64;
        let backend = in_slot(dir.path(), &StateMemory::new(8 << 20), 0);
        let new_set = || {
            KeySet::new(
                "s",
                Some(Duration::from_millis(ttl as u64)),
                0,
                NONE.to_vec(),
            )
        };
        let mut set = new_set();
        set.attach(&backend).unwrap();
        // touched over a TTL: deadlines in nine buckets
        let touched = |i: i64| i * ttl / n;
        for i in 0..n {
            assert!(
                set.insert_if_absent(&i.to_be_bytes(), touched(i), Watermark::MIN)
                    .unwrap()
            );
        }
        set.flush().unwrap();
        let cfg = StateConfig {
            memory: Some(StateMemory::new(8 << 20)),
            cache_keys: None,
            ..config(dir.path(), 0)
        };
        let restored = snapshot_and_restore(&backend, dir.path(), &cfg);
        let mut back = new_set();
        back.attach(&restored).unwrap();
        let clock = Watermark(ttl);
        back.expire(clock);
        let mut next = n;
        let mut batch = |back: &mut KeySet| {
            let keys: Vec<[u8; 8]> = (next..next + 1_000).map(i64::to_be_bytes).collect();
            back.prefetch(keys.iter().map(|k| &k[..])).unwrap();
            for k in &keys {
                assert!(back.insert_if_absent(k, ttl, clock).unwrap());
            }
            next += 1_000;
        };
        let mut batches = 0;
        while back.backing.as_ref().unwrap().scan.is_some() {
            batch(&mut back);
            batches += 1;
            assert!(batches <= 20, "still reading the snapshot");
        }
        let spilled = &back.backing.as_ref().unwrap().spilled;
        assert!(!spilled.unfiltered(0));
        // 225 000 keys' worth in all, two bytes each; with the first bucket's filter made for
        // all of them (and the others grown from 16k keys) it took 0.9 MB
        assert!(spilled.bytes() < 800_000, "{} bytes", spilled.bytes());
        let reads = back.reads();
        for _ in 0..10 {
            batch(&mut back);
        }
        let new_reads = back.reads() - reads;
        // about 0.1% false positives in each of ten buckets' filters
        assert!(new_reads < 300, "{new_reads} reads for 10 000 new keys");
        // touched at 1 ms or later: live at the clock
        for i in (3..n).step_by(997) {
            let k = i.to_be_bytes();
            assert!(!back.insert_if_absent(&k, ttl, clock).unwrap(), "key {i}");
        }
        // past every restored deadline: their filters are gone, the keys new again
        let clock = Watermark(2 * ttl);
        back.expire(clock);
        assert_eq!(back.backing.as_ref().unwrap().spilled.bytes(), 0);
        assert!(
            back.insert_if_absent(&7i64.to_be_bytes(), 2 * ttl, clock)
                .unwrap()
        );
    }

    /// A restored set that has not evicted keeps no room aside for filters it may never grow
    /// beyond what its filter of the restored keys holds: new keys fill the rest of its share,
    /// where with a quarter kept aside it would evict. Once it evicts it keeps the quarter.
    #[test]
    fn a_restored_set_keeps_room_for_its_filters_only_once_it_evicts() {
        let dir = tempfile::tempdir().unwrap();
        // 6 MB decoded: a quarter kept aside would leave room for 246k keys, the restored
        // keys' filter (225 kB) for 315k
        let n = 100_000u64;
        let mut back = attached(&restored_keys(dir.path(), n));
        let mut next = n;
        let mut batch = |back: &mut KeySet| insert_new_keys(back, &mut next);
        for _ in 0..290 {
            batch(&mut back);
        }
        let b = back.backing.as_ref().unwrap();
        assert!(b.scan.is_none(), "the snapshot was read");
        assert!(
            !b.spilled.evicts(),
            "evicted with {} keys in memory",
            back.len()
        );
        assert_eq!(back.len(), 290_000);
        for _ in 0..60 {
            batch(&mut back);
        }
        assert!(back.backing.as_ref().unwrap().spilled.evicts());
        assert!(back.len() < 300_000, "{} keys in memory", back.len());
    }

    /// The spill filters grow past the share the set keeps aside for them, up to their cap,
    /// and the index gives them room: the keys it evicted go on being filtered, so keys new to
    /// the set read nothing from RocksDB, where at a cap of that share they would all have.
    #[test]
    fn the_filters_grow_into_the_index_rather_than_give_up() {
        let dir = tempfile::tempdir().unwrap();
        // 6 MB decoded: the share kept aside is 1.5 MB, 336k keys in three stages, and the
        // fourth (1M keys, 2 MB) passes it but fits the 3 MB cap
        let backend = in_slot(dir.path(), &StateMemory::new(8 << 20), 0);
        let budget = backend.memory().decoded_budget();
        let mut set = attached(&backend);
        let key = |i: u64| i.to_be_bytes();
        let n = 1_200_000u64;
        for i in 0..n {
            assert!(set.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap());
            assert!(set.bytes() <= budget, "{} bytes at key {i}", set.bytes());
        }
        let spilled = &set.backing.as_ref().unwrap().spilled;
        assert!(!spilled.unfiltered(0), "the filters gave up");
        assert!(
            spilled.bytes() > budget / FILTER_SHARE,
            "{} bytes",
            spilled.bytes()
        );
        // the index gave room: it is smaller than the share would have left it
        let left = (budget - budget / FILTER_SHARE) / std::mem::size_of::<Slot>();
        assert!(set.index.slots() < left, "{} slots", set.index.slots());
        assert!(
            n as usize - set.len() > 800_000,
            "{} keys in memory",
            set.len()
        );
        // every key was new: a read is a false positive of the filters
        assert_eq!(set.loads(), 0);
        assert!(
            set.reads() < n / 200,
            "{} reads for {n} new keys",
            set.reads()
        );
        for k in (0..n).step_by(101) {
            assert!(!set.insert_if_absent(&key(k), 0, Watermark::MIN).unwrap());
        }
    }

    /// Long keys grow their store (and its vector doubles) while the index is not full: the
    /// set gives memory back as soon as that takes it past its budget, not at the next grow.
    #[test]
    fn long_keys_never_take_a_set_past_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let backend = in_slot(dir.path(), &StateMemory::new(8 << 20), 0);
        let budget = backend.memory().decoded_budget();
        let mut set = attached(&backend);
        // a third of the keys are long
        for i in 0..300_000u64 {
            assert!(set.insert_if_absent(&key(i), 0, Watermark::MIN).unwrap());
            assert!(set.bytes() <= budget, "{} bytes at key {i}", set.bytes());
        }
        for k in (0..300_000).step_by(101) {
            assert!(!set.insert_if_absent(&key(k), 0, Watermark::MIN).unwrap());
        }
    }

    /// Touched times fit 32 bits by counting from an epoch: with a TTL of milliseconds they
    /// are exact, a time past the last tick moves the epoch as far as the clock allows, and a
    /// time too far ahead of the clock counts as the last tick without shortening the life
    /// of keys live as of the clock.
    #[test]
    fn touched_times_keep_their_ttl_across_the_ends_of_32_bits() {
        let mut set = KeySet::new("s", Some(Duration::from_millis(10)), 0, NONE.to_vec());
        let at = |set: &mut KeySet, k: &[u8], t: i64| {
            set.expire(Watermark(t));
            set.insert_if_absent(k, t, Watermark(t)).unwrap()
        };
        assert!(at(&mut set, b"a", 1_000));
        assert!(!at(&mut set, b"a", 1_009), "live for 10 ms");
        assert!(at(&mut set, b"a", 1_010), "then gone");
        // 60 days on: 2^32 ms are 49.7, so the epoch moves
        let later = 1_010 + 60 * 86_400_000;
        assert!(at(&mut set, b"b", later));
        assert!(at(&mut set, b"a", later), "a expired long ago");
        assert!(!at(&mut set, b"b", later + 9));
        assert!(at(&mut set, b"b", later + 10));
        let c = later + 10;
        // 100 days ahead of the clock: the epoch may not pass keys live at `c`
        let far = c + 100 * 86_400_000;
        assert!(set.insert_if_absent(b"far", far, Watermark(c)).unwrap());
        assert!(!at(&mut set, b"b", c + 9), "b keeps its deadline");
        assert!(at(&mut set, b"b", c + 10));
        // the far key counts as touched at the last tick, 49.7 days after the epoch
        assert!(!at(&mut set, b"far", c + 49 * 86_400_000));
        assert!(at(&mut set, b"far", far + 10));
    }

    /// A TTL as long as a duration can be neither overflows the ticks nor expires a key
    /// early, from the first time there is to the last.
    #[test]
    fn the_longest_ttl_keeps_keys() {
        let mut set = KeySet::new("s", Some(Duration::MAX), 0, NONE.to_vec());
        // the watermark at the end of time, `i64::MAX`, expires everything
        let times = [i64::MIN, -5, 0, 1_714_557_600_000, i64::MAX - 1];
        let mut scale = TimeScale::new(Some(i64::MAX));
        for t in times {
            let tick = scale.tick(t).unwrap();
            assert!(scale.time(tick) >= t, "{t} rounded down");
        }
        for t in times {
            assert!(
                set.insert_if_absent(&t.to_be_bytes(), t, Watermark(t))
                    .unwrap()
            );
            set.expire(Watermark(t));
        }
        for t in times {
            assert!(
                !set.insert_if_absent(&t.to_be_bytes(), t, Watermark(t))
                    .unwrap()
            );
        }
    }

    /// With a TTL of 1 000 days a tick is 322 ms: a key lives its whole TTL, and at most a
    /// tick longer.
    #[test]
    fn a_long_ttl_rounds_touched_times_up_by_under_a_tick() {
        let ttl = 1_000 * 86_400_000i64;
        let mut set = KeySet::new(
            "s",
            Some(Duration::from_millis(ttl as u64)),
            0,
            NONE.to_vec(),
        );
        let wm = Watermark;
        assert!(set.insert_if_absent(b"first", 5, wm(5)).unwrap());
        for (i, t) in [100i64, 7_777, 123_456_789].into_iter().enumerate() {
            let k = [b'k', i as u8];
            assert!(set.insert_if_absent(&k, t, wm(t)).unwrap());
            assert!(
                !set.insert_if_absent(&k, t + ttl - 1, wm(t + ttl - 1))
                    .unwrap()
            );
            assert!(
                set.insert_if_absent(&k, t + ttl + 322, wm(t + ttl + 322))
                    .unwrap()
            );
        }
    }
}

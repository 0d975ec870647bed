//! Keyed state: the one interface every stateful operator keeps its state in.
//!
//! A [`KeyedTable<V>`] holds values of type `V` per *(key, namespace)*: the key is the encoded key
//! of the record ([`crate::keys::KeyEncoder`]), the namespace an `i64` the operator chooses (the
//! start of a window slice, a record timestamp, or `0` for plain value state). That one shape
//! covers value state (one namespace), list state (`V = Vec<T>`) and map state (many namespaces,
//! ordered, range-scannable).
//!
//! **Storage.** A table starts in memory. Once an operator [attaches](KeyedTable::attach) it to
//! its [`KeyedBackend`] (every operator run by the runtime does, in `open`), RocksDB holds the
//! table and memory holds a bounded write-back cache of decoded keys in front of it: reads that
//! miss the cache load the key's row, writes mark it dirty, dirty rows are written when the cache
//! must evict and at every checkpoint ([`KeyedTable::flush`]). One row holds all namespaces of a
//! key, so a key costs at most one RocksDB read however many namespaces an operator touches.
//!
//! **Cache.** Each cached key is charged an estimate of its bytes (the entry, a long key, and
//! twice its last encoded size, or the table's average before it was first written) against the
//! job's [`StateMemory`]. When the table must give memory back it writes its dirty keys and
//! evicts clean ones with the CLOCK policy: a key read or written since the last sweep gets a
//! second chance, and a key loaded or created but not touched again goes first, so a scan of
//! one-off keys does not flush the working set.
//!
//! **TTL.** A table may have an event-time time-to-live: every [`update`](KeyedTable::update)
//! touches the key with the event time of the record that caused it, and once the watermark
//! reaches `touched + ttl` the whole key is expired. Expired keys are invisible to reads
//! immediately ([`get`](KeyedTable::get) checks). Operators pass the watermark to
//! [`expire`](KeyedTable::expire). In an attached table that is all expiry costs: rows carry
//! their deadline, RocksDB's compaction drops expired ones, and a flush deletes rather than
//! writes a dirty key that expired, so nothing in memory grows with the number of keys and a
//! restore reads nothing up front. A table in memory keeps a heap of deadlines and deletes
//! expired keys when `expire` is called.
use hashbrown::HashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::time::Duration;

use crate::keys::{hash_key, key_group};
use crate::{EngineError, KeyGroup, Result, Watermark};

pub mod backend;
pub mod memory;
pub mod timers;

pub use backend::{KeyedBackend, StateConfig};
pub use memory::StateMemory;
pub use timers::Timers;

/// What a table can hold: anything serde can write and read back.
pub trait StateValue: Serialize + DeserializeOwned + Send + 'static {}
impl<T: Serialize + DeserializeOwned + Send + 'static> StateValue for T {}

/// An encoded key as state stores it: keys of up to 24 bytes (any one or two numbers, short
/// strings) are kept inline, without a heap allocation or a pointer to follow.
pub type StateKey = SmallVec<[u8; 24]>;

/// The hasher of state tables and timers: fixed, so that iteration order depends only on what was
/// inserted, and runs over the same input visit keys in the same order.
type Fixed = foldhash::fast::FixedState;

/// Values per (key, namespace), with an optional event-time TTL per key.
#[derive(Debug)]
pub struct KeyedTable<V> {
    name: String,
    ttl: Option<i64>,
    keys: HashMap<StateKey, Slot<V>, Fixed>,
    /// TTL deadlines of a table in memory (attached tables keep them in their rows).
    deadlines: BinaryHeap<Reverse<(i64, StateKey)>>,
    /// The latest watermark passed to [`KeyedTable::expire`].
    clock: Watermark,
    entries: usize,
    /// Estimated bytes of the keys in memory.
    bytes: usize,
    /// Running average of the encoded size of a key's values, charged for keys not yet written.
    avg_payload: usize,
    /// Updates since the last size sample.
    since_sample: u32,
    /// Keys read back from RocksDB into the cache.
    loads: u64,
    /// Scratch space of size samples.
    scratch: Vec<u8>,
    backing: Option<Backing>,
}

/// Dirty keys after which a table writes them even if nothing asks it to (a job without
/// checkpoints still spills to RocksDB).
const DIRTY_LIMIT: usize = 1 << 18;

/// Every this many updates, the updated key's values are encoded to correct its charge and the
/// table's average (the charges of keys changed in place would otherwise stay as estimated).
const SAMPLE_EVERY: u32 = 32;

/// The estimated bytes of a cached key whose values encode to `payload` bytes.
fn charge_of<V>(key: &[u8], payload: usize) -> u32 {
    // the map's entry with its control byte and spare capacity; keys over 24 bytes are on the
    // heap; decoded values take about twice their encoding
    let entry = std::mem::size_of::<(StateKey, Slot<V>)>() * 8 / 7 + 1;
    let heap_key = if key.len() > 24 { key.len() } else { 0 };
    (entry + heap_key + 2 * payload).min(u32::MAX as usize) as u32
}

/// Where an attached table's rows live, and what the cache owes them.
#[derive(Debug)]
struct Backing {
    backend: Arc<KeyedBackend>,
    table: [u8; 4],
    /// Keys written or removed since the last flush (a key may appear more than once).
    dirty: Vec<StateKey>,
    /// True while the cache holds every key of the table (nothing evicted, nothing restored):
    /// a miss then needs no RocksDB read.
    complete: bool,
}

#[derive(Debug)]
struct Slot<V> {
    touched: i64,
    values: Namespaces<V>,
    dirty: bool,
    /// RocksDB holds a row for the key (it was read from there or written there).
    persisted: bool,
    /// Read or written since the last eviction sweep (CLOCK's reference bit).
    referenced: bool,
    /// Estimated bytes, as counted in the table's total.
    charge: u32,
}
/// The values of one key, sorted by namespace. A key has few namespaces (a window's slices, a
/// join's timestamps within its interval), so a sorted vector beats a tree: one allocation,
/// binary search, contiguous range scans.
#[derive(Debug)]
struct Namespaces<V>(SmallVec<[(i64, V); 1]>);

impl<V> Namespaces<V> {
    fn new() -> Self {
        Namespaces(SmallVec::new())
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    fn find(&self, ns: i64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&ns, |(k, _)| *k)
    }

    fn get(&self, ns: i64) -> Option<&V> {
        self.find(ns).ok().map(|i| &self.0[i].1)
    }

    /// The value at `ns`, inserted with `init` if absent; and whether it was inserted.
    fn get_or_insert(&mut self, ns: i64, init: impl FnOnce() -> V) -> (&mut V, bool) {
        match self.find(ns) {
            Ok(i) => (&mut self.0[i].1, false),
            Err(i) => {
                self.0.insert(i, (ns, init()));
                (&mut self.0[i].1, true)
            }
        }
    }

    fn remove(&mut self, ns: i64) -> Option<V> {
        self.find(ns).ok().map(|i| self.0.remove(i).1)
    }

    fn bounds(&self, (lo, hi): (Bound<i64>, Bound<i64>)) -> std::ops::Range<usize> {
        let start = match lo {
            Bound::Included(x) => self.0.partition_point(|(k, _)| *k < x),
            Bound::Excluded(x) => self.0.partition_point(|(k, _)| *k <= x),
            Bound::Unbounded => 0,
        };
        let end = match hi {
            Bound::Included(x) => self.0.partition_point(|(k, _)| *k <= x),
            Bound::Excluded(x) => self.0.partition_point(|(k, _)| *k < x),
            Bound::Unbounded => self.0.len(),
        };
        start..end.max(start)
    }
}

impl<V: StateValue> KeyedTable<V> {
    /// A table called `name` (used in errors and metrics) with an optional TTL, in memory until
    /// [attached](Self::attach).
    pub fn new(name: impl Into<String>, ttl: Option<Duration>) -> Self {
        KeyedTable {
            name: name.into(),
            ttl: ttl.map(|d| d.as_millis().min(i64::MAX as u128) as i64),
            keys: HashMap::with_hasher(Fixed::default()),
            deadlines: BinaryHeap::new(),
            clock: Watermark::MIN,
            entries: 0,
            bytes: 0,
            avg_payload: 16,
            since_sample: 0,
            loads: 0,
            scratch: Vec::new(),
            backing: None,
        }
    }

    /// Moves the table into `backend`: from now on RocksDB holds it and memory caches it. If the
    /// backend was restored from a snapshot, the table's rows are there, deadlines included.
    pub fn attach(&mut self, backend: &Arc<KeyedBackend>) -> Result<()> {
        let table = backend::table_id(&self.name);
        let mut backing = Backing {
            backend: backend.clone(),
            table,
            dirty: Vec::new(),
            complete: !backend.restored(),
        };
        // whatever was in memory before attaching goes to the backend at the next flush
        for (k, slot) in self.keys.iter_mut() {
            slot.dirty = true;
            backing.dirty.push(k.clone());
        }
        self.deadlines.clear();
        backend.memory().add_table();
        backend.memory().charge(0, self.bytes);
        self.backing = Some(backing);
        Ok(())
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of (key, namespace) entries in memory.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// True if memory holds nothing of the table.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Number of distinct keys in memory.
    pub fn key_count(&self) -> usize {
        self.keys.values().filter(|s| !s.values.is_empty()).count()
    }

    fn expired_at(ttl: Option<i64>, slot: &Slot<V>, clock: Watermark) -> bool {
        match ttl {
            Some(ttl) => clock.0 >= slot.touched.saturating_add(ttl),
            None => false,
        }
    }

    /// Brings `key` into the cache if RocksDB may hold a row the cache lacks. Free (no lookup)
    /// while the cache holds the whole table.
    fn load(&mut self, key: &[u8]) -> Result<()> {
        let Some(b) = self.backing.as_ref() else {
            return Ok(());
        };
        if let Some(slot) = self.keys.get_mut(key) {
            slot.referenced = true;
            return Ok(());
        }
        if b.complete {
            return Ok(());
        }
        let kg = key_group(hash_key(key), b.backend.max_parallelism());
        let Some(row) = b.backend.get(&backend::row_key(kg, b.table, key))? else {
            return Ok(());
        };
        let mut slot =
            decode_row::<V>(&row).map_err(|e| EngineError::State(format!("{}: {e}", self.name)))?;
        self.evict_if_full()?;
        self.loads += 1;
        slot.charge = charge_of::<V>(key, row.len() - backend::HEADER);
        self.account(0, slot.charge as usize);
        self.entries += slot.values.len();
        self.keys.insert(key.into(), slot);
        Ok(())
    }

    /// Encodes the values of a cached key to correct its charge and the table's average.
    fn sample(&mut self, key: &[u8]) -> Result<()> {
        let Some(slot) = self.keys.get_mut(key) else {
            return Ok(());
        };
        self.scratch.clear();
        let encoded =
            postcard::to_extend(slot.values.0.as_slice(), std::mem::take(&mut self.scratch))
                .map_err(|e| EngineError::State(format!("{}: {e}", self.name)))?;
        let old = slot.charge as usize;
        slot.charge = charge_of::<V>(key, encoded.len());
        let new = slot.charge as usize;
        self.avg_payload = (self.avg_payload * 7 + encoded.len()) / 8;
        self.scratch = encoded;
        self.account(old, new);
        Ok(())
    }

    /// Moves the table's byte count (and the job's, once attached) from `old` to `new`.
    fn account(&mut self, old: usize, new: usize) {
        self.bytes = (self.bytes + new).saturating_sub(old);
        if let Some(b) = &self.backing {
            b.backend.memory().charge(old, new);
        }
    }

    /// Removes a key from memory with its charge.
    fn forget(&mut self, key: &[u8]) {
        if let Some(slot) = self.keys.remove(key) {
            self.account(slot.charge as usize, 0);
        }
    }

    fn mark_dirty(backing: &mut Option<Backing>, slot: &mut Slot<V>, key: &[u8]) {
        if let Some(b) = backing
            && !slot.dirty
        {
            slot.dirty = true;
            b.dirty.push(key.into());
        }
    }

    /// The value at (key, ns), unless absent or expired as of `clock`.
    pub fn get(&mut self, key: &[u8], ns: i64, clock: Watermark) -> Result<Option<&V>> {
        self.load(key)?;
        Ok(self
            .keys
            .get(key)
            .filter(|slot| !Self::expired_at(self.ttl, slot, clock))
            .and_then(|slot| slot.values.get(ns)))
    }

    /// Whether the key has any live value as of `clock`.
    pub fn contains_key(&mut self, key: &[u8], clock: Watermark) -> Result<bool> {
        self.load(key)?;
        Ok(self
            .keys
            .get(key)
            .is_some_and(|s| !Self::expired_at(self.ttl, s, clock) && !s.values.is_empty()))
    }

    /// Applies `f` to the value at (key, ns), creating it with `init` if absent; touches the key
    /// at event time `now` for TTL. A key that had expired as of `clock` starts over empty.
    pub fn update<R>(
        &mut self,
        key: &[u8],
        ns: i64,
        now: i64,
        clock: Watermark,
        init: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> Result<R> {
        let ttl = self.ttl;
        self.load(key)?;
        // one lookup finds the key or makes room for it
        let charge = charge_of::<V>(key, self.avg_payload);
        let (slot, fresh) = match self.keys.entry_ref(key) {
            hashbrown::hash_map::EntryRef::Occupied(e) => (e.into_mut(), false),
            hashbrown::hash_map::EntryRef::Vacant(e) => (
                e.insert(Slot {
                    touched: now,
                    values: Namespaces::new(),
                    dirty: false,
                    persisted: false,
                    referenced: false,
                    charge,
                }),
                true,
            ),
        };
        if fresh || slot.values.is_empty() {
            slot.touched = now;
            if let Some(ttl) = ttl
                && self.backing.is_none()
            {
                self.deadlines
                    .push(Reverse((now.saturating_add(ttl), key.into())));
            }
        }
        if let Some(ttl) = ttl
            && clock.0 >= slot.touched.saturating_add(ttl)
        {
            self.entries -= slot.values.len();
            slot.values.clear();
        }
        slot.touched = slot.touched.max(now);
        Self::mark_dirty(&mut self.backing, slot, key);
        let (v, inserted) = slot.values.get_or_insert(ns, init);
        if inserted {
            self.entries += 1;
        }
        let r = f(v);
        if fresh {
            self.account(0, charge as usize);
        }
        self.since_sample += 1;
        if self.since_sample >= SAMPLE_EVERY {
            self.since_sample = 0;
            self.sample(key)?;
        }
        if fresh {
            // after the write, so eviction (which flushes first) cannot lose it
            self.evict_if_full()?;
        }
        self.bound_dirty()?;
        Ok(r)
    }

    /// Drops a key from memory once it holds nothing. If RocksDB holds a row for it, the empty
    /// slot stays as a tombstone until the next flush deletes the row, so a read in between does
    /// not load the old row back.
    fn drop_if_empty(&mut self, key: &[u8]) {
        let Some(slot) = self.keys.get_mut(key) else {
            return;
        };
        if !slot.values.is_empty() {
            return;
        }
        if slot.persisted {
            Self::mark_dirty(&mut self.backing, slot, key);
        } else {
            self.forget(key);
        }
    }

    /// Removes the value at (key, ns); drops the key when it has no values left.
    pub fn remove(&mut self, key: &[u8], ns: i64) -> Result<Option<V>> {
        self.load(key)?;
        let Some(slot) = self.keys.get_mut(key) else {
            return Ok(None);
        };
        let v = slot.values.remove(ns);
        if v.is_some() {
            self.entries -= 1;
            Self::mark_dirty(&mut self.backing, slot, key);
        }
        self.drop_if_empty(key);
        self.bound_dirty()?;
        Ok(v)
    }

    /// Removes every value of a key.
    pub fn remove_key(&mut self, key: &[u8]) -> Result<()> {
        self.load(key)?;
        if let Some(slot) = self.keys.get_mut(key) {
            self.entries -= slot.values.len();
            slot.values.clear();
            self.drop_if_empty(key);
        }
        self.bound_dirty()
    }

    /// The live values of a key with namespaces in `range`, in namespace order.
    pub fn range<'a>(
        &'a mut self,
        key: &[u8],
        range: impl RangeBounds<i64>,
        clock: Watermark,
    ) -> Result<impl Iterator<Item = (i64, &'a V)> + 'a> {
        self.load(key)?;
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let ttl = self.ttl;
        let slot = self
            .keys
            .get(key)
            .filter(|s| !Self::expired_at(ttl, s, clock));
        Ok(slot.into_iter().flat_map(move |s| {
            s.values.0[s.values.bounds(bounds)]
                .iter()
                .map(|(k, v)| (*k, v))
        }))
    }

    /// Mutable access to the values of a key with namespaces in `range`.
    pub fn range_mut<'a>(
        &'a mut self,
        key: &[u8],
        range: impl RangeBounds<i64>,
    ) -> Result<impl Iterator<Item = (i64, &'a mut V)> + 'a> {
        self.load(key)?;
        if let Some(s) = self.keys.get_mut(key) {
            Self::mark_dirty(&mut self.backing, s, key);
        }
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        Ok(self.keys.get_mut(key).into_iter().flat_map(move |s| {
            let r = s.values.bounds(bounds);
            s.values.0[r].iter_mut().map(|(k, v)| (*k, v))
        }))
    }

    /// Removes and returns the values of a key with namespaces in `range`.
    pub fn drain_range(
        &mut self,
        key: &[u8],
        range: impl RangeBounds<i64>,
    ) -> Result<Vec<(i64, V)>> {
        self.load(key)?;
        let Some(slot) = self.keys.get_mut(key) else {
            return Ok(Vec::new());
        };
        let r = slot
            .values
            .bounds((range.start_bound().cloned(), range.end_bound().cloned()));
        let out: Vec<(i64, V)> = slot.values.0.drain(r).collect();
        if !out.is_empty() {
            self.entries -= out.len();
            Self::mark_dirty(&mut self.backing, slot, key);
        }
        self.drop_if_empty(key);
        self.bound_dirty()?;
        Ok(out)
    }

    /// Advances the table's TTL clock to `clock`. A table in memory deletes the keys whose TTL
    /// passed and returns how many; an attached table leaves that to reads, flushes and
    /// RocksDB's compaction (see the module's doc) and returns 0.
    pub fn expire(&mut self, clock: Watermark) -> Result<usize> {
        self.clock = self.clock.max(clock);
        if let Some(b) = &self.backing {
            b.backend.advance_clock(clock.0);
            return Ok(0);
        }
        let Some(ttl) = self.ttl else {
            return Ok(0);
        };
        let mut expired = 0;
        while let Some(Reverse((deadline, _))) = self.deadlines.peek() {
            if *deadline > clock.0 {
                break;
            }
            let Reverse((_, key)) = self.deadlines.pop().expect("peeked");
            self.load(&key)?;
            let Some(slot) = self.keys.get_mut(&key) else {
                continue;
            };
            if slot.values.is_empty() {
                continue;
            }
            let due = slot.touched.saturating_add(ttl);
            if due <= clock.0 {
                self.entries -= slot.values.len();
                slot.values.clear();
                self.drop_if_empty(&key);
                expired += 1;
            } else {
                self.deadlines.push(Reverse((due, key)));
            }
        }
        self.bound_dirty()?;
        Ok(expired)
    }

    /// Writes every dirty key to the backend (called before a snapshot and when evicting).
    /// A table in memory has nothing to write.
    pub fn flush(&mut self) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            return Ok(());
        };
        let mut batch = rocksdb::WriteBatch::default();
        let mp = b.backend.max_parallelism();
        let (ttl, clock) = (self.ttl, self.clock);
        let mut buf = Vec::new();
        let mut tombstones = Vec::new();
        let (mut old_bytes, mut new_bytes) = (0, 0);
        let (mut payloads, mut written) = (0, 0);
        for key in b.dirty.drain(..) {
            let kg = key_group(hash_key(&key), mp);
            let row = backend::row_key(kg, b.table, &key);
            match self.keys.get_mut(&key) {
                Some(slot) if slot.dirty => {
                    slot.dirty = false;
                    if slot.values.is_empty() || Self::expired_at(ttl, slot, clock) {
                        self.entries -= slot.values.len();
                        batch.delete(&row);
                        tombstones.push(key);
                    } else {
                        slot.persisted = true;
                        buf.clear();
                        encode_row(slot, ttl, &mut buf)
                            .map_err(|e| EngineError::State(format!("{}: {e}", self.name)))?;
                        batch.put(&row, &buf);
                        let payload = buf.len() - backend::HEADER;
                        old_bytes += slot.charge as usize;
                        slot.charge = charge_of::<V>(&key, payload);
                        new_bytes += slot.charge as usize;
                        payloads += payload;
                        written += 1;
                    }
                }
                // clean: written by an earlier entry of the dirty list
                Some(_) => {}
                // created and removed since the last flush: RocksDB never had it
                None => {}
            }
        }
        b.backend.write(batch)?;
        self.account(old_bytes, new_bytes);
        if let Some(avg) = payloads.checked_div(written) {
            self.avg_payload = (self.avg_payload * 3 + avg) / 4;
        }
        for key in tombstones {
            self.forget(&key);
        }
        Ok(())
    }

    /// Keeps the list of dirty keys bounded (a job without checkpoints still spills to RocksDB,
    /// and memory stays bounded).
    fn bound_dirty(&mut self) -> Result<()> {
        match &self.backing {
            Some(b) if b.dirty.len() > DIRTY_LIMIT => self.flush(),
            _ => Ok(()),
        }
    }

    /// When a new key made the cache too large (by the job's memory or the table's key cap):
    /// writes dirty keys, then evicts a quarter of the cache by CLOCK (see the module's doc).
    fn evict_if_full(&mut self) -> Result<()> {
        let Some(b) = self.backing.as_ref() else {
            return Ok(());
        };
        let cap = b.backend.cache_keys();
        let over_keys = self.keys.len() >= cap;
        if !over_keys && !b.backend.memory().must_evict(self.bytes) {
            return Ok(());
        }
        self.flush()?;
        let want_keys = if over_keys {
            self.keys.len() - cap * 3 / 4
        } else {
            0
        };
        let want_bytes = self.bytes / 4;
        let (mut keys, mut bytes, mut entries) = (0, 0, 0);
        for _sweep in 0..2 {
            self.keys.retain(|_, s| {
                if (keys >= want_keys && bytes >= want_bytes) || s.dirty {
                    return true;
                }
                if std::mem::take(&mut s.referenced) {
                    return true;
                }
                keys += 1;
                bytes += s.charge as usize;
                entries += s.values.len();
                false
            });
            if keys >= want_keys && bytes >= want_bytes {
                break;
            }
        }
        self.entries -= entries;
        self.account(bytes, 0);
        if let Some(b) = self.backing.as_mut() {
            b.complete = false;
        }
        Ok(())
    }

    /// Estimated bytes of the keys in memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keys read back from RocksDB into the cache so far (cache misses that found a row).
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// Every key in memory with its values, in no particular order (tests and diagnostics).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[(i64, V)])> {
        self.keys
            .iter()
            .filter(|(_, s)| !s.values.is_empty())
            .map(|(k, s)| (k.as_ref(), s.values.0.as_slice()))
    }

    /// The key group a key of this table belongs to.
    pub fn key_groups_of(key: &[u8], max_parallelism: u32) -> KeyGroup {
        key_group(hash_key(key), max_parallelism)
    }
}

impl<V> Drop for KeyedTable<V> {
    fn drop(&mut self) {
        if let Some(b) = &self.backing {
            b.backend.memory().remove_table(self.bytes);
        }
    }
}

fn decode_touched(row: &[u8]) -> i64 {
    row.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(i64::from_be_bytes)
        .unwrap_or(i64::MIN)
}

fn encode_row<V: StateValue>(
    slot: &Slot<V>,
    ttl: Option<i64>,
    out: &mut Vec<u8>,
) -> std::result::Result<(), postcard::Error> {
    let deadline = ttl.map_or(i64::MAX, |t| slot.touched.saturating_add(t));
    out.extend_from_slice(&deadline.to_be_bytes());
    out.extend_from_slice(&slot.touched.to_be_bytes());
    let bytes = postcard::to_extend(slot.values.0.as_slice(), std::mem::take(out))?;
    *out = bytes;
    Ok(())
}

fn decode_row<V: StateValue>(row: &[u8]) -> std::result::Result<Slot<V>, String> {
    if row.len() < backend::HEADER {
        return Err("state row shorter than its header".into());
    }
    let values: Vec<(i64, V)> = postcard::from_bytes(&row[backend::HEADER..])
        .map_err(|e| format!("decoding a state row: {e}"))?;
    Ok(Slot {
        touched: decode_touched(row),
        values: Namespaces(values.into()),
        dirty: false,
        persisted: true,
        referenced: false,
        charge: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_hides_then_deletes_and_touch_extends() {
        let mut t: KeyedTable<u32> = KeyedTable::new("t", Some(Duration::from_millis(100)));
        t.update(b"a", 0, 1000, Watermark::MIN, || 0, |v| *v += 1)
            .unwrap();
        t.update(b"b", 0, 1000, Watermark::MIN, || 0, |v| *v += 1)
            .unwrap();
        // b is touched again later: its deadline moves
        t.update(b"b", 0, 1050, Watermark(1000), || 0, |v| *v += 1)
            .unwrap();
        assert_eq!(t.get(b"a", 0, Watermark(1099)).unwrap(), Some(&1));
        assert_eq!(
            t.get(b"a", 0, Watermark(1100)).unwrap(),
            None,
            "expired at touched + ttl"
        );
        assert_eq!(t.expire(Watermark(1100)).unwrap(), 1);
        assert_eq!(t.key_count(), 1, "a is gone from memory");
        assert_eq!(t.get(b"b", 0, Watermark(1100)).unwrap(), Some(&2));
        assert_eq!(t.expire(Watermark(1149)).unwrap(), 0);
        assert_eq!(t.expire(Watermark(1150)).unwrap(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn expired_key_starts_over_on_update() {
        let mut t: KeyedTable<u32> = KeyedTable::new("t", Some(Duration::from_millis(10)));
        t.update(b"k", 0, 0, Watermark::MIN, || 0, |v| *v += 5)
            .unwrap();
        let v = t
            .update(
                b"k",
                0,
                20,
                Watermark(15),
                || 0,
                |v| {
                    *v += 1;
                    *v
                },
            )
            .unwrap();
        assert_eq!(v, 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn namespaces_range_and_drain() {
        let mut t: KeyedTable<String> = KeyedTable::new("t", None);
        for ns in [30, 10, 20] {
            t.update(b"k", ns, 0, Watermark::MIN, || "x".into(), |_| ())
                .unwrap();
        }
        let got: Vec<i64> = t
            .range(b"k", 10..30, Watermark::MIN)
            .unwrap()
            .map(|(ns, _)| ns)
            .collect();
        assert_eq!(got, vec![10, 20]);
        assert_eq!(t.drain_range(b"k", ..=20).unwrap().len(), 2);
        assert_eq!(t.len(), 1);
        t.remove(b"k", 30).unwrap();
        assert_eq!(t.key_count(), 0);
    }

    fn config(dir: &std::path::Path, cache_keys: usize) -> StateConfig {
        StateConfig {
            local_dir: dir.to_path_buf(),
            cache_keys: Some(cache_keys),
            write_buffer_bytes: 1 << 20,
            ..StateConfig::default()
        }
    }

    fn key(i: u32) -> Vec<u8> {
        format!("key-{i}").into_bytes()
    }

    #[test]
    fn a_failing_state_read_is_a_retryable_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let db = dir.path().join("db");
        let backend =
            Arc::new(KeyedBackend::open(&db, &config(dir.path(), 10), range, 128).unwrap());
        let mut t: KeyedTable<Vec<i64>> = KeyedTable::new("t", None);
        t.attach(&backend).unwrap();
        for i in 0..200u32 {
            t.update(&key(i), 0, 0, Watermark::MIN, Vec::new, |v| {
                v.push(i as i64)
            })
            .unwrap();
        }
        t.flush().unwrap();
        // the rows reach SST files, which a failing disk then garbles under RocksDB
        backend.checkpoint(&dir.path().join("snap")).unwrap();
        let mut garbled = 0;
        for e in std::fs::read_dir(&db).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "sst") {
                let len = std::fs::metadata(&p).unwrap().len() as usize;
                let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                std::io::Write::write_all(&mut f, &vec![0xa5; len]).unwrap();
                garbled += 1;
            }
        }
        assert!(garbled > 0, "no SST file was written");
        let failed = (0..200u32)
            .filter_map(|i| t.get(&key(i), 0, Watermark::MIN).err())
            .collect::<Vec<_>>();
        assert!(
            !failed.is_empty(),
            "every read succeeded from garbled files"
        );
        for e in &failed {
            assert!(
                matches!(e, EngineError::StateStore { .. }) && e.is_retryable(),
                "{e:?}"
            );
        }
    }

    #[test]
    fn rocksdb_table_evicts_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let backend = Arc::new(
            KeyedBackend::open(&dir.path().join("db"), &config(dir.path(), 10), range, 128)
                .unwrap(),
        );
        let mut t: KeyedTable<Vec<i64>> = KeyedTable::new("t", None);
        t.attach(&backend).unwrap();
        for i in 0..100u32 {
            for ns in 0..3 {
                t.update(&key(i), ns, 0, Watermark::MIN, Vec::new, |v| {
                    v.push(i as i64)
                })
                .unwrap();
            }
        }
        assert!(
            t.keys.len() <= 10,
            "the cache stays bounded: {}",
            t.keys.len()
        );
        for i in 0..100u32 {
            let got: Vec<(i64, Vec<i64>)> = t
                .range(&key(i), .., Watermark::MIN)
                .unwrap()
                .map(|(ns, v)| (ns, v.clone()))
                .collect();
            assert_eq!(
                got,
                (0..3).map(|ns| (ns, vec![i as i64])).collect::<Vec<_>>()
            );
        }
        // removals reach RocksDB too; a key removed and written again before the flush starts
        // empty rather than with its old row
        t.remove_key(&key(7)).unwrap();
        assert!(t.get(&key(7), 0, Watermark::MIN).unwrap().is_none());
        t.remove_key(&key(9)).unwrap();
        t.update(&key(9), 5, 0, Watermark::MIN, Vec::new, |v| v.push(-1))
            .unwrap();
        let nine: Vec<i64> = t
            .range(&key(9), .., Watermark::MIN)
            .unwrap()
            .map(|(ns, _)| ns)
            .collect();
        assert_eq!(nine, vec![5], "no namespace of the removed row comes back");
        t.flush().unwrap();
        assert!(t.get(&key(7), 0, Watermark::MIN).unwrap().is_none());
        assert_eq!(t.get(&key(8), 2, Watermark::MIN).unwrap(), Some(&vec![8]));
    }

    /// The decoded-key cache stays within the job's byte budget however many keys pass through
    /// it, every value reads back, and keys in use survive a stream of keys seen once.
    #[test]
    fn the_cache_holds_its_byte_budget_and_keeps_what_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let memory = StateMemory::new(16 << 20);
        let cfg = StateConfig {
            local_dir: dir.path().to_path_buf(),
            memory: Some(memory.clone()),
            ..StateConfig::default()
        };
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let backend =
            Arc::new(KeyedBackend::open(&dir.path().join("db"), &cfg, range, 128).unwrap());
        let budget = memory.decoded_budget();
        assert_eq!(budget, 8 << 20);
        let mut t: KeyedTable<Vec<u64>> = KeyedTable::new("t", None);
        t.attach(&backend).unwrap();
        let value = |i: u32| {
            (0..100)
                .map(|j| u64::MAX - (i as u64) * 7 - j)
                .collect::<Vec<_>>()
        };
        let hot = |i: u32| format!("hot-{i}").into_bytes();
        for i in 0..500 {
            t.update(&hot(i), 0, 0, Watermark::MIN, || value(i), |_| ())
                .unwrap();
        }
        let mut peak = 0;
        for i in 0..40_000u32 {
            t.update(&key(i), 0, 0, Watermark::MIN, || value(i), |_| ())
                .unwrap();
            if i % 16 == 0 {
                for h in 0..500 {
                    assert_eq!(t.get(&hot(h), 0, Watermark::MIN).unwrap(), Some(&value(h)));
                }
            }
            peak = peak.max(memory.decoded());
        }
        // one key's charge of slack: the check runs after a new key is in
        assert!(
            peak <= budget + 4096,
            "peak {peak} over the budget {budget}"
        );
        assert!(
            t.key_count() < 10_000,
            "the cache kept {} keys of about 2 KB",
            t.key_count()
        );
        // some 40 sweeps each evicted a quarter of the cache: keys read between sweeps got a
        // second chance, so the keys in use were (almost) never read back
        assert!(
            t.loads() < 500,
            "keys in use were read back from RocksDB {} times",
            t.loads()
        );
        for i in (0..40_000u32).step_by(97) {
            assert_eq!(t.get(&key(i), 0, Watermark::MIN).unwrap(), Some(&value(i)));
        }
        drop(t);
        assert_eq!(memory.decoded(), 0, "a dropped table gives its bytes back");
    }

    #[test]
    fn keys_rocksdb_never_saw_leave_no_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let backend = Arc::new(
            KeyedBackend::open(
                &dir.path().join("db"),
                &config(dir.path(), 1000),
                range,
                128,
            )
            .unwrap(),
        );
        let mut t: KeyedTable<u64> = KeyedTable::new("t", None);
        t.attach(&backend).unwrap();
        for i in 0..500u32 {
            t.update(&key(i), 0, 0, Watermark::MIN, || 0, |v| *v += 1)
                .unwrap();
            t.remove_key(&key(i)).unwrap();
        }
        assert_eq!(
            t.keys.len(),
            0,
            "transient keys leave nothing behind in memory"
        );
        t.flush().unwrap();
        assert!(backend.scan(backend::table_id("t")).unwrap().is_empty());
    }

    #[test]
    fn snapshots_restore_by_key_group_at_another_parallelism() {
        let dir = tempfile::tempdir().unwrap();
        // a cache of 10 keys: the state is far larger, before and after the rescale
        let cfg = config(dir.path(), 10);
        // two subtasks write their halves and snapshot them
        let mut parts = Vec::new();
        let mut timers_expected = 0;
        for sub in 0..2 {
            let range = crate::KeyGroupRange::for_subtask(128, 2, sub);
            let backend = Arc::new(
                KeyedBackend::open(&dir.path().join(format!("db{sub}")), &cfg, range, 128).unwrap(),
            );
            let mut t: KeyedTable<u64> = KeyedTable::new("t", None);
            t.attach(&backend).unwrap();
            let mut timers = Timers::new("fire");
            timers.attach(&backend).unwrap();
            for i in 0..200u32 {
                let k = key(i);
                if range.contains(KeyedTable::<u64>::key_groups_of(&k, 128)) {
                    t.update(&k, 0, 0, Watermark::MIN, || 0, |v| *v = i as u64)
                        .unwrap();
                    timers.register(i as i64, &k).unwrap();
                    timers_expected += 1;
                }
            }
            t.flush().unwrap();
            timers.flush().unwrap();
            let snap = dir.path().join(format!("snap{sub}"));
            backend.checkpoint(&snap).unwrap();
            parts.push((snap, range));
        }
        // three subtasks restore and together see every key exactly once
        let mut seen = 0;
        let mut timers_seen = 0;
        for sub in 0..3 {
            let range = crate::KeyGroupRange::for_subtask(128, 3, sub);
            let copies: Vec<_> = parts
                .iter()
                .enumerate()
                .map(|(i, (p, r))| {
                    let c = dir.path().join(format!("copy{sub}-{i}"));
                    std::fs::create_dir_all(&c).unwrap();
                    for f in std::fs::read_dir(p).unwrap() {
                        let f = f.unwrap();
                        std::fs::copy(f.path(), c.join(f.file_name())).unwrap();
                    }
                    (c, *r)
                })
                .collect();
            let best = copies
                .iter()
                .max_by_key(|(_, r)| {
                    (r.end.min(range.end) + 1).saturating_sub(r.start.max(range.start))
                })
                .map(|(p, _)| p.clone())
                .unwrap();
            let ssts = |d: &std::path::Path| -> Vec<String> {
                let mut v: Vec<String> = std::fs::read_dir(d)
                    .unwrap()
                    .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".sst"))
                    .collect();
                v.sort();
                v
            };
            let base_files = ssts(&best);
            let backend = Arc::new(
                KeyedBackend::restore(
                    &dir.path().join(format!("new{sub}")),
                    &cfg,
                    range,
                    128,
                    copies,
                )
                .unwrap(),
            );
            let now = ssts(backend.dir());
            assert!(
                base_files.iter().all(|f| now.contains(f)),
                "the part covering most of subtask {sub}'s key groups was not taken as it is: {base_files:?} vs {now:?}"
            );
            let mut t: KeyedTable<u64> = KeyedTable::new("t", None);
            t.attach(&backend).unwrap();
            for i in 0..200u32 {
                let k = key(i);
                let mine = range.contains(KeyedTable::<u64>::key_groups_of(&k, 128));
                let got = t.get(&k, 0, Watermark::MIN).unwrap().copied();
                assert_eq!(got, mine.then_some(i as u64), "key {i} in subtask {sub}");
                seen += mine as u32;
            }
            let mut timers = Timers::new("fire");
            timers.attach(&backend).unwrap();
            for (_, k) in timers.due(Watermark(i64::MAX), 1000).unwrap() {
                assert!(
                    range.contains(KeyedTable::<u64>::key_groups_of(&k, 128)),
                    "a timer of another subtask's key was restored in subtask {sub}"
                );
                timers_seen += 1;
            }
        }
        assert_eq!(seen, 200);
        assert_eq!(timers_seen, timers_expected);
    }

    #[test]
    fn ttl_survives_a_restore() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let backend =
            Arc::new(KeyedBackend::open(&dir.path().join("db"), &cfg, range, 128).unwrap());
        let mut t: KeyedTable<u32> = KeyedTable::new("t", Some(Duration::from_millis(100)));
        t.attach(&backend).unwrap();
        t.update(b"a", 0, 1000, Watermark::MIN, || 1, |_| ())
            .unwrap();
        t.update(b"b", 0, 1050, Watermark::MIN, || 2, |_| ())
            .unwrap();
        t.flush().unwrap();
        let snap = dir.path().join("snap");
        backend.checkpoint(&snap).unwrap();
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
        let mut t: KeyedTable<u32> = KeyedTable::new("t", Some(Duration::from_millis(100)));
        t.attach(&restored).unwrap();
        assert_eq!(t.get(b"a", 0, Watermark(1099)).unwrap(), Some(&1));
        assert_eq!(
            t.get(b"a", 0, Watermark(1100)).unwrap(),
            None,
            "expired on read"
        );
        assert_eq!(t.get(b"b", 0, Watermark(1100)).unwrap(), Some(&2));
        // a dirty key that expired is deleted by the flush, not written; a clean one is dropped
        // by RocksDB's compaction once the watermark passes its deadline
        t.update(b"b", 1, 1060, Watermark(1100), || 3, |_| ())
            .unwrap();
        t.expire(Watermark(1160)).unwrap();
        t.flush().unwrap();
        restored.compact();
        assert!(
            restored.scan(backend::table_id("t")).unwrap().is_empty(),
            "expired rows stay on disk"
        );
        assert_eq!(t.get(b"b", 1, Watermark(1100)).unwrap(), None);
    }

    /// State checkpointed in layout 0, which had no layout marker and kept timers per key group
    /// in a table of their own, is read by this version: its timers fire, and a snapshot taken
    /// afterwards is in the current layout.
    #[test]
    fn state_of_layout_0_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let old = KeyedBackend::open(&dir.path().join("old"), &cfg, range, 128).unwrap();
        old.forget_format();
        // the rows layout 0 wrote: values as today; timers under `timers/<name>` by key group,
        // `[time][key]`, with an empty header
        let mut t: KeyedTable<u64> = KeyedTable::new("t", None);
        let old = Arc::new(old);
        t.attach(&old).unwrap();
        let timers = backend::table_id("timers/fire");
        let mut batch = rocksdb::WriteBatch::default();
        for i in 0..50u32 {
            t.update(&key(i), 0, 0, Watermark::MIN, || 0, |v| *v = i as u64)
                .unwrap();
            let mut row = backend::time_bytes(i as i64 * 10).to_vec();
            row.extend_from_slice(&key(i));
            let kg = KeyedTable::<u64>::key_groups_of(&key(i), 128);
            let header = [i64::MAX.to_be_bytes(), i64::MIN.to_be_bytes()].concat();
            batch.put(backend::row_key(kg, timers, &row), header);
        }
        t.flush().unwrap();
        old.write(batch).unwrap();
        let snap = dir.path().join("snap");
        old.checkpoint(&snap).unwrap();
        for (name, parts) in [
            ("whole", vec![(snap.clone(), range)]),
            ("halves", {
                // the same snapshot read as two parts: the path of a rescale
                let half = dir.path().join("snap-copy");
                std::fs::create_dir_all(&half).unwrap();
                for f in std::fs::read_dir(&snap).unwrap() {
                    let f = f.unwrap();
                    std::fs::copy(f.path(), half.join(f.file_name())).unwrap();
                }
                let second = dir.path().join("snap-copy2");
                std::fs::create_dir_all(&second).unwrap();
                for f in std::fs::read_dir(&snap).unwrap() {
                    let f = f.unwrap();
                    std::fs::copy(f.path(), second.join(f.file_name())).unwrap();
                }
                vec![
                    (half, range),
                    (second, crate::KeyGroupRange::for_subtask(128, 2, 0)),
                ]
            }),
        ] {
            let restored = Arc::new(
                KeyedBackend::restore(&dir.path().join(name), &cfg, range, 128, parts).unwrap(),
            );
            assert_eq!(restored.format(), 0, "{name}");
            let mut t: KeyedTable<u64> = KeyedTable::new("t", None);
            t.attach(&restored).unwrap();
            for i in 0..50u32 {
                assert_eq!(
                    t.get(&key(i), 0, Watermark::MIN).unwrap(),
                    Some(&(i as u64))
                );
            }
            let mut fire = Timers::new("fire");
            fire.attach(&restored).unwrap();
            let got = fire.due(Watermark(i64::MAX), 1000).unwrap();
            let want: Vec<_> = (0..50u32)
                .map(|i| (i as i64 * 10, StateKey::from(key(i).as_slice())))
                .collect();
            assert_eq!(got, want, "{name}");
            assert!(
                restored.scan(timers).unwrap().is_empty(),
                "the old timer rows are gone"
            );
            let again = dir.path().join(format!("{name}-snap"));
            restored.checkpoint(&again).unwrap();
            let next = KeyedBackend::restore(
                &dir.path().join(format!("{name}-next")),
                &cfg,
                range,
                128,
                vec![(again, range)],
            )
            .unwrap();
            assert_eq!(next.format(), backend::FORMAT, "{name}");
        }
    }
}

//! [`KeyedTable`]: values per (key, namespace) in a write-back cache of decoded keys in front
//! of the instance's RocksDB rows, with its memory accounting, eviction, spill filters, TTL,
//! value versions and the rewrite of older layouts (the design is in the [module
//! above](super)).
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::time::Duration;

use super::shards::{Fixed, SHARDS, ShardedMap};
use super::spilled::{ALL, NsRange, Spilled, WARM_PER_MISS, rows_for_prefetch};
use super::{
    FILTER_CAP, FLUSH_BATCH_BYTES, KeyedBackend, PUBLISH_EVERY, StateKey, StateValue, Upgrade,
    backend, publish,
};
use crate::keys::{hash_key, key_group};
use crate::{EngineError, KeyGroup, Result, Watermark};

/// Where a [`KeyedTable::drain_next`] pass over a table stands.
#[derive(Debug)]
pub struct TableDrain {
    scan: backend::TableScan,
    /// The last key the pass took out of the cache, with the namespaces the cache held of it:
    /// RocksDB's rows of the others were spilled, and are read back.
    cached: Option<(StateKey, SmallVec<[i64; 4]>)>,
}

/// Rows of one key read from RocksDB: (namespace, touched, value, encoded size), in namespace
/// order; most reads find one.
type Rows<V> = SmallVec<[(i64, i64, V, usize); 1]>;

/// Values per (key, namespace), with an optional event-time TTL per key.
#[derive(Debug)]
pub struct KeyedTable<V> {
    name: String,
    ttl: Option<i64>,
    /// The encoding version of the values this table writes, and how it reads older ones.
    version: u8,
    upgrade: Option<Upgrade<V>>,
    /// Holds one value per key, at namespace 0: a read is a point lookup, not a prefix seek.
    one_value: bool,
    keys: ShardedMap<Slot<V>>,
    /// The shard the next eviction sweep starts at (sweeps take turns).
    sweep_from: usize,
    /// TTL deadlines of a table in memory (attached tables keep them in their rows).
    deadlines: BinaryHeap<Reverse<(i64, StateKey)>>,
    /// The latest watermark passed to [`KeyedTable::expire`].
    clock: Watermark,
    entries: usize,
    /// Estimated bytes of the keys in memory, the map's table included.
    bytes: usize,
    /// The part of `bytes` that is the map's table.
    map_charge: usize,
    /// The part of `bytes` that is the spill filters.
    spill_charge: usize,
    /// Running average of the encoded size of a key's values, charged for keys not yet written.
    avg_payload: usize,
    /// Updates since the last size sample.
    since_sample: u32,
    /// Keys read back from RocksDB into the cache.
    loads: u64,
    /// Cache misses that read RocksDB (whether or not they found rows).
    reads: u64,
    /// Accesses (each looks in the cache, and reads RocksDB on a miss).
    lookups: u64,
    /// The `lookups` and `reads` already added to the backend's counters.
    published: (u64, u64),
    /// Rows written to RocksDB.
    rows_written: u64,
    /// Scratch space of size samples.
    scratch: Vec<u8>,
    /// Keys the last [`KeyedTable::prefetch`] found in neither the cache nor RocksDB and that
    /// have not been created since: a miss on one of them reads nothing.
    absent: hashbrown::HashSet<StateKey, Fixed>,
    backing: Option<Backing>,
}

/// Dirty keys and removed rows a table lists at most: past it, dirty keys are no longer listed
/// (a flush finds them by a pass over the cache) and removed rows are written.
const DIRTY_LIMIT: usize = 1 << 18;

/// Every this many updates, the updated key's values are encoded to correct its charge and the
/// table's average (the charges of keys changed in place would otherwise stay as estimated).
const SAMPLE_EVERY: u32 = 32;

/// The namespace `ns` alone.
fn at(ns: i64) -> NsRange {
    (Bound::Included(ns), Bound::Included(ns))
}

/// Rows a migration from an older layout writes per batch.
const MIGRATE_BATCH: usize = 4096;

/// The payload of a key whose `n` values encode to `encoded` bytes: besides the values, a key
/// with more than one keeps its entries on the heap (counted at half, as the payload is counted
/// twice).
fn payload_of<V>(encoded: usize, n: usize) -> usize {
    encoded
        + if n > 1 {
            n * std::mem::size_of::<Entry<V>>() / 2
        } else {
            0
        }
}

/// The estimated bytes a cached key holds outside the map's table, whose payload
/// ([`payload_of`]) is `payload` bytes: keys over 24 bytes are on the heap, and decoded values
/// take about twice their encoding. The table itself is charged by its allocation.
fn charge_of(key: &[u8], payload: usize) -> u32 {
    let heap_key = if key.len() > 24 { key.len() } else { 0 };
    (heap_key + 2 * payload).min(u32::MAX as usize) as u32
}

/// What a flush writes: one table's dirty rows, a batch at a time.
struct RowWriter {
    backend: Arc<KeyedBackend>,
    batch: rocksdb::WriteBatch,
    table: [u8; 4],
    ttl: Option<i64>,
    clock: Watermark,
    version: u8,
    buf: Vec<u8>,
    row: Vec<u8>,
    /// The table's recorded namespace range ([`Backing::written`]), widened as rows go out.
    ns_range: Option<(i64, i64)>,
    /// Keys whose rows were all deleted, to forget once the batch is written.
    tombstones: Vec<StateKey>,
    removed_entries: usize,
    rows: u64,
    old_bytes: usize,
    new_bytes: usize,
    payloads: usize,
    written: usize,
}

/// Where a key's rows go in a flush's write order (key group, key length, key): the key group,
/// the length and the first 13 bytes of the key, or for keys of 255 bytes or more the key group
/// alone. Keys equal in these are ordered by [`by_length`].
fn write_order(kg: KeyGroup, key: &[u8]) -> u128 {
    let mut head = [0u8; 16];
    head[..2].copy_from_slice(&(kg.0 as u16).to_be_bytes());
    if key.len() >= 255 {
        head[2] = 255;
    } else {
        head[2] = key.len() as u8;
        let n = key.len().min(13);
        head[3..3 + n].copy_from_slice(&key[..n]);
    }
    u128::from_be_bytes(head)
}

/// Keys by length, then bytes.
fn by_length(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    (a.len(), a).cmp(&(b.len(), b))
}

impl RowWriter {
    /// Adds the changed rows of a dirty key (a clean one, listed twice, adds nothing).
    fn slot<V: StateValue>(
        &mut self,
        kg: KeyGroup,
        key: &[u8],
        slot: &mut Slot<V>,
        table_name: &str,
    ) -> Result<()> {
        if !slot.dirty {
            return Ok(());
        }
        slot.dirty = false;
        let expired = self
            .ttl
            .is_some_and(|ttl| self.clock.0 >= slot.touched.saturating_add(ttl));
        // the row keys are built in one buffer kept for the next key
        let mut row = std::mem::take(&mut self.row);
        row.clear();
        backend::push_key_prefix(&mut row, kg, self.table, key);
        let prefix = row.len();
        if slot.values.is_empty() || expired {
            for e in slot.values.0.iter().filter(|e| e.persisted) {
                row.truncate(prefix);
                row.extend_from_slice(&backend::time_bytes(e.ns));
                self.batch.delete(&row);
            }
            self.removed_entries += slot.values.len();
            self.tombstones.push(key.into());
            self.row = row;
            return Ok(());
        }
        slot.persisted = true;
        let deadline = self
            .ttl
            .map_or(backend::NO_DEADLINE, |t| slot.touched.saturating_add(t));
        let (mut payload, mut all) = (0, true);
        for e in slot.values.0.iter_mut() {
            if !e.dirty {
                all = false;
                continue;
            }
            e.dirty = false;
            e.persisted = true;
            let buf = &mut self.buf;
            buf.clear();
            buf.extend_from_slice(&deadline.to_be_bytes());
            buf.extend_from_slice(&slot.touched.to_be_bytes());
            buf.push(self.version);
            *buf = postcard::to_extend(&e.value, std::mem::take(buf))
                .map_err(|err| EngineError::State(format!("{table_name}: {err}")))?;
            row.truncate(prefix);
            row.extend_from_slice(&backend::time_bytes(e.ns));
            if !self
                .ns_range
                .is_some_and(|(lo, hi)| lo <= e.ns && e.ns <= hi)
            {
                // in the row's batch, so no snapshot holds the row without the range
                let r = backend::union(self.ns_range, (e.ns, e.ns));
                self.ns_range = Some(r);
                self.batch
                    .put(backend::range_row(self.table), backend::range_value(r));
            }
            self.batch.put(&row, &*buf);
            self.rows += 1;
            payload += buf.len() - backend::HEADER;
        }
        if all {
            // every value was encoded: the key's charge is now exact
            let payload = payload_of::<V>(payload, slot.values.len());
            self.old_bytes += slot.charge as usize;
            slot.charge = charge_of(key, payload);
            self.new_bytes += slot.charge as usize;
            self.payloads += payload;
            self.written += 1;
        }
        self.row = row;
        if self.batch.size_in_bytes() >= FLUSH_BATCH_BYTES {
            self.backend.write(std::mem::take(&mut self.batch))?;
        }
        Ok(())
    }
}

/// The fewest keys a table's map gives up room down to (see [`KeyedTable::smaller_map`]).
const MIN_MAP_CAPACITY: usize = 1 << 12;

/// The keys a map table of `bytes` bytes holds when full (an eighth of its buckets stay free;
/// each bucket is an entry and a control byte).
fn full_capacity<V>(bytes: usize) -> usize {
    bytes / (std::mem::size_of::<(StateKey, Slot<V>)>() + 1) * 7 / 8
}

/// Where an attached table's rows live, and what the cache owes them.
#[derive(Debug)]
struct Backing {
    backend: Arc<KeyedBackend>,
    table: [u8; 4],
    /// Keys written or removed since the last flush (a key may appear more than once), unless
    /// `unlisted`.
    dirty: Vec<StateKey>,
    /// More keys became dirty than [`DIRTY_LIMIT`]: the list was dropped, and the next flush
    /// finds them by a pass over the cache.
    unlisted: bool,
    /// Rows RocksDB holds whose values were removed since the last flush.
    gone: hashbrown::HashSet<(StateKey, i64), Fixed>,
    /// What RocksDB holds that the cache lacks: whether a miss must read RocksDB.
    spilled: Spilled,
    /// The lowest and highest namespace of the rows RocksDB may hold, as recorded in the
    /// instance (see [`backend::range_row`]): a table restored from it knows the snapshot holds
    /// no row outside.
    written: Option<(i64, i64)>,
    /// A restored table's reading of its snapshot's keys, until it has read them all (see
    /// [`Spilled::learn_from`]): per prefetch, or per miss in the snapshot's namespaces.
    scan: Option<backend::TableScan>,
}

impl Backing {
    fn row(&self, key: &[u8], ns: i64) -> Vec<u8> {
        let kg = key_group(hash_key(key), self.backend.max_parallelism());
        backend::row_key(kg, self.table, key, ns)
    }
}

#[derive(Debug)]
struct Slot<V> {
    touched: i64,
    values: Namespaces<V>,
    /// The key is in the dirty list.
    dirty: bool,
    /// RocksDB holds (or may hold) a row of the key.
    persisted: bool,
    /// Created without reading RocksDB, which may hold rows of the key in namespaces the slot
    /// lacks (see [`KeyedTable::load`]).
    partial: bool,
    /// Read or written since the last eviction sweep (CLOCK's reference bit).
    used: Use,
    /// Estimated bytes, as counted in the table's total.
    charge: u32,
}

/// What the eviction sweep (CLOCK) knows of a cached key's use since the last sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Not used since the last sweep, or loaded and used once: evicted first, so that keys
    /// seen once do not push out the ones seen again.
    Idle,
    /// Used since the last sweep: kept for one more.
    Used,
    /// Read ahead ([`KeyedTable::prefetch`]) for an access still to come, which is then its
    /// first use, as if that access had loaded it.
    ReadAhead,
}

/// One (namespace, value) of a key, and what RocksDB knows of it.
#[derive(Debug)]
struct Entry<V> {
    ns: i64,
    value: V,
    /// Changed since the last flush.
    dirty: bool,
    /// RocksDB holds a row for it.
    persisted: bool,
}

/// The values of one key, sorted by namespace. A key has few namespaces (a window's slices, a
/// join's timestamps within its interval), so a sorted vector beats a tree: one allocation,
/// binary search, contiguous range scans.
#[derive(Debug)]
struct Namespaces<V>(SmallVec<[Entry<V>; 1]>);

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

    fn find(&self, ns: i64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&ns, |e| e.ns)
    }

    fn get(&self, ns: i64) -> Option<&V> {
        self.find(ns).ok().map(|i| &self.0[i].value)
    }

    fn get_mut(&mut self, ns: i64) -> Option<&mut V> {
        self.find(ns).ok().map(|i| &mut self.0[i].value)
    }

    /// The entry at `ns`, inserted with `init` if absent; and whether it was inserted.
    fn get_or_insert(&mut self, ns: i64, init: impl FnOnce() -> V) -> (&mut Entry<V>, bool) {
        match self.find(ns) {
            Ok(i) => (&mut self.0[i], false),
            Err(i) => {
                self.0.insert(
                    i,
                    Entry {
                        ns,
                        value: init(),
                        dirty: false,
                        persisted: false,
                    },
                );
                (&mut self.0[i], true)
            }
        }
    }

    fn remove(&mut self, ns: i64) -> Option<Entry<V>> {
        self.find(ns).ok().map(|i| self.0.remove(i))
    }

    fn bounds(&self, (lo, hi): (Bound<i64>, Bound<i64>)) -> std::ops::Range<usize> {
        let start = match lo {
            Bound::Included(x) => self.0.partition_point(|e| e.ns < x),
            Bound::Excluded(x) => self.0.partition_point(|e| e.ns <= x),
            Bound::Unbounded => 0,
        };
        let end = match hi {
            Bound::Included(x) => self.0.partition_point(|e| e.ns <= x),
            Bound::Excluded(x) => self.0.partition_point(|e| e.ns < x),
            Bound::Unbounded => self.0.len(),
        };
        start..end.max(start)
    }
}

impl<V: StateValue> KeyedTable<V> {
    /// A table called `name` (used in errors and metrics) with an optional TTL, in memory until
    /// [attached](Self::attach). Its values are of encoding version 0.
    pub fn new(name: impl Into<String>, ttl: Option<Duration>) -> Self {
        KeyedTable {
            name: name.into(),
            ttl: ttl.map(|d| d.as_millis().min(i64::MAX as u128) as i64),
            version: 0,
            upgrade: None,
            one_value: false,
            keys: ShardedMap::default(),
            sweep_from: 0,
            deadlines: BinaryHeap::new(),
            clock: Watermark::MIN,
            entries: 0,
            bytes: 0,
            map_charge: 0,
            spill_charge: 0,
            avg_payload: 16,
            since_sample: 0,
            loads: 0,
            reads: 0,
            lookups: 0,
            published: (0, 0),
            rows_written: 0,
            scratch: Vec::new(),
            absent: Default::default(),
            backing: None,
        }
    }

    /// A table holding one value per key, at namespace 0 (value state: a deduplication's last
    /// record, a pattern's run): reading a key from RocksDB is one point lookup rather than a
    /// seek over the key's rows. Writing another namespace is an error.
    pub fn one_value(name: impl Into<String>, ttl: Option<Duration>) -> Self {
        let mut table = Self::new(name, ttl);
        table.one_value = true;
        table
    }

    /// Declares that this table's values are written in encoding `version`, and reads rows of
    /// older versions with `upgrade` (a changed aggregate, a field added to a value type). Rows
    /// of a newer version than `version` are refused with an error that names both.
    pub fn versioned(mut self, version: u8, upgrade: Upgrade<V>) -> Self {
        self.version = version;
        self.upgrade = Some(upgrade);
        self
    }

    /// Moves the table into `backend`: from now on RocksDB holds it and memory caches it. If the
    /// backend was restored from a snapshot, the table's rows are there, deadlines included; rows
    /// of a layout before [`backend::FORMAT`] 2 are rewritten into the current one first.
    pub fn attach(&mut self, backend: &Arc<KeyedBackend>) -> Result<()> {
        let table = backend::value_table_id(&self.name);
        if backend.restored() && backend.format() < 2 {
            self.migrate(backend, table)?;
        }
        // restored rows lie in the namespaces the table recorded before the snapshot
        let written = if backend.restored() {
            backend.namespace_range(table)?
        } else {
            None
        };
        let mut backing = Backing {
            backend: backend.clone(),
            table,
            dirty: Vec::new(),
            unlisted: false,
            gone: Default::default(),
            spilled: Spilled::new(written, backend.memory().decoded_budget() / FILTER_CAP)
                .expiring(self.ttl),
            written,
            // the table reads its snapshot's keys as batches or misses come
            // (`Spilled::learn_from`)
            scan: written.map(|_| backend::TableScan::new(table)),
        };
        // whatever was in memory before attaching goes to the backend at the next flush
        for (k, slot) in self.keys.iter_mut() {
            slot.dirty = true;
            for e in slot.values.0.iter_mut() {
                e.dirty = true;
            }
            backing.dirty.push(k.clone());
        }
        self.deadlines.clear();
        self.absent.clear();
        backend.memory().add_table();
        backend.memory().charge(0, self.bytes);
        self.backing = Some(backing);
        Ok(())
    }

    /// Rewrites the table's rows of layouts 0 and 1 (all namespaces of a key in one row, under
    /// [`backend::table_id`]) as one row per namespace under `table`, then deletes them. The
    /// values are decoded as this version's type at encoding version 0 (encoding versions
    /// begin with layout 2).
    fn migrate(&self, backend: &KeyedBackend, table: [u8; 4]) -> Result<()> {
        let legacy = backend::table_id(&self.name);
        let mp = backend.max_parallelism();
        let mut batch = rocksdb::WriteBatch::default();
        let mut buf = Vec::new();
        let mut written = backend.namespace_range(table)?;
        backend.for_each_in_table(legacy, |key, row| {
            let (Some(header), Some(body)) = (
                row.get(..backend::LEGACY_HEADER),
                row.get(backend::LEGACY_HEADER..),
            ) else {
                return Err(self.error("a state row of layout 1 shorter than its header"));
            };
            let values: Vec<(i64, V)> = postcard::from_bytes(body)
                .map_err(|e| self.error(format!("decoding a state row of layout 1: {e}")))?;
            let kg = key_group(hash_key(key), mp);
            for (ns, value) in values {
                buf.clear();
                buf.extend_from_slice(header);
                buf.push(0);
                buf = postcard::to_extend(&value, std::mem::take(&mut buf))
                    .map_err(|e| self.error(e))?;
                batch.put(backend::row_key(kg, table, key, ns), &buf);
                written = Some(backend::union(written, (ns, ns)));
            }
            if batch.len() >= MIGRATE_BATCH {
                backend.write(std::mem::take(&mut batch))?;
            }
            Ok(())
        })?;
        if let Some(r) = written {
            batch.put(backend::range_row(table), backend::range_value(r));
        }
        backend.write(batch)?;
        backend.clear_table(legacy)
    }

    fn error(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::State(format!("{}: {e}", self.name))
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

    /// Makes the cache hold whatever RocksDB has of `key` in the namespaces `range`: reads the
    /// key's rows only if RocksDB may hold rows there that the cache lacks ([`Spilled`]), which
    /// it cannot while nothing was evicted or restored. A key absent from the cache afterwards
    /// has no rows in `range`; a cached key that RocksDB may hold more of elsewhere is
    /// *partial*, and reads its other rows when a later access reaches them. One namespace is
    /// read with a point lookup, which leaves the key partial; a wider range reads all of the
    /// key's rows with one seek. A table with a TTL reads all of a key's rows at once, so that
    /// touching the key rewrites them all. Returns whether RocksDB was read whole: the cache
    /// then holds all of the key.
    fn load(&mut self, key: &[u8], range: NsRange) -> Result<bool> {
        self.lookups += 1;
        if self.lookups.is_multiple_of(PUBLISH_EVERY) {
            self.publish_counts();
        }
        let range = if self.ttl.is_some() { ALL } else { range };
        let hash = hash_key(key);
        if !self.must_read(key, hash, range) || !self.learn_at_miss(hash, range)? {
            return Ok(false);
        }
        let b = self.backing.as_ref().expect("only attached tables read");
        self.reads += 1;
        let kg = key_group(hash, b.backend.max_parallelism());
        let mut rows: Rows<V> = SmallVec::new();
        let mut add = |ns: i64, row: &[u8]| -> Result<()> {
            let (touched, value) = self.decode(row)?;
            rows.push((ns, touched, value, row.len() - backend::HEADER));
            Ok(())
        };
        // one namespace asked for (a window's slice as it fires): a point lookup, which stops
        // at the first file that has the row, instead of a seek in every level
        let point = match range {
            (Bound::Included(a), Bound::Included(b)) if a == b && !self.one_value => Some(a),
            _ => None,
        };
        let mut prefix = backend::key_prefix(kg, b.table, key);
        if self.one_value {
            prefix.extend_from_slice(&backend::time_bytes(0));
            b.backend.get(&prefix, |v| add(0, v))?;
        } else if let Some(ns) = point {
            prefix.extend_from_slice(&backend::time_bytes(ns));
            b.backend.get(&prefix, |v| add(ns, v))?;
        } else {
            b.backend.read_key(&prefix, add)?;
        }
        let whole = point.is_none();
        self.take_rows(key, rows, whole)?;
        Ok(whole)
    }

    /// At a miss that must read RocksDB, reads on through a restored snapshot's rows
    /// ([`WARM_PER_MISS`] of them) if the table has not read them all, so that misses in its
    /// namespaces stop reading once it has (an operator that prefetches reads them per batch
    /// instead). Whether the miss must still read.
    fn learn_at_miss(&mut self, hash: u64, range: NsRange) -> Result<bool> {
        let Some(b) = self.backing.as_mut() else {
            return Ok(false);
        };
        if !b
            .spilled
            .learn_from(&b.backend, &mut b.scan, WARM_PER_MISS, &self.name)?
        {
            return Ok(true);
        }
        let must = !b.spilled.is_empty() && b.spilled.may_hold(hash, range);
        self.charge_spilled();
        Ok(must)
    }

    /// Whether [`Self::load`] of `key` (hashed to `hash`) in `range` must read RocksDB: only if
    /// the cache lacks the key or holds it partially, and RocksDB may hold its rows there. Marks
    /// a cached key used.
    fn must_read(&mut self, key: &[u8], hash: u64, range: NsRange) -> bool {
        let Some(b) = self.backing.as_ref() else {
            return false;
        };
        if let Some(slot) = self.keys.get_mut(key) {
            slot.used = match slot.used {
                Use::ReadAhead => Use::Idle,
                _ => Use::Used,
            };
            // a value the slot holds is newer than its row: one namespace it holds needs no
            // read
            let holds_it = matches!(range, (Bound::Included(a), Bound::Included(b))
                if a == b && slot.values.find(a).is_ok());
            if !slot.partial || holds_it {
                return false;
            }
        }
        !b.spilled.is_empty()
            && b.spilled.may_hold(hash, range)
            && (self.absent.is_empty() || !self.absent.contains(key))
    }

    /// Puts rows read from RocksDB of `key` into the cache: adds them to a cached key, or
    /// caches the key with them (partial unless they are `whole`, all RocksDB holds of it).
    fn take_rows(&mut self, key: &[u8], rows: Rows<V>, whole: bool) -> Result<()> {
        if self.keys.contains_key(key) {
            self.fill(key, rows, whole);
            return Ok(());
        }
        if rows.is_empty() {
            return Ok(());
        }
        let mut slot = Slot {
            touched: i64::MIN,
            values: Namespaces::new(),
            dirty: false,
            persisted: true,
            partial: !whole,
            used: Use::Idle,
            charge: 0,
        };
        let mut payload = 0;
        // rows come in namespace order
        for (ns, touched, value, size) in rows {
            slot.touched = slot.touched.max(touched);
            payload += size;
            slot.values.0.push(Entry {
                ns,
                value,
                dirty: false,
                persisted: true,
            });
        }
        self.read_back(&slot.values);
        self.evict_if_full(Some(key))?;
        self.loads += 1;
        slot.charge = charge_of(key, payload_of::<V>(payload, slot.values.len()));
        self.account(0, slot.charge as usize);
        self.entries += slot.values.len();
        self.keys.insert(key.into(), slot);
        self.charge_map();
        Ok(())
    }

    /// Adds to a partial key the rows RocksDB holds of it that the slot lacks (its own values
    /// are newer; rows it removed since the last flush stay removed); the key is whole after
    /// if `rows` are all it has.
    fn fill(&mut self, key: &[u8], rows: Rows<V>, whole: bool) {
        let b = self.backing.as_mut().expect("only attached tables fill");
        let slot = self.keys.get_mut(key).expect("filled keys are cached");
        if whole {
            slot.partial = false;
        }
        let mut added = Namespaces::new();
        let mut payload = 0;
        for (ns, touched, value, size) in rows {
            if slot.values.find(ns).is_ok() || b.gone.contains(&(StateKey::from(key), ns)) {
                continue;
            }
            slot.touched = slot.touched.max(touched);
            payload += size;
            added.0.push(Entry {
                ns,
                value,
                dirty: false,
                persisted: true,
            });
        }
        if added.is_empty() {
            return;
        }
        let n = added.len();
        for e in added.0.iter() {
            b.spilled.read_back(e.ns);
        }
        for e in added.0 {
            let i = slot.values.find(e.ns).expect_err("skipped above");
            slot.values.0.insert(i, e);
        }
        slot.persisted = true;
        let old = slot.charge;
        slot.charge = old.saturating_add(charge_of(&[], payload_of::<V>(payload, n)));
        let new = slot.charge;
        self.entries += n;
        self.loads += 1;
        self.account(old as usize, new as usize);
        self.charge_spilled();
    }

    /// Takes rows read back into the cache off what RocksDB holds beyond it.
    fn read_back(&mut self, values: &Namespaces<V>) {
        if let Some(b) = self.backing.as_mut() {
            for e in values.0.iter() {
                b.spilled.read_back(e.ns);
            }
        }
        self.charge_spilled();
    }

    /// Brings the charge of the spill filters up to date.
    fn charge_spilled(&mut self) {
        let Some(b) = self.backing.as_ref() else {
            return;
        };
        let now = b.spilled.bytes();
        if now != self.spill_charge {
            let old = std::mem::replace(&mut self.spill_charge, now);
            self.account(old, now);
        }
    }

    /// The touched time and value of a row, upgraded from an older encoding if need be.
    fn decode(&self, row: &[u8]) -> Result<(i64, V)> {
        let (Some(touched), Some(&version), Some(body)) = (
            row.get(8..16),
            row.get(backend::HEADER - 1),
            row.get(backend::HEADER..),
        ) else {
            return Err(self.error("a state row shorter than its header"));
        };
        let touched = i64::from_be_bytes(touched.try_into().expect("8 bytes"));
        let value = if version == self.version {
            postcard::from_bytes(body).map_err(|e| self.error(format!("decoding a value: {e}")))?
        } else if version > self.version {
            return Err(self.error(format!(
                "a value of encoding version {version} was written by a newer version of the operator than this one, which reads up to version {}",
                self.version
            )));
        } else {
            match self.upgrade {
                Some(upgrade) => upgrade(version, body).map_err(|e| {
                    self.error(format!(
                        "reading a value of encoding version {version}: {e}"
                    ))
                })?,
                None => {
                    return Err(self.error(format!(
                        "a value of encoding version {version}, and no way to read it"
                    )));
                }
            }
        };
        Ok((touched, value))
    }

    /// The encoded size of a key's values.
    fn payload(&mut self, key: &[u8]) -> Result<Option<usize>> {
        let Some(slot) = self.keys.get(key) else {
            return Ok(None);
        };
        let mut total = 0;
        for e in slot.values.0.iter() {
            self.scratch.clear();
            self.scratch = postcard::to_extend(&e.value, std::mem::take(&mut self.scratch))
                .map_err(|e| EngineError::State(format!("{}: {e}", self.name)))?;
            total += self.scratch.len();
        }
        Ok(Some(payload_of::<V>(total, slot.values.len())))
    }

    /// Encodes the values of a cached key to correct its charge and the table's average.
    fn sample(&mut self, key: &[u8]) -> Result<()> {
        let Some(payload) = self.payload(key)? else {
            return Ok(());
        };
        let slot = self.keys.get_mut(key).expect("sized above");
        let old = slot.charge as usize;
        slot.charge = charge_of(key, payload);
        let new = slot.charge as usize;
        self.avg_payload = (self.avg_payload * 7 + payload) / 8;
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

    /// Brings the charge of the map's table up to date with its capacity (it grows as keys
    /// arrive, and keeps its size when they are evicted).
    fn charge_map(&mut self) {
        let now = self.keys.allocation_size();
        if now != self.map_charge {
            let old = std::mem::replace(&mut self.map_charge, now);
            self.account(old, now);
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
            if !b.unlisted {
                b.dirty.push(key.into());
            }
        }
    }

    /// Records that a removed entry's row, if RocksDB holds one, must be deleted.
    fn note_gone(backing: &mut Option<Backing>, key: &[u8], e: &Entry<V>) {
        if let Some(b) = backing
            && e.persisted
        {
            b.gone.insert((key.into(), e.ns));
        }
    }

    /// Removes every value of a cached key.
    fn clear_slot(backing: &mut Option<Backing>, slot: &mut Slot<V>, key: &[u8]) -> usize {
        let n = slot.values.len();
        for e in slot.values.0.drain(..) {
            Self::note_gone(backing, key, &e);
        }
        if n > 0 {
            Self::mark_dirty(backing, slot, key);
        }
        n
    }

    /// The value at (key, ns), unless absent or expired as of `clock`.
    pub fn get(&mut self, key: &[u8], ns: i64, clock: Watermark) -> Result<Option<&V>> {
        self.load(key, at(ns))?;
        Ok(self
            .keys
            .get(key)
            .filter(|slot| !Self::expired_at(self.ttl, slot, clock))
            .and_then(|slot| slot.values.get(ns)))
    }

    /// Whether the key has any live value as of `clock`.
    pub fn contains_key(&mut self, key: &[u8], clock: Watermark) -> Result<bool> {
        self.load(key, ALL)?;
        Ok(self
            .keys
            .get(key)
            .is_some_and(|s| !Self::expired_at(self.ttl, s, clock) && !s.values.is_empty()))
    }

    /// Whether an access to `key` would read RocksDB: the cache lacks all or part of it and
    /// RocksDB may hold it. These are the keys [`Self::prefetch`] reads.
    pub fn needs_read(&mut self, key: &[u8]) -> bool {
        self.must_read(key, hash_key(key), ALL)
    }

    /// Reads ahead, with one batched RocksDB lookup, every key of `keys` (a batch's) that the
    /// accesses to come would otherwise read one at a time: keys the cache lacks, or holds
    /// partially, and RocksDB may hold. Keys found are cached, and the access that follows
    /// is their first use, as if it had loaded them; keys RocksDB does not hold
    /// are remembered until the next prefetch, so that reading them costs nothing either. Only
    /// a [one-value](Self::one_value) table reads ahead; other tables read per access.
    pub fn prefetch<'k>(&mut self, keys: impl IntoIterator<Item = &'k [u8]>) -> Result<()> {
        self.absent.clear();
        if !self.one_value {
            return Ok(());
        }
        let keys: Vec<&[u8]> = keys.into_iter().collect();
        if let Some(b) = self.backing.as_mut()
            && b.spilled.learn_from(
                &b.backend,
                &mut b.scan,
                rows_for_prefetch(keys.len()),
                &self.name,
            )?
        {
            self.charge_spilled();
        }
        // nothing evicted or restored: no key can be read
        let Some(b) = self.backing.as_ref().filter(|b| !b.spilled.is_empty()) else {
            return Ok(());
        };
        let (backend, table) = (b.backend.clone(), b.table);
        let mp = backend.max_parallelism();
        // the row keys, one after another in `buf`, and each row's (sort prefix, end, key)
        let mut buf: Vec<u8> = Vec::new();
        let mut wanted: Vec<(u128, usize, &[u8])> = Vec::new();
        for key in keys {
            let hash = hash_key(key);
            if self.must_read(key, hash, ALL) {
                let start = buf.len();
                backend::push_row_key(&mut buf, key_group(hash, mp), table, key, 0);
                let mut prefix = [0u8; 16];
                let row = &buf[start..];
                let n = row.len().min(16);
                prefix[..n].copy_from_slice(&row[..n]);
                wanted.push((u128::from_be_bytes(prefix), buf.len(), key));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let row_of = |i: usize| {
            let start = if i == 0 { 0 } else { wanted[i - 1].1 };
            &buf[start..wanted[i].1]
        };
        // in row order, each key once: RocksDB walks its files' indexes forward
        let mut order: Vec<u32> = (0..wanted.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            wanted[a]
                .0
                .cmp(&wanted[b].0)
                .then_with(|| row_of(a).cmp(row_of(b)))
        });
        order.dedup_by(|a, b| row_of(*a as usize) == row_of(*b as usize));
        let rows: Vec<&[u8]> = order.iter().map(|&i| row_of(i as usize)).collect();
        let keys: Vec<&[u8]> = order.iter().map(|&i| wanted[i as usize].2).collect();
        self.reads += rows.len() as u64;
        let mut found: Vec<(usize, i64, V, usize)> = Vec::new();
        backend.multi_get(&rows, |i, row| {
            let (touched, value) = self.decode(row)?;
            found.push((i, touched, value, row.len() - backend::HEADER));
            Ok(())
        })?;
        let mut found = found.into_iter().peekable();
        for (i, key) in keys.into_iter().enumerate() {
            match found.next_if(|f| f.0 == i) {
                Some((_, touched, value, size)) => {
                    self.take_rows(key, smallvec::smallvec![(0, touched, value, size)], true)?;
                    if let Some(slot) = self.keys.get_mut(key) {
                        slot.used = Use::ReadAhead;
                    }
                }
                // a partial key: RocksDB holds nothing the cache lacks
                None if self.keys.contains_key(key) => {
                    self.take_rows(key, SmallVec::new(), true)?
                }
                None => {
                    self.absent.insert(key.into());
                }
            }
        }
        Ok(())
    }

    /// Refuses a write at namespace `ns` to a one-value table, which holds namespace 0 only.
    fn check_namespace(&self, ns: i64) -> Result<()> {
        if self.one_value && ns != 0 {
            return Err(self.error(format!(
                "holds one value per key, at namespace 0; namespace {ns} was written"
            )));
        }
        Ok(())
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
        self.check_namespace(ns)?;
        let whole = self.load(key, at(ns))?;
        self.update_loaded(key, ns, now, clock, whole, init, f)
    }

    /// Changes the live value of `key` at `ns` (as of `clock`) with `change`, or creates it
    /// with `init` if there is none; returns whether it changed or created it. The key is
    /// touched at event time `now` and its value rewritten at the next flush only if `change`
    /// says it changed the value (a deduplication keeping the latest row leaves a key alone
    /// for an older row). One read of the key where [`Self::get`] and then [`Self::update`]
    /// read it twice.
    pub fn upsert(
        &mut self,
        key: &[u8],
        ns: i64,
        now: i64,
        clock: Watermark,
        init: impl FnOnce() -> V,
        change: impl FnOnce(&mut V) -> bool,
    ) -> Result<bool> {
        self.check_namespace(ns)?;
        let whole = self.load(key, at(ns))?;
        let ttl = self.ttl;
        let changed = match self.keys.get_mut(key) {
            Some(slot) if !Self::expired_at(ttl, slot, clock) => {
                slot.values.get_mut(ns).map(change)
            }
            _ => None,
        };
        if changed == Some(false) {
            return Ok(false);
        }
        // changed in place (marked and touched now), or created
        self.update_loaded(key, ns, now, clock, whole, init, |_| ())?;
        Ok(true)
    }

    /// Whether `key` has no live value as of `clock`; if so, creates its value at namespace 0
    /// with `init`, touched at event time `now` (a deduplication's first sight of a key). One
    /// access, where [`Self::contains_key`] and then [`Self::update`] would look the key up
    /// twice.
    pub fn insert_if_absent(
        &mut self,
        key: &[u8],
        now: i64,
        clock: Watermark,
        init: impl FnOnce() -> V,
    ) -> Result<bool> {
        let whole = self.load(key, ALL)?;
        let live = self
            .keys
            .get(key)
            .is_some_and(|s| !Self::expired_at(self.ttl, s, clock) && !s.values.is_empty());
        if live {
            return Ok(false);
        }
        self.update_loaded(key, 0, now, clock, whole, init, |_| ())?;
        Ok(true)
    }

    /// [`Self::update`] once [`Self::load`] made the cache hold what RocksDB has of the key at
    /// `ns` (`whole`: all of the key).
    #[allow(clippy::too_many_arguments)]
    fn update_loaded<R>(
        &mut self,
        key: &[u8],
        ns: i64,
        now: i64,
        clock: Watermark,
        whole: bool,
        init: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> Result<R> {
        let ttl = self.ttl;
        if self.backing.is_some() && self.keys.full_for(key) {
            // a new key would grow its shard's table: make room first if the budget says so
            self.evict_if_full(Some(key))?;
        }
        // a key created from here on is no longer absent (only new keys are listed there)
        let known_absent = !self.absent.is_empty() && self.absent.remove(key);
        // one lookup finds the key or makes room for it
        let charge = charge_of(key, self.avg_payload);
        let spilled = self.backing.as_ref().map(|b| &b.spilled);
        let (slot, fresh) = self.keys.get_or_insert_with(key, || Slot {
            touched: now,
            values: Namespaces::new(),
            dirty: false,
            persisted: false,
            // `load` found nothing at `ns`; unless it read the whole key, or a prefetch
            // found none of it, RocksDB may hold the key elsewhere (a one-value key has
            // nowhere else)
            partial: !whole
                && !known_absent
                && !self.one_value
                && spilled.is_some_and(|s| !s.is_empty() && s.may_hold(hash_key(key), ALL)),
            used: Use::Idle,
            charge,
        });
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
            self.entries -= Self::clear_slot(&mut self.backing, slot, key);
        }
        if ttl.is_some() && now > slot.touched {
            // every row of a key carries the key's deadline
            for e in slot.values.0.iter_mut() {
                e.dirty = true;
            }
        }
        slot.touched = slot.touched.max(now);
        Self::mark_dirty(&mut self.backing, slot, key);
        let (e, inserted) = slot.values.get_or_insert(ns, init);
        if inserted {
            self.entries += 1;
        }
        e.dirty = true;
        let r = f(&mut e.value);
        if fresh {
            self.account(0, charge as usize);
            self.charge_map();
        }
        self.since_sample += 1;
        if self.since_sample >= SAMPLE_EVERY {
            self.since_sample = 0;
            self.sample(key)?;
        }
        if fresh {
            // after the write, so eviction (which flushes first) cannot lose it
            self.evict_if_full(None)?;
        }
        self.bound_dirty()?;
        Ok(r)
    }

    /// Drops a key from memory once it holds nothing. If RocksDB holds rows of it, the empty
    /// slot stays as a tombstone until the next flush deletes them, so a read in between does
    /// not load them back.
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
        self.load(key, at(ns))?;
        let Some(slot) = self.keys.get_mut(key) else {
            return Ok(None);
        };
        let e = slot.values.remove(ns);
        if let Some(e) = &e {
            self.entries -= 1;
            Self::note_gone(&mut self.backing, key, e);
            Self::mark_dirty(&mut self.backing, slot, key);
        }
        self.drop_if_empty(key);
        self.bound_dirty()?;
        Ok(e.map(|e| e.value))
    }

    /// Removes every value of a key.
    pub fn remove_key(&mut self, key: &[u8]) -> Result<()> {
        self.load(key, ALL)?;
        if let Some(slot) = self.keys.get_mut(key) {
            self.entries -= Self::clear_slot(&mut self.backing, slot, key);
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
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        self.load(key, bounds)?;
        let ttl = self.ttl;
        let slot = self
            .keys
            .get(key)
            .filter(|s| !Self::expired_at(ttl, s, clock));
        Ok(slot.into_iter().flat_map(move |s| {
            s.values.0[s.values.bounds(bounds)]
                .iter()
                .map(|e| (e.ns, &e.value))
        }))
    }

    /// Changes values of a key with namespaces in `range`, with one access to the key: `f` is
    /// called with each one, in namespace order, and says whether it changed it; only the values
    /// it changed are rewritten at the next flush.
    pub fn modify(
        &mut self,
        key: &[u8],
        range: impl RangeBounds<i64>,
        mut f: impl FnMut(i64, &mut V) -> bool,
    ) -> Result<()> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        self.load(key, bounds)?;
        let Some(slot) = self.keys.get_mut(key) else {
            return Ok(());
        };
        let r = slot.values.bounds(bounds);
        let mut changed = false;
        for e in slot.values.0[r].iter_mut() {
            if f(e.ns, &mut e.value) {
                e.dirty = true;
                changed = true;
            }
        }
        if changed {
            Self::mark_dirty(&mut self.backing, slot, key);
        }
        self.bound_dirty()
    }

    /// Removes and returns the values of a key with namespaces in `range`.
    pub fn drain_range(
        &mut self,
        key: &[u8],
        range: impl RangeBounds<i64>,
    ) -> Result<Vec<(i64, V)>> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        self.load(key, bounds)?;
        let Some(slot) = self.keys.get_mut(key) else {
            return Ok(Vec::new());
        };
        let r = slot.values.bounds(bounds);
        let mut out = Vec::with_capacity(r.len());
        for e in slot.values.0.drain(r) {
            Self::note_gone(&mut self.backing, key, &e);
            out.push((e.ns, e.value));
        }
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
        if let Some(b) = &mut self.backing {
            b.backend.advance_clock(clock.0);
            b.spilled.expire(self.clock.0);
            self.charge_spilled();
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
            let Some(slot) = self.keys.get_mut(&key) else {
                continue;
            };
            if slot.values.is_empty() {
                continue;
            }
            let due = slot.touched.saturating_add(ttl);
            if due <= clock.0 {
                self.entries -= Self::clear_slot(&mut self.backing, slot, &key);
                self.drop_if_empty(&key);
                expired += 1;
            } else {
                self.deadlines.push(Reverse((due, key)));
            }
        }
        Ok(expired)
    }

    /// Writes every changed value to the backend and deletes the rows of removed ones (called
    /// before a snapshot and when evicting). A table in memory has nothing to write.
    pub fn flush(&mut self) -> Result<()> {
        self.publish_counts();
        let Some(b) = self.backing.as_mut() else {
            return Ok(());
        };
        let mut w = RowWriter {
            backend: b.backend.clone(),
            batch: rocksdb::WriteBatch::default(),
            table: b.table,
            ttl: self.ttl,
            clock: self.clock,
            version: self.version,
            buf: Vec::new(),
            row: Vec::new(),
            ns_range: b.written,
            tombstones: Vec::new(),
            removed_entries: 0,
            rows: 0,
            old_bytes: 0,
            new_bytes: 0,
            payloads: 0,
            written: 0,
        };
        // deletes first: a namespace removed and written again is written below
        for (key, ns) in std::mem::take(&mut b.gone) {
            w.batch.delete(b.row(&key, ns));
        }
        // Rows go in row-key order (key group, key length, key): RocksDB's memtable inserts a
        // run of ascending keys from where the last one went instead of searching from the top.
        // When many keys are dirty, one pass over the table finds them faster than a lookup
        // each (a lookup is a cache miss; the pass reads the table in order).
        // The order is decided by a number made of the key group, the key's length and its
        // first bytes, and only on a tie by the keys themselves: comparing the keys would read
        // each one where the table holds it, a cache miss per comparison.
        let maxp = b.backend.max_parallelism();
        let listed = std::mem::take(&mut b.dirty);
        if std::mem::take(&mut b.unlisted) || listed.len() > self.keys.capacity() / 16 {
            let mut dirty: Vec<(u128, KeyGroup, &StateKey, &mut Slot<V>)> = self
                .keys
                .iter_mut()
                .filter(|(_, s)| s.dirty)
                .map(|(k, s)| {
                    let kg = key_group(hash_key(k), maxp);
                    (write_order(kg, k), kg, k, s)
                })
                .collect();
            dirty.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| by_length(a.2, b.2)));
            for (_, kg, key, slot) in dirty {
                w.slot(kg, key, slot, &self.name)?;
            }
        } else {
            let mut dirty: Vec<(u128, KeyGroup, StateKey)> = listed
                .into_iter()
                .map(|k| {
                    let kg = key_group(hash_key(&k), maxp);
                    (write_order(kg, &k), kg, k)
                })
                .collect();
            dirty.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| by_length(&a.2, &b.2)));
            for (_, kg, key) in dirty {
                // absent: created and removed since the last flush, RocksDB never had it
                if let Some(slot) = self.keys.get_mut(&key) {
                    w.slot(kg, &key, slot, &self.name)?;
                }
            }
        }
        b.backend.write(w.batch)?;
        b.written = w.ns_range;
        self.rows_written += w.rows;
        self.entries -= w.removed_entries;
        self.account(w.old_bytes, w.new_bytes);
        if let Some(avg) = w.payloads.checked_div(w.written) {
            self.avg_payload = (self.avg_payload * 3 + avg) / 4;
        }
        for key in w.tombstones {
            self.forget(&key);
        }
        Ok(())
    }

    /// Keeps the lists of dirty keys and removed rows bounded. Keys created and dropped since
    /// the last flush (a join's rows that expired, a session that closed) stay listed: the list
    /// drops them first. If many keys are still dirty, the list is dropped and the next flush
    /// (at an eviction or a checkpoint) finds them by a pass over the cache: state that fits in
    /// memory is not written to RocksDB only to be changed or deleted again. Removed rows
    /// cannot be found again: past the limit they are written.
    fn bound_dirty(&mut self) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            return Ok(());
        };
        if b.dirty.len() + b.gone.len() <= DIRTY_LIMIT {
            return Ok(());
        }
        let keys = &self.keys;
        b.dirty
            .retain(|k| keys.get(&k[..]).is_some_and(|slot| slot.dirty));
        if b.gone.len() > DIRTY_LIMIT / 2 {
            self.flush()?;
        } else if b.dirty.len() > DIRTY_LIMIT / 2 {
            b.dirty = Vec::new();
            b.unlisted = true;
        }
        Ok(())
    }

    /// When a new key (`key`, if it is not yet cached) made the cache too large (by the job's
    /// memory or the table's key cap): writes dirty keys, then evicts a quarter of the cache by
    /// CLOCK (see the module's doc); or, if only the key's shard would grow past the budget,
    /// evicts that shard's keys below its half. The keys a sweep evicts go into the spill
    /// filters, which may grow a stage and put the cache over its budget again: a second sweep
    /// then gives that room back if it is still over (moving the map into a smaller table if the
    /// filters leave the keys too little), rather than the next new key.
    fn evict_if_full(&mut self, key: Option<&[u8]>) -> Result<()> {
        let filters = self.spill_charge;
        if self.evict_once(key)? && self.spill_charge > filters {
            self.evict_once(key)?;
        }
        Ok(())
    }

    /// One sweep of [`Self::evict_if_full`], if the cache is too large; whether it was.
    fn evict_once(&mut self, key: Option<&[u8]>) -> Result<bool> {
        let Some(b) = self.backing.as_ref() else {
            return Ok(false);
        };
        let cap = b.backend.cache_keys();
        let over_keys = self.keys.len() >= cap;
        // With no free bucket left, a new key makes its shard's table rehash: in place if it is
        // then at most half full, the new key counted (evicted keys leave buckets that are only
        // reclaimed then), else into a table twice the size. It may grow only if the budget
        // holds the map with every shard full of keys: the shards fill alike, and a map grown
        // with no room left for the keys it is made for evicts them as they come.
        let grows = key.filter(|k| self.keys.full_for(k)).and_then(|k| {
            let shard = self.keys.shard_of(k);
            let map = self.keys.shard(shard);
            let table = map.allocation_size();
            let half = full_capacity::<V>(table) / 2;
            (map.len() >= half).then(|| {
                let per_key = (self.bytes - self.map_charge - self.spill_charge)
                    .checked_div(self.keys.len())
                    .unwrap_or(0);
                let grown = self.map_charge + table;
                let full = grown + full_capacity::<V>(grown) * per_key + self.spill_charge;
                (shard, full)
            })
        });
        let memory = b.backend.memory();
        let over = over_keys || memory.must_evict(self.bytes);
        if !over && !grows.is_some_and(|(_, full)| memory.must_evict_at(self.bytes, full)) {
            return Ok(false);
        }
        // (the flush forgets keys whose rows it deleted, so the cache may already be smaller)
        self.flush()?;
        let (mut bytes, mut entries) = (0, 0);
        let mut shrink = None;
        if over {
            let want_keys = if over_keys {
                self.keys.len().saturating_sub(cap * 3 / 4)
            } else {
                0
            };
            let entry_bytes = self.bytes - self.map_charge - self.spill_charge;
            let want_bytes = entry_bytes / 4;
            shrink = self.smaller_map(want_keys, entry_bytes - want_bytes);
            let want_keys = match shrink {
                // at most half full in the smaller table
                Some(capacity) => want_keys.max(self.keys.len().saturating_sub(capacity / 2)),
                None => want_keys,
            };
            let start = self.sweep_from;
            self.sweep_from = (start + 1) % SHARDS;
            let shards = (start..start + SHARDS).map(|i| i % SHARDS);
            (_, bytes, entries) = self.sweep(shards, want_keys, want_bytes);
        }
        if let Some((full_shard, _)) = grows {
            // below half, rehashed in place (the buckets of evicted keys are not free until a
            // rehash: without one the shard would be full again a few keys later); the shards fill alike,
            // so the others past five eighths go below half with it: they then fill in step,
            // and the cache flushes once as they come full, not once per shard
            for shard in 0..SHARDS {
                let map = self.keys.shard(shard);
                let half = full_capacity::<V>(map.allocation_size()) / 2;
                if shard != full_shard && map.len() < half * 5 / 4 {
                    continue;
                }
                // to seven sixteenths, so that the rehash leaves room for more than a few keys
                let want = (map.len() + 1).saturating_sub(half - half / 8);
                if want > 0 {
                    let (_, b, e) = self.sweep([shard].into_iter(), want, 0);
                    (bytes, entries) = (bytes + b, entries + e);
                    self.keys.reclaim(shard, half);
                }
            }
        }
        self.entries -= entries;
        self.account(bytes, 0);
        if let Some(capacity) = shrink {
            self.keys.shrink_to(capacity);
            self.charge_map();
        }
        self.charge_spilled();
        Ok(true)
    }

    /// Evicts clean keys of `shards` by CLOCK (a key used since the last sweep is kept once)
    /// until `want_keys` keys and `want_bytes` bytes went, in two passes at most; returns the
    /// keys, bytes and entries evicted (the caller accounts for them).
    fn sweep(
        &mut self,
        shards: impl Iterator<Item = usize> + Clone,
        want_keys: usize,
        want_bytes: usize,
    ) -> (usize, usize, usize) {
        let (mut keys, mut bytes, mut entries) = (0, 0, 0);
        let spilled = &mut self
            .backing
            .as_mut()
            .expect("sweeps are of attached tables")
            .spilled;
        for _pass in 0..2 {
            for shard in shards.clone() {
                self.keys.retain_in(shard, |k, s| {
                    if (keys >= want_keys && bytes >= want_bytes) || s.dirty {
                        return true;
                    }
                    if s.used == Use::Used {
                        s.used = Use::Idle;
                        return true;
                    }
                    keys += 1;
                    bytes += s.charge as usize;
                    entries += s.values.len();
                    // a clean key's values all have their rows (the flush before wrote them)
                    let hash = hash_key(k);
                    for e in s.values.0.iter() {
                        spilled.evicted(hash, e.ns, s.touched);
                    }
                    false
                });
            }
            if keys >= want_keys && bytes >= want_bytes {
                break;
            }
        }
        (keys, bytes, entries)
    }

    /// The capacity of a smaller map's table, if the table must move into one: the map keeps
    /// its table's size when keys are evicted, and the spill filters grow as they are, so the
    /// two may come to leave the keys no room; evicting keys then no longer brings the cache
    /// under its budget, and every new key would sweep the whole table. `entry_bytes` is what
    /// the keys will be charged once this eviction is done. The table halves until the three
    /// fit (or it is as small as [`MIN_MAP_CAPACITY`] keys).
    fn smaller_map(&self, keep_keys: usize, entry_bytes: usize) -> Option<usize> {
        let b = self.backing.as_ref()?;
        let memory = b.backend.memory();
        let (mut capacity, mut map) = (self.keys.capacity(), self.map_charge);
        let kept = self.keys.len().saturating_sub(keep_keys).max(1);
        let per_key = entry_bytes / kept;
        let fits = |capacity: usize, map: usize| {
            let keys = kept.min(capacity / 2);
            !memory.must_evict_at(self.bytes, map + self.spill_charge + keys * per_key)
        };
        while capacity / 2 >= MIN_MAP_CAPACITY && !fits(capacity, map) {
            capacity /= 2;
            map /= 2;
        }
        (capacity < self.keys.capacity()).then_some(capacity)
    }

    /// Estimated bytes of the keys in memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds the accesses and RocksDB reads since the last call to the backend's counters, which
    /// the subtask's metrics read.
    fn publish_counts(&mut self) {
        if let Some(b) = &self.backing {
            publish(&b.backend, (self.lookups, self.reads), &mut self.published);
        }
    }

    /// Accesses so far (each looks in the cache, and reads RocksDB on a miss).
    pub fn lookups(&self) -> u64 {
        self.lookups
    }

    /// Keys read back from RocksDB into the cache so far (cache misses that found a row).
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// Cache misses that read RocksDB so far, whether or not they found rows (a miss that
    /// RocksDB cannot answer is not read; see [`spilled`](super::spilled)).
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Rows written to RocksDB so far (one per changed (key, namespace) per flush).
    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Every (key, namespace, value) in memory, keys in no particular order (tests and
    /// diagnostics).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], i64, &V)> {
        self.keys
            .iter()
            .flat_map(|(k, s)| s.values.0.iter().map(move |e| (k.as_ref(), e.ns, &e.value)))
    }

    /// Takes every (key, namespace, value) out of an attached table that has read nothing into
    /// memory yet, leaving it empty: for an operator that moves restored state into another
    /// kind of table when it opens. See [`Self::drain_each`], which does not hold it all.
    pub fn take_all(&mut self) -> Result<Vec<(StateKey, i64, V)>> {
        let mut rows = Vec::new();
        self.drain_each(|key, ns, value| {
            rows.push((key, ns, value));
            Ok(())
        })?;
        Ok(rows)
    }

    /// Calls `f` with every (key, namespace, value) of an attached table that has read nothing
    /// into memory yet, one at a time and each key's namespaces one after another, then
    /// deletes them: restored state moved into another kind of table without holding it all
    /// in memory.
    pub fn drain_each(&mut self, mut f: impl FnMut(StateKey, i64, V) -> Result<()>) -> Result<()> {
        let Some(b) = &self.backing else {
            return Err(self.error("drained before attach"));
        };
        if !self.keys.is_empty() {
            return Err(self.error("drained after values were read into memory"));
        }
        b.backend.for_each_in_table(b.table, |k, v| {
            let split = k.len().checked_sub(8);
            let ns = split.and_then(|s| k[s..].try_into().ok().map(backend::time_from_bytes));
            let key = split.and_then(|s| {
                backend::key_of_order(&[&[0, 0][..], &k[..s]].concat()).map(StateKey::from_slice)
            });
            let (Some(ns), Some(key)) = (ns, key) else {
                return Err(self.error(format!("a row key of {} bytes", k.len())));
            };
            f(key, ns, self.decode(v)?.1)
        })?;
        b.backend.clear_table(b.table)
    }

    /// Whether RocksDB may hold rows the cache lacks (some were evicted, or a snapshot was
    /// restored): then a pass over the whole table ([`Self::drain_next`]) reads it with far
    /// fewer block reads than a read per key.
    pub fn spills(&self) -> bool {
        self.backing.as_ref().is_some_and(|b| !b.spilled.is_empty())
    }

    /// A pass that takes every value out of an attached table, in row order
    /// ([`Self::drain_next`]).
    pub fn drain(&self) -> Result<TableDrain> {
        let Some(b) = &self.backing else {
            return Err(self.error("drained before attach"));
        };
        Ok(TableDrain {
            scan: backend::TableScan::new(b.table),
            cached: None,
        })
    }

    /// Takes up to `limit` more rows out of the table in row order (key group, key, namespace)
    /// and calls `f` with each one's key, namespace and value (values whose TTL passed are
    /// skipped); false once it took the last. Each call first writes what the cache holds dirty,
    /// so RocksDB holds the whole table, then reads the rows in order, deletes them with range
    /// tombstones and drops their keys from the cache: between calls the table is whole and
    /// consistent, may be snapshotted and used (a value written behind the pass stays). One
    /// ordered pass reads each block of RocksDB once, where reading the keys one by one, in
    /// any other order, reads a block per key.
    pub fn drain_next(
        &mut self,
        drain: &mut TableDrain,
        limit: usize,
        mut f: impl FnMut(StateKey, i64, V) -> Result<()>,
    ) -> Result<bool> {
        self.flush()?;
        let Some(backend) = self.backing.as_ref().map(|b| b.backend.clone()) else {
            return Err(self.error("drained before attach"));
        };
        let mut rows: Vec<(StateKey, i64, i64, V)> = Vec::new();
        let more = backend.drain_table(&mut drain.scan, limit, |row, value| {
            let Some((key, ns)) = backend::decode_row_key(row) else {
                return Err(self.error(format!("a row key of {} bytes", row.len())));
            };
            let (touched, value) = self.decode(value)?;
            rows.push((StateKey::from_slice(key), ns, touched, value));
            Ok(())
        })?;
        let ttl = self.ttl;
        for (key, ns, touched, value) in rows {
            if drain.cached.as_ref().is_none_or(|(k, _)| *k != key)
                && let Some(slot) = self.keys.remove(&key)
            {
                self.entries -= slot.values.len();
                self.account(slot.charge as usize, 0);
                let held = slot.values.0.iter().map(|e| e.ns).collect();
                drain.cached = Some((key.clone(), held));
            }
            let cached = match &drain.cached {
                Some((k, held)) if *k == key => held.contains(&ns),
                _ => false,
            };
            if !cached && let Some(b) = self.backing.as_mut() {
                // as if read back into the cache
                b.spilled.read_back(ns);
            }
            if ttl.is_some_and(|ttl| self.clock.0 >= touched.saturating_add(ttl)) {
                continue;
            }
            f(key, ns, value)?;
        }
        self.charge_spilled();
        Ok(more)
    }

    /// The key group a key of this table belongs to.
    pub fn key_groups_of(key: &[u8], max_parallelism: u32) -> KeyGroup {
        key_group(hash_key(key), max_parallelism)
    }
}

impl<V> Drop for KeyedTable<V> {
    fn drop(&mut self) {
        if let Some(b) = &self.backing {
            // the last accesses count too
            publish(&b.backend, (self.lookups, self.reads), &mut self.published);
            b.backend.memory().remove_table(self.bytes);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

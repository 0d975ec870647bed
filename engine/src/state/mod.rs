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
//! table and memory holds a bounded write-back cache of decoded keys in front of it: a read that
//! misses the cache loads the key's rows (one prefix seek; one point lookup for a table of one
//! value per key, [`KeyedTable::one_value`]) if RocksDB may hold any in the namespaces asked
//! for, which per-namespace filters of the evicted keys decide (`spilled`): a key new to a
//! window slice costs no read even after the slice outgrew the cache. After a restore, misses
//! read in the namespaces the table wrote before the snapshot (the instance records each
//! table's lowest and highest, [`backend::range_row`]), and not past them. A one-value table can
//! read a whole batch's keys ahead with one batched lookup ([`KeyedTable::prefetch`]), which
//! also remembers the keys RocksDB lacks, so the accesses that follow read nothing. Writes mark the
//! values they change dirty, and dirty values are written, one row per (key, namespace), when
//! the cache must evict and at every checkpoint ([`KeyedTable::flush`]). A window that adds to one slice rewrites that
//! slice's row, and a join that buffers one more timestamp writes one row, whatever else the key
//! holds.
//!
//! Keys alone, each with its touched time (a `keep: first` deduplication's), live in a
//! [`KeySet`] instead: 16 bytes per key in memory, and the rows of a one-value table.
//!
//! State whose namespaces every key shares and that comes due a namespace at a time (the slices
//! of tumbling and sliding windows) lives in a [`PaneTable`] instead: one hash table per
//! namespace, read in key order and dropped whole (see [`panes`]).
//!
//! **Versions.** Each row records the version of its value's encoding. An operator whose value
//! type changes declares the new version and how to read the older ones
//! ([`KeyedTable::versioned`]); rows are upgraded as they are read and written back in the new
//! encoding when next changed. State of the layouts before one row per namespace
//! ([`backend::FORMAT`] 0 and 1) is rewritten into the current layout when a table attaches to
//! an instance restored from it.
//!
//! **Cache.** The cache's hash table is charged by its allocation (which doubles as it grows
//! and does not shrink), and each cached key an estimate of what it holds besides (a long key,
//! and twice its last encoded size, or the table's average before it was first written), against
//! the job's [`StateMemory`]; a table that would double past the budget evicts down to half. When the table must give memory back it writes its dirty keys and
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
//! restore reads nothing up front. Touching a key rewrites all its rows, so they share one
//! deadline. A table in memory keeps a heap of deadlines and deletes expired keys when `expire`
//! is called.
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
use spilled::{ALL, NsRange, Spilled, WARM_PER_MISS, rows_for_prefetch};

pub mod backend;
mod bloom;
pub mod heap;
mod key_slots;
pub mod keyset;
mod losers;
pub mod memory;
mod pane_blocks;
pub mod panes;
mod spilled;
pub mod timers;

pub use backend::{CacheCounts, KeyedBackend, StateConfig};
pub use keyset::KeySet;
pub use memory::StateMemory;
pub use panes::{Merged, PaneColumns, PaneTable};
pub use timers::Timers;

/// Asks the CPU to start loading the cache line that holds `value`, for a loop that will read
/// it a few steps later. A loop over rows in key order reads each row's columns at random: a
/// cache miss apiece once a table outgrows the CPU's caches, which a hint some rows ahead
/// overlaps with the work on the rows between. A hint only; on other architectures nothing.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing the program sees and cannot fault; `value` is a valid
    // reference besides.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// What a table can hold: anything serde can write and read back.
pub trait StateValue: Serialize + DeserializeOwned + Send + 'static {}
impl<T: Serialize + DeserializeOwned + Send + 'static> StateValue for T {}

/// Reads a value written in an older encoding of a table's value type: called with the version
/// a row was written in (below the table's) and the row's value bytes.
pub type Upgrade<V> = fn(version: u8, bytes: &[u8]) -> std::result::Result<V, String>;

/// Rows of one key read from RocksDB: (namespace, touched, value, encoded size), in namespace
/// order; most reads find one.
type Rows<V> = SmallVec<[(i64, i64, V, usize); 1]>;

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
    /// The encoding version of the values this table writes, and how it reads older ones.
    version: u8,
    upgrade: Option<Upgrade<V>>,
    /// Holds one value per key, at namespace 0: a read is a point lookup, not a prefix seek.
    one_value: bool,
    keys: HashMap<StateKey, Slot<V>, Fixed>,
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

/// Accesses after which a table adds its cache counters to its backend's (the metrics read
/// those), so that counting costs no shared write per access.
const PUBLISH_EVERY: u64 = 4096;

/// Adds the accesses and RocksDB reads a table counted (`counts`) since those it `published`
/// to the backend's counters, which the subtask's metrics read.
fn publish(backend: &KeyedBackend, counts: (u64, u64), published: &mut (u64, u64)) {
    backend.count_cache(counts.0 - published.0, counts.1 - published.1);
    *published = counts;
}

/// Dirty keys after which a table writes them even if nothing asks it to (a job without
/// checkpoints still spills to RocksDB).
const DIRTY_LIMIT: usize = 1 << 18;

/// Every this many updates, the updated key's values are encoded to correct its charge and the
/// table's average (the charges of keys changed in place would otherwise stay as estimated).
const SAMPLE_EVERY: u32 = 32;

/// What a key set keeps aside for its spill filters once it evicts: the decoded caches' budget
/// over this (its index gives back room when they grow past it).
const FILTER_SHARE: usize = 4;

/// One spill filter takes at most the decoded caches' budget over this; past it, the misses of
/// its namespaces always read RocksDB (see [`spilled`]). A filter costs 2 bytes per evicted key
/// where the key in memory costs 16 or more, and without it every key new to the state is a
/// RocksDB read, so it may take room the keys had: at a quarter, a deduplication of 50M keys
/// gave its filter up after 22M evictions and read RocksDB for each of the 17M new keys after.
const FILTER_CAP: usize = 2;

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

/// Bytes of rows a flush or a spill writes at a time: a batch that grows to tens of megabytes
/// costs more in fresh pages than in RocksDB. A batch's buffer doubles as it grows, to twice
/// this at most, which stays below the size at which blocks get a mapping of their own (see
/// `heap`): a megabyte and more would be mapped and faulted in afresh for every batch.
const FLUSH_BATCH_BYTES: usize = 256 << 10;

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
    /// Keys written or removed since the last flush (a key may appear more than once).
    dirty: Vec<StateKey>,
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
            keys: HashMap::with_hasher(Fixed::default()),
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
        self.evict_if_full()?;
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
            b.dirty.push(key.into());
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
        if self.backing.is_some()
            && self.keys.len() >= self.keys.capacity()
            && !self.keys.contains_key(key)
        {
            // a new key would grow the map's table: make room first if the budget says so
            self.evict_if_full()?;
        }
        // a key created from here on is no longer absent (only new keys are listed there)
        let known_absent = !self.absent.is_empty() && self.absent.remove(key);
        // one lookup finds the key or makes room for it
        let charge = charge_of(key, self.avg_payload);
        let spilled = self.backing.as_ref().map(|b| &b.spilled);
        let (slot, fresh) = match self.keys.entry_ref(key) {
            hashbrown::hash_map::EntryRef::Occupied(e) => (e.into_mut(), false),
            hashbrown::hash_map::EntryRef::Vacant(e) => (
                e.insert(Slot {
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
            self.evict_if_full()?;
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
        if listed.len() > self.keys.capacity() / 16 {
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

    /// Keeps the list of dirty keys bounded (a job without checkpoints still spills to RocksDB,
    /// and memory stays bounded). Keys created and dropped since the last flush (a join's rows
    /// that expired, a session that closed) stay listed: the list drops them first, and the
    /// table writes only if the keys still dirty are many, so state that lives briefly is not
    /// written to RocksDB only to be deleted again.
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
        if b.dirty.len() + b.gone.len() > DIRTY_LIMIT / 2 {
            self.flush()?;
        }
        Ok(())
    }

    /// When a new key made the cache too large (by the job's memory or the table's key cap):
    /// writes dirty keys, then evicts a quarter of the cache by CLOCK (see the module's doc).
    fn evict_if_full(&mut self) -> Result<()> {
        let Some(b) = self.backing.as_ref() else {
            return Ok(());
        };
        let cap = b.backend.cache_keys();
        let over_keys = self.keys.len() >= cap;
        // With no free bucket left, the next new key makes the table rehash: in place while it
        // is at most half full (evicted keys leave buckets that are only reclaimed then), else
        // into a table twice the size.
        let half = full_capacity::<V>(self.map_charge) / 2;
        let doubles = self.keys.len() >= self.keys.capacity() && self.keys.len() > half;
        let projected = if doubles {
            self.bytes + self.map_charge
        } else {
            self.bytes
        };
        if !over_keys && !b.backend.memory().must_evict(projected) {
            return Ok(());
        }
        // (the flush forgets keys whose rows it deleted, so the cache may already be smaller)
        self.flush()?;
        let mut want_keys = if over_keys {
            self.keys.len().saturating_sub(cap * 3 / 4)
        } else {
            0
        };
        if doubles {
            // down to half, so the rehash stays in place
            want_keys = want_keys.max(self.keys.len().saturating_sub(half));
        }
        let entry_bytes = self.bytes - self.map_charge - self.spill_charge;
        let want_bytes = entry_bytes / 4;
        let shrink = self.smaller_map(want_keys, entry_bytes - want_bytes);
        if let Some(capacity) = shrink {
            // at most half full in the smaller table
            want_keys = want_keys.max(self.keys.len().saturating_sub(capacity / 2));
        }
        let (mut keys, mut bytes, mut entries) = (0, 0, 0);
        let spilled = &mut self.backing.as_mut().expect("checked above").spilled;
        for _sweep in 0..2 {
            self.keys.retain(|k, s| {
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
                // a clean key's values all have their rows (the flush above wrote them)
                let hash = hash_key(k);
                for e in s.values.0.iter() {
                    spilled.evicted(hash, e.ns, s.touched);
                }
                false
            });
            if keys >= want_keys && bytes >= want_bytes {
                break;
            }
        }
        self.entries -= entries;
        self.account(bytes, 0);
        if let Some(capacity) = shrink {
            self.keys.shrink_to(capacity);
            self.charge_map();
        }
        self.charge_spilled();
        Ok(())
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
    /// RocksDB cannot answer is not read; see [`spilled`]).
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
    /// kind of table when it opens.
    pub fn take_all(&mut self) -> Result<Vec<(StateKey, i64, V)>> {
        let Some(b) = &self.backing else {
            return Err(self.error("take_all before attach"));
        };
        if !self.keys.is_empty() {
            return Err(self.error("take_all after values were read into memory"));
        }
        let mut rows: Vec<(StateKey, i64, Vec<u8>)> = Vec::new();
        b.backend.for_each_in_table(b.table, |k, v| {
            let split = k.len().checked_sub(8);
            let ns = split.and_then(|s| k[s..].try_into().ok().map(backend::time_from_bytes));
            let key = split.and_then(|s| {
                backend::key_of_order(&[&[0, 0][..], &k[..s]].concat()).map(StateKey::from_slice)
            });
            let (Some(ns), Some(key)) = (ns, key) else {
                return Err(self.error(format!("a row key of {} bytes", k.len())));
            };
            rows.push((key, ns, v.to_vec()));
            Ok(())
        })?;
        b.backend.clear_table(b.table)?;
        rows.into_iter()
            .map(|(key, ns, v)| Ok((key, ns, self.decode(&v)?.1)))
            .collect()
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
pub(crate) mod tests {
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

    pub(crate) fn config(dir: &std::path::Path, cache_keys: usize) -> StateConfig {
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

    /// Copies of snapshot directories (a restore consumes the parts it is given), named
    /// `<name>-<i>` in `dir`.
    pub(crate) fn copy_parts(
        parts: &[(std::path::PathBuf, crate::KeyGroupRange)],
        dir: &std::path::Path,
        name: &str,
    ) -> Vec<(std::path::PathBuf, crate::KeyGroupRange)> {
        parts
            .iter()
            .enumerate()
            .map(|(i, (p, r))| {
                let c = dir.join(format!("{name}-{i}"));
                std::fs::create_dir_all(&c).unwrap();
                for f in std::fs::read_dir(p).unwrap() {
                    let f = f.unwrap();
                    std::fs::copy(f.path(), c.join(f.file_name())).unwrap();
                }
                (c, *r)
            })
            .collect()
    }

    /// A row as layouts 0 and 1 wrote it: deadline, touched, then every namespace of the key.
    fn legacy_row<V: StateValue>(touched: i64, values: &[(i64, V)]) -> Vec<u8> {
        let mut row = i64::MAX.to_be_bytes().to_vec();
        row.extend_from_slice(&touched.to_be_bytes());
        postcard::to_extend(values, row).unwrap()
    }

    /// A snapshot in `dir` of an instance of layout 1 (all key groups) whose table `table`
    /// holds `rows`: (key, touched, every namespace's value).
    pub(crate) fn layout_1_snapshot<V: StateValue>(
        dir: &std::path::Path,
        table: &str,
        rows: impl Iterator<Item = (Vec<u8>, i64, Vec<(i64, V)>)>,
    ) -> std::path::PathBuf {
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let old = KeyedBackend::open(&dir.join("old"), &config(dir, 1000), range, 128).unwrap();
        old.set_format(1);
        let mut batch = rocksdb::WriteBatch::default();
        for (k, touched, values) in rows {
            let kg = key_group(hash_key(&k), 128);
            batch.put(
                backend::legacy_row_key(kg, backend::table_id(table), &k),
                legacy_row(touched, &values),
            );
        }
        old.write(batch).unwrap();
        let snap = dir.join("snap");
        old.checkpoint(&snap).unwrap();
        snap
    }

    /// An empty instance in `dir` whose decoded caches hold at most `cache_keys` keys per
    /// table.
    pub(crate) fn capped_backend(dir: &std::path::Path, cache_keys: usize) -> Arc<KeyedBackend> {
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        Arc::new(KeyedBackend::open(&dir.join("db"), &config(dir, cache_keys), range, 128).unwrap())
    }

    /// An empty instance in `dir` with a table attached.
    fn attached<V: StateValue>(
        dir: &std::path::Path,
        cache_keys: usize,
    ) -> (Arc<KeyedBackend>, KeyedTable<V>) {
        let backend = capped_backend(dir, cache_keys);
        let mut t = KeyedTable::new("t", None);
        t.attach(&backend).unwrap();
        (backend, t)
    }

    /// An empty instance in `dir` with a table of one `u64` per key attached.
    fn one_value_table(
        dir: &std::path::Path,
        cache_keys: usize,
    ) -> (Arc<KeyedBackend>, KeyedTable<u64>) {
        let backend = capped_backend(dir, cache_keys);
        let mut t = KeyedTable::one_value("t", None);
        t.attach(&backend).unwrap();
        (backend, t)
    }

    /// A restored one-value table reads its snapshot's keys, 16 per key a prefetch asks for, and
    /// tells the spill filters of them: once it has read them all, a key new to it reads
    /// nothing from RocksDB (before, every miss did for as long as the job ran), and every
    /// restored value is found.
    #[test]
    fn a_restored_one_value_table_learns_its_keys_and_new_keys_stop_reading_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let (backend, mut t) = one_value_table(dir.path(), 1000);
        let n = 20_000u32;
        for i in 0..n {
            t.update(&key(i), 0, 0, Watermark::MIN, || u64::from(i), |_| ())
                .unwrap();
        }
        t.flush().unwrap();
        let restored = snapshot_and_restore(&backend, dir.path(), &cfg);
        let mut back: KeyedTable<u64> = KeyedTable::one_value("t", None);
        back.attach(&restored).unwrap();
        // batches of new keys, each prefetched as the operator does
        let mut next = n;
        let mut batch = |t: &mut KeyedTable<u64>| {
            let keys: Vec<Vec<u8>> = (next..next + 500).map(key).collect();
            t.prefetch(keys.iter().map(|k| &k[..])).unwrap();
            for k in &keys {
                assert!(t.insert_if_absent(k, 0, Watermark::MIN, || 7).unwrap());
            }
            next += 500;
        };
        let mut batches = 0;
        while back.backing.as_ref().unwrap().scan.is_some() {
            batch(&mut back);
            batches += 1;
            assert!(batches <= 4, "still reading the snapshot");
        }
        // 8 000 rows a prefetch of 500 keys
        assert!(batches >= 2, "{batches} batches for 20 000 rows");
        let reads = back.reads();
        for _ in 0..20 {
            batch(&mut back);
        }
        let new_reads = back.reads() - reads;
        assert!(new_reads < 100, "{new_reads} reads for 10 000 new keys");
        for i in (0..n).step_by(13) {
            let v = back.get(&key(i), 0, Watermark::MIN).unwrap().copied();
            assert_eq!(v, Some(u64::from(i)), "key {i}");
        }
        for i in (n..next).step_by(13) {
            assert_eq!(
                back.get(&key(i), 0, Watermark::MIN).unwrap().copied(),
                Some(7)
            );
        }
    }

    /// A restored table of several values per key, whose operator does not prefetch (a join's
    /// buffers), reads its snapshot's rows at the misses in their namespaces, 64 a miss: once
    /// it has read them all, a key new to those namespaces reads nothing from RocksDB (before,
    /// every such miss did until time passed the namespaces), and every restored row is found.
    #[test]
    fn a_restored_table_learns_its_rows_at_its_misses() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let (backend, mut t) = attached::<u64>(dir.path(), 1000);
        let n = 10_000u32;
        for i in 0..n {
            for ns in [10, 20] {
                t.update(
                    &key(i),
                    ns,
                    0,
                    Watermark::MIN,
                    || u64::from(i) + ns as u64,
                    |_| (),
                )
                .unwrap();
            }
        }
        t.flush().unwrap();
        let restored = snapshot_and_restore(&backend, dir.path(), &cfg);
        let mut back: KeyedTable<u64> = KeyedTable::new("t", None);
        back.attach(&restored).unwrap();
        // new keys probed over the restored namespaces, as a join probes its other side
        let mut next = n;
        let mut probe = |t: &mut KeyedTable<u64>, keys: u32| {
            for i in next..next + keys {
                assert_eq!(t.range(&key(i), 0..=30, Watermark::MIN).unwrap().count(), 0);
            }
            next += keys;
        };
        probe(&mut back, 100);
        assert_eq!(
            back.reads(),
            100,
            "each miss reads while the namespaces are unknown"
        );
        let mut misses = 100;
        while back.backing.as_ref().unwrap().scan.is_some() {
            probe(&mut back, 100);
            misses += 100;
            assert!(
                misses <= 400,
                "still reading the snapshot after {misses} misses"
            );
        }
        // 20 000 rows at 64 a miss
        assert!(misses >= 300, "{misses} misses read 20 000 rows");
        let reads = back.reads();
        probe(&mut back, 10_000);
        let new_reads = back.reads() - reads;
        assert!(new_reads < 200, "{new_reads} reads for 10 000 new keys");
        for i in (0..n).step_by(7) {
            let rows: Vec<(i64, u64)> = back
                .range(&key(i), 0..=30, Watermark::MIN)
                .unwrap()
                .map(|(ns, v)| (ns, *v))
                .collect();
            let i = u64::from(i);
            assert_eq!(rows, vec![(10, i + 10), (20, i + 20)], "key {i}");
        }
    }

    #[test]
    fn keys_created_and_dropped_between_flushes_are_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let (_backend, mut t) = attached::<u64>(dir.path(), 1000);
        // a join's rows, say: each key lives for 100 others, far more keys than the dirty
        // list's bound pass through
        let key = |i: usize| (i as u64).to_be_bytes();
        for i in 0..DIRTY_LIMIT + 50_000 {
            t.update(&key(i), 0, 0, Watermark::MIN, || 0, |v| *v += 1)
                .unwrap();
            if i >= 100 {
                assert_eq!(t.remove(&key(i - 100), 0).unwrap(), Some(1));
            }
        }
        assert_eq!(t.rows_written(), 0, "short-lived keys were written");
        let live: Vec<u64> = (DIRTY_LIMIT + 49_900..DIRTY_LIMIT + 50_000)
            .map(|i| *t.get(&key(i), 0, Watermark::MIN).unwrap().unwrap())
            .collect();
        assert_eq!(live, vec![1; 100]);
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
        let (_backend, mut t) = attached::<Vec<i64>>(dir.path(), 10);
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
        let nine = namespaces(&mut t, &key(9));
        assert_eq!(nine, vec![5], "no namespace of the removed row comes back");
        t.flush().unwrap();
        assert!(t.get(&key(7), 0, Watermark::MIN).unwrap().is_none());
        assert_eq!(t.get(&key(8), 2, Watermark::MIN).unwrap(), Some(&vec![8]));
    }

    /// The backend's cache counters (what the subtask's metrics report) add up every table
    /// access and every RocksDB read, once the table flushed.
    #[test]
    fn cache_lookups_and_misses_reach_the_backend() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, mut t) = attached::<i64>(dir.path(), 1000);
        let n = 5000u32;
        for round in 0..2 {
            for i in 0..n {
                t.update(&key(i), 1, 0, Watermark::MIN, || 0, |v| *v += round)
                    .unwrap();
            }
        }
        t.flush().unwrap();
        let size = backend.size();
        assert_eq!(size.cache_lookups, t.lookups());
        assert_eq!(size.cache_lookups, 2 * n as u64);
        assert_eq!(size.cache_misses, t.reads());
        // the second round found most keys evicted by the first: they were read back
        assert!(t.reads() > n as u64 / 2, "{} reads", t.reads());
        // between flushes the counts reach the backend every few thousand accesses
        for i in 0..PUBLISH_EVERY as u32 {
            t.get(&key(i % 100), 1, Watermark::MIN).unwrap();
        }
        let published = backend.size().cache_lookups;
        assert!(
            published > size.cache_lookups && published + PUBLISH_EVERY > t.lookups(),
            "{published} of {} lookups published",
            t.lookups()
        );
    }

    /// A cache miss reads RocksDB only where evicted rows may be: keys new to a namespace cost
    /// no read once they are past what was evicted, a key evicted in one namespace and written
    /// in another still shows both, a row removed before the flush does not come back when the
    /// rest of its key is read, and a namespace whose rows were all read back is forgotten.
    #[test]
    fn misses_read_rocksdb_only_where_evicted_rows_may_be() {
        let dir = tempfile::tempdir().unwrap();
        let (_backend, mut t) = attached::<i64>(dir.path(), 1000);
        let n = 5000u32;
        for i in 0..n {
            t.update(&key(i), 1, 0, Watermark::MIN, || 0, |v| *v = i as i64)
                .unwrap();
        }
        // each key is new: a read is a false positive of the filter of evicted keys (1%)
        assert!(t.reads() < n as u64 / 50, "{} reads", t.reads());
        assert!(t.keys.len() <= 1000, "keys were evicted: {}", t.keys.len());
        // keys new to the table, in a namespace nothing was evicted from yet
        for i in n..2 * n {
            t.update(&key(i), 2, 0, Watermark::MIN, || 0, |v| *v = i as i64)
                .unwrap();
        }
        // a miss reads only when a filter says the key may have been evicted: about 1%;
        // reading every miss would be 5000
        let reads = t.reads();
        assert!(reads < n as u64 / 25, "{reads} reads");
        // the first keys again, in the second namespace: each must still show its first row
        for i in 0..n {
            t.update(&key(i), 2, 0, Watermark::MIN, || 0, |v| *v = -(i as i64))
                .unwrap();
        }
        // nor does writing at 2 a key evicted with a row at 1: the slot is partial
        assert!(
            t.reads() - reads < n as u64 / 25,
            "{} reads",
            t.reads() - reads
        );
        for i in (0..2 * n).step_by(7) {
            let got: Vec<(i64, i64)> = t
                .range(&key(i), .., Watermark::MIN)
                .unwrap()
                .map(|(ns, v)| (ns, *v))
                .collect();
            let want = if i < n {
                vec![(1, i as i64), (2, -(i as i64))]
            } else {
                vec![(2, i as i64)]
            };
            assert_eq!(got, want, "key {i}");
        }
        // a key evicted with rows at 1 and 2, then written at 3 without reading RocksDB: its
        // row at 3 is written and removed, and reading the whole key must not bring it back
        let k = (0..n)
            .map(key)
            .find(|k| !t.keys.contains_key(&k[..]))
            .expect("most keys were evicted");
        let reads = t.reads();
        t.update(&k, 3, 0, Watermark::MIN, || 0, |v| *v = 33)
            .unwrap();
        assert_eq!(t.reads(), reads, "nothing was evicted at 3");
        assert!(t.keys.get(&k[..]).unwrap().partial);
        t.flush().unwrap();
        assert_eq!(t.remove(&k, 3).unwrap(), Some(33));
        let got = namespaces(&mut t, &k);
        assert_eq!(got, vec![1, 2], "the removed row stays removed");
        assert_eq!(t.reads(), reads + 1);
        // every row at 1 read back and removed: namespace 1 is forgotten
        for i in 0..n {
            t.drain_range(&key(i), ..=1).unwrap();
        }
        let spilled = &t.backing.as_ref().unwrap().spilled;
        assert!(
            (0..1000).all(|i| !spilled.may_hold(hash_key(&key(i)), at(1))),
            "namespace 1 is still counted"
        );
    }

    /// A join buffers each row under its own millisecond: a small cache evicts a row or two
    /// of each of thousands of namespaces. A key new to the table must still not read
    /// RocksDB (only, rarely, a filter's false positive), and an evicted one must.
    #[test]
    fn keys_new_to_a_table_of_many_evicted_namespaces_skip_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        let (_backend, mut t) = attached::<i64>(dir.path(), 16);
        let n = 5_000u32;
        for i in 0..n {
            t.update(
                &key(i),
                i as i64,
                0,
                Watermark::MIN,
                || 0,
                |v| *v = i as i64,
            )
            .unwrap();
        }
        let reads = t.reads();
        for j in n..n + 1_000 {
            let lo = j as i64 - 2_000;
            let got = t
                .range(&key(j), lo..=j as i64, Watermark::MIN)
                .unwrap()
                .count();
            assert_eq!(got, 0);
        }
        let new = t.reads() - reads;
        assert!(new <= 20, "{new} of 1 000 new keys read RocksDB");
        let reads = t.reads();
        let got: Vec<(i64, i64)> = t
            .range(&key(n - 1_500), (n as i64 - 2_000).., Watermark::MIN)
            .unwrap()
            .map(|(ns, v)| (ns, *v))
            .collect();
        assert_eq!(got, vec![(n as i64 - 1_500, n as i64 - 1_500)]);
        assert_eq!(t.reads(), reads + 1, "an evicted key is read back");
    }

    /// A tiny cache in front of RocksDB answers every read as a map holding everything would,
    /// through evictions, partial keys, removals and flushes in random order.
    #[test]
    fn a_cache_too_small_for_its_keys_answers_as_a_map_would() {
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().unwrap();
        let (_backend, mut t) = attached::<i64>(dir.path(), 16);
        let mut model: BTreeMap<u32, BTreeMap<i64, i64>> = BTreeMap::new();
        // a fixed xorshift, so a failure repeats
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for step in 0..40_000u32 {
            let k = next(200) as u32;
            let ns = next(8) as i64;
            let kb = key(k);
            match next(10) {
                0..=4 => {
                    let v = step as i64;
                    t.update(&kb, ns, 0, Watermark::MIN, || 0, |x| *x += v)
                        .unwrap();
                    *model.entry(k).or_default().entry(ns).or_default() += v;
                }
                5 => {
                    let got = t.remove(&kb, ns).unwrap();
                    let want = model.get_mut(&k).and_then(|m| m.remove(&ns));
                    assert_eq!(got, want, "step {step}: remove {k} {ns}");
                }
                6 => {
                    let got: Vec<(i64, i64)> = t.drain_range(&kb, ..ns).unwrap();
                    let m = model.entry(k).or_default();
                    let keep = m.split_off(&ns);
                    let want: Vec<(i64, i64)> = std::mem::replace(m, keep).into_iter().collect();
                    assert_eq!(got, want, "step {step}: drain {k} ..{ns}");
                }
                7 => t.flush().unwrap(),
                8 if next(20) == 0 => {
                    t.remove_key(&kb).unwrap();
                    model.remove(&k);
                }
                _ => {
                    let got: Vec<(i64, i64)> = t
                        .range(&kb, ns.., Watermark::MIN)
                        .unwrap()
                        .map(|(n, v)| (n, *v))
                        .collect();
                    let want: Vec<(i64, i64)> = model
                        .get(&k)
                        .map(|m| m.range(ns..).map(|(n, v)| (*n, *v)).collect())
                        .unwrap_or_default();
                    assert_eq!(got, want, "step {step}: range {k} {ns}..");
                }
            }
        }
        assert!(t.reads() > 0 && t.keys.len() <= 16 + 1);
        for (k, m) in &model {
            let got: Vec<(i64, i64)> = t
                .range(&key(*k), .., Watermark::MIN)
                .unwrap()
                .map(|(n, v)| (n, *v))
                .collect();
            assert_eq!(got, m.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>());
        }
    }

    /// Reading a batch's keys ahead answers as reading each key when asked would, through
    /// evictions, removals and flushes in random order: in particular a key read ahead as
    /// absent, then created and evicted within the same batch, is found again.
    #[test]
    fn a_batch_read_ahead_answers_as_reads_one_at_a_time() {
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().unwrap();
        let (_backend, mut t) = one_value_table(dir.path(), 24);
        let mut model: BTreeMap<u32, u64> = BTreeMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        let mut absent_seen = 0;
        for round in 0..2_000u64 {
            let batch: Vec<u32> = (0..40).map(|_| next(300) as u32).collect();
            let keys: Vec<Vec<u8>> = batch.iter().map(|&k| key(k)).collect();
            t.prefetch(keys.iter().map(|k| &k[..])).unwrap();
            absent_seen += t.absent.len();
            for (&k, kb) in batch.iter().zip(&keys) {
                match next(20) {
                    0..=9 => {
                        let v = round * 100 + next(100);
                        t.update(kb, 0, 0, Watermark::MIN, || 0, |x| *x = v)
                            .unwrap();
                        model.insert(k, v);
                    }
                    10 => {
                        t.remove_key(kb).unwrap();
                        model.remove(&k);
                    }
                    11 => t.flush().unwrap(),
                    12..=14 => {
                        let fresh = t.insert_if_absent(kb, 0, Watermark::MIN, || 7).unwrap();
                        assert_eq!(fresh, !model.contains_key(&k), "round {round}: key {k}");
                        model.entry(k).or_insert(7);
                    }
                    _ => {
                        let got = t.get(kb, 0, Watermark::MIN).unwrap().copied();
                        assert_eq!(got, model.get(&k).copied(), "round {round}: key {k}");
                    }
                }
            }
        }
        assert!(
            absent_seen > 1000,
            "keys read ahead as absent: {absent_seen}"
        );
        for (k, v) in &model {
            assert_eq!(t.get(&key(*k), 0, Watermark::MIN).unwrap(), Some(v));
        }
    }

    /// After a batch is read ahead, asking for its keys reads nothing more: the keys RocksDB
    /// held are cached, and the ones it lacks are known to be absent.
    #[test]
    fn keys_read_ahead_cost_no_read_when_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let (_backend, mut t) = one_value_table(dir.path(), 1000);
        for i in 0..5000 {
            t.update(&key(i), 0, 0, Watermark::MIN, || 0, |v| *v = i as u64)
                .unwrap();
        }
        // keys removed after they were evicted: the filters of evicted keys still let them
        // through
        for i in 0..200 {
            t.remove_key(&key(i)).unwrap();
        }
        t.flush().unwrap();
        // evicted keys, removed ones, and keys never written
        let batch: Vec<Vec<u8>> = (0..400).chain(10_000..30_000).map(key).collect();
        let reads = t.reads();
        t.prefetch(batch.iter().map(|k| &k[..])).unwrap();
        let read_ahead = t.reads() - reads;
        assert!(read_ahead > 100, "{read_ahead} keys read ahead");
        assert!(!t.absent.is_empty(), "no key was read ahead as absent");
        for (i, k) in (0..400).chain(10_000..30_000).zip(&batch) {
            let want = (200..5000).contains(&i).then_some(i as u64);
            assert_eq!(
                t.get(k, 0, Watermark::MIN).unwrap().copied(),
                want,
                "key {i}"
            );
        }
        assert_eq!(t.reads() - reads, read_ahead, "asking read again");
    }

    /// Each (key, namespace) is a row of its own: changing one namespace of a key that holds many
    /// rewrites one row, removing one deletes one row, and keys whose encodings are prefixes of
    /// each other keep their rows apart.
    #[test]
    fn one_row_per_namespace_and_a_flush_writes_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, mut t) = attached::<String>(dir.path(), 1);
        let id = backend::value_table_id("t");
        // "k" is a prefix of the others' encodings, and "k\0" of the last
        let keys: [&[u8]; 3] = [b"k", b"k\0", b"k\0\0\0\0\0\0\0\0"];
        for (i, k) in keys.iter().enumerate() {
            for ns in 0..100 {
                t.update(k, ns, 0, Watermark::MIN, || format!("{i}/{ns}"), |_| ())
                    .unwrap();
            }
        }
        t.flush().unwrap();
        assert_eq!(
            backend.scan(id).unwrap().len(),
            300,
            "one row per namespace"
        );
        let written = t.rows_written();
        assert_eq!(written, 300);
        // a cache of one key: every key below is read back from RocksDB
        t.update(keys[0], 42, 0, Watermark::MIN, String::new, |v| v.push('!'))
            .unwrap();
        t.remove(keys[1], 7).unwrap();
        t.flush().unwrap();
        assert_eq!(
            t.rows_written() - written,
            1,
            "one changed namespace, one row"
        );
        assert_eq!(
            backend.scan(id).unwrap().len(),
            299,
            "the removed namespace's row is gone"
        );
        for (i, k) in keys.iter().enumerate() {
            let got: Vec<(i64, String)> = t
                .range(k, .., Watermark::MIN)
                .unwrap()
                .map(|(ns, v)| (ns, v.clone()))
                .collect();
            let want: Vec<(i64, String)> = (0..100)
                .filter(|ns| !(i == 1 && *ns == 7))
                .map(|ns| {
                    let bang = if i == 0 && ns == 42 { "!" } else { "" };
                    (ns, format!("{i}/{ns}{bang}"))
                })
                .collect();
            assert_eq!(got, want, "key {i}");
        }
        assert!(t.loads() >= 3, "the keys were read back: {}", t.loads());
        // a namespace removed and written again before the flush is written, not deleted
        t.remove(keys[2], 3).unwrap();
        t.update(keys[2], 3, 0, Watermark::MIN, || "again".into(), |_| ())
            .unwrap();
        t.remove_key(keys[0]).unwrap();
        t.flush().unwrap();
        assert_eq!(backend.scan(id).unwrap().len(), 199);
        assert_eq!(t.range(keys[0], .., Watermark::MIN).unwrap().count(), 0);
        assert_eq!(
            t.get(keys[2], 3, Watermark::MIN)
                .unwrap()
                .map(String::as_str),
            Some("again")
        );
    }

    /// Values of a restored snapshot of `snap` (taken of an instance over `range`), by key.
    fn snapshot_values(
        dir: &std::path::Path,
        snap: std::path::PathBuf,
        keys: impl Iterator<Item = Vec<u8>>,
    ) -> Vec<Option<u64>> {
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let restored = Arc::new(
            KeyedBackend::restore(
                &dir.join(format!("restored-{}", snap.display().to_string().len())),
                &config(dir, 100_000),
                range,
                128,
                vec![(snap, range)],
            )
            .unwrap(),
        );
        let mut t: KeyedTable<u64> = KeyedTable::one_value("t", None);
        t.attach(&restored).unwrap();
        keys.map(|k| t.get(&k, 0, Watermark::MIN).unwrap().copied())
            .collect()
    }

    /// Begins a snapshot of `backend` and takes it into `snap` on another thread after
    /// `delay`; the thread returns the snapshot's files.
    fn take_later(
        backend: &Arc<KeyedBackend>,
        snap: &std::path::Path,
        delay: Duration,
    ) -> std::thread::JoinHandle<Vec<(String, u64)>> {
        let pending = backend.begin_snapshot().unwrap();
        let snap = snap.to_path_buf();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            pending.take(&snap).unwrap()
        })
    }

    /// Sets keys 0 to `n` of `t` to `v`.
    fn set_all(t: &mut KeyedTable<u64>, n: u32, v: u64) {
        for i in 0..n {
            t.update(&key(i), 0, 0, Watermark::MIN, || v, |x| *x = v)
                .unwrap();
        }
    }

    /// The values RocksDB holds for table `id` of `b`, in row order.
    fn stored_values(b: &KeyedBackend, id: [u8; 4]) -> Vec<u64> {
        b.scan(id)
            .unwrap()
            .iter()
            .map(|(_, v)| postcard::from_bytes(&v[backend::HEADER..]).unwrap())
            .collect()
    }

    /// A snapshot's rows are written, and its files linked, by another thread while the
    /// subtask goes on: the subtask's reads wait for the rows, its writes for the links, and
    /// the snapshot holds the state at its barrier, not what the subtask did meanwhile.
    #[test]
    fn a_snapshot_taken_off_the_subtask_thread_holds_the_state_at_its_barrier() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, mut t) = one_value_table(dir.path(), 100_000);
        let id = backend::value_table_id("t");
        // more than one batch of rows (`FLUSH_BATCH_BYTES`), so the kept rows are several batches
        let n = 40_000u32;
        let set = |t: &mut KeyedTable<u64>, v: u64| set_all(t, n, v);
        let stored = |b: &KeyedBackend| stored_values(b, id);
        set(&mut t, 1);
        t.flush().unwrap();
        // the barrier: every key changes to 2, and the snapshot's flush keeps the rows aside
        set(&mut t, 2);
        backend.defer_writes();
        t.flush().unwrap();
        assert!(stored(&backend).iter().all(|v| *v == 1), "not written yet");
        assert!(
            backend.deferred_batches() > 1,
            "rows kept in several batches"
        );
        let snap = dir.path().join("snap");
        let taker = take_later(&backend, &snap, Duration::from_millis(300));
        // a read waits for the snapshot's rows
        let read = stored(&backend);
        assert_eq!(read.len(), n as usize);
        assert!(
            read.iter().all(|v| *v == 2),
            "a read saw the rows before the barrier"
        );
        // after the barrier: new values, a removed key; the flush waits for the links
        set(&mut t, 3);
        t.remove_key(&key(0)).unwrap();
        t.flush().unwrap();
        let files = taker.join().unwrap();
        assert!(files.iter().any(|(f, _)| f.ends_with(".sst")));
        let live = stored(&backend);
        assert_eq!(live.len(), n as usize - 1);
        assert!(live.iter().all(|v| *v == 3));
        let in_snapshot = snapshot_values(dir.path(), snap, (0..n).map(key));
        assert!(
            in_snapshot.iter().all(|v| *v == Some(2)),
            "the snapshot holds the barrier's values"
        );
    }

    /// Rows a snapshot's flush writes past what may be kept in memory go into RocksDB on the
    /// subtask's thread, and the snapshot still holds exactly the state at its barrier. A
    /// snapshot dropped before it is taken (its checkpoint given up) still writes the rows it
    /// kept, which the tables count as written.
    #[test]
    fn a_snapshot_past_its_memory_writes_its_rows_in_place_and_holds_its_barrier() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StateConfig {
            memory: Some(StateMemory::new(4 << 20)),
            ..config(dir.path(), 1_000_000)
        };
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let backend =
            Arc::new(KeyedBackend::open(&dir.path().join("db"), &cfg, range, 128).unwrap());
        let mut t: KeyedTable<u64> = KeyedTable::one_value("t", None);
        t.attach(&backend).unwrap();
        let id = backend::value_table_id("t");
        let n = 60_000u32;
        let set = |t: &mut KeyedTable<u64>, v: u64| set_all(t, n, v);
        let stored = |b: &KeyedBackend| stored_values(b, id);
        set(&mut t, 1);
        t.flush().unwrap();
        set(&mut t, 2);
        backend.defer_writes();
        t.flush().unwrap();
        assert!(backend.deferred_bytes() <= backend.deferred_limit());
        assert!(
            stored(&backend).contains(&2),
            "the rows outgrew the 256 KB kept in memory"
        );
        let snap = dir.path().join("snap");
        let taker = take_later(&backend, &snap, Duration::from_millis(200));
        let read = stored(&backend);
        assert_eq!(read.len(), n as usize);
        assert!(
            read.iter().all(|v| *v == 2),
            "a read saw the rows before the barrier"
        );
        set(&mut t, 3);
        t.flush().unwrap();
        taker.join().unwrap();
        assert!(stored(&backend).iter().all(|v| *v == 3));
        let in_snapshot = snapshot_values(dir.path(), snap, (0..n).map(key));
        assert!(
            in_snapshot.iter().all(|v| *v == Some(2)),
            "the snapshot holds the barrier's values"
        );
        // given up before it was taken: its rows are written all the same
        for few in [n, 1_000] {
            for i in 0..few {
                t.update(&key(i), 0, 0, Watermark::MIN, || 4, |x| *x = few as u64)
                    .unwrap();
            }
            backend.defer_writes();
            t.flush().unwrap();
            assert!(backend.deferred_bytes() <= backend.deferred_limit());
            drop(backend.begin_snapshot().unwrap());
            let now = stored(&backend);
            let changed = now.iter().filter(|v| **v == few as u64).count();
            assert_eq!(changed, few as usize);
        }
        set(&mut t, 5);
        t.flush().unwrap();
        assert!(stored(&backend).iter().all(|v| *v == 5));
    }

    /// A snapshot that cannot be linked fails every later read and write of its instance
    /// (which a restart replaces), rather than letting the subtask go on from state no
    /// checkpoint holds.
    #[test]
    fn a_failed_snapshot_fails_the_instance_with_a_retryable_error() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, mut t) = one_value_table(dir.path(), 100);
        t.update(b"a", 0, 0, Watermark::MIN, || 1, |_| ()).unwrap();
        backend.defer_writes();
        t.flush().unwrap();
        let pending = backend.begin_snapshot().unwrap();
        // a regular file where the snapshot's directory's parent should be
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        assert!(pending.take(&blocker.join("snap")).is_err());
        t.update(b"b", 0, 0, Watermark::MIN, || 2, |_| ()).unwrap();
        let err = t.flush().unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("snapshot"), "{err}");
        let err = backend.scan(backend::value_table_id("t")).unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }

    /// A flush's order key sorts keys as (key group, length, bytes) does, with the keys
    /// compared only on a tie: short keys, keys sharing their first 13 bytes, keys longer than
    /// 255 bytes.
    #[test]
    fn write_order_sorts_by_key_group_length_and_bytes() {
        let mut keys: Vec<(KeyGroup, Vec<u8>)> = Vec::new();
        for g in [3u32, 0, 127] {
            for len in [0usize, 1, 5, 13, 14, 20, 255, 256, 300] {
                for last in [9u8, 0, 200] {
                    let mut k = vec![7u8; len];
                    if let Some(b) = k.last_mut() {
                        *b = last;
                    }
                    keys.push((KeyGroup(g), k));
                }
            }
        }
        keys.push((KeyGroup(3), vec![1; 256]));
        keys.push((KeyGroup(3), vec![9; 255]));
        let mut expected = keys.clone();
        expected.sort_by(|a, b| (a.0, a.1.len(), &a.1).cmp(&(b.0, b.1.len(), &b.1)));
        keys.sort_by(|a, b| {
            write_order(a.0, &a.1)
                .cmp(&write_order(b.0, &b.1))
                .then_with(|| by_length(&a.1, &b.1))
        });
        assert_eq!(keys, expected);
    }

    /// A flush finds many dirty keys with one pass over the table and few through its list;
    /// both write exactly the changed rows.
    #[test]
    fn a_flush_of_many_or_few_dirty_keys_writes_exactly_them() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, mut t) = one_value_table(dir.path(), 100_000);
        // the first flush writes more than one batch (`FLUSH_BATCH_BYTES`)
        let n = 40_000u32;
        for i in 0..n {
            t.update(&key(i), 0, 0, Watermark::MIN, || i as u64, |_| ())
                .unwrap();
        }
        t.flush().unwrap();
        assert_eq!(t.rows_written(), n as u64);
        // few: through the list; a key listed twice is written once
        for i in [3, 3, 700, 4999] {
            t.update(&key(i), 0, 0, Watermark::MIN, || 0, |x| *x += 1_000_000)
                .unwrap();
        }
        t.flush().unwrap();
        assert_eq!(t.rows_written(), n as u64 + 3);
        // many: one pass over the table
        for i in (0..n).step_by(2) {
            t.update(&key(i), 0, 0, Watermark::MIN, || 0, |x| *x += 10_000_000)
                .unwrap();
        }
        t.remove_key(&key(1)).unwrap();
        t.flush().unwrap();
        assert_eq!(t.rows_written(), n as u64 + 3 + n as u64 / 2);
        let snap = dir.path().join("snap");
        backend.checkpoint(&snap).unwrap();
        let got = snapshot_values(dir.path(), snap, (0..n).map(key));
        for (i, v) in got.into_iter().enumerate() {
            let mut want = i as u64;
            want += match i {
                3 => 2_000_000,
                700 | 4999 => 1_000_000,
                _ => 0,
            };
            if i % 2 == 0 {
                want += 10_000_000;
            }
            let want = (i != 1).then_some(want);
            assert_eq!(v, want, "key {i}");
        }
    }

    /// A value type that changed: version 0 stored a count, version 1 a count and a label.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Labelled {
        count: u32,
        label: String,
    }

    fn upgrade_count(version: u8, bytes: &[u8]) -> std::result::Result<Labelled, String> {
        match version {
            0 => {
                let count: u32 = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
                Ok(Labelled {
                    count,
                    label: "from version 0".into(),
                })
            }
            v => Err(format!("no reader for version {v}")),
        }
    }

    /// Rows record the encoding version of their value: a table of a newer version upgrades older
    /// rows as it reads them and writes them back in its own encoding, and an older table refuses
    /// rows of a newer version instead of misreading them.
    #[test]
    fn values_of_an_older_encoding_are_upgraded_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let backend =
            Arc::new(KeyedBackend::open(&dir.path().join("db"), &cfg, range, 128).unwrap());
        let mut old: KeyedTable<u32> = KeyedTable::new("t", None);
        old.attach(&backend).unwrap();
        for i in 0..20u32 {
            old.update(&key(i), 0, 0, Watermark::MIN, || i, |_| ())
                .unwrap();
        }
        old.flush().unwrap();
        drop(old);
        let snap = dir.path().join("snap");
        backend.checkpoint(&snap).unwrap();
        let restore = |name: &str, from: &std::path::Path| {
            let copy = dir.path().join(format!("{name}-copy"));
            std::fs::create_dir_all(&copy).unwrap();
            for f in std::fs::read_dir(from).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
            }
            Arc::new(
                KeyedBackend::restore(
                    &dir.path().join(name),
                    &cfg,
                    range,
                    128,
                    vec![(copy, range)],
                )
                .unwrap(),
            )
        };
        let restored = restore("new", &snap);
        let mut new: KeyedTable<Labelled> = KeyedTable::new("t", None).versioned(1, upgrade_count);
        new.attach(&restored).unwrap();
        for i in 0..20u32 {
            let want = Labelled {
                count: i,
                label: "from version 0".into(),
            };
            assert_eq!(new.get(&key(i), 0, Watermark::MIN).unwrap(), Some(&want));
        }
        new.update(
            &key(3),
            0,
            0,
            Watermark::MIN,
            || unreachable!(),
            |v| v.label = "rewritten".into(),
        )
        .unwrap();
        new.flush().unwrap();
        let versions: Vec<u8> = restored
            .scan(backend::value_table_id("t"))
            .unwrap()
            .iter()
            .map(|(_, v)| v[backend::HEADER - 1])
            .collect();
        assert_eq!(
            versions.iter().filter(|v| **v == 1).count(),
            1,
            "{versions:?}"
        );
        let again = dir.path().join("again");
        restored.checkpoint(&again).unwrap();
        drop(new);
        // the version that wrote only counts reads the state back and meets a version-1 row
        let back = restore("back", &again);
        let mut old: KeyedTable<u32> = KeyedTable::new("t", None);
        old.attach(&back).unwrap();
        assert_eq!(old.get(&key(4), 0, Watermark::MIN).unwrap(), Some(&4));
        let err = old.get(&key(3), 0, Watermark::MIN).unwrap_err();
        assert!(
            err.to_string().contains("encoding version 1")
                && err.to_string().contains("newer version"),
            "{err}"
        );
        assert!(!err.is_retryable(), "{err:?}");
    }

    /// State checkpointed in layout 1 (all namespaces of a key in one row) is rewritten into one
    /// row per namespace when a table attaches, both when the snapshot becomes the instance and
    /// when its rows are imported for a rescale; TTL deadlines come along.
    #[test]
    fn state_of_layout_1_is_rewritten_one_row_per_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let snap = layout_1_snapshot(
            dir.path(),
            "t",
            (0..50u32).map(|i| {
                let values: Vec<(i64, u64)> =
                    (0..3).map(|ns| (ns * 10, (i as u64) << ns)).collect();
                (key(i), 1000 + i as i64, values)
            }),
        );
        for (name, parts) in [
            ("whole", vec![(snap.clone(), range)]),
            ("rescaled", {
                let a = dir.path().join("part-a");
                let b = dir.path().join("part-b");
                for p in [&a, &b] {
                    std::fs::create_dir_all(p).unwrap();
                    for f in std::fs::read_dir(&snap).unwrap() {
                        let f = f.unwrap();
                        std::fs::copy(f.path(), p.join(f.file_name())).unwrap();
                    }
                }
                vec![
                    (a, crate::KeyGroupRange::for_subtask(128, 2, 0)),
                    (b, range),
                ]
            }),
        ] {
            let restored = Arc::new(
                KeyedBackend::restore(&dir.path().join(name), &cfg, range, 128, parts).unwrap(),
            );
            assert_eq!(restored.format(), 1, "{name}");
            let mut t: KeyedTable<u64> = KeyedTable::new("t", Some(Duration::from_millis(100)));
            t.attach(&restored).unwrap();
            assert!(
                restored.scan(backend::table_id("t")).unwrap().is_empty(),
                "{name}: rows of layout 1 stay behind"
            );
            assert_eq!(
                restored.scan(backend::value_table_id("t")).unwrap().len(),
                150
            );
            for i in 0..50u32 {
                let got: Vec<(i64, u64)> = t
                    .range(&key(i), .., Watermark(1099))
                    .unwrap()
                    .map(|(ns, v)| (ns, *v))
                    .collect();
                let want: Vec<(i64, u64)> = (0..3).map(|ns| (ns * 10, (i as u64) << ns)).collect();
                assert_eq!(got, want, "{name}: key {i}");
            }
            // touched at 1000 + i with a TTL of 100: key 0 expired at 1100, key 49 lives on
            assert_eq!(t.get(&key(0), 0, Watermark(1100)).unwrap(), None);
            assert_eq!(t.get(&key(49), 0, Watermark(1100)).unwrap(), Some(&49));
        }
    }

    /// An instance with a budget of its own of 16 MB (12 MB of it for decoded keys).
    fn budgeted(dir: &std::path::Path) -> (Arc<StateMemory>, Arc<KeyedBackend>) {
        budgeted_with(dir, 16 << 20)
    }

    /// An instance with a budget of its own of `bytes` (three quarters for decoded keys).
    fn budgeted_with(dir: &std::path::Path, bytes: usize) -> (Arc<StateMemory>, Arc<KeyedBackend>) {
        let memory = StateMemory::new(bytes);
        let cfg = StateConfig {
            local_dir: dir.to_path_buf(),
            memory: Some(memory.clone()),
            ..StateConfig::default()
        };
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let backend = Arc::new(KeyedBackend::open(&dir.join("db"), &cfg, range, 128).unwrap());
        (memory, backend)
    }

    /// The write-buffer manager reserves the memtables' memory in the job's block cache, so
    /// RocksDB's quarter of the budget covers rows written but not yet flushed to a file.
    #[test]
    fn memtables_are_charged_to_the_block_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (memory, backend) = budgeted(dir.path());
        let before = memory.rocksdb();
        let mut t: KeyedTable<Vec<u64>> = KeyedTable::new("t", None);
        t.attach(&backend).unwrap();
        // about 1 KB of value per key (each u64 near the maximum takes 10 bytes), 1 MB in all:
        // under the 2 MB the manager lets memtables reach before it flushes them
        for i in 0..1_000u32 {
            t.update(
                &key(i),
                0,
                0,
                Watermark::MIN,
                || vec![u64::MAX - i as u64; 100],
                |_| (),
            )
            .unwrap();
        }
        t.flush().unwrap();
        let after = memory.rocksdb();
        assert!(
            after >= before + (1 << 20) - (256 << 10),
            "the cache held {before} bytes before 1 MB was written and {after} after"
        );
        // RocksDB's quarter of the 16 MB budget, with room for the memtable being filled
        assert!(after <= 6 << 20, "{after}");
    }

    /// The decoded-key cache stays within the job's byte budget however many keys pass through
    /// it, every value reads back, and keys in use survive a stream of keys seen once.
    #[test]
    fn the_cache_holds_its_byte_budget_and_keeps_what_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let (memory, backend) = budgeted(dir.path());
        let budget = memory.decoded_budget();
        assert_eq!(budget, 12 << 20);
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

    /// With small values the map's table is most of the cache: it is charged by its capacity,
    /// which grows in powers of two and does not shrink when keys are evicted, so a table does
    /// not double past the budget.
    #[test]
    fn the_map_table_is_charged_by_its_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let (memory, backend) = budgeted(dir.path());
        let budget = memory.decoded_budget();
        let mut t: KeyedTable<u64> = KeyedTable::one_value("t", None);
        t.attach(&backend).unwrap();
        let mut peak = 0;
        for i in 0..300_000u32 {
            t.update(&key(i), 0, 0, Watermark::MIN, || i as u64, |_| ())
                .unwrap();
            peak = peak.max(memory.decoded());
        }
        let table = t.keys.allocation_size();
        assert!(table <= budget, "the table takes {table} of {budget} bytes");
        assert!(
            peak <= budget + 4096,
            "peak {peak} over the budget {budget}"
        );
        assert!(t.key_count() > 10_000, "{} keys cached", t.key_count());
        for i in (0..300_000u32).step_by(101) {
            assert_eq!(
                t.get(&key(i), 0, Watermark::MIN).unwrap(),
                Some(&(i as u64))
            );
        }
        let err = t
            .update(&key(1), 1, 0, Watermark::MIN, || 0, |_| ())
            .unwrap_err();
        assert!(err.to_string().contains("one value per key"), "{err}");
    }

    /// The spill filter grows as keys are evicted and the map's table keeps its size: once the
    /// two leave the keys no room, the table moves into a smaller one (rather than evicting
    /// every key and sweeping the whole table for each new one) and the cache keeps its budget.
    #[test]
    fn the_map_gives_room_back_to_a_growing_filter() {
        let dir = tempfile::tempdir().unwrap();
        let (memory, backend) = budgeted_with(dir.path(), 8 << 20);
        let budget = memory.decoded_budget();
        let mut t: KeyedTable<u64> = KeyedTable::one_value("t", None);
        t.attach(&backend).unwrap();
        let update = |t: &mut KeyedTable<u64>, i: u32| {
            t.update(&i.to_be_bytes(), 0, 0, Watermark::MIN, || i as u64, |_| ())
                .unwrap();
        };
        for i in 0..100_000 {
            update(&mut t, i);
        }
        let largest = t.keys.allocation_size();
        // the filter as the evictions of another 500k keys would have grown it (inserting
        // them would take half a minute in a debug build)
        let spilled = &mut t.backing.as_mut().unwrap().spilled;
        for h in 0..500_000u64 {
            spilled.evicted(crate::keys::hash_key(&h.to_le_bytes()), 0, 0);
        }
        t.charge_spilled();
        let filter = t.spill_charge;
        assert!(
            filter > budget / 3,
            "the filter takes {filter} of {budget} bytes"
        );
        let mut peak = 0;
        for i in 100_000..150_000 {
            update(&mut t, i);
            peak = peak.max(memory.decoded());
        }
        assert!(t.spill_charge >= filter, "the filter gave up");
        let table = t.keys.allocation_size();
        assert!(table < largest, "the table kept its {table} bytes");
        assert!(
            peak <= budget + 4096,
            "peak {peak} over the budget {budget}"
        );
        assert!(t.key_count() > 1_000, "{} keys cached", t.key_count());
        for i in (0..150_000u32).step_by(97) {
            assert_eq!(
                t.get(&i.to_be_bytes(), 0, Watermark::MIN).unwrap(),
                Some(&(i as u64))
            );
        }
    }

    #[test]
    fn keys_rocksdb_never_saw_leave_no_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, mut t) = attached::<u64>(dir.path(), 1000);
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
        assert!(
            backend
                .scan(backend::value_table_id("t"))
                .unwrap()
                .is_empty()
        );
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
            let copies = copy_parts(&parts, dir.path(), &format!("copy{sub}"));
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

    /// The namespaces a table holds of `key`, in order.
    fn namespaces<V: StateValue>(t: &mut KeyedTable<V>, key: &[u8]) -> Vec<i64> {
        t.range(key, .., Watermark::MIN)
            .unwrap()
            .map(|(ns, _)| ns)
            .collect()
    }

    /// Snapshots an instance of all key groups in `dir` and restores it into another.
    pub(crate) fn snapshot_and_restore(
        backend: &KeyedBackend,
        dir: &std::path::Path,
        cfg: &StateConfig,
    ) -> Arc<KeyedBackend> {
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let snap = dir.join("snap");
        backend.checkpoint(&snap).unwrap();
        Arc::new(
            KeyedBackend::restore(&dir.join("db2"), cfg, range, 128, vec![(snap, range)]).unwrap(),
        )
    }

    /// After a restore the namespaces the table wrote before its snapshot may hold rows of any
    /// key, so a miss there reads RocksDB, and a miss in a namespace it never wrote does not; a
    /// key that a read found absent is whole, and needs no second read when it is used again.
    /// (A thousand more rows keep the table reading its snapshot throughout, see
    /// `a_restored_table_learns_its_rows_at_its_misses`.)
    #[test]
    fn a_restored_table_reads_each_missing_key_once_and_only_where_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let (backend, mut t) = attached::<u32>(dir.path(), 1000);
        for i in 0..1000 {
            t.update(&key(i), 3, 0, Watermark::MIN, || i, |_| ())
                .unwrap();
        }
        t.update(b"old", 3, 0, Watermark::MIN, || 1, |_| ())
            .unwrap();
        t.update(b"older", 5, 0, Watermark::MIN, || 2, |_| ())
            .unwrap();
        t.flush().unwrap();
        let restored = snapshot_and_restore(&backend, dir.path(), &cfg);
        let mut t: KeyedTable<u32> = KeyedTable::new("t", None);
        t.attach(&restored).unwrap();
        t.update(b"new", 7, 0, Watermark::MIN, || 7, |_| ())
            .unwrap();
        t.update(b"new", 8, 0, Watermark::MIN, || 8, |_| ())
            .unwrap();
        assert_eq!(t.reads(), 0, "nothing restored lies past namespace 5");
        t.update(b"mid", 4, 0, Watermark::MIN, || 4, |_| ())
            .unwrap();
        assert_eq!(
            t.reads(),
            1,
            "namespace 4 lies between restored rows: a point lookup"
        );
        assert_eq!(t.get(b"mid", 4, Watermark::MIN).unwrap(), Some(&4));
        assert_eq!(t.reads(), 1, "the slot holds namespace 4");
        assert_eq!(namespaces(&mut t, b"mid"), vec![4]);
        assert_eq!(t.reads(), 2, "all namespaces: the rest of the key");
        assert_eq!(namespaces(&mut t, b"mid"), vec![4]);
        assert_eq!(t.reads(), 2, "the key was read whole once");
        assert_eq!(namespaces(&mut t, b"new"), vec![7, 8]);
        assert_eq!(
            t.reads(),
            3,
            "a key created without a read reads the rest once"
        );
        t.update(b"old", 9, 0, Watermark::MIN, || 9, |_| ())
            .unwrap();
        assert_eq!(t.reads(), 3);
        assert_eq!(namespaces(&mut t, b"old"), vec![3, 9]);
        assert_eq!(t.reads(), 4);
        // the range grew with the rows written since, and a second restore knows it
        t.flush().unwrap();
        let again = tempfile::tempdir().unwrap();
        let restored = snapshot_and_restore(&restored, again.path(), &cfg);
        let mut t: KeyedTable<u32> = KeyedTable::new("t", None);
        t.attach(&restored).unwrap();
        assert_eq!(t.get(b"new", 8, Watermark::MIN).unwrap(), Some(&8));
        assert_eq!(t.get(b"older", 5, Watermark::MIN).unwrap(), Some(&2));
        assert_eq!(t.reads(), 2);
        t.update(b"newer", 10, 0, Watermark::MIN, || 10, |_| ())
            .unwrap();
        assert_eq!(t.reads(), 2, "namespace 10 was never written");
    }

    /// The compaction filter drops rows whose deadline passed; the instance's records outside
    /// the key groups carry none, so a compaction keeps them whatever the clock.
    #[test]
    fn a_compaction_keeps_the_namespace_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let backend = capped_backend(dir.path(), 1000);
        let mut t: KeyedTable<u32> = KeyedTable::one_value("t", Some(Duration::from_secs(3600)));
        t.attach(&backend).unwrap();
        t.update(b"seen", 0, 1000, Watermark::MIN, || 1, |_| ())
            .unwrap();
        t.flush().unwrap();
        // past the range row's first bytes (namespace 0), long before the row's deadline
        backend.advance_clock(2000);
        backend.compact();
        let restored = snapshot_and_restore(&backend, dir.path(), &cfg);
        let mut t: KeyedTable<u32> = KeyedTable::one_value("t", Some(Duration::from_secs(3600)));
        t.attach(&restored).unwrap();
        assert!(t.contains_key(b"seen", Watermark(2000)).unwrap());
    }

    /// Rows of tables without a TTL carry the largest deadline, which means none: a
    /// compaction keeps them when the clock reaches the end of event time, as it does once a
    /// bounded input ends (before, such a compaction dropped every row it read, and a job
    /// restored from the final checkpoint of a deduplication without a TTL let keys through
    /// again). Rows with a TTL still go.
    #[test]
    fn a_compaction_at_the_end_of_event_time_keeps_rows_without_a_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let backend = capped_backend(dir.path(), 1000);
        let mut kept: KeyedTable<u32> = KeyedTable::one_value("kept", None);
        let mut set = KeySet::new("set", None, 0, vec![0]);
        let mut ttl: KeyedTable<u32> = KeyedTable::one_value("ttl", Some(Duration::from_secs(1)));
        kept.attach(&backend).unwrap();
        set.attach(&backend).unwrap();
        ttl.attach(&backend).unwrap();
        for k in [&b"a"[..], b"b"] {
            kept.update(k, 0, 1000, Watermark::MIN, || 1, |_| ())
                .unwrap();
            assert!(set.insert_if_absent(k, 1000, Watermark::MIN).unwrap());
            ttl.update(k, 0, 1000, Watermark::MIN, || 1, |_| ())
                .unwrap();
        }
        kept.flush().unwrap();
        set.flush().unwrap();
        ttl.flush().unwrap();
        backend.advance_clock(i64::MAX);
        backend.compact();
        let restored = snapshot_and_restore(&backend, dir.path(), &cfg);
        let mut kept: KeyedTable<u32> = KeyedTable::one_value("kept", None);
        let mut set = KeySet::new("set", None, 0, vec![0]);
        let mut ttl: KeyedTable<u32> = KeyedTable::one_value("ttl", Some(Duration::from_secs(1)));
        kept.attach(&restored).unwrap();
        set.attach(&restored).unwrap();
        ttl.attach(&restored).unwrap();
        for k in [&b"a"[..], b"b"] {
            assert!(kept.contains_key(k, Watermark::MIN).unwrap());
            assert!(!set.insert_if_absent(k, 2000, Watermark::MIN).unwrap());
            assert!(
                !ttl.contains_key(k, Watermark::MIN).unwrap(),
                "compacted away"
            );
        }
    }

    /// A rescale restores one snapshot as it is and imports the others' rows: each table's
    /// namespace range is the union of theirs, whichever snapshot is the base; a snapshot
    /// that recorded no ranges (an older version's) makes every namespace unknown.
    #[test]
    fn a_rescaled_table_finds_the_rows_of_every_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 100_000);
        let keys: Vec<Vec<u8>> = (0..400u32).map(key).collect();
        // two instances over halves of the key groups, writing far apart namespaces
        let mut snaps = Vec::new();
        for (i, ns) in [(0, 1i64), (1, 1000)] {
            let range = crate::KeyGroupRange::for_subtask(128, 2, i);
            let db = dir.path().join(format!("half-{i}"));
            let backend = Arc::new(KeyedBackend::open(&db, &cfg, range, 128).unwrap());
            let mut t: KeyedTable<u64> = KeyedTable::new("t", None);
            t.attach(&backend).unwrap();
            for k in keys.iter().filter(|k| backend.owns(k)) {
                t.update(k, ns, 0, Watermark::MIN, || ns as u64, |_| ())
                    .unwrap();
            }
            t.flush().unwrap();
            snaps.push((backend, range, ns));
        }
        let all = crate::KeyGroupRange::for_subtask(128, 1, 0);
        for (case, (first, second, forget)) in
            [(0, 1, false), (1, 0, false), (0, 1, true), (1, 0, true)]
                .into_iter()
                .enumerate()
        {
            if forget {
                snaps[first].0.forget_ranges();
            }
            let mut parts = Vec::new();
            for i in [first, second] {
                let snap = dir.path().join(format!("snap-{case}-{i}"));
                snaps[i].0.checkpoint(&snap).unwrap();
                parts.push((snap, snaps[i].1));
            }
            let restored = Arc::new(
                KeyedBackend::restore(&dir.path().join(format!("r-{case}")), &cfg, all, 128, parts)
                    .unwrap(),
            );
            let mut t: KeyedTable<u64> = KeyedTable::new("t", None);
            t.attach(&restored).unwrap();
            // first, while the table has not read its snapshot's rows (which its misses do)
            t.update(b"fresh", 2000, 0, Watermark::MIN, || 0, |_| ())
                .unwrap();
            let expect = u64::from(forget);
            assert_eq!(t.reads(), expect, "case {case}: a namespace past both");
            for (backend, _, ns) in &snaps {
                for k in keys.iter().filter(|k| backend.owns(k)) {
                    assert_eq!(
                        t.get(k, *ns, Watermark::MIN).unwrap(),
                        Some(&(*ns as u64)),
                        "case {case}, namespace {ns}"
                    );
                }
            }
        }
    }

    /// An upsert creates an absent value, changes a held one in place, leaves it alone (not
    /// rewritten, not touched) when the change says it did not change it, and starts over on a
    /// value whose TTL passed.
    #[test]
    fn an_upsert_rewrites_only_what_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1000);
        let range = crate::KeyGroupRange::for_subtask(128, 1, 0);
        let backend =
            Arc::new(KeyedBackend::open(&dir.path().join("db"), &cfg, range, 128).unwrap());
        let mut t: KeyedTable<u32> = KeyedTable::one_value("t", Some(Duration::from_millis(100)));
        t.attach(&backend).unwrap();
        let newer = |v: u32| {
            move |prev: &mut u32| {
                let n = v > *prev;
                if n {
                    *prev = v;
                }
                n
            }
        };
        let clock = Watermark::MIN;
        assert!(t.upsert(b"a", 0, 1000, clock, || 5, newer(5)).unwrap());
        t.flush().unwrap();
        let written = t.rows_written();
        // older: unchanged, so nothing to write and the TTL still counts from 1000
        assert!(!t.upsert(b"a", 0, 1050, clock, || 3, newer(3)).unwrap());
        t.flush().unwrap();
        assert_eq!(t.rows_written(), written);
        assert_eq!(t.get(b"a", 0, Watermark(1099)).unwrap(), Some(&5));
        assert_eq!(t.get(b"a", 0, Watermark(1100)).unwrap(), None);
        // newer: changed in place and written
        assert!(
            t.upsert(b"a", 0, 1060, Watermark(1099), || 7, newer(7))
                .unwrap()
        );
        t.flush().unwrap();
        assert_eq!(t.rows_written(), written + 1);
        assert_eq!(t.get(b"a", 0, Watermark(1159)).unwrap(), Some(&7));
        // expired: the old value is gone, so even an older row counts as new
        assert!(
            t.upsert(b"a", 0, 1200, Watermark(1160), || 1, newer(1))
                .unwrap()
        );
        assert_eq!(t.get(b"a", 0, Watermark(1160)).unwrap(), Some(&1));
        assert!(t.upsert(b"a", 1, 0, clock, || 1, newer(1)).is_err());
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
        let restored = snapshot_and_restore(&backend, dir.path(), &cfg);
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
            restored
                .scan(backend::value_table_id("t"))
                .unwrap()
                .is_empty(),
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
        // the rows layout 0 wrote: values as in layout 1; timers under `timers/<name>` by key
        // group, `[time][key]`, with an empty header
        let old = Arc::new(old);
        let timers = backend::table_id("timers/fire");
        let mut batch = rocksdb::WriteBatch::default();
        for i in 0..50u32 {
            let kg = KeyedTable::<u64>::key_groups_of(&key(i), 128);
            batch.put(
                backend::legacy_row_key(kg, backend::table_id("t"), &key(i)),
                legacy_row(i64::MIN, &[(0, i as u64)]),
            );
            let mut row = backend::time_bytes(i as i64 * 10).to_vec();
            row.extend_from_slice(&key(i));
            let header = [i64::MAX.to_be_bytes(), i64::MIN.to_be_bytes()].concat();
            batch.put(backend::legacy_row_key(kg, timers, &row), header);
        }
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

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
//! An operator that is done with every key at once (session windows at the end of the input)
//! takes the whole table out by one pass in row order instead ([`KeyedTable::drain_next`]), a
//! batch of rows at a time, each batch deleted with one range tombstone: RocksDB reads each
//! block once, rather than once per key read on its own.
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
//! **Cache.** The cache is sixteen hash tables chosen by the key's hash (`shards`), each
//! charged by its allocation (which doubles as it grows and does not shrink), and each cached
//! key an estimate of what it holds besides (a long key, and twice its last encoded size, or the
//! table's average before it was first written), against the job's [`StateMemory`]. A shard
//! grows only if the budget would hold the map with every shard full at that size; one that
//! may not evicts its keys (and those of the shards nearly as full) to below half and rehashes
//! in place, so the map grows a sixteenth at a time up to the budget instead of stopping at the
//! last power of two below it. When the table must give memory back it writes its dirty keys and
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
use serde::Serialize;
use serde::de::DeserializeOwned;
use smallvec::SmallVec;

pub mod backend;
mod bloom;
pub mod heap;
mod key_slots;
pub mod keyset;
mod losers;
pub mod memory;
mod pane_blocks;
pub mod panes;
mod shards;
mod spilled;
pub(crate) mod table;
pub mod timers;

pub use backend::{CacheCounts, KeyedBackend, StateConfig};
pub use keyset::KeySet;
pub use memory::StateMemory;
pub use panes::{Merged, PaneColumns, PaneTable};
pub use table::{KeyedTable, TableDrain};
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

/// An encoded key as state stores it: keys of up to 24 bytes (any one or two numbers, short
/// strings) are kept inline, without a heap allocation or a pointer to follow.
pub type StateKey = SmallVec<[u8; 24]>;

/// Accesses after which a table adds its cache counters to its backend's (the metrics read
/// those), so that counting costs no shared write per access.
pub(crate) const PUBLISH_EVERY: u64 = 4096;

/// Adds the accesses and RocksDB reads a table counted (`counts`) since those it `published`
/// to the backend's counters, which the subtask's metrics read.
pub(crate) fn publish(backend: &KeyedBackend, counts: (u64, u64), published: &mut (u64, u64)) {
    backend.count_cache(counts.0 - published.0, counts.1 - published.1);
    *published = counts;
}

/// What a key set keeps aside for its spill filters once it evicts: the decoded caches' budget
/// over this (its index gives back room when they grow past it).
pub(crate) const FILTER_SHARE: usize = 4;

/// One spill filter takes at most the decoded caches' budget over this; past it, the misses of
/// its namespaces always read RocksDB (see [`spilled`]). A filter costs 2 bytes per evicted key
/// where the key in memory costs 16 or more, and without it every key new to the state is a
/// RocksDB read, so it may take room the keys had: at a quarter, a deduplication of 50M keys
/// gave its filter up after 22M evictions and read RocksDB for each of the 17M new keys after.
pub(crate) const FILTER_CAP: usize = 2;

/// Bytes of rows a flush or a spill writes at a time: a batch that grows to tens of megabytes
/// costs more in fresh pages than in RocksDB. A batch's buffer doubles as it grows, to twice
/// this at most, which stays below the size at which blocks get a mapping of their own (see
/// `heap`): a megabyte and more would be mapped and faulted in afresh for every batch.
pub(crate) const FLUSH_BATCH_BYTES: usize = 256 << 10;

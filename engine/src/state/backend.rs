//! The RocksDB instance that holds the keyed state of one operator in one subtask.
//!
//! Every table of the operator shares the instance. A value's row key is
//! `[key group: u16 BE][table: u32 BE][key length: LEB128][encoded key][namespace: 8 bytes]`,
//! one row per (key, namespace): an update rewrites the values it changed, not everything the
//! key holds. The rows of a key group range are one contiguous key range, so a snapshot taken at
//! one parallelism can be cut into the ranges of another; the rows of one key are contiguous
//! too, and everything but the namespace is the row's prefix, so reading a key is one prefix
//! seek that a prefix bloom filter answers without I/O when the key is new. A row's value is
//! `[deadline: i64 BE][touched: i64 BE][value version: u8]` followed by the value: the deadline
//! (`touched + ttl`, or [`NO_DEADLINE`], kept whatever the clock) lets a compaction filter drop
//! expired rows without knowing
//! the table's value type, and the version says which encoding of the value type wrote it (see
//! [`super::KeyedTable::versioned`]).
//!
//! Rows that belong to no single key group start with `0xffff`, above every key group (a job has
//! at most 32768): timers, ordered by time across key groups and within a time as their keys'
//! rows are (`[ff ff 02][table][time][key group][key length][encoded key]`, see
//! [`super::timers`]), pane rows, ordered by spill generation, then namespace, then kind (a
//! single value or a block of values), then as their keys' rows are (`[ff ff 04][table]
//! [generation][namespace][kind][key group][key length][encoded key]`, see [`super::panes`]),
//! and the layout marker (`[ff ff 00]format`), which says which [`FORMAT`] wrote the instance so that a newer version
//! can read what an older one checkpointed. Each table also records the lowest and highest
//! namespace it ever wrote (`[ff ff 00]ns:[table]`), and the marker `[ff ff 00]ns-ranges` says
//! that every table of the instance did so since it started empty: a table restored from it
//! knows that RocksDB holds none of its rows outside that range (a window slice opened after
//! the snapshot), so a miss there needs no read. A pane table's next spill generation is the
//! one after its newest row's (layout 4 recorded it in `[ff ff 00]gen:[table]`, which is no
//! longer read: a row outside the pane range in every memtable would make each flushed file
//! overlap the older generations).
//!
//! Writes skip the write-ahead log: durability comes from checkpoints, which flush the memtables
//! and link the SST files. Only encoding the changed values runs on the subtask's thread: the
//! rows a snapshot writes are kept aside ([`KeyedBackend::defer_writes`], up to a sixteenth of a
//! slot's state memory; beyond it they go in on the subtask's thread), and another thread
//! writes them, flushes and links ([`KeyedBackend::begin_snapshot`]). Until the rows are written
//! the subtask's RocksDB reads wait, and until the files are linked its writes wait, so the
//! snapshot holds exactly the state at its barrier while the subtask goes on processing from its
//! decoded caches. Memory is bounded by the job's
//! [`StateMemory`], whose block cache and write-buffer manager every instance of the job in the
//! process shares.
use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, ColumnFamilyDescriptor, DB,
    DBRawIteratorWithThreadMode, DEFAULT_COLUMN_FAMILY_NAME, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions, checkpoint::Checkpoint, compaction_filter::Decision,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::losers::LoserTree;
use super::memory::{Lease, StateMemory};
use crate::{EngineError, KeyGroup, KeyGroupRange, Result};

/// The deadline of a row without a TTL: it never expires, not even once the clock reaches the
/// end of event time (a bounded input's last watermark).
pub(crate) const NO_DEADLINE: i64 = i64::MAX;

/// Bytes before the value in a row: deadline, touched, value version.
pub(crate) const HEADER: usize = 17;

/// Bytes before the values in a row of layouts 0 and 1: deadline, touched.
pub(crate) const LEGACY_HEADER: usize = 16;

/// The layout this version writes. 0: timers kept per key group under `timers/<name>` and
/// rewritten whole at every snapshot (no marker row). 1: timers ordered by time outside the key
/// groups and written as they change. 2: one row per (key, namespace) under the table's
/// [`value_table_id`], values versioned; layouts 0 and 1 kept all namespaces of a key in one
/// row, `[key group][table_id][encoded key]`, with a [`LEGACY_HEADER`]. 3: timers due at the
/// same time ordered as their keys' rows (by [`timer_order`]) under `[ff ff 02]`; layouts 1
/// and 2 kept them in key order under `[ff ff 01]`. 4: pane tables ([`super::panes`]) under
/// `[ff ff 03]`, which sliced windows keep their state in instead of a keyed table and timers
/// (a window moves the state of an older layout when it opens). 5: pane rows ordered by
/// generation first, under `[ff ff 04]`, so each spill is a key range of its own that
/// compaction never merges with another, and spills written as blocks of values; layout 4
/// kept them ordered by namespace and key with the generation last (a pane table moves them
/// when it attaches).
pub const FORMAT: u32 = 5;

/// First bytes of the rows outside key groups.
const OUTSIDE: [u8; 2] = [0xff, 0xff];
const META: u8 = 0;
/// Timers of layouts 1 and 2.
const LEGACY_TIMERS: u8 = 1;
const TIMERS: u8 = 2;
/// Pane rows of layout 4.
const LEGACY_PANES: u8 = 3;
const PANES: u8 = 4;

fn format_key() -> Vec<u8> {
    [&OUTSIDE[..], &[META], b"format"].concat()
}

/// Present when every table of the instance recorded its namespace range from the start.
fn ranges_marker() -> Vec<u8> {
    [&OUTSIDE[..], &[META], b"ns-ranges"].concat()
}

/// First bytes of the rows that hold a table's namespace range.
fn range_rows() -> Vec<u8> {
    [&OUTSIDE[..], &[META], b"ns:"].concat()
}

/// The row that holds the lowest and highest namespace `table` ever wrote.
pub(crate) fn range_row(table: [u8; 4]) -> Vec<u8> {
    [&range_rows()[..], &table].concat()
}

/// The value of a [`range_row`].
pub(crate) fn range_value((lo, hi): (i64, i64)) -> [u8; 16] {
    let mut v = [0; 16];
    v[..8].copy_from_slice(&lo.to_be_bytes());
    v[8..].copy_from_slice(&hi.to_be_bytes());
    v
}

fn decode_range(v: &[u8]) -> Result<(i64, i64)> {
    match <[u8; 16]>::try_from(v) {
        Ok(b) => Ok((
            i64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            i64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
        )),
        Err(_) => Err(EngineError::StateStore {
            message: format!("a namespace range of {} bytes", v.len()),
            retryable: false,
        }),
    }
}

fn bad_pane_row(k: &[u8]) -> EngineError {
    EngineError::StateStore {
        message: format!("a pane row key of {} bytes", k.len()),
        retryable: false,
    }
}

impl KeyedBackend {
    /// The generation after the newest one pane table `table` has rows in, 0 if it has none:
    /// its last row says it, as generations come first in pane rows.
    pub(crate) fn next_generation(&self, table: [u8; 4]) -> Result<u32> {
        self.wait_for_rows()?;
        let prefix = pane_prefix(table);
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_lower_bound(prefix.clone());
        let mut it = self.db().raw_iterator_opt(ro);
        it.seek_for_prev(prefix_upper(&prefix));
        let next = match it.key() {
            Some(k) => {
                let (generation, ..) = decode_pane_row(k).ok_or_else(|| bad_pane_row(k))?;
                generation.saturating_add(1)
            }
            None => 0,
        };
        it.status().map_err(|e| db_err("reading state", e))?;
        Ok(next)
    }
}

/// The smallest range holding `a` (if any) and `b`.
pub(crate) fn union(a: Option<(i64, i64)>, b: (i64, i64)) -> (i64, i64) {
    a.map_or(b, |(lo, hi)| (lo.min(b.0), hi.max(b.1)))
}

/// The first row key of pane table `table` (see [`super::panes`]).
pub(crate) fn pane_prefix(table: [u8; 4]) -> Vec<u8> {
    [&OUTSIDE[..], &[PANES], &table].concat()
}

/// The first row key of generation `generation` of pane table `table`.
pub(crate) fn pane_generation_prefix(table: [u8; 4], generation: u32) -> Vec<u8> {
    let mut k = pane_prefix(table);
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

/// The first row key of namespace `ns` in generation `generation` of pane table `table`.
pub(crate) fn pane_ns_prefix(table: [u8; 4], generation: u32, ns: i64) -> Vec<u8> {
    let mut k = pane_generation_prefix(table, generation);
    k.extend_from_slice(&time_bytes(ns));
    k
}

/// What a pane row holds: one key's value ([`PANE_VALUE`], written by checkpoints) or a block
/// of keys' values ([`PANE_BLOCK`], written by spills, see [`super::pane_blocks`]).
pub(crate) const PANE_VALUE: u8 = 0;
pub(crate) const PANE_BLOCK: u8 = 1;

/// The first row key of the rows of kind `kind` of namespace `ns` in generation `generation`.
fn pane_kind_prefix(table: [u8; 4], generation: u32, ns: i64, kind: u8) -> Vec<u8> {
    let mut k = pane_ns_prefix(table, generation, ns);
    k.push(kind);
    k
}

/// Bytes of a pane row key before the key's [`timer_order`].
const PANE_ORDER_AT: usize = 7 + 4 + 8 + 1;

/// The row key of a pane row: `[ff ff 04][table][generation: u32 BE][ns][kind][key order]`
/// (a block's key order is its first key's).
pub(crate) fn pane_row(
    table: [u8; 4],
    generation: u32,
    ns: i64,
    kind: u8,
    order: &[u8],
) -> Vec<u8> {
    let mut k = pane_kind_prefix(table, generation, ns, kind);
    k.extend_from_slice(order);
    k
}

/// The generation, namespace, kind and key order of a pane row key.
pub(crate) fn decode_pane_row(row: &[u8]) -> Option<(u32, i64, u8, &[u8])> {
    let generation = u32::from_be_bytes(row.get(7..11)?.try_into().ok()?);
    let ns = time_from_bytes(row.get(11..19)?.try_into().ok()?);
    Some((generation, ns, *row.get(19)?, row.get(PANE_ORDER_AT..)?))
}

/// The first row key of pane table `table` in layout 4:
/// `[ff ff 03][table][ns][key order][generation: u32 BE]`.
fn legacy_pane_prefix(table: [u8; 4]) -> Vec<u8> {
    [&OUTSIDE[..], &[LEGACY_PANES], &table].concat()
}

/// The generation, namespace and key order of a pane row key of layout 4.
fn decode_legacy_pane_row(row: &[u8]) -> Option<(u32, i64, &[u8])> {
    let ns = time_from_bytes(row.get(7..15)?.try_into().ok()?);
    let rest = row.get(15..)?;
    let split = rest.len().checked_sub(4)?;
    let generation = u32::from_be_bytes(rest[split..].try_into().ok()?);
    Some((generation, ns, &rest[..split]))
}

/// The first row key of timer table `table`.
pub(crate) fn timer_prefix(table: [u8; 4]) -> Vec<u8> {
    [&OUTSIDE[..], &[TIMERS], &table].concat()
}

/// Order-preserving encoding of an event time (two's complement with the sign flipped).
pub(crate) fn time_bytes(t: i64) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

pub(crate) fn time_from_bytes(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

/// The row key of the timer at `t` for the key whose [`timer_order`] is `order`, in timer
/// table `table`.
pub(crate) fn timer_key(table: [u8; 4], t: i64, order: &[u8]) -> Vec<u8> {
    let mut k = timer_prefix(table);
    k.extend_from_slice(&time_bytes(t));
    k.extend_from_slice(order);
    k
}

/// The time and the rest of a timer row key: the key's [`timer_order`], or in layouts 1 and 2
/// the encoded key itself.
pub(crate) fn decode_timer_key(row: &[u8]) -> Option<(i64, &[u8])> {
    let rest = row.get(TIMER_PREFIX_LEN..)?;
    let t = time_from_bytes(rest.get(..8)?.try_into().ok()?);
    Some((t, &rest[8..]))
}

/// The first row key of timer table `table` in layouts 1 and 2 (`[time][encoded key]`, in
/// (time, key) order).
pub(crate) fn legacy_timer_prefix(table: [u8; 4]) -> Vec<u8> {
    [&OUTSIDE[..], &[LEGACY_TIMERS], &table].concat()
}

const TIMER_PREFIX_LEN: usize = 7;

/// The smallest row key above every timer of `table` at or before `t`.
pub(crate) fn timer_upper(table: [u8; 4], t: i64) -> Vec<u8> {
    let mut k = timer_prefix(table);
    match t.checked_add(1) {
        Some(next) => k.extend_from_slice(&time_bytes(next)),
        None => increment(&mut k),
    }
    k
}

/// Keyed-state settings of a subtask.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Where RocksDB instances live while a job runs.
    pub local_dir: PathBuf,
    /// Bytes keyed state may use per task slot (see [`StateMemory`]).
    pub memory_bytes: usize,
    /// An optional cap on the keys per table kept decoded in memory, besides the byte budget.
    pub cache_keys: Option<usize>,
    /// Size at which one RocksDB memtable is flushed, bytes.
    pub write_buffer_bytes: usize,
    /// The job's memory in this process, shared by its instances (the TaskManager sets it); an
    /// instance without one has a budget of its own.
    pub memory: Option<Arc<StateMemory>>,
    /// The task slot the subtask runs in (its index: slot k runs subtask k of every operator).
    pub slot: u32,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            local_dir: std::env::temp_dir().join("freshet-state"),
            memory_bytes: 256 << 20,
            cache_keys: None,
            write_buffer_bytes: 16 << 20,
            memory: None,
            slot: 0,
        }
    }
}

fn db_err(context: impl std::fmt::Display, e: rocksdb::Error) -> EngineError {
    use rocksdb::ErrorKind;
    // I/O errors, a damaged working file, a busy or timed-out call: the restarted subtask opens
    // a fresh working directory from the checkpoint; a misuse would happen again
    let retryable = !matches!(
        e.kind(),
        ErrorKind::InvalidArgument | ErrorKind::NotSupported
    );
    EngineError::StateStore {
        message: format!("{context}: {e}"),
        retryable,
    }
}

fn io_err(context: impl std::fmt::Display, e: std::io::Error) -> EngineError {
    EngineError::io(context.to_string(), e)
}

/// The id of a timer queue, or of a table's rows in layouts 0 and 1: a hash of its name.
pub(crate) fn table_id(name: &str) -> [u8; 4] {
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) as u32).to_be_bytes()
}

/// The id of a table's value rows since layout 2: another hash of its name, so that rows of
/// the old layout awaiting migration never share a key range with rows of the new one.
pub(crate) fn value_table_id(name: &str) -> [u8; 4] {
    (xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), 2) as u32).to_be_bytes()
}

/// The row key of `key` in a table of layout 0 or 1 (all namespaces in one row; tests write
/// such state).
#[cfg(test)]
pub(crate) fn legacy_row_key(kg: KeyGroup, table: [u8; 4], key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + key.len());
    k.extend_from_slice(&(kg.0 as u16).to_be_bytes());
    k.extend_from_slice(&table);
    k.extend_from_slice(key);
    k
}

/// The prefix every row of `key` in `table` starts with: the row key without its namespace.
pub(crate) fn key_prefix(kg: KeyGroup, table: [u8; 4], key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + 5 + key.len() + 8);
    push_key_prefix(&mut k, kg, table, key);
    k
}

/// Appends the [`key_prefix`] of `key` to `buf`.
pub(crate) fn push_key_prefix(buf: &mut Vec<u8>, kg: KeyGroup, table: [u8; 4], key: &[u8]) {
    buf.extend_from_slice(&(kg.0 as u16).to_be_bytes());
    buf.extend_from_slice(&table);
    push_key(buf, key);
}

/// Appends `key` as row keys hold it: its length (LEB128), then its bytes.
fn push_key(k: &mut impl Extend<u8>, key: &[u8]) {
    let (len, n) = leb128(key.len());
    k.extend(len[..n].iter().copied());
    k.extend(key.iter().copied());
}

/// `n` as LEB128 (seven bits a byte, low first, the top bit set on all but the last), and how
/// many bytes that takes.
pub(crate) fn leb128(mut n: usize) -> ([u8; 10], usize) {
    let mut out = [0u8; 10];
    let mut i = 0;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out[i] = byte;
            return (out, i + 1);
        }
        out[i] = byte | 0x80;
        i += 1;
    }
}

/// `key` as timers order it: `[key group: u16 BE][key length: LEB128][encoded key]`, the order
/// of the key's rows in every table, so the keys due at one time come in the order their rows
/// are stored (see [`super::timers`]).
pub(crate) fn timer_order(kg: KeyGroup, key: &[u8]) -> super::StateKey {
    let (head, n) = order_head(kg, key.len());
    // built in one buffer and moved in when it fits inline: this runs for every key a window
    // fires or spills
    let mut inline = [0u8; 24];
    if n + key.len() <= inline.len() {
        inline[..n].copy_from_slice(&head[..n]);
        inline[n..n + key.len()].copy_from_slice(key);
        return super::StateKey::from_buf_and_len(inline, n + key.len());
    }
    let mut k = Vec::with_capacity(n + key.len());
    k.extend_from_slice(&head[..n]);
    k.extend_from_slice(key);
    super::StateKey::from_vec(k)
}

/// The bytes of a [`timer_order`] before the key: the key group and the key's length
/// (LEB128), and how many of them there are.
pub(crate) fn order_head(kg: KeyGroup, len: usize) -> ([u8; 12], usize) {
    let mut head = [0u8; 12];
    head[..2].copy_from_slice(&(kg.0 as u16).to_be_bytes());
    let (len, n) = leb128(len);
    head[2..2 + n].copy_from_slice(&len[..n]);
    (head, 2 + n)
}

/// The encoded key of a [`timer_order`].
pub(crate) fn key_of_order(order: &[u8]) -> Option<&[u8]> {
    let (len, key) = split_length(order.get(2..)?)?;
    (key.len() == len).then_some(key)
}

/// A key's length as row keys and orders hold it (LEB128, see [`leb128`]) and the bytes after it.
fn split_length(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let mut len = 0usize;
    for (i, b) in bytes.iter().enumerate().take(5) {
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Some((len, bytes.get(i + 1..)?));
        }
    }
    None
}

/// Appends the [`row_key`] of (`key`, `ns`) to `buf`.
pub(crate) fn push_row_key(buf: &mut Vec<u8>, kg: KeyGroup, table: [u8; 4], key: &[u8], ns: i64) {
    push_key_prefix(buf, kg, table, key);
    buf.extend_from_slice(&time_bytes(ns));
}

/// The encoded key and namespace of a [`row_key`] (`None` if `row` is not one).
pub(crate) fn decode_row_key(row: &[u8]) -> Option<(&[u8], i64)> {
    let (len, tail) = split_length(row.get(6..)?)?;
    if tail.len() != len.checked_add(8)? {
        return None;
    }
    let (key, ns) = tail.split_at(len);
    Some((key, time_from_bytes(ns.try_into().ok()?)))
}

/// The row key of (`key`, `ns`) in `table`.
pub(crate) fn row_key(kg: KeyGroup, table: [u8; 4], key: &[u8], ns: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + 5 + key.len() + 8);
    push_row_key(&mut k, kg, table, key, ns);
    k
}

/// Smallest row key of layout 2: key group, table, a length byte, no key, the namespace.
const MIN_ROW: usize = 2 + 4 + 1 + 8;

/// The prefix extractor's domain: rows in key groups (timers and the marker are outside it).
fn is_row(row: &[u8]) -> bool {
    row.len() >= MIN_ROW && row[..2] != OUTSIDE
}

/// The prefix extractor: a row key without its namespace (the rows of one key, which the
/// length prefix of the key keeps contiguous).
fn row_prefix(row: &[u8]) -> &[u8] {
    &row[..row.len().saturating_sub(8)]
}

fn kg_prefix(kg: u32) -> [u8; 2] {
    (kg as u16).to_be_bytes()
}

/// Where a scan of one table's rows in the owned key groups stands
/// ([`KeyedBackend::scan_table`]).
#[derive(Debug)]
pub(crate) struct TableScan {
    table: [u8; 4],
    /// The key group being read; `None` before the first call.
    kg: Option<u32>,
    /// The row to go on from in it; `None` for its first.
    from: Option<Vec<u8>>,
}

impl TableScan {
    /// A scan of `table` from its first row.
    pub(crate) fn new(table: [u8; 4]) -> Self {
        TableScan {
            table,
            kg: None,
            from: None,
        }
    }

    /// The table it reads.
    pub(crate) fn table(&self) -> [u8; 4] {
        self.table
    }

    /// True before its first read.
    pub(crate) fn at_start(&self) -> bool {
        self.kg.is_none()
    }
}

/// One operator's keyed state in one subtask.
pub struct KeyedBackend {
    /// Always `Some` until dropped (the directory is removed after the instance closes).
    db: Option<DB>,
    dir: PathBuf,
    range: KeyGroupRange,
    max_parallelism: u32,
    cache_keys: usize,
    memory: Arc<StateMemory>,
    _lease: Lease,
    /// Event-time clock of the compaction filter: rows whose deadline is at or before it go.
    clock: Arc<AtomicI64>,
    /// Whether the instance may hold rows no in-memory cache has seen (restored state).
    restored: bool,
    /// The layout of the rows it was restored from ([`FORMAT`] when it started empty).
    format: u32,
    /// Every table recorded the namespaces it wrote since the instance started empty (the
    /// [`ranges_marker`]).
    ranges: bool,
    /// The iterator key reads seek with, kept between reads (making one costs more than the
    /// seek) and dropped by every write, so that a read sees all writes before it. It borrows
    /// `db`, and is dropped before it (see `Drop`).
    reader: Mutex<Option<DBRawIteratorWithThreadMode<'static, DB>>>,
    /// Where a snapshot begun on this instance stands (see the module's doc).
    snapshot: Mutex<SnapshotGate>,
    snapshot_done: Condvar,
    /// Whether a read must take the gate's lock: `SnapshotGate::unwritten`, or a failed
    /// snapshot. Read without the lock by every read.
    unwritten: AtomicBool,
    /// Accesses of its tables' caches, and those that read RocksDB (added up by the tables
    /// every few thousand accesses, when they flush and when they are dropped); shared with
    /// the subtask's metrics.
    cache: Arc<CacheCounts>,
}

#[derive(Default)]
struct SnapshotGate {
    /// Writes are kept in `deferred` (a snapshot's synchronous part is running).
    deferring: bool,
    deferred: Vec<WriteBatch>,
    /// Bytes of `deferred`.
    deferred_bytes: usize,
    /// A begun snapshot's rows are not written yet: reads wait.
    unwritten: bool,
    /// A begun snapshot is not linked yet: writes wait.
    running: bool,
    /// Why a snapshot failed: the instance can no longer be trusted, and every later read and
    /// write fails with this, so the subtask restarts from its last checkpoint.
    failed: Option<String>,
}

/// A snapshot begun on the subtask's thread and taken on another (see
/// [`KeyedBackend::begin_snapshot`]). Reads of the instance wait until its rows are written,
/// and writes until it is taken or dropped.
pub struct PendingSnapshot {
    backend: Arc<KeyedBackend>,
    rows: Vec<WriteBatch>,
}

impl PendingSnapshot {
    /// Writes the snapshot's rows, flushes the memtables and links a consistent copy of the
    /// instance into `into` (which must not exist); returns its files with their sizes. A
    /// failure also fails every later read and write of the instance.
    pub fn take(mut self, into: &Path) -> Result<Vec<(String, u64)>> {
        let b = self.backend.clone();
        let result = self.write_rows().and_then(|()| {
            b.drop_reader();
            b.rows_written();
            b.link_snapshot(into)
        });
        if let Err(e) = &result {
            b.gate().failed = Some(e.to_string());
        }
        result
    }

    /// Writes the rows kept for the snapshot.
    fn write_rows(&mut self) -> Result<()> {
        std::mem::take(&mut self.rows)
            .into_iter()
            .try_for_each(|batch| self.backend.write_now(batch))
    }
}

impl Drop for PendingSnapshot {
    /// A snapshot dropped before it was taken (its checkpoint given up) still writes its rows:
    /// the tables count them as written.
    fn drop(&mut self) {
        let written = self.write_rows();
        let mut gate = self.backend.gate();
        if let Err(e) = written {
            gate.failed.get_or_insert_with(|| e.to_string());
        }
        gate.running = false;
        drop(gate);
        self.backend.rows_written();
    }
}

impl std::fmt::Debug for KeyedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedBackend")
            .field("dir", &self.dir)
            .field("range", &self.range)
            .finish()
    }
}

/// L0 files (flushed memtables) that start a compaction: RocksDB's default.
const L0_COMPACTION_FILES: i32 = 4;

/// How long a checkpoint runs before a watchdog wakes its waits (see
/// [`KeyedBackend::link_snapshot`]), and again after each such interval.
const CHECKPOINT_NUDGE: std::time::Duration = std::time::Duration::from_secs(2);

fn options(config: &StateConfig, memory: &StateMemory, clock: Arc<AtomicI64>) -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_write_buffer_size(config.write_buffer_bytes);
    opts.set_write_buffer_manager(memory.write_buffers());
    opts.set_max_write_buffer_number(2);
    opts.set_max_open_files(256);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_max_background_jobs(1);
    // Most reads are for keys the state does not hold (new keys) or holds only in SST files:
    // bloom filters answer those without a walk down a memtable's skip list or a data block's
    // read. They hold the rows' prefixes (a key without its namespace, see `row_prefix`), which
    // serve both a point lookup of a one-value table and the prefix seek of the others: a
    // memtable's filter takes a tenth of its size, an SST file's 10 bits per prefix (files of
    // the last level have none, see below).
    opts.set_prefix_extractor(rocksdb::SliceTransform::create(
        "freshet.key",
        row_prefix,
        Some(is_row),
    ));
    opts.set_memtable_prefix_bloom_ratio(0.1);
    opts.set_memtable_whole_key_filtering(false);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(memory.cache());
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(false);
    // Index and filter blocks live in the block cache, so memory stays within it. They are
    // partitioned: a file's whole filter is about a byte and a quarter per key, and once the
    // state outgrew the cache every lookup read and checksummed the full filter of each file
    // it probed; a lookup now reads one small partition, found through a top-level index that
    // stays pinned, and partitions compete with data blocks at high priority (RocksDB's
    // default for cached index and filter blocks).
    table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_metadata_block_size(4096);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_top_level_index_and_filter(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    opts.set_block_based_table_factory(&table);
    // No filters in the last level, which holds nearly every row: a read of a key the state
    // holds finds it there after probing the filters of the levels above, so the last one's
    // filter would only cost the read a partition (and the block cache 10 bits per key: most
    // of RocksDB's share of the default budget at 50M keys). A read of a key the state
    // does not hold then reads the last level's index and a data block; the tables' own spill
    // filters keep those reads to keys they cannot rule out (see `spilled`).
    opts.set_optimize_filters_for_hits(true);
    // Leveled compaction, the levels' sizes derived from the last one's (RocksDB's default):
    // L0 compacts into the first level whose target reaches the base size. At RocksDB's default
    // base (256 MB) a state of a few hundred MB has no level between L0 and the last, and as
    // keys arrive in hash order every L0 compaction rewrote the whole state: a restored
    // deduplication of 10M keys spent twice the subtask's CPU compacting its 10M new ones. A
    // base of what L0 holds when it compacts puts a level of about that size under it, which
    // spills into the last a file at a time.
    opts.set_level_zero_file_num_compaction_trigger(L0_COMPACTION_FILES);
    opts.set_max_bytes_for_level_base(
        (config.write_buffer_bytes as u64).saturating_mul(L0_COMPACTION_FILES as u64),
    );
    opts.set_compaction_filter("freshet-ttl", move |_level, key: &[u8], value: &[u8]| {
        // only rows in key groups carry a deadline: timers and the instance's records do not
        if is_row(key) && value.len() >= 8 {
            let deadline = i64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
            if deadline != NO_DEADLINE && deadline <= clock.load(Ordering::Relaxed) {
                return Decision::Remove;
            }
        }
        Decision::Keep
    });
    opts
}

impl KeyedBackend {
    fn db(&self) -> &DB {
        self.db.as_ref().expect("open until dropped")
    }

    /// An empty instance in `dir` (anything there is removed) for the key groups `range`.
    pub fn open(
        dir: &Path,
        config: &StateConfig,
        range: KeyGroupRange,
        max_parallelism: u32,
    ) -> Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| io_err(format!("clearing {}", dir.display()), e))?;
        }
        let mut backend = Self::open_existing(dir, config, range, max_parallelism, false)?;
        backend.mark_format()?;
        backend.mark_ranges(true)?;
        Ok(backend)
    }

    /// Records that rows are written in this version's layout from now on.
    fn mark_format(&self) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(format_key(), FORMAT.to_be_bytes());
        self.write(batch)
    }

    /// Sets or clears the [`ranges_marker`].
    fn mark_ranges(&mut self, ranges: bool) -> Result<()> {
        let mut batch = WriteBatch::default();
        if ranges {
            batch.put(ranges_marker(), []);
        } else {
            batch.delete(ranges_marker());
        }
        self.ranges = ranges;
        self.write(batch)
    }

    fn read_ranges_marker(db: &DB) -> Result<bool> {
        db.get_pinned(ranges_marker())
            .map(|v| v.is_some())
            .map_err(|e| db_err("reading the namespace range marker", e))
    }

    /// The layout marker of an instance: `0` for instances written before the marker existed.
    fn read_format(db: &DB) -> Result<u32> {
        let raw = db
            .get(format_key())
            .map_err(|e| db_err("reading the state layout", e))?;
        match raw {
            None => Ok(0),
            Some(v) => match <[u8; 4]>::try_from(v.as_slice()) {
                Ok(b) => Ok(u32::from_be_bytes(b)),
                Err(_) => Err(EngineError::StateStore {
                    message: format!("state layout marker of {} bytes", v.len()),
                    retryable: false,
                }),
            },
        }
    }

    fn open_existing(
        dir: &Path,
        config: &StateConfig,
        range: KeyGroupRange,
        max_parallelism: u32,
        restored: bool,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
        let clock = Arc::new(AtomicI64::new(i64::MIN));
        let memory = config
            .memory
            .clone()
            .unwrap_or_else(|| StateMemory::new(config.memory_bytes));
        let lease = memory.lease(config.slot);
        // opened with its one column family named, so that batched lookups have its handle
        let opts = options(config, &memory, clock.clone());
        let default = ColumnFamilyDescriptor::new(DEFAULT_COLUMN_FAMILY_NAME, opts.clone());
        let db = DB::open_cf_descriptors(&opts, dir, [default])
            .map_err(|e| db_err(format!("opening state in {}", dir.display()), e))?;
        let format = if restored {
            Self::read_format(&db)?
        } else {
            FORMAT
        };
        let ranges = restored && Self::read_ranges_marker(&db)?;
        if format > FORMAT {
            return Err(EngineError::State(format!(
                "the state in {} was written in layout {format}, newer than this version reads ({FORMAT}); restore it with the version that wrote it",
                dir.display()
            )));
        }
        Ok(KeyedBackend {
            db: Some(db),
            dir: dir.to_path_buf(),
            range,
            max_parallelism,
            cache_keys: config.cache_keys.unwrap_or(usize::MAX).max(1),
            memory,
            _lease: lease,
            clock,
            restored,
            format,
            ranges,
            reader: Mutex::new(None),
            snapshot: Mutex::new(SnapshotGate::default()),
            snapshot_done: Condvar::new(),
            unwritten: AtomicBool::new(false),
            cache: Arc::default(),
        })
    }

    /// Which of the snapshots covering `parts` [`KeyedBackend::restore`] takes as the instance
    /// for `range` as it is (its files unchanged): the one sharing most key groups with
    /// `range`, if any does.
    pub(crate) fn base_part(range: KeyGroupRange, parts: &[KeyGroupRange]) -> Option<usize> {
        let overlap =
            |r: &KeyGroupRange| (r.end.min(range.end) + 1).saturating_sub(r.start.max(range.start));
        (0..parts.len())
            .filter(|i| overlap(&parts[*i]) > 0)
            .max_by_key(|i| overlap(&parts[*i]))
    }

    /// An instance in `dir` for the key groups `range`, filled from earlier snapshots: `parts`
    /// are directories holding a downloaded snapshot each, with the key groups it covered. The
    /// part that covers most of `range` ([`KeyedBackend::base_part`]) becomes the instance as it
    /// is, and the others are imported (see [`Restoring`]). The parts are removed.
    pub fn restore(
        dir: &Path,
        config: &StateConfig,
        range: KeyGroupRange,
        max_parallelism: u32,
        mut parts: Vec<(PathBuf, KeyGroupRange)>,
    ) -> Result<Self> {
        let ranges: Vec<KeyGroupRange> = parts.iter().map(|(_, r)| *r).collect();
        let base = Self::base_part(range, &ranges).map(|i| parts.remove(i));
        let mut restoring = Restoring::begin(dir, config, range, max_parallelism, base)?;
        for part in parts {
            restoring.add(part)?;
        }
        restoring.finish()
    }

    /// Writes the rows of this instance's key groups in the snapshot in `part` (which covered
    /// the key groups `covered`), and the timers of keys in them, into SST files named after
    /// `sst` and ingests them, and widens each table's namespace range by the snapshot's;
    /// returns the snapshot's layout and whether it had the [`ranges_marker`]. The key groups
    /// are split into contiguous runs written on threads of their own, one per core up to
    /// [`IMPORT_THREADS`].
    fn import(
        &self,
        part: &Path,
        covered: KeyGroupRange,
        sst: &Path,
        config: &StateConfig,
    ) -> Result<(u32, bool)> {
        let clock = Arc::new(AtomicI64::new(i64::MIN));
        let opts = options(config, &self.memory, clock);
        let src = DB::open_for_read_only(&opts, part, false)
            .map_err(|e| db_err(format!("reading snapshot {}", part.display()), e))?;
        let format = Self::read_format(&src)?;
        if format > FORMAT {
            return Err(EngineError::State(format!(
                "snapshot {} was written in layout {format}, newer than this version reads ({FORMAT})",
                part.display()
            )));
        }
        let file = |i: usize| sst.with_extension(format!("{i}.sst"));
        // rows in key order: the key groups of both ranges, in runs, then the timers of their
        // keys (timers are ordered by time, not by key group: each one's key says where it goes)
        let (lo, hi) = (
            self.range.start.max(covered.start),
            self.range.end.min(covered.end),
        );
        let groups = (hi + 1).saturating_sub(lo) as usize;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, IMPORT_THREADS)
            .min(groups.max(1));
        let runs: Vec<(u32, u32)> = (0..threads)
            .map(|t| {
                let from = lo + (groups * t / threads) as u32;
                let to = lo + (groups * (t + 1) / threads) as u32;
                (from, to)
            })
            .filter(|(from, to)| from < to)
            .collect();
        let src = &src;
        let opts = &opts;
        let written: Vec<Result<Option<PathBuf>>> = std::thread::scope(|s| {
            let handles: Vec<_> = runs
                .iter()
                .enumerate()
                .map(|(i, &(from, to))| {
                    let path = file(i);
                    s.spawn(move || {
                        let mut ro = ReadOptions::default();
                        ro.set_total_order_seek(true);
                        ro.set_iterate_upper_bound(kg_prefix(to).to_vec());
                        let rows = src
                            .iterator_opt(
                                IteratorMode::From(&kg_prefix(from), Direction::Forward),
                                ro,
                            )
                            .map(|item| item.map_err(|e| db_err("reading snapshot", e)));
                        write_sst(opts, &path, rows)
                    })
                })
                .collect();
            // the timers meanwhile, on this thread
            let timers = self.import_timers(src, opts, &file(runs.len()));
            let mut results: Vec<Result<Option<PathBuf>>> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect();
            results.push(timers);
            results
        });
        let mut files = Vec::new();
        let mut failed = None;
        for w in written {
            match w {
                Ok(f) => files.extend(f),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            for f in &files {
                let _ = std::fs::remove_file(f);
            }
            return Err(e);
        }
        let ranges = Self::read_ranges_marker(src)?;
        self.widen_ranges(src)?;
        if files.is_empty() {
            return Ok((format, ranges));
        }
        let mut ingest = rocksdb::IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        let ingested = self
            .db()
            .ingest_external_file_opts(&ingest, files.clone())
            .map_err(|e| db_err(format!("ingesting {}", sst.display()), e));
        for f in &files {
            let _ = std::fs::remove_file(f);
        }
        ingested?;
        Ok((format, ranges))
    }

    /// Writes the timers of both layouts (an older snapshot's are moved when their queue
    /// attaches) and the pane rows in `src` of keys this instance owns into the SST file `sst`;
    /// `None` if there are none.
    fn import_timers(&self, src: &DB, opts: &Options, sst: &Path) -> Result<Option<PathBuf>> {
        let timers = [&OUTSIDE[..], &[LEGACY_TIMERS]].concat();
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound([&OUTSIDE[..], &[PANES + 1]].concat());
        let owns_order = |order: Option<&[u8]>| {
            order.and_then(|o| o.get(..2)).is_some_and(|kg| {
                self.range
                    .contains(KeyGroup(u16::from_be_bytes([kg[0], kg[1]]) as u32))
            })
        };
        let rows = src
            .iterator_opt(IteratorMode::From(&timers, Direction::Forward), ro)
            .map(|item| item.map_err(|e| db_err("reading snapshot", e)))
            .filter(|item| {
                let Ok((k, _)) = item else {
                    return true;
                };
                match k[2] {
                    PANES => owns_order(decode_pane_row(k).map(|(_, _, _, order)| order)),
                    LEGACY_PANES => {
                        owns_order(decode_legacy_pane_row(k).map(|(_, _, order)| order))
                    }
                    LEGACY_TIMERS => decode_timer_key(k).is_some_and(|(_, key)| self.owns(key)),
                    _ => decode_timer_key(k)
                        .and_then(|(_, rest)| key_of_order(rest))
                        .is_some_and(|key| self.owns(key)),
                }
            });
        write_sst(opts, sst, rows)
    }

    /// Widens this instance's namespace range of each table by the one `src` recorded.
    fn widen_ranges(&self, src: &DB) -> Result<()> {
        let prefix = range_rows();
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        let mut upper = prefix.clone();
        *upper.last_mut().expect("not empty") += 1;
        ro.set_iterate_upper_bound(upper);
        let mut batch = WriteBatch::default();
        for item in src.iterator_opt(IteratorMode::From(&prefix, Direction::Forward), ro) {
            let (k, v) = item.map_err(|e| db_err("reading snapshot", e))?;
            let theirs = decode_range(&v)?;
            let ours = self.get(&k, decode_range)?;
            batch.put(&k, range_value(union(ours, theirs)));
        }
        self.write(batch)
    }

    /// The distinct (generation, namespace) pairs of pane table `table` that hold rows of this
    /// instance's key groups, ascending.
    pub(crate) fn pane_parts(&self, table: [u8; 4]) -> Result<Vec<(u32, i64)>> {
        self.wait_for_rows()?;
        let prefix = pane_prefix(table);
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound(prefix_upper(&prefix));
        let mut it = self.db().raw_iterator_opt(ro);
        let mut out = Vec::new();
        it.seek(&prefix);
        while let Some(k) = it.key() {
            let Some((generation, ns, ..)) = decode_pane_row(k) else {
                return Err(bad_pane_row(k));
            };
            // a row of this instance's key groups, of either kind
            for kind in [PANE_VALUE, PANE_BLOCK] {
                let (first, upper) = self.pane_kind_bounds(table, generation, ns, kind);
                it.seek(&first);
                if it.key().is_some_and(|k| k < upper.as_slice()) {
                    out.push((generation, ns));
                    break;
                }
            }
            match (ns.checked_add(1), generation.checked_add(1)) {
                (Some(next), _) => it.seek(pane_ns_prefix(table, generation, next)),
                (None, Some(next)) => it.seek(pane_generation_prefix(table, next)),
                (None, None) => break,
            }
        }
        it.status().map_err(|e| db_err("reading state", e))?;
        Ok(out)
    }

    /// The first row key of the rows of `kind` of (`generation`, `ns`) in this instance's key
    /// groups, and the row key above them.
    fn pane_kind_bounds(
        &self,
        table: [u8; 4],
        generation: u32,
        ns: i64,
        kind: u8,
    ) -> (Vec<u8>, Vec<u8>) {
        let prefix = pane_kind_prefix(table, generation, ns, kind);
        let mut first = prefix.clone();
        first.extend_from_slice(&kg_prefix(self.range.start));
        let mut upper = prefix;
        upper.extend_from_slice(&kg_prefix(self.range.end + 1));
        (first, upper)
    }

    /// Calls `f(order, generation, value)` for the values of namespace `ns` of pane table
    /// `table` in `generations` (ascending) and this instance's key groups, in key order and,
    /// for one key, in generation order (a merge of an ordered read of each generation's
    /// values and blocks), from key order `from` (`(order, true)`: at it; `(order, false)`:
    /// after it; `None`: the first); stops before the values of the `limit + 1`th distinct key.
    pub(crate) fn read_pane(
        &self,
        table: [u8; 4],
        ns: i64,
        generations: &[u32],
        from: Option<(&[u8], bool)>,
        limit: usize,
        mut f: impl FnMut(&[u8], u32, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.wait_for_rows()?;
        let mut cursors = Vec::with_capacity(generations.len() * 2);
        for &generation in generations {
            for kind in [PANE_VALUE, PANE_BLOCK] {
                let (first, upper) = self.pane_kind_bounds(table, generation, ns, kind);
                let mut ro = ReadOptions::default();
                ro.set_total_order_seek(true);
                ro.set_iterate_lower_bound(first.clone());
                ro.set_iterate_upper_bound(upper);
                ro.fill_cache(false);
                let mut it = self.db().raw_iterator_opt(ro);
                match from {
                    // a block holding `order` starts at or before it
                    Some((order, _)) => {
                        let mut at = pane_kind_prefix(table, generation, ns, kind);
                        at.extend_from_slice(order);
                        if kind == PANE_BLOCK {
                            it.seek_for_prev(&at);
                            if !it.valid() {
                                it.seek(&first);
                            }
                        } else {
                            it.seek(&at);
                        }
                    }
                    None => it.seek(&first),
                }
                let mut c = PaneCursor::new(it, generation, kind == PANE_BLOCK)?;
                if let Some((order, inclusive)) = from {
                    while c
                        .current()
                        .is_some_and(|(o, _)| o < order || (!inclusive && o == order))
                    {
                        c.advance()?;
                    }
                }
                match c.current() {
                    Some(_) => cursors.push(c),
                    None => c.finish()?,
                }
            }
        }
        // which cursor holds the next row: the smallest key first and, for one key, the oldest
        // generation first (the cursors are in generation order). A loser tree finds it again
        // in a logarithm of the cursors' number in comparisons after its cursor advanced, so a
        // large window that spilled many generations merges them all. Each cursor's first 16
        // bytes of its order, as an integer, orders most pairs without reading their rows.
        fn current<'c>(cursors: &'c [Option<PaneCursor<'_>>], i: usize) -> Option<&'c [u8]> {
            cursors[i]
                .as_ref()
                .and_then(|c| c.current())
                .map(|(o, _)| o)
        }
        fn head(order: &[u8]) -> u128 {
            let mut bytes = [0u8; 16];
            let n = order.len().min(16);
            bytes[..n].copy_from_slice(&order[..n]);
            u128::from_be_bytes(bytes)
        }
        /// Whether cursor `a`'s row comes before cursor `b`'s (an ended cursor's after all).
        fn first(cursors: &[Option<PaneCursor<'_>>], heads: &[u128], a: usize, b: usize) -> bool {
            match (cursors[a].is_some(), cursors[b].is_some()) {
                (true, true) => match heads[a].cmp(&heads[b]) {
                    std::cmp::Ordering::Equal => {
                        (current(cursors, a), a) < (current(cursors, b), b)
                    }
                    o => o.is_lt(),
                },
                (live, _) => live,
            }
        }
        let mut cursors: Vec<Option<PaneCursor>> = cursors.into_iter().map(Some).collect();
        let mut heads: Vec<u128> = (0..cursors.len())
            .map(|i| head(current(&cursors, i).unwrap_or_default()))
            .collect();
        let mut tree = LoserTree::new(cursors.len(), |a, b| first(&cursors, &heads, a, b));
        let mut keys = 0usize;
        let mut last: Vec<u8> = Vec::new();
        while let Some(m) = tree.winner() {
            let Some(c) = cursors[m].as_mut() else {
                break;
            };
            let (order, value) = c.current().expect("a live cursor has a row");
            if keys == 0 || order != last.as_slice() {
                if keys == limit {
                    break;
                }
                keys += 1;
                last.clear();
                last.extend_from_slice(order);
            }
            f(order, c.generation, value)?;
            c.advance()?;
            match current(&cursors, m) {
                None => cursors[m].take().expect("a live cursor").finish()?,
                Some(order) => heads[m] = head(order),
            }
            tree.replay(|a, b| first(&cursors, &heads, a, b));
        }
        for c in cursors.into_iter().flatten() {
            c.finish()?;
        }
        Ok(())
    }

    /// Moves the rows pane table `table` has in layout 4 (see [`FORMAT`]) to this layout,
    /// keeping their generations; returns how many it moved.
    pub(crate) fn move_legacy_panes(&self, table: [u8; 4]) -> Result<u64> {
        self.wait_for_rows()?;
        let prefix = legacy_pane_prefix(table);
        let upper = prefix_upper(&prefix);
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound(upper.clone());
        let mut batch = WriteBatch::default();
        let mut moved = 0u64;
        for item in self
            .db()
            .iterator_opt(IteratorMode::From(&prefix, Direction::Forward), ro)
        {
            let (k, v) = item.map_err(|e| db_err("reading state", e))?;
            let (generation, ns, order) =
                decode_legacy_pane_row(&k).ok_or_else(|| bad_pane_row(&k))?;
            batch.put(pane_row(table, generation, ns, PANE_VALUE, order), &v);
            moved += 1;
            if batch.size_in_bytes() >= 1 << 20 {
                self.write(std::mem::take(&mut batch))?;
            }
        }
        if moved > 0 {
            batch.delete_range(&prefix, &upper);
            self.write(batch)?;
        }
        Ok(moved)
    }

    /// Whether an encoded key belongs to this instance's key groups.
    pub(crate) fn owns(&self, key: &[u8]) -> bool {
        self.range.contains(crate::keys::key_group(
            crate::keys::hash_key(key),
            self.max_parallelism,
        ))
    }

    /// The instance's size as RocksDB estimates it (properties read without taking its locks).
    pub fn size(&self) -> crate::metrics::StateSize {
        let db = self.db();
        let int = |name: &str| db.property_int_value(name).ok().flatten().unwrap_or(0);
        let (cache_lookups, cache_misses) = self.cache.get();
        crate::metrics::StateSize {
            rows: int("rocksdb.estimate-num-keys"),
            disk_bytes: int("rocksdb.live-sst-files-size"),
            cache_lookups,
            cache_misses,
        }
    }

    /// The counts of the tables' cache accesses, which outlive the instance (a subtask's
    /// metrics keep them: its tables add their last counts as they are dropped).
    pub fn cache_counts(&self) -> Arc<CacheCounts> {
        self.cache.clone()
    }

    /// Adds accesses of a table's cache, and those of them that read RocksDB.
    pub fn count_cache(&self, lookups: u64, misses: u64) {
        self.cache.lookups.fetch_add(lookups, Ordering::Relaxed);
        self.cache.misses.fetch_add(misses, Ordering::Relaxed);
    }

    /// The key groups this instance owns.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    /// Number of key groups of the job.
    pub fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }

    /// The cap on keys per table kept in memory (`usize::MAX` without one).
    pub fn cache_keys(&self) -> usize {
        self.cache_keys
    }

    /// The memory budget the instance shares.
    pub fn memory(&self) -> &Arc<StateMemory> {
        &self.memory
    }

    /// True when the instance was filled from a snapshot.
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// The layout the instance's restored rows were written in ([`FORMAT`] for new state).
    pub fn format(&self) -> u32 {
        self.format
    }

    /// The lowest and highest namespace of `table` the instance may hold rows of: `None` if
    /// it holds none, every namespace if the instance cannot tell (restored from a snapshot
    /// taken before tables recorded their ranges).
    pub(crate) fn namespace_range(&self, table: [u8; 4]) -> Result<Option<(i64, i64)>> {
        if !self.ranges {
            return Ok(Some((i64::MIN, i64::MAX)));
        }
        self.get(&range_row(table), decode_range)
    }

    /// Advances the compaction filter's clock (the operator's watermark).
    pub fn advance_clock(&self, wm: i64) {
        self.clock.fetch_max(wm, Ordering::Relaxed);
    }

    /// Calls `f` with the value of row `row`, if the instance holds it.
    pub(crate) fn get<R>(
        &self,
        row: &[u8],
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<Option<R>> {
        self.wait_for_rows()?;
        match self.db().get_pinned(row) {
            Ok(Some(v)) => f(&v).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(db_err("reading state", e)),
        }
    }

    /// Calls `f` with the index and value of each of `rows` (sorted) that the instance holds,
    /// read with one batched lookup: RocksDB probes each file's filter and index once for all
    /// the rows it may hold, instead of once per row.
    pub(crate) fn multi_get(
        &self,
        rows: &[&[u8]],
        mut f: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.wait_for_rows()?;
        let db = self.db();
        let cf =
            db.cf_handle(DEFAULT_COLUMN_FAMILY_NAME)
                .ok_or_else(|| EngineError::StateStore {
                    message: "state instance opened without its column family".into(),
                    retryable: false,
                })?;
        let values = db.batched_multi_get_cf(cf, rows, true);
        for (i, v) in values.into_iter().enumerate() {
            match v {
                Ok(Some(v)) => f(i, &v)?,
                Ok(None) => {}
                Err(e) => return Err(db_err("reading state", e)),
            }
        }
        Ok(())
    }

    /// Writes `batch`, or keeps it for the snapshot being taken (see [`Self::defer_writes`]).
    pub(crate) fn write(&self, batch: WriteBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut gate = self.gate();
        if gate.deferring {
            let bytes = gate.deferred_bytes + batch.size_in_bytes();
            if bytes <= self.deferred_limit() {
                gate.deferred.push(batch);
                gate.deferred_bytes = bytes;
                return Ok(());
            }
            // too many to keep: what was kept and this go in now, in order, and the snapshot
            // (what RocksDB holds plus what is kept) is the same
            let mut gate = self.wait_for_snapshot(gate)?;
            gate.deferred_bytes = 0;
            for kept in std::mem::take(&mut gate.deferred) {
                self.write_now(kept)?;
            }
            return self.write_now(batch);
        }
        // held while writing: no snapshot begins halfway through a batch
        let _gate = self.wait_for_snapshot(gate)?;
        self.write_now(batch)
    }

    /// Bytes of rows a snapshot's synchronous part keeps in memory at most (see
    /// [`Self::defer_writes`]): a sixteenth of a slot's state memory.
    pub(crate) fn deferred_limit(&self) -> usize {
        self.memory.per_slot() / 16
    }

    fn write_now(&self, batch: WriteBatch) -> Result<()> {
        self.drop_reader();
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db()
            .write_opt(batch, &wo)
            .map_err(|e| db_err("writing state", e))
    }

    /// Rows of `table` in the owned key groups, as (row key after the table id, value).
    #[cfg(test)]
    pub(crate) fn scan(&self, table: [u8; 4]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        self.for_each_in_table(table, |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with every row of `table` in the owned key groups, in key order, as (row key
    /// after the table id, value).
    pub(crate) fn for_each_in_table(
        &self,
        table: [u8; 4],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.scan_table(&mut TableScan::new(table), usize::MAX, |k, v| f(&k[6..], v))
            .map(drop)
    }

    /// Calls `f` with up to `limit` rows of the scan's table from where it stands, in key
    /// order, as (row key, value), and moves it past them; false once it passed the last one.
    /// Each call reads what RocksDB holds when it starts.
    pub(crate) fn scan_table(
        &self,
        scan: &mut TableScan,
        limit: usize,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<bool> {
        self.wait_for_rows()?;
        let mut n = 0;
        let kg = scan.kg.get_or_insert(self.range.start);
        while *kg <= self.range.end && n < limit {
            let mut prefix = kg_prefix(*kg).to_vec();
            prefix.extend_from_slice(&scan.table);
            let mut upper = prefix.clone();
            increment(&mut upper);
            let mut ro = ReadOptions::default();
            ro.set_total_order_seek(true);
            ro.set_iterate_upper_bound(upper);
            let mut it = self.db().raw_iterator_opt(ro);
            it.seek(scan.from.as_deref().unwrap_or(&prefix));
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if n == limit {
                    scan.from = Some(k.to_vec());
                    return Ok(true);
                }
                f(k, v)?;
                n += 1;
                it.next();
            }
            it.status().map_err(|e| db_err("reading state", e))?;
            *kg += 1;
            scan.from = None;
        }
        Ok(*kg <= self.range.end)
    }

    /// [`Self::scan_table`], then deletes the rows it read: a range tombstone per key group it
    /// read in, none overlapping another call's, so a table taken out a batch at a time leaves
    /// a tombstone per batch rather than one per row.
    pub(crate) fn drain_table(
        &self,
        scan: &mut TableScan,
        limit: usize,
        f: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<bool> {
        let (first_kg, first_row) = (scan.kg.unwrap_or(self.range.start), scan.from.clone());
        let more = self.scan_table(scan, limit, f)?;
        let last_kg = scan.kg.unwrap_or(self.range.start);
        let mut batch = WriteBatch::default();
        for kg in first_kg..=last_kg.min(self.range.end) {
            let mut prefix = kg_prefix(kg).to_vec();
            prefix.extend_from_slice(&scan.table);
            let from = match &first_row {
                Some(row) if kg == first_kg => row.clone(),
                _ => prefix.clone(),
            };
            let to = if kg == last_kg {
                // the group the scan stands in: up to the row it goes on from, if it read any
                match &scan.from {
                    Some(row) => row.clone(),
                    None => continue,
                }
            } else {
                let mut upper = prefix;
                increment(&mut upper);
                upper
            };
            if from < to {
                batch.delete_range(&from, &to);
            }
        }
        self.write(batch)?;
        Ok(more)
    }

    /// About how many rows `table` holds in the owned key groups: the rows of its first
    /// groups, read until at least `sample` rows or every group, scaled to all of them (keys
    /// hash evenly over key groups). Exact when the table holds fewer than `sample` rows.
    pub(crate) fn estimate_table_rows(&self, table: [u8; 4], sample: usize) -> Result<u64> {
        let groups = u64::from(self.range.end.saturating_sub(self.range.start)) + 1;
        let mut scan = TableScan::new(table);
        // rows of the groups read to their end, and of the group the scan stands in
        let (mut whole, mut current) = (0u64, (u32::MAX, 0u64));
        loop {
            let more = self.scan_table(&mut scan, sample, |row, _| {
                let kg = row.get(..2).map_or(0, |g| u16::from_be_bytes([g[0], g[1]]));
                if u32::from(kg) != current.0 {
                    whole += current.1;
                    current = (u32::from(kg), 0);
                }
                current.1 += 1;
                Ok(())
            })?;
            if !more {
                return Ok(whole + current.1);
            }
            // the scan stands in a group it has not read to its end
            let at = scan.kg.unwrap_or(self.range.start);
            if current.0 < at {
                whole += std::mem::take(&mut current.1);
            }
            let read = u64::from(at - self.range.start);
            if read > 0 && whole >= sample as u64 {
                return Ok(whole * groups / read);
            }
        }
    }

    /// Calls `f` with the namespace and value of every row of one key, in namespace order;
    /// `prefix` is the key's [`key_prefix`].
    pub(crate) fn read_key(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(i64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.wait_for_rows()?;
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let it = reader.get_or_insert_with(|| {
            let mut ro = ReadOptions::default();
            ro.set_prefix_same_as_start(true);
            let it = self.db().raw_iterator_opt(ro);
            // SAFETY: the iterator borrows `self.db`, which outlives it: `Drop` drops the
            // iterator first, and `db` is never replaced while the instance is open.
            unsafe {
                std::mem::transmute::<
                    DBRawIteratorWithThreadMode<'_, DB>,
                    DBRawIteratorWithThreadMode<'static, DB>,
                >(it)
            }
        });
        let mut first = prefix.to_vec();
        first.extend_from_slice(&time_bytes(i64::MIN));
        it.seek(&first);
        let mut result = Ok(());
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(prefix) {
                break;
            }
            let Some(ns) = k
                .get(prefix.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(time_from_bytes)
            else {
                result = Err(EngineError::StateStore {
                    message: format!("a state row key of {} bytes under a key's prefix", k.len()),
                    retryable: false,
                });
                break;
            };
            if let Err(e) = f(ns, v) {
                result = Err(e);
                break;
            }
            it.next();
        }
        if let Err(e) = it.status() {
            // a fresh iterator next time
            *reader = None;
            return Err(db_err("reading state", e));
        }
        result
    }

    /// The keys of up to `limit` rows from `from` (inclusive) to `upper` (exclusive), in order.
    pub(crate) fn scan_keys(
        &self,
        from: &[u8],
        upper: Vec<u8>,
        limit: usize,
    ) -> Result<Vec<Box<[u8]>>> {
        self.wait_for_rows()?;
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound(upper);
        let mut out = Vec::new();
        for item in self
            .db()
            .iterator_opt(IteratorMode::From(from, Direction::Forward), ro)
            .take(limit)
        {
            out.push(item.map_err(|e| db_err("reading state", e))?.0);
        }
        Ok(out)
    }

    /// The last row key from `from` (inclusive) to `upper` (exclusive), if there is one.
    pub(crate) fn last_key(&self, from: &[u8], upper: Vec<u8>) -> Result<Option<Box<[u8]>>> {
        self.wait_for_rows()?;
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_lower_bound(from.to_vec());
        ro.set_iterate_upper_bound(upper);
        let mut it = self.db().raw_iterator_opt(ro);
        it.seek_to_last();
        let key = it.key().map(Box::from);
        it.status().map_err(|e| db_err("reading state", e))?;
        Ok(key)
    }

    /// Deletes the rows from `from` (inclusive) to `to` (exclusive) with one range tombstone.
    pub(crate) fn delete_range(&self, from: &[u8], to: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_range(from, to);
        self.write(batch)
    }

    /// Deletes every row of `table`.
    pub(crate) fn clear_table(&self, table: [u8; 4]) -> Result<()> {
        let mut batch = WriteBatch::default();
        for kg in self.range.start..=self.range.end {
            let mut from = kg_prefix(kg).to_vec();
            from.extend_from_slice(&table);
            let mut to = from.clone();
            increment(&mut to);
            batch.delete_range(&from, &to);
        }
        self.write(batch)
    }

    /// Wakes whatever waits on RocksDB's background condition (see [`Self::link_snapshot`]) by
    /// setting an option to the value it has.
    fn nudge(&self) {
        let value = L0_COMPACTION_FILES.to_string();
        if let Err(e) = self
            .db()
            .set_options(&[("level0_file_num_compaction_trigger", value.as_str())])
        {
            tracing::debug!(error = %e, "waking a checkpoint's wait");
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, SnapshotGate> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no snapshot is being taken; fails if one failed.
    fn wait_for_snapshot<'a>(
        &'a self,
        mut gate: std::sync::MutexGuard<'a, SnapshotGate>,
    ) -> Result<std::sync::MutexGuard<'a, SnapshotGate>> {
        while gate.running {
            gate = self
                .snapshot_done
                .wait(gate)
                .unwrap_or_else(|p| p.into_inner());
        }
        self.check_failed(&gate)?;
        Ok(gate)
    }

    fn check_failed(&self, gate: &SnapshotGate) -> Result<()> {
        match &gate.failed {
            Some(why) => Err(EngineError::StateStore {
                message: format!(
                    "a snapshot of the state in {} failed: {why}",
                    self.dir.display()
                ),
                retryable: true,
            }),
            None => Ok(()),
        }
    }

    /// Waits until the rows of a begun snapshot are written (a read must see them).
    fn wait_for_rows(&self) -> Result<()> {
        if !self.unwritten.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut gate = self.gate();
        while gate.unwritten {
            gate = self
                .snapshot_done
                .wait(gate)
                .unwrap_or_else(|p| p.into_inner());
        }
        self.check_failed(&gate)
    }

    /// A begun snapshot's rows are written (or it was dropped): reads go on, unless a snapshot
    /// failed, which every read then reports.
    fn rows_written(&self) {
        let mut gate = self.gate();
        gate.unwritten = false;
        self.unwritten
            .store(gate.failed.is_some(), Ordering::Release);
        drop(gate);
        self.snapshot_done.notify_all();
    }

    /// Starts the synchronous part of a snapshot: writes from here on (the rows the operator's
    /// snapshot flushes) are kept for [`Self::begin_snapshot`], which ends it, instead of going
    /// into RocksDB on the subtask's thread. Once they would pass a sixteenth of a slot's state
    /// memory, the kept rows go in on the subtask's thread after all and the keeping starts
    /// over, so a snapshot that writes many rows holds no more than that of them in memory.
    pub fn defer_writes(&self) {
        self.gate().deferring = true;
    }

    /// Write batches kept for the snapshot being taken (tests).
    #[cfg(test)]
    pub(crate) fn deferred_batches(&self) -> usize {
        self.gate().deferred.len()
    }

    /// Bytes of the write batches kept for the snapshot being taken (tests).
    #[cfg(test)]
    pub(crate) fn deferred_bytes(&self) -> usize {
        self.gate().deferred_bytes
    }

    /// Begins a snapshot of the instance at this point: the rows written since
    /// [`Self::defer_writes`], on top of what RocksDB holds. Another thread takes it
    /// ([`PendingSnapshot::take`]): writing those rows, flushing the memtables and linking the
    /// files take tens of milliseconds the subtask spends processing instead. Until the rows
    /// are written its reads wait, and until the snapshot is taken or dropped its writes wait.
    pub fn begin_snapshot(self: &Arc<Self>) -> Result<PendingSnapshot> {
        let mut gate = self.gate();
        gate.deferring = false;
        gate.deferred_bytes = 0;
        let rows = std::mem::take(&mut gate.deferred);
        let mut gate = self.wait_for_snapshot(gate)?;
        gate.running = true;
        gate.unwritten = true;
        self.unwritten.store(true, Ordering::Release);
        drop(gate);
        // an idle iterator would keep files the flush and compactions replace
        self.drop_reader();
        Ok(PendingSnapshot {
            backend: self.clone(),
            rows,
        })
    }

    /// Flushes the memtables and links a consistent copy of the instance into `into` (which
    /// must not exist), on this thread. Returns the files of the copy with their sizes (tests;
    /// the runtime snapshots through [`Self::begin_snapshot`]).
    #[cfg(test)]
    pub(crate) fn checkpoint(&self, into: &Path) -> Result<Vec<(String, u64)>> {
        drop(self.wait_for_snapshot(self.gate())?);
        self.drop_reader();
        self.link_snapshot(into)
    }

    fn link_snapshot(&self, into: &Path) -> Result<Vec<(String, u64)>> {
        self.db().flush().map_err(|e| db_err("flushing state", e))?;
        // RocksDB 10.4 can miss the wake-up a checkpoint waits for once obsolete files are
        // purged (when a purge finds nothing to delete), and then waits until something else
        // wakes it; with the subtask's writes held for the snapshot nothing may. While the
        // checkpoint runs, a watchdog sets an option to the value it has every few seconds,
        // which wakes such waiters and changes nothing else.
        let (done, waiting) = std::sync::mpsc::channel::<()>();
        let made = std::thread::scope(|s| {
            s.spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    waiting.recv_timeout(CHECKPOINT_NUDGE)
                {
                    self.nudge();
                }
            });
            let made = Checkpoint::new(self.db()).and_then(|c| c.create_checkpoint(into));
            drop(done);
            made
        });
        made.map_err(|e| db_err(format!("snapshotting state into {}", into.display()), e))?;
        let mut files = Vec::new();
        for entry in
            std::fs::read_dir(into).map_err(|e| io_err(format!("listing {}", into.display()), e))?
        {
            let entry = entry.map_err(|e| io_err("listing snapshot", e))?;
            let meta = entry
                .metadata()
                .map_err(|e| io_err("listing snapshot", e))?;
            if meta.is_file() {
                files.push((entry.file_name().to_string_lossy().into_owned(), meta.len()));
            }
        }
        files.sort();
        Ok(files)
    }

    fn drop_reader(&self) {
        *self.reader.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Directory of the instance.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Compacts every row now (tests: runs the compaction filter).
    #[cfg(test)]
    pub(crate) fn compact(&self) {
        self.db().compact_range(None::<&[u8]>, None::<&[u8]>);
    }

    /// Removes the layout marker, as layout 0 had none (tests).
    #[cfg(test)]
    pub(crate) fn forget_format(&self) {
        self.db().delete(format_key()).expect("delete");
    }

    /// Removes the namespace range marker, as a snapshot of an older version lacks it (tests).
    #[cfg(test)]
    pub(crate) fn forget_ranges(&self) {
        let mut upper = range_rows();
        *upper.last_mut().expect("not empty") += 1;
        self.db().delete(ranges_marker()).expect("delete");
        self.delete_range(&range_rows(), &upper)
            .expect("delete range");
    }

    /// Rewrites the rows of pane table `table` in layout 4, as a version of that layout wrote
    /// them (tests); returns how many.
    #[cfg(test)]
    pub(crate) fn write_panes_in_layout_4(&self, table: [u8; 4]) -> u64 {
        let prefix = pane_prefix(table);
        let mut batch = WriteBatch::default();
        let mut rows = 0;
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound(prefix_upper(&prefix));
        for item in self
            .db()
            .iterator_opt(IteratorMode::From(&prefix, Direction::Forward), ro)
        {
            let (k, v) = item.expect("read");
            let (generation, ns, kind, order) = decode_pane_row(&k).expect("a pane row");
            let mut put = |order: &[u8], v: &[u8]| {
                let mut old = legacy_pane_prefix(table);
                old.extend_from_slice(&time_bytes(ns));
                old.extend_from_slice(order);
                old.extend_from_slice(&generation.to_be_bytes());
                batch.put(old, v);
                rows += 1;
            };
            if kind == PANE_BLOCK {
                for (o, e) in super::pane_blocks::entries(&v).expect("a block") {
                    put(&v[o], &v[e]);
                }
            } else {
                put(order, &v);
            }
        }
        batch.delete_range(&prefix, &prefix_upper(&prefix));
        self.write(batch).expect("write");
        rows
    }

    /// Marks the instance as written in layout `format` (tests of older layouts).
    #[cfg(test)]
    pub(crate) fn set_format(&self, format: u32) {
        self.db()
            .put(format_key(), format.to_be_bytes())
            .expect("put");
    }
}

/// A restore in progress: the instance made of its base snapshot, to which the other snapshots
/// are added one by one as they become available (so their downloads overlap the work on the
/// ones already there).
pub(crate) struct Restoring {
    backend: KeyedBackend,
    config: StateConfig,
    /// The lowest layout of the snapshots added, and whether all of them recorded their
    /// namespace ranges.
    format: u32,
    ranges: bool,
    imported: usize,
}

impl Restoring {
    /// Starts from `base`, a directory holding a downloaded snapshot and the key groups it
    /// covered: it becomes the instance in `dir` as it is, and the rows of key groups outside
    /// `range` are dropped with range deletes (so a rescale costs no copy of the rows it keeps).
    /// Without one, the instance starts empty.
    pub(crate) fn begin(
        dir: &Path,
        config: &StateConfig,
        range: KeyGroupRange,
        max_parallelism: u32,
        base: Option<(PathBuf, KeyGroupRange)>,
    ) -> Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| io_err(format!("clearing {}", dir.display()), e))?;
        }
        let Some((base, base_range)) = base else {
            let backend = KeyedBackend::open_existing(dir, config, range, max_parallelism, true)?;
            return Ok(Restoring {
                format: backend.format,
                ranges: true,
                backend,
                config: config.clone(),
                imported: 0,
            });
        };
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| io_err(format!("creating {}", parent.display()), e))?;
        }
        std::fs::rename(&base, dir)
            .map_err(|e| io_err(format!("moving {} into place", base.display()), e))?;
        let backend = KeyedBackend::open_existing(dir, config, range, max_parallelism, true)?;
        let mut batch = WriteBatch::default();
        if base_range.start < range.start {
            batch.delete_range(kg_prefix(0), kg_prefix(range.start));
        }
        if base_range.end > range.end {
            batch.delete_range(kg_prefix(range.end + 1), OUTSIDE);
        }
        backend.write(batch)?;
        Ok(Restoring {
            format: backend.format,
            ranges: backend.ranges,
            backend,
            config: config.clone(),
            imported: 0,
        })
    }

    /// Adds the snapshot in `part` (a directory, with the key groups it covered): the rows of
    /// this instance's key groups, and the timers of keys in them, are written into an SST file
    /// and ingested. Timers of foreign keys that stay behind are dropped when they come due. The
    /// part is removed.
    pub(crate) fn add(&mut self, (part, r): (PathBuf, KeyGroupRange)) -> Result<()> {
        if r.intersects(&self.backend.range) {
            let sst = self
                .backend
                .dir
                .with_extension(format!("ingest-{}.sst", self.imported));
            self.imported += 1;
            let (f, rs) = self.backend.import(&part, r, &sst, &self.config)?;
            self.format = self.format.min(f);
            self.ranges &= rs;
        }
        remove_part(&part)
    }

    /// The restored instance, marked with the lowest layout of its snapshots.
    pub(crate) fn finish(mut self) -> Result<KeyedBackend> {
        self.backend.format = self.format;
        self.backend.mark_format()?;
        self.backend.mark_ranges(self.ranges)?;
        Ok(self.backend)
    }
}

/// Threads an import writes SST files on at most.
const IMPORT_THREADS: usize = 4;

/// Writes `rows` (in key order) into the SST file `path`; `None`, and no file, if there are
/// none.
fn write_sst(
    opts: &Options,
    path: &Path,
    rows: impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>)>>,
) -> Result<Option<PathBuf>> {
    let mut writer = rocksdb::SstFileWriter::create(opts);
    writer
        .open(path)
        .map_err(|e| db_err(format!("creating {}", path.display()), e))?;
    let mut any = false;
    let written = rows.into_iter().try_for_each(|row| {
        let (k, v) = row?;
        any = true;
        writer
            .put(&k, &v)
            .map_err(|e| db_err(format!("writing {}", path.display()), e))
    });
    if let Err(e) = written {
        drop(writer);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    if !any {
        drop(writer);
        let _ = std::fs::remove_file(path);
        return Ok(None);
    }
    writer
        .finish()
        .map_err(|e| db_err(format!("writing {}", path.display()), e))?;
    Ok(Some(path.to_path_buf()))
}

fn remove_part(part: &Path) -> Result<()> {
    std::fs::remove_dir_all(part).map_err(|e| io_err(format!("removing {}", part.display()), e))
}

/// The smallest key above every key that starts with `prefix`.
pub(crate) fn prefix_upper(prefix: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    increment(&mut k);
    k
}

/// The smallest byte string greater than every string starting with `prefix`.
fn increment(prefix: &mut Vec<u8>) {
    while let Some(last) = prefix.last_mut() {
        if *last < 0xff {
            *last += 1;
            return;
        }
        prefix.pop();
    }
}

/// Accesses of an instance's table caches, and those of them that read RocksDB.
#[derive(Debug, Default)]
pub struct CacheCounts {
    lookups: AtomicU64,
    misses: AtomicU64,
}

impl CacheCounts {
    /// (accesses, those that read RocksDB) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.lookups.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

impl Drop for KeyedBackend {
    fn drop(&mut self) {
        self.drop_reader();
        // the instance is a working copy (snapshots live in object storage): close, then remove
        drop(self.db.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An ordered read of one generation's pane values of one kind: rows of single values, or
/// blocks, each read whole and walked entry by entry.
struct PaneCursor<'a> {
    it: DBRawIteratorWithThreadMode<'a, DB>,
    generation: u32,
    /// For blocks: the current block and where its entries lie; `at` is the current entry.
    block: Option<(Vec<u8>, super::pane_blocks::Entries)>,
    at: usize,
}

impl<'a> PaneCursor<'a> {
    /// A cursor at the row `it` is at.
    fn new(it: DBRawIteratorWithThreadMode<'a, DB>, generation: u32, blocks: bool) -> Result<Self> {
        let mut c = PaneCursor {
            it,
            generation,
            block: blocks.then(|| (Vec::new(), Vec::new())),
            at: 0,
        };
        c.load()?;
        Ok(c)
    }

    /// Reads the block the iterator is at, skipping empty ones.
    fn load(&mut self) -> Result<()> {
        let Some((buf, entries)) = self.block.as_mut() else {
            return Ok(());
        };
        self.at = 0;
        entries.clear();
        while let Some(v) = self.it.value() {
            buf.clear();
            buf.extend_from_slice(v);
            *entries = super::pane_blocks::entries(buf)?;
            if !entries.is_empty() {
                break;
            }
            self.it.next();
        }
        Ok(())
    }

    /// The current (key order, value), if any.
    fn current(&self) -> Option<(&[u8], &[u8])> {
        match &self.block {
            Some((buf, entries)) => entries
                .get(self.at)
                .map(|(o, v)| (&buf[o.clone()], &buf[v.clone()])),
            None => Some((self.it.key()?.get(PANE_ORDER_AT..)?, self.it.value()?)),
        }
    }

    fn advance(&mut self) -> Result<()> {
        match &self.block {
            Some((_, entries)) if self.at + 1 < entries.len() => self.at += 1,
            Some(_) => {
                self.it.next();
                self.load()?;
            }
            None => self.it.next(),
        }
        Ok(())
    }

    /// Whether the read ended without an error.
    fn finish(self) -> Result<()> {
        self.it.status().map_err(|e| db_err("reading state", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watchdog's nudge sets an option RocksDB accepts, to the value it has: the instance
    /// keeps writing and snapshotting.
    #[test]
    fn a_nudge_leaves_the_instance_working() {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::state::table::tests::capped_backend(dir.path(), 1000);
        for _ in 0..3 {
            backend
                .db()
                .set_options(&[(
                    "level0_file_num_compaction_trigger",
                    L0_COMPACTION_FILES.to_string().as_str(),
                )])
                .unwrap();
            backend.nudge();
        }
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(b"k", b"v");
        backend.write(batch).unwrap();
        let snap = dir.path().join("snap");
        assert!(!backend.checkpoint(&snap).unwrap().is_empty());
    }

    /// A row key gives back its key and namespace, whatever the key's length (one and two
    /// bytes of LEB128 length); anything cut short or longer is not a row key.
    #[test]
    fn a_row_key_decodes_to_its_key_and_namespace() {
        for (key, ns) in [
            (&b"k"[..], 0i64),
            (&[7u8; 200][..], -5),
            (&b""[..], i64::MAX),
        ] {
            let row = row_key(KeyGroup(3), [1, 2, 3, 4], key, ns);
            assert_eq!(decode_row_key(&row), Some((key, ns)));
            assert_eq!(decode_row_key(&row[..row.len() - 1]), None);
            assert_eq!(decode_row_key(&[&row[..], &[0]].concat()), None);
        }
        assert_eq!(decode_row_key(&[0, 3, 1, 2, 3, 4, 0x80, 0x80]), None);
        assert_eq!(decode_row_key(&[0, 3]), None);
    }
}

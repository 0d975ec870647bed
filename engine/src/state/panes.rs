//! Pane state: values per (namespace, key) that are read, fired and dropped a namespace at a
//! time — the slices of tumbling and sliding windows.
//!
//! A [`PaneTable`] keeps one *pane* per namespace in memory: a compact hash index from key to
//! row number (16-byte slots, short keys inline), the keys in one buffer, and the values in
//! columns the owner defines ([`PaneColumns`]: a count is an `i64` in an array, not an object
//! per key). An update locates the rows of a batch's keys and hands the owner the columns and
//! the row numbers at once, so aggregates run as loops over arrays, and the memory a record
//! touches is a few bytes per key rather than an entry per key. Nothing per key outlives its
//! pane: no timer, no TTL. A pane is read whole, in the order of its keys' rows (key group,
//! then key), when the windows over it fire, and dropped with one range delete when the last
//! of them is done.
//!
//! **RocksDB.** Once attached, a table writes the rows changed since the last write at every
//! checkpoint ([`PaneTable::flush`]), each as the value its columns give for that row
//! ([`PaneColumns::value`]), under
//! `[ff ff 04][table][generation][namespace][0][key group][key length][key]` outside the key
//! groups (like timers: a restore keeps the rows of its own key groups, see
//! [`super::backend`]). Values are never read back to be updated: when the panes outgrow their
//! share of the job's memory, the table *spills*: it writes every pane in key order as blocks
//! of up to 512 values (`[..][namespace][1][first key's order]`, see [`super::pane_blocks`]),
//! deletes the single values checkpoints wrote of that generation, empties memory (keeping the
//! largest pane's room, still charged, for the next generation to fill), and later
//! updates start new *partial* values under the next generation. A key's value in a pane is the
//! merge of its partials: its values of older generations, and its value in memory (or, if
//! memory has none, its row of the current generation). So a write never needs a read, and
//! readers merge ([`PaneTable::read_merged`] merges a key's partials into one row of columns as
//! it reads them, one ordered read per generation). A restored table goes on with the
//! generation after the newest one its rows are in, so restored partials are never
//! overwritten.
//!
//! With the generation first in the row key, everything a table writes between two spills is
//! one key range of its own: RocksDB's compactions move the files of a finished generation down
//! without merging them with another generation's, so spilled state is not rewritten as it
//! grows; and with blocks, a spill and a read cost a RocksDB row per block, not per key. A
//! dropped namespace is one range delete per generation that holds it.
use hashbrown::HashTable;
use serde::Serialize;
use serde::de::DeserializeOwned;
use smallvec::SmallVec;
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use super::backend::{self, KeyedBackend};
use super::key_slots::word;
use super::pane_blocks;
use super::{FLUSH_BATCH_BYTES, StateKey};
use crate::keys::{hash_key, key_group};
use crate::{EngineError, KeyGroup, Result};

/// The hasher of pane indexes: fixed, so runs over the same input behave alike.
type Fixed = foldhash::fast::FixedState;

/// The partial values of one key in one namespace, oldest first.
pub type Partials<V> = SmallVec<[V; 1]>;

/// A key's rows in one namespace of RocksDB: (generation, value), in generation order.
type Written<V> = SmallVec<[(u32, V); 1]>;

/// The generations one namespace has rows in, ascending.
type Generations = SmallVec<[u32; 4]>;

/// The values of one pane, as columns indexed by row number (a key's row is fixed while the
/// pane is in memory). The owner updates them through [`PaneTable::update`]; the table asks
/// for a row's value when it writes or reads it.
pub trait PaneColumns: Clone + Send + 'static {
    /// One row's value as written to RocksDB and returned by reads.
    type Value: Serialize + DeserializeOwned + Clone + Send + 'static;
    /// Makes rows `0..rows` exist, new ones empty (rows only grow while a pane lives).
    fn resize(&mut self, rows: usize);
    /// Room for `rows` rows in all, without reallocating.
    fn reserve(&mut self, rows: usize);
    /// The value of row `row` of the pane of namespace `ns`.
    fn value(&self, ns: i64, row: u32) -> Self::Value;
    /// Bytes the columns hold on the heap.
    fn bytes(&self) -> usize;
    /// Starts loading what [`value`](Self::value) will read of row `row` (see
    /// [`super::prefetch`]): loops over rows in key order call it some rows ahead.
    fn prefetch(&self, _row: u32) {}
    /// Makes the columns hold no row, keeping their room.
    fn clear(&mut self);
    /// Merges `value` (a partial value of the row's key in namespace `ns`) into row `row`.
    fn merge_value(&mut self, ns: i64, row: u32, value: Self::Value);
    /// Appends the encoding of row `row`'s value (postcard's, exactly as it encodes
    /// [`value`](Self::value)'s), if the columns write it themselves (a common shape, without
    /// building the value); `false`, with nothing appended, otherwise.
    fn encode(&self, _ns: i64, _row: u32, _out: &mut Vec<u8>) -> bool {
        false
    }
    /// Merges a value given as its encoding (postcard, as written) into row `row`, if the
    /// columns read that encoding themselves (a common shape, without building the value);
    /// `false` leaves the row as it was, to be merged through [`merge_value`](Self::merge_value).
    fn merge_encoded(&mut self, _ns: i64, _row: u32, _encoded: &[u8]) -> bool {
        false
    }
    /// Merges row `from_row` of `from` (columns of namespace `ns`) into row `row`: by default
    /// through its [`value`](Self::value).
    fn merge_row(&mut self, ns: i64, row: u32, from: &Self, from_row: u32) {
        self.merge_value(ns, row, from.value(ns, from_row));
    }
}

/// Keys of one namespace with their partial values merged, as [`PaneTable::read_merged`]
/// reads them: the keys' orders in one buffer, and their values as rows of columns (row `i`
/// is the `i`th key), so that reading a pane allocates nothing per key.
#[derive(Debug, Clone)]
pub struct Merged<C> {
    orders: Vec<u8>,
    ends: Vec<u32>,
    columns: C,
}

impl<C: PaneColumns> Merged<C> {
    /// No keys, with columns like `empty`.
    pub fn new(mut empty: C) -> Self {
        empty.clear();
        Merged {
            orders: Vec::new(),
            ends: Vec::new(),
            columns: empty,
        }
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The [`key_order`] of the key of row `row`.
    pub fn order(&self, row: usize) -> &[u8] {
        key_at(&self.orders, &self.ends, row as u32)
    }

    /// The merged values, row `i` the `i`th key's.
    pub fn columns(&self) -> &C {
        &self.columns
    }

    fn clear(&mut self) {
        self.orders.clear();
        self.ends.clear();
        self.columns.clear();
    }

    fn last_order(&self) -> Option<&[u8]> {
        self.len().checked_sub(1).map(|r| self.order(r))
    }

    /// Adds a key after the last, with an empty row; returns its row.
    fn push(&mut self, order: &[u8]) -> u32 {
        let row = self.ends.len() as u32;
        self.orders.extend_from_slice(order);
        self.ends.push(self.orders.len() as u32);
        self.columns.resize(self.ends.len());
        row
    }

    /// The row of key `order`: the last one if it is that key, else a new one.
    fn row_of(&mut self, order: &[u8]) -> u32 {
        match self.last_order() {
            Some(last) if last == order => self.ends.len() as u32 - 1,
            _ => self.push(order),
        }
    }
}

/// How many rows ahead a loop over rows in key order asks for their columns.
const PREFETCH_AHEAD: usize = 8;

/// Values per (namespace, key), held a namespace at a time. See the module documentation.
#[derive(Debug)]
pub struct PaneTable<C: PaneColumns> {
    name: String,
    /// The columns of a new pane.
    empty: C,
    panes: BTreeMap<i64, Pane<C>>,
    /// The job's number of key groups (detached: one).
    max_parallelism: u32,
    /// Estimated bytes of the panes in memory.
    bytes: usize,
    backing: Option<Backing>,
    /// Row numbers of the keys of one update, reused.
    rows: Vec<u32>,
    /// Calls that may have changed values (see [`PaneTable::changes`]).
    changes: u64,
    /// The emptied room of the largest pane dropped or spilled last, charged as it was, for the
    /// next new namespace: a window's next slice (or a slice's next generation) holds about as
    /// many keys, and taking the room again from the allocator each window either faults in
    /// fresh pages (blocks of a megabyte or more are mapped on their own) or leaves it free in
    /// the middle of an arena. A spare no namespace took between two flushes is given back at
    /// the second, so a table whose input went quiet does not hold memory others of the slot
    /// could use.
    spare: Option<Pane<C>>,
    /// Whether the spare was already kept at the last flush.
    spare_flushed: bool,
}

#[derive(Debug)]
struct Backing {
    backend: Arc<KeyedBackend>,
    table: [u8; 4],
    /// The namespaces RocksDB may hold rows of, each with the generations it may hold them in.
    on_disk: BTreeMap<i64, Generations>,
    /// The generation that values in memory are written under.
    generation: u32,
}

/// Keys up to this long are packed into a slot.
const INLINE: usize = 11;

/// The `hi` of a slot whose key is longer than [`INLINE`] (a length no short key has).
const LONG: u32 = u32::MAX;

/// A key of at most [`INLINE`] bytes packed into two words: bytes 0–7 in the first, bytes 8–10
/// and the length in the second.
#[inline]
fn pack(key: &[u8]) -> (u64, u32) {
    debug_assert!(key.len() <= INLINE);
    let (head, tail) = key.split_at(key.len().min(8));
    let hi = tail
        .iter()
        .enumerate()
        .fold((key.len() as u32) << 24, |w, (i, b)| {
            w | (*b as u32) << (8 * i)
        });
    (word(head), hi)
}

/// An index slot: a row and, if its key is short, the key packed into two words (bytes 0–7
/// in `lo`, bytes 8–10 and the length in `hi`); a longer key's slot has [`LONG`] for `hi`.
#[derive(Debug, Clone, Copy)]
struct Slot {
    lo: u64,
    hi: u32,
    row: u32,
}

impl Slot {
    /// The slot `key` would have in `row`, packed in registers (no byte copies through memory,
    /// which the loads of a comparison would then wait on).
    #[inline]
    fn of(key: &[u8], row: u32) -> Slot {
        if key.len() > INLINE {
            return Slot {
                lo: 0,
                hi: LONG,
                row,
            };
        }
        let (lo, hi) = pack(key);
        Slot { lo, hi, row }
    }
}

/// One namespace in memory: the keys' rows and the values' columns.
#[derive(Debug)]
struct Pane<C> {
    /// Rows, found by the key's hash; short keys inline.
    index: HashTable<Slot>,
    /// Per row: its key group, and the end of its key in `keys`.
    groups: Vec<u16>,
    ends: Vec<u32>,
    /// The job's number of key groups.
    max_parallelism: u32,
    keys: Vec<u8>,
    /// One bit per row: changed since last written.
    dirty: Vec<u64>,
    columns: C,
    /// The pane's rows in row order (see [`Pane::in_row_order`]); kept until a key is added.
    sorted: Option<Vec<u32>>,
}

/// A row of a pane with the first 16 bytes of its key's [`key_order`], as two integers that
/// sort as the bytes do (see [`Pane::ordered`]).
#[derive(Debug, Clone, Copy)]
struct Ordered {
    hi: u64,
    lo: u64,
    row: u32,
}

impl Ordered {
    /// A row whose prefix is not known: [`Ordered::order`] reads its key.
    fn unknown(row: u32) -> Self {
        Ordered {
            hi: u64::MAX,
            lo: u64::MAX,
            row,
        }
    }

    /// The row's key order: from the prefix when it holds all of it (a key group, a length
    /// under 128 in one byte, and at most 13 bytes of key), else from the pane.
    fn order<C: PaneColumns>(&self, pane: &Pane<C>) -> StateKey {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.hi.to_be_bytes());
        bytes[8..].copy_from_slice(&self.lo.to_be_bytes());
        let len = bytes[2] as usize;
        if len < 0x80 && 3 + len <= bytes.len() {
            StateKey::from_slice(&bytes[..3 + len])
        } else {
            pane.order(self.row)
        }
    }
}

impl<C: PaneColumns> Pane<C> {
    fn new(mut columns: C, rows: usize, max_parallelism: u32) -> Self {
        columns.reserve(rows);
        Pane {
            index: HashTable::with_capacity(rows),
            groups: Vec::with_capacity(rows),
            max_parallelism,
            ends: Vec::with_capacity(rows),
            keys: Vec::with_capacity(rows * 8),
            dirty: Vec::with_capacity(rows.div_ceil(64)),
            columns,
            sorted: None,
        }
    }

    /// The pane emptied for another namespace, its room kept, with room for `rows` rows.
    fn reuse(mut self, rows: usize, max_parallelism: u32) -> Self {
        self.index.clear();
        if self.index.capacity() < rows {
            self.index = HashTable::with_capacity(rows);
        }
        self.groups.clear();
        self.groups.reserve(rows);
        self.ends.clear();
        self.ends.reserve(rows);
        self.keys.clear();
        self.keys.reserve(rows * 8);
        self.dirty.clear();
        self.dirty.reserve(rows.div_ceil(64));
        self.columns.clear();
        self.columns.reserve(rows);
        self.sorted = None;
        self.max_parallelism = max_parallelism;
        self
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn key(&self, row: u32) -> &[u8] {
        key_at(&self.keys, &self.ends, row)
    }

    /// The [`key_order`] of row `row`'s key.
    fn order(&self, row: u32) -> StateKey {
        backend::timer_order(KeyGroup(self.groups[row as usize] as u32), self.key(row))
    }

    /// Moves the pane to a job of `max_parallelism` key groups.
    fn regroup(&mut self, max_parallelism: u32) {
        self.max_parallelism = max_parallelism;
        for row in 0..self.len() {
            self.groups[row] = key_group(hash_key(self.key(row as u32)), max_parallelism).0 as u16;
        }
    }

    /// The row of `key`, if the pane has one.
    fn find(&self, key: &[u8]) -> Option<u32> {
        let probe = Slot::of(key, 0);
        let (keys, ends) = (&self.keys, &self.ends);
        self.index
            .find(slot_hash(&probe, || key), |s| {
                slot_matches(s, &probe, key, keys, ends)
            })
            .map(|s| s.row)
    }

    /// The row of `key`, added if new.
    fn locate(&mut self, key: &[u8]) -> Result<u32> {
        let probe = Slot::of(key, 0);
        let (keys, ends) = (&self.keys, &self.ends);
        let entry = self.index.entry(
            slot_hash(&probe, || key),
            |s| slot_matches(s, &probe, key, keys, ends),
            // growing rehashes short keys from their slots alone
            |s| slot_hash(s, || key_at(keys, ends, s.row)),
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(e) => Ok(e.get().row),
            hashbrown::hash_table::Entry::Vacant(v) => {
                let row = self.ends.len() as u32;
                let end = u32::try_from(self.keys.len() + key.len()).map_err(|_| {
                    EngineError::State("a pane's keys passed 4 GiB in memory".into())
                })?;
                v.insert(Slot { row, ..probe });
                self.keys.extend_from_slice(key);
                self.ends.push(end);
                self.groups
                    .push(key_group(hash_key(key), self.max_parallelism).0 as u16);
                if self.dirty.len() * 64 < self.ends.len() {
                    self.dirty.push(0);
                }
                self.sorted = None;
                Ok(row)
            }
        }
    }

    fn mark(&mut self, row: u32) {
        self.dirty[row as usize / 64] |= 1 << (row % 64);
    }

    /// Rows changed since last written.
    fn dirty_rows(&self) -> impl Iterator<Item = u32> + '_ {
        self.dirty.iter().enumerate().flat_map(|(w, bits)| {
            let mut bits = *bits;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros();
                    bits &= bits - 1;
                    w as u32 * 64 + b
                })
            })
        })
    }

    /// `rows` sorted in row order: by their keys' [`key_order`]s. Sorted first by the first 16
    /// bytes of the order as two integers (key group, length, then the key), so that only keys
    /// alike in all of those are compared, by their bytes alone (their key groups and lengths
    /// are equal).
    fn in_row_order(&self, rows: impl Iterator<Item = u32>) -> Vec<u32> {
        self.ordered(rows).into_iter().map(|o| o.row).collect()
    }

    /// `rows` in row order as [`in_row_order`](Self::in_row_order) sorts them, each with the
    /// first 16 bytes of its order. Reading the rows' keys in this order touches them at
    /// random, a cache miss each once a pane outgrows the CPU's caches; the prefixes are read
    /// in the rows' own order, and hold the whole order of a key of up to 13 bytes.
    fn ordered(&self, rows: impl Iterator<Item = u32>) -> Vec<Ordered> {
        let mut ordered: Vec<Ordered> = rows
            .map(|r| {
                let key = self.key(r);
                let (head, n) =
                    backend::order_head(KeyGroup(self.groups[r as usize] as u32), key.len());
                let mut prefix = [0u8; 16];
                prefix[..n].copy_from_slice(&head[..n]);
                let k = key.len().min(16 - n);
                prefix[n..n + k].copy_from_slice(&key[..k]);
                let (hi, lo) = prefix.split_at(8);
                Ordered {
                    hi: u64::from_be_bytes(hi.try_into().expect("8 bytes")),
                    lo: u64::from_be_bytes(lo.try_into().expect("8 bytes")),
                    row: r,
                }
            })
            .collect();
        ordered.sort_unstable_by(|a, b| {
            (a.hi, a.lo)
                .cmp(&(b.hi, b.lo))
                .then_with(|| self.key(a.row).cmp(self.key(b.row)))
        });
        ordered
    }

    /// Starts loading what a loop over `rows` (in key order) will read of the rows some steps
    /// after step `i` (see [`super::prefetch`]): two steps' distance apart, the key's end and
    /// group, then the key's bytes (found from its end, loaded by then) and the columns.
    fn prefetch_ahead(&self, rows: &[u32], i: usize) {
        if let Some(&row) = rows.get(i + 2 * PREFETCH_AHEAD) {
            let r = row as usize;
            super::prefetch(&self.ends[r.saturating_sub(1)]);
            super::prefetch(&self.ends[r]);
            super::prefetch(&self.groups[r]);
        }
        if let Some(&row) = rows.get(i + PREFETCH_AHEAD) {
            let start = match row {
                0 => 0,
                r => self.ends[r as usize - 1] as usize,
            };
            if let Some(byte) = self.keys.get(start) {
                super::prefetch(byte);
            }
            self.columns.prefetch(row);
        }
    }

    /// Bytes the pane would add to take `n` more rows: its index, and its row vectors and
    /// columns, double when full.
    fn growth(&self, n: usize) -> usize {
        let rows = self.len().saturating_add(n);
        let index = self.index.allocation_size();
        let mut more = 0;
        if rows > self.index.capacity() {
            more += index;
        }
        if rows > self.ends.capacity() {
            more += self.bytes() - index;
        }
        more
    }

    /// Bytes held on the heap.
    fn bytes(&self) -> usize {
        self.index.allocation_size()
            + self.groups.capacity() * 2
            + self.ends.capacity() * 4
            + self.keys.capacity()
            + self.dirty.capacity() * 8
            + self.columns.bytes()
            + self.sorted.as_ref().map_or(0, |s| s.capacity() * 4)
    }
}

/// The index hash of the key of slot `s` (`key()`, for a long one): a short key's from its two
/// packed words, so growing the index reads nothing but the slots; a long key's from its bytes.
#[inline]
fn slot_hash<'k>(s: &Slot, key: impl FnOnce() -> &'k [u8]) -> u64 {
    if s.hi != LONG {
        Fixed::default().hash_one((s.lo, s.hi))
    } else {
        Fixed::default().hash_one(key())
    }
}

/// Whether slot `s` holds `key`, whose own slot is `probe`: short keys compare inline, long
/// ones by their bytes.
#[inline]
fn slot_matches(s: &Slot, probe: &Slot, key: &[u8], keys: &[u8], ends: &[u32]) -> bool {
    if probe.hi != LONG {
        return s.lo == probe.lo && s.hi == probe.hi;
    }
    s.hi == LONG && key_at(keys, ends, s.row) == key
}

fn key_at<'k>(keys: &'k [u8], ends: &[u32], row: u32) -> &'k [u8] {
    let row = row as usize;
    let start = if row == 0 { 0 } else { ends[row - 1] as usize };
    &keys[start..ends[row] as usize]
}

impl<C: PaneColumns> PaneTable<C> {
    /// A table called `name` (unique within its operator) whose panes start as `empty`, in
    /// memory until attached.
    pub fn new(name: impl Into<String>, empty: C) -> Self {
        PaneTable {
            name: name.into(),
            empty,
            panes: BTreeMap::new(),
            max_parallelism: 1,
            bytes: 0,
            backing: None,
            rows: Vec::new(),
            changes: 0,
            spare: None,
            spare_flushed: false,
        }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the table into `backend`; a restored backend holds its rows. Values in memory are
    /// written at the next flush.
    pub fn attach(&mut self, backend: &Arc<KeyedBackend>) -> Result<()> {
        self.changes += 1;
        let table = backend::value_table_id(&format!("panes/{}", self.name));
        let mut on_disk: BTreeMap<i64, Generations> = BTreeMap::new();
        let mut generation = 0;
        if backend.restored() {
            if backend.format() < 5 {
                backend.move_legacy_panes(table)?;
            }
            for (g, ns) in backend.pane_parts(table)? {
                add_generation(on_disk.entry(ns).or_default(), g);
            }
            generation = backend.next_generation(table)?;
        }
        self.max_parallelism = backend.max_parallelism();
        self.spare = None;
        self.spare_flushed = false;
        for pane in self.panes.values_mut() {
            pane.regroup(self.max_parallelism);
            pane.sorted = None;
            for row in 0..pane.len() as u32 {
                pane.mark(row);
            }
        }
        self.bytes = self.panes.values().map(Pane::bytes).sum();
        backend.memory().add_table();
        backend.memory().charge(0, self.bytes);
        self.backing = Some(Backing {
            backend: backend.clone(),
            table,
            on_disk,
            generation,
        });
        Ok(())
    }

    /// The key order of `key`: its key group, its length and itself, as its rows are sorted.
    fn order(&self, key: &[u8]) -> StateKey {
        key_order(key, self.max_parallelism)
    }

    /// Updates the values of `keys` in namespace `ns`: finds each key's row (adding the keys
    /// memory has no row for: a new partial, if RocksDB holds older ones), then calls `f` once
    /// with the pane's columns and the rows, in the order of `keys` (a key given twice gets its
    /// row twice).
    pub fn update<'k>(
        &mut self,
        ns: i64,
        keys: impl IntoIterator<Item = &'k [u8]>,
        f: impl FnOnce(&mut C, &[u32]),
    ) -> Result<()> {
        self.changes += 1;
        if !self.panes.contains_key(&ns) {
            self.open(ns);
        }
        let keys = keys.into_iter();
        if self.backing.is_some() {
            self.make_room(ns, keys.size_hint().0)?;
        }
        let pane = self.panes.get_mut(&ns).expect("opened above");
        let before = pane.bytes();
        let mut rows = std::mem::take(&mut self.rows);
        rows.clear();
        // a run of the same key is located once
        let mut last: Option<(&[u8], u32)> = None;
        for key in keys {
            let row = match last {
                // (a key given again from the same place is not compared byte by byte)
                Some((k, row))
                    if k.len() == key.len() && (k.as_ptr() == key.as_ptr() || k == key) =>
                {
                    row
                }
                _ => {
                    let row = pane.locate(key)?;
                    pane.mark(row);
                    row
                }
            };
            last = Some((key, row));
            rows.push(row);
        }
        pane.columns.resize(pane.len());
        f(&mut pane.columns, &rows);
        self.rows = rows;
        let after = pane.bytes();
        if after != before {
            self.charge(before, after);
        }
        if after > before {
            self.spill_if_full()?;
        }
        Ok(())
    }

    /// Spills first if namespace `ns`'s pane would have to grow past the memory share to take
    /// `n` more keys: so a pane never takes room it would give up at once, and the next
    /// generation starts in the room this one filled.
    #[inline(never)]
    fn make_room(&mut self, ns: i64, n: usize) -> Result<()> {
        let (Some(b), Some(pane)) = (&self.backing, self.panes.get(&ns)) else {
            return Ok(());
        };
        let growth = pane.growth(n);
        if growth > 0
            && b.backend
                .memory()
                .must_evict(self.bytes.saturating_add(growth))
        {
            self.spill()?;
            self.open(ns);
        }
        Ok(())
    }

    /// Opens namespace `ns` in memory, in the spare room if there is one.
    fn open(&mut self, ns: i64) {
        // a new slice holds about as many keys as the one before: sized once, not grown,
        // unless that size alone would pass the memory share
        let mut like = self.panes.values().map(Pane::len).max().unwrap_or(0);
        let estimate = self.panes.values().map(Pane::bytes).max().unwrap_or(0);
        // the spare's room is charged already, and becomes this pane's
        let spare = self.spare.as_ref().map_or(0, Pane::bytes);
        if let Some(b) = &self.backing
            && b.backend
                .memory()
                .must_evict(self.bytes.saturating_add(estimate).saturating_sub(spare))
        {
            like = 0;
        }
        self.spare_flushed = false;
        let pane = match self.spare.take() {
            Some(p) => p.reuse(like, self.max_parallelism),
            None => Pane::new(self.empty.clone(), like, self.max_parallelism),
        };
        let size = pane.bytes();
        self.panes.insert(ns, pane);
        self.charge(spare, size);
    }

    fn charge(&mut self, old: usize, new: usize) {
        self.bytes = (self.bytes + new).saturating_sub(old);
        if let Some(b) = &self.backing {
            b.backend.memory().charge(old, new);
        }
    }

    /// Writes every pane and empties memory when the panes passed their share of the job's
    /// memory; later updates start partials of the next generation.
    fn spill_if_full(&mut self) -> Result<()> {
        let Some(b) = &self.backing else {
            return Ok(());
        };
        if !b.backend.memory().must_evict(self.bytes) {
            return Ok(());
        }
        self.spill()
    }

    /// Writes every pane and empties memory, keeping the largest pane's room; later updates
    /// start partials of the next generation. A pane is written as blocks of values in key
    /// order (what checkpoints wrote of it one value per row is deleted first), so writing it
    /// and reading it back cost a row per block rather than per key.
    fn spill(&mut self) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            return Ok(());
        };
        let mut batch = rocksdb::WriteBatch::default();
        let mut block = pane_blocks::BlockWriter::default();
        let mut value = Vec::new();
        for (&ns, pane) in self.panes.iter_mut() {
            if pane.len() == 0 {
                continue;
            }
            let generations = b.on_disk.entry(ns).or_default();
            if generations.contains(&b.generation) {
                let values = backend::pane_row(b.table, b.generation, ns, backend::PANE_VALUE, &[]);
                let blocks = backend::pane_row(b.table, b.generation, ns, backend::PANE_BLOCK, &[]);
                batch.delete_range(&values, &blocks);
            }
            add_generation(generations, b.generation);
            let sorted = match pane.sorted.take() {
                Some(sorted) => sorted.into_iter().map(Ordered::unknown).collect(),
                None => pane.ordered(0..pane.len() as u32),
            };
            let put = |batch: &mut rocksdb::WriteBatch, block: &mut pane_blocks::BlockWriter| {
                if let Some((first, bytes)) = block.take() {
                    batch.put(
                        backend::pane_row(b.table, b.generation, ns, backend::PANE_BLOCK, first),
                        bytes,
                    );
                }
            };
            for (i, row) in sorted.iter().enumerate() {
                if let Some(ahead) = sorted.get(i + PREFETCH_AHEAD) {
                    pane.columns.prefetch(ahead.row);
                }
                let order = row.order(pane);
                let row = row.row;
                if block.must_close_before(&order) {
                    put(&mut batch, &mut block);
                    if batch.size_in_bytes() >= FLUSH_BATCH_BYTES {
                        b.backend.write(std::mem::take(&mut batch))?;
                    }
                }
                encode_row(&self.name, &pane.columns, ns, row, &mut value)?;
                block.push(&order, &value);
            }
            put(&mut batch, &mut block);
        }
        b.backend.write(batch)?;
        b.generation = b.generation.checked_add(1).ok_or_else(|| {
            EngineError::State(format!("{}: spill generations exhausted", self.name))
        })?;
        let memory = b.backend.memory();
        memory.charge(std::mem::take(&mut self.bytes), 0);
        // the largest pane's room stays, emptied, for the next generation (which fills about
        // as much before it spills again), unless holding it alone would have to evict
        let largest = std::mem::take(&mut self.panes)
            .into_values()
            .chain(self.spare.take())
            .max_by_key(Pane::bytes);
        let room = largest.filter(|p| !memory.must_evict(p.bytes()));
        self.keep_room(room);
        self.charge(0, self.spare.as_ref().map_or(0, Pane::bytes));
        Ok(())
    }

    /// Keeps `pane`'s room, emptied, as the spare (the caller charges it), kept since now.
    fn keep_room(&mut self, pane: Option<Pane<C>>) {
        self.spare = pane.map(|p| p.reuse(0, self.max_parallelism));
        self.spare_flushed = false;
    }

    /// Writes the values changed since the last write (called before a snapshot). A detached
    /// table keeps them. A spare room kept since the last flush is given back.
    pub fn flush(&mut self) -> Result<()> {
        if self.spare_flushed
            && let Some(idle) = self.spare.take()
        {
            self.charge(idle.bytes(), 0);
        }
        self.spare_flushed = self.spare.is_some();
        let Some(b) = self.backing.as_mut() else {
            return Ok(());
        };
        // in batches of `FLUSH_BATCH_BYTES`
        let mut batch = rocksdb::WriteBatch::default();
        let mut rows = 0usize;
        let mut buf = Vec::new();
        for (&ns, pane) in self.panes.iter_mut() {
            // in row order: RocksDB's memtable inserts ascending keys cheaply
            let dirty = pane.ordered(pane.dirty_rows());
            if dirty.is_empty() {
                continue;
            }
            for (i, row) in dirty.iter().enumerate() {
                if let Some(ahead) = dirty.get(i + PREFETCH_AHEAD) {
                    pane.columns.prefetch(ahead.row);
                }
                let order = row.order(pane);
                let row = row.row;
                encode_row(&self.name, &pane.columns, ns, row, &mut buf)?;
                batch.put(
                    backend::pane_row(b.table, b.generation, ns, backend::PANE_VALUE, &order),
                    &buf,
                );
                rows += 1;
                if batch.size_in_bytes() >= FLUSH_BATCH_BYTES {
                    b.backend.write(std::mem::take(&mut batch))?;
                }
            }
            pane.dirty.iter_mut().for_each(|w| *w = 0);
            add_generation(b.on_disk.entry(ns).or_default(), b.generation);
        }
        if rows == 0 {
            return Ok(());
        }
        b.backend.write(batch)
    }

    /// The namespaces that hold values, ascending.
    pub fn namespaces(&self) -> Vec<i64> {
        let mut out: Vec<i64> = self.panes.keys().copied().collect();
        if let Some(b) = &self.backing {
            out.extend(b.on_disk.keys().copied());
            out.sort_unstable();
            out.dedup();
        }
        out
    }

    /// The smallest namespace at or above `from` that holds values.
    pub fn first_namespace_from(&self, from: i64) -> Option<i64> {
        let mem = self.panes.range(from..).next().map(|(ns, _)| *ns);
        let disk = self
            .backing
            .as_ref()
            .and_then(|b| b.on_disk.range(from..).next().map(|(ns, _)| *ns));
        match (mem, disk) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The keys with values in namespace `ns`, in row order, from the first after the key whose
    /// order is `after` (see [`key_order`]), at most `limit` of them, each with its partial
    /// values merged into one row of `out`'s columns (in generation order, memory's last), into
    /// `out`, which is cleared first (a caller that reads chunk after chunk reuses one).
    pub fn read_merged(
        &mut self,
        ns: i64,
        after: Option<&[u8]>,
        limit: usize,
        out: &mut Merged<C>,
    ) -> Result<()> {
        out.clear();
        // memory: the pane's keys in row order, sorted once per change of its key set
        if let Some(pane) = self.panes.get_mut(&ns)
            && pane.sorted.is_none()
        {
            let before = pane.bytes();
            pane.sorted = Some(pane.in_row_order(0..pane.len() as u32));
            let after = pane.bytes();
            self.charge(before, after);
        }
        let pane = self.panes.get(&ns);
        let rows: &[u32] = match pane {
            Some(pane) => {
                let sorted = pane.sorted.as_deref().expect("sorted above");
                let from = after.map_or(0, |a| {
                    sorted.partition_point(|r| pane.order(*r).as_slice() <= a)
                });
                &sorted[from..sorted.len().min(from.saturating_add(limit))]
            }
            None => &[],
        };
        let mut mem = MemoryRows {
            pane,
            rows,
            at: 0,
            order: None,
        };
        mem.load();
        // merged with RocksDB's partials of each key (in generation order) as they are read:
        // the first `limit` keys of the two
        if let Some(b) = &self.backing
            && let Some(generations) = b.on_disk.get(&ns)
        {
            let generation = b.generation;
            let from = after.map(|a| (a, false));
            let name = &self.name;
            b.backend
                .read_pane(b.table, ns, generations, from, limit, |order, g, v| {
                    mem.take(ns, out, Some(order), limit);
                    let last = out.last_order() == Some(order);
                    if out.len() >= limit && !last {
                        return Ok(());
                    }
                    // memory's value stands for the key's row of the current generation
                    if g == generation && mem.order.as_deref() == Some(order) {
                        return Ok(());
                    }
                    let row = out.row_of(order);
                    if !out.columns.merge_encoded(ns, row, body(name, v)?) {
                        let value = decode(name, v)?;
                        out.columns.merge_value(ns, row, value);
                    }
                    Ok(())
                })?;
        }
        mem.take(ns, out, None, limit);
        Ok(())
    }

    /// The partial values of `key` in each namespace of `range` that holds any, in namespace
    /// order.
    pub fn get(
        &mut self,
        key: &[u8],
        range: std::ops::Range<i64>,
    ) -> Result<Vec<(i64, Partials<C::Value>)>> {
        let order = self.order(key);
        let generation = self.backing.as_ref().map_or(0, |b| b.generation);
        let mut out = Vec::new();
        let namespaces: Vec<i64> = self
            .namespaces()
            .into_iter()
            .filter(|ns| range.contains(ns))
            .collect();
        for ns in namespaces {
            let value = self
                .panes
                .get(&ns)
                .and_then(|p| p.find(key).map(|r| p.columns.value(ns, r)));
            let mut disk: Written<C::Value> = SmallVec::new();
            if let Some(b) = &self.backing
                && let Some(generations) = b.on_disk.get(&ns)
            {
                let mut rows: Vec<(u32, Vec<u8>)> = Vec::new();
                b.backend.read_pane(
                    b.table,
                    ns,
                    generations,
                    Some((&order, true)),
                    1,
                    |o, g, v| {
                        if o == order.as_slice() {
                            rows.push((g, v.to_vec()));
                        }
                        Ok(())
                    },
                )?;
                for (g, v) in rows {
                    disk.push((g, decode(&self.name, &v)?));
                }
            }
            let partials = partials_of(disk, value, generation);
            if !partials.is_empty() {
                out.push((ns, partials));
            }
        }
        Ok(out)
    }

    /// Drops every namespace up to `last` (inclusive) from memory and RocksDB.
    pub fn drop_through(&mut self, last: i64) -> Result<()> {
        self.changes += 1;
        let keep = match last.checked_add(1) {
            Some(next) => self.panes.split_off(&next),
            None => BTreeMap::new(),
        };
        let gone = std::mem::replace(&mut self.panes, keep);
        let freed: usize = gone.values().map(Pane::bytes).sum();
        // the largest one's room stays, for the next namespace
        let kept = match self.spare {
            Some(_) => 0,
            None => {
                self.keep_room(gone.into_values().max_by_key(Pane::bytes));
                self.spare.as_ref().map_or(0, Pane::bytes)
            }
        };
        if freed != kept {
            self.charge(freed, kept);
        }
        if let Some(b) = self.backing.as_mut()
            && b.on_disk
                .first_key_value()
                .is_some_and(|(first, _)| *first <= last)
        {
            let keep = match last.checked_add(1) {
                Some(next) => b.on_disk.split_off(&next),
                None => BTreeMap::new(),
            };
            let gone = std::mem::replace(&mut b.on_disk, keep);
            // one range per generation: from the first dropped namespace it holds to the
            // namespace after `last`
            let mut firsts: BTreeMap<u32, i64> = BTreeMap::new();
            for (ns, generations) in gone {
                for g in generations {
                    firsts.entry(g).or_insert(ns);
                }
            }
            let mut batch = rocksdb::WriteBatch::default();
            for (g, first) in firsts {
                let from = backend::pane_ns_prefix(b.table, g, first);
                let to = match last.checked_add(1) {
                    Some(next) => backend::pane_ns_prefix(b.table, g, next),
                    None => backend::prefix_upper(&backend::pane_generation_prefix(b.table, g)),
                };
                batch.delete_range(&from, &to);
            }
            b.backend.write(batch)?;
        }
        Ok(())
    }

    /// Bytes of the panes in memory (an estimate: their indexes, keys and columns).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many calls so far may have changed the table's values: a reader that keeps what it
    /// read ahead (firing a window a chunk at a time) may use it while this stays the same.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Writes values straight into RocksDB (moving state of an older layout into this table
    /// when it opens, before any update), as (namespace, key, value): under a generation of
    /// their own, so they are partials like any other.
    pub fn import(
        &mut self,
        rows: impl IntoIterator<Item = (i64, StateKey, C::Value)>,
    ) -> Result<()> {
        self.changes += 1;
        let b = self
            .backing
            .as_mut()
            .ok_or_else(|| EngineError::State(format!("{}: import before attach", self.name)))?;
        let mut sorted: Vec<(i64, StateKey, C::Value)> = rows.into_iter().collect();
        let mp = self.max_parallelism;
        for r in sorted.iter_mut() {
            r.1 = backend::timer_order(key_group(hash_key(&r.1), mp), &r.1);
        }
        sorted.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let generation = b.generation;
        b.generation = generation.saturating_add(1);
        let mut batch = rocksdb::WriteBatch::default();
        for (ns, order, value) in sorted {
            let mut buf = vec![0u8];
            buf = postcard::to_extend(&value, buf)
                .map_err(|e| EngineError::State(format!("{}: {e}", self.name)))?;
            batch.put(
                backend::pane_row(b.table, generation, ns, backend::PANE_VALUE, &order),
                &buf,
            );
            add_generation(b.on_disk.entry(ns).or_default(), generation);
            if batch.size_in_bytes() >= FLUSH_BATCH_BYTES {
                b.backend.write(std::mem::take(&mut batch))?;
            }
        }
        b.backend.write(batch)
    }
}

/// A pane's rows in row order, merged into a [`Merged`] from the first: the current row's key
/// order is kept, to be compared with RocksDB's keys.
struct MemoryRows<'p, C> {
    pane: Option<&'p Pane<C>>,
    rows: &'p [u32],
    at: usize,
    /// The key order of `rows[at]`.
    order: Option<StateKey>,
}

impl<C: PaneColumns> MemoryRows<'_, C> {
    fn load(&mut self) {
        self.order = match (self.pane, self.rows.get(self.at)) {
            (Some(pane), Some(row)) => Some(pane.order(*row)),
            _ => None,
        };
    }

    /// Merges the values of the keys before `before` (all, with `None`) into `out`, up to
    /// `limit` keys: a key `out` ends with gets the value merged into its row.
    fn take(&mut self, ns: i64, out: &mut Merged<C>, before: Option<&[u8]>, limit: usize) {
        let Some(pane) = self.pane else { return };
        while let Some(order) = self.order.as_deref()
            && before.is_none_or(|b| order < b)
        {
            if out.len() >= limit && out.last_order() != Some(order) {
                return;
            }
            pane.prefetch_ahead(self.rows, self.at);
            let row = out.row_of(order);
            out.columns
                .merge_row(ns, row, &pane.columns, self.rows[self.at]);
            self.at += 1;
            self.load();
        }
    }
}

/// Adds `g` to `gens` (ascending, no repeats).
fn add_generation(gens: &mut Generations, g: u32) {
    if let Err(at) = gens.binary_search(&g) {
        gens.insert(at, g);
    }
}

/// Writes row `row` of `columns` (namespace `ns`) into `out` as a pane row's value: its encoding
/// version (0), then the value, encoded by the columns if they do it themselves.
fn encode_row<C: PaneColumns>(
    name: &str,
    columns: &C,
    ns: i64,
    row: u32,
    out: &mut Vec<u8>,
) -> Result<()> {
    out.clear();
    out.push(0u8);
    if columns.encode(ns, row, out) {
        return Ok(());
    }
    *out = postcard::to_extend(&columns.value(ns, row), std::mem::take(out))
        .map_err(|e| EngineError::State(format!("{name}: {e}")))?;
    Ok(())
}

/// A pane row's value: its encoding version (0), then the value.
fn decode<V: DeserializeOwned>(name: &str, row: &[u8]) -> Result<V> {
    postcard::from_bytes(body(name, row)?)
        .map_err(|e| EngineError::State(format!("{name}: decoding a value: {e}")))
}

/// The encoded value of a pane row, after its encoding version (0).
fn body<'r>(name: &str, row: &'r [u8]) -> Result<&'r [u8]> {
    let error = |e: String| EngineError::State(format!("{name}: {e}"));
    match row.split_first() {
        Some((0, body)) => Ok(body),
        Some((v, _)) => Err(error(format!(
            "a value of encoding version {v} was written by a newer version than this one, which reads version 0"
        ))),
        None => Err(error("an empty pane row".into())),
    }
}

/// A key's partials: its rows in RocksDB (in generation order) and its value in memory, which
/// stands for its row of the current generation (a copy of it, or older).
fn partials_of<V>(rows: Written<V>, value: Option<V>, generation: u32) -> Partials<V> {
    let mut out: Partials<V> = rows
        .into_iter()
        .filter(|(g, _)| value.is_none() || *g != generation)
        .map(|(_, v)| v)
        .collect();
    out.extend(value);
    out
}

/// The row order of `key` in a job of `max_parallelism` key groups: its key group, its length
/// and itself. Pane rows and timers are sorted by it.
pub fn key_order(key: &[u8], max_parallelism: u32) -> StateKey {
    backend::timer_order(key_group(hash_key(key), max_parallelism), key)
}

/// The key group of a key order (its first two bytes).
pub fn key_group_of_order(order: &[u8]) -> u32 {
    match order {
        [a, b, ..] => u16::from_be_bytes([*a, *b]) as u32,
        _ => 0,
    }
}

/// The encoded key of a key order.
pub fn key_of_order(order: &[u8]) -> &[u8] {
    backend::key_of_order(order).unwrap_or_default()
}

impl<C: PaneColumns> Drop for PaneTable<C> {
    fn drop(&mut self) {
        if let Some(b) = &self.backing {
            b.backend.memory().remove_table(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyGroupRange;
    use crate::state::StateConfig;
    use std::collections::BTreeMap;
    use std::path::Path;

    type Model = BTreeMap<(i64, Vec<u8>), u64>;

    /// One sum per row.
    #[derive(Debug, Clone, Default)]
    struct Sums(Vec<u64>);

    impl PaneColumns for Sums {
        type Value = u64;
        fn resize(&mut self, rows: usize) {
            self.0.resize(rows, 0);
        }
        fn reserve(&mut self, rows: usize) {
            self.0.reserve(rows.saturating_sub(self.0.len()));
        }
        fn value(&self, _: i64, row: u32) -> u64 {
            self.0[row as usize]
        }
        fn bytes(&self) -> usize {
            self.0.capacity() * 8
        }
        fn clear(&mut self) {
            self.0.clear();
        }
        fn merge_value(&mut self, _: i64, row: u32, value: u64) {
            self.0[row as usize] += value;
        }
    }

    fn config(dir: &Path) -> StateConfig {
        StateConfig {
            local_dir: dir.to_path_buf(),
            write_buffer_bytes: 1 << 20,
            ..StateConfig::default()
        }
    }

    fn open(dir: &Path, name: &str, range: KeyGroupRange) -> Arc<KeyedBackend> {
        Arc::new(KeyedBackend::open(&dir.join(name), &config(dir), range, 128).unwrap())
    }

    /// Keys of up to 7 bytes, of 11 bytes that share their first 8 (so their slots differ only
    /// in the word holding bytes 8–10), and too long for a slot.
    fn key(i: u64) -> Vec<u8> {
        match i % 3 {
            0 => format!("a-longer-key-of-more-than-eleven-bytes-{i}").into_bytes(),
            1 => format!("key-{i}").into_bytes(),
            _ => format!("key-2-{i:05}").into_bytes(),
        }
    }

    /// A key order is the key group (big-endian), the key's length (LEB128) and the key, for
    /// lengths of one, two and three LEB128 bytes, and it gives its key back.
    #[test]
    fn key_orders_hold_group_length_and_key() {
        for len in [0usize, 1, 11, 127, 128, 300, 16_383, 16_384, 70_000] {
            let key: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let order = backend::timer_order(KeyGroup(0x1234), &key);
            let mut want = vec![0x12, 0x34];
            let mut n = len;
            while n >= 0x80 {
                want.push((n & 0x7f) as u8 | 0x80);
                n >>= 7;
            }
            want.push(n as u8);
            want.extend_from_slice(&key);
            assert_eq!(order.as_slice(), want.as_slice(), "length {len}");
            assert_eq!(key_of_order(&order), key.as_slice());
        }
    }

    #[test]
    fn a_rows_order_comes_from_its_prefix_when_the_key_fits() {
        let mut pane = Pane::new(Sums::default(), 0, 128);
        let mut keys = Vec::new();
        for len in [0usize, 1, 9, 12, 13, 14, 15, 127, 128, 300] {
            for first in [0u8, 7, 200] {
                // keys alike in their first 13 bytes, and differing further on
                for last in [1u8, 2] {
                    let mut key = vec![first; len];
                    if let Some(b) = key.last_mut() {
                        *b = last;
                    }
                    keys.push(key);
                }
            }
        }
        for key in &keys {
            pane.locate(key).unwrap();
        }
        let ordered = pane.ordered(0..pane.len() as u32);
        assert_eq!(ordered.len(), pane.len());
        let orders: Vec<StateKey> = ordered.iter().map(|o| o.order(&pane)).collect();
        for (o, order) in ordered.iter().zip(&orders) {
            assert_eq!(*order, pane.order(o.row), "row {}", o.row);
            assert_eq!(Ordered::unknown(o.row).order(&pane), pane.order(o.row));
        }
        assert!(orders.windows(2).all(|w| w[0] < w[1]), "in row order");
        let rows: Vec<u32> = ordered.iter().map(|o| o.row).collect();
        assert_eq!(pane.in_row_order(0..pane.len() as u32), rows);
    }

    /// Random updates of sums: memory, flushes (whose rows memory then overwrites) and spills
    /// (after which keys start new partials) interleaved.
    fn fill(
        t: &mut PaneTable<Sums>,
        model: &mut Model,
        seed: u64,
        rounds: usize,
        owned: impl Fn(&[u8]) -> bool,
    ) {
        let mut x = seed;
        for round in 0..rounds {
            for _ in 0..2000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = key(x % 700);
                if !owned(&k) {
                    continue;
                }
                let ns = ((x >> 20) % 4) as i64 * 1000 - 1000;
                let add = (x >> 40) % 100;
                // the key twice in one update: both reach its row
                let half = add / 2;
                t.update(ns, [k.as_slice(), k.as_slice()], |c, rows| {
                    c.0[rows[0] as usize] += half;
                    c.0[rows[1] as usize] += add - half;
                })
                .unwrap();
                *model.entry((ns, k)).or_default() += add;
            }
            match round % 3 {
                0 => t.spill().unwrap(),
                1 => t.flush().unwrap(),
                _ => {}
            }
        }
    }

    /// What the table says each (namespace, key) sums to, reading every namespace a few keys at
    /// a time, and checking the order of keys.
    fn read_all(t: &mut PaneTable<Sums>, chunk: usize) -> Model {
        let mut out = Model::new();
        let mut got = Merged::new(Sums::default());
        for ns in t.namespaces() {
            let mut after: Option<StateKey> = None;
            loop {
                t.read_merged(ns, after.as_deref(), chunk, &mut got)
                    .unwrap();
                let orders: Vec<&[u8]> = (0..got.len()).map(|r| got.order(r)).collect();
                assert!(orders.windows(2).all(|w| w[0] < w[1]), "keys in row order");
                if let (Some(a), Some(first)) = (&after, orders.first()) {
                    assert!(
                        *first > a.as_slice(),
                        "a chunk starts after the last key of the one before"
                    );
                }
                assert_eq!(got.columns().0.len(), got.len(), "a row per key");
                for (row, order) in orders.iter().enumerate() {
                    let k = key_of_order(order).to_vec();
                    let prev = out.insert((ns, k), got.columns().0[row]);
                    assert!(prev.is_none(), "a key read twice");
                }
                if got.len() < chunk {
                    break;
                }
                after = orders.last().map(|o| StateKey::from_slice(o));
            }
        }
        out
    }

    /// What the table charged to the job's memory, against the bytes its panes hold now.
    fn assert_charged(t: &PaneTable<Sums>, backend: &KeyedBackend) {
        let held: usize = t.panes.values().chain(&t.spare).map(Pane::bytes).sum();
        assert_eq!(t.bytes(), held);
        assert_eq!(backend.memory().decoded(), held);
    }

    /// An attached table whose namespace 0 holds 5 000 keys, key `i` with the value `i + 1`.
    fn five_thousand_keys(dir: &Path) -> (Arc<KeyedBackend>, PaneTable<Sums>) {
        let backend = open(dir, "db", KeyGroupRange::for_subtask(128, 1, 0));
        let mut t: PaneTable<Sums> = PaneTable::new("w", Sums::default());
        t.attach(&backend).unwrap();
        for i in 0..5000 {
            t.update(0, [key(i).as_slice()], |c, rows| {
                c.0[rows[0] as usize] += i + 1
            })
            .unwrap();
        }
        (backend, t)
    }

    #[test]
    fn a_read_charges_its_sorted_rows_and_an_update_frees_them() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, mut t) = five_thousand_keys(dir.path());
        assert_charged(&t, &backend);
        let before = t.bytes();
        // reading sorts the pane's rows once, and keeps them until a key is added
        let mut got = Merged::new(Sums::default());
        t.read_merged(0, None, 100, &mut got).unwrap();
        assert_eq!(got.len(), 100);
        assert!(
            t.bytes() >= before + 5000 * 4,
            "the sorted rows are charged"
        );
        assert_charged(&t, &backend);
        t.update(0, [key(9999).as_slice()], |c, rows| {
            c.0[rows[0] as usize] += 1
        })
        .unwrap();
        assert_charged(&t, &backend);
        t.read_merged(0, None, 100, &mut got).unwrap();
        let full = t.bytes();
        t.drop_through(0).unwrap();
        assert_charged(&t, &backend);
        assert!(t.panes.is_empty());
        assert!(
            t.bytes() < full,
            "only the emptied room is kept, not the sorted rows: {} of {full}",
            t.bytes()
        );
    }

    /// A dropped pane's room serves the next namespace: it is charged while kept, charged once
    /// when taken, and holds nothing of the namespace it served before.
    #[test]
    fn a_dropped_panes_room_serves_the_next_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, mut t) = five_thousand_keys(dir.path());
        t.drop_through(0).unwrap();
        let kept = t.bytes();
        assert!(kept > 5000 * 8, "the room of 5 000 rows is kept: {kept}");
        assert_charged(&t, &backend);
        // fewer keys than the room holds, some of them the old namespace's
        let mut model = Model::new();
        for i in 4900..5100u64 {
            t.update(10, [key(i).as_slice()], |c, rows| {
                c.0[rows[0] as usize] += 1
            })
            .unwrap();
            model.insert((10, key(i)), 1);
        }
        assert_charged(&t, &backend);
        assert_eq!(t.bytes(), kept, "the room was taken, not allocated again");
        assert!(t.spare.is_none());
        assert_eq!(read_all(&mut t, 64), model);
        // spilled, memory keeps the room, empty, for the next generation
        t.drop_through(10).unwrap();
        t.update(20, [key(1).as_slice()], |c, rows| {
            c.0[rows[0] as usize] += 1
        })
        .unwrap();
        t.spill().unwrap();
        assert!(t.panes.is_empty());
        assert_eq!(t.spare.as_ref().map(Pane::len), Some(0));
        assert_eq!(t.bytes(), kept);
        assert_charged(&t, &backend);
        // taken between two flushes: kept; left idle from one flush to the next: given back
        t.flush().unwrap();
        t.update(30, [key(2).as_slice()], |c, rows| {
            c.0[rows[0] as usize] += 1
        })
        .unwrap();
        t.drop_through(30).unwrap();
        t.flush().unwrap();
        assert!(
            t.spare.is_some(),
            "a spare taken since the last flush stays"
        );
        assert_eq!(t.bytes(), kept);
        t.flush().unwrap();
        assert!(t.spare.is_none(), "an idle spare is given back");
        assert_eq!(t.bytes(), 0);
        assert_charged(&t, &backend);
    }

    /// A pane that would grow past the memory share spills before it grows, and the next
    /// generation fills the room the last one filled without taking more.
    #[test]
    fn a_full_pane_spills_before_growing_and_keeps_its_room() {
        let dir = tempfile::tempdir().unwrap();
        let config = StateConfig {
            memory_bytes: 8 << 20,
            ..config(dir.path())
        };
        let backend = Arc::new(
            KeyedBackend::open(
                &dir.path().join("db"),
                &config,
                KeyGroupRange::for_subtask(128, 1, 0),
                128,
            )
            .unwrap(),
        );
        let budget = backend.memory().decoded_budget();
        let mut t: PaneTable<Sums> = PaneTable::new("w", Sums::default());
        t.attach(&backend).unwrap();
        let generation = |t: &PaneTable<Sums>| t.backing.as_ref().unwrap().generation;
        let mut model = Model::new();
        let mut room = None;
        for batch in 0..450u64 {
            let keys: Vec<Vec<u8>> = (batch * 1000..(batch + 1) * 1000)
                .map(|i| format!("k{i:07}").into_bytes())
                .collect();
            let before = generation(&t);
            t.update(0, keys.iter().map(Vec::as_slice), |c, rows| {
                for (j, r) in rows.iter().enumerate() {
                    c.0[*r as usize] += batch * 1000 + j as u64 + 1;
                }
            })
            .unwrap();
            for (j, k) in keys.into_iter().enumerate() {
                model.insert((0, k), batch * 1000 + j as u64 + 1);
            }
            assert!(t.bytes() <= budget, "{} of {budget}", t.bytes());
            assert_charged(&t, &backend);
            match room {
                None if generation(&t) > before => room = Some(t.bytes()),
                Some(room) => assert_eq!(t.bytes(), room, "batch {batch}: the room is reused"),
                None => {}
            }
        }
        assert!(generation(&t) >= 3, "spilled {} times", generation(&t));
        assert_eq!(read_all(&mut t, 50_000), model);
    }

    #[test]
    fn panes_merge_memory_flushed_and_spilled_partials() {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(dir.path(), "db", KeyGroupRange::for_subtask(128, 1, 0));
        let mut t: PaneTable<Sums> = PaneTable::new("w", Sums::default());
        t.attach(&backend).unwrap();
        let mut model = Model::new();
        fill(&mut t, &mut model, 7, 8, |_| true);
        assert_eq!(read_all(&mut t, 37), model);
        assert_eq!(read_all(&mut t, 100_000), model);
        // one key's values in a range of namespaces, through memory and RocksDB
        for i in [0, 5, 699] {
            let k = key(i);
            let got: Vec<(i64, u64)> = t
                .get(&k, -1000..2000)
                .unwrap()
                .into_iter()
                .map(|(ns, p)| (ns, p.iter().sum()))
                .collect();
            let want: Vec<(i64, u64)> = model
                .iter()
                .filter(|((ns, kk), _)| *kk == k && (-1000..2000).contains(ns))
                .map(|((ns, _), v)| (*ns, *v))
                .collect();
            assert_eq!(got, want, "key {i}");
        }
        // dropping namespaces removes them from memory and RocksDB
        t.drop_through(0).unwrap();
        model.retain(|(ns, _), _| *ns > 0);
        assert_eq!(t.namespaces(), vec![1000, 2000]);
        assert_eq!(read_all(&mut t, 50), model);
        t.flush().unwrap();
        let snap = dir.path().join("snap");
        backend.checkpoint(&snap).unwrap();
        let restored = Arc::new(
            KeyedBackend::restore(
                &dir.path().join("db2"),
                &config(dir.path()),
                KeyGroupRange::for_subtask(128, 1, 0),
                128,
                vec![(snap, KeyGroupRange::for_subtask(128, 1, 0))],
            )
            .unwrap(),
        );
        let mut r: PaneTable<Sums> = PaneTable::new("w", Sums::default());
        r.attach(&restored).unwrap();
        assert_eq!(r.namespaces(), vec![1000, 2000]);
        assert_eq!(read_all(&mut r, 64), model);
    }

    /// A flush of more rows than one write batch holds (`FLUSH_BATCH_BYTES`) writes every row, all in
    /// the generation the spill closed (a restore would go on with the next one).
    #[test]
    fn a_flush_larger_than_a_write_batch_writes_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(dir.path(), "db", KeyGroupRange::for_subtask(128, 1, 0));
        let mut t: PaneTable<Sums> = PaneTable::new("w", Sums::default());
        t.attach(&backend).unwrap();
        let keys: Vec<Vec<u8>> = (0..30_000u64)
            .map(|i| format!("{i:060}").into_bytes())
            .collect();
        t.update(7, keys.iter().map(|k| k.as_slice()), |c, rows| {
            for (j, r) in rows.iter().enumerate() {
                c.0[*r as usize] += j as u64 + 1;
            }
        })
        .unwrap();
        // written in several batches, then dropped from memory: reads come from RocksDB
        t.spill().unwrap();
        assert!(t.panes.is_empty());
        let want: Model = keys
            .iter()
            .enumerate()
            .map(|(j, k)| ((7, k.clone()), j as u64 + 1))
            .collect();
        assert_eq!(read_all(&mut t, 10_000), want);
        assert_eq!(
            backend
                .next_generation(t.backing.as_ref().unwrap().table)
                .unwrap(),
            1
        );
    }

    /// Panes checkpointed in layout 4 (the generation last in a row's key) are moved to this
    /// layout when the table attaches, restored whole and by three subtasks, and read the same;
    /// later writes never overwrite a moved partial.
    #[test]
    fn panes_of_layout_4_are_moved_when_the_table_attaches() {
        let dir = tempfile::tempdir().unwrap();
        let range = KeyGroupRange::for_subtask(128, 1, 0);
        let backend = open(dir.path(), "db", range);
        let mut t: PaneTable<Sums> = PaneTable::new("w", Sums::default());
        t.attach(&backend).unwrap();
        let mut model = Model::new();
        fill(&mut t, &mut model, 5, 6, |_| true);
        t.flush().unwrap();
        let table = t.backing.as_ref().unwrap().table;
        assert!(backend.write_panes_in_layout_4(table) > 1000);
        backend.set_format(4);
        let snap = dir.path().join("snap");
        backend.checkpoint(&snap).unwrap();
        let parts = vec![(snap, range)];
        for subtasks in [1u32, 3] {
            let mut seen = Model::new();
            let mut want = model.clone();
            for sub in 0..subtasks {
                let range = KeyGroupRange::for_subtask(128, subtasks, sub);
                let name = format!("new{subtasks}-{sub}");
                let copies = crate::state::table::tests::copy_parts(&parts, dir.path(), &name);
                let restored = Arc::new(
                    KeyedBackend::restore(
                        &dir.path().join(&name),
                        &config(dir.path()),
                        range,
                        128,
                        copies,
                    )
                    .unwrap(),
                );
                assert_eq!(restored.format(), 4);
                let mut r: PaneTable<Sums> = PaneTable::new("w", Sums::default());
                r.attach(&restored).unwrap();
                assert_eq!(
                    restored.move_legacy_panes(table).unwrap(),
                    0,
                    "moved at attach"
                );
                let owned = |k: &[u8]| range.contains(key_group(hash_key(k), 128));
                fill(&mut r, &mut want, 31 + sub as u64, 4, owned);
                for (k, v) in read_all(&mut r, 41) {
                    assert!(owned(&k.1), "subtask {sub} read a key it does not own");
                    assert!(seen.insert(k, v).is_none(), "a key restored twice");
                }
            }
            assert_eq!(seen, want, "{subtasks} subtasks");
        }
    }

    /// Two subtasks' panes restored by three: each key exactly once, in the subtask that owns
    /// its key group, and later writes never overwrite a restored partial.
    #[test]
    fn panes_restore_at_another_parallelism() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::new();
        let mut parts = Vec::new();
        for sub in 0..2u32 {
            let range = KeyGroupRange::for_subtask(128, 2, sub);
            let backend = open(dir.path(), &format!("db{sub}"), range);
            let mut t: PaneTable<Sums> = PaneTable::new("w", Sums::default());
            t.attach(&backend).unwrap();
            let owned = |k: &[u8]| range.contains(key_group(hash_key(k), 128));
            fill(&mut t, &mut model, 11 + sub as u64, 5 + sub as usize, owned);
            t.flush().unwrap();
            let snap = dir.path().join(format!("snap{sub}"));
            backend.checkpoint(&snap).unwrap();
            parts.push((snap, range));
        }
        let mut seen = Model::new();
        for sub in 0..3u32 {
            let range = KeyGroupRange::for_subtask(128, 3, sub);
            let copies =
                crate::state::table::tests::copy_parts(&parts, dir.path(), &format!("copy{sub}"));
            let backend = Arc::new(
                KeyedBackend::restore(
                    &dir.path().join(format!("new{sub}")),
                    &config(dir.path()),
                    range,
                    128,
                    copies,
                )
                .unwrap(),
            );
            let mut t: PaneTable<Sums> = PaneTable::new("w", Sums::default());
            t.attach(&backend).unwrap();
            // more partials on top of the restored ones, written and spilled
            let owned = |k: &[u8]| range.contains(key_group(hash_key(k), 128));
            fill(&mut t, &mut model, 101 + sub as u64, 3, owned);
            for (k, v) in read_all(&mut t, 29) {
                assert!(owned(&k.1), "subtask {sub} read a key it does not own");
                assert!(seen.insert(k, v).is_none(), "a key restored twice");
            }
        }
        assert_eq!(seen, model);
    }
}

//! Keys and key groups.
//!
//! A key is the value of one or more key columns of a row. Keys are encoded into bytes with a
//! stable, type-aware encoding ([`KeyEncoder`]) that is also what keyed state is stored under, and
//! hashed with XXH3 into one of `max_parallelism` **key groups**. Key groups are the unit in which
//! keyed state is assigned to subtasks: subtask `i` of `p` owns the contiguous range computed by
//! [`KeyGroupRange::for_subtask`], exactly as in Flink, so that changing the parallelism moves whole
//! key groups and never splits one. The encoding and the hash must never change: persisted state
//! and the routing of records depend on them.
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{
    DataType, Float64Type, Int8Type, Int32Type, Int64Type, TimeUnit, TimestampMillisecondType,
    UInt8Type,
};
use std::borrow::Cow;
use std::sync::Arc;

use crate::{EngineError, Result};

/// One of the `max_parallelism` hash buckets keyed state is partitioned into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyGroup(pub u32);

/// A contiguous, inclusive range of key groups owned by one subtask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyGroupRange {
    /// First key group (inclusive).
    pub start: u32,
    /// Last key group (inclusive); `end < start` means empty.
    pub end: u32,
}

impl KeyGroupRange {
    /// The key groups owned by `subtask` of `parallelism` when there are `max_parallelism` groups.
    pub fn for_subtask(max_parallelism: u32, parallelism: u32, subtask: u32) -> Self {
        let (m, p, i) = (max_parallelism as u64, parallelism as u64, subtask as u64);
        let start = (i * m).div_ceil(p);
        let end = ((i + 1) * m - 1) / p;
        KeyGroupRange {
            start: start as u32,
            end: end as u32,
        }
    }

    /// Whether `kg` lies in this range.
    pub fn contains(&self, kg: KeyGroup) -> bool {
        kg.0 >= self.start && kg.0 <= self.end
    }

    /// Whether the two ranges share a key group.
    pub fn intersects(&self, other: &KeyGroupRange) -> bool {
        self.start.max(other.start) <= self.end.min(other.end)
    }
}

/// The key group of a key hash.
#[inline]
pub fn key_group(hash: u64, max_parallelism: u32) -> KeyGroup {
    let m = max_parallelism as u64;
    // the same value; a mask instead of a division for the usual power-of-two counts
    if m.is_power_of_two() {
        KeyGroup((hash & (m - 1)) as u32)
    } else {
        KeyGroup((hash % m) as u32)
    }
}

/// The subtask that owns key group `kg` (inverse of [`KeyGroupRange::for_subtask`]).
pub fn subtask_for_key_group(kg: KeyGroup, max_parallelism: u32, parallelism: u32) -> u32 {
    ((kg.0 as u64 * parallelism as u64) / max_parallelism as u64) as u32
}

/// The owners of every key group at one parallelism, looked up instead of computed: routing a
/// row costs its key group's modulo and one table read.
#[derive(Debug, Clone)]
pub struct KeyGroupOwners {
    max_parallelism: u32,
    owner: Vec<u16>,
}

impl KeyGroupOwners {
    /// The owner of each of `max_parallelism` key groups among `parallelism` subtasks.
    pub fn new(max_parallelism: u32, parallelism: u32) -> Self {
        let owner = (0..max_parallelism)
            .map(|kg| subtask_for_key_group(KeyGroup(kg), max_parallelism, parallelism) as u16)
            .collect();
        KeyGroupOwners {
            max_parallelism,
            owner,
        }
    }

    /// The subtask owning the key group of `hash`.
    #[inline]
    pub fn of(&self, hash: u64) -> usize {
        self.owner[key_group(hash, self.max_parallelism).0 as usize] as usize
    }
}

/// Key columns of a stream, resolved against its schema once, with their encoder: what every
/// keyed operator and the hash partitioner use to turn a batch into encoded keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColumns {
    indices: Vec<usize>,
    encoder: KeyEncoder,
}

impl KeyColumns {
    /// Resolves `names` in `schema`. On error, returns the position of the offending name and a
    /// message that lists the columns there are.
    pub fn resolve(
        schema: &arrow::datatypes::Schema,
        names: &[String],
    ) -> std::result::Result<Self, (usize, String)> {
        let mut indices = Vec::with_capacity(names.len());
        let mut types = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let idx = schema.index_of(name).map_err(|_| {
                let have: Vec<&str> = schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .filter(|n| *n != crate::TIME_COLUMN)
                    .collect();
                (
                    i,
                    format!(
                        "unknown column '{name}'; the input has: {}",
                        have.join(", ")
                    ),
                )
            })?;
            indices.push(idx);
            types.push(schema.field(idx).data_type().clone());
        }
        let encoder = KeyEncoder::new(&types).map_err(|e| (0, e.to_string()))?;
        Ok(KeyColumns { indices, encoder })
    }

    /// Whether there are no key columns: every row's key is the empty key.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The encoder (its key types say what decoding produces).
    pub fn encoder(&self) -> &KeyEncoder {
        &self.encoder
    }

    /// The keys of every row of `batch`: `given` (what a hash edge encoded by the same columns,
    /// see [`crate::element::Selection::keys_by`]) if there is one, else encoded into `buf`.
    pub fn keys_of<'a>(
        &self,
        batch: &arrow::record_batch::RecordBatch,
        given: Option<&'a EncodedKeys>,
        buf: &'a mut EncodedKeys,
    ) -> Result<&'a EncodedKeys> {
        match given {
            Some(keys) => Ok(keys),
            None => {
                self.encode(batch, buf)?;
                Ok(buf)
            }
        }
    }

    /// Encodes the key of every row of `batch` into `out`.
    pub fn encode(
        &self,
        batch: &arrow::record_batch::RecordBatch,
        out: &mut EncodedKeys,
    ) -> Result<()> {
        let columns: Vec<ArrayRef> = self
            .indices
            .iter()
            .map(|i| batch.column(*i).clone())
            .collect();
        self.encoder.encode(&columns, batch.num_rows(), out)
    }
}

/// The hash of an encoded key.
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Encoded keys of a batch: one byte string per row, in one buffer. Keys of one width (fixed-width
/// key columns without strings) are found by multiplying, without an offset per row.
#[derive(Debug, Default, Clone)]
pub struct EncodedKeys {
    data: Vec<u8>,
    /// Where each row's key starts, and the end; empty when the keys have one width.
    offsets: Vec<usize>,
    /// The width of every key, when they have one (never 0).
    width: Option<usize>,
    rows: usize,
}

impl EncodedKeys {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// True if there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The encoded key of row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> &[u8] {
        match self.width {
            Some(w) => &self.data[i * w..(i + 1) * w],
            None => &self.data[self.offsets[i]..self.offsets[i + 1]],
        }
    }

    /// The hash of every row's key.
    pub fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.rows).map(|i| hash_key(self.row(i)))
    }

    /// The rows `rows` grouped by key, each key hashed once.
    pub fn group_rows(&self, rows: impl Iterator<Item = usize>) -> RowsByKey {
        RowsByKey::of(self, rows)
    }
}

/// The rows of a batch grouped by key, hashed once: each group's rows in batch order, the
/// groups in the order of their first rows.
pub struct RowsByKey {
    /// The rows, group after group.
    rows: Vec<u32>,
    /// Where each group's rows end in `rows`.
    ends: Vec<u32>,
}

impl RowsByKey {
    fn of(keys: &EncodedKeys, rows: impl Iterator<Item = usize>) -> RowsByKey {
        let mut index: hashbrown::HashTable<u32> = hashbrown::HashTable::new();
        // per row, its group; per group, its first row and size
        let mut group_of: Vec<(u32, u32)> = Vec::new();
        let mut firsts: Vec<(u32, u32)> = Vec::new();
        for row in rows {
            let key = keys.row(row);
            let hash = hash_key(key);
            let g = *index
                .entry(
                    hash,
                    |g| keys.row(firsts[*g as usize].0 as usize) == key,
                    |g| hash_key(keys.row(firsts[*g as usize].0 as usize)),
                )
                .or_insert_with(|| {
                    firsts.push((row as u32, 0));
                    firsts.len() as u32 - 1
                })
                .get();
            firsts[g as usize].1 += 1;
            group_of.push((row as u32, g));
        }
        let mut ends = Vec::with_capacity(firsts.len());
        let mut end = 0;
        for (_, size) in &firsts {
            end += size;
            ends.push(end);
        }
        // each group's rows in batch order: fill from each group's start
        let mut next: Vec<u32> = ends.iter().zip(&firsts).map(|(e, (_, n))| e - n).collect();
        let mut out = vec![0u32; group_of.len()];
        for (row, g) in group_of {
            out[next[g as usize] as usize] = row;
            next[g as usize] += 1;
        }
        RowsByKey { rows: out, ends }
    }

    /// The rows of group `g`, in batch order.
    pub fn rows(&self, g: usize) -> &[u32] {
        let start = if g == 0 { 0 } else { self.ends[g - 1] as usize };
        &self.rows[start..self.ends[g] as usize]
    }

    /// Each group's rows, the groups in the order of their first rows.
    pub fn iter(&self) -> impl Iterator<Item = &[u32]> {
        (0..self.ends.len()).map(|g| self.rows(g))
    }
}

/// Encodes key columns into byte strings and decodes them back into columns.
///
/// The encoding, per column: a null marker byte (0 = null, 1 = value), then for integers and
/// timestamps 8 bytes big-endian with the sign bit flipped, for floats the IEEE bits (normalised so
/// -0.0 == 0.0), for booleans one byte, for strings a 4-byte big-endian length and the UTF-8 bytes.
/// Dictionary-encoded strings encode as their values, so they key like plain strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEncoder {
    types: Vec<KeyType>,
}

/// The logical type of a key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// 64-bit integer.
    Int,
    /// Timestamp in milliseconds.
    Timestamp,
    /// 64-bit float.
    Float,
    /// Boolean.
    Bool,
    /// UTF-8 string.
    String,
}

impl KeyType {
    /// The key type used for a column of `dt`, or an error if such columns cannot be keys.
    pub fn of(dt: &DataType) -> Result<KeyType> {
        Ok(match dt {
            DataType::Int64 | DataType::Int32 | DataType::Int8 | DataType::UInt8 => KeyType::Int,
            DataType::Timestamp(TimeUnit::Millisecond, _) => KeyType::Timestamp,
            DataType::Float64 => KeyType::Float,
            DataType::Boolean => KeyType::Bool,
            DataType::Utf8 => KeyType::String,
            DataType::Dictionary(_, v) if **v == DataType::Utf8 => KeyType::String,
            other => {
                return Err(EngineError::Operator(format!(
                    "a column of type {other} cannot be used as a key"
                )));
            }
        })
    }

    /// The Arrow type [`KeyEncoder::decode`] produces for this key type.
    pub fn data_type(self) -> DataType {
        match self {
            KeyType::Int => DataType::Int64,
            KeyType::Timestamp => DataType::Timestamp(TimeUnit::Millisecond, None),
            KeyType::Float => DataType::Float64,
            KeyType::Bool => DataType::Boolean,
            KeyType::String => DataType::Utf8,
        }
    }
}

impl KeyEncoder {
    /// An encoder for key columns of the given Arrow types.
    pub fn new(types: &[DataType]) -> Result<Self> {
        Ok(KeyEncoder {
            types: types.iter().map(KeyType::of).collect::<Result<_>>()?,
        })
    }

    /// The key column types, as decoded.
    pub fn key_types(&self) -> &[KeyType] {
        &self.types
    }

    /// Encodes the key of every row. `columns` must match the types given at construction.
    pub fn encode(&self, columns: &[ArrayRef], rows: usize, out: &mut EncodedKeys) -> Result<()> {
        out.data.clear();
        // keep a real allocation behind empty keys: comparing an empty slice whose pointer is
        // dangling makes glibc's masked-load memcmp take a fault-suppression assist, which cost a
        // non-keyed window three quarters of its time
        out.data.reserve(1);
        out.offsets.clear();
        out.width = None;
        out.rows = rows;
        if columns.is_empty() {
            out.offsets.resize(rows + 1, 0);
            return Ok(());
        }
        let cols: Vec<ColumnView<'_>> = columns
            .iter()
            .map(|c| ColumnView::new(c.as_ref()))
            .collect::<Result<_>>()?;
        if let Some(stride) = cols
            .iter()
            .map(ColumnView::fixed_width)
            .sum::<Option<usize>>()
        {
            // every row has the same width: lay the rows out, then write column by column
            out.data.resize(rows * stride, 0);
            let mut at = 0;
            for c in &cols {
                c.encode_fixed(&mut out.data, at, stride);
                at += 9;
            }
            out.width = Some(stride);
            return Ok(());
        }
        out.offsets.reserve(rows + 1);
        out.offsets.push(0);
        out.data.reserve(rows * cols.len() * 9);
        for row in 0..rows {
            for c in &cols {
                c.encode(row, &mut out.data);
            }
            out.offsets.push(out.data.len());
        }
        Ok(())
    }

    /// Encodes one row's key from scratch (tests and cold paths).
    pub fn encode_row(&self, columns: &[ArrayRef], row: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for c in columns {
            ColumnView::new(c.as_ref())?.encode(row, &mut out);
        }
        Ok(out)
    }

    /// Decodes encoded keys back into one column per key column.
    pub fn decode<'a>(
        &self,
        keys: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> Result<Vec<ArrayRef>> {
        let n = keys.len();
        let mut builders: Vec<ColumnBuilder> = self
            .types
            .iter()
            .map(|t| ColumnBuilder::new(*t, n))
            .collect();
        for key in keys {
            let mut pos = 0usize;
            for b in builders.iter_mut() {
                pos = b.push(key, pos)?;
            }
        }
        Ok(builders.into_iter().map(ColumnBuilder::finish).collect())
    }
}

/// One key column as the encoder reads it: values borrowed where Arrow's layout is the
/// encoding's input already (no copy per batch), nulls looked up without a virtual call.
enum ColumnView<'a> {
    Int(Option<&'a NullBuffer>, Cow<'a, [i64]>),
    Float(Option<&'a NullBuffer>, &'a [f64]),
    Bool(&'a BooleanArray),
    Str(&'a StringArray),
    DictStr(Vec<Option<usize>>, &'a StringArray),
}

/// A primitive column's nulls (if any) and its values converted to `i64`, borrowed for `Int64`.
fn ints<'a, T>(a: &'a dyn Array) -> (Option<&'a NullBuffer>, Cow<'a, [i64]>)
where
    T: arrow::datatypes::ArrowPrimitiveType,
    T::Native: Into<i64>,
{
    let values = a.as_primitive::<T>().values();
    (
        nulls_of(a),
        Cow::Owned(values.iter().map(|v| (*v).into()).collect()),
    )
}

/// A column's null buffer, if it has any nulls at all (none: every row is valid).
fn nulls_of(a: &dyn Array) -> Option<&NullBuffer> {
    a.nulls().filter(|n| n.null_count() > 0)
}

impl<'a> ColumnView<'a> {
    fn new(a: &'a dyn Array) -> Result<Self> {
        Ok(match a.data_type() {
            DataType::Int64 => ColumnView::Int(
                nulls_of(a),
                Cow::Borrowed(a.as_primitive::<Int64Type>().values()),
            ),
            DataType::Int32 => {
                let (n, v) = ints::<Int32Type>(a);
                ColumnView::Int(n, v)
            }
            DataType::Int8 => {
                let (n, v) = ints::<Int8Type>(a);
                ColumnView::Int(n, v)
            }
            DataType::UInt8 => {
                let (n, v) = ints::<UInt8Type>(a);
                ColumnView::Int(n, v)
            }
            DataType::Timestamp(TimeUnit::Millisecond, _) => ColumnView::Int(
                nulls_of(a),
                Cow::Borrowed(a.as_primitive::<TimestampMillisecondType>().values()),
            ),
            DataType::Float64 => {
                ColumnView::Float(nulls_of(a), a.as_primitive::<Float64Type>().values())
            }
            DataType::Boolean => ColumnView::Bool(a.as_boolean()),
            DataType::Utf8 => ColumnView::Str(a.as_string::<i32>()),
            DataType::Dictionary(k, v) if **v == DataType::Utf8 => {
                let (keys, values): (Vec<Option<usize>>, &StringArray) = match **k {
                    DataType::UInt8 => {
                        let d = a.as_dictionary::<UInt8Type>();
                        (
                            d.keys().iter().map(|k| k.map(|k| k as usize)).collect(),
                            d.values().as_string::<i32>(),
                        )
                    }
                    DataType::Int32 => {
                        let d = a.as_dictionary::<Int32Type>();
                        (
                            d.keys().iter().map(|k| k.map(|k| k as usize)).collect(),
                            d.values().as_string::<i32>(),
                        )
                    }
                    ref other => {
                        return Err(EngineError::Operator(format!(
                            "unsupported dictionary key type {other}"
                        )));
                    }
                };
                ColumnView::DictStr(keys, values)
            }
            other => {
                return Err(EngineError::Operator(format!(
                    "a column of type {other} cannot be used as a key"
                )));
            }
        })
    }

    /// The encoded width of every row, if it is the same for all (fixed-width values, no
    /// nulls), so a batch's keys can be laid out before they are written.
    fn fixed_width(&self) -> Option<usize> {
        match self {
            ColumnView::Int(None, _) | ColumnView::Float(None, _) => Some(9),
            _ => None,
        }
    }

    #[inline]
    fn encode(&self, row: usize, out: &mut Vec<u8>) {
        match self {
            ColumnView::Int(nulls, v) => {
                if nulls.is_some_and(|n| n.is_null(row)) {
                    out.push(0);
                } else {
                    out.push(1);
                    out.extend_from_slice(&int_bytes(v[row]));
                }
            }
            ColumnView::Float(nulls, v) => {
                if nulls.is_some_and(|n| n.is_null(row)) {
                    out.push(0);
                } else {
                    out.push(1);
                    out.extend_from_slice(&float_bytes(v[row]));
                }
            }
            ColumnView::Bool(a) => {
                if a.is_null(row) {
                    out.push(0);
                } else {
                    out.push(1);
                    out.push(a.value(row) as u8);
                }
            }
            ColumnView::Str(a) => {
                if a.is_null(row) {
                    out.push(0);
                } else {
                    push_str(out, a.value(row));
                }
            }
            ColumnView::DictStr(keys, values) => match keys[row] {
                Some(k) if values.is_valid(k) => push_str(out, values.value(k)),
                _ => out.push(0),
            },
        }
    }

    /// Writes the value of every row at `at + row × stride` of `out` (a marker byte and eight
    /// bytes); only for columns of [`Self::fixed_width`] 9.
    fn encode_fixed(&self, out: &mut [u8], at: usize, stride: usize) {
        let rows = out.len() / stride;
        let mut put = |bytes: [u8; 8], row: usize| {
            let o = at + row * stride;
            out[o] = 1;
            out[o + 1..o + 9].copy_from_slice(&bytes);
        };
        match self {
            ColumnView::Int(_, v) => {
                (v[..rows].iter().enumerate()).for_each(|(r, x)| put(int_bytes(*x), r))
            }
            ColumnView::Float(_, v) => {
                (v[..rows].iter().enumerate()).for_each(|(r, x)| put(float_bytes(*x), r))
            }
            _ => unreachable!("only fixed-width columns"),
        }
    }
}

/// An integer's key bytes: big-endian with the sign bit flipped, so bytes sort like numbers.
#[inline]
fn int_bytes(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

/// A float's key bytes: its IEEE bits, with -0.0 made 0.0.
#[inline]
fn float_bytes(v: f64) -> [u8; 8] {
    let v = if v == 0.0 { 0.0 } else { v };
    v.to_bits().to_be_bytes()
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(1);
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

enum ColumnBuilder {
    Int(Vec<Option<i64>>, bool),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Str(Vec<Option<String>>),
}

impl ColumnBuilder {
    fn new(t: KeyType, n: usize) -> Self {
        match t {
            KeyType::Int => ColumnBuilder::Int(Vec::with_capacity(n), false),
            KeyType::Timestamp => ColumnBuilder::Int(Vec::with_capacity(n), true),
            KeyType::Float => ColumnBuilder::Float(Vec::with_capacity(n)),
            KeyType::Bool => ColumnBuilder::Bool(Vec::with_capacity(n)),
            KeyType::String => ColumnBuilder::Str(Vec::with_capacity(n)),
        }
    }

    fn push(&mut self, key: &[u8], pos: usize) -> Result<usize> {
        let corrupt = || EngineError::Operator("corrupt encoded key".into());
        let marker = *key.get(pos).ok_or_else(corrupt)?;
        let pos = pos + 1;
        let take8 = |p: usize| -> Result<[u8; 8]> {
            key.get(p..p + 8)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(corrupt)
        };
        Ok(match self {
            ColumnBuilder::Int(v, _) => {
                if marker == 0 {
                    v.push(None);
                    pos
                } else {
                    v.push(Some((u64::from_be_bytes(take8(pos)?) ^ (1 << 63)) as i64));
                    pos + 8
                }
            }
            ColumnBuilder::Float(v) => {
                if marker == 0 {
                    v.push(None);
                    pos
                } else {
                    v.push(Some(f64::from_bits(u64::from_be_bytes(take8(pos)?))));
                    pos + 8
                }
            }
            ColumnBuilder::Bool(v) => {
                if marker == 0 {
                    v.push(None);
                    pos
                } else {
                    v.push(Some(*key.get(pos).ok_or_else(corrupt)? != 0));
                    pos + 1
                }
            }
            ColumnBuilder::Str(v) => {
                if marker == 0 {
                    v.push(None);
                    pos
                } else {
                    let len = u32::from_be_bytes(
                        key.get(pos..pos + 4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(corrupt)?,
                    ) as usize;
                    let s = key.get(pos + 4..pos + 4 + len).ok_or_else(corrupt)?;
                    v.push(Some(String::from_utf8(s.to_vec()).map_err(|_| corrupt())?));
                    pos + 4 + len
                }
            }
        })
    }

    fn finish(self) -> ArrayRef {
        match self {
            ColumnBuilder::Int(v, false) => Arc::new(Int64Array::from(v)),
            ColumnBuilder::Int(v, true) => {
                Arc::new(arrow::array::TimestampMillisecondArray::from(v))
            }
            ColumnBuilder::Float(v) => Arc::new(Float64Array::from(v)),
            ColumnBuilder::Bool(v) => Arc::new(BooleanArray::from(v)),
            ColumnBuilder::Str(v) => Arc::new(StringArray::from(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_group_ranges_cover_everything_once() {
        for (m, p) in [(128u32, 1u32), (128, 3), (128, 4), (7, 5), (128, 128)] {
            let mut next = 0;
            for i in 0..p {
                let r = KeyGroupRange::for_subtask(m, p, i);
                assert_eq!(r.start, next, "m={m} p={p} i={i}");
                for kg in r.start..=r.end {
                    assert_eq!(subtask_for_key_group(KeyGroup(kg), m, p), i);
                }
                next = r.end + 1;
            }
            assert_eq!(next, m);
        }
    }

    #[test]
    fn key_group_owners_agree_with_the_ranges() {
        for (m, p) in [(128u32, 1u32), (128, 3), (7, 5), (32768, 6)] {
            let owners = KeyGroupOwners::new(m, p);
            for i in 0..20_000u64 {
                let hash = hash_key(&i.to_le_bytes());
                let owner = owners.of(hash) as u32;
                assert!(KeyGroupRange::for_subtask(m, p, owner).contains(key_group(hash, m)));
            }
        }
    }

    #[test]
    fn encode_decode_round_trip_and_order_independence_of_dictionary() {
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(-5), None, Some(7)]));
        let strs: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), Some(""), None]));
        let enc = KeyEncoder::new(&[DataType::Int64, DataType::Utf8]).unwrap();
        let mut keys = EncodedKeys::default();
        enc.encode(&[ints.clone(), strs.clone()], 3, &mut keys)
            .unwrap();
        assert_eq!(keys.len(), 3);
        let back = enc.decode((0..3).map(|i| keys.row(i))).unwrap();
        assert_eq!(back[0].as_ref(), ints.as_ref());
        assert_eq!(back[1].as_ref(), strs.as_ref());

        let dict: ArrayRef = Arc::new(
            arrow::array::DictionaryArray::<UInt8Type>::try_new(
                arrow::array::UInt8Array::from(vec![1, 0]),
                Arc::new(StringArray::from(vec!["x", "y"])),
            )
            .unwrap(),
        );
        let plain: ArrayRef = Arc::new(StringArray::from(vec!["y", "x"]));
        let e1 = KeyEncoder::new(&[dict.data_type().clone()]).unwrap();
        let e2 = KeyEncoder::new(&[DataType::Utf8]).unwrap();
        assert_eq!(
            e1.encode_row(std::slice::from_ref(&dict), 0).unwrap(),
            e2.encode_row(std::slice::from_ref(&plain), 0).unwrap()
        );
    }

    /// Rows of a key with no columns are empty slices into a real allocation: an empty slice
    /// with a dangling pointer made every comparison of such keys take a slow path in glibc's
    /// `memcmp` (a masked load from an unmapped page).
    #[test]
    fn empty_keys_point_into_an_allocation() {
        let mut out = EncodedKeys::default();
        KeyEncoder::new(&[])
            .unwrap()
            .encode(&[], 3, &mut out)
            .unwrap();
        assert_eq!(out.len(), 3);
        let dangling = std::ptr::NonNull::<u8>::dangling().as_ptr() as usize;
        for i in 0..3 {
            assert!(out.row(i).is_empty());
            assert_ne!(out.row(i).as_ptr() as usize, dangling);
        }
    }

    /// Columns without nulls are encoded a column at a time (all rows have one width); the
    /// bytes must equal the row-at-a-time encoding of every other batch, including sliced
    /// columns (an offset into their buffers) and widened integer types.
    #[test]
    fn whole_batch_encoding_equals_the_row_encoding() {
        use arrow::array::{Float64Array, Int32Array, TimestampMillisecondArray};
        let ints: ArrayRef = Arc::new(Int64Array::from_iter_values([-3, 0, 5, i64::MAX, i64::MIN]));
        let floats: ArrayRef =
            Arc::new(Float64Array::from_iter_values([-0.0, 0.0, 1.5, -2.0, 9.0]));
        let small: ArrayRef = Arc::new(Int32Array::from_iter_values([1, -1, 7, 8, 9]));
        let times: ArrayRef =
            Arc::new(TimestampMillisecondArray::from_iter_values([4, 3, 2, 1, 0]));
        let nullable: ArrayRef = Arc::new(Int64Array::from(vec![
            Some(1),
            None,
            Some(3),
            None,
            Some(5),
        ]));
        let strings: ArrayRef = Arc::new(StringArray::from(vec!["", "a", "bc", "def", "g"]));
        let cases: Vec<Vec<ArrayRef>> = vec![
            vec![ints.clone()],
            vec![ints.slice(2, 3)],
            vec![ints.clone(), floats.clone(), small.clone(), times.clone()],
            vec![floats.slice(1, 4), small.slice(1, 4)],
            vec![nullable.clone(), ints.clone()],
            vec![nullable.slice(1, 3)],
            vec![strings.clone(), ints.clone()],
            vec![ints.clone()],
            vec![strings],
        ];
        // one buffer for every case, as an operator keeps it: keys of one width and keys of
        // many follow each other
        let mut keys = EncodedKeys::default();
        for cols in cases {
            let types: Vec<DataType> = cols.iter().map(|c| c.data_type().clone()).collect();
            let enc = KeyEncoder::new(&types).unwrap();
            let rows = cols[0].len();
            enc.encode(&cols, rows, &mut keys).unwrap();
            assert_eq!(keys.len(), rows, "{types:?}");
            for r in 0..rows {
                assert_eq!(
                    keys.row(r),
                    enc.encode_row(&cols, r).unwrap(),
                    "{types:?} row {r}"
                );
            }
        }
        // and both equal the documented bytes
        let mut keys = EncodedKeys::default();
        let enc = KeyEncoder::new(&[DataType::Int64, DataType::Float64]).unwrap();
        enc.encode(&[ints.slice(1, 1), floats.slice(0, 1)], 1, &mut keys)
            .unwrap();
        assert_eq!(
            keys.row(0),
            [[1, 0x80, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0]].concat()
        );
    }

    #[test]
    fn hash_is_stable() {
        // Persisted state and routing depend on this value never changing.
        let enc = KeyEncoder::new(&[DataType::Int64]).unwrap();
        let col: ArrayRef = Arc::new(Int64Array::from(vec![42]));
        let key = enc.encode_row(&[col], 0).unwrap();
        assert_eq!(key, vec![1, 0x80, 0, 0, 0, 0, 0, 0, 42]);
        assert_eq!(hash_key(&key), 6_626_882_167_836_958_474);
        assert_eq!(
            key_group(hash_key(&key), 128),
            KeyGroup((6_626_882_167_836_958_474u64 % 128) as u32)
        );
    }
}

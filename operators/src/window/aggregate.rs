//! Aggregate functions of windows: parsing, accumulators, merging and output.
//!
//! Every accumulator is mergeable, which is what lets sliding windows keep one accumulator per
//! slice (the slide) and combine slices when a window fires, instead of updating every
//! overlapping window per record.
use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use std::collections::HashSet;
use std::sync::Arc;

use freshet_engine::Result;

use crate::expr::{self, Expr, ExprError};
use crate::values::{ColumnReader, Scalar, build_column, build_list_column};

/// Which aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    /// `count(*)` or `count(x)` (non-null x).
    Count,
    /// `count(DISTINCT x)`.
    CountDistinct,
    /// `sum(x)`.
    Sum,
    /// `min(x)`.
    Min,
    /// `max(x)`.
    Max,
    /// `avg(x)`.
    Avg,
    /// `top_n(x, n)`: the n largest values, largest first.
    TopN(usize),
}

/// One compiled aggregate of a window.
#[derive(Debug, Clone)]
pub struct AggDef {
    /// Which function.
    pub kind: AggKind,
    /// Its argument (`None` for `count(*)`).
    pub arg: Option<Expr>,
    /// `FILTER (WHERE ...)`.
    pub filter: Option<Expr>,
    /// Output column name.
    pub name: String,
    /// Output column type.
    pub output_type: DataType,
}

impl AggDef {
    /// Parses `count(DISTINCT user_id) AS visitors` and friends against the input schema.
    pub fn compile(text: &str, input: &Schema) -> Result<AggDef, ExprError> {
        let (e, alias) = expr::parse_select_item(text)?;
        let Some(sqlparser::ast::Expr::Function(f)) = e else {
            return Err(ExprError {
                message: format!(
                    "'{text}' is not an aggregate; use count, sum, min, max, avg or top_n, e.g. count(*) AS n"
                ),
            });
        };
        let name = expr::function_name(&f);
        let (args, distinct) = expr::function_args(&f)?;
        let filter = f
            .filter
            .as_ref()
            .map(|w| expr::compile(w, input))
            .transpose()?;
        if let Some(fl) = &filter
            && fl.data_type() != &DataType::Boolean
        {
            return Err(ExprError {
                message: "FILTER (WHERE ...) needs a BOOLEAN condition".into(),
            });
        }
        let one_arg = |args: &[Option<sqlparser::ast::Expr>]| -> Result<Expr, ExprError> {
            match args {
                [Some(a)] => expr::compile(a, input),
                _ => Err(ExprError {
                    message: format!("{name}() takes one argument"),
                }),
            }
        };
        let numeric = |e: &Expr| -> Result<(), ExprError> {
            if matches!(e.data_type(), DataType::Int64 | DataType::Float64) {
                Ok(())
            } else {
                Err(ExprError {
                    message: format!(
                        "{name}() needs a number, got {}",
                        expr::type_name(e.data_type())
                    ),
                })
            }
        };
        let (kind, arg, output_type) = match (name.as_str(), distinct) {
            ("count", false) => match args.as_slice() {
                [None] | [] => (AggKind::Count, None, DataType::Int64),
                _ => (AggKind::Count, Some(one_arg(&args)?), DataType::Int64),
            },
            ("count", true) => (
                AggKind::CountDistinct,
                Some(one_arg(&args)?),
                DataType::Int64,
            ),
            ("sum", false) => {
                let a = one_arg(&args)?;
                numeric(&a)?;
                let t = a.data_type().clone();
                (AggKind::Sum, Some(a), t)
            }
            ("avg", false) => {
                let a = one_arg(&args)?;
                numeric(&a)?;
                (AggKind::Avg, Some(a), DataType::Float64)
            }
            ("min" | "max", false) => {
                let a = one_arg(&args)?;
                let t = a.data_type().clone();
                (
                    if name == "min" {
                        AggKind::Min
                    } else {
                        AggKind::Max
                    },
                    Some(a),
                    t,
                )
            }
            ("top_n", false) => {
                let (Some(Some(a)), Some(Some(n))) = (args.first(), args.get(1)) else {
                    return Err(ExprError {
                        message:
                            "top_n(x, n) takes an expression and a count, e.g. top_n(price, 3)"
                                .into(),
                    });
                };
                let n: usize = n
                    .to_string()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| ExprError {
                        message: format!("top_n(): the count must be a positive integer, got {n}"),
                    })?;
                let a = expr::compile(a, input)?;
                let t = DataType::List(std::sync::Arc::new(Field::new(
                    "item",
                    a.data_type().clone(),
                    true,
                )));
                (AggKind::TopN(n), Some(a), t)
            }
            (other, true) => {
                return Err(ExprError {
                    message: format!(
                        "{other}(DISTINCT ...) is not supported; only count(DISTINCT x) is"
                    ),
                });
            }
            (other, false) => {
                return Err(ExprError {
                    message: format!(
                        "unknown aggregate {other}(); use count, sum, min, max, avg or top_n"
                    ),
                });
            }
        };
        let name = alias.unwrap_or_else(|| name.to_string());
        Ok(AggDef {
            kind,
            arg,
            filter,
            name,
            output_type,
        })
    }

    /// A fresh accumulator.
    pub fn new_acc(&self) -> Acc {
        match self.kind {
            AggKind::Count => Acc::Count(0),
            AggKind::CountDistinct => Acc::Distinct(Box::default()),
            AggKind::Sum if self.output_type == DataType::Float64 => Acc::SumFloat(0.0, false),
            AggKind::Sum => Acc::SumInt(0, false),
            AggKind::Min => Acc::Min(None),
            AggKind::Max => Acc::Max(None),
            AggKind::Avg => Acc::Avg(0.0, 0),
            AggKind::TopN(_) => Acc::TopN(Vec::new()),
        }
    }
}

/// The accumulators of one window or slice, one per aggregate; up to two are stored inline, so
/// the common case needs no allocation and no pointer to follow.
pub type Accs = smallvec::SmallVec<[Acc; 2]>;

/// An accumulator: the state of one aggregate over some rows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Acc {
    /// Row count.
    Count(i64),
    /// Distinct values seen (boxed, so the common accumulators stay small: a window's state
    /// holds them inline, and smaller entries mean fewer cache misses per record).
    Distinct(Box<DistinctSet>),
    /// Integer sum (wrapping) and whether any value was added.
    SumInt(i64, bool),
    /// Float sum and whether any value was added.
    SumFloat(f64, bool),
    /// Smallest value.
    Min(Option<Scalar>),
    /// Largest value.
    Max(Option<Scalar>),
    /// Sum and count.
    Avg(f64, i64),
    /// The largest values, kept sorted descending and capped at n.
    TopN(Vec<Scalar>),
}

/// The distinct values of a `count(DISTINCT ...)`, and the bytes of the text among them. It is
/// stored as the set alone (the text's size is counted again as it is read back).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DistinctSet {
    values: HashSet<Scalar>,
    text: usize,
}

impl DistinctSet {
    fn insert(&mut self, v: Scalar) {
        let text = text_len(&v);
        if self.values.insert(v) {
            self.text += text;
        }
    }

    fn len(&self) -> usize {
        self.values.len()
    }
}

impl FromIterator<Scalar> for DistinctSet {
    fn from_iter<I: IntoIterator<Item = Scalar>>(values: I) -> Self {
        let mut set = DistinctSet::default();
        for v in values {
            set.insert(v);
        }
        set
    }
}

impl serde::Serialize for DistinctSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.values.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for DistinctSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let values = HashSet::<Scalar>::deserialize(d)?;
        let text = values.iter().map(text_len).sum();
        Ok(DistinctSet { values, text })
    }
}

/// Bytes of a value's text (none for the other types, which hold nothing behind a pointer).
fn text_len(v: &Scalar) -> usize {
    match v {
        Scalar::Str(s) => s.len(),
        _ => 0,
    }
}

impl Acc {
    /// Bytes the accumulator holds behind pointers, estimated in constant time: a set by its
    /// capacity and the text in it, a list and a string by their length.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Acc::Distinct(set) => {
                size_of::<DistinctSet>()
                    + set.values.capacity() * (size_of::<Scalar>() + 1)
                    + set.text
            }
            Acc::Min(Some(s)) | Acc::Max(Some(s)) => text_len(s),
            Acc::TopN(top) => {
                top.capacity() * size_of::<Scalar>() + top.iter().map(text_len).sum::<usize>()
            }
            _ => 0,
        }
    }
}

/// The per-batch inputs of every aggregate: evaluated argument columns and filter masks.
pub struct AggInputs {
    args: Vec<Option<ArrayRef>>,
    filters: Vec<Option<BooleanArray>>,
}

impl AggInputs {
    /// Evaluates every aggregate's argument and filter over `batch` once.
    pub fn evaluate(defs: &[AggDef], batch: &RecordBatch) -> Result<AggInputs> {
        let mut args = Vec::with_capacity(defs.len());
        let mut filters = Vec::with_capacity(defs.len());
        for d in defs {
            args.push(d.arg.as_ref().map(|a| a.evaluate(batch)).transpose()?);
            filters.push(
                d.filter
                    .as_ref()
                    .map(|f| f.evaluate_predicate(batch))
                    .transpose()?,
            );
        }
        Ok(AggInputs { args, filters })
    }

    /// Readers over the argument columns (borrowing this).
    pub fn readers(&self) -> Result<Vec<Option<ColumnReader<'_>>>> {
        self.args
            .iter()
            .map(|a| a.as_ref().map(ColumnReader::new).transpose())
            .collect()
    }

    /// Whether aggregate `i` counts row `row` (its filter passes).
    #[inline]
    pub fn selected(&self, i: usize, row: usize) -> bool {
        self.filters[i].as_ref().is_none_or(|f| f.value(row))
    }

    /// Whether some aggregate counts every row (it has no filter), so that any row counts for
    /// one: [`Self::any_selected`] for every row.
    pub fn one_selects_all(&self) -> bool {
        self.filters.iter().any(Option::is_none)
    }

    /// Whether any aggregate counts row `row`.
    pub fn any_selected(&self, row: usize) -> bool {
        (0..self.filters.len()).any(|i| self.selected(i, row))
    }
}

/// Adds row `row` to the accumulators `accs` (one per definition).
#[inline]
pub fn update(
    defs: &[AggDef],
    accs: &mut [Acc],
    inputs: &AggInputs,
    readers: &[Option<ColumnReader<'_>>],
    row: usize,
) {
    for (i, (d, acc)) in defs.iter().zip(accs.iter_mut()).enumerate() {
        update_one(d, acc, i, inputs, readers, row);
    }
}

/// Adds row `row` to accumulator `acc` of aggregate `i`.
#[inline]
fn update_one(
    d: &AggDef,
    acc: &mut Acc,
    i: usize,
    inputs: &AggInputs,
    readers: &[Option<ColumnReader<'_>>],
    row: usize,
) {
    if !inputs.selected(i, row) {
        return;
    }
    let v = match &readers[i] {
        Some(r) => match r.get(row) {
            Some(v) => Some(v),
            None => return, // aggregates skip nulls
        },
        None => None,
    };
    match (acc, v) {
        (Acc::Count(n), _) => *n += 1,
        (Acc::Distinct(set), Some(v)) => {
            set.insert(v);
        }
        (Acc::SumInt(s, any), Some(Scalar::Int(v))) => {
            *s = s.wrapping_add(v);
            *any = true;
        }
        (Acc::SumFloat(s, any), Some(v)) => {
            *s += v.as_f64().unwrap_or(0.0);
            *any = true;
        }
        (Acc::Min(m), Some(v)) if m.as_ref().is_none_or(|m| v < *m) => {
            *m = Some(v);
        }
        (Acc::Max(m), Some(v)) if m.as_ref().is_none_or(|m| v > *m) => {
            *m = Some(v);
        }
        (Acc::Avg(s, n), Some(v)) => {
            *s += v.as_f64().unwrap_or(0.0);
            *n += 1;
        }
        (Acc::TopN(top), Some(v)) => {
            let AggKind::TopN(n) = d.kind else { return };
            push_top(top, v, n);
        }
        _ => {}
    }
}

/// The accumulators of one aggregate for many keys, one per row: counts, sums and averages as
/// plain arrays of numbers (8 or 16 bytes a key, updated by loops over the batch), the others as
/// [`Acc`]s.
#[derive(Debug, Clone)]
pub enum AccColumn {
    /// Counts.
    Count(Vec<i64>),
    /// Integer sums and whether any value was added.
    SumInt(Vec<i64>, Vec<bool>),
    /// Float sums and whether any value was added.
    SumFloat(Vec<f64>, Vec<bool>),
    /// Sums and counts of averages.
    Avg(Vec<f64>, Vec<i64>),
    /// Any accumulator, with the empty one new rows start from and the bytes the accumulators
    /// hold behind pointers (see [`Acc::heap_bytes`]).
    Any {
        /// Per row.
        accs: Vec<Acc>,
        /// What a new row starts as.
        empty: Acc,
        /// Bytes behind pointers, all rows.
        heap: usize,
    },
}

impl AccColumn {
    /// An empty column for aggregate `def`.
    pub fn new(def: &AggDef) -> AccColumn {
        match def.new_acc() {
            Acc::Count(_) => AccColumn::Count(Vec::new()),
            Acc::SumInt(..) => AccColumn::SumInt(Vec::new(), Vec::new()),
            Acc::SumFloat(..) => AccColumn::SumFloat(Vec::new(), Vec::new()),
            Acc::Avg(..) => AccColumn::Avg(Vec::new(), Vec::new()),
            empty => AccColumn::Any {
                accs: Vec::new(),
                heap: 0,
                empty,
            },
        }
    }

    /// Makes rows `0..rows` exist, new ones empty.
    pub fn resize(&mut self, rows: usize) {
        match self {
            AccColumn::Count(c) => c.resize(rows, 0),
            AccColumn::SumInt(s, a) => {
                s.resize(rows, 0);
                a.resize(rows, false);
            }
            AccColumn::SumFloat(s, a) => {
                s.resize(rows, 0.0);
                a.resize(rows, false);
            }
            AccColumn::Avg(s, n) => {
                s.resize(rows, 0.0);
                n.resize(rows, 0);
            }
            AccColumn::Any { accs, empty, heap } => {
                *heap += rows.saturating_sub(accs.len()) * empty.heap_bytes();
                accs.resize(rows, empty.clone());
            }
        }
    }

    /// Room for `rows` rows in all.
    pub fn reserve(&mut self, rows: usize) {
        fn room<T>(v: &mut Vec<T>, rows: usize) {
            v.reserve(rows.saturating_sub(v.len()));
        }
        match self {
            AccColumn::Count(c) => room(c, rows),
            AccColumn::SumInt(s, a) => {
                room(s, rows);
                room(a, rows);
            }
            AccColumn::SumFloat(s, a) => {
                room(s, rows);
                room(a, rows);
            }
            AccColumn::Avg(s, n) => {
                room(s, rows);
                room(n, rows);
            }
            AccColumn::Any { accs, .. } => room(accs, rows),
        }
    }

    /// The accumulator of row `row`.
    pub fn get(&self, row: u32) -> Acc {
        let r = row as usize;
        match self {
            AccColumn::Count(c) => Acc::Count(c[r]),
            AccColumn::SumInt(s, a) => Acc::SumInt(s[r], a[r]),
            AccColumn::SumFloat(s, a) => Acc::SumFloat(s[r], a[r]),
            AccColumn::Avg(s, n) => Acc::Avg(s[r], n[r]),
            AccColumn::Any { accs, .. } => accs[r].clone(),
        }
    }

    /// Starts loading row `row`'s accumulator (see [`freshet_engine::state::prefetch`]); of
    /// an accumulator of any kind, what it holds behind pointers is not.
    pub fn prefetch(&self, row: u32) {
        fn ahead<T>(column: &[T], row: usize) {
            if let Some(value) = column.get(row) {
                freshet_engine::state::prefetch(value);
            }
        }
        let r = row as usize;
        match self {
            AccColumn::Count(c) => ahead(c, r),
            AccColumn::SumInt(s, a) => {
                ahead(s, r);
                ahead(a, r);
            }
            AccColumn::SumFloat(s, a) => {
                ahead(s, r);
                ahead(a, r);
            }
            AccColumn::Avg(s, n) => {
                ahead(s, r);
                ahead(n, r);
            }
            AccColumn::Any { accs, .. } => ahead(accs, r),
        }
    }

    /// Replaces the accumulator of row `row` (of this column's kind).
    fn set(&mut self, row: u32, acc: Acc) {
        let r = row as usize;
        match (self, acc) {
            (AccColumn::Count(c), Acc::Count(n)) => c[r] = n,
            (AccColumn::SumInt(s, a), Acc::SumInt(x, y)) => (s[r], a[r]) = (x, y),
            (AccColumn::SumFloat(s, a), Acc::SumFloat(x, y)) => (s[r], a[r]) = (x, y),
            (AccColumn::Avg(s, n), Acc::Avg(x, y)) => (s[r], n[r]) = (x, y),
            (AccColumn::Any { accs, heap, .. }, acc) => {
                *heap = (*heap + acc.heap_bytes()).saturating_sub(accs[r].heap_bytes());
                accs[r] = acc;
            }
            _ => {}
        }
    }

    /// Bytes of the arrays (not what `Any` accumulators hold behind pointers).
    pub fn bytes(&self) -> usize {
        match self {
            AccColumn::Count(c) => c.capacity() * 8,
            AccColumn::SumInt(s, a) => s.capacity() * 8 + a.capacity(),
            AccColumn::SumFloat(s, a) => s.capacity() * 8 + a.capacity(),
            AccColumn::Avg(s, n) => (s.capacity() + n.capacity()) * 8,
            AccColumn::Any { accs, heap, .. } => accs.capacity() * size_of::<Acc>() + heap,
        }
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        match self {
            AccColumn::Count(c) => c.len(),
            AccColumn::SumInt(s, _) => s.len(),
            AccColumn::SumFloat(s, _) => s.len(),
            AccColumn::Avg(s, _) => s.len(),
            AccColumn::Any { accs, .. } => accs.len(),
        }
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `rows` rows, and the room of the others.
    pub fn truncate(&mut self, rows: usize) {
        match self {
            AccColumn::Count(c) => c.truncate(rows),
            AccColumn::SumInt(s, a) => {
                s.truncate(rows);
                a.truncate(rows);
            }
            AccColumn::SumFloat(s, a) => {
                s.truncate(rows);
                a.truncate(rows);
            }
            AccColumn::Avg(s, n) => {
                s.truncate(rows);
                n.truncate(rows);
            }
            AccColumn::Any { accs, heap, .. } => {
                let gone: usize = accs.iter().skip(rows).map(Acc::heap_bytes).sum();
                *heap = heap.saturating_sub(gone);
                accs.truncate(rows);
            }
        }
    }

    /// Merges accumulator `acc` (of aggregate `def`, this column's) into row `row`, as
    /// [`merge`] does.
    pub fn merge_acc(&mut self, def: &AggDef, row: u32, acc: &Acc) {
        let r = row as usize;
        match (self, acc) {
            (AccColumn::Count(c), Acc::Count(n)) => c[r] += n,
            (AccColumn::SumInt(s, a), Acc::SumInt(x, y)) => {
                s[r] = s[r].wrapping_add(*x);
                a[r] |= y;
            }
            (AccColumn::SumFloat(s, a), Acc::SumFloat(x, y)) => {
                s[r] += x;
                a[r] |= y;
            }
            (AccColumn::Avg(s, n), Acc::Avg(x, y)) => {
                s[r] += x;
                n[r] += y;
            }
            (AccColumn::Any { accs, heap, .. }, acc) => {
                let before = accs[r].heap_bytes();
                merge(def, &mut accs[r], acc);
                *heap = (*heap + accs[r].heap_bytes()).saturating_sub(before);
            }
            _ => {}
        }
    }

    /// Merges row `from_row` of `from` (a column of the same aggregate) into row `row`.
    pub fn merge_row(&mut self, def: &AggDef, row: u32, from: &AccColumn, from_row: u32) {
        let (r, f) = (row as usize, from_row as usize);
        match (self, from) {
            (AccColumn::Count(c), AccColumn::Count(o)) => c[r] += o[f],
            (AccColumn::SumInt(s, a), AccColumn::SumInt(os, oa)) => {
                s[r] = s[r].wrapping_add(os[f]);
                a[r] |= oa[f];
            }
            (AccColumn::SumFloat(s, a), AccColumn::SumFloat(os, oa)) => {
                s[r] += os[f];
                a[r] |= oa[f];
            }
            (AccColumn::Avg(s, n), AccColumn::Avg(os, on)) => {
                s[r] += os[f];
                n[r] += on[f];
            }
            (AccColumn::Any { accs, heap, .. }, AccColumn::Any { accs: other, .. }) => {
                let before = accs[r].heap_bytes();
                merge(def, &mut accs[r], &other[f]);
                *heap = (*heap + accs[r].heap_bytes()).saturating_sub(before);
            }
            (col, from) => col.merge_acc(def, row, &from.get(from_row)),
        }
    }
}

/// Adds batch rows `rows[j]` (increasing) to row `slots[j]` of column `col` of aggregate `i`,
/// for every `j` in order: the same result as [`update`] row by row into each slot's
/// accumulator, with the choice of aggregate and column type made once per call and counts,
/// sums and averages of numbers computed by plain loops. Rows that all count, go to one slot
/// and lie side by side in the batch (a non-keyed window's, or one key's) are folded as a
/// slice of the column, in the same order.
pub fn update_column(
    d: &AggDef,
    col: &mut AccColumn,
    i: usize,
    inputs: &AggInputs,
    readers: &[Option<ColumnReader<'_>>],
    rows: &[u32],
    slots: &[u32],
) {
    let filter = inputs.filters[i].as_ref();
    let nulls = readers[i].as_ref().and_then(|r| match r {
        ColumnReader::Int(a, _) | ColumnReader::Float(a, _) => a.nulls(),
        _ => None,
    });
    let counts = |r: usize| {
        filter.is_none_or(|f| f.value(r)) && nulls.as_ref().is_none_or(|n| n.is_valid(r))
    };
    // the rows this aggregate counts, with their slots: selected by its filter and not null
    let counted = rows.iter().zip(slots).filter(|(r, _)| counts(**r as usize));
    let every = filter.is_none() && nulls.is_none_or(|n| n.null_count() == 0);
    let one = one_slot(slots);
    // every row counts, for one slot, and the rows are one range of the batch
    let whole = every
        .then(|| one.zip(as_range(rows)))
        .flatten()
        .map(|(s, range)| (s as usize, range));
    match (col, &readers[i]) {
        (AccColumn::Count(c), None) if filter.is_none() => match one {
            Some(s) => c[s as usize] += slots.len() as i64,
            None => {
                for (s, run) in runs(slots) {
                    c[s as usize] += run.len() as i64;
                }
            }
        },
        (AccColumn::Count(c), None | Some(ColumnReader::Int(..) | ColumnReader::Float(..))) => {
            for (_, s) in counted {
                c[*s as usize] += 1;
            }
        }
        (AccColumn::SumInt(sum, any), Some(ColumnReader::Int(_, v))) => {
            if let Some((s, range)) = whole {
                sum[s] = v[range].iter().fold(sum[s], |a, x| a.wrapping_add(*x));
                any[s] = true;
                return;
            }
            for (r, s) in counted {
                let s = *s as usize;
                sum[s] = sum[s].wrapping_add(v[*r as usize]);
                any[s] = true;
            }
        }
        (AccColumn::SumFloat(sum, any), Some(ColumnReader::Float(_, v))) => {
            if let Some((s, range)) = whole {
                sum[s] = v[range].iter().fold(sum[s], |a, x| a + x);
                any[s] = true;
                return;
            }
            for (r, s) in counted {
                sum[*s as usize] += v[*r as usize];
                any[*s as usize] = true;
            }
        }
        (AccColumn::Avg(sum, n), Some(ColumnReader::Int(_, v))) => {
            if let Some((s, range)) = whole {
                n[s] += range.len() as i64;
                sum[s] = v[range].iter().fold(sum[s], |a, x| a + *x as f64);
                return;
            }
            for (r, s) in counted {
                sum[*s as usize] += v[*r as usize] as f64;
                n[*s as usize] += 1;
            }
        }
        (AccColumn::Avg(sum, n), Some(ColumnReader::Float(_, v))) => {
            if let Some((s, range)) = whole {
                n[s] += range.len() as i64;
                sum[s] = v[range].iter().fold(sum[s], |a, x| a + x);
                return;
            }
            for (r, s) in counted {
                sum[*s as usize] += v[*r as usize];
                n[*s as usize] += 1;
            }
        }
        (AccColumn::Any { accs, .. }, Some(ColumnReader::Int(_, v)))
            if matches!(d.kind, AggKind::Min | AggKind::Max) =>
        {
            if let Some((s, range)) = whole {
                if let Some(b) = int_extreme(d.kind, &v[range]) {
                    keep_extreme(&mut accs[s], Scalar::Int(b));
                }
                return;
            }
            let counts = (!every).then_some(counts);
            extremes_per_run(accs, d.kind, rows, slots, counts, v, i64::cmp, Scalar::Int);
        }
        (AccColumn::Any { accs, .. }, Some(ColumnReader::Float(_, v)))
            if matches!(d.kind, AggKind::Min | AggKind::Max) =>
        {
            if let Some((s, range)) = whole {
                if let Some(b) = extreme(d.kind, v[range].iter().copied(), &f64::total_cmp) {
                    keep_extreme(&mut accs[s], Scalar::Float(b));
                }
                return;
            }
            let counts = (!every).then_some(counts);
            extremes_per_run(
                accs,
                d.kind,
                rows,
                slots,
                counts,
                v,
                f64::total_cmp,
                Scalar::Float,
            );
        }
        (AccColumn::Any { accs, heap, .. }, _) => {
            for (r, s) in rows.iter().zip(slots) {
                let acc = &mut accs[*s as usize];
                let before = acc.heap_bytes();
                update_one(d, acc, i, inputs, readers, *r as usize);
                *heap = (*heap + acc.heap_bytes()).saturating_sub(before);
            }
        }
        (col, _) => {
            for (r, s) in rows.iter().zip(slots) {
                let mut acc = col.get(*s);
                update_one(d, &mut acc, i, inputs, readers, *r as usize);
                col.set(*s, acc);
            }
        }
    }
}

/// Puts `v` into a `Min` or `Max` accumulator if it beats what is there.
fn keep_extreme(acc: &mut Acc, v: Scalar) {
    match acc {
        Acc::Min(m) if m.as_ref().is_none_or(|m| v < *m) => *m = Some(v),
        Acc::Max(m) if m.as_ref().is_none_or(|m| v > *m) => *m = Some(v),
        _ => {}
    }
}

/// For each run of equal slots, puts the smallest (`Min`) or largest (`Max`) of the run's
/// rows' `values` that count (all of them if `counts` is `None`) into that slot's
/// accumulator, if it beats what is there. A run whose rows all count and lie side by side is
/// read as a slice.
#[allow(clippy::too_many_arguments)]
fn extremes_per_run<T: Copy>(
    accs: &mut [Acc],
    kind: AggKind,
    rows: &[u32],
    slots: &[u32],
    counts: Option<impl Fn(usize) -> bool>,
    values: &[T],
    cmp: impl Fn(&T, &T) -> std::cmp::Ordering,
    scalar: impl Fn(T) -> Scalar,
) {
    for (s, run) in runs(slots) {
        let rows = &rows[run];
        let best = match (&counts, as_range(rows)) {
            (None, Some(range)) => extreme(kind, values[range].iter().copied(), &cmp),
            (None, None) => extreme(kind, rows.iter().map(|r| values[*r as usize]), &cmp),
            (Some(counts), _) => extreme(
                kind,
                rows.iter()
                    .map(|r| *r as usize)
                    .filter(|r| counts(*r))
                    .map(|r| values[r]),
                &cmp,
            ),
        };
        if let Some(b) = best {
            keep_extreme(&mut accs[s as usize], scalar(b));
        }
    }
}

/// The smallest (`Min`) or largest (`Max`) of `values`.
fn extreme<T>(
    kind: AggKind,
    values: impl Iterator<Item = T>,
    cmp: &impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Option<T> {
    match kind {
        AggKind::Min => values.min_by(cmp),
        _ => values.max_by(cmp),
    }
}

/// The smallest (`Min`) or largest (`Max`) of `values`: eight running extremes side by side,
/// each compared with every eighth value, so that a compare does not wait for the one before
/// (a single running extreme compiled to 64-bit compares emulated in baseline x86-64's vector
/// set, about 4.5 times slower).
fn int_extreme(kind: AggKind, values: &[i64]) -> Option<i64> {
    fn lanes(values: &[i64], better: impl Fn(i64, i64) -> bool) -> Option<i64> {
        let first = *values.first()?;
        let mut lanes = [first; 8];
        let mut chunks = values.chunks_exact(8);
        for chunk in &mut chunks {
            for (lane, v) in lanes.iter_mut().zip(chunk) {
                if better(*v, *lane) {
                    *lane = *v;
                }
            }
        }
        let tail = chunks.remainder().iter();
        lanes
            .iter()
            .chain(tail)
            .copied()
            .reduce(|a, b| if better(b, a) { b } else { a })
    }
    match kind {
        AggKind::Min => lanes(values, |v, best| v < best),
        _ => lanes(values, |v, best| v > best),
    }
}

/// `rows` (increasing) as one range of the batch, if they are side by side.
fn as_range(rows: &[u32]) -> Option<std::ops::Range<usize>> {
    let (first, last) = (*rows.first()? as usize, *rows.last()? as usize);
    (last - first + 1 == rows.len()).then_some(first..last + 1)
}

/// The slot every row goes to, if there is one. (Compared a chunk at a time without stopping
/// early inside a chunk, a loop the compiler can vectorize: a non-keyed window asks this of
/// every batch.)
pub(crate) fn one_slot(slots: &[u32]) -> Option<u32> {
    let s = *slots.first()?;
    slots
        .chunks(64)
        .all(|c| c.iter().fold(true, |all, x| all & (*x == s)))
        .then_some(s)
}

/// The runs of equal slots: each slot with the range of positions it holds in a row.
fn runs(slots: &[u32]) -> impl Iterator<Item = (u32, std::ops::Range<usize>)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let s = *slots.get(at)?;
        let start = at;
        while slots.get(at) == Some(&s) {
            at += 1;
        }
        Some((s, start..at))
    })
}

fn push_top(top: &mut Vec<Scalar>, v: Scalar, n: usize) {
    let pos = top.partition_point(|x| *x >= v);
    if pos < n {
        top.insert(pos, v);
        top.truncate(n);
    }
}

/// Merges `other` into `acc` (same aggregate).
pub fn merge(def: &AggDef, acc: &mut Acc, other: &Acc) {
    match (acc, other) {
        (Acc::Count(a), Acc::Count(b)) => *a += b,
        (Acc::Distinct(a), Acc::Distinct(b)) => {
            for v in &b.values {
                a.insert(v.clone());
            }
        }
        (Acc::SumInt(a, x), Acc::SumInt(b, y)) => {
            *a = a.wrapping_add(*b);
            *x |= *y;
        }
        (Acc::SumFloat(a, x), Acc::SumFloat(b, y)) => {
            *a += b;
            *x |= *y;
        }
        (Acc::Min(a), Acc::Min(Some(b))) if a.as_ref().is_none_or(|a| b < a) => {
            *a = Some(b.clone());
        }
        (Acc::Max(a), Acc::Max(Some(b))) if a.as_ref().is_none_or(|a| b > a) => {
            *a = Some(b.clone());
        }
        (Acc::Avg(a, n), Acc::Avg(b, m)) => {
            *a += b;
            *n += m;
        }
        (Acc::TopN(a), Acc::TopN(b)) => {
            let AggKind::TopN(n) = def.kind else { return };
            for v in b {
                push_top(a, v.clone(), n);
            }
        }
        _ => {}
    }
}

/// Builds the output column of aggregate `def` from the final accumulators of several rows.
pub fn output_column(def: &AggDef, accs: &[&Acc]) -> Result<ArrayRef> {
    match def.kind {
        AggKind::TopN(_) => {
            let DataType::List(item) = &def.output_type else {
                unreachable!("top_n outputs a list")
            };
            let lists: Vec<&[Scalar]> = accs
                .iter()
                .map(|a| {
                    if let Acc::TopN(v) = a {
                        v.as_slice()
                    } else {
                        &[]
                    }
                })
                .collect();
            build_list_column(item.data_type(), lists.into_iter())
        }
        _ => {
            let values: Vec<Option<Scalar>> = accs
                .iter()
                .map(|a| match a {
                    Acc::Count(n) => Some(Scalar::Int(*n)),
                    Acc::Distinct(s) => Some(Scalar::Int(s.len() as i64)),
                    Acc::SumInt(s, any) => any.then_some(Scalar::Int(*s)),
                    Acc::SumFloat(s, any) => any.then_some(Scalar::Float(*s)),
                    Acc::Min(m) | Acc::Max(m) => m.clone(),
                    Acc::Avg(s, n) => (*n > 0).then(|| Scalar::Float(*s / *n as f64)),
                    Acc::TopN(_) => None,
                })
                .collect();
            build_column(&def.output_type, values.iter().map(|v| v.as_ref()))
        }
    }
}

/// Builds the output column of aggregate `def` from a column of final accumulators, a row per
/// output row: counts, sums and averages straight from their arrays, as [`output_column`]
/// gives them.
pub fn output_of_column(def: &AggDef, col: &AccColumn) -> Result<ArrayRef> {
    let nulls = |any: &[bool]| Some(NullBuffer::from(any.to_vec())).filter(|n| n.null_count() > 0);
    Ok(match (col, &def.output_type) {
        (AccColumn::Count(c), DataType::Int64) => Arc::new(Int64Array::from(c.clone())),
        (AccColumn::SumInt(s, any), DataType::Int64) => {
            Arc::new(Int64Array::new(s.clone().into(), nulls(any)))
        }
        (AccColumn::SumFloat(s, any), DataType::Float64) => {
            Arc::new(Float64Array::new(s.clone().into(), nulls(any)))
        }
        (AccColumn::Avg(s, n), DataType::Float64) => Arc::new(Float64Array::from_iter(
            s.iter()
                .zip(n)
                .map(|(s, n)| (*n > 0).then(|| *s / *n as f64)),
        )),
        _ => {
            let accs: Vec<Acc> = (0..col.len()).map(|r| col.get(r as u32)).collect();
            output_column(def, &accs.iter().collect::<Vec<_>>())?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::Int64Type;
    use std::sync::Arc;

    #[test]
    fn int_extremes_are_those_of_every_value() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0usize, 1, 7, 8, 9, 16, 63, 1001] {
            let values: Vec<i64> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as i64
                })
                .collect();
            for kind in [AggKind::Min, AggKind::Max] {
                let expected = match kind {
                    AggKind::Min => values.iter().min(),
                    _ => values.iter().max(),
                };
                assert_eq!(
                    int_extreme(kind, &values),
                    expected.copied(),
                    "{len} {kind:?}"
                );
            }
            // the extreme in the tail, and in the first lane
            if len > 9 {
                let mut v = values.clone();
                v[len - 1] = i64::MAX;
                v[0] = i64::MIN;
                assert_eq!(int_extreme(AggKind::Max, &v), Some(i64::MAX));
                assert_eq!(int_extreme(AggKind::Min, &v), Some(i64::MIN));
            }
        }
    }

    #[test]
    fn one_slot_is_found_only_when_every_row_has_it() {
        assert_eq!(one_slot(&[]), None);
        for len in [1usize, 63, 64, 65, 200] {
            let mut slots = vec![3u32; len];
            assert_eq!(one_slot(&slots), Some(3), "{len} rows");
            for odd in [0, len / 2, len - 1] {
                slots[odd] = 4;
                assert_eq!(
                    one_slot(&slots),
                    (len == 1).then_some(4),
                    "{len} rows, {odd}"
                );
                slots[odd] = 3;
            }
        }
    }

    /// A distinct set of strings is charged for their text (once per distinct string), is
    /// encoded as the set alone, and is charged the same once read back.
    #[test]
    fn a_distinct_set_is_charged_for_its_text() {
        let strings = |width: usize| -> Acc {
            let set: DistinctSet = (0..200)
                .map(|i| Scalar::Str(format!("{:0>width$}", i % 100).into()))
                .collect();
            Acc::Distinct(Box::new(set))
        };
        let (short, long) = (strings(3), strings(1000));
        assert!(
            long.heap_bytes() >= short.heap_bytes() + 100 * 997,
            "{} against {}",
            long.heap_bytes(),
            short.heap_bytes()
        );
        let Acc::Distinct(set) = &long else {
            unreachable!()
        };
        assert_eq!(set.len(), 100);
        assert_eq!(set.text, 100 * 1000, "each distinct string counted once");
        let encoded = postcard::to_allocvec(&**set).unwrap();
        assert_eq!(encoded, postcard::to_allocvec(&set.values).unwrap());
        let back: Acc = postcard::from_bytes(&postcard::to_allocvec(&long).unwrap()).unwrap();
        assert_eq!(back, long);
        let Acc::Distinct(read) = &back else {
            unreachable!()
        };
        assert_eq!(read.text, set.text);
    }

    fn input() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, true),
            Field::new("u", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![
                    Some(5),
                    None,
                    Some(9),
                    Some(1),
                    Some(9),
                ])),
                Arc::new(StringArray::from(vec!["a", "b", "a", "c", "b"])),
            ],
        )
        .unwrap()
    }

    fn run(text: &str, split_at: usize) -> ArrayRef {
        let b = input();
        let def = AggDef::compile(text, &b.schema()).unwrap();
        let defs = vec![def.clone()];
        // two partial accumulators merged, as slices are
        let mut parts = [def.new_acc(), def.new_acc()];
        let inputs = AggInputs::evaluate(&defs, &b).unwrap();
        let readers = inputs.readers().unwrap();
        for row in 0..b.num_rows() {
            let p = usize::from(row >= split_at);
            update(
                &defs,
                std::slice::from_mut(&mut parts[p]),
                &inputs,
                &readers,
                row,
            );
        }
        let [mut a, b2] = parts;
        merge(&def, &mut a, &b2);
        output_column(&def, &[&a]).unwrap()
    }

    #[test]
    fn aggregates_merge_like_one_pass() {
        let int = |a: ArrayRef| a.as_primitive::<Int64Type>().value(0);
        for split in 0..=5 {
            assert_eq!(int(run("count(*)", split)), 5);
            assert_eq!(int(run("count(v) AS n", split)), 4);
            assert_eq!(int(run("count(DISTINCT u)", split)), 3);
            assert_eq!(int(run("sum(v)", split)), 24);
            assert_eq!(int(run("min(v)", split)), 1);
            assert_eq!(int(run("max(v)", split)), 9);
            assert_eq!(int(run("count(*) FILTER (WHERE u = 'a')", split)), 2);
            assert_eq!(
                run("avg(v)", split)
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .value(0),
                6.0
            );
            let top = run("top_n(v, 2)", split);
            let l = top.as_list::<i32>().value(0);
            assert_eq!(l.as_primitive::<Int64Type>().values().to_vec(), vec![9, 9]);
        }
    }

    /// `update_column` over rows spread across a few keys gives exactly what `update` row by row
    /// into each key's accumulators gives, for every aggregate, over nulls, filters, NaN, signed
    /// zeros and floats whose sum depends on order; the rows a random subset, or a range of the
    /// batch for one key or in runs of keys (which columns without nulls fold as slices).
    #[test]
    fn a_column_updates_like_each_keys_rows_one_by_one() {
        use arrow::array::Float64Array;
        let n = 300;
        let mut seed = 7u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let floats = [0.1, -0.0, 0.0, 1e16, -1e16, 3.25, f64::NAN, 7.0];
        let sums = [0.1, 1e16, -1e16, 3.3, -0.0, 0.7];
        let plain = [0.1, -0.0, 0.0, 1e16, -1e16, 3.25, 7.0, 3.3, 0.7];
        let (mut ints, mut fls, mut gs, mut strs) = (vec![], vec![], vec![], vec![]);
        let (mut whole_ints, mut whole_fls) = (vec![], vec![]);
        for _ in 0..n {
            let r = next();
            ints.push((r % 5 != 0).then_some((r >> 8) as i64 % 1000 - 500));
            fls.push((r % 7 != 0).then_some(floats[(r >> 20) as usize % floats.len()]));
            strs.push(Some(["a", "b", "c"][(r >> 30) as usize % 3]));
            gs.push((r % 11 != 0).then_some(sums[(r >> 40) as usize % sums.len()]));
            whole_ints.push(((r >> 3) as i64).wrapping_mul(0x9e37_79b9_7f4a_7c15u64 as i64));
            // no NaN, so that a sum in another order would show
            whole_fls.push(Some(plain[(r >> 50) as usize % plain.len()]));
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, true),
            Field::new("f", DataType::Float64, true),
            Field::new("g", DataType::Float64, true),
            Field::new("u", DataType::Utf8, true),
            Field::new("w", DataType::Int64, false),
            Field::new("h", DataType::Float64, false),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(ints)),
                Arc::new(Float64Array::from(fls)),
                Arc::new(Float64Array::from(gs)),
                Arc::new(StringArray::from(strs)),
                Arc::new(Int64Array::from(whole_ints)),
                Arc::new(Float64Array::from(
                    whole_fls
                        .into_iter()
                        .map(Option::unwrap)
                        .collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap();
        let texts = [
            "count(*)",
            "count(v)",
            "count(f) FILTER (WHERE u <> 'b')",
            "count(*) FILTER (WHERE v > 0)",
            "count(DISTINCT u)",
            "sum(v)",
            "sum(f)",
            "sum(g)",
            "avg(g) FILTER (WHERE u <> 'a')",
            "sum(v) FILTER (WHERE u = 'a')",
            "min(v)",
            "max(v)",
            "min(f)",
            "max(f) FILTER (WHERE u = 'c')",
            "avg(v)",
            "avg(f)",
            "min(u)",
            "top_n(f, 3)",
            "sum(w)",
            "sum(h)",
            "avg(w)",
            "avg(h)",
            "min(w)",
            "max(w)",
            "min(h)",
            "max(h)",
            "count(h)",
        ];
        let defs: Vec<AggDef> = texts
            .iter()
            .map(|t| AggDef::compile(t, &b.schema()).unwrap())
            .collect();
        let inputs = AggInputs::evaluate(&defs, &b).unwrap();
        let readers = inputs.readers().unwrap();
        const KEYS: u32 = 4;
        let mut cols: Vec<AccColumn> = defs.iter().map(AccColumn::new).collect();
        cols.iter_mut().for_each(|c| c.resize(KEYS as usize));
        let mut one: Vec<Vec<Acc>> = (0..KEYS)
            .map(|_| defs.iter().map(AggDef::new_acc).collect())
            .collect();
        for round in 0..90 {
            let (rows, slots): (Vec<u32>, Vec<u32>) = match round % 3 {
                // a random subset of rows in batch order, each for a random key
                0 => (0..n as u32)
                    .filter_map(|r| {
                        let x = next();
                        (x % 3 == 0).then_some((r, ((x >> 8) % KEYS as u64) as u32))
                    })
                    .unzip(),
                // a range of the batch for one key
                1 => {
                    let (a, len) = (next() % n as u64, next() % 64 + 1);
                    let key = (next() % KEYS as u64) as u32;
                    (a as u32..(a + len).min(n as u64) as u32)
                        .map(|r| (r, key))
                        .unzip()
                }
                // a range in runs of keys
                _ => {
                    let mut key = 0;
                    (0..n as u32)
                        .map(|r| {
                            if next() % 16 == 0 {
                                key = (next() % KEYS as u64) as u32;
                            }
                            (r, key)
                        })
                        .unzip()
                }
            };
            for (r, s) in rows.iter().zip(&slots) {
                update(&defs, &mut one[*s as usize], &inputs, &readers, *r as usize);
            }
            for (i, (d, c)) in defs.iter().zip(cols.iter_mut()).enumerate() {
                update_column(d, c, i, &inputs, &readers, &rows, &slots);
            }
            // what the columns charge for memory behind pointers is what their accumulators hold
            for (t, c) in texts.iter().zip(&cols) {
                if let AccColumn::Any { accs, heap, .. } = c {
                    let held: usize = accs.iter().map(Acc::heap_bytes).sum();
                    assert_eq!(*heap, held, "{t}");
                    assert!(c.bytes() >= held, "{t}");
                }
            }
            for (k, accs) in one.iter().enumerate() {
                for ((t, a), c) in texts.iter().zip(accs).zip(&cols) {
                    match (a, c.get(k as u32)) {
                        // sets iterate in no fixed order
                        (Acc::Distinct(x), Acc::Distinct(y)) => assert_eq!(*x, y, "{t}"),
                        // the rest bit for bit: f64 equality would miss -0.0 against 0.0 and
                        // fail on NaN
                        (a, b) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{t}"),
                    }
                }
            }
        }
    }

    /// Accumulators are stored inline in window state; a large variant would make every entry of
    /// every window larger.
    #[test]
    fn accumulators_stay_small() {
        assert!(
            std::mem::size_of::<Acc>() <= 32,
            "{}",
            std::mem::size_of::<Acc>()
        );
    }

    #[test]
    fn rejects_what_it_cannot_do() {
        let s = input().schema();
        for (text, needle) in [
            ("v + 1", "not an aggregate"),
            ("median(v)", "unknown aggregate"),
            ("sum(u)", "needs a number"),
            ("sum(DISTINCT v)", "only count(DISTINCT"),
            ("top_n(v, 0)", "positive integer"),
        ] {
            let e = AggDef::compile(text, &s).unwrap_err().message;
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}

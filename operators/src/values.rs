//! Single values taken out of Arrow columns, for state that outlives a batch (window
//! accumulators, buffered join rows), and the way back into columns.
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Builder, Int64Builder, ListBuilder,
    StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit, TimestampMillisecondType};
use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use freshet_engine::{EngineError, Result};

/// One non-null value. Floats compare and hash by their total order, so every value can be a
/// set member or a sort key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Scalar {
    /// An integer (also timestamps, in milliseconds).
    Int(i64),
    /// A float.
    Float(f64),
    /// Text.
    Str(Box<str>),
    /// A boolean.
    Bool(bool),
}

impl PartialEq for Scalar {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scalar {}
impl PartialOrd for Scalar {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scalar {
    fn cmp(&self, other: &Self) -> Ordering {
        use Scalar::*;
        match (self, other) {
            (Int(a), Int(b)) => a.cmp(b),
            (Float(a), Float(b)) => a.total_cmp(b),
            (Int(a), Float(b)) => (*a as f64).total_cmp(b),
            (Float(a), Int(b)) => a.total_cmp(&(*b as f64)),
            (Str(a), Str(b)) => a.cmp(b),
            (Bool(a), Bool(b)) => a.cmp(b),
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }
}
impl Hash for Scalar {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Scalar::Int(v) => (0u8, v).hash(state),
            Scalar::Float(v) => (1u8, v.to_bits()).hash(state),
            Scalar::Str(v) => (2u8, v).hash(state),
            Scalar::Bool(v) => (3u8, v).hash(state),
        }
    }
}

impl Scalar {
    fn rank(&self) -> u8 {
        match self {
            Scalar::Int(_) | Scalar::Float(_) => 0,
            Scalar::Str(_) => 1,
            Scalar::Bool(_) => 2,
        }
    }

    /// The value as a float (for sums and averages of numbers).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Int(v) => Some(*v as f64),
            Scalar::Float(v) => Some(*v),
            _ => None,
        }
    }
}

/// Reads values out of one column without per-row type dispatch on the Arrow side.
pub enum ColumnReader<'a> {
    /// Int64 or timestamp values.
    Int(&'a dyn Array, &'a [i64]),
    /// Float64 values.
    Float(&'a dyn Array, &'a [f64]),
    /// Strings.
    Str(&'a arrow::array::StringArray),
    /// Booleans.
    Bool(&'a arrow::array::BooleanArray),
}

impl<'a> ColumnReader<'a> {
    /// A reader over `a`, which must be Int64, Float64, Utf8, Boolean or Timestamp(ms).
    pub fn new(a: &'a ArrayRef) -> Result<Self> {
        Ok(match a.data_type() {
            DataType::Int64 => {
                ColumnReader::Int(a.as_ref(), a.as_primitive::<Int64Type>().values())
            }
            DataType::Timestamp(TimeUnit::Millisecond, _) => ColumnReader::Int(
                a.as_ref(),
                a.as_primitive::<TimestampMillisecondType>().values(),
            ),
            DataType::Float64 => {
                ColumnReader::Float(a.as_ref(), a.as_primitive::<Float64Type>().values())
            }
            DataType::Utf8 => ColumnReader::Str(a.as_string::<i32>()),
            DataType::Boolean => ColumnReader::Bool(a.as_boolean()),
            other => {
                return Err(EngineError::Operator(format!(
                    "unsupported column type {other}"
                )));
            }
        })
    }

    /// The value at `row`, `None` for null.
    #[inline]
    pub fn get(&self, row: usize) -> Option<Scalar> {
        match self {
            ColumnReader::Int(a, v) => (!a.is_null(row)).then(|| Scalar::Int(v[row])),
            ColumnReader::Float(a, v) => (!a.is_null(row)).then(|| Scalar::Float(v[row])),
            ColumnReader::Str(a) => (!a.is_null(row)).then(|| Scalar::Str(a.value(row).into())),
            ColumnReader::Bool(a) => (!a.is_null(row)).then(|| Scalar::Bool(a.value(row))),
        }
    }
}

/// Builds a column of type `dt` from values (`None` = null). Numbers convert where needed.
pub fn build_column<'a>(
    dt: &DataType,
    values: impl Iterator<Item = Option<&'a Scalar>>,
) -> Result<ArrayRef> {
    let bad = |v: &Scalar| EngineError::Operator(format!("value {v:?} does not fit a {dt} column"));
    Ok(match dt {
        DataType::Int64 => {
            let mut b = Int64Builder::new();
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Scalar::Int(i)) => b.append_value(*i),
                    Some(Scalar::Float(f)) => b.append_value(*f as i64),
                    Some(o) => return Err(bad(o)),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            let mut b = TimestampMillisecondBuilder::new();
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Scalar::Int(i)) => b.append_value(*i),
                    Some(o) => return Err(bad(o)),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Float64 => {
            let mut b = Float64Builder::new();
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(s) => b.append_value(s.as_f64().ok_or_else(|| bad(s))?),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Utf8 => {
            let mut b = StringBuilder::new();
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Scalar::Str(s)) => b.append_value(s),
                    Some(o) => return Err(bad(o)),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Boolean => {
            let mut b = BooleanBuilder::new();
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Scalar::Bool(x)) => b.append_value(*x),
                    Some(o) => return Err(bad(o)),
                }
            }
            Arc::new(b.finish())
        }
        other => {
            return Err(EngineError::Operator(format!(
                "cannot build a {other} column"
            )));
        }
    })
}

/// Builds a list column (element type `item`) from lists of values.
pub fn build_list_column<'a>(
    item: &DataType,
    lists: impl Iterator<Item = &'a [Scalar]>,
) -> Result<ArrayRef> {
    macro_rules! lists {
        ($builder:expr, $push:expr) => {{
            let mut b = ListBuilder::new($builder);
            for l in lists {
                for v in l {
                    $push(b.values(), v)?;
                }
                b.append(true);
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    let bad =
        |v: &Scalar| EngineError::Operator(format!("value {v:?} does not fit a list of {item}"));
    Ok(match item {
        DataType::Int64 => lists!(
            Int64Builder::new(),
            |b: &mut Int64Builder, v: &Scalar| match v {
                Scalar::Int(i) => {
                    b.append_value(*i);
                    Ok(())
                }
                o => Err(bad(o)),
            }
        ),
        DataType::Float64 => lists!(
            Float64Builder::new(),
            |b: &mut Float64Builder, v: &Scalar| {
                b.append_value(v.as_f64().ok_or_else(|| bad(v))?);
                Ok::<(), EngineError>(())
            }
        ),
        DataType::Utf8 => lists!(
            StringBuilder::new(),
            |b: &mut StringBuilder, v: &Scalar| match v {
                Scalar::Str(s) => {
                    b.append_value(s);
                    Ok(())
                }
                o => Err(bad(o)),
            }
        ),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            lists!(
                TimestampMillisecondBuilder::new(),
                |b: &mut TimestampMillisecondBuilder, v: &Scalar| match v {
                    Scalar::Int(i) => {
                        b.append_value(*i);
                        Ok(())
                    }
                    o => Err(bad(o)),
                }
            )
        }
        other => {
            return Err(EngineError::Operator(format!(
                "top_n over {other} is not supported"
            )));
        }
    })
}

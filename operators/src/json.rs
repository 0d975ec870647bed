//! Rendering rows as JSON objects (sinks, dead letters), one line per row, without building an
//! intermediate value per row. Timestamps are written as RFC 3339 text in UTC with milliseconds;
//! the event-time column is left out.
use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    DataType, Float64Type, Int32Type, Int64Type, TimeUnit, TimestampMillisecondType, UInt8Type,
};
use arrow::record_batch::RecordBatch;
use std::io::Write;

use freshet_engine::time::format_millis;
use freshet_engine::{EngineError, Result, TIME_COLUMN};

/// Field metadata marking a text column that holds JSON, written back as JSON rather than text.
pub const JSON_METADATA: &str = "freshet.json";

/// The columns to write: quoted name, column, whether it holds raw JSON.
fn columns(batch: &RecordBatch) -> Vec<(String, &ArrayRef, bool)> {
    batch
        .schema_ref()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| f.name() != TIME_COLUMN)
        .map(|(f, c)| {
            (
                serde_json::to_string(f.name()).expect("string serialises"),
                c,
                f.metadata().contains_key(JSON_METADATA),
            )
        })
        .collect()
}

/// Appends one JSON object per row of `batch` to `out`, each followed by a newline.
pub fn write_rows(batch: &RecordBatch, out: &mut Vec<u8>) -> Result<()> {
    let cols = columns(batch);
    for row in 0..batch.num_rows() {
        write_row(&cols, row, out)?;
        out.push(b'\n');
    }
    Ok(())
}

/// Writes single rows of one batch as JSON objects (one record per row, as a Kafka value).
pub struct RowWriter<'a> {
    cols: Vec<(String, &'a ArrayRef, bool)>,
}

impl<'a> RowWriter<'a> {
    /// A writer for the rows of `batch`.
    pub fn new(batch: &'a RecordBatch) -> Self {
        RowWriter {
            cols: columns(batch),
        }
    }

    /// Appends row `row` as one JSON object (no newline) to `out`.
    pub fn write(&self, row: usize, out: &mut Vec<u8>) -> Result<()> {
        write_row(&self.cols, row, out)
    }
}

/// One row as a JSON object text.
pub fn row_to_string(batch: &RecordBatch, row: usize) -> Result<String> {
    let cols = columns(batch);
    let mut out = Vec::new();
    write_row(&cols, row, &mut out)?;
    String::from_utf8(out).map_err(|e| EngineError::Operator(e.to_string()))
}

fn write_row(cols: &[(String, &ArrayRef, bool)], row: usize, out: &mut Vec<u8>) -> Result<()> {
    out.push(b'{');
    for (i, (name, col, raw)) in cols.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        if *raw && col.is_valid(row) {
            out.extend_from_slice(col.as_string::<i32>().value(row).as_bytes());
        } else {
            write_value(col.as_ref(), row, out)?;
        }
    }
    out.push(b'}');
    Ok(())
}

/// Where row `row` of dictionary array `a` points: the index into its values, and the values.
pub fn dictionary_entry(a: &dyn Array, row: usize) -> Result<(usize, ArrayRef)> {
    match a.data_type() {
        DataType::Dictionary(k, _) if **k == DataType::UInt8 => {
            let d = a.as_dictionary::<UInt8Type>();
            Ok((d.keys().value(row) as usize, d.values().clone()))
        }
        DataType::Dictionary(k, _) if **k == DataType::Int32 => {
            let d = a.as_dictionary::<Int32Type>();
            Ok((d.keys().value(row) as usize, d.values().clone()))
        }
        other => Err(EngineError::Operator(format!(
            "cannot write a column of type {other}"
        ))),
    }
}

fn write_value(a: &dyn Array, row: usize, out: &mut Vec<u8>) -> Result<()> {
    if a.is_null(row) {
        out.extend_from_slice(b"null");
        return Ok(());
    }
    let io = |e: std::io::Error| EngineError::Operator(e.to_string());
    match a.data_type() {
        DataType::Int64 => {
            write!(out, "{}", a.as_primitive::<Int64Type>().value(row)).map_err(io)?
        }
        DataType::Float64 => {
            let v = a.as_primitive::<Float64Type>().value(row);
            if v.is_finite() {
                serde_json::to_writer(&mut *out, &v)
                    .map_err(|e| EngineError::Operator(e.to_string()))?;
            } else {
                out.extend_from_slice(b"null");
            }
        }
        DataType::Boolean => out.extend_from_slice(if a.as_boolean().value(row) {
            b"true"
        } else {
            b"false"
        }),
        DataType::Utf8 => serde_json::to_writer(&mut *out, a.as_string::<i32>().value(row))
            .map_err(|e| EngineError::Operator(e.to_string()))?,
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            let ms = a.as_primitive::<TimestampMillisecondType>().value(row);
            write!(out, "\"{}\"", format_millis(ms)).map_err(io)?;
        }
        DataType::Dictionary(..) => {
            let (key, values) = dictionary_entry(a, row)?;
            write_value(values.as_ref(), key, out)?;
        }
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            let items = l.value(row);
            out.push(b'[');
            for i in 0..items.len() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(items.as_ref(), i, out)?;
            }
            out.push(b']');
        }
        other => {
            return Err(EngineError::Operator(format!(
                "cannot write a {other} column as JSON"
            )));
        }
    }
    Ok(())
}

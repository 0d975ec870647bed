//! Turning lines of text into typed Arrow columns, one line at a time, so that a bad line is
//! rejected alone (with the reason) and the rest of the batch goes on.
//!
//! Rules: a field missing from a JSON object, a value of the wrong type, or an unparsable
//! timestamp rejects the line; an explicit JSON `null` (or an empty CSV cell) is a null value.
//! Timestamps are RFC 3339 text (`2024-05-01T10:00:00Z`, offsets allowed) or integer epoch
//! milliseconds.
use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::sync::Arc;

use freshet_job::FieldType;
use freshet_operators::expr::timestamp_type;

/// The Arrow type of a declared field type.
pub fn arrow_type(t: FieldType) -> DataType {
    match t {
        FieldType::String => DataType::Utf8,
        FieldType::Int => DataType::Int64,
        FieldType::Float => DataType::Float64,
        FieldType::Bool => DataType::Boolean,
        FieldType::Timestamp => timestamp_type(),
        FieldType::Json => DataType::Utf8,
    }
}

/// The Arrow schema of declared fields (without the time column). `json` fields are text columns
/// marked with [`freshet_operators::json::JSON_METADATA`], so writers emit them as JSON again.
pub fn schema_of(fields: &[(String, FieldType)]) -> SchemaRef {
    Arc::new(Schema::new(
        fields
            .iter()
            .map(|(n, t)| {
                let f = Field::new(n, arrow_type(*t), true);
                if *t == FieldType::Json {
                    f.with_metadata(std::collections::HashMap::from([(
                        freshet_operators::json::JSON_METADATA.to_string(),
                        "true".to_string(),
                    )]))
                } else {
                    f
                }
            })
            .collect::<Vec<_>>(),
    ))
}

/// Parses RFC 3339 text into epoch milliseconds.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.timestamp_millis())
}

enum Builder {
    Str(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Ts(TimestampMillisecondBuilder),
}

/// A typed value parsed from one field, before it is committed to the builders.
enum Parsed {
    Null,
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Ts(i64),
}

/// Accumulates rows of declared fields; each row is validated completely before any column is
/// touched, so a rejected line leaves no trace.
pub struct RowDecoder {
    fields: Vec<(String, FieldType)>,
    builders: Vec<Builder>,
    row: Vec<Parsed>,
    rows: usize,
}

impl RowDecoder {
    /// A decoder for the declared fields.
    pub fn new(fields: Vec<(String, FieldType)>) -> Self {
        let builders = fields.iter().map(|(_, t)| new_builder(*t)).collect();
        RowDecoder {
            fields,
            builders,
            row: Vec::new(),
            rows: 0,
        }
    }

    /// Field names, in order.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(n, _)| n.as_str())
    }

    /// Rows decoded since the last [`finish`](Self::finish).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Decodes one JSON Lines record. On error nothing is added and the reason is returned.
    pub fn push_json(&mut self, line: &str) -> Result<(), String> {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
        let serde_json::Value::Object(obj) = v else {
            return Err("a JSON object was expected".into());
        };
        self.push_object(&obj)
    }

    /// Decodes one record given as a JSON object. On error nothing is added and the reason is
    /// returned.
    pub fn push_object(
        &mut self,
        obj: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), String> {
        self.row.clear();
        for (name, t) in &self.fields {
            let Some(v) = obj.get(name) else {
                return Err(format!("missing field '{name}'"));
            };
            self.row.push(from_json(name, *t, v)?);
        }
        self.commit();
        Ok(())
    }

    /// Decodes one CSV record whose cells are given in field order (`None` = absent column).
    pub fn push_text(&mut self, cells: &[Option<&str>]) -> Result<(), String> {
        self.row.clear();
        for ((name, t), cell) in self.fields.iter().zip(cells) {
            let Some(cell) = cell else {
                return Err(format!("missing field '{name}'"));
            };
            self.row.push(from_text(name, *t, cell)?);
        }
        self.commit();
        Ok(())
    }

    fn commit(&mut self) {
        for (b, v) in self.builders.iter_mut().zip(self.row.drain(..)) {
            match (b, v) {
                (Builder::Str(b), Parsed::Str(s)) => b.append_value(s),
                (Builder::Int(b), Parsed::Int(i)) => b.append_value(i),
                (Builder::Float(b), Parsed::Float(f)) => b.append_value(f),
                (Builder::Bool(b), Parsed::Bool(x)) => b.append_value(x),
                (Builder::Ts(b), Parsed::Ts(t)) => b.append_value(t),
                (Builder::Str(b), _) => b.append_null(),
                (Builder::Int(b), _) => b.append_null(),
                (Builder::Float(b), _) => b.append_null(),
                (Builder::Bool(b), _) => b.append_null(),
                (Builder::Ts(b), _) => b.append_null(),
            }
        }
        self.rows += 1;
    }

    /// The decoded columns; the decoder starts over empty.
    pub fn finish(&mut self) -> Vec<ArrayRef> {
        self.rows = 0;
        self.builders
            .iter_mut()
            .map(|b| -> ArrayRef {
                match b {
                    Builder::Str(b) => Arc::new(b.finish()),
                    Builder::Int(b) => Arc::new(b.finish()),
                    Builder::Float(b) => Arc::new(b.finish()),
                    Builder::Bool(b) => Arc::new(b.finish()),
                    Builder::Ts(b) => Arc::new(b.finish()),
                }
            })
            .collect()
    }
}

fn new_builder(t: FieldType) -> Builder {
    match t {
        FieldType::String => Builder::Str(StringBuilder::new()),
        FieldType::Int => Builder::Int(Int64Builder::new()),
        FieldType::Float => Builder::Float(Float64Builder::new()),
        FieldType::Bool => Builder::Bool(BooleanBuilder::new()),
        FieldType::Timestamp => Builder::Ts(TimestampMillisecondBuilder::new()),
        FieldType::Json => Builder::Str(StringBuilder::new()),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn from_json(name: &str, t: FieldType, v: &serde_json::Value) -> Result<Parsed, String> {
    use serde_json::Value as V;
    let wrong = |want: &str| format!("field '{name}' should be {want}, got {}", kind(v));
    Ok(match (t, v) {
        (_, V::Null) => Parsed::Null,
        (FieldType::String, V::String(s)) => Parsed::Str(s.clone()),
        (FieldType::String, _) => return Err(wrong("a string")),
        (FieldType::Int, V::Number(n)) => Parsed::Int(
            n.as_i64()
                .ok_or_else(|| format!("field '{name}' should be an integer, got {n}"))?,
        ),
        (FieldType::Int, _) => return Err(wrong("an integer")),
        (FieldType::Float, V::Number(n)) => {
            Parsed::Float(n.as_f64().ok_or_else(|| wrong("a number"))?)
        }
        (FieldType::Float, _) => return Err(wrong("a number")),
        (FieldType::Bool, V::Bool(b)) => Parsed::Bool(*b),
        (FieldType::Bool, _) => return Err(wrong("a boolean")),
        (FieldType::Timestamp, V::String(s)) => Parsed::Ts(
            parse_timestamp(s)
                .ok_or_else(|| format!("field '{name}': '{s}' is not an RFC 3339 timestamp"))?,
        ),
        (FieldType::Timestamp, V::Number(n)) => Parsed::Ts(
            n.as_i64()
                .ok_or_else(|| format!("field '{name}': {n} is not epoch milliseconds"))?,
        ),
        (FieldType::Timestamp, _) => return Err(wrong("a timestamp")),
        (FieldType::Json, v) => Parsed::Str(v.to_string()),
    })
}

fn from_text(name: &str, t: FieldType, cell: &str) -> Result<Parsed, String> {
    if cell.is_empty() && t != FieldType::String && t != FieldType::Json {
        return Ok(Parsed::Null);
    }
    let bad = |want: &str| format!("field '{name}': '{cell}' is not {want}");
    Ok(match t {
        FieldType::String => Parsed::Str(cell.to_string()),
        FieldType::Json => {
            serde_json::from_str::<serde_json::Value>(cell).map_err(|_| bad("JSON"))?;
            Parsed::Str(cell.to_string())
        }
        FieldType::Int => Parsed::Int(cell.trim().parse().map_err(|_| bad("an integer"))?),
        FieldType::Float => Parsed::Float(cell.trim().parse().map_err(|_| bad("a number"))?),
        FieldType::Bool => match cell.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "1" => Parsed::Bool(true),
            "false" | "f" | "0" => Parsed::Bool(false),
            _ => return Err(bad("a boolean")),
        },
        FieldType::Timestamp => match cell.trim().parse::<i64>() {
            Ok(ms) => Parsed::Ts(ms),
            Err(_) => {
                Parsed::Ts(parse_timestamp(cell).ok_or_else(|| bad("an RFC 3339 timestamp"))?)
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Int64Type, TimestampMillisecondType};

    #[test]
    fn bad_lines_are_rejected_alone() {
        let mut d = RowDecoder::new(vec![
            ("id".into(), FieldType::Int),
            ("ts".into(), FieldType::Timestamp),
            ("s".into(), FieldType::String),
        ]);
        d.push_json(r#"{"id": 1, "ts": "2024-01-01T00:00:00Z", "s": "a"}"#)
            .unwrap();
        assert!(
            d.push_json(r#"{"id": 1, "ts": "2024-01-01T00:00:00Z""#)
                .unwrap_err()
                .contains("malformed JSON")
        );
        assert!(
            d.push_json(r#"{"id": "x", "ts": 0, "s": "a"}"#)
                .unwrap_err()
                .contains("field 'id' should be an integer")
        );
        assert!(
            d.push_json(r#"{"id": 2, "s": "a"}"#)
                .unwrap_err()
                .contains("missing field 'ts'")
        );
        assert!(
            d.push_json(r#"{"id": 2, "ts": "yesterday", "s": "a"}"#)
                .unwrap_err()
                .contains("not an RFC 3339")
        );
        d.push_json(r#"{"id": null, "ts": 5, "s": "b", "extra": true}"#)
            .unwrap();
        d.push_text(&[Some("7"), Some("2024-01-01T00:00:01+01:00"), Some("c")])
            .unwrap();
        assert!(
            d.push_text(&[Some("7.5"), Some("0"), Some("c")])
                .unwrap_err()
                .contains("not an integer")
        );
        let cols = d.finish();
        assert_eq!(cols[0].len(), 3);
        assert!(cols[0].is_null(1));
        assert_eq!(cols[0].as_primitive::<Int64Type>().value(2), 7);
        assert_eq!(
            cols[1].as_primitive::<TimestampMillisecondType>().value(2),
            1_704_063_601_000
        );
    }
}

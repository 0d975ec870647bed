//! Avro values in the Confluent wire format: a zero byte, the writer schema's registry id as four
//! big-endian bytes, then the Avro binary datum.
//!
//! Reading ([`AvroDecoder`]): a value's writer schema comes from the registry by its id (once per
//! id); the datum becomes a JSON object that the source's row decoder checks against the job's
//! schema by field name, with the same rules and dead letters as JSON. A writer may so add fields
//! (they are ignored) or order them differently; a field the job needs and the writer dropped is
//! a dead letter naming it. Logical types become what the job's types take: timestamps and dates
//! epoch milliseconds, decimals numbers, UUIDs text.
//!
//! Writing ([`AvroEncoder`]): the sink derives a record schema from its input columns (every
//! column nullable, the event-time column left out), registers it under its subject, and writes
//! each row with the id the registry gave. The registry's compatibility rules for the subject
//! decide whether a changed job may write there.
use apache_avro::Schema;
use apache_avro::schema::{Name, NamesRef};
use apache_avro::types::Value as Avro;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{
    DataType, Float64Type, Int32Type, Int64Type, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use arrow::record_batch::RecordBatch;
use serde_json::{Map, Value as Json};
use std::sync::Arc;

use freshet_engine::{EngineError, TIME_COLUMN};

use crate::schema_registry::{RegistryError, SchemaRegistry};

/// The first byte of a value in the Confluent wire format.
const MAGIC: u8 = 0;

/// Why a value did not decode.
#[derive(Debug)]
pub enum DecodeError {
    /// The value is bad: it goes to the dead letters with this reason.
    Bad(String),
    /// The registry could not be asked: the record must not be dropped.
    Registry(RegistryError),
}

/// Decodes values of the Confluent wire format into JSON objects.
pub struct AvroDecoder {
    registry: Arc<SchemaRegistry>,
}

impl AvroDecoder {
    /// A decoder fetching writer schemas from `registry`.
    pub fn new(registry: Arc<SchemaRegistry>) -> Self {
        AvroDecoder { registry }
    }

    /// The record `payload` holds, as a JSON object of its fields.
    pub fn decode(&self, payload: &[u8]) -> Result<Map<String, Json>, DecodeError> {
        let [MAGIC, a, b, c, d, rest @ ..] = payload else {
            return Err(DecodeError::Bad(
                "not in the Confluent wire format (a zero byte, a four-byte schema id, the datum)"
                    .into(),
            ));
        };
        let id = u32::from_be_bytes([*a, *b, *c, *d]);
        let schema = match self.registry.schema(id) {
            Ok(s) => s,
            Err(e) if e.retryable() => return Err(DecodeError::Registry(e)),
            Err(e) => return Err(DecodeError::Bad(e.to_string())),
        };
        let bad = |e: apache_avro::Error| DecodeError::Bad(format!("Avro (schema {id}): {e}"));
        let resolved = apache_avro::schema::ResolvedSchema::new(&schema).map_err(bad)?;
        let mut reader = rest;
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .map_err(bad)?
            .read_value(&mut reader)
            .map_err(bad)?;
        if !reader.is_empty() {
            return Err(DecodeError::Bad(format!(
                "Avro (schema {id}): {} bytes left after the datum",
                reader.len()
            )));
        }
        match to_json(value, &schema, resolved.get_names()) {
            Json::Object(o) => Ok(o),
            other => Err(DecodeError::Bad(format!(
                "Avro (schema {id}): a record was expected, got {other}"
            ))),
        }
    }
}

/// An Avro value as JSON, using the schema for what the value alone does not say (a decimal's
/// scale).
fn to_json(v: Avro, schema: &Schema, names: &NamesRef<'_>) -> Json {
    let schema = match schema {
        Schema::Ref { name } => match names.get(name) {
            Some(s) => *s,
            None => schema,
        },
        s => s,
    };
    match v {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => b.into(),
        Avro::Int(i) => i.into(),
        Avro::Long(i) => i.into(),
        Avro::Float(f) => float(f64::from(f)),
        Avro::Double(f) => float(f),
        Avro::Bytes(b) | Avro::Fixed(_, b) => bytes(b),
        Avro::String(s) => s.into(),
        Avro::Enum(_, symbol) => symbol.into(),
        Avro::Union(i, inner) => {
            let variant = match schema {
                Schema::Union(u) => u.variants().get(i as usize),
                _ => None,
            };
            match variant {
                Some(s) => to_json(*inner, s, names),
                None => to_json(*inner, &Schema::Null, names),
            }
        }
        Avro::Array(items) => {
            let item = match schema {
                Schema::Array(a) => &*a.items,
                _ => &Schema::Null,
            };
            Json::Array(items.into_iter().map(|x| to_json(x, item, names)).collect())
        }
        Avro::Map(m) => {
            let item = match schema {
                Schema::Map(m) => &*m.types,
                _ => &Schema::Null,
            };
            let mut entries: Vec<_> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Object(
                entries
                    .into_iter()
                    .map(|(k, x)| (k, to_json(x, item, names)))
                    .collect(),
            )
        }
        Avro::Record(fields) => {
            let field_schemas = match schema {
                Schema::Record(r) => Some(&r.fields),
                _ => None,
            };
            Json::Object(
                fields
                    .into_iter()
                    .enumerate()
                    .map(|(i, (k, x))| {
                        let s = field_schemas
                            .and_then(|f| f.get(i))
                            .filter(|f| f.name == k)
                            .map_or(&Schema::Null, |f| &f.schema);
                        let j = to_json(x, s, names);
                        (k, j)
                    })
                    .collect(),
            )
        }
        Avro::Date(days) => (i64::from(days) * 86_400_000).into(),
        Avro::Decimal(d) => {
            let scale = match schema {
                Schema::Decimal(d) => d.scale,
                _ => 0,
            };
            let unscaled = num_bigint::BigInt::from(d);
            float(
                format!("{unscaled}e-{scale}")
                    .parse::<f64>()
                    .unwrap_or(f64::NAN),
            )
        }
        Avro::BigDecimal(d) => float(d.to_string().parse::<f64>().unwrap_or(f64::NAN)),
        Avro::TimeMillis(t) => t.into(),
        Avro::TimeMicros(t) => t.into(),
        Avro::TimestampMillis(t) | Avro::LocalTimestampMillis(t) => t.into(),
        Avro::TimestampMicros(t) | Avro::LocalTimestampMicros(t) => t.div_euclid(1_000).into(),
        Avro::TimestampNanos(t) | Avro::LocalTimestampNanos(t) => t.div_euclid(1_000_000).into(),
        Avro::Duration(d) => serde_json::json!({
            "months": u32::from(d.months()),
            "days": u32::from(d.days()),
            "millis": u32::from(d.millis()),
        }),
        Avro::Uuid(u) => u.to_string().into(),
    }
}

fn float(f: f64) -> Json {
    serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)
}

/// Bytes as text when they are UTF-8, else as an array of byte values.
fn bytes(b: Vec<u8>) -> Json {
    match String::from_utf8(b) {
        Ok(s) => s.into(),
        Err(e) => e.into_bytes().into_iter().map(Json::from).collect(),
    }
}

/// The Avro type a column is written as (before making it nullable), or why it cannot be.
fn column_type(t: &DataType) -> Result<Json, String> {
    Ok(match t {
        DataType::Int64 => "long".into(),
        DataType::Int32 => "int".into(),
        DataType::Float64 => "double".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Utf8 => "string".into(),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            serde_json::json!({"type": "long", "logicalType": "timestamp-millis"})
        }
        DataType::Dictionary(_, values) => column_type(values)?,
        DataType::List(item) => {
            serde_json::json!({"type": "array", "items": nullable(column_type(item.data_type())?)})
        }
        other => return Err(format!("a column of type {other} has no Avro type here")),
    })
}

fn nullable(t: Json) -> Json {
    Json::Array(vec!["null".into(), t])
}

/// The record schema rows of `input` are written with: one nullable field per column except
/// the event-time column, in column order. `record` is the record's full name.
pub fn schema_for(input: &SchemaRef, record: &str) -> Result<Schema, String> {
    let mut fields = Vec::new();
    for f in input.fields() {
        if f.name() == TIME_COLUMN {
            continue;
        }
        let t = column_type(f.data_type()).map_err(|e| format!("column '{}': {e}", f.name()))?;
        fields.push(serde_json::json!({"name": f.name(), "type": nullable(t), "default": null}));
    }
    Name::new(record).map_err(|e| format!("'{record}' is not an Avro record name: {e}"))?;
    let json = serde_json::json!({"type": "record", "name": record, "fields": fields});
    Schema::parse_str(&json.to_string()).map_err(|e| format!("the derived Avro schema: {e}"))
}

/// A record name made of `name`: characters Avro names cannot hold become `_`.
pub fn record_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.insert(0, '_');
    }
    out
}

/// Writes rows as values of the Confluent wire format with one registered schema.
pub struct AvroEncoder {
    schema: Schema,
    id: u32,
}

impl AvroEncoder {
    /// An encoder of `schema`, registered with `id`.
    pub fn new(schema: Schema, id: u32) -> Self {
        AvroEncoder { schema, id }
    }

    /// The rows of `batch` (whose columns are the schema's, plus perhaps the event-time
    /// column), one value each.
    pub fn rows(&self, batch: &RecordBatch) -> freshet_engine::Result<Vec<Vec<u8>>> {
        let failed = |e: apache_avro::Error| EngineError::Operator(format!("writing Avro: {e}"));
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&self.schema)
            .build()
            .map_err(failed)?;
        let columns: Vec<(&String, &dyn Array)> = batch
            .schema_ref()
            .fields()
            .iter()
            .zip(batch.columns())
            .filter(|(f, _)| f.name() != TIME_COLUMN)
            .map(|(f, c)| (f.name(), c.as_ref()))
            .collect();
        let mut out = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            let fields = columns
                .iter()
                .map(|(name, c)| Ok(((*name).clone(), nullable_value(*c, row)?)))
                .collect::<freshet_engine::Result<Vec<_>>>()?;
            let mut value = vec![MAGIC];
            value.extend_from_slice(&self.id.to_be_bytes());
            writer
                .write_value(&mut value, Avro::Record(fields))
                .map_err(failed)?;
            out.push(value);
        }
        Ok(out)
    }
}

/// A cell as the value of a `["null", T]` union.
fn nullable_value(a: &dyn Array, row: usize) -> freshet_engine::Result<Avro> {
    Ok(if a.is_null(row) {
        Avro::Union(0, Box::new(Avro::Null))
    } else {
        Avro::Union(1, Box::new(value(a, row)?))
    })
}

fn value(a: &dyn Array, row: usize) -> freshet_engine::Result<Avro> {
    Ok(match a.data_type() {
        DataType::Int64 => Avro::Long(a.as_primitive::<Int64Type>().value(row)),
        DataType::Int32 => Avro::Int(a.as_primitive::<Int32Type>().value(row)),
        DataType::Float64 => Avro::Double(a.as_primitive::<Float64Type>().value(row)),
        DataType::Boolean => Avro::Boolean(a.as_boolean().value(row)),
        DataType::Utf8 => Avro::String(a.as_string::<i32>().value(row).to_string()),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            Avro::TimestampMillis(a.as_primitive::<TimestampMillisecondType>().value(row))
        }
        DataType::Dictionary(..) => {
            let (key, values) = freshet_operators::json::dictionary_entry(a, row)?;
            value(values.as_ref(), key)?
        }
        DataType::List(_) => {
            let items = a.as_list::<i32>().value(row);
            Avro::Array(
                (0..items.len())
                    .map(|i| nullable_value(items.as_ref(), i))
                    .collect::<freshet_engine::Result<_>>()?,
            )
        }
        other => {
            return Err(EngineError::Operator(format!(
                "cannot write a column of type {other} as Avro"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema as ArrowSchema};

    fn batch() -> RecordBatch {
        let schema = Arc::new(ArrowSchema::new(vec![
            Field::new("store", DataType::Utf8, true),
            Field::new("revenue", DataType::Float64, true),
            Field::new("count", DataType::Int64, true),
            Field::new(
                "window_end",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
            Field::new(
                TIME_COLUMN,
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![Some("s1"), None])),
                Arc::new(Float64Array::from(vec![Some(12.5), Some(-1.0)])),
                Arc::new(Int64Array::from(vec![Some(3), None])),
                Arc::new(TimestampMillisecondArray::from(vec![60_000, 120_000])),
                Arc::new(TimestampMillisecondArray::from(vec![59_999, 119_999])),
            ],
        )
        .unwrap()
    }

    /// What the encoder writes, read back with the derived schema, is the rows' values (the
    /// event-time column left out, nulls as nulls).
    #[test]
    fn rows_round_trip() {
        let b = batch();
        let schema = schema_for(b.schema_ref(), &record_name("revenue-out")).unwrap();
        let enc = AvroEncoder::new(schema.clone(), 7);
        let names = apache_avro::schema::ResolvedSchema::new(&schema).unwrap();
        let mut rows = Vec::new();
        for out in enc.rows(&b).unwrap() {
            assert_eq!(out[..5], [0, 0, 0, 0, 7]);
            let v = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
                .build()
                .unwrap()
                .read_value(&mut &out[5..])
                .unwrap();
            rows.push(to_json(v, &schema, names.get_names()));
        }
        assert_eq!(
            rows,
            vec![
                serde_json::json!({"store": "s1", "revenue": 12.5, "count": 3, "window_end": 60000}),
                serde_json::json!({"store": null, "revenue": -1.0, "count": null, "window_end": 120000}),
            ]
        );
    }

    /// Logical types become what the job's types take.
    #[test]
    fn logical_types_become_plain_values() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "r", "fields": [
                {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
                {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
                {"name": "day", "type": {"type": "int", "logicalType": "date"}},
                {"name": "kind", "type": {"type": "enum", "name": "k", "symbols": ["A", "B"]}},
                {"name": "tags", "type": {"type": "map", "values": "string"}}
            ]}"#,
        )
        .unwrap();
        let v = Avro::Record(vec![
            (
                "price".into(),
                Avro::Decimal(apache_avro::Decimal::from(12345i64.to_be_bytes())),
            ),
            ("at".into(), Avro::TimestampMicros(1_700_000_000_123_456)),
            ("day".into(), Avro::Date(2)),
            ("kind".into(), Avro::Enum(1, "B".into())),
            (
                "tags".into(),
                Avro::Map([("x".to_string(), Avro::String("y".into()))].into()),
            ),
        ]);
        let names = apache_avro::schema::ResolvedSchema::new(&schema).unwrap();
        assert_eq!(
            to_json(v, &schema, names.get_names()),
            serde_json::json!({"price": 123.45, "at": 1_700_000_000_123i64,
                               "day": 172_800_000, "kind": "B", "tags": {"x": "y"}})
        );
    }

    #[test]
    fn record_names_are_valid() {
        assert_eq!(record_name("revenue-out"), "revenue_out");
        assert_eq!(record_name("9lives"), "_9lives");
        assert!(schema_for(batch().schema_ref(), "9x").is_err());
    }
}

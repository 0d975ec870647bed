//! Dead-letter records: what could not be processed, why, and where it came from.
//!
//! Every dead-letter output in a job has the same schema, so they can all go to one sink:
//! `origin` (the source or operator), `position` (file and line, or a description), `reason`,
//! `record` (the offending input as text: the raw line, or the row as JSON) and the event time.
use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::sync::{Arc, OnceLock};

use freshet_engine::TIME_COLUMN;

/// The schema shared by all dead-letter outputs.
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("origin", DataType::Utf8, false),
                Field::new("position", DataType::Utf8, true),
                Field::new("reason", DataType::Utf8, false),
                Field::new("record", DataType::Utf8, true),
                Field::new(TIME_COLUMN, DataType::Int64, false),
            ]))
        })
        .clone()
}

/// Collects dead-letter records and turns them into a batch.
#[derive(Debug, Default)]
pub struct DeadLetters {
    origin: Vec<String>,
    position: Vec<Option<String>>,
    reason: Vec<String>,
    record: Vec<Option<String>>,
    time: Vec<i64>,
}

impl DeadLetters {
    /// Adds one record.
    pub fn push(
        &mut self,
        origin: &str,
        position: Option<String>,
        reason: String,
        record: Option<String>,
        time: i64,
    ) {
        self.origin.push(origin.to_string());
        self.position.push(position);
        self.reason.push(reason);
        self.record.push(record);
        self.time.push(time);
    }

    /// Number of records collected.
    pub fn len(&self) -> usize {
        self.origin.len()
    }

    /// True if none.
    pub fn is_empty(&self) -> bool {
        self.origin.is_empty()
    }

    /// The collected records as a batch; empties the collector.
    pub fn take_batch(&mut self) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(std::mem::take(&mut self.origin))),
            Arc::new(StringArray::from(std::mem::take(&mut self.position))),
            Arc::new(StringArray::from(std::mem::take(&mut self.reason))),
            Arc::new(StringArray::from(std::mem::take(&mut self.record))),
            Arc::new(Int64Array::from(std::mem::take(&mut self.time))),
        ];
        RecordBatch::try_new(schema(), cols).expect("columns match the dead-letter schema")
    }
}

/// Turns rows of any stream into dead-letter records (the row as JSON), so that a side output
/// nobody consumes still ends up somewhere visible instead of being dropped.
pub struct ToDeadLetter {
    origin: String,
    reason: String,
}

impl ToDeadLetter {
    /// Records from `origin` with `reason`.
    pub fn new(origin: impl Into<String>, reason: impl Into<String>) -> Self {
        ToDeadLetter {
            origin: origin.into(),
            reason: reason.into(),
        }
    }
}

impl freshet_engine::operator::Operator for ToDeadLetter {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        _: &freshet_engine::operator::OperatorContext<'_>,
        out: &mut dyn freshet_engine::operator::Output,
    ) -> freshet_engine::Result<()> {
        // the rows were already counted where they were diverted (as late records)
        use arrow::array::AsArray;
        let times = batch
            .column(batch.num_columns() - 1)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .clone();
        let mut dl = DeadLetters::default();
        for row in 0..batch.num_rows() {
            dl.push(
                &self.origin,
                None,
                self.reason.clone(),
                Some(crate::json::row_to_string(&batch, row)?),
                times.value(row),
            );
        }
        out.emit(freshet_engine::operator::MAIN_PORT, dl.take_batch());
        Ok(())
    }
}

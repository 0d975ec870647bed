//! Assigning event time at a source: evaluates the job's `event_time` expression over a decoded
//! batch and appends it as the time column. Rows whose event time is null are taken out and
//! returned with their index, so the source can dead-letter them with their position.
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::sync::Arc;

use freshet_engine::{Result, TIME_COLUMN};
use freshet_operators::expr::{Expr, ExprError, type_name};

/// Computes the time column of a source's batches.
#[derive(Clone)]
pub struct EventTime {
    expr: Option<Expr>,
    output: SchemaRef,
}

impl EventTime {
    /// Compiles `event_time` (or none: every record gets time 0) against the decoded schema.
    pub fn compile(text: Option<&str>, decoded: &Schema) -> Result<Self, ExprError> {
        let expr = text.map(|t| Expr::compile(t, decoded)).transpose()?;
        if let Some(e) = &expr
            && !matches!(e.data_type(), DataType::Timestamp(..) | DataType::Int64)
        {
            return Err(ExprError {
                message: format!(
                    "event_time must be a TIMESTAMP or BIGINT epoch milliseconds, got {}",
                    type_name(e.data_type())
                ),
            });
        }
        let mut fields: Vec<Field> = decoded
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(TIME_COLUMN, DataType::Int64, false));
        Ok(EventTime {
            expr,
            output: Arc::new(Schema::new(fields)),
        })
    }

    /// The schema of the batches a source emits (decoded columns plus the time column).
    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// Appends the time column. Returns the batch of rows with a valid time and the indexes
    /// (into `columns`) of rows whose time was null.
    pub fn apply(&self, columns: Vec<ArrayRef>, rows: usize) -> Result<(RecordBatch, Vec<usize>)> {
        let decoded = RecordBatch::try_new_with_options(
            Arc::new(Schema::new(
                self.output.fields()[..self.output.fields().len() - 1].to_vec(),
            )),
            columns.clone(),
            &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows)),
        )?;
        let time: ArrayRef = match &self.expr {
            None => Arc::new(Int64Array::from(vec![0i64; rows])),
            Some(e) => cast(e.evaluate(&decoded)?.as_ref(), &DataType::Int64)?,
        };
        let mut cols = columns;
        cols.push(time.clone());
        let batch = RecordBatch::try_new(self.output.clone(), cols)?;
        if time.null_count() == 0 {
            return Ok((batch, Vec::new()));
        }
        let bad: Vec<usize> = (0..rows).filter(|i| time.is_null(*i)).collect();
        let keep = BooleanArray::from((0..rows).map(|i| time.is_valid(i)).collect::<Vec<_>>());
        let batch = filter_record_batch(&batch, &keep)?;
        // the filtered time column still carries a validity buffer; drop it (no nulls remain)
        let t = batch
            .column(batch.num_columns() - 1)
            .as_primitive::<arrow::datatypes::Int64Type>();
        let t: ArrayRef = Arc::new(Int64Array::new(t.values().clone(), None));
        let mut cols = batch.columns().to_vec();
        *cols.last_mut().expect("has a time column") = t;
        Ok((RecordBatch::try_new(self.output.clone(), cols)?, bad))
    }
}

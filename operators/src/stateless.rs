//! Operators without state: filter, project (computed columns) and the identity used by
//! `key_by` (whose work is done by the hash edge in front of it).
use arrow::array::ArrayRef;
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::sync::Arc;

use freshet_engine::operator::{MAIN_PORT, Operator, OperatorContext, Output};
use freshet_engine::{Result, TIME_COLUMN};

use crate::expr::{self, Expr, ExprError};

/// Keeps rows for which the predicate is true (null counts as false).
pub struct Filter {
    predicate: Expr,
}

impl Filter {
    /// A filter with a compiled predicate.
    pub fn new(predicate: Expr) -> Self {
        Filter { predicate }
    }
}

impl Operator for Filter {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        _: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        let mask = self.predicate.evaluate_predicate(&batch)?;
        if mask.true_count() == batch.num_rows() {
            out.emit(MAIN_PORT, batch);
        } else if mask.true_count() > 0 {
            out.emit(MAIN_PORT, filter_record_batch(&batch, &mask)?);
        }
        Ok(())
    }
}

/// Passes batches through unchanged.
pub struct Identity;

impl Operator for Identity {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        _: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        out.emit(MAIN_PORT, batch);
        Ok(())
    }
}

/// A compiled select list: output columns computed from input columns.
#[derive(Clone)]
pub struct Projection {
    columns: Vec<Expr>,
    schema: SchemaRef,
}

impl Projection {
    /// Compiles `items` (`expr [AS name]` or `*`) against `input`. The output keeps the input's
    /// event time as its last column.
    pub fn compile(items: &[String], input: &Schema) -> Result<Projection, (usize, ExprError)> {
        let mut columns = Vec::new();
        let mut fields: Vec<Field> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let (e, alias) = expr::parse_select_item(item).map_err(|e| (i, e))?;
            match e {
                None => {
                    for (idx, f) in input.fields().iter().enumerate() {
                        if f.name() == TIME_COLUMN {
                            continue;
                        }
                        let c = expr::compile_passthrough(
                            &sqlparser::ast::Expr::Identifier(sqlparser::ast::Ident::new(
                                f.name().clone(),
                            )),
                            input,
                        )
                        .map_err(|e| (i, e))?;
                        debug_assert!(c.as_column().is_some() || idx < input.fields().len());
                        fields.push(Field::new(f.name(), c.data_type().clone(), true));
                        columns.push(c);
                    }
                }
                Some(e) => {
                    let name = alias.unwrap_or_else(|| expr::default_name(&e));
                    let c = expr::compile_passthrough(&e, input).map_err(|e| (i, e))?;
                    if fields.iter().any(|f| f.name() == &name) {
                        return Err((
                            i,
                            ExprError {
                                message: format!(
                                    "column '{name}' is selected twice; add `AS other_name`"
                                ),
                            },
                        ));
                    }
                    fields.push(Field::new(&name, c.data_type().clone(), true));
                    columns.push(c);
                }
            }
        }
        fields.push(Field::new(
            TIME_COLUMN,
            arrow::datatypes::DataType::Int64,
            false,
        ));
        Ok(Projection {
            columns,
            schema: Arc::new(Schema::new(fields)),
        })
    }

    /// The output schema (with the event-time column last).
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Computes the output columns for `batch`, with `time` as the event-time column.
    pub fn apply(&self, batch: &RecordBatch, time: ArrayRef) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|c| c.evaluate(batch))
            .collect::<Result<_>>()?;
        cols.push(time);
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }
}

/// Computes new columns from each row.
pub struct Project {
    projection: Projection,
}

impl Project {
    /// A projection operator.
    pub fn new(projection: Projection) -> Self {
        Project { projection }
    }
}

impl Operator for Project {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        _: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        let time = batch.column(batch.num_columns() - 1).clone();
        out.emit(MAIN_PORT, self.projection.apply(&batch, time)?);
        Ok(())
    }
}

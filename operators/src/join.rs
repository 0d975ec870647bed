//! Event-time interval join of two keyed streams.
//!
//! A left row `l` and a right row `r` with equal keys match when
//! `l.time + lower_bound <= r.time <= l.time + upper_bound` and the optional `where` condition
//! holds; each match emits one row computed by `select` over the pair (columns qualified by the
//! input names, e.g. `orders.amount`), with event time `max(l.time, r.time)`.
//!
//! **State:** every row of both sides, per key and timestamp, with whether it matched.
//! **Cleared:** a left row once the watermark reaches `l.time + upper_bound` (no right row that
//! could still arrive can match it), a right row once it reaches `r.time - lower_bound`. A row
//! cleared without ever matching goes to the `unmatched` output (port 1) as a dead-letter record
//! saying whether it found no partner in the interval or only partners that failed the condition.
//! A row that arrives at or behind its input's watermark cannot be joined reliably and goes to the
//! `late` output (port 2). State is therefore bounded by the interval.
use arrow::array::{ArrayRef, AsArray, BooleanArray, Int64Array, UInt32Array};
use arrow::compute::{filter_record_batch, take};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::sync::Arc;

use freshet_engine::checkpoint::{SnapshotContext, StateContext};
use freshet_engine::keys::{EncodedKeys, KeyColumns};
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{MAIN_PORT, Operator, OperatorContext, Output};
use freshet_engine::state::timers::FIRE_BATCH;
use freshet_engine::state::{KeyedTable, Timers};
use freshet_engine::time::format_millis;
use freshet_engine::{Result, TIME_COLUMN, Watermark};

use crate::dead_letter::DeadLetters;
use crate::expr::Expr;
use crate::stateless::Projection;
use crate::values::{ColumnReader, Scalar, build_column};

/// Output port of rows that never matched.
pub const UNMATCHED_PORT: usize = 1;
/// Output port of rows that arrived too late to join.
pub const LATE_PORT: usize = 2;

/// What the join is compiled from.
pub struct JoinConfig<'a> {
    /// Transform name (the origin of dead letters).
    pub name: String,
    /// Name qualifying left columns.
    pub left_name: String,
    /// Name qualifying right columns.
    pub right_name: String,
    /// Left input schema.
    pub left: &'a SchemaRef,
    /// Right input schema.
    pub right: &'a SchemaRef,
    /// Left key columns.
    pub left_key: &'a [String],
    /// Right key columns.
    pub right_key: &'a [String],
    /// Lower bound of `right.time - left.time` (ms).
    pub lower: i64,
    /// Upper bound (ms).
    pub upper: i64,
    /// Extra condition over the pair.
    pub predicate: Option<&'a str>,
    /// Output columns over the pair.
    pub select: &'a [String],
}

/// One side's layout.
#[derive(Clone)]
struct Side {
    name: String,
    keys: KeyColumns,
    /// Data columns (all but the time column), with their types and names.
    columns: Vec<(usize, DataType, String)>,
}

/// A compiled interval join.
#[derive(Clone)]
pub struct JoinPlan {
    name: String,
    sides: [Side; 2],
    lower: i64,
    upper: i64,
    pair_schema: SchemaRef,
    predicate: Option<Expr>,
    projection: Projection,
}

fn side(
    name: &str,
    schema: &SchemaRef,
    key: &[String],
    field: &str,
) -> Result<Side, (String, String)> {
    let keys = crate::resolve_keys(schema, key, field)?;
    let columns = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name() != TIME_COLUMN)
        .map(|(i, f)| (i, f.data_type().clone(), f.name().clone()))
        .collect();
    Ok(Side {
        name: name.to_string(),
        keys,
        columns,
    })
}

impl JoinPlan {
    /// Compiles the join; errors name the field.
    pub fn compile(c: JoinConfig<'_>) -> Result<JoinPlan, (String, String)> {
        let left = side(&c.left_name, c.left, c.left_key, "left_key")?;
        let right = side(&c.right_name, c.right, c.right_key, "right_key")?;
        if left.keys.encoder().key_types() != right.keys.encoder().key_types() {
            return Err((
                "right_key".into(),
                "left_key and right_key columns must have the same types".into(),
            ));
        }
        for (i, (_, dt, _)) in left.columns.iter().chain(&right.columns).enumerate() {
            if matches!(dt, DataType::Dictionary(..) | DataType::List(_)) {
                return Err((
                    if i < left.columns.len() {
                        "left"
                    } else {
                        "right"
                    }
                    .into(),
                    format!("columns of type {dt} cannot be joined yet"),
                ));
            }
        }
        let mut fields: Vec<Field> = Vec::new();
        for s in [&left, &right] {
            for (_, dt, n) in &s.columns {
                fields.push(Field::new(format!("{}.{}", s.name, n), dt.clone(), true));
            }
        }
        fields.push(Field::new(TIME_COLUMN, DataType::Int64, false));
        let pair_schema = Arc::new(Schema::new(fields));
        let predicate = c
            .predicate
            .map(|p| {
                let e =
                    Expr::compile(p, &pair_schema).map_err(|e| ("where".to_string(), e.message))?;
                if e.data_type() != &DataType::Boolean {
                    return Err((
                        "where".to_string(),
                        "must be a BOOLEAN condition".to_string(),
                    ));
                }
                Ok(e)
            })
            .transpose()?;
        let projection = Projection::compile(c.select, &pair_schema)
            .map_err(|(i, e)| (format!("select[{i}]"), e.message))?;
        Ok(JoinPlan {
            name: c.name,
            sides: [left, right],
            lower: c.lower,
            upper: c.upper,
            pair_schema,
            predicate,
            projection,
        })
    }

    /// Schema of the joined rows.
    pub fn output_schema(&self) -> SchemaRef {
        self.projection.schema()
    }

    /// The operator of one subtask.
    pub fn instantiate(&self) -> JoinOperator {
        JoinOperator {
            plan: self.clone(),
            buffers: [
                KeyedTable::new("join-left", None),
                KeyedTable::new("join-right", None),
            ],
            cleanup: [Timers::new("cleanup-left"), Timers::new("cleanup-right")],
            keys: EncodedKeys::default(),
            more: false,
        }
    }
}

/// A buffered row.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Buffered {
    values: Vec<Option<Scalar>>,
    matched: bool,
    /// A partner in the interval was found but failed the condition.
    candidate: bool,
}

/// The join operator of one subtask.
pub struct JoinOperator {
    plan: JoinPlan,
    buffers: [KeyedTable<Vec<Buffered>>; 2],
    cleanup: [Timers; 2],
    keys: EncodedKeys,
    /// The last `on_watermark` expired a full batch of rows and may have more.
    more: bool,
}

impl JoinOperator {
    /// The interval of the other side's timestamps that can match a row of `side` at `t`.
    fn partner_range(&self, side: usize, t: i64) -> (i64, i64) {
        if side == 0 {
            (t + self.plan.lower, t + self.plan.upper)
        } else {
            (t - self.plan.upper, t - self.plan.lower)
        }
    }

    /// When a row of `side` at `t` can no longer match anything.
    fn expiry(&self, side: usize, t: i64) -> i64 {
        if side == 0 {
            t + self.plan.upper
        } else {
            t - self.plan.lower
        }
    }

    fn dead_letter(
        &self,
        side: usize,
        values: &[Option<Scalar>],
        t: i64,
        reason: String,
        out: &mut DeadLetters,
    ) {
        let s = &self.plan.sides[side];
        let mut obj = serde_json::Map::new();
        for ((_, dt, name), v) in s.columns.iter().zip(values) {
            let j = match (v, dt) {
                (None, _) => serde_json::Value::Null,
                (Some(Scalar::Int(ms)), DataType::Timestamp(..)) => {
                    serde_json::Value::String(format_millis(*ms))
                }
                (Some(Scalar::Int(i)), _) => (*i).into(),
                (Some(Scalar::Float(f)), _) => serde_json::Number::from_f64(*f)
                    .map(Into::into)
                    .unwrap_or(serde_json::Value::Null),
                (Some(Scalar::Str(x)), _) => serde_json::Value::String(x.to_string()),
                (Some(Scalar::Bool(b)), _) => (*b).into(),
            };
            obj.insert(name.clone(), j);
        }
        out.push(
            &self.plan.name,
            Some(format!("{} row", s.name)),
            reason,
            Some(serde_json::Value::Object(obj).to_string()),
            t,
        );
    }
}

impl Operator for JoinOperator {
    fn has_more_output(&self) -> bool {
        self.more
    }

    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        for b in self.buffers.iter_mut() {
            state.attach(b)?;
        }
        self.cleanup = [
            state.timers("cleanup-left")?,
            state.timers("cleanup-right")?,
        ];
        Ok(())
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        for b in self.buffers.iter_mut() {
            snap.flush(b)?;
        }
        let [left, right] = &mut self.cleanup;
        snap.flush_timers(left)?;
        snap.flush_timers(right)
    }

    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        let side = input.min(1);
        let other = 1 - side;
        let n = batch.num_rows();
        let layout = self.plan.sides[side].clone();
        layout.keys.encode(&batch, &mut self.keys)?;
        let times = batch
            .column(batch.num_columns() - 1)
            .as_primitive::<Int64Type>()
            .values()
            .clone();
        let data: Vec<ArrayRef> = layout
            .columns
            .iter()
            .map(|(i, _, _)| batch.column(*i).clone())
            .collect();
        let readers: Vec<ColumnReader<'_>> =
            data.iter().map(ColumnReader::new).collect::<Result<_>>()?;
        let rw = ctx.record_watermark.0;

        // 1. Probe the other side's buffer for candidate pairs.
        let mut pair_rows: Vec<u32> = Vec::new();
        let mut pair_partners: Vec<(i64, usize)> = Vec::new();
        let mut pair_values: Vec<Vec<Option<Scalar>>> = Vec::new();
        let mut late = DeadLetters::default();
        let mut live = vec![false; n];
        for (row, &t) in times.iter().enumerate() {
            if t <= rw {
                let values: Vec<Option<Scalar>> = readers.iter().map(|r| r.get(row)).collect();
                self.dead_letter(
                    side,
                    &values,
                    t,
                    "arrived behind the watermark; too late to join".into(),
                    &mut late,
                );
                continue;
            }
            live[row] = true;
            let (lo, hi) = self.partner_range(side, t);
            for (pt, rows) in
                self.buffers[other].range(self.keys.row(row), lo..=hi, Watermark::MIN)?
            {
                for (idx, b) in rows.iter().enumerate() {
                    pair_rows.push(row as u32);
                    pair_partners.push((pt, idx));
                    pair_values.push(b.values.clone());
                }
            }
        }
        if !late.is_empty() {
            SubtaskMetrics::add(&ctx.metrics.late_records, late.len() as u64);
            out.emit(LATE_PORT, late.take_batch());
        }

        // 2. Evaluate the condition over all candidate pairs at once and emit the matches.
        let mut matched_rows = vec![false; n];
        let mut candidate_rows = vec![false; n];
        if !pair_rows.is_empty() {
            let idx = UInt32Array::from(pair_rows.clone());
            let mine: Vec<ArrayRef> = data
                .iter()
                .map(|c| take(c.as_ref(), &idx, None))
                .collect::<Result<_, _>>()?;
            let theirs: Vec<ArrayRef> = self.plan.sides[other]
                .columns
                .iter()
                .enumerate()
                .map(|(j, (_, dt, _))| build_column(dt, pair_values.iter().map(|v| v[j].as_ref())))
                .collect::<Result<_>>()?;
            let mut cols = if side == 0 {
                [mine, theirs].concat()
            } else {
                [theirs, mine].concat()
            };
            let time: Vec<i64> = pair_rows
                .iter()
                .zip(&pair_partners)
                .map(|(r, (pt, _))| times[*r as usize].max(*pt))
                .collect();
            cols.push(Arc::new(Int64Array::from(time)));
            let pairs = RecordBatch::try_new(self.plan.pair_schema.clone(), cols)?;
            let mask = match &self.plan.predicate {
                Some(p) => p.evaluate_predicate(&pairs)?,
                None => BooleanArray::from(vec![true; pairs.num_rows()]),
            };
            for (i, ok) in mask.iter().enumerate() {
                let row = pair_rows[i] as usize;
                let (pt, pidx) = pair_partners[i];
                let key = self.keys.row(row);
                let ok = ok.unwrap_or(false);
                if ok {
                    matched_rows[row] = true;
                } else {
                    candidate_rows[row] = true;
                }
                if let Some((_, rows)) = self.buffers[other].range_mut(key, pt..=pt)?.next() {
                    if ok {
                        rows[pidx].matched = true;
                    } else {
                        rows[pidx].candidate = true;
                    }
                }
            }
            if mask.true_count() > 0 {
                let hits = filter_record_batch(&pairs, &mask)?;
                let time = hits.column(hits.num_columns() - 1).clone();
                out.emit(MAIN_PORT, self.plan.projection.apply(&hits, time)?);
            }
        }

        // 3. Buffer this batch's rows until they can no longer match.
        for (row, &t) in times.iter().enumerate() {
            if !live[row] {
                continue;
            }
            let values: Vec<Option<Scalar>> = readers.iter().map(|r| r.get(row)).collect();
            let b = Buffered {
                values,
                matched: matched_rows[row],
                candidate: candidate_rows[row],
            };
            let key = self.keys.row(row);
            self.buffers[side].update(key, t, t, Watermark::MIN, Vec::new, |v| v.push(b))?;
            let expiry = self.expiry(side, t);
            self.cleanup[side].register(expiry, key)?;
        }
        Ok(())
    }

    fn on_watermark(
        &mut self,
        wm: Watermark,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        // one batch of expiries per side and call (see `has_more_output`)
        self.more = false;
        for side in 0..2 {
            {
                let due = self.cleanup[side].due(wm, FIRE_BATCH)?;
                self.more |= due.len() == FIRE_BATCH;
                let mut unmatched = DeadLetters::default();
                for (t, key) in due {
                    // rows of this side whose expiry is t: time = t - upper (left) or t + lower (right)
                    let row_time = if side == 0 {
                        t - self.plan.upper
                    } else {
                        t + self.plan.lower
                    };
                    for (rt, rows) in self.buffers[side].drain_range(&key, ..=row_time)? {
                        for b in rows.into_iter().filter(|b| !b.matched) {
                            let reason = if b.candidate {
                                "rows in the interval did not satisfy the join condition"
                                    .to_string()
                            } else {
                                "no matching row within the interval".to_string()
                            };
                            self.dead_letter(side, &b.values, rt, reason, &mut unmatched);
                        }
                    }
                }
                if !unmatched.is_empty() {
                    SubtaskMetrics::add(&ctx.metrics.dead_letters, unmatched.len() as u64);
                    out.emit(UNMATCHED_PORT, unmatched.take_batch());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Harness, batch, schema};
    use arrow::array::StringArray;

    #[test]
    fn matches_within_interval_condition_and_reports_unmatched() {
        let orders = schema(vec![
            Field::new("order_id", DataType::Utf8, true),
            Field::new("amount", DataType::Int64, true),
        ]);
        let payments = schema(vec![
            Field::new("order_id", DataType::Utf8, true),
            Field::new("amount", DataType::Int64, true),
        ]);
        let plan = JoinPlan::compile(JoinConfig {
            name: "paid".into(),
            left_name: "orders".into(),
            right_name: "payments".into(),
            left: &orders,
            right: &payments,
            left_key: &["order_id".into()],
            right_key: &["order_id".into()],
            lower: 0,
            upper: 100,
            predicate: Some("orders.amount = payments.amount"),
            select: &["orders.order_id".into(), "payments.amount AS paid".into()],
        })
        .unwrap();
        let mut h = Harness::new(plan.instantiate());
        let mk = |s: &SchemaRef, rows: &[(&str, i64, i64)]| {
            batch(
                s,
                vec![
                    Arc::new(StringArray::from(
                        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                    )),
                    Arc::new(Int64Array::from(
                        rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                    )),
                ],
                &rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )
        };
        h.push(
            0,
            mk(
                &orders,
                &[("o1", 10, 0), ("o2", 20, 0), ("o3", 30, 0), ("o4", 40, 0)],
            ),
        );
        // payment before the order (right arrives first) for o4 is outside [0, 100] => no match
        h.push(
            1,
            mk(
                &payments,
                &[("o1", 10, 50), ("o2", 99, 60), ("o3", 30, 101)],
            ),
        );
        assert_eq!(h.take(0), vec![r#"{"order_id":"o1","paid":10}"#]);
        h.watermark(1000);
        let dl = h.take(1);
        assert_eq!(dl.len(), 5, "{dl:?}");
        assert!(
            dl.iter()
                .any(|l| l.contains(r#"\"order_id\":\"o2\""#) && l.contains("did not satisfy")),
            "{dl:?}"
        );
        assert!(dl.iter().any(|l| l.contains(r#"\"order_id\":\"o3\""#)
            && l.contains("orders row")
            && l.contains("no matching row")));
        // a late row goes to the late output
        h.push(1, mk(&payments, &[("o9", 1, 500)]));
        assert_eq!(h.take(2).len(), 1);
        assert!(
            h.op.buffers[0].is_empty() && h.op.buffers[1].is_empty(),
            "state is bounded by the interval"
        );
    }
}

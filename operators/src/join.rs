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
use smallvec::SmallVec;
use std::sync::Arc;

use freshet_engine::checkpoint::{SnapshotContext, StateContext};
use freshet_engine::keys::{EncodedKeys, KeyColumns};
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{MAIN_PORT, Operator, OperatorContext, Output};
use freshet_engine::state::timers::FIRE_BATCH;
use freshet_engine::state::{KeyedTable, TableDrain, Timers};
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
            draining: [None, None],
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

/// A candidate pair of a batch row and a buffered row of the other side.
struct Pair {
    /// The batch row.
    row: u32,
    /// The batch row's key, as an index into the batch's [`RowsByKey`](freshet_engine::keys::RowsByKey).
    group: u32,
    /// The buffered row: its time and index among the rows buffered at that time.
    partner: (i64, u32),
    /// The buffered row's `matched` and `candidate` flags when it was probed.
    flags: (bool, bool),
    /// Where the buffered row's values are in the per-column lists of the probe.
    values: u32,
}

/// The join operator of one subtask.
pub struct JoinOperator {
    plan: JoinPlan,
    buffers: [KeyedTable<Vec<Buffered>>; 2],
    cleanup: [Timers; 2],
    /// A side's rows expiring by one pass over its buffers ([`JoinOperator::drain_side`]).
    draining: [Option<TableDrain>; 2],
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

    /// Reports the rows of `side` buffered at `t` that expire unmatched.
    fn expire_rows(&self, side: usize, t: i64, rows: Vec<Buffered>, out: &mut DeadLetters) {
        for b in rows.into_iter().filter(|b| !b.matched) {
            let reason = if b.candidate {
                "rows in the interval did not satisfy the join condition"
            } else {
                "no matching row within the interval"
            };
            self.dead_letter(side, &b.values, t, reason.to_string(), out);
        }
    }

    /// Expires every buffered row of `side` by one pass over its buffers in row order, a batch
    /// of rows per call, when every cleanup timer of the side is due (the end of a bounded
    /// input) and RocksDB holds rows memory lacks: reading the table in order reads each block
    /// once, where expiring timer by timer reads a block per key. Each buffered (key, time) has
    /// a cleanup timer, so every row is due and the timers are deleted once the pass ends; rows
    /// that are not (a broken invariant) are put back with their timer. A snapshot between
    /// calls holds the rows not yet expired, and a restore begins again over those. Whether the
    /// side has more to expire.
    fn drain_side(&mut self, side: usize, wm: Watermark, out: &mut DeadLetters) -> Result<bool> {
        let mut drain = match self.draining[side].take() {
            Some(d) => d,
            None => self.buffers[side].drain()?,
        };
        let mut expired = Vec::new();
        let more = self.buffers[side].drain_next(&mut drain, FIRE_BATCH, |key, t, rows| {
            expired.push((key, t, rows));
            Ok(())
        })?;
        for (key, t, rows) in expired {
            let expiry = self.expiry(side, t);
            if expiry <= wm.0 {
                self.expire_rows(side, t, rows, out);
            } else {
                self.buffers[side].update(&key, t, t, Watermark::MIN, Vec::new, |v| *v = rows)?;
                self.cleanup[side].register(expiry, &key)?;
            }
        }
        if more {
            self.draining[side] = Some(drain);
        } else {
            self.cleanup[side].clear_through(wm.0)?;
        }
        Ok(more)
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

        // rows at or behind the watermark cannot be joined reliably
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
            } else {
                live[row] = true;
            }
        }
        if !late.is_empty() {
            SubtaskMetrics::add(&ctx.metrics.late_records, late.len() as u64);
            out.emit(LATE_PORT, late.take_batch());
        }

        // 1. Probe the other side's buffer once per distinct key of the batch, over the union of
        //    its rows' intervals, for candidate pairs: (row, partner time, partner index,
        //    partner's flags), the partner's values kept per column.
        let groups = self.keys.group_rows((0..n).filter(|r| live[*r]));
        let other_columns = self.plan.sides[other].columns.len();
        let mut pairs: Vec<Pair> = Vec::new();
        let mut theirs: Vec<Vec<Option<Scalar>>> = vec![Vec::new(); other_columns];
        for (g, rows) in groups.iter().enumerate() {
            let key = self.keys.row(rows[0] as usize);
            let ranges: SmallVec<[(i64, i64); 4]> = rows
                .iter()
                .map(|r| self.partner_range(side, times[*r as usize]))
                .collect();
            let lo = ranges.iter().map(|r| r.0).min().expect("a group has rows");
            let hi = ranges.iter().map(|r| r.1).max().expect("a group has rows");
            for (pt, buffered) in self.buffers[other].range(key, lo..=hi, Watermark::MIN)? {
                for (&row, &(rlo, rhi)) in rows.iter().zip(&ranges) {
                    if pt < rlo || pt > rhi {
                        continue;
                    }
                    for (idx, b) in buffered.iter().enumerate() {
                        pairs.push(Pair {
                            row,
                            group: g as u32,
                            partner: (pt, idx as u32),
                            flags: (b.matched, b.candidate),
                            values: pairs.len() as u32,
                        });
                        for (column, v) in theirs.iter_mut().zip(&b.values) {
                            column.push(v.clone());
                        }
                    }
                }
            }
        }
        // in the order of the batch's rows, as if each row had probed by itself
        pairs.sort_by_key(|p| p.row);

        // 2. Evaluate the condition over all candidate pairs at once and emit the matches.
        let mut matched_rows = vec![false; n];
        let mut candidate_rows = vec![false; n];
        if !pairs.is_empty() {
            let idx = UInt32Array::from_iter_values(pairs.iter().map(|p| p.row));
            let mine: Vec<ArrayRef> = data
                .iter()
                .map(|c| take(c.as_ref(), &idx, None))
                .collect::<Result<_, _>>()?;
            let theirs: Vec<ArrayRef> = self.plan.sides[other]
                .columns
                .iter()
                .zip(&theirs)
                .map(|((_, dt, _), column)| {
                    build_column(dt, pairs.iter().map(|p| column[p.values as usize].as_ref()))
                })
                .collect::<Result<_>>()?;
            let mut cols = if side == 0 {
                [mine, theirs].concat()
            } else {
                [theirs, mine].concat()
            };
            cols.push(Arc::new(Int64Array::from_iter_values(
                pairs.iter().map(|p| times[p.row as usize].max(p.partner.0)),
            )));
            let joined = RecordBatch::try_new(self.plan.pair_schema.clone(), cols)?;
            let mask = match &self.plan.predicate {
                Some(p) => p.evaluate_predicate(&joined)?,
                None => BooleanArray::from(vec![true; joined.num_rows()]),
            };
            // the partners whose flags change, per key: each key's buffer is changed with one
            // access, and only the partners that change are rewritten
            let mut changes: Vec<(u32, i64, u32, bool)> = Vec::new();
            for (p, ok) in pairs.iter().zip(mask.iter()) {
                let ok = ok.unwrap_or(false);
                if ok {
                    matched_rows[p.row as usize] = true;
                } else {
                    candidate_rows[p.row as usize] = true;
                }
                if (ok && !p.flags.0) || (!ok && !p.flags.1) {
                    changes.push((p.group, p.partner.0, p.partner.1, ok));
                }
            }
            changes.sort_unstable();
            for same_key in changes.chunk_by(|a, b| a.0 == b.0) {
                let key = self
                    .keys
                    .row(groups.rows(same_key[0].0 as usize)[0] as usize);
                let (lo, hi) = (same_key[0].1, same_key[same_key.len() - 1].1);
                let mut next = same_key.iter().peekable();
                self.buffers[other].modify(key, lo..=hi, |pt, buffered| {
                    let mut changed = false;
                    while let Some(&&(_, t, idx, ok)) = next.peek() {
                        if t > pt {
                            break;
                        }
                        next.next();
                        if t < pt {
                            continue;
                        }
                        if let Some(b) = buffered.get_mut(idx as usize) {
                            let flag = if ok { &mut b.matched } else { &mut b.candidate };
                            changed |= !*flag;
                            *flag = true;
                        }
                    }
                    changed
                })?;
            }
            if mask.true_count() > 0 {
                let hits = filter_record_batch(&joined, &mask)?;
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
            let mut unmatched = DeadLetters::default();
            if self.draining[side].is_some()
                || (self.cleanup[side].latest().is_some_and(|l| l <= wm.0)
                    && self.buffers[side].spills())
            {
                self.more |= self.drain_side(side, wm, &mut unmatched)?;
            } else {
                let due = self.cleanup[side].due(wm, FIRE_BATCH)?;
                self.more |= due.len() == FIRE_BATCH;
                for (t, key) in due {
                    // rows of this side whose expiry is t: time = t - upper (left) or t + lower
                    // (right)
                    let row_time = if side == 0 {
                        t - self.plan.upper
                    } else {
                        t + self.plan.lower
                    };
                    for (rt, rows) in self.buffers[side].drain_range(&key, ..=row_time)? {
                        self.expire_rows(side, rt, rows, &mut unmatched);
                    }
                }
            }
            if !unmatched.is_empty() {
                SubtaskMetrics::add(&ctx.metrics.dead_letters, unmatched.len() as u64);
                out.emit(UNMATCHED_PORT, unmatched.take_batch());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Harness, batch, schema, text_int_rows};
    use arrow::array::StringArray;

    /// Orders joined with payments of the same `order_id` and amount paid within 100 ms:
    /// (orders' schema, payments' schema, the plan).
    fn orders_paid() -> (SchemaRef, SchemaRef, JoinPlan) {
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
        (orders, payments, plan)
    }

    /// Moves both buffers and their timers into RocksDB in `dir`, behind a cache of
    /// `cache_keys` keys per table.
    fn attach_capped(op: &mut JoinOperator, dir: &std::path::Path, cache_keys: usize) {
        let backend = crate::testing::capped_backend(dir, cache_keys);
        for b in op.buffers.iter_mut() {
            b.attach(&backend).unwrap();
        }
        for t in op.cleanup.iter_mut() {
            t.attach(&backend).unwrap();
        }
    }

    #[test]
    fn matches_within_interval_condition_and_reports_unmatched() {
        let (orders, payments, plan) = orders_paid();
        let mut h = Harness::new(plan.instantiate());
        let mk = text_int_rows;
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

    /// A row that is not due when every cleanup timer of its side is (a row whose timer was
    /// lost: no path of the operator loses one) is put back by the pass over the buffers with
    /// its timer, and expires once, when the watermark reaches it.
    #[test]
    fn a_row_not_due_when_the_buffers_are_drained_is_put_back_with_its_timer() {
        let (orders, _, plan) = orders_paid();
        let mut h = Harness::new(plan.instantiate());
        let dir = tempfile::tempdir().unwrap();
        attach_capped(&mut h.op, dir.path(), 4);
        let ids: Vec<String> = (0..50).map(|i| format!("o{i:02}")).collect();
        let rows: Vec<(&str, i64, i64)> = ids.iter().map(|id| (id.as_str(), 1, 0)).collect();
        h.push(0, text_int_rows(&orders, &rows));
        // zz buffered at 5000 (expiring at 5000 + 100) without its timer
        let keys = KeyColumns::resolve(&orders, &["order_id".into()]).unwrap();
        let mut encoded = EncodedKeys::default();
        keys.encode(&text_int_rows(&orders, &[("zz", 2, 5000)]), &mut encoded)
            .unwrap();
        let zz = Buffered {
            values: vec![Some(Scalar::Str("zz".into())), Some(Scalar::Int(2))],
            matched: false,
            candidate: false,
        };
        h.op.buffers[0]
            .update(encoded.row(0), 5000, 5000, Watermark::MIN, Vec::new, |v| {
                v.push(zz)
            })
            .unwrap();
        assert!(h.op.buffers[0].spills());
        h.watermark(1000);
        let expired = h.take(1);
        assert_eq!(expired.len(), 50, "every row due, and not zz");
        assert!(expired.iter().all(|l| !l.contains("zz")));
        assert_eq!(
            h.op.cleanup[0].latest(),
            Some(5100),
            "put back with its timer"
        );
        h.watermark(5099);
        assert!(h.take(1).is_empty());
        h.watermark(5100);
        let zz = h.take(1);
        assert_eq!(zz.len(), 1);
        assert!(zz[0].contains("zz"), "{zz:?}");
        h.watermark(i64::MAX / 2);
        assert!(h.take(1).is_empty());
    }

    #[test]
    fn batches_join_as_a_nested_loop_over_all_rows_would() {
        let side_schema = || {
            schema(vec![
                Field::new("id", DataType::Utf8, true),
                Field::new("amount", DataType::Int64, true),
                Field::new("seq", DataType::Int64, true),
            ])
        };
        let (orders, payments) = (side_schema(), side_schema());
        let (lower, upper) = (-5, 10);
        let plan = JoinPlan::compile(JoinConfig {
            name: "j".into(),
            left_name: "o".into(),
            right_name: "p".into(),
            left: &orders,
            right: &payments,
            left_key: &["id".into()],
            right_key: &["id".into()],
            lower,
            upper,
            predicate: Some("o.amount = p.amount"),
            select: &["o.seq AS l".into(), "p.seq AS r".into()],
        })
        .unwrap();
        let mut h = Harness::new(plan.instantiate());
        // both buffers and their timers in RocksDB behind a cache of 8 keys, so most accesses
        // read keys back
        let dir = tempfile::tempdir().unwrap();
        attach_capped(&mut h.op, dir.path(), 8);
        let mut next = crate::testing::random(0x2545_f491_4f6c_dd1d);
        // the model: every row buffered, per side (id, amount, time, seq), with its flags
        struct Row {
            id: String,
            amount: i64,
            t: i64,
            seq: i64,
            matched: bool,
            candidate: bool,
        }
        let mut rows: [Vec<Row>; 2] = [Vec::new(), Vec::new()];
        let mut want = Vec::new();
        let mut late = 0;
        let mut wm = 0i64;
        let mut seq = 0i64;
        for _ in 0..400 {
            let side = next(2) as usize;
            let hot = next(40);
            let batch_rows: Vec<(String, i64, i64, i64)> = (0..16)
                .map(|_| {
                    let k = if next(3) == 0 { hot } else { next(40) };
                    let t = if next(16) == 0 {
                        wm - next(5) as i64
                    } else {
                        wm + 1 + next(30) as i64
                    };
                    seq += 1;
                    (format!("k{k}"), next(3) as i64, t, seq)
                })
                .collect();
            for (id, amount, t, seq) in &batch_rows {
                if *t <= wm {
                    late += 1;
                    continue;
                }
                let (lo, hi) = if side == 0 {
                    (t + lower, t + upper)
                } else {
                    (t - upper, t - lower)
                };
                let (mine, theirs) = if side == 0 {
                    let (a, b) = rows.split_at_mut(1);
                    (&mut a[0], &mut b[0])
                } else {
                    let (a, b) = rows.split_at_mut(1);
                    (&mut b[0], &mut a[0])
                };
                let mut partners: Vec<&mut Row> = theirs
                    .iter_mut()
                    .filter(|p| &p.id == id && p.t >= lo && p.t <= hi)
                    .collect();
                // partners in time order, then in the order they arrived
                partners.sort_by_key(|p| (p.t, p.seq));
                let (mut matched, mut candidate) = (false, false);
                for p in partners {
                    if p.amount == *amount {
                        let (l, r) = if side == 0 {
                            (*seq, p.seq)
                        } else {
                            (p.seq, *seq)
                        };
                        want.push(format!(r#"{{"l":{l},"r":{r}}}"#));
                        p.matched = true;
                        matched = true;
                    } else {
                        p.candidate = true;
                        candidate = true;
                    }
                }
                mine.push(Row {
                    id: id.clone(),
                    amount: *amount,
                    t: *t,
                    seq: *seq,
                    matched,
                    candidate,
                });
            }
            let s = if side == 0 { &orders } else { &payments };
            let b = batch(
                s,
                vec![
                    Arc::new(StringArray::from(
                        batch_rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
                    )),
                    Arc::new(Int64Array::from(
                        batch_rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                    )),
                    Arc::new(Int64Array::from(
                        batch_rows.iter().map(|r| r.3).collect::<Vec<_>>(),
                    )),
                ],
                &batch_rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            );
            h.push(side, b);
            if next(2) == 0 {
                wm += next(15) as i64;
                h.watermark(wm);
            }
        }
        assert_eq!(h.take(0), want);
        assert!(want.len() > 500, "{} matches", want.len());
        assert_eq!(h.take(2).len(), late);
        // every row expires: the ones that never matched are dead letters, with the reason; as
        // every cleanup timer is due and the buffers spilled, by one pass over each side's
        // buffers that reads no key on its own
        assert!(h.op.buffers.iter().all(|b| b.spills()));
        let reads: u64 = h.op.buffers.iter().map(|b| b.reads()).sum();
        h.watermark(i64::MAX / 2);
        assert_eq!(h.op.buffers.iter().map(|b| b.reads()).sum::<u64>(), reads);
        assert!(h.op.cleanup.iter().all(|t| t.latest().is_none()));
        let mut got: Vec<(String, String)> = h
            .take(1)
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["reason"].as_str().unwrap().to_string(),
                    v["record"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut expected: Vec<(String, String)> = rows
            .iter()
            .flatten()
            .filter(|r| !r.matched)
            .map(|r| {
                let reason = if r.candidate {
                    "rows in the interval did not satisfy the join condition"
                } else {
                    "no matching row within the interval"
                };
                let record = serde_json::json!({"id": r.id, "amount": r.amount, "seq": r.seq});
                (reason.to_string(), record.to_string())
            })
            .collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        assert!(
            h.op.buffers.iter().map(|b| b.reads()).sum::<u64>() > 500,
            "the buffers were read back from RocksDB"
        );
    }
}

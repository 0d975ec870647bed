//! "N records matching a condition for a key within T" (for example: three failed logins by one
//! user within two minutes).
//!
//! Matching records are buffered until the watermark passes them and then evaluated in
//! event-time order, so the result does not depend on arrival order. When the `count`-th matching
//! record falls within `within` of the oldest one kept, a row `key columns, match_start,
//! match_end` is emitted (event time `match_end`) and the run starts over.
//!
//! **State:** per key, the timestamps of matching records not yet evaluated, and the timestamps of
//! the current run (at most `count - 1`). **Cleared:** evaluated timestamps older than `within`
//! are dropped as the run advances; a key's run is dropped entirely once the watermark passes its
//! last record plus the TTL (default: `within`). Matching records at or behind their input's
//! watermark cannot be ordered and go to the `late` output (port 1).
use arrow::array::{AsArray, Int64Array, TimestampMillisecondArray, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::sync::Arc;
use std::time::Duration;

use freshet_engine::checkpoint::{SnapshotContext, StateContext};
use freshet_engine::keys::{EncodedKeys, KeyColumns};
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{MAIN_PORT, Operator, OperatorContext, Output};
use freshet_engine::state::timers::FIRE_BATCH;
use freshet_engine::state::{KeyedTable, StateKey, Timers};
use freshet_engine::{Result, TIME_COLUMN, Watermark};

use crate::expr::{Expr, timestamp_type};

/// Side output of matching records that arrived too late to be ordered.
pub const LATE_PORT: usize = 1;

/// A compiled pattern.
#[derive(Clone)]
pub struct PatternPlan {
    keys: KeyColumns,
    predicate: Expr,
    count: usize,
    within: i64,
    ttl: i64,
    output: SchemaRef,
}

impl PatternPlan {
    /// Compiles against the input; errors name the field.
    pub fn compile(
        input: &SchemaRef,
        key_by: &[String],
        predicate: &str,
        count: u32,
        within: i64,
        ttl: Option<i64>,
    ) -> Result<PatternPlan, (String, String)> {
        let keys = crate::resolve_keys(input, key_by, "key_by")?;
        let predicate =
            Expr::compile(predicate, input).map_err(|e| ("where".to_string(), e.message))?;
        if predicate.data_type() != &DataType::Boolean {
            return Err(("where".into(), "must be a BOOLEAN condition".into()));
        }
        let mut fields: Vec<Field> = key_by
            .iter()
            .zip(keys.encoder().key_types())
            .map(|(n, t)| Field::new(n, t.data_type(), true))
            .collect();
        fields.push(Field::new("match_start", timestamp_type(), false));
        fields.push(Field::new("match_end", timestamp_type(), false));
        fields.push(Field::new(TIME_COLUMN, DataType::Int64, false));
        Ok(PatternPlan {
            keys,
            predicate,
            count: count as usize,
            within,
            ttl: ttl.unwrap_or(within),
            output: Arc::new(Schema::new(fields)),
        })
    }

    /// Schema of the match rows.
    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// The operator of one subtask.
    pub fn instantiate(&self) -> PatternOperator {
        PatternOperator {
            plan: self.clone(),
            pending: KeyedTable::new("pattern-pending", None),
            runs: KeyedTable::one_value(
                "pattern-runs",
                Some(Duration::from_millis(self.ttl.max(0) as u64)),
            ),
            timers: Timers::new("evaluate"),
            keys: EncodedKeys::default(),
            more: false,
        }
    }
}

/// The pattern operator of one subtask.
pub struct PatternOperator {
    plan: PatternPlan,
    /// Matching records not yet evaluated: count per (key, timestamp).
    pending: KeyedTable<u32>,
    /// The current run of each key.
    runs: KeyedTable<Vec<i64>>,
    timers: Timers,
    keys: EncodedKeys,
    /// The last `on_watermark` evaluated a full batch of keys and may have more.
    more: bool,
}

impl Operator for PatternOperator {
    fn has_more_output(&self) -> bool {
        self.more
    }

    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        state.attach(&mut self.pending)?;
        state.attach(&mut self.runs)?;
        self.timers = state.timers("evaluate")?;
        Ok(())
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        snap.flush(&mut self.pending)?;
        snap.flush(&mut self.runs)?;
        snap.flush_timers(&mut self.timers)
    }

    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        let mask = self.plan.predicate.evaluate_predicate(&batch)?;
        if mask.true_count() == 0 {
            return Ok(());
        }
        self.plan.keys.encode(&batch, &mut self.keys)?;
        let times = batch
            .column(batch.num_columns() - 1)
            .as_primitive::<Int64Type>()
            .values()
            .clone();
        let mut late = Vec::new();
        for (row, &t) in times.iter().enumerate() {
            if !mask.value(row) {
                continue;
            }
            if t <= ctx.record_watermark.0 {
                late.push(row as u32);
                continue;
            }
            let key = self.keys.row(row);
            self.pending
                .update(key, t, t, Watermark::MIN, || 0, |n| *n += 1)?;
            self.timers.register(t, key)?;
        }
        if !late.is_empty() {
            SubtaskMetrics::add(&ctx.metrics.late_records, late.len() as u64);
            out.emit(
                LATE_PORT,
                take_record_batch(&batch, &UInt32Array::from(late))?,
            );
        }
        Ok(())
    }

    fn on_watermark(
        &mut self,
        wm: Watermark,
        _: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        let (mut mkeys, mut starts, mut ends) = (Vec::new(), Vec::new(), Vec::new());
        // one batch of keys per call (see `has_more_output`)
        {
            let mut keys: Vec<StateKey> = self
                .timers
                .due(wm, FIRE_BATCH)?
                .into_iter()
                .map(|(_, k)| k)
                .collect();
            self.more = keys.len() == FIRE_BATCH;
            keys.sort_unstable();
            keys.dedup();
            for key in keys {
                let ready = self.pending.drain_range(&key, ..=wm.0)?;
                for (t, n) in ready {
                    for _ in 0..n {
                        let (count, within) = (self.plan.count, self.plan.within);
                        // records are evaluated in event-time order, so the run's TTL is judged at `t`
                        let hit = self
                            .runs
                            .update(&key, 0, t, Watermark(t), Vec::new, |run| {
                                run.retain(|&s| s > t - within);
                                run.push(t);
                                if run.len() >= count {
                                    let start = run[0];
                                    run.clear();
                                    Some(start)
                                } else {
                                    None
                                }
                            })?;
                        if let Some(start) = hit {
                            mkeys.push(key.clone());
                            starts.push(start);
                            ends.push(t);
                        }
                    }
                }
            }
        }
        self.runs.expire(wm)?;
        if mkeys.is_empty() {
            return Ok(());
        }
        let mut cols = self
            .plan
            .keys
            .encoder()
            .decode(mkeys.iter().map(|k| k.as_ref()))?;
        cols.push(Arc::new(TimestampMillisecondArray::from(starts)));
        cols.push(Arc::new(TimestampMillisecondArray::from(ends.clone())));
        cols.push(Arc::new(Int64Array::from(ends)));
        out.emit(
            MAIN_PORT,
            RecordBatch::try_new(self.plan.output.clone(), cols)?,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Harness, batch, schema};
    use arrow::array::{BooleanArray, StringArray};

    #[test]
    fn counts_in_event_time_order_within_span() {
        let s = schema(vec![
            Field::new("user", DataType::Utf8, true),
            Field::new("ok", DataType::Boolean, true),
        ]);
        let plan = PatternPlan::compile(&s, &["user".into()], "NOT ok", 3, 120_000, None).unwrap();
        let mut h = Harness::new(plan.instantiate());
        let rows = |r: &[(&str, bool, i64)]| {
            batch(
                &s,
                vec![
                    Arc::new(StringArray::from(r.iter().map(|x| x.0).collect::<Vec<_>>())),
                    Arc::new(BooleanArray::from(
                        r.iter().map(|x| x.1).collect::<Vec<_>>(),
                    )),
                ],
                &r.iter().map(|x| x.2).collect::<Vec<_>>(),
            )
        };
        // out of order arrival; u1 fails at 0, 60s, 110s (within 2m) -> match; u2 spread too far apart
        h.push(
            0,
            rows(&[
                ("u1", false, 110_000),
                ("u1", false, 0),
                ("u2", false, 0),
                ("u1", true, 5),
            ]),
        );
        h.push(
            0,
            rows(&[
                ("u1", false, 60_000),
                ("u2", false, 130_000),
                ("u2", false, 140_000),
            ]),
        );
        h.watermark(200_000);
        assert_eq!(
            h.take(0),
            vec![
                r#"{"user":"u1","match_start":"1970-01-01T00:00:00.000Z","match_end":"1970-01-01T00:01:50.000Z"}"#
            ]
        );
        h.push(0, rows(&[("u1", false, 150_000)]));
        assert_eq!(h.take(1).len(), 1, "behind the watermark: late");
        h.watermark(i64::MAX);
        assert!(h.op.runs.is_empty() && h.op.pending.is_empty());
    }
}

//! Deduplication by key.
//!
//! - `keep: first`: the first record of each key passes; later records with the same key are
//!   dropped while the key is remembered.
//! - `keep: latest`: a record passes only if its `order_by` value is greater than that of every
//!   earlier record of its key (newer versions of a row, e.g. by LSN); stale or repeated versions
//!   are dropped. The output is an upsert stream keyed by the dedup key.
//!
//! **State:** per key, the largest `order_by` value seen (`latest`, a keyed table) or only the
//! key and when it was last accepted (`first`, a [`KeySet`]: a 16-byte slot per key in memory).
//! Both keep their rows in the table `dedup`, `first`'s as a `latest` row without a value, so a
//! savepoint restores across versions. A batch's rows whose keys state holds only in RocksDB
//! are checked after the others, once one batched lookup has read all of those keys.
//! **Cleared:** with a `ttl`, once the watermark passes the key's last accepted record's event
//! time plus the TTL; without one, never. A record already older than the TTL horizon when it
//! arrives (`event time + ttl <= watermark`) cannot be checked reliably and goes to the `late`
//! output.
use arrow::array::{AsArray, BooleanArray, UInt32Array};
use arrow::compute::{filter_record_batch, take_record_batch};
use arrow::datatypes::{Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::time::Duration;

use freshet_engine::checkpoint::{SnapshotContext, StateContext};
use freshet_engine::keys::{EncodedKeys, KeyColumns};
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{MAIN_PORT, Operator, OperatorContext, Output};
use freshet_engine::state::{KeySet, KeyedTable};
use freshet_engine::{Result, Watermark};
use freshet_job::DedupKeep;

use crate::expr::Expr;
use crate::values::{ColumnReader, Scalar};

/// Side output for records too old to deduplicate.
pub const LATE_PORT: usize = 1;

/// A compiled deduplication.
#[derive(Clone)]
pub struct DedupPlan {
    keys: KeyColumns,
    keep: DedupKeep,
    order_by: Option<Expr>,
    ttl: Option<Duration>,
    input: SchemaRef,
}

impl DedupPlan {
    /// Compiles against the input schema. Errors name the field (`key[0]`, `order_by`).
    pub fn compile(
        input: &SchemaRef,
        key: &[String],
        keep: DedupKeep,
        order_by: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<DedupPlan, (String, String)> {
        let keys = crate::resolve_keys(input, key, "key")?;
        let order_by = match (keep, order_by) {
            (DedupKeep::Latest, Some(o)) => {
                Some(Expr::compile(o, input).map_err(|e| ("order_by".to_string(), e.message))?)
            }
            (DedupKeep::First, Some(_)) => {
                return Err((
                    "order_by".into(),
                    "order_by only applies to keep: latest".into(),
                ));
            }
            _ => None,
        };
        Ok(DedupPlan {
            keys,
            keep,
            order_by,
            ttl,
            input: input.clone(),
        })
    }

    /// The input schema (also the schema of the output and of the late output).
    pub fn input_schema(&self) -> SchemaRef {
        self.input.clone()
    }

    /// The operator of one subtask.
    pub fn instantiate(&self) -> DedupOperator {
        let seen = match self.keep {
            DedupKeep::First => Seen::First(KeySet::new(TABLE, self.ttl, 0, no_value())),
            DedupKeep::Latest => Seen::Latest(KeyedTable::one_value(TABLE, self.ttl)),
        };
        DedupOperator {
            plan: self.clone(),
            seen,
            keys: EncodedKeys::default(),
        }
    }
}

/// The state table of both kinds of deduplication.
const TABLE: &str = "dedup";

/// The value a `first` row holds: a `latest` row's value when it has none (encoding version 0).
fn no_value() -> Vec<u8> {
    postcard::to_allocvec(&None::<Scalar>).expect("a unit value encodes")
}

/// What a deduplication remembers of its keys.
enum Seen {
    First(KeySet),
    Latest(KeyedTable<Option<Scalar>>),
}

/// The deduplication operator of one subtask.
pub struct DedupOperator {
    plan: DedupPlan,
    seen: Seen,
    keys: EncodedKeys,
}

impl Operator for DedupOperator {
    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        match &mut self.seen {
            Seen::First(set) => {
                // a keyed table of the same name moves rows of older layouts as it attaches
                state.attach(&mut KeyedTable::<Option<Scalar>>::one_value(
                    TABLE,
                    self.plan.ttl,
                ))?;
                state.attach_set(set)
            }
            Seen::Latest(table) => state.attach(table),
        }
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        match &mut self.seen {
            Seen::First(set) => snap.flush_set(set),
            Seen::Latest(table) => snap.flush(table),
        }
    }

    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        self.plan.keys.encode(&batch, &mut self.keys)?;
        let order = self
            .plan
            .order_by
            .as_ref()
            .map(|o| o.evaluate(&batch))
            .transpose()?;
        let order = order.as_ref().map(ColumnReader::new).transpose()?;
        let times = batch
            .column(batch.num_columns() - 1)
            .as_primitive::<Int64Type>()
            .values()
            .clone();
        let rw = ctx.record_watermark;
        let ttl = self.plan.ttl.map(|t| t.as_millis() as i64);
        let keys = &self.keys;
        let mut keep = vec![false; batch.num_rows()];
        let mut late = Vec::new();
        // Rows whose key state holds only in RocksDB wait, with every later row of the same key
        // (so each key's rows are still checked in order), for one batched read of all their
        // keys; the other rows are checked at once.
        let mut waiting: Vec<usize> = Vec::new();
        let mut waiting_keys: hashbrown::HashSet<&[u8]> = hashbrown::HashSet::new();
        for (row, &t) in times.iter().enumerate() {
            if ttl.is_some_and(|ttl| rw.0 >= t.saturating_add(ttl)) {
                late.push(row as u32);
                continue;
            }
            let key = keys.row(row);
            let checked = if !waiting_keys.is_empty() && waiting_keys.contains(key) {
                None
            } else {
                match &mut self.seen {
                    Seen::First(set) => set.try_insert(key, t, rw)?,
                    Seen::Latest(table) => match table.needs_read(key) {
                        true => None,
                        false => Some(latest(table, key, order.as_ref(), row, t, rw)?),
                    },
                }
            };
            match checked {
                Some(pass) => keep[row] = pass,
                None => {
                    waiting_keys.insert(key);
                    waiting.push(row);
                }
            }
        }
        if !waiting.is_empty() {
            match &mut self.seen {
                Seen::First(set) => {
                    set.prefetch(waiting_keys.iter().copied())?;
                    for row in waiting {
                        keep[row] = set.insert_if_absent(keys.row(row), times[row], rw)?;
                    }
                }
                Seen::Latest(table) => {
                    table.prefetch(waiting_keys.iter().copied())?;
                    for row in waiting {
                        keep[row] =
                            latest(table, keys.row(row), order.as_ref(), row, times[row], rw)?;
                    }
                }
            }
        }
        if !late.is_empty() {
            SubtaskMetrics::add(&ctx.metrics.late_records, late.len() as u64);
            out.emit(
                LATE_PORT,
                take_record_batch(&batch, &UInt32Array::from(late))?,
            );
        }
        let mask = BooleanArray::from(keep);
        if mask.true_count() == batch.num_rows() {
            out.emit(MAIN_PORT, batch);
        } else if mask.true_count() > 0 {
            out.emit(MAIN_PORT, filter_record_batch(&batch, &mask)?);
        }
        Ok(())
    }

    fn on_watermark(
        &mut self,
        wm: Watermark,
        _: &OperatorContext<'_>,
        _: &mut dyn Output,
    ) -> Result<()> {
        match &mut self.seen {
            Seen::First(set) => set.expire(wm),
            Seen::Latest(table) => {
                table.expire(wm)?;
            }
        }
        Ok(())
    }
}

/// Checks a `latest` row: it passes if its `order_by` value is greater than the key's last
/// one, which it then replaces.
fn latest(
    table: &mut KeyedTable<Option<Scalar>>,
    key: &[u8],
    order: Option<&ColumnReader>,
    row: usize,
    t: i64,
    rw: Watermark,
) -> Result<bool> {
    let v = order.and_then(|o| o.get(row));
    table.upsert(
        key,
        0,
        t,
        rw,
        || v.clone(),
        |prev| {
            let newer = v > *prev;
            if newer {
                *prev = v.clone();
            }
            newer
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Harness, schema, text_int_rows};
    use arrow::datatypes::{DataType, Field};

    fn s() -> SchemaRef {
        schema(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("v", DataType::Int64, true),
        ])
    }

    #[test]
    fn first_within_ttl_then_forgets_and_late_is_separated() {
        let s = s();
        let plan = DedupPlan::compile(
            &s,
            &["id".into()],
            DedupKeep::First,
            None,
            Some(Duration::from_millis(100)),
        )
        .unwrap();
        let mut h = Harness::new(plan.instantiate());
        h.push(
            0,
            text_int_rows(&s, &[("a", 1, 10), ("a", 2, 20), ("b", 3, 30)]),
        );
        assert_eq!(
            h.take(0),
            vec![r#"{"id":"a","v":1}"#, r#"{"id":"b","v":3}"#]
        );
        h.watermark(109); // a remembered until 10 + 100
        h.push(0, text_int_rows(&s, &[("a", 4, 150)]));
        assert!(h.take(0).is_empty());
        h.watermark(110);
        h.push(0, text_int_rows(&s, &[("a", 5, 160), ("z", 6, 10)]));
        assert_eq!(
            h.take(0),
            vec![r#"{"id":"a","v":5}"#],
            "a expired, passes again"
        );
        assert_eq!(
            h.take(1),
            vec![r#"{"id":"z","v":6}"#],
            "10 + ttl <= watermark: too old to check"
        );
    }

    /// With a cache far smaller than its keys, so that most rows wait for a batched read of
    /// RocksDB, dedup passes exactly the rows a plain map computes: for `first` each key's
    /// first row, for `latest` each row newer than every earlier row of its key, in order.
    #[test]
    fn rows_waiting_for_rocksdb_are_checked_in_order_per_key() {
        use std::collections::HashMap;
        let s = s();
        let mut next = crate::testing::random(0x9e37_79b9_7f4a_7c15);
        // batches of 64 rows over 2 000 keys, each key often repeated within a batch
        let batches: Vec<Vec<(String, i64)>> = (0..300)
            .map(|_| {
                let hot = next(2000);
                (0..64)
                    .map(|_| {
                        let k = if next(4) == 0 { hot } else { next(2000) };
                        (format!("k{k}"), next(1000) as i64)
                    })
                    .collect()
            })
            .collect();
        for keep in [DedupKeep::First, DedupKeep::Latest] {
            let order_by = (keep == DedupKeep::Latest).then_some("v");
            let plan = DedupPlan::compile(&s, &["id".into()], keep, order_by, None).unwrap();
            let mut h = Harness::new(plan.instantiate());
            let dir = tempfile::tempdir().unwrap();
            let backend = crate::testing::capped_backend(dir.path(), 50);
            match &mut h.op.seen {
                Seen::First(set) => set.attach(&backend),
                Seen::Latest(table) => table.attach(&backend),
            }
            .unwrap();
            let mut model: HashMap<String, i64> = HashMap::new();
            let mut want = Vec::new();
            for b in &batches {
                for (k, v) in b {
                    let pass = match (keep, model.get(k)) {
                        (_, None) => true,
                        (DedupKeep::First, Some(_)) => false,
                        (DedupKeep::Latest, Some(prev)) => v > prev,
                    };
                    if pass {
                        model.insert(k.clone(), *v);
                        want.push(format!(r#"{{"id":"{k}","v":{v}}}"#));
                    }
                }
                let rows: Vec<(&str, i64, i64)> = b.iter().map(|(k, v)| (&k[..], *v, 0)).collect();
                h.push(0, text_int_rows(&s, &rows));
            }
            let reads = match &h.op.seen {
                Seen::First(set) => set.reads(),
                Seen::Latest(table) => table.reads(),
            };
            assert!(reads > 1000, "{keep:?}: {reads} reads");
            assert_eq!(h.take(0), want, "{keep:?}");
        }
    }

    #[test]
    fn latest_keeps_only_newer_versions() {
        let s = s();
        let plan =
            DedupPlan::compile(&s, &["id".into()], DedupKeep::Latest, Some("v"), None).unwrap();
        let mut h = Harness::new(plan.instantiate());
        h.push(
            0,
            text_int_rows(
                &s,
                &[
                    ("a", 5, 0),
                    ("a", 3, 0),
                    ("a", 5, 0),
                    ("a", 7, 0),
                    ("b", 1, 0),
                ],
            ),
        );
        assert_eq!(
            h.take(0),
            vec![
                r#"{"id":"a","v":5}"#,
                r#"{"id":"a","v":7}"#,
                r#"{"id":"b","v":1}"#
            ]
        );
    }
}

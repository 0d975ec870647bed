//! Generator source: rows computed by SQL expressions from a sequence number `seq`, bounded by a
//! count or unbounded, optionally rate-limited. Subtask `i` of `p` produces `seq = i, i + p, ...`,
//! so the rows are the same at any parallelism.
use arrow::array::{ArrayRef, Int64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_engine::checkpoint::{SnapshotContext, StateContext};
use freshet_engine::operator::{OperatorContext, Source, SourceOutput, SourceStatus, SubtaskInfo};
use freshet_engine::{EngineError, Result};

use crate::SourcePlan;
use crate::event_time::EventTime;
use crate::registry::{SourceConnector, SourceContext};
use freshet_job::Problems;
use freshet_operators::expr::Expr;
use indexmap::IndexMap;

/// Rows computed from a sequence number `seq` by SQL expressions, optionally rate-limited.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSettings {
    /// Rows to produce (unbounded if unset).
    #[serde(default)]
    pub count: Option<u64>,
    /// Upper bound on rows per second across all subtasks (unlimited if unset).
    #[serde(default)]
    pub rows_per_second: Option<f64>,
    /// Output fields: name -> SQL expression over `seq` (BIGINT, 0-based).
    pub fields: IndexMap<String, String>,
    /// Adds a BIGINT column of this name holding when each row was due (with
    /// `rows_per_second`) or made, in microseconds since the Unix epoch: the time it entered
    /// the job, which a blackhole sink's `latency_of` measures against.
    #[serde(default)]
    pub ingestion_time: Option<String>,
}

/// The `generator` source connector.
pub struct GeneratorConnector;

impl SourceConnector for GeneratorConnector {
    type Config = GeneratorSettings;

    fn kind(&self) -> &'static str {
        "generator"
    }

    fn plan(
        &self,
        ctx: &SourceContext<'_>,
        c: GeneratorSettings,
    ) -> std::result::Result<SourcePlan, Problems> {
        if !ctx.spec.schema.is_empty() {
            return Err(ctx.problem(
                "schema",
                "a generator's schema comes from its fields; remove schema",
            ));
        }
        if c.rows_per_second
            .is_some_and(|r| r <= 0.0 || !r.is_finite())
        {
            return Err(ctx.problem("connector.rows_per_second", "must be a positive number"));
        }
        let seq = seq_schema();
        let mut compiled = Vec::new();
        for (n, e) in &c.fields {
            compiled.push((
                n.clone(),
                Expr::compile(e, &seq)
                    .map_err(|e| ctx.problem(&format!("connector.fields.{n}"), e.message))?,
            ));
        }
        let mut columns: Vec<_> = compiled
            .iter()
            .map(|(n, e)| Field::new(n, e.data_type().clone(), true))
            .collect();
        if let Some(name) = &c.ingestion_time {
            if c.fields.contains_key(name) {
                return Err(ctx.problem(
                    "connector.ingestion_time",
                    format!("{name} is also one of the fields"),
                ));
            }
            columns.push(Field::new(name, DataType::Int64, false));
        }
        let decoded = Arc::new(Schema::new(columns));
        let event_time = EventTime::compile(ctx.spec.event_time.as_deref(), &decoded)
            .map_err(|e| ctx.problem("event_time", e.message))?;
        let config = GeneratorConfig {
            fields: compiled,
            count: c.count,
            rows_per_second: c.rows_per_second,
            ingestion_time: c.ingestion_time.is_some(),
            event_time: event_time.clone(),
            batch_size: ctx.batch_size,
        };
        Ok(SourcePlan::new(
            ctx,
            event_time.output_schema(),
            c.count.is_some(),
            Arc::new(move |info: &SubtaskInfo| {
                Ok(Box::new(GeneratorSource::new(
                    config.clone(),
                    info.index,
                    info.parallelism,
                )) as Box<dyn Source>)
            }),
        ))
    }
}

/// The schema generator expressions are compiled against.
pub fn seq_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, false)]))
}

/// Settings shared by the subtasks of one generator.
#[derive(Clone)]
pub struct GeneratorConfig {
    /// Output fields.
    pub fields: Vec<(String, Expr)>,
    /// Total rows (all subtasks), unbounded if `None`.
    pub count: Option<u64>,
    /// Total rows per second (all subtasks).
    pub rows_per_second: Option<f64>,
    /// Whether the rows carry their ingestion time as a last column (see [`ingestion_times`]).
    pub ingestion_time: bool,
    /// Event time.
    pub event_time: EventTime,
    /// Largest batch.
    pub batch_size: usize,
}

/// One generator subtask.
pub struct GeneratorSource {
    config: GeneratorConfig,
    index: u64,
    parallelism: u64,
    produced: u64,
    /// Rows produced before this run started (restored), not counted against the rate limit.
    resumed_at: u64,
    started: Option<Instant>,
    /// Wall-clock time of `started`, microseconds since the Unix epoch.
    started_us: i64,
}

/// Name of a sequence source's position in snapshots.
pub(crate) const POSITION: &str = "position";

/// Restores the position of a subtask of a source that splits a sequence by subtask index: the
/// former subtask with the same index at the same parallelism.
pub(crate) fn restore_position(state: &StateContext<'_>, what: &str) -> Result<Option<u64>> {
    let saved = state.operator_state(POSITION);
    if saved.is_empty() {
        return Ok(None);
    }
    let me = state.subtask();
    let Some((_, _, data)) = saved
        .iter()
        .find(|(i, p, _)| *i == me.index && *p == me.parallelism)
    else {
        let old = saved[0].1;
        return Err(EngineError::State(format!(
            "{what} ran at parallelism {old} when the snapshot was taken and cannot resume at {}; restore it at parallelism {old}",
            me.parallelism
        )));
    };
    let bytes: [u8; 8] = (*data)
        .try_into()
        .map_err(|_| EngineError::State(format!("{what}: position has the wrong size")))?;
    Ok(Some(u64::from_be_bytes(bytes)))
}

impl GeneratorSource {
    /// Subtask `index` of `parallelism`.
    pub fn new(config: GeneratorConfig, index: u32, parallelism: u32) -> Self {
        GeneratorSource {
            config,
            index: index as u64,
            parallelism: parallelism as u64,
            produced: 0,
            resumed_at: 0,
            started: None,
            started_us: 0,
        }
    }

    fn my_total(&self) -> Option<u64> {
        self.config
            .count
            .map(|n| (n + self.parallelism - 1 - self.index) / self.parallelism)
    }
}

impl Source for GeneratorSource {
    fn poll(
        &mut self,
        _: &OperatorContext<'_>,
        out: &mut dyn SourceOutput,
    ) -> Result<SourceStatus> {
        let started = match self.started {
            Some(s) => s,
            None => {
                self.started_us = now_us();
                *self.started.insert(Instant::now())
            }
        };
        let mut n = self.config.batch_size as u64;
        if let Some(total) = self.my_total() {
            if self.produced >= total {
                return Ok(SourceStatus::Finished);
            }
            n = n.min(total - self.produced);
        }
        if let Some(rate) = self.config.rows_per_second {
            let mine = rate / self.parallelism as f64;
            let done = self.produced - self.resumed_at;
            let allowed = (started.elapsed().as_secs_f64() * mine) as u64;
            if allowed <= done {
                let wait = Duration::from_secs_f64(
                    ((done + 1) as f64 / mine - started.elapsed().as_secs_f64()).max(0.001),
                );
                return Ok(SourceStatus::Pending(wait));
            }
            n = n.min(allowed - done);
        }
        let seq: ArrayRef = Arc::new(Int64Array::from_iter_values(
            (self.produced..self.produced + n).map(|k| (k * self.parallelism + self.index) as i64),
        ));
        let input = RecordBatch::try_new(seq_schema(), vec![seq])?;
        let mut cols: Vec<ArrayRef> = self
            .config
            .fields
            .iter()
            .map(|(_, e)| e.evaluate(&input))
            .collect::<Result<_>>()?;
        if self.config.ingestion_time {
            let mine = self
                .config
                .rows_per_second
                .map(|r| r / self.parallelism as f64);
            let first = self.produced - self.resumed_at;
            cols.push(Arc::new(ingestion_times(self.started_us, mine, first, n)));
        }
        let (batch, _) = self.config.event_time.apply(cols, n as usize)?;
        out.emit(batch);
        self.produced += n;
        Ok(SourceStatus::Ready)
    }

    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        if let Some(p) = restore_position(state, "a generator source")? {
            self.produced = p;
            self.resumed_at = p;
        }
        Ok(())
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        snap.put_fixed(POSITION, self.produced.to_be_bytes().to_vec());
        Ok(())
    }
}

/// Microseconds since the Unix epoch, now: the clock of ingestion times and of the latencies
/// sinks measure against them.
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// When `n` rows from the `first`-th (counted from the start of this run) entered the job, in
/// microseconds since the Unix epoch: with a rate, the time each was due (a row polled late was
/// still waiting at the source); without one, now.
fn ingestion_times(started_us: i64, rate: Option<f64>, first: u64, n: u64) -> Int64Array {
    match rate {
        Some(r) => Int64Array::from_iter_values(
            (first..first + n).map(|i| started_us + ((i + 1) as f64 / r * 1e6) as i64),
        ),
        None => {
            let now = now_us();
            Int64Array::from_iter_values((0..n).map(|_| now))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a rate, a row entered the job when it was due: the n-th row of a run n / rate
    /// seconds after the run started, whenever it was polled.
    #[test]
    fn ingestion_times_are_when_rows_were_due() {
        let t = ingestion_times(1_000_000, Some(1000.0), 10, 3);
        assert_eq!(t.values().to_vec(), vec![1_011_000, 1_012_000, 1_013_000]);
        let before = now_us();
        let t = ingestion_times(0, None, 0, 2);
        assert!(t.values().iter().all(|v| *v >= before && *v <= now_us()));
    }
}

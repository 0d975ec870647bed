//! The subtask runner: one thread that reads inputs (or polls a source), pushes elements through
//! a chain of operators, and writes the results to the outgoing edges.
//!
//! A chain is a sequence of operators connected by forward edges that run in one thread without
//! channels in between: operator `i`'s main output is operator `i + 1`'s input. Side outputs of
//! any operator in the chain, and the main output of the last one, go to [`EdgeWriter`]s.
//!
//! Watermarks: a source subtask derives them from its records with a [`WatermarkGenerator`]; an
//! input subtask combines its channels' watermarks with a [`WatermarkTracker`]. An operator in a
//! chain judges a record against the watermark of the channel it came from: for the head, the
//! input channel; for a chained operator, its predecessor's.
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use crossbeam_channel::Select;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info_span};

use crate::channel::{CancelToken, ChannelReceiver};
use crate::metrics::{MetricsSnapshot, SubtaskMetrics};
use crate::operator::{
    MAIN_PORT, Operator, OperatorContext, Output, Source, SourceOutput, SourceStatus, SubtaskInfo,
};
use crate::partition::EdgeWriter;
use crate::time::WatermarkTracker;
use crate::{Element, EngineError, Result, Watermark};

/// How a source turns record timestamps into watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatermarkConfig {
    /// Bounded out-of-orderness: watermark = max timestamp seen - bound - 1 ms.
    pub max_out_of_orderness: Duration,
    /// Emit a new watermark once it has advanced by at least this much event time. Watermarks
    /// are a function of the input only, never of wall-clock time, so replays are exact.
    pub interval: Duration,
    /// Mark the source idle after this long without data (unbounded sources).
    pub idle_timeout: Option<Duration>,
}

impl Default for WatermarkConfig {
    fn default() -> Self {
        WatermarkConfig {
            max_out_of_orderness: Duration::ZERO,
            interval: Duration::from_millis(200),
            idle_timeout: None,
        }
    }
}

/// Derives watermarks from the timestamps of a source's records, deterministically.
///
/// Records are processed in order; after a record raises the watermark candidate by at least the
/// configured interval over the last emitted watermark, the batch is cut there and the new
/// watermark emitted, so every later record is judged against it regardless of batch sizes.
#[derive(Debug, Clone)]
pub struct WatermarkGenerator {
    bound: i64,
    interval: i64,
    max_ts: i64,
    emitted: Watermark,
}

impl WatermarkGenerator {
    /// A generator with the given settings.
    pub fn new(config: &WatermarkConfig) -> Self {
        WatermarkGenerator {
            bound: config.max_out_of_orderness.as_millis() as i64,
            interval: (config.interval.as_millis() as i64).max(1),
            max_ts: i64::MIN,
            emitted: Watermark::MIN,
        }
    }

    /// The last watermark emitted.
    pub fn emitted(&self) -> Watermark {
        self.emitted
    }

    /// Splits `batch` at the points where the watermark advances: returns the pieces, each with
    /// the watermark to emit after it (if any).
    pub fn split(&mut self, batch: &RecordBatch) -> Vec<(RecordBatch, Option<Watermark>)> {
        let n = batch.num_rows();
        let times = batch
            .column(batch.num_columns() - 1)
            .as_primitive::<Int64Type>()
            .values();
        let mut out = Vec::new();
        let mut start = 0;
        for (i, &t) in times.iter().enumerate() {
            if t <= self.max_ts {
                continue;
            }
            self.max_ts = t;
            let candidate = t.saturating_sub(self.bound).saturating_sub(1);
            if self.emitted == Watermark::MIN
                || candidate >= self.emitted.0.saturating_add(self.interval)
            {
                out.push((
                    batch.slice(start, i + 1 - start),
                    Some(Watermark(candidate)),
                ));
                self.emitted = Watermark(candidate);
                start = i + 1;
            }
        }
        if start < n {
            out.push((batch.slice(start, n - start), None));
        }
        out
    }
}

/// One operator of a chain with the writers of its side outputs.
pub struct ChainedOperator {
    /// Operator name (for logs).
    pub name: String,
    /// The operator.
    pub operator: Box<dyn Operator>,
    /// Edges per output port. Port 0 of every operator but the last is the chain link and has
    /// no writers.
    pub outputs: Vec<Vec<EdgeWriter>>,
}

/// Where a subtask's input comes from.
pub enum TaskInput {
    /// A source and its watermark settings; `side_outputs[p]` are the edges of source port `p + 1`.
    Source {
        /// The source.
        source: Box<dyn Source>,
        /// Watermark generation.
        watermarks: WatermarkConfig,
        /// Edges of the main output when the chain has no operators.
        main_outputs: Vec<EdgeWriter>,
        /// Edges of side ports 1.. (dead letters).
        side_outputs: Vec<Vec<EdgeWriter>>,
    },
    /// Channels from upstream subtasks, each tagged with the logical input (0 or 1) it feeds.
    Channels(Vec<(ChannelReceiver, usize)>),
}

/// Everything a subtask thread needs.
pub struct SubtaskSpec {
    /// Identity.
    pub info: SubtaskInfo,
    /// Input.
    pub input: TaskInput,
    /// Operators, in chain order.
    pub chain: Vec<ChainedOperator>,
    /// Job cancellation.
    pub cancel: CancelToken,
    /// Counters.
    pub metrics: Arc<SubtaskMetrics>,
}

/// Collects an operator's output during one call.
#[derive(Default)]
struct Collected(Vec<(usize, RecordBatch)>);

impl Output for Collected {
    fn emit(&mut self, port: usize, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.0.push((port, batch));
        }
    }
}

impl SourceOutput for Collected {
    fn emit(&mut self, batch: RecordBatch) {
        Output::emit(self, MAIN_PORT, batch)
    }
    fn emit_side(&mut self, port: usize, batch: RecordBatch) {
        Output::emit(self, port, batch)
    }
}

struct Chain {
    ops: Vec<ChainedOperator>,
    /// Last watermark delivered to each operator.
    watermarks: Vec<Watermark>,
    /// Main-output edges when the chain is empty (a source writing straight to the network).
    head_outputs: Vec<EdgeWriter>,
    info: SubtaskInfo,
    metrics: Arc<SubtaskMetrics>,
}

impl Chain {
    fn main_writers(&mut self) -> &mut Vec<EdgeWriter> {
        match self.ops.last_mut() {
            Some(op) => &mut op.outputs[MAIN_PORT],
            None => &mut self.head_outputs,
        }
    }

    /// Pushes a batch into operator `i` (or onto the main edges when `i` is past the chain).
    fn push_batch(
        &mut self,
        i: usize,
        input: usize,
        batch: RecordBatch,
        record_wm: Watermark,
    ) -> Result<()> {
        if i == self.ops.len() {
            SubtaskMetrics::add(&self.metrics.records_out, batch.num_rows() as u64);
            for w in self.main_writers().iter_mut() {
                w.send_batch(batch.clone())?;
            }
            return Ok(());
        }
        self.call(i, record_wm, |op, ctx, out| {
            op.process_batch(input, batch, ctx, out)
        })
    }

    /// Calls operator `i` (its record watermark given, its current watermark the last one it
    /// received) and routes what it emits.
    fn call(
        &mut self,
        i: usize,
        record_wm: Watermark,
        f: impl FnOnce(&mut dyn Operator, &OperatorContext<'_>, &mut dyn Output) -> Result<()>,
    ) -> Result<()> {
        let mut out = Collected::default();
        {
            let ctx = OperatorContext {
                subtask: &self.info,
                record_watermark: record_wm,
                current_watermark: self.watermarks[i],
                metrics: &self.metrics,
            };
            f(self.ops[i].operator.as_mut(), &ctx, &mut out)?;
        }
        self.route(i, out)
    }

    fn route(&mut self, i: usize, out: Collected) -> Result<()> {
        for (port, batch) in out.0 {
            if port == MAIN_PORT {
                let wm = self
                    .watermarks
                    .get(i + 1)
                    .copied()
                    .unwrap_or(Watermark::MIN);
                self.push_batch(i + 1, 0, batch, wm)?;
            } else {
                let op = &mut self.ops[i];
                let Some(writers) = op.outputs.get_mut(port) else {
                    return Err(EngineError::Operator(format!(
                        "operator {} emitted on unknown port {port}",
                        op.name
                    )));
                };
                for w in writers.iter_mut() {
                    w.send_batch(batch.clone())?;
                }
            }
        }
        Ok(())
    }

    fn push_watermark(&mut self, i: usize, wm: Watermark) -> Result<()> {
        if i == self.ops.len() {
            return self
                .main_writers()
                .iter_mut()
                .try_for_each(|w| w.broadcast(&Element::Watermark(wm)));
        }
        self.watermarks[i] = wm;
        self.call(i, wm, |op, ctx, out| op.on_watermark(wm, ctx, out))?;
        self.broadcast_side(i, &Element::Watermark(wm))?;
        self.push_watermark(i + 1, wm)
    }

    fn broadcast_side(&mut self, i: usize, e: &Element) -> Result<()> {
        for writers in self.ops[i].outputs.iter_mut().skip(1) {
            for w in writers.iter_mut() {
                w.broadcast(e)?;
            }
        }
        Ok(())
    }

    fn broadcast_all(&mut self, e: &Element) -> Result<()> {
        for i in 0..self.ops.len() {
            self.broadcast_side(i, e)?;
        }
        self.main_writers()
            .iter_mut()
            .try_for_each(|w| w.broadcast(e))
    }

    /// Tells every operator that input is quiet.
    fn idle(&mut self) -> Result<()> {
        for i in 0..self.ops.len() {
            self.call(i, self.watermarks[i], |op, ctx, out| op.on_idle(ctx, out))?;
        }
        Ok(())
    }

    fn end_of_input(&mut self) -> Result<()> {
        for i in 0..self.ops.len() {
            self.call(i, self.watermarks[i], |op, ctx, out| {
                op.on_end_of_input(ctx, out)
            })?;
            self.broadcast_side(i, &Element::EndOfInput)?;
        }
        self.main_writers()
            .iter_mut()
            .try_for_each(|w| w.broadcast(&Element::EndOfInput))
    }
}

/// What a subtask reports when it finishes.
#[derive(Debug, Clone, Default)]
pub struct SubtaskResult {
    /// Final counters.
    pub metrics: MetricsSnapshot,
    /// Accumulators of its operators (see [`Operator::accumulators`]).
    pub accumulators: Vec<(String, i64)>,
}

/// Runs a subtask to completion on the calling thread.
pub fn run_subtask(spec: SubtaskSpec) -> Result<SubtaskResult> {
    let span = info_span!("subtask", job = %spec.info.job, vertex = %spec.info.vertex, index = spec.info.index);
    let _enter = span.enter();
    let SubtaskSpec {
        info,
        input,
        mut chain,
        cancel,
        metrics,
    } = spec;
    for op in chain.iter_mut() {
        for w in op.outputs.iter_mut().flatten() {
            for t in w.targets_mut() {
                t.bind(cancel.clone(), metrics.clone());
            }
        }
    }
    let n = chain.len();
    let mut chain = Chain {
        ops: chain,
        watermarks: vec![Watermark::MIN; n],
        head_outputs: Vec::new(),
        info,
        metrics: metrics.clone(),
    };
    let started = Instant::now();
    match input {
        TaskInput::Source {
            source,
            watermarks,
            mut main_outputs,
            mut side_outputs,
        } => {
            for w in main_outputs
                .iter_mut()
                .chain(side_outputs.iter_mut().flatten())
            {
                for t in w.targets_mut() {
                    t.bind(cancel.clone(), metrics.clone());
                }
            }
            chain.head_outputs = main_outputs;
            run_source(source, watermarks, side_outputs, &mut chain, &cancel)?;
        }
        TaskInput::Channels(inputs) => run_channels(inputs, &mut chain, &cancel)?,
    }
    debug!(elapsed = ?started.elapsed(), "subtask finished");
    let accumulators = chain
        .ops
        .iter()
        .flat_map(|op| op.operator.accumulators())
        .collect();
    Ok(SubtaskResult {
        metrics: metrics.snapshot(),
        accumulators,
    })
}

fn run_source(
    mut source: Box<dyn Source>,
    config: WatermarkConfig,
    mut side_outputs: Vec<Vec<EdgeWriter>>,
    chain: &mut Chain,
    cancel: &CancelToken,
) -> Result<()> {
    let mut generator = WatermarkGenerator::new(&config);
    let mut last_data = Instant::now();
    let mut idle = false;
    loop {
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let mut out = Collected::default();
        let status = {
            let ctx = OperatorContext {
                subtask: &chain.info,
                record_watermark: generator.emitted(),
                current_watermark: generator.emitted(),
                metrics: &chain.metrics,
            };
            source.poll(&ctx, &mut out)?
        };
        if !out.0.is_empty() {
            last_data = Instant::now();
            idle = false;
        }
        for (port, batch) in out.0 {
            if port == MAIN_PORT {
                SubtaskMetrics::add(&chain.metrics.records_in, batch.num_rows() as u64);
                // every record is judged against the watermark emitted before it (`split` has
                // already advanced the generator past the whole batch)
                let mut before = generator.emitted();
                for (piece, wm) in generator.split(&batch) {
                    chain.push_batch(0, 0, piece, before)?;
                    if let Some(wm) = wm {
                        before = wm;
                        chain
                            .metrics
                            .watermark
                            .store(wm.0, std::sync::atomic::Ordering::Relaxed);
                        chain.push_watermark(0, wm)?;
                    }
                }
            } else {
                let Some(writers) = side_outputs.get_mut(port - 1) else {
                    return Err(EngineError::Operator(format!(
                        "source emitted on unknown port {port}"
                    )));
                };
                // a source's side outputs carry input it could not read
                SubtaskMetrics::add(&chain.metrics.dead_letters, batch.num_rows() as u64);
                for w in writers.iter_mut() {
                    w.send_batch(batch.clone())?;
                }
            }
        }
        match status {
            SourceStatus::Ready => {}
            SourceStatus::Pending(wait) => {
                if let Some(timeout) = config.idle_timeout
                    && !idle
                    && last_data.elapsed() >= timeout
                {
                    idle = true;
                    chain.broadcast_all(&Element::Idle)?;
                    for w in side_outputs.iter_mut().flatten() {
                        w.broadcast(&Element::Idle)?;
                    }
                }
                chain.idle()?;
                std::thread::sleep(wait.min(Duration::from_millis(100)));
            }
            SourceStatus::Finished => break,
        }
    }
    chain
        .metrics
        .watermark
        .store(i64::MAX, std::sync::atomic::Ordering::Relaxed);
    chain.push_watermark(0, Watermark::MAX)?;
    for w in side_outputs.iter_mut().flatten() {
        w.broadcast(&Element::Watermark(Watermark::MAX))?;
    }
    chain.end_of_input()?;
    for w in side_outputs.iter_mut().flatten() {
        w.broadcast(&Element::EndOfInput)?;
    }
    Ok(())
}

fn run_channels(
    inputs: Vec<(ChannelReceiver, usize)>,
    chain: &mut Chain,
    cancel: &CancelToken,
) -> Result<()> {
    let mut tracker = WatermarkTracker::new(inputs.len());
    let mut open: Vec<bool> = vec![true; inputs.len()];
    let mut remaining = inputs.len();
    while remaining > 0 {
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let mut sel = Select::new();
        let mut index = Vec::with_capacity(remaining);
        for (ch, (rx, _)) in inputs.iter().enumerate() {
            if open[ch] {
                sel.recv(&rx.rx);
                index.push(ch);
            }
        }
        let op = match sel.select_timeout(Duration::from_millis(100)) {
            Ok(op) => op,
            Err(_) => {
                chain.idle()?;
                continue;
            }
        };
        let ch = index[op.index()];
        let element = op
            .recv(&inputs[ch].0.rx)
            .map_err(|_| EngineError::ChannelClosed)?;
        match element {
            Element::Batch(batch) => {
                tracker.mark_active(ch);
                SubtaskMetrics::add(&chain.metrics.records_in, batch.num_rows() as u64);
                chain.push_batch(0, inputs[ch].1, batch, tracker.channel(ch))?;
            }
            Element::Watermark(wm) => {
                if let Some(new) = tracker.update(ch, wm) {
                    chain
                        .metrics
                        .watermark
                        .store(new.0, std::sync::atomic::Ordering::Relaxed);
                    chain.push_watermark(0, new)?;
                }
            }
            Element::Idle => {
                if let Some(new) = tracker.mark_idle(ch) {
                    chain.push_watermark(0, new)?;
                }
                // with every input idle this subtask is idle too: say so downstream, or it
                // would hold back its consumers' watermarks in turn
                if tracker.all_idle() {
                    chain.broadcast_all(&Element::Idle)?;
                }
            }
            Element::EndOfInput => {
                open[ch] = false;
                remaining -= 1;
                if let Some(new) = tracker.finish(ch) {
                    chain
                        .metrics
                        .watermark
                        .store(new.0, std::sync::atomic::Ordering::Relaxed);
                    chain.push_watermark(0, new)?;
                }
            }
        }
    }
    chain.end_of_input()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(times: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(
            crate::TIME_COLUMN,
            DataType::Int64,
            false,
        )]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(times.to_vec()))]).unwrap()
    }

    fn pieces(g: &mut WatermarkGenerator, times: &[i64]) -> Vec<(usize, Option<i64>)> {
        g.split(&batch(times))
            .into_iter()
            .map(|(b, w)| (b.num_rows(), w.map(|w| w.0)))
            .collect()
    }

    #[test]
    fn watermarks_follow_the_data_not_the_batching() {
        let config = WatermarkConfig {
            max_out_of_orderness: Duration::from_millis(10),
            interval: Duration::from_millis(1),
            idle_timeout: None,
        };
        let mut a = WatermarkGenerator::new(&config);
        let whole = pieces(&mut a, &[100, 105, 103, 120, 90]);
        assert_eq!(
            whole,
            vec![(1, Some(89)), (1, Some(94)), (2, Some(109)), (1, None)]
        );
        // the same records in two batches give the same watermarks at the same records
        let mut b = WatermarkGenerator::new(&config);
        let mut split = pieces(&mut b, &[100, 105, 103]);
        split.extend(pieces(&mut b, &[120, 90]));
        assert_eq!(
            split,
            vec![
                (1, Some(89)),
                (1, Some(94)),
                (1, None),
                (1, Some(109)),
                (1, None)
            ]
        );
    }

    #[test]
    fn interval_coarsens_watermarks() {
        let config = WatermarkConfig {
            max_out_of_orderness: Duration::ZERO,
            interval: Duration::from_millis(50),
            idle_timeout: None,
        };
        let mut g = WatermarkGenerator::new(&config);
        let p = pieces(&mut g, &[0, 10, 49, 50, 99, 100]);
        assert_eq!(p, vec![(1, Some(-1)), (3, Some(49)), (2, Some(99))]);
    }
}

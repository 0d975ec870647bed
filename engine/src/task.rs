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
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info_span};

use crate::channel::{CancelToken, ChannelReceiver};
use crate::checkpoint::upload::{OperatorState, SyncTimes, Taken, bookkeep, upload};
use crate::checkpoint::{
    Barrier, CheckpointHooks, LocalState, RestoreSource, SnapshotContext, StateContext,
    SubtaskCommand, SubtaskReport,
};
use crate::element::Selection;
use crate::metrics::{MetricsSnapshot, SubtaskMetrics};
use crate::operator::{
    MAIN_PORT, Operator, OperatorContext, Output, Source, SourceOutput, SourceStatus, SubtaskInfo,
};
use crate::partition::EdgeWriter;
use crate::splits::SplitWatermarks;
use crate::time::WatermarkTracker;
use crate::{Element, EngineError, Result, Watermark};

/// How a source turns record timestamps into watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatermarkConfig {
    /// Bounded out-of-orderness: watermark = max timestamp seen - bound - 1 ms.
    pub max_out_of_orderness: Duration,
    /// Emit a new watermark once it has advanced by at least this much event time. Watermarks
    /// are a function of the input only, never of wall-clock time, so replays are exact.
    pub interval: Duration,
    /// Mark the source idle after this long without data (unbounded sources).
    pub idle_timeout: Option<Duration>,
    /// The source is in a watermark alignment group: after its first batch it reads on only
    /// up to the bound the JobManager sends (`SubtaskCommand::Align`).
    #[serde(default)]
    pub aligned: bool,
}

impl Default for WatermarkConfig {
    fn default() -> Self {
        WatermarkConfig {
            max_out_of_orderness: Duration::ZERO,
            interval: Duration::from_millis(200),
            idle_timeout: None,
            aligned: false,
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

    /// Its state, for a snapshot.
    pub fn save(&self) -> Vec<u8> {
        [self.max_ts.to_be_bytes(), self.emitted.0.to_be_bytes()].concat()
    }

    /// Restores a state from [`save`](Self::save).
    pub fn restore(&mut self, data: &[u8]) -> Result<()> {
        if data.len() != 16 {
            return Err(EngineError::State(
                "watermark state has the wrong size".into(),
            ));
        }
        self.max_ts = i64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
        self.emitted = Watermark(i64::from_be_bytes(data[8..].try_into().expect("8 bytes")));
        Ok(())
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
        /// Stable operator id of the source (its state is stored under it).
        uid: String,
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
    /// Local working directory and keyed-state settings.
    pub local: LocalState,
    /// Commands from the JobManager (checkpoint trigger, completion, ...).
    pub commands: crossbeam_channel::Receiver<SubtaskCommand>,
    /// Checkpoint storage and reporting; `None` when the job takes no checkpoints.
    pub checkpoints: Option<CheckpointHooks>,
    /// The checkpoint or savepoint the job starts from.
    pub restore: Option<Arc<RestoreSource>>,
    /// The `traceparent` of the JobManager's span of the deployment (see [`crate::trace`]).
    pub trace: Option<String>,
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

/// What a source emitted in one poll, in order.
#[derive(Default)]
struct SourceCollected(Vec<SourceItem>);

enum SourceItem {
    /// Records of a split on the main output.
    Main(String, RecordBatch),
    /// Records on a side output.
    Side(usize, RecordBatch),
    /// A split read to its end.
    Finished(String),
    /// A split found while running.
    Added(String),
}

impl SourceOutput for SourceCollected {
    fn emit_split(&mut self, split: &str, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.0.push(SourceItem::Main(split.to_string(), batch));
        }
    }
    fn split_finished(&mut self, split: &str) {
        self.0.push(SourceItem::Finished(split.to_string()));
    }
    fn split_added(&mut self, split: &str) {
        self.0.push(SourceItem::Added(split.to_string()));
    }
    fn emit_side(&mut self, port: usize, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.0.push(SourceItem::Side(port, batch));
        }
    }
}

struct Chain {
    ops: Vec<ChainedOperator>,
    /// State records of the operators, in chain order.
    states: Vec<OperatorState>,
    /// Last watermark delivered to each operator.
    watermarks: Vec<Watermark>,
    /// Main-output edges when the chain is empty (a source writing straight to the network).
    head_outputs: Vec<EdgeWriter>,
    info: SubtaskInfo,
    metrics: Arc<SubtaskMetrics>,
    /// An operator that held back output for a watermark ([`Operator::has_more_output`]): the
    /// watermark reached it but not the operators after it. Between two of its calls the
    /// subtask answers commands and may take a checkpoint (the timers still due are in the
    /// operator's state, so a restore fires them again); it takes no new input until the
    /// operator is done.
    firing: Option<(usize, Watermark)>,
    /// The last watermark sent on the main output.
    sent_watermark: Watermark,
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
            self.metrics.sent(&batch);
            // records judged against a watermark ahead of the one sent downstream (a split's,
            // at a source reading several) carry it across the channel
            let ahead = record_wm > self.sent_watermark;
            for w in self.main_writers().iter_mut() {
                if ahead {
                    w.send_batch_judged(batch.clone(), record_wm)?;
                } else {
                    w.send_batch(batch.clone())?;
                }
            }
            return Ok(());
        }
        self.call(i, record_wm, |op, ctx, out| {
            op.process_batch(input, batch, ctx, out)
        })
    }

    /// Pushes selected rows of a shared batch into the chain's first operator (cut out into a
    /// batch of their own when the chain has none).
    fn push_selection(
        &mut self,
        input: usize,
        rows: Selection,
        record_wm: Watermark,
    ) -> Result<()> {
        if self.ops.is_empty() {
            return self.push_batch(0, input, rows.into_batch()?, record_wm);
        }
        self.call(0, record_wm, |op, ctx, out| {
            op.process_selection(input, rows, ctx, out)
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
        self.route(i, out, record_wm)
    }

    /// Routes what operator `i` emitted; main output goes on judged against the watermark its
    /// input was (or, if higher, the next operator's).
    fn route(&mut self, i: usize, out: Collected, record_wm: Watermark) -> Result<()> {
        for (port, batch) in out.0 {
            if port == MAIN_PORT {
                let wm = self
                    .watermarks
                    .get(i + 1)
                    .copied()
                    .unwrap_or(Watermark::MIN)
                    .max(record_wm);
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
            self.sent_watermark = wm;
            self.metrics
                .output_watermark
                .store(wm.0, std::sync::atomic::Ordering::Relaxed);
            return self
                .main_writers()
                .iter_mut()
                .try_for_each(|w| w.broadcast(&Element::Watermark(wm)));
        }
        self.watermarks[i] = wm;
        self.fire(i, wm)
    }

    /// One call of operator `i`'s `on_watermark`: what it emits goes downstream at once, so
    /// output that many timers make due is never held whole. The watermark moves on once the
    /// operator holds nothing back; until then the chain is [busy](Self::busy).
    fn fire(&mut self, i: usize, wm: Watermark) -> Result<()> {
        self.call(i, wm, |op, ctx, out| op.on_watermark(wm, ctx, out))?;
        if self.ops[i].operator.has_more_output() {
            self.firing = Some((i, wm));
            return Ok(());
        }
        self.broadcast_side(i, &Element::Watermark(wm))?;
        self.push_watermark(i + 1, wm)
    }

    /// An operator holds back output for the last watermark: call [`Chain::resume`] before
    /// giving the chain more input.
    fn busy(&self) -> bool {
        self.firing.is_some()
    }

    /// Continues the pending output of a watermark by one call.
    fn resume(&mut self) -> Result<()> {
        match self.firing.take() {
            Some((i, wm)) => self.fire(i, wm),
            None => Ok(()),
        }
    }

    /// Completes the pending output of a watermark.
    fn finish_firing(&mut self) -> Result<()> {
        while self.busy() {
            self.resume()?;
        }
        Ok(())
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
        match e {
            // a barrier may go between two calls of a firing operator
            Element::Barrier(_) => {}
            // stopping: what is still due stays in the state the savepoint took
            Element::Suspend => self.firing = None,
            // an idle or finished channel must not be followed by more output
            _ => self.finish_firing()?,
        }
        for i in 0..self.ops.len() {
            self.broadcast_side(i, e)?;
        }
        self.main_writers()
            .iter_mut()
            .try_for_each(|w| w.broadcast(e))
    }

    /// Tells every operator that input is quiet.
    fn idle(&mut self) -> Result<()> {
        self.finish_firing()?;
        for i in 0..self.ops.len() {
            self.call(i, self.watermarks[i], |op, ctx, out| op.on_idle(ctx, out))?;
        }
        Ok(())
    }

    fn end_of_input(&mut self) -> Result<()> {
        self.finish_firing()?;
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

impl Chain {
    /// Takes the synchronous part of a snapshot of the chain's operators, after `head` (the
    /// source, if any) was snapshotted into `taken`.
    fn snapshot(&mut self, id: u64, local: &Path, mut taken: Vec<Taken>) -> Result<Vec<Taken>> {
        for ((op, st), wm) in self.ops.iter_mut().zip(&self.states).zip(&self.watermarks) {
            let mut snap = SnapshotContext::new(id, st.backend.as_ref());
            op.operator.snapshot(&mut snap)?;
            // the operator's watermark: what "already fired" and "late" meant at the barrier
            snap.put(OPERATOR_WATERMARK, wm.0.to_be_bytes().to_vec());
            taken.push(st.take(id, &self.info, snap.into_state(), local)?);
        }
        Ok(taken)
    }

    /// Handles a completion or abort for the chain.
    fn command(&mut self, cmd: &SubtaskCommand) -> Result<()> {
        bookkeep(&self.states, cmd);
        if let SubtaskCommand::Complete(id) = cmd {
            for op in self.ops.iter_mut() {
                op.operator.checkpoint_complete(*id)?;
            }
        }
        Ok(())
    }
}

/// Runs the snapshot of a subtask at `barrier` and starts its upload. A failure of the upload
/// declines the checkpoint (object storage may be back for the next one); a failure of the
/// synchronous part (an operator's snapshot: a full or failing disk) declines it and fails the
/// subtask, since its local state can no longer be trusted, so the restart strategy starts it
/// over on a fresh working directory. Writing the snapshot's rows into RocksDB, its flush and
/// hard links run on the upload thread; if they fail, the checkpoint is declined and the
/// subtask's next access to that state (or its next checkpoint) fails it.
fn checkpoint(
    chain: &mut Chain,
    hooks: &CheckpointHooks,
    local: &Path,
    barrier: &Barrier,
    head: Option<(&mut dyn Source, &OperatorState, &SplitWatermarks)>,
    alignment_ms: u64,
) -> Result<()> {
    let started = Instant::now();
    let span = tracing::info_span!(
        "checkpoint.sync",
        trace_id = tracing::field::Empty,
        checkpoint = barrier.id,
        vertex = %chain.info.vertex,
        subtask = chain.info.index,
    );
    crate::trace::follow(&span, barrier.trace.as_deref());
    let entered = span.enter();
    let mut taken = Vec::new();
    let result = (|| {
        if let Some((source, st, generator)) = head {
            let mut snap = SnapshotContext::new(barrier.id, st.backend.as_ref());
            source.snapshot(&mut snap)?;
            snap.put(SPLIT_WATERMARKS, generator.save());
            taken.push(st.take(barrier.id, &chain.info, snap.into_state(), local)?);
        }
        chain.snapshot(barrier.id, local, taken)
    })();
    drop(entered);
    match result {
        Ok(taken) => upload(
            hooks,
            barrier,
            &chain.info,
            taken,
            SyncTimes {
                alignment_ms,
                sync_ms: started.elapsed().as_millis() as u64,
                output_pending: chain.busy(),
            },
        ),
        Err(e) => {
            (hooks.report)(SubtaskReport::Decline {
                checkpoint: barrier.id,
                reason: format!("{}#{}: {e}", chain.info.vertex, chain.info.index),
            });
            return Err(e);
        }
    }
    chain.broadcast_all(&Element::Barrier(barrier.clone()))
}

/// Name of the source's watermark state in snapshots of the earlier format (one generator per
/// subtask); still read.
const WATERMARK_STATE: &str = "watermark";

/// Name of the source's per-split watermark state.
const SPLIT_WATERMARKS: &str = "split-watermarks";

/// Name of a chained operator's watermark in its state.
const OPERATOR_WATERMARK: &str = "operator-watermark";

/// The watermark a restored operator starts with: the smallest its former subtasks had (at an
/// aligned barrier they all had seen the same watermarks from the sources).
fn restored_operator_watermark(ctx: &StateContext<'_>) -> Watermark {
    ctx.operator_state(OPERATOR_WATERMARK)
        .iter()
        .filter_map(|(_, _, d)| <[u8; 8]>::try_from(*d).ok())
        .map(|b| Watermark(i64::from_be_bytes(b)))
        .min()
        .unwrap_or(Watermark::MIN)
}

/// Opens one operator: gives it its state context, returns its state record.
fn open_state(
    info: &SubtaskInfo,
    uid: &str,
    local: &LocalState,
    restore: Option<&RestoreSource>,
    checkpointing: bool,
    metrics: &SubtaskMetrics,
    open: impl FnOnce(&mut StateContext<'_>) -> Result<()>,
) -> Result<OperatorState> {
    let mut ctx = StateContext::new(info, uid, &local.config, &local.dir, restore, checkpointing);
    open(&mut ctx)?;
    let (backend, seeded) = ctx.finish();
    if let Some(b) = &backend {
        metrics.track_state(b);
    }
    Ok(OperatorState::new(uid.to_string(), backend, info, seeded))
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
    let span = info_span!(target: "freshet::context", "subtask", job = %spec.info.job, vertex = %spec.info.vertex, index = spec.info.index);
    let _enter = span.enter();
    let local_dir = spec.local.dir.clone();
    let result = run_subtask_inner(spec);
    // keyed backends were dropped with the chain; remove what is left of the working directory
    let _ = std::fs::remove_dir_all(&local_dir);
    result
}

fn run_subtask_inner(spec: SubtaskSpec) -> Result<SubtaskResult> {
    let SubtaskSpec {
        info,
        input,
        mut chain,
        cancel,
        metrics,
        local,
        commands,
        checkpoints,
        restore,
        trace,
    } = spec;
    // opening the operators is where state is restored: the span ends once they are open
    let opening = tracing::info_span!(
        "subtask.open",
        trace_id = tracing::field::Empty,
        vertex = %info.vertex,
        subtask = info.index,
        restored_from = restore.as_ref().map(|r| r.location.as_str()),
    );
    crate::trace::follow(&opening, trace.as_deref());
    let mut opening = Some(opening);
    for op in chain.iter_mut() {
        for w in op.outputs.iter_mut().flatten() {
            for t in w.targets_mut() {
                t.bind(cancel.clone(), metrics.clone());
            }
        }
    }
    let checkpointing = checkpoints.is_some();
    let restore = restore.as_deref();
    let mut states = Vec::with_capacity(chain.len());
    let mut watermarks = Vec::with_capacity(chain.len());
    for op in chain.iter_mut() {
        states.push(open_state(
            &info,
            &op.name,
            &local,
            restore,
            checkpointing,
            &metrics,
            |ctx| {
                watermarks.push(restored_operator_watermark(ctx));
                op.operator.open(ctx)
            },
        )?);
    }
    let mut chain = Chain {
        ops: chain,
        states,
        watermarks,
        head_outputs: Vec::new(),
        info,
        metrics: metrics.clone(),
        firing: None,
        sent_watermark: Watermark::MIN,
    };
    let ctl = Control {
        commands,
        hooks: checkpoints,
        local,
        cancel,
    };
    let started = Instant::now();
    match input {
        TaskInput::Source {
            uid,
            mut source,
            watermarks,
            mut main_outputs,
            mut side_outputs,
        } => {
            for w in main_outputs
                .iter_mut()
                .chain(side_outputs.iter_mut().flatten())
            {
                for t in w.targets_mut() {
                    t.bind(ctl.cancel.clone(), metrics.clone());
                }
            }
            chain.head_outputs = main_outputs;
            // an aligned source reads one batch, then waits for its first bound
            let align = watermarks.aligned.then_some(i64::MIN);
            let mut generator = SplitWatermarks::new(watermarks);
            let declared = source.splits();
            if declared.is_empty() {
                generator.declare([crate::splits::WHOLE]);
            } else {
                generator.declare(declared.iter().map(String::as_str));
            }
            let state = open_state(
                &chain.info,
                &uid,
                &ctl.local,
                restore,
                checkpointing,
                &metrics,
                |ctx| {
                    restore_watermark(ctx, &mut generator)?;
                    source.open(ctx)
                },
            )?;
            metrics.opened();
            drop(opening.take());
            let head = SourceHead {
                source,
                state,
                generator,
                side_outputs,
                align,
            };
            run_source(head, &mut chain, &ctl)?;
        }
        TaskInput::Channels(inputs) => {
            metrics.opened();
            drop(opening.take());
            run_channels(inputs, &mut chain, &ctl)?
        }
    }
    debug!(elapsed = ?started.elapsed(), "subtask finished");
    let accumulators = chain
        .ops
        .iter()
        .flat_map(|op| op.operator.accumulators())
        .collect();
    // the operators' state tables add their last cache counts as they go
    drop(chain);
    Ok(SubtaskResult {
        metrics: metrics.snapshot(),
        accumulators,
    })
}

/// A restored source gives each of its splits its saved watermark position and starts from
/// the watermark it had emitted: its own former subtask's, or with a different parallelism the
/// smallest of all (never ahead of any restored split).
fn restore_watermark(ctx: &StateContext<'_>, splits: &mut SplitWatermarks) -> Result<()> {
    let me = ctx.subtask();
    splits.restore(
        (me.index, me.parallelism),
        ctx.operator_state(SPLIT_WATERMARKS),
        ctx.operator_state(WATERMARK_STATE),
    )
}

/// How a subtask hears from the JobManager, and where its snapshots go.
struct Control {
    commands: crossbeam_channel::Receiver<SubtaskCommand>,
    hooks: Option<CheckpointHooks>,
    local: LocalState,
    cancel: CancelToken,
}

/// A source subtask's head: the source with its state record and its splits' watermarks.
struct SourceHead {
    source: Box<dyn Source>,
    state: OperatorState,
    generator: SplitWatermarks,
    side_outputs: Vec<Vec<EdgeWriter>>,
    /// The highest watermark the source may have emitted and still read on (watermark
    /// alignment; `None` for a source in no alignment group).
    align: Option<i64>,
}

impl SourceHead {
    /// Whether the source is ahead of its alignment group by more than the group's drift.
    fn ahead(&self) -> bool {
        self.align
            .is_some_and(|max| self.generator.emitted().0 > max)
    }

    fn broadcast_side(&mut self, e: &Element) -> Result<()> {
        for w in self.side_outputs.iter_mut().flatten() {
            w.broadcast(e)?;
        }
        Ok(())
    }
}

/// What a source does after a command.
enum SourceNext {
    Continue,
    /// Hold: a stop-with-savepoint barrier went out; wait for Suspend or Abort.
    Hold,
    Finish,
    Suspend,
}

/// Handles one command at a source subtask.
fn source_command(
    cmd: SubtaskCommand,
    head: &mut SourceHead,
    chain: &mut Chain,
    ctl: &Control,
) -> Result<SourceNext> {
    match cmd {
        SubtaskCommand::Trigger(barrier) => {
            let Some(hooks) = &ctl.hooks else {
                return Ok(SourceNext::Continue);
            };
            checkpoint(
                chain,
                hooks,
                &ctl.local.dir,
                &barrier,
                Some((head.source.as_mut(), &head.state, &head.generator)),
                0,
            )?;
            head.broadcast_side(&Element::Barrier(barrier.clone()))?;
            Ok(if barrier.stop {
                SourceNext::Hold
            } else {
                SourceNext::Continue
            })
        }
        SubtaskCommand::Complete(_) | SubtaskCommand::Abort(_) => {
            bookkeep(std::slice::from_ref(&head.state), &cmd);
            if let SubtaskCommand::Complete(id) = &cmd {
                head.source.checkpoint_complete(*id)?;
            }
            chain.command(&cmd)?;
            Ok(SourceNext::Continue)
        }
        SubtaskCommand::Finish => Ok(SourceNext::Finish),
        SubtaskCommand::Suspend => Ok(SourceNext::Suspend),
        SubtaskCommand::AddSplits(splits) => {
            head.source.add_splits(splits)?;
            Ok(SourceNext::Continue)
        }
        SubtaskCommand::Align(max) => {
            head.align = Some(max);
            Ok(SourceNext::Continue)
        }
    }
}

/// Sends a source subtask's new watermark down its chain and side outputs.
fn emit_source_watermark(head: &mut SourceHead, chain: &mut Chain, wm: Watermark) -> Result<()> {
    chain
        .metrics
        .watermark
        .store(wm.0, std::sync::atomic::Ordering::Relaxed);
    chain.push_watermark(0, wm)?;
    head.broadcast_side(&Element::Watermark(wm))
}

fn run_source(mut head: SourceHead, chain: &mut Chain, ctl: &Control) -> Result<()> {
    let mut idle = false;
    let restored = head.generator.emitted();
    if restored != Watermark::MIN {
        // a restored source first tells downstream where it was
        chain.push_watermark(0, restored)?;
        head.broadcast_side(&Element::Watermark(restored))?;
    }
    let mut holding = false;
    let ended = loop {
        if ctl.cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        // commands first: a trigger is answered between two polls. A source ahead of its
        // alignment group (with nothing left to fire) only waits for commands until the
        // JobManager raises its bound; checkpoints go on meanwhile.
        let ahead = !holding && !chain.busy() && head.ahead();
        if ahead {
            // input is quiet meanwhile: the chain's operators flush what they hold
            chain.idle()?;
        }
        let waiting = Instant::now();
        let next = next_command(ctl, holding || ahead)?;
        if ahead {
            SubtaskMetrics::add(
                &chain.metrics.aligned_ns,
                waiting.elapsed().as_nanos() as u64,
            );
        }
        if (holding || ahead) && next.is_none() {
            continue;
        }
        if let Some(cmd) = next {
            let aborted = matches!(cmd, SubtaskCommand::Abort(_));
            match source_command(cmd, &mut head, chain, ctl)? {
                SourceNext::Continue => holding &= !aborted,
                SourceNext::Hold => holding = true,
                SourceNext::Finish => break SourceNext::Finish,
                SourceNext::Suspend => break SourceNext::Suspend,
            }
            continue;
        }
        // timers a watermark made due fire a batch per turn, so a trigger is answered between
        // two batches; the source is polled again once they are done
        if chain.busy() {
            chain.resume()?;
            continue;
        }
        let mut out = SourceCollected::default();
        let status = {
            let ctx = OperatorContext {
                subtask: &chain.info,
                record_watermark: head.generator.emitted(),
                current_watermark: head.generator.emitted(),
                metrics: &chain.metrics,
            };
            head.source.poll(&ctx, &mut out)?
        };
        if out
            .0
            .iter()
            .any(|i| !matches!(i, SourceItem::Finished(_) | SourceItem::Added(_)))
        {
            idle = false;
            chain
                .metrics
                .idle
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        for item in out.0 {
            match item {
                SourceItem::Main(split, batch) => {
                    chain.metrics.received(&batch);
                    // every record is judged against its split's watermark emitted before it;
                    // the subtask's watermark (the minimum over its splits) goes out after the
                    // piece that advanced it
                    for (piece, judge, wm) in head.generator.cut(&split, &batch) {
                        // the source's position is past the whole batch, so its pieces go in
                        // whole before a checkpoint: only the last watermark's output may be
                        // pending
                        chain.finish_firing()?;
                        chain.push_batch(0, 0, piece, judge)?;
                        if let Some(wm) = wm {
                            emit_source_watermark(&mut head, chain, wm)?;
                        }
                    }
                }
                SourceItem::Added(split) => head.generator.declare([split.as_str()]),
                SourceItem::Finished(split) => {
                    if let Some(wm) = head.generator.finish(&split) {
                        chain.finish_firing()?;
                        emit_source_watermark(&mut head, chain, wm)?;
                    }
                }
                SourceItem::Side(port, batch) => {
                    let Some(writers) = head.side_outputs.get_mut(port - 1) else {
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
        }
        match status {
            SourceStatus::Ready => {}
            // output still pending comes first
            SourceStatus::Pending(_) if chain.busy() => {}
            SourceStatus::Pending(wait) => {
                // splits without data for the idle timeout stop holding the watermark back;
                // with all of them idle, so is the subtask
                let (advanced, all_idle) = head.generator.idle_check();
                if let Some(wm) = advanced {
                    emit_source_watermark(&mut head, chain, wm)?;
                }
                if all_idle && !idle {
                    idle = true;
                    chain
                        .metrics
                        .idle
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    chain.broadcast_all(&Element::Idle)?;
                    head.broadcast_side(&Element::Idle)?;
                }
                chain.idle()?;
                // wake early for a command
                let waiting = Instant::now();
                let cmd = ctl
                    .commands
                    .recv_timeout(wait.min(Duration::from_millis(100)));
                chain.metrics.idled(waiting);
                if let Ok(cmd) = cmd {
                    match source_command(cmd, &mut head, chain, ctl)? {
                        SourceNext::Continue => {}
                        SourceNext::Hold => holding = true,
                        SourceNext::Finish => break SourceNext::Finish,
                        SourceNext::Suspend => break SourceNext::Suspend,
                    }
                }
            }
            SourceStatus::Finished => break SourceNext::Continue,
        }
    };
    let mut ended = ended;
    if matches!(ended, SourceNext::Continue) {
        // the input ended: what its last watermark made due, then what the end makes due, each
        // fired between commands (a checkpoint triggered meanwhile does not wait for it)
        ended = fire_pending(&mut head, chain, ctl)?;
        if matches!(ended, SourceNext::Continue) {
            chain
                .metrics
                .watermark
                .store(i64::MAX, std::sync::atomic::Ordering::Relaxed);
            chain.push_watermark(0, Watermark::MAX)?;
            head.broadcast_side(&Element::Watermark(Watermark::MAX))?;
            ended = fire_pending(&mut head, chain, ctl)?;
        }
    }
    if matches!(ended, SourceNext::Suspend) {
        chain.broadcast_all(&Element::Suspend)?;
        return head.broadcast_side(&Element::Suspend);
    }
    if !matches!(ended, SourceNext::Finish)
        && let Some(hooks) = &ctl.hooks
    {
        // with checkpoints, the input ends only after a final checkpoint covers all output
        (hooks.report)(SubtaskReport::SourceFinished);
        loop {
            if ctl.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let cmd = match ctl.commands.recv_timeout(Duration::from_millis(100)) {
                Ok(cmd) => cmd,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(_) => return Err(EngineError::Cancelled),
            };
            match source_command(cmd, &mut head, chain, ctl)? {
                SourceNext::Continue | SourceNext::Hold => {}
                SourceNext::Finish => break,
                SourceNext::Suspend => {
                    chain.broadcast_all(&Element::Suspend)?;
                    return head.broadcast_side(&Element::Suspend);
                }
            }
        }
    }
    chain.end_of_input()?;
    head.broadcast_side(&Element::EndOfInput)
}

/// The next command for a source: waits up to 100 ms for one while `holding` (a
/// stop-with-savepoint holds it), else takes one only if it was already sent.
fn next_command(ctl: &Control, holding: bool) -> Result<Option<SubtaskCommand>> {
    if !holding {
        return Ok(ctl.commands.try_recv().ok());
    }
    match ctl.commands.recv_timeout(Duration::from_millis(100)) {
        Ok(cmd) => Ok(Some(cmd)),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
        Err(_) => Err(EngineError::Cancelled),
    }
}

/// Completes the output a watermark made due at a source subtask, a batch per turn, answering
/// commands between turns (a stop-with-savepoint holds it until the job suspends or carries
/// on). Returns `Finish` or `Suspend` if a command ended the source, else `Continue`.
fn fire_pending(head: &mut SourceHead, chain: &mut Chain, ctl: &Control) -> Result<SourceNext> {
    let mut holding = false;
    while chain.busy() || holding {
        if ctl.cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        match next_command(ctl, holding)? {
            None if holding => {}
            Some(cmd) => {
                let aborted = matches!(cmd, SubtaskCommand::Abort(_));
                match source_command(cmd, head, chain, ctl)? {
                    SourceNext::Continue => holding &= !aborted,
                    SourceNext::Hold => holding = true,
                    end @ (SourceNext::Finish | SourceNext::Suspend) => return Ok(end),
                }
            }
            None => chain.resume()?,
        }
    }
    Ok(SourceNext::Continue)
}

/// What a subtask reading channels knows of them.
struct Channels {
    tracker: WatermarkTracker,
    open: Vec<bool>,
    remaining: usize,
    /// Barrier alignment: channels that delivered the pending barrier are not read until it
    /// arrived on every open channel.
    blocked: Vec<bool>,
    aligning: Option<(Barrier, Instant, tracing::Span)>,
    /// An element read while output of a watermark was pending, which must wait for it: its
    /// channel is not read again until it is handled.
    held: Vec<Option<Element>>,
    /// Per channel, the watermark the next batch is judged against when its sender said
    /// ([`Element::Judge`]).
    judged: Vec<Option<Watermark>>,
    suspended: bool,
}

impl Channels {
    fn readable(&self, ch: usize) -> bool {
        self.open[ch] && !self.blocked[ch] && self.held[ch].is_none()
    }

    /// Handles one element that arrived on channel `ch` of `inputs`.
    fn handle(
        &mut self,
        ch: usize,
        input: usize,
        element: Element,
        chain: &mut Chain,
        ctl: &Control,
    ) -> Result<()> {
        match element {
            Element::Batch(batch) => {
                self.tracker.mark_active(ch);
                chain.metrics.received(&batch);
                let channel = self.tracker.channel(ch);
                let judge = self.judged[ch].take().map_or(channel, |j| j.max(channel));
                chain.push_batch(0, input, batch, judge)?;
            }
            Element::Rows(rows) => {
                self.tracker.mark_active(ch);
                chain.metrics.received_rows(&rows);
                let channel = self.tracker.channel(ch);
                let judge = self.judged[ch].take().map_or(channel, |j| j.max(channel));
                chain.push_selection(input, rows, judge)?;
            }
            Element::Judge(wm) => self.judged[ch] = Some(wm),
            Element::Watermark(wm) => {
                if let Some(new) = self.tracker.update(ch, wm) {
                    chain
                        .metrics
                        .watermark
                        .store(new.0, std::sync::atomic::Ordering::Relaxed);
                    chain.push_watermark(0, new)?;
                }
            }
            Element::Idle => {
                if let Some(new) = self.tracker.mark_idle(ch) {
                    chain.push_watermark(0, new)?;
                }
                // with every input idle this subtask is idle too: say so downstream, or it
                // would hold back its consumers' watermarks in turn
                if self.tracker.all_idle() {
                    chain.broadcast_all(&Element::Idle)?;
                }
            }
            Element::Barrier(barrier) => {
                self.blocked[ch] = true;
                if self.aligning.is_none() {
                    let span = tracing::info_span!(
                        "checkpoint.alignment",
                        trace_id = tracing::field::Empty,
                        checkpoint = barrier.id,
                        vertex = %chain.info.vertex,
                        subtask = chain.info.index,
                    );
                    crate::trace::follow(&span, barrier.trace.as_deref());
                    self.aligning = Some((barrier, Instant::now(), span));
                }
            }
            Element::EndOfInput | Element::Suspend => {
                self.suspended |= matches!(element, Element::Suspend);
                self.open[ch] = false;
                self.remaining -= 1;
                if let Some(new) = self.tracker.finish(ch) {
                    chain
                        .metrics
                        .watermark
                        .store(new.0, std::sync::atomic::Ordering::Relaxed);
                    chain.push_watermark(0, new)?;
                }
            }
        }
        if self.aligning.is_some() && (0..self.open.len()).all(|c| !self.open[c] || self.blocked[c])
        {
            let (barrier, since, span) = self.aligning.take().expect("aligning");
            drop(span);
            if let Some(hooks) = &ctl.hooks {
                let alignment_ms = since.elapsed().as_millis() as u64;
                checkpoint(chain, hooks, &ctl.local.dir, &barrier, None, alignment_ms)?;
            }
            self.blocked.iter_mut().for_each(|b| *b = false);
        }
        Ok(())
    }
}

fn run_channels(
    inputs: Vec<(ChannelReceiver, usize)>,
    chain: &mut Chain,
    ctl: &Control,
) -> Result<()> {
    let n = inputs.len();
    let mut c = Channels {
        tracker: WatermarkTracker::new(n),
        open: vec![true; n],
        remaining: n,
        blocked: vec![false; n],
        aligning: None,
        held: (0..n).map(|_| None).collect(),
        judged: vec![None; n],
        suspended: false,
    };
    while c.remaining > 0 {
        if ctl.cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let busy = chain.busy();
        if !busy && let Some(ch) = c.held.iter().position(Option::is_some) {
            let element = c.held[ch].take().expect("held");
            c.handle(ch, inputs[ch].1, element, chain, ctl)?;
            continue;
        }
        let mut sel = Select::new();
        let mut index = Vec::with_capacity(c.remaining);
        for (ch, (rx, _)) in inputs.iter().enumerate() {
            if c.readable(ch) {
                sel.recv(&rx.rx);
                index.push(ch);
            }
        }
        let commands = sel.recv(&ctl.commands);
        // While output a watermark made due is pending (a batch of it per turn), only commands
        // and barriers that may go ahead of it are taken; anything else read is held back.
        let op = if busy {
            match sel.try_select() {
                Ok(op) => op,
                Err(_) => {
                    chain.resume()?;
                    continue;
                }
            }
        } else {
            let waiting = Instant::now();
            let op = sel.select_timeout(Duration::from_millis(100));
            chain.metrics.idled(waiting);
            match op {
                Ok(op) => op,
                Err(_) => {
                    chain.idle()?;
                    continue;
                }
            }
        };
        if op.index() == commands {
            match op.recv(&ctl.commands) {
                Ok(cmd) => chain.command(&cmd)?,
                Err(_) => return Err(EngineError::Cancelled),
            }
            continue;
        }
        let ch = index[op.index()];
        let element = op
            .recv(&inputs[ch].0.rx)
            .map_err(|_| EngineError::UpstreamClosed)?;
        inputs[ch].0.taken();
        let overtakes = matches!(&element, Element::Barrier(b) if b.may_overtake_firing());
        if busy && !overtakes {
            c.held[ch] = Some(element);
            chain.resume()?;
            continue;
        }
        c.handle(ch, inputs[ch].1, element, chain, ctl)?;
    }
    if c.suspended {
        // a stop-with-savepoint: pending commits arrive as commands before the sources suspend
        while let Ok(cmd) = ctl.commands.try_recv() {
            chain.command(&cmd)?;
        }
        return chain.broadcast_all(&Element::Suspend);
    }
    // a completion sent before the end of input is handled before it (sinks commit first)
    while let Ok(cmd) = ctl.commands.try_recv() {
        chain.command(&cmd)?;
    }
    chain.end_of_input()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    /// A batch of the time column alone.
    pub(crate) fn batch(times: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(
            crate::TIME_COLUMN,
            DataType::Int64,
            false,
        )]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(times.to_vec()))]).unwrap()
    }

    /// Emits one row per `on_watermark` call, `steps` calls per watermark.
    struct Firer {
        steps: usize,
        left: usize,
    }

    impl Operator for Firer {
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

        fn on_watermark(
            &mut self,
            wm: Watermark,
            _: &OperatorContext<'_>,
            out: &mut dyn Output,
        ) -> Result<()> {
            if self.left == 0 {
                self.left = self.steps;
            }
            self.left -= 1;
            out.emit(MAIN_PORT, batch(&[wm.0]));
            Ok(())
        }

        fn has_more_output(&self) -> bool {
            self.left > 0
        }
    }

    /// Writes down what reaches it.
    struct Recorder(Arc<std::sync::Mutex<Vec<String>>>);

    impl Operator for Recorder {
        fn process_batch(
            &mut self,
            _: usize,
            batch: RecordBatch,
            _: &OperatorContext<'_>,
            _: &mut dyn Output,
        ) -> Result<()> {
            let t = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            self.0.lock().unwrap().push(format!("row {}", t.value(0)));
            Ok(())
        }

        fn on_watermark(
            &mut self,
            wm: Watermark,
            _: &OperatorContext<'_>,
            _: &mut dyn Output,
        ) -> Result<()> {
            self.0.lock().unwrap().push(format!("watermark {}", wm.0));
            Ok(())
        }

        fn on_end_of_input(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
            self.0.lock().unwrap().push("end".into());
            Ok(())
        }
    }

    fn firing_chain(steps: usize) -> (Chain, Arc<std::sync::Mutex<Vec<String>>>) {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let op = |name: &str, operator: Box<dyn Operator>| ChainedOperator {
            name: name.into(),
            operator,
            outputs: vec![Vec::new()],
        };
        let chain = Chain {
            ops: vec![
                op("fire", Box::new(Firer { steps, left: 0 })),
                op("record", Box::new(Recorder(log.clone()))),
            ],
            states: Vec::new(),
            watermarks: vec![Watermark::MIN; 2],
            head_outputs: Vec::new(),
            info: SubtaskInfo {
                job: "j".into(),
                vertex: "v".into(),
                index: 0,
                parallelism: 1,
                max_parallelism: 128,
            },
            metrics: Arc::new(SubtaskMetrics::default()),
            firing: None,
            sent_watermark: Watermark::MIN,
        };
        (chain, log)
    }

    /// A watermark whose output takes several calls leaves the chain busy after each call, with
    /// that call's output already downstream and the watermark not yet: the subtask can answer
    /// a checkpoint trigger in between. Input and the end of input wait for the rest; a stop
    /// drops it (it stays in the savepoint's state).
    #[test]
    fn output_a_watermark_makes_due_goes_out_a_call_at_a_time() {
        let (mut chain, log) = firing_chain(3);
        chain.push_watermark(0, Watermark(10)).unwrap();
        assert!(chain.busy());
        assert_eq!(*log.lock().unwrap(), ["row 10"]);
        chain.resume().unwrap();
        assert!(chain.busy());
        assert_eq!(*log.lock().unwrap(), ["row 10", "row 10"]);
        chain.resume().unwrap();
        assert!(!chain.busy(), "the third call held nothing back");
        assert_eq!(
            *log.lock().unwrap(),
            ["row 10", "row 10", "row 10", "watermark 10"]
        );

        log.lock().unwrap().clear();
        chain.push_watermark(0, Watermark(20)).unwrap();
        chain.end_of_input().unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["row 20", "row 20", "row 20", "watermark 20", "end"],
            "the end of input follows all output"
        );

        let (mut chain, log) = firing_chain(3);
        chain.push_watermark(0, Watermark(30)).unwrap();
        chain.broadcast_all(&Element::Suspend).unwrap();
        assert!(!chain.busy());
        assert_eq!(*log.lock().unwrap(), ["row 30"], "a stop ends the output");
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
            aligned: false,
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
            aligned: false,
        };
        let mut g = WatermarkGenerator::new(&config);
        let p = pieces(&mut g, &[0, 10, 49, 50, 99, 100]);
        assert_eq!(p, vec![(1, Some(-1)), (3, Some(49)), (2, Some(99))]);
    }
}

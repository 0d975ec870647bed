//! The traits operators, sources and sinks implement, and what the runtime promises them.
//!
//! An [`Operator`] is driven by one subtask thread. The runtime calls, in input order:
//! [`process_batch`](Operator::process_batch) for every batch (or
//! [`process_selection`](Operator::process_selection) for rows of a shared one), [`on_watermark`](Operator::on_watermark)
//! whenever the subtask's combined watermark advances (after every batch that preceded the
//! watermark on every input), and [`on_end_of_input`](Operator::on_end_of_input) once, after every
//! input finished. [`on_idle`](Operator::on_idle) is called when input has been quiet for a
//! while. Only `process_batch` is required. Watermarks are forwarded downstream by the
//! runtime after `on_watermark` returns, so rows emitted there precede the watermark.
//!
//! Sinks are operators without outputs: they write in `process_batch` and flush in
//! `on_end_of_input`. With checkpoints on, a sink is two-phase: it stages what arrives between
//! two barriers and commits it in [`checkpoint_complete`](Operator::checkpoint_complete).
//!
//! State: [`open`](Operator::open) runs first and attaches keyed tables to the subtask's RocksDB
//! backend or restores from a snapshot; [`snapshot`](Operator::snapshot) runs when a checkpoint
//! barrier passes the operator.
//!
//! A [`Source`] is polled by its subtask thread; it emits batches that carry the
//! [`TIME_COLUMN`](crate::TIME_COLUMN), and the runtime derives watermarks from them
//! (see [`crate::task::WatermarkGenerator`]).
use arrow::record_batch::RecordBatch;
use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::{CheckpointId, SnapshotContext, StateContext};
use crate::element::Selection;
use crate::metrics::SubtaskMetrics;
use crate::{KeyGroupRange, Result, Watermark};

/// Output port of the main stream.
pub const MAIN_PORT: usize = 0;

/// Identity of a running subtask, handed to its operators.
#[derive(Debug, Clone)]
pub struct SubtaskInfo {
    /// Job name.
    pub job: String,
    /// Name of the vertex (chain) this subtask runs.
    pub vertex: String,
    /// Index of this subtask, `0..parallelism`.
    pub index: u32,
    /// Parallelism of the vertex.
    pub parallelism: u32,
    /// Number of key groups of the job.
    pub max_parallelism: u32,
}

impl SubtaskInfo {
    /// The key groups whose state this subtask owns.
    pub fn key_groups(&self) -> KeyGroupRange {
        KeyGroupRange::for_subtask(self.max_parallelism, self.parallelism, self.index)
    }
}

/// What an operator may look at while processing.
#[derive(Debug)]
pub struct OperatorContext<'a> {
    /// Who is running.
    pub subtask: &'a SubtaskInfo,
    /// The watermark of the input the current batch arrived on. Decisions about a record (is it
    /// late? has its state expired?) are made against this, so they do not depend on how fast
    /// other inputs happen to be.
    pub record_watermark: Watermark,
    /// The subtask's combined watermark (minimum over inputs); timers fire against this.
    pub current_watermark: Watermark,
    /// The subtask's counters.
    pub metrics: &'a Arc<SubtaskMetrics>,
}

/// Where an operator puts its results.
pub trait Output {
    /// Emits a batch on output `port` ([`MAIN_PORT`] or a side output such as late data).
    fn emit(&mut self, port: usize, batch: RecordBatch);
}

/// A stream operator. See the module documentation for the calling contract.
pub trait Operator: Send {
    /// Processes one batch that arrived on logical input `input` (0, or 1 for the right side of
    /// a two-input operator).
    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()>;

    /// Processes the selected rows of a batch other subtasks of this process receive the other
    /// rows of (what a hash edge sends within a process). By default they are cut out and
    /// passed to [`Operator::process_batch`]; a keyed operator that reads rows by index can
    /// process them in place and reuse the keys the edge encoded.
    fn process_selection(
        &mut self,
        input: usize,
        rows: Selection,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        self.process_batch(input, rows.into_batch()?, ctx, out)
    }

    /// The combined watermark advanced to `wm`: fire timers (windows, TTL cleanup) up to it.
    fn on_watermark(
        &mut self,
        _wm: Watermark,
        _ctx: &OperatorContext<'_>,
        _out: &mut dyn Output,
    ) -> Result<()> {
        Ok(())
    }

    /// The input has been quiet for a while (about 100 ms of wall-clock time): a chance to flush
    /// buffered output so results of an unbounded job become visible without waiting for more
    /// input. Called on the subtask's thread between the other calls.
    fn on_idle(&mut self, _ctx: &OperatorContext<'_>, _out: &mut dyn Output) -> Result<()> {
        Ok(())
    }

    /// After [`Operator::on_watermark`] returned: whether it held back more output for the same
    /// watermark (so that one call emits a bounded amount, however many timers came due). The
    /// runtime passes on what the call emitted and calls `on_watermark` again with the same
    /// watermark until this is false.
    fn has_more_output(&self) -> bool {
        false
    }

    /// Every input finished: flush what is left. Called once.
    fn on_end_of_input(&mut self, _ctx: &OperatorContext<'_>, _out: &mut dyn Output) -> Result<()> {
        Ok(())
    }

    /// Named totals this subtask reports when it finishes (row counts, checksums). The
    /// JobManager adds up values of the same name across subtasks (wrapping).
    fn accumulators(&self) -> Vec<(String, i64)> {
        Vec::new()
    }

    /// Called once before anything else, on the subtask's thread: attach keyed tables to the
    /// backend ([`StateContext::attach`]) and restore non-keyed state from a checkpoint or
    /// savepoint, if the job starts from one.
    fn open(&mut self, _state: &mut StateContext<'_>) -> Result<()> {
        Ok(())
    }

    /// A checkpoint barrier passed: write what a restart needs into `snap` (flush keyed tables,
    /// save timers, put non-keyed state). Runs on the subtask thread, so keep it short; uploading
    /// happens afterwards on another thread.
    fn snapshot(&mut self, _snap: &mut SnapshotContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Checkpoint `id` completed: make the effects it covers visible (a two-phase sink commits).
    fn checkpoint_complete(&mut self, _id: CheckpointId) -> Result<()> {
        Ok(())
    }
}

/// What a source reports after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStatus {
    /// More data may be available right away: poll again.
    Ready,
    /// Nothing now (a followed file did not grow, a rate limit): poll again after the duration.
    Pending(Duration),
    /// Bounded input exhausted; the runtime emits the final watermark and end-of-input.
    Finished,
}

/// Where a source puts what it read.
pub trait SourceOutput {
    /// Emits records on the main output; the batch must carry the time column. A source that
    /// reads several splits says which with [`SourceOutput::emit_split`].
    fn emit(&mut self, batch: RecordBatch) {
        self.emit_split(crate::splits::WHOLE, batch)
    }
    /// Emits records of split `split` (as named by [`Source::splits`]) on the main output:
    /// they are judged against that split's watermark.
    fn emit_split(&mut self, split: &str, batch: RecordBatch);
    /// Split `split` is read to its end: it no longer holds the watermark back.
    fn split_finished(&mut self, _split: &str) {}
    /// Split `split` was found while running (a new partition): it holds the watermark back
    /// from now on, until it has data and its own watermark advances.
    fn split_added(&mut self, _split: &str) {}
    /// Emits records on a side output (dead letters).
    fn emit_side(&mut self, port: usize, batch: RecordBatch);
}

/// A source subtask. It owns its share of the input (its splits), decided when it is created.
/// Each split has its own watermarks (see [`crate::splits`]).
pub trait Source: Send {
    /// The splits this subtask reads, named as it emits them; every one holds the subtask's
    /// watermark back until it is finished. None: the subtask reads one split.
    fn splits(&self) -> Vec<String> {
        Vec::new()
    }

    /// Reads the next chunk of input into `out`.
    fn poll(
        &mut self,
        ctx: &OperatorContext<'_>,
        out: &mut dyn SourceOutput,
    ) -> Result<SourceStatus>;

    /// Called once before the first poll: restore the read position from a checkpoint or
    /// savepoint ([`StateContext::operator_state`]).
    fn open(&mut self, _state: &mut StateContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Save the read position: everything emitted so far is before the barrier.
    fn snapshot(&mut self, _snap: &mut SnapshotContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Checkpoint `id` completed: its read positions are durable (a Kafka source reports them
    /// to its consumer group). Not a place for work a restore depends on.
    fn checkpoint_complete(&mut self, _id: CheckpointId) -> Result<()> {
        Ok(())
    }

    /// The JobManager assigned splits found while the job runs to this subtask: read them too
    /// and announce them ([`SourceOutput::split_added`]) with the next poll. A split the
    /// subtask already reads is ignored. Only sources whose plan has a split enumerator are
    /// sent splits.
    fn add_splits(&mut self, splits: Vec<String>) -> Result<()> {
        Err(crate::EngineError::Operator(format!(
            "this source reads no splits found at run time (sent {splits:?})"
        )))
    }
}

//! What travels on a channel between two subtasks.
//!
//! Data and control share one ordered stream per channel: a watermark or end-of-input marker is
//! seen by the receiver exactly after the batches sent before it, and so is a checkpoint barrier.
use arrow::record_batch::RecordBatch;

use crate::Watermark;
use crate::checkpoint::Barrier;

/// One item on a channel.
#[derive(Debug, Clone)]
pub enum Element {
    /// A batch of records; its last column is [`crate::TIME_COLUMN`].
    Batch(RecordBatch),
    /// The sender's watermark advanced.
    Watermark(Watermark),
    /// The next batch on this channel is judged against this watermark instead of the
    /// channel's: its source subtask reads several splits, and the batch's split is ahead of
    /// the subtask's watermark (the minimum of its splits), see `crate::splits`.
    Judge(Watermark),
    /// The sender has had no data for its idle timeout: do not let it hold back watermarks
    /// until it sends again.
    Idle,
    /// The sender is done; nothing follows on this channel.
    EndOfInput,
    /// A checkpoint barrier: everything before it is covered by the snapshot, nothing after.
    Barrier(Barrier),
    /// The job stops at a savepoint: end without flushing (windows stay open in the savepoint).
    Suspend,
}

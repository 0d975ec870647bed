//! What travels on a channel between two subtasks.
//!
//! Data and control share one ordered stream per channel: a watermark or end-of-input marker is
//! seen by the receiver exactly after the batches sent before it. Checkpoint barriers will travel
//! the same way.
use arrow::record_batch::RecordBatch;

use crate::Watermark;

/// One item on a channel.
#[derive(Debug, Clone)]
pub enum Element {
    /// A batch of records; its last column is [`crate::TIME_COLUMN`].
    Batch(RecordBatch),
    /// The sender's watermark advanced.
    Watermark(Watermark),
    /// The sender has had no data for its idle timeout: do not let it hold back watermarks
    /// until it sends again.
    Idle,
    /// The sender is done; nothing follows on this channel.
    EndOfInput,
}

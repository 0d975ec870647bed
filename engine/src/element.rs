//! What travels on a channel between two subtasks.
//!
//! Data and control share one ordered stream per channel: a watermark or end-of-input marker is
//! seen by the receiver exactly after the batches sent before it, and so is a checkpoint barrier.
use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::record_batch::RecordBatch;
use std::sync::Arc;

use crate::Watermark;
use crate::checkpoint::Barrier;
use crate::keys::{EncodedKeys, KeyColumns};

/// One item on a channel.
#[derive(Debug, Clone)]
pub enum Element {
    /// A batch of records; its last column is [`crate::TIME_COLUMN`].
    Batch(RecordBatch),
    /// Some rows of a batch that other subtasks in this process receive other rows of: what a
    /// hash edge sends instead of cutting the batch apart (see [`crate::partition`]).
    Rows(Selection),
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

/// Rows of a shared batch, with the keys the hash edge encoded for every row of it.
///
/// The batch's columns are shared, not copied: a keyed operator that reads rows by index
/// processes `rows` in place and reuses `keys` when it keys by the same columns. Any other
/// operator gets the rows cut out into a batch of their own ([`Selection::into_batch`]).
#[derive(Debug, Clone)]
pub struct Selection {
    /// The whole batch, as the sender emitted it.
    pub batch: RecordBatch,
    /// The rows for this receiver: increasing indices into `batch`.
    pub rows: Vec<u32>,
    /// The key of every row of `batch` (not only of `rows`), encoded by `key_columns`.
    pub keys: Arc<EncodedKeys>,
    /// The columns `keys` were encoded from.
    pub key_columns: Arc<KeyColumns>,
}

impl Selection {
    /// Number of rows selected.
    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// The keys of the batch, if they were encoded by `columns`.
    pub fn keys_by(&self, columns: &KeyColumns) -> Option<&EncodedKeys> {
        (*self.key_columns == *columns).then_some(&*self.keys)
    }

    /// The selected rows cut out into a batch of their own.
    pub fn into_batch(self) -> crate::Result<RecordBatch> {
        if self.rows.len() == self.batch.num_rows() {
            return Ok(self.batch);
        }
        Ok(take_record_batch(
            &self.batch,
            &UInt32Array::from(self.rows),
        )?)
    }
}

/// The row indices to process: every row of `n`, or a selection.
pub fn selected_rows(rows: Option<&[u32]>, n: usize) -> SelectedRows<'_> {
    match rows {
        Some(r) => SelectedRows::Some(r.iter()),
        None => SelectedRows::All(0..n),
    }
}

/// Iterator of [`selected_rows`].
#[derive(Debug, Clone)]
pub enum SelectedRows<'a> {
    /// Every row.
    All(std::ops::Range<usize>),
    /// The rows of a selection.
    Some(std::slice::Iter<'a, u32>),
}

impl Iterator for SelectedRows<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        match self {
            SelectedRows::All(r) => r.next(),
            SelectedRows::Some(i) => i.next().map(|r| *r as usize),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            SelectedRows::All(r) => r.size_hint(),
            SelectedRows::Some(i) => i.size_hint(),
        }
    }
}

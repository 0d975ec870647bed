//! Checkpoints and savepoints as a subtask sees them: barriers, commands from the JobManager,
//! what an operator writes into a snapshot, how a snapshot is uploaded, and how it is read back.
//!
//! A checkpoint starts when the JobManager tells every source subtask to take one
//! ([`SubtaskCommand::Trigger`]). A source snapshots its position and its chain, then sends a
//! [`Barrier`] on every output, in band with the data. A subtask with inputs aligns the barrier
//! (it stops reading a channel once the barrier arrived there, until it arrived on every channel),
//! then snapshots its chain and forwards the barrier. Snapshotting has a synchronous part on the
//! subtask thread (operators write their state into [`SnapshotContext`]; RocksDB flushes and
//! links its files) and an asynchronous part on another thread (upload, then
//! [`SubtaskReport::Ack`]). See [`upload`] for what is uploaded and [`restore`] for the way back.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::KeyGroupRange;

pub mod restore;
pub mod storage;
pub mod upload;
pub mod verify;

pub use restore::{RestoreSource, StateContext};
pub use storage::{S3Options, Storage};
pub use upload::{CheckpointHooks, LocalState, SnapshotContext};
pub use verify::verify;

/// Checkpoint ids increase by one per trigger, across restores of the same job.
pub type CheckpointId = u64;

/// Name of the metadata object of a checkpoint or savepoint directory.
pub const METADATA: &str = "_metadata";

/// The directory of checkpoint `id` under the job's checkpoint root.
pub fn checkpoint_dir(id: CheckpointId) -> String {
    format!("chk-{id:010}")
}

/// Checkpoint or savepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Periodic, owned by the job: incremental, shares files with other checkpoints, deleted
    /// when no longer retained.
    Checkpoint,
    /// Requested by a user: self-contained, kept until deleted.
    Savepoint,
}

/// The in-band marker that separates data before a snapshot from data after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Barrier {
    /// Checkpoint id.
    pub id: CheckpointId,
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// Where a savepoint is written (a location for [`Storage::open`]); checkpoints go to the
    /// job's checkpoint storage.
    pub target: Option<String>,
    /// Stop-with-savepoint: sources emit nothing after this barrier and wait for
    /// [`SubtaskCommand::Suspend`] (or [`SubtaskCommand::Abort`], to carry on).
    pub stop: bool,
    /// The `traceparent` of the JobManager's span of this checkpoint (see [`crate::trace`]).
    #[serde(default)]
    pub trace: Option<String>,
}

impl Barrier {
    /// Whether the barrier may be taken between two batches of output a watermark made due,
    /// the rest following it: yes unless it stops the job (nothing may follow its barrier).
    /// The timers still due are in the snapshot, and a restore fires them; a final checkpoint
    /// taken so is followed by another ([`SubtaskAck::output_pending`]).
    pub fn may_overtake_firing(&self) -> bool {
        !self.stop
    }
}

/// What the JobManager tells a running subtask.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SubtaskCommand {
    /// Sources only: take a snapshot now and send the barrier downstream.
    Trigger(Barrier),
    /// The checkpoint completed (its metadata is durable): commit what it covers.
    Complete(CheckpointId),
    /// The checkpoint was abandoned; it will never complete.
    Abort(CheckpointId),
    /// Sources only, after they reported the end of their input and a final checkpoint
    /// completed: send end-of-input downstream.
    Finish,
    /// Sources only, after a stop-with-savepoint completed: stop without flushing, so the job
    /// ends exactly at the savepoint.
    Suspend,
    /// Sources only: read these splits too. The JobManager found them while the job runs (a new
    /// Kafka partition, a new file in a followed directory) and assigned them to this subtask.
    AddSplits(Vec<String>),
    /// Sources only (watermark alignment): the highest watermark the source may have emitted
    /// and still read on; past it, it stops reading until a higher bound comes. The JobManager
    /// sends the lowest watermark of the source's alignment group plus the group's drift.
    Align(i64),
}

/// A file of a snapshot: its name in the RocksDB directory and where it is stored, relative to
/// the root of the checkpoint storage (checkpoints) or of the savepoint directory (savepoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// File name inside the RocksDB directory.
    pub name: String,
    /// Object path relative to the root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// XXH3-64 of the file's bytes, as 16 hex digits (absent in metadata written before
    /// checksums were recorded). Checked when the file is downloaded for a restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// The checksum recorded for a snapshot file: XXH3-64 of its bytes, as 16 hex digits.
pub fn checksum(data: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(data))
}

/// A named piece of non-keyed operator state (a source position, pending sink commits). Small
/// pieces are kept in the metadata; larger ones ([`INLINE_STATE_LIMIT`]) in a file of their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedState {
    /// Name chosen by the operator.
    pub name: String,
    /// Its bytes (empty in stored metadata when `path` is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
    /// Where the bytes are stored, relative to the root, when they are not inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Size and [`checksum`] of the stored bytes, when they are not inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<(u64, String)>,
    /// Only the subtask with the same index at the same parallelism can restore it (a
    /// generator's position in its share of a sequence): the snapshot restores at the
    /// parallelism it was taken at, or not at all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fixed_parallelism: bool,
}

/// Why the state of operator `uid` in `snapshots` cannot be restored at `parallelism`, if it
/// cannot: a piece of it is bound to the parallelism it was taken at.
pub fn fixed_parallelism_conflict(
    uid: &str,
    snapshots: &[OperatorSnapshot],
    parallelism: u32,
) -> Option<String> {
    snapshots.iter().find_map(|s| {
        let piece = s.state.iter().find(|n| n.fixed_parallelism)?;
        (s.parallelism != parallelism).then(|| {
            format!(
                "'{uid}' ran at parallelism {} when the snapshot was taken, and its state '{}' can only be restored at that parallelism, not at {parallelism}; give '{uid}' a fixed `parallelism: {}` in the job",
                s.parallelism, piece.name, s.parallelism
            )
        })
    })
}

/// Non-keyed state larger than this is stored in a file instead of inline in the metadata.
pub const INLINE_STATE_LIMIT: usize = 16 << 10;

/// The state of one operator in one subtask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorSnapshot {
    /// Subtask index.
    pub subtask: u32,
    /// Parallelism the snapshot was taken at.
    pub parallelism: u32,
    /// Key groups the keyed state covers.
    pub key_groups: KeyGroupRange,
    /// Keyed state: the files of a RocksDB directory (empty for operators without keyed state).
    pub files: Vec<FileRef>,
    /// Non-keyed state.
    pub state: Vec<NamedState>,
}

/// A subtask's acknowledgement of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtaskAck {
    /// Checkpoint id.
    pub checkpoint: CheckpointId,
    /// Snapshots per operator id.
    pub operators: BTreeMap<String, OperatorSnapshot>,
    /// Size of the whole snapshot.
    pub full_bytes: u64,
    /// Bytes uploaded for it (the rest was already stored).
    pub uploaded_bytes: u64,
    /// Time from the first barrier to the last one (inputs aligned), milliseconds.
    pub alignment_ms: u64,
    /// Synchronous part (subtask thread blocked), milliseconds.
    pub sync_ms: u64,
    /// Asynchronous part (upload), milliseconds.
    pub async_ms: u64,
    /// The snapshot was taken while output a watermark made due was still pending, which
    /// follows the barrier: a final checkpoint acknowledged so does not cover all output.
    #[serde(default)]
    pub output_pending: bool,
}

/// What a subtask reports about checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SubtaskReport {
    /// The snapshot is uploaded.
    Ack(Box<SubtaskAck>),
    /// The snapshot failed; the checkpoint cannot complete.
    Decline {
        /// Checkpoint id.
        checkpoint: CheckpointId,
        /// Why.
        reason: String,
    },
    /// A source read all its input (and emitted its final watermark); it waits for the final
    /// checkpoint and [`SubtaskCommand::Finish`].
    SourceFinished,
}

/// The metadata of a completed checkpoint or savepoint: everything needed to restore the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    /// Format version, 1.
    pub format: u32,
    /// Job name.
    pub job: String,
    /// Generation of the job run that wrote it.
    pub generation: u64,
    /// Checkpoint id.
    pub id: CheckpointId,
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// When it was triggered, milliseconds since the epoch.
    pub trigger_time_ms: i64,
    /// Number of key groups of the job.
    pub max_parallelism: u32,
    /// Per operator id, one snapshot per subtask.
    pub operators: BTreeMap<String, Vec<OperatorSnapshot>>,
    /// Taken after every source had read all its input: event time had reached its end, so
    /// every window had fired for good and every TTL had passed, and in a job restored from it
    /// each new record is too late for its windows. False in metadata written before the
    /// field.
    #[serde(default)]
    pub end_of_input: bool,
}

impl CheckpointMetadata {
    /// The stored files it references.
    pub fn files(&self) -> impl Iterator<Item = &FileRef> {
        self.operators
            .values()
            .flatten()
            .flat_map(|s| s.files.iter())
    }
}

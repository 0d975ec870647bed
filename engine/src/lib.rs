//! The Freshet dataflow core: what a running subtask is made of.
//!
//! This crate owns the vocabulary every other crate shares and the machinery that moves data:
//!
//! - [`time`]: event time, [`Watermark`]s and how a subtask combines the watermarks of its inputs.
//! - [`keys`]: key groups, the fixed-size hash space keyed state is partitioned into, and how key
//!   groups map onto parallel subtasks (contiguous ranges, so state can move when parallelism changes).
//! - [`element`]: what flows on a channel: record batches (Arrow) with in-band watermarks and
//!   end-of-input markers, always in order.
//! - [`channel`] and [`partition`]: bounded channels between subtasks and the edge strategies that
//!   route batches onto them (forward, rebalance, broadcast, hash by key group).
//! - [`operator`]: the [`Operator`](operator::Operator) and [`Source`](operator::Source) traits
//!   every operator implements (a sink is an operator), with their contracts.
//! - [`state`]: the keyed-state interface (value/list/map tables with event-time TTL) all stateful
//!   operators use, held in RocksDB behind a write-back cache.
//! - [`checkpoint`]: barriers, snapshots, their upload to object storage and restore.
//! - [`task`]: the subtask runner: input gate, operator chain and output writers on one thread.
//! - [`metrics`]: a subtask's counters, bumped once per batch; [`trace`]: the trace context
//!   barriers and deployments carry, so a subtask's spans join the JobManager's traces.
//!
//! What it does not own: the job description format (`freshet-job`), concrete operators
//! (`freshet-operators`), connectors (`freshet-connectors`), planning and scheduling
//! (`freshet-jobmanager`) and deployment (`freshet-taskmanager`). The engine never sees those types.
#![warn(missing_docs)]

pub mod channel;
pub mod checkpoint;
pub mod commit;
pub mod element;
pub mod error;
pub mod failpoint;
pub mod keys;
pub mod metrics;
pub mod operator;
pub mod partition;
pub mod splits;
pub mod state;
pub mod task;
pub mod time;
pub mod trace;

pub use element::Element;
pub use error::{EngineError, Result};
pub use keys::{KeyGroup, KeyGroupRange};
pub use time::Watermark;

/// Name of the column every stream batch carries as its last column: the record's event time in
/// milliseconds since the Unix epoch (`Int64`). Sources fill it from the job's `event_time`
/// expression; operators keep it aligned with their rows; sinks do not write it.
pub const TIME_COLUMN: &str = "_time";

//! The TaskManager: runs deployed subtasks in its slots and moves data between them.
//!
//! - [`taskmanager`]: deployment (instantiating the chain's operators from the plan the
//!   JobManager shipped, wiring channels), one thread per subtask, cancellation and live counters.
//! - [`shuffle`]: channels between subtasks, named by edge and subtask pair.
//! - [`network`]: channels to subtasks in other TaskManager processes, over TCP with
//!   credit-based flow control.
//! - `metrics`: the TaskManager's OpenTelemetry instruments (subtask counters, state size).
//! - [`service`]: the TaskManager process: its gRPC service, registration and heartbeats.
//! - [`local`]: TaskManagers in the JobManager's process (the local mode of `freshet run`),
//!   the same TaskManager code as in a cluster.
#![warn(missing_docs)]

pub mod local;
mod metrics;
pub mod network;
pub mod service;
pub mod shuffle;
pub mod taskmanager;

pub use taskmanager::TaskManager;

//! The control-plane protocol between the JobManager, TaskManagers and clients, generated from
//! `proto/freshet.proto`.
#![allow(missing_docs, clippy::all)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("freshet.v1");
}

pub use v1::*;

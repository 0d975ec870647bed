//! The job definition: one YAML document that describes a streaming job.
//!
//! A job has named **sources**, a graph of named **transforms** and named **sinks**, a default
//! parallelism, a maximum parallelism (the number of key groups) and per-source watermark
//! settings. The same document is what a `StreamJob` resource carries in `spec.job`, so the format
//! is versioned (`version: 1`) and described by a JSON Schema generated from these types
//! ([`schema`]).
//!
//! - [`spec`]: the types, with serde and schemars derives.
//! - [`load`]: parsing, `--set path=value` overrides, and errors that name the field path.
//! - [`validate`]: structural checks (names, references, parallelism), all problems at once.
//!   Type checks of expressions happen when the job is planned, with the same [`Problem`] type.
//!
//! Expressions (filters, projections, keys, timestamps, aggregates) are SQL expressions, kept as
//! strings here and compiled by `freshet-operators`.
#![warn(missing_docs)]

pub mod duration;
pub mod load;
pub mod problem;
pub mod secret;
pub mod spec;
pub mod structure;
pub mod validate;

pub use duration::{DurationSpec, SignedDurationSpec};
pub use load::{LoadError, apply_override, load_job, parse_job};
pub use problem::{Problem, Problems};
pub use secret::SecretRef;
pub use spec::*;

/// The JSON Schema of the job document.
pub fn schema() -> schemars::Schema {
    schemars::schema_for!(spec::JobSpec)
}

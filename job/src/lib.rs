//! The job definition: one YAML document that describes a streaming job.
//!
//! A job has named **sources**, a graph of named **transforms** and named **sinks**, a default
//! parallelism, a maximum parallelism (the number of key groups) and per-source watermark
//! settings. The same document is what a `StreamJob` resource carries in `spec.job`, so the format
//! is versioned (`version: 1`) and described by a JSON Schema generated from these types and
//! the schemas of the connectors a build has ([`JobFormat`], [`connector`]).
//!
//! - [`spec`]: the types, with serde and schemars derives.
//! - [`load`]: the [`JobFormat`]: parsing, `--set path=value` overrides, and errors that name
//!   the field path.
//! - [`connector`]: connectors as a job names them (`type` plus settings) and the [`Catalog`]
//!   of connector schemas a format is made with.
//! - [`validate`]: structural checks (names, references, parallelism), all problems at once.
//!   Type checks of expressions happen when the job is planned, with the same [`Problem`] type.
//!
//! Expressions (filters, projections, keys, timestamps, aggregates) are SQL expressions, kept as
//! strings here and compiled by `freshet-operators`.
#![warn(missing_docs)]

pub mod connector;
pub mod duration;
pub mod load;
pub mod problem;
pub mod secret;
pub mod spec;
pub mod structure;
pub mod validate;

pub use connector::{
    Catalog, ConnectorInfo, ConnectorSpec, SinkConnectorSpec, SourceConnectorSpec,
};
pub use duration::{DurationSpec, SignedDurationSpec};
pub use load::{JobFormat, LoadError, apply_override};
pub use problem::{Problem, Problems};
pub use secret::SecretRef;
pub use spec::*;

/// Parses a job document with the generic format (connectors unchecked): for tests of the
/// format itself. Products parse with the format of their connector registry.
#[cfg(test)]
pub(crate) fn parse_job(
    text: &str,
    origin: &str,
    overrides: &[String],
) -> Result<JobSpec, LoadError> {
    JobFormat::generic().parse(text, origin, overrides)
}

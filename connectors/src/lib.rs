//! Connectors: where records come from and where results go.
//!
//! Sources: files ([`file_source`]: JSON Lines or CSV, bounded or followed), the SQL-driven
//! [`generator`], and the [`nexmark`] bid generator. Sinks ([`sinks`]): JSON Lines file,
//! file-backed upsert table, stdout, and a counting blackhole with checksums.
//!
//! Every connector implements [`registry::SourceConnector`] or [`registry::SinkConnector`] and is
//! listed in the [`registry::Registry`]; the job format's schema is assembled from theirs
//! ([`job_format`]). [`plan_source`] and [`plan_sink`] find the connector a job names, check its
//! settings and schema against the job and return a factory per subtask. Relative paths are
//! resolved against the job file's directory.
#![warn(missing_docs)]

pub mod avro;
pub mod decode;
pub mod event_time;
pub mod file_source;
pub mod generator;
pub mod kafka;
pub mod nexmark;
pub mod registry;
pub mod schema_registry;
pub mod sinks;

use arrow::datatypes::SchemaRef;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use freshet_engine::Result;
use freshet_engine::operator::{Source, SubtaskInfo};
use freshet_engine::task::WatermarkConfig;
use freshet_job::{ConnectorSpec, Problems, SourceSpec};
use freshet_operators::{OperatorFactory, dead_letter};

pub use registry::{SinkContext, SourceContext, job_format, registry};

/// Creates the source of one subtask.
pub type SourceFactory = Arc<dyn Fn(&SubtaskInfo) -> Result<Box<dyn Source>> + Send + Sync>;

/// A checked source.
pub struct SourcePlan {
    /// Output schemas: main, then the dead-letter output.
    pub outputs: Vec<SchemaRef>,
    /// Watermark generation.
    pub watermarks: WatermarkConfig,
    /// Whether the source ends by itself.
    pub bounded: bool,
    /// The most subtasks that can have work (a file source has one split per file); more would
    /// only idle.
    pub max_parallelism: Option<u32>,
    /// The splits found when planning (a file source's files, a Kafka source's partitions),
    /// to be assigned to subtasks; `None` for sources whose subtasks split the work by their
    /// index alone.
    pub splits: Option<Vec<String>>,
    /// Creates a subtask's source.
    pub factory: SourceFactory,
    /// Finds splits while the job runs; the JobManager runs it and assigns what it finds.
    pub enumerator: Option<Arc<dyn SplitEnumerator>>,
}

/// Finds the splits of a source while the job runs (new partitions of a Kafka topic, new files
/// in a followed directory). The JobManager calls it every [`SplitEnumerator::interval`],
/// assigns each split it has not seen to a subtask and sends it there
/// ([`freshet_engine::checkpoint::SubtaskCommand::AddSplits`]), so every split has exactly one
/// reader and the sources do not each ask the outside world.
pub trait SplitEnumerator: Send + Sync {
    /// How often to look.
    fn interval(&self) -> std::time::Duration;
    /// Every split the source has now (the known ones too). An error is logged and the next
    /// round tries again.
    fn discover(&self) -> Result<Vec<String>>;
    /// The subtask (of `parallelism`) that reads `split`. A restore at any parallelism gives
    /// restored splits to subtasks by the same rule.
    fn assign(&self, split: &str, parallelism: u32) -> u32;
}

/// A checked sink.
pub struct SinkPlan {
    /// Creates a subtask's sink.
    pub factory: OperatorFactory,
}

/// Resolves a path from the job file against the job file's directory.
pub fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl SourcePlan {
    /// A source emitting `schema` (and dead letters), with the watermarks its definition sets;
    /// without a limit on its parallelism or splits found when planning.
    pub fn new(
        ctx: &SourceContext<'_>,
        schema: SchemaRef,
        bounded: bool,
        factory: SourceFactory,
    ) -> SourcePlan {
        let w = &ctx.spec.watermark;
        SourcePlan {
            outputs: vec![schema, dead_letter::schema()],
            watermarks: WatermarkConfig {
                max_out_of_orderness: w.max_out_of_orderness.0,
                interval: w.interval.0,
                idle_timeout: w.idle_timeout.map(|d| d.0),
                aligned: w.alignment.is_some(),
            },
            bounded,
            max_parallelism: None,
            splits: None,
            factory,
            enumerator: None,
        }
    }
}

/// Checks a source and prepares its factory, with the connector its definition names. `splits`
/// are the splits a plan assigned (the files listed when it was made); without them the source
/// finds its splits now.
pub fn plan_source(
    name: &str,
    spec: &SourceSpec,
    base: &Path,
    batch_size: usize,
    splits: Option<&[String]>,
) -> Result<SourcePlan, Problems> {
    registry().plan_source(&SourceContext {
        name,
        spec,
        base,
        batch_size,
        splits,
    })
}

/// Checks a sink against the stream it writes and prepares its factory, with the connector
/// `connector` names. `path` is the field path of the connector for problems.
pub fn plan_sink(
    path: &str,
    name: &str,
    connector: &ConnectorSpec,
    input: &SchemaRef,
    upsert_key: Option<&[String]>,
    base: &Path,
) -> Result<SinkPlan, Problems> {
    registry().plan_sink(
        &SinkContext {
            name,
            path,
            input,
            upsert_key,
            base,
        },
        connector,
    )
}

/// The sink for dead letters a job does not route itself: the job's `dead_letter` connector, or
/// `dead-letter.jsonl` beside the job file, created only when a record arrives.
pub fn dead_letter_sink(
    connector: Option<&ConnectorSpec>,
    base: &Path,
) -> Result<SinkPlan, Problems> {
    match connector {
        Some(c) => plan_sink(
            "dead_letter",
            "dead_letter",
            c,
            &dead_letter::schema(),
            None,
            base,
        ),
        None => {
            let full = resolve(base, "dead-letter.jsonl");
            Ok(SinkPlan {
                factory: Arc::new(move |_| Box::new(sinks::FileSink::new(full.clone(), false))),
            })
        }
    }
}

//! Connectors: where records come from and where results go.
//!
//! Sources: files ([`file_source`]: JSON Lines or CSV, bounded or followed), the SQL-driven
//! [`generator`], and the [`nexmark`] bid generator. Sinks ([`sinks`]): JSON Lines file,
//! file-backed upsert table, stdout, and a counting blackhole with checksums.
//!
//! [`plan_source`] and [`plan_sink`] check a connector's settings and schema against the job and
//! return a factory per subtask. Relative paths are resolved against the job file's directory.
#![warn(missing_docs)]

pub mod decode;
pub mod event_time;
pub mod file_source;
pub mod generator;
pub mod nexmark;
pub mod sinks;

use arrow::datatypes::SchemaRef;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use freshet_engine::Result;
use freshet_engine::operator::{Source, SubtaskInfo};
use freshet_engine::task::WatermarkConfig;
use freshet_job::{Problem, Problems, SinkConnector, SourceConnector, SourceSpec};
use freshet_operators::expr::Expr;
use freshet_operators::{OperatorFactory, dead_letter};

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
    /// The splits found when planning (a file source's files), to be assigned to subtasks;
    /// `None` for sources whose subtasks split the work by their index alone.
    pub splits: Option<Vec<PathBuf>>,
    /// Creates a subtask's source.
    pub factory: SourceFactory,
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

/// Checks a source and prepares its factory. `splits` are the splits a plan assigned (the files
/// listed when it was made); without them the source finds its splits now.
pub fn plan_source(
    name: &str,
    spec: &SourceSpec,
    base: &Path,
    batch_size: usize,
    splits: Option<&[PathBuf]>,
) -> Result<SourcePlan, Problems> {
    let path = format!("sources.{name}");
    let problem =
        |field: &str, m: String| Problems(vec![Problem::new(format!("{path}.{field}"), m)]);
    let watermarks = WatermarkConfig {
        max_out_of_orderness: spec.watermark.max_out_of_orderness.0,
        interval: spec.watermark.interval.0,
        idle_timeout: spec.watermark.idle_timeout.map(|d| d.0),
    };
    let fields: Vec<(String, freshet_job::FieldType)> =
        spec.schema.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let mut max_parallelism = None;
    let mut found = None;
    let (schema, bounded, factory): (SchemaRef, bool, SourceFactory) = match &spec.connector {
        SourceConnector::File {
            path: file,
            format,
            follow,
            rows_per_second,
            csv,
        } => {
            let full = resolve(base, file);
            let listed = match splits {
                Some(files) => Ok(files.to_vec()),
                None => file_source::list_files(&full),
            };
            let files = match listed {
                Ok(files) if !files.is_empty() => files,
                Ok(_) => {
                    return Err(problem(
                        "connector.path",
                        format!("{} contains no files", full.display()),
                    ));
                }
                Err(_) => {
                    return Err(problem(
                        "connector.path",
                        format!("{} does not exist", full.display()),
                    ));
                }
            };
            max_parallelism = Some(files.len() as u32);
            found = Some(files.clone());
            let decoded = decode::schema_of(&fields);
            let event_time = event_time::EventTime::compile(spec.event_time.as_deref(), &decoded)
                .map_err(|e| problem("event_time", e.message))?;
            if !csv.delimiter.is_ascii() {
                return Err(problem(
                    "connector.csv.delimiter",
                    "must be a single ASCII character".into(),
                ));
            }
            let config = file_source::FileSourceConfig {
                name: name.to_string(),
                path: full,
                files,
                display_path: file.clone(),
                format: *format,
                follow: *follow,
                header: csv.header,
                delimiter: csv.delimiter as u8,
                fields,
                event_time: event_time.clone(),
                batch_size,
                rows_per_second: *rows_per_second,
            };
            (
                event_time.output_schema(),
                !follow,
                Arc::new(move |info: &SubtaskInfo| -> Result<Box<dyn Source>> {
                    Ok(Box::new(file_source::FileSource::new(
                        config.clone(),
                        info.index,
                        info.parallelism,
                    )?))
                }),
            )
        }
        SourceConnector::Generator {
            count,
            rows_per_second,
            fields: exprs,
            ingestion_time,
        } => {
            if !spec.schema.is_empty() {
                return Err(problem(
                    "schema",
                    "a generator's schema comes from its fields; remove schema".into(),
                ));
            }
            if rows_per_second.is_some_and(|r| r <= 0.0 || !r.is_finite()) {
                return Err(problem(
                    "connector.rows_per_second",
                    "must be a positive number".into(),
                ));
            }
            let seq = generator::seq_schema();
            let mut compiled = Vec::new();
            for (n, e) in exprs {
                compiled.push((
                    n.clone(),
                    Expr::compile(e, &seq)
                        .map_err(|e| problem(&format!("connector.fields.{n}"), e.message))?,
                ));
            }
            let mut columns: Vec<_> = compiled
                .iter()
                .map(|(n, e)| arrow::datatypes::Field::new(n, e.data_type().clone(), true))
                .collect();
            if let Some(name) = ingestion_time {
                if exprs.contains_key(name) {
                    return Err(problem(
                        "connector.ingestion_time",
                        format!("{name} is also one of the fields"),
                    ));
                }
                columns.push(arrow::datatypes::Field::new(
                    name,
                    arrow::datatypes::DataType::Int64,
                    false,
                ));
            }
            let decoded = Arc::new(arrow::datatypes::Schema::new(columns));
            let event_time = event_time::EventTime::compile(spec.event_time.as_deref(), &decoded)
                .map_err(|e| problem("event_time", e.message))?;
            let config = generator::GeneratorConfig {
                fields: compiled,
                count: *count,
                rows_per_second: *rows_per_second,
                ingestion_time: ingestion_time.is_some(),
                event_time: event_time.clone(),
                batch_size,
            };
            (
                event_time.output_schema(),
                count.is_some(),
                Arc::new(move |info: &SubtaskInfo| -> Result<Box<dyn Source>> {
                    Ok(Box::new(generator::GeneratorSource::new(
                        config.clone(),
                        info.index,
                        info.parallelism,
                    )))
                }),
            )
        }
        SourceConnector::Nexmark {
            events,
            seed,
            events_per_ms,
            bidders,
        } => {
            if !spec.schema.is_empty()
                || spec.event_time.as_deref().is_some_and(|e| e != "date_time")
            {
                return Err(problem(
                    "event_time",
                    "the Nexmark source has a fixed schema with event time date_time".into(),
                ));
            }
            if *bidders == 0 {
                return Err(problem(
                    "connector.bidders",
                    "a Nexmark stream needs at least one bidder".into(),
                ));
            }
            let (events, seed, epm, bidders) = (*events, *seed, *events_per_ms, *bidders);
            (
                nexmark::schema(),
                true,
                Arc::new(move |info: &SubtaskInfo| -> Result<Box<dyn Source>> {
                    Ok(Box::new(nexmark::NexmarkSource::new(
                        events,
                        seed,
                        epm,
                        bidders,
                        info.index,
                        info.parallelism,
                        batch_size,
                    )))
                }),
            )
        }
    };
    Ok(SourcePlan {
        outputs: vec![schema, dead_letter::schema()],
        watermarks,
        bounded,
        max_parallelism,
        splits: found,
        factory,
    })
}

/// Checks a sink against the stream it writes and prepares its factory. `path` is the field path
/// of the connector for problems.
pub fn plan_sink(
    path: &str,
    name: &str,
    connector: &SinkConnector,
    input: &SchemaRef,
    upsert_key: Option<&[String]>,
    base: &Path,
) -> Result<SinkPlan, Problems> {
    let problem =
        |field: &str, m: String| Problems(vec![Problem::new(format!("{path}.{field}"), m)]);
    let factory: OperatorFactory = match connector {
        SinkConnector::File { path: file } => {
            let full = resolve(base, file);
            Arc::new(move |_| Box::new(sinks::FileSink::new(full.clone(), true)))
        }
        SinkConnector::Table {
            path: file,
            key,
            delete_when,
        } => {
            let key: Vec<String> = match (key, upsert_key) {
                (Some(k), _) => k.clone(),
                (None, Some(k)) => k.to_vec(),
                (None, None) => {
                    return Err(Problems(vec![
                        Problem::new(
                            format!("{path}.key"),
                            "the input is not an upsert stream, so the table needs a key",
                        )
                        .hint("add key: [column, ...]"),
                    ]));
                }
            };
            let mut cols = Vec::new();
            for (i, k) in key.iter().enumerate() {
                cols.push(
                    input.index_of(k).map_err(|_| {
                        problem(&format!("key[{i}]"), format!("unknown column '{k}'"))
                    })?,
                );
            }
            let delete = delete_when
                .as_deref()
                .map(|d| Expr::compile(d, input))
                .transpose()
                .map_err(|e| problem("delete_when", e.message))?;
            let full = resolve(base, file);
            Arc::new(move |_| {
                Box::new(sinks::TableSink::new(
                    full.clone(),
                    cols.clone(),
                    delete.clone(),
                ))
            })
        }
        SinkConnector::Stdout => Arc::new(|_| Box::new(sinks::StdoutSink)),
        SinkConnector::Blackhole {
            checksums,
            rows_per_second,
            latency_of,
        } => {
            if rows_per_second.is_some_and(|r| r.is_nan() || r <= 0.0) {
                return Err(problem("rows_per_second", "must be positive".into()));
            }
            let rate = *rows_per_second;
            let mut compiled = Vec::new();
            for (i, c) in checksums.iter().enumerate() {
                let e = Expr::compile(c, input)
                    .map_err(|e| problem(&format!("checksums[{i}]"), e.message))?;
                sinks::check_checksum(&e).map_err(|m| problem(&format!("checksums[{i}]"), m))?;
                compiled.push((c.clone(), e));
            }
            let latency = match latency_of {
                Some(l) => {
                    let e =
                        Expr::compile(l, input).map_err(|e| problem("latency_of", e.message))?;
                    if e.data_type() != &arrow::datatypes::DataType::Int64 {
                        return Err(problem(
                            "latency_of",
                            "must be BIGINT (microseconds since the Unix epoch)".into(),
                        ));
                    }
                    Some(e)
                }
                None => None,
            };
            let name = name.to_string();
            Arc::new(move |_| {
                Box::new(sinks::BlackholeSink::new(
                    name.clone(),
                    compiled.clone(),
                    rate,
                    latency.clone(),
                ))
            })
        }
    };
    Ok(SinkPlan { factory })
}

/// The sink for dead letters a job does not route itself: the job's `dead_letter` connector, or
/// `dead-letter.jsonl` beside the job file, created only when a record arrives.
pub fn dead_letter_sink(
    connector: Option<&SinkConnector>,
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

//! The connector registry: every source and sink connector behind one trait per role, found by
//! the `type` a job names.
//!
//! A connector declares its settings as a typed configuration (serde for reading them, schemars
//! for their JSON Schema), checks them against the job (schemas, expressions, files), and
//! returns what planning needs plus a factory that builds its source or sink in each subtask.
//! Settings are decoded with the path of every field, so a wrong one is named
//! `sources.clicks.connector.format` like every other problem of a job.
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::OnceLock;

use arrow::datatypes::SchemaRef;
use freshet_job::{
    Catalog, ConnectorInfo, ConnectorSpec, JobFormat, Problem, Problems, SourceSpec,
};

use crate::{SinkPlan, SourcePlan};

/// What a source connector is planned with.
pub struct SourceContext<'a> {
    /// The source's name in the job.
    pub name: &'a str,
    /// Its definition (declared schema, event time, watermarks).
    pub spec: &'a SourceSpec,
    /// Directory relative paths are resolved against.
    pub base: &'a Path,
    /// Largest batch to emit.
    pub batch_size: usize,
    /// The splits a plan assigned (files listed, partitions found when it was made); `None`
    /// when planning.
    pub splits: Option<&'a [String]>,
}

impl SourceContext<'_> {
    /// The declared fields, in order; a source of kind `kind` that reads them refuses an
    /// empty schema, suggesting `example`.
    pub fn fields(
        &self,
        kind: &str,
        example: &str,
    ) -> Result<Vec<(String, freshet_job::FieldType)>, Problems> {
        if self.spec.schema.is_empty() {
            return Err(Problems(vec![
                Problem::new(
                    format!("sources.{}.schema", self.name),
                    format!("a {kind} source needs a schema"),
                )
                .hint(format!("list the fields, e.g. schema: {example}")),
            ]));
        }
        Ok(self
            .spec
            .schema
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect())
    }

    /// A problem with `field` of the source (`schema`, `event_time`, `connector.path`).
    pub fn problem(&self, field: &str, message: impl Into<String>) -> Problems {
        Problems(vec![Problem::new(
            format!("sources.{}.{field}", self.name),
            message,
        )])
    }
}

/// What a sink connector is planned with.
pub struct SinkContext<'a> {
    /// The sink's name in the job.
    pub name: &'a str,
    /// The field path of its connector, for problems (`sinks.out.connector`).
    pub path: &'a str,
    /// The schema of the stream it writes.
    pub input: &'a SchemaRef,
    /// The columns identifying a row when the stream is an upsert stream.
    pub upsert_key: Option<&'a [String]>,
    /// Directory relative paths are resolved against.
    pub base: &'a Path,
}

impl SinkContext<'_> {
    /// A problem with `field` of the connector (`key[0]`, `delete_when`).
    pub fn problem(&self, field: &str, message: impl Into<String>) -> Problems {
        Problems(vec![Problem::new(
            format!("{}.{field}", self.path),
            message,
        )])
    }
}

/// A kind of source.
pub trait SourceConnector: Send + Sync + 'static {
    /// Its settings as a job writes them (beside `type`).
    type Config: DeserializeOwned + JsonSchema;
    /// The `type` a job names it by.
    fn kind(&self) -> &'static str;
    /// Checks the settings against the source's definition and prepares its factory.
    fn plan(&self, ctx: &SourceContext<'_>, config: Self::Config) -> Result<SourcePlan, Problems>;
}

/// A kind of sink.
pub trait SinkConnector: Send + Sync + 'static {
    /// Its settings as a job writes them (beside `type`).
    type Config: DeserializeOwned + JsonSchema;
    /// The `type` a job names it by.
    fn kind(&self) -> &'static str;
    /// Whether it writes one ordered destination, and so runs at parallelism 1.
    fn single_writer(&self) -> bool {
        false
    }
    /// Checks the settings against the stream it writes and prepares its factory.
    fn plan(&self, ctx: &SinkContext<'_>, config: Self::Config) -> Result<SinkPlan, Problems>;
}

/// Settings decoded into a connector's configuration; problems name the field under `path`.
fn decode<C: DeserializeOwned>(config: &Map<String, Value>, path: &str) -> Result<C, Problems> {
    serde_path_to_error::deserialize(Value::Object(config.clone())).map_err(|e| {
        let field = e.path().to_string();
        let at = if field == "." {
            path.to_string()
        } else {
            format!("{path}.{field}")
        };
        let msg = e.into_inner().to_string();
        let problem = match msg.strip_prefix("unknown field ") {
            Some(rest) => Problem::new(at, format!("unknown field {rest}"))
                .hint("check the spelling against `freshet schema`"),
            None => Problem::new(at, msg),
        };
        Problems(vec![problem])
    })
}

fn info<C: JsonSchema>(kind: &str) -> ConnectorInfo {
    ConnectorInfo {
        kind: kind.to_string(),
        schema: serde_json::to_value(schemars::schema_for!(C)).unwrap_or(Value::Null),
    }
}

/// A source connector with its configuration type erased.
trait AnySource: Send + Sync {
    fn kind(&self) -> &'static str;
    fn info(&self) -> ConnectorInfo;
    fn plan(
        &self,
        ctx: &SourceContext<'_>,
        config: &Map<String, Value>,
    ) -> Result<SourcePlan, Problems>;
}

impl<T: SourceConnector> AnySource for T {
    fn kind(&self) -> &'static str {
        SourceConnector::kind(self)
    }
    fn info(&self) -> ConnectorInfo {
        info::<T::Config>(SourceConnector::kind(self))
    }
    fn plan(
        &self,
        ctx: &SourceContext<'_>,
        config: &Map<String, Value>,
    ) -> Result<SourcePlan, Problems> {
        let c = decode(config, &format!("sources.{}.connector", ctx.name))?;
        SourceConnector::plan(self, ctx, c)
    }
}

/// A sink connector with its configuration type erased.
trait AnySink: Send + Sync {
    fn kind(&self) -> &'static str;
    fn info(&self) -> ConnectorInfo;
    fn single_writer(&self) -> bool;
    fn plan(
        &self,
        ctx: &SinkContext<'_>,
        config: &Map<String, Value>,
    ) -> Result<SinkPlan, Problems>;
}

impl<T: SinkConnector> AnySink for T {
    fn kind(&self) -> &'static str {
        SinkConnector::kind(self)
    }
    fn info(&self) -> ConnectorInfo {
        info::<T::Config>(SinkConnector::kind(self))
    }
    fn single_writer(&self) -> bool {
        SinkConnector::single_writer(self)
    }
    fn plan(
        &self,
        ctx: &SinkContext<'_>,
        config: &Map<String, Value>,
    ) -> Result<SinkPlan, Problems> {
        let c = decode(config, ctx.path)?;
        SinkConnector::plan(self, ctx, c)
    }
}

/// The connectors a build has.
#[derive(Default)]
pub struct Registry {
    sources: Vec<Box<dyn AnySource>>,
    sinks: Vec<Box<dyn AnySink>>,
}

impl Registry {
    /// The connectors that come with Freshet.
    pub fn builtin() -> Registry {
        let mut r = Registry::default();
        r.add_source(crate::file_source::FileConnector);
        r.add_source(crate::generator::GeneratorConnector);
        r.add_source(crate::nexmark::NexmarkConnector);
        r.add_source(crate::kafka::source::KafkaSourceConnector);
        r.add_sink(crate::sinks::FileSinkConnector);
        r.add_sink(crate::sinks::TableConnector);
        r.add_sink(crate::sinks::StdoutConnector);
        r.add_sink(crate::sinks::BlackholeConnector);
        r.add_sink(crate::kafka::sink::KafkaSinkConnector);
        r
    }

    /// Adds a source connector (replacing one of the same `type`).
    pub fn add_source(&mut self, c: impl SourceConnector) {
        self.sources.retain(|s| s.kind() != c.kind());
        self.sources.push(Box::new(c));
    }

    /// Adds a sink connector (replacing one of the same `type`).
    pub fn add_sink(&mut self, c: impl SinkConnector) {
        self.sinks.retain(|s| s.kind() != c.kind());
        self.sinks.push(Box::new(c));
    }

    /// Every connector's schema, for the job format.
    pub fn catalog(&self) -> Catalog {
        Catalog {
            sources: self.sources.iter().map(|s| s.info()).collect(),
            sinks: self.sinks.iter().map(|s| s.info()).collect(),
        }
    }

    fn unknown(kinds: Vec<&str>, path: String, kind: &str) -> Problems {
        Problems(vec![
            Problem::new(path, format!("unknown connector type '{kind}'"))
                .hint(format!("one of: {}", kinds.join(", "))),
        ])
    }

    /// Plans a source with the connector its definition names.
    pub fn plan_source(&self, ctx: &SourceContext<'_>) -> Result<SourcePlan, Problems> {
        let c: &ConnectorSpec = &ctx.spec.connector;
        match self.sources.iter().find(|s| s.kind() == c.kind) {
            Some(s) => s.plan(ctx, &c.config),
            None => Err(Self::unknown(
                self.sources.iter().map(|s| s.kind()).collect(),
                format!("sources.{}.connector.type", ctx.name),
                &c.kind,
            )),
        }
    }

    /// Plans a sink with the connector `connector` names.
    pub fn plan_sink(
        &self,
        ctx: &SinkContext<'_>,
        connector: &ConnectorSpec,
    ) -> Result<SinkPlan, Problems> {
        match self.sinks.iter().find(|s| s.kind() == connector.kind) {
            Some(s) => s.plan(ctx, &connector.config),
            None => Err(Self::unknown(
                self.sinks.iter().map(|s| s.kind()).collect(),
                format!("{}.type", ctx.path),
                &connector.kind,
            )),
        }
    }

    /// Whether the sink connector `kind` writes one ordered destination (parallelism 1).
    pub fn single_writer(&self, kind: &str) -> bool {
        self.sinks
            .iter()
            .any(|s| s.kind() == kind && s.single_writer())
    }
}

/// The registry of the connectors that come with Freshet.
pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::builtin)
}

/// The job format with the registry's connectors: what every part of Freshet parses jobs with.
pub fn job_format() -> &'static JobFormat {
    static F: OnceLock<JobFormat> = OnceLock::new();
    F.get_or_init(|| {
        JobFormat::new(&registry().catalog())
            .unwrap_or_else(|e| panic!("the built-in connectors' schemas do not fit: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_job::LoadError;

    fn problems(text: &str, format: &JobFormat) -> Vec<String> {
        match format.parse(text, "job.yaml", &[]) {
            Err(LoadError::Invalid(p)) => {
                p.0.iter()
                    .map(|p| format!("{}: {}", p.path, p.message))
                    .collect()
            }
            other => panic!("not refused with problems: {other:?}"),
        }
    }

    /// The job format knows every registered connector's fields: a wrong one is found with
    /// the job's other problems, each with its full path.
    #[test]
    fn connector_fields_are_checked_with_the_rest_of_the_job() {
        let got = problems(
            r#"
version: 1
name: t
sources:
  s:
    connector: {type: file, path: in.jsonl, format: xml, folow: true}
    schema: {a: int}
    watermark: {max_out_of_orderness: soon}
  g:
    connector: {type: generater, fields: {a: seq}}
sinks:
  out:
    input: s
    connector: {type: blackhole, checksums: a}
"#,
            job_format(),
        );
        let want = [
            "sources.s.connector.format: 'xml' is not one of",
            "sources.s.connector.folow: unknown field",
            "sources.s.watermark.max_out_of_orderness: 'soon' is not a duration",
            "sources.g.connector.type: 'generater' is not one of: 'file', 'generator', 'nexmark'",
            "sinks.out.connector.checksums: expected a list, found a string",
        ];
        for w in want {
            assert!(got.iter().any(|g| g.starts_with(w)), "no '{w}' in {got:#?}");
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");
        let schema = job_format().schema();
        let sinks = schema["$defs"]["SinkConnector"]["oneOf"]
            .as_array()
            .unwrap();
        let kinds: Vec<&str> = sinks
            .iter()
            .map(|s| s["properties"]["type"]["const"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["file", "table", "stdout", "blackhole", "kafka"]);
        assert!(
            schema["$defs"]["FileFormat"].is_object(),
            "a connector's own definitions"
        );
    }

    /// Settings that reach a connector without the schema check (a plan, a definition built in
    /// code) are decoded with the field's path.
    #[test]
    fn typed_settings_name_the_field() {
        let spec: SourceSpec = serde_json::from_value(serde_json::json!({
            "connector": {"type": "file", "path": "x", "format": "xml"},
            "schema": {"a": "int"}
        }))
        .unwrap();
        let ctx = SourceContext {
            name: "s",
            spec: &spec,
            base: Path::new("/"),
            batch_size: 8,
            splits: None,
        };
        let err = registry().plan_source(&ctx).err().unwrap().0[0].to_string();
        assert!(
            err.starts_with("sources.s.connector.format: unknown variant `xml`"),
            "{err}"
        );
        let mut other = spec.clone();
        other.connector.kind = "kafka2".into();
        let ctx = SourceContext {
            spec: &other,
            ..ctx
        };
        let err = registry().plan_source(&ctx).err().unwrap().0[0].to_string();
        assert!(
            err.contains("sources.s.connector.type: unknown connector type 'kafka2'"),
            "{err}"
        );
        assert!(err.contains("one of: file, generator, nexmark"), "{err}");
    }

    /// A file source without a schema is refused when planned, naming the field.
    #[test]
    fn a_file_source_needs_a_schema() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.jsonl"), "").unwrap();
        let spec: SourceSpec = serde_json::from_value(serde_json::json!({
            "connector": {"type": "file", "path": "x.jsonl", "format": "jsonl"}
        }))
        .unwrap();
        let ctx = SourceContext {
            name: "s",
            spec: &spec,
            base: dir.path(),
            batch_size: 8,
            splits: None,
        };
        let err = registry().plan_source(&ctx).err().unwrap().0[0].to_string();
        assert!(
            err.starts_with("sources.s.schema: a file source needs a schema"),
            "{err}"
        );
    }

    /// A connector added to a registry is a connector like the built-in ones: the job format
    /// made from the registry takes (and checks) its settings, and planning builds it.
    #[test]
    fn a_registered_connector_joins_the_job_format() {
        #[derive(serde::Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        struct Counting {
            /// Rows.
            upto: u64,
        }
        struct CountingConnector;
        impl SourceConnector for CountingConnector {
            type Config = Counting;
            fn kind(&self) -> &'static str {
                "counting"
            }
            fn plan(&self, ctx: &SourceContext<'_>, c: Counting) -> Result<SourcePlan, Problems> {
                let fields = indexmap::IndexMap::from([("n".to_string(), "seq".to_string())]);
                let generator = crate::generator::GeneratorSettings {
                    count: Some(c.upto),
                    rows_per_second: None,
                    fields,
                    ingestion_time: None,
                };
                SourceConnector::plan(&crate::generator::GeneratorConnector, ctx, generator)
            }
        }
        let mut r = Registry::builtin();
        r.add_source(CountingConnector);
        let format = JobFormat::new(&r.catalog()).unwrap();
        let job = "version: 1\nname: t\nsources:\n  c: {connector: {type: counting, upto: 5}}\nsinks:\n  o: {input: c, connector: {type: blackhole}}\n";
        let spec = format.parse(job, "job.yaml", &[]).unwrap();
        let bad = job.replace("upto: 5", "upto: -1");
        assert!(
            problems(&bad, &format)[0].starts_with("sources.c.connector.upto"),
            "{:?}",
            problems(&bad, &format)
        );
        // the built-in format does not know it
        assert!(problems(job, job_format())[0].contains("'counting' is not one of"));
        let ctx = SourceContext {
            name: "c",
            spec: &spec.sources["c"],
            base: Path::new("/"),
            batch_size: 8,
            splits: None,
        };
        let plan = r.plan_source(&ctx).unwrap();
        assert!(plan.bounded);
        assert_eq!(plan.outputs[0].field(0).name(), "n");
    }
}

//! Reading a job file: YAML, then `--set` overrides, then the structure against the job's JSON
//! Schema (every problem at once), then typed fields, then validation.
//!
//! Overrides are applied to the YAML tree before it is typed, so `--set` can change any field
//! (`--set sources.clicks.connector.path=/data/clicks.jsonl`, `--set parallelism=4`). The value is
//! read as YAML, so numbers, booleans and lists work (`--set transforms.w.key_by=[a,b]`).
use serde_yaml::Value;
use std::path::Path;
use thiserror::Error;

use crate::{Catalog, JobSpec, Problems};

/// Why a job file could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read job file {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid YAML.
    #[error("{path}: not valid YAML: {message}")]
    Syntax {
        /// The file (or `<inline>`).
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A `--set` argument could not be applied.
    #[error("--set {arg}: {message}")]
    Override {
        /// The argument.
        arg: String,
        /// What is wrong.
        message: String,
    },
    /// A field has the wrong shape or type.
    #[error("{file}: {path}: {message}")]
    Field {
        /// The file.
        file: String,
        /// Dotted path of the field.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The job is well-formed but inconsistent.
    #[error("{0}")]
    Invalid(Problems),
}

/// The job format with the connectors a build knows: parses, checks and describes job
/// documents. Make one per process (compiling the schema takes a moment) and share it.
pub struct JobFormat {
    schema: serde_json::Value,
    validator: jsonschema::Validator,
}

impl JobFormat {
    /// The format with the connectors of `catalog`; the error says which connector's schema
    /// does not fit.
    pub fn new(catalog: &Catalog) -> Result<JobFormat, String> {
        let mut schema = serde_json::to_value(schemars::schema_for!(JobSpec))
            .map_err(|e| format!("the job schema: {e}"))?;
        catalog.patch(&mut schema)?;
        let validator = crate::structure::validator(&schema)?;
        Ok(JobFormat { schema, validator })
    }

    /// The format without connector knowledge: a connector is any `{type: …}`, checked only
    /// when a job is planned. For tests of the job format itself.
    pub fn generic() -> JobFormat {
        JobFormat::new(&Catalog::default()).expect("the bare job schema compiles")
    }

    /// The job's JSON Schema, connectors included.
    pub fn schema(&self) -> &serde_json::Value {
        &self.schema
    }

    /// Loads, overrides and validates a job file.
    pub fn load(&self, path: &Path, overrides: &[String]) -> Result<JobSpec, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.display().to_string(),
            source,
        })?;
        self.parse(&text, &path.display().to_string(), overrides)
    }

    /// Parses, overrides and validates a job document.
    pub fn parse(
        &self,
        text: &str,
        origin: &str,
        overrides: &[String],
    ) -> Result<JobSpec, LoadError> {
        let mut tree: Value = serde_yaml::from_str(text).map_err(|e| LoadError::Syntax {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        for arg in overrides {
            apply_override(&mut tree, arg)?;
        }
        // every structural problem at once, each with its full path; what typing finds after
        // that is what the schema cannot say
        let json = serde_json::to_value(&tree).map_err(|e| LoadError::Syntax {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let problems = crate::structure::check(&self.validator, &json);
        if !problems.is_empty() {
            return Err(LoadError::Invalid(problems));
        }
        let spec: JobSpec = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            LoadError::Field {
                file: origin.to_string(),
                path: if path == "." {
                    "(top level)".into()
                } else {
                    path
                },
                message: explain(&e.into_inner().to_string()),
            }
        })?;
        crate::validate::validate(&spec).map_err(LoadError::Invalid)?;
        Ok(spec)
    }
}

fn explain(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        return format!("unknown field {rest}; check the spelling against `freshet schema`");
    }
    if msg.starts_with("missing field") {
        return format!("{msg}; it is required here");
    }
    msg.to_string()
}

/// Applies one `path=value` override to a YAML tree.
pub fn apply_override(tree: &mut Value, arg: &str) -> Result<(), LoadError> {
    let fail = |m: &str| LoadError::Override {
        arg: arg.to_string(),
        message: m.to_string(),
    };
    let (path, raw) = arg
        .split_once('=')
        .ok_or_else(|| fail("expected path.to.field=value"))?;
    let value: Value =
        serde_yaml::from_str(raw).map_err(|e| fail(&format!("value is not valid YAML: {e}")))?;
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(fail("empty path segment"));
    }
    let mut node = tree;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        node = match node {
            Value::Mapping(m) => {
                let key = Value::String(part.to_string());
                if last {
                    m.insert(key, value);
                    return Ok(());
                }
                m.entry(key)
                    .or_insert_with(|| Value::Mapping(Default::default()))
            }
            Value::Sequence(s) => {
                let idx: usize = part
                    .parse()
                    .map_err(|_| fail(&format!("'{part}' indexes a list; use a number")))?;
                let len = s.len();
                let slot = s.get_mut(idx).ok_or_else(|| {
                    fail(&format!("index {idx} is past the end of a list of {len}"))
                })?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            Value::Null => {
                *node = Value::Mapping(Default::default());
                let Value::Mapping(m) = node else {
                    unreachable!("just set")
                };
                let key = Value::String(part.to_string());
                if last {
                    m.insert(key, value);
                    return Ok(());
                }
                m.entry(key)
                    .or_insert_with(|| Value::Mapping(Default::default()))
            }
            _ => {
                return Err(fail(&format!(
                    "'{}' is not a mapping",
                    parts[..i].join(".")
                )));
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_job;

    const JOB: &str = r#"
version: 1
name: t
sources:
  s:
    connector: {type: file, path: in.jsonl, format: jsonl}
    schema: {a: int}
sinks:
  out:
    input: s
    connector: {type: file, path: out.jsonl}
"#;

    #[test]
    fn overrides_reach_any_field() {
        let spec = parse_job(
            JOB,
            "job.yaml",
            &[
                "sources.s.connector.path=/data/x.jsonl".into(),
                "parallelism=4".into(),
                "sinks.out.connector.path=/tmp/o.jsonl".into(),
            ],
        )
        .unwrap();
        assert_eq!(spec.parallelism, 4);
        assert_eq!(
            spec.sinks["out"].connector.text("path"),
            Some("/tmp/o.jsonl")
        );
        assert_eq!(spec.sources["s"].connector.kind, "file");
        assert_eq!(
            spec.sources["s"].connector.text("path"),
            Some("/data/x.jsonl")
        );
    }

    #[test]
    fn field_errors_name_the_path() {
        let bad = JOB.replace("schema: {a: int}", "schema: {a: int}\n    shema: {}");
        let err = parse_job(&bad, "job.yaml", &[]).unwrap_err().to_string();
        assert!(err.contains("sources.s") && err.contains("shema"), "{err}");
    }

    #[test]
    fn every_structural_problem_is_listed_with_its_full_path() {
        let bad = r#"
version: 1
name: t
max_parallelism: many
sources:
  s:
    connector: {type: file, path: in.jsonl, format: xml}
    schema: {a: int}
    watermark: {max_out_of_orderness: soon}
    colour: red
transforms:
  w:
    type: window
    input: s
    key_by: [a]
    window: {type: tumbling, size: five minutes}
    aggregates: [count(*) AS n]
  j: {type: join, input: s}
sinks:
  out:
    connector: {type: file, path: out.jsonl}
    colour: blue
"#;
        let Err(LoadError::Invalid(problems)) = parse_job(bad, "job.yaml", &[]) else {
            panic!("not refused with problems");
        };
        let got: Vec<String> = problems
            .0
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        // (the connector's own fields are the connector's to check: the generic format takes
        // any; see the registry's tests for them)
        let want = [
            "max_parallelism: expected an integer, found a string",
            "sources.s.colour: unknown field",
            "sources.s.watermark.max_out_of_orderness: 'soon' is not a duration",
            "transforms.w.window.size: 'five minutes' is not a duration",
            "transforms.j.type: 'join' is not one of",
            "sinks.out.input: missing",
            "sinks.out.colour: unknown field",
        ];
        for w in want {
            assert!(got.iter().any(|g| g.starts_with(w)), "no '{w}' in {got:#?}");
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");
    }

    #[test]
    fn bad_override_is_explained() {
        let err = parse_job(JOB, "job.yaml", &["name".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("path.to.field=value"), "{err}");
        let err = parse_job(JOB, "job.yaml", &["name.x=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a mapping"), "{err}");
    }
}

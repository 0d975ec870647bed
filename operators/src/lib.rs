//! Freshet's operators and the SQL expressions they are configured with.
//!
//! - [`expr`]: SQL expressions compiled to Arrow kernels.
//! - [`stateless`]: filter, project, identity.
//! - [`window`]: tumbling, sliding and session windows with aggregates and allowed lateness.
//! - [`dedup`]: deduplication (first per key within a TTL, or newest per key by an order column).
//! - [`join`]: event-time interval join with an unmatched-rows output.
//! - [`pattern`]: "N matching records per key within T".
//! - [`values`], [`json`], [`dead_letter`]: shared helpers for state values, JSON rendering and the
//!   dead-letter record format.
//!
//! [`plan_transform`] turns a transform of the job definition into a [`TransformPlan`]: its output
//! schemas (type-checked against its inputs, with problems that name the field) and a factory
//! that creates one operator instance per subtask. All stateful operators keep their state in
//! `freshet_engine::state`, and say in their module documentation what they keep and when it is
//! cleared.
#![warn(missing_docs)]

pub mod dead_letter;
pub mod dedup;
pub mod expr;
pub mod join;
pub mod json;
pub mod pattern;
pub mod stateless;
pub mod values;
pub mod window;

#[cfg(test)]
pub(crate) mod testing;

use arrow::datatypes::SchemaRef;
use std::sync::Arc;

use freshet_engine::operator::{Operator, SubtaskInfo};
use freshet_job::{DedupKeep, Problem, Problems, TransformSpec, WindowSpec};

/// Creates the operator of one subtask.
pub type OperatorFactory = Arc<dyn Fn(&SubtaskInfo) -> Box<dyn Operator> + Send + Sync>;

/// How a transform wants an input partitioned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InputKeying {
    /// Any partitioning (forward when possible).
    Any,
    /// Hash by these key columns into key groups.
    Keyed(Vec<String>),
    /// Everything to one subtask (a global window).
    Global,
    /// Round-robin over all subtasks.
    Rebalance,
    /// Every record to every subtask.
    Broadcast,
}

/// A type-checked transform, ready to be instantiated per subtask.
pub struct TransformPlan {
    /// Output schemas: port 0 is the main output, then the side outputs in the order
    /// `freshet_job::validate::side_outputs_of` lists them.
    pub outputs: Vec<SchemaRef>,
    /// Partitioning wanted per input.
    pub inputs: Vec<InputKeying>,
    /// The columns that identify a row of the main output when it is an upsert stream.
    pub upsert_key: Option<Vec<String>>,
    /// Creates the operator.
    pub factory: OperatorFactory,
}

/// Resolves key columns for an operator; a problem names `field[i]`.
pub(crate) fn resolve_keys(
    schema: &arrow::datatypes::Schema,
    names: &[String],
    field: &str,
) -> Result<freshet_engine::keys::KeyColumns, (String, String)> {
    freshet_engine::keys::KeyColumns::resolve(schema, names)
        .map_err(|(i, m)| (format!("{field}[{i}]"), m))
}

fn at(path: &str, field: impl std::fmt::Display, e: impl std::fmt::Display) -> Problems {
    Problems(vec![Problem::new(format!("{path}.{field}"), e.to_string())])
}

/// Type-checks a transform against its input schemas (one per input, in the order of
/// `TransformSpec::inputs`).
pub fn plan_transform(
    name: &str,
    spec: &TransformSpec,
    inputs: &[SchemaRef],
) -> Result<TransformPlan, Problems> {
    let path = format!("transforms.{name}");
    let input = inputs[0].clone();
    Ok(match spec {
        TransformSpec::Filter { predicate, .. } => {
            let e = expr::Expr::compile(predicate, &input).map_err(|e| at(&path, "where", e))?;
            if e.data_type() != &arrow::datatypes::DataType::Boolean {
                return Err(at(
                    &path,
                    "where",
                    format!(
                        "must be a BOOLEAN condition, got {}",
                        expr::type_name(e.data_type())
                    ),
                ));
            }
            TransformPlan {
                outputs: vec![input],
                inputs: vec![InputKeying::Any],
                upsert_key: None,
                factory: Arc::new(move |_| Box::new(stateless::Filter::new(e.clone()))),
            }
        }
        TransformSpec::Project { select, .. } => {
            let p = stateless::Projection::compile(select, &input)
                .map_err(|(i, e)| at(&path, format!("select[{i}]"), e))?;
            TransformPlan {
                outputs: vec![p.schema()],
                inputs: vec![InputKeying::Any],
                upsert_key: None,
                factory: Arc::new(move |_| Box::new(stateless::Project::new(p.clone()))),
            }
        }
        TransformSpec::KeyBy { key, .. } => {
            for (i, k) in key.iter().enumerate() {
                if input.index_of(k).is_err() {
                    return Err(at(
                        &path,
                        format!("key[{i}]"),
                        format!("unknown column '{k}'"),
                    ));
                }
            }
            TransformPlan {
                outputs: vec![input],
                inputs: vec![InputKeying::Keyed(key.clone())],
                upsert_key: None,
                factory: Arc::new(|_| Box::new(stateless::Identity)),
            }
        }
        TransformSpec::Rebalance { .. } | TransformSpec::Broadcast { .. } => TransformPlan {
            outputs: vec![input],
            inputs: vec![if matches!(spec, TransformSpec::Broadcast { .. }) {
                InputKeying::Broadcast
            } else {
                InputKeying::Rebalance
            }],
            upsert_key: None,
            factory: Arc::new(|_| Box::new(stateless::Identity)),
        },
        TransformSpec::Window(w) => {
            let kind = match w.window {
                WindowSpec::Tumbling { size } => window::WindowKind::Sliced {
                    size: size.millis(),
                    slide: size.millis(),
                },
                WindowSpec::Sliding { size, slide } => window::WindowKind::Sliced {
                    size: size.millis(),
                    slide: slide.millis(),
                },
                WindowSpec::Session { gap } => window::WindowKind::Session { gap: gap.millis() },
            };
            let plan = window::WindowPlan::compile(
                &input,
                &w.key_by,
                kind,
                w.allowed_lateness.millis(),
                &w.aggregates,
                w.having.as_deref(),
            )
            .map_err(|e| match e {
                window::WindowError::Key(i, m) => at(&path, format!("key_by[{i}]"), m),
                window::WindowError::Aggregate(i, m) => at(&path, format!("aggregates[{i}]"), m),
                window::WindowError::Having(m) => at(&path, "having", m),
            })?;
            let mut upsert_key = w.key_by.clone();
            upsert_key.extend(["window_start".to_string(), "window_end".to_string()]);
            TransformPlan {
                outputs: vec![plan.output_schema(), input],
                inputs: vec![if w.key_by.is_empty() {
                    InputKeying::Global
                } else {
                    InputKeying::Keyed(w.key_by.clone())
                }],
                upsert_key: Some(upsert_key),
                factory: Arc::new(move |_| Box::new(plan.instantiate())),
            }
        }
        TransformSpec::Deduplicate(d) => {
            let plan = dedup::DedupPlan::compile(
                &input,
                &d.key,
                d.keep,
                d.order_by.as_deref(),
                d.ttl.map(|t| t.0),
            )
            .map_err(|(field, m)| at(&path, field, m))?;
            TransformPlan {
                outputs: vec![input, plan.input_schema()],
                inputs: vec![InputKeying::Keyed(d.key.clone())],
                upsert_key: (d.keep == DedupKeep::Latest).then(|| d.key.clone()),
                factory: Arc::new(move |_| Box::new(plan.instantiate())),
            }
        }
        TransformSpec::IntervalJoin(j) => {
            let left_name = j.left.split('.').next().unwrap_or(&j.left).to_string();
            let right_name = j.right.split('.').next().unwrap_or(&j.right).to_string();
            let plan = join::JoinPlan::compile(join::JoinConfig {
                name: name.to_string(),
                left_name,
                right_name,
                left: &inputs[0],
                right: &inputs[1],
                left_key: &j.left_key,
                right_key: &j.right_key,
                lower: j.lower_bound.millis(),
                upper: j.upper_bound.millis(),
                predicate: j.predicate.as_deref(),
                select: &j.select,
            })
            .map_err(|(field, m)| at(&path, field, m))?;
            TransformPlan {
                outputs: vec![
                    plan.output_schema(),
                    dead_letter::schema(),
                    dead_letter::schema(),
                ],
                inputs: vec![
                    InputKeying::Keyed(j.left_key.clone()),
                    InputKeying::Keyed(j.right_key.clone()),
                ],
                upsert_key: None,
                factory: Arc::new(move |_| Box::new(plan.instantiate())),
            }
        }
        TransformSpec::Pattern(p) => {
            let plan = pattern::PatternPlan::compile(
                &input,
                &p.key_by,
                &p.predicate,
                p.count,
                p.within.millis(),
                p.ttl.map(|t| t.millis()),
            )
            .map_err(|(field, m)| at(&path, field, m))?;
            TransformPlan {
                outputs: vec![plan.output_schema(), input],
                inputs: vec![InputKeying::Keyed(p.key_by.clone())],
                upsert_key: None,
                factory: Arc::new(move |_| Box::new(plan.instantiate())),
            }
        }
    })
}

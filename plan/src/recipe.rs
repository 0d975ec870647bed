//! Recipes: how a TaskManager builds a planned node's source or operator. A recipe holds the part
//! of the definition the node came from and what planning decided for it (the splits of a
//! source, the key of an upsert stream); building checks the result against the schemas the
//! JobManager planned, so a TaskManager of another version cannot silently run another graph.
use arrow::datatypes::SchemaRef;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

use freshet_connectors::{SourceFactory, dead_letter_sink, plan_sink, plan_source};
use freshet_job::{ConnectorSpec, Problems, SourceSpec, TransformSpec};
use freshet_operators::{OperatorFactory, dead_letter, plan_transform};

use crate::graph::Plan;

/// How to build one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Recipe {
    /// A source of the definition.
    Source {
        /// Its name in the definition.
        name: String,
        /// Its definition.
        spec: SourceSpec,
        /// The splits found when planning (a file source's files, a Kafka source's partitions),
        /// `None` for sources whose subtasks divide the work by their index.
        splits: Option<Vec<String>>,
    },
    /// A transform of the definition.
    Transform {
        /// Its name in the definition.
        name: String,
        /// Its definition.
        spec: TransformSpec,
    },
    /// A sink of the definition.
    Sink {
        /// Its name in the definition.
        name: String,
        /// Its connector.
        connector: ConnectorSpec,
        /// The columns identifying a row when the input is an upsert stream.
        upsert_key: Option<Vec<String>>,
    },
    /// Turns the rows of a side output nobody reads into dead-letter records.
    ToDeadLetter {
        /// The node whose output it is.
        origin: String,
        /// Why the rows are dead letters.
        reason: String,
    },
    /// The job's dead-letter sink.
    DeadLetterSink {
        /// The job's `dead_letter` connector (`None`: the default file beside the job).
        connector: Option<ConnectorSpec>,
    },
}

/// What builds a node's instance in each subtask.
#[derive(Clone)]
pub enum Factory {
    /// A source.
    Source(SourceFactory),
    /// An operator or sink.
    Operator(OperatorFactory),
}

impl Recipe {
    /// Builds the node's factory against its input schemas and returns it with the node's
    /// output schemas (none for sinks).
    pub fn build(
        &self,
        inputs: &[SchemaRef],
        base: &Path,
        batch_size: usize,
    ) -> Result<(Factory, Vec<SchemaRef>), Problems> {
        Ok(match self {
            Recipe::Source { name, spec, splits } => {
                let p = plan_source(name, spec, base, batch_size, splits.as_deref())?;
                (Factory::Source(p.factory), p.outputs)
            }
            Recipe::Transform { name, spec } => {
                let p = plan_transform(name, spec, inputs)?;
                (Factory::Operator(p.factory), p.outputs)
            }
            Recipe::Sink {
                name,
                connector,
                upsert_key,
            } => {
                let p = plan_sink(
                    &format!("sinks.{name}.connector"),
                    name,
                    connector,
                    &inputs[0],
                    upsert_key.as_deref(),
                    base,
                )?;
                (Factory::Operator(p.factory), Vec::new())
            }
            Recipe::ToDeadLetter { origin, reason } => {
                let (origin, reason) = (origin.clone(), reason.clone());
                let factory: OperatorFactory = Arc::new(move |_| {
                    Box::new(dead_letter::ToDeadLetter::new(
                        origin.clone(),
                        reason.clone(),
                    ))
                });
                (Factory::Operator(factory), vec![dead_letter::schema()])
            }
            Recipe::DeadLetterSink { connector } => {
                let p = dead_letter_sink(connector.as_ref(), base)?;
                (Factory::Operator(p.factory), Vec::new())
            }
        })
    }
}

/// A source vertex whose connector finds splits while the job runs.
pub struct SourceSplits {
    /// The vertex (a source is the head of its chain).
    pub vertex: usize,
    /// Its subtasks.
    pub parallelism: u32,
    /// The splits the plan assigned (known already).
    pub planned: Vec<String>,
    /// What finds the others.
    pub enumerator: Arc<dyn freshet_connectors::SplitEnumerator>,
}

/// The split enumerators of a plan's source vertices, built from their recipes with the
/// planned splits (so nothing outside is asked now).
pub fn split_enumerators(plan: &Plan) -> Result<Vec<SourceSplits>, String> {
    let mut out = Vec::new();
    for (v, vertex) in plan.vertices.iter().enumerate() {
        let Some(Recipe::Source { name, spec, splits }) = plan.head_recipe(v) else {
            continue;
        };
        let p = plan_source(
            name,
            spec,
            &plan.base_dir,
            plan.spec.pipeline.batch_size,
            splits.as_deref(),
        )
        .map_err(|p| format!("building {name}: {p}"))?;
        if let Some(enumerator) = p.enumerator {
            out.push(SourceSplits {
                vertex: v,
                parallelism: vertex.parallelism,
                planned: splits.clone().unwrap_or_default(),
                enumerator,
            });
        }
    }
    Ok(out)
}

/// Builds the factories of vertex `vertex`'s nodes, in chain order. Each node must produce the
/// schemas the plan says it does; the error names the node and what differs.
pub fn instantiate(plan: &Plan, vertex: usize) -> Result<Vec<Factory>, String> {
    let v = plan
        .vertices
        .get(vertex)
        .ok_or_else(|| format!("the plan has no vertex {vertex}"))?;
    let mut factories = Vec::with_capacity(v.nodes.len());
    for &id in &v.nodes {
        let node = plan
            .nodes
            .get(id)
            .ok_or_else(|| format!("the plan has no node {id}"))?;
        let inputs = node
            .inputs
            .iter()
            .map(|i| {
                plan.nodes
                    .get(i.node)
                    .and_then(|n| n.outputs.get(i.port))
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "node {}: input {}.{} is not planned",
                            node.name, i.node, i.port
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (factory, outputs) = node
            .recipe
            .build(&inputs, &plan.base_dir, plan.spec.pipeline.batch_size)
            .map_err(|p| format!("building {}: {p}", node.name))?;
        if outputs != node.outputs {
            return Err(format!(
                "{} would produce {} here but the JobManager planned {}; the JobManager and this TaskManager run different versions or see different files",
                node.name,
                describe(&outputs),
                describe(&node.outputs)
            ));
        }
        factories.push(factory);
    }
    Ok(factories)
}

fn describe(schemas: &[SchemaRef]) -> String {
    let ports: Vec<String> = schemas
        .iter()
        .map(|s| {
            let cols: Vec<String> = s
                .fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect();
            format!("({})", cols.join(", "))
        })
        .collect();
    if ports.is_empty() {
        "no output".into()
    } else {
        ports.join(" and ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::RecordBatch;
    use freshet_engine::metrics::SubtaskMetrics;
    use freshet_engine::operator::{OperatorContext, SourceOutput, SourceStatus, SubtaskInfo};

    fn job(dir: &Path, extra: &str) -> freshet_job::JobSpec {
        crate::planner::tests::job_at(dir, 2, extra)
    }

    const GRAPH: &str = r#"
transforms:
  p: {type: project, input: s, select: ["k", "v * 2 AS twice", "ts"]}
  w: {type: window, input: p, key_by: [k], window: {type: tumbling, size: 1m}, aggregates: ["count(*) AS n", "sum(twice) AS total"]}
sinks:
  out: {input: w, connector: {type: blackhole}}
"#;

    fn files(dir: &Path, names: &[&str]) {
        for (i, n) in names.iter().enumerate() {
            let line = format!("{{\"k\":\"a\",\"v\":{i},\"ts\":\"2026-01-01T00:00:00Z\"}}\n");
            std::fs::write(dir.join(n), line.repeat(3)).unwrap();
        }
    }

    /// The plan a JobManager ships builds on the other side as it was planned: every vertex,
    /// the same description, the same schemas.
    #[test]
    fn a_shipped_plan_builds_every_vertex() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path(), &["a.jsonl", "b.jsonl"]);
        let planned = crate::plan(&job(dir.path(), GRAPH), dir.path()).unwrap();
        let shipped = Plan::from_json(&planned.to_json()).unwrap();
        assert_eq!(shipped.explain(), planned.explain());
        assert!(shipped.vertices.len() >= 3, "{}", shipped.explain());
        for (a, b) in planned.nodes.iter().zip(&shipped.nodes) {
            assert_eq!(a.outputs, b.outputs, "{}", a.name);
        }
        for v in 0..shipped.vertices.len() {
            let f = instantiate(&shipped, v).unwrap();
            assert_eq!(f.len(), shipped.vertices[v].nodes.len());
            assert_eq!(
                matches!(f[0], Factory::Source(_)),
                shipped.is_source(v),
                "vertex {v}"
            );
        }
        assert!(
            Plan::from_json(b"{\"nodes\": 3}")
                .unwrap_err()
                .contains("physical plan")
        );
    }

    /// A TaskManager that would build another schema than the JobManager planned (another
    /// version, or other files) refuses the deployment and says which node differs.
    #[test]
    fn a_node_built_differently_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path(), &["a.jsonl"]);
        let mut plan = crate::plan(&job(dir.path(), GRAPH), dir.path()).unwrap();
        let p = plan.nodes.iter().position(|n| n.name == "p").unwrap();
        let Recipe::Transform { spec, .. } = &mut plan.nodes[p].recipe else {
            panic!("p is a transform");
        };
        let TransformSpec::Project { select, .. } = spec else {
            panic!("p projects");
        };
        select[1] = "v * 2.5 AS twice".into();
        let v = plan.vertex_of[p];
        let err = match instantiate(&plan, v) {
            Err(e) => e,
            Ok(_) => panic!("a node with another schema was built"),
        };
        assert!(err.starts_with("p would produce"), "{err}");
        assert!(err.contains("twice: Float64"), "{err}");
        assert!(err.contains("twice: Int64"), "{err}");
        assert!(err.contains("different versions"), "{err}");
    }

    struct Rows(usize);
    impl SourceOutput for Rows {
        fn emit_split(&mut self, _: &str, batch: RecordBatch) {
            self.0 += batch.num_rows();
        }
        fn emit_side(&mut self, _: usize, _: RecordBatch) {}
    }

    /// A file source reads the files the JobManager listed when it planned, not the ones its
    /// TaskManager would list later.
    #[test]
    fn a_file_source_reads_the_files_of_its_plan() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path(), &["a.jsonl", "b.jsonl"]);
        let plan = crate::plan(&job(dir.path(), GRAPH), dir.path()).unwrap();
        let s = plan.nodes.iter().position(|n| n.name == "s").unwrap();
        let Recipe::Source { splits, .. } = &plan.nodes[s].recipe else {
            panic!("s is a source");
        };
        let names: Vec<String> = splits
            .iter()
            .flatten()
            .map(|f| {
                std::path::Path::new(f)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["a.jsonl", "b.jsonl"]);
        files(dir.path(), &["c.jsonl"]);
        let shipped = Plan::from_json(&plan.to_json()).unwrap();
        let Factory::Source(factory) = &instantiate(&shipped, plan.vertex_of[s]).unwrap()[0] else {
            panic!("a source vertex");
        };
        let metrics = std::sync::Arc::new(SubtaskMetrics::default());
        let mut rows = Rows(0);
        for index in 0..2 {
            let info = SubtaskInfo {
                job: "t".into(),
                vertex: "s".into(),
                index,
                parallelism: 2,
                max_parallelism: 128,
            };
            let mut source = factory(&info).unwrap();
            let ctx = OperatorContext {
                subtask: &info,
                record_watermark: freshet_engine::Watermark(i64::MIN),
                current_watermark: freshet_engine::Watermark(i64::MIN),
                metrics: &metrics,
            };
            while !matches!(
                source.poll(&ctx, &mut rows).unwrap(),
                SourceStatus::Finished
            ) {}
        }
        assert_eq!(rows.0, 6, "3 records from each of the two planned files");
    }
}

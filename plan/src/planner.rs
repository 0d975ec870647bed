//! Planning: from a job definition to the graph the cluster runs.
//!
//! 1. **Logical graph.** Every source, transform and sink becomes a node; each node's output
//!    schemas are type-checked against its inputs (the operators and connectors do the checking
//!    and say which field is wrong). Side outputs nobody reads (bad source lines, late records,
//!    unmatched join rows) are routed to the job's dead-letter sink, through an adapter that turns
//!    rows into dead-letter records where needed, so nothing is dropped unseen.
//! 2. **Edges.** Each input of a node gets a partitioning: hash by key for keyed operators, all to
//!    one subtask for global windows, forward between equal parallelism, rebalance otherwise.
//! 3. **Chains.** A node joins its producer's chain (one thread, no channel) when the edge is a
//!    forward edge, the producer's main output feeds only it, and it has one input. Each chain is
//!    a **vertex** with one subtask per parallel instance.
//!
//! Only the JobManager plans. The splits a source has at planning time (a file source's files)
//! are recorded in its recipe, so every TaskManager reads the files the JobManager saw.
use arrow::datatypes::SchemaRef;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use freshet_connectors::{SourcePlan, dead_letter_sink, plan_sink, plan_source, registry};
use freshet_engine::partition::Partitioning;
use freshet_job::validate::{side_outputs_of, side_outputs_of_source};
use freshet_job::{JobSpec, Problem, Problems, TransformSpec};
use freshet_operators::{InputKeying, dead_letter, plan_transform};

use crate::graph::{Edge, Node, NodeId, NodeInput, NodeKind, Plan, Vertex};
use crate::recipe::Recipe;

struct Builder<'a> {
    job: &'a JobSpec,
    base: &'a Path,
    nodes: Vec<Node>,
    by_stream: HashMap<String, NodeId>,
    upsert: HashMap<NodeId, Vec<String>>,
    problems: Problems,
}

impl Builder<'_> {
    fn resolve(&self, stream: &str) -> Option<(NodeId, usize)> {
        let (base, port) = stream
            .split_once('.')
            .map_or((stream, None), |(b, p)| (b, Some(p)));
        let node = *self.by_stream.get(base)?;
        let port = match port {
            None => 0,
            Some(p) => {
                if self.job.sources.contains_key(base) {
                    side_outputs_of_source().iter().find(|s| s.0 == p)?.1
                } else {
                    side_outputs_of(self.job.transforms.get(base)?)
                        .iter()
                        .find(|s| s.0 == p)?
                        .1
                }
            }
        };
        Some((node, port))
    }

    fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }
}

/// Plans a validated job definition. Every problem found is reported.
pub fn plan(job: &JobSpec, base_dir: &Path) -> Result<Plan, Problems> {
    let mut b = Builder {
        job,
        base: base_dir,
        nodes: Vec::new(),
        by_stream: HashMap::new(),
        upsert: HashMap::new(),
        problems: Problems::default(),
    };

    for (name, s) in &job.sources {
        match plan_source(name, s, base_dir, job.pipeline.batch_size, None) {
            Ok(SourcePlan {
                outputs,
                watermarks,
                bounded,
                max_parallelism,
                splits,
                factory: _,
                enumerator: _,
            }) => {
                // a subtask without a split would only idle (and hold back nothing useful)
                let parallelism = s
                    .parallelism
                    .unwrap_or(job.parallelism)
                    .min(max_parallelism.unwrap_or(u32::MAX));
                let id = b.add(Node {
                    name: name.clone(),
                    kind: NodeKind::Source {
                        watermarks,
                        bounded,
                    },
                    recipe: Recipe::Source {
                        name: name.clone(),
                        spec: s.clone(),
                        splits,
                    },
                    parallelism,
                    inputs: Vec::new(),
                    outputs,
                    port_names: vec!["main".into(), "dead_letter".into()],
                    is_sink: false,
                });
                b.by_stream.insert(name.clone(), id);
            }
            Err(p) => b.problems.0.extend(p.0),
        }
    }

    // Transforms in dependency order (validation already refused cycles).
    let mut pending: Vec<(&String, &TransformSpec)> = job.transforms.iter().collect();
    while !pending.is_empty() {
        let before = pending.len();
        let mut next = Vec::new();
        for (name, t) in pending {
            let ready = t
                .inputs()
                .iter()
                .all(|(_, i)| b.by_stream.contains_key(i.split('.').next().unwrap_or(i)));
            if !ready {
                next.push((name, t));
                continue;
            }
            let mut inputs = Vec::new();
            for (_, i) in t.inputs() {
                match b.resolve(i) {
                    Some(x) => inputs.push(x),
                    None => b.problems.push(Problem::new(
                        format!("transforms.{name}"),
                        format!("cannot resolve input '{i}'"),
                    )),
                }
            }
            if inputs.len() != t.inputs().len() {
                continue;
            }
            let schemas: Vec<SchemaRef> = inputs
                .iter()
                .map(|(n, p)| b.nodes[*n].outputs[*p].clone())
                .collect();
            match plan_transform(name, t, &schemas) {
                Ok(tp) => {
                    let global = tp.inputs.contains(&InputKeying::Global);
                    let parallelism = if global {
                        1
                    } else {
                        t.parallelism().unwrap_or(job.parallelism)
                    };
                    let mut ports = vec!["main".to_string()];
                    ports.extend(side_outputs_of(t).iter().map(|s| s.0.to_string()));
                    let id = b.add(Node {
                        name: name.clone(),
                        kind: NodeKind::Operator,
                        recipe: Recipe::Transform {
                            name: name.clone(),
                            spec: t.clone(),
                        },
                        parallelism,
                        inputs: inputs
                            .iter()
                            .zip(tp.inputs)
                            .map(|((n, p), k)| NodeInput {
                                node: *n,
                                port: *p,
                                keying: k,
                            })
                            .collect(),
                        outputs: tp.outputs,
                        port_names: ports,
                        is_sink: false,
                    });
                    if let Some(k) = tp.upsert_key {
                        b.upsert.insert(id, k);
                    }
                    b.by_stream.insert(name.clone(), id);
                }
                Err(p) => {
                    b.problems.0.extend(p.0);
                    // keep going so that later problems are reported too; dependants are skipped
                }
            }
        }
        if next.len() == before {
            break; // inputs failed to plan: their problems are already listed
        }
        pending = next;
    }

    for (name, s) in &job.sinks {
        let Some((node, port)) = b.resolve(&s.input) else {
            continue;
        };
        let schema = b.nodes[node].outputs[port].clone();
        let upsert = if port == 0 {
            b.upsert.get(&node).cloned()
        } else {
            None
        };
        match plan_sink(
            &format!("sinks.{name}.connector"),
            name,
            &s.connector,
            &schema,
            upsert.as_deref(),
            base_dir,
        ) {
            Ok(_) => {
                let single = registry().single_writer(&s.connector.kind);
                if single && s.parallelism.is_some_and(|n| n > 1) {
                    b.problems.push(
                        Problem::new(
                            format!("sinks.{name}.parallelism"),
                            "this sink writes one destination in order and runs at parallelism 1",
                        )
                        .hint("remove parallelism"),
                    );
                }
                let parallelism = if single {
                    1
                } else {
                    s.parallelism.unwrap_or(job.parallelism)
                };
                b.add(Node {
                    name: format!("sink:{name}"),
                    kind: NodeKind::Operator,
                    recipe: Recipe::Sink {
                        name: name.clone(),
                        connector: s.connector.0.clone(),
                        upsert_key: upsert,
                    },
                    parallelism,
                    inputs: vec![NodeInput {
                        node,
                        port,
                        keying: InputKeying::Any,
                    }],
                    outputs: Vec::new(),
                    port_names: Vec::new(),
                    is_sink: true,
                });
            }
            Err(p) => b.problems.0.extend(p.0),
        }
    }
    if !b.problems.is_empty() {
        return Err(b.problems);
    }
    route_unread_side_outputs(&mut b)?;
    Ok(chain(job, base_dir, b.nodes))
}

/// Sends every side output nobody reads to the dead-letter sink.
fn route_unread_side_outputs(b: &mut Builder<'_>) -> Result<(), Problems> {
    let read: std::collections::HashSet<(NodeId, usize)> = b
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(|i| (i.node, i.port)))
        .collect();
    let mut unread = Vec::new();
    for (id, n) in b.nodes.iter().enumerate() {
        for port in 1..n.outputs.len() {
            if !read.contains(&(id, port)) {
                unread.push((id, port));
            }
        }
    }
    if unread.is_empty() {
        return Ok(());
    }
    // checked here, built by the TaskManager that runs it
    dead_letter_sink(b.job.dead_letter.as_deref(), b.base)?;
    let dl_schema = dead_letter::schema();
    let mut feeds = Vec::new();
    for (id, port) in unread {
        let n = &b.nodes[id];
        if n.outputs[port] == dl_schema {
            feeds.push((id, port));
        } else {
            let adapter = Node {
                name: format!("{}.{}", n.name, n.port_names[port]),
                kind: NodeKind::Operator,
                recipe: Recipe::ToDeadLetter {
                    origin: n.name.clone(),
                    reason: format!("{} output not routed by the job", n.port_names[port]),
                },
                parallelism: n.parallelism,
                inputs: vec![NodeInput {
                    node: id,
                    port,
                    keying: InputKeying::Any,
                }],
                outputs: vec![dl_schema.clone()],
                port_names: vec!["main".into()],
                is_sink: false,
            };
            let a = b.add(adapter);
            feeds.push((a, 0));
        }
    }
    b.nodes.push(Node {
        name: "sink:dead_letter".into(),
        kind: NodeKind::Operator,
        recipe: Recipe::DeadLetterSink {
            connector: b.job.dead_letter.as_ref().map(|c| c.0.clone()),
        },
        parallelism: 1,
        inputs: feeds
            .into_iter()
            .map(|(node, port)| NodeInput {
                node,
                port,
                keying: InputKeying::Any,
            })
            .collect(),
        outputs: Vec::new(),
        port_names: Vec::new(),
        is_sink: true,
    });
    Ok(())
}

fn partitioning(job: &JobSpec, from: &Node, to: &Node, keying: &InputKeying) -> Partitioning {
    match keying {
        InputKeying::Keyed(_) | InputKeying::Global
            if from.parallelism == 1 && to.parallelism == 1 =>
        {
            Partitioning::Forward
        }
        InputKeying::Keyed(k) => Partitioning::Hash {
            key_columns: k.clone(),
            max_parallelism: job.max_parallelism,
        },
        InputKeying::Global | InputKeying::Rebalance => Partitioning::Rebalance,
        InputKeying::Broadcast => Partitioning::Broadcast,
        InputKeying::Any if from.parallelism == to.parallelism => Partitioning::Forward,
        InputKeying::Any => Partitioning::Rebalance,
    }
}

fn chain(job: &JobSpec, base: &Path, nodes: Vec<Node>) -> Plan {
    let n = nodes.len();
    let mut consumers: HashMap<(NodeId, usize), Vec<NodeId>> = HashMap::new();
    for (id, node) in nodes.iter().enumerate() {
        for i in &node.inputs {
            consumers.entry((i.node, i.port)).or_default().push(id);
        }
    }
    // chained_to[b] = a when b runs in a's thread right after it
    let mut chained_to: Vec<Option<NodeId>> = vec![None; n];
    for (id, node) in nodes.iter().enumerate() {
        if node.inputs.len() != 1 {
            continue;
        }
        let input = &node.inputs[0];
        let from = &nodes[input.node];
        let forward = partitioning(job, from, node, &input.keying) == Partitioning::Forward;
        let sole = consumers
            .get(&(input.node, 0))
            .is_some_and(|c| c.len() == 1);
        if input.port == 0 && forward && sole && from.parallelism == node.parallelism {
            chained_to[id] = Some(input.node);
        }
    }
    let mut vertex_of = vec![usize::MAX; n];
    let mut vertices = Vec::new();
    for head in 0..n {
        if chained_to[head].is_some() {
            continue;
        }
        let mut members = vec![head];
        let mut cur = head;
        while let Some(next) = (0..n).find(|x| chained_to[*x] == Some(cur)) {
            members.push(next);
            cur = next;
        }
        let v = vertices.len();
        for m in &members {
            vertex_of[*m] = v;
        }
        vertices.push(Vertex {
            name: members
                .iter()
                .map(|m| nodes[*m].name.as_str())
                .collect::<Vec<_>>()
                .join(" -> "),
            parallelism: nodes[head].parallelism,
            nodes: members,
        });
    }
    let mut edges = Vec::new();
    for (id, node) in nodes.iter().enumerate() {
        if chained_to[id].is_some() {
            continue;
        }
        for (k, i) in node.inputs.iter().enumerate() {
            edges.push(Edge {
                from: (i.node, i.port),
                to: (id, k),
                from_vertex: vertex_of[i.node],
                to_vertex: vertex_of[id],
                partitioning: partitioning(job, &nodes[i.node], node, &i.keying),
                watermarks: !matches!(
                    node.recipe,
                    Recipe::DeadLetterSink { .. } | Recipe::ToDeadLetter { .. }
                ),
                share_batches: matches!(
                    node.recipe,
                    Recipe::Transform {
                        spec: TransformSpec::Window(_),
                        ..
                    }
                ),
            });
        }
    }
    Plan {
        spec: Arc::new(job.clone()),
        base_dir: base.to_path_buf(),
        nodes,
        vertices,
        edges,
        vertex_of,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A job at parallelism `parallelism` whose file source `s` reads `path`, with `extra`.
    pub(crate) fn job_at(path: &Path, parallelism: u32, extra: &str) -> JobSpec {
        let text = format!(
            r#"
version: 1
name: t
parallelism: {parallelism}
sources:
  s:
    connector: {{type: file, path: {}, format: jsonl}}
    schema: {{k: string, v: int, ts: timestamp}}
    event_time: ts
{extra}
"#,
            path.display()
        );
        freshet_connectors::job_format()
            .parse(&text, "t.yaml", &[])
            .unwrap()
    }

    fn job(extra: &str) -> JobSpec {
        let path = std::env::temp_dir().join("freshet-plan-test.jsonl");
        std::fs::write(&path, "").unwrap();
        job_at(&path, 4, extra)
    }

    #[test]
    fn chains_forward_edges_and_hashes_keyed_inputs() {
        let j = job(r#"
transforms:
  f: {type: filter, input: s, where: "v > 0", parallelism: 1}
  w: {type: window, input: f, key_by: [k], window: {type: tumbling, size: 1m}, aggregates: ["count(*) AS n"]}
sinks:
  out: {input: w, connector: {type: blackhole}}
"#);
        let p = plan(&j, Path::new("/")).unwrap();
        let names: Vec<&str> = p.vertices.iter().map(|v| v.name.as_str()).collect();
        // a one-file source runs one subtask, and the filter at parallelism 1 chains to it; the
        // window is keyed; the unread dead-letter and late outputs are routed to the dead letters
        assert!(names.contains(&"s -> f"), "{names:?}");
        assert!(names.contains(&"w -> sink:out"), "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("sink:dead_letter")),
            "{names:?}"
        );
        let hash = p
            .edges
            .iter()
            .find(|e| p.vertices[e.to_vertex].name.starts_with("w"))
            .unwrap();
        assert!(matches!(hash.partitioning, Partitioning::Hash { .. }));
        let explain = p.explain();
        assert!(explain.contains("hash(k)"), "{explain}");
        // watermarks travel on every edge but those into the dead-letter path
        let dead_letter_path = |e: &Edge| {
            matches!(
                p.nodes[e.to.0].recipe,
                Recipe::DeadLetterSink { .. } | Recipe::ToDeadLetter { .. }
            )
        };
        let (into, other): (Vec<&Edge>, Vec<&Edge>) =
            p.edges.iter().partition(|e| dead_letter_path(e));
        assert!(into.len() >= 2 && !other.is_empty(), "{explain}");
        assert!(into.iter().all(|e| !e.watermarks));
        assert!(other.iter().all(|e| e.watermarks));
        // batches are shared only into the window
        for e in &p.edges {
            let window = p.nodes[e.to.0].name == "w";
            assert_eq!(e.share_batches, window, "{explain}");
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let j = job(r#"
transforms:
  f: {type: filter, input: s, where: "v + 1"}
  w: {type: window, input: s, key_by: [nope], window: {type: tumbling, size: 1m}, aggregates: ["count(*) AS n"]}
  g: {type: filter, input: s, where: "v > 0"}
sinks:
  out: {input: g, connector: {type: table, path: x.jsonl}}
"#);
        let err = plan(&j, Path::new("/")).err().unwrap().to_string();
        assert!(
            err.contains("transforms.f.where: must be a BOOLEAN"),
            "{err}"
        );
        assert!(
            err.contains("transforms.w.key_by[0]: unknown column 'nope'"),
            "{err}"
        );
        assert!(err.contains("sinks.out.connector.key"), "{err}");
    }

    #[test]
    fn a_nexmark_stream_without_bidders_is_refused() {
        let text = "version: 1\nname: t\nsources:\n  bids:\n    connector: {type: nexmark, events: 10, bidders: 0}\nsinks:\n  out: {input: bids, connector: {type: blackhole}}\n";
        let j = freshet_connectors::job_format()
            .parse(text, "t.yaml", &[])
            .unwrap();
        let err = plan(&j, Path::new("/")).err().unwrap().to_string();
        assert!(
            err.contains(
                "sources.bids.connector.bidders: a Nexmark stream needs at least one bidder"
            ),
            "{err}"
        );
    }
}

//! The physical plan's shape: nodes with their recipes and schemas, the chains (vertices) they
//! run in, and the edges between vertices. Everything here is data: the JobManager serializes a
//! plan into each deployment and TaskManagers instantiate it without planning again.
use arrow::datatypes::SchemaRef;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use freshet_engine::partition::Partitioning;
use freshet_engine::task::WatermarkConfig;
use freshet_job::JobSpec;
use freshet_operators::InputKeying;

use crate::recipe::Recipe;

/// Index of a node in the logical graph.
pub type NodeId = usize;

/// What a node does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NodeKind {
    /// Reads input.
    Source {
        /// Watermark generation.
        watermarks: WatermarkConfig,
        /// Whether it ends by itself.
        bounded: bool,
    },
    /// Transforms or writes.
    Operator,
}

/// One input of a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInput {
    /// Producer.
    pub node: NodeId,
    /// Producer's output port.
    pub port: usize,
    /// How the input must be partitioned.
    pub keying: InputKeying,
}

/// A node of the logical graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    /// Display name and state id: `clicks`, `visitors`, `sink:late_clicks`.
    pub name: String,
    /// Source or operator.
    pub kind: NodeKind,
    /// How a TaskManager builds the node's source or operator.
    pub recipe: Recipe,
    /// Parallelism.
    pub parallelism: u32,
    /// Inputs, in logical input order.
    pub inputs: Vec<NodeInput>,
    /// Output schemas per port.
    pub outputs: Vec<SchemaRef>,
    /// Names of the output ports.
    pub port_names: Vec<String>,
    /// Whether this node is a sink.
    pub is_sink: bool,
}

/// A connection between two vertices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Edge {
    /// Producer node and port.
    pub from: (NodeId, usize),
    /// Consumer node (the head of its vertex) and its logical input.
    pub to: (NodeId, usize),
    /// Producer vertex.
    pub from_vertex: usize,
    /// Consumer vertex.
    pub to_vertex: usize,
    /// How batches are spread.
    pub partitioning: Partitioning,
    /// Whether watermarks travel on this edge. Edges into the dead-letter path (its adapters
    /// and sink, which nothing there does by event time) carry none: a watermark costs its
    /// receiver a wake-up, and a job makes many of them.
    pub watermarks: bool,
    /// Whether a hash edge hands subtasks in the same process the whole batch and their rows'
    /// indices instead of cutting the rows out. Only into windows, which consume rows without
    /// passing them on: an operator that forwards rows needs a compact copy anyway, and the
    /// sending thread makes it in parallel with the receiver's work.
    pub share_batches: bool,
}

/// A chain of nodes run by one thread per subtask.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vertex {
    /// Name (the chained node names).
    pub name: String,
    /// Nodes in chain order.
    pub nodes: Vec<NodeId>,
    /// Parallelism.
    pub parallelism: u32,
}

/// A planned job: nodes, vertices and the edges between vertices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The definition it came from (job-wide settings: name, pipeline, checkpointing, state).
    pub spec: Arc<JobSpec>,
    /// Directory relative paths are resolved against.
    pub base_dir: PathBuf,
    /// Logical nodes.
    pub nodes: Vec<Node>,
    /// Vertices (chains).
    pub vertices: Vec<Vertex>,
    /// Edges between vertices.
    pub edges: Vec<Edge>,
    /// Vertex of each node.
    pub vertex_of: Vec<usize>,
}

impl Plan {
    /// Total number of subtasks.
    pub fn subtask_count(&self) -> u32 {
        self.vertices.iter().map(|v| v.parallelism).sum()
    }

    /// Slots needed with slot sharing (one subtask of every vertex per slot).
    pub fn slots_needed(&self) -> u32 {
        self.vertices
            .iter()
            .map(|v| v.parallelism)
            .max()
            .unwrap_or(0)
    }

    /// The recipe of vertex `v`'s first node (a source vertex's source).
    pub fn head_recipe(&self, v: usize) -> Option<&Recipe> {
        let id = *self.vertices.get(v)?.nodes.first()?;
        self.nodes.get(id).map(|n| &n.recipe)
    }

    /// Whether vertex `v` starts with a source.
    pub fn is_source(&self, v: usize) -> bool {
        self.vertices
            .get(v)
            .is_some_and(|vx| matches!(self.nodes[vx.nodes[0]].kind, NodeKind::Source { .. }))
    }

    /// The plan as JSON, the form a deployment carries.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a plan is plain data")
    }

    /// A plan received in a deployment; the error says what is wrong with it.
    pub fn from_json(bytes: &[u8]) -> Result<Plan, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("physical plan: {e}"))
    }

    /// A human-readable description of the planned graph.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "job {} (max parallelism {}, {} vertices, {} subtasks, {} slots)",
            self.spec.name,
            self.spec.max_parallelism,
            self.vertices.len(),
            self.subtask_count(),
            self.slots_needed()
        );
        for (vi, v) in self.vertices.iter().enumerate() {
            let _ = writeln!(
                s,
                "\nvertex {vi}: {} [parallelism {}]",
                v.name, v.parallelism
            );
            for (k, m) in v.nodes.iter().enumerate() {
                let node = &self.nodes[*m];
                let role = match (&node.kind, node.is_sink) {
                    (NodeKind::Source { .. }, _) => "source",
                    (_, true) => "sink",
                    _ => "operator",
                };
                let chained = if k == 0 { "" } else { "  (chained)" };
                let _ = writeln!(s, "  {role} {}{chained}", node.name);
                for (p, schema) in node.outputs.iter().enumerate() {
                    let cols: Vec<String> = schema
                        .fields()
                        .iter()
                        .filter(|f| f.name() != freshet_engine::TIME_COLUMN)
                        .map(|f| {
                            format!(
                                "{}: {}",
                                f.name(),
                                freshet_operators::expr::type_name(f.data_type()).to_lowercase()
                            )
                        })
                        .collect();
                    let _ = writeln!(s, "    {} -> ({})", node.port_names[p], cols.join(", "));
                }
            }
            for e in self.edges.iter().filter(|e| e.to_vertex == vi) {
                let from = &self.nodes[e.from.0];
                let port = if e.from.1 == 0 {
                    String::new()
                } else {
                    format!(".{}", from.port_names[e.from.1])
                };
                let _ = writeln!(
                    s,
                    "  <- {}{port} [{}] from vertex {}",
                    from.name, e.partitioning, e.from_vertex
                );
            }
        }
        s
    }
}

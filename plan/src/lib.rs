//! The physical plan of a job: planned once by the JobManager, shipped in every deployment, and
//! instantiated by the TaskManagers without planning again.
//!
//! - [`planner`]: job definition → logical graph → chains (vertices) and edges, with each
//!   node's output schemas type-checked and the splits known at planning time assigned.
//! - [`graph`]: the plan as data (nodes, vertices, edges), serializable, and its description.
//! - [`recipe`]: how a TaskManager builds a node's source or operator from the plan, checked
//!   against the schemas the JobManager planned.
#![warn(missing_docs)]

pub mod graph;
pub mod planner;
pub mod recipe;

pub use graph::{Edge, Node, NodeId, NodeInput, NodeKind, Plan, Vertex};
pub use planner::plan;
pub use recipe::{Factory, Recipe, SourceSplits, instantiate, split_enumerators};

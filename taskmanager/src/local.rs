//! A JobManager and TaskManagers in one process.
use std::sync::Arc;

use freshet_jobmanager::{JobManager, TaskManagerGateway};

use crate::TaskManager;
use crate::shuffle::LocalShuffle;

/// Starts a JobManager with `taskmanagers` TaskManagers of `slots` slots each, sharing one
/// in-process shuffle.
pub fn local_cluster(taskmanagers: u32, slots: u32) -> JobManager {
    let events = JobManager::events();
    let shuffle = Arc::new(LocalShuffle::new());
    let tms: Vec<Arc<dyn TaskManagerGateway>> = (0..taskmanagers.max(1))
        .map(|i| {
            Arc::new(TaskManager::new(
                format!("taskmanager-{i}"),
                slots,
                shuffle.clone(),
                events.0.clone(),
            )) as Arc<dyn TaskManagerGateway>
        })
        .collect();
    JobManager::start(tms, events)
}

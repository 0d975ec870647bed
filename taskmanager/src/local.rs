//! A JobManager and TaskManagers in one process.
use std::sync::Arc;

use freshet_jobmanager::{JobManager, TaskManagerGateway};

use crate::TaskManager;
use crate::shuffle::LocalShuffle;

/// Starts a JobManager with `taskmanagers` TaskManagers of `slots` slots each, sharing one
/// in-process shuffle.
pub fn local_cluster(taskmanagers: u32, slots: u32) -> JobManager {
    let jm = JobManager::new(0, None);
    let shuffle = Arc::new(LocalShuffle::new());
    for i in 0..taskmanagers.max(1) {
        jm.register(Arc::new(TaskManager::new(
            format!("taskmanager-{i}"),
            slots,
            shuffle.clone(),
            None,
            jm.event_sender(),
        )) as Arc<dyn TaskManagerGateway>);
    }
    jm
}

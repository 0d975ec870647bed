//! TaskManagers in the JobManager's process (the local mode of `freshet run`): the same
//! TaskManager code as in a cluster, exchanging data through one in-process shuffle.
use crossbeam_channel::Sender;
use std::sync::Arc;

use freshet_control::{TaskEvent, TaskManagerGateway};

use crate::TaskManager;
use crate::shuffle::LocalShuffle;

/// `count` TaskManagers of `slots` slots each, sharing one in-process shuffle and reporting on
/// `events` (the JobManager's event channel).
pub fn taskmanagers(
    count: u32,
    slots: u32,
    events: Sender<TaskEvent>,
) -> Vec<Arc<dyn TaskManagerGateway>> {
    let shuffle = Arc::new(LocalShuffle::new());
    (0..count.max(1))
        .map(|i| {
            Arc::new(TaskManager::new(
                format!("taskmanager-{i}"),
                slots,
                shuffle.clone(),
                None,
                events.clone(),
            )) as Arc<dyn TaskManagerGateway>
        })
        .collect()
}

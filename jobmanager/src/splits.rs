//! Splits found while a job runs. For each source vertex whose connector can find splits (new
//! partitions of a Kafka topic, new files in a followed directory) one thread of the JobManager
//! asks its enumerator every interval, gives each split it has not seen to the subtask the
//! enumerator names, and sends it there (`SubtaskCommand::AddSplits`). A split counts as
//! assigned once it was sent to a deployed subtask; until then the next round tries again. The
//! thread ends with the attempt; the next attempt starts from its plan's splits (a restore
//! lists every split a checkpoint holds), and a split sent twice is read once (sources ignore
//! splits they read already).
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tracing::{info, warn};

use freshet_engine::checkpoint::SubtaskCommand;
use freshet_plan::SourceSplits;

/// Sends a command to a subtask; false if it could not be delivered.
pub type Deliver = Arc<dyn Fn(usize, u32, SubtaskCommand) -> bool + Send + Sync>;

/// The deployed subtasks of an attempt that have not ended: the threads end when the attempt
/// drops it.
pub type Running = Arc<Mutex<HashSet<(usize, u32)>>>;

/// Starts one thread per source vertex in `sources`, for the attempt whose deployed subtasks
/// `running` tracks. Threads started before an error end when the attempt drops `running`.
pub fn start(
    job: &str,
    sources: Vec<SourceSplits>,
    running: &Running,
    send: Deliver,
) -> std::io::Result<()> {
    for s in sources {
        let running = Arc::downgrade(running);
        let send = send.clone();
        let job = job.to_string();
        if freshet_engine::failpoint::fails("spawn-split-discovery") {
            return Err(std::io::Error::other("failpoint spawn-split-discovery"));
        }
        std::thread::Builder::new()
            .name(format!("splits-{}", s.vertex))
            .spawn(move || enumerate(&job, s, running, send))?;
    }
    Ok(())
}

fn enumerate(
    job: &str,
    s: SourceSplits,
    running: Weak<Mutex<HashSet<(usize, u32)>>>,
    send: Deliver,
) {
    let mut known: HashSet<String> = s.planned.into_iter().collect();
    loop {
        let next = Instant::now() + s.enumerator.interval();
        while Instant::now() < next {
            if running.strong_count() == 0 {
                return;
            }
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(100)));
        }
        let Some(running) = running.upgrade() else {
            return;
        };
        let found = match s.enumerator.discover() {
            Ok(found) => found,
            Err(e) => {
                warn!(job, vertex = s.vertex, error = %e, "looking for new splits failed");
                continue;
            }
        };
        for split in found {
            if known.contains(&split) {
                continue;
            }
            let subtask = s.enumerator.assign(&split, s.parallelism);
            if !running.lock().contains(&(s.vertex, subtask)) {
                continue;
            }
            if send(
                s.vertex,
                subtask,
                SubtaskCommand::AddSplits(vec![split.clone()]),
            ) {
                info!(job, vertex = s.vertex, subtask, split = %split, "assigned a split found while running");
                known.insert(split);
            }
        }
    }
}

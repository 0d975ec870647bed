//! Leader election between JobManagers sharing one high-availability directory in object
//! storage, with an epoch that fences the loser.
//!
//! The leader of epoch `n` created `leader/epoch-<n>` with a conditional write (only one
//! candidate can create it) and keeps rewriting `leader/epoch-<n>.renewed` with an increasing
//! counter. A candidate that finds the newest epoch's counter unchanged for a whole lease
//! duration (measured on its own clock, so clocks need not agree) creates epoch `n + 1`.
//!
//! The epoch is the fencing token: it travels with every request to TaskManagers, which refuse
//! requests of an older epoch once they have seen a newer one, and a leader that sees a newer
//! epoch at renewal gives up at once. Checkpoint metadata is fenced separately by the job's
//! checkpoint generation, so an old leader can never complete a checkpoint after a new one
//! started the job.
use std::time::{Duration, Instant};
use tracing::{info, warn};

use freshet_engine::checkpoint::Storage;

/// Leadership held by this process.
#[derive(Debug, Clone)]
pub struct Leadership {
    storage: Storage,
    /// The epoch (fencing token).
    pub epoch: u64,
    holder: String,
}

fn epochs(storage: &Storage) -> Result<Vec<u64>, String> {
    let mut out: Vec<u64> = storage
        .list("leader")
        .map_err(|e| e.to_string())?
        .iter()
        .filter_map(|p| p.rsplit('/').next()?.strip_prefix("epoch-")?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn renewed(storage: &Storage, epoch: u64) -> Result<Option<String>, String> {
    Ok(storage
        .get(&format!("leader/epoch-{epoch:010}.renewed"))
        .map_err(|e| e.to_string())?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// Waits until this process leads, then returns its leadership. `holder` names the process
/// (its address) in the lease.
pub fn acquire(storage: Storage, holder: &str, lease: Duration) -> Result<Leadership, String> {
    let mut observed: Option<(u64, Option<String>, Instant)> = None;
    loop {
        let newest = epochs(&storage)?.last().copied().unwrap_or(0);
        let renewal = if newest == 0 {
            None
        } else {
            renewed(&storage, newest)?
        };
        let expired = newest == 0
            || match &observed {
                Some((e, r, since)) if *e == newest && *r == renewal => since.elapsed() >= lease,
                _ => {
                    if observed.as_ref().is_none_or(|o| o.0 != newest) && newest > 0 {
                        info!(
                            epoch = newest,
                            "another JobManager holds the lease; watching it"
                        );
                    }
                    observed = Some((newest, renewal, Instant::now()));
                    false
                }
            };
        if expired {
            let epoch = newest + 1;
            let created = storage
                .put_if_absent(
                    &format!("leader/epoch-{epoch:010}"),
                    holder.to_string().into(),
                )
                .map_err(|e| e.to_string())?;
            if created {
                let me = Leadership {
                    storage,
                    epoch,
                    holder: holder.to_string(),
                };
                me.renew(0)?;
                info!(epoch, "this JobManager leads");
                return Ok(me);
            }
            observed = None;
            continue;
        }
        std::thread::sleep((lease / 5).max(Duration::from_millis(50)));
    }
}

impl Leadership {
    fn renew(&self, n: u64) -> Result<(), String> {
        self.storage
            .put(
                &format!("leader/epoch-{:010}.renewed", self.epoch),
                format!("{} {n}", self.holder).into(),
            )
            .map_err(|e| e.to_string())
    }

    /// Renews the lease every `lease / 3` on a thread of its own; calls `lost` (once) when a newer
    /// epoch appears or renewing keeps failing for a whole lease.
    pub fn keep(self, lease: Duration, lost: impl FnOnce(String) + Send + 'static) {
        std::thread::Builder::new()
            .name("leader-lease".into())
            .spawn(move || {
                let mut n = 1;
                let mut last_ok = Instant::now();
                loop {
                    std::thread::sleep(lease / 3);
                    match epochs(&self.storage) {
                        Ok(e) if e.last().copied().unwrap_or(0) > self.epoch => {
                            lost(format!(
                                "a newer JobManager leads (epoch {} > {})",
                                e.last().copied().unwrap_or(0),
                                self.epoch
                            ));
                            return;
                        }
                        _ => {}
                    }
                    match self.renew(n) {
                        Ok(()) => last_ok = Instant::now(),
                        Err(e) => warn!(error = %e, "renewing the leader lease"),
                    }
                    if last_ok.elapsed() >= lease {
                        lost("the leader lease could not be renewed for a whole lease".into());
                        return;
                    }
                    n += 1;
                }
            })
            .expect("spawning the lease thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_leader_at_a_time_and_a_stale_lease_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(
            dir.path().to_str().unwrap(),
            std::path::Path::new("."),
            &Default::default(),
        )
        .unwrap();
        let lease = Duration::from_millis(300);
        let first = acquire(storage.clone(), "a", lease).unwrap();
        assert_eq!(first.epoch, 1);
        let (tx, rx) = std::sync::mpsc::channel();
        first.clone().keep(lease, move |why| tx.send(why).unwrap());
        // while the first renews, a candidate waits
        let s2 = storage.clone();
        let candidate = std::thread::spawn(move || acquire(s2, "b", lease).unwrap());
        std::thread::sleep(lease * 3);
        assert!(
            !candidate.is_finished(),
            "took over a lease that was renewed"
        );
        // a newer leader appears (epoch 2): the first steps down at its next renewal
        storage
            .put_if_absent("leader/epoch-0000000002", "c".into())
            .unwrap();
        let why = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(why.contains("newer JobManager"), "{why}");
        // nobody renews epoch 2: after a lease the candidate takes epoch 3
        let second = candidate.join().unwrap();
        assert_eq!(second.epoch, 3);
    }
}

//! The sink commit protocol: output that becomes visible only with checkpoints.
//!
//! A two-phase sink stages what it writes between barriers (a part file, a staged table, a
//! transaction). At a barrier it closes the stage and hands over what committing it takes — its
//! **commit data** (a part's name and length, a transaction's id) — which [`PendingCommits`]
//! puts into the snapshot, so the checkpoint carries it. When the checkpoint completes the sink
//! commits the data of every checkpoint up to it, oldest first. After a restore the restored
//! checkpoint has completed by definition, but its commits may or may not have happened before
//! the failure: [`PendingCommits::open`] returns them, and the sink commits them again,
//! idempotently, before new data flows. Stages after the restored checkpoint never complete;
//! the sink discards them.
//!
//! At another parallelism every former subtask's commit data is committed by exactly one new
//! subtask (former subtask `i` by new subtask `i % parallelism`), so nothing is committed twice
//! by two subtasks or left behind.
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::checkpoint::{SnapshotContext, StateContext};
use crate::{EngineError, Result};

/// The commit data of a sink subtask's checkpoints that have not completed yet.
pub struct PendingCommits<P> {
    name: &'static str,
    pending: Vec<(u64, P)>,
}

impl<P: Serialize + DeserializeOwned> PendingCommits<P> {
    /// Opens the pending commits kept in the operator state `name`. Returns them with the
    /// commit data of the restored checkpoint this subtask must commit before anything else
    /// (oldest first; empty without a restore).
    pub fn open(state: &StateContext<'_>, name: &'static str) -> Result<(Self, Vec<P>)> {
        let me = state.subtask();
        let mut restored: Vec<(u64, P)> = Vec::new();
        for (index, _, data) in state.operator_state(name) {
            if index % me.parallelism.max(1) != me.index {
                continue;
            }
            let p: Vec<(u64, P)> = postcard::from_bytes(data).map_err(|e| {
                EngineError::State(format!("pending commits ({name}) of subtask {index}: {e}"))
            })?;
            restored.extend(p);
        }
        restored.sort_by_key(|(c, _)| *c);
        Ok((
            PendingCommits {
                name,
                pending: Vec::new(),
            },
            restored.into_iter().map(|(_, p)| p).collect(),
        ))
    }

    /// At a barrier: `closed` (the stage the barrier closed, if anything was staged) waits for
    /// the checkpoint; every pending commit goes into the snapshot.
    pub fn snapshot(&mut self, snap: &mut SnapshotContext<'_>, closed: Option<P>) -> Result<()> {
        if let Some(p) = closed {
            self.pending.push((snap.id(), p));
        }
        let data = postcard::to_allocvec(&self.pending)
            .map_err(|e| EngineError::State(format!("pending commits ({}): {e}", self.name)))?;
        snap.put(self.name, data);
        Ok(())
    }

    /// Checkpoint `id` completed: the commit data of every checkpoint up to it, oldest first.
    /// They are no longer pending: a sink that fails to commit them fails (and its restore
    /// commits them again).
    pub fn complete(&mut self, id: u64) -> Vec<P> {
        let ready = self.pending.iter().take_while(|(c, _)| *c <= id).count();
        self.pending.drain(..ready).map(|(_, p)| p).collect()
    }

    /// Whether anything waits for a checkpoint.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{
        CheckpointMetadata, NamedState, OperatorSnapshot, RestoreSource, S3Options, SnapshotKind,
        Storage,
    };
    use crate::keys::KeyGroupRange;
    use crate::operator::SubtaskInfo;
    use crate::state::StateConfig;
    use std::collections::BTreeMap;

    /// A checkpoint of operator `sink` taken at parallelism 3, each subtask with commit data
    /// for checkpoints 6 and 7.
    fn restored(dir: &std::path::Path) -> RestoreSource {
        let snapshots = (0..3)
            .map(|i| OperatorSnapshot {
                subtask: i,
                parallelism: 3,
                key_groups: KeyGroupRange { start: 1, end: 0 },
                files: Vec::new(),
                state: vec![NamedState {
                    name: "commits".into(),
                    data: postcard::to_allocvec(&vec![
                        (6u64, format!("s{i}-c6")),
                        (7u64, format!("s{i}-c7")),
                    ])
                    .unwrap(),
                    path: None,
                    stored: None,
                    fixed_parallelism: false,
                }],
            })
            .collect();
        RestoreSource {
            root: Storage::open(&dir.display().to_string(), dir, &S3Options::default()).unwrap(),
            location: dir.display().to_string(),
            metadata: CheckpointMetadata {
                format: 1,
                job: "j".into(),
                generation: 1,
                id: 7,
                kind: SnapshotKind::Checkpoint,
                trigger_time_ms: 0,
                max_parallelism: 128,
                operators: BTreeMap::from([("sink".to_string(), snapshots)]),
                end_of_input: false,
            },
            shared_with_job: true,
        }
    }

    fn open_at(r: &RestoreSource, index: u32, parallelism: u32) -> Vec<String> {
        let info = SubtaskInfo {
            job: "j".into(),
            vertex: "sink".into(),
            index,
            parallelism,
            max_parallelism: 128,
        };
        let config = StateConfig::default();
        let dir = tempfile::tempdir().unwrap();
        let ctx = StateContext::new(&info, "sink", &config, dir.path(), Some(r), true);
        PendingCommits::<String>::open(&ctx, "commits").unwrap().1
    }

    /// After a rescale every former subtask's commit data is committed by exactly one new
    /// subtask, oldest checkpoint first.
    #[test]
    fn restored_commits_go_to_exactly_one_subtask() {
        let dir = tempfile::tempdir().unwrap();
        let r = restored(dir.path());
        let same: Vec<Vec<String>> = (0..3).map(|i| open_at(&r, i, 3)).collect();
        assert_eq!(same[1], ["s1-c6", "s1-c7"]);
        let fewer: Vec<Vec<String>> = (0..2).map(|i| open_at(&r, i, 2)).collect();
        assert_eq!(fewer[0], ["s0-c6", "s2-c6", "s0-c7", "s2-c7"]);
        assert_eq!(fewer[1], ["s1-c6", "s1-c7"]);
        let more: Vec<Vec<String>> = (0..4).map(|i| open_at(&r, i, 4)).collect();
        let mut all: Vec<String> = more.concat();
        all.sort();
        let mut expected: Vec<String> = same.concat();
        expected.sort();
        assert_eq!(all, expected);
        assert!(more[3].is_empty());
    }

    /// Completing a checkpoint hands over the commit data of every checkpoint up to it, in
    /// order, once.
    #[test]
    fn completion_releases_commits_in_order() {
        let mut p = PendingCommits::<String> {
            name: "commits",
            pending: vec![(3, "a".into()), (4, "b".into()), (6, "c".into())],
        };
        assert_eq!(p.complete(2), Vec::<String>::new());
        assert_eq!(p.complete(4), ["a", "b"]);
        assert_eq!(p.complete(4), Vec::<String>::new());
        assert!(!p.is_empty());
        assert_eq!(p.complete(u64::MAX), ["c"]);
        assert!(p.is_empty());
    }
}

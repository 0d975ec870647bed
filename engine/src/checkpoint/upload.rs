//! Taking a subtask's snapshot: the synchronous part on the subtask thread, the upload on another.
//!
//! **Incremental checkpoints.** RocksDB never changes an SST file once written, and a file's name
//! is unique for the life of an instance. Each operator instance remembers which of its SST files
//! are already stored, under `shared/<operator>/<instance>-<file>`; a checkpoint uploads only the
//! SST files it has not stored yet and references the others. A file counts as stored only once
//! a checkpoint that referenced it completed ([`SubtaskCommand::Complete`]), so a file uploaded
//! for an abandoned checkpoint is uploaded again rather than trusted. The small, changing files
//! of a RocksDB directory (`MANIFEST-*`, `CURRENT`, `OPTIONS-*`) go to the checkpoint's own
//! directory. **Savepoints** upload every file into the savepoint directory, so a savepoint
//! never references anything outside itself.
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info_span, warn};

use super::{
    Barrier, CheckpointId, FileRef, INLINE_STATE_LIMIT, NamedState, OperatorSnapshot, S3Options,
    SnapshotKind, Storage, SubtaskAck, SubtaskCommand, SubtaskReport, checkpoint_dir,
};
use crate::operator::SubtaskInfo;
use crate::state::backend::PendingSnapshot;
use crate::state::{
    KeySet, KeyedBackend, KeyedTable, PaneColumns, PaneTable, StateConfig, StateValue, Timers,
};
use crate::{EngineError, KeyGroupRange, Result};

/// Where a subtask's snapshots go and how it talks to the checkpoint coordinator.
#[derive(Clone)]
pub struct CheckpointHooks {
    /// The job's checkpoint root.
    pub storage: Storage,
    /// S3 settings for savepoint locations.
    pub s3: S3Options,
    /// Sends a report to the coordinator.
    pub report: Arc<dyn Fn(SubtaskReport) + Send + Sync>,
}

/// What an operator writes into a snapshot (see [`crate::operator::Operator::snapshot`]).
pub struct SnapshotContext<'a> {
    id: CheckpointId,
    backend: Option<&'a Arc<KeyedBackend>>,
    state: Vec<NamedState>,
}

impl<'a> SnapshotContext<'a> {
    /// The context of one operator's snapshot: until its [`OperatorState::take`], what the
    /// operator writes into its keyed state is kept for the snapshot's upload thread to write.
    pub(crate) fn new(id: CheckpointId, backend: Option<&'a Arc<KeyedBackend>>) -> Self {
        if let Some(b) = backend {
            b.defer_writes();
        }
        SnapshotContext {
            id,
            backend,
            state: Vec::new(),
        }
    }

    /// The checkpoint being taken.
    pub fn id(&self) -> CheckpointId {
        self.id
    }

    /// Writes a keyed table's pending changes into the backend, so the snapshot includes them.
    pub fn flush<V: StateValue>(&mut self, table: &mut KeyedTable<V>) -> Result<()> {
        table.flush()
    }

    /// Writes a key set's changed keys into the backend, so the snapshot includes them.
    pub fn flush_set(&mut self, set: &mut KeySet) -> Result<()> {
        set.flush()
    }

    /// Writes a pane table's changed values into the backend, so the snapshot includes them.
    pub fn flush_panes<C: PaneColumns>(&mut self, table: &mut PaneTable<C>) -> Result<()> {
        table.flush()
    }

    /// Writes the timers registered since the last write into the backend, so the snapshot
    /// includes them.
    pub fn flush_timers(&mut self, timers: &mut Timers) -> Result<()> {
        if self.backend.is_none() {
            return Err(EngineError::State(format!(
                "timers {} saved by an operator without keyed state; attach a table first",
                timers.name()
            )));
        }
        timers.flush()
    }

    /// Stores a piece of non-keyed state. On restore every subtask sees the pieces of every
    /// former subtask, so it can pick the ones it is now responsible for.
    pub fn put(&mut self, name: impl Into<String>, data: Vec<u8>) {
        self.push(name.into(), data, false);
    }

    /// Stores a piece of non-keyed state that only this subtask index at this parallelism can
    /// restore. The JobManager refuses to restore the snapshot at another parallelism (see
    /// [`super::fixed_parallelism_conflict`]), before anything is deployed.
    pub fn put_fixed(&mut self, name: impl Into<String>, data: Vec<u8>) {
        self.push(name.into(), data, true);
    }

    fn push(&mut self, name: String, data: Vec<u8>, fixed_parallelism: bool) {
        self.state.push(NamedState {
            name,
            data,
            path: None,
            stored: None,
            fixed_parallelism,
        });
    }

    pub(crate) fn into_state(self) -> Vec<NamedState> {
        self.state
    }
}

#[derive(Debug, Clone)]
struct Stored {
    path: String,
    checksum: Option<String>,
    /// The newest checkpoint that references it.
    checkpoint: CheckpointId,
    /// True once a checkpoint referencing it completed.
    confirmed: bool,
}

/// The runtime's record of one operator's state in one subtask: its backend and which of its
/// files are stored.
pub struct OperatorState {
    /// Stable operator id.
    pub uid: String,
    /// Its keyed state, once the operator attached a table.
    pub backend: Option<Arc<KeyedBackend>>,
    instance: String,
    stored: Arc<Mutex<HashMap<String, Stored>>>,
}

/// A snapshot whose synchronous part is done.
pub(crate) struct Taken {
    uid: String,
    /// The RocksDB instance's snapshot, linked into `dir` by the upload thread.
    pending: Option<PendingSnapshot>,
    dir: Option<PathBuf>,
    files: Vec<(String, u64)>,
    key_groups: KeyGroupRange,
    state: Vec<NamedState>,
    instance: String,
    stored: Arc<Mutex<HashMap<String, Stored>>>,
}

/// A path segment for an operator id.
pub(crate) fn segment(uid: &str) -> String {
    uid.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl OperatorState {
    /// The record of operator `uid`; `seeded` are files of a restored checkpoint already stored.
    pub(crate) fn new(
        uid: String,
        backend: Option<Arc<KeyedBackend>>,
        info: &SubtaskInfo,
        seeded: Vec<FileRef>,
    ) -> Self {
        let instance = format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(
                format!(
                    "{}/{}/{}/{}/{:?}",
                    std::process::id(),
                    info.job,
                    uid,
                    info.index,
                    std::time::SystemTime::now()
                )
                .as_bytes()
            )
        );
        let stored = seeded
            .into_iter()
            .map(|f| {
                (
                    f.name,
                    Stored {
                        path: f.path,
                        checksum: f.checksum,
                        checkpoint: 0,
                        confirmed: true,
                    },
                )
            })
            .collect();
        OperatorState {
            uid,
            backend,
            instance,
            stored: Arc::new(Mutex::new(stored)),
        }
    }

    /// The synchronous part: the operator's non-keyed state, and the point its keyed state is
    /// snapshotted at (the upload thread links its files, see [`Taken::link`]).
    pub(crate) fn take(
        &self,
        id: CheckpointId,
        info: &SubtaskInfo,
        state: Vec<NamedState>,
        local_dir: &Path,
    ) -> Result<Taken> {
        let (pending, dir) = match &self.backend {
            Some(b) => (
                Some(b.begin_snapshot()?),
                Some(local_dir.join(format!("snapshot-{id}-{}", segment(&self.uid)))),
            ),
            None => (None, None),
        };
        Ok(Taken {
            uid: self.uid.clone(),
            pending,
            dir,
            files: Vec::new(),
            key_groups: info.key_groups(),
            state,
            instance: self.instance.clone(),
            stored: self.stored.clone(),
        })
    }

    /// A checkpoint completed: files uploaded for it or before are stored for good.
    pub(crate) fn complete(&self, id: CheckpointId) {
        for s in self.stored.lock().values_mut() {
            if s.checkpoint <= id {
                s.confirmed = true;
            }
        }
    }

    /// A checkpoint was abandoned: forget the files it was the newest to reference, unless a
    /// completed checkpoint references them (the next checkpoint uploads them again).
    pub(crate) fn abort(&self, id: CheckpointId) {
        self.stored
            .lock()
            .retain(|_, s| s.confirmed || s.checkpoint != id);
    }
}

impl Taken {
    /// Writes the snapshot's rows into the keyed state, flushes its memtables and links its
    /// files into the snapshot's local directory. Runs on the upload thread; until it is done
    /// the subtask's writes to that state wait, and if it fails they fail (see
    /// [`PendingSnapshot::take`]).
    fn link(&mut self) -> Result<()> {
        let (Some(pending), Some(dir)) = (self.pending.take(), &self.dir) else {
            return Ok(());
        };
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| EngineError::io(format!("clearing {}", dir.display()), e))?;
        }
        self.files = pending.take(dir)?;
        Ok(())
    }
}

/// Dispatches a command to the operators' records (completion and abort bookkeeping).
pub(crate) fn bookkeep(ops: &[OperatorState], cmd: &SubtaskCommand) {
    match cmd {
        SubtaskCommand::Complete(id) => ops.iter().for_each(|o| o.complete(*id)),
        SubtaskCommand::Abort(id) => ops.iter().for_each(|o| o.abort(*id)),
        _ => {}
    }
}

/// Timings of the synchronous part.
pub(crate) struct SyncTimes {
    pub alignment_ms: u64,
    pub sync_ms: u64,
    /// Output a watermark made due was still pending at the snapshot.
    pub output_pending: bool,
}

/// The asynchronous part: uploads on a thread of its own and reports.
pub(crate) fn upload(
    hooks: &CheckpointHooks,
    barrier: &Barrier,
    info: &SubtaskInfo,
    mut taken: Vec<Taken>,
    times: SyncTimes,
) {
    let hooks = hooks.clone();
    let report_to = hooks.report.clone();
    let id = barrier.id;
    let barrier = barrier.clone();
    let info = info.clone();
    let span = info_span!(
        "checkpoint.async",
        trace_id = tracing::field::Empty,
        checkpoint = barrier.id,
        vertex = %info.vertex,
        subtask = info.index,
        otel.status_code = tracing::field::Empty,
    );
    crate::trace::follow(&span, barrier.trace.as_deref());
    let spawned = std::thread::Builder::new()
        .name(format!("upload-{}", info.index))
        .spawn(move || {
            let _enter = span.enter();
            let started = Instant::now();
            let linked = taken.iter_mut().try_for_each(Taken::link);
            let report = match linked.and_then(|()| upload_all(&hooks, &barrier, &info, &taken)) {
                Ok((operators, full, uploaded)) => {
                    debug!(full, uploaded, "snapshot uploaded");
                    SubtaskReport::Ack(Box::new(SubtaskAck {
                        checkpoint: barrier.id,
                        operators,
                        full_bytes: full,
                        uploaded_bytes: uploaded,
                        alignment_ms: times.alignment_ms,
                        sync_ms: times.sync_ms,
                        async_ms: started.elapsed().as_millis() as u64,
                        output_pending: times.output_pending,
                    }))
                }
                Err(e) => {
                    tracing::Span::current().record("otel.status_code", "error");
                    warn!(error = %e, "snapshot upload failed");
                    SubtaskReport::Decline {
                        checkpoint: barrier.id,
                        reason: format!("{}#{}: {e}", info.vertex, info.index),
                    }
                }
            };
            for t in &taken {
                if let Some(dir) = &t.dir {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            (hooks.report)(report);
        });
    if let Err(e) = spawned {
        (report_to)(SubtaskReport::Decline {
            checkpoint: id,
            reason: format!("cannot start an upload thread: {e}"),
        });
    }
}

type Uploaded = (BTreeMap<String, OperatorSnapshot>, u64, u64);

fn upload_all(
    hooks: &CheckpointHooks,
    barrier: &Barrier,
    info: &SubtaskInfo,
    taken: &[Taken],
) -> Result<Uploaded> {
    let savepoint = match (&barrier.kind, &barrier.target) {
        (SnapshotKind::Savepoint, Some(target)) => {
            Some(Storage::open(target, Path::new("."), &hooks.s3)?)
        }
        (SnapshotKind::Savepoint, None) => {
            return Err(EngineError::Storage(
                "a savepoint needs a target directory".into(),
            ));
        }
        _ => None,
    };
    let mut operators = BTreeMap::new();
    let (mut full, mut uploaded) = (0, 0);
    for t in taken {
        let seg = segment(&t.uid);
        let mut files = Vec::new();
        for (name, size) in &t.files {
            full += size;
            let local = t
                .dir
                .as_ref()
                .expect("files come from a directory")
                .join(name);
            let (path, checksum) = if let Some(sp) = &savepoint {
                let path = format!("{seg}/{}/{name}", info.index);
                let (n, sum) = sp.put_file(&path, &local)?;
                uploaded += n;
                (path, Some(sum))
            } else if name.ends_with(".sst") {
                // uploaded before, also for a checkpoint still pending: its files stay (the
                // JobManager collects unreferenced ones only while none is pending), and if it
                // fails this one still references them
                let known = t.stored.lock().get_mut(name).map(|s| {
                    s.checkpoint = s.checkpoint.max(barrier.id);
                    (s.path.clone(), s.checksum.clone())
                });
                match known {
                    Some(k) => k,
                    None => {
                        let path = format!("shared/{seg}/{}-{name}", t.instance);
                        let (n, sum) = hooks.storage.put_file(&path, &local)?;
                        uploaded += n;
                        t.stored.lock().insert(
                            name.clone(),
                            Stored {
                                path: path.clone(),
                                checksum: Some(sum.clone()),
                                checkpoint: barrier.id,
                                confirmed: false,
                            },
                        );
                        (path, Some(sum))
                    }
                }
            } else {
                let path = format!("{}/{seg}/{}/{name}", checkpoint_dir(barrier.id), info.index);
                let (n, sum) = hooks.storage.put_file(&path, &local)?;
                uploaded += n;
                (path, Some(sum))
            };
            files.push(FileRef {
                name: name.clone(),
                path,
                size: *size,
                checksum,
            });
        }
        let mut state = Vec::with_capacity(t.state.len());
        for (i, n) in t.state.iter().enumerate() {
            if n.data.len() <= INLINE_STATE_LIMIT {
                state.push(n.clone());
                continue;
            }
            let (store, path) = match &savepoint {
                Some(sp) => (sp, format!("{seg}/{}/state-{i}", info.index)),
                None => (
                    &hooks.storage,
                    format!(
                        "{}/{seg}/{}/state-{i}",
                        checkpoint_dir(barrier.id),
                        info.index
                    ),
                ),
            };
            let stored = (n.data.len() as u64, super::checksum(&n.data));
            store.put(&path, bytes::Bytes::from(n.data.clone()))?;
            full += n.data.len() as u64;
            uploaded += n.data.len() as u64;
            state.push(NamedState {
                name: n.name.clone(),
                data: Vec::new(),
                path: Some(path),
                stored: Some(stored),
                fixed_parallelism: n.fixed_parallelism,
            });
        }
        operators.insert(
            t.uid.clone(),
            OperatorSnapshot {
                subtask: info.index,
                parallelism: info.parallelism,
                key_groups: t.key_groups,
                files,
                state,
            },
        );
    }
    Ok((operators, full, uploaded))
}

/// A pointer to the configured local state directory and settings of one subtask.
#[derive(Debug, Clone)]
pub struct LocalState {
    /// This subtask's working directory (removed when the subtask ends).
    pub dir: PathBuf,
    /// Backend settings.
    pub config: StateConfig,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{CheckpointMetadata, METADATA, RestoreSource, StateContext};
    use crate::time::Watermark;

    fn subtask(index: u32, parallelism: u32) -> SubtaskInfo {
        SubtaskInfo {
            job: "j".into(),
            vertex: "v".into(),
            index,
            parallelism,
            max_parallelism: 128,
        }
    }

    /// Hooks that store checkpoints under `dir/chk` and drop the reports.
    fn local_hooks(dir: &Path) -> CheckpointHooks {
        let root = Storage::open(
            dir.join("chk").to_str().unwrap(),
            Path::new("."),
            &S3Options::default(),
        )
        .unwrap();
        CheckpointHooks {
            storage: root,
            s3: S3Options::default(),
            report: Arc::new(|_| {}),
        }
    }

    /// Checkpoint `id` of one subtask of operator `op`, completed: its snapshot, full and
    /// uploaded bytes.
    fn checkpoint(
        hooks: &CheckpointHooks,
        op: &OperatorState,
        info: &SubtaskInfo,
        id: CheckpointId,
        local: &Path,
    ) -> (OperatorSnapshot, u64, u64) {
        let taken = uncompleted(hooks, op, info, id, local);
        op.complete(id);
        taken
    }

    /// Checkpoint `id` of one subtask of operator `op`, uploaded but not (yet) completed.
    fn uncompleted(
        hooks: &CheckpointHooks,
        op: &OperatorState,
        info: &SubtaskInfo,
        id: CheckpointId,
        local: &Path,
    ) -> (OperatorSnapshot, u64, u64) {
        let mut taken = op.take(id, info, Vec::new(), local).unwrap();
        taken.link().unwrap();
        let barrier = Barrier {
            id,
            kind: SnapshotKind::Checkpoint,
            target: None,
            stop: false,
            trace: None,
        };
        let (mut operators, full, uploaded) = upload_all(hooks, &barrier, info, &[taken]).unwrap();
        (operators.remove(&op.uid).unwrap(), full, uploaded)
    }

    /// The SST files of a snapshot, as (name, stored path), and their bytes.
    fn sst(s: &OperatorSnapshot) -> (Vec<(String, String)>, u64) {
        let files = s.files.iter().filter(|f| f.name.ends_with(".sst"));
        (
            files
                .clone()
                .map(|f| (f.name.clone(), f.path.clone()))
                .collect(),
            files.map(|f| f.size).sum(),
        )
    }

    /// A checkpoint taken while the one before is still pending references that one's SST
    /// files instead of uploading them again; it still does once that one failed, and a
    /// checkpoint after both failed uploads them again.
    #[test]
    fn a_checkpoint_references_the_uploads_of_one_still_pending() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = local_hooks(dir.path());
        let config = crate::state::table::tests::config(dir.path(), 100_000);
        let info = subtask(0, 1);
        let local = dir.path().join("local");
        let mut ctx = StateContext::new(&info, "op", &config, &local, None, true);
        let backend = ctx.keyed().unwrap();
        let mut t: crate::state::KeyedTable<u64> = crate::state::KeyedTable::new("t", None);
        t.attach(&backend).unwrap();
        for i in 0..20_000u32 {
            t.update(
                format!("key-{i}").as_bytes(),
                0,
                0,
                Watermark::MIN,
                || 7,
                |_| (),
            )
            .unwrap();
        }
        t.flush().unwrap();
        let op = OperatorState::new("op".into(), Some(backend), &info, Vec::new());
        let (first, full, uploaded) = uncompleted(&hooks, &op, &info, 1, &local);
        let (files, sst_bytes) = sst(&first);
        assert!(!files.is_empty() && uploaded == full);
        let (second, full, uploaded) = uncompleted(&hooks, &op, &info, 2, &local);
        assert_eq!(
            sst(&second).0,
            files,
            "the pending checkpoint's files are referenced"
        );
        assert_eq!(uploaded, full - sst_bytes);
        op.abort(1);
        let (third, full, uploaded) = uncompleted(&hooks, &op, &info, 3, &local);
        assert_eq!(sst(&third).0, files, "checkpoint 2 still references them");
        assert_eq!(uploaded, full - sst_bytes);
        op.abort(2);
        op.abort(3);
        let (_, full, uploaded) = uncompleted(&hooks, &op, &info, 4, &local);
        assert_eq!(uploaded, full, "no checkpoint left references them");
    }

    /// A rescaled subtask takes the former subtask sharing most key groups with it as its
    /// instance; its next checkpoint references that snapshot's files where they are stored
    /// and uploads only what it added (the rows imported from the other snapshots). Restored
    /// from a snapshot outside the job's storage (a savepoint), it uploads everything.
    #[test]
    fn a_rescaled_subtask_uploads_only_what_its_base_snapshot_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = local_hooks(dir.path());
        let root = hooks.storage.clone();
        let config = crate::state::table::tests::config(dir.path(), 100_000);
        let keys: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| format!("key-{i}").into_bytes())
            .collect();
        let mut old = Vec::new();
        for i in 0..2 {
            let info = subtask(i, 2);
            let local = dir.path().join(format!("old-{i}"));
            let mut ctx = StateContext::new(&info, "op", &config, &local, None, true);
            let backend = ctx.keyed().unwrap();
            let mut t: crate::state::KeyedTable<u64> = crate::state::KeyedTable::new("t", None);
            t.attach(&backend).unwrap();
            for k in keys.iter().filter(|k| backend.owns(k)) {
                t.update(k, 0, 0, Watermark::MIN, || 7, |_| ()).unwrap();
            }
            t.flush().unwrap();
            let op = OperatorState::new("op".into(), Some(backend), &info, Vec::new());
            let (snap, full, uploaded) = checkpoint(&hooks, &op, &info, 1, &local);
            assert!(
                full > 0 && uploaded == full,
                "a first checkpoint uploads everything"
            );
            old.push(snap);
        }
        let metadata = CheckpointMetadata {
            format: 1,
            job: "j".into(),
            generation: 1,
            id: 1,
            kind: SnapshotKind::Checkpoint,
            trigger_time_ms: 0,
            max_parallelism: 128,
            operators: BTreeMap::from([("op".to_string(), old.clone())]),
            end_of_input: false,
        };
        let chk = root.child(&checkpoint_dir(1));
        chk.put(METADATA, serde_json::to_vec(&metadata).unwrap().into())
            .unwrap();
        let mut restore =
            RestoreSource::load(chk.url(), Path::new("."), &S3Options::default()).unwrap();
        for shared in [true, false] {
            restore.shared_with_job = shared;
            // subtask 1 of 3 shares 21 key groups with former subtask 0 and 22 with former 1
            for (i, base) in [(0u32, 0usize), (1, 1), (2, 1)] {
                let info = subtask(i, 3);
                let local = dir.path().join(format!("new-{shared}-{i}"));
                let mut ctx = StateContext::new(&info, "op", &config, &local, Some(&restore), true);
                let backend = ctx.keyed().unwrap();
                let mut t: crate::state::KeyedTable<u64> = crate::state::KeyedTable::new("t", None);
                t.attach(&backend).unwrap();
                for k in keys.iter().filter(|k| backend.owns(k)) {
                    assert_eq!(t.get(k, 0, Watermark::MIN).unwrap(), Some(&7));
                }
                let (backend, seeded) = ctx.finish();
                let op = OperatorState::new("op".into(), backend, &info, seeded);
                let (snap, full, uploaded) = checkpoint(&hooks, &op, &info, 2, &local);
                let sst = |s: &OperatorSnapshot| sst(s).0;
                let referenced: Vec<_> = sst(&snap)
                    .into_iter()
                    .filter(|f| sst(&old[base]).contains(f))
                    .collect();
                let new_bytes: u64 = snap
                    .files
                    .iter()
                    .filter(|f| !referenced.iter().any(|(n, _)| *n == f.name))
                    .map(|f| f.size)
                    .sum();
                if shared {
                    assert_eq!(referenced, sst(&old[base]), "subtask {i}");
                    assert_eq!(uploaded, new_bytes, "subtask {i}");
                    assert!(uploaded < full / 2, "subtask {i}: {uploaded} of {full}");
                } else {
                    assert!(referenced.is_empty(), "subtask {i}");
                    assert_eq!(uploaded, full, "subtask {i}");
                }
            }
        }
    }

    #[test]
    fn large_operator_state_goes_to_a_file_and_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = Storage::open(
            dir.path().to_str().unwrap(),
            Path::new("."),
            &S3Options::default(),
        )
        .unwrap();
        let info = SubtaskInfo {
            job: "j".into(),
            vertex: "v".into(),
            index: 0,
            parallelism: 1,
            max_parallelism: 128,
        };
        let hooks = CheckpointHooks {
            storage: root.clone(),
            s3: S3Options::default(),
            report: Arc::new(|_| {}),
        };
        let big: Vec<u8> = (0..INLINE_STATE_LIMIT * 3).map(|i| i as u8).collect();
        let state = vec![
            NamedState {
                name: "small".into(),
                data: vec![1, 2, 3],
                path: None,
                stored: None,
                fixed_parallelism: false,
            },
            NamedState {
                name: "big".into(),
                data: big.clone(),
                path: None,
                stored: None,
                fixed_parallelism: true,
            },
        ];
        let op = OperatorState::new("sink:t".into(), None, &info, Vec::new());
        let taken = op.take(7, &info, state, dir.path()).unwrap();
        let barrier = Barrier {
            id: 7,
            kind: SnapshotKind::Checkpoint,
            target: None,
            stop: false,
            trace: None,
        };
        let (operators, full, uploaded) = upload_all(&hooks, &barrier, &info, &[taken]).unwrap();
        assert_eq!((full, uploaded), (big.len() as u64, big.len() as u64));
        let stored = &operators["sink:t"].state;
        assert_eq!(stored[0].data, vec![1, 2, 3], "small state stays inline");
        assert!(stored[1].data.is_empty() && stored[1].path.is_some());
        let metadata = CheckpointMetadata {
            format: 1,
            job: "j".into(),
            generation: 1,
            id: 7,
            kind: SnapshotKind::Checkpoint,
            trigger_time_ms: 0,
            max_parallelism: 128,
            operators: operators.into_iter().map(|(k, v)| (k, vec![v])).collect(),
            end_of_input: false,
        };
        let chk = root.child(&checkpoint_dir(7));
        chk.put(METADATA, serde_json::to_vec(&metadata).unwrap().into())
            .unwrap();
        let restored =
            RestoreSource::load(chk.url(), Path::new("."), &S3Options::default()).unwrap();
        let pieces = &restored.operator("sink:t")[0].state;
        assert_eq!(pieces[1].data, big);
        // a piece bound to its parallelism stays marked, inline or in a file of its own
        assert_eq!(
            (pieces[0].fixed_parallelism, pieces[1].fixed_parallelism),
            (false, true)
        );
        let conflict =
            crate::checkpoint::fixed_parallelism_conflict("sink:t", restored.operator("sink:t"), 2);
        assert!(
            conflict
                .as_deref()
                .is_some_and(|m| m.contains("parallelism 1") && m.contains("'big'")),
            "{conflict:?}"
        );
        assert_eq!(
            crate::checkpoint::fixed_parallelism_conflict("sink:t", restored.operator("sink:t"), 1),
            None
        );
    }
}

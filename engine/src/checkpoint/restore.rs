//! Reading a checkpoint or savepoint back: what an operator gets in `open`.
//!
//! Keyed state is matched by key group: a subtask downloads the RocksDB directories of the former
//! subtasks whose key groups overlap its own and keeps only its rows. The one sharing most key
//! groups with it becomes its instance as it is (its files unchanged, so a checkpoint of the
//! job's own references them instead of uploading them again); the rows it needs from the others
//! are ingested. Non-keyed state is handed out whole:
//! every subtask sees the pieces of every former subtask and picks its own (a source picks the
//! positions of the splits it now reads).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::upload::segment;
use super::{
    CheckpointMetadata, FileRef, METADATA, OperatorSnapshot, S3Options, SnapshotKind, Storage,
};
use crate::operator::SubtaskInfo;
use crate::state::{KeySet, KeyedBackend, KeyedTable, StateConfig, StateValue, Timers};
use crate::{EngineError, KeyGroupRange, Result};

/// A checkpoint or savepoint to start from.
#[derive(Debug, Clone)]
pub struct RestoreSource {
    /// The root its file paths are relative to.
    pub root: Storage,
    /// Where its metadata was read from.
    pub location: String,
    /// Its metadata.
    pub metadata: CheckpointMetadata,
    /// True when the restored files live in the job's own checkpoint storage, so new
    /// checkpoints may reference them instead of uploading them again.
    pub shared_with_job: bool,
}

/// The parent of a location (`s3://b/p/chk-1` → `s3://b/p`).
fn parent(location: &str) -> String {
    let t = location.trim_end_matches('/');
    match t.rsplit_once('/') {
        Some((p, _)) if !p.is_empty() && !p.ends_with(':') && !p.ends_with("s3:/") => p.to_string(),
        _ => ".".to_string(),
    }
}

impl RestoreSource {
    /// Reads the metadata at `location` (a checkpoint directory `.../chk-N` or a savepoint
    /// directory).
    pub fn load(location: &str, base: &Path, s3: &S3Options) -> Result<RestoreSource> {
        let dir = Storage::open(location, base, s3)?;
        let bytes = dir.get(METADATA)?.ok_or_else(|| {
            EngineError::Storage(format!(
                "{}: no {METADATA}: not a completed checkpoint or savepoint",
                dir.url()
            ))
        })?;
        let metadata: CheckpointMetadata = serde_json::from_slice(&bytes)
            .map_err(|e| EngineError::Storage(format!("{}/{METADATA}: {e}", dir.url())))?;
        let root = match metadata.kind {
            SnapshotKind::Savepoint => dir.clone(),
            // checkpoint files are relative to the job's checkpoint root, the parent directory
            SnapshotKind::Checkpoint => Storage::open(&parent(dir.url()), base, s3)?,
        };
        let mut metadata = metadata;
        // non-keyed state stored in files is read once, here
        for snap in metadata.operators.values_mut().flatten() {
            for n in snap.state.iter_mut() {
                if let Some(path) = n.path.take() {
                    n.data = match n.stored.take() {
                        Some((size, sum)) => root.get_verified(&path, size, Some(&sum))?.to_vec(),
                        None => root
                            .get(&path)?
                            .ok_or_else(|| {
                                EngineError::Storage(format!("{}/{path} is missing", root.url()))
                            })?
                            .to_vec(),
                    };
                }
            }
        }
        Ok(RestoreSource {
            root,
            location: dir.url().to_string(),
            metadata,
            shared_with_job: false,
        })
    }

    /// The snapshots of operator `uid`, one per former subtask.
    pub fn operator(&self, uid: &str) -> &[OperatorSnapshot] {
        self.metadata
            .operators
            .get(uid)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// What an operator can restore from in `open`, and where it gets its keyed state.
pub struct StateContext<'a> {
    info: &'a SubtaskInfo,
    uid: &'a str,
    config: &'a StateConfig,
    dir: PathBuf,
    restore: Option<&'a RestoreSource>,
    backend: Option<Arc<KeyedBackend>>,
    seeded: Vec<FileRef>,
    checkpointing: bool,
}

impl<'a> StateContext<'a> {
    pub(crate) fn new(
        info: &'a SubtaskInfo,
        uid: &'a str,
        config: &'a StateConfig,
        local_dir: &Path,
        restore: Option<&'a RestoreSource>,
        checkpointing: bool,
    ) -> Self {
        StateContext {
            info,
            uid,
            config,
            dir: local_dir.join(segment(uid)),
            restore,
            backend: None,
            seeded: Vec::new(),
            checkpointing,
        }
    }

    /// True when the job takes checkpoints: sinks then stage output and commit it when a
    /// checkpoint completes, instead of writing it straight away.
    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// Who is running.
    pub fn subtask(&self) -> &SubtaskInfo {
        self.info
    }

    /// True when the job starts from a checkpoint or savepoint that has state of this operator.
    pub fn is_restored(&self) -> bool {
        self.restore
            .is_some_and(|r| !r.operator(self.uid).is_empty())
    }

    /// The operator's keyed-state backend, opened (and filled from the restored snapshot) on
    /// first use.
    pub fn keyed(&mut self) -> Result<Arc<KeyedBackend>> {
        if let Some(b) = &self.backend {
            return Ok(b.clone());
        }
        let range = self.info.key_groups();
        let mp = self.info.max_parallelism;
        let olds: Vec<&OperatorSnapshot> = self
            .restore
            .map(|r| r.operator(self.uid))
            .unwrap_or(&[])
            .iter()
            .filter(|s| !s.files.is_empty() && s.key_groups.intersects(&range))
            .collect();
        let backend = if let Some(r) = self.restore.filter(|_| !olds.is_empty()) {
            if r.metadata.max_parallelism != mp {
                return Err(EngineError::State(format!(
                    "{} was taken with max_parallelism {} but the job has {mp}; keyed state cannot be redistributed across a different number of key groups",
                    r.location, r.metadata.max_parallelism
                )));
            }
            let mut parts = Vec::new();
            let mut downloads = Vec::new();
            for (i, old) in olds.iter().enumerate() {
                let dir = self.dir.with_extension(format!("restore-{i}"));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| EngineError::io(format!("clearing {}", dir.display()), e))?;
                }
                std::fs::create_dir_all(&dir)
                    .map_err(|e| EngineError::io(format!("creating {}", dir.display()), e))?;
                downloads.extend(old.files.iter().map(|f| (f, dir.join(&f.name))));
                parts.push((dir, old.key_groups));
            }
            download_all(&r.root, &downloads)?;
            // the files of the snapshot that becomes the instance as it is are already
            // stored where new checkpoints can reference them
            let ranges: Vec<KeyGroupRange> = olds.iter().map(|s| s.key_groups).collect();
            if let Some(base) = KeyedBackend::base_part(range, &ranges)
                && r.shared_with_job
            {
                self.seeded = olds[base]
                    .files
                    .iter()
                    .filter(|f| f.name.ends_with(".sst"))
                    .cloned()
                    .collect();
            }
            KeyedBackend::restore(&self.dir, self.config, range, mp, parts)?
        } else {
            KeyedBackend::open(&self.dir, self.config, range, mp)?
        };
        let backend = Arc::new(backend);
        self.backend = Some(backend.clone());
        Ok(backend)
    }

    /// Moves `table` into the operator's backend (see [`KeyedTable::attach`]).
    pub fn attach<V: StateValue>(&mut self, table: &mut KeyedTable<V>) -> Result<()> {
        let b = self.keyed()?;
        table.attach(&b)
    }

    /// Moves `set` into the operator's backend (see [`KeySet::attach`]).
    pub fn attach_set(&mut self, set: &mut KeySet) -> Result<()> {
        let b = self.keyed()?;
        set.attach(&b)
    }

    /// The operator's timer queue `name`, kept in its backend (holding the restored timers, if
    /// any).
    pub fn timers(&mut self, name: &str) -> Result<Timers> {
        let b = self.keyed()?;
        let mut timers = Timers::new(name);
        timers.attach(&b)?;
        Ok(timers)
    }

    /// The pieces of non-keyed state saved as `name` by every former subtask, with the former
    /// subtask's index and parallelism.
    pub fn operator_state(&self, name: &str) -> Vec<(u32, u32, &'a [u8])> {
        let Some(r) = self.restore else {
            return Vec::new();
        };
        r.operator(self.uid)
            .iter()
            .flat_map(|s| {
                s.state
                    .iter()
                    .filter(|n| n.name == name)
                    .map(|n| (s.subtask, s.parallelism, n.data.as_slice()))
            })
            .collect()
    }

    pub(crate) fn finish(self) -> (Option<Arc<KeyedBackend>>, Vec<FileRef>) {
        (self.backend, self.seeded)
    }
}

/// Files a restore downloads at once: object stores serve one stream far slower than several.
const PARALLEL_DOWNLOADS: usize = 4;

/// Downloads (and verifies) snapshot files into local paths, several at a time; the first
/// error stops the rest.
fn download_all(root: &Storage, files: &[(&FileRef, PathBuf)]) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let worker = || -> Result<()> {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some((f, path)) = files.get(i) else {
                return Ok(());
            };
            if failed.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(());
            }
            if let Err(e) = root.get_file(f, path) {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(e);
            }
        }
    };
    let workers = PARALLEL_DOWNLOADS.min(files.len());
    if workers <= 1 {
        return worker();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(worker)).collect();
        let mut result = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Every file arrives intact whatever order the workers take them in; from a local directory
    /// SST files are hard links to the snapshot's and other files copies; a damaged file fails
    /// the restore with the reason, before anything is linked.
    #[test]
    fn downloads_run_in_parallel_link_sst_files_and_a_damaged_file_fails_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = Storage::open(
            dir.path().to_str().unwrap(),
            dir.path(),
            &S3Options::default(),
        )
        .unwrap();
        let mut refs = Vec::new();
        for i in 0..13u8 {
            let data = vec![i; 1000 + i as usize];
            root.put(&format!("shared/f{i}"), data.clone().into())
                .unwrap();
            // SST files and others (MANIFEST, OPTIONS) alike
            let name = if i % 3 == 0 {
                format!("MANIFEST-{i:06}")
            } else {
                format!("{i:06}.sst")
            };
            refs.push(FileRef {
                name,
                path: format!("shared/f{i}"),
                size: data.len() as u64,
                checksum: Some(super::super::checksum(&data)),
            });
        }
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let files: Vec<(&FileRef, PathBuf)> = refs.iter().map(|f| (f, out.join(&f.name))).collect();
        download_all(&root, &files).unwrap();
        for (i, f) in refs.iter().enumerate() {
            let local = out.join(&f.name);
            assert_eq!(std::fs::read(&local).unwrap(), vec![i as u8; 1000 + i]);
            let shared = std::fs::metadata(&local).unwrap().ino()
                == std::fs::metadata(dir.path().join(&f.path)).unwrap().ino();
            assert_eq!(shared, f.name.ends_with(".sst"), "{}", f.name);
        }
        // on another file system (where the machine has one) nothing can be linked: copies
        if let Ok(other) = tempfile::tempdir_in("/dev/shm")
            && std::fs::metadata(other.path()).unwrap().dev()
                != std::fs::metadata(dir.path()).unwrap().dev()
        {
            let files: Vec<(&FileRef, PathBuf)> = refs
                .iter()
                .map(|f| (f, other.path().join(&f.name)))
                .collect();
            download_all(&root, &files).unwrap();
            for (i, (_, local)) in files.iter().enumerate() {
                assert_eq!(std::fs::read(local).unwrap(), vec![i as u8; 1000 + i]);
            }
        }
        // a damaged SST file is refused before it is linked, and so is a damaged copy
        for (bad, len) in [(7, 1007), (6, 1006)] {
            std::fs::remove_dir_all(&out).unwrap();
            std::fs::create_dir_all(&out).unwrap();
            let path = format!("shared/f{bad}");
            let good = std::fs::read(dir.path().join(&path)).unwrap();
            root.put(&path, vec![0xff; len].into()).unwrap();
            let e = download_all(&root, &files).unwrap_err();
            assert!(matches!(e, EngineError::Corrupt { .. }), "{e:?}");
            assert!(e.to_string().contains(&path), "{e}");
            root.put(&path, good.into()).unwrap();
        }
    }
}

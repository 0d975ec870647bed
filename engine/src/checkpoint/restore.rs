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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::upload::segment;
use super::{
    CheckpointMetadata, FileRef, METADATA, OperatorSnapshot, S3Options, SnapshotKind, Storage,
};
use crate::operator::SubtaskInfo;
use crate::state::backend::Restoring;
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
            let ranges: Vec<KeyGroupRange> = olds.iter().map(|s| s.key_groups).collect();
            let base = KeyedBackend::base_part(range, &ranges);
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
                downloads.extend(old.files.iter().map(|f| (i, f, dir.join(&f.name))));
                parts.push((dir, old.key_groups));
            }
            // the base's files first: its instance opens while the others download
            downloads.sort_by_key(|(i, _, _)| Some(*i) != base);
            // the files of the snapshot that becomes the instance as it is are already
            // stored where new checkpoints can reference them
            if let Some(base) = base
                && r.shared_with_job
            {
                self.seeded = olds[base]
                    .files
                    .iter()
                    .filter(|f| f.name.ends_with(".sst"))
                    .cloned()
                    .collect();
            }
            let target = Target {
                dir: &self.dir,
                config: self.config,
                range,
                max_parallelism: mp,
            };
            restore_while_downloading(&r.root, &target, parts, base, &downloads)?
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

/// A directory holding a downloaded snapshot, and the key groups it covered.
type Part = (PathBuf, KeyGroupRange);

/// A file to download: the index of its part, where it is stored, and where it goes.
type Download<'a> = (usize, &'a FileRef, PathBuf);

/// Where a restore puts the instance it builds.
struct Target<'a> {
    dir: &'a Path,
    config: &'a StateConfig,
    range: KeyGroupRange,
    max_parallelism: u32,
}

/// Restores the instance `target` from the snapshots in `parts` (directories to download into,
/// with the key groups each covered), `base` becoming the instance as it is: downloads `files`
/// (each with the index of its part) on threads of their own and, once a part's files are all
/// there, opens it as the instance (the base) or imports it (the others), so the work on the
/// parts that arrived overlaps the downloads of the rest.
fn restore_while_downloading(
    root: &Storage,
    target: &Target<'_>,
    parts: Vec<Part>,
    base: Option<usize>,
    files: &[Download<'_>],
) -> Result<KeyedBackend> {
    let left: Vec<AtomicUsize> = (0..parts.len())
        .map(|i| AtomicUsize::new(files.iter().filter(|(p, _, _)| *p == i).count()))
        .collect();
    let stop = AtomicBool::new(false);
    let (arrived, arrivals) = std::sync::mpsc::channel::<usize>();
    std::thread::scope(|s| {
        let downloads = std::thread::Builder::new()
            .name("restore-download".into())
            .spawn_scoped(s, || {
                let arrived = arrived;
                download_all(root, files, &stop, |part| {
                    if left[part].fetch_sub(1, Ordering::AcqRel) == 1 {
                        // the receiver is gone only once the restore failed
                        let _ = arrived.send(part);
                    }
                })
            })
            .map_err(|e| EngineError::io("starting a download thread", e))?;
        let restored = restore_arrivals(target, parts, base, &arrivals);
        if restored.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // a failed download explains a part that never arrived
        downloads
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        restored
    })
}

/// The restoring side of [`restore_while_downloading`]: takes parts as `arrivals` names them
/// until every part arrived or the downloads ended.
fn restore_arrivals(
    target: &Target<'_>,
    parts: Vec<Part>,
    base: Option<usize>,
    arrivals: &std::sync::mpsc::Receiver<usize>,
) -> Result<KeyedBackend> {
    let mut waiting: Vec<Option<Part>> = parts.into_iter().map(Some).collect();
    let begin = |base| {
        Restoring::begin(
            target.dir,
            target.config,
            target.range,
            target.max_parallelism,
            base,
        )
    };
    let mut restoring = match base {
        Some(_) => None,
        None => Some(begin(None)?),
    };
    let mut ready = Vec::new();
    while waiting.iter().any(Option::is_some) {
        let Ok(part) = arrivals.recv() else {
            return Err(EngineError::Storage(
                "the downloads of a snapshot ended before every file arrived".into(),
            ));
        };
        ready.push(part);
        if let Some(b) = base
            && restoring.is_none()
            && ready.contains(&b)
        {
            ready.retain(|p| *p != b);
            restoring = Some(begin(waiting[b].take())?);
        }
        if let Some(r) = restoring.as_mut() {
            for p in ready.drain(..) {
                if let Some(part) = waiting[p].take() {
                    r.add(part)?;
                }
            }
        }
    }
    restoring
        .map(Restoring::finish)
        .unwrap_or_else(|| begin(None).and_then(Restoring::finish))
}

/// Downloads (and verifies) `files` (each with the index of its part) into their local
/// paths, [`PARALLEL_DOWNLOADS`] at a time, calling `done` with a file's part once it is there;
/// the first error, or `stop` set, stops the rest.
fn download_all(
    root: &Storage,
    files: &[Download<'_>],
    stop: &AtomicBool,
    done: impl Fn(usize) + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let worker = || -> Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((part, f, path)) = files.get(i) else {
                return Ok(());
            };
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if let Err(e) = root.get_file(f, path) {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
            done(*part);
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
        let files: Vec<Download> = refs
            .iter()
            .enumerate()
            .map(|(i, f)| (i % 2, f, out.join(&f.name)))
            .collect();
        let done: Vec<AtomicUsize> = (0..2).map(|_| AtomicUsize::new(0)).collect();
        let stop = AtomicBool::new(false);
        download_all(&root, &files, &stop, |part| {
            done[part].fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        let done: Vec<usize> = done.iter().map(|d| d.load(Ordering::Relaxed)).collect();
        assert_eq!(done, [7, 6], "each file is reported once, with its part");
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
            let files: Vec<Download> = refs
                .iter()
                .map(|f| (0, f, other.path().join(&f.name)))
                .collect();
            download_all(&root, &files, &stop, |_| ()).unwrap();
            for (i, (_, _, local)) in files.iter().enumerate() {
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
            let e = download_all(&root, &files, &AtomicBool::new(false), |_| ()).unwrap_err();
            assert!(matches!(e, EngineError::Corrupt { .. }), "{e:?}");
            assert!(e.to_string().contains(&path), "{e}");
            root.put(&path, good.into()).unwrap();
        }
    }

    /// A restore opens its base snapshot and imports the others in whatever order their
    /// downloads finish, and ends with every row; a damaged file of another part fails it with
    /// the download's reason, and downloads that end early fail it rather than leave it waiting.
    #[test]
    fn a_restore_takes_its_parts_as_they_arrive() {
        use crate::state::KeyedTable;
        use crate::time::Watermark;
        let dir = tempfile::tempdir().unwrap();
        let config = crate::state::table::tests::config(dir.path(), 100_000);
        let keys: Vec<Vec<u8>> = (0..2000u32)
            .map(|i| format!("key-{i}").into_bytes())
            .collect();
        let root = Storage::open(
            dir.path().join("root").to_str().unwrap(),
            Path::new("."),
            &S3Options::default(),
        )
        .unwrap();
        // two snapshots of halves of the key groups, stored under p0/ and p1/
        let mut refs: Vec<Vec<FileRef>> = Vec::new();
        let mut ranges = Vec::new();
        for i in 0..2 {
            let range = KeyGroupRange::for_subtask(128, 2, i);
            let backend = Arc::new(
                KeyedBackend::open(&dir.path().join(format!("old-{i}")), &config, range, 128)
                    .unwrap(),
            );
            let mut t: KeyedTable<u64> = KeyedTable::new("t", None);
            t.attach(&backend).unwrap();
            for k in keys.iter().filter(|k| backend.owns(k)) {
                t.update(k, 0, 0, Watermark::MIN, || i as u64 + 1, |_| ())
                    .unwrap();
            }
            t.flush().unwrap();
            let snap = dir.path().join(format!("snap-{i}"));
            backend.checkpoint(&snap).unwrap();
            let mut files = Vec::new();
            for e in std::fs::read_dir(&snap).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().to_string();
                let data = std::fs::read(e.path()).unwrap();
                let path = format!("p{i}/{name}");
                root.put(&path, data.clone().into()).unwrap();
                files.push(FileRef {
                    name,
                    path,
                    size: data.len() as u64,
                    checksum: Some(super::super::checksum(&data)),
                });
            }
            refs.push(files);
            ranges.push(range);
        }
        let all = KeyGroupRange::for_subtask(128, 1, 0);
        let base = KeyedBackend::base_part(all, &ranges);
        assert!(base.is_some());
        let check = |backend: KeyedBackend| {
            // the base's SST files are the instance's, linked where they are stored
            for f in refs[base.unwrap()]
                .iter()
                .filter(|f| f.name.ends_with(".sst"))
            {
                let stored = dir.path().join("root").join(&f.path);
                let live = backend.dir().join(&f.name);
                assert_eq!(
                    std::fs::metadata(&stored).unwrap().ino(),
                    std::fs::metadata(&live).unwrap().ino(),
                    "{}",
                    f.name
                );
            }
            let backend = Arc::new(backend);
            let mut t: KeyedTable<u64> = KeyedTable::new("t", None);
            t.attach(&backend).unwrap();
            for k in &keys {
                let i = ranges.iter().position(|r| {
                    r.contains(crate::keys::key_group(crate::keys::hash_key(k), 128))
                });
                assert_eq!(
                    t.get(k, 0, Watermark::MIN).unwrap(),
                    Some(&(i.unwrap() as u64 + 1))
                );
            }
        };
        let target_dir = dir.path().join("restored");
        let target = Target {
            dir: &target_dir,
            config: &config,
            range: all,
            max_parallelism: 128,
        };
        let fetch = |case: &str| -> (Vec<Part>, Vec<Download<'_>>) {
            let mut parts = Vec::new();
            let mut files = Vec::new();
            for (i, r) in ranges.iter().enumerate() {
                let part = dir.path().join(format!("{case}-part-{i}"));
                let _ = std::fs::remove_dir_all(&part);
                std::fs::create_dir_all(&part).unwrap();
                files.extend(refs[i].iter().map(|f| (i, f, part.join(&f.name))));
                parts.push((part, *r));
            }
            (parts, files)
        };
        // downloaded on threads of their own
        let (parts, files) = fetch("threads");
        check(restore_while_downloading(&root, &target, parts, base, &files).unwrap());
        // the other part arriving before the base, and the base first
        for (case, order) in [("other-first", [1usize, 0]), ("base-first", [0, 1])] {
            let (parts, files) = fetch(case);
            let stop = AtomicBool::new(false);
            download_all(&root, &files, &stop, |_| ()).unwrap();
            let b = base.unwrap();
            let order = order.map(|o| if o == 0 { b } else { 1 - b });
            let (tx, rx) = std::sync::mpsc::channel();
            for p in order {
                tx.send(p).unwrap();
            }
            check(restore_arrivals(&target, parts, base, &rx).unwrap());
        }
        // downloads that ended with a part missing
        let (parts, _) = fetch("early");
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(base.unwrap()).unwrap();
        drop(tx);
        let e = restore_arrivals(&target, parts, base, &rx).err().unwrap();
        assert!(e.to_string().contains("before every file arrived"), "{e}");
        // a damaged file of the part that is not the base
        let other = 1 - base.unwrap();
        let bad = refs[other]
            .iter()
            .find(|f| f.name.ends_with(".sst"))
            .unwrap();
        root.put(&bad.path, vec![0u8; bad.size as usize].into())
            .unwrap();
        let (parts, files) = fetch("damaged");
        let e = restore_while_downloading(&root, &target, parts, base, &files)
            .err()
            .unwrap();
        assert!(matches!(e, EngineError::Corrupt { .. }), "{e:?}");
    }
}

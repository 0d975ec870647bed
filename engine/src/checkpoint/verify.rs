//! Checking a completed checkpoint or savepoint before it is used for a restore.
//!
//! [`verify`] lists the directories the metadata points into (one listing per top-level
//! directory, not a request per file) and checks that every referenced file is there with the
//! size the snapshot recorded. Contents are checked against the recorded checksums later, as
//! each file is downloaded ([`Storage::get_verified`]).
use std::collections::{BTreeSet, HashMap};

use super::{CheckpointMetadata, Storage};

/// The problems that make `metadata` (whose files are relative to `root`) unusable, or `Ok`.
/// `Err` names at most a few files, and says how many more there are.
pub fn verify(metadata: &CheckpointMetadata, root: &Storage) -> Result<(), String> {
    let mut wanted: Vec<(&str, u64)> = metadata
        .files()
        .map(|f| (f.path.as_str(), f.size))
        .collect();
    wanted.extend(
        metadata
            .operators
            .values()
            .flatten()
            .flat_map(|s| s.state.iter())
            .filter_map(|n| Some((n.path.as_deref()?, n.stored.as_ref()?.0))),
    );
    let dirs: BTreeSet<&str> = wanted
        .iter()
        .map(|(p, _)| p.split_once('/').map_or("", |(d, _)| d))
        .collect();
    let mut present = HashMap::new();
    for d in dirs {
        let listed = root
            .list_sized(d)
            .map_err(|e| format!("cannot list {}/{d}: {e}", root.url()))?;
        present.extend(listed);
    }
    let problems: Vec<String> = wanted
        .iter()
        .filter_map(|(path, size)| match present.get(*path) {
            None => Some(format!("{path} is missing")),
            Some(s) if s != size => Some(format!("{path} has {s} bytes, recorded {size}")),
            Some(_) => None,
        })
        .collect();
    match problems.len() {
        0 => Ok(()),
        n if n <= 3 => Err(problems.join("; ")),
        n => Err(format!("{}; and {} more", problems[..3].join("; "), n - 3)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyGroupRange;
    use crate::checkpoint::{FileRef, OperatorSnapshot, SnapshotKind};
    use std::path::Path;

    fn metadata(files: &[(&str, u64)]) -> CheckpointMetadata {
        let snap = OperatorSnapshot {
            subtask: 0,
            parallelism: 1,
            key_groups: KeyGroupRange::for_subtask(128, 1, 0),
            files: files
                .iter()
                .map(|(p, size)| FileRef {
                    name: p.rsplit('/').next().unwrap().into(),
                    path: p.to_string(),
                    size: *size,
                    checksum: None,
                })
                .collect(),
            state: Vec::new(),
        };
        CheckpointMetadata {
            format: 1,
            job: "j".into(),
            generation: 1,
            id: 2,
            kind: SnapshotKind::Checkpoint,
            trigger_time_ms: 0,
            max_parallelism: 128,
            operators: [("op".to_string(), vec![snap])].into(),
            end_of_input: false,
        }
    }

    fn local(dir: &Path) -> Storage {
        Storage::open(dir.to_str().unwrap(), Path::new("."), &Default::default()).unwrap()
    }

    /// Metadata written before `end_of_input` existed reads as not taken at the end of the
    /// input; the flag survives a round trip.
    #[test]
    fn metadata_without_the_end_of_input_flag_reads_as_before_the_end() {
        let old = r#"{"format":1,"job":"j","generation":1,"id":2,"kind":"checkpoint",
            "trigger_time_ms":0,"max_parallelism":128,"operators":{}}"#;
        let read: CheckpointMetadata = serde_json::from_str(old).unwrap();
        assert!(!read.end_of_input);
        let mut m = metadata(&[]);
        m.end_of_input = true;
        let back: CheckpointMetadata =
            serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn missing_and_resized_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = local(dir.path());
        root.put("shared/op/a.sst", vec![1u8; 10].into()).unwrap();
        root.put("shared/op/b.sst", vec![1u8; 10].into()).unwrap();
        root.put("chk-0000000002/op/0/MANIFEST-1", vec![1u8; 3].into())
            .unwrap();
        let good = metadata(&[
            ("shared/op/a.sst", 10),
            ("shared/op/b.sst", 10),
            ("chk-0000000002/op/0/MANIFEST-1", 3),
        ]);
        assert_eq!(verify(&good, &root), Ok(()));
        root.put("shared/op/b.sst", Vec::new().into()).unwrap();
        let err = verify(&good, &root).unwrap_err();
        assert_eq!(err, "shared/op/b.sst has 0 bytes, recorded 10");
        root.delete("chk-0000000002/op/0/MANIFEST-1").unwrap();
        let err = verify(&good, &root).unwrap_err();
        assert!(
            err.contains("chk-0000000002/op/0/MANIFEST-1 is missing"),
            "{err}"
        );
    }

    #[test]
    fn a_changed_byte_is_found_when_the_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = local(dir.path());
        let data = b"sst bytes".to_vec();
        let sum = crate::checkpoint::checksum(&data);
        root.put("shared/x.sst", data.clone().into()).unwrap();
        assert!(root.get_verified("shared/x.sst", 9, Some(&sum)).is_ok());
        root.put("shared/x.sst", b"sst bytez".to_vec().into())
            .unwrap();
        let err = root
            .get_verified("shared/x.sst", 9, Some(&sum))
            .unwrap_err();
        assert!(matches!(err, crate::EngineError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}

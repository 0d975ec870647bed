//! The job store: what a JobManager keeps in object storage so that another JobManager can take
//! over its jobs.
//!
//! One object per job, `jobs/<id>.json`: the job definition, where relative paths resolve, the
//! submit options, the generation of its first attempt, and whether it ended. The latest
//! completed checkpoint needs no pointer of its own: it is the newest checkpoint of that
//! generation or later in the job's checkpoint directory, whose metadata is written atomically
//! and last.
use serde::{Deserialize, Serialize};

use freshet_engine::checkpoint::Storage;
use freshet_job::JobSpec;

use crate::SubmitOptions;

/// A job as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// The definition.
    pub spec: JobSpec,
    /// Directory relative paths resolve against.
    pub base_dir: String,
    /// How it was submitted.
    pub options: SubmitOptions,
    /// Generation of its first attempt (0 before it started, or without checkpoints).
    pub first_generation: u64,
    /// Its latest attempt (a JobManager that resumes the job continues after it).
    #[serde(default)]
    pub attempt: u32,
    /// Whether it ended (finished, failed, cancelled).
    pub ended: bool,
    /// How it ended.
    pub outcome: Option<String>,
}

/// Jobs in object storage.
#[derive(Debug, Clone)]
pub struct JobStore {
    storage: Storage,
}

impl JobStore {
    /// Jobs under `storage`.
    pub fn new(storage: Storage) -> Self {
        JobStore { storage }
    }

    fn path(id: &str) -> String {
        format!("jobs/{id}.json")
    }

    /// Writes a record.
    pub fn put(&self, record: &JobRecord) -> Result<(), String> {
        let body = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
        self.storage
            .put(&Self::path(&record.id), body.into())
            .map_err(|e| format!("writing job {}: {e}", record.id))
    }

    /// Reads a record.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, String> {
        match self
            .storage
            .get(&Self::path(id))
            .map_err(|e| e.to_string())?
        {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("job record {id}: {e}")),
        }
    }

    /// The ids of every record (listed, not read).
    pub fn ids(&self) -> Result<Vec<String>, String> {
        Ok(self
            .storage
            .list("jobs")
            .map_err(|e| e.to_string())?
            .iter()
            .filter_map(|p| p.rsplit('/').next()?.strip_suffix(".json"))
            .map(str::to_string)
            .collect())
    }

    /// Every record.
    pub fn list(&self) -> Result<Vec<JobRecord>, String> {
        let mut out = Vec::new();
        for id in self.ids()? {
            if let Some(r) = self.get(&id)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut JobRecord)) -> Result<(), String> {
        let Some(mut r) = self.get(id)? else {
            return Ok(());
        };
        f(&mut r);
        self.put(&r)
    }

    /// Records that a job ended.
    pub fn mark_ended(&self, id: &str, outcome: &str) -> Result<(), String> {
        self.update(id, |r| {
            r.ended = true;
            r.outcome = Some(outcome.to_string());
        })
    }

    /// Records that attempt `attempt` started, and the generation of the first one.
    pub fn started(&self, id: &str, attempt: u32, first_generation: u64) -> Result<(), String> {
        self.update(id, |r| {
            r.attempt = attempt;
            r.first_generation = first_generation;
        })
    }
}

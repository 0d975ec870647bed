//! Helpers for the end-to-end tests: run an example job with its outputs redirected, and compare
//! JSON Lines outputs with expected files.
pub mod kafka;
pub mod schema_registry;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

use freshet_connectors::job_format;
use freshet_jobmanager::JobManager;
use freshet_jobmanager::JobState;
use freshet_plan::plan;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// Runs `examples/<name>/job.yaml` at `parallelism` with every file and table sink (and the
/// default dead-letter sink) writing into `out`. Returns the accumulated status.
pub fn run_example(name: &str, parallelism: u32, out: &Path) -> freshet_jobmanager::JobStatus {
    let dir = repo().join("examples").join(name);
    let job = dir.join("job.yaml");
    let spec = job_format().load(&job, &[]).expect("example job loads");
    let mut overrides = vec![format!("parallelism={parallelism}")];
    for (sink, s) in &spec.sinks {
        if let ("file" | "table", Some(path)) =
            (s.connector.kind.as_str(), s.connector.text("path"))
        {
            let file = Path::new(path).file_name().expect("file name");
            overrides.push(format!(
                "sinks.{sink}.connector.path={}",
                out.join(file).display()
            ));
        }
    }
    overrides.push("dead_letter.type=file".into());
    overrides.push(format!(
        "dead_letter.path={}",
        out.join("unrouted.jsonl").display()
    ));
    let spec = job_format()
        .load(&job, &overrides)
        .expect("overrides apply");
    let slots = plan(&spec, &dir).expect("example plans").slots_needed();
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, slots, events)
    });
    let handle = jm.submit(spec, dir).expect("submits");
    let status = handle.wait_timeout(Duration::from_secs(120));
    assert_eq!(
        status.state,
        JobState::Finished,
        "example {name} at parallelism {parallelism}"
    );
    status
}

/// Parses JSON Lines, turning string fields that hold JSON objects into objects (dead-letter
/// records carry the offending row as text).
pub fn read_rows(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| {
            let mut v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display()));
            if let Value::Object(m) = &mut v {
                for f in m.values_mut() {
                    if let Value::String(s) = f
                        && let Ok(o @ Value::Object(_)) = serde_json::from_str::<Value>(s)
                    {
                        *f = o;
                    }
                }
            }
            v
        })
        .collect()
}

/// Drops from each actual row the fields the expected rows do not specify (a dead letter's
/// `reason` text is checked by unit tests, not here), then sorts both sides.
pub fn comparable(expected: Vec<Value>, actual: Vec<Value>) -> (Vec<String>, Vec<String>) {
    let keys: Option<Vec<String>> = expected
        .first()
        .and_then(|v| v.as_object())
        .map(|m| m.keys().cloned().collect());
    let project = |v: Value| -> String {
        match (&keys, v) {
            (Some(keys), Value::Object(m))
                if !m.contains_key("reason") || keys.iter().any(|k| k == "reason") =>
            {
                serde_json::to_string(&Value::Object(m)).expect("serialises")
            }
            (Some(keys), Value::Object(m)) => {
                let kept: serde_json::Map<String, Value> =
                    m.into_iter().filter(|(k, _)| keys.contains(k)).collect();
                serde_json::to_string(&Value::Object(kept)).expect("serialises")
            }
            (_, v) => serde_json::to_string(&v).expect("serialises"),
        }
    };
    let mut e: Vec<String> = expected
        .into_iter()
        .map(|v| serde_json::to_string(&v).expect("serialises"))
        .collect();
    let mut a: Vec<String> = actual.into_iter().map(project).collect();
    e.sort();
    a.sort();
    (e, a)
}

//! A source subtask reading several splits judges each split's records against that split's own
//! watermark: a file read after another is not late because the earlier file ran ahead, and the
//! results are the same at every parallelism.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use freshet_connectors::job_format;
use freshet_jobmanager::{JobManager, JobState};
use freshet_tests::read_rows;

const JOB: &str = r#"
version: 1
name: splits
sources:
  clicks:
    connector: {type: file, path: in, format: jsonl}
    schema: {user: string, ts: timestamp}
    event_time: ts
transforms:
  counts:
    type: window
    input: clicks
    key_by: [user]
    window: {type: tumbling, size: 1m}
    aggregates: ["count(*) AS n"]
sinks:
  out: {input: counts, connector: {type: file, path: out.jsonl}}
  late: {input: counts.late, connector: {type: file, path: late.jsonl}}
"#;

/// Runs the job over `dir/in` with the source at `parallelism` and the window at `window`;
/// returns (window start, user) → count, and the number of late records.
fn run(dir: &Path, parallelism: u32, window: u32) -> (BTreeMap<(String, String), i64>, usize) {
    let out = dir.join(format!("p{parallelism}-{window}"));
    std::fs::create_dir_all(&out).unwrap();
    let overrides = [
        format!("parallelism={parallelism}"),
        format!("transforms.counts.parallelism={window}"),
        format!(
            "sinks.out.connector.path={}",
            out.join("out.jsonl").display()
        ),
        format!(
            "sinks.late.connector.path={}",
            out.join("late.jsonl").display()
        ),
    ];
    let spec = job_format().parse(JOB, "splits.yaml", &overrides).unwrap();
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, parallelism.max(window), events)
    });
    let handle = jm.submit(spec, dir.to_path_buf()).unwrap();
    let status = handle.wait_timeout(Duration::from_secs(60));
    assert_eq!(
        status.state,
        JobState::Finished,
        "parallelism {parallelism}"
    );
    let counts = read_rows(&out.join("out.jsonl"))
        .into_iter()
        .map(|r| {
            let key = (
                r["window_start"].as_str().unwrap().to_string(),
                r["user"].as_str().unwrap().to_string(),
            );
            (key, r["n"].as_i64().unwrap())
        })
        .collect();
    let late = std::fs::read_to_string(out.join("late.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0);
    (counts, late)
}

#[test]
fn a_file_read_after_another_is_judged_by_its_own_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    // two files covering the same ten minutes, each in order: one subtask reading a and then
    // b must not find b's records late because a reached 10:09
    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (file, user) in [("a.jsonl", "ann"), ("b.jsonl", "bob")] {
        let mut text = String::new();
        for minute in 0..10 {
            for second in [5, 35] {
                text.push_str(&format!(
                    "{{\"user\":\"{user}\",\"ts\":\"2026-01-01T10:{minute:02}:{second:02}Z\"}}\n"
                ));
            }
            *expected
                .entry((
                    format!("2026-01-01T10:{minute:02}:00.000Z"),
                    user.to_string(),
                ))
                .or_default() += 2;
        }
        std::fs::write(input.join(file), text).unwrap();
    }
    for (parallelism, window) in [(2, 2), (1, 1), (1, 2)] {
        let (counts, late) = run(dir.path(), parallelism, window);
        assert_eq!(
            late, 0,
            "late records at parallelism {parallelism}/{window}"
        );
        assert_eq!(counts, expected, "parallelism {parallelism}/{window}");
    }
}

/// Lateness within a split is judged against that split's watermark also after a shuffle: a
/// record out of order in its own file is late at every parallelism, including when one subtask
/// reads both files (its channel's watermark, the minimum of its files, is lower).
#[test]
fn a_record_late_in_its_own_file_is_late_at_every_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    // ann's file jumps to 10:05 and then goes back to 10:01: late for its own file
    let ann = ["10:00:05", "10:05:05", "10:01:10", "10:06:00"];
    let bob = ["10:00:20", "10:03:00", "10:07:00"];
    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (file, user, times) in [("a.jsonl", "ann", &ann[..]), ("b.jsonl", "bob", &bob[..])] {
        let mut text = String::new();
        for t in times {
            text.push_str(&format!(
                "{{\"user\":\"{user}\",\"ts\":\"2026-01-01T{t}Z\"}}\n"
            ));
            if *t != "10:01:10" {
                let minute = &t[..5];
                *expected
                    .entry((format!("2026-01-01T{minute}:00.000Z"), user.to_string()))
                    .or_default() += 1;
            }
        }
        std::fs::write(input.join(file), text).unwrap();
    }
    // (1, 2): one source subtask reads both files and shuffles to two window subtasks
    for (parallelism, window) in [(2, 2), (1, 1), (1, 2)] {
        let (counts, late) = run(dir.path(), parallelism, window);
        assert_eq!(
            late, 1,
            "late records at parallelism {parallelism}/{window}"
        );
        assert_eq!(counts, expected, "parallelism {parallelism}/{window}");
    }
}

/// Files written into a followed directory while the job runs are found by the JobManager and
/// each read by exactly one of the source's subtasks: every line once, none twice, also for a
/// file that appears while another is being read.
#[test]
fn new_files_in_a_followed_directory_are_assigned_and_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let lines = |from: i64, to: i64| -> String {
        (from..to).map(|n| format!("{{\"n\": {n}}}\n")).collect()
    };
    std::fs::write(input.join("a.jsonl"), lines(0, 10)).unwrap();
    let job = r#"
version: 1
name: follow
parallelism: 3
sources:
  s:
    connector: {type: file, path: in, format: jsonl, follow: true}
    schema: {n: int}
sinks:
  out: {input: s, connector: {type: file, path: out.jsonl}}
"#;
    let spec = job_format().parse(job, "follow.yaml", &[]).unwrap();
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, 3, events)
    });
    let handle = jm.submit(spec, dir.path().to_path_buf()).unwrap();
    let out = dir.path().join("out.jsonl");
    let wait_for = |want: Vec<i64>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut got: Vec<i64> = if out.exists() {
                read_rows(&out)
                    .iter()
                    .map(|r| r["n"].as_i64().unwrap())
                    .collect()
            } else {
                Vec::new()
            };
            got.sort();
            if got == want {
                return;
            }
            assert!(
                got.len() <= want.len() && std::time::Instant::now() < deadline,
                "got {got:?}, want {want:?}: {:?}",
                handle.status()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for((0..10).collect());
    for (i, name) in ["b", "c", "d", "e", "f", "g"].iter().enumerate() {
        let from = 10 + 10 * i as i64;
        std::fs::write(input.join(format!("{name}.jsonl")), lines(from, from + 10)).unwrap();
    }
    wait_for((0..70).collect());
    // more rounds of listing: nothing is read again
    std::thread::sleep(Duration::from_secs(3));
    wait_for((0..70).collect());
    assert_eq!(handle.status().state, JobState::Running);
    handle.cancel();
}

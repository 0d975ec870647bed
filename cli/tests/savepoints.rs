//! Savepoints through the CLI and the JobManager's control plane: a job runs at parallelism 2, is
//! stopped with a savepoint (`freshet stop --savepoint`), the savepoint directory is moved
//! elsewhere, and the job is restored from the moved copy at parallelism 1 and at 3 (key groups
//! redistributed). Each restored run's final output must equal the expected output computed by
//! `examples/reference.py`; at another `max_parallelism` it is refused. A job whose graph
//! changed is refused unless told to drop the unmatched state.
mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{Proc, args, check_output, copy_dir, freshet};

/// Runs `freshet` with `a` and `extra` to the end, without a control plane.
fn run_to_end(a: &[String], extra: &[&str]) -> Output {
    freshet()
        .args(a)
        .args(["--listen", "off"])
        .args(extra)
        .output()
        .unwrap()
}

/// Runs the example at parallelism 2 until stopped with a savepoint; returns the savepoint's
/// location and the output directory as it was at the stop.
fn stop_with_savepoint(name: &str, work: &Path) -> (String, PathBuf) {
    let out = work.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let chk = work.join("checkpoints").display().to_string();
    let mut a = args(name, 2, &out, &chk, 4.0);
    a.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let mut run = Proc::start(&a);
    let api = run
        .wait_for("JobManager listening on ")
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    std::thread::sleep(Duration::from_millis(1200));
    let o = freshet()
        .args(["stop", name, "--savepoint", "--dir"])
        .arg(work.join("savepoints"))
        .args(["--jobmanager", &api])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "stop --savepoint: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let path = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let (ok, log) = run.wait();
    assert!(ok, "the stopped job should end cleanly: {log}");
    assert!(
        Path::new(&path).join("_metadata").exists(),
        "savepoint {path} has metadata"
    );
    (path, out)
}

#[test]
fn savepoint_is_relocatable_and_rescales() {
    let name = "revenue-per-store";
    let work = tempfile::tempdir().unwrap();
    let (savepoint, out) = stop_with_savepoint(name, work.path());
    // the savepoint is self-contained: move it, and delete the checkpoints it came from
    let moved = work.path().join("moved-savepoint");
    std::fs::rename(&savepoint, &moved).unwrap();
    std::fs::remove_dir_all(work.path().join("checkpoints")).unwrap();
    for parallelism in [1, 3] {
        let copy = work.path().join(format!("out-{parallelism}"));
        copy_dir(&out, &copy);
        let chk = work.path().join(format!("chk-{parallelism}"));
        let mut a = args(name, parallelism, &copy, &chk.display().to_string(), 0.01);
        a.push("--restore".into());
        a.push(moved.display().to_string());
        let o = run_to_end(&a, &[]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "restore at {parallelism}: {stderr}");
        assert!(stderr.contains("restoring from"), "{stderr}");
        check_output(
            name,
            &copy,
            &format!("{name} stopped at parallelism 2, restored at {parallelism}"),
        );
    }
    // keyed state split into another number of key groups is refused before anything runs
    let chk = work.path().join("chk-mp");
    let mut a = args(name, 2, &out, &chk.display().to_string(), 0.01);
    a.extend([
        "--restore".into(),
        moved.display().to_string(),
        "--set".into(),
        "max_parallelism=64".into(),
    ]);
    let o = run_to_end(&a, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("max_parallelism 128 but the job has 64")
            && !stderr.contains("restoring from"),
        "{stderr}"
    );
}

#[test]
fn changed_graph_is_refused_unless_state_may_be_dropped() {
    let name = "revenue-per-store";
    let work = tempfile::tempdir().unwrap();
    let (savepoint, out) = stop_with_savepoint(name, work.path());
    // the same job with the window renamed: its state has no operator to go to
    let original = common::repo().join("examples").join(name);
    let changed = work.path().join("changed");
    copy_dir(&original, &changed);
    let job = changed.join("job.yaml");
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(
        &job,
        text.replace(
            "  revenue:\n    type: window",
            "  revenue_v2:\n    type: window",
        )
        .replace("input: revenue\n", "input: revenue_v2\n")
        .replace("input: revenue.late", "input: revenue_v2.late"),
    )
    .unwrap();
    let mut a = args(
        name,
        2,
        &out,
        &work.path().join("c2").display().to_string(),
        0.01,
    );
    a[1] = job.display().to_string();
    a.push("--restore".into());
    a.push(savepoint.clone());
    let o = run_to_end(&a, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("'revenue'") && stderr.contains("--allow-non-restored-state"),
        "{stderr}"
    );
    let o = run_to_end(&a, &["--allow-non-restored-state"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

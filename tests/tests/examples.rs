//! The worked examples of the product brief, run through the real JobManager/TaskManager path at
//! parallelism 1 and 4, compared with the expected outputs computed independently by
//! `examples/reference.py`, and compared run against run for determinism.
use freshet_tests::{comparable, read_rows, repo, run_example};

fn check(name: &str) {
    let expected_dir = repo().join("examples").join(name).join("expected");
    let mut first: Option<Vec<(String, Vec<u8>)>> = None;
    for (parallelism, round) in [(1, 0), (4, 0), (4, 1)] {
        let out = tempfile::tempdir().expect("temp dir");
        run_example(name, parallelism, out.path());
        let mut files: Vec<_> = std::fs::read_dir(&expected_dir)
            .expect("expected dir")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        let mut outputs = Vec::new();
        for exp in &files {
            let file = exp.file_name().expect("name");
            let actual = out.path().join(file);
            let (e, a) = comparable(read_rows(exp), read_rows(&actual));
            assert_eq!(
                a,
                e,
                "{name} at parallelism {parallelism}: {} differs from the expected output",
                file.to_string_lossy()
            );
            let text = std::fs::read_to_string(&actual).expect("read");
            let mut lines: Vec<&str> = text.lines().collect();
            lines.sort_unstable();
            outputs.push((
                file.to_string_lossy().into_owned(),
                lines.join("\n").into_bytes(),
            ));
        }
        let unrouted = out.path().join("unrouted.jsonl");
        let unrouted = std::fs::read_to_string(&unrouted).unwrap_or_default();
        assert!(
            unrouted.is_empty(),
            "{name}: records reached the default dead-letter sink:\n{unrouted}"
        );
        // Table files are written sorted by key, so they must be byte-identical between runs;
        // append-only files are compared as sorted lines (subtasks interleave at parallelism > 1).
        match &first {
            None => first = Some(outputs),
            Some(f) => assert_eq!(
                f, &outputs,
                "{name}: output differs between runs (round {round})"
            ),
        }
    }
}

#[test]
fn unique_visitors() {
    check("unique-visitors");
}

#[test]
fn failed_logins() {
    check("failed-logins");
}

#[test]
fn user_sessions() {
    check("user-sessions");
}

#[test]
fn cdc_dedup() {
    check("cdc-dedup");
}

#[test]
fn revenue_per_store() {
    check("revenue-per-store");
}

#[test]
fn orders_paid() {
    check("orders-paid");
}

#[test]
fn rolling_revenue() {
    check("rolling-revenue");
}

/// The committed expected outputs are exactly what the reference model computes from the
/// committed inputs (so neither can drift from the other unnoticed).
#[test]
fn expected_outputs_come_from_the_reference_model() {
    let out = tempfile::tempdir().expect("temp dir");
    let status = std::process::Command::new("python3")
        .arg(repo().join("examples/reference.py"))
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("python3 runs the reference model");
    assert!(status.success());
    for example in [
        "unique-visitors",
        "failed-logins",
        "user-sessions",
        "cdc-dedup",
        "revenue-per-store",
        "orders-paid",
        "rolling-revenue",
    ] {
        let committed = repo().join("examples").join(example).join("expected");
        for entry in std::fs::read_dir(&committed).expect("expected dir") {
            let path = entry.expect("entry").path();
            let fresh = out
                .path()
                .join(example)
                .join(path.file_name().expect("name"));
            assert_eq!(
                std::fs::read_to_string(&path).expect("committed"),
                std::fs::read_to_string(&fresh).expect("recomputed"),
                "{} is not what examples/reference.py computes",
                path.display()
            );
        }
    }
}

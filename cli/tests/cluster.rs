//! The distributed runtime as real processes on loopback: one `freshet jobmanager` and three
//! `freshet taskmanager` processes (two slots each) run an example at parallelism 6 with
//! 1-second checkpoints, so every keyed exchange crosses process boundaries.
//!
//! - A TaskManager is killed with SIGKILL mid-stream and a replacement started: the job waits
//!   for slots, restarts from its latest checkpoint, and its committed output must equal the
//!   expected output of the independent reference model (`examples/<name>/expected/`).
//! - The JobManager is killed with SIGKILL mid-stream and restarted with the same
//!   high-availability directory: it takes the leader lease, resumes the job from the job store
//!   and its latest checkpoint, and the output must again be exactly the expected one.
//! - A job that never started before its JobManager died starts on the next one as it was
//!   submitted (`--fresh`), not from checkpoints its directory already held.
//! - A subtask stuck where cancellation cannot reach it makes its TaskManager exit after the
//!   cancellation timeout, so the job does not hang in cancellation.
//! - A TaskManager frozen with SIGSTOP past the heartbeat timeout, resumed after the job
//!   restarted elsewhere, does not disturb the restarted job or its checkpoints.
//! - Cancelling a job that waits for slots through the HTTP API leaves the JobManager serving
//!   and scheduling.
//! - Watermark alignment holds a source on one TaskManager to the drift of a slower source on
//!   the other, through the heartbeats' counters.
//! - S3 credentials given as references reach the processes that use them, and a planted
//!   secret appears in no log, job store file, state file or client output.
//! - The probes' endpoints: `/healthz` and `/readyz` of both processes, a TaskManager ready
//!   only while registered with its JobManager, and their `/metrics`.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Cluster, Proc, args, assert_restored_from_checkpoint, check_output, free_port, freshet,
    http_get, job_state, jobmanager, run_submit, submit, taskmanager, taskmanager_with,
    wait_until_ended,
};

fn a_taskmanager_is_killed(name: &str) {
    let mut c = Cluster::start(3);
    let id = submit(name, &c.address, &c.out, &c.checkpoints(), 10.0);
    // let it run and complete a few checkpoints, then kill a TaskManager
    c.jm.wait_for("checkpoint completed");
    std::thread::sleep(Duration::from_millis(1500));
    c.tms[1].kill();
    assert_eq!(
        job_state(&c.address, &id).unwrap().0,
        "running",
        "{name}: the job ended before the kill; slow it down"
    );
    // the restart finds 4 free slots and waits for the replacement
    c.jm.wait_for("waiting for 6 free slots");
    c.tms[1] = taskmanager(&c.address, "tm-3", &c.state);
    let (state_name, restarts) = wait_until_ended(&c.address, &id, &c.procs());
    assert_eq!(state_name, "finished", "{name}:\n{}", c.jm.log());
    assert!(restarts >= 1, "{name}: the job never restarted");
    assert!(
        c.jm.log().contains("TaskManager lost"),
        "{name}: the JobManager never noticed the lost TaskManager"
    );
    assert_restored_from_checkpoint(&c.jm, name);
    check_output(name, &c.out, &format!("{name} with a TaskManager killed"));
}

fn the_jobmanager_is_killed(name: &str) {
    let mut c = Cluster::start(3);
    let id = submit(name, &c.address, &c.out, &c.checkpoints(), 10.0);
    c.jm.wait_for("checkpoint completed");
    std::thread::sleep(Duration::from_millis(1500));
    c.jm.kill();
    // a new JobManager on the same address and HA directory takes over
    c.jm = jobmanager(&c.address, &c.ha);
    c.jm.wait_for("resuming a job");
    let (state_name, _) = wait_until_ended(&c.address, &id, &c.procs());
    assert_eq!(state_name, "finished", "{name}:\n{}", c.jm.log());
    assert_restored_from_checkpoint(&c.jm, name);
    assert!(
        c.jm.log().contains("leader epoch 2"),
        "{name}: the new JobManager did not take the next epoch:\n{}",
        c.jm.log()
    );
    check_output(name, &c.out, &format!("{name} with the JobManager killed"));
}

#[test]
fn orders_paid_survives_a_killed_taskmanager() {
    a_taskmanager_is_killed("orders-paid");
}

#[test]
fn revenue_survives_a_killed_taskmanager() {
    a_taskmanager_is_killed("revenue-per-store");
}

#[test]
fn orders_paid_survives_a_killed_jobmanager() {
    the_jobmanager_is_killed("orders-paid");
}

#[test]
fn revenue_survives_a_killed_jobmanager() {
    the_jobmanager_is_killed("revenue-per-store");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Counters of a job's vertex, from `freshet status`.
fn vertex_metrics(address: &str, id: &str, vertex: usize) -> serde_json::Value {
    let o = freshet()
        .args(["status", id, "--jobmanager", address])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["vertices"][vertex]["metrics"].clone()
}

/// A JobManager (its address and process) and two TaskManagers of one slot each, state under
/// `work`: a job at parallelism 2 runs subtasks 0 of its vertices on one and subtasks 1 on the
/// other.
fn two_taskmanagers(work: &Path) -> (String, Proc, Vec<Proc>) {
    let address = format!("127.0.0.1:{}", free_port());
    let jm = jobmanager(&address, &work.join("ha"));
    let state = work.join("state");
    let tms = (0..2)
        .map(|i| taskmanager_with(&address, &format!("tm-{i}"), &state, 1, &[]))
        .collect();
    (address, jm, tms)
}

/// Two unbounded generator subtasks, one per TaskManager process, feed a keyed operator whose
/// sink takes at most 2,000 rows per second. Every record has the same key, so one subtask gets
/// them all, and the source on the other TaskManager reaches it only over the network.
/// Credit-based flow control must slow both sources to the sink's pace, with the TaskManagers'
/// memory staying flat.
#[test]
fn a_slow_sink_slows_the_sources_with_flat_memory() {
    let work = tempfile::tempdir().unwrap();
    let (address, jm, tms) = two_taskmanagers(work.path());
    let job = work.path().join("job.yaml");
    std::fs::write(
        &job,
        "version: 1
name: backpressure
parallelism: 2
pipeline: {batch_size: 256, channel_capacity: 4}
sources:
  gen:
    connector:
      type: generator
      fields: {k: \"seq % 1\", v: seq, ts: seq}
    event_time: ts
    watermark: {max_out_of_orderness: 1s}
transforms:
  latest:
    type: deduplicate
    input: gen
    key: [k]
    keep: latest
    order_by: v
    ttl: 1000d
sinks:
  out:
    input: latest
    connector: {type: blackhole, rows_per_second: 2000}
",
    )
    .unwrap();
    let id = run_submit(&["submit", job.to_str().unwrap(), "--jobmanager", &address]);
    let sample = || {
        let source = vertex_metrics(&address, &id, 0);
        let sink = vertex_metrics(&address, &id, 1);
        let rss: u64 = tms.iter().map(|t| rss_kib(t.pid())).sum();
        (
            source["records_in"].as_u64().unwrap_or(0),
            source["backpressured_ns"].as_u64().unwrap_or(0),
            sink["records_written"].as_u64().unwrap_or(0),
            rss,
        )
    };
    std::thread::sleep(Duration::from_secs(6));
    let (in1, blocked1, out1, rss1) = sample();
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let (in2, blocked2, out2, rss2) = sample();
    let secs = t1.elapsed().as_secs_f64();
    let rate = (in2 - in1) as f64 / secs;
    let written = (out2 - out1) as f64 / secs;
    let blocked = (blocked2 - blocked1) as f64 / 1e9 / secs / 2.0;
    eprintln!(
        "sources read {rate:.0} rows/s, the sink wrote {written:.0} rows/s (it takes at most 2000/s); sources blocked {:.0}% of the time; TaskManager memory {} MiB -> {} MiB",
        blocked * 100.0,
        rss1 / 1024,
        rss2 / 1024
    );
    assert!(in1 > 0, "the job did not start:\n{}", jm.log());
    // unthrottled, the sources read over a million rows per second here
    assert!(
        rate < 10_000.0,
        "the sources ran at {rate:.0} rows/s, far above what the sink takes"
    );
    assert!(
        blocked > 0.5,
        "the sources were blocked only {:.0}% of the time",
        blocked * 100.0
    );
    assert!(
        rss2 < rss1 + 64 * 1024,
        "TaskManager memory grew from {} MiB to {} MiB",
        rss1 / 1024,
        rss2 / 1024
    );
    let o = freshet()
        .args(["cancel", &id, "--jobmanager", &address])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `freshet run --processes` starts a JobManager and TaskManagers as processes of their own,
/// runs the job across them, prints the summary and stops them.
#[test]
fn run_with_processes_gives_the_expected_output() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let chk = work.path().join("checkpoints").display().to_string();
    let mut a = args("orders-paid", 4, &out, &chk, 1.0);
    a.extend(["--processes", "--taskmanagers", "2"].map(String::from));
    let o = freshet().args(&a).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("TaskManager process taskmanager-").count(),
        2,
        "{stderr}"
    );
    assert!(stderr.contains("job orders-paid-0 in"), "{stderr}");
    check_output("orders-paid", &out, "orders-paid with --processes");
}

/// A sink blocked opening a FIFO nobody reads cannot see its cancellation. After the
/// TaskManager's cancellation timeout, the TaskManager exits (code 70) naming the subtask, the
/// JobManager counts it lost, and the cancelled job ends instead of hanging.
#[test]
fn a_subtask_that_ignores_cancellation_makes_its_taskmanager_exit() {
    let work = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let jm = jobmanager(&address, &work.path().join("ha"));
    let mut tm = taskmanager_with(
        &address,
        "tm-stuck",
        &work.path().join("state"),
        1,
        &["--cancellation-timeout", "2s"],
    );
    let fifo = work.path().join("never-read");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let job = work.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "version: 1
name: stuck
sources:
  gen:
    connector: {{type: generator, rows_per_second: 100, fields: {{a: seq}}}}
sinks:
  out: {{input: gen, connector: {{type: file, path: {}}}}}
",
            fifo.display()
        ),
    )
    .unwrap();
    let id = run_submit(&["submit", job.to_str().unwrap(), "--jobmanager", &address]);
    jm.wait_for("deploying");
    // give the sink time to block in open()
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(job_state(&address, &id).unwrap().0, "running");
    let cancelled = Instant::now();
    let o = freshet()
        .args(["cancel", &id, "--jobmanager", &address])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let code = tm.exit_within(Duration::from_secs(30));
    assert_eq!(code, Some(70), "TaskManager log:\n{}", tm.log());
    let waited = cancelled.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "exited {waited:?} after the cancel, before the timeout:\n{}",
        tm.log()
    );
    let log = tm.log();
    assert!(
        log.contains("subtask 0 of job") && log.contains("did not stop within 2s"),
        "{log}"
    );
    let (state, _) = wait_until_ended(&address, &id, &[&jm]);
    assert_eq!(state, "cancelled", "{}", jm.log());
}

/// A job submitted with `--fresh` waits for slots when its JobManager is killed. The next
/// JobManager resumes it, and it must still start fresh, although its checkpoint directory holds
/// completed checkpoints of an earlier run.
#[test]
fn a_resumed_job_that_never_started_starts_as_submitted() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let chk = work.path().join("checkpoints");
    let mut a = args("orders-paid", 1, &out, &chk.display().to_string(), 0.5);
    // an earlier run leaves completed checkpoints behind
    let o = freshet()
        .args(&a)
        .args(["--listen", "off"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read_dir(chk.join("orders-paid"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("chk-")),
        "the first run left no checkpoint"
    );
    let address = format!("127.0.0.1:{}", free_port());
    let ha = work.path().join("ha");
    let mut jm = jobmanager(&address, &ha);
    a[0] = "submit".into();
    a.extend(["--fresh", "--jobmanager", &address].map(String::from));
    let id = run_submit(&a);
    // no TaskManager yet: the job waits, and its JobManager dies
    jm.wait_for("waiting for 1 free slots");
    jm.kill();
    let jm = jobmanager(&address, &ha);
    jm.wait_for("resuming");
    let _tm = taskmanager(&address, "tm-0", &work.path().join("state"));
    let (state, _) = wait_until_ended(&address, &id, &[&jm]);
    assert_eq!(state, "finished", "{}", jm.log());
    let deploying = jm.wait_for("deploying");
    assert!(
        deploying.contains("restored_from=\"-\""),
        "the resumed job did not start fresh: {deploying}"
    );
}

/// Sends one HTTP/1.1 request and returns the status line and body.
fn http(address: &str, method: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    (status, body.to_string())
}

#[test]
fn an_http_cancel_of_a_waiting_job_leaves_the_jobmanager_working() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let http_address = format!("127.0.0.1:{}", free_port());
    let jm = Proc::start(&[
        "jobmanager".into(),
        "--listen".into(),
        address.clone(),
        "--http".into(),
        http_address.clone(),
        "--ha-dir".into(),
        work.path().join("ha").display().to_string(),
    ]);
    jm.wait_for("JobManager listening on");
    let chk = work.path().join("checkpoints").display().to_string();
    let mut a = args("orders-paid", 1, &out, &chk, 0.5);
    a[0] = "submit".into();
    a.extend(["--jobmanager".into(), address.clone()]);
    // no TaskManager: the job waits for a slot when it is cancelled over HTTP
    let first = run_submit(&a);
    jm.wait_for("waiting for 1 free slots");
    let (status, body) = http(&http_address, "POST", &format!("/jobs/{first}/cancel"));
    assert!(status.contains("200"), "{status}: {body}\n{}", jm.log());
    assert_eq!(
        job_state(&address, &first).map(|s| s.0).as_deref(),
        Some("cancelled"),
        "{}",
        jm.log()
    );
    // the JobManager still lists, schedules and runs jobs
    let (status, body) = http(&http_address, "GET", "/jobs");
    assert!(
        status.contains("200") && body.contains(&first),
        "{status}: {body}"
    );
    let second = run_submit(&a);
    let _tm = taskmanager(&address, "tm-0", &work.path().join("state"));
    let (state, _) = wait_until_ended(&address, &second, &[&jm]);
    assert_eq!(state, "finished", "{}", jm.log());
    check_output("orders-paid", &out, "after an HTTP cancel");
    assert!(!jm.log().contains("panicked"), "{}", jm.log());
}

/// Every file under `dir`, read as text (lossily).
fn files_text(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((
                    p.display().to_string(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ));
            }
        }
    }
    out
}

/// S3 credentials are given to a job as references (`env:NAME`): the JobManager and the
/// TaskManager each read them from their own environment, checkpoints go to a real S3 server,
/// and the planted secret appears in no log, no file of the job store, no checkpoint file and
/// no status a client sees. A literal secret in a job is refused without being repeated.
#[test]
fn secrets_are_referenced_never_stored_logged_or_shown() {
    const SECRET: &str = "planted-s3-secret-7f3a9c";
    const KEY: &str = "planted-s3-key-id-51d0";
    let s3 = common::S3Server::start();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let ha = work.path().join("ha");
    let address = format!("127.0.0.1:{}", free_port());
    let env = [
        ("FRESHET_TEST_S3_KEY", KEY),
        ("FRESHET_TEST_S3_SECRET", SECRET),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let jm = Proc::start_env(
        &[
            "jobmanager".into(),
            "--listen".into(),
            address.clone(),
            "--ha-dir".into(),
            ha.display().to_string(),
        ],
        &env,
    );
    jm.wait_for("JobManager listening on");
    let tm = Proc::start_env(
        &[
            "taskmanager".into(),
            "--jobmanager".into(),
            address.clone(),
            "--slots".into(),
            "2".into(),
            "--id".into(),
            "tm-0".into(),
            "--state-dir".into(),
            work.path().join("state").display().to_string(),
        ],
        &env,
    );
    tm.wait_for("listening on");
    let mut a = args("orders-paid", 2, &out, "s3://freshet/secrets", 1.0);
    a[0] = "submit".into();
    for set in [
        format!("checkpointing.s3.endpoint={}", s3.endpoint),
        "checkpointing.s3.region=us-east-1".into(),
        "checkpointing.s3.access_key_id=env:FRESHET_TEST_S3_KEY".into(),
        "checkpointing.s3.secret_access_key=env:FRESHET_TEST_S3_SECRET".into(),
    ] {
        a.extend(["--set".into(), set]);
    }
    a.extend(["--jobmanager".into(), address.clone()]);
    let id = run_submit(&a);
    let (state, _) = wait_until_ended(&address, &id, &[&jm, &tm]);
    assert_eq!(state, "finished", "{}\n----\n{}", jm.log(), tm.log());
    check_output("orders-paid", &out, "with referenced S3 credentials");
    let checkpoints = freshet()
        .args(["checkpoints", &id, "--jobmanager", &address])
        .output()
        .unwrap();
    assert!(checkpoints.status.success());
    let shown = String::from_utf8_lossy(&checkpoints.stdout).into_owned();
    assert!(shown.contains("s3://freshet/secrets"), "{shown}");
    let status = freshet()
        .args(["status", &id, "--jobmanager", &address])
        .output()
        .unwrap();
    let mut seen = vec![
        ("JobManager log".to_string(), jm.log()),
        ("TaskManager log".to_string(), tm.log()),
        ("freshet checkpoints".to_string(), shown),
        (
            "freshet status".to_string(),
            String::from_utf8_lossy(&status.stdout).into_owned()
                + &String::from_utf8_lossy(&status.stderr),
        ),
    ];
    let store = files_text(&ha);
    assert!(
        store
            .iter()
            .any(|(_, t)| t.contains("env:FRESHET_TEST_S3_SECRET")),
        "the job store does not hold the job's reference: {:?}",
        store.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    seen.extend(store);
    seen.extend(files_text(&work.path().join("state")));
    for (what, text) in &seen {
        for planted in [SECRET, KEY] {
            assert!(!text.contains(planted), "{what} contains a planted secret");
        }
    }

    // a literal secret is refused, and the refusal does not repeat it
    let job = common::repo().join("examples/orders-paid/job.yaml");
    let o = freshet()
        .arg("validate")
        .arg(&job)
        .args([
            "--set",
            &format!("checkpointing.s3.secret_access_key={SECRET}"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("checkpointing.s3.secret_access_key"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(SECRET),
        "the refusal repeats the secret: {stderr}"
    );
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped
    let rc = unsafe { libc::kill(p.pid() as i32, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", p.pid());
}

/// A TaskManager is frozen with SIGSTOP past the heartbeat timeout: the JobManager declares it
/// lost and restarts the job on the other two. Once the restarted attempt has completed a
/// checkpoint, the frozen TaskManager is resumed with its subtasks of the old attempt still in
/// their threads; then another TaskManager is SIGKILLed, so the job restores again, from
/// checkpoints taken while the zombie was awake. The output must still be exactly the expected
/// one, and no checkpoint may be found damaged.
#[test]
fn a_frozen_taskmanager_that_wakes_up_does_not_corrupt_the_restarted_job() {
    let name = "revenue-per-store";
    let mut c = Cluster::start(3);
    let mut a = args(
        name,
        4,
        &c.out,
        &c.checkpoints().display().to_string(),
        20.0,
    );
    a[0] = "submit".into();
    a.extend(["--set".into(), "checkpointing.interval=500ms".into()]);
    a.extend(["--jobmanager".into(), c.address.clone()]);
    let id = run_submit(&a);
    c.jm.wait_for("checkpoint completed");
    std::thread::sleep(Duration::from_millis(1000));
    // freeze a TaskManager that runs part of the job (with p=4 on 3x2 slots, all do)
    signal(&c.tms[1], libc::SIGSTOP);
    c.jm.wait_for("TaskManager lost");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c
        .jm
        .log()
        .lines()
        .any(|l| l.contains("deploying") && l.contains("attempt=1"))
    {
        assert!(Instant::now() < deadline, "no restart:\n{}", c.jm.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let completed_before = c.jm.log().matches("checkpoint completed").count();
    while c.jm.log().matches("checkpoint completed").count() < completed_before + 2 {
        assert!(Instant::now() < deadline, "no checkpoint after the restart");
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(&c.tms[1], libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        job_state(&c.address, &id).unwrap().0,
        "running",
        "the job ended before the second failure; slow it down"
    );
    c.tms[0].kill();
    c.tms.push(taskmanager(&c.address, "tm-3", &c.state));
    let procs = c.procs();
    let (state_name, restarts) = wait_until_ended(&c.address, &id, &procs);
    assert_eq!(state_name, "finished", "{}", c.jm.log());
    assert!(restarts >= 2, "{restarts} restart(s)");
    let logs: String = procs.iter().map(|p| p.log()).collect::<Vec<_>>().join("\n");
    assert!(!logs.contains("is corrupt"), "{logs}");
    // the frozen one woke up to find itself forgotten, and registered again (dropping what
    // was left of the old attempt)
    assert!(
        c.tms[1].log().contains("registering again"),
        "{}",
        c.tms[1].log()
    );
    check_output(name, &c.out, "after a frozen TaskManager woke up");
}

fn free_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The probes' endpoints: the JobManager and the TaskManager answer `/healthz` and `/readyz`;
/// a TaskManager is ready only while it is registered with the JobManager.
#[test]
fn processes_serve_health_endpoints() {
    let jm_listen = free_address();
    let tm_health = free_address();
    // the TaskManager first, with no JobManager to register with: alive, not ready
    let tm = Proc::start(&[
        "taskmanager".into(),
        "--jobmanager".into(),
        jm_listen.clone(),
        "--health".into(),
        tm_health.clone(),
    ]);
    tm.wait_for("listening on");
    let (code, body) = http_get(&tm_health, "/healthz");
    assert_eq!((code, body.trim()), (200, "taskmanager alive"));
    let (code, body) = http_get(&tm_health, "/readyz");
    assert_eq!((code, body.trim()), (503, "taskmanager not ready"));

    let jm_health = free_address();
    let mut jm = Proc::start(&[
        "jobmanager".into(),
        "--listen".into(),
        jm_listen.clone(),
        "--health".into(),
        jm_health.clone(),
        "--heartbeat-interval".into(),
        "200ms".into(),
        "--heartbeat-timeout".into(),
        "1s".into(),
    ]);
    jm.wait_for("JobManager listening on ");
    tm.wait_for("registered with the JobManager");
    for (addr, who) in [(&jm_health, "jobmanager"), (&tm_health, "taskmanager")] {
        let (code, body) = http_get(addr, "/healthz");
        assert_eq!((code, body.trim()), (200, format!("{who} alive").as_str()));
        let (code, body) = http_get(addr, "/readyz");
        assert_eq!((code, body.trim()), (200, format!("{who} ready").as_str()));
        assert_eq!(http_get(addr, "/nothing").0, 404);
        // their metrics, for Prometheus
        let (code, body) = http_get(addr, "/metrics");
        assert_eq!(code, 200);
        assert!(body.contains("process_cpu_time_seconds_total "), "{body}");
        assert!(
            body.contains(&format!("service_name=\"freshet-{who}\"")),
            "{body}"
        );
    }
    let (_, body) = http_get(&tm_health, "/metrics");
    assert!(body.contains("freshet_taskmanager_slots{"), "{body}");

    // the JobManager gone: not ready again once the TaskManager notices
    jm.kill();
    tm.wait_for("JobManager lost");
    let (code, _) = http_get(&tm_health, "/readyz");
    assert_eq!(code, 503);
}

/// Watermark alignment across processes: two TaskManagers, each running one subtask of an
/// unthrottled source and one of a source limited to 2 000 rows per second (2 s of event time
/// per second), all in one group with a drift of 4 s. The bounds come from the TaskManagers'
/// heartbeats (every second), so a subtask on one TaskManager is held to the watermark of one
/// on the other, and the group can move on by 4 s of event time per heartbeat, twice the slow
/// source's pace. The fast source must stay within the drift of the slow one (plus two
/// heartbeats of the slow one's progress and a batch) while the slow one goes at its own pace;
/// unaligned, it would read a million rows per second and run thousands of seconds of event
/// time ahead.
#[test]
fn aligned_sources_on_two_taskmanagers_stay_within_their_drift() {
    let work = tempfile::tempdir().unwrap();
    let (address, jm, _tms) = two_taskmanagers(work.path());
    let job = work.path().join("job.yaml");
    std::fs::write(
        &job,
        "version: 1
name: aligned
parallelism: 2
pipeline: {batch_size: 256}
sources:
  fast:
    connector: {type: generator, fields: {ts: \"1714557600000 + seq\"}}
    event_time: ts
    watermark: {alignment: {group: g, max_drift: 4s}}
  slow:
    connector: {type: generator, rows_per_second: 2000, fields: {ts: \"1714557600000 + seq\"}}
    event_time: ts
    watermark: {alignment: {group: g, max_drift: 4s}}
sinks:
  f: {input: fast, connector: {type: blackhole}}
  s: {input: slow, connector: {type: blackhole}}
",
    )
    .unwrap();
    let id = run_submit(&["submit", job.to_str().unwrap(), "--jobmanager", &address]);
    // (watermark, records in) of the vertex whose name starts with `prefix`
    let sample = |prefix: &str| {
        let o = freshet()
            .args(["status", &id, "--jobmanager", &address])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let vx = v["vertices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no vertex {prefix}: {v}"))
            .clone();
        (
            vx["metrics"]["watermark"].as_i64().unwrap(),
            vx["metrics"]["records_in"].as_u64().unwrap(),
            vx["metrics"]["aligned_ns"].as_u64().unwrap_or(0),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while sample("slow").0 == i64::MIN {
        assert!(
            Instant::now() < deadline,
            "the job did not start:\n{}",
            jm.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, fast1, _) = sample("fast");
    let (_, slow1, _) = sample("slow");
    let mut lead = i64::MIN;
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(300));
        let (f, _, _) = sample("fast");
        let (s, _, _) = sample("slow");
        lead = lead.max(f - s);
    }
    let (_, fast2, aligned) = sample("fast");
    let (_, slow2, _) = sample("slow");
    let secs = t1.elapsed().as_secs_f64();
    let (fast_rate, slow_rate) = ((fast2 - fast1) as f64 / secs, (slow2 - slow1) as f64 / secs);
    eprintln!(
        "fast source led by up to {lead} ms at {fast_rate:.0} rows/s; slow one {slow_rate:.0} rows/s; fast paused {:.1} s",
        aligned as f64 / 1e9
    );
    assert!(lead <= 9_000, "the fast source led by {lead} ms");
    assert!(aligned > 0, "the fast source never paused");
    // the slow source is not held back by the fast one: it reads at its own limit
    assert!(
        slow_rate > 1_200.0,
        "the slow source read {slow_rate:.0} rows/s"
    );
    // each row is a millisecond of event time: the fast source reads about what the slow one does
    assert!(
        fast_rate < 5.0 * slow_rate,
        "the fast source read {fast_rate:.0} rows/s"
    );
    let o = freshet()
        .args(["cancel", &id, "--jobmanager", &address])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

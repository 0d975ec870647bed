//! Kafka end to end, exactly once, against a real Apache Kafka broker (a KRaft node started from
//! Maven Central jars, see `freshet_tests::kafka`): the `kafka-revenue` example runs as a
//! `freshet` process while sales are produced into a 4-partition topic; the process is killed at
//! random moments, and twice by failpoints exactly between a checkpoint's completion and its
//! Kafka commit (before the commit, and after it but before the next checkpoint). What a
//! `read_committed` reader finds in the output topic must equal the revenue per store and minute
//! computed here from the produced sales: each window once, none lost.
//!
//! Also: a rescale through a savepoint from parallelism 2 to 3 while the topic is read, a broker
//! down for 30 s in the middle of a run, and the errors for a missing topic and an unreachable
//! broker.
mod common;

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Proc, Rng, freshet};
use freshet_tests::kafka::Broker;
use freshet_tests::repo;

/// 2024-05-01T00:00:00Z in epoch milliseconds.
const BASE: i64 = 1_714_521_600_000;
/// Event time between two sales: 240 sales per one-minute window.
const STEP_MS: i64 = 250;

/// Sale `i`: its partition, its store and its JSON value. Every tenth sale is produced twice.
fn sale(i: usize) -> (i32, String, String) {
    let store = format!("s{}", i % 7);
    let v = json!({
        "event_id": format!("e{i}"),
        "event_time": BASE + i as i64 * STEP_MS,
        "store_id": store,
        "price": (i % 13) as f64 + 0.25,
        "quantity": (i % 3) as i64 + 1,
    });
    ((i % 4) as i32, store, v.to_string())
}

fn produce_sales(broker: &Broker, range: std::ops::Range<usize>) {
    let mut rows = Vec::new();
    for i in range {
        let (p, store, v) = sale(i);
        rows.push((p, store.clone(), v.clone()));
        if i % 10 == 0 {
            rows.push((p, store, v));
        }
    }
    let refs: Vec<(Option<&str>, &str, Option<i32>)> = rows
        .iter()
        .map(|(p, k, v)| (Some(k.as_str()), v.as_str(), Some(*p)))
        .collect();
    broker.produce("sales", &refs);
}

/// Produces sales `0..n` at about a thousand a second (while a test kills things).
fn produce_paced(broker: &Broker, n: usize) {
    for chunk in 0..n.div_ceil(250) {
        produce_sales(broker, chunk * 250..((chunk + 1) * 250).min(n));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A sale per partition far in the future: every earlier window closes.
fn produce_flush(broker: &Broker) {
    let v = json!({"event_id": "flush", "event_time": BASE + 86_400_000, "store_id": "zz",
                   "price": 0.0, "quantity": 0})
    .to_string();
    let rows: Vec<(Option<&str>, &str, Option<i32>)> =
        (0..4).map(|p| (None, v.as_str(), Some(p))).collect();
    broker.produce("sales", &rows);
}

/// (store, window start) → (revenue, sales) of the first `n` sales, duplicates counted once.
fn expected(n: usize) -> BTreeMap<(String, String), (f64, i64)> {
    let mut out: BTreeMap<(String, String), (f64, i64)> = BTreeMap::new();
    for i in 0..n {
        let store = format!("s{}", i % 7);
        let minute = (i as i64 * STEP_MS) / 60_000;
        let start = format!("2024-05-01T{:02}:{:02}:00.000Z", minute / 60, minute % 60);
        let e = out.entry((store, start)).or_default();
        e.0 += ((i % 13) as f64 + 0.25) * ((i % 3) as f64 + 1.0);
        e.1 += 1;
    }
    out
}

/// A window of the output: (store, window start) and (revenue, sales).
type Window = ((String, String), (f64, i64));

/// The committed output: one entry per record.
fn committed(broker: &Broker) -> Vec<Window> {
    broker
        .read_committed("revenue")
        .into_iter()
        .map(|(_, _, key, value)| {
            let v: Value = serde_json::from_str(&value).unwrap();
            let store = v["store_id"].as_str().unwrap().to_string();
            assert_eq!(key.as_deref(), Some(store.as_str()), "keyed by store");
            (
                (store, v["window_start"].as_str().unwrap().to_string()),
                (v["revenue"].as_f64().unwrap(), v["sales"].as_i64().unwrap()),
            )
        })
        .collect()
}

/// Waits until the output has every expected window, then checks it holds each exactly once
/// with the expected values.
fn check(broker: &Broker, n: usize, context: &str) {
    check_delivery(broker, n, false, context);
}

/// Waits until the output has every expected window, then checks each has the expected
/// values; with `again`, a window may be written more than once (with the same values).
/// Returns how many records were repeats.
fn check_delivery(broker: &Broker, n: usize, again: bool, context: &str) -> usize {
    let want = expected(n);
    let deadline = Instant::now() + Duration::from_secs(120);
    let distinct = |got: &[Window]| {
        got.iter()
            .map(|(k, _)| k)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let mut got = committed(broker);
    while distinct(&got) < want.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        got = committed(broker);
    }
    // anything written twice would show up now
    std::thread::sleep(Duration::from_secs(2));
    got = committed(broker);
    let mut seen = BTreeMap::new();
    let mut repeats = 0;
    for (k, v) in got {
        if let Some(prev) = seen.insert(k.clone(), v) {
            assert!(
                again,
                "{context}: window {k:?} written twice ({prev:?} and {v:?})"
            );
            assert_eq!(
                prev, v,
                "{context}: window {k:?} written again, differently"
            );
            repeats += 1;
        }
    }
    let missing: Vec<_> = want.keys().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{context}: {} windows missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    let extra: Vec<_> = seen.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(extra.is_empty(), "{context}: unexpected windows {extra:?}");
    for (k, (revenue, sales)) in &want {
        let (r, s) = seen[k];
        assert_eq!(s, *sales, "{context}: sales of {k:?}");
        assert!(
            (r - revenue).abs() < 1e-6,
            "{context}: revenue of {k:?}: {r} vs {revenue}"
        );
    }
    repeats
}

/// `freshet run` arguments for the example against `broker`, with its files and checkpoints
/// under `work`.
fn run_args(broker: &Broker, work: &Path, parallelism: u32) -> Vec<String> {
    let job = repo().join("examples/kafka-revenue/job.yaml");
    let mut a = vec![
        "run".to_string(),
        job.display().to_string(),
        "--parallelism".into(),
        parallelism.to_string(),
    ];
    for s in [
        format!(
            "sources.sales.connector.bootstrap_servers={}",
            broker.bootstrap()
        ),
        format!(
            "sinks.revenue.connector.bootstrap_servers={}",
            broker.bootstrap()
        ),
        format!("checkpointing.dir={}", work.join("checkpoints").display()),
        "checkpointing.interval=400ms".into(),
        format!(
            "sinks.late_sales.connector.path={}",
            work.join("late.jsonl").display()
        ),
        format!(
            "sinks.bad_records.connector.path={}",
            work.join("bad.jsonl").display()
        ),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    a
}

fn topics(broker: &Broker) {
    broker.create_topic("sales", 4);
    broker.create_topic("revenue", 2);
}

/// Ten random kills and the two failpoint crashes while sales are produced, then a run that
/// reads to the end: the committed windows equal the expected ones, each exactly once.
#[test]
fn kills_at_any_moment_neither_lose_nor_duplicate_output() {
    const SALES: usize = 24_000;
    let broker = Broker::start();
    topics(&broker);
    let work = tempfile::tempdir().unwrap();
    let a = run_args(&broker, work.path(), 2);
    let mut rng = Rng::new();
    std::thread::scope(|scope| {
        let producing = scope.spawn(|| produce_paced(&broker, SALES));
        let mut kills = 0;
        let mut restored = 0;
        for round in 0..12 {
            let failpoint = match round {
                4 => Some("kafka-sink-before-commit@3"),
                8 => Some("kafka-sink-after-commit@3"),
                _ => None,
            };
            let mut c = freshet();
            c.args(&a)
                .args(["--listen", "off"])
                .env("FRESHET_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            if let Some(f) = failpoint {
                c.env("FRESHET_FAILPOINTS", f);
            }
            let mut child = c.spawn().unwrap();
            if failpoint.is_none() {
                std::thread::sleep(Duration::from_millis(1200 + rng.below(1800)));
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "the job ended by itself"
                );
                child.kill().unwrap(); // SIGKILL
            }
            let o = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            if let Some(f) = failpoint {
                assert!(
                    stderr.contains(&format!("failpoint {f}")),
                    "the run should have crashed at {f}:\n{stderr}"
                );
            }
            if round == 9 {
                // restored from the checkpoint whose commit the crash left pending: the marker
                // shows it is in Kafka, so it is not written again
                assert!(
                    stderr.contains("already done before the restart"),
                    "after a crash right after a commit: {stderr}"
                );
            }
            restored += stderr.contains("restoring from") as u32;
            kills += 1;
        }
        producing.join().unwrap();
        eprintln!("killed {kills} times, {restored} runs restored from a checkpoint");
        assert!(restored >= 8, "only {restored} runs restored");
    });
    produce_flush(&broker);
    let http = format!("127.0.0.1:{}", common::free_port());
    let mut last = Proc::start(
        &[
            a.clone(),
            vec![
                "--listen".into(),
                "off".into(),
                "--http".into(),
                http.clone(),
            ],
        ]
        .concat(),
    );
    check(&broker, SALES, "after 12 crashes");
    // every partition's lag, read to the end
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = common::http_get(&http, "/metrics");
        let lags: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("freshet_source_split_lag{"))
            .collect();
        let caught_up = (0..4).all(|p| {
            lags.iter()
                .any(|l| l.contains(&format!("split=\"sales/{p}\"")) && l.ends_with(" 0"))
        });
        if caught_up {
            break;
        }
        assert!(Instant::now() < deadline, "lag per partition: {lags:#?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    last.kill();
}

/// At least once: the same kills lose nothing; windows written again after a restart carry
/// the same values.
#[test]
fn at_least_once_kills_lose_nothing() {
    const SALES: usize = 8_000;
    let broker = Broker::start();
    topics(&broker);
    let work = tempfile::tempdir().unwrap();
    let mut a = run_args(&broker, work.path(), 2);
    a.extend([
        "--set".into(),
        "sinks.revenue.connector.delivery=at_least_once".into(),
        "--listen".into(),
        "off".into(),
    ]);
    let mut rng = Rng::new();
    std::thread::scope(|scope| {
        let producing = scope.spawn(|| produce_paced(&broker, SALES));
        for _ in 0..4 {
            let mut run = Proc::start(&a);
            std::thread::sleep(Duration::from_millis(1500 + rng.below(1500)));
            run.kill();
        }
        producing.join().unwrap();
    });
    produce_flush(&broker);
    let mut last = Proc::start(&a);
    let repeats = check_delivery(&broker, SALES, true, "at least once, 4 kills");
    eprintln!("at least once: {repeats} windows written again after 4 kills");
    last.kill();
}

/// The job on a cluster of a JobManager and two TaskManager processes: a TaskManager is killed
/// at random moments three times (a new one replaces it each time) while sales are produced;
/// the output is exactly once.
#[test]
fn killed_taskmanagers_neither_lose_nor_duplicate_output() {
    const SALES: usize = 8_000;
    let broker = Broker::start();
    topics(&broker);
    let mut c = common::Cluster::start(2);
    let mut a = run_args(&broker, c.work.path(), 2);
    a[0] = "submit".into();
    a.extend(["--jobmanager".into(), c.address.clone()]);
    let id = common::run_submit(&a);
    let mut rng = Rng::new();
    std::thread::scope(|scope| {
        let producing = scope.spawn(|| produce_paced(&broker, SALES));
        c.jm.wait_for("checkpoint completed");
        for kill in 0..3 {
            std::thread::sleep(Duration::from_millis(1000 + rng.below(2500)));
            let victim = (kill % 2) as usize;
            c.tms[victim].kill();
            c.tms[victim] = common::taskmanager(&c.address, &format!("tm-new-{kill}"), &c.state);
        }
        producing.join().unwrap();
    });
    produce_flush(&broker);
    check(&broker, SALES, "TaskManagers killed three times");
    let (state, restarts) = common::job_state(&c.address, &id).unwrap();
    assert_eq!(state, "running", "{}", c.jm.log());
    // a kill during a restart, or of a TaskManager without subtasks, restarts nothing
    eprintln!("{restarts} restarts after 3 kills");
    assert!(restarts >= 1, "the job never restarted");
}

/// A job reading the 4-partition topic at parallelism 2 is stopped with a savepoint and
/// restored at parallelism 3: every partition's position moves to its new reader.
#[test]
fn rescaling_through_a_savepoint_keeps_exactly_once() {
    const SALES: usize = 6_000;
    let broker = Broker::start();
    topics(&broker);
    let work = tempfile::tempdir().unwrap();
    produce_sales(&broker, 0..SALES / 2);
    let mut a = run_args(&broker, work.path(), 2);
    a.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let mut run = Proc::start(&a);
    let api = run
        .wait_for("JobManager listening on ")
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    // some windows committed before the stop
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed(&broker).len() < 50 {
        assert!(
            Instant::now() < deadline,
            "no output before the savepoint: {}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let o = freshet()
        .args(["stop", "kafka-revenue", "--savepoint", "--dir"])
        .arg(work.path().join("savepoints"))
        .args(["--jobmanager", &api])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "stop --savepoint: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let savepoint = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let (ok, log) = run.wait();
    assert!(ok, "{log}");
    produce_sales(&broker, SALES / 2..SALES);
    produce_flush(&broker);
    let mut b = run_args(&broker, work.path(), 3);
    b.extend([
        "--restore".into(),
        savepoint,
        "--listen".into(),
        "off".into(),
    ]);
    let mut restored = Proc::start(&b);
    check(&broker, SALES, "stopped at parallelism 2, restored at 3");
    assert!(
        restored.log().contains("restoring from"),
        "{}",
        restored.log()
    );
    restored.kill();
}

/// The broker is down for 30 s in the middle of a run: the job restarts per its strategy until
/// the broker is back, then finishes the output exactly once.
#[test]
fn a_broker_outage_is_survived_exactly_once() {
    const SALES: usize = 6_000;
    let mut broker = Broker::start();
    topics(&broker);
    let work = tempfile::tempdir().unwrap();
    produce_sales(&broker, 0..SALES / 2);
    let mut a = run_args(&broker, work.path(), 2);
    a.extend(["--listen".into(), "off".into()]);
    let mut run = Proc::start(&a);
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed(&broker).len() < 50 {
        assert!(
            Instant::now() < deadline,
            "no output before the outage: {}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    broker.stop();
    std::thread::sleep(Duration::from_secs(30));
    broker.resume();
    produce_sales(&broker, SALES / 2..SALES);
    produce_flush(&broker);
    check(&broker, SALES, "broker down for 30 s");
    let log = run.log();
    eprintln!(
        "during the outage: {} restarts, {} consumer errors logged",
        log.matches("attempt failed; restarting").count(),
        log.matches("Kafka consumer error").count()
    );
    assert!(
        run.exit_within(Duration::from_millis(10)).is_none(),
        "the job should still run: {}",
        run.log()
    );
    run.kill();
}

/// Runs `freshet` with `a` to its end; returns its stderr after checking that it failed
/// within 30 s.
fn fails_fast(a: &[String]) -> String {
    let started = Instant::now();
    let o = freshet()
        .args(a)
        .args(["--listen", "off"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}: {stderr}",
        started.elapsed()
    );
    stderr
}

/// A topic that does not exist (read or written), or brokers that cannot be reached, stop
/// `freshet run` at once with an error naming the servers and the topic, instead of a restart
/// loop.
#[test]
fn a_missing_topic_or_unreachable_broker_is_a_clear_error() {
    let broker = Broker::start();
    broker.create_topic("revenue", 1);
    let work = tempfile::tempdir().unwrap();
    let a = run_args(&broker, work.path(), 1);
    let stderr = fails_fast(&a);
    assert!(
        stderr.contains("topic 'sales' does not exist")
            && stderr.contains(&broker.bootstrap())
            && stderr.contains("sources.sales.connector.topics"),
        "{stderr}"
    );

    let dead = format!("127.0.0.1:{}", common::free_port());
    let b: Vec<String> = a
        .iter()
        .map(|s| s.replace(&broker.bootstrap(), &dead))
        .collect();
    let stderr = fails_fast(&b);
    assert!(
        stderr.contains(&format!("cannot reach Kafka at {dead}")),
        "{stderr}"
    );

    // a sink's topic that does not exist fails the job at once (no restarts: they cannot help)
    broker.create_topic("sales", 1);
    let mut c = a.clone();
    c.extend([
        "--set".into(),
        "sinks.revenue.connector.topic=nowhere".into(),
    ]);
    let stderr = fails_fast(&c);
    assert!(
        stderr.contains("topic 'nowhere' of sink 'revenue' does not exist")
            && stderr.contains(&broker.bootstrap()),
        "{stderr}"
    );
    assert!(!stderr.contains("attempt failed; restarting"), "{stderr}");
}

//! Metrics and logs of a running job, checked against a real OTLP collector (rotel) and the
//! job's own `/metrics` endpoint.
//!
//! - `freshet run` with `OTEL_EXPORTER_OTLP_ENDPOINT` exports every metric of the table in
//!   `docs/observability.md` to the collector, over gRPC and over HTTP, with the job's
//!   attributes, and serves each of them in the Prometheus text format at `/metrics` on its
//!   `--http` address, with values that follow the job (records read, checkpoints completed,
//!   keyed state on disk). A second run restores from the first run's checkpoint and reports
//!   how long the restore took.
//! - A JobManager and a TaskManager process export traces: each checkpoint is one trace, rooted
//!   at the JobManager's `checkpoint` span, with every subtask's alignment, synchronous and
//!   asynchronous parts recorded by the TaskManager process under it (the context travels with
//!   the trigger over gRPC and with the barrier); the deployment is a trace of its own with each
//!   subtask's opening (its restore) under it, and under the `freshet submit` that asked for it
//!   (the context travels in the gRPC call's metadata). After the TaskManager is killed, the
//!   restart's deployment is a trace of its own, which `freshet status` names.
//! - Logs can be JSON lines; a line logged inside a traced span carries the trace id.
//! - Settings the exporters do not support stop the process at start, naming the variable.
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{
    Collector, Proc, children, dedup_job, free_port, freshet, http_get, interrupt, repo, spans,
    taskmanager_env,
};

/// The metric table of `docs/observability.md`: (OTLP name, Prometheus name), without the
/// operator's (its unit test and the Kubernetes tests read those back) and the Kafka source's
/// (`cli/tests/kafka.rs` reads those).
fn documented() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(repo().join("docs/observability.md")).unwrap();
    let rows: Vec<(String, String)> = doc
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = |c: &str| {
                c.strip_prefix('`')
                    .and_then(|c| c.strip_suffix('`'))
                    .map(str::to_string)
            };
            match cells.as_slice() {
                ["", otlp, prom, kind, ..]
                    if matches!(*kind, "counter" | "gauge")
                        && !otlp.starts_with("`freshet.operator.")
                        && !otlp.starts_with("`freshet.source.") =>
                {
                    Some((name(otlp)?, name(prom)?))
                }
                _ => None,
            }
        })
        .collect();
    assert!(rows.len() > 30, "the metric table has {} rows", rows.len());
    rows
}

/// The samples of a Prometheus text body: (name, labels) → value.
fn samples(text: &str) -> BTreeMap<(String, String), f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some(((name.to_string(), labels.to_string()), value.parse().ok()?))
        })
        .collect()
}

/// The sum of `name` over the series whose labels contain every one of `with`.
fn total(s: &BTreeMap<(String, String), f64>, name: &str, with: &[&str]) -> f64 {
    s.iter()
        .filter(|((n, labels), _)| n == name && with.iter().all(|w| labels.contains(w)))
        .map(|(_, v)| v)
        .sum()
}

/// Runs the job until `/metrics` shows records and a completed checkpoint; returns the process,
/// its HTTP address and the last `/metrics` body.
fn run_until_checkpointed(job: &std::path::Path, env: &[(&str, &str)]) -> (Proc, String, String) {
    let http = format!("127.0.0.1:{}", free_port());
    let p = Proc::start_env(
        &[
            "run".into(),
            job.display().to_string(),
            "--http".into(),
            http.clone(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
        ],
        env,
    );
    p.wait_for("Web UI and API on");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = http_get(&http, "/metrics");
        assert_eq!(code, 200, "{body}");
        let s = samples(&body);
        if total(&s, "freshet_job_checkpoints_completed_total", &[]) >= 2.0
            && total(&s, "freshet_task_records_in_total", &["vertex=\"gen\""]) > 0.0
        {
            return (p, http, body);
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint in /metrics:\n{body}\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for a process to exit after Ctrl-C (its telemetry flushed on the way out).
fn stop(mut p: Proc) -> String {
    interrupt(p.pid());
    assert!(
        p.exit_within(Duration::from_secs(30)).is_some(),
        "no exit after Ctrl-C:\n{}",
        p.log()
    );
    p.log()
}

#[test]
fn a_running_job_exports_its_metrics_over_otlp_and_serves_them_for_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let job = dedup_job(dir.path(), "counting", 20000, 1000);
    let table = documented();

    // first run: OTLP over gRPC
    let collector = Collector::start();
    let grpc = format!("http://{}", collector.grpc);
    let (p, http, body) = run_until_checkpointed(
        &job,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", grpc.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ],
    );
    let s = samples(&body);
    // every documented metric is served (the restore time only once a run restored)
    for (_, prom) in &table {
        if prom == "freshet_job_restore_time_seconds" {
            assert!(
                !body.contains(prom.as_str()),
                "a fresh run restored nothing:\n{body}"
            );
            continue;
        }
        assert!(
            s.keys().any(|(n, _)| n == prom),
            "{prom} is documented but not served:\n{body}"
        );
    }
    // the values follow the job
    let source = ["job_name=\"counting\"", "vertex=\"gen\""];
    assert!(total(&s, "freshet_task_records_in_total", &source) > 0.0);
    assert!(total(&s, "freshet_task_input_bytes_total", &source) > 0.0);
    assert!(total(&s, "freshet_task_input_watermark_milliseconds", &source) > 0.0);
    let dedup = ["vertex=\"latest -> sink:out\"", "subtask=\"1\""];
    assert!(total(&s, "freshet_task_records_written_total", &dedup) > 0.0);
    assert!(
        total(&s, "freshet_task_state_disk_bytes", &dedup) > 0.0,
        "{body}"
    );
    assert!(total(&s, "freshet_task_state_rows", &dedup) > 0.0, "{body}");
    assert_eq!(
        total(
            &s,
            "freshet_job_state",
            &["state=\"running\"", "job_id=\"counting-0\""]
        ),
        1.0
    );
    assert!(total(&s, "freshet_job_checkpoint_size_bytes", &[]) > 0.0);
    assert!(total(&s, "process_cpu_time_seconds_total", &[]) > 0.0);
    assert!(
        total(
            &s,
            "freshet_taskmanager_slots",
            &["taskmanager=\"taskmanager-0\""]
        ) >= 1.0
    );
    // counters only grow
    let later = samples(&http_get(&http, "/metrics").1);
    assert!(
        total(&later, "freshet_task_records_in_total", &source)
            >= total(&s, "freshet_task_records_in_total", &source)
    );

    // the collector received the same metrics, with the job's attributes
    let received = collector.wait_until("every metric over gRPC", |text| {
        table
            .iter()
            .filter(|(otlp, _)| otlp != "freshet.job.restore_time")
            .all(|(otlp, _)| text.contains(&format!("Name: {otlp}\n")))
    });
    assert!(
        received.contains("service.name: Str(freshet)"),
        "{received}"
    );
    assert!(
        received.contains("-> job_name: Str(counting)"),
        "{received}"
    );
    assert!(received.contains("-> vertex: Str(gen)"), "{received}");
    stop(p);

    // second run: OTLP over HTTP, restoring from the first run's last checkpoint, logs as JSON
    let collector = Collector::start();
    let endpoint = format!("http://{}", collector.http);
    let (p, http, body) = run_until_checkpointed(
        &job,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("FRESHET_LOG_FORMAT", "json"),
        ],
    );
    assert!(p.log().contains("restoring from"), "{}", p.log());
    let restore = total(&samples(&body), "freshet_job_restore_time_seconds", &[]);
    assert!(
        restore > 0.0 && restore < 60.0,
        "restore time {restore}:\n{body}"
    );
    collector.wait_until("the restore time over HTTP", |text| {
        text.contains("Name: freshet.job.restore_time\n")
            && text.contains("Name: freshet.task.records_in\n")
    });
    drop(http);
    let log = stop(p);
    let json: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        json.iter()
            .any(|v| v["level"] == "INFO" && v["fields"]["message"].is_string()),
        "no JSON log line in:\n{log}"
    );
    // a line logged inside a traced span names its trace
    let traced = json.iter().find(|v| {
        v["fields"]["message"] == "checkpoint completed"
            && v["span"]["trace_id"]
                .as_str()
                .is_some_and(|t| t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit()))
    });
    assert!(
        traced.is_some(),
        "no checkpoint log line with a trace id in:\n{log}"
    );
}

#[test]
fn unsupported_telemetry_settings_are_refused_at_start() {
    let o = freshet()
        .args(["validate", "examples/revenue-per-store/job.yaml"])
        .current_dir(repo())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && err.contains("http/json"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_is_one_trace_across_the_jobmanager_and_taskmanager_processes() {
    let dir = tempfile::tempdir().unwrap();
    let job = dedup_job(dir.path(), "counting", 20000, 1000);
    let collector = Collector::start();
    let endpoint = format!("http://{}", collector.grpc);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_METRICS_EXPORTER", "none"),
    ];
    let address = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let jm = Proc::start_env(
        &[
            "jobmanager".into(),
            "--listen".into(),
            address.clone(),
            "--http".into(),
            http.clone(),
        ],
        &env,
    );
    jm.wait_for("JobManager listening on");
    let tm = taskmanager_env(
        &address,
        "tm-traced",
        &dir.path().join("state"),
        2,
        &[],
        &env,
    );
    tm.wait_for("registered with the JobManager");
    // the client's submission is traced too: the deployment joins its trace over gRPC
    let o = freshet()
        .args(["submit", job.to_str().unwrap(), "--jobmanager", &address])
        .envs(env)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // the batch span processor exports every few seconds: wait for a checkpoint whose subtask
    // spans arrived from the TaskManager
    let subtasks = 7; // gen, latest -> sink:out and latest.late at parallelism 2, and the dead-letter sink
    let (checkpoint, all) = {
        let mut found = None;
        collector.wait_until("a checkpoint trace with the TaskManager's spans", |text| {
            let all = spans(text);
            let complete = all.iter().find(|c| {
                c.name == "checkpoint"
                    && c.service == "freshet-jobmanager"
                    && c.parent.is_empty()
                    && children(&all, c)
                        .iter()
                        .filter(|(n, s)| n == "checkpoint.async" && s == "freshet-taskmanager")
                        .count()
                        == subtasks
            });
            found = complete.map(|c| (c.clone(), all.clone()));
            found.is_some()
        });
        found.unwrap()
    };
    let under = children(&all, &checkpoint);
    let count = |name: &str, service: &str| {
        under
            .iter()
            .filter(|(n, s)| n == name && s == service)
            .count()
    };
    assert_eq!(
        count("checkpoint.sync", "freshet-taskmanager"),
        subtasks,
        "{under:?}"
    );
    // subtasks with inputs align; the two sources do not
    assert_eq!(
        count("checkpoint.alignment", "freshet-taskmanager"),
        subtasks - 2,
        "{under:?}"
    );
    assert_eq!(
        count("checkpoint.metadata", "freshet-jobmanager"),
        1,
        "{under:?}"
    );
    // one trace per checkpoint
    let traces: std::collections::BTreeSet<_> = all
        .iter()
        .filter(|s| s.name == "checkpoint")
        .map(|s| s.trace.clone())
        .collect();
    assert_eq!(
        traces.len(),
        all.iter().filter(|s| s.name == "checkpoint").count()
    );
    // the deployment: one trace, each subtask's opening under it
    let deploy = all
        .iter()
        .find(|s| s.name == "job.deploy" && s.service == "freshet-jobmanager")
        .unwrap_or_else(|| panic!("no deployment span in {all:?}"));
    let opened = children(&all, deploy)
        .iter()
        .filter(|(n, s)| n == "subtask.open" && s == "freshet-taskmanager")
        .count();
    assert_eq!(opened, subtasks);
    let submit = all
        .iter()
        .find(|s| s.name == "job.submit" && s.service == "freshet-cli")
        .unwrap_or_else(|| panic!("no submission span in {all:?}"));
    assert_eq!(
        (&deploy.trace, &deploy.parent),
        (&submit.trace, &submit.id),
        "the deployment is not under the submission"
    );
    // spans that only give logs their context are not exported
    assert!(!all.iter().any(|s| s.name == "subtask" || s.name == "task"));

    // a recovery: the TaskManager dies, a new one comes, the job restarts from its latest
    // checkpoint; the restarted attempt's deployment is a trace of its own, which the job's
    // status names
    let id = "counting-0";
    let mut tm = tm;
    tm.kill();
    let tm = taskmanager_env(
        &address,
        "tm-traced-2",
        &dir.path().join("state"),
        2,
        &[],
        &env,
    );
    tm.wait_for("registered with the JobManager");
    let status = || -> serde_json::Value {
        let o = freshet()
            .args(["status", id, "--jobmanager", &address])
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let recovered = loop {
        let s = status();
        if s["restarts"].as_u64() >= Some(1) && s["state"] == "running" {
            break s;
        }
        assert!(Instant::now() < deadline, "no restart: {s}\n{}", jm.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    let trace = recovered["trace_id"].as_str().unwrap().to_string();
    assert!(
        !recovered["restored_from"].as_str().unwrap_or("").is_empty(),
        "{recovered}"
    );
    collector.wait_until("the recovery's trace", |text| {
        let all = spans(text);
        let Some(deploy) = all
            .iter()
            .find(|s| s.name == "job.deploy" && s.trace == trace && s.parent.is_empty())
        else {
            return false;
        };
        children(&all, deploy)
            .iter()
            .filter(|(n, s)| n == "subtask.open" && s == "freshet-taskmanager")
            .count()
            == subtasks
    });

    // a savepoint asked for over HTTP with a trace context: its checkpoint trace is the
    // caller's
    let (caller_trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let reply = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&http).unwrap();
        write!(
            s,
            "POST /jobs/{id}/savepoints HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             traceparent: 00-{caller_trace}-{caller_span}-01\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    collector.wait_until("the savepoint under the caller's trace", |text| {
        spans(text).iter().any(|s| {
            s.name == "checkpoint"
                && s.service == "freshet-jobmanager"
                && s.trace == caller_trace
                && s.parent == caller_span
        })
    });
    drop((jm, tm));
}

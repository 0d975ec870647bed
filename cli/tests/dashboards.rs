//! The shipped Grafana dashboards (`deploy/grafana/*.json`) and Prometheus alerting rules
//! (`deploy/prometheus/freshet-alerts.yaml`) against a real Prometheus (Debian's package)
//! scraping a JobManager and a TaskManager process.
//!
//! - Every metric a dashboard or a rule queries is served by the processes of a running job
//!   (the operator's by the operator's metrics): no dashboard for metrics that do not exist.
//! - Prometheus scrapes the processes' health addresses, and every dashboard query (its
//!   variables filled in) returns series for the job, which was stopped with a savepoint and
//!   submitted again from it, so the restore time is there too.
//! - Prometheus loads the rules and evaluates each one without error.
mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, dedup_job, free_port, freshet, http_get, repo, run_submit, taskmanager_with};

/// Every query of the dashboards: (dashboard file, panel title, expression).
fn dashboard_queries() -> Vec<(String, String, String)> {
    let dir = repo().join("deploy/grafana");
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "dashboards: {files:?}");
    for f in files {
        let d: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push((
                    name.clone(),
                    p["title"].as_str().unwrap().to_string(),
                    t["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out
}

/// Every expression of the alerting rules: (alert, expression).
fn rule_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(repo().join("deploy/prometheus/freshet-alerts.yaml")).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_string(),
                r["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The metric names an expression uses (`freshet_*`, `process_*`), a histogram's series by the
/// histogram's name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("freshet_") || w.starts_with("process_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_string()
        })
        .collect()
}

/// The metric names in a Prometheus text body.
fn served(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_string()
        })
        .collect()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus scraping `targets` every second and evaluating the shipped rules.
struct Prometheus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[&str]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{}]
scrape_configs:
  - job_name: freshet
    static_configs:
      - targets: [{}]
",
                repo()
                    .join("deploy/prometheus/freshet-alerts.yaml")
                    .display(),
                targets.join(", ")
            ),
        )
        .unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (apt-get install prometheus)");
        let p = Prometheus {
            child,
            address,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&p.address).is_err()
            || http_get(&p.address, "/-/ready").0 != 200
        {
            assert!(Instant::now() < deadline, "prometheus never got ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// `GET path` of its HTTP API, as JSON (through curl, which speaks chunked responses).
    fn get(&self, path: &str) -> serde_json::Value {
        let o = Command::new("curl")
            .args(["-sf", &format!("http://{}{path}", self.address)])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Runs an instant query; returns its result vector.
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let v = self.get(&format!("/api/v1/query?query={}", url_encode(expr)));
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn every_dashboard_and_alert_query_finds_the_metrics_of_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let job = dedup_job(dir.path(), "watched", 5000, 100);
    let address = format!("127.0.0.1:{}", free_port());
    let jm_health = format!("127.0.0.1:{}", free_port());
    let tm_health = format!("127.0.0.1:{}", free_port());
    let jm = Proc::start(&[
        "jobmanager".into(),
        "--listen".into(),
        address.clone(),
        "--health".into(),
        jm_health.clone(),
    ]);
    jm.wait_for("JobManager listening on");
    let tm = taskmanager_with(
        &address,
        "tm-scraped",
        &dir.path().join("state"),
        2,
        &["--health", &tm_health],
    );
    tm.wait_for("registered with the JobManager");
    // run, stop with a savepoint, and run again from it: the second attempt restored
    let id = run_submit(&["submit", job.to_str().unwrap(), "--jobmanager", &address]);
    jm.wait_for("checkpoint completed");
    let o = freshet()
        .args(["stop", &id, "--savepoint", "--jobmanager", &address])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let savepoint = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let id = run_submit(&[
        "submit",
        job.to_str().unwrap(),
        "--restore",
        &savepoint,
        "--jobmanager",
        &address,
    ]);

    // every metric the dashboards and rules name is served
    let mut names = served(&http_get(&jm_health, "/metrics").1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tm_text = http_get(&tm_health, "/metrics").1;
        let jm_text = http_get(&jm_health, "/metrics").1;
        if tm_text.contains("freshet_task_state_rows{") && jm_text.contains("restore_time") {
            names.extend(served(&tm_text));
            names.extend(served(&jm_text));
            break;
        }
        assert!(Instant::now() < deadline, "{jm_text}\n{tm_text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let local = freshet_telemetry::LocalMetrics::new();
    let operator = freshet_operator::metrics::Metrics::new(&local.meter());
    operator.record("ns", "job", Duration::from_millis(10), Some(true));
    names.extend(served(&local.prometheus_text()));
    let dashboards = dashboard_queries();
    let rules = rule_queries();
    for (where_, expr) in dashboards
        .iter()
        .map(|(f, p, e)| (format!("{f}: {p}"), e))
        .chain(rules.iter().map(|(a, e)| (format!("alert {a}"), e)))
    {
        let used = metric_names(expr);
        assert!(!used.is_empty(), "{where_} queries no metric: {expr}");
        for m in used {
            assert!(
                names.contains(&m),
                "{where_} queries {m}, which nothing serves"
            );
        }
    }

    // Prometheus scrapes both processes; every dashboard query of the job's metrics returns
    // series once a few scrapes are in
    let prometheus = Prometheus::start(&[&jm_health, &tm_health]);
    let deadline = Instant::now() + Duration::from_secs(90);
    while prometheus
        .query(&format!(
            "increase(freshet_job_checkpoints_completed_total{{job_id=\"{id}\"}}[10s]) > 0"
        ))
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw a checkpoint of {id}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3));
    for (file, panel, expr) in &dashboards {
        if file == "freshet-operator.json" {
            // the operator runs against Kubernetes (cli/tests/k8s checks what it serves)
            continue;
        }
        let q = expr
            .replace("$__rate_interval", "10s")
            .replace("$job", "watched");
        let result = prometheus.query(&q);
        assert!(!result.is_empty(), "{file}: {panel}: no series for {q}");
    }
    // the rules load and evaluate (none should fire for a healthy job)
    let v = prometheus.get("/api/v1/rules");
    let body = v.to_string();
    let loaded: Vec<&serde_json::Value> = v["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), rules.len(), "{body}");
    for r in loaded {
        assert_eq!(r["health"], "ok", "{r}");
        assert_ne!(r["state"], "firing", "{r}");
    }
    drop((jm, tm));
}

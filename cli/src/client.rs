//! `freshet savepoint`, `stop`, `checkpoints` and `list`: calls to a running JobManager's HTTP API.
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Where `freshet run` serves the API unless told otherwise.
pub const DEFAULT_JOBMANAGER: &str = "http://127.0.0.1:8081";

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn base(jobmanager: &str) -> String {
    let j = jobmanager.trim_end_matches('/');
    if j.starts_with("http://") || j.starts_with("https://") {
        j.to_string()
    } else {
        format!("http://{j}")
    }
}

fn answer(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>, url: &str) -> Result<Value> {
    let mut resp = resp.with_context(|| format!("cannot reach the JobManager at {url}"))?;
    let status = resp.status();
    let body: Value = resp
        .body_mut()
        .read_json()
        .with_context(|| format!("{url}: the answer is not JSON"))?;
    if !status.is_success() {
        let msg = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        bail!("{msg}");
    }
    Ok(body)
}

fn get(jobmanager: &str, path: &str) -> Result<Value> {
    let url = format!("{}{path}", base(jobmanager));
    answer(agent().get(&url).call(), &url)
}

fn post(jobmanager: &str, path: &str, body: Value) -> Result<Value> {
    let url = format!("{}{path}", base(jobmanager));
    answer(agent().post(&url).send_json(body), &url)
}

pub fn savepoint(jobmanager: &str, job: &str, dir: Option<String>) -> Result<i32> {
    let r = post(
        jobmanager,
        &format!("/jobs/{job}/savepoints"),
        json!({ "dir": dir }),
    )?;
    println!("{}", r["path"].as_str().unwrap_or_default());
    Ok(0)
}

pub fn stop(jobmanager: &str, job: &str, savepoint: bool, dir: Option<String>) -> Result<i32> {
    if savepoint {
        let r = post(
            jobmanager,
            &format!("/jobs/{job}/stop"),
            json!({ "dir": dir }),
        )?;
        println!("{}", r["path"].as_str().unwrap_or_default());
    } else {
        post(jobmanager, &format!("/jobs/{job}/cancel"), json!({}))?;
        eprintln!("cancelled {job} (no savepoint)");
    }
    Ok(0)
}

pub fn list(jobmanager: &str) -> Result<i32> {
    let jobs = get(jobmanager, "/jobs")?;
    println!(
        "{:<32} {:<24} {:<10} {:>10}",
        "id", "name", "state", "duration"
    );
    for j in jobs.as_array().into_iter().flatten() {
        println!(
            "{:<32} {:<24} {:<10} {:>9.1}s",
            j["id"].as_str().unwrap_or_default(),
            j["name"].as_str().unwrap_or_default(),
            j["state"].as_str().unwrap_or_default(),
            j["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
        );
    }
    Ok(0)
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub fn checkpoints(jobmanager: &str, job: &str) -> Result<i32> {
    let r = get(jobmanager, &format!("/jobs/{job}/checkpoints"))?;
    println!(
        "{:>6} {:<10} {:<11} {:<24} {:>9} {:>9} {:>10} {:>10}  path / failure",
        "id", "kind", "status", "triggered", "duration", "aligned", "full", "uploaded"
    );
    for c in r["history"].as_array().into_iter().flatten() {
        let at = c["trigger_time_ms"].as_i64().unwrap_or(0);
        let when = chrono::DateTime::from_timestamp_millis(at)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
            .unwrap_or_default();
        println!(
            "{:>6} {:<10} {:<11} {:<24} {:>7}ms {:>7}ms {:>10} {:>10}  {}",
            c["id"].as_u64().unwrap_or(0),
            c["kind"].as_str().unwrap_or_default(),
            c["status"].as_str().unwrap_or_default(),
            when,
            c["duration_ms"].as_u64().unwrap_or(0),
            c["alignment_ms"].as_u64().unwrap_or(0),
            size(c["full_bytes"].as_u64().unwrap_or(0)),
            size(c["uploaded_bytes"].as_u64().unwrap_or(0)),
            c["path"]
                .as_str()
                .or(c["failure"].as_str())
                .unwrap_or_default()
        );
    }
    Ok(0)
}

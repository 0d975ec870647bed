//! Client commands against a running JobManager (`freshet run`, or `freshet jobmanager`) over
//! its gRPC control plane: `submit`, `list`, `cancel`, `savepoint`, `stop`, `checkpoints`.
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use freshet_engine::metrics::MetricsSnapshot;
use freshet_jobmanager::checkpoints::CheckpointStats;
use freshet_proto as pb;
use freshet_proto::job_manager_client::JobManagerClient;
use freshet_security::ClientToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use crate::security::Target;

/// A client of the JobManager's control plane, sending the bearer token if there is one.
pub type Client = JobManagerClient<InterceptedService<Channel, ClientToken>>;

/// Where `freshet run` and `freshet jobmanager` listen unless told otherwise.
pub const DEFAULT_JOBMANAGER: &str = "127.0.0.1:6123";

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Connects to the JobManager at `addr` and makes one call.
pub fn call<T, F, Fut>(target: &Target, f: F) -> Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let rt = runtime()?;
    rt.block_on(async {
        let client = connect(target).await?;
        match f(client).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => bail!("{}", s.message()),
        }
    })
}

/// A client of the JobManager `target` names.
pub async fn connect(target: &Target) -> Result<Client> {
    let addr = &target.jobmanager;
    let dialer = target.dialer()?;
    let endpoint = dialer
        .endpoint(addr)?
        .connect_timeout(Duration::from_secs(5));
    let channel = dialer
        .connect(endpoint)
        .await
        .with_context(|| format!("cannot reach the JobManager at {addr}"))?;
    Ok(JobManagerClient::with_interceptor(channel, target.token()?)
        .max_decoding_message_size(64 << 20))
}

/// Submits a job file; returns the accepted job.
pub fn submit_job(
    jobmanager: &Target,
    job: &Path,
    overrides: &[String],
    options: &freshet_jobmanager::SubmitOptions,
) -> Result<pb::JobInfo> {
    let definition =
        std::fs::read_to_string(job).with_context(|| format!("reading {}", job.display()))?;
    // relative paths in the job resolve against its directory, on the cluster's machines
    let dir = job.parent().filter(|p| !p.as_os_str().is_empty());
    let base = std::fs::canonicalize(dir.unwrap_or(Path::new(".")))?;
    let request = pb::SubmitJobRequest {
        definition,
        overrides: overrides.to_vec(),
        base_dir: base.to_string_lossy().into_owned(),
        restore: options.restore.clone().unwrap_or_default(),
        fresh: options.ignore_checkpoints,
        allow_non_restored_state: options.allow_non_restored_state,
    };
    // the JobManager's deployment joins this span's trace (the context goes with the call)
    let span = tracing::info_span!(
        "job.submit",
        trace_id = tracing::field::Empty,
        job = %job.display()
    );
    freshet_engine::trace::follow(&span, None);
    let _span = span.entered();
    call(
        jobmanager,
        |mut c| async move { c.submit_job(request).await },
    )
}

pub fn savepoint(jobmanager: &Target, job: &str, dir: Option<String>) -> Result<i32> {
    stop_or_savepoint(jobmanager, job, dir, false)
}

fn stop_or_savepoint(
    jobmanager: &Target,
    job: &str,
    dir: Option<String>,
    stop: bool,
) -> Result<i32> {
    // the JobManager's savepoint joins this span's trace
    let span = tracing::info_span!(
        "savepoint.request",
        trace_id = tracing::field::Empty,
        job,
        stop
    );
    freshet_engine::trace::follow(&span, None);
    let _span = span.entered();
    let r = call(jobmanager, |mut c| async move {
        c.trigger_savepoint(pb::SavepointRequest {
            job: job.into(),
            directory: dir.unwrap_or_default(),
            stop,
            // the command prints where the savepoint is once it completed
            detach: false,
        })
        .await
    })?;
    println!("{}", r.location);
    Ok(0)
}

pub fn stop(jobmanager: &Target, job: &str, savepoint: bool, dir: Option<String>) -> Result<i32> {
    if savepoint {
        stop_or_savepoint(jobmanager, job, dir, true)
    } else {
        cancel(jobmanager, job)
    }
}

pub fn cancel(jobmanager: &Target, job: &str) -> Result<i32> {
    let j = call(jobmanager, |mut c| async move {
        c.cancel_job(pb::JobRef { job: job.into() }).await
    })?;
    eprintln!("{} is {} (no savepoint)", j.id, j.state);
    Ok(0)
}

pub fn status(jobmanager: &Target, job: &str) -> Result<i32> {
    let j = call(jobmanager, |mut c| async move {
        c.get_job(pb::JobRef { job: job.into() }).await
    })?;
    let vertices: Vec<Value> = j
        .vertices
        .iter()
        .map(|v| {
            serde_json::json!({
                "name": v.name,
                "parallelism": v.parallelism,
                "metrics": serde_json::from_slice::<MetricsSnapshot>(&v.metrics).ok(),
            })
        })
        .collect();
    let out = serde_json::json!({
        "id": j.id,
        "name": j.name,
        "state": j.state,
        "message": j.message,
        "attempt": j.attempt,
        "restarts": j.restarts,
        "duration_seconds": j.duration_seconds,
        "restored_from": j.restored_from,
        "trace_id": j.trace_id,
        "vertices": vertices,
        "accumulators": j.accumulators,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

pub fn list(jobmanager: &Target) -> Result<i32> {
    let jobs = call(jobmanager, |mut c| async move {
        c.list_jobs(pb::Empty {}).await
    })?;
    println!(
        "{:<32} {:<24} {:<10} {:>8} {:>10}",
        "id", "name", "state", "restarts", "duration"
    );
    for j in jobs.jobs {
        println!(
            "{:<32} {:<24} {:<10} {:>8} {:>9.1}s",
            j.id, j.name, j.state, j.restarts, j.duration_seconds
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

pub fn checkpoints(jobmanager: &Target, job: &str) -> Result<i32> {
    let list = call(jobmanager, |mut c| async move {
        c.list_checkpoints(pb::JobRef { job: job.into() }).await
    })?;
    println!(
        "{:>6} {:<10} {:<11} {:<24} {:>9} {:>9} {:>10} {:>10}  path / failure",
        "id", "kind", "status", "triggered", "duration", "aligned", "full", "uploaded"
    );
    for raw in list.checkpoints {
        let c: CheckpointStats = serde_json::from_slice(&raw)?;
        let when = chrono::DateTime::from_timestamp_millis(c.trigger_time_ms)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
            .unwrap_or_default();
        let kind = serde_json::to_value(c.kind)?;
        let status = serde_json::to_value(c.status)?;
        println!(
            "{:>6} {:<10} {:<11} {:<24} {:>7}ms {:>7}ms {:>10} {:>10}  {}",
            c.id,
            kind.as_str().unwrap_or_default(),
            status.as_str().unwrap_or_default(),
            when,
            c.duration_ms,
            c.alignment_ms,
            size(c.full_bytes),
            size(c.uploaded_bytes),
            c.path
                .as_deref()
                .or(c.failure.as_deref())
                .unwrap_or_default()
        );
    }
    Ok(0)
}

//! `freshet jobmanager`, `freshet taskmanager`, `freshet submit` and `freshet run --processes`:
//! the distributed runtime as processes.
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use freshet_engine::checkpoint::{S3Options, Storage};
use freshet_engine::metrics::MetricsSnapshot;
use freshet_jobmanager::rpc::{Heartbeats, JobManagerService};
use freshet_jobmanager::store::JobStore;
use freshet_jobmanager::{JobManager, SubmitOptions, leader};
use freshet_proto as pb;

use crate::client;
use crate::run::{VertexLine, exit_code, print_summary};

/// `freshet jobmanager`.
#[derive(clap::Args, Debug)]
pub struct JobManagerArgs {
    /// Where the control plane listens (TaskManagers and clients).
    #[arg(long, default_value = client::DEFAULT_JOBMANAGER)]
    listen: String,
    /// Where the web UI and the HTTP API (JSON, with `/metrics`) listen; `off` for none.
    #[arg(long, default_value = "off")]
    http: String,
    /// High-availability directory (a local directory or `s3://bucket/prefix`): jobs are kept
    /// there, and JobManagers sharing it elect one leader, which resumes the jobs of the
    /// previous one. Without it, jobs do not survive the JobManager.
    #[arg(long)]
    ha_dir: Option<String>,
    /// Leader lease: a leader that has not renewed for this long is replaced.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Time between heartbeats with TaskManagers.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// A TaskManager silent for this long is lost and its subtasks restarted elsewhere.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// Where `/healthz` and `/readyz` are served (ready once leading and serving); `off`.
    #[arg(long, default_value = "off")]
    health: String,
    #[command(flatten)]
    security: crate::security::ServerArgs,
}

/// `freshet taskmanager`.
#[derive(clap::Args, Debug)]
pub struct TaskManagerArgs {
    /// The JobManager (`host:port`).
    #[arg(long, default_value = client::DEFAULT_JOBMANAGER)]
    jobmanager: String,
    /// Slots offered (each runs one subtask of every vertex of a job).
    #[arg(long, default_value_t = 2)]
    slots: u32,
    /// Where the TaskManager service listens (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where the data plane listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    data_listen: String,
    /// Host name other processes reach this one by (default: the listen address).
    #[arg(long)]
    advertise_host: Option<String>,
    /// Id of this TaskManager (default: host name and process id).
    #[arg(long)]
    id: Option<String>,
    /// Root of the subtasks' working directories (RocksDB), overriding `state.local_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where `/healthz` and `/readyz` are served (ready once serving); `off`.
    #[arg(long, default_value = "off")]
    health: String,
    /// Cancelled subtasks still running after this long (stuck in a call cancellation cannot
    /// interrupt) make the TaskManager exit, so that their jobs can restart elsewhere.
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    cancellation_timeout: Duration,
    #[command(flatten)]
    tls: crate::security::TlsArgs,
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn jobmanager(args: JobManagerArgs) -> Result<i32> {
    let security = args.security.security()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("jm-rpc")
        .build()?;
    let ready = crate::health::serve(&args.health, "jobmanager")?;
    let (epoch, store) = match &args.ha_dir {
        Some(dir) => {
            let storage = Storage::open(dir, &std::env::current_dir()?, &S3Options::default())
                .with_context(|| format!("--ha-dir {dir}"))?;
            let holder = format!("{} pid {}", args.listen, std::process::id());
            eprintln!("waiting for the leader lease in {dir}");
            let leadership = leader::acquire(storage.clone(), &holder, args.lease)
                .map_err(anyhow::Error::msg)?;
            let epoch = leadership.epoch;
            leadership.keep(args.lease, |why| {
                eprintln!("lost leadership: {why}; exiting");
                std::process::exit(70);
            });
            (epoch, Some(JobStore::new(storage)))
        }
        // without a lease the start time orders JobManagers: a restarted one fences the old
        None => (unix_millis(), None),
    };
    let jm = JobManager::new(epoch, store);
    let heartbeats = Heartbeats {
        interval: args.heartbeat_interval,
        timeout: args.heartbeat_timeout,
    };
    let addr = JobManagerService::serve(
        jm.clone(),
        &args.listen,
        heartbeats,
        runtime.handle(),
        &security,
    )
    .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!("JobManager listening on {addr} (leader epoch {epoch})");
    if args.http != "off" {
        let http = freshet_jobmanager::http::serve(
            jm.clone(),
            &args.http,
            &security,
            Some(crate::telemetry().prometheus_renderer()),
        )
        .with_context(|| format!("--http {}", args.http))?;
        let scheme = if security.tls.is_some() {
            "https"
        } else {
            "http"
        };
        eprintln!("Web UI and API on {scheme}://{http}/");
    }
    let resumed = jm.resume_stored().map_err(anyhow::Error::msg)?;
    if resumed > 0 {
        eprintln!("resuming {resumed} job(s)");
    }
    ready.set(true);
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })?;
    let _ = rx.recv();
    eprintln!("JobManager stopping");
    Ok(0)
}

pub fn taskmanager(args: TaskManagerArgs) -> Result<i32> {
    // ready while registered with the JobManager: its slots can be used
    let ready = crate::health::serve(&args.health, "taskmanager")?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "taskmanager".into());
    let config = freshet_taskmanager::service::TaskManagerConfig {
        id: args
            .id
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        jobmanager: args.jobmanager,
        slots: args.slots,
        listen: args.listen,
        data_listen: args.data_listen,
        advertise_host: args.advertise_host,
        state_dir: args.state_dir,
        cancellation_timeout: args.cancellation_timeout,
        security: args.tls.taskmanager()?,
        registered: ready.flag(),
    };
    freshet_taskmanager::service::run(config)?;
    Ok(0)
}

/// Sums a job's counters per vertex from the JobManager's answer.
fn vertex_lines(info: &pb::JobInfo) -> Vec<VertexLine> {
    info.vertices
        .iter()
        .map(|v| VertexLine {
            name: v.name.clone(),
            parallelism: v.parallelism,
            metrics: serde_json::from_slice::<MetricsSnapshot>(&v.metrics).unwrap_or_default(),
        })
        .collect()
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "finished" | "failed" | "cancelled")
}

/// Follows a job until it ends; prints its summary and returns the exit code.
fn follow(jobmanager: &client::Target, id: &str, interrupted: &AtomicBool) -> Result<i32> {
    let mut last_message = String::new();
    let info = loop {
        let info = client::call(jobmanager, |mut c| async move {
            c.get_job(pb::JobRef { job: id.into() }).await
        })?;
        if is_terminal(&info.state) {
            break info;
        }
        let line = format!("{} ({})", info.state, info.message);
        if !info.message.is_empty() && line != last_message {
            eprintln!("job {id}: {line}");
            last_message = line;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let accumulators: BTreeMap<String, i64> = info.accumulators.clone().into_iter().collect();
    print_summary(
        &info.id,
        &vertex_lines(&info),
        &accumulators,
        Duration::from_secs_f64(info.duration_seconds),
    );
    if info.restarts > 0 {
        eprintln!("  restarted {} time(s)", info.restarts);
    }
    Ok(exit_code(
        &info.state,
        &info.message,
        interrupted.load(Ordering::SeqCst),
    ))
}

pub fn submit(
    jobmanager: &client::Target,
    job: &Path,
    overrides: &[String],
    options: SubmitOptions,
    wait: bool,
) -> Result<i32> {
    let info = client::submit_job(jobmanager, job, overrides, &options)?;
    println!("{}", info.id);
    if !info.restored_from.is_empty() {
        eprintln!("restoring from {}", info.restored_from);
    }
    if !wait {
        return Ok(0);
    }
    follow(jobmanager, &info.id, &AtomicBool::new(false))
}

/// Child processes that are killed when dropped.
pub struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `freshet <args>` and waits for the stderr line starting with `ready`; returns the
/// process and the rest of that line. The child's other stderr lines are passed through.
fn spawn_freshet(args: &[String], ready: &str) -> Result<(Child, String)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stderr(Stdio::piped());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // the children die with this process, even when it is killed
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn()?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(&ready)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.to_string());
                continue;
            }
            eprintln!("{line}");
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(rest) => Ok((child, rest)),
        Err(_) => {
            let _ = child.kill();
            bail!("freshet {} did not start", args.join(" "))
        }
    }
}

/// Starts a JobManager process and `taskmanagers` TaskManager processes of `slots` slots on
/// loopback; returns them (killed when dropped) and the JobManager's address.
pub fn start_processes(taskmanagers: u32, slots: u32) -> Result<(Children, String)> {
    let mut children = Children(Vec::new());
    let (jm, rest) = spawn_freshet(
        &["jobmanager".into(), "--listen".into(), "127.0.0.1:0".into()],
        "JobManager listening on ",
    )?;
    children.0.push(jm);
    let address = rest
        .split_whitespace()
        .next()
        .context("JobManager address")?
        .to_string();
    eprintln!("JobManager process on {address}");
    for i in 0..taskmanagers.max(1) {
        let (tm, rest) = spawn_freshet(
            &[
                "taskmanager".into(),
                "--jobmanager".into(),
                address.clone(),
                "--slots".into(),
                slots.to_string(),
                "--id".into(),
                format!("taskmanager-{i}"),
            ],
            "TaskManager ",
        )?;
        eprintln!("TaskManager process {rest}");
        children.0.push(tm);
    }
    Ok((children, address))
}

/// Waits until a job ended; returns its final state.
pub fn wait_for_end(jobmanager: &client::Target, id: &str) -> Result<pb::JobInfo> {
    loop {
        let info = client::call(jobmanager, |mut c| async move {
            c.get_job(pb::JobRef { job: id.into() }).await
        })?;
        if is_terminal(&info.state) {
            return Ok(info);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run_processes(
    job: &Path,
    overrides: &[String],
    taskmanagers: u32,
    options: SubmitOptions,
) -> Result<i32> {
    let Some((_, _, plan)) = crate::run::planned(job, overrides) else {
        return Ok(1);
    };
    let slots = plan.slots_needed().div_ceil(taskmanagers.max(1));
    let (children, address) = start_processes(taskmanagers, slots)?;
    let address = client::Target::plain(&address);
    let info = client::submit_job(&address, job, overrides, &options)?;
    if !info.restored_from.is_empty() {
        eprintln!("restoring from {}", info.restored_from);
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let address = address.clone();
        let id = info.id.clone();
        ctrlc::set_handler(move || {
            flag.store(true, Ordering::SeqCst);
            let _ = client::cancel(&address, &id);
        })?;
    }
    let started = Instant::now();
    let code = follow(&address, &info.id, &interrupted);
    tracing::debug!(elapsed = ?started.elapsed(), "job followed");
    drop(children);
    code
}

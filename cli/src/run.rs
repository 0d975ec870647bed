//! `freshet run`, `validate` and `explain`.
use anyhow::Result;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use freshet_connectors::job_format;
use freshet_engine::metrics::MetricsSnapshot;
use freshet_engine::time::format_millis;
use freshet_job::{JobSpec, LoadError};
use freshet_jobmanager::JobManager;
use freshet_jobmanager::{JobHandle, JobState, SubmitError, SubmitOptions};
use freshet_plan::{Plan, plan};

/// Loads a job file, printing every problem. `None` when the job is refused.
fn load(path: &Path, overrides: &[String]) -> Option<(JobSpec, PathBuf)> {
    match job_format().load(path, overrides) {
        Ok(spec) => Some((spec, base_dir(path))),
        Err(LoadError::Invalid(problems)) => {
            eprint!("{}: {problems}", path.display());
            None
        }
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}

fn base_dir(job: &Path) -> PathBuf {
    let dir = job.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    }
}

pub fn planned(path: &Path, overrides: &[String]) -> Option<(JobSpec, PathBuf, Plan)> {
    let (spec, base) = load(path, overrides)?;
    match plan(&spec, &base) {
        Ok(p) => Some((spec, base, p)),
        Err(problems) => {
            eprint!("{}: {problems}", path.display());
            None
        }
    }
}

pub fn validate(path: &Path, overrides: &[String]) -> Result<i32> {
    let Some((spec, _, plan)) = planned(path, overrides) else {
        return Ok(1);
    };
    println!(
        "{}: ok: job {} with {} source(s), {} transform(s), {} sink(s); {} subtasks in {} vertices",
        path.display(),
        spec.name,
        spec.sources.len(),
        spec.transforms.len(),
        spec.sinks.len(),
        plan.subtask_count(),
        plan.vertices.len()
    );
    Ok(0)
}

pub fn explain(path: &Path, overrides: &[String]) -> Result<i32> {
    let Some((_, _, plan)) = planned(path, overrides) else {
        return Ok(1);
    };
    print!("{}", plan.explain());
    Ok(0)
}

pub fn run(
    path: &Path,
    overrides: &[String],
    taskmanagers: u32,
    options: SubmitOptions,
    listen: &str,
    http: &str,
) -> Result<i32> {
    let Some((spec, base, plan)) = planned(path, overrides) else {
        return Ok(1);
    };
    let slots = plan.slots_needed().div_ceil(taskmanagers.max(1));
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(taskmanagers, slots, events)
    });
    // the control plane, so `freshet savepoint`, `stop` and `list` reach this job
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    if listen != "off" {
        match freshet_jobmanager::rpc::JobManagerService::serve(
            jm.clone(),
            listen,
            Default::default(),
            runtime.handle(),
            &Default::default(),
        ) {
            Ok(addr) => eprintln!("JobManager listening on {addr}"),
            Err(e) => eprintln!(
                "warning: JobManager not listening on {listen}: {e} (pick another address with --listen)"
            ),
        }
    }
    if http != "off" {
        match freshet_jobmanager::http::serve(
            jm.clone(),
            http,
            &Default::default(),
            Some(crate::telemetry().prometheus_renderer()),
        ) {
            Ok(addr) => eprintln!("Web UI and API on http://{addr}/"),
            Err(e) => eprintln!(
                "warning: web UI and API not started on {http}: {e} (pick another address with --http, or --http off)"
            ),
        }
    }
    let job = match jm.submit_with(spec, base, options) {
        Ok(j) => j,
        Err(SubmitError::Invalid(p)) => {
            eprint!("{}: {p}", path.display());
            return Ok(1);
        }
        Err(SubmitError::State(e)) => {
            eprintln!("{}: {e}", path.display());
            return Ok(1);
        }
    };
    if let Some(from) = job.restored_from() {
        eprintln!("restoring from {from}");
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let job = job.clone();
        let flag = interrupted.clone();
        ctrlc::set_handler(move || {
            flag.store(true, Ordering::SeqCst);
            job.cancel();
        })?;
    }
    let live = std::io::stderr().is_terminal();
    let mut progress = Progress::new(&job);
    let status = loop {
        let s = job.wait_timeout(Duration::from_millis(if live { 1000 } else { 5000 }));
        if s.state.is_terminal() {
            break s;
        }
        if live {
            eprint!("\r\x1b[2K{}", progress.line(&job));
        }
    };
    if live {
        eprint!("\r\x1b[2K");
    }
    let m = per_vertex(&job);
    let vertices: Vec<VertexLine> = job
        .plan()
        .vertices
        .iter()
        .enumerate()
        .map(|(v, vx)| VertexLine {
            name: vx.name.clone(),
            parallelism: vx.parallelism,
            metrics: m.get(&v).copied().unwrap_or_default(),
        })
        .collect();
    print_summary(&job.id.0, &vertices, &status.accumulators, status.duration);
    Ok(exit_code(
        status.state.name(),
        match &status.state {
            JobState::Failed(e) => e,
            _ => "",
        },
        interrupted.load(Ordering::SeqCst),
    ))
}

/// The exit code for a job's final state, saying why on stderr.
pub fn exit_code(state: &str, error: &str, interrupted: bool) -> i32 {
    match state {
        "finished" => 0,
        "cancelled" if interrupted => {
            eprintln!("stopped by Ctrl-C");
            130
        }
        "cancelled" => 130,
        _ => {
            eprintln!("job failed: {error}");
            1
        }
    }
}

/// Sums counters per vertex.
fn per_vertex(job: &JobHandle) -> BTreeMap<usize, MetricsSnapshot> {
    let mut out: BTreeMap<usize, MetricsSnapshot> = BTreeMap::new();
    let metrics = job.metrics();
    let vertices: std::collections::BTreeSet<usize> = metrics.keys().map(|(v, _)| *v).collect();
    for v in vertices {
        let m = MetricsSnapshot::sum(metrics.range((v, 0)..=(v, u32::MAX)).map(|(_, m)| m));
        out.insert(v, m);
    }
    out
}

struct Progress {
    last: Instant,
    last_in: u64,
    last_out: u64,
}

impl Progress {
    fn new(_: &JobHandle) -> Self {
        Progress {
            last: Instant::now(),
            last_in: 0,
            last_out: 0,
        }
    }

    fn line(&mut self, job: &JobHandle) -> String {
        let plan = job.plan();
        let m = per_vertex(job);
        let input: u64 = m
            .iter()
            .filter(|(v, _)| plan.is_source(**v))
            .map(|(_, s)| s.records_in)
            .sum();
        let output: u64 = m.values().map(|s| s.records_written).sum();
        let wm = m.values().map(|s| s.watermark).min().unwrap_or(i64::MIN);
        let dt = self.last.elapsed().as_secs_f64().max(1e-3);
        let line = format!(
            "{:>8.1}s  in {} ({}/s)  out {} ({}/s)  watermark {}",
            job.status().duration.as_secs_f64(),
            input,
            ((input - self.last_in) as f64 / dt) as u64,
            output,
            ((output - self.last_out) as f64 / dt) as u64,
            watermark(wm)
        );
        (self.last, self.last_in, self.last_out) = (Instant::now(), input, output);
        line
    }
}

fn watermark(ms: i64) -> String {
    match ms {
        i64::MIN => "-".into(),
        i64::MAX => "end".into(),
        ms => format_millis(ms),
    }
}

/// One vertex of a job summary.
pub struct VertexLine {
    /// Its name.
    pub name: String,
    /// Its parallelism.
    pub parallelism: u32,
    /// Counters summed over its subtasks.
    pub metrics: MetricsSnapshot,
}

/// Prints what a job did, vertex by vertex.
pub fn print_summary(
    id: &str,
    vertices: &[VertexLine],
    accumulators: &BTreeMap<String, i64>,
    duration: Duration,
) {
    eprintln!("job {id} in {:.2}s", duration.as_secs_f64());
    eprintln!(
        "  {:<44} {:>5} {:>12} {:>12} {:>10} {:>8} {:>8} {:>9}",
        "vertex", "par", "records in", "records out", "written", "late", "dead", "blocked"
    );
    for vertex in vertices {
        let s = vertex.metrics;
        let mut name = vertex.name.clone();
        if name.len() > 44 {
            name.truncate(41);
            name.push_str("...");
        }
        eprintln!(
            "  {:<44} {:>5} {:>12} {:>12} {:>10} {:>8} {:>8} {:>8.1}s",
            name,
            vertex.parallelism,
            s.records_in,
            s.records_out,
            s.records_written,
            s.late_records,
            s.dead_letters,
            // time its subtasks spent waiting for room in full downstream channels
            s.backpressured_ns as f64 / 1e9
        );
    }
    // how often keyed state left memory: the first thing to look at when a stateful job slows
    // down as its keys grow
    for v in vertices.iter().filter(|v| v.metrics.state_lookups > 0) {
        let (lookups, reads) = (v.metrics.state_lookups, v.metrics.state_reads);
        eprintln!("  {}", state_line(&v.name, lookups, reads));
    }
    let dead: u64 = vertices.iter().map(|v| v.metrics.dead_letters).sum();
    let late: u64 = vertices.iter().map(|v| v.metrics.late_records).sum();
    if dead > 0 {
        eprintln!("  {dead} record(s) could not be processed and went to a dead-letter output");
    }
    if late > 0 {
        eprintln!("  {late} record(s) arrived too late and went to a late output");
    }
    for (k, v) in accumulators {
        eprintln!("  {k} = {v}");
    }
}

/// The summary's line for the state of vertex `name`: its accesses, and how many read RocksDB.
pub(crate) fn state_line(name: &str, lookups: u64, reads: u64) -> String {
    format!(
        "state of {name}: {lookups} accesses, {reads} read RocksDB ({:.1}%)",
        100.0 * reads as f64 / lookups.max(1) as f64
    )
}

/// The RocksDB reads of a [`state_line`] (leading spaces allowed), or `None` for another line.
pub(crate) fn state_line_reads(line: &str) -> Option<u64> {
    let rest = line.trim_start().strip_prefix("state of ")?;
    // a vertex's name may hold ": ", the counts do not
    let (_, counts) = rest.rsplit_once(": ")?;
    let (_, reads) = counts.split_once(" accesses, ")?;
    reads.split(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_state_line_gives_back_its_reads() {
        let line = super::state_line("events -> q: x -> sink:out", 20_000_000, 6_762_276);
        assert_eq!(
            line,
            "state of events -> q: x -> sink:out: 20000000 accesses, 6762276 read RocksDB (33.8%)"
        );
        assert_eq!(
            super::state_line_reads(&format!("  {line}")),
            Some(6_762_276)
        );
        assert_eq!(super::state_line_reads("  out.rows = 5"), None);
    }
}

//! `freshet bench nexmark`: the Nexmark queries of the side-by-side benchmark, run through the
//! normal job path (planning, JobManager, TaskManager, subtasks), printing throughput, CPU time
//! and the checksums that must match the reference implementation.
use anyhow::{Result, bail};
use clap::Subcommand;
use std::time::Instant;

use freshet_job::parse_job;
use freshet_jobmanager::JobState;
use freshet_taskmanager::local::local_cluster;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Nexmark queries over the deterministic bid generator.
    Nexmark {
        /// q0 (pass-through), q1 (map), q2 (filter), q5 (sliding count per auction), q7 (global
        /// tumbling max), qw (tumbling count per bidder).
        #[arg(long, default_value = "q0")]
        query: String,
        /// Number of bids.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// Parallelism.
        #[arg(long, default_value_t = 1)]
        parallelism: u32,
        /// Generator seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Print the job definition instead of running it.
        #[arg(long)]
        print_job: bool,
    },
}

/// The job definition of a Nexmark query.
pub fn nexmark_job(query: &str, events: u64, parallelism: u32, seed: u64) -> Result<String> {
    let (transform, checksums) = match query {
        "q0" => ("", "[price, auction]"),
        "q1" => (
            "  q:\n    type: project\n    input: bids\n    select: [auction, bidder, \"price * 0.908 AS price\", channel, url, extra, date_time]\n",
            "[\"CAST(price AS BIGINT)\", auction]",
        ),
        "q2" => (
            "  q:\n    type: filter\n    input: bids\n    where: \"auction % 123 = 0\"\n",
            "[price, auction]",
        ),
        "q5" => (
            "  q:\n    type: window\n    input: bids\n    key_by: [auction]\n    window: {type: sliding, size: 10s, slide: 2s}\n    aggregates: [\"count(*) AS count\"]\n",
            "[count, \"count * auction + epoch_ms(window_end)\"]",
        ),
        "q7" => (
            "  q:\n    type: window\n    input: bids\n    window: {type: tumbling, size: 10s}\n    aggregates: [\"max(price) AS max_price\", \"count(*) AS count\"]\n",
            "[max_price, count]",
        ),
        "qw" => (
            "  q:\n    type: window\n    input: bids\n    key_by: [bidder]\n    window: {type: tumbling, size: 10s}\n    aggregates: [\"count(*) AS count\"]\n",
            "[count, \"count * bidder + epoch_ms(window_end)\"]",
        ),
        other => bail!("unknown query {other}; use q0, q1, q2, q5, q7 or qw"),
    };
    let input = if transform.is_empty() { "bids" } else { "q" };
    Ok(format!(
        "version: 1\nname: nexmark-{query}\nparallelism: {parallelism}\nsources:\n  bids:\n    connector: {{type: nexmark, events: {events}, seed: {seed}}}\n    \
         watermark: {{max_out_of_orderness: 1s, interval: 200ms}}\n{}sinks:\n  out:\n    input: {input}\n    connector: {{type: blackhole, checksums: {checksums}}}\n",
        if transform.is_empty() {
            String::new()
        } else {
            format!("transforms:\n{transform}")
        }
    ))
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

pub fn run(cmd: BenchCommand) -> Result<i32> {
    let BenchCommand::Nexmark {
        query,
        events,
        parallelism,
        seed,
        print_job,
    } = cmd;
    let text = nexmark_job(&query, events, parallelism, seed)?;
    if print_job {
        print!("{text}");
        return Ok(0);
    }
    let spec =
        parse_job(&text, &format!("nexmark-{query}"), &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let events = events - events % parallelism as u64;
    let jm = local_cluster(1, parallelism);
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let job = jm.submit(spec, std::env::current_dir()?)?;
    let status = job.wait();
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    if let JobState::Failed(e) = &status.state {
        bail!("benchmark job failed: {e}");
    }
    let get = |k: &str| status.accumulators.get(k).copied().unwrap_or(0);
    println!(
        "RESULT engine=freshet query={query} p={parallelism} events={events} wall_s={wall:.3} eps={:.0} cpu_s={cpu:.2} eps_per_cpu_s={:.0} rows={} sum1={} sum2={}",
        events as f64 / wall,
        events as f64 / cpu.max(1e-9),
        get("out.rows"),
        get("out.sum1"),
        get("out.sum2")
    );
    Ok(0)
}

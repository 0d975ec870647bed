//! `freshet bench nexmark`: the Nexmark queries of the side-by-side benchmark, run through the
//! normal job path (planning, JobManager, TaskManager, subtasks), printing throughput, CPU time
//! and the checksums that must match the reference implementation.
//!
//! `freshet bench checkpoints`: what checkpoints cost. Nexmark q5 with checkpoints every second
//! against the same run without, alternating, with the ratio; then a job with large keyed state
//! whose keys change slowly, printing each checkpoint's full and uploaded (incremental) size.
//!
//! `freshet bench state`: keyed state far larger than the in-memory caches. A deduplication and
//! a keyed window over growing numbers of distinct keys, each run a `freshet run` process of its
//! own, printing events per second, the ratio to the smallest key count and the peak RSS.
use anyhow::{Result, bail};
use clap::Subcommand;
use std::time::Instant;

use freshet_job::parse_job;
use freshet_jobmanager::JobState;
use freshet_jobmanager::checkpoints::CheckpointStatus;
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
        /// Take checkpoints at this interval (into a temporary directory), e.g. `1s`.
        #[arg(long)]
        checkpoint_interval: Option<String>,
    },
    /// The cost of checkpoints: q5 with and without, and incremental checkpoint sizes.
    Checkpoints {
        /// Bids per q5 run.
        #[arg(long, default_value_t = 20_000_000)]
        events: u64,
        /// Runs of each variant (alternating).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Keys of the large-state job.
        #[arg(long, default_value_t = 2_000_000)]
        keys: u64,
    },
    /// Network shuffle: a keyed aggregation (Nexmark qw, tumbling count per bidder) at
    /// parallelism 2 in one process, and across two TaskManager processes (one slot each, so
    /// half of every keyed exchange crosses the network).
    Shuffle {
        /// Bids per run.
        #[arg(long, default_value_t = 20_000_000)]
        events: u64,
        /// Runs of each variant (alternating).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Large keyed state: deduplication (keep first) and a keyed window that stays open, over
    /// `events_per_key` events for each of `keys` distinct keys, default state settings.
    State {
        /// Distinct key counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [200_000u64, 1_000_000, 2_000_000])]
        keys: Vec<u64>,
        /// Events per key.
        #[arg(long, default_value_t = 2)]
        events_per_key: u64,
        /// Jobs: dedup, window or both.
        #[arg(long, value_delimiter = ',', default_values_t = ["dedup".to_string(), "window".to_string()])]
        jobs: Vec<String>,
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
    match cmd {
        BenchCommand::Nexmark {
            query,
            events,
            parallelism,
            seed,
            print_job,
            checkpoint_interval,
        } => {
            let mut text = nexmark_job(&query, events, parallelism, seed)?;
            if print_job {
                print!("{text}");
                return Ok(0);
            }
            let dir = tempfile::tempdir()?;
            if let Some(i) = &checkpoint_interval {
                text.push_str(&checkpointing(i, dir.path()));
            }
            let r = run_nexmark(&query, &text, events, parallelism)?;
            println!(
                "RESULT engine=freshet query={query} p={parallelism} events={} checkpoints={} wall_s={:.3} eps={:.0} cpu_s={:.2} eps_per_cpu_s={:.0} rows={} sum1={} sum2={}",
                r.events,
                r.checkpoints,
                r.wall,
                r.events as f64 / r.wall,
                r.cpu,
                r.events as f64 / r.cpu.max(1e-9),
                r.rows,
                r.sum1,
                r.sum2
            );
            Ok(0)
        }
        BenchCommand::Checkpoints {
            events,
            rounds,
            keys,
        } => bench_checkpoints(events, rounds, keys),
        BenchCommand::Shuffle { events, rounds } => bench_shuffle(events, rounds),
        BenchCommand::State {
            keys,
            events_per_key,
            jobs,
        } => bench_state(&keys, events_per_key, &jobs),
    }
}

/// A job over `keys` distinct keys, each seen `per_key` times, spread over the whole input.
fn state_job(kind: &str, keys: u64, per_key: u64) -> Result<String> {
    let transform = match kind {
        "dedup" => "    type: deduplicate\n    key: [k]\n    keep: first\n    ttl: 1000d\n",
        "window" => {
            "    type: window\n    key_by: [k]\n    window: {type: tumbling, size: 1000d}\n    aggregates: [\"count(*) AS n\"]\n"
        }
        other => bail!("unknown state benchmark job {other}; use dedup or window"),
    };
    // a multiplier coprime with the key count visits every key once per round, in an order
    // that defeats any locality
    let step = (7919..).find(|m| gcd(*m, keys) == 1).unwrap_or(1);
    Ok(format!(
        "version: 1\nname: state-{kind}\nsources:\n  events:\n    connector:\n      type: generator\n      count: {count}\n      fields: {{k: \"(seq * {step}) % {keys}\", ts: \"1714557600000 + seq\"}}\n    event_time: ts\ntransforms:\n  q:\n    input: events\n{transform}sinks:\n  out: {{input: q, connector: {{type: blackhole}}}}\n",
        count = keys * per_key,
    ))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Runs `freshet run JOB` as a child process; its wall time and peak RSS (bytes).
fn run_child(job: &std::path::Path) -> Result<(f64, u64)> {
    use std::io::Read;
    let t0 = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("run")
        .arg(job)
        .args(["--listen", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // wait4 rather than Child::wait: it returns the child's own resource usage
    let mut status = 0;
    // SAFETY: wait4 only writes into the two values we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let wall = t0.elapsed().as_secs_f64();
    let stderr = reader.join().unwrap_or_default();
    if pid < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{} failed: {stderr}", job.display());
    }
    Ok((wall, usage.ru_maxrss as u64 * 1024))
}

fn bench_state(keys: &[u64], per_key: u64, jobs: &[String]) -> Result<i32> {
    if keys.is_empty() || keys.contains(&0) || per_key == 0 {
        bail!("--keys needs one or more key counts above 0, and --events-per-key at least 1");
    }
    let dir = tempfile::tempdir()?;
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    println!(
        "| job | distinct keys | events | wall s | events/s | vs {} keys | peak RSS MB |",
        keys[0]
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for kind in jobs {
        let mut first = None;
        for &k in &keys {
            let path = dir.path().join(format!("{kind}-{k}.yaml"));
            std::fs::write(&path, state_job(kind, k, per_key)?)?;
            let (wall, rss) = run_child(&path)?;
            let eps = (k * per_key) as f64 / wall;
            let base = *first.get_or_insert(eps);
            println!(
                "| {kind} | {k} | {} | {wall:.2} | {eps:.0} | {:.2} | {} |",
                k * per_key,
                eps / base,
                rss >> 20
            );
        }
    }
    Ok(0)
}

fn bench_shuffle(events: u64, rounds: u32) -> Result<i32> {
    let text = nexmark_job("qw", events, 2, 42)?;
    let dir = tempfile::tempdir()?;
    let job = dir.path().join("shuffle.yaml");
    std::fs::write(&job, &text)?;
    let (_children, address) = crate::cluster::start_processes(2, 1)?;
    let address = crate::client::Target::plain(&address);
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for round in 0..rounds {
        let a = run_nexmark("qw", &text, events, 2)?;
        let t0 = Instant::now();
        let info = crate::client::submit_job(&address, &job, &[], &Default::default())?;
        let end = crate::cluster::wait_for_end(&address, &info.id)?;
        let wall = t0.elapsed().as_secs_f64();
        if end.state != "finished" {
            bail!("the two-process run {}: {}", end.state, end.message);
        }
        let get = |k: &str| end.accumulators.get(k).copied().unwrap_or(0);
        let same = (get("out.rows"), get("out.sum1"), get("out.sum2")) == (a.rows, a.sum1, a.sum2);
        println!(
            "RESULT bench=shuffle round={round} one_process_eps={:.0} two_processes_eps={:.0} same_result={same}",
            a.events as f64 / a.wall,
            a.events as f64 / wall
        );
        if !same {
            bail!("the two runs disagree: rows/checksums differ");
        }
        local.push(a.events as f64 / a.wall);
        remote.push(a.events as f64 / wall);
    }
    let (l, r) = (median(&mut local), median(&mut remote));
    println!(
        "RESULT bench=shuffle events={events} p=2 one_process_median_eps={l:.0} two_processes_median_eps={r:.0} ratio={:.2}",
        r / l
    );
    Ok(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn checkpointing(interval: &str, dir: &std::path::Path) -> String {
    format!(
        "checkpointing:\n  interval: {interval}\n  dir: {}\n",
        dir.display()
    )
}

struct Measured {
    events: u64,
    wall: f64,
    cpu: f64,
    rows: i64,
    sum1: i64,
    sum2: i64,
    checkpoints: usize,
}

fn run_nexmark(query: &str, text: &str, events: u64, parallelism: u32) -> Result<Measured> {
    let spec =
        parse_job(text, &format!("nexmark-{query}"), &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
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
    let checkpoints = job
        .checkpoints()
        .iter()
        .filter(|c| c.status == CheckpointStatus::Completed)
        .count();
    Ok(Measured {
        events,
        wall,
        cpu,
        rows: get("out.rows"),
        sum1: get("out.sum1"),
        sum2: get("out.sum2"),
        checkpoints,
    })
}

fn bench_checkpoints(events: u64, rounds: u32, keys: u64) -> Result<i32> {
    // 1. q5 with 1-second checkpoints against none, alternating so drift hits both alike
    let plain = nexmark_job("q5", events, 1, 42)?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for round in 0..rounds {
        let dir = tempfile::tempdir()?;
        let a = run_nexmark("q5", &plain, events, 1)?;
        let b = run_nexmark(
            "q5",
            &format!("{plain}{}", checkpointing("1s", dir.path())),
            events,
            1,
        )?;
        if (a.rows, a.sum1, a.sum2) != (b.rows, b.sum1, b.sum2) {
            bail!(
                "q5 results differ with checkpoints: {:?} vs {:?}",
                (a.rows, a.sum1, a.sum2),
                (b.rows, b.sum1, b.sum2)
            );
        }
        println!(
            "q5 round {round}: no checkpoints {:.0} events/s, 1s checkpoints {:.0} events/s ({} checkpoints)",
            a.events as f64 / a.wall,
            b.events as f64 / b.wall,
            b.checkpoints
        );
        without.push(a.events as f64 / a.wall);
        with.push(b.events as f64 / b.wall);
    }
    let (w, wo) = (median(&mut with), median(&mut without));
    println!(
        "RESULT bench=checkpoint-cost query=q5 events={events} no_checkpoints_eps={wo:.0} checkpoints_1s_eps={w:.0} ratio={:.3} slowdown_pct={:.1}",
        w / wo,
        (1.0 - w / wo) * 100.0
    );

    // 2. large state, slowly changing keys: every key is written once, then a small set of keys
    //    keeps changing; later checkpoints upload only the new files
    let hot = (keys / 100).max(1);
    let total = keys * 2;
    let dir = tempfile::tempdir()?;
    let text = format!(
        "version: 1\nname: large-state\nsources:\n  gen:\n    connector:\n      type: generator\n      count: {total}\n      rows_per_second: {rate}\n      fields:\n        k: \"CASE WHEN seq < {keys} THEN seq ELSE seq % {hot} END\"\n        v: seq\n        ts: \"seq\"\n    event_time: ts\n    watermark: {{max_out_of_orderness: 1s}}\ntransforms:\n  latest:\n    type: deduplicate\n    input: gen\n    key: [k]\n    keep: latest\n    order_by: v\n    ttl: 1000d\nsinks:\n  out:\n    input: latest\n    connector: {{type: blackhole}}\n{}",
        checkpointing("1s", dir.path()),
        rate = total / 8,
    );
    let spec = parse_job(&text, "large-state", &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let jm = local_cluster(1, 1);
    let job = jm.submit(spec, std::env::current_dir()?)?;
    let status = job.wait();
    if let JobState::Failed(e) = &status.state {
        bail!("large-state job failed: {e}");
    }
    println!("large state: {keys} keys written once, then {hot} keys updated; per checkpoint:");
    for c in job.checkpoints() {
        if c.status != CheckpointStatus::Completed {
            continue;
        }
        println!(
            "RESULT bench=incremental checkpoint={} full_bytes={} uploaded_bytes={} uploaded_pct={:.1}",
            c.id,
            c.full_bytes,
            c.uploaded_bytes,
            100.0 * c.uploaded_bytes as f64 / c.full_bytes.max(1) as f64
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state benchmark's jobs are valid jobs whose key expression visits every key.
    #[test]
    fn state_benchmark_jobs_are_valid() {
        for kind in ["dedup", "window"] {
            let text = state_job(kind, 1_000_000, 2).unwrap();
            parse_job(&text, "state.yaml", &[]).unwrap_or_else(|e| panic!("{kind}: {e}\n{text}"));
        }
        assert!(state_job("join", 10, 2).is_err());
        assert!(bench_state(&[0], 2, &["dedup".into()]).is_err());
        // 7919 * 3 keys share a factor with 7919 and with 7920: 7921 (89²) is the multiplier
        assert!(
            state_job("dedup", 7919 * 3, 2)
                .unwrap()
                .contains("(seq * 7921) %")
        );
    }
}

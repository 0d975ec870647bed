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

use freshet_connectors::job_format;
use freshet_connectors::nexmark::BIDDERS;
use freshet_jobmanager::checkpoints::CheckpointStatus;
use freshet_jobmanager::{JobManager, JobState};

mod telemetry;

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
        /// Distinct bidders (qw's keys): 100 000 in the shared benchmark, e.g. 10 000 000 for
        /// its large-state variant.
        #[arg(long, default_value_t = BIDDERS)]
        bidders: u64,
        /// Print the job definition instead of running it.
        #[arg(long)]
        print_job: bool,
        /// Take checkpoints at this interval (into a temporary directory), e.g. `1s`.
        #[arg(long)]
        checkpoint_interval: Option<String>,
        /// Another freshet binary to run the same query with, alternating with this one, each
        /// run a process of its own, for a ratio measured in the same run (e.g. a build of an
        /// earlier version).
        #[arg(long)]
        against: Option<std::path::PathBuf>,
        /// Runs of each binary with `--against` (which goes first alternates).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
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
    /// Parallel efficiency: Nexmark queries at parallelism 1 and 2 in one process, alternating,
    /// with the medians of events per CPU-second and their ratio.
    Parallel {
        /// Queries, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = ["q5".to_string(), "qw".to_string()])]
        queries: Vec<String>,
        /// Bids per run.
        #[arg(long, default_value_t = 20_000_000)]
        events: u64,
        /// Runs of each parallelism (alternating).
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
        /// Jobs, comma-separated: dedup, window, session (session windows whose gap, `--gap`,
        /// keeps every key's session open), join (an interval join of orders and payments, one of
        /// each per key).
        #[arg(long, value_delimiter = ',', default_values_t = ["dedup".to_string(), "window".to_string()])]
        jobs: Vec<String>,
        /// `state.memory_mb` of the jobs (default: the job format's default).
        #[arg(long)]
        memory_mb: Option<usize>,
        /// The deduplication's TTL (the events are a millisecond of event time apart, so
        /// `5000s` keeps the last 5M keys live).
        #[arg(long, default_value = "1000d")]
        ttl: String,
        /// The session windows' gap (the default keeps every session open to the end of the
        /// input, when all fire; `1000s` closes each key's session between its visits from 1M
        /// keys on).
        #[arg(long, default_value = "1000d")]
        gap: String,
        /// Another freshet binary to run the same jobs with, alternating, for a ratio measured
        /// in the same run (e.g. a build of an earlier version).
        #[arg(long)]
        against: Option<std::path::PathBuf>,
        /// Runs of each job and key count (with `--against`, which binary goes first
        /// alternates, and a last table gives the median ratio).
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Seconds after which a run is stopped and reported as not finished (a 50M-key
        /// deduplication with the default memory takes about 17 minutes on 2 cores).
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Take checkpoints at this interval (e.g. `10s`) into a local directory, and add their
        /// count, durations and sizes to the table.
        #[arg(long)]
        checkpoint_interval: Option<String>,
    },
    /// Recovery: builds keyed state of `keys` distinct keys with a payload each (a
    /// deduplication keeping the latest payload, parallelism 2, checkpoints into a local
    /// directory), then starts the job again from its last checkpoint at the same parallelism and
    /// rescaled to 3, timing each start to the end of the (already consumed) input.
    Recovery {
        /// Distinct key counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1_000_000u64])]
        keys: Vec<u64>,
        /// Approximate bytes of each key's payload.
        #[arg(long, default_value_t = 300)]
        payload_bytes: usize,
        /// Seconds after which a run is stopped and reported as not finished.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Keyed state after a restore: a deduplication first builds state of `keys` distinct keys
    /// (its checkpoint is taken as its input ends), then starts again from that checkpoint over
    /// `new_per_key` times as many keys it has never seen, timed against the same run into
    /// empty state. Keys new to a restored job should cost what they cost before it.
    Restored {
        /// Distinct key counts, comma-separated: the keys restored.
        #[arg(long, value_delimiter = ',', default_values_t = [10_000_000u64])]
        keys: Vec<u64>,
        /// New keys after the restore per key restored.
        #[arg(long, default_value_t = 3)]
        new_per_key: u64,
        /// Jobs, comma-separated: `first` (keep the first row of each key: a key set) and
        /// `latest` (keep the latest: a table of one value per key).
        #[arg(long, value_delimiter = ',', default_values_t = ["first".to_string(), "latest".to_string()])]
        jobs: Vec<String>,
        /// Runs of each job and key count (which of the two timed runs goes first alternates).
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Seconds after which a run is stopped and reported as not finished.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
    },
    /// What telemetry costs: Nexmark queries with 1-second checkpoints as `freshet run` child
    /// processes, alternately without telemetry and exporting metrics (every second) and traces
    /// over OTLP while `/metrics` is scraped every second.
    Telemetry {
        /// Queries, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = ["q0".to_string(), "q5".to_string()])]
        queries: Vec<String>,
        /// Bids per run.
        #[arg(long, default_value_t = 20_000_000)]
        events: u64,
        /// Runs of each variant (alternating).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// The collector to export to (default: a rotel agent started for the run, from
        /// `pip install rotel`).
        #[arg(long)]
        otlp_endpoint: Option<String>,
        /// `http/protobuf` or `grpc`.
        #[arg(long, default_value = "http/protobuf")]
        otlp_protocol: String,
    },
    /// End-to-end latency: from when each row was due at a rate-limited generator to when it
    /// reached the sink (p50, p99, p99.9, max), at half the rate the same job sustains
    /// unthrottled (measured first), without checkpoints and with a checkpoint every second.
    Latency {
        /// Jobs, comma-separated: `pass` (generator to sink), `dedup` (keep the latest row of
        /// each of 100 000 keys: keyed state, behind a shuffle at parallelism 2) and `window`
        /// (a count per key of 10 000 keys in 1-second tumbling windows, each result timed
        /// from when its window's end was due).
        #[arg(long, value_delimiter = ',', default_values_t = ["pass".to_string(), "dedup".to_string()])]
        jobs: Vec<String>,
        /// Rows per second (default: half of what the job sustains unthrottled).
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds each measured run lasts.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Parallelism of the source and the dedup (the sink has one subtask).
        #[arg(long, default_value_t = 1)]
        parallelism: u32,
    },
}

/// The job definition of a Nexmark query.
pub fn nexmark_job(query: &str, events: u64, parallelism: u32, seed: u64) -> Result<String> {
    nexmark_job_with(query, events, parallelism, seed, BIDDERS)
}

/// The job definition of a Nexmark query over a stream of `bidders` distinct bidders.
pub fn nexmark_job_with(
    query: &str,
    events: u64,
    parallelism: u32,
    seed: u64,
    bidders: u64,
) -> Result<String> {
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
        "version: 1\nname: nexmark-{query}\nparallelism: {parallelism}\nsources:\n  bids:\n    connector: {{type: nexmark, events: {events}, seed: {seed}, bidders: {bidders}}}\n    \
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
            bidders,
            print_job,
            checkpoint_interval,
            against,
            rounds,
        } => {
            let mut text = nexmark_job_with(&query, events, parallelism, seed, bidders)?;
            if print_job {
                print!("{text}");
                return Ok(0);
            }
            if let Some(other) = against {
                let mut args: Vec<String> = vec!["bench".into(), "nexmark".into()];
                for (flag, value) in [
                    ("--query", query.clone()),
                    ("--events", events.to_string()),
                    ("--parallelism", parallelism.to_string()),
                    ("--seed", seed.to_string()),
                    ("--bidders", bidders.to_string()),
                ]
                .into_iter()
                .chain(checkpoint_interval.map(|i| ("--checkpoint-interval", i)))
                {
                    args.extend([flag.to_string(), value]);
                }
                return bench_nexmark_against(&other, &args, rounds);
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
        BenchCommand::Parallel {
            queries,
            events,
            rounds,
        } => bench_parallel(&queries, events, rounds),
        BenchCommand::Recovery {
            keys,
            payload_bytes,
            timeout,
        } => bench_recovery(
            &keys,
            payload_bytes,
            std::time::Duration::from_secs(timeout),
        ),
        BenchCommand::Latency {
            jobs,
            rate,
            seconds,
            parallelism,
        } => bench_latency(&jobs, rate, seconds, parallelism),
        BenchCommand::Restored {
            keys,
            new_per_key,
            jobs,
            rounds,
            timeout,
        } => bench_restored(
            &keys,
            new_per_key,
            &jobs,
            rounds,
            std::time::Duration::from_secs(timeout),
        ),
        BenchCommand::Telemetry {
            queries,
            events,
            rounds,
            otlp_endpoint,
            otlp_protocol,
        } => telemetry::bench_telemetry(&queries, events, rounds, otlp_endpoint, &otlp_protocol),
        BenchCommand::State {
            keys,
            events_per_key,
            jobs,
            memory_mb,
            ttl,
            gap,
            against,
            rounds,
            timeout,
            checkpoint_interval,
        } => bench_state(&StateBench {
            keys,
            per_key: events_per_key,
            jobs,
            memory_mb,
            ttl,
            gap,
            against,
            rounds,
            timeout: std::time::Duration::from_secs(timeout),
            checkpoint_interval,
        }),
    }
}

/// A latency job: `count` rows, at most `rate` per second, through `kind`, into a blackhole
/// recording each row's latency from its ingestion time. With a rate, event time advances at
/// the pace rows are due (a millisecond of event time per millisecond of the run), so a
/// window's end passes when its last rows are due; without one (a throughput run), a thousand
/// rows per millisecond.
fn latency_job(kind: &str, count: u64, rate: Option<f64>, parallelism: u32) -> Result<String> {
    let (input, transform, keys) = match kind {
        "pass" => ("events", String::new(), 100_000),
        "dedup" => (
            "q",
            "transforms:\n  q: {type: deduplicate, input: events, key: [k], keep: latest, order_by: v}\n"
                .to_string(),
            100_000,
        ),
        // a result's ingestion time is when its window's end was due: the window's end in
        // event time plus the offset of due time from event time (the same for every row of a
        // subtask, but for rounding: the smallest of its rows')
        "window" => (
            "r",
            "transforms:\n  q: {type: window, input: events, key_by: [k], window: {type: tumbling, size: 1s}, aggregates: [\"count(*) AS n\", \"min(t_in - ts * 1000) AS lag\"]}\n  r: {type: project, input: q, select: [k, n, \"epoch_ms(window_end) * 1000 + lag AS t_in\"]}\n"
                .to_string(),
            10_000,
        ),
        other => bail!("unknown latency benchmark job {other}; use pass, dedup or window"),
    };
    let (rate, ts) = match rate {
        Some(r) => (
            format!("      rows_per_second: {r}\n"),
            format!("seq * 1000 / {}", (r.round() as u64).max(1)),
        ),
        None => (String::new(), "seq / 1000".to_string()),
    };
    Ok(format!(
        "version: 1\nname: latency-{kind}\nparallelism: {parallelism}\nsources:\n  events:\n    connector:\n      type: generator\n      count: {count}\n{rate}      fields: {{k: \"seq % {keys}\", v: \"seq\", ts: \"1714557600000 + {ts}\"}}\n      ingestion_time: t_in\n    event_time: ts\n{transform}sinks:\n  out: {{input: {input}, parallelism: 1, connector: {{type: blackhole, latency_of: t_in}}}}\n"
    ))
}

/// Percentiles of a latency histogram given as (bucket bound in microseconds, rows), in order
/// of bounds: the bound of the bucket holding each percentile's row.
fn percentiles(buckets: &[(u64, u64)], ps: &[f64]) -> Vec<u64> {
    let total: u64 = buckets.iter().map(|(_, n)| n).sum();
    ps.iter()
        .map(|p| {
            let want = ((total as f64) * p).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (bound, n) in buckets {
                seen += n;
                if seen >= want {
                    return *bound;
                }
            }
            buckets.last().map_or(0, |(b, _)| *b)
        })
        .collect()
}

fn bench_latency(
    jobs: &[String],
    rate: Option<f64>,
    seconds: u64,
    parallelism: u32,
) -> Result<i32> {
    println!(
        "| job | p | checkpoints | rows/s | rows | p50 ms | p99 ms | p99.9 ms | max ms |\n|---|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    for kind in jobs {
        let rate = match rate {
            Some(r) => r,
            None => {
                // what the job sustains unthrottled, over a few seconds' worth of rows
                let events = 20_000_000;
                let text = latency_job(kind, events, None, parallelism)?;
                let m = run_latency(kind, &text)?;
                // input rows: a window writes fewer than it reads
                (events as f64 / m.wall / 2.0).round()
            }
        };
        let count = (rate * seconds as f64) as u64;
        for interval in [None, Some("1s")] {
            let dir = tempfile::tempdir()?;
            let mut text = latency_job(kind, count, Some(rate), parallelism)?;
            if let Some(i) = interval {
                text.push_str(&checkpointing(i, dir.path()));
            }
            let m = run_latency(kind, &text)?;
            let ps = percentiles(&m.buckets, &[0.5, 0.99, 0.999, 1.0]);
            let ms = |us: u64| us as f64 / 1000.0;
            println!(
                "| {kind} | {parallelism} | {} | {rate:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                interval.unwrap_or("none"),
                m.rows,
                ms(ps[0]),
                ms(ps[1]),
                ms(ps[2]),
                ms(ps[3])
            );
        }
    }
    println!(
        "\nLatency is from when a row was due at the generator to when it reached the sink; each figure is the upper bound of its histogram bucket (at most an eighth above the true value)."
    );
    Ok(0)
}

/// A latency run: rows at the sink, wall seconds, and the latency histogram.
struct LatencyRun {
    rows: u64,
    wall: f64,
    buckets: Vec<(u64, u64)>,
}

fn run_latency(kind: &str, text: &str) -> Result<LatencyRun> {
    let spec = job_format()
        .parse(text, &format!("latency-{kind}"), &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let parallelism = spec.parallelism;
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, parallelism, events)
    });
    let t0 = Instant::now();
    let job = jm.submit(spec, std::env::current_dir()?)?;
    let status = job.wait();
    let wall = t0.elapsed().as_secs_f64();
    if let JobState::Failed(e) = &status.state {
        bail!("benchmark job failed: {e}");
    }
    let mut buckets: Vec<(u64, u64)> = status
        .accumulators
        .iter()
        .filter_map(|(k, v)| {
            let bound = k.strip_prefix("out.latency_us.le_")?.parse().ok()?;
            Some((bound, *v as u64))
        })
        .collect();
    buckets.sort();
    Ok(LatencyRun {
        rows: status.accumulators.get("out.rows").copied().unwrap_or(0) as u64,
        wall,
        buckets,
    })
}

/// A job over `keys` distinct keys, each seen `b.per_key` times, spread over the whole input.
/// The join reads `per_key / 2` orders and as many payments per key from two sources (a key's
/// payment half a second of event time after its order, within a 5 s interval), aligned with a
/// drift of 30 s so that neither runs further ahead of the other: its state is bounded by the
/// interval and the drift, not by the key count.
fn state_job(kind: &str, keys: u64, b: &StateBench) -> Result<String> {
    let (per_key, ttl, gap) = (b.per_key, &b.ttl, &b.gap);
    let transform = match kind {
        "dedup" => format!(
            "    type: deduplicate\n    input: events\n    key: [k]\n    keep: first\n    ttl: {ttl}\n"
        ),
        "session" => format!(
            "    type: window\n    input: events\n    key_by: [k]\n    window: {{type: session, gap: {gap}}}\n    aggregates: [\"count(*) AS n\"]\n"
        ),
        "window" => {
            "    type: window\n    input: events\n    key_by: [k]\n    window: {type: tumbling, size: 1000d}\n    aggregates: [\"count(*) AS n\"]\n".into()
        }
        "join" => {
            "    type: interval_join\n    left: orders\n    right: payments\n    left_key: [k]\n    right_key: [k]\n    lower_bound: 0s\n    upper_bound: 5s\n    where: \"orders.amount = payments.amount\"\n    select: [orders.k, orders.amount, \"payments.ts AS paid_at\"]\n".into()
        }
        other => bail!("unknown state benchmark job {other}; use dedup, window, session or join"),
    };
    // a multiplier coprime with the key count visits every key once per round, in an order
    // that defeats any locality
    let step = (7919..).find(|m| gcd(*m, keys) == 1).unwrap_or(1);
    let state = b
        .memory_mb
        .map(|m| format!("state: {{memory_mb: {m}}}\n"))
        .unwrap_or_default();
    let source = |name: &str, count: u64, delay: u64, amount: &str| {
        // the join's inputs are aligned: a source running ahead would leave its rows in state
        let aligned = if kind == "join" {
            "    watermark: {alignment: {group: inputs, max_drift: 30s}}\n"
        } else {
            ""
        };
        format!(
            "  {name}:\n    connector:\n      type: generator\n      count: {count}\n      fields: {{k: \"(seq * {step}) % {keys}\", {amount}ts: \"1714557600000 + seq + {delay}\"}}\n    event_time: ts\n{aligned}"
        )
    };
    let (sources, sinks) = if kind == "join" {
        let count = (keys * per_key).div_ceil(2);
        (
            format!(
                "{}{}",
                source("orders", count, 0, "amount: \"seq % 100\", "),
                source("payments", count, 500, "amount: \"seq % 100\", ")
            ),
            "  unmatched: {input: q.unmatched, connector: {type: blackhole}}\n",
        )
    } else {
        (source("events", keys * per_key, 0, ""), "")
    };
    Ok(format!(
        "version: 1\nname: state-{kind}\n{state}sources:\n{sources}transforms:\n  q:\n{transform}sinks:\n  out: {{input: q, connector: {{type: blackhole}}}}\n{sinks}",
    ))
}

/// The rows a [`state_job`] writes to its sink `out`, worked out from the generator's keys and
/// times (not from running it), or `None` where the settings make it depend on more than that.
///
/// A key's events are exactly `keys` milliseconds of event time apart (the generator visits
/// every key once per `keys` events), so: the deduplication keeps one row per key while its TTL
/// outlasts a key's visits; the tumbling window holds every key in one window while the input
/// fits in one; sessions hold a key's visits together when the gap exceeds `keys` ms and each
/// visit alone when it falls short; the join matches an order `i` with each payment `j` of the
/// same key and amount (`j ≡ i` modulo both `keys` and 100) paid 0 to 5 s after it (payments are
/// stamped 500 ms after their order: `j - i` from -500 to 4 500).
fn expected_rows(kind: &str, keys: u64, b: &StateBench) -> Option<u64> {
    let millis = |d: &str| Some(humantime::parse_duration(d.trim()).ok()?.as_millis());
    let events = keys * b.per_key;
    let span = u128::from((b.per_key - 1) * keys);
    match kind {
        "dedup" => (millis(&b.ttl)? > span).then_some(keys),
        "window" => {
            const SIZE: u64 = 1000 * 86_400_000;
            let first = 1_714_557_600_000u64;
            (first / SIZE == (first + events - 1) / SIZE).then_some(keys)
        }
        "session" => match millis(&b.gap)?.cmp(&u128::from(keys)) {
            std::cmp::Ordering::Greater => Some(keys),
            std::cmp::Ordering::Less => Some(events),
            std::cmp::Ordering::Equal => None,
        },
        "join" => {
            let count = events.div_ceil(2) as i64;
            let step = (keys / gcd(keys, 100) * 100) as i64;
            let first = (-500i64).div_euclid(step) * step;
            let matches = (first..=4500)
                .step_by(step as usize)
                .filter(|d| *d >= -500)
                .map(|d| (count - d.abs()).max(0))
                .sum::<i64>();
            Some(matches as u64)
        }
        _ => None,
    }
}

/// The rows a finished run wrote to its sink `out`, from the `out.rows` line of its summary.
fn rows_out(run: &ChildRun) -> Option<u64> {
    let ChildRun::Done { log, .. } = run else {
        return None;
    };
    log.lines()
        .find_map(|l| l.trim().strip_prefix("out.rows = ")?.parse().ok())
}

/// The output rows cell of a run: the count, flagged when it differs from `expected`; and
/// whether it did.
fn rows_cell(run: &ChildRun, expected: Option<u64>) -> (String, bool) {
    match (rows_out(run), expected) {
        (Some(n), Some(e)) if n != e => (format!("{n} (expected {e})"), true),
        (Some(n), _) => (n.to_string(), false),
        (None, _) if matches!(run, ChildRun::Done { .. }) => ("none".into(), expected.is_some()),
        (None, _) => ("-".into(), false),
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// How a child run ended: wall seconds, CPU seconds, peak RSS and peak disk (bytes), or
/// stopped at the timeout.
enum ChildRun {
    Done {
        wall: f64,
        cpu: f64,
        rss: u64,
        /// The most the child's working files (its keyed state's RocksDB instances) took on
        /// disk, sampled every second.
        disk: u64,
        log: String,
    },
    TimedOut,
}

/// Runs `BINARY run JOB` as a child process (with `env` added to its environment); its wall
/// time, CPU time, peak RSS and peak disk, unless it runs past `timeout`. The child gets a
/// temporary directory of its own (`TMPDIR`), where its keyed state's working copies live, and
/// that directory's size is sampled while it runs.
fn run_child(
    binary: &std::path::Path,
    job: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: std::time::Duration,
) -> Result<ChildRun> {
    use std::io::Read;
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let mut child = std::process::Command::new(binary)
        .arg("run")
        .arg(job)
        .args(["--listen", "off"])
        .args(args)
        // the JobManager logs each completed checkpoint's duration and sizes at info
        .env("FRESHET_LOG", "info")
        .env("TMPDIR", tmp.path())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let pid = child.id() as libc::pid_t;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let watched = tmp.path().to_path_buf();
    let watchdog = std::thread::spawn(move || {
        let mut disk = 0;
        loop {
            disk = disk.max(dir_bytes(&watched));
            let left = timeout.saturating_sub(t0.elapsed());
            match stopped.recv_timeout(left.min(std::time::Duration::from_secs(1))) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if left.is_zero() => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                _ => return (false, disk),
            }
        }
        // SAFETY: signals our own child, which has not been reaped yet (wait4 below is
        // still waiting for it)
        unsafe { libc::kill(pid, libc::SIGKILL) };
        (true, disk)
    });
    // wait4 rather than Child::wait: it returns the child's own resource usage
    let mut status = 0;
    // SAFETY: wait4 only writes into the two values we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = t0.elapsed().as_secs_f64();
    let _ = stop.send(());
    let (timed_out, disk) = watchdog.join().unwrap_or((false, 0));
    let stderr = reader.join().unwrap_or_default();
    if timed_out {
        return Ok(ChildRun::TimedOut);
    }
    if waited < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{} failed: {stderr}", job.display());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(ChildRun::Done {
        wall,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
        rss: usage.ru_maxrss as u64 * 1024,
        disk,
        log: stderr,
    })
}

/// Bytes the files under `dir` take on disk (as `du` counts them: allocated blocks); a file or
/// directory that vanishes while it is counted counts as nothing.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.blocks() * 512),
            Err(_) => 0,
        })
        .sum()
}

/// What `freshet bench state` runs.
struct StateBench {
    keys: Vec<u64>,
    per_key: u64,
    jobs: Vec<String>,
    memory_mb: Option<usize>,
    ttl: String,
    gap: String,
    against: Option<std::path::PathBuf>,
    rounds: u32,
    timeout: std::time::Duration,
    checkpoint_interval: Option<String>,
}

/// Table cells of one child run: wall seconds, events/s, peak RSS and peak disk in MB, or how
/// long it ran without finishing.
fn cells(run: &ChildRun, events: u64, timeout: std::time::Duration) -> [String; 4] {
    match run {
        ChildRun::Done {
            wall, rss, disk, ..
        } => [
            format!("{wall:.2}"),
            format!("{:.0}", events as f64 / wall),
            format!("{}", rss >> 20),
            format!("{}", disk >> 20),
        ],
        ChildRun::TimedOut => [
            format!("> {}", timeout.as_secs()),
            "-".into(),
            "-".into(),
            "-".into(),
        ],
    }
}

/// RocksDB reads per event of a finished run, from the "state of" lines of its summary (keyed
/// tables and key sets count their reads; a window's panes never read to update); `-` when
/// the run printed none.
fn reads_cell(run: &ChildRun, events: u64) -> String {
    let ChildRun::Done { log, .. } = run else {
        return "-".into();
    };
    let reads: Vec<u64> = log
        .lines()
        .filter_map(crate::run::state_line_reads)
        .collect();
    if reads.is_empty() {
        return "-".into();
    }
    let reads: u64 = reads.iter().sum();
    format!("{:.3}", reads as f64 / events as f64)
}

fn bench_state(b: &StateBench) -> Result<i32> {
    if b.keys.is_empty() || b.keys.contains(&0) || b.per_key == 0 || b.rounds == 0 {
        bail!(
            "--keys needs one or more key counts above 0, and --events-per-key and --rounds at least 1"
        );
    }
    let this = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let mut keys = b.keys.clone();
    keys.sort_unstable();
    let budget = b.memory_mb.map_or("default".to_string(), |m| m.to_string());
    println!(
        "state.memory_mb: {budget}; events per key: {}; deduplication TTL: {}; session gap: {}",
        b.per_key, b.ttl, b.gap
    );
    if b.against.is_some() {
        println!(
            "| job | distinct keys | round | events | wall s | events/s | peak RSS MB | peak disk MB | RocksDB reads per event | other: wall s | other: events/s | other: peak RSS MB | other: peak disk MB | other: RocksDB reads per event | speed vs other | output rows | other: output rows |"
        );
        println!(
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
    } else {
        println!(
            "| job | distinct keys | events | wall s | events/s | vs {} keys | peak RSS MB | peak disk MB | RocksDB reads per event | output rows |",
            keys[0]
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    let mut checkpoint_rows = Vec::new();
    let mut wrong_rows = Vec::new();
    let mut medians: Vec<(&String, u64, Vec<f64>)> = Vec::new();
    // each run its own job file and checkpoint directory, so no run resumes from another's
    let job_file = |kind: &str, k: u64, who: &str| -> Result<std::path::PathBuf> {
        let mut text = state_job(kind, k, b)?;
        if let Some(i) = &b.checkpoint_interval {
            text.push_str(&checkpointing(
                i,
                &dir.path().join(format!("ck-{kind}-{k}-{who}")),
            ));
        }
        let path = dir.path().join(format!("{kind}-{k}-{who}.yaml"));
        std::fs::write(&path, text)?;
        Ok(path)
    };
    for kind in &b.jobs {
        let mut first = None;
        for (&k, round) in keys
            .iter()
            .flat_map(|k| std::iter::repeat(k).zip(1..=b.rounds))
        {
            let events = k * b.per_key;
            let mine = || {
                let job = job_file(kind, k, &format!("this-{round}"))?;
                run_child(&this, &job, &[], &[], b.timeout)
            };
            // with another binary, which one runs first alternates, so drift hits both alike
            let (run, theirs) = match &b.against {
                Some(other) => {
                    let other = || {
                        let job = job_file(kind, k, &format!("other-{round}"))?;
                        run_child(other, &job, &[], &[], b.timeout)
                    };
                    if round % 2 == 1 {
                        let run = mine()?;
                        (run, Some(other()?))
                    } else {
                        let theirs = other()?;
                        (mine()?, Some(theirs))
                    }
                }
                None => (mine()?, None),
            };
            if let ChildRun::Done { log, .. } = &run
                && b.checkpoint_interval.is_some()
            {
                checkpoint_rows.push(format!(
                    "| {kind} | {k} | {round} | {} |",
                    checkpoint_cells(log)
                ));
            }
            let [wall, eps, rss, disk] = cells(&run, events, b.timeout);
            let reads = reads_cell(&run, events);
            let expected = expected_rows(kind, k, b);
            let (rows, wrong) = rows_cell(&run, expected);
            if wrong {
                wrong_rows.push(format!("{kind} with {k} keys: {rows}"));
            }
            if let Some(theirs) = theirs {
                let [owall, oeps, orss, odisk] = cells(&theirs, events, b.timeout);
                let oreads = reads_cell(&theirs, events);
                let (orows, _) = rows_cell(&theirs, expected);
                let ratio = match (&run, &theirs) {
                    (ChildRun::Done { wall: a, .. }, ChildRun::Done { wall: o, .. }) => {
                        match medians.iter_mut().find(|(j, n, _)| *j == kind && *n == k) {
                            Some((_, _, ratios)) => ratios.push(o / a),
                            None => medians.push((kind, k, vec![o / a])),
                        }
                        format!("{:.2}", o / a)
                    }
                    (ChildRun::Done { wall: a, .. }, ChildRun::TimedOut) => {
                        format!("> {:.1}", b.timeout.as_secs_f64() / a)
                    }
                    _ => "-".into(),
                };
                println!(
                    "| {kind} | {k} | {round} | {events} | {wall} | {eps} | {rss} | {disk} | {reads} | {owall} | {oeps} | {orss} | {odisk} | {oreads} | {ratio} | {rows} | {orows} |"
                );
            } else {
                let vs = match &run {
                    ChildRun::Done { wall, .. } => {
                        let rate = events as f64 / wall;
                        format!("{:.2}", rate / *first.get_or_insert(rate))
                    }
                    ChildRun::TimedOut => "-".into(),
                };
                println!(
                    "| {kind} | {k} | {events} | {wall} | {eps} | {vs} | {rss} | {disk} | {reads} | {rows} |"
                );
            }
        }
    }
    if b.rounds > 1 && !medians.is_empty() {
        println!("\nSpeed vs other over the rounds both finished:\n");
        println!("| job | distinct keys | rounds | median | lowest | highest |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (kind, k, mut ratios) in medians {
            let (lo, hi) = (
                ratios.iter().cloned().fold(f64::MAX, f64::min),
                ratios.iter().cloned().fold(f64::MIN, f64::max),
            );
            println!(
                "| {kind} | {k} | {} | {:.2} | {lo:.2} | {hi:.2} |",
                ratios.len(),
                median(&mut ratios)
            );
        }
    }
    if let Some(i) = &b.checkpoint_interval {
        println!("\nCheckpoints every {i} (this build):\n");
        println!(
            "| job | distinct keys | round | checkpoints | duration median ms | duration max ms | uploaded median MB | uploaded max MB | uploaded total MB | last full MB |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in checkpoint_rows {
            println!("{row}");
        }
    }
    if !wrong_rows.is_empty() {
        eprintln!(
            "wrong output (this build): {}; the timings above do not count",
            wrong_rows.join("; ")
        );
        return Ok(1);
    }
    Ok(0)
}

/// Table cells from the "checkpoint completed" lines of a run's log: how many, the median and
/// largest duration and upload, all uploads together (a state that stops growing uploads
/// nothing more, so its median upload can be 0 while its first checkpoints uploaded it all),
/// and the full size of the last.
fn checkpoint_cells(log: &str) -> String {
    let field = log_field;
    let (mut durations, mut uploads, mut last_full) = (Vec::new(), Vec::new(), 0.0);
    for line in log.lines().filter(|l| l.contains("checkpoint completed")) {
        if let (Some(d), Some(u), Some(f)) = (
            field(line, "duration_ms"),
            field(line, "uploaded_bytes"),
            field(line, "full_bytes"),
        ) {
            durations.push(d);
            uploads.push(u / 1e6);
            last_full = f / 1e6;
        }
    }
    if durations.is_empty() {
        return "0 | - | - | - | - | - | -".into();
    }
    let max = |v: &[f64]| v.iter().cloned().fold(f64::MIN, f64::max);
    format!(
        "{} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {last_full:.1}",
        durations.len(),
        median(&mut durations.clone()),
        max(&durations),
        median(&mut uploads.clone()),
        max(&uploads),
        uploads.iter().sum::<f64>(),
    )
}

/// The number logged as `name=...` in a log line.
fn log_field(line: &str, name: &str) -> Option<f64> {
    log_text(line, name)?.parse().ok()
}

/// The text of field `name` (`name=value`) of a log or result line.
fn log_text<'l>(line: &'l str, name: &str) -> Option<&'l str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// Megabytes the last completed checkpoint in a JobManager's log uploaded, as a table cell.
fn last_upload_cell(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("checkpoint completed"))
        .filter_map(|l| log_field(l, "uploaded_bytes"))
        .next_back()
        .map_or("-".into(), |b| format!("{:.1}", b / 1e6))
}

/// The recovery benchmark's job: `keys` keys, each written once with a payload of about
/// `payload` bytes of digits (which compress little), kept by a deduplication that never clears
/// them; the source stays at parallelism 2 whatever the job's, so the state can be rescaled.
fn recovery_job(keys: u64, payload: usize, checkpoints: &std::path::Path) -> String {
    let step = (7919..).find(|m| gcd(*m, keys) == 1).unwrap_or(1);
    // each term is a pseudo-random number of up to ten digits
    let terms: Vec<String> = (0..payload.div_ceil(10).max(1))
        .map(|i| {
            let m = 2_654_435_761u64 + 2 * i as u64;
            format!("CAST((seq * {m} + {i}) % 9999999967 AS VARCHAR)")
        })
        .collect();
    format!(
        "version: 1\nname: recovery\nparallelism: 2\nsources:\n  events:\n    parallelism: 2\n    connector:\n      type: generator\n      count: {keys}\n      fields:\n        k: \"(seq * {step}) % {keys}\"\n        p: \"concat({})\"\n        ts: \"1714557600000 + seq\"\n    event_time: ts\ntransforms:\n  latest:\n    type: deduplicate\n    input: events\n    key: [k]\n    keep: latest\n    order_by: p\nsinks:\n  out: {{input: latest, connector: {{type: blackhole}}}}\ncheckpointing:\n  interval: 60s\n  dir: {}\n",
        terms.join(", "),
        checkpoints.display()
    )
}

/// Bytes of the files the newest completed checkpoint under `dir` is made of (what a restore
/// reads).
fn checkpoint_state_bytes(dir: &std::path::Path) -> Result<u64> {
    let mut newest: Option<(u64, std::path::PathBuf)> = None;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("chk-")
            .and_then(|n| n.parse::<u64>().ok())
            && e.path().join(freshet_engine::checkpoint::METADATA).exists()
            && newest.as_ref().is_none_or(|(m, _)| n > *m)
        {
            newest = Some((n, e.path()));
        }
    }
    let Some((_, chk)) = newest else {
        bail!("no completed checkpoint in {}", dir.display());
    };
    let metadata: freshet_engine::checkpoint::CheckpointMetadata = serde_json::from_slice(
        &std::fs::read(chk.join(freshet_engine::checkpoint::METADATA))?,
    )?;
    Ok(metadata.files().map(|f| f.size).sum())
}

fn bench_recovery(keys: &[u64], payload: usize, timeout: std::time::Duration) -> Result<i32> {
    if keys.is_empty() || keys.contains(&0) {
        bail!("--keys needs one or more key counts above 0");
    }
    let this = std::env::current_exe()?;
    println!(
        "| distinct keys | state in the checkpoint MB | build s | restart p=2 s | uploaded MB | rescale 2 -> 3 s | uploaded MB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &k in keys {
        let dir = tempfile::tempdir()?;
        let checkpoints = dir.path().join("checkpoints");
        let path = dir.path().join("recovery.yaml");
        std::fs::write(&path, recovery_job(k, payload, &checkpoints))?;
        // a run's time, and what its last checkpoint uploaded
        let time = |args: &[&str]| -> Result<(String, String)> {
            Ok(match run_child(&this, &path, args, &[], timeout)? {
                ChildRun::Done { wall, log, .. } => (format!("{wall:.2}"), last_upload_cell(&log)),
                ChildRun::TimedOut => (format!("> {}", timeout.as_secs()), "-".into()),
            })
        };
        let (build, _) = time(&[])?;
        let bytes = checkpoint_state_bytes(&checkpoints.join("recovery"))?;
        // both runs resume from the newest completed checkpoint and find the input consumed
        let (restart, restart_up) = time(&[])?;
        let (rescale, rescale_up) = time(&["--parallelism", "3"])?;
        println!(
            "| {k} | {:.0} | {build} | {restart} | {restart_up} | {rescale} | {rescale_up} |",
            bytes as f64 / 1e6
        );
    }
    Ok(0)
}

/// A deduplication (`kind`: `first` or `latest`) of `count` distinct keys from source `source`,
/// the keys numbered from `from` and each one's number spread over a billion values with no
/// locality, with its checkpoint (taken as the input ends) in `checkpoints`. Without a TTL: the
/// input's end takes event time to its end, past any key's deadline.
fn restored_job(
    kind: &str,
    source: &str,
    from: u64,
    count: u64,
    checkpoints: &std::path::Path,
) -> Result<String> {
    let keep = match kind {
        "first" => "keep: first",
        "latest" => "keep: latest\n    order_by: ts",
        other => bail!("unknown restored-state benchmark job {other}; use first or latest"),
    };
    // 1 000 000 007 is prime: distinct numbers below it stay distinct
    if from + count >= 1_000_000_007 {
        bail!("at most 500 000 000 keys");
    }
    Ok(format!(
        "version: 1\nname: restored\nsources:\n  {source}:\n    connector:\n      type: generator\n      count: {count}\n      fields: {{k: \"(seq + {from}) * 7919 % 1000000007\", ts: \"1714557600000 + seq\"}}\n    event_time: ts\ntransforms:\n  d:\n    type: deduplicate\n    input: {source}\n    key: [k]\n    {keep}\nsinks:\n  out: {{input: d, connector: {{type: blackhole}}}}\n{}",
        checkpointing("1h", checkpoints)
    ))
}

fn bench_restored(
    keys: &[u64],
    new_per_key: u64,
    jobs: &[String],
    rounds: u32,
    timeout: std::time::Duration,
) -> Result<i32> {
    if keys.is_empty() || keys.contains(&0) || rounds == 0 || new_per_key == 0 {
        bail!(
            "--keys needs one or more key counts above 0, and --rounds and --new-per-key at least 1"
        );
    }
    let this = std::env::current_exe()?;
    println!(
        "| job | restored keys | new keys | round | build s | into empty state: wall s | events/s | restored: wall s | events/s | RocksDB reads per event | restored vs empty |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for kind in jobs {
        for &k in keys {
            for round in 1..=rounds {
                let dir = tempfile::tempdir()?;
                let job = |name: &str, text: String| -> Result<std::path::PathBuf> {
                    let path = dir.path().join(name);
                    std::fs::write(&path, text)?;
                    Ok(path)
                };
                let restored = dir.path().join("restored");
                let build = job("build.yaml", restored_job(kind, "events", 0, k, &restored)?)?;
                // a new source (the old one's position is dropped) over keys never seen
                let new = k * new_per_key;
                let again = job("again.yaml", restored_job(kind, "more", k, new, &restored)?)?;
                let empty = job(
                    "empty.yaml",
                    restored_job(kind, "more", k, new, &dir.path().join("empty"))?,
                )?;
                let built = run_child(&this, &build, &[], &[], timeout)?;
                let restore =
                    || run_child(&this, &again, &["--allow-non-restored-state"], &[], timeout);
                let fresh = || run_child(&this, &empty, &[], &[], timeout);
                let (after, before) = if round % 2 == 1 {
                    let before = fresh()?;
                    (restore()?, before)
                } else {
                    let after = restore()?;
                    (after, fresh()?)
                };
                let build_s = match built {
                    ChildRun::Done { wall, .. } => format!("{wall:.2}"),
                    ChildRun::TimedOut => format!("> {}", timeout.as_secs()),
                };
                let [fwall, feps, ..] = cells(&before, new, timeout);
                let [rwall, reps, ..] = cells(&after, new, timeout);
                let ratio = match (&before, &after) {
                    (ChildRun::Done { wall: f, .. }, ChildRun::Done { wall: r, .. }) => {
                        format!("{:.2}", f / r)
                    }
                    _ => "-".into(),
                };
                println!(
                    "| {kind} | {k} | {new} | {round} | {build_s} | {fwall} | {feps} | {rwall} | {reps} | {} | {ratio} |",
                    reads_cell(&after, new)
                );
            }
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

fn bench_parallel(queries: &[String], events: u64, rounds: u32) -> Result<i32> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    println!(
        "| query | events | p=1 events per CPU-s | p=2 events per CPU-s | p=2 / p=1 | p=1 events/s | p=2 events/s | same result |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for q in queries {
        let jobs = [
            nexmark_job(q, events, 1, 42)?,
            nexmark_job(q, events, 2, 42)?,
        ];
        let (mut cpu, mut wall) = ([vec![], vec![]], [vec![], vec![]]);
        let mut same = true;
        for round in 0..rounds {
            let mut results = [(0, 0, 0); 2];
            // which goes first alternates too, so a drift over the session favours neither
            let order = if round % 2 == 0 { [1usize, 2] } else { [2, 1] };
            for p in order {
                let r = run_nexmark(q, &jobs[p - 1], events, p as u32)?;
                cpu[p - 1].push(r.events as f64 / r.cpu.max(1e-9));
                wall[p - 1].push(r.events as f64 / r.wall);
                results[p - 1] = (r.rows, r.sum1, r.sum2);
            }
            same &= results[0] == results[1];
        }
        let c1 = median(&mut cpu[0]);
        let c2 = median(&mut cpu[1]);
        println!(
            "| {q} | {events} | {c1:.0} | {c2:.0} | {:.2} | {:.0} | {:.0} | {same} |",
            c2 / c1,
            median(&mut wall[0]),
            median(&mut wall[1]),
        );
    }
    Ok(0)
}

/// `bench nexmark --against OTHER`: this binary and `other` each run `args` (a `bench nexmark`
/// command) `rounds` times as processes of their own, alternating which goes first; a row per
/// round and one of medians.
fn bench_nexmark_against(other: &std::path::Path, args: &[String], rounds: u32) -> Result<i32> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let this = std::env::current_exe()?;
    println!(
        "| round | this: events per CPU-s | other: events per CPU-s | this / other | this: events/s | other: events/s | same result |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    let (mut cpu, mut wall) = ([vec![], vec![]], [vec![], vec![]]);
    let mut all_same = true;
    for round in 1..=rounds {
        let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        let mut got: [Option<NexmarkResult>; 2] = [None, None];
        for i in order {
            let binary = if i == 0 { this.as_path() } else { other };
            got[i] = Some(nexmark_child(binary, args)?);
        }
        let [Some(a), Some(o)] = got else {
            bail!("round {round} did not run both binaries");
        };
        let same = a.result == o.result;
        all_same &= same;
        println!(
            "| {round} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {same} |",
            a.per_cpu_s,
            o.per_cpu_s,
            a.per_cpu_s / o.per_cpu_s,
            a.per_s,
            o.per_s
        );
        for (i, r) in [a, o].into_iter().enumerate() {
            cpu[i].push(r.per_cpu_s);
            wall[i].push(r.per_s);
        }
    }
    let (c0, c1) = (median(&mut cpu[0]), median(&mut cpu[1]));
    println!(
        "| median | {c0:.0} | {c1:.0} | {:.2} | {:.0} | {:.0} | {all_same} |",
        c0 / c1,
        median(&mut wall[0]),
        median(&mut wall[1])
    );
    Ok(0)
}

/// What a `bench nexmark` run printed: events per CPU-second and per second, and its result
/// (rows and checksums, as printed).
#[derive(Debug, PartialEq)]
struct NexmarkResult {
    per_cpu_s: f64,
    per_s: f64,
    result: String,
}

/// Runs `binary` with `args` (a `bench nexmark` command) and reads its RESULT line.
fn nexmark_child(binary: &std::path::Path, args: &[String]) -> Result<NexmarkResult> {
    let out = std::process::Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("running {}: {e}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} {} failed: {}",
            binary.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
        .lines()
        .find_map(parse_nexmark_result)
        .ok_or_else(|| anyhow::anyhow!("{} printed no RESULT line: {stdout}", binary.display()))
}

/// A `RESULT engine=freshet ...` line of `bench nexmark`.
fn parse_nexmark_result(line: &str) -> Option<NexmarkResult> {
    let rest = line.strip_prefix("RESULT engine=freshet ")?;
    let field = |name: &str| log_text(rest, name);
    Some(NexmarkResult {
        per_cpu_s: field("eps_per_cpu_s")?.parse().ok()?,
        per_s: field("eps")?.parse().ok()?,
        result: ["rows", "sum1", "sum2"]
            .map(|f| field(f).map(|v| format!("{f}={v}")))
            .into_iter()
            .collect::<Option<Vec<_>>>()?
            .join(" "),
    })
}

/// The middle value, or the mean of the middle two.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() % 2 {
        1 => v[v.len() / 2],
        _ => (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0,
    }
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
    let spec = job_format()
        .parse(text, &format!("nexmark-{query}"), &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let events = events - events % parallelism as u64;
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, parallelism, events)
    });
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
    let spec = job_format()
        .parse(&text, "large-state", &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, 1, events)
    });
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
    fn recovery_benchmark_job_is_valid() {
        let text = recovery_job(1000, 95, std::path::Path::new("/tmp/c"));
        let job = job_format()
            .parse(&text, "recovery.yaml", &[])
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(job.parallelism, 2);
        assert_eq!(text.matches("CAST(").count(), 10);
        assert!(bench_recovery(&[0], 10, std::time::Duration::from_secs(1)).is_err());
        assert!(bench_parallel(&["q5".into()], 1000, 0).is_err());
    }

    /// A directory's size counts the files of its subdirectories, as allocated on disk, and a
    /// directory that is not there counts as nothing.
    #[test]
    fn a_directory_counts_the_files_under_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(dir_bytes(&dir.path().join("missing")), 0);
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("top"), vec![1u8; 100_000]).unwrap();
        std::fs::write(dir.path().join("a/b/deep"), vec![2u8; 300_000]).unwrap();
        let bytes = dir_bytes(dir.path());
        // whole blocks: at least the bytes written, at most a few blocks more per file
        assert!((400_000..400_000 + 64 * 1024).contains(&bytes), "{bytes}");
        std::fs::remove_file(dir.path().join("a/b/deep")).unwrap();
        assert!(dir_bytes(dir.path()) < 200_000);
    }

    #[test]
    fn checkpoint_lines_of_a_log_make_table_cells() {
        let log = "2026-12-02T01:00:00Z  INFO freshet_jobmanager::checkpoints: checkpoint completed kind=Checkpoint duration_ms=120 full_bytes=5000000 uploaded_bytes=2000000 path=/c/chk-1\n\
                   2026-12-02T01:00:10Z  INFO other line duration_ms=9999\n\
                   2026-12-02T01:00:10Z  INFO freshet_jobmanager::checkpoints: checkpoint completed kind=Checkpoint duration_ms=300 full_bytes=9000000 uploaded_bytes=4000000 path=/c/chk-2\n\
                   2026-12-02T01:00:20Z  INFO freshet_jobmanager::checkpoints: checkpoint completed kind=Checkpoint duration_ms=200 full_bytes=9500000 uploaded_bytes=500000 path=/c/chk-3\n";
        assert_eq!(
            checkpoint_cells(log),
            "3 | 200 | 300 | 2.0 | 4.0 | 6.5 | 9.5"
        );
        assert_eq!(checkpoint_cells("nothing"), "0 | - | - | - | - | - | -");
        assert_eq!(last_upload_cell(log), "0.5");
        assert_eq!(
            last_upload_cell(&log.replace("=500000 ", "=2600000 ")),
            "2.6"
        );
        assert_eq!(last_upload_cell("nothing"), "-");
    }

    #[test]
    fn a_result_line_is_read_back() {
        let line = "RESULT engine=freshet query=q7 p=1 events=100 checkpoints=0 wall_s=0.010 eps=10000 cpu_s=0.01 eps_per_cpu_s=9000 rows=2 sum1=-5 sum2=18446744073709551";
        assert_eq!(
            parse_nexmark_result(line),
            Some(NexmarkResult {
                per_cpu_s: 9000.0,
                per_s: 10000.0,
                result: "rows=2 sum1=-5 sum2=18446744073709551".into(),
            })
        );
        assert_eq!(parse_nexmark_result("RESULT bench=shuffle round=1"), None);
        assert_eq!(
            parse_nexmark_result(&line.replace(" sum2=", " sum3=")),
            None
        );
    }

    #[test]
    fn a_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut [0.9, 1.2]), 1.05);
    }

    /// The state benchmark's settings: `keys`, `rounds` and `memory_mb`, a session gap of
    /// 1000 s, and the defaults.
    fn state_bench(keys: u64, rounds: u32, memory_mb: Option<usize>) -> StateBench {
        StateBench {
            keys: vec![keys],
            per_key: 2,
            jobs: vec!["dedup".into()],
            memory_mb,
            ttl: "1000d".into(),
            gap: "1000s".into(),
            against: None,
            rounds,
            timeout: std::time::Duration::from_secs(1),
            checkpoint_interval: None,
        }
    }

    #[test]
    fn state_benchmark_jobs_are_valid() {
        let b = state_bench(1_000_000, 1, Some(64));
        for kind in ["dedup", "window", "session", "join"] {
            let text = state_job(kind, 1_000_000, &b).unwrap();
            let job = job_format()
                .parse(&text, "state.yaml", &[])
                .unwrap_or_else(|e| panic!("{kind}: {e}\n{text}"));
            assert_eq!(job.state.memory_mb, 64);
        }
        assert!(
            state_job("session", 10, &b)
                .unwrap()
                .contains("{type: session, gap: 1000s}")
        );
        assert!(state_job("sort", 10, &b).is_err());
        let refused =
            |keys: u64, rounds: u32| bench_state(&state_bench(keys, rounds, None)).is_err();
        assert!(refused(0, 1), "no keys");
        assert!(refused(10, 0), "no rounds");
        // 7919 * 3 keys share a factor with 7919 and with 7920: 7921 (89²) is the multiplier
        assert!(
            state_job("dedup", 7919 * 3, &b)
                .unwrap()
                .contains("(seq * 7921) %")
        );
    }

    /// Counts what each state job's sink receives by running its generator's rows through a
    /// model of the operator: distinct keys (per window), sessions as runs of a key's sorted
    /// times less than the gap apart, and every order and payment pair of one key and amount
    /// with the payment 0 to 5 s after the order.
    fn modelled_rows(kind: &str, keys: u64, b: &StateBench) -> u64 {
        use std::collections::{HashMap, HashSet};
        let step = (7919..).find(|m| gcd(*m, keys) == 1).unwrap();
        let row = |seq: u64| ((seq * step) % keys, seq % 100, 1_714_557_600_000 + seq);
        let n = keys * b.per_key;
        match kind {
            "dedup" => (0..n).map(|s| row(s).0).collect::<HashSet<_>>().len() as u64,
            "window" => (0..n)
                .map(|s| (row(s).0, row(s).2 / (1000 * 86_400_000)))
                .collect::<HashSet<_>>()
                .len() as u64,
            "session" => {
                let gap = humantime::parse_duration(&b.gap).unwrap().as_millis() as u64;
                let mut times: HashMap<u64, Vec<u64>> = HashMap::new();
                for s in 0..n {
                    times.entry(row(s).0).or_default().push(row(s).2);
                }
                times
                    .values_mut()
                    .map(|t| {
                        t.sort_unstable();
                        1 + t.windows(2).filter(|w| w[1] - w[0] >= gap).count() as u64
                    })
                    .sum()
            }
            "join" => {
                let count = n.div_ceil(2);
                let mut payments: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
                for s in 0..count {
                    let (k, amount, ts) = row(s);
                    payments.entry((k, amount)).or_default().push(ts + 500);
                }
                (0..count)
                    .map(|s| {
                        let (k, amount, ts) = row(s);
                        payments.get(&(k, amount)).map_or(0, |p| {
                            p.iter().filter(|&&t| t >= ts && t <= ts + 5000).count() as u64
                        })
                    })
                    .sum()
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_expected_output_of_each_state_job_matches_a_model_of_its_rows() {
        for (keys, per_key, gap) in [
            (7, 4, "5ms"),
            (7, 4, "7ms"),
            (7, 4, "8ms"),
            (30, 400, "1s"),
            (240, 40, "1000s"),
            (4_600, 3, "1000d"),
            (20_000, 2, "5s"),
        ] {
            let mut b = state_bench(keys, 1, None);
            b.per_key = per_key;
            b.gap = gap.into();
            for kind in ["dedup", "window", "session", "join"] {
                let model = modelled_rows(kind, keys, &b);
                match expected_rows(kind, keys, &b) {
                    Some(e) => assert_eq!(e, model, "{kind} over {keys} keys, gap {gap}"),
                    // only a gap of exactly a key's spacing is left open
                    None => assert_eq!((kind, gap), ("session", "7ms")),
                }
            }
        }
        // a TTL shorter than a key's visits, or an input longer than a window: not worked out
        let mut b = state_bench(1000, 1, None);
        b.ttl = "1s".into();
        assert_eq!(expected_rows("dedup", 1000, &b), None);
        b.per_key = 100_000_000;
        assert_eq!(expected_rows("window", 1000, &b), None);
    }

    #[test]
    fn a_wrong_row_count_is_flagged() {
        let run = |rows: &str| ChildRun::Done {
            wall: 1.0,
            cpu: 1.0,
            rss: 0,
            disk: 0,
            log: format!("job j in 1s\n  out.rows = {rows}\n  x.rows = 9\n"),
        };
        assert_eq!(rows_cell(&run("5"), Some(5)), ("5".into(), false));
        assert_eq!(rows_cell(&run("5"), None), ("5".into(), false));
        assert_eq!(
            rows_cell(&run("4"), Some(5)),
            ("4 (expected 5)".into(), true)
        );
        let silent = ChildRun::Done {
            wall: 1.0,
            cpu: 1.0,
            rss: 0,
            disk: 0,
            log: String::new(),
        };
        assert_eq!(rows_cell(&silent, Some(5)), ("none".into(), true));
        assert_eq!(rows_cell(&ChildRun::TimedOut, Some(5)), ("-".into(), false));
    }
}

//! `freshet bench telemetry`: what exporting metrics and traces costs. Each Nexmark query runs
//! as a `freshet run` child process with 1-second checkpoints, alternately without telemetry
//! and with OTLP export of metrics (every second) and traces to a collector while `/metrics` is
//! scraped every second; the table compares events per CPU-second.
use anyhow::{Context, Result, bail};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{ChildRun, checkpointing, median, nexmark_job, run_child};

/// A collector to export to: the one given, or a rotel agent started for the run.
struct Collector {
    endpoint: String,
    child: Option<std::process::Child>,
}

impl Collector {
    fn start(given: Option<String>) -> Result<Collector> {
        if let Some(endpoint) = given {
            return Ok(Collector {
                endpoint,
                child: None,
            });
        }
        let o = std::process::Command::new("python3")
            .args([
                "-c",
                "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
            ])
            .output()
            .context("looking for the rotel collector with python3")?;
        if !o.status.success() {
            bail!(
                "no --otlp-endpoint given and no rotel collector to start (python3 -m pip install rotel)"
            );
        }
        let agent = String::from_utf8(o.stdout)?.trim().to_string();
        let port = free_port()?;
        let child = std::process::Command::new(&agent)
            .args([
                "start",
                "--otlp-http-endpoint",
                &format!("127.0.0.1:{port}"),
                "--otlp-grpc-endpoint",
                &format!("127.0.0.1:{}", free_port()?),
                "--exporter",
                "blackhole",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {agent}"))?;
        let address = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&address).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("the rotel collector never listened on {address}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Collector {
            endpoint: format!("http://{address}"),
            child: Some(child),
        })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Scrapes `http://address/metrics` every second until dropped.
struct Scraper(Arc<AtomicBool>);

impl Scraper {
    fn start(address: String) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let _ = scrape(&address);
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Scraper(stop)
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn scrape(address: &str) -> std::io::Result<usize> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)
}

/// Runs the benchmark and prints its table.
pub(super) fn bench_telemetry(
    queries: &[String],
    events: u64,
    rounds: u32,
    endpoint: Option<String>,
    protocol: &str,
) -> Result<i32> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let collector = Collector::start(endpoint)?;
    let this = std::env::current_exe()?;
    println!("collector: {} ({protocol})", collector.endpoint);
    println!(
        "| query | events | off: events per CPU-s | on: events per CPU-s | on / off | off: events/s | on: events/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for q in queries {
        let (mut cpu, mut wall) = ([vec![], vec![]], [vec![], vec![]]);
        for round in 0..rounds {
            // which goes first alternates, so a drift over the session favours neither
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                let dir = tempfile::tempdir()?;
                let job = dir.path().join("job.yaml");
                std::fs::write(
                    &job,
                    format!(
                        "{}{}",
                        nexmark_job(q, events, 1, 42)?,
                        checkpointing("1s", &dir.path().join("checkpoints"))
                    ),
                )?;
                let http = format!("127.0.0.1:{}", free_port()?);
                let env = [
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                    ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
                ];
                let (args, env): (Vec<&str>, &[(&str, &str)]) = if on {
                    (vec!["--http", http.as_str()], &env)
                } else {
                    (vec!["--http", "off"], &[])
                };
                let _scraper = on.then(|| Scraper::start(http.clone()));
                let run = run_child(&this, &job, &args, env, Duration::from_secs(3600))?;
                let ChildRun::Done {
                    wall: w, cpu: c, ..
                } = run
                else {
                    bail!("{q} did not finish within an hour");
                };
                cpu[on as usize].push(events as f64 / c.max(1e-9));
                wall[on as usize].push(events as f64 / w);
            }
        }
        let off = median(&mut cpu[0]);
        let on = median(&mut cpu[1]);
        println!(
            "| {q} | {events} | {off:.0} | {on:.0} | {:.3} | {:.0} | {:.0} |",
            on / off,
            median(&mut wall[0]),
            median(&mut wall[1]),
        );
    }
    Ok(0)
}

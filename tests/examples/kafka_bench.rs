//! Kafka → filter/project → Kafka throughput, exactly once next to at least once.
//!
//! Starts a real broker (see `freshet_tests::kafka`), fills a 4-partition topic with JSON
//! records, and drains it with a bounded job (filter, then project) into a 4-partition output
//! topic, once with `delivery: exactly_once` and once with `at_least_once`, both with 1 s
//! checkpoints, in this process's JobManager and TaskManager. Prints records per second for each
//! and their ratio, and checks the output a `read_committed` reader sees (exactly the selected
//! records for exactly once; at least them for at least once).
//!
//!   cargo run --release -p freshet-tests --example kafka_bench -- [RECORDS] [PARALLELISM]
use std::time::{Duration, Instant};

use freshet_connectors::job_format;
use freshet_jobmanager::{JobManager, JobState};
use freshet_tests::kafka::Broker;

fn job(bootstrap: &str, delivery: &str, topic: &str, parallelism: u32) -> String {
    format!(
        r#"
version: 1
name: kafka-bench-{delivery}
parallelism: {parallelism}
checkpointing: {{interval: 1s}}
sources:
  events:
    connector: {{type: kafka, bootstrap_servers: "{bootstrap}", topics: [events], format: json,
                 bounded: true}}
    schema: {{id: int, store: string, amount: float, flag: bool}}
transforms:
  picked: {{type: filter, input: events, where: "flag"}}
  out: {{type: project, input: picked, select: [id, store, "amount * 2 AS doubled"]}}
sinks:
  out:
    input: out
    connector: {{type: kafka, bootstrap_servers: "{bootstrap}", topic: {topic}, key: [store],
                 delivery: {delivery}}}
"#
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let records: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let parallelism: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2);
    let broker = Broker::start();
    broker.create_topic("events", 4);
    let started = Instant::now();
    let values: Vec<String> = (0..records)
        .map(|i| {
            format!(
                r#"{{"id":{i},"store":"s{}","amount":{}.5,"flag":{}}}"#,
                i % 100,
                i % 1000,
                i % 3 == 0
            )
        })
        .collect();
    for chunk in values.chunks(200_000) {
        let rows: Vec<(Option<&str>, &str, Option<i32>)> =
            chunk.iter().map(|v| (None, v.as_str(), None)).collect();
        broker.produce("events", &rows);
    }
    let selected = records.div_ceil(3);
    println!(
        "produced {records} records in {:.1} s; {selected} pass the filter",
        started.elapsed().as_secs_f64()
    );
    let mut results = Vec::new();
    for delivery in ["exactly_once", "at_least_once"] {
        let topic = format!("out-{delivery}");
        broker.create_topic(&topic, 4);
        let dir = tempfile::tempdir().unwrap();
        let spec = job_format()
            .parse(
                &job(&broker.bootstrap(), delivery, &topic, parallelism),
                "bench.yaml",
                &[],
            )
            .unwrap();
        let jm = JobManager::with_local_taskmanagers(|events| {
            freshet_taskmanager::local::taskmanagers(1, parallelism, events)
        });
        let t = Instant::now();
        let handle = jm.submit(spec, dir.path().to_path_buf()).unwrap();
        let status = handle.wait_timeout(Duration::from_secs(1800));
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(status.state, JobState::Finished, "{:?}", status.message);
        let written = broker.read_committed(&topic).len();
        match delivery {
            "exactly_once" => assert_eq!(written, selected, "exactly once"),
            _ => assert!(written >= selected, "at least once: {written} < {selected}"),
        }
        let rate = records as f64 / secs;
        println!(
            "{delivery:>14}: {records} records read, {written} written, in {secs:.1} s: {:.0} records/s",
            rate
        );
        results.push(rate);
    }
    println!(
        "exactly once / at least once: {:.2}",
        results[0] / results[1]
    );
}

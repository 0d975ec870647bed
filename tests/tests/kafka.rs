//! The Kafka source and sink against a real Apache Kafka broker (a KRaft node the test starts
//! from Maven Central jars, see `freshet_tests::kafka`).
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

use freshet_connectors::job_format;
use freshet_jobmanager::{JobManager, JobState};
use freshet_tests::kafka::Broker;
use freshet_tests::read_rows;

/// Sales as JSON text, spread over partitions by store; every tenth sale is sent twice (the
/// same record again, as an upstream retry would).
fn sales(n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let store = format!("s{}", i % 7);
        let v = json!({
            "event_id": format!("e{i}"),
            "store_id": store,
            "price": (i % 13) as f64 + 0.5,
            "quantity": (i % 3) as i64 + 1,
        })
        .to_string();
        out.push((store.clone(), v.clone()));
        if i % 10 == 0 {
            out.push((store, v));
        }
    }
    out
}

fn produce(broker: &Broker, topic: &str, records: &[(String, String)]) {
    let rows: Vec<(Option<&str>, &str, Option<i32>)> = records
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_str(), None))
        .collect();
    broker.produce(topic, &rows);
}

/// Revenue per store computed from the records, independently of the engine.
fn expected_totals(records: &[(String, String)]) -> BTreeMap<String, f64> {
    let mut totals = BTreeMap::new();
    for (_, v) in records {
        let Ok(v) = serde_json::from_str::<Value>(v) else {
            continue;
        };
        let (Some(store), Some(price), Some(q)) = (
            v["store_id"].as_str(),
            v["price"].as_f64(),
            v["quantity"].as_i64(),
        ) else {
            continue;
        };
        *totals.entry(store.to_string()).or_default() += price * q as f64;
    }
    totals
}

fn job(bootstrap: &str, delivery: &str) -> String {
    format!(
        r#"
version: 1
name: kafka-sales
checkpointing: {{interval: 300ms}}
sources:
  sales:
    connector:
      type: kafka
      bootstrap_servers: "{bootstrap}"
      topics: [sales]
      format: json
      bounded: true
      metadata: {{part: partition, off: offset, store_key: key}}
    schema: {{event_id: string, store_id: string, price: float, quantity: int, part: int, off: int, store_key: string}}
transforms:
  priced:
    type: project
    input: sales
    select: [event_id, store_id, "price * quantity AS amount", part, off, store_key]
sinks:
  out:
    input: priced
    connector:
      type: kafka
      bootstrap_servers: "{bootstrap}"
      topic: amounts
      key: [store_id]
      headers: {{source-partition: part}}
      delivery: {delivery}
  bad:
    input: sales.dead_letter
    connector: {{type: file, path: bad.jsonl}}
"#
    )
}

/// Every record of a 4-partition topic is read once at parallelism 2 (a bad one goes to the
/// dead-letter output with its topic, partition and offset), and what the exactly-once sink
/// wrote is visible to a `read_committed` reader exactly once, keyed by store.
#[test]
fn a_bounded_job_reads_every_partition_and_writes_each_row_once() {
    let broker = Broker::start();
    broker.create_topic("sales", 4);
    broker.create_topic("amounts", 2);
    let mut records = sales(500);
    records.insert(123, ("s1".into(), "{not json".into()));
    produce(&broker, "sales", &records);

    let dir = tempfile::tempdir().unwrap();
    let spec = job_format()
        .parse(
            &job(&broker.bootstrap(), "exactly_once"),
            "kafka.yaml",
            &["parallelism=2".to_string()],
        )
        .unwrap();
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, 2, events)
    });
    let handle = jm.submit(spec, dir.path().to_path_buf()).unwrap();
    let status = handle.wait_timeout(Duration::from_secs(120));
    assert_eq!(status.state, JobState::Finished, "{:?}", status.message);

    let out = broker.read_committed("amounts");
    assert_eq!(
        out.len(),
        records.len() - 1,
        "one row per good input record"
    );
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for (_, _, key, value) in &out {
        let v: Value = serde_json::from_str(value).unwrap();
        let store = v["store_id"].as_str().unwrap();
        assert_eq!(key.as_deref(), Some(store), "the key is the store");
        assert_eq!(
            v["store_key"].as_str(),
            Some(store),
            "the source's key column"
        );
        *totals.entry(store.to_string()).or_default() += v["amount"].as_f64().unwrap();
        // (partition, offset) of the input: no input record is written twice
        assert!(
            seen.insert((v["part"].as_i64().unwrap(), v["off"].as_i64().unwrap())),
            "input {v} written twice"
        );
    }
    let expected = expected_totals(&records);
    assert_eq!(
        totals.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (store, total) in &expected {
        assert!(
            (totals[store] - total).abs() < 1e-6,
            "{store}: {} vs {total}",
            totals[store]
        );
    }
    let bad = read_rows(&dir.path().join("bad.jsonl"));
    assert_eq!(bad.len(), 1, "{bad:?}");
    let position = bad[0]["position"].as_str().unwrap();
    assert!(position.starts_with("sales/"), "{position}");
    assert!(position.contains('@'), "{position}");
}

/// Runs `job` (YAML) in this process until it finishes, in a fresh directory under `dir` (so
/// it does not resume from an earlier run's checkpoints); returns the rows of `out.jsonl`.
fn run_bounded(dir: &std::path::Path, job: &str) -> Vec<Value> {
    let dir = tempfile::tempdir_in(dir).unwrap();
    let dir = dir.path();
    let spec = job_format().parse(job, "kafka.yaml", &[]).unwrap();
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, 2, events)
    });
    let handle = jm.submit(spec, dir.to_path_buf()).unwrap();
    let status = handle.wait_timeout(Duration::from_secs(60));
    assert_eq!(status.state, JobState::Finished, "{:?}", status.message);
    let out = dir.join("out.jsonl");
    if out.exists() {
        read_rows(&out)
    } else {
        Vec::new()
    }
}

fn reader_job(bootstrap: &str, topic: &str, connector: &str) -> String {
    format!(
        r#"
version: 1
name: reader
parallelism: 2
checkpointing: {{interval: 200ms}}
sources:
  s:
    connector: {{type: kafka, bootstrap_servers: "{bootstrap}", topics: [{topic}], format: json,
                 bounded: true, metadata: {{kts: timestamp}}, {connector}}}
    schema: {{n: int, kts: timestamp}}
sinks:
  out: {{input: s, connector: {{type: file, path: out.jsonl}}}}
"#
    )
}

fn numbers(broker: &Broker, topic: &str, range: std::ops::Range<i64>) {
    let values: Vec<String> = range.map(|n| json!({"n": n}).to_string()).collect();
    let rows: Vec<(Option<&str>, &str, Option<i32>)> =
        values.iter().map(|v| (None, v.as_str(), None)).collect();
    broker.produce(topic, &rows);
}

fn ns(rows: &[Value]) -> Vec<i64> {
    let mut n: Vec<i64> = rows.iter().map(|r| r["n"].as_i64().unwrap()).collect();
    n.sort();
    n
}

/// Where a fresh start begins: `timestamp` (the Kafka timestamp, also readable as a column),
/// `latest`, and `group_offsets`, which finds the positions the previous run committed to the
/// consumer group when its checkpoints completed.
#[test]
fn start_modes_and_group_offsets() {
    let broker = Broker::start();
    broker.create_topic("numbers", 1);
    let dir = tempfile::tempdir().unwrap();
    numbers(&broker, "numbers", 0..10);
    std::thread::sleep(Duration::from_millis(100));
    let cut = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    std::thread::sleep(Duration::from_millis(100));
    numbers(&broker, "numbers", 10..20);

    let job = |connector: &str| reader_job(&broker.bootstrap(), "numbers", connector);
    let rows = run_bounded(
        dir.path(),
        &job(&format!("start: timestamp, start_timestamp: {cut}")),
    );
    assert_eq!(ns(&rows), (10..20).collect::<Vec<_>>());
    for r in &rows {
        let kts = r["kts"].as_str().unwrap();
        assert!(
            kts.starts_with("20"),
            "the Kafka timestamp as a column: {kts}"
        );
    }
    assert!(run_bounded(dir.path(), &job("start: latest")).is_empty());

    let rows = run_bounded(dir.path(), &job("start: group_offsets, group_id: g1"));
    assert_eq!(
        ns(&rows),
        (0..20).collect::<Vec<_>>(),
        "no offsets yet: earliest"
    );
    numbers(&broker, "numbers", 20..25);
    let rows = run_bounded(dir.path(), &job("start: group_offsets, group_id: g1"));
    assert_eq!(
        ns(&rows),
        (20..25).collect::<Vec<_>>(),
        "the first run's positions were committed to the group"
    );
}

/// With a pattern, a topic created while the job runs is found and read (every partition, by
/// exactly one subtask).
#[test]
fn a_topic_created_while_running_is_read() {
    let broker = Broker::start();
    broker.create_topic("pat-a", 1);
    numbers(&broker, "pat-a", 0..5);
    let dir = tempfile::tempdir().unwrap();
    let job = format!(
        r#"
version: 1
name: pattern
parallelism: 2
sources:
  s:
    connector: {{type: kafka, bootstrap_servers: "{}", topic_pattern: "pat-.*", format: json,
                 partition_discovery: 500ms}}
    schema: {{n: int}}
sinks:
  out: {{input: s, connector: {{type: file, path: out.jsonl}}}}
"#,
        broker.bootstrap()
    );
    let spec = job_format().parse(&job, "kafka.yaml", &[]).unwrap();
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, 2, events)
    });
    let handle = jm.submit(spec, dir.path().to_path_buf()).unwrap();
    let out = dir.path().join("out.jsonl");
    let wait_for = |want: Vec<i64>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = if out.exists() {
                ns(&read_rows(&out))
            } else {
                Vec::new()
            };
            if got == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "got {got:?}, want {want:?}: {:?}",
                handle.status().message
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for((0..5).collect());
    broker.create_topic("pat-b", 3);
    numbers(&broker, "pat-b", 5..20);
    wait_for((0..20).collect());
    handle.cancel();
}

/// Bounded reading stops at the offsets the partitions had when the job started, also while
/// records keep arriving behind them: once rows flow (so the source has resolved where to
/// stop), more records are produced until the job finishes; none of them is read.
#[test]
fn bounded_reading_stops_at_the_start_offsets_while_records_arrive() {
    let broker = Broker::start();
    broker.create_topic("numbers", 2);
    numbers(&broker, "numbers", 0..100_000);
    let dir = tempfile::tempdir().unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let rows = std::thread::scope(|scope| {
        let broker = &broker;
        let done = &done;
        let root = dir.path().to_path_buf();
        let producer = scope.spawn(move || {
            // rows are flowing (the file sink stages them) once the source resolved its stops
            let flowing = || {
                let mut stack = vec![root.clone()];
                while let Some(d) = stack.pop() {
                    for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                        let p = e.path();
                        if p.is_dir() {
                            stack.push(p);
                        } else if p.to_string_lossy().contains(".staging") {
                            return true;
                        }
                    }
                }
                false
            };
            while !flowing() {
                assert!(
                    !done.load(std::sync::atomic::Ordering::Relaxed),
                    "no rows seen"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut n = 1_000_000;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                numbers(broker, "numbers", n..n + 200);
                n += 200;
            }
            n - 1_000_000
        });
        // a slow second sink paces the job, so it reads for seconds after it resolved its stop
        let job = format!(
            "{}  slow: {{input: s, connector: {{type: blackhole, rows_per_second: 10000}}}}\n",
            reader_job(&broker.bootstrap(), "numbers", "start: earliest")
        );
        let rows = run_bounded(dir.path(), &job);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let later = producer.join().unwrap();
        assert!(later > 0, "nothing was produced while the job ran");
        rows
    });
    let n = ns(&rows);
    let after: Vec<&i64> = n.iter().filter(|n| **n >= 1_000_000).collect();
    assert!(
        after.is_empty(),
        "{} records past the stop offsets were read",
        after.len()
    );
    assert_eq!(n, (0..100_000).collect::<Vec<_>>());
}

/// A schema of sales as their writers registered it first, and a later version that reorders
/// the fields and adds one (a change Avro's rules allow).
const SALE_V1: &str = r#"{"type": "record", "name": "Sale", "namespace": "shop", "fields": [
    {"name": "store", "type": "string"},
    {"name": "amount", "type": "double"},
    {"name": "ts", "type": "long"},
    {"name": "note", "type": ["null", "string"], "default": null}]}"#;
const SALE_V2: &str = r#"{"type": "record", "name": "Sale", "namespace": "shop", "fields": [
    {"name": "ts", "type": "long"},
    {"name": "channel", "type": {"type": "enum", "name": "Channel", "symbols": ["WEB", "STORE"]}, "default": "WEB"},
    {"name": "amount", "type": "double"},
    {"name": "store", "type": "string"},
    {"name": "note", "type": ["null", "string"], "default": null}]}"#;

fn avro_job(bootstrap: &str, registry: &str, select: &str) -> String {
    format!(
        r#"
version: 1
name: avro-sales
checkpointing: {{interval: 300ms}}
sources:
  sales:
    connector:
      type: kafka
      bootstrap_servers: "{bootstrap}"
      topics: [sales-avro]
      format: avro
      schema_registry: {{url: "{registry}"}}
      bounded: true
    schema: {{store: string, amount: float, ts: int, note: string}}
transforms:
  picked:
    type: project
    input: sales
    select: [{select}]
sinks:
  out:
    input: picked
    connector:
      type: kafka
      bootstrap_servers: "{bootstrap}"
      topic: revenue-avro
      key: [store]
      format: avro
      schema_registry: {{url: "{registry}"}}
      delivery: exactly_once
  bad:
    input: sales.dead_letter
    connector: {{type: file, path: bad.jsonl}}
"#
    )
}

/// Avro in the Confluent wire format through a real schema registry: values written with two
/// versions of the writers' schema (by Apache Avro's Python implementation) are read by field
/// name; the sink registers the schema of its rows under `<topic>-value` and writes values an
/// independent reader decodes back to the input; bad values are dead letters with their
/// position; a registry refusing the sink's schema fails the job with its reason; an
/// unreachable registry is a planning problem naming it.
#[test]
fn avro_values_through_a_schema_registry() {
    use freshet_tests::schema_registry::Registry;
    let broker = Broker::start();
    let registry = Registry::start();
    broker.create_topic("sales-avro", 2);
    broker.create_topic("revenue-avro", 1);
    let v1 = registry.register("sales-avro-value", SALE_V1);
    let v2 = registry.register("sales-avro-value", SALE_V2);
    assert_ne!(v1, v2);
    let sale = |i: i64| {
        json!({
            "store": format!("s{}", i % 5),
            "amount": (i % 11) as f64 + 0.25,
            "ts": 1_700_000_000_000i64 + i * 1000,
            "note": if i % 3 == 0 { json!(format!("n{i}")) } else { Value::Null },
        })
    };
    let (first, second): (Vec<Value>, Vec<Value>) = (
        (0..150).map(sale).collect(),
        (150..300)
            .map(|i| {
                let mut s = sale(i);
                s["channel"] = json!(if i % 2 == 0 { "WEB" } else { "STORE" });
                s
            })
            .collect(),
    );
    let mut values = Registry::encode(v1, SALE_V1, &first);
    values.extend(Registry::encode(v2, SALE_V2, &second));
    // not the wire format; an id the registry does not have; a datum cut short
    values.insert(40, b"garbage".to_vec());
    values.insert(90, vec![0, 0, 0, 0x27, 0x0f, 2, 0x78]);
    let mut cut = values[10].clone();
    cut.truncate(8);
    values.insert(200, cut);
    let records: Vec<(Option<&str>, &[u8], Option<i32>)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (None, v.as_slice(), Some((i % 2) as i32)))
        .collect();
    broker.produce("sales-avro", &records);

    let run = |dir: &std::path::Path, job: &str| {
        let spec = job_format().parse(job, "avro.yaml", &[]).unwrap();
        let jm = JobManager::with_local_taskmanagers(|events| {
            freshet_taskmanager::local::taskmanagers(1, 2, events)
        });
        let handle = jm.submit(spec, dir.to_path_buf()).unwrap();
        handle.wait_timeout(Duration::from_secs(120))
    };
    let dir = tempfile::tempdir().unwrap();
    let status = run(
        dir.path(),
        &avro_job(
            &broker.bootstrap(),
            &registry.url(),
            "store, amount, ts, note",
        ),
    );
    assert_eq!(status.state, JobState::Finished, "{:?}", status.message);

    let written = registry.get("/subjects/revenue-avro-value/versions/latest");
    let schema: Value = serde_json::from_str(written["schema"].as_str().unwrap()).unwrap();
    let fields: Vec<(String, Value)> = schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_string(), f["type"].clone()))
        .collect();
    assert_eq!(
        fields,
        vec![
            ("store".to_string(), json!(["null", "string"])),
            ("amount".to_string(), json!(["null", "double"])),
            ("ts".to_string(), json!(["null", "long"])),
            ("note".to_string(), json!(["null", "string"])),
        ],
        "the registered schema: {schema}"
    );
    let out = broker.read_committed_raw("revenue-avro");
    let decoded = registry.decode(&out.iter().map(|r| r.3.clone()).collect::<Vec<_>>());
    let id = written["id"].as_u64().unwrap() as u32;
    let mut got: Vec<Value> = decoded
        .into_iter()
        .map(|(schema_id, v)| {
            assert_eq!(schema_id, id, "every value names the registered schema");
            v
        })
        .collect();
    for (r, v) in out.iter().zip(&got) {
        assert_eq!(r.2.as_deref(), v["store"].as_str(), "the key is the store");
    }
    let mut expected: Vec<Value> = first
        .iter()
        .chain(&second)
        .map(|s| json!({"store": s["store"], "amount": s["amount"], "ts": s["ts"], "note": s["note"]}))
        .collect();
    let by_ts = |v: &Value| v["ts"].as_i64().unwrap();
    got.sort_by_key(by_ts);
    expected.sort_by_key(by_ts);
    assert_eq!(got.len(), 300, "each good value once");
    assert_eq!(got, expected);

    let bad = read_rows(&dir.path().join("bad.jsonl"));
    let reasons: Vec<&str> = bad.iter().map(|b| b["reason"].as_str().unwrap()).collect();
    assert_eq!(bad.len(), 3, "{bad:?}");
    for b in &bad {
        assert!(
            b["position"].as_str().unwrap().starts_with("sales-avro/"),
            "{b}"
        );
    }
    assert!(
        reasons.iter().any(|r| r.contains("wire format")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("9999")), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(&format!("Avro (schema {v1})"))),
        "{reasons:?}"
    );

    // the subject only takes compatible changes now: an amount as text is not one
    registry.set_compatibility("revenue-avro-value", "BACKWARD");
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let status = run(
        dir.path(),
        &avro_job(
            &broker.bootstrap(),
            &registry.url(),
            "store, \"CAST(amount AS VARCHAR) AS amount\", ts, note",
        ),
    );
    let JobState::Failed(message) = &status.state else {
        panic!("the job should fail: {status:?}");
    };
    let message = format!("{message} {}", status.message.clone().unwrap_or_default());
    assert!(
        message.contains("revenue-avro-value") && message.contains("ncompatible"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "no restarts on a refusal"
    );

    // nothing answers at this address
    let port = freshet_tests::kafka::free_port();
    let spec = job_format()
        .parse(
            &avro_job(
                &broker.bootstrap(),
                &format!("http://127.0.0.1:{port}"),
                "store",
            ),
            "avro.yaml",
            &[],
        )
        .unwrap();
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, 1, events)
    });
    let err = jm
        .submit(spec, dir.path().to_path_buf())
        .err()
        .expect("refused");
    let err = err.to_string();
    assert!(
        err.contains("schema_registry.url") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// A registry that stops answering does not lose records or restart the job: the partition
/// whose record needs an unknown schema waits at that record (checkpoints go on), and once the
/// registry answers again every record is read exactly once.
#[test]
fn the_avro_source_waits_for_an_unresponsive_registry() {
    use freshet_tests::schema_registry::Registry;
    let broker = Broker::start();
    let registry = Registry::start();
    broker.create_topic("sales-wait", 1);
    let v1 = registry.register("sales-wait-value", SALE_V1);
    let v2 = registry.register("sales-wait-value", SALE_V2);
    let sale =
        |i: i64| json!({"store": format!("s{}", i % 5), "amount": i as f64, "ts": i, "note": null});
    let produce = |id: u32, schema: &str, range: std::ops::Range<i64>| {
        let mut records: Vec<Value> = range.map(sale).collect();
        if id == v2 {
            for r in &mut records {
                r["channel"] = json!("WEB");
            }
        }
        let values = Registry::encode(id, schema, &records);
        let rows: Vec<(Option<&str>, &[u8], Option<i32>)> =
            values.iter().map(|v| (None, v.as_slice(), None)).collect();
        broker.produce("sales-wait", &rows);
    };
    produce(v1, SALE_V1, 0..100);
    let dir = tempfile::tempdir().unwrap();
    let job = format!(
        r#"
version: 1
name: avro-wait
checkpointing: {{interval: 300ms}}
sources:
  s:
    connector: {{type: kafka, bootstrap_servers: "{}", topics: [sales-wait], format: avro,
                 schema_registry: {{url: "{}"}}}}
    schema: {{store: string, amount: float, ts: int, note: string}}
sinks:
  out: {{input: s, connector: {{type: file, path: out.jsonl}}}}
"#,
        broker.bootstrap(),
        registry.url()
    );
    let spec = job_format().parse(&job, "avro.yaml", &[]).unwrap();
    let jm = JobManager::with_local_taskmanagers(|events| {
        freshet_taskmanager::local::taskmanagers(1, 1, events)
    });
    let handle = jm.submit(spec, dir.path().to_path_buf()).unwrap();
    let out = dir.path().join("out.jsonl");
    let read = || -> Vec<i64> {
        if !out.exists() {
            return Vec::new();
        }
        let mut ts: Vec<i64> = read_rows(&out)
            .iter()
            .map(|r| r["ts"].as_i64().unwrap())
            .collect();
        ts.sort();
        ts
    };
    let wait_for = |n: i64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while read().len() < n as usize {
            assert!(
                std::time::Instant::now() < deadline,
                "{} rows: {:?}",
                read().len(),
                handle.status()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(100);
    // the second schema has not been fetched yet: its records need the registry
    registry.pause();
    produce(v2, SALE_V2, 100..200);
    std::thread::sleep(Duration::from_secs(15));
    let status = handle.status();
    assert_eq!(status.state, JobState::Running, "{status:?}");
    assert_eq!(status.restarts, 0, "{status:?}");
    assert_eq!(
        read(),
        (0..100).collect::<Vec<_>>(),
        "nothing read past the wait"
    );
    registry.resume();
    wait_for(200);
    // a few more checkpoints: nothing is written twice
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(read(), (0..200).collect::<Vec<_>>());
    assert_eq!(handle.status().restarts, 0);
    handle.cancel();
}

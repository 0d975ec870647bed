//! The `freshet` binary as a user runs it.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, try_http_get};

fn freshet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_freshet"))
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
        .join("job.yaml")
}

#[test]
fn run_prints_a_summary_and_writes_the_table() {
    let out = tempfile::tempdir().unwrap();
    let table = out.path().join("uv.jsonl");
    let o = freshet()
        .arg("run")
        .arg(example("unique-visitors"))
        .args([
            "--set",
            &format!("sinks.unique_visitors.connector.path={}", table.display()),
        ])
        .args([
            "--set",
            &format!(
                "sinks.late_clicks.connector.path={}",
                out.path().join("late.jsonl").display()
            ),
        ])
        .args([
            "--set",
            &format!(
                "sinks.bad_records.connector.path={}",
                out.path().join("bad.jsonl").display()
            ),
        ])
        .args(["--parallelism", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("clicks") && stderr.contains("visitors"),
        "{stderr}"
    );
    let rows = std::fs::read_to_string(&table).unwrap();
    assert_eq!(rows.lines().count(), 6, "{rows}");
    assert!(rows.contains(r#""page_id":"home","window_start":"2024-05-01T10:00:00.000Z","window_end":"2024-05-01T10:05:00.000Z","unique_visitors":4"#));
}

#[test]
fn invalid_job_is_refused_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("bad.yaml");
    std::fs::write(dir.path().join("in.jsonl"), "").unwrap();
    std::fs::write(
        &job,
        r#"
version: 1
name: bad
sources:
  s:
    connector: {type: file, path: in.jsonl, format: jsonl}
    schema: {k: string, n: int}
transforms:
  w: {type: window, input: s, key_by: [kk], window: {type: tumbling, size: 1m}, aggregates: ["sum(k) AS x"]}
  f: {type: filter, input: s, where: "n >"}
sinks:
  o: {input: missing, connector: {type: stdout}}
"#,
    )
    .unwrap();
    let o = freshet().arg("validate").arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("sinks.o.input: unknown stream 'missing'"),
        "{stderr}"
    );
    // structural problems are reported first; fix them and the type problems are all listed
    let fixed = std::fs::read_to_string(&job)
        .unwrap()
        .replace("input: missing", "input: s");
    std::fs::write(&job, fixed).unwrap();
    let o = freshet().arg("validate").arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("transforms.w.key_by[0]: unknown column 'kk'"),
        "{stderr}"
    );
    assert!(
        stderr.contains("transforms.f.where: cannot parse"),
        "{stderr}"
    );
    let o = freshet().arg("run").arg(&job).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "a refused job does not run");
}

#[test]
fn explain_shows_chains_and_edges() {
    let o = freshet()
        .arg("explain")
        .arg(example("revenue-per-store"))
        .args(["--parallelism", "4"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        text.contains("unique_sales [parallelism 4]") || text.contains("unique_sales"),
        "{text}"
    );
    assert!(
        text.contains("hash(event_id)") && text.contains("hash(store_id)"),
        "{text}"
    );
}

#[test]
fn follow_mode_tails_a_growing_file_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let output = dir.path().join("counts.jsonl");
    std::fs::write(&input, "").unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            r#"
version: 1
name: tail
sources:
  events:
    connector: {{type: file, path: events.jsonl, format: jsonl, follow: true}}
    schema: {{k: string, t: int}}
    event_time: t
transforms:
  counts: {{type: window, input: events, key_by: [k], window: {{type: tumbling, size: 10s}}, aggregates: ["count(*) AS n"]}}
sinks:
  out: {{input: counts, connector: {{type: table, path: {}}}}}
"#,
            output.display()
        ),
    )
    .unwrap();
    let job_run = Background::run(&job);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .unwrap();
    writeln!(f, r#"{{"k": "a", "t": 1000}}"#).unwrap();
    writeln!(f, r#"{{"k": "a", "t": 2000}}"#).unwrap();
    // an incomplete line is held until its newline arrives
    write!(f, r#"{{"k": "b", "t": 15"#).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    writeln!(f, r#"000}}"#).unwrap();
    writeln!(f, r#"{{"k": "a", "t": 25000}}"#).unwrap();
    f.flush().unwrap();
    let want = r#""k":"a","window_start":"1970-01-01T00:00:00.000Z","window_end":"1970-01-01T00:00:10.000Z","n":2"#;
    wait_for(&output, "windows to fire while following", |text| {
        text.contains(want) && text.contains(r#""k":"b""#)
    });
    assert_eq!(job_run.interrupt(), Some(130));
}

/// A `freshet run` in the background, killed if the test ends before stopping it.
struct Background(std::process::Child);

impl Background {
    fn run(job: &Path) -> Self {
        let child = freshet()
            .arg("run")
            .arg(job)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Background(child)
    }

    /// Sends Ctrl-C (SIGINT) and returns the exit code.
    fn interrupt(mut self) -> Option<i32> {
        // SAFETY: sending SIGINT to our own child process.
        unsafe { kill(self.0.id() as i32, 2) };
        self.0.wait().unwrap().code()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// Waits (at most 20 s) until `path` holds text satisfying `done`.
fn wait_for(path: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn csv_source_with_header_bad_rows_and_broadcast() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sales.csv"),
        "store,amount,at\nberlin,10,2024-05-01T10:00:00Z\nparis,x,2024-05-01T10:01:00Z\nberlin,5,2024-05-01T10:02:00Z\n\"paris\",7,2024-05-01T10:03:00Z\n",
    )
    .unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        r#"
version: 1
name: csv
parallelism: 2
sources:
  sales:
    connector: {type: file, path: sales.csv, format: csv}
    schema: {at: timestamp, store: string, amount: int}
    event_time: at
transforms:
  everywhere: {type: broadcast, input: sales}
  totals: {type: window, input: sales, key_by: [store], window: {type: tumbling, size: 1h}, aggregates: ["sum(amount) AS total", "count(*) AS n"]}
sinks:
  out: {input: totals, connector: {type: table, path: out.jsonl}}
  copies: {input: everywhere, connector: {type: file, path: copies.jsonl}}
  bad: {input: sales.dead_letter, connector: {type: file, path: bad.jsonl}}
"#,
    )
    .unwrap();
    let o = freshet().arg("run").arg(&job).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    let expected = [
        r#"{"store":"berlin","window_start":"2024-05-01T10:00:00.000Z","window_end":"2024-05-01T11:00:00.000Z","total":15,"n":2}"#,
        r#"{"store":"paris","window_start":"2024-05-01T10:00:00.000Z","window_end":"2024-05-01T11:00:00.000Z","total":7,"n":1}"#,
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), expected);
    // broadcast: both subtasks of `everywhere` see every valid row
    let copies = std::fs::read_to_string(dir.path().join("copies.jsonl")).unwrap();
    assert_eq!(copies.lines().count(), 6, "{copies}");
    assert_eq!(
        copies
            .lines()
            .filter(|l| l.contains(r#""amount":7"#))
            .count(),
        2,
        "{copies}"
    );
    let bad = std::fs::read_to_string(dir.path().join("bad.jsonl")).unwrap();
    assert!(
        bad.contains(r#""position":"sales.csv:3""#)
            && bad.contains("field 'amount': 'x' is not an integer"),
        "{bad}"
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("1 record(s) could not be processed"),
        "{stderr}"
    );
}

#[test]
fn generator_is_deterministic_and_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        r#"
version: 1
name: gen
sources:
  g:
    connector:
      type: generator
      count: 40
      rows_per_second: 100
      fields: {id: seq, user: "concat('u', seq % 3)", ts: "seq * 1000"}
    event_time: ts
transforms:
  per_user: {type: window, input: g, key_by: [user], window: {type: tumbling, size: 10s}, aggregates: ["count(*) AS n", "max(id) AS last"]}
sinks:
  out: {input: per_user, connector: {type: table, path: out.jsonl}}
"#,
    )
    .unwrap();
    let mut tables = Vec::new();
    for p in ["1", "3"] {
        let start = Instant::now();
        let o = freshet()
            .arg("run")
            .arg(&job)
            .args(["--parallelism", p])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // 40 rows at 100 rows/s cannot take less than about 0.4 s (a lower bound only)
        assert!(
            start.elapsed() >= Duration::from_millis(350),
            "the rate limit was not applied"
        );
        tables.push(std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap());
    }
    assert_eq!(tables[0], tables[1], "same rows at parallelism 1 and 3");
    assert_eq!(tables[0].lines().count(), 12, "{}", tables[0]);
    assert!(tables[0].contains(r#""user":"u0","window_start":"1970-01-01T00:00:00.000Z","window_end":"1970-01-01T00:00:10.000Z","n":4,"last":9"#), "{}", tables[0]);
}

#[test]
fn an_idle_input_stops_holding_back_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("orders.jsonl"), "").unwrap();
    std::fs::write(dir.path().join("payments.jsonl"), "").unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        r#"
version: 1
name: idle
sources:
  orders:
    connector: {type: file, path: orders.jsonl, format: jsonl, follow: true}
    schema: {id: string, t: int}
    event_time: t
  payments:
    connector: {type: file, path: payments.jsonl, format: jsonl, follow: true}
    schema: {id: string, t: int}
    event_time: t
    watermark: {idle_timeout: 300ms}
transforms:
  spread: {type: rebalance, input: payments, parallelism: 2}
  paid:
    type: interval_join
    left: orders
    right: spread
    left_key: [id]
    right_key: [id]
    lower_bound: 0s
    upper_bound: 10s
    select: [orders.id]
sinks:
  paid: {input: paid, connector: {type: file, path: paid.jsonl}}
  unpaid: {input: paid.unmatched, connector: {type: file, path: unpaid.jsonl}}
"#,
    )
    .unwrap();
    let job_run = Background::run(&job);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("orders.jsonl"))
        .unwrap();
    writeln!(f, r#"{{"id": "o1", "t": 1000}}"#).unwrap();
    writeln!(f, r#"{{"id": "o2", "t": 60000}}"#).unwrap();
    f.flush().unwrap();
    // payments never produce anything: once they are idle (and the rebalancing stage between
    // them and the join passes that on), the join's watermark follows the orders alone, o1's
    // interval closes (watermark 59999 >= 1000 + 10s) and o1 is reported unpaid
    let text = wait_for(
        &dir.path().join("unpaid.jsonl"),
        "o1 to be reported unpaid",
        |t| t.contains(r#"\"id\":\"o1\""#),
    );
    assert!(!text.contains("o2"), "o2's interval is still open: {text}");
    assert_eq!(job_run.interrupt(), Some(130));
}

/// A job that fails for good still reports what its failed subtask did before it failed: a
/// sink writing to a full stdout fails on its first batch, and the summary shows that batch.
#[test]
fn a_failed_job_reports_the_counters_its_subtasks_failed_with() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        r#"version: 1
name: to-full
restart: {strategy: none}
sources:
  gen:
    connector: {type: generator, count: 100000, fields: {k: "seq % 10", v: seq}}
sinks:
  out:
    input: gen
    connector: {type: stdout}
"#,
    )
    .unwrap();
    let o = freshet()
        .arg("run")
        .arg(&job)
        .args(["--listen", "off", "--http", "off"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.trim_start().starts_with("gen -> sink:out"))
        .unwrap_or_else(|| panic!("no summary line of the failed vertex in:\n{stderr}"));
    let records_in: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert!(records_in > 0, "{line}");
}

#[test]
fn a_sink_that_cannot_write_fails_the_job_and_names_the_file() {
    let o = freshet()
        .arg("run")
        .arg(example("revenue-per-store"))
        .args(["--parallelism", "2"])
        .args([
            "--set",
            "sinks.late_sales.connector.path=/proc/freshet-no-such-dir/late.jsonl",
        ])
        .args([
            "--set",
            "sinks.revenue.connector.path=/dev/null/revenue.jsonl",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("job failed: sink:"), "{stderr}");
    assert!(
        stderr.contains("/proc/freshet-no-such-dir") || stderr.contains("/dev/null"),
        "{stderr}"
    );
}

/// A job whose sink cannot create its file, with restart strategy `restart` (YAML).
fn failing_job(dir: &Path, restart: &str) -> PathBuf {
    std::fs::write(dir.join("in.jsonl"), "{\"a\": 1}\n").unwrap();
    let job = dir.join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "version: 1
name: restarts
checkpointing: {{interval: 100ms, dir: {}}}
{restart}
sources:
  s:
    connector: {{type: file, path: in.jsonl, format: jsonl}}
    schema: {{a: int}}
sinks:
  out:
    input: s
    connector: {{type: file, path: /proc/freshet-no-such-dir/out.jsonl}}
",
            dir.join("checkpoints").display()
        ),
    )
    .unwrap();
    job
}

#[test]
fn failures_are_restarted_as_the_strategy_says_then_fail_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let run = |restart: &str| {
        let o = freshet()
            .arg("run")
            .arg(failing_job(dir.path(), restart))
            .args(["--listen", "off"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // exponential backoff: two restarts, the second wait twice the first
    let stderr = run(
        "restart: {strategy: exponential-backoff, attempts: 2, initial_delay: 100ms, max_delay: 1s}",
    );
    assert!(stderr.contains("restart=1 of 2 delay=100ms"), "{stderr}");
    assert!(stderr.contains("restart=2 of 2 delay=200ms"), "{stderr}");
    assert!(!stderr.contains("restart=3"), "{stderr}");
    assert!(
        stderr.contains("/proc/freshet-no-such-dir") && stderr.contains("after 2 restart(s)"),
        "{stderr}"
    );
    // fixed delay
    let stderr = run("restart: {strategy: fixed-delay, attempts: 1, delay: 50ms}");
    assert!(stderr.contains("restart=1 of 1 delay=50ms"), "{stderr}");
    assert!(stderr.contains("after 1 restart(s)"), "{stderr}");
    // failure rate: two failures within the minute are restarted, the third fails the job
    let stderr =
        run("restart: {strategy: failure-rate, max_failures: 2, interval: 1m, delay: 20ms}");
    assert!(
        stderr.contains("restart=failure 2 of at most 2 within 1m delay=20ms"),
        "{stderr}"
    );
    assert!(!stderr.contains("restart=failure 3"), "{stderr}");
    assert!(
        stderr.contains("more than 2 failure(s) within 1m, the most the restart strategy allows"),
        "{stderr}"
    );
    // none: the first failure fails the job
    let stderr = run("restart: {strategy: none}");
    assert!(!stderr.contains("restart=1"), "{stderr}");
    assert!(stderr.contains("job failed:"), "{stderr}");
}

#[test]
fn invalid_utf8_goes_to_the_dead_letter_output_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let src = example("unique-visitors");
    let job = dir.path().join("job.yaml");
    std::fs::copy(&src, &job).unwrap();
    let mut clicks = std::fs::read(src.with_file_name("clicks.jsonl")).unwrap();
    let lines = clicks.iter().filter(|b| **b == b'\n').count();
    // a line of random bytes, and a string value holding the bytes ff fe
    clicks.extend_from_slice(&[0x9f, 0x00, 0xc3, 0x28, 0xff, b'{', 0xfe, b'\n']);
    clicks.extend_from_slice(b"{\"event_id\": \"e99\", \"event_time\": \"2024-05-01T10:20:00Z\", \"page_id\": \"h\xff\xfe\", \"user_id\": \"u1\"}\n");
    std::fs::write(dir.path().join("clicks.jsonl"), clicks).unwrap();
    let o = freshet().arg("run").arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let dead = std::fs::read_to_string(dir.path().join("out/dead-letter.jsonl")).unwrap();
    for line in [lines + 1, lines + 2] {
        let row = dead
            .lines()
            .find(|l| l.contains(&format!("clicks.jsonl:{line}\"")))
            .unwrap_or_else(|| panic!("no dead letter for line {line}:\n{dead}"));
        assert!(row.contains("not valid UTF-8"), "{row}");
    }
    // everything else is as it always was
    let expected = src.with_file_name("expected");
    for file in ["unique-visitors.jsonl", "late-clicks.jsonl"] {
        let (e, a) = freshet_tests::comparable(
            freshet_tests::read_rows(&expected.join(file)),
            freshet_tests::read_rows(&dir.path().join("out").join(file)),
        );
        assert_eq!(a, e, "{file}");
    }
}

#[test]
fn a_failed_source_is_reported_as_the_cause_not_its_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    // the unique-visitors job, reading /proc/self/mem: an I/O error from its first read
    let text = std::fs::read_to_string(example("unique-visitors"))
        .unwrap()
        .replace("path: clicks.jsonl", "path: /proc/self/mem");
    std::fs::write(&job, text).unwrap();
    // the source's consumers fail the moment it stops; run a few times to meet that race
    for _ in 0..5 {
        let o = freshet().arg("run").arg(&job).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        let failure = stderr
            .lines()
            .find(|l| l.contains("job failed"))
            .unwrap_or_else(|| panic!("no failure reported:\n{stderr}"));
        assert!(
            failure.starts_with("job failed: clicks")
                && failure.contains("#0: reading /proc/self/mem"),
            "the reported failure is not the source's: {failure}"
        );
    }
}

/// With checkpoints, the windows the end of input fires are committed a checkpoint at a time: a
/// checkpoint triggered while they fire goes between two batches of them instead of waiting for
/// all of them, so the committed table (replaced whole by each commit) grows in steps while the
/// job runs. Every window is committed exactly once in the end. At parallelism 1 the window runs
/// in the source's subtask; at 2 it reads the source's output from channels.
#[test]
fn checkpoints_go_between_batches_of_windows_the_end_of_input_fires() {
    for parallelism in [1, 2] {
        windows_fire_between_checkpoints(parallelism);
    }
}

fn windows_fire_between_checkpoints(parallelism: u32) {
    let dir = tempfile::tempdir().unwrap();
    let keys = 100_000;
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            r#"
version: 1
name: many-windows
parallelism: {parallelism}
sources:
  events:
    connector: {{type: generator, count: {events}, fields: {{k: "(seq * 7919) % {keys}", ts: "1714557600000 + seq"}}}}
    event_time: ts
transforms:
  w: {{type: window, input: events, key_by: [k], window: {{type: tumbling, size: 1000d}}, aggregates: ["count(*) AS n"]}}
sinks:
  out: {{input: w, parallelism: 1, connector: {{type: table, path: out.jsonl}}}}
"#,
            events = 2 * keys
        ),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let mut child = freshet()
        .arg("run")
        .arg(&job)
        .args(["--listen", "off", "--set", "checkpointing.interval=100ms"])
        .arg("--set")
        .arg(format!(
            "checkpointing.dir={}",
            dir.path().join("checkpoints").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut sizes = std::collections::BTreeSet::new();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "p={parallelism}: the job did not finish"
        );
        if let Ok(m) = std::fs::metadata(&out) {
            sizes.insert(m.len());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(status.success(), "p={parallelism}: {status}");
    let text = std::fs::read_to_string(&out).unwrap();
    let total = text.len() as u64;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), keys, "p={parallelism}: one row per window");
    assert!(lines.iter().all(|l| l.contains(r#""n":2"#)), "{}", lines[0]);
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(seen.insert(v["k"].as_i64().unwrap()), "{l} twice");
    }
    let between: Vec<u64> = sizes
        .iter()
        .copied()
        .filter(|s| *s > 0 && *s < total)
        .collect();
    assert!(
        !between.is_empty(),
        "p={parallelism}: the output went from nothing to all {total} bytes at once: no checkpoint completed while the windows fired"
    );
}

/// The cells of the rows of the printed tables in `text` whose first cell is one of `first`
/// (cell 0 is the empty text before the first `|`).
fn table_rows<'t>(text: &'t str, first: &[&str]) -> Vec<Vec<&'t str>> {
    text.lines()
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
        .filter(|cells| cells.len() > 1 && first.contains(&cells[1]))
        .collect()
}

/// `freshet bench latency` runs a rate-limited generator into a sink that records latencies,
/// and prints percentiles of every row that arrived (for the window job, of every result: one
/// per key of the one window the second of rows falls into).
#[test]
fn bench_latency_counts_every_row_and_orders_its_percentiles() {
    let o = freshet()
        .args([
            "bench",
            "latency",
            "--jobs",
            "dedup,window",
            "--rate",
            "2000",
            "--seconds",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let rows = table_rows(&text, &["dedup", "window"]);
    assert_eq!(rows.len(), 4, "{text}");
    for r in rows {
        // | job | p | checkpoints | rows/s | rows | p50 | p99 | p99.9 | max |
        assert_eq!(r[5], "2000", "{text}");
        let ms: Vec<f64> = r[6..10].iter().map(|v| v.parse().unwrap()).collect();
        assert!(ms.windows(2).all(|w| w[0] <= w[1]), "{text}");
        assert!(ms[3] > 0.0 && ms[3] < 10_000.0, "{text}");
    }
}

/// `freshet bench state` counts how often each job's keys were read back from RocksDB, from
/// the summary its run prints: a deduplication whose keys fit the memory budget reads (next to)
/// nothing, one with more keys than fit reads on many of its events, and a window's panes,
/// which never read to update, have nothing to count. The one that evicts keys has written
/// them to disk, which its peak disk shows. Also, a small budget is enough: the memtable size
/// follows it.
#[test]
fn bench_state_reports_the_rocksdb_reads_of_keys_memory_does_not_hold() {
    let o = freshet()
        .args([
            "bench",
            "state",
            "--jobs",
            "dedup,window",
            "--keys",
            "100000,800000",
            "--memory-mb",
            "16",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    // | job | distinct keys | events | wall s | events/s | vs 100000 keys | peak RSS MB |
    // peak disk MB | reads | output rows |
    let cell = |job: &str, keys: &str, i: usize| {
        let rows = table_rows(&text, &[job]);
        let row = rows
            .iter()
            .find(|r| r[2] == keys)
            .expect("a row per key count");
        row[i].to_string()
    };
    let reads = |job: &str, keys: &str| cell(job, keys, 9);
    let disk = |job: &str, keys: &str| -> u64 {
        cell(job, keys, 8)
            .parse()
            .unwrap_or_else(|_| panic!("{text}"))
    };
    let per_event = |v: String| -> f64 { v.parse().unwrap_or_else(|_| panic!("{v}: {text}")) };
    // 100 000 keys take 1.6 MB of key set, inside the 12 MB for decoded keys
    assert!(per_event(reads("dedup", "100000")) < 0.01, "{text}");
    // 800 000 keys need 14.6 MB: the second visit of each key the set evicted reads it back
    let over = per_event(reads("dedup", "800000"));
    assert!(over > 0.05 && over <= 1.0, "{text}");
    assert_eq!(reads("window", "800000"), "-", "{text}");
    assert!(disk("dedup", "800000") > disk("dedup", "100000"), "{text}");
    // one row per key from each job, the first event of a key or its window
    for job in ["dedup", "window"] {
        for keys in ["100000", "800000"] {
            assert_eq!(cell(job, keys, 10), keys, "{text}");
        }
    }
}

/// `bench state --jobs session` runs session windows over the keys, with the gap `--gap` gives.
#[test]
fn bench_state_runs_session_windows_with_the_gap_given() {
    let o = freshet()
        .args([
            "bench", "state", "--jobs", "session", "--keys", "20000", "--gap", "5s",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("session gap: 5s"), "{text}");
    let rows = table_rows(&text, &["session"]);
    assert_eq!(rows.len(), 1, "{text}");
    assert_eq!((rows[0][2], rows[0][3]), ("20000", "40000"), "{text}");
    let rate: f64 = rows[0][5].parse().unwrap_or_else(|_| panic!("{text}"));
    assert!(rate > 0.0, "{text}");
    // a key's two events are 20 s apart, four times the gap: every event is a session of its own
    assert_eq!(rows[0][10], "40000", "{text}");
}

/// The run summary counts every state access of a vertex, summed over its subtasks, including
/// the last ones before its tables closed: a deduplication makes one per record.
#[test]
fn the_summary_counts_each_state_access_of_a_vertex() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "version: 1\nname: d\nparallelism: 2\nsources:\n  s:\n    connector: {type: generator, count: 10001, fields: {k: \"seq % 5000\"}}\ntransforms:\n  d: {type: deduplicate, input: s, key: [k], keep: first}\nsinks:\n  o: {input: d, connector: {type: blackhole}}\n",
    )
    .unwrap();
    let o = freshet()
        .args([
            "run",
            job.to_str().unwrap(),
            "--listen",
            "off",
            "--http",
            "off",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("state of "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.ends_with(": 10001 accesses, 0 read RocksDB (0.0%)"),
        "{stderr}"
    );
}

/// `freshet bench state --checkpoint-interval` gives every run its own checkpoint directory:
/// each round of each binary processes its input from the start, rather than resuming from
/// an earlier round's checkpoint, finding the input consumed and touching no state.
#[test]
fn bench_state_rounds_with_checkpoints_each_start_from_nothing() {
    let me = env!("CARGO_BIN_EXE_freshet");
    let o = freshet()
        .args([
            "bench",
            "state",
            "--jobs",
            "dedup",
            "--keys",
            "100000",
            "--rounds",
            "2",
            "--against",
            me,
            "--checkpoint-interval",
            "10s",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    // | job | distinct keys | round | events | wall s | events/s | peak RSS MB | peak disk MB |
    // reads per event | other: wall s | events/s | peak RSS MB | peak disk MB | reads per event |
    // speed vs other | output rows | other: output rows |
    let rows: Vec<_> = table_rows(&text, &["dedup"])
        .into_iter()
        .filter(|r| r.len() == 19)
        .collect();
    assert_eq!(rows.len(), 2, "a row per round: {text}");
    for r in rows {
        assert_eq!((r[16], r[17]), ("100000", "100000"), "{text}");
        // a run that touched no state has no reads to report ("-")
        for reads in [r[9], r[14]] {
            let per_event: f64 = reads.parse().unwrap_or_else(|_| panic!("{text}"));
            assert!(per_event < 0.01, "{text}");
        }
    }
    // and a checkpoint row per round
    let checkpoints = table_rows(&text, &["dedup"])
        .into_iter()
        .filter(|r| r.len() == 12)
        .count();
    assert_eq!(checkpoints, 2, "{text}");
}

/// A deduplication without a TTL keeps every key it saw across a restore from its final
/// checkpoint, however its state was compacted: the end of the input takes event time to its
/// end, and rows without a TTL carry the largest deadline, which a compaction must not read
/// as passed. (It did: of 300 000 keys sent again after the restore, 251 586 passed.) The
/// restore warns that the checkpoint's event time is at its end.
#[test]
fn a_deduplication_without_ttl_keeps_its_keys_across_a_restore_from_its_final_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // a small budget: 2 MB memtables, so the final flush makes files that compact
    let job = |source: &str, sink: &str| {
        format!(
            "version: 1\nname: keep\nsources:\n  {source}:\n    connector:\n      type: generator\n      count: 300000\n      fields: {{k: \"seq * 7919 % 1000000007\", ts: \"1714557600000 + seq\"}}\n    event_time: ts\ntransforms:\n  d: {{type: deduplicate, input: {source}, key: [k], keep: first}}\nsinks:\n  {sink}: {{input: d, connector: {{type: file, path: {}}}}}\nstate: {{memory_mb: 16}}\ncheckpointing: {{interval: 1h, dir: {}}}\n",
            d.join(format!("{sink}.jsonl")).display(),
            d.join("checkpoints").display()
        )
    };
    std::fs::write(d.join("first.yaml"), job("events", "out")).unwrap();
    // the same keys from a source and into a sink with no state in the checkpoint
    std::fs::write(d.join("again.yaml"), job("again", "again")).unwrap();
    for (file, extra) in [
        ("first.yaml", None),
        ("again.yaml", Some("--allow-non-restored-state")),
    ] {
        let o = freshet()
            .arg("run")
            .arg(d.join(file))
            .args(["--listen", "off", "--http", "off"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        // the restore says that event time is at its end: a job going on over new input
        // would find every record late
        assert_eq!(
            stderr.contains("restoring the checkpoint taken when the job's input ended"),
            extra.is_some(),
            "{stderr}"
        );
    }
    let lines = |name: &str| {
        std::fs::read_to_string(d.join(name))
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(lines("out.jsonl"), 300_000);
    assert_eq!(
        lines("again.jsonl"),
        0,
        "keys held before the restore passed again"
    );
}

/// `freshet bench restored` builds a deduplication's state, restores it and goes over as many
/// keys it never saw: once the restored job has read its snapshot's keys, those new keys read
/// nothing from RocksDB (every one of them did before a restored job read its snapshot), for
/// a key set (`first`) and for a table of one value per key (`latest`) alike.
#[test]
fn bench_restored_new_keys_read_little_from_rocksdb() {
    let o = freshet()
        .args([
            "bench",
            "restored",
            "--keys",
            "200000",
            "--new-per-key",
            "1",
            "--jobs",
            "first,latest",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    // | job | restored keys | new keys | round | build s | empty: wall s | events/s |
    // restored: wall s | events/s | RocksDB reads per event | restored vs empty |
    let rows = table_rows(&text, &["first", "latest"]);
    assert_eq!(rows.len(), 2, "{text}");
    for r in rows {
        assert_eq!((r[2], r[3]), ("200000", "200000"), "{text}");
        let reads: f64 = r[10].parse().unwrap_or_else(|_| panic!("{text}"));
        assert!(reads < 0.2, "{} reads per new key: {text}", r[10]);
    }
}

/// `freshet bench nexmark --against` runs the query with this binary and another in turn, each
/// as a process of its own, and prints a row per round and the medians; run against itself,
/// every result is the same and the ratios are near 1.
#[test]
fn bench_nexmark_against_another_binary_alternates_and_compares_results() {
    let me = env!("CARGO_BIN_EXE_freshet");
    let o = freshet()
        .args([
            "bench",
            "nexmark",
            "--query",
            "q7",
            "--events",
            "200000",
            "--rounds",
            "2",
            "--against",
            me,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let rows = table_rows(&text, &["1", "2", "median"]);
    assert_eq!(rows.len(), 3, "{text}");
    for r in rows {
        // | round | this per CPU-s | other per CPU-s | ratio | this/s | other/s | same |
        let n: Vec<f64> = r[2..7].iter().map(|v| v.parse().unwrap()).collect();
        assert!(n.iter().all(|v| *v > 0.0), "{text}");
        assert_eq!(r[7], "true", "{text}");
    }
    // a binary that is not one fails the command with the reason
    let o = freshet()
        .args([
            "bench",
            "nexmark",
            "--events",
            "1000",
            "--against",
            "/nonexistent/freshet",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/nonexistent/freshet"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `scripts/rocksdb-env` with `target` as the target directory and the environment
/// variables `vars` set; returns its status, stdout and stderr.
fn rocksdb_env(target: &Path, vars: &[(&str, &Path)]) -> (bool, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rocksdb-env");
    let o = Command::new("bash")
        .arg(script)
        .env("CARGO_TARGET_DIR", target)
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (o.status.success(), text(&o.stdout), text(&o.stderr))
}

/// The RocksDB version the bindings in Cargo.lock bundle has a pinned prebuilt library: bumping
/// the bindings without pinning the new jar would silently bring back the long source build.
#[test]
fn the_bindings_rocksdb_comes_prebuilt_with_its_c_api() {
    let target = tempfile::tempdir().unwrap();
    let dir = target.path().join("rocksdb");
    // more than once: a check of the C library once failed now and then (a broken pipe under
    // pipefail), and a build then silently compiled RocksDB
    for _ in 0..20 {
        let (ok, out, err) = rocksdb_env(target.path(), &[]);
        assert!(ok, "{err}");
        assert_eq!(
            out.trim(),
            format!(
                "unset ROCKSDB_STATIC; export ROCKSDB_LIB_DIR='{}'",
                dir.display()
            ),
            "{err}"
        );
    }
    let symbols = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(dir.join("librocksdb.so"))
        .output()
        .unwrap();
    let symbols = String::from_utf8_lossy(&symbols.stdout);
    for f in ["rocksdb_open", "rocksdb_write", "rocksdb_checkpoint_create"] {
        assert!(
            symbols.lines().any(|l| l.ends_with(&format!(" T {f}"))),
            "{f} missing from the prebuilt library"
        );
    }
}

/// Without a way to fetch the library (here: no curl, an empty download cache), the script
/// prints nothing, so the build compiles RocksDB from source, and says why.
#[test]
fn without_a_prebuilt_rocksdb_the_build_falls_back_to_source() {
    let target = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    for dir in ["/usr/bin", "/bin"] {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let link = bin.path().join(e.file_name());
            if e.file_name() != "curl" && !link.exists() {
                std::os::unix::fs::symlink(e.path(), link).unwrap();
            }
        }
    }
    let cache = tempfile::tempdir().unwrap();
    let (ok, out, err) = rocksdb_env(
        target.path(),
        &[("PATH", bin.path()), ("XDG_CACHE_HOME", cache.path())],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "", "{err}");
    assert!(err.contains("compiled from source"), "{err}");
    assert!(!target.path().join("rocksdb/librocksdb.so").exists());
}

/// Watermark alignment: a source with no rate limit and one limited to 2 000 rows per second
/// (2 s of event time per second), in one group with a drift of 1 s. While the slow one runs,
/// the fast one's watermark stays within the drift of it (plus what one update period, one
/// batch and one watermark interval add); without alignment the fast one would be done within
/// a second, 100 s of event time ahead. Then it reads the rest: no row is lost.
#[test]
fn aligned_sources_stay_within_their_drift() {
    run_aligned_sources(None);
}

/// The same job when the thread that aligns the sources cannot be started the first time: the
/// attempt is not deployed (its aligned sources would stop after a batch), the job says why and
/// starts once the thread can be started, aligned as before, without a restart.
#[test]
fn a_job_whose_alignment_thread_cannot_start_waits_for_it() {
    let stderr = run_aligned_sources(Some("spawn-watermark-alignment@1"));
    assert!(
        stderr.contains("cannot start the attempt's threads"),
        "{stderr}"
    );
    assert!(!stderr.contains("restart"), "{stderr}");
}

/// Runs the aligned job of [`aligned_sources_stay_within_their_drift`] with `failpoints` armed,
/// checks its alignment and its rows, and returns its log.
fn run_aligned_sources(failpoints: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    let base = 1_714_557_600_000i64;
    std::fs::write(
        &job,
        format!(
            "version: 1\nname: aligned\npipeline: {{batch_size: 256}}\nsources:\n  fast:\n    connector: {{type: generator, count: 100000, fields: {{ts: \"{base} + seq\"}}}}\n    event_time: ts\n    watermark: {{alignment: {{group: g, max_drift: 1s}}}}\n  slow:\n    connector: {{type: generator, count: 6000, rows_per_second: 2000, fields: {{ts: \"{base} + seq\"}}}}\n    event_time: ts\n    watermark: {{alignment: {{group: g, max_drift: 1s}}}}\nsinks:\n  f: {{input: fast, connector: {{type: blackhole}}}}\n  s: {{input: slow, connector: {{type: blackhole}}}}\n"
        ),
    )
    .unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = freshet()
        .args([
            "run",
            job.to_str().unwrap(),
            "--listen",
            "off",
            "--http",
            &http,
        ])
        .envs(failpoints.map(|f| ("FRESHET_FAILPOINTS", f)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let watermark = |v: &serde_json::Value, prefix: &str| {
        v["vertices"]
            .as_array()?
            .iter()
            .find(|x| x["name"].as_str().is_some_and(|n| n.starts_with(prefix)))?["metrics"]
            ["watermark"]
            .as_i64()
    };
    let (mut samples, mut lead, mut paused) = (0, i64::MIN, false);
    // polled until the process exits: a request it is exiting under may fail, and is skipped
    while child.try_wait().unwrap().is_none() {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let Ok((_, jobs)) = try_http_get(&http, "/jobs") else {
            continue;
        };
        let Some(id) = serde_json::from_str::<serde_json::Value>(&jobs)
            .ok()
            .and_then(|j| j[0]["id"].as_str().map(String::from))
        else {
            continue;
        };
        let Ok((code, body)) = try_http_get(&http, &format!("/jobs/{id}")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            continue;
        };
        if code != 200 {
            continue;
        }
        let (Some(f), Some(s)) = (watermark(&v, "fast"), watermark(&v, "slow")) else {
            continue;
        };
        // while the slow source runs and both have a watermark
        if s > i64::MIN && s < base + 5_000 && f > i64::MIN {
            samples += 1;
            lead = lead.max(f - s);
        }
        paused |= v["vertices"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["metrics"]["aligned_ns"].as_u64().unwrap_or(0) > 0);
    }
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    eprintln!("{samples} samples, the fast source led by up to {lead} ms");
    assert!(samples >= 5, "{samples} samples\n{stderr}");
    assert!(lead <= 2_500, "the fast source led by {lead} ms\n{stderr}");
    assert!(paused, "no source reported time paused");
    assert!(stderr.contains("f.rows = 100000"), "{stderr}");
    assert!(stderr.contains("s.rows = 6000"), "{stderr}");
    stderr.into_owned()
}

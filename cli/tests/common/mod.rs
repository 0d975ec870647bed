//! Helpers of the recovery, savepoint and cluster tests: the `freshet` binary, a background
//! process whose stderr is collected, example arguments, output checks, a moto S3 server, a
//! seeded random source, and a cluster of JobManager and TaskManager processes on loopback.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use freshet_tests::{comparable, read_rows, repo};

pub fn freshet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_freshet"))
}

/// A child process whose stderr is collected; killed when dropped.
pub struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn start(a: &[String]) -> Proc {
        Proc::start_env(a, &[])
    }

    /// Starts `freshet` with `a` and the environment variables `env` added.
    pub fn start_env(a: &[String], env: &[(&str, &str)]) -> Proc {
        let mut child = freshet()
            .args(a)
            .envs(env.iter().copied())
            .env("FRESHET_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Proc { child, log }
    }

    /// Waits for a stderr line containing `what`.
    pub fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(what)) {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no '{what}' in:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Proc {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for it to exit on its own: its exit code (`None` if it is still
    /// running, or was killed by a signal).
    pub fn exit_within(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits for it to exit: whether it succeeded, and its stderr.
    pub fn wait(&mut self) -> (bool, String) {
        let ok = self.child.wait().unwrap().success();
        // the reader thread drains the rest of stderr once the process is gone
        std::thread::sleep(Duration::from_millis(100));
        (ok, self.log())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small deterministic random source, seeded from the clock; the seed is printed so a failure
/// can be replayed with `FRESHET_TEST_SEED`.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Self {
        let seed = std::env::var("FRESHET_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("FRESHET_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A moto S3 server on a free loopback port, stopped when dropped.
pub struct S3Server {
    child: Child,
    /// Its URL.
    pub endpoint: String,
}

impl S3Server {
    pub fn start() -> S3Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server must be installed (pip install 'moto[server]'; .ci/run does)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // create the bucket with a plain HTTP PUT (moto accepts unsigned requests)
        let status = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import urllib.request as u; u.urlopen(u.Request('{endpoint}/freshet', method='PUT')).read()"
                ),
            ])
            .status()
            .unwrap();
        assert!(status.success(), "creating the bucket failed");
        S3Server { child, endpoint }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Arguments that send every sink of an example into `out` and checkpoints into `checkpoints`,
/// and pace each file source so that reading it takes about `seconds`.
pub fn args(
    name: &str,
    parallelism: u32,
    out: &Path,
    checkpoints: &str,
    seconds: f64,
) -> Vec<String> {
    let dir = repo().join("examples").join(name);
    let job = dir.join("job.yaml");
    let spec = freshet_connectors::job_format().load(&job, &[]).unwrap();
    let mut a = vec![
        "run".to_string(),
        job.display().to_string(),
        "--parallelism".into(),
        parallelism.to_string(),
    ];
    let mut set = |s: String| {
        a.push("--set".into());
        a.push(s);
    };
    for (sink, s) in &spec.sinks {
        if let ("file" | "table", Some(path)) =
            (s.connector.kind.as_str(), s.connector.text("path"))
        {
            let file = Path::new(path).file_name().unwrap();
            set(format!(
                "sinks.{sink}.connector.path={}",
                out.join(file).display()
            ));
        }
    }
    for (source, s) in &spec.sources {
        if let ("file", Some(path)) = (s.connector.kind.as_str(), s.connector.text("path")) {
            let lines = std::fs::read_to_string(dir.join(path))
                .unwrap()
                .lines()
                .count();
            // (a fraction of a row a second where the input is to last longer than its rows)
            if lines > 0 {
                let rate = lines as f64 / seconds;
                set(format!("sources.{source}.connector.rows_per_second={rate}"));
            }
        }
    }
    set("dead_letter.type=file".into());
    set(format!(
        "dead_letter.path={}",
        out.join("unrouted.jsonl").display()
    ));
    set("checkpointing.interval=100ms".into());
    set(format!("checkpointing.dir={checkpoints}"));
    a
}

pub fn check_output(name: &str, out: &Path, context: &str) {
    let expected_dir = repo().join("examples").join(name).join("expected");
    for exp in std::fs::read_dir(&expected_dir).unwrap() {
        let exp = exp.unwrap().path();
        let file = exp.file_name().unwrap();
        let (e, a) = comparable(read_rows(&exp), read_rows(&out.join(file)));
        assert_eq!(
            a,
            e,
            "{context}: {} differs from the expected output",
            file.to_string_lossy()
        );
    }
    let unrouted = std::fs::read_to_string(out.join("unrouted.jsonl")).unwrap_or_default();
    assert!(
        unrouted.is_empty(),
        "{context}: unrouted records:\n{unrouted}"
    );
}

/// Points a `freshet` command at the S3 server, if any.
pub fn with_s3(c: &mut Command, s3: Option<&S3Server>) {
    if let Some(s3) = s3 {
        c.env("AWS_ENDPOINT_URL", &s3.endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true");
    }
}

// ---- a cluster of processes on loopback ----

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn jobmanager(address: &str, ha: &Path) -> Proc {
    let p = Proc::start(&[
        "jobmanager".into(),
        "--listen".into(),
        address.into(),
        "--ha-dir".into(),
        ha.display().to_string(),
        "--lease".into(),
        "2s".into(),
        "--heartbeat-interval".into(),
        "500ms".into(),
        "--heartbeat-timeout".into(),
        "3s".into(),
    ]);
    p.wait_for("JobManager listening on");
    p
}

pub fn taskmanager(address: &str, id: &str, state: &Path) -> Proc {
    taskmanager_with(address, id, state, 2, &[])
}

/// A TaskManager process with `slots` slots and `extra` arguments, once it listens.
pub fn taskmanager_with(address: &str, id: &str, state: &Path, slots: u32, extra: &[&str]) -> Proc {
    taskmanager_env(address, id, state, slots, extra, &[])
}

/// [`taskmanager_with`], with the environment variables `env` added.
pub fn taskmanager_env(
    address: &str,
    id: &str,
    state: &Path,
    slots: u32,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut a: Vec<String> = vec![
        "taskmanager".into(),
        "--jobmanager".into(),
        address.into(),
        "--slots".into(),
        slots.to_string(),
        "--id".into(),
        id.into(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    a.extend(extra.iter().map(|x| x.to_string()));
    let p = Proc::start_env(&a, env);
    p.wait_for("listening on");
    p
}

/// (state, restarts) of a job, from `freshet list`; `None` while the JobManager is unreachable.
pub fn job_state(address: &str, id: &str) -> Option<(String, u32)> {
    let o = freshet()
        .args(["list", "--jobmanager", address])
        .output()
        .unwrap();
    if !o.status.success() {
        return None;
    }
    String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| (f[2].to_string(), f[3].parse().unwrap_or(0)))
    })
}

pub fn wait_until_ended(address: &str, id: &str, procs: &[&Proc]) -> (String, u32) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some((state, restarts)) = job_state(address, id)
            && matches!(state.as_str(), "finished" | "failed" | "cancelled")
        {
            return (state, restarts);
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| p.log()).collect();
            panic!("job {id} did not end; logs:\n{}", logs.join("\n----\n"));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Asserts that the JobManager deployed attempt `attempt` (or later) from a checkpoint.
pub fn assert_restored_from_checkpoint(jm: &Proc, context: &str) {
    let log = jm.log();
    let restored = log
        .lines()
        .filter(|l| l.contains("deploying") && !l.contains("attempt=0"))
        .find(|l| l.contains("restored_from=") && l.contains("chk-"));
    assert!(
        restored.is_some(),
        "{context}: the job was not redeployed from a checkpoint:\n{log}"
    );
}

/// Submits example `name` at parallelism 6, paced over about `seconds`; returns the job id.
pub fn submit(name: &str, address: &str, out: &Path, checkpoints: &Path, seconds: f64) -> String {
    let mut a = args(name, 6, out, &checkpoints.display().to_string(), seconds);
    a[0] = "submit".into();
    a.extend(["--set".into(), "checkpointing.interval=1s".into()]);
    a.extend(["--jobmanager".into(), address.into()]);
    run_submit(&a)
}

/// Runs `freshet submit ...` (`a` starts with `submit`); returns the job id it prints.
pub fn run_submit<S: AsRef<std::ffi::OsStr>>(a: &[S]) -> String {
    let o = freshet().args(a).output().unwrap();
    assert!(
        o.status.success(),
        "submit: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A JobManager (with a high-availability directory) and TaskManagers of two slots each, in a
/// temporary directory that also holds the job's output (`out`) and the TaskManagers' state.
pub struct Cluster {
    pub work: tempfile::TempDir,
    pub out: std::path::PathBuf,
    pub state: std::path::PathBuf,
    pub ha: std::path::PathBuf,
    pub address: String,
    pub jm: Proc,
    pub tms: Vec<Proc>,
}

impl Cluster {
    pub fn start(taskmanagers: usize) -> Cluster {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let state = work.path().join("state");
        let ha = work.path().join("ha");
        let address = format!("127.0.0.1:{}", free_port());
        let jm = jobmanager(&address, &ha);
        let tms = (0..taskmanagers)
            .map(|i| taskmanager(&address, &format!("tm-{i}"), &state))
            .collect();
        Cluster {
            work,
            out,
            state,
            ha,
            address,
            jm,
            tms,
        }
    }

    /// Where the job's checkpoints go.
    pub fn checkpoints(&self) -> std::path::PathBuf {
        self.work.path().join("checkpoints")
    }

    /// Every process, for logs.
    pub fn procs(&self) -> Vec<&Proc> {
        self.tms.iter().chain([&self.jm]).collect()
    }
}

/// The TLS flags of a process given the `ca.crt`, `tls.crt` and `tls.key` in `dir`.
pub fn tls_args(dir: &Path) -> Vec<String> {
    let f = |n: &str| dir.join(n).display().to_string();
    vec![
        "--tls-cert".into(),
        f("tls.crt"),
        "--tls-key".into(),
        f("tls.key"),
        "--tls-ca".into(),
        f("ca.crt"),
    ]
}

/// `GET path` on `addr`: the status code and body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap()
}

/// `GET path` on `addr`: the status code and body, or why there is none (a server that is
/// exiting resets the connection).
pub fn try_http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    Ok((
        code,
        text.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string(),
    ))
}

/// Copies directory `from` into `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A real OTLP collector on loopback: rotel (from PyPI, installed by `.ci/run`), receiving OTLP
/// over gRPC and HTTP and logging every metric and span it receives in detail.
pub struct Collector {
    child: Child,
    /// `host:port` of its OTLP/gRPC receiver.
    pub grpc: String,
    /// `host:port` of its OTLP/HTTP receiver.
    pub http: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Collector {
    pub fn start() -> Collector {
        let o = Command::new("python3")
            .args([
                "-c",
                "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
            ])
            .output()
            .expect("python3");
        assert!(
            o.status.success(),
            "the rotel collector is not installed (python3 -m pip install rotel): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let agent = String::from_utf8(o.stdout).unwrap().trim().to_string();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("received.log");
        let grpc = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let child = Command::new(&agent)
            .args([
                "start",
                "--otlp-grpc-endpoint",
                &grpc,
                "--otlp-http-endpoint",
                &http,
                "--exporter",
                "blackhole",
                "--debug-log",
                "metrics",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
                "--log-file",
                &dir.path().join("rotel.log").display().to_string(),
                "--pid-file",
                &dir.path().join("rotel.pid").display().to_string(),
            ])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {agent}: {e}"));
        let c = Collector {
            child,
            grpc,
            http,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while [&c.grpc, &c.http]
            .iter()
            .any(|a| std::net::TcpStream::connect(a.as_str()).is_err())
        {
            assert!(
                Instant::now() < deadline,
                "rotel never listened:\n{}",
                c.received()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// Everything it logged of what it received.
    pub fn received(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until what it received satisfies `done`; returns it.
    pub fn wait_until(&self, what: &str, mut done: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.received();
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the collector never received {what}; it got:\n{}",
                &text[text.len().saturating_sub(20_000)..]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGINT to a process (what Ctrl-C does).
pub fn interrupt(pid: u32) {
    let ok = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -INT {pid}");
}

/// A job file in `dir`: an unbounded generator of `rows_per_second` rows over `keys` keys into a
/// keyed deduplication (keyed state) and a blackhole, parallelism 2, checkpoints every 500 ms
/// and savepoints under `dir`.
pub fn dedup_job(dir: &Path, name: &str, rows_per_second: u32, keys: u32) -> std::path::PathBuf {
    let path = dir.join("job.yaml");
    std::fs::write(
        &path,
        format!(
            "version: 1
name: {name}
parallelism: 2
checkpointing: {{interval: 500ms, dir: {}, savepoint_dir: {}}}
sources:
  gen:
    connector: {{type: generator, rows_per_second: {rows_per_second}, fields: {{k: \"seq % {keys}\", v: seq, ts: seq}}}}
    event_time: ts
    watermark: {{max_out_of_orderness: 1s}}
transforms:
  latest:
    type: deduplicate
    input: gen
    key: [k]
    keep: latest
    order_by: v
    ttl: 1000d
sinks:
  out:
    input: latest
    connector: {{type: blackhole}}
",
            dir.join("checkpoints").display(),
            dir.join("savepoints").display(),
        ),
    )
    .unwrap();
    path
}

/// A span as the collector logged it.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub trace: String,
    pub parent: String,
    pub id: String,
    pub name: String,
}

/// The spans in the collector's log, with the service that sent each.
pub fn spans(log: &str) -> Vec<Span> {
    let mut out = Vec::new();
    let mut service = String::new();
    let mut current: Option<Span> = None;
    let field = |l: &str| l.split_once(':').map(|(_, v)| v.trim().to_string());
    for l in log.lines() {
        let t = l.trim();
        if let Some(s) = t.strip_prefix("-> service.name: Str(") {
            service = s.trim_end_matches(')').to_string();
        } else if t.starts_with("Span #") {
            out.extend(current.take());
            current = Some(Span {
                service: service.clone(),
                trace: String::new(),
                parent: String::new(),
                id: String::new(),
                name: String::new(),
            });
        } else if let Some(s) = current.as_mut() {
            if t.starts_with("Trace ID") {
                s.trace = field(t).unwrap_or_default();
            } else if t.starts_with("Parent ID") {
                s.parent = field(t).unwrap_or_default();
            } else if t.starts_with("ID ") {
                s.id = field(t).unwrap_or_default();
            } else if t.starts_with("Name ") && s.name.is_empty() {
                s.name = field(t).unwrap_or_default();
            }
        }
    }
    out.extend(current);
    out
}

/// The children a `parent` span of `service` has in another process: (their names, the
/// services that sent them).
pub fn children(all: &[Span], parent: &Span) -> Vec<(String, String)> {
    all.iter()
        .filter(|s| s.trace == parent.trace && s.parent == parent.id)
        .map(|s| (s.name.clone(), s.service.clone()))
        .collect()
}

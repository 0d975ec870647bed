//! Helpers of the recovery, savepoint and cluster tests: the `freshet` binary, a background
//! process whose stderr is collected, example arguments, output checks, a moto S3 server, a
//! seeded random source.
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
    let spec = freshet_job::load_job(&job, &[]).unwrap();
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
        if let freshet_job::SinkConnector::File { path }
        | freshet_job::SinkConnector::Table { path, .. } = &s.connector
        {
            let file = Path::new(path).file_name().unwrap();
            set(format!(
                "sinks.{sink}.connector.path={}",
                out.join(file).display()
            ));
        }
    }
    for (source, s) in &spec.sources {
        if let freshet_job::SourceConnector::File { path, .. } = &s.connector {
            let lines = std::fs::read_to_string(dir.join(path))
                .unwrap()
                .lines()
                .count();
            let rate = (lines as f64 / seconds).max(1.0);
            set(format!("sources.{source}.connector.rows_per_second={rate}"));
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

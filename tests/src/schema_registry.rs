//! A real schema registry for tests: Apicurio Registry (in-memory storage) on loopback, run with
//! the machine's Java from the distribution `testenv/registry.sh` resolves from Maven Central;
//! the connectors talk to its Confluent-compatible API. Setup requests go through `curl`, and
//! Avro values are written and read with Apache Avro's Python implementation
//! (`tests/tools/avro_values.py`), so what the tests check does not come from the code tested.
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running registry.
pub struct Registry {
    port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The directory holding the registry's runnable jar (resolved once per machine).
fn home() -> PathBuf {
    let out = Command::new(crate::repo().join("testenv/registry.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("testenv/registry.sh runs");
    assert!(out.status.success(), "testenv/registry.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

const CONTENT_TYPE: &str = "Content-Type: application/vnd.schemaregistry.v1+json";

impl Registry {
    /// Starts a registry with no schemas; returns once it answers.
    pub fn start() -> Registry {
        let home = home();
        let jar = std::fs::read_dir(&home)
            .expect("registry directory")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.to_string_lossy().ends_with("-runner.jar"))
            .expect("the registry's runner jar");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = crate::kafka::free_port();
        let log = dir.path().join("registry.log");
        let child = Command::new("java")
            .arg("-Xmx256m")
            .arg("-XX:+UseSerialGC")
            .arg("-XX:TieredStopAtLevel=1")
            .arg(format!("-Dquarkus.http.port={port}"))
            .arg("-Dquarkus.http.host=127.0.0.1")
            .arg("-Dquarkus.management.enabled=false")
            .arg("-jar")
            .arg(&jar)
            .current_dir(dir.path())
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("java starts the registry");
        let mut r = Registry {
            port,
            child,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Value::Array(_)) = r.try_get("/subjects") {
                return r;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!(
                    "the registry exited ({status}): {}",
                    std::fs::read_to_string(&r.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the registry did not answer in 120 s"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Freezes the process (SIGSTOP): connections are accepted by the kernel but never
    /// answered, the worst kind of outage for a client.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused registry run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name}");
    }

    /// The base URL of its Confluent-compatible API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/apis/ccompat/v7", self.port)
    }

    fn curl(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("curl: {}", out.status));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout).trim()
            )
        })
    }

    fn try_get(&self, path: &str) -> Result<Value, String> {
        self.curl(&[&format!("{}{path}", self.url())])
    }

    /// GETs `path` of the API; the answer's JSON.
    pub fn get(&self, path: &str) -> Value {
        self.try_get(path).expect("registry answers")
    }

    /// Registers the Avro schema `schema` (JSON text) under `subject`; its id.
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        let body = serde_json::json!({ "schema": schema }).to_string();
        let answer = self
            .curl(&[
                "-X",
                "POST",
                "-H",
                CONTENT_TYPE,
                "-d",
                &body,
                &format!("{}/subjects/{subject}/versions", self.url()),
            ])
            .expect("registry answers");
        answer["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("registering under {subject}: {answer}")) as u32
    }

    /// Sets the compatibility rule of `subject` (`BACKWARD`, `FULL`, `NONE`, ...).
    pub fn set_compatibility(&self, subject: &str, level: &str) {
        let body = serde_json::json!({ "compatibility": level }).to_string();
        self.curl(&[
            "-X",
            "PUT",
            "-H",
            CONTENT_TYPE,
            "-d",
            &body,
            &format!("{}/config/{subject}", self.url()),
        ])
        .expect("registry answers");
    }

    /// `records` (JSON objects) as values of the Confluent wire format with schema `id`
    /// (`schema`'s JSON text), written by Apache Avro's Python implementation.
    pub fn encode(id: u32, schema: &str, records: &[Value]) -> Vec<Vec<u8>> {
        let input: String = records.iter().map(|r| format!("{r}\n")).collect();
        let out = python(&["encode", &id.to_string(), schema], &input);
        out.lines()
            .map(|l| decode_hex(l.trim()))
            .collect::<Vec<_>>()
    }

    /// Values of the Confluent wire format read by Apache Avro's Python implementation with
    /// their writer schemas from this registry: (schema id, record) each.
    pub fn decode(&self, values: &[Vec<u8>]) -> Vec<(u32, Value)> {
        let input: String = values.iter().map(|v| format!("{}\n", hex(v))).collect();
        python(&["decode", &self.url()], &input)
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("JSON from the decoder");
                (
                    v["schema_id"].as_u64().expect("id") as u32,
                    v["value"].clone(),
                )
            })
            .collect()
    }
}

fn python(args: &[&str], input: &str) -> String {
    let mut child = Command::new("python3")
        .arg(crate::repo().join("tests/tools/avro_values.py"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("python3 ends");
    writer.join().expect("writer").expect("input written");
    assert!(
        out.status.success(),
        "avro_values.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("text")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

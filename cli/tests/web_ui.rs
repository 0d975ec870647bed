//! The web UI in a real browser (headless Chromium, driven over the Chrome DevTools protocol)
//! against a JobManager and two TaskManager processes running a keyed job.
//!
//! - The jobs list shows the job; its page draws the planned graph (every vertex and edge the
//!   API reports) with live rates that become non-zero, watermarks, and the vertex table.
//! - A TaskManager is killed: the TaskManagers page shows it lost, the job restarts on the
//!   other one, and its exceptions list shows the lost TaskManager.
//! - "Trigger savepoint" on the page takes a savepoint that appears, completed, in the page's
//!   checkpoint history and exists on disk; "Cancel job" (confirmed) cancels the job.
//! - The OpenAPI document is valid OpenAPI 3.0 (openapi-spec-validator, from PyPI), lists every
//!   JSON route, and each GET answer carries the properties its schema requires.
//!
//! Screenshots of the pages are written to `target/web-ui/`.
mod common;

use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// A headless Chromium and one of its pages, spoken to over the DevTools protocol.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: WebSocket<TcpStream>,
    next_id: u64,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1440,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (apt-get install chromium) is needed for the web UI test");
        // Chromium writes the port it picked, then the browser's path, into this file
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u16>().ok()))
            {
                break p;
            }
            assert!(Instant::now() < deadline, "chromium did not start");
            std::thread::sleep(Duration::from_millis(100));
        };
        let devtools = format!("127.0.0.1:{port}");
        let page_url =
            loop {
                let body = devtools_get(&devtools, "/json/list");
                let targets: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                if let Some(url) = targets.as_array().into_iter().flatten().find_map(|t| {
                    (t["type"] == "page").then(|| t["webSocketDebuggerUrl"].as_str())?
                }) {
                    break url.to_string();
                }
                assert!(Instant::now() < deadline, "chromium has no page: {body}");
                std::thread::sleep(Duration::from_millis(100));
            };
        let stream = TcpStream::connect(&devtools).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let (socket, _) = tungstenite::client(page_url.as_str(), stream).unwrap();
        let mut b = Browser {
            child,
            _profile: profile,
            socket,
            next_id: 0,
        };
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        b
    }

    /// Calls a DevTools method and returns its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::Text(msg.to_string().into()))
            .unwrap();
        loop {
            let msg = self
                .socket
                .read()
                .unwrap_or_else(|e| panic!("{method}: no reply: {e}"));
            let Message::Text(text) = msg else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
    }

    /// The value of a JavaScript expression in the page (promises are awaited).
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            r["exceptionDetails"].is_null(),
            "{expression}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy in the page; returns its value.
    fn wait_until(&mut self, what: &str, expression: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        // (while the page loads, what the expression reads may not exist yet)
        let guarded = format!(
            "(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        );
        loop {
            let v = self.eval(&guarded);
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            let page = self.eval("document.getElementById('main')?.innerText ?? ''");
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}; it shows:\n{}",
                page.as_str().unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Clicks the middle of the element `selector` with the mouse, as a user would.
    fn click(&mut self, selector: &str) {
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); if (!e || e.disabled) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        assert!(at.is_array(), "{selector} is not there to click");
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": at[0], "y": at[1], "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Writes a PNG of the whole page.
    fn screenshot(&mut self, path: &Path) {
        let height = self
            .eval("Math.max(document.documentElement.scrollHeight, 600)")
            .as_u64()
            .unwrap_or(1000);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1440, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
        self.call("Emulation.clearDeviceMetricsOverride", json!({}));
    }
}

/// `GET path` from Chromium's DevTools HTTP endpoint, which keeps connections open: the body is
/// read up to its `Content-Length`.
fn devtools_get(addr: &str, path: &str) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut length = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/web-ui");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A keyed job whose event time follows the wall clock: a generator of 1000 clicks per second,
/// deduplicated per (user, page), counted per page in 5-second windows, into a blackhole.
fn clicks_job(dir: &Path) -> PathBuf {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let path = dir.join("clicks.yaml");
    std::fs::write(
        &path,
        format!(
            "version: 1
name: clicks-per-page
parallelism: 2
checkpointing: {{interval: 1s, dir: {cp}, savepoint_dir: {sp}}}
sources:
  clicks:
    connector: {{type: generator, rows_per_second: 1000, fields: {{user: \"seq % 100000\", page: \"seq % 7\", ts: \"{now_ms} + seq\"}}}}
    event_time: ts
    watermark: {{max_out_of_orderness: 1s}}
transforms:
  first_clicks:
    type: deduplicate
    input: clicks
    key: [user, page]
    ttl: 1h
  per_page:
    type: window
    input: first_clicks
    key_by: [page]
    window: {{type: tumbling, size: 5s}}
    aggregates: [\"count(*) AS clicks\"]
sinks:
  counts:
    input: per_page
    connector: {{type: blackhole}}
",
            cp = dir.join("checkpoints").display(),
            sp = dir.join("savepoints").display(),
        ),
    )
    .unwrap();
    path
}

fn get_json(addr: &str, path: &str) -> Value {
    let (status, body) = http_get(addr, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// The schema a `$ref` points at in the OpenAPI document.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            let s = &doc["components"]["schemas"][name];
            assert!(!s.is_null(), "{r} is not in the document");
            s
        }
        None => schema,
    }
}

/// Checks that `value` has every property `schema` requires, recursively through objects and
/// arrays; returns how many required properties were checked.
fn check_required(doc: &Value, schema: &Value, value: &Value, at: &str) -> usize {
    let schema = resolve(doc, schema);
    let mut checked = 0;
    if let Some(items) = schema.get("items") {
        for (i, v) in value.as_array().into_iter().flatten().enumerate() {
            checked += check_required(doc, items, v, &format!("{at}[{i}]"));
        }
    }
    for name in schema["required"].as_array().into_iter().flatten() {
        let name = name.as_str().unwrap();
        assert!(
            value.get(name).is_some(),
            "{at} lacks required property {name}: {value}"
        );
        checked += 1;
        if let Some(p) = schema["properties"].get(name) {
            checked += check_required(doc, p, &value[name], &format!("{at}.{name}"));
        }
    }
    checked
}

#[test]
fn the_web_ui_shows_a_running_job_and_triggers_a_savepoint_and_a_cancel() {
    let work = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let jm = Proc::start(&[
        "jobmanager".into(),
        "--listen".into(),
        address.clone(),
        "--http".into(),
        http.clone(),
        "--heartbeat-interval".into(),
        "500ms".into(),
        "--heartbeat-timeout".into(),
        "3s".into(),
    ]);
    let line = jm.wait_for("Web UI and API on");
    assert!(line.contains(&format!("http://{http}/")), "{line}");
    let state = work.path().join("state");
    let mut tms = [
        taskmanager(&address, "tm-0", &state),
        taskmanager(&address, "tm-1", &state),
    ];
    let job = clicks_job(work.path());
    let id = run_submit(&[
        "submit",
        job.to_str().unwrap(),
        "--jobmanager",
        address.as_str(),
    ]);
    let shots = screenshots();
    let url = |fragment: &str| format!("http://{http}/#{fragment}");

    // the page is served with its assets, without a token and without the internet
    let (status, page) = http_get(&http, "/");
    assert_eq!(status, 200);
    assert!(
        page.contains("/ui/app.js") && !page.contains("https://"),
        "{page}"
    );

    let mut b = Browser::start();
    b.goto(&url("/"));
    let listed = b.wait_until(
        "the job in the jobs list",
        &format!("document.querySelector('#jobs tr[data-job=\"{id}\"]')?.innerText"),
    );
    assert!(
        listed.as_str().unwrap().contains("clicks-per-page"),
        "{listed}"
    );
    b.wait_until(
        "the job running",
        &format!(
            "document.querySelector('#jobs tr[data-job=\"{id}\"] .state')?.innerText === 'running'"
        ),
    );
    b.screenshot(&shots.join("jobs.png"));

    // the job's page: its graph as the API plans it, with rates that show records flowing
    b.goto(&url(&format!("/jobs/{id}")));
    let details = get_json(&http, &format!("/jobs/{id}"));
    let vertices = details["vertices"].as_array().unwrap().len();
    let edges = details["edges"].as_array().unwrap().len();
    // the planned graph has the late-data and dead-letter outputs besides the three operators
    assert!(vertices >= 3 && edges >= 2, "{details}");
    b.wait_until(
        "every vertex and edge of the graph",
        &format!(
            "document.querySelectorAll('#graph g.vertex').length === {vertices} && document.querySelectorAll('#graph g.edge').length === {edges}"
        ),
    );
    let names = b.eval(
        "[...document.querySelectorAll('#graph g.vertex text.name')].map(t => t.textContent).join('|')",
    );
    for v in details["vertices"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let shown: String = name.chars().take(20).collect();
        assert!(
            names.as_str().unwrap().contains(&shown),
            "{name} not in {names}"
        );
    }
    let partitioning = b.eval(
        "[...document.querySelectorAll('#graph g.edge text')].map(t => t.textContent).join('|')",
    );
    assert!(
        partitioning.as_str().unwrap().contains("hash(user,page)"),
        "{partitioning}"
    );
    // the source's output rate, over a window of seconds, is close to the generator's 1000
    // rows per second
    b.wait_until(
        "rates over a window of seconds",
        "Number(document.querySelector('#rates-window')?.dataset.ms) >= 3000",
    );
    let rate = b.wait_until(
        "a non-zero output rate at the source",
        "(() => { const t = document.querySelector('#graph g.vertex[data-vertex=\"0\"] .rate-out')?.textContent || ''; const n = parseFloat(t); return n > 0 ? t : null; })()",
    );
    let rate = rate.as_str().unwrap();
    let per_s: f64 = if rate.contains('k') {
        rate.trim_end_matches("/s")
            .trim_end_matches('k')
            .parse::<f64>()
            .unwrap()
            * 1000.0
    } else {
        rate.trim_end_matches("/s").parse().unwrap()
    };
    assert!((300.0..3000.0).contains(&per_s), "source rate {rate}");
    b.wait_until(
        "a watermark at the window",
        "document.querySelector('#graph g.vertex[data-vertex=\"2\"] .watermark')?.textContent.includes('lag')",
    );
    b.wait_until(
        "a completed checkpoint in the history",
        "document.querySelector('#checkpoints tr[data-kind=\"checkpoint\"][data-status=\"completed\"]')",
    );
    // the definition as submitted
    let definition = b.wait_until(
        "the job's definition",
        "document.querySelector('#definition pre')?.textContent",
    );
    let definition: Value = serde_json::from_str(definition.as_str().unwrap()).unwrap();
    assert_eq!(
        definition["transforms"]["per_page"]["type"], "window",
        "{definition}"
    );
    // a vertex's subtasks, with the TaskManager each runs on
    b.click("#graph g.vertex[data-vertex=\"1\"]");
    let subtasks = b.wait_until(
        "the subtasks of the selected vertex",
        "document.querySelectorAll('#vertices tr.subtask-row').length",
    );
    assert_eq!(subtasks, 2);
    b.screenshot(&shots.join("job.png"));

    // the OpenAPI document is valid (checked by openapi-spec-validator from PyPI), covers every
    // JSON route, and GET answers carry what its schemas require
    let doc = get_json(&http, "/openapi.json");
    let doc_file = work.path().join("openapi.json");
    std::fs::write(&doc_file, doc.to_string()).unwrap();
    let checked = Command::new("python3")
        .args([
            "-c",
            "import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1])))",
        ])
        .arg(&doc_file)
        .output()
        .expect("python3");
    assert!(
        checked.status.success(),
        "the OpenAPI document is not valid (python3 -m pip install openapi-spec-validator): {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let paths = doc["paths"].as_object().unwrap();
    for route in [
        "/jobs",
        "/jobs/{job}",
        "/jobs/{job}/checkpoints",
        "/jobs/{job}/exceptions",
        "/jobs/{job}/definition",
        "/jobs/{job}/savepoints",
        "/jobs/{job}/stop",
        "/jobs/{job}/cancel",
        "/taskmanagers",
    ] {
        assert!(
            paths.contains_key(route),
            "{route} missing from the OpenAPI document"
        );
    }
    let mut checked = 0;
    for (path, item) in paths {
        let Some(get) = item.get("get") else { continue };
        let schema = &get["responses"]["200"]["content"]["application/json"]["schema"];
        let value = get_json(&http, &path.replace("{job}", &id));
        checked += check_required(&doc, schema, &value, path);
    }
    assert!(checked > 50, "only {checked} required properties checked");

    // a TaskManager dies: the page shows it lost and the job's failed attempt
    let tm_view = get_json(&http, "/taskmanagers");
    let busy_tm = tm_view
        .as_array()
        .unwrap()
        .iter()
        .position(|t| t["slots_used"].as_u64() > Some(0))
        .expect("a TaskManager runs the job");
    let lost_id = tm_view[busy_tm]["id"].as_str().unwrap().to_string();
    tms[busy_tm].kill();
    b.goto(&url("/taskmanagers"));
    b.wait_until(
        "the killed TaskManager lost",
        &format!(
            "document.querySelector('#taskmanagers tr[data-taskmanager=\"{lost_id}\"]')?.innerText.includes('lost')"
        ),
    );
    b.wait_until(
        "the job's slots on the other TaskManager",
        "[...document.querySelectorAll('#taskmanagers .slot.used')].length > 0",
    );
    b.screenshot(&shots.join("taskmanagers.png"));
    b.goto(&url(&format!("/jobs/{id}")));
    let exception = b.wait_until(
        "the failed attempt in the exceptions",
        "document.querySelector('#exceptions tbody tr')?.innerText",
    );
    assert!(
        exception.as_str().unwrap().contains(&lost_id),
        "{exception}"
    );
    b.wait_until(
        "the job running again",
        "document.querySelector('#job-state')?.innerText === 'running'",
    );

    // a savepoint from the page appears in its checkpoint history, and exists
    b.wait_until(
        "the savepoint button enabled",
        "document.querySelector('#savepoint') && !document.querySelector('#savepoint').disabled",
    );
    b.click("#savepoint");
    let done = b.wait_until(
        "the savepoint done",
        "(() => { const t = document.querySelector('#action-status')?.innerText || ''; return t.includes('done') || t.includes('failed') ? t : null; })()",
    );
    assert!(done.as_str().unwrap().contains("savepoint done"), "{done}");
    let path = b.wait_until(
        "the savepoint in the checkpoint history",
        "document.querySelector('#checkpoints tr[data-kind=\"savepoint\"][data-status=\"completed\"] td.message')?.innerText",
    );
    let path = path
        .as_str()
        .unwrap()
        .trim_start_matches("file://")
        .to_string();
    assert!(
        Path::new(&path).join("_metadata").exists(),
        "savepoint {path} is not on disk"
    );
    b.screenshot(&shots.join("job-after-savepoint.png"));

    // cancel asks for a confirmation, then cancels
    b.click("#cancel");
    b.wait_until(
        "the cancel confirmation",
        "document.querySelector('#cancel')?.innerText === 'Confirm cancel'",
    );
    assert_eq!(
        job_state(&address, &id).map(|s| s.0).as_deref(),
        Some("running")
    );
    b.click("#cancel");
    b.wait_until(
        "the job cancelled",
        "document.querySelector('#job-state')?.innerText === 'cancelled'",
    );
    assert_eq!(
        job_state(&address, &id).map(|s| s.0).as_deref(),
        Some("cancelled")
    );
    // a cancelled job keeps the counters its subtasks stopped with
    let cancelled = get_json(&http, &format!("/jobs/{id}"));
    assert!(
        cancelled["vertices"][0]["metrics"]["records_out"].as_u64() > Some(0),
        "{cancelled}"
    );
    assert!(!jm.log().contains("panicked"), "{}", jm.log());
}

/// `freshet run` stopped with Ctrl-C prints the counters its subtasks stopped with, not zeros.
#[test]
fn a_run_stopped_with_ctrl_c_reports_what_it_did() {
    let work = tempfile::tempdir().unwrap();
    let job = clicks_job(work.path());
    let http = format!("127.0.0.1:{}", free_port());
    let mut p = Proc::start(&[
        "run".into(),
        job.display().to_string(),
        "--listen".into(),
        "off".into(),
        "--http".into(),
        http.clone(),
    ]);
    p.wait_for("Web UI and API on");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = http_get(&http, "/jobs/clicks-per-page");
        let j: Value = serde_json::from_str(&body).unwrap_or_default();
        if j["vertices"][0]["metrics"]["records_out"].as_u64() >= Some(1000) {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    interrupt(p.pid());
    let (_, log) = p.wait();
    assert!(log.contains("stopped by Ctrl-C"), "{log}");
    // the source's line of the summary: name, parallelism, records in, records out, ...
    let line = log
        .lines()
        .find(|l| l.trim_start().starts_with("clicks "))
        .unwrap_or_else(|| panic!("no summary line of the source in:\n{log}"));
    let counts: Vec<u64> = line
        .split_whitespace()
        .skip(2)
        .take(2)
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(counts.iter().all(|n| *n >= 1000), "{line}");
}

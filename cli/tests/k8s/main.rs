//! The chart, the CRD and the operator against a real Kubernetes control plane
//! ([`controlplane`]): what a user does with `helm` and `kubectl`, and what the API server,
//! the controller-manager and the scheduler make of it.
//!
//! Real: etcd, kube-apiserver (authentication by client certificates and service-account
//! tokens, RBAC, the CRD's schema and CEL rules), kube-controller-manager, kube-scheduler,
//! `helm`, `kubectl`, and the operator as a `freshet operator` process authenticated as the
//! chart's ServiceAccount. Standing in: no kubelet runs containers; KWOK keeps a fake node
//! to which pods are bound and reports them running. A JobManager and a TaskManager started by
//! the test on loopback play the job's pods (as processes, or as containers of the image built
//! from `deploy/Dockerfile` with podman), and the operator is told their address with
//! `--jobmanager-address`.
#[path = "../common/mod.rs"]
mod common;
mod controlplane;
mod image;
mod reconcile;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Proc, repo};
use controlplane::{ControlPlane, shared};

/// The namespace and release of the chart every test shares.
const SYSTEM: &str = "freshet-system";
/// The chart's ServiceAccount for release `freshet`.
const OPERATOR_SA: &str = "freshet-operator";

/// The control plane with the chart installed once (release `freshet` in [`SYSTEM`]).
fn cluster() -> &'static ControlPlane {
    static CHART: OnceLock<()> = OnceLock::new();
    let cp = shared();
    CHART.get_or_init(|| {
        cp.helm_ok(&[
            "install",
            "freshet",
            &repo().join("helm/freshet-operator").display().to_string(),
            "--namespace",
            SYSTEM,
            "--create-namespace",
            "--set",
            "image.repository=localhost/freshet",
            "--set",
            "image.tag=test",
            "--wait=false",
        ]);
        // the CRD is served once established
        cp.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd/streamjobs.freshet.dev",
            "--timeout=60s",
        ]);
    });
    cp
}

/// A new namespace for one test.
fn namespace(cp: &ControlPlane, name: &str) -> String {
    cp.kubectl_ok(&["create", "namespace", name]);
    name.to_string()
}

/// Polls `kubectl ARGS` until its output satisfies `done` (at most `secs` seconds).
fn until(cp: &ControlPlane, secs: u64, args: &[&str], done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let out = cp.kubectl(args);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl {} never satisfied the condition; last output:\n{text}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `kubectl apply -f -` of `doc`: the command's output (stdout and stderr) and whether it
/// succeeded.
fn apply(cp: &ControlPlane, doc: &Value) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(controlplane::kubectl_binary())
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(doc.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn example(name: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/examples").join(name)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// Merges `patch` into `target` as a JSON merge patch does.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[test]
fn the_api_server_refuses_bad_specs_naming_the_field() {
    let cp = cluster();
    let ns = namespace(cp, "refusals");
    // the examples as shipped are accepted
    for name in [
        "s3-credentials.yaml",
        "clicks-per-user.yaml",
        "revenue-per-store.yaml",
    ] {
        let mut doc = example(name);
        doc["metadata"]["namespace"] = json!(ns);
        let (ok, out) = apply(cp, &doc);
        assert!(ok, "{name} refused: {out}");
    }
    let columns = cp.kubectl_ok(&["-n", &ns, "get", "streamjobs"]);
    let header: Vec<&str> = columns.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "LIFECYCLE",
            "JOB",
            "PARALLELISM",
            "LAST",
            "SAVEPOINT",
            "AGE"
        ]
    );
    assert!(columns.contains("clicks-per-user"), "{columns}");

    let cases = [
        (
            "parallelism 0",
            json!({"parallelism": 0}),
            "spec.parallelism",
        ),
        ("no image", json!({"image": ""}), "spec.image"),
        (
            "too few slots",
            json!({"parallelism": 8, "taskManagers": {"replicas": 2, "slots": 2}}),
            "spec.taskManagers.replicas",
        ),
        (
            "zero slots",
            json!({"taskManagers": {"slots": 0}}),
            "spec.taskManagers.slots",
        ),
        (
            "interval too short",
            json!({"checkpointing": {"interval": "10ms", "storage": "s3://b/p"}}),
            "spec.checkpointing.interval",
        ),
        (
            "relative storage",
            json!({"checkpointing": {"storage": "bucket/prefix"}}),
            "spec.checkpointing.storage",
        ),
        (
            "savepoint history of 0",
            json!({"savepoints": {"maxCount": 0}}),
            "spec.savepoints.maxCount",
        ),
        (
            "unknown upgrade mode",
            json!({"upgradeMode": "rolling"}),
            "spec.upgradeMode",
        ),
        ("unknown state", json!({"state": "paused"}), "spec.state"),
        (
            "parallelism as text",
            json!({"parallelism": "four"}),
            "spec.parallelism",
        ),
        (
            "a job without sinks",
            json!({"job": {"sinks": null}}),
            "spec.job.sinks",
        ),
    ];
    for (i, (what, patch, field)) in cases.iter().enumerate() {
        let mut doc = example("clicks-per-user.yaml");
        doc["metadata"]["namespace"] = json!(ns);
        doc["metadata"]["name"] = json!(format!("bad-{i}"));
        merge(&mut doc["spec"], patch);
        let (ok, out) = apply(cp, &doc);
        assert!(!ok, "{what}: the API server accepted it:\n{out}");
        assert!(
            out.contains(field),
            "{what}: the refusal does not name {field}:\n{out}"
        );
    }
    // nothing refused was stored
    let names = cp.kubectl_ok(&["-n", &ns, "get", "streamjobs", "-o", "name"]);
    assert!(!names.contains("bad-"), "{names}");
}

/// A JobManager and a TaskManager (4 slots) on loopback, standing in for a job's pods: the
/// processes and the JobManager's address.
fn pods() -> (Proc, Proc, String) {
    pods_with("127.0.0.1:0", &[], &[])
}

/// [`pods`] with the JobManager on `listen`, with `jm_extra` and `tm_extra` arguments.
fn pods_with(listen: &str, jm_extra: &[String], tm_extra: &[String]) -> (Proc, Proc, String) {
    let mut a = vec!["jobmanager".into(), "--listen".into(), listen.into()];
    a.extend_from_slice(jm_extra);
    let jm = Proc::start(&a);
    let line = jm.wait_for("JobManager listening on ");
    let address = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let mut a = vec![
        "taskmanager".into(),
        "--jobmanager".into(),
        address.clone(),
        "--slots".into(),
        "4".into(),
        "--id".into(),
        "taskmanager-0".into(),
    ];
    a.extend_from_slice(tm_extra);
    let tm = Proc::start(&a);
    tm.wait_for("listening on");
    (jm, tm, address)
}

/// `freshet operator` authenticated with a token of the chart's ServiceAccount (as its pod
/// would be), reaching JobManagers at `jobmanager`. Tests run side by side, so each operator
/// watches its test's namespace `ns` and elects its leader with a lease of its own.
fn operator(cp: &ControlPlane, dir: &Path, identity: &str, ns: &str, jobmanager: &str) -> Proc {
    let op = operator_process(
        &sa_kubeconfig(cp, dir, identity),
        identity,
        ns,
        jobmanager,
        &[],
    );
    op.wait_for("leading; reconciling StreamJobs");
    op
}

/// A kubeconfig with a new token of the chart's ServiceAccount.
fn sa_kubeconfig(cp: &ControlPlane, dir: &Path, identity: &str) -> PathBuf {
    let token = cp.kubectl_ok(&[
        "-n",
        SYSTEM,
        "create",
        "token",
        OPERATOR_SA,
        "--duration=2h",
    ]);
    let kubeconfig = dir.join(format!("{identity}.kubeconfig"));
    controlplane::kubeconfig(
        &kubeconfig,
        &cp.server,
        &cp.ca,
        &format!("    token: {}", token.trim()),
    );
    kubeconfig
}

/// `freshet operator` with `kubeconfig`, as [`operator`] starts it, with `extra` arguments;
/// not waiting for it to lead.
fn operator_process(
    kubeconfig: &Path,
    identity: &str,
    ns: &str,
    jobmanager: &str,
    extra: &[&str],
) -> Proc {
    operator_process_env(kubeconfig, identity, ns, jobmanager, extra, &[])
}

/// [`operator_process`] with the environment variables `env` added.
fn operator_process_env(
    kubeconfig: &Path,
    identity: &str,
    ns: &str,
    jobmanager: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut args: Vec<String> = vec![
        "operator".into(),
        "--namespace".into(),
        ns.into(),
        "--lease-namespace".into(),
        SYSTEM.into(),
        "--lease-name".into(),
        format!("freshet-operator-{ns}"),
        "--identity".into(),
        identity.into(),
        "--jobmanager-address".into(),
        jobmanager.into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut env = env.to_vec();
    env.push(("KUBECONFIG", kubeconfig.to_str().unwrap()));
    Proc::start_env(&args, &env)
}

/// A StreamJob running an unbounded keyed job (generator at a fixed parallelism of 1 → keep
/// latest per key → file), with security off (the stand-in pods run without TLS), its
/// checkpoints and savepoints under `dir/state` and its output in `dir/out.jsonl`.
fn stream_job(ns: &str, name: &str, dir: &Path) -> Value {
    json!({
        "apiVersion": "freshet.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "image": "localhost/freshet:test",
            "parallelism": 1,
            "security": {"enabled": false},
            "taskManagers": {"slots": 4},
            "checkpointing": {"interval": "500ms", "storage": dir.join("state").display().to_string()},
            "job": {
                "version": 1,
                "name": name,
                "sources": {"gen": {
                    "parallelism": 1,
                    "connector": {"type": "generator", "rows_per_second": 400,
                                  "fields": {"k": "seq % 16", "v": "seq", "ts": "seq"}},
                    "event_time": "ts",
                    "watermark": {"max_out_of_orderness": "1s"}
                }},
                "transforms": {"latest": {
                    "type": "deduplicate", "input": "gen", "key": ["k"],
                    "keep": "latest", "order_by": "v", "ttl": "1000d"
                }},
                "sinks": {"out": {"input": "latest",
                    "connector": {"type": "file", "path": dir.join("out.jsonl").display().to_string()}}},
                // not the default under the pods' working directory, which for these
                // stand-in processes would be the host's /var/lib/freshet
                "dead_letter": {"type": "file", "path": dir.join("dead-letter.jsonl").display().to_string()}
            }
        }
    })
}

/// One test's StreamJob on the shared control plane: its namespace, a scratch directory, the
/// stand-in pods, an operator watching the namespace, and the StreamJob `name` applied (its
/// manifest changed by `edit` first).
struct Setup {
    ns: String,
    address: String,
    op: Proc,
    _pods: (Proc, Proc),
    _dir: tempfile::TempDir,
}

fn setup(ns: &str, name: &str, edit: impl FnOnce(&mut Value, &Path)) -> Setup {
    let cp = cluster();
    let ns = namespace(cp, ns);
    let dir = tempfile::tempdir().unwrap();
    let (jm, tm, address) = pods();
    let op = operator(cp, dir.path(), "operator-0", &ns, &address);
    let mut sj = stream_job(&ns, name, dir.path());
    edit(&mut sj, dir.path());
    let (ok, out) = apply(cp, &sj);
    assert!(ok, "{out}");
    Setup {
        ns,
        address,
        op,
        _pods: (jm, tm),
        _dir: dir,
    }
}

fn jsonpath(cp: &ControlPlane, ns: &str, what: &str, path: &str) -> String {
    cp.kubectl_ok(&["-n", ns, "get", what, "-o", &format!("jsonpath={path}")])
}

#[test]
fn the_operator_runs_a_job_with_the_charts_identity() {
    let cp = cluster();
    // bound whole: its processes stop when it is dropped
    let t = setup("jobs", "counts", |_, _| {});
    let (ns, address, op) = (&t.ns, &t.address, &t.op);
    let job = "streamjob/counts";
    until(
        cp,
        90,
        &["-n", ns, "get", job, "-o", "jsonpath={.status.lifecycle}"],
        |l| l == "running",
    );
    let row = cp.kubectl_ok(&["-n", ns, "get", "streamjobs", "--no-headers"]);
    assert!(
        row.starts_with("counts") && row.contains("running"),
        "{row}"
    );

    // what the operator made is owned by the StreamJob; the controller-manager rolled the
    // Deployments out into ReplicaSets and Pods
    let uid = jsonpath(cp, ns, job, "{.metadata.uid}");
    let made: Value = serde_json::from_str(&cp.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "deployments,services,configmaps",
        "-l",
        "app.kubernetes.io/managed-by=freshet-operator",
        "-o",
        "json",
    ]))
    .unwrap();
    let items = made["items"].as_array().unwrap();
    let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "Deployment").count(),
        2,
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"Service") && kinds.contains(&"ConfigMap"),
        "{kinds:?}"
    );
    for i in items {
        let owner = &i["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], json!(uid), "{i}");
        assert_eq!(owner["controller"], json!(true), "{i}");
    }
    // the scheduler binds the pods to KWOK's node, which reports them running; the
    // Deployments become available
    until(
        cp,
        60,
        &[
            "-n",
            ns,
            "get",
            "pods",
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName}/{.status.phase} {end}",
        ],
        |p| {
            p.split_whitespace().count() >= 2
                && p.split_whitespace()
                    .all(|p| p == format!("{}/Running", controlplane::FAKE_NODE))
        },
    );
    for d in ["counts-jobmanager", "counts-taskmanager"] {
        cp.kubectl_ok(&[
            "-n",
            ns,
            "wait",
            "--for=condition=Available",
            &format!("deployment/{d}"),
            "--timeout=60s",
        ]);
    }

    // a savepoint on request
    patch(cp, ns, "counts", json!({"savepointTriggerNonce": 1}));
    let path = until(
        cp,
        90,
        &[
            "-n",
            ns,
            "get",
            job,
            "-o",
            "jsonpath={.status.lastSavepoint.path}",
        ],
        |p| !p.is_empty(),
    );
    assert!(Path::new(&path).exists(), "savepoint {path} is not on disk");
    let described = cp.kubectl_ok(&["-n", ns, "describe", job]);
    for what in ["Conditions:", "Ready", "JobSubmitted", "SavepointCompleted"] {
        assert!(described.contains(what), "no {what} in:\n{described}");
    }

    // deleting the StreamJob stops its job with a final savepoint first (the operator's
    // finalizer), then the garbage collector deletes what it owned
    assert_eq!(
        jsonpath(cp, ns, job, "{.metadata.finalizers}"),
        r#"["freshet.dev/final-savepoint"]"#
    );
    let running = jsonpath(cp, ns, job, "{.status.jobId}");
    let deleted = cp.kubectl(&["-n", ns, "delete", job, "--wait=true", "--timeout=90s"]);
    assert!(
        deleted.status.success(),
        "{}\noperator:\n{}",
        String::from_utf8_lossy(&deleted.stderr),
        op.log()
    );
    let final_events = events(cp, ns, "FinalSavepoint");
    let final_savepoint = final_events
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        !final_savepoint.is_empty() && Path::new(&final_savepoint).exists(),
        "no final savepoint on disk: {final_events:?}"
    );
    assert_eq!(jobs_in(address, "running"), 0, "job {running} still runs");
    let all = ["deployments,replicasets,pods,services", "configmaps"];
    for (kinds, label) in all
        .iter()
        .zip(["", "app.kubernetes.io/managed-by=freshet-operator"])
    {
        until(
            cp,
            60,
            &["-n", ns, "get", kinds, "-l", label, "-o", "name"],
            |names| names.trim().is_empty(),
        );
    }
}

/// The trace id at `path` of the StreamJob's status, once it is there.
fn status_trace(cp: &ControlPlane, ns: &str, job: &str, path: &str, secs: u64) -> String {
    let jsonpath = format!("jsonpath={{{path}}}");
    until(cp, secs, &["-n", ns, "get", job, "-o", &jsonpath], |t| {
        !t.is_empty()
    })
}

/// Waits until the collector holds a span `name` of the JobManager in trace `trace`, with a
/// `child` span under it from a TaskManager.
fn holds_trace(collector: &common::Collector, what: &str, name: &str, trace: &str, child: &str) {
    collector.wait_until(what, |text| {
        let all = common::spans(text);
        all.iter().any(|s| {
            s.name == name
                && s.service == "freshet-jobmanager"
                && s.trace == trace
                && common::children(&all, s)
                    .iter()
                    .any(|(n, svc)| n == child && svc == "freshet-taskmanager")
        })
    });
}

/// Real: the control plane, the operator with the chart's identity, a JobManager and a
/// TaskManager process, and an OTLP collector (rotel) all three export traces to. A user goes
/// from the StreamJob to the traces: its status names the trace of the job's deployment and of
/// a savepoint it asked for, `kubectl describe` shows them in the events, and the collector
/// holds those traces with the JobManager's spans in them (and the operator's reconciles).
#[test]
fn the_stream_job_status_and_events_lead_to_the_traces() {
    let cp = cluster();
    let ns = namespace(cp, "traced");
    let dir = tempfile::tempdir().unwrap();
    let collector = common::Collector::start();
    let endpoint = format!("http://{}", collector.grpc);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_METRICS_EXPORTER", "none"),
    ];
    let jm = Proc::start_env(
        &[
            "jobmanager".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", common::free_port()),
        ],
        &env,
    );
    let line = jm.wait_for("JobManager listening on ");
    let address = line
        .split("listening on ")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .unwrap()
        .to_string();
    let mut tm = common::taskmanager_env(
        &address,
        "taskmanager-0",
        &dir.path().join("tm"),
        4,
        &[],
        &env,
    );
    let op = operator_process_env(
        &sa_kubeconfig(cp, dir.path(), "operator-traced"),
        "operator-traced",
        &ns,
        &address,
        &[],
        &env,
    );
    op.wait_for("leading; reconciling StreamJobs");
    let (ok, out) = apply(cp, &stream_job(&ns, "traced", dir.path()));
    assert!(ok, "{out}");
    let job = "streamjob/traced";
    let deployed = status_trace(cp, &ns, job, ".status.deployed.traceId", 90);
    // the deployment's trace: the JobManager's deployment span with each subtask's restore
    holds_trace(
        &collector,
        "the deployment's trace",
        "job.deploy",
        &deployed,
        "subtask.open",
    );
    // a savepoint on request: its record in the status names its trace, which holds the
    // JobManager's checkpoint with the TaskManager's parts
    patch(cp, &ns, "traced", json!({"savepointTriggerNonce": 1}));
    let savepoint = status_trace(cp, &ns, job, ".status.lastSavepoint.traceId", 90);
    assert_ne!(savepoint, deployed);
    holds_trace(
        &collector,
        "the savepoint's trace",
        "checkpoint",
        &savepoint,
        "checkpoint.sync",
    );
    // the events a user reads with kubectl describe carry the same ids
    let described = cp.kubectl_ok(&["-n", &ns, "describe", job]);
    for (event, trace) in [
        ("JobSubmitted", &deployed),
        ("SavepointCompleted", &savepoint),
    ] {
        assert!(
            described
                .lines()
                .any(|l| l.contains(event) && l.contains(&format!("(trace {trace})"))),
            "no {event} event with trace {trace} in:\n{described}"
        );
    }
    // a TaskManager dies and another takes its place: the job restarts from its latest
    // checkpoint, and the status's last recovery names the restarted deployment's trace
    tm.kill();
    let _tm = common::taskmanager_env(
        &address,
        "taskmanager-1",
        &dir.path().join("tm"),
        4,
        &[],
        &env,
    );
    let recovered = status_trace(cp, &ns, job, ".status.lastRecovery.traceId", 120);
    assert_ne!(recovered, deployed);
    holds_trace(
        &collector,
        "the recovery's trace",
        "job.deploy",
        &recovered,
        "subtask.open",
    );
    let recovery_events = events(cp, &ns, "JobRecovered");
    assert!(
        recovery_events.contains(&format!("(trace {recovered})")),
        "{recovery_events}"
    );
    // the operator's reconciles are traced too
    collector.wait_until("the operator's reconcile spans", |text| {
        common::spans(text)
            .iter()
            .any(|s| s.name == "reconcile" && s.service == "freshet-operator")
    });
    drop(op);
}

/// `kubectl auth can-i VERB RESOURCE` as `user` (in `ns`, or cluster-wide); `RESOURCE/SUB`
/// names a subresource.
fn can_i(cp: &ControlPlane, user: &str, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let mut args = vec!["auth", "can-i", verb, "--as", user];
    match resource.split_once('/') {
        Some((resource, sub)) => args.extend([resource, "--subresource", sub]),
        None => args.push(resource),
    }
    match ns {
        Some(ns) => args.extend(["-n", ns]),
        None => args.push("--all-namespaces"),
    }
    let out = cp.kubectl(&args);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl {}: {answer}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

#[test]
fn the_charts_rbac_is_what_the_operator_needs_and_no_more() {
    let cp = cluster();
    let sa = format!("system:serviceaccount:{SYSTEM}:{OPERATOR_SA}");
    let needed = [
        ("list", "streamjobs.freshet.dev", None),
        ("watch", "streamjobs.freshet.dev", None),
        ("patch", "streamjobs.freshet.dev/status", None),
        // its finalizer (the spec-admission policy keeps the spec out of reach)
        ("patch", "streamjobs.freshet.dev", None),
        ("create", "deployments.apps", None),
        ("patch", "deployments.apps", None),
        ("delete", "deployments.apps", None),
        ("watch", "deployments.apps", None),
        ("create", "services", None),
        ("patch", "configmaps", None),
        ("get", "secrets", None),
        ("create", "secrets", None),
        ("create", "events.events.k8s.io", None),
        ("get", "leases.coordination.k8s.io", Some(SYSTEM)),
        ("update", "leases.coordination.k8s.io", Some(SYSTEM)),
    ];
    for (verb, resource, ns) in needed {
        assert!(
            can_i(cp, &sa, verb, resource, ns),
            "the operator cannot {verb} {resource}"
        );
    }
    let not_needed = [
        // Secrets are read one by one, by name: never listed or watched, never changed
        ("list", "secrets", None),
        ("watch", "secrets", None),
        ("update", "secrets", None),
        ("delete", "secrets", None),
        // the StreamJob belongs to the user
        ("update", "streamjobs.freshet.dev", None),
        ("delete", "streamjobs.freshet.dev", None),
        ("create", "pods", None),
        ("create", "rolebindings.rbac.authorization.k8s.io", None),
        ("update", "leases.coordination.k8s.io", Some("default")),
    ];
    for (verb, resource, ns) in not_needed {
        assert!(
            !can_i(cp, &sa, verb, resource, ns),
            "the operator may {verb} {resource}, which it does not need"
        );
    }

    // RBAC lets it patch StreamJobs (for its finalizer); the chart's admission policy keeps
    // their spec out of its reach
    let ns = namespace(cp, "spec-policy");
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = apply(cp, &stream_job(&ns, "owned", dir.path()));
    assert!(ok, "{out}");
    let as_operator = |patch: &str| {
        cp.kubectl(&[
            "-n",
            &ns,
            "patch",
            "streamjob",
            "owned",
            "--as",
            &sa,
            "--type",
            "merge",
            "-p",
            patch,
        ])
    };
    let refused = as_operator(r#"{"spec":{"parallelism":2}}"#);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("never its spec"), "{why}");
    assert_eq!(
        jsonpath(cp, &ns, "streamjob/owned", "{.spec.parallelism}"),
        "1"
    );
    let allowed = as_operator(r#"{"metadata":{"finalizers":["freshet.dev/final-savepoint"]}}"#);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    // the user may still change the spec
    patch(cp, &ns, "owned", json!({"parallelism": 2}));
    cp.kubectl_ok(&[
        "-n",
        &ns,
        "patch",
        "streamjob",
        "owned",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
}

#[test]
fn helm_installs_upgrades_and_uninstalls_a_namespaced_release() {
    let cp = cluster();
    let ns = namespace(cp, "team-a");
    let chart = repo().join("helm/freshet-operator").display().to_string();
    let values = [
        "--set",
        "image.repository=localhost/freshet",
        "--set",
        "image.tag=test",
        "--set",
        "watchNamespace=team-a",
    ];
    let mut args = vec!["install", "scoped", &chart, "--namespace", &ns];
    args.extend(values);
    cp.helm_ok(&args);
    let replicas =
        |cp: &ControlPlane| jsonpath(cp, &ns, "deployment/scoped-operator", "{.spec.replicas}");
    assert_eq!(replicas(cp), "1");
    // watchNamespace makes the rules a Role in that namespace, not a ClusterRole
    cp.kubectl_ok(&[
        "-n",
        &ns,
        "get",
        "role/scoped-operator",
        "rolebinding/scoped-operator",
    ]);
    assert!(
        !cp.kubectl(&["get", "clusterrole/scoped-operator"])
            .status
            .success()
    );
    let sa = format!("system:serviceaccount:{ns}:scoped-operator");
    assert!(can_i(cp, &sa, "watch", "streamjobs.freshet.dev", Some(&ns)));
    assert!(!can_i(
        cp,
        &sa,
        "watch",
        "streamjobs.freshet.dev",
        Some("default")
    ));

    let mut args = vec![
        "upgrade",
        "scoped",
        &chart,
        "--namespace",
        &ns,
        "--set",
        "replicas=2",
    ];
    args.extend(values);
    cp.helm_ok(&args);
    assert_eq!(replicas(cp), "2");

    cp.helm_ok(&["uninstall", "scoped", "--namespace", &ns, "--wait"]);
    let left = cp.kubectl_ok(&[
        "-n",
        &ns,
        "get",
        "deployments,serviceaccounts,roles,rolebindings",
        "-l",
        "app.kubernetes.io/instance=scoped",
        "-o",
        "name",
    ]);
    assert!(left.trim().is_empty(), "left after uninstall: {left}");
    // the CRD stays (Helm never deletes what it installed from crds/), so StreamJobs survive
    cp.kubectl_ok(&["get", "crd/streamjobs.freshet.dev"]);
}

/// The StreamJob as JSON.
fn get(cp: &ControlPlane, ns: &str, name: &str) -> Value {
    serde_json::from_str(&cp.kubectl_ok(&["-n", ns, "get", "streamjob", name, "-o", "json"]))
        .unwrap()
}

/// Waits until the operator has carried out the StreamJob's current spec and the job runs (at
/// most 120 s): its status.
fn until_running(cp: &ControlPlane, ns: &str, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let sj = get(cp, ns, name);
        let st = &sj["status"];
        if st["lifecycle"] == "running"
            && st["jobState"] == "running"
            && st.get("change").is_none()
            && st["deployed"]["generation"] == sj["metadata"]["generation"]
        {
            return st.clone();
        }
        assert!(Instant::now() < deadline, "not running: {st:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn patch(cp: &ControlPlane, ns: &str, name: &str, spec: Value) {
    cp.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "streamjob",
        name,
        "--type",
        "merge",
        "-p",
        &json!({ "spec": spec }).to_string(),
    ]);
}

#[test]
fn upgrade_rescale_suspend_and_resume_with_kubectl() {
    let cp = cluster();
    let t = setup("lifecycle", "clicks", |_, _| {});
    let ns = &t.ns;
    let st = until_running(cp, ns, "clicks");
    assert_eq!(st["deployed"]["startedWith"], "initial");
    let first = st["jobId"].clone();
    let replicas = |what: &str| {
        jsonpath(
            cp,
            ns,
            &format!("deployment/clicks-{what}"),
            "{.spec.replicas}",
        )
    };

    // an upgrade: the job changed, so it stops with a savepoint and the new spec starts from it
    patch(
        cp,
        ns,
        "clicks",
        json!({"job": {"sources": {"gen": {"connector": {"rows_per_second": 500}}}}}),
    );
    let st = until_running(cp, ns, "clicks");
    assert_eq!(st["deployed"]["startedWith"], "savepoint", "{st:#}");
    let upgrade = st["savepoints"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(upgrade["trigger"], "upgrade", "{st:#}");
    assert_eq!(st["deployed"]["restoredFrom"], upgrade["path"]);
    assert_ne!(st["jobId"], first);

    // a rescale through the scale subresource, as `kubectl scale` does it
    cp.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "streamjob",
        "clicks",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"taskManagers":{"slots":2}}}"#,
    ]);
    until_running(cp, ns, "clicks");
    cp.kubectl_ok(&["-n", ns, "scale", "streamjob", "clicks", "--replicas", "3"]);
    let st = until_running(cp, ns, "clicks");
    assert_eq!(st["parallelism"], 3, "{st:#}");
    assert_eq!(st["deployed"]["parallelism"], 3, "{st:#}");
    assert_eq!(st["deployed"]["startedWith"], "savepoint");
    assert_eq!(replicas("taskmanager"), "2", "3 slots of 2");
    // the scale subresource reports it back
    let scale: Value = serde_json::from_str(&cp.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/apis/freshet.dev/v1alpha1/namespaces/{ns}/streamjobs/clicks/scale"),
    ]))
    .unwrap();
    assert_eq!(scale["spec"]["replicas"], 3, "{scale}");
    assert_eq!(scale["status"]["replicas"], 3, "{scale}");

    // suspend: a savepoint, then no pods
    patch(cp, ns, "clicks", json!({"state": "suspended"}));
    until(
        cp,
        120,
        &[
            "-n",
            ns,
            "get",
            "streamjob/clicks",
            "-o",
            "jsonpath={.status.lifecycle}",
        ],
        |l| l == "suspended",
    );
    assert_eq!(
        (replicas("jobmanager"), replicas("taskmanager")),
        ("0".into(), "0".into())
    );
    let st = get(cp, ns, "clicks")["status"].clone();
    let suspend = st["savepoints"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(suspend["trigger"], "suspend", "{st:#}");

    // resume from the suspend savepoint
    patch(cp, ns, "clicks", json!({"state": "running"}));
    let st = until_running(cp, ns, "clicks");
    assert_eq!(st["deployed"]["restoredFrom"], suspend["path"], "{st:#}");
    assert_eq!(replicas("taskmanager"), "2");

    // restarts in the other upgrade modes
    std::thread::sleep(Duration::from_secs(2)); // a checkpoint completes meanwhile
    patch(
        cp,
        ns,
        "clicks",
        json!({"upgradeMode": "last-state", "restartNonce": 1}),
    );
    let st = until_running(cp, ns, "clicks");
    assert_eq!(st["deployed"]["startedWith"], "last-state", "{st:#}");
    assert!(
        st["deployed"]["restoredFrom"]
            .as_str()
            .unwrap_or("")
            .contains("/chk-"),
        "{st:#}"
    );
    patch(
        cp,
        ns,
        "clicks",
        json!({"upgradeMode": "stateless", "restartNonce": 2}),
    );
    let st = until_running(cp, ns, "clicks");
    assert_eq!(st["deployed"]["startedWith"], "stateless", "{st:#}");
    assert!(st["deployed"].get("restoredFrom").is_none(), "{st:#}");
}

/// The jobs on the JobManager at `address` in `state` (`freshet list`).
fn jobs_in(address: &str, state: &str) -> usize {
    let out = common::freshet()
        .args(["list", "--jobmanager", address])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(2) == Some(state))
        .count()
}

/// Two operator replicas share a lease; the leader is killed (SIGKILL) in the middle of an
/// upgrade; the standby takes the lease once it expires and finishes the upgrade, and the job
/// runs once.
#[test]
fn a_standby_operator_finishes_the_upgrade_its_killed_leader_began() {
    let cp = cluster();
    let ns = namespace(cp, "failover");
    let dir = tempfile::tempdir().unwrap();
    let (_jm, _tm, address) = pods();
    let lease = ["--lease-duration", "4s"];
    let kubeconfig = sa_kubeconfig(cp, dir.path(), "operators");
    let mut a = operator_process(&kubeconfig, "operator-a", &ns, &address, &lease);
    a.wait_for("leading; reconciling StreamJobs");
    let b = operator_process(&kubeconfig, "operator-b", &ns, &address, &lease);
    b.wait_for("waiting for the leader lease");
    let (ok, out) = apply(cp, &stream_job(&ns, "orders", dir.path()));
    assert!(ok, "{out}");
    let st = until_running(cp, &ns, "orders");
    let first = st["jobId"].as_str().unwrap().to_string();
    let holder = |cp: &ControlPlane| {
        jsonpath(
            cp,
            SYSTEM,
            &format!("lease/freshet-operator-{ns}"),
            "{.spec.holderIdentity}",
        )
    };
    assert_eq!(holder(cp), "operator-a");
    assert!(
        !b.log().contains("leading;"),
        "both replicas lead:\n{}",
        b.log()
    );

    patch(
        cp,
        &ns,
        "orders",
        json!({"job": {"sources": {"gen": {"connector": {"rows_per_second": 300}}}}}),
    );
    until(
        cp,
        60,
        &[
            "-n",
            &ns,
            "get",
            "streamjob/orders",
            "-o",
            "jsonpath={.status.change.phase}",
        ],
        |p| !p.is_empty(),
    );
    a.kill();
    let killed = Instant::now();
    b.wait_for("leading; reconciling StreamJobs");
    let takeover = killed.elapsed();
    // the lease expires 4 s after the last renewal; the standby checks every second or so
    assert!(
        takeover < Duration::from_secs(8),
        "took over after {takeover:?}"
    );
    assert_eq!(holder(cp), "operator-b");

    let st = until_running(cp, &ns, "orders");
    assert_eq!(st["deployed"]["startedWith"], "savepoint", "{st:#}");
    assert_ne!(st["jobId"].as_str(), Some(first.as_str()));
    let upgrades = st["savepoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["trigger"] == "upgrade")
        .count();
    assert_eq!(upgrades, 1, "{st:#}");
    assert_eq!(jobs_in(&address, "running"), 1, "one job runs");
}

/// The operator's watches and its lease outlive a restart of the API server (killed, started
/// again on the same etcd): a savepoint requested afterwards is taken. A control plane of its
/// own, with the CRD and no chart; the operator runs as the admin.
#[test]
fn the_operator_outlives_an_api_server_restart() {
    let cp = ControlPlane::start().unwrap();
    let crd = repo().join("helm/freshet-operator/crds/streamjob.yaml");
    cp.kubectl_ok(&["apply", "-f", crd.to_str().unwrap()]);
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/streamjobs.freshet.dev",
    ]);
    cp.kubectl_ok(&["create", "namespace", SYSTEM]);
    let ns = namespace(&cp, "restarts");
    let dir = tempfile::tempdir().unwrap();
    let (_jm, _tm, address) = pods();
    let health = format!("127.0.0.1:{}", common::free_port());
    let mut op = operator_process(
        &cp.kubeconfig,
        "operator-0",
        &ns,
        &address,
        &["--health", &health],
    );
    op.wait_for("leading; reconciling StreamJobs");
    let (ok, out) = apply(&cp, &stream_job(&ns, "visits", dir.path()));
    assert!(ok, "{out}");
    until_running(&cp, &ns, "visits");

    let down = Instant::now();
    cp.restart("kube-apiserver");
    eprintln!("the API server answered again after {:?}", down.elapsed());
    patch(&cp, &ns, "visits", json!({"savepointTriggerNonce": 7}));
    until(
        &cp,
        90,
        &[
            "-n",
            &ns,
            "get",
            "streamjob/visits",
            "-o",
            "jsonpath={.status.savepointTriggerNonce}",
        ],
        |n| n == "7",
    );
    assert_eq!(
        op.exit_within(Duration::ZERO),
        None,
        "the operator exited:\n{}",
        op.log()
    );

    // its metrics: reconciles and their duration by StreamJob, and a StreamJob whose TLS
    // Secret is not issued yet failing in a way retrying can fix
    let mut waiting = stream_job(&ns, "waiting", dir.path());
    waiting["spec"]["security"] = json!({"tlsSecret": "not-issued-yet"});
    let (ok, out) = apply(&cp, &waiting);
    assert!(ok, "{out}");
    let failed = format!(
        r#"freshet_operator_reconcile_failures_total{{name="waiting",namespace="{ns}",retryable="true"}}"#
    );
    let counted = format!(
        r#"freshet_operator_reconcile_duration_seconds_count{{name="visits",namespace="{ns}"}}"#
    );
    let reconciles =
        format!(r#"freshet_operator_reconciles_total{{name="visits",namespace="{ns}"}}"#);
    until_metrics(&health, 60, |m| {
        m(&failed).is_some_and(|n| n >= 1.0)
            && m(&counted).is_some_and(|n| n >= 2.0)
            && m(&reconciles).is_some_and(|n| n >= 2.0)
    });
}

/// Polls the operator's `/metrics` at `health` until `done` holds (at most `secs`); `done` reads
/// a series' value by its name and labels.
fn until_metrics(health: &str, secs: u64, done: impl Fn(&dyn Fn(&str) -> Option<f64>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (code, text) = common::http_get(health, "/metrics");
        assert_eq!(code, 200, "{text}");
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        if done(&value) {
            return;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Real: the control plane, kubectl, the operator process (admin credentials), a JobManager and
/// a TaskManager process standing in for the pods. The JobManager frozen with SIGSTOP (it
/// accepts connections but never answers): the operator's passes fail, counted as retryable,
/// instead of waiting forever; once it is resumed, the operator serves the StreamJob again.
#[test]
fn a_frozen_jobmanager_fails_passes_instead_of_holding_them() {
    let cp = cluster();
    let ns = namespace(cp, "frozen");
    let dir = tempfile::tempdir().unwrap();
    let (jm, _tm, address) = pods();
    let health = format!("127.0.0.1:{}", common::free_port());
    let _op = operator_process(
        &cp.kubeconfig,
        "operator-0",
        &ns,
        &address,
        &["--health", &health],
    );
    let (ok, out) = apply(cp, &stream_job(&ns, "ticks", dir.path()));
    assert!(ok, "{out}");
    until_running(cp, &ns, "ticks");

    let pid = jm.pid() as i32;
    // SAFETY: signals a child process of this test
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let failed = format!(
        r#"freshet_operator_reconcile_failures_total{{name="ticks",namespace="{ns}",retryable="true"}}"#
    );
    until_metrics(&health, 120, |m| m(&failed).is_some_and(|n| n >= 1.0));
    unsafe { libc::kill(pid, libc::SIGCONT) };

    patch(cp, &ns, "ticks", json!({"savepointTriggerNonce": 3}));
    let st = until_status(cp, &ns, "ticks", 120, |st| st["savepointTriggerNonce"] == 3);
    let last = st["savepoints"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["state"], "completed", "{st:#}");
    assert_eq!(st["jobState"], "running", "{st:#}");
}

/// A kube client with the admin's kubeconfig.
async fn admin_client(cp: &ControlPlane) -> kube::Client {
    freshet_security::install_crypto_provider();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&cp.kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// Two writers start from the same read of a StreamJob; the first writes its status; the
/// second, now stale, is refused by the API server instead of overwriting it.
#[test]
fn a_stale_status_write_is_refused() {
    use freshet_crds::{Lifecycle, StreamJob};
    use freshet_operator::report::StatusWriter;
    let cp = cluster();
    let ns = namespace(cp, "stale");
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = apply(cp, &stream_job(&ns, "stale", dir.path()));
    assert!(ok, "{out}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let api: kube::Api<StreamJob> = kube::Api::namespaced(admin_client(cp).await, &ns);
        let read = api.get("stale").await.unwrap();
        let mut fresh = StatusWriter::new(api.clone(), &read);
        let mut stale = StatusWriter::new(api.clone(), &read);
        fresh.status.lifecycle = Some(Lifecycle::Running);
        fresh.save().await.unwrap();
        // the same writer goes on from what it wrote
        fresh.status.job_state = Some("running".into());
        fresh.save().await.unwrap();
        stale.status.lifecycle = Some(Lifecycle::Failed);
        let refused = stale.save().await;
        assert!(
            matches!(refused, Err(freshet_operator::Error::Stale(_))),
            "{refused:?}"
        );
        let st = api.get("stale").await.unwrap().status.unwrap();
        assert_eq!(st.lifecycle, Some(Lifecycle::Running));
        assert_eq!(st.job_state.as_deref(), Some("running"));
    });
}

/// A rescale the running job's state cannot take (a generator's position is bound to the
/// parallelism it ran at) is refused before the job is stopped: the job keeps running, the
/// `UpgradeHalted` condition and an event say why, and fixing the spec lets the rescale
/// through.
#[test]
fn a_rescale_that_cannot_restore_is_refused_before_stopping_the_job() {
    let cp = cluster();
    let t = setup("dry-run", "sales", |sj, _| {
        // the generator follows the job's parallelism
        sj["spec"]["job"]["sources"]["gen"]
            .as_object_mut()
            .unwrap()
            .remove("parallelism");
    });
    let (ns, address) = (&t.ns, &t.address);
    let st = until_running(cp, ns, "sales");
    let job = st["jobId"].clone();
    let job_path = "streamjob/sales";
    until(
        cp,
        60,
        &[
            "-n",
            ns,
            "get",
            job_path,
            "-o",
            "jsonpath={.status.lastCheckpoint.path}",
        ],
        |p| !p.is_empty(),
    );

    cp.kubectl_ok(&["-n", ns, "scale", job_path, "--replicas", "2"]);
    let reason = until(
        cp,
        60,
        &[
            "-n",
            ns,
            "get",
            job_path,
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="UpgradeHalted")].reason}"#,
        ],
        |r| !r.is_empty(),
    );
    assert_eq!(reason, "RestoreCheckFailed");
    let sj = get(cp, ns, "sales");
    let st = &sj["status"];
    let halted = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "UpgradeHalted")
        .unwrap();
    let message = halted["message"].as_str().unwrap();
    assert!(
        message.contains("'gen' ran at parallelism 1") && message.contains("parallelism: 1"),
        "{message}"
    );
    // nothing was stopped: the same job runs, and no savepoint was taken for the rescale
    assert_eq!(st["jobId"], job);
    assert_eq!(st["lifecycle"], "running");
    assert!(st.get("change").is_none(), "{st:#}");
    assert!(
        st.get("savepoints")
            .is_none_or(|s| s.as_array().unwrap().is_empty()),
        "{st:#}"
    );
    assert_eq!(jobs_in(address, "running"), 1);
    let described = cp.kubectl_ok(&["-n", ns, "describe", job_path]);
    assert!(described.contains("UpgradeHalted"), "{described}");

    // a generator with a fixed parallelism lets the keyed part rescale
    patch(
        cp,
        ns,
        "sales",
        json!({"job": {"sources": {"gen": {"parallelism": 1}}}}),
    );
    let st = until_running(cp, ns, "sales");
    assert_eq!(st["deployed"]["parallelism"], 2, "{st:#}");
    assert_eq!(st["deployed"]["startedWith"], "savepoint", "{st:#}");
    assert_ne!(st["jobId"], job);
}

/// A final savepoint that fails keeps the StreamJob (and its running job) and says why;
/// `deletionPolicy: none` then lets it go without one.
#[test]
fn a_failed_final_savepoint_keeps_the_stream_job_until_the_policy_says_otherwise() {
    let cp = cluster();
    let t = setup("deletion", "keep", |sj, dir| {
        // savepoints cannot be written under a regular file
        std::fs::write(dir.join("blocker"), b"").unwrap();
        let blocked = dir.join("blocker/savepoints").display().to_string();
        sj["spec"]["savepoints"] = json!({ "directory": blocked });
    });
    let (ns, address) = (&t.ns, &t.address);
    until_running(cp, ns, "keep");
    cp.kubectl_ok(&["-n", ns, "delete", "streamjob/keep", "--wait=false"]);
    until(
        cp,
        60,
        &[
            "-n",
            ns,
            "get",
            "events",
            "--field-selector",
            "reason=FinalSavepointFailed",
            "-o",
            "name",
        ],
        |names| !names.trim().is_empty(),
    );
    // still there, being deleted, and its job still runs
    let sj = get(cp, ns, "keep");
    assert!(sj["metadata"]["deletionTimestamp"].is_string(), "{sj:#}");
    assert_eq!(jobs_in(address, "running"), 1);
    let failed = sj["status"]["savepoints"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (failed["trigger"].as_str(), failed["state"].as_str()),
        (Some("delete"), Some("failed")),
        "{failed}"
    );

    patch(cp, ns, "keep", json!({"deletionPolicy": "none"}));
    cp.kubectl_ok(&[
        "-n",
        ns,
        "wait",
        "--for=delete",
        "streamjob/keep",
        "--timeout=90s",
    ]);
    let note = events(cp, ns, "Deleted");
    assert!(note.contains("deletionPolicy none"), "{note}");
}

/// Waits until `done` holds for the StreamJob's status (at most `secs`): the status.
fn until_status(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = get(cp, ns, name)["status"].clone();
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "not reached: {st:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The messages of the StreamJob events with `reason` in `ns`.
fn events(cp: &ControlPlane, ns: &str, reason: &str) -> String {
    cp.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "events",
        "--field-selector",
        &format!("reason={reason}"),
        "-o",
        "jsonpath={.items[*].message}",
    ])
}

/// Real: the control plane, kubectl, the operator with the chart's identity, a JobManager and a
/// TaskManager process (4 slots) standing in for the pods. An upgrade to parallelism 8 cannot
/// get its slots, as when new TaskManager pods never start: its job waits, never proving
/// itself, and the operator rolls back to the spec that ran before, from the upgrade's
/// savepoint; the failed spec is not tried again until it changes.
#[test]
fn an_upgrade_whose_job_does_not_prove_itself_is_rolled_back() {
    let cp = cluster();
    let t = setup("rollback", "views", |sj, _| {
        sj["spec"]["rollback"] = json!({"timeout": "15s"});
    });
    let (ns, address) = (&t.ns, &t.address);
    until_running(cp, ns, "views");
    // the first deployment proves itself with a checkpoint: its spec is the stable one
    let st = until_status(cp, ns, "views", 60, |st| {
        st["deployed"]["verified"].is_string() && st["stable"]["generation"] == 1
    });
    let first = st["jobId"].clone();

    patch(
        cp,
        ns,
        "views",
        json!({"parallelism": 8, "taskManagers": {"slots": 8}}),
    );
    let st = until_status(cp, ns, "views", 120, |st| {
        st["deployed"]["startedWith"] == "rollback" && st["jobState"] == "running"
    });
    let upgrade = st["savepoints"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|s| s["trigger"] == "upgrade")
        .unwrap()
        .clone();
    assert_eq!(upgrade["state"], "completed", "{st:#}");
    // generation 1 runs again, from the savepoint the upgrade stopped the old job with
    assert_eq!(st["deployed"]["generation"], 1, "{st:#}");
    assert_eq!(st["deployed"]["parallelism"], 1, "{st:#}");
    assert_eq!(st["parallelism"], 1, "{st:#}");
    assert_eq!(st["deployed"]["restoredFrom"], upgrade["path"], "{st:#}");
    assert_ne!(st["jobId"], first);
    assert!(st.get("change").is_none(), "{st:#}");
    let halted = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "UpgradeHalted")
        .unwrap()
        .clone();
    assert_eq!(halted["reason"], "RolledBack", "{halted}");
    let message = halted["message"].as_str().unwrap();
    assert!(
        message.contains("generation 2 did not prove itself")
            && message.contains("did not complete a checkpoint within 15 s")
            && message.contains("waiting for 8 free slots"),
        "{message}"
    );
    // the job of the failed upgrade was cancelled; only the rolled-back one runs
    assert_eq!(jobs_in(address, "running"), 1);
    assert_eq!(jobs_in(address, "cancelled"), 1);
    assert_eq!(
        jsonpath(cp, ns, "deployment/views-taskmanager", "{.spec.replicas}"),
        "1"
    );
    let rolled = events(cp, ns, "RolledBack");
    assert!(rolled.contains("generation 1 runs again"), "{rolled:?}");
    let described = cp.kubectl_ok(&["-n", ns, "describe", "streamjob/views"]);
    assert!(described.contains("RolledBack"), "{described}");

    // a savepoint requested now does not retry the failed spec (it changes the generation,
    // not what would be deployed)
    let job = st["jobId"].clone();
    patch(cp, ns, "views", json!({"savepointTriggerNonce": 7}));
    let st = until_status(cp, ns, "views", 60, |st| st["savepointTriggerNonce"] == 7);
    let manual = st["savepoints"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (manual["trigger"].as_str(), manual["state"].as_str()),
        (Some("manual"), Some("completed")),
        "{st:#}"
    );
    assert_eq!(st["jobId"], job, "{st:#}");
    assert_eq!(st["deployed"]["generation"], 1, "{st:#}");

    // a spec that fits is deployed from the rolled-back job, and the halt is cleared
    patch(
        cp,
        ns,
        "views",
        json!({"parallelism": 4, "taskManagers": {"slots": 4}}),
    );
    let st = until_running(cp, ns, "views");
    assert_eq!(st["deployed"]["parallelism"], 4, "{st:#}");
    assert_eq!(st["deployed"]["startedWith"], "savepoint", "{st:#}");
    assert!(
        !st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "UpgradeHalted"),
        "{st:#}"
    );
}

/// The newest completed checkpoint id in the StreamJob's status (0 before the first).
fn checkpoint_id(cp: &ControlPlane, ns: &str, name: &str) -> i64 {
    get(cp, ns, name)["status"]["lastCheckpoint"]["id"]
        .as_i64()
        .unwrap_or(0)
}

/// Real: the control plane, kubectl, the operator with the chart's identity, podman with runc,
/// and the image built from `deploy/Dockerfile` (the binary of this build on a debootstrapped
/// Debian bookworm, see [`image`]); the JobManager (with its high-availability directory) and
/// the TaskManager run as containers of it. Standing in: KWOK's node holds the job's pods
/// (reported running; their containers are the test's), and the test restarts a killed
/// container as a kubelet would. A TaskManager container killed with `podman kill` mid-stream:
/// the job restarts from its latest checkpoint once the container is back; the JobManager
/// container killed: it resumes the same job from its high-availability directory.
#[test]
fn the_image_runs_the_job_in_containers_that_survive_podman_kill() {
    let cp = cluster();
    let ns = namespace(cp, "image");
    let dir = tempfile::tempdir().unwrap();
    // the containers run as the image's user (10001): the job's storage must be theirs to write
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let address = format!("127.0.0.1:{}", common::free_port());
    let ha = dir.path().join("ha");
    let suffix = std::process::id();
    let jm = image::Container::run(
        &format!("freshet-jm-{suffix}"),
        dir.path(),
        &[
            "jobmanager",
            "--listen",
            &address,
            "--ha-dir",
            ha.to_str().unwrap(),
            "--lease",
            "2s",
            "--heartbeat-interval",
            "500ms",
            "--heartbeat-timeout",
            "3s",
        ],
    );
    jm.wait_for("JobManager listening on");
    let tm = image::Container::run(
        &format!("freshet-tm-{suffix}"),
        dir.path(),
        &[
            "taskmanager",
            "--jobmanager",
            &address,
            "--slots",
            "4",
            "--id",
            "taskmanager-0",
        ],
    );
    tm.wait_for("listening on");
    let _op = operator(cp, dir.path(), "operator-0", &ns, &address);
    let mut sj = stream_job(&ns, "orders", dir.path());
    sj["spec"]["image"] = json!(image::freshet_image());
    // the default dead-letter file, under the containers' working directory (a read-only
    // directory there once failed the job)
    sj["spec"]["job"]
        .as_object_mut()
        .unwrap()
        .remove("dead_letter");
    let (ok, out) = apply(cp, &sj);
    assert!(ok, "{out}");
    let st = until_running(cp, &ns, "orders");
    let job = st["jobId"].as_str().unwrap().to_string();
    // the pods name the image and run on KWOK's node
    let pods = cp.kubectl_ok(&[
        "-n",
        &ns,
        "get",
        "pods",
        "-o",
        "jsonpath={range .items[*]}{.spec.nodeName}/{.spec.containers[0].image} {end}",
    ]);
    let expected = format!("{}/{}", controlplane::FAKE_NODE, image::freshet_image());
    assert!(
        pods.split_whitespace().count() == 2 && pods.split_whitespace().all(|p| p == expected),
        "{pods}"
    );
    until_status(cp, &ns, "orders", 60, |st| {
        st["lastCheckpoint"]["id"].as_i64().is_some()
    });

    // the TaskManager container killed: the job loses its slots and waits
    tm.kill();
    // podman reports the kill a moment after it returns
    let deadline = Instant::now() + Duration::from_secs(10);
    while tm.status() != "exited" {
        assert!(Instant::now() < deadline, "still {}", tm.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::job_state(&address, &job).is_some_and(|(s, _)| s == "running") {
        assert!(Instant::now() < deadline, "the job never noticed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = checkpoint_id(cp, &ns, "orders");
    // back: the same job runs again from its latest checkpoint and goes on checkpointing
    tm.start();
    let st = until_status(cp, &ns, "orders", 120, |st| {
        st["jobState"] == "running" && st["lastCheckpoint"]["id"].as_i64() > Some(before)
    });
    assert_eq!(st["jobId"], json!(job));
    let (state, restarts) = common::job_state(&address, &job).unwrap();
    assert_eq!(state, "running");
    assert!(restarts >= 1, "restarts: {restarts}");
    let redeployed = jm.logs();
    assert!(
        redeployed
            .lines()
            .any(|l| l.contains("deploying") && !l.contains("attempt=0") && l.contains("chk-")),
        "the job was not redeployed from a checkpoint:\n{redeployed}"
    );

    // the JobManager container killed and started again: it resumes the job it had
    jm.kill();
    let before = checkpoint_id(cp, &ns, "orders");
    jm.start();
    let st = until_status(cp, &ns, "orders", 120, |st| {
        st["jobState"] == "running" && st["lastCheckpoint"]["id"].as_i64() > Some(before)
    });
    assert_eq!(st["jobId"], json!(job), "{st:#}");

    // what the job wrote through it all: the latest value of each of the 16 keys
    let out = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap_or_default();
    let keys: std::collections::BTreeSet<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["k"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(keys, (0..16).collect(), "{out}");
    // KWOK's node stayed ready all along
    let ready = cp.kubectl_ok(&[
        "get",
        "node",
        controlplane::FAKE_NODE,
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
    ]);
    assert_eq!(ready, "True");
}

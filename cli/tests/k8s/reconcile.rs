//! Reconcile flows of the Kubernetes operator, one reconcile at a time: the test calls
//! `freshet_operator::reconcile` itself, so it can step passes and hand one a stale copy, while
//! the Kubernetes API is the real one ([`crate::controlplane`]; each test in a namespace of its
//! own, with the admin's credentials; `main.rs` runs the operator as a process with the
//! chart's identity instead). Nothing runs the pods the operator's Deployments describe: a real
//! JobManager and TaskManager pair, started here as processes on loopback, stands in for them,
//! and the operator talks to it over its gRPC control plane as it would to the JobManager
//! Service. Checkpoints and savepoints go to a local directory.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{self, Proc};
use freshet_crds::{
    ChangeKind, ChangePhase, Lifecycle, SavepointState, SavepointTrigger, StreamJob,
    StreamJobStatus,
};
use freshet_operator::{Context, reconcile};

/// A JobManager and a TaskManager with 4 slots, as processes.
struct Pods {
    _jm: Proc,
    _tm: Proc,
    address: String,
}

fn pods() -> Pods {
    pods_with("127.0.0.1:0", &[], &[])
}

/// The pods on `listen`, with `jm_extra` and `tm_extra` arguments.
fn pods_with(listen: &str, jm_extra: &[String], tm_extra: &[String]) -> Pods {
    let (jm, tm, address) = crate::pods_with(listen, jm_extra, tm_extra);
    Pods {
        _jm: jm,
        _tm: tm,
        address,
    }
}

/// One operator instance: a context over `client`, reaching the test's JobManager.
fn operator(client: &Client, address: &str) -> Arc<Context> {
    let address = address.to_string();
    Arc::new(Context {
        client: client.clone(),
        jobmanager: Arc::new(move |_| address.clone()),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "freshet-operator".into(),
                instance: Some("test".into()),
            },
        ),
        poll: Duration::from_millis(200),
        retry: Duration::from_millis(200),
        failures: Default::default(),
        metrics: Default::default(),
        otlp: None,
    })
}

/// A client of the shared control plane (as its admin) and a new namespace `ns` for one test.
async fn real_api(ns: &str) -> (Client, String) {
    let cp = crate::cluster();
    let ns = crate::namespace(cp, ns);
    (crate::admin_client(cp).await, ns)
}

/// The pods, a scratch directory, and a harness over a new StreamJob `name` (its spec adjusted
/// by `edit`) in a namespace of its own.
async fn setup(
    name: &str,
    edit: impl FnOnce(&mut Value, &std::path::Path),
) -> (Pods, tempfile::TempDir, Harness) {
    let pods = pods();
    let dir = tempfile::tempdir().unwrap();
    let (client, ns) = real_api(&format!("step-{name}")).await;
    let mut sj = crate::stream_job(&ns, name, dir.path());
    edit(&mut sj, dir.path());
    let h = Harness::create(&client, &ns, &pods.address, sj).await;
    (pods, dir, h)
}

struct Harness {
    client: Client,
    ns: String,
    api: Api<StreamJob>,
    ctx: Arc<Context>,
    name: String,
    address: String,
    /// How the test reaches the JobManager itself.
    access: freshet_operator::jm::Access,
}

impl Harness {
    async fn create(client: &Client, ns: &str, address: &str, sj: Value) -> Harness {
        let api: Api<StreamJob> = Api::namespaced(client.clone(), ns);
        let sj: StreamJob = serde_json::from_value(sj).unwrap();
        let name = sj.name_any();
        api.create(&PostParams::default(), &sj).await.unwrap();
        Harness {
            client: client.clone(),
            ns: ns.into(),
            api,
            ctx: operator(client, address),
            name,
            address: address.into(),
            access: Default::default(),
        }
    }

    async fn get(&self) -> StreamJob {
        self.api.get(&self.name).await.unwrap()
    }

    fn status(sj: &StreamJob) -> StreamJobStatus {
        sj.status.clone().unwrap_or_default()
    }

    /// One reconcile pass, as the controller would run it.
    async fn step(&self) {
        let sj = self.get().await;
        if let Err(e) = reconcile(Arc::new(sj), self.ctx.clone()).await {
            eprintln!("reconcile error (retried): {e}");
        }
    }

    /// Reconciles until `done` holds for the StreamJob (at most 90 s).
    async fn until(&self, what: &str, done: impl Fn(&StreamJob) -> bool) -> StreamJob {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            self.step().await;
            let sj = self.get().await;
            if done(&sj) {
                return sj;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not reached; status: {}",
                serde_json::to_string_pretty(&sj.status).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reconciles until the job runs the spec's generation on the JobManager.
    async fn until_running(&self, what: &str) -> StreamJob {
        self.until(what, |sj| {
            let s = Self::status(sj);
            s.lifecycle == Some(Lifecycle::Running)
                && s.job_state.as_deref() == Some("running")
                && s.change.is_none()
                && s.deployed.as_ref().map(|d| d.generation) == sj.metadata.generation
        })
        .await
    }

    async fn patch_spec(&self, spec: Value) {
        self.api
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    /// The job as its JobManager reports it.
    async fn job(&self, id: &str) -> freshet_proto::JobInfo {
        let jm = freshet_operator::jm::JobManager::connect(&self.address, &self.access)
            .await
            .unwrap();
        jm.job(id).await.unwrap().unwrap()
    }

    async fn deployment(&self, suffix: &str) -> Deployment {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.ns);
        api.get(&format!("{}-{suffix}", self.name)).await.unwrap()
    }
}

fn replicas(d: &Deployment) -> i32 {
    d.spec.as_ref().unwrap().replicas.unwrap()
}

/// Savepoints of StreamJob `ns/name` stored under the test's directory (with their metadata).
fn stored(dir: &std::path::Path, ns: &str, name: &str) -> usize {
    std::fs::read_dir(dir.join(format!("state/savepoints/{ns}/{name}")))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("_metadata").exists())
        .count()
}

/// Condition `kind` of a status, if set.
fn condition(
    st: &StreamJobStatus,
    kind: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    st.conditions.iter().find(|c| c.type_ == kind).cloned()
}

/// True if condition `kind` has `status` ("True" / "False").
fn condition_is(sj: &StreamJob, kind: &str, status: &str) -> bool {
    condition(&Harness::status(sj), kind).is_some_and(|c| c.status == status)
}

fn has_metadata(path: &str) -> bool {
    std::path::Path::new(path).join("_metadata").exists()
}

/// Security is on unless turned off: the operator makes a CA, a certificate and a token as
/// Secrets owned by the StreamJob, mounts them into the pods with the flags that use them, and
/// reaches the JobManager with them (the pods here are processes given the Secrets' files),
/// through a first deployment and an upgrade with a savepoint. A Secret the spec names must
/// exist; the operator waits for it and never makes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_is_on_by_default_with_secrets_the_operator_makes() {
    use k8s_openapi::api::core::v1::Secret;
    let dir = tempfile::tempdir().unwrap();
    let (client, ns) = real_api("step-secure").await;
    let address = format!("127.0.0.1:{}", common::free_port());
    let mut sj = crate::stream_job(&ns, "secure", dir.path());
    sj["spec"].as_object_mut().unwrap().remove("security");
    let mut h = Harness::create(&client, &ns, &address, sj).await;
    // the first pass makes the Secrets and the Deployments; no JobManager answers yet
    h.step().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let tls = secrets.get("secure-tls").await.unwrap();
    let token = secrets.get("secure-token").await.unwrap();
    let uid = h.get().await.uid().unwrap();
    for s in [&tls, &token] {
        assert_eq!(s.owner_references()[0].uid, uid);
    }
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    let files = dir.path().join("tls");
    std::fs::create_dir_all(&files).unwrap();
    for (secret, key) in [
        (&tls, "ca.crt"),
        (&tls, "tls.crt"),
        (&tls, "tls.key"),
        (&token, "token"),
    ] {
        let bytes = &secret.data.as_ref().unwrap()[key].0;
        std::fs::write(files.join(key), bytes).unwrap();
    }
    let token_text = std::fs::read_to_string(files.join("token"))
        .unwrap()
        .trim()
        .to_string();
    assert!(token_text.len() >= 32);
    let args_of = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .args
            .clone()
            .unwrap()
            .join(" ")
    };
    let jm_args = args_of(&h.deployment("jobmanager").await);
    let tm_args = args_of(&h.deployment("taskmanager").await);
    assert!(
        jm_args.contains("--tls-cert /etc/freshet-tls/tls.crt")
            && jm_args.contains("--auth-token-file /etc/freshet-token/token"),
        "{jm_args}"
    );
    assert!(
        tm_args.contains("--tls-ca /etc/freshet-tls/ca.crt") && !tm_args.contains("token"),
        "{tm_args}"
    );
    let tm_pod = h
        .deployment("taskmanager")
        .await
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let volumes = serde_json::to_string(&tm_pod.volumes).unwrap();
    assert!(
        volumes.contains("secure-tls") && !volumes.contains("secure-token"),
        "{volumes}"
    );

    // the pods, as processes with the Secrets' files
    let tls_args = common::tls_args(&files);
    let mut jm_extra = tls_args.clone();
    jm_extra.extend([
        "--auth-token-file".into(),
        files.join("token").display().to_string(),
    ]);
    let _pods = pods_with(&address, &jm_extra, &tls_args);
    h.access = freshet_operator::jm::Access {
        dialer: freshet_security::net::Dialer::new(
            Some(
                freshet_security::Tls::from_pem(
                    &std::fs::read(files.join("ca.crt")).unwrap(),
                    None,
                )
                .unwrap(),
            ),
            Some(freshet_security::INTERNAL_NAME.into()),
        ),
        token: freshet_security::ClientToken::new(Some(&token_text)).unwrap(),
    };
    let sj = h.until_running("first deployment over TLS").await;
    let first = Harness::status(&sj).job_id.unwrap();
    assert_eq!(h.job(&first).await.state, "running");
    // without the token the JobManager refuses
    let plain = freshet_operator::jm::JobManager::connect(&address, &Default::default()).await;
    assert!(plain.is_err() || plain.unwrap().jobs().await.is_err());

    // an upgrade (savepoint, stop, redeploy) over the same channel; the Secrets stay as made
    h.patch_spec(json!({"parallelism": 2})).await;
    let sj = h
        .until("upgraded over TLS", |sj| {
            let s = Harness::status(sj);
            s.lifecycle == Some(Lifecycle::Running)
                && s.deployed.as_ref().map(|d| d.parallelism) == Some(2)
                && s.deployed.as_ref().map(|d| d.started_with.as_str()) == Some("savepoint")
        })
        .await;
    assert_eq!(secrets.get("secure-tls").await.unwrap().data, tls.data);
    let status = serde_json::to_string(&sj.status).unwrap();
    assert!(!status.contains(&token_text), "the token is in the status");

    // a Secret the spec names is waited for, never made
    h.patch_spec(json!({"security": {"tlsSecret": "issued-by-cert-manager"}}))
        .await;
    h.step().await;
    assert!(
        secrets
            .get_opt("issued-by-cert-manager")
            .await
            .unwrap()
            .is_none()
    );
}

/// Create, savepoint on request, upgrade with a savepoint, rescale, suspend and resume,
/// last-state and stateless restarts, and the owner references that make delete clean up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_of_a_stream_job() {
    let (_pods, _dir, h) = setup("clicks", |_, _| {}).await;
    let client = h.client.clone();

    // create: objects applied, job submitted, running
    let sj = h.until_running("first deployment").await;
    let st = Harness::status(&sj);
    let deployed = st.deployed.clone().unwrap();
    assert_eq!(deployed.started_with, "initial");
    assert_eq!(deployed.restored_from, None);
    assert_eq!(st.parallelism, Some(1));
    let uid = sj.uid().unwrap();
    let jm = h.deployment("jobmanager").await;
    let tm = h.deployment("taskmanager").await;
    assert_eq!((replicas(&jm), replicas(&tm)), (1, 1));
    let cm: ConfigMap = Api::namespaced(client.clone(), &h.ns)
        .get("clicks-job")
        .await
        .unwrap();
    let svc: Service = Api::namespaced(client.clone(), &h.ns)
        .get("clicks-jobmanager")
        .await
        .unwrap();
    for owners in [
        jm.owner_references(),
        tm.owner_references(),
        cm.owner_references(),
        svc.owner_references(),
    ] {
        // deleting the StreamJob deletes them: the controller-manager's garbage collector
        // follows these references (see the delete in `main.rs`)
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, uid);
        assert_eq!(owners[0].controller, Some(true));
    }
    assert!(cm.data.unwrap()["job.yaml"].contains("name: clicks"));
    let jm_args = jm.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        jm_args
            .iter()
            .any(|a| a.ends_with(&format!("/ha/{}/clicks", h.ns))),
        "{jm_args:?}"
    );
    let first_job = st.job_id.clone().unwrap();

    // savepoint on request: one pass triggers it and records it as in progress without
    // waiting for it; a later pass records its outcome
    h.patch_spec(json!({"savepointTriggerNonce": 1})).await;
    h.step().await;
    let st = Harness::status(&h.get().await);
    let pending = st
        .savepoint_in_progress
        .clone()
        .expect("a savepoint in progress");
    assert_eq!(
        (pending.trigger, pending.nonce, pending.job_id.as_str()),
        (SavepointTrigger::Manual, Some(1), first_job.as_str())
    );
    assert!(st.savepoints.is_empty() && st.savepoint_trigger_nonce.is_none());
    let sj = h
        .until("manual savepoint", |sj| {
            Harness::status(sj).savepoint_trigger_nonce == Some(1)
        })
        .await;
    let manual = Harness::status(&sj).savepoints.last().cloned().unwrap();
    assert_eq!(manual.trigger, SavepointTrigger::Manual);
    assert_eq!(manual.state, SavepointState::Completed);
    assert_eq!(manual.nonce, Some(1));
    assert!(has_metadata(manual.path.as_deref().unwrap()));
    assert_eq!(
        Harness::status(&sj).job_id.as_deref(),
        Some(first_job.as_str())
    );
    // a controller cache that has not seen the new status yet does not repeat the savepoint
    let mut stale = sj.clone();
    stale.status.as_mut().unwrap().savepoint_trigger_nonce = None;
    stale.status.as_mut().unwrap().savepoints.clear();
    reconcile(Arc::new(stale), h.ctx.clone()).await.unwrap();
    assert_eq!(
        Harness::status(&h.get().await).savepoints,
        vec![manual.clone()]
    );

    // upgrade (a changed job definition) in savepoint mode
    h.patch_spec(json!({"job": {"sources": {"gen": {"connector": {"rows_per_second": 500}}}}}))
        .await;
    let sj = h.until_running("upgrade").await;
    let st = Harness::status(&sj);
    let upgrade = st
        .savepoints
        .iter()
        .rfind(|s| s.trigger == SavepointTrigger::Upgrade)
        .cloned()
        .unwrap();
    assert_eq!(upgrade.state, SavepointState::Completed);
    let deployed = st.deployed.clone().unwrap();
    assert_eq!(deployed.started_with, "savepoint");
    assert_eq!(deployed.restored_from, upgrade.path);
    assert_ne!(st.job_id.as_deref(), Some(first_job.as_str()));
    assert_eq!(
        h.job(&first_job).await.state,
        "finished",
        "the old job stopped"
    );
    let second = h.job(st.job_id.as_deref().unwrap()).await;
    assert_eq!(second.state, "running");
    assert_eq!(Some(second.restored_from.clone()), upgrade.path);

    // rescale (what `kubectl scale` changes): savepoint, redeploy at the new parallelism
    h.patch_spec(json!({"parallelism": 3, "taskManagers": {"slots": 2}}))
        .await;
    let sj = h.until_running("rescale").await;
    let st = Harness::status(&sj);
    assert_eq!(st.parallelism, Some(3));
    let rescaled = h.job(st.job_id.as_deref().unwrap()).await;
    // the keyed operator and the sink now run 3 subtasks, restored from state taken at 1
    let parallelism = |name: &str| {
        rescaled
            .vertices
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.parallelism)
    };
    assert_eq!(
        (parallelism("gen"), parallelism("latest")),
        (Some(1), Some(3))
    );
    let sp = st.savepoints.last().unwrap();
    assert_eq!(sp.trigger, SavepointTrigger::Upgrade);
    assert_eq!(Some(rescaled.restored_from.clone()), sp.path);
    assert_eq!(
        replicas(&h.deployment("taskmanager").await),
        2,
        "3 slots of 2"
    );

    // suspend: stop with a savepoint, pods scaled to zero
    h.patch_spec(json!({"state": "suspended"})).await;
    let sj = h
        .until("suspend", |sj| {
            Harness::status(sj).lifecycle == Some(Lifecycle::Suspended)
        })
        .await;
    let st = Harness::status(&sj);
    assert_eq!(h.job(&rescaled.id).await.state, "finished");
    assert_eq!(replicas(&h.deployment("jobmanager").await), 0);
    assert_eq!(replicas(&h.deployment("taskmanager").await), 0);
    let suspend = st.savepoints.last().cloned().unwrap();
    assert_eq!(suspend.trigger, SavepointTrigger::Suspend);
    assert!(st.deployed.is_none());

    // resume: from the suspend savepoint
    h.patch_spec(json!({"state": "running"})).await;
    let sj = h.until_running("resume").await;
    let st = Harness::status(&sj);
    assert_eq!(st.deployed.as_ref().unwrap().restored_from, suspend.path);
    assert_eq!(replicas(&h.deployment("taskmanager").await), 2);

    // restart in last-state mode: cancelled, restored from the latest checkpoint
    tokio::time::sleep(Duration::from_secs(2)).await; // let it complete a checkpoint
    h.patch_spec(json!({"upgradeMode": "last-state", "restartNonce": 1}))
        .await;
    let sj = h.until_running("last-state restart").await;
    let d = Harness::status(&sj).deployed.unwrap();
    assert_eq!(d.started_with, "last-state");
    let from = d.restored_from.unwrap_or_default();
    assert!(from.contains("/chk-"), "restored from {from:?}");

    // restart in stateless mode: empty state
    h.patch_spec(json!({"upgradeMode": "stateless", "restartNonce": 2}))
        .await;
    let sj = h.until_running("stateless restart").await;
    let d = Harness::status(&sj).deployed.unwrap();
    assert_eq!(d.started_with, "stateless");
    assert_eq!(d.restored_from, None);
}

/// A savepoint that fails halts the upgrade: the old job keeps running, the condition says
/// why, nothing is retried until the spec changes again, and nothing starts from empty state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_savepoint_halts_the_upgrade() {
    // savepoints cannot be written under a regular file
    let (_pods, dir, h) = setup("orders", |sj, dir| {
        let blocker = dir.join("not-a-directory");
        std::fs::write(&blocker, "x").unwrap();
        sj["spec"]["savepoints"] =
            json!({"directory": blocker.join("savepoints").display().to_string()});
    })
    .await;
    let sj = h.until_running("first deployment").await;
    let before = Harness::status(&sj);
    let job = before.job_id.clone().unwrap();

    h.patch_spec(json!({"parallelism": 2})).await;
    let sj = h
        .until("halted upgrade", |sj| {
            condition_is(sj, "UpgradeHalted", "True")
        })
        .await;
    let st = Harness::status(&sj);
    let c = condition(&st, "UpgradeHalted").unwrap();
    assert_eq!(c.reason, "SavepointFailed");
    // the deployed generation as recorded
    let deployed = before.deployed.as_ref().unwrap().generation;
    assert!(
        c.message
            .contains(&format!("keeps running generation {deployed}")),
        "{}",
        c.message
    );
    assert!(st.change.is_none());
    assert_eq!(st.deployed.as_ref().unwrap().generation, deployed);
    let failed = st.savepoints.last().unwrap();
    assert_eq!(
        (failed.trigger, failed.state),
        (SavepointTrigger::Upgrade, SavepointState::Failed)
    );
    // more passes change nothing: the same job keeps running
    for _ in 0..5 {
        h.step().await;
    }
    let st = Harness::status(&h.get().await);
    assert_eq!(st.job_id.as_deref(), Some(job.as_str()));
    assert_eq!(h.job(&job).await.state, "running");
    assert_eq!(
        st.savepoints.len(),
        1,
        "no retry while the spec is unchanged"
    );
    assert_eq!(st.lifecycle, Some(Lifecycle::Running));

    // fixing the savepoint directory (a new generation) lets the upgrade through
    h.patch_spec(
        json!({"savepoints": {"directory": dir.path().join("savepoints").display().to_string()}}),
    )
    .await;
    let sj = h.until_running("upgrade after the fix").await;
    let st = Harness::status(&sj);
    assert_eq!(st.parallelism, Some(2));
    assert_eq!(st.deployed.as_ref().unwrap().started_with, "savepoint");
    assert!(condition(&st, "UpgradeHalted").is_none());
}

/// An operator that stops in the middle of an upgrade (here: while the JobManager takes the
/// stop-with-savepoint) is replaced by a new one, which finishes the upgrade from the status
/// and the job's savepoint history, without a second savepoint or an empty start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restart_mid_upgrade_resumes_it() {
    let (pods, _dir, h) = setup("payments", |_, _| {}).await;
    let client = h.client.clone();
    let sj = h.until_running("first deployment").await;
    let old_job = Harness::status(&sj).job_id.unwrap();

    h.patch_spec(json!({"parallelism": 2})).await;
    // the first operator starts the upgrade and is stopped once the JobManager is taking the
    // savepoint
    let first = {
        let sj = h.get().await;
        let ctx = h.ctx.clone();
        tokio::spawn(async move { reconcile(Arc::new(sj), ctx).await })
    };
    let jm = freshet_operator::jm::JobManager::connect(&pods.address, &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snaps = jm.snapshots(&old_job).await.unwrap();
        if snaps.iter().any(|s| s.kind == "savepoint") {
            break;
        }
        assert!(Instant::now() < deadline, "no savepoint started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    let _ = first.await;
    let st = Harness::status(&h.get().await);
    let change = st
        .change
        .clone()
        .expect("the change is recorded before its first step");
    assert_eq!(change.phase, ChangePhase::Stopping);

    // a new operator instance carries on
    let second = Harness {
        client: client.clone(),
        ns: h.ns.clone(),
        api: h.api.clone(),
        ctx: operator(&client, &pods.address),
        name: h.name.clone(),
        address: pods.address.clone(),
        access: Default::default(),
    };
    let sj = second.until_running("upgrade by the second operator").await;
    let st = Harness::status(&sj);
    let savepoints: Vec<_> = st
        .savepoints
        .iter()
        .filter(|s| s.trigger == SavepointTrigger::Upgrade)
        .collect();
    assert_eq!(savepoints.len(), 1, "one savepoint: {savepoints:?}");
    assert_eq!(savepoints[0].state, SavepointState::Completed);
    let d = st.deployed.unwrap();
    assert_eq!(d.restored_from, savepoints[0].path);
    assert_eq!(d.parallelism, 2);
    assert_eq!(h.job(&old_job).await.state, "finished");
}

/// A job definition the engine refuses is reported on the resource, naming the problem, and
/// nothing is deployed; on a running job, such a change leaves the job running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_job_is_reported_and_deploys_nothing() {
    let (_pods, _dir, h) = setup("bad", |sj, _| {
        sj["spec"]["job"]["sinks"]["out"]["input"] = json!("nowhere");
    })
    .await;
    let client = h.client.clone();
    let sj = h
        .until("invalid spec reported", |sj| {
            Harness::status(sj).lifecycle == Some(Lifecycle::Failed)
        })
        .await;
    let st = Harness::status(&sj);
    let c = condition(&st, "SpecValid").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(c.message.contains("nowhere"), "{}", c.message);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &h.ns);
    assert!(
        deployments
            .get_opt("bad-jobmanager")
            .await
            .unwrap()
            .is_none()
    );

    // fixed: deployed; then broken again: the running job is left alone
    h.patch_spec(json!({"job": {"sinks": {"out": {"input": "latest"}}}}))
        .await;
    let sj = h.until_running("fixed").await;
    let job = Harness::status(&sj).job_id.unwrap();
    h.patch_spec(json!({"job": {"sinks": {"out": {"input": "nowhere"}}}}))
        .await;
    let sj = h
        .until("invalid change reported", |sj| {
            condition_is(sj, "SpecValid", "False")
        })
        .await;
    let st = Harness::status(&sj);
    assert_eq!(st.job_id.as_deref(), Some(job.as_str()));
    assert!(st.change.is_none());
    assert_eq!(h.job(&job).await.state, "running");
}

/// Two operator replicas: one leads, the other waits; when the leader stops renewing, the
/// other takes over, and the old leader learns it lost.
#[tokio::test]
async fn only_one_operator_replica_leads() {
    use freshet_operator::leader::Elector;
    use k8s_openapi::api::coordination::v1::Lease;
    let (client, ns) = real_api("step-leases").await;
    let leases: Api<Lease> = Api::namespaced(client, &ns);
    let lease = Duration::from_secs(1);
    let mut a = Elector::new(leases.clone(), "freshet-operator", "a", lease);
    let mut b = Elector::new(leases.clone(), "freshet-operator", "b", lease);
    assert!(a.try_lead().await.unwrap());
    assert!(!b.try_lead().await.unwrap());
    // a renews: b still waits, however long
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(a.try_lead().await.unwrap());
        assert!(!b.try_lead().await.unwrap());
    }
    // a stops renewing: b takes the lease once it saw no renewal for a whole lease
    let started = Instant::now();
    while !b.try_lead().await.unwrap() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "b never took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= lease, "taken before the lease lapsed");
    assert!(!a.try_lead().await.unwrap(), "a must see it lost");
    let l = leases.get("freshet-operator").await.unwrap();
    let spec = l.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

/// Savepoints on a schedule, and the history kept to `maxCount` and `maxAge`: savepoints
/// dropped from it are deleted from storage, the newest completed one never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_savepoints_and_history_cleanup() {
    let (_pods, dir, h) = setup("sessions", |sj, _| {
        sj["spec"]["savepoints"] = json!({"interval": "1h", "maxCount": 2});
    })
    .await;
    let client = h.client.clone();
    h.until_running("first deployment").await;

    // three requested savepoints: the history keeps the newest two
    let mut first = None;
    for nonce in 1..=3 {
        h.patch_spec(json!({"savepointTriggerNonce": nonce})).await;
        let sj = h
            .until("manual savepoint", |sj| {
                Harness::status(sj).savepoint_trigger_nonce == Some(nonce)
            })
            .await;
        first = first.or(Harness::status(&sj).last_savepoint.and_then(|s| s.path));
    }
    let first = first.unwrap();
    assert!(
        !std::path::Path::new(&first).exists(),
        "{first} was not deleted"
    );
    let st = Harness::status(&h.get().await);
    let paths: Vec<String> = st
        .savepoints
        .iter()
        .filter_map(|s| s.path.clone())
        .collect();
    assert_eq!(paths.len(), 2, "{:?}", st.savepoints);
    assert!(paths.iter().all(|p| has_metadata(p)));
    assert_eq!(
        stored(dir.path(), &h.ns, "sessions"),
        2,
        "the dropped savepoint was deleted"
    );
    assert_eq!(
        st.last_savepoint.as_ref().unwrap().path.as_ref(),
        paths.last()
    );

    // an hour passes (the status says the last periodic savepoint was two hours ago)
    let two_hours_ago = k8s_openapi::jiff::Timestamp::now() - std::time::Duration::from_secs(7200);
    h.api
        .patch_status(
            &h.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"lastPeriodicSavepoint": two_hours_ago.to_string()}})),
        )
        .await
        .unwrap();
    let sj = h
        .until("periodic savepoint", |sj| {
            Harness::status(sj)
                .savepoints
                .iter()
                .any(|s| s.trigger == SavepointTrigger::Periodic)
        })
        .await;
    let st = Harness::status(&sj);
    assert_eq!(st.savepoints.len(), 2);
    assert_eq!(
        st.savepoints.last().unwrap().trigger,
        SavepointTrigger::Periodic
    );
    // and not again at once
    for _ in 0..3 {
        h.step().await;
    }
    let again = Harness::status(&h.get().await);
    assert_eq!(again.savepoints, st.savepoints);

    // maxAge: everything older goes, except the newest completed savepoint
    h.patch_spec(json!({"savepoints": {"maxAge": "1s"}})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sj = h
        .until("history trimmed by age", |sj| {
            Harness::status(sj).savepoints.len() == 1
        })
        .await;
    let st = Harness::status(&sj);
    let kept = st.savepoints[0].path.clone().unwrap();
    assert_eq!(
        Some(&kept),
        st.last_savepoint.as_ref().unwrap().path.as_ref()
    );
    assert!(has_metadata(&kept));
    assert_eq!(stored(dir.path(), &h.ns, "sessions"), 1);

    // each step was announced with an event
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &h.ns);
    let reasons: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for r in [
        "Created",
        "JobSubmitted",
        "SavepointCompleted",
        "SavepointsDeleted",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }
}

/// An upgrade whose new deployment never gets its job submitted (its JobManager never answers,
/// as when the new image cannot be pulled and the old pod is already gone) is rolled back once
/// `spec.rollback.timeout` has passed: the stable spec runs again from the savepoint the
/// upgrade stopped the old job with. The stuck deployment is what an operator leaves while it
/// waits for the new JobManager: the old job stopped with a savepoint (taken here through the
/// JobManager, as the stop step takes it) and `status.change` in phase `deploying` for a
/// minute, written as that operator would have; a pass reaching no JobManager then starts the
/// rollback, and passes reaching the JobManager again carry it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_whose_jobmanager_never_answers_is_rolled_back() {
    let (pods, dir, h) = setup("stuck", |sj, _| {
        sj["spec"]["rollback"] = json!({"timeout": "2s"});
    })
    .await;
    h.until_running("first deployment").await;
    let sj = h
        .until("first deployment proved", |sj| {
            Harness::status(sj).stable.is_some()
        })
        .await;
    let old_job = Harness::status(&sj).job_id.unwrap();

    // the old job stopped with a savepoint
    let jm = freshet_operator::jm::JobManager::connect(&pods.address, &Default::default())
        .await
        .unwrap();
    let savepoints = dir.path().join("stop-savepoints");
    let id = jm
        .trigger_savepoint(&old_job, savepoints.to_str().unwrap(), true)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let path = loop {
        let snaps = jm.snapshots(&old_job).await.unwrap();
        if let Some(s) = snaps
            .iter()
            .find(|s| s.id == id && s.completed("savepoint"))
        {
            break s.path.clone().unwrap();
        }
        assert!(Instant::now() < deadline, "no savepoint: {snaps:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // the new spec, and the change waiting for its JobManager since a minute ago
    h.patch_spec(json!({"job": {"sources": {"gen": {"connector": {"rows_per_second": 300}}}}}))
        .await;
    let generation = h.get().await.metadata.generation.unwrap();
    let a_minute_ago =
        (k8s_openapi::jiff::Timestamp::now() - std::time::Duration::from_secs(60)).to_string();
    h.api
        .patch_status(
            &h.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {
                "lifecycle": "upgrading",
                "change": {
                    "kind": "upgrade", "generation": generation, "specHash": "-",
                    "mode": "savepoint", "phase": "deploying", "savepoint": path,
                    "started": a_minute_ago, "deploying": a_minute_ago
                }
            }})),
        )
        .await
        .unwrap();

    // a pass that reaches no JobManager starts the rollback
    let unreachable = Harness {
        client: h.client.clone(),
        ns: h.ns.clone(),
        api: h.api.clone(),
        ctx: operator(&h.client, "127.0.0.1:1"),
        name: h.name.clone(),
        address: "127.0.0.1:1".into(),
        access: Default::default(),
    };
    unreachable.step().await;
    let st = Harness::status(&unreachable.get().await);
    let change = st.change.clone().expect("a rollback under way");
    assert_eq!(
        (change.kind, change.savepoint.as_deref()),
        (ChangeKind::Rollback, Some(path.as_str()))
    );
    let halted = condition(&st, "UpgradeHalted").unwrap();
    assert_eq!(halted.reason, "RolledBack");
    assert!(
        halted.message.contains(&format!(
            "generation {generation} did not prove itself: its job was not submitted within 2 s"
        )),
        "{}",
        halted.message
    );

    // the JobManager back: the stable spec runs from the upgrade's savepoint
    let sj = h
        .until("rolled back", |sj| {
            let s = Harness::status(sj);
            s.change.is_none()
                && s.job_state.as_deref() == Some("running")
                && s.deployed.as_ref().map(|d| d.started_with.as_str()) == Some("rollback")
        })
        .await;
    let st = Harness::status(&sj);
    let deployed = st.deployed.clone().unwrap();
    assert_eq!(deployed.generation, 1);
    assert_eq!(deployed.restored_from.as_deref(), Some(path.as_str()));
    let job = st.job_id.clone().unwrap();
    assert_ne!(job, old_job);
    assert_eq!(h.job(&job).await.restored_from, path);
    // and the failed spec is not tried again while it stays as it is
    for _ in 0..5 {
        h.step().await;
    }
    let st = Harness::status(&h.get().await);
    assert_eq!(st.job_id.as_deref(), Some(job.as_str()));
    assert!(st.change.is_none());
}

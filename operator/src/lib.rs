//! The Kubernetes operator: reconciles `StreamJob` resources into a JobManager, TaskManagers
//! and a running job, and carries the job safely over changes (see
//! [`reconcile`](mod@reconcile)).
//!
//! - [`settings`]: what a spec means for the job (storage locations, overrides, hash).
//! - [`resources`]: the Deployments, Service and ConfigMap a StreamJob runs as.
//! - [`podtemplate`]: merging the user's pod template with the generated pods.
//! - [`jm`]: the client of a job's JobManager.
//! - [`reconcile`](mod@reconcile): the reconcile steps (deploy, upgrade, rescale, savepoints,
//!   suspend).
//! - [`report`]: status patches, conditions and events.
//! - [`leader`]: leader election between operator replicas.
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

use freshet_crds::StreamJob;

pub mod jm;
pub mod leader;
pub mod metrics;
pub mod podtemplate;
pub mod reconcile;
pub mod report;
pub mod resources;
pub mod settings;

pub use reconcile::{error_policy, reconcile};

/// Why a reconcile step could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec cannot be deployed as it is.
    #[error("{0}")]
    Spec(String),
    /// The JobManager could not be reached or refused a request.
    #[error("{0}")]
    JobManager(String),
    /// A savepoint failed.
    #[error("savepoint failed: {0}")]
    Savepoint(String),
    /// Something the spec names does not exist (yet): a Secret cert-manager has not issued.
    #[error("{0}")]
    Missing(String),
    /// This replica is no longer the leader.
    #[error("leadership lost: {0}")]
    Leadership(String),
    /// The StreamJob changed since this reconcile read it; its status was not written. Retried
    /// at once from a fresh read.
    #[error("StreamJob {0} changed since it was read; reconciling it again")]
    Stale(String),
    /// The Kubernetes API refused a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Whether the same step, tried again later, can succeed without anyone changing the
    /// StreamJob: yes for an unreachable JobManager, a Secret not issued yet, a failed
    /// savepoint, a stale read and the API server's own trouble (5xx, 429, transport errors);
    /// no for a spec that cannot be deployed, a request the API server refuses as sent (other
    /// 4xx, such as a permission RBAC does not grant) and lost leadership.
    pub fn retryable(&self) -> bool {
        match self {
            Error::JobManager(_) | Error::Savepoint(_) | Error::Missing(_) | Error::Stale(_) => {
                true
            }
            Error::Spec(_) | Error::Leadership(_) => false,
            Error::Kube(kube::Error::Api(s)) => s.code == 409 || s.code == 429 || s.code >= 500,
            Error::Kube(_) => true,
        }
    }
}

/// Time before a StreamJob whose reconcile failed `failures` times in a row is tried again:
/// `base` doubled with each failure, at most [`MAX_BACKOFF`]; an error that retrying cannot
/// fix waits the longest at once (something outside the StreamJob, such as RBAC, may change).
pub fn backoff(base: Duration, failures: u32, retryable: bool) -> Duration {
    if !retryable {
        return MAX_BACKOFF;
    }
    base.saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// The longest pause between two tries of a failing reconcile.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// How to reach a job's JobManager (`host:port`). In a cluster: its Service.
    pub jobmanager: Arc<dyn Fn(&StreamJob) -> String + Send + Sync>,
    /// Publishes events.
    pub recorder: Recorder,
    /// Time between checks of a running job.
    pub poll: Duration,
    /// Time before the next try when a step must wait (pods starting, job stopping) or failed.
    pub retry: Duration,
    /// Reconciles failed in a row, per StreamJob (`namespace/name`), for the backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Reconciles, their duration and failures, by StreamJob.
    pub metrics: Arc<metrics::Metrics>,
    /// Where jobs export telemetry when their spec does not say.
    pub otlp: Option<resources::Otlp>,
}

impl Context {
    /// A context reaching JobManagers at the addresses `template` gives (see
    /// [`Settings::jobmanager_address`]).
    pub fn new(client: Client, identity: &str, template: &str) -> Context {
        let reporter = Reporter {
            controller: "freshet-operator".into(),
            instance: Some(identity.into()),
        };
        let template = template.to_string();
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            jobmanager: Arc::new(move |sj: &StreamJob| jobmanager_address(&template, sj)),
            poll: Duration::from_secs(10),
            retry: Duration::from_secs(5),
            failures: Default::default(),
            metrics: Default::default(),
            otlp: None,
        }
    }
}

/// Operator settings.
pub struct Settings {
    /// Watch StreamJobs of this namespace only; all namespaces if `None`.
    pub namespace: Option<String>,
    /// Namespace of the leader lease.
    pub lease_namespace: String,
    /// Name of the leader lease.
    pub lease_name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Lease duration.
    pub lease_duration: Duration,
    /// Where a job's JobManager is reached: `{name}` and `{namespace}` stand for the
    /// StreamJob's (default [`IN_CLUSTER_JOBMANAGER`]).
    pub jobmanager_address: String,
    /// Where reconciles are counted (the caller serves them).
    pub metrics: Arc<metrics::Metrics>,
    /// The OTLP collector jobs export to when their spec names none.
    pub otlp: Option<resources::Otlp>,
}

/// The JobManager Service of a StreamJob, as an operator inside the cluster reaches it.
pub const IN_CLUSTER_JOBMANAGER: &str = "{name}-jobmanager.{namespace}.svc:6123";

/// `template` with the StreamJob's name and namespace filled in.
pub fn jobmanager_address(template: &str, sj: &StreamJob) -> String {
    template.replace("{name}", &sj.name_any()).replace(
        "{namespace}",
        &sj.namespace().unwrap_or_else(|| "default".into()),
    )
}

/// Runs the operator: waits for the leader lease, then reconciles StreamJobs until leadership
/// is lost (an error: the process exits and its replacement becomes a candidate again).
pub async fn run(client: Client, settings: Settings) -> Result<(), Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &settings.lease_namespace);
    let mut elector = leader::Elector::new(
        leases,
        &settings.lease_name,
        &settings.identity,
        settings.lease_duration,
    );
    info!(identity = %settings.identity, lease = %settings.lease_name, "waiting for the leader lease");
    elector.acquire().await;
    info!("leading; reconciling StreamJobs");
    let (jobs, deployments): (Api<StreamJob>, Api<Deployment>) = match &settings.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let ctx = Arc::new(Context {
        metrics: settings.metrics.clone(),
        otlp: settings.otlp.clone(),
        ..Context::new(client, &settings.identity, &settings.jobmanager_address)
    });
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let why = elector.keep().await;
        let _ = lost_tx.send(why);
    });
    let lost = Arc::new(std::sync::Mutex::new(None));
    let lost_store = lost.clone();
    // only the Deployments the operator made (a change to one wakes its StreamJob)
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=freshet-operator");
    Controller::new(jobs, watcher::Config::default())
        .owns(deployments, owned)
        .graceful_shutdown_on(async move {
            let why = lost_rx
                .await
                .unwrap_or_else(|_| "lease keeper stopped".into());
            warn!(%why, "lost leadership; stopping");
            *lost_store.lock().expect("lost lock") = Some(why);
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "controller");
            }
        })
        .await;
    match lost.lock().expect("lost lock").take() {
        Some(why) => Err(Error::Leadership(why)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> Error {
        Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        })))
    }

    #[test]
    fn errors_say_whether_retrying_helps() {
        for e in [
            Error::JobManager("unreachable".into()),
            Error::Missing("Secret".into()),
            Error::Stale("j".into()),
            api_error(500),
            api_error(503),
            api_error(429),
            api_error(409),
        ] {
            assert!(e.retryable(), "{e:?}");
        }
        for e in [
            Error::Spec("spec.parallelism".into()),
            Error::Leadership("lost".into()),
            api_error(403),
            api_error(422),
        ] {
            assert!(!e.retryable(), "{e:?}");
        }
    }

    #[test]
    fn failing_reconciles_back_off_exponentially_up_to_a_bound() {
        let base = Duration::from_secs(5);
        let delays: Vec<u64> = (1..=8).map(|n| backoff(base, n, true).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(base, u32::MAX, true), MAX_BACKOFF);
        assert_eq!(backoff(base, 1, false), MAX_BACKOFF);
    }
}

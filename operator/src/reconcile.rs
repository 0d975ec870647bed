//! Reconciling one StreamJob: deploy it, carry it over spec changes, take savepoints, report.
//!
//! Each pass reads the StreamJob from the API server (the controller's cache may lag behind
//! the operator's own last write), takes at most one step that changes anything, records the step
//! in the status, and asks to be called again. A change (upgrade, rescale, restart, suspend)
//! is written to `status.change` before its first step and updated after each, so an operator
//! that stops at any point continues it from the status:
//!
//! 1. `stopping`: savepoint mode stops the job with a savepoint (if that fails and the job is
//!    still running, the change halts with the `UpgradeHalted` condition and the job keeps
//!    running the old spec); last-state and stateless cancel it. An operator that restarted
//!    while the stop ran finds the job ended and its savepoint in the job's history.
//! 2. `deploying`: the objects are applied for the new spec and the job is submitted, restoring
//!    the savepoint, the latest checkpoint (last-state), or nothing (stateless). A job already
//!    running on the JobManager under the same name is adopted instead of submitted twice.
//!
//! A deployment is then on probation until its job completes a checkpoint; its spec becomes
//! the stable one. A job on probation that fails, restarts too often or overruns
//! `spec.rollback.timeout` is rolled back: a `rollback` change cancels it and deploys the stable
//! spec from the snapshot the failed deployment restored, and `UpgradeHalted` keeps the failed
//! spec from being tried again until it changes. An upgrade that could not even submit its job
//! within that timeout (its JobManager never answered) is rolled back the same way.
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, error, info, info_span, warn};

use freshet_crds::{
    Change, ChangeKind, ChangePhase, CheckpointRecord, DeletionPolicy, Deployed, DesiredState,
    Lifecycle, PendingSavepoint, RecoveryRecord, SavepointRecord, SavepointState, SavepointTrigger,
    StableSpec, StreamJob, StreamJobSpec, UpgradeMode,
};
use freshet_proto as pb;

use crate::jm::{Access, JobManager, is_terminal};
use crate::report::{MANAGER, StatusWriter, event, millis, now};
use crate::resources::{
    Objects, TOKEN_KEY, objects, security_secrets, taskmanager_selector, tls_secret, token_secret,
};
use crate::settings::{JobSettings, change_target, spec_hash};
use crate::{Context, Error};

/// The trace id of the current reconcile pass, when it is recorded in a trace.
fn trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let c = span.span_context();
    c.is_valid().then(|| c.trace_id().to_string())
}

/// An event's note with the trace it belongs to.
fn with_trace(note: String, trace: Option<&str>) -> String {
    match trace {
        Some(t) => format!("{note} (trace {t})"),
        None => note,
    }
}

/// Reconciles one StreamJob, in a span of its own, and counts the pass in the metrics.
pub async fn reconcile(sj: Arc<StreamJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (ns, name) = (sj.namespace().unwrap_or_default(), sj.name_any());
    let span = info_span!(
        "reconcile",
        trace_id = tracing::field::Empty,
        namespace = %ns,
        name = %name,
        generation = sj.metadata.generation.unwrap_or(0)
    );
    if let Some(id) = span.in_scope(trace_id) {
        span.record("trace_id", id);
    }
    let started = std::time::Instant::now();
    let outcome = pass(&sj, &ctx).instrument(span).await;
    ctx.metrics.record(
        &ns,
        &name,
        started.elapsed(),
        outcome.as_ref().err().map(Error::retryable),
    );
    match outcome {
        Ok(Pass::Next(action)) => {
            ctx.failures
                .lock()
                .expect("failures lock")
                .remove(&object_key(&sj));
            Ok(action)
        }
        Ok(Pass::Gone) => {
            ctx.failures
                .lock()
                .expect("failures lock")
                .remove(&object_key(&sj));
            ctx.metrics.forget(&ns, &name);
            Ok(Action::await_change())
        }
        Err(e) => Err(e),
    }
}

/// What a pass left to do.
enum Pass {
    /// The StreamJob stays: when to look at it again.
    Next(Action),
    /// The StreamJob is gone (or goes once the API server sees its finalizers removed).
    Gone,
}

async fn pass(sj: &StreamJob, ctx: &Context) -> Result<Pass, Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<StreamJob> = Api::namespaced(ctx.client.clone(), &ns);
    // the controller's cache may not have seen the status this operator wrote last: the
    // steps are decided on the object as the API server has it now
    let Some(mut sj) = api.get_opt(&sj.name_any()).await? else {
        return Ok(Pass::Gone);
    };
    let ours = sj.finalizers().iter().any(|f| f == FINALIZER);
    if sj.metadata.deletion_timestamp.is_none() && !ours {
        sj = set_finalizer(&api, &sj, sj.resource_version(), true).await?;
    }
    let mut r = Reconciler {
        sj: &sj,
        ctx,
        generation: sj.metadata.generation.unwrap_or(0),
        w: StatusWriter::new(api.clone(), &sj),
    };
    if sj.metadata.deletion_timestamp.is_some() {
        if !ours {
            return Ok(Pass::Gone);
        }
        return match r.delete().await? {
            Deletion::Done => {
                // after this pass's status writes, whose version it carries
                set_finalizer(&api, &sj, r.w.version(), false).await?;
                Ok(Pass::Gone)
            }
            Deletion::Waiting => Ok(Pass::Next(Action::requeue(ctx.retry))),
            // not tried again at once: it would likely fail again
            Deletion::Failed => Ok(Pass::Next(Action::requeue(FINAL_SAVEPOINT_RETRY))),
        };
    }
    r.run().await.map(Pass::Next)
}

/// The operator's finalizer: a StreamJob being deleted stays until its job was stopped as
/// `deletionPolicy` says.
pub const FINALIZER: &str = "freshet.dev/final-savepoint";

/// Time before a failed final savepoint is tried again.
const FINAL_SAVEPOINT_RETRY: Duration = Duration::from_secs(30);

/// Adds (`on`) or removes the operator's finalizer: a merge patch carrying `version`, the
/// resource version last seen, so it cannot undo a change made meanwhile (refused with
/// [`Error::Stale`]).
async fn set_finalizer(
    api: &Api<StreamJob>,
    sj: &StreamJob,
    version: Option<String>,
    on: bool,
) -> Result<StreamJob, Error> {
    let mut finalizers: Vec<String> = sj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if on {
        finalizers.push(FINALIZER.into());
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": version, "finalizers": finalizers}
    });
    api.patch(
        &sj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|e| match e {
        kube::Error::Api(s) if s.code == 409 => Error::Stale(sj.name_any()),
        e => Error::Kube(e),
    })
}

/// Where the deletion of a StreamJob stands.
enum Deletion {
    /// The job was stopped as `deletionPolicy` says (or none ran): the StreamJob may go.
    Done,
    /// The final savepoint is being taken.
    Waiting,
    /// The final savepoint failed; it is tried again later.
    Failed,
}

/// Where a new job starts.
enum Restore {
    /// From this savepoint or checkpoint.
    Path(String),
    /// From the latest completed checkpoint of the job's checkpoint directory.
    Latest,
    /// With empty state.
    Fresh,
}

struct Reconciler<'a> {
    sj: &'a StreamJob,
    ctx: &'a Context,
    generation: i64,
    w: StatusWriter,
}

impl Reconciler<'_> {
    /// The StreamJob is being deleted: stops its running job as `deletionPolicy` says. Anything
    /// but [`Deletion::Done`], or an error, keeps the finalizer (and so the StreamJob), and a
    /// later pass goes on.
    async fn delete(&mut self) -> Result<Deletion, Error> {
        let kept = |w: &StatusWriter| {
            w.status
                .last_savepoint
                .as_ref()
                .and_then(|s| s.path.clone())
                .map(|p| format!("the latest savepoint is {p}"))
                .unwrap_or_else(|| "there is no savepoint".into())
        };
        let (Some(id), Some(_)) = (self.w.status.job_id.clone(), &self.w.status.deployed) else {
            let note = format!("no job was deployed; {}", kept(&self.w));
            self.event(false, "Deleted", note).await;
            return Ok(Deletion::Done);
        };
        let jm = self.jobmanager().await?;
        let running = jm.job(&id).await?.is_some_and(|j| !is_terminal(&j.state));
        if self.sj.spec.deletion_policy == DeletionPolicy::None {
            let note = format!(
                "deletionPolicy none: job {id} {} without a final savepoint; {}",
                if running { "left running" } else { "ended" },
                kept(&self.w)
            );
            self.event(false, "Deleted", note).await;
            return Ok(Deletion::Done);
        }
        // the final stop-with-savepoint, if one was triggered since the deletion began:
        // looked for on every pass, never waited for
        let since = self
            .sj
            .metadata
            .deletion_timestamp
            .as_ref()
            .map_or(0, millis)
            - 1000;
        let mine = jm
            .snapshots(&id)
            .await?
            .into_iter()
            .rev()
            .find(|s| s.kind == "savepoint" && s.stop && s.trigger_time_ms >= since);
        let failure = match mine {
            Some(s) if s.status == "in_progress" => return Ok(Deletion::Waiting),
            Some(s) if s.completed("savepoint") => {
                let path = s.path.unwrap_or_default();
                // recorded once (a pass whose finalizer removal failed comes here again)
                let recorded = self.w.status.savepoints.iter().any(|r| {
                    r.trigger == SavepointTrigger::Delete && r.path.as_deref() == Some(&path)
                });
                if !recorded {
                    self.record_savepoint(
                        SavepointTrigger::Delete,
                        Ok(path.clone()),
                        None,
                        trace_id(),
                    );
                    self.w.save().await?;
                    self.event(
                        false,
                        "FinalSavepoint",
                        format!("{path} (stopped job {id} before the StreamJob was deleted)"),
                    )
                    .await;
                }
                return Ok(Deletion::Done);
            }
            Some(s)
                if self.w.status.savepoints.iter().any(|r| {
                    r.trigger == SavepointTrigger::Delete
                        && r.state == SavepointState::Failed
                        && millis(&r.time) >= s.trigger_time_ms
                }) =>
            {
                // this failure is recorded: try again
                None
            }
            Some(s) => Some(s.failure.unwrap_or_else(|| "the savepoint failed".into())),
            None => None,
        };
        if failure.is_none() && !running {
            let note = format!("job {id} was not running; {}", kept(&self.w));
            self.event(false, "Deleted", note).await;
            return Ok(Deletion::Done);
        }
        if let Some(m) = failure {
            let message = format!(
                "the final savepoint failed, so the StreamJob is kept and its job {id} keeps running; it is tried again, or set deletionPolicy: none to delete without one: {m}"
            );
            warn!(%message);
            self.record_savepoint(
                SavepointTrigger::Delete,
                Err(message.clone()),
                None,
                trace_id(),
            );
            self.w.save().await?;
            self.event(true, "FinalSavepointFailed", message).await;
            return Ok(Deletion::Failed);
        }
        let directory = JobSettings::of(self.sj)?.savepoints;
        info!(job = %id, "stopping with a final savepoint before the StreamJob is deleted");
        match jm.trigger_savepoint(&id, &directory, true).await {
            Ok(_) => Ok(Deletion::Waiting),
            Err(Error::Savepoint(m)) => {
                let message = format!(
                    "the final savepoint was refused, so the StreamJob is kept and its job {id} keeps running; it is tried again, or set deletionPolicy: none to delete without one: {m}"
                );
                warn!(%message);
                self.record_savepoint(
                    SavepointTrigger::Delete,
                    Err(message.clone()),
                    None,
                    trace_id(),
                );
                self.w.save().await?;
                self.event(true, "FinalSavepointFailed", message).await;
                Ok(Deletion::Failed)
            }
            Err(e) => Err(e),
        }
    }

    async fn run(&mut self) -> Result<Action, Error> {
        self.w.status.selector = Some(taskmanager_selector(&self.sj.name_any()));
        if self.w.status.lifecycle.is_none() {
            self.w.status.lifecycle = Some(Lifecycle::Created);
            self.w.save().await?;
            self.event(false, "Created", "StreamJob accepted".into())
                .await;
        }
        let settings = match JobSettings::of(self.sj) {
            Ok(s) => {
                self.w
                    .condition("SpecValid", true, "Valid", "", self.generation);
                s
            }
            Err(e) => return self.invalid(e).await,
        };
        if let Some(change) = self.w.status.change.clone() {
            return self.continue_change(change, &settings).await;
        }
        let deployed = self.w.status.deployed.clone();
        match (self.sj.spec.state, deployed) {
            (DesiredState::Suspended, None) => {
                self.apply(self.sj, &settings, false).await?;
                self.w.status.lifecycle = Some(Lifecycle::Suspended);
                self.w.status.observed_generation = Some(self.generation);
                self.w.save().await?;
                Ok(Action::await_change())
            }
            (DesiredState::Suspended, Some(_)) => {
                self.start_change(ChangeKind::Suspend, &settings).await
            }
            (DesiredState::Running, None) => self.deploy_first(&settings).await,
            (DesiredState::Running, Some(d)) => {
                let wanted = spec_hash(&self.sj.spec);
                let differs =
                    d.spec_hash != wanted || d.restart_nonce != self.sj.spec.restart_nonce;
                if differs && !self.halted() {
                    return self.start_change(ChangeKind::Upgrade, &settings).await;
                }
                self.observe(&settings).await
            }
        }
    }

    async fn event(&self, warning: bool, reason: &str, note: String) {
        event(&self.ctx.recorder, self.sj, warning, reason, note).await
    }

    async fn jobmanager(&self) -> Result<JobManager, Error> {
        let access = self.access().await?;
        JobManager::connect(&(self.ctx.jobmanager)(self.sj), &access).await
    }

    /// How to reach the JobManager: with the CA and token from the job's Secrets, read each
    /// time (they may have been rotated), or plainly when security is off.
    async fn access(&self) -> Result<Access, Error> {
        let Some(secrets) = security_secrets(self.sj) else {
            return Ok(Access::default());
        };
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.namespace());
        let value = |secret: Option<Secret>, name: &str, key: &str| {
            secret
                .and_then(|s| s.data)
                .and_then(|mut d| d.remove(key))
                .map(|b| b.0)
                .ok_or_else(|| Error::Missing(format!("Secret {name} has no key {key}")))
        };
        let ca = value(
            api.get_opt(&secrets.tls).await?,
            &secrets.tls,
            freshet_security::certs::CA_FILE,
        )?;
        let token = value(
            api.get_opt(&secrets.token).await?,
            &secrets.token,
            TOKEN_KEY,
        )?;
        let bad = |e: freshet_security::Error| Error::Spec(format!("security Secrets: {e}"));
        let tls = freshet_security::Tls::from_pem(&ca, None).map_err(bad)?;
        let token = String::from_utf8_lossy(&token);
        let first = token
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'));
        Ok(Access {
            dialer: freshet_security::net::Dialer::new(
                Some(tls),
                Some(freshet_security::INTERNAL_NAME.into()),
            ),
            token: freshet_security::ClientToken::new(first).map_err(bad)?,
        })
    }

    fn namespace(&self) -> String {
        self.sj.namespace().unwrap_or_else(|| "default".into())
    }

    /// Makes the TLS and token Secrets the operator owns when they do not exist; a Secret the
    /// spec names must exist (it may still be being issued: the step is retried).
    async fn ensure_secrets(&self, sj: &StreamJob) -> Result<(), Error> {
        let Some(secrets) = security_secrets(sj) else {
            return Ok(());
        };
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.namespace());
        for (name, generated, field, make) in [
            (
                &secrets.tls,
                secrets.tls_generated,
                "tlsSecret",
                tls_secret as fn(&StreamJob) -> Result<Secret, Error>,
            ),
            (
                &secrets.token,
                secrets.token_generated,
                "tokenSecret",
                token_secret,
            ),
        ] {
            if api.get_opt(name).await?.is_some() {
                continue;
            }
            if !generated {
                return Err(Error::Missing(format!(
                    "Secret {name} (spec.security.{field}) does not exist"
                )));
            }
            match api.create(&PostParams::default(), &make(sj)?).await {
                Ok(_) => info!(secret = %name, "created"),
                // another replica or an earlier pass made it meanwhile
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The JobManager, or `None` after recording in `Ready` (with `reason`) that it cannot be
    /// reached.
    async fn reach_jobmanager(&mut self, reason: &str) -> Result<Option<JobManager>, Error> {
        match self.jobmanager().await {
            Ok(jm) => Ok(Some(jm)),
            Err(e) => {
                self.w
                    .condition("Ready", false, reason, e.to_string(), self.generation);
                self.w.save().await?;
                Ok(None)
            }
        }
    }

    /// True if a change to the current spec halted (it is retried once the spec changes in any
    /// field but `savepointTriggerNonce`).
    fn halted(&self) -> bool {
        self.w.get_condition("UpgradeHalted").is_some_and(|c| {
            c.status == "True"
                && match &self.w.status.halted_target {
                    Some(t) => *t == change_target(&self.sj.spec),
                    // recorded by an operator that halted changes per generation
                    None => c.observed_generation == Some(self.generation),
                }
        })
    }

    /// The spec cannot be deployed: say why. A deployed job keeps running.
    async fn invalid(&mut self, e: Error) -> Result<Action, Error> {
        let message = e.to_string();
        let changed = self
            .w
            .get_condition("SpecValid")
            .is_none_or(|c| c.status != "False" || c.message != message);
        self.w
            .condition("SpecValid", false, "InvalidSpec", &message, self.generation);
        if self.w.status.deployed.is_none() {
            self.w.status.lifecycle = Some(Lifecycle::Failed);
        }
        self.w.status.observed_generation = Some(self.generation);
        self.w.save().await?;
        if changed {
            self.event(true, "InvalidSpec", message).await;
        }
        Ok(Action::await_change())
    }

    /// Applies the objects of `sj` (this StreamJob, or it with the stable spec for a rollback;
    /// server-side apply, so repeating it changes nothing).
    async fn apply(
        &self,
        sj: &StreamJob,
        settings: &JobSettings,
        running: bool,
    ) -> Result<(), Error> {
        let Objects {
            config,
            service,
            jobmanager,
            taskmanager,
        } = objects(sj, settings, running, self.ctx.otlp.as_ref())?;
        self.ensure_secrets(sj).await?;
        let ns = self.namespace();
        let client = &self.ctx.client;
        let pp = PatchParams::apply(MANAGER).force();
        macro_rules! apply {
            ($obj:expr, $ty:ty) => {{
                let api: Api<$ty> = Api::namespaced(client.clone(), &ns);
                let name = $obj.name_any();
                api.patch(&name, &pp, &Patch::Apply(&$obj)).await?;
            }};
        }
        apply!(config, k8s_openapi::api::core::v1::ConfigMap);
        apply!(service, k8s_openapi::api::core::v1::Service);
        apply!(jobmanager, k8s_openapi::api::apps::v1::Deployment);
        apply!(taskmanager, k8s_openapi::api::apps::v1::Deployment);
        Ok(())
    }

    /// Nothing is deployed and the job should run: its first deployment, or a resume after a
    /// suspend.
    async fn deploy_first(&mut self, settings: &JobSettings) -> Result<Action, Error> {
        let resumed = self.w.status.lifecycle == Some(Lifecycle::Suspended);
        let (restore, started_with) = if resumed {
            match self.sj.spec.upgrade_mode {
                UpgradeMode::Savepoint => match &self.w.status.last_savepoint {
                    Some(sp) if sp.path.is_some() => {
                        (Restore::Path(sp.path.clone().unwrap()), "savepoint")
                    }
                    _ => {
                        let e = Error::Savepoint(
                            "cannot resume in savepoint mode: no completed savepoint is recorded; set upgradeMode: last-state or stateless, or initialSavepointPath".into(),
                        );
                        return self.invalid(e).await;
                    }
                },
                UpgradeMode::LastState => (Restore::Latest, "last-state"),
                UpgradeMode::Stateless => (Restore::Fresh, "stateless"),
            }
        } else {
            match &self.sj.spec.initial_savepoint_path {
                Some(p) => (Restore::Path(p.clone()), "initial"),
                None => (Restore::Fresh, "initial"),
            }
        };
        if !resumed && self.w.status.savepoint_trigger_nonce.is_none() {
            // a nonce present at creation is a starting value, not a request
            self.w.status.savepoint_trigger_nonce = self.sj.spec.savepoint_trigger_nonce;
        }
        self.deploy(self.sj, settings, restore, started_with).await
    }

    /// Applies the objects of `target` (this StreamJob, or it with the stable spec for a
    /// rollback) and submits its job (or adopts it, if this StreamJob's JobManager already
    /// runs it).
    async fn deploy(
        &mut self,
        target: &StreamJob,
        settings: &JobSettings,
        restore: Restore,
        started_with: &str,
    ) -> Result<Action, Error> {
        if self.w.status.lifecycle != Some(Lifecycle::Upgrading) {
            self.w.status.lifecycle = Some(Lifecycle::Deploying);
        }
        self.w.save().await?;
        self.apply(target, settings, true).await?;
        // the JobManager pod may still be starting
        let Some(jm) = self.reach_jobmanager("JobManagerStarting").await? else {
            return Ok(Action::requeue(self.ctx.retry));
        };
        let name = &settings.name;
        // the job this deployment submitted before the operator restarted (an old job being
        // replaced has ended by now, so it is not mistaken for it)
        let adopted = jm
            .jobs()
            .await?
            .into_iter()
            .rfind(|j| j.name == *name && !is_terminal(&j.state));
        let (path, fresh) = match &restore {
            Restore::Path(p) => (p.clone(), false),
            Restore::Latest => (String::new(), false),
            Restore::Fresh => (String::new(), true),
        };
        let info = match adopted {
            Some(j) => {
                info!(job = %j.id, "adopting the job the JobManager already runs");
                j
            }
            None => {
                let submitted = jm
                    .submit(pb::SubmitJobRequest {
                        definition: settings.definition.clone(),
                        overrides: settings.overrides.clone(),
                        base_dir: crate::resources::STATE_DIR.into(),
                        restore: path.clone(),
                        fresh,
                        allow_non_restored_state: target.spec.allow_non_restored_state,
                    })
                    .await;
                match submitted {
                    Ok(j) => j,
                    Err(Error::Spec(m)) => return self.invalid(Error::Spec(m)).await,
                    Err(e) => return Err(e),
                }
            }
        };
        let restored_from = (!info.restored_from.is_empty() && info.restored_from != "-")
            .then(|| info.restored_from.clone())
            .or_else(|| (!path.is_empty()).then_some(path));
        let rollback = started_with == ROLLBACK;
        let generation = match (&self.w.status.stable, rollback) {
            (Some(stable), true) => stable.generation,
            _ => self.generation,
        };
        self.w.status.deployed = Some(Deployed {
            generation,
            spec_hash: spec_hash(&target.spec),
            parallelism: target.spec.parallelism,
            restart_nonce: target.spec.restart_nonce,
            started_with: started_with.into(),
            restored_from: restored_from.clone(),
            time: now(),
            spec: serde_json::to_string(&target.spec).ok(),
            verified: None,
            trace_id: trace_id(),
        });
        self.w.status.job_id = Some(info.id.clone());
        self.w.status.job_state = Some(info.state.clone());
        self.w.status.parallelism = Some(target.spec.parallelism);
        self.w.status.change = None;
        self.w.status.lifecycle = Some(Lifecycle::Deploying);
        self.w.status.observed_generation = Some(self.generation);
        if !rollback {
            // what halted before does not stand in the way of what was just deployed
            self.w.clear_condition("UpgradeHalted");
            self.w.status.halted_target = None;
        }
        self.w.condition(
            "Reconciling",
            false,
            "Deployed",
            format!("job {} submitted ({started_with})", info.id),
            self.generation,
        );
        self.w.save().await?;
        let from = restored_from.unwrap_or_else(|| "empty state".into());
        self.event(
            false,
            "JobSubmitted",
            with_trace(
                format!(
                    "job {} at parallelism {} from {from} ({started_with})",
                    info.id, target.spec.parallelism
                ),
                trace_id().as_deref(),
            ),
        )
        .await;
        if rollback {
            self.event(
                true,
                "RolledBack",
                format!("generation {generation} runs again, from {from}"),
            )
            .await;
        }
        Ok(Action::requeue(self.ctx.retry))
    }

    /// Records a change and takes its first step.
    async fn start_change(
        &mut self,
        kind: ChangeKind,
        settings: &JobSettings,
    ) -> Result<Action, Error> {
        let mode = self.sj.spec.upgrade_mode;
        if kind == ChangeKind::Upgrade
            && let Some(why) = self.restore_refused(settings).await?
        {
            return self.refuse_change(why, settings).await;
        }
        let change = Change {
            kind,
            generation: self.generation,
            spec_hash: spec_hash(&self.sj.spec),
            mode,
            phase: ChangePhase::Stopping,
            savepoint: None,
            started: now(),
            deploying: None,
        };
        let what = match kind {
            ChangeKind::Upgrade => "upgrade",
            ChangeKind::Suspend => "suspend",
            ChangeKind::Rollback => "rollback",
        };
        self.w.status.change = Some(change.clone());
        self.w.status.lifecycle = Some(Lifecycle::Upgrading);
        self.w.condition(
            "Reconciling",
            true,
            "ChangeStarted",
            format!(
                "{what} to generation {} in {} mode",
                self.generation,
                mode.name()
            ),
            self.generation,
        );
        self.w.save().await?;
        self.event(
            false,
            "ChangeStarted",
            format!(
                "{what} to generation {} in {} mode",
                self.generation,
                mode.name()
            ),
        )
        .await;
        self.continue_change(change, settings).await
    }

    /// Why the JobManager would refuse the new spec together with the state of the running job,
    /// asked before that job is stopped. The job's latest completed checkpoint or savepoint
    /// stands in for the savepoint the stop would take (same operators, same parallelism);
    /// without one, only the new plan is checked.
    async fn restore_refused(&self, settings: &JobSettings) -> Result<Option<String>, Error> {
        let Some(id) = self.w.status.job_id.clone() else {
            return Ok(None);
        };
        let jm = self.jobmanager().await?;
        let restore = match self.sj.spec.upgrade_mode {
            UpgradeMode::Stateless => None,
            UpgradeMode::Savepoint | UpgradeMode::LastState => jm
                .snapshots(&id)
                .await?
                .into_iter()
                .rev()
                .find(|s| s.completed("checkpoint") || s.completed("savepoint"))
                .and_then(|s| s.path),
        };
        jm.check(pb::SubmitJobRequest {
            definition: settings.definition.clone(),
            overrides: settings.overrides.clone(),
            base_dir: crate::resources::STATE_DIR.into(),
            restore: restore.unwrap_or_default(),
            fresh: false,
            allow_non_restored_state: self.sj.spec.allow_non_restored_state,
        })
        .await
    }

    /// The new spec cannot take over the running job's state: the change is not started, the
    /// job keeps running, and `UpgradeHalted` says why until the spec changes again.
    async fn refuse_change(
        &mut self,
        why: String,
        settings: &JobSettings,
    ) -> Result<Action, Error> {
        let message = format!(
            "generation {} cannot restore the state of the running job, so it is not deployed and the job keeps running generation {}: {why}",
            self.generation,
            self.w.status.deployed.as_ref().map_or(0, |d| d.generation)
        );
        warn!(%message, "change refused before stopping the job");
        let target = change_target(&self.sj.spec);
        self.halted_because("RestoreCheckFailed", message, self.generation, target)
            .await?;
        self.observe(settings).await
    }

    /// Records that the change to `generation` (whose [`change_target`] is `target`) halted:
    /// the `UpgradeHalted` condition and `haltedTarget` (which keep it from being tried again
    /// until the spec changes), `Reconciling` false, and an event.
    async fn halted_because(
        &mut self,
        reason: &str,
        message: String,
        generation: i64,
        target: String,
    ) -> Result<(), Error> {
        self.w
            .condition("UpgradeHalted", true, reason, &message, generation);
        self.w.status.halted_target = Some(target);
        self.w.condition(
            "Reconciling",
            false,
            "ChangeHalted",
            "see UpgradeHalted",
            self.generation,
        );
        self.w.save().await?;
        self.event(true, "UpgradeHalted", message).await;
        Ok(())
    }

    /// Takes the next step of the change in progress.
    async fn continue_change(
        &mut self,
        mut change: Change,
        settings: &JobSettings,
    ) -> Result<Action, Error> {
        if change.phase == ChangePhase::Stopping {
            match self.stop(&mut change, settings).await? {
                Stop::Done => {
                    change.phase = ChangePhase::Deploying;
                    change.deploying = Some(now());
                    self.w.status.change = Some(change.clone());
                    self.w.save().await?;
                }
                Stop::Wait => return Ok(Action::requeue(self.ctx.retry)),
                Stop::Halted => return Ok(Action::requeue(self.ctx.poll)),
            }
        }
        match change.kind {
            ChangeKind::Suspend => {
                self.apply(self.sj, settings, false).await?;
                self.w.status.deployed = None;
                self.w.status.change = None;
                self.w.status.lifecycle = Some(Lifecycle::Suspended);
                self.w.status.observed_generation = Some(self.generation);
                self.w.condition(
                    "Ready",
                    false,
                    "Suspended",
                    "suspended on request",
                    self.generation,
                );
                self.w.condition(
                    "Reconciling",
                    false,
                    "Suspended",
                    "pods scaled to zero",
                    self.generation,
                );
                self.w.save().await?;
                self.event(
                    false,
                    "Suspended",
                    "job stopped, pods scaled to zero".into(),
                )
                .await;
                Ok(Action::await_change())
            }
            ChangeKind::Upgrade => {
                if let Some(action) = self.deploy_overdue(&change, settings).await? {
                    return Ok(action);
                }
                let restore = match change.mode {
                    UpgradeMode::Savepoint => {
                        Restore::Path(change.savepoint.clone().expect("stopped with a savepoint"))
                    }
                    UpgradeMode::LastState => Restore::Latest,
                    UpgradeMode::Stateless => Restore::Fresh,
                };
                self.deploy(self.sj, settings, restore, change.mode.name())
                    .await
            }
            ChangeKind::Rollback => {
                let Some(stable) = self.stable_job()? else {
                    return Err(Error::Spec(
                        "a rollback is under way but status.stable holds no spec to roll back to"
                            .into(),
                    ));
                };
                let settings = JobSettings::of(&stable)?;
                let restore = match (&change.savepoint, change.mode) {
                    (Some(p), _) => Restore::Path(p.clone()),
                    (None, UpgradeMode::LastState) => Restore::Latest,
                    (None, _) => Restore::Fresh,
                };
                self.deploy(&stable, &settings, restore, ROLLBACK).await
            }
        }
    }

    /// This StreamJob with its stable spec, if one is recorded.
    fn stable_job(&self) -> Result<Option<StreamJob>, Error> {
        let Some(stable) = &self.w.status.stable else {
            return Ok(None);
        };
        let spec: StreamJobSpec = serde_json::from_str(&stable.spec)
            .map_err(|e| Error::Spec(format!("status.stable.spec: {e}")))?;
        let mut sj = self.sj.clone();
        sj.spec = spec;
        Ok(Some(sj))
    }

    /// Stops the deployed job as the change's mode says.
    async fn stop(&mut self, change: &mut Change, settings: &JobSettings) -> Result<Stop, Error> {
        if change.kind == ChangeKind::Rollback {
            return self.cancel_failed(settings).await;
        }
        let Some(id) = self.w.status.job_id.clone() else {
            return Ok(Stop::Done);
        };
        let jm = self.jobmanager().await?;
        let state = jm.job(&id).await?.map(|j| j.state);
        let running = state.as_deref().is_some_and(|s| !is_terminal(s));
        let trigger = match change.kind {
            ChangeKind::Upgrade | ChangeKind::Rollback => SavepointTrigger::Upgrade,
            ChangeKind::Suspend => SavepointTrigger::Suspend,
        };
        match change.mode {
            // the job stops once its savepoint completed: the next job waits until it ended,
            // so the two never compete for slots
            UpgradeMode::Savepoint if change.savepoint.is_some() => {
                Ok(if running { Stop::Wait } else { Stop::Done })
            }
            UpgradeMode::Savepoint => {
                // the stop-with-savepoint of this change, if one was triggered: it is looked
                // for on every pass, never waited for (an operator restarted meanwhile finds
                // it the same way)
                let since = millis(&change.started) - 1000;
                let mine = jm
                    .snapshots(&id)
                    .await?
                    .into_iter()
                    .rev()
                    .find(|s| s.kind == "savepoint" && s.stop && s.trigger_time_ms >= since);
                match mine {
                    Some(s) if s.status == "in_progress" => Ok(Stop::Wait),
                    Some(s) if s.completed("savepoint") => {
                        let path = s.path.unwrap_or_default();
                        self.savepoint_taken(change, trigger, path).await?;
                        Ok(if running { Stop::Wait } else { Stop::Done })
                    }
                    Some(s) => {
                        let m = s.failure.unwrap_or_else(|| "the savepoint failed".into());
                        self.halt(change, trigger, m).await
                    }
                    None if running => {
                        info!(job = %id, "stopping with a savepoint");
                        match jm.trigger_savepoint(&id, &settings.savepoints, true).await {
                            Ok(_) => Ok(Stop::Wait),
                            Err(Error::Savepoint(m)) => self.halt(change, trigger, m).await,
                            Err(e) => Err(e),
                        }
                    }
                    None => {
                        // a JobManager of a version before detached savepoints waited for the
                        // savepoint and does not mark it as a stop: any savepoint completed
                        // since the change began is the one the job stopped with
                        if let Some(path) = jm
                            .snapshots(&id)
                            .await?
                            .into_iter()
                            .rev()
                            .find(|s| s.completed("savepoint") && s.trigger_time_ms >= since)
                            .and_then(|s| s.path)
                        {
                            self.savepoint_taken(change, trigger, path).await?;
                            return Ok(Stop::Done);
                        }
                        let state = state.unwrap_or_else(|| "unknown to the JobManager".into());
                        let m = format!(
                            "the job is {state}, so no savepoint can be taken; set upgradeMode: last-state to start from its latest checkpoint, or stateless to start empty"
                        );
                        self.halt(change, trigger, m).await
                    }
                }
            }
            UpgradeMode::LastState | UpgradeMode::Stateless => {
                if running {
                    info!(job = %id, "cancelling");
                    let after = jm.cancel(&id).await?;
                    if !is_terminal(&after.state) {
                        return Ok(Stop::Wait);
                    }
                }
                Ok(Stop::Done)
            }
        }
    }

    /// The stop step of a rollback: cancels every job of the failed spec's name the JobManager
    /// still runs (its state is the snapshot it restored, and it may not be able to take a
    /// savepoint at all). That includes one submitted by an operator that stopped before
    /// recording it, which the status does not name.
    async fn cancel_failed(&mut self, settings: &JobSettings) -> Result<Stop, Error> {
        let jm = self.jobmanager().await?;
        let mut ended = true;
        for j in jm.jobs().await? {
            if j.name == settings.name && !is_terminal(&j.state) {
                info!(job = %j.id, "cancelling the job of the failed deployment");
                ended &= is_terminal(&jm.cancel(&j.id).await?.state);
            }
        }
        Ok(if ended { Stop::Done } else { Stop::Wait })
    }

    async fn savepoint_taken(
        &mut self,
        change: &mut Change,
        trigger: SavepointTrigger,
        path: String,
    ) -> Result<(), Error> {
        change.savepoint = Some(path.clone());
        self.w.status.change = Some(change.clone());
        self.record_savepoint(trigger, Ok(path.clone()), None, trace_id());
        self.w.save().await?;
        self.event(
            false,
            "SavepointCompleted",
            with_trace(format!("{path} (stopped the job)"), trace_id().as_deref()),
        )
        .await;
        Ok(())
    }

    /// The change cannot go on: it is dropped, and the job keeps running the deployed spec.
    async fn halt(
        &mut self,
        change: &Change,
        trigger: SavepointTrigger,
        message: String,
    ) -> Result<Stop, Error> {
        let message = format!(
            "stop-with-savepoint failed, so generation {} is not deployed and the job keeps running generation {}: {message}",
            change.generation,
            self.w.status.deployed.as_ref().map_or(0, |d| d.generation)
        );
        warn!(%message, "change halted");
        self.record_savepoint(trigger, Err(message.clone()), None, trace_id());
        self.w.status.change = None;
        self.w.status.lifecycle = Some(Lifecycle::Running);
        let target = change_target(&self.sj.spec);
        self.halted_because("SavepointFailed", message, change.generation, target)
            .await?;
        Ok(Stop::Halted)
    }

    /// Adds a savepoint to the history.
    fn record_savepoint(
        &mut self,
        trigger: SavepointTrigger,
        outcome: Result<String, String>,
        nonce: Option<i64>,
        trace_id: Option<String>,
    ) {
        let (state, path, message) = match outcome {
            Ok(p) => (SavepointState::Completed, Some(p), None),
            Err(m) => (SavepointState::Failed, None, Some(m)),
        };
        let record = SavepointRecord {
            trigger,
            state,
            path,
            time: now(),
            message,
            nonce,
            trace_id,
        };
        if state == SavepointState::Completed {
            self.w.status.last_savepoint = Some(record.clone());
        }
        self.w.status.savepoints.push(record);
    }

    /// The job runs the current spec: report its state and checkpoints, take requested and
    /// periodic savepoints, trim the savepoint history.
    async fn observe(&mut self, settings: &JobSettings) -> Result<Action, Error> {
        let Some(id) = self.w.status.job_id.clone() else {
            return self.deploy_first(settings).await;
        };
        if !self.halted() {
            self.w.status.observed_generation = Some(self.generation);
        }
        let Some(jm) = self.reach_jobmanager("JobManagerUnreachable").await? else {
            return Ok(Action::requeue(self.ctx.retry));
        };
        let Some(job) = jm.job(&id).await? else {
            self.w.status.job_state = Some("unknown".into());
            self.w.condition(
                "Ready",
                false,
                "JobUnknown",
                format!("the JobManager does not know job {id}"),
                self.generation,
            );
            self.w.save().await?;
            return Ok(Action::requeue(self.ctx.poll));
        };
        let previous = self.w.status.job_state.replace(job.state.clone());
        let recovered = self
            .w
            .status
            .last_recovery
            .as_ref()
            .filter(|r| r.job_id == id)
            .map_or(0, |r| r.restarts);
        if job.restarts > recovered && job.state == "running" {
            let trace = (!job.trace_id.is_empty()).then(|| job.trace_id.clone());
            let from = (!job.restored_from.is_empty() && job.restored_from != "-")
                .then(|| job.restored_from.clone());
            self.w.status.last_recovery = Some(RecoveryRecord {
                job_id: id.clone(),
                restarts: job.restarts,
                restored_from: from.clone(),
                time: now(),
                trace_id: trace.clone(),
            });
            self.event(
                true,
                "JobRecovered",
                with_trace(
                    format!(
                        "job {id} restarted (restart {}) from {}",
                        job.restarts,
                        from.as_deref().unwrap_or("empty state")
                    ),
                    trace.as_deref(),
                ),
            )
            .await;
        }
        let mut checkpointed = None;
        if let Some(c) = jm
            .snapshots(&id)
            .await?
            .into_iter()
            .rev()
            .find(|s| s.completed("checkpoint"))
        {
            checkpointed = Some(c.trigger_time_ms);
            self.w.status.last_checkpoint = Some(CheckpointRecord {
                id: c.id as i64,
                path: c.path.unwrap_or_default(),
                time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_millisecond(c.trigger_time_ms)
                        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
                ),
            });
        }
        let (lifecycle, ready, reason) = match job.state.as_str() {
            "running" => (Lifecycle::Running, true, "Running"),
            "failed" => (Lifecycle::Failed, false, "JobFailed"),
            "finished" => (Lifecycle::Finished, false, "JobFinished"),
            "cancelled" => (Lifecycle::Failed, false, "JobCancelled"),
            _ => (Lifecycle::Deploying, false, "JobStarting"),
        };
        self.w.status.lifecycle = Some(lifecycle);
        let message = if job.message.is_empty() {
            format!("job {id} is {}", job.state)
        } else {
            format!("job {id} is {}: {}", job.state, job.message)
        };
        self.w
            .condition("Ready", ready, reason, &message, self.generation);
        self.w.save().await?;
        if previous.as_deref() != Some(job.state.as_str()) {
            self.event(job.state == "failed", reason, message).await;
        }
        if let Some(action) = self.probation(&job, checkpointed, settings).await? {
            return Ok(action);
        }
        let mut waiting = false;
        if job.state == "running" || self.w.status.savepoint_in_progress.is_some() {
            waiting = self.requested_savepoints(&jm, &id, settings).await?;
        }
        self.trim_history(&jm).await?;
        // a savepoint in progress is looked at again sooner
        Ok(Action::requeue(if waiting {
            self.ctx.retry
        } else {
            self.ctx.poll
        }))
    }

    /// Ends the probation of the deployed spec once its job proves itself (completes a
    /// checkpoint after it was submitted, or finishes): its spec becomes the stable one. A job
    /// on probation that fails, restarts more than allowed or overruns the timeout is rolled
    /// back to the stable spec, if there is one to go back to and `spec.rollback` allows it.
    async fn probation(
        &mut self,
        job: &pb::JobInfo,
        checkpointed: Option<i64>,
        settings: &JobSettings,
    ) -> Result<Option<Action>, Error> {
        let Some(mut d) = self.w.status.deployed.clone() else {
            return Ok(None);
        };
        if d.verified.is_some() {
            return Ok(None);
        }
        let verdict =
            probation_verdict(job, checkpointed, millis(&d.time), millis(&now()), settings);
        // a deployment recorded before specs were kept with it: the current spec, if it is
        // the one deployed
        let spec = d.spec.clone().or_else(|| {
            (d.spec_hash == spec_hash(&self.sj.spec))
                .then(|| serde_json::to_string(&self.sj.spec).ok())
                .flatten()
        });
        let why = match verdict {
            Verdict::Waiting => return Ok(None),
            Verdict::Proved => {
                d.verified = Some(now());
                if let Some(spec) = spec {
                    self.w.status.stable = Some(StableSpec {
                        generation: d.generation,
                        spec,
                    });
                }
                self.w.status.deployed = Some(d);
                self.w.save().await?;
                return Ok(None);
            }
            Verdict::Failing(why) => why,
        };
        let Some(stable) = self.rollback_to(spec.as_ref()) else {
            // nothing else to go back to: the failing job is reported as it is
            return Ok(None);
        };
        let failed_spec = spec
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_else(|| self.sj.spec.clone());
        // what it restored, or nothing if it started empty
        let mode = match d.restored_from {
            Some(_) => self.sj.spec.upgrade_mode,
            None => UpgradeMode::Stateless,
        };
        self.start_rollback(
            (d.generation, failed_spec),
            stable,
            d.restored_from.clone(),
            mode,
            why,
        )
        .await
        .map(Some)
    }

    /// The stable spec to roll a failed deployment of `failed` (a spec as JSON, if known) back
    /// to: none if `spec.rollback` is off, no spec proved itself yet, or it is the failed one.
    fn rollback_to(&self, failed: Option<&String>) -> Option<StableSpec> {
        let stable = self.w.status.stable.clone()?;
        (self.sj.spec.rollback.enabled && failed != Some(&stable.spec)).then_some(stable)
    }

    /// Records a rollback of `failed` (generation and spec) to `stable`, because of `why`; the
    /// next pass takes its first step. The stable spec restores `restore` (the snapshot the failed
    /// deployment restored or was to restore); with none, the latest checkpoint in last-state
    /// `mode`, else empty state.
    async fn start_rollback(
        &mut self,
        failed: (i64, StreamJobSpec),
        stable: StableSpec,
        restore: Option<String>,
        mode: UpgradeMode,
        why: String,
    ) -> Result<Action, Error> {
        let from = match (&restore, mode) {
            (Some(p), _) => p.clone(),
            (None, UpgradeMode::LastState) => "its latest checkpoint".into(),
            (None, _) => "empty state".into(),
        };
        let message = format!(
            "generation {} did not prove itself: {why}; rolled back to generation {} from {from}",
            failed.0, stable.generation
        );
        warn!(%message, "rolling back");
        let to = self
            .stable_job()?
            .map(|sj| spec_hash(&sj.spec))
            .unwrap_or_default();
        let change = Change {
            kind: ChangeKind::Rollback,
            generation: stable.generation,
            spec_hash: to,
            mode,
            phase: ChangePhase::Stopping,
            savepoint: restore,
            started: now(),
            deploying: None,
        };
        self.w.status.change = Some(change.clone());
        self.w.status.lifecycle = Some(Lifecycle::Upgrading);
        let target = change_target(&failed.1);
        self.halted_because("RolledBack", message, failed.0, target)
            .await?;
        // the next pass takes its first step
        Ok(Action::requeue(self.ctx.retry))
    }

    /// An upgrade whose new deployment has not had its job submitted within
    /// `spec.rollback.timeout` (its JobManager pod never answered, or refused the job) is
    /// rolled back from the snapshot it was to restore.
    async fn deploy_overdue(
        &mut self,
        change: &Change,
        settings: &JobSettings,
    ) -> Result<Option<Action>, Error> {
        let since = millis(change.deploying.as_ref().unwrap_or(&change.started));
        if millis(&now()) - since <= settings.probation_ms {
            return Ok(None);
        }
        let current = serde_json::to_string(&self.sj.spec).ok();
        let Some(stable) = self.rollback_to(current.as_ref()) else {
            return Ok(None);
        };
        let reason = self
            .w
            .get_condition("Ready")
            .filter(|c| c.status == "False")
            .map(|c| c.message.clone())
            .unwrap_or_else(|| "the JobManager did not take the job".into());
        let why = format!(
            "its job was not submitted within {} s (spec.rollback.timeout): {reason}",
            settings.probation_ms / 1000
        );
        let failed = (change.generation, self.sj.spec.clone());
        let (restore, mode) = (change.savepoint.clone(), change.mode);
        self.start_rollback(failed, stable, restore, mode, why)
            .await
            .map(Some)
    }

    /// A changed `savepointTriggerNonce`, or a due periodic savepoint: triggered, recorded as in
    /// progress, and its outcome looked for on later passes (one at a time). True while one
    /// is in progress.
    async fn requested_savepoints(
        &mut self,
        jm: &JobManager,
        id: &str,
        settings: &JobSettings,
    ) -> Result<bool, Error> {
        if let Some(p) = self.w.status.savepoint_in_progress.clone() {
            // of the job it was taken of, which an upgrade may have replaced meanwhile
            let found = match jm.snapshots(&p.job_id).await {
                Ok(list) => list.into_iter().find(|s| s.id == p.id),
                Err(_) if p.job_id != id => None,
                Err(e) => return Err(e),
            };
            let outcome = match found {
                Some(s) if s.status == "in_progress" => return Ok(true),
                Some(s) if s.completed("savepoint") => Ok(s.path.unwrap_or_default()),
                Some(s) => Err(Error::Savepoint(
                    s.failure.unwrap_or_else(|| "the savepoint failed".into()),
                )),
                None => Err(Error::Savepoint(format!(
                    "the JobManager no longer knows savepoint {} of job {} (the job restarted or was replaced)",
                    p.id, p.job_id
                ))),
            };
            self.w.status.savepoint_in_progress = None;
            if p.trigger == SavepointTrigger::Manual {
                self.w.status.savepoint_trigger_nonce = p.nonce;
            }
            self.savepoint_outcome(p.trigger, outcome, p.nonce, p.trace_id)
                .await?;
            return Ok(false);
        }
        let nonce = self.sj.spec.savepoint_trigger_nonce;
        if nonce.is_some() && nonce != self.w.status.savepoint_trigger_nonce {
            return self
                .start_savepoint(jm, id, settings, SavepointTrigger::Manual, nonce)
                .await;
        }
        if let Some(interval) = &self.sj.spec.savepoints.interval {
            let every = crate::settings::millis(interval, "spec.savepoints.interval")? as i64;
            let last = self
                .w
                .status
                .last_periodic_savepoint
                .as_ref()
                .map(millis)
                .or_else(|| self.w.status.deployed.as_ref().map(|d| millis(&d.time)))
                .unwrap_or(0);
            if millis(&now()) - last >= every {
                // recorded first: an operator that stops before recording the savepoint in
                // progress does not take another at once
                self.w.status.last_periodic_savepoint = Some(now());
                self.w.save().await?;
                return self
                    .start_savepoint(jm, id, settings, SavepointTrigger::Periodic, None)
                    .await;
            }
        }
        Ok(false)
    }

    /// Triggers a savepoint and records it as in progress (before any other pass could trigger
    /// it again); a refusal is recorded as a failed savepoint.
    async fn start_savepoint(
        &mut self,
        jm: &JobManager,
        id: &str,
        settings: &JobSettings,
        trigger: SavepointTrigger,
        nonce: Option<i64>,
    ) -> Result<bool, Error> {
        match jm.trigger_savepoint(id, &settings.savepoints, false).await {
            Ok(savepoint) => {
                self.w.status.savepoint_in_progress = Some(PendingSavepoint {
                    id: savepoint,
                    job_id: id.into(),
                    trigger,
                    nonce,
                    time: now(),
                    trace_id: trace_id(),
                });
                self.w.save().await?;
                Ok(true)
            }
            Err(Error::Savepoint(m)) => {
                if trigger == SavepointTrigger::Manual {
                    self.w.status.savepoint_trigger_nonce = nonce;
                }
                self.savepoint_outcome(trigger, Err(Error::Savepoint(m)), nonce, trace_id())
                    .await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn savepoint_outcome(
        &mut self,
        trigger: SavepointTrigger,
        outcome: Result<String, Error>,
        nonce: Option<i64>,
        trace: Option<String>,
    ) -> Result<(), Error> {
        let (warning, reason, note, outcome) = match outcome {
            Ok(p) => (false, "SavepointCompleted", p.clone(), Ok(p)),
            Err(Error::Savepoint(m)) => (true, "SavepointFailed", m.clone(), Err(m)),
            Err(e) => return Err(e),
        };
        let note = with_trace(note, trace.as_deref());
        self.record_savepoint(trigger, outcome, nonce, trace);
        self.w.save().await?;
        self.event(warning, reason, note).await;
        Ok(())
    }

    /// Keeps at most `maxCount` savepoints (failed attempts count) and none older than `maxAge`,
    /// except the newest completed one; deletes the savepoints it drops.
    async fn trim_history(&mut self, jm: &JobManager) -> Result<(), Error> {
        let policy = &self.sj.spec.savepoints;
        let max_count = policy.max_count.unwrap_or(10).max(1) as usize;
        let max_age = match &policy.max_age {
            Some(a) => Some(crate::settings::millis(a, "spec.savepoints.maxAge")? as i64),
            None => None,
        };
        let newest = self
            .w
            .status
            .last_savepoint
            .as_ref()
            .and_then(|s| s.path.clone());
        let now_ms = millis(&now());
        let total = self.w.status.savepoints.len();
        let mut keep = Vec::with_capacity(total);
        let mut dropped = Vec::new();
        for (i, s) in std::mem::take(&mut self.w.status.savepoints)
            .into_iter()
            .enumerate()
        {
            let too_many = total - i > max_count;
            let too_old = max_age.is_some_and(|a| now_ms - millis(&s.time) > a);
            let protected = s.path.is_some() && s.path == newest;
            if (too_many || too_old) && !protected {
                dropped.push(s);
            } else {
                keep.push(s);
            }
        }
        for s in &dropped {
            if let Some(p) = &s.path
                && let Err(e) = jm.dispose(p).await
            {
                warn!(path = %p, error = %e, "cannot delete a savepoint dropped from the history");
            }
        }
        self.w.status.savepoints = keep;
        if !dropped.is_empty() {
            self.w.save().await?;
            let n = dropped.iter().filter(|s| s.path.is_some()).count();
            self.event(
                false,
                "SavepointsDeleted",
                format!("{n} savepoint(s) dropped from the history and deleted"),
            )
            .await;
        }
        Ok(())
    }
}

/// Where a deployment on probation stands.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Its job completed a checkpoint after it was submitted, or finished.
    Proved,
    /// Not yet proved, not failing.
    Waiting,
    /// Its job failed, restarted too often or overran the timeout: why.
    Failing(String),
}

/// The verdict on a deployment submitted at `submitted` (ms) whose job is `job` and whose
/// newest completed checkpoint was triggered at `checkpointed`, at `now`.
fn probation_verdict(
    job: &pb::JobInfo,
    checkpointed: Option<i64>,
    submitted: i64,
    now: i64,
    settings: &JobSettings,
) -> Verdict {
    // a completed checkpoint ends the probation even if the job failed since: what it
    // committed with that checkpoint must not be redone from an older snapshot
    if job.state == "finished" || checkpointed.is_some_and(|t| t >= submitted) {
        return Verdict::Proved;
    }
    let state = if job.message.is_empty() {
        job.state.clone()
    } else {
        format!("{}: {}", job.state, job.message)
    };
    Verdict::Failing(if job.state == "failed" {
        format!("its job failed ({})", job.message)
    } else if job.restarts > settings.max_restarts {
        format!(
            "its job restarted {} times (spec.rollback.maxRestarts is {}; it is {state})",
            job.restarts, settings.max_restarts
        )
    } else if now - submitted > settings.probation_ms {
        format!(
            "its job did not complete a checkpoint within {} s (spec.rollback.timeout; it is {state})",
            settings.probation_ms / 1000
        )
    } else {
        return Verdict::Waiting;
    })
}

/// `startedWith` of a deployment made by a rollback.
const ROLLBACK: &str = "rollback";

/// Outcome of a stop step.
enum Stop {
    /// Stopped; go on to deploy.
    Done,
    /// Not yet; call again.
    Wait,
    /// The change halted.
    Halted,
}

/// How long to wait before retrying after an error.
pub fn error_policy(sj: Arc<StreamJob>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Error::Stale(_) = error {
        // the watch brings the newer StreamJob; a short pause lets it reach the cache
        info!(name = %sj.name_any(), %error);
        return Action::requeue(Duration::from_millis(200));
    }
    let failures = {
        let mut all = ctx.failures.lock().expect("failures lock");
        let n = all.entry(object_key(&sj)).or_default();
        *n += 1;
        *n
    };
    let retryable = error.retryable();
    let delay = crate::backoff(ctx.retry, failures, retryable);
    if retryable {
        warn!(name = %sj.name_any(), %error, failures, retry_in = ?delay, "reconcile failed");
    } else {
        error!(name = %sj.name_any(), %error, failures, retry_in = ?delay, "reconcile failed; retrying alone will not fix it");
    }
    Action::requeue(delay)
}

fn object_key(sj: &StreamJob) -> String {
    format!("{}/{}", sj.namespace().unwrap_or_default(), sj.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> JobSettings {
        JobSettings {
            name: "j".into(),
            definition: String::new(),
            overrides: vec![],
            checkpoints: String::new(),
            savepoints: String::new(),
            ha_dir: String::new(),
            taskmanagers: 1,
            taskmanager_memory_mb: 512,
            probation_ms: 60_000,
            max_restarts: 2,
        }
    }

    fn job(state: &str, restarts: u32, message: &str) -> pb::JobInfo {
        pb::JobInfo {
            state: state.into(),
            restarts,
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_deployment_proves_itself_with_a_checkpoint_after_it_was_submitted() {
        let s = settings();
        let verdict =
            |j: &pb::JobInfo, checkpointed, now| probation_verdict(j, checkpointed, 1_000, now, &s);
        let running = job("running", 0, "");
        // the checkpoint it restored (older than the deployment) proves nothing
        assert_eq!(verdict(&running, Some(500), 2_000), Verdict::Waiting);
        assert_eq!(verdict(&running, Some(1_500), 2_000), Verdict::Proved);
        assert_eq!(
            verdict(&job("finished", 0, ""), None, 2_000),
            Verdict::Proved
        );
        // failed after a completed checkpoint: proved (a rollback would redo what it committed)
        assert_eq!(
            verdict(&job("failed", 0, "boom"), Some(1_500), 2_000),
            Verdict::Proved
        );
    }

    #[test]
    fn a_deployment_fails_its_probation_by_failing_restarting_or_waiting_too_long() {
        let s = settings();
        let verdict = |j: &pb::JobInfo, now| probation_verdict(j, None, 1_000, now, &s);
        let failing = |v: Verdict, what: &str| match v {
            Verdict::Failing(why) => assert!(why.contains(what), "{why}"),
            v => panic!("{v:?}, not failing with {what}"),
        };
        failing(
            verdict(&job("failed", 0, "no such table"), 2_000),
            "failed (no such table)",
        );
        assert_eq!(verdict(&job("restarting", 2, ""), 2_000), Verdict::Waiting);
        failing(
            verdict(&job("restarting", 3, "bad record"), 2_000),
            "restarted 3 times (spec.rollback.maxRestarts is 2; it is restarting: bad record)",
        );
        let waiting = job("created", 0, "waiting for 8 free slots");
        assert_eq!(verdict(&waiting, 61_000), Verdict::Waiting);
        failing(
            verdict(&waiting, 61_001),
            "within 60 s (spec.rollback.timeout; it is created: waiting for 8 free slots)",
        );
    }
}

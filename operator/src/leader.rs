//! Leader election between operator replicas with a `coordination.k8s.io/v1` Lease: only the
//! holder reconciles. A candidate takes the lease when it is free, or when its holder has not
//! renewed it for a whole lease duration as measured on the candidate's own clock (it watches
//! the lease's resource version change, so clock skew between pods does not matter). Every
//! write is conditional on the resource version read, so two candidates never both win, and a
//! holder that cannot renew for two thirds of the lease duration steps down, before anyone
//! else may take the lease.
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::{Duration, Instant};
use tracing::{info, warn};

use crate::Error;

/// One candidate for the lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The lease's resource version when last seen, and when (on this clock) it last changed.
    observed: Option<(String, Instant)>,
    /// When this candidate last renewed as holder.
    renewed: Option<Instant>,
}

impl Elector {
    /// A candidate `identity` for lease `name`, held for `duration` without renewal.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Elector {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: None,
            renewed: None,
        }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Tries once to take or renew the lease; true if this candidate holds it afterwards.
    pub async fn try_lead(&mut self) -> Result<bool, Error> {
        let now = MicroTime(Timestamp::now());
        let seconds = self.duration.as_secs().max(1) as i32;
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    info!(identity = %self.identity, "took the leader lease");
                    self.renewed = Some(Instant::now());
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let version = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        if !mine {
            self.renewed = None;
            // expiry is judged by how long the lease has not changed on this clock
            let changed_at = match &self.observed {
                Some((v, t)) if *v == version => *t,
                _ => Instant::now(),
            };
            self.observed = Some((version, changed_at));
            let lapsed = changed_at.elapsed()
                >= Duration::from_secs(spec.lease_duration_seconds.unwrap_or(seconds).max(1) as u64);
            if !holder.is_empty() && !lapsed {
                return Ok(false);
            }
        }
        let mut next = current.clone();
        let s = next.spec.get_or_insert_with(Default::default);
        if !mine {
            s.holder_identity = Some(self.identity.clone());
            s.acquire_time = Some(now.clone());
            s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
        }
        s.lease_duration_seconds = Some(seconds);
        s.renew_time = Some(now);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {
                if !mine {
                    info!(identity = %self.identity, previous = %holder, "took the leader lease");
                }
                self.renewed = Some(Instant::now());
                Ok(true)
            }
            // someone else wrote first
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.renewed = None;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&mut self) {
        let every = self.duration / 3;
        loop {
            match self.try_lead().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Renews the lease until it cannot; returns why leadership was lost.
    pub async fn keep(&mut self) -> String {
        let every = self.duration / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.try_lead().await {
                Ok(true) => {}
                Ok(false) => return "another replica holds the leader lease".into(),
                Err(e) => {
                    warn!(error = %e, "renewing the leader lease");
                    // stepping down before the lease can lapse for others
                    if self
                        .renewed
                        .is_none_or(|t| t.elapsed() >= self.duration * 2 / 3)
                    {
                        return format!(
                            "could not renew the leader lease for {:?}: {e}",
                            self.duration
                        );
                    }
                }
            }
        }
    }
}

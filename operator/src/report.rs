//! Writing what the operator knows back to the StreamJob: status patches (as JSON merge patches
//! computed against the status last read, so cleared fields are removed), conditions, and
//! Kubernetes events for each transition.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde_json::{Map, Value};
use tracing::warn;

use freshet_crds::{StreamJob, StreamJobStatus};

use crate::Error;

/// The field manager of the operator's writes.
pub const MANAGER: &str = "freshet-operator";

/// Now, as a Kubernetes time.
pub fn now() -> Time {
    Time(Timestamp::now())
}

/// Milliseconds since the epoch of `t`.
pub fn millis(t: &Time) -> i64 {
    t.0.as_millisecond()
}

/// The status of one StreamJob as the operator works on it, and what was last written.
///
/// Each write carries the resource version the writer last saw, so the API server refuses it
/// (409 Conflict, [`Error::Stale`]) when anyone changed the StreamJob since: a reconcile working
/// from an outdated copy (a controller cache that lags, a replica that lost its lease) cannot
/// overwrite a newer status. The reconcile is then run again from a fresh read.
pub struct StatusWriter {
    api: Api<StreamJob>,
    name: String,
    /// `metadata.resourceVersion` of the StreamJob as last read or written.
    version: Option<String>,
    written: Value,
    /// The working copy.
    pub status: StreamJobStatus,
}

impl StatusWriter {
    /// Starts from the status of `sj` as read.
    pub fn new(api: Api<StreamJob>, sj: &StreamJob) -> Self {
        let status = sj.status.clone().unwrap_or_default();
        StatusWriter {
            api,
            name: sj.name_any(),
            version: sj.resource_version(),
            written: serde_json::to_value(&status).expect("a status serialises"),
            status,
        }
    }

    /// `metadata.resourceVersion` of the StreamJob as last read or written by this writer:
    /// another write of the same pass carries it as its precondition.
    pub fn version(&self) -> Option<String> {
        self.version.clone()
    }

    /// Writes the working copy if it changed.
    pub async fn save(&mut self) -> Result<(), Error> {
        let now = serde_json::to_value(&self.status).expect("a status serialises");
        if now == self.written {
            return Ok(());
        }
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": self.version },
            "status": merge_patch(&self.written, &now),
        });
        let updated = self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 409 => Error::Stale(self.name.clone()),
                e => Error::Kube(e),
            })?;
        self.version = updated.resource_version();
        self.written = now;
        Ok(())
    }

    /// Sets condition `kind` (keeping its transition time if its status is unchanged).
    pub fn condition(
        &mut self,
        kind: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
        generation: i64,
    ) {
        let status = if status { "True" } else { "False" }.to_string();
        let message = message.into();
        let conditions = &mut self.status.conditions;
        let transition = conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(now);
        conditions.retain(|c| c.type_ != kind);
        conditions.push(Condition {
            type_: kind.into(),
            status,
            reason: reason.into(),
            message,
            observed_generation: Some(generation),
            last_transition_time: transition,
        });
        conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    }

    /// Condition `kind`, if set.
    pub fn get_condition(&self, kind: &str) -> Option<&Condition> {
        self.status.conditions.iter().find(|c| c.type_ == kind)
    }

    /// Removes condition `kind`.
    pub fn clear_condition(&mut self, kind: &str) {
        self.status.conditions.retain(|c| c.type_ != kind);
    }
}

/// A JSON merge patch (RFC 7386) that turns `old` into `new`: fields `new` lacks are set to
/// null (removed), objects are patched field by field, anything else is replaced.
pub fn merge_patch(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut patch = Map::new();
            for k in o.keys() {
                if !n.contains_key(k) {
                    patch.insert(k.clone(), Value::Null);
                }
            }
            for (k, v) in n {
                match o.get(k) {
                    Some(ov) if ov == v => {}
                    Some(ov) => {
                        patch.insert(k.clone(), merge_patch(ov, v));
                    }
                    None => {
                        patch.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Object(patch)
        }
        (_, n) => n.clone(),
    }
}

/// Publishes an event about `sj` (a failure to publish is logged, never fatal).
pub async fn event(recorder: &Recorder, sj: &StreamJob, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &sj.object_ref(&())).await {
        warn!(error = %e, reason, "cannot publish an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_merge_patch_removes_cleared_fields_at_any_depth() {
        let old =
            json!({"a": 1, "change": {"phase": "stopping", "savepoint": "s3://x"}, "list": [1, 2]});
        let new = json!({"a": 1, "change": {"phase": "deploying"}, "list": [2]});
        assert_eq!(
            merge_patch(&old, &new),
            json!({"change": {"phase": "deploying", "savepoint": null}, "list": [2]})
        );
        let mut applied = old.clone();
        json_merge(&mut applied, &merge_patch(&old, &new));
        assert_eq!(applied, new);
    }

    /// RFC 7386 application, to check the patch round-trips.
    fn json_merge(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let t = target.as_object_mut().unwrap();
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        json_merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }
}

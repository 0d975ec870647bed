//! The checked-in CustomResourceDefinition matches the Rust types, and it validates what a
//! user applies the way the API server does: the example StreamJobs pass; bad specs are
//! rejected with a message naming the field. Schema checks (types, enums) run through a JSON
//! Schema validator over the CRD's openAPIV3Schema, CEL rules through a CEL evaluator of the
//! Kubernetes dialect; both are what an API server applies, evaluated in-process because no
//! API server can run here.
mod common;

use serde_json::{Value, json};
use std::path::PathBuf;

use common::{problems, repo};
use freshet_crds::crd_yaml;

/// Where the CRD is checked in: beside the types, and in the Helm chart.
fn copies() -> Vec<PathBuf> {
    vec![
        repo().join("crds/streamjob.yaml"),
        repo().join("helm/freshet-operator/crds/streamjob.yaml"),
    ]
}

#[test]
fn checked_in_crd_matches_the_types() {
    let generated = crd_yaml();
    for path in copies() {
        if std::env::var_os("FRESHET_UPDATE_CRDS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{} is out of date with crds/src; regenerate it with `freshet crd > {}` \
             (or run this test with FRESHET_UPDATE_CRDS=1)",
            path.display(),
            path.display()
        );
    }
}

fn example(name: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/examples").join(name)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[test]
fn example_stream_jobs_are_valid() {
    for name in ["clicks-per-user.yaml", "revenue-per-store.yaml"] {
        let sj = example(name);
        assert_eq!(problems(&sj), Vec::<String>::new(), "{name}");
        // and they read back as the Rust type
        serde_json::from_value::<freshet_crds::StreamJob>(sj).unwrap();
    }
}

#[test]
fn bad_specs_are_refused_naming_the_field() {
    let cases: Vec<(&str, Value, &str)> = vec![
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
            "/spec/upgradeMode",
        ),
        ("unknown state", json!({"state": "paused"}), "/spec/state"),
        (
            "parallelism as text",
            json!({"parallelism": "four"}),
            "/spec/parallelism",
        ),
        (
            "a job without sinks",
            json!({"job": {"sinks": {"counts": null}}}),
            "/spec/job/sinks",
        ),
    ];
    for (what, patch, field) in cases {
        let mut sj = example("clicks-per-user.yaml");
        merge(&mut sj["spec"], &patch);
        let p = problems(&sj);
        assert!(
            p.iter().any(|m| m.contains(field)),
            "{what}: expected a problem naming {field}, got {p:?}"
        );
    }
}

/// Merges `patch` into `target` as a JSON merge patch does (objects key by key, null removes,
/// anything else replaced).
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
fn scale_subresource_and_printer_columns_are_declared() {
    let crd: Value = serde_yaml::from_str(&crd_yaml()).unwrap();
    let v = &crd["spec"]["versions"][0];
    assert_eq!(
        v["subresources"]["scale"]["specReplicasPath"],
        ".spec.parallelism"
    );
    assert_eq!(
        v["subresources"]["scale"]["statusReplicasPath"],
        ".status.parallelism"
    );
    assert!(v["subresources"]["status"].is_object());
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["Lifecycle", "Job", "Parallelism", "Last Savepoint", "Age"]
    );
}

//! Shared by the CRD and manifest tests: the repository root, and what an API server would
//! say about a StreamJob given the generated CRD (schema checks through a JSON Schema
//! validator, CEL rules through an evaluator of the Kubernetes dialect, after defaulting).
#![allow(dead_code)]
use serde_json::Value;
use std::path::{Path, PathBuf};

use freshet_crds::crd_yaml;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn schema() -> Value {
    let crd: Value = serde_yaml::from_str(&crd_yaml()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// What the API server would say about `object`: schema errors, then CEL rule failures.
pub fn problems(object: &Value) -> Vec<String> {
    let schema = schema();
    let object = kube::core::cel::apply_defaults(&schema, object);
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut out: Vec<String> = validator
        .iter_errors(&object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    if let Err(errors) = kube::core::cel::Validator::new().validate(&schema, &object, None) {
        out.extend(errors.as_slice().iter().map(|e| e.to_string()));
    }
    out
}

//! The Helm chart and the plain manifests: `helm lint` passes; `helm template` renders, for
//! the default values, a namespace-scoped install and the example job, manifests that validate
//! against the Kubernetes schemas (`kubernetes-validate --strict`) and, for StreamJobs, against
//! the CRD; `deploy/operator.yaml` is the rendered chart, kept in step with it.
//!
//! Needs `helm` (from `FRESHET_HELM`, `target/tools/bin/helm`, or the PATH) and
//! `kubernetes-validate`; `.ci/run` installs both.
mod common;

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

use common::{problems, repo};

fn helm() -> PathBuf {
    if let Some(h) = std::env::var_os("FRESHET_HELM") {
        return h.into();
    }
    let local = repo().join("target/tools/bin/helm");
    if local.exists() {
        return local;
    }
    let on_path = Command::new("helm").arg("version").output();
    assert!(
        on_path.is_ok_and(|o| o.status.success()),
        "helm is needed: run .ci/run (it installs helm into target/tools/bin) or set FRESHET_HELM"
    );
    "helm".into()
}

fn chart() -> String {
    repo().join("helm/freshet-operator").display().to_string()
}

fn run(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run .ci/run to install it)"));
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `helm template` of the chart with `values` (`key=value`).
fn render(values: &[&str]) -> String {
    let mut c = Command::new(helm());
    c.args([
        "template",
        "freshet",
        &chart(),
        "--namespace",
        "freshet-system",
    ]);
    for v in values {
        c.args(["--set", v]);
    }
    run(&mut c)
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---")
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|v| v.is_object())
        .collect()
}

/// Validates every document: built-in kinds against the Kubernetes schemas, StreamJobs against
/// the CRD. Returns the kinds seen.
fn validate(yaml: &str, what: &str) -> Vec<String> {
    let docs = documents(yaml);
    let mut builtin = Vec::new();
    let mut kinds = Vec::new();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_default().to_string();
        if kind == "StreamJob" {
            assert_eq!(problems(d), Vec::<String>::new(), "{what}: StreamJob");
        } else if kind != "CustomResourceDefinition" {
            builtin.push(serde_yaml::to_string(d).unwrap());
        }
        kinds.push(kind);
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), builtin.join("---\n")).unwrap();
    run(Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(file.path()));
    kinds
}

#[test]
fn the_chart_lints() {
    run(Command::new(helm()).args(["lint", "--strict", &chart()]));
}

#[test]
fn rendered_manifests_validate() {
    let kinds = validate(&render(&[]), "default values");
    for k in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
    // watching one namespace: namespaced rules there, no cluster-wide ones
    let kinds = validate(&render(&["watchNamespace=jobs"]), "watchNamespace");
    assert!(!kinds.iter().any(|k| k.starts_with("Cluster")), "{kinds:?}");
    let kinds = validate(
        &render(&[
            "example.enabled=true",
            "example.credentialsSecret=freshet-s3",
            "example.s3Endpoint=http://minio:9000",
        ]),
        "example job",
    );
    assert!(kinds.iter().any(|k| k == "StreamJob"));
}

/// The chart points the operator (and through it every StreamJob without a collector of its
/// own) at an OTLP collector, and annotates its pod for Prometheus.
#[test]
fn the_chart_wires_telemetry() {
    let operator = |yaml: &str| {
        documents(yaml)
            .into_iter()
            .find(|d| d["kind"] == "Deployment")
            .unwrap()
    };
    let d = operator(&render(&[]));
    let pod = &d["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "8080");
    let env = pod["spec"]["containers"][0]["env"].to_string();
    assert!(!env.contains("OTEL_EXPORTER_OTLP"), "{env}");
    let yaml = render(&[
        "observability.otlpEndpoint=http://collector.monitoring:4317",
        "observability.otlpProtocol=grpc",
        "observability.prometheusScrape=false",
        "podAnnotations.team=streams",
    ]);
    validate(&yaml, "observability values");
    let d = operator(&yaml);
    let pod = &d["spec"]["template"];
    let env = &pod["spec"]["containers"][0]["env"];
    let value = |name: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        value("OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("http://collector.monitoring:4317".into())
    );
    assert_eq!(value("OTEL_EXPORTER_OTLP_PROTOCOL"), Some("grpc".into()));
    let annotations = &pod["metadata"]["annotations"];
    assert!(
        annotations.get("prometheus.io/scrape").is_none(),
        "{annotations}"
    );
    assert_eq!(annotations["team"], "streams");
}

#[test]
fn plain_manifests_are_the_rendered_chart() {
    let rendered = format!(
        "# The operator without Helm: `kubectl apply -f deploy/operator.yaml` (the chart rendered\n\
         # with default values into the freshet-system namespace, CRD included).\n\
         # Regenerate with FRESHET_UPDATE_MANIFESTS=1 cargo test --test manifests.\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: freshet-system\n---\n{}\n{}",
        std::fs::read_to_string(repo().join("crds/streamjob.yaml")).unwrap(),
        render(&[])
    );
    let path = repo().join("deploy/operator.yaml");
    if std::env::var_os("FRESHET_UPDATE_MANIFESTS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "deploy/operator.yaml is out of date with the chart; regenerate it with \
         FRESHET_UPDATE_MANIFESTS=1 cargo test --test manifests"
    );
    validate(&on_disk, "deploy/operator.yaml");
}

#[test]
fn example_manifests_validate() {
    for name in [
        "clicks-per-user.yaml",
        "revenue-per-store.yaml",
        "s3-credentials.yaml",
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/examples").join(name)).unwrap();
        validate(&text, name);
    }
}

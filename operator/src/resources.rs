//! The Kubernetes objects a `StreamJob` runs as: a ConfigMap with the job definition, the
//! JobManager Deployment and its Service, and the TaskManager Deployment. Each is owned by the
//! StreamJob, so deleting the StreamJob deletes them.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;

use freshet_crds::{OtlpProtocol, StreamJob};

use crate::settings::JobSettings;
use crate::{Error, podtemplate};

/// Port of the JobManager's control plane (gRPC).
pub const RPC_PORT: u16 = 6123;
/// Port of the TaskManager service.
pub const TASKMANAGER_PORT: u16 = 6124;
/// Port of the data plane between TaskManagers.
pub const DATA_PORT: u16 = 6125;
/// Port of the JobManager's web UI and HTTP API.
pub const WEB_PORT: u16 = 8081;
/// Port of the health endpoints (`/healthz`, `/readyz`).
pub const HEALTH_PORT: u16 = 8080;
/// Where pods keep RocksDB working directories; also the directory relative paths in the job
/// definition (and its default dead-letter file) resolve against: the pods' working directory
/// and, with `/tmp`, the only one they may write (the job definition's own directory is a
/// read-only ConfigMap mount).
pub const STATE_DIR: &str = "/var/lib/freshet";
/// Where the job definition is mounted.
pub const JOB_DIR: &str = "/etc/freshet";
/// Where the TLS Secret (`tls.crt`, `tls.key`, `ca.crt`) is mounted.
pub const TLS_DIR: &str = "/etc/freshet-tls";
/// Where the token Secret (`token`) is mounted, in the JobManager only.
pub const TOKEN_DIR: &str = "/etc/freshet-token";
/// The key of a token Secret.
pub const TOKEN_KEY: &str = "token";

/// Names of a StreamJob's objects.
pub struct Names {
    /// The StreamJob.
    pub job: String,
    /// JobManager Deployment and Service.
    pub jobmanager: String,
    /// TaskManager Deployment.
    pub taskmanager: String,
    /// ConfigMap with the job definition.
    pub config: String,
    /// The TLS Secret the operator makes when the spec names none.
    pub tls: String,
    /// The token Secret the operator makes when the spec names none.
    pub token: String,
}

impl Names {
    /// Names for StreamJob `name`.
    pub fn of(name: &str) -> Names {
        Names {
            job: name.to_string(),
            jobmanager: format!("{name}-jobmanager"),
            taskmanager: format!("{name}-taskmanager"),
            config: format!("{name}-job"),
            tls: format!("{name}-tls"),
            token: format!("{name}-token"),
        }
    }
}

/// The Secrets of a StreamJob's security, and whether the operator makes them.
pub struct SecuritySecrets {
    /// `kubernetes.io/tls` Secret with `ca.crt`.
    pub tls: String,
    /// Made by the operator (not named in the spec).
    pub tls_generated: bool,
    /// Secret with the key `token`.
    pub token: String,
    /// Made by the operator.
    pub token_generated: bool,
}

/// The Secrets `sj` runs with; `None` when its security is off.
pub fn security_secrets(sj: &StreamJob) -> Option<SecuritySecrets> {
    let s = &sj.spec.security;
    if !s.enabled {
        return None;
    }
    let names = Names::of(&sj.name_any());
    Some(SecuritySecrets {
        tls: s.tls_secret.clone().unwrap_or(names.tls),
        tls_generated: s.tls_secret.is_none(),
        token: s.token_secret.clone().unwrap_or(names.token),
        token_generated: s.token_secret.is_none(),
    })
}

/// A new TLS Secret for `sj`: a CA of its own and a certificate for `freshet-internal` and the
/// JobManager Service's names, owned by the StreamJob.
pub fn tls_secret(sj: &StreamJob) -> Result<Secret, Error> {
    let names = Names::of(&sj.name_any());
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let jm = &names.jobmanager;
    let dns = vec![
        jm.clone(),
        format!("{jm}.{ns}"),
        format!("{jm}.{ns}.svc"),
        format!("{jm}.{ns}.svc.cluster.local"),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    let g =
        freshet_security::certs::generate(&dns, 3650).map_err(|e| Error::Spec(e.to_string()))?;
    let data = [
        (freshet_security::certs::CA_FILE, g.ca),
        (freshet_security::certs::CERT_FILE, g.cert),
        (freshet_security::certs::KEY_FILE, g.key),
    ];
    owned_secret(sj, &names.tls, "kubernetes.io/tls", data)
}

/// A new token Secret for `sj` with a random token, owned by the StreamJob.
pub fn token_secret(sj: &StreamJob) -> Result<Secret, Error> {
    let names = Names::of(&sj.name_any());
    let token = freshet_security::certs::token().map_err(|e| Error::Spec(e.to_string()))?;
    owned_secret(
        sj,
        &names.token,
        "Opaque",
        [(TOKEN_KEY, format!("{token}\n"))],
    )
}

fn owned_secret<const N: usize>(
    sj: &StreamJob,
    name: &str,
    kind: &str,
    data: [(&str, String); N],
) -> Result<Secret, Error> {
    let owner = sj
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Spec("the StreamJob has no uid yet".into()))?;
    let mut secret: Secret = from_json(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": sj.namespace(),
            "labels": labels(&sj.name_any(), "security"),
            "ownerReferences": [owner],
        },
        "type": kind,
    }))?;
    secret.data = Some(
        data.into_iter()
            .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.into_bytes())))
            .collect(),
    );
    Ok(secret)
}

/// Labels of a component's pods.
pub fn labels(job: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "freshet".into()),
        ("app.kubernetes.io/instance".into(), job.into()),
        ("app.kubernetes.io/component".into(), component.into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "freshet-operator".into(),
        ),
    ])
}

/// The label selector of the TaskManager pods (for the scale subresource).
pub fn taskmanager_selector(job: &str) -> String {
    format!("app.kubernetes.io/instance={job},app.kubernetes.io/component=taskmanager")
}

/// Every object of a StreamJob.
pub struct Objects {
    /// Job definition.
    pub config: ConfigMap,
    /// JobManager Service.
    pub service: Service,
    /// JobManager Deployment.
    pub jobmanager: Deployment,
    /// TaskManager Deployment.
    pub taskmanager: Deployment,
}

/// An OTLP collector: its endpoint and protocol (`None`: the exporters' default,
/// `http/protobuf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Otlp {
    pub endpoint: String,
    pub protocol: Option<OtlpProtocol>,
}

/// Where `sj`'s pods export telemetry: its spec's collector, else the operator's `default`;
/// none when the spec says `none`.
fn otlp_of(sj: &StreamJob, default: Option<&Otlp>) -> Option<Otlp> {
    let o = &sj.spec.observability;
    match o.otlp_endpoint.as_deref().map(str::trim) {
        Some("none") => None,
        Some(endpoint) => Some(Otlp {
            endpoint: endpoint.to_string(),
            protocol: o.otlp_protocol,
        }),
        None => default.map(|d| Otlp {
            endpoint: d.endpoint.clone(),
            protocol: o.otlp_protocol.or(d.protocol),
        }),
    }
}

/// The objects `sj` runs as with settings `s` (`running` false scales both Deployments to
/// zero); its pods export telemetry to `otlp` unless its spec names a collector (or `none`).
pub fn objects(
    sj: &StreamJob,
    s: &JobSettings,
    running: bool,
    otlp: Option<&Otlp>,
) -> Result<Objects, Error> {
    let otlp = otlp_of(sj, otlp);
    let names = Names::of(&sj.name_any());
    let owner = sj
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Spec("the StreamJob has no uid yet".into()))?;
    let ns = sj.namespace();
    let meta = |name: &str, component: &str| {
        json!({
            "name": name,
            "namespace": ns,
            "labels": labels(&names.job, component),
            "ownerReferences": [owner],
        })
    };
    let config: ConfigMap = from_json(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(&names.config, "job"),
        "data": {"job.yaml": s.definition},
    }))?;
    let service: Service = from_json(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(&names.jobmanager, "jobmanager"),
        "spec": {
            "selector": labels(&names.job, "jobmanager"),
            "ports": [
                {"name": "rpc", "port": RPC_PORT, "targetPort": RPC_PORT},
                {"name": "http", "port": WEB_PORT, "targetPort": WEB_PORT},
                {"name": "health", "port": HEALTH_PORT, "targetPort": HEALTH_PORT},
            ],
        },
    }))?;
    let secrets = security_secrets(sj);
    let tls_args = |args: &mut Vec<String>| {
        if secrets.is_some() {
            for (flag, file) in [
                ("--tls-cert", freshet_security::certs::CERT_FILE),
                ("--tls-key", freshet_security::certs::KEY_FILE),
                ("--tls-ca", freshet_security::certs::CA_FILE),
            ] {
                args.push(flag.into());
                args.push(format!("{TLS_DIR}/{file}"));
            }
        }
    };
    let mut jm_args = vec![
        "jobmanager".to_string(),
        "--listen".into(),
        format!("0.0.0.0:{RPC_PORT}"),
        "--ha-dir".into(),
        s.ha_dir.clone(),
        "--health".into(),
        format!("0.0.0.0:{HEALTH_PORT}"),
        "--http".into(),
        format!("0.0.0.0:{WEB_PORT}"),
    ];
    tls_args(&mut jm_args);
    // (volume, Secret, mount path) of each component
    let mut jm_secrets = Vec::new();
    let mut tm_secrets = Vec::new();
    if let Some(sec) = &secrets {
        jm_args.extend([
            "--auth-token-file".into(),
            format!("{TOKEN_DIR}/{TOKEN_KEY}"),
        ]);
        jm_secrets.push(("tls", sec.tls.clone(), TLS_DIR));
        jm_secrets.push(("token", sec.token.clone(), TOKEN_DIR));
        tm_secrets.push(("tls", sec.tls.clone(), TLS_DIR));
    }
    let jobmanager = deployment(
        sj,
        "jobmanager",
        if running { 1 } else { 0 },
        jm_args,
        json!([
            {"name": "rpc", "containerPort": RPC_PORT},
            {"name": "http", "containerPort": WEB_PORT},
            {"name": "health", "containerPort": HEALTH_PORT},
        ]),
        sj.spec.job_manager.resources.as_ref(),
        &meta(&names.jobmanager, "jobmanager"),
        &jm_secrets,
        otlp.as_ref(),
    )?;
    let mut tm_args = vec![
        "taskmanager".to_string(),
        "--jobmanager".into(),
        format!("{}:{RPC_PORT}", names.jobmanager),
        "--slots".into(),
        sj.spec.task_managers.slots.to_string(),
        "--listen".into(),
        format!("0.0.0.0:{TASKMANAGER_PORT}"),
        "--data-listen".into(),
        format!("0.0.0.0:{DATA_PORT}"),
        "--advertise-host".into(),
        "$(POD_IP)".into(),
        "--id".into(),
        "$(POD_NAME)".into(),
        "--state-dir".into(),
        STATE_DIR.into(),
        "--health".into(),
        format!("0.0.0.0:{HEALTH_PORT}"),
    ];
    tls_args(&mut tm_args);
    let taskmanager = deployment(
        sj,
        "taskmanager",
        if running { s.taskmanagers } else { 0 },
        tm_args,
        json!([
            {"name": "rpc", "containerPort": TASKMANAGER_PORT},
            {"name": "data", "containerPort": DATA_PORT},
            {"name": "health", "containerPort": HEALTH_PORT},
        ]),
        Some(
            sj.spec
                .task_managers
                .resources
                .as_ref()
                .unwrap_or(&derived_memory(s.taskmanager_memory_mb)),
        ),
        &meta(&names.taskmanager, "taskmanager"),
        &tm_secrets,
        otlp.as_ref(),
    )?;
    Ok(Objects {
        config,
        service,
        jobmanager,
        taskmanager,
    })
}

/// Resources of a TaskManager whose spec gives none: a memory request and limit of `mb` MiB.
fn derived_memory(mb: usize) -> k8s_openapi::api::core::v1::ResourceRequirements {
    let memory = std::collections::BTreeMap::from([(
        "memory".to_string(),
        k8s_openapi::apimachinery::pkg::api::resource::Quantity(format!("{mb}Mi")),
    )]);
    k8s_openapi::api::core::v1::ResourceRequirements {
        requests: Some(memory.clone()),
        limits: Some(memory),
        ..Default::default()
    }
}

/// A Deployment of one component: the generated pod merged over the user's pod template.
#[allow(clippy::too_many_arguments)]
fn deployment(
    sj: &StreamJob,
    component: &str,
    replicas: i32,
    args: Vec<String>,
    ports: Value,
    resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
    meta: &Value,
    secrets: &[(&str, String, &str)],
    otlp: Option<&Otlp>,
) -> Result<Deployment, Error> {
    let spec = &sj.spec;
    let mut env = vec![
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    ];
    if let Some(o) = otlp {
        env.push(json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": o.endpoint}));
        if let Some(p) = o.protocol {
            env.push(json!({"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": p.name()}));
        }
        // POD_NAME is defined above, so the kubelet expands it
        env.push(json!({
            "name": "OTEL_RESOURCE_ATTRIBUTES",
            "value": format!(
                "k8s.namespace.name={},k8s.pod.name=$(POD_NAME),freshet.stream_job={}",
                sj.namespace().unwrap_or_else(|| "default".into()),
                sj.name_any()
            ),
        }));
    }
    if let Some(s3) = &spec.checkpointing.s3 {
        if let Some(e) = &s3.endpoint {
            env.push(json!({"name": "AWS_ENDPOINT_URL", "value": e}));
        }
        if let Some(r) = &s3.region {
            env.push(json!({"name": "AWS_REGION", "value": r}));
        }
        if let Some(secret) = &s3.credentials_secret {
            for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
                env.push(json!({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}));
            }
        }
    }
    let probe = |path: &str, delay: u32| {
        json!({
            "httpGet": {"path": path, "port": HEALTH_PORT},
            "initialDelaySeconds": delay,
            "periodSeconds": 5,
            "failureThreshold": 6,
        })
    };
    let mut container = json!({
        "name": component,
        "image": spec.image,
        "args": args,
        "env": env,
        "ports": ports,
        "livenessProbe": probe("/healthz", 10),
        "readinessProbe": probe("/readyz", 2),
        "volumeMounts": [
            {"name": "state", "mountPath": STATE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "job", "mountPath": JOB_DIR, "readOnly": true},
        ],
        "securityContext": {
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    let mut volumes = vec![
        json!({"name": "state", "emptyDir": {}}),
        json!({"name": "tmp", "emptyDir": {}}),
        json!({"name": "job", "configMap": {"name": Names::of(&sj.name_any()).config}}),
    ];
    for (volume, secret, path) in secrets {
        container["volumeMounts"]
            .as_array_mut()
            .expect("a list")
            .push(json!({"name": volume, "mountPath": path, "readOnly": true}));
        // readable by the pod's user only (fsGroup); the files follow a Secret's updates
        volumes
            .push(json!({"name": volume, "secret": {"secretName": secret, "defaultMode": 0o440}}));
    }
    if let Some(p) = spec.image_pull_policy {
        container["imagePullPolicy"] = p.name().into();
    }
    if let Some(r) = resources {
        container["resources"] = serde_json::to_value(r).map_err(|e| Error::Spec(e.to_string()))?;
    }
    let labels = meta["labels"].clone();
    let annotations = if spec.observability.prometheus_scrape != Some(false) {
        json!({
            "prometheus.io/scrape": "true",
            "prometheus.io/port": HEALTH_PORT.to_string(),
            "prometheus.io/path": "/metrics",
        })
    } else {
        json!({})
    };
    let ours = json!({
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            "containers": [container],
            "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "fsGroup": 10001},
            "terminationGracePeriodSeconds": 30,
            "volumes": volumes,
        },
    });
    let mut template = spec.pod_template.clone().unwrap_or_else(|| json!({}));
    podtemplate::merge(&mut template, ours);
    from_json(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            // a new pod may only start once the old one is gone: two JobManagers, or two
            // TaskManagers of the same job generation, should not overlap
            "strategy": {"type": "Recreate"},
            "template": template,
        },
    }))
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::Spec(format!("generated object: {e}")))
}

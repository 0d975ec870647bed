//! What a `StreamJob` spec means for the job: where its checkpoints, savepoints and
//! high-availability records go, the overrides submitted with its definition, how many
//! TaskManagers it needs, and the hash of the fields whose change needs a restart.
use freshet_crds::{StreamJob, StreamJobSpec};
use kube::ResourceExt;

use crate::Error;

/// The job-level settings derived from a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSettings {
    /// The job's name (in its definition).
    pub name: String,
    /// The job definition as YAML (what the ConfigMap holds and the JobManager is sent).
    pub definition: String,
    /// `--set`-style overrides applied to the definition.
    pub overrides: Vec<String>,
    /// Checkpoint directory.
    pub checkpoints: String,
    /// Savepoint directory.
    pub savepoints: String,
    /// The JobManager's high-availability directory.
    pub ha_dir: String,
    /// TaskManager pods.
    pub taskmanagers: i32,
    /// Memory of a TaskManager container when the spec gives none, MiB: the keyed-state budget
    /// of its slots (`state.memory_mb` each) and the process's own.
    pub taskmanager_memory_mb: usize,
    /// How long a new deployment has to prove itself before it is rolled back, ms.
    pub probation_ms: i64,
    /// Restarts of a job on probation that count as failing.
    pub max_restarts: u32,
}

/// Memory of a TaskManager process besides keyed state (batches in flight, network buffers, the
/// binary), MiB.
pub const PROCESS_MEMORY_MB: usize = 256;

impl JobSettings {
    /// Settings of `sj`; an invalid job definition is refused with the field named.
    pub fn of(sj: &StreamJob) -> Result<JobSettings, Error> {
        let spec = &sj.spec;
        let definition =
            serde_yaml::to_string(&spec.job).map_err(|e| Error::Spec(format!("spec.job: {e}")))?;
        let storage = spec.checkpointing.storage.trim_end_matches('/');
        let ns = sj.namespace().unwrap_or_else(|| "default".into());
        let name = sj.name_any();
        let checkpoints = format!("{storage}/checkpoints/{ns}/{name}");
        let savepoints = spec
            .savepoints
            .directory
            .as_deref()
            .map(|d| d.trim_end_matches('/').to_string())
            .unwrap_or_else(|| format!("{storage}/savepoints/{ns}/{name}"));
        let ha_dir = format!("{storage}/ha/{ns}/{name}");
        // every problem of the spec and of its job is reported at once
        let mut problems = Vec::new();
        let mut overrides = vec![
            format!("parallelism={}", spec.parallelism),
            format!("checkpointing.dir={checkpoints}"),
            format!("checkpointing.savepoint_dir={savepoints}"),
        ];
        match millis(&spec.checkpointing.interval, "spec.checkpointing.interval") {
            Ok(ms) => overrides.push(format!("checkpointing.interval={ms}ms")),
            Err(e) => {
                problems.push(e.to_string());
                // a stand-in, so the job is checked as it would run (never deployed: refused)
                overrides.push("checkpointing.interval=1s".into());
            }
        }
        if let Some(r) = spec.checkpointing.retain {
            overrides.push(format!("checkpointing.retain={r}"));
        }
        if let Some(s3) = &spec.checkpointing.s3 {
            if let Some(e) = &s3.endpoint {
                overrides.push(format!("checkpointing.s3.endpoint={e}"));
            }
            if let Some(r) = &s3.region {
                overrides.push(format!("checkpointing.s3.region={r}"));
            }
        }
        let (probation_ms, max_restarts) = probation(spec)
            .map_err(|e| problems.push(e.to_string()))
            .unwrap_or_default();
        // the definition with the overrides must be a valid job: checked here, so a bad spec
        // is reported on the resource before anything is stopped or deployed
        let job = freshet_connectors::job_format()
            .parse(&definition, "spec.job", &overrides)
            .map_err(|e| problems.push(e.to_string()))
            .ok();
        let job = match job {
            Some(job) if problems.is_empty() => job,
            _ => return Err(Error::Spec(problems.join("\n"))),
        };
        let slots = spec.task_managers.slots.max(1);
        let taskmanagers = spec
            .task_managers
            .replicas
            .unwrap_or((spec.parallelism + slots - 1) / slots)
            .max(1);
        Ok(JobSettings {
            name: job.name,
            definition,
            overrides,
            checkpoints,
            savepoints,
            ha_dir,
            taskmanagers,
            taskmanager_memory_mb: slots as usize * job.state.memory_mb + PROCESS_MEMORY_MB,
            probation_ms,
            max_restarts,
        })
    }
}

/// Milliseconds of a duration written as in Kubernetes (`10s`, `1m30s`, `500ms`).
pub fn millis(text: &str, field: &str) -> Result<u64, Error> {
    let d: kube::core::Duration = text
        .parse()
        .map_err(|e| Error::Spec(format!("{field}: {text:?} is not a duration: {e}")))?;
    if d.is_negative() {
        return Err(Error::Spec(format!(
            "{field}: {text:?} must not be negative"
        )));
    }
    let d: std::time::Duration = d.into();
    Ok(d.as_millis() as u64)
}

/// Hash of the spec fields whose change needs the job restarted: everything but the savepoint
/// settings, the nonces, the initial savepoint, the desired state and what deleting or a failed
/// upgrade does.
pub fn spec_hash(spec: &StreamJobSpec) -> String {
    let mut s = spec.clone();
    s.savepoint_trigger_nonce = None;
    s.restart_nonce = None;
    s.state = Default::default();
    s.initial_savepoint_path = None;
    s.deletion_policy = Default::default();
    s.rollback = Default::default();
    // the operator names the savepoint directory in every request, so the policy never
    // needs the job restarted
    s.savepoints = Default::default();
    let json = serde_json::to_vec(&s).expect("a spec serialises");
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&json))
}

/// What a change that halted was for: the hash of its whole spec but `savepointTriggerNonce`.
/// It is not tried again until the spec changes otherwise (a fixed savepoint directory, a longer
/// rollback timeout, a new `restartNonce`, anything that needs a restart).
pub fn change_target(spec: &StreamJobSpec) -> String {
    let mut s = spec.clone();
    s.savepoint_trigger_nonce = None;
    let json = serde_json::to_vec(&s).expect("a spec serialises");
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&json))
}

/// The rollback settings of a spec: how long a new deployment has to prove itself, in
/// milliseconds, and how many restarts on probation count as failing.
fn probation(spec: &StreamJobSpec) -> Result<(i64, u32), Error> {
    let timeout = match &spec.rollback.timeout {
        Some(t) => millis(t, "spec.rollback.timeout")? as i64,
        None => 5 * 60 * 1000,
    };
    Ok((
        timeout,
        spec.rollback.max_restarts.unwrap_or(3).max(0) as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(parallelism: i32) -> StreamJob {
        let mut sj: StreamJob = serde_yaml::from_str(&format!(
            r#"
apiVersion: freshet.dev/v1alpha1
kind: StreamJob
metadata: {{name: orders, namespace: shop}}
spec:
  image: freshet:1
  parallelism: {parallelism}
  taskManagers: {{slots: 2}}
  checkpointing: {{storage: "s3://state/prod/", interval: 1m30s, s3: {{endpoint: "http://minio:9000"}}}}
  job:
    version: 1
    name: orders
    sources:
      numbers: {{connector: {{type: generator, count: 10, fields: {{n: seq}}}}}}
    sinks:
      out: {{input: numbers, connector: {{type: blackhole}}}}
"#
        ))
        .unwrap();
        sj.metadata.generation = Some(1);
        sj
    }

    /// Without resources in the spec, a TaskManager's memory is its slots' keyed-state budget
    /// and the process's own; resources a user gives are kept as they are.
    #[test]
    fn taskmanager_memory_follows_the_state_budget() {
        let mut sj = job(3);
        sj.metadata.uid = Some("uid-1".into());
        sj.spec.job["state"] = serde_json::json!({"memory_mb": 512});
        let s = JobSettings::of(&sj).unwrap();
        assert_eq!(s.taskmanager_memory_mb, 2 * 512 + PROCESS_MEMORY_MB);
        let objects = crate::resources::objects(&sj, &s, true, None).unwrap();
        let pod = serde_json::to_value(&objects.taskmanager).unwrap();
        let resources = &pod["spec"]["template"]["spec"]["containers"][0]["resources"];
        assert_eq!(resources["limits"]["memory"], "1280Mi", "{resources}");
        assert_eq!(resources["requests"]["memory"], "1280Mi");
        sj.spec.task_managers.resources = Some(
            serde_json::from_value(serde_json::json!({
                "limits": {"memory": "3Gi", "cpu": "2"}
            }))
            .unwrap(),
        );
        let objects = crate::resources::objects(&sj, &s, true, None).unwrap();
        let pod = serde_json::to_value(&objects.taskmanager).unwrap();
        let resources = &pod["spec"]["template"]["spec"]["containers"][0]["resources"];
        assert_eq!(resources["limits"]["memory"], "3Gi");
        assert!(
            resources.get("requests").is_none_or(|r| r.is_null()),
            "{resources}"
        );
    }

    /// The JobManager serves its web UI and HTTP API on a named port of its Service, so
    /// `kubectl port-forward svc/<job>-jobmanager 8081` reaches it.
    #[test]
    fn the_jobmanager_serves_the_web_ui_through_its_service() {
        use crate::resources::{WEB_PORT, objects};
        let mut sj = job(3);
        sj.metadata.uid = Some("uid-1".into());
        let s = JobSettings::of(&sj).unwrap();
        let o = objects(&sj, &s, true, None).unwrap();
        let pod = serde_json::to_value(&o.jobmanager).unwrap();
        let container = &pod["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args.iter().position(|a| *a == "--http").expect("--http");
        assert_eq!(args[at + 1], format!("0.0.0.0:{WEB_PORT}"));
        assert!(
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "http" && p["containerPort"] == WEB_PORT),
            "{container}"
        );
        let service = serde_json::to_value(&o.service).unwrap();
        assert!(
            service["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "http" && p["port"] == WEB_PORT),
            "{service}"
        );
    }

    /// The pods export telemetry to the spec's collector, else the operator's, never with
    /// `none`; they are annotated for Prometheus unless the spec says not to.
    #[test]
    fn pods_export_telemetry_where_the_spec_or_the_operator_says() {
        use crate::resources::{Otlp, objects};
        use freshet_crds::OtlpProtocol;
        let mut sj = job(3);
        sj.metadata.uid = Some("uid-1".into());
        let s = JobSettings::of(&sj).unwrap();
        let env_of = |o: &crate::resources::Objects| {
            let mut out = Vec::new();
            for d in [&o.jobmanager, &o.taskmanager] {
                let pod = serde_json::to_value(d).unwrap();
                let env = pod["spec"]["template"]["spec"]["containers"][0]["env"].clone();
                let get = |name: &str| {
                    env.as_array()
                        .unwrap()
                        .iter()
                        .find(|e| e["name"] == name)
                        .map(|e| e["value"].as_str().unwrap().to_string())
                };
                out.push((
                    get("OTEL_EXPORTER_OTLP_ENDPOINT"),
                    get("OTEL_EXPORTER_OTLP_PROTOCOL"),
                    get("OTEL_RESOURCE_ATTRIBUTES"),
                    pod["spec"]["template"]["metadata"]["annotations"].clone(),
                ));
            }
            out
        };
        // nothing configured: no export, scraping annotations
        for (endpoint, _, _, annotations) in env_of(&objects(&sj, &s, true, None).unwrap()) {
            assert_eq!(endpoint, None);
            assert_eq!(annotations["prometheus.io/scrape"], "true");
            assert_eq!(annotations["prometheus.io/port"], "8080");
            assert_eq!(annotations["prometheus.io/path"], "/metrics");
        }
        // the operator's collector
        let operator = Otlp {
            endpoint: "http://collector.monitoring:4317".into(),
            protocol: Some(OtlpProtocol::Grpc),
        };
        for (endpoint, protocol, attributes, _) in
            env_of(&objects(&sj, &s, true, Some(&operator)).unwrap())
        {
            assert_eq!(
                endpoint.as_deref(),
                Some("http://collector.monitoring:4317")
            );
            assert_eq!(protocol.as_deref(), Some("grpc"));
            assert_eq!(
                attributes.as_deref(),
                Some("k8s.namespace.name=shop,k8s.pod.name=$(POD_NAME),freshet.stream_job=orders")
            );
        }
        // the spec's own collector wins, with its protocol
        sj.spec.observability.otlp_endpoint = Some("http://mine:4318".into());
        sj.spec.observability.otlp_protocol = Some(OtlpProtocol::HttpProtobuf);
        sj.spec.observability.prometheus_scrape = Some(false);
        for (endpoint, protocol, _, annotations) in
            env_of(&objects(&sj, &s, true, Some(&operator)).unwrap())
        {
            assert_eq!(endpoint.as_deref(), Some("http://mine:4318"));
            assert_eq!(protocol.as_deref(), Some("http/protobuf"));
            assert!(
                annotations.get("prometheus.io/scrape").is_none(),
                "{annotations}"
            );
        }
        // `none` turns the operator's default off
        sj.spec.observability.otlp_endpoint = Some("none".into());
        for (endpoint, ..) in env_of(&objects(&sj, &s, true, Some(&operator)).unwrap()) {
            assert_eq!(endpoint, None);
        }
    }

    #[test]
    fn settings_place_state_per_namespace_and_name() {
        let s = JobSettings::of(&job(3)).unwrap();
        assert_eq!(s.checkpoints, "s3://state/prod/checkpoints/shop/orders");
        assert_eq!(s.savepoints, "s3://state/prod/savepoints/shop/orders");
        assert_eq!(s.ha_dir, "s3://state/prod/ha/shop/orders");
        assert_eq!(
            s.taskmanagers, 2,
            "3 subtasks need 2 TaskManagers of 2 slots"
        );
        assert!(
            s.overrides
                .contains(&"checkpointing.interval=90000ms".to_string())
        );
        assert!(s.overrides.contains(&"parallelism=3".to_string()));
        assert!(
            s.overrides
                .contains(&"checkpointing.s3.endpoint=http://minio:9000".to_string())
        );
    }

    /// The StreamJobs shipped in deploy/examples hold jobs the engine accepts.
    #[test]
    fn example_stream_jobs_hold_valid_jobs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        for name in ["clicks-per-user.yaml", "revenue-per-store.yaml"] {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            let sj: StreamJob = serde_yaml::from_str(&text).unwrap();
            let s = JobSettings::of(&sj).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.name, sj.metadata.name.unwrap());
        }
    }

    #[test]
    fn an_invalid_job_is_refused_naming_the_field() {
        let mut sj = job(1);
        sj.spec.job["sinks"]["out"]["input"] = "nowhere".into();
        let e = JobSettings::of(&sj).unwrap_err().to_string();
        assert!(e.contains("nowhere"), "{e}");
    }

    /// A bad spec field and a bad job are reported together, not one per attempt.
    #[test]
    fn problems_of_the_spec_and_of_its_job_come_together() {
        let mut sj = job(1);
        sj.spec.job["sinks"]["out"]["input"] = "nowhere".into();
        sj.spec.checkpointing.interval = "soon".into();
        let e = JobSettings::of(&sj).unwrap_err().to_string();
        assert!(
            e.contains("spec.checkpointing.interval") && e.contains("nowhere"),
            "{e}"
        );
    }

    #[test]
    fn only_changes_that_need_a_restart_change_the_hash() {
        let a = job(2);
        let mut b = a.clone();
        b.spec.savepoint_trigger_nonce = Some(7);
        b.spec.savepoints.max_count = Some(3);
        b.spec.savepoints.directory = Some("s3://elsewhere/savepoints".into());
        // what deleting or a failed upgrade does is no reason to restart the job
        b.spec.deletion_policy = freshet_crds::DeletionPolicy::None;
        b.spec.rollback.timeout = Some("10m".into());
        assert_eq!(spec_hash(&a.spec), spec_hash(&b.spec));
        b.spec.parallelism = 4;
        assert_ne!(spec_hash(&a.spec), spec_hash(&b.spec));
        let mut c = a.clone();
        c.spec.image = "freshet:2".into();
        assert_ne!(spec_hash(&a.spec), spec_hash(&c.spec));
    }

    #[test]
    fn a_halted_change_waits_for_any_edit_but_a_savepoint_request() {
        let a = job(2);
        let mut b = a.clone();
        b.spec.savepoint_trigger_nonce = Some(7);
        assert_eq!(change_target(&a.spec), change_target(&b.spec));
        // a fixed savepoint directory, a longer rollback timeout, a new restartNonce: tried again
        for edit in [
            |s: &mut StreamJobSpec| s.savepoints.directory = Some("/mnt/savepoints".into()),
            |s: &mut StreamJobSpec| s.rollback.timeout = Some("30m".into()),
            |s: &mut StreamJobSpec| s.restart_nonce = Some(1),
        ] {
            let mut c = a.clone();
            edit(&mut c.spec);
            assert_ne!(change_target(&a.spec), change_target(&c.spec));
        }
    }
}

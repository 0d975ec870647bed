//! `freshet operator`: the Kubernetes operator as a process, with leader election and health
//! endpoints.
use anyhow::{Context, Result};
use std::time::Duration;

/// `freshet operator`.
#[derive(clap::Args, Debug)]
pub struct OperatorArgs {
    /// Watch StreamJobs in this namespace only (default: every namespace).
    #[arg(long, env = "FRESHET_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the leader lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader lease.
    #[arg(long, default_value = "freshet-operator")]
    lease_name: String,
    /// This replica's identity in the lease (default: the pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// A leader that has not renewed the lease for this long is replaced.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// Where the operator reaches a job's JobManager; `{name}` and `{namespace}` stand for the
    /// StreamJob's. The default is its Service, as seen from inside the cluster; an operator
    /// running elsewhere (a developer's machine, with a port-forward) names another address.
    #[arg(long, env = "FRESHET_JOBMANAGER_ADDRESS", default_value = freshet_operator::IN_CLUSTER_JOBMANAGER)]
    jobmanager_address: String,
    /// Where `/healthz`, `/readyz` and `/metrics` (reconciles, their duration and failures, by
    /// StreamJob) are served; `off`.
    #[arg(long, default_value = "off")]
    health: String,
    /// The OTLP collector StreamJobs export metrics and traces to when their spec names none
    /// (the operator exports its own there too, as `OTEL_EXPORTER_OTLP_ENDPOINT` says).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Its protocol: `grpc` or `http/protobuf`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_parser = ["grpc", "http/protobuf"])]
    otlp_protocol: Option<String>,
}

pub fn run(args: OperatorArgs) -> Result<i32> {
    let metrics = std::sync::Arc::new(freshet_operator::metrics::Metrics::default());
    let ready = crate::health::serve(&args.health, "operator")?;
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
        // a standby replica is ready too: it serves as soon as it takes the lease
        ready.set(true);
        freshet_operator::run(
            client,
            freshet_operator::Settings {
                namespace: args.namespace,
                lease_namespace: args.lease_namespace,
                lease_name: args.lease_name,
                identity,
                lease_duration: args.lease_duration,
                jobmanager_address: args.jobmanager_address,
                metrics,
                otlp: args
                    .otlp_endpoint
                    .filter(|e| !e.trim().is_empty())
                    .map(|endpoint| freshet_operator::resources::Otlp {
                        endpoint,
                        protocol: match args.otlp_protocol.as_deref() {
                            Some("grpc") => Some(freshet_crds::OtlpProtocol::Grpc),
                            Some(_) => Some(freshet_crds::OtlpProtocol::HttpProtobuf),
                            None => None,
                        },
                    }),
            },
        )
        .await
        .map_err(anyhow::Error::from)
    })?;
    Ok(0)
}

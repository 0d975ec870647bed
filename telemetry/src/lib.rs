//! OpenTelemetry for one Freshet process: the metrics and traces it exports over OTLP when the
//! standard `OTEL_*` variables ask for it, its metrics in the Prometheus text format for
//! `/metrics`, the process's own metrics (CPU, memory), and the `tracing` subscriber that writes
//! logs (text or JSON) and turns spans into traces.
//!
//! Components record through the OpenTelemetry API (`opentelemetry::global::meter`): most
//! instruments are observed when a reader collects (an OTLP export, a scrape), from counters the
//! engine bumps once per batch, so nothing here costs per-record work.
//!
//! | variable | effect |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._METRICS_ENDPOINT`, `..._TRACES_ENDPOINT`) | export over OTLP to it; without one nothing is exported (`/metrics` still works) |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` (or per signal) | `grpc` or `http/protobuf` (the default) |
//! | `OTEL_METRICS_EXPORTER`, `OTEL_TRACES_EXPORTER` | `none` turns a signal's export off |
//! | `OTEL_METRIC_EXPORT_INTERVAL` | milliseconds between metric exports (default 60 000) |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | override or add resource attributes |
//! | `FRESHET_LOG` | log filter (`warn` by default; `info`, `freshet_engine=debug`, ...) |
//! | `FRESHET_LOG_FORMAT` | `json` for one JSON object per line, with the trace and span ids |
//! | `FRESHET_TRACE` | which spans become traces (`info` by default; spans with the target `freshet::context`, which only give log lines their context, never do) |
mod process;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::Arc;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Why telemetry could not start. Retrying does not help: the settings are wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An `OTEL_*` variable holds something the exporters do not accept.
    #[error("OpenTelemetry settings: {0}")]
    Settings(String),
}

/// The telemetry of this process. Cheap to clone; [`Telemetry::shutdown`] flushes what is
/// still buffered (call it before the process exits).
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    meters: SdkMeterProvider,
    registry: prometheus::Registry,
    tracer: Option<SdkTracerProvider>,
    /// The runtime the gRPC exporters' connections live on (they are driven from the SDK's own
    /// threads, but tonic needs a runtime to spawn onto).
    _runtime: Option<tokio::runtime::Runtime>,
}

/// Where telemetry goes, as the environment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Export metrics over OTLP.
    pub otlp_metrics: bool,
    /// Export traces over OTLP.
    pub otlp_traces: bool,
    /// Whether any export goes over gRPC (it needs a runtime).
    pub grpc: bool,
    /// Logs as JSON lines.
    pub json_logs: bool,
}

impl Settings {
    /// Reads the settings through `var` (the process environment in [`init`]).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Settings, Error> {
        let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
        let exporter = |signal: &str| -> Result<bool, Error> {
            let name = format!("OTEL_{signal}_EXPORTER");
            match var(&name).as_deref().map(str::trim) {
                None | Some("") | Some("otlp") => Ok(true),
                Some("none") => Ok(false),
                Some(other) => Err(Error::Settings(format!(
                    "{name}={other}: only `otlp` and `none` are supported"
                ))),
            }
        };
        let protocol = |signal: &str| -> Result<String, Error> {
            let name = format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL");
            let value = var(&name)
                .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
                .unwrap_or_else(|| "http/protobuf".into());
            match value.trim() {
                v @ ("grpc" | "http/protobuf") => Ok(v.to_string()),
                other => Err(Error::Settings(format!(
                    "OTLP protocol {other:?} (from {name} or OTEL_EXPORTER_OTLP_PROTOCOL): use `grpc` or `http/protobuf`"
                ))),
            }
        };
        let endpoint = |signal: &str| {
            set("OTEL_EXPORTER_OTLP_ENDPOINT")
                || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
        };
        let otlp_metrics = endpoint("METRICS") && exporter("METRICS")?;
        let otlp_traces = endpoint("TRACES") && exporter("TRACES")?;
        let grpc = (otlp_metrics && protocol("METRICS")? == "grpc")
            || (otlp_traces && protocol("TRACES")? == "grpc");
        let json_logs = match var("FRESHET_LOG_FORMAT").as_deref().map(str::trim) {
            None | Some("") | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(Error::Settings(format!(
                    "FRESHET_LOG_FORMAT={other}: use `text` or `json`"
                )));
            }
        };
        Ok(Settings {
            otlp_metrics,
            otlp_traces,
            grpc,
            json_logs,
        })
    }
}

/// Starts this process's telemetry as `service` (for example `freshet-jobmanager`), unless
/// `OTEL_SERVICE_NAME` names it otherwise, and installs the global meter and tracer providers
/// and the `tracing` subscriber. Call it once, first thing.
pub fn init(service: &str) -> Result<Telemetry, Error> {
    let settings = Settings::from_vars(|name| std::env::var(name).ok())?;
    let resource = {
        let b = Resource::builder();
        let b = if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
            b
        } else {
            b.with_service_name(service.to_string())
        };
        b.with_attribute(KeyValue::new(
            "service.instance.id",
            format!("{}-{}", hostname(), std::process::id()),
        ))
        .build()
    };
    let runtime = if settings.grpc {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp")
                .enable_all()
                .build()
                .map_err(|e| Error::Settings(format!("a runtime for OTLP over gRPC: {e}")))?,
        )
    } else {
        None
    };
    let _entered = runtime.as_ref().map(|rt| rt.enter());

    let registry = prometheus::Registry::new();
    let prometheus = prometheus_reader(&registry)?;
    let mut meters = SdkMeterProvider::builder()
        .with_resource(resource.clone())
        .with_reader(prometheus);
    if settings.otlp_metrics {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .build()
            .map_err(|e| Error::Settings(format!("the OTLP metric exporter: {e}")))?;
        meters = meters.with_periodic_exporter(exporter);
    }
    let meters = meters.build();
    opentelemetry::global::set_meter_provider(meters.clone());
    process::register(&opentelemetry::global::meter("freshet"));

    let tracer = if settings.otlp_traces {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .build()
            .map_err(|e| Error::Settings(format!("the OTLP span exporter: {e}")))?;
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        Some(provider)
    } else {
        None
    };
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    install_subscriber(&settings, tracer.as_ref());
    drop(_entered);
    Ok(Telemetry {
        inner: Arc::new(Inner {
            meters,
            registry,
            tracer,
            _runtime: runtime,
        }),
    })
}

fn env_filter(var: &str, default: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env(var)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
}

fn install_subscriber(settings: &Settings, tracer: Option<&SdkTracerProvider>) {
    let logs = env_filter("FRESHET_LOG", "warn");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = if settings.json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(logs)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(logs)
            .boxed()
    };
    // the exporters' own clients log through `tracing` too: their spans must not become traces
    // that are exported, which would log again
    let spans = env_filter("FRESHET_TRACE", "info")
        .add_directive("h2=off".parse().expect("a directive"))
        .add_directive("hyper=off".parse().expect("a directive"))
        .add_directive("tonic=off".parse().expect("a directive"))
        .add_directive("tower=off".parse().expect("a directive"))
        .add_directive("reqwest=off".parse().expect("a directive"))
        .add_directive("opentelemetry=off".parse().expect("a directive"))
        // spans that only give log lines their context (a subtask's whole life) are no traces
        .add_directive("freshet::context=off".parse().expect("a directive"));
    let otel = tracer.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t.tracer("freshet"))
            .with_tracked_inactivity(false)
            .with_filter(spans)
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn prometheus_reader(
    registry: &prometheus::Registry,
) -> Result<opentelemetry_prometheus::PrometheusExporter, Error> {
    opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .scope_info_enabled(false)
        .build()
        .map_err(|e| Error::Settings(format!("the Prometheus reader: {e}")))
}

fn encode(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let families = registry.gather();
    if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Metrics recorded into a provider of their own, not the process's: what a test reads back
/// in the Prometheus text format to see what a component records.
pub struct LocalMetrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

impl LocalMetrics {
    /// An empty provider with a Prometheus reader.
    pub fn new() -> LocalMetrics {
        let registry = prometheus::Registry::new();
        let reader = prometheus_reader(&registry).expect("a Prometheus reader on a new registry");
        LocalMetrics {
            provider: SdkMeterProvider::builder().with_reader(reader).build(),
            registry,
        }
    }

    /// A meter of the provider.
    pub fn meter(&self) -> opentelemetry::metrics::Meter {
        use opentelemetry::metrics::MeterProvider;
        self.provider.meter("freshet")
    }

    /// What the provider's instruments hold, in the Prometheus text format.
    pub fn prometheus_text(&self) -> String {
        encode(&self.registry)
    }
}

impl Default for LocalMetrics {
    fn default() -> Self {
        LocalMetrics::new()
    }
}

impl Telemetry {
    /// Every metric of the process in the Prometheus text format (what `/metrics` serves).
    pub fn prometheus_text(&self) -> String {
        encode(&self.inner.registry)
    }

    /// A function rendering [`Telemetry::prometheus_text`], for HTTP servers that take one.
    pub fn prometheus_renderer(&self) -> Arc<dyn Fn() -> String + Send + Sync> {
        let t = self.clone();
        Arc::new(move || t.prometheus_text())
    }

    /// Exports what is buffered and stops the exporters. Traces get 2 seconds; the metric
    /// reader makes its last export attempt (with a collector that does not answer, `freshet
    /// run` took about 4 s to exit after Ctrl-C instead of 1).
    pub fn shutdown(&self) {
        let timeout = std::time::Duration::from_secs(2);
        if let Some(t) = &self.inner.tracer
            && let Err(e) = t.shutdown_with_timeout(timeout)
        {
            tracing::debug!(error = %e, "flushing traces");
        }
        if let Err(e) = self.inner.meters.shutdown_with_timeout(timeout) {
            tracing::debug!(error = %e, "flushing metrics");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, Error> {
        Settings::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        let s = settings(&[]).unwrap();
        assert!(!s.otlp_metrics && !s.otlp_traces && !s.grpc && !s.json_logs);
        // a protocol alone does not turn export on
        let s = settings(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap();
        assert!(!s.otlp_metrics && !s.grpc);
    }

    #[test]
    fn endpoints_protocols_and_exporters_choose_what_is_exported() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap();
        assert!(s.otlp_metrics && s.otlp_traces && s.grpc);
        let s = settings(&[
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "http://c:4318/v1/metrics",
            ),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])
        .unwrap();
        assert!(s.otlp_metrics && !s.otlp_traces && !s.grpc);
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ])
        .unwrap();
        assert!(!s.otlp_metrics && s.otlp_traces && s.grpc);
    }

    #[test]
    fn unsupported_settings_are_refused_with_the_variable() {
        let e = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("http/json") && e.contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
            "{e}"
        );
        let e = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_METRICS_EXPORTER", "prometheus"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("OTEL_METRICS_EXPORTER=prometheus"), "{e}");
        let e = settings(&[("FRESHET_LOG_FORMAT", "xml")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("FRESHET_LOG_FORMAT"), "{e}");
        assert!(
            settings(&[("FRESHET_LOG_FORMAT", "json")])
                .unwrap()
                .json_logs
        );
    }
}

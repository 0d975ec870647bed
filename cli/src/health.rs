//! Health endpoints for probes: `GET /healthz` answers 200 while the process serves, `GET
//! /readyz` answers 200 once the component is ready (503 before), with a one-line reason; and
//! `GET /metrics`, the process's metrics in the Prometheus text format.
use anyhow::{Context, Result};
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the component is ready; shared with the endpoint.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// The flag itself, for a component that sets it as its state changes.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Marks the component ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
}

/// Serves the endpoints on `listen` from a thread of their own (`off`: none).
pub fn serve(listen: &str, component: &'static str) -> Result<Readiness> {
    let ready = Readiness::default();
    if listen == "off" {
        return Ok(ready);
    }
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("--health {listen}"))?;
    listener.set_nonblocking(true)?;
    let flag = ready.clone();
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the health endpoints");
            rt.block_on(async move {
                let app = Router::new()
                    .route(
                        "/healthz",
                        get(move || async move { format!("{component} alive\n") }),
                    )
                    .route(
                        "/readyz",
                        get(move || {
                            let ready = flag.0.load(Ordering::SeqCst);
                            async move {
                                if ready {
                                    (StatusCode::OK, format!("{component} ready\n"))
                                } else {
                                    (
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        format!("{component} not ready\n"),
                                    )
                                }
                            }
                        }),
                    )
                    .route(
                        "/metrics",
                        get(move || {
                            let body = crate::telemetry().prometheus_text();
                            async move {
                                (
                                    [(
                                        axum::http::header::CONTENT_TYPE,
                                        freshet_jobmanager::http::PROMETHEUS_TEXT,
                                    )],
                                    body,
                                )
                            }
                        }),
                    );
                let listener = tokio::net::TcpListener::from_std(listener)
                    .expect("a tokio listener for the health endpoints");
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::warn!(error = %e, "health endpoints stopped");
                }
            });
        })?;
    Ok(ready)
}

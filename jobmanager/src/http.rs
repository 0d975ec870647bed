//! The JobManager's HTTP API (JSON).
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/jobs` | every job: id, name, state, duration |
//! | GET | `/jobs/{job}` | one job: state, vertices with counters, accumulators, restore source |
//! | GET | `/jobs/{job}/checkpoints` | checkpoint and savepoint history, newest last |
//! | POST | `/jobs/{job}/savepoints` | take a savepoint (`{"dir": ...}` optional); waits, returns `{"path"}` |
//! | POST | `/jobs/{job}/stop` | stop with a savepoint; returns `{"path"}` |
//! | POST | `/jobs/{job}/cancel` | cancel without a savepoint |
//! | GET | `/metrics` | the process's metrics in the Prometheus text format |
//!
//! `{job}` is a job id or the name of a job (the newest with that name). Errors are
//! `{"error": "..."}` with a 4xx/5xx status; `401` when a bearer token is required and
//! missing or wrong.
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::SocketAddr;

use freshet_security::net::{ClientAuth, Incoming, ServerStream};
use freshet_security::{Guard, Security};

use crate::checkpoints::CheckpointStats;
use crate::{JobHandle, JobManager, JobState};

fn state_name(s: &JobState) -> (&'static str, Option<String>) {
    match s {
        JobState::Failed(e) => ("failed", Some(e.clone())),
        s => (s.name(), None),
    }
}

#[derive(Serialize)]
struct JobSummary {
    id: String,
    name: String,
    state: &'static str,
    duration_ms: u64,
}

fn summary(j: &JobHandle) -> JobSummary {
    let s = j.status();
    JobSummary {
        id: j.id.0.clone(),
        name: j.plan().spec.name.clone(),
        state: state_name(&s.state).0,
        duration_ms: s.duration.as_millis() as u64,
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn not_found(job: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("no job {job}"))
}

async fn list(State(jm): State<JobManager>) -> Json<Vec<JobSummary>> {
    Json(jm.jobs().iter().map(summary).collect())
}

async fn job(State(jm): State<JobManager>, Path(job): Path<String>) -> Response {
    let Some(j) = jm.job(&job) else {
        return not_found(&job);
    };
    let status = j.status();
    let metrics = j.metrics();
    let vertices: Vec<_> = j
        .plan()
        .vertices
        .iter()
        .enumerate()
        .map(|(v, vx)| {
            let subtasks: Vec<_> = metrics
                .iter()
                .filter(|((mv, _), _)| *mv == v)
                .map(|((_, i), m)| json!({ "subtask": i, "metrics": m }))
                .collect();
            json!({ "name": vx.name, "parallelism": vx.parallelism, "subtasks": subtasks })
        })
        .collect();
    let (state, failure) = state_name(&status.state);
    Json(json!({
        "id": j.id.0,
        "name": j.plan().spec.name,
        "state": state,
        "failure": failure,
        "duration_ms": status.duration.as_millis() as u64,
        "restored_from": j.restored_from(),
        "vertices": vertices,
        "accumulators": status.accumulators,
    }))
    .into_response()
}

#[derive(Serialize)]
struct Checkpoints {
    job: String,
    history: Vec<CheckpointStats>,
}

async fn checkpoints(State(jm): State<JobManager>, Path(job): Path<String>) -> Response {
    match jm.job(&job) {
        Some(j) => Json(Checkpoints {
            job: j.id.0.clone(),
            history: j.checkpoints(),
        })
        .into_response(),
        None => not_found(&job),
    }
}

/// Body of a savepoint or stop request.
#[derive(Debug, Default, Deserialize)]
pub struct SavepointRequest {
    /// Directory to create the savepoint in (default: the job's `checkpointing.savepoint_dir`).
    #[serde(default)]
    pub dir: Option<String>,
}

async fn take_savepoint(
    jm: JobManager,
    job: String,
    body: Option<Json<SavepointRequest>>,
    stop: bool,
) -> Response {
    let Some(j) = jm.job(&job) else {
        return not_found(&job);
    };
    if j.status().state != JobState::Running {
        return error(StatusCode::CONFLICT, format!("job {} is not running", j.id));
    }
    let dir = body.and_then(|b| b.0.dir);
    let result = tokio::task::spawn_blocking(move || j.savepoint(dir.as_deref(), stop)).await;
    match result {
        Ok(Ok(path)) => Json(json!({ "path": path })).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn savepoint(
    State(jm): State<JobManager>,
    Path(job): Path<String>,
    body: Option<Json<SavepointRequest>>,
) -> Response {
    take_savepoint(jm, job, body, false).await
}

async fn stop(
    State(jm): State<JobManager>,
    Path(job): Path<String>,
    body: Option<Json<SavepointRequest>>,
) -> Response {
    take_savepoint(jm, job, body, true).await
}

async fn cancel(State(jm): State<JobManager>, Path(job): Path<String>) -> Response {
    let Some(j) = jm.job(&job) else {
        return not_found(&job);
    };
    // cancelling may write the job store and reach TaskManagers: blocking work
    let id = j.id.0.clone();
    match tokio::task::spawn_blocking(move || j.cancel()).await {
        Ok(()) => Json(json!({ "cancelled": id })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the process's metrics in the Prometheus text format.
pub type MetricsText = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// The API's routes, `/metrics` too when `metrics` is given.
pub fn router(jm: JobManager, metrics: Option<MetricsText>) -> Router {
    let routes = match metrics {
        Some(render) => Router::new().route(
            "/metrics",
            get(move || {
                let body = render();
                async move { ([(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)], body) }
            }),
        ),
        None => Router::new(),
    };
    routes
        .route("/jobs", get(list))
        .route("/jobs/{job}", get(job))
        .route("/jobs/{job}/checkpoints", get(checkpoints))
        .route("/jobs/{job}/savepoints", post(savepoint))
        .route("/jobs/{job}/stop", post(stop))
        .route("/jobs/{job}/cancel", post(cancel))
        .with_state(jm)
}

/// Serves the API on `addr` from a thread of its own; returns the bound address. With
/// tokens configured every request needs `Authorization: Bearer <token>`; with TLS, the API
/// is served over TLS and tokens are required (a browser or `curl` has no cluster certificate).
pub fn serve(
    jm: JobManager,
    addr: &str,
    security: &Security,
    metrics: Option<MetricsText>,
) -> std::io::Result<SocketAddr> {
    if security.tls.is_some() && security.tokens.is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an HTTP API with TLS needs bearer tokens (--auth-token-file) to tell who calls",
        ));
    }
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let security = security.clone();
    let app = router(jm, metrics).layer(axum::middleware::from_fn_with_state(
        security.guard(),
        authorize,
    ));
    std::thread::Builder::new()
        .name("jobmanager-http".into())
        .spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|rt| {
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        let incoming = security.incoming(listener, ClientAuth::Optional)?;
                        axum::serve(Accepted(incoming), app).await
                    })
                });
            if let Err(e) = served {
                tracing::warn!(error = %e, "the HTTP API stopped");
            }
        })?;
    Ok(local)
}

/// Refuses a request without a token the guard accepts.
async fn authorize(
    State(guard): State<Guard>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match guard.bearer(header) {
        Ok(()) => next.run(request).await,
        Err(why) => {
            let mut r = error(StatusCode::UNAUTHORIZED, why);
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

/// The connections the API serves (through TLS when configured).
struct Accepted(Incoming);

impl axum::serve::Listener for Accepted {
    type Io = ServerStream;
    type Addr = Option<SocketAddr>;

    async fn accept(&mut self) -> (ServerStream, Option<SocketAddr>) {
        match self.0.next().await {
            Some(s) => {
                let addr = s.peer().addr;
                (s, addr)
            }
            // the accepting task ended with the runtime: nothing more will come
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        Ok(Some(self.0.local_addr()))
    }
}

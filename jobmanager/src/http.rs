//! The JobManager's HTTP API (JSON) and the web UI on top of it.
//!
//! | method | path | reply |
//! |---|---|---|
//! | GET | `/` | the web UI (assets under `/ui/`, embedded in the binary) |
//! | GET | `/openapi.json` | the OpenAPI document of this API |
//! | GET | `/jobs` | [`JobOverview`] of every job |
//! | GET | `/jobs/{job}` | [`JobDetails`]: graph, counters and rates per vertex and subtask |
//! | GET | `/jobs/{job}/checkpoints` | [`CheckpointHistory`], newest last |
//! | GET | `/jobs/{job}/exceptions` | [`JobException`]s of failed attempts, newest last |
//! | GET | `/jobs/{job}/definition` | the job's definition as it was submitted ([`JobSpec`]) |
//! | POST | `/jobs/{job}/savepoints` | take a savepoint ([`SavepointRequest`] optional); waits |
//! | POST | `/jobs/{job}/stop` | stop with a savepoint; waits |
//! | POST | `/jobs/{job}/cancel` | cancel without a savepoint |
//! | GET | `/taskmanagers` | [`TaskManagerView`] of every TaskManager and its slots |
//! | GET | `/metrics` | the process's metrics in the Prometheus text format |
//!
//! A savepoint or stop request with a W3C `traceparent` header gets its checkpoint trace under
//! the caller's. `{job}` is a job id or the name of a job (the newest with that name). Errors are
//! [`ApiError`]s with a 4xx/5xx status; `401` when a bearer token is required and missing or
//! wrong. The UI, its assets and the OpenAPI document hold no job data and need no token.
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use schemars::generate::SchemaGenerator;
use schemars::{JsonSchema, Schema};
use serde_json::{Value, json};
use std::net::SocketAddr;

use freshet_security::net::{ClientAuth, Incoming, ServerStream};
use freshet_security::{Guard, Security};

pub use crate::api::SavepointRequest;
use crate::api::{
    ApiError, Cancelled, CheckpointHistory, JobDetails, JobException, JobOverview, SavepointDone,
    TaskManagerView,
};
use crate::{JobHandle, JobManager, JobState};
use freshet_job::JobSpec;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

fn not_found(job: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("no job {job}"))
}

fn with_job(jm: &JobManager, job: &str, f: impl FnOnce(JobHandle) -> Response) -> Response {
    match jm.job(job) {
        Some(j) => f(j),
        None => not_found(job),
    }
}

async fn list(State(jm): State<JobManager>) -> Json<Vec<JobOverview>> {
    Json(jm.jobs().iter().map(JobOverview::of).collect())
}

async fn job(State(jm): State<JobManager>, Path(job): Path<String>) -> Response {
    with_job(&jm, &job, |j| Json(JobDetails::of(&j)).into_response())
}

async fn checkpoints(State(jm): State<JobManager>, Path(job): Path<String>) -> Response {
    with_job(&jm, &job, |j| {
        Json(CheckpointHistory::of(&j)).into_response()
    })
}

async fn exceptions(State(jm): State<JobManager>, Path(job): Path<String>) -> Response {
    with_job(&jm, &job, |j| Json(j.exceptions()).into_response())
}

async fn definition(State(jm): State<JobManager>, Path(job): Path<String>) -> Response {
    // a definition names where its secrets are, never their values
    with_job(&jm, &job, |j| Json(&*j.plan().spec).into_response())
}

async fn taskmanagers(State(jm): State<JobManager>) -> Json<Vec<TaskManagerView>> {
    Json(TaskManagerView::all(&jm))
}

async fn take_savepoint(
    jm: JobManager,
    job: String,
    headers: HeaderMap,
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
    // a caller that sends its trace context gets the savepoint's trace under its own
    let trace = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let result =
        tokio::task::spawn_blocking(move || j.savepoint(dir.as_deref(), stop, trace.as_deref()))
            .await;
    match result {
        Ok(Ok(path)) => Json(SavepointDone { path }).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn savepoint(
    State(jm): State<JobManager>,
    Path(job): Path<String>,
    headers: HeaderMap,
    body: Option<Json<SavepointRequest>>,
) -> Response {
    take_savepoint(jm, job, headers, body, false).await
}

async fn stop(
    State(jm): State<JobManager>,
    Path(job): Path<String>,
    headers: HeaderMap,
    body: Option<Json<SavepointRequest>>,
) -> Response {
    take_savepoint(jm, job, headers, body, true).await
}

async fn cancel(State(jm): State<JobManager>, Path(job): Path<String>) -> Response {
    let Some(j) = jm.job(&job) else {
        return not_found(&job);
    };
    // cancelling may write the job store and reach TaskManagers: blocking work
    let id = j.id.0.clone();
    match tokio::task::spawn_blocking(move || j.cancel()).await {
        Ok(()) => Json(Cancelled { cancelled: id }).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// One operation of the API, as the OpenAPI document describes it.
struct Operation {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    body: Option<fn(&mut SchemaGenerator) -> Schema>,
    reply: fn(&mut SchemaGenerator) -> Schema,
    /// Error statuses besides 401.
    errors: &'static [(u16, &'static str)],
}

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

const NO_JOB: (u16, &str) = (404, "no such job");
const SAVEPOINT_ERRORS: &[(u16, &str)] = &[
    NO_JOB,
    (409, "the job is not running"),
    (500, "the savepoint failed"),
];

/// Every JSON operation of the API (the UI and `/metrics` are not JSON).
const OPERATIONS: &[Operation] = &[
    Operation {
        method: "get",
        path: "/jobs",
        summary: "Every job, oldest first",
        body: None,
        reply: schema::<Vec<JobOverview>>,
        errors: &[],
    },
    Operation {
        method: "get",
        path: "/jobs/{job}",
        summary: "A job's graph with counters and rates per vertex and subtask",
        body: None,
        reply: schema::<JobDetails>,
        errors: &[NO_JOB],
    },
    Operation {
        method: "get",
        path: "/jobs/{job}/checkpoints",
        summary: "A job's checkpoint and savepoint history, newest last",
        body: None,
        reply: schema::<CheckpointHistory>,
        errors: &[NO_JOB],
    },
    Operation {
        method: "get",
        path: "/jobs/{job}/exceptions",
        summary: "The failed attempts of a job, newest last",
        body: None,
        reply: schema::<Vec<JobException>>,
        errors: &[NO_JOB],
    },
    Operation {
        method: "get",
        path: "/jobs/{job}/definition",
        summary: "The job's definition as it was submitted (secrets appear as references)",
        body: None,
        reply: schema::<JobSpec>,
        errors: &[NO_JOB],
    },
    Operation {
        method: "post",
        path: "/jobs/{job}/savepoints",
        summary: "Takes a savepoint and waits for it",
        body: Some(schema::<SavepointRequest>),
        reply: schema::<SavepointDone>,
        errors: SAVEPOINT_ERRORS,
    },
    Operation {
        method: "post",
        path: "/jobs/{job}/stop",
        summary: "Stops a job with a savepoint and waits for it",
        body: Some(schema::<SavepointRequest>),
        reply: schema::<SavepointDone>,
        errors: SAVEPOINT_ERRORS,
    },
    Operation {
        method: "post",
        path: "/jobs/{job}/cancel",
        summary: "Cancels a job without a savepoint",
        body: None,
        reply: schema::<Cancelled>,
        errors: &[NO_JOB],
    },
    Operation {
        method: "get",
        path: "/taskmanagers",
        summary: "Every TaskManager and its slots",
        body: None,
        reply: schema::<Vec<TaskManagerView>>,
        errors: &[],
    },
];

/// The OpenAPI (3.0) document of the JSON API.
pub fn openapi() -> Value {
    let mut g = schemars::generate::SchemaSettings::openapi3().into_generator();
    let inline = |g: &mut SchemaGenerator, f: fn(&mut SchemaGenerator) -> Schema| {
        let mut s = f(g);
        for t in g.transforms_mut() {
            t.transform(&mut s);
        }
        s.to_value()
    };
    let error = inline(&mut g, schema::<ApiError>);
    let json_content = |s: Value| json!({ "application/json": { "schema": s } });
    let mut paths = serde_json::Map::new();
    for op in OPERATIONS {
        let mut responses = serde_json::Map::new();
        responses.insert(
            "200".into(),
            json!({ "description": "OK", "content": json_content(inline(&mut g, op.reply)) }),
        );
        for (status, why) in op.errors.iter().chain(&[(401, "a bearer token is needed")]) {
            responses.insert(
                status.to_string(),
                json!({ "description": why, "content": json_content(error.clone()) }),
            );
        }
        let mut operation = json!({
            "summary": op.summary,
            "responses": responses,
            "security": [{ "bearer": [] }],
        });
        if op.path.contains("{job}") {
            operation["parameters"] = json!([{
                "name": "job",
                "in": "path",
                "required": true,
                "description": "A job id, or a job name (the newest job with that name)",
                "schema": { "type": "string" },
            }]);
        }
        if let Some(body) = op.body {
            operation["requestBody"] =
                json!({ "required": false, "content": json_content(inline(&mut g, body)) });
        }
        let item = paths.entry(op.path).or_insert_with(|| json!({}));
        item[op.method] = operation;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Freshet JobManager API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Jobs, their graphs and counters, checkpoints, savepoints and TaskManagers.",
        },
        "paths": paths,
        "components": {
            "schemas": g.take_definitions(true),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Needed when the JobManager is started with --auth-token-file",
                },
            },
        },
    })
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
                async move { ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], body) }
            }),
        ),
        None => Router::new(),
    };
    let openapi = openapi();
    routes
        .route("/openapi.json", get(move || async move { Json(openapi) }))
        .merge(crate::ui::routes())
        .route("/jobs", get(list))
        .route("/jobs/{job}", get(job))
        .route("/jobs/{job}/checkpoints", get(checkpoints))
        .route("/jobs/{job}/exceptions", get(exceptions))
        .route("/jobs/{job}/definition", get(definition))
        .route("/taskmanagers", get(taskmanagers))
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
    if crate::ui::is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match guard.bearer(header) {
        Ok(()) => next.run(request).await,
        Err(why) => {
            let mut r = error(StatusCode::UNAUTHORIZED, why);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
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

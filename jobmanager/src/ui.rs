//! The web UI: a page, a script and a style sheet embedded in the binary (it works offline and
//! needs no other server), served at `/` and under `/ui/`. The page reads the JSON API of
//! [`crate::http`]: jobs, a job's graph with live rates, checkpoints, exceptions and
//! TaskManagers, and triggers savepoints and cancellation through it.
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/style.css");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The UI's routes.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// Whether a path is served without a token: the UI's assets and the OpenAPI document, which
/// hold no job data (the page asks for a token when the API wants one).
pub fn is_public(path: &str) -> bool {
    path == "/" || path.starts_with("/ui/") || path == "/openapi.json"
}

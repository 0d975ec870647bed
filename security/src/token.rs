//! Bearer tokens: the ones a server accepts (from a file, re-read when it changes, so a token
//! can be rotated without a restart), the one a client sends, and the check of each call.
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tonic::Status;
use tracing::{info, warn};

use crate::{Error, Result};

/// Who is at the other end of a server connection, as far as the transport can tell.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The remote address.
    pub addr: Option<SocketAddr>,
    /// Whether it presented a certificate signed by the cluster's CA (a Freshet process, or a
    /// client given one).
    pub certified: bool,
}

/// The tokens a server accepts: the non-empty lines of a file (`#` starts a comment). Several
/// lines let an old and a new token both work while clients move over.
pub struct Tokens {
    path: PathBuf,
    current: Mutex<Current>,
}

struct Current {
    tokens: Vec<Vec<u8>>,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({})", self.path.display())
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

fn parse(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

fn read(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error(format!("token file {}: {e}", path.display())))?;
    let tokens = parse(&text);
    if tokens.is_empty() {
        return Err(Error(format!(
            "token file {}: no token in it",
            path.display()
        )));
    }
    Ok(tokens)
}

impl Tokens {
    /// The tokens in `path`; an unreadable or empty file is refused now.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Arc<Tokens>> {
        let path = path.into();
        let tokens = read(&path)?;
        Ok(Arc::new(Tokens {
            current: Mutex::new(Current {
                tokens,
                stamp: stamp(&path),
                checked: Instant::now(),
            }),
            path,
        }))
    }

    /// Whether `presented` is one of the tokens (compared in constant time).
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut cur = self.current.lock();
        if cur.checked.elapsed() >= Duration::from_secs(1) {
            cur.checked = Instant::now();
            let now = stamp(&self.path);
            if now != cur.stamp {
                cur.stamp = now;
                match read(&self.path) {
                    Ok(t) => {
                        info!(file = %self.path.display(), "token file changed; accepting its tokens");
                        cur.tokens = t;
                    }
                    Err(e) => {
                        warn!(error = %e, "token file changed but is unusable; keeping the previous tokens")
                    }
                }
            }
        }
        // every token is compared, whatever matched, so timing tells nothing about which
        cur.tokens
            .iter()
            .fold(false, |ok, t| constant_time_eq(t, presented) | ok)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The token a client reads from `path`: its first non-empty, non-comment line.
pub fn read_token(path: &Path) -> Result<String> {
    let tokens = read(path)?;
    String::from_utf8(tokens[0].clone())
        .map_err(|_| Error(format!("token file {}: not UTF-8", path.display())))
}

/// Who may call a server, and the check of each call.
///
/// - Calls between the cluster's own processes (`internal`): with TLS, only a peer that
///   presented a certificate of the cluster's CA.
/// - Calls by clients (`client`): such a certificate, or a bearer token the server accepts.
/// - Without TLS and without tokens everything is open (a single machine on loopback).
#[derive(Clone, Debug, Default)]
pub struct Guard {
    tls: bool,
    tokens: Option<Arc<Tokens>>,
}

impl Guard {
    /// A guard for a server with TLS on or off and these tokens.
    pub fn new(tls: bool, tokens: Option<Arc<Tokens>>) -> Guard {
        Guard { tls, tokens }
    }

    /// Whether callers prove who they are (TLS or tokens are configured).
    pub fn enforced(&self) -> bool {
        self.tls || self.tokens.is_some()
    }

    /// Whether bearer tokens are configured.
    pub fn has_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    fn certified<T>(req: &tonic::Request<T>) -> bool {
        req.extensions().get::<Peer>().is_some_and(|p| p.certified)
    }

    /// A call another process of the cluster makes.
    #[allow(clippy::result_large_err)]
    pub fn internal<T>(&self, req: &tonic::Request<T>) -> std::result::Result<(), Status> {
        if !self.tls || Self::certified(req) {
            return Ok(());
        }
        Err(Status::unauthenticated(
            "only the cluster's own processes may make this call: present a certificate of its CA",
        ))
    }

    /// A call a client makes.
    #[allow(clippy::result_large_err)]
    pub fn client<T>(&self, req: &tonic::Request<T>) -> std::result::Result<(), Status> {
        if self.tls && Self::certified(req) {
            return Ok(());
        }
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.bearer(header).map_err(Status::unauthenticated)
    }

    /// Checks an `Authorization` header value: `Bearer <token>`. With no tokens configured,
    /// everything passes unless TLS is on (then a client needs a certificate, checked by the
    /// caller).
    pub fn bearer(&self, header: Option<&str>) -> std::result::Result<(), &'static str> {
        let Some(tokens) = &self.tokens else {
            return if self.tls {
                Err("this server accepts only clients with a certificate of the cluster's CA")
            } else {
                Ok(())
            };
        };
        let Some(header) = header else {
            return Err("a bearer token is required (Authorization: Bearer <token>)");
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .unwrap_or("");
        if tokens.accepts(token.trim().as_bytes()) {
            Ok(())
        } else {
            Err("the bearer token is not valid")
        }
    }
}

/// Adds a client's bearer token to every gRPC call.
#[derive(Clone, Debug, Default)]
pub struct ClientToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl ClientToken {
    /// Sends `token`, if any.
    pub fn new(token: Option<&str>) -> Result<ClientToken> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error("a token must be printable ASCII".into()))
            })
            .transpose()
            .map(ClientToken)
    }
}

impl tonic::service::Interceptor for ClientToken {
    /// Adds the token, and the trace context of the calling span (W3C `traceparent`), so the
    /// server's spans join the caller's trace.
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            let mut v = v.clone();
            v.set_sensitive(true);
            req.metadata_mut().insert("authorization", v);
        }
        if let Some(tp) = current_traceparent()
            && let Ok(v) = tp.parse()
        {
            req.metadata_mut().insert("traceparent", v);
        }
        Ok(req)
    }
}

/// The `traceparent` of the current span, when it is recorded in a trace.
fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// The `traceparent` a request carries, if any.
pub fn traceparent<T>(req: &tonic::Request<T>) -> Option<String> {
    req.metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_reread_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "# rotated monthly\nold-token\n").unwrap();
        let tokens = Tokens::from_file(&path).unwrap();
        assert!(tokens.accepts(b"old-token"));
        assert!(!tokens.accepts(b"old-toke"));
        assert!(!tokens.accepts(b"# rotated monthly"));
        std::fs::write(&path, "new-token-with-another-length\n").unwrap();
        tokens.current.lock().checked = Instant::now() - Duration::from_secs(2);
        assert!(tokens.accepts(b"new-token-with-another-length"));
        assert!(!tokens.accepts(b"old-token"));
        // an emptied file keeps the tokens that worked
        std::fs::write(&path, "\n").unwrap();
        tokens.current.lock().checked = Instant::now() - Duration::from_secs(2);
        assert!(tokens.accepts(b"new-token-with-another-length"));
        std::fs::write(dir.path().join("empty"), "# nothing\n").unwrap();
        assert!(Tokens::from_file(dir.path().join("empty")).is_err());
    }

    #[test]
    fn the_guard_tells_clients_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let guard = Guard::new(false, Some(Tokens::from_file(&path).unwrap()));
        assert!(guard.bearer(Some("Bearer s3cret")).is_ok());
        assert!(guard.bearer(Some("Bearer wrong")).is_err());
        assert!(guard.bearer(Some("s3cret")).is_err());
        assert!(guard.bearer(None).unwrap_err().contains("required"));
        assert!(Guard::new(false, None).bearer(None).is_ok());
        assert!(
            Guard::new(true, None)
                .bearer(Some("Bearer s3cret"))
                .is_err()
        );
        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(Peer {
            addr: None,
            certified: true,
        });
        assert!(Guard::new(true, None).internal(&req).is_ok());
        assert!(Guard::new(true, None).client(&req).is_ok());
        assert!(
            Guard::new(true, None)
                .internal(&tonic::Request::new(()))
                .is_err()
        );
        assert!(
            Guard::new(false, None)
                .internal(&tonic::Request::new(()))
                .is_ok()
        );
    }
}

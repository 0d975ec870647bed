//! A client of a schema registry speaking the Confluent REST API (Confluent Schema Registry,
//! Karapace, Apicurio's `ccompat` endpoint, Redpanda): fetching a schema by its id, registering
//! a schema under a subject, and checking the registry answers.
//!
//! Schemas never change once registered, so fetched ones are cached for the client's life.
//! Requests are rare (a new schema id, a sink opening), so each runs on a short-lived thread of
//! its own: the blocking HTTP client may then be used from any context, planning included.
//! An error says whether trying again can help: a registry that does not answer or answers
//! 5xx may recover; a refusal (unknown id, incompatible schema, bad credentials) will not.
use apache_avro::Schema;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use freshet_engine::EngineError;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of a registration or check that failed for a reason that may pass. A schema is
/// fetched once per call: a source that cannot get one waits and asks again itself, without
/// holding its thread (and so its checkpoints) for long.
const ATTEMPTS: u32 = 3;
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Where the registry is, as a job names it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Base URL of the registry's Confluent-compatible API, e.g. `http://registry:8081`
    /// (Apicurio: `http://host:8080/apis/ccompat/v7`).
    pub url: String,
    /// User for HTTP basic authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for HTTP basic authentication.
    #[serde(default)]
    pub password: Option<String>,
}

/// Why a registry request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    /// No answer, or a server error: trying again later may help.
    #[error("schema registry at {url}: {message}")]
    Unavailable {
        /// The registry.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The registry refused the request: trying again will not help.
    #[error("schema registry at {url}: {message}")]
    Refused {
        /// The registry.
        url: String,
        /// HTTP status.
        status: u16,
        /// What the registry said.
        message: String,
    },
}

impl RegistryError {
    /// Whether trying again may help.
    pub fn retryable(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }
}

impl From<RegistryError> for EngineError {
    fn from(e: RegistryError) -> Self {
        EngineError::External {
            retryable: e.retryable(),
            message: e.to_string(),
        }
    }
}

/// A client of one registry.
pub struct SchemaRegistry {
    settings: RegistrySettings,
    url: String,
    schemas: Mutex<HashMap<u32, Arc<Schema>>>,
}

impl SchemaRegistry {
    /// A client of the registry `settings` names (nothing is requested yet).
    pub fn new(settings: &RegistrySettings) -> Self {
        SchemaRegistry {
            url: settings.url.trim_end_matches('/').to_string(),
            settings: settings.clone(),
            schemas: Mutex::new(HashMap::new()),
        }
    }

    /// The registry's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Checks the registry answers (it lists its subjects), trying again a few times.
    pub fn check(&self) -> Result<(), RegistryError> {
        self.request(Method::Get, "/subjects", None).map(|_| ())
    }

    /// The Avro schema registered with `id`, from the cache or the registry (one attempt).
    pub fn schema(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(s) = self.schemas.lock().get(&id) {
            return Ok(s.clone());
        }
        let body = self.request_once(Method::Get, &format!("/schemas/ids/{id}"), None)?;
        let refused = |message: String| RegistryError::Refused {
            url: self.url.clone(),
            status: 200,
            message,
        };
        if let Some(kind) = body.get("schemaType").and_then(|t| t.as_str())
            && kind != "AVRO"
        {
            return Err(refused(format!("schema {id} is {kind}, not Avro")));
        }
        if body
            .get("references")
            .and_then(|r| r.as_array())
            .is_some_and(|r| !r.is_empty())
        {
            return Err(refused(format!(
                "schema {id} refers to other subjects' schemas, which is not supported"
            )));
        }
        let text = body
            .get("schema")
            .and_then(|s| s.as_str())
            .ok_or_else(|| refused(format!("the answer for schema {id} has no schema")))?;
        let schema = Arc::new(
            Schema::parse_str(text)
                .map_err(|e| refused(format!("schema {id} is not valid Avro: {e}")))?,
        );
        self.schemas.lock().insert(id, schema.clone());
        Ok(schema)
    }

    /// Registers `schema` under `subject` (or finds it registered) and returns its id, trying
    /// again a few times while the registry does not answer. The registry refuses a schema its
    /// compatibility rules for the subject do not allow.
    pub fn register(&self, subject: &str, schema: &Schema) -> Result<u32, RegistryError> {
        let body = serde_json::json!({ "schema": schema.canonical_form() });
        let answer = self.request(
            Method::Post,
            &format!("/subjects/{}/versions", encode_path(subject)),
            Some(body),
        )?;
        let id = answer
            .get("id")
            .and_then(|i| i.as_u64())
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| RegistryError::Refused {
                url: self.url.clone(),
                status: 200,
                message: format!("registering under '{subject}' returned no id: {answer}"),
            })?;
        self.schemas.lock().insert(id, Arc::new(schema.clone()));
        Ok(id)
    }

    /// One request, tried again while the failure may pass; the answer's JSON body.
    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, RegistryError> {
        let mut wait = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.request_once(method, path, body.as_ref()) {
                Err(e) if e.retryable() && attempt < ATTEMPTS => {
                    tracing::warn!("{e}; trying again in {wait:?}");
                    std::thread::sleep(wait);
                    wait *= 4;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn request_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, RegistryError> {
        let url = format!("{}{path}", self.url);
        let unavailable = |message: String| RegistryError::Unavailable {
            url: self.url.clone(),
            message,
        };
        // a thread of its own: the blocking client runs a runtime that must not live inside
        // another one (planning runs inside the JobManager's)
        std::thread::scope(|s| {
            s.spawn(|| {
                // TLS takes the process's crypto provider: ring, as everywhere else (an error
                // only says one is installed already)
                let _ = rustls::crypto::ring::default_provider().install_default();
                let client = reqwest::blocking::Client::builder()
                    .timeout(REQUEST_TIMEOUT)
                    .build()
                    .map_err(|e| unavailable(format!("HTTP client: {e}")))?;
                let mut req = match method {
                    Method::Get => client.get(&url),
                    Method::Post => client.post(&url),
                };
                req = req.header("Accept", CONTENT_TYPE);
                if let Some(b) = body {
                    req = req.header("Content-Type", CONTENT_TYPE).body(b.to_string());
                }
                if let Some(user) = &self.settings.username {
                    req = req.basic_auth(user, self.settings.password.as_ref());
                }
                let resp = req
                    .send()
                    .map_err(|e| unavailable(format!("{method:?} {path}: {e}")))?;
                let status = resp.status();
                let text = resp.text().map_err(|e| {
                    unavailable(format!("{method:?} {path}: reading the answer: {e}"))
                })?;
                if status.is_server_error() {
                    return Err(unavailable(format!("{method:?} {path}: {status}: {text}")));
                }
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|_| RegistryError::Refused {
                        url: self.url.clone(),
                        status: status.as_u16(),
                        message: format!("{method:?} {path}: {status}, not JSON: {text}"),
                    })?;
                if !status.is_success() {
                    let said = json
                        .get("message")
                        .and_then(|m| m.as_str())
                        .map_or_else(|| json.to_string(), str::to_string);
                    return Err(RegistryError::Refused {
                        url: self.url.clone(),
                        status: status.as_u16(),
                        message: format!("{method:?} {path}: {status}: {said}"),
                    });
                }
                Ok(json)
            })
            .join()
            .unwrap_or_else(|_| Err(unavailable("the request thread panicked".into())))
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Method {
    Get,
    Post,
}

/// A subject as one path segment.
fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_path_segment() {
        assert_eq!(encode_path("sales-value"), "sales-value");
        assert_eq!(encode_path("a/b c"), "a%2Fb%20c");
    }

    /// Nothing listens on the port: the error says the registry may come back.
    #[test]
    fn an_unreachable_registry_is_retryable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = SchemaRegistry::new(&RegistrySettings {
            url: format!("http://127.0.0.1:{port}/"),
            username: None,
            password: None,
        });
        let e = r.schema(1).unwrap_err();
        assert!(e.retryable(), "{e}");
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}

//! References to secrets. A job names where a secret is (`env:NAME`, `file:/path`), never the
//! secret itself, so the job definition can be stored, shown and sent to every TaskManager
//! without giving anything away. The reference is resolved by the process that needs the value,
//! when it needs it.
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::PathBuf;

/// Where a secret is.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// An environment variable of the process that uses it.
    Env(String),
    /// A file (e.g. a mounted Kubernetes Secret); surrounding whitespace is ignored.
    File(PathBuf),
}

impl SecretRef {
    /// Parses `env:NAME` or `file:/path`.
    pub fn parse(s: &str) -> Result<SecretRef, String> {
        let refuse = || {
            "a secret is never written into a job: write where it is, as env:NAME or file:/path"
                .to_string()
        };
        if let Some(name) = s.strip_prefix("env:") {
            let ok = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            return if ok {
                Ok(SecretRef::Env(name.to_string()))
            } else {
                Err(format!("env:{name} is not an environment variable name"))
            };
        }
        match s.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SecretRef::File(PathBuf::from(path))),
            _ => Err(refuse()),
        }
    }

    /// Reads the secret. The error names the reference, never the value.
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            SecretRef::Env(name) => std::env::var(name)
                .map_err(|_| format!("env:{name}: the variable is not set in this process")),
            SecretRef::File(path) => std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("file:{}: {e}", path.display())),
        }
    }
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl std::fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SecretRef::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for SecretRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for SecretRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SecretRef".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Where a secret is: env:NAME (an environment variable of the process that uses it) or file:/path (e.g. a mounted Secret). Never the secret itself.",
            "format": "secret-ref"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_references_are_accepted() {
        assert_eq!(
            SecretRef::parse("env:AWS_SECRET_ACCESS_KEY"),
            Ok(SecretRef::Env("AWS_SECRET_ACCESS_KEY".into()))
        );
        assert_eq!(
            SecretRef::parse("file:/var/run/secrets/s3/key"),
            Ok(SecretRef::File("/var/run/secrets/s3/key".into()))
        );
        let err = SecretRef::parse("wJalrXUtnFEMI/K7MDENG").unwrap_err();
        assert!(err.contains("never written into a job"), "{err}");
        assert!(
            !err.contains("wJalr"),
            "the refusal repeats the secret: {err}"
        );
        assert!(SecretRef::parse("env:1X").is_err());
        assert!(SecretRef::parse("file:").is_err());
    }

    #[test]
    fn resolving_names_the_reference_not_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        let r = SecretRef::File(path.clone());
        assert_eq!(r.resolve().unwrap(), "s3cr3t");
        assert_eq!(format!("{r:?}"), format!("file:{}", path.display()));
        let missing = SecretRef::Env("FRESHET_TEST_UNSET_VARIABLE".into());
        assert!(
            missing
                .resolve()
                .unwrap_err()
                .contains("env:FRESHET_TEST_UNSET_VARIABLE")
        );
    }
}

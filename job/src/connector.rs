//! Connectors as a job names them, and the catalog of connectors a job format knows.
//!
//! A job holds a connector as its `type` and its settings, untyped: the connector itself (in
//! `freshet-connectors`) declares its settings as a typed configuration, checks them and builds
//! sources and sinks from them. The [`Catalog`] carries each connector's configuration schema, so
//! the job's JSON Schema (and the structural check of a job against it) covers every field of
//! every connector without this crate knowing any of them.
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::borrow::Cow;

/// A connector as the job names it: `{type: file, path: …, format: jsonl}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnectorSpec {
    /// The connector's type (`file`, `kafka`, …).
    pub kind: String,
    /// Its settings: every field but `type`.
    pub config: Map<String, Value>,
}

impl ConnectorSpec {
    /// A connector of type `kind` with the settings of `config` (a JSON object).
    pub fn new(kind: impl Into<String>, config: Value) -> Self {
        ConnectorSpec {
            kind: kind.into(),
            config: match config {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        }
    }

    /// A text setting, if the connector has it.
    pub fn text(&self, field: &str) -> Option<&str> {
        self.config.get(field).and_then(Value::as_str)
    }
}

impl Serialize for ConnectorSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut all = Map::new();
        all.insert("type".into(), Value::String(self.kind.clone()));
        for (k, v) in &self.config {
            all.insert(k.clone(), v.clone());
        }
        all.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ConnectorSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut config = Map::<String, Value>::deserialize(d)?;
        match config.remove("type") {
            Some(Value::String(kind)) => Ok(ConnectorSpec { kind, config }),
            Some(_) => Err(D::Error::custom("`type` must be a connector name")),
            None => Err(D::Error::missing_field("type")),
        }
    }
}

/// The schema of a connector of one role before [`Catalog::patch`] fills in the connectors:
/// any `{type: …}`.
fn role_schema(what: &str) -> Schema {
    json_schema!({
        "description": what,
        "type": "object",
        "properties": {"type": {"type": "string"}},
        "required": ["type"],
    })
}

/// A source connector: `{type: …}` and the connector's settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SourceConnectorSpec(pub ConnectorSpec);

/// A sink connector: `{type: …}` and the connector's settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SinkConnectorSpec(pub ConnectorSpec);

impl JsonSchema for SourceConnectorSpec {
    fn schema_name() -> Cow<'static, str> {
        "SourceConnector".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        role_schema("Where records come from.")
    }
}

impl JsonSchema for SinkConnectorSpec {
    fn schema_name() -> Cow<'static, str> {
        "SinkConnector".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        role_schema("Where records go.")
    }
}

impl std::ops::Deref for SourceConnectorSpec {
    type Target = ConnectorSpec;
    fn deref(&self) -> &ConnectorSpec {
        &self.0
    }
}

impl std::ops::Deref for SinkConnectorSpec {
    type Target = ConnectorSpec;
    fn deref(&self) -> &ConnectorSpec {
        &self.0
    }
}

impl std::ops::DerefMut for SourceConnectorSpec {
    fn deref_mut(&mut self) -> &mut ConnectorSpec {
        &mut self.0
    }
}

impl std::ops::DerefMut for SinkConnectorSpec {
    fn deref_mut(&mut self) -> &mut ConnectorSpec {
        &mut self.0
    }
}

/// One connector a job may name.
#[derive(Debug, Clone)]
pub struct ConnectorInfo {
    /// Its `type`.
    pub kind: String,
    /// The JSON Schema of its settings (an object schema, with its own `$defs` if it has any).
    pub schema: Value,
}

/// The connectors a job format knows, by role.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Source connectors.
    pub sources: Vec<ConnectorInfo>,
    /// Sink connectors.
    pub sinks: Vec<ConnectorInfo>,
}

impl Catalog {
    /// Puts the connectors into the job's JSON Schema: each role's definition becomes a choice
    /// among its connectors, told apart by `type`; their own definitions join the schema's.
    /// Without connectors of a role, its definition keeps accepting any `{type: …}`.
    pub fn patch(&self, schema: &mut Value) -> Result<(), String> {
        let mut defs = schema
            .get("$defs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for (role, connectors) in [
            ("SourceConnector", &self.sources),
            ("SinkConnector", &self.sinks),
        ] {
            if connectors.is_empty() {
                continue;
            }
            let mut choices = Vec::new();
            for c in connectors {
                let mut s = c.schema.clone();
                let Some(obj) = s.as_object_mut() else {
                    return Err(format!("connector {}: its schema is not an object", c.kind));
                };
                if let Some(Value::Object(own)) = obj.remove("$defs") {
                    for (name, def) in own {
                        match defs.get(&name) {
                            Some(existing) if *existing != def => {
                                return Err(format!(
                                    "connector {}: definition {name} differs from another one of the same name",
                                    c.kind
                                ));
                            }
                            _ => {
                                defs.insert(name, def);
                            }
                        }
                    }
                }
                obj.remove("$schema");
                obj.remove("title");
                let properties = obj
                    .entry("properties")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(p) = properties {
                    p.insert(
                        "type".into(),
                        serde_json::json!({"type": "string", "const": c.kind}),
                    );
                }
                let required = obj
                    .entry("required")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(r) = required {
                    r.insert(0, Value::String("type".into()));
                }
                obj.insert("type".into(), Value::String("object".into()));
                choices.push(s);
            }
            let description = defs
                .get(role)
                .and_then(|d| d.get("description"))
                .cloned()
                .unwrap_or(Value::Null);
            defs.insert(
                role.into(),
                serde_json::json!({"description": description, "oneOf": choices}),
            );
        }
        if let Some(obj) = schema.as_object_mut() {
            obj.insert("$defs".into(), Value::Object(defs));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connector_reads_and_writes_as_one_mapping() {
        let c: ConnectorSpec =
            serde_json::from_value(serde_json::json!({"type": "file", "path": "x"})).unwrap();
        assert_eq!(c.kind, "file");
        assert_eq!(c.text("path"), Some("x"));
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"type": "file", "path": "x"})
        );
        let err = serde_json::from_value::<ConnectorSpec>(serde_json::json!({"path": "x"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `type`"), "{err}");
    }
}

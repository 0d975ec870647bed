//! Durations written the way people write them: `500ms`, `10s`, `5m`, `2h`, `1m 30s`.
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// A non-negative duration, written as `10s`, `5m`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationSpec(pub Duration);

impl DurationSpec {
    /// The duration in whole milliseconds.
    pub fn millis(self) -> i64 {
        self.0.as_millis().min(i64::MAX as u128) as i64
    }
}

fn parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("'{s}' is not a duration ({e}); write it like 500ms, 10s, 5m or 1h 30m")
    })
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s)
            .map(DurationSpec)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for DurationSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl JsonSchema for DurationSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration such as 500ms, 10s, 5m, 1h 30m.",
            "format": "duration"
        })
    }
}

/// A duration that may be negative (`-5m`), for interval bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SignedDurationSpec(pub i64);

impl SignedDurationSpec {
    /// Milliseconds, possibly negative.
    pub fn millis(self) -> i64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for SignedDurationSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        let (neg, rest) = match t.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        let ms = parse(rest).map_err(serde::de::Error::custom)?.as_millis() as i64;
        Ok(SignedDurationSpec(if neg { -ms } else { ms }))
    }
}

impl Serialize for SignedDurationSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d =
            humantime::format_duration(Duration::from_millis(self.0.unsigned_abs())).to_string();
        s.serialize_str(&if self.0 < 0 { format!("-{d}") } else { d })
    }
}

impl JsonSchema for SignedDurationSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SignedDuration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration that may be negative, such as -5m, 0s, 30m.",
            "format": "signed-duration"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_human_durations() {
        let d: DurationSpec = serde_yaml::from_str("1m 30s").unwrap();
        assert_eq!(d.millis(), 90_000);
        let s: SignedDurationSpec = serde_yaml::from_str("-5m").unwrap();
        assert_eq!(s.millis(), -300_000);
        let err = serde_yaml::from_str::<DurationSpec>("five minutes")
            .unwrap_err()
            .to_string();
        assert!(err.contains("write it like"), "{err}");
    }
}

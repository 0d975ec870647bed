//! Structural checks of a job document against the job's JSON Schema, before it is typed: every
//! problem at once, each with the full path of its field (`transforms.w.window.size`), including
//! fields inside tagged variants (`type: window`), which typed decoding can only name by their
//! parent.
//!
//! Where a value may take one of several shapes (`oneOf`, `anyOf`), the shape a user meant is
//! picked by its tag (`type`, `strategy`) or by its JSON type, and only that shape's problems are
//! reported; an unknown tag is reported with the tags that exist.
use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::{Location, LocationSegment};
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use crate::{Problem, Problems};

/// Formats the schema uses beyond the standard ones: name, check, what a value must look like,
/// and whether a refused value may be shown (a misplaced secret never is).
type Format = (&'static str, fn(&str) -> bool, &'static str, bool);

const FORMATS: &[Format] = &[
    (
        "duration",
        |s| humantime::parse_duration(s.trim()).is_ok(),
        "a duration, written like 500ms, 10s, 5m or 1h 30m",
        true,
    ),
    (
        "signed-duration",
        |s| {
            let t = s.trim();
            let t = t.strip_prefix(['-', '+']).unwrap_or(t);
            humantime::parse_duration(t).is_ok()
        },
        "a duration, possibly negative, written like -5m, 10s or 1h 30m",
        true,
    ),
    (
        "secret-ref",
        |s| crate::SecretRef::parse(s).is_ok(),
        "where a secret is, env:NAME or file:/path: a secret is never written into a job",
        false,
    ),
];

/// Compiles a job's JSON Schema into the validator [`check`] uses.
pub fn validator(schema: &Value) -> Result<Validator, String> {
    let mut options = jsonschema::options().should_validate_formats(true);
    for (name, check, _, _) in FORMATS {
        options = options.with_format(*name, check);
    }
    options
        .build(schema)
        .map_err(|e| format!("the job schema does not compile: {e}"))
}

/// Every structural problem of `doc` (a job document as JSON), or none.
pub fn check(validator: &Validator, doc: &Value) -> Problems {
    let mut problems = Problems::default();
    for e in validator.iter_errors(doc) {
        explain(&e, &mut problems);
    }
    problems
}

/// The dotted path of a location in `doc`: `transforms.w.aggregates[0]`.
fn dotted(loc: &Location) -> String {
    let mut out = String::new();
    for seg in loc {
        match seg {
            LocationSegment::Index(i) => out.push_str(&format!("[{i}]")),
            LocationSegment::Property(p) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&p);
            }
        }
    }
    if out.is_empty() {
        "(top level)".into()
    } else {
        out
    }
}

fn child(path: &str, name: &str) -> String {
    if path == "(top level)" {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    }
}

fn explain(e: &ValidationError<'_>, out: &mut Problems) {
    let path = dotted(e.instance_path());
    let value = e.instance();
    let msg = match e.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            for name in unexpected {
                out.push(
                    Problem::new(child(&path, name), "unknown field")
                        .hint("check the spelling against `freshet schema`"),
                );
            }
            return;
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().map(str::to_string).unwrap_or_default();
            out.push(Problem::new(
                child(&path, &name),
                "missing; it is required here",
            ));
            return;
        }
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context } => {
            return explain_choice(e.instance_path(), value, context, out);
        }
        ValidationErrorKind::Type { kind } => {
            // in the words `json_type` uses for what was found
            let word = |t: &dyn std::fmt::Display| match t.to_string().as_str() {
                "array" => "a list".to_string(),
                "object" => "a mapping".to_string(),
                "string" => "a string".to_string(),
                "integer" => "an integer".to_string(),
                "number" => "a number".to_string(),
                "boolean" => "a boolean".to_string(),
                "null" => "nothing (null)".to_string(),
                other => other.to_string(),
            };
            let want = match kind {
                TypeKind::Single(t) => word(t),
                TypeKind::Multiple(ts) => {
                    ts.iter().map(|t| word(&t)).collect::<Vec<_>>().join(" or ")
                }
            };
            format!("expected {want}, found {}", json_type(value))
        }
        ValidationErrorKind::Enum { options } => format!(
            "{} is not one of: {}",
            shown(value),
            options
                .as_array()
                .map(|o| o.iter().map(shown).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        ),
        ValidationErrorKind::Constant { expected_value } => {
            format!("{} must be {}", shown(value), shown(expected_value))
        }
        ValidationErrorKind::Format { format } => match FORMATS.iter().find(|f| f.0 == format) {
            Some((_, _, what, true)) => format!("{} is not {what}", shown(value)),
            Some((_, _, what, false)) => format!("the value is not {what}"),
            None => format!("{} is not a valid {format}", shown(value)),
        },
        ValidationErrorKind::Minimum { limit } => format!("must be at least {limit}"),
        ValidationErrorKind::Maximum { limit } => format!("must be at most {limit}"),
        ValidationErrorKind::MinItems { limit } => {
            format!("needs at least {limit} item(s)")
        }
        ValidationErrorKind::Pattern { .. } => {
            format!(
                "{} is not written the way this field needs (see `freshet schema`)",
                shown(value)
            )
        }
        _ => e.to_string(),
    };
    out.push(Problem::new(path, msg));
}

/// True when `e`, an error of one branch of a choice at `at`, says the value is not of that
/// branch's shape at all: another JSON type, or another tag.
fn wrong_shape(at: &Location, e: &ValidationError<'_>) -> bool {
    let depth = at.into_iter().count();
    let here = e.instance_path().into_iter().count();
    match e.kind() {
        ValidationErrorKind::Type { .. } => here == depth,
        // the value itself, or its tag property, is not this branch's
        ValidationErrorKind::Constant { .. } | ValidationErrorKind::Enum { .. } => {
            here == depth || here == depth + 1
        }
        _ => false,
    }
}

fn explain_choice(
    at: &Location,
    value: &Value,
    branches: &[Vec<ValidationError<'static>>],
    out: &mut Problems,
) {
    let fitting: Vec<&Vec<ValidationError<'static>>> = branches
        .iter()
        .filter(|errs| !errs.iter().any(|e| wrong_shape(at, e)))
        .collect();
    if let Some(best) = fitting.iter().min_by_key(|errs| errs.len()) {
        for e in best.iter() {
            explain(e, out);
        }
        return;
    }
    let path = dotted(at);
    // every branch refused the value (or its tag): say which values exist
    let depth = at.into_iter().count();
    let mut tag = None;
    let mut allowed = Vec::new();
    for e in branches.iter().flatten() {
        if let ValidationErrorKind::Constant { expected_value } = e.kind()
            && wrong_shape(at, e)
        {
            if e.instance_path().into_iter().count() > depth
                && let Some(LocationSegment::Property(p)) = e.instance_path().into_iter().last()
            {
                tag = Some(p.to_string());
            }
            allowed.push(shown(expected_value));
        }
    }
    let (path, given) = match &tag {
        Some(tag) => (
            child(&path, tag),
            value.get(tag).map(shown).unwrap_or_default(),
        ),
        None => (path, shown(value)),
    };
    let msg = if allowed.is_empty() {
        format!(
            "{} does not have any of the forms this field allows",
            json_type(value)
        )
    } else {
        format!("{given} is not one of: {}", allowed.join(", "))
    };
    out.push(Problem::new(path, msg));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let doc: Value = serde_yaml::from_str(yaml).unwrap();
        check(
            &validator(crate::JobFormat::generic().schema()).unwrap(),
            &doc,
        )
        .0
        .iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect()
    }

    #[test]
    fn a_valid_example_has_no_problems() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../examples/unique-visitors/job.yaml"),
        )
        .unwrap();
        assert_eq!(problems(&text), Vec::<String>::new());
    }
}

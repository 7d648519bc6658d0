//! A stream's `schema` key: the JSON Schema file of its documents, read and checked at load
//! (the only validation that reads a file, so that a missing or malformed one is reported with
//! every other problem). The contracts (`/asyncapi.json`, `/openapi.json`) embed it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::Problems;

/// A stream's document schema, from the file its `schema` key names.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentSchema {
    /// The file, as resolved (relative to the configuration file's directory).
    pub path: PathBuf,
    /// The schema: a JSON object or boolean, self-contained (no `$ref`).
    pub schema: Arc<Value>,
}

/// Reads the schema file `written` (as the key `key` says it, relative to `base`, the
/// configuration file's directory) and checks that it is a self-contained JSON Schema;
/// `None` with a problem at `key` otherwise.
pub fn document_schema(
    problems: &mut Problems,
    key: &str,
    base: Option<&Path>,
    written: &str,
) -> Option<DocumentSchema> {
    if written.trim().is_empty() {
        problems.push(
            key,
            "expected the path of a JSON Schema file (relative to the configuration file), got \
             an empty string",
        );
        return None;
    }
    let path = match base {
        Some(base) if Path::new(written).is_relative() => base.join(written),
        _ => PathBuf::from(written),
    };
    let shown = path.display();
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(error) => {
            problems.push(
                key,
                format!(
                    "expected a readable JSON Schema file, but {shown} cannot be read: {error}"
                ),
            );
            return None;
        }
    };
    let schema: Value = match serde_json::from_slice(&text) {
        Ok(schema) => schema,
        Err(error) => {
            problems.push(
                key,
                format!("expected a JSON Schema as JSON, but {shown} is not JSON: {error}"),
            );
            return None;
        }
    };
    if !(schema.is_object() || schema.is_boolean()) {
        problems.push(
            key,
            format!(
                "expected a JSON Schema (an object or a boolean) in {shown}, got a JSON {}",
                kind(&schema)
            ),
        );
        return None;
    }
    if let Some(at) = find_ref(&schema, String::new()) {
        problems.push(
            key,
            format!(
                "expected a self-contained JSON Schema in {shown}, but it has a `$ref` at {at:?}: \
                 the schema is embedded into /asyncapi.json and /openapi.json, where `#` names \
                 their root; inline the referenced schema"
            ),
        );
        return None;
    }
    Some(DocumentSchema {
        path,
        schema: Arc::new(schema),
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The JSON Pointer of the first `$ref` keyword in `schema`, if any. (`properties` named
/// `$ref` are property names, not keywords, but a document with such a property is rare
/// enough that refusing it with this message is clearer than embedding it half-resolved.)
fn find_ref(schema: &Value, at: String) -> Option<String> {
    match schema {
        Value::Object(object) => {
            if object.contains_key("$ref") {
                return Some(at);
            }
            object.iter().find_map(|(key, value)| {
                let token = key.replace('~', "~0").replace('/', "~1");
                find_ref(value, format!("{at}/{token}"))
            })
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, value)| find_ref(value, format!("{at}/{i}"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(written: &str, text: Option<&str>) -> Result<DocumentSchema, String> {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = text {
            std::fs::write(dir.path().join("s.json"), text).unwrap();
        }
        let mut problems = Problems::default();
        let found = document_schema(
            &mut problems,
            "streams[0].schema",
            Some(dir.path()),
            written,
        );
        match problems.finish(Some(Path::new("patchwire.toml")), ()) {
            Ok(()) => Ok(found.unwrap()),
            Err(error) => Err(error.to_string()),
        }
    }

    #[test]
    fn a_schema_file_is_read_relative_to_the_configuration() {
        let found = check("s.json", Some(r#"{"type": "object"}"#)).unwrap();
        assert_eq!(*found.schema, serde_json::json!({"type": "object"}));
        assert!(found.path.ends_with("s.json"));
    }

    #[test]
    fn bad_schema_files_are_named_with_their_key() {
        for (text, expected) in [
            (None, "cannot be read"),
            (Some("{"), "is not JSON"),
            (Some("[1]"), "got a JSON array"),
            (
                Some(r##"{"properties": {"a": {"$ref": "#/definitions/x"}}}"##),
                "`$ref` at \"/properties/a\"",
            ),
        ] {
            let error = check("s.json", text).unwrap_err();
            assert!(error.contains("streams[0].schema"), "{error}");
            assert!(error.contains("s.json"), "{error}");
            assert!(error.contains(expected), "{error}");
        }
        assert!(check(" ", None).unwrap_err().contains("empty string"));
    }
}

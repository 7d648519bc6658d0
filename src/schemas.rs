//! The JSON Schemas of the machine-readable bodies patchwire emits outside SSE, in one place:
//! each envelope names its schema in its `schema` member (`{name}.v{major}`), and the schema is
//! served at `/schemas/{that name}.json`. Pure data: the files under `schemas/` are compiled in.
//!
//! Versioning: within a major version, an envelope only gains optional members and enum
//! values are never removed; a consumer ignores members it does not know. Anything else
//! (removing or renaming a member, changing its type or meaning) is a new major version, with
//! a new name, served beside the old one.

/// A catch-up page (`GET /streams/{name}/changes`).
pub const CHANGES: &str = "patchwire.changes.v1";
/// A catch-up position that history cannot answer (`410`).
pub const CHANGES_GONE: &str = "patchwire.changes-gone.v1";
/// A webhook delivery's JSON body.
pub const WEBHOOK: &str = "patchwire.webhook.v1";

/// An operational event POSTed to `webhooks.operator_url`.
pub const OPERATOR: &str = "patchwire.operator.v1";

/// Every schema, by name, with its text.
pub const ALL: [(&str, &str); 4] = [
    (
        CHANGES,
        include_str!("../schemas/patchwire.changes.v1.json"),
    ),
    (
        CHANGES_GONE,
        include_str!("../schemas/patchwire.changes-gone.v1.json"),
    ),
    (
        WEBHOOK,
        include_str!("../schemas/patchwire.webhook.v1.json"),
    ),
    (
        OPERATOR,
        include_str!("../schemas/patchwire.operator.v1.json"),
    ),
];

/// The schema called `name` (without `.json`).
pub fn get(name: &str) -> Option<&'static str> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_is_json_and_names_itself() {
        for (name, text) in ALL {
            let schema: serde_json::Value = serde_json::from_str(text).expect(name);
            assert_eq!(schema["$id"], format!("{name}.json"), "{name}");
            assert_eq!(
                schema["properties"]["schema"]["const"], name,
                "{name}: its envelopes carry its name"
            );
        }
        assert!(get(CHANGES).is_some());
        assert!(get("patchwire.nothing.v1").is_none());
    }
}

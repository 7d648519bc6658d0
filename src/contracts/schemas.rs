//! The JSON Schemas of what patchwire sends and accepts, shared by the AsyncAPI and OpenAPI
//! documents (both embed them under `components.schemas` and refer to them by `$ref`).
//!
//! Written in the subset JSON Schema draft 07 and 2020-12 share (no `$defs`, no
//! `prefixItems`), since AsyncAPI 3.0's default schema format is draft 07's superset and
//! OpenAPI 3.1's is 2020-12.

use serde_json::{Map, Value, json};

/// The `$ref` of component schema `name`.
pub fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// A JSON Pointer below the root (RFC 6901): one or more `/`-prefixed tokens, `~` only as
/// `~0` or `~1`. Patches never target the root `""`.
pub const POINTER_PATTERN: &str = "^(/([^/~]|~[01])*)+$";

/// The component schema name of the patches a stream sends.
pub fn patch_name(allow_move: bool) -> &'static str {
    if allow_move { "PatchWithMove" } else { "Patch" }
}

/// The schemas every document shares, by component name, in a fixed order.
pub fn shared() -> Map<String, Value> {
    let mut schemas = Map::new();
    schemas.insert("JsonPointer".into(), pointer());
    schemas.insert("Patch".into(), patch(false));
    schemas.insert("PatchWithMove".into(), patch(true));
    schemas.insert("PatchRequest".into(), patch_request());
    schemas.insert("ErrorEvent".into(), error_event());
    schemas.insert("RecoveredEvent".into(), recovered_event());
    schemas.insert("StreamdataError".into(), streamdata_error());
    schemas.insert("EventId".into(), event_id());
    schemas.insert("Problem".into(), problem());
    schemas.insert("PushResult".into(), push_result());
    schemas.insert("WebSocketClientMessage".into(), ws_client_message());
    schemas.insert("WebSocketControlMessage".into(), ws_control_message());
    schemas.extend(envelopes());
    schemas
}

/// The versioned envelopes served at `/schemas/{name}.json` ([`crate::schemas::ALL`]), as
/// components named after them (`patchwire.changes.v1`), each of their `$defs` as a component
/// `{name}.{def}`: the same schemas, not copies, only without `$schema` and `$id` (both
/// documents have their own dialect and base) and with their `#/$defs/` references pointing to
/// those components. `unevaluatedProperties: true` (2020-12 only, and a no-op) is dropped, so
/// that AsyncAPI's draft-07 dialect reads them as written.
pub fn envelopes() -> Map<String, Value> {
    let mut out = Map::new();
    for (name, text) in crate::schemas::ALL {
        // The files are compiled in and checked by `schemas::tests`; a file that is not JSON
        // would be a build of patchwire that cannot describe it, so it is left out, not a panic.
        let Ok(Value::Object(mut schema)) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        schema.remove("$schema");
        schema.remove("$id");
        let defs = schema.remove("$defs");
        let mut schema = Value::Object(schema);
        relink(&mut schema, name);
        out.insert(name.to_owned(), schema);
        if let Some(Value::Object(defs)) = defs {
            for (def, mut schema) in defs {
                relink(&mut schema, name);
                out.insert(format!("{name}.{def}"), schema);
            }
        }
    }
    out
}

/// Points `#/$defs/{def}` references of envelope `name` at its components.
fn relink(schema: &mut Value, name: &str) {
    match schema {
        Value::Object(object) => {
            object.remove("unevaluatedProperties");
            if let Some(Value::String(target)) = object.get_mut("$ref")
                && let Some(def) = target.strip_prefix("#/$defs/")
            {
                *target = format!("#/components/schemas/{name}.{def}");
            }
            for value in object.values_mut() {
                relink(value, name);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| relink(v, name)),
        _ => {}
    }
}

/// A webhook delivery as a structured-mode CloudEvent (`format = "cloudevents"`): the
/// attributes, patchwire's extensions (`stream`, `epoch`, `seq`, `baseseq` for a patch) and
/// `data`, the document or the patch.
pub fn cloudevent_structured(document: Value, patch: Value) -> Value {
    let event = |kind: &str, content_type: &str, data: Value| {
        json!({
            "type": "object",
            "properties": {
                "specversion": {"const": "1.0"},
                "id": reference("EventId"),
                "type": {"const": kind},
                "source": {"type": "string", "pattern": "^/streams/"},
                "time": {"type": "string", "format": "date-time"},
                "stream": {"type": "string"},
                "epoch": {"type": "string", "pattern": "^[0-9]+$"},
                "seq": {"type": "string", "pattern": "^[0-9]+$"},
                "baseseq": {"type": "string", "pattern": "^[0-9]+$"},
                "datacontenttype": {"const": content_type},
                "data": data,
            },
            "required": ["specversion", "id", "type", "source", "time", "datacontenttype", "data"],
        })
    };
    let envelope = crate::schemas::WEBHOOK;
    let mut error = event(
        "stream.error",
        "application/json",
        reference(&format!("{envelope}.error")),
    );
    let mut recovered = event(
        "stream.recovered",
        "application/json",
        reference(&format!("{envelope}.recovery")),
    );
    // A notice names the last good event, which a change already has as its id: its own id
    // is `{event id}/{type}/{time}`.
    for notice in [&mut error, &mut recovered] {
        notice["properties"]["id"] = json!({"type": "string", "minLength": 1});
    }
    json!({"oneOf": [
        event("stream.snapshot", "application/json", document),
        event("stream.patch", "application/json-patch+json", patch),
        error,
        recovered,
    ]})
}

/// A catch-up page (`patchwire.changes.v1`) of a stream whose patches are `patch` (a component
/// name, [`patch_name`]) and whose snapshots are `document` (a schema): the served envelope,
/// with each change's payload held to what this stream sends.
pub fn catchup_page(patch: &str, document: Value) -> Value {
    json!({
        "allOf": [
            reference(crate::schemas::CHANGES),
            {"properties": {"changes": {"items": {
                "if": {"properties": {"kind": {"const": "patch"}}, "required": ["kind"]},
                "then": {"properties": {"payload": reference(patch)}},
                "else": {"properties": {"payload": document}},
            }}}},
        ],
    })
}

fn pointer() -> Value {
    json!({
        "type": "string",
        "pattern": POINTER_PATTERN,
        "description": "An RFC 6901 JSON Pointer below the document's root (never \"\")."
    })
}

/// The patches patchwire emits: `add`, `remove`, `replace`, and `move` only for streams with
/// `[streams.diff] allow_move = true` (the diff engine emits nothing else; `copy` and `test`
/// never). Every operation targets a path below the root.
pub fn patch(allow_move: bool) -> Value {
    let op = |name: &str, fields: &[&str]| {
        let mut properties = Map::new();
        properties.insert("op".into(), json!({"const": name}));
        for field in fields {
            let schema = match *field {
                "value" => json!({"description": "Any JSON value."}),
                _ => reference("JsonPointer"),
            };
            properties.insert((*field).into(), schema);
        }
        let mut required = vec!["op"];
        required.extend_from_slice(fields);
        json!({
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        })
    };
    let mut ops = vec![
        op("add", &["path", "value"]),
        op("remove", &["path"]),
        op("replace", &["path", "value"]),
    ];
    if allow_move {
        ops.push(op("move", &["from", "path"]));
    }
    let described = if allow_move {
        "An RFC 6902 JSON Patch as patchwire sends it: add, remove, replace and move \
         (this stream sets allow_move), in order; indices refer to the document as the \
         previous operations left it; never the root."
    } else {
        "An RFC 6902 JSON Patch as patchwire sends it: add, remove and replace only, in \
         order; indices refer to the document as the previous operations left it; never the \
         root."
    };
    json!({
        "type": "array",
        "minItems": 1,
        "items": {"oneOf": ops},
        "description": described,
    })
}

/// What `PATCH /streams/{name}` accepts: any RFC 6902 operation (`copy` and `test` included)
/// with the members it needs, paths being JSON Pointers (the root included); other members are
/// ignored, as RFC 6902 says.
fn patch_request() -> Value {
    let any_pointer = json!({"type": "string", "pattern": "^(/([^/~]|~[01])*)*$"});
    let op = |names: &[&str], members: &[&str]| {
        let mut properties = Map::new();
        properties.insert("op".into(), json!({"enum": names}));
        for member in members {
            let schema = match *member {
                "value" => json!({}),
                _ => any_pointer.clone(),
            };
            properties.insert((*member).into(), schema);
        }
        let mut required = vec!["op"];
        required.extend_from_slice(members);
        json!({"type": "object", "properties": properties, "required": required})
    };
    json!({
        "type": "array",
        "items": {"oneOf": [
            op(&["add", "replace", "test"], &["path", "value"]),
            op(&["remove"], &["path"]),
            op(&["move", "copy"], &["from", "path"]),
        ]},
        "description": "An RFC 6902 JSON Patch, applied atomically to the current document."
    })
}

fn error_event() -> Value {
    json!({
        "type": "object",
        "properties": {
            "status": {"type": "integer", "description": "The HTTP status that says what failed (the upstream's own for upstream-status)."},
            "message": {"type": "string"},
            "cause": {"type": "string", "examples": ["upstream-timeout", "upstream-status", "upstream-invalid", "redirect-refused", "upstream-unavailable", "evicted"]},
            "timestamp": {"type": "string", "description": "An HTTP date (RFC 9110)."},
            "retry_in_ms": {"type": "integer", "minimum": 0, "description": "When the next poll is due."},
        },
        "required": ["status", "message", "cause", "timestamp", "retry_in_ms"],
        "additionalProperties": false,
        "description": "A failed poll; the last good document stays current.",
    })
}

fn recovered_event() -> Value {
    json!({
        "type": "object",
        "properties": {
            "since": {"type": "string", "description": "HTTP date of the first failure of the run."},
            "failures": {"type": "integer", "minimum": 1},
            "timestamp": {"type": "string", "description": "An HTTP date."},
        },
        "required": ["since", "failures", "timestamp"],
        "additionalProperties": false,
        "description": "The upstream answers again, to subscribers that were sent an error.",
    })
}

fn streamdata_error() -> Value {
    json!({
        "type": "object",
        "properties": {
            "status": {"type": "integer"},
            "message": {"type": "string"},
            "cause": {"type": "string", "examples": ["token-missing", "token-unknown", "host-not-allowed", "invalid-target", "rate-limited", "upstream-timeout"]},
            "timestamp": {"type": "integer", "description": "Unix time in milliseconds."},
            "sessionId": {"type": "string"},
        },
        "required": ["status", "message", "cause", "timestamp", "sessionId"],
        "additionalProperties": false,
        "description": "Streamdata.io's error event: a refusal (then the stream ends) or a failed poll.",
    })
}

fn event_id() -> Value {
    json!({
        "type": "string",
        "pattern": "^[^:]+:[0-9]+:[0-9]+$",
        "description": "{stream}:{epoch}:{seq} (a view's stream is {stream}@{view}); resume with Last-Event-ID.",
    })
}

fn problem() -> Value {
    json!({
        "type": "object",
        "properties": {
            "status": {"type": "integer"},
            "message": {"type": "string"},
        },
        "required": ["status", "message"],
        "description": "An error answer: its status and what was wrong.",
    })
}

fn push_result() -> Value {
    json!({
        "type": "object",
        "properties": {
            "stream": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0},
            "change": {"enum": ["snapshot", "patch", "none"]},
        },
        "required": ["stream", "seq", "change"],
        "additionalProperties": false,
    })
}

fn ws_client_message() -> Value {
    let id = json!({"type": "string", "minLength": 1, "maxLength": 64});
    json!({
        "oneOf": [
            {"type": "object", "properties": {
                "type": {"const": "subscribe"}, "id": id, "stream": {"type": "string"},
                "url": {"type": "string"}, "view": {"type": "string"}, "filter": {"type": "string"},
                "last_event_id": {"type": "string"}},
             "required": ["type", "id"], "additionalProperties": false},
            {"type": "object", "properties": {"type": {"const": "unsubscribe"}, "id": id},
             "required": ["type", "id"], "additionalProperties": false},
            {"type": "object", "properties": {"type": {"const": "ping"}, "data": {}},
             "required": ["type"], "additionalProperties": false},
            {"type": "object", "properties": {"type": {"const": "auth"}, "token": {"type": "string"}},
             "required": ["type", "token"], "additionalProperties": false},
        ],
        "description": "A client's message on GET /ws (a JSON text frame).",
    })
}

fn ws_control_message() -> Value {
    json!({
        "type": "object",
        "properties": {
            "type": {"enum": ["subscribed", "refused", "unsubscribed", "ended", "authenticated", "pong"]},
            "id": {"type": "string"},
            "stream": {"type": "string"},
            "status": {"type": "integer"},
            "cause": {"type": "string"},
            "message": {"type": "string"},
            "token": {"type": "string"},
            "data": {},
        },
        "required": ["type"],
        "description": "The server's answers on GET /ws that are not stream events.",
    })
}

/// A WebSocket stream event: `{type, stream, id, data}` with `data` as `data_schema`.
pub fn ws_event(kind: &str, data_schema: Value) -> Value {
    json!({
        "type": "object",
        "properties": {
            "type": {"const": kind},
            "stream": {"type": "string"},
            "id": reference("EventId"),
            "data": data_schema,
        },
        "required": ["type", "stream", "id", "data"],
        "additionalProperties": false,
    })
}

/// A webhook delivery's body for a stream whose documents are `document` and patches `patch`.
pub fn webhook_body(document: Value, patch: Value) -> Value {
    let common = |kind: &str, base_seq: Value, data: Value| {
        json!({
            "type": "object",
            "properties": {
                "schema": {"const": crate::schemas::WEBHOOK},
                "type": {"const": kind},
                "stream": {"type": "string"},
                "epoch": {"type": "integer", "minimum": 0},
                "seq": {"type": "integer", "minimum": 0},
                "base_seq": base_seq,
                "timestamp": {"type": "string", "format": "date-time"},
                "data": data,
            },
            "required": ["schema", "type", "stream", "epoch", "seq", "base_seq", "timestamp", "data"],
        })
    };
    let envelope = crate::schemas::WEBHOOK;
    json!({
        "oneOf": [
            common("stream.snapshot", json!({"type": "null"}), document),
            common("stream.patch", json!({"type": "integer", "minimum": 0}), patch),
            common("stream.error", json!({"type": "null"}), reference(&format!("{envelope}.error"))),
            common("stream.recovered", json!({"type": "null"}), reference(&format!("{envelope}.recovery"))),
        ],
        "description": "A signed webhook delivery (Standard Webhooks headers webhook-id, webhook-timestamp, webhook-signature). Apply a patch only if (epoch, base_seq) is the (epoch, seq) held. stream.error and stream.recovered go to endpoints whose events list errors and recoveries: one when the upstream starts failing, one when it answers again.",
    })
}

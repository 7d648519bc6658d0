//! The WebSocket dialect's events (pure): patchwire's own vocabulary (`snapshot`, `patch`,
//! `error`, `recovered`), each a JSON text message that names its stream:
//!
//! ```json
//! {"type":"patch","stream":"fleet","id":"fleet:1795393571349:4","data":[{"op":"replace",...}]}
//! ```
//!
//! `id` and `data` are exactly the SSE event's `id:` and `data:`. A message names the stream,
//! never a connection's subscription: one message per change is built once and sent as the
//! same bytes on every connection subscribed to the stream (a connection subscribes to a
//! stream at most once, so the client maps a stream's name to its subscription).
//!
//! Every message is built as a `String`: the bytes are always UTF-8, as a text frame needs.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{ChangeKind, native};

/// A change: a `patch` message carrying an RFC 6902 patch, or a `snapshot` message carrying
/// the whole document. `payload` is the change's JSON.
pub fn change(stream: &str, id: &str, kind: ChangeKind, payload: &[u8]) -> Bytes {
    message(kind.as_str(), stream, id, &String::from_utf8_lossy(payload))
}

/// The current document, as a `snapshot` message (a new subscription's first).
pub fn snapshot(stream: &str, id: &str, json: &[u8]) -> Bytes {
    change(stream, id, ChangeKind::Snapshot, json)
}

/// The upstream failed: an `error` message whose data is the SSE `error` event's.
pub fn error(
    stream: &str,
    id: &str,
    status: u16,
    message_text: &str,
    cause: &str,
    at: SystemTime,
    retry_in: Duration,
) -> Bytes {
    let body = native::error_body(status, message_text, cause, at, retry_in);
    message("error", stream, id, &body.to_string())
}

/// The upstream answers again: a `recovered` message whose data is the SSE event's.
pub fn recovered(
    stream: &str,
    id: &str,
    since: SystemTime,
    failures: u32,
    at: SystemTime,
) -> Bytes {
    let body = native::recovered_body(since, failures, at);
    message("recovered", stream, id, &body.to_string())
}

/// `{"type":…,"stream":…,"id":…,"data":…}` with `data` already JSON.
fn message(kind: &str, stream: &str, id: &str, data: &str) -> Bytes {
    let stream = serde_json::Value::from(stream).to_string();
    let id = serde_json::Value::from(id).to_string();
    let mut out = String::with_capacity(data.len() + stream.len() + id.len() + kind.len() + 40);
    out.push_str("{\"type\":\"");
    out.push_str(kind);
    out.push_str("\",\"stream\":");
    out.push_str(&stream);
    out.push_str(",\"id\":");
    out.push_str(&id);
    out.push_str(",\"data\":");
    out.push_str(data);
    out.push('}');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parsed(bytes: &Bytes) -> Value {
        serde_json::from_slice(bytes).expect("valid JSON")
    }

    #[test]
    fn messages_name_their_stream_and_carry_the_sse_id_and_data() {
        let patch = change(
            "fleet",
            "fleet:7:2",
            ChangeKind::Patch,
            br#"[{"op":"remove","path":"/a"}]"#,
        );
        assert_eq!(
            &patch[..],
            br#"{"type":"patch","stream":"fleet","id":"fleet:7:2","data":[{"op":"remove","path":"/a"}]}"#
        );
        assert_eq!(
            parsed(&snapshot("~ab", "~ab:7:3", br#"{"x":"\u00e9"}"#)),
            json!({"type": "snapshot", "stream": "~ab", "id": "~ab:7:3", "data": {"x": "é"}})
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        let failed = parsed(&error(
            "s",
            "s:1:3",
            502,
            "down \"now\"",
            "upstream-unavailable",
            at,
            Duration::from_secs(2),
        ));
        assert_eq!(failed["type"], "error");
        assert_eq!(
            failed["data"],
            native::error_body(
                502,
                "down \"now\"",
                "upstream-unavailable",
                at,
                Duration::from_secs(2)
            )
        );
        let back = parsed(&recovered("s", "s:1:3", at, 2, at));
        assert_eq!(back["type"], "recovered");
        assert_eq!(back["data"]["failures"], 2);
    }
}

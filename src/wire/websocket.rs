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
//! What is built is the whole frame a server sends (RFC 6455 §5.2: FIN, opcode, length, the
//! unmasked payload), so a connection writes an event as one write of shared bytes, as the
//! SSE direct path does. Every message is built from a `String`: always UTF-8, as a text frame
//! needs.

use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};

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

/// A ping with no payload, as a server sends it.
pub const PING: [u8; 2] = [0x89, 0x00];

/// `text` as one unfragmented server text frame.
pub fn text_frame(text: &str) -> Bytes {
    frame(0x1, text.as_bytes())
}

/// A close frame with `code` and `reason` (cut to the 123 bytes a control frame allows, at a
/// character boundary).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(end + 2);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(0x8, &payload)
}

/// The payload of an unmasked, unfragmented frame built here (for tests and tools).
pub fn frame_payload(frame: &[u8]) -> Option<&[u8]> {
    let (len, start): (usize, usize) = match *frame.get(1)? {
        126 => (
            usize::from(u16::from_be_bytes([*frame.get(2)?, *frame.get(3)?])),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    frame.get(start..start.checked_add(len)?)
}

/// A final frame with `opcode` and `payload`, unmasked (server to client).
fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

/// `{"type":…,"stream":…,"id":…,"data":…}` with `data` already JSON, framed.
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
    text_frame(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parsed(frame: &Bytes) -> Value {
        serde_json::from_slice(frame_payload(frame).expect("a frame")).expect("valid JSON")
    }

    #[test]
    fn frames_have_the_length_encoding_of_their_size() {
        let small = text_frame("hi");
        assert_eq!(&small[..], b"\x81\x02hi");
        let medium = text_frame(&"x".repeat(300));
        assert_eq!(&medium[..4], [0x81, 126, 0x01, 0x2c]);
        assert_eq!(frame_payload(&medium).map(<[u8]>::len), Some(300));
        let large = text_frame(&"y".repeat(70_000));
        assert_eq!(&large[..2], [0x81, 127]);
        assert_eq!(frame_payload(&large).map(<[u8]>::len), Some(70_000));
        let close = close_frame(1008, &"é".repeat(100));
        assert_eq!(&close[..4], [0x88, 124, 0x03, 0xf0]);
        assert!(std::str::from_utf8(&frame_payload(&close).unwrap()[2..]).is_ok());
        assert_eq!(frame_payload(b"\x81\x05ab"), None, "cut short");
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
            frame_payload(&patch).unwrap(),
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

//! patchwire's own dialect: `snapshot`, `patch`, `error` and `recovered` events, ids
//! `{stream}:{epoch}:{seq}` so that `Last-Event-ID` replays what a client missed.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{ChangeKind, sse};

/// A change: a `patch` event carrying an RFC 6902 patch, or a `snapshot` event carrying the
/// whole document.
pub fn change(id: &str, kind: ChangeKind, payload: &[u8]) -> Bytes {
    sse::event(Some(id), kind.as_str(), payload)
}

/// The current document, as a `snapshot` event (a new subscriber's first).
pub fn snapshot(id: &str, json: &[u8]) -> Bytes {
    change(id, ChangeKind::Snapshot, json)
}

/// The upstream failed: an `error` event; the document stays as it was.
pub fn error(
    id: &str,
    status: u16,
    message: &str,
    cause: &str,
    at: SystemTime,
    retry_in: Duration,
) -> Bytes {
    let body = error_body(status, message, cause, at, retry_in);
    sse::event(Some(id), "error", body.to_string().as_bytes())
}

/// The data of an `error` event: `{status, message, cause, timestamp, retry_in_ms}` (the
/// WebSocket messages carry the same).
pub fn error_body(
    status: u16,
    message: &str,
    cause: &str,
    at: SystemTime,
    retry_in: Duration,
) -> serde_json::Value {
    serde_json::json!({
        "status": status,
        "message": message,
        "cause": cause,
        "timestamp": httpdate::fmt_http_date(at),
        "retry_in_ms": retry_in.as_millis() as u64,
    })
}

/// The upstream answers again after `failures` failed polls since `since`: a `recovered`
/// event.
pub fn recovered(id: &str, since: SystemTime, failures: u32, at: SystemTime) -> Bytes {
    let body = recovered_body(since, failures, at);
    sse::event(Some(id), "recovered", body.to_string().as_bytes())
}

/// The data of a `recovered` event: `{since, failures, timestamp}`.
pub fn recovered_body(since: SystemTime, failures: u32, at: SystemTime) -> serde_json::Value {
    serde_json::json!({
        "since": httpdate::fmt_http_date(since),
        "failures": failures,
        "timestamp": httpdate::fmt_http_date(at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_named_by_their_kind() {
        assert_eq!(
            &change("s:1:2", ChangeKind::Patch, b"[]")[..],
            b"id: s:1:2\nevent: patch\ndata: []\n\n"
        );
        assert_eq!(
            &snapshot("s:1:3", b"{}")[..],
            b"id: s:1:3\nevent: snapshot\ndata: {}\n\n"
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        let text = error(
            "s:1:3",
            502,
            "down",
            "upstream-unavailable",
            at,
            Duration::from_secs(2),
        );
        assert_eq!(
            std::str::from_utf8(&text).unwrap(),
            "id: s:1:3\nevent: error\ndata: {\"status\":502,\"message\":\"down\",\"cause\":\
             \"upstream-unavailable\",\"timestamp\":\"Thu, 01 Jan 1970 00:00:01 GMT\",\
             \"retry_in_ms\":2000}\n\n"
        );
        let text = recovered("s:1:3", at, 2, at);
        assert!(
            text.starts_with(b"id: s:1:3\nevent: recovered\ndata: {\"since\":"),
            "{text:?}"
        );
    }
}

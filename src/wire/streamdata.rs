//! The Streamdata.io dialect: `data` (the whole document, first on every connection), `patch`
//! (`add`/`remove`/`replace` only) and `error` as `{status, message, cause, timestamp,
//! sessionId}`, optionally escaped to ASCII for clients that split UTF-8 sequences.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{ChangeKind, Dialect, Refusal, sse};

/// How long a refused client is asked to wait before reconnecting.
pub const REFUSAL_RETRY: Duration = Duration::from_secs(30);

/// A Streamdata.io event: `data` is JSON, escaped to ASCII when `ascii_only`.
pub fn event(id: &str, name: &str, data: &[u8], ascii_only: bool) -> Bytes {
    if ascii_only {
        sse::event(Some(id), name, &ascii_json(data))
    } else {
        sse::event(Some(id), name, data)
    }
}

/// A change as Streamdata.io clients expect it: a `patch` event with the same patch, or a
/// `data` event carrying the whole document.
pub fn change(id: &str, kind: ChangeKind, payload: &[u8], ascii_only: bool) -> Bytes {
    event(id, kind.streamdata_name(), payload, ascii_only)
}

/// The current document, as a `data` event.
pub fn data(id: &str, json: &[u8], ascii_only: bool) -> Bytes {
    change(id, ChangeKind::Snapshot, json, ascii_only)
}

/// The body of a Streamdata.io `error` event.
pub fn error_body(
    status: u16,
    message: &str,
    cause: &str,
    at: SystemTime,
    session: u64,
) -> serde_json::Value {
    let timestamp = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    serde_json::json!({
        "status": status,
        "message": message,
        "cause": cause,
        "timestamp": timestamp,
        "sessionId": format!("{session:016x}"),
    })
}

/// An upstream failure as an `error` event of one connection (it names the session).
pub fn error(
    id: &str,
    status: u16,
    message: &str,
    cause: &str,
    at: SystemTime,
    session: u64,
    ascii_only: bool,
) -> Bytes {
    let body = error_body(status, message, cause, at, session);
    event(id, "error", body.to_string().as_bytes(), ascii_only)
}

/// The SSE body that only says why a request was refused: `retry:` (long: the client should
/// not hammer), then one `error` event. For clients such as Streamdata.io's SDKs, which drop
/// non-200 responses without telling their user why.
pub fn refusal_body(refusal: &Refusal, dialect: Dialect, at: SystemTime) -> Vec<u8> {
    let (session, ascii_only) = match dialect {
        Dialect::Streamdata {
            session,
            ascii_only,
        } => (session, ascii_only),
        Dialect::Native | Dialect::WebSocket => (0, false),
    };
    let error = error_body(refusal.status, &refusal.message, refusal.cause, at, session);
    let mut body = sse::retry(REFUSAL_RETRY.as_millis() as u64).to_vec();
    let error = error.to_string();
    let error = if ascii_only {
        ascii_json(error.as_bytes())
    } else {
        Cow::Borrowed(error.as_bytes())
    };
    body.extend_from_slice(&sse::event(None, "error", &error));
    body
}

/// JSON text with every non-ASCII character written as a `\uXXXX` escape (a surrogate pair
/// above U+FFFF): the same JSON value, in bytes a client that splits UTF-8 sequences across
/// reads cannot corrupt (the Streamdata.io SDK's EventSource does). Non-ASCII characters can
/// only occur inside JSON strings, where the escape means the same character. ASCII input (the
/// common case) is returned as is; so is input that is not UTF-8 (never produced here).
pub fn ascii_json(json: &[u8]) -> Cow<'_, [u8]> {
    if json.is_ascii() {
        return Cow::Borrowed(json);
    }
    let Ok(text) = std::str::from_utf8(json) else {
        return Cow::Borrowed(json);
    };
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // A two-byte character becomes six bytes, a four-byte one twelve: at most three times.
    let mut out = Vec::with_capacity(json.len() + json.len() / 2);
    let mut rest = text;
    while let Some(at) = rest.bytes().position(|b| !b.is_ascii()) {
        out.extend_from_slice(&rest.as_bytes()[..at]);
        let tail = &rest[at..];
        let Some(c) = tail.chars().next() else { break };
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            let u = *unit as usize;
            out.extend_from_slice(&[
                b'\\',
                b'u',
                HEX[u >> 12],
                HEX[(u >> 8) & 0xf],
                HEX[(u >> 4) & 0xf],
                HEX[u & 0xf],
            ]);
        }
        rest = &tail[c.len_utf8()..];
    }
    out.extend_from_slice(rest.as_bytes());
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ascii_json_escapes_accents_cjk_and_emoji() {
        let doc = serde_json::json!({"café": "naïve 東京 😀", "n": 1, "plain": "ascii"});
        let text = serde_json::to_vec(&doc).unwrap();
        let escaped = ascii_json(&text);
        assert!(escaped.is_ascii(), "{}", String::from_utf8_lossy(&escaped));
        let escaped = std::str::from_utf8(&escaped).unwrap();
        assert!(escaped.contains(r"caf\u00e9"), "{escaped}");
        assert!(escaped.contains(r"\u6771\u4eac"), "{escaped}");
        assert!(
            escaped.contains(r"\ud83d\ude00"),
            "a surrogate pair: {escaped}"
        );
        let back: serde_json::Value = serde_json::from_str(escaped).unwrap();
        assert_eq!(back, doc);
        let ascii = br#"{"a":"b"}"#;
        assert!(
            matches!(ascii_json(ascii), std::borrow::Cow::Borrowed(_)),
            "ASCII is not copied"
        );
    }

    #[test]
    fn changes_name_documents_data() {
        assert_eq!(
            &change(
                "s:1:2",
                ChangeKind::Snapshot,
                "{\"a\":\"é\"}".as_bytes(),
                true
            )[..],
            b"id: s:1:2\nevent: data\ndata: {\"a\":\"\\u00e9\"}\n\n"
        );
        assert_eq!(
            &change("s:1:3", ChangeKind::Patch, b"[]", false)[..],
            b"id: s:1:3\nevent: patch\ndata: []\n\n"
        );
    }

    proptest! {
        #[test]
        fn ascii_json_parses_to_the_same_value(strings in proptest::collection::vec(any::<String>(), 0..6)) {
            let doc = serde_json::json!({ "strings": strings, "keys": strings.iter().map(|s| (s.clone(), serde_json::Value::from(1))).collect::<serde_json::Map<String, serde_json::Value>>() });
            let text = serde_json::to_vec(&doc).unwrap();
            let escaped = ascii_json(&text);
            prop_assert!(escaped.is_ascii());
            let back: serde_json::Value = serde_json::from_slice(&escaped).unwrap();
            prop_assert_eq!(back, doc);
        }
    }
}

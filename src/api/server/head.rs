//! The HTTP/1 protocol of the direct path (pure): reading a request head, writing a response
//! head. No I/O here: `direct.rs` moves the bytes.

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::proxy::target::{ENTITIES_PARAM, FIELDS_PARAM, KEY_PARAM, TOKEN_PARAM, WHERE_PARAM};

/// Headers a request head may have for the direct path to consider it (more go to hyper).
const MAX_HEADERS: usize = 48;

/// The request headers a subscription or WebSocket handshake decision reads; the direct path
/// keeps only these.
const KEPT: [&str; 15] = [
    "accept",
    "accept-encoding",
    "origin",
    "host",
    "last-event-id",
    TOKEN_PARAM,
    WHERE_PARAM,
    FIELDS_PARAM,
    ENTITIES_PARAM,
    KEY_PARAM,
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
];

/// The parts of a request head the direct path decides on.
#[derive(Debug, PartialEq, Eq)]
pub enum Head<'a> {
    /// A complete HTTP/1.x request head.
    Complete {
        /// Request method.
        method: &'a str,
        /// Request target (path and query).
        target: &'a str,
        /// The headers a subscription decision reads.
        headers: HeaderMap,
        /// Whether the request asks to switch protocols.
        upgrade: bool,
        /// The length of the head: bytes past it were sent after the request.
        len: usize,
    },
    /// More bytes are needed.
    Partial,
    /// Not something the direct path handles (HTTP/2 preface, malformed, too many headers).
    Other,
}

impl Head<'_> {
    /// The target and headers of a complete `GET` that does not ask to switch protocols: the
    /// only requests the direct path may serve.
    pub fn subscription_request(&self) -> Option<(&str, &HeaderMap)> {
        match self {
            Head::Complete {
                method: "GET",
                target,
                headers,
                upgrade: false,
                ..
            } => Some((target, headers)),
            _ => None,
        }
    }
}

/// Parses what was read so far of a connection.
pub fn parse_head(buf: &[u8]) -> Head<'_> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut raw);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Other,
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Head::Other;
    };
    let mut headers = HeaderMap::new();
    let mut upgrade = false;
    for h in request.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
        if KEPT.iter().any(|k| name.eq_ignore_ascii_case(k))
            && let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            )
        {
            headers.append(name, value);
        }
    }
    Head::Complete {
        method,
        target,
        headers,
        upgrade,
        len,
    }
}

/// The `101 Switching Protocols` head of an accepted WebSocket handshake (the connection stays
/// open: it is the WebSocket's now).
pub fn switching_protocols(headers: &[(HeaderName, HeaderValue)]) -> BytesMut {
    let mut head = BytesMut::with_capacity(192);
    head.put_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    for (name, value) in headers {
        head.put_slice(name.as_str().as_bytes());
        head.put_slice(b": ");
        head.put_slice(value.as_bytes());
        head.put_slice(b"\r\n");
    }
    head.put_slice(b"\r\n");
    head
}

/// An HTTP/1.1 response head with `headers`, closing the connection after the body: with
/// `content_length` for a whole answer, or without, for a stream whose end is the close.
pub fn response_head(
    status: StatusCode,
    headers: &[(HeaderName, HeaderValue)],
    content_length: Option<usize>,
) -> BytesMut {
    let mut head = BytesMut::with_capacity(256);
    head.put_slice(b"HTTP/1.1 ");
    head.put_slice(status.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.put_slice(b"\r\n");
    for (name, value) in headers {
        head.put_slice(name.as_str().as_bytes());
        head.put_slice(b": ");
        head.put_slice(value.as_bytes());
        head.put_slice(b"\r\n");
    }
    head.put_slice(b"connection: close\r\n");
    if let Some(length) = content_length {
        head.put_slice(format!("content-length: {length}\r\n").as_bytes());
    }
    head.put_slice(b"\r\n");
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_endpoint_needs() {
        let raw = b"GET /streams/a?lastEventId=a%3A1%3A2 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\
                    Last-Event-ID: a:1:3\r\nX-Other: y\r\nUpgrade: websocket\r\n\r\n";
        let Head::Complete {
            method,
            target,
            headers,
            upgrade,
            len,
        } = parse_head(raw)
        else {
            panic!("expected a complete head");
        };
        assert_eq!(
            (method, target, upgrade, len),
            ("GET", "/streams/a?lastEventId=a%3A1%3A2", true, raw.len())
        );
        assert_eq!(headers.len(), 4, "{headers:?}");
        assert_eq!(headers["last-event-id"], "a:1:3");
    }

    #[test]
    fn partial_and_foreign_heads() {
        assert_eq!(
            parse_head(b"GET /streams/a HTTP/1.1\r\nHost:"),
            Head::Partial
        );
        assert_eq!(parse_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Head::Other);
        assert_eq!(parse_head(b"\x16\x03\x01garbage"), Head::Other);
    }

    #[test]
    fn response_heads() {
        let header = |name: &'static str, value: &'static str| {
            (
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            )
        };
        let plain = response_head(
            StatusCode::OK,
            &[
                header("content-type", "text/event-stream"),
                header("access-control-allow-origin", "*"),
            ],
            None,
        );
        let text = std::str::from_utf8(&plain).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("content-type: text/event-stream\r\n"));
        assert!(text.contains("access-control-allow-origin: *\r\n"));
        assert!(text.contains("connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        assert!(!text.contains("content-encoding"));
        assert!(!text.contains("content-length"));
        let gz = response_head(
            StatusCode::OK,
            &[
                header("content-encoding", "gzip"),
                header("x-patchwire-stream", "~ab"),
            ],
            None,
        );
        assert!(
            std::str::from_utf8(&gz)
                .unwrap()
                .contains("content-encoding: gzip\r\nx-patchwire-stream: ~ab\r\n")
        );
        let answer = response_head(StatusCode::UNAUTHORIZED, &[], Some(12));
        assert_eq!(
            &answer[..],
            b"HTTP/1.1 401 Unauthorized\r\nconnection: close\r\ncontent-length: 12\r\n\r\n"
        );
    }
}

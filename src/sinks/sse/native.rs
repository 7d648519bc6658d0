//! The native SSE path: HTTP/1.x subscriptions served straight on the socket.
//!
//! The accept loop reads each connection's request head itself. A subscription to an existing
//! stream (`GET /streams/{name}` over HTTP/1.x, not asking for JSON) or to a dynamic stream of
//! the proxy mode (`GET /{upstream URL}`) is answered here: the response head, then the shared
//! bytes of every event written as they are, the body delimited by the connection's close.
//! Everything else goes to hyper.
//!
//! Why: a long-lived SSE response through hyper keeps hyper's per-connection buffers (an 8 KB
//! read buffer, a write queue) and frames every event as a chunk; here a subscriber is its
//! socket, a `Writer` and a small task, and an event costs one `write` of bytes shared by all
//! subscribers. A write that would block falls back to waiting for writability, bounded by the
//! stall timeout, so only a slow subscriber ever arms a timer.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, header};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use super::{SseOptions, Writer, accepts_gzip, resume_point, wants_json};
use crate::config::Cors;
use crate::hub::Hub;
use crate::proxy::Proxy;
use crate::proxy::target::{TOKEN_PARAM, is_dynamic_path};
use crate::wire::Dialect;

/// Headers a request head may have for the native path to consider it (more go to hyper).
const MAX_HEADERS: usize = 48;

/// What the native path needs to answer subscriptions.
pub struct NativeSse {
    /// The streams.
    pub hub: Arc<Hub>,
    /// The `retry:` hint.
    pub retry: Duration,
    /// Cross-origin policy (the same as the router's).
    pub cors: Cors,
    /// A write refused this long closes the connection.
    pub stall_timeout: Duration,
    /// Counts connections closed for stalling.
    pub stalled: Counter,
    /// The proxy mode, when enabled: its subscriptions are served here too.
    pub proxy: Option<Arc<Proxy>>,
}

/// A subscription accepted by the native path: the response head and the subscriber.
pub struct Accepted {
    head: Bytes,
    writer: Writer,
    /// What the connection holds while it lasts (a proxy token's slot, a poll-period claim).
    hold: Option<Box<dyn Send>>,
}

/// What the native path makes of a dynamic-stream request.
pub enum Dynamic {
    /// A subscription to serve.
    Accepted(Accepted),
    /// A complete response (an SSE `error` event) to write before closing.
    Refused(Bytes),
}

/// The parts of a request head the native path decides on.
#[derive(Debug, PartialEq, Eq)]
pub enum Head<'a> {
    /// A complete HTTP/1.x request head.
    Complete {
        /// Request method.
        method: &'a str,
        /// Request target (path and query).
        target: &'a str,
        /// The headers the SSE endpoint reads.
        headers: HeaderMap,
        /// Whether the request asks to switch protocols.
        upgrade: bool,
    },
    /// More bytes are needed.
    Partial,
    /// Not something the native path handles (HTTP/2 preface, malformed, too many headers).
    Other,
}

/// Parses what was read so far of a connection.
pub fn parse_head(buf: &[u8]) -> Head<'_> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut raw);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Other,
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Head::Other;
    };
    let mut headers = HeaderMap::new();
    let mut upgrade = false;
    for h in request.headers.iter() {
        let name = h.name;
        let keep = [
            header::ACCEPT.as_str(),
            header::ACCEPT_ENCODING.as_str(),
            header::ORIGIN.as_str(),
            "last-event-id",
            TOKEN_PARAM,
        ]
        .iter()
        .any(|k| name.eq_ignore_ascii_case(k));
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
        if keep {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) {
                headers.append(name, value);
            }
        }
    }
    Head::Complete {
        method,
        target,
        headers,
        upgrade,
    }
}

/// The target and headers of a complete `GET` that does not ask to switch protocols: the only
/// requests the native path may serve.
fn subscription_request<'h>(head: &'h Head<'_>) -> Option<(&'h str, &'h HeaderMap)> {
    match head {
        Head::Complete {
            method: "GET",
            target,
            headers,
            upgrade: false,
        } => Some((target, headers)),
        _ => None,
    }
}

impl NativeSse {
    /// Accepts the request if it is a subscription this path serves: `GET /streams/{name}`
    /// (an existing stream, a plain name), not asking for JSON, not an upgrade.
    pub fn accept(&self, head: &Head<'_>) -> Option<Accepted> {
        let (target, headers) = subscription_request(head)?;
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let name = path.strip_prefix("/streams/")?;
        // Anything escaped or nested is left to the router, which decodes it; so are dynamic
        // streams (`~…`), which need a token.
        if name.is_empty()
            || name.starts_with('~')
            || name.contains(['%', '/'])
            || wants_json(headers)
        {
            return None;
        }
        let stream = self.hub.get(name)?;
        let last_event_id = url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "lastEventId")
            .map(|(_, v)| v.into_owned());
        let resume = resume_point(headers, last_event_id.as_deref());
        let options = SseOptions {
            retry: self.retry,
            gzip: accepts_gzip(headers),
            dialect: Dialect::Native,
        };
        let head = response_head(options.gzip, self.allow_origin(headers), None);
        let writer = Writer::new(stream.subscribe(&resume), options);
        Some(Accepted {
            head,
            writer,
            hold: None,
        })
    }

    /// Accepts the request if it is a proxy-mode subscription this path serves: `GET` of a
    /// dynamic path, not asking for JSON, not an upgrade, with the proxy enabled. Refusals are
    /// answered here too, as Streamdata.io clients expect (an `error` event on a 200).
    pub async fn accept_dynamic(&self, head: &Head<'_>) -> Option<Dynamic> {
        let (target, headers) = subscription_request(head)?;
        let proxy = self.proxy.as_ref()?;
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        if !is_dynamic_path(path) || wants_json(headers) {
            return None;
        }
        let dialect = super::streamdata_dialect(proxy.settings().ascii_only);
        let allow_origin = self.allow_origin(headers);
        match proxy.open(path, query, headers).await {
            Ok(opened) => {
                let options = SseOptions {
                    retry: self.retry,
                    gzip: accepts_gzip(headers),
                    dialect,
                };
                let head = response_head(options.gzip, allow_origin, Some(&opened.stream));
                Some(Dynamic::Accepted(Accepted {
                    head,
                    writer: Writer::new(opened.subscription, options),
                    hold: Some(Box::new(opened.hold)),
                }))
            }
            Err(refusal) => {
                let body = super::refusal_body(&refusal, dialect);
                Some(Dynamic::Refused(refusal_response(&body, allow_origin)))
            }
        }
    }

    /// The `Access-Control-Allow-Origin` value for this request, if any.
    fn allow_origin(&self, headers: &HeaderMap) -> Option<(HeaderValue, bool)> {
        match &self.cors {
            Cors::Disabled => None,
            Cors::AnyOrigin => Some((HeaderValue::from_static("*"), false)),
            Cors::Origins(allowed) => {
                let origin = headers.get(header::ORIGIN)?;
                allowed
                    .iter()
                    .any(|a| a == origin)
                    .then(|| (origin.clone(), true))
            }
        }
    }

    /// Serves an accepted subscription until the stream ends, the client leaves, or the
    /// client stops reading for the stall timeout.
    pub async fn serve(&self, socket: TcpStream, accepted: Accepted) {
        let Accepted {
            head,
            mut writer,
            hold: _hold,
        } = accepted;
        if self.send(&socket, &head).await.is_err() {
            return;
        }
        loop {
            while let Some(bytes) = writer.pop() {
                if self.send(&socket, &bytes).await.is_err() {
                    return;
                }
            }
            if writer.is_finished() {
                return;
            }
            tokio::select! {
                () = writer.next_live() => {}
                () = client_gone(&socket) => return,
            }
        }
    }

    /// Writes all of `bytes`: at once when the socket takes them (the common case, no timer),
    /// else waiting for writability, closing the connection if writes stay refused for the
    /// stall timeout.
    async fn send(&self, socket: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
        loop {
            match socket.try_write(bytes) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match tokio::time::timeout(self.stall_timeout, socket.writable()).await {
                Ok(ready) => ready?,
                Err(_) => {
                    self.stalled.inc();
                    tracing::info!(
                        peer = ?socket.peer_addr().ok(),
                        timeout = ?self.stall_timeout,
                        "closing a subscriber that stopped reading"
                    );
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
        }
    }
}

impl NativeSse {
    /// Writes a complete refusal response; the connection then closes.
    pub async fn refuse(&self, socket: TcpStream, response: Bytes) {
        if let Err(error) = self.send(&socket, &response).await {
            tracing::debug!(%error, "could not send a refusal");
        }
    }
}

/// Resolves when the client closed its side (or the socket failed). Bytes the client sends
/// after its request are read and ignored.
async fn client_gone(socket: &TcpStream) {
    let mut sink = [0u8; 256];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        match socket.try_read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// A whole refusal response: 200, the `error` event as the body, then the connection closes.
fn refusal_response(body: &[u8], allow_origin: Option<(HeaderValue, bool)>) -> Bytes {
    let mut out = BytesMut::with_capacity(256 + body.len());
    out.put_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
          connection: close\r\n",
    );
    put_allow_origin(&mut out, allow_origin);
    out.put_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.put_slice(body);
    out.freeze()
}

/// The response head of a native subscription, naming its stream if it is a dynamic one. The
/// body ends when the connection closes.
fn response_head(
    gzip: bool,
    allow_origin: Option<(HeaderValue, bool)>,
    dynamic: Option<&str>,
) -> Bytes {
    let mut head = BytesMut::with_capacity(256);
    head.put_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
          x-accel-buffering: no\r\nconnection: close\r\n",
    );
    if gzip {
        head.put_slice(b"content-encoding: gzip\r\n");
    }
    if let Some(stream) = dynamic {
        head.put_slice(b"x-patchwire-stream: ");
        head.put_slice(stream.as_bytes());
        head.put_slice(b"\r\n");
    }
    put_allow_origin(&mut head, allow_origin);
    head.put_slice(b"\r\n");
    head.freeze()
}

/// `Access-Control-Allow-Origin` (when allowed) and `Vary`.
fn put_allow_origin(head: &mut BytesMut, allow_origin: Option<(HeaderValue, bool)>) {
    match allow_origin {
        Some((origin, echoed)) => {
            head.put_slice(b"access-control-allow-origin: ");
            head.put_slice(origin.as_bytes());
            head.put_slice(b"\r\n");
            if echoed {
                head.put_slice(b"vary: accept-encoding, origin\r\n");
            } else {
                head.put_slice(b"vary: accept-encoding\r\n");
            }
        }
        None => head.put_slice(b"vary: accept-encoding\r\n"),
    }
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
        } = parse_head(raw)
        else {
            panic!("expected a complete head");
        };
        assert_eq!(
            (method, target, upgrade),
            ("GET", "/streams/a?lastEventId=a%3A1%3A2", true)
        );
        assert_eq!(headers.len(), 2);
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
        let plain = response_head(false, Some((HeaderValue::from_static("*"), false)), None);
        let text = std::str::from_utf8(&plain).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("content-type: text/event-stream\r\n"));
        assert!(text.contains("access-control-allow-origin: *\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        assert!(!text.contains("content-encoding"));
        let gz = response_head(true, None, Some("~ab"));
        assert!(
            std::str::from_utf8(&gz)
                .unwrap()
                .contains("content-encoding: gzip\r\nx-patchwire-stream: ~ab\r\n")
        );
    }
}

//! What a subscription request is: one decision, rendered by both transports.
//!
//! The accept loop serves a connection's first HTTP/1.x request on the direct path (its own
//! head reader, then the events written straight to the socket) and everything else through
//! hyper (HTTP/2, later HTTP/1 requests). Both ask [`Subscriptions::decide`] what a request
//! is, before any router: the stream (a configured one, a dynamic one, or a dynamic one's
//! native view) or the refusal, the dialect, gzip, the resume point, the SSE options and every
//! response header, CORS included. The direct path writes the answer as HTTP/1.1 bytes,
//! hyper as a response; a test compares the two. Requests that are not subscriptions (JSON
//! views, listings, pushes, unknown streams) are the router's.
//!
//! The same decisions serve WebSocket connections: [`Subscriptions::upgrade`] says what
//! `GET /ws` is (the handshake's answer), and each `subscribe` message of a connection is
//! decided here too ([`ws::Streams`]), with the same streams, tokens and refusals as SSE.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use tokio::sync::watch;

use super::proxy::STREAM_HEADER;
use crate::config::Cors;
use crate::hub::{Hub, Resume, Subscription};
use crate::proxy::target::{TOKEN_PARAM, is_dynamic_path};
use crate::proxy::{self, Opened, Proxy};
use crate::sinks::sse::SseOptions;
use crate::sinks::ws::{self, protocol::Target};
use crate::views::{ViewError, Views};
use crate::wire::{self, Dialect, gzip};

/// A request as either transport read it: what a subscription decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path, still percent-encoded.
    pub path: &'a str,
    /// The raw query string, if any.
    pub query: Option<&'a str>,
    /// The request headers (the direct path keeps only those read here).
    pub headers: &'a HeaderMap,
}

/// What a subscription request comes to.
pub enum Decision {
    /// A subscription: `200` with these headers, then its events.
    Subscribe(Subscribe),
    /// A whole answer (a refusal); the direct path closes the connection after it.
    Answer(Answer),
}

/// A stream opened for a request, as its SSE subscription would be.
pub struct Open {
    /// The subscription (its initial events and live receiver).
    pub subscription: Subscription,
    /// For a dynamic stream: its name and what the request holds while it lasts (the
    /// token's connection slot, the poll-period claim).
    pub dynamic: Option<(Arc<str>, Box<dyn Send>)>,
}

/// A subscription to serve.
pub struct Subscribe {
    /// The response headers, in order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Where the subscriber starts, and its live receiver.
    pub subscription: Subscription,
    /// How its events are written.
    pub options: SseOptions,
    /// What the connection holds while it lasts (a proxy token's slot, a poll-period claim).
    pub hold: Option<Box<dyn Send>>,
}

/// A complete response.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers, in order (the transport adds the length).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body.
    pub body: Bytes,
}

/// What a `GET /ws` request comes to.
pub enum Upgrade {
    /// Switch protocols: `101` with these headers, then the WebSocket connection.
    Accept {
        /// The `101` answer's headers.
        headers: Vec<(HeaderName, HeaderValue)>,
        /// The token the handshake presented (`X-Sd-Token` query parameter or header).
        token: Option<String>,
    },
    /// A whole answer (the handshake is refused); the connection closes after it.
    Answer(Answer),
}

/// What subscription decisions need: the streams, the proxy mode, the SSE and CORS settings.
pub struct Subscriptions {
    hub: Arc<Hub>,
    views: Arc<Views>,
    proxy: Option<Arc<Proxy>>,
    retry: Duration,
    gzip_level: gzip::Level,
    cors: Cors,
    websocket: bool,
    /// In a cluster: whether this node has read the log yet, and how long a subscription
    /// waits for it.
    log: Option<(watch::Receiver<bool>, Duration)>,
}

impl Subscriptions {
    /// Decisions over `hub` and (when enabled) `proxy`, with the `retry:` hint and the
    /// cross-origin policy of the whole server; `websocket`: whether `GET /ws` upgrades.
    pub fn new(
        hub: Arc<Hub>,
        views: Arc<Views>,
        proxy: Option<Arc<Proxy>>,
        retry: Duration,
        cors: Cors,
        websocket: bool,
    ) -> Self {
        Subscriptions {
            hub,
            views,
            proxy,
            retry,
            gzip_level: gzip::Level::DEFAULT,
            cors,
            websocket,
            log: None,
        }
    }

    /// Deflate events, snapshots and catch-up pages at `level` (`server.gzip_level`; by
    /// default [`gzip::Level::DEFAULT`]).
    pub fn with_gzip_level(mut self, level: gzip::Level) -> Self {
        self.gzip_level = level;
        self
    }

    /// The level events, snapshots and catch-up pages are deflated at.
    pub fn gzip_level(&self) -> gzip::Level {
        self.gzip_level
    }

    /// In a cluster: subscriptions to configured streams wait (at most `at_most`) until
    /// `loaded`, the node's first catch-up with the log. A node serves HTTP a moment before it
    /// has read the log; a subscriber resuming in that moment would otherwise find no epoch
    /// to resume in and get a snapshot instead of the changes it missed.
    pub fn after_the_log(mut self, loaded: watch::Receiver<bool>, at_most: Duration) -> Self {
        self.log = Some((loaded, at_most));
        self
    }

    /// Waits until the node read the log (or the wait's bound passed: then it serves what it
    /// has, as a node without Redis does).
    async fn log_read(&self) {
        if let Some((loaded, at_most)) = &self.log
            && !*loaded.borrow()
        {
            let mut loaded = loaded.clone();
            let _ = tokio::time::timeout(*at_most, loaded.wait_for(|l| *l)).await;
        }
    }

    /// What `GET /ws` is (when WebSockets are enabled): the handshake's answer, with the
    /// token it presented. `None`: not `/ws`, or WebSockets are off (the router's 404).
    /// Browsers may open it from the origins `server.cors` allows (without CORS, from the
    /// server's own origin only); clients that send no `Origin` always may.
    pub fn upgrade(&self, request: &Request<'_>) -> Option<Upgrade> {
        if request.path != "/ws" || !self.websocket || request.method != Method::GET {
            return None;
        }
        let refuse = |status: StatusCode, message: &str| {
            let mut headers = vec![(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )];
            if status == StatusCode::UPGRADE_REQUIRED {
                headers.push((header::UPGRADE, HeaderValue::from_static("websocket")));
                headers.push((
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                ));
            }
            Upgrade::Answer(Answer {
                status,
                headers,
                body: Bytes::from(super::error_body(status, message).to_string()),
            })
        };
        if !self.origin_allowed(request.headers) {
            return Some(refuse(
                StatusCode::FORBIDDEN,
                "this Origin may not open a WebSocket here (server.cors.allow_origins)",
            ));
        }
        Some(match ws::handshake::accept(request.headers) {
            Ok(headers) => Upgrade::Accept {
                headers,
                token: query_token(request.query).or_else(|| {
                    request
                        .headers
                        .get(TOKEN_PARAM)
                        .and_then(|v| v.to_str().ok())
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                }),
            },
            Err(rejected) => refuse(
                StatusCode::from_u16(rejected.status).unwrap_or(StatusCode::BAD_REQUEST),
                rejected.message,
            ),
        })
    }

    /// Whether a browser page of the request's `Origin` may open a WebSocket: as
    /// `server.cors` lets it read SSE (any origin, the listed ones, or only the server's own).
    fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        match &self.cors {
            Cors::AnyOrigin => true,
            Cors::Origins(allowed) => allowed.iter().any(|a| a == origin),
            Cors::Disabled => {
                let authority = origin
                    .to_str()
                    .ok()
                    .and_then(|o| o.split_once("://"))
                    .map(|(_, authority)| authority);
                authority.is_some_and(|a| {
                    headers
                        .get(header::HOST)
                        .is_some_and(|host| host.as_bytes().eq_ignore_ascii_case(a.as_bytes()))
                })
            }
        }
    }

    /// What `request` is, if it is a subscription: `GET` (or `HEAD`) of `/streams/{name}` for
    /// an existing stream, or `GET /{upstream URL}` in the proxy mode, not asking for JSON.
    /// `None`: not a subscription, the router answers (an unknown stream's 404 included).
    pub async fn decide(&self, request: &Request<'_>) -> Option<Decision> {
        let get = request.method == Method::GET;
        if !(get || request.method == Method::HEAD) {
            return None;
        }
        if let Some(raw) = request.path.strip_prefix("/streams/") {
            // Nested paths are no stream's; escaped names are decoded as the router does.
            if raw.contains('/') || wants_json(request.headers) {
                return None;
            }
            let name = percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .ok()?;
            let resume = resume_point(request.headers, last_event_id(request.query).as_deref());
            let opened = self
                .open(&name, request.query, request.headers, &resume)
                .await?;
            return Some(match opened {
                Ok(open) => {
                    self.subscribe(request, open.subscription, Dialect::Native, open.dynamic)
                }
                Err(refusal) => Decision::Answer(self.refused_json(request, &refusal)),
            });
        }
        if get && is_dynamic_path(request.path) && !wants_json(request.headers) {
            return Some(self.dynamic(request).await);
        }
        None
    }

    /// Subscribes to the stream `/streams/{name}?{query}` names, in patchwire's own dialect,
    /// from `resume`: a configured stream or one of its views (after the cluster's log was
    /// read), or a dynamic stream's native view `~{id}` under the same token rules as its URL
    /// (`X-Sd-Token` in `query` or `headers`). The one decision of who may read which stream,
    /// for SSE subscriptions and catch-up reads alike. `None`: no such stream (or `~{id}`
    /// without the proxy mode): the router answers.
    pub async fn open(
        &self,
        name: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        resume: &Resume,
    ) -> Option<Result<Open, wire::Refusal>> {
        if name.starts_with('~') {
            let proxy = self.proxy.as_ref()?;
            let token = query_token(query);
            return Some(
                proxy
                    .view(name, resume, token.as_deref(), headers)
                    .await
                    .map(|opened| Open {
                        subscription: opened.subscription,
                        dynamic: Some((opened.stream, Box::new(opened.hold) as Box<dyn Send>)),
                    })
                    .map_err(|refusal| refusal.to_wire()),
            );
        }
        self.log_read().await;
        let subscribed = self
            .views
            .target(&self.hub, name, query)?
            .and_then(|target| target.subscribe(resume));
        Some(
            subscribed
                .map(|subscription| Open {
                    subscription,
                    dynamic: None,
                })
                .map_err(|error| view_refusal(&error)),
        )
    }

    /// `GET /{upstream URL}`: the dynamic stream of that URL in the Streamdata.io dialect; a
    /// refusal is an `error` event on a 200, as those clients expect.
    async fn dynamic(&self, request: &Request<'_>) -> Decision {
        let Some(proxy) = &self.proxy else {
            let refusal = proxy::Refusal::Disabled.to_wire();
            return Decision::Answer(self.refused_sse(request, &refusal, streamdata(true)));
        };
        let dialect = streamdata(proxy.settings().ascii_only);
        match proxy
            .open(request.path, request.query, request.headers, &Resume::Fresh)
            .await
        {
            Ok(opened) => self.opened(request, opened, dialect),
            Err(refusal) => {
                Decision::Answer(self.refused_sse(request, &refusal.to_wire(), dialect))
            }
        }
    }

    /// A dynamic stream's subscription, named in the response, holding what it holds.
    fn opened(&self, request: &Request<'_>, opened: Opened, dialect: Dialect) -> Decision {
        let Opened {
            subscription,
            stream,
            hold,
        } = opened;
        let named = Some((stream, Box::new(hold) as Box<dyn Send>));
        self.subscribe(request, subscription, dialect, named)
    }

    /// The one place a subscription's SSE options and response headers are made. `dynamic`:
    /// the dynamic stream's name and what its connection holds.
    fn subscribe(
        &self,
        request: &Request<'_>,
        subscription: Subscription,
        dialect: Dialect,
        dynamic: Option<(Arc<str>, Box<dyn Send>)>,
    ) -> Decision {
        let options = SseOptions {
            retry: self.retry,
            gzip: accepts_gzip(request.headers).then_some(self.gzip_level),
            dialect,
        };
        let mut headers = vec![
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // Tell nginx-style reverse proxies not to buffer the stream.
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ];
        if options.gzip.is_some() {
            headers.push((header::CONTENT_ENCODING, HeaderValue::from_static("gzip")));
        }
        let hold = dynamic.map(|(name, hold)| {
            if let Ok(value) = HeaderValue::from_str(&name) {
                headers.push((HeaderName::from_static(STREAM_HEADER), value));
            }
            hold
        });
        self.put_cors(&mut headers, request.headers);
        Decision::Subscribe(Subscribe {
            headers,
            subscription,
            options,
            hold,
        })
    }

    /// A refusal for SSE clients: `200`, `retry:` and one `error` event.
    fn refused_sse(
        &self,
        request: &Request<'_>,
        refusal: &wire::Refusal,
        dialect: Dialect,
    ) -> Answer {
        let body = wire::streamdata::refusal_body(refusal, dialect, SystemTime::now());
        let mut headers = vec![
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ];
        self.put_cors(&mut headers, request.headers);
        Answer {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(body),
        }
    }

    /// A refusal as the JSON error of its status (with `Retry-After` when it is worth
    /// retrying).
    fn refused_json(&self, request: &Request<'_>, refusal: &wire::Refusal) -> Answer {
        let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut headers = vec![(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )];
        if let Some(retry_after) = retry_after(status) {
            headers.push((header::RETRY_AFTER, retry_after));
        }
        self.put_cors(&mut headers, request.headers);
        Answer {
            status,
            headers,
            body: Bytes::from(super::error_body(status, &refusal.message).to_string()),
        }
    }

    /// `Access-Control-Allow-Origin` (when this origin is allowed) and `Vary`.
    fn put_cors(&self, headers: &mut Vec<(HeaderName, HeaderValue)>, request: &HeaderMap) {
        let allowed = match &self.cors {
            Cors::Disabled => None,
            Cors::AnyOrigin => Some((HeaderValue::from_static("*"), false)),
            Cors::Origins(allowed) => request
                .get(header::ORIGIN)
                .filter(|origin| allowed.iter().any(|a| a == *origin))
                .map(|origin| (origin.clone(), true)),
        };
        let vary = match allowed {
            Some((origin, echoed)) => {
                headers.push((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin));
                if echoed {
                    "accept-encoding, origin"
                } else {
                    "accept-encoding"
                }
            }
            None => "accept-encoding",
        };
        headers.push((header::VARY, HeaderValue::from_static(vary)));
    }
}

/// A view that cannot be had, as a refusal.
pub fn view_refusal(error: &ViewError) -> wire::Refusal {
    wire::Refusal {
        status: error.status(),
        cause: error.cause(),
        message: error.to_string(),
    }
}

/// WebSocket subscriptions decide as SSE requests do: configured streams by name for anyone,
/// dynamic streams (by URL or native name) under the proxy's token, host and SSRF rules.
impl ws::Streams for Subscriptions {
    async fn admit(&self, token: &str) -> Result<ws::Admitted, wire::Refusal> {
        let Some(proxy) = &self.proxy else {
            return Err(proxy::Refusal::Disabled.to_wire());
        };
        let admission = proxy.admit(Some(token)).await.map_err(|r| r.to_wire())?;
        Ok(ws::Admitted {
            name: admission.token().settings.name.clone(),
            hold: Box::new(admission),
        })
    }

    async fn open(
        &self,
        target: &Target,
        resume: &Resume,
        token: Option<&str>,
    ) -> Result<ws::Opened, wire::Refusal> {
        if matches!(target, Target::View { .. })
            || matches!(target, Target::Stream(name) if !name.starts_with('~'))
        {
            self.log_read().await;
        }
        let dynamic = |opened: Opened| ws::Opened {
            subscription: opened.subscription,
            hold: Some(Box::new(opened.hold)),
        };
        let configured =
            |name: &str, query: Option<&str>| match self.views.target(&self.hub, name, query) {
                Some(target) => target
                    .and_then(|target| target.subscribe(resume))
                    .map(|subscription| ws::Opened {
                        subscription,
                        hold: None,
                    })
                    .map_err(|error| view_refusal(&error)),
                None => Err(wire::Refusal {
                    status: 404,
                    cause: "no-such-stream",
                    message: format!("no stream named {name:?}; GET /streams lists them"),
                }),
            };
        match target {
            Target::Stream(name) if !name.starts_with('~') => configured(name, None),
            Target::View { stream, query } => configured(stream, Some(query)),
            Target::Stream(name) => {
                let proxy = self
                    .proxy
                    .as_ref()
                    .ok_or(proxy::Refusal::Disabled.to_wire())?;
                proxy
                    .view(name, resume, token, &HeaderMap::new())
                    .await
                    .map(dynamic)
                    .map_err(|r| r.to_wire())
            }
            Target::Url(url) => {
                let proxy = self
                    .proxy
                    .as_ref()
                    .ok_or(proxy::Refusal::Disabled.to_wire())?;
                let target = format!("/{url}");
                let (path, query) = match target.split_once('?') {
                    Some((path, query)) => (path, Some(query)),
                    None => (target.as_str(), None),
                };
                let mut headers = HeaderMap::new();
                if let Some(token) = token.and_then(|t| HeaderValue::from_str(t).ok()) {
                    headers.insert(TOKEN_PARAM, token);
                }
                proxy
                    .open(path, query, &headers, resume)
                    .await
                    .map(dynamic)
                    .map_err(|r| r.to_wire())
            }
        }
    }
}

/// A Streamdata.io dialect with a fresh random session id.
fn streamdata(ascii_only: bool) -> Dialect {
    Dialect::Streamdata {
        session: rand::random(),
        ascii_only,
    }
}

/// `Retry-After` for refusals worth retrying later (429, 503).
pub fn retry_after(status: StatusCode) -> Option<HeaderValue> {
    (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE)
        .then(|| HeaderValue::from(wire::streamdata::REFUSAL_RETRY.as_secs()))
}

/// The `X-Sd-Token` query parameter (any case), as the native view of a dynamic stream takes
/// it.
pub fn query_token(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k.eq_ignore_ascii_case(TOKEN_PARAM))
        .map(|(_, v)| v.into_owned())
}

/// The `lastEventId` query parameter.
fn last_event_id(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "lastEventId")
        .map(|(_, v)| v.into_owned())
}

/// The `Last-Event-ID` to resume from: the header, else the `lastEventId` query parameter
/// (for clients such as browsers' first connection that cannot set headers).
pub fn resume_point(headers: &HeaderMap, query_last_event_id: Option<&str>) -> Resume {
    let header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    match header.or(query_last_event_id.map(str::trim).filter(|s| !s.is_empty())) {
        Some(id) => Resume::After(id.to_owned()),
        None => Resume::Fresh,
    }
}

/// Whether the client accepts gzip (`Accept-Encoding` lists it with a non-zero q-value).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let q_zero = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip"))
                && !q_zero
        })
}

/// Whether the client asked for the current document as plain JSON rather than a stream.
pub fn wants_json(headers: &HeaderMap) -> bool {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let has = |media: &str| {
        accept.split(',').any(|item| {
            item.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case(media))
        })
    };
    has("application/json") && !has("text/event-stream")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn resume_point_prefers_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_point(&h, None), Resume::Fresh);
        assert_eq!(
            resume_point(&h, Some("s:1:2")),
            Resume::After("s:1:2".into())
        );
        h.insert("last-event-id", HeaderValue::from_static("s:1:3"));
        assert_eq!(
            resume_point(&h, Some("s:1:2")),
            Resume::After("s:1:3".into())
        );
        h.insert("last-event-id", HeaderValue::from_static("  "));
        assert_eq!(resume_point(&h, None), Resume::Fresh);
    }

    #[test]
    fn accept_negotiation() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static(v));
            wants_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(!with("text/event-stream"));
        assert!(!with("*/*"));
        assert!(!with("text/event-stream, application/json"));
        assert!(!wants_json(&HeaderMap::new()));
    }

    #[test]
    fn gzip_negotiation() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(v));
            accepts_gzip(&h)
        };
        assert!(with("gzip"));
        assert!(with("br, gzip;q=0.5"));
        assert!(with("GZIP"));
        assert!(!with("gzip;q=0"));
        assert!(!with("br, deflate"));
        assert!(!with("identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}

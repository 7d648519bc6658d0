//! The accept loop: reads each connection's request head (`head.rs`), serves a first HTTP/1.x
//! request that is a subscription on the direct path (`direct.rs`) and hands everything else
//! to hyper (with the bytes already read replayed, `rewind.rs`), with TCP_NODELAY, graceful
//! shutdown, and a watchdog that closes hyper connections whose socket refuses writes for too
//! long (stalled subscribers, `stall.rs`). Both paths ask the same function what a
//! subscription request is (`api::subscribe`) and render its answer: the direct path as
//! HTTP/1.1 bytes, hyper as a response, before the router sees the request.
//!
//! Every connection is bounded in time while it has no request in flight: `header_timeout`
//! until its first request (HTTP/1 head, or HTTP/2 preface and first stream), `idle_timeout`
//! after that. At most `max_connections` are open at once; past that a new connection gets a
//! short 503 (in HTTP/2 when it opens with the HTTP/2 preface) and is closed, while the open
//! ones keep being served. When accepting fails for
//! want of file descriptors (EMFILE/ENFILE), the loop backs off (10ms doubling to 1s) and logs
//! once per interval instead of once per error.

mod direct;
mod files;
mod head;
mod idle;
mod rewind;
mod stall;

pub use direct::Stall;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::BytesMut;
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::subscribe::{self, Decision, Subscriptions, Upgrade};
use crate::sinks::sse;
use crate::sinks::ws::WebSockets;
pub use files::fit as fit_open_files;
use head::{Head, parse_head};
use idle::{Activity, InFlight};
use rewind::Rewind;
use stall::Watched;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// How long shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
    /// How long a new connection may take to send its first request.
    pub header_timeout: Duration,
    /// How long a connection with no request in flight stays open.
    pub idle_timeout: Duration,
    /// Open connections past which new ones are refused.
    pub max_connections: usize,
}

/// The body of the answer to a connection past `max_connections`.
const REFUSAL_BODY: &str =
    "{\"status\":503,\"message\":\"too many open connections (server.max_connections)\"}\n";
/// Refused connections being answered at once; past this they are closed without an answer.
const MAX_REFUSING: usize = 64;
/// How long a refused connection is given to read its answer.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// At most one log line per this interval for repeated accept failures or refusals.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Past this many bytes without a complete head, the connection is hyper's to judge.
const MAX_DIRECT_HEAD: usize = 16 * 1024;

/// Serves on `listener` until `shutdown` is cancelled: subscriptions as `subscriptions`
/// decides (a connection's first HTTP/1.x one on the direct path), every other request through
/// `router`; then waits up to the grace period for connections to end.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    subscriptions: Arc<Subscriptions>,
    websockets: Arc<WebSockets<Subscriptions>>,
    stall: Stall,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The idle watchdog bounds the wait for every request head after the first (which the
    // direct path reads within `header_timeout`), for HTTP/1 and HTTP/2 alike.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(None);
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    let builder = Arc::new(builder);
    let open = Arc::new(Semaphore::new(options.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut backoff = AcceptBackoff::default();
    let mut refusals = Throttled::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(error) => {
                let Some(delay) = backoff.failed(&error, Instant::now()) else {
                    continue;
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            if let Some(suppressed) = refusals.tick(Instant::now()) {
                tracing::warn!(
                    max_connections = options.max_connections,
                    refused_since_last_line = suppressed + 1,
                    "refusing connections: server.max_connections are open"
                );
            }
            if let Ok(permit) = refusing.clone().try_acquire_owned() {
                connections.spawn(refuse(tcp, permit));
            }
            continue;
        };
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, %peer, "could not set TCP_NODELAY");
        }
        let connection = Connection {
            router: router.clone(),
            subscriptions: subscriptions.clone(),
            websockets: websockets.clone(),
            stall: stall.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            shutdown: shutdown.clone(),
            header_timeout: options.header_timeout,
            idle_timeout: options.idle_timeout,
            _open: permit,
        };
        connections.spawn(connection.run(tcp, peer));
    }
    drop(listener);
    connections.close();
    let drained = async {
        graceful.shutdown().await;
        connections.wait().await;
    };
    if tokio::time::timeout(options.shutdown_grace, drained)
        .await
        .is_err()
    {
        tracing::warn!(grace = ?options.shutdown_grace, "connections still open after the shutdown grace period");
    }
}

/// One accepted connection and what it needs to be served.
struct Connection {
    router: Router,
    subscriptions: Arc<Subscriptions>,
    websockets: Arc<WebSockets<Subscriptions>>,
    stall: Stall,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    shutdown: CancellationToken,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Held while the connection is open (`max_connections`).
    _open: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(self, tcp: TcpStream, peer: std::net::SocketAddr) {
        let read = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            read = tokio::time::timeout(self.header_timeout, read_head(&tcp)) => read,
        };
        let prefix = match read {
            Ok(Ok(prefix)) => prefix,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "connection failed before its request");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, timeout = ?self.header_timeout, "no request head in time");
                return;
            }
        };
        if prefix.is_empty() {
            return;
        }
        let head = parse_head(&prefix);
        if let Head::Complete {
            method: "GET",
            target,
            headers,
            len,
            ..
        } = &head
        {
            let (path, query) = match target.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (*target, None),
            };
            let request = subscribe::Request {
                method: &Method::GET,
                path,
                query,
                headers,
            };
            match self.subscriptions.upgrade(&request) {
                Some(Upgrade::Accept { headers, token }) => {
                    let rest = prefix[*len..].to_vec();
                    return self.websocket(tcp, &headers, token, rest).await;
                }
                Some(Upgrade::Answer(answer)) => return self.stall.answer(tcp, answer).await,
                None => {}
            }
        }
        if let Some((target, headers)) = head.subscription_request() {
            let (path, query) = match target.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (target, None),
            };
            let request = subscribe::Request {
                method: &Method::GET,
                path,
                query,
                headers,
            };
            match self.subscriptions.decide(&request).await {
                Some(Decision::Subscribe(subscribe)) => {
                    return self.stall.serve(tcp, subscribe).await;
                }
                Some(Decision::Answer(answer)) => return self.stall.answer(tcp, answer).await,
                None => {}
            }
        }
        drop(head);
        let (io, watch) = Watched::new(tcp);
        let io = Rewind::new(prefix.freeze(), io);
        let router = self.router;
        let subscriptions = self.subscriptions;
        let activity = Arc::new(Activity::default());
        let tracked = activity.clone();
        // A WebSocket accepted on a hyper connection (a later request of a keep-alive
        // connection, e.g. from a reverse proxy's pool) is served here once hyper hands over
        // the connection, so it keeps this connection's slot.
        let upgraded: Arc<std::sync::Mutex<Option<Upgraded>>> = Arc::default();
        let pending = upgraded.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            let in_flight = InFlight::start(tracked.clone());
            let mut router = router.clone();
            let subscriptions = subscriptions.clone();
            let pending = pending.clone();
            async move {
                let response = match upgrade(&subscriptions, &request) {
                    Some(Upgrade::Accept { headers, token }) => {
                        let on_upgrade = hyper::upgrade::on(&mut request);
                        *pending.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Upgraded { on_upgrade, token });
                        let mut response = Response::new(Body::empty());
                        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        response.headers_mut().extend(headers);
                        response
                    }
                    Some(Upgrade::Answer(answer)) => {
                        render(Decision::Answer(answer), request.method() == Method::HEAD)
                    }
                    None => match decide(&subscriptions, &request).await {
                        Some(decision) => render(decision, request.method() == Method::HEAD),
                        None => router.call(request).await?,
                    },
                };
                Ok::<_, std::convert::Infallible>(response.map(|body| in_flight.track(body)))
            }
        });
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let connection = self.watcher.watch(connection);
        tokio::select! {
            result = connection => {
                if let Err(error) = result {
                    tracing::debug!(%peer, error = %error, "connection ended with an error");
                }
            }
            () = watch.stalled_for(self.stall.timeout) => {
                self.stall.stalled.inc();
                tracing::info!(%peer, timeout = ?self.stall.timeout, "closing a connection that stopped reading");
            }
            () = activity.idle_for(self.header_timeout, self.idle_timeout) => {
                tracing::debug!(%peer, "closing a connection with no request in flight");
            }
        }
        let accepted = upgraded.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Upgraded { on_upgrade, token }) = accepted {
            match on_upgrade.await {
                Ok(io) => {
                    let (read, write) = tokio::io::split(TokioIo::new(io));
                    let shutdown = self.shutdown.clone();
                    self.websockets
                        .serve(read, write, Vec::new(), token, shutdown)
                        .await;
                }
                Err(error) => tracing::debug!(%peer, %error, "websocket upgrade failed"),
            }
        }
    }

    /// Serves an accepted WebSocket handshake read on the direct path: the `101` head, then
    /// the connection (`rest`: bytes the client sent after its request).
    async fn websocket(
        self,
        tcp: TcpStream,
        headers: &[(http::HeaderName, http::HeaderValue)],
        token: Option<String>,
        rest: Vec<u8>,
    ) {
        if let Err(error) = self.stall.switch(&tcp, headers).await {
            tracing::debug!(%error, "could not answer a websocket handshake");
            return;
        }
        let (read, write) = tcp.into_split();
        let shutdown = self.shutdown.clone();
        self.websockets
            .serve(read, write, rest, token, shutdown)
            .await;
    }
}

/// A WebSocket handshake hyper answered with `101`, waiting for hyper to hand the connection
/// over.
struct Upgraded {
    on_upgrade: hyper::upgrade::OnUpgrade,
    token: Option<String>,
}

/// What `subscriptions` makes of a `GET /ws` hyper read.
fn upgrade(subscriptions: &Subscriptions, request: &http::Request<Incoming>) -> Option<Upgrade> {
    let request = subscribe::Request {
        method: request.method(),
        path: request.uri().path(),
        query: request.uri().query(),
        headers: request.headers(),
    };
    subscriptions.upgrade(&request)
}

/// What `subscriptions` makes of a request hyper read.
async fn decide(
    subscriptions: &Subscriptions,
    request: &http::Request<Incoming>,
) -> Option<Decision> {
    let request = subscribe::Request {
        method: request.method(),
        path: request.uri().path(),
        query: request.uri().query(),
        headers: request.headers(),
    };
    subscriptions.decide(&request).await
}

/// A subscription decision as hyper's response (without a body for `HEAD`).
fn render(decision: Decision, head_only: bool) -> Response<Body> {
    let (status, headers, body) = match decision {
        Decision::Subscribe(subscribe) => {
            let body = if head_only {
                Body::empty()
            } else {
                sse::body(subscribe.subscription, subscribe.options, subscribe.hold)
            };
            (StatusCode::OK, subscribe.headers, body)
        }
        Decision::Answer(answer) => {
            let body = if head_only {
                Body::empty()
            } else {
                Body::from(answer.body)
            };
            (answer.status, answer.headers, body)
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().extend(headers);
    response
}

/// The HTTP/2 connection preface a client with prior knowledge opens with (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client opens with the HTTP/2 preface: looked at without reading it, until its
/// first bytes tell (`false` when they do not come within `REFUSAL_LINGER`).
async fn opens_with_h2_preface(tcp: &TcpStream) -> bool {
    let look = async {
        let mut first = [0u8; H2_PREFACE.len()];
        loop {
            let n = tcp.peek(&mut first).await?;
            if n == 0 || first[..n] != H2_PREFACE[..n] {
                return io::Result::Ok(false);
            }
            if n == H2_PREFACE.len() {
                return Ok(true);
            }
            // Part of the preface so far: the rest is on its way.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    matches!(
        tokio::time::timeout(REFUSAL_LINGER, look).await,
        Ok(Ok(true))
    )
}

/// The answer to a request on a connection past `max_connections`.
fn refusal() -> Response<Body> {
    let mut response = Response::new(Body::from(REFUSAL_BODY));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    response
}

/// Answers a connection past `max_connections` with a 503 and closes it, after giving the
/// client a moment to read the answer (closing with its request unread would reset the
/// connection and could discard the answer). An HTTP/2 client with prior knowledge is
/// answered in HTTP/2: a 503 on its first stream, then `GOAWAY`.
async fn refuse(mut tcp: TcpStream, _permit: OwnedSemaphorePermit) {
    if opens_with_h2_preface(&tcp).await {
        let (asked, answered) = tokio::sync::oneshot::channel::<()>();
        let asked = std::sync::Mutex::new(Some(asked));
        let service = hyper::service::service_fn(move |_request| {
            if let Some(asked) = asked.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = asked.send(());
            }
            async { Ok::<_, std::convert::Infallible>(refusal()) }
        });
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tcp), service);
        let served = async {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = answered => {}
            }
            // Its first stream is answered: no other is taken.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, served).await;
        return;
    }
    let answered = async {
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{REFUSAL_BODY}",
            REFUSAL_BODY.len()
        );
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answered).await;
}

/// A limit on how often a repeated event is logged.
#[derive(Debug, Default)]
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    /// `Some(events suppressed since the last line)` when this event should be logged.
    fn tick(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// What the accept loop does after an accept error: retry at once for errors about one
/// connection, back off (10ms doubling to 1s) while the process is out of file descriptors or
/// memory, logging at most once per `LOG_INTERVAL`.
#[derive(Debug, Default)]
struct AcceptBackoff {
    delay: Option<Duration>,
    log: Throttled,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn succeeded(&mut self) {
        self.delay = None;
    }

    /// How long to wait before accepting again, if at all.
    fn failed(&mut self, error: &io::Error, now: Instant) -> Option<Duration> {
        let exhausted = matches!(
            error.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if !exhausted {
            // ECONNABORTED and the like: that connection is gone, the next may be fine.
            tracing::debug!(%error, "accept failed");
            return None;
        }
        let delay = self.delay.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.delay = Some(delay);
        if let Some(suppressed) = self.log.tick(now) {
            tracing::warn!(
                %error,
                retry_in = ?delay,
                failures_since_last_line = suppressed + 1,
                "accept failed: out of file descriptors or memory; open connections keep being \
                 served, new ones wait (raise `ulimit -n` or lower server.max_connections)"
            );
        }
        Some(delay)
    }
}

/// Reads until a complete request head (or something that is not one, or enough bytes that
/// hyper should judge) has arrived; returns everything read. Empty: the peer closed first.
async fn read_head(tcp: &TcpStream) -> io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        tcp.readable().await?;
        let spare = buf.capacity() - buf.len();
        if spare < 512 {
            buf.reserve(1024);
        }
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => return Ok(buf),
            Ok(_) => {
                if buf.len() >= MAX_DIRECT_HEAD || !matches!(parse_head(&buf), Head::Partial) {
                    return Ok(buf);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_and_log_once_per_interval() {
        let mut backoff = AcceptBackoff::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let start = Instant::now();
        let delays: Vec<_> = (0..10)
            .map(|i| backoff.failed(&emfile, start + Duration::from_millis(i)))
            .collect();
        assert_eq!(delays[0], Some(Duration::from_millis(10)));
        assert_eq!(delays[1], Some(Duration::from_millis(20)));
        assert_eq!(delays[9], Some(Duration::from_secs(1)));
        // Ten failures within one interval: one line, then the next line counts the rest.
        assert_eq!(backoff.log.suppressed, 9);
        assert_eq!(backoff.log.tick(start + LOG_INTERVAL), Some(9));
        backoff.succeeded();
        assert_eq!(
            backoff.failed(&emfile, start + LOG_INTERVAL),
            Some(Duration::from_millis(10))
        );
        // An error about one connection is retried at once.
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(backoff.failed(&aborted, start), None);
    }
}

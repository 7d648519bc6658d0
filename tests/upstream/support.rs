//! A mock upstream whose document and behaviour tests change, a recording `Publish`, and
//! builders for stream settings.

use std::io::Write;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use patchwire::diff::DiffOptions;
use patchwire::metrics::Metrics;
use patchwire::upstream::config::{BackoffSettings, RateLimit, StreamSettings};
use patchwire::upstream::decode::Format;
use patchwire::upstream::fetch::Redacted;
use patchwire::upstream::{
    FetchError, FetchRequest, Fetched, Fetcher, GroupLimiter, Poller, Publish, PublishResult,
    TokioClock, Upstream, Validators,
};
use serde_json::Value;
use tokio::time::Instant;
use url::Url;

/// How the mock sends its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// The whole body with its Content-Length.
    Full,
    /// `chunks` chunks of `chunk` bytes without Content-Length, then nothing, forever.
    ChunkedThenHang { chunk: usize, chunks: usize },
    /// A Content-Length of `length`, a few bytes, then nothing, forever.
    LyingLength { length: u64 },
    /// A Content-Length larger than the body, then the connection breaks.
    Truncated,
}

/// What the mock answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub status: u16,
    pub body: Bytes,
    pub etag: Option<&'static str>,
    pub last_modified: Option<&'static str>,
    pub retry_after: Option<String>,
    pub delay: Duration,
    pub gzip: bool,
    pub kind: BodyKind,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 200,
            body: Bytes::from_static(b"{}"),
            etag: None,
            last_modified: None,
            retry_after: None,
            delay: Duration::ZERO,
            gzip: false,
            kind: BodyKind::Full,
        }
    }
}

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub headers: HeaderMap,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct MockState {
    behaviour: Mutex<Behaviour>,
    seen: Mutex<Vec<Seen>>,
}

/// An HTTP upstream on 127.0.0.1:0; stops when dropped.
pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<MockState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl MockUpstream {
    pub async fn start(behaviour: Behaviour) -> MockUpstream {
        let state = Arc::new(MockState {
            behaviour: Mutex::new(behaviour),
            ..MockState::default()
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockUpstream {
            addr,
            state,
            server,
        }
    }

    pub fn url(&self, path: &str) -> Url {
        Url::parse(&format!("http://{}{path}", self.addr)).expect("mock URL is valid")
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.behaviour.lock().expect("mock lock"));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("mock lock").clone()
    }

    pub fn last_seen(&self) -> Seen {
        self.seen().pop().expect("the mock received a request")
    }

    /// Waits (up to 5s) until the mock has received `n` requests.
    pub async fn wait_for_requests(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.seen().len() < n {
            assert!(
                Instant::now() < deadline,
                "mock never received {n} requests"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn handle(State(state): State<Arc<MockState>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    state.seen.lock().expect("mock lock").push(Seen {
        headers: request.headers().clone(),
    });
    let b = state.behaviour.lock().expect("mock lock").clone();
    tokio::time::sleep(b.delay).await;

    if let Some(rest) = path.strip_prefix("/redirect/") {
        let n: u32 = rest.parse().expect("redirect count");
        if n > 0 {
            return Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, format!("/redirect/{}", n - 1))
                .body(Body::empty())
                .expect("valid response");
        }
    }

    let mut response = Response::builder().status(b.status);
    if let Some(ra) = &b.retry_after {
        response = response.header(header::RETRY_AFTER, ra.as_str());
    }
    if let Some(etag) = b.etag {
        response = response.header(header::ETAG, etag);
    }
    if let Some(lm) = b.last_modified {
        response = response.header(header::LAST_MODIFIED, lm);
    }
    let header_is = |name, value: Option<&str>| {
        value.is_some() && request.headers().get(name).and_then(|v| v.to_str().ok()) == value
    };
    if b.status == 200
        && (header_is(header::IF_NONE_MATCH, b.etag)
            || header_is(header::IF_MODIFIED_SINCE, b.last_modified))
    {
        return response
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("valid response");
    }

    let body = match b.kind {
        BodyKind::Full if b.gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(&b.body).expect("gzip into memory");
            response = response.header(header::CONTENT_ENCODING, "gzip");
            Body::from(encoder.finish().expect("gzip into memory"))
        }
        BodyKind::Full => Body::from(b.body),
        BodyKind::ChunkedThenHang { chunk, chunks } => {
            let chunks = (0..chunks).map(move |_| Ok::<_, std::io::Error>(vec![b' '; chunk]));
            let stream = futures_util::StreamExt::chain(
                futures_util::stream::iter(chunks),
                futures_util::stream::pending(),
            );
            Body::from_stream(stream)
        }
        BodyKind::LyingLength { length } => {
            response = response.header(header::CONTENT_LENGTH, length);
            let stream = futures_util::StreamExt::chain(
                futures_util::stream::iter([Ok::<_, std::io::Error>(b"{\"a\":".to_vec())]),
                futures_util::stream::pending(),
            );
            Body::from_stream(stream)
        }
        BodyKind::Truncated => {
            response = response.header(header::CONTENT_LENGTH, 1000);
            // Headers and the first bytes go out before the connection breaks.
            let stream = futures_util::StreamExt::chain(
                futures_util::stream::iter([Ok(b"{\"a\":".to_vec())]),
                futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err(std::io::Error::other("connection dropped by the mock"))
                }),
            );
            Body::from_stream(stream)
        }
    };
    response.body(body).expect("valid response")
}

/// What a poller told the hub.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Document(Value),
    Failure {
        status: u16,
        retry_in: Duration,
        retry_after: Option<Duration>,
        message: String,
    },
    Recovered,
}

/// A `Publish` that records every call; reports `Unchanged` for a document equal to the last.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    last: Mutex<Option<Value>>,
}

impl Recorder {
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("recorder lock").clone()
    }

    pub fn documents(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Document(_)))
            .count()
    }

    pub fn last_failure(&self) -> Event {
        self.events()
            .into_iter()
            .rev()
            .find(|e| matches!(e, Event::Failure { .. }))
            .expect("a failure was recorded")
    }
}

impl Publish for Recorder {
    fn document(self: Arc<Self>, doc: Value) -> BoxFuture<'static, PublishResult> {
        let mut last = self.last.lock().expect("recorder lock");
        let result = if last.as_ref() == Some(&doc) {
            PublishResult::Unchanged
        } else {
            PublishResult::Changed
        };
        *last = Some(doc.clone());
        self.events
            .lock()
            .expect("recorder lock")
            .push(Event::Document(doc));
        Box::pin(std::future::ready(result))
    }

    fn failure<'a>(&'a self, error: &'a FetchError, retry_in: Duration) -> BoxFuture<'a, ()> {
        self.events
            .lock()
            .expect("recorder lock")
            .push(Event::Failure {
                status: error.status(),
                retry_in,
                retry_after: error.retry_after(),
                message: error.to_string(),
            });
        Box::pin(std::future::ready(()))
    }

    fn recovered(&self) -> BoxFuture<'_, ()> {
        self.events
            .lock()
            .expect("recorder lock")
            .push(Event::Recovered);
        Box::pin(std::future::ready(()))
    }
}

pub fn rate(per_second: u32, burst: u32) -> RateLimit {
    RateLimit {
        per_second: NonZeroU32::new(per_second).expect("non-zero"),
        burst: NonZeroU32::new(burst).expect("non-zero"),
    }
}

pub fn stream(name: &str, url: Url) -> StreamSettings {
    let group = format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or_default()
    );
    StreamSettings {
        name: name.into(),
        url,
        headers: HeaderMap::new(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
        max_body_bytes: 1 << 20,
        format: Format::Json,
        history: 16,
        history_bytes: 16 << 20,
        rate_limit_group: group,
        diff: DiffOptions::default(),
        on_demand: None,
    }
}

/// No jitter, so delays are exact: 100ms, 200ms, 400ms, ... up to 2s.
pub fn backoff() -> BackoffSettings {
    BackoffSettings {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        multiplier: 2.0,
        jitter: 0.0,
        max_retry_after: Duration::from_secs(10),
    }
}

pub fn limiter(limit: RateLimit) -> Arc<GroupLimiter> {
    Arc::new(GroupLimiter::direct(patchwire::upstream::ratelimit::quota(
        limit,
    )))
}

/// A limiter on tokio's clock, for pollers on paused time.
pub fn tokio_limiter(limit: RateLimit) -> Arc<GroupLimiter<TokioClock>> {
    Arc::new(GroupLimiter::direct_with_clock(
        patchwire::upstream::ratelimit::quota(limit),
        TokioClock,
    ))
}

/// An upstream on tokio's clock, for tests on paused time: each request takes `delay` (a
/// tokio sleep, which paused time skips exactly), answers `status` (200 with `body`, anything
/// else as that HTTP error), and records when it started and how many were in flight.
pub struct ScriptedUpstream {
    state: Mutex<Script>,
}

struct Script {
    delay: Duration,
    status: u16,
    body: Bytes,
    starts: Vec<Instant>,
    in_flight: usize,
    max_in_flight: usize,
}

impl ScriptedUpstream {
    pub fn new(delay: Duration, body: &Value) -> Arc<Self> {
        Arc::new(ScriptedUpstream {
            state: Mutex::new(Script {
                delay,
                status: 200,
                body: Bytes::from(body.to_string()),
                starts: Vec::new(),
                in_flight: 0,
                max_in_flight: 0,
            }),
        })
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.state.lock().expect("script lock")
    }

    pub fn set_status(&self, status: u16) {
        self.script().status = status;
    }

    pub fn set_body(&self, body: &Value) {
        self.script().body = Bytes::from(body.to_string());
    }

    /// When each request started, in order.
    pub fn starts(&self) -> Vec<Instant> {
        self.script().starts.clone()
    }

    pub fn max_in_flight(&self) -> usize {
        self.script().max_in_flight
    }

    /// Lets tokio's (paused) clock run until `n` requests have started.
    pub async fn wait_for_requests(&self, n: usize) {
        for _ in 0..100_000 {
            if self.script().starts.len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("fewer than {n} requests after 100 s of tokio time");
    }
}

impl Upstream for ScriptedUpstream {
    fn fetch<'a>(
        &'a self,
        req: &'a FetchRequest<'_>,
        _validators: &'a Validators,
    ) -> BoxFuture<'a, Result<Fetched, FetchError>> {
        Box::pin(async move {
            let delay = {
                let mut script = self.script();
                script.starts.push(Instant::now());
                script.in_flight += 1;
                script.max_in_flight = script.max_in_flight.max(script.in_flight);
                script.delay
            };
            tokio::time::sleep(delay).await;
            let mut script = self.script();
            script.in_flight -= 1;
            match script.status {
                200 => Ok(Fetched::Body {
                    body: script.body.clone(),
                    validators: Validators::default(),
                }),
                status => Err(FetchError::Status {
                    url: Redacted::new(req.url),
                    status,
                    retry_after: None,
                }),
            }
        })
    }
}

/// A poller on tokio's clock against `upstream`, limited by `limiter`.
pub fn paused_harness(
    settings: StreamSettings,
    upstream: Arc<ScriptedUpstream>,
    limiter: Arc<GroupLimiter<TokioClock>>,
) -> Harness<TokioClock> {
    harness_on(settings, upstream, limiter)
}

pub struct Harness<C: Clock = DefaultClock> {
    pub poller: Poller<C>,
    pub recorder: Arc<Recorder>,
    pub metrics: Arc<Metrics>,
}

/// A poller for `settings` with its own generous limiter.
pub fn harness(settings: StreamSettings) -> Harness {
    harness_with(settings, limiter(rate(1000, 1000)))
}

pub fn harness_with(settings: StreamSettings, limiter: Arc<GroupLimiter>) -> Harness {
    let fetcher = Arc::new(Fetcher::new("patchwire-test/1").expect("client builds"));
    harness_on(settings, fetcher, limiter)
}

/// A poller for `settings` against `upstream`, limited by `limiter` (on its clock).
fn harness_on<C>(
    settings: StreamSettings,
    upstream: Arc<dyn Upstream>,
    limiter: Arc<GroupLimiter<C>>,
) -> Harness<C>
where
    C: Clock + Send + Sync + 'static,
{
    let recorder = Arc::new(Recorder::default());
    let metrics = Arc::new(Metrics::new());
    let poller = Poller::new(
        Arc::new(settings),
        upstream,
        limiter,
        Arc::clone(&metrics),
        Arc::clone(&recorder) as Arc<dyn Publish>,
        backoff(),
    );
    Harness {
        poller,
        recorder,
        metrics,
    }
}

pub fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("valid header value")
}

//! The mock upstream: an HTTP API on 127.0.0.1 whose document and behaviour the test controls,
//! recording every request it gets.
//!
//! Every path answers. The document is one the test sets and changes ([`MockUpstream::start`],
//! served at [`MockUpstream::url`] and any other path), or one made for each caller
//! ([`MockUpstream::per_caller`]: [`caller_document`], as the APIs behind the proxy mode).
//! Bodies carry an `ETag` (the document's version) and a `Last-Modified` date (a second later
//! at each change), each until turned off, and a request whose validator matches gets a 304.
//! `/redirect/{n}` answers `n` redirects before the document, `?redirect_to=URL` one redirect
//! there. A [`Failure`] makes every answer misbehave until [`MockUpstream::recover`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// How the upstream misbehaves until `recover` is called.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Answer with this status (and an optional `Retry-After` value).
    Status(u16, Option<String>),
    /// Wait this long, then answer as usual (longer than a poll's timeout: a hang).
    Hang(Duration),
    /// Answer 200 with a body that is not JSON.
    InvalidJson,
    /// Answer 200 with a JSON body of at least this many bytes, chunked, without
    /// Content-Length.
    Oversize(usize),
    /// Answer 200 with `chunks` chunks of `chunk` bytes without Content-Length, then nothing,
    /// forever.
    ChunkedThenHang { chunk: usize, chunks: usize },
    /// Answer 200 with a Content-Length of `length`, a few bytes, then nothing, forever.
    LyingLength { length: u64 },
    /// Answer 200 with a Content-Length larger than the body, then break the connection.
    Truncated,
}

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it arrived.
    pub at: Instant,
    /// Its path and query, as received.
    pub uri: String,
    /// Its headers.
    pub headers: HeaderMap,
    /// Whether it was answered with an injected failure.
    pub failed: bool,
}

impl Received {
    /// The value of header `name`, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The document [`MockUpstream::per_caller`] answers for `user` (the caller's `Authorization`
/// header, `anonymous` without one) at `version`: one price follows the version, the rest stay
/// (so a change is a small patch, not a new document).
pub fn caller_document(user: &str, version: u64) -> Value {
    let mut prices = vec![json!({"id": "btc", "eur": 60000 + version})];
    prices.extend((0..20).map(|i| json!({"id": format!("coin-{i}"), "eur": 100 + i})));
    json!({
        "user": user,
        "version": version,
        "prices": prices,
    })
}

/// What a request that nothing went wrong for gets.
enum Content {
    /// The same bytes for every caller (the document's JSON, or bytes the test set).
    Body(Bytes),
    /// [`caller_document`] of the caller at the current version, with a non-ASCII label under
    /// `/unicode`.
    PerCaller,
}

struct MockState {
    document: Value,
    content: Content,
    version: u64,
    modified: SystemTime,
    etag: bool,
    last_modified: bool,
    failure: Option<Failure>,
    received: Vec<Received>,
    content_type: String,
    gzip: bool,
}

/// The mock upstream; dropping it stops the server.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<Mutex<MockState>>,
    server: Mutex<Option<Server>>,
}

/// One run of the server: stopping it closes the listener (connections are refused).
struct Server {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.stop.cancel();
        }
    }
}

fn serve_on(listener: tokio::net::TcpListener, state: Arc<Mutex<MockState>>) -> Server {
    let stop = CancellationToken::new();
    let app = Router::new().fallback(serve).with_state(state);
    let token = stop.clone();
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(token.cancelled_owned())
            .await
            .unwrap();
    });
    Server { stop, handle }
}

impl MockUpstream {
    /// Starts serving `document`, with ETag and Last-Modified validators on.
    pub async fn start(document: Value) -> MockUpstream {
        let body = Bytes::from(serde_json::to_vec(&document).unwrap());
        MockUpstream::start_with(document, Content::Body(body)).await
    }

    /// Starts serving exactly `body` (not necessarily JSON), with validators on.
    pub async fn start_with_body(body: &[u8]) -> MockUpstream {
        let body = Content::Body(Bytes::copy_from_slice(body));
        MockUpstream::start_with(Value::Null, body).await
    }

    /// Starts answering every caller [`caller_document`] of its `Authorization` header at
    /// version 0 (see [`MockUpstream::set_version`]), without validators.
    pub async fn per_caller() -> MockUpstream {
        let mock = MockUpstream::start_with(Value::Null, Content::PerCaller).await;
        mock.validators(false, false);
        mock.set_version(0);
        mock
    }

    async fn start_with(document: Value, content: Content) -> MockUpstream {
        let state = Arc::new(Mutex::new(MockState {
            document,
            content,
            version: 1,
            modified: SystemTime::now(),
            etag: true,
            last_modified: true,
            failure: None,
            received: Vec::new(),
            content_type: "application/json".to_owned(),
            gzip: false,
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve_on(listener, state.clone());
        MockUpstream {
            addr,
            state,
            server: Mutex::new(Some(server)),
        }
    }

    /// Stops listening: new connections are refused until `come_back`. Waits until the
    /// listener is closed and open connections have finished.
    pub async fn go_down(&self) {
        let server = self.server.lock().unwrap().take();
        if let Some(server) = server {
            server.stop.cancel();
            tokio::time::timeout(Duration::from_secs(10), server.handle)
                .await
                .expect("the mock upstream did not stop")
                .unwrap();
        }
    }

    /// Listens again on the same address (retrying while the port is briefly unavailable).
    pub async fn come_back(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        *self.server.lock().unwrap() = Some(serve_on(listener, self.state.clone()));
    }

    fn lock(&self) -> MutexGuard<'_, MockState> {
        self.state.lock().unwrap()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of the document.
    pub fn url(&self) -> String {
        self.url_at("/doc")
    }

    /// `http://127.0.0.1:port{path}`.
    pub fn url_at(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Replaces the document.
    pub fn set(&self, document: Value) {
        let body = Bytes::from(serde_json::to_vec(&document).unwrap());
        let mut s = self.lock();
        s.content = Content::Body(body);
        s.document = document;
        s.next_version();
    }

    /// Edits the document in place.
    pub fn update(&self, edit: impl FnOnce(&mut Value)) {
        let mut doc = self.document();
        edit(&mut doc);
        self.set(doc);
    }

    /// Serves exactly these bytes (with a new version) without changing the document.
    pub fn set_raw_body(&self, body: &[u8]) {
        let mut s = self.lock();
        s.content = Content::Body(Bytes::copy_from_slice(body));
        s.next_version();
    }

    /// The version [`caller_document`]s are made at from now on.
    pub fn set_version(&self, version: u64) {
        let mut s = self.lock();
        s.version = version;
        s.modified += Duration::from_secs(1);
    }

    /// The `Content-Type` of bodies served from now on (default `application/json`).
    pub fn content_type(&self, content_type: &str) {
        self.lock().content_type = content_type.to_owned();
    }

    /// Whether bodies are served gzip-compressed with `Content-Encoding: gzip` (whatever the
    /// request's `Accept-Encoding`, as some CDNs do).
    pub fn gzip(&self, on: bool) {
        self.lock().gzip = on;
    }

    /// The `Last-Modified` date of the current body.
    pub fn last_modified(&self) -> String {
        httpdate::fmt_http_date(self.lock().modified)
    }

    /// The `ETag` of the current body.
    pub fn etag(&self) -> String {
        format!("\"v{}\"", self.lock().version)
    }

    /// The current document.
    pub fn document(&self) -> Value {
        self.lock().document.clone()
    }

    /// Whether responses carry an ETag / Last-Modified (and conditional requests get 304).
    pub fn validators(&self, etag: bool, last_modified: bool) {
        let mut s = self.lock();
        s.etag = etag;
        s.last_modified = last_modified;
    }

    /// Misbehaves until `recover`.
    pub fn fail(&self, failure: Failure) {
        self.lock().failure = Some(failure);
    }

    /// Behaves again.
    pub fn recover(&self) {
        self.lock().failure = None;
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.lock().received.len()
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// The latest request received.
    pub fn last_received(&self) -> Received {
        self.lock()
            .received
            .last()
            .cloned()
            .expect("the upstream received a request")
    }

    /// Waits until the upstream has received more than `count` requests in all.
    pub async fn wait_for_requests(&self, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.requests() <= count {
            assert!(
                Instant::now() < deadline,
                "the upstream received {} requests, expected more than {count} within {timeout:?}",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl MockState {
    fn next_version(&mut self) {
        self.version += 1;
        // HTTP dates have one-second resolution: move forward a whole second per change so
        // If-Modified-Since never hides a change.
        self.modified += Duration::from_secs(1);
    }

    /// What a well-behaved answer to `uri` from `user` carries.
    fn body(&self, uri: &http::Uri, user: &str) -> Bytes {
        match &self.content {
            Content::Body(body) => body.clone(),
            Content::PerCaller => {
                let mut doc = caller_document(user, self.version);
                if uri.path().starts_with("/unicode") {
                    // Accents, CJK and an emoji (beyond U+FFFF), changing with the version.
                    doc["label"] = json!(format!("Zürich {} 東京 😀 naïve", self.version));
                }
                Bytes::from(serde_json::to_vec(&doc).unwrap())
            }
        }
    }
}

/// A redirect to `location`.
fn found(location: String) -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .body(Body::empty())
        .unwrap()
}

/// A 200 body of `chunks` then, if `then_hang`, nothing more, forever.
fn streamed(chunks: Vec<Bytes>, then_hang: bool) -> Body {
    let chunks = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    if then_hang {
        Body::from_stream(chunks.chain(futures_util::stream::pending()))
    } else {
        Body::from_stream(chunks)
    }
}

async fn serve(State(state): State<Arc<Mutex<MockState>>>, request: Request) -> Response {
    let uri = request.uri().clone();
    let headers = request.headers().clone();
    let user = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous")
        .to_owned();
    let (failure, body, etag, modified, content_type, gzip) = {
        let mut s = state.lock().unwrap();
        let failed = s.failure.is_some();
        s.received.push(Received {
            at: Instant::now(),
            uri: uri.to_string(),
            headers: headers.clone(),
            failed,
        });
        let etag = s.etag.then(|| format!("\"v{}\"", s.version));
        let modified = s.last_modified.then(|| httpdate::fmt_http_date(s.modified));
        (
            s.failure.clone(),
            s.body(&uri, &user),
            etag,
            modified,
            s.content_type.clone(),
            s.gzip,
        )
    };
    let json = || Response::builder().header(header::CONTENT_TYPE, "application/json");
    match failure {
        Some(Failure::Status(status, retry_after)) => {
            let mut r = Response::builder().status(status);
            if let Some(v) = retry_after {
                r = r.header(header::RETRY_AFTER, v);
            }
            return r.body(Body::from("{\"error\":\"injected\"}")).unwrap();
        }
        Some(Failure::Hang(d)) => tokio::time::sleep(d).await,
        Some(Failure::InvalidJson) => {
            return json().body(Body::from("{\"truncated\": [1, 2")).unwrap();
        }
        Some(Failure::Oversize(n)) => {
            let chunk = Bytes::from(vec![b' '; 8192]);
            let chunks = std::iter::once(Bytes::from_static(b"["))
                .chain(std::iter::repeat_n(chunk, n / 8192 + 2))
                .collect();
            return json().body(streamed(chunks, false)).unwrap();
        }
        Some(Failure::ChunkedThenHang { chunk, chunks }) => {
            let chunks = (0..chunks)
                .map(|_| Bytes::from(vec![b' '; chunk]))
                .collect();
            return json().body(streamed(chunks, true)).unwrap();
        }
        Some(Failure::LyingLength { length }) => {
            let chunks = vec![Bytes::from_static(b"{\"a\":")];
            return json()
                .header(header::CONTENT_LENGTH, length)
                .body(streamed(chunks, true))
                .unwrap();
        }
        Some(Failure::Truncated) => {
            // Headers and the first bytes go out before the connection breaks.
            let stream = futures_util::stream::iter([Ok(Bytes::from_static(b"{\"a\":"))]).chain(
                futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err(std::io::Error::other("connection dropped by the mock"))
                }),
            );
            return json()
                .header(header::CONTENT_LENGTH, 1000)
                .body(Body::from_stream(stream))
                .unwrap();
        }
        None => {}
    }
    if let Some(n) = uri.path().strip_prefix("/redirect/") {
        let n: u32 = n.parse().expect("a redirect count");
        if n > 0 {
            return found(format!("/redirect/{}", n - 1));
        }
    }
    let redirect_to = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(name, _)| name == "redirect_to")
        .map(|(_, to)| to.into_owned());
    if let Some(to) = redirect_to {
        return found(to);
    }
    let not_modified = match (&etag, headers.get(header::IF_NONE_MATCH)) {
        (Some(tag), Some(inm)) => inm.to_str().ok() == Some(tag.as_str()),
        _ => match (&modified, headers.get(header::IF_MODIFIED_SINCE)) {
            (Some(m), Some(ims)) => ims.to_str().ok() == Some(m.as_str()),
            _ => false,
        },
    };
    let mut r = Response::builder();
    if let Some(tag) = &etag {
        r = r.header(header::ETAG, tag);
    }
    if let Some(m) = &modified {
        r = r.header(header::LAST_MODIFIED, m);
    }
    if not_modified {
        return r
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap();
    }
    let body = if gzip {
        r = r.header(header::CONTENT_ENCODING, "gzip");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut encoder, &body).unwrap();
        Bytes::from(encoder.finish().unwrap())
    } else {
        body
    };
    r.header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap()
}

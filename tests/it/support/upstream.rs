//! A mock upstream API on 127.0.0.1 whose document and behaviour the test controls.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// How the upstream misbehaves until `recover` is called.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Answer with this status (and an optional `Retry-After` value).
    Status(u16, Option<String>),
    /// Wait this long before answering (longer than the poller's timeout).
    Hang(Duration),
    /// Answer 200 with a body that is not JSON.
    InvalidJson,
    /// Answer 200 with a JSON body of at least this many bytes, chunked, without Content-Length.
    Oversize(usize),
}

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it arrived.
    pub at: Instant,
    /// Its headers.
    pub headers: HeaderMap,
    /// Whether it was answered with an injected failure.
    pub failed: bool,
}

struct MockState {
    document: Value,
    body: Bytes,
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
    let app = Router::new().route("/doc", get(serve)).with_state(state);
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
    /// Starts serving `document` at `/doc`, with ETag and Last-Modified validators on.
    pub async fn start(document: Value) -> MockUpstream {
        let body = Bytes::from(serde_json::to_vec(&document).unwrap());
        let state = Arc::new(Mutex::new(MockState {
            document,
            body,
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

    /// The URL of the document.
    pub fn url(&self) -> String {
        format!("http://{}/doc", self.addr)
    }

    /// Replaces the document.
    pub fn set(&self, document: Value) {
        let mut s = self.lock();
        s.body = Bytes::from(serde_json::to_vec(&document).unwrap());
        s.document = document;
        s.version += 1;
        // HTTP dates have one-second resolution: move forward a whole second per change so
        // If-Modified-Since never hides a change.
        s.modified += Duration::from_secs(1);
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
        s.body = Bytes::copy_from_slice(body);
        s.version += 1;
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

    /// Whether responses carry an ETag / Last-Modified.
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

async fn serve(State(state): State<Arc<Mutex<MockState>>>, headers: HeaderMap) -> Response {
    let (failure, body, etag, modified, content_type, gzip) = {
        let mut s = state.lock().unwrap();
        let failed = s.failure.is_some();
        s.received.push(Received {
            at: Instant::now(),
            headers: headers.clone(),
            failed,
        });
        let etag = s.etag.then(|| format!("\"v{}\"", s.version));
        let modified = s.last_modified.then(|| httpdate::fmt_http_date(s.modified));
        (
            s.failure.clone(),
            s.body.clone(),
            etag,
            modified,
            s.content_type.clone(),
            s.gzip,
        )
    };
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
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{\"truncated\": [1, 2"))
                .unwrap();
        }
        Some(Failure::Oversize(n)) => {
            let chunk = Bytes::from(vec![b' '; 8192]);
            let chunks = n / chunk.len() + 2;
            let stream = futures_util::stream::iter(
                std::iter::once(Bytes::from_static(b"[")).chain(std::iter::repeat_n(chunk, chunks)),
            )
            .map(Ok::<_, std::convert::Infallible>);
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(stream))
                .unwrap();
        }
        None => {}
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

use futures_util::StreamExt as _;

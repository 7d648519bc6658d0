//! A mock API for the proxy mode: any path answers a JSON document that names the caller's
//! `Authorization` header and a version the test sets (or, with `?redirect_to=URL`, a 302 to
//! that URL); every request is recorded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Uri};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// One request the API received.
#[derive(Debug, Clone)]
pub struct Request {
    /// When it arrived.
    pub at: Instant,
    /// Path and query, as received.
    pub uri: String,
    /// Its headers.
    pub headers: HeaderMap,
}

#[derive(Default)]
struct ApiState {
    version: u64,
    requests: Vec<Request>,
}

/// The mock API; dropping it stops the server.
pub struct MockApi {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    stop: CancellationToken,
}

impl Drop for MockApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The document the API answers for `user` at `version`: one price follows the version, the
/// rest stay (so a change is a small patch, not a new document).
pub fn document(user: &str, version: u64) -> Value {
    let mut prices = vec![json!({"id": "btc", "eur": 60000 + version})];
    prices.extend((0..20).map(|i| json!({"id": format!("coin-{i}"), "eur": 100 + i})));
    json!({
        "user": user,
        "version": version,
        "prices": prices,
    })
}

async fn answer(
    State(state): State<Arc<Mutex<ApiState>>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let user = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous")
        .to_owned();
    let redirect_to = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(name, _)| name == "redirect_to")
        .map(|(_, to)| to.into_owned());
    let mut state = state.lock().unwrap();
    state.requests.push(Request {
        at: Instant::now(),
        uri: uri.to_string(),
        headers,
    });
    if let Some(to) = redirect_to {
        return (http::StatusCode::FOUND, [(http::header::LOCATION, to)]).into_response();
    }
    let mut doc = document(&user, state.version);
    if uri.path().starts_with("/unicode") {
        // Accents, CJK and an emoji (beyond U+FFFF), changing with the version.
        doc["label"] = json!(format!("Zürich {} 東京 😀 naïve", state.version));
    }
    axum::Json(doc).into_response()
}

impl MockApi {
    /// Starts on 127.0.0.1, port chosen by the OS.
    pub async fn start() -> MockApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ApiState::default()));
        let app = Router::new().fallback(answer).with_state(state.clone());
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .unwrap();
        });
        MockApi { addr, state, stop }
    }

    /// `http://127.0.0.1:port{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Changes the document every caller gets from now on.
    pub fn set_version(&self, version: u64) {
        self.state.lock().unwrap().version = version;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }
}

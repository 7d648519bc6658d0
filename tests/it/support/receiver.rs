//! A webhook receiver on 127.0.0.1 that records every request, verifies its signature with the
//! independent `standardwebhooks` crate, and answers as the test scripts it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status, with an optional `Retry-After`.
    Status(u16, Option<&'static str>),
    /// Wait this long, then answer 200 (longer than the attempt timeout: a hang).
    Delay(Duration),
    /// 302 to another path of this receiver (which must never be requested).
    Redirect,
    /// This status with this body.
    Body(u16, &'static str),
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    /// When it arrived.
    pub at: Instant,
    /// The path.
    pub path: String,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body, parsed.
    pub body: Value,
    /// Its body as sent.
    pub raw: Bytes,
    /// Which of the receiver's secrets verified it (index), if any.
    pub verified_by: Vec<usize>,
    /// The status answered.
    pub status: u16,
}

impl Hit {
    /// `webhook-id`.
    pub fn id(&self) -> String {
        self.headers["webhook-id"].to_str().unwrap().to_owned()
    }
    /// The body's `seq`.
    pub fn seq(&self) -> u64 {
        self.body["seq"].as_u64().unwrap()
    }
    /// The body's `type`.
    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap()
    }
}

/// A request as it arrived, before it was answered (a sender killed meanwhile never sees
/// the answer, and the request may never be recorded as a [`Hit`]).
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When it arrived.
    pub at: Instant,
    /// `webhook-id`.
    pub id: String,
    /// `User-Agent`: which node sent it.
    pub user_agent: String,
}

struct Inner {
    script: VecDeque<Reply>,
    hits: Vec<Hit>,
    arrivals: Vec<Arrival>,
    secrets: Vec<String>,
    delay: Duration,
}

/// The receiver; dropping it stops the server.
pub struct Receiver {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
    stop: CancellationToken,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

async fn handle(
    State(shared): State<Shared>,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let arrival = Arrival {
        at: Instant::now(),
        id: header("webhook-id"),
        user_agent: header("user-agent"),
    };
    let (reply, secrets, delay) = {
        let mut inner = shared.inner.lock().unwrap();
        inner.arrivals.push(arrival);
        (inner.script.pop_front(), inner.secrets.clone(), inner.delay)
    };
    shared.changed.notify_waiters();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let verified_by = secrets
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            standardwebhooks::Webhook::new(s)
                .unwrap()
                .verify(&body, &headers)
                .is_ok()
        })
        .map(|(i, _)| i)
        .collect();
    let status = match &reply {
        None | Some(Reply::Delay(_)) => 200,
        Some(Reply::Status(code, _)) => *code,
        Some(Reply::Body(code, _)) => *code,
        Some(Reply::Redirect) => 302,
    };
    // Recorded on arrival, so a hang shows where it happened.
    let hit = Hit {
        at: Instant::now(),
        path: uri.path().to_owned(),
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        raw: body.clone(),
        verified_by,
        status,
    };
    shared.inner.lock().unwrap().hits.push(hit);
    shared.changed.notify_waiters();
    match reply {
        None => StatusCode::OK.into_response(),
        Some(Reply::Status(code, retry_after)) => {
            let mut response = StatusCode::from_u16(code).unwrap().into_response();
            if let Some(after) = retry_after {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, after.parse().unwrap());
            }
            response
        }
        Some(Reply::Delay(d)) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        Some(Reply::Body(code, text)) => {
            (StatusCode::from_u16(code).unwrap(), text).into_response()
        }
        Some(Reply::Redirect) => {
            let mut response = StatusCode::FOUND.into_response();
            response
                .headers_mut()
                .insert(http::header::LOCATION, "/elsewhere".parse().unwrap());
            response
        }
    }
}

impl Receiver {
    /// Starts a receiver that verifies with `secrets` (more can be added later).
    pub async fn start(secrets: &[&str]) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Receiver::listen(listener, secrets)
    }

    /// A receiver at `addr` (an address a test reserved while nothing listened there: the
    /// receiver "comes up").
    pub async fn start_at(addr: std::net::SocketAddr, secrets: &[&str]) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Receiver::listen(listener, secrets)
    }

    fn listen(listener: tokio::net::TcpListener, secrets: &[&str]) -> Receiver {
        let inner = Arc::new(Mutex::new(Inner {
            script: VecDeque::new(),
            hits: Vec::new(),
            arrivals: Vec::new(),
            secrets: secrets.iter().map(|s| (*s).to_owned()).collect(),
            delay: Duration::ZERO,
        }));
        let changed = Arc::new(Notify::new());
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(Shared {
            inner: inner.clone(),
            changed: changed.clone(),
        });
        let token = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await
                .unwrap();
        });
        Receiver {
            addr,
            inner,
            changed,
            stop,
        }
    }

    /// `http://addr/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Queues scripted answers (after those already queued); then 200.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.lock().unwrap().script.extend(replies);
    }

    /// Makes every answer wait `delay` first (a slow receiver).
    pub fn set_delay(&self, delay: Duration) {
        self.inner.lock().unwrap().delay = delay;
    }

    /// Adds a secret to verify with (its index is the number of secrets before it).
    pub fn add_secret(&self, secret: &str) {
        self.inner.lock().unwrap().secrets.push(secret.to_owned());
    }

    /// Every request so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.inner.lock().unwrap().hits.clone()
    }

    /// Every request as it arrived, answered or not.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.inner.lock().unwrap().arrivals.clone()
    }

    /// The requests answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| (200..300).contains(&h.status))
            .collect()
    }

    /// Waits until `done(hits)` holds; panics with `what` and the hits after `within`.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&[Hit]) -> bool,
    ) -> Vec<Hit> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            let hits = self.hits();
            if done(&hits) {
                return hits;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let hits = self.hits();
                if done(&hits) {
                    return hits;
                }
                let summary: Vec<String> = hits
                    .iter()
                    .map(|h| {
                        format!(
                            "{} {} seq={} {}",
                            h.status,
                            h.body["type"],
                            h.body["seq"],
                            h.id()
                        )
                    })
                    .collect();
                panic!(
                    "timed out waiting for {what}; got {} requests:\n{}",
                    hits.len(),
                    summary.join("\n")
                );
            }
        }
    }
}

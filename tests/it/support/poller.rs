//! Pollers outside the application, against the mock upstream or, on tokio's paused clock, a
//! scripted [`Upstream`]: a `Publish` that records what the poller told the hub, and the
//! stream settings and retry schedule from TOML, through validation.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use http::HeaderValue;
use patchwire::metrics::Metrics;
use patchwire::upstream::config::RateLimit;
use patchwire::upstream::fetch::Redacted;
use patchwire::upstream::{
    FetchError, FetchRequest, Fetched, Fetcher, GroupLimiter, Poller, Publish, PublishResult,
    TokioClock, Upstream, Validators,
};
use serde_json::Value;
use tokio::time::Instant;

use super::app::{config_from_toml, polled};

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

    fn audience(&self) -> usize {
        0
    }
}

pub fn rate(per_second: u32, burst: u32) -> RateLimit {
    RateLimit {
        per_second: NonZeroU32::new(per_second).expect("non-zero"),
        burst: NonZeroU32::new(burst).expect("non-zero"),
    }
}

/// A configuration whose first stream, `name`, polls `url`, with `keys` (TOML lines of more of
/// its keys), and the retry schedule of these tests: 100 ms doubling up to 2 s without jitter,
/// so delays are exact, and an upstream's `Retry-After` honoured up to 10 s.
pub fn stream(name: &str, url: &str, keys: &str) -> String {
    format!(
        "[upstream.backoff]\nmax = \"2s\"\nmax_retry_after = \"10s\"\n{}{keys}\n",
        polled(name, url)
    )
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

/// A poller for the first stream of `toml` (see [`stream`]) on tokio's clock against
/// `upstream`, limited by `limiter`.
pub fn paused_harness(
    toml: &str,
    upstream: Arc<ScriptedUpstream>,
    limiter: Arc<GroupLimiter<TokioClock>>,
) -> Harness<TokioClock> {
    harness_on(toml, |_| upstream, limiter)
}

pub struct Harness<C: Clock = DefaultClock> {
    pub poller: Poller<C>,
    pub recorder: Arc<Recorder>,
    pub metrics: Arc<Metrics>,
}

/// A poller for the first stream of `toml` (see [`stream`]) with its own generous limiter.
pub fn harness(toml: &str) -> Harness {
    harness_with(toml, limiter(rate(1000, 1000)))
}

/// A poller for the first stream of `toml` (see [`stream`]), limited by `limiter`.
pub fn harness_with(toml: &str, limiter: Arc<GroupLimiter>) -> Harness {
    harness_on(
        toml,
        |user_agent| Arc::new(Fetcher::new(user_agent).expect("client builds")),
        limiter,
    )
}

/// A poller for the first stream of `toml`, with that file's retry schedule, against the
/// upstream `upstream` makes for the file's user agent, limited by `limiter` (on its clock).
fn harness_on<C, U>(
    toml: &str,
    upstream: impl FnOnce(&str) -> Arc<U>,
    limiter: Arc<GroupLimiter<C>>,
) -> Harness<C>
where
    C: Clock + Send + Sync + 'static,
    U: Upstream + 'static,
{
    let mut config = config_from_toml(toml);
    let recorder = Arc::new(Recorder::default());
    let metrics = Arc::new(Metrics::new());
    let poller = Poller::new(
        Arc::new(config.streams.remove(0)),
        upstream(&config.upstream.user_agent),
        limiter,
        Arc::clone(&metrics),
        Arc::clone(&recorder) as Arc<dyn Publish>,
        config.upstream.backoff,
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

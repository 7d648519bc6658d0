//! Serving the simulated feeds over HTTP like a real polled API: conditional GETs, ETags,
//! Last-Modified.
//!
//! Each feed keeps one [`Fleet`] behind a mutex and the latest rendered tick. Requests for the
//! tick already rendered share its bytes; the first request for a new tick steps the fleet
//! forward on a blocking thread (a 100,000-vehicle step takes milliseconds) while holding the
//! fleet's mutex, so concurrent requests for that tick wait for it instead of repeating it.
//!
//! Fleets advance lazily, when asked: after a quiet spell the first request steps through
//! every tick missed (about 3 ms per tick per 100,000 vehicles). `router` expects validated
//! feeds; a tick length far below the validated 10 ms would make that catch-up unbounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::clock::SimClock;
use super::config::{FeedSettings, SimulatorSettings};
use super::fleet::{Fleet, now_epoch_seconds};
use super::rng::derive;

/// The first second an HTTP date cannot express (year 10000).
const HTTP_DATE_END: u64 = 253_402_300_800;

/// One rendered tick of a feed, shared by every request for that tick.
#[derive(Debug)]
struct Rendered {
    tick: u64,
    body: Bytes,
    /// Quoted strong entity tag.
    etag: HeaderValue,
    /// Unix seconds of the tick.
    modified: u64,
    /// `None` past year 9999.
    last_modified: Option<HeaderValue>,
}

#[derive(Debug)]
struct Feed {
    /// With `epoch_seconds` resolved.
    settings: FeedSettings,
    /// Distinguishes ETags of different settings (or epochs) that reach the same tick.
    fingerprint: u64,
    fleet: Mutex<Fleet>,
    latest: Mutex<Option<Arc<Rendered>>>,
}

#[derive(Debug)]
enum Clock {
    Real(Instant),
    Manual(super::clock::ManualClock),
}

#[derive(Debug)]
struct Simulator {
    feeds: Vec<Arc<Feed>>,
    by_name: HashMap<String, usize>,
    clock: Clock,
}

impl Simulator {
    fn tick(&self, feed: &Feed) -> u64 {
        match &self.clock {
            Clock::Manual(clock) => clock.tick(),
            Clock::Real(start) => {
                let tick = feed.settings.tick.as_nanos().max(1);
                u64::try_from(start.elapsed().as_nanos() / tick).unwrap_or(u64::MAX)
            }
        }
    }
}

/// Locks a mutex even if a thread panicked while holding it; callers repair what they find.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn fingerprint(settings: &FeedSettings) -> u64 {
    let name = settings
        .name
        .bytes()
        .fold(0u64, |acc, b| derive(acc, &[u64::from(b)]));
    derive(
        settings.seed,
        &[
            name,
            settings.vehicles as u64,
            settings.routes as u64,
            settings.tick.as_nanos() as u64,
            settings.move_fraction.to_bits(),
            settings.churn.to_bits(),
            settings.epoch_seconds.unwrap_or(0),
        ],
    )
}

impl Feed {
    fn new(settings: FeedSettings) -> Feed {
        let fleet = Fleet::new(&settings);
        let settings = fleet.settings().clone();
        Feed {
            fingerprint: fingerprint(&settings),
            settings,
            fleet: Mutex::new(fleet),
            latest: Mutex::new(None),
        }
    }

    fn cached(&self, tick: u64) -> Option<Arc<Rendered>> {
        lock(&self.latest)
            .as_ref()
            .filter(|r| r.tick == tick)
            .cloned()
    }

    /// Brings the fleet to the clock's tick and renders it. Blocking: run off the runtime.
    /// The tick is read after taking the fleet's lock so a request that waited behind a newer
    /// one never drags the fleet back (which would mean recomputing from tick 0).
    fn render(&self, simulator: &Simulator) -> Arc<Rendered> {
        let mut fleet = match self.fleet.lock() {
            Ok(fleet) => fleet,
            Err(poisoned) => {
                // A panic mid-step may have left the fleet half-updated: start it over.
                let mut fleet = poisoned.into_inner();
                *fleet = Fleet::new(&self.settings);
                self.fleet.clear_poison();
                fleet
            }
        };
        let tick = simulator.tick(self);
        if let Some(rendered) = self.cached(tick) {
            return rendered;
        }
        fleet.advance_to(tick);
        let body = fleet.to_json();
        let modified = fleet.timestamp();
        drop(fleet);
        let rendered = Arc::new(Rendered {
            tick,
            body,
            etag: etag(self.fingerprint, tick),
            modified,
            last_modified: http_date(modified),
        });
        *lock(&self.latest) = Some(Arc::clone(&rendered));
        rendered
    }
}

fn etag(fingerprint: u64, tick: u64) -> HeaderValue {
    // Hex digits and '-' only: always a valid header value.
    HeaderValue::from_str(&format!("\"{fingerprint:016x}-{tick}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

fn http_date(unix_seconds: u64) -> Option<HeaderValue> {
    if unix_seconds >= HTTP_DATE_END {
        return None;
    }
    let time = UNIX_EPOCH + Duration::from_secs(unix_seconds);
    HeaderValue::from_str(&httpdate::fmt_http_date(time)).ok()
}

/// Whether the request's validators match `rendered` (RFC 9110 section 13.2.2: `If-None-Match`,
/// compared weakly, takes precedence; `If-Modified-Since` counts only without it).
fn not_modified(headers: &HeaderMap, rendered: &Rendered) -> bool {
    if let Some(value) = headers.get(header::IF_NONE_MATCH) {
        let Ok(value) = value.to_str() else {
            return false;
        };
        let ours = rendered.etag.as_bytes();
        return value
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours);
    }
    let Some(since) = headers.get(header::IF_MODIFIED_SINCE) else {
        return false;
    };
    let Some(since) = since
        .to_str()
        .ok()
        .and_then(|s| httpdate::parse_http_date(s).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
    else {
        return false;
    };
    rendered.last_modified.is_some() && rendered.modified <= since.as_secs()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

async fn get_feed(
    State(simulator): State<Arc<Simulator>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(feed) = simulator.by_name.get(&name).map(|&i| &simulator.feeds[i]) else {
        let known: Vec<&str> = simulator
            .feeds
            .iter()
            .map(|f| f.settings.name.as_str())
            .collect();
        return error(
            StatusCode::NOT_FOUND,
            format!("no simulated feed named {name:?}; feeds: {known:?}"),
        );
    };
    let rendered = match feed.cached(simulator.tick(feed)) {
        Some(rendered) => rendered,
        None => {
            let (feed, sim) = (Arc::clone(feed), Arc::clone(&simulator));
            match tokio::task::spawn_blocking(move || feed.render(&sim)).await {
                Ok(rendered) => rendered,
                Err(e) => {
                    tracing::error!(feed = %name, error = %e, "rendering a simulated feed failed");
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("rendering feed {name:?} failed"),
                    );
                }
            }
        }
    };
    let mut response = if not_modified(&headers, &rendered) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = rendered.body.clone().into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    };
    let out = response.headers_mut();
    out.insert(header::ETAG, rendered.etag.clone());
    if let Some(date) = &rendered.last_modified {
        out.insert(header::LAST_MODIFIED, date.clone());
    }
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn list_feeds(State(simulator): State<Arc<Simulator>>) -> Response {
    let feeds: Vec<_> = simulator
        .feeds
        .iter()
        .map(|feed| {
            json!({
                "name": feed.settings.name,
                "path": format!("/feeds/{}", feed.settings.name),
                "tick": simulator.tick(feed),
                "tick_ms": feed.settings.tick.as_millis() as u64,
                "vehicles": feed.settings.vehicles,
                "routes": feed.settings.routes,
            })
        })
        .collect();
    axum::Json(json!({ "feeds": feeds })).into_response()
}

/// The simulator's routes: `GET /feeds` lists the feeds with their current tick;
/// `GET /feeds/{name}` serves the current document with `ETag` and `Last-Modified`,
/// answering 304 to matching `If-None-Match` / `If-Modified-Since`; unknown feeds get a JSON
/// 404. Feeds without an epoch take the current time, rounded to the second; with
/// [`SimClock::Real`] tick 0 is now.
pub fn router(feeds: Vec<FeedSettings>, clock: SimClock) -> Router {
    let epoch = now_epoch_seconds();
    let start = Instant::now();
    let mut by_name = HashMap::new();
    let feeds: Vec<Arc<Feed>> = feeds
        .into_iter()
        .enumerate()
        .map(|(i, settings)| {
            by_name.entry(settings.name.clone()).or_insert(i);
            Arc::new(Feed::new(FeedSettings {
                epoch_seconds: Some(settings.epoch_seconds.unwrap_or(epoch)),
                ..settings
            }))
        })
        .collect();
    let clock = match clock {
        SimClock::Real => Clock::Real(start),
        SimClock::Manual(clock) => Clock::Manual(clock),
    };
    let simulator = Arc::new(Simulator {
        feeds,
        by_name,
        clock,
    });
    Router::new()
        .route("/feeds", get(list_feeds))
        .route("/feeds/{name}", get(get_feed))
        .with_state(simulator)
}

/// Serves `settings.feeds` on `listener` in real time until `shutdown` is cancelled, then
/// lets in-flight requests finish. (`settings.listen` is where the caller bound `listener`.)
pub async fn serve(
    listener: TcpListener,
    settings: SimulatorSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let names: Vec<&str> = settings.feeds.iter().map(|f| f.name.as_str()).collect();
    tracing::info!(addr = ?listener.local_addr().ok(), feeds = ?names, "serving simulated feeds");
    let app = router(settings.feeds, SimClock::Real);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

//! `GET /streams`: every stream, its upstream and its last polls, and the proxy mode's
//! dynamic streams (counted, never named by URL: URLs may carry credentials).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use crate::hub::Stream;
use crate::proxy::Proxy;
use crate::redact::Redacted;
use crate::upstream::poller::{LastOutcome, PollControl, PollStatus};
use crate::views::StreamViews;

/// A polled upstream as shown in the listing.
pub struct PolledUpstream {
    /// Its URL, redacted.
    pub url: Redacted,
    /// The poll interval.
    pub interval: Duration,
    /// The linger period of an on-demand stream.
    pub on_demand: Option<Duration>,
    /// Its poller's last polls.
    pub status: Arc<PollStatus>,
    /// Asks its poller to poll now (`POST /streams/{name}/poll`).
    pub control: Arc<PollControl>,
}

/// The polled streams' upstreams by stream name: changed by a configuration reload.
#[derive(Default)]
pub struct PolledUpstreams {
    by_stream: RwLock<HashMap<String, Arc<PolledUpstream>>>,
}

impl PolledUpstreams {
    /// The upstream of stream `name`, if it is polled.
    pub fn get(&self, name: &str) -> Option<Arc<PolledUpstream>> {
        self.read().get(name).cloned()
    }

    /// Sets (or replaces) the upstream of stream `name`.
    pub fn insert(&self, name: String, upstream: PolledUpstream) {
        self.by_stream
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, Arc::new(upstream));
    }

    /// Forgets the upstream of stream `name` (removed, or no longer polled).
    pub fn remove(&self, name: &str) {
        self.by_stream
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<PolledUpstream>>> {
        // Writers only insert or remove whole entries: a poisoned map is still consistent.
        self.by_stream
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl PolledUpstream {
    /// A JSON object describing the upstream and its last polls.
    fn describe(&self) -> Value {
        let report = self.status.read();
        let outcome = report.last_outcome.as_ref().map(|o| match o {
            LastOutcome::Changed => json!({"result": "changed"}),
            LastOutcome::Unchanged => json!({"result": "unchanged"}),
            LastOutcome::NotModified => json!({"result": "not-modified"}),
            LastOutcome::NotOurTurn => json!({"result": "polled-by-another-node"}),
            LastOutcome::Failed { status, message } => {
                json!({"result": "error", "status": status, "message": &**message})
            }
        });
        let time = |t: Option<SystemTime>| t.map(httpdate::fmt_http_date);
        json!({
            "url": self.url.as_str(),
            "interval_ms": self.interval.as_millis() as u64,
            "on_demand": self.on_demand.map(|linger| json!({"linger_ms": linger.as_millis() as u64})),
            "last_poll_at": time(report.last_poll_started),
            "last_outcome": outcome,
            "consecutive_failures": report.consecutive_failures,
            "requests": report.upstream_requests,
            "body_bytes": report.body_bytes,
            "subscriber_requests": report.subscriber_requests,
            "subscriber_bytes": report.subscriber_bytes,
            "next_poll_at": time(report.next_poll_due),
        })
    }
}

/// The listing: every stream, then the dynamic ones' summary (`null` without the proxy mode),
/// and in a cluster this node, the live nodes, and which node polls each stream.
pub async fn list_streams(State(state): State<Arc<AppState>>) -> Response {
    let all = state.hub.all();
    let mut streams: Vec<Value> = all
        .iter()
        .map(|s| {
            let mut shown = describe_stream(s, state.upstreams.get(s.name()).as_deref());
            if let (Some(views), Some(object)) = (state.views.of(s.name()), shown.as_object_mut()) {
                object.insert("views".into(), describe_views(s.name(), &views));
            }
            if let Some(object) = shown.as_object_mut().filter(|_| !state.brokers.is_empty()) {
                object.insert(
                    "sinks".into(),
                    Value::Array(state.brokers.describe(s.name())),
                );
            }
            shown
        })
        .collect();
    let dynamic = state.proxy.as_deref().map(describe_proxy);
    let Some(cluster) = &state.cluster else {
        return axum::Json(json!({ "streams": streams, "dynamic": dynamic })).into_response();
    };
    let node = &cluster.node;
    // Who polls: read from Redis now (the lease is the truth; a stale local view is not).
    for (stream, shown) in all.iter().zip(&mut streams) {
        if state.upstreams.get(stream.name()).is_none() {
            continue;
        }
        let holder = match node.store().holder(stream.name()).await {
            Ok(Some((holder, left))) => {
                json!({"node": holder, "lease_expires_in_ms": left.as_millis() as u64})
            }
            Ok(None) => Value::Null,
            Err(error) => json!({"error": error.to_string()}),
        };
        if let Some(object) = shown.as_object_mut() {
            object.insert("lease".into(), holder);
        }
    }
    let cluster = json!({
        "node": node.node(),
        "nodes": &*node.nodes(),
        "ready": node.ready(),
    });
    axum::Json(json!({ "streams": streams, "dynamic": dynamic, "cluster": cluster }))
        .into_response()
}

fn rfc3339ish(at: Option<SystemTime>) -> Value {
    at.map_or(Value::Null, |t| Value::String(httpdate::fmt_http_date(t)))
}

/// One stream in the listing.
fn describe_stream(stream: &Stream, upstream: Option<&PolledUpstream>) -> Value {
    let failure = stream.failure().map(
        |f| json!({"status": f.status, "message": f.message, "at": httpdate::fmt_http_date(f.at)}),
    );
    json!({
        "name": stream.name(),
        "path": format!("/streams/{}", stream.name()),
        "epoch": stream.epoch(),
        "seq": stream.seq(),
        "subscribers": stream.subscriber_count(),
        "changes_published": stream.changes_published(),
        "sent": {"events": stream.delivered().events(), "bytes": stream.delivered().bytes()},
        "last_change_at": rfc3339ish(stream.last_change_at()),
        "failing": failure,
        "upstream": upstream.map(PolledUpstream::describe),
    })
}

/// A stream's views: what filters may use, the named ones, and those computed now.
fn describe_views(stream: &str, views: &StreamViews) -> Value {
    let settings = views.settings();
    let named: Vec<Value> = settings
        .named
        .iter()
        .map(|(name, spec)| {
            json!({"name": name, "path": format!("/streams/{stream}@{name}"), "filter": spec.canonical()})
        })
        .collect();
    let active: Vec<Value> = views
        .list()
        .into_iter()
        .map(|(id, filter, subscribers)| {
            json!({"name": format!("{stream}@{id}"), "filter": filter, "subscribers": subscribers})
        })
        .collect();
    json!({
        "aliases": views.aliases(),
        "ad_hoc": settings.ad_hoc,
        "max_views": settings.max_views,
        "named": named,
        "active": active,
    })
}

/// The dynamic streams' summary (no URLs: they may carry credentials).
fn describe_proxy(proxy: &Proxy) -> Value {
    let settings = proxy.settings();
    json!({
        "streams": proxy.streams().len(),
        "max_streams": settings.max_streams,
        "snapshot_bytes": proxy.streams().snapshot_bytes(),
        "max_memory_bytes": settings.max_memory,
    })
}

//! The HTTP surface: stream endpoints, the stream listing, health and metrics.

pub mod admin;
pub mod body;
pub mod catchup;
pub mod console;
pub mod listing;
pub mod poll;
pub mod proxy;
pub mod push;
pub mod reload;
pub mod server;
pub mod subscribe;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Cors;
use crate::hub::{Hub, Stream};
use crate::metrics::Metrics;
use listing::PolledUpstreams;

/// What every handler can reach.
pub struct AppState {
    /// The streams.
    pub hub: Arc<Hub>,
    /// Their views.
    pub views: Arc<crate::views::Views>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The current snapshots (their total size is exported at each scrape).
    pub snapshots: crate::snapshot::SnapshotStore,
    /// Upstream status per stream name (changed by a configuration reload).
    pub upstreams: Arc<PolledUpstreams>,
    /// The push source, when configured (changed by a configuration reload).
    pub push: Arc<std::sync::RwLock<Option<Arc<push::PushAuth>>>>,
    /// Largest pushed body accepted, in bytes.
    pub push_max_body: usize,
    /// How long a request body may take to arrive (`server.body_timeout`).
    pub body_timeout: Duration,
    /// The webhook sink, when `[webhooks]` is configured (served by the admin API).
    pub webhooks: Option<Arc<crate::sinks::webhook::Webhooks>>,
    /// The broker sinks (none configured: empty); their positions show in `/streams` when any
    /// is configured, and a reload changes them.
    pub brokers: Arc<crate::sinks::broker::Brokers>,
    /// The admin API's bearer token; `None` disables the admin API.
    pub admin_token: Option<crate::sinks::webhook::config::AdminToken>,
    /// In a cluster whose webhooks another node runs (an SQLite store): that node's id, which
    /// the admin API names.
    pub webhooks_node: Option<String>,
    /// The proxy mode (`GET /{upstream URL}`), when `[proxy]` is enabled.
    pub proxy: Option<Arc<crate::proxy::Proxy>>,
    /// Who may read which stream: the subscription decision, which catch-up reads share.
    pub subscriptions: Arc<subscribe::Subscriptions>,
    /// This node's part of a cluster, when `[cluster]` is configured.
    pub cluster: Option<ClusterState>,
    /// Reloads the configuration file (`POST /admin/reload`), when started from one.
    pub reload: Option<Arc<dyn reload::Reload>>,
    /// What the configuration exposes, for `/asyncapi.json` and `/openapi.json` (replaced by a
    /// configuration reload).
    pub contracts: Arc<crate::contracts::Current>,
}

/// What the routes need of the cluster.
pub struct ClusterState {
    /// This node's membership.
    pub node: Arc<crate::cluster::node::Cluster>,
    /// The writers of the push streams: a push goes through the cluster's log (a reload
    /// adds, replaces and removes them).
    pub writers: Arc<std::sync::RwLock<HashMap<String, Arc<crate::cluster::writer::Writer>>>>,
}

impl AppState {
    /// The push source's token and streams now.
    pub fn push_auth(&self) -> Option<Arc<push::PushAuth>> {
        self.push
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The push token now, if the push source is configured.
    pub fn push_token(&self) -> Option<String> {
        self.push_auth().map(|p| p.token.clone())
    }

    /// The cluster's writer of push stream `name`, in a cluster.
    pub fn cluster_writer(&self, name: &str) -> Option<Arc<crate::cluster::writer::Writer>> {
        self.cluster
            .as_ref()?
            .writers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }
}

/// The application's routes.
pub fn router(state: Arc<AppState>, cors: &Cors) -> Router {
    // The push methods authorize from the head before their body extractor runs; the limit is
    // enforced by `push::PushBody` itself.
    // `route_layer`: the head check runs for POST and PATCH only, so another method is a 405
    // with `Allow`, not a 401.
    let push = axum::routing::post(push::post_document)
        .patch(push::patch_document)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            push::authorize_head,
        ));
    let admin = admin::router(
        state.webhooks.clone(),
        state.admin_token.clone(),
        state.webhooks_node.clone(),
        state.body_timeout,
    );
    let router = Router::new()
        .route("/streams", get(listing::list_streams))
        .route("/streams/{name}", get(stream).merge(push))
        .route("/streams/{name}/poll", axum::routing::post(poll::poll_now))
        .route("/admin/reload", axum::routing::post(reload::reload))
        .route("/streams/{name}/changes", get(catchup::changes))
        .route("/schemas/{file}", get(schema))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/asyncapi.json", get(asyncapi))
        .route("/openapi.json", get(openapi))
        .fallback(fallback);
    // `GET /ws` upgrades before the router (`subscribe::Subscriptions::upgrade`); what reaches
    // it is a `HEAD` (a 426 as a `GET` without an upgrade is) or another method (a 405).
    let router = if state.contracts.get().websocket {
        router.route("/ws", get(websocket_without_upgrade))
    } else {
        router
    };
    let router = router
        .with_state(state)
        .merge(admin)
        .merge(console::router());
    match cors_layer(cors) {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

fn cors_layer(cors: &Cors) -> Option<CorsLayer> {
    let origin = match cors {
        Cors::Disabled => return None,
        Cors::AnyOrigin => AllowOrigin::any(),
        Cors::Origins(origins) => AllowOrigin::list(origins.iter().cloned()),
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::HEAD, Method::OPTIONS])
            .allow_headers([
                header::HeaderName::from_static("last-event-id"),
                header::HeaderName::from_static("x-sd-token"),
                header::ACCEPT,
                header::IF_NONE_MATCH,
                header::CACHE_CONTROL,
            ])
            .expose_headers([
                header::ETAG,
                header::HeaderName::from_static(proxy::STREAM_HEADER),
                header::HeaderName::from_static(catchup::NEXT_OFFSET),
                header::HeaderName::from_static(catchup::UP_TO_DATE),
                header::HeaderName::from_static(catchup::CURSOR),
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

/// A JSON error response: `{"status": ..., "message": ...}`.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(error_body(status, &message.into()))).into_response()
}

/// The body of a JSON error.
pub(crate) fn error_body(status: StatusCode, message: &str) -> Value {
    json!({"status": status.as_u16(), "message": message})
}

/// Dynamic streams asked for as JSON (`/https://…`), else 404. (Their subscriptions are
/// decided before the router, by `subscribe`.)
async fn fallback(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
) -> Response {
    if crate::proxy::target::is_dynamic_path(uri.path()) && method == Method::GET {
        return proxy::dynamic_json(state, uri, headers).await;
    }
    error_response(
        StatusCode::NOT_FOUND,
        "no such endpoint; streams are at /streams/{name}, the list at /streams",
    )
}

/// How long `/readyz` waits for each backing service.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Readiness: `200` once the node serves (this answer comes through its listener) and every
/// backing service it is configured with answers: in a cluster Redis (`PING`, and the node
/// follows the log), with webhooks the outbox (a trivial query). Otherwise `503`, the body
/// naming what failed. Broker sinks are reported but never make the node unready: a broker
/// that is down holds up neither subscribers nor webhooks (its publishers queue and resync),
/// so taking the node out of a load balancer for it would only drop subscribers. `/healthz`
/// stays liveness.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut failed = Vec::new();
    if let Some(cluster) = &state.cluster {
        // The node's own view first (its heartbeat and follower); a PING then shows Redis
        // answers now, not only at the last heartbeat.
        let check = if cluster.node.ready() {
            match tokio::time::timeout(READY_CHECK_TIMEOUT, cluster.node.store().ping()).await {
                Ok(Ok(_)) => json!({"ok": true}),
                Ok(Err(error)) => {
                    json!({"ok": false, "error": format!("Redis did not answer PING: {error}")})
                }
                Err(_) => {
                    json!({"ok": false, "error": format!("Redis did not answer PING within {READY_CHECK_TIMEOUT:?}")})
                }
            }
        } else {
            json!({"ok": false, "error": "the cluster's Redis is unreachable, or this node is not following its log yet"})
        };
        if check["ok"] != true {
            failed.push("redis");
        }
        checks.insert("redis".into(), check);
    }
    if let Some(webhooks) = &state.webhooks {
        let answer = tokio::time::timeout(READY_CHECK_TIMEOUT, webhooks.outbox().check()).await;
        let check = match answer {
            Ok(Ok(())) => json!({"ok": true}),
            Ok(Err(error)) => {
                json!({"ok": false, "error": format!("the webhook outbox failed a trivial query: {error}")})
            }
            Err(_) => {
                json!({"ok": false, "error": format!("the webhook outbox did not answer within {READY_CHECK_TIMEOUT:?}")})
            }
        };
        if check["ok"] != true {
            failed.push("webhook-outbox");
        }
        checks.insert("webhook_outbox".into(), check);
    }
    if !state.brokers.is_empty() {
        let sinks: Vec<Value> = state
            .brokers
            .statuses()
            .iter()
            .map(|s| json!({"sink": s.sink, "stream": s.stream, "state": s.state().as_str()}))
            .collect();
        checks.insert(
            "brokers".into(),
            json!({"ok": true, "affects_readiness": false, "sinks": sinks}),
        );
    }
    let ready = failed.is_empty();
    let mut body = json!({"ready": ready, "checks": checks});
    if ready {
        return axum::Json(body).into_response();
    }
    body["status"] = json!(503);
    body["message"] = json!(format!("not ready: {}", failed.join(", ")));
    body["failed"] = json!(failed);
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
}

/// `GET /schemas/{name}.json`: the JSON Schema of a versioned envelope (`crate::schemas`).
async fn schema(Path(file): Path<String>) -> Response {
    let found = file.strip_suffix(".json").and_then(crate::schemas::get);
    match found {
        Some(text) => (
            [
                (header::CONTENT_TYPE, "application/schema+json"),
                (header::CACHE_CONTROL, "public, max-age=3600"),
            ],
            text,
        )
            .into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            format!(
                "no schema {file:?}; the schemas are: {}",
                crate::schemas::ALL
                    .iter()
                    .map(|(name, _)| format!("/schemas/{name}.json"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

/// The AsyncAPI 3.0 document of the streams, their document schemas inferred from the current
/// documents where the configuration names no schema.
async fn asyncapi(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.contracts.get().asyncapi(&state.hub)).into_response()
}

/// The OpenAPI 3.1 document of the HTTP endpoints.
async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.contracts.get().openapi(&state.hub)).into_response()
}

/// `HEAD /ws`: what `GET /ws` without an upgrade is answered (the handshake's refusal).
async fn websocket_without_upgrade() -> Response {
    let mut response = error_response(
        StatusCode::UPGRADE_REQUIRED,
        "GET /ws upgrades to a WebSocket: send Upgrade: websocket and Sec-WebSocket-Version: 13",
    );
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stored = i64::try_from(state.snapshots.weighted_bytes()).unwrap_or(i64::MAX);
    state.metrics.stored_snapshot_bytes.set(stored);
    if let Some(proxy) = &state.proxy {
        // Sets the gauge as a side effect.
        proxy.streams().snapshot_bytes();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// `GET /streams/{name}` as JSON, or of a stream that does not exist. (Its subscriptions are
/// decided before the router, by `subscribe`.)
async fn stream(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    uri: http::Uri,
    headers: HeaderMap,
) -> Response {
    if name.starts_with('~') {
        return proxy::view_json(&state, &name, uri.query(), &headers).await;
    }
    let Some(target) = state.views.target(&state.hub, &name, uri.query()) else {
        return error_response(
            StatusCode::NOT_FOUND,
            format!("no stream named {name:?}; GET /streams lists them"),
        );
    };
    match target.and_then(|target| target.stream()) {
        Ok(stream) => snapshot_json(&stream, &headers, state.subscriptions.gzip_level()),
        Err(error) => error_response(
            StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST),
            error.to_string(),
        ),
    }
}

/// `GET /streams/{name}` with `Accept: application/json`: the current document once, with an
/// `ETag` naming its epoch and sequence, so polling clients cost the upstream nothing; gzip
/// for clients that accept it (compressed once per snapshot, at `level`: `server.gzip_level`).
pub(crate) fn snapshot_json(
    stream: &Stream,
    headers: &HeaderMap,
    level: crate::wire::gzip::Level,
) -> Response {
    let Some(snapshot) = stream.snapshot() else {
        let mut response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stream {:?} has no document yet", stream.name()),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    // The gzip representation has its own tag (a strong tag names one byte sequence); either
    // tag names the same document version, so either revalidates.
    let plain_etag = format!("\"{}-{}\"", stream.epoch(), snapshot.seq);
    let gzip_etag = format!("\"{}-{}+gzip\"", stream.epoch(), snapshot.seq);
    let gzip = subscribe::accepts_gzip(headers);
    let etag = if gzip { &gzip_etag } else { &plain_etag };
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == plain_etag || t == gzip_etag || t == "*");
    let mut builder = Response::builder()
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::VARY, "accept, accept-encoding");
    if matches {
        builder = builder.status(StatusCode::NOT_MODIFIED);
        return builder.body(Body::empty()).unwrap_or_default();
    }
    let body = if gzip {
        builder = builder.header(header::CONTENT_ENCODING, "gzip");
        snapshot.json_gzip(level).clone()
    } else {
        snapshot.json.clone()
    };
    builder
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_default()
}

//! The admin API under `/admin/webhooks`, protected by `Authorization: Bearer <token>`
//! (`webhooks.admin_token`). Without webhooks it answers 404; without a token, 403.
//!
//! - `GET /admin/webhooks`, `POST /admin/webhooks` (the answer shows the secret, once)
//! - `GET|PATCH|DELETE /admin/webhooks/{id}` (`PATCH {"disabled": false}` re-enables)
//! - `POST /admin/webhooks/{id}/rotate-secret` (`{"secret": ...}` optional)
//! - `GET /admin/webhooks/{id}/deliveries?state=&before=&limit=`, `.../dead-letters`
//! - `POST /admin/webhooks/{id}/deliveries/{delivery}/replay`
//! - `POST /admin/webhooks/{id}/replay` with `{"since": "<RFC 3339 time>"}`: every dead letter
//!   created since then

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::body::{self, BodyLimits};
use super::error_response;
use crate::sinks::webhook::Webhooks;
use crate::sinks::webhook::body::event_type;
use crate::sinks::webhook::config::AdminToken;
use crate::sinks::webhook::endpoints::{AdminError, EndpointChanges, Endpoints, NewEndpoint};
use crate::sinks::webhook::outbox::{Delivery, DeliveryFilter, DeliveryState, Replay};
use crate::sinks::webhook::registry::Endpoint;
use crate::time::{rfc3339, unix_ms};

/// Largest admin request body: endpoint definitions and replay requests are small (axum's own
/// default for `Bytes`).
const MAX_BODY: usize = 2 * 1024 * 1024;

/// The admin routes: real ones when webhooks run with a token, explanations otherwise.
pub fn router(
    webhooks: Option<Arc<Webhooks>>,
    token: Option<AdminToken>,
    body_timeout: Duration,
) -> Router {
    let (webhooks, token) =
        match (webhooks, token) {
            (None, _) => {
                return Router::new().nest("/admin", Router::new().fallback(|| async {
                error_response(
                    StatusCode::NOT_FOUND,
                    "webhooks are not configured: add a [webhooks] table to enable them and \
                     their admin API",
                )
            }));
            }
            (Some(_), None) => {
                return Router::new().nest(
                    "/admin",
                    Router::new().fallback(|| async {
                        error_response(
                            StatusCode::FORBIDDEN,
                            "the admin API is disabled: set webhooks.admin_token to enable it",
                        )
                    }),
                );
            }
            (Some(w), Some(t)) => (w.endpoints().clone(), Arc::new(t)),
        };
    let routes = Router::new()
        .route("/admin/webhooks", get(list).post(create))
        .route(
            "/admin/webhooks/{id}",
            get(show).patch(update).delete(remove),
        )
        .route("/admin/webhooks/{id}/rotate-secret", post(rotate))
        .route("/admin/webhooks/{id}/deliveries", get(deliveries))
        .route("/admin/webhooks/{id}/dead-letters", get(dead_letters))
        .route(
            "/admin/webhooks/{id}/deliveries/{delivery}/replay",
            post(replay_one),
        )
        .route("/admin/webhooks/{id}/replay", post(replay_since))
        .with_state(webhooks);
    // Bodies are read within the deadline, and only once the token was checked from the head.
    let limits = BodyLimits {
        max_bytes: MAX_BODY,
        timeout: body_timeout,
        setting: "the admin API's limit",
    };
    routes
        .layer(middleware::from_fn(move |request, next| {
            body::buffered(limits, request, next)
        }))
        .layer(middleware::from_fn_with_state(token, authorize))
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(token): State<Arc<AdminToken>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(p) if same(p.as_bytes(), token.0.as_bytes()) => next.run(request).await,
        Some(_) => error_response(StatusCode::UNAUTHORIZED, "wrong admin token"),
        None => {
            let mut response = error_response(
                StatusCode::UNAUTHORIZED,
                "expected an `Authorization: Bearer <webhooks.admin_token>` header",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

fn failure(error: AdminError) -> Response {
    let status = match &error {
        AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        AdminError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        AdminError::Conflict(_) => StatusCode::CONFLICT,
        AdminError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error_response(status, error.to_string())
}

/// A request body as `T`, or the 400 answer naming what is wrong.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            format!("expected a JSON object as documented for this endpoint: {e}"),
        ))
    })
}

fn time(ms: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

fn endpoint_json(endpoint: &Endpoint) -> Value {
    let r = &endpoint.record;
    let now = unix_ms(std::time::SystemTime::now());
    json!({
        "id": r.id,
        // Userinfo and query values may be credentials: shown redacted.
        "url": crate::redact::Redacted::new(&endpoint.url),
        "streams": r.streams,
        "mode": r.mode,
        "format": r.format,
        // Values may be credentials: names only.
        "headers": r.headers.keys().collect::<Vec<_>>(),
        "source": r.source,
        "created_at": time(r.created_ms),
        "disabled": endpoint.status.disabled.as_ref().map(|d| json!({"at": time(d.at_ms), "reason": d.reason})),
        "failing_since": endpoint.status.failing_since_ms.map(time),
        "previous_secret_until": r.previous_expires_ms.filter(|t| *t > now).map(time),
    })
}

fn delivery_json(d: &Delivery) -> Value {
    json!({
        "id": d.id,
        "webhook_id": d.msg_id,
        "stream": d.stream,
        "type": event_type(d.kind),
        "epoch": d.epoch,
        "seq": d.seq,
        "base_seq": d.base_seq,
        "state": d.state.as_str(),
        "attempts": d.attempts,
        "next_attempt_at": (d.state == DeliveryState::Pending).then(|| time(d.next_attempt_ms)),
        "last_status": d.last_status,
        "last_error": d.last_error,
        "created_at": time(d.created_ms),
        "finished_at": d.finished_ms.map(time),
    })
}

async fn list(State(endpoints): State<Arc<Endpoints>>) -> Response {
    let listed: Vec<Value> = endpoints.all().iter().map(|e| endpoint_json(e)).collect();
    axum::Json(json!({ "endpoints": listed })).into_response()
}

async fn create(State(endpoints): State<Arc<Endpoints>>, body: Bytes) -> Response {
    let input: NewEndpoint = match parse(&body) {
        Ok(input) => input,
        Err(response) => return *response,
    };
    match endpoints.create(input).await {
        Ok((endpoint, secret)) => {
            let mut view = endpoint_json(&endpoint);
            view["secret"] = Value::String(secret);
            (StatusCode::CREATED, axum::Json(view)).into_response()
        }
        Err(e) => failure(e),
    }
}

async fn show(State(endpoints): State<Arc<Endpoints>>, Path(id): Path<String>) -> Response {
    match endpoints.get(&id) {
        Ok(endpoint) => axum::Json(endpoint_json(&endpoint)).into_response(),
        Err(e) => failure(e),
    }
}

async fn update(
    State(endpoints): State<Arc<Endpoints>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let changes: EndpointChanges = match parse(&body) {
        Ok(changes) => changes,
        Err(response) => return *response,
    };
    match endpoints.update(&id, changes).await {
        Ok(endpoint) => axum::Json(endpoint_json(&endpoint)).into_response(),
        Err(e) => failure(e),
    }
}

async fn remove(State(endpoints): State<Arc<Endpoints>>, Path(id): Path<String>) -> Response {
    match endpoints.delete(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => failure(e),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotation {
    secret: Option<String>,
}

async fn rotate(
    State(endpoints): State<Arc<Endpoints>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let rotation: Rotation = match parse(&body) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    match endpoints.rotate(&id, rotation.secret).await {
        Ok(secret) => axum::Json(json!({ "secret": secret })).into_response(),
        Err(e) => failure(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    before: Option<i64>,
    limit: Option<usize>,
}

async fn list_deliveries(
    endpoints: &Endpoints,
    id: &str,
    query: ListQuery,
    state: Option<DeliveryState>,
) -> Response {
    let state = match (state, query.state.as_deref()) {
        (Some(s), _) => Some(s),
        (None, None) => None,
        (None, Some(text)) => match DeliveryState::parse(text) {
            Some(s) => Some(s),
            None => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    format!("state: expected pending, delivered, dead or superseded, got {text:?}"),
                );
            }
        },
    };
    let filter = DeliveryFilter {
        state,
        before: query.before,
        limit: query.limit.unwrap_or(100).clamp(1, 1000),
    };
    match endpoints.deliveries(id, filter).await {
        Ok(list) => {
            let next = list.last().map(|d| d.id);
            let items: Vec<Value> = list.iter().map(delivery_json).collect();
            axum::Json(json!({ "deliveries": items, "next_before": next })).into_response()
        }
        Err(e) => failure(e),
    }
}

async fn deliveries(
    State(endpoints): State<Arc<Endpoints>>,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Response {
    list_deliveries(&endpoints, &id, query, None).await
}

async fn dead_letters(
    State(endpoints): State<Arc<Endpoints>>,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Response {
    list_deliveries(&endpoints, &id, query, Some(DeliveryState::Dead)).await
}

async fn replay_one(
    State(endpoints): State<Arc<Endpoints>>,
    Path((id, delivery)): Path<(String, i64)>,
) -> Response {
    match endpoints.replay(&id, Replay::One(delivery)).await {
        Ok(n) => (StatusCode::ACCEPTED, axum::Json(json!({ "replayed": n }))).into_response(),
        Err(e) => failure(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaySince {
    since: String,
}

async fn replay_since(
    State(endpoints): State<Arc<Endpoints>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let request: ReplaySince = match parse(&body) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let since = match humantime::parse_rfc3339_weak(request.since.trim()) {
        Ok(t) => unix_ms(t),
        Err(e) => {
            return error_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "since: expected an RFC 3339 time such as \"2026-01-31T12:00:00Z\", got {:?} ({e})",
                    request.since
                ),
            );
        }
    };
    match endpoints.replay(&id, Replay::DeadSince(since)).await {
        Ok(n) => (StatusCode::ACCEPTED, axum::Json(json!({ "replayed": n }))).into_response(),
        Err(e) => failure(e),
    }
}

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
use axum::extract::rejection::{PathRejection, QueryRejection};
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

/// A path parameter, or the JSON 400 naming what is wrong (axum's own answer is plain text).
fn path<T>(extracted: Result<Path<T>, PathRejection>) -> Result<T, Box<Response>> {
    extracted.map(|Path(value)| value).map_err(|rejection| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            format!(
                "expected the path documented for this endpoint: {}",
                rejection.body_text()
            ),
        ))
    })
}

/// The query string, or the JSON 400 naming what is wrong.
fn query<T>(extracted: Result<Query<T>, QueryRejection>) -> Result<T, Box<Response>> {
    extracted.map(|Query(value)| value).map_err(|rejection| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            format!(
                "expected the query parameters state, before and limit: {}",
                rejection.body_text()
            ),
        ))
    })
}

/// An RFC 3339 time as Unix milliseconds. `humantime` reads UTC times from 1970 only; a
/// numeric offset (`+02:00`) is applied here, and a time before 1970 (RFC 3339 allows years
/// from 0000) is before every dead letter, so it reads as 0 once shown to be well-formed.
fn parse_since(text: &str) -> Result<u64, String> {
    let (local, offset_ms) = match text
        .len()
        .checked_sub(6)
        .and_then(|at| Some((at, text.get(at..)?)))
    {
        Some((at, tail))
            if matches!(tail.as_bytes(), [b'+' | b'-', h1, h2, b':', m1, m2]
                if [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit())) =>
        {
            let digits = |range: std::ops::Range<usize>| tail[range].parse::<i64>().unwrap_or(0);
            let (hours, minutes) = (digits(1..3), digits(4..6));
            if hours > 23 || minutes > 59 {
                return Err(format!("the offset {tail} is out of range"));
            }
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            (&text[..at], sign * (hours * 3600 + minutes * 60) * 1000)
        }
        _ => (text, 0),
    };
    let year = local
        .get(..4)
        .filter(|year| year.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|year| year.parse::<u16>().ok());
    let local_ms = match (year, local.get(4..)) {
        (Some(year), Some(rest)) if year < 1970 => {
            humantime::parse_rfc3339_weak(&format!("1971{rest}")).map_err(|e| e.to_string())?;
            return Ok(0);
        }
        _ => humantime::parse_rfc3339_weak(local).map_err(|e| e.to_string())?,
    };
    let utc = i64::try_from(unix_ms(local_ms)).unwrap_or(i64::MAX) - offset_ms;
    Ok(u64::try_from(utc).unwrap_or(0))
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

async fn show(
    State(endpoints): State<Arc<Endpoints>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match path(id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    match endpoints.get(&id) {
        Ok(endpoint) => axum::Json(endpoint_json(&endpoint)).into_response(),
        Err(e) => failure(e),
    }
}

async fn update(
    State(endpoints): State<Arc<Endpoints>>,
    id: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Response {
    let id = match path(id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    let changes: EndpointChanges = match parse(&body) {
        Ok(changes) => changes,
        Err(response) => return *response,
    };
    match endpoints.update(&id, changes).await {
        Ok(endpoint) => axum::Json(endpoint_json(&endpoint)).into_response(),
        Err(e) => failure(e),
    }
}

async fn remove(
    State(endpoints): State<Arc<Endpoints>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match path(id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
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
    id: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Response {
    let id = match path(id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
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
    id: Result<Path<String>, PathRejection>,
    listed: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let (id, listed) = match (path(id), query(listed)) {
        (Ok(id), Ok(listed)) => (id, listed),
        (Err(response), _) | (_, Err(response)) => return *response,
    };
    list_deliveries(&endpoints, &id, listed, None).await
}

async fn dead_letters(
    State(endpoints): State<Arc<Endpoints>>,
    id: Result<Path<String>, PathRejection>,
    listed: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let (id, listed) = match (path(id), query(listed)) {
        (Ok(id), Ok(listed)) => (id, listed),
        (Err(response), _) | (_, Err(response)) => return *response,
    };
    list_deliveries(&endpoints, &id, listed, Some(DeliveryState::Dead)).await
}

async fn replay_one(
    State(endpoints): State<Arc<Endpoints>>,
    ids: Result<Path<(String, i64)>, PathRejection>,
) -> Response {
    let (id, delivery) = match path(ids) {
        Ok(ids) => ids,
        Err(response) => return *response,
    };
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
    id: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Response {
    let id = match path(id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    let request: ReplaySince = match parse(&body) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let since = match parse_since(request.since.trim()) {
        Ok(t) => t,
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

#[cfg(test)]
mod tests {
    use super::parse_since;

    #[test]
    fn since_reads_every_rfc_3339_time() {
        assert_eq!(parse_since("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_since("1970-01-01T02:00:01+02:00"), Ok(1000));
        assert_eq!(parse_since("1970-01-01T00:00:01.5-00:30"), Ok(1_801_500));
        assert_eq!(parse_since("0855-10-26T02:25:38.276190-10:47"), Ok(0));
        assert_eq!(parse_since("1970-01-01T00:30:00+01:00"), Ok(0));
        assert!(parse_since("0855-13-26T02:25:38Z").is_err());
        assert!(parse_since("2026-01-01T00:00:00+24:00").is_err());
        assert!(parse_since("yesterday").is_err());
    }
}

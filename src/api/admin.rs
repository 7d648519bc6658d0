//! The admin API under `/admin/webhooks`, protected by `Authorization: Bearer <token>`
//! (`webhooks.admin_token`). Without webhooks it answers 404; without a token, 403.
//!
//! - `GET /admin/webhooks`, `POST /admin/webhooks` (the answer shows the secret, once)
//! - `GET|PATCH|DELETE /admin/webhooks/{id}` (`PATCH {"disabled": false}` re-enables)
//! - `POST /admin/webhooks/{id}/rotate-secret` (`{"secret": ...}` optional)
//! - `GET /admin/webhooks/{id}/deliveries?state=&before=&limit=`, `.../dead-letters`
//! - `GET /admin/webhooks/{id}/attempts?stream=&result=&status=&since=&until=&before=&limit=`:
//!   the attempt history, newest first (`next_before` pages on)
//! - `POST /admin/webhooks/{id}/deliveries/{delivery}/replay`
//! - `POST /admin/webhooks/{id}/replay` with `{"since": "<RFC 3339 time>"}`: every dead letter
//!   created since then
//! - `POST /admin/webhooks/{id}/test`: a signed test delivery, sent now; answers what the
//!   receiver said
//! - `POST /admin/webhooks/{id}/recover` with `{"since": "<RFC 3339 time>"}`: every delivery
//!   delivered or dead since then, again, in order

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
use crate::sinks::webhook::config::AdminToken;
use crate::sinks::webhook::endpoints::{
    AdminError, EndpointChanges, Endpoints, Idempotency, NewEndpoint,
};
use crate::sinks::webhook::outbox::{
    AttemptEntry, AttemptFilter, AttemptResult, Delivery, DeliveryFilter, DeliveryState, Replay,
};
use crate::sinks::webhook::registry::Endpoint;
use crate::sinks::webhook::sign;
use crate::time::{rfc3339, unix_ms};

/// Largest admin request body: endpoint definitions and replay requests are small (axum's own
/// default for `Bytes`).
const MAX_BODY: usize = 2 * 1024 * 1024;

/// The admin routes: real ones when webhooks run with a token, explanations otherwise (which
/// node runs them, in a cluster where another one does).
pub fn router(
    webhooks: Option<Arc<Webhooks>>,
    token: Option<AdminToken>,
    elsewhere: Option<String>,
    body_timeout: Duration,
) -> Router {
    // The explanations answer under `/admin/webhooks` only: `/admin/reload` is its own route.
    let explain = |message: String, status: StatusCode| {
        let answer = move || {
            let message = message.clone();
            async move { error_response(status, message) }
        };
        Router::new()
            .route("/admin/webhooks", axum::routing::any(answer.clone()))
            .route("/admin/webhooks/{*rest}", axum::routing::any(answer))
    };
    if let (None, Some(node)) = (&webhooks, elsewhere) {
        return explain(
            format!(
                "webhooks run on node {node:?} (cluster.webhooks_node: with an SQLite store one \
                 node delivers them): use that node's admin API"
            ),
            StatusCode::NOT_FOUND,
        );
    }
    let (webhooks, token) = match (webhooks, token) {
        (None, _) => {
            return explain(
                "webhooks are not configured: add a [webhooks] table to enable them and their \
                 admin API"
                    .to_owned(),
                StatusCode::NOT_FOUND,
            );
        }
        (Some(_), None) => {
            return explain(
                "the admin API is disabled: set webhooks.admin_token to enable it".to_owned(),
                StatusCode::FORBIDDEN,
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
        .route("/admin/webhooks/{id}/attempts", get(attempts))
        .route(
            "/admin/webhooks/{id}/deliveries/{delivery}/replay",
            post(replay_one),
        )
        .route("/admin/webhooks/{id}/replay", post(replay_since))
        .route("/admin/webhooks/{id}/recover", post(recover))
        .route("/admin/webhooks/{id}/test", post(test))
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
    let mut reader = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        // Name the field at fault (`rate_limit: invalid type ...`) when there is one.
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            format!(
                "expected a JSON object as documented for this endpoint: {at}{}",
                e.inner()
            ),
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
        "format": r.format,
        // Values may be credentials: names only.
        "headers": r.headers.keys().collect::<Vec<_>>(),
        "source": r.source,
        "signing": endpoint.secret.scheme().as_str(),
        // Public: receivers of v1a signatures verify with it.
        "public_key": endpoint.secret.public_key(),
        "description": r.description,
        "metadata": r.metadata,
        "rate_limit": r.rate_limit,
        "events": r.events,
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
        "type": d.kind.event_type(),
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

/// `value` as JSON text with every object's keys sorted: equal for equal requests.
fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&map[k])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// The longest `Idempotency-Key` accepted.
const IDEMPOTENCY_KEY_MAX: usize = 255;

async fn create(
    State(endpoints): State<Arc<Endpoints>>,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    let input: NewEndpoint = match parse(&body) {
        Ok(input) => input,
        Err(response) => return *response,
    };
    let idempotency = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value.to_str().ok().map(str::trim).unwrap_or_default();
            if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Idempotency-Key: expected 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII \
                         characters, such as a UUID"
                    ),
                );
            }
            // The request as JSON, normalized (key order, spacing), so a retry matches.
            let normalized = serde_json::from_slice::<Value>(&body)
                .map(|v| canonical(&v))
                .unwrap_or_default();
            Some(Idempotency {
                key: key.to_owned(),
                request_hash: sign::sha256_hex(normalized.as_bytes()),
            })
        }
    };
    match endpoints.create(input, idempotency).await {
        Ok(created) => {
            let mut view = endpoint_json(&created.endpoint);
            // A v1a endpoint's private key is patchwire's alone: receivers need its public key.
            if created.endpoint.secret.public_key().is_none() {
                view["secret"] = Value::String(created.secret);
            }
            let mut response = (StatusCode::CREATED, axum::Json(view)).into_response();
            if created.replayed {
                response.headers_mut().insert(
                    "idempotent-replayed",
                    http::HeaderValue::from_static("true"),
                );
            }
            response
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
        Ok(secret) => {
            let answer = match sign::Secret::parse(&secret)
                .ok()
                .and_then(|s| s.public_key())
            {
                Some(public_key) => json!({ "public_key": public_key }),
                None => json!({ "secret": secret }),
            };
            axum::Json(answer).into_response()
        }
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

fn attempt_json(a: &AttemptEntry) -> Value {
    json!({
        "id": a.id,
        "delivery": a.delivery,
        "webhook_id": a.msg_id,
        "stream": a.stream,
        "at": time(a.attempt.at_ms),
        "duration_ms": a.attempt.duration_ms,
        "result": a.result.as_str(),
        "status": a.status,
        "response": a.attempt.response,
        "error": a.error,
    })
}

/// Most attempts on one page of the history, and how many when `limit` is absent.
const ATTEMPTS_PAGE: (usize, usize) = (1000, 100);

/// The attempt history's query string as a filter (one more than `limit` asked for, to know
/// whether a next page exists), or the 400 answer naming the parameter at fault.
fn attempt_filter(pairs: &[(String, String)]) -> Result<AttemptFilter, String> {
    let mut filter = AttemptFilter {
        limit: ATTEMPTS_PAGE.1,
        ..AttemptFilter::default()
    };
    let mut seen = std::collections::HashSet::new();
    let time = |name: &str, value: &str| {
        humantime::parse_rfc3339_weak(value.trim())
            .map(unix_ms)
            .map_err(|e| {
                format!(
                    "{name}: expected an RFC 3339 time such as \"2026-01-31T12:00:00Z\", got \
                     {value:?} ({e})"
                )
            })
    };
    for (name, value) in pairs {
        if !seen.insert(name.as_str()) {
            return Err(format!("{name}: given more than once"));
        }
        match name.as_str() {
            "stream" => filter.stream = Some(value.clone()),
            "result" => {
                filter.result = Some(AttemptResult::parse(value).ok_or_else(|| {
                    format!("result: expected delivered, retrying or dead, got {value:?}")
                })?);
            }
            "status" => {
                filter.status = Some(
                    value
                        .parse::<u16>()
                        .ok()
                        .filter(|s| (100..=599).contains(s))
                        .ok_or_else(|| {
                            format!(
                                "status: expected an HTTP status from 100 to 599, got {value:?}"
                            )
                        })?,
                );
            }
            "since" => filter.since_ms = Some(time("since", value)?),
            "until" => filter.until_ms = Some(time("until", value)?),
            "before" => {
                filter.before = Some(value.parse::<i64>().ok().filter(|b| *b > 0).ok_or_else(
                    || {
                        format!(
                            "before: expected an attempt id (a positive integer), got {value:?}"
                        )
                    },
                )?);
            }
            "limit" => {
                filter.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=ATTEMPTS_PAGE.0).contains(l))
                    .ok_or_else(|| {
                        format!(
                            "limit: expected an integer from 1 to {}, got {value:?}",
                            ATTEMPTS_PAGE.0
                        )
                    })?;
            }
            other => {
                return Err(format!(
                    "{other}: unknown parameter (expected stream, result, status, since, until, \
                     before or limit)"
                ));
            }
        }
    }
    if let (Some(since), Some(until)) = (filter.since_ms, filter.until_ms)
        && since >= until
    {
        return Err("until: expected a time after since".to_owned());
    }
    filter.limit += 1;
    Ok(filter)
}

async fn attempts(
    State(endpoints): State<Arc<Endpoints>>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let filter = match attempt_filter(&pairs) {
        Ok(filter) => filter,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
    };
    let page = filter.limit - 1;
    match endpoints.attempts(&id, filter).await {
        Ok(mut list) => {
            let more = list.len() > page;
            list.truncate(page);
            let next = more.then(|| list.last().map(|a| a.id)).flatten();
            let items: Vec<Value> = list.iter().map(attempt_json).collect();
            axum::Json(json!({ "attempts": items, "next_before": next })).into_response()
        }
        Err(e) => failure(e),
    }
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

/// The `since` of a replay or recovery request: an RFC 3339 time, not in the future.
fn since_of(body: &[u8]) -> Result<u64, Box<Response>> {
    let request: ReplaySince = parse(body)?;
    let since = parse_since(request.since.trim()).map_err(|e| {
        Box::new(error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "since: expected an RFC 3339 time such as \"2026-01-31T12:00:00Z\", got {:?} ({e})",
                request.since
            ),
        ))
    })?;
    if since > unix_ms(std::time::SystemTime::now()) {
        return Err(Box::new(error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "since: expected a time in the past, got {:?} (nothing was created after it yet)",
                request.since
            ),
        )));
    }
    Ok(since)
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
    let since = match since_of(&body) {
        Ok(since) => since,
        Err(response) => return *response,
    };
    match endpoints.replay(&id, Replay::DeadSince(since)).await {
        Ok(n) => (StatusCode::ACCEPTED, axum::Json(json!({ "replayed": n }))).into_response(),
        Err(e) => failure(e),
    }
}

async fn recover(
    State(endpoints): State<Arc<Endpoints>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let since = match since_of(&body) {
        Ok(since) => since,
        Err(response) => return *response,
    };
    match endpoints.replay(&id, Replay::Since(since)).await {
        Ok(n) => (StatusCode::ACCEPTED, axum::Json(json!({ "recovered": n }))).into_response(),
        Err(e) => failure(e),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestRequest {}

async fn test(
    State(endpoints): State<Arc<Endpoints>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(response) = parse::<TestRequest>(&body) {
        return *response;
    }
    match endpoints.test(&id).await {
        Ok((webhook_id, probe)) => axum::Json(json!({
            "webhook_id": webhook_id,
            "delivered": probe.error.is_none(),
            "status": probe.status,
            "duration_ms": u64::try_from(probe.duration.as_millis()).unwrap_or(u64::MAX),
            "response": probe.excerpt,
            "error": probe.error.map(|e| e.to_string()),
        }))
        .into_response(),
        Err(e) => failure(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &str) -> Vec<(String, String)> {
        url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    }

    #[test]
    fn the_attempt_filter_reads_every_parameter() {
        let filter = attempt_filter(&pairs(
            "stream=fleet&result=dead&status=503&since=2026-01-01T00:00:00Z\
             &until=2026-01-01T00:00:01.5Z&before=42&limit=10",
        ))
        .unwrap();
        assert_eq!(filter.stream.as_deref(), Some("fleet"));
        assert_eq!(filter.result, Some(AttemptResult::Dead));
        assert_eq!(filter.status, Some(503));
        assert_eq!(filter.since_ms, Some(1_767_225_600_000));
        assert_eq!(filter.until_ms, Some(1_767_225_601_500));
        assert_eq!(filter.before, Some(42));
        // One more than asked for: whether a next page exists.
        assert_eq!(filter.limit, 11);
        assert_eq!(attempt_filter(&[]).unwrap().limit, ATTEMPTS_PAGE.1 + 1);
    }

    #[test]
    fn a_bad_attempt_filter_names_its_parameter() {
        for (query, named) in [
            ("since=2026-01-01", "since:"),
            ("until=soon", "until:"),
            (
                "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
                "until:",
            ),
            ("status=99", "status:"),
            ("status=600", "status:"),
            ("result=ok", "result:"),
            ("before=-1", "before:"),
            ("limit=1001", "limit:"),
            ("page=2", "page:"),
            ("limit=1&limit=2", "limit:"),
        ] {
            let error = attempt_filter(&pairs(query)).unwrap_err();
            assert!(error.starts_with(named), "{query}: {error}");
        }
    }

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

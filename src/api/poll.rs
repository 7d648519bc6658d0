//! `POST /streams/{name}/poll`: poll a stream's upstream now instead of at its next tick, for
//! an upstream that has its own webhooks and can say when it changed. Within the stream's rate
//! limit (its group's governor quota): `202` when the poll is scheduled, `429` with
//! `Retry-After` when the quota forbids a request now. Authorized by the push token or the
//! admin token.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;

use super::{AppState, error_response};

/// Compares in time independent of where the inputs first differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `headers` carry the push token or the admin token; `Err` is the refusal.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let push = state.push_token();
    let admin = state.admin_token.as_ref().map(|t| t.0.clone());
    if push.is_none() && admin.is_none() {
        return Err(Box::new(error_response(
            StatusCode::FORBIDDEN,
            "polling on request is disabled: it needs the [push] token or webhooks.admin_token",
        )));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let known = |token: &Option<String>| {
        token
            .as_ref()
            .zip(presented)
            .is_some_and(|(t, p)| same(t.as_bytes(), p.as_bytes()))
    };
    if known(&push) || known(&admin) {
        return Ok(());
    }
    let mut response = error_response(
        StatusCode::UNAUTHORIZED,
        "expected `Authorization: Bearer <token>` with the [push] token or webhooks.admin_token",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Err(Box::new(response))
}

/// Whole seconds a client waits before asking again: `wait` rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// `POST /streams/{name}/poll`.
pub async fn poll_now(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&state, &headers) {
        return *refusal;
    }
    let Some(upstream) = state.upstreams.get(&name) else {
        return if state.hub.get(&name).is_some() {
            error_response(
                StatusCode::CONFLICT,
                format!(
                    "stream {name:?} is not polled (source = \"push\"): there is nothing to poll"
                ),
            )
        } else {
            error_response(
                StatusCode::NOT_FOUND,
                format!("no stream named {name:?}; GET /streams lists them"),
            )
        };
    };
    if upstream.on_demand.is_some()
        && state
            .hub
            .get(&name)
            .is_none_or(|s| s.subscriber_count() == 0)
    {
        return error_response(
            StatusCode::CONFLICT,
            format!(
                "stream {name:?} is polled on demand and has no subscribers: it is not polling now"
            ),
        );
    }
    match upstream.control.poll_now() {
        Ok(()) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"stream": name, "poll": "scheduled"})),
        )
            .into_response(),
        Err(wait) => {
            let secs = retry_after_secs(wait);
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "stream {name:?}: its upstream's rate limit allows no request now; try again in {secs} s"
                ),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }
}

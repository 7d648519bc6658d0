//! The proxy mode's JSON routes: `GET /{upstream URL}` and `GET /streams/~{id}` with
//! `Accept: application/json`. (Their subscriptions, and the refusals Streamdata.io clients
//! get as an SSE `error` event, are decided before the router, by `api::subscribe`.)

use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use tokio::sync::broadcast::error::RecvError;

use super::subscribe::{query_token, retry_after};
use super::{AppState, error_response, snapshot_json};
use crate::hub::Resume;
use crate::proxy::{Opened, Refusal};

/// The response header naming the dynamic stream a request was subscribed to.
pub const STREAM_HEADER: &str = "x-patchwire-stream";

/// `GET /{upstream URL}` with `Accept: application/json`: the current document of that URL's
/// dynamic stream, once.
pub async fn dynamic_json(state: Arc<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    let Some(proxy) = &state.proxy else {
        return refusal_status(&Refusal::Disabled);
    };
    let opened = match proxy
        .open(uri.path(), uri.query(), &headers, &Resume::Fresh)
        .await
    {
        Ok(opened) => opened,
        Err(refusal) => return refusal_status(&refusal),
    };
    // The first poll of a new stream may wait for its rate limit and take its timeout.
    let wait = proxy.settings().timeout * 2 + Duration::from_secs(1);
    snapshot_once(opened, &headers, wait, state.subscriptions.gzip_level()).await
}

/// `GET /streams/~{id}` with `Accept: application/json` (or without the proxy mode): a
/// dynamic stream's current document, under the same token rules as its URL.
pub async fn view_json(
    state: &AppState,
    name: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    let Some(proxy) = &state.proxy else {
        return error_response(StatusCode::NOT_FOUND, Refusal::Disabled.to_string());
    };
    let token = query_token(query);
    let opened = match proxy
        .view(name, &Resume::Fresh, token.as_deref(), headers)
        .await
    {
        Ok(opened) => opened,
        Err(refusal) => return refusal_status(&refusal),
    };
    let response = snapshot_json(
        opened.subscription.stream(),
        headers,
        state.subscriptions.gzip_level(),
    );
    naming_stream(response, &opened.stream)
}

/// `response` with the header naming the dynamic stream it comes from.
fn naming_stream(mut response: Response, stream: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(stream) {
        response.headers_mut().insert(STREAM_HEADER, value);
    }
    response
}

/// A refusal as the JSON error of its status.
fn refusal_status(refusal: &Refusal) -> Response {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = error_response(status, refusal.to_string());
    if let Some(retry_after) = retry_after(status) {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, retry_after);
    }
    response
}
/// Snapshot-only mode: the current document once, waiting up to `wait` for a new stream's
/// first poll. The subscription is dropped afterwards and the stream lingers.
async fn snapshot_once(
    opened: Opened,
    headers: &HeaderMap,
    wait: Duration,
    level: crate::wire::gzip::Level,
) -> Response {
    let Opened {
        mut subscription,
        hold: _hold,
        stream: name,
    } = opened;
    let stream = subscription.stream().clone();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if stream.snapshot().is_some() {
            return naming_stream(snapshot_json(&stream, headers, level), &name);
        }
        if let Some(failure) = stream.failure() {
            let status = StatusCode::from_u16(failure.status).unwrap_or(StatusCode::BAD_GATEWAY);
            return naming_stream(error_response(status, failure.message.clone()), &name);
        }
        match tokio::time::timeout_at(deadline, subscription.live.recv()).await {
            Ok(Ok(_) | Err(RecvError::Lagged(_))) => {}
            Ok(Err(RecvError::Closed)) => {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the stream ended before its first document",
                );
            }
            Err(_) => {
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("the upstream sent no document within {wait:?}"),
                );
            }
        }
    }
}

//! The proxy mode's routes: `GET /{upstream URL}` in the Streamdata.io dialect, and the native
//! view `GET /streams/~{id}` of a dynamic stream.

use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use tokio::sync::broadcast::error::RecvError;

use super::{AppState, error_response, snapshot_json};
use crate::proxy::target::TOKEN_PARAM;
use crate::proxy::{Opened, Refusal};
use crate::sinks::sse::{self, SseOptions};
use crate::wire::Dialect;

/// The response header naming the dynamic stream a request was subscribed to.
pub const STREAM_HEADER: &str = "x-patchwire-stream";

/// `GET /{upstream URL}`: the dynamic stream of that URL, as Streamdata.io clients expect it:
/// a 200 SSE response whatever happens, errors included, or with `Accept: application/json`
/// the current document once.
pub async fn dynamic(state: Arc<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    let json = sse::wants_json(&headers);
    let Some(proxy) = &state.proxy else {
        return refused(&Refusal::Disabled, json, sse::streamdata_dialect(true));
    };
    let dialect = sse::streamdata_dialect(proxy.settings().ascii_only);
    let opened = match proxy.open(uri.path(), uri.query(), &headers).await {
        Ok(opened) => opened,
        Err(refusal) => return refused(&refusal, json, dialect),
    };
    if json {
        // The first poll of a new stream may wait for its rate limit and take its timeout.
        let wait = proxy.settings().timeout * 2 + Duration::from_secs(1);
        return snapshot_once(opened, &headers, wait).await;
    }
    let options = SseOptions {
        retry: state.retry_hint,
        gzip: sse::accepts_gzip(&headers),
        dialect,
    };
    stream_response(opened, options)
}

/// `GET /streams/~{id}`: a dynamic stream in patchwire's own dialect (`snapshot`/`patch`/
/// `error`, `Last-Event-ID` replays missed patches), under the same token rules.
pub fn native_view(
    state: &AppState,
    name: &str,
    query: Option<&str>,
    last_event_id: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    let Some(proxy) = &state.proxy else {
        return error_response(StatusCode::NOT_FOUND, Refusal::Disabled.to_string());
    };
    let token = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k.eq_ignore_ascii_case(TOKEN_PARAM))
            .map(|(_, v)| v.into_owned())
    });
    let resume = sse::resume_point(headers, last_event_id);
    let opened = match proxy.view(name, &resume, token.as_deref(), headers) {
        Ok(opened) => opened,
        Err(refusal) => return refusal_status(&refusal),
    };
    if sse::wants_json(headers) {
        let response = snapshot_json(opened.subscription.stream(), headers);
        return naming_stream(response, &opened.stream);
    }
    let options = SseOptions {
        retry: state.retry_hint,
        gzip: sse::accepts_gzip(headers),
        dialect: Dialect::Native,
    };
    stream_response(opened, options)
}

fn stream_response(opened: Opened, options: SseOptions) -> Response {
    let Opened {
        subscription,
        stream,
        hold,
    } = opened;
    naming_stream(sse::response_holding(subscription, options, hold), &stream)
}

/// `response` with the header naming the dynamic stream it comes from.
fn naming_stream(mut response: Response, stream: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(stream) {
        response.headers_mut().insert(STREAM_HEADER, value);
    }
    response
}

/// A refusal: an SSE `error` event on a 200 response, or a plain JSON error with the status
/// for JSON clients.
fn refused(refusal: &Refusal, json: bool, dialect: Dialect) -> Response {
    if json {
        return refusal_status(refusal);
    }
    sse::refusal(refusal, dialect)
}

fn refusal_status(refusal: &Refusal) -> Response {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = error_response(status, refusal.to_string());
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(sse::REFUSAL_RETRY.as_secs()),
        );
    }
    response
}

/// Snapshot-only mode: the current document once, waiting up to `wait` for a new stream's
/// first poll. The subscription is dropped afterwards and the stream lingers.
async fn snapshot_once(opened: Opened, headers: &HeaderMap, wait: Duration) -> Response {
    let Opened {
        mut subscription,
        hold: _hold,
        stream: name,
    } = opened;
    let stream = subscription.stream().clone();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if stream.snapshot().is_some() {
            return naming_stream(snapshot_json(&stream, headers), &name);
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

//! Request bodies read whole, within a size limit and a deadline. Every route that reads a body
//! reads it through here, after its request was authorized from the head: no client can pin a
//! buffer or a connection with a body that is too large or never finishes.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

use super::error_response;

/// The limits of one route's bodies; `setting` names the key that sets the size limit, for
/// the 413 answer.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// Largest body accepted, in bytes.
    pub max_bytes: usize,
    /// Longest time the whole body may take to arrive (`server.body_timeout`).
    pub timeout: Duration,
    /// The configuration key of `max_bytes`.
    pub setting: &'static str,
}

/// `response` with `Connection: close`, for answers given while the request body is unread
/// (the rest of it cannot be told apart from a next request).
pub fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Reads `request`'s body whole. A declared `Content-Length` over the limit is a 413 before
/// anything is read; a body that outgrows it while arriving is a 413 too, one still incomplete
/// after `timeout` a 408, one that breaks a 400. Every refusal closes the connection.
pub async fn read(request: Request, limits: BodyLimits) -> Result<Bytes, Response> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return Err(too_large(limits));
    }
    let body = request.into_body();
    match tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, limits.max_bytes)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => {
            let over = std::error::Error::source(&error)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
            if over {
                return Err(too_large(limits));
            }
            Err(closing(error_response(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {error}"),
            )))
        }
        Err(_) => Err(closing(error_response(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:?} (server.body_timeout)",
                limits.timeout
            ),
        ))),
    }
}

fn too_large(limits: BodyLimits) -> Response {
    closing(error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the body is larger than {} bytes ({})",
            limits.max_bytes, limits.setting
        ),
    ))
}

/// Middleware that reads the body whole within `limits` before the handler runs, so the
/// handler's own extractor (`Bytes`, `Json`) only sees a complete in-memory body. Layer it
/// inside the route's authorization, so a refused client's body is never read.
pub async fn buffered(limits: BodyLimits, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match read(Request::from_parts(parts.clone(), body), limits).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(refusal) => refusal,
    }
}

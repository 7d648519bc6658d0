//! The push source: `POST /streams/{name}` (a new document) and `PATCH /streams/{name}` (an
//! RFC 6902 patch to the current document), for publishers that push instead of being polled.
//! A pushed document goes through the same diff, history and fan-out as a polled one.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{FromRequest, Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use super::body::{self, BodyLimits, closing};
use super::{AppState, error_response};
use crate::cluster::writer::WriteError;
use crate::diff::{self, Patch};
use crate::hub::{ChangeKind, Publication, Stream};
use crate::snapshot::{MAX_DEPTH, deeper_than};

/// Who may push, and into which streams.
#[derive(Clone)]
pub struct PushAuth {
    /// The bearer token publishers send.
    pub token: String,
    /// The streams that accept pushes (`source = "push"`).
    pub streams: HashSet<String>,
}

/// Compares in time independent of where the inputs first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a push request is refused (all but `BadBody` from its head, before the body is read).
enum Refusal {
    Disabled,
    Unauthorized,
    NoStream(String),
    Polled(String),
    BadBody(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Disabled => error_response(
                StatusCode::FORBIDDEN,
                "the push source is disabled: add a [push] table with a token and a stream with source = \"push\"",
            ),
            Refusal::Unauthorized => {
                let mut response = error_response(
                    StatusCode::UNAUTHORIZED,
                    "expected `Authorization: Bearer <token>` with the [push] token",
                );
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                response
            }
            Refusal::NoStream(name) => error_response(
                StatusCode::NOT_FOUND,
                format!("no stream named {name:?}; GET /streams lists them"),
            ),
            Refusal::BadBody(message) => error_response(StatusCode::BAD_REQUEST, message),
            Refusal::Polled(name) => error_response(
                StatusCode::CONFLICT,
                format!(
                    "stream {name:?} is polled from its upstream; only streams with source = \"push\" accept POST/PATCH"
                ),
            ),
        }
    }
}

/// The stream to push into.
fn authorize(state: &AppState, name: &str, headers: &HeaderMap) -> Result<Arc<Stream>, Refusal> {
    let push = state.push_auth().ok_or(Refusal::Disabled)?;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !presented.is_some_and(|t| constant_time_eq(t.as_bytes(), push.token.as_bytes())) {
        return Err(Refusal::Unauthorized);
    }
    let stream = state
        .hub
        .get(name)
        .ok_or_else(|| Refusal::NoStream(name.to_owned()))?;
    if !push.streams.contains(name) {
        return Err(Refusal::Polled(name.to_owned()));
    }
    Ok(stream)
}

/// The stream a request was authorized to push into, put in the request's extensions by
/// [`authorize_head`] before anything reads the body.
#[derive(Clone)]
pub struct Authorized(pub Arc<Stream>);

/// Middleware on the push routes: decides from the request head alone (token, stream, source)
/// whether the push may proceed. A refusal is answered without reading the body, so an
/// unauthenticated client gets no `100 Continue` (hyper sends it only when the body is first
/// polled) and pins no memory; the connection is closed after it, as its unread body cannot be
/// told apart from a next request.
pub async fn authorize_head(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    mut request: Request,
    next: Next,
) -> Response {
    match authorize(&state, &name, request.headers()) {
        Ok(stream) => {
            request.extensions_mut().insert(Authorized(stream));
            next.run(request).await
        }
        Err(refusal) => closing(refusal.into_response()),
    }
}

/// A pushed body, read in full within `server.body_timeout` and up to `push.max_body` bytes
/// (see [`super::body::read`]).
pub struct PushBody(pub Bytes);

impl FromRequest<Arc<AppState>> for PushBody {
    type Rejection = Response;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, Response> {
        let limits = BodyLimits {
            max_bytes: state.push_max_body,
            timeout: state.body_timeout,
            setting: "push.max_body",
        };
        body::read(request, limits).await.map(PushBody)
    }
}

/// `body` parsed as `T`, `expected` naming what the body must be.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        if e.to_string().starts_with("recursion limit exceeded") {
            Refusal::BadBody(format!(
                "{expected}: it nests deeper than {MAX_DEPTH} levels of arrays and objects, the \
                 most a document may have"
            ))
        } else {
            Refusal::BadBody(format!("{expected}: {e}"))
        }
    })
}

fn published(stream: &Stream, publication: &Publication) -> Response {
    let (change, seq) = match publication {
        Publication::Published(change) => (
            match change.kind {
                ChangeKind::Patch => "patch",
                ChangeKind::Snapshot => "snapshot",
            },
            change.seq,
        ),
        Publication::Unchanged => ("none", stream.seq()),
        Publication::Ignored => ("ignored", stream.seq()),
    };
    axum::Json(json!({"stream": stream.name(), "seq": seq, "change": change})).into_response()
}

/// The answer to a publication once it is durable: with webhooks configured, a 2xx is sent
/// only after the stream's changes up to the current one are committed to the outbox (its
/// deliveries queued, the document stored), so a publisher told "accepted" can rely on it.
async fn answer_durably(state: &AppState, stream: &Stream, publication: &Publication) -> Response {
    if let Some(webhooks) = &state.webhooks {
        let seq = match publication {
            Publication::Published(change) => change.seq,
            // Unchanged or ignored: a retry of a push whose first answer was a 503 is
            // answered 2xx only once the document it left is durable.
            Publication::Unchanged | Publication::Ignored => stream.seq(),
        };
        if let Err(error) = webhooks.committed(stream.name(), seq).await {
            tracing::error!(stream = stream.name(), seq, %error, "a pushed change is not durable yet");
            let mut response = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the change was published to subscribers but not yet stored durably ({error}); \
                     retry the request (POSTing the same document again is safe)"
                ),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
    }
    published(stream, publication)
}

fn join_failed(error: tokio::task::JoinError) -> Response {
    tracing::error!(%error, "publishing a pushed document failed");
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "publishing failed; see the server log",
    )
}

/// `POST /streams/{name}`: the body is the stream's new document.
pub async fn post_document(
    State(state): State<Arc<AppState>>,
    Extension(Authorized(stream)): Extension<Authorized>,
    PushBody(body): PushBody,
) -> Response {
    let document: Value = match parse(&body, "the body is not a JSON document") {
        Ok(document) => document,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(writer) = state.cluster_writer(stream.name()) {
        // In a cluster the change is durable once the log holds it.
        return match writer.publish(document).await {
            Ok(publication) => published(&stream, &publication),
            Err(error) => cluster_refusal(error, |()| unreachable_refusal()),
        };
    }
    let publisher = stream.clone();
    match tokio::task::spawn_blocking(move || publisher.publish(document)).await {
        Ok(publication) => answer_durably(&state, &stream, &publication).await,
        Err(error) => join_failed(error),
    }
}

/// Why a pushed patch was not published.
enum PatchRefusal {
    NoDocument,
    DoesNotApply(diff::ApplyError),
    TooCostly(diff::BoundedApplyError),
    TooDeep,
}

/// The document `patch` makes of `current`, bounded in work and depth. A copy: a refused
/// patch leaves the current document as it was.
fn patched(current: Option<&Value>, patch: &Patch) -> Result<Value, PatchRefusal> {
    let mut document = current.cloned().ok_or(PatchRefusal::NoDocument)?;
    diff::apply_bounded(&mut document, patch, diff::MAX_APPLY_WORK).map_err(|e| match e {
        diff::BoundedApplyError::Apply(e) => PatchRefusal::DoesNotApply(e),
        too_costly => PatchRefusal::TooCostly(too_costly),
    })?;
    // Each request's values are within the parser's depth, but paths reach into the
    // document: successive patches could otherwise deepen it without bound.
    if deeper_than(&document, MAX_DEPTH) {
        return Err(PatchRefusal::TooDeep);
    }
    Ok(document)
}

/// `PATCH /streams/{name}`: the body is an RFC 6902 patch applied atomically to the current
/// document; the result is published like any new document (so subscribers get a minimal,
/// root-safe patch whatever operations the publisher used). In a cluster, a patch that
/// another node's change overtakes is applied again to the newer document (compare-and-set on
/// the sequence number): never to a stale one, never lost.
pub async fn patch_document(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Extension(Authorized(stream)): Extension<Authorized>,
    PushBody(body): PushBody,
) -> Response {
    let patch: Patch = match parse(
        &body,
        "expected an RFC 6902 patch (a JSON array of operations)",
    ) {
        Ok(patch) => patch,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(writer) = state.cluster_writer(stream.name()) {
        let make = Arc::new(move |current: Option<&Value>| patched(current, &patch));
        return match writer.publish_with(make).await {
            Ok(publication) => published(&stream, &publication),
            Err(error) => cluster_refusal(error, |refusal| patch_refusal(&name, refusal)),
        };
    }
    let publisher = stream.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        publisher.publish_with(|current| patched(current, &patch))
    })
    .await;
    match outcome {
        Ok(Ok(publication)) => answer_durably(&state, &stream, &publication).await,
        Ok(Err(refusal)) => patch_refusal(&name, refusal),
        Err(error) => join_failed(error),
    }
}

fn patch_refusal(name: &str, refusal: PatchRefusal) -> Response {
    match refusal {
        PatchRefusal::NoDocument => error_response(
            StatusCode::CONFLICT,
            format!("stream {name:?} has no document to patch yet; POST one first"),
        ),
        PatchRefusal::DoesNotApply(e) => error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the patch does not apply to the current document (nothing was published): {e}"
            ),
        ),
        PatchRefusal::TooCostly(e) => error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the patch is too costly to apply (nothing was published): {e}; send fewer \
                 operations per request, or POST the whole document"
            ),
        ),
        PatchRefusal::TooDeep => error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the patched document would nest deeper than {MAX_DEPTH} levels of arrays and \
                 objects, the most a document may have (nothing was published)"
            ),
        ),
    }
}

/// A push the cluster's log did not take.
fn cluster_refusal<E>(error: WriteError<E>, refused: impl FnOnce(E) -> Response) -> Response {
    match error {
        WriteError::Refused(e) => refused(e),
        WriteError::Unavailable(error) => {
            tracing::warn!(%error, "a push could not reach the cluster's log");
            unreachable_refusal()
        }
        WriteError::Stale => {
            let mut response = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "another node of the cluster was reloaded with another configuration of this \
                 stream, and this one not yet: nothing was published; retry (or push to a \
                 reloaded node)",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        WriteError::Contended | WriteError::Fenced => {
            let mut response = error_response(
                StatusCode::CONFLICT,
                "other publishers kept changing the stream; nothing was published, retry",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

fn unreachable_refusal() -> Response {
    let mut response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "the cluster's log (Redis) is unreachable; nothing was published, retry",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnoq"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}

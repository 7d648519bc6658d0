//! `POST /admin/reload`: load the configuration file again and apply it (see
//! [`crate::config::changes`] for what applies live). Authorized by the admin token
//! (`webhooks.admin_token`); `SIGHUP` does the same without one.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::Value;

use super::{AppState, error_response};

/// What a reload answered: its HTTP status and JSON body (the log says the same).
#[derive(Debug, Clone)]
pub struct ReloadAnswer {
    /// `200` applied, `422` the file is invalid, `409` a section needs a restart, `400` no file.
    pub status: StatusCode,
    /// What changed, or why nothing did.
    pub body: Value,
}

/// Reloads the configuration: the application implements it, the route and `SIGHUP` call it.
pub trait Reload: Send + Sync {
    /// Loads the file again and applies it, or refuses it changing nothing. Reloads run one at
    /// a time: a second waits for the first.
    fn reload(&self) -> BoxFuture<'_, ReloadAnswer>;
}

/// Compares in time independent of where the inputs first differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /admin/reload`.
pub async fn reload(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let Some(token) = &state.admin_token else {
        return error_response(
            StatusCode::FORBIDDEN,
            "reloading over HTTP is disabled: set webhooks.admin_token (SIGHUP reloads without \
             it)",
        );
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !presented.is_some_and(|p| same(p.as_bytes(), token.0.as_bytes())) {
        let mut response = error_response(
            StatusCode::UNAUTHORIZED,
            "expected an `Authorization: Bearer <webhooks.admin_token>` header",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let Some(reloader) = &state.reload else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "this server was not started from a configuration file: there is nothing to reload",
        );
    };
    let answer = reloader.reload().await;
    (answer.status, axum::Json(answer.body)).into_response()
}

//! The WebSocket protocol's messages (pure): what a client may send, parsed with a clear
//! refusal for anything else, and the server's per-connection answers. The stream events
//! (`snapshot`, `patch`, `error`, `recovered`) are built once per event in `wire::websocket`.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::wire::Refusal;

/// Longest client-chosen subscription id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// What a subscription is to: the thing a client names in `subscribe`. (A `view` field will
/// name a view of a stream.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A configured stream (`fleet`) or a dynamic stream's native name (`~3f…`).
    Stream(String),
    /// A proxy-mode upstream URL, as `GET /{url}` names it (its query may carry `X-Sd-Header`).
    Url(String),
    /// A view of a configured stream: `query` as `GET /streams/{stream}?{query}` would say it
    /// (`view=<name>`, or filters such as `route=Red&fields=…`).
    View {
        /// The stream's name.
        stream: String,
        /// The view, in the query string's syntax.
        query: String,
    },
}

/// A message from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// Start a subscription named `id`.
    Subscribe {
        /// The client's name for the subscription, unique on the connection.
        id: String,
        /// What to subscribe to.
        target: Target,
        /// Resume after this event id (as `Last-Event-ID`).
        last_event_id: Option<String>,
    },
    /// End the subscription named `id`.
    Unsubscribe {
        /// The subscription's id.
        id: String,
    },
    /// Answered by a `pong` carrying the same `data`.
    Ping {
        /// Anything the client wants echoed.
        data: Option<Value>,
    },
    /// The application token, as the first message (for clients that keep it out of URLs).
    Auth {
        /// The token.
        token: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscribe {
    #[serde(rename = "type")]
    _type: String,
    id: String,
    stream: Option<String>,
    url: Option<String>,
    view: Option<String>,
    filter: Option<String>,
    last_event_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnsubscribe {
    #[serde(rename = "type")]
    _type: String,
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPing {
    #[serde(rename = "type")]
    _type: String,
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(rename = "type")]
    _type: String,
    token: String,
}

/// A message that is not one the protocol knows, and the id it named (if it could be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The `id` of the message, when it had a readable one.
    pub id: Option<String>,
    /// What is wrong with it.
    pub message: String,
}

impl Invalid {
    /// The refusal the client is sent.
    pub fn refusal(&self) -> Refusal {
        Refusal {
            status: 400,
            cause: "invalid-message",
            message: self.message.clone(),
        }
    }
}

/// Parses one text message from a client.
pub fn parse(text: &str) -> Result<ClientMessage, Invalid> {
    let value: Value = serde_json::from_str(text).map_err(|e| Invalid {
        id: None,
        message: format!("expected a JSON object, got invalid JSON: {e}"),
    })?;
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .filter(|id| id.len() <= MAX_ID_BYTES);
    let invalid = |message: String| Invalid {
        id: id.clone(),
        message,
    };
    let Some(kind) = value.get("type").and_then(Value::as_str) else {
        return Err(invalid(
            "expected an object with a \"type\": \"subscribe\", \"unsubscribe\", \"ping\" or \
             \"auth\""
                .into(),
        ));
    };
    let fields = |e: serde_json::Error| invalid(format!("{kind}: {e}"));
    match kind {
        "subscribe" => {
            let raw: RawSubscribe = serde_json::from_value(value.clone()).map_err(fields)?;
            check_id(&raw.id).map_err(invalid)?;
            let view = match (raw.view, raw.filter) {
                (None, None) => None,
                (Some(view), None) => Some(format!(
                    "view={}",
                    percent_encoding::utf8_percent_encode(
                        &view,
                        percent_encoding::NON_ALPHANUMERIC
                    )
                )),
                (None, Some(filter)) => Some(filter),
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "subscribe: expected at most one of \"view\" (a configured view's name) \
                         or \"filter\" (filters as in a query string, e.g. \"route=Red\")"
                            .into(),
                    ));
                }
            };
            let target = match (raw.stream, raw.url, view) {
                (Some(stream), None, None) if !stream.is_empty() => Target::Stream(stream),
                (Some(stream), None, Some(query)) if !stream.is_empty() => {
                    Target::View { stream, query }
                }
                (None, Some(url), None) if !url.is_empty() => Target::Url(url),
                (None, Some(_), Some(_)) => {
                    return Err(invalid(
                        "subscribe: views are of configured streams (\"stream\"), not of \
                         proxy-mode URLs"
                            .into(),
                    ));
                }
                _ => {
                    return Err(invalid(
                        "subscribe: expected exactly one of \"stream\" (a stream's name) or \
                         \"url\" (a proxy-mode upstream URL), not empty"
                            .into(),
                    ));
                }
            };
            let last_event_id = raw
                .last_event_id
                .map(|id| id.trim().to_owned())
                .filter(|id| !id.is_empty());
            Ok(ClientMessage::Subscribe {
                id: raw.id,
                target,
                last_event_id,
            })
        }
        "unsubscribe" => {
            let raw: RawUnsubscribe = serde_json::from_value(value.clone()).map_err(fields)?;
            check_id(&raw.id).map_err(invalid)?;
            Ok(ClientMessage::Unsubscribe { id: raw.id })
        }
        "ping" => {
            let raw: RawPing = serde_json::from_value(value.clone()).map_err(fields)?;
            Ok(ClientMessage::Ping { data: raw.data })
        }
        "auth" => {
            let raw: RawAuth = serde_json::from_value(value.clone()).map_err(fields)?;
            Ok(ClientMessage::Auth { token: raw.token })
        }
        other => Err(invalid(format!(
            "unknown message type {other:?}; expected \"subscribe\", \"unsubscribe\", \"ping\" \
             or \"auth\""
        ))),
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(format!(
            "expected an \"id\" of 1 to {MAX_ID_BYTES} bytes, got {} bytes",
            id.len()
        ));
    }
    Ok(())
}

/// `subscribed`: the subscription `id` is open on `stream`; its events follow, each naming
/// `stream`.
pub fn subscribed(id: &str, stream: &str) -> String {
    json!({"type": "subscribed", "id": id, "stream": stream}).to_string()
}

/// `refused`: a message (the subscription `id`, when it named one) was refused, with the same
/// status and cause as an SSE refusal.
pub fn refused(id: Option<&str>, refusal: &Refusal) -> String {
    let mut message = json!({
        "type": "refused",
        "status": refusal.status,
        "cause": refusal.cause,
        "message": refusal.message,
    });
    if let Some(id) = id {
        message["id"] = Value::from(id);
    }
    message.to_string()
}

/// `unsubscribed`: the subscription `id` is closed; nothing more is sent for it.
pub fn unsubscribed(id: &str, stream: &str) -> String {
    json!({"type": "unsubscribed", "id": id, "stream": stream}).to_string()
}

/// `ended`: the stream of subscription `id` ended (the server is stopping, or a dynamic stream
/// was evicted, after an `error` saying why); the subscription is closed.
pub fn ended(id: &str, stream: &str) -> String {
    json!({"type": "ended", "id": id, "stream": stream}).to_string()
}

/// `authenticated`: the connection holds the token named `name`.
pub fn authenticated(name: &str) -> String {
    json!({"type": "authenticated", "token": name}).to_string()
}

/// `pong`, echoing a ping's `data`.
pub fn pong(data: Option<Value>) -> String {
    match data {
        Some(data) => json!({"type": "pong", "data": data}).to_string(),
        None => json!({"type": "pong"}).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_message_and_refuses_the_rest_clearly() {
        assert_eq!(
            parse(r#"{"type":"subscribe","id":"s1","stream":"fleet","last_event_id":"fleet:1:2"}"#),
            Ok(ClientMessage::Subscribe {
                id: "s1".into(),
                target: Target::Stream("fleet".into()),
                last_event_id: Some("fleet:1:2".into()),
            })
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","id":"p","url":"https://a.example/x?y=1"}"#),
            Ok(ClientMessage::Subscribe {
                id: "p".into(),
                target: Target::Url("https://a.example/x?y=1".into()),
                last_event_id: None,
            })
        );
        assert_eq!(
            parse(r#"{"type":"unsubscribe","id":"s1"}"#),
            Ok(ClientMessage::Unsubscribe { id: "s1".into() })
        );
        assert_eq!(
            parse(r#"{"type":"ping","data":{"n":1}}"#),
            Ok(ClientMessage::Ping {
                data: Some(json!({"n": 1}))
            })
        );
        assert_eq!(
            parse(r#"{"type":"auth","token":"t"}"#),
            Ok(ClientMessage::Auth { token: "t".into() })
        );
        let refused = |text: &str| parse(text).expect_err(text);
        assert!(refused("nope").message.contains("invalid JSON"));
        assert!(refused("[1]").message.contains("\"type\""));
        let both = refused(r#"{"type":"subscribe","id":"a","stream":"x","url":"http://y/"}"#);
        assert_eq!(both.id.as_deref(), Some("a"));
        assert!(both.message.contains("exactly one"), "{}", both.message);
        assert!(
            refused(r#"{"type":"subscribe","id":"a","stream":"x","views":"v"}"#)
                .message
                .contains("unknown field `views`")
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","id":"a","stream":"x","view":"red line"}"#),
            Ok(ClientMessage::Subscribe {
                id: "a".into(),
                target: Target::View {
                    stream: "x".into(),
                    query: "view=red%20line".into()
                },
                last_event_id: None,
            })
        );
        assert!(
            refused(r#"{"type":"subscribe","id":"a","stream":"x","view":"v","filter":"a=1"}"#)
                .message
                .contains("at most one")
        );
        assert!(
            refused(r#"{"type":"subscribe","id":"a","url":"http://x/","filter":"a=1"}"#)
                .message
                .contains("configured streams")
        );
        assert!(
            refused(r#"{"type":"subscribe","id":"","stream":"x"}"#)
                .message
                .contains("1 to 64 bytes")
        );
        assert!(
            refused(r#"{"type":"subscribe","stream":"x"}"#)
                .message
                .contains("missing field `id`")
        );
        assert!(
            refused(r#"{"type":"dance"}"#)
                .message
                .contains("unknown message type")
        );
    }

    #[test]
    fn answers_are_json_objects() {
        let refusal = Refusal {
            status: 404,
            cause: "no-such-stream",
            message: "no".into(),
        };
        let value: Value = serde_json::from_str(&refused(Some("s"), &refusal)).unwrap();
        assert_eq!(
            value,
            json!({"type": "refused", "id": "s", "status": 404, "cause": "no-such-stream", "message": "no"})
        );
        assert_eq!(pong(None), r#"{"type":"pong"}"#);
        assert_eq!(
            subscribed("s", "fleet"),
            r#"{"type":"subscribed","id":"s","stream":"fleet"}"#
        );
    }
}

//! A WebSocket client of `GET /ws` (tokio-tungstenite) and the documents it rebuilds, one per
//! stream, from the messages of several subscriptions on one connection.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::sse::{Rebuilt, SseEvent};
use super::{SOON, TestApp};

/// A connected WebSocket client.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code and reason.
    Closed(u16, String),
    /// The connection ended without a close frame.
    Dropped,
}

impl WsClient {
    /// Opens `ws://{app}/ws{query}` with extra request headers; panics if the handshake fails.
    pub async fn connect(app: &TestApp, query: &str, headers: &[(&str, &str)]) -> WsClient {
        Self::try_connect(app, query, headers)
            .await
            .unwrap_or_else(|e| panic!("websocket handshake failed: {e}"))
    }

    /// Opens `ws://{app}/ws{query}`; the handshake's failure, if it fails.
    pub async fn try_connect(
        app: &TestApp,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        let mut request = format!("ws://{}/ws{query}", app.addr)
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(WsClient { ws })
    }

    /// Sends a JSON message.
    pub async fn send(&mut self, message: Value) {
        self.ws
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    /// Sends a raw message.
    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// `{"type":"subscribe","id":id,"stream":stream}`, with `last_event_id` when given.
    pub async fn subscribe(&mut self, id: &str, stream: &str, last_event_id: Option<&str>) {
        let mut message = json!({"type": "subscribe", "id": id, "stream": stream});
        if let Some(last) = last_event_id {
            message["last_event_id"] = Value::from(last);
        }
        self.send(message).await;
    }

    /// The next JSON message within `timeout` (pings and pongs are skipped); `None` at the
    /// end of the connection or the timeout.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??
                .ok()?;
            match message {
                Message::Text(text) => {
                    return Some(serde_json::from_str(&text).unwrap_or_else(|e| {
                        panic!("a message is not JSON ({e}): {text}");
                    }));
                }
                Message::Close(_) => return None,
                _ => {}
            }
        }
    }

    /// The next JSON message; panics if none arrives soon.
    pub async fn expect(&mut self) -> Value {
        self.next(SOON).await.expect("a message")
    }

    /// Reads messages until one of type `kind` arrives; returns it.
    pub async fn until(&mut self, kind: &str) -> Value {
        loop {
            let message = self.expect().await;
            if message["type"] == kind {
                return message;
            }
        }
    }

    /// Reads until the connection ends (within `timeout`); how it ended.
    pub async fn ended(&mut self, timeout: Duration) -> Ended {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("the connection did not end within {timeout:?}"),
                Ok(None | Some(Err(_))) => return Ended::Dropped,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return match frame {
                        Some(f) => Ended::Closed(u16::from(f.code), f.reason.to_string()),
                        None => Ended::Closed(1005, String::new()),
                    };
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Closes the connection (code 1000) and waits for the server's answer.
    pub async fn close(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        let _ = self.ws.close(Some(frame)).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(SOON, self.ws.next()).await {}
    }
}

/// The documents of several streams rebuilt from one connection's messages.
#[derive(Debug, Default)]
pub struct WsDocuments {
    /// By stream name.
    pub streams: HashMap<String, Rebuilt>,
}

impl WsDocuments {
    /// Applies an event message (`snapshot`, `patch`, `error`, `recovered`) to its stream's
    /// document; returns false for other messages.
    pub fn apply(&mut self, message: &Value) -> bool {
        let kind = message["type"].as_str().unwrap_or_default();
        if !["snapshot", "patch", "error", "recovered"].contains(&kind) {
            return false;
        }
        let stream = message["stream"]
            .as_str()
            .expect("an event names its stream");
        let event = SseEvent {
            id: message["id"]
                .as_str()
                .expect("an event has an id")
                .to_owned(),
            event: kind.to_owned(),
            data: message["data"].to_string(),
        };
        self.streams
            .entry(stream.to_owned())
            .or_default()
            .apply(&event);
        true
    }

    /// The rebuilt document of `stream`.
    pub fn document(&self, stream: &str) -> Option<&Value> {
        self.streams.get(stream)?.document.as_ref()
    }

    /// Applies messages until every `(stream, document)` of `targets` holds (true), or
    /// `timeout` passes (false). Other messages are returned for the caller to check.
    pub async fn converge(
        &mut self,
        client: &mut WsClient,
        targets: &[(&str, &Value)],
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !targets
            .iter()
            .all(|(stream, doc)| self.document(stream) == Some(doc))
        {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match client.next(left).await {
                Some(message) => {
                    assert!(self.apply(&message), "unexpected message {message}");
                }
                None => return false,
            }
        }
        true
    }
}

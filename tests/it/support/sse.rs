//! An SSE client over a real socket, parsing with an off-the-shelf parser (`eventsource-stream`),
//! and a document that rebuilds itself from the events it receives.

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, StatusCode};
use serde_json::Value;

/// One received SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `id:` (empty when absent).
    pub id: String,
    /// `event:`.
    pub event: String,
    /// `data:` joined by newlines.
    pub data: String,
}

impl SseEvent {
    /// `data` parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>;

/// A connected SSE subscriber.
pub struct SseClient {
    /// The response status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    events: Events,
}

impl SseClient {
    /// Connects to `url` with extra request headers. `gzip` lets the client negotiate and
    /// transparently decode gzip (reqwest decodes it incrementally).
    pub async fn connect(url: &str, headers: &[(&str, &str)], gzip: bool) -> SseClient {
        let client = reqwest::Client::builder().gzip(gzip).build().unwrap();
        SseClient::connect_with(&client, url, headers).await
    }

    /// Connects with an existing HTTP client (building one per subscriber is slow: many
    /// subscribers should share one; each stream still gets its own connection).
    pub async fn connect_with(
        client: &reqwest::Client,
        url: &str,
        headers: &[(&str, &str)],
    ) -> SseClient {
        let mut request = client.get(url);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let headers = response.headers().clone();
        let events = response
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string()))
            .boxed();
        SseClient {
            status,
            headers,
            events,
        }
    }

    /// An SSE client over an already received response head and its body.
    pub fn from_body<S, E>(status: StatusCode, headers: HeaderMap, body: S) -> SseClient
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let events = body
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string()))
            .boxed();
        SseClient {
            status,
            headers,
            events,
        }
    }

    /// The next event within `timeout`; `None` if the stream ended or nothing came in time.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        match tokio::time::timeout(timeout, self.events.next()).await {
            Ok(Some(Ok(e))) => Some(SseEvent {
                id: e.id,
                event: e.event,
                data: e.data,
            }),
            Ok(Some(Err(e))) => panic!("SSE stream error: {e}"),
            Ok(None) | Err(_) => None,
        }
    }

    /// The next event, failing the test if none comes within `timeout`.
    pub async fn expect(&mut self, timeout: Duration) -> SseEvent {
        self.next(timeout)
            .await
            .unwrap_or_else(|| panic!("no SSE event within {timeout:?}"))
    }

    /// Reads to the end of the stream: `Ok` with the events read if the server ended it
    /// cleanly within `timeout`, `Err` if the stream broke or was still open.
    pub async fn end(&mut self, timeout: Duration) -> Result<Vec<SseEvent>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.events.next()).await {
                Ok(None) => return Ok(events),
                Ok(Some(Ok(e))) => events.push(SseEvent {
                    id: e.id,
                    event: e.event,
                    data: e.data,
                }),
                Ok(Some(Err(e))) => return Err(format!("the stream broke: {e}")),
                Err(_) => return Err(format!("still open after {timeout:?}")),
            }
        }
    }

    /// True once the server ended the stream (within `timeout`), skipping any events.
    pub async fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.next()).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// A subscriber's copy of the document, rebuilt from `snapshot` (or Streamdata.io's `data`)
/// and `patch` events.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// The document so far (`None` before the first snapshot).
    pub document: Option<Value>,
    /// The id of the last event applied.
    pub last_id: String,
    /// Events applied, by kind.
    pub snapshots: usize,
    /// Patches applied.
    pub patches: usize,
    /// Errors seen.
    pub errors: Vec<Value>,
    /// `recovered` events seen.
    pub recoveries: Vec<Value>,
}

impl Rebuilt {
    /// Applies one event; panics if a patch arrives with no base or does not apply.
    pub fn apply(&mut self, event: &SseEvent) {
        match event.event.as_str() {
            "snapshot" | "data" => {
                self.document = Some(event.json());
                self.snapshots += 1;
            }
            "patch" => {
                let doc = self
                    .document
                    .as_mut()
                    .expect("a patch arrived before any snapshot");
                let patch: json_patch::Patch =
                    serde_json::from_str(&event.data).expect("patch is RFC 6902");
                json_patch::patch(doc, &patch)
                    .unwrap_or_else(|e| panic!("patch {} does not apply: {e}", event.data));
                self.patches += 1;
            }
            "error" => self.errors.push(event.json()),
            "recovered" => self.recoveries.push(event.json()),
            other => panic!("unexpected event {other:?}"),
        }
        if !event.id.is_empty() {
            self.last_id = event.id.clone();
        }
    }

    /// Applies events until the document equals `target` (true) or `timeout` passes (false).
    pub async fn converge(
        &mut self,
        client: &mut SseClient,
        target: &Value,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.document.as_ref() != Some(target) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match client.next(left).await {
                Some(e) => self.apply(&e),
                None => return false,
            }
        }
        true
    }
}

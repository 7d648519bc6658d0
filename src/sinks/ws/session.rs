//! One WebSocket connection: its messages, its subscriptions' events, pings, bounds, close.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::{AbortHandle, Abortable, SelectAll};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::config::WebSocketSettings;
use super::protocol::{self, ClientMessage, Target};
use super::{Streams, close};
use crate::hub::Resume;
use crate::metrics::{CloseLabels, Metrics, RefusalLabels};
use crate::sinks::sse::{SseOptions, Writer};
use crate::wire::{Dialect, Refusal, websocket};

/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// The read buffer of a connection: clients send small messages, and an idle connection
/// should cost little (tungstenite's default is 128 KiB, all of it touched on the first read).
const READ_BUFFER: usize = 512;
/// Events sent in a row before the client's messages get their turn.
const LIVE_STREAK: u32 = 32;
/// Most bytes of protocol replies (pongs, the close echo) tungstenite may queue between two
/// reads; the message budget keeps it far below.
const MAX_REPLIES: usize = 64 * 1024;

/// Serves WebSocket connections over `S`'s streams, with their bounds and metrics.
pub struct WebSockets<S> {
    settings: WebSocketSettings,
    streams: Arc<S>,
    metrics: Arc<Metrics>,
    stall_timeout: Duration,
}

/// What a subscription's event stream yields.
enum Item {
    /// A message to send (shared bytes of one event).
    Message(Bytes),
    /// The stream of this subscription (its id) ended.
    Ended(Arc<str>),
}

type Live = Pin<Box<dyn futures_util::Stream<Item = Item> + Send>>;

/// Why a connection ends: the close code, once the close was sent (or the socket is gone).
type Closed = u16;

/// One open subscription of a connection.
struct Open {
    stream: Arc<str>,
    abort: AbortHandle,
    _counted: Counted,
}

/// A gauge incremented while this lives.
struct Counted(Gauge);

impl Counted {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<S: Streams> WebSockets<S> {
    /// Connections over `streams`, bounded by `settings`; a connection whose socket refuses
    /// writes for `stall_timeout` is dropped.
    pub fn new(
        settings: WebSocketSettings,
        streams: Arc<S>,
        metrics: Arc<Metrics>,
        stall_timeout: Duration,
    ) -> Self {
        WebSockets {
            settings,
            streams,
            metrics,
            stall_timeout,
        }
    }

    /// The settings connections are served with.
    pub fn settings(&self) -> &WebSocketSettings {
        &self.settings
    }

    /// The protocol's bounds for reading: message and frame size, a small buffer.
    fn protocol_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(self.settings.max_message_size))
            .max_frame_size(Some(self.settings.max_message_size))
    }

    /// Serves one upgraded connection until it closes, the client leaves, or `shutdown`:
    /// `read` and `write` are its two halves, `already_read` the bytes the client sent after
    /// its handshake, `token` the one the handshake presented, if any.
    ///
    /// tungstenite reads the client's frames (unmasking, fragments, control frames, limits);
    /// the connection writes its own frames, each event as the shared bytes of its whole
    /// frame, so nothing is copied or buffered per connection (tungstenite would copy every
    /// message into a write buffer that keeps the size of the largest one sent).
    pub async fn serve<R, W>(
        &self,
        read: R,
        write: W,
        already_read: Vec<u8>,
        token: Option<String>,
        shutdown: CancellationToken,
    ) where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let _open = Counted::new(&self.metrics.websocket_connections);
        let inbound = Inbound {
            read,
            replies: Vec::new(),
        };
        let ws = WebSocketStream::from_partially_read(
            inbound,
            already_read,
            Role::Server,
            Some(self.protocol_config()),
        )
        .await;
        let mut connection = Connection {
            owner: self,
            ws,
            out: write,
            subscriptions: HashMap::new(),
            live: SelectAll::new(),
            token: None,
            admitted: None,
            budget: Budget::new(self.settings.max_messages_per_second.get(), Instant::now()),
            last_heard: Instant::now(),
        };
        let code = connection.run(token, shutdown).await;
        tracing::debug!(code, "websocket closed");
        self.metrics
            .websocket_closes
            .get_or_create(&CloseLabels { code })
            .inc();
    }
}

/// The reading side of a connection as tungstenite sees it: what it writes (pongs, the echo
/// of a client's close) is kept for the connection to send with its own frames.
struct Inbound<R> {
    read: R,
    replies: Vec<u8>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Inbound<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for Inbound<R> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replies.len() + buf.len() > MAX_REPLIES {
            return Poll::Ready(Err(io::Error::other("too many unsent protocol replies")));
        }
        self.replies.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

struct Connection<'a, S, R, W> {
    owner: &'a WebSockets<S>,
    /// The client's frames.
    ws: WebSocketStream<Inbound<R>>,
    /// Where this connection's frames go.
    out: W,
    /// By the client's subscription id.
    subscriptions: HashMap<Arc<str>, Open>,
    live: SelectAll<Abortable<Live>>,
    token: Option<String>,
    admitted: Option<Box<dyn Send>>,
    budget: Budget,
    last_heard: Instant,
}

/// What woke the connection.
enum Step {
    Shutdown,
    Received(Option<Result<Message, WsError>>),
    Live(Item),
    Tick,
}

impl<S, R, W> Connection<'_, S, R, W>
where
    S: Streams,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    async fn run(&mut self, token: Option<String>, shutdown: CancellationToken) -> Closed {
        if let Some(token) = token
            && let Err(code) = self.authenticate(token).await
        {
            return code;
        }
        let every = self.owner.settings.ping_interval;
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A token of this connection's own, waited on by one future for its whole life: the
        // server's token is shared by every connection, and registering with it at every
        // event would make them all contend for its lock.
        let shutdown = shutdown.child_token();
        let mut cancelled = std::pin::pin!(shutdown.cancelled());
        let mut streak = 0u32;
        loop {
            let step = self
                .next_step(cancelled.as_mut(), &mut ticks, streak < LIVE_STREAK)
                .await;
            streak = if matches!(step, Step::Live(_)) {
                streak + 1
            } else {
                0
            };
            let flow = match step {
                Step::Shutdown => Err(self.close(close::GOING_AWAY, "server shutting down").await),
                Step::Received(received) => self.received(received).await,
                Step::Live(item) => self.live_item(item).await,
                Step::Tick => self.tick().await,
            };
            if let Err(code) = flow {
                return code;
            }
        }
    }

    /// What to do next. With `events_first`, a ready event is taken without polling the
    /// client's side at all (the hot path is then one write); the caller lets the client's
    /// messages go first after `LIVE_STREAK` events in a row.
    async fn next_step(
        &mut self,
        mut shutdown: Pin<&mut WaitForCancellationFuture<'_>>,
        ticks: &mut tokio::time::Interval,
        events_first: bool,
    ) -> Step {
        let live = !self.live.is_empty();
        if events_first {
            tokio::select! {
                biased;
                () = &mut shutdown => Step::Shutdown,
                Some(item) = self.live.next(), if live => Step::Live(item),
                received = self.ws.next() => Step::Received(received),
                _ = ticks.tick() => Step::Tick,
            }
        } else {
            tokio::select! {
                biased;
                () = &mut shutdown => Step::Shutdown,
                received = self.ws.next() => Step::Received(received),
                Some(item) = self.live.next(), if live => Step::Live(item),
                _ = ticks.tick() => Step::Tick,
            }
        }
    }

    async fn received(&mut self, received: Option<Result<Message, WsError>>) -> Result<(), Closed> {
        // What tungstenite answered (a pong, the echo of a close) goes out first.
        self.send_replies().await?;
        let message = match received {
            None => return Err(close::ABNORMAL),
            Some(Ok(message)) => message,
            Some(Err(error)) => return Err(self.failed(error).await),
        };
        self.last_heard = Instant::now();
        if !matches!(message, Message::Close(_)) {
            // Every frame counts, pings and pongs included: none may be flooded.
            self.within_budget().await?;
        }
        match message {
            Message::Text(text) => self.text(&text).await,
            Message::Binary(_) => Err(self
                .close(
                    close::UNSUPPORTED,
                    "binary messages are not spoken: send JSON text",
                )
                .await),
            // tungstenite answered a ping (sent above).
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(frame) => Err(frame.map_or(close::NO_STATUS, |f| u16::from(f.code))),
        }
    }

    /// Closes the connection for a protocol failure, with the code that names it.
    async fn failed(&mut self, error: WsError) -> Closed {
        match error {
            WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
                let reason = format!("message of {size} bytes over the limit of {max_size}");
                self.close(close::TOO_BIG, &reason).await
            }
            WsError::Capacity(_) => self.close(close::TOO_BIG, "message too big").await,
            WsError::Utf8(_) => self.close(close::INVALID_DATA, "text is not UTF-8").await,
            WsError::Protocol(error) => {
                let reason = error.to_string();
                self.close(close::PROTOCOL, &reason).await
            }
            _ => close::ABNORMAL,
        }
    }

    /// Counts a message against the client's budget; past it, the connection is closed.
    async fn within_budget(&mut self) -> Result<(), Closed> {
        if self.budget.take(Instant::now()) {
            return Ok(());
        }
        let refusal = Refusal {
            status: 429,
            cause: "too-many-messages",
            message: format!(
                "more than {} messages per second (websocket.max_messages_per_second)",
                self.owner.settings.max_messages_per_second
            ),
        };
        self.refuse(None, &refusal).await?;
        Err(self.close(close::POLICY, refusal.cause).await)
    }

    async fn text(&mut self, text: &str) -> Result<(), Closed> {
        match protocol::parse(text) {
            Err(invalid) => self.refuse(invalid.id.as_deref(), &invalid.refusal()).await,
            Ok(ClientMessage::Subscribe {
                id,
                target,
                last_event_id,
            }) => self.subscribe(id, target, last_event_id).await,
            Ok(ClientMessage::Unsubscribe { id }) => self.unsubscribe(&id).await,
            Ok(ClientMessage::Ping { data }) => self.send_text(protocol::pong(data)).await,
            Ok(ClientMessage::Auth { token }) => {
                if self.token.is_some() || !self.subscriptions.is_empty() {
                    let refusal = Refusal {
                        status: 400,
                        cause: "invalid-message",
                        message: "auth comes once, before any subscription (or the token comes \
                                  with the handshake)"
                            .into(),
                    };
                    return self.refuse(None, &refusal).await;
                }
                self.authenticate(token).await
            }
        }
    }

    /// Admits the connection's token, or refuses it and closes the connection.
    async fn authenticate(&mut self, token: String) -> Result<(), Closed> {
        match self.owner.streams.admit(&token).await {
            Ok(admitted) => {
                self.token = Some(token);
                self.admitted = Some(admitted.hold);
                self.send_text(protocol::authenticated(&admitted.name))
                    .await
            }
            Err(refusal) => {
                self.refuse(None, &refusal).await?;
                Err(self.close(close::POLICY, refusal.cause).await)
            }
        }
    }

    async fn subscribe(
        &mut self,
        id: String,
        target: Target,
        last_event_id: Option<String>,
    ) -> Result<(), Closed> {
        let refused = |status, cause, message: String| Refusal {
            status,
            cause,
            message,
        };
        if self.subscriptions.contains_key(id.as_str()) {
            let refusal = refused(
                409,
                "duplicate-id",
                format!("a subscription named {id:?} is already open on this connection"),
            );
            return self.refuse(Some(&id), &refusal).await;
        }
        let max = self.owner.settings.max_subscriptions;
        if self.subscriptions.len() >= max {
            let refusal = refused(
                429,
                "too-many-subscriptions",
                format!(
                    "this connection holds its maximum of {max} subscriptions \
                     (websocket.max_subscriptions)"
                ),
            );
            return self.refuse(Some(&id), &refusal).await;
        }
        let resume = last_event_id.map_or(Resume::Fresh, Resume::After);
        let opened = match self
            .owner
            .streams
            .open(&target, &resume, self.token.as_deref())
            .await
        {
            Ok(opened) => opened,
            Err(refusal) => return self.refuse(Some(&id), &refusal).await,
        };
        let stream: Arc<str> = Arc::from(opened.subscription.stream().name());
        if let Some((other, _)) = self.subscriptions.iter().find(|(_, o)| o.stream == stream) {
            let refusal = refused(
                409,
                "already-subscribed",
                format!(
                    "this connection already subscribes to stream {stream:?} (as {other:?}): \
                     events name their stream, so a connection subscribes to a stream once"
                ),
            );
            drop(opened);
            return self.refuse(Some(&id), &refusal).await;
        }
        let id: Arc<str> = Arc::from(id);
        self.send_text(protocol::subscribed(&id, &stream)).await?;
        let options = SseOptions {
            retry: Duration::ZERO,
            gzip: None,
            dialect: Dialect::WebSocket,
        };
        let writer = Writer::new(opened.subscription, options);
        let resyncs = self.owner.metrics.websocket_resyncs.clone();
        let (live, abort) =
            futures_util::stream::abortable(follow(id.clone(), writer, opened.hold, resyncs));
        self.live.push(live);
        self.subscriptions.insert(
            id,
            Open {
                stream,
                abort,
                _counted: Counted::new(&self.owner.metrics.websocket_subscriptions),
            },
        );
        Ok(())
    }

    async fn unsubscribe(&mut self, id: &str) -> Result<(), Closed> {
        let Some(open) = self.subscriptions.remove(id) else {
            let refusal = Refusal {
                status: 404,
                cause: "no-such-subscription",
                message: format!("no subscription named {id:?} is open on this connection"),
            };
            return self.refuse(Some(id), &refusal).await;
        };
        // Its stream yields nothing more: the next poll drops it (and what it holds).
        open.abort.abort();
        self.send_text(protocol::unsubscribed(id, &open.stream))
            .await
    }

    async fn live_item(&mut self, item: Item) -> Result<(), Closed> {
        match item {
            Item::Message(frame) => self.send(&frame).await,
            Item::Ended(id) => match self.subscriptions.remove(&id) {
                Some(open) => self.send_text(protocol::ended(&id, &open.stream)).await,
                None => Ok(()),
            },
        }
    }

    /// Pings, or closes a connection the client has been silent on for too long.
    async fn tick(&mut self) -> Result<(), Closed> {
        let idle = self.owner.settings.idle_timeout;
        if self.last_heard.elapsed() >= idle {
            return Err(self.close(close::IDLE, "idle-timeout").await);
        }
        self.write(&websocket::PING).await
    }

    async fn refuse(&mut self, id: Option<&str>, refusal: &Refusal) -> Result<(), Closed> {
        self.owner
            .metrics
            .websocket_refusals
            .get_or_create(&RefusalLabels {
                cause: refusal.cause,
            })
            .inc();
        self.send_text(protocol::refused(id, refusal)).await
    }

    async fn send_text(&mut self, text: String) -> Result<(), Closed> {
        self.send(&websocket::text_frame(&text)).await
    }

    /// Sends a message's whole frame.
    async fn send(&mut self, frame: &[u8]) -> Result<(), Closed> {
        self.write(frame).await?;
        self.owner.metrics.websocket_messages_sent.inc();
        Ok(())
    }

    /// Sends what tungstenite queued in answer to the client (pongs, a close's echo).
    async fn send_replies(&mut self) -> Result<(), Closed> {
        if self.ws.get_ref().replies.is_empty() {
            return Ok(());
        }
        let replies = std::mem::take(&mut self.ws.get_mut().replies);
        self.write(&replies).await
    }

    /// Writes bytes, at once when the socket takes them (the common case: one write, no
    /// timer armed); a socket that refuses writes for the stall timeout (a client that
    /// stopped reading) or fails ends the connection without a close frame (1006 to the
    /// client).
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Closed> {
        let timeout = self.owner.stall_timeout;
        match tokio::time::timeout(timeout, self.out.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                tracing::debug!(%error, "websocket write failed");
                Err(close::ABNORMAL)
            }
            Err(_) => {
                tracing::info!(?timeout, "closing a WebSocket client that stopped reading");
                Err(close::ABNORMAL)
            }
        }
    }

    /// Sends a close frame with `code` and `reason`, gives the client a moment to answer, and
    /// returns `code`.
    async fn close(&mut self, code: u16, reason: &str) -> Closed {
        if self
            .write(&websocket::close_frame(code, reason))
            .await
            .is_ok()
        {
            let _ = self.out.flush().await;
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                while let Some(Ok(_)) = self.ws.next().await {}
            })
            .await;
        }
        code
    }
}

/// What a subscription's event stream carries from one item to the next.
struct Following {
    id: Arc<str>,
    writer: Writer,
    /// Released with the subscription.
    _hold: Option<Box<dyn Send>>,
    resyncs: Counter,
    ended: bool,
}

/// One subscription's events as a stream of frames, ending with `Ended` (naming the
/// subscription) when its stream ends; `hold` lives as long as the subscription. Nothing is
/// cloned or allocated per event.
fn follow(id: Arc<str>, writer: Writer, hold: Option<Box<dyn Send>>, resyncs: Counter) -> Live {
    let following = Following {
        id,
        writer,
        _hold: hold,
        resyncs,
        ended: false,
    };
    Box::pin(futures_util::stream::unfold(
        following,
        |mut f| async move {
            if f.ended {
                return None;
            }
            loop {
                if let Some(frame) = f.writer.pop() {
                    return Some((Item::Message(frame), f));
                }
                if f.writer.is_finished() {
                    f.ended = true;
                    return Some((Item::Ended(f.id.clone()), f));
                }
                let before = f.writer.resyncs();
                f.writer.next_live().await;
                if f.writer.resyncs() > before {
                    f.resyncs.inc();
                }
            }
        },
    ))
}

/// The client's message budget: `per_second` sustained, bursts of as many.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    per_second: f64,
    at: Instant,
}

impl Budget {
    fn new(per_second: u32, now: Instant) -> Self {
        Budget {
            tokens: f64::from(per_second),
            per_second: f64::from(per_second),
            at: now,
        }
    }

    /// Spends one message, if the budget allows it.
    fn take(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.per_second);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_bursts_then_the_sustained_rate() {
        let start = Instant::now();
        let mut budget = Budget::new(3, start);
        assert!((0..3).all(|_| budget.take(start)));
        assert!(!budget.take(start));
        assert!(budget.take(start + Duration::from_millis(340)));
        assert!(!budget.take(start + Duration::from_millis(350)));
        // A long quiet period refills to the burst, no more.
        let later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| budget.take(later)));
        assert!(!budget.take(later));
    }
}

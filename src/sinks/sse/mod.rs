//! The SSE sink: one subscriber's events, snapshot then patches, resumable with
//! `Last-Event-ID`, in either SSE dialect; its [`Writer`] also follows each subscription of a
//! WebSocket connection (`sinks::ws`), in the WebSocket dialect.
//!
//! A [`Writer`] is a small state machine over the stream's broadcast receiver, turning events
//! into the bytes a subscriber is owed; both transports send them (`api::server`'s direct
//! path straight to the socket, [`body`] through hyper). It never serializes anything per
//! subscriber: it frames each event once, in the event's own [`crate::wire::Frames`], and
//! every subscriber shares the bytes (deflated once, for gzip clients). A subscriber that falls
//! more than the buffer behind gets the current snapshot (a resync) and continues from there.
//! What a request subscribes to, and the response's headers, are decided above
//! (`api::subscribe`): this module knows neither the proxy mode nor the configuration.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::broadcast::error::RecvError;

use crate::hub::{Change, Initial, Recovery, Stream, StreamEvent, Subscription, UpstreamFailure};
use crate::snapshot::Snapshot;
use crate::wire::gzip::{self, GzipTrailer};
use crate::wire::{self, Dialect, Frame, streamdata};

/// How SSE responses are written.
#[derive(Debug, Clone, Copy)]
pub struct SseOptions {
    /// The `retry:` hint sent first.
    pub retry: Duration,
    /// Compress with gzip at this level (the client sent `Accept-Encoding: gzip`; the level
    /// is `server.gzip_level`).
    pub gzip: Option<gzip::Level>,
    /// Which event names and error shape the client expects.
    pub dialect: Dialect,
}

/// `change` as an event of `dialect`, framed once (on first use) and shared.
pub fn change_frame(change: &Change, dialect: Dialect) -> &Frame {
    match dialect {
        Dialect::Native => change.frames.native(|| {
            wire::native::change(&change.id().to_string(), change.kind, &change.payload)
        }),
        Dialect::Streamdata { ascii_only, .. } => change.frames.streamdata(ascii_only, || {
            let id = change.id().to_string();
            streamdata::change(&id, change.kind, &change.payload, ascii_only)
        }),
        Dialect::WebSocket => change.frames.websocket(|| {
            let id = change.id().to_string();
            wire::websocket::change(&change.stream, &id, change.kind, &change.payload)
        }),
    }
}

/// `snapshot` of `stream` as an event of `dialect` (`snapshot`, or Streamdata.io's `data`),
/// framed once (on first use) and shared.
pub fn snapshot_frame<'a>(stream: &Stream, snapshot: &'a Snapshot, dialect: Dialect) -> &'a Frame {
    let id = || stream.event_id_in(snapshot.epoch, snapshot.seq).to_string();
    match dialect {
        Dialect::Native => snapshot
            .frames
            .native(|| wire::native::snapshot(&id(), &snapshot.json)),
        Dialect::Streamdata { ascii_only, .. } => snapshot.frames.streamdata(ascii_only, || {
            streamdata::data(&id(), &snapshot.json, ascii_only)
        }),
        Dialect::WebSocket => snapshot
            .frames
            .websocket(|| wire::websocket::snapshot(stream.name(), &id(), &snapshot.json)),
    }
}

/// The native `recovered` event of `recovery` on `stream`, framed once (on first use).
pub fn recovery_frame<'a>(stream: &Stream, recovery: &'a Recovery) -> &'a Frame {
    recovery.frames.native(|| {
        let id = stream.event_id_in(recovery.epoch, recovery.seq).to_string();
        wire::native::recovered(&id, recovery.since, recovery.failures, recovery.at)
    })
}

/// The `recovered` WebSocket message of `recovery` on `stream`, built once (on first use).
fn recovery_message<'a>(stream: &Stream, recovery: &'a Recovery) -> &'a Frame {
    recovery.frames.websocket(|| {
        let id = stream.event_id(recovery.seq).to_string();
        wire::websocket::recovered(
            stream.name(),
            &id,
            recovery.since,
            recovery.failures,
            recovery.at,
        )
    })
}

/// One subscriber's position in its stream and the bytes it is owed: what both the direct
/// path and the hyper body send. Transport-agnostic: it only turns events into shared `Bytes`.
pub(crate) struct Writer {
    subscription: Subscription,
    stream: Arc<Stream>,
    pending: VecDeque<Bytes>,
    /// The epoch and sequence number of the last document or change sent: changes of another
    /// epoch, or at or before it, are never sent.
    epoch: u64,
    seq: u64,
    gzip: Option<(GzipTrailer, gzip::Level)>,
    sent: Counter,
    resyncs: Counter,
    dialect: Dialect,
    /// This subscriber was told of a failure and not yet of its end.
    failing: bool,
    done: bool,
    /// How many times it fell behind and was resynced.
    lagged: u64,
}

impl Writer {
    /// A writer owing the `retry:` hint and the subscription's initial events.
    pub(crate) fn new(mut subscription: Subscription, options: SseOptions) -> Writer {
        let stream = subscription.stream().clone();
        let metrics = stream.metrics().clone();
        let labels = stream.labels().clone();
        let initial = std::mem::take(&mut subscription.initial);
        let mut writer = Writer {
            epoch: subscription.epoch,
            seq: subscription.seq,
            stream,
            pending: VecDeque::new(),
            gzip: options.gzip.map(|level| (GzipTrailer::default(), level)),
            sent: metrics.events_sent.get_or_create(&labels).clone(),
            resyncs: metrics.resyncs.get_or_create(&labels).clone(),
            dialect: options.dialect,
            failing: false,
            done: false,
            lagged: 0,
            subscription,
        };
        if options.gzip.is_some() {
            writer
                .pending
                .push_back(Bytes::from_static(&gzip::GZIP_HEADER));
        }
        if options.dialect != Dialect::WebSocket {
            writer.push(&Frame::new(wire::sse::retry(
                options.retry.as_millis() as u64
            )));
        }
        for item in initial {
            match item {
                Initial::Snapshot(snapshot) => writer.push_snapshot(&snapshot),
                Initial::Change(change) => writer.push_change(&change),
                Initial::Failure(failure) => writer.push_failure(&failure),
            }
        }
        writer
    }

    /// The next bytes owed, if any.
    pub(crate) fn pop(&mut self) -> Option<Bytes> {
        self.pending.pop_front()
    }

    /// How many times this subscriber fell behind and was resynced with a snapshot.
    pub(crate) fn resyncs(&self) -> u64 {
        self.lagged
    }

    /// True once the stream ended and everything owed was taken.
    pub(crate) fn is_finished(&self) -> bool {
        self.done && self.pending.is_empty()
    }

    /// Queues `event`; the bytes it costs on the wire.
    fn push(&mut self, event: &Frame) -> usize {
        let bytes = match &mut self.gzip {
            Some((trailer, level)) => {
                let deflated = event.deflated(*level);
                trailer.add(deflated);
                deflated.bytes.clone()
            }
            None => event.plain().clone(),
        };
        let len = bytes.len();
        self.pending.push_back(bytes);
        len
    }

    fn push_counted(&mut self, event: &Frame) {
        let len = self.push(event);
        self.sent.inc();
        self.stream.count_sent(len);
    }

    fn push_snapshot(&mut self, snapshot: &Snapshot) {
        let stream = self.stream.clone();
        self.push_counted(snapshot_frame(&stream, snapshot, self.dialect));
        self.epoch = snapshot.epoch;
        self.seq = snapshot.seq;
    }

    fn push_change(&mut self, change: &Change) {
        self.push_counted(change_frame(change, self.dialect));
    }

    fn push_failure(&mut self, failure: &UpstreamFailure) {
        self.failing = true;
        match self.dialect {
            Dialect::Native => {
                let frame = failure.frames.native(|| {
                    let id = self
                        .stream
                        .event_id_in(failure.epoch, failure.seq)
                        .to_string();
                    wire::native::error(
                        &id,
                        failure.status,
                        &failure.message,
                        failure.cause,
                        failure.at,
                        failure.retry_in,
                    )
                });
                self.push_counted(frame);
            }
            Dialect::Streamdata {
                session,
                ascii_only,
            } => {
                // Per connection (it names the session); failures are rare.
                let id = self
                    .stream
                    .event_id_in(failure.epoch, failure.seq)
                    .to_string();
                let frame = streamdata::error(
                    &id,
                    failure.status,
                    &failure.message,
                    failure.cause,
                    failure.at,
                    session,
                    ascii_only,
                );
                self.push_counted(&Frame::new(frame));
            }
            Dialect::WebSocket => {
                let frame = failure.frames.websocket(|| {
                    let id = self.stream.event_id(failure.seq).to_string();
                    wire::websocket::error(
                        self.stream.name(),
                        &id,
                        failure.status,
                        &failure.message,
                        failure.cause,
                        failure.at,
                        failure.retry_in,
                    )
                });
                self.push_counted(frame);
            }
        }
    }

    /// Tells a subscriber that was told of failures that they are over. The Streamdata.io
    /// dialect has no such event (its SDKs close on `error`): nothing is sent there.
    fn push_recovery(&mut self, recovery: &Recovery) {
        if !std::mem::take(&mut self.failing) {
            return;
        }
        match self.dialect {
            Dialect::Native => {
                let stream = self.stream.clone();
                self.push_counted(recovery_frame(&stream, recovery));
            }
            Dialect::WebSocket => {
                let stream = self.stream.clone();
                self.push_counted(recovery_message(&stream, recovery));
            }
            Dialect::Streamdata { .. } => {}
        }
    }

    /// Waits for the next live event and queues what it means for this subscriber.
    /// Cancel-safe: dropping the future loses no event.
    pub(crate) async fn next_live(&mut self) {
        // Shutdown closes the stream, which ends this receiver: no cancellation future is
        // registered per event on the hot path.
        match self.subscription.live.recv().await {
            Err(RecvError::Closed) => self.finish(),
            Ok(StreamEvent::Change(change, _)) => {
                // Changes at or before what this subscriber already has (it was resynced,
                // or resumed) are skipped, and so are those of an epoch it left; there are no
                // gaps otherwise.
                if change.epoch == self.epoch && change.seq > self.seq {
                    self.seq = change.seq;
                    self.push_change(&change);
                }
            }
            Ok(StreamEvent::Reset(snapshot)) => {
                self.resyncs.inc();
                self.push_snapshot(&snapshot);
            }
            Ok(StreamEvent::Failure(failure)) => self.push_failure(&failure),
            Ok(StreamEvent::Recovered(recovery)) => self.push_recovery(&recovery),
            // WebSocket connections ping instead.
            Ok(StreamEvent::KeepAlive) if self.dialect == Dialect::WebSocket => {}
            Ok(StreamEvent::KeepAlive) => {
                self.push(&wire::sse::KEEP_ALIVE);
            }
            Err(RecvError::Lagged(_)) => {
                self.resyncs.inc();
                self.lagged += 1;
                if let Some(snapshot) = self.stream.snapshot() {
                    self.push_snapshot(&snapshot);
                }
                // The current failure, or the end of the last one, may have been among the
                // lost events.
                match self.stream.failure() {
                    Some(failure) => self.push_failure(&failure),
                    None => {
                        if let Some(recovery) = self.stream.last_recovery() {
                            self.push_recovery(&recovery);
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some((trailer, _)) = self.gzip.take() {
            self.pending.push_back(trailer.finish());
        }
    }
}

/// The hyper body of a subscription: `retry:`, the initial events, then live events until the
/// stream closes, keeping `hold` alive (e.g. a connection slot) until the body is dropped.
pub fn body(subscription: Subscription, options: SseOptions, hold: impl Send + 'static) -> Body {
    Body::from_stream(events(subscription, options, hold))
}

fn events(
    subscription: Subscription,
    options: SseOptions,
    hold: impl Send + 'static,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold(
        (Writer::new(subscription, options), hold),
        |(mut writer, hold)| async move {
            loop {
                if let Some(bytes) = writer.pop() {
                    return Some((Ok(bytes), (writer, hold)));
                }
                if writer.is_finished() {
                    return None;
                }
                writer.next_live().await;
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Resume;

    fn stream(buffer: usize) -> Arc<Stream> {
        let s = Arc::new(Stream::new(
            "s",
            crate::hub::StreamOptions {
                history: 8,
                history_bytes: 1 << 20,
                buffer,
                diff: crate::diff::DiffOptions::default(),
            },
            crate::snapshot::SnapshotStore::new(),
            Arc::new(crate::metrics::Metrics::new()),
        ));
        s.publish(serde_json::json!({"n": 0}));
        s
    }

    fn writer(s: &Arc<Stream>, dialect: Dialect) -> Writer {
        let options = SseOptions {
            retry: Duration::from_secs(1),
            gzip: None,
            dialect,
        };
        Writer::new(s.subscribe(&Resume::Fresh), options)
    }

    /// The names of the events owed, in order.
    fn owed(w: &mut Writer) -> Vec<String> {
        let mut names = Vec::new();
        while let Some(bytes) = w.pop() {
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            names.extend(
                text.lines()
                    .filter_map(|l| l.strip_prefix("event: "))
                    .map(str::to_owned),
            );
        }
        names
    }

    #[tokio::test]
    async fn the_end_of_failures_reaches_native_subscribers_that_saw_them() {
        let s = stream(16);
        let mut native = writer(&s, Dialect::Native);
        let mut streamdata = writer(
            &s,
            Dialect::Streamdata {
                session: 1,
                ascii_only: true,
            },
        );
        assert_eq!(owed(&mut native), ["snapshot"]);
        assert_eq!(owed(&mut streamdata), ["data"]);
        s.fail(502, "upstream-unavailable", "down".into(), Duration::ZERO);
        let mut joined_failing = writer(&s, Dialect::Native);
        s.recover();
        let mut joined_after = writer(&s, Dialect::Native);
        for w in [&mut native, &mut streamdata] {
            w.next_live().await;
            w.next_live().await;
        }
        assert_eq!(owed(&mut native), ["error", "recovered"]);
        assert_eq!(
            owed(&mut streamdata),
            ["error"],
            "no such event in that dialect"
        );
        joined_failing.next_live().await;
        assert_eq!(
            owed(&mut joined_failing),
            ["snapshot", "error", "recovered"]
        );
        assert_eq!(owed(&mut joined_after), ["snapshot"], "it saw no error");
    }

    #[tokio::test]
    async fn websocket_subscribers_share_one_message_per_event() {
        let s = stream(16);
        let mut a = writer(&s, Dialect::WebSocket);
        let mut b = writer(&s, Dialect::WebSocket);
        let (first_a, first_b) = (a.pop().unwrap(), b.pop().unwrap());
        assert_eq!(first_a.as_ptr(), first_b.as_ptr(), "one snapshot message");
        assert!(a.pop().is_none(), "no retry hint");
        s.publish(serde_json::json!({"n": 1, "pad": "x".repeat(64)}));
        s.publish(serde_json::json!({"n": 2, "pad": "x".repeat(64)}));
        for w in [&mut a, &mut b] {
            w.next_live().await;
            w.next_live().await;
        }
        let (x, y) = (a.pop().unwrap(), b.pop().unwrap());
        assert_eq!(x.as_ptr(), y.as_ptr(), "the same bytes on every connection");
        let json = |frame: Bytes| -> serde_json::Value {
            serde_json::from_slice(wire::websocket::frame_payload(&frame).unwrap()).unwrap()
        };
        let second = json(a.pop().unwrap());
        assert_eq!(second["type"], "patch");
        assert_eq!(second["stream"], "s");
        assert_eq!(second["id"], format!("s:{}:3", s.epoch()));
        s.keep_alive();
        s.fail(502, "upstream-unavailable", "down".into(), Duration::ZERO);
        a.next_live().await;
        a.next_live().await;
        let error = json(a.pop().unwrap());
        assert_eq!(
            error["type"], "error",
            "keep-alives are not sent: the connection pings"
        );
        assert_eq!(error["data"]["cause"], "upstream-unavailable");
    }

    #[tokio::test]
    async fn a_subscriber_that_lagged_past_the_recovery_is_told_with_its_resync() {
        let s = stream(2);
        let mut w = writer(&s, Dialect::Native);
        s.fail(502, "upstream-unavailable", "down".into(), Duration::ZERO);
        w.next_live().await;
        assert_eq!(owed(&mut w), ["snapshot", "error"]);
        s.recover();
        for n in 1..=4 {
            s.publish(serde_json::json!({"n": n}));
        }
        w.next_live().await;
        assert_eq!(owed(&mut w), ["snapshot", "recovered"]);
    }
}

//! One sink's publisher of one stream: read the broker's last message back, subscribe to the
//! hub from there, queue what follows (bounded), publish in batches, and start over from the
//! broker's word after any failure.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::config::SinkStream;
use super::message::{Message, Next, Position, continues, lag, next};
use super::{Acked, BrokerError, BrokerFuture, Prepared, SinkState, SinkStatus};
use crate::hub::{Change, Initial, Resume, Stream, StreamEvent};
use crate::metrics::{Metrics, SinkLabels};
use crate::sinks::webhook::body::Mode;
use crate::snapshot::Snapshot;
use crate::wire::ChangeKind;

/// The first wait after a broker failure; it doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(100);
/// The longest wait between two attempts at a broker that fails.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// One sink's publisher of one stream.
pub struct Publisher {
    /// The sink's broker.
    pub broker: Arc<Prepared>,
    /// The stream.
    pub stream: Arc<Stream>,
    /// Its destination and source.
    pub target: SinkStream,
    /// The sink's name.
    pub sink: String,
    /// Patches or whole documents.
    pub mode: Mode,
    /// Messages queued before the publisher marks itself behind.
    pub buffer: usize,
    /// Bytes queued before the publisher marks itself behind.
    pub buffer_bytes: u64,
    /// Messages in flight at once.
    pub batch: usize,
    /// How long one broker call may take.
    pub timeout: Duration,
    /// In a cluster, whether it is this node's turn to publish the stream.
    pub turn: Option<watch::Receiver<bool>>,
    /// What `/streams` shows.
    pub status: Arc<SinkStatus>,
    /// Where counts go.
    pub metrics: Arc<Metrics>,
}

/// Why following the stream stopped.
enum Stop {
    Shutdown,
    /// No longer this node's turn.
    Turn,
    /// The broker conflicts with the configuration.
    Failed,
}

/// The messages waiting for the broker, oldest first, and where their line ends.
struct Queue {
    messages: VecDeque<Message>,
    bytes: u64,
    /// The position of the last message queued (or, with none, of the last acknowledged).
    end: Option<Position>,
}

/// A batch in flight: how many messages of the queue's front, and what the broker answered.
type InFlight = BrokerFuture<'static, (usize, Acked)>;

/// Doubling waits between attempts.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(RETRY_MAX);
        wait
    }

    fn reset(&mut self) {
        self.0 = RETRY_MIN;
    }
}

/// Waits until it is no longer this node's turn (never, outside a cluster).
async fn turn_ends(turn: &mut Option<watch::Receiver<bool>>) {
    match turn {
        None => std::future::pending().await,
        Some(turn) => {
            let _ = turn.wait_for(|mine| !*mine).await;
            if turn.has_changed().is_err() {
                // The keeper stopped (shutdown): nothing will change any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The answer to the batch in flight (pending while there is none).
async fn in_flight(inflight: &mut Option<InFlight>) -> Result<(usize, Acked), BrokerError> {
    match inflight {
        Some(inflight) => inflight.await,
        None => std::future::pending().await,
    }
}

/// Resolves at `at` (pending without one).
async fn due(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Publisher {
    fn labels(&self) -> SinkLabels {
        SinkLabels {
            sink: self.sink.clone(),
            stream: self.target.stream.clone(),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if let Some(turn) = &mut self.turn {
                if !*turn.borrow() {
                    self.status.update(|s| s.state = SinkState::Standby);
                }
                let mine = async { turn.wait_for(|mine| *mine).await.is_ok() };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    mine = mine => if !mine {
                        shutdown.cancelled().await;
                        return;
                    },
                }
            }
            match self.follow(&shutdown).await {
                Stop::Shutdown => return,
                Stop::Turn => {
                    tracing::info!(sink = %self.sink, stream = %self.target.stream, "another node publishes the stream now");
                }
                Stop::Failed => {
                    shutdown.cancelled().await;
                    return;
                }
            }
        }
    }

    fn fail(&self, error: &BrokerError) {
        self.metrics
            .broker_errors
            .get_or_create(&self.labels())
            .inc();
        let message = error.to_string();
        self.status.update(|s| s.last_error = Some(message));
    }

    /// The broker's last message of the stream, retried until it answers.
    async fn read_back(
        &mut self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<Option<Position>, Stop> {
        loop {
            let attempt = async {
                let broker = self.broker.get().await?;
                broker
                    .last(&self.target.destination, &self.target.stream)
                    .await
            };
            let error = match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(last)) => return Ok(last),
                Ok(Err(error)) => error,
                Err(_) => BrokerError::Unavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                )),
            };
            self.fail(&error);
            if let BrokerError::Conflict(message) = &error {
                tracing::error!(sink = %self.sink, stream = %self.target.stream, %message, "the broker conflicts with the configuration; this sink stops");
                self.status.update(|s| s.state = SinkState::Failed);
                return Err(Stop::Failed);
            }
            let wait = backoff.next();
            tracing::debug!(sink = %self.sink, stream = %self.target.stream, %error, retry_in = ?wait, "cannot read the broker's last message");
            tokio::select! {
                () = shutdown.cancelled() => return Err(Stop::Shutdown),
                () = turn_ends(&mut self.turn) => return Err(Stop::Turn),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Follows the stream while it is this node's turn: resumes from the broker's last message
    /// and starts over after every failure.
    async fn follow(&mut self, shutdown: &CancellationToken) -> Stop {
        let mut backoff = Backoff(RETRY_MIN);
        let mut behind = false;
        // Whether the broker held (or acknowledged) a message of the stream since this node's
        // turn began: a snapshot after that covers a gap (a resync), even when the broker
        // came back empty.
        let mut had_position = false;
        'resume: loop {
            self.status.update(|s| {
                s.state = if behind {
                    SinkState::Behind
                } else {
                    SinkState::Connecting
                };
            });
            let last = match self.read_back(shutdown, &mut backoff).await {
                Ok(last) => last,
                Err(stop) => return stop,
            };
            backoff.reset();
            behind = false;
            had_position |= last.is_some();
            let resume = match last {
                Some(position) => Resume::After(position.event_id(&self.target.stream)),
                None => Resume::Fresh,
            };
            let mut subscription = self.stream.subscribe(&resume);
            let (replay, replay_bytes) = subscription
                .initial
                .iter()
                .filter_map(|i| match i {
                    Initial::Change(change) => Some(change.payload.len() as u64),
                    _ => None,
                })
                .fold((0usize, 0u64), |(n, b), len| (n + 1, b + len));
            if replay > self.buffer || replay_bytes > self.buffer_bytes {
                // More than the queue may hold: the current document instead.
                drop(subscription);
                subscription = self.stream.subscribe(&Resume::Fresh);
            }
            let mut live = subscription.live;
            let mut queue = Queue {
                messages: VecDeque::new(),
                bytes: 0,
                end: last,
            };
            let mut acknowledged = last;
            self.status.update(|s| {
                s.state = SinkState::Publishing;
                s.acknowledged = last;
            });
            for initial in subscription.initial {
                match initial {
                    Initial::Snapshot(snapshot) => {
                        self.queue_snapshot(&mut queue, &snapshot, had_position);
                    }
                    Initial::Change(change) => self.queue_change(&mut queue, &change, None),
                    Initial::Failure(_) => {}
                }
            }
            self.show(&queue, acknowledged);
            let mut inflight: Option<InFlight> = None;
            // Set when the broker failed: the next attempt is due then.
            let mut retry: Option<tokio::time::Instant> = None;
            loop {
                // One message always fits, however large: a document bigger than the bound
                // must still go out.
                if queue.messages.len() > 1
                    && (queue.messages.len() > self.buffer || queue.bytes > self.buffer_bytes)
                {
                    tracing::warn!(sink = %self.sink, stream = %self.target.stream, queued = queue.messages.len(), "broker sink queue full; marked behind, a snapshot follows once the broker answers");
                    behind = true;
                    continue 'resume;
                }
                if inflight.is_none() && retry.is_none() && !queue.messages.is_empty() {
                    inflight = Some(self.send(&queue));
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Stop::Shutdown,
                    () = turn_ends(&mut self.turn) => return Stop::Turn,
                    answer = in_flight(&mut inflight), if inflight.is_some() => {
                        inflight = None;
                        match answer {
                            Ok((count, acked)) => {
                                backoff.reset();
                                let mut end = acknowledged;
                                for message in queue.messages.drain(..count) {
                                    queue.bytes = queue.bytes.saturating_sub(message.weight() as u64);
                                    end = Some(message.position());
                                }
                                acknowledged = end;
                                had_position = true;
                                let labels = self.labels();
                                self.metrics.broker_acknowledged.get_or_create(&labels).inc_by(count as u64);
                                self.status.update(|s| {
                                    s.acknowledged = end;
                                    s.acknowledged_messages += count as u64;
                                    s.state = SinkState::Publishing;
                                });
                                if acked.duplicates > 0 {
                                    tracing::debug!(sink = %self.sink, stream = %self.target.stream, duplicates = acked.duplicates, "the broker already held some messages");
                                }
                                self.show(&queue, acknowledged);
                            }
                            Err(error) => {
                                self.fail(&error);
                                if let BrokerError::Conflict(message) = &error {
                                    tracing::error!(sink = %self.sink, stream = %self.target.stream, %message, "the broker conflicts with the configuration; this sink stops");
                                    self.status.update(|s| s.state = SinkState::Failed);
                                    return Stop::Failed;
                                }
                                let wait = backoff.next();
                                tracing::warn!(sink = %self.sink, stream = %self.target.stream, %error, retry_in = ?wait, "broker publish failed; the queue waits");
                                self.status.update(|s| s.state = SinkState::Retrying);
                                retry = Some(tokio::time::Instant::now() + wait);
                            }
                        }
                    }
                    () = due(retry), if retry.is_some() => {
                        retry = None;
                        // What the broker holds now decides: the queue continues it, or the
                        // stream resumes from it.
                        let last = match self.read_back(shutdown, &mut backoff).await {
                            Ok(last) => last,
                            Err(stop) => return stop,
                        };
                        while queue.messages.front().is_some_and(|m| {
                            last.is_some_and(|l| l.epoch == m.epoch && m.seq <= l.seq)
                        }) {
                            if let Some(m) = queue.messages.pop_front() {
                                queue.bytes = queue.bytes.saturating_sub(m.weight() as u64);
                            }
                        }
                        let whole = match queue.messages.front() {
                            Some(front) => continues(last, front),
                            None => queue.end == last,
                        };
                        if !whole {
                            tracing::info!(sink = %self.sink, stream = %self.target.stream, "the broker's line does not continue with the queue; resuming from what it holds");
                            continue 'resume;
                        }
                        acknowledged = last;
                        self.status.update(|s| {
                            s.acknowledged = last;
                            s.state = SinkState::Publishing;
                        });
                        self.show(&queue, acknowledged);
                    }
                    event = live.recv() => match event {
                        Ok(StreamEvent::Change(change, document)) => {
                            self.queue_change(&mut queue, &change, Some(&document));
                            self.show(&queue, acknowledged);
                        }
                        Ok(StreamEvent::Reset(snapshot)) => {
                            self.queue_snapshot(&mut queue, &snapshot, true);
                            self.show(&queue, acknowledged);
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(sink = %self.sink, stream = %self.target.stream, missed, "broker sink fell behind the stream; resuming from the broker's last message");
                            behind = true;
                            continue 'resume;
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            // The stream ended (shutdown): publish what is queued, within the
                            // timeout, then stop.
                            if let Some(inflight) = inflight.take() {
                                let _ = tokio::time::timeout(self.timeout, inflight).await;
                            }
                            shutdown.cancelled().await;
                            return Stop::Shutdown;
                        }
                    },
                }
            }
        }
    }

    /// Publishes the front of the queue (up to a batch).
    fn send(&self, queue: &Queue) -> InFlight {
        let batch: Vec<Message> = queue.messages.iter().take(self.batch).cloned().collect();
        let count = batch.len();
        self.metrics
            .broker_published
            .get_or_create(&self.labels())
            .inc_by(count as u64);
        self.status.update(|s| s.published += count as u64);
        let broker = self.broker.clone();
        let destination = self.target.destination.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let attempt = async {
                let broker = broker.get().await?;
                broker.publish(&destination, &batch).await
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(acked)) => Ok((count, acked)),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(BrokerError::Unavailable(format!(
                    "{count} messages not acknowledged within {}",
                    humantime::format_duration(timeout)
                ))),
            }
        })
    }

    fn show(&self, queue: &Queue, acknowledged: Option<Position>) {
        let lag = lag(&self.stream, acknowledged);
        self.metrics
            .broker_lag
            .get_or_create(&self.labels())
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
        let queued = queue.messages.len();
        self.status.update(|s| {
            s.lag = lag;
            s.queued = queued;
        });
    }

    fn push(&self, queue: &mut Queue, message: Message) {
        if message.resync {
            self.metrics
                .broker_resyncs
                .get_or_create(&self.labels())
                .inc();
        }
        queue.end = Some(message.position());
        queue.bytes += message.weight() as u64;
        queue.messages.push_back(message);
    }

    /// Queues `snapshot` unless the line already holds it; `resync` when it covers a gap.
    fn queue_snapshot(&self, queue: &mut Queue, snapshot: &Snapshot, resync: bool) {
        if next(
            queue.end,
            snapshot.epoch,
            snapshot.seq,
            ChangeKind::Snapshot,
            self.mode,
        ) == Next::Skip
        {
            return;
        }
        let message = Message::new(
            &self.target.stream,
            &self.target.source,
            snapshot.epoch,
            snapshot.seq,
            ChangeKind::Snapshot,
            snapshot.at,
            snapshot.json.clone(),
            resync,
        );
        self.push(queue, message);
    }

    /// Queues `change` as it continues the line: as it is, or as the document after it
    /// (`document`, carried by live changes; history's changes carry none, and the stream's
    /// current document, at least as new, stands in for it).
    fn queue_change(&self, queue: &mut Queue, change: &Change, document: Option<&Bytes>) {
        match next(queue.end, change.epoch, change.seq, change.kind, self.mode) {
            Next::Skip => {}
            Next::Change => {
                let message = Message::new(
                    &self.target.stream,
                    &self.target.source,
                    change.epoch,
                    change.seq,
                    change.kind,
                    change.at,
                    change.payload.clone(),
                    false,
                );
                self.push(queue, message);
            }
            Next::Document => {
                let resync = self.mode == Mode::Patch;
                match document {
                    Some(document) => {
                        let message = Message::new(
                            &self.target.stream,
                            &self.target.source,
                            change.epoch,
                            change.seq,
                            ChangeKind::Snapshot,
                            change.at,
                            document.clone(),
                            resync,
                        );
                        self.push(queue, message);
                    }
                    None => {
                        if let Some(snapshot) = self.stream.snapshot() {
                            self.queue_snapshot(queue, &snapshot, resync);
                        }
                    }
                }
            }
        }
    }
}

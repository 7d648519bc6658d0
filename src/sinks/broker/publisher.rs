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
use crate::hub::{Change, Initial, Resume, Stream, StreamEvent, Subscription};
use crate::metrics::{Metrics, SinkLabels};
use crate::sinks::webhook::body::Mode;
use crate::snapshot::Snapshot;
use crate::views::{Target, ViewError};
use crate::wire::ChangeKind;

/// The first wait after a broker failure; it doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(100);
/// The longest wait between two attempts at a broker that fails.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// One sink's publisher of one stream.
pub struct Publisher {
    /// The sink's broker.
    pub broker: Arc<Prepared>,
    /// What is published: a stream, or one of its views (subscribed to like any subscriber,
    /// which keeps the view alive while the publisher follows it).
    pub feed: Target,
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
    /// Where the subscription is in the hub's stream: the document the next live change
    /// applies to (a view's changes are sparse, so its base is not always `seq - 1`).
    at: Option<Position>,
    /// The stream followed (a view's own stream), once subscribed.
    stream: Option<Arc<Stream>>,
}

/// The base of `change` when the subscription was at `at`: `None` when unknown (another
/// epoch), and the change then goes out as the document after it.
fn base_of(at: Option<Position>, change: &Change) -> Option<u64> {
    at.filter(|at| at.epoch == change.epoch && at.seq < change.seq)
        .map(|at| at.seq)
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
            stream: self.target.name.clone(),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if let Some(turn) = &mut self.turn {
                if !*turn.borrow() {
                    self.status.update(|s| s.state = SinkState::Standby);
                }
                // A view is kept while another node publishes it, so its history grows here
                // as this node follows the log: taking the line over, this node continues it
                // from that history, as it does the stream's, where a view made only then
                // would start at the log's position, past the broker's line if the holder died
                // before publishing its last changes there (then a snapshot).
                // A subscriber that never reads: its events pass it by (it lags), and it keeps
                // the view from being evicted.
                let _kept = match &self.feed {
                    Target::View(..) if !*turn.borrow() => {
                        self.feed.subscribe(&Resume::Fresh).ok().map(|mut kept| {
                            kept.initial.clear();
                            kept
                        })
                    }
                    _ => None,
                };
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
                    tracing::info!(sink = %self.sink, stream = %self.target.name, "another node publishes the stream now");
                }
                Stop::Failed => {
                    shutdown.cancelled().await;
                    return;
                }
            }
        }
    }

    fn fail(&self, error: &BrokerError) {
        let labels = self.labels();
        self.metrics.broker_errors.get_or_create(&labels).inc();
        match error {
            BrokerError::Overtaken(_) => {
                self.metrics.broker_overtaken.get_or_create(&labels).inc();
            }
            BrokerError::TooLarge(message) => {
                self.metrics.broker_oversized.get_or_create(&labels).inc();
                tracing::error!(sink = %self.sink, stream = %self.target.name, %message, "a message is larger than the broker takes");
            }
            BrokerError::Unavailable(_) | BrokerError::Conflict(_) => {}
        }
        let message = error.to_string();
        self.status.update(|s| s.last_error = Some(message));
    }

    /// One attempt at the broker's last message of the stream; a failure is counted and
    /// shown, and a conflict stops the sink.
    async fn read_back_once(&self) -> Result<Option<Position>, Result<BrokerError, Stop>> {
        let attempt = async {
            let broker = self.broker.get().await?;
            broker
                .last(&self.target.destination, &self.target.name)
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
            tracing::error!(sink = %self.sink, stream = %self.target.name, %message, "the broker conflicts with the configuration; this sink stops");
            self.status.update(|s| s.state = SinkState::Failed);
            return Err(Err(Stop::Failed));
        }
        Err(Ok(error))
    }

    /// The broker's last message of the stream, retried until it answers.
    async fn read_back(
        &mut self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<Option<Position>, Stop> {
        loop {
            let error = match self.read_back_once().await {
                Ok(last) => return Ok(last),
                Err(Err(stop)) => return Err(stop),
                Err(Ok(error)) => error,
            };
            let wait = backoff.next();
            tracing::debug!(sink = %self.sink, stream = %self.target.name, %error, retry_in = ?wait, "cannot read the broker's last message");
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
            let mut queue = Queue {
                messages: VecDeque::new(),
                bytes: 0,
                end: last,
                at: None,
                stream: None,
            };
            let mut acknowledged = last;
            self.status.update(|s| {
                s.state = SinkState::Publishing;
                s.acknowledged = last;
            });
            let mut live = match self.subscribe_after(&mut queue, had_position) {
                Ok(live) => live,
                Err(error) => match self.refused(shutdown, &mut backoff, &error).await {
                    Some(stop) => return stop,
                    None => continue 'resume,
                },
            };
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
                    tracing::warn!(sink = %self.sink, stream = %self.target.name, queued = queue.messages.len(), "broker sink queue full; marked behind, a snapshot follows once the broker answers");
                    behind = true;
                    continue 'resume;
                }
                if inflight.is_none() && retry.is_none() && !queue.messages.is_empty() {
                    inflight = Some(self.send(&queue));
                }
                tokio::select! {
                    () = shutdown.cancelled() => {
                        self.finish(inflight.take()).await;
                        return Stop::Shutdown;
                    }
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
                                    tracing::debug!(sink = %self.sink, stream = %self.target.name, duplicates = acked.duplicates, "the broker already held some messages");
                                }
                                self.show(&queue, acknowledged);
                            }
                            Err(error) => {
                                self.fail(&error);
                                if let BrokerError::Conflict(message) = &error {
                                    tracing::error!(sink = %self.sink, stream = %self.target.name, %message, "the broker conflicts with the configuration; this sink stops");
                                    self.status.update(|s| s.state = SinkState::Failed);
                                    return Stop::Failed;
                                }
                                if let BrokerError::Overtaken(message) = &error {
                                    // Another publisher moved the line on: what the broker
                                    // holds now decides, at once.
                                    tracing::info!(sink = %self.sink, stream = %self.target.name, %message, "the broker's line moved on; reading it back");
                                    retry = Some(tokio::time::Instant::now());
                                    continue;
                                }
                                let wait = backoff.next();
                                tracing::warn!(sink = %self.sink, stream = %self.target.name, %error, retry_in = ?wait, "broker publish failed; the queue waits");
                                self.status.update(|s| s.state = SinkState::Retrying);
                                retry = Some(tokio::time::Instant::now() + wait);
                            }
                        }
                    }
                    () = due(retry), if retry.is_some() => {
                        retry = None;
                        // What the broker holds now decides: the queue continues it, or the
                        // stream resumes from it. Meanwhile changes keep arriving into the
                        // queue, up to its bound.
                        let last = match self.read_back_once().await {
                            Ok(last) => last,
                            Err(Err(stop)) => return stop,
                            Err(Ok(error)) => {
                                let wait = backoff.next();
                                tracing::debug!(sink = %self.sink, stream = %self.target.name, %error, retry_in = ?wait, "the broker still fails");
                                retry = Some(tokio::time::Instant::now() + wait);
                                continue;
                            }
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
                            tracing::info!(sink = %self.sink, stream = %self.target.name, "the broker's line does not continue with the queue; resuming from what it holds");
                            continue 'resume;
                        }
                        acknowledged = last;
                        self.status.update(|s| {
                            s.acknowledged = last;
                            s.state = SinkState::Publishing;
                        });
                        self.show(&queue, acknowledged);
                    }
                    event = live.live.recv() => match event {
                        Ok(StreamEvent::Change(change, document)) => {
                            let base = base_of(queue.at, &change);
                            queue.at = Some(Position { epoch: change.epoch, seq: change.seq });
                            self.queue_change(&mut queue, &change, base, Some(&document));
                            self.show(&queue, acknowledged);
                        }
                        Ok(StreamEvent::Reset(_)) => {
                            // The stream started over (a cluster node reloaded it from the
                            // log, or the log began a new epoch): continue the line from the
                            // hub's history when it reaches, else with its document.
                            live = match self.subscribe_after(&mut queue, true) {
                                Ok(live) => live,
                                Err(error) => match self.refused(shutdown, &mut backoff, &error).await {
                                    Some(stop) => return stop,
                                    None => continue 'resume,
                                },
                            };
                            self.show(&queue, acknowledged);
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(sink = %self.sink, stream = %self.target.name, missed, "broker sink fell behind the stream; resuming from the broker's last message");
                            behind = true;
                            continue 'resume;
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            // The stream ended (shutdown): publish what is queued, within the
                            // timeout, then stop.
                            if let Some(inflight) = inflight.take() {
                                let _ = tokio::time::timeout(self.timeout, inflight).await;
                            }
                            if matches!(self.feed, Target::View(..)) {
                                // A view also ends when it is evicted or its source starts
                                // over without it; unless this is the shutdown, follow it
                                // again (from the broker's word).
                                tokio::select! {
                                    () = shutdown.cancelled() => return Stop::Shutdown,
                                    () = tokio::time::sleep(RETRY_MIN) => continue 'resume,
                                }
                            }
                            shutdown.cancelled().await;
                            return Stop::Shutdown;
                        }
                    },
                }
            }
        }
    }

    /// Stopping (shutdown, or a reload that removed or changed the sink): the batch in flight
    /// gets the sink's timeout to be acknowledged, else it is abandoned, with a log line either
    /// way. Each message reaches the broker whole or not at all, so nothing is half written;
    /// whoever publishes the stream next reads the broker's last message back.
    async fn finish(&self, inflight: Option<InFlight>) {
        let Some(inflight) = inflight else {
            return;
        };
        match tokio::time::timeout(self.timeout, inflight).await {
            Ok(Ok((count, _))) => {
                self.metrics
                    .broker_acknowledged
                    .get_or_create(&self.labels())
                    .inc_by(count as u64);
                tracing::info!(sink = %self.sink, stream = %self.target.name, count, "stopping: the batch in flight was acknowledged");
            }
            Ok(Err(error)) => {
                tracing::warn!(sink = %self.sink, stream = %self.target.name, %error, "stopping: the batch in flight failed and is abandoned; the next publisher resumes from the broker's last message");
            }
            Err(_) => {
                tracing::warn!(sink = %self.sink, stream = %self.target.name, "stopping: the batch in flight was not acknowledged in time and is abandoned; the next publisher resumes from the broker's last message");
            }
        }
    }

    /// Subscribes to the stream after the end of the queue's line and queues what the hub
    /// gives first: exactly the missed changes from history, or the current document (also
    /// when the replay would not fit the queue). `resync`: a document covers a gap. The
    /// subscription is kept whole while the publisher follows it: a view with a subscriber is
    /// never evicted.
    fn subscribe_after(&self, queue: &mut Queue, resync: bool) -> Result<Subscription, ViewError> {
        let resume = match queue.end {
            Some(position) => Resume::After(position.event_id(&self.target.name)),
            None => Resume::Fresh,
        };
        let mut subscription = self.feed.subscribe(&resume)?;
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
            subscription = self.feed.subscribe(&Resume::Fresh)?;
        }
        queue.stream = Some(subscription.stream().clone());
        // A replay starts right after the line's end: its first change applies to it.
        let mut at = queue.end;
        for initial in std::mem::take(&mut subscription.initial) {
            match initial {
                Initial::Snapshot(snapshot) => {
                    self.queue_snapshot(queue, &snapshot, resync);
                    at = Some(Position {
                        epoch: snapshot.epoch,
                        seq: snapshot.seq,
                    });
                }
                Initial::Change(change) => {
                    let base = base_of(at, &change);
                    at = Some(Position {
                        epoch: change.epoch,
                        seq: change.seq,
                    });
                    self.queue_change(queue, &change, base, None);
                }
                Initial::Failure(_) => {}
            }
        }
        queue.at = Some(Position {
            epoch: subscription.epoch,
            seq: subscription.seq,
        });
        Ok(subscription)
    }

    /// A view that cannot be subscribed to now (too many views): shown, then retried after
    /// the backoff. `Some`: stop following.
    async fn refused(
        &mut self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        error: &ViewError,
    ) -> Option<Stop> {
        let wait = backoff.next();
        tracing::warn!(sink = %self.sink, stream = %self.target.name, %error, retry_in = ?wait, "cannot subscribe to the view");
        let message = error.to_string();
        self.status.update(|s| {
            s.last_error = Some(message);
            s.state = SinkState::Retrying;
        });
        tokio::select! {
            () = shutdown.cancelled() => Some(Stop::Shutdown),
            () = turn_ends(&mut self.turn) => Some(Stop::Turn),
            () = tokio::time::sleep(wait) => None,
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
        let lag = queue
            .stream
            .as_ref()
            .map_or(0, |stream| lag(stream, acknowledged));
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
            None,
            ChangeKind::Snapshot,
            self.mode,
        ) == Next::Skip
        {
            return;
        }
        let message = Message::new(
            &self.target.name,
            &self.target.source,
            snapshot.epoch,
            snapshot.seq,
            ChangeKind::Snapshot,
            0,
            snapshot.at,
            snapshot.json.clone(),
            resync,
        );
        self.push(queue, message);
    }

    /// Queues `change` (a patch of the document at `base`, when known) as it continues the
    /// line: as it is, or as the document after it (`document`, carried by live changes;
    /// history's changes carry none, and the stream's current document, at least as new, stands
    /// in for it).
    fn queue_change(
        &self,
        queue: &mut Queue,
        change: &Change,
        base: Option<u64>,
        document: Option<&Bytes>,
    ) {
        match next(
            queue.end,
            change.epoch,
            change.seq,
            base,
            change.kind,
            self.mode,
        ) {
            Next::Skip => {}
            Next::Change => {
                let message = Message::new(
                    &self.target.name,
                    &self.target.source,
                    change.epoch,
                    change.seq,
                    change.kind,
                    base.unwrap_or(0),
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
                            &self.target.name,
                            &self.target.source,
                            change.epoch,
                            change.seq,
                            ChangeKind::Snapshot,
                            0,
                            change.at,
                            document.clone(),
                            resync,
                        );
                        self.push(queue, message);
                    }
                    None => {
                        if let Some(snapshot) = queue.stream.as_ref().and_then(|s| s.snapshot()) {
                            self.queue_snapshot(queue, &snapshot, resync);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::DiffOptions;
    use crate::hub::StreamOptions;
    use crate::sinks::broker::Broker;
    use crate::snapshot::SnapshotStore;
    use serde_json::json;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A broker in memory that can be taken down; it stores a message only if it follows
    /// the destination's last one (as the Redis script does).
    #[derive(Default)]
    struct Fake {
        down: AtomicBool,
        line: Mutex<Vec<Message>>,
    }

    impl Fake {
        fn check(&self) -> Result<(), BrokerError> {
            if self.down.load(Ordering::SeqCst) {
                Err(BrokerError::Unavailable("down".into()))
            } else {
                Ok(())
            }
        }

        fn line(&self) -> Vec<Message> {
            self.line.lock().unwrap().clone()
        }
    }

    impl Broker for Fake {
        fn prepare(&self) -> BrokerFuture<'_, ()> {
            Box::pin(async { self.check() })
        }

        fn last<'a>(&'a self, _: &'a str, _: &'a str) -> BrokerFuture<'a, Option<Position>> {
            Box::pin(async {
                self.check()?;
                Ok(self.line.lock().unwrap().last().map(Message::position))
            })
        }

        fn publish<'a>(&'a self, _: &'a str, messages: &'a [Message]) -> BrokerFuture<'a, Acked> {
            Box::pin(async move {
                self.check()?;
                let mut line = self.line.lock().unwrap();
                let mut acked = Acked::default();
                for m in messages {
                    match line.last() {
                        Some(l) if l.epoch == m.epoch && m.seq <= l.seq => acked.duplicates += 1,
                        _ => line.push(m.clone()),
                    }
                }
                Ok(acked)
            })
        }
    }

    fn setup(buffer: usize) -> (Arc<Fake>, Arc<Stream>, Arc<SinkStatus>, Publisher) {
        let fake = Arc::new(Fake::default());
        let stream = Arc::new(Stream::new(
            "s",
            StreamOptions {
                history: 100,
                history_bytes: u64::MAX,
                buffer: 1024,
                diff: DiffOptions::default(),
            },
            SnapshotStore::new(),
            Arc::new(Metrics::new()),
        ));
        let status = Arc::new(SinkStatus::new("fake", "fake", "s", None, "s"));
        let publisher = Publisher {
            broker: Arc::new(Prepared::new(fake.clone())),
            feed: Target::Whole(stream.clone()),
            target: SinkStream {
                stream: "s".into(),
                name: "s".into(),
                view: None,
                destination: "s".into(),
                source: "/streams/s".into(),
            },
            sink: "fake".into(),
            mode: Mode::Patch,
            buffer,
            buffer_bytes: u64::MAX,
            batch: 4,
            timeout: Duration::from_secs(1),
            turn: None,
            status: status.clone(),
            metrics: Arc::new(Metrics::new()),
        };
        (fake, stream, status, publisher)
    }

    fn doc(n: u64) -> serde_json::Value {
        json!({"n": n, "pad": "x".repeat(100)})
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    /// The line is whole: each patch follows its base, nothing twice.
    fn whole(line: &[Message]) {
        let mut last = None;
        for m in line {
            assert!(continues(last, m), "{m:?} after {last:?}");
            last = Some(m.position());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_outage_is_ridden_out_from_the_queue() {
        let (fake, stream, status, publisher) = setup(100);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(publisher.run(shutdown.clone()));
        stream.publish(doc(0));
        until("the first message", || fake.line().len() == 1).await;
        fake.down.store(true, Ordering::SeqCst);
        for n in 1..=20 {
            stream.publish(doc(n));
        }
        until("retrying", || status.state() == SinkState::Retrying).await;
        fake.down.store(false, Ordering::SeqCst);
        until("every change", || fake.line().len() == 21).await;
        let line = fake.line();
        whole(&line);
        assert!(line[1..].iter().all(|m| m.kind == ChangeKind::Patch));
        assert_eq!(status.acknowledged(), Some(line[20].position()));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn past_its_buffer_the_sink_is_behind_and_resyncs_with_a_snapshot() {
        let (fake, stream, status, publisher) = setup(5);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(publisher.run(shutdown.clone()));
        stream.publish(doc(0));
        until("the first message", || fake.line().len() == 1).await;
        fake.down.store(true, Ordering::SeqCst);
        for n in 1..=20 {
            stream.publish(doc(n));
        }
        until("behind", || status.state() == SinkState::Behind).await;
        fake.down.store(false, Ordering::SeqCst);
        until("the top", || fake.line().last().map(|m| m.seq) == Some(21)).await;
        let line = fake.line();
        whole(&line);
        assert_eq!(
            line.len(),
            2,
            "the first document, then a snapshot at the top"
        );
        assert!(line[1].resync && line[1].kind == ChangeKind::Snapshot);
        // And patches follow it.
        stream.publish(doc(21));
        until("the next patch", || fake.line().len() == 3).await;
        assert_eq!(fake.line()[2].kind, ChangeKind::Patch);
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_publisher_continues_the_brokers_line_from_history() {
        let (fake, stream, _, publisher) = setup(100);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(publisher.run(shutdown.clone()));
        stream.publish(doc(0));
        stream.publish(doc(1));
        until("the second change", || {
            fake.line().last().map(|m| m.seq) == Some(2)
        })
        .await;
        shutdown.cancel();
        task.await.unwrap();
        // Changes while no publisher ran; a new one reads the broker's line back.
        for n in 2..=6 {
            stream.publish(doc(n));
        }
        let (_, _, _, mut again) = setup(100);
        again.broker = Arc::new(Prepared::new(fake.clone()));
        again.feed = Target::Whole(stream.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(again.run(shutdown.clone()));
        until("every change", || {
            fake.line().last().map(|m| m.seq) == Some(7)
        })
        .await;
        let line = fake.line();
        whole(&line);
        let after = line.iter().position(|m| m.seq == 2).unwrap();
        assert_eq!(line.len(), after + 6, "3 to 7, each once");
        assert!(
            line[after + 1..]
                .iter()
                .all(|m| m.kind == ChangeKind::Patch)
        );
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_turns_holder_publishes() {
        let (fake, stream, status, mut publisher) = setup(100);
        let (turn_tx, turn) = watch::channel(false);
        publisher.turn = Some(turn);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(publisher.run(shutdown.clone()));
        stream.publish(doc(0));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(fake.line().is_empty());
        assert_eq!(status.state(), SinkState::Standby);
        turn_tx.send(true).unwrap();
        until("published", || fake.line().len() == 1).await;
        turn_tx.send(false).unwrap();
        until("standby", || status.state() == SinkState::Standby).await;
        stream.publish(doc(1));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(fake.line().len(), 1);
        turn_tx.send(true).unwrap();
        until("caught up", || fake.line().len() == 2).await;
        whole(&fake.line());
        shutdown.cancel();
        task.await.unwrap();
    }
}

//! Broker sinks: every change of the streams a sink names, published to a message broker the
//! company already runs (NATS JetStream, Redis Streams), in order per stream, at least once
//! across crashes and broker outages, as CloudEvents.
//!
//! Flow: hub → [`publisher::Publisher`] (one per sink and stream: reads back the last message
//! the broker holds for the stream, subscribes to the hub from there, queues messages up to a
//! bound, publishes them in batches and waits for the broker's acknowledgement) → [`Broker`].
//!
//! Modules, each importing only those above it:
//! - [`message`]: the message of a change (CloudEvents attributes and payload), positions read
//!   back from a broker, and whether a change continues a line (pure).
//! - [`config`]: the `[[sinks.nats]]` and `[[sinks.redis]]` sections.
//! - [`nats`], [`redis`]: the two [`Broker`]s.
//! - [`publisher`]: the loop of one sink and stream.
//!
//! **The seam.** A broker is three operations ([`Broker`]): `prepare` (connect; create or verify
//! what must exist), `last` (the position of the last message of a destination, read back from
//! the broker) and `publish` (messages in order, answered once the broker acknowledged them
//! all). Everything else (what to publish, resuming, buffering, resyncing, the cluster's turn,
//! metrics, `/streams`) is the publisher's and shared. A Kafka sink is one more file beside
//! `nats.rs` (the record key is the stream, so a partition keeps its order; `last` reads the
//! partition's last record; headers are the same CloudEvents list), a raw table in `config`
//! and one arm in [`Brokers::start`].
//!
//! Invariants: per stream, messages reach the broker in sequence order, and a patch is only
//! published right after the message holding its base (else the document is published whole);
//! a message leaves the queue only once the broker acknowledged it; after any failure the
//! publisher reads the broker's last message back and continues from it, from the hub's history
//! or with a snapshot. A broker that is down never slows the hub: the publisher's receiver is
//! one more broadcast subscriber, and its own queue is bounded (past the bound it drops the
//! queue, marks itself behind and resyncs with a snapshot once the broker answers).

pub mod config;
pub mod message;
pub mod nats;
pub mod publisher;
pub mod redis;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{OnceCell, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::config::{BrokerKind, BrokerSinkSettings, SinkStream};
use self::message::{Message, Position};
use self::publisher::Publisher;
use crate::hub::Hub;
use crate::metrics::{Metrics, SinkLabels};
use crate::views::{Target, Views};

/// What a broker operation resolves to.
pub type BrokerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'a>>;

/// Why a broker operation failed, by what the publisher does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker is unreachable, timed out or refused this time: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// The broker's setup conflicts with the sink's configuration (an existing JetStream
    /// stream with other limits): nothing will work until someone changes one of them.
    #[error("{0}")]
    Conflict(String),
    /// Another publisher wrote to the destination since this one's last message (JetStream's
    /// fence refused the publish): read the broker's last message back and resume from it, at
    /// once.
    #[error("{0}")]
    Overtaken(String),
    /// A message is larger than the broker takes (NATS `max_payload`): retried like an
    /// outage, counted apart, until the broker's limit is raised or the document shrinks.
    #[error("{0}")]
    TooLarge(String),
}

/// What a broker acknowledged of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acked {
    /// Messages the broker already held (same id) and did not store again.
    pub duplicates: usize,
}

/// A message broker, as every sink uses it (see the module's documentation).
pub trait Broker: Send + Sync {
    /// Connects and creates or verifies what the sink needs (a JetStream stream). Called
    /// until it succeeds; a [`BrokerError::Conflict`] stops the sink.
    fn prepare(&self) -> BrokerFuture<'_, ()>;

    /// The position of the last message of `destination` that belongs to `stream` (`None`:
    /// none, or the last one is not patchwire's).
    fn last<'a>(
        &'a self,
        destination: &'a str,
        stream: &'a str,
    ) -> BrokerFuture<'a, Option<Position>>;

    /// Publishes `messages` to `destination` in order; resolves once the broker acknowledged
    /// every one. Messages the destination already holds are not stored twice.
    fn publish<'a>(
        &'a self,
        destination: &'a str,
        messages: &'a [Message],
    ) -> BrokerFuture<'a, Acked>;
}

/// A broker with its `prepare` done at most once, shared by its publishers.
pub struct Prepared {
    broker: Arc<dyn Broker>,
    done: OnceCell<()>,
}

impl Prepared {
    /// Wraps `broker`.
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Prepared {
            broker,
            done: OnceCell::new(),
        }
    }

    /// The broker, once prepared.
    pub async fn get(&self) -> Result<&dyn Broker, BrokerError> {
        self.done.get_or_try_init(|| self.broker.prepare()).await?;
        Ok(&*self.broker)
    }
}

/// What a publisher is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkState {
    /// Another node of the cluster publishes the stream.
    Standby,
    /// Reading back the broker's last message.
    Connecting,
    /// Publishing (or idle, caught up).
    Publishing,
    /// The broker failed; queued messages wait for it.
    Retrying,
    /// The queue overflowed while the broker failed: a snapshot follows once it answers.
    Behind,
    /// The broker's setup conflicts with the configuration (see `last_error`).
    Failed,
}

impl SinkState {
    /// The state as `/streams` and `/readyz` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkState::Standby => "standby",
            SinkState::Connecting => "connecting",
            SinkState::Publishing => "publishing",
            SinkState::Retrying => "retrying",
            SinkState::Behind => "behind",
            SinkState::Failed => "failed",
        }
    }
}

/// One publisher's position and counts, for `/streams`.
#[derive(Debug)]
pub struct SinkStatus {
    /// The sink's name.
    pub sink: String,
    /// `"nats"` or `"redis"`.
    pub kind: &'static str,
    /// What is published: the stream, or a view's `{stream}@{view}`.
    pub stream: String,
    /// The view's id, when a view is published.
    pub view: Option<String>,
    /// Its subject or key.
    pub destination: String,
    inner: Mutex<StatusInner>,
}

#[derive(Debug)]
struct StatusInner {
    state: SinkState,
    acknowledged: Option<Position>,
    lag: u64,
    queued: usize,
    published: u64,
    acknowledged_messages: u64,
    last_error: Option<String>,
}

impl SinkStatus {
    fn new(
        sink: &str,
        kind: &'static str,
        stream: &str,
        view: Option<&str>,
        destination: &str,
    ) -> Self {
        SinkStatus {
            sink: sink.to_owned(),
            kind,
            stream: stream.to_owned(),
            view: view.map(str::to_owned),
            destination: destination.to_owned(),
            inner: Mutex::new(StatusInner {
                state: SinkState::Connecting,
                acknowledged: None,
                lag: 0,
                queued: 0,
                published: 0,
                acknowledged_messages: 0,
                last_error: None,
            }),
        }
    }

    fn update(&self, change: impl FnOnce(&mut StatusInner)) {
        change(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The state.
    pub fn state(&self) -> SinkState {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .state
    }

    /// The last position the broker acknowledged (or held when read back).
    pub fn acknowledged(&self) -> Option<Position> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .acknowledged
    }

    /// This publisher as `/streams` shows it.
    pub fn describe(&self) -> Value {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        json!({
            "sink": self.sink,
            "kind": self.kind,
            "view": self.view,
            "destination": self.destination,
            "state": inner.state.as_str(),
            "acknowledged": inner.acknowledged.map(|p| p.event_id(&self.stream)),
            "lag": inner.lag,
            "queued": inner.queued,
            "published": inner.published,
            "acknowledged_messages": inner.acknowledged_messages,
            "last_error": inner.last_error,
        })
    }
}

/// Why the broker sinks could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A sink's broker conflicts with its configuration.
    #[error("sink {sink:?}: {message}")]
    Conflict {
        /// The sink.
        sink: String,
        /// What conflicts.
        message: String,
    },
    /// A sink's view could not be had (its stream's views differ from the configuration's).
    #[error("sink {sink:?}: view {view:?}: {message}")]
    View {
        /// The sink.
        sink: String,
        /// The view, `{stream}@{view}`.
        view: String,
        /// Why.
        message: String,
    },
    /// A sink's client could not be built from its URL.
    #[error("sink {sink:?}: {message}")]
    Client {
        /// The sink.
        sink: String,
        /// Why.
        message: String,
    },
}

/// Whose turn it is to publish a stream, in a cluster: `true` while it is this node's.
pub type Turn = watch::Receiver<bool>;

/// Each stream's [`Turn`], in a cluster (absent: always this node's).
pub type Turns = HashMap<String, Turn>;

/// The running broker sinks: started with the application, reconciled by each configuration
/// reload ([`Brokers::reload`]).
pub struct Brokers {
    /// The sinks, in the configuration's order; locked for a whole reload.
    sinks: tokio::sync::Mutex<Vec<RunningSink>>,
    /// Every publisher's status, as `/streams` and `/readyz` show them (replaced as a whole
    /// after a reload).
    statuses: RwLock<Vec<Arc<SinkStatus>>>,
    /// How many sinks are configured.
    configured: AtomicUsize,
    /// Where publishers run: the application's tasks, which shutdown waits for.
    tasks: TaskTracker,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    /// How NATS publishes are fenced: every one in a cluster (where every publisher needs its
    /// stream's turn).
    fence: nats::Fence,
}

/// One running sink: its settings, its broker and a publisher per stream or view.
struct RunningSink {
    settings: BrokerSinkSettings,
    broker: Arc<Prepared>,
    publishers: Vec<RunningPublisher>,
}

/// One running publisher, stopped on its own when a reload removes or changes its target.
struct RunningPublisher {
    target: SinkStream,
    status: Arc<SinkStatus>,
    stop: CancellationToken,
    /// Its one task: waited for when it is stopped.
    task: TaskTracker,
}

/// A sink's broker as a reload connected it, and the error it met (its publishers retry).
type Connected = (Result<Arc<Prepared>, StartError>, Option<String>);

/// What a reload did to one sink, for the reload's answer and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkReload {
    /// The sink.
    pub sink: String,
    /// `added`, `removed`, `restarted` (its broker's settings changed: every publisher
    /// started again), `updated` (some of its streams or views started or stopped) or
    /// `unchanged`.
    pub change: &'static str,
    /// Streams and views whose publishers started.
    pub started: Vec<String>,
    /// Streams and views whose publishers stopped.
    pub stopped: Vec<String>,
    /// What went wrong (the broker unreachable, a conflict, a view that cannot be had): the
    /// reload still applies; the publishers retry and show the error in `/streams`.
    pub errors: Vec<String>,
}

impl SinkReload {
    /// As the reload's answer shows it.
    pub fn describe(&self) -> Value {
        json!({
            "sink": self.sink,
            "change": self.change,
            "started": self.started,
            "stopped": self.stopped,
            "errors": self.errors,
        })
    }
}

/// How long stopping a publisher may take: its batch in flight gets the sink's timeout, then
/// it is abandoned.
fn stop_within(timeout: Duration) -> Duration {
    timeout + Duration::from_secs(1)
}

/// What identifies a sink's broker and publishing: everything but the list of its streams
/// (for NATS, also the subjects, which its JetStream stream is made to take when the sink
/// starts). Two sinks with the same key share a running broker across a reload.
fn broker_key(sink: &BrokerSinkSettings) -> String {
    let (url, subjects) = match &sink.kind {
        BrokerKind::Nats(nats) => {
            let mut subjects: Vec<&str> = sink
                .streams
                .iter()
                .map(|s| s.destination.as_str())
                .collect();
            subjects.sort_unstable();
            subjects.dedup();
            (nats.url.as_str(), subjects)
        }
        BrokerKind::Redis(redis) => (redis.url.as_str(), Vec::new()),
    };
    // `Debug` hides the URL's credentials: the URL is compared whole, apart.
    format!(
        "{:?}|{:?}|{}|{}|{}|{:?}|{:?}|{url}|{subjects:?}",
        sink.name, sink.mode, sink.buffer, sink.buffer_bytes, sink.batch, sink.timeout, sink.kind
    )
}

impl Brokers {
    /// Connects every sink's broker, prepares it (within the sink's timeout: a broker that is
    /// down does not hold the start up, but a conflict found now fails it), and spawns one
    /// publisher per sink and stream (or view, among `views`) into `tasks`. In a cluster
    /// (`clustered`), `turns` holds every stream's [`Turn`]; empty on a single node.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        settings: &[BrokerSinkSettings],
        hub: &Hub,
        views: &Views,
        clustered: bool,
        turns: &Turns,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Result<Brokers, StartError> {
        let mut brokers = Brokers {
            sinks: tokio::sync::Mutex::new(Vec::new()),
            statuses: RwLock::new(Vec::new()),
            configured: AtomicUsize::new(settings.len()),
            tasks,
            shutdown,
            metrics,
            // In a cluster two nodes may publish a stream around a handover.
            fence: if !clustered {
                nats::Fence::First
            } else {
                nats::Fence::Every
            },
        };
        let mut running = Vec::new();
        for sink in settings {
            let broker = brokers.broker(sink)?;
            match tokio::time::timeout(sink.timeout, broker.get()).await {
                Ok(Ok(_)) => {
                    tracing::info!(sink = %sink.name, kind = sink.kind.as_str(), "broker sink ready")
                }
                Ok(Err(BrokerError::Conflict(message))) => {
                    return Err(StartError::Conflict {
                        sink: sink.name.clone(),
                        message,
                    });
                }
                Ok(Err(error)) => {
                    tracing::warn!(sink = %sink.name, %error, "broker unavailable at start; its publishers retry")
                }
                Err(_) => {
                    tracing::warn!(sink = %sink.name, "broker did not answer at start; its publishers retry")
                }
            }
            let mut publishers = Vec::new();
            for target in &sink.streams {
                let turn = turns.get(&target.stream).cloned();
                if let Some(publisher) =
                    brokers.publisher(sink, &broker, target, hub, views, turn)?
                {
                    publishers.push(publisher);
                }
            }
            running.push(RunningSink {
                settings: sink.clone(),
                broker,
                publishers,
            });
        }
        brokers.show(&running);
        *brokers.sinks.get_mut() = running;
        Ok(brokers)
    }

    /// Whether any sink is configured.
    pub fn is_empty(&self) -> bool {
        self.configured.load(Ordering::Relaxed) == 0
    }

    /// A sink's broker (not connected yet).
    fn broker(&self, sink: &BrokerSinkSettings) -> Result<Arc<Prepared>, StartError> {
        let broker: Arc<dyn Broker> = match &sink.kind {
            BrokerKind::Nats(nats) => Arc::new(nats::Nats::connect(
                nats.clone(),
                sink.streams.iter().map(|s| s.destination.clone()).collect(),
                sink.timeout,
                self.fence,
            )),
            BrokerKind::Redis(redis) => Arc::new(
                redis::RedisStreams::connect(redis, sink.timeout).map_err(|message| {
                    StartError::Client {
                        sink: sink.name.clone(),
                        message,
                    }
                })?,
            ),
        };
        Ok(Arc::new(Prepared::new(broker)))
    }

    /// Starts the publisher of `target` for `sink`, publishing during `turn` (always without
    /// one); `None` when its stream is not in the hub.
    fn publisher(
        &self,
        sink: &BrokerSinkSettings,
        broker: &Arc<Prepared>,
        target: &SinkStream,
        hub: &Hub,
        views: &Views,
        turn: Option<Turn>,
    ) -> Result<Option<RunningPublisher>, StartError> {
        let feed = match &target.view {
            None => hub
                .get(&target.stream)
                .map(|stream| Ok(Target::Whole(stream))),
            // Resolved as a subscription's request is, to the view the configuration
            // named (validation resolved the same id).
            Some(view) => match &view.query {
                Some(query) => views.target(hub, &target.stream, Some(query)),
                None => views.target(hub, &target.name, None),
            },
        };
        let feed = match feed {
            None => return Ok(None),
            // The configuration named the view by the id the views resolve it to at
            // run time (the same rule), so messages and subscriptions agree on it.
            Some(Ok(Target::View(_, _, id, _)))
                if target.view.as_ref().is_some_and(|v| *v.id != *id) =>
            {
                return Err(StartError::View {
                    sink: sink.name.clone(),
                    view: target.name.clone(),
                    message: format!("resolves to the view {id:?} at run time"),
                });
            }
            Some(Ok(feed)) => feed,
            Some(Err(error)) => {
                return Err(StartError::View {
                    sink: sink.name.clone(),
                    view: target.name.clone(),
                    message: error.to_string(),
                });
            }
        };
        let status = Arc::new(SinkStatus::new(
            &sink.name,
            sink.kind.as_str(),
            &target.name,
            target.view.as_ref().map(|v| v.id.as_str()),
            &target.destination,
        ));
        let publisher = Publisher {
            broker: broker.clone(),
            feed,
            target: target.clone(),
            sink: sink.name.clone(),
            mode: sink.mode,
            buffer: sink.buffer,
            buffer_bytes: sink.buffer_bytes,
            batch: sink.batch,
            timeout: sink.timeout,
            turn,
            status: status.clone(),
            metrics: self.metrics.clone(),
        };
        let stop = self.shutdown.child_token();
        let task = TaskTracker::new();
        self.tasks
            .spawn(task.track_future(publisher.run(stop.clone())));
        task.close();
        Ok(Some(RunningPublisher {
            target: target.clone(),
            status,
            stop,
            task,
        }))
    }

    /// Stops `publishers` of `sink` and waits for them: a batch in flight gets the sink's
    /// timeout to be acknowledged, else it is abandoned with a log line (the broker holds
    /// each message whole or not at all; whoever publishes the stream next reads the last one
    /// back). Their views' subscriptions are released with them.
    async fn stop(&self, sink: &BrokerSinkSettings, publishers: Vec<RunningPublisher>) {
        for publisher in &publishers {
            publisher.stop.cancel();
        }
        let within = stop_within(sink.timeout);
        for publisher in publishers {
            if tokio::time::timeout(within, publisher.task.wait())
                .await
                .is_err()
            {
                tracing::warn!(sink = %sink.name, stream = %publisher.target.name, "the publisher did not stop in time; it ends with the process");
            }
            self.metrics.broker_lag.remove(&SinkLabels {
                sink: sink.name.clone(),
                stream: publisher.target.name.clone(),
            });
        }
    }

    /// Applies a reloaded configuration's sinks (`settings`): a sink gone stops; a sink whose
    /// broker settings changed ([`broker_key`]) stops and starts again; a new sink connects
    /// (within its timeout, without holding the reload up longer) and starts; for the others,
    /// the publishers of streams and views gone (or changed) stop and those of new ones start,
    /// the rest keep running untouched. `replaced` names the streams whose views the reload
    /// replaced: their views' publishers start again on the new views; `retaken` names the
    /// streams whose turn the reload replaced (in a cluster, a lease taken anew): all their
    /// publishers start again with the new turn. The streams of the hub must already be the
    /// new configuration's. `turns`: the [`Turn`] of each stream, in a cluster.
    pub async fn reload(
        &self,
        settings: &[BrokerSinkSettings],
        hub: &Hub,
        views: &Views,
        turns: &Turns,
        replaced: &HashSet<String>,
        retaken: &HashSet<String>,
    ) -> Vec<SinkReload> {
        let mut sinks = self.sinks.lock().await;
        let mut old: Vec<RunningSink> = std::mem::take(&mut *sinks);
        let mut answers = Vec::new();
        // First every publisher that goes stops, so that one starting again on the same
        // destination reads back what the old one finished.
        let mut kept: HashMap<String, RunningSink> = HashMap::new();
        for mut sink in old.drain(..) {
            let new = settings.iter().find(|s| s.name == sink.settings.name);
            match new {
                Some(new) if broker_key(new) == broker_key(&sink.settings) => {
                    let mut stopping = Vec::new();
                    let mut stopped = Vec::new();
                    for publisher in std::mem::take(&mut sink.publishers) {
                        let same = new
                            .streams
                            .iter()
                            .any(|t| format!("{t:?}") == format!("{:?}", publisher.target));
                        let view_replaced = publisher.target.view.is_some()
                            && replaced.contains(&publisher.target.stream);
                        let turn_replaced = retaken.contains(&publisher.target.stream);
                        if same && !view_replaced && !turn_replaced {
                            sink.publishers.push(publisher);
                        } else {
                            stopped.push(publisher.target.name.clone());
                            stopping.push(publisher);
                        }
                    }
                    self.stop(&sink.settings, stopping).await;
                    answers.push(SinkReload {
                        sink: sink.settings.name.clone(),
                        change: "unchanged",
                        started: Vec::new(),
                        stopped,
                        errors: Vec::new(),
                    });
                    kept.insert(sink.settings.name.clone(), sink);
                }
                _ => {
                    let stopped = sink
                        .publishers
                        .iter()
                        .map(|p| p.target.name.clone())
                        .collect();
                    let name = sink.settings.name.clone();
                    tracing::info!(sink = %name, "broker sink stopping (configuration reload)");
                    self.stop(&sink.settings, sink.publishers).await;
                    answers.push(SinkReload {
                        sink: name,
                        change: if new.is_some() {
                            "restarted"
                        } else {
                            "removed"
                        },
                        started: Vec::new(),
                        stopped,
                        errors: Vec::new(),
                    });
                }
            }
        }
        // New sinks connect all at once, each within its timeout.
        let connecting = settings
            .iter()
            .filter(|s| !kept.contains_key(&s.name))
            .map(|sink| async move { (sink.name.clone(), self.connect(sink).await) });
        let mut fresh: HashMap<String, Connected> = futures_util::future::join_all(connecting)
            .await
            .into_iter()
            .collect();
        for sink in settings {
            let answer_at = answers.iter().position(|a| a.sink == sink.name);
            let mut answer = SinkReload {
                sink: sink.name.clone(),
                change: "added",
                started: Vec::new(),
                stopped: Vec::new(),
                errors: Vec::new(),
            };
            if let Some(at) = answer_at {
                let earlier = answers.remove(at);
                answer.change = earlier.change;
                answer.stopped = earlier.stopped;
            }
            let mut running = match kept.remove(&sink.name) {
                Some(running) => running,
                None => {
                    let Some((broker, error)) = fresh.remove(&sink.name) else {
                        continue;
                    };
                    let broker = match broker {
                        Ok(broker) => broker,
                        Err(error) => {
                            tracing::error!(sink = %sink.name, %error, "broker sink cannot start (configuration reload)");
                            answer.errors.push(error.to_string());
                            answers.push(answer);
                            continue;
                        }
                    };
                    match &error {
                        None => {
                            tracing::info!(sink = %sink.name, kind = sink.kind.as_str(), "broker sink ready (configuration reload)")
                        }
                        Some(error) => {
                            tracing::warn!(sink = %sink.name, %error, "broker unavailable at reload; its publishers retry");
                            answer.errors.push(error.clone());
                        }
                    }
                    RunningSink {
                        settings: sink.clone(),
                        broker,
                        publishers: Vec::new(),
                    }
                }
            };
            for target in &sink.streams {
                if running
                    .publishers
                    .iter()
                    .any(|p| p.target.name == target.name)
                {
                    continue;
                }
                let turn = turns.get(&target.stream).cloned();
                if self.fence == nats::Fence::Every && turn.is_none() {
                    // In a cluster a publisher without its stream's turn would publish beside
                    // the node whose turn it is.
                    let error = format!(
                        "{}: in a cluster a publisher starts only with its stream's turn",
                        target.name
                    );
                    tracing::error!(sink = %sink.name, %error, "broker sink publisher not started (configuration reload)");
                    answer.errors.push(error);
                    continue;
                }
                match self.publisher(sink, &running.broker, target, hub, views, turn) {
                    Ok(Some(publisher)) => {
                        answer.started.push(target.name.clone());
                        running.publishers.push(publisher);
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::error!(sink = %sink.name, %error, "broker sink publisher cannot start (configuration reload)");
                        answer.errors.push(error.to_string());
                    }
                }
            }
            running.settings = sink.clone();
            if answer.change == "unchanged"
                && !(answer.started.is_empty() && answer.stopped.is_empty())
            {
                answer.change = "updated";
            }
            if answer.change != "unchanged" {
                tracing::info!(sink = %sink.name, change = answer.change, started = ?answer.started, stopped = ?answer.stopped, "broker sink reloaded");
            }
            answers.push(answer);
            sinks.push(running);
        }
        self.show(&sinks);
        self.configured.store(sinks.len(), Ordering::Relaxed);
        answers
    }

    /// A new sink's broker, connected and prepared within the sink's timeout; with what went
    /// wrong, if anything (its publishers then retry).
    async fn connect(&self, sink: &BrokerSinkSettings) -> Connected {
        let broker = match self.broker(sink) {
            Ok(broker) => broker,
            Err(error) => return (Err(error), None),
        };
        let error = match tokio::time::timeout(sink.timeout, broker.get()).await {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!(
                "the broker did not answer within {}",
                humantime::format_duration(sink.timeout)
            )),
        };
        (Ok(broker), error)
    }

    /// Publishes the statuses of `sinks` for `/streams` and `/readyz`.
    fn show(&self, sinks: &[RunningSink]) {
        let statuses = sinks
            .iter()
            .flat_map(|s| &s.publishers)
            .map(|p| p.status.clone())
            .collect();
        *self
            .statuses
            .write()
            .unwrap_or_else(PoisonError::into_inner) = statuses;
    }

    /// The publishers of `stream` and of its views, as `/streams` shows them.
    pub fn describe(&self, stream: &str) -> Vec<Value> {
        self.statuses()
            .iter()
            .filter(|s| {
                s.stream
                    .strip_prefix(stream)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('@'))
            })
            .map(|s| s.describe())
            .collect()
    }

    /// Every publisher's status.
    pub fn statuses(&self) -> Vec<Arc<SinkStatus>> {
        self.statuses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileKind, parse_raw, validate};

    /// The validated sinks of a file with the push streams `a` and `b` and `sinks`.
    fn sinks(sinks: &str) -> Vec<BrokerSinkSettings> {
        let toml = format!(
            "[push]\ntoken = \"push-token-0123456789\"\n\
             [[streams]]\nname = \"a\"\nsource = \"push\"\n\
             [[streams]]\nname = \"b\"\nsource = \"push\"\n{sinks}"
        );
        let raw = parse_raw(&toml, FileKind::Toml, None, Vec::new()).expect("parses");
        validate(raw, None, &|_| None).expect("valid").broker_sinks
    }

    fn key(toml: &str) -> String {
        broker_key(&sinks(toml)[0])
    }

    #[test]
    fn a_sink_starts_again_only_when_its_broker_or_publishing_settings_change() {
        let redis = "[[sinks.redis]]\nurl = \"redis://127.0.0.1:6379\"\n";
        // Its streams and keys are its publishers' own: the broker stays.
        assert_eq!(key(redis), key(&format!("{redis}streams = [\"a\"]\n")));
        assert_eq!(key(redis), key(&format!("{redis}key = \"k:{{stream}}\"\n")));
        // The URL, its credentials (hidden by `Debug`) included, and what publishing does.
        assert_ne!(
            key(redis),
            key("[[sinks.redis]]\nurl = \"redis://:secret@127.0.0.1:6379\"\n")
        );
        assert_ne!(key(redis), key(&format!("{redis}batch = 7\n")));
        assert_ne!(key(redis), key(&format!("{redis}timeout = \"2s\"\n")));
        // A NATS sink's JetStream stream is made to take its subjects when it starts.
        let nats = "[[sinks.nats]]\nurl = \"nats://127.0.0.1:4222\"\n";
        assert_ne!(key(nats), key(&format!("{nats}streams = [\"a\"]\n")));
        assert_eq!(
            key(&format!("{nats}streams = [\"a\", \"b\"]\n")),
            key(&format!("{nats}streams = [\"b\", \"a\"]\n"))
        );
    }
}

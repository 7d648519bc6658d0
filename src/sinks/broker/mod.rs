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

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Value, json};
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::config::{BrokerKind, BrokerSinkSettings};
use self::message::{Message, Position};
use self::publisher::Publisher;
use crate::hub::Hub;
use crate::metrics::Metrics;
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

/// Whose turn it is to publish each stream, in a cluster (absent: always this node's).
pub type Turns = HashMap<String, watch::Receiver<bool>>;

/// The running broker sinks.
pub struct Brokers {
    statuses: Vec<Arc<SinkStatus>>,
}

impl Brokers {
    /// Connects every sink's broker, prepares it (within the sink's timeout: a broker that is
    /// down does not hold the start up, but a conflict found now fails it), and spawns one
    /// publisher per sink and stream (or view, among `views`) into `tasks`.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        settings: &[BrokerSinkSettings],
        hub: &Hub,
        views: &Views,
        turns: &Turns,
        tasks: &mut JoinSet<()>,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Result<Brokers, StartError> {
        let mut statuses = Vec::new();
        for sink in settings {
            let broker: Arc<dyn Broker> = match &sink.kind {
                BrokerKind::Nats(nats) => Arc::new(nats::Nats::connect(
                    nats.clone(),
                    sink.streams.iter().map(|s| s.destination.clone()).collect(),
                    sink.timeout,
                    // In a cluster two nodes may publish a stream around a handover.
                    if turns.is_empty() {
                        nats::Fence::First
                    } else {
                        nats::Fence::Every
                    },
                )),
                BrokerKind::Redis(redis) => {
                    Arc::new(redis::RedisStreams::connect(redis, sink.timeout).map_err(
                        |message| StartError::Client {
                            sink: sink.name.clone(),
                            message,
                        },
                    )?)
                }
            };
            let prepared = Arc::new(Prepared::new(broker));
            match tokio::time::timeout(sink.timeout, prepared.get()).await {
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
            for target in &sink.streams {
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
                    None => continue,
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
                statuses.push(status.clone());
                let publisher = Publisher {
                    broker: prepared.clone(),
                    feed,
                    target: target.clone(),
                    sink: sink.name.clone(),
                    mode: sink.mode,
                    buffer: sink.buffer,
                    buffer_bytes: sink.buffer_bytes,
                    batch: sink.batch,
                    timeout: sink.timeout,
                    turn: turns.get(&target.stream).cloned(),
                    status,
                    metrics: metrics.clone(),
                };
                tasks.spawn(publisher.run(shutdown.clone()));
            }
        }
        Ok(Brokers { statuses })
    }

    /// The publishers of `stream` and of its views, as `/streams` shows them.
    pub fn describe(&self, stream: &str) -> Vec<Value> {
        self.statuses
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
    pub fn statuses(&self) -> &[Arc<SinkStatus>] {
        &self.statuses
    }
}

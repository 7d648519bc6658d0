//! This node's membership in the cluster: its connection to Redis, its heartbeat, its
//! follower, and, per stream, a lease keeper, a writer, and the driver that runs the stream's
//! poller while this node holds the lease.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::config::ClusterSettings;
use super::demand;
use super::follow::{Catchup, Follower};
use super::keys::Keys;
use super::lease::{self, Holding, Keeper, Releases, Taking};
use super::replica::Replicas;
use super::store::{Claimed, Retention, Store, StoreError};
use super::writer::Writer;
use crate::hub::Stream;
use crate::metrics::Metrics;

/// What [`Cluster::on_demand`] gives a stream polled on demand.
pub struct OnDemandLease {
    /// Whether this node holds the lease (the poller's turns, the writer's fence).
    pub held: watch::Receiver<Option<Holding>>,
    /// The shortest poll period any node's subscribers ask for.
    pub shortest: watch::Receiver<Duration>,
    /// The keeper and the demand tasks, to run.
    pub tasks: Vec<Task>,
}

/// A task the application runs.
pub type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// This node's part of the cluster.
pub struct Cluster {
    settings: ClusterSettings,
    node: Arc<str>,
    client: redis::Client,
    store: Store,
    metrics: Arc<Metrics>,
    releases: Arc<Releases>,
    /// Rung by the follower when another node left the live set.
    left: Arc<Notify>,
    nodes: watch::Receiver<Arc<[String]>>,
    nodes_tx: watch::Sender<Arc<[String]>>,
    reachable: watch::Receiver<bool>,
    reachable_tx: watch::Sender<bool>,
    following: watch::Receiver<bool>,
    following_tx: watch::Sender<bool>,
    loaded: watch::Receiver<bool>,
    loaded_tx: watch::Sender<bool>,
}

impl Cluster {
    /// Prepares the connection to Redis (made on first use: a node whose Redis is down starts,
    /// serves what it has and is not ready until Redis answers).
    pub fn connect(settings: &ClusterSettings, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let client = redis::Client::open(settings.redis.clone())?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.timeout))
            .set_connection_timeout(Some(settings.timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(usize::MAX);
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        let store = Store::new(connection, Keys::new(&settings.prefix));
        let (nodes_tx, nodes) = watch::channel(Arc::from(Vec::new()));
        let (reachable_tx, reachable) = watch::channel(false);
        let (following_tx, following) = watch::channel(false);
        let (loaded_tx, loaded) = watch::channel(false);
        Ok(Cluster {
            node: Arc::from(settings.node_id.0.as_str()),
            settings: settings.clone(),
            client,
            store,
            metrics,
            releases: Arc::default(),
            left: Arc::default(),
            nodes,
            nodes_tx,
            reachable,
            reachable_tx,
            following,
            following_tx,
            loaded,
            loaded_tx,
        })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The settings.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// Whether this node can serve as a member: Redis answers and the follower is caught up.
    pub fn ready(&self) -> bool {
        *self.reachable.borrow() && *self.following.borrow()
    }

    /// Becomes true once, when this node first caught up with the log: before, its streams
    /// may not know the cluster's epoch yet, so a resume there would get a snapshot.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.clone()
    }

    /// The live nodes, as this node last saw them.
    pub fn nodes(&self) -> Arc<[String]> {
        self.nodes.borrow().clone()
    }

    /// How a stream with this history is kept in Redis.
    pub fn retention(&self, history: usize, history_bytes: u64) -> Retention {
        Retention {
            history,
            history_bytes,
            ttl: self.settings.key_ttl,
        }
    }

    /// Catching up, with `history` changes kept for resuming subscribers.
    pub fn catchup(&self, history: usize) -> Catchup {
        Catchup {
            store: self.store.clone(),
            history,
            metrics: self.metrics.clone(),
        }
    }

    /// The heartbeat and the follower of `replicas` (each keeper waits for the first
    /// heartbeat, so the first rendezvous already counts this node).
    pub fn tasks(
        &self,
        replicas: Arc<dyn Replicas>,
        history: usize,
        shutdown: &CancellationToken,
    ) -> Vec<Task> {
        let membership = lease::membership(
            self.store.clone(),
            self.node.clone(),
            self.settings.lease_ttl,
            self.nodes_tx.clone(),
            self.reachable_tx.clone(),
            self.left.clone(),
            self.metrics.clone(),
            shutdown.clone(),
        );
        let follower = Follower {
            catchup: self.catchup(history),
            client: self.client.clone(),
            node: self.node.clone(),
            replicas,
            releases: self.releases.clone(),
            left: self.left.clone(),
            probe_interval: self.settings.probe_interval,
            following: self.following_tx.clone(),
            loaded: self.loaded_tx.clone(),
        };
        vec![
            Box::pin(membership),
            Box::pin(follower.run(shutdown.clone())),
        ]
    }

    /// Keeps `stream`'s lease (the task to run, until `retired`: the stream removed, or the
    /// node's shutdown) for this node's configuration of it (`config`, which a reload
    /// changes); the watch says whether this node holds it.
    pub fn keep_lease(
        &self,
        stream: &str,
        retention: Retention,
        config: watch::Receiver<Option<Arc<str>>>,
        retired: &CancellationToken,
    ) -> (watch::Receiver<Option<Holding>>, Task) {
        let (held_tx, held) = watch::channel(None);
        let keeper = Keeper {
            store: self.store.clone(),
            node: self.node.clone(),
            stream: stream.to_owned(),
            ttl: self.settings.lease_ttl,
            retention,
            nodes: self.nodes.clone(),
            released: self.releases.of(stream),
            held: held_tx,
            metrics: self.metrics.clone(),
            taking: Taking::Always,
            node_shutdown: retired.clone(),
            config,
        };
        (held, Box::pin(keeper.run(retired.clone())))
    }

    /// Claims `stream`'s log for this node's configuration of it (its fingerprint `config`),
    /// as the node loads it (see [`super::scripts::CLAIM`]): the task retries until Redis
    /// answers or `retired`.
    pub fn claim(
        &self,
        stream: &str,
        config: Arc<str>,
        retention: Retention,
        retired: &CancellationToken,
    ) -> Task {
        let store = self.store.clone();
        let node = self.node.clone();
        let stream = stream.to_owned();
        let retired = retired.clone();
        Box::pin(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                match store.claim(&stream, &node, &config, &retention).await {
                    Ok(Claimed::Claimed) => {
                        tracing::info!(stream = %stream, "the stream's log now follows this node's configuration of it: it starts over in a new epoch; nodes with the previous one stand by until reloaded");
                        return;
                    }
                    Ok(Claimed::Same | Claimed::Recorded) => return,
                    Err(error) => {
                        tracing::debug!(stream = %stream, %error, retry_in = ?delay, "cannot claim the stream's log for this configuration yet");
                    }
                }
                tokio::select! {
                    () = retired.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        })
    }

    /// A stream polled only while subscribers want it (a dynamic stream of the proxy mode):
    /// this node's demand for it, kept in Redis while `local` (its subscriptions here) is
    /// above zero, each asking for polls every `period`; the lease, which only nodes that want
    /// the stream take; and the shortest period any node asks for, which the poller follows.
    /// The tasks end with `retired` (the stream retired here) or `shutdown` (the node).
    /// `config` is the fingerprint of this node's configuration of a configured stream
    /// (`None` for a dynamic stream).
    #[allow(clippy::too_many_arguments)]
    pub fn on_demand(
        &self,
        local_copy: &Arc<Stream>,
        retention: Retention,
        local: watch::Receiver<usize>,
        period: watch::Receiver<Duration>,
        config: watch::Receiver<Option<Arc<str>>>,
        retired: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> OnDemandLease {
        let stream = local_copy.name();
        let (nodes_tx, nodes) = watch::channel(Arc::from(Vec::new()));
        let (shortest_tx, shortest) = watch::channel(*period.borrow());
        // Another node may serve the stream already: its subscribers here start from the log.
        let catchup = self.catchup(retention.history);
        let copy = local_copy.clone();
        let load: Task = Box::pin(async move {
            if let Err(error) = catchup.reload(&copy).await {
                tracing::debug!(stream = copy.name(), %error, "cannot load the stream from the log yet");
            }
        });
        let (held_tx, held) = watch::channel(None);
        let keeper = Keeper {
            store: self.store.clone(),
            node: self.node.clone(),
            stream: stream.to_owned(),
            ttl: self.settings.lease_ttl,
            retention,
            nodes,
            released: self.releases.of(stream),
            held: held_tx,
            metrics: self.metrics.clone(),
            taking: Taking::OnDemand,
            node_shutdown: shutdown.clone(),
            config,
        };
        let wants = demand::Wants {
            store: self.store.clone(),
            node: self.node.clone(),
            stream: stream.to_owned(),
            ttl: self.settings.lease_ttl,
            local,
            period,
            nodes: nodes_tx,
            shortest: shortest_tx,
            metrics: self.metrics.clone(),
        };
        OnDemandLease {
            held,
            shortest,
            tasks: vec![
                load,
                Box::pin(keeper.run(retired.clone())),
                Box::pin(wants.run(retired.clone())),
            ],
        }
    }

    /// Whether this node publishes `stream` to brokers, following its lease (`held`): a watch
    /// and the task that keeps it (until `shutdown`, the lease's end, or the watch's last
    /// receiver dropped).
    pub fn lease_turn(
        &self,
        mut held: watch::Receiver<Option<Holding>>,
        shutdown: &CancellationToken,
    ) -> (watch::Receiver<bool>, Task) {
        let (turn_tx, turn) = watch::channel(held.borrow().is_some());
        let shutdown = shutdown.clone();
        let task: Task = Box::pin(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    // Nobody follows the turn any more (its publisher stopped, or a reload
                    // asked for it and started none).
                    () = turn_tx.closed() => return,
                    changed = held.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let mine = held.borrow_and_update().is_some();
                        turn_tx.send_if_modified(|t| std::mem::replace(t, mine) != mine);
                    }
                }
            }
        });
        (turn, task)
    }

    /// Whether this node publishes `stream` (a push stream, which has no lease) to brokers:
    /// while it is the stream's rendezvous owner among the live nodes, as every node computes
    /// alike. A watch and the task that keeps it.
    pub fn owner_turn(
        &self,
        stream: &str,
        shutdown: &CancellationToken,
    ) -> (watch::Receiver<bool>, Task) {
        let owner = |nodes: &[String], node: &str, stream: &str| {
            super::rendezvous::ranking(stream, nodes).first() == Some(&node)
        };
        let mut nodes = self.nodes.clone();
        let node = self.node.clone();
        let stream = stream.to_owned();
        let (turn_tx, turn) = watch::channel(owner(&nodes.borrow(), &node, &stream));
        let shutdown = shutdown.clone();
        let task: Task = Box::pin(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = turn_tx.closed() => return,
                    changed = nodes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let mine = owner(&nodes.borrow_and_update(), &node, &stream);
                        turn_tx.send_if_modified(|t| std::mem::replace(t, mine) != mine);
                    }
                }
            }
        });
        (turn, task)
    }

    /// Forgets what this node kept for a retired dynamic stream.
    pub fn forget(&self, stream: &str) {
        self.releases.forget(stream);
    }

    /// The writer of `stream` on this node: fenced by `lease` for a polled stream; `config`
    /// the fingerprint of this node's configuration of a configured stream (its appends are
    /// refused while the log belongs to another).
    pub fn writer(
        &self,
        stream: Arc<Stream>,
        retention: Retention,
        lease: Option<watch::Receiver<Option<Holding>>>,
        config: Option<Arc<str>>,
    ) -> Arc<Writer> {
        Arc::new(Writer::new(
            stream,
            self.catchup(retention.history),
            self.node.clone(),
            retention,
            lease,
            config,
        ))
    }
}

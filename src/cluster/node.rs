//! This node's membership in the cluster: its connection to Redis, its heartbeat, its
//! follower, and, per stream, a lease keeper, a writer, and the driver that runs the stream's
//! poller while this node holds the lease.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::config::ClusterSettings;
use super::follow::{Catchup, Follower};
use super::keys::Keys;
use super::lease::{self, Holding, Keeper, Releases};
use super::replica::Replicas;
use super::store::{Retention, Store, StoreError};
use super::writer::Writer;
use crate::hub::Stream;
use crate::metrics::Metrics;

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
    nodes: watch::Receiver<Arc<[String]>>,
    nodes_tx: watch::Sender<Arc<[String]>>,
    reachable: watch::Receiver<bool>,
    reachable_tx: watch::Sender<bool>,
    following: watch::Receiver<bool>,
    following_tx: watch::Sender<bool>,
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
        Ok(Cluster {
            node: Arc::from(settings.node_id.0.as_str()),
            settings: settings.clone(),
            client,
            store,
            metrics,
            releases: Arc::default(),
            nodes,
            nodes_tx,
            reachable,
            reachable_tx,
            following,
            following_tx,
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
            self.metrics.clone(),
            shutdown.clone(),
        );
        let follower = Follower {
            catchup: self.catchup(history),
            client: self.client.clone(),
            node: self.node.clone(),
            replicas,
            releases: self.releases.clone(),
            probe_interval: self.settings.probe_interval,
            following: self.following_tx.clone(),
        };
        vec![
            Box::pin(membership),
            Box::pin(follower.run(shutdown.clone())),
        ]
    }

    /// Keeps `stream`'s lease (the task to run); the watch says whether this node holds it.
    pub fn keep_lease(
        &self,
        stream: &str,
        retention: Retention,
        shutdown: &CancellationToken,
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
        };
        (held, Box::pin(keeper.run(shutdown.clone())))
    }

    /// The writer of `stream` on this node: fenced by `lease` for a polled stream.
    pub fn writer(
        &self,
        stream: Arc<Stream>,
        retention: Retention,
        lease: Option<watch::Receiver<Option<Holding>>>,
    ) -> Arc<Writer> {
        Arc::new(Writer::new(
            stream,
            self.catchup(retention.history),
            self.node.clone(),
            retention,
            lease,
        ))
    }
}

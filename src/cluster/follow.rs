//! Every node follows the log: announcements arrive over pub/sub, are applied in sequence
//! order, and any gap (a lost message, a reconnection, a node that started late) is filled
//! from the log. Pub/sub is only a hint: the follower also compares its positions with the
//! log's tops periodically, and probes its pub/sub connection with a `PING`, because after a
//! Redis failover a subscription can go silent while its TCP connection looks healthy
//! (redis/redis#6545, centrifugal/centrifugo#1189).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::lease::Releases;
use super::message::{Announcement, LoggedChange};
use super::store::{Loaded, Store, StoreError};

/// A node's local copy of one stream, as the follower updates it.
pub trait Replica: Send + Sync {
    /// The epoch and top sequence number of the local copy (`None`: nothing yet).
    fn position(&self) -> Option<(u64, u64)>;

    /// Applies the change after the top. A change at or below the top is already there and
    /// is ignored (`Ok`); one past the top is a gap (`Err`).
    fn apply(&self, change: &LoggedChange) -> Result<(), Diverged>;

    /// Replaces the local copy with the log's state (another epoch, or a gap the log no
    /// longer covers): subscribers get the current document.
    fn reset(&self, loaded: &Loaded) -> Result<(), Diverged>;

    /// The upstream's failure as the holder reported it (`None`: it recovered).
    fn health(&self, failure: Option<&Bytes>);
}

/// Why the local copy could not follow the log; the follower reloads the stream.
#[derive(Debug, thiserror::Error)]
pub enum Diverged {
    /// The change does not follow the local top.
    #[error("change {got} does not follow the local top {top}")]
    Gap {
        /// The local top.
        top: u64,
        /// The change's sequence number.
        got: u64,
    },
    /// The change could not be applied to the local document (a corrupt log).
    #[error("the change cannot be applied: {0}")]
    Invalid(String),
}

/// Finds the local copy of a stream by name (`None`: this node does not serve it).
pub trait Replicas: Send + Sync {
    /// The stream named `name`.
    fn get(&self, name: &str) -> Option<Arc<dyn Replica>>;
    /// Every stream this node serves, by name.
    fn names(&self) -> Vec<String>;
}

/// What the follower counts (for `/metrics`).
pub trait FollowerObserver: Send + Sync {
    /// Changes fetched from the log to fill a gap.
    fn gap_repaired(&self, stream: &str, changes: usize);
    /// A stream reloaded whole.
    fn reloaded(&self, stream: &str);
}

/// The follower of one node.
pub struct Follower {
    /// The store.
    pub store: Store,
    /// The Redis client (the pub/sub connection is its own).
    pub client: redis::Client,
    /// The streams this node serves.
    pub replicas: Arc<dyn Replicas>,
    /// Lease keepers waiting for releases.
    pub releases: Arc<Releases>,
    /// History the node keeps (how much of the log a reload reads).
    pub history: usize,
    /// How often positions are checked and the pub/sub connection probed.
    pub probe_interval: Duration,
    /// Whether the follower is subscribed and caught up (readiness).
    pub following: watch::Sender<bool>,
    /// Counts.
    pub observer: Arc<dyn FollowerObserver>,
}

impl Follower {
    /// Follows until `shutdown`: subscribe, catch up, apply announcements; on any failure of
    /// the pub/sub connection, reconnect with backoff and catch up again.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let outcome = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                outcome = self.follow_once() => outcome,
            };
            self.following.send_replace(false);
            failures = failures.saturating_add(1);
            // 50 ms doubling to 5 s; one warning per run of failures, then debug.
            let delay = Duration::from_millis(50)
                .saturating_mul(1 << failures.min(7))
                .min(Duration::from_secs(5));
            match outcome {
                Ok(()) => failures = 0,
                Err(error) if failures == 1 => {
                    tracing::warn!(%error, "lost the cluster's pub/sub connection; reconnecting");
                }
                Err(error) => tracing::debug!(%error, retry_in = ?delay, "reconnecting pub/sub"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection's life: returns when it fails or goes silent.
    async fn follow_once(&self) -> Result<(), StoreError> {
        let (mut sink, mut stream) = self.client.get_async_pubsub().await?.split();
        sink.subscribe(self.store.keys().channel()).await?;
        // Subscribed first, then caught up: a change published between the two is both in
        // the log and announced, and the second copy is ignored.
        self.check_all().await?;
        self.following.send_replace(true);
        tracing::info!("following the cluster's log");
        let mut probe = tokio::time::interval(self.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err(StoreError::Reply("pub/sub connection closed"));
                    };
                    let bytes = Bytes::copy_from_slice(message.get_payload_bytes());
                    match Announcement::decode(&bytes) {
                        Ok(announcement) => self.handle(announcement).await?,
                        Err(error) => tracing::warn!(%error, "ignoring a cluster message"),
                    }
                }
                _ = probe.tick() => {
                    // A silent subscription is indistinguishable from a quiet cluster: ask.
                    let pong = tokio::time::timeout(self.probe_interval, sink.ping::<String>()).await;
                    match pong {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return Err(error.into()),
                        Err(_) => return Err(StoreError::Reply("pub/sub PING timed out")),
                    }
                    self.check_all().await?;
                }
            }
        }
    }

    async fn handle(&self, announcement: Announcement) -> Result<(), StoreError> {
        match announcement {
            Announcement::Change { stream, change } => {
                let Some(replica) = self.replicas.get(&stream) else {
                    return Ok(());
                };
                self.follow(
                    &stream,
                    &*replica,
                    Some((change.epoch, change.seq)),
                    Some(&change),
                )
                .await
            }
            Announcement::Health {
                stream, failure, ..
            } => {
                if let Some(replica) = self.replicas.get(&stream) {
                    replica.health(failure.as_ref());
                }
                Ok(())
            }
            Announcement::Released { stream } => {
                self.releases.released(&stream);
                Ok(())
            }
        }
    }

    /// Compares every stream with the log's top and catches up where behind.
    async fn check_all(&self) -> Result<(), StoreError> {
        let names = self.replicas.names();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        for chunk in refs.chunks(256) {
            let tops = self.store.positions(chunk).await?;
            for (name, top) in chunk.iter().zip(tops) {
                if let (Some(replica), Some(top)) = (self.replicas.get(name), top) {
                    self.follow(name, &*replica, Some(top), None).await?;
                }
            }
        }
        Ok(())
    }

    /// Brings `replica` to `top` (epoch, seq): applies `change` when it is next, fills a gap
    /// from the log, or reloads when the epoch differs or the log no longer reaches.
    pub async fn follow(
        &self,
        stream: &str,
        replica: &dyn Replica,
        top: Option<(u64, u64)>,
        change: Option<&LoggedChange>,
    ) -> Result<(), StoreError> {
        let Some((epoch, seq)) = top else {
            return Ok(());
        };
        let Some((local_epoch, local_seq)) = replica.position() else {
            return self.reload(stream, replica).await;
        };
        if local_epoch != epoch {
            return self.reload(stream, replica).await;
        }
        if seq <= local_seq {
            return Ok(());
        }
        let missing_to = if change.is_some() { seq - 1 } else { seq };
        if missing_to > local_seq {
            let filled = self
                .store
                .range(stream, epoch, local_seq + 1, missing_to)
                .await?;
            let complete = filled.first().map(|c| c.seq) == Some(local_seq + 1)
                && filled.len() as u64 == missing_to - local_seq;
            if !complete {
                return self.reload(stream, replica).await;
            }
            self.observer.gap_repaired(stream, filled.len());
            for missed in &filled {
                if replica.apply(missed).is_err() {
                    return self.reload(stream, replica).await;
                }
            }
        }
        if let Some(change) = change {
            if replica.apply(change).is_err() {
                return self.reload(stream, replica).await;
            }
        }
        Ok(())
    }

    async fn reload(&self, stream: &str, replica: &dyn Replica) -> Result<(), StoreError> {
        let Some(loaded) = self.store.load(stream, self.history).await? else {
            return Ok(());
        };
        self.observer.reloaded(stream);
        if let Err(error) = replica.reset(&loaded) {
            tracing::error!(stream, %error, "cannot rebuild the stream from the log");
        }
        Ok(())
    }
}

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
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::lease::Releases;
use super::message::{Announcement, LoggedChange};
use super::replica::{self, Replicas};
use super::store::{Store, StoreError};
use crate::hub::Stream;
use crate::metrics::{Metrics, StreamLabels};

/// Brings local copies up to the log: the next change applied, a gap filled from the log, a
/// reload when the epoch differs or the log no longer reaches back. Shared by the follower
/// and the node's writers (which catch up before retrying a conflicting append).
#[derive(Clone)]
pub struct Catchup {
    /// The store.
    pub store: Store,
    /// Changes a reload reads for resuming subscribers (the streams' history).
    pub history: usize,
    /// Where gaps and reloads are counted.
    pub metrics: Arc<Metrics>,
}

/// Whether a reload found a log it could follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The local copy is the log's state now (or the log has no epoch yet).
    Followed,
    /// The log's state cannot be rebuilt (its document lost, a gap inside it): only a new
    /// epoch from the stream's writer can mend it.
    Broken,
}

impl Catchup {
    /// Brings `stream` to `top` (epoch, seq), applying `change` (the change at `top`) when
    /// it is next; `top` is `None` when the log has no epoch.
    pub async fn follow(
        &self,
        stream: &Stream,
        top: Option<(u64, u64)>,
        change: Option<&LoggedChange>,
    ) -> Result<Reloaded, StoreError> {
        let Some((epoch, seq)) = top else {
            return Ok(Reloaded::Followed);
        };
        let Some((local_epoch, local_seq)) = replica::position(stream) else {
            return self.reload(stream).await;
        };
        if local_epoch != epoch {
            return self.reload(stream).await;
        }
        if seq <= local_seq {
            return Ok(Reloaded::Followed);
        }
        let missing_to = if change.is_some() { seq - 1 } else { seq };
        if missing_to > local_seq {
            let filled = self
                .store
                .range(stream.name(), epoch, local_seq + 1, missing_to)
                .await?;
            let complete = filled.first().map(|c| c.seq) == Some(local_seq + 1)
                && filled.len() as u64 == missing_to - local_seq;
            if !complete {
                return self.reload(stream).await;
            }
            self.metrics
                .cluster_gaps_repaired
                .get_or_create(&StreamLabels {
                    stream: stream.name().to_owned(),
                })
                .inc_by(filled.len() as u64);
            for missed in &filled {
                if replica::apply(stream, missed).is_err() {
                    return self.reload(stream).await;
                }
            }
        }
        if let Some(change) = change
            && replica::apply(stream, change).is_err()
        {
            return self.reload(stream).await;
        }
        Ok(Reloaded::Followed)
    }

    /// Replaces the local copy with the log's state.
    pub async fn reload(&self, stream: &Stream) -> Result<Reloaded, StoreError> {
        let Some(loaded) = self.store.load(stream.name(), self.history).await? else {
            return Ok(Reloaded::Followed);
        };
        self.metrics
            .cluster_reloads
            .get_or_create(&StreamLabels {
                stream: stream.name().to_owned(),
            })
            .inc();
        match replica::reset(stream, &loaded) {
            Ok(()) => Ok(Reloaded::Followed),
            Err(error) => {
                tracing::error!(stream = stream.name(), %error, "cannot rebuild the stream from the log");
                Ok(Reloaded::Broken)
            }
        }
    }
}

/// The follower of one node.
pub struct Follower {
    /// Catches streams up.
    pub catchup: Catchup,
    /// The Redis client (the pub/sub connection is its own).
    pub client: redis::Client,
    /// This node's id (its own health announcements were applied already).
    pub node: Arc<str>,
    /// The streams this node serves.
    pub replicas: Arc<dyn Replicas>,
    /// Lease keepers waiting for releases.
    pub releases: Arc<Releases>,
    /// Rings the membership loop when another node left, so it reads the live set now.
    pub left: Arc<Notify>,
    /// How often positions are checked and the pub/sub connection probed.
    pub probe_interval: Duration,
    /// Whether the follower is subscribed and caught up (readiness).
    pub following: watch::Sender<bool>,
    /// Set once, when the follower first caught up: every stream is then as the log has it.
    pub loaded: watch::Sender<bool>,
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
        sink.subscribe(self.catchup.store.keys().channel()).await?;
        // Subscribed first, then caught up: a change published between the two is both in
        // the log and announced, and the second copy is ignored.
        self.check_all().await?;
        self.following.send_replace(true);
        self.loaded
            .send_if_modified(|loaded| !std::mem::replace(loaded, true));
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
                    // A silent subscription is indistinguishable from a quiet cluster: ask. (In
                    // subscribed mode the answer is `["pong", ""]`, not `PONG`: any answer will do.)
                    let pong = tokio::time::timeout(self.probe_interval, sink.ping::<redis::Value>()).await;
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
                if let Some(local) = self.replicas.get(&stream) {
                    self.catchup
                        .follow(&local, Some((change.epoch, change.seq)), Some(&change))
                        .await?;
                }
            }
            Announcement::Health {
                stream,
                epoch,
                node,
                failure,
            } => {
                if let Some(local) = self.replicas.get(&stream)
                    && *node != *self.node
                    && local.epoch() == epoch
                {
                    replica::health(&local, failure.as_ref());
                }
            }
            Announcement::Released { stream } => self.releases.released(&stream),
            Announcement::Left { node } => {
                if *node != *self.node {
                    self.left.notify_one();
                }
            }
        }
        Ok(())
    }

    /// Compares every stream with the log's top and catches up where behind.
    async fn check_all(&self) -> Result<(), StoreError> {
        let streams = self.replicas.all();
        for chunk in streams.chunks(256) {
            let names: Vec<&str> = chunk.iter().map(|s| s.name()).collect();
            let tops = self.catchup.store.positions(&names).await?;
            for (local, top) in chunk.iter().zip(tops) {
                self.catchup.follow(local, top, None).await?;
            }
        }
        Ok(())
    }
}

//! Who polls which stream: each node keeps a lease keeper per stream that takes the stream's
//! lease when the node is its rendezvous owner (or next in line once the lease has been free
//! long enough), renews it, hands it over when a better-placed node is live, and gives it up
//! on shutdown. The keeper only says whether the node holds the lease (a `watch`); whoever
//! drives the poller follows that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::rendezvous;
use super::store::{Lease, PollState, Retention, Store};
use crate::metrics::{LeaseEvent, LeaseLabels, Metrics};
use crate::upstream::fetch::Validators;
use crate::upstream::poller::Turn;

/// The lease a node holds on a stream, as its poller and writer need it: a poller's turn
/// whose id is the lease's fence (every write carries it).
pub type Holding = Turn;

/// The turn a lease gives: the previous holders' validators, and the time since their last
/// poll in Redis's clock (so the nodes' clocks need not agree).
fn turn(fence: u64, poll: PollState, now_ms: u64) -> Turn {
    let value = |text: Option<String>| text.and_then(|t| http::HeaderValue::from_str(&t).ok());
    Turn {
        id: fence,
        validators: Validators {
            etag: value(poll.etag),
            last_modified: value(poll.last_modified),
        },
        last_poll_ago: poll
            .last_poll_ms
            .map(|last| Duration::from_millis(now_ms.saturating_sub(last))),
        requests: poll.polls,
    }
}

/// The live nodes, as the membership loop last saw them.
pub type Nodes = watch::Receiver<Arc<[String]>>;

/// Wakes the keepers of streams whose lease was announced free.
#[derive(Debug, Default)]
pub struct Releases {
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Releases {
    /// The notification of `stream`'s releases.
    pub fn of(&self, stream: &str) -> Arc<Notify> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.entry(stream.to_owned()).or_default().clone()
    }

    /// Someone gave up `stream`'s lease.
    pub fn released(&self, stream: &str) {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(notify) = waiting.get(stream) {
            notify.notify_one();
        }
    }

    /// Stops tracking `stream` (a dynamic stream that ended).
    pub fn forget(&self, stream: &str) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.remove(stream);
    }
}

/// One stream's lease keeper.
pub struct Keeper {
    /// The Redis store.
    pub store: Store,
    /// This node's id.
    pub node: Arc<str>,
    /// The stream.
    pub stream: String,
    /// How long a lease lives without renewal.
    pub ttl: Duration,
    /// How the stream's keys are kept (their TTL is refreshed with the lease's meta).
    pub retention: Retention,
    /// The live nodes.
    pub nodes: Nodes,
    /// Rings when the lease is announced free.
    pub released: Arc<Notify>,
    /// What the keeper tells the poller's driver.
    pub held: watch::Sender<Option<Holding>>,
    /// Where lease events are counted.
    pub metrics: Arc<Metrics>,
    /// How the keeper takes part: [`Taking::Always`] for a configured stream (every live
    /// node may hold it), [`Taking::OnDemand`] for one polled only while subscribed.
    pub taking: Taking,
    /// The node's shutdown (the keeper's own token may end sooner: a stream retired).
    pub node_shutdown: CancellationToken,
    /// The fingerprint of this node's configuration of the stream (`None`: a dynamic
    /// stream), changed by a reload: the keeper takes the lease only while the stream's log
    /// belongs to it, and hands it only to a node that runs it too.
    pub config: watch::Receiver<Option<Arc<str>>>,
}

/// Which nodes a stream's lease goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taking {
    /// Any live node (`nodes` is the cluster's live set).
    Always,
    /// Only nodes whose subscribers want the stream (`nodes` is its demand set). The holder
    /// keeps the lease while nobody wants it (its linger) and hands it to a node that does;
    /// when it gives the lease up and still nobody wants the stream, its keys are deleted.
    OnDemand,
}

/// Counts a lease event, and the leases held.
fn count(metrics: &Metrics, event: LeaseEvent) {
    metrics
        .cluster_lease_changes
        .get_or_create(&LeaseLabels { event })
        .inc();
    match event {
        LeaseEvent::Acquired => metrics.cluster_leases_held.inc(),
        LeaseEvent::Lost | LeaseEvent::HandedOver | LeaseEvent::Released => {
            metrics.cluster_leases_held.dec()
        }
    };
}

/// What the keeper does next, decided from what it knows (pure, so it is tested alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Try to take the lease now.
    Acquire,
    /// Look whether the lease is free (a node further down the ranking).
    Peek,
    /// Renew the held lease.
    Renew,
    /// Give the held lease to the node that should hold it.
    HandOver,
}

/// The keeper's next step: `held` whether it holds the lease, `rank` its place in the
/// stream's ranking (`None`: not yet listed live), `free_for` how long it has seen the lease
/// free, `better_for` how long a node ranked above it has been live while it held the lease.
pub fn next_step(
    held: bool,
    rank: Option<usize>,
    free_for: Option<Duration>,
    better_for: Option<Duration>,
    step: Duration,
    taking: Taking,
) -> Step {
    if held {
        return match better_for {
            // One full step of seeing the better node live: not a blip of a heartbeat.
            Some(seen) if seen >= step => Step::HandOver,
            _ => Step::Renew,
        };
    }
    match (rank, free_for) {
        (Some(0), _) => Step::Acquire,
        // Next in line waits its turn after the lease was seen free, so the owner (who was
        // woken by the release, or checks every step) goes first.
        (Some(rank), Some(free)) if free >= step * u32::try_from(rank).unwrap_or(u32::MAX) => {
            Step::Acquire
        }
        // Not listed live (yet): last in line; never, for a stream this node does not want.
        (None, Some(free)) if free >= step * 8 && taking == Taking::Always => Step::Acquire,
        _ => Step::Peek,
    }
}

/// `node`'s place in `ranking` (0: it should hold the lease), counting without `gone`: the
/// owner that held the lease and let it go free (a live holder renews every step, and only
/// releases it to hand it to a better-placed node, or as it shuts down). The nodes after a
/// gone owner move up a place, so the next in line takes the lease as soon as it is free, not
/// a step later: a failover then costs the lease's TTL plus one poll.
pub fn place(ranking: &[&str], node: &str, gone: Option<&str>) -> Option<usize> {
    let rank = ranking.iter().position(|n| *n == node)?;
    let owner_gone = gone.is_some_and(|g| g != node && ranking.first() == Some(&g));
    Some(if owner_gone { rank - 1 } else { rank })
}

impl Keeper {
    /// Whether the lease may go to `to`: it runs the configuration the stream's log belongs
    /// to (always, for a dynamic stream; never when Redis does not say).
    async fn may_hand_to(&self, to: Option<&str>) -> bool {
        let Some(to) = to else { return false };
        if self.config.borrow().is_none() {
            return true;
        }
        match self.store.runs_config_of(&self.stream, to).await {
            Ok(runs) => runs,
            Err(error) => {
                tracing::debug!(stream = %self.stream, %error, "cannot tell which configuration the better-placed node runs; keeping the lease");
                false
            }
        }
    }

    /// Renewal period: a third of the TTL, so two renewals may fail before the lease expires.
    fn step(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(10))
    }

    /// Keeps the lease until `shutdown`, then gives it up at once (the next node takes it
    /// without waiting for the TTL).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let step = self.step();
        // Act only once this node is in the live set: its place in the ranking counts then.
        let node = self.node.clone();
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = self.nodes.wait_for(|live| live.iter().any(|n| **n == *node)) => {}
        }
        let mut fence: Option<u64> = None;
        let mut renewed = Instant::now();
        let mut free_since: Option<Instant> = None;
        let mut better_since: Option<Instant> = None;
        // Who held the lease when this node last looked.
        let mut last_holder: Option<String> = None;
        // Refused for running another configuration than the log's (said once).
        let mut standing_by = false;
        loop {
            let now = Instant::now();
            let live = self.nodes.borrow().clone();
            let ranking = rendezvous::ranking(&self.stream, &live);
            let gone = free_since.and(last_holder.as_deref());
            let rank = place(&ranking, &self.node, gone);
            // Someone should hold it rather than this node: a node ranked above it, or (for a
            // stream polled on demand) any node that wants it when this one does not.
            let better = fence.is_some()
                && match (rank, self.taking) {
                    (Some(r), _) => r > 0,
                    (None, Taking::OnDemand) => !live.is_empty(),
                    (None, Taking::Always) => false,
                };
            better_since = if better {
                Some(better_since.unwrap_or(now))
            } else {
                None
            };
            let mut wake = now + step;
            match next_step(
                fence.is_some(),
                rank,
                free_since.map(|t| now.duration_since(t)),
                better_since.map(|t| now.duration_since(t)),
                step,
                self.taking,
            ) {
                Step::Renew => {
                    let held = fence.unwrap_or(0);
                    match self
                        .store
                        .renew(&self.stream, &self.node, held, self.ttl)
                        .await
                    {
                        Ok(true) => renewed = Instant::now(),
                        Ok(false) => {
                            tracing::warn!(stream = %self.stream, "lease lost to another node");
                            fence = None;
                        }
                        Err(error) => {
                            // Redis is unreachable: the lease may still be ours until its TTL
                            // runs out, counted from the last renewal that succeeded. Past
                            // that another node may hold it, so stop polling.
                            if renewed.elapsed() + step >= self.ttl {
                                tracing::warn!(stream = %self.stream, %error, "cannot renew the lease; no longer polling");
                                fence = None;
                            }
                        }
                    }
                    if fence.is_none() {
                        self.held.send_replace(None);
                        count(&self.metrics, LeaseEvent::Lost);
                    }
                }
                Step::HandOver if !self.may_hand_to(ranking.first().copied()).await => {
                    // The better-placed node runs another configuration of the stream (not
                    // reloaded yet): it could not take the lease, so keep it.
                    better_since = None;
                }
                Step::HandOver => {
                    let held = fence.take().unwrap_or(0);
                    self.held.send_replace(None);
                    count(&self.metrics, LeaseEvent::HandedOver);
                    tracing::info!(stream = %self.stream, to = ?ranking.first(), "handing the lease over");
                    if let Err(error) = self.store.release(&self.stream, &self.node, held).await {
                        tracing::debug!(stream = %self.stream, %error, "release failed; the lease expires instead");
                    }
                    better_since = None;
                }
                Step::Peek => match self.store.holder(&self.stream).await {
                    Ok(Some((holder, left))) => {
                        free_since = None;
                        last_holder = Some(holder);
                        // Look again right after it would expire, or at the next step.
                        wake = now + left.min(step) + Duration::from_millis(5);
                    }
                    Ok(None) => {
                        free_since.get_or_insert(now);
                        // Free because its owner let it go: this node may be next (at once).
                        wake = if place(&ranking, &self.node, last_holder.as_deref()) == Some(0) {
                            now
                        } else {
                            now + (step / 4).max(Duration::from_millis(5))
                        };
                    }
                    Err(_) => {}
                },
                Step::Acquire => {
                    let config = self.config.borrow().clone();
                    match self
                        .store
                        .acquire(
                            &self.stream,
                            &self.node,
                            self.ttl,
                            &self.retention,
                            config.as_deref(),
                        )
                        .await
                    {
                        Ok(Lease::Held {
                            fence: taken,
                            poll,
                            now_ms,
                        }) => {
                            tracing::info!(stream = %self.stream, fence = taken, "lease taken");
                            count(&self.metrics, LeaseEvent::Acquired);
                            fence = Some(taken);
                            renewed = Instant::now();
                            free_since = None;
                            last_holder = None;
                            self.held.send_replace(Some(turn(taken, poll, now_ms)));
                        }
                        Ok(Lease::HeldBy(holder)) => {
                            free_since = None;
                            last_holder = Some(holder);
                            standing_by = false;
                        }
                        Ok(Lease::OtherConfig) => {
                            if !std::mem::replace(&mut standing_by, true) {
                                tracing::warn!(stream = %self.stream, "another node loaded another configuration of this stream: this node stands by (neither polls nor writes it) until it is reloaded with the same");
                            }
                        }
                        Err(error) => {
                            tracing::debug!(stream = %self.stream, %error, "cannot take the lease");
                        }
                    }
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(wake) => {}
                _ = self.nodes.changed() => {}
                () = changed(&mut self.config) => {
                    standing_by = false;
                }
                () = self.released.notified() => {
                    free_since.get_or_insert(Instant::now());
                }
            }
        }
        if let Some(held) = fence {
            self.held.send_replace(None);
            count(&self.metrics, LeaseEvent::Released);
            match self.store.release(&self.stream, &self.node, held).await {
                Ok(_) => tracing::debug!(stream = %self.stream, "lease given up"),
                Err(error) => {
                    tracing::debug!(stream = %self.stream, %error, "release failed; the lease expires instead");
                }
            }
        }
        // The last node to retire a stream nobody wants forgets it, once, for the cluster
        // (the script refuses while another node wants it or holds its lease). A node shutting
        // down is no reason: other nodes' subscribers may resume on it, and its keys expire
        // by themselves.
        if self.taking == Taking::OnDemand && !self.node_shutdown.is_cancelled() {
            match self.store.evict(&self.stream, &self.node).await {
                Ok(true) => {
                    tracing::info!(stream = %self.stream, "nobody wants the stream: its log is deleted")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::debug!(stream = %self.stream, %error, "could not delete the stream's log; its keys expire")
                }
            }
        }
    }
}

/// Returns when `config` changes; never once its sender is gone (nothing will change it).
async fn changed(config: &mut watch::Receiver<Option<Arc<str>>>) {
    if config.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Keeps this node in the live set (a heartbeat every third of `ttl`, and at once when
/// `left` rings: another node left), publishes the live nodes and whether Redis answers, and
/// leaves the set on shutdown (which the others hear: their keepers rank without it at once).
#[allow(clippy::too_many_arguments)]
pub async fn membership(
    store: Store,
    node: Arc<str>,
    ttl: Duration,
    nodes: watch::Sender<Arc<[String]>>,
    reachable: watch::Sender<bool>,
    left: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let step = (ttl / 3).max(Duration::from_millis(10));
    loop {
        let started = Instant::now();
        match store.heartbeat(&node, Some(ttl)).await {
            Ok(live) => {
                metrics
                    .cluster_redis_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics
                    .cluster_nodes
                    .set(i64::try_from(live.len()).unwrap_or(i64::MAX));
                let live: Arc<[String]> = live.into();
                nodes.send_if_modified(|current| {
                    let changed = **current != *live;
                    if changed {
                        *current = live;
                    }
                    changed
                });
                reachable.send_if_modified(|up| !std::mem::replace(up, true));
            }
            Err(error) => {
                metrics.cluster_redis_errors.inc();
                if reachable.send_if_modified(|up| std::mem::replace(up, false)) {
                    tracing::warn!(%error, "redis unreachable; serving the last known documents");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(step) => {}
            () = left.notified() => {}
        }
    }
    if let Err(error) = store.heartbeat(&node, None).await {
        tracing::debug!(%error, "could not leave the live set; it expires instead");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: Duration = Duration::from_millis(100);

    #[test]
    fn the_nodes_after_an_owner_that_let_its_lease_go_move_up() {
        let ranking = ["o", "n", "m"];
        assert_eq!(place(&ranking, "n", None), Some(1));
        assert_eq!(place(&ranking, "n", Some("o")), Some(0));
        assert_eq!(place(&ranking, "m", Some("o")), Some(1));
        // A holder further down the ranking let it go: the owner takes it, nobody moves.
        assert_eq!(place(&ranking, "m", Some("n")), Some(2));
        assert_eq!(place(&ranking, "o", Some("n")), Some(0));
        // The owner itself keeps its place; a node not listed has none.
        assert_eq!(place(&ranking, "o", Some("o")), Some(0));
        assert_eq!(place(&ranking, "x", Some("o")), None);
    }

    #[test]
    fn the_owner_takes_a_lease_at_once() {
        assert_eq!(
            next_step(false, Some(0), None, None, STEP, Taking::Always),
            Step::Acquire
        );
    }

    #[test]
    fn others_wait_their_turn_after_the_lease_is_free() {
        assert_eq!(
            next_step(false, Some(2), None, None, STEP, Taking::Always),
            Step::Peek
        );
        assert_eq!(
            next_step(false, Some(2), Some(STEP), None, STEP, Taking::Always),
            Step::Peek
        );
        assert_eq!(
            next_step(false, Some(2), Some(STEP * 2), None, STEP, Taking::Always),
            Step::Acquire
        );
        assert_eq!(
            next_step(false, None, Some(STEP * 7), None, STEP, Taking::Always),
            Step::Peek
        );
        assert_eq!(
            next_step(false, None, Some(STEP * 8), None, STEP, Taking::Always),
            Step::Acquire
        );
    }

    #[test]
    fn a_node_that_does_not_want_a_stream_never_takes_its_lease() {
        assert_eq!(
            next_step(false, None, Some(STEP * 100), None, STEP, Taking::OnDemand),
            Step::Peek
        );
    }

    #[test]
    fn a_holder_hands_over_only_to_a_node_seen_live_for_a_step() {
        assert_eq!(
            next_step(true, Some(1), None, None, STEP, Taking::Always),
            Step::Renew
        );
        assert_eq!(
            next_step(true, Some(1), None, Some(STEP / 2), STEP, Taking::Always),
            Step::Renew
        );
        assert_eq!(
            next_step(true, Some(1), None, Some(STEP), STEP, Taking::Always),
            Step::HandOver
        );
    }
}

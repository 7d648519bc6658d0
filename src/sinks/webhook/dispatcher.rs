//! One dispatcher per stream: subscribes to the hub and accepts every change into the outbox
//! for the endpoints that want it, in one transaction per change.
//!
//! A receiver that lagged behind the hub, a dead delivery, an endpoint that was just created or
//! re-enabled, or an outbox that failed to store a change: each is healed the same way, by
//! queueing the stream's current document as a snapshot for the affected endpoints. The
//! outbox skips changes older than what a pair already has, so a snapshot taken ahead of the
//! live receiver is never followed by the changes it already contains, and a change whose
//! predecessor was never stored for a pair reaches it as a snapshot (see `body::plan`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;

use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::outbox::{Accepted, NewChange, Outbox, OutboxFuture, StoredDocument, Target};
use super::registry::Registry;
use crate::hub::{Change, ChangeKind, Initial, Resume, Stream, StreamEvent, Subscription};
use crate::snapshot::Snapshot;

/// A request to queue the stream's current document for some endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resync {
    /// For one endpoint.
    Endpoint(String),
    /// For every endpoint subscribed to the stream.
    All,
}

/// Where resync requests for a stream go (its dispatcher), by stream name.
pub type ResyncRoutes = HashMap<String, mpsc::UnboundedSender<Resync>>;

/// Accepts one stream's changes into the outbox.
pub struct Dispatcher {
    stream: Arc<Stream>,
    outbox: Arc<dyn Outbox>,
    registry: Arc<Registry>,
    backlog_limit: usize,
    wake: Arc<Notify>,
    requests: mpsc::UnboundedReceiver<Resync>,
    /// Taken when the dispatcher is built, so no change published after `Webhooks::start`
    /// returns can be missed.
    subscription: Option<Subscription>,
    /// Set when storing failed: a snapshot is queued once storing works again, so a quiet
    /// stream still ends at its current document.
    owed: Option<Resync>,
    /// Store the stream's current document too (a push stream).
    keep_document: bool,
    /// Up to which `seq` everything is committed.
    committed: watch::Sender<u64>,
}

/// Up to which sequence number a stream's changes are committed to the outbox: every
/// change up to it has its deliveries queued (or a snapshot at least as new does) for every
/// enabled endpoint of the stream, and for a push stream the document is stored. Advanced
/// only after the outbox transaction committed.
#[derive(Debug, Clone)]
pub struct Committed(watch::Receiver<u64>);

/// Why [`Committed::reached`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotCommitted {
    /// The dispatcher stopped (shutdown).
    #[error("the webhook dispatcher stopped before the change was stored")]
    Stopped,
    /// The outbox did not commit within the wait (it keeps retrying).
    #[error("the webhook outbox did not store the change in time")]
    TimedOut,
}

impl Committed {
    /// Waits until everything up to `seq` is committed, at most `wait`.
    pub async fn reached(&self, seq: u64, wait: Duration) -> Result<(), NotCommitted> {
        let mut receiver = self.0.clone();
        match tokio::time::timeout(wait, receiver.wait_for(|committed| *committed >= seq)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(NotCommitted::Stopped),
            Err(_) => Err(NotCommitted::TimedOut),
        }
    }
}

/// What a batch of changes came to in the outbox.
#[derive(Debug, Default)]
struct Batch {
    /// The last change's sequence number.
    seq: u64,
    queued: usize,
    collapsed: usize,
    /// The first failure, if any job failed.
    error: Option<String>,
}

/// A submitted batch, resolving once its transaction(s) committed.
type Pending = Pin<Box<dyn Future<Output = Batch> + Send>>;

/// The stream's current document as a change every endpoint receives whole.
fn snapshot_change(stream: &Stream, snapshot: &Snapshot) -> NewChange {
    NewChange {
        stream: Arc::from(stream.name()),
        epoch: snapshot.epoch,
        seq: snapshot.seq,
        patch: None,
        document: snapshot.json.clone(),
        at: snapshot.at,
    }
}

/// A published change, `document` being the JSON of the document after it (carried by the
/// live event: history keeps no documents).
fn new_change(change: &Change, document: &Bytes) -> NewChange {
    NewChange {
        stream: change.stream.clone(),
        epoch: change.epoch,
        seq: change.seq,
        patch: match change.kind {
            ChangeKind::Patch => Some(change.payload.clone()),
            ChangeKind::Snapshot => None,
        },
        document: document.clone(),
        at: change.at,
    }
}

impl Dispatcher {
    /// A dispatcher for `stream`; `requests` carries resync requests, `wake` is notified after
    /// every accepted change. With `keep_document` (a push stream) the stream's current
    /// document is stored with its changes, so a restart continues the stream.
    pub fn new(
        stream: Arc<Stream>,
        outbox: Arc<dyn Outbox>,
        registry: Arc<Registry>,
        backlog_limit: usize,
        wake: Arc<Notify>,
        requests: mpsc::UnboundedReceiver<Resync>,
        keep_document: bool,
    ) -> Self {
        let subscription = Some(stream.subscribe(&Resume::Fresh));
        Dispatcher {
            subscription,
            stream,
            outbox,
            registry,
            backlog_limit,
            wake,
            requests,
            owed: None,
            keep_document,
            committed: watch::Sender::new(0),
        }
    }

    /// Watches the highest sequence number up to which every change of the stream is
    /// committed to the outbox (see [`Committed`]).
    pub fn committed(&self) -> Committed {
        Committed(self.committed.subscribe())
    }

    fn commit(&self, seq: u64) {
        self.committed.send_if_modified(|current| {
            let advanced = seq > *current;
            if advanced {
                *current = seq;
            }
            advanced
        });
    }

    fn save(&self, change: &NewChange) -> Option<OutboxFuture<()>> {
        self.keep_document.then(|| {
            self.outbox.save_document(StoredDocument {
                stream: change.stream.clone(),
                epoch: change.epoch,
                seq: change.seq,
                document: change.document.clone(),
                at: change.at,
            })
        })
    }

    /// Queues `change` for `targets` (and stores it as the document, for a push stream);
    /// true when that is committed.
    async fn accept(
        &mut self,
        change: NewChange,
        targets: Vec<Target>,
        on_failure: Resync,
    ) -> bool {
        let saved = self.save(&change);
        let queued =
            (!targets.is_empty()).then(|| self.outbox.accept(change, targets, self.backlog_limit));
        let saved = match saved {
            Some(saved) => saved.await,
            None => Ok(()),
        };
        let queued = match queued {
            Some(queued) => queued.await,
            None => Ok(Accepted::default()),
        };
        match saved.and(queued) {
            Ok(accepted) => {
                if accepted.collapsed > 0 {
                    tracing::info!(
                        stream = self.stream.name(),
                        pairs = accepted.collapsed,
                        "webhook backlog collapsed into a snapshot"
                    );
                }
                if accepted.queued > 0 {
                    self.wake.notify_one();
                }
                true
            }
            Err(error) => {
                tracing::error!(stream = self.stream.name(), %error, "cannot queue a webhook delivery; a snapshot will follow");
                self.owed = Some(match (self.owed.take(), on_failure) {
                    (Some(Resync::All), _) | (_, Resync::All) => Resync::All,
                    (_, one) => one,
                });
                false
            }
        }
    }

    /// Submits consecutive changes to the outbox and returns what their jobs came to, once
    /// committed. Each is its own job (its own savepoint); if one fails, the next is planned as
    /// a snapshot for the pairs it missed, so the chain never breaks. The jobs are queued at
    /// once (the outbox keeps call order), so the dispatcher submits the next batch while
    /// this one commits, and they share the outbox's transactions (and fsyncs).
    fn submit(&self, changes: &[(Arc<Change>, Bytes)]) -> Option<Pending> {
        let (last, last_document) = changes.last()?;
        let pending: Vec<_> = changes
            .iter()
            .filter_map(|(change, document)| {
                let targets = self.registry.targets(&change.stream);
                (!targets.is_empty()).then(|| {
                    self.outbox
                        .accept(new_change(change, document), targets, self.backlog_limit)
                })
            })
            .collect();
        // After the deliveries: the document is stored in the same transaction as (or a later
        // one than) the last change's deliveries.
        let saved = self.save(&new_change(last, last_document));
        let seq = last.seq;
        Some(Box::pin(async move {
            let mut batch = Batch {
                seq,
                ..Batch::default()
            };
            for result in futures_util::future::join_all(pending).await {
                match result {
                    Ok(accepted) => {
                        batch.queued += accepted.queued;
                        batch.collapsed += accepted.collapsed;
                    }
                    Err(error) => {
                        batch.error.get_or_insert(error.to_string());
                    }
                }
            }
            if let Some(saved) = saved
                && let Err(error) = saved.await
            {
                batch.error.get_or_insert(error.to_string());
            }
            batch
        }))
    }

    /// Acts on a committed batch: everything up to its `seq` is committed, or a snapshot is
    /// owed.
    fn settle(&mut self, batch: Batch) {
        if batch.collapsed > 0 {
            tracing::info!(
                stream = self.stream.name(),
                pairs = batch.collapsed,
                "webhook backlog collapsed into a snapshot"
            );
        }
        match batch.error {
            Some(error) => {
                tracing::error!(stream = self.stream.name(), %error, "cannot queue a webhook delivery; a snapshot will follow");
                self.owed = Some(Resync::All);
            }
            None => self.commit(batch.seq),
        }
        if batch.queued > 0 {
            self.wake.notify_one();
        }
    }

    async fn resync(&mut self, which: Resync) {
        let Some(snapshot) = self.stream.snapshot() else {
            // No document yet: the first change will be a snapshot anyway.
            return;
        };
        self.resync_to(which, &snapshot).await;
    }

    /// Queues `snapshot` as a whole document for `which`.
    async fn resync_to(&mut self, which: Resync, snapshot: &Snapshot) {
        let targets = self.registry.targets(self.stream.name());
        let targets = match &which {
            Resync::All => targets,
            Resync::Endpoint(id) => targets.into_iter().filter(|t| &t.endpoint == id).collect(),
        };
        let change = snapshot_change(&self.stream, snapshot);
        let all = which == Resync::All;
        if self.accept(change, targets, which).await && all {
            // Every endpoint has the document at `snapshot.seq` (or a later one) queued.
            self.commit(snapshot.seq);
        }
    }

    /// Runs until `shutdown` or the stream closes.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let Some(subscription) = self.subscription.take() else {
            return;
        };
        let mut live = subscription.live;
        for initial in subscription.initial {
            if let Initial::Snapshot(snapshot) = initial {
                let change = snapshot_change(&self.stream, &snapshot);
                let targets = self.registry.targets(self.stream.name());
                if self.accept(change, targets, Resync::All).await {
                    self.commit(snapshot.seq);
                }
            }
        }
        // Batches submitted and not yet committed, oldest first.
        let mut inflight = FuturesOrdered::new();
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = live.recv() => match event {
                    Ok(StreamEvent::Change(change, document)) => {
                        let mut changes = vec![(change, document)];
                        let mut lagged = false;
                        // Whatever else is waiting goes to the outbox together: the jobs queue in
                        // order and share transactions (and fsyncs).
                        while changes.len() < 256 {
                            match live.try_recv() {
                                Ok(StreamEvent::Change(next, document)) => {
                                    changes.push((next, document));
                                }
                                Ok(_) => {}
                                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                                    lagged = true;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        inflight.extend(self.submit(&changes));
                        if lagged {
                            tracing::warn!(stream = self.stream.name(), "webhook dispatcher lagged; queueing a snapshot");
                            self.resync(Resync::All).await;
                        }
                    }
                    Ok(StreamEvent::Reset(snapshot)) => {
                        // The document the stream started over with, not the current one: the
                        // changes after it are still to come in `live`, and a later document
                        // queued first would make the outbox drop them as stale.
                        tracing::info!(stream = self.stream.name(), "stream started over; queueing a snapshot");
                        self.resync_to(Resync::All, &snapshot).await;
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(stream = self.stream.name(), missed, "webhook dispatcher lagged; queueing a snapshot");
                        self.resync(Resync::All).await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                Some(batch) = inflight.next(), if !inflight.is_empty() => self.settle(batch),
                Some(request) = self.requests.recv() => self.resync(request).await,
                _ = retry.tick(), if self.owed.is_some() => {
                    if let Some(owed) = self.owed.take() {
                        self.resync(owed).await;
                    }
                }
            }
        }
    }
}

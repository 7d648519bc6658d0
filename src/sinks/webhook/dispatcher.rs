//! One dispatcher per stream: subscribes to the hub and accepts every change into the outbox
//! for the endpoints that want it, in one transaction per change.
//!
//! On a single node the dispatcher always runs, unfenced. In a cluster it runs only while this
//! node holds the stream's lease, and every accept carries the lease's fence: once a successor
//! has written, the outbox refuses the old holder ([`OutboxError::Fenced`]) and its dispatcher
//! stops. A dispatcher that starts (or takes over) resumes from the endpoints' cursors in the
//! outbox: the changes after the oldest cursor are replayed from the stream's history (patches
//! where a pair's queue ends right before them; pairs that would need a document history does
//! not keep are owed one, and get the current document), so a failover loses nothing and
//! queues nothing twice.
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
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;

use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::body::{self, NoticeKind};
use super::outbox::{
    Accepted, NewChange, NewNotice, Outbox, OutboxError, OutboxFuture, StoredDocument, Target,
};
use super::registry::Registry;
use crate::hub::{
    Change, ChangeKind, Initial, Recovery, Resume, Stream, StreamEvent, Subscription,
    UpstreamFailure,
};
use crate::snapshot::Snapshot;
use crate::views::Target as Feed;

/// A request to queue the stream's current document for some endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resync {
    /// For the endpoints the outbox says are owed it ([`Outbox::owed`]: marked by
    /// [`Outbox::owe_snapshot`], or left without a cursor by a dead delivery).
    Owed,
    /// For every endpoint subscribed to the stream.
    All,
}

/// Which node may dispatch a stream: the fence of this node's lease on it, `None` while
/// another node holds it.
pub type Lease = watch::Receiver<Option<u64>>;

/// Why a dispatcher stopped dispatching.
enum Stop {
    /// Shutdown, or the stream closed.
    Done,
    /// The lease moved to another node (or a successor already wrote): wait for it again.
    Lost,
    /// A view's stream ended (evicted, or its source started over without it): follow the
    /// view again.
    Ended,
}

/// Where resync requests for a stream go (its dispatcher), by stream name; shared by the
/// worker, the admin API and the dispatchers' lifecycle, which adds and removes routes as
/// dispatchers start and stop while running.
#[derive(Debug, Clone, Default)]
pub struct ResyncRoutes(Arc<RwLock<HashMap<String, mpsc::UnboundedSender<Resync>>>>);

impl ResyncRoutes {
    /// No routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `stream`'s requests to `sender` (replacing any route it had).
    pub fn insert(&self, stream: String, sender: mpsc::UnboundedSender<Resync>) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(stream, sender);
    }

    /// Removes `stream`'s route (its dispatcher stopped).
    pub fn remove(&self, stream: &str) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(stream);
    }

    /// Where `stream`'s requests go, if its dispatcher runs on this node.
    pub fn get(&self, stream: &str) -> Option<mpsc::UnboundedSender<Resync>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(stream)
            .cloned()
    }
}

/// Accepts one stream's changes into the outbox.
pub struct Dispatcher {
    stream: Arc<Stream>,
    outbox: Arc<dyn Outbox>,
    registry: Arc<Registry>,
    backlog_limit: usize,
    wake: Arc<Notify>,
    requests: mpsc::UnboundedReceiver<Resync>,
    /// Taken when the dispatcher is built, so no change published after `Webhooks::start`
    /// returns can be missed (a single node; in a cluster the dispatcher resumes from the
    /// outbox's cursors whenever it takes the lease).
    subscription: Option<Subscription>,
    /// Set when storing failed: a snapshot is queued once storing works again, so a quiet
    /// stream still ends at its current document.
    retry: Option<Resync>,
    /// In a cluster, the stream's lease: dispatch only while it is held, with its fence.
    lease: Option<Lease>,
    /// The fence of the current accepts (`None`: unfenced, a single node).
    fence: Option<u64>,
    /// Set when the outbox refused an accept for a newer fence.
    fenced: bool,
    /// How often to look for pairs owed a snapshot (a shared store, where other nodes mark
    /// them); `None`: only when asked.
    owed_poll: Option<Duration>,
    /// Store the stream's current document too (a push stream).
    keep_document: bool,
    /// Up to which `seq` everything is committed.
    committed: watch::Sender<u64>,
    /// The view followed, when the dispatcher serves a view rather than a stream: subscribed
    /// to through it (a view with a subscriber is never evicted), and followed again when
    /// its stream ends.
    feed: Option<Feed>,
    /// Where the dispatcher's line is in a view's stream: the view's last change received, so
    /// the next one's patch is known to apply to it (a view's changes are sparse). `None`:
    /// unknown (after a lag), so the next change reaches its endpoints as a document.
    at: Option<(u64, u64)>,
    /// A view's subscription held while a term starts, so the view is not evicted meanwhile.
    held: Option<Subscription>,
    /// The run of failures the endpoints were last told of (when it began, how many polls
    /// failed so far), `None` while the upstream answers: a `stream.error` is queued on the
    /// transition to failing, a `stream.recovered` on the transition back, never one per
    /// failed poll.
    failing: Option<(std::time::SystemTime, u32)>,
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
    /// Pairs owed a document the replayed changes did not carry.
    owed: usize,
    /// A newer dispatcher wrote first.
    fenced: bool,
    /// A notice's kind, when the batch was one (its failure is not healed by a snapshot).
    notice: Option<NoticeKind>,
}

/// A submitted batch, resolving once its transaction(s) committed.
type Pending = Pin<Box<dyn Future<Output = Batch> + Send>>;

/// The stream's current document as a change every endpoint receives whole.
fn snapshot_change(stream: &Stream, snapshot: &Snapshot) -> NewChange {
    NewChange {
        stream: Arc::from(stream.name()),
        epoch: snapshot.epoch,
        seq: snapshot.seq,
        base: None,
        patch: None,
        document: Some(snapshot.json.clone()),
        at: snapshot.at,
    }
}

/// A published change, `document` being the JSON of the document after it: carried by the
/// live event, absent for a patch replayed from history (which keeps no documents; a
/// snapshot's payload is its document).
fn new_change(change: &Change, document: Option<&Bytes>, base: Option<u64>) -> NewChange {
    let (patch, document) = match change.kind {
        ChangeKind::Patch => (Some(change.payload.clone()), document.cloned()),
        ChangeKind::Snapshot => (None, Some(change.payload.clone())),
    };
    NewChange {
        stream: change.stream.clone(),
        epoch: change.epoch,
        seq: change.seq,
        base,
        patch,
        document,
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
            retry: None,
            keep_document,
            committed: watch::Sender::new(0),
            lease: None,
            fence: None,
            fenced: false,
            owed_poll: None,
            feed: None,
            at: None,
            held: None,
            failing: None,
        }
    }

    /// A dispatcher for a view (`feed`, a [`Feed::View`]) whose stream is `stream`: its
    /// endpoints receive the view's document and changes under the view's name
    /// (`{stream}@{view}`), and it keeps its subscription so the view is never evicted.
    pub fn view(
        feed: Feed,
        stream: Arc<Stream>,
        outbox: Arc<dyn Outbox>,
        registry: Arc<Registry>,
        backlog_limit: usize,
        wake: Arc<Notify>,
        requests: mpsc::UnboundedReceiver<Resync>,
    ) -> Self {
        let mut dispatcher = Dispatcher::new(
            stream,
            outbox,
            registry,
            backlog_limit,
            wake,
            requests,
            false,
        );
        // Subscribed through the view, which counts the subscriber under its lock.
        dispatcher.subscription = feed.subscribe(&Resume::Fresh).ok();
        dispatcher.feed = Some(feed);
        dispatcher
    }

    /// The sequence number a view's `change` applies to (see [`NewChange::base`]): the view's
    /// previous change when known, else the change itself, which no endpoint's queue ends
    /// before (it gets a document). `None` for a stream: `seq - 1`.
    fn base_of(&mut self, change: &Change) -> Option<u64> {
        self.feed.as_ref()?;
        let base = self
            .at
            .filter(|(epoch, seq)| *epoch == change.epoch && *seq < change.seq)
            .map_or(change.seq, |(_, seq)| seq);
        self.at = Some((change.epoch, change.seq));
        Some(base)
    }

    /// Subscribes to the stream (a view through its feed, refreshing the view's stream, which
    /// an eviction replaced) from `resume`.
    fn follow(&mut self, resume: &Resume) -> Option<Subscription> {
        let Some(feed) = &self.feed else {
            return Some(self.stream.subscribe(resume));
        };
        match feed.subscribe(resume) {
            Ok(subscription) => {
                self.stream = subscription.stream().clone();
                Some(subscription)
            }
            Err(error) => {
                tracing::warn!(stream = self.stream.name(), %error, "cannot follow the view for its webhooks; retrying");
                None
            }
        }
    }

    /// Dispatches only while `lease` says this node holds the stream's lease, fenced by it,
    /// and looks for pairs owed a snapshot every `owed_poll` meanwhile (a cluster).
    pub fn leased(mut self, lease: Lease, owed_poll: Duration) -> Self {
        // Each term starts from the outbox's cursors, not from when the dispatcher was built.
        self.subscription = None;
        self.lease = Some(lease);
        self.owed_poll = Some(owed_poll);
        self
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
        let document = change.document.clone().filter(|_| self.keep_document)?;
        Some(self.outbox.save_document(StoredDocument {
            stream: change.stream.clone(),
            epoch: change.epoch,
            seq: change.seq,
            document,
            at: change.at,
        }))
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
        let queued = (!targets.is_empty()).then(|| {
            self.outbox
                .accept(change, targets, self.backlog_limit, self.fence)
        });
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
            Err(OutboxError::Fenced) => {
                self.fenced = true;
                false
            }
            Err(error) => {
                tracing::error!(stream = self.stream.name(), %error, "cannot queue a webhook delivery; a snapshot will follow");
                self.retry = Some(match (self.retry.take(), on_failure) {
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
    fn submit(&mut self, changes: &[(Arc<Change>, Option<Bytes>)]) -> Option<Pending> {
        let (last, last_document) = changes.last()?;
        let mut pending = Vec::new();
        for (change, document) in changes {
            let base = self.base_of(change);
            let targets = self.registry.targets(&change.stream);
            if !targets.is_empty() {
                pending.push(self.outbox.accept(
                    new_change(change, document.as_ref(), base),
                    targets,
                    self.backlog_limit,
                    self.fence,
                ));
            }
        }
        // After the deliveries: the document is stored in the same transaction as (or a later
        // one than) the last change's deliveries.
        let saved = self.save(&new_change(last, last_document.as_ref(), None));
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
                        batch.owed += accepted.owed;
                    }
                    Err(OutboxError::Fenced) => batch.fenced = true,
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

    /// Queues a notice for the endpoints that list its kind, after every change submitted
    /// before it (the outbox keeps call order).
    fn notify(
        &mut self,
        kind: NoticeKind,
        epoch: u64,
        seq: u64,
        data: serde_json::Value,
        at: std::time::SystemTime,
    ) -> Option<Pending> {
        let targets = self.registry.notice_targets(self.stream.name(), kind);
        if targets.is_empty() {
            return None;
        }
        let name = self.stream.name();
        let notice = NewNotice {
            stream: Arc::from(name),
            kind,
            epoch,
            seq,
            body: Bytes::from(body::encode_notice(kind, name, epoch, seq, at, &data)),
        };
        let queued = self.outbox.notice(notice, targets, self.fence);
        Some(Box::pin(async move {
            let mut batch = Batch {
                notice: Some(kind),
                ..Batch::default()
            };
            match queued.await {
                Ok(queued) => batch.queued = queued,
                Err(OutboxError::Fenced) => batch.fenced = true,
                Err(error) => batch.error = Some(error.to_string()),
            }
            batch
        }))
    }

    /// A failed poll: a `stream.error` when the stream was not failing (a changed cause
    /// while it keeps failing is no new error: the recovery closes the run).
    fn failed(&mut self, failure: &UpstreamFailure) -> Option<Pending> {
        if self
            .failing
            .replace((failure.since, failure.failures))
            .is_some()
        {
            return None;
        }
        let data = body::error_data(
            self.stream.name(),
            failure.epoch,
            failure.seq,
            failure.status,
            failure.cause,
            &failure.message,
            failure.at,
            failure.since,
            u64::try_from(failure.retry_in.as_millis()).unwrap_or(u64::MAX),
        );
        self.notify(
            NoticeKind::Error,
            failure.epoch,
            failure.seq,
            data,
            failure.at,
        )
    }

    /// The upstream answers again: a `stream.recovered` when the stream was failing.
    fn recovered(&mut self, recovery: &Recovery) -> Option<Pending> {
        // Told only if the endpoints were told of the failures.
        self.failing.take()?;
        let data = body::recovery_data(
            self.stream.name(),
            recovery.epoch,
            recovery.seq,
            recovery.since,
            recovery.failures,
            recovery.at,
        );
        self.notify(
            NoticeKind::Recovery,
            recovery.epoch,
            recovery.seq,
            data,
            recovery.at,
        )
    }

    /// After a lag (events were missed): a failure or a recovery missed is told now, from the
    /// stream's state (a recovery missed is told with what the last failure seen said).
    fn caught_up(&mut self) -> Option<Pending> {
        if let Some(failure) = self.stream.failure() {
            return self.failed(&failure);
        }
        let (since, failures) = self.failing.take()?;
        let (epoch, seq) = self.stream.position();
        let at = std::time::SystemTime::now();
        let data = body::recovery_data(self.stream.name(), epoch, seq, since, failures, at);
        self.notify(NoticeKind::Recovery, epoch, seq, data, at)
    }

    /// Acts on a committed batch: everything up to its `seq` is committed, or a snapshot is
    /// owed.
    fn settle(&mut self, batch: Batch) {
        if batch.fenced {
            self.fenced = true;
            return;
        }
        if let Some(kind) = batch.notice {
            if let Some(error) = batch.error {
                tracing::error!(stream = self.stream.name(), ?kind, %error, "cannot queue a webhook notice");
                // An error not stored is queued again at the next failed poll.
                if kind == NoticeKind::Error {
                    self.failing = None;
                }
            }
            if batch.queued > 0 {
                self.wake.notify_one();
            }
            return;
        }
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
                self.retry = Some(Resync::All);
            }
            None => self.commit(batch.seq),
        }
        if batch.owed > 0 {
            // Pairs whose replayed change needed a document: the current one follows.
            self.retry.get_or_insert(Resync::Owed);
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
            Resync::Owed => match self.outbox.owed(self.stream.name().to_owned()).await {
                Ok(owed) => targets
                    .into_iter()
                    .filter(|t| owed.contains(&t.endpoint))
                    .collect(),
                Err(error) => {
                    tracing::warn!(stream = self.stream.name(), %error, "cannot read which webhook endpoints are owed a snapshot");
                    self.retry.get_or_insert(Resync::Owed);
                    return;
                }
            },
        };
        if targets.is_empty() && which != Resync::All {
            // Nobody is owed it. (A resync of all still stores a push stream's document and
            // commits its seq.)
            return;
        }
        let change = snapshot_change(&self.stream, snapshot);
        let all = which == Resync::All;
        if self.accept(change, targets, which).await && all {
            // Every endpoint has the document at `snapshot.seq` (or a later one) queued.
            self.commit(snapshot.seq);
        }
    }

    /// Runs until `shutdown` or the stream closes: dispatches the stream's changes, in a
    /// cluster whenever this node holds its lease.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let subscription = match self.lease.clone() {
                None => match self.subscription.take() {
                    Some(subscription) => subscription,
                    None if self.feed.is_some() => match self.resume(&shutdown).await {
                        Some(subscription) => subscription,
                        None => return,
                    },
                    None => return,
                },
                Some(mut lease) => {
                    let fence = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        held = lease.wait_for(Option::is_some) => match held {
                            Ok(fence) => *fence,
                            Err(_) => return,
                        },
                    };
                    self.fence = fence;
                    self.fenced = false;
                    tracing::info!(
                        stream = self.stream.name(),
                        ?fence,
                        "dispatching the stream's webhooks"
                    );
                    match self.resume(&shutdown).await {
                        Some(subscription) => subscription,
                        None => return,
                    }
                }
            };
            match self.dispatch(subscription, &shutdown).await {
                Stop::Done => return,
                Stop::Ended => {
                    // Follow the view again once it can be had (from the outbox's cursors).
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Stop::Lost => {
                    tracing::info!(
                        stream = self.stream.name(),
                        "another node dispatches the stream's webhooks now"
                    );
                    // Requests made meanwhile are the holder's to serve (it polls the owed
                    // pairs); pending retries too.
                    while self.requests.try_recv().is_ok() {}
                    self.retry = None;
                    if let Some(lease) = &mut self.lease {
                        // Wait for the lease to change before trying again (a refusal by the
                        // outbox means a successor wrote, whatever the watch says yet).
                        let current = *lease.borrow_and_update();
                        if current.is_some() && current == self.fence {
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                changed = lease.changed() => if changed.is_err() { return },
                            }
                        }
                    }
                }
            }
        }
    }

    /// Where a new term starts: after the oldest cursor of the stream's endpoints in the
    /// stream's current epoch (the changes after it come from history, or a snapshot when
    /// history no longer has them all); from the current document when no endpoint has one.
    async fn resume(&mut self, shutdown: &CancellationToken) -> Option<Subscription> {
        if self.feed.is_some() {
            // The view's current stream (a new one if it was evicted), subscribed to while
            // the cursors are read, so it stays.
            loop {
                if let Some(held) = self.follow(&Resume::Fresh) {
                    self.held = Some(held);
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        let cursors = loop {
            match self.outbox.cursors(self.stream.name().to_owned()).await {
                Ok(cursors) => break cursors,
                Err(error) => {
                    tracing::warn!(stream = self.stream.name(), %error, "cannot read the webhook cursors; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let targets = self.registry.targets(self.stream.name());
        let resuming = cursors.iter().any(|(endpoint, cursor)| {
            cursor.is_some() && targets.iter().any(|t| &t.endpoint == endpoint)
        });
        if resuming && self.stream.snapshot().is_none() {
            // This node has not loaded the stream from the log yet (it just started): resume
            // once it has, from its history, rather than send everyone a snapshot then.
            let mut waiting = self.stream.subscribe(&Resume::Fresh).live;
            let loaded = async {
                loop {
                    match waiting.recv().await {
                        Ok(StreamEvent::Change(..) | StreamEvent::Reset(_)) => return,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = loaded => {}
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
        let (epoch, top) = self.stream.position();
        let oldest = cursors
            .iter()
            .filter(|(endpoint, _)| targets.iter().any(|t| &t.endpoint == endpoint))
            .filter_map(|(_, cursor)| *cursor)
            .filter(|c| c.epoch == epoch && c.seq <= top)
            .map(|c| c.seq)
            .min();
        let resume = match oldest {
            Some(seq) => Resume::After(self.stream.event_id_in(epoch, seq).to_string()),
            None => Resume::Fresh,
        };
        // Pairs without a cursor (or owed one) get the current document after the replay.
        self.retry = Some(Resync::Owed);
        self.at = match &resume {
            Resume::After(_) => oldest.map(|seq| (epoch, seq)),
            _ => None,
        };
        // A view that cannot be had now (too many views) is retried, never given up on.
        let subscription = loop {
            if let Some(subscription) = self.follow(&resume) {
                break subscription;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        self.held = None;
        Some(subscription)
    }

    /// Dispatches one term: the subscription's initial events, then live ones, until shutdown,
    /// the stream's end, or the loss of the lease.
    async fn dispatch(&mut self, subscription: Subscription, shutdown: &CancellationToken) -> Stop {
        let mut live = subscription.live;
        let mut replayed = Vec::new();
        let mut failing = None;
        for initial in subscription.initial {
            match initial {
                Initial::Snapshot(snapshot) => {
                    self.at = Some((snapshot.epoch, snapshot.seq));
                    let change = snapshot_change(&self.stream, &snapshot);
                    let targets = self.registry.targets(self.stream.name());
                    if self.accept(change, targets, Resync::All).await {
                        self.commit(snapshot.seq);
                    }
                }
                Initial::Change(change) => replayed.push((change, None)),
                Initial::Failure(failure) => failing = Some(failure),
            }
        }
        // Batches submitted and not yet committed, oldest first.
        let mut inflight = FuturesOrdered::new();
        inflight.extend(self.submit(&replayed));
        drop(replayed);
        // The stream is failing as this term starts: its endpoints hear of it (once per run
        // of failures this dispatcher sees).
        if let Some(failure) = failing {
            inflight.extend(self.failed(&failure));
        }
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut owed_poll =
            tokio::time::interval(self.owed_poll.unwrap_or(Duration::from_secs(3600)));
        owed_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lease = self.lease.clone();
        loop {
            if self.fenced {
                return Stop::Lost;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Stop::Done,
                changed = async {
                    match lease.as_mut() {
                        Some(lease) => lease.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let held = lease.as_ref().and_then(|l| *l.borrow());
                    if changed.is_err() || held.is_none() || held != self.fence {
                        return Stop::Lost;
                    }
                }
                event = live.recv() => match event {
                    Ok(StreamEvent::Change(change, document)) => {
                        let mut changes = vec![(change, Some(document))];
                        let mut lagged = false;
                        let mut after = None;
                        // Whatever else is waiting goes to the outbox together: the jobs queue in
                        // order and share transactions (and fsyncs). A failure or recovery
                        // ends the batch: it is queued after the changes before it.
                        while changes.len() < 256 {
                            match live.try_recv() {
                                Ok(StreamEvent::Change(next, document)) => {
                                    changes.push((next, Some(document)));
                                }
                                Ok(event @ (StreamEvent::Failure(_) | StreamEvent::Recovered(_))) => {
                                    after = Some(event);
                                    break;
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
                        match after {
                            Some(StreamEvent::Failure(failure)) => inflight.extend(self.failed(&failure)),
                            Some(StreamEvent::Recovered(recovery)) => inflight.extend(self.recovered(&recovery)),
                            _ => {}
                        }
                        if lagged {
                            self.at = None;
                            tracing::warn!(stream = self.stream.name(), "webhook dispatcher lagged; queueing a snapshot");
                            self.resync(Resync::All).await;
                            inflight.extend(self.caught_up());
                        }
                    }
                    Ok(StreamEvent::Reset(snapshot)) => {
                        // The document the stream started over with, not the current one: the
                        // changes after it are still to come in `live`, and a later document
                        // queued first would make the outbox drop them as stale.
                        tracing::info!(stream = self.stream.name(), "stream started over; queueing a snapshot");
                        self.at = Some((snapshot.epoch, snapshot.seq));
                        self.resync_to(Resync::All, &snapshot).await;
                    }
                    Ok(StreamEvent::Failure(failure)) => inflight.extend(self.failed(&failure)),
                    Ok(StreamEvent::Recovered(recovery)) => inflight.extend(self.recovered(&recovery)),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        self.at = None;
                        tracing::warn!(stream = self.stream.name(), missed, "webhook dispatcher lagged; queueing a snapshot");
                        self.resync(Resync::All).await;
                        inflight.extend(self.caught_up());
                    }
                    Err(broadcast::error::RecvError::Closed) if self.feed.is_some() => {
                        tracing::info!(stream = self.stream.name(), "the view ended; following it again");
                        return Stop::Ended;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Stop::Done,
                },
                Some(batch) = inflight.next(), if !inflight.is_empty() => self.settle(batch),
                Some(request) = self.requests.recv() => self.resync(request).await,
                _ = owed_poll.tick(), if self.owed_poll.is_some() => self.resync(Resync::Owed).await,
                _ = retry.tick(), if self.retry.is_some() && inflight.is_empty() => {
                    if let Some(retry) = self.retry.take() {
                        self.resync(retry).await;
                    }
                }
            }
        }
    }
}

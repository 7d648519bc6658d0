//! One stream: sequence, history, publish and subscribe.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

use crate::diff::{self, DiffOptions};
use crate::metrics::{ChangeLabels, Metrics, StreamLabels};
use crate::snapshot::{self, Snapshot, SnapshotStore};
use crate::wire::{ChangeKind, Frames};

/// How a stream keeps and fans out its changes.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Recent changes kept for resuming subscribers.
    pub history: usize,
    /// Most bytes those changes may hold together (payloads and their encodings); the oldest
    /// are dropped first when either bound is exceeded.
    pub history_bytes: u64,
    /// Events a subscriber may fall behind before it is resynced.
    pub buffer: usize,
    /// How changes are computed.
    pub diff: DiffOptions,
}

/// One published change: the one event every sink sees, serialized once.
#[derive(Debug)]
pub struct Change {
    /// The stream's name.
    pub stream: Arc<str>,
    /// The stream's epoch: sequence numbers are only comparable within one epoch.
    pub epoch: u64,
    /// This change's sequence number; the first change of an epoch is 1.
    pub seq: u64,
    /// Patch or snapshot.
    pub kind: ChangeKind,
    /// The JSON sent to subscribers: the RFC 6902 patch from the document at `seq - 1`, or the
    /// whole document for snapshot changes.
    pub payload: Bytes,
    /// When the change was published.
    pub at: SystemTime,
    /// This change as an event of each dialect, framed by the SSE sink on first use and then
    /// shared by every subscriber. A snapshot change shares them with the snapshot it
    /// published: they are the same event.
    pub frames: Arc<Frames>,
}

impl Change {
    /// The bytes this change holds: its payload and every frame built so far. History is
    /// bounded by their sum. A change holds no document tree: only bytes.
    pub fn retained_bytes(&self) -> usize {
        self.payload.len() + self.frames.retained_bytes()
    }

    /// The id of this change's event.
    pub fn id(&self) -> EventId {
        EventId {
            stream: self.stream.to_string(),
            epoch: self.epoch,
            seq: self.seq,
        }
    }
}

/// A failed poll, as told to subscribers while the upstream fails.
#[derive(Debug)]
pub struct UpstreamFailure {
    /// The HTTP status that best describes the failure (the upstream's, or 502/504).
    pub status: u16,
    /// A human-readable reason (never contains header values).
    pub message: String,
    /// A machine-readable reason (see `upstream::FetchError::cause`), or why the proxy ended
    /// the stream.
    pub cause: &'static str,
    /// When the poll failed.
    pub at: SystemTime,
    /// When the run of failures this one belongs to began.
    pub since: SystemTime,
    /// Failed polls in this run, this one included.
    pub failures: u32,
    /// When the next attempt is due.
    pub retry_in: Duration,
    /// The epoch of the last good document.
    pub epoch: u64,
    /// The sequence number of the last good document (the failure does not advance it).
    pub seq: u64,
    /// This failure as a native `error` event, framed by the SSE sink on first use (the
    /// Streamdata.io one names each connection's session, so it is framed per connection).
    pub frames: Frames,
}

/// The end of a run of failures: the upstream answers again.
#[derive(Debug)]
pub struct Recovery {
    /// When the first failure of the run happened.
    pub since: SystemTime,
    /// How many polls failed in a row.
    pub failures: u32,
    /// When the upstream answered again.
    pub at: SystemTime,
    /// The epoch of the last good document when the upstream answered again.
    pub epoch: u64,
    /// The sequence number of the last good document when the upstream answered again.
    pub seq: u64,
    /// This recovery as a native `recovered` event, framed by the SSE sink on first use.
    pub frames: Frames,
}

/// What a subscriber receives live.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// A new change, with the JSON of the document after it (for sinks that send whole
    /// documents). The document is held only until every receiver has seen the event, never by
    /// history. Empty for a lazily kept stream's patch (a view's: its subscribers are SSE and
    /// WebSocket sinks, which never read it; see [`Stream::lazy`]).
    Change(Arc<Change>, Bytes),
    /// The upstream failed; the last good document stays current.
    Failure(Arc<UpstreamFailure>),
    /// The upstream answers again after failures (sent before the change, if any).
    Recovered(Arc<Recovery>),
    /// Nothing happened for a while; keeps idle connections open through proxies.
    KeepAlive,
    /// The stream starts over from this document (a cluster whose log was lost began a new
    /// epoch, or a node could not follow its log): every subscriber is sent it whole, and
    /// changes of other epochs are never sent after it.
    Reset(Arc<Snapshot>),
}

/// A change computed from a document, not yet given its place in the stream: what
/// [`Stream::commit`] appends. Its JSON is written once, here.
#[derive(Debug)]
pub struct Prepared {
    /// Patch or snapshot.
    pub kind: ChangeKind,
    /// The patch, or the whole document.
    pub payload: Bytes,
    /// The document after the change.
    pub document: Value,
    /// `document` as JSON (the same bytes as `payload` for a snapshot change).
    pub json: Bytes,
    /// Where the elements of the entity array the stream's derivation works on lie in `json`
    /// (see [`Derivation::entities`]).
    pub entities: Option<Vec<std::ops::Range<usize>>>,
    /// How the diff compared those elements with the previous document's.
    pub split: Option<diff::Split>,
}

/// What a document would change in a stream.
#[derive(Debug)]
pub enum Preparation {
    /// This change.
    Change(Prepared),
    /// The document equals the current one.
    Unchanged,
    /// Only ignored paths changed.
    Ignored,
}

/// Why a change from elsewhere (the cluster's log) cannot be appended here.
#[derive(Debug, thiserror::Error)]
pub enum Diverged {
    /// Another epoch, or not the next change: the stream must be reloaded.
    #[error("change {epoch}:{seq} does not follow {local_epoch}:{top}")]
    NotNext {
        /// The change's epoch.
        epoch: u64,
        /// The change's sequence number.
        seq: u64,
        /// The stream's epoch.
        local_epoch: u64,
        /// The stream's top.
        top: u64,
    },
    /// The change cannot be applied to the current document.
    #[error("the change cannot be applied: {0}")]
    Invalid(String),
}

/// Streams computed from this one (views of it): told of everything that happens to it, in
/// order, with the documents before and after each change. Called outside the stream's state
/// lock but one call at a time, in the order of the stream's changes.
pub trait Derivation: Send + Sync {
    /// Change `change` made `current` of `previous` (`None` before the first document);
    /// `split` is how the stream's diff compared the entities [`Self::entities`] names, when it
    /// computed the change itself.
    fn changed(
        &self,
        previous: Option<&Arc<Snapshot>>,
        current: &Arc<Snapshot>,
        change: &Arc<Change>,
        split: Option<&diff::Split>,
    );
    /// The array of entities (object keys from the root) whose elements the derivation works
    /// on, if it would use what the stream learns of them anyway: how its diff compared each
    /// one ([`diff::Split`]) and where each lies in its snapshots' JSON
    /// ([`Snapshot::entity_json`]).
    fn entities(&self) -> Option<&[String]> {
        None
    }
    /// The stream started over from `current` (another epoch, or a reload).
    fn reset(&self, current: &Arc<Snapshot>);
    /// The upstream failed.
    fn failed(&self, failure: &Arc<UpstreamFailure>);
    /// The upstream answers again.
    fn recovered(&self, recovery: &Arc<Recovery>);
    /// A keep-alive was sent to the stream's subscribers.
    fn kept_alive(&self);
    /// The stream ended: no change follows.
    fn closed(&self);
    /// Subscribers of the derived streams (the views' own subscribers).
    fn subscribers(&self) -> usize {
        0
    }
}

/// What was sent to a stream's subscribers: events and their bytes as written (after gzip),
/// over SSE and WebSocket alike. A view's stream adds to its own and to its source's.
#[derive(Debug, Default)]
pub struct Delivered {
    events: AtomicU64,
    bytes: AtomicU64,
}

impl Delivered {
    /// Counts one event of `bytes` bytes.
    pub fn add(&self, bytes: usize) {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Events sent so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Bytes sent so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Builds a lazily kept stream's current document when someone needs it: a view keeps its
/// changes (patches), and its document's tree and JSON are built only for a new subscriber,
/// the JSON endpoint or a resync, not on every change.
pub trait Materialize: Send + Sync {
    /// The document at the stream's top (`None` before any), built now if it is not yet.
    fn current(&self) -> Option<Arc<Snapshot>>;
}

/// What publishing a document did.
#[derive(Debug)]
pub enum Publication {
    /// A change was published.
    Published(Arc<Change>),
    /// The document equals the current one: nothing published.
    Unchanged,
    /// Only ignored paths changed: nothing published, the current snapshot stays as it was so
    /// that the next real change carries the ignored fields along.
    Ignored,
}

/// The id of an SSE event: `{stream}:{epoch}:{seq}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId {
    /// The stream's name.
    pub stream: String,
    /// The stream's epoch.
    pub epoch: u64,
    /// The sequence number.
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.stream, self.epoch, self.seq)
    }
}

impl FromStr for EventId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.rsplitn(3, ':');
        let seq = parts.next().ok_or(())?.parse().map_err(|_| ())?;
        let epoch = parts.next().ok_or(())?.parse().map_err(|_| ())?;
        let stream = parts.next().ok_or(())?;
        if stream.is_empty() {
            return Err(());
        }
        Ok(EventId {
            stream: stream.to_owned(),
            epoch,
            seq,
        })
    }
}

/// A page of changes read from history by [`Stream::changes_after`].
#[derive(Debug)]
pub struct ChangesAfter {
    /// The changes, oldest first.
    pub changes: Vec<Arc<Change>>,
    /// The stream's top sequence number when they were read.
    pub top: u64,
    /// Whether the page reaches the top (else it was cut by its bounds: more follow).
    pub complete: bool,
}

/// Where a new subscriber starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// From the current snapshot.
    Fresh,
    /// After the event with this id (the client's `Last-Event-ID`), raw as the client sent it.
    After(String),
}

/// What a subscriber gets before live events.
#[derive(Debug)]
pub enum Initial {
    /// The current document.
    Snapshot(Arc<Snapshot>),
    /// A change it missed.
    Change(Arc<Change>),
    /// The upstream is currently failing.
    Failure(Arc<UpstreamFailure>),
}

/// A subscriber's start: what to send first, then the live receiver.
pub struct Subscription {
    /// Events to send before live ones, in order.
    pub initial: Vec<Initial>,
    /// Live events.
    pub live: broadcast::Receiver<StreamEvent>,
    /// The epoch the subscriber is in once `initial` is sent.
    pub epoch: u64,
    /// The sequence number the subscriber is at once `initial` is sent (0: no document yet).
    pub seq: u64,
    guard: SubscriberGuard,
}

impl Subscription {
    /// The stream this subscription belongs to.
    pub fn stream(&self) -> &Arc<Stream> {
        &self.guard.stream
    }
}

/// Demand for a stream from outside its own subscriptions (a subscriber of one of its views,
/// whose poller only watches the stream's demand); withdrawn when dropped.
pub struct Demand {
    stream: Arc<Stream>,
}

impl Drop for Demand {
    fn drop(&mut self) {
        let mut last = false;
        self.stream.demand.send_modify(|count| {
            *count = count.saturating_sub(1);
            last = *count == 0;
        });
        if last {
            *self.stream.idle.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(std::time::Instant::now());
        }
    }
}

/// Keeps the subscriber gauge right however a subscription ends.
struct SubscriberGuard {
    stream: Arc<Stream>,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.stream
            .metrics
            .subscribers
            .get_or_create(&self.stream.labels)
            .dec();
        let mut last = false;
        self.stream.demand.send_modify(|count| {
            *count = count.saturating_sub(1);
            last = *count == 0;
        });
        if last {
            *self.stream.idle.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(std::time::Instant::now());
        }
    }
}

struct State {
    /// The epoch: sequence numbers are only comparable within one. Fixed for a stream on its
    /// own; in a cluster it is the log's, which starts over only if the log is lost.
    epoch: u64,
    seq: u64,
    /// The live channel; `None` once the stream is closed, which ends every subscription:
    /// dropping the sender wakes all receivers with `Closed`, so subscribers need no
    /// per-event cancellation future of their own.
    live: Option<broadcast::Sender<StreamEvent>>,
    history: VecDeque<Arc<Change>>,
    /// Every change after this sequence number is in `history` (a resume from an id at or
    /// after it is exact); it moves up as history is trimmed.
    floor: u64,
    /// What `history` holds, in bytes: the sum of `counted`, kept as a running total.
    history_bytes: u64,
    /// Each history entry's `Change::retained_bytes` when last counted (parallel to
    /// `history`): frames are built after a change is committed, so entries are recounted
    /// (the newest few on every commit, all of them once per `history.len()` commits).
    counted: VecDeque<u64>,
    /// Commits since every entry was last recounted.
    since_recount: usize,
    failure: Option<Arc<UpstreamFailure>>,
    /// The last recovery, for subscribers that lagged past its event.
    recovery: Option<Arc<Recovery>>,
    last_change_at: Option<SystemTime>,
}

/// One stream of changes.
pub struct Stream {
    name: Arc<str>,
    /// Changed only by a configuration reload ([`Stream::restart`]).
    options: std::sync::RwLock<StreamOptions>,
    snapshots: SnapshotStore,
    metrics: Arc<Metrics>,
    labels: StreamLabels,
    state: Mutex<State>,
    /// Serializes publishers, so a diff is computed outside `state` without racing another.
    publishing: Mutex<()>,
    changes: AtomicU64,
    /// What its subscribers were sent.
    delivered: Arc<Delivered>,
    /// A view's: its source's count, which its sends add to as well.
    source_delivered: Option<Arc<Delivered>>,
    /// Subscriptions alive: what on-demand pollers watch to start, linger and stop.
    demand: watch::Sender<usize>,
    /// A view's stream: its changes happen at some of its stream's sequence numbers only.
    sparse: bool,
    /// The views computed from this stream, if any.
    /// Replaced only by a configuration reload ([`Stream::rederive`]).
    derivation: std::sync::RwLock<Option<Arc<dyn Derivation>>>,
    /// Taken under the state lock and held across a call of the derivation, so calls follow
    /// the order of the changes without holding the state lock while views are computed.
    deriving: Mutex<()>,
    /// Since when the stream has had no subscription (`None` while it has some).
    idle: Mutex<Option<std::time::Instant>>,
    /// Where a lazily kept stream's document comes from (it is not in the snapshot store).
    materializer: Option<Arc<dyn Materialize>>,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("name", &self.name)
            .field("epoch", &self.epoch())
            .finish()
    }
}

impl Stream {
    /// A stream with no document yet. Its epoch is the current time in milliseconds, so ids
    /// from a previous process (whose sequence restarted) are recognized as stale.
    pub fn new(
        name: &str,
        options: StreamOptions,
        snapshots: SnapshotStore,
        metrics: Arc<Metrics>,
    ) -> Self {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self::in_epoch(name, epoch, options, snapshots, metrics)
    }

    /// A stream continuing from a document stored by an earlier process (a push stream
    /// restarted on its store): same epoch, `snapshot` current, so the next change is
    /// `snapshot.seq + 1` and whoever already has `seq` (a webhook receiver, a
    /// subscriber resuming) needs nothing more.
    pub fn restored(
        name: &str,
        options: StreamOptions,
        snapshots: SnapshotStore,
        metrics: Arc<Metrics>,
        snapshot: Snapshot,
    ) -> Self {
        let stream = Self::in_epoch(name, snapshot.epoch, options, snapshots, metrics);
        let snapshot = Arc::new(snapshot);
        {
            let mut state = stream.lock();
            state.seq = snapshot.seq;
            state.floor = snapshot.seq;
            state.last_change_at = Some(snapshot.at);
        }
        stream.snapshots.insert(stream.name.clone(), snapshot);
        stream
    }

    fn in_epoch(
        name: &str,
        epoch: u64,
        options: StreamOptions,
        snapshots: SnapshotStore,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (live, _) = broadcast::channel(options.buffer.max(1));
        Stream {
            name: Arc::from(name),
            labels: StreamLabels {
                stream: name.to_owned(),
            },
            options: std::sync::RwLock::new(options),
            snapshots,
            metrics,
            state: Mutex::new(State {
                epoch,
                seq: 0,
                live: Some(live),
                history: VecDeque::new(),
                floor: 0,
                history_bytes: 0,
                counted: VecDeque::new(),
                since_recount: 0,
                failure: None,
                recovery: None,
                last_change_at: None,
            }),
            publishing: Mutex::new(()),
            changes: AtomicU64::new(0),
            delivered: Arc::default(),
            source_delivered: None,
            demand: watch::Sender::new(0),
            sparse: false,
            derivation: std::sync::RwLock::new(None),
            deriving: Mutex::new(()),
            idle: Mutex::new(Some(std::time::Instant::now())),
            materializer: None,
        }
    }

    /// A view's stream, named `name`, in `epoch`, starting with `snapshot` (none while its
    /// source has no document): its changes happen at some of its source's sequence numbers,
    /// so a view's ids are its source's epoch and sequence numbers. Its subscribers count under
    /// `labels` (its source's); its changes are counted by the views, not as the source's.
    pub fn derived(
        name: &str,
        options: StreamOptions,
        snapshots: SnapshotStore,
        metrics: Arc<Metrics>,
        labels: StreamLabels,
        epoch: u64,
        snapshot: Option<Snapshot>,
    ) -> Self {
        let mut stream = match snapshot {
            Some(snapshot) => Self::restored(name, options, snapshots, metrics, snapshot),
            None => Self::in_epoch(name, epoch, options, snapshots, metrics),
        };
        stream.labels = labels;
        stream.sparse = true;
        stream
    }

    /// A view's stream kept lazily: like [`Self::derived`], but its document is not stored:
    /// `materializer` builds it when someone needs it, and its changes are appended with
    /// [`Self::append`]. It starts at `seq` of `epoch` (0: no document yet).
    #[allow(clippy::too_many_arguments)]
    pub fn lazy(
        name: &str,
        options: StreamOptions,
        snapshots: SnapshotStore,
        metrics: Arc<Metrics>,
        labels: StreamLabels,
        epoch: u64,
        seq: u64,
        at: Option<SystemTime>,
        materializer: Arc<dyn Materialize>,
    ) -> Self {
        let mut stream = Self::in_epoch(name, epoch, options, snapshots, metrics);
        {
            let state = stream.state.get_mut().unwrap_or_else(|e| e.into_inner());
            state.seq = seq;
            state.floor = seq;
            state.last_change_at = at;
        }
        stream.labels = labels;
        stream.sparse = true;
        stream.materializer = Some(materializer);
        stream
    }

    /// Counts what this (view's) stream sends into `source`'s count too.
    #[must_use]
    pub fn delivering_for(mut self, source: &Stream) -> Self {
        self.source_delivered = Some(source.delivered.clone());
        self
    }

    /// Counts one event of `bytes` bytes written to a subscriber.
    pub fn count_sent(&self, bytes: usize) {
        self.delivered.add(bytes);
        if let Some(source) = &self.source_delivered {
            source.add(bytes);
        }
    }

    /// What the subscribers of this stream (and of its views) were sent.
    pub fn delivered(&self) -> &Delivered {
        &self.delivered
    }

    /// Computes streams from this one: `derivation` is told of every change from now on.
    /// Only one derivation per stream: a second is refused (`false`).
    pub fn derive(&self, derivation: Arc<dyn Derivation>) -> bool {
        let mut current = self
            .derivation
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.is_some() {
            return false;
        }
        *current = Some(derivation);
        true
    }

    /// Replaces the derivation (a reload changed the stream's views); returns the one it
    /// replaces, which its caller closes. Waits for a call of the old one in progress, so the
    /// new one sees every event after the old one's last.
    pub fn rederive(&self, derivation: Option<Arc<dyn Derivation>>) -> Option<Arc<dyn Derivation>> {
        let _order = self.deriving.lock().unwrap_or_else(|e| e.into_inner());
        let mut current = self
            .derivation
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *current, derivation)
    }

    fn derivation(&self) -> Option<Arc<dyn Derivation>> {
        self.derivation
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How the stream keeps and computes its changes now.
    pub fn options(&self) -> StreamOptions {
        self.options
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Changes how the stream keeps and computes its changes from its next change on (a
    /// reload, for a stream that has no document to start over from).
    pub fn set_options(&self, options: StreamOptions) {
        *self
            .options
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = options;
    }

    /// Starts the stream over with `options` (a reload changed its history bounds or diff)
    /// from `document`, in a new epoch: every subscriber is sent the document whole (as a
    /// `Reset`), resumes from ids of earlier epochs get it too, and a failure is cleared (its
    /// subscribers told it is over). The sequence starts again at 1.
    pub fn restart(&self, options: StreamOptions, document: Value) {
        self.set_options(options);
        self.recover();
        let _publishing = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        let millis = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // A later epoch than the current one even if the clock went back.
        let epoch = millis.max(self.epoch().saturating_add(1));
        self.reset(epoch, 1, document, now, Vec::new());
    }

    /// The derivation, if any, with its ordering lock: taken while the caller still holds the
    /// state lock and kept across the call, so derivations see the stream's events in order
    /// without the state lock held while views are computed.
    fn handing_over(&self) -> Option<(MutexGuard<'_, ()>, Arc<dyn Derivation>)> {
        let derivation = self.derivation()?;
        Some((
            self.deriving.lock().unwrap_or_else(|e| e.into_inner()),
            derivation,
        ))
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn name_arc(&self) -> Arc<str> {
        self.name.clone()
    }

    /// The stream's epoch.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// The epoch and top sequence number, read together.
    pub fn position(&self) -> (u64, u64) {
        let state = self.lock();
        (state.epoch, state.seq)
    }

    /// The id of the event at `seq` of this stream's current epoch.
    pub fn event_id(&self, seq: u64) -> EventId {
        self.event_id_in(self.epoch(), seq)
    }

    /// The id of the event at `seq` of `epoch`.
    pub fn event_id_in(&self, epoch: u64, seq: u64) -> EventId {
        EventId {
            stream: self.name.to_string(),
            epoch,
            seq,
        }
    }

    /// The current document, if the stream has one.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        match &self.materializer {
            Some(materializer) => materializer.current(),
            None => self.snapshots.get(&self.name),
        }
    }

    /// The current sequence number (0 before the first document).
    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    /// The current upstream failure, if the last poll failed.
    pub fn failure(&self) -> Option<Arc<UpstreamFailure>> {
        self.lock().failure.clone()
    }

    /// The last end of a run of failures, if any.
    pub fn last_recovery(&self) -> Option<Arc<Recovery>> {
        self.lock().recovery.clone()
    }

    /// When the last change was published.
    pub fn last_change_at(&self) -> Option<SystemTime> {
        self.lock().last_change_at
    }

    /// Changes published since start.
    pub fn changes_published(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Connected subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.lock()
            .live
            .as_ref()
            .map_or(0, broadcast::Sender::receiver_count)
    }

    /// Subscribers of this stream and of its views: who would each poll the upstream without it.
    pub fn audience(&self) -> usize {
        let views = self.derivation().map_or(0, |d| d.subscribers());
        self.subscriber_count().saturating_add(views)
    }

    /// Counts as one more subscription in the stream's demand (what on-demand pollers watch)
    /// until the returned guard is dropped, without subscribing.
    pub fn hold_demand(self: &Arc<Self>) -> Demand {
        self.demand.send_modify(|count| *count += 1);
        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Demand {
            stream: self.clone(),
        }
    }

    /// Since when the stream has had no subscription; `None` while it has some.
    pub fn idle_since(&self) -> Option<std::time::Instant> {
        *self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of live subscriptions, watched: it changes as subscribers come and go.
    pub fn demand(&self) -> watch::Receiver<usize> {
        self.demand.subscribe()
    }

    /// Forgets the current document and failure (an on-demand stream that stopped polling):
    /// the next document is published as a snapshot, and subscribers arriving meanwhile wait
    /// for it rather than receive a stale one. The sequence continues.
    pub fn forget(&self) {
        let mut state = self.lock();
        state.failure = None;
        self.snapshots.remove(&self.name);
    }

    /// The metrics this stream reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Labels of this stream's series.
    pub fn labels(&self) -> &StreamLabels {
        &self.labels
    }

    /// Ends all subscriptions (their receivers report `Closed` once drained); later
    /// subscriptions end at once.
    pub fn close(&self) {
        self.lock().live = None;
        if let Some(derivation) = self.derivation() {
            derivation.closed();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated in a way that
        // matters more than losing the stream, so recover the guard.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `document` as the stream's new state: computes the change from the current
    /// snapshot and fans it out. The first document, a change of the root's type, or a patch
    /// larger than the configured share of the document publish a snapshot instead of a patch.
    pub fn publish(&self, document: Value) -> Publication {
        let _publishing = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.snapshot();
        self.publish_locked(previous, document)
    }

    /// Publishes the document `make` builds from the current one (`None` before the first),
    /// atomically: no other publication happens between reading the current document and
    /// publishing the new one. When `make` fails, nothing is published.
    pub fn publish_with<E>(
        &self,
        make: impl FnOnce(Option<&Value>) -> Result<Value, E>,
    ) -> Result<Publication, E> {
        let _publishing = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.snapshot();
        let document = make(previous.as_deref().map(|s| &s.document))?;
        Ok(self.publish_locked(previous, document))
    }

    /// `publish`, with the publishing lock held by the caller.
    fn publish_locked(&self, previous: Option<Arc<Snapshot>>, document: Value) -> Publication {
        let prepared = match self.prepare(previous.as_deref(), document) {
            Preparation::Change(prepared) => prepared,
            Preparation::Unchanged => return Publication::Unchanged,
            Preparation::Ignored => return Publication::Ignored,
        };
        let (epoch, seq) = self.position();
        match self.commit(epoch, seq + 1, SystemTime::now(), prepared) {
            Ok(Some(change)) => Publication::Published(change),
            // Publishers hold the publishing lock: nothing else moved the top meanwhile.
            Ok(None) | Err(_) => Publication::Unchanged,
        }
    }

    /// What `document` would change after `previous` (the current document, if any): a patch,
    /// or a snapshot for the first document, a change of the root's type, or a patch larger
    /// than the configured share of the document. Pure: the stream is not changed.
    pub fn prepare(&self, previous: Option<&Snapshot>, document: Value) -> Preparation {
        let derivation = self.derivation();
        let entities = derivation.as_deref().and_then(Derivation::entities);
        // The patch is written as JSON straight from the two documents: it is only ever sent.
        let (patch, split) = match previous {
            Some(previous) if same_kind(&previous.document, &document) => {
                let options = self.options.read().unwrap_or_else(|e| e.into_inner());
                let (patch, split) =
                    diff::diff_json_split(&previous.document, &document, &options.diff, entities);
                if patch.operations == 0 {
                    return Preparation::Unchanged;
                }
                if patch.only_ignored {
                    return Preparation::Ignored;
                }
                (Some(patch.json), split)
            }
            _ => (None, None),
        };
        let (json, spans) = snapshot::to_json_marking(&document, entities);
        let (kind, payload) = match patch {
            Some(patch)
                if !diff::prefer_snapshot(
                    patch.len(),
                    json.len(),
                    &self.options.read().unwrap_or_else(|e| e.into_inner()).diff,
                ) =>
            {
                (ChangeKind::Patch, Bytes::from(patch))
            }
            _ => (ChangeKind::Snapshot, json.clone()),
        };
        Preparation::Change(Prepared {
            kind,
            payload,
            document,
            json,
            entities: spans,
            split,
        })
    }

    /// Appends `prepared` as change `seq` of `epoch`, which must be the next one, and fans it
    /// out: history, the current snapshot, every subscriber. A change this stream already has
    /// (at or below its top, same epoch) is not appended again (`Ok(None)`).
    pub fn commit(
        &self,
        epoch: u64,
        seq: u64,
        at: SystemTime,
        prepared: Prepared,
    ) -> Result<Option<Arc<Change>>, Diverged> {
        let Prepared {
            kind,
            payload,
            document,
            json,
            entities,
            split,
        } = prepared;
        let snapshot =
            Arc::new(Snapshot::with_json(epoch, seq, document, json, at).marking(entities));
        let frames = match kind {
            ChangeKind::Patch => Arc::default(),
            // The same event as the snapshot's: framed once for live and new subscribers.
            ChangeKind::Snapshot => snapshot.frames.clone(),
        };
        let change = Arc::new(Change {
            stream: self.name.clone(),
            epoch,
            seq,
            kind,
            payload,
            at,
            frames,
        });
        self.append_change(change, Some(snapshot), split.as_ref())
    }

    /// Appends a change computed elsewhere to a lazily kept stream (see [`Self::lazy`]): the
    /// patch `payload`, or for a snapshot change the document after it, `snapshot` (whose
    /// frames the change shares). Same rules as [`Self::commit`]; the document itself stays
    /// with the stream's materializer, and live subscribers are sent the change without it
    /// (a view's subscribers are SSE and WebSocket sinks, which never read it).
    pub fn append(
        &self,
        epoch: u64,
        seq: u64,
        at: SystemTime,
        payload: Bytes,
        snapshot: Option<Arc<Snapshot>>,
    ) -> Result<Option<Arc<Change>>, Diverged> {
        let (kind, frames) = match &snapshot {
            Some(snapshot) => (ChangeKind::Snapshot, snapshot.frames.clone()),
            None => (ChangeKind::Patch, Arc::default()),
        };
        let change = Arc::new(Change {
            stream: self.name.clone(),
            epoch,
            seq,
            kind,
            payload,
            at,
            frames,
        });
        self.append_change(change, snapshot, None)
    }

    /// Appends a snapshot change to a lazily kept stream (see [`Self::lazy`]) whose document
    /// only its compact JSON, `json`, gives here: the stream's materializer builds the tree
    /// when someone needs it. Same rules as [`Self::append`].
    pub fn append_snapshot_json(
        &self,
        epoch: u64,
        seq: u64,
        at: SystemTime,
        json: Bytes,
    ) -> Result<Option<Arc<Change>>, Diverged> {
        let change = Arc::new(Change {
            stream: self.name.clone(),
            epoch,
            seq,
            kind: ChangeKind::Snapshot,
            payload: json,
            at,
            frames: Arc::default(),
        });
        self.append_change(change, None, None)
    }

    /// Appends `change` (with the document after it, unless the stream is kept lazily) and
    /// fans it out: history, the current snapshot, every subscriber, the derivation.
    fn append_change(
        &self,
        change: Arc<Change>,
        snapshot: Option<Arc<Snapshot>>,
        split: Option<&diff::Split>,
    ) -> Result<Option<Arc<Change>>, Diverged> {
        let (epoch, seq, at) = (change.epoch, change.seq, change.at);
        let derive = {
            let mut state = self.lock();
            let next = if self.sparse {
                seq > state.seq
            } else {
                seq <= state.seq + 1
            };
            if epoch != state.epoch || !next {
                return Err(Diverged::NotNext {
                    epoch,
                    seq,
                    local_epoch: state.epoch,
                    top: state.seq,
                });
            }
            if seq <= state.seq {
                return Ok(None);
            }
            state.seq = seq;
            state.failure = None;
            state.last_change_at = Some(at);
            push_history(&mut state, change.clone());
            self.trim_history(&mut state);
            let document = match (&snapshot, change.kind) {
                (Some(snapshot), _) => snapshot.json.clone(),
                // A lazily kept stream's snapshot change, given by its JSON alone.
                (None, ChangeKind::Snapshot) => change.payload.clone(),
                (None, ChangeKind::Patch) => Bytes::new(),
            };
            let previous = match (&snapshot, &self.materializer) {
                (Some(snapshot), None) => {
                    let previous = self.snapshots.get(&self.name);
                    self.snapshots.insert(self.name.clone(), snapshot.clone());
                    previous
                }
                _ => None,
            };
            // No receivers is not an error: nobody is listening right now.
            if let Some(live) = &state.live {
                let _ = live.send(StreamEvent::Change(change.clone(), document));
            }
            match &snapshot {
                Some(snapshot) if self.materializer.is_none() => self
                    .handing_over()
                    .map(|handover| (handover, previous, snapshot.clone())),
                _ => None,
            }
        };
        if let Some(((_order, derivation), previous, snapshot)) = derive {
            derivation.changed(previous.as_ref(), &snapshot, &change, split);
        }
        let snapshot_bytes = match (&snapshot, change.kind) {
            (Some(snapshot), _) => snapshot.json.len(),
            (None, ChangeKind::Snapshot) => change.payload.len(),
            (None, ChangeKind::Patch) => 0,
        };
        self.count(&change, snapshot_bytes);
        Ok(Some(change))
    }

    /// Appends a change sequenced elsewhere (the cluster's log), computing the document after
    /// it from the current one. A change already here is ignored (`Ok(None)`).
    pub fn apply_logged(
        &self,
        epoch: u64,
        seq: u64,
        kind: ChangeKind,
        payload: Bytes,
        at: SystemTime,
    ) -> Result<Option<Arc<Change>>, Diverged> {
        let (local_epoch, top, current) = {
            let state = self.lock();
            (state.epoch, state.seq, self.snapshots.get(&self.name))
        };
        if epoch != local_epoch || seq > top + 1 {
            return Err(Diverged::NotNext {
                epoch,
                seq,
                local_epoch,
                top,
            });
        }
        if seq <= top {
            return Ok(None);
        }
        let (document, json, entities) = match kind {
            ChangeKind::Snapshot => {
                let document: Value = serde_json::from_slice(&payload)
                    .map_err(|e| Diverged::Invalid(format!("snapshot: {e}")))?;
                (document, payload.clone(), None)
            }
            ChangeKind::Patch => {
                let current = current
                    .filter(|c| c.seq == top)
                    .ok_or_else(|| Diverged::Invalid("no document to patch".into()))?;
                let patch: json_patch::Patch = serde_json::from_slice(&payload)
                    .map_err(|e| Diverged::Invalid(format!("patch: {e}")))?;
                let mut document = current.document.clone();
                diff::apply(&mut document, &patch)
                    .map_err(|e| Diverged::Invalid(format!("patch: {e}")))?;
                let derivation = self.derivation();
                let entities = derivation.as_deref().and_then(Derivation::entities);
                let (json, spans) = snapshot::to_json_marking(&document, entities);
                (document, json, spans)
            }
        };
        self.commit(
            epoch,
            seq,
            at,
            Prepared {
                kind,
                payload,
                document,
                json,
                entities,
                split: None,
            },
        )
    }

    /// Starts over from `document` at `seq` of `epoch`, with `history` (changes of that epoch,
    /// oldest first, ending at `seq`) for subscribers resuming: the state a cluster's log
    /// holds. Every subscriber is sent the document whole.
    pub fn reset(
        &self,
        epoch: u64,
        seq: u64,
        document: Value,
        at: SystemTime,
        history: Vec<Arc<Change>>,
    ) {
        let snapshot = Arc::new(Snapshot::taken_at(epoch, seq, document, at));
        self.reset_to(snapshot, history);
    }

    /// [`Self::reset`] to a snapshot already built (a lazily kept stream's materializer holds
    /// the same one).
    pub fn reset_to(&self, snapshot: Arc<Snapshot>, history: Vec<Arc<Change>>) {
        let (epoch, seq, at) = (snapshot.epoch, snapshot.seq, snapshot.at);
        let mut state = self.lock();
        state.epoch = epoch;
        state.seq = seq;
        state.last_change_at = Some(at);
        state.history.clear();
        state.counted.clear();
        state.history_bytes = 0;
        for change in history
            .into_iter()
            .filter(|c| c.epoch == epoch && c.seq <= seq)
        {
            push_history(&mut state, change);
        }
        // The history given is contiguous up to `seq`: resumes from its first change's base on
        // are exact.
        state.floor = state
            .history
            .front()
            .map_or(seq, |first| first.seq.saturating_sub(1));
        self.trim_history(&mut state);
        if self.materializer.is_none() {
            self.snapshots.insert(self.name.clone(), snapshot.clone());
        }
        if let Some(live) = &state.live {
            let _ = live.send(StreamEvent::Reset(snapshot.clone()));
        }
        let derive = self.handing_over();
        drop(state);
        if let Some((_order, derivation)) = derive {
            derivation.reset(&snapshot);
        }
    }

    /// A change of this stream as the log holds it, for [`Self::reset`]'s history.
    pub fn logged_change(
        &self,
        epoch: u64,
        seq: u64,
        kind: ChangeKind,
        payload: Bytes,
        at: SystemTime,
    ) -> Arc<Change> {
        Arc::new(Change {
            stream: self.name.clone(),
            epoch,
            seq,
            kind,
            payload,
            at,
            frames: Arc::default(),
        })
    }

    fn count(&self, change: &Change, snapshot_bytes: usize) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        if self.sparse {
            // A view's changes are counted by its views (`patchwire_view_*`).
            return;
        }
        let labels = ChangeLabels {
            stream: self.labels.stream.clone(),
            kind: change.kind,
        };
        self.metrics.changes.get_or_create(&labels).inc();
        self.metrics
            .change_bytes
            .get_or_create(&labels)
            .inc_by(change.payload.len() as u64);
        self.metrics
            .snapshot_bytes
            .get_or_create(&self.labels)
            .inc_by(snapshot_bytes as u64);
    }

    /// Drops the oldest changes until history is within both its count and its byte bound.
    /// The bytes are a running total (O(1) amortized per commit, not a sum over history):
    /// frames the sinks build after a commit count too, so the change before the one just
    /// appended is recounted on every commit (that is where frames get built, as a change is
    /// sent, before the next one is) and every entry once per `history.len()` commits (frames
    /// built later: for subscribers resuming, or sent late). A resume older than what is left
    /// gets the current snapshot.
    fn trim_history(&self, state: &mut State) {
        state.since_recount += 1;
        let len = state.history.len();
        let (from, to) = if state.since_recount >= len {
            state.since_recount = 0;
            (0, len)
        } else {
            // The change just appended was counted as it was: nobody has framed it yet.
            (len.saturating_sub(2), len.saturating_sub(1))
        };
        recount(state, from, to);
        let (history, history_bytes) = {
            let options = self.options.read().unwrap_or_else(|e| e.into_inner());
            (options.history, options.history_bytes)
        };
        while state.history.len() > history {
            pop_history(state);
        }
        while state.history_bytes > history_bytes {
            if !pop_history(state) {
                break;
            }
        }
        if self.sparse {
            // A view's stream counts under its source's labels: its history is measured by
            // its views (`patchwire_view_bytes`), not in place of its source's.
            return;
        }
        self.metrics
            .history_changes
            .get_or_create(&self.labels)
            .set(state.history.len() as i64);
        self.metrics
            .history_bytes
            .get_or_create(&self.labels)
            .set(i64::try_from(state.history_bytes).unwrap_or(i64::MAX));
    }

    /// Change `seq` of `epoch`, if history still holds it.
    pub fn change_at(&self, epoch: u64, seq: u64) -> Option<Arc<Change>> {
        let state = self.lock();
        if state.epoch != epoch {
            return None;
        }
        let oldest = state.history.front()?.seq;
        let index = usize::try_from(seq.checked_sub(oldest)?).ok()?;
        state.history.get(index).filter(|c| c.seq == seq).cloned()
    }

    /// The changes after `seq` of `epoch`, oldest first, at most `max_changes` of them and
    /// (beyond the first) at most `max_bytes` of payload, read under the state lock: what a
    /// catch-up page holds. `None` when history cannot answer exactly (another epoch, an id
    /// older than history's floor, or one from the future): the reader must start again
    /// from the current document. An empty page means `seq` is the top.
    pub fn changes_after(
        &self,
        epoch: u64,
        seq: u64,
        max_changes: usize,
        max_bytes: usize,
    ) -> Option<ChangesAfter> {
        let state = self.lock();
        if state.epoch != epoch {
            return None;
        }
        let start = replay_start(&state, seq)?;
        let mut changes = Vec::new();
        let mut bytes = 0usize;
        for change in state.history.iter().skip(start) {
            if changes.len() >= max_changes
                || (!changes.is_empty() && bytes + change.payload.len() > max_bytes)
            {
                break;
            }
            bytes += change.payload.len();
            changes.push(change.clone());
        }
        let last = changes.last().map_or(seq, |c| c.seq);
        Some(ChangesAfter {
            changes,
            top: state.seq,
            complete: last == state.seq,
        })
    }

    /// The changes history holds now, and their bytes.
    pub fn history_size(&self) -> (usize, u64) {
        let state = self.lock();
        (state.history.len(), state.history_bytes)
    }

    /// Tells subscribers the upstream failed (`cause` is machine-readable); the current
    /// document stays.
    pub fn fail(
        &self,
        status: u16,
        cause: &'static str,
        message: String,
        retry_in: Duration,
    ) -> Arc<UpstreamFailure> {
        self.fail_with(status, cause, message, retry_in)
    }

    /// Tells subscribers why the stream ends (`cause` is machine-readable), then ends it.
    pub fn end(&self, status: u16, cause: &'static str, message: String) {
        self.fail_with(status, cause, message, Duration::ZERO);
        self.close();
    }

    fn fail_with(
        &self,
        status: u16,
        cause: &'static str,
        message: String,
        retry_in: Duration,
    ) -> Arc<UpstreamFailure> {
        let mut state = self.lock();
        let at = SystemTime::now();
        let (since, failures) = match &state.failure {
            Some(previous) => (previous.since, previous.failures.saturating_add(1)),
            None => (at, 1),
        };
        let failure = Arc::new(UpstreamFailure {
            status,
            message,
            cause,
            at,
            since,
            failures,
            retry_in,
            epoch: state.epoch,
            seq: state.seq,
            frames: Frames::new(),
        });
        state.failure = Some(failure.clone());
        if let Some(live) = &state.live {
            let _ = live.send(StreamEvent::Failure(failure.clone()));
        }
        let derive = self.handing_over();
        drop(state);
        if let Some((_order, derivation)) = derive {
            derivation.failed(&failure);
        }
        failure
    }

    /// The upstream answers again: the failure state clears and subscribers are told the
    /// failures are over (the next change, if any, follows). A no-op when nothing failed.
    pub fn recover(&self) {
        let mut state = self.lock();
        let Some(failure) = state.failure.take() else {
            return;
        };
        let recovery = Arc::new(Recovery {
            since: failure.since,
            failures: failure.failures,
            at: SystemTime::now(),
            epoch: state.epoch,
            seq: state.seq,
            frames: Frames::new(),
        });
        state.recovery = Some(recovery.clone());
        if let Some(live) = &state.live {
            let _ = live.send(StreamEvent::Recovered(recovery.clone()));
        }
        let derive = self.handing_over();
        drop(state);
        if let Some((_order, derivation)) = derive {
            derivation.recovered(&recovery);
        }
    }

    /// Sends a keep-alive to every subscriber (a no-op without subscribers).
    pub fn keep_alive(&self) {
        if let Some(live) = &self.lock().live
            && live.receiver_count() > 0
        {
            let _ = live.send(StreamEvent::KeepAlive);
        }
        if let Some(derivation) = self.derivation() {
            derivation.kept_alive();
        }
    }

    /// Starts a subscription. With `Resume::After(id)`, if `id` names this stream's epoch and
    /// its successors are all still in history, exactly the missed changes are replayed;
    /// otherwise (too old, another epoch, malformed, from the future) the subscriber starts
    /// from the current snapshot.
    pub fn subscribe(self: &Arc<Self>, resume: &Resume) -> Subscription {
        let (state, snapshot) = match &self.materializer {
            None => {
                let state = self.lock();
                let snapshot = self.snapshots.get(&self.name);
                (state, snapshot)
            }
            // The document is built outside the state lock (its changes are appended under
            // the materializer's lock, which is taken before the state lock), then checked to
            // be the top's: a change appended in between builds it again.
            Some(materializer) => loop {
                let snapshot = materializer.current();
                let state = self.lock();
                match &snapshot {
                    Some(s) if (s.epoch, s.seq) != (state.epoch, state.seq) => continue,
                    _ => break (state, snapshot),
                }
            },
        };
        let live = match &state.live {
            Some(live) => live.subscribe(),
            // Closed: a receiver whose sender is already gone ends at once.
            None => broadcast::channel(1).1,
        };
        let mut initial = Vec::new();

        let replay_from = match resume {
            Resume::After(raw) => raw
                .parse::<EventId>()
                .ok()
                .filter(|id| *id.stream == *self.name && id.epoch == state.epoch)
                .and_then(|id| replay_start(&state, id.seq)),
            Resume::Fresh => None,
        };
        match replay_from {
            Some(start) => {
                initial.extend(
                    state
                        .history
                        .iter()
                        .skip(start)
                        .cloned()
                        .map(Initial::Change),
                );
            }
            None => {
                if let Some(snapshot) = &snapshot {
                    initial.push(Initial::Snapshot(snapshot.clone()));
                }
            }
        }
        if let Some(failure) = &state.failure {
            initial.push(Initial::Failure(failure.clone()));
        }
        let (epoch, seq) = (state.epoch, state.seq);
        drop(state);
        self.metrics.subscribers.get_or_create(&self.labels).inc();
        self.demand.send_modify(|count| *count += 1);
        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Subscription {
            initial,
            live,
            epoch,
            seq,
            guard: SubscriberGuard {
                stream: self.clone(),
            },
        }
    }
}

/// Appends `change` to history, counting its bytes.
fn push_history(state: &mut State, change: Arc<Change>) {
    let bytes = change.retained_bytes() as u64;
    state.history.push_back(change);
    state.counted.push_back(bytes);
    state.history_bytes += bytes;
}

/// Drops the oldest change from history (`false`: history is empty).
fn pop_history(state: &mut State) -> bool {
    let Some(oldest) = state.history.pop_front() else {
        return false;
    };
    let bytes = state.counted.pop_front().unwrap_or(0);
    state.history_bytes = state.history_bytes.saturating_sub(bytes);
    state.floor = oldest.seq;
    true
}

/// Recounts history's entries from index `from` to `to` (frames built since they were
/// counted).
fn recount(state: &mut State, from: usize, to: usize) {
    // Ranges, not `skip`: a zip of two deques would step through every entry before `from`.
    let end = to.min(state.history.len()).min(state.counted.len());
    let from = from.min(end);
    for (change, counted) in state
        .history
        .range(from..end)
        .zip(state.counted.range_mut(from..end))
    {
        let now = change.retained_bytes() as u64;
        state.history_bytes = state.history_bytes - *counted + now;
        *counted = now;
    }
}

/// Index into `history` of the first change after `seq`, if every change after it is there
/// (sequence numbers may skip: a view changes at some of its stream's changes only).
fn replay_start(state: &State, seq: u64) -> Option<usize> {
    if seq > state.seq || seq < state.floor {
        return None;
    }
    Some(state.history.partition_point(|c| c.seq <= seq))
}

/// Whether a patch can turn `a` into `b`: RFC 6902 cannot replace the root in a way every
/// client applies, so a change of the root's type publishes a snapshot.
fn same_kind(a: &Value, b: &Value) -> bool {
    matches!(
        (a, b),
        (Value::Object(_), Value::Object(_)) | (Value::Array(_), Value::Array(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stream(history: usize) -> Arc<Stream> {
        Arc::new(Stream::new(
            "s",
            StreamOptions {
                history,
                history_bytes: u64::MAX,
                buffer: 16,
                diff: DiffOptions::default(),
            },
            SnapshotStore::new(),
            Arc::new(Metrics::new()),
        ))
    }

    fn published(p: Publication) -> Arc<Change> {
        match p {
            Publication::Published(c) => c,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn first_document_is_a_snapshot_then_patches() {
        let s = stream(10);
        let long = "x".repeat(100);
        let c1 = published(s.publish(json!({"a": 1, "b": long})));
        assert_eq!((c1.seq, c1.kind), (1, ChangeKind::Snapshot));
        let c2 = published(s.publish(json!({"a": 2, "b": long})));
        assert_eq!((c2.seq, c2.kind), (2, ChangeKind::Patch));
        assert_eq!(
            &c2.payload[..],
            br#"[{"op":"replace","path":"/a","value":2}]"#
        );
        assert!(matches!(
            s.publish(json!({"a": 2, "b": long})),
            Publication::Unchanged
        ));
        assert_eq!(s.seq(), 2);
        // A patch larger than the document is sent as the document.
        assert_eq!(
            published(s.publish(json!({"a": 3}))).kind,
            ChangeKind::Snapshot
        );
    }

    #[test]
    fn scalar_roots_and_root_type_changes_publish_snapshots() {
        let s = stream(10);
        published(s.publish(json!({"a": 1})));
        assert_eq!(published(s.publish(json!([1]))).kind, ChangeKind::Snapshot);
        assert_eq!(published(s.publish(json!(3))).kind, ChangeKind::Snapshot);
        assert_eq!(published(s.publish(json!(4))).kind, ChangeKind::Snapshot);
    }

    #[test]
    fn event_ids_round_trip_and_reject_garbage() {
        let id = EventId {
            stream: "a.b-c".into(),
            epoch: 17,
            seq: 4,
        };
        assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
        for bad in ["", "x", "s:1", "s:x:1", ":1:2", "s:1:-1", "s:1:2:3x"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn changes_after_pages_history_and_refuses_what_it_cannot_answer() {
        let s = stream(3);
        for i in 0..5 {
            published(s.publish(json!({"n": i, "pad": "x".repeat(40)})));
        }
        let epoch = s.epoch();
        let seqs = |page: &ChangesAfter| page.changes.iter().map(|c| c.seq).collect::<Vec<_>>();
        let all = s
            .changes_after(epoch, 2, 10, usize::MAX)
            .expect("in history");
        assert_eq!(
            (seqs(&all), all.top, all.complete),
            (vec![3, 4, 5], 5, true)
        );
        // Cut by count, then by bytes (the first change always fits).
        let two = s
            .changes_after(epoch, 2, 2, usize::MAX)
            .expect("in history");
        assert_eq!((seqs(&two), two.complete), (vec![3, 4], false));
        let one = s.changes_after(epoch, 2, 10, 1).expect("in history");
        assert_eq!((seqs(&one), one.complete), (vec![3], false));
        // At the top: an empty, complete page.
        let top = s.changes_after(epoch, 5, 10, usize::MAX).expect("the top");
        assert!(top.changes.is_empty() && top.complete);
        // Older than history, from the future, another epoch: no answer.
        assert!(s.changes_after(epoch, 1, 10, usize::MAX).is_none());
        assert!(s.changes_after(epoch, 6, 10, usize::MAX).is_none());
        assert!(s.changes_after(epoch + 1, 3, 10, usize::MAX).is_none());
    }

    #[test]
    fn resume_replays_exactly_the_missed_changes() {
        let s = stream(3);
        for i in 0..5 {
            published(s.publish(json!({"n": i})));
        }
        let id = |seq| Resume::After(s.event_id(seq).to_string());
        let seqs = |sub: &Subscription| -> Vec<u64> {
            sub.initial
                .iter()
                .map(|i| match i {
                    Initial::Change(c) => c.seq,
                    Initial::Snapshot(snap) => 1000 + snap.seq,
                    Initial::Failure(_) => 9999,
                })
                .collect()
        };
        assert_eq!(seqs(&s.subscribe(&id(2))), vec![3, 4, 5]);
        assert_eq!(seqs(&s.subscribe(&id(4))), vec![5]);
        assert!(s.subscribe(&id(5)).initial.is_empty());
        // Too old, from the future, another epoch, malformed: a fresh snapshot.
        assert_eq!(seqs(&s.subscribe(&id(1))), vec![1005]);
        assert_eq!(seqs(&s.subscribe(&id(6))), vec![1005]);
        assert_eq!(
            seqs(&s.subscribe(&Resume::After(format!("s:{}:3", s.epoch() + 1)))),
            vec![1005]
        );
        assert_eq!(
            seqs(&s.subscribe(&Resume::After("garbage".into()))),
            vec![1005]
        );
        assert_eq!(seqs(&s.subscribe(&Resume::Fresh)), vec![1005]);
    }

    #[test]
    fn history_is_bounded_in_bytes_and_holds_no_document() {
        let s = Arc::new(Stream::new(
            "s",
            StreamOptions {
                history: 1000,
                history_bytes: 4096,
                buffer: 16,
                diff: DiffOptions::default(),
            },
            SnapshotStore::new(),
            Arc::new(Metrics::new()),
        ));
        // As with a native subscriber listening: each change is framed once published, and
        // history counts the frames from the next publish on.
        let framed = |change: Arc<Change>| {
            crate::sinks::sse::change_frame(&change, crate::wire::Dialect::Native);
        };
        let big = "x".repeat(10_000);
        framed(published(s.publish(json!({"n": 0, "big": big}))));
        let first_document = Arc::downgrade(&s.snapshot().expect("a document"));
        for i in 1..50 {
            framed(published(s.publish(json!({"n": i, "big": big}))));
        }
        // Superseded documents are freed: history holds bytes only (moka drops replaced
        // values once its pending tasks run).
        s.snapshots.weighted_bytes();
        assert!(first_document.upgrade().is_none());
        let (changes, bytes) = s.history_size();
        assert!(bytes <= 4096, "{bytes}");
        assert!(changes > 10, "small patches stay: {changes}");
        assert_eq!(
            s.metrics().history_bytes.get_or_create(s.labels()).get(),
            bytes as i64
        );
        assert_eq!(
            s.metrics().history_changes.get_or_create(s.labels()).get(),
            changes as i64
        );
        // The first change (a 10 KB snapshot) no longer fits: resuming from before it, or
        // from a change history no longer holds, gets the current snapshot.
        let sub = s.subscribe(&Resume::After(s.event_id(1).to_string()));
        assert!(matches!(sub.initial.as_slice(), [Initial::Snapshot(x)] if x.seq == 50));
        // A recent one is replayed exactly.
        let sub = s.subscribe(&Resume::After(s.event_id(48).to_string()));
        let seqs: Vec<u64> = sub
            .initial
            .iter()
            .map(|i| match i {
                Initial::Change(c) => c.seq,
                _ => 0,
            })
            .collect();
        assert_eq!(seqs, vec![49, 50]);
    }

    #[test]
    fn failure_keeps_the_snapshot_and_is_told_to_new_subscribers() {
        let s = stream(3);
        published(s.publish(json!({"n": 1})));
        s.fail(
            503,
            "upstream-status",
            "upstream said 503".into(),
            Duration::from_secs(2),
        );
        assert_eq!(s.snapshot().map(|x| x.seq), Some(1));
        let sub = s.subscribe(&Resume::Fresh);
        assert!(
            matches!(sub.initial.as_slice(), [Initial::Snapshot(_), Initial::Failure(f)] if f.status == 503)
        );
        published(s.publish(json!({"n": 2})));
        assert!(s.failure().is_none());
    }

    #[test]
    fn the_end_of_failures_is_broadcast_once_with_their_count() {
        let s = stream(3);
        published(s.publish(json!({"n": 1})));
        let mut sub = s.subscribe(&Resume::Fresh);
        // Nothing failed: nothing to tell.
        s.recover();
        assert!(s.last_recovery().is_none());
        let first = s.fail(502, "upstream-unavailable", "down".into(), Duration::ZERO);
        let second = s.fail(502, "upstream-unavailable", "down".into(), Duration::ZERO);
        assert_eq!((second.failures, second.since), (2, first.at));
        s.recover();
        s.recover();
        let mut told = Vec::new();
        while let Ok(event) = sub.live.try_recv() {
            if let StreamEvent::Recovered(r) = event {
                told.push(r);
            }
        }
        assert_eq!(told.len(), 1, "one run of failures, one recovery");
        assert_eq!((told[0].failures, told[0].since), (2, first.at));
        let frame = crate::sinks::sse::recovery_frame(&s, &told[0]);
        let text = std::str::from_utf8(frame.plain()).unwrap().to_owned();
        assert!(
            text.starts_with(&format!(
                "id: {}\nevent: recovered\ndata: {{\"since\":",
                s.event_id(1)
            )),
            "{text}"
        );
        assert!(s.failure().is_none());
    }

    #[test]
    fn subscriber_gauge_follows_subscriptions() {
        let s = stream(3);
        let a = s.subscribe(&Resume::Fresh);
        let b = s.subscribe(&Resume::Fresh);
        assert_eq!(s.subscriber_count(), 2);
        drop(a);
        assert_eq!(s.subscriber_count(), 1);
        drop(b);
        assert_eq!(s.metrics().subscribers.get_or_create(s.labels()).get(), 0);
    }

    #[test]
    fn demand_follows_subscriptions() {
        let s = stream(3);
        let demand = s.demand();
        assert_eq!(*demand.borrow(), 0);
        let a = s.subscribe(&Resume::Fresh);
        let b = s.subscribe(&Resume::Fresh);
        assert_eq!(*demand.borrow(), 2);
        drop(a);
        drop(b);
        assert_eq!(*demand.borrow(), 0);
    }

    #[test]
    fn streamdata_events_name_documents_data() {
        let s = stream(3);
        let long = "x".repeat(100);
        let first = published(s.publish(json!({"a": 1, "b": long})));
        let streamdata = crate::wire::Dialect::Streamdata {
            session: 0,
            ascii_only: true,
        };
        let frame = crate::sinks::sse::change_frame(&first, streamdata);
        let text = String::from_utf8(frame.plain().to_vec()).unwrap();
        assert!(
            text.starts_with(&format!("id: s:{}:1\nevent: data\ndata: {{", s.epoch())),
            "{text}"
        );
        let second = published(s.publish(json!({"a": 2, "b": long})));
        let frame = crate::sinks::sse::change_frame(&second, streamdata);
        let text = String::from_utf8(frame.plain().to_vec()).unwrap();
        assert!(
            text.contains("event: patch\ndata: [{\"op\":\"replace\""),
            "{text}"
        );
    }

    #[test]
    fn forget_drops_the_document_but_keeps_the_sequence() {
        let s = stream(3);
        published(s.publish(json!({"a": 1})));
        s.forget();
        assert!(s.snapshot().is_none());
        assert!(s.subscribe(&Resume::Fresh).initial.is_empty());
        let next = published(s.publish(json!({"a": 1})));
        assert_eq!((next.seq, next.kind), (2, ChangeKind::Snapshot));
    }

    /// What a view's subscribers are sent counts as the view's and as its source's; the
    /// source's own sends stay its own.
    #[test]
    fn a_derived_streams_sends_count_for_its_source_too() {
        let source = stream(10);
        let view = Stream::derived(
            "s@v",
            source.options(),
            source.snapshots.clone(),
            source.metrics().clone(),
            source.labels().clone(),
            source.epoch(),
            None,
        )
        .delivering_for(&source);
        view.count_sent(100);
        view.count_sent(20);
        source.count_sent(7);
        assert_eq!(
            (view.delivered().events(), view.delivered().bytes()),
            (2, 120)
        );
        assert_eq!(
            (source.delivered().events(), source.delivered().bytes()),
            (3, 127)
        );
    }

    /// A view's stream counts its subscribers under its source's labels, but its history is
    /// its own: committing to it leaves the source's history gauges as the source's.
    #[test]
    fn a_derived_stream_leaves_its_sources_history_gauges_alone() {
        let source = stream(10);
        source.publish(json!({"entity": [{"id": 1, "pad": "x".repeat(100)}]}));
        source.publish(json!({"entity": [{"id": 1, "pad": "y".repeat(100)}]}));
        let view = Stream::derived(
            "s@v",
            source.options(),
            source.snapshots.clone(),
            source.metrics().clone(),
            source.labels().clone(),
            source.epoch(),
            None,
        );
        for (seq, n) in [(1, 1), (2, 2)] {
            let prepared = match view.prepare(view.snapshot().as_deref(), json!({"n": n})) {
                Preparation::Change(prepared) => prepared,
                _ => panic!("a change"),
            };
            let committed = view.commit(source.epoch(), seq, SystemTime::now(), prepared);
            assert!(matches!(committed, Ok(Some(_))));
        }
        let (changes, bytes) = source.history_size();
        let gauges = source.metrics();
        assert_eq!(
            gauges.history_changes.get_or_create(source.labels()).get(),
            changes as i64
        );
        assert_eq!(
            gauges.history_bytes.get_or_create(source.labels()).get(),
            bytes as i64
        );
    }
}

//! One poller per stream: wait for the group's quota, fetch, decode, publish, repeat.
//!
//! Polls never overlap (one loop per stream) and follow a fixed-rate schedule: the next poll
//! is due one `interval` after the previous one started, missed ticks are skipped rather than
//! caught up in a burst. A failure keeps the stream (the hub keeps the last good snapshot),
//! is reported to the hub, and is retried with backoff; the first success after failures
//! reports the recovery and then the document.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff;
use super::config::{BackoffSettings, StreamSettings};
use super::decode::{self, DecodeError};
use super::fetch::{FetchError, FetchRequest, Fetched, Upstream, Validators};
use super::ratelimit::{GroupLimiter, SharedQuota};
use crate::hub::{Publication, Stream};
use crate::metrics::{Metrics, PollLabels, PollOutcome, StreamLabels};
use crate::redact::Redacted;

/// What the hub made of a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishResult {
    /// The document differs from the last one; a change was published.
    Changed,
    /// The document equals the last one (or differs only in ignored parts).
    Unchanged,
    /// Nothing was published and the document should be tried again (the cluster's log was
    /// unreachable, or publishing panicked): the next poll publishes even an identical body.
    Failed,
}

/// Where a poller delivers what it learns: a hub `Stream` (below), a cluster's log, or a
/// test's recorder. Calls come one at a time, in the order the poller learned things.
pub trait Publish: Send + Sync + 'static {
    /// A newly decoded document (never called for a 304 or a byte-identical body).
    fn document(self: Arc<Self>, doc: Value) -> BoxFuture<'static, PublishResult>;
    /// A failed poll; the next attempt is in `retry_in`. The last good snapshot stays.
    fn failure<'a>(&'a self, error: &'a FetchError, retry_in: Duration) -> BoxFuture<'a, ()>;
    /// The first successful poll after failures, called before its `document`, if any.
    fn recovered(&self) -> BoxFuture<'_, ()>;
    /// What a successful poll learned for the next conditional request (a cluster hands it
    /// to the node that polls next). Nothing by default.
    fn polled<'a>(&'a self, _validators: &'a Validators) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
    /// How many subscribers the stream has now (its views' included): each would send this
    /// poll's request itself without the proxy. None by default.
    fn audience(&self) -> usize {
        0
    }
}

/// A stream's poller publishes into it. The diff runs on the blocking pool: a feed of
/// several megabytes takes tens of milliseconds, which must not stall the runtime threads
/// that write to subscribers.
impl Publish for Stream {
    fn document(self: Arc<Self>, doc: Value) -> BoxFuture<'static, PublishResult> {
        Box::pin(async move {
            let name = self.name().to_owned();
            match tokio::task::spawn_blocking(move || self.publish(doc)).await {
                Ok(Publication::Published(_)) => PublishResult::Changed,
                Ok(Publication::Unchanged | Publication::Ignored) => PublishResult::Unchanged,
                Err(error) => {
                    // A bug in the diff: the stream keeps its last snapshot and the next
                    // different body is tried again.
                    tracing::error!(stream = %name, %error, "publishing a document panicked");
                    PublishResult::Failed
                }
            }
        })
    }

    fn failure<'a>(&'a self, error: &'a FetchError, retry_in: Duration) -> BoxFuture<'a, ()> {
        self.fail(error.status(), error.cause(), error.to_string(), retry_in);
        Box::pin(std::future::ready(()))
    }

    fn recovered(&self) -> BoxFuture<'_, ()> {
        self.recover();
        Box::pin(std::future::ready(()))
    }

    fn audience(&self) -> usize {
        Stream::audience(self)
    }
}

/// A turn to poll, for a poller that shares its stream with other processes (the nodes of a
/// cluster): it polls only during its turns, and each turn continues where the previous one,
/// wherever it ran, left off, so a change of poller costs the upstream nothing extra.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Tells turns apart (a cluster's lease fence).
    pub id: u64,
    /// The validators the previous turn's last poll received.
    pub validators: Validators,
    /// How long ago the previous turn's last poll started (`None`: never polled): the first
    /// poll of this turn is due one interval after it.
    pub last_poll_ago: Option<Duration>,
    /// Requests sent upstream by every turn so far.
    pub requests: u64,
}

/// What one poll produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastOutcome {
    /// A new document that changed the stream.
    Changed,
    /// A body equal to the last one (byte-identical, or the hub found no change).
    Unchanged,
    /// 304 Not Modified.
    NotModified,
    /// Not this poller's turn: another process polls the stream.
    NotOurTurn,
    /// The poll failed.
    Failed {
        /// The status reported to subscribers (see [`FetchError::status`]).
        status: u16,
        /// The error message (names the URL, never header values).
        message: Arc<str>,
    },
}

impl LastOutcome {
    /// The metric label for this outcome.
    pub fn metric(&self) -> PollOutcome {
        match self {
            LastOutcome::Changed => PollOutcome::Changed,
            LastOutcome::Unchanged => PollOutcome::Unchanged,
            LastOutcome::NotModified => PollOutcome::NotModified,
            LastOutcome::Failed { .. } => PollOutcome::Error,
            LastOutcome::NotOurTurn => PollOutcome::NotOurTurn,
        }
    }
}

/// The result of [`Poller::poll_once`].
#[derive(Debug, Clone)]
pub struct PollStep {
    /// What happened.
    pub outcome: LastOutcome,
    /// True when this poll succeeded after one or more failures (`recovered` was called).
    pub recovered: bool,
    /// When the next poll is due.
    pub next_due: Instant,
}

/// A poller's state as shown by the `/streams` listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    /// When the last poll started.
    pub last_poll_started: Option<SystemTime>,
    /// What the last completed poll produced.
    pub last_outcome: Option<LastOutcome>,
    /// Failed polls since the last success.
    pub consecutive_failures: u32,
    /// Requests sent upstream since the poller started.
    pub upstream_requests: u64,
    /// Bytes of the bodies those requests received (decompressed; a 304 has none).
    pub body_bytes: u64,
    /// The sum, over this process's requests, of the stream's subscribers at each: the requests
    /// they would have sent polling the upstream themselves at the stream's interval.
    pub subscriber_requests: u64,
    /// The sum, over this process's requests, of subscribers × body bytes: what those requests
    /// would have downloaded.
    pub subscriber_bytes: u64,
    /// When the next poll is due.
    pub next_poll_due: Option<SystemTime>,
}

/// A poller's live state, shared with readers; cheap to read.
#[derive(Debug, Default)]
pub struct PollStatus {
    report: Mutex<PollReport>,
}

impl PollStatus {
    /// A copy of the current state.
    pub fn read(&self) -> PollReport {
        self.lock().clone()
    }

    fn update(&self, f: impl FnOnce(&mut PollReport)) {
        f(&mut self.lock());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PollReport> {
        // Updates are single assignments; a panic cannot leave the report half-written.
        self.report.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What others may ask of a running poller: poll now (`POST /streams/{name}/poll`), or take
/// new settings (a configuration reload). Both are stored until the poller's loop takes them,
/// so an ask made while it polls or waits is never lost.
pub struct PollControl<C: Clock = DefaultClock> {
    poke: Notify,
    /// A poll asked for already took its token from the group's limiter: the next poll does
    /// not take another (it would wait a whole period for a quota of one per period).
    prepaid: AtomicBool,
    reconfigured: Notify,
    pending: Mutex<Option<Reconfiguration<C>>>,
    limiter: Mutex<Arc<GroupLimiter<C>>>,
}

/// New settings for a running poller, with its group's limiter (the group may have changed).
struct Reconfiguration<C: Clock> {
    settings: Arc<StreamSettings>,
    limiter: Arc<GroupLimiter<C>>,
}

/// What a poller's loop was asked (see [`PollControl::instructed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instruction {
    /// Poll now.
    PollNow,
    /// New settings wait: apply them with [`Poller::reconfigure`].
    Reconfigure,
}

impl<C: Clock> PollControl<C> {
    fn new(limiter: Arc<GroupLimiter<C>>) -> Self {
        PollControl {
            poke: Notify::new(),
            prepaid: AtomicBool::new(false),
            reconfigured: Notify::new(),
            pending: Mutex::new(None),
            limiter: Mutex::new(limiter),
        }
    }

    /// Asks for a poll now, within the group's rate limit: `Err(wait)` when the limit forbids
    /// a request now (`wait` until it would allow one); `Ok` when the poll is scheduled (it
    /// starts as soon as the poller is between polls).
    pub fn poll_now(&self) -> Result<(), Duration> {
        let limiter = self
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))?;
        self.prepaid.store(true, Ordering::SeqCst);
        self.poke.notify_one();
        Ok(())
    }

    /// Resolves when someone asked the poller something; asks made before the call are kept,
    /// so a poller's loop that selects on this between polls misses none.
    pub async fn instructed(&self) -> Instruction {
        tokio::select! {
            biased;
            () = self.reconfigured.notified() => Instruction::Reconfigure,
            () = self.poke.notified() => Instruction::PollNow,
        }
    }

    /// Hands the poller new settings (and its group's limiter), applied between polls.
    pub fn reconfigure(&self, settings: Arc<StreamSettings>, limiter: Arc<GroupLimiter<C>>) {
        *self.limiter.lock().unwrap_or_else(PoisonError::into_inner) = limiter.clone();
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Reconfiguration { settings, limiter });
        self.reconfigured.notify_one();
    }
}

/// The offset from a poll's start to the next tick of a fixed-rate schedule: the first
/// multiple of `interval` strictly after `elapsed` (missed ticks are skipped, never bursted).
pub fn next_tick_offset(elapsed: Duration, interval: Duration) -> Duration {
    // A zero interval would spin; validation forbids it, but never loop hot regardless.
    let interval = interval.max(Duration::from_millis(1));
    let ticks = elapsed.as_nanos() / interval.as_nanos() + 1;
    let nanos = ticks.saturating_mul(interval.as_nanos());
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is below 1e9 and fits in u32.
    let subsec = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    Duration::new(secs, subsec)
}

/// `instant + delay`, saturating at a far future instead of overflowing on absurd delays.
fn later(instant: Instant, delay: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    instant.checked_add(delay.min(FAR)).unwrap_or(instant)
}

/// Polls one stream's upstream and publishes what it finds.
pub struct Poller<C: Clock = DefaultClock> {
    settings: Arc<StreamSettings>,
    fetcher: Arc<dyn Upstream>,
    limiter: Arc<GroupLimiter<C>>,
    /// The cluster's quota of the group, asked after the local limiter.
    shared: Option<Arc<dyn SharedQuota>>,
    metrics: Arc<Metrics>,
    publish: Arc<dyn Publish>,
    backoff: BackoffSettings,
    url: Redacted,
    labels: StreamLabels,
    validators: Validators,
    last_body: Option<Bytes>,
    consecutive_failures: u32,
    next_due: Option<Instant>,
    status: Arc<PollStatus>,
    /// Whose turn it is, for a poller that takes turns (`None`: it always polls).
    turns: Option<watch::Receiver<Option<Turn>>>,
    /// The turn being polled.
    turn: Option<u64>,
    /// When the last poll started (a shorter interval set meanwhile counts from it).
    last_started: Option<Instant>,
    /// Poll now, new settings.
    control: Arc<PollControl<C>>,
}

impl<C> Poller<C>
where
    C: Clock + Send + Sync + 'static,
{
    /// A poller for `settings`, sharing `limiter` with the other streams of its group.
    pub fn new(
        settings: Arc<StreamSettings>,
        fetcher: Arc<dyn Upstream>,
        limiter: Arc<GroupLimiter<C>>,
        metrics: Arc<Metrics>,
        publish: Arc<dyn Publish>,
        backoff: BackoffSettings,
    ) -> Self {
        Poller {
            control: Arc::new(PollControl::new(limiter.clone())),
            last_started: None,
            url: Redacted::new(&settings.url),
            labels: StreamLabels {
                stream: settings.name.clone(),
            },
            settings,
            fetcher,
            limiter,
            shared: None,
            metrics,
            publish,
            backoff,
            validators: Validators::default(),
            last_body: None,
            consecutive_failures: 0,
            next_due: None,
            status: Arc::new(PollStatus::default()),
            turns: None,
            turn: None,
        }
    }

    /// Polls only during the turns `turns` announces (a cluster's lease), each continuing
    /// where the previous one left off.
    #[must_use]
    pub fn taking_turns(mut self, turns: watch::Receiver<Option<Turn>>) -> Self {
        self.turns = Some(turns);
        self
    }

    /// Resolves when the turn changes (begins, ends, or passes to another id); never for a
    /// poller that does not take turns.
    pub async fn turn_changed(&mut self) {
        let Some(turns) = &mut self.turns else {
            return std::future::pending().await;
        };
        let current = self.turn;
        if turns
            .wait_for(|t| t.as_ref().map(|t| t.id) != current)
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }

    /// Whether this poller may poll now, taking up a new turn where the previous one left
    /// off; `Err(next_due)` when it must not poll now (not its turn, or the new turn's first
    /// poll is due later).
    fn take_turn(&mut self, now: Instant) -> Result<(), Instant> {
        let Some(turns) = &self.turns else {
            return Ok(());
        };
        let Some(turn) = turns.borrow().clone() else {
            self.turn = None;
            return Err(later(now, self.settings.interval));
        };
        if self.turn == Some(turn.id) {
            return Ok(());
        }
        self.turn = Some(turn.id);
        self.validators = turn.validators;
        self.last_body = None;
        self.status.update(|r| r.upstream_requests = turn.requests);
        let wait = turn.last_poll_ago.map_or(Duration::ZERO, |ago| {
            self.settings.interval.saturating_sub(ago)
        });
        let due = later(now, wait);
        self.next_due = Some(due);
        if wait.is_zero() { Ok(()) } else { Err(due) }
    }

    /// Names the upstream by its scheme, host and port only, in logs and errors (dynamic
    /// streams: their URLs are their clients', see [`Redacted::host_only`]).
    #[must_use]
    pub fn show_host_only(mut self) -> Self {
        self.url = Redacted::host_only(&self.settings.url);
        self
    }

    /// Also asks `shared` (a cluster's quota of this stream's group) before each request.
    #[must_use]
    pub fn sharing_quota(mut self, shared: Arc<dyn SharedQuota>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Reports into `status` (shared by the successive pollers of a cluster's stream, one per
    /// time this node takes its lease).
    #[must_use]
    pub fn reporting_to(mut self, status: Arc<PollStatus>) -> Self {
        self.status = status;
        self
    }

    /// The live state, for the `/streams` listing.
    pub fn status(&self) -> Arc<PollStatus> {
        Arc::clone(&self.status)
    }

    /// The handle through which others ask this poller to poll now or take new settings.
    pub fn control(&self) -> Arc<PollControl<C>> {
        Arc::clone(&self.control)
    }

    /// Applies the settings handed to [`PollControl::reconfigure`], if any, and returns when
    /// the next poll is now due, given it was due at `due`: a new interval counts from the
    /// last poll's start (unless the poller is backing off after failures). New headers or a
    /// new URL forget the validators, so the next poll is unconditional.
    pub fn reconfigure(&mut self, due: Instant) -> Instant {
        let Some(next) = self
            .control
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return due;
        };
        let old = std::mem::replace(&mut self.settings, next.settings);
        self.limiter = next.limiter;
        if old.headers != self.settings.headers || old.url != self.settings.url {
            self.validators = Validators::default();
            self.last_body = None;
        }
        self.url = Redacted::new(&self.settings.url);
        tracing::info!(stream = %self.settings.name, interval = ?self.settings.interval, "poller reconfigured");
        match self.last_started {
            Some(started) if self.consecutive_failures == 0 => {
                let due = later(started, self.settings.interval);
                self.next_due = Some(due);
                due
            }
            _ => due,
        }
    }

    /// Changes the time between polls from the next poll on (dynamic streams poll as often as
    /// their most demanding subscriber may ask).
    pub fn set_interval(&mut self, interval: Duration) {
        if self.settings.interval != interval {
            Arc::make_mut(&mut self.settings).interval = interval;
        }
    }

    /// Forgets what the last polls returned (validators, body, failures), so the next poll is
    /// unconditional and publishes whatever it gets: for a stream whose document was dropped
    /// while nobody subscribed.
    pub fn reset(&mut self) {
        self.validators = Validators::default();
        self.last_body = None;
        self.consecutive_failures = 0;
        self.next_due = None;
    }

    /// Polls now, then on schedule (during its turns, for a poller taking turns), until
    /// `shutdown` is cancelled; returns promptly then, abandoning a wait for the quota, a
    /// request in flight, or a sleep.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(stream = %self.settings.name, url = %self.url, interval = ?self.settings.interval, "polling");
        let control = self.control();
        // The first poll starts at once; then each waits for its tick, a poll asked for, new
        // settings or a change of turn.
        let mut due: Option<Instant> = None;
        loop {
            if let Some(at) = due {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    instruction = control.instructed() => {
                        if instruction == Instruction::Reconfigure {
                            due = Some(self.reconfigure(at));
                            continue;
                        }
                    }
                    () = tokio::time::sleep_until(at) => {}
                    // A turn that begins (or ends) is acted on now, not at the next tick.
                    () = self.turn_changed() => {}
                }
            }
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                step = self.poll_once() => step,
            };
            due = Some(step.next_due);
        }
        tracing::debug!(stream = %self.settings.name, "poller stopped");
    }

    /// One poll: wait for the group's quota, fetch, decode, publish. Returns what happened
    /// and when the next poll is due. Dropping the future mid-way leaves the poller
    /// consistent (state only changes after the fetch completes).
    pub async fn poll_once(&mut self) -> PollStep {
        let started = Instant::now();
        if let Err(next_due) = self.take_turn(started) {
            return PollStep {
                outcome: LastOutcome::NotOurTurn,
                recovered: false,
                next_due,
            };
        }
        self.last_started = Some(started);
        let interval = self.settings.interval;
        // Anchor the schedule on the tick this poll was due at, so it does not drift by the
        // few milliseconds between waking and starting; a late start re-anchors.
        let anchor = match self.next_due {
            Some(due) if due <= started && started.duration_since(due) < interval => due,
            _ => started,
        };
        self.status
            .update(|r| r.last_poll_started = Some(SystemTime::now()));

        self.wait_for_quota().await;

        let request = FetchRequest {
            url: &self.settings.url,
            shown: &self.url,
            headers: &self.settings.headers,
            timeout: self.settings.timeout,
            max_body_bytes: self.settings.max_body_bytes,
        };
        let fetch_started = Instant::now();
        let fetched = self.fetcher.fetch(&request, &self.validators).await;
        let body_bytes = match &fetched {
            Ok(Fetched::Body { body, .. }) => u64::try_from(body.len()).unwrap_or(u64::MAX),
            _ => 0,
        };
        let audience = u64::try_from(self.publish.audience()).unwrap_or(u64::MAX);
        self.metrics
            .upstream_latency
            .get_or_create(&self.labels)
            .observe(fetch_started.elapsed().as_secs_f64());

        let (outcome, recovered, next_due) = match self.absorb(fetched).await {
            Ok((outcome, recovered)) => {
                let now = Instant::now();
                let next = later(
                    anchor,
                    next_tick_offset(now.saturating_duration_since(anchor), interval),
                );
                tracing::debug!(stream = %self.settings.name, outcome = ?outcome, "polled");
                (outcome, recovered, next)
            }
            Err(error) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let retry_in = backoff::delay(
                    &self.backoff,
                    self.consecutive_failures,
                    error.retry_after(),
                    &mut rand::rng(),
                );
                tracing::warn!(
                    stream = %self.settings.name,
                    url = %self.url,
                    status = error.status(),
                    consecutive_failures = self.consecutive_failures,
                    retry_in = ?retry_in,
                    "poll failed: {error}"
                );
                self.publish.failure(&error, retry_in).await;
                let outcome = LastOutcome::Failed {
                    status: error.status(),
                    message: error.to_string().into(),
                };
                (outcome, false, later(Instant::now(), retry_in))
            }
        };
        self.next_due = Some(next_due);

        self.metrics
            .polls
            .get_or_create(&PollLabels {
                stream: self.settings.name.clone(),
                outcome: outcome.metric(),
            })
            .inc();
        let until_due = next_due.saturating_duration_since(Instant::now());
        let now = SystemTime::now();
        let next_poll_due = now.checked_add(until_due).unwrap_or(now);
        let failures = self.consecutive_failures;
        self.status.update(|r| {
            r.last_outcome = Some(outcome.clone());
            r.consecutive_failures = failures;
            r.upstream_requests = r.upstream_requests.saturating_add(1);
            r.body_bytes = r.body_bytes.saturating_add(body_bytes);
            r.subscriber_requests = r.subscriber_requests.saturating_add(audience);
            r.subscriber_bytes = r
                .subscriber_bytes
                .saturating_add(audience.saturating_mul(body_bytes));
            r.next_poll_due = Some(next_poll_due);
        });
        PollStep {
            outcome,
            recovered,
            next_due,
        }
    }

    /// Turns a fetch result into an outcome, publishing as needed. Returns the outcome and
    /// whether this success ended a run of failures.
    ///
    /// Decoding and publishing (which diffs the document) run on the blocking pool: a feed of
    /// several megabytes takes tens of milliseconds, which must not stall the runtime threads
    /// that write to subscribers.
    async fn absorb(
        &mut self,
        fetched: Result<Fetched, FetchError>,
    ) -> Result<(LastOutcome, bool), FetchError> {
        match fetched? {
            Fetched::NotModified => {
                let recovered = self.succeeded().await;
                self.publish.polled(&self.validators).await;
                Ok((LastOutcome::NotModified, recovered))
            }
            Fetched::Body { body, validators } => {
                if self.last_body.as_ref() == Some(&body) {
                    // Same bytes, same document: no parse, no diff.
                    self.validators = validators;
                    let recovered = self.succeeded().await;
                    self.publish.polled(&self.validators).await;
                    return Ok((LastOutcome::Unchanged, recovered));
                }
                let format = self.settings.format;
                let to_decode = body.clone();
                let doc = tokio::task::spawn_blocking(move || decode::decode(format, &to_decode))
                    .await
                    .map_err(|e| {
                        FetchError::decode(&self.url, DecodeError::Panicked(e.to_string()))
                    })?
                    .map_err(|e| FetchError::decode(&self.url, e))?;
                self.validators = validators;
                self.last_body = Some(body);
                let recovered = self.succeeded().await;
                let outcome = match Arc::clone(&self.publish).document(doc).await {
                    PublishResult::Changed => LastOutcome::Changed,
                    PublishResult::Unchanged => LastOutcome::Unchanged,
                    PublishResult::Failed => {
                        // Nothing was published: the same body is tried again next time.
                        self.last_body = None;
                        LastOutcome::Unchanged
                    }
                };
                self.publish.polled(&self.validators).await;
                Ok((outcome, recovered))
            }
        }
    }

    /// Records a success; reports the recovery if failures preceded it.
    async fn succeeded(&mut self) -> bool {
        if self.consecutive_failures == 0 {
            return false;
        }
        tracing::info!(
            stream = %self.settings.name,
            after_failures = self.consecutive_failures,
            "upstream recovered"
        );
        self.consecutive_failures = 0;
        self.publish.recovered().await;
        true
    }

    async fn wait_for_quota(&self) {
        // A poll asked for now took its token when it was asked.
        let prepaid = self.control.prepaid.swap(false, Ordering::SeqCst);
        if !prepaid {
            loop {
                match self.limiter.check() {
                    Ok(()) => break,
                    Err(not_until) => {
                        let wait = not_until.wait_time_from(self.limiter.clock().now());
                        tracing::debug!(
                            stream = %self.settings.name,
                            group = %self.settings.rate_limit_group,
                            wait = ?wait,
                            "waiting for the rate limit"
                        );
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        let Some(shared) = &self.shared else {
            return;
        };
        while let Some(wait) = shared.ask(&self.settings.rate_limit_group).await {
            tracing::debug!(
                stream = %self.settings.name,
                group = %self.settings.rate_limit_group,
                wait = ?wait,
                "waiting for the cluster's rate limit"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn next_tick_is_one_interval_after_a_quick_poll() {
        assert_eq!(next_tick_offset(ms(0), ms(100)), ms(100));
        assert_eq!(next_tick_offset(ms(30), ms(100)), ms(100));
        assert_eq!(next_tick_offset(ms(99), ms(100)), ms(100));
    }

    #[test]
    fn missed_ticks_are_skipped_not_bursted() {
        assert_eq!(next_tick_offset(ms(100), ms(100)), ms(200));
        assert_eq!(next_tick_offset(ms(250), ms(100)), ms(300));
        assert_eq!(next_tick_offset(ms(1001), ms(100)), ms(1100));
    }

    #[test]
    fn extreme_values_do_not_panic() {
        assert!(next_tick_offset(Duration::MAX, Duration::from_nanos(1)) >= ms(1));
        assert_eq!(next_tick_offset(ms(5), Duration::ZERO), ms(6));
        let _ = next_tick_offset(Duration::MAX, Duration::MAX);
    }

    proptest! {
        #[test]
        fn next_tick_is_the_first_tick_after_now(
            elapsed in 0u64..10_000_000,
            interval in 1_000u64..1_000_000,
        ) {
            let (elapsed, interval) = (Duration::from_micros(elapsed), Duration::from_micros(interval));
            let next = next_tick_offset(elapsed, interval);
            prop_assert!(next > elapsed);
            prop_assert!(next - elapsed <= interval);
            prop_assert_eq!(next.as_nanos() % interval.as_nanos(), 0);
        }
    }

    #[test]
    fn later_never_overflows() {
        let now = Instant::now();
        assert_eq!(later(now, ms(5)), now + ms(5));
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(3600 * 24 * 365));
    }

    #[test]
    fn outcomes_map_to_metric_labels() {
        let failed = LastOutcome::Failed {
            status: 502,
            message: "x".into(),
        };
        assert_eq!(failed.metric(), PollOutcome::Error);
        assert_eq!(LastOutcome::NotModified.metric(), PollOutcome::NotModified);
        assert_eq!(LastOutcome::Changed.metric(), PollOutcome::Changed);
        assert_eq!(LastOutcome::Unchanged.metric(), PollOutcome::Unchanged);
    }
}

//! The delivery worker: a shared pool of attempts over every endpoint's due deliveries.
//!
//! An attempt is [`Sender::deliver`] (one signed POST, its answer classified), then settling
//! it (the outcome decided on the retry schedule, recorded in the outbox, the endpoint's status
//! and the metrics updated, a resync or a disable sent where the attempt calls for one). [`Worker::start_due`] starts attempts for the oldest pending delivery of each
//! (endpoint, stream) pair that is due, up to the pool size and the per-endpoint limit, never
//! two of the same pair at once (order), and returns at once; [`Worker::try_step`] takes one due
//! delivery through its whole attempt and returns what it came to. A slow endpoint only ever
//! holds its own slots.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::deliver::{AttemptError, Sender};
use super::dispatcher::{Resync, ResyncRoutes};
use super::operator::{Operator, OperatorEvent};
use super::outbox::{
    Attempt, AttemptOutcome, Claim, Delivery, Disabled, Next, Notes, Outbox, OutboxError, Recorded,
};
use super::registry::{Endpoint, Registry};
use super::schedule::RetrySchedule;
use crate::metrics::{AttemptLabels, AttemptResult, Metrics};
use crate::time::unix_ms;

/// How often the worker prunes finished deliveries and old attempts (and once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How the worker delivers.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// When failed deliveries are tried again.
    pub schedule: RetrySchedule,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// An endpoint failing continuously this long is disabled.
    pub disable_after: Duration,
    /// Attempts in flight per endpoint.
    pub per_endpoint: usize,
    /// Attempts in flight overall.
    pub workers: usize,
    /// Whether targets may be private addresses.
    pub allow_private: bool,
    /// How long finished deliveries are kept.
    pub retention: Duration,
    /// How long the attempt history keeps an attempt.
    pub attempt_retention: Duration,
    /// `User-Agent` of deliveries.
    pub user_agent: String,
    /// Who claims deliveries (unique per process: a node's id and a random suffix).
    pub owner: Arc<str>,
    /// How long a claim holds against other nodes' workers (`webhooks.claim_timeout`).
    pub claim_timeout: Duration,
    /// With a store other nodes share: how often to look for due deliveries when nothing
    /// here woke the worker (other nodes queue deliveries, or leave expired claims).
    pub poll: Option<Duration>,
}

/// The rate limiters of endpoints with a `rate_limit`, and until when each is out of room.
#[derive(Default)]
struct Rates {
    limiters: HashMap<String, (u32, Arc<governor::DefaultDirectRateLimiter>)>,
    until: HashMap<String, Instant>,
}

impl Rates {
    /// Endpoints out of room now.
    fn limited(&mut self, now: Instant) -> Vec<String> {
        self.until.retain(|_, until| *until > now);
        self.until.keys().cloned().collect()
    }

    /// Takes room for one attempt to `endpoint` at `limit` per second; false (and the endpoint
    /// out of room until there is) when there is none.
    fn take(&mut self, endpoint: &str, limit: u32, now: Instant) -> bool {
        let Some(per_second) = std::num::NonZeroU32::new(limit) else {
            return true;
        };
        let limiter = match self.limiters.get(endpoint) {
            Some((at, limiter)) if *at == limit => limiter.clone(),
            _ => {
                let limiter = Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                    per_second,
                )));
                self.limiters
                    .insert(endpoint.to_owned(), (limit, limiter.clone()));
                limiter
            }
        };
        match limiter.check() {
            Ok(()) => true,
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                self.until.insert(
                    endpoint.to_owned(),
                    now + wait.max(Duration::from_millis(1)),
                );
                false
            }
        }
    }

    /// How long until the first endpoint out of room has room again.
    fn next(&self, now: Instant) -> Option<Duration> {
        self.until
            .values()
            .map(|until| until.saturating_duration_since(now))
            .min()
    }
}

#[derive(Default)]
struct InFlight {
    pairs: HashSet<(String, String)>,
    per_endpoint: HashMap<String, usize>,
    total: usize,
}

/// The delivery worker.
pub struct Worker {
    outbox: Arc<dyn Outbox>,
    registry: Arc<Registry>,
    sender: Sender,
    settings: WorkerSettings,
    inflight: Mutex<InFlight>,
    rates: Mutex<Rates>,
    /// Set once the worker stops: attempts in flight finish, none follows them.
    stopping: std::sync::atomic::AtomicBool,
    wake: Arc<Notify>,
    resync: ResyncRoutes,
    rng: Mutex<StdRng>,
    metrics: Arc<Metrics>,
    /// Told of dead deliveries, disabled and recovered endpoints.
    operator: Option<Operator>,
}

/// Why the worker could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the webhook HTTP client: {0}")]
pub struct ClientError(#[from] reqwest::Error);

/// What an attempt means for its endpoint, beyond the delivery itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowUp {
    /// Nothing more.
    Nothing,
    /// The delivery went dead with nothing queued after it: the stream's dispatcher is asked
    /// to queue a snapshot for the endpoint.
    Resync,
    /// The endpoint is disabled, for this reason (re-enabling it queues a snapshot).
    Disable(String),
}

/// One delivery taken through an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The delivery as it was due (`attempts` counts those before this one).
    pub delivery: Delivery,
    /// What the attempt came to; `None` when the endpoint was deleted meanwhile (nothing sent).
    pub outcome: Option<AttemptOutcome>,
    /// Whether the outcome is in the outbox; false only when the outbox stopped first, and the
    /// delivery is then sent again after a restart (same `webhook-id`).
    pub recorded: bool,
    /// What followed for the endpoint.
    pub follow_up: FollowUp,
}

impl Worker {
    /// A worker over `outbox`; `wake` is notified whenever new deliveries may be due.
    pub fn new(
        outbox: Arc<dyn Outbox>,
        registry: Arc<Registry>,
        settings: WorkerSettings,
        wake: Arc<Notify>,
        resync: ResyncRoutes,
        metrics: Arc<Metrics>,
    ) -> Result<Worker, ClientError> {
        let sender = Sender::new(
            settings.attempt_timeout,
            settings.allow_private,
            settings.per_endpoint.max(1) * 4,
            &settings.user_agent,
        )?;
        Ok(Worker {
            outbox,
            registry,
            sender,
            settings,
            inflight: Mutex::new(InFlight::default()),
            rates: Mutex::new(Rates::default()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            wake,
            resync,
            metrics,
            rng: Mutex::new(StdRng::from_os_rng()),
            operator: None,
        })
    }

    /// Tells `operator` of dead deliveries, disabled endpoints and endpoints whose delivery
    /// succeeded after failures.
    pub fn with_operator(mut self, operator: Option<Operator>) -> Self {
        self.operator = operator;
        self
    }

    /// The operational events an attempt's record stores with it: a dead delivery's, and
    /// the endpoint's recovery (stored only if the record ends its failures).
    fn notes(&self, delivery: &Delivery, outcome: &AttemptOutcome) -> Notes {
        let Some(operator) = &self.operator else {
            return Notes::default();
        };
        match outcome {
            AttemptOutcome::Delivered { .. } => {
                // Keyed by the run of failures it ends, as this node knows it: two nodes
                // ending the same run store one event (and only a record that clears the
                // failures stores any).
                let since = self
                    .registry
                    .get(&delivery.endpoint)
                    .and_then(|e| e.status.failing_since_ms);
                let Some(since) = since else {
                    return Notes::default();
                };
                let event = OperatorEvent::EndpointRecovered {
                    endpoint: delivery.endpoint.clone(),
                    delivery: Some((delivery.stream.clone(), delivery.msg_id.clone())),
                    reason: "a delivery succeeded after failures".into(),
                };
                Notes {
                    always: Vec::new(),
                    if_recovered: Some(
                        operator.note(&event, format!("{}:{since}", delivery.endpoint)),
                    ),
                }
            }
            AttemptOutcome::Failed {
                retry_at_ms: None,
                error,
                ..
            } => {
                let event = OperatorEvent::DeliveryDead {
                    endpoint: delivery.endpoint.clone(),
                    stream: delivery.stream.clone(),
                    webhook_id: delivery.msg_id.clone(),
                    reason: error.clone(),
                };
                Notes {
                    always: vec![operator.note(
                        &event,
                        format!("{}:{}", delivery.id, delivery.attempts.saturating_add(1)),
                    )],
                    if_recovered: None,
                }
            }
            AttemptOutcome::Failed { .. } => Notes::default(),
        }
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attempts in flight now.
    pub fn in_flight(&self) -> usize {
        self.inflight().total
    }

    /// Takes up to `limit` due deliveries the pool has room for and reserves their slots
    /// (each must be released once its attempt is settled).
    async fn claim(&self, limit: usize) -> Result<Vec<Delivery>, OutboxError> {
        let limited = self
            .rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .limited(Instant::now());
        let (free, busy, mut full) = {
            let inflight = self.inflight();
            let free = self
                .settings
                .workers
                .saturating_sub(inflight.total)
                .min(limit);
            let full = inflight
                .per_endpoint
                .iter()
                .filter(|(_, n)| **n >= self.settings.per_endpoint)
                .map(|(e, _)| e.clone())
                .collect::<Vec<_>>();
            (
                free,
                inflight.pairs.iter().cloned().collect::<Vec<_>>(),
                full,
            )
        };
        if free == 0 {
            return Ok(Vec::new());
        }
        full.extend(limited);
        let now = unix_ms(SystemTime::now());
        let due = self
            .outbox
            .due(Claim {
                now_ms: now,
                limit: free,
                busy,
                full,
                per_endpoint: self.settings.per_endpoint,
                owner: self.settings.owner.clone(),
                hold: self.settings.claim_timeout,
            })
            .await?;
        let mut claimed = Vec::with_capacity(due.len());
        for delivery in due {
            // An endpoint's own rate limit (Retry-After is the delivery's next attempt).
            let rate_limit = self
                .registry
                .get(&delivery.endpoint)
                .and_then(|e| e.record.rate_limit);
            let room = rate_limit.is_none_or(|limit| {
                self.rates.lock().unwrap_or_else(|e| e.into_inner()).take(
                    &delivery.endpoint,
                    limit,
                    Instant::now(),
                )
            });
            let taken = room && {
                let mut inflight = self.inflight();
                let per = inflight
                    .per_endpoint
                    .get(&delivery.endpoint)
                    .copied()
                    .unwrap_or(0);
                let pair = (delivery.endpoint.clone(), delivery.stream.clone());
                let room = inflight.total < self.settings.workers
                    && per < self.settings.per_endpoint
                    && !inflight.pairs.contains(&pair);
                if room {
                    inflight.pairs.insert(pair);
                    *inflight
                        .per_endpoint
                        .entry(delivery.endpoint.clone())
                        .or_default() += 1;
                    inflight.total += 1;
                }
                room
            };
            if taken {
                claimed.push(delivery);
            } else if let Err(error) = self.outbox.release(delivery.id).await {
                // Claimed in a shared store but not taken: any worker may have it at once.
                tracing::debug!(%error, "cannot release a webhook delivery's claim");
            }
        }
        Ok(claimed)
    }

    /// Starts an attempt for every due delivery the pool has room for; returns how many.
    pub async fn start_due(self: &Arc<Self>) -> Result<usize, OutboxError> {
        let claimed = self.claim(usize::MAX).await?;
        let started = claimed.len();
        for delivery in claimed {
            let worker = self.clone();
            tokio::spawn(async move {
                worker.attempt(delivery, true).await;
            });
        }
        Ok(started)
    }

    /// Takes the soonest due delivery the pool has room for through one whole attempt
    /// (delivered, then settled) and returns what it came to; `None` when nothing is due.
    pub async fn try_step(&self) -> Result<Option<Settled>, OutboxError> {
        match self.claim(1).await?.pop() {
            Some(delivery) => Ok(Some(self.attempt(delivery, false).await)),
            None => Ok(None),
        }
    }

    fn release(&self, delivery: &Delivery) {
        {
            let mut inflight = self.inflight();
            inflight
                .pairs
                .remove(&(delivery.endpoint.clone(), delivery.stream.clone()));
            if let Some(n) = inflight.per_endpoint.get_mut(&delivery.endpoint) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inflight.per_endpoint.remove(&delivery.endpoint);
                }
            }
            inflight.total = inflight.total.saturating_sub(1);
        }
        self.wake.notify_one();
    }

    /// One attempt of a claimed delivery: deliver, then settle; its slot is released after both.
    /// With `chain`, the pair's next delivery, when the outbox hands it over with the record
    /// (due, and claimed for this worker), is attempted next in the same slot: a busy pair
    /// does not wait for the next claim round. Returns the first attempt's settlement.
    async fn attempt(&self, delivery: Delivery, chain: bool) -> Settled {
        let (first, mut next) = self.attempt_one(delivery, chain).await;
        let mut slot = first.delivery.clone();
        while let Some(candidate) = next.take() {
            let stopping = self.stopping.load(std::sync::atomic::Ordering::Relaxed);
            let room = !stopping
                && self
                    .registry
                    .get(&candidate.endpoint)
                    .is_some_and(|endpoint| {
                        endpoint.enabled()
                            && endpoint.record.rate_limit.is_none_or(|limit| {
                                self.rates.lock().unwrap_or_else(|e| e.into_inner()).take(
                                    &candidate.endpoint,
                                    limit,
                                    Instant::now(),
                                )
                            })
                    });
            if !room {
                if let Err(error) = self.outbox.release(candidate.id).await {
                    tracing::debug!(%error, "cannot release a webhook delivery's claim");
                }
                break;
            }
            let (settled, following) = self.attempt_one(candidate, chain).await;
            slot = settled.delivery;
            next = following;
        }
        self.release(&slot);
        first
    }

    /// One attempt: deliver, then settle; the pair's next delivery, if the outbox handed it
    /// over (only when asked to, and when nothing is to follow up).
    async fn attempt_one(&self, delivery: Delivery, chain: bool) -> (Settled, Option<Delivery>) {
        let known = match self.registry.get(&delivery.endpoint) {
            Some(endpoint) => Some(endpoint),
            // Created on another node since this one last read the endpoints, or deleted.
            None => self
                .refresh_endpoints()
                .await
                .then(|| self.registry.get(&delivery.endpoint))
                .flatten(),
        };
        match known {
            // Deleted meanwhile: its deliveries went with it (or go with it).
            None => {
                if let Err(error) = self.outbox.release(delivery.id).await {
                    tracing::debug!(%error, "cannot release a webhook delivery's claim");
                }
                let settled = Settled {
                    delivery,
                    outcome: None,
                    recorded: false,
                    follow_up: FollowUp::Nothing,
                };
                (settled, None)
            }
            Some(endpoint) => {
                let at_ms = unix_ms(SystemTime::now());
                let started = Instant::now();
                let answer = self.sender.deliver(&endpoint, &delivery).await;
                let took = started.elapsed();
                self.metrics
                    .webhook_attempt_seconds
                    .observe(took.as_secs_f64());
                let attempt = Attempt {
                    at_ms,
                    duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                    response: answer.excerpt,
                };
                self.settle(&endpoint, delivery, answer.result, attempt, chain)
                    .await
            }
        }
    }

    /// Settles an attempt: its outcome decided on the retry schedule, counted, recorded in the
    /// outbox (with its entry of the attempt history), the endpoint's status updated, and the
    /// follow-up (resync or disable) sent.
    async fn settle(
        &self,
        endpoint: &Endpoint,
        delivery: Delivery,
        answer: Result<u16, AttemptError>,
        attempt: Attempt,
        chain: bool,
    ) -> (Settled, Option<Delivery>) {
        let now_ms = attempt.ended_ms();
        let outcome = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            outcome_of(
                &answer,
                delivery.attempts,
                &self.settings.schedule,
                now_ms,
                &mut *rng,
            )
        };
        self.count(&delivery, &outcome);
        let next = chain.then(|| Next {
            now_ms,
            owner: self.settings.owner.clone(),
            hold: self.settings.claim_timeout,
        });
        let notes = self.notes(&delivery, &outcome);
        let noted = notes != Notes::default();
        let Some(mut recorded) = self.record(&delivery, &outcome, attempt, next, notes).await
        else {
            let settled = Settled {
                delivery,
                outcome: Some(outcome),
                recorded: false,
                follow_up: FollowUp::Nothing,
            };
            return (settled, None);
        };
        let mut next = recorded.next.take();
        if noted && let Some(operator) = &self.operator {
            operator.stored();
        }
        if let Some(status) = recorded.status.clone() {
            self.registry.set_status(&delivery.endpoint, status);
        }
        let follow_up = follow_up(&answer, &recorded, now_ms, self.settings.disable_after);
        match &follow_up {
            FollowUp::Disable(reason) => {
                // Failing for too long disables it only if it still is (an admin may have
                // re-enabled it since this attempt began); 410 and a refused target at once.
                let failing_since = match &answer {
                    Err(AttemptError::Gone | AttemptError::Refused(_)) => None,
                    _ => recorded.status.as_ref().and_then(|s| s.failing_since_ms),
                };
                self.disable(endpoint, &delivery, reason.clone(), now_ms, failing_since)
                    .await
            }
            FollowUp::Resync => {
                // The outbox forgot the pair's cursor: the stream's dispatcher (here, or on the
                // node holding the stream) queues the document for it.
                if let Some(route) = self.resync.get(&delivery.stream) {
                    let _ = route.send(Resync::Owed);
                }
            }
            FollowUp::Nothing => {}
        }
        if follow_up != FollowUp::Nothing
            && let Some(taken) = next.take()
            && let Err(error) = self.outbox.release(taken.id).await
        {
            tracing::debug!(%error, "cannot release a webhook delivery's claim");
        }
        let settled = Settled {
            delivery,
            outcome: Some(outcome),
            recorded: true,
            follow_up,
        };
        (settled, next)
    }

    /// Counts an attempt by what it came to; a dead letter is also logged.
    fn count(&self, delivery: &Delivery, outcome: &AttemptOutcome) {
        let counted = match outcome {
            AttemptOutcome::Delivered { .. } => AttemptResult::Delivered,
            AttemptOutcome::Failed {
                retry_at_ms: Some(_),
                ..
            } => AttemptResult::Retrying,
            AttemptOutcome::Failed {
                retry_at_ms: None, ..
            } => AttemptResult::Dead,
        };
        self.metrics
            .webhook_attempts
            .get_or_create(&AttemptLabels {
                endpoint: delivery.endpoint.clone(),
                result: counted,
            })
            .inc();
        if let AttemptOutcome::Failed {
            retry_at_ms: None,
            error,
            ..
        } = outcome
        {
            tracing::warn!(endpoint = %delivery.endpoint, stream = %delivery.stream, msg_id = %delivery.msg_id, attempts = delivery.attempts + 1, %error, "webhook delivery dead-lettered");
        }
    }

    /// Records an outcome, trying again while storage fails; `None` once the outbox stopped.
    async fn record(
        &self,
        delivery: &Delivery,
        outcome: &AttemptOutcome,
        attempt: Attempt,
        next: Option<Next>,
        notes: Notes,
    ) -> Option<Recorded> {
        loop {
            match self
                .outbox
                .record_noted(
                    delivery.id,
                    outcome.clone(),
                    attempt.clone(),
                    next.clone(),
                    notes.clone(),
                )
                .await
            {
                Ok(recorded) => return Some(recorded),
                Err(OutboxError::Closed) => return None,
                Err(error) => {
                    // Not recorded: retry, or the delivery is sent again after a restart
                    // (at least once, same webhook-id).
                    tracing::error!(%error, "cannot record a webhook attempt; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn disable(
        &self,
        endpoint: &Endpoint,
        delivery: &Delivery,
        reason: String,
        now_ms: u64,
        failing_since: Option<u64>,
    ) {
        let disabled = Disabled {
            at_ms: now_ms,
            reason: reason.clone(),
        };
        // Stored only if this disables the endpoint (not when another attempt, or another
        // node, already did).
        let note = self.operator.as_ref().map(|operator| {
            let event = OperatorEvent::EndpointDisabled {
                endpoint: endpoint.record.id.clone(),
                delivery: Some((delivery.stream.clone(), delivery.msg_id.clone())),
                reason: reason.clone(),
            };
            operator.note(&event, format!("{}:{now_ms}", endpoint.record.id))
        });
        match self
            .outbox
            .set_disabled_noted(
                endpoint.record.id.clone(),
                Some(disabled),
                note,
                failing_since,
            )
            .await
        {
            Ok(Some(status)) => {
                tracing::warn!(endpoint = %endpoint.record.id, %reason, "webhook endpoint disabled");
                self.registry.set_status(&endpoint.record.id, status);
                if let Some(operator) = &self.operator {
                    operator.stored();
                }
            }
            // Deleted, re-enabled or recovered meanwhile.
            Ok(None) => {
                tracing::info!(endpoint = %endpoint.record.id, %reason, "webhook endpoint not disabled: deleted, re-enabled or recovered meanwhile");
            }
            Err(error) => tracing::error!(%error, "cannot disable a webhook endpoint"),
        }
    }

    /// Reads the endpoints again from the outbox (another node may have created or changed
    /// one); false when the outbox could not be read.
    async fn refresh_endpoints(&self) -> bool {
        match self.outbox.endpoints().await {
            Ok(all) => {
                self.registry.replace_all(all);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the webhook endpoints");
                false
            }
        }
    }

    /// Deletes finished deliveries older than `retention` and attempts older than
    /// `attempt_retention`; returns how many of each.
    pub async fn prune(&self) -> (usize, usize) {
        let now = unix_ms(SystemTime::now());
        let before = |keep: Duration| {
            now.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX))
        };
        let deliveries = match self.outbox.prune(before(self.settings.retention)).await {
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(%error, "cannot prune webhook deliveries");
                0
            }
        };
        let attempts = match self
            .outbox
            .prune_attempts(before(self.settings.attempt_retention))
            .await
        {
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(%error, "cannot prune the webhook attempt history");
                0
            }
        };
        if deliveries + attempts > 0 {
            tracing::info!(
                deliveries,
                attempts,
                "pruned finished webhook deliveries and old attempts"
            );
        }
        (deliveries, attempts)
    }

    /// Runs until `shutdown`: starts due attempts whenever woken, and at the next due time.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut next_prune = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_prune {
                next_prune += PRUNE_EVERY;
                self.prune().await;
            }
            let wait = match self.start_due().await {
                Err(OutboxError::Closed) => return,
                Err(error) => {
                    tracing::error!(%error, "cannot read due webhook deliveries");
                    Duration::from_secs(1)
                }
                // Attempts in flight wake the worker when they end; asking the outbox for the
                // next due time is only needed when nothing is (a retry due meanwhile waits at
                // most the short poll below).
                Ok(_) if self.in_flight() > 0 => Duration::from_millis(200),
                Ok(_) => match self.outbox.next_due_ms().await {
                    Ok(Some(at)) => {
                        let now = unix_ms(SystemTime::now());
                        Duration::from_millis(at.saturating_sub(now).clamp(1, 60_000))
                    }
                    Ok(None) => Duration::from_secs(60),
                    Err(_) => Duration::from_secs(1),
                },
            };
            // Other nodes queue deliveries without waking this worker.
            let mut wait = self.settings.poll.map_or(wait, |poll| wait.min(poll));
            // A due head of an endpoint out of room waits for room, not for nothing.
            let room_in = self
                .rates
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next(Instant::now());
            if let Some(room_in) = room_in
                && self.in_flight() == 0
            {
                wait = wait.max(room_in);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Attempts in flight finish (or time out) so their outcomes are recorded; anything cut
        // short stays pending and is sent again after a restart. None follows them.
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.settings.attempt_timeout;
        while self.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// What an answer comes to for a delivery that had `attempts_made` attempts before: delivered;
/// tried again at a time on the schedule (never before the receiver's `Retry-After`); or dead,
/// when the schedule is exhausted or no attempt can succeed (a refused target).
fn outcome_of(
    answer: &Result<u16, AttemptError>,
    attempts_made: u32,
    schedule: &RetrySchedule,
    now_ms: u64,
    rng: &mut impl Rng,
) -> AttemptOutcome {
    let error = match answer {
        Ok(status) => return AttemptOutcome::Delivered { status: *status },
        Err(error) => error,
    };
    let retry_after = match error {
        AttemptError::Retry { retry_after, .. } => *retry_after,
        AttemptError::Gone | AttemptError::Refused(_) => None,
    };
    let delay = if error.is_permanent() {
        None
    } else {
        schedule.next_delay(attempts_made.saturating_add(1), retry_after, rng)
    };
    AttemptOutcome::Failed {
        status: error.status(),
        error: error.to_string(),
        retry_at_ms: delay
            .map(|d| now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
    }
}

/// What a recorded attempt means for its endpoint. 410 Gone and a refused target disable it,
/// and so does failing continuously for `disable_after`; re-enabling queues the current
/// document, so a disabled endpoint needs no resync now (one would only die again). Otherwise
/// a dead delivery with nothing queued after it calls for a snapshot.
fn follow_up(
    answer: &Result<u16, AttemptError>,
    recorded: &Recorded,
    now_ms: u64,
    disable_after: Duration,
) -> FollowUp {
    let failing_since_ms = recorded.status.as_ref().and_then(|s| s.failing_since_ms);
    let reason = match (answer, failing_since_ms) {
        (Err(AttemptError::Gone), _) => Some("the receiver answered 410 Gone".to_owned()),
        (Err(AttemptError::Refused(refusal)), _) => Some(format!(
            "its target is refused ({refusal}); change its url, then re-enable it"
        )),
        (Err(_), Some(since))
            if now_ms.saturating_sub(since)
                >= u64::try_from(disable_after.as_millis()).unwrap_or(u64::MAX) =>
        {
            Some(format!(
                "every attempt failed for {} (webhooks.disable_after)",
                humantime::format_duration(Duration::from_millis(now_ms - since))
            ))
        }
        _ => None,
    };
    match reason {
        Some(reason) => FollowUp::Disable(reason),
        None if recorded.needs_resync => FollowUp::Resync,
        None => FollowUp::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::webhook::outbox::EndpointStatus;
    use crate::ssrf::TargetError;
    use rand::rngs::StdRng;

    const NOW: u64 = 1_700_000_000_000;

    fn schedule() -> RetrySchedule {
        RetrySchedule {
            delays: vec![Duration::ZERO, Duration::from_secs(5)],
            jitter: 0.0,
            max_retry_after: Duration::from_secs(60),
        }
    }

    fn retry(status: u16, retry_after: Option<u64>) -> Result<u16, AttemptError> {
        Err(AttemptError::Retry {
            status: Some(status),
            retry_after: retry_after.map(Duration::from_secs),
            message: format!("the receiver answered {status}"),
        })
    }

    fn refused() -> AttemptError {
        AttemptError::Refused(TargetError::Forbidden {
            host: "hooks.internal".into(),
            address: [10, 0, 0, 1].into(),
            range: "private",
        })
    }

    fn outcome(answer: &Result<u16, AttemptError>, attempts_made: u32) -> AttemptOutcome {
        outcome_of(
            answer,
            attempts_made,
            &schedule(),
            NOW,
            &mut StdRng::seed_from_u64(1),
        )
    }

    fn failed(status: Option<u16>, retry_at_ms: Option<u64>) -> AttemptOutcome {
        AttemptOutcome::Failed {
            status,
            error: String::new(),
            retry_at_ms,
        }
    }

    /// The error text is the answer's; only status and retry time are compared here.
    fn without_error(outcome: AttemptOutcome) -> AttemptOutcome {
        match outcome {
            AttemptOutcome::Failed {
                status,
                retry_at_ms,
                ..
            } => failed(status, retry_at_ms),
            delivered => delivered,
        }
    }

    #[test]
    fn an_answer_is_delivered_retried_on_the_schedule_or_dead() {
        assert_eq!(
            outcome(&Ok(204), 0),
            AttemptOutcome::Delivered { status: 204 }
        );
        let cases = [
            // The schedule's next delay, or the receiver's Retry-After when later.
            (retry(500, None), 0, failed(Some(500), Some(NOW + 5_000))),
            (
                retry(429, Some(30)),
                0,
                failed(Some(429), Some(NOW + 30_000)),
            ),
            // The schedule ran out.
            (retry(500, None), 1, failed(Some(500), None)),
            // Gone is retried (the endpoint is disabled meanwhile), a refused target never.
            (
                Err(AttemptError::Gone),
                0,
                failed(Some(410), Some(NOW + 5_000)),
            ),
            (Err(refused()), 0, failed(None, None)),
        ];
        for (answer, attempts, expected) in cases {
            assert_eq!(
                without_error(outcome(&answer, attempts)),
                expected,
                "{answer:?}"
            );
        }
        match outcome(&retry(503, None), 0) {
            AttemptOutcome::Failed { error, .. } => {
                assert_eq!(error, "the receiver answered 503")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_follows_for_the_endpoint() {
        let hour = Duration::from_secs(3600);
        let recorded = |failing_since_ms: Option<u64>, needs_resync: bool| Recorded {
            needs_resync,
            next: None,
            status: Some(EndpointStatus {
                failing_since_ms,
                ..EndpointStatus::default()
            }),
        };
        let fresh = recorded(Some(NOW), false);
        assert_eq!(
            follow_up(&Ok(200), &recorded(None, false), NOW, hour),
            FollowUp::Nothing
        );
        assert_eq!(
            follow_up(&retry(500, None), &fresh, NOW, hour),
            FollowUp::Nothing
        );
        assert_eq!(
            follow_up(&retry(500, None), &recorded(Some(NOW), true), NOW, hour),
            FollowUp::Resync
        );
        let disabled = |answer: &Result<u16, AttemptError>, recorded: &Recorded| match follow_up(
            answer, recorded, NOW, hour,
        ) {
            FollowUp::Disable(reason) => reason,
            other => panic!("expected the endpoint disabled, got {other:?}"),
        };
        assert!(disabled(&Err(AttemptError::Gone), &fresh).contains("410 Gone"));
        // Disabling wins over a resync: re-enabling queues a snapshot anyway.
        let refusal = disabled(&Err(refused()), &recorded(Some(NOW), true));
        assert!(refusal.contains("is refused") && refusal.contains("re-enable"));
        let failing = disabled(&retry(500, None), &recorded(Some(NOW - 3_600_000), false));
        assert!(failing.contains("webhooks.disable_after"), "{failing}");
    }
}

//! The delivery worker: a shared pool of attempts over every endpoint's due deliveries.
//!
//! [`Worker::try_step`] starts attempts for the oldest pending delivery of each (endpoint,
//! stream) pair that is due, up to the pool size and the per-endpoint limit, never two of the
//! same pair at once (order), and returns at once; each attempt records its outcome in the
//! outbox and wakes the worker. A slow endpoint only ever holds its own slots.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::deliver::{AttemptError, Sender};
use super::dispatcher::Resync;
use super::outbox::{AttemptOutcome, Delivery, Disabled, Outbox, OutboxError};
use super::registry::{Endpoint, Registry};
use super::schedule::RetrySchedule;
use crate::metrics::{AttemptLabels, AttemptResult, Metrics};
use crate::time::unix_ms;

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
    /// `User-Agent` of deliveries.
    pub user_agent: String,
}

/// Where resync requests for a stream go (its dispatcher).
pub type ResyncRoutes = HashMap<String, mpsc::UnboundedSender<Resync>>;

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
    wake: Arc<Notify>,
    resync: ResyncRoutes,
    rng: Mutex<StdRng>,
    metrics: Arc<Metrics>,
}

/// Why the worker could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the webhook HTTP client: {0}")]
pub struct ClientError(#[from] reqwest::Error);

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
            wake,
            resync,
            metrics,
            rng: Mutex::new(StdRng::from_os_rng()),
        })
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attempts in flight now.
    pub fn in_flight(&self) -> usize {
        self.inflight().total
    }

    /// Starts an attempt for every due delivery the pool has room for; returns how many.
    pub async fn try_step(self: &Arc<Self>) -> Result<usize, OutboxError> {
        let (free, busy, full) = {
            let inflight = self.inflight();
            let free = self.settings.workers.saturating_sub(inflight.total);
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
            return Ok(0);
        }
        let now = unix_ms(SystemTime::now());
        let due = self.outbox.due(now, free, busy, full).await?;
        let mut started = 0;
        for delivery in due {
            {
                let mut inflight = self.inflight();
                if inflight.total >= self.settings.workers {
                    break;
                }
                let per = inflight
                    .per_endpoint
                    .get(&delivery.endpoint)
                    .copied()
                    .unwrap_or(0);
                let pair = (delivery.endpoint.clone(), delivery.stream.clone());
                if per >= self.settings.per_endpoint || inflight.pairs.contains(&pair) {
                    continue;
                }
                inflight.pairs.insert(pair);
                *inflight
                    .per_endpoint
                    .entry(delivery.endpoint.clone())
                    .or_default() += 1;
                inflight.total += 1;
            }
            started += 1;
            let worker = self.clone();
            tokio::spawn(async move { worker.attempt(delivery).await });
        }
        Ok(started)
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

    /// Sends one delivery and records what happened.
    async fn attempt(self: Arc<Self>, delivery: Delivery) {
        let Some(endpoint) = self.registry.get(&delivery.endpoint) else {
            // Deleted meanwhile: its deliveries went with it.
            self.release(&delivery);
            return;
        };
        let started = std::time::Instant::now();
        let result = self.sender.deliver(&endpoint, &delivery).await;
        self.metrics
            .webhook_attempt_seconds
            .observe(started.elapsed().as_secs_f64());
        let now = SystemTime::now();
        let now_ms = unix_ms(now);
        let outcome = match &result {
            Ok(status) => AttemptOutcome::Delivered { status: *status },
            Err(error) => {
                let retry_after = match error {
                    AttemptError::Retry { retry_after, .. } => *retry_after,
                    AttemptError::Gone | AttemptError::Refused(_) => None,
                };
                let delay = if error.is_permanent() {
                    None
                } else {
                    let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
                    self.settings.schedule.next_delay(
                        delivery.attempts.saturating_add(1),
                        retry_after,
                        &mut *rng,
                    )
                };
                AttemptOutcome::Failed {
                    status: error.status(),
                    error: error.to_string(),
                    retry_at_ms: delay.map(|d| {
                        now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    }),
                }
            }
        };
        let counted = match &outcome {
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
        } = &outcome
        {
            tracing::warn!(endpoint = %delivery.endpoint, stream = %delivery.stream, msg_id = %delivery.msg_id, attempts = delivery.attempts + 1, %error, "webhook delivery dead-lettered");
        }
        let recorded = loop {
            match self
                .outbox
                .record(delivery.id, outcome.clone(), now_ms)
                .await
            {
                Ok(recorded) => break Some(recorded),
                Err(OutboxError::Closed) => break None,
                Err(error) => {
                    // Not recorded: retry, or the delivery is sent again after a restart
                    // (at least once, same webhook-id).
                    tracing::error!(%error, "cannot record a webhook attempt; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        if let Some(recorded) = recorded {
            let failing_since_ms = recorded.status.as_ref().and_then(|s| s.failing_since_ms);
            if let Some(status) = recorded.status.clone() {
                self.registry.set_status(&delivery.endpoint, status);
            }
            let reason = match (&result, failing_since_ms) {
                (Err(AttemptError::Gone), _) => Some("the receiver answered 410 Gone".to_owned()),
                (Err(AttemptError::Refused(refusal)), _) => Some(format!(
                    "its target is refused ({refusal}); change its url, then re-enable it"
                )),
                (Err(_), Some(since))
                    if now_ms.saturating_sub(since)
                        >= u64::try_from(self.settings.disable_after.as_millis())
                            .unwrap_or(u64::MAX) =>
                {
                    Some(format!(
                        "every attempt failed for {} (webhooks.disable_after)",
                        humantime::format_duration(Duration::from_millis(now_ms - since))
                    ))
                }
                _ => None,
            };
            match reason {
                // Re-enabling it queues the current document, so a disabled endpoint needs
                // no resync now (one would only die again).
                Some(reason) => self.disable(&endpoint, reason, now_ms).await,
                None if recorded.needs_resync => {
                    if let Some(route) = self.resync.get(&delivery.stream) {
                        let _ = route.send(Resync::Endpoint(delivery.endpoint.clone()));
                    }
                }
                None => {}
            }
        }
        self.release(&delivery);
    }

    async fn disable(&self, endpoint: &Endpoint, reason: String, now_ms: u64) {
        tracing::warn!(endpoint = %endpoint.record.id, %reason, "webhook endpoint disabled");
        let disabled = Disabled {
            at_ms: now_ms,
            reason,
        };
        match self
            .outbox
            .set_disabled(endpoint.record.id.clone(), Some(disabled))
            .await
        {
            Ok(Some(status)) => self.registry.set_status(&endpoint.record.id, status),
            // Deleted meanwhile.
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "cannot disable a webhook endpoint"),
        }
    }

    /// Runs until `shutdown`: starts due attempts whenever woken, and at the next due time.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut next_prune = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_prune {
                next_prune += Duration::from_secs(3600);
                let before = unix_ms(SystemTime::now()).saturating_sub(
                    u64::try_from(self.settings.retention.as_millis()).unwrap_or(u64::MAX),
                );
                match self.outbox.prune(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deliveries = n, "pruned finished webhook deliveries"),
                    Err(error) => tracing::warn!(%error, "cannot prune webhook deliveries"),
                }
            }
            let wait = match self.try_step().await {
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
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Attempts in flight finish (or time out) so their outcomes are recorded; anything cut
        // short stays pending and is sent again after a restart.
        let deadline = tokio::time::Instant::now() + self.settings.attempt_timeout;
        while self.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

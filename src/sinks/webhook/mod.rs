//! Webhooks: every change of the streams an endpoint subscribes to, delivered to its URL,
//! signed (Standard Webhooks), in order per (endpoint, stream), at least once across restarts.
//!
//! Flow: hub → [`dispatcher`] (one per stream; accepts each change into the durable
//! [`outbox`] for every subscribed endpoint, in one transaction, and the upstream's failures
//! and recoveries, as `stream.error` and `stream.recovered`, for the endpoints listing
//! `errors` and `recoveries`) → [`worker`] (a shared
//! pool; sends the oldest pending delivery of each (endpoint, stream) pair) → receiver.
//!
//! Modules, each importing only those above it:
//! - [`sign`]: secrets, message ids and `webhook-signature` (pure).
//! - [`schedule`]: the retry schedule, with jitter and `Retry-After` (pure).
//! - [`body`]: the delivery body, and whether a change goes out as a patch or a snapshot (pure).
//! - [`config`]: the `[webhooks]` section: shape, defaults and bounds, validation into the
//!   settings the sink is built from (uses `sign`, `schedule` and `body`).
//! - [`outbox`]: the durable queue: a trait and its SQLite implementation (uses only `body`
//!   and `sign`).
//! - [`registry`]: the endpoints in memory, parsed once.
//! - [`deliver`]: one attempt: the signed request and what the answer means (pure), and
//!   sending it.
//! - [`dispatcher`]: hub → outbox, and the snapshot that heals every gap.
//! - [`dispatchers`]: the dispatchers running now, started and stopped as streams come and go
//!   (a reload) and as endpoints start and stop receiving views (the file or the admin API).
//! - [`worker`]: outbox → receivers: claims due deliveries, delivers and settles each
//!   (`start_due` starts what is due; `try_step` takes one delivery to completion).
//! - [`operator`]: operational events (an endpoint disabled or recovered, a delivery dead),
//!   stored in the outbox when they happen, signed and sent to `webhooks.operator_url`.
//! - [`endpoints`]: configured endpoints reconciled with stored ones at startup, and the
//!   operations behind the admin API.
//!
//! [`Webhooks`] is the running sink: it starts the dispatchers (and, while running, those of
//! streams a reload adds or changes the source of) and the worker, tells a push
//! when its change is committed, and holds the [`endpoints::Endpoints`] the admin API manages.
//!
//! Invariants: a patch is only queued right after the delivery holding its base
//! ([`body::plan`]); a pair never has two deliveries in flight; a dead delivery supersedes the
//! patches queued after it and a snapshot follows; a backlog above `webhooks.backlog_limit`
//! collapses into one snapshot; a delivery stays pending until a 2xx is recorded, so a crash
//! at any point means a redelivery with the same `webhook-id`, never a loss.

pub mod body;
pub mod config;
pub mod deliver;
pub mod dispatcher;
pub mod dispatchers;
pub mod endpoints;
pub mod operator;
pub mod outbox;
pub mod registry;
pub mod schedule;
pub mod sign;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::config::WebhookSettings;
use crate::hub::{Hub, Stream};
use crate::time::unix_ms;
use crate::views::Views;
pub use dispatcher::Lease;
use dispatcher::NotCommitted;
use dispatchers::Dispatchers;
pub use dispatchers::NotStarted;
use endpoints::Endpoints;
use outbox::{Outbox, OutboxError};
use worker::{Worker, WorkerSettings};

/// How long a push waits for its change to be committed to the outbox before it is answered
/// 503 (the dispatcher keeps retrying; see the README's push section).
pub const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// In a cluster, how often each node reads the endpoints again (others create, change and
/// disable them), the holder of a stream looks for endpoints owed its document, and an idle
/// worker looks for deliveries other nodes queued or left behind.
pub const CLUSTER_POLL: Duration = Duration::from_millis(500);

/// On a node of its own, how often the views endpoints receive are checked besides every
/// change through the admin API or a reload (the worker disables failing endpoints, whose
/// views are then released).
pub const VIEWS_CHECK: Duration = Duration::from_secs(5);

/// How the sink runs beside other nodes sharing its store (a cluster).
pub struct Shared {
    /// This node's id (its workers' claims name it).
    pub node: String,
    /// Each stream's lease on this node: its dispatcher runs only while the lease is held.
    pub leases: HashMap<String, dispatcher::Lease>,
}

/// Why the webhook sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] worker::ClientError),
}

/// The webhook sink.
pub struct Webhooks {
    outbox: Arc<dyn Outbox>,
    endpoints: Arc<Endpoints>,
    dispatchers: Arc<Dispatchers>,
    worker: Arc<Worker>,
}

impl Webhooks {
    /// Reconciles configured endpoints with the outbox ([`endpoints::reconcile`]), then
    /// spawns one dispatcher per hub stream and the worker into `tasks`. The documents of
    /// `push_streams` are stored with their changes.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        settings: &WebhookSettings,
        outbox: Arc<dyn Outbox>,
        hub: Arc<Hub>,
        views: Arc<Views>,
        push_streams: &HashSet<String>,
        user_agent: &str,
        tasks: &mut JoinSet<()>,
        shutdown: CancellationToken,
        metrics: Arc<crate::metrics::Metrics>,
        shared: Option<Shared>,
    ) -> Result<Arc<Webhooks>, StartError> {
        let registry =
            Arc::new(endpoints::reconcile(settings, &*outbox, unix_ms(SystemTime::now())).await?);

        let wake = Arc::new(Notify::new());
        let dispatchers = Arc::new(Dispatchers::new(
            outbox.clone(),
            registry.clone(),
            settings.backlog_limit,
            wake.clone(),
            hub.clone(),
            views,
            shared.as_ref().map(|_| CLUSTER_POLL),
            shutdown.clone(),
        ));
        // One dispatcher per stream, then one per view endpoints receive: each on the view's
        // stream, run by the node holding the source stream's lease (a view has none of its
        // own).
        let streams = hub
            .all()
            .into_iter()
            .map(|stream| {
                let keep_document = push_streams.contains(stream.name());
                let lease = shared
                    .as_ref()
                    .and_then(|s| s.leases.get(stream.name()).cloned());
                (stream, keep_document, lease)
            })
            .collect();
        dispatchers.start_all(streams).await;
        let resync = dispatchers.routes();
        let operator = match &settings.operator {
            Some(operator) => {
                let sender = deliver::Sender::new(
                    settings.attempt_timeout,
                    settings.allow_private_targets,
                    1,
                    user_agent,
                )
                .map_err(worker::ClientError::from)?;
                let (operator, task) = operator::Operator::start(
                    operator.url.clone(),
                    operator.secret.clone(),
                    settings.schedule.clone(),
                    sender,
                    outbox.clone(),
                    Arc::from(format!(
                        "{}/operator/{:08x}",
                        shared.as_ref().map_or("local", |s| s.node.as_str()),
                        rand::random::<u32>()
                    )),
                    shutdown.clone(),
                );
                tasks.spawn(task);
                Some(operator)
            }
            None => None,
        };
        let worker = Arc::new(
            Worker::new(
                outbox.clone(),
                registry.clone(),
                WorkerSettings {
                    schedule: settings.schedule.clone(),
                    attempt_timeout: settings.attempt_timeout,
                    disable_after: settings.disable_after,
                    per_endpoint: settings.max_concurrency_per_endpoint,
                    workers: settings.workers,
                    allow_private: settings.allow_private_targets,
                    retention: settings.retention,
                    attempt_retention: settings.attempt_retention,
                    user_agent: user_agent.to_owned(),
                    owner: Arc::from(format!(
                        "{}/{:08x}",
                        shared.as_ref().map_or("local", |s| s.node.as_str()),
                        rand::random::<u32>()
                    )),
                    claim_timeout: settings.claim_timeout,
                    poll: shared.as_ref().map(|_| CLUSTER_POLL),
                },
                wake.clone(),
                resync.clone(),
                metrics,
            )?
            .with_operator(operator.clone()),
        );
        // Follows the endpoints' views as they change, and at shutdown waits for every
        // dispatcher.
        tasks.spawn(dispatchers.clone().run(
            if shared.is_some() {
                CLUSTER_POLL
            } else {
                VIEWS_CHECK
            },
            shutdown.clone(),
        ));
        tasks.spawn(worker.clone().run(shutdown.clone()));
        if shared.is_some() {
            tasks.spawn(endpoints::follow(
                outbox.clone(),
                registry.clone(),
                CLUSTER_POLL,
                shutdown.clone(),
            ));
        }
        tracing::info!(
            endpoints = registry.all().len(),
            store = %settings.store,
            "webhooks started"
        );
        let tester = deliver::Sender::new(
            settings.attempt_timeout,
            settings.allow_private_targets,
            1,
            user_agent,
        )
        .map_err(worker::ClientError::from)?;
        let endpoints = Endpoints::new(
            outbox.clone(),
            registry,
            settings.clone(),
            hub,
            dispatchers.clone(),
            wake,
            tester,
        )
        .with_operator(operator);
        Ok(Arc::new(Webhooks {
            outbox,
            endpoints: Arc::new(endpoints),
            dispatchers,
            worker,
        }))
    }

    /// Waits until every change of `stream` up to `seq` is committed to the outbox (its
    /// deliveries queued for every enabled endpoint, a push stream's document stored), at
    /// most [`COMMIT_WAIT`]. A stream the sink does not know has nothing to wait for.
    pub async fn committed(&self, stream: &str, seq: u64) -> Result<(), NotCommitted> {
        match self.dispatchers.committed(stream) {
            Some(committed) => committed.reached(seq, COMMIT_WAIT).await,
            None => Ok(()),
        }
    }

    /// Starts the dispatcher of `stream`, added to the hub while running (or whose source
    /// changed: the running one is replaced), and follows again the views of it endpoints
    /// receive. `keep_document`: a push stream outside a cluster (its documents are stored
    /// with its changes). `fence`: the stream's lease on this node, which a shared store
    /// requires (dispatch only while it is held, every write fenced by it); `None` on a store
    /// of this node's own.
    pub async fn start_dispatcher(
        &self,
        stream: Arc<Stream>,
        keep_document: bool,
        fence: Option<Lease>,
    ) -> Result<(), NotStarted> {
        self.dispatchers
            .start_stream(stream, keep_document, fence)
            .await
    }

    /// Stops the dispatcher of stream `name` (removed while running) and of its views, and
    /// waits for them. Deliveries already queued stay and are delivered; nothing new is.
    pub async fn stop_dispatcher(&self, name: &str) {
        self.dispatchers.stop_stream(name).await;
    }

    /// Follows exactly the views enabled endpoints receive (starting and stopping their
    /// dispatchers); the views of the streams in `restarted` (a reload changed their views or
    /// source) are followed anew.
    pub async fn follow_views(&self, restarted: &[&str]) {
        self.dispatchers.reconcile_views(restarted).await;
    }

    /// The outbox (`/readyz` asks it a trivial query).
    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.outbox
    }

    /// The endpoints, as the admin API manages them.
    pub fn endpoints(&self) -> &Arc<Endpoints> {
        &self.endpoints
    }

    /// The delivery worker (tests drive it one delivery at a time with `try_step`).
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }
}

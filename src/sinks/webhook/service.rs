//! The running webhook sink: starts the dispatchers and the worker, reconciles configured
//! endpoints with stored ones, and carries out the admin API's operations.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::body::Mode;
use super::dispatcher::{Committed, Dispatcher, NotCommitted, Resync};
use super::outbox::{
    Delivery, DeliveryFilter, Disabled, EndpointRecord, EndpointStatus, Outbox, OutboxError,
    Replay, Source,
};
use super::registry::{Endpoint, Registry};
use super::sign::Secret;
use super::worker::{ResyncRoutes, Worker, WorkerSettings};
use crate::config::{WebhookSettings, endpoint_headers};
use crate::hub::Hub;
use crate::ssrf;
use crate::time::unix_ms;

/// How long a push waits for its change to be committed to the outbox before it is answered
/// 503 (the dispatcher keeps retrying; see the README's push section).
pub const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// Why an admin operation was refused or failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No such endpoint or delivery (404).
    #[error("{0}")]
    NotFound(String),
    /// The request is invalid; the message names the field and what was expected (422).
    #[error("{0}")]
    Invalid(String),
    /// The operation conflicts with how the endpoint is managed (409).
    #[error("{0}")]
    Conflict(String),
    /// The outbox failed; nothing was changed, try again (503).
    #[error(transparent)]
    Storage(#[from] OutboxError),
}

/// Why the webhook sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] super::worker::ClientError),
}

/// A new endpoint, as the admin API receives it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// Target URL (http or https).
    pub url: String,
    /// Streams it receives.
    pub streams: Vec<String>,
    /// `patch` (default) or `snapshot`.
    pub mode: Option<Mode>,
    /// Extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A secret to use (`whsec_...`); generated when absent.
    pub secret: Option<String>,
}

/// Changes to an endpoint; absent fields stay as they are.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointChanges {
    /// New target URL.
    pub url: Option<String>,
    /// New stream list.
    pub streams: Option<Vec<String>>,
    /// New mode.
    pub mode: Option<Mode>,
    /// New extra headers (replacing all).
    pub headers: Option<BTreeMap<String, String>>,
    /// `true` disables, `false` re-enables (and clears the failure streak).
    pub disabled: Option<bool>,
}

/// The webhook sink.
pub struct Webhooks {
    outbox: Arc<dyn Outbox>,
    registry: Arc<Registry>,
    settings: WebhookSettings,
    hub: Arc<Hub>,
    resync: ResyncRoutes,
    committed: HashMap<String, Committed>,
    wake: Arc<Notify>,
    worker: Arc<Worker>,
    rng: Mutex<StdRng>,
}

fn record_of_config(
    settings: &crate::config::WebhookEndpointSettings,
    existing: Option<&EndpointRecord>,
    now_ms: u64,
) -> EndpointRecord {
    let secret = settings.secret.expose().to_owned();
    // A secret changed in the file is a rotation: the old one keeps signing for the overlap.
    let (previous_secret, previous_expires_ms) = match existing {
        Some(old) if old.secret != secret => (Some(old.secret.clone()), None),
        Some(old) => (old.previous_secret.clone(), old.previous_expires_ms),
        None => (None, None),
    };
    EndpointRecord {
        id: settings.id.clone(),
        url: settings.url.to_string(),
        streams: settings.streams.clone(),
        mode: settings.mode,
        headers: settings.headers.clone(),
        secret,
        previous_secret,
        previous_expires_ms,
        source: Source::Config,
        created_ms: existing.map_or(now_ms, |e| e.created_ms),
    }
}

/// A random id for an endpoint created through the API: `ep_` + 24 hex digits.
fn endpoint_id(rng: &mut impl rand::RngCore) -> String {
    let mut bytes = [0u8; 12];
    rng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("ep_{hex}")
}

impl Webhooks {
    /// Reconciles configured endpoints with the outbox, then spawns one dispatcher per hub
    /// stream and the worker into `tasks`. The documents of `push_streams` are stored with
    /// their changes.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        settings: &WebhookSettings,
        outbox: Arc<dyn Outbox>,
        hub: Arc<Hub>,
        push_streams: &HashSet<String>,
        user_agent: &str,
        tasks: &mut JoinSet<()>,
        shutdown: CancellationToken,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Webhooks>, StartError> {
        let now_ms = unix_ms(SystemTime::now());
        let stored = outbox.endpoints().await?;
        let stored_by_id: BTreeMap<&str, &(EndpointRecord, EndpointStatus)> =
            stored.iter().map(|e| (e.0.id.as_str(), e)).collect();
        for configured in &settings.endpoints {
            let existing = stored_by_id.get(configured.id.as_str()).map(|e| &e.0);
            let mut record = record_of_config(configured, existing, now_ms);
            if record.previous_secret.is_some() && record.previous_expires_ms.is_none() {
                record.previous_expires_ms = Some(now_ms.saturating_add(
                    u64::try_from(settings.rotation_overlap.as_millis()).unwrap_or(u64::MAX),
                ));
            }
            outbox.put_endpoint(record).await?;
        }
        for (record, status) in &stored {
            let still_configured = settings.endpoints.iter().any(|e| e.id == record.id);
            if record.source == Source::Config && !still_configured && status.disabled.is_none() {
                let reason = "removed from the configuration (delete it with the admin API to \
                              drop its deliveries)";
                outbox
                    .set_disabled(
                        record.id.clone(),
                        Some(Disabled {
                            at_ms: now_ms,
                            reason: reason.into(),
                        }),
                    )
                    .await?;
            }
        }
        let registry = Arc::new(Registry::new());
        for (record, status) in outbox.endpoints().await? {
            match Endpoint::new(record, status) {
                Ok(endpoint) => {
                    registry.put(endpoint);
                }
                Err(error) => tracing::error!(%error, "skipping a stored webhook endpoint"),
            }
        }

        let wake = Arc::new(Notify::new());
        let mut resync = ResyncRoutes::new();
        let mut dispatchers = Vec::new();
        let mut committed = HashMap::new();
        for stream in hub.all() {
            let (sender, requests) = mpsc::unbounded_channel();
            resync.insert(stream.name().to_owned(), sender);
            let keep_document = push_streams.contains(stream.name());
            let dispatcher = Dispatcher::new(
                stream.clone(),
                outbox.clone(),
                registry.clone(),
                settings.backlog_limit,
                wake.clone(),
                requests,
                keep_document,
            );
            committed.insert(stream.name().to_owned(), dispatcher.committed());
            dispatchers.push(dispatcher);
        }
        let worker = Arc::new(Worker::new(
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
                user_agent: user_agent.to_owned(),
            },
            wake.clone(),
            resync.clone(),
            metrics,
        )?);
        for dispatcher in dispatchers {
            tasks.spawn(dispatcher.run(shutdown.clone()));
        }
        tasks.spawn(worker.clone().run(shutdown.clone()));
        tracing::info!(
            endpoints = registry.all().len(),
            database = %settings.database.display(),
            "webhooks started"
        );
        Ok(Arc::new(Webhooks {
            outbox,
            registry,
            settings: settings.clone(),
            hub,
            resync,
            committed,
            wake,
            worker,
            rng: Mutex::new(StdRng::from_os_rng()),
        }))
    }

    /// Waits until every change of `stream` up to `seq` is committed to the outbox (its
    /// deliveries queued for every enabled endpoint, a push stream's document stored), at
    /// most [`COMMIT_WAIT`]. A stream the sink does not know has nothing to wait for.
    pub async fn committed(&self, stream: &str, seq: u64) -> Result<(), NotCommitted> {
        match self.committed.get(stream) {
            Some(committed) => committed.reached(seq, COMMIT_WAIT).await,
            None => Ok(()),
        }
    }

    /// The delivery worker (tests drive it with `try_step`).
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// Every endpoint.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.registry.all()
    }

    /// One endpoint.
    pub fn endpoint(&self, id: &str) -> Result<Arc<Endpoint>, AdminError> {
        self.registry
            .get(id)
            .ok_or_else(|| AdminError::NotFound(format!("no webhook endpoint {id:?}")))
    }

    fn request_resync(&self, endpoint: &Endpoint) {
        for stream in &endpoint.record.streams {
            if let Some(route) = self.resync.get(stream) {
                let _ = route.send(Resync::Endpoint(endpoint.record.id.clone()));
            }
        }
        self.wake.notify_one();
    }

    async fn check_url(&self, url: &str) -> Result<Url, AdminError> {
        let parsed = Url::parse(url.trim()).map_err(|e| {
            AdminError::Invalid(format!(
                "url: expected an absolute http or https URL such as \
                 \"https://hooks.example.com/patchwire\", got {url:?} ({e})"
            ))
        })?;
        ssrf::check_target(&parsed, self.settings.allow_private_targets)
            .await
            .map_err(|e| AdminError::Invalid(format!("url: {e}")))?;
        Ok(parsed)
    }

    fn check_streams(&self, streams: &[String]) -> Result<(), AdminError> {
        if streams.is_empty() {
            return Err(AdminError::Invalid(
                "streams: expected at least one stream name (GET /streams lists them)".into(),
            ));
        }
        for (j, name) in streams.iter().enumerate() {
            if let Some(first) = streams[..j].iter().position(|s| s == name) {
                return Err(AdminError::Invalid(format!(
                    "streams[{j}]: {name:?} is already listed at streams[{first}]; name each \
                     stream once"
                )));
            }
            if self.hub.get(name).is_none() {
                let known: Vec<String> =
                    self.hub.all().iter().map(|s| s.name().to_owned()).collect();
                return Err(AdminError::Invalid(format!(
                    "streams: expected names of configured streams ({}), got {name:?}",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), AdminError> {
        endpoint_headers(headers)
            .map_err(|(name, message)| AdminError::Invalid(format!("headers.{name}: {message}")))
    }

    async fn store(
        &self,
        record: EndpointRecord,
        status: EndpointStatus,
    ) -> Result<Arc<Endpoint>, AdminError> {
        let endpoint = Endpoint::new(record.clone(), status)
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        self.outbox.put_endpoint(record).await?;
        Ok(self.registry.put(endpoint))
    }

    /// Creates an endpoint; returns it with its secret (the only time the secret is shown).
    pub async fn create(&self, input: NewEndpoint) -> Result<(Arc<Endpoint>, String), AdminError> {
        let url = self.check_url(&input.url).await?;
        self.check_streams(&input.streams)?;
        Self::check_headers(&input.headers)?;
        let secret = match &input.secret {
            Some(text) => {
                Secret::parse(text).map_err(|e| AdminError::Invalid(format!("secret: {e}")))?
            }
            None => Secret::generate(&mut *self.rng.lock().unwrap_or_else(|e| e.into_inner())),
        };
        let id = endpoint_id(&mut *self.rng.lock().unwrap_or_else(|e| e.into_inner()));
        let record = EndpointRecord {
            id,
            url: url.to_string(),
            streams: input.streams,
            mode: input.mode.unwrap_or(Mode::Patch),
            headers: input.headers,
            secret: secret.expose().to_owned(),
            previous_secret: None,
            previous_expires_ms: None,
            source: Source::Api,
            created_ms: unix_ms(SystemTime::now()),
        };
        let endpoint = self.store(record, EndpointStatus::default()).await?;
        self.request_resync(&endpoint);
        Ok((endpoint, secret.expose().to_owned()))
    }

    /// Changes an endpoint. Endpoints declared in the configuration can only be disabled and
    /// re-enabled here; the rest of their definition comes from the file.
    pub async fn update(
        &self,
        id: &str,
        changes: EndpointChanges,
    ) -> Result<Arc<Endpoint>, AdminError> {
        let current = self.endpoint(id)?;
        let redefines = changes.url.is_some()
            || changes.streams.is_some()
            || changes.mode.is_some()
            || changes.headers.is_some();
        if redefines && current.record.source == Source::Config {
            return Err(AdminError::Conflict(format!(
                "endpoint {id:?} is declared in the configuration file; change it there (only \
                 \"disabled\" can be changed here)"
            )));
        }
        let mut record = current.record.clone();
        if let Some(url) = &changes.url {
            record.url = self.check_url(url).await?.to_string();
        }
        if let Some(streams) = changes.streams {
            self.check_streams(&streams)?;
            record.streams = streams;
        }
        if let Some(mode) = changes.mode {
            record.mode = mode;
        }
        if let Some(headers) = changes.headers {
            Self::check_headers(&headers)?;
            record.headers = headers;
        }
        let mut status = current.status.clone();
        let mut enabled_now = false;
        match changes.disabled {
            Some(true) if status.disabled.is_none() => {
                let disabled = Disabled {
                    at_ms: unix_ms(SystemTime::now()),
                    reason: "disabled through the admin API".into(),
                };
                status = self
                    .outbox
                    .set_disabled(id.to_owned(), Some(disabled))
                    .await?
                    .ok_or_else(|| AdminError::NotFound(format!("no webhook endpoint {id:?}")))?;
            }
            Some(false) if status.disabled.is_some() => {
                status = self
                    .outbox
                    .set_disabled(id.to_owned(), None)
                    .await?
                    .ok_or_else(|| AdminError::NotFound(format!("no webhook endpoint {id:?}")))?;
                enabled_now = true;
            }
            _ => {}
        }
        let endpoint = self.store(record, status).await?;
        if enabled_now || redefines {
            self.request_resync(&endpoint);
        }
        Ok(endpoint)
    }

    /// Deletes an endpoint created through the API, with its deliveries.
    pub async fn delete(&self, id: &str) -> Result<(), AdminError> {
        let current = self.endpoint(id)?;
        if current.record.source == Source::Config
            && self.settings.endpoints.iter().any(|e| e.id == id)
        {
            return Err(AdminError::Conflict(format!(
                "endpoint {id:?} is declared in the configuration file; remove it there"
            )));
        }
        self.outbox.delete_endpoint(id.to_owned()).await?;
        self.registry.remove(id);
        Ok(())
    }

    /// Rotates an endpoint's secret: the new one (given, or generated) signs from now on, and
    /// the old one also signs for `webhooks.rotation_overlap`. Returns the new secret.
    pub async fn rotate(&self, id: &str, secret: Option<String>) -> Result<String, AdminError> {
        let current = self.endpoint(id)?;
        if current.record.source == Source::Config {
            return Err(AdminError::Conflict(format!(
                "endpoint {id:?} is declared in the configuration file; change its secret there \
                 (the old one keeps signing for webhooks.rotation_overlap after the restart)"
            )));
        }
        let secret = match secret {
            Some(text) => {
                Secret::parse(&text).map_err(|e| AdminError::Invalid(format!("secret: {e}")))?
            }
            None => Secret::generate(&mut *self.rng.lock().unwrap_or_else(|e| e.into_inner())),
        };
        let mut record = current.record.clone();
        record.previous_secret = Some(std::mem::replace(
            &mut record.secret,
            secret.expose().to_owned(),
        ));
        record.previous_expires_ms = Some(unix_ms(SystemTime::now()).saturating_add(
            u64::try_from(self.settings.rotation_overlap.as_millis()).unwrap_or(u64::MAX),
        ));
        self.store(record, current.status.clone()).await?;
        Ok(secret.expose().to_owned())
    }

    /// An endpoint's deliveries, newest first.
    pub async fn deliveries(
        &self,
        id: &str,
        filter: DeliveryFilter,
    ) -> Result<Vec<Delivery>, AdminError> {
        self.endpoint(id)?;
        Ok(self.outbox.deliveries(id.to_owned(), filter).await?)
    }

    /// Queues deliveries again; returns how many.
    pub async fn replay(&self, id: &str, which: Replay) -> Result<usize, AdminError> {
        self.endpoint(id)?;
        let count = self
            .outbox
            .replay(id.to_owned(), which, unix_ms(SystemTime::now()))
            .await?;
        if count == 0 {
            if let Replay::One(delivery) = which {
                return Err(AdminError::NotFound(format!(
                    "endpoint {id:?} has no finished delivery {delivery} (pending deliveries are \
                     already queued)"
                )));
            }
        }
        self.wake.notify_one();
        Ok(count)
    }
}

//! The endpoints of the webhook sink: reconciled with the configuration at startup
//! ([`reconcile`]), and managed through the admin API ([`Endpoints`]: create, update, disable
//! and re-enable, delete, rotate secrets, list and replay deliveries). Each operation writes
//! the outbox first, then the registry, and asks the dispatchers for a snapshot where an
//! endpoint now lacks one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tokio::sync::Notify;
use url::Url;

use super::body::{Events, Format, Mode};
use super::config::{
    WebhookEndpointSettings, WebhookSettings, endpoint_description, endpoint_headers,
    endpoint_metadata, endpoint_rate_limit, resolve_streams,
};
use super::deliver::Probe;
use super::dispatcher::{Resync, ResyncRoutes};
use super::dispatchers::Dispatchers;
use super::operator::{Operator, OperatorEvent};
use super::outbox::{
    AttemptEntry, AttemptFilter, Created, Delivery, DeliveryFilter, Disabled, EndpointRecord,
    EndpointStatus, OperatorNote, Outbox, OutboxError, Replay, Source,
};
use super::registry::{Endpoint, Registry};
use super::sign::{Scheme, Secret, message_id};
use crate::hub::Hub;
use crate::sinks::broker::config::Source as BrokerSource;
use crate::ssrf;
use crate::time::unix_ms;

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
    /// `json` (default), `cloudevents` or `cloudevents-binary`.
    pub format: Option<Format>,
    /// Extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A secret to use (`whsec_...`, or an ed25519 signing key `whsk_...`); generated when
    /// absent.
    pub secret: Option<String>,
    /// The signature scheme of a generated secret: `"v1"` (HMAC, the default) or `"v1a"`
    /// (ed25519: receivers verify with the endpoint's public key).
    pub signing: Option<Scheme>,
    /// What it is for.
    pub description: Option<String>,
    /// Free-form labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Most attempts started per second.
    pub rate_limit: Option<u64>,
    /// Which kinds of change it receives (default: `["snapshots", "patches"]`).
    pub events: Option<Vec<String>>,
}

/// A field that may be set, cleared (`null`) or left alone (absent).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(deserializer).map(Some)
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
    /// New format.
    pub format: Option<Format>,
    /// New extra headers (replacing all).
    pub headers: Option<BTreeMap<String, String>>,
    /// `true` disables, `false` re-enables (and clears the failure streak).
    pub disabled: Option<bool>,
    /// New description (`null` clears it).
    #[serde(default, deserialize_with = "present")]
    pub description: Option<Option<String>>,
    /// New labels (replacing all).
    pub metadata: Option<BTreeMap<String, String>>,
    /// New rate limit (`null` removes it).
    #[serde(default, deserialize_with = "present")]
    pub rate_limit: Option<Option<u64>>,
    /// New kinds of change received.
    pub events: Option<Vec<String>>,
}

fn record_of_config(
    settings: &WebhookEndpointSettings,
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
        format: settings.format,
        headers: settings.headers.clone(),
        secret,
        previous_secret,
        previous_expires_ms,
        source: Source::Config,
        created_ms: existing.map_or(now_ms, |e| e.created_ms),
        description: settings.description.clone(),
        metadata: settings.metadata.clone(),
        rate_limit: settings.rate_limit,
        events: settings.events,
        request_hash: None,
        view_filters: settings
            .views
            .iter()
            .filter_map(|v| Some((v.name.clone(), v.query.clone()?)))
            .collect(),
    }
}

/// A create request's `Idempotency-Key`, and the hash of the request it came with.
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// The key, as sent.
    pub key: String,
    /// A hash of the request body (its JSON, normalized).
    pub request_hash: String,
}

/// The id of the endpoint a create with this `Idempotency-Key` makes: `ep_` + 24 hex digits of
/// its SHA-256, so a retry, on any node, names the same endpoint.
pub fn idempotent_id(key: &str) -> String {
    let digest = super::sign::sha256_hex(format!("patchwire-endpoint\0{key}").as_bytes());
    format!("ep_{}", &digest[..24])
}

/// What a create made.
#[derive(Debug, Clone)]
pub struct CreatedEndpoint {
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    /// Its secret (shown only in a create's answer).
    pub secret: String,
    /// A retry with the same `Idempotency-Key` and request: the endpoint the first one made.
    pub replayed: bool,
}

/// An endpoint's `streams` as the admin API resolved them.
struct Resolved {
    /// The names its deliveries are under.
    names: Vec<String>,
    /// Each ad hoc view's filter, by the view's name.
    view_filters: BTreeMap<String, String>,
}

/// A random id for an endpoint created through the API: `ep_` + 24 hex digits.
fn endpoint_id(rng: &mut impl rand::RngCore) -> String {
    let mut bytes = [0u8; 12];
    rng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("ep_{hex}")
}

/// Brings the stored endpoints in line with the configuration at startup (a secret changed
/// in the file starts a rotation; an endpoint removed from the file is disabled, its
/// deliveries kept) and returns every stored endpoint that parses.
pub async fn reconcile(
    settings: &WebhookSettings,
    outbox: &dyn Outbox,
    now_ms: u64,
) -> Result<Registry, OutboxError> {
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
    let registry = Registry::new();
    for (record, status) in outbox.endpoints().await? {
        match Endpoint::new(record, status) {
            Ok(endpoint) => {
                registry.put(endpoint);
            }
            Err(error) => tracing::error!(%error, "skipping a stored webhook endpoint"),
        }
    }
    Ok(registry)
}

/// Reads the endpoints from the outbox every `interval` until `shutdown` (a cluster: other
/// nodes create, change, disable and delete them).
pub async fn follow(
    outbox: Arc<dyn Outbox>,
    registry: Arc<Registry>,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match outbox.endpoints().await {
            Ok(all) => {
                registry.replace_all(all);
                failing = false;
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot read the webhook endpoints; retrying");
                }
                failing = true;
            }
        }
    }
}

/// The endpoints of the running sink, managed through the admin API: every change is written
/// to the outbox, then to the registry the dispatchers and the worker read.
pub struct Endpoints {
    outbox: Arc<dyn Outbox>,
    /// Sends test deliveries (its own client: a test never waits for the worker's pool).
    tester: super::deliver::Sender,
    registry: Arc<Registry>,
    /// Its configured endpoints change with a configuration reload.
    settings: std::sync::RwLock<WebhookSettings>,
    hub: Arc<Hub>,
    resync: ResyncRoutes,
    /// Started and stopped as endpoints start and stop receiving views.
    dispatchers: Arc<Dispatchers>,
    wake: Arc<Notify>,
    rng: Mutex<StdRng>,
    /// Told when an endpoint is disabled or re-enabled here.
    operator: Option<Operator>,
}

impl Endpoints {
    /// Manages the endpoints in `registry` (and `outbox`); `dispatchers` are this node's
    /// (requests for a snapshot reach them; views are followed as endpoints receive them) and
    /// `wake` wakes the worker.
    pub fn new(
        outbox: Arc<dyn Outbox>,
        registry: Arc<Registry>,
        settings: WebhookSettings,
        hub: Arc<Hub>,
        dispatchers: Arc<Dispatchers>,
        wake: Arc<Notify>,
        tester: super::deliver::Sender,
    ) -> Self {
        Endpoints {
            outbox,
            tester,
            registry,
            settings: std::sync::RwLock::new(settings),
            hub,
            resync: dispatchers.routes(),
            dispatchers,
            wake,
            rng: Mutex::new(StdRng::from_os_rng()),
            operator: None,
        }
    }

    /// Tells `operator` when an endpoint is disabled or re-enabled through the admin API.
    pub fn with_operator(mut self, operator: Option<Operator>) -> Self {
        self.operator = operator;
        self
    }

    /// `event` as a note to store with the status change causing it, keyed by the endpoint
    /// and the time (`None` without an operator URL).
    fn note(&self, event: &OperatorEvent, endpoint: &str, at_ms: u64) -> Option<OperatorNote> {
        self.operator
            .as_ref()
            .map(|operator| operator.note(event, format!("{endpoint}:{at_ms}")))
    }

    /// Wakes the operator events' sender.
    fn noted(&self) {
        if let Some(operator) = &self.operator {
            operator.stored();
        }
    }

    fn settings(&self) -> WebhookSettings {
        self.settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reconciles the configured endpoints with `settings`' (a configuration reload), as at
    /// start ([`reconcile`]): new and changed ones are stored (a changed secret starts a
    /// rotation), removed ones disabled with their deliveries kept. Endpoints that are new, or
    /// whose definition changed, are resynced (their next delivery is a snapshot). Returns
    /// the ids of the endpoints whose definition or state changed.
    pub async fn reload_configured(
        &self,
        settings: &WebhookSettings,
    ) -> Result<Vec<String>, OutboxError> {
        let fresh = reconcile(settings, &*self.outbox, unix_ms(SystemTime::now())).await?;
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = settings.clone();
        let mut changed = Vec::new();
        for endpoint in fresh.all() {
            let current = self.registry.get(&endpoint.record.id);
            let redefined = current.as_ref().is_none_or(|c| c.record != endpoint.record);
            let disabled = current
                .as_ref()
                .is_some_and(|c| c.status.disabled.is_some() != endpoint.status.disabled.is_some());
            if !redefined && !disabled {
                continue;
            }
            changed.push(endpoint.record.id.clone());
            let endpoint = self.registry.put((*endpoint).clone());
            if redefined {
                // Owed in the outbox first: the dispatcher queues what the outbox says is owed.
                self.outbox
                    .owe_snapshot(endpoint.record.id.clone(), endpoint.record.streams.clone())
                    .await?;
                self.request_resync(&endpoint);
            }
        }
        // Views endpoints start or stop receiving, from the file as from the admin API.
        self.dispatchers.reconcile_views(&[]).await;
        Ok(changed)
    }

    /// Every endpoint, ordered by id.
    pub fn all(&self) -> Vec<Arc<Endpoint>> {
        self.registry.all()
    }

    /// One endpoint.
    pub fn get(&self, id: &str) -> Result<Arc<Endpoint>, AdminError> {
        self.registry
            .get(id)
            .ok_or_else(|| AdminError::NotFound(format!("no webhook endpoint {id:?}")))
    }

    /// Marks `id` as owed the current document of each of `streams` (kept in the outbox, so
    /// whichever node dispatches a stream queues it, even after a restart).
    async fn owe_snapshot(&self, id: &str, streams: &[String]) -> Result<(), AdminError> {
        Ok(self
            .outbox
            .owe_snapshot(id.to_owned(), streams.to_vec())
            .await?)
    }

    /// Asks the dispatchers of this node to queue what is owed now (in a cluster, the nodes
    /// holding the streams also find it on their own).
    fn request_resync(&self, endpoint: &Endpoint) {
        for stream in &endpoint.record.streams {
            if let Some(route) = self.resync.get(stream) {
                let _ = route.send(Resync::Owed);
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
        ssrf::check_target(&parsed, self.settings().allow_private_targets)
            .await
            .map_err(|e| AdminError::Invalid(format!("url: {e}")))?;
        Ok(parsed)
    }

    /// Reads `streams` as the configuration's endpoints are read ([`resolve_streams`]): each
    /// a configured stream's name, `stream@view` or `stream?filter`. Returns the names the
    /// deliveries are under (a view's `{stream}@{view}`) and each ad hoc view's filter.
    fn check_streams(&self, streams: &[String]) -> Result<Resolved, AdminError> {
        if streams.is_empty() {
            return Err(AdminError::Invalid(
                "streams: expected at least one stream name (GET /streams lists them)".into(),
            ));
        }
        let hub_streams = self.hub.all();
        let views: Vec<_> = hub_streams
            .iter()
            .map(|s| self.dispatchers.views().of(s.name()))
            .collect();
        let sources: Vec<BrokerSource<'_>> = hub_streams
            .iter()
            .zip(&views)
            .map(|(stream, views)| BrokerSource {
                name: stream.name(),
                views: views.as_deref().map(|v| v.settings()),
            })
            .collect();
        let (names, views, refused) = resolve_streams(streams, &sources);
        if let Some((j, expected)) = refused.into_iter().next() {
            return Err(AdminError::Invalid(format!("streams[{j}]: {expected}")));
        }
        Ok(Resolved {
            names,
            view_filters: views
                .into_iter()
                .filter_map(|v| Some((v.name, v.query?)))
                .collect(),
        })
    }

    fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), AdminError> {
        endpoint_headers(headers)
            .map_err(|(name, message)| AdminError::Invalid(format!("headers.{name}: {message}")))
    }

    fn check_description(description: &str) -> Result<(), AdminError> {
        endpoint_description(description)
            .map_err(|message| AdminError::Invalid(format!("description: {message}")))
    }

    fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), AdminError> {
        endpoint_metadata(metadata).map_err(|(key, message)| {
            AdminError::Invalid(match key {
                Some(key) => format!("metadata.{key:?}: {message}"),
                None => format!("metadata: {message}"),
            })
        })
    }

    fn check_events(events: &[String]) -> Result<Events, AdminError> {
        Events::parse(events).map_err(|error| {
            AdminError::Invalid(match error.at {
                Some(i) => format!("events[{i}]: {}", error.message),
                None => format!("events: {}", error.message),
            })
        })
    }

    fn check_rate_limit(rate_limit: u64) -> Result<u32, AdminError> {
        endpoint_rate_limit(rate_limit)
            .map_err(|message| AdminError::Invalid(format!("rate_limit: {message}")))
    }

    async fn store(
        &self,
        record: EndpointRecord,
        status: EndpointStatus,
    ) -> Result<Arc<Endpoint>, AdminError> {
        let mut endpoint = Endpoint::new(record.clone(), status)
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        let stored = self.outbox.put_endpoint(record).await?;
        if stored.revision >= endpoint.status.revision {
            endpoint.status = stored;
        }
        Ok(self.registry.put(endpoint))
    }

    /// Creates an endpoint; returns it with its secret (the only time the secret is shown).
    /// With an `Idempotency-Key`, a retry (on any node) answers the endpoint the first request
    /// made, and a different request with the same key is refused.
    pub async fn create(
        &self,
        input: NewEndpoint,
        idempotency: Option<Idempotency>,
    ) -> Result<CreatedEndpoint, AdminError> {
        let url = self.check_url(&input.url).await?;
        let streams = self.check_streams(&input.streams)?;
        Self::check_headers(&input.headers)?;
        if let Some(description) = &input.description {
            Self::check_description(description)?;
        }
        Self::check_metadata(&input.metadata)?;
        let rate_limit = input.rate_limit.map(Self::check_rate_limit).transpose()?;
        let events = match &input.events {
            Some(names) => Self::check_events(names)?,
            None => Events::default(),
        };
        let secret = match &input.secret {
            Some(text) => {
                Secret::parse(text).map_err(|e| AdminError::Invalid(format!("secret: {e}")))?
            }
            None => Secret::generate_for(
                input.signing.unwrap_or(Scheme::Symmetric),
                &mut *self.rng.lock().unwrap_or_else(|e| e.into_inner()),
            ),
        };
        if let Some(signing) = input.signing
            && signing != secret.scheme()
        {
            return Err(AdminError::Invalid(format!(
                "signing: {:?} does not match the secret given, which signs {:?} (whsec_: v1, \
                 whsk_: v1a); leave one of them out",
                signing.as_str(),
                secret.scheme().as_str()
            )));
        }
        let id = match &idempotency {
            Some(idempotency) => idempotent_id(&idempotency.key),
            None => endpoint_id(&mut *self.rng.lock().unwrap_or_else(|e| e.into_inner())),
        };
        let record = EndpointRecord {
            id,
            url: url.to_string(),
            streams: streams.names,
            mode: input.mode.unwrap_or(Mode::Patch),
            format: input.format.unwrap_or_default(),
            headers: input.headers,
            secret: secret.expose().to_owned(),
            previous_secret: None,
            previous_expires_ms: None,
            source: Source::Api,
            created_ms: unix_ms(SystemTime::now()),
            description: input.description,
            metadata: input.metadata,
            rate_limit,
            events,
            request_hash: idempotency.as_ref().map(|i| i.request_hash.clone()),
            view_filters: streams.view_filters,
        };
        let endpoint = Endpoint::new(record.clone(), EndpointStatus::default())
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        self.owe_snapshot(&record.id, &record.streams).await?;
        match self.outbox.create_endpoint(record.clone()).await? {
            Created::New(status) => {
                let mut endpoint = endpoint;
                endpoint.status = status;
                let endpoint = self.registry.put(endpoint);
                self.request_resync(&endpoint);
                self.dispatchers.reconcile_views(&[]).await;
                Ok(CreatedEndpoint {
                    endpoint,
                    secret: secret.expose().to_owned(),
                    replayed: false,
                })
            }
            Created::Existing(existing, status) => {
                let key = idempotency.map(|i| i.key).unwrap_or_default();
                if existing.request_hash != record.request_hash {
                    return Err(AdminError::Invalid(format!(
                        "Idempotency-Key {key:?} was used by another request (endpoint {:?}); \
                         use a new key for a new endpoint",
                        existing.id
                    )));
                }
                let secret = existing.secret.clone();
                let endpoint = Endpoint::new(*existing, status)
                    .map_err(|e| AdminError::Invalid(e.to_string()))?;
                Ok(CreatedEndpoint {
                    endpoint: self.registry.put(endpoint),
                    secret,
                    replayed: true,
                })
            }
        }
    }

    /// Changes an endpoint. Endpoints declared in the configuration can only be disabled and
    /// re-enabled here; the rest of their definition comes from the file.
    pub async fn update(
        &self,
        id: &str,
        changes: EndpointChanges,
    ) -> Result<Arc<Endpoint>, AdminError> {
        let current = self.get(id)?;
        let redefines = changes.url.is_some()
            || changes.streams.is_some()
            || changes.mode.is_some()
            || changes.format.is_some()
            || changes.headers.is_some()
            || changes.events.is_some();
        let describes = changes.description.is_some()
            || changes.metadata.is_some()
            || changes.rate_limit.is_some();
        if (redefines || describes) && current.record.source == Source::Config {
            return Err(AdminError::Conflict(format!(
                "endpoint {id:?} is declared in the configuration file; change it there (only \
                 \"disabled\" can be changed here)"
            )));
        }
        let mut record = current.record.clone();
        if let Some(url) = &changes.url {
            record.url = self.check_url(url).await?.to_string();
        }
        if let Some(streams) = &changes.streams {
            let streams = self.check_streams(streams)?;
            record.streams = streams.names;
            record.view_filters = streams.view_filters;
        }
        if let Some(mode) = changes.mode {
            record.mode = mode;
        }
        if let Some(events) = &changes.events {
            record.events = Self::check_events(events)?;
        }
        if let Some(format) = changes.format {
            record.format = format;
        }
        if let Some(headers) = changes.headers {
            Self::check_headers(&headers)?;
            record.headers = headers;
        }
        if let Some(description) = changes.description {
            if let Some(text) = &description {
                Self::check_description(text)?;
            }
            record.description = description;
        }
        if let Some(metadata) = changes.metadata {
            Self::check_metadata(&metadata)?;
            record.metadata = metadata;
        }
        if let Some(rate_limit) = changes.rate_limit {
            record.rate_limit = rate_limit.map(Self::check_rate_limit).transpose()?;
        }
        let mut status = current.status.clone();
        let mut enabled_now = false;
        let enabling = changes.disabled == Some(false) && status.disabled.is_some();
        if enabling || redefines {
            self.owe_snapshot(id, &record.streams).await?;
        }
        match changes.disabled {
            Some(true) if status.disabled.is_none() => {
                let disabled = Disabled {
                    at_ms: unix_ms(SystemTime::now()),
                    reason: "disabled through the admin API".into(),
                };
                let event = OperatorEvent::EndpointDisabled {
                    endpoint: id.to_owned(),
                    delivery: None,
                    reason: "disabled through the admin API".into(),
                };
                let note = self.note(&event, id, disabled.at_ms);
                status = self
                    .outbox
                    .set_disabled_noted(id.to_owned(), Some(disabled), note, None)
                    .await?
                    .ok_or_else(|| AdminError::NotFound(format!("no webhook endpoint {id:?}")))?;
                self.noted();
            }
            Some(false) if status.disabled.is_some() => {
                let event = OperatorEvent::EndpointRecovered {
                    endpoint: id.to_owned(),
                    delivery: None,
                    reason: "re-enabled through the admin API".into(),
                };
                let note = self.note(&event, id, unix_ms(SystemTime::now()));
                status = self
                    .outbox
                    .set_disabled_noted(id.to_owned(), None, note, None)
                    .await?
                    .ok_or_else(|| AdminError::NotFound(format!("no webhook endpoint {id:?}")))?;
                enabled_now = true;
                self.noted();
            }
            _ => {}
        }
        let endpoint = self.store(record, status).await?;
        if enabled_now || redefines {
            self.request_resync(&endpoint);
        }
        if changes.streams.is_some() || changes.disabled.is_some() {
            // Views it starts or stops receiving (or all of its views, disabled or back).
            self.dispatchers.reconcile_views(&[]).await;
        }
        Ok(endpoint)
    }

    /// Deletes an endpoint created through the API, with its deliveries.
    pub async fn delete(&self, id: &str) -> Result<(), AdminError> {
        let current = self.get(id)?;
        if current.record.source == Source::Config
            && self.settings().endpoints.iter().any(|e| e.id == id)
        {
            return Err(AdminError::Conflict(format!(
                "endpoint {id:?} is declared in the configuration file; remove it there"
            )));
        }
        self.outbox.delete_endpoint(id.to_owned()).await?;
        self.registry.remove(id);
        // The views only it received are released.
        self.dispatchers.reconcile_views(&[]).await;
        Ok(())
    }

    /// Rotates an endpoint's secret: the new one (given, or generated) signs from now on, and
    /// the old one also signs for `webhooks.rotation_overlap`. Returns the new secret.
    pub async fn rotate(&self, id: &str, secret: Option<String>) -> Result<String, AdminError> {
        let current = self.get(id)?;
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
            // The same scheme as the current one: receivers keep verifying the same way.
            None => Secret::generate_for(
                current.secret.scheme(),
                &mut *self.rng.lock().unwrap_or_else(|e| e.into_inner()),
            ),
        };
        let mut record = current.record.clone();
        record.previous_secret = Some(std::mem::replace(
            &mut record.secret,
            secret.expose().to_owned(),
        ));
        record.previous_expires_ms = Some(unix_ms(SystemTime::now()).saturating_add(
            u64::try_from(self.settings().rotation_overlap.as_millis()).unwrap_or(u64::MAX),
        ));
        self.store(record, current.status.clone()).await?;
        Ok(secret.expose().to_owned())
    }

    /// Sends a signed test delivery (`{"type": "webhook.test", ...}`, a new `webhook-id`,
    /// nothing queued or recorded) to an endpoint, disabled or not, and returns its message
    /// id and what the receiver answered.
    pub async fn test(&self, id: &str) -> Result<(String, Probe), AdminError> {
        let endpoint = self.get(id)?;
        let now = SystemTime::now();
        let msg_id = message_id(
            unix_ms(now),
            &mut *self.rng.lock().unwrap_or_else(|e| e.into_inner()),
        );
        let body = serde_json::json!({
            "type": "webhook.test",
            "endpoint": endpoint.record.id,
            "timestamp": crate::time::rfc3339(now),
            "data": {"message": "a test delivery from patchwire: no stream changed"},
        });
        let delivery = Delivery {
            id: 0,
            endpoint: endpoint.record.id.clone(),
            stream: String::new(),
            msg_id: msg_id.clone(),
            kind: super::body::DeliveryKind::SNAPSHOT,
            epoch: 0,
            seq: 0,
            base_seq: None,
            body: bytes::Bytes::from(body.to_string()),
            state: super::outbox::DeliveryState::Pending,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            last_status: None,
            created_ms: unix_ms(now),
            finished_ms: None,
        };
        let probe = self.tester.probe(&endpoint, &delivery).await;
        Ok((msg_id, probe))
    }

    /// An endpoint's deliveries, newest first.
    pub async fn deliveries(
        &self,
        id: &str,
        filter: DeliveryFilter,
    ) -> Result<Vec<Delivery>, AdminError> {
        self.get(id)?;
        Ok(self.outbox.deliveries(id.to_owned(), filter).await?)
    }

    /// An endpoint's attempt history, newest first.
    pub async fn attempts(
        &self,
        id: &str,
        filter: AttemptFilter,
    ) -> Result<Vec<AttemptEntry>, AdminError> {
        self.get(id)?;
        Ok(self.outbox.attempts(id.to_owned(), filter).await?)
    }

    /// Queues deliveries again; returns how many.
    pub async fn replay(&self, id: &str, which: Replay) -> Result<usize, AdminError> {
        self.get(id)?;
        let count = self
            .outbox
            .replay(id.to_owned(), which, unix_ms(SystemTime::now()))
            .await?;
        if count == 0
            && let Replay::One(delivery) = which
        {
            return Err(AdminError::NotFound(format!(
                "endpoint {id:?} has no finished delivery {delivery} (pending deliveries are \
                     already queued)"
            )));
        }
        self.wake.notify_one();
        Ok(count)
    }
}

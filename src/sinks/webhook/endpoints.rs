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

use super::body::{Format, Mode};
use super::config::{WebhookEndpointSettings, WebhookSettings, endpoint_headers};
use super::dispatcher::{Resync, ResyncRoutes};
use super::outbox::{
    Delivery, DeliveryFilter, Disabled, EndpointRecord, EndpointStatus, Outbox, OutboxError,
    Replay, Source,
};
use super::registry::{Endpoint, Registry};
use super::sign::Secret;
use crate::hub::Hub;
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
    /// New format.
    pub format: Option<Format>,
    /// New extra headers (replacing all).
    pub headers: Option<BTreeMap<String, String>>,
    /// `true` disables, `false` re-enables (and clears the failure streak).
    pub disabled: Option<bool>,
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
    }
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

/// The endpoints of the running sink, managed through the admin API: every change is written
/// to the outbox, then to the registry the dispatchers and the worker read.
pub struct Endpoints {
    outbox: Arc<dyn Outbox>,
    registry: Arc<Registry>,
    settings: WebhookSettings,
    hub: Arc<Hub>,
    resync: ResyncRoutes,
    wake: Arc<Notify>,
    rng: Mutex<StdRng>,
}

impl Endpoints {
    /// Manages the endpoints in `registry` (and `outbox`); `resync` reaches each stream's
    /// dispatcher and `wake` the worker.
    pub fn new(
        outbox: Arc<dyn Outbox>,
        registry: Arc<Registry>,
        settings: WebhookSettings,
        hub: Arc<Hub>,
        resync: ResyncRoutes,
        wake: Arc<Notify>,
    ) -> Self {
        Endpoints {
            outbox,
            registry,
            settings,
            hub,
            resync,
            wake,
            rng: Mutex::new(StdRng::from_os_rng()),
        }
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
            format: input.format.unwrap_or_default(),
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
        let current = self.get(id)?;
        let redefines = changes.url.is_some()
            || changes.streams.is_some()
            || changes.mode.is_some()
            || changes.format.is_some()
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
        if let Some(format) = changes.format {
            record.format = format;
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
        let current = self.get(id)?;
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
        self.get(id)?;
        Ok(self.outbox.deliveries(id.to_owned(), filter).await?)
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

//! The endpoints known to this process: their stored definition and status, with the parts a
//! delivery needs (URL, secrets, headers) parsed once.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use http::{HeaderMap, HeaderName, HeaderValue};
use url::Url;

use super::body::{Mode, NoticeKind};
use super::outbox::{EndpointRecord, EndpointStatus, Target};
use super::sign::Secret;

/// One endpoint, ready to deliver to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Its stored definition.
    pub record: EndpointRecord,
    /// Its status (disabled, failing since).
    pub status: EndpointStatus,
    /// The parsed target URL.
    pub url: Url,
    /// The current secret.
    pub secret: Secret,
    /// The previous secret, while a rotation overlaps.
    pub previous: Option<Secret>,
    /// Extra headers.
    pub headers: HeaderMap,
}

/// Why a stored endpoint cannot be used (a hand-edited or corrupted database).
#[derive(Debug, thiserror::Error)]
#[error("endpoint {id:?} is stored with an invalid {what}: {message}")]
pub struct InvalidEndpoint {
    /// The endpoint.
    pub id: String,
    /// Which part.
    pub what: &'static str,
    /// What is wrong.
    pub message: String,
}

impl Endpoint {
    /// Parses a stored endpoint.
    pub fn new(record: EndpointRecord, status: EndpointStatus) -> Result<Self, InvalidEndpoint> {
        let invalid = |what: &'static str, message: String| InvalidEndpoint {
            id: record.id.clone(),
            what,
            message,
        };
        let url = Url::parse(&record.url).map_err(|e| invalid("url", e.to_string()))?;
        let secret = Secret::parse_any_length(&record.secret)
            .map_err(|e| invalid("secret", e.to_string()))?;
        let previous = match &record.previous_secret {
            Some(text) => Some(
                Secret::parse_any_length(text)
                    .map_err(|e| invalid("previous secret", e.to_string()))?,
            ),
            None => None,
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &record.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| invalid("header name", e.to_string()))?;
            let mut value =
                HeaderValue::from_str(value).map_err(|e| invalid("header value", e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(Endpoint {
            record,
            status,
            url,
            secret,
            previous,
            headers,
        })
    }

    /// The secrets to sign with at `now_ms`: the current one, and the previous one while the
    /// rotation overlap lasts.
    pub fn signing_secrets(&self, now_ms: u64) -> Vec<&Secret> {
        let mut secrets = vec![&self.secret];
        if let (Some(previous), Some(until)) = (&self.previous, self.record.previous_expires_ms)
            && now_ms < until
        {
            secrets.push(previous);
        }
        secrets
    }

    /// Whether it receives deliveries now.
    pub fn enabled(&self) -> bool {
        self.status.disabled.is_none()
    }

    /// Whether it subscribes to `stream`.
    pub fn wants(&self, stream: &str) -> bool {
        self.record.streams.iter().any(|s| s == stream)
    }

    /// How it receives changes: its mode, unless its `events` leave patches out (then every
    /// change whole).
    pub fn mode(&self) -> Mode {
        self.record.events.mode(self.record.mode)
    }
}

/// Every endpoint, by id.
#[derive(Debug, Default)]
pub struct Registry {
    endpoints: RwLock<BTreeMap<String, Arc<Endpoint>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The endpoint with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every endpoint, ordered by id.
    pub fn all(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Adds or replaces an endpoint. Its status is kept from the copy already held when that
    /// one is newer (a higher revision): an admin change read the status before awaiting the
    /// outbox, and the worker may have recorded a newer one meanwhile.
    pub fn put(&self, mut endpoint: Endpoint) -> Arc<Endpoint> {
        let mut endpoints = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = endpoints.get(&endpoint.record.id)
            && current.status.revision > endpoint.status.revision
        {
            endpoint.status = current.status.clone();
        }
        let endpoint = Arc::new(endpoint);
        endpoints.insert(endpoint.record.id.clone(), endpoint.clone());
        endpoint
    }

    /// Sets an endpoint's status as the outbox returned it, unless a newer one is held (the
    /// outbox answers concurrent callers in its order, but they apply them in theirs).
    pub fn set_status(&self, id: &str, status: EndpointStatus) {
        let mut endpoints = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = endpoints.get_mut(id)
            && status.revision > current.status.revision
        {
            Arc::make_mut(current).status = status;
        }
    }

    /// Brings the registry in line with every endpoint the outbox holds (another node may
    /// have created, changed or deleted some): each is put as [`Self::put`] does, keeping the
    /// newer status, and endpoints the outbox no longer has are removed.
    pub fn replace_all(&self, stored: Vec<(EndpointRecord, EndpointStatus)>) {
        let mut ids = std::collections::HashSet::new();
        for (record, status) in stored {
            ids.insert(record.id.clone());
            let unchanged = self.get(&record.id).is_some_and(|held| {
                held.record == record && held.status.revision >= status.revision
            });
            if unchanged {
                continue;
            }
            match Endpoint::new(record, status) {
                Ok(endpoint) => {
                    self.put(endpoint);
                }
                Err(error) => tracing::error!(%error, "skipping a stored webhook endpoint"),
            }
        }
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| ids.contains(id));
    }

    /// Removes an endpoint.
    pub fn remove(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
    }

    /// The enabled endpoints subscribed to `stream` whose `events` list `kind`'s deliveries.
    pub fn notice_targets(&self, stream: &str, kind: NoticeKind) -> Vec<String> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.enabled() && e.wants(stream) && e.record.events.wants(kind))
            .map(|e| e.record.id.clone())
            .collect()
    }

    /// The enabled endpoints subscribed to `stream` that receive its changes, as outbox
    /// targets.
    pub fn targets(&self, stream: &str) -> Vec<Target> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.enabled() && e.wants(stream) && e.record.events.changes())
            .map(|e| Target {
                endpoint: e.record.id.clone(),
                mode: e.mode(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::webhook::body::Format;
    use crate::sinks::webhook::outbox::{Disabled, Source};

    fn endpoint(status: EndpointStatus) -> Endpoint {
        Endpoint::new(
            EndpointRecord {
                id: "e".into(),
                url: "https://hooks.example.com/x".into(),
                streams: vec!["s".into()],
                mode: Mode::Patch,
                format: Format::Json,
                headers: BTreeMap::new(),
                secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                previous_secret: None,
                previous_expires_ms: None,
                source: Source::Api,
                created_ms: 0,
                description: None,
                metadata: Default::default(),
                rate_limit: None,
                events: Default::default(),
                request_hash: None,
                view_filters: Default::default(),
            },
            status,
        )
        .unwrap()
    }

    fn disabled(revision: u64) -> EndpointStatus {
        EndpointStatus {
            disabled: Some(Disabled {
                at_ms: 1,
                reason: "every attempt failed".into(),
            }),
            failing_since_ms: Some(1),
            revision,
        }
    }

    /// The admin/worker race: an admin change read the status (revision 1), the worker then
    /// disabled the endpoint (revision 2), and the admin change lands last. The newer status
    /// wins whichever is applied last.
    #[test]
    fn a_stale_status_never_overwrites_a_newer_one() {
        let registry = Registry::new();
        let read_by_admin = EndpointStatus {
            revision: 1,
            ..EndpointStatus::default()
        };
        registry.put(endpoint(read_by_admin.clone()));
        registry.set_status("e", disabled(2));
        // The admin's redefinition, built from the status it read.
        let stored = registry.put(endpoint(read_by_admin.clone()));
        assert_eq!(stored.status, disabled(2));
        assert!(!registry.get("e").unwrap().enabled());
        // A status the outbox returned earlier, applied late, is ignored too.
        registry.set_status("e", read_by_admin);
        assert_eq!(registry.get("e").unwrap().status, disabled(2));
        // A newer one (re-enabled) applies.
        let enabled = EndpointStatus {
            revision: 3,
            ..EndpointStatus::default()
        };
        registry.set_status("e", enabled.clone());
        assert_eq!(registry.get("e").unwrap().status, enabled);
    }
}

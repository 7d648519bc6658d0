//! Application tokens and their limits: who may open dynamic streams, how many at once, how
//! fast, to which hosts, and how often their streams may poll.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::gauge::Gauge;
use sha2::{Digest, Sha256};

use super::Refusal;
use crate::config::{HostPattern, ProxySettings, ProxyToken};
use crate::metrics::{Metrics, TokenLabels};

/// The configured tokens, looked up by a hash of the presented token (so lookups do not
/// compare secrets byte by byte).
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Arc<Token>>,
}

/// One token's settings and live state.
pub struct Token {
    /// The token's settings.
    pub settings: ProxyToken,
    open: AtomicUsize,
    new_connections: DefaultDirectRateLimiter,
    gauge: Gauge,
}

/// An admitted connection: holds one of its token's connection slots until dropped.
pub struct Admission {
    token: Arc<Token>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.token.open.fetch_sub(1, Ordering::AcqRel);
        self.token.gauge.dec();
    }
}

impl Admission {
    /// The admitted token.
    pub fn token(&self) -> &Token {
        &self.token
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// The tokens of `settings`.
    pub fn new(settings: &ProxySettings, metrics: &Metrics) -> Tokens {
        let by_digest = settings
            .tokens
            .iter()
            .map(|t| {
                let quota =
                    Quota::per_second(t.connections_per_second).allow_burst(t.connections_burst);
                let gauge = metrics
                    .proxy_connections
                    .get_or_create(&TokenLabels {
                        token: t.name.clone(),
                    })
                    .clone();
                let token = Token {
                    settings: t.clone(),
                    open: AtomicUsize::new(0),
                    new_connections: RateLimiter::direct(quota),
                    gauge,
                };
                (digest(&t.token), Arc::new(token))
            })
            .collect();
        Tokens { by_digest }
    }

    /// Admits a new connection presenting `token`: the token must exist, be under its
    /// connection limit and its rate of new connections.
    pub fn admit(&self, token: Option<&str>) -> Result<Admission, Refusal> {
        let token = token.ok_or(Refusal::TokenMissing)?;
        let token = self
            .by_digest
            .get(&digest(token))
            .ok_or(Refusal::TokenUnknown)?;
        let max = token.settings.max_connections;
        token
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .map_err(|_| Refusal::TooManyConnections {
                token: token.settings.name.clone(),
                max,
            })?;
        token.gauge.inc();
        // From here on the slot is released by the admission's drop, whatever happens.
        let admission = Admission {
            token: token.clone(),
        };
        if token.new_connections.check().is_err() {
            return Err(Refusal::RateLimited {
                token: token.settings.name.clone(),
                per_second: token.settings.connections_per_second.get(),
            });
        }
        Ok(admission)
    }
}

impl Token {
    /// Whether this token may stream from `host` (both the proxy's and its own allowlist).
    pub fn allows(&self, allowed: &[HostPattern], host: &str) -> bool {
        allowed.iter().any(|p| p.matches(host))
            && self
                .settings
                .allowed_hosts
                .as_ref()
                .is_none_or(|own| own.iter().any(|p| p.matches(host)))
    }

    /// The poll period this token's subscription asks for on `host`: its own override, else the
    /// host's, else the default; never below the global floor nor the token's own.
    pub fn period(&self, settings: &ProxySettings, host: &str) -> Duration {
        let wanted = self.settings.interval.unwrap_or_else(|| {
            settings
                .host_intervals
                .iter()
                .find(|(pattern, _)| pattern.matches(host))
                .map_or(settings.interval, |(_, interval)| *interval)
        });
        wanted
            .max(settings.min_interval)
            .max(self.settings.min_interval)
    }
}

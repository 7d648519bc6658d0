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
use super::config::{HostPattern, ProxySettings, ProxyToken};
use crate::cluster::tokens::{SharedAdmission, SharedTokens, TokenRefusal};
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

/// An admitted connection: holds one of its token's connection slots until dropped (and, in
/// a cluster, its place in the cluster-wide count).
pub struct Admission {
    token: Arc<Token>,
    shared: Option<SharedAdmission>,
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

    /// Also counts this connection in the cluster, under the token's limits there.
    pub async fn share(mut self, tokens: &Arc<SharedTokens>) -> Result<Self, Refusal> {
        let settings = &self.token.settings;
        let digest: String = digest(&settings.token)[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        match tokens
            .admit(
                &digest,
                settings.max_connections as u64,
                settings.connections_per_second.get(),
                settings.connections_burst.get(),
            )
            .await
        {
            Ok(shared) => {
                self.shared = shared;
                Ok(self)
            }
            Err(TokenRefusal::TooManyConnections) => Err(Refusal::TooManyConnections {
                token: settings.name.clone(),
                max: settings.max_connections,
            }),
            Err(TokenRefusal::RateLimited) => Err(Refusal::RateLimited {
                token: settings.name.clone(),
                per_second: settings.connections_per_second.get(),
            }),
        }
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
        let token = self.find(token)?;
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
            shared: None,
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

impl Tokens {
    /// The configured token `token` names, without admitting a connection.
    pub fn find(&self, token: Option<&str>) -> Result<&Arc<Token>, Refusal> {
        let token = token.ok_or(Refusal::TokenMissing)?;
        self.by_digest
            .get(&digest(token))
            .ok_or(Refusal::TokenUnknown)
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

    /// The poll period this token's subscription to `host` asks for, or the refusal when the
    /// token may not stream from `host` at all.
    pub fn period_for(&self, settings: &ProxySettings, host: &str) -> Result<Duration, Refusal> {
        if self.allows(&settings.allowed_hosts, host) {
            Ok(self.period(settings, host))
        } else {
            Err(Refusal::HostNotAllowed {
                host: host.to_owned(),
            })
        }
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

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::diff::DiffOptions;

    fn token(name: &str, secret: &str) -> ProxyToken {
        ProxyToken {
            name: name.into(),
            token: secret.into(),
            max_connections: 2,
            connections_per_second: NonZeroU32::new(1000).unwrap(),
            connections_burst: NonZeroU32::new(1000).unwrap(),
            allowed_hosts: None,
            interval: None,
            min_interval: Duration::ZERO,
            signing_key: None,
            require_signature: false,
        }
    }

    fn settings() -> ProxySettings {
        ProxySettings {
            allowed_hosts: vec![
                HostPattern::parse("*.example.com").unwrap(),
                HostPattern::parse("api.test").unwrap(),
            ],
            allow_private: false,
            interval: Duration::from_secs(5),
            host_intervals: vec![
                (
                    HostPattern::parse("slow.example.com").unwrap(),
                    Duration::from_secs(30),
                ),
                (
                    HostPattern::parse("*.example.com").unwrap(),
                    Duration::from_secs(2),
                ),
            ],
            min_interval: Duration::from_secs(1),
            linger: Duration::from_secs(30),
            keepalive: Duration::from_secs(10),
            max_streams: 10,
            max_memory: 1 << 20,
            max_views_per_stream: 1000,
            view_linger: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            max_body_bytes: 1 << 20,
            history: 8,
            history_bytes: 1 << 20,
            diff: DiffOptions::default(),
            tokens: vec![
                token("a", "aaaaaaaaaaaaaaaa"),
                token("b", "bbbbbbbbbbbbbbbb"),
            ],
            ascii_only: true,
            signature_max_skew: Duration::from_secs(300),
        }
    }

    #[test]
    fn tokens_are_found_by_value_and_limited_in_connections() {
        let tokens = Tokens::new(&settings(), &Metrics::new());
        assert!(matches!(tokens.admit(None), Err(Refusal::TokenMissing)));
        assert!(matches!(
            tokens.admit(Some("nope")),
            Err(Refusal::TokenUnknown)
        ));
        let first = tokens.admit(Some("aaaaaaaaaaaaaaaa")).unwrap();
        assert_eq!(first.token().settings.name, "a");
        let second = tokens.admit(Some("aaaaaaaaaaaaaaaa")).unwrap();
        assert!(matches!(
            tokens.admit(Some("aaaaaaaaaaaaaaaa")),
            Err(Refusal::TooManyConnections { max: 2, .. })
        ));
        // Another token has its own slots.
        assert!(tokens.admit(Some("bbbbbbbbbbbbbbbb")).is_ok());
        drop(first);
        assert!(tokens.admit(Some("aaaaaaaaaaaaaaaa")).is_ok());
        drop(second);
    }

    #[test]
    fn a_rate_limited_admission_gives_its_slot_back() {
        let mut settings = settings();
        settings.tokens[0].connections_per_second = NonZeroU32::new(1).unwrap();
        settings.tokens[0].connections_burst = NonZeroU32::new(1).unwrap();
        let tokens = Tokens::new(&settings, &Metrics::new());
        let held = tokens.admit(Some("aaaaaaaaaaaaaaaa")).unwrap();
        assert!(matches!(
            tokens.admit(Some("aaaaaaaaaaaaaaaa")),
            Err(Refusal::RateLimited { per_second: 1, .. })
        ));
        let token = held.token();
        assert_eq!(token.open.load(Ordering::Acquire), 1);
    }

    #[test]
    fn hosts_must_be_allowed_by_the_proxy_and_the_token() {
        let mut settings = settings();
        settings.tokens[1].allowed_hosts = Some(vec![HostPattern::parse("api.test").unwrap()]);
        let tokens = Tokens::new(&settings, &Metrics::new());
        let a = tokens.admit(Some("aaaaaaaaaaaaaaaa")).unwrap();
        let b = tokens.admit(Some("bbbbbbbbbbbbbbbb")).unwrap();
        assert!(a.token().allows(&settings.allowed_hosts, "x.example.com"));
        assert!(a.token().allows(&settings.allowed_hosts, "api.test"));
        assert!(!a.token().allows(&settings.allowed_hosts, "evil.test"));
        assert!(b.token().allows(&settings.allowed_hosts, "api.test"));
        assert!(!b.token().allows(&settings.allowed_hosts, "x.example.com"));
    }

    #[test]
    fn poll_periods_take_the_token_then_the_host_then_the_default_above_the_floors() {
        let mut settings = settings();
        settings.tokens[1].interval = Some(Duration::from_millis(100));
        settings.tokens[1].min_interval = Duration::from_secs(3);
        let tokens = Tokens::new(&settings, &Metrics::new());
        let a = tokens.admit(Some("aaaaaaaaaaaaaaaa")).unwrap();
        let b = tokens.admit(Some("bbbbbbbbbbbbbbbb")).unwrap();
        let period = |admission: &Admission, host| admission.token().period(&settings, host);
        assert_eq!(
            period(&a, "api.test"),
            Duration::from_secs(5),
            "the default"
        );
        assert_eq!(
            period(&a, "x.example.com"),
            Duration::from_secs(2),
            "the host's"
        );
        assert_eq!(
            period(&a, "slow.example.com"),
            Duration::from_secs(30),
            "first match"
        );
        // The token's own period wins, but not below its floor.
        assert_eq!(period(&b, "slow.example.com"), Duration::from_secs(3));
        settings.tokens[1].min_interval = Duration::ZERO;
        let tokens = Tokens::new(&settings, &Metrics::new());
        let b = tokens.admit(Some("bbbbbbbbbbbbbbbb")).unwrap();
        assert_eq!(
            b.token().period(&settings, "api.test"),
            Duration::from_secs(1),
            "never below the global floor"
        );
    }
}

//! The validated configuration: what the application is built from.
//!
//! Values here have passed validation (see `validate`); building running parts from them
//! cannot fail on account of the configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderValue;
use url::Url;

use crate::diff::DiffOptions;
use crate::sim::SimulatorSettings;
use crate::upstream::config::{StreamSettings, UpstreamSettings};

/// A complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was loaded from, if any.
    pub source: Option<PathBuf>,
    /// The HTTP server that subscribers connect to.
    pub server: ServerSettings,
    /// Logging.
    pub log: LogSettings,
    /// Settings shared by every upstream poller.
    pub upstream: UpstreamSettings,
    /// The built-in simulated feed server, when enabled.
    pub simulator: Option<SimulatorSettings>,
    /// The polled streams, in file order; names are unique across polled and push streams.
    pub streams: Vec<StreamSettings>,
    /// The push source's settings, present when push streams exist.
    pub push: Option<PushSettings>,
    /// Streams fed by publishers (`source = "push"`), in file order.
    pub push_streams: Vec<PushStreamSettings>,
    /// Webhook delivery, when `[webhooks]` is present.
    pub webhooks: Option<WebhookSettings>,
    /// The Streamdata.io-compatible proxy mode (`GET /{target URL}`), when `[proxy]` is present
    /// with `enabled = true`; `None` means dynamic streams are refused.
    pub proxy: Option<ProxySettings>,
}

/// Dynamic streams: any allowed upstream URL streamed on demand, for clients holding a token.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Upstream hosts that may be streamed (at least one).
    pub allowed_hosts: Vec<HostPattern>,
    /// Whether upstreams may resolve to private, loopback, link-local or metadata addresses.
    pub allow_private: bool,
    /// Poll period of a dynamic stream when no host or token override applies.
    pub interval: Duration,
    /// Per-host poll periods, overriding `interval` (first matching pattern wins).
    pub host_intervals: Vec<(HostPattern, Duration)>,
    /// No dynamic stream is polled more often than this, whatever the overrides say.
    pub min_interval: Duration,
    /// How long a dynamic stream keeps polling after its last subscriber left.
    pub linger: Duration,
    /// Interval between keep-alive comments on dynamic streams.
    pub keepalive: Duration,
    /// Most dynamic streams alive at once.
    pub max_streams: usize,
    /// Most snapshot bytes held by dynamic streams together.
    pub max_memory: u64,
    /// Timeout of one upstream request.
    pub timeout: Duration,
    /// Largest upstream body accepted, in bytes.
    pub max_body_bytes: u64,
    /// Recent changes kept per dynamic stream for resuming subscribers.
    pub history: usize,
    /// Most bytes one dynamic stream's history holds.
    pub history_bytes: u64,
    /// How dynamic streams compute changes (`move` is never emitted: Streamdata.io clients
    /// apply only `add`, `remove` and `replace`).
    pub diff: DiffOptions,
    /// The application tokens clients present (`X-Sd-Token`); at least one.
    pub tokens: Vec<ProxyToken>,
    /// Whether Streamdata.io events escape every non-ASCII character as `\uXXXX`.
    pub ascii_only: bool,
    /// How far a signature's timestamp may be from the server's clock, either way.
    pub signature_max_skew: Duration,
}

/// The application's private key of the Streamdata.io signature strategy: base64 of 72
/// characters, the first 36 a "beacon" prefixed to every signature, the last 36 the HMAC key
/// (as `streamdataio-js-sdk-auth` splits it).
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    /// The first 36 characters of the decoded key.
    pub beacon: String,
    /// The last 36: the HMAC-SHA512 key.
    pub key: String,
}

impl SigningKey {
    /// Length of the decoded private key, in characters.
    pub const DECODED_CHARS: usize = 72;

    /// Parses the private key as the SDK does; a reason (never echoing the key) on error.
    pub fn parse(private_key: &str) -> Result<SigningKey, String> {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(private_key.trim())
            .map_err(|_| "expected the application's private key in base64".to_owned())?;
        let text = String::from_utf8(decoded)
            .map_err(|_| "expected a private key that decodes to text".to_owned())?;
        if text.chars().count() != Self::DECODED_CHARS {
            return Err(format!(
                "expected a private key that decodes to {} characters (the SDK signs nothing \
                 with any other key), got {}",
                Self::DECODED_CHARS,
                text.chars().count()
            ));
        }
        let split = text
            .char_indices()
            .nth(Self::DECODED_CHARS / 2)
            .map_or(text.len(), |(i, _)| i);
        Ok(SigningKey {
            beacon: text[..split].to_owned(),
            key: text[split..].to_owned(),
        })
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// An allowed upstream host: exactly `api.example.com`, or `*.example.com` for any name under
/// `example.com` (not `example.com` itself). Lowercase; IP literals are exact hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// This host only.
    Exact(String),
    /// Any host ending in this suffix, which starts with a dot (`.example.com`).
    Subdomains(String),
}

impl HostPattern {
    /// Parses `api.example.com`, `*.example.com`, `127.0.0.1` or `[::1]`; the reason on error.
    ///
    /// The host is kept in the form `url::Url::host_str` gives (IDNA to punycode, IP addresses
    /// normalized: `[0:0::1]` is `[::1]`, `0x7f.1` is `127.0.0.1`), so that `matches` compares
    /// like with like. A wildcard covers names only, never an IP address.
    pub fn parse(pattern: &str) -> Result<HostPattern, String> {
        let expected = |why: &str| {
            format!(
                "expected a host name such as \"api.example.com\", a pattern such as \
                 \"*.example.com\", or an IP address, got {pattern:?}{why}"
            )
        };
        let lower = pattern.trim().to_ascii_lowercase();
        let (wildcard, host) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        // Schemes, ports, paths and user info are not part of a host; `:` only inside `[...]`.
        if host.is_empty()
            || host.contains(['*', '/', '@', '?', '#', '\\'])
            || (host.contains(':') && !host.starts_with('['))
        {
            return Err(expected(""));
        }
        let parsed = url::Host::parse(host).map_err(|_| expected(""))?;
        let canonical = parsed.to_string();
        match parsed {
            url::Host::Domain(domain) if domain.split('.').any(str::is_empty) => {
                Err(expected(" (empty label)"))
            }
            url::Host::Domain(_) if wildcard => {
                Ok(HostPattern::Subdomains(format!(".{canonical}")))
            }
            url::Host::Domain(_) => Ok(HostPattern::Exact(canonical)),
            _ if wildcard => Err(expected(
                " (a wildcard covers host names, not IP addresses)",
            )),
            _ => Ok(HostPattern::Exact(canonical)),
        }
    }

    /// Whether `host` (as `url::Url::host_str` gives it: lowercase, IPv6 in brackets) matches.
    pub fn matches(&self, host: &str) -> bool {
        // `api.example.com.` (fully qualified) is the same host as `api.example.com`.
        let host = host.strip_suffix('.').unwrap_or(host);
        match self {
            HostPattern::Exact(exact) => host.eq_ignore_ascii_case(exact),
            HostPattern::Subdomains(suffix) => {
                host.len() > suffix.len()
                    && host
                        .get(host.len() - suffix.len()..)
                        .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
            }
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(host) => f.write_str(host),
            HostPattern::Subdomains(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// One application token and its limits.
#[derive(Clone)]
pub struct ProxyToken {
    /// A name for logs and metrics (the token itself is never shown).
    pub name: String,
    /// The secret clients send as `X-Sd-Token`.
    pub token: String,
    /// Most connections open at once with this token.
    pub max_connections: usize,
    /// New connections accepted per second with this token, sustained.
    pub connections_per_second: NonZeroU32,
    /// New connections accepted at once after a quiet period.
    pub connections_burst: NonZeroU32,
    /// Hosts this token may stream; `None`: every host of `proxy.allowed_hosts`. A host must
    /// match both lists.
    pub allowed_hosts: Option<Vec<HostPattern>>,
    /// The poll period this token's streams ask for, overriding the host and default periods.
    pub interval: Option<Duration>,
    /// This token's streams are never polled more often than this (on top of the global floor).
    pub min_interval: Duration,
    /// The key that verifies this token's signed requests (`signing_secret`).
    pub signing_key: Option<SigningKey>,
    /// Whether this token's requests must be signed.
    pub require_signature: bool,
}

impl std::fmt::Debug for ProxyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyToken")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .field("connections_per_second", &self.connections_per_second)
            .field("connections_burst", &self.connections_burst)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("interval", &self.interval)
            .field("min_interval", &self.min_interval)
            .field("signing_key", &self.signing_key)
            .field("require_signature", &self.require_signature)
            .finish()
    }
}

/// Authentication and limits of the push source.
#[derive(Clone)]
pub struct PushSettings {
    /// The bearer token publishers must send.
    pub token: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: u64,
}

impl std::fmt::Debug for PushSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushSettings")
            .field("token", &"<redacted>")
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

/// A stream whose documents are pushed by publishers rather than polled.
#[derive(Debug, Clone)]
pub struct PushStreamSettings {
    /// Unique name; served at `/streams/{name}`, fed at the same path by `POST`/`PATCH`.
    pub name: String,
    /// How many recent changes are kept for resuming subscribers.
    pub history: usize,
    /// Most bytes those changes may hold together.
    pub history_bytes: u64,
    /// How changes are computed.
    pub diff: DiffOptions,
}

/// Webhook delivery: the outbox, the retry policy, the admin API and configured endpoints.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The SQLite outbox file.
    pub database: PathBuf,
    /// Whether targets may resolve to private, loopback, link-local or metadata addresses.
    pub allow_private_targets: bool,
    /// The admin API's bearer token; `None` disables the admin API.
    pub admin_token: Option<AdminToken>,
    /// When failed deliveries are tried again.
    pub schedule: crate::sinks::webhook::schedule::RetrySchedule,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// An endpoint failing continuously this long is disabled.
    pub disable_after: Duration,
    /// Attempts in flight at once to one endpoint.
    pub max_concurrency_per_endpoint: usize,
    /// Attempts in flight at once overall.
    pub workers: usize,
    /// Pending deliveries per (endpoint, stream) above which they collapse into a snapshot.
    pub backlog_limit: usize,
    /// How long finished deliveries are kept.
    pub retention: Duration,
    /// How long a rotated-out secret still signs.
    pub rotation_overlap: Duration,
    /// Endpoints declared in the configuration.
    pub endpoints: Vec<WebhookEndpointSettings>,
}

/// The admin API's bearer token; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<hidden>)")
    }
}

/// One endpoint declared in the configuration.
#[derive(Debug, Clone)]
pub struct WebhookEndpointSettings {
    /// Unique, stable id.
    pub id: String,
    /// The target URL.
    pub url: Url,
    /// The streams it receives (all configured).
    pub streams: Vec<String>,
    /// Patches or whole documents.
    pub mode: crate::sinks::webhook::body::Mode,
    /// Extra headers, `${VAR}` resolved.
    pub headers: BTreeMap<String, String>,
    /// The signing secret.
    pub secret: crate::sinks::webhook::sign::Secret,
}

/// The subscriber-facing HTTP server.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Interval between SSE keep-alive comments.
    pub keepalive: Duration,
    /// The `retry:` hint sent to SSE clients (how long they wait before reconnecting).
    pub retry_hint: Duration,
    /// Events a subscriber may fall behind before it is resynced.
    pub subscriber_buffer: usize,
    /// How long a subscriber's socket may refuse writes before the connection is closed.
    pub stall_timeout: Duration,
    /// How long shutdown waits for connections to finish.
    pub shutdown_grace: Duration,
    /// How long a new connection may take to send its first request (head or HTTP/2 preface
    /// and first stream) before it is closed.
    pub header_timeout: Duration,
    /// How long a connection with no request in flight stays open.
    pub idle_timeout: Duration,
    /// How long a request body may take to arrive in full (answered 408 past it).
    pub body_timeout: Duration,
    /// Open connections past which new ones are refused (HTTP/1 503, then closed).
    pub max_connections: usize,
    /// Cross-origin access for browsers.
    pub cors: Cors,
}

/// Which browser origins may read the streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers are sent.
    Disabled,
    /// `Access-Control-Allow-Origin: *`.
    AnyOrigin,
    /// Only these origins.
    Origins(Vec<HeaderValue>),
}

/// Log output.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Line format.
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info,patchwire=debug`.
    pub filter: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use super::HostPattern;

    fn parse(pattern: &str) -> HostPattern {
        HostPattern::parse(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"))
    }

    #[test]
    fn exact_hosts_match_case_insensitively_and_only_themselves() {
        let p = parse("API.Example.com");
        assert_eq!(p, HostPattern::Exact("api.example.com".to_owned()));
        assert_eq!(p.to_string(), "api.example.com");
        assert!(p.matches("api.example.com"));
        assert!(p.matches("API.EXAMPLE.COM"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("x.api.example.com"));
        assert!(!p.matches("api.example.com.evil.net"));
        assert!(
            p.matches("api.example.com."),
            "a fully qualified name is the same host"
        );
        assert!(!p.matches("api.example.com.."));
    }

    #[test]
    fn wildcards_match_names_under_the_domain_only() {
        let p = parse("*.example.com");
        assert_eq!(p, HostPattern::Subdomains(".example.com".to_owned()));
        assert_eq!(p.to_string(), "*.example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("b.a.example.com"));
        assert!(p.matches("A.Example.COM"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
        assert!(!p.matches(".example.com"));
        assert!(!p.matches("example.com.evil.net"));
        assert!(p.matches("a.example.com."));
        assert!(!p.matches("example.com."));
    }

    #[test]
    fn ip_literals_are_exact_and_normalized() {
        let v4 = parse("127.0.0.1");
        assert_eq!(v4, HostPattern::Exact("127.0.0.1".to_owned()));
        assert!(v4.matches("127.0.0.1"));
        assert!(!v4.matches("127.0.0.2"));
        let v6 = parse("[::1]");
        assert_eq!(v6.to_string(), "[::1]");
        assert!(v6.matches("[::1]"));
        // Written differently, the same addresses `Url::host_str` reports.
        assert_eq!(parse("[0:0:0:0:0:0:0:1]"), v6);
        assert_eq!(parse("0x7f.0.0.1"), v4);
        let url = url::Url::parse("http://[0::1]:8080/x").unwrap();
        assert!(v6.matches(url.host_str().unwrap()));
    }

    #[test]
    fn international_names_are_kept_as_punycode() {
        let p = parse("*.bücher.example");
        let url = url::Url::parse("https://shop.bücher.example/").unwrap();
        assert!(p.matches(url.host_str().unwrap()), "{p}");
    }

    #[test]
    fn refuses_what_is_not_a_host() {
        for bad in [
            "",
            " ",
            "*",
            "*.",
            "**.x",
            "*.*.x",
            "a.*.x",
            "http://x",
            "a/b",
            "x:80",
            "[::1]:80",
            "::1",
            "user@x",
            "x?y",
            "a..b",
            ".x",
            "x.",
            "*.127.0.0.1",
            "*.[::1]",
            "a b",
        ] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        let err = HostPattern::parse("x:80").unwrap_err();
        assert!(
            err.contains("\"x:80\"") && err.contains("api.example.com"),
            "{err}"
        );
    }
}

//! The `[proxy]` section: its shape as written (serde, unknown keys rejected), its defaults and
//! bounds, its pure validation (host patterns, durations and limits within bounds, tokens that
//! are long, unique and never shown, token host lists inside the global allowlist), and the
//! settings the proxy mode is built from.

use std::collections::HashMap;
use std::time::Duration;

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::diff::{DiffConfig, DiffOptions};
use crate::validation::{
    InterpolateError, NAME_EXPECTED, Problems, bytes_in, duration_in, integer_in, interpolate,
    is_valid_name, nonzero_u32, usize_of,
};

/// Built-in defaults of `[proxy]`.
pub mod defaults {
    use std::time::Duration;

    /// `proxy.enabled`.
    pub const ENABLED: bool = false;
    /// `proxy.allow_private`.
    pub const ALLOW_PRIVATE: bool = false;
    /// `proxy.interval`.
    pub const INTERVAL: Duration = Duration::from_secs(5);
    /// `proxy.min_interval`.
    pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
    /// `proxy.linger`.
    pub const LINGER: Duration = Duration::from_secs(30);
    /// `proxy.keepalive`.
    pub const KEEPALIVE: Duration = Duration::from_secs(10);
    /// `proxy.timeout`.
    pub const TIMEOUT: Duration = Duration::from_secs(10);
    /// `proxy.max_streams`.
    pub const MAX_STREAMS: u64 = 1000;
    /// `proxy.max_memory`, in bytes.
    pub const MAX_MEMORY: u64 = 256 * 1024 * 1024;
    /// `proxy.max_views_per_stream`: as a configured stream's `streams.filtering.max_views`.
    pub const MAX_VIEWS_PER_STREAM: u64 = crate::views::config::defaults::MAX_VIEWS;
    /// `proxy.view_linger`, at most: the default is this or `proxy.linger`, the smaller.
    pub const VIEW_LINGER: Duration = crate::views::config::defaults::LINGER;
    /// `proxy.max_body`, in bytes.
    pub const MAX_BODY: u64 = 8 * 1024 * 1024;
    /// `proxy.history`.
    pub const HISTORY: u64 = 64;
    /// `proxy.history_bytes`, in bytes.
    pub const HISTORY_BYTES: u64 = 1024 * 1024;
    /// `proxy.tokens[].max_connections`.
    pub const MAX_CONNECTIONS: u64 = 100;
    /// `proxy.tokens[].connections_per_second` (and the default burst).
    pub const CONNECTIONS_PER_SECOND: u64 = 10;
    /// `proxy.tokens[].min_interval`.
    pub const TOKEN_MIN_INTERVAL: Duration = Duration::ZERO;
    /// `proxy.ascii_only`.
    pub const ASCII_ONLY: bool = true;
    /// `proxy.signature_max_skew`.
    pub const SIGNATURE_MAX_SKEW: Duration = Duration::from_secs(300);
    /// `proxy.tokens[].require_signature`.
    pub const REQUIRE_SIGNATURE: bool = false;
}

/// Inclusive bounds of `[proxy]` keys. A dynamic stream is polled and fetched like a configured
/// one: its period, linger, body and history have the bounds of a polled stream's.
pub mod limits {
    use std::time::Duration;

    use crate::upstream::config::limits as stream;

    const DAY: Duration = Duration::from_secs(24 * 3600);
    /// `proxy.interval`, `proxy.hosts.*.interval`, `proxy.tokens[].interval`.
    pub const INTERVAL: (Duration, Duration) = stream::INTERVAL;
    /// `proxy.min_interval`.
    pub const MIN_INTERVAL: (Duration, Duration) =
        (Duration::from_millis(10), Duration::from_secs(3600));
    /// `proxy.linger`.
    pub const LINGER: (Duration, Duration) = stream::LINGER;
    /// `proxy.keepalive`.
    pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));
    /// `proxy.timeout`.
    pub const TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(300));
    /// `proxy.max_streams`.
    pub const MAX_STREAMS: (u64, u64) = (1, 1_000_000);
    /// `proxy.max_memory`, in bytes.
    pub const MAX_MEMORY: (u64, u64) = (1 << 20, 64 << 30);
    /// `proxy.max_views_per_stream`: as `streams.filtering.max_views`.
    pub const MAX_VIEWS_PER_STREAM: (u64, u64) = crate::views::config::limits::MAX_VIEWS;
    /// `proxy.view_linger`: as `proxy.linger` (its default may be 0s).
    pub const VIEW_LINGER: (Duration, Duration) = LINGER;
    /// `proxy.max_body`, in bytes.
    pub const MAX_BODY: (u64, u64) = stream::MAX_BODY;
    /// `proxy.history`.
    pub const HISTORY: (u64, u64) = stream::HISTORY;
    /// `proxy.history_bytes`, in bytes.
    pub const HISTORY_BYTES: (u64, u64) = stream::HISTORY_BYTES;
    /// `proxy.tokens[].max_connections`.
    pub const MAX_CONNECTIONS: (u64, u64) = (1, 1_000_000);
    /// `proxy.tokens[].connections_per_second` and `connections_burst`.
    pub const CONNECTIONS_PER_SECOND: (u64, u64) = (1, 100_000);
    /// `proxy.tokens[].min_interval`.
    pub const TOKEN_MIN_INTERVAL: (Duration, Duration) = (Duration::ZERO, DAY);
    /// `proxy.signature_max_skew`.
    pub const SIGNATURE_MAX_SKEW: (Duration, Duration) = (Duration::from_secs(1), DAY);
    /// Shortest token, in characters.
    pub const TOKEN_MIN_CHARS: usize = 16;
}

/// `[proxy]`: dynamic streams of any allowed upstream URL (`GET /{target URL}`), created on the
/// first subscriber and evicted after the last one leaves, for clients holding a token.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    /// Serve dynamic streams ([default](defaults::ENABLED)). A disabled table is still validated.
    pub enabled: Option<bool>,
    /// Upstream hosts that may be streamed: `"api.example.com"`, `"*.example.com"` (any name
    /// under it, not itself), `"127.0.0.1"` or `"[::1]"`; required and non-empty when enabled.
    pub allowed_hosts: Option<Vec<String>>,
    /// Allow upstreams that resolve to private, loopback, link-local and metadata addresses
    /// ([default](defaults::ALLOW_PRIVATE)).
    pub allow_private: Option<bool>,
    /// Poll period of a dynamic stream ([default](defaults::INTERVAL), [bounds](limits::INTERVAL)).
    #[serde(default, with = "humantime_serde::option")]
    pub interval: Option<Duration>,
    /// No dynamic stream is polled more often than this ([default](defaults::MIN_INTERVAL),
    /// [bounds](limits::MIN_INTERVAL)).
    #[serde(default, with = "humantime_serde::option")]
    pub min_interval: Option<Duration>,
    /// How long a dynamic stream keeps polling after its last subscriber left
    /// ([default](defaults::LINGER), [bounds](limits::LINGER)).
    #[serde(default, with = "humantime_serde::option")]
    pub linger: Option<Duration>,
    /// Interval between keep-alive comments ([default](defaults::KEEPALIVE),
    /// [bounds](limits::KEEPALIVE)).
    #[serde(default, with = "humantime_serde::option")]
    pub keepalive: Option<Duration>,
    /// Timeout of one upstream request ([default](defaults::TIMEOUT), [bounds](limits::TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Most dynamic streams alive at once ([default](defaults::MAX_STREAMS),
    /// [bounds](limits::MAX_STREAMS)).
    pub max_streams: Option<u64>,
    /// Most snapshot bytes held by dynamic streams together ([default](defaults::MAX_MEMORY),
    /// [bounds](limits::MAX_MEMORY)).
    pub max_memory: Option<ByteSize>,
    /// Most distinct views of one dynamic stream at once
    /// ([default](defaults::MAX_VIEWS_PER_STREAM), [bounds](limits::MAX_VIEWS_PER_STREAM)).
    pub max_views_per_stream: Option<u64>,
    /// How long a view of a dynamic stream is kept after its last subscriber left (default:
    /// [`defaults::VIEW_LINGER`] or `proxy.linger`, the smaller; [bounds](limits::VIEW_LINGER)).
    #[serde(default, with = "humantime_serde::option")]
    pub view_linger: Option<Duration>,
    /// Largest upstream body accepted ([default](defaults::MAX_BODY), [bounds](limits::MAX_BODY)).
    pub max_body: Option<ByteSize>,
    /// Recent changes kept per dynamic stream ([default](defaults::HISTORY),
    /// [bounds](limits::HISTORY)).
    pub history: Option<u64>,
    /// Write every non-ASCII character of `data` and `patch` events as a `\uXXXX` escape
    /// ([default](defaults::ASCII_ONLY)): the Streamdata.io SDK's EventSource corrupts UTF-8
    /// split across reads.
    pub ascii_only: Option<bool>,
    /// How far a signed request's `X-Auth-Sd-Ts` may be from the server's clock
    /// ([default](defaults::SIGNATURE_MAX_SKEW), [bounds](limits::SIGNATURE_MAX_SKEW)).
    #[serde(default, with = "humantime_serde::option")]
    pub signature_max_skew: Option<Duration>,
    /// Most bytes one dynamic stream's history holds ([default](defaults::HISTORY_BYTES),
    /// [bounds](limits::HISTORY_BYTES)).
    pub history_bytes: Option<ByteSize>,
    /// How changes are computed (`[proxy.diff]`); `allow_move = true` is refused.
    #[serde(default)]
    pub diff: DiffConfig,
    /// Poll periods of particular hosts (`[proxy.hosts."<pattern>"]`), overriding `interval`.
    #[serde(default)]
    pub hosts: BTreeMap<String, RawProxyHost>,
    /// Application tokens (`[[proxy.tokens]]`); at least one when enabled.
    #[serde(default)]
    pub tokens: Vec<RawProxyToken>,
}

/// One `[proxy.hosts."<pattern>"]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyHost {
    /// Poll period of dynamic streams of matching hosts ([bounds](limits::INTERVAL)).
    #[serde(default, with = "humantime_serde::option")]
    pub interval: Option<Duration>,
}

/// One `[[proxy.tokens]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyToken {
    /// Unique name shown in logs and metrics (see [`is_valid_name`]).
    pub name: String,
    /// The secret clients send as `X-Sd-Token`, at least
    /// [`TOKEN_MIN_CHARS`](limits::TOKEN_MIN_CHARS) characters without spaces, unique; `${VAR}`
    /// is replaced by the environment variable `VAR`.
    pub token: String,
    /// Most connections open at once with this token ([default](defaults::MAX_CONNECTIONS),
    /// [bounds](limits::MAX_CONNECTIONS)).
    pub max_connections: Option<u64>,
    /// New connections per second, sustained ([default](defaults::CONNECTIONS_PER_SECOND),
    /// [bounds](limits::CONNECTIONS_PER_SECOND)).
    pub connections_per_second: Option<u64>,
    /// New connections at once after a quiet period (default `connections_per_second`,
    /// [bounds](limits::CONNECTIONS_PER_SECOND)).
    pub connections_burst: Option<u64>,
    /// Hosts this token may stream, each also allowed by `proxy.allowed_hosts` (default: all
    /// of them).
    pub allowed_hosts: Option<Vec<String>>,
    /// Poll period of this token's streams, overriding host and default periods
    /// ([bounds](limits::INTERVAL)).
    #[serde(default, with = "humantime_serde::option")]
    pub interval: Option<Duration>,
    /// This token's streams are never polled more often than this
    /// ([default](defaults::TOKEN_MIN_INTERVAL), [bounds](limits::TOKEN_MIN_INTERVAL)).
    #[serde(default, with = "humantime_serde::option")]
    pub min_interval: Option<Duration>,
    /// The application's private key of the Streamdata.io signature strategy
    /// (`streamdataio-js-sdk-auth`): signatures (`X-Auth-Sd-Ts`, `X-Auth-Sd-S`) are verified
    /// with it. `${VAR}` allowed; never shown.
    pub signing_secret: Option<String>,
    /// Refuse this token's requests that are not signed (needs `signing_secret`;
    /// [default](defaults::REQUIRE_SIGNATURE)).
    pub require_signature: Option<bool>,
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
    /// Most distinct views of one dynamic stream at once (answered 429 past it).
    pub max_views_per_stream: usize,
    /// How long a view of a dynamic stream is kept after its last subscriber left.
    pub view_linger: Duration,
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

/// Parses a list of host patterns at `key[i]`; the patterns that parsed, with their index.
fn host_list(problems: &mut Problems, key: &str, raw: &[String]) -> Vec<(usize, HostPattern)> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, pattern)| match HostPattern::parse(pattern) {
            Ok(p) => Some((i, p)),
            Err(message) => {
                problems.push(format!("{key}[{i}]"), message);
                None
            }
        })
        .collect()
}

/// Whether `global` allows everything `pattern` allows: an exact host must match it, a
/// wildcard must be the same wildcard or one under it (`*.a.example.com` under `*.example.com`).
fn covers(global: &HostPattern, pattern: &HostPattern) -> bool {
    match (global, pattern) {
        (_, HostPattern::Exact(host)) => global.matches(host),
        (HostPattern::Subdomains(outer), HostPattern::Subdomains(inner)) => {
            inner.ends_with(outer.as_str())
        }
        (HostPattern::Exact(_), HostPattern::Subdomains(_)) => false,
    }
}

/// Host overrides in the order the runtime tries them: exact hosts first, then wildcards from
/// the most specific (longest suffix) to the least; the first match wins.
fn order_host_intervals(intervals: &mut [(HostPattern, Duration)]) {
    intervals.sort_by_key(|(pattern, _)| match pattern {
        HostPattern::Exact(_) => (0, 0),
        HostPattern::Subdomains(suffix) => (1, usize::MAX - suffix.len()),
    });
}

/// Validates `[proxy]`: `None` when it is absent or disabled (its keys are still checked, so
/// that typos are caught before someone enables it).
impl RawProxy {
    /// Whether dynamic streams are served (`enabled`, or its default).
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(defaults::ENABLED)
    }

    /// Validates `[proxy]`, recording problems at its keys.
    pub fn validate(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> Option<ProxySettings> {
        let enabled = self.is_enabled();
        let before = problems.len();
        let allowed_hosts = match &self.allowed_hosts {
            Some(list) => {
                if list.is_empty() && enabled {
                    problems.push(
                    "proxy.allowed_hosts",
                    "expected at least one host such as \"api.example.com\" or \"*.example.com\" \
                     (no upstream could be streamed), got an empty list",
                );
                }
                host_list(problems, "proxy.allowed_hosts", list)
                    .into_iter()
                    .map(|(_, p)| p)
                    .collect()
            }
            None => {
                if enabled {
                    problems.push(
                        "proxy.allowed_hosts",
                        "missing required key: expected the upstream hosts that may be streamed, \
                     such as [\"api.example.com\", \"*.example.com\"]",
                    );
                }
                Vec::new()
            }
        };
        let interval = duration_in(
            problems,
            "proxy.interval",
            self.interval,
            defaults::INTERVAL,
            limits::INTERVAL,
        );
        let min_interval = duration_in(
            problems,
            "proxy.min_interval",
            self.min_interval,
            defaults::MIN_INTERVAL,
            limits::MIN_INTERVAL,
        );
        let linger = duration_in(
            problems,
            "proxy.linger",
            self.linger,
            defaults::LINGER,
            limits::LINGER,
        );
        let keepalive = duration_in(
            problems,
            "proxy.keepalive",
            self.keepalive,
            defaults::KEEPALIVE,
            limits::KEEPALIVE,
        );
        let timeout = duration_in(
            problems,
            "proxy.timeout",
            self.timeout,
            defaults::TIMEOUT,
            limits::TIMEOUT,
        );
        let max_streams = integer_in(
            problems,
            "proxy.max_streams",
            self.max_streams,
            defaults::MAX_STREAMS,
            limits::MAX_STREAMS,
        );
        let max_views_per_stream = integer_in(
            problems,
            "proxy.max_views_per_stream",
            self.max_views_per_stream,
            defaults::MAX_VIEWS_PER_STREAM,
            limits::MAX_VIEWS_PER_STREAM,
        );
        let view_linger = duration_in(
            problems,
            "proxy.view_linger",
            self.view_linger,
            defaults::VIEW_LINGER.min(linger),
            limits::VIEW_LINGER,
        );
        let max_memory = bytes_in(
            problems,
            "proxy.max_memory",
            self.max_memory,
            defaults::MAX_MEMORY,
            limits::MAX_MEMORY,
        );
        let max_body_bytes = bytes_in(
            problems,
            "proxy.max_body",
            self.max_body,
            defaults::MAX_BODY,
            limits::MAX_BODY,
        );
        let history = integer_in(
            problems,
            "proxy.history",
            self.history,
            defaults::HISTORY,
            limits::HISTORY,
        );
        let signature_max_skew = duration_in(
            problems,
            "proxy.signature_max_skew",
            self.signature_max_skew,
            defaults::SIGNATURE_MAX_SKEW,
            limits::SIGNATURE_MAX_SKEW,
        );
        let history_bytes = bytes_in(
            problems,
            "proxy.history_bytes",
            self.history_bytes,
            defaults::HISTORY_BYTES,
            limits::HISTORY_BYTES,
        );
        if self.diff.allow_move == Some(true) {
            problems.push(
                "proxy.diff.allow_move",
                "expected false or no value: Streamdata.io clients apply only add, remove and \
             replace operations, so dynamic streams never emit `move`",
            );
        }
        let diff = self.diff.validate("proxy.diff", problems).map(|mut diff| {
            diff.allow_move = false;
            diff
        });
        let mut host_intervals: Vec<(HostPattern, Duration)> = Vec::new();
        let mut seen_hosts: HashMap<String, &str> = HashMap::new();
        for (pattern, host) in &self.hosts {
            let key = format!("proxy.hosts.{pattern:?}");
            let Some(interval) = host.interval else {
                problems.push(
                    format!("{key}.interval"),
                    "missing required key: expected the poll period of this host's streams, such \
                 as \"2s\"",
                );
                continue;
            };
            let interval = duration_in(
                problems,
                &format!("{key}.interval"),
                Some(interval),
                interval,
                limits::INTERVAL,
            );
            match HostPattern::parse(pattern) {
                Ok(parsed) => {
                    if let Some(first) = seen_hosts.insert(parsed.to_string(), pattern) {
                        problems.push(
                            key,
                            format!(
                                "expected each host once, but {pattern:?} is the same host as \
                             {first:?} (host names are case-insensitive)"
                            ),
                        );
                    } else {
                        host_intervals.push((parsed, interval));
                    }
                }
                Err(message) => problems.push(key, message),
            }
        }
        order_host_intervals(&mut host_intervals);
        if self.tokens.is_empty() && enabled {
            problems.push(
                "proxy.tokens",
                "expected at least one [[proxy.tokens]] entry with a `name` and a `token` (clients \
             send the token as X-Sd-Token)",
            );
        }
        let mut tokens = Vec::with_capacity(self.tokens.len());
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut secrets: HashMap<String, usize> = HashMap::new();
        for (i, raw_token) in self.tokens.iter().enumerate() {
            let key = format!("proxy.tokens[{i}]");
            if !is_valid_name(&raw_token.name) {
                problems.push(
                    format!("{key}.name"),
                    format!("{NAME_EXPECTED}, got {:?}", raw_token.name),
                );
            } else if let Some(first) = names.get(raw_token.name.as_str()) {
                problems.push(
                format!("{key}.name"),
                format!(
                    "expected a unique name, but {:?} is also the name of proxy.tokens[{first}]",
                    raw_token.name
                ),
            );
            } else {
                names.insert(&raw_token.name, i);
            }
            let secret = token_secret(problems, &key, raw_token, enabled, env);
            if let Some(secret) = &secret {
                if let Some(first) = secrets.get(secret) {
                    // Never echo the token: name the other entry instead.
                    problems.push(
                        format!("{key}.token"),
                        format!(
                            "expected a token of its own, but it is the same as the token of \
                         proxy.tokens[{first}] ({:?}); a client's token must say which entry \
                         it uses",
                            self.tokens[*first].name
                        ),
                    );
                } else {
                    secrets.insert(secret.clone(), i);
                }
            }
            let token = token_limits(problems, &key, raw_token, &allowed_hosts);
            let signing_key = signing_key(problems, &key, raw_token, enabled, env);
            if let Some(secret) = secret {
                tokens.push(ProxyToken {
                    token: secret,
                    signing_key,
                    ..token
                });
            }
        }
        if !enabled || problems.len() != before {
            return None;
        }
        Some(ProxySettings {
            allowed_hosts,
            allow_private: self.allow_private.unwrap_or(defaults::ALLOW_PRIVATE),
            interval,
            host_intervals,
            min_interval,
            linger,
            keepalive,
            max_streams: usize_of(max_streams),
            max_memory,
            max_views_per_stream: usize_of(max_views_per_stream),
            view_linger,
            timeout,
            max_body_bytes,
            history: usize_of(history),
            history_bytes,
            diff: diff?,
            tokens,
            ascii_only: self.ascii_only.unwrap_or(defaults::ASCII_ONLY),
            signature_max_skew,
        })
    }
}

/// The signing key of one token entry (`signing_secret`), problems recorded at `key`; also
/// checks that `require_signature` has a key to verify with.
fn signing_key(
    problems: &mut Problems,
    key: &str,
    raw: &RawProxyToken,
    enabled: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<SigningKey> {
    let secret_key = format!("{key}.signing_secret");
    let parsed = raw.signing_secret.as_ref().and_then(|secret| {
        let secret = match interpolate(secret, env) {
            Ok(secret) => secret,
            Err(InterpolateError::Undefined { .. }) if !enabled => return None,
            Err(e) => {
                problems.push(secret_key.clone(), format!("the signing secret {e}"));
                return None;
            }
        };
        match SigningKey::parse(&secret) {
            Ok(parsed) => Some(parsed),
            Err(message) => {
                // Never echo the secret.
                problems.push(
                    secret_key.clone(),
                    format!(
                        "{message}: the private key of the Streamdata.io application, as given \
                         to the SDK's AuthStrategy.newSignatureStrategy (not shown here)"
                    ),
                );
                None
            }
        }
    });
    let require_signature = raw.require_signature.unwrap_or(defaults::REQUIRE_SIGNATURE);
    if require_signature && raw.signing_secret.is_none() {
        problems.push(
            format!("{key}.require_signature"),
            "expected a `signing_secret` in the same entry: signatures cannot be required \
             without the key that verifies them",
        );
    }
    parsed
}

/// The resolved token of one entry, or `None` after recording why it is refused. A disabled
/// proxy does not need its token's environment variables to be set.
fn token_secret(
    problems: &mut Problems,
    key: &str,
    raw: &RawProxyToken,
    enabled: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    let token = match interpolate(&raw.token, env) {
        Ok(token) => token,
        Err(InterpolateError::Undefined { .. }) if !enabled => return None,
        Err(e) => {
            problems.push(format!("{key}.token"), format!("the token {e}"));
            return None;
        }
    };
    if token.chars().count() < limits::TOKEN_MIN_CHARS
        || token.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        // Never echo the token.
        problems.push(
            format!("{key}.token"),
            format!(
                "expected at least {} characters without spaces or control characters (a \
                 guessable token lets anyone use the proxy; the token is not shown here)",
                limits::TOKEN_MIN_CHARS
            ),
        );
        return None;
    }
    Some(token)
}

/// Everything of one token entry but its secret (left empty), problems recorded at `key`.
fn token_limits(
    problems: &mut Problems,
    key: &str,
    raw: &RawProxyToken,
    global_hosts: &[HostPattern],
) -> ProxyToken {
    let max_connections = integer_in(
        problems,
        &format!("{key}.max_connections"),
        raw.max_connections,
        defaults::MAX_CONNECTIONS,
        limits::MAX_CONNECTIONS,
    );
    let per_second = integer_in(
        problems,
        &format!("{key}.connections_per_second"),
        raw.connections_per_second,
        defaults::CONNECTIONS_PER_SECOND,
        limits::CONNECTIONS_PER_SECOND,
    );
    let burst = integer_in(
        problems,
        &format!("{key}.connections_burst"),
        raw.connections_burst,
        per_second,
        limits::CONNECTIONS_PER_SECOND,
    );
    let allowed_hosts = raw.allowed_hosts.as_ref().map(|list| {
        let hosts_key = format!("{key}.allowed_hosts");
        let parsed = host_list(problems, &hosts_key, list);
        for (i, pattern) in &parsed {
            if !global_hosts.iter().any(|g| covers(g, pattern)) {
                problems.push(
                    format!("{hosts_key}[{i}]"),
                    format!(
                        "expected a host that proxy.allowed_hosts also allows, got {:?}, which \
                         is not in proxy.allowed_hosts ({})",
                        list[*i],
                        if global_hosts.is_empty() {
                            "empty".to_owned()
                        } else {
                            global_hosts
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    ),
                );
            }
        }
        if list.is_empty() {
            problems.push(
                hosts_key,
                "expected at least one host (remove the key to allow every host of \
                 proxy.allowed_hosts), got an empty list",
            );
        }
        parsed.into_iter().map(|(_, p)| p).collect()
    });
    let interval = raw.interval.map(|value| {
        duration_in(
            problems,
            &format!("{key}.interval"),
            Some(value),
            value,
            limits::INTERVAL,
        )
    });
    let min_interval = duration_in(
        problems,
        &format!("{key}.min_interval"),
        raw.min_interval,
        defaults::TOKEN_MIN_INTERVAL,
        limits::TOKEN_MIN_INTERVAL,
    );
    ProxyToken {
        name: raw.name.clone(),
        token: String::new(),
        max_connections: usize_of(max_connections),
        connections_per_second: nonzero_u32(per_second),
        connections_burst: nonzero_u32(burst),
        allowed_hosts,
        interval,
        min_interval,
        signing_key: None,
        require_signature: raw.require_signature.unwrap_or(defaults::REQUIRE_SIGNATURE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn coverage_follows_the_domain_tree() {
        assert!(covers(&p("api.example.com"), &p("API.example.com")));
        assert!(covers(&p("*.example.com"), &p("api.example.com")));
        assert!(covers(&p("*.example.com"), &p("*.example.com")));
        assert!(covers(&p("*.example.com"), &p("*.eu.example.com")));
        assert!(!covers(&p("*.example.com"), &p("example.com")));
        assert!(!covers(&p("*.example.com"), &p("*.badexample.com")));
        assert!(!covers(&p("*.eu.example.com"), &p("*.example.com")));
        assert!(!covers(&p("api.example.com"), &p("*.api.example.com")));
        assert!(!covers(&p("example.com"), &p("*.example.com")));
    }

    #[test]
    fn host_intervals_put_exact_hosts_first_then_longer_suffixes() {
        let s = Duration::from_secs(1);
        let mut list = vec![
            (p("*.com"), s),
            (p("*.example.com"), s),
            (p("a.example.com"), s),
            (p("*.eu.example.com"), s),
            (p("b.com"), s),
        ];
        order_host_intervals(&mut list);
        let order: Vec<String> = list.iter().map(|(h, _)| h.to_string()).collect();
        assert_eq!(
            order,
            [
                "a.example.com",
                "b.com",
                "*.eu.example.com",
                "*.example.com",
                "*.com"
            ]
        );
    }

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

//! The upstream sections of the configuration: `[upstream]` (shared by every poller),
//! `[stream_defaults]` and the polled `[[streams]]` entries. Their shape as written (serde,
//! unknown keys rejected), their defaults and bounds, their pure validation, and the settings
//! the pollers, the fetcher and the rate limits are built from.
//!
//! `config` assembles these into the file and validates the entries it owns itself (names,
//! push streams); [`RawStream::validate_polled`] does the rest of a polled stream.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::time::Duration;

use bytesize::ByteSize;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use url::Url;

use crate::diff::{DiffConfig, DiffOptions};
use crate::upstream::decode::{Format, gtfs_rt};
use crate::validation::{
    HEADER_VALUE_EXPECTED, MANAGED_HEADERS, NAME_EXPECTED, Problems, bytes_in, duration_in,
    fmt_duration, fraction, header_key, header_name, integer_in, interpolate, is_valid_name,
    references, usize_of,
};
use crate::views::config::{RawFiltering, RawView, ViewsSettings};

/// Built-in defaults of the upstream keys, used when neither the file nor the environment sets
/// them.
pub mod defaults {
    use std::time::Duration;

    /// `upstream.user_agent`.
    pub const USER_AGENT: &str = concat!("patchwire/", env!("CARGO_PKG_VERSION"));
    /// `upstream.default_rate_limit.per_second` (and its burst).
    pub const RATE_PER_SECOND: u32 = 10;
    /// `upstream.backoff.initial`.
    pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
    /// `upstream.backoff.max`.
    pub const BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
    /// `upstream.backoff.multiplier`.
    pub const BACKOFF_MULTIPLIER: f64 = 2.0;
    /// `upstream.backoff.jitter`.
    pub const BACKOFF_JITTER: f64 = 0.2;
    /// `upstream.backoff.max_retry_after`.
    pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
    /// `interval` of a stream.
    pub const INTERVAL: Duration = Duration::from_secs(5);
    /// `timeout` of a stream.
    pub const TIMEOUT: Duration = Duration::from_secs(10);
    /// `max_body` of a stream, in bytes.
    pub const MAX_BODY: u64 = 16 * 1024 * 1024;
    /// `history` of a stream.
    pub const HISTORY: u64 = 1000;
    /// `history_bytes` of a stream.
    pub const HISTORY_BYTES: u64 = 16 * 1024 * 1024;
    /// `linger` of an on-demand stream.
    pub const LINGER: Duration = Duration::from_secs(30);
    /// `on_demand` of a polled stream.
    pub const ON_DEMAND: bool = false;
}

/// Inclusive bounds of the upstream keys.
pub mod limits {
    use std::time::Duration;

    /// `interval`.
    pub const INTERVAL: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(24 * 3600));
    /// `timeout`.
    pub const TIMEOUT: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(600));
    /// `upstream.backoff.initial`.
    pub const BACKOFF_INITIAL: (Duration, Duration) =
        (Duration::from_millis(1), Duration::from_secs(3600));
    /// `upstream.backoff.max` (and at least `initial`).
    pub const BACKOFF_MAX: (Duration, Duration) =
        (Duration::from_millis(1), Duration::from_secs(24 * 3600));
    /// `upstream.backoff.max_retry_after`.
    pub const MAX_RETRY_AFTER: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(24 * 3600));
    /// `upstream.backoff.multiplier`: greater than the first, at most the second.
    pub const BACKOFF_MULTIPLIER: (f64, f64) = (1.0, 10.0);
    /// `max_body`, in bytes.
    pub const MAX_BODY: (u64, u64) = (1024, 1024 * 1024 * 1024);
    /// `history`.
    pub const HISTORY: (u64, u64) = (1, 100_000);
    /// `history_bytes`, in bytes.
    pub const HISTORY_BYTES: (u64, u64) = (1024, 1024 * 1024 * 1024);
    /// `linger` of an on-demand stream.
    pub const LINGER: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(24 * 3600));
}

/// `[upstream]`: settings shared by every poller.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `User-Agent` sent upstream ([default](defaults::USER_AGENT)).
    pub user_agent: Option<String>,
    /// Retry schedule after failed polls (`[upstream.backoff]`).
    #[serde(default)]
    pub backoff: RawBackoff,
    /// Quota for each upstream `host:port` that no named group covers
    /// ([default](defaults::RATE_PER_SECOND) per second, and as many at once).
    pub default_rate_limit: Option<RawRateLimit>,
    /// Named quotas that streams join with `rate_limit_group` (`[upstream.rate_limits.<group>]`).
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RawRateLimit>,
}

/// `[upstream.backoff]`: exponential backoff after failed polls.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    /// Delay after the first failure ([default](defaults::BACKOFF_INITIAL),
    /// [bounds](limits::BACKOFF_INITIAL)).
    #[serde(default, with = "humantime_serde::option")]
    pub initial: Option<Duration>,
    /// Upper bound of any computed delay, at least `initial` ([default](defaults::BACKOFF_MAX),
    /// [bounds](limits::BACKOFF_MAX)).
    #[serde(default, with = "humantime_serde::option")]
    pub max: Option<Duration>,
    /// Growth factor per consecutive failure ([default](defaults::BACKOFF_MULTIPLIER),
    /// [bounds](limits::BACKOFF_MULTIPLIER)).
    pub multiplier: Option<f64>,
    /// Fraction of each delay that is randomized, from 0 to 1
    /// ([default](defaults::BACKOFF_JITTER)).
    pub jitter: Option<f64>,
    /// Upper bound honoured for an upstream's `Retry-After`
    /// ([default](defaults::MAX_RETRY_AFTER), [bounds](limits::MAX_RETRY_AFTER)).
    #[serde(default, with = "humantime_serde::option")]
    pub max_retry_after: Option<Duration>,
}

/// A request quota: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Requests per second, sustained, at least 1 (required in a named group;
    /// [default](defaults::RATE_PER_SECOND) for `default_rate_limit`).
    pub per_second: Option<u32>,
    /// Requests allowed at once after a quiet period (at least 1; default `per_second`).
    pub burst: Option<u32>,
}

/// `[stream_defaults]`: values used by every stream that does not set the key itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStreamDefaults {
    /// Time between polls ([default](defaults::INTERVAL), [bounds](limits::INTERVAL)).
    #[serde(default, with = "humantime_serde::option")]
    pub interval: Option<Duration>,
    /// Timeout of one whole poll request ([default](defaults::TIMEOUT),
    /// [bounds](limits::TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Largest upstream body accepted ([default](defaults::MAX_BODY),
    /// [bounds](limits::MAX_BODY)).
    pub max_body: Option<ByteSize>,
    /// How bodies are decoded (default [`Format::default`]).
    pub format: Option<Format>,
    /// Recent changes kept for resuming subscribers ([default](defaults::HISTORY),
    /// [bounds](limits::HISTORY)).
    pub history: Option<u64>,
    /// Most bytes a stream's history holds ([default](defaults::HISTORY_BYTES),
    /// [bounds](limits::HISTORY_BYTES)).
    pub history_bytes: Option<ByteSize>,
    /// Headers sent with every poll of every stream; a stream's own header of the same name
    /// (compared case-insensitively) wins.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Where a stream's documents come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawSource {
    /// Polled from `url` (the default).
    #[default]
    Poll,
    /// Pushed by publishers through `POST`/`PATCH /streams/{name}`; no upstream.
    Push,
}

/// One `[[streams]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    /// Unique name, served at `/streams/{name}` (see [`is_valid_name`]).
    pub name: String,
    /// Where documents come from: `"poll"` or `"push"` ([default](RawSource::default)).
    #[serde(default)]
    pub source: RawSource,
    /// The upstream URL polled (http or https; required for polled streams, absent for push
    /// streams); `${VAR}` is replaced by the environment variable `VAR`, `$${` stands for a
    /// literal `${`.
    pub url: Option<String>,
    /// Headers sent with every poll (name → value; `${VAR}` as in `url`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Time between polls ([bounds](limits::INTERVAL); default from `[stream_defaults]`).
    #[serde(default, with = "humantime_serde::option")]
    pub interval: Option<Duration>,
    /// Timeout of one whole poll request ([bounds](limits::TIMEOUT); default from
    /// `[stream_defaults]`).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Largest body accepted: bytes as an integer or a size such as `"16 MiB"`
    /// ([bounds](limits::MAX_BODY); default from `[stream_defaults]`).
    pub max_body: Option<ByteSize>,
    /// How the body is decoded (default from `[stream_defaults]`).
    pub format: Option<Format>,
    /// Recent changes kept for resuming subscribers ([bounds](limits::HISTORY); default from
    /// `[stream_defaults]`).
    pub history: Option<u64>,
    /// Most bytes the history holds ([bounds](limits::HISTORY_BYTES); default from
    /// `[stream_defaults]`).
    pub history_bytes: Option<ByteSize>,
    /// A named group from `[upstream.rate_limits]`; by default the URL's `host:port`.
    pub rate_limit_group: Option<String>,
    /// How changes are computed (`[streams.diff]`).
    #[serde(default)]
    pub diff: DiffConfig,
    /// Poll only while the stream has subscribers (polled streams only;
    /// [default](defaults::ON_DEMAND)).
    pub on_demand: Option<bool>,
    /// With `on_demand = true`: how long polling continues after the last subscriber left
    /// ([default](defaults::LINGER), [bounds](limits::LINGER)).
    #[serde(default, with = "humantime_serde::option")]
    pub linger: Option<Duration>,
    /// What views of the stream filter on (`[streams.filtering]`; a `gtfs-rt` stream has a
    /// default).
    pub filtering: Option<RawFiltering>,
    /// Named views (`[[streams.views]]`).
    #[serde(default)]
    pub views: Vec<RawView>,
    /// A JSON Schema file describing the stream's documents (relative to the configuration
    /// file), served in `/asyncapi.json` and `/openapi.json`; without it the schema is inferred
    /// from the current document (`gtfs-rt`: the projection's schema). Read and checked by
    /// [`crate::validation::schema_file::document_schema`].
    pub schema: Option<String>,
}

/// Settings shared by all upstream pollers.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `User-Agent` sent upstream.
    pub user_agent: String,
    /// Quota for each upstream host that no named group covers.
    pub default_rate_limit: RateLimit,
    /// Named rate-limit groups that streams may join (`rate_limit_group`).
    pub rate_limits: BTreeMap<String, RateLimit>,
    /// Retry schedule after failed polls.
    pub backoff: BackoffSettings,
}

/// A request quota: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub per_second: NonZeroU32,
    /// Requests allowed at once after a quiet period.
    pub burst: NonZeroU32,
}

/// Exponential backoff after failed polls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffSettings {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound for any computed delay.
    pub max: Duration,
    /// Growth factor per consecutive failure (within [bounds](limits::BACKOFF_MULTIPLIER)).
    pub multiplier: f64,
    /// Fraction of each delay that is randomized, from 0 to 1.
    pub jitter: f64,
    /// Upper bound for an upstream's `Retry-After`.
    pub max_retry_after: Duration,
}

/// One configured stream.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Unique name; the stream is served at `/streams/{name}`.
    pub name: String,
    /// The upstream URL polled (http or https).
    pub url: Url,
    /// Headers sent with every poll, `${VAR}` references already resolved.
    pub headers: HeaderMap,
    /// Time between polls.
    pub interval: Duration,
    /// Timeout for a whole poll request (connect, headers and body).
    pub timeout: Duration,
    /// Largest body accepted, in bytes.
    pub max_body_bytes: u64,
    /// How the body is decoded.
    pub format: Format,
    /// How many recent changes are kept for resuming subscribers.
    pub history: usize,
    /// Most bytes those changes may hold together.
    pub history_bytes: u64,
    /// The rate-limit group: a named group, or the upstream host (`host:port`) by default.
    pub rate_limit_group: String,
    /// How changes are computed.
    pub diff: DiffOptions,
    /// `Some(linger)`: poll only while the stream has subscribers, and for `linger` after the
    /// last one leaves (the snapshot is dropped when polling stops). `None`: poll always.
    pub on_demand: Option<Duration>,
    /// The stream's views, when it has any.
    pub views: Option<ViewsSettings>,
}

impl RawUpstream {
    /// Validates `[upstream]`, recording problems at its keys.
    pub fn validate(&self, problems: &mut Problems) -> UpstreamSettings {
        let user_agent = self
            .user_agent
            .clone()
            .unwrap_or_else(|| defaults::USER_AGENT.to_owned());
        if user_agent.trim().is_empty() || HeaderValue::from_str(&user_agent).is_err() {
            problems.push(
            "upstream.user_agent",
            format!(
                "expected a non-empty header value without control characters, got {user_agent:?}"
            ),
        );
        }
        let default = RawRateLimit {
            per_second: Some(defaults::RATE_PER_SECOND),
            burst: None,
        };
        let default_rate_limit = rate_limit(
            problems,
            "upstream.default_rate_limit",
            self.default_rate_limit.as_ref().unwrap_or(&default),
            defaults::RATE_PER_SECOND,
        );
        let mut rate_limits = BTreeMap::new();
        for (name, limit) in &self.rate_limits {
            let key = format!("upstream.rate_limits.{name}");
            if !is_valid_name(name) {
                problems.push(
                    key.clone(),
                    format!("{NAME_EXPECTED} as a group name, got {name:?}"),
                );
            }
            if limit.per_second.is_none() {
                problems.push(
                    format!("{key}.per_second"),
                    "missing required key: expected the requests per second allowed for this group",
                );
            }
            let limit = rate_limit(problems, &key, limit, defaults::RATE_PER_SECOND);
            rate_limits.insert(name.clone(), limit);
        }
        UpstreamSettings {
            user_agent,
            default_rate_limit,
            rate_limits,
            backoff: backoff(&self.backoff, problems),
        }
    }
}

fn rate_limit(
    problems: &mut Problems,
    key: &str,
    raw: &RawRateLimit,
    default_per_second: u32,
) -> RateLimit {
    let nonzero = |problems: &mut Problems, field: &str, value: u32| {
        NonZeroU32::new(value).unwrap_or_else(|| {
            problems.push(
                format!("{key}.{field}"),
                "expected at least 1 request, got 0 (remove the stream to stop polling)",
            );
            NonZeroU32::MIN
        })
    };
    let per_second = nonzero(
        problems,
        "per_second",
        raw.per_second.unwrap_or(default_per_second),
    );
    let burst = match raw.burst {
        Some(burst) => nonzero(problems, "burst", burst),
        None => per_second,
    };
    RateLimit { per_second, burst }
}

fn backoff(raw: &RawBackoff, problems: &mut Problems) -> BackoffSettings {
    let initial = duration_in(
        problems,
        "upstream.backoff.initial",
        raw.initial,
        defaults::BACKOFF_INITIAL,
        limits::BACKOFF_INITIAL,
    );
    let max = duration_in(
        problems,
        "upstream.backoff.max",
        raw.max,
        defaults::BACKOFF_MAX,
        limits::BACKOFF_MAX,
    );
    if max < initial {
        problems.push(
            "upstream.backoff.max",
            format!(
                "expected at least upstream.backoff.initial ({}), got \"{}\"",
                fmt_duration(initial),
                fmt_duration(max)
            ),
        );
    }
    let multiplier = raw.multiplier.unwrap_or(defaults::BACKOFF_MULTIPLIER);
    let (low, high) = limits::BACKOFF_MULTIPLIER;
    if !(multiplier > low && multiplier <= high) {
        problems.push(
            "upstream.backoff.multiplier",
            format!("expected a number greater than {low} and at most {high}, got {multiplier}"),
        );
    }
    let jitter = fraction(
        problems,
        "upstream.backoff.jitter",
        raw.jitter,
        defaults::BACKOFF_JITTER,
    );
    let max_retry_after = duration_in(
        problems,
        "upstream.backoff.max_retry_after",
        raw.max_retry_after,
        defaults::MAX_RETRY_AFTER,
        limits::MAX_RETRY_AFTER,
    );
    BackoffSettings {
        initial,
        max,
        multiplier,
        jitter,
        max_retry_after,
    }
}

/// `[stream_defaults]` after validation, with built-in defaults filled in: what a polled
/// stream takes for each key it does not set.
#[derive(Debug, Clone)]
pub struct StreamDefaults {
    /// Time between polls.
    interval: Duration,
    /// Timeout of one whole poll request.
    timeout: Duration,
    /// Largest body accepted, in bytes.
    max_body: u64,
    /// How bodies are decoded.
    format: Format,
    /// Recent changes kept for resuming subscribers.
    history: u64,
    /// Most bytes those changes may hold together.
    history_bytes: u64,
    /// Headers sent with every poll, under the stream's own of the same name.
    headers: HeaderMap,
}

impl RawStreamDefaults {
    /// Validates `[stream_defaults]`, with built-in defaults filled in for what it leaves out.
    pub fn validate(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> StreamDefaults {
        StreamDefaults {
            interval: duration_in(
                problems,
                "stream_defaults.interval",
                self.interval,
                defaults::INTERVAL,
                limits::INTERVAL,
            ),
            timeout: duration_in(
                problems,
                "stream_defaults.timeout",
                self.timeout,
                defaults::TIMEOUT,
                limits::TIMEOUT,
            ),
            max_body: bytes_in(
                problems,
                "stream_defaults.max_body",
                self.max_body,
                defaults::MAX_BODY,
                limits::MAX_BODY,
            ),
            format: self.format.unwrap_or_default(),
            history: integer_in(
                problems,
                "stream_defaults.history",
                self.history,
                defaults::HISTORY,
                limits::HISTORY,
            ),
            history_bytes: bytes_in(
                problems,
                "stream_defaults.history_bytes",
                self.history_bytes,
                defaults::HISTORY_BYTES,
                limits::HISTORY_BYTES,
            ),
            headers: headers(problems, "stream_defaults.headers", "", &self.headers, env),
        }
    }
}

impl RawStream {
    /// Validates a polled stream at `key` (`streams[i]`), apart from its name, which `config`
    /// checks across all streams; `None` when it has problems.
    pub fn validate_polled(
        &self,
        key: &str,
        defaults: &StreamDefaults,
        upstream: &UpstreamSettings,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> Option<StreamSettings> {
        let before = problems.len();
        let context = format!("in stream {:?}, ", self.name);
        let url = match &self.url {
            Some(url) => stream_url(problems, &format!("{key}.url"), &context, url, env),
            None => {
                problems.push(
                    format!("{key}.url"),
                    "missing required key `url`: the upstream URL to poll (a stream fed by \
                     POST/PATCH sets source = \"push\" instead)",
                );
                None
            }
        };
        let interval = duration_in(
            problems,
            &format!("{key}.interval"),
            self.interval,
            defaults.interval,
            limits::INTERVAL,
        );
        let timeout = duration_in(
            problems,
            &format!("{key}.timeout"),
            self.timeout,
            defaults.timeout,
            limits::TIMEOUT,
        );
        let max_body_bytes = bytes_in(
            problems,
            &format!("{key}.max_body"),
            self.max_body,
            defaults.max_body,
            limits::MAX_BODY,
        );
        let history = integer_in(
            problems,
            &format!("{key}.history"),
            self.history,
            defaults.history,
            limits::HISTORY,
        );
        let history_bytes = bytes_in(
            problems,
            &format!("{key}.history_bytes"),
            self.history_bytes,
            defaults.history_bytes,
            limits::HISTORY_BYTES,
        );
        let on_demand = on_demand(problems, key, self);
        let own_headers = headers(
            problems,
            &format!("{key}.headers"),
            &context,
            &self.headers,
            env,
        );
        // The stream's own headers replace defaults of the same name.
        let mut headers = defaults.headers.clone();
        for (name, value) in &own_headers {
            headers.insert(name.clone(), value.clone());
        }
        let rate_limit_group = match (&self.rate_limit_group, &url) {
            (Some(group), _) => {
                if !upstream.rate_limits.contains_key(group) {
                    let known: Vec<&str> =
                        upstream.rate_limits.keys().map(String::as_str).collect();
                    let known = if known.is_empty() {
                        "none are defined".to_owned()
                    } else {
                        format!("defined groups: {}", known.join(", "))
                    };
                    problems.push(
                        format!("{key}.rate_limit_group"),
                        format!(
                            "expected the name of an [upstream.rate_limits.<group>] table, got \
                             {group:?} ({known})"
                        ),
                    );
                }
                group.clone()
            }
            (None, Some(url)) => host_group(url),
            (None, None) => String::new(),
        };
        let format = self.format.unwrap_or(defaults.format);
        let diff =
            format_diff_defaults(format, &self.diff).validate(&format!("{key}.diff"), problems);
        let views = crate::views::config::validate(
            key,
            format == Format::GtfsRt,
            self.filtering.as_ref(),
            &self.views,
            problems,
        );
        let (Some(url), Some(diff)) = (url, diff) else {
            return None;
        };
        (problems.len() == before).then(|| StreamSettings {
            name: self.name.clone(),
            url,
            headers,
            interval,
            timeout,
            max_body_bytes,
            format,
            history: usize_of(history),
            history_bytes,
            rate_limit_group,
            diff,
            on_demand,
            views,
        })
    }
}

/// A polled stream's `on_demand` and `linger`: `Some(linger)` when it polls only while
/// subscribed.
fn on_demand(problems: &mut Problems, key: &str, stream: &RawStream) -> Option<Duration> {
    let linger = duration_in(
        problems,
        &format!("{key}.linger"),
        stream.linger,
        defaults::LINGER,
        limits::LINGER,
    );
    if stream.on_demand.unwrap_or(defaults::ON_DEMAND) {
        return Some(linger);
    }
    if stream.linger.is_some() {
        problems.push(
            format!("{key}.linger"),
            "expected on_demand = true alongside `linger`, or no `linger`: it is how long an \
             on-demand stream keeps polling after its last subscriber left, and this stream \
             polls always",
        );
    }
    None
}

/// Headers whose values are credentials: never logged, and marked sensitive.
fn is_credential(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "x-api-key" | "api-key"
    )
}

/// Validates one headers table whose dotted key is `table`; `context` starts messages (e.g.
/// `in stream "fleet", `).
fn headers(
    problems: &mut Problems,
    table: &str,
    context: &str,
    raw: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(raw.len());
    let mut seen: HashMap<HeaderName, &str> = HashMap::new();
    for (name, template) in raw {
        let key = header_key(table, name);
        let header = match header_name(name) {
            Ok(header) => header,
            Err(message) => {
                problems.push(key, message);
                continue;
            }
        };
        if MANAGED_HEADERS.contains(&header.as_str()) {
            problems.push(
                key,
                format!(
                    "expected a header that patchwire does not manage itself; {name} is set per \
                     request (conditional requests, compression, connection handling)"
                ),
            );
            continue;
        }
        if let Some(first) = seen.insert(header.clone(), name) {
            problems.push(
                key,
                format!(
                    "header {name:?} is set twice in this table (also as {first:?}); header names \
                     are case-insensitive"
                ),
            );
            continue;
        }
        let resolved = match interpolate(template, env) {
            Ok(resolved) => resolved,
            Err(e) => {
                problems.push(key, format!("{context}the value {e}"));
                continue;
            }
        };
        // The resolved value may be a secret: messages show only the template.
        match HeaderValue::from_str(&resolved) {
            Ok(mut value) => {
                if is_credential(&header) || !references(template).is_empty() {
                    value.set_sensitive(true);
                }
                map.insert(header, value);
            }
            Err(_) => {
                let from_env = if references(template).is_empty() {
                    ""
                } else {
                    " after replacing ${VAR} references"
                };
                problems.push(
                    key,
                    format!("{HEADER_VALUE_EXPECTED}, got {template:?}{from_env}"),
                );
            }
        }
    }
    map
}

const URL_EXPECTED: &str =
    "expected an absolute http or https URL such as \"https://api.example.com/v1/vehicles\"";

fn stream_url(
    problems: &mut Problems,
    key: &str,
    context: &str,
    template: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Url> {
    let resolved = match interpolate(template, env) {
        Ok(resolved) => resolved,
        Err(e) => {
            problems.push(key, format!("{context}the URL {e}"));
            return None;
        }
    };
    // Messages show the template, never the resolved URL, which may hold a secret.
    let url = match Url::parse(resolved.trim()) {
        Ok(url) => url,
        Err(e) => {
            problems.push(key, format!("{URL_EXPECTED}, got {template:?} ({e})"));
            return None;
        }
    };
    if !matches!(url.scheme(), "http" | "https") {
        problems.push(
            key,
            format!(
                "{URL_EXPECTED}, got {template:?} (scheme {:?} is not http or https)",
                url.scheme()
            ),
        );
        return None;
    }
    if url.host_str().is_none_or(str::is_empty) {
        problems.push(key, format!("{URL_EXPECTED}, got {template:?} (no host)"));
        return None;
    }
    Some(url)
}

/// A stream's `[streams.diff]` table with its format's defaults filled in.
///
/// For `gtfs-rt`: the keys of [`gtfs_rt::DEFAULT_KEYS`] for every array pattern the table does
/// not key itself (a key set for the same pattern wins), and `ignore` =
/// [`gtfs_rt::DEFAULT_IGNORE`] unless the table sets `ignore` (`ignore = []` ignores nothing).
/// `json` has no defaults.
fn format_diff_defaults(format: Format, table: &DiffConfig) -> DiffConfig {
    let mut table = table.clone();
    match format {
        Format::Json => {}
        Format::GtfsRt => {
            let keys = table.keys.get_or_insert_with(BTreeMap::new);
            for (array, key) in gtfs_rt::DEFAULT_KEYS {
                keys.entry(array.to_owned())
                    .or_insert_with(|| key.to_owned());
            }
            table
                .ignore
                .get_or_insert_with(|| gtfs_rt::DEFAULT_IGNORE.map(str::to_owned).to_vec());
        }
    }
    table
}

/// The rate-limit group a stream joins when it names none: its upstream's `host:port`.
pub fn host_group(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_group_defaults_the_port_by_scheme() {
        let url = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            host_group(&url("https://api.example.com/x")),
            "api.example.com:443"
        );
        assert_eq!(
            host_group(&url("http://api.example.com/x")),
            "api.example.com:80"
        );
        assert_eq!(
            host_group(&url("http://127.0.0.1:8081/feeds")),
            "127.0.0.1:8081"
        );
        assert_eq!(host_group(&url("http://[::1]:9000/")), "[::1]:9000");
    }
}

//! Pure validation: [`RawConfig`] in, [`Config`] or every problem out. No I/O; the environment
//! is read only through the `env` lookup passed in (for `${VAR}` references).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use url::Url;

use super::model::{
    BackoffSettings, Config, Cors, LogFormat, LogSettings, PushSettings, PushStreamSettings,
    RateLimit, ServerSettings, StreamSettings, UpstreamSettings,
};
use super::raw::{
    RawBackoff, RawConfig, RawCors, RawLog, RawLogFormat, RawPush, RawRateLimit, RawServer,
    RawSource, RawStream, RawStreamDefaults, RawUpstream,
};
use crate::diff::DiffConfig;
use crate::upstream::decode::{Format, gtfs_rt};
use crate::validation::{
    ConfigError, HEADER_VALUE_EXPECTED, MANAGED_HEADERS, NAME_EXPECTED, Problems, bytes_in,
    duration_in, fmt_duration, fraction, header_key, header_name, integer_in, interpolate,
    is_valid_name, references, socket_address, usize_of,
};

/// Built-in defaults, used when neither the file nor the environment sets a key.
pub mod defaults {
    use std::time::Duration;

    /// `server.listen`.
    pub const LISTEN: &str = "127.0.0.1:8080";
    /// `server.keepalive`.
    pub const KEEPALIVE: Duration = Duration::from_secs(15);
    /// `server.retry`.
    pub const RETRY: Duration = Duration::from_secs(2);
    /// `server.subscriber_buffer`.
    pub const SUBSCRIBER_BUFFER: u64 = 256;
    /// `server.stall_timeout`.
    pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
    /// `server.shutdown_grace`.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
    /// `server.header_timeout`.
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
    /// `server.idle_timeout`.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// `server.body_timeout`.
    pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// `server.max_connections`.
    pub const MAX_CONNECTIONS: u64 = 10_000;
    /// `log.level`.
    pub const LOG_LEVEL: &str = "info";
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
}

/// Inclusive bounds of the numeric and duration keys.
pub mod limits {
    use std::time::Duration;

    /// `interval`.
    pub const INTERVAL: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(24 * 3600));
    /// `timeout`.
    pub const TIMEOUT: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(600));
    /// `server.keepalive`.
    pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(600));
    /// `server.retry`.
    pub const RETRY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(600));
    /// `server.stall_timeout`.
    pub const STALL_TIMEOUT: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(3600));
    /// `server.shutdown_grace`.
    pub const SHUTDOWN_GRACE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(600));
    /// `server.header_timeout`.
    pub const HEADER_TIMEOUT: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(600));
    /// `server.idle_timeout`.
    pub const IDLE_TIMEOUT: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(3600));
    /// `server.body_timeout`.
    pub const BODY_TIMEOUT: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(3600));
    /// `server.max_connections`.
    pub const MAX_CONNECTIONS: (u64, u64) = (1, 1_000_000);
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
    /// `server.subscriber_buffer`.
    pub const SUBSCRIBER_BUFFER: (u64, u64) = (1, 65_536);
    /// `linger` of an on-demand stream.
    pub const LINGER: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(24 * 3600));
}

/// Validates `raw` (loaded from `source`, if any), resolving `${VAR}` references through `env`.
///
/// Every problem is collected; the error lists them all with their keys.
pub fn validate(
    raw: RawConfig,
    source: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut problems = Problems::default();
    let server = server(&raw.server, &mut problems);
    let log = log(&raw.log, &mut problems);
    let upstream = upstream(&raw.upstream, &mut problems);
    let simulator = raw
        .simulator
        .as_ref()
        .and_then(|sim| sim.validate("simulator", &mut problems));
    if let Some(sim) = &simulator {
        if addresses_overlap(sim.listen, server.listen) {
            problems.push(
                "simulator.listen",
                format!(
                    "expected an address other than server.listen ({}), got {}",
                    server.listen, sim.listen
                ),
            );
        }
    }
    let defaults = stream_defaults(&raw.stream_defaults, env, &mut problems);
    // A proxy-only deployment (`[proxy]` enabled, its tokens, no `[[streams]]`) is valid.
    let proxy_enabled = raw
        .proxy
        .as_ref()
        .is_some_and(|p| p.enabled.unwrap_or(false));
    let (streams, push_streams) = streams(
        &raw.streams,
        proxy_enabled,
        &defaults,
        &upstream,
        env,
        &mut problems,
    );
    let push = push(raw.push.as_ref(), &push_streams, env, &mut problems);
    let webhooks = raw
        .webhooks
        .as_ref()
        .map(|w| super::webhooks::validate(w, &raw.streams, env, &mut problems));
    let proxy = super::proxy::validate(raw.proxy.as_ref(), env, &mut problems);
    problems.finish(
        source,
        Config {
            source: source.map(Path::to_path_buf),
            server,
            log,
            upstream,
            simulator,
            streams,
            push,
            push_streams,
            webhooks,
            proxy,
        },
    )
}

/// True when both sockets could not be bound at once: same fixed port, and the same IP or an
/// unspecified one (`0.0.0.0`, `[::]`) on either side.
fn addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn server(raw: &RawServer, problems: &mut Problems) -> ServerSettings {
    let listen = raw
        .listen
        .as_deref()
        .and_then(|l| {
            socket_address(
                problems,
                "server.listen",
                l.trim(),
                "\"127.0.0.1:8080\" or \"[::]:8080\"",
            )
        })
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let subscriber_buffer = integer_in(
        problems,
        "server.subscriber_buffer",
        raw.subscriber_buffer,
        defaults::SUBSCRIBER_BUFFER,
        limits::SUBSCRIBER_BUFFER,
    );
    let max_connections = integer_in(
        problems,
        "server.max_connections",
        raw.max_connections,
        defaults::MAX_CONNECTIONS,
        limits::MAX_CONNECTIONS,
    );
    ServerSettings {
        listen,
        keepalive: duration_in(
            problems,
            "server.keepalive",
            raw.keepalive,
            defaults::KEEPALIVE,
            limits::KEEPALIVE,
        ),
        retry_hint: duration_in(
            problems,
            "server.retry",
            raw.retry,
            defaults::RETRY,
            limits::RETRY,
        ),
        subscriber_buffer: usize_of(subscriber_buffer),
        stall_timeout: duration_in(
            problems,
            "server.stall_timeout",
            raw.stall_timeout,
            defaults::STALL_TIMEOUT,
            limits::STALL_TIMEOUT,
        ),
        shutdown_grace: duration_in(
            problems,
            "server.shutdown_grace",
            raw.shutdown_grace,
            defaults::SHUTDOWN_GRACE,
            limits::SHUTDOWN_GRACE,
        ),
        header_timeout: duration_in(
            problems,
            "server.header_timeout",
            raw.header_timeout,
            defaults::HEADER_TIMEOUT,
            limits::HEADER_TIMEOUT,
        ),
        idle_timeout: duration_in(
            problems,
            "server.idle_timeout",
            raw.idle_timeout,
            defaults::IDLE_TIMEOUT,
            limits::IDLE_TIMEOUT,
        ),
        body_timeout: duration_in(
            problems,
            "server.body_timeout",
            raw.body_timeout,
            defaults::BODY_TIMEOUT,
            limits::BODY_TIMEOUT,
        ),
        max_connections: usize_of(max_connections),
        cors: cors(raw.cors.as_ref(), problems),
    }
}

fn cors(raw: Option<&RawCors>, problems: &mut Problems) -> Cors {
    let Some(origins) = raw.and_then(|c| c.allow_origins.as_ref()) else {
        return Cors::AnyOrigin;
    };
    if origins.is_empty() {
        return Cors::Disabled;
    }
    if origins.iter().any(|o| o == "*") {
        if origins.len() > 1 {
            problems.push(
                "server.cors.allow_origins",
                "expected either [\"*\"] alone or a list of origins, got \"*\" among other origins",
            );
        }
        return Cors::AnyOrigin;
    }
    let mut allowed = Vec::with_capacity(origins.len());
    for (i, origin) in origins.iter().enumerate() {
        match parse_origin(origin) {
            Ok(value) => allowed.push(value),
            Err(message) => problems.push(format!("server.cors.allow_origins[{i}]"), message),
        }
    }
    Cors::Origins(allowed)
}

fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    const EXPECTED: &str =
        "expected an origin: scheme, host and optional port, such as \"https://app.example.com\"";
    let url = Url::parse(origin).map_err(|e| format!("{EXPECTED}, got {origin:?} ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{EXPECTED}, got {origin:?} (scheme must be http or https)"
        ));
    }
    let canonical = url.origin().ascii_serialization();
    if canonical != origin {
        return Err(format!(
            "{EXPECTED}, got {origin:?} (an origin has no path, query or trailing slash and is \
             lowercase; did you mean {canonical:?}?)"
        ));
    }
    HeaderValue::from_str(&canonical).map_err(|_| format!("{EXPECTED}, got {origin:?}"))
}

fn log(raw: &RawLog, problems: &mut Problems) -> LogSettings {
    let format = match raw.format {
        None | Some(RawLogFormat::Plain) => LogFormat::Plain,
        Some(RawLogFormat::Json) => LogFormat::Json,
    };
    let filter = raw
        .level
        .as_deref()
        .map(str::trim)
        .unwrap_or(defaults::LOG_LEVEL)
        .to_owned();
    if let Err(message) = check_log_filter(&filter) {
        problems.push("log.level", message);
    }
    LogSettings { format, filter }
}

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A filter is a comma-separated list of levels and `target=level` directives. A bare word that
/// is not a level would silently be read as a target by `EnvFilter`, hiding typos like `"inf"`.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const EXPECTED: &str = "expected a level (trace, debug, info, warn, error, off) or \
                            comma-separated directives such as \"info,patchwire=debug\"";
    let directives: Vec<&str> = filter.split(',').map(str::trim).collect();
    for directive in &directives {
        let bare_level = LEVELS.contains(&directive.to_ascii_lowercase().as_str());
        let targeted = directive.contains('=') || directive.contains('[');
        if !bare_level && !targeted {
            return Err(format!("{EXPECTED}, got {filter:?}"));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(|_| ())
        .map_err(|e| format!("{EXPECTED}, got {filter:?} ({e})"))
}

fn upstream(raw: &RawUpstream, problems: &mut Problems) -> UpstreamSettings {
    let user_agent = raw
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
        raw.default_rate_limit.as_ref().unwrap_or(&default),
        defaults::RATE_PER_SECOND,
    );
    let mut rate_limits = BTreeMap::new();
    for (name, limit) in &raw.rate_limits {
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
        backoff: backoff(&raw.backoff, problems),
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

/// `[stream_defaults]` after validation, with built-in defaults filled in.
struct StreamDefaults {
    interval: Duration,
    timeout: Duration,
    max_body: u64,
    format: Format,
    history: u64,
    history_bytes: u64,
    headers: HeaderMap,
}

fn stream_defaults(
    raw: &RawStreamDefaults,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> StreamDefaults {
    StreamDefaults {
        interval: duration_in(
            problems,
            "stream_defaults.interval",
            raw.interval,
            defaults::INTERVAL,
            limits::INTERVAL,
        ),
        timeout: duration_in(
            problems,
            "stream_defaults.timeout",
            raw.timeout,
            defaults::TIMEOUT,
            limits::TIMEOUT,
        ),
        max_body: bytes_in(
            problems,
            "stream_defaults.max_body",
            raw.max_body,
            defaults::MAX_BODY,
            limits::MAX_BODY,
        ),
        format: raw.format.unwrap_or_default(),
        history: integer_in(
            problems,
            "stream_defaults.history",
            raw.history,
            defaults::HISTORY,
            limits::HISTORY,
        ),
        history_bytes: bytes_in(
            problems,
            "stream_defaults.history_bytes",
            raw.history_bytes,
            defaults::HISTORY_BYTES,
            limits::HISTORY_BYTES,
        ),
        headers: headers(problems, "stream_defaults.headers", "", &raw.headers, env),
    }
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

fn streams(
    raw: &[RawStream],
    proxy_enabled: bool,
    defaults: &StreamDefaults,
    upstream: &UpstreamSettings,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> (Vec<StreamSettings>, Vec<PushStreamSettings>) {
    if raw.is_empty() && !proxy_enabled {
        problems.push(
            "streams",
            "expected at least one [[streams]] entry (a stream needs at least `name` and `url`), \
             or an enabled [proxy] with its [[proxy.tokens]]",
        );
    }
    let mut first_index: HashMap<&str, usize> = HashMap::new();
    let mut streams = Vec::with_capacity(raw.len());
    let mut push_streams = Vec::new();
    for (i, stream) in raw.iter().enumerate() {
        let key = format!("streams[{i}]");
        let before = problems.len();
        if !is_valid_name(&stream.name) {
            problems.push(
                format!("{key}.name"),
                format!("{NAME_EXPECTED}, got {:?}", stream.name),
            );
        } else if let Some(first) = first_index.insert(&stream.name, i) {
            first_index.insert(&stream.name, first);
            problems.push(
                format!("{key}.name"),
                format!(
                    "expected a unique name, but {:?} is also the name of streams[{first}]",
                    stream.name
                ),
            );
        }
        if stream.source == RawSource::Push {
            if let Some(push) = push_stream(stream, &key, problems) {
                if problems.len() == before {
                    push_streams.push(push);
                }
            }
            continue;
        }
        let context = format!("in stream {:?}, ", stream.name);
        let url = match &stream.url {
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
            stream.interval,
            defaults.interval,
            limits::INTERVAL,
        );
        let timeout = duration_in(
            problems,
            &format!("{key}.timeout"),
            stream.timeout,
            defaults.timeout,
            limits::TIMEOUT,
        );
        let max_body_bytes = bytes_in(
            problems,
            &format!("{key}.max_body"),
            stream.max_body,
            defaults.max_body,
            limits::MAX_BODY,
        );
        let history = integer_in(
            problems,
            &format!("{key}.history"),
            stream.history,
            defaults.history,
            limits::HISTORY,
        );
        let history_bytes = bytes_in(
            problems,
            &format!("{key}.history_bytes"),
            stream.history_bytes,
            defaults.history_bytes,
            limits::HISTORY_BYTES,
        );
        let on_demand = on_demand(problems, &key, stream);
        let own_headers = headers(
            problems,
            &format!("{key}.headers"),
            &context,
            &stream.headers,
            env,
        );
        // The stream's own headers replace defaults of the same name.
        let mut headers = defaults.headers.clone();
        for (name, value) in &own_headers {
            headers.insert(name.clone(), value.clone());
        }
        let rate_limit_group = match (&stream.rate_limit_group, &url) {
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
        let format = stream.format.unwrap_or(defaults.format);
        let diff =
            format_diff_defaults(format, &stream.diff).validate(&format!("{key}.diff"), problems);
        if let (Some(url), Some(diff)) = (url, diff) {
            if problems.len() == before {
                streams.push(StreamSettings {
                    name: stream.name.clone(),
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
                });
            }
        }
    }
    (streams, push_streams)
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
    if stream.on_demand == Some(true) {
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

/// A `source = "push"` stream: only `name`, `history` and `diff` apply; keys that only make
/// sense for polling are refused rather than silently ignored.
fn push_stream(
    stream: &RawStream,
    key: &str,
    problems: &mut Problems,
) -> Option<PushStreamSettings> {
    let poll_only = [
        ("url", stream.url.is_some()),
        ("headers", !stream.headers.is_empty()),
        ("interval", stream.interval.is_some()),
        ("timeout", stream.timeout.is_some()),
        ("max_body", stream.max_body.is_some()),
        ("format", stream.format.is_some()),
        ("rate_limit_group", stream.rate_limit_group.is_some()),
        ("on_demand", stream.on_demand.is_some()),
        ("linger", stream.linger.is_some()),
    ];
    for (name, present) in poll_only {
        if present {
            problems.push(
                format!("{key}.{name}"),
                format!(
                    "`{name}` only applies to polled streams; this stream has source = \"push\" \
                     (its documents arrive by POST/PATCH /streams/{})",
                    stream.name
                ),
            );
        }
    }
    let history = integer_in(
        problems,
        &format!("{key}.history"),
        stream.history,
        defaults::HISTORY,
        limits::HISTORY,
    );
    let history_bytes = bytes_in(
        problems,
        &format!("{key}.history_bytes"),
        stream.history_bytes,
        defaults::HISTORY_BYTES,
        limits::HISTORY_BYTES,
    );
    let diff = stream.diff.validate(&format!("{key}.diff"), problems)?;
    Some(PushStreamSettings {
        name: stream.name.clone(),
        history: usize_of(history),
        history_bytes,
        diff,
    })
}

/// The `[push]` table.
fn push(
    raw: Option<&RawPush>,
    push_streams: &[PushStreamSettings],
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<PushSettings> {
    let Some(raw) = raw else {
        if let Some(first) = push_streams.first() {
            problems.push(
                "push.token",
                format!(
                    "missing required key: push streams (such as {:?}) are fed by POST/PATCH, \
                     which need a bearer token in a [push] table",
                    first.name
                ),
            );
        }
        return None;
    };
    let token = match interpolate(&raw.token, env) {
        Ok(token) => token,
        Err(e) => {
            problems.push("push.token", format!("the token {e}"));
            return None;
        }
    };
    if token.chars().count() < MIN_PUSH_TOKEN_CHARS || token.chars().any(char::is_whitespace) {
        // Never echo the token.
        problems.push(
            "push.token",
            format!(
                "expected at least {MIN_PUSH_TOKEN_CHARS} characters without spaces (a guessable \
                 token lets anyone rewrite the stream)"
            ),
        );
        return None;
    }
    let max_body_bytes = bytes_in(
        problems,
        "push.max_body",
        raw.max_body,
        defaults::MAX_BODY,
        limits::MAX_BODY,
    );
    Some(PushSettings {
        token,
        max_body_bytes,
    })
}

/// Shortest push token accepted.
const MIN_PUSH_TOKEN_CHARS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::describe;
    use crate::config::raw::RawStream;
    use bytesize::ByteSize;
    use proptest::prelude::*;

    const SECRET: &str = "s3cret-7f3a";

    fn stream(name: &str, url: &str) -> RawStream {
        RawStream {
            name: name.to_owned(),
            source: RawSource::Poll,
            url: Some(url.to_owned()),
            headers: BTreeMap::new(),
            interval: None,
            timeout: None,
            max_body: None,
            format: None,
            history: None,
            history_bytes: None,
            rate_limit_group: None,
            diff: Default::default(),
            on_demand: None,
            linger: None,
        }
    }

    proptest! {
        /// Whatever a file says, validation returns (no panic), every error carries at least one
        /// problem with a key, and a resolved `${VAR}` value never appears in an error or in
        /// `describe`.
        #[test]
        fn validation_is_total_and_never_shows_resolved_values(
            name in "[A-Za-z0-9 ._-]{0,70}",
            url in "(https?|ftp)://[a-z0-9.:-]{0,20}(/[a-z0-9]{0,5})?|[a-z :/]{0,20}",
            header_name in "[A-Za-z -]{1,10}",
            header_value in "[a-zA-Z ${}_]{0,20}",
            newline_in_secret in any::<bool>(),
            interval_ms in 0u64..200_000_000,
            history in 0u64..200_000,
            max_body in 0u64..(2 << 30),
        ) {
            let mut s = stream(&name, &url);
            s.headers.insert(header_name, format!("{header_value}${{TOKEN}}"));
            s.interval = Some(Duration::from_millis(interval_ms));
            s.history = Some(history);
            s.max_body = Some(ByteSize::b(max_body));
            let raw = RawConfig { streams: vec![s], ..Default::default() };
            let secret = if newline_in_secret { format!("{SECRET}\n") } else { SECRET.to_owned() };
            let env = move |_: &str| Some(secret.clone());
            match validate(raw, None, &env) {
                Ok(config) => {
                    let st = &config.streams[0];
                    prop_assert!(st.interval >= limits::INTERVAL.0 && st.interval <= limits::INTERVAL.1);
                    prop_assert!((1..=100_000).contains(&st.history));
                    prop_assert!((1024..=1 << 30).contains(&st.max_body_bytes));
                    prop_assert!(is_valid_name(&st.name));
                    prop_assert!(!describe(&config).contains(SECRET));
                }
                Err(err) => {
                    prop_assert!(!err.problems.is_empty());
                    prop_assert!(err.problems.iter().all(|p| !p.key.is_empty()));
                    prop_assert!(!err.to_string().contains(SECRET), "{}", err);
                }
            }
        }

        /// Durations are accepted exactly within their documented bounds.
        #[test]
        fn interval_bounds_are_inclusive(ms in 0u64..100_000_000) {
            let mut s = stream("a", "http://example.com/");
            s.interval = Some(Duration::from_millis(ms));
            let raw = RawConfig { streams: vec![s], ..Default::default() };
            let ok = validate(raw, None, &|_| None).is_ok();
            let d = Duration::from_millis(ms);
            prop_assert_eq!(ok, d >= limits::INTERVAL.0 && d <= limits::INTERVAL.1);
        }
    }

    fn keys_of(config: &Config) -> Vec<(String, String)> {
        config.streams[0]
            .diff
            .keys
            .iter()
            .map(|k| (k.array.as_str().to_owned(), k.key.as_str().to_owned()))
            .collect()
    }

    fn ignored(config: &Config) -> Vec<&str> {
        config.streams[0]
            .diff
            .ignore
            .iter()
            .map(|p| p.as_str())
            .collect()
    }

    #[test]
    fn gtfs_rt_streams_get_default_keys_and_ignore_the_header_timestamp() {
        let mut s = stream("vp", "https://cdn.example.com/VehiclePositions.pb");
        s.format = Some(Format::GtfsRt);
        let raw = RawConfig {
            streams: vec![s],
            ..Default::default()
        };
        let config = validate(raw, None, &|_| None).unwrap();
        let mut keys = keys_of(&config);
        keys.sort();
        let mut expected: Vec<(String, String)> = gtfs_rt::DEFAULT_KEYS
            .iter()
            .map(|(a, k)| ((*a).to_owned(), (*k).to_owned()))
            .collect();
        expected.sort();
        assert_eq!(keys, expected);
        assert_eq!(ignored(&config), ["/header/timestamp"]);
    }

    #[test]
    fn gtfs_rt_defaults_come_from_stream_defaults_format_too() {
        let raw = RawConfig {
            stream_defaults: RawStreamDefaults {
                format: Some(Format::GtfsRt),
                ..Default::default()
            },
            streams: vec![stream("tu", "https://cdn.example.com/TripUpdates.pb")],
            ..Default::default()
        };
        let config = validate(raw, None, &|_| None).unwrap();
        assert_eq!(config.streams[0].format, Format::GtfsRt);
        assert_eq!(keys_of(&config).len(), gtfs_rt::DEFAULT_KEYS.len());
        assert_eq!(ignored(&config), ["/header/timestamp"]);
    }

    #[test]
    fn configured_keys_replace_the_default_of_their_array_only() {
        let mut s = stream("vp", "https://cdn.example.com/VehiclePositions.pb");
        s.format = Some(Format::GtfsRt);
        s.diff = serde_json::from_value(serde_json::json!({
            "keys": {"/entity": "vehicle/vehicle/id"},
            "ignore": [],
        }))
        .unwrap();
        let raw = RawConfig {
            streams: vec![s],
            ..Default::default()
        };
        let config = validate(raw, None, &|_| None).unwrap();
        let keys = keys_of(&config);
        assert!(
            keys.contains(&("/entity".into(), "vehicle/vehicle/id".into())),
            "{keys:?}"
        );
        assert!(!keys.contains(&("/entity".into(), "id".into())), "{keys:?}");
        assert!(
            keys.contains(&(
                "/entity/*/trip_update/stop_time_update".into(),
                "stop_sequence".into()
            )),
            "{keys:?}"
        );
        assert!(ignored(&config).is_empty(), "ignore = [] turns it off");
    }

    #[test]
    fn json_streams_get_no_format_defaults() {
        let raw = RawConfig {
            streams: vec![stream("api", "https://api.example.com/v1")],
            ..Default::default()
        };
        let config = validate(raw, None, &|_| None).unwrap();
        assert_eq!(config.streams[0].format, Format::Json);
        assert!(keys_of(&config).is_empty());
        assert!(ignored(&config).is_empty());
    }

    #[test]
    fn invalid_keys_next_to_gtfs_rt_defaults_are_reported_under_the_stream() {
        let mut s = stream("vp", "https://cdn.example.com/VehiclePositions.pb");
        s.format = Some(Format::GtfsRt);
        s.diff = serde_json::from_value(serde_json::json!({"keys": {"entity": "id"}})).unwrap();
        let raw = RawConfig {
            streams: vec![s],
            ..Default::default()
        };
        let err = validate(raw, None, &|_| None).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(
            err.problems[0].key, "streams[0].diff.keys.\"entity\"",
            "{err}"
        );
    }

    #[test]
    fn listeners_overlap_on_the_same_port_or_a_wildcard() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(addresses_overlap(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(addresses_overlap(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(addresses_overlap(a("127.0.0.1:80"), a("[::]:80")));
        assert!(!addresses_overlap(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!addresses_overlap(a("127.0.0.1:80"), a("127.0.0.1:81")));
        assert!(!addresses_overlap(a("127.0.0.1:0"), a("127.0.0.1:0")));
    }

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

    #[test]
    fn log_filters_reject_typos_that_envfilter_would_accept() {
        assert!(check_log_filter("info").is_ok());
        assert!(check_log_filter("INFO").is_ok());
        assert!(check_log_filter("warn,patchwire=debug").is_ok());
        assert!(check_log_filter("inf").is_err());
        assert!(check_log_filter("info,").is_err());
        assert!(check_log_filter("patchwire=loud").is_err());
    }

    #[test]
    fn origins_must_be_canonical() {
        assert!(parse_origin("https://app.example.com").is_ok());
        assert!(parse_origin("http://localhost:3000").is_ok());
        let err = parse_origin("https://app.example.com/").unwrap_err();
        assert!(
            err.contains("did you mean \"https://app.example.com\""),
            "{err}"
        );
        assert!(parse_origin("ftp://example.com").is_err());
        assert!(parse_origin("example.com").is_err());
    }
}

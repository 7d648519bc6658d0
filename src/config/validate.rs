//! Pure validation of the whole file: [`RawConfig`] in, [`Config`] or every problem out. Each
//! component's section is validated by the component; this calls them, validates the sections
//! the application owns (`[server]`, `[log]`, `[push]`) and what spans sections (stream names,
//! push streams, overlapping listeners). No I/O but one: the schema files streams name
//! (`schema`) are read here, so that a missing or malformed one is reported with every other
//! problem; the environment is read only through the `env` lookup passed in (for `${VAR}`
//! references).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;

use http::header::HeaderValue;
use url::Url;

use super::model::{
    Config, Cors, LogFormat, LogSettings, PushSettings, PushStreamSettings, ServerSettings,
};
use super::raw::{RawConfig, RawCors, RawLog, RawLogFormat, RawPush, RawServer};
use crate::sinks::broker::config::Source;
use crate::upstream::config::{
    self as upstream_config, RawSource, RawStream, StreamDefaults, StreamSettings, UpstreamSettings,
};
use crate::validation::schema_file::DocumentSchema;
use crate::validation::{
    ConfigError, NAME_EXPECTED, Problems, bytes_in, duration_in, integer_in, interpolate,
    is_valid_name, socket_address, usize_of,
};

/// Built-in defaults of the keys the application itself owns (`[server]`, `[log]`), used when
/// neither the file nor the environment sets them. Each component's own are beside it
/// (`upstream::config`, `proxy::config`, `sinks::webhook::config`, `diff`, `sim`).
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use crate::config::{Cors, LogFormat};

    /// `server.listen`.
    pub const LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
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
    /// `server.gzip_level` (BENCHMARKS.md, "gzip level": why 6).
    pub const GZIP_LEVEL: crate::wire::gzip::Level = crate::wire::gzip::Level::DEFAULT;
    /// `server.cors.allow_origins`: any origin.
    pub const CORS: Cors = Cors::AnyOrigin;
    /// `log.format`.
    pub const LOG_FORMAT: LogFormat = LogFormat::Plain;
    /// `log.level`.
    pub const LOG_LEVEL: &str = "info";
}

/// Inclusive bounds of the keys the application itself owns.
pub mod limits {
    use std::time::Duration;

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
    /// `server.subscriber_buffer`.
    pub const SUBSCRIBER_BUFFER: (u64, u64) = (1, 65_536);
    /// `server.gzip_level`: deflate's levels (0, stored, would make gzip bigger than plain).
    pub const GZIP_LEVEL: (u64, u64) = (
        *crate::wire::gzip::Level::RANGE.start() as u64,
        *crate::wire::gzip::Level::RANGE.end() as u64,
    );
    /// Shortest `push.token`, in characters.
    pub const PUSH_TOKEN_MIN_CHARS: usize = 16;
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
    let upstream = raw.upstream.validate(&mut problems);
    let simulator = raw
        .simulator
        .as_ref()
        .and_then(|sim| sim.validate("simulator", &mut problems));
    if let Some(sim) = &simulator
        && addresses_overlap(sim.listen, server.listen)
    {
        problems.push(
            "simulator.listen",
            format!(
                "expected an address other than server.listen ({}), got {}",
                server.listen, sim.listen
            ),
        );
    }
    let defaults = raw.stream_defaults.validate(env, &mut problems);
    // A proxy-only deployment (`[proxy]` enabled, its tokens, no `[[streams]]`) is valid.
    let proxy_enabled = raw.proxy.as_ref().is_some_and(|p| p.is_enabled());
    let (streams, push_streams) = streams(
        &raw.streams,
        proxy_enabled,
        &defaults,
        &upstream,
        env,
        &mut problems,
    );
    let push = push(raw.push.as_ref(), &push_streams, env, &mut problems);
    let stream_names: Vec<&str> = raw.streams.iter().map(|s| s.name.as_str()).collect();
    let sources: Vec<Source<'_>> = stream_names
        .iter()
        .map(|name| Source {
            name,
            views: streams
                .iter()
                .find(|s| s.name == *name)
                .and_then(|s| s.views.as_ref())
                .or_else(|| {
                    push_streams
                        .iter()
                        .find(|s| s.name == *name)
                        .and_then(|s| s.views.as_ref())
                }),
        })
        .collect();
    let webhooks = raw
        .webhooks
        .as_ref()
        .map(|w| w.validate(&sources, env, &mut problems));
    let proxy = raw
        .proxy
        .as_ref()
        .and_then(|p| p.validate(env, &mut problems));
    let cluster = raw
        .cluster
        .as_ref()
        .and_then(|c| c.validate(env, &mut problems));
    if let (Some(cluster), Some(webhooks)) = (&raw.cluster, &webhooks) {
        match (webhooks.store.is_shared(), &cluster.webhooks_node) {
            // Every node dispatches the streams it holds and delivers from the shared store.
            (true, None) => {}
            (true, Some(node)) => problems.push(
                "cluster.webhooks_node",
                format!(
                    "expected no webhooks node with a PostgreSQL `webhooks.store` (every node \
                     shares it and delivers), got {node:?}: remove the key, or use an SQLite \
                     store delivered by that one node"
                ),
            ),
            // Each node would deliver every change from its own file: one node does.
            (false, Some(_)) => {}
            (false, None) => problems.push(
                "cluster.webhooks_node",
                "expected the id of the one node that delivers webhooks (set `cluster.node_id` \
                 to it on that node): in a cluster, webhooks on an SQLite store run on a single \
                 node; with a PostgreSQL `webhooks.store` every node shares, they run on all",
            ),
        }
    }
    if let (Some(cluster), None) = (&raw.cluster, &raw.webhooks)
        && let Some(node) = &cluster.webhooks_node
    {
        problems.push(
            "cluster.webhooks_node",
            format!(
                "expected no webhooks node without a [webhooks] table (there are no webhooks to \
                 deliver), got {node:?}: remove the key, or add the [webhooks] table"
            ),
        );
    }
    let websocket = raw.websocket.validate(&mut problems);
    let max_views = raw.views.validate(&mut problems);
    let broker_sinks = raw.sinks.validate(&sources, env, &mut problems);
    let document_schemas = document_schemas(&raw.streams, source, &mut problems);
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
            cluster,
            websocket,
            max_views,
            broker_sinks,
            document_schemas,
        },
    )
}

/// The schema files `[[streams]]` entries name (`schema`), read relative to the configuration
/// file's directory (the working directory for a configuration without a file).
fn document_schemas(
    raw: &[RawStream],
    source: Option<&Path>,
    problems: &mut Problems,
) -> BTreeMap<String, DocumentSchema> {
    let base = source.and_then(Path::parent);
    raw.iter()
        .enumerate()
        .filter_map(|(i, stream)| {
            let written = stream.schema.as_deref()?;
            let key = format!("streams[{i}].schema");
            let schema =
                crate::validation::schema_file::document_schema(problems, &key, base, written)?;
            Some((stream.name.clone(), schema))
        })
        .collect()
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
        .unwrap_or(defaults::LISTEN);
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
    let gzip_level = integer_in(
        problems,
        "server.gzip_level",
        raw.gzip_level,
        u64::from(defaults::GZIP_LEVEL.get()),
        limits::GZIP_LEVEL,
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
        gzip_level: u32::try_from(gzip_level)
            .ok()
            .and_then(crate::wire::gzip::Level::new)
            .unwrap_or(defaults::GZIP_LEVEL),
        cors: cors(raw.cors.as_ref(), problems),
    }
}

fn cors(raw: Option<&RawCors>, problems: &mut Problems) -> Cors {
    let Some(origins) = raw.and_then(|c| c.allow_origins.as_ref()) else {
        return defaults::CORS;
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
        None => defaults::LOG_FORMAT,
        Some(RawLogFormat::Plain) => LogFormat::Plain,
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

/// The `[[streams]]` entries: names valid and unique across them; push streams here, polled
/// ones by `upstream`.
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
            if let Some(push) = push_stream(stream, &key, problems)
                && problems.len() == before
            {
                push_streams.push(push);
            }
            continue;
        }
        if let Some(settings) = stream.validate_polled(&key, defaults, upstream, env, problems)
            && problems.len() == before
        {
            streams.push(settings);
        }
    }
    (streams, push_streams)
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
        upstream_config::defaults::HISTORY,
        upstream_config::limits::HISTORY,
    );
    let history_bytes = bytes_in(
        problems,
        &format!("{key}.history_bytes"),
        stream.history_bytes,
        upstream_config::defaults::HISTORY_BYTES,
        upstream_config::limits::HISTORY_BYTES,
    );
    let views = crate::views::config::validate(
        key,
        false,
        stream.filtering.as_ref(),
        &stream.views,
        problems,
    );
    let diff = stream.diff.validate(&format!("{key}.diff"), problems)?;
    Some(PushStreamSettings {
        name: stream.name.clone(),
        history: usize_of(history),
        history_bytes,
        diff,
        views,
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
    let min = limits::PUSH_TOKEN_MIN_CHARS;
    if token.chars().count() < min || token.chars().any(char::is_whitespace) {
        // Never echo the token.
        problems.push(
            "push.token",
            format!(
                "expected at least {min} characters without spaces (a guessable token lets \
                 anyone rewrite the stream)"
            ),
        );
        return None;
    }
    // A pushed body has the bounds and default of a polled one.
    let max_body_bytes = bytes_in(
        problems,
        "push.max_body",
        raw.max_body,
        upstream_config::defaults::MAX_BODY,
        upstream_config::limits::MAX_BODY,
    );
    Some(PushSettings {
        token,
        max_body_bytes,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use bytesize::ByteSize;
    use proptest::prelude::*;

    use super::*;
    use crate::config::describe;
    use crate::upstream::config::{RawStreamDefaults, limits};
    use crate::upstream::decode::{Format, gtfs_rt};

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
            filtering: None,
            views: Vec::new(),
            schema: None,
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

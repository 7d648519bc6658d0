//! The `[webhooks]` section: its shape as written (serde, unknown keys rejected), its defaults
//! and bounds, its pure validation (durations and counts within bounds, endpoints that name
//! configured streams, valid URLs and secrets, headers patchwire does not manage itself), and
//! the settings the outbox, the workers and the admin API are built from.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use http::header::HeaderValue;
use serde::Deserialize;
use url::Url;

use super::body::{Events, Format, Mode};
use super::schedule::RetrySchedule;
use super::sign::Secret;
use crate::sinks::broker::config::{Source, resolve_entry};
use crate::ssrf;
use crate::validation::{
    HEADER_VALUE_EXPECTED, MANAGED_HEADERS, NAME_EXPECTED, Problems, duration_in, fraction,
    header_key, header_name, integer_in, interpolate, is_valid_name, usize_of,
};

/// Built-in defaults of `[webhooks]`. Those of the retry schedule (`schedule`, `jitter`,
/// `max_retry_after`) are [`RetrySchedule::default`]'s.
pub mod defaults {
    use std::time::Duration;

    use crate::sinks::webhook::body::{Format, Mode};

    /// `webhooks.database`.
    pub const DATABASE: &str = "patchwire-webhooks.db";
    /// `webhooks.allow_private_targets`.
    pub const ALLOW_PRIVATE_TARGETS: bool = false;
    /// `webhooks.attempt_timeout`.
    pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
    /// `webhooks.disable_after`.
    pub const DISABLE_AFTER: Duration = Duration::from_secs(5 * 24 * 3600);
    /// `webhooks.max_concurrency_per_endpoint`.
    pub const MAX_CONCURRENCY_PER_ENDPOINT: u64 = 4;
    /// `webhooks.workers`.
    pub const WORKERS: u64 = 64;
    /// `webhooks.backlog_limit`.
    pub const BACKLOG_LIMIT: u64 = 1000;
    /// `webhooks.retention`.
    pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
    /// `webhooks.attempt_retention`.
    pub const ATTEMPT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
    /// `webhooks.rotation_overlap`.
    pub const ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);
    /// `webhooks.store_connections`.
    pub const STORE_CONNECTIONS: u64 = 16;
    /// `webhooks.claim_timeout` is this many times `webhooks.attempt_timeout` when absent.
    pub const CLAIM_TIMEOUT_FACTOR: u32 = 2;
    /// `webhooks.endpoints[].mode`.
    pub const MODE: Mode = Mode::Patch;
    /// `webhooks.endpoints[].format`.
    pub const FORMAT: Format = Format::Json;
}

/// Inclusive bounds of `[webhooks]` keys.
pub mod limits {
    use std::time::Duration;

    const DAY: u64 = 24 * 3600;
    /// Each `webhooks.schedule` entry.
    pub const SCHEDULE_STEP: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(7 * DAY));
    /// Entries in `webhooks.schedule`.
    pub const SCHEDULE_LEN: (usize, usize) = (1, 50);
    /// `webhooks.max_retry_after`.
    pub const MAX_RETRY_AFTER: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(7 * DAY));
    /// `webhooks.attempt_timeout`.
    pub const ATTEMPT_TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(300));
    /// `webhooks.disable_after`.
    pub const DISABLE_AFTER: (Duration, Duration) =
        (Duration::from_secs(60), Duration::from_secs(30 * DAY));
    /// `webhooks.max_concurrency_per_endpoint`.
    pub const MAX_CONCURRENCY_PER_ENDPOINT: (u64, u64) = (1, 256);
    /// `webhooks.workers`.
    pub const WORKERS: (u64, u64) = (1, 4096);
    /// `webhooks.backlog_limit`.
    pub const BACKLOG_LIMIT: (u64, u64) = (1, 1_000_000);
    /// `webhooks.retention`.
    pub const RETENTION: (Duration, Duration) =
        (Duration::from_secs(60), Duration::from_secs(365 * DAY));
    /// `webhooks.attempt_retention`.
    pub const ATTEMPT_RETENTION: (Duration, Duration) =
        (Duration::from_secs(60), Duration::from_secs(365 * DAY));
    /// `webhooks.rotation_overlap`.
    pub const ROTATION_OVERLAP: (Duration, Duration) =
        (Duration::ZERO, Duration::from_secs(30 * DAY));
    /// Shortest admin token.
    pub const ADMIN_TOKEN_MIN: usize = 16;
    /// `webhooks.store_connections`.
    pub const STORE_CONNECTIONS: (u64, u64) = (1, 256);
    /// `webhooks.claim_timeout`.
    pub const CLAIM_TIMEOUT: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(3600));
    /// Longest endpoint description, in characters.
    pub const DESCRIPTION_MAX: usize = 1024;
    /// Most metadata entries of an endpoint.
    pub const METADATA_ENTRIES: usize = 50;
    /// Longest metadata key, in characters.
    pub const METADATA_KEY_MAX: usize = 64;
    /// Longest metadata value, in characters.
    pub const METADATA_VALUE_MAX: usize = 1024;
    /// An endpoint's `rate_limit`, attempts per second.
    pub const RATE_LIMIT: (u64, u64) = (1, 10_000);
}

/// `[webhooks]`: durable, signed, ordered delivery of changes to registered URLs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    /// Where the outbox lives: absent or `"sqlite"` for the SQLite file `database`, or a
    /// PostgreSQL URL (`postgres://user:password@host:port/dbname`, `${VAR}` allowed), which
    /// the nodes of a cluster share.
    pub store: Option<String>,
    /// The SQLite outbox file ([default](defaults::DATABASE)); its directory must exist.
    /// Used only by the SQLite store.
    pub database: Option<String>,
    /// Connections to PostgreSQL each node keeps at most ([default](defaults::STORE_CONNECTIONS),
    /// [bounds](limits::STORE_CONNECTIONS)).
    pub store_connections: Option<u64>,
    /// How long a node's claim on a delivery holds against the other nodes: a node killed
    /// mid-attempt leaves its claim, and another node retries the delivery (same `webhook-id`)
    /// once it expires. More than `attempt_timeout` ([default](defaults::CLAIM_TIMEOUT_FACTOR)
    /// times it, [bounds](limits::CLAIM_TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub claim_timeout: Option<Duration>,
    /// Allow targets on private, loopback, link-local and metadata addresses
    /// ([default](defaults::ALLOW_PRIVATE_TARGETS)).
    pub allow_private_targets: Option<bool>,
    /// Bearer token of the admin API at `/admin/webhooks` (`${VAR}` allowed); absent disables
    /// the admin API. At least [`ADMIN_TOKEN_MIN`](limits::ADMIN_TOKEN_MIN) characters.
    pub admin_token: Option<String>,
    /// Waits before each attempt, the first normally `"0s"` ([default](RetrySchedule::default);
    /// [entries](limits::SCHEDULE_LEN), [each](limits::SCHEDULE_STEP)).
    pub schedule: Option<Vec<humantime_serde::Serde<Duration>>>,
    /// Fraction of each wait that is randomized, from 0 to 1 ([default](RetrySchedule::default)).
    pub jitter: Option<f64>,
    /// Longest `Retry-After` honoured ([default](RetrySchedule::default),
    /// [bounds](limits::MAX_RETRY_AFTER)).
    #[serde(default, with = "humantime_serde::option")]
    pub max_retry_after: Option<Duration>,
    /// Timeout of one attempt, connect to response headers ([default](defaults::ATTEMPT_TIMEOUT),
    /// [bounds](limits::ATTEMPT_TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub attempt_timeout: Option<Duration>,
    /// An endpoint whose attempts all fail for this long is disabled
    /// ([default](defaults::DISABLE_AFTER), [bounds](limits::DISABLE_AFTER)).
    #[serde(default, with = "humantime_serde::option")]
    pub disable_after: Option<Duration>,
    /// Attempts in flight at once to one endpoint, across its streams
    /// ([default](defaults::MAX_CONCURRENCY_PER_ENDPOINT),
    /// [bounds](limits::MAX_CONCURRENCY_PER_ENDPOINT)).
    pub max_concurrency_per_endpoint: Option<u64>,
    /// Attempts in flight at once across all endpoints ([default](defaults::WORKERS),
    /// [bounds](limits::WORKERS)).
    pub workers: Option<u64>,
    /// Pending deliveries of one (endpoint, stream) above which they collapse into one
    /// snapshot ([default](defaults::BACKLOG_LIMIT), [bounds](limits::BACKLOG_LIMIT)).
    pub backlog_limit: Option<u64>,
    /// How long finished deliveries (delivered, dead, superseded) are kept for listing and
    /// replay ([default](defaults::RETENTION), [bounds](limits::RETENTION)).
    #[serde(default, with = "humantime_serde::option")]
    pub retention: Option<Duration>,
    /// How long the attempt history (`GET /admin/webhooks/{id}/attempts`) keeps an attempt
    /// ([default](defaults::ATTEMPT_RETENTION), [bounds](limits::ATTEMPT_RETENTION)).
    #[serde(default, with = "humantime_serde::option")]
    pub attempt_retention: Option<Duration>,
    /// After a secret rotation, how long the previous secret also signs
    /// ([default](defaults::ROTATION_OVERLAP), [bounds](limits::ROTATION_OVERLAP)).
    #[serde(default, with = "humantime_serde::option")]
    pub rotation_overlap: Option<Duration>,
    /// Where operational events go (`endpoint.disabled`, `delivery.dead`,
    /// `endpoint.recovered`): an http or https URL (`${VAR}` allowed); absent: nowhere.
    pub operator_url: Option<String>,
    /// The secret operational events are signed with (required with `operator_url`; as an
    /// endpoint's `secret`, `${VAR}` allowed).
    pub operator_secret: Option<String>,
    /// Endpoints declared in the file (`[[webhooks.endpoints]]`).
    #[serde(default)]
    pub endpoints: Vec<RawWebhookEndpoint>,
}

/// One `[[webhooks.endpoints]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhookEndpoint {
    /// Unique id, stable across restarts (deliveries are stored under it; see
    /// [`is_valid_name`]).
    pub id: String,
    /// The target URL (http or https; `${VAR}` allowed).
    pub url: String,
    /// Names of the streams it receives (at least one).
    pub streams: Vec<String>,
    /// `"patch"` or `"snapshot"` ([default](defaults::MODE)).
    pub mode: Option<Mode>,
    /// `"json"`, `"cloudevents"` (structured) or `"cloudevents-binary"`
    /// ([default](defaults::FORMAT)).
    pub format: Option<Format>,
    /// Extra headers sent with every delivery (`${VAR}` allowed in values).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The signing secret, `whsec_` + base64 (see [`Secret::parse`]; required here, `${VAR}`
    /// allowed: a file has no creation response to show a generated one in).
    pub secret: String,
    /// What the endpoint is for, for people (at most
    /// [`DESCRIPTION_MAX`](limits::DESCRIPTION_MAX) characters).
    pub description: Option<String>,
    /// Free-form labels (see [`endpoint_metadata`] for their bounds).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Most attempts started per second ([bounds](limits::RATE_LIMIT)); absent: no limit
    /// beyond `max_concurrency_per_endpoint`.
    pub rate_limit: Option<u64>,
    /// Which kinds of change it receives: `["snapshots", "patches"]` (the default) or
    /// `["snapshots"]` (every change whole); see [`Events`].
    pub events: Option<Vec<String>>,
}

/// Webhook delivery: the outbox, the retry policy, the admin API and configured endpoints.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Where the outbox lives.
    pub store: WebhookStore,
    /// How long a claim on a delivery holds against other nodes (a shared store).
    pub claim_timeout: Duration,
    /// Whether targets may resolve to private, loopback, link-local or metadata addresses.
    pub allow_private_targets: bool,
    /// The admin API's bearer token; `None` disables the admin API.
    pub admin_token: Option<AdminToken>,
    /// When failed deliveries are tried again.
    pub schedule: RetrySchedule,
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
    /// How long the attempt history keeps an attempt.
    pub attempt_retention: Duration,
    /// How long a rotated-out secret still signs.
    pub rotation_overlap: Duration,
    /// Where operational events go, if anywhere.
    pub operator: Option<OperatorSettings>,
    /// Endpoints declared in the configuration.
    pub endpoints: Vec<WebhookEndpointSettings>,
}

/// Where the outbox lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookStore {
    /// An SQLite file, owned by this process.
    Sqlite(PathBuf),
    /// A PostgreSQL database, which several nodes may share.
    Postgres(PostgresStore),
}

impl WebhookStore {
    /// Whether the nodes of a cluster can share it.
    pub fn is_shared(&self) -> bool {
        matches!(self, WebhookStore::Postgres(_))
    }
}

impl std::fmt::Display for WebhookStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WebhookStore::Sqlite(path) => write!(f, "SQLite {}", path.display()),
            WebhookStore::Postgres(pg) => write!(
                f,
                "PostgreSQL {} (up to {} connections)",
                pg.shown(),
                pg.connections
            ),
        }
    }
}

/// A PostgreSQL outbox: its URL (which may hold a password: `Debug` and [`Self::shown`] hide
/// it) and the pool's size.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresStore {
    /// `postgres://...` as configured, `${VAR}` resolved.
    pub url: Url,
    /// Most connections kept open.
    pub connections: usize,
}

impl PostgresStore {
    /// The URL without userinfo and with query values hidden.
    pub fn shown(&self) -> crate::redact::Redacted {
        crate::redact::Redacted::new(&self.url)
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.shown().to_string())
            .field("connections", &self.connections)
            .finish()
    }
}

/// What `webhooks.store` may be, for its error messages.
const STORE_EXPECTED: &str = "expected \"sqlite\" (the file webhooks.database) or a PostgreSQL URL \
     such as \"postgres://patchwire:${PGPASSWORD}@db.internal:5432/patchwire\"";

/// Validates `webhooks.store` (and `database`, `store_connections`).
fn store(
    raw: &RawWebhooks,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> WebhookStore {
    let database = raw.database.as_deref().unwrap_or(defaults::DATABASE);
    if database.trim().is_empty() {
        problems.push(
            "webhooks.database",
            "expected a file path such as \"/var/lib/patchwire/webhooks.db\", got an empty string",
        );
    }
    let connections = usize_of(integer_in(
        problems,
        "webhooks.store_connections",
        raw.store_connections,
        defaults::STORE_CONNECTIONS,
        limits::STORE_CONNECTIONS,
    ));
    let sqlite = WebhookStore::Sqlite(PathBuf::from(database));
    let Some(template) = &raw.store else {
        return sqlite;
    };
    let text = match interpolate(template, env) {
        Ok(text) => text,
        Err(e) => {
            problems.push("webhooks.store", format!("the store URL {e}"));
            return sqlite;
        }
    };
    let text = text.trim();
    if text == "sqlite" {
        return sqlite;
    }
    // Never echo the URL: it may hold a password. Its scheme and host are safe to name.
    let url = match Url::parse(text) {
        Ok(url) => url,
        Err(e) => {
            problems.push(
                "webhooks.store",
                format!("{STORE_EXPECTED}; got something that is not a URL ({e})"),
            );
            return sqlite;
        }
    };
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        problems.push(
            "webhooks.store",
            format!("{STORE_EXPECTED}; got a {}:// URL", url.scheme()),
        );
        return sqlite;
    }
    if url.host_str().is_none_or(str::is_empty) {
        problems.push(
            "webhooks.store",
            format!("{STORE_EXPECTED}; got a URL without a host"),
        );
        return sqlite;
    }
    match text.parse::<tokio_postgres::Config>() {
        Err(e) => {
            problems.push(
                "webhooks.store",
                format!("expected a valid PostgreSQL URL, got one PostgreSQL refuses: {e}"),
            );
            sqlite
        }
        Ok(config) if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require => {
            problems.push(
                "webhooks.store",
                "expected a connection without TLS (sslmode=disable or prefer): patchwire does \
                 not speak TLS to PostgreSQL; reach a remote server through a local TLS tunnel \
                 or pooler",
            );
            sqlite
        }
        Ok(_) => WebhookStore::Postgres(PostgresStore { url, connections }),
    }
}

/// The admin API's bearer token; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<hidden>)")
    }
}

/// A view an endpoint receives (one of its `streams`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookView {
    /// What its deliveries are under: `{stream}@{view}`.
    pub name: String,
    /// The source stream.
    pub source: String,
    /// For an ad hoc view, its filter as written (a query string), resolved again at start
    /// as a subscription's is.
    pub query: Option<String>,
}

/// Reads an endpoint's `streams` (a stream's name, `stream@view` or `stream?filter`, as a
/// broker sink's, with the same checks and messages) against the configured `streams`: the
/// names the deliveries are under (a view's `{stream}@{view}`), the views among them, and,
/// per refused entry, its index and what was expected.
pub fn resolve_streams(
    entries: &[String],
    streams: &[Source<'_>],
) -> (Vec<String>, Vec<WebhookView>, Vec<(usize, String)>) {
    let mut names: Vec<String> = Vec::new();
    // Each name listed, with the index of its entry.
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut views = Vec::new();
    let mut refused = Vec::new();
    for (j, entry) in entries.iter().enumerate() {
        match resolve_entry(entry, streams) {
            Err(expected) => refused.push((j, expected)),
            Ok((source, view)) => {
                let name = match &view {
                    Some(view) => format!("{source}@{}", view.id),
                    None => source.clone(),
                };
                if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                    let what = if *entry == name {
                        format!("{entry:?} is")
                    } else {
                        format!("{entry:?} is {name:?},")
                    };
                    refused.push((
                        j,
                        format!(
                            "{what} already listed at streams[{first}]; name each stream or \
                             view once"
                        ),
                    ));
                    continue;
                }
                seen.push((name.clone(), j));
                if let Some(view) = view {
                    views.push(WebhookView {
                        name: name.clone(),
                        source,
                        query: view.query,
                    });
                }
                names.push(name);
            }
        }
    }
    (names, views, refused)
}

/// One endpoint declared in the configuration.
#[derive(Debug, Clone)]
pub struct WebhookEndpointSettings {
    /// Unique, stable id.
    pub id: String,
    /// The target URL.
    pub url: Url,
    /// The streams it receives (all configured): a stream's name, or a view's,
    /// `{stream}@{view}` (`view` a configured name, or `~` and 12 hex digits for an ad hoc
    /// view written as its filter).
    pub streams: Vec<String>,
    /// The views among `streams`, to follow.
    pub views: Vec<WebhookView>,
    /// Patches or whole documents.
    pub mode: Mode,
    /// JSON or CloudEvents.
    pub format: Format,
    /// Extra headers, `${VAR}` resolved.
    pub headers: BTreeMap<String, String>,
    /// The signing secret.
    pub secret: Secret,
    /// What it is for.
    pub description: Option<String>,
    /// Free-form labels.
    pub metadata: BTreeMap<String, String>,
    /// Most attempts started per second.
    pub rate_limit: Option<u32>,
    /// Which kinds of change it receives.
    pub events: Events,
}

/// Headers every delivery sets itself; an endpoint may not override them.
const DELIVERY_HEADERS: [&str; 5] = [
    "content-type",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "user-agent",
];

impl RawWebhooks {
    /// Validates `[webhooks]`; `streams` are the names of the configured streams, which
    /// endpoints may name.
    pub fn validate(
        &self,
        streams: &[Source<'_>],
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> WebhookSettings {
        let allow_private_targets = self
            .allow_private_targets
            .unwrap_or(defaults::ALLOW_PRIVATE_TARGETS);
        let store = store(self, env, problems);
        let admin_token =
            self.admin_token
                .as_deref()
                .and_then(|template| match interpolate(template, env) {
                    Ok(token)
                        if token.len() >= limits::ADMIN_TOKEN_MIN
                            && HeaderValue::from_str(&token).is_ok()
                            && !token.contains(' ') =>
                    {
                        Some(AdminToken(token))
                    }
                    Ok(_) => {
                        problems.push(
                    "webhooks.admin_token",
                    format!(
                        "expected at least {} visible ASCII characters without spaces (the token \
                         is not shown here)",
                        limits::ADMIN_TOKEN_MIN
                    ),
                );
                        None
                    }
                    Err(e) => {
                        problems.push("webhooks.admin_token", format!("the token {e}"));
                        None
                    }
                });
        let built_in = RetrySchedule::default();
        let delays = match &self.schedule {
            None => built_in.delays,
            Some(steps) => {
                let (min_len, max_len) = limits::SCHEDULE_LEN;
                if steps.len() < min_len || steps.len() > max_len {
                    problems.push(
                    "webhooks.schedule",
                    format!(
                        "expected {min_len} to {max_len} durations (the wait before each attempt, \
                         the first normally \"0s\"), got {}",
                        steps.len()
                    ),
                );
                }
                steps
                    .iter()
                    .enumerate()
                    .map(|(i, step)| {
                        duration_in(
                            problems,
                            &format!("webhooks.schedule[{i}]"),
                            Some(step.into_inner()),
                            Duration::ZERO,
                            limits::SCHEDULE_STEP,
                        )
                    })
                    .collect()
            }
        };
        let jitter = fraction(problems, "webhooks.jitter", self.jitter, built_in.jitter);
        let schedule = RetrySchedule {
            delays,
            jitter,
            max_retry_after: duration_in(
                problems,
                "webhooks.max_retry_after",
                self.max_retry_after,
                built_in.max_retry_after,
                limits::MAX_RETRY_AFTER,
            ),
        };
        let mut seen = HashSet::new();
        let endpoints = self
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let key = format!("webhooks.endpoints[{i}]");
                let endpoint = endpoint(&key, e, streams, allow_private_targets, env, problems)?;
                if !seen.insert(endpoint.id.clone()) {
                    problems.push(
                        format!("{key}.id"),
                        format!(
                            "expected a unique id, but {:?} is used by another endpoint",
                            e.id
                        ),
                    );
                    return None;
                }
                Some(endpoint)
            })
            .collect();
        let attempt_timeout = duration_in(
            problems,
            "webhooks.attempt_timeout",
            self.attempt_timeout,
            defaults::ATTEMPT_TIMEOUT,
            limits::ATTEMPT_TIMEOUT,
        );
        let claim_timeout = duration_in(
            problems,
            "webhooks.claim_timeout",
            self.claim_timeout,
            attempt_timeout * defaults::CLAIM_TIMEOUT_FACTOR,
            limits::CLAIM_TIMEOUT,
        );
        if self.claim_timeout.is_some() && claim_timeout <= attempt_timeout {
            problems.push(
                "webhooks.claim_timeout",
                format!(
                    "expected more than webhooks.attempt_timeout ({}): a claim must outlast the \
                     attempt it covers, or another node could send the same delivery while it is \
                     in flight; got \"{}\"",
                    humantime::format_duration(attempt_timeout),
                    humantime::format_duration(claim_timeout)
                ),
            );
        }
        WebhookSettings {
            store,
            claim_timeout,
            allow_private_targets,
            admin_token,
            schedule,
            attempt_timeout,
            disable_after: duration_in(
                problems,
                "webhooks.disable_after",
                self.disable_after,
                defaults::DISABLE_AFTER,
                limits::DISABLE_AFTER,
            ),
            max_concurrency_per_endpoint: usize_of(integer_in(
                problems,
                "webhooks.max_concurrency_per_endpoint",
                self.max_concurrency_per_endpoint,
                defaults::MAX_CONCURRENCY_PER_ENDPOINT,
                limits::MAX_CONCURRENCY_PER_ENDPOINT,
            )),
            workers: usize_of(integer_in(
                problems,
                "webhooks.workers",
                self.workers,
                defaults::WORKERS,
                limits::WORKERS,
            )),
            backlog_limit: usize_of(integer_in(
                problems,
                "webhooks.backlog_limit",
                self.backlog_limit,
                defaults::BACKLOG_LIMIT,
                limits::BACKLOG_LIMIT,
            )),
            retention: duration_in(
                problems,
                "webhooks.retention",
                self.retention,
                defaults::RETENTION,
                limits::RETENTION,
            ),
            attempt_retention: duration_in(
                problems,
                "webhooks.attempt_retention",
                self.attempt_retention,
                defaults::ATTEMPT_RETENTION,
                limits::ATTEMPT_RETENTION,
            ),
            rotation_overlap: duration_in(
                problems,
                "webhooks.rotation_overlap",
                self.rotation_overlap,
                defaults::ROTATION_OVERLAP,
                limits::ROTATION_OVERLAP,
            ),
            operator: operator(self, allow_private_targets, env, problems),
            endpoints,
        }
    }
}

/// Where operational events go (`[webhooks] operator_url` and `operator_secret`).
#[derive(Debug, Clone)]
pub struct OperatorSettings {
    /// The operator's URL.
    pub url: Url,
    /// The secret events are signed with.
    pub secret: Secret,
}

/// Validates `operator_url` and `operator_secret`: both or neither.
fn operator(
    raw: &RawWebhooks,
    allow_private: bool,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<OperatorSettings> {
    let (url, secret) = match (&raw.operator_url, &raw.operator_secret) {
        (None, None) => return None,
        (Some(url), Some(secret)) => (url, secret),
        (Some(_), None) => {
            problems.push(
                "webhooks.operator_secret",
                "expected a signing secret (\"whsec_\" + base64, or \"whsk_\" + base64 of an                  ed25519 seed) with webhooks.operator_url",
            );
            return None;
        }
        (None, Some(_)) => {
            problems.push(
                "webhooks.operator_url",
                "expected the URL operational events are sent to, with webhooks.operator_secret",
            );
            return None;
        }
    };
    let url = match interpolate(url, env) {
        Err(e) => {
            problems.push("webhooks.operator_url", format!("the URL {e}"));
            None
        }
        Ok(resolved) => match Url::parse(resolved.trim()) {
            Err(e) => {
                problems.push(
                    "webhooks.operator_url",
                    format!(
                        "expected an absolute http or https URL such as \
                         \"https://ops.example.com/patchwire\", got {url:?} ({e})"
                    ),
                );
                None
            }
            Ok(url) => match ssrf::check_url(&url, allow_private) {
                Ok(()) => Some(url),
                Err(e) => {
                    problems.push("webhooks.operator_url", e.to_string());
                    None
                }
            },
        },
    };
    let secret = match interpolate(secret, env) {
        Err(e) => {
            problems.push("webhooks.operator_secret", format!("the secret {e}"));
            None
        }
        Ok(text) => match Secret::parse(&text) {
            Ok(secret) => Some(secret),
            Err(e) => {
                // Never echo the secret itself.
                problems.push("webhooks.operator_secret", e.to_string());
                None
            }
        },
    };
    Some(OperatorSettings {
        url: url?,
        secret: secret?,
    })
}

/// Validates an endpoint's description (shared with the admin API).
pub fn endpoint_description(text: &str) -> Result<(), String> {
    let chars = text.chars().count();
    if chars > limits::DESCRIPTION_MAX {
        return Err(format!(
            "expected at most {} characters, got {chars}",
            limits::DESCRIPTION_MAX
        ));
    }
    Ok(())
}

/// Validates an endpoint's metadata (shared with the admin API): at most
/// [`METADATA_ENTRIES`](limits::METADATA_ENTRIES) entries, keys of 1 to
/// [`METADATA_KEY_MAX`](limits::METADATA_KEY_MAX) characters, values of at most
/// [`METADATA_VALUE_MAX`](limits::METADATA_VALUE_MAX). The error names the key at fault
/// (`None`: the whole table).
pub fn endpoint_metadata(
    metadata: &BTreeMap<String, String>,
) -> Result<(), (Option<String>, String)> {
    if metadata.len() > limits::METADATA_ENTRIES {
        return Err((
            None,
            format!(
                "expected at most {} entries, got {}",
                limits::METADATA_ENTRIES,
                metadata.len()
            ),
        ));
    }
    for (key, value) in metadata {
        let length = key.chars().count();
        if length == 0 || length > limits::METADATA_KEY_MAX {
            return Err((
                Some(key.clone()),
                format!(
                    "expected a key of 1 to {} characters, got {length}",
                    limits::METADATA_KEY_MAX
                ),
            ));
        }
        let length = value.chars().count();
        if length > limits::METADATA_VALUE_MAX {
            return Err((
                Some(key.clone()),
                format!(
                    "expected a value of at most {} characters, got {length}",
                    limits::METADATA_VALUE_MAX
                ),
            ));
        }
    }
    Ok(())
}

/// Validates an endpoint's `rate_limit` (shared with the admin API).
pub fn endpoint_rate_limit(value: u64) -> Result<u32, String> {
    let (min, max) = limits::RATE_LIMIT;
    if value < min || value > max {
        return Err(format!(
            "expected attempts per second from {min} to {max}, got {value}"
        ));
    }
    u32::try_from(value).map_err(|_| format!("expected at most {max}, got {value}"))
}

/// Validates an endpoint's headers (shared with the admin API): names and values must be
/// valid, and none may be one patchwire sets itself.
pub fn endpoint_headers(headers: &BTreeMap<String, String>) -> Result<(), (String, String)> {
    for (name, value) in headers {
        let header = header_name(name).map_err(|message| (name.clone(), message))?;
        if MANAGED_HEADERS.contains(&header.as_str()) || DELIVERY_HEADERS.contains(&header.as_str())
        {
            return Err((
                name.clone(),
                format!(
                    "expected a header that patchwire does not set itself; {name} is set on every \
                     delivery"
                ),
            ));
        }
        if HeaderValue::from_str(value).is_err() {
            return Err((name.clone(), HEADER_VALUE_EXPECTED.to_owned()));
        }
    }
    Ok(())
}

fn endpoint(
    key: &str,
    raw: &RawWebhookEndpoint,
    streams: &[Source<'_>],
    allow_private: bool,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<WebhookEndpointSettings> {
    let before = problems.len();
    if !is_valid_name(&raw.id) {
        problems.push(
            format!("{key}.id"),
            format!("{NAME_EXPECTED}, got {:?}", raw.id),
        );
    }
    let url = match interpolate(&raw.url, env) {
        Err(e) => {
            problems.push(format!("{key}.url"), format!("the URL {e}"));
            None
        }
        Ok(resolved) => match Url::parse(resolved.trim()) {
            Err(e) => {
                problems.push(
                    format!("{key}.url"),
                    format!(
                        "expected an absolute http or https URL such as \
                         \"https://hooks.example.com/patchwire\", got {:?} ({e})",
                        raw.url
                    ),
                );
                None
            }
            Ok(url) => match ssrf::check_url(&url, allow_private) {
                Ok(()) => Some(url),
                Err(e) => {
                    problems.push(format!("{key}.url"), e.to_string());
                    None
                }
            },
        },
    };
    if raw.streams.is_empty() {
        problems.push(
            format!("{key}.streams"),
            "expected at least one stream name from [[streams]]",
        );
    }
    let (stream_names, views, refused) = resolve_streams(&raw.streams, streams);
    for (j, expected) in refused {
        problems.push(format!("{key}.streams[{j}]"), expected);
    }
    let mut headers = BTreeMap::new();
    for (name, template) in &raw.headers {
        match interpolate(template, env) {
            Ok(value) => {
                headers.insert(name.clone(), value);
            }
            Err(e) => problems.push(
                header_key(&format!("{key}.headers"), name),
                format!("the value {e}"),
            ),
        }
    }
    if let Err((name, message)) = endpoint_headers(&headers) {
        problems.push(header_key(&format!("{key}.headers"), &name), message);
    }
    let secret = match interpolate(&raw.secret, env) {
        Err(e) => {
            problems.push(format!("{key}.secret"), format!("the secret {e}"));
            None
        }
        Ok(text) => match Secret::parse(&text) {
            Ok(secret) => Some(secret),
            Err(e) => {
                // Never echo the secret itself.
                problems.push(format!("{key}.secret"), e.to_string());
                None
            }
        },
    };
    if let Some(description) = &raw.description
        && let Err(message) = endpoint_description(description)
    {
        problems.push(format!("{key}.description"), message);
    }
    if let Err((entry, message)) = endpoint_metadata(&raw.metadata) {
        let at = match entry {
            Some(entry) if entry.is_empty() => format!("{key}.metadata.\"\""),
            Some(entry) => header_key(&format!("{key}.metadata"), &entry),
            None => format!("{key}.metadata"),
        };
        problems.push(at, message);
    }
    let rate_limit = match raw.rate_limit.map(endpoint_rate_limit) {
        Some(Err(message)) => {
            problems.push(format!("{key}.rate_limit"), message);
            None
        }
        Some(Ok(limit)) => Some(limit),
        None => None,
    };
    let events = match raw.events.as_deref().map(Events::parse) {
        Some(Err(error)) => {
            let at = match error.at {
                Some(i) => format!("{key}.events[{i}]"),
                None => format!("{key}.events"),
            };
            problems.push(at, error.message);
            None
        }
        Some(Ok(events)) => Some(events),
        None => Some(Events::default()),
    };
    let (Some(url), Some(secret), Some(events)) = (url, secret, events) else {
        return None;
    };
    if problems.len() != before {
        return None;
    }
    Some(WebhookEndpointSettings {
        id: raw.id.clone(),
        url,
        streams: stream_names,
        views,
        mode: raw.mode.unwrap_or(defaults::MODE),
        format: raw.format.unwrap_or(defaults::FORMAT),
        headers,
        secret,
        description: raw.description.clone(),
        metadata: raw.metadata.clone(),
        rate_limit,
        events,
    })
}

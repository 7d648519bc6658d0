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

use super::body::{Format, Mode};
use super::schedule::RetrySchedule;
use super::sign::Secret;
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
    /// `webhooks.rotation_overlap`.
    pub const ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);
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
    /// `webhooks.rotation_overlap`.
    pub const ROTATION_OVERLAP: (Duration, Duration) =
        (Duration::ZERO, Duration::from_secs(30 * DAY));
    /// Shortest admin token.
    pub const ADMIN_TOKEN_MIN: usize = 16;
}

/// `[webhooks]`: durable, signed, ordered delivery of changes to registered URLs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    /// The SQLite outbox file ([default](defaults::DATABASE)); its directory must exist.
    pub database: Option<String>,
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
    /// After a secret rotation, how long the previous secret also signs
    /// ([default](defaults::ROTATION_OVERLAP), [bounds](limits::ROTATION_OVERLAP)).
    #[serde(default, with = "humantime_serde::option")]
    pub rotation_overlap: Option<Duration>,
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
    pub mode: Mode,
    /// JSON or CloudEvents.
    pub format: Format,
    /// Extra headers, `${VAR}` resolved.
    pub headers: BTreeMap<String, String>,
    /// The signing secret.
    pub secret: Secret,
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
        streams: &[&str],
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> WebhookSettings {
        let allow_private_targets = self
            .allow_private_targets
            .unwrap_or(defaults::ALLOW_PRIVATE_TARGETS);
        let database = self.database.as_deref().unwrap_or(defaults::DATABASE);
        if database.trim().is_empty() {
            problems.push(
            "webhooks.database",
            "expected a file path such as \"/var/lib/patchwire/webhooks.db\", got an empty string",
        );
        }
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
        WebhookSettings {
            database: PathBuf::from(database),
            allow_private_targets,
            admin_token,
            schedule,
            attempt_timeout: duration_in(
                problems,
                "webhooks.attempt_timeout",
                self.attempt_timeout,
                defaults::ATTEMPT_TIMEOUT,
                limits::ATTEMPT_TIMEOUT,
            ),
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
            rotation_overlap: duration_in(
                problems,
                "webhooks.rotation_overlap",
                self.rotation_overlap,
                defaults::ROTATION_OVERLAP,
                limits::ROTATION_OVERLAP,
            ),
            endpoints,
        }
    }
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
    streams: &[&str],
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
    for (j, name) in raw.streams.iter().enumerate() {
        if let Some(first) = raw.streams[..j].iter().position(|s| s == name) {
            problems.push(
                format!("{key}.streams[{j}]"),
                format!("{name:?} is already listed at streams[{first}]; name each stream once"),
            );
        } else if !streams.contains(&name.as_str()) {
            problems.push(
                format!("{key}.streams[{j}]"),
                format!(
                    "expected the name of a configured stream ({}), got {name:?}",
                    streams.join(", ")
                ),
            );
        }
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
    let (Some(url), Some(secret)) = (url, secret) else {
        return None;
    };
    if problems.len() != before {
        return None;
    }
    Some(WebhookEndpointSettings {
        id: raw.id.clone(),
        url,
        streams: raw.streams.clone(),
        mode: raw.mode.unwrap_or(defaults::MODE),
        format: raw.format.unwrap_or(defaults::FORMAT),
        headers,
        secret,
    })
}

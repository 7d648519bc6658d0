//! Pure validation of `[webhooks]`: durations and counts within bounds, endpoints that name
//! configured streams, valid URLs and secrets, headers patchwire does not manage itself.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use http::header::HeaderValue;
use url::Url;

use super::model::{AdminToken, WebhookEndpointSettings, WebhookSettings};
use super::raw::{RawWebhookEndpoint, RawWebhooks};
use crate::sinks::webhook::body::Mode;
use crate::sinks::webhook::schedule::{DEFAULT_SCHEDULE, RetrySchedule};
use crate::sinks::webhook::sign::Secret;
use crate::ssrf;
use crate::upstream::config::RawStream;
use crate::validation::{
    HEADER_VALUE_EXPECTED, MANAGED_HEADERS, NAME_EXPECTED, Problems, duration_in, fraction,
    header_key, header_name, integer_in, interpolate, is_valid_name, usize_of,
};

/// Built-in defaults of `[webhooks]`.
pub mod defaults {
    use std::time::Duration;

    /// `webhooks.database`.
    pub const DATABASE: &str = "patchwire-webhooks.db";
    /// `webhooks.jitter`.
    pub const JITTER: f64 = 0.1;
    /// `webhooks.max_retry_after`.
    pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(10 * 3600);
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

/// Headers every delivery sets itself; an endpoint may not override them.
const DELIVERY_HEADERS: [&str; 5] = [
    "content-type",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "user-agent",
];

/// Validates `[webhooks]`; `streams` are the configured streams that endpoints may name.
pub(super) fn validate(
    raw: &RawWebhooks,
    streams: &[RawStream],
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> WebhookSettings {
    let allow_private_targets = raw.allow_private_targets.unwrap_or(false);
    let database = raw.database.as_deref().unwrap_or(defaults::DATABASE);
    if database.trim().is_empty() {
        problems.push(
            "webhooks.database",
            "expected a file path such as \"/var/lib/patchwire/webhooks.db\", got an empty string",
        );
    }
    let admin_token =
        raw.admin_token
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
    let delays = match &raw.schedule {
        None => DEFAULT_SCHEDULE.to_vec(),
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
    let jitter = fraction(problems, "webhooks.jitter", raw.jitter, defaults::JITTER);
    let schedule = RetrySchedule {
        delays,
        jitter,
        max_retry_after: duration_in(
            problems,
            "webhooks.max_retry_after",
            raw.max_retry_after,
            defaults::MAX_RETRY_AFTER,
            limits::MAX_RETRY_AFTER,
        ),
    };
    let mut seen = HashSet::new();
    let endpoints = raw
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
            raw.attempt_timeout,
            defaults::ATTEMPT_TIMEOUT,
            limits::ATTEMPT_TIMEOUT,
        ),
        disable_after: duration_in(
            problems,
            "webhooks.disable_after",
            raw.disable_after,
            defaults::DISABLE_AFTER,
            limits::DISABLE_AFTER,
        ),
        max_concurrency_per_endpoint: usize_of(integer_in(
            problems,
            "webhooks.max_concurrency_per_endpoint",
            raw.max_concurrency_per_endpoint,
            defaults::MAX_CONCURRENCY_PER_ENDPOINT,
            limits::MAX_CONCURRENCY_PER_ENDPOINT,
        )),
        workers: usize_of(integer_in(
            problems,
            "webhooks.workers",
            raw.workers,
            defaults::WORKERS,
            limits::WORKERS,
        )),
        backlog_limit: usize_of(integer_in(
            problems,
            "webhooks.backlog_limit",
            raw.backlog_limit,
            defaults::BACKLOG_LIMIT,
            limits::BACKLOG_LIMIT,
        )),
        retention: duration_in(
            problems,
            "webhooks.retention",
            raw.retention,
            defaults::RETENTION,
            limits::RETENTION,
        ),
        rotation_overlap: duration_in(
            problems,
            "webhooks.rotation_overlap",
            raw.rotation_overlap,
            defaults::ROTATION_OVERLAP,
            limits::ROTATION_OVERLAP,
        ),
        endpoints,
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
    streams: &[RawStream],
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
        } else if !streams.iter().any(|s| &s.name == name) {
            let known: Vec<&str> = streams.iter().map(|s| s.name.as_str()).collect();
            problems.push(
                format!("{key}.streams[{j}]"),
                format!(
                    "expected the name of a configured stream ({}), got {name:?}",
                    known.join(", ")
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
        mode: raw.mode.unwrap_or(Mode::Patch),
        headers,
        secret,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{ConfigError, FileKind, parse_raw, validate};

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn load(webhooks: &str) -> Result<crate::config::Config, ConfigError> {
        let text = format!(
            "[[streams]]\nname = \"fleet\"\nurl = \"http://127.0.0.1:8081/feeds/fleet\"\n\n{webhooks}"
        );
        let raw = parse_raw(&text, FileKind::Toml, None, Vec::new())?;
        let env = |name: &str| match name {
            "SECRET" => Some(SECRET.to_owned()),
            "TOKEN" => Some("an-admin-token-long-enough".to_owned()),
            _ => None,
        };
        validate(raw, None, &env)
    }

    fn problems(webhooks: &str) -> Vec<(String, String)> {
        let err = load(webhooks).expect_err("expected the configuration to be refused");
        err.problems
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect()
    }

    #[test]
    fn no_table_means_no_webhooks_and_an_empty_table_gets_every_default() {
        assert!(load("").unwrap().webhooks.is_none());
        let w = load("[webhooks]").unwrap().webhooks.unwrap();
        assert_eq!(w.database.to_str(), Some(super::defaults::DATABASE));
        assert!(!w.allow_private_targets);
        assert!(w.admin_token.is_none());
        assert_eq!(w.schedule.delays.len(), 8);
        assert_eq!(w.attempt_timeout.as_secs(), 15);
        assert!(w.endpoints.is_empty());
    }

    #[test]
    fn a_full_table_validates_and_hides_its_secrets() {
        let w = load(
            r#"[webhooks]
database = "/tmp/x.db"
admin_token = "${TOKEN}"
schedule = ["0s", "1s", "1m"]
jitter = 0.5
attempt_timeout = "2s"
workers = 8

[[webhooks.endpoints]]
id = "billing"
url = "https://hooks.example.com/patchwire"
streams = ["fleet"]
mode = "snapshot"
secret = "${SECRET}"
headers = { X-Tenant = "t1" }
"#,
        )
        .unwrap()
        .webhooks
        .unwrap();
        assert_eq!(w.schedule.delays.len(), 3);
        assert_eq!(
            w.endpoints[0].mode,
            crate::sinks::webhook::body::Mode::Snapshot
        );
        assert_eq!(w.endpoints[0].secret.expose(), SECRET);
        let shown = format!("{w:?}");
        assert!(
            !shown.contains(SECRET) && !shown.contains("an-admin-token"),
            "{shown}"
        );
    }

    #[test]
    fn bad_endpoints_are_refused_with_their_keys() {
        let found = problems(
            r#"[webhooks]
schedule = []
jitter = 2.0
[[webhooks.endpoints]]
id = "a"
url = "http://127.0.0.1:9000/hook"
streams = ["fleet", "nope", "fleet"]
secret = "whsec_c2hvcnQ="
headers = { webhook-signature = "x" }
[[webhooks.endpoints]]
id = "-bad"
url = "ftp://x"
streams = []
secret = "${UNSET}"
"#,
        );
        let has = |key: &str, needle: &str| {
            assert!(
                found.iter().any(|(k, m)| k == key && m.contains(needle)),
                "no problem at {key} containing {needle:?}: {found:#?}"
            );
        };
        has("webhooks.schedule", "1 to 50 durations");
        has("webhooks.jitter", "fraction");
        has("webhooks.endpoints[0].url", "loopback");
        has("webhooks.endpoints[0].url", "allow_private_targets");
        has("webhooks.endpoints[0].streams[1]", "\"nope\"");
        has(
            "webhooks.endpoints[0].streams[2]",
            "already listed at streams[0]",
        );
        has("webhooks.endpoints[0].secret", "24 to 64 bytes");
        has(
            "webhooks.endpoints[0].headers.webhook-signature",
            "does not set itself",
        );
        has("webhooks.endpoints[1].id", "expected 1 to 64");
        has("webhooks.endpoints[1].url", "http or https");
        has("webhooks.endpoints[1].streams", "at least one");
        has("webhooks.endpoints[1].secret", "UNSET");
        // Secrets are never echoed.
        assert!(
            found.iter().all(|(_, m)| !m.contains("c2hvcnQ")),
            "{found:#?}"
        );
    }

    #[test]
    fn private_targets_can_be_allowed_and_ids_must_be_unique() {
        let endpoint = |id: &str| {
            format!(
                "[[webhooks.endpoints]]\nid = \"{id}\"\nurl = \"http://127.0.0.1:9000/hook\"\n\
                 streams = [\"fleet\"]\nsecret = \"{SECRET}\"\n"
            )
        };
        let ok = load(&format!(
            "[webhooks]\nallow_private_targets = true\n{}",
            endpoint("a")
        ));
        assert_eq!(ok.unwrap().webhooks.unwrap().endpoints.len(), 1);
        let found = problems(&format!(
            "[webhooks]\nallow_private_targets = true\nadmin_token = \"short\"\n{}{}",
            endpoint("a"),
            endpoint("a")
        ));
        assert!(
            found
                .iter()
                .any(|(k, m)| k == "webhooks.endpoints[1].id" && m.contains("unique")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|(k, m)| k == "webhooks.admin_token" && !m.contains("short")),
            "{found:?}"
        );
    }
}

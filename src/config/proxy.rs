//! Pure validation of `[proxy]`: host patterns, durations and limits within bounds, tokens that
//! are long, unique and never shown, and token host lists inside the global allowlist.

use std::collections::HashMap;
use std::time::Duration;

use super::model::{HostPattern, ProxySettings, ProxyToken, SigningKey};
use super::raw::{RawProxy, RawProxyToken};
use crate::validation::{
    InterpolateError, NAME_EXPECTED, Problems, bytes_in, duration_in, integer_in, interpolate,
    is_valid_name, nonzero_u32, usize_of,
};

/// Built-in defaults of `[proxy]`.
pub mod defaults {
    use std::time::Duration;

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
}

/// Inclusive bounds of `[proxy]` keys.
pub mod limits {
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(24 * 3600);
    /// `proxy.interval`, `proxy.hosts.*.interval`, `proxy.tokens[].interval`.
    pub const INTERVAL: (Duration, Duration) = (Duration::from_millis(100), DAY);
    /// `proxy.min_interval`.
    pub const MIN_INTERVAL: (Duration, Duration) =
        (Duration::from_millis(10), Duration::from_secs(3600));
    /// `proxy.linger`.
    pub const LINGER: (Duration, Duration) = (Duration::ZERO, DAY);
    /// `proxy.keepalive`.
    pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));
    /// `proxy.timeout`.
    pub const TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(300));
    /// `proxy.max_streams`.
    pub const MAX_STREAMS: (u64, u64) = (1, 1_000_000);
    /// `proxy.max_memory`, in bytes.
    pub const MAX_MEMORY: (u64, u64) = (1 << 20, 64 << 30);
    /// `proxy.max_body`, in bytes.
    pub const MAX_BODY: (u64, u64) = (1 << 10, 1 << 30);
    /// `proxy.history`.
    pub const HISTORY: (u64, u64) = crate::upstream::config::limits::HISTORY;
    /// `proxy.history_bytes`, in bytes.
    pub const HISTORY_BYTES: (u64, u64) = crate::upstream::config::limits::HISTORY_BYTES;
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
pub(super) fn validate(
    raw: Option<&RawProxy>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<ProxySettings> {
    let raw = raw?;
    let enabled = raw.enabled.unwrap_or(false);
    let before = problems.len();
    let allowed_hosts = match &raw.allowed_hosts {
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
        raw.interval,
        defaults::INTERVAL,
        limits::INTERVAL,
    );
    let min_interval = duration_in(
        problems,
        "proxy.min_interval",
        raw.min_interval,
        defaults::MIN_INTERVAL,
        limits::MIN_INTERVAL,
    );
    let linger = duration_in(
        problems,
        "proxy.linger",
        raw.linger,
        defaults::LINGER,
        limits::LINGER,
    );
    let keepalive = duration_in(
        problems,
        "proxy.keepalive",
        raw.keepalive,
        defaults::KEEPALIVE,
        limits::KEEPALIVE,
    );
    let timeout = duration_in(
        problems,
        "proxy.timeout",
        raw.timeout,
        defaults::TIMEOUT,
        limits::TIMEOUT,
    );
    let max_streams = integer_in(
        problems,
        "proxy.max_streams",
        raw.max_streams,
        defaults::MAX_STREAMS,
        limits::MAX_STREAMS,
    );
    let max_memory = bytes_in(
        problems,
        "proxy.max_memory",
        raw.max_memory,
        defaults::MAX_MEMORY,
        limits::MAX_MEMORY,
    );
    let max_body_bytes = bytes_in(
        problems,
        "proxy.max_body",
        raw.max_body,
        defaults::MAX_BODY,
        limits::MAX_BODY,
    );
    let history = integer_in(
        problems,
        "proxy.history",
        raw.history,
        defaults::HISTORY,
        limits::HISTORY,
    );
    let signature_max_skew = duration_in(
        problems,
        "proxy.signature_max_skew",
        raw.signature_max_skew,
        defaults::SIGNATURE_MAX_SKEW,
        limits::SIGNATURE_MAX_SKEW,
    );
    let history_bytes = bytes_in(
        problems,
        "proxy.history_bytes",
        raw.history_bytes,
        defaults::HISTORY_BYTES,
        limits::HISTORY_BYTES,
    );
    if raw.diff.allow_move == Some(true) {
        problems.push(
            "proxy.diff.allow_move",
            "expected false or no value: Streamdata.io clients apply only add, remove and \
             replace operations, so dynamic streams never emit `move`",
        );
    }
    let diff = raw.diff.validate("proxy.diff", problems).map(|mut diff| {
        diff.allow_move = false;
        diff
    });
    let mut host_intervals: Vec<(HostPattern, Duration)> = Vec::new();
    let mut seen_hosts: HashMap<String, &str> = HashMap::new();
    for (pattern, host) in &raw.hosts {
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
    if raw.tokens.is_empty() && enabled {
        problems.push(
            "proxy.tokens",
            "expected at least one [[proxy.tokens]] entry with a `name` and a `token` (clients \
             send the token as X-Sd-Token)",
        );
    }
    let mut tokens = Vec::with_capacity(raw.tokens.len());
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut secrets: HashMap<String, usize> = HashMap::new();
    for (i, raw_token) in raw.tokens.iter().enumerate() {
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
                        raw.tokens[*first].name
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
        allow_private: raw.allow_private.unwrap_or(false),
        interval,
        host_intervals,
        min_interval,
        linger,
        keepalive,
        max_streams: usize_of(max_streams),
        max_memory,
        timeout,
        max_body_bytes,
        history: usize_of(history),
        history_bytes,
        diff: diff?,
        tokens,
        ascii_only: raw.ascii_only.unwrap_or(defaults::ASCII_ONLY),
        signature_max_skew,
    })
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
    if raw.require_signature == Some(true) && raw.signing_secret.is_none() {
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
        require_signature: raw.require_signature.unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError, FileKind, parse_raw};

    const TOKEN: &str = "tok-0123456789abcdef";

    fn load(proxy: &str) -> Result<Config, ConfigError> {
        let text = format!("[[streams]]\nname = \"a\"\nurl = \"http://example.com/a\"\n\n{proxy}");
        let raw = parse_raw(&text, FileKind::Toml, None, Vec::new())?;
        let env = |name: &str| (name == "PROXY_TOKEN").then(|| TOKEN.to_owned());
        crate::config::validate(raw, None, &env)
    }

    fn problems(proxy: &str) -> Vec<(String, String)> {
        let err = load(proxy).expect_err("expected the configuration to be refused");
        assert!(!err.to_string().contains(TOKEN), "a token leaked: {err}");
        err.problems
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect()
    }

    fn has(found: &[(String, String)], key: &str, needle: &str) {
        assert!(
            found.iter().any(|(k, m)| k == key && m.contains(needle)),
            "no problem at {key} containing {needle:?}: {found:#?}"
        );
    }

    const ENABLED: &str = "[proxy]\nenabled = true\nallowed_hosts = [\"api.example.com\"]\n\
                           [[proxy.tokens]]\nname = \"web\"\ntoken = \"${PROXY_TOKEN}\"\n";

    proptest::proptest! {
        /// Whatever the tokens are (short, spaced, duplicated, with `${`), no problem and no
        /// summary shows them.
        #[test]
        fn tokens_never_appear_in_errors_or_summaries(
            a in "[ -~]{0,30}",
            b in "[ -~]{0,30}",
            same in proptest::bool::ANY,
            enabled in proptest::bool::ANY,
        ) {
            let (a, b) = (format!("ZQX{a}"), format!("ZQY{b}"));
            let b = if same { a.clone() } else { b };
            let quote = |t: &str| toml_string(t);
            let text = format!(
                "[proxy]\nenabled = {enabled}\nallowed_hosts = [\"api.example.com\"]\n\
                 [[proxy.tokens]]\nname = \"a\"\ntoken = {}\n\
                 [[proxy.tokens]]\nname = \"b\"\ntoken = {}\n",
                quote(&a),
                quote(&b)
            );
            match load(&text) {
                Ok(config) => {
                    let shown = format!("{}{:?}", crate::config::describe(&config), config);
                    proptest::prop_assert!(!shown.contains("ZQX") && !shown.contains("ZQY"), "{}", shown);
                }
                Err(err) => {
                    let shown = err.to_string();
                    proptest::prop_assert!(!shown.contains("ZQX") && !shown.contains("ZQY"), "{}", shown);
                }
            }
        }
    }

    /// `text` as a TOML basic string.
    fn toml_string(text: &str) -> String {
        format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
    }

    #[test]
    fn absent_or_disabled_means_none() {
        assert!(load("").unwrap().proxy.is_none());
        assert!(load("[proxy]").unwrap().proxy.is_none());
        let disabled = ENABLED.replace("enabled = true", "enabled = false");
        assert!(load(&disabled).unwrap().proxy.is_none());
        // A disabled proxy needs neither hosts, tokens nor its tokens' variables.
        let unset = disabled.replace("PROXY_TOKEN", "UNSET_TOKEN");
        assert!(load(&unset).unwrap().proxy.is_none());
    }

    #[test]
    fn a_disabled_table_is_still_checked() {
        let found = problems(
            "[proxy]\nallowed_hosts = [\"http://x\"]\ninterval = \"0s\"\n\
             [[proxy.tokens]]\nname = \"t\"\ntoken = \"short\"\n",
        );
        has(&found, "proxy.allowed_hosts[0]", "\"http://x\"");
        has(&found, "proxy.interval", "between 100ms and 1day");
        has(&found, "proxy.tokens[0].token", "at least 16 characters");
        assert!(
            found.iter().all(|(_, m)| !m.contains("short")),
            "{found:#?}"
        );
    }

    #[test]
    fn an_enabled_table_gets_every_default() {
        let p = load(ENABLED).unwrap().proxy.expect("enabled");
        assert_eq!(
            p.allowed_hosts,
            [HostPattern::Exact("api.example.com".into())]
        );
        assert!(!p.allow_private);
        assert_eq!(p.interval, defaults::INTERVAL);
        assert_eq!(p.min_interval, Duration::from_secs(1));
        assert_eq!(p.linger, Duration::from_secs(30));
        assert_eq!(p.keepalive, Duration::from_secs(10));
        assert_eq!(p.timeout, Duration::from_secs(10));
        assert_eq!(p.max_streams, 1000);
        assert_eq!(p.max_memory, 256 << 20);
        assert_eq!(p.max_body_bytes, 8 << 20);
        assert_eq!(p.history, 64);
        assert!(p.host_intervals.is_empty());
        assert!(!p.diff.allow_move);
        let t = &p.tokens[0];
        assert_eq!((t.name.as_str(), t.token.as_str()), ("web", TOKEN));
        assert_eq!(t.max_connections, 100);
        assert_eq!(t.connections_per_second.get(), 10);
        assert_eq!(t.connections_burst.get(), 10);
        assert!(t.allowed_hosts.is_none() && t.interval.is_none());
        assert_eq!(t.min_interval, Duration::ZERO);
        assert!(!format!("{p:?}").contains(TOKEN));
    }

    #[test]
    fn enabled_needs_hosts_and_tokens() {
        let found = problems("[proxy]\nenabled = true\n");
        has(&found, "proxy.allowed_hosts", "missing required key");
        has(&found, "proxy.tokens", "at least one [[proxy.tokens]]");
        let found = problems(&ENABLED.replace("[\"api.example.com\"]", "[]"));
        has(&found, "proxy.allowed_hosts", "at least one host");
    }

    #[test]
    fn move_is_refused_and_the_rest_of_diff_is_validated() {
        let found = problems(&format!(
            "{ENABLED}[proxy.diff]\nallow_move = true\nmax_patch_ratio = 0\n"
        ));
        has(&found, "proxy.diff.allow_move", "add, remove and replace");
        has(&found, "proxy.diff.max_patch_ratio", "greater than 0");
        let p = load(&format!(
            "{ENABLED}[proxy.diff]\nallow_move = false\nmax_patch_ratio = 0.5\n"
        ))
        .unwrap()
        .proxy
        .unwrap();
        assert_eq!(p.diff.max_patch_ratio, 0.5);
    }

    #[test]
    fn tokens_are_named_unique_and_never_shown() {
        let found = problems(&format!(
            "{ENABLED}[[proxy.tokens]]\nname = \"web\"\ntoken = \"${{PROXY_TOKEN}}\"\n\
             [[proxy.tokens]]\nname = \"-bad\"\ntoken = \"has a space in it, long\"\n\
             connections_per_second = 0\nconnections_burst = 100001\nmax_connections = 0\n\
             min_interval = \"2 days\"\ninterval = \"50ms\"\n\
             [[proxy.tokens]]\nname = \"unset\"\ntoken = \"${{UNSET}}\"\n"
        ));
        has(&found, "proxy.tokens[1].name", "unique");
        has(&found, "proxy.tokens[1].token", "proxy.tokens[0] (\"web\")");
        has(&found, "proxy.tokens[2].name", "expected 1 to 64");
        has(&found, "proxy.tokens[2].token", "without spaces");
        has(
            &found,
            "proxy.tokens[2].connections_per_second",
            "1 to 100000",
        );
        has(&found, "proxy.tokens[2].connections_burst", "1 to 100000");
        has(&found, "proxy.tokens[2].max_connections", "1 to 1000000");
        has(
            &found,
            "proxy.tokens[2].min_interval",
            "between 0s and 1day",
        );
        has(&found, "proxy.tokens[2].interval", "between 100ms and 1day");
        has(&found, "proxy.tokens[3].token", "UNSET");
        assert!(
            found.iter().all(|(_, m)| !m.contains("has a space")),
            "{found:#?}"
        );
    }

    #[test]
    fn token_hosts_must_be_inside_the_allowlist() {
        let text = "[proxy]\nenabled = true\nallowed_hosts = [\"*.example.com\", \"api.other.org\"]\n\
                    [[proxy.tokens]]\nname = \"t\"\ntoken = \"${PROXY_TOKEN}\"\n";
        let ok = load(&format!(
            "{text}allowed_hosts = [\"a.example.com\", \"*.example.com\", \"*.eu.example.com\", \"API.other.org\"]\n"
        ))
        .unwrap()
        .proxy
        .unwrap();
        assert_eq!(ok.tokens[0].allowed_hosts.as_ref().map(Vec::len), Some(4));
        let found = problems(&format!(
            "{text}allowed_hosts = [\"example.com\", \"*.other.org\", \"x.other.org\", \"a b\"]\n"
        ));
        for i in 0..3 {
            has(
                &found,
                &format!("proxy.tokens[0].allowed_hosts[{i}]"),
                "not in proxy.allowed_hosts",
            );
        }
        has(
            &found,
            "proxy.tokens[0].allowed_hosts[3]",
            "expected a host name",
        );
    }

    #[test]
    fn host_tables_are_parsed_checked_and_ordered() {
        let p = load(&format!(
            "{ENABLED}[proxy.hosts.\"*.example.com\"]\ninterval = \"10s\"\n\
             [proxy.hosts.\"API.example.com\"]\ninterval = \"2s\"\n\
             [proxy.hosts.\"*.eu.example.com\"]\ninterval = \"3s\"\n"
        ))
        .unwrap()
        .proxy
        .unwrap();
        let order: Vec<(String, u64)> = p
            .host_intervals
            .iter()
            .map(|(h, d)| (h.to_string(), d.as_secs()))
            .collect();
        assert_eq!(
            order,
            [
                ("api.example.com".to_owned(), 2),
                ("*.eu.example.com".to_owned(), 3),
                ("*.example.com".to_owned(), 10)
            ]
        );
        let found = problems(&format!(
            "{ENABLED}[proxy.hosts.\"x:80\"]\ninterval = \"1s\"\n\
             [proxy.hosts.\"a.example.com\"]\ninterval = \"2 days\"\n\
             [proxy.hosts.\"A.example.com\"]\ninterval = \"1s\"\n\
             [proxy.hosts.\"b.example.com\"]\n"
        ));
        has(&found, "proxy.hosts.\"x:80\"", "expected a host name");
        has(
            &found,
            "proxy.hosts.\"a.example.com\".interval",
            "between 100ms and 1day",
        );
        has(
            &found,
            "proxy.hosts.\"a.example.com\"",
            "same host as \"A.example.com\"",
        );
        has(
            &found,
            "proxy.hosts.\"b.example.com\".interval",
            "missing required key",
        );
    }

    #[test]
    fn bounds_of_the_global_keys() {
        let found = problems(&format!(
            "{}min_interval = \"5ms\"\nlinger = \"2 days\"\nkeepalive = \"0s\"\n\
             timeout = \"6m\"\nmax_streams = 0\nmax_memory = \"1 KiB\"\nmax_body = \"2 GiB\"\n\
             history = 0\n",
            ENABLED.split("[[").next().unwrap()
        ));
        has(&found, "proxy.min_interval", "between 10ms and 1h");
        has(&found, "proxy.linger", "between 0s and 1day");
        has(&found, "proxy.keepalive", "between 1s and 5m");
        has(&found, "proxy.timeout", "between 100ms and 5m");
        has(&found, "proxy.max_streams", "1 to 1000000");
        has(&found, "proxy.max_memory", "1.0 MiB to 64.0 GiB");
        has(&found, "proxy.max_body", "1.0 KiB to 1.0 GiB");
        has(&found, "proxy.history", "1 to 100000");
    }

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
}

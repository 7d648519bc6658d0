//! `[proxy]` read from files: defaults, bounds, tokens never shown, hosts inside the allowlist.

use std::time::Duration;

use crate::config::{Config, ConfigError, FileKind, parse_raw};
use crate::proxy::config::{HostPattern, defaults};

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

#[test]
fn view_bounds_default_to_a_configured_streams_and_the_stream_linger() {
    let proxy = load(ENABLED).unwrap().proxy.unwrap();
    assert_eq!(proxy.max_views_per_stream, 1000);
    // 5 minutes or proxy.linger (30 s by default), the smaller.
    assert_eq!(proxy.view_linger, defaults::LINGER);
    let text = ENABLED.replace("enabled = true\n", "enabled = true\nlinger = \"1h\"\n");
    assert_eq!(
        load(&text).unwrap().proxy.unwrap().view_linger,
        Duration::from_secs(300)
    );
    let text = ENABLED.replace(
        "enabled = true\n",
        "enabled = true\nmax_views_per_stream = 2\nview_linger = \"2h\"\n",
    );
    let proxy = load(&text).unwrap().proxy.unwrap();
    assert_eq!(proxy.max_views_per_stream, 2);
    assert_eq!(proxy.view_linger, Duration::from_secs(7200));
}

#[test]
fn view_bounds_out_of_range_are_refused_naming_the_key() {
    for (keys, key, needle) in [
        (
            "max_views_per_stream = 0",
            "proxy.max_views_per_stream",
            "expected an integer from 1 to 100000, got 0",
        ),
        (
            "max_views_per_stream = 100001",
            "proxy.max_views_per_stream",
            "expected an integer from 1 to 100000, got 100001",
        ),
        ("view_linger = \"2days\"", "proxy.view_linger", "expected"),
    ] {
        let text = ENABLED.replace("enabled = true\n", &format!("enabled = true\n{keys}\n"));
        has(&problems(&text), key, needle);
    }
}

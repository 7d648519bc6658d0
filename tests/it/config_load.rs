//! Loading and validating configuration files: the shipped files, every kind of bad input,
//! environment overrides and defaults. The process environment is never read or changed: the
//! environment is passed in, so these tests run in parallel safely.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use patchwire::config::{
    ConfigError, Cors, LogFormat, RawConfig, describe, load_raw, load_with, validate,
};
use tempfile::TempDir;

/// A file `name` holding `text` in a fresh temporary directory.
struct File {
    _dir: TempDir,
    path: PathBuf,
}

fn file(name: &str, text: &str) -> File {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write test file");
    File { _dir: dir, path }
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const MINIMAL: &str = r#"
[[streams]]
name = "a"
url = "http://example.com/a"
"#;

fn load_toml(text: &str) -> (File, Result<patchwire::config::Config, ConfigError>) {
    let f = file("patchwire.toml", text);
    let result = load_with(&f.path, &no_env, Vec::new());
    (f, result)
}

/// Asserts that loading `text` (as `name`) fails with a problem at `key` whose message contains
/// every one of `needles`, and that the rendered error names the file and the key.
fn assert_rejected(name: &str, text: &str, key: &str, needles: &[&str]) -> ConfigError {
    let f = file(name, text);
    let err = match load_with(&f.path, &no_env, Vec::new()) {
        Ok(config) => panic!("expected {key} to be rejected, got {config:#?}"),
        Err(err) => err,
    };
    assert_error(&err, &f.path, key, needles);
    err
}

fn assert_error(err: &ConfigError, path: &Path, key: &str, needles: &[&str]) {
    assert_eq!(err.file.as_deref(), Some(path), "{err}");
    let problem = err
        .problems
        .iter()
        .find(|p| p.key == key)
        .unwrap_or_else(|| panic!("no problem at `{key}` in: {err}"));
    for needle in needles {
        assert!(
            problem.message.contains(needle),
            "problem at `{key}` should mention {needle:?}: {}",
            problem.message
        );
    }
    let shown = err.to_string();
    assert!(shown.contains(&path.display().to_string()), "{shown}");
    if !key.is_empty() {
        assert!(shown.contains(&format!("`{key}`")), "{shown}");
    }
}

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

mod shipped_files {
    use super::*;

    fn example_env(name: &str) -> Option<String> {
        match name {
            "API_TOKEN" => Some("tok-123-secret".to_owned()),
            "WEBHOOK_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
            "PATCHWIRE_ADMIN_TOKEN" => Some("tok-123-secret-admin".to_owned()),
            _ => None,
        }
    }

    #[test]
    fn every_file_in_config_and_examples_loads_and_validates() {
        let mut checked = 0;
        for dir in ["config", "config/examples", "config/examples/cluster"] {
            let entries = std::fs::read_dir(repo_file(dir)).expect("config directory exists");
            for entry in entries {
                let path = entry.expect("directory entry").path();
                let configuration = path
                    .extension()
                    .is_some_and(|e| e == "toml" || e == "yaml" || e == "yml");
                if !path.is_file() || !configuration {
                    continue;
                }
                let config = load_with(&path, &example_env, Vec::new())
                    .unwrap_or_else(|e| panic!("{} should be valid: {e}", path.display()));
                assert!(!config.streams.is_empty());
                let summary = describe(&config);
                assert!(
                    !summary.contains("tok-123-secret"),
                    "describe must not print secrets: {summary}"
                );
                checked += 1;
            }
        }
        assert!(
            checked >= 3,
            "expected default.toml and two examples, checked {checked}"
        );
    }

    #[test]
    fn default_toml_runs_the_simulated_fleet() {
        let config = load_with(&repo_file("config/default.toml"), &no_env, Vec::new())
            .expect("default.toml is valid without any environment");
        let sim = config.simulator.as_ref().expect("simulator enabled");
        assert_eq!(sim.listen, "127.0.0.1:8081".parse::<SocketAddr>().unwrap());
        assert_eq!(sim.feeds.len(), 1);
        let feed = &sim.feeds[0];
        assert_eq!(
            (
                feed.name.as_str(),
                feed.vehicles,
                feed.routes,
                feed.seed,
                feed.tick
            ),
            ("fleet", 200, 12, 42, Duration::from_secs(1))
        );
        let stream = &config.streams[0];
        assert_eq!(stream.name, "fleet");
        assert_eq!(stream.url.as_str(), "http://127.0.0.1:8081/feeds/fleet");
        assert_eq!(stream.interval, Duration::from_secs(1));
        assert_eq!(stream.rate_limit_group, "127.0.0.1:8081");
    }

    #[test]
    fn json_api_example_needs_its_token_and_hides_it() {
        let path = repo_file("config/examples/json-api.toml");
        let err = load_with(&path, &no_env, Vec::new()).expect_err("API_TOKEN is not set");
        assert_error(
            &err,
            &path,
            "streams[0].headers.Authorization",
            &["API_TOKEN", "not set"],
        );
        let config = load_with(&path, &example_env, Vec::new()).expect("valid with API_TOKEN");
        let auth = config.streams[0]
            .headers
            .get("authorization")
            .expect("Authorization header");
        assert_eq!(auth.to_str().unwrap(), "Bearer tok-123-secret");
        assert!(auth.is_sensitive());
        assert_eq!(
            config.streams[0]
                .headers
                .get("accept")
                .map(|v| v.to_str().unwrap()),
            Some("application/json"),
            "headers from [stream_defaults] are merged in"
        );
        let summary = describe(&config);
        assert!(summary.contains("authorization"), "{summary}");
        assert!(summary.contains("transit-api"), "{summary}");
        assert!(summary.contains("5/s, burst 5"), "{summary}");
        assert!(!summary.contains("tok-123-secret"), "{summary}");
    }

    #[test]
    fn proxy_example_streams_the_simulator_locally() {
        let config = load_with(
            &repo_file("config/examples/proxy.toml"),
            &no_env,
            Vec::new(),
        )
        .expect("proxy.toml is valid without any environment");
        let sim = config.simulator.as_ref().expect("simulator enabled");
        let p = config.proxy.as_ref().expect("proxy enabled");
        assert!(p.allow_private, "the simulator is on a loopback address");
        assert!(
            p.allowed_hosts
                .iter()
                .any(|h| h.matches(&sim.listen.ip().to_string()))
        );
        assert!(p.allowed_hosts.iter().any(|h| h.matches("localhost")));
        assert_eq!(p.tokens.len(), 1);
        assert_eq!(p.tokens[0].name, "demo");
        assert_eq!(p.tokens[0].token, "demo-token-0123456789");
        let summary = describe(&config);
        assert!(summary.contains("token \"demo\""), "{summary}");
        assert!(!summary.contains("demo-token-0123456789"), "{summary}");
    }

    #[test]
    fn yaml_example_matches_its_intent() {
        let config = load_with(
            &repo_file("config/examples/simulated.yaml"),
            &no_env,
            Vec::new(),
        )
        .expect("simulated.yaml is valid");
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.server.subscriber_buffer, 512);
        assert_eq!(config.streams.len(), 2);
        assert_eq!(config.streams[0].interval, Duration::from_secs(1));
        assert_eq!(config.streams[1].interval, Duration::from_secs(2));
        assert_eq!(config.streams[1].diff.max_patch_ratio, 0.5);
        assert!(matches!(&config.server.cors, Cors::Origins(o) if o.len() == 2));
        assert_eq!(config.simulator.as_ref().map(|s| s.feeds.len()), Some(2));
    }
}

mod bad_input {
    use super::*;

    #[test]
    fn unknown_top_level_key() {
        assert_rejected(
            "c.toml",
            &format!("colour = \"red\"\n{MINIMAL}"),
            "colour",
            &[
                "unknown key `colour`",
                "server, log, upstream, stream_defaults",
            ],
        );
    }

    #[test]
    fn unknown_nested_key() {
        assert_rejected(
            "c.toml",
            &format!("[server]\nlistn = \"127.0.0.1:1\"\n{MINIMAL}"),
            "server.listn",
            &["unknown key `listn`", "listen", "keepalive"],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}intervl = \"1s\"\n"),
            "streams[0].intervl",
            &["unknown key `intervl`", "interval"],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}[streams.diff]\nratio = 0.5\n"),
            "streams[0].diff.ratio",
            &["unknown key `ratio`", "max_patch_ratio"],
        );
    }

    #[test]
    fn missing_key() {
        assert_rejected(
            "c.toml",
            "[[streams]]\nname = \"a\"\n",
            "streams[0].url",
            &["missing required key"],
        );
        assert_rejected(
            "c.yaml",
            "streams:\n  - url: http://example.com/\n",
            "streams[0].name",
            &["missing required key"],
        );
    }

    #[test]
    fn unparseable_url() {
        assert_rejected(
            "c.toml",
            "[[streams]]\nname = \"a\"\nurl = \"not a url\"\n",
            "streams[0].url",
            &["expected an absolute http or https URL", "\"not a url\""],
        );
    }

    #[test]
    fn non_http_scheme() {
        assert_rejected(
            "c.toml",
            "[[streams]]\nname = \"a\"\nurl = \"ftp://example.com/feed\"\n",
            "streams[0].url",
            &["scheme \"ftp\" is not http or https"],
        );
    }

    #[test]
    fn zero_interval() {
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}interval = \"0s\"\n"),
            "streams[0].interval",
            &["between 100ms and", "got \"0s\""],
        );
    }

    #[test]
    fn absurd_interval_and_unparseable_duration() {
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}interval = \"30days\"\n"),
            "streams[0].interval",
            &["between 100ms and 1day", "got \"30days\""],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}interval = 5\n"),
            "streams[0].interval",
            &["a duration with a unit such as \"5s\""],
        );
    }

    #[test]
    fn duplicate_stream_names_name_both_entries() {
        let text = format!("{MINIMAL}{MINIMAL}{}", MINIMAL.replace("\"a\"", "\"b\""));
        assert_rejected(
            "c.toml",
            &text,
            "streams[1].name",
            &["unique", "\"a\"", "streams[0]"],
        );
    }

    #[test]
    fn bad_stream_name() {
        assert_rejected(
            "c.toml",
            "[[streams]]\nname = \"my feed\"\nurl = \"http://example.com/\"\n",
            "streams[0].name",
            &["letters, digits", "\"my feed\""],
        );
    }

    #[test]
    fn bad_listen_address() {
        assert_rejected(
            "c.toml",
            &format!("[server]\nlisten = \"localhost\"\n{MINIMAL}"),
            "server.listen",
            &["IP address and port", "\"localhost\""],
        );
    }

    #[test]
    fn bad_header_name_and_value() {
        let text = format!(
            "{MINIMAL}[streams.headers]\n\"Bad Header\" = \"x\"\nX-Ok = \"line\\nbreak\"\n"
        );
        let err = assert_rejected(
            "c.toml",
            &text,
            "streams[0].headers.\"Bad Header\"",
            &["header name"],
        );
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == "streams[0].headers.X-Ok" && p.message.contains("header value")),
            "{err}"
        );
    }

    #[test]
    fn undefined_variable_in_header_and_url() {
        let text = "[[streams]]\nname = \"a\"\nurl = \"https://${API_HOST}/v1\"\n\
                    [streams.headers]\nAuthorization = \"Bearer ${API_TOKEN}\"\n";
        let err = assert_rejected(
            "c.toml",
            text,
            "streams[0].headers.Authorization",
            &["in stream \"a\"", "API_TOKEN", "not set"],
        );
        let path = err.file.clone().expect("error names the file");
        assert_error(&err, &path, "streams[0].url", &["API_HOST", "not set"]);
    }

    #[test]
    fn headers_patchwire_manages_are_refused() {
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}[streams.headers]\nIf-None-Match = \"x\"\n"),
            "streams[0].headers.If-None-Match",
            &["does not manage itself"],
        );
        assert_rejected(
            "c.toml",
            &format!("[stream_defaults.headers]\naccept-encoding = \"gzip\"\n{MINIMAL}"),
            "stream_defaults.headers.accept-encoding",
            &["does not manage itself"],
        );
    }

    #[test]
    fn escaped_variable_is_literal() {
        let (_f, result) = load_toml(&format!(
            "{MINIMAL}[streams.headers]\nX-Template = \"$${{NOT_A_VAR}}\"\n"
        ));
        let config = result.expect("escaped reference is valid");
        assert_eq!(
            config.streams[0].headers.get("x-template").unwrap(),
            "${NOT_A_VAR}"
        );
    }

    #[test]
    fn bad_toml_syntax_reports_the_line() {
        assert_rejected(
            "c.toml",
            "[[streams]]\nname = \"a\"\nurl = \n",
            "",
            &["invalid TOML syntax", "line 3"],
        );
    }

    #[test]
    fn bad_yaml_syntax_reports_the_line() {
        assert_rejected(
            "c.yaml",
            "streams:\n  - name: a\n    url: [unclosed\n",
            "",
            &["invalid YAML syntax", "line"],
        );
    }

    #[test]
    fn unknown_rate_limit_group() {
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}rate_limit_group = \"transit\"\n"),
            "streams[0].rate_limit_group",
            &["\"transit\"", "none are defined"],
        );
        assert_rejected(
            "c.toml",
            &format!(
                "[upstream.rate_limits.api]\nper_second = 1\n{MINIMAL}rate_limit_group = \"apx\"\n"
            ),
            "streams[0].rate_limit_group",
            &["\"apx\"", "defined groups: api"],
        );
    }

    #[test]
    fn zero_rate_limits() {
        let err = assert_rejected(
            "c.toml",
            &format!(
                "[upstream.default_rate_limit]\nper_second = 0\n\
                 [upstream.rate_limits.api]\nper_second = 1\nburst = 0\n{MINIMAL}"
            ),
            "upstream.default_rate_limit.per_second",
            &["at least 1"],
        );
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == "upstream.rate_limits.api.burst"),
            "{err}"
        );
    }

    #[test]
    fn wrong_types_are_not_coerced() {
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}history = \"many\"\n"),
            "streams[0].history",
            &["expected a non-negative integer", "\"many\""],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}history = 1.5\n"),
            "streams[0].history",
            &["expected a non-negative integer", "1.5"],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}history = true\n"),
            "streams[0].history",
            &["expected a non-negative integer"],
        );
        assert_rejected(
            "c.toml",
            &format!("[log]\nformat = \"xml\"\n{MINIMAL}"),
            "log.format",
            &["plain, json", "\"xml\""],
        );
        assert_rejected(
            "c.yaml",
            "server: 8080\nstreams: []\n",
            "server",
            &["expected a table"],
        );
    }

    #[test]
    fn missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let err = load_with(&path, &no_env, Vec::new()).expect_err("no such file");
        assert_error(&err, &path, "", &["file not found"]);
    }

    #[test]
    fn unsupported_extension() {
        assert_rejected("c.ini", MINIMAL, "", &[".toml, .yaml or .yml"]);
    }

    #[test]
    fn no_streams() {
        assert_rejected(
            "c.toml",
            "[server]\nlisten = \"127.0.0.1:0\"\n",
            "streams",
            &["expected at least one [[streams]] entry"],
        );
    }

    #[test]
    fn out_of_range_values_are_all_reported_together() {
        let text = r#"
[server]
keepalive = "0s"
subscriber_buffer = 0
[server.cors]
allow_origins = ["https://ok.example", "https://bad.example/path", "*"]
[log]
level = "verbose"
[upstream.backoff]
multiplier = 1.0
jitter = 1.5
initial = "2m"
max = "1m"
[stream_defaults]
max_body = "10 B"
history = 0
[[streams]]
name = "a"
url = "http://example.com/"
timeout = "11m"
[streams.diff]
max_patch_ratio = 2.0
"#;
        let err = assert_rejected("c.toml", text, "server.keepalive", &["between 1s and 10m"]);
        for key in [
            "server.subscriber_buffer",
            "server.cors.allow_origins",
            "log.level",
            "upstream.backoff.multiplier",
            "upstream.backoff.jitter",
            "upstream.backoff.max",
            "stream_defaults.max_body",
            "stream_defaults.history",
            "streams[0].timeout",
            "streams[0].diff.max_patch_ratio",
        ] {
            assert!(
                err.problems.iter().any(|p| p.key == key),
                "no problem at {key}: {err}"
            );
        }
    }

    #[test]
    fn bad_cors_origin_suggests_the_canonical_form() {
        assert_rejected(
            "c.toml",
            &format!("[server.cors]\nallow_origins = [\"https://App.example.com/\"]\n{MINIMAL}"),
            "server.cors.allow_origins[0]",
            &["did you mean \"https://app.example.com\""],
        );
    }

    #[test]
    fn simulator_problems_are_reported_with_their_keys() {
        assert_rejected(
            "c.toml",
            &format!(
                "[simulator]\nlisten = \"127.0.0.1:8081\"\n[[simulator.feeds]]\nname = \"f\"\n\
                 vehicles = 0\n{MINIMAL}"
            ),
            "simulator.feeds[0].vehicles",
            &["1 to 1000000"],
        );
        assert_rejected(
            "c.toml",
            &format!(
                "[server]\nlisten = \"127.0.0.1:9000\"\n[simulator]\nlisten = \"127.0.0.1:9000\"\n\
                 [[simulator.feeds]]\nname = \"f\"\n{MINIMAL}"
            ),
            "simulator.listen",
            &["other than server.listen"],
        );
    }
}

mod environment {
    use super::*;

    fn load_env(
        text: &str,
        overrides: &[(&str, &str)],
    ) -> Result<patchwire::config::Config, ConfigError> {
        let f = file("patchwire.toml", text);
        load_with(&f.path, &no_env, vars(overrides))
    }

    #[test]
    fn string_overrides() {
        let config = load_env(
            MINIMAL,
            &[
                ("PATCHWIRE__SERVER__LISTEN", "127.0.0.1:9000"),
                ("PATCHWIRE__LOG__FORMAT", "json"),
                ("PATCHWIRE__UPSTREAM__USER_AGENT", "1.10"),
                ("UNRELATED__SERVER__LISTEN", "bad"),
                ("PATCHWIRE_SERVER_LISTEN", "bad"),
            ],
        )
        .expect("overrides are valid");
        assert_eq!(
            config.server.listen,
            "127.0.0.1:9000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(
            config.upstream.user_agent, "1.10",
            "strings that look like numbers stay exact"
        );
    }

    #[test]
    fn number_and_bool_overrides() {
        let text = format!(
            "[simulator]\nlisten = \"127.0.0.1:8081\"\n[[simulator.feeds]]\nname = \"f\"\n{MINIMAL}"
        );
        let config = load_env(
            &text,
            &[
                ("PATCHWIRE__SERVER__SUBSCRIBER_BUFFER", "1024"),
                ("PATCHWIRE__UPSTREAM__BACKOFF__MULTIPLIER", "1.5"),
                ("PATCHWIRE__STREAM_DEFAULTS__MAX_BODY", "2048"),
                ("PATCHWIRE__SIMULATOR__ENABLED", "false"),
            ],
        )
        .expect("overrides are valid");
        assert_eq!(config.server.subscriber_buffer, 1024);
        assert_eq!(config.upstream.backoff.multiplier, 1.5);
        assert_eq!(config.streams[0].max_body_bytes, 2048);
        assert!(
            config.simulator.is_none(),
            "simulator disabled by the environment"
        );
    }

    #[test]
    fn indexed_stream_overrides_touch_only_that_stream() {
        let text = format!("{MINIMAL}{}", MINIMAL.replace("\"a\"", "\"b\""));
        let config = load_env(
            &text,
            &[
                ("PATCHWIRE__STREAMS__1__INTERVAL", "2s"),
                ("PATCHWIRE__STREAMS__1__URL", "https://other.example/b"),
            ],
        )
        .expect("overrides are valid");
        assert_eq!(config.streams[0].interval, Duration::from_secs(5));
        assert_eq!(config.streams[0].url.as_str(), "http://example.com/a");
        assert_eq!(config.streams[1].name, "b");
        assert_eq!(config.streams[1].interval, Duration::from_secs(2));
        assert_eq!(config.streams[1].url.as_str(), "https://other.example/b");
    }

    #[test]
    fn list_overrides_are_comma_separated() {
        let config = load_env(
            MINIMAL,
            &[(
                "PATCHWIRE__SERVER__CORS__ALLOW_ORIGINS",
                "https://a.example, https://b.example",
            )],
        )
        .expect("valid origins");
        match &config.server.cors {
            Cors::Origins(origins) => {
                assert_eq!(origins, &["https://a.example", "https://b.example"])
            }
            other => panic!("expected two origins, got {other:?}"),
        }
        let config = load_env(MINIMAL, &[("PATCHWIRE__SERVER__CORS__ALLOW_ORIGINS", "")])
            .expect("empty list");
        assert_eq!(config.server.cors, Cors::Disabled);
    }

    #[test]
    fn bad_override_names_the_variable() {
        let err = load_env(MINIMAL, &[("PATCHWIRE__SERVER__SUBSCRIBER_BUFFER", "lots")])
            .expect_err("not a number");
        let p = &err.problems[0];
        assert_eq!(p.key, "server.subscriber_buffer");
        assert!(
            p.message.contains("an integer") || p.message.contains("non-negative integer"),
            "{err}"
        );
        assert!(
            p.message.contains("PATCHWIRE__SERVER__SUBSCRIBER_BUFFER"),
            "{err}"
        );

        let err = load_env(MINIMAL, &[("PATCHWIRE__SERVER__LISTN", "127.0.0.1:1")])
            .expect_err("unknown key");
        let p = &err.problems[0];
        assert_eq!(p.key, "server.listn");
        assert!(
            p.message.contains("unknown key") && p.message.contains("PATCHWIRE__SERVER__LISTN"),
            "{err}"
        );

        let err = load_env(MINIMAL, &[("PATCHWIRE__SERVER__LISTEN", "nowhere")])
            .expect_err("bad address");
        assert!(
            err.problems[0]
                .message
                .contains("PATCHWIRE__SERVER__LISTEN"),
            "{err}"
        );
    }

    #[test]
    fn overrides_can_add_a_stream_but_not_absurd_indexes() {
        let config = load_env(
            MINIMAL,
            &[
                ("PATCHWIRE__STREAMS__1__NAME", "added"),
                ("PATCHWIRE__STREAMS__1__URL", "http://example.com/added"),
            ],
        )
        .expect("a stream added by the environment");
        assert_eq!(config.streams.len(), 2);
        assert_eq!(config.streams[1].name, "added");

        let err = load_env(
            MINIMAL,
            &[("PATCHWIRE__STREAMS__99999999999__URL", "http://x/")],
        )
        .expect_err("index far beyond any list");
        assert_eq!(err.problems[0].key, "streams[99999999999].url");
        assert!(err.problems[0].message.contains("at most 10000"), "{err}");

        let err = load_env(MINIMAL, &[("PATCHWIRE__STREAMS__3__URL", "http://x/")])
            .expect_err("a gap before index 3");
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "streams[3].url", "{err}");
        assert!(
            err.problems[0]
                .message
                .contains("PATCHWIRE__STREAMS__3__URL"),
            "{err}"
        );
        let err = load_env(
            MINIMAL,
            &[("PATCHWIRÉ__X", "1"), ("PATCHWIRE__\u{e9}", "1")],
        )
        .expect_err("a non-ASCII key is unknown, not a crash");
        assert!(err.problems[0].message.contains("unknown key"), "{err}");
    }

    #[test]
    fn an_override_past_the_end_of_a_list_names_the_variable() {
        let err = load_env(MINIMAL, &[("PATCHWIRE__STREAMS__7__INTERVAL", "2s")])
            .expect_err("streams[1] to streams[6] would be empty");
        assert_eq!(
            err.problems.len(),
            1,
            "one problem, not one per empty entry: {err}"
        );
        let p = &err.problems[0];
        assert_eq!(p.key, "streams[7].interval", "{err}");
        assert!(
            p.message.contains("PATCHWIRE__STREAMS__7__INTERVAL")
                && p.message.contains("`streams[1]`"),
            "{err}"
        );
    }

    #[test]
    fn type_errors_from_the_file_and_the_environment_are_reported_together() {
        let text = format!(
            "{MINIMAL}history = \"many\"\n{}",
            MINIMAL.replace("\"a\"", "\"b\"")
        );
        let err = load_env(
            &text,
            &[
                ("PATCHWIRE__SERVER__SUBSCRIBER_BUFFER", "lots"),
                ("PATCHWIRE__STREAMS__1__MAX_BODY", "big"),
            ],
        )
        .expect_err("three type errors");
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"server.subscriber_buffer"), "{err}");
        assert!(keys.contains(&"streams[0].history"), "{err}");
        assert!(keys.contains(&"streams[1].max_body"), "{err}");
        let from_env = |key: &str, name: &str| {
            err.problems
                .iter()
                .any(|p| p.key == key && p.message.contains(name))
        };
        assert!(
            from_env(
                "server.subscriber_buffer",
                "PATCHWIRE__SERVER__SUBSCRIBER_BUFFER"
            ),
            "{err}"
        );
        assert!(
            from_env("streams[1].max_body", "PATCHWIRE__STREAMS__1__MAX_BODY"),
            "{err}"
        );
    }

    #[test]
    fn header_names_and_variable_names_keep_their_case() {
        let text = format!("{MINIMAL}[streams.headers]\nX-Api-Key = \"${{Mixed_Case}}\"\n");
        let f = file("c.toml", &text);
        let raw: RawConfig = load_raw(&f.path, Vec::new()).expect("parses");
        assert!(
            raw.streams[0].headers.contains_key("X-Api-Key"),
            "{:?}",
            raw.streams[0].headers
        );
        let env = |name: &str| (name == "Mixed_Case").then(|| "v".to_owned());
        let config = load_with(&f.path, &env, Vec::new()).expect("variable found by exact name");
        assert_eq!(config.streams[0].headers.get("x-api-key").unwrap(), "v");

        let yaml = file(
            "c.yaml",
            "streams:\n  - name: a\n    url: http://example.com/\n    headers:\n      X-Api-Key: k\n",
        );
        let raw = load_raw(&yaml.path, Vec::new()).expect("parses");
        assert!(raw.streams[0].headers.contains_key("X-Api-Key"));
    }
}

mod defaults {
    use super::*;

    #[test]
    fn a_minimal_file_gets_every_documented_default() {
        let (_f, result) = load_toml(MINIMAL);
        let config = result.expect("minimal file is valid");
        let s = &config.server;
        assert_eq!(s.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(s.keepalive, Duration::from_secs(15));
        assert_eq!(s.retry_hint, Duration::from_secs(2));
        assert_eq!(s.subscriber_buffer, 256);
        assert_eq!(s.stall_timeout, Duration::from_secs(30));
        assert_eq!(s.shutdown_grace, Duration::from_secs(5));
        assert_eq!(s.header_timeout, Duration::from_secs(30));
        assert_eq!(s.idle_timeout, Duration::from_secs(30));
        assert_eq!(s.body_timeout, Duration::from_secs(30));
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.cors, Cors::AnyOrigin);
        assert_eq!(config.log.format, LogFormat::Plain);
        assert_eq!(config.log.filter, "info");
        let u = &config.upstream;
        assert_eq!(
            u.user_agent,
            format!("patchwire/{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(u.default_rate_limit.per_second.get(), 10);
        assert_eq!(u.default_rate_limit.burst.get(), 10);
        assert!(u.rate_limits.is_empty());
        assert_eq!(u.backoff.initial, Duration::from_secs(1));
        assert_eq!(u.backoff.max, Duration::from_secs(300));
        assert_eq!(u.backoff.multiplier, 2.0);
        assert_eq!(u.backoff.jitter, 0.2);
        assert_eq!(u.backoff.max_retry_after, Duration::from_secs(3600));
        assert!(config.simulator.is_none());
        let st = &config.streams[0];
        assert_eq!(st.interval, Duration::from_secs(5));
        assert_eq!(st.timeout, Duration::from_secs(10));
        assert_eq!(st.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(st.history, 1000);
        assert_eq!(st.format.as_str(), "json");
        assert_eq!(st.rate_limit_group, "example.com:80");
        assert!(st.headers.is_empty());
        assert_eq!(st.diff.max_patch_ratio, 1.0);
    }

    #[test]
    fn stream_defaults_apply_unless_a_stream_sets_its_own() {
        let text = r#"
[stream_defaults]
interval = "2s"
max_body = "1 MiB"
history = 10
[stream_defaults.headers]
Accept = "application/json"
X-Tenant = "default"

[[streams]]
name = "inherits"
url = "https://example.com/a"

[[streams]]
name = "overrides"
url = "https://example.com/b"
interval = "3s"
max_body = 4096
history = 20
[streams.headers]
x-tenant = "mine"
"#;
        let (_f, result) = load_toml(text);
        let config = result.expect("valid");
        let (a, b) = (&config.streams[0], &config.streams[1]);
        assert_eq!(
            (a.interval, a.max_body_bytes, a.history),
            (Duration::from_secs(2), 1 << 20, 10)
        );
        assert_eq!(
            (b.interval, b.max_body_bytes, b.history),
            (Duration::from_secs(3), 4096, 20)
        );
        assert_eq!(a.headers.get("x-tenant").unwrap(), "default");
        assert_eq!(b.headers.get_all("x-tenant").iter().count(), 1);
        assert_eq!(b.headers.get("x-tenant").unwrap(), "mine");
        assert_eq!(b.headers.get("accept").unwrap(), "application/json");
        assert_eq!(a.rate_limit_group, "example.com:443");
    }

    #[test]
    fn named_group_burst_defaults_to_its_rate() {
        let (_f, result) = load_toml(&format!(
            "[upstream.rate_limits.api]\nper_second = 3\n{MINIMAL}rate_limit_group = \"api\"\n"
        ));
        let config = result.expect("valid");
        let group = &config.upstream.rate_limits["api"];
        assert_eq!((group.per_second.get(), group.burst.get()), (3, 3));
        assert_eq!(config.streams[0].rate_limit_group, "api");
    }

    #[test]
    fn validate_is_pure_and_takes_env_through_the_lookup() {
        let raw: RawConfig = {
            let f = file(
                "c.toml",
                "[[streams]]\nname = \"a\"\nurl = \"https://${HOST}/x\"\n",
            );
            load_raw(&f.path, Vec::new()).expect("parses")
        };
        let env: HashMap<&str, &str> = HashMap::from([("HOST", "api.example.com")]);
        let lookup = |name: &str| env.get(name).map(|v| (*v).to_owned());
        let config = validate(raw.clone(), None, &lookup).expect("valid");
        assert_eq!(config.streams[0].url.as_str(), "https://api.example.com/x");
        assert!(config.source.is_none());
        let err = validate(raw, None, &no_env).expect_err("HOST unset");
        assert!(
            err.to_string().starts_with("<built-in configuration>"),
            "{err}"
        );
    }

    #[test]
    fn describe_lists_streams_without_secrets() {
        let text = format!(
            "{}[streams.headers]\nAuthorization = \"Bearer hunter2\"\n",
            MINIMAL.replace(
                "http://example.com/a",
                "https://u:pw@example.com/a?key=hunter3"
            )
        );
        let (_f, result) = load_toml(&text);
        let config = result.expect("valid");
        let summary = describe(&config);
        for needle in [
            "a (served at /streams/a)",
            "every 5s",
            "timeout 10s",
            "json",
            "1000 changes",
            "\"example.com:443\"",
            "10/s, burst 10",
            "authorization (values hidden)",
            "listening on 127.0.0.1:8080",
        ] {
            assert!(
                summary.contains(needle),
                "missing {needle:?} in:\n{summary}"
            );
        }
        for secret in ["hunter2", "hunter3", ":pw@"] {
            assert!(!summary.contains(secret), "{secret} leaked in:\n{summary}");
        }
    }
}

mod push_source {
    use super::*;

    const PUSH: &str = r#"
[push]
token = "0123456789abcdef-token"

[[streams]]
name = "prices"
source = "push"
history = 50
"#;

    #[test]
    fn push_streams_need_no_url_and_are_listed_apart() {
        let f = file("p.toml", PUSH);
        let config = load_with(&f.path, &no_env, Vec::new()).unwrap();
        assert!(config.streams.is_empty());
        assert_eq!(config.push_streams.len(), 1);
        assert_eq!(config.push_streams[0].name, "prices");
        assert_eq!(config.push_streams[0].history, 50);
        assert_eq!(
            config.push.as_ref().map(|p| p.token.as_str()),
            Some("0123456789abcdef-token")
        );
        let summary = describe(&config);
        assert!(
            summary.contains("prices") && !summary.contains("0123456789abcdef-token"),
            "{summary}"
        );
    }

    #[test]
    fn poll_only_keys_on_a_push_stream_are_refused() {
        let text = format!("{PUSH}url = \"http://example.com/\"\ninterval = \"2s\"\n");
        let err = assert_rejected(
            "p.toml",
            &text,
            "streams[0].url",
            &["only applies to polled streams"],
        );
        assert!(
            err.problems.iter().any(|p| p.key == "streams[0].interval"),
            "{err}"
        );
    }

    #[test]
    fn push_streams_need_a_token() {
        assert_rejected(
            "p.toml",
            "[[streams]]\nname = \"prices\"\nsource = \"push\"\n",
            "push.token",
            &["missing required key", "prices"],
        );
        let short = PUSH.replace("0123456789abcdef-token", "short");
        let err = assert_rejected("p.toml", &short, "push.token", &["at least 16 characters"]);
        assert!(
            !err.to_string().contains("\"short\""),
            "the token is never echoed: {err}"
        );
    }

    #[test]
    fn unknown_sources_are_refused() {
        assert_rejected(
            "p.toml",
            "[[streams]]\nname = \"a\"\nsource = \"stream\"\n",
            "streams[0].source",
            &["poll", "push"],
        );
    }
}

mod every_problem_at_once {
    use super::*;

    #[test]
    fn type_errors_unknown_and_missing_keys_and_validation_problems_together() {
        let text = r#"
[server]
subscriber_buffer = "lots"
listn = "127.0.0.1:1"

[[streams]]
name = "a"
url = "http://example.com/a"
history = 1.5
interval = 5

[[streams]]
name = "b"

[[streams]]
name = "c"
url = "http://example.com/c"
interval = "0s"
"#;
        let f = file("bad.toml", text);
        let err = load_with(&f.path, &no_env, Vec::new()).expect_err("many problems");
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "server.subscriber_buffer",
            "server.listn",
            "streams[0].history",
            "streams[0].interval",
            "streams[1].url",
            "streams[2].interval",
        ] {
            assert!(keys.contains(&key), "{key} missing from {err}");
        }
        assert_eq!(
            keys.len(),
            6,
            "one problem per wrong key, none made up: {err}"
        );
        let rendered = err.to_string();
        assert!(rendered.contains("bad.toml: 6 problems"), "{rendered}");
    }

    #[test]
    fn validation_problems_come_with_type_errors_when_nothing_was_made_up() {
        let text = r#"
[server]
subscriber_buffer = "lots"

[[streams]]
name = "c"
url = "http://example.com/c"
interval = "0s"
"#;
        let f = file("bad.toml", text);
        let err = load_with(&f.path, &no_env, Vec::new()).expect_err("two problems");
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["server.subscriber_buffer", "streams[0].interval"],
            "{err}"
        );
    }
}

mod proxy {
    use super::*;
    use patchwire::proxy::config::HostPattern;

    const TOKEN: &str = "proxy-token-0123456789";

    /// The private key of the Streamdata.io SDK's own tests: base64 of 72 characters.
    const SIGNING_KEY: &str = "MmIyMzBlZGMtOGYyNi00OGY2LWI2YTYtZmY1OTFlMzY1NjNiYjNhMzc3NWMtMzMwMC00YmMzLWI0NGYtMmM1ZmU4MDAzMGFh";

    #[test]
    fn signing_secrets_are_checked_and_never_shown() {
        let text = proxy("ascii_only = false\nsignature_max_skew = \"30s\"\n").replace(
            "name = \"web\"",
            "name = \"web\"\nsigning_secret = \"${SIGNING}\"\nrequire_signature = true",
        );
        let f = file("p.toml", &text);
        let env = |name: &str| (name == "SIGNING").then(|| SIGNING_KEY.to_owned());
        let p = load_with(&f.path, &env, Vec::new())
            .expect("valid")
            .proxy
            .expect("enabled");
        assert!(!p.ascii_only);
        assert_eq!(p.signature_max_skew, Duration::from_secs(30));
        let key = p.tokens[0].signing_key.as_ref().expect("a key");
        assert_eq!(key.beacon, "2b230edc-8f26-48f6-b6a6-ff591e36563b");
        assert!(p.tokens[0].require_signature);
        assert!(!format!("{p:?}").contains(&key.key), "the key is redacted");

        let bad = proxy("signature_max_skew = \"0s\"\n").replace(
            "name = \"web\"",
            "name = \"web\"\nsigning_secret = \"c2hvcnQ=\"",
        );
        let err = assert_refused(&bad, "proxy.tokens[0].signing_secret", &["72 characters"]);
        assert!(!err.to_string().contains("c2hvcnQ="), "{err}");
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == "proxy.signature_max_skew" && p.message.contains("1s")),
            "{err}"
        );
        assert_refused(
            &proxy("").replace("name = \"web\"", "name = \"web\"\nrequire_signature = true"),
            "proxy.tokens[0].require_signature",
            &["signing_secret"],
        );
    }

    #[test]
    fn a_proxy_with_tokens_and_no_streams_is_valid() {
        let text = format!(
            "[proxy]\nenabled = true\nallowed_hosts = [\"api.example.com\"]\n\
             [[proxy.tokens]]\nname = \"web\"\ntoken = \"{TOKEN}\"\n"
        );
        let (_f, result) = load_toml(&text);
        let config = result.expect("a proxy-only deployment");
        assert!(config.streams.is_empty() && config.push_streams.is_empty());
        assert!(config.proxy.is_some());
        let err = assert_rejected(
            "p.toml",
            &text.replace("enabled = true", "enabled = false"),
            "streams",
            &["at least one [[streams]]", "[proxy]"],
        );
        assert_eq!(err.problems.len(), 1, "{err}");
    }

    fn proxy(extra: &str) -> String {
        format!(
            "{MINIMAL}\n[proxy]\nenabled = true\nallowed_hosts = [\"api.example.com\", \
             \"*.example.org\"]\n{extra}\n[[proxy.tokens]]\nname = \"web\"\ntoken = \"{TOKEN}\"\n"
        )
    }

    /// Like `assert_rejected`, and the token never appears in the error.
    fn assert_refused(text: &str, key: &str, needles: &[&str]) -> ConfigError {
        let err = assert_rejected("p.toml", text, key, needles);
        assert!(!err.to_string().contains(TOKEN), "token leaked: {err}");
        err
    }

    #[test]
    fn an_enabled_proxy_gets_every_documented_default() {
        let (_f, result) = load_toml(&proxy(""));
        let p = result.expect("valid").proxy.expect("enabled");
        assert_eq!(
            p.allowed_hosts,
            [
                HostPattern::Exact("api.example.com".to_owned()),
                HostPattern::Subdomains(".example.org".to_owned())
            ]
        );
        assert!(!p.allow_private);
        assert_eq!(p.interval, Duration::from_secs(5));
        assert_eq!(p.min_interval, Duration::from_secs(1));
        assert_eq!(p.linger, Duration::from_secs(30));
        assert_eq!(p.keepalive, Duration::from_secs(10));
        assert_eq!(p.timeout, Duration::from_secs(10));
        assert_eq!(p.max_streams, 1000);
        assert_eq!(p.max_memory, 256 * 1024 * 1024);
        assert_eq!(p.max_body_bytes, 8 * 1024 * 1024);
        assert_eq!(p.history, 64);
        assert!(p.ascii_only);
        assert_eq!(p.signature_max_skew, Duration::from_secs(300));
        assert!(p.host_intervals.is_empty());
        assert!(!p.diff.allow_move);
        assert_eq!(p.tokens.len(), 1);
        let t = &p.tokens[0];
        assert!(t.signing_key.is_none() && !t.require_signature);
        assert_eq!(t.name, "web");
        assert_eq!(t.token, TOKEN);
        assert_eq!(t.max_connections, 100);
        assert_eq!(
            (t.connections_per_second.get(), t.connections_burst.get()),
            (10, 10)
        );
        assert_eq!(t.allowed_hosts, None);
        assert_eq!(t.interval, None);
        assert_eq!(t.min_interval, Duration::ZERO);
    }

    #[test]
    fn absent_or_disabled_proxy_is_none() {
        let (_f, result) = load_toml(MINIMAL);
        assert!(result.expect("valid").proxy.is_none());
        let (_f, result) = load_toml(&proxy("").replace("enabled = true", "enabled = false"));
        assert!(result.expect("valid").proxy.is_none());
        let (_f, result) = load_toml(&proxy("").replace("enabled = true\n", ""));
        assert!(
            result.expect("valid").proxy.is_none(),
            "disabled by default"
        );
    }

    #[test]
    fn a_full_table_is_read_into_the_model() {
        let text = proxy(
            r#"allow_private = true
interval = "2s"
min_interval = "500ms"
linger = "0s"
keepalive = "5s"
timeout = "3s"
max_streams = 10
max_memory = "1 GiB"
max_body = "1 MiB"
history = 10
[proxy.diff]
keys = { "/prices" = "symbol" }
[proxy.hosts."*.example.org"]
interval = "20s"
[proxy.hosts."api.example.com"]
interval = "1s"
[proxy.hosts."*.eu.example.org"]
interval = "15s"
"#,
        ) + r#"max_connections = 5
connections_per_second = 2
allowed_hosts = ["*.eu.example.org", "api.example.com"]
interval = "3s"
min_interval = "1s"
"#;
        let (_f, result) = load_toml(&text);
        let p = result.expect("valid").proxy.expect("enabled");
        assert!(p.allow_private);
        assert_eq!(
            (p.interval, p.min_interval, p.linger, p.keepalive, p.timeout),
            (
                Duration::from_secs(2),
                Duration::from_millis(500),
                Duration::ZERO,
                Duration::from_secs(5),
                Duration::from_secs(3)
            )
        );
        assert_eq!(
            (p.max_streams, p.max_memory, p.max_body_bytes, p.history),
            (10, 1 << 30, 1 << 20, 10)
        );
        assert_eq!(p.diff.keys.len(), 1);
        // Exact hosts first, then wildcards from the longest suffix: the first match wins.
        let order: Vec<(String, Duration)> = p
            .host_intervals
            .iter()
            .map(|(h, d)| (h.to_string(), *d))
            .collect();
        assert_eq!(
            order,
            [
                ("api.example.com".to_owned(), Duration::from_secs(1)),
                ("*.eu.example.org".to_owned(), Duration::from_secs(15)),
                ("*.example.org".to_owned(), Duration::from_secs(20)),
            ]
        );
        let first_match = |host: &str| {
            p.host_intervals
                .iter()
                .find(|(pattern, _)| pattern.matches(host))
                .map(|(_, d)| d.as_secs())
        };
        assert_eq!(first_match("a.eu.example.org"), Some(15));
        assert_eq!(first_match("a.example.org"), Some(20));
        assert_eq!(first_match("api.example.com"), Some(1));
        assert_eq!(first_match("example.org"), None);
        let t = &p.tokens[0];
        assert_eq!(t.max_connections, 5);
        assert_eq!(
            (t.connections_per_second.get(), t.connections_burst.get()),
            (2, 2),
            "the burst defaults to the rate"
        );
        assert_eq!(t.allowed_hosts.as_ref().map(Vec::len), Some(2));
        assert_eq!(t.interval, Some(Duration::from_secs(3)));
        assert_eq!(t.min_interval, Duration::from_secs(1));
    }

    #[test]
    fn enabled_proxy_needs_hosts_and_a_token() {
        let err = assert_refused(
            &format!("{MINIMAL}[proxy]\nenabled = true\n"),
            "proxy.allowed_hosts",
            &["missing required key"],
        );
        assert_error(
            &err,
            err.file.as_deref().unwrap(),
            "proxy.tokens",
            &["at least one [[proxy.tokens]]"],
        );
        assert_refused(
            &proxy("").replace("[\"api.example.com\", \"*.example.org\"]", "[]"),
            "proxy.allowed_hosts",
            &["at least one host"],
        );
    }

    #[test]
    fn bad_host_patterns_name_their_index() {
        for bad in [
            "https://api.example.com",
            "api.example.com:443",
            "*",
            "**.x",
            "a/b",
        ] {
            assert_refused(
                &proxy("").replace("\"*.example.org\"", &format!("{bad:?}")),
                "proxy.allowed_hosts[1]",
                &["expected a host name", &format!("{bad:?}")],
            );
        }
        assert_refused(
            &proxy("[proxy.hosts.\"x:80\"]\ninterval = \"1s\"\n"),
            "proxy.hosts.\"x:80\"",
            &["expected a host name"],
        );
    }

    #[test]
    fn out_of_range_values_name_key_and_bounds() {
        let err = assert_refused(
            &proxy(
                "interval = \"50ms\"\nmin_interval = \"2h\"\nlinger = \"2 days\"\n\
                 keepalive = \"10m\"\ntimeout = \"10ms\"\nmax_streams = 0\n\
                 max_memory = \"100 GiB\"\nmax_body = 10\nhistory = 100001\n",
            ),
            "proxy.interval",
            &["between 100ms and 1day", "got \"50ms\""],
        );
        let path = err.file.clone().unwrap();
        for (key, needle) in [
            ("proxy.min_interval", "between 10ms and 1h"),
            ("proxy.linger", "between 0s and 1day"),
            ("proxy.keepalive", "between 1s and 5m"),
            ("proxy.timeout", "between 100ms and 5m"),
            ("proxy.max_streams", "from 1 to 1000000"),
            ("proxy.max_memory", "1.0 MiB to 64.0 GiB"),
            ("proxy.max_body", "1.0 KiB to 1.0 GiB"),
            ("proxy.history", "from 1 to 100000"),
        ] {
            assert_error(&err, &path, key, &[needle]);
        }
        assert_refused(
            &proxy("[proxy.hosts.\"api.example.com\"]\ninterval = \"0s\"\n"),
            "proxy.hosts.\"api.example.com\".interval",
            &["between 100ms and 1day"],
        );
    }

    #[test]
    fn unknown_proxy_keys_are_refused() {
        assert_refused(
            &proxy("intervall = \"1s\"\n"),
            "proxy.intervall",
            &["unknown key", "allowed_hosts", "min_interval"],
        );
        assert_refused(
            &(proxy("") + "max_conections = 1\n"),
            "proxy.tokens[0].max_conections",
            &["unknown key", "max_connections"],
        );
    }

    #[test]
    fn move_operations_are_refused() {
        assert_refused(
            &proxy("[proxy.diff]\nallow_move = true\n"),
            "proxy.diff.allow_move",
            &["Streamdata.io", "add, remove and replace"],
        );
    }

    #[test]
    fn token_problems_never_show_the_token() {
        let short = proxy("").replace(TOKEN, "sh0rt-secret");
        let err = assert_refused(&short, "proxy.tokens[0].token", &["at least 16 characters"]);
        assert!(!err.to_string().contains("sh0rt-secret"), "{err}");

        let twice = proxy("")
            + &format!("[[proxy.tokens]]\nname = \"mobile\"\ntoken = \"{TOKEN}\"\n")
            + &format!("[[proxy.tokens]]\nname = \"web\"\ntoken = \"{TOKEN}-2\"\n");
        let err = assert_refused(
            &twice,
            "proxy.tokens[1].token",
            &["same as the token of proxy.tokens[0] (\"web\")"],
        );
        assert_error(
            &err,
            err.file.as_deref().unwrap(),
            "proxy.tokens[2].name",
            &["unique", "proxy.tokens[0]"],
        );

        let missing = proxy("").replace(&format!("token = \"{TOKEN}\"\n"), "");
        assert_refused(&missing, "proxy.tokens[0].token", &["missing required key"]);
        let unset = proxy("").replace(TOKEN, "${PROXY_TOKEN}");
        assert_refused(&unset, "proxy.tokens[0].token", &["PROXY_TOKEN", "not set"]);
        let f = file("p.toml", &unset);
        let env = |name: &str| (name == "PROXY_TOKEN").then(|| "from-the-environment-0123".into());
        let config = load_with(&f.path, &env, Vec::new()).expect("token from the environment");
        let p = config.proxy.as_ref().unwrap();
        assert_eq!(p.tokens[0].token, "from-the-environment-0123");
        let summary = describe(&config);
        assert!(
            summary.contains("token \"web\"") && !summary.contains("from-the-environment"),
            "{summary}"
        );
    }

    #[test]
    fn token_limits_are_bounded() {
        let text = proxy("")
            + "max_connections = 0\nconnections_per_second = 100001\nconnections_burst = 0\n\
               interval = \"10ms\"\nmin_interval = \"2 days\"\n";
        let err = assert_refused(
            &text,
            "proxy.tokens[0].max_connections",
            &["from 1 to 1000000"],
        );
        let path = err.file.clone().unwrap();
        for (key, needle) in [
            ("proxy.tokens[0].connections_per_second", "from 1 to 100000"),
            ("proxy.tokens[0].connections_burst", "from 1 to 100000"),
            ("proxy.tokens[0].interval", "between 100ms and 1day"),
            ("proxy.tokens[0].min_interval", "between 0s and 1day"),
        ] {
            assert_error(&err, &path, key, &[needle]);
        }
    }

    #[test]
    fn token_hosts_must_be_allowed_globally() {
        let ok = proxy("")
            + "allowed_hosts = [\"API.example.com\", \"x.example.org\", \"*.example.org\", \
               \"*.eu.example.org\"]\n";
        let (_f, result) = load_toml(&ok);
        let p = result.expect("covered by the global list").proxy.unwrap();
        assert_eq!(p.tokens[0].allowed_hosts.as_ref().map(Vec::len), Some(4));
        for (bad, why) in [
            ("example.org", "a wildcard does not cover its own domain"),
            ("*.example.com", "an exact host does not cover a wildcard"),
            ("other.example.com", "another host"),
            ("*.org", "a wider wildcard"),
        ] {
            let text = proxy("") + &format!("allowed_hosts = [\"x.example.org\", {bad:?}]\n");
            let err = assert_refused(
                &text,
                "proxy.tokens[0].allowed_hosts[1]",
                &["not in proxy.allowed_hosts", bad],
            );
            assert_eq!(err.problems.len(), 1, "{why}: {err}");
        }
    }

    #[test]
    fn a_disabled_proxy_is_still_checked_for_mistakes() {
        let text = proxy("interval = \"1ms\"\n").replace("enabled = true", "enabled = false");
        assert_refused(&text, "proxy.interval", &["between 100ms and 1day"]);
    }

    #[test]
    fn the_environment_can_enable_the_proxy() {
        let disabled = proxy("").replace("enabled = true\n", "");
        let f = file("p.toml", &disabled);
        let config = load_with(
            &f.path,
            &no_env,
            vars(&[
                ("PATCHWIRE__PROXY__ENABLED", "true"),
                (
                    "PATCHWIRE__PROXY__ALLOWED_HOSTS",
                    "api.example.com,*.example.net",
                ),
                ("PATCHWIRE__PROXY__LINGER", "1m"),
            ]),
        )
        .expect("valid overrides");
        let p = config.proxy.expect("enabled by the environment");
        assert_eq!(p.linger, Duration::from_secs(60));
        assert_eq!(p.allowed_hosts[1].to_string(), "*.example.net");

        let err = load_with(
            &file("m.toml", MINIMAL).path,
            &no_env,
            vars(&[("PATCHWIRE__PROXY__ENABLED", "true")]),
        )
        .expect_err("enabled without hosts or tokens");
        assert!(
            err.problems.iter().any(|p| p.key == "proxy.allowed_hosts"),
            "{err}"
        );
        let err = load_with(
            &f.path,
            &no_env,
            vars(&[("PATCHWIRE__PROXY__MAX_STREAMS", "0")]),
        )
        .expect_err("out of range");
        assert!(
            err.problems[0]
                .message
                .contains("set by environment variable PATCHWIRE__PROXY__MAX_STREAMS"),
            "{err}"
        );
    }

    #[test]
    fn describe_summarizes_the_proxy_without_tokens() {
        let text = proxy("[proxy.hosts.\"api.example.com\"]\ninterval = \"2s\"\n")
            + "allowed_hosts = [\"api.example.com\"]\n";
        let (_f, result) = load_toml(&text);
        let summary = describe(&result.expect("valid"));
        for needle in [
            "proxy: dynamic streams at GET /{target URL}",
            "api.example.com, *.example.org",
            "public addresses only",
            "every 5s (never more often than every 1s)",
            "linger 30s",
            "host api.example.com: every 2s",
            "1000 streams, 256.0 MiB of snapshots, bodies up to 8.0 MiB",
            "token \"web\" (value hidden): 100 connections, 10/s, burst 10, hosts: api.example.com",
        ] {
            assert!(
                summary.contains(needle),
                "missing {needle:?} in:\n{summary}"
            );
        }
        assert!(!summary.contains(TOKEN), "{summary}");
    }
}

mod on_demand_streams {
    use super::*;

    #[test]
    fn streams_poll_always_unless_on_demand() {
        let (_f, result) = load_toml(MINIMAL);
        assert_eq!(result.expect("valid").streams[0].on_demand, None);
        let (_f, result) = load_toml(&format!("{MINIMAL}on_demand = false\n"));
        assert_eq!(result.expect("valid").streams[0].on_demand, None);
        let (_f, result) = load_toml(&format!("{MINIMAL}on_demand = true\n"));
        let config = result.expect("valid");
        assert_eq!(config.streams[0].on_demand, Some(Duration::from_secs(30)));
        assert!(
            describe(&config).contains("on demand (only while subscribed, lingering 30s"),
            "{}",
            describe(&config)
        );
        let (_f, result) = load_toml(&format!("{MINIMAL}on_demand = true\nlinger = \"0s\"\n"));
        assert_eq!(
            result.expect("valid").streams[0].on_demand,
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn linger_needs_on_demand_and_stays_in_bounds() {
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}linger = \"1m\"\n"),
            "streams[0].linger",
            &["on_demand = true"],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}on_demand = false\nlinger = \"1m\"\n"),
            "streams[0].linger",
            &["on_demand = true"],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}on_demand = true\nlinger = \"2 days\"\n"),
            "streams[0].linger",
            &["between 0s and 1day", "got \"2days\""],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}on_demand = \"yes\"\n"),
            "streams[0].on_demand",
            &["a boolean"],
        );
    }

    #[test]
    fn push_streams_refuse_on_demand_and_linger() {
        let text = "[push]\ntoken = \"0123456789abcdef-token\"\n\
                    [[streams]]\nname = \"prices\"\nsource = \"push\"\n\
                    on_demand = true\nlinger = \"1m\"\n";
        let err = assert_rejected(
            "p.toml",
            text,
            "streams[0].on_demand",
            &["only applies to polled streams", "source = \"push\""],
        );
        assert_error(
            &err,
            err.file.as_deref().unwrap(),
            "streams[0].linger",
            &["only applies to polled streams"],
        );
    }

    #[test]
    fn the_environment_can_make_a_stream_on_demand() {
        let f = file("c.toml", MINIMAL);
        let config = load_with(
            &f.path,
            &no_env,
            vars(&[
                ("PATCHWIRE__STREAMS__0__ON_DEMAND", "true"),
                ("PATCHWIRE__STREAMS__0__LINGER", "5s"),
            ]),
        )
        .expect("valid overrides");
        assert_eq!(config.streams[0].on_demand, Some(Duration::from_secs(5)));
    }
}

#[test]
fn history_bytes_defaults_inherits_and_is_checked() {
    let (_f, result) = load_toml(
        "[stream_defaults]\nhistory_bytes = \"2 MiB\"\n\
         [[streams]]\nname = \"a\"\nurl = \"http://example.com/a\"\n\
         [[streams]]\nname = \"b\"\nurl = \"http://example.com/b\"\nhistory_bytes = 4096\n",
    );
    let config = result.expect("valid");
    assert_eq!(config.streams[0].history_bytes, 2 << 20);
    assert_eq!(config.streams[1].history_bytes, 4096);
    let (_f, result) = load_toml("[[streams]]\nname = \"a\"\nurl = \"http://example.com/a\"\n");
    assert_eq!(
        result.expect("valid").streams[0].history_bytes,
        patchwire::upstream::config::defaults::HISTORY_BYTES
    );
    assert_rejected(
        "patchwire.toml",
        "[[streams]]\nname = \"a\"\nurl = \"http://example.com/a\"\nhistory_bytes = 10\n",
        "streams[0].history_bytes",
        &["1 KiB to 1 GiB", "got 10 bytes"],
    );
}

/// `config/default.toml` against the code: it shows every key the file's shape has, and every
/// default it states is the one validation applies. Setting a documented default explicitly
/// must change nothing in the validated configuration.
mod default_toml {
    use patchwire::config::{FileKind, parse_raw};

    use super::*;

    /// A table header or a `key = value` line of the file, commented out or not.
    #[derive(Debug)]
    struct Line {
        /// Index of the line in the file.
        index: usize,
        /// The table it is in (its header's name, quotes removed), or the table it opens.
        table: String,
        /// The key it sets; `None` for a header.
        key: Option<String>,
        /// Written as `# ...`.
        commented: bool,
        /// Marked `# example`, or in a table whose header is: a value to adapt, not a default.
        example: bool,
    }

    impl Line {
        /// A commented-out key that states its default.
        fn is_default(&self) -> bool {
            self.key.is_some() && self.commented && !self.example
        }
    }

    struct DefaultToml {
        text: Vec<String>,
        lines: Vec<Line>,
    }

    /// The name of the table a header line opens (`[a.b]`, `[[a.b]]`), quotes removed.
    fn header(code: &str) -> Option<String> {
        let code = code.split(" #").next().unwrap_or(code).trim_end();
        let inner = code
            .strip_prefix("[[")
            .and_then(|c| c.strip_suffix("]]"))
            .or_else(|| code.strip_prefix('[').and_then(|c| c.strip_suffix(']')))?;
        let valid = !inner.is_empty()
            && inner
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-\"*".contains(c));
        valid.then(|| inner.replace('"', ""))
    }

    fn read() -> DefaultToml {
        let text = std::fs::read_to_string(repo_file("config/default.toml")).expect("default.toml");
        // The one placeholder the file shows instead of a value.
        let text = text.replace(
            "patchwire/<version>",
            &format!("patchwire/{}", env!("CARGO_PKG_VERSION")),
        );
        let text: Vec<String> = text.lines().map(str::to_owned).collect();
        let mut lines = Vec::new();
        let (mut table, mut table_example) = (String::new(), false);
        for (index, line) in text.iter().enumerate() {
            let (commented, code) = match line.strip_prefix("# ") {
                Some(code) => (true, code),
                None if line.starts_with('#') => continue,
                None => (false, line.as_str()),
            };
            let example = code.trim_end().ends_with("# example");
            if let Some(name) = header(code) {
                table = name;
                table_example = example;
                lines.push(Line {
                    index,
                    table: table.clone(),
                    key: None,
                    commented,
                    example,
                });
                continue;
            }
            let Some((key, _)) = code.split_once(" = ") else {
                assert!(
                    !code.contains("(default"),
                    "default.toml:{}: a default stated in prose is not checked; show it as a \
                     commented-out `key = value` line: {line}",
                    index + 1
                );
                continue;
            };
            if !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                lines.push(Line {
                    index,
                    table: table.clone(),
                    key: Some(key.to_owned()),
                    commented,
                    example: example || table_example,
                });
            }
        }
        DefaultToml { text, lines }
    }

    impl DefaultToml {
        /// Whether `line` sets a key that a commented-out default line also shows: this file's
        /// own value, left out wherever the defaults are compared.
        fn overrides_a_default(&self, line: &Line) -> bool {
            !line.commented
                && line.key.is_some()
                && self
                    .lines
                    .iter()
                    .any(|d| d.is_default() && d.table == line.table && d.key == line.key)
        }

        /// The file with every table and every example uncommented, the values it sets in place
        /// of a default left out, and `also` uncommented too: everything at its default except
        /// what `also` states.
        fn with(&self, also: &dyn Fn(&Line) -> bool) -> String {
            let mut text = self.text.clone();
            for line in &self.lines {
                let uncomment =
                    line.commented && (line.key.is_none() || line.example || also(line));
                if uncomment {
                    text[line.index] = text[line.index]["# ".len()..].to_owned();
                } else if self.overrides_a_default(line) {
                    text[line.index] = format!("# {}", text[line.index]);
                }
            }
            text.join("\n") + "\n"
        }
    }

    /// Values for the `${VAR}` references of the file's examples.
    fn example_env(name: &str) -> Option<String> {
        let value = match name {
            "PATCHWIRE_PUSH_TOKEN" => "push-token-0123456789",
            "PATCHWIRE_ADMIN_TOKEN" => "admin-token-0123456789",
            "PATCHWIRE_PROXY_TOKEN" => "proxy-token-0123456789",
            "API_TOKEN" => "api-token",
            "BILLING_WEBHOOK_SECRET" | "PATCHWIRE_OPERATOR_SECRET" => {
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            }
            // The Streamdata.io SDK's own test key: base64 of 72 characters.
            "PATCHWIRE_PROXY_SIGNING_SECRET" => {
                "MmIyMzBlZGMtOGYyNi00OGY2LWI2YTYtZmY1OTFlMzY1NjNiYjNhMzc3NWMtMzMwMC00YmMzLWI0NGYtMmM1ZmU4MDAzMGFh"
            }
            _ => return None,
        };
        Some(value.to_owned())
    }

    /// What a default of `table` and `key` is compared under, set from the environment: the
    /// proxy enabled (a disabled one has no settings to compare), except to check `enabled`
    /// itself; a stream on demand to check `linger`, which applies only then.
    fn context(table: &str, key: &str) -> Vec<(String, String)> {
        match (table, key) {
            ("proxy", "enabled") => Vec::new(),
            ("streams", "linger") => vars(&[
                ("PATCHWIRE__PROXY__ENABLED", "true"),
                ("PATCHWIRE__STREAMS__0__ON_DEMAND", "true"),
            ]),
            _ => vars(&[("PATCHWIRE__PROXY__ENABLED", "true")]),
        }
    }

    /// `text` validated under `context`, as `{:#?}` lines.
    fn validated(text: &str, context: Vec<(String, String)>) -> Result<Vec<String>, String> {
        let raw = parse_raw(text, FileKind::Toml, None, context).map_err(|e| e.to_string())?;
        // As loaded from its place, so that its example `schema` file is found beside it.
        let source = Path::new("config/default.toml");
        let config = validate(raw, Some(source), &example_env).map_err(|e| e.to_string())?;
        Ok(format!("{config:#?}").lines().map(str::to_owned).collect())
    }

    #[test]
    fn every_default_it_states_is_the_one_the_code_applies() {
        let file = read();
        let defaults: Vec<&Line> = file.lines.iter().filter(|l| l.is_default()).collect();
        assert!(
            defaults.len() > 80,
            "only {} defaults found",
            defaults.len()
        );
        let mut wrong = Vec::new();
        for line in defaults {
            let key = line.key.as_deref().unwrap_or_default();
            let base = validated(&file.with(&|_| false), context(&line.table, key))
                .unwrap_or_else(|e| panic!("default.toml with its examples is invalid: {e}"));
            let stated = file.with(&|l| l.index == line.index);
            let shown = file.text[line.index].trim_start_matches("# ");
            match validated(&stated, context(&line.table, key)) {
                Err(e) => wrong.push(format!("[{}] {shown}: refused: {e}", line.table)),
                Ok(set) => {
                    if let Some((code, doc)) = base.iter().zip(&set).find(|(a, b)| a != b) {
                        wrong.push(format!(
                            "[{}] {shown}: the code's default gives `{}`, the file's `{}`",
                            line.table,
                            code.trim(),
                            doc.trim()
                        ));
                    }
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "default.toml states defaults the code does not apply:\n{}",
            wrong.join("\n")
        );
    }

    #[test]
    fn it_shows_every_key_of_the_file_shape() {
        let file = read();
        // Every table, default and example uncommented, and an unknown key in every table:
        // the shape names its valid keys in the problem each one causes.
        const PROBE: &str = "zz_probe";
        let full = file.with(&|_| true);
        let mut probed = format!("{PROBE} = 0\n");
        for line in full.lines() {
            probed.push_str(line);
            probed.push('\n');
            if header(line).is_some() {
                probed.push_str(&format!("{PROBE} = 0\n"));
            }
        }
        let err = parse_raw(&probed, FileKind::Toml, None, Vec::new())
            .expect_err("every table has an unknown key");
        let mut tables = 0;
        let mut missing = Vec::new();
        for problem in &err.problems {
            let Some(table) = problem
                .key
                .strip_suffix(PROBE)
                .map(|t| t.trim_end_matches('.').replace("[0]", "").replace('"', ""))
            else {
                panic!("default.toml shows what the file shape refuses: {problem}");
            };
            let Some(valid) = problem
                .message
                .strip_prefix("unknown key `zz_probe`; valid keys here: ")
            else {
                // A table of names to values (headers): any key is valid.
                continue;
            };
            tables += 1;
            let prefix = if table.is_empty() {
                String::new()
            } else {
                format!("{table}.")
            };
            for key in valid.split(", ") {
                let shown = file.lines.iter().any(|l| {
                    (l.table == table && l.key.as_deref() == Some(key))
                        || (l.key.is_none()
                            && l.table
                                .strip_prefix(&prefix)
                                .is_some_and(|rest| rest.split('.').next() == Some(key)))
                });
                if !shown {
                    missing.push(format!("{prefix}{key}"));
                }
            }
        }
        assert!(tables >= 15, "only {tables} tables probed: {err}");
        assert!(
            missing.is_empty(),
            "keys the file shape has that default.toml does not show: {missing:?}"
        );
    }
}

mod cluster {
    use super::*;

    #[test]
    fn a_cluster_section_is_validated_without_connecting() {
        let (_f, config) = load_toml(&format!(
            "{MINIMAL}\n[cluster]\nredis = \"redis://:secret@10.0.0.9:6380/1\"\nnode_id = \"n1\"\nlease_ttl = \"2s\"\n"
        ));
        let config = config.expect("valid");
        let cluster = config.cluster.as_ref().expect("cluster on");
        assert_eq!(cluster.node_id.0, "n1");
        assert_eq!(cluster.lease_ttl, Duration::from_secs(2));
        assert_eq!(cluster.prefix, "patchwire");
        let shown = describe(&config);
        assert!(shown.contains("cluster: node n1 on redis://"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn bad_cluster_keys_are_named() {
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}\n[cluster]\nredis = \"http://10.0.0.9\"\n"),
            "cluster.redis",
            &["redis://"],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}\n[cluster]\nredis = \"redis://h:1\"\nlease_ttl = \"1ms\"\n"),
            "cluster.lease_ttl",
            &["300ms", "2m"],
        );
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}\n[cluster]\nredis = \"redis://h:1\"\nnode_id = \"a b\"\n"),
            "cluster.node_id",
            &["\"a b\""],
        );
    }

    #[test]
    fn webhooks_in_a_cluster_share_postgres_or_name_the_one_node_of_an_sqlite_store() {
        let webhooks = "\n[webhooks]\ndatabase = \"w.db\"\n[[webhooks.endpoints]]\nid = \"e\"\nurl = \"https://hooks.example.com/x\"\nstreams = [\"a\"]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";
        let shared = webhooks.replace(
            "database = \"w.db\"",
            "store = \"postgres://u:hidden@db.internal/p\"",
        );
        // SQLite: one node, named.
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}{webhooks}\n[cluster]\nredis = \"redis://h:1\"\n"),
            "cluster.webhooks_node",
            &["single node", "PostgreSQL"],
        );
        assert_rejected(
            "c.toml",
            &format!(
                "{MINIMAL}{webhooks}\n[cluster]\nredis = \"redis://h:1\"\nwebhooks_node = \"a b\"\n"
            ),
            "cluster.webhooks_node",
            &["\"a b\""],
        );
        for (node, delivers) in [("a", true), ("b", false)] {
            let (_f, config) = load_toml(&format!(
                "{MINIMAL}{webhooks}\n[cluster]\nredis = \"redis://h:1\"\nnode_id = \"{node}\"\nwebhooks_node = \"a\"\n"
            ));
            let config = config.expect("valid");
            let cluster = config.cluster.as_ref().expect("on");
            assert_eq!(cluster.delivers_webhooks(), delivers, "{node}");
            let shown = describe(&config);
            let expected = if delivers {
                "delivers the webhooks (a)"
            } else {
                "webhooks delivered by a"
            };
            assert!(shown.contains(expected), "{shown}");
        }
        // PostgreSQL: every node, none named.
        let (_f, config) = load_toml(&format!(
            "{MINIMAL}{shared}\n[cluster]\nredis = \"redis://h:1\"\nnode_id = \"a\"\n"
        ));
        let config = config.expect("valid");
        assert!(config.webhooks.expect("on").store.is_shared());
        assert_rejected(
            "c.toml",
            &format!(
                "{MINIMAL}{shared}\n[cluster]\nredis = \"redis://h:1\"\nwebhooks_node = \"a\"\n"
            ),
            "cluster.webhooks_node",
            &["PostgreSQL", "every node"],
        );
        // Without webhooks the key names nothing: refused, not ignored.
        assert_rejected(
            "c.toml",
            &format!("{MINIMAL}\n[cluster]\nredis = \"redis://h:1\"\nwebhooks_node = \"a\"\n"),
            "cluster.webhooks_node",
            &["[webhooks]"],
        );
    }
}

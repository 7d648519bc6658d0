//! `[webhooks]` read from files: defaults, bounds, endpoints checked, secrets never shown.
use crate::config::{ConfigError, FileKind, parse_raw, validate};
use crate::sinks::webhook::config::defaults;

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
    assert_eq!(
        w.store,
        crate::sinks::webhook::config::WebhookStore::Sqlite(defaults::DATABASE.into())
    );
    assert_eq!(w.claim_timeout.as_secs(), 30);
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

#[test]
fn the_store_is_sqlite_or_a_postgres_url_whose_password_is_never_shown() {
    use crate::sinks::webhook::config::WebhookStore;
    let w = load("[webhooks]\nstore = \"sqlite\"\ndatabase = \"/tmp/o.db\"")
        .unwrap()
        .webhooks
        .unwrap();
    assert_eq!(w.store, WebhookStore::Sqlite("/tmp/o.db".into()));
    let w = load(
        "[webhooks]\nstore = \"postgres://patchwire:s3cret-pw@db.internal:5433/hooks\"\n\
         store_connections = 4\nclaim_timeout = \"40s\"",
    )
    .unwrap()
    .webhooks
    .unwrap();
    match &w.store {
        WebhookStore::Postgres(pg) => {
            assert_eq!(pg.connections, 4);
            assert_eq!(pg.url.password(), Some("s3cret-pw"));
        }
        other => panic!("expected PostgreSQL, got {other:?}"),
    }
    assert_eq!(w.claim_timeout.as_secs(), 40);
    let shown = format!("{w:?} {}", w.store);
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    assert!(shown.contains("db.internal:5433/hooks"), "{shown}");
}

#[test]
fn bad_stores_and_claim_timeouts_are_refused_with_their_keys() {
    for (store, needle) in [
        ("mysql://db/x", "got a mysql:// URL"),
        ("postgres:///hooks", "without a host"),
        ("not a url", "not a URL"),
        (
            "postgres://db.internal/hooks?sslmode=require",
            "without TLS",
        ),
        (
            "postgres://db.internal/hooks?nonsense=1",
            "PostgreSQL refuses",
        ),
    ] {
        let found = problems(&format!("[webhooks]\nstore = \"{store}\""));
        assert!(
            found
                .iter()
                .any(|(key, message)| key == "webhooks.store" && message.contains(needle)),
            "{store}: {found:?}"
        );
    }
    let found = problems("[webhooks]\nattempt_timeout = \"10s\"\nclaim_timeout = \"10s\"");
    assert!(
        found
            .iter()
            .any(|(key, message)| key == "webhooks.claim_timeout"
                && message.contains("more than webhooks.attempt_timeout")),
        "{found:?}"
    );
    let found = problems("[webhooks]\nstore_connections = 0");
    assert!(
        found
            .iter()
            .any(|(key, _)| key == "webhooks.store_connections"),
        "{found:?}"
    );
    // Absent: twice the attempt timeout.
    let w = load("[webhooks]\nattempt_timeout = \"20s\"")
        .unwrap()
        .webhooks
        .unwrap();
    assert_eq!(w.claim_timeout.as_secs(), 40);
}

#[test]
fn endpoint_options_are_checked_in_the_file() {
    let found = problems(&format!(
        "[webhooks]\n[[webhooks.endpoints]]\nid = \"e\"\nurl = \"https://h.example.com/x\"\n\
         streams = [\"fleet\"]\nsecret = \"{SECRET}\"\ndescription = \"{}\"\nrate_limit = 0\n\
         [webhooks.endpoints.metadata]\n\"\" = \"v\"\n",
        "d".repeat(1025)
    ));
    for (key, needle) in [
        (
            "webhooks.endpoints[0].description",
            "at most 1024 characters",
        ),
        ("webhooks.endpoints[0].rate_limit", "from 1 to 10000"),
        ("webhooks.endpoints[0].metadata.\"\"", "a key of 1 to 64"),
    ] {
        assert!(
            found.iter().any(|(k, m)| k == key && m.contains(needle)),
            "{key}: {found:?}"
        );
    }
    let w = load(&format!(
        "[webhooks]\n[[webhooks.endpoints]]\nid = \"e\"\nurl = \"https://h.example.com/x\"\n\
         streams = [\"fleet\"]\nsecret = \"{SECRET}\"\ndescription = \"d\"\nrate_limit = 7\n\
         metadata = {{ team = \"ops\" }}\n"
    ))
    .unwrap()
    .webhooks
    .unwrap();
    let e = &w.endpoints[0];
    assert_eq!(
        (
            e.description.as_deref(),
            e.rate_limit,
            e.metadata["team"].as_str()
        ),
        (Some("d"), Some(7), "ops")
    );
}

#[test]
fn endpoint_events_are_checked_in_the_file() {
    let endpoint = |events: &str| {
        format!(
            "[webhooks]\n[[webhooks.endpoints]]\nid = \"e\"\nurl = \"https://h.example.com/x\"\n\
             streams = [\"fleet\"]\nsecret = \"{SECRET}\"\nevents = {events}\n"
        )
    };
    for (events, key, needle) in [
        (
            "[\"snapshots\", \"error\"]",
            "webhooks.endpoints[0].events[1]",
            "expected one of \"snapshots\", \"patches\", \"errors\", \"recoveries\", got \"error\"",
        ),
        (
            "[\"errors\", \"recoveries\", \"errors\"]",
            "webhooks.endpoints[0].events[2]",
            "listed twice",
        ),
        (
            "[\"patches\"]",
            "webhooks.endpoints[0].events",
            "expected \"snapshots\" with \"patches\"",
        ),
        ("[]", "webhooks.endpoints[0].events", "at least one of"),
        (
            "[\"snapshots\", \"snapshots\"]",
            "webhooks.endpoints[0].events[1]",
            "listed twice",
        ),
    ] {
        let found = problems(&endpoint(events));
        assert!(
            found.iter().any(|(k, m)| k == key && m.contains(needle)),
            "{events}: {found:?}"
        );
    }
    let w = load(&endpoint("[\"snapshots\"]"))
        .unwrap()
        .webhooks
        .unwrap();
    assert_eq!(w.endpoints[0].events.names(), vec!["snapshots"]);
    // Errors and recoveries, with the changes or alone (an endpoint watching the upstream).
    let w = load(&endpoint("[\"recoveries\", \"snapshots\", \"errors\"]"))
        .unwrap()
        .webhooks
        .unwrap();
    assert_eq!(
        w.endpoints[0].events.names(),
        vec!["snapshots", "errors", "recoveries"]
    );
    let w = load(&endpoint("[\"errors\"]")).unwrap().webhooks.unwrap();
    assert!(!w.endpoints[0].events.changes());
    assert!(w.endpoints[0].events.errors && !w.endpoints[0].events.recoveries);
    let w = load(&endpoint("[\"patches\", \"snapshots\"]"))
        .unwrap()
        .webhooks
        .unwrap();
    assert_eq!(
        w.endpoints[0].events,
        crate::sinks::webhook::body::Events::default()
    );
}

#[test]
fn the_operator_url_and_secret_come_together_and_are_checked() {
    let found = problems("[webhooks]\noperator_url = \"https://ops.example.com/x\"\n");
    assert!(
        found
            .iter()
            .any(|(k, m)| k == "webhooks.operator_secret"
                && m.contains("with webhooks.operator_url")),
        "{found:?}"
    );
    let found = problems(&format!("[webhooks]\noperator_secret = \"{SECRET}\"\n"));
    assert!(
        found.iter().any(|(k, _)| k == "webhooks.operator_url"),
        "{found:?}"
    );
    let found = problems(&format!(
        "[webhooks]\noperator_url = \"not a url\"\noperator_secret = \"{SECRET}\"\n"
    ));
    assert!(
        found
            .iter()
            .any(|(k, m)| k == "webhooks.operator_url" && m.contains("absolute http or https")),
        "{found:?}"
    );
    let found = problems(
        "[webhooks]\noperator_url = \"https://ops.example.com/x\"\noperator_secret = \"nope\"\n",
    );
    assert!(
        found
            .iter()
            .any(|(k, m)| k == "webhooks.operator_secret" && !m.contains("nope")),
        "{found:?}"
    );
    let w = load(&format!(
        "[webhooks]\noperator_url = \"https://ops.example.com/x\"\noperator_secret = \"{SECRET}\"\n"
    ))
    .unwrap()
    .webhooks
    .unwrap();
    let operator = w.operator.unwrap();
    assert_eq!(operator.url.as_str(), "https://ops.example.com/x");
    assert!(
        load("[webhooks]\n")
            .unwrap()
            .webhooks
            .unwrap()
            .operator
            .is_none()
    );
}

/// `fleet` with views (a named `r1`, ad hoc allowed) and a stream `prices` without.
const VIEWS: &str = r#"[streams.filtering]
entities = "/vehicles"
key = "id"
aliases = { route = "route" }

[[streams.views]]
name = "r1"
filter = { route = "R1" }

[[streams]]
name = "prices"
url = "http://127.0.0.1:8081/feeds/prices"

"#;

#[test]
fn endpoints_may_receive_views_named_or_by_their_filter() {
    let w = load(&format!(
        r#"{VIEWS}[webhooks]

[[webhooks.endpoints]]
id = "depot"
url = "https://hooks.example.com/depot"
secret = "{SECRET}"
streams = ["fleet@r1", "fleet?route=R2", "prices"]
"#
    ))
    .unwrap()
    .webhooks
    .unwrap();
    let endpoint = &w.endpoints[0];
    assert_eq!(endpoint.streams[0], "fleet@r1");
    assert!(
        endpoint.streams[1].starts_with("fleet@~"),
        "{:?}",
        endpoint.streams
    );
    assert_eq!(endpoint.streams[2], "prices");
    let views: Vec<_> = endpoint
        .views
        .iter()
        .map(|v| (v.name.as_str(), v.source.as_str(), v.query.as_deref()))
        .collect();
    assert_eq!(
        views,
        [
            ("fleet@r1", "fleet", None),
            (endpoint.streams[1].as_str(), "fleet", Some("route=R2")),
        ]
    );
}

#[test]
fn views_that_cannot_be_had_are_refused_at_their_entry() {
    let found = problems(&format!(
        r#"{VIEWS}[webhooks]

[[webhooks.endpoints]]
id = "depot"
url = "https://hooks.example.com/depot"
secret = "{SECRET}"
streams = ["fleet@nope", "prices@x", "fleet?line=1", "fleet?route=R1", "fleet@r1", "nowhere"]
"#
    ));
    let found: Vec<String> = found.iter().map(|(k, m)| format!("{k}: {m}")).collect();
    let all = found.join("\n");
    for expected in [
        "webhooks.endpoints[0].streams[0]: \"fleet@nope\": no view named `nope` on this stream; its views are: r1",
        "webhooks.endpoints[0].streams[1]: \"prices@x\" names a view, but stream \"prices\" has no views",
        "webhooks.endpoints[0].streams[2]: \"fleet?line=1\": unknown filter `line`",
        // A filter equal to a named view's is that view.
        "webhooks.endpoints[0].streams[4]: \"fleet@r1\" is already listed at streams[3]",
        "webhooks.endpoints[0].streams[5]: expected the name of a configured stream (fleet, prices)",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
}

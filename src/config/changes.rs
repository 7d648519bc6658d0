//! What a configuration reload changes: the running configuration against the file loaded
//! again, stream by stream and section by section (pure: no I/O). The application applies
//! what it can live and refuses the reload when a section that cannot change while running
//! did ([`Changes::needs_restart`]).
//!
//! Per polled stream: `interval`, `headers`, `timeout`, `max_body` and `rate_limit_group`
//! apply to the running poller between two polls (the stream keeps its subscribers, epoch and
//! history). `url`, `format`, `diff`, `history`, `history_bytes`, `on_demand`/`linger`, the
//! views (`[streams.filtering]`, `[[streams.views]]`) and a change of source (polled ↔ push)
//! restart the stream: a new poller, and its first document goes to every subscriber as a
//! snapshot in a new epoch. Per push stream: `diff`, `history`, `history_bytes` and the views
//! restart it in place the same way at its next push.
//!
//! In a cluster a stream's log is shared: what it holds depends on the stream's *content
//! settings* (its kind, and a polled stream's `url` and `format`, and the diff options), which
//! [`fingerprint`] sums up. A restart that changes them starts the log over in a new epoch,
//! once, for the cluster; a restart that changes only how this node keeps the stream
//! (history, views, `on_demand`) applies to this node's copy and keeps the epoch.
//!
//! Broker sinks apply live on a single node: a sink added, removed or changed, and the
//! streams a sink publishes as streams come and go (see `sinks::broker::Brokers::reload`). In
//! a cluster they need a restart (as do new streams when sinks are configured).

use std::fmt::Debug;

use super::model::{Config, PushStreamSettings};
use crate::upstream::config::StreamSettings;

/// What happens to one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamChange {
    /// Nothing of it changed.
    Unchanged,
    /// These fields changed and apply to the running stream.
    Updated(Vec<&'static str>),
    /// These fields changed and the stream starts over (a new epoch).
    Restarted(Vec<&'static str>),
    /// It is gone from the file: its subscribers get an `error` event, then the stream ends.
    Removed,
    /// It is new in the file.
    Added,
}

impl StreamChange {
    /// Its name in the reload's answer and log.
    pub fn as_str(&self) -> &'static str {
        match self {
            StreamChange::Unchanged => "unchanged",
            StreamChange::Updated(_) => "updated",
            StreamChange::Restarted(_) => "restarted",
            StreamChange::Removed => "removed",
            StreamChange::Added => "added",
        }
    }

    /// The fields behind an update or a restart.
    pub fn fields(&self) -> &[&'static str] {
        match self {
            StreamChange::Updated(fields) | StreamChange::Restarted(fields) => fields,
            _ => &[],
        }
    }
}

/// A section (or key) that differs but cannot change while the process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedsRestart {
    /// The section or key, as in the file (`server`, `cluster`, `sinks`, …).
    pub section: String,
    /// Why it needs a restart.
    pub why: String,
}

/// Everything a reload changes.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Every stream of either configuration: the new file's in its order, then the removed.
    pub streams: Vec<(String, StreamChange)>,
    /// Whether the push source's token changed (applied live).
    pub push_token: bool,
    /// Whether `[[webhooks.endpoints]]` changed (reconciled live, as at start).
    pub webhook_endpoints: bool,
    /// Whether the broker sinks (`[[sinks.nats]]`, `[[sinks.redis]]`) changed, what they
    /// publish included (applied live on a single node: only the sinks and publishers that
    /// changed start again).
    pub broker_sinks: bool,
    /// What differs and cannot change live: a reload with any is refused.
    pub needs_restart: Vec<NeedsRestart>,
}

impl Changes {
    /// Whether anything at all differs.
    pub fn any(&self) -> bool {
        self.push_token
            || self.webhook_endpoints
            || self.broker_sinks
            || !self.needs_restart.is_empty()
            || self
                .streams
                .iter()
                .any(|(_, c)| *c != StreamChange::Unchanged)
    }
}

/// Whether two values are the same configuration. Settings compare by their `Debug` form:
/// validated settings hold no hash maps (their `Debug` is deterministic) and many hold types
/// without `PartialEq` (URLs, header maps, patterns); secrets that `Debug` hides are compared
/// separately by the callers.
fn same<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// One stream as either configuration has it.
enum Source<'a> {
    Polled(&'a StreamSettings),
    Pushed(&'a PushStreamSettings),
}

fn find<'a>(config: &'a Config, name: &str) -> Option<Source<'a>> {
    config
        .streams
        .iter()
        .find(|s| s.name == name)
        .map(Source::Polled)
        .or_else(|| {
            config
                .push_streams
                .iter()
                .find(|s| s.name == name)
                .map(Source::Pushed)
        })
}

/// What changes for a polled stream.
fn polled(old: &StreamSettings, new: &StreamSettings) -> StreamChange {
    let mut restart = Vec::new();
    let mut live = Vec::new();
    let mut check = |differs: bool, field: &'static str, is_live: bool| {
        if differs {
            if is_live {
                live.push(field);
            } else {
                restart.push(field);
            }
        }
    };
    check(old.url != new.url, "url", false);
    check(!same(&old.format, &new.format), "format", false);
    check(!same(&old.diff, &new.diff), "diff", false);
    check(old.history != new.history, "history", false);
    check(
        old.history_bytes != new.history_bytes,
        "history_bytes",
        false,
    );
    check(old.on_demand != new.on_demand, "on_demand", false);
    check(!same(&old.views, &new.views), "views", false);
    check(old.interval != new.interval, "interval", true);
    check(old.headers != new.headers, "headers", true);
    check(old.timeout != new.timeout, "timeout", true);
    check(old.max_body_bytes != new.max_body_bytes, "max_body", true);
    check(
        old.rate_limit_group != new.rate_limit_group,
        "rate_limit_group",
        true,
    );
    if !restart.is_empty() {
        restart.extend(live);
        StreamChange::Restarted(restart)
    } else if !live.is_empty() {
        StreamChange::Updated(live)
    } else {
        StreamChange::Unchanged
    }
}

/// What changes for a push stream.
fn pushed(old: &PushStreamSettings, new: &PushStreamSettings) -> StreamChange {
    let mut restart = Vec::new();
    if !same(&old.diff, &new.diff) {
        restart.push("diff");
    }
    if old.history != new.history {
        restart.push("history");
    }
    if old.history_bytes != new.history_bytes {
        restart.push("history_bytes");
    }
    if !same(&old.views, &new.views) {
        restart.push("views");
    }
    if restart.is_empty() {
        StreamChange::Unchanged
    } else {
        StreamChange::Restarted(restart)
    }
}

/// The fields of a restart that change what a stream's log holds ([`fingerprint`]'s).
pub const CONTENT_FIELDS: [&str; 4] = ["source", "url", "format", "diff"];

/// Whether `change` (a restart) changes what the stream's log holds.
pub fn changes_content(change: &StreamChange) -> bool {
    change.fields().iter().any(|f| CONTENT_FIELDS.contains(f))
}

/// The fingerprint of stream `name`'s content settings in `config` (hex, 32 digits), `None`
/// when it has no such stream: in a cluster each node records it with the stream's log, and
/// the log is written from one configuration at a time. Settings are summed up by their
/// `Debug` form, as [`changes`] compares them (a version that prints them differently counts
/// as a change: the log starts over once).
pub fn fingerprint(config: &Config, name: &str) -> Option<String> {
    use sha2::{Digest, Sha256};
    let content = match find(config, name)? {
        Source::Polled(s) => format!("polled\n{}\n{:?}\n{:?}", s.url.as_str(), s.format, s.diff),
        Source::Pushed(s) => format!("push\n{:?}", s.diff),
    };
    let digest = Sha256::digest(content.as_bytes());
    Some(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares the running configuration `old` with `new` (both validated).
pub fn changes(old: &Config, new: &Config) -> Changes {
    let mut streams = Vec::new();
    let names = new
        .streams
        .iter()
        .map(|s| s.name.as_str())
        .chain(new.push_streams.iter().map(|s| s.name.as_str()));
    for name in names {
        let change = match (find(old, name), find(new, name)) {
            (None, _) => StreamChange::Added,
            (Some(Source::Polled(a)), Some(Source::Polled(b))) => polled(a, b),
            (Some(Source::Pushed(a)), Some(Source::Pushed(b))) => pushed(a, b),
            _ => StreamChange::Restarted(vec!["source"]),
        };
        streams.push((name.to_owned(), change));
    }
    let old_names = old
        .streams
        .iter()
        .map(|s| s.name.as_str())
        .chain(old.push_streams.iter().map(|s| s.name.as_str()));
    for name in old_names {
        if find(new, name).is_none() {
            streams.push((name.to_owned(), StreamChange::Removed));
        }
    }
    let mut changes = Changes {
        streams,
        push_token: old.push.as_ref().map(|p| &p.token) != new.push.as_ref().map(|p| &p.token),
        webhook_endpoints: !same(
            &old.webhooks.as_ref().map(|w| &w.endpoints),
            &new.webhooks.as_ref().map(|w| &w.endpoints),
        ) || endpoint_secrets(old) != endpoint_secrets(new),
        broker_sinks: !same(&old.broker_sinks, &new.broker_sinks)
            || broker_urls(old) != broker_urls(new),
        needs_restart: Vec::new(),
    };
    sections(old, new, &mut changes);
    changes
}

/// The configured endpoints' secrets (hidden by `Debug`), by id.
fn endpoint_secrets(config: &Config) -> Vec<(String, String)> {
    config
        .webhooks
        .iter()
        .flat_map(|w| &w.endpoints)
        .map(|e| (e.id.clone(), e.secret.expose().to_owned()))
        .collect()
}

/// The sections that cannot change while running, compared.
fn sections(old: &Config, new: &Config, changes: &mut Changes) {
    let mut needs = |section: &str, differs: bool, why: &str| {
        if differs {
            changes.needs_restart.push(NeedsRestart {
                section: section.to_owned(),
                why: why.to_owned(),
            });
        }
    };
    needs(
        "server",
        !same(&old.server, &new.server),
        "the listener and its connection settings are set when the server starts",
    );
    needs(
        "log",
        !same(&old.log, &new.log),
        "logging is set up once, at start",
    );
    needs(
        "upstream",
        !same(&old.upstream, &new.upstream),
        "the HTTP client, the backoff and the rate-limit groups are shared by every poller",
    );
    needs(
        "simulator",
        !same(&old.simulator, &new.simulator),
        "the simulator's listener starts with the process",
    );
    needs(
        "proxy",
        !same(&old.proxy, &new.proxy) || proxy_secrets(old) != proxy_secrets(new),
        "the proxy mode's tokens, limits and dynamic streams are built at start",
    );
    needs(
        "cluster",
        !same(&old.cluster, &new.cluster)
            || old.cluster.as_ref().map(|c| &c.redis) != new.cluster.as_ref().map(|c| &c.redis),
        "a node joins its cluster at start",
    );
    needs(
        "websocket",
        !same(&old.websocket, &new.websocket),
        "WebSocket settings are read when the server starts",
    );
    needs(
        "views.max_total",
        old.max_views != new.max_views,
        "the views' total bound is shared by every stream",
    );
    needs(
        "push.max_body",
        old.push.as_ref().map(|p| p.max_body_bytes) != new.push.as_ref().map(|p| p.max_body_bytes),
        "the push routes' body limit is set when the server starts",
    );
    let without_endpoints = |c: &Config| {
        c.webhooks.as_ref().map(|w| {
            let mut w = w.clone();
            w.endpoints.clear();
            w.admin_token = None;
            w
        })
    };
    needs(
        "webhooks",
        !same(&without_endpoints(old), &without_endpoints(new))
            || old
                .webhooks
                .as_ref()
                .and_then(|w| w.admin_token.as_ref())
                .map(|t| &t.0)
                != new
                    .webhooks
                    .as_ref()
                    .and_then(|w| w.admin_token.as_ref())
                    .map(|t| &t.0),
        "the outbox, the worker and the admin token are set up at start (endpoints reload live)",
    );
}

/// The proxy tokens' secrets (hidden by `Debug`).
fn proxy_secrets(config: &Config) -> Vec<String> {
    config
        .proxy
        .iter()
        .flat_map(|p| &p.tokens)
        .map(|t| {
            let key = t
                .signing_key
                .as_ref()
                .map(|k| format!("{}{}", k.beacon, k.key));
            format!("{}\n{}", t.token, key.unwrap_or_default())
        })
        .collect()
}

/// The broker sinks' URLs, credentials included (hidden by `Debug`).
fn broker_urls(config: &Config) -> Vec<String> {
    config
        .broker_sinks
        .iter()
        .map(|s| match &s.kind {
            crate::sinks::broker::config::BrokerKind::Nats(nats) => nats.url.clone(),
            crate::sinks::broker::config::BrokerKind::Redis(redis) => redis.url.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileKind, parse_raw, validate};

    fn config(toml: &str) -> Config {
        let raw = parse_raw(toml, FileKind::Toml, None, Vec::new()).expect("parses");
        validate(raw, None, &|_| None).expect("valid")
    }

    fn streams(toml: &str) -> Config {
        config(&format!(
            "[push]\ntoken = \"push-token-0123456789\"\n{toml}"
        ))
    }

    const A: &str = "[[streams]]\nname = \"a\"\nurl = \"http://up.test/a\"\n";

    fn change(old: &str, new: &str, name: &str) -> StreamChange {
        changes(&streams(old), &streams(new))
            .streams
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .expect("the stream is listed")
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let c = changes(&streams(A), &streams(A));
        assert!(!c.any(), "{c:?}");
        assert_eq!(c.streams, [("a".to_owned(), StreamChange::Unchanged)]);
    }

    #[test]
    fn poll_settings_apply_live_and_the_rest_restarts() {
        let with = |keys: &str| format!("{A}{keys}\n");
        assert_eq!(
            change(A, &with("interval = \"7s\"\ntimeout = \"3s\""), "a"),
            StreamChange::Updated(vec!["interval", "timeout"])
        );
        assert_eq!(
            change(A, &with("headers = { X-Key = \"v\" }"), "a"),
            StreamChange::Updated(vec!["headers"])
        );
        assert_eq!(
            change(
                A,
                "[[streams]]\nname = \"a\"\nurl = \"http://up.test/b\"\ninterval = \"7s\"\n",
                "a"
            ),
            StreamChange::Restarted(vec!["url", "interval"])
        );
        assert_eq!(
            change(A, &with("history = 5"), "a"),
            StreamChange::Restarted(vec!["history"])
        );
        assert_eq!(
            change(A, &with("[streams.diff]\nallow_move = true"), "a"),
            StreamChange::Restarted(vec!["diff"])
        );
        assert_eq!(
            change(
                A,
                &with(
                    "[streams.filtering]\nentities = \"/v\"\nkey = \"id\"\naliases = { r = \"r\" }"
                ),
                "a"
            ),
            StreamChange::Restarted(vec!["views"])
        );
    }

    #[test]
    fn streams_come_go_and_change_source() {
        let b = "[[streams]]\nname = \"b\"\nsource = \"push\"\n";
        let c = changes(&streams(A), &streams(b));
        assert_eq!(
            c.streams,
            [
                ("b".to_owned(), StreamChange::Added),
                ("a".to_owned(), StreamChange::Removed)
            ]
        );
        assert!(c.needs_restart.is_empty(), "{c:?}");
        let a_pushed = "[[streams]]\nname = \"a\"\nsource = \"push\"\n";
        assert_eq!(
            change(A, a_pushed, "a"),
            StreamChange::Restarted(vec!["source"])
        );
    }

    #[test]
    fn sections_that_cannot_change_live_are_named() {
        let old = streams(A);
        let new = streams(&format!(
            "[server]\nkeepalive = \"3s\"\n[upstream]\nuser_agent = \"x\"\n{A}"
        ));
        let c = changes(&old, &new);
        let sections: Vec<&str> = c.needs_restart.iter().map(|n| n.section.as_str()).collect();
        assert_eq!(sections, ["server", "upstream"]);
        // The push token applies live.
        let new = config(&format!(
            "[push]\ntoken = \"another-token-0123456789\"\n{A}"
        ));
        let c = changes(&old, &new);
        assert!(c.push_token && c.needs_restart.is_empty(), "{c:?}");
    }

    const CLUSTER: &str = "[cluster]\nredis = \"redis://127.0.0.1:6379\"\nnode_id = \"n1\"\n";

    #[test]
    fn in_a_cluster_streams_come_go_and_restart_live() {
        let b = "[[streams]]\nname = \"b\"\nurl = \"http://up.test/b\"\n";
        let old = streams(&format!("{A}{CLUSTER}"));
        for new in [
            format!("{A}{b}{CLUSTER}"),
            format!("{b}{CLUSTER}"),
            format!("[[streams]]\nname = \"a\"\nurl = \"http://up.test/moved\"\n{CLUSTER}"),
            format!("[[streams]]\nname = \"a\"\nsource = \"push\"\n{CLUSTER}"),
        ] {
            let c = changes(&old, &streams(&new));
            assert!(c.any() && c.needs_restart.is_empty(), "{new}: {c:?}");
        }
    }

    #[test]
    fn in_a_cluster_with_webhooks_and_broker_sinks_leases_taken_anew_and_sinks_apply_live() {
        let sinks = "[[sinks.redis]]\nurl = \"redis://127.0.0.1:6379\"\nkey = \"out:{stream}\"\n";
        let hooks = "[webhooks]\nstore = \"postgres://patchwire@127.0.0.1:5432/patchwire\"\n";
        let b = "[[streams]]\nname = \"b\"\nurl = \"http://up.test/b\"\n";
        let old = streams(&format!("{A}{b}{CLUSTER}{sinks}{hooks}"));
        // A stream removed, added, taking its lease anew (on demand, a new source), or moved;
        // a sink's settings changed, a sink removed.
        for new in [
            format!("{A}{CLUSTER}{sinks}{hooks}"),
            format!("{A}{b}[[streams]]\nname = \"c\"\nsource = \"push\"\n{CLUSTER}{sinks}{hooks}"),
            format!("{A}on_demand = true\n{b}{CLUSTER}{sinks}{hooks}"),
            format!("[[streams]]\nname = \"a\"\nsource = \"push\"\n{b}{CLUSTER}{sinks}{hooks}"),
            format!(
                "[[streams]]\nname = \"a\"\nurl = \"http://up.test/moved\"\n{b}{CLUSTER}{sinks}{hooks}"
            ),
            format!("{A}{b}{CLUSTER}{sinks}timeout = \"3s\"\n{hooks}"),
            format!("{A}{b}{CLUSTER}{hooks}"),
        ] {
            let c = changes(&old, &streams(&new));
            assert!(c.any() && c.needs_restart.is_empty(), "{new}: {c:?}");
        }
        // The outbox is still set up at start.
        let elsewhere = "[webhooks]\nstore = \"postgres://patchwire@127.0.0.1:5432/other\"\n";
        let c = changes(
            &old,
            &streams(&format!("{A}{b}{CLUSTER}{sinks}{elsewhere}")),
        );
        let sections: Vec<&str> = c.needs_restart.iter().map(|n| n.section.as_str()).collect();
        assert_eq!(sections, ["webhooks"], "{c:?}");
    }

    #[test]
    fn the_fingerprint_follows_what_the_log_holds() {
        let base = streams(A);
        let of = |toml: &str| fingerprint(&streams(toml), "a").expect("a stream");
        let same = of(A);
        assert_eq!(same.len(), 32);
        assert_eq!(fingerprint(&base, "a").as_deref(), Some(same.as_str()));
        assert_eq!(fingerprint(&base, "nope"), None);
        // How this node keeps or polls the stream does not change what the log holds.
        for kept in [
            "history = 5",
            "interval = \"9s\"",
            "headers = { X-Key = \"v\" }",
        ] {
            assert_eq!(of(&format!("{A}{kept}\n")), same, "{kept}");
        }
        // Its source does.
        for moved in [
            "[[streams]]\nname = \"a\"\nurl = \"http://up.test/b\"\n".to_owned(),
            "[[streams]]\nname = \"a\"\nsource = \"push\"\n".to_owned(),
            format!("{A}format = \"gtfs-rt\"\n"),
            format!("{A}[streams.diff]\nallow_move = true\n"),
        ] {
            assert_ne!(of(&moved), same, "{moved}");
        }
        for field in CONTENT_FIELDS {
            assert!(changes_content(&StreamChange::Restarted(vec![field])));
        }
        assert!(!changes_content(&StreamChange::Restarted(vec!["history"])));
    }

    /// A polled stream `a` with these settings.
    fn polled_a(path: u8, allow_move: bool, history: usize, interval: u64) -> Config {
        streams(&format!(
            "[[streams]]\nname = \"a\"\nurl = \"http://up.test/{path}\"\nhistory = {history}\n\
             interval = \"{interval}s\"\n[streams.diff]\nallow_move = {allow_move}\n"
        ))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The fingerprint differs exactly when the reload's change names a content field: the
        /// log starts over in a cluster exactly when the stream's content settings changed.
        #[test]
        fn the_fingerprint_changes_with_the_content_fields_only(
            old in (0u8..3, proptest::bool::ANY, 1usize..4, 1u64..4),
            new in (0u8..3, proptest::bool::ANY, 1usize..4, 1u64..4),
        ) {
            let old = polled_a(old.0, old.1, old.2, old.3);
            let new = polled_a(new.0, new.1, new.2, new.3);
            let change = changes(&old, &new)
                .streams
                .into_iter()
                .find(|(n, _)| n == "a")
                .map(|(_, c)| c)
                .expect("listed");
            proptest::prop_assert_eq!(
                changes_content(&change),
                fingerprint(&old, "a") != fingerprint(&new, "a"),
                "{:?}", change
            );
        }
    }

    #[test]
    fn with_webhooks_a_new_stream_and_an_endpoint_starting_to_receive_a_view_apply_live() {
        let hooks = "[webhooks]\ndatabase = \"/tmp/x.db\"\n";
        let old = streams(&format!("{hooks}{A}"));
        let new = streams(&format!(
            "{hooks}{A}[[streams]]\nname = \"b\"\nurl = \"http://up.test/b\"\n"
        ));
        let c = changes(&old, &new);
        assert!(c.needs_restart.is_empty(), "{c:?}");
        assert_eq!(c.streams[1], ("b".to_owned(), StreamChange::Added));

        let fleet = "[[streams]]\nname = \"a\"\nurl = \"http://up.test/a\"\n\
                     [streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\n\
                     aliases = { route = \"route\" }\n";
        let hooks = |streams: &str| {
            format!(
                "{fleet}[webhooks]\ndatabase = \"/tmp/x.db\"\n[[webhooks.endpoints]]\nid = \"e\"\n\
                 url = \"https://hooks.example.com/e\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n\
                 streams = {streams}\n"
            )
        };
        let whole = streams(&hooks(r#"["a"]"#));
        let view = streams(&hooks(r#"["a", "a?route=R1"]"#));
        let c = changes(&whole, &view);
        assert!(c.needs_restart.is_empty(), "{c:?}");
        assert!(c.webhook_endpoints, "{c:?}");
    }

    const NATS: &str = "[[sinks.nats]]\nurl = \"nats://127.0.0.1:4222\"\n";
    const B: &str = "[[streams]]\nname = \"b\"\nurl = \"http://up.test/b\"\n";

    #[test]
    fn broker_sinks_and_new_streams_with_sinks_apply_live_on_a_single_node() {
        let old = streams(&format!("{A}{NATS}"));
        // A stream added while a sink publishes every stream.
        let c = changes(&old, &streams(&format!("{A}{B}{NATS}")));
        assert!(c.needs_restart.is_empty(), "{c:?}");
        assert!(c.broker_sinks, "the sink now publishes b too: {c:?}");
        // A sink's settings, then a sink added, then every sink removed.
        let c = changes(&old, &streams(&format!("{A}{NATS}timeout = \"3s\"\n")));
        assert!(c.broker_sinks && c.needs_restart.is_empty(), "{c:?}");
        let redis = "[[sinks.redis]]\nurl = \"redis://127.0.0.1:6379\"\n";
        let c = changes(&old, &streams(&format!("{A}{NATS}{redis}")));
        assert!(c.broker_sinks && c.needs_restart.is_empty(), "{c:?}");
        let c = changes(&old, &streams(A));
        assert!(c.broker_sinks && c.needs_restart.is_empty(), "{c:?}");
        // Only the credentials in the URL (hidden by `Debug`) differ.
        let c = changes(
            &old,
            &streams(&format!(
                "{A}[[sinks.nats]]\nurl = \"nats://user:secret@127.0.0.1:4222\"\n"
            )),
        );
        assert!(c.broker_sinks, "{c:?}");
        assert!(!changes(&old, &old).any());
    }

    #[test]
    fn in_a_cluster_broker_sinks_and_new_streams_with_sinks_apply_live() {
        let old = streams(&format!("{CLUSTER}{A}{NATS}"));
        let c = changes(
            &old,
            &streams(&format!("{CLUSTER}{A}{NATS}timeout = \"3s\"\n")),
        );
        assert!(c.broker_sinks && c.needs_restart.is_empty(), "{c:?}");
        let c = changes(&old, &streams(&format!("{CLUSTER}{A}{B}{NATS}")));
        assert!(c.broker_sinks && c.needs_restart.is_empty(), "{c:?}");
        assert_eq!(c.streams[1], ("b".to_owned(), StreamChange::Added));
    }
}

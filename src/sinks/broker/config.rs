//! The `[[sinks.nats]]` and `[[sinks.redis]]` sections: their shape as written (serde, unknown
//! keys rejected), defaults and bounds, the pure validation into [`BrokerSinkSettings`], and the
//! templates (`{stream}`) that name each stream's subject, key and CloudEvents source.
//!
//! A Kafka sink would add `[[sinks.kafka]]` here: its own raw table (the common keys plus its
//! own), validated by [`common`] and a few lines for its destination, into another
//! [`BrokerKind`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use url::Url;

use crate::redact::Redacted;
use crate::sinks::webhook::body::Mode;
use crate::validation::{
    NAME_EXPECTED, Problems, bytes_in, duration_in, integer_in, interpolate, is_valid_name,
    usize_of,
};
use crate::views::config::ViewsSettings;
use crate::views::spec::{Asked, parse_query};

/// The placeholder of templates, replaced by the stream's name.
pub const STREAM_PLACEHOLDER: &str = "{stream}";
/// The placeholder of views' templates, replaced by the view's id (its configured name, or
/// `~` and 12 hex digits for an ad hoc view).
pub const VIEW_PLACEHOLDER: &str = "{view}";

/// Built-in defaults of the broker sinks' keys.
pub mod defaults {
    use std::time::Duration;

    use crate::sinks::webhook::body::Mode;

    /// `sinks.nats[].subject`.
    pub const SUBJECT: &str = "patchwire.{stream}";
    /// `sinks.redis[].key`.
    pub const KEY: &str = "patchwire:{stream}";
    /// `sinks.nats[].view_subject`.
    pub const VIEW_SUBJECT: &str = "patchwire.{stream}.{view}";
    /// `sinks.redis[].view_key`.
    pub const VIEW_KEY: &str = "patchwire:{stream}@{view}";
    /// `sinks.*[].source`.
    pub const SOURCE: &str = "/streams/{stream}";
    /// `sinks.*[].mode`.
    pub const MODE: Mode = Mode::Patch;
    /// `sinks.*[].buffer`.
    pub const BUFFER: u64 = 10_000;
    /// `sinks.*[].buffer_bytes`.
    pub const BUFFER_BYTES: u64 = 64 << 20;
    /// `sinks.*[].batch`.
    pub const BATCH: u64 = 256;
    /// `sinks.*[].timeout`.
    pub const TIMEOUT: Duration = Duration::from_secs(5);
    /// `sinks.nats[].jetstream`.
    pub const JETSTREAM: &str = "PATCHWIRE";
    /// `sinks.nats[].max_age`.
    pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
    /// `sinks.nats[].max_bytes`.
    pub const MAX_BYTES: u64 = 1 << 30;
    /// `sinks.nats[].max_messages_per_subject`.
    pub const MAX_MESSAGES_PER_SUBJECT: u64 = 100_000;
    /// `sinks.nats[].duplicate_window`.
    pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
    /// `sinks.nats[].replicas`.
    pub const REPLICAS: u64 = 1;
    /// `sinks.redis[].maxlen`.
    pub const MAXLEN: u64 = 100_000;
}

/// Inclusive bounds of the broker sinks' keys.
pub mod limits {
    use std::time::Duration;

    /// `sinks.*[].buffer`.
    pub const BUFFER: (u64, u64) = (1, 10_000_000);
    /// `sinks.*[].buffer_bytes`.
    pub const BUFFER_BYTES: (u64, u64) = (1 << 10, 64 << 30);
    /// `sinks.*[].batch`: messages in flight at once per stream.
    pub const BATCH: (u64, u64) = (1, 10_000);
    /// `sinks.*[].timeout`.
    pub const TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(300));
    /// `sinks.nats[].max_age` (`0s`: no age limit).
    pub const MAX_AGE: (Duration, Duration) =
        (Duration::ZERO, Duration::from_secs(10 * 365 * 24 * 3600));
    /// `sinks.nats[].max_bytes`.
    pub const MAX_BYTES: (u64, u64) = (1 << 20, 1 << 50);
    /// `sinks.nats[].max_messages_per_subject`.
    pub const MAX_MESSAGES_PER_SUBJECT: (u64, u64) = (1, 1_000_000_000);
    /// `sinks.nats[].duplicate_window`: JetStream removes duplicates (same `Nats-Msg-Id`)
    /// within it.
    pub const DUPLICATE_WINDOW: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(7 * 24 * 3600));
    /// `sinks.nats[].replicas`.
    pub const REPLICAS: (u64, u64) = (1, 5);
    /// `sinks.redis[].maxlen`.
    pub const MAXLEN: (u64, u64) = (1, 1_000_000_000);
}

/// `[sinks]`: message brokers fed with every change of the streams each names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSinks {
    /// NATS JetStream sinks (`[[sinks.nats]]`).
    #[serde(default)]
    pub nats: Vec<RawNatsSink>,
    /// Redis Streams sinks (`[[sinks.redis]]`).
    #[serde(default)]
    pub redis: Vec<RawRedisSink>,
}

/// How JetStream stores a stream's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk.
    File,
    /// In memory.
    Memory,
}

/// One `[[sinks.nats]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNatsSink {
    /// The sink's name in logs, metrics and `/streams` (default: `nats`); unique among sinks.
    pub name: Option<String>,
    /// The NATS server, `nats://[user:password@]host:port` or `tls://…` (`${VAR}` allowed).
    pub url: String,
    /// The streams published (default: every configured stream): a stream's name, a named
    /// view (`fleet@r1`) or an ad hoc view (`fleet?route=R1,R2&fields=position`).
    pub streams: Option<Vec<String>>,
    /// Each stream's subject; `{stream}` is its name ([default](defaults::SUBJECT)).
    pub subject: Option<String>,
    /// Each view's subject; `{stream}` is its stream's name, `{view}` its id
    /// ([default](defaults::VIEW_SUBJECT)).
    pub view_subject: Option<String>,
    /// `"patch"` (a snapshot first and after gaps, then patches) or `"snapshot"` (the whole
    /// document every time) ([default](defaults::MODE)).
    pub mode: Option<Mode>,
    /// The CloudEvents `source`; `{stream}` is the stream's name ([default](defaults::SOURCE)).
    pub source: Option<String>,
    /// Messages waiting for the broker per stream before the sink marks itself behind
    /// ([default](defaults::BUFFER), [bounds](limits::BUFFER)).
    pub buffer: Option<u64>,
    /// Bytes those messages may hold ([default](defaults::BUFFER_BYTES),
    /// [bounds](limits::BUFFER_BYTES)).
    pub buffer_bytes: Option<ByteSize>,
    /// Messages in flight at once per stream ([default](defaults::BATCH),
    /// [bounds](limits::BATCH)).
    pub batch: Option<u64>,
    /// How long a broker call may take ([default](defaults::TIMEOUT), [bounds](limits::TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// The JetStream stream the subjects belong to, created if missing
    /// ([default](defaults::JETSTREAM)).
    pub jetstream: Option<String>,
    /// `"file"` or `"memory"` (default: `file`).
    pub storage: Option<Storage>,
    /// Copies of each message in a JetStream cluster ([default](defaults::REPLICAS),
    /// [bounds](limits::REPLICAS)).
    pub replicas: Option<u64>,
    /// Messages older than this are dropped; `0s` keeps them ([default](defaults::MAX_AGE),
    /// [bounds](limits::MAX_AGE)).
    #[serde(default, with = "humantime_serde::option")]
    pub max_age: Option<Duration>,
    /// Most bytes the JetStream stream holds ([default](defaults::MAX_BYTES),
    /// [bounds](limits::MAX_BYTES)).
    pub max_bytes: Option<ByteSize>,
    /// Most messages kept per subject ([default](defaults::MAX_MESSAGES_PER_SUBJECT),
    /// [bounds](limits::MAX_MESSAGES_PER_SUBJECT)).
    pub max_messages_per_subject: Option<u64>,
    /// Duplicates (same `Nats-Msg-Id`) are dropped within this window
    /// ([default](defaults::DUPLICATE_WINDOW), [bounds](limits::DUPLICATE_WINDOW)).
    #[serde(default, with = "humantime_serde::option")]
    pub duplicate_window: Option<Duration>,
}

/// One `[[sinks.redis]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisSink {
    /// The sink's name in logs, metrics and `/streams` (default: `redis`); unique among sinks.
    pub name: Option<String>,
    /// The Redis server, `redis://[user:password@]host:port[/db]` or `rediss://…` (`${VAR}`
    /// allowed).
    pub url: String,
    /// The streams published (default: every configured stream): a stream's name, a named
    /// view (`fleet@r1`) or an ad hoc view (`fleet?route=R1,R2&fields=position`).
    pub streams: Option<Vec<String>>,
    /// Each stream's Redis key; `{stream}` is its name ([default](defaults::KEY)).
    pub key: Option<String>,
    /// Each view's Redis key; `{stream}` is its stream's name, `{view}` its id
    /// ([default](defaults::VIEW_KEY)).
    pub view_key: Option<String>,
    /// `"patch"` or `"snapshot"` ([default](defaults::MODE)).
    pub mode: Option<Mode>,
    /// The CloudEvents `source`; `{stream}` is the stream's name ([default](defaults::SOURCE)).
    pub source: Option<String>,
    /// Messages waiting for the broker per stream before the sink marks itself behind
    /// ([default](defaults::BUFFER), [bounds](limits::BUFFER)).
    pub buffer: Option<u64>,
    /// Bytes those messages may hold ([default](defaults::BUFFER_BYTES),
    /// [bounds](limits::BUFFER_BYTES)).
    pub buffer_bytes: Option<ByteSize>,
    /// Messages in flight at once per stream ([default](defaults::BATCH),
    /// [bounds](limits::BATCH)).
    pub batch: Option<u64>,
    /// How long a broker call may take ([default](defaults::TIMEOUT), [bounds](limits::TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Entries each Redis stream keeps, approximately (`XADD … MAXLEN ~`)
    /// ([default](defaults::MAXLEN), [bounds](limits::MAXLEN)).
    pub maxlen: Option<u64>,
}

/// A broker sink, validated.
#[derive(Debug, Clone)]
pub struct BrokerSinkSettings {
    /// Unique among sinks.
    pub name: String,
    /// The streams it publishes, each with its destination (subject or key) and source.
    pub streams: Vec<SinkStream>,
    /// Patches (after a first snapshot) or whole documents.
    pub mode: Mode,
    /// Messages waiting per stream before the sink marks itself behind.
    pub buffer: usize,
    /// Bytes those messages may hold.
    pub buffer_bytes: u64,
    /// Messages in flight at once per stream.
    pub batch: usize,
    /// How long one broker call may take.
    pub timeout: Duration,
    /// Which broker, and its own settings.
    pub kind: BrokerKind,
}

/// One stream (or view of a stream) a sink publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStream {
    /// The stream's name (a view's source stream).
    pub stream: String,
    /// What is published: the stream's name, or a view's, `{stream}@{view}` (its messages'
    /// `ce-stream`, and the stream of their ids).
    pub name: String,
    /// The view, if one is published.
    pub view: Option<SinkView>,
    /// Its subject (NATS) or key (Redis).
    pub destination: String,
    /// Its CloudEvents `source`.
    pub source: String,
}

/// A view a sink publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkView {
    /// Its id: a configured name, or `~` and 12 hex digits for an ad hoc view.
    pub id: String,
    /// For an ad hoc view, its filter as written (a query string), resolved again at start as
    /// a subscription's is.
    pub query: Option<String>,
}

/// The broker of a sink.
#[derive(Debug, Clone)]
pub enum BrokerKind {
    /// NATS JetStream.
    Nats(NatsSettings),
    /// Redis Streams.
    Redis(RedisSettings),
}

impl BrokerKind {
    /// `"nats"` or `"redis"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            BrokerKind::Nats(_) => "nats",
            BrokerKind::Redis(_) => "redis",
        }
    }
}

/// A NATS JetStream sink's connection and stream.
#[derive(Clone)]
pub struct NatsSettings {
    /// The server URL (may hold credentials: never shown whole).
    pub url: String,
    /// The JetStream stream's name.
    pub jetstream: String,
    /// Its storage.
    pub storage: Storage,
    /// Its replicas.
    pub replicas: usize,
    /// Its age limit (`ZERO`: none).
    pub max_age: Duration,
    /// Its size limit.
    pub max_bytes: u64,
    /// Its per-subject message limit.
    pub max_messages_per_subject: u64,
    /// Its duplicate window.
    pub duplicate_window: Duration,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &shown_url(&self.url))
            .field("jetstream", &self.jetstream)
            .field("storage", &self.storage)
            .field("replicas", &self.replicas)
            .field("max_age", &self.max_age)
            .field("max_bytes", &self.max_bytes)
            .field("max_messages_per_subject", &self.max_messages_per_subject)
            .field("duplicate_window", &self.duplicate_window)
            .finish()
    }
}

/// A Redis Streams sink's connection and trimming.
#[derive(Clone)]
pub struct RedisSettings {
    /// The server URL (may hold a password: never shown whole).
    pub url: String,
    /// Entries kept per key, approximately.
    pub maxlen: u64,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &shown_url(&self.url))
            .field("maxlen", &self.maxlen)
            .finish()
    }
}

/// A broker URL as logs and `check` show it: without its credentials.
pub fn shown_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(url) => Redacted::new(&url).as_str().to_owned(),
        Err(_) => "<invalid URL>".to_owned(),
    }
}

/// `template` with `{stream}` replaced by `stream`.
pub fn render(template: &str, stream: &str) -> String {
    template.replace(STREAM_PLACEHOLDER, stream)
}

/// `template` with `{stream}` replaced by `stream` and `{view}` by `view`.
pub fn render_view(template: &str, stream: &str, view: &str) -> String {
    template
        .replace(STREAM_PLACEHOLDER, stream)
        .replace(VIEW_PLACEHOLDER, view)
}

/// What a sink publishes under: the stream's name, or its view's `{stream}@{view}`.
fn published_name(stream: &str, view: Option<&SinkView>) -> String {
    match view {
        None => stream.to_owned(),
        Some(view) => format!("{stream}@{}", view.id),
    }
}

/// A configured stream, and its views' settings if it has views.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The stream's name.
    pub name: &'a str,
    /// Its views, when it has `[streams.filtering]` (or is a `gtfs-rt` stream).
    pub views: Option<&'a ViewsSettings>,
}

/// Reads one entry of a sink's `streams`: a stream's name, `stream@view` (a named view) or
/// `stream?filter` (an ad hoc view, as a subscription's query string); `Err` says what was
/// expected.
pub fn resolve_entry(
    entry: &str,
    streams: &[Source<'_>],
) -> Result<(String, Option<SinkView>), String> {
    // A filter may hold `@` (`where=@.speed > 10`): only what precedes `?` names.
    let (head, query) = match entry.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (entry, None),
    };
    let (stream_name, view) = match (query, head.split_once('@')) {
        (Some(query), None) => (head, Some((None, Some(query)))),
        (None, Some((stream, view))) => (stream, Some((Some(view), None))),
        (None, None) => (head, None),
        (Some(_), Some(_)) => {
            return Err(format!(
                "expected a stream, `stream@view` or `stream?filter`, got {entry:?} (a view is \
                 named or described by its filter, not both)"
            ));
        }
    };
    let Some(source) = streams.iter().find(|s| s.name == stream_name) else {
        let names: Vec<&str> = streams.iter().map(|s| s.name).collect();
        return Err(format!(
            "expected the name of a configured stream ({}), optionally with `@view` or \
             `?filter`, got {entry:?}",
            names.join(", ")
        ));
    };
    let Some((named, query)) = view else {
        return Ok((stream_name.to_owned(), None));
    };
    let Some(views) = source.views else {
        return Err(format!(
            "{entry:?} names a view, but stream {stream_name:?} has no views (they need \
             [streams.filtering] in its configuration)"
        ));
    };
    let asked = match (named, query) {
        (Some(name), _) if name.starts_with('~') => {
            return Err(format!(
                "{entry:?} names an ad hoc view by its id; write its filter instead, e.g. \
                 \"{stream_name}?route=R1\" (ids are derived from filters)"
            ));
        }
        (Some(name), _) => Asked::Named(name.to_owned()),
        (None, query) => parse_query(query, &views.selector.alias_names())
            .map_err(|e| format!("{entry:?}: {e}"))?,
    };
    if matches!(asked, Asked::Whole) {
        return Err(format!(
            "{entry:?} has no filter after `?`; write the stream's name alone to publish it whole"
        ));
    }
    match views.resolve(asked) {
        Ok(Some((id, _))) => Ok((
            stream_name.to_owned(),
            Some(SinkView {
                query: query.map(str::to_owned).filter(|_| id.starts_with('~')),
                id,
            }),
        )),
        Ok(None) => Err(format!("{entry:?} has no filter")),
        Err(e) => Err(format!("{entry:?}: {e}")),
    }
}

/// Whether `subject` is a NATS subject a message can be published to: dot-separated tokens,
/// none empty, no wildcard (`*`, `>`), no whitespace or control character, and not one of the
/// server's own (`$JS.…`, `$SYS.…`: a leading `$`).
pub fn is_publish_subject(subject: &str) -> bool {
    !subject.is_empty()
        && !subject.starts_with('$')
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && token
                    .chars()
                    .all(|c| !c.is_whitespace() && !c.is_control() && c != '*' && c != '>')
        })
}

/// Whether `name` is a JetStream stream name: 1 to 255 printable characters without
/// whitespace, `.`, `*`, `>`, `/` or `\`.
pub fn is_jetstream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>' | '/' | '\\' | '\u{7f}'))
}

/// The keys every broker sink shares, borrowed from its raw table.
struct Common<'a> {
    name: Option<&'a str>,
    url: &'a str,
    streams: Option<&'a [String]>,
    destination: Option<&'a str>,
    view_destination: Option<&'a str>,
    mode: Option<Mode>,
    source: Option<&'a str>,
    buffer: Option<u64>,
    buffer_bytes: Option<ByteSize>,
    batch: Option<u64>,
    timeout: Option<Duration>,
}

/// What [`common`] validated.
struct Validated {
    name: String,
    url: String,
    streams: Vec<SinkStream>,
    mode: Mode,
    buffer: usize,
    buffer_bytes: u64,
    batch: usize,
    timeout: Duration,
}

/// The broker a sink's URL must name.
struct UrlRule {
    schemes: &'static [&'static str],
    example: &'static str,
    /// The destination's key and default.
    destination_key: &'static str,
    destination_default: &'static str,
    /// Views' destination's key and default.
    view_destination_key: &'static str,
    view_destination_default: &'static str,
    /// Checks one rendered destination; `Err` says what was expected.
    check_destination: fn(&str) -> Result<(), String>,
}

fn common(
    key: &str,
    kind: &str,
    raw: Common<'_>,
    rule: &UrlRule,
    streams: &[Source<'_>],
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Validated {
    let name = raw.name.unwrap_or(kind).to_owned();
    if !is_valid_name(&name) {
        problems.push(
            format!("{key}.name"),
            format!("{NAME_EXPECTED}, got {name:?}"),
        );
    }
    let url = match interpolate(raw.url, env) {
        Err(e) => {
            problems.push(format!("{key}.url"), format!("the URL {e}"));
            String::new()
        }
        Ok(text) => {
            let text = text.trim().to_owned();
            match Url::parse(&text) {
                Ok(url) if rule.schemes.contains(&url.scheme()) && url.host_str().is_some() => {}
                _ => problems.push(
                    format!("{key}.url"),
                    format!(
                        "expected a URL such as \"{}\" ({}), got {:?}",
                        rule.example,
                        rule.schemes
                            .iter()
                            .map(|s| format!("{s}://"))
                            .collect::<Vec<_>>()
                            .join(" or "),
                        shown_url(&text)
                    ),
                ),
            }
            text
        }
    };
    let names: Vec<&str> = streams.iter().map(|s| s.name).collect();
    // Each entry: the source stream and the view, if one.
    let selected: Vec<(String, Option<SinkView>)> = match raw.streams {
        None => names.iter().map(|s| ((*s).to_owned(), None)).collect(),
        Some(list) => {
            if list.is_empty() {
                problems.push(
                    format!("{key}.streams"),
                    "expected at least one stream name from [[streams]] (leave the key out to \
                     publish every stream)",
                );
            }
            let mut chosen: Vec<(String, Option<SinkView>)> = Vec::new();
            let mut seen_names: Vec<(String, usize)> = Vec::new();
            for (j, entry) in list.iter().enumerate() {
                match resolve_entry(entry, streams) {
                    Err(expected) => problems.push(format!("{key}.streams[{j}]"), expected),
                    Ok((stream, view)) => {
                        let name = published_name(&stream, view.as_ref());
                        if let Some((_, first)) = seen_names.iter().find(|(n, _)| *n == name) {
                            problems.push(
                                format!("{key}.streams[{j}]"),
                                format!(
                                    "{entry:?} is {name:?}, already listed at streams[{first}]; \
                                     name each stream or view once"
                                ),
                            );
                        } else {
                            seen_names.push((name, j));
                            chosen.push((stream, view));
                        }
                    }
                }
            }
            chosen
        }
    };
    let destination = raw.destination.unwrap_or(rule.destination_default);
    let destination_key = format!("{key}.{}", rule.destination_key);
    let view_destination = raw
        .view_destination
        .unwrap_or(rule.view_destination_default);
    let view_destination_key = format!("{key}.{}", rule.view_destination_key);
    let whole = selected.iter().filter(|(_, v)| v.is_none()).count();
    let views = selected.len() - whole;
    if whole > 1 && !destination.contains(STREAM_PLACEHOLDER) {
        problems.push(
            destination_key.clone(),
            format!(
                "expected a template holding {STREAM_PLACEHOLDER} (each stream needs its own, \
                 so that the last message of a stream can be read back), got {destination:?} \
                 for {whole} streams"
            ),
        );
    }
    if views > 1 && !view_destination.contains(VIEW_PLACEHOLDER) {
        problems.push(
            view_destination_key.clone(),
            format!(
                "expected a template holding {VIEW_PLACEHOLDER} (each view needs its own, so \
                 that the last message of a view can be read back), got {view_destination:?} \
                 for {views} views"
            ),
        );
    }
    let source = raw.source.unwrap_or(defaults::SOURCE);
    if source.trim().is_empty() || source.chars().any(char::is_control) {
        problems.push(
            format!("{key}.source"),
            format!(
                "expected a URI reference such as \"{}\" (the CloudEvents source), got {source:?}",
                defaults::SOURCE
            ),
        );
    }
    let mut seen = HashSet::new();
    let mut sink_streams = Vec::new();
    for (stream, view) in selected {
        let name = published_name(&stream, view.as_ref());
        let (rendered, at_key) = match &view {
            None => (render(destination, &stream), &destination_key),
            Some(view) => (
                render_view(view_destination, &stream, &view.id),
                &view_destination_key,
            ),
        };
        if let Err(expected) = (rule.check_destination)(&rendered) {
            problems.push(
                at_key.clone(),
                format!("{expected}, got {rendered:?} for {name:?}"),
            );
        } else if !seen.insert(rendered.clone()) {
            problems.push(
                at_key.clone(),
                format!("two streams or views would share {rendered:?}; each needs its own"),
            );
        }
        sink_streams.push(SinkStream {
            source: render(source, &name),
            stream,
            name,
            view,
            destination: rendered,
        });
    }
    Validated {
        name,
        url,
        streams: sink_streams,
        mode: raw.mode.unwrap_or(defaults::MODE),
        buffer: usize_of(integer_in(
            problems,
            &format!("{key}.buffer"),
            raw.buffer,
            defaults::BUFFER,
            limits::BUFFER,
        )),
        buffer_bytes: bytes_in(
            problems,
            &format!("{key}.buffer_bytes"),
            raw.buffer_bytes,
            defaults::BUFFER_BYTES,
            limits::BUFFER_BYTES,
        ),
        batch: usize_of(integer_in(
            problems,
            &format!("{key}.batch"),
            raw.batch,
            defaults::BATCH,
            limits::BATCH,
        )),
        timeout: duration_in(
            problems,
            &format!("{key}.timeout"),
            raw.timeout,
            defaults::TIMEOUT,
            limits::TIMEOUT,
        ),
    }
}

fn check_subject(subject: &str) -> Result<(), String> {
    if is_publish_subject(subject) {
        Ok(())
    } else {
        Err(
            "expected a NATS subject of dot-separated tokens without spaces or wildcards \
             (`*`, `>`), such as \"patchwire.{stream}\""
                .to_owned(),
        )
    }
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.chars().any(char::is_control) {
        Err("expected a Redis key such as \"patchwire:{stream}\"".to_owned())
    } else {
        Ok(())
    }
}

const NATS_RULE: UrlRule = UrlRule {
    schemes: &["nats", "tls"],
    example: "nats://127.0.0.1:4222",
    destination_key: "subject",
    destination_default: defaults::SUBJECT,
    view_destination_key: "view_subject",
    view_destination_default: defaults::VIEW_SUBJECT,
    check_destination: check_subject,
};

const REDIS_RULE: UrlRule = UrlRule {
    schemes: &["redis", "rediss"],
    example: "redis://127.0.0.1:6379",
    destination_key: "key",
    destination_default: defaults::KEY,
    view_destination_key: "view_key",
    view_destination_default: defaults::VIEW_KEY,
    check_destination: check_key,
};

impl RawSinks {
    /// Validates every broker sink; `streams` are the configured streams' names.
    pub fn validate(
        &self,
        streams: &[Source<'_>],
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> Vec<BrokerSinkSettings> {
        let mut sinks = Vec::new();
        let mut keys = Vec::new();
        for (i, raw) in self.nats.iter().enumerate() {
            let key = format!("sinks.nats[{i}]");
            sinks.push(raw.validate(&key, streams, env, problems));
            keys.push(key);
        }
        for (i, raw) in self.redis.iter().enumerate() {
            let key = format!("sinks.redis[{i}]");
            sinks.push(raw.validate(&key, streams, env, problems));
            keys.push(key);
        }
        // Names identify sinks in metrics and `/streams`; one destination on one broker
        // written by two sinks would interleave two lines of messages.
        let mut names: HashMap<&str, &str> = HashMap::new();
        let mut destinations: HashMap<(&str, &str), &str> = HashMap::new();
        for (sink, key) in sinks.iter().zip(&keys) {
            if let Some(first) = names.insert(&sink.name, key) {
                problems.push(
                    format!("{key}.name"),
                    format!(
                        "expected a unique name, but {:?} is also {first}'s (name one of them)",
                        sink.name
                    ),
                );
            }
            let url = match &sink.kind {
                BrokerKind::Nats(nats) => nats.url.as_str(),
                BrokerKind::Redis(redis) => redis.url.as_str(),
            };
            for stream in &sink.streams {
                if let Some(first) = destinations.insert((url, &stream.destination), key) {
                    problems.push(
                        key.clone(),
                        format!(
                            "{first} already publishes to {:?} on the same broker; give one \
                             of them another subject or key",
                            stream.destination
                        ),
                    );
                }
            }
        }
        sinks
    }
}

impl RawNatsSink {
    fn validate(
        &self,
        key: &str,
        streams: &[Source<'_>],
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> BrokerSinkSettings {
        let common = common(
            key,
            "nats",
            Common {
                name: self.name.as_deref(),
                url: &self.url,
                streams: self.streams.as_deref(),
                destination: self.subject.as_deref(),
                view_destination: self.view_subject.as_deref(),
                mode: self.mode,
                source: self.source.as_deref(),
                buffer: self.buffer,
                buffer_bytes: self.buffer_bytes,
                batch: self.batch,
                timeout: self.timeout,
            },
            &NATS_RULE,
            streams,
            env,
            problems,
        );
        let jetstream = self.jetstream.as_deref().unwrap_or(defaults::JETSTREAM);
        if !is_jetstream_name(jetstream) {
            problems.push(
                format!("{key}.jetstream"),
                format!(
                    "expected a JetStream stream name of visible characters without `.`, `*`, \
                     `>`, `/` or `\\`, such as \"PATCHWIRE\", got {jetstream:?}"
                ),
            );
        }
        let max_age = duration_in(
            problems,
            &format!("{key}.max_age"),
            self.max_age,
            defaults::MAX_AGE,
            limits::MAX_AGE,
        );
        let duplicate_window = duration_in(
            problems,
            &format!("{key}.duplicate_window"),
            self.duplicate_window,
            defaults::DUPLICATE_WINDOW,
            limits::DUPLICATE_WINDOW,
        );
        if !max_age.is_zero() && duplicate_window > max_age {
            problems.push(
                format!("{key}.duplicate_window"),
                format!(
                    "expected at most max_age ({}), as JetStream requires, got {}",
                    humantime::format_duration(max_age),
                    humantime::format_duration(duplicate_window)
                ),
            );
        }
        let nats = NatsSettings {
            url: common.url,
            jetstream: jetstream.to_owned(),
            storage: self.storage.unwrap_or(Storage::File),
            replicas: usize_of(integer_in(
                problems,
                &format!("{key}.replicas"),
                self.replicas,
                defaults::REPLICAS,
                limits::REPLICAS,
            )),
            max_age,
            max_bytes: bytes_in(
                problems,
                &format!("{key}.max_bytes"),
                self.max_bytes,
                defaults::MAX_BYTES,
                limits::MAX_BYTES,
            ),
            max_messages_per_subject: integer_in(
                problems,
                &format!("{key}.max_messages_per_subject"),
                self.max_messages_per_subject,
                defaults::MAX_MESSAGES_PER_SUBJECT,
                limits::MAX_MESSAGES_PER_SUBJECT,
            ),
            duplicate_window,
        };
        BrokerSinkSettings {
            name: common.name,
            streams: common.streams,
            mode: common.mode,
            buffer: common.buffer,
            buffer_bytes: common.buffer_bytes,
            batch: common.batch,
            timeout: common.timeout,
            kind: BrokerKind::Nats(nats),
        }
    }
}

impl RawRedisSink {
    fn validate(
        &self,
        key: &str,
        streams: &[Source<'_>],
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> BrokerSinkSettings {
        let common = common(
            key,
            "redis",
            Common {
                name: self.name.as_deref(),
                url: &self.url,
                streams: self.streams.as_deref(),
                destination: self.key.as_deref(),
                view_destination: self.view_key.as_deref(),
                mode: self.mode,
                source: self.source.as_deref(),
                buffer: self.buffer,
                buffer_bytes: self.buffer_bytes,
                batch: self.batch,
                timeout: self.timeout,
            },
            &REDIS_RULE,
            streams,
            env,
            problems,
        );
        let redis = RedisSettings {
            url: common.url,
            maxlen: integer_in(
                problems,
                &format!("{key}.maxlen"),
                self.maxlen,
                defaults::MAXLEN,
                limits::MAXLEN,
            ),
        };
        BrokerSinkSettings {
            name: common.name,
            streams: common.streams,
            mode: common.mode,
            buffer: common.buffer,
            buffer_bytes: common.buffer_bytes,
            batch: common.batch,
            timeout: common.timeout,
            kind: BrokerKind::Redis(redis),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The views of `fleet`: aliases `route` and `status`, a named view `r1` (route R1),
    /// ad hoc views allowed.
    fn fleet_views() -> ViewsSettings {
        let raw: crate::upstream::config::RawStream = toml::from_str(
            r#"
name = "fleet"
url = "http://127.0.0.1:1/"
[filtering]
entities = "/vehicles"
key = "id"
aliases = { route = "route", status = "status" }
[[views]]
name = "r1"
filter = { route = "R1" }
"#,
        )
        .unwrap();
        let mut problems = Problems::default();
        let views = crate::views::config::validate(
            "streams[0]",
            false,
            raw.filtering.as_ref(),
            &raw.views,
            &mut problems,
        );
        assert!(problems.is_empty());
        views.unwrap()
    }

    fn validate(toml_text: &str) -> (Vec<BrokerSinkSettings>, Vec<String>) {
        let raw: RawSinks = toml::from_str(toml_text).unwrap();
        let mut problems = Problems::default();
        let views = fleet_views();
        let sources = [
            Source {
                name: "fleet",
                views: Some(&views),
            },
            Source {
                name: "prices",
                views: None,
            },
        ];
        let sinks = raw.validate(&sources, &no_env, &mut problems);
        let messages = match problems.finish(None, ()) {
            Ok(()) => Vec::new(),
            Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        };
        (sinks, messages)
    }

    #[test]
    fn defaults_publish_every_stream_to_its_own_subject_and_key() {
        let (sinks, problems) = validate(
            "[[nats]]\nurl = \"nats://127.0.0.1:4222\"\n[[redis]]\nurl = \"redis://127.0.0.1\"\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(sinks[0].name, "nats");
        assert_eq!(
            sinks[0].streams[1],
            SinkStream {
                stream: "prices".into(),
                name: "prices".into(),
                view: None,
                destination: "patchwire.prices".into(),
                source: "/streams/prices".into()
            }
        );
        assert_eq!(sinks[1].name, "redis");
        assert_eq!(sinks[1].streams[0].destination, "patchwire:fleet");
        assert_eq!(sinks[1].batch, defaults::BATCH as usize);
    }

    #[test]
    fn mistakes_name_their_key_and_what_was_expected() {
        let (_, problems) = validate(
            r#"
[[nats]]
url = "http://127.0.0.1:4222"
subject = "events"
jetstream = "a.b"
duplicate_window = "2h"
max_age = "1h"
[[nats]]
url = "nats://127.0.0.1:4222"
streams = ["fleet", "nope", "fleet"]
subject = "x.{stream}.*"
[[redis]]
name = "nats"
url = "redis://127.0.0.1"
streams = []
buffer = 0
"#,
        );
        let all = problems.join("\n");
        for expected in [
            "`sinks.nats[0].url`: expected a URL such as \"nats://127.0.0.1:4222\" (nats:// or tls://)",
            "`sinks.nats[0].subject`: expected a template holding {stream}",
            "`sinks.nats[0].jetstream`: expected a JetStream stream name",
            "`sinks.nats[0].duplicate_window`: expected at most max_age (1h)",
            "`sinks.nats[1].streams[1]`: expected the name of a configured stream (fleet, prices), optionally with `@view` or `?filter`, got \"nope\"",
            "`sinks.nats[1].streams[2]`: \"fleet\" is \"fleet\", already listed at streams[0]",
            "`sinks.nats[1].subject`: expected a NATS subject",
            "`sinks.nats[1].name`: expected a unique name, but \"nats\" is also sinks.nats[0]'s",
            "`sinks.redis[0].name`: expected a unique name",
            "`sinks.redis[0].streams`: expected at least one stream name",
            "`sinks.redis[0].buffer`: expected an integer from 1 to 10000000, got 0",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        let (sinks, problems) = validate(
            "[[redis]]\nurl = \"redis://user:hunter2@127.0.0.1:6379/0\"\nstreams = [\"fleet\"]\nkey = \"one\"\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let shown = format!("{:?}", sinks[0]);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(sinks[0].streams[0].destination, "one");
    }

    #[test]
    fn views_are_published_on_their_own_subjects_and_keys() {
        let (sinks, problems) = validate(
            r#"
[[nats]]
url = "nats://127.0.0.1:4222"
streams = ["fleet", "fleet@r1", "fleet?status=STOPPED_AT&route=R2,R3"]
[[redis]]
url = "redis://127.0.0.1"
streams = ["fleet?route=R1"]
"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let nats = &sinks[0].streams;
        assert_eq!(nats[0].destination, "patchwire.fleet");
        assert_eq!(
            nats[1],
            SinkStream {
                stream: "fleet".into(),
                name: "fleet@r1".into(),
                view: Some(SinkView {
                    id: "r1".into(),
                    query: None
                }),
                destination: "patchwire.fleet.r1".into(),
                source: "/streams/fleet@r1".into(),
            }
        );
        let ad_hoc = nats[2].view.as_ref().unwrap();
        assert!(
            ad_hoc.id.starts_with('~') && ad_hoc.id.len() == 13,
            "{ad_hoc:?}"
        );
        assert_eq!(
            ad_hoc.query.as_deref(),
            Some("status=STOPPED_AT&route=R2,R3")
        );
        assert_eq!(
            nats[2].destination,
            format!("patchwire.fleet.{}", ad_hoc.id)
        );
        assert_eq!(nats[2].name, format!("fleet@{}", ad_hoc.id));
        // A filter equal to a named view's is that view.
        let redis = &sinks[1].streams[0];
        assert_eq!(redis.name, "fleet@r1");
        assert_eq!(redis.destination, "patchwire:fleet@r1");
        assert_eq!(redis.view.as_ref().unwrap().query, None);
    }

    #[test]
    fn views_that_cannot_be_had_are_refused_at_their_entry() {
        let (_, problems) = validate(
            r#"
[[nats]]
url = "nats://127.0.0.1:4222"
streams = ["fleet@nope", "prices@x", "fleet?line=1", "fleet@~0123456789ab", "fleet@r1?route=R1", "fleet?route=R1", "fleet?where=@.speed%20>", "fleet?route=R2"]
view_subject = "views.{stream}"
"#,
        );
        let all = problems.join("\n");
        for expected in [
            "`sinks.nats[0].streams[0]`: \"fleet@nope\": no view named `nope` on this stream; its views are: r1",
            "`sinks.nats[0].streams[1]`: \"prices@x\" names a view, but stream \"prices\" has no views",
            "`sinks.nats[0].streams[2]`: \"fleet?line=1\": unknown filter `line`; this stream's aliases are: route, status",
            "`sinks.nats[0].streams[3]`: \"fleet@~0123456789ab\" names an ad hoc view by its id",
            "`sinks.nats[0].streams[4]`: expected a stream, `stream@view` or `stream?filter`",
            "`sinks.nats[0].streams[6]`: \"fleet?where=@.speed%20>\": `where` is not an RFC 9535 filter expression",
            "`sinks.nats[0].view_subject`: expected a template holding {view}",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        let (_, problems) = validate(
            "[[nats]]\nurl = \"nats://127.0.0.1:4222\"\nstreams = [\"fleet@r1\"]\nview_subject = \"$JS.{view}\"\n",
        );
        assert!(
            problems
                .join("\n")
                .contains("`sinks.nats[0].view_subject`: expected a NATS subject"),
            "{problems:?}"
        );
    }

    #[test]
    fn subjects_and_stream_names() {
        for ok in ["a", "a.b", "patchwire.fleet-1", "a.b_c"] {
            assert!(is_publish_subject(ok), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a.b*", "$JS.x"] {
            assert!(!is_publish_subject(bad), "{bad}");
        }
        assert!(is_jetstream_name("PATCHWIRE"));
        for bad in ["", "a.b", "a b", "a*", "a/b"] {
            assert!(!is_jetstream_name(bad), "{bad}");
        }
    }
}

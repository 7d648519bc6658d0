//! The configuration file's shape, exactly as written: plain serde structs, unknown keys rejected.
//!
//! Every optional key is an `Option` (or an empty collection) here; defaults are applied by
//! `validate`, so a `RawConfig` always says what the file (and the environment) actually set.
//! The sections of components are theirs (`upstream::config`, `proxy::config`,
//! `sinks::webhook::config`, `diff::DiffConfig`, `sim::SimulatorConfig`); the sections here are
//! the application's own. Defaults and bounds are linked, never restated: each is written once,
//! as a constant beside the validation that applies it.

use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::cluster::config::RawCluster;
use crate::proxy::config::RawProxy;
use crate::sim::SimulatorConfig;
use crate::sinks::broker::config::RawSinks;
use crate::sinks::webhook::config::RawWebhooks;
use crate::sinks::ws::config::RawWebSocket;
use crate::upstream::config::{RawStream, RawStreamDefaults, RawUpstream};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The subscriber-facing HTTP server (`[server]`).
    #[serde(default)]
    pub server: RawServer,
    /// Logging (`[log]`).
    #[serde(default)]
    pub log: RawLog,
    /// Settings shared by every upstream poller (`[upstream]`).
    #[serde(default)]
    pub upstream: RawUpstream,
    /// Defaults applied to every `[[streams]]` entry that does not set the key itself.
    #[serde(default)]
    pub stream_defaults: RawStreamDefaults,
    /// The built-in simulated feed server (`[simulator]`); absent means not started.
    #[serde(default)]
    pub simulator: Option<SimulatorConfig>,
    /// The push source (`[push]`): who may `POST`/`PATCH` documents into push streams.
    #[serde(default)]
    pub push: Option<RawPush>,
    /// The streams (`[[streams]]`); at least one is required.
    #[serde(default)]
    pub streams: Vec<RawStream>,
    /// Webhook delivery (`[webhooks]`); absent means no webhooks and no outbox database.
    #[serde(default)]
    pub webhooks: Option<RawWebhooks>,
    /// The Streamdata.io-compatible proxy mode (`[proxy]`); absent means off.
    #[serde(default)]
    pub proxy: Option<RawProxy>,
    /// Several nodes sharing their streams through Redis (`[cluster]`); absent means one node
    /// on its own.
    #[serde(default)]
    pub cluster: Option<RawCluster>,
    /// WebSocket subscriptions (`[websocket]`, `GET /ws`); on by default.
    #[serde(default)]
    pub websocket: RawWebSocket,
    /// Bounds on views across every stream (`[views]`).
    #[serde(default)]
    pub views: crate::views::config::RawViews,
    /// Message brokers fed with the streams' changes (`[[sinks.nats]]`, `[[sinks.redis]]`).
    #[serde(default)]
    pub sinks: RawSinks,
}

/// `[push]`: authentication of `POST /streams/{name}` and `PATCH /streams/{name}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPush {
    /// The bearer token publishers send (`Authorization: Bearer <token>`), at least
    /// [`PUSH_TOKEN_MIN_CHARS`](super::limits::PUSH_TOKEN_MIN_CHARS) characters; `${VAR}` is
    /// replaced by the environment variable `VAR`.
    pub token: String,
    /// Largest document or patch accepted, as a polled body
    /// ([default](crate::upstream::config::defaults::MAX_BODY),
    /// [bounds](crate::upstream::config::limits::MAX_BODY)).
    pub max_body: Option<ByteSize>,
}

/// `[server]`: where subscribers connect and how their connections behave.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Socket address to listen on, e.g. `"[::]:8080"` ([default](super::defaults::LISTEN)).
    pub listen: Option<String>,
    /// Interval between SSE keep-alive comments ([default](super::defaults::KEEPALIVE),
    /// [bounds](super::limits::KEEPALIVE)).
    #[serde(default, with = "humantime_serde::option")]
    pub keepalive: Option<Duration>,
    /// The SSE `retry:` hint: how long clients wait before reconnecting
    /// ([default](super::defaults::RETRY), [bounds](super::limits::RETRY)).
    #[serde(default, with = "humantime_serde::option")]
    pub retry: Option<Duration>,
    /// Events a subscriber may fall behind before it is resynced
    /// ([default](super::defaults::SUBSCRIBER_BUFFER), [bounds](super::limits::SUBSCRIBER_BUFFER)).
    pub subscriber_buffer: Option<u64>,
    /// How long a subscriber's socket may refuse writes before it is closed
    /// ([default](super::defaults::STALL_TIMEOUT), [bounds](super::limits::STALL_TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub stall_timeout: Option<Duration>,
    /// How long shutdown waits for open connections ([default](super::defaults::SHUTDOWN_GRACE),
    /// [bounds](super::limits::SHUTDOWN_GRACE)).
    #[serde(default, with = "humantime_serde::option")]
    pub shutdown_grace: Option<Duration>,
    /// How long a new connection may take to send its first request head (HTTP/1) or its
    /// first request after the preface (HTTP/2) ([default](super::defaults::HEADER_TIMEOUT),
    /// [bounds](super::limits::HEADER_TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub header_timeout: Option<Duration>,
    /// How long a connection with no request in flight stays open
    /// ([default](super::defaults::IDLE_TIMEOUT), [bounds](super::limits::IDLE_TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
    /// How long a request body may take to arrive ([default](super::defaults::BODY_TIMEOUT),
    /// [bounds](super::limits::BODY_TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub body_timeout: Option<Duration>,
    /// Open connections past which new ones are refused
    /// ([default](super::defaults::MAX_CONNECTIONS), [bounds](super::limits::MAX_CONNECTIONS)).
    pub max_connections: Option<u64>,
    /// The deflate level of gzip responses: SSE events, JSON snapshots, catch-up pages
    /// ([default](super::defaults::GZIP_LEVEL), [bounds](super::limits::GZIP_LEVEL)).
    pub gzip_level: Option<u64>,
    /// Cross-origin access for browsers (`[server.cors]`).
    pub cors: Option<RawCors>,
}

/// `[server.cors]`: which browser origins may read the streams.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// Allowed origins such as `"https://app.example.com"`; `["*"]` allows any, an empty list
    /// disables CORS ([default](super::defaults::CORS)).
    pub allow_origins: Option<Vec<String>>,
}

/// `[log]`: log output.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// Line format: `"plain"` or `"json"` ([default](super::defaults::LOG_FORMAT)).
    pub format: Option<RawLogFormat>,
    /// A `tracing` filter directive such as `"info,patchwire=debug"`
    /// ([default](super::defaults::LOG_LEVEL)).
    pub level: Option<String>,
}

/// Log line format as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawLogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

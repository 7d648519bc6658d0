//! The validated configuration: what the application is built from.
//!
//! Values here have passed validation (see `validate`); building running parts from them
//! cannot fail on account of the configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderValue;

use crate::cluster::config::ClusterSettings;
use crate::diff::DiffOptions;
use crate::proxy::config::ProxySettings;
use crate::sim::SimulatorSettings;
use crate::sinks::broker::config::BrokerSinkSettings;
use crate::sinks::webhook::config::WebhookSettings;
use crate::sinks::ws::WebSocketSettings;
use crate::upstream::config::{StreamSettings, UpstreamSettings};

/// A complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was loaded from, if any.
    pub source: Option<PathBuf>,
    /// The HTTP server that subscribers connect to.
    pub server: ServerSettings,
    /// Logging.
    pub log: LogSettings,
    /// Settings shared by every upstream poller.
    pub upstream: UpstreamSettings,
    /// The built-in simulated feed server, when enabled.
    pub simulator: Option<SimulatorSettings>,
    /// The polled streams, in file order; names are unique across polled and push streams.
    pub streams: Vec<StreamSettings>,
    /// The push source's settings, present when push streams exist.
    pub push: Option<PushSettings>,
    /// Streams fed by publishers (`source = "push"`), in file order.
    pub push_streams: Vec<PushStreamSettings>,
    /// Webhook delivery, when `[webhooks]` is present.
    pub webhooks: Option<WebhookSettings>,
    /// The Streamdata.io-compatible proxy mode (`GET /{target URL}`), when `[proxy]` is present
    /// with `enabled = true`; `None` means dynamic streams are refused.
    pub proxy: Option<ProxySettings>,
    /// The cluster this node joins, when `[cluster]` is present; `None` means a single node.
    pub cluster: Option<ClusterSettings>,
    /// WebSocket subscriptions (`GET /ws`).
    pub websocket: WebSocketSettings,
    /// Distinct views at once over every stream (`views.max_total`).
    pub max_views: usize,
    /// Message brokers fed with the streams' changes, in file order (NATS sinks first).
    pub broker_sinks: Vec<BrokerSinkSettings>,
    /// The document schemas streams name with `schema`, by stream name.
    pub document_schemas:
        std::collections::BTreeMap<String, crate::validation::schema_file::DocumentSchema>,
}

/// Authentication and limits of the push source.
#[derive(Clone)]
pub struct PushSettings {
    /// The bearer token publishers must send.
    pub token: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: u64,
}

impl std::fmt::Debug for PushSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushSettings")
            .field("token", &"<redacted>")
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

/// A stream whose documents are pushed by publishers rather than polled.
#[derive(Debug, Clone)]
pub struct PushStreamSettings {
    /// Unique name; served at `/streams/{name}`, fed at the same path by `POST`/`PATCH`.
    pub name: String,
    /// How many recent changes are kept for resuming subscribers.
    pub history: usize,
    /// Most bytes those changes may hold together.
    pub history_bytes: u64,
    /// How changes are computed.
    pub diff: DiffOptions,
    /// The stream's views, when it has `[streams.filtering]`.
    pub views: Option<crate::views::config::ViewsSettings>,
}

/// The subscriber-facing HTTP server.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Interval between SSE keep-alive comments.
    pub keepalive: Duration,
    /// The `retry:` hint sent to SSE clients (how long they wait before reconnecting).
    pub retry_hint: Duration,
    /// Events a subscriber may fall behind before it is resynced.
    pub subscriber_buffer: usize,
    /// How long a subscriber's socket may refuse writes before the connection is closed.
    pub stall_timeout: Duration,
    /// How long shutdown waits for connections to finish.
    pub shutdown_grace: Duration,
    /// How long a new connection may take to send its first request (head or HTTP/2 preface
    /// and first stream) before it is closed.
    pub header_timeout: Duration,
    /// How long a connection with no request in flight stays open.
    pub idle_timeout: Duration,
    /// How long a request body may take to arrive in full (answered 408 past it).
    pub body_timeout: Duration,
    /// Open connections past which new ones are refused (HTTP/1 503, then closed).
    pub max_connections: usize,
    /// The deflate level of gzip responses (SSE events, JSON snapshots, catch-up pages).
    pub gzip_level: crate::wire::gzip::Level,
    /// Cross-origin access for browsers.
    pub cors: Cors,
}

/// Which browser origins may read the streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers are sent.
    Disabled,
    /// `Access-Control-Allow-Origin: *`.
    AnyOrigin,
    /// Only these origins.
    Origins(Vec<HeaderValue>),
}

/// Log output.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Line format.
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info,patchwire=debug`.
    pub filter: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

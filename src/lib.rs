//! patchwire: poll an API once, push its changes as RFC 6902 JSON Patches to every subscriber.
//!
//! Modules, in the order data flows through them:
//! - [`config`]: the configuration file's shape, loading, and the validation of its sections,
//!   each by its component; `config/default.toml` is checked against their defaults.
//! - [`upstream`]: one poller per stream; conditional fetches, rate limits, backoff, decoding.
//! - [`diff`]: RFC 6902 diff and apply.
//! - [`snapshot`]: the latest document of each stream, serialized once.
//! - [`hub`]: streams, their changes and history, subscribe and publish.
//! - [`wire`]: how events are written for subscribers (the bottom layer: pure, it imports
//!   nothing else): SSE framing, gzip, both dialects' events, the per-event frame cache.
//! - [`sinks`]: SSE (one subscriber's events in either dialect, for both transports),
//!   WebSocket (`GET /ws`: many resumable subscriptions per connection), webhooks (with
//!   their durable outbox, which also keeps push streams' documents) and message brokers
//!   (NATS JetStream, Redis Streams).
//! - [`proxy`]: the Streamdata.io-compatible mode: any allowed URL as a dynamic stream.
//! - [`cluster`]: several nodes on one Redis: one poller per stream (fenced leases), a shared
//!   log every node follows, cluster-wide ids, quotas and token limits.
//! - [`api`]: what a subscription request is (one decision for both transports, which
//!   catch-up reads share), the accept loop (the direct HTTP/1 path and hyper) and the HTTP
//!   routes (streams, catch-up, push, admin, health, metrics, schemas).
//! - [`contracts`]: the AsyncAPI and OpenAPI documents generated from the configuration, their
//!   shared schemas, and document schemas inferred from documents.
//! - [`app`]: wiring: builds everything from a validated configuration, then runs it.
//! - [`metrics`]: Prometheus metrics owned by the application.
//! - [`sim`]: the simulated fleet feed used by the default configuration, tests and benchmarks.
//! - [`redact`]: the one way a URL is shown (logs, errors, listings), without its secrets.
//! - [`ssrf`]: which outbound addresses are refused, and the resolver that enforces it.
//! - [`time`]: how times are written: Unix milliseconds and RFC 3339.
//! - [`schemas`]: the JSON Schemas of the versioned envelopes (catch-up pages, webhook
//!   bodies), served at `/schemas/{name}.json`.
//! - [`validation`]: problems at key paths and the checks every configuration section shares;
//!   it imports nothing of the crate, so components validate their sections without `config`.

// Nothing from outside may panic the process, and a library logs through its caller.
#![cfg_attr(
    not(test),
    warn(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::print_stdout,
        clippy::print_stderr
    )
)]

pub mod api;
pub mod app;
pub mod cluster;
pub mod config;
pub mod contracts;
pub mod diff;
pub mod hub;
pub mod metrics;
pub mod proxy;
pub mod redact;
pub mod schemas;
pub mod sim;
pub mod sinks;
pub mod snapshot;
pub mod ssrf;
pub mod time;
pub mod upstream;
pub mod validation;
pub mod views;
pub mod wire;

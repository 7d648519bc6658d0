//! Sinks: the protocols that push a stream's changes to subscribers: SSE, WebSocket (whose
//! subscriptions are followed by the SSE sink's `Writer`), webhooks, and message brokers
//! (NATS JetStream, Redis Streams).

pub mod broker;
pub mod sse;
pub mod webhook;
pub mod ws;

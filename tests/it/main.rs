//! Integration tests: the real application over real sockets, a mock upstream that changes,
//! real SSE clients.

mod support;
// Readers of the real data under ../shared/data, shared with the other test binaries.
#[path = "../diff_support/mod.rs"]
mod diff_support;
#[path = "../feeds_support/mod.rs"]
mod feeds_support;

mod backpressure;
mod conditional;
mod connections;
mod failures;
mod proxy;
mod push;
mod replay;
mod resume;
mod secrets;
mod shutdown;
mod streaming;
mod transports;
mod webhook;
mod webhook_crash;
mod websocket;
mod websocket_clients;
mod wire;

//! Integration tests: the real application over real sockets, a mock upstream that changes,
//! real SSE clients.

mod support;

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
mod wire;

//! Integration tests: the real application over real sockets, a mock upstream that changes,
//! real SSE clients.

mod support;

mod streaming;
mod webhook;
mod webhook_crash;

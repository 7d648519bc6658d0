//! Integration tests: the real application over real sockets, a mock upstream that changes,
//! real SSE clients.

mod support;

mod backpressure;
mod conditional;
mod failures;
mod push;
mod resume;
mod shutdown;
mod streaming;
mod wire;

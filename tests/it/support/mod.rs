//! Test support: the app on port 0, a mock upstream, an SSE client.

#![allow(dead_code)]

pub mod api;
pub mod app;
pub mod raw;
pub mod receiver;
pub mod scripted;
pub mod sse;
pub mod upstream;
pub mod ws;

pub use app::{TestApp, config, stream};
pub use receiver::{Hit, Receiver, Reply};
pub use sse::{Rebuilt, SseClient, SseEvent};
pub use upstream::{Failure, MockUpstream, Received};

use std::time::Duration;

/// A generous bound for "soon" in tests: they wait for events, never sleep for fixed times.
pub const SOON: Duration = Duration::from_secs(5);

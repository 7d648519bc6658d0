//! Test support: the app on port 0 configured from TOML, the mock upstream, SSE clients, a
//! webhook receiver, raw sockets, pollers outside the app.

pub mod app;
pub mod brokers;
pub mod chromium;
pub mod cluster;
pub mod nats;
pub mod poller;
pub mod process;
pub mod raw;
pub mod receiver;
pub mod redis;
pub mod scripted;
pub mod sse;
pub mod store;
pub mod upstream;
pub mod ws;

pub use app::{BASE, TestApp, config_from_toml, over, polled};
pub use receiver::{Hit, Receiver, Reply};
pub use sse::{Rebuilt, SseClient, SseEvent};
pub use store::TestStore;
pub use upstream::{Failure, MockUpstream};

use std::time::Duration;

/// Skips (prints why and returns `None`) outside CI, fails under `CI=true`: for a test whose
/// component (a browser, an interpreter) is not installed.
pub fn skip<T>(why: &str) -> Option<T> {
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "CI=true and {why}"
    );
    eprintln!("SKIP: {why}");
    None
}

/// A generous bound for "soon" in tests: they wait for events, never sleep for fixed times.
pub const SOON: Duration = Duration::from_secs(5);

/// A port on 127.0.0.1 that was free a moment ago (bound as port 0, then released): for a
/// process to listen on, or for a connection nobody answers.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

//! The upstream side on its own: `Fetcher` against the mock upstream, and a `Poller` outside
//! the application, step by step against the mock or on tokio's paused clock against a
//! scripted upstream (`support::poller`).

mod fetch;
mod poll;
mod schedule;

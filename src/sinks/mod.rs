//! Sinks: the protocols that push a stream's changes to subscribers.

pub mod sse;
pub mod webhook;
pub mod ws;

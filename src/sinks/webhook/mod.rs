//! Webhooks: every change of the streams an endpoint subscribes to, delivered to its URL,
//! signed (Standard Webhooks), in order per (endpoint, stream), at least once across restarts.
//!
//! - [`sign`]: secrets, message ids and `webhook-signature` (pure).
//! - [`schedule`]: the retry schedule and what a receiver's answer means (pure).
//! - [`body`]: the delivery body, and whether a change goes out as a patch or a snapshot (pure).
//! - [`ssrf`]: which target addresses are refused, and the resolver that enforces it.

pub mod body;
pub mod dispatcher;
pub mod registry;
pub mod schedule;
pub mod service;
pub mod sign;
pub mod ssrf;
pub mod worker;

//! Webhooks: every change of the streams an endpoint subscribes to, delivered to its URL,
//! signed (Standard Webhooks), in order per (endpoint, stream), at least once across restarts.
//!
//! Flow: hub → [`dispatcher`] (one per stream; accepts each change into the durable
//! [`outbox`] for every subscribed endpoint, in one transaction) → [`worker`] (a shared
//! pool; sends the oldest pending delivery of each (endpoint, stream) pair) → receiver.
//!
//! - [`sign`]: secrets, message ids and `webhook-signature` (pure).
//! - [`schedule`]: the retry schedule and what a receiver's answer means (pure).
//! - [`body`]: the delivery body, and whether a change goes out as a patch or a snapshot (pure).
//! - [`registry`]: the endpoints in memory, parsed once.
//! - [`dispatcher`]: hub → outbox, and the snapshot that heals every gap.
//! - [`worker`]: outbox → receivers (`try_step` starts what is due).
//! - [`service`]: startup (config endpoints reconciled with stored ones) and admin operations.
//!
//! Invariants: a patch is only queued right after the delivery holding its base
//! ([`body::plan`]); a pair never has two deliveries in flight; a dead delivery supersedes the
//! patches queued after it and a snapshot follows; a backlog above `webhooks.backlog_limit`
//! collapses into one snapshot; a delivery stays pending until a 2xx is recorded, so a crash
//! at any point means a redelivery with the same `webhook-id`, never a loss.

pub mod body;
pub mod dispatcher;
pub mod outbox;
pub mod registry;
pub mod schedule;
pub mod service;
pub mod sign;
pub mod worker;

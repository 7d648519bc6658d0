//! Several nodes, one poll: the cluster mode on Redis.
//!
//! Every node runs the same configuration and serves its own subscribers from its own hub.
//! Redis holds what they share: per stream a log of changes (the truth), the current document,
//! and a lease that says which node polls it. A node polls a stream only while it holds the
//! lease, and its writes carry the lease's fence token, so a node that lost the lease while
//! paused can never publish after its successor. Changes are announced over pub/sub (a hint:
//! gaps are filled from the log) and every node applies them to its hub in sequence order.
//!
//! - [`follow`]: applies the log to the local hub, announcements first, gaps from the log.
//! - [`keys`]: key names, one hash tag per stream.
//! - [`scripts`]: the Lua scripts that make each operation atomic.
//! - [`store`]: typed operations over those scripts.
//! - [`message`]: what nodes announce to each other.
//! - [`lease`]: the lease keeper of each stream and the membership heartbeat.
//! - [`rendezvous`]: which node should hold which stream's lease.

pub mod config;
pub mod demand;
pub mod follow;
pub mod keys;
pub mod lease;
pub mod message;
pub mod node;
pub mod quota;
pub mod rendezvous;
pub mod replica;
pub mod scripts;
pub mod store;
pub mod tokens;
pub mod writer;

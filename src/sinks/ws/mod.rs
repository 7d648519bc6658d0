//! The WebSocket sink: `GET /ws`, one connection, many resumable subscriptions.
//!
//! A client subscribes and unsubscribes with JSON text messages ([`protocol`]); every
//! subscription is followed by the SSE sink's `Writer` in the WebSocket dialect, so it gets the
//! same events as an SSE subscriber (snapshot, patches, errors, recoveries; an exact resume
//! from `last_event_id`; a fresh snapshot after falling behind) as messages naming its stream,
//! built once per event in the event's frame cache and sent as the same bytes on every
//! connection ([`crate::wire::websocket`]). One task per connection reads the client's
//! messages, merges its subscriptions' events and pings; it knows neither the proxy mode nor
//! the configuration file: what a subscription is, and who may open it, is asked of
//! [`Streams`] (the one subscription decision, `api::subscribe`).
//!
//! Invariants: the events of one subscription are sent in stream order, after its
//! `subscribed` answer and before its `unsubscribed` or `ended` one; a connection subscribes to
//! a stream at most once, so a message's stream names its subscription.

pub mod config;
pub mod handshake;
pub mod protocol;
mod session;

pub use config::WebSocketSettings;
pub use session::WebSockets;

use std::future::Future;

use crate::hub::{Resume, Subscription};
use crate::wire::Refusal;
use protocol::Target;

/// What WebSocket connections subscribe through: which streams exist, which tokens are
/// valid, and the limits that come with them.
pub trait Streams: Send + Sync + 'static {
    /// Admits a connection presenting `token` (from the handshake or an `auth` message).
    fn admit(&self, token: &str) -> impl Future<Output = Result<Admitted, Refusal>> + Send;

    /// Opens a subscription to `target` from `resume`, for a connection holding `token`.
    fn open(
        &self,
        target: &Target,
        resume: &Resume,
        token: Option<&str>,
    ) -> impl Future<Output = Result<Opened, Refusal>> + Send;
}

/// An admitted connection's token: held (a slot of its limits) while the connection lasts.
pub struct Admitted {
    /// The token's configured name.
    pub name: String,
    /// Released when the connection closes.
    pub hold: Box<dyn Send>,
}

/// An open subscription and what it holds while it lasts.
pub struct Opened {
    /// Its initial events and live receiver.
    pub subscription: Subscription,
    /// A token's slot, a dynamic stream's poll-period claim; released on unsubscribe.
    pub hold: Option<Box<dyn Send>>,
}

/// The close codes of a connection (RFC 6455 §7.4.1, and one of the private range).
pub mod close {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the protocol (unmasked frames, bad opcodes, ...).
    pub const PROTOCOL: u16 = 1002;
    /// The client sent a binary message: the protocol is JSON text.
    pub const UNSUPPORTED: u16 = 1003;
    /// The client closed without a code (counted, never sent).
    pub const NO_STATUS: u16 = 1005;
    /// Closed without a close frame: the client left, or stopped reading for the stall
    /// timeout (counted, never sent).
    pub const ABNORMAL: u16 = 1006;
    /// A text message that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A refused token, or more messages per second than allowed; the reason names the cause.
    pub const POLICY: u16 = 1008;
    /// A message or frame over `websocket.max_message_size`.
    pub const TOO_BIG: u16 = 1009;
    /// No frame from the client (not even a pong) within `websocket.idle_timeout`.
    pub const IDLE: u16 = 4000;
}

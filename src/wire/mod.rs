//! The wire format (pure): how events are written for subscribers, in both dialects.
//!
//! The bottom layer, as mini-redis's `frame.rs` is: the hub, the snapshot store, the sinks and
//! the routes use it, and it uses nothing else from the crate. [`sse`] frames events,
//! [`gzip`] deflates each frame once for every gzip subscriber, [`native`] and [`streamdata`]
//! write the two SSE dialects' events, [`websocket`] the WebSocket messages, [`cloudevents`]
//! a change as a CloudEvent (broker messages, webhook deliveries). A change (a snapshot, a failure, a recovery) carries its
//! data and one [`Frames`] cache: the SSE sink frames it there once, on first use, and every
//! subscriber shares the bytes.

pub mod cloudevents;
mod frames;
pub mod gzip;
pub mod native;
pub mod sse;
pub mod streamdata;
pub mod websocket;

pub use frames::{Frame, Frames};

/// Whether a change carries a patch or a whole document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// An RFC 6902 patch from the previous document.
    Patch,
    /// The whole new document replaces the previous one.
    Snapshot,
}

impl ChangeKind {
    /// `"patch"` or `"snapshot"`: its name in patchwire's dialect and in push answers.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Patch => "patch",
            ChangeKind::Snapshot => "snapshot",
        }
    }

    /// `"patch"` or `"data"`: its event name in the Streamdata.io dialect.
    pub fn streamdata_name(self) -> &'static str {
        match self {
            ChangeKind::Patch => "patch",
            ChangeKind::Snapshot => "data",
        }
    }
}

/// How a subscription's events are written: their vocabulary and framing, three views of the
/// same stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// patchwire's own over SSE: `snapshot`, `patch`, `error`, `recovered`; `Last-Event-ID`
    /// replays missed patches.
    Native,
    /// Streamdata.io's: `data` (the whole document, first on every connection), `patch`
    /// (`add`/`remove`/`replace` only) and `error` as `{status, message, cause, timestamp,
    /// sessionId}`. A reconnection starts with `data` again, as those SDKs expect.
    Streamdata {
        /// This connection's session id, reported in its `error` events.
        session: u64,
        /// Event data escapes every non-ASCII character as `\uXXXX` (`proxy.ascii_only`).
        ascii_only: bool,
    },
    /// patchwire's own vocabulary as WebSocket text messages naming their stream
    /// ([`websocket`]): the same ids and data as [`Dialect::Native`], no `retry:` hint and no
    /// keep-alive comments (the connection pings).
    WebSocket,
}

/// Why a subscription request is refused, as the client is told: plain data, whoever refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status that describes the refusal.
    pub status: u16,
    /// A machine-readable reason (`token-missing`, `host-not-allowed`, ...).
    pub cause: &'static str,
    /// A human-readable reason.
    pub message: String,
}

//! Framed events and the cache of them each change carries.

use std::sync::OnceLock;

use bytes::Bytes;

use super::gzip::{Deflated, Level};

/// One event as sent: its SSE bytes, and (built on first use) their deflated form for gzip
/// subscribers; shared by every subscriber.
#[derive(Debug)]
pub struct Frame {
    plain: Bytes,
    deflated: OnceLock<Deflated>,
}

impl Frame {
    /// Wraps an already framed event.
    pub fn new(plain: Bytes) -> Self {
        Frame {
            plain,
            deflated: OnceLock::new(),
        }
    }

    /// The framed event as sent to clients without compression.
    pub fn plain(&self) -> &Bytes {
        &self.plain
    }

    /// The bytes this event holds: its frame, and its deflated form once built.
    pub fn retained_bytes(&self) -> usize {
        self.plain.len() + self.deflated.get().map_or(0, |d| d.bytes.len())
    }

    /// The framed event deflated for gzip subscribers (computed once, at `level`: a server
    /// deflates at one level, `server.gzip_level`, so the first call's level is every call's).
    pub fn deflated(&self, level: Level) -> &Deflated {
        self.deflated
            .get_or_init(|| Deflated::new(&self.plain, level))
    }
}

/// The frames of one event (a change, a snapshot, a failure, a recovery), one slot per
/// dialect (the WebSocket message included): each is framed once, on first use, by the sink that sends it, then shared by every
/// subscriber. Whoever keeps the event keeps its frames, so they count in what it holds.
#[derive(Debug, Default)]
pub struct Frames {
    native: OnceLock<Frame>,
    /// By `ascii_only` (index 1: escaped to ASCII).
    streamdata: [OnceLock<Frame>; 2],
    /// The WebSocket message (filled only for WebSocket subscribers).
    websocket: OnceLock<Frame>,
}

impl Frames {
    /// No frame built yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The event in patchwire's own dialect, framed by `frame` the first time.
    pub fn native(&self, frame: impl FnOnce() -> Bytes) -> &Frame {
        self.native.get_or_init(|| Frame::new(frame()))
    }

    /// The event in the Streamdata.io dialect, framed by `frame` the first time for this
    /// `ascii_only` value.
    pub fn streamdata(&self, ascii_only: bool, frame: impl FnOnce() -> Bytes) -> &Frame {
        self.streamdata[usize::from(ascii_only)].get_or_init(|| Frame::new(frame()))
    }

    /// The event as a WebSocket text message, built by `frame` the first time.
    pub fn websocket(&self, frame: impl FnOnce() -> Bytes) -> &Frame {
        self.websocket.get_or_init(|| Frame::new(frame()))
    }

    /// The bytes of every frame built so far (and of their deflated forms).
    pub fn retained_bytes(&self) -> usize {
        std::iter::once(&self.native)
            .chain(&self.streamdata)
            .chain(std::iter::once(&self.websocket))
            .filter_map(OnceLock::get)
            .map(Frame::retained_bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_slot_is_framed_once_and_counted_once_built() {
        let frames = Frames::new();
        assert_eq!(frames.retained_bytes(), 0);
        let first = frames.native(|| Bytes::from_static(b"event: x\ndata: 1\n\n"));
        assert_eq!(first.plain().len(), 18);
        let again = frames.native(|| unreachable!("framed once"));
        assert!(std::ptr::eq(first, again));
        assert_eq!(frames.retained_bytes(), 18);
        frames.streamdata(true, || Bytes::from_static(b"0123"));
        assert_eq!(frames.retained_bytes(), 22);
        frames.streamdata(false, || Bytes::from_static(b"01"));
        assert_eq!(frames.retained_bytes(), 24);
        frames.websocket(|| Bytes::from_static(b"{}"));
        assert_eq!(frames.retained_bytes(), 26);
        let deflated = frames
            .native(|| unreachable!())
            .deflated(Level::FAST)
            .bytes
            .len();
        assert_eq!(frames.retained_bytes(), 26 + deflated);
    }
}

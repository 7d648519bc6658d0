//! The `[websocket]` section: its shape as written (serde, unknown keys rejected), its defaults
//! and bounds, its pure validation, and the settings WebSocket connections are served with.

use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::validation::{
    Problems, bytes_in, duration_in, fmt_duration, integer_in, nonzero_u32, usize_of,
};

/// Built-in defaults of `[websocket]`.
pub mod defaults {
    use std::time::Duration;

    /// `websocket.enabled`.
    pub const ENABLED: bool = true;
    /// `websocket.max_subscriptions`.
    pub const MAX_SUBSCRIPTIONS: u64 = 64;
    /// `websocket.max_message_size`, in bytes.
    pub const MAX_MESSAGE_SIZE: u64 = 64 * 1024;
    /// `websocket.max_messages_per_second`.
    pub const MAX_MESSAGES_PER_SECOND: u64 = 20;
    /// `websocket.ping_interval`.
    pub const PING_INTERVAL: Duration = Duration::from_secs(20);
    /// `websocket.idle_timeout`.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
}

/// Inclusive bounds of `[websocket]` keys.
pub mod limits {
    use std::time::Duration;

    /// `websocket.max_subscriptions`.
    pub const MAX_SUBSCRIPTIONS: (u64, u64) = (1, 10_000);
    /// `websocket.max_message_size`, in bytes.
    pub const MAX_MESSAGE_SIZE: (u64, u64) = (1024, 16 << 20);
    /// `websocket.max_messages_per_second`.
    pub const MAX_MESSAGES_PER_SECOND: (u64, u64) = (1, 100_000);
    /// `websocket.ping_interval`.
    pub const PING_INTERVAL: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(600));
    /// `websocket.idle_timeout`; also more than `ping_interval`.
    pub const IDLE_TIMEOUT: (Duration, Duration) =
        (Duration::from_secs(2), Duration::from_secs(3600));
}

/// `[websocket]`: `GET /ws`, many resumable subscriptions over one connection.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebSocket {
    /// Serve `GET /ws` ([default](defaults::ENABLED)).
    pub enabled: Option<bool>,
    /// Subscriptions one connection may hold at once ([default](defaults::MAX_SUBSCRIPTIONS),
    /// [bounds](limits::MAX_SUBSCRIPTIONS)).
    pub max_subscriptions: Option<u64>,
    /// Largest message (and frame) a client may send
    /// ([default](defaults::MAX_MESSAGE_SIZE), [bounds](limits::MAX_MESSAGE_SIZE)).
    pub max_message_size: Option<ByteSize>,
    /// Messages a client may send per second, sustained, with bursts of as many
    /// ([default](defaults::MAX_MESSAGES_PER_SECOND),
    /// [bounds](limits::MAX_MESSAGES_PER_SECOND)).
    pub max_messages_per_second: Option<u64>,
    /// Interval between the server's pings ([default](defaults::PING_INTERVAL),
    /// [bounds](limits::PING_INTERVAL)).
    #[serde(default, with = "humantime_serde::option")]
    pub ping_interval: Option<Duration>,
    /// A connection from which no frame (a pong included) arrived for this long is closed
    /// ([default](defaults::IDLE_TIMEOUT), [bounds](limits::IDLE_TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
}

/// How WebSocket connections are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketSettings {
    /// `GET /ws` upgrades; otherwise it is a 404.
    pub enabled: bool,
    /// Subscriptions one connection may hold at once.
    pub max_subscriptions: usize,
    /// Largest message or frame a client may send, in bytes.
    pub max_message_size: usize,
    /// Messages a client may send per second (and at once).
    pub max_messages_per_second: std::num::NonZeroU32,
    /// Interval between pings.
    pub ping_interval: Duration,
    /// Longest silence from the client before the connection is closed.
    pub idle_timeout: Duration,
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        RawWebSocket::default().validate(&mut Problems::default())
    }
}

impl RawWebSocket {
    /// The settings, recording every problem.
    pub fn validate(&self, problems: &mut Problems) -> WebSocketSettings {
        let max_subscriptions = integer_in(
            problems,
            "websocket.max_subscriptions",
            self.max_subscriptions,
            defaults::MAX_SUBSCRIPTIONS,
            limits::MAX_SUBSCRIPTIONS,
        );
        let max_message_size = bytes_in(
            problems,
            "websocket.max_message_size",
            self.max_message_size,
            defaults::MAX_MESSAGE_SIZE,
            limits::MAX_MESSAGE_SIZE,
        );
        let max_messages_per_second = integer_in(
            problems,
            "websocket.max_messages_per_second",
            self.max_messages_per_second,
            defaults::MAX_MESSAGES_PER_SECOND,
            limits::MAX_MESSAGES_PER_SECOND,
        );
        let ping_interval = duration_in(
            problems,
            "websocket.ping_interval",
            self.ping_interval,
            defaults::PING_INTERVAL,
            limits::PING_INTERVAL,
        );
        let idle_timeout = duration_in(
            problems,
            "websocket.idle_timeout",
            self.idle_timeout,
            defaults::IDLE_TIMEOUT,
            limits::IDLE_TIMEOUT,
        );
        if idle_timeout <= ping_interval {
            problems.push(
                "websocket.idle_timeout",
                format!(
                    "expected a duration longer than websocket.ping_interval ({}), so that a \
                     live client can answer a ping in time, got \"{}\"",
                    fmt_duration(ping_interval),
                    fmt_duration(idle_timeout)
                ),
            );
        }
        WebSocketSettings {
            enabled: self.enabled.unwrap_or(defaults::ENABLED),
            max_subscriptions: usize_of(max_subscriptions),
            max_message_size: usize_of(max_message_size),
            max_messages_per_second: nonzero_u32(max_messages_per_second),
            ping_interval,
            idle_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bounds_are_checked() {
        let mut problems = Problems::default();
        let settings = RawWebSocket::default().validate(&mut problems);
        assert!(problems.is_empty());
        assert_eq!(settings.max_subscriptions, 64);
        let raw = RawWebSocket {
            max_subscriptions: Some(0),
            max_message_size: Some(ByteSize::b(10)),
            ping_interval: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(30)),
            ..RawWebSocket::default()
        };
        let mut problems = Problems::default();
        raw.validate(&mut problems);
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}

//! The checks the sections share. Each records a problem at its key and still returns a value,
//! so that validation goes on and reports every problem of a file at once.
//!
//! A key that is not set takes its `default` unchecked: built-in defaults lie within their
//! bounds (the test of `config/default.toml` validates every one of them), and a default
//! inherited from another key was checked at that key.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use bytesize::ByteSize;
use http::header::HeaderName;

use super::Problems;

/// What a duration key expects (`humantime`: `"500ms"`, `"5s"`, `"1h 30m"`).
pub const DURATION_EXPECTED: &str = "a duration with a unit such as \"5s\" or \"500ms\"";

/// What a size key expects (`bytesize`: `1048576`, `"16 MiB"`, `"512 KB"`).
pub const BYTES_EXPECTED: &str = "a size in bytes: an integer or a string such as \"16 MiB\"";

/// What a name (of a stream, a group, a token, an endpoint) must look like.
pub const NAME_EXPECTED: &str = "expected 1 to 64 letters, digits, '.', '_' or '-', starting \
                                 with a letter or digit";

/// What a header value must look like.
pub const HEADER_VALUE_EXPECTED: &str = "expected a header value of visible ASCII characters and \
                                         spaces (no line breaks or control characters)";

/// Headers that patchwire or its HTTP client set themselves: a configured value would break
/// conditional requests, compression or framing.
pub const MANAGED_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "accept-encoding",
    "if-none-match",
    "if-modified-since",
];

/// A duration as messages and summaries show it: `1h 30m`.
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A size as messages and summaries show it: `16.0 MiB`.
pub fn fmt_bytes(n: u64) -> String {
    ByteSize::b(n).display().iec().to_string()
}

/// A size as a file writes it exactly: `16 MiB` for a whole number of a binary unit, else bytes.
fn exact_size(n: u64) -> String {
    const UNITS: [(u32, &str); 5] = [
        (50, "PiB"),
        (40, "TiB"),
        (30, "GiB"),
        (20, "MiB"),
        (10, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(shift, _)| n != 0 && n.trailing_zeros() >= *shift)
        .map_or_else(
            || format!("{n} B"),
            |(shift, unit)| format!("{} {unit}", n >> shift),
        )
}

/// `value` (or `default` when unset), recording a problem at `key` when it lies outside `bounds`.
pub fn duration_in(
    problems: &mut Problems,
    key: &str,
    value: Option<Duration>,
    default: Duration,
    (min, max): (Duration, Duration),
) -> Duration {
    let Some(value) = value else {
        return default;
    };
    if value < min || value > max {
        problems.push(
            key,
            format!(
                "expected {DURATION_EXPECTED} between {} and {}, got \"{}\"",
                fmt_duration(min),
                fmt_duration(max),
                fmt_duration(value)
            ),
        );
    }
    value
}

/// `value` (or `default` when unset), recording a problem at `key` when it lies outside `bounds`.
pub fn integer_in(
    problems: &mut Problems,
    key: &str,
    value: Option<u64>,
    default: u64,
    (min, max): (u64, u64),
) -> u64 {
    let Some(value) = value else {
        return default;
    };
    if value < min || value > max {
        problems.push(
            key,
            format!("expected an integer from {min} to {max}, got {value}"),
        );
    }
    value
}

/// `value` in bytes (or `default` when unset), recording a problem at `key` when it lies
/// outside `bounds`.
pub fn bytes_in(
    problems: &mut Problems,
    key: &str,
    value: Option<ByteSize>,
    default: u64,
    (min, max): (u64, u64),
) -> u64 {
    let Some(value) = value.map(|v| v.as_u64()) else {
        return default;
    };
    if value < min || value > max {
        problems.push(
            key,
            format!(
                "expected a size from {} to {} ({} to {}, or {min} to {max} bytes), got {value} \
                 bytes",
                exact_size(min),
                exact_size(max),
                fmt_bytes(min),
                fmt_bytes(max)
            ),
        );
    }
    value
}

/// A fraction from 0 to 1 (or `default` when unset), recording a problem at `key` otherwise.
pub fn fraction(problems: &mut Problems, key: &str, value: Option<f64>, default: f64) -> f64 {
    let Some(value) = value else {
        return default;
    };
    if !(0.0..=1.0).contains(&value) {
        problems.push(key, format!("expected a fraction from 0 to 1, got {value}"));
    }
    value
}

/// A count that was checked against bounds, as the `usize` the settings hold.
pub fn usize_of(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// A count that was checked to be at least 1, as the `NonZeroU32` the settings hold (any
/// value when the check recorded a problem: the settings are then never used).
pub fn nonzero_u32(value: u64) -> NonZeroU32 {
    NonZeroU32::new(u32::try_from(value).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN)
}

/// Names of streams, rate-limit groups, tokens and endpoints: `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The key of one header in messages; quoted when the name holds characters that would make the
/// dotted path ambiguous.
pub fn header_key(table: &str, name: &str) -> String {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        format!("{table}.{name}")
    } else {
        format!("{table}.{name:?}")
    }
}

/// `name` as a header name, or what was expected.
pub fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        format!("expected a header name of letters, digits and !#$%&'*+-.^_`|~, got {name:?}")
    })
}

/// `value` as a socket address, recording a problem at `key` otherwise; `example` shows what
/// one looks like (`"127.0.0.1:8080"`, quoted).
pub fn socket_address(
    problems: &mut Problems,
    key: &str,
    value: &str,
    example: &str,
) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.push(
                key,
                format!("expected an IP address and port such as {example}, got {value:?}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_pattern() {
        for ok in ["fleet", "a", "A.b_c-1", "9", &"x".repeat(64)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "a b",
            "a/b",
            "é",
            "a:1",
            &"x".repeat(65),
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn sizes_are_shown_exactly_and_as_summaries_show_them() {
        assert_eq!(exact_size(1024), "1 KiB");
        assert_eq!(exact_size(64 << 30), "64 GiB");
        assert_eq!(exact_size(1536), "1536 B");
        assert_eq!(exact_size(0), "0 B");
        let mut problems = Problems::default();
        bytes_in(
            &mut problems,
            "k",
            Some(ByteSize::b(10)),
            0,
            (1 << 20, 64 << 30),
        );
        bytes_in(
            &mut problems,
            "k",
            Some(ByteSize::mib(2)),
            0,
            (1 << 20, 64 << 30),
        );
        bytes_in(&mut problems, "k", None, 0, (1 << 20, 64 << 30));
        let err = problems.finish(None, ()).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(
            err.problems[0].message,
            "expected a size from 1 MiB to 64 GiB (1.0 MiB to 64.0 GiB, or 1048576 to \
             68719476736 bytes), got 10 bytes"
        );
    }
}

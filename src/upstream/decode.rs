//! Decoding upstream bodies into the JSON documents that are snapshotted and diffed.
//!
//! - `json`: any JSON document (an object, a top-level array, a scalar).
//! - `gtfs-rt`: a GTFS-realtime `FeedMessage` protobuf, projected to JSON by [`gtfs_rt`].
//!
//! Bodies arrive already decompressed when the upstream sent `Content-Encoding` (see `fetch`).

pub mod gtfs_rt;

use serde::Deserialize;
use serde_json::Value;

use crate::snapshot::{MAX_DEPTH, deeper_than};

/// How an upstream body is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// A JSON document (object, array or scalar).
    #[default]
    Json,
    /// A GTFS-realtime `FeedMessage` (protobuf), as the JSON projection of [`gtfs_rt`].
    GtfsRt,
}

impl Format {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::GtfsRt => "gtfs-rt",
        }
    }
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is not valid JSON.
    #[error("invalid JSON at line {line}, column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    /// The body is not a GTFS-realtime `FeedMessage`: invalid or truncated protobuf, empty,
    /// or without the header every feed carries.
    #[error("invalid GTFS-realtime feed (expected a protobuf FeedMessage): {reason}")]
    GtfsRt { reason: String },
    /// The document nests deeper than patchwire holds.
    #[error(
        "the document nests deeper than {max} levels of arrays and objects, the most patchwire accepts"
    )]
    TooDeep { max: usize },
    /// The decoder itself failed (a bug); the body is treated as undecodable.
    #[error("the decoder failed: {0}")]
    Panicked(String),
}

/// Decodes `body` according to `format`.
///
/// A document deeper than [`MAX_DEPTH`] is refused whatever its format: serde_json's parser
/// stops there, and the check after decoding covers every other way in.
pub fn decode(format: Format, body: &[u8]) -> Result<Value, DecodeError> {
    let document = match format {
        Format::Json => serde_json::from_slice(body).map_err(|e| {
            if e.to_string().starts_with("recursion limit exceeded") {
                DecodeError::TooDeep { max: MAX_DEPTH }
            } else {
                DecodeError::Json {
                    line: e.line(),
                    column: e.column(),
                    message: format!("{e}{}", json_hint(body)),
                }
            }
        }),
        Format::GtfsRt => gtfs_rt::decode(body),
    }?;
    if deeper_than(&document, MAX_DEPTH) {
        return Err(DecodeError::TooDeep { max: MAX_DEPTH });
    }
    Ok(document)
}

/// Why a body that is not JSON may have been sent, when its first bytes say so.
fn json_hint(body: &[u8]) -> &'static str {
    if body.starts_with(&[0x1f, 0x8b]) {
        "; the body is gzip data sent without `Content-Encoding: gzip`"
    } else if gtfs_rt::decode(body).is_ok() {
        "; the body is a GTFS-realtime protobuf feed: set format = \"gtfs-rt\" for this stream"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_named_as_in_configuration() {
        for format in [Format::Json, Format::GtfsRt] {
            let parsed: Format =
                serde_json::from_value(Value::String(format.as_str().to_owned())).unwrap();
            assert_eq!(parsed, format);
        }
        assert!(serde_json::from_str::<Format>("\"gtfs_rt\"").is_err());
    }

    #[test]
    fn documents_deeper_than_the_bound_are_refused() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(decode(Format::Json, nested(MAX_DEPTH).as_bytes()).is_ok());
        let err = decode(Format::Json, nested(MAX_DEPTH + 1).as_bytes()).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooDeep { max: MAX_DEPTH }),
            "{err:?}"
        );
        let err = decode(Format::Json, nested(5000).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("deeper than 127 levels"), "{err}");
    }

    #[test]
    fn json_accepts_any_top_level_value() {
        assert_eq!(
            decode(Format::Json, b"[1, {\"a\": 2}]").unwrap(),
            serde_json::json!([1, {"a": 2}])
        );
        assert_eq!(decode(Format::Json, b"3").unwrap(), serde_json::json!(3));
    }

    #[test]
    fn json_errors_say_where_and_hint_at_the_likely_cause() {
        let err = decode(Format::Json, b"{\"a\":\n 1,").unwrap_err();
        assert!(matches!(err, DecodeError::Json { line: 2, .. }), "{err:?}");
        let gzip = decode(Format::Json, &[0x1f, 0x8b, 8, 0]).unwrap_err();
        assert!(gzip.to_string().contains("Content-Encoding"), "{gzip}");
        // A minimal FeedMessage: header { gtfs_realtime_version: "2.0" }.
        let feed = [0x0a, 0x05, 0x0a, 0x03, b'2', b'.', b'0'];
        let pb = decode(Format::Json, &feed).unwrap_err();
        assert!(pb.to_string().contains("format = \"gtfs-rt\""), "{pb}");
        let plain = decode(Format::Json, b"nope").unwrap_err();
        assert!(!plain.to_string().contains(';'), "{plain}");
    }
}

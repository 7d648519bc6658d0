//! Decoding upstream bodies into the JSON documents that are snapshotted and diffed.

use serde::Deserialize;
use serde_json::Value;

/// How an upstream body is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// A JSON document (object, array or scalar).
    #[default]
    Json,
}

impl Format {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
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
    /// The decoder itself failed (a bug); the body is treated as undecodable.
    #[error("the decoder failed: {0}")]
    Panicked(String),
}

/// Decodes `body` according to `format`.
pub fn decode(format: Format, body: &[u8]) -> Result<Value, DecodeError> {
    match format {
        Format::Json => serde_json::from_slice(body).map_err(|e| DecodeError::Json {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        }),
    }
}

//! The Streamdata.io signature strategy (`streamdataio-js-sdk-auth`), verified. Pure.
//!
//! The SDK signs the target URL exactly as the application gave it, before any of the proxy's
//! parameters: with the private key decoded from base64 into 72 characters, `beacon` the first
//! 36 and `key` the last 36, and `ts` the client's `Date.now()` in milliseconds,
//!
//! ```text
//! X-Auth-Sd-S = base64(beacon + base64(HMAC-SHA512(key, "GET\n" + ts + "\n" + url + "\n")))
//! ```
//!
//! and appends `X-Auth-Sd-Ts=<ts>&X-Auth-Sd-S=<signature>` (each `encodeURIComponent`ed) to
//! the URL with `?` or `&`; `X-Sd-Header` and `X-Sd-Token` come after. The signed URL is thus
//! the request target before the separator that precedes `X-Auth-Sd-Ts`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha512;

use super::config::SigningKey;

/// The query parameter carrying the signature's timestamp (milliseconds since the epoch).
pub const TIMESTAMP_PARAM: &str = "X-Auth-Sd-Ts";
/// The query parameter carrying the signature.
pub const SIGNATURE_PARAM: &str = "X-Auth-Sd-S";

/// A request's signature, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The URL the client signed.
    pub url: String,
    /// `X-Auth-Sd-Ts`, decoded.
    pub timestamp: String,
    /// `X-Auth-Sd-S`, decoded.
    pub signature: String,
}

/// Why a signature is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The timestamp is not a number of milliseconds.
    #[error("X-Auth-Sd-Ts is not a timestamp in milliseconds since 1970")]
    BadTimestamp,
    /// The timestamp is too far from the server's clock.
    #[error(
        "X-Auth-Sd-Ts is {off_by:?} away from the server's clock, more than the {max:?} allowed \
         (proxy.signature_max_skew): sign each connection afresh, and check the client's clock"
    )]
    Stale {
        /// How far it is, rounded to seconds.
        off_by: Duration,
        /// The bound.
        max: Duration,
    },
    /// The signature does not match.
    #[error("X-Auth-Sd-S does not match the request signed with this token's signing secret")]
    Mismatch,
}

/// The signature of `url` at `timestamp`, as the SDK computes it.
pub fn sign(key: &SigningKey, url: &str, timestamp: &str) -> String {
    // HMAC accepts keys of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<Sha512>::new_from_slice(key.key.as_bytes()) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(format!("GET\n{timestamp}\n{url}\n").as_bytes());
    let inner = STANDARD.encode(mac.finalize().into_bytes());
    STANDARD.encode(format!("{}{inner}", key.beacon))
}

/// Verifies `signed` with `key` at `now_ms` (the server's clock, milliseconds since the epoch).
pub fn verify(
    key: &SigningKey,
    signed: &Signed,
    now_ms: u64,
    max_skew: Duration,
) -> Result<(), SignatureError> {
    let ts: u64 = signed
        .timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let off_by = Duration::from_millis(ts.abs_diff(now_ms));
    if off_by > max_skew {
        return Err(SignatureError::Stale {
            off_by: Duration::from_secs(off_by.as_secs()),
            max: max_skew,
        });
    }
    let expected = sign(key, &signed.url, &signed.timestamp);
    if constant_time_eq(expected.as_bytes(), signed.signature.trim().as_bytes()) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The private key of the SDK's own tests (base64 of two UUIDs, 72 characters).
    const PRIVATE_KEY: &str = "MmIyMzBlZGMtOGYyNi00OGY2LWI2YTYtZmY1OTFlMzY1NjNiYjNhMzc3NWMtMzMwMC00YmMzLWI0NGYtMmM1ZmU4MDAzMGFh";

    fn key() -> SigningKey {
        SigningKey::parse(PRIVATE_KEY).unwrap()
    }

    #[test]
    fn the_key_splits_as_the_sdk_splits_it() {
        let key = key();
        assert_eq!(key.beacon, "2b230edc-8f26-48f6-b6a6-ff591e36563b");
        assert_eq!(key.key, "b3a3775c-3300-4bc3-b44f-2c5fe80030aa");
        assert!(SigningKey::parse("c2hvcnQ=").is_err(), "too short");
        assert!(SigningKey::parse("not base64!").is_err());
    }

    /// Computed independently with Python's `hmac` from the SDK's source (see module docs):
    /// `base64(beacon + base64(hmac.new(key, b"GET\n1700000000000\nhttps://api.example.com/v1/prices?currency=eur\n", sha512).digest()))`.
    #[test]
    fn known_answer() {
        let signature = sign(
            &key(),
            "https://api.example.com/v1/prices?currency=eur",
            "1700000000000",
        );
        assert_eq!(signature, KNOWN_SIGNATURE);
    }

    const KNOWN_SIGNATURE: &str = "MmIyMzBlZGMtOGYyNi00OGY2LWI2YTYtZmY1OTFlMzY1NjNiQ3dxczlVQzViUjhiTG9mNEpGRm5pZU5WdTVaWENTMHhsYjIzWm4wdnFURkZTKy85YmJxWlJvV3pQWXFDbEtXZUFpeW0xdnIwTUVzdFNUOWxWbVkxMmc9PQ==";

    #[test]
    fn verification_checks_the_signature_and_the_clock() {
        let url = "https://api.example.com/v1/prices?currency=eur";
        let now = 1_700_000_000_000u64;
        let signed = |ts: u64| Signed {
            url: url.to_owned(),
            timestamp: ts.to_string(),
            signature: sign(&key(), url, &ts.to_string()),
        };
        let skew = Duration::from_secs(300);
        assert_eq!(verify(&key(), &signed(now - 1000), now, skew), Ok(()));
        assert_eq!(verify(&key(), &signed(now + 299_000), now, skew), Ok(()));
        assert!(matches!(
            verify(&key(), &signed(now - 301_000), now, skew),
            Err(SignatureError::Stale { .. })
        ));
        let mut other_url = signed(now);
        other_url.url.push_str("&currency=usd");
        assert_eq!(
            verify(&key(), &other_url, now, skew),
            Err(SignatureError::Mismatch)
        );
        let mut bad_ts = signed(now);
        bad_ts.timestamp = "yesterday".into();
        assert_eq!(
            verify(&key(), &bad_ts, now, skew),
            Err(SignatureError::BadTimestamp)
        );
    }
}

//! Standard Webhooks signing: `webhook-signature: v1,<base64 HMAC-SHA256(id.timestamp.body)>`,
//! keyed with a `whsec_` secret's decoded bytes, or, for a `whsk_` secret (an ed25519 seed),
//! the asymmetric `v1a,<base64 ed25519 signature of id.timestamp.body>`, which receivers
//! verify with the public key (`whpk_`). Pure functions, tested against the published vectors.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// The prefix of every symmetric secret: `whsec_` followed by the base64 of the key bytes.
pub const SECRET_PREFIX: &str = "whsec_";
/// The prefix of an asymmetric signing key: `whsk_` followed by the base64 of a 32-byte
/// ed25519 seed.
pub const SIGNING_KEY_PREFIX: &str = "whsk_";
/// The prefix of an asymmetric public key: `whpk_` followed by the base64 of its 32 bytes.
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";
/// Bytes of an ed25519 seed.
pub const SEED_BYTES: usize = 32;
/// Key bytes in a generated secret (Svix uses 24; the spec asks for 24 to 64).
pub const GENERATED_KEY_BYTES: usize = 32;
/// Shortest key accepted from a user (the spec's lower bound).
pub const MIN_KEY_BYTES: usize = 24;
/// Longest key accepted from a user (the spec's upper bound).
pub const MAX_KEY_BYTES: usize = 64;

/// Why a secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The text is not `whsec_` + base64.
    #[error(
        "expected a secret of the form \"whsec_<base64>\", got text that is not base64 after the prefix"
    )]
    NotBase64,
    /// The decoded key is too short or too long.
    #[error(
        "expected a secret whose base64 decodes to {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, got {0} bytes"
    )]
    Length(usize),
    /// A `whsk_` key that is not the base64 of a 32-byte ed25519 seed.
    #[error(
        "expected an ed25519 signing key \"whsk_<base64 of 32 bytes>\", got {0} bytes after the prefix"
    )]
    Seed(usize),
}

/// How a secret signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Scheme {
    /// `v1`: HMAC-SHA256 with a shared secret (`whsec_`).
    #[serde(rename = "v1")]
    Symmetric,
    /// `v1a`: ed25519 with a private key (`whsk_`); receivers hold only the public key.
    #[serde(rename = "v1a")]
    Asymmetric,
}

impl Scheme {
    /// `"v1"` or `"v1a"`, as signatures are versioned.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Symmetric => "v1",
            Scheme::Asymmetric => "v1a",
        }
    }
}

/// A signing secret: its text (`whsec_...` or `whsk_...`) and its decoded key. `Debug` hides
/// both.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
    scheme: Scheme,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>` (the prefix is optional, as in the reference libraries), or an
    /// ed25519 signing key `whsk_<base64 of a 32-byte seed>`.
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        if let Some(encoded) = text.trim().strip_prefix(SIGNING_KEY_PREFIX) {
            return Secret::signing_key(encoded);
        }
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let key = STANDARD
            .decode(encoded.trim())
            .map_err(|_| SecretError::NotBase64)?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Secret {
            text: format!("{SECRET_PREFIX}{}", STANDARD.encode(&key)),
            key,
            scheme: Scheme::Symmetric,
        })
    }

    /// An ed25519 signing key from the base64 of its seed.
    fn signing_key(encoded: &str) -> Result<Secret, SecretError> {
        let seed = STANDARD
            .decode(encoded.trim())
            .map_err(|_| SecretError::NotBase64)?;
        if seed.len() != SEED_BYTES {
            return Err(SecretError::Seed(seed.len()));
        }
        Ok(Secret {
            text: format!("{SIGNING_KEY_PREFIX}{}", STANDARD.encode(&seed)),
            key: seed,
            scheme: Scheme::Asymmetric,
        })
    }

    /// Parses a secret without the length bounds (for stored secrets and published vectors).
    pub fn parse_any_length(text: &str) -> Result<Secret, SecretError> {
        if let Some(encoded) = text.trim().strip_prefix(SIGNING_KEY_PREFIX) {
            return Secret::signing_key(encoded);
        }
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let key = STANDARD
            .decode(encoded.trim())
            .map_err(|_| SecretError::NotBase64)?;
        if key.is_empty() {
            return Err(SecretError::Length(0));
        }
        Ok(Secret {
            text: format!("{SECRET_PREFIX}{}", STANDARD.encode(&key)),
            key,
            scheme: Scheme::Symmetric,
        })
    }

    /// A new random secret.
    pub fn generate(rng: &mut impl RngCore) -> Secret {
        let mut key = vec![0u8; GENERATED_KEY_BYTES];
        rng.fill_bytes(&mut key);
        Secret {
            text: format!("{SECRET_PREFIX}{}", STANDARD.encode(&key)),
            key,
            scheme: Scheme::Symmetric,
        }
    }

    /// A new random secret of `scheme`.
    pub fn generate_for(scheme: Scheme, rng: &mut impl RngCore) -> Secret {
        match scheme {
            Scheme::Symmetric => Secret::generate(rng),
            Scheme::Asymmetric => {
                let mut seed = vec![0u8; SEED_BYTES];
                rng.fill_bytes(&mut seed);
                Secret {
                    text: format!("{SIGNING_KEY_PREFIX}{}", STANDARD.encode(&seed)),
                    key: seed,
                    scheme: Scheme::Asymmetric,
                }
            }
        }
    }

    /// How it signs.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The public key receivers verify `v1a` signatures with (`whpk_<base64>`); `None` for a
    /// symmetric secret, which has none to show.
    pub fn public_key(&self) -> Option<String> {
        let pair = self.key_pair()?;
        Some(format!(
            "{PUBLIC_KEY_PREFIX}{}",
            STANDARD.encode(ring::signature::KeyPair::public_key(&pair).as_ref())
        ))
    }

    fn key_pair(&self) -> Option<ring::signature::Ed25519KeyPair> {
        match self.scheme {
            Scheme::Symmetric => None,
            // A 32-byte seed (checked when parsed or generated) always makes a key pair.
            Scheme::Asymmetric => {
                ring::signature::Ed25519KeyPair::from_seed_unchecked(&self.key).ok()
            }
        }
    }

    /// The secret as shown to its owner: `whsec_<base64>`.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, or for a signing key
    /// `v1a,<base64 ed25519 signature of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        if self.scheme == Scheme::Asymmetric {
            let mut signed = Vec::with_capacity(id.len() + body.len() + 24);
            signed.extend_from_slice(id.as_bytes());
            signed.push(b'.');
            signed.extend_from_slice(timestamp.to_string().as_bytes());
            signed.push(b'.');
            signed.extend_from_slice(body);
            return match self.key_pair() {
                Some(pair) => format!("v1a,{}", STANDARD.encode(pair.sign(&signed).as_ref())),
                // Not reachable with a checked seed; an empty signature verifies nowhere.
                None => "v1a,".to_owned(),
            };
        }
        // A key of any length is valid for HMAC, so this cannot fail.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable_hmac(),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cold]
fn unreachable_hmac() -> ! {
    // `Hmac::new_from_slice` only fails for fixed-key-length MACs; HMAC accepts any length.
    unreachable!("HMAC accepts keys of any length")
}

/// The `webhook-signature` header value: one `v1,` signature per secret, space-separated
/// (during a rotation receivers holding either secret can verify).
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a Secret>,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .into_iter()
        .map(|s| s.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The SHA-256 of `bytes` in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new message id: `msg_` + 26 characters of Crockford base32 (a millisecond timestamp then
/// randomness, ULID-style, so ids sort roughly by creation).
pub fn message_id(now_ms: u64, rng: &mut impl RngCore) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let random = (u128::from(rng.next_u64()) << 16) | u128::from(rng.next_u32() & 0xffff);
    let value = (u128::from(now_ms & 0xffff_ffff_ffff) << 80) | random;
    let mut out = String::with_capacity(30);
    out.push_str("msg_");
    for i in (0..26).rev() {
        let index = ((value >> (i * 5)) & 0x1f) as usize;
        out.push(char::from(ALPHABET[index]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// The example published with the Standard Webhooks specification (and Svix's docs).
    #[test]
    fn known_answer_from_the_specification() {
        let secret = Secret::parse_any_length("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("the published secret is base64");
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn the_reference_verifier_accepts_our_signatures_and_rotation_headers() {
        let mut rng = StdRng::seed_from_u64(3);
        let old = Secret::generate(&mut rng);
        let new = Secret::generate(&mut rng);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let body = br#"{"type":"stream.patch","data":[]}"#;
        let id = message_id(1, &mut rng);
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", id.parse().unwrap());
        headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
        let both = signature_header([&new, &old], &id, now, body);
        headers.insert("webhook-signature", both.parse().unwrap());
        for secret in [&old, &new] {
            let verifier = standardwebhooks::Webhook::new(secret.expose()).unwrap();
            verifier.verify(body, &headers).unwrap();
        }
        let stranger = Secret::generate(&mut rng);
        let verifier = standardwebhooks::Webhook::new(stranger.expose()).unwrap();
        assert!(verifier.verify(body, &headers).is_err());
        let tampered = br#"{"type":"stream.patch","data":[1]}"#;
        let verifier = standardwebhooks::Webhook::new(new.expose()).unwrap();
        assert!(verifier.verify(tampered, &headers).is_err());
    }

    #[test]
    fn secrets_are_checked_and_hidden() {
        assert_eq!(Secret::parse("whsec_!!!"), Err(SecretError::NotBase64));
        assert_eq!(Secret::parse("whsec_AAAA"), Err(SecretError::Length(3)));
        let s = Secret::generate(&mut StdRng::seed_from_u64(1));
        assert!(s.expose().starts_with("whsec_"));
        assert_eq!(Secret::parse(s.expose()), Ok(s.clone()));
        // The prefix is optional on input, always present on output.
        let bare = s.expose().trim_start_matches("whsec_");
        assert_eq!(
            Secret::parse(bare).map(|p| p.expose().to_owned()),
            Ok(s.expose().to_owned())
        );
        assert_eq!(format!("{s:?}"), "Secret(<hidden>)");
    }

    #[test]
    fn message_ids_look_like_ulids_and_sort_by_time() {
        let mut rng = StdRng::seed_from_u64(9);
        let a = message_id(1_000, &mut rng);
        let b = message_id(2_000, &mut rng);
        assert_eq!(a.len(), 30);
        assert!(a.starts_with("msg_"));
        assert!(a < b);
        assert_ne!(message_id(1_000, &mut rng), message_id(1_000, &mut rng));
    }

    /// The reference library's asymmetric vector (Standard Webhooks' Go library test): a
    /// `whsk_` seed signs `v1a`, and the public key derived from it is the one receivers use.
    #[test]
    fn ed25519_keys_sign_v1a_as_the_reference_does() {
        let key = Secret::parse("whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=").unwrap();
        assert_eq!(key.scheme(), Scheme::Asymmetric);
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag=="
        );
        let public = key.public_key().unwrap();
        assert!(public.starts_with(PUBLIC_KEY_PREFIX));
        assert_eq!(
            STANDARD
                .decode(&public[PUBLIC_KEY_PREFIX.len()..])
                .unwrap()
                .len(),
            32
        );
        // A symmetric secret has no public key; a seed must be 32 bytes.
        assert!(
            Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .unwrap()
                .public_key()
                .is_none()
        );
        assert_eq!(Secret::parse("whsk_AAAA").err(), Some(SecretError::Seed(3)));
        assert_eq!(Secret::parse("whsk_!!").err(), Some(SecretError::NotBase64));
        let generated = Secret::generate_for(Scheme::Asymmetric, &mut StdRng::seed_from_u64(1));
        assert!(generated.expose().starts_with(SIGNING_KEY_PREFIX));
        assert_eq!(Secret::parse(generated.expose()).unwrap(), generated);
    }

    proptest! {
        /// Our signatures agree with the reference library's for any id, time and body.
        #[test]
        fn agrees_with_the_reference_signer(
            key in proptest::collection::vec(any::<u8>(), 24..64),
            id in "[a-zA-Z0-9_]{1,40}",
            timestamp in 0i64..4_000_000_000,
            body in "\\PC{0,200}",
        ) {
            let text = format!("whsec_{}", STANDARD.encode(&key));
            let ours = Secret::parse(&text).unwrap().sign(&id, timestamp, body.as_bytes());
            let theirs = standardwebhooks::Webhook::new(&text).unwrap()
                .sign(&id, timestamp, body.as_bytes()).unwrap();
            prop_assert_eq!(ours, theirs);
        }

        /// Parsing never panics, and whatever parses round-trips through its text.
        #[test]
        fn parse_is_total(text in "\\PC{0,100}") {
            if let Ok(secret) = Secret::parse(&text) {
                prop_assert_eq!(Secret::parse(secret.expose()), Ok(secret.clone()));
            }
        }
    }
}

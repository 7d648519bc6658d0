//! The opening handshake (RFC 6455 §4.2), pure: whether a request's headers ask for a
//! WebSocket this server speaks, and the headers of the `101 Switching Protocols` answer.

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// The subprotocol a client may ask for (`Sec-WebSocket-Protocol`); echoed when offered.
pub const SUBPROTOCOL: &str = "patchwire.v1";

/// Why a request is not a WebSocket handshake this server accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The HTTP status to answer with.
    pub status: u16,
    /// What is wrong.
    pub message: &'static str,
}

/// The headers of the `101` answer to a valid handshake, or why it is refused.
pub fn accept(headers: &HeaderMap) -> Result<Vec<(HeaderName, HeaderValue)>, Rejected> {
    let has_token = |name: HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(Rejected {
            status: 426,
            message: "GET /ws opens a WebSocket: send `Connection: Upgrade` and \
                      `Upgrade: websocket` (any WebSocket client does)",
        });
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(Rejected {
            status: 426,
            message: "only WebSocket version 13 (RFC 6455) is spoken: send \
                      `Sec-WebSocket-Version: 13`",
        });
    }
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| is_valid_key(k.as_bytes()))
    else {
        return Err(Rejected {
            status: 400,
            message: "`Sec-WebSocket-Key` must be the base64 of 16 bytes",
        });
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut answer = vec![
        (header::UPGRADE, HeaderValue::from_static("websocket")),
        (header::CONNECTION, HeaderValue::from_static("Upgrade")),
    ];
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        answer.push((header::SEC_WEBSOCKET_ACCEPT, accept));
    }
    if has_token(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL) {
        answer.push((
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        ));
    }
    Ok(answer)
}

/// A key is 24 characters of base64 (16 bytes): 22 of the alphabet and `==`.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn answers_the_rfc_example_and_refuses_what_is_not_a_handshake() {
        let mut valid = vec![
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        let answer = accept(&request(&valid)).unwrap();
        assert!(answer.contains(&(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        )));
        assert!(
            !answer
                .iter()
                .any(|(n, _)| n == header::SEC_WEBSOCKET_PROTOCOL)
        );
        valid.push(("sec-websocket-protocol", "other, patchwire.v1"));
        let answer = accept(&request(&valid)).unwrap();
        assert!(answer.contains(&(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL)
        )));
        assert_eq!(accept(&request(&valid[1..])).unwrap_err().status, 426);
        let mut old = valid.clone();
        old[2] = ("sec-websocket-version", "8");
        assert_eq!(accept(&request(&old)).unwrap_err().status, 426);
        let mut bad_key = valid.clone();
        bad_key[3] = ("sec-websocket-key", "short");
        assert_eq!(accept(&request(&bad_key)).unwrap_err().status, 400);
    }
}

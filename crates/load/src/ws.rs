//! WebSocket mode (pure): the opening handshake's request and the client's masked text frames
//! (RFC 6455 §5.2-5.3). The server's frames are not parsed: they are scanned for markers like
//! an SSE body, since a server's text frame is its header then the message, unmasked.

/// The request head that opens a WebSocket on `path` (answered `101`).
pub fn handshake_request(path: &str, authority: &str, headers: &[(String, String)]) -> String {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// `payload` as one final text frame from a client, masked with `mask`.
pub fn text_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x81);
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_the_rfc_example_and_long_messages() {
        // RFC 6455 §5.7: a masked "Hello".
        assert_eq!(
            text_frame(b"Hello", [0x37, 0xfa, 0x21, 0x3d]),
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        let long = text_frame(&[b'x'; 300], [0; 4]);
        assert_eq!(&long[..4], [0x81, 0xfe, 0x01, 0x2c]);
        assert_eq!(long.len(), 4 + 4 + 300);
        let request = handshake_request("/ws", "127.0.0.1:1", &[("X-A".into(), "b".into())]);
        assert!(request.starts_with("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUpgrade: websocket"));
        assert!(request.ends_with("X-A: b\r\n\r\n"));
    }
}

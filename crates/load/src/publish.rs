//! Publishing one change: a POST over a fresh connection (as ssebench does), and its status.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::args::PublishPlan;
use super::http;

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The connection or the exchange failed.
    #[error("publishing to {target}: {source}")]
    Io {
        /// Where.
        target: SocketAddr,
        /// What happened.
        source: std::io::Error,
    },
    /// The response was not HTTP.
    #[error("publishing to {target}: {source}")]
    Http {
        /// Where.
        target: SocketAddr,
        /// What was wrong.
        source: http::HttpError,
    },
    /// The server refused the change.
    #[error("publishing to {target}: HTTP {status}: {body}")]
    Status {
        /// Where.
        target: SocketAddr,
        /// The status.
        status: u16,
        /// The start of the response body.
        body: String,
    },
}

/// The complete request publishing `body`.
pub fn request(plan: &PublishPlan, body: &str) -> Vec<u8> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        plan.endpoint.path,
        plan.endpoint.authority(),
        body.len()
    );
    for (name, value) in &plan.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body.as_bytes());
    request
}

/// Sends `request` and reads the response; 2xx is success.
pub async fn publish(target: SocketAddr, request: &[u8]) -> Result<u16, PublishError> {
    let io = |source| PublishError::Io { target, source };
    let mut stream = TcpStream::connect(target).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream.write_all(request).await.map_err(io)?;
    let mut response = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed before a response",
            )));
        }
        response.extend_from_slice(&chunk[..n]);
        if let Some(len) = http::head_len(&response) {
            break len;
        }
        if response.len() > http::MAX_HEAD {
            return Err(PublishError::Http {
                target,
                source: http::HttpError::HeadTooLong(http::MAX_HEAD),
            });
        }
    };
    let head = http::parse_head(&response[..head_len])
        .map_err(|source| PublishError::Http { target, source })?;
    if (200..300).contains(&head.status) {
        return Ok(head.status);
    }
    // Read a little of the body to explain the refusal.
    while response.len() < head_len + 512 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
    }
    let end = response.len().min(head_len + 512);
    Err(PublishError::Status {
        target,
        status: head.status,
        body: String::from_utf8_lossy(&response[head_len..end])
            .trim()
            .to_owned(),
    })
}

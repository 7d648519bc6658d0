//! A subscriber on a raw socket: the test decides when (and whether) it reads, and its receive
//! buffer is small, so the server's writes back up after little data, as with a real client
//! on a slow or stuck network.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use super::sse::SseClient;

/// An HTTP/1.0 `GET` sent on a socket nobody has read from yet. HTTP/1.0 makes the server
/// delimit the streamed body by closing the connection, so the bytes after the head are the
/// SSE stream itself.
pub struct RawSubscriber {
    socket: TcpStream,
}

/// How a raw read to the end finished.
#[derive(Debug)]
pub struct Drained {
    /// Bytes read.
    #[expect(dead_code, reason = "read through Debug, in failure messages")]
    pub bytes: usize,
    /// `true` if the server closed the connection (EOF or reset) before the deadline.
    pub closed: bool,
}

impl RawSubscriber {
    /// Connects with a receive buffer of `rcvbuf` bytes and sends the request.
    pub async fn connect(addr: SocketAddr, path: &str, rcvbuf: usize) -> RawSubscriber {
        let socket = TcpSocket::new_v4().unwrap();
        // Set before connecting so the window is small from the handshake on (and Linux's
        // receive-buffer autotuning is off for this socket).
        socket.set_recv_buffer_size(rcvbuf as u32).unwrap();
        let mut socket = socket.connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        RawSubscriber { socket }
    }

    /// Reads until the bytes read contain `needle` (returning them all), panicking if the
    /// connection ends first or `timeout` passes.
    pub async fn read_until(&mut self, needle: &[u8], timeout: Duration) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut read = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while !read.windows(needle.len()).any(|w| w == needle) {
            let n = tokio::time::timeout_at(deadline, self.socket.read(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {:?} within {timeout:?} in:\n{}",
                        String::from_utf8_lossy(needle),
                        String::from_utf8_lossy(&read)
                    )
                })
                .unwrap();
            assert!(
                n > 0,
                "the connection ended: {}",
                String::from_utf8_lossy(&read)
            );
            read.extend_from_slice(&buf[..n]);
        }
        read
    }

    /// Reads (and discards) until the server closes the connection or `timeout` passes.
    pub async fn drain(mut self, timeout: Duration) -> Drained {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 64 * 1024];
        let mut bytes = 0;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return Drained {
                        bytes,
                        closed: true,
                    };
                }
                Ok(Ok(n)) => bytes += n,
                Err(_) => {
                    return Drained {
                        bytes,
                        closed: false,
                    };
                }
            }
        }
    }

    /// Starts reading: parses the response head and returns an SSE client over the rest.
    pub async fn into_sse(mut self, timeout: Duration) -> SseClient {
        let mut head = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let end = loop {
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = tokio::time::timeout(timeout, self.socket.read(&mut buf))
                .await
                .expect("no response head in time")
                .unwrap();
            assert!(n > 0, "the connection closed before the response head");
            head.extend_from_slice(&buf[..n]);
        };
        let text = String::from_utf8_lossy(&head[..end]).into_owned();
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = HeaderMap::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').unwrap();
            headers.append(
                http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                value.trim().parse().unwrap(),
            );
        }
        // Hand the parser whole events: fed the small reads of a small receive buffer, it
        // would rescan a large event's growing prefix at every read.
        let reader = EventReader {
            socket: self.socket,
            pending: head[end..].to_vec(),
            scanned: 0,
        };
        let body = futures_util::stream::unfold(Some(reader), |reader| async move {
            let mut reader = reader?;
            let (item, more) = reader.next_events().await;
            Some((item, more.then_some(reader)))
        });
        SseClient::from_body(StatusCode::from_u16(status).unwrap(), headers, body)
    }
}

/// Reads a close-delimited SSE body and yields it cut after complete events.
struct EventReader {
    socket: TcpStream,
    pending: Vec<u8>,
    /// How much of `pending` is known to hold no event boundary.
    scanned: usize,
}

impl EventReader {
    /// The next run of complete events (or the rest at EOF), and whether more may follow.
    async fn next_events(&mut self) -> (std::io::Result<Bytes>, bool) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let from = self.scanned.saturating_sub(1);
            if let Some(at) = self.pending[from..].windows(2).rposition(|w| w == b"\n\n") {
                let cut = from + at + 2;
                let rest = self.pending.split_off(cut);
                let events = std::mem::replace(&mut self.pending, rest);
                self.scanned = 0;
                return (Ok(Bytes::from(events)), true);
            }
            self.scanned = self.pending.len();
            match self.socket.read(&mut buf).await {
                Ok(0) => return (Ok(Bytes::from(std::mem::take(&mut self.pending))), false),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) => return (Err(e), false),
            }
        }
    }
}

/// A plain connection on which a test writes exactly the bytes it wants (a partial body, an
/// HTTP/2 preface) and reads what comes back.
pub struct RawConnection {
    socket: TcpStream,
    read: Vec<u8>,
}

impl RawConnection {
    /// Connects to `addr`.
    pub async fn open(addr: SocketAddr) -> RawConnection {
        RawConnection {
            socket: TcpStream::connect(addr).await.unwrap(),
            read: Vec::new(),
        }
    }

    /// Writes `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.unwrap();
    }

    /// Everything read so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.read).into_owned()
    }

    /// Reads until everything read contains `needle` (returning it as text), panicking if the
    /// connection ends first or `timeout` passes.
    pub async fn read_until(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 16 * 1024];
        while !self.text().contains(needle) {
            let n = tokio::time::timeout_at(deadline, self.socket.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} within {timeout:?} in:\n{}", self.text()))
                .unwrap_or(0);
            assert!(
                n > 0,
                "the connection ended before {needle:?}:\n{}",
                self.text()
            );
            self.read.extend_from_slice(&buf[..n]);
        }
        self.text()
    }

    /// Reads until the server closes the connection (EOF or reset): everything read as text,
    /// or `None` if it was still open after `timeout`.
    pub async fn read_to_close(&mut self, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.socket.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(self.text()),
                Ok(Ok(n)) => self.read.extend_from_slice(&buf[..n]),
                Err(_) => return None,
            }
        }
    }
}

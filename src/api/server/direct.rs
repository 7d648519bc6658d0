//! The direct path: a connection's first HTTP/1.x request, when it is a subscription, served
//! straight on the socket.
//!
//! The accept loop reads the request head itself (`head.rs`); when the subscription decision
//! (`api::subscribe`) takes the request, its answer is written here: the response head, then
//! the shared bytes of every event as they are, the body delimited by the connection's close
//! (or a whole refusal). Everything else goes to hyper.
//!
//! Why: a long-lived SSE response through hyper keeps hyper's per-connection buffers (an 8 KB
//! read buffer, a write queue) and frames every event as a chunk; here a subscriber is its
//! socket, a `Writer` and a small task, and an event costs one `write` of bytes shared by all
//! subscribers. A write that would block falls back to waiting for writability, bounded by the
//! stall timeout, so only a slow subscriber ever arms a timer.

use std::io;
use std::time::Duration;

use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use super::head::{response_head, switching_protocols};
use crate::api::subscribe::{Answer, Subscribe};
use crate::sinks::sse::Writer;

/// How long the direct path lets a socket refuse writes, and where it counts the connections
/// it closed for that.
#[derive(Clone)]
pub struct Stall {
    /// A write refused this long closes the connection.
    pub timeout: Duration,
    /// Counts connections closed for stalling.
    pub stalled: Counter,
}

impl Stall {
    /// Serves a subscription until the stream ends, the client leaves, or the client stops
    /// reading for the stall timeout.
    pub async fn serve(&self, socket: TcpStream, subscribe: Subscribe) {
        let Subscribe {
            headers,
            subscription,
            options,
            hold: _hold,
        } = subscribe;
        let head = response_head(StatusCode::OK, &headers, None);
        let mut writer = Writer::new(subscription, options);
        if self.send(&socket, &head).await.is_err() {
            return;
        }
        loop {
            while let Some(bytes) = writer.pop() {
                if self.send(&socket, &bytes).await.is_err() {
                    return;
                }
            }
            if writer.is_finished() {
                return;
            }
            tokio::select! {
                () = writer.next_live() => {}
                () = client_gone(&socket) => return,
            }
        }
    }

    /// Writes the `101 Switching Protocols` head of an accepted WebSocket handshake.
    pub async fn switch(
        &self,
        socket: &TcpStream,
        headers: &[(http::HeaderName, http::HeaderValue)],
    ) -> io::Result<()> {
        self.send(socket, &switching_protocols(headers)).await
    }

    /// Writes a whole answer; the connection then closes.
    pub async fn answer(&self, socket: TcpStream, answer: Answer) {
        let mut response = response_head(answer.status, &answer.headers, Some(answer.body.len()));
        response.extend_from_slice(&answer.body);
        if let Err(error) = self.send(&socket, &response).await {
            tracing::debug!(%error, "could not send an answer");
        }
    }

    /// Writes all of `bytes`: at once when the socket takes them (the common case, no timer),
    /// else waiting for writability, closing the connection if writes stay refused for the
    /// stall timeout.
    async fn send(&self, socket: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
        loop {
            match socket.try_write(bytes) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match tokio::time::timeout(self.timeout, socket.writable()).await {
                Ok(ready) => ready?,
                Err(_) => {
                    self.stalled.inc();
                    tracing::info!(
                        peer = ?socket.peer_addr().ok(),
                        timeout = ?self.timeout,
                        "closing a subscriber that stopped reading"
                    );
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
        }
    }
}

/// Resolves when the client closed its side (or the socket failed). Bytes the client sends
/// after its request are read and ignored.
async fn client_gone(socket: &TcpStream) {
    let mut sink = [0u8; 256];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        match socket.try_read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

//! The stall watchdog of hyper connections: a socket wrapper notes when writes start being
//! refused, and a watchdog resolves once they have been refused for the stall timeout.
//!
//! It costs nothing while a connection drains: the watchdog sleeps on a `Notify` that the
//! wrapper signals only when a write first returns `Pending`, and the stall clears as soon as
//! a write succeeds again.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Shared between a socket wrapper and its watchdog.
struct StallState {
    start: Instant,
    /// Milliseconds since `start` at which writes began to be refused, plus one; 0 = flowing.
    since: AtomicU64,
    began: Notify,
}

impl StallState {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }
}

/// A TCP stream that records when writes stop going through.
pub(super) struct Watched {
    inner: TcpStream,
    state: Arc<StallState>,
}

/// The watchdog side of a `Watched` socket.
pub(super) struct Watch {
    state: Arc<StallState>,
}

impl Watched {
    pub(super) fn new(inner: TcpStream) -> (Self, Watch) {
        let state = Arc::new(StallState {
            start: Instant::now(),
            since: AtomicU64::new(0),
            began: Notify::new(),
        });
        (
            Watched {
                inner,
                state: state.clone(),
            },
            Watch { state },
        )
    }

    fn note<T>(&self, poll: &Poll<T>) {
        match poll {
            Poll::Pending => {
                if self.state.since.load(Ordering::Relaxed) == 0 {
                    self.state.since.store(self.state.now(), Ordering::Relaxed);
                    self.state.began.notify_one();
                }
            }
            Poll::Ready(_) => {
                if self.state.since.load(Ordering::Relaxed) != 0 {
                    self.state.since.store(0, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Watch {
    /// Resolves once writes have been refused continuously for `timeout`.
    pub(super) async fn stalled_for(self, timeout: Duration) {
        let timeout_ms = timeout.as_millis() as u64;
        loop {
            self.state.began.notified().await;
            loop {
                let since = self.state.since.load(Ordering::Relaxed);
                if since == 0 {
                    break;
                }
                let elapsed = self.state.now().saturating_sub(since);
                if elapsed >= timeout_ms {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(timeout_ms - elapsed)).await;
            }
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

//! The accept loop: hyper connections with TCP_NODELAY, graceful shutdown, and a watchdog
//! that closes connections whose socket refuses writes for too long (stalled subscribers).
//!
//! The watchdog costs nothing while a connection drains: it sleeps on a `Notify` that the
//! socket wrapper signals only when a write first returns `Pending`, and the stall clears as
//! soon as a write succeeds again.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::Service;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// A connection whose socket refuses writes this long is closed.
    pub stall_timeout: Duration,
    /// How long shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then waits up to the grace
/// period for connections to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    stalled: Counter,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // SSE responses are long; a client that goes away is noticed by failed writes, and
    // idle keep-alive connections are closed at shutdown by the graceful watcher.
    builder.http1().timer(hyper_util::rt::TokioTimer::new());
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE: back off a little instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, %peer, "could not set TCP_NODELAY");
        }
        let (io, watch) = Watched::new(tcp);
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let mut router = router.clone();
            router.call(request)
        });
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let stalled = stalled.clone();
        let stall_timeout = options.stall_timeout;
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, error = %error, "connection ended with an error");
                    }
                }
                () = watch.stalled_for(stall_timeout) => {
                    stalled.inc();
                    tracing::info!(%peer, timeout = ?stall_timeout, "closing a connection that stopped reading");
                }
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(options.shutdown_grace) => {
            tracing::warn!(grace = ?options.shutdown_grace, "connections still open after the shutdown grace period");
        }
    }
}

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
struct Watched {
    inner: TcpStream,
    state: Arc<StallState>,
}

/// The watchdog side of a `Watched` socket.
struct Watch {
    state: Arc<StallState>,
}

impl Watched {
    fn new(inner: TcpStream) -> (Self, Watch) {
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
    async fn stalled_for(self, timeout: Duration) {
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

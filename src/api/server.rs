//! The accept loop: reads each connection's request head, serves SSE subscriptions natively
//! (`sinks::sse::native`) and hands everything else to hyper (with the bytes already read
//! replayed), with TCP_NODELAY, graceful shutdown, and a watchdog that closes hyper
//! connections whose socket refuses writes for too long (stalled subscribers).
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
use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio_util::task::TaskTracker;

use crate::sinks::sse::native::{Dynamic, Head, NativeSse, parse_head};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::Service;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// How long shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
}

/// How long a connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Past this many bytes without a complete head, the connection is hyper's to judge.
const MAX_NATIVE_HEAD: usize = 16 * 1024;

/// Serves on `listener` until `shutdown` is cancelled: SSE subscriptions natively, every
/// other request through `router`; then waits up to the grace period for connections to end.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    native: Arc<NativeSse>,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new());
    let builder = Arc::new(builder);
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
        let connection = Connection {
            router: router.clone(),
            native: native.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            shutdown: shutdown.clone(),
        };
        connections.spawn(connection.run(tcp, peer));
    }
    drop(listener);
    connections.close();
    let drained = async {
        graceful.shutdown().await;
        connections.wait().await;
    };
    if tokio::time::timeout(options.shutdown_grace, drained)
        .await
        .is_err()
    {
        tracing::warn!(grace = ?options.shutdown_grace, "connections still open after the shutdown grace period");
    }
}

/// One accepted connection and what it needs to be served.
struct Connection {
    router: Router,
    native: Arc<NativeSse>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, tcp: TcpStream, peer: std::net::SocketAddr) {
        let read = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            read = tokio::time::timeout(HEAD_TIMEOUT, read_head(&tcp)) => read,
        };
        let prefix = match read {
            Ok(Ok(prefix)) => prefix,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "connection failed before its request");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no request head within {HEAD_TIMEOUT:?}");
                return;
            }
        };
        if prefix.is_empty() {
            return;
        }
        let head = parse_head(&prefix);
        if let Some(accepted) = self.native.accept(&head) {
            self.native.serve(tcp, accepted).await;
            return;
        }
        match self.native.accept_dynamic(&head).await {
            Some(Dynamic::Accepted(accepted)) => {
                self.native.serve(tcp, accepted).await;
                return;
            }
            Some(Dynamic::Refused(response)) => {
                self.native.refuse(tcp, response).await;
                return;
            }
            None => {}
        }
        let (io, watch) = Watched::new(tcp);
        let io = Rewind::new(prefix.freeze(), io);
        let router = self.router;
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let mut router = router.clone();
            router.call(request)
        });
        let connection = self
            .builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let connection = self.watcher.watch(connection);
        tokio::select! {
            result = connection => {
                if let Err(error) = result {
                    tracing::debug!(%peer, error = %error, "connection ended with an error");
                }
            }
            () = watch.stalled_for(self.native.stall_timeout) => {
                self.native.stalled.inc();
                tracing::info!(%peer, timeout = ?self.native.stall_timeout, "closing a connection that stopped reading");
            }
        }
    }
}

/// Reads until a complete request head (or something that is not one, or enough bytes that
/// hyper should judge) has arrived; returns everything read. Empty: the peer closed first.
async fn read_head(tcp: &TcpStream) -> io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        tcp.readable().await?;
        let spare = buf.capacity() - buf.len();
        if spare < 512 {
            buf.reserve(1024);
        }
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => return Ok(buf),
            Ok(_) => {
                if buf.len() >= MAX_NATIVE_HEAD || !matches!(parse_head(&buf), Head::Partial) {
                    return Ok(buf);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// A socket whose first reads replay bytes already read from it.
struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

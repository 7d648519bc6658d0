//! Requests in flight on a hyper connection, so that a connection without any is closed
//! after `header_timeout` (before its first request) or `idle_timeout` (after).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use tokio::sync::Notify;

/// The requests in flight on one hyper connection, so that one without any can be closed.
#[derive(Default)]
pub(super) struct Activity {
    in_flight: AtomicUsize,
    /// Whether a request has started: until then the connection is bounded by
    /// `header_timeout`, after by `idle_timeout`.
    started: AtomicBool,
    changed: Notify,
}

impl Activity {
    /// Resolves once the connection has had no request in flight for `first` (before its
    /// first request) or `idle` (after it).
    pub(super) async fn idle_for(&self, first: Duration, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let limit = if self.started.load(Ordering::Acquire) {
                idle
            } else {
                first
            };
            if tokio::time::timeout(limit, changed).await.is_err() {
                return;
            }
        }
    }
}

/// One request in flight, from the service call until its response body is dropped.
pub(super) struct InFlight(Arc<Activity>);

impl InFlight {
    /// A request starts on the connection `activity` tracks.
    pub(super) fn start(activity: Arc<Activity>) -> Self {
        activity.started.store(true, Ordering::Release);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.changed.notify_waiters();
        InFlight(activity)
    }

    /// `body`, keeping this request in flight until it is dropped.
    pub(super) fn track(self, body: Body) -> Body {
        Body::new(TrackedBody {
            body,
            _in_flight: self,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct TrackedBody {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

//! The hub: every stream's state, its changes, and the fan-out to subscribers.
//!
//! A [`Stream`] owns its sequence counter, a bounded history of recent [`Change`]s and a
//! broadcast channel. Publishing a document diffs it against the current snapshot, turns the
//! result into one `Change` serialized once, and sends an `Arc` of it to every subscriber.
//! Subscribing takes the current snapshot (or the missed changes, when resuming) and a receiver
//! under the same lock the publisher holds, so no change falls between the two.
//!
//! A view's stream is kept lazily ([`Stream::lazy`]): its changes are computed by its views
//! and appended as they are, and its document is built by a [`Materialize`] only when someone
//! needs it (a new subscriber, the JSON endpoint, a resync).

mod stream;

pub use crate::wire::ChangeKind;
pub use stream::{
    Change, ChangesAfter, Delivered, Demand, Derivation, Diverged, EventId, Initial, Materialize,
    Preparation, Prepared, Publication, Recovery, Resume, Stream, StreamEvent, StreamOptions,
    Subscription, UpstreamFailure,
};

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// All streams known to this process, by name.
#[derive(Default)]
pub struct Hub {
    streams: RwLock<BTreeMap<Arc<str>, Arc<Stream>>>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a stream; returns the existing one instead if the name is taken.
    pub fn insert(&self, stream: Arc<Stream>) -> Arc<Stream> {
        let mut streams = self.streams.write().unwrap_or_else(|e| e.into_inner());
        streams.entry(stream.name_arc()).or_insert(stream).clone()
    }

    /// The stream called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Stream>> {
        let streams = self.streams.read().unwrap_or_else(|e| e.into_inner());
        streams.get(name).cloned()
    }

    /// Every stream, ordered by name.
    pub fn all(&self) -> Vec<Arc<Stream>> {
        let streams = self.streams.read().unwrap_or_else(|e| e.into_inner());
        streams.values().cloned().collect()
    }

    /// Takes stream `name` out of the hub (a reload removed it); returns it, for its caller
    /// to end.
    pub fn remove(&self, name: &str) -> Option<Arc<Stream>> {
        let mut streams = self.streams.write().unwrap_or_else(|e| e.into_inner());
        streams.remove(name)
    }

    /// Ends every stream's subscriptions (used at shutdown).
    pub fn close_all(&self) {
        for stream in self.all() {
            stream.close();
        }
    }
}

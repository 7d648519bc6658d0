//! Snapshots: the latest document of each stream, serialized once, and the store that keeps them.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use moka::sync::Cache;
use serde_json::Value;

use crate::sinks::sse::EncodedEvent;

/// One version of a stream's document.
///
/// The JSON bytes are produced once, when the snapshot is created, and shared by every reader
/// (SSE subscribers, `Accept: application/json` clients, webhooks).
#[derive(Debug)]
pub struct Snapshot {
    /// The stream's sequence number at which this document became current.
    pub seq: u64,
    /// The decoded document.
    pub document: Value,
    /// `document` as compact JSON.
    pub json: Bytes,
    /// When this document was published.
    pub at: SystemTime,
    /// This snapshot as an SSE `snapshot` event, built on first use and then shared.
    pub sse: OnceLock<EncodedEvent>,
}

impl Snapshot {
    /// Creates a snapshot, serializing `document` once.
    pub fn new(seq: u64, document: Value) -> Self {
        // Serializing a `serde_json::Value` into memory cannot fail (its keys are strings).
        let json = Bytes::from(serde_json::to_vec(&document).unwrap_or_default());
        Snapshot {
            seq,
            document,
            json,
            at: SystemTime::now(),
            sse: OnceLock::new(),
        }
    }
}

/// The latest snapshot of every stream, weighed by JSON bytes.
///
/// Backed by moka. Configured streams are never evicted (a subscriber must always find a base
/// document); the weigher makes the total snapshot memory observable (`weighted_bytes`, exported
/// as `patchwire_stored_snapshots_bytes`).
#[derive(Clone)]
pub struct SnapshotStore {
    cache: Cache<Arc<str>, Arc<Snapshot>>,
}

impl SnapshotStore {
    /// An empty store.
    pub fn new() -> Self {
        let cache = Cache::builder()
            .weigher(|_name: &Arc<str>, snapshot: &Arc<Snapshot>| {
                u32::try_from(snapshot.json.len()).unwrap_or(u32::MAX)
            })
            .build();
        SnapshotStore { cache }
    }

    /// The latest snapshot of `stream`, if it has one.
    pub fn get(&self, stream: &str) -> Option<Arc<Snapshot>> {
        self.cache.get(stream)
    }

    /// Makes `snapshot` the latest of `stream`.
    pub fn insert(&self, stream: Arc<str>, snapshot: Arc<Snapshot>) {
        self.cache.insert(stream, snapshot);
    }

    /// Total JSON bytes of the stored snapshots (approximate: moka updates it lazily).
    pub fn weighted_bytes(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }

    /// Forgets `stream`'s snapshot.
    pub fn remove(&self, stream: &str) {
        self.cache.invalidate(stream);
    }
}

impl Default for SnapshotStore {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn snapshot_serializes_once_compactly() {
        let s = Snapshot::new(3, json!({"a": [1, 2], "b": "x\ny"}));
        assert_eq!(&s.json[..], br#"{"a":[1,2],"b":"x\ny"}"#);
        assert_eq!(s.seq, 3);
    }

    #[test]
    fn store_returns_latest() {
        let store = SnapshotStore::new();
        let name: Arc<str> = Arc::from("s");
        store.insert(name.clone(), Arc::new(Snapshot::new(1, json!(1))));
        store.insert(name.clone(), Arc::new(Snapshot::new(2, json!(2))));
        assert_eq!(store.get("s").map(|s| s.seq), Some(2));
        store.remove("s");
        assert!(store.get("s").is_none());
    }
}

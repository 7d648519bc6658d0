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
    /// This snapshot as a Streamdata.io `data` event, built on first use and then shared.
    pub streamdata: [OnceLock<EncodedEvent>; 2],
    /// `json` gzip-compressed for `Accept-Encoding: gzip` clients, built on first use and then
    /// shared.
    gzip: OnceLock<Bytes>,
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
            streamdata: [OnceLock::new(), OnceLock::new()],
            gzip: OnceLock::new(),
        }
    }

    /// `json` as a gzip member, compressed once per snapshot whatever the number of readers.
    pub fn json_gzip(&self) -> &Bytes {
        self.gzip.get_or_init(|| {
            use std::io::Write as _;
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(self.json.len() / 4 + 64),
                flate2::Compression::default(),
            );
            // Writing into a `Vec` cannot fail.
            let compressed = encoder
                .write_all(&self.json)
                .and_then(|()| encoder.finish())
                .unwrap_or_default();
            Bytes::from(compressed)
        })
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

    /// A store holding at most `max_bytes` of JSON. When a new snapshot does not fit, the least
    /// recently used ones are evicted and `on_evict` is called with their stream names (from
    /// the thread that inserted, possibly under the stream's lock: it must only hand the name
    /// on, never lock a stream itself).
    pub fn bounded(max_bytes: u64, on_evict: impl Fn(Arc<str>) + Send + Sync + 'static) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_name: &Arc<str>, snapshot: &Arc<Snapshot>| {
                u32::try_from(snapshot.json.len()).unwrap_or(u32::MAX)
            })
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(move |name: Arc<Arc<str>>, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    on_evict(Arc::clone(&name));
                }
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

    #[test]
    fn a_bounded_store_evicts_the_least_recently_used_and_says_so() {
        let evicted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = evicted.clone();
        let store = SnapshotStore::bounded(100, move |name| seen.lock().unwrap().push(name));
        let doc = |n: usize| Arc::new(Snapshot::new(1, json!("x".repeat(n))));
        store.insert(Arc::from("a"), doc(40));
        store.insert(Arc::from("b"), doc(40));
        store.cache.run_pending_tasks();
        store.get("a");
        store.insert(Arc::from("c"), doc(40));
        store.cache.run_pending_tasks();
        assert!(store.weighted_bytes() <= 100);
        assert_eq!(evicted.lock().unwrap().as_slice(), [Arc::<str>::from("b")]);
        store.remove("a");
        store.cache.run_pending_tasks();
        assert_eq!(
            evicted.lock().unwrap().len(),
            1,
            "explicit removals are not evictions"
        );
    }
}

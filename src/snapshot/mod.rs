//! Snapshots: the latest document of each stream, serialized once, and the store that keeps them.

use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use moka::sync::Cache;
use serde_json::Value;

use crate::wire::Frames;

/// The deepest nesting of arrays and objects a document may have (a scalar is at depth 0,
/// `[]` at 1, `[[1]]` at 2): the most serde_json parses, so every document patchwire holds can
/// be read back by itself and by subscribers' parsers. Every way in is checked (a push body, the
/// result of a `PATCH`, an upstream body of either format), so the recursive walks over a
/// document (diff, serialize, drop) never go deeper than this.
pub const MAX_DEPTH: usize = 127;

/// Whether `document` nests deeper than `max` levels. Iterative, so it is safe on any input,
/// and it stops at the first path that is too deep.
pub fn deeper_than(document: &Value, max: usize) -> bool {
    let mut pending: Vec<(&Value, usize)> = vec![(document, 0)];
    while let Some((value, depth)) = pending.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        if depth + 1 > max {
            return true;
        }
        pending.extend(children.map(|child| (child, depth + 1)));
    }
    false
}

/// `document` as compact JSON, the bytes every reader of a snapshot shares.
pub fn to_json(document: &Value) -> Bytes {
    // Serializing a `serde_json::Value` into memory cannot fail (its keys are strings).
    Bytes::from(serde_json::to_vec(document).unwrap_or_default())
}

/// [`to_json`], and where each element of the array at `entities` (object keys from the
/// root; none asked: `None`), if there is one, lies in that JSON: the same bytes, written the
/// same way, so each element's range holds exactly its own compact JSON.
pub fn to_json_marking(
    document: &Value,
    entities: Option<&[String]>,
) -> (Bytes, Option<Vec<Range<usize>>>) {
    let Some(entities) = entities else {
        return (to_json(document), None);
    };
    let mut out = Vec::new();
    let mut spans = None;
    write_marking(&mut out, document, entities, &mut spans);
    (Bytes::from(out), spans)
}

fn write_marking(
    out: &mut Vec<u8>,
    value: &Value,
    path: &[String],
    spans: &mut Option<Vec<Range<usize>>>,
) {
    // Writing a `serde_json::Value` (or a string) into memory cannot fail.
    match (path.split_first(), value) {
        (None, Value::Array(items)) => {
            let mut found = Vec::with_capacity(items.len());
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let start = out.len();
                let _ = serde_json::to_writer(&mut *out, item);
                found.push(start..out.len());
            }
            out.push(b']');
            *spans = Some(found);
        }
        (Some((first, rest)), Value::Object(map)) => {
            out.push(b'{');
            for (i, (key, member)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, key);
                out.push(b':');
                if key == first {
                    write_marking(out, member, rest, spans);
                } else {
                    let _ = serde_json::to_writer(&mut *out, member);
                }
            }
            out.push(b'}');
        }
        _ => {
            let _ = serde_json::to_writer(&mut *out, value);
        }
    }
}

/// One version of a stream's document.
///
/// The JSON bytes are produced once, when the snapshot is created, and shared by every reader
/// (SSE subscribers, `Accept: application/json` clients, webhooks).
#[derive(Debug)]
pub struct Snapshot {
    /// The stream's epoch when this document became current.
    pub epoch: u64,
    /// The stream's sequence number at which this document became current.
    pub seq: u64,
    /// The decoded document.
    pub document: Value,
    /// `document` as compact JSON.
    pub json: Bytes,
    /// When this document was published.
    pub at: SystemTime,
    /// This snapshot as an event in each dialect, framed by the SSE sink on first use and then
    /// shared; the snapshot change that published it shares them (they are the same event).
    pub frames: Arc<Frames>,
    /// `json` gzip-compressed for `Accept-Encoding: gzip` clients, built on first use and then
    /// shared.
    gzip: OnceLock<Bytes>,
    /// Where each element of the document's array of entities lies in `json`, when the
    /// stream's views asked for it as the snapshot was written (see [`to_json_marking`]).
    entities: Option<Box<[Range<usize>]>>,
}

impl Snapshot {
    /// Creates a snapshot, serializing `document` once.
    pub fn new(epoch: u64, seq: u64, document: Value) -> Self {
        Self::taken_at(epoch, seq, document, SystemTime::now())
    }

    /// Version `seq` of a document first published at `at` (one restored from storage).
    pub fn taken_at(epoch: u64, seq: u64, document: Value, at: SystemTime) -> Self {
        let json = to_json(&document);
        Self::with_json(epoch, seq, document, json, at)
    }

    /// A snapshot whose JSON is already written (`json` must be `document`'s).
    pub fn with_json(epoch: u64, seq: u64, document: Value, json: Bytes, at: SystemTime) -> Self {
        Snapshot {
            epoch,
            seq,
            document,
            json,
            at,
            frames: Arc::default(),
            gzip: OnceLock::new(),
            entities: None,
        }
    }

    /// This snapshot, knowing where the elements of its entity array lie in its JSON (`spans`,
    /// as [`to_json_marking`] gives them for its document).
    pub fn marking(mut self, spans: Option<Vec<Range<usize>>>) -> Self {
        debug_assert!(
            spans
                .as_ref()
                .is_none_or(|s| s.iter().all(|r| r.end <= self.json.len()))
        );
        self.entities = spans.map(Vec::into_boxed_slice);
        self
    }

    /// The JSON of element `index` of the document's entity array, if this snapshot knows
    /// where it lies (a slice of `json`, not a copy).
    pub fn entity_json(&self, index: usize) -> Option<Bytes> {
        let span = self.entities.as_ref()?.get(index)?;
        Some(self.json.slice(span.clone()))
    }

    /// The length of [`Self::entity_json`], without slicing.
    pub fn entity_json_len(&self, index: usize) -> Option<usize> {
        self.entities
            .as_ref()?
            .get(index)
            .map(ExactSizeIterator::len)
    }

    /// `json` as a gzip member, compressed once per snapshot whatever the number of readers,
    /// at `level` (a server uses one, `server.gzip_level`: the first call's is every call's).
    pub fn json_gzip(&self, level: crate::wire::gzip::Level) -> &Bytes {
        self.gzip
            .get_or_init(|| crate::wire::gzip::member(&self.json, level))
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

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            "[a-z\"\\\u{1}é]{0,4}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::vec(("[a-z\"]{0,3}", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The marked JSON is `to_json`'s, and each span holds its element's own JSON.
        #[test]
        fn marking_writes_the_same_json_and_finds_each_entity(
            doc in json_value(), key in "[a-z\"]{0,3}", nested in proptest::bool::ANY,
            items in proptest::collection::vec(json_value(), 0..4), insert in proptest::bool::ANY,
        ) {
            let path: Vec<String> = if nested { vec![key.clone(), "x".to_owned()] } else { vec![key.clone()] };
            let mut doc = doc;
            if insert && let Value::Object(map) = &mut doc {
                let array = Value::Array(items);
                map.insert(key.clone(), if nested { json!({"y": 1, "x": array, "z": 2}) } else { array });
            }
            let (json, spans) = to_json_marking(&doc, Some(&path));
            proptest::prop_assert_eq!(&json, &to_json(&doc));
            let target = path.iter().try_fold(&doc, |v, k| v.get(k));
            match target.and_then(Value::as_array) {
                Some(items) => {
                    let spans = spans.expect("an array at the path is marked");
                    proptest::prop_assert_eq!(spans.len(), items.len());
                    let snapshot = Snapshot::new(1, 1, doc.clone()).marking(Some(spans));
                    for (i, item) in items.iter().enumerate() {
                        proptest::prop_assert_eq!(
                            snapshot.entity_json(i).unwrap(),
                            Bytes::from(serde_json::to_vec(item).unwrap())
                        );
                    }
                }
                None => proptest::prop_assert!(spans.is_none()),
            }
        }
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn max_depth_is_what_serde_json_parses() {
        let deepest: Value = serde_json::from_str(&nested(MAX_DEPTH)).unwrap();
        assert!(!deeper_than(&deepest, MAX_DEPTH));
        assert!(deeper_than(&deepest, MAX_DEPTH - 1));
        assert!(serde_json::from_str::<Value>(&nested(MAX_DEPTH + 1)).is_err());
        assert!(!deeper_than(&json!(1), 0));
        assert!(deeper_than(&json!([]), 0));
        assert!(!deeper_than(&json!({"a": [1, {"b": 2}]}), 3));
        assert!(deeper_than(&json!({"a": [1, {"b": []}]}), 3));
    }

    /// Everything a stream does with a document (parse, diff, apply, serialize, drop) fits at the
    /// deepest accepted document in a quarter of a tokio worker's stack (2 MiB), even unoptimized
    /// (this test build needs between 384 and 512 KiB; optimized frames are smaller).
    #[test]
    fn the_deepest_document_is_safe_on_a_small_stack() {
        let worker = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(|| {
                let mut old: Value = serde_json::from_str(&nested(MAX_DEPTH)).unwrap();
                // Objects too, each level also carrying an identity-keyed array.
                let mut new = json!(1);
                for i in 0..(MAX_DEPTH - 1) / 2 {
                    new = json!({"id": i, "child": [new]});
                }
                let new = json!([new]);
                assert!(!deeper_than(&new, MAX_DEPTH) && deeper_than(&new, MAX_DEPTH - 1));
                let options = crate::diff::DiffOptions::default();
                let patch = crate::diff::diff_json(&old, &new, &options);
                assert!(patch.operations > 0);
                let back = crate::diff::diff_json(&new, &old, &options);
                assert!(back.operations > 0);
                let typed = crate::diff::diff(&old, &new, &options);
                crate::diff::apply(&mut old, &typed).unwrap();
                assert_eq!(old, new);
                let snapshot = Snapshot::new(7, 1, new.clone());
                let parsed: Value = serde_json::from_slice(&snapshot.json).unwrap();
                assert_eq!(parsed, new);
                drop(snapshot);
                drop((old, new, parsed));
            })
            .unwrap();
        worker.join().unwrap();
    }

    #[test]
    fn snapshot_serializes_once_compactly() {
        let s = Snapshot::new(7, 3, json!({"a": [1, 2], "b": "x\ny"}));
        assert_eq!(&s.json[..], br#"{"a":[1,2],"b":"x\ny"}"#);
        assert_eq!(s.seq, 3);
    }

    #[test]
    fn store_returns_latest() {
        let store = SnapshotStore::new();
        let name: Arc<str> = Arc::from("s");
        store.insert(name.clone(), Arc::new(Snapshot::new(7, 1, json!(1))));
        store.insert(name.clone(), Arc::new(Snapshot::new(7, 2, json!(2))));
        assert_eq!(store.get("s").map(|s| s.seq), Some(2));
        store.remove("s");
        assert!(store.get("s").is_none());
    }

    #[test]
    fn a_bounded_store_evicts_the_least_recently_used_and_says_so() {
        let evicted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = evicted.clone();
        let store = SnapshotStore::bounded(100, move |name| seen.lock().unwrap().push(name));
        let doc = |n: usize| Arc::new(Snapshot::new(7, 1, json!("x".repeat(n))));
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

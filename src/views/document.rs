//! A view's document, kept lazily: the patches since it was last built, built into a
//! [`Snapshot`] (tree and JSON) only when someone needs it (a new subscriber, the JSON endpoint,
//! a resync), so a change costs a view what changed in it, not its whole document.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::Value;

use crate::diff;
use crate::hub::Materialize;
use crate::snapshot::Snapshot;

/// Once the patches since the base weigh this much, or the document's JSON if more, the base is
/// brought up to date (rebuilt from the source, or the patches applied): this bounds what a
/// view nobody reads holds, and rebuilding (O(document)) costs at most what the patches weigh.
const MIN_PENDING_BYTES: usize = 64 * 1024;

/// A view's document: shared by the view (which appends its changes under its lock) and its
/// stream (which asks it for the current snapshot).
#[derive(Default)]
pub struct ViewDocument {
    state: Mutex<State>,
}

#[derive(Default)]
pub(super) struct State {
    epoch: u64,
    seq: u64,
    at: Option<SystemTime>,
    /// The document as of the last patch applied.
    base: Base,
    /// Patches after `base`, oldest first.
    pending: Vec<Bytes>,
    pending_bytes: usize,
    /// The snapshot at `seq`, once built (cleared by every change).
    built: Option<Arc<Snapshot>>,
    /// The length of the current document's JSON, kept by the view as it changes.
    pub(super) json_len: usize,
}

/// The document a view's patches apply to, kept as it came: most views that start over are
/// not read before their next change, so neither is a tree copied nor JSON parsed until
/// someone needs the document.
#[derive(Default)]
enum Base {
    /// No document yet.
    #[default]
    None,
    /// A tree (patches applied to it, or built by the view).
    Tree(Value),
    /// The document of a snapshot the view started over from (shared, not copied).
    Snapshot(Arc<Snapshot>),
    /// The document's compact JSON, as the view wrote it.
    Json(Bytes),
}

impl ViewDocument {
    /// No document yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Locked: the view appends a change to its stream and records it here under this lock,
    /// so whoever builds the document sees it at the stream's top.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// Starts over from `snapshot`.
    pub(super) fn reset(&mut self, snapshot: &Arc<Snapshot>) {
        self.epoch = snapshot.epoch;
        self.seq = snapshot.seq;
        self.at = Some(snapshot.at);
        self.base = Base::Snapshot(snapshot.clone());
        self.pending.clear();
        self.pending_bytes = 0;
        self.json_len = snapshot.json.len();
        self.built = Some(snapshot.clone());
    }

    /// Starts over from the document whose compact JSON is `json`, at `seq` of `epoch`: the
    /// tree is parsed from it when someone needs the document.
    pub(super) fn reset_json(&mut self, epoch: u64, seq: u64, at: SystemTime, json: Bytes) {
        self.epoch = epoch;
        self.seq = seq;
        self.at = Some(at);
        self.json_len = json.len();
        self.base = Base::Json(json);
        self.pending.clear();
        self.pending_bytes = 0;
        self.built = None;
    }

    /// `patch` (RFC 6902 JSON) is the change at `seq` of `epoch`, and `json_len` the length of
    /// the document's JSON after it. The caller brings the base up to date when
    /// [`State::heavy`] says so.
    pub(super) fn patched(
        &mut self,
        epoch: u64,
        seq: u64,
        at: SystemTime,
        patch: Bytes,
        json_len: usize,
    ) {
        self.epoch = epoch;
        self.seq = seq;
        self.at = Some(at);
        self.pending_bytes += patch.len();
        self.pending.push(patch);
        self.json_len = json_len;
        self.built = None;
    }

    /// Whether the patches since the base weigh enough that the base should be rebuilt
    /// ([`State::rebase`], [`State::rebase_json`]).
    pub(super) fn heavy(&self) -> bool {
        self.pending_bytes > MIN_PENDING_BYTES.max(self.json_len)
    }

    /// `document` is the document now (at the last patch), built by the view from its source:
    /// it replaces the base and the patches since.
    pub(super) fn rebase(&mut self, document: Value) {
        self.base = Base::Tree(document);
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// As [`State::rebase`], with the document's compact JSON.
    pub(super) fn rebase_json(&mut self, json: Bytes) {
        self.base = Base::Json(json);
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// The current snapshot, built if it is not yet.
    pub(super) fn current(&mut self) -> Option<Arc<Snapshot>> {
        if let Some(built) = &self.built {
            return Some(built.clone());
        }
        let at = self.at.unwrap_or(SystemTime::UNIX_EPOCH);
        let snapshot = if let (Base::Json(json), true) = (&self.base, self.pending.is_empty()) {
            // The JSON is the document's: parsed once, not written again.
            let document = parse(json);
            Snapshot::with_json(self.epoch, self.seq, document, json.clone(), at)
        } else {
            self.apply_pending();
            let document = match &self.base {
                Base::None => return None,
                Base::Tree(tree) => tree.clone(),
                Base::Snapshot(snapshot) => snapshot.document.clone(),
                Base::Json(json) => parse(json),
            };
            Snapshot::taken_at(self.epoch, self.seq, document, at)
        };
        let snapshot = Arc::new(snapshot);
        self.json_len = snapshot.json.len();
        self.built = Some(snapshot.clone());
        Some(snapshot)
    }

    fn apply_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if pending.is_empty() {
            return;
        }
        let mut base = match std::mem::take(&mut self.base) {
            Base::None => return,
            Base::Tree(tree) => tree,
            Base::Snapshot(snapshot) => snapshot.document.clone(),
            Base::Json(json) => parse(&json),
        };
        for patch in &pending {
            apply(&mut base, patch);
        }
        self.base = Base::Tree(base);
    }
}

/// Parses JSON the view wrote itself. It cannot fail; if it ever did, the fault is logged and
/// the document is `null` (the property tests check every view against an independent
/// evaluation).
fn parse(json: &[u8]) -> Value {
    serde_json::from_slice(json).unwrap_or_else(|error| {
        tracing::error!(%error, "a view's own document does not parse");
        Value::Null
    })
}

/// Applies a patch the view wrote itself to the document it was written for. It cannot fail;
/// if it ever did, the fault is logged and the document left as the patch's valid prefix made
/// it (the property tests check every view against an independent evaluation).
fn apply(document: &mut Value, patch: &[u8]) {
    let result = serde_json::from_slice::<diff::Patch>(patch)
        .map_err(|e| e.to_string())
        .and_then(|patch| diff::apply(document, &patch).map_err(|e| e.to_string()));
    if let Err(error) = result {
        tracing::error!(%error, "a view's own patch does not apply to its document");
    }
}

impl Materialize for ViewDocument {
    fn current(&self) -> Option<Arc<Snapshot>> {
        self.lock().current()
    }
}

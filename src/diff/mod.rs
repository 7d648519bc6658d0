//! RFC 6902 JSON Patch: computing the change between two snapshots, and applying one.
//!
//! - [`diff`] emits `add` / `remove` / `replace` (and `move` when a stream allows it). Arrays of
//!   entities are matched by identity (configured keys, else an automatic `id` / `*_id`), other
//!   arrays by a bounded shortest edit script. Every index is valid for sequential application.
//! - [`apply`] applies a patch atomically.
//! - [`only_ignored`] and [`prefer_snapshot`] are the publisher's two decisions about a patch.
//!
//! The root is never patched in place: when the two roots are not both objects or both arrays,
//! [`diff`] returns a single root `replace` and the publisher sends a snapshot instead.

mod engine;
mod myers;
mod pattern;
mod size;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::validation::Problems;

pub(crate) use engine::increasing_subsequence;
pub use json_patch::{Patch, PatchOperation};
pub use pattern::{KeyPath, PathPattern, Segment};

/// The most key patterns, and separately ignore patterns, one stream may configure.
pub const MAX_PATTERNS: usize = 64;

/// Default bound on the work of one array's edit-script search (see [`DiffOptions::max_edit_work`]).
pub const DEFAULT_MAX_EDIT_WORK: usize = 1_000_000;

/// Largest accepted `max_edit_work`: the search keeps about 4 bytes per unit of work.
pub const MAX_EDIT_WORK_LIMIT: usize = 100_000_000;

/// How a stream's changes are computed.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffOptions {
    /// Publish a snapshot instead of a patch when the patch's JSON would be larger than this
    /// fraction of the new snapshot's JSON.
    pub max_patch_ratio: f64,
    /// Whether `move` operations may be emitted (many clients only expect add/remove/replace).
    pub allow_move: bool,
    /// Match arrays of objects on a unique scalar `id` (or a single `*_id`) when no key is set.
    pub auto_keys: bool,
    /// Arrays whose elements are matched by identity, most specific pattern first.
    pub keys: Vec<ArrayKey>,
    /// Paths whose changes alone publish nothing (they still ride along with other changes).
    pub ignore: Vec<PathPattern>,
    /// Cap on the work (comparisons and search cells) spent finding one array's shortest edit
    /// script; past it the array is compared position by position. Each array's budget is also
    /// limited to 64 steps per element plus 4096, so the search stays linear in the array's size.
    pub max_edit_work: usize,
}

/// An array (by pattern) whose elements are matched by the scalar at `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayKey {
    /// Where the array is, e.g. `/entity/*/trip_update/stop_time_update`.
    pub array: PathPattern,
    /// Where each element's identity is, relative to the element, e.g. `vehicle/vehicle/id`.
    pub key: KeyPath,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            max_patch_ratio: 1.0,
            allow_move: false,
            auto_keys: true,
            keys: Vec::new(),
            ignore: Vec::new(),
            max_edit_work: DEFAULT_MAX_EDIT_WORK,
        }
    }
}

/// The `[streams.diff]` table of a stream, as written in the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffConfig {
    /// Publish a snapshot instead of a patch when the patch would be larger than this fraction
    /// of the snapshot, greater than 0 and at most 1 ([default](DiffOptions::default)).
    pub max_patch_ratio: Option<f64>,
    /// Identity keys of entity arrays: JSON Pointer pattern of the array (`*` matches any one
    /// token) to the element's key, e.g. `"/entity" = "vehicle/vehicle/id"`.
    pub keys: Option<BTreeMap<String, String>>,
    /// JSON Pointer patterns whose changes alone publish nothing, e.g. `"/header/timestamp"`.
    pub ignore: Option<Vec<String>>,
    /// Allow `move` operations, which many clients do not handle ([default](DiffOptions::default)).
    pub allow_move: Option<bool>,
    /// Match arrays of objects on a unique `id` / single `*_id` when no key is configured
    /// ([default](DiffOptions::default)).
    pub auto_keys: Option<bool>,
    /// Work bound of one array's edit-script search ([default](DEFAULT_MAX_EDIT_WORK), at most
    /// [`MAX_EDIT_WORK_LIMIT`]).
    pub max_edit_work: Option<u64>,
}

impl DiffConfig {
    /// Validates this table, whose dotted key is `key` (e.g. `streams[0].diff`), recording
    /// problems; `None` when there were any.
    pub fn validate(&self, key: &str, problems: &mut Problems) -> Option<DiffOptions> {
        let before = problems.len();
        let mut options = DiffOptions::default();
        if let Some(ratio) = self.max_patch_ratio {
            if !(ratio > 0.0 && ratio <= 1.0) {
                problems.push(
                    format!("{key}.max_patch_ratio"),
                    format!("expected a number greater than 0 and at most 1, got {ratio}"),
                );
            }
            options.max_patch_ratio = ratio;
        }
        if let Some(allow) = self.allow_move {
            options.allow_move = allow;
        }
        if let Some(auto) = self.auto_keys {
            options.auto_keys = auto;
        }
        if let Some(work) = self.max_edit_work {
            match usize::try_from(work) {
                Ok(w) if (1..=MAX_EDIT_WORK_LIMIT).contains(&w) => options.max_edit_work = w,
                _ => problems.push(
                    format!("{key}.max_edit_work"),
                    format!("expected a whole number from 1 to {MAX_EDIT_WORK_LIMIT}, got {work}"),
                ),
            }
        }
        if let Some(keys) = &self.keys {
            if keys.len() > MAX_PATTERNS {
                problems.push(
                    format!("{key}.keys"),
                    format!(
                        "expected at most {MAX_PATTERNS} keyed arrays, got {}",
                        keys.len()
                    ),
                );
            }
            for (array, field) in keys {
                let at = format!("{key}.keys.{array:?}");
                let array = PathPattern::parse(array).map_err(|e| problems.push(&at, e));
                let field = KeyPath::parse(field).map_err(|e| problems.push(&at, e));
                if let (Ok(array), Ok(key)) = (array, field) {
                    options.keys.push(ArrayKey { array, key });
                }
            }
            // Most specific first: a literal segment beats a wildcard.
            options.keys.sort_by(|a, b| {
                (a.array.wildcards(), a.array.as_str())
                    .cmp(&(b.array.wildcards(), b.array.as_str()))
            });
        }
        if let Some(ignore) = &self.ignore {
            if ignore.len() > MAX_PATTERNS {
                problems.push(
                    format!("{key}.ignore"),
                    format!(
                        "expected at most {MAX_PATTERNS} ignored paths, got {}",
                        ignore.len()
                    ),
                );
            }
            for (i, pattern) in ignore.iter().enumerate() {
                let at = format!("{key}.ignore[{i}]");
                match PathPattern::parse(pattern) {
                    Ok(p) if p.segments().is_empty() => problems.push(
                        at,
                        "expected a path below the root such as `/header/timestamp`; ignoring the whole document would never publish",
                    ),
                    Ok(p) => options.ignore.push(p),
                    Err(e) => problems.push(at, e),
                }
            }
        }
        (problems.len() == before).then_some(options)
    }
}

/// The RFC 6902 patch that turns `old` into `new`.
///
/// When both are objects or both are arrays, no operation touches the root. Otherwise (the
/// root changed kind, or the roots are scalars) the patch is a single `replace` of the root when
/// they differ: the publisher checks [`is_root_replace`] and sends a snapshot instead.
pub fn diff(old: &Value, new: &Value, options: &DiffOptions) -> Patch {
    match (old, new) {
        (Value::Object(_), Value::Object(_)) | (Value::Array(_), Value::Array(_)) => {
            Patch(engine::diff_containers(old, new, options))
        }
        _ if old == new => Patch(Vec::new()),
        _ => Patch(vec![PatchOperation::Replace(
            json_patch::ReplaceOperation {
                path: json_patch::jsonptr::PointerBuf::root(),
                value: new.clone(),
            },
        )]),
    }
}

/// A patch as the compact JSON subscribers receive: what `serde_json::to_vec(&diff(..))` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchJson {
    /// The JSON array of operations.
    pub json: Vec<u8>,
    /// How many operations it holds (0: the documents are equal).
    pub operations: usize,
    /// Every operation lies at or below an ignored path (see [`only_ignored`]).
    pub only_ignored: bool,
}

/// [`diff`], written straight as the patch's compact JSON. This is what a publisher needs: the
/// operations are never built, so no value of `new` is cloned (on feeds where much changes,
/// building and dropping the operations costs a quarter of the diff). The result is
/// byte-for-byte `serde_json::to_vec(&diff(old, new, options))`.
pub fn diff_json(old: &Value, new: &Value, options: &DiffOptions) -> PatchJson {
    match (old, new) {
        (Value::Object(_), Value::Object(_)) | (Value::Array(_), Value::Array(_)) => {
            engine::diff_containers_json(old, new, options)
        }
        _ => {
            let patch = diff(old, new, options);
            PatchJson {
                // Serializing a patch into memory cannot fail.
                json: serde_json::to_vec(&patch).unwrap_or_default(),
                operations: patch.0.len(),
                only_ignored: only_ignored(&patch, options),
            }
        }
    }
}

/// How the diff of a whole document compared the elements of one array of entities (see
/// [`diff_json_split`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    /// By the element's index in the new array, for each one compared in place with an old
    /// element of the same identity: that element's index in the old array, and the operations
    /// found inside it (`None`: the two are equal), as [`diff_json_at`] gives them at index
    /// `j`. Elements added, removed or re-added have no entry.
    pub elements: Vec<Option<(usize, Option<RelativePatch>)>>,
}

impl Split {
    /// How new element `j` was compared, if it was compared in place.
    pub fn element(&self, j: usize) -> Option<(usize, Option<&RelativePatch>)> {
        self.elements
            .get(j)?
            .as_ref()
            .map(|(i, patch)| (*i, patch.as_ref()))
    }
}

/// [`diff_json`], and when the array at `entities` (object keys from the root) is matched by
/// identity, how each of its elements compared ([`Split`]): a view splices an entity's changes
/// without diffing it again. `None` when none is asked, or the walk did not compare that array
/// by identity, or replaced it (or a value around it) whole.
pub fn diff_json_split(
    old: &Value,
    new: &Value,
    options: &DiffOptions,
    entities: Option<&[String]>,
) -> (PatchJson, Option<Split>) {
    match (old, new, entities) {
        (Value::Object(_), Value::Object(_), Some(_))
        | (Value::Array(_), Value::Array(_), Some(_)) => {
            engine::diff_containers_split(old, new, options, entities)
        }
        _ => (diff_json(old, new, options), None),
    }
}

/// The length of `value`'s compact JSON, without writing it.
pub fn json_len(value: &Value) -> usize {
    size::value_len(value, usize::MAX).unwrap_or(usize::MAX)
}

/// One step of the path to the values [`diff_json_at`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At<'a> {
    /// An object's member.
    Key(&'a str),
    /// An array's element.
    Index(usize),
}

/// The operations between two values found at some path of a document, with pointers relative
/// to that path: what a view splices under its own index of an entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelativePatch {
    /// The operations' compact JSON, separated by commas, without the enclosing brackets.
    /// Each pointer is relative (`""` for the values themselves).
    pub json: Vec<u8>,
    /// Where each pointer's text begins in `json` (just after its opening quote), in order:
    /// inserting a JSON-escaped pointer there re-roots the operation.
    pub pointers: Vec<usize>,
    /// How many operations there are.
    pub operations: usize,
    /// Every operation lies at or below an ignored path (the whole path counts).
    pub only_ignored: bool,
}

impl RelativePatch {
    /// No operation: the two values are equal.
    pub fn empty() -> Self {
        RelativePatch {
            json: Vec::new(),
            pointers: Vec::new(),
            operations: 0,
            only_ignored: true,
        }
    }
}

/// [`diff_json`] of `old` and `new` as found at `prefix` in a document: the same operations
/// the diff of the whole documents makes there (key and ignore patterns match the whole path),
/// with pointers relative to `prefix`. A change of kind, or of a scalar, is one `replace` of
/// `""`.
pub fn diff_json_at<'v>(
    old: &'v Value,
    new: &'v Value,
    prefix: &[At<'v>],
    options: &DiffOptions,
) -> RelativePatch {
    engine::diff_json_at(old, new, prefix, options)
}

/// True when `patch` replaces the whole document (see [`diff`]): send a snapshot instead.
pub fn is_root_replace(patch: &Patch) -> bool {
    patch.0.iter().any(|op| op.path().is_root())
}

/// True when every operation lies at or below an ignored path, so the change publishes nothing
/// (also true for an empty patch).
pub fn only_ignored(patch: &Patch, options: &DiffOptions) -> bool {
    let ignored = |p: &json_patch::jsonptr::Pointer| is_ignored(p, options);
    patch.0.iter().all(|op| match op {
        PatchOperation::Move(m) => ignored(&m.from) && ignored(&m.path),
        PatchOperation::Copy(c) => ignored(&c.path),
        PatchOperation::Test(_) => true,
        PatchOperation::Add(_) | PatchOperation::Remove(_) | PatchOperation::Replace(_) => {
            ignored(op.path())
        }
    })
}

/// Whether `path` lies at or below one of the ignored patterns.
pub(crate) fn is_ignored(path: &json_patch::jsonptr::Pointer, options: &DiffOptions) -> bool {
    options.ignore.iter().any(|i| i.covers(path))
}

/// True when a patch of `patch_json_len` bytes is too large next to a snapshot of
/// `snapshot_json_len` bytes, so the snapshot should be published instead.
pub fn prefer_snapshot(
    patch_json_len: usize,
    snapshot_json_len: usize,
    options: &DiffOptions,
) -> bool {
    patch_json_len as f64 > options.max_patch_ratio * snapshot_json_len as f64
}

/// Why a patch could not be applied.
pub type ApplyError = json_patch::PatchError;

/// Applies `patch` to `doc` atomically: on error `doc` is left as it was.
pub fn apply(doc: &mut Value, patch: &Patch) -> Result<(), ApplyError> {
    json_patch::patch(doc, patch)
}

/// The most work one [`apply_bounded`] may do: array elements shifted by insertions and
/// removals, plus [`COPY_WORK`] per value a `copy` duplicates. About 10 ms of shifting on one
/// core, or about 1.25 million copied values.
pub const MAX_APPLY_WORK: u64 = 10_000_000;

/// The work one value duplicated by a `copy` costs (an allocation and a clone, against a
/// move of a few bytes for a shifted element).
pub const COPY_WORK: u64 = 8;

/// Why [`apply_bounded`] refused a patch.
#[derive(Debug, thiserror::Error)]
pub enum BoundedApplyError {
    /// An operation does not apply.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The patch would do more than `max` work (see [`MAX_APPLY_WORK`]).
    #[error(
        "operation {operation} would take the patch past {max} units of work (array elements shifted by inserting or removing before them, {COPY_WORK} per value copied)"
    )]
    TooCostly {
        /// The index of the operation that would exceed the bound.
        operation: usize,
        /// The bound.
        max: u64,
    },
}

/// Applies `patch` to `doc`, refusing it once its work would exceed `max_work`: inserting at
/// the front of an array moves every element after it, so a long patch of such operations is
/// quadratic, and a chain of `copy` operations can double the document each time. The work is
/// measured before each operation runs, so a refused patch never did more than `max_work`.
///
/// Not atomic: on error `doc` is left partly patched; callers apply to a copy they discard.
pub fn apply_bounded(
    doc: &mut Value,
    patch: &Patch,
    max_work: u64,
) -> Result<(), BoundedApplyError> {
    let mut work: u64 = 0;
    for (operation, op) in patch.0.iter().enumerate() {
        work = work.saturating_add(operation_work(doc, op, max_work.saturating_sub(work)));
        if work > max_work {
            return Err(BoundedApplyError::TooCostly {
                operation,
                max: max_work,
            });
        }
        json_patch::patch_unsafe(doc, std::slice::from_ref(op)).map_err(|mut e| {
            e.operation = operation;
            e
        })?;
    }
    Ok(())
}

/// The work `op` would do on `doc`; counting stops past `budget` (the result then exceeds it).
fn operation_work(doc: &Value, op: &PatchOperation, budget: u64) -> u64 {
    use json_patch::jsonptr::Pointer;
    // Elements after the position `path` names in its parent array (0 when not an array).
    let shifted = |path: &Pointer, inserting: bool| -> u64 {
        let Some((parent, last)) = path.split_back() else {
            return 0;
        };
        let Some(Value::Array(items)) = doc.pointer(parent.as_str()) else {
            return 0;
        };
        match last.to_index() {
            Ok(json_patch::jsonptr::index::Index::Num(i)) if i < items.len() => {
                (items.len() - i - usize::from(!inserting)) as u64
            }
            _ => 0,
        }
    };
    match op {
        PatchOperation::Add(a) => shifted(&a.path, true),
        PatchOperation::Remove(r) => shifted(&r.path, false),
        PatchOperation::Move(m) => shifted(&m.from, false) + shifted(&m.path, true),
        PatchOperation::Copy(c) => {
            let copied = doc
                .pointer(c.from.as_str())
                .map_or(0, |v| values_within(v, budget / COPY_WORK + 1));
            shifted(&c.path, true).saturating_add(copied.saturating_mul(COPY_WORK))
        }
        PatchOperation::Replace(_) | PatchOperation::Test(_) => 0,
    }
}

/// How many values `value` holds (itself included), counting no further than `limit`.
fn values_within(value: &Value, limit: u64) -> u64 {
    let mut count = 0;
    let mut pending = vec![value];
    while let Some(v) = pending.pop() {
        count += 1;
        if count > limit {
            break;
        }
        match v {
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => pending.extend(map.values()),
            _ => {}
        }
    }
    count
}

//! The diff walk: objects by key, arrays by identity or by edit script, scalars by value.
//!
//! Invariant kept everywhere: operations are emitted in the order they must be applied, and the
//! index in each operation's path is the element's index in the document as the previous
//! operations left it.
//! - Keyed arrays: removals (highest index first), then moves, then insertions (lowest final
//!   index first), then changes inside entities at their final index.
//! - Other arrays: hunk by hunk from the front, each index shifted by the hunks before it.
//! - Any array below the root whose edits serialize larger than the array itself is replaced
//!   whole, unless an ignore pattern reaches inside it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt::Write as _;
use std::hash::Hash;
use std::ops::Range;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, MoveOperation, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::{Map, Value};

use super::DiffOptions;
use super::myers;
use super::pattern::{self, KeyPath, PathPattern, push_token};
use super::size;

/// Per-element share of an array's edit-script budget (see [`Walk::unkeyed`]).
const LINEAR_WORK_PER_ELEMENT: usize = 64;
/// Budget every array gets regardless of length, so short arrays always get their best script.
const LINEAR_WORK_FLOOR: usize = 4096;

/// Bit set of configured patterns still matching the path walked so far (patterns are capped at
/// 64 of each kind by validation).
#[derive(Clone, Copy)]
struct Live {
    keys: u64,
    ignore: u64,
    depth: usize,
}

/// Computes the operations turning `old` into `new`, both objects or both arrays.
pub(crate) fn diff_containers(
    old: &Value,
    new: &Value,
    options: &DiffOptions,
) -> Vec<PatchOperation> {
    walk(old, new, options, None, |ops, steps, _| {
        let written: Vec<PatchOperation> = ops.iter().map(|op| op.write_out(steps)).collect();
        debug_assert!(
            ops.iter().zip(&written).all(|(op, written)| {
                Some(op.json_len(steps)) == serde_json::to_vec(written).ok().map(|v| v.len())
            }),
            "an operation's computed length differs from its JSON"
        );
        written
    })
}

/// The operations turning `old` into `new` (both objects or both arrays) written straight as
/// the patch's compact JSON, exactly as `serde_json` serializes [`diff_containers`]' result,
/// without building or cloning any operation. Also tells whether every operation lies under
/// an ignored path.
pub(crate) fn diff_containers_json(
    old: &Value,
    new: &Value,
    options: &DiffOptions,
) -> super::PatchJson {
    diff_containers_split(old, new, options, None).0
}

/// [`diff_containers_json`], and when `split` names an array of entities (object keys from the
/// root) that the walk compared by identity, how it compared each of its elements: the
/// operations found inside each one, relative to it, as [`diff_json_at`] gives them there.
/// They are cut from the patch's own JSON: each entity is diffed once for the whole document
/// and for whoever splices its changes elsewhere (views).
pub(crate) fn diff_containers_split(
    old: &Value,
    new: &Value,
    options: &DiffOptions,
    split: Option<&[String]>,
) -> (super::PatchJson, Option<super::Split>) {
    walk(old, new, options, split, |ops, steps, compared| {
        let mut json = Vec::with_capacity(64 * ops.len() + 2);
        let mut only_ignored = true;
        // Where each operation's JSON begins, and where each of its pointers' text begins (by
        // operation: `marks[marked[k]..marked[k + 1]]`), when the comparisons are kept apart.
        let keep = compared.is_some();
        let mut starts = Vec::with_capacity(if keep { ops.len() + 1 } else { 0 });
        let mut ignored = Vec::with_capacity(if keep { ops.len() } else { 0 });
        let mut marks = Vec::new();
        let mut marked = Vec::with_capacity(if keep { ops.len() + 1 } else { 0 });
        json.push(b'[');
        for (i, op) in ops.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            let start = json.len();
            let here = if keep {
                starts.push(start);
                marked.push(marks.len());
                op.write_json_from(steps, 0, options, &mut json, &mut |at| marks.push(at))
            } else {
                op.write_json(steps, options, &mut json)
            };
            if keep {
                ignored.push(here);
            }
            only_ignored &= here;
            debug_assert_eq!(json.len() - start, op.json_len(steps));
        }
        if keep {
            starts.push(json.len());
            marked.push(marks.len());
        }
        json.push(b']');
        let split = compared.map(|(depth, compared)| {
            let mut elements = Vec::new();
            for (j, i, range) in compared {
                if elements.len() <= *j {
                    elements.resize_with(j + 1, || None);
                }
                let patch = (!range.is_empty()).then(|| {
                    // Every pointer of these operations begins with the element's own: cut it.
                    let cut =
                        pointer_str_len(&steps[ops[range.start].first_step()..][..=depth]) - 2;
                    let mut patch = super::RelativePatch {
                        json: Vec::new(),
                        pointers: Vec::new(),
                        operations: range.len(),
                        only_ignored: ignored[range.clone()].iter().all(|i| *i),
                    };
                    for k in range.clone() {
                        if k > range.start {
                            patch.json.push(b',');
                        }
                        // Operations are separated by one comma: the next begins after it.
                        let end = if k + 1 == ops.len() {
                            starts[k + 1]
                        } else {
                            starts[k + 1] - 1
                        };
                        let mut copied = starts[k];
                        for &at in &marks[marked[k]..marked[k + 1]] {
                            patch.json.extend_from_slice(&json[copied..at]);
                            patch.pointers.push(patch.json.len());
                            copied = at + cut;
                        }
                        patch.json.extend_from_slice(&json[copied..end]);
                    }
                    patch
                });
                elements[*j] = Some((*i, patch));
            }
            super::Split { elements }
        });
        (
            super::PatchJson {
                json,
                operations: ops.len(),
                only_ignored,
            },
            split,
        )
    })
}

/// The operations turning `old` into `new`, two values found at `prefix` in a document,
/// computed as [`diff_containers_json`] computes them there (key and ignore patterns match
/// the whole path), written with pointers relative to `prefix` (see [`super::RelativePatch`]).
pub(crate) fn diff_json_at<'v>(
    old: &'v Value,
    new: &'v Value,
    prefix: &[super::At<'v>],
    options: &DiffOptions,
) -> super::RelativePatch {
    let mut walk = Walk {
        options,
        path: Vec::with_capacity(prefix.len() + 8),
        ops: Vec::new(),
        op_steps: Vec::new(),
        op_lens: Vec::new(),
        walked: 0,
        split: None,
    };
    let mut live = Live {
        keys: mask(options.keys.len()),
        ignore: mask(options.ignore.len()),
        depth: 0,
    };
    for at in prefix {
        match *at {
            super::At::Key(key) => {
                live = walk.descend_key(live, key);
                walk.path.push(Step::Key(key));
            }
            super::At::Index(index) => {
                live = walk.descend_index(live, index);
                walk.path.push(Step::Index(index));
            }
        }
    }
    walk.value(old, new, live);
    let mut out = super::RelativePatch {
        json: Vec::with_capacity(64 * walk.ops.len()),
        pointers: Vec::with_capacity(walk.ops.len()),
        operations: walk.ops.len(),
        only_ignored: true,
    };
    for (i, op) in walk.ops.iter().enumerate() {
        if i > 0 {
            out.json.push(b',');
        }
        let pointers = &mut out.pointers;
        out.only_ignored &= op.write_json_from(
            &walk.op_steps,
            prefix.len(),
            options,
            &mut out.json,
            &mut |at| pointers.push(at),
        );
    }
    out
}

/// Walks `old` and `new` and hands the operations found (with the steps their paths index,
/// and the comparisons of the elements of the array at `split`, if asked and kept: see
/// [`Split`]) to `finish`.
fn walk<R>(
    old: &Value,
    new: &Value,
    options: &DiffOptions,
    split: Option<&[String]>,
    finish: impl FnOnce(&[Op<'_>], &[Step<'_>], Option<(usize, &[Compared])>) -> R,
) -> R {
    let mut walk = Walk {
        options,
        path: Vec::new(),
        ops: Vec::new(),
        op_steps: Vec::new(),
        op_lens: Vec::new(),
        walked: 0,
        split: split.map(|path| Split {
            path,
            state: SplitState::Waiting,
            compared: Vec::new(),
        }),
    };
    let live = Live {
        keys: mask(options.keys.len()),
        ignore: mask(options.ignore.len()),
        depth: 0,
    };
    walk.value(old, new, live);
    let compared = walk
        .split
        .as_ref()
        .filter(|s| matches!(s.state, SplitState::Recorded { .. }))
        .map(|s| (s.path.len(), s.compared.as_slice()));
    finish(&walk.ops, &walk.op_steps, compared)
}

/// One element of the split array compared in place: its new index, the old element's index,
/// and the operations found inside it.
type Compared = (usize, usize, Range<usize>);

/// The array whose elements' in-place comparisons are kept apart, and where the walk is with it.
struct Split<'o> {
    /// Its path: object keys from the root.
    path: &'o [String],
    state: SplitState,
    compared: Vec<Compared>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SplitState {
    /// Not reached (yet), reached and not compared by identity, or compared and some of its
    /// operations dropped since (the path is walked once: nothing more is recorded).
    Waiting,
    /// Comparing its elements: operations dropped now are inside the element being compared.
    Recording,
    /// Compared, its operations ending at `end`: dropping any before that (the array or an
    /// enclosing value replaced whole) drops the comparisons' operations too.
    Recorded { end: usize },
}

fn mask(len: usize) -> u64 {
    if len >= 64 {
        u64::MAX
    } else {
        (1u64 << len) - 1
    }
}

/// The identity of an array element: a scalar found at the array's key path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ident<'a> {
    Str(&'a str),
    Int(i64),
    UInt(u64),
    Float(u64),
    Bool(bool),
}

impl<'a> Ident<'a> {
    fn of(value: &'a Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(Ident::Str(s)),
            Value::Number(n) => Some(if let Some(i) = n.as_i64() {
                Ident::Int(i)
            } else if let Some(u) = n.as_u64() {
                Ident::UInt(u)
            } else {
                Ident::Float(n.as_f64().unwrap_or(f64::NAN).to_bits())
            }),
            Value::Bool(b) => Some(Ident::Bool(*b)),
            Value::Null | Value::Array(_) | Value::Object(_) => None,
        }
    }
}

/// Where an array's element identities are read from.
enum KeySel<'a> {
    Configured(&'a KeyPath),
    Field(&'a str),
}

impl KeySel<'_> {
    fn ident<'v>(&self, element: &'v Value) -> Option<Ident<'v>> {
        let value = match self {
            KeySel::Configured(path) => path.get(element)?,
            KeySel::Field(name) => pattern::field(element.as_object()?, name)?,
        };
        Ident::of(value)
    }

    fn idents<'v>(&self, elements: &'v [Value]) -> Option<Vec<Ident<'v>>> {
        elements.iter().map(|e| self.ident(e)).collect()
    }
}

/// One step of the path from the root to the values being compared.
#[derive(Clone, Copy)]
enum Step<'v> {
    Key(&'v str),
    Index(usize),
}

/// An operation as the walk emits it: its paths are ranges of `Walk::op_steps`, its value is
/// borrowed from the new document. Where edits are many, an enclosing array is often replaced
/// whole: the operations it drops never get a pointer written or a value cloned.
enum Op<'v> {
    Add {
        path: Range<usize>,
        value: &'v Value,
    },
    Remove {
        path: Range<usize>,
    },
    Replace {
        path: Range<usize>,
        value: &'v Value,
    },
    Move {
        from: Range<usize>,
        path: Range<usize>,
    },
}

impl Op<'_> {
    /// Where this operation's steps begin in `Walk::op_steps` (a move's `from` comes first).
    fn first_step(&self) -> usize {
        match self {
            Op::Add { path, .. } | Op::Remove { path } | Op::Replace { path, .. } => path.start,
            Op::Move { from, .. } => from.start,
        }
    }

    /// The compact JSON length of the operation [`Op::write_out`] gives.
    fn json_len(&self, steps: &[Step<'_>]) -> usize {
        let path = |range: &Range<usize>| pointer_str_len(&steps[range.clone()]);
        let value = |v: &Value| size::value_len(v, usize::MAX).unwrap_or(usize::MAX);
        match self {
            Op::Add { path: p, value: v } => size::add_len(path(p), value(v)),
            Op::Remove { path: p } => size::remove_len(path(p)),
            Op::Replace { path: p, value: v } => size::replace_len(path(p), value(v)),
            Op::Move { from, path: p } => size::move_len(path(from), path(p)),
        }
    }

    /// Appends this operation's compact JSON (as `serde_json` writes [`Op::write_out`]'s
    /// result) to `out`; returns whether it lies under an ignored path.
    fn write_json(&self, steps: &[Step<'_>], options: &DiffOptions, out: &mut Vec<u8>) -> bool {
        self.write_json_from(steps, 0, options, out, &mut |_| {})
    }

    /// [`Op::write_json`] with each pointer written without its first `skip` steps (which
    /// still count for the ignore patterns); `mark` is told where each pointer's text begins
    /// in `out` (just after its opening quote), so a prefix can be spliced in later.
    fn write_json_from(
        &self,
        steps: &[Step<'_>],
        skip: usize,
        options: &DiffOptions,
        out: &mut Vec<u8>,
        mark: &mut impl FnMut(usize),
    ) -> bool {
        let ignored = |p: &PointerBuf| super::is_ignored(p, options);
        // Writing JSON into a Vec cannot fail.
        let mut string = |out: &mut Vec<u8>, range: &Range<usize>| {
            mark(out.len() + 1);
            if skip == 0 {
                let _ = serde_json::to_writer(&mut *out, pointer(&steps[range.clone()]).as_str());
            } else {
                let relative = pointer(&steps[range.start + skip..range.end]);
                let _ = serde_json::to_writer(&mut *out, relative.as_str());
            }
        };
        let pointer = |range: &Range<usize>| pointer(&steps[range.clone()]);
        match self {
            Op::Add { path, value } | Op::Replace { path, value } => {
                let name: &[u8] = if matches!(self, Op::Add { .. }) {
                    b"{\"op\":\"add\",\"path\":"
                } else {
                    b"{\"op\":\"replace\",\"path\":"
                };
                out.extend_from_slice(name);
                string(out, path);
                out.extend_from_slice(b",\"value\":");
                let _ = serde_json::to_writer(&mut *out, *value);
                out.push(b'}');
                ignored(&pointer(path))
            }
            Op::Remove { path } => {
                out.extend_from_slice(b"{\"op\":\"remove\",\"path\":");
                string(out, path);
                out.push(b'}');
                ignored(&pointer(path))
            }
            Op::Move { from, path } => {
                out.extend_from_slice(b"{\"op\":\"move\",\"from\":");
                string(out, from);
                out.extend_from_slice(b",\"path\":");
                string(out, path);
                out.push(b'}');
                ignored(&pointer(from)) && ignored(&pointer(path))
            }
        }
    }

    fn write_out(&self, steps: &[Step<'_>]) -> PatchOperation {
        let pointer = |range: &Range<usize>| pointer(&steps[range.clone()]);
        match self {
            Op::Add { path, value } => PatchOperation::Add(AddOperation {
                path: pointer(path),
                value: (*value).clone(),
            }),
            Op::Remove { path } => PatchOperation::Remove(RemoveOperation {
                path: pointer(path),
            }),
            Op::Replace { path, value } => PatchOperation::Replace(ReplaceOperation {
                path: pointer(path),
                value: (*value).clone(),
            }),
            Op::Move { from, path } => PatchOperation::Move(MoveOperation {
                from: pointer(from),
                path: pointer(path),
            }),
        }
    }
}

/// The JSON Pointer made of `steps`.
fn pointer(steps: &[Step<'_>]) -> PointerBuf {
    let mut pointer = String::with_capacity(pointer_len(steps));
    for step in steps {
        match step {
            Step::Key(key) => push_token(&mut pointer, key),
            Step::Index(index) => {
                // Writing to a String cannot fail.
                let _ = write!(pointer, "/{index}");
            }
        }
    }
    debug_assert!(PointerBuf::parse(pointer.clone()).is_ok(), "{pointer}");
    // SAFETY: `pointer` is `/` followed by an RFC 6901-escaped token (`push_token`) or a
    // decimal index, for each step: a valid JSON Pointer.
    unsafe { PointerBuf::new_unchecked(pointer) }
}

/// The length of [`pointer`]`(steps)`, without writing it.
fn pointer_len(steps: &[Step<'_>]) -> usize {
    steps
        .iter()
        .map(|step| match step {
            Step::Key(key) => 1 + pattern::escaped_len(key),
            Step::Index(index) => 1 + index_digits(*index),
        })
        .sum()
}

/// The length of [`pointer`]`(steps)` as a JSON string literal.
fn pointer_str_len(steps: &[Step<'_>]) -> usize {
    2 + steps
        .iter()
        .map(|step| match step {
            // RFC 6901 escapes (`~1`) need no JSON escape, and JSON escapes (`\"`) no RFC 6901
            // one: the two add up.
            Step::Key(key) => 1 + size::str_len(key) - 2 + pattern::escaped_len(key) - key.len(),
            Step::Index(index) => 1 + index_digits(*index),
        })
        .sum::<usize>()
}

fn index_digits(index: usize) -> usize {
    index.checked_ilog10().map_or(1, |d| d as usize + 1)
}

struct Walk<'o, 'v> {
    options: &'o DiffOptions,
    /// Where the values being compared are. Most of the walk emits nothing, so the JSON
    /// Pointer is written out only for an operation.
    path: Vec<Step<'v>>,
    ops: Vec<Op<'v>>,
    /// The paths of `ops`, one after the other.
    op_steps: Vec<Step<'v>>,
    /// Compact JSON length of `ops[i]`, filled lazily: each operation is sized once however
    /// many enclosing arrays weigh it against a whole replace.
    op_lens: Vec<usize>,
    /// A lower bound of the JSON length of the parts of `new` compared so far. An array whose
    /// compared part alone outweighs its edits cannot be smaller replaced whole: most arrays
    /// are decided by it without being sized.
    walked: usize,
    /// The array whose elements' comparisons are kept apart, if asked.
    split: Option<Split<'o>>,
}

impl<'o, 'v> Walk<'o, 'v> {
    /// Records the current path for an operation.
    fn here(&mut self) -> Range<usize> {
        let start = self.op_steps.len();
        self.op_steps.extend_from_slice(&self.path);
        start..self.op_steps.len()
    }

    /// Records the path of element `index` of the current array for an operation.
    fn at_index(&mut self, index: usize) -> Range<usize> {
        let start = self.op_steps.len();
        self.op_steps.extend_from_slice(&self.path);
        self.op_steps.push(Step::Index(index));
        start..self.op_steps.len()
    }

    fn replace(&mut self, value: &'v Value) {
        let path = self.here();
        self.ops.push(Op::Replace { path, value });
    }

    fn add_here(&mut self, value: &'v Value) {
        let path = self.here();
        self.ops.push(Op::Add { path, value });
    }

    fn remove_here(&mut self) {
        let path = self.here();
        self.ops.push(Op::Remove { path });
    }

    fn add_at(&mut self, index: usize, value: &'v Value) {
        let path = self.at_index(index);
        self.ops.push(Op::Add { path, value });
    }

    fn remove_at(&mut self, index: usize) {
        let path = self.at_index(index);
        self.ops.push(Op::Remove { path });
    }

    /// Narrows `live` to the patterns whose segment at `live.depth` satisfies `matches`.
    fn descend(&self, live: Live, matches: impl Fn(&PathPattern) -> bool) -> Live {
        let mut keys = live.keys;
        let mut bits = keys;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if !matches(&self.options.keys[i].array) {
                keys &= !(1 << i);
            }
        }
        let mut ignore = live.ignore;
        let mut bits = ignore;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if !matches(&self.options.ignore[i]) {
                ignore &= !(1 << i);
            }
        }
        Live {
            keys,
            ignore,
            depth: live.depth + 1,
        }
    }

    fn descend_index(&self, live: Live, index: usize) -> Live {
        if live.keys == 0 && live.ignore == 0 {
            return Live {
                depth: live.depth + 1,
                ..live
            };
        }
        self.descend(live, |p| p.segment_matches_index(live.depth, index))
    }

    fn descend_key(&self, live: Live, key: &str) -> Live {
        if live.keys == 0 && live.ignore == 0 {
            return Live {
                depth: live.depth + 1,
                ..live
            };
        }
        self.descend(live, |p| p.segment_matches(live.depth, key))
    }

    /// True when an ignore pattern reaches below the current path: coarse operations here
    /// would hide an ignored-only change inside a bigger one.
    fn ignored_below(&self, live: Live) -> bool {
        let mut bits = live.ignore;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if self.options.ignore[i].segments().len() > live.depth {
                return true;
            }
        }
        false
    }

    fn value(&mut self, old: &'v Value, new: &'v Value, live: Live) {
        match (old, new) {
            (Value::Object(a), Value::Object(b)) => self.object(a, b, new, live),
            (Value::Array(a), Value::Array(b)) => self.array(a, b, new, live),
            _ => {
                self.walked += size::shallow_len_lower_bound(new);
                if old != new {
                    self.replace(new);
                }
            }
        }
    }

    /// Diffs two objects; `whole` is `new` as a value, for a replace of the whole object.
    fn object(
        &mut self,
        old: &'v Map<String, Value>,
        new: &'v Map<String, Value>,
        whole: &'v Value,
        live: Live,
    ) {
        let start = self.ops.len();
        // Braces; each key compared adds its quotes and colon.
        self.walked += 2;
        let mut common = 0usize;
        // Objects usually list their keys in the same order (serializers, protobuf
        // projections): pair keys by position while they agree, and only hash the rest.
        let mut aligned = new.iter();
        let mut in_step = true;
        for (key, a) in old {
            self.path.push(Step::Key(key));
            let counterpart = if in_step {
                match aligned.next() {
                    Some((k, b)) if k == key => Some(b),
                    _ => {
                        in_step = false;
                        new.get(key)
                    }
                }
            } else {
                new.get(key)
            };
            match counterpart {
                None => self.remove_here(),
                Some(b) => {
                    common += 1;
                    self.walked += key.len() + 3;
                    let child = self.descend_key(live, key);
                    self.value(a, b, child);
                }
            }
            self.path.pop();
        }
        // Every new key was seen in `old` unless the counts differ.
        let added = new.len() - common;
        for (key, b) in new.iter().filter(|_| added > 0) {
            if !old.contains_key(key) {
                self.walked += key.len() + 3;
                self.path.push(Step::Key(key));
                self.add_here(b);
                self.path.pop();
            }
        }
        // Two objects with nothing in common: one replace says it in fewer bytes.
        if common == 0
            && !old.is_empty()
            && !new.is_empty()
            && live.depth > 0
            && !self.ignored_below(live)
        {
            self.truncate_ops(start);
            self.replace(whole);
        }
    }

    /// Diffs two arrays; `whole` is `new` as a value, for a replace of the whole array.
    fn array(&mut self, old: &'v [Value], new: &'v [Value], whole: &'v Value, live: Live) {
        if old.is_empty() && new.is_empty() {
            return;
        }
        let start = self.ops.len();
        // Brackets; the elements compared add their own.
        self.walked += 2;
        let walked_before = self.walked - 2;
        let keyed = !old.is_empty()
            && !new.is_empty()
            && self
                .key_for(old, new, live)
                .is_some_and(|sel| self.keyed(old, new, &sel, live));
        if !keyed {
            self.unkeyed(old, new, live);
        }
        // One `replace` of the whole array when that is smaller, unless it would hide an
        // ignored-only change below.
        if self.ops.len() - start > 1 && live.depth > 0 && !self.ignored_below(live) {
            let edits = self.ops_json_len(start);
            // `{"op":"replace","path":"…","value":…}` around the array.
            let overhead = pointer_len(&self.path) + 32;
            let budget = edits.saturating_sub(overhead);
            let array = if self.walked - walked_before > budget {
                None
            } else {
                size::array_len(new, budget)
            };
            if let Some(array) = array.filter(|a| a + overhead < edits) {
                self.truncate_ops(start);
                let path = self.here();
                let path_len = pointer_str_len(&self.op_steps[path.clone()]);
                self.op_lens.push(size::replace_len(path_len, array));
                self.ops.push(Op::Replace { path, value: whole });
            }
        }
    }

    /// The compact JSON length of `ops[start..]` as an array.
    fn ops_json_len(&mut self, start: usize) -> usize {
        while self.op_lens.len() < self.ops.len() {
            let len = self.ops[self.op_lens.len()].json_len(&self.op_steps);
            self.op_lens.push(len);
        }
        let count = self.ops.len() - start;
        let body: usize = self.op_lens[start..]
            .iter()
            .fold(0, |acc, l| acc.saturating_add(*l));
        // Brackets and the commas between operations.
        body.saturating_add(count.saturating_sub(1) + 2)
    }

    /// Drops the operations from `start` on.
    fn truncate_ops(&mut self, start: usize) {
        if let Some(split) = &mut self.split
            && let SplitState::Recorded { end } = split.state
            && start < end
        {
            split.state = SplitState::Waiting;
        }
        if let Some(first) = self.ops.get(start) {
            self.op_steps.truncate(first.first_step());
        }
        self.ops.truncate(start);
        self.op_lens.truncate(start);
    }

    /// The configured key for the array at the current path, else the automatic one.
    fn key_for<'a>(&self, old: &'a [Value], new: &'a [Value], live: Live) -> Option<KeySel<'a>>
    where
        'o: 'a,
    {
        let mut bits = live.keys;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let key = &self.options.keys[i];
            if key.array.segments().len() == live.depth {
                return Some(KeySel::Configured(&key.key));
            }
        }
        if !self.options.auto_keys {
            return None;
        }
        let first = old.first().or(new.first())?.as_object()?;
        if first.get("id").is_some_and(|v| Ident::of(v).is_some()) {
            return Some(KeySel::Field("id"));
        }
        let mut candidates = first
            .iter()
            .filter(|(k, v)| k.ends_with("_id") && Ident::of(v).is_some())
            .map(|(k, _)| k.as_str());
        let one = candidates.next()?;
        match candidates.next() {
            None => Some(KeySel::Field(one)),
            Some(_) => {
                // Several `*_id` fields (GBFS: `station_id` and `legacy_id`): take the one named
                // after the array (`stations` -> `station_id`), if there is one.
                let parent = match self.path.last() {
                    Some(Step::Key(key)) => key,
                    Some(Step::Index(_)) | None => "",
                };
                let singular = parent.strip_suffix('s').unwrap_or(parent);
                if singular.is_empty() {
                    return None;
                }
                first
                    .keys()
                    .find(|k| k.strip_suffix("_id") == Some(singular))
                    .map(|k| KeySel::Field(k.as_str()))
            }
        }
    }

    /// Diffs two arrays whose elements are matched by identity. `false` (nothing emitted) when
    /// some element has no scalar identity or an identity repeats: the caller falls back.
    fn keyed(&mut self, old: &'v [Value], new: &'v [Value], sel: &KeySel<'_>, live: Live) -> bool {
        let same_order = old.len() == new.len()
            && old
                .iter()
                .zip(new)
                .all(|(a, b)| matches!((sel.ident(a), sel.ident(b)), (Some(x), Some(y)) if x == y));
        let recording = self.start_split();
        if same_order {
            // Same entities in the same order (most polls): compare in place.
            for (j, (a, b)) in old.iter().zip(new).enumerate() {
                self.compare_element(j, j, a, b, live, recording);
            }
            self.end_split(recording);
            return true;
        }
        let unkeyed = |walk: &mut Self| {
            if recording && let Some(split) = &mut walk.split {
                split.state = SplitState::Waiting;
            }
            false
        };
        let (Some(old_ids), Some(new_ids)) = (sel.idents(old), sel.idents(new)) else {
            return unkeyed(self);
        };
        let Some(old_at) = index_unique(&old_ids) else {
            return unkeyed(self);
        };
        if index_unique(&new_ids).is_none() {
            return unkeyed(self);
        }
        // For each new element, the old index of the same entity, if it existed.
        let from: Vec<Option<usize>> = new_ids.iter().map(|id| old_at.get(id).copied()).collect();
        let mut kept = vec![false; old.len()];
        for i in from.iter().flatten() {
            kept[*i] = true;
        }
        // Entities that keep their relative order stay put; the rest are moved (or removed and
        // added again when moves are off): the fewest operations that reorder.
        let common: Vec<usize> = from.iter().flatten().copied().collect();
        let in_order = increasing_subsequence(&common);
        let mut stays = vec![false; old.len()];
        for (c, &i) in common.iter().enumerate() {
            stays[i] = in_order[c];
        }
        let moves = common.len() - in_order.iter().filter(|s| **s).count();
        let use_move = self.options.allow_move && moves > 0;

        // 1. Removals, highest index first so every index is still the original one.
        for i in (0..old.len()).rev() {
            if !kept[i] || (!use_move && !stays[i]) {
                self.remove_at(i);
            }
        }
        // 2. Moves, each placed right after the entity that precedes it in the new order.
        if use_move {
            self.moves(&from, &stays, &kept);
        }
        // 3. Insertions at their final index, lowest first: every element before that index is
        //    already in its final place.
        for (j, b) in new.iter().enumerate() {
            let present = match from[j] {
                None => false,
                Some(i) => use_move || stays[i],
            };
            if !present {
                self.add_at(j, b);
            }
        }
        // 4. Changes inside entities that were neither added nor re-added, at their final index.
        for (j, b) in new.iter().enumerate() {
            if let Some(i) = from[j]
                && (use_move || stays[i])
            {
                self.compare_element(j, i, &old[i], b, live, recording);
            }
        }
        self.end_split(recording);
        true
    }

    /// Whether the current array is the one whose comparisons are kept apart (then they start).
    fn start_split(&mut self) -> bool {
        let path = &self.path;
        let Some(split) = &mut self.split else {
            return false;
        };
        let here = split.state == SplitState::Waiting
            && split.path.len() == path.len()
            && split
                .path
                .iter()
                .zip(path)
                .all(|(key, step)| matches!(step, Step::Key(k) if *k == key));
        if here {
            split.state = SplitState::Recording;
            split.compared.clear();
        }
        here
    }

    fn end_split(&mut self, recording: bool) {
        if recording && let Some(split) = &mut self.split {
            split.state = SplitState::Recorded {
                end: self.ops.len(),
            };
        }
    }

    /// Compares element `i` of the old array, `a`, with element `j` of the new, `b`, in place
    /// (at index `j`), keeping the comparison apart when `recording`.
    fn compare_element(
        &mut self,
        j: usize,
        i: usize,
        a: &'v Value,
        b: &'v Value,
        live: Live,
        recording: bool,
    ) {
        let start = self.ops.len();
        self.path.push(Step::Index(j));
        let child = self.descend_index(live, j);
        self.value(a, b, child);
        self.path.pop();
        if recording && let Some(split) = &mut self.split {
            split.compared.push((j, i, start..self.ops.len()));
        }
    }

    /// Emits the moves that bring the kept entities (current order: old order) into new order.
    ///
    /// Each entity that does not stay goes right after its predecessor in the new order (or to
    /// the front). Positions are computed in O(n log n): every entity gets a sort key that
    /// orders the array at all times (staying or not-yet-moved entities: their old rank; a moved
    /// entity: its chain's root and its depth in the chain), and a Fenwick tree counts the keys
    /// present below a given one.
    fn moves(&mut self, from: &[Option<usize>], stays: &[bool], kept: &[bool]) {
        // Rank of each kept entity among the kept ones, in old order.
        let mut rank = vec![0usize; kept.len()];
        let mut r = 0;
        for (i, k) in kept.iter().enumerate() {
            if *k {
                rank[i] = r;
                r += 1;
            }
        }
        // Key (root, depth): root 0 is the front; root rank + 1 is an entity that is in place.
        let order: Vec<usize> = from.iter().flatten().copied().collect();
        let mut settled: Vec<(usize, usize)> = Vec::with_capacity(order.len());
        let mut previous: Option<(usize, usize)> = None;
        for &i in &order {
            let key = if stays[i] {
                (rank[i] + 1, 0)
            } else {
                match previous {
                    None => (0, 1),
                    Some((root, depth)) => (root, depth + 1),
                }
            };
            settled.push(key);
            previous = Some(key);
        }
        let mut keys: Vec<(usize, usize)> = (1..=r).map(|x| (x, 0)).collect();
        keys.extend(settled.iter().filter(|k| k.1 > 0));
        keys.sort_unstable();
        keys.dedup();
        let slot = |key: (usize, usize)| keys.partition_point(|k| *k < key);
        let mut present = Fenwick::new(keys.len());
        for x in 1..=r {
            present.add(slot((x, 0)), 1);
        }
        for (&i, &key) in order.iter().zip(&settled) {
            if stays[i] {
                continue;
            }
            let old_slot = slot((rank[i] + 1, 0));
            let at = present.count_below(old_slot);
            present.add(old_slot, -1);
            let new_slot = slot(key);
            let to = present.count_below(new_slot);
            present.add(new_slot, 1);
            if at != to {
                let from = self.at_index(at);
                let path = self.at_index(to);
                self.ops.push(Op::Move { from, path });
            }
        }
    }

    /// Diffs two arrays element by element: a shortest edit script (bounded), else position by
    /// position.
    fn unkeyed(&mut self, old: &'v [Value], new: &'v [Value], live: Live) {
        let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        let suffix = old[prefix..]
            .iter()
            .rev()
            .zip(new[prefix..].iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        let a = &old[prefix..old.len() - suffix];
        let b = &new[prefix..new.len() - suffix];
        if a.is_empty() && b.is_empty() {
            return;
        }
        let script = if a.is_empty() || b.is_empty() {
            Some(vec![myers::Hunk {
                old: 0,
                del: a.len(),
                new: 0,
                ins: b.len(),
            }])
        } else {
            // The search costs about D² for an edit distance D: past a budget linear in the
            // array's length, most aligned elements changed in place anyway, and comparing
            // position by position costs less and loses little.
            let budget = (a.len() + b.len())
                .saturating_mul(LINEAR_WORK_PER_ELEMENT)
                .saturating_add(LINEAR_WORK_FLOOR)
                .min(self.options.max_edit_work);
            myers::hunks(a, b, budget)
        };
        let hunks = script.unwrap_or_else(|| {
            vec![myers::Hunk {
                old: 0,
                del: a.len(),
                new: 0,
                ins: b.len(),
            }]
        });
        // `at` is the index, in the array as the ops emitted so far leave it, of old[prefix + i].
        let mut at = prefix;
        let mut i = 0;
        for h in hunks {
            at += h.old - i;
            let paired = h.del.min(h.ins);
            for t in 0..paired {
                self.path.push(Step::Index(at + t));
                let child = self.descend_index(live, at + t);
                self.value(&a[h.old + t], &b[h.new + t], child);
                self.path.pop();
            }
            for _ in paired..h.del {
                self.remove_at(at + paired);
            }
            for t in paired..h.ins {
                self.add_at(at + t, &b[h.new + t]);
            }
            at += h.ins;
            i = h.old + h.del;
        }
    }
}

/// Counts over slots with prefix sums in O(log n) (a binary indexed tree).
struct Fenwick {
    tree: Vec<i64>,
}

impl Fenwick {
    fn new(len: usize) -> Self {
        Fenwick {
            tree: vec![0; len + 1],
        }
    }

    fn add(&mut self, slot: usize, delta: i64) {
        let mut i = slot + 1;
        while i < self.tree.len() {
            self.tree[i] += delta;
            i += i & i.wrapping_neg();
        }
    }

    /// The sum over slots strictly below `slot`.
    fn count_below(&self, slot: usize) -> usize {
        let mut sum = 0i64;
        let mut i = slot;
        while i > 0 {
            sum += self.tree[i];
            i &= i - 1;
        }
        usize::try_from(sum).unwrap_or(0)
    }
}

/// Maps each identity to its index; `None` when one repeats.
fn index_unique<K: Hash + Eq + Copy>(ids: &[K]) -> Option<HashMap<K, usize>> {
    let mut at = HashMap::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        match at.entry(*id) {
            Entry::Occupied(_) => return None,
            Entry::Vacant(v) => {
                v.insert(i);
            }
        }
    }
    Some(at)
}

/// Marks a longest strictly increasing subsequence of `seq` (patience sorting, O(n log n)).
pub(crate) fn increasing_subsequence(seq: &[usize]) -> Vec<bool> {
    // tails[l] = index in seq of the smallest tail of an increasing run of length l + 1.
    let mut tails: Vec<usize> = Vec::new();
    let mut prev: Vec<Option<usize>> = vec![None; seq.len()];
    for (c, &x) in seq.iter().enumerate() {
        let l = tails.partition_point(|&t| seq[t] < x);
        prev[c] = if l > 0 { Some(tails[l - 1]) } else { None };
        if l == tails.len() {
            tails.push(c);
        } else {
            tails[l] = c;
        }
    }
    let mut marks = vec![false; seq.len()];
    let mut cursor = tails.last().copied();
    while let Some(c) = cursor {
        marks[c] = true;
        cursor = prev[c];
    }
    marks
}

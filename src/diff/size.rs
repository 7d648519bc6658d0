//! Compact JSON lengths computed by walking values, without serializing them.
//!
//! The diff weighs edits against a whole replace on every array that changed: serializing the
//! array (often most of the document) just to count its bytes cost as much as the walk itself.
//! Every length here equals what `serde_json::to_vec` would produce; the tests check it.

use serde_json::{Map, Number, Value};

// The bytes of each operation around its strings and value: `{"op":"add","path":` … `,"value":`
// … `}`, `{"op":"remove","path":` … `}`, `{"op":"move","from":` … `,"path":` … `}`.
const ADD_FRAME: usize = 29;
const REPLACE_FRAME: usize = 33;
const REMOVE_FRAME: usize = 23;
const MOVE_FRAME: usize = 29;

/// The compact JSON length of `value`, or `None` once it exceeds `limit`.
pub(crate) fn value_len(value: &Value, limit: usize) -> Option<usize> {
    let mut sizer = Sizer { len: 0, limit };
    sizer.value(value)?;
    Some(sizer.len)
}

/// The compact JSON length of `items` as an array, or `None` once it exceeds `limit`.
pub(crate) fn array_len(items: &[Value], limit: usize) -> Option<usize> {
    let mut sizer = Sizer { len: 0, limit };
    sizer.items(items)?;
    Some(sizer.len)
}

/// A lower bound of `value`'s compact JSON length, without its contents: a string without
/// its escapes, a float at its fewest bytes, a container as its brackets. Reads no heap memory.
pub(crate) fn shallow_len_lower_bound(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        // `0.0`, `1e9`.
        Value::Number(n) if n.is_f64() => 3,
        Value::Number(n) => number_len(n),
        Value::String(s) => s.len() + 2,
        Value::Array(_) | Value::Object(_) => 2,
    }
}

// Each operation's length from the lengths of its parts: a path as a JSON string literal
// (`path_len`, quotes included) and a value as JSON.

pub(crate) fn add_len(path_len: usize, value_len: usize) -> usize {
    ADD_FRAME.saturating_add(path_len).saturating_add(value_len)
}

pub(crate) fn replace_len(path_len: usize, value_len: usize) -> usize {
    REPLACE_FRAME
        .saturating_add(path_len)
        .saturating_add(value_len)
}

pub(crate) fn remove_len(path_len: usize) -> usize {
    REMOVE_FRAME.saturating_add(path_len)
}

pub(crate) fn move_len(from_len: usize, path_len: usize) -> usize {
    MOVE_FRAME.saturating_add(from_len).saturating_add(path_len)
}

/// The JSON length of `s` as a string literal, quotes and escapes included.
pub(crate) fn str_len(s: &str) -> usize {
    let escapes: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\x08' | b'\t' | b'\n' | b'\x0c' | b'\r' => 1,
            // `\u00XX`.
            0..=0x1f => 5,
            _ => 0,
        })
        .sum();
    s.len() + 2 + escapes
}

struct Sizer {
    len: usize,
    limit: usize,
}

impl Sizer {
    fn add(&mut self, bytes: usize) -> Option<()> {
        self.len = self.len.saturating_add(bytes);
        (self.len <= self.limit).then_some(())
    }

    fn items(&mut self, items: &[Value]) -> Option<()> {
        // Brackets and the commas between items.
        self.add(items.len().saturating_sub(1) + 2)?;
        items.iter().try_for_each(|item| self.value(item))
    }

    fn entries(&mut self, map: &Map<String, Value>) -> Option<()> {
        // Braces, the commas between entries, and each entry's colon.
        self.add(map.len().saturating_sub(1) + 2 + map.len())?;
        map.iter().try_for_each(|(key, item)| {
            self.add(str_len(key))?;
            self.value(item)
        })
    }

    fn value(&mut self, value: &Value) -> Option<()> {
        match value {
            Value::Null | Value::Bool(true) => self.add(4),
            Value::Bool(false) => self.add(5),
            Value::Number(n) => self.add(number_len(n)),
            Value::String(s) => self.add(str_len(s)),
            Value::Array(items) => self.items(items),
            Value::Object(map) => self.entries(map),
        }
    }
}

fn number_len(n: &Number) -> usize {
    if let Some(u) = n.as_u64() {
        digits(u)
    } else if let Some(i) = n.as_i64() {
        // Negative (non-negative integers are u64): the sign, then the magnitude.
        1 + digits(i.unsigned_abs())
    } else {
        // Floats: shortest round-trip formatting has no closed-form length.
        n.to_string().len()
    }
}

fn digits(u: u64) -> usize {
    u.checked_ilog10().map_or(1, |d| d as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use json_patch::PatchOperation;
    use proptest::prelude::*;
    use serde_json::json;

    /// The compact JSON length of `op` from the lengths of its parts.
    fn op_len(op: &PatchOperation) -> usize {
        let value = |v: &Value| value_len(v, usize::MAX).unwrap_or(usize::MAX);
        let path = |p: &json_patch::jsonptr::PointerBuf| str_len(p.as_str());
        match op {
            PatchOperation::Add(op) => add_len(path(&op.path), value(&op.value)),
            PatchOperation::Replace(op) => replace_len(path(&op.path), value(&op.value)),
            PatchOperation::Remove(op) => remove_len(path(&op.path)),
            PatchOperation::Move(op) => move_len(path(&op.from), path(&op.path)),
            PatchOperation::Copy(_) | PatchOperation::Test(_) => {
                serde_json::to_vec(op).map_or(usize::MAX, |v| v.len())
            }
        }
    }

    fn serialized(value: &impl serde::Serialize) -> usize {
        serde_json::to_vec(value).unwrap().len()
    }

    #[test]
    fn lengths_match_serde_json() {
        let samples = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(9),
            json!(10),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(-1),
            json!(1.5),
            json!(-0.0),
            json!(1e300),
            json!(0.1),
            json!(""),
            json!("quote \" backslash \\ tab \t newline \n bell \u{7} del \u{7f} é 😀"),
            json!([]),
            json!({}),
            json!([1, "a", [null], {"k": {"": []}}]),
            json!({"a\"b": 1, "c": [true, false], "d\u{1}": {"e": -2.25}}),
        ];
        for value in &samples {
            assert_eq!(
                value_len(value, usize::MAX),
                Some(serialized(value)),
                "{value}"
            );
        }
    }

    #[test]
    fn value_len_stops_past_the_limit() {
        let value = json!({"a": [1, 2, 3]});
        let len = serialized(&value);
        assert_eq!(value_len(&value, len), Some(len));
        assert_eq!(value_len(&value, len - 1), None);
        assert_eq!(value_len(&value, 0), None);
    }

    #[test]
    fn op_lengths_match_serde_json() {
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/a~1b/0", "value": {"x": [1, "y\n"]}},
            {"op": "replace", "path": "/q\"uote", "value": 3.25},
            {"op": "remove", "path": "/c/d\\e"},
            {"op": "move", "from": "/list/3", "path": "/list/0"},
            {"op": "copy", "from": "/a", "path": "/b"},
            {"op": "test", "path": "/a", "value": null},
        ]))
        .unwrap();
        for op in &patch.0 {
            assert_eq!(op_len(op), serialized(op), "{op:?}");
        }
    }

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec((any::<String>(), inner), 0..8)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_value_len_matches_serde_json(value in any_value()) {
            prop_assert_eq!(value_len(&value, usize::MAX), Some(serialized(&value)));
            prop_assert!(shallow_len_lower_bound(&value) <= serialized(&value));
        }
    }
}

//! A JSON Schema inferred from documents: pure, conservative and deterministic.
//!
//! Conservative: it says only what every sample shows and what a later document is unlikely to
//! break. Types are those seen (`integer` only when every number seen was one; a key seen only
//! as `null` is left unconstrained, since it most likely holds something else when set);
//! objects require the keys present in every sample and allow others; an array's items share
//! one schema merged from every element of every sample. No formats, bounds or enums: a value
//! seen once says nothing about the next one. Deterministic: properties in sorted order.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// The schema inferred from `samples` (e.g. the current document); `{}` (anything) for none.
pub fn infer<'a>(samples: impl IntoIterator<Item = &'a Value>) -> Value {
    let mut shape = Shape::default();
    for sample in samples {
        shape.add(sample);
    }
    shape.schema()
}

/// What the values seen at one place have in common.
#[derive(Default)]
struct Shape {
    /// How many values were seen.
    seen: usize,
    null: bool,
    boolean: bool,
    integer: bool,
    number: bool,
    string: bool,
    /// The merged elements of every array seen, when any was.
    array: Option<Box<Shape>>,
    /// Objects seen, and each key's values.
    objects: usize,
    properties: BTreeMap<String, Shape>,
}

impl Shape {
    fn add(&mut self, value: &Value) {
        self.seen += 1;
        match value {
            Value::Null => self.null = true,
            Value::Bool(_) => self.boolean = true,
            Value::Number(n) if n.is_i64() || n.is_u64() => self.integer = true,
            Value::Number(_) => self.number = true,
            Value::String(_) => self.string = true,
            Value::Array(items) => {
                let elements = self.array.get_or_insert_with(Box::default);
                for item in items {
                    elements.add(item);
                }
            }
            Value::Object(object) => {
                self.objects += 1;
                for (key, value) in object {
                    self.properties.entry(key.clone()).or_default().add(value);
                }
            }
        }
    }

    fn schema(&self) -> Value {
        let mut types = Vec::new();
        let only_null = self.null
            && !(self.boolean
                || self.integer
                || self.number
                || self.string
                || self.array.is_some()
                || self.objects > 0);
        if self.seen == 0 || only_null {
            return json!({});
        }
        if self.null {
            types.push("null");
        }
        if self.boolean {
            types.push("boolean");
        }
        match (self.integer, self.number) {
            (true, false) => types.push("integer"),
            (_, true) => types.push("number"),
            (false, false) => {}
        }
        if self.string {
            types.push("string");
        }
        if self.array.is_some() {
            types.push("array");
        }
        if self.objects > 0 {
            types.push("object");
        }
        let mut schema = Map::new();
        schema.insert(
            "type".into(),
            match types.as_slice() {
                [one] => json!(one),
                many => json!(many),
            },
        );
        if let Some(elements) = &self.array {
            schema.insert("items".into(), elements.schema());
        }
        if self.objects > 0 {
            let properties: Map<String, Value> = self
                .properties
                .iter()
                .map(|(key, shape)| (key.clone(), shape.schema()))
                .collect();
            let required: Vec<&String> = self
                .properties
                .iter()
                .filter(|(_, shape)| shape.present_in_all(self.objects))
                .map(|(key, _)| key)
                .collect();
            schema.insert("properties".into(), Value::Object(properties));
            if !required.is_empty() {
                schema.insert("required".into(), json!(required));
            }
        }
        Value::Object(schema)
    }

    /// True when the key was present in each of the `objects` objects seen (a key appears at
    /// most once per object).
    fn present_in_all(&self, objects: usize) -> bool {
        self.seen == objects
    }
}

/// `schema` without any `required` keyword: for documents whose fields may be dropped (a
/// view's `fields` projection keeps only some of each entity's).
pub fn without_required(schema: &Value) -> Value {
    match schema {
        Value::Object(object) => Value::Object(
            object
                .iter()
                .filter(|(key, _)| key.as_str() != "required")
                .map(|(key, value)| (key.clone(), without_required(value)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_required).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn objects_require_what_every_item_has() {
        let doc = json!({"header": {"tick": 3}, "vehicles": [
            {"id": "a", "lat": 1.5, "stop": "s1"},
            {"id": "b", "lat": 2, "note": null},
        ]});
        assert_eq!(
            infer([&doc]),
            json!({
                "type": "object",
                "properties": {
                    "header": {"type": "object", "properties": {"tick": {"type": "integer"}}, "required": ["tick"]},
                    "vehicles": {"type": "array", "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "lat": {"type": "number"},
                            "note": {},
                            "stop": {"type": "string"},
                        },
                        "required": ["id", "lat"],
                    }},
                },
                "required": ["header", "vehicles"],
            })
        );
    }

    #[test]
    fn mixed_and_empty_values() {
        assert_eq!(infer([]), json!({}));
        assert_eq!(infer([&json!([])]), json!({"type": "array", "items": {}}));
        assert_eq!(
            infer([&json!([1, "a", null, true])]),
            json!({"type": "array", "items": {"type": ["null", "boolean", "integer", "string"]}})
        );
        assert_eq!(
            without_required(&infer([&json!({"a": {"b": 1}})])),
            json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}})
        );
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z]{0,4}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                prop::collection::btree_map("[a-c]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Whether `value` satisfies `schema`, for the keywords `infer` writes.
    fn satisfies(schema: &Value, value: &Value) -> bool {
        if let Some(types) = schema.get("type") {
            let name = match value {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            let allowed = |t: &Value| t == name || (t == "number" && name == "integer");
            let ok = match types {
                Value::Array(list) => list.iter().any(allowed),
                one => allowed(one),
            };
            if !ok {
                return false;
            }
        }
        match value {
            Value::Array(items) => schema
                .get("items")
                .is_none_or(|s| items.iter().all(|i| satisfies(s, i))),
            Value::Object(object) => {
                let required = schema["required"].as_array().cloned().unwrap_or_default();
                required
                    .iter()
                    .all(|k| k.as_str().is_some_and(|k| object.contains_key(k)))
                    && object.iter().all(|(k, v)| {
                        schema
                            .get("properties")
                            .and_then(|p| p.get(k))
                            .is_none_or(|s| satisfies(s, v))
                    })
            }
            _ => true,
        }
    }

    proptest! {
        /// Every sample satisfies the schema inferred from the samples, and the schema does not
        /// depend on the samples' order.
        #[test]
        fn samples_satisfy_their_schema(samples in prop::collection::vec(value(), 1..4)) {
            let schema = infer(&samples);
            for sample in &samples {
                prop_assert!(satisfies(&schema, sample), "{sample} against {schema}");
            }
            let reversed: Vec<&Value> = samples.iter().rev().collect();
            prop_assert_eq!(infer(reversed), schema);
        }
    }
}

//! How a view selects (pure): where a stream's entities are, what identifies one, the values
//! an alias reads from it, whether a view keeps it, and what of it the view keeps.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::spec::ViewSpec;
use crate::diff::{PathPattern, Segment};

/// A stream's entities as views see them.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    /// The JSON Pointer tokens of the array of entities (e.g. `["entity"]`).
    pub entities: Vec<String>,
    /// The tokens of the field that identifies an entity (e.g. `["id"]`).
    pub key: Vec<String>,
    /// Alias → where its values are inside an entity (any match counts).
    pub aliases: BTreeMap<String, Vec<PathPattern>>,
}

/// A view ready to evaluate: its spec with every alias resolved to paths.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The spec it came from.
    pub spec: ViewSpec,
    equals: Vec<(Vec<PathPattern>, BTreeSet<String>)>,
    fields: Option<Vec<Vec<String>>>,
}

impl Selector {
    /// The aliases' names.
    pub fn alias_names(&self) -> BTreeSet<String> {
        self.aliases.keys().cloned().collect()
    }

    /// `spec` against this stream's aliases (the parser already refused unknown ones).
    pub fn compile(&self, spec: ViewSpec) -> Compiled {
        let equals = spec
            .equals
            .iter()
            .map(|(alias, values)| {
                (
                    self.aliases.get(alias).cloned().unwrap_or_default(),
                    values.clone(),
                )
            })
            .collect();
        let fields = spec.fields.as_ref().map(|fields| {
            let mut paths: Vec<Vec<String>> = fields.iter().map(|f| tokens(f)).collect();
            // The key always stays: a view's entities are matched by it like the stream's.
            if !paths.contains(&self.key) {
                paths.insert(0, self.key.clone());
            }
            paths
        });
        Compiled {
            spec,
            equals,
            fields,
        }
    }

    /// The array of entities in `document`, if there is one.
    pub fn entities<'a>(&self, document: &'a Value) -> Option<&'a Vec<Value>> {
        walk(document, &self.entities)?.as_array()
    }

    /// An entity's identity (its key field as JSON text), `None` without one.
    pub fn key_of(&self, entity: &Value) -> Option<String> {
        walk(entity, &self.key).map(scalar_text)
    }

    /// The view's document of `document`: the same document, its entity array holding only the
    /// entities `keep` says the view keeps, each as `view` projects it.
    pub fn view_document(
        &self,
        document: &Value,
        view: &Compiled,
        mut keep: impl FnMut(usize, &Value) -> bool,
    ) -> Value {
        let Some(entities) = self.entities(document) else {
            return document.clone();
        };
        let kept: Vec<Value> = entities
            .iter()
            .enumerate()
            .filter(|(i, e)| keep(*i, e))
            .map(|(_, e)| view.project(e))
            .collect();
        with_entities(document, &self.entities, Value::Array(kept))
    }
}

impl Selector {
    /// `document` with its entity array replaced by `entities` (a clone of everything else).
    pub fn replace_entities(&self, document: &Value, entities: Value) -> Value {
        with_entities(document, &self.entities, entities)
    }
}

impl Compiled {
    /// Whether the view keeps `entity`: every alias has a wanted value, and the expression (if
    /// any) selects it.
    pub fn matches(&self, entity: &Value) -> bool {
        let equal = self.equals.iter().all(|(paths, wanted)| {
            paths.iter().any(|path| {
                let mut found = false;
                values_at(entity, path.segments(), &mut |v| {
                    found |= wanted.contains(&*scalar_str(v));
                });
                found
            })
        });
        if !equal {
            return false;
        }
        match &self.spec.expression {
            None => true,
            Some(expression) => {
                // `$[?expr]` over a one-entity array: `@` is the entity.
                let one = Value::Array(vec![entity.clone()]);
                !expression.query.query(&one).is_empty()
            }
        }
    }

    /// Whether the view's only filter is one equality (the index of equalities decides it).
    pub fn one_equality(&self) -> bool {
        self.equals.len() == 1 && self.spec.expression.is_none()
    }

    /// Whether the view keeps every entity (no filter: only a projection).
    pub fn keeps_all(&self) -> bool {
        self.equals.is_empty() && self.spec.expression.is_none()
    }

    /// The aliases this view filters on, with their wanted values (for the index).
    pub fn equalities(&self) -> impl Iterator<Item = (&String, &BTreeSet<String>)> {
        self.spec.equals.iter()
    }

    /// Whether the view keeps only some fields of each entity.
    pub fn projects(&self) -> bool {
        self.fields.is_some()
    }

    /// The paths the view keeps of each entity (the key's included), if it projects.
    pub fn fields(&self) -> Option<&[Vec<String>]> {
        self.fields.as_deref()
    }

    /// What the view keeps of `entity`: its fields, or the whole entity without `fields`.
    pub fn project(&self, entity: &Value) -> Value {
        let Some(fields) = &self.fields else {
            return entity.clone();
        };
        let mut out = Value::Object(Map::new());
        for path in fields {
            if let Some(value) = walk(entity, path) {
                place(&mut out, path, value.clone());
            }
        }
        out
    }
}

/// The JSON Pointer `pointer`'s tokens (decoded).
pub fn tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// The value at `path` (object keys, or array indices).
pub fn walk<'a>(mut value: &'a Value, path: &[String]) -> Option<&'a Value> {
    for token in path {
        value = match value {
            Value::Object(map) => map.get(token)?,
            Value::Array(items) => items.get(token.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Every value at `segments` (`*` is any member or element).
pub fn values_at<'a>(value: &'a Value, segments: &[Segment], found: &mut impl FnMut(&'a Value)) {
    let Some((first, rest)) = segments.split_first() else {
        match value {
            // An alias on an array matches any of its scalar elements.
            Value::Array(items) => items.iter().for_each(&mut *found),
            other => found(other),
        }
        return;
    };
    match (first, value) {
        (Segment::Any, Value::Object(map)) => map.values().for_each(|v| values_at(v, rest, found)),
        (Segment::Any, Value::Array(items)) => items.iter().for_each(|v| values_at(v, rest, found)),
        (Segment::Token(token), Value::Object(map)) => {
            if let Some(v) = map.get(token) {
                values_at(v, rest, found);
            }
        }
        (Segment::Token(token), Value::Array(items)) => {
            if let Some(v) = token.parse::<usize>().ok().and_then(|i| items.get(i)) {
                values_at(v, rest, found);
            }
        }
        _ => {}
    }
}

/// A scalar as a filter compares it: a string as itself, anything else as its JSON text.
pub fn scalar_text(value: &Value) -> String {
    scalar_str(value).into_owned()
}

/// [`scalar_text`], borrowed when the value is a string (what filters compare most).
pub fn scalar_str(value: &Value) -> Cow<'_, str> {
    match value {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

/// Puts `value` at `path` in `out`, creating the objects on the way.
fn place(out: &mut Value, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        *out = value;
        return;
    };
    let mut at = out;
    for token in parents {
        let Value::Object(map) = at else { return };
        at = map
            .entry(token.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if let Value::Object(map) = at {
        map.insert(last.clone(), value);
    }
}

/// `document` with the value at `path` replaced by `entities` (a clone except along `path`).
fn with_entities(document: &Value, path: &[String], entities: Value) -> Value {
    let Some((first, rest)) = path.split_first() else {
        return entities;
    };
    match document {
        Value::Object(map) => {
            // Moved into place, not cloned: a view's entities are built for it, and copying them
            // again cost as much as building them (keys are unique, so one key takes them).
            let mut entities = Some(entities);
            let mut out = Map::with_capacity(map.len());
            for (key, value) in map {
                let value = match entities.take_if(|_| key == first) {
                    Some(entities) => with_entities(value, rest, entities),
                    None => value.clone(),
                };
                out.insert(key.clone(), value);
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// `a == b`, without hashing: serde_json compares two objects by looking each key of one up in
/// the other, while the entities of consecutive polls almost always list their keys in the same
/// order, so pairs are compared by position until the orders differ (then by `==`).
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            if x.len() != y.len() {
                return false;
            }
            for ((key_a, value_a), (key_b, value_b)) in x.iter().zip(y) {
                if key_a != key_b {
                    return a == b;
                }
                if !same(value_a, value_b) {
                    return false;
                }
            }
            true
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::spec::{Asked, parse_query};
    use serde_json::json;

    fn selector() -> Selector {
        let mut aliases = BTreeMap::new();
        aliases.insert(
            "route".to_owned(),
            vec![
                PathPattern::parse("/trip/route_id").unwrap(),
                PathPattern::parse("/vehicle/trip/route_id").unwrap(),
            ],
        );
        aliases.insert(
            "stop".to_owned(),
            vec![PathPattern::parse("/stops/*/stop_id").unwrap()],
        );
        Selector {
            entities: vec!["entity".into()],
            key: vec!["id".into()],
            aliases,
        }
    }

    fn view(query: &str) -> Compiled {
        let s = selector();
        match parse_query(Some(query), &s.alias_names()) {
            Ok(Asked::AdHoc(spec)) => s.compile(spec),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn aliases_match_any_of_their_paths_and_any_element() {
        let red = view("route=Red");
        assert!(red.matches(&json!({"id": 1, "trip": {"route_id": "Red"}})));
        assert!(red.matches(&json!({"id": 1, "vehicle": {"trip": {"route_id": "Red"}}})));
        assert!(!red.matches(&json!({"id": 1, "trip": {"route_id": "Blue"}})));
        let stop = view("stop=70061");
        assert!(stop.matches(&json!({"id": 1, "stops": [{"stop_id": "1"}, {"stop_id": "70061"}]})));
        let both = view("route=Red&stop=1");
        assert!(!both.matches(&json!({"id": 1, "trip": {"route_id": "Red"}})));
        let number = view("route=7");
        assert!(number.matches(&json!({"id": 1, "trip": {"route_id": 7}})));
    }

    #[test]
    fn expressions_are_rfc_9535_filters_on_the_entity() {
        let stopped = view("where=@.status%20%3D%3D%20'STOPPED'%20%26%26%20@.speed%20%3C%205");
        assert!(stopped.matches(&json!({"id": 1, "status": "STOPPED", "speed": 0})));
        assert!(!stopped.matches(&json!({"id": 1, "status": "STOPPED", "speed": 9})));
        assert!(!stopped.matches(&json!({"id": 1, "status": "MOVING", "speed": 0})));
    }

    fn value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (0..3i64).prop_map(Value::from),
            prop::sample::select(vec!["a", "b"]).prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                // Few key names, so that objects often share keys in one order or another.
                prop::collection::vec((prop::sample::select(vec!["k", "l", "m"]), inner), 0..4)
                    .prop_map(|pairs| {
                        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                    }),
            ]
        })
    }

    /// `a` with the keys of every object in reverse order (the same value).
    fn reversed(a: &Value) -> Value {
        match a {
            Value::Object(map) => Value::Object(
                map.iter()
                    .rev()
                    .map(|(k, v)| (k.clone(), reversed(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(reversed).collect()),
            other => other.clone(),
        }
    }

    proptest::proptest! {
        /// `same` is `==`: on unrelated values, on equal ones, and on equal ones whose objects
        /// list their keys in another order.
        #[test]
        fn same_is_equality(a in value(), b in value()) {
            proptest::prop_assert_eq!(same(&a, &b), a == b);
            proptest::prop_assert!(same(&a, &a.clone()));
            let r = reversed(&a);
            proptest::prop_assert!(same(&a, &r) && same(&r, &a));
            proptest::prop_assert_eq!(same(&r, &b), r == b);
        }
    }

    #[test]
    fn a_view_keeps_the_documents_shape() {
        let s = selector();
        let v = view("route=Red&fields=trip/route_id");
        let doc = json!({
            "header": {"t": 1},
            "entity": [
                {"id": 1, "trip": {"route_id": "Red", "trip_id": "x"}},
                {"id": 2, "trip": {"route_id": "Blue"}}
            ]
        });
        let out = s.view_document(&doc, &v, |_, e| v.matches(e));
        assert_eq!(
            out,
            json!({"header": {"t": 1}, "entity": [{"id": 1, "trip": {"route_id": "Red"}}]})
        );
    }
}

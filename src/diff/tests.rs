//! Unit and property tests of the diff engine.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::validation::Problems;

fn options(toml_table: &str) -> DiffOptions {
    let config: DiffConfig = toml_from(toml_table);
    let mut problems = Problems::default();
    let options = config.validate("streams[0].diff", &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    options.unwrap()
}

fn toml_from(text: &str) -> DiffConfig {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .unwrap()
}

fn ops_json(patch: &Patch) -> Value {
    serde_json::to_value(patch).unwrap()
}

/// Diffs, checks the patch reproduces `new` from `old` and that [`diff_json`] writes exactly
/// its JSON, and returns it.
fn round_trip(old: &Value, new: &Value, options: &DiffOptions) -> Patch {
    let patch = diff(old, new, options);
    let written = diff_json(old, new, options);
    assert_eq!(
        String::from_utf8(written.json).unwrap(),
        serde_json::to_string(&patch).unwrap()
    );
    assert_eq!(written.operations, patch.0.len());
    assert_eq!(written.only_ignored, only_ignored(&patch, options));
    let mut doc = old.clone();
    apply(&mut doc, &patch).unwrap_or_else(|e| panic!("{e}\npatch: {}", ops_json(&patch)));
    assert_eq!(&doc, new, "patch: {}", ops_json(&patch));
    patch
}

/// Filler that makes re-sending an element cost more than a few field-level operations, as it
/// does in real feeds (tiny arrays are otherwise replaced whole, which is smaller).
const BULK: &str = "a realistic amount of data that a whole-array replace would have to resend";

fn fleet(ids: impl IntoIterator<Item = u32>) -> Value {
    let entity: Vec<Value> = ids
        .into_iter()
        .map(|i| json!({"id": format!("v{i}"), "vehicle": {"lat": f64::from(i) / 10.0, "lon": 1.5, "label": format!("bus {i}")}}))
        .collect();
    json!({"header": {"timestamp": 1}, "entity": entity})
}

#[test]
fn one_entity_leaving_the_front_is_one_remove() {
    let old = fleet(0..1000);
    let new = fleet(1..1000);
    let patch = round_trip(&old, &new, &DiffOptions::default());
    assert_eq!(
        ops_json(&patch),
        json!([{"op": "remove", "path": "/entity/0"}])
    );
}

#[test]
fn added_removed_and_changed_entities_take_one_op_each() {
    let old = fleet(0..100);
    let mut new = fleet((0..100).filter(|i| *i != 10 && *i != 50).chain([200, 201]));
    new["entity"][3]["vehicle"]["lat"] = json!(99.0);
    let patch = round_trip(&old, &new, &DiffOptions::default());
    assert_eq!(
        ops_json(&patch),
        json!([
            {"op": "remove", "path": "/entity/50"},
            {"op": "remove", "path": "/entity/10"},
            {"op": "add", "path": "/entity/98", "value": new["entity"][98]},
            {"op": "add", "path": "/entity/99", "value": new["entity"][99]},
            {"op": "replace", "path": "/entity/3/vehicle/lat", "value": 99.0},
        ])
    );
}

#[test]
fn reordering_uses_moves_only_when_allowed() {
    let old = fleet(0..6);
    let new = fleet([5, 0, 1, 2, 3, 4]);
    let patch = round_trip(&old, &new, &DiffOptions::default());
    assert_eq!(
        ops_json(&patch),
        json!([
            {"op": "remove", "path": "/entity/5"},
            {"op": "add", "path": "/entity/0", "value": new["entity"][0]},
        ])
    );
    let moving = DiffOptions {
        allow_move: true,
        ..DiffOptions::default()
    };
    let patch = round_trip(&old, &new, &moving);
    assert_eq!(
        ops_json(&patch),
        json!([{"op": "move", "from": "/entity/5", "path": "/entity/0"}])
    );
}

#[test]
fn moves_with_changes_removals_and_additions_apply_in_sequence() {
    let old = fleet(0..10);
    let mut new = fleet([9, 8, 2, 11, 3, 0, 1, 12, 5, 7]);
    new["entity"][1]["vehicle"]["label"] = json!("renamed");
    let moving = DiffOptions {
        allow_move: true,
        ..DiffOptions::default()
    };
    let patch = round_trip(&old, &new, &moving);
    assert!(
        patch
            .0
            .iter()
            .any(|op| matches!(op, PatchOperation::Move(_)))
    );
    round_trip(&old, &new, &DiffOptions::default());
}

#[test]
fn large_reorders_take_one_move_per_displaced_entity() {
    let moving = DiffOptions {
        allow_move: true,
        ..DiffOptions::default()
    };
    let old = fleet(0..1000);
    let new = fleet((0..1000).rev());
    let patch = round_trip(&old, &new, &moving);
    assert_eq!(patch.0.len(), 999);
    // Interleaved: evens keep their order, odds go to the back in reverse.
    let new = fleet((0..1000).step_by(2).chain((1..1000).step_by(2).rev()));
    let patch = round_trip(&old, &new, &moving);
    assert!(patch.0.len() <= 500, "{} ops", patch.0.len());
}

#[test]
fn nested_keys_ignore_unstable_entity_ids() {
    let entity = |poll: u32, vehicle: &str, lat: f64| json!({"id": format!("{poll}-{vehicle}"), "vehicle": {"vehicle": {"id": vehicle}, "lat": lat, "note": BULK}});
    let old = json!({"entity": [entity(1, "a", 1.0), entity(1, "b", 2.0), entity(1, "c", 3.0)]});
    let new = json!({"entity": [entity(2, "b", 2.0), entity(2, "c", 3.5)]});
    let keyed = options(r#"keys = { "/entity" = "vehicle/vehicle/id" }"#);
    let patch = round_trip(&old, &new, &keyed);
    assert_eq!(
        ops_json(&patch),
        json!([
            {"op": "remove", "path": "/entity/0"},
            {"op": "replace", "path": "/entity/0/id", "value": "2-b"},
            {"op": "replace", "path": "/entity/1/id", "value": "2-c"},
            {"op": "replace", "path": "/entity/1/vehicle/lat", "value": 3.5},
        ])
    );
}

#[test]
fn wildcard_patterns_key_nested_arrays() {
    let trip = |id: &str, stops: &[(u32, i64)]| {
        let stops: Vec<Value> = stops
            .iter()
            .map(|(seq, delay)| json!({"stop_sequence": seq, "arrival": {"delay": delay}, "note": BULK}))
            .collect();
        json!({"id": id, "trip_update": {"stop_time_update": stops}})
    };
    let old = json!({"entity": [trip("t1", &[(1, 0), (2, 0), (3, 0)]), trip("t2", &[(5, 0)])]});
    let new = json!({"entity": [trip("t1", &[(2, 30), (3, 0)]), trip("t2", &[(5, 0), (6, 1)])]});
    let keyed = options(
        r#"keys = { "/entity" = "id", "/entity/*/trip_update/stop_time_update" = "stop_sequence" }"#,
    );
    let patch = round_trip(&old, &new, &keyed);
    assert_eq!(
        ops_json(&patch),
        json!([
            {"op": "remove", "path": "/entity/0/trip_update/stop_time_update/0"},
            {"op": "replace", "path": "/entity/0/trip_update/stop_time_update/0/arrival/delay", "value": 30},
            {"op": "add", "path": "/entity/1/trip_update/stop_time_update/1", "value": {"stop_sequence": 6, "arrival": {"delay": 1}, "note": BULK}},
        ])
    );
}

#[test]
fn duplicate_or_missing_keys_fall_back_to_an_edit_script() {
    let old = json!({"a": [{"id": 1, "x": 1}, {"id": 1, "x": 2}, {"id": 2, "x": 3}]});
    let new = json!({"a": [{"id": 1, "x": 2}, {"id": 2, "x": 3}]});
    let patch = round_trip(&old, &new, &DiffOptions::default());
    assert_eq!(ops_json(&patch), json!([{"op": "remove", "path": "/a/0"}]));
    let old = json!([{"id": 1}, {"name": "no id"}, 3]);
    let new = json!([{"name": "no id"}, 3, {"id": 1}]);
    round_trip(&old, &new, &DiffOptions::default());
}

#[test]
fn gbfs_style_arrays_pick_the_id_named_after_the_array() {
    let station = |id: &str, legacy: &str, bikes: u32| json!({"legacy_id": legacy, "num_bikes_available": bikes, "station_id": id});
    let old = json!({"data": {"stations": [station("a", "1", 1), station("b", "2", 2), station("c", "3", 3)]}});
    let new = json!({"data": {"stations": [station("b", "2", 2), station("c", "3", 4)]}});
    let patch = round_trip(&old, &new, &DiffOptions::default());
    assert_eq!(
        ops_json(&patch),
        json!([
            {"op": "remove", "path": "/data/stations/0"},
            {"op": "replace", "path": "/data/stations/1/num_bikes_available", "value": 4},
        ])
    );
}

#[test]
fn pointers_are_escaped() {
    let old = json!({"a/b": {"c~d": 1}, "": [1]});
    let new = json!({"a/b": {"c~d": 2}, "": [1, 2], "~/": true});
    let patch = round_trip(&old, &new, &DiffOptions::default());
    assert_eq!(
        ops_json(&patch),
        json!([
            {"op": "replace", "path": "/a~1b/c~0d", "value": 2},
            {"op": "add", "path": "//1", "value": 2},
            {"op": "add", "path": "/~0~1", "value": true},
        ])
    );
    let keyed = options(r#"keys = { "/a~1b/*" = "k~1ey" }"#);
    assert_eq!(keyed.keys[0].array.as_str(), "/a~1b/*");
    assert_eq!(keyed.keys[0].key.fields(), &["k/ey"]);
}

#[test]
fn root_is_replaced_only_when_its_kind_changes() {
    let o = DiffOptions::default();
    let patch = diff(&json!({"a": 1}), &json!([1]), &o);
    assert!(is_root_replace(&patch));
    assert_eq!(
        ops_json(&patch),
        json!([{"op": "replace", "path": "", "value": [1]}])
    );
    assert!(is_root_replace(&diff(&json!(1), &json!(2), &o)));
    assert!(diff(&json!(1), &json!(1), &o).0.is_empty());
    let patch = round_trip(&json!({"a": 1}), &json!({"b": 2}), &o);
    assert!(!is_root_replace(&patch));
    let patch = round_trip(&json!([1, 2]), &json!(["x", "y", "z"]), &o);
    assert!(!is_root_replace(&patch));
}

#[test]
fn unrelated_nested_values_are_replaced_whole() {
    let old = json!({"a": {"x": 1, "y": 2}, "b": [1, 2, 3, 4]});
    let new = json!({"a": {"p": 1, "q": 2}, "b": [5, 6, 7, 8]});
    let patch = round_trip(&old, &new, &DiffOptions::default());
    assert_eq!(
        ops_json(&patch),
        json!([
            {"op": "replace", "path": "/a", "value": {"p": 1, "q": 2}},
            {"op": "replace", "path": "/b", "value": [5, 6, 7, 8]},
        ])
    );
}

#[test]
fn ignored_changes_alone_publish_nothing_and_ride_along_otherwise() {
    let o = options(r#"ignore = ["/header/timestamp", "/data/stations/*/last_reported"]"#);
    let doc = |ts: u32, reported: [u32; 3], bikes: u32| {
        json!({
            "header": {"timestamp": ts},
            "data": {"stations": [
                {"last_reported": reported[0], "bikes": 1},
                {"last_reported": reported[1], "bikes": bikes},
                {"last_reported": reported[2], "bikes": 3},
            ]}
        })
    };
    let old = doc(1, [10, 20, 30], 2);
    let quiet = round_trip(&old, &doc(2, [11, 21, 31], 2), &o);
    assert_eq!(quiet.0.len(), 4);
    assert!(only_ignored(&quiet, &o));
    let busy = round_trip(&old, &doc(2, [11, 21, 31], 5), &o);
    assert!(!only_ignored(&busy, &o));
    assert_eq!(
        busy.0.len(),
        5,
        "ignored fields ride along: {}",
        ops_json(&busy)
    );
    assert!(only_ignored(&Patch(Vec::new()), &o));
    // Without ignore patterns the same quiet change is one replace of the array: smaller.
    let plain = round_trip(&old, &doc(2, [11, 21, 31], 2), &DiffOptions::default());
    assert_eq!(plain.0.len(), 2, "{}", ops_json(&plain));
    assert_eq!(plain.0[1].path().as_str(), "/data/stations");
}

#[test]
fn only_ignored_needs_every_op_covered() {
    let o = options(r#"ignore = ["/header/timestamp"]"#);
    let patch: Patch = serde_json::from_value(json!([
        {"op": "replace", "path": "/header/timestamp", "value": 2},
        {"op": "replace", "path": "/header", "value": {}},
    ]))
    .unwrap();
    assert!(!only_ignored(&patch, &o));
    let patch: Patch = serde_json::from_value(json!([
        {"op": "move", "from": "/x", "path": "/header/timestamp"},
    ]))
    .unwrap();
    assert!(!only_ignored(&patch, &o));
}

#[test]
fn prefer_snapshot_compares_against_the_ratio() {
    let o = DiffOptions {
        max_patch_ratio: 0.5,
        ..DiffOptions::default()
    };
    assert!(!prefer_snapshot(50, 100, &o));
    assert!(prefer_snapshot(51, 100, &o));
    assert!(!prefer_snapshot(100, 100, &DiffOptions::default()));
    assert!(prefer_snapshot(101, 100, &DiffOptions::default()));
}

#[test]
fn validation_names_the_key_and_what_was_expected() {
    let config = toml_from(
        r#"
        keys = { "entity" = "id", "/ok" = "/id", "/bad~" = "x" }
        ignore = ["/fine", "", "nope"]
        max_patch_ratio = 1.5
        max_edit_work = 0
        "#,
    );
    let mut problems = Problems::default();
    assert!(config.validate("streams[0].diff", &mut problems).is_none());
    let err = problems.finish(None, ()).unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "streams[0].diff.max_patch_ratio",
            "streams[0].diff.max_edit_work",
            "streams[0].diff.keys.\"/bad~\"",
            "streams[0].diff.keys.\"/ok\"",
            "streams[0].diff.keys.\"entity\"",
            "streams[0].diff.ignore[1]",
            "streams[0].diff.ignore[2]",
        ]
    );
    let text = err.to_string();
    assert!(text.contains("starting with `/`"), "{text}");
    assert!(text.contains("without a leading `/`"), "{text}");
    assert!(text.contains("greater than 0 and at most 1"), "{text}");
}

#[test]
fn unknown_fields_are_rejected() {
    let result = config::Config::builder()
        .add_source(config::File::from_str(
            "allow_moves = true",
            config::FileFormat::Toml,
        ))
        .build()
        .and_then(|c| c.try_deserialize::<DiffConfig>());
    assert!(result.is_err());
}

#[test]
fn more_specific_key_patterns_win() {
    let o = options(r#"keys = { "/*" = "a", "/items" = "b" }"#);
    assert_eq!(o.keys[0].array.as_str(), "/items");
    let old = json!({"items": [{"a": 1, "b": "x", "v": 1}, {"a": 1, "b": "y", "v": 2}]});
    let new = json!({"items": [{"a": 1, "b": "y", "v": 2}]});
    let patch = round_trip(&old, &new, &o);
    assert_eq!(
        ops_json(&patch),
        json!([{"op": "remove", "path": "/items/0"}])
    );
}

#[test]
fn a_tiny_work_bound_still_round_trips() {
    let o = DiffOptions {
        max_edit_work: 1,
        auto_keys: false,
        ..DiffOptions::default()
    };
    let old = json!({"a": [1, 2, 3, 4, 5, 6, 7, 8], "b": [{"x": 1}, {"x": 2}, {"x": 3}]});
    let new = json!({"a": [0, 2, 9, 4, 6, 8, 10], "b": [{"x": 2}, {"x": 3}, {"x": 1}, {"x": 0}]});
    round_trip(&old, &new, &o);
}

// ---------------------------------------------------------------------------------------------
// Property tests.

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..3).prop_map(Value::from),
        prop_oneof![Just(0.5f64), Just(-1.25)].prop_map(Value::from),
        prop_oneof![Just(""), Just("a"), Just("b"), Just("a/b~c")].prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((arb_key(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("id".to_owned()),
        Just("x".to_owned()),
        Just("y".to_owned()),
        Just("a/b".to_owned()),
        Just("~".to_owned()),
        Just(String::new()),
    ]
}

/// An object root (`object` true) or an array root, with arbitrary content.
fn arb_root(object: bool) -> BoxedStrategy<Value> {
    if object {
        proptest::collection::vec((arb_key(), arb_json()), 0..6)
            .prop_map(|kv| Value::Object(kv.into_iter().collect()))
            .boxed()
    } else {
        proptest::collection::vec(arb_json(), 0..6)
            .prop_map(Value::Array)
            .boxed()
    }
}

fn arb_container() -> impl Strategy<Value = Value> {
    any::<bool>().prop_flat_map(arb_root)
}

fn arb_pair() -> impl Strategy<Value = (Value, Value)> {
    any::<bool>().prop_flat_map(|object| (arb_root(object), arb_root(object)))
}

/// An entity array whose ids come from a small pool so that pairs share, lose and gain ids.
fn arb_fleet() -> impl Strategy<Value = Value> {
    proptest::sample::subsequence((0u32..12).collect::<Vec<_>>(), 0..12)
        .prop_flat_map(|ids| {
            let n = ids.len();
            (
                Just(ids).prop_shuffle(),
                proptest::collection::vec(0i64..3, n),
            )
        })
        .prop_map(|(ids, speeds)| {
            let entity: Vec<Value> = ids
                .into_iter()
                .zip(speeds)
                .map(|(id, speed)| json!({"id": id, "vehicle": {"speed": speed}, "note": BULK}))
                .collect();
            json!({"entity": entity})
        })
}

fn check_patch(old: &Value, new: &Value, options: &DiffOptions) -> Result<(), TestCaseError> {
    let patch = diff(old, new, options);
    let mut doc = old.clone();
    let applied = apply(&mut doc, &patch);
    prop_assert!(applied.is_ok(), "{:?} for {}", applied, ops_json(&patch));
    prop_assert_eq!(&doc, new, "patch: {}", ops_json(&patch));
    for op in &patch.0 {
        prop_assert!(!op.path().is_root(), "root op in {}", ops_json(&patch));
        match op {
            PatchOperation::Add(_) | PatchOperation::Remove(_) | PatchOperation::Replace(_) => {}
            PatchOperation::Move(_) if options.allow_move => {}
            other => prop_assert!(false, "operation not enabled: {:?}", other),
        }
    }
    Ok(())
}

fn arb_options() -> impl Strategy<Value = DiffOptions> {
    (
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(1usize), Just(50), Just(1_000_000)],
    )
        .prop_map(|(allow_move, auto_keys, max_edit_work)| DiffOptions {
            allow_move,
            auto_keys,
            max_edit_work,
            ..DiffOptions::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_pairs_round_trip((a, b) in arb_pair(), o in arb_options()) {
        check_patch(&a, &b, &o)?;
    }

    #[test]
    fn fleets_round_trip_with_one_op_per_added_or_removed_entity(
        a in arb_fleet(), b in arb_fleet(), o in arb_options()
    ) {
        check_patch(&a, &b, &o)?;
        let ids = |v: &Value| -> Vec<Value> {
            v["entity"].as_array().map(|e| e.iter().map(|x| x["id"].clone()).collect()).unwrap_or_default()
        };
        let (ia, ib) = (ids(&a), ids(&b));
        if o.auto_keys && !ia.is_empty() && !ib.is_empty() {
            let removed = ia.iter().filter(|i| !ib.contains(i)).count();
            let added = ib.iter().filter(|i| !ia.contains(i)).count();
            let patch = diff(&a, &b, &o);
            // A whole-array replace is chosen only when it is the smaller patch.
            let collapsed = patch.0.iter().any(|op| op.path().as_str() == "/entity");
            if collapsed {
                return Ok(());
            }
            let adds = patch.0.iter().filter(|op| matches!(op, PatchOperation::Add(_))).count();
            let removes = patch.0.iter().filter(|op| matches!(op, PatchOperation::Remove(_))).count();
            // Without moves, a reordered entity costs exactly one remove and one add more.
            prop_assert_eq!(adds - added, removes - removed);
            if o.allow_move {
                prop_assert_eq!(adds, added);
            }
        }
    }

    #[test]
    fn mutated_documents_round_trip(
        a in arb_container(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), arb_json()), 1..4),
        o in arb_options(),
    ) {
        // Mutate `a` in a few places so the pair shares most of its structure.
        let mut b = a.clone();
        for (at, value) in edits {
            mutate(&mut b, at, value);
        }
        check_patch(&a, &b, &o)?;
    }
}

/// Replaces, inserts or removes one value somewhere inside `doc`, chosen by `at`.
fn mutate(doc: &mut Value, at: prop::sample::Index, value: Value) {
    let mut paths = Vec::new();
    collect_paths(doc, &mut String::new(), &mut paths);
    if paths.is_empty() {
        return;
    }
    let path = &paths[at.index(paths.len())];
    let Some(target) = doc.pointer_mut(path) else {
        return;
    };
    match target {
        Value::Array(items) => {
            let i = at.index(items.len() + 1);
            if i < items.len() && at.index(2) == 0 {
                items.remove(i);
            } else {
                items.insert(i.min(items.len()), value);
            }
        }
        Value::Object(map) => {
            if let Some(k) = map.keys().next().cloned().filter(|_| at.index(2) == 0) {
                map.shift_remove(&k);
            } else {
                map.insert(format!("k{}", at.index(5)), value);
            }
        }
        other => *other = value,
    }
}

fn collect_paths(v: &Value, path: &mut String, out: &mut Vec<String>) {
    if !path.is_empty() || v.is_object() || v.is_array() {
        out.push(path.clone());
    }
    let len = path.len();
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push_str(&format!("/{i}"));
                collect_paths(item, path, out);
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                pattern::push_token(path, k);
                collect_paths(item, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

#[test]
fn the_documented_table_validates() {
    let o = options(
        r#"
        keys = { "/entity" = "id", "/entity/*/trip_update/stop_time_update" = "stop_sequence", "/Data.v2/Items" = "Vehicle/ID" }
        ignore = ["/header/timestamp", "/data/stations/*/last_reported"]
        allow_move = false
        auto_keys = true
        max_patch_ratio = 1.0
        max_edit_work = 1000000
        "#,
    );
    let arrays: Vec<&str> = o.keys.iter().map(|k| k.array.as_str()).collect();
    assert_eq!(
        arrays,
        [
            "/Data.v2/Items",
            "/entity",
            "/entity/*/trip_update/stop_time_update"
        ]
    );
    assert_eq!(o.keys[0].key.fields(), &["Vehicle", "ID"]);
    assert_eq!(o.ignore.len(), 2);
    assert_eq!(o.max_edit_work, 1_000_000);
    assert!(!o.allow_move && o.auto_keys);
}

#[test]
fn a_root_array_can_be_keyed() {
    let o = options(r#"keys = { "" = "name" }"#);
    let old = json!([{"name": "a", "v": 1}, {"name": "b", "v": 2}]);
    let new = json!([{"name": "b", "v": 3}]);
    let patch = round_trip(&old, &new, &o);
    assert_eq!(
        ops_json(&patch),
        json!([
            {"op": "remove", "path": "/0"},
            {"op": "replace", "path": "/0/v", "value": 3},
        ])
    );
}

#[test]
fn keyed_arrays_are_replaced_whole_when_that_is_smaller() {
    let old = json!({"a": [{"id": 1}, {"id": 2}]});
    let new = json!({"a": [{"id": 3}, {"id": 4}]});
    let patch = round_trip(&old, &new, &DiffOptions::default());
    assert_eq!(
        ops_json(&patch),
        json!([{"op": "replace", "path": "/a", "value": [{"id": 3}, {"id": 4}]}])
    );
    // ...but not when an ignored path lies below: the ignored-only change must stay visible.
    let o = options(r#"ignore = ["/a/*/seen"]"#);
    let old = json!({"a": [{"id": 1, "seen": 1}, {"id": 2, "seen": 1}]});
    let new = json!({"a": [{"id": 1, "seen": 2}, {"id": 2, "seen": 2}]});
    let patch = round_trip(&old, &new, &o);
    assert_eq!(patch.0.len(), 2);
    assert!(only_ignored(&patch, &o));
}

mod bounded_apply {
    use super::super::{BoundedApplyError, COPY_WORK, Patch, apply, apply_bounded};
    use serde_json::{Value, json};

    fn patch(ops: Value) -> Patch {
        serde_json::from_value(ops).unwrap()
    }

    #[test]
    fn applies_like_json_patch_within_the_bound() {
        let doc = json!({"a": [1, 2, 3], "b": {"c": 1}});
        let p = patch(json!([
            {"op": "add", "path": "/a/0", "value": 0},
            {"op": "remove", "path": "/a/3"},
            {"op": "move", "from": "/b/c", "path": "/a/1"},
            {"op": "copy", "from": "/a", "path": "/d"},
            {"op": "replace", "path": "/b", "value": 2},
            {"op": "test", "path": "/b", "value": 2}
        ]));
        let (mut ours, mut theirs) = (doc.clone(), doc);
        apply_bounded(&mut ours, &p, 1000).unwrap();
        apply(&mut theirs, &p).unwrap();
        assert_eq!(ours, theirs);
        let failing = patch(json!([{"op": "test", "path": "/b", "value": 3}]));
        assert!(matches!(
            apply_bounded(&mut ours, &failing, 1000),
            Err(BoundedApplyError::Apply(_))
        ));
    }

    #[test]
    fn front_insertions_are_charged_for_what_they_shift() {
        let ops: Vec<Value> = (0..2000)
            .map(|i| json!({"op": "add", "path": "/a/0", "value": i}))
            .collect();
        let p = patch(Value::Array(ops));
        // 0 + 1 + ... + 1999 elements shifted.
        let needed = 1999 * 2000 / 2;
        let mut doc = json!({"a": []});
        apply_bounded(&mut doc, &p, needed).unwrap();
        assert_eq!(doc["a"].as_array().unwrap().len(), 2000);
        let mut doc = json!({"a": []});
        let err = apply_bounded(&mut doc, &p, needed - 1).unwrap_err();
        assert!(
            matches!(
                err,
                BoundedApplyError::TooCostly {
                    operation: 1999,
                    ..
                }
            ),
            "{err:?}"
        );
        // Appending shifts nothing.
        let append: Vec<Value> = (0..2000)
            .map(|i| json!({"op": "add", "path": "/a/-", "value": i}))
            .collect();
        apply_bounded(&mut json!({"a": []}), &patch(Value::Array(append)), 0).unwrap();
    }

    #[test]
    fn doubling_copies_are_charged_for_what_they_copy() {
        // Each copy doubles /a: 40 of them would need 2^40 values.
        let ops: Vec<Value> = (0..40)
            .map(|_| json!({"op": "copy", "from": "/a", "path": "/a/-"}))
            .collect();
        let mut doc = json!({"a": [1]});
        let err = apply_bounded(&mut doc, &patch(Value::Array(ops)), 1_000_000).unwrap_err();
        assert!(
            matches!(err, BoundedApplyError::TooCostly { .. }),
            "{err:?}"
        );
        let one = patch(json!([{"op": "copy", "from": "/a", "path": "/b"}]));
        let mut doc = json!({"a": [1, 2]});
        assert!(apply_bounded(&mut doc.clone(), &one, 3 * COPY_WORK).is_ok());
        assert!(apply_bounded(&mut doc, &one, 3 * COPY_WORK - 1).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `diff_json_at`: its operations, re-rooted under any index of the array they were
    /// computed at, turn that element from `a` into `b`; ignored-only is decided on the whole
    /// path; and the operations are `diff_json`'s of the two values where they sit.
    #[test]
    fn relative_patches_splice_under_any_index(
        a in arb_json(), b in arb_json(), o in arb_options(),
        index in 0usize..3, ignore in any::<bool>(),
    ) {
        let mut o = o;
        if ignore {
            o.ignore = vec![PathPattern::parse("/entity/*/x").unwrap()];
        }
        let relative = super::diff_json_at(&a, &b, &[super::At::Key("entity"), super::At::Index(0)], &o);
        let prefix = format!("/entity/{index}");
        let mut json = b"[".to_vec();
        let mut copied = 0;
        for &at in &relative.pointers {
            json.extend_from_slice(&relative.json[copied..at]);
            json.extend_from_slice(prefix.as_bytes());
            copied = at;
        }
        json.extend_from_slice(&relative.json[copied..]);
        json.push(b']');
        let patch: Patch = serde_json::from_slice(&json).unwrap();
        prop_assert_eq!(patch.0.len(), relative.operations);
        let mut others: Vec<Value> = (0..3).map(|i| json!({"other": i})).collect();
        others[index] = a.clone();
        let mut doc = json!({"entity": others.clone()});
        let applied = apply(&mut doc, &patch);
        prop_assert!(applied.is_ok(), "{:?} for {}", applied, String::from_utf8_lossy(&json));
        others[index] = b.clone();
        prop_assert_eq!(&doc, &json!({"entity": others}));
        prop_assert_eq!(relative.only_ignored, super::only_ignored(&patch, &o));
    }
}

/// Entities with nested arrays (stop lists matched by `stop_id`, or replaced whole when most of
/// them change) and a field an ignore pattern may cover, ids from a small pool.
fn arb_trips() -> impl Strategy<Value = Value> {
    let trip = (
        0u32..10,
        proptest::collection::vec((0u32..6, 0i64..3), 0..5),
        arb_json(),
        0i64..3,
    )
        .prop_map(|(id, stops, x, delay)| {
            let mut seen = std::collections::BTreeSet::new();
            let stops: Vec<Value> = stops
                .into_iter()
                .filter(|(stop, _)| seen.insert(*stop))
                .map(|(stop, t)| json!({"stop_id": stop, "t": t}))
                .collect();
            json!({"id": id, "trip": {"delay": delay, "stops": stops}, "x": x})
        });
    proptest::collection::vec(trip, 0..8).prop_map(|trips| json!({"header": 1, "entity": trips}))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// `diff_json_split`: the patch is `diff_json`'s, and each element it says was compared in
    /// place was compared with the old element of the same id, its operations being
    /// `diff_json_at`'s at its index (none when the two are equal). Whenever the entity array
    /// is diffed by identity and not replaced whole, the comparisons are kept.
    #[test]
    fn split_comparisons_are_the_entities_own_diffs(
        a in arb_trips(), b in arb_trips(), o in arb_options(), ignore in any::<bool>(),
    ) {
        let mut o = o;
        if ignore {
            o.ignore = vec![PathPattern::parse("/entity/*/x").unwrap()];
        }
        let path = vec!["entity".to_owned()];
        let (patch, split) = super::diff_json_split(&a, &b, &o, Some(&path));
        prop_assert_eq!(&patch, &super::diff_json(&a, &b, &o));
        let (old, new) = (a["entity"].as_array().unwrap(), b["entity"].as_array().unwrap());
        let unique = |v: &[Value]| {
            let ids: std::collections::BTreeSet<_> = v.iter().map(|e| e["id"].to_string()).collect();
            ids.len() == v.len()
        };
        let parsed: Patch = serde_json::from_slice(&patch.json).unwrap();
        let whole = parsed.0.iter().any(|op| op.path().as_str() == "/entity");
        if o.auto_keys && !old.is_empty() && !new.is_empty() && unique(old) && unique(new) && !whole {
            prop_assert!(split.is_some(), "no comparisons kept: {}", String::from_utf8_lossy(&patch.json));
        }
        if whole {
            prop_assert!(split.is_none(), "comparisons kept for an array replaced whole");
        }
        let Some(split) = split else { return Ok(()) };
        let mut compared = 0;
        for (j, b_entity) in new.iter().enumerate() {
            let Some((i, relative)) = split.element(j) else { continue };
            compared += 1;
            prop_assert_eq!(&old[i]["id"], &b_entity["id"]);
            let expected = super::diff_json_at(
                &old[i], b_entity, &[super::At::Key("entity"), super::At::Index(j)], &o,
            );
            match relative {
                None => prop_assert_eq!(expected.operations, 0),
                Some(relative) => prop_assert_eq!(relative, &expected),
            }
        }
        // Every entity kept in place is compared (those that only moved, with moves off, are
        // removed and added again).
        let kept = new.iter().filter(|e| old.iter().any(|o| o["id"] == e["id"])).count();
        prop_assert!(compared <= kept);
        if o.allow_move {
            prop_assert_eq!(compared, kept);
        }
    }
}

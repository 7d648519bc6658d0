//! Real polled sequences: every consecutive pair round-trips through `diff` + `apply`, and the
//! Python `jsonpatch` package (an independent RFC 6902 implementation) agrees.
//!
//! Adding a sequence is one more `#[test]` calling [`check_sequence`] and [`check_with_python`];
//! the GTFS-realtime sequences are decoded with `format = "gtfs-rt"` first.

use std::io::Write;
use std::process::{Command, Stdio};

use patchwire::diff::{self, DiffConfig, DiffOptions, PatchOperation};
use patchwire::validation::Problems;
use patchwire_test_data::{self as data, GBFS};
use serde_json::{Value, json};

use crate::support;

fn gbfs() -> Option<Vec<(String, Value)>> {
    data::json_sequence(GBFS, "station_status_")
}

fn gbfs_options() -> Vec<(&'static str, DiffOptions)> {
    let configured: DiffConfig = serde_json::from_value(json!({
        "keys": {"/data/stations": "station_id"},
        "ignore": ["/last_updated", "/data/stations/*/last_reported"],
    }))
    .expect("a valid table");
    let mut problems = Problems::default();
    let configured = configured
        .validate("streams[0].diff", &mut problems)
        .expect("valid options");
    vec![
        ("default", DiffOptions::default()),
        (
            "moves",
            DiffOptions {
                allow_move: true,
                ..DiffOptions::default()
            },
        ),
        (
            "no keys",
            DiffOptions {
                auto_keys: false,
                ..DiffOptions::default()
            },
        ),
        ("configured", configured),
    ]
}

/// Diffs every consecutive pair, applies the patch and checks the result is the next snapshot.
/// Returns the patches, in order.
fn check_sequence(name: &str, snapshots: &[(String, Value)], options: &DiffOptions) -> Vec<Value> {
    let mut patches = Vec::new();
    for pair in snapshots.windows(2) {
        let ((from, old), (to, new)) = (&pair[0], &pair[1]);
        let patch = diff::diff(old, new, options);
        assert!(
            !diff::is_root_replace(&patch),
            "{name}: {from} -> {to} replaced the root"
        );
        // What publishers send is written directly; it must be exactly this patch's JSON.
        let written = diff::diff_json(old, new, options);
        assert!(
            written.json == serde_json::to_vec(&patch).unwrap()
                && written.only_ignored == diff::only_ignored(&patch, options),
            "{name}: {from} -> {to}: diff_json differs from diff"
        );
        for op in &patch.0 {
            let allowed = matches!(
                op,
                PatchOperation::Add(_) | PatchOperation::Remove(_) | PatchOperation::Replace(_)
            ) || (options.allow_move && matches!(op, PatchOperation::Move(_)));
            assert!(allowed, "{name}: {from} -> {to}: {op:?} not enabled");
        }
        let mut doc = old.clone();
        diff::apply(&mut doc, &patch).unwrap_or_else(|e| panic!("{name}: {from} -> {to}: {e}"));
        // Equal as JSON values. Field order can differ where a field appears (RFC 6902 `add`
        // appends it), which no JSON consumer may rely on.
        assert!(
            &doc == new,
            "{name}: {from} -> {to}: result differs from the next snapshot"
        );
        let patch_len = serde_json::to_vec(&patch).expect("serializable").len();
        let snapshot_len = serde_json::to_vec(new).expect("serializable").len();
        assert!(
            patch_len < snapshot_len,
            "{name}: {from} -> {to}: patch {patch_len} B is not smaller than the snapshot {snapshot_len} B"
        );
        patches.push(serde_json::to_value(&patch).expect("serializable"));
    }
    patches
}

#[test]
fn gbfs_pairs_round_trip() {
    let Some(snapshots) = gbfs() else { return };
    for (label, options) in gbfs_options() {
        check_sequence(&format!("gbfs/{label}"), &snapshots, &options);
    }
}

#[test]
fn gbfs_keyed_patches_are_small_and_timestamps_alone_publish_nothing() {
    let Some(snapshots) = gbfs() else { return };
    let (_, configured) = gbfs_options().pop().expect("four option sets");
    for pair in snapshots.windows(2) {
        let ((from, old), (to, new)) = (&pair[0], &pair[1]);
        let keyed = diff::diff(old, new, &configured);
        let positional = json_patch::diff(old, new);
        let keyed_len = serde_json::to_vec(&keyed).expect("serializable").len();
        let positional_len = serde_json::to_vec(&positional).expect("serializable").len();
        assert!(
            keyed_len <= positional_len,
            "{from} -> {to}: {keyed_len} B keyed vs {positional_len} B positional"
        );
        assert!(
            !diff::only_ignored(&keyed, &configured),
            "{from} -> {to}: real station changes were classed as ignored"
        );
        // Strip every non-ignored change: what is left must publish nothing.
        let mut quiet = new.clone();
        quiet["data"]["stations"] = old["data"]["stations"].clone();
        if let (Some(stations), Some(fresh)) = (
            quiet["data"]["stations"].as_array_mut(),
            new["data"]["stations"].as_array(),
        ) {
            for station in stations.iter_mut() {
                let id = &station["station_id"];
                if let Some(now) = fresh.iter().find(|s| &s["station_id"] == id) {
                    station["last_reported"] = now["last_reported"].clone();
                }
            }
        }
        let quiet_patch = diff::diff(old, &quiet, &configured);
        assert!(
            !quiet_patch.0.is_empty(),
            "{from} -> {to}: nothing changed?"
        );
        assert!(
            diff::only_ignored(&quiet_patch, &configured),
            "{from} -> {to}: {}",
            serde_json::to_string(&quiet_patch).unwrap_or_default()
        );
    }
}

/// Applies each patch with Python's `jsonpatch` to the previous snapshot and compares the result
/// with the next snapshot.
fn check_with_python(name: &str, snapshots: &[(String, Value)], patches: &[Value]) {
    let probe = Command::new("python3")
        .args(["-c", "import jsonpatch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(status) if status.success()) {
        data::skip::<()>(
            "python3 with the `jsonpatch` package is not available (pip install jsonpatch)",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut cases = Vec::new();
    for (i, (pair, patch)) in snapshots.windows(2).zip(patches).enumerate() {
        let path = dir.path().join(format!("{i}.json"));
        let case = json!({"name": format!("{} -> {}", pair[0].0, pair[1].0), "doc": pair[0].1, "patch": patch, "expected": pair[1].1});
        std::fs::write(&path, serde_json::to_vec(&case).expect("serializable"))
            .expect("writing a case");
        cases.push(path.display().to_string());
    }
    let script = r#"
import json, sys, jsonpatch
failed = 0
for path in sys.stdin.read().split():
    case = json.load(open(path))
    try:
        got = jsonpatch.apply_patch(case["doc"], case["patch"])
    except Exception as e:
        print("FAIL", case["name"], repr(e)); failed += 1; continue
    if got != case["expected"]:
        print("FAIL", case["name"], "result differs"); failed += 1
    else:
        print("OK", case["name"])
sys.exit(1 if failed else 0)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(cases.join("\n").as_bytes())
        .expect("writing case list");
    let out = child.wait_with_output().expect("python3 finishes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: jsonpatch disagrees:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("OK ")).count(),
        patches.len(),
        "{name}: {stdout}"
    );
}

#[test]
fn python_jsonpatch_applies_gbfs_patches() {
    let Some(snapshots) = gbfs() else { return };
    // GBFS never reorders, so `moves` adds nothing here; the synthetic test covers moves.
    for (label, options) in gbfs_options().into_iter().filter(|(l, _)| *l != "moves") {
        let name = format!("gbfs/{label}");
        let patches = check_sequence(&name, &snapshots, &options);
        check_with_python(&name, &snapshots, &patches);
    }
}

/// A synthetic sequence with removals, insertions, reorders and changes exercises every kind of
/// index arithmetic against the independent implementation.
#[test]
fn python_jsonpatch_applies_synthetic_fleet_patches() {
    let fleet = |ids: &[u32], tick: u32| {
        let entity: Vec<Value> = ids
            .iter()
            .map(|i| json!({"id": format!("{tick}:{i}"), "vehicle": {"vehicle": {"id": format!("v{i}")}, "speed": (i * tick) % 7, "stops": [i % 3, i % 5, tick % 4]}}))
            .collect();
        json!({"header": {"timestamp": tick}, "entity": entity})
    };
    let steps: [&[u32]; 6] = [
        &[1, 2, 3, 4, 5, 6, 7, 8],
        &[2, 3, 4, 9, 5, 6, 8],
        &[8, 2, 3, 4, 9, 5, 6],
        &[10, 8, 2, 11, 4, 9, 6, 3],
        &[3, 6, 9, 4, 11, 2, 8, 10],
        &[],
    ];
    let snapshots: Vec<(String, Value)> = steps
        .iter()
        .enumerate()
        .map(|(tick, ids)| (format!("step {tick}"), fleet(ids, tick as u32 + 1)))
        .collect();
    let keyed: DiffConfig =
        serde_json::from_value(json!({"keys": {"/entity": "vehicle/vehicle/id"}}))
            .expect("a valid table");
    let mut problems = Problems::default();
    let keyed = keyed
        .validate("diff", &mut problems)
        .expect("valid options");
    for (label, options) in [
        ("keyed", keyed.clone()),
        (
            "keyed+moves",
            DiffOptions {
                allow_move: true,
                ..keyed
            },
        ),
        ("auto", DiffOptions::default()),
    ] {
        let name = format!("synthetic/{label}");
        let mut patches = Vec::new();
        for pair in snapshots.windows(2) {
            let patch = diff::diff(&pair[0].1, &pair[1].1, &options);
            let mut doc = pair[0].1.clone();
            diff::apply(&mut doc, &patch).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(doc == pair[1].1, "{name}: result differs");
            patches.push(serde_json::to_value(&patch).expect("serializable"));
        }
        check_with_python(&name, &snapshots, &patches);
    }
}

/// Every consecutive pair of the GTFS-realtime sequences, decoded with `format = "gtfs-rt"`,
/// round-trips with the keys a `gtfs-rt` stream gets by default, and Python's `jsonpatch`
/// applies the same patches to the same result.
#[test]
fn gtfs_rt_pairs_round_trip_with_the_default_keys() {
    let defaults = support::gtfs_rt_stream_options("");
    for dir in data::GTFS_RT_SEQUENCES {
        let Some(snapshots) = support::gtfs_rt_sequence(dir) else {
            return;
        };
        let patches = check_sequence(dir, &snapshots, &defaults);
        check_with_python(dir, &snapshots, &patches);
    }
}

#[test]
fn gtfs_rt_pairs_round_trip_with_moves() {
    let moves = support::gtfs_rt_stream_options("allow_move = true");
    for dir in data::GTFS_RT_SEQUENCES {
        let Some(snapshots) = support::gtfs_rt_sequence(dir) else {
            return;
        };
        check_sequence(&format!("{dir}/moves"), &snapshots, &moves);
    }
}

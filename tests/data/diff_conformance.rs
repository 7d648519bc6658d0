//! RFC 6902 conformance of `diff::apply` (the json-patch-tests suites, atomicity on failure),
//! and `diff::diff` round trips on the jd structural-diff corpus.

use patchwire::diff::{self, DiffOptions, Patch};
use patchwire_test_data as data;
use serde_json::Value;

/// Cases that cannot run as written, with the reason.
const SKIPPED: &[(&str, &str)] = &[(
    "duplicate ops",
    "the record has two `op` members; serde_json keeps one, so the case cannot be expressed",
)];

/// Runs one suite file; returns (passed, skipped).
fn run_suite(relative: &str) -> Option<(usize, usize)> {
    let suite = data::json(relative)?;
    let cases = suite.as_array().expect("a suite is a JSON array");
    let (mut passed, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let comment = case["comment"].as_str().unwrap_or("");
        if let Some((_, why)) = SKIPPED.iter().find(|(c, _)| *c == comment) {
            eprintln!("SKIP {relative}[{i}] {comment:?}: {why}");
            skipped += 1;
            continue;
        }
        match run_case(case) {
            Ok(()) => passed += 1,
            Err(e) => failures.push(format!("{relative}[{i}] {comment:?}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Some((passed, skipped))
}

fn run_case(case: &Value) -> Result<(), String> {
    let original = case["doc"].clone();
    let mut doc = original.clone();
    let patch = serde_json::from_value::<Patch>(case["patch"].clone());
    if let Some(expected_error) = case.get("error") {
        let Ok(patch) = patch else {
            return Ok(()); // rejected when parsed: an error, as expected
        };
        return match diff::apply(&mut doc, &patch) {
            Ok(()) => Err(format!("applied, but expected error {expected_error}")),
            Err(_) if doc == original => Ok(()),
            Err(e) => Err(format!("failed ({e}) but changed the document to {doc}")),
        };
    }
    let patch = patch.map_err(|e| format!("patch did not parse: {e}"))?;
    diff::apply(&mut doc, &patch).map_err(|e| format!("apply failed: {e}"))?;
    match case.get("expected") {
        Some(expected) if *expected != doc => Err(format!("got {doc}, expected {expected}")),
        _ => Ok(()),
    }
}

#[test]
fn json_patch_tests_suite() {
    if let Some((passed, skipped)) = run_suite("json-patch/json-patch-tests/tests.json") {
        assert!(passed >= 90, "only {passed} cases ran");
        assert_eq!(skipped, 1);
    }
}

#[test]
fn rfc6902_appendix_examples() {
    if let Some((passed, skipped)) = run_suite("json-patch/json-patch-tests/spec_tests.json") {
        assert_eq!((passed, skipped), (17, 0));
    }
}

#[test]
fn json_patch_crate_suite() {
    if let Some((passed, _)) = run_suite("json-patch/idubrov-json-patch/tests.json") {
        assert!(passed >= 100, "only {passed} cases ran");
    }
}

#[test]
fn failing_patches_leave_the_document_untouched() {
    if let Some((passed, skipped)) = run_suite("json-patch/idubrov-json-patch/revert_tests.json") {
        assert_eq!((passed, skipped), (13, 0));
    }
}

/// Every pair of the jd corpus (all JSON types, arrays, nesting) round-trips through our diff.
#[test]
fn jd_corpus_round_trips() {
    let Some(cases) = data::json("json-diff/jd-spec-cases/core.json") else {
        return;
    };
    let mut ran = 0;
    for case in cases.as_array().expect("an array of cases") {
        let name = case["name"].as_str().unwrap_or("?");
        let parse = |field: &str| {
            case[field]
                .as_str()
                .and_then(|t| serde_json::from_str::<Value>(t).ok())
        };
        let (Some(a), Some(b)) = (parse("content_a"), parse("content_b")) else {
            eprintln!("SKIP jd {name}: content is not a single JSON value");
            continue;
        };
        for options in [
            DiffOptions::default(),
            DiffOptions {
                allow_move: true,
                auto_keys: false,
                ..DiffOptions::default()
            },
        ] {
            let patch = diff::diff(&a, &b, &options);
            if diff::is_root_replace(&patch) {
                assert!(
                    !(a.is_object() && b.is_object() || a.is_array() && b.is_array()),
                    "{name}: root replaced between containers of one kind"
                );
            }
            let mut doc = a.clone();
            diff::apply(&mut doc, &patch).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(doc, b, "{name}");
        }
        ran += 1;
    }
    assert!(ran >= 30, "only {ran} jd cases ran");
}

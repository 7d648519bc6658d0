//! Shared helpers of the `diff_*` test binaries: reading `../shared/data`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

/// True when running under CI, where missing data or tools fail the test instead of skipping.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips (prints why and returns `None`) outside CI, fails under `CI=true`.
pub fn skip<T>(why: &str) -> Option<T> {
    assert!(!ci(), "CI=true and {why}");
    eprintln!("SKIP: {why}");
    None
}

/// The path of a file or folder under `../shared/data`, if it exists.
pub fn data_path(relative: &str) -> Option<PathBuf> {
    let path = Path::new("../shared/data").join(relative);
    if path.exists() {
        Some(path)
    } else {
        skip(&format!(
            "test data {} is missing (see /work/shared/data/README.md)",
            path.display()
        ))
    }
}

/// Parses a JSON file under `../shared/data`; `None` (skip) when it is missing.
pub fn data_json(relative: &str) -> Option<Value> {
    let path = data_path(relative)?;
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display())))
}

/// The consecutive snapshots of a polled sequence, in poll (file name) order.
pub fn sequence(relative_dir: &str, prefix: &str) -> Option<Vec<(String, Value)>> {
    let dir = data_path(relative_dir)?;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix) && name.ends_with(".json"))
        .collect();
    names.sort();
    assert!(
        names.len() >= 2,
        "{} holds fewer than two snapshots",
        dir.display()
    );
    Some(
        names
            .into_iter()
            .map(|name| {
                let value = data_json(&format!("{relative_dir}/{name}"))
                    .unwrap_or_else(|| panic!("{name} vanished"));
                (name, value)
            })
            .collect(),
    )
}

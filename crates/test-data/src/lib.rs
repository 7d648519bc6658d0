//! The real data sets under `../shared/data` (relative to the directory tests run in, a
//! package's root), shared by patchwire's two integration binaries: where a file is, the
//! recorded polls of a sequence in order, and the rule for whatever a test needs from outside
//! the repository (data, a Python package): when it is missing the test skips with a message,
//! except under `CI=true`, where it fails.
//!
//! A crate rather than a module because both binaries (`tests/it`, `tests/data`) read the same
//! sequences, and Cargo shares code between test targets only through a library.

pub mod postgres;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The GTFS-realtime sequences of consecutive polls (folders under `../shared/data`).
pub const GTFS_RT_SEQUENCES: [&str; 3] = [
    "gtfs-rt/sequences/mbta-lamp/vehiclepositions-2023-05-08T12Z",
    "gtfs-rt/sequences/mbta-lamp/tripupdates-2023-05-08T12Z",
    "gtfs-rt/sequences/mbta-lamp/alerts-2020-02-09T01Z",
];

/// The GBFS `station_status` polls.
pub const GBFS: &str = "gbfs/baywheels-station_status";

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
pub fn path(relative: &str) -> Option<PathBuf> {
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
pub fn json(relative: &str) -> Option<Value> {
    let path = path(relative)?;
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display())))
}

/// The consecutive snapshots of a polled JSON sequence, in poll (file name) order.
pub fn json_sequence(relative_dir: &str, prefix: &str) -> Option<Vec<(String, Value)>> {
    Some(
        bodies(relative_dir, prefix, ".json")?
            .into_iter()
            .map(|(name, bytes)| {
                let value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("parsing {relative_dir}/{name}: {e}"));
                (name, value)
            })
            .collect(),
    )
}

/// The files of `relative_dir` whose names start with `prefix` and end with `suffix`, in name
/// (poll) order, with their bytes; `None` (skip) when the folder is missing.
pub fn bodies(relative_dir: &str, prefix: &str, suffix: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let dir = path(relative_dir)?;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix) && name.ends_with(suffix))
        .collect();
    names.sort();
    assert!(
        names.len() >= 2,
        "{} holds fewer than two {prefix}*{suffix} files",
        dir.display()
    );
    Some(
        names
            .into_iter()
            .map(|name| {
                let path = dir.join(&name);
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                (name, bytes)
            })
            .collect(),
    )
}

/// A GTFS-realtime sequence's raw protobuf bodies.
pub fn gtfs_rt_bodies(relative_dir: &str) -> Option<Vec<(String, Vec<u8>)>> {
    bodies(relative_dir, "", ".pb")
}

/// The GBFS polls' raw JSON bodies.
pub fn gbfs_bodies() -> Option<Vec<(String, Vec<u8>)>> {
    bodies(GBFS, "station_status_", ".json")
}

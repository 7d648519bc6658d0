//! Real feeds under `../shared/data` as raw bodies and decoded documents, and the diff options a
//! `gtfs-rt` stream gets from configuration. Needs `diff_support` declared beside it.

#![allow(dead_code)]

use patchwire::config::{self, FileKind};
use patchwire::diff::DiffOptions;
use patchwire::upstream::decode::{Format, decode};
use serde_json::Value;

use crate::diff_support;

/// The GTFS-realtime sequences of consecutive polls (folders under `../shared/data`).
pub const GTFS_RT_SEQUENCES: [&str; 3] = [
    "gtfs-rt/sequences/mbta-lamp/vehiclepositions-2023-05-08T12Z",
    "gtfs-rt/sequences/mbta-lamp/tripupdates-2023-05-08T12Z",
    "gtfs-rt/sequences/mbta-lamp/alerts-2020-02-09T01Z",
];

/// The GBFS `station_status` polls.
pub const GBFS: &str = "gbfs/baywheels-station_status";

/// The files of `relative_dir` whose names start with `prefix` and end with `suffix`, in name
/// (poll) order, with their bytes; `None` (skip) when the folder is missing.
pub fn bodies(relative_dir: &str, prefix: &str, suffix: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let dir = diff_support::data_path(relative_dir)?;
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

/// A GTFS-realtime sequence decoded with `format = "gtfs-rt"`.
pub fn gtfs_rt_sequence(relative_dir: &str) -> Option<Vec<(String, Value)>> {
    Some(
        gtfs_rt_bodies(relative_dir)?
            .into_iter()
            .map(|(name, body)| {
                let doc = decode(Format::GtfsRt, &body)
                    .unwrap_or_else(|e| panic!("{relative_dir}/{name}: {e}"));
                (name, doc)
            })
            .collect(),
    )
}

/// The GBFS polls' raw JSON bodies.
pub fn gbfs_bodies() -> Option<Vec<(String, Vec<u8>)>> {
    bodies(GBFS, "station_status_", ".json")
}

/// The diff options of a stream configured with only `format = "gtfs-rt"` (and `diff_table`,
/// TOML lines of its `[streams.diff]`), through the real configuration path.
pub fn gtfs_rt_stream_options(diff_table: &str) -> DiffOptions {
    let text = format!(
        "[[streams]]\nname = \"feed\"\nurl = \"https://cdn.example.com/feed.pb\"\nformat = \"gtfs-rt\"\n\
         [streams.diff]\n{diff_table}\n"
    );
    let raw = config::parse_raw(&text, FileKind::Toml, None, Vec::new())
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    let mut config =
        config::validate(raw, None, &|_| None).unwrap_or_else(|e| panic!("{text}: {e}"));
    config.streams.remove(0).diff
}

/// Entities in a decoded feed.
pub fn entity_count(doc: &Value) -> usize {
    doc.get("entity")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

//! The real feeds of `../shared/data` decoded as patchwire decodes them, and the diff options a
//! `gtfs-rt` stream gets from configuration.

use patchwire::config::{self, FileKind};
use patchwire::diff::DiffOptions;
use patchwire::upstream::decode::{Format, decode};
use patchwire_test_data as data;
use serde_json::Value;

/// A GTFS-realtime sequence decoded with `format = "gtfs-rt"`.
pub fn gtfs_rt_sequence(relative_dir: &str) -> Option<Vec<(String, Value)>> {
    Some(
        data::gtfs_rt_bodies(relative_dir)?
            .into_iter()
            .map(|(name, body)| {
                let doc = decode(Format::GtfsRt, &body)
                    .unwrap_or_else(|e| panic!("{relative_dir}/{name}: {e}"));
                (name, doc)
            })
            .collect(),
    )
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

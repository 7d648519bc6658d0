//! Real upstream bodies through `decode`: every GTFS-realtime file in `../shared/data/gtfs-rt`
//! (entity counts as documented in its README), the invalid one failing cleanly, and what the
//! `gtfs-rt` defaults do with real polls.

use std::path::{Path, PathBuf};

use patchwire::diff;
use patchwire::upstream::decode::{DecodeError, Format, decode};
use patchwire_test_data::{self as data, GTFS_RT_SEQUENCES};
use serde_json::{Value, json};

use crate::support::{entity_count, gtfs_rt_sequence, gtfs_rt_stream_options};

/// The single snapshots and their entity counts, from the table in `shared/data/README.md`.
const SINGLE: [(&str, usize, u64); 12] = [
    ("mbta-concentrate/alerts.pb", 51, 1514034019),
    ("mbta-concentrate/tripupdates.pb", 49, 1513622773),
    (
        "mbta-concentrate/tripupdates_with_tripproperties.pb",
        4,
        1513622773,
    ),
    ("mbta-concentrate/vehiclepositions.pb", 48, 1513622764),
    (
        "mobilitydata-validator/bullrunner-vehicle-positions.pb",
        10,
        1505314375,
    ),
    ("otp/septa-tripupdates.pb", 35, 1680120572),
    ("transitland/bart-alerts.pb", 1, 1565199942),
    ("transitland/bart-trip-updates.pb", 91, 1565199921),
    ("transitland/ct-service-alerts.pb", 0, 1699405546),
    ("transitland/ct-trip-updates.pb", 19, 1699405534),
    ("transitland/ct-vehicle-positions.pb", 14, 1699405559),
    ("transitland/example.pb", 26, 1559008978),
];

/// The sequences: snapshots, and the range of entities per snapshot, from the README.
const SEQUENCES: [(&str, usize, usize, usize); 3] = [
    (GTFS_RT_SEQUENCES[0], 300, 92, 96),
    (GTFS_RT_SEQUENCES[1], 30, 136, 192),
    (GTFS_RT_SEQUENCES[2], 20, 77, 80),
];

fn pb_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            pb_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "pb") {
            out.push(path);
        }
    }
}

#[test]
fn every_pb_decodes_except_the_invalid_one() {
    let Some(root) = data::path("gtfs-rt") else {
        return;
    };
    let mut files = Vec::new();
    pb_files(&root, &mut files);
    let expected = SINGLE.len() + 1 + SEQUENCES.iter().map(|s| s.1).sum::<usize>();
    assert_eq!(files.len(), expected, "every .pb is accounted for below");
    for path in files {
        let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let result = decode(Format::GtfsRt, &body);
        if path.ends_with("transitland/invalid.pb") {
            let err = result.expect_err("invalid.pb must not decode");
            assert!(matches!(err, DecodeError::GtfsRt { .. }), "{err:?}");
            assert!(
                err.to_string()
                    .starts_with("invalid GTFS-realtime feed (expected a protobuf FeedMessage): "),
                "{err}"
            );
        } else {
            let doc = result.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let version = doc["header"]["gtfs_realtime_version"].as_str();
            assert!(version.is_some_and(|v| !v.is_empty()), "{}", path.display());
        }
    }
}

#[test]
fn single_snapshots_have_the_documented_entities_and_timestamps() {
    for (file, entities, timestamp) in SINGLE {
        let Some(path) = data::path(&format!("gtfs-rt/single/{file}")) else {
            return;
        };
        let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let doc = decode(Format::GtfsRt, &body).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(entity_count(&doc), entities, "{file}");
        assert_eq!(doc["header"]["timestamp"], json!(timestamp), "{file}");
        // Every entity carries exactly what its feed is about.
        let kind = if file.contains("alert") {
            "alert"
        } else if file.contains("trip") || file.ends_with("example.pb") {
            "trip_update"
        } else {
            "vehicle"
        };
        for entity in doc["entity"].as_array().into_iter().flatten() {
            assert!(entity.get(kind).is_some(), "{file}: {entity}");
        }
    }
}

#[test]
fn the_projection_is_compact_json_with_enum_names() {
    let Some(path) = data::path("gtfs-rt/single/mbta-concentrate/vehiclepositions.pb") else {
        return;
    };
    let body = std::fs::read(&path).expect("readable");
    let doc = decode(Format::GtfsRt, &body).expect("decodes");
    let text = serde_json::to_string(&doc).expect("serializable");
    assert!(!text.contains("null"), "unset fields are omitted");
    assert!(text.contains("\"current_status\":\""), "enums are names");
    assert!(
        text.contains("\"incrementality\":\"FULL_DATASET\""),
        "{}",
        &text[..200]
    );
    // Smaller than the reference proto3-JSON (21016 bytes with spaces, per the README).
    assert!(text.len() < 21016, "{} bytes", text.len());
}

#[test]
fn sequences_decode_with_the_documented_sizes_and_header_timestamps() {
    for (dir, snapshots, min, max) in SEQUENCES {
        let Some(docs) = gtfs_rt_sequence(dir) else {
            return;
        };
        assert_eq!(docs.len(), snapshots, "{dir}");
        for (name, doc) in &docs {
            let n = entity_count(doc);
            assert!((min..=max).contains(&n), "{dir}/{name}: {n} entities");
            // File names are NNNN_<feed_timestamp>.pb.
            let stamp: u64 = name
                .trim_end_matches(".pb")
                .split('_')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("unexpected file name {name}"));
            assert_eq!(doc["header"]["timestamp"], json!(stamp), "{dir}/{name}");
        }
    }
}

#[test]
fn a_feed_whose_only_change_is_its_timestamp_publishes_nothing() {
    let Some(docs) = gtfs_rt_sequence(GTFS_RT_SEQUENCES[0]) else {
        return;
    };
    let defaults = gtfs_rt_stream_options("");
    let (old, new) = (&docs[0].1, &docs[1].1);
    let mut restamped = old.clone();
    restamped["header"]["timestamp"] = new["header"]["timestamp"].clone();
    let patch = diff::diff(old, &restamped, &defaults);
    assert_eq!(patch.0.len(), 1, "one replace of the timestamp");
    assert!(diff::only_ignored(&patch, &defaults));
    // A real poll carries real changes: it publishes, timestamp included.
    let patch = diff::diff(old, new, &defaults);
    assert!(!diff::only_ignored(&patch, &defaults));
    let mut rebuilt = old.clone();
    diff::apply(&mut rebuilt, &patch).expect("applies");
    assert!(rebuilt == *new);
    // `ignore = []` turns the default off.
    let strict = gtfs_rt_stream_options("ignore = []");
    assert!(!diff::only_ignored(
        &diff::diff(old, &restamped, &strict),
        &strict
    ));
}

/// Some producers mint a new `entity.id` every poll; keying entities on the vehicle keeps the
/// patches as small as with stable ids.
#[test]
fn entities_keyed_on_the_vehicle_survive_entity_ids_that_change_every_poll() {
    let Some(docs) = gtfs_rt_sequence(GTFS_RT_SEQUENCES[0]) else {
        return;
    };
    let docs: Vec<Value> = docs.into_iter().take(30).map(|(_, d)| d).collect();
    let renamed: Vec<Value> = docs
        .iter()
        .enumerate()
        .map(|(poll, doc)| {
            let mut doc = doc.clone();
            for (i, entity) in doc["entity"]
                .as_array_mut()
                .expect("entities")
                .iter_mut()
                .enumerate()
            {
                entity["id"] = json!(format!("{poll}-{i}"));
            }
            doc
        })
        .collect();
    let defaults = gtfs_rt_stream_options("");
    let by_vehicle = gtfs_rt_stream_options("keys = { \"/entity\" = \"vehicle/vehicle/id\" }");
    let size = |docs: &[Value], options| -> usize {
        docs.windows(2)
            .map(|w| {
                let patch = diff::diff(&w[0], &w[1], options);
                let mut doc = w[0].clone();
                diff::apply(&mut doc, &patch).expect("applies");
                assert!(doc == w[1], "round trip");
                serde_json::to_vec(&patch).expect("serializable").len()
            })
            .sum()
    };
    let stable = size(&docs, &defaults);
    let churned_by_id = size(&renamed, &defaults);
    let churned_by_vehicle = size(&renamed, &by_vehicle);
    // With the vehicle key the only extra bytes are the id replacements themselves.
    assert!(
        churned_by_vehicle < stable * 3,
        "{churned_by_vehicle} B keyed by vehicle vs {stable} B with stable ids"
    );
    assert!(
        churned_by_vehicle * 2 < churned_by_id,
        "{churned_by_vehicle} B keyed by vehicle vs {churned_by_id} B keyed by the churning id"
    );
}

#[test]
fn gzip_without_content_encoding_and_json_in_a_protobuf_stream_say_what_to_fix() {
    let Some(path) =
        data::path("gtfs-rt/json/mbta-lamp/2022-07-05T12-35-16Z_VehiclePositions_enhanced.json.gz")
    else {
        return;
    };
    let gz = std::fs::read(&path).expect("readable");
    let err = decode(Format::Json, &gz).expect_err("gzip bytes are not JSON");
    assert!(err.to_string().contains("Content-Encoding: gzip"), "{err}");
    let err = decode(Format::GtfsRt, &gz).expect_err("gzip bytes are not protobuf");
    assert!(err.to_string().contains("Content-Encoding: gzip"), "{err}");
    let mut json = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut json)
        .expect("valid gzip");
    let doc = decode(Format::Json, &json).expect("MBTA's enhanced JSON");
    assert!(entity_count(&doc) > 0);
    let err = decode(Format::GtfsRt, &json).expect_err("JSON is not protobuf");
    assert!(err.to_string().contains("set format = \"json\""), "{err}");
}

#[test]
fn mbta_enhanced_json_feeds_decode_as_json() {
    for name in [
        "TripUpdates_enhanced.json",
        "VehiclePositions_enhanced.json",
        "alerts_enhanced.json",
    ] {
        let Some(path) = data::path(&format!("gtfs-rt/json/mbta-concentrate/{name}")) else {
            return;
        };
        let body = std::fs::read(&path).expect("readable");
        let doc = decode(Format::Json, &body).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(doc["header"].is_object(), "{name}");
    }
}

fn example(name: &str) -> patchwire::config::Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/examples")
        .join(name);
    patchwire::config::load_with(&path, &|_| None, Vec::new())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Applies `options` to every consecutive pair: exact round trip, patches smaller than the
/// snapshot. Returns the total patch bytes.
fn round_trip(name: &str, docs: &[Value], options: &diff::DiffOptions) -> usize {
    let mut total = 0;
    for (i, pair) in docs.windows(2).enumerate() {
        let patch = diff::diff(&pair[0], &pair[1], options);
        let mut doc = pair[0].clone();
        diff::apply(&mut doc, &patch).unwrap_or_else(|e| panic!("{name} poll {i}: {e}"));
        assert!(doc == pair[1], "{name} poll {i}: result differs");
        let len = serde_json::to_vec(&patch).expect("serializable").len();
        let full = serde_json::to_vec(&pair[1]).expect("serializable").len();
        assert!(
            len < full,
            "{name} poll {i}: patch {len} B >= snapshot {full} B"
        );
        total += len;
    }
    total
}

#[test]
fn mbta_example_polls_the_cdn_feeds_with_the_gtfs_rt_defaults() {
    let config = example("mbta-gtfs-rt.toml");
    let urls: Vec<(&str, &str)> = config
        .streams
        .iter()
        .map(|s| (s.name.as_str(), s.url.as_str()))
        .collect();
    assert_eq!(
        urls,
        [
            (
                "mbta-vehicles",
                "https://cdn.mbta.com/realtime/VehiclePositions.pb"
            ),
            (
                "mbta-trip-updates",
                "https://cdn.mbta.com/realtime/TripUpdates.pb"
            ),
            ("mbta-alerts", "https://cdn.mbta.com/realtime/Alerts.pb"),
        ]
    );
    let defaults = gtfs_rt_stream_options("");
    for stream in &config.streams {
        assert_eq!(stream.format, Format::GtfsRt, "{}", stream.name);
        assert_eq!(stream.diff, defaults, "{}", stream.name);
    }
    let summary = patchwire::config::describe(&config);
    assert!(summary.contains("gtfs-rt"), "{summary}");
    assert!(summary.contains("/entity by id"), "{summary}");
    assert!(
        summary.contains("ignore:     /header/timestamp"),
        "{summary}"
    );

    // The example's settings on recorded polls of the same feeds.
    for (stream, dir) in config.streams.iter().zip(GTFS_RT_SEQUENCES) {
        let Some(docs) = gtfs_rt_sequence(dir) else {
            return;
        };
        let docs: Vec<Value> = docs.into_iter().map(|(_, d)| d).collect();
        round_trip(dir, &docs, &stream.diff);
    }
}

#[test]
fn gbfs_example_keys_stations_and_ignores_what_moves_every_poll() {
    let config = example("gbfs-station-status.toml");
    let stream = &config.streams[0];
    assert_eq!(stream.format, Format::Json);
    assert_eq!(
        stream.url.as_str(),
        "https://gbfs.lyft.com/gbfs/2.3/bay/en/station_status.json"
    );
    let keys: Vec<(&str, &str)> = stream
        .diff
        .keys
        .iter()
        .map(|k| (k.array.as_str(), k.key.as_str()))
        .collect();
    assert_eq!(keys, [("/data/stations", "station_id")]);

    let Some(polls) = data::gbfs_bodies() else {
        return;
    };
    let docs: Vec<Value> = polls
        .iter()
        .map(|(name, body)| decode(Format::Json, body).unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect();
    let keyed = round_trip("gbfs", &docs, &stream.diff);
    let positional = round_trip(
        "gbfs positional",
        &docs,
        &diff::DiffOptions {
            auto_keys: false,
            ..diff::DiffOptions::default()
        },
    );
    assert!(keyed <= positional, "{keyed} B keyed vs {positional} B");
    // A poll where only the freshness fields moved publishes nothing.
    let mut quiet = docs[0].clone();
    quiet["last_updated"] = docs[1]["last_updated"].clone();
    quiet["data"]["stations"][0]["last_reported"] = json!(1_900_000_000);
    let patch = diff::diff(&docs[0], &quiet, &stream.diff);
    assert_eq!(patch.0.len(), 2, "{patch:?}");
    assert!(diff::only_ignored(&patch, &stream.diff));
}

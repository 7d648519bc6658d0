//! Real polled sequences replayed through the whole application: a mock upstream serves one
//! recorded body per poll (GTFS-realtime protobuf, GBFS JSON gzip-encoded on the wire, JSON
//! with a top-level array), and an SSE subscriber rebuilds every snapshot exactly. Invalid and
//! truncated protobuf bodies become error events while the last snapshot stays.

use std::time::Duration;

use patchwire::upstream::decode::{Format, decode};
use patchwire_test_data::{self as data, GTFS_RT_SEQUENCES};
use serde_json::Value;

use crate::support::*;

/// How the mock upstream serves a sequence.
struct Wire {
    content_type: &'static str,
    gzip: bool,
}

const PROTOBUF: Wire = Wire {
    content_type: "application/x-protobuf",
    gzip: false,
};

/// Serves `bodies` one per poll and checks that a subscriber's document equals each decoded
/// body in turn. Every consecutive pair of these sequences has a real change, so each poll
/// publishes exactly one patch.
async fn replay(name: &str, format: Format, wire: Wire, bodies: &[(String, Vec<u8>)]) {
    let expected: Vec<Value> = bodies
        .iter()
        .map(|(file, body)| {
            decode(format, body).unwrap_or_else(|e| panic!("{name}/{file} does not decode: {e}"))
        })
        .collect();
    let upstream = MockUpstream::start(Value::Null).await;
    upstream.content_type(wire.content_type);
    upstream.gzip(wire.gzip);
    upstream.set_raw_body(&bodies[0].1);
    let mut config = config_from_toml(&format!(
        "{}format = \"{}\"\nmax_body = \"8 MiB\"\n",
        polled(name, &upstream.url()),
        format.as_str()
    ));
    // Below the 100 ms floor of a file's `interval` (which spares real upstreams): this mock
    // serves from memory, and the subscriber waits for a poll per recorded body (350 of them).
    config.streams[0].interval = Duration::from_millis(20);
    let app = TestApp::spawn(config).await;
    let mut client = app.subscribe(name, &[]).await;

    let mut rebuilt = Rebuilt::default();
    for (i, ((file, body), want)) in bodies.iter().zip(&expected).enumerate() {
        if i > 0 {
            upstream.set_raw_body(body);
        }
        assert!(
            rebuilt.converge(&mut client, want, SOON).await,
            "{name}: after {file} (poll {i}) the subscriber's document differs from the upstream's"
        );
    }
    assert!(rebuilt.errors.is_empty(), "{name}: {:?}", rebuilt.errors);
    assert_eq!(rebuilt.snapshots, 1, "{name}: one snapshot, then patches");
    assert_eq!(
        rebuilt.patches,
        bodies.len() - 1,
        "{name}: one patch per poll"
    );
    app.stop().await;
}

#[tokio::test]
async fn gtfs_rt_sequences_are_rebuilt_exactly_by_a_subscriber() {
    for dir in GTFS_RT_SEQUENCES {
        let Some(bodies) = data::gtfs_rt_bodies(dir) else {
            return;
        };
        let name = dir.rsplit('/').next().unwrap_or(dir);
        replay(name, Format::GtfsRt, PROTOBUF, &bodies).await;
    }
}

#[tokio::test]
async fn gzip_encoded_gbfs_polls_are_rebuilt_exactly() {
    let Some(bodies) = data::gbfs_bodies() else {
        return;
    };
    let wire = Wire {
        content_type: "application/json",
        gzip: true,
    };
    replay("gbfs", Format::Json, wire, &bodies).await;
}

#[tokio::test]
async fn json_with_a_top_level_array_is_rebuilt_exactly() {
    let Some(polls) = data::gbfs_bodies() else {
        return;
    };
    // The stations of each poll as the whole document: `[{"station_id": ...}, ...]`.
    let bodies: Vec<(String, Vec<u8>)> = polls
        .into_iter()
        .map(|(file, body)| {
            let doc: Value = serde_json::from_slice(&body).expect("GBFS JSON");
            let stations = serde_json::to_vec(&doc["data"]["stations"]).expect("serializable");
            (file, stations)
        })
        .collect();
    let wire = Wire {
        content_type: "application/json",
        gzip: false,
    };
    replay("stations", Format::Json, wire, &bodies).await;
}

/// An invalid or truncated protobuf body is an upstream failure: subscribers get an error
/// event, the stream keeps its last snapshot, and the next valid poll continues with a patch.
#[tokio::test]
async fn invalid_and_truncated_protobuf_are_upstream_errors_that_keep_the_snapshot() {
    let (Some(bodies), Some(invalid)) = (
        data::gtfs_rt_bodies(GTFS_RT_SEQUENCES[0]),
        data::path("gtfs-rt/single/transitland/invalid.pb"),
    ) else {
        return;
    };
    let invalid = std::fs::read(&invalid).expect("readable");
    let first = decode(Format::GtfsRt, &bodies[0].1).expect("decodes");
    let second = decode(Format::GtfsRt, &bodies[1].1).expect("decodes");
    let truncated = &bodies[1].1[..bodies[1].1.len() / 2];

    let upstream = MockUpstream::start(Value::Null).await;
    upstream.content_type("application/x-protobuf");
    upstream.set_raw_body(&bodies[0].1);
    // The GTFS-realtime defaults of a stream's diff come with its format.
    let app = TestApp::from_toml(&format!(
        "{}format = \"gtfs-rt\"\n",
        polled("vp", &upstream.url())
    ))
    .await;
    let mut client = app.subscribe("vp", &[]).await;
    let mut rebuilt = Rebuilt::default();
    assert!(rebuilt.converge(&mut client, &first, SOON).await);

    for (label, bad) in [
        ("invalid.pb", &invalid[..]),
        ("a truncated feed", truncated),
    ] {
        upstream.set_raw_body(bad);
        let event = client.expect(SOON).await;
        assert_eq!(event.event, "error", "{label}: {}", event.data);
        let error = event.json();
        assert_eq!(error["status"], 502, "{label}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("invalid GTFS-realtime feed (expected a protobuf FeedMessage)"),
            "{label}: {message}"
        );
        assert!(
            message.contains(&upstream.url()),
            "{label}: names the URL: {message}"
        );
        // The last good snapshot is still what the stream serves.
        let served: Value = reqwest::Client::new()
            .get(app.url("/streams/vp"))
            .header("accept", "application/json")
            .send()
            .await
            .expect("JSON view")
            .json()
            .await
            .expect("JSON");
        assert_eq!(served, first, "{label}: the snapshot stays");
    }

    upstream.set_raw_body(&bodies[1].1);
    assert!(rebuilt.converge(&mut client, &second, SOON).await);
    assert_eq!(rebuilt.snapshots, 1, "recovery continues with a patch");
    assert_eq!(rebuilt.patches, 1);
    app.stop().await;
}

//! Views on the real MBTA sequences: a view per route of vehicle positions and trip updates,
//! each subscriber's rebuilt document exactly the feed's entities of that route at every poll,
//! and vehicles that change route leaving one view with a `remove` and entering another with
//! an `add`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use patchwire::config::{self, FileKind};
use patchwire::hub::{Initial, Resume, Stream, StreamEvent, StreamOptions};
use patchwire::metrics::Metrics;
use patchwire::snapshot::SnapshotStore;
use patchwire::views::spec::{Asked, parse_query};
use patchwire::views::{Budget, StreamViews};
use patchwire::wire::ChangeKind;
use patchwire_test_data::GTFS_RT_SEQUENCES;
use serde_json::Value;
use tokio::sync::broadcast::error::TryRecvError;

use crate::support::gtfs_rt_sequence;

/// The route of an entity, read independently of the views' code.
fn route_of(entity: &Value) -> Option<&str> {
    entity
        .pointer("/trip_update/trip/route_id")
        .or_else(|| entity.pointer("/vehicle/trip/route_id"))
        .and_then(Value::as_str)
}

/// `document` with only `route`'s entities, and without the ignored header timestamp.
fn expected(document: &Value, route: &str) -> Value {
    let mut out = document.clone();
    let kept: Vec<Value> = document["entity"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| route_of(e) == Some(route))
        .cloned()
        .collect();
    out["entity"] = Value::Array(kept);
    untimed(out)
}

fn untimed(mut document: Value) -> Value {
    if let Some(header) = document.get_mut("header").and_then(Value::as_object_mut) {
        header.remove("timestamp");
    }
    document
}

/// One route's subscriber: its document, and the patch operations it received.
struct Follower {
    route: String,
    subscription: patchwire::hub::Subscription,
    document: Option<Value>,
    removes: usize,
    adds: usize,
}

impl Follower {
    fn drain(&mut self) {
        loop {
            match self.subscription.live.try_recv() {
                Ok(StreamEvent::Change(change, _)) => match change.kind {
                    ChangeKind::Snapshot => {
                        self.document = Some(serde_json::from_slice(&change.payload).unwrap());
                    }
                    ChangeKind::Patch => {
                        let patch: Value = serde_json::from_slice(&change.payload).unwrap();
                        for op in patch.as_array().unwrap() {
                            let path = op["path"].as_str().unwrap();
                            let entity_level = path.starts_with("/entity/")
                                && path["/entity/".len()..].split('/').count() == 1;
                            match op["op"].as_str().unwrap() {
                                "remove" if entity_level => self.removes += 1,
                                "add" if entity_level => self.adds += 1,
                                _ => {}
                            }
                        }
                        let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
                        json_patch::patch(self.document.as_mut().unwrap(), &patch).unwrap();
                    }
                },
                Ok(_) => {}
                Err(TryRecvError::Empty) => return,
                Err(other) => panic!("route {}: {other:?}", self.route),
            }
        }
    }
}

fn per_route_views_are_exact(sequence: &str) {
    let Some(polls) = gtfs_rt_sequence(sequence) else {
        return;
    };
    let text = "[[streams]]\nname = \"feed\"\nurl = \"https://cdn.example.com/feed.pb\"\nformat = \"gtfs-rt\"\n";
    let raw = config::parse_raw(text, FileKind::Toml, None, Vec::new()).unwrap();
    let mut config = config::validate(raw, None, &|_| None).unwrap();
    let settings = config.streams.remove(0);
    let options = StreamOptions {
        history: 1000,
        history_bytes: u64::MAX,
        buffer: 100_000,
        diff: settings.diff.clone(),
    };
    let snapshots = SnapshotStore::new();
    let stream = Arc::new(Stream::new(
        "feed",
        options.clone(),
        snapshots.clone(),
        Arc::new(Metrics::new()),
    ));
    let views = Arc::new(StreamViews::new(
        &stream,
        settings.views.expect("gtfs-rt streams have views"),
        options,
        snapshots,
        Budget::new(10_000),
    ));
    assert!(stream.derive(views.clone()));
    let routes: BTreeSet<String> = polls
        .iter()
        .flat_map(|(_, doc)| doc["entity"].as_array().unwrap().iter())
        .filter_map(|e| route_of(e).map(str::to_owned))
        .collect();
    assert!(routes.len() > 5, "{sequence}: only {} routes", routes.len());
    // Where each entity was, to count the ones changing route.
    let mut moves = 0;
    let mut last_route: BTreeMap<String, String> = BTreeMap::new();
    let mut followers: Vec<Follower> = Vec::new();
    for (i, (name, document)) in polls.iter().enumerate() {
        stream.publish(document.clone());
        if i == 0 {
            for route in &routes {
                let query = format!("route={}", percent(route));
                let Asked::AdHoc(spec) = parse_query(Some(&query), &views.aliases()).unwrap()
                else {
                    panic!("{query}")
                };
                let (id, spec) = views.resolve(Asked::AdHoc(spec)).unwrap().unwrap();
                let subscription = views.subscribe(&stream, id, spec, &Resume::Fresh).unwrap();
                let document = subscription.initial.iter().find_map(|i| match i {
                    Initial::Snapshot(s) => Some(s.document.clone()),
                    _ => None,
                });
                followers.push(Follower {
                    route: route.clone(),
                    subscription,
                    document,
                    removes: 0,
                    adds: 0,
                });
            }
        }
        for follower in &mut followers {
            follower.drain();
            let got = follower.document.clone().map(untimed);
            assert_eq!(
                got.as_ref(),
                Some(&expected(document, &follower.route)),
                "{sequence}/{name}: route {}",
                follower.route
            );
        }
        for entity in document["entity"].as_array().unwrap() {
            let (Some(id), Some(route)) = (entity["id"].as_str(), route_of(entity)) else {
                continue;
            };
            if let Some(before) = last_route.insert(id.to_owned(), route.to_owned())
                && before != route
            {
                moves += 1;
            }
        }
    }
    let removes: usize = followers.iter().map(|f| f.removes).sum();
    let adds: usize = followers.iter().map(|f| f.adds).sum();
    eprintln!(
        "{sequence}: {} polls, {} routes, {moves} entities changed route, {adds} adds and {removes} removes across views",
        polls.len(),
        routes.len()
    );
    if moves > 0 {
        assert!(
            adds >= moves && removes >= moves,
            "{moves} moves, {adds} adds, {removes} removes"
        );
    }
}

fn percent(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn vehicle_positions_per_route() {
    per_route_views_are_exact(GTFS_RT_SEQUENCES[0]);
}

#[test]
fn trip_updates_per_route() {
    per_route_views_are_exact(GTFS_RT_SEQUENCES[1]);
}

//! Views through the real server: a subscriber asking for some entities (`?route=R1`, a named
//! view `@r2`, an RFC 9535 `where`, `fields`) rebuilds exactly the filtered document over SSE
//! (plain and gzip) and WebSocket, polls it as JSON with its own ETag, resumes exactly, gets
//! nothing for changes that do not touch it, and bad filters are 400s that say what is wrong.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::ws::WsClient;
use crate::support::*;

/// A fleet of five vehicles: `moved` is a vehicle whose route changes from R1 to R2 at
/// version 3; the speed of every vehicle changes with `version`, R3's only at version 4.
fn fleet(version: u64) -> Value {
    let vehicle = |id: &str, route: &str, speed: u64| json!({"id": id, "route": route, "speed": speed, "status": if speed.is_multiple_of(2) { "STOPPED" } else { "MOVING" }, "pad": "p".repeat(40)});
    let moved_route = if version >= 3 { "R2" } else { "R1" };
    json!({
        // A header large enough that a view's patches are smaller than its document.
        "header": {"version": version, "feed": "fleet", "notes": "n".repeat(600)},
        "vehicles": [
            vehicle("a", "R1", version),
            vehicle("moved", moved_route, 10 + version),
            vehicle("b", "R2", 20 + version),
            vehicle("c", "R2", 30),
            vehicle("d", "R3", if version >= 4 { 41 } else { 40 }),
        ]
    })
}

/// The view of `document` keeping `keep`'d vehicles, each projected to `fields` (all without).
fn view_of(document: &Value, keep: impl Fn(&Value) -> bool, fields: Option<&[&str]>) -> Value {
    let mut out = document.clone();
    let kept: Vec<Value> = document["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| keep(v))
        .map(|v| match fields {
            None => v.clone(),
            Some(fields) => {
                let mut projected = serde_json::Map::new();
                for field in ["id"].iter().chain(fields) {
                    if let Some(value) = v.get(*field) {
                        projected.insert((*field).to_owned(), value.clone());
                    }
                }
                Value::Object(projected)
            }
        })
        .collect();
    out["vehicles"] = Value::Array(kept);
    out
}

fn route(route: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["route"] == route
}

fn config(url: &str, extra: &str) -> String {
    config_lingering(url, "1s", extra)
}

/// [`config`] with idle views kept for `linger`.
fn config_lingering(url: &str, linger: &str, extra: &str) -> String {
    format!(
        "{}\n[streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\naliases = {{ route = \"route\", status = \"status\" }}\nlinger = \"{linger}\"\nmax_views = 8\n\n[[streams.views]]\nname = \"r2\"\nfilter = {{ route = \"R2\" }}\n{extra}",
        polled("fleet", url)
    )
}

#[tokio::test]
async fn view_subscribers_rebuild_exactly_the_filtered_document() {
    let upstream = MockUpstream::start(fleet(1)).await;
    let app = TestApp::from_toml(&config(&upstream.url(), "")).await;
    app.wait_for_seq("fleet", 1).await;

    let mut r1 = app.subscribe("fleet?route=R1", &[]).await;
    let mut named = app.subscribe("fleet@r2", &[]).await;
    let mut by_param = app.subscribe("fleet?view=r2", &[]).await;
    let mut projected = SseClient::connect(
        &app.url("/streams/fleet?where=@.speed%20%3E%2015&fields=speed"),
        &[],
        true,
    )
    .await;
    assert_eq!(r1.status, 200);
    let mut rebuilt: Vec<Rebuilt> = (0..4).map(|_| Rebuilt::default()).collect();
    for version in 1..=4 {
        upstream.set(fleet(version));
        let document = fleet(version);
        let expected = [
            view_of(&document, route("R1"), None),
            view_of(&document, route("R2"), None),
            view_of(&document, route("R2"), None),
            view_of(
                &document,
                |v| v["speed"].as_u64().unwrap() > 15,
                Some(&["speed"]),
            ),
        ];
        for ((client, rebuilt), expected) in [&mut r1, &mut named, &mut by_param, &mut projected]
            .into_iter()
            .zip(&mut rebuilt)
            .zip(&expected)
        {
            assert!(
                rebuilt.converge(client, expected, SOON).await,
                "version {version}: {:?} != {expected}",
                rebuilt.document
            );
        }
    }
    // The named view is one view however it is asked for.
    assert_eq!(rebuilt[1].last_id, rebuilt[2].last_id);
    assert!(
        rebuilt[1].last_id.starts_with("fleet@r2:"),
        "{}",
        rebuilt[1].last_id
    );
    // The vehicle that changed route left R1 with a remove and entered R2 with an add: R1 got
    // patches only (no second snapshot).
    assert_eq!(rebuilt[0].snapshots, 1);
    assert!(rebuilt[0].patches >= 3);

    // A change touching only R3 sends nothing to R1's subscribers: the next event R1 gets is
    // from a later change that touches it.
    let before = app.metric("patchwire_view_changes_total").await;
    let mut only_r3 = fleet(4);
    only_r3["vehicles"][4]["pad"] = json!("changed");
    upstream.set(only_r3.clone());
    // Versions 1 to 4 were changes 1 to 4.
    app.wait_for_seq("fleet", 5).await;
    assert!(r1.next(Duration::from_millis(600)).await.is_none());
    assert_eq!(app.metric("patchwire_view_changes_total").await, before);
    let mut touches_r1 = only_r3.clone();
    touches_r1["vehicles"][0]["speed"] = json!(77);
    upstream.set(touches_r1.clone());
    assert!(
        rebuilt[0]
            .converge(&mut r1, &view_of(&touches_r1, route("R1"), None), SOON)
            .await
    );
    assert!(app.metric("patchwire_views").await >= 3.0);
    app.stop().await;
}

#[tokio::test]
async fn a_view_resumes_exactly_and_polls_with_its_own_etag() {
    let upstream = MockUpstream::start(fleet(1)).await;
    // The view has no subscriber while the three changes are made: it must outlive them
    // however slow the machine is (an evicted view's resume is a snapshot, tested elsewhere).
    let app = TestApp::from_toml(&config_lingering(&upstream.url(), "60s", "")).await;
    app.wait_for_seq("fleet", 1).await;
    let mut client = app.subscribe("fleet?route=R1", &[]).await;
    let mut rebuilt = Rebuilt::default();
    assert!(
        rebuilt
            .converge(&mut client, &view_of(&fleet(1), route("R1"), None), SOON)
            .await
    );
    let last = rebuilt.last_id.clone();
    drop(client);
    // Three changes while away, each touching R1.
    for version in 2..=4 {
        upstream.set(fleet(version));
        app.wait_for_seq("fleet", version).await;
    }
    let mut resumed = app
        .subscribe("fleet?route=R1", &[("last-event-id", &last)])
        .await;
    let expected = view_of(&fleet(4), route("R1"), None);
    let mut patches = Vec::new();
    while rebuilt.document.as_ref() != Some(&expected) {
        let event = resumed.expect(SOON).await;
        assert_eq!(
            event.event, "patch",
            "a resume within history replays patches"
        );
        patches.push(event.id.clone());
        rebuilt.apply(&event);
    }
    assert_eq!(patches.len(), 3, "{patches:?}");
    // Ids are the view's name, the source's epoch and the source's sequence numbers.
    let (prefix, epoch_seq) = last.split_once(':').unwrap();
    let epoch = epoch_seq.split(':').next().unwrap();
    assert_eq!(
        patches,
        (2..=4)
            .map(|s| format!("{prefix}:{epoch}:{s}"))
            .collect::<Vec<_>>()
    );

    // The JSON view: the view's document with an ETag that a change elsewhere keeps.
    let http = reqwest::Client::new();
    let get = |etag: Option<String>| {
        let mut request = http
            .get(app.url("/streams/fleet?route=R1"))
            .header("accept", "application/json");
        if let Some(etag) = etag {
            request = request.header("if-none-match", etag);
        }
        request.send()
    };
    let first = get(None).await.unwrap();
    assert_eq!(first.status(), 200);
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(first.json::<Value>().await.unwrap(), expected);
    let mut elsewhere = fleet(4);
    elsewhere["vehicles"][4]["speed"] = json!(5);
    upstream.set(elsewhere);
    app.wait_for_seq("fleet", 5).await;
    assert_eq!(get(Some(etag.clone())).await.unwrap().status(), 304);
    let (status, whole) = app.json_view("fleet").await;
    assert_eq!(
        (status, whole["vehicles"][4]["speed"].clone()),
        (200, json!(5))
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_filters_are_refused_with_what_is_wrong() {
    let upstream = MockUpstream::start(fleet(1)).await;
    let plain = MockUpstream::start(json!({"n": 1})).await;
    let toml = format!(
        "{}\n{}",
        config(&upstream.url(), ""),
        polled("plain", &plain.url())
    );
    let app = TestApp::from_toml(&toml).await;
    app.wait_for_seq("fleet", 1).await;
    let http = reqwest::Client::new();
    let refused = |path: &'static str| {
        let request = http.get(app.url(path)).send();
        async move {
            let response = request.await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (
                status,
                body["message"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    let (status, message) = refused("/streams/fleet?line=R1").await;
    assert_eq!(status, 400);
    assert_eq!(
        message,
        "unknown filter `line`; this stream's aliases are: route, status"
    );
    let (status, message) = refused("/streams/fleet?where=@.speed%20%3E").await;
    assert_eq!(status, 400);
    assert!(
        message.contains("RFC 9535") && message.contains("at character"),
        "{message}"
    );
    let (status, message) = refused("/streams/fleet?route=").await;
    assert_eq!(
        (status, message.contains("has no value")),
        (400, true),
        "{message}"
    );
    let (status, message) = refused("/streams/fleet?fields=a/*/b").await;
    assert_eq!(
        (status, message.contains("`fields`")),
        (400, true),
        "{message}"
    );
    let (status, message) = refused("/streams/fleet@nope").await;
    assert_eq!(status, 404);
    assert!(message.contains("its views are: r2"), "{message}");
    // A configured view is asked for alone: filters besides it are refused, not ignored.
    for path in [
        "/streams/fleet?view=r2&route=R1",
        "/streams/fleet?view=r2&fields=speed",
        "/streams/fleet@r2?route=R1",
        "/streams/fleet@r2?where=@.speed%3E1",
        "/streams/fleet@r2?view=r2",
    ] {
        let (status, message) = refused(path).await;
        assert_eq!(status, 400, "{path}: {message}");
        assert!(
            message.contains("is a configured view"),
            "{path}: {message}"
        );
    }
    let (status, message) = refused("/streams/fleet@r2?line=R1").await;
    assert_eq!(
        (status, message.contains("unknown filter `line`")),
        (400, true),
        "{message}"
    );
    let resumed = app.subscribe("fleet@r2?lastEventId=x", &[]).await;
    assert_eq!(resumed.status, 200, "a view's own parameters are kept");
    drop(resumed);
    // A stream without views ignores parameters it does not know...
    let ignored = app.subscribe("plain?route=R1", &[]).await;
    assert_eq!(ignored.status, 200);
    drop(ignored);
    // ...but refuses a view.
    let (status, message) = refused("/streams/plain?where=@.n%3E1").await;
    assert_eq!(status, 400);
    assert!(message.contains("has no views"), "{message}");

    // At most `max_views` (8) distinct views of the stream at once; idle ones are evicted after
    // their linger (1 s), which makes room again.
    let mut held = Vec::new();
    for speed in 0..8 {
        held.push(
            app.subscribe(&format!("fleet?where=@.speed%20%3E%20{speed}"), &[])
                .await,
        );
    }
    let (status, message) = refused("/streams/fleet?where=@.speed%20%3E%20100").await;
    assert_eq!(status, 429);
    assert!(
        message.contains("at most 8 in this stream (its filtering.max_views)"),
        "{message}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Eviction happens at the next change (or view creation).
    upstream.set(fleet(2));
    app.wait_for_seq("fleet", 2).await;
    let mut client = app.subscribe("fleet?where=@.speed%20%3E%20100", &[]).await;
    assert_eq!(client.status, 200);
    assert_eq!(client.expect(SOON).await.event, "snapshot");
    assert!(app.metric("patchwire_view_evictions_total").await >= 8.0);
    app.stop().await;
}

#[tokio::test]
async fn views_over_websocket_share_a_connection_with_the_whole_stream() {
    let upstream = MockUpstream::start(fleet(1)).await;
    let app = TestApp::from_toml(&config(&upstream.url(), "")).await;
    app.wait_for_seq("fleet", 1).await;
    let mut ws = WsClient::connect(&app, "", &[]).await;
    ws.send(json!({"type": "subscribe", "id": "all", "stream": "fleet"}))
        .await;
    ws.send(json!({"type": "subscribe", "id": "r1", "stream": "fleet", "filter": "route=R1&fields=speed"}))
        .await;
    ws.send(json!({"type": "subscribe", "id": "r2", "stream": "fleet", "view": "r2"}))
        .await;
    ws.send(json!({"type": "subscribe", "id": "bad", "stream": "fleet", "filter": "line=1"}))
        .await;
    let mut documents: std::collections::HashMap<String, Value> = Default::default();
    let mut names: std::collections::HashMap<String, String> = Default::default();
    let mut refused = None;
    upstream.set(fleet(2));
    let targets = |version: u64| {
        let document = fleet(version);
        [
            ("all", document.clone()),
            ("r1", view_of(&document, route("R1"), Some(&["speed"]))),
            ("r2", view_of(&document, route("R2"), None)),
        ]
    };
    let deadline = tokio::time::Instant::now() + SOON;
    let mut version = 2;
    loop {
        let done = targets(version).iter().all(|(id, expected)| {
            names
                .get(*id)
                .and_then(|name| documents.get(name))
                .is_some_and(|d| d == expected)
        });
        if done && refused.is_some() {
            if version == 4 {
                break;
            }
            version += 1;
            upstream.set(fleet(version));
        }
        assert!(tokio::time::Instant::now() < deadline, "{documents:?}");
        let Some(message) = ws.next(SOON).await else {
            panic!("no message")
        };
        match message["type"].as_str().unwrap() {
            "subscribed" => {
                names.insert(
                    message["id"].as_str().unwrap().to_owned(),
                    message["stream"].as_str().unwrap().to_owned(),
                );
            }
            "refused" => refused = Some(message),
            "snapshot" => {
                documents.insert(
                    message["stream"].as_str().unwrap().to_owned(),
                    message["data"].clone(),
                );
            }
            "patch" => {
                let document = documents
                    .get_mut(message["stream"].as_str().unwrap())
                    .expect("a patch after a snapshot");
                let patch: json_patch::Patch =
                    serde_json::from_value(message["data"].clone()).unwrap();
                json_patch::patch(document, &patch).unwrap();
            }
            _ => {}
        }
    }
    let refused = refused.unwrap();
    assert_eq!(refused["id"], "bad");
    assert_eq!(refused["status"], 400);
    assert_eq!(names["r2"], "fleet@r2");
    assert!(names["r1"].starts_with("fleet@~"), "{names:?}");
    app.stop().await;
}

//! Reloading the configuration of a running `patchwire` process: `SIGHUP` and
//! `POST /admin/reload`, with subscribers connected.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::process::Process;
use crate::support::*;

const ADMIN: &str = "test-admin-token-0123456789";

/// A document whose one-field change is a patch (smaller than the document).
fn doc(name: &str, v: u64) -> Value {
    json!({"feed": name, "v": v, "note": "x".repeat(200)})
}

/// The epoch of an event id `{stream}:{epoch}:{seq}`.
fn epoch(id: &str) -> u64 {
    id.rsplit(':')
        .nth(1)
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("not an event id: {id:?}"))
}

/// Settings every configuration of these tests shares.
const COMMON: &str = r#"
[server]
shutdown_grace = "1s"
keepalive = "1s"

[upstream.default_rate_limit]
per_second = 1000
burst = 1000
"#;

fn stream(name: &str, url: &str, interval: &str) -> String {
    format!("[[streams]]\nname = \"{name}\"\nurl = \"{url}\"\ninterval = \"{interval}\"\n")
}

/// The next event that is not a keep-alive's empty one, within `SOON`.
async fn next_event(client: &mut SseClient) -> SseEvent {
    loop {
        let event = client.expect(SOON).await;
        if !event.event.is_empty() {
            return event;
        }
    }
}

async fn listing(process: &Process) -> Value {
    reqwest::get(process.url("/streams"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn listed<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["streams"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_unchanged_streams_updates_restarts_removes_and_adds() {
    let kept = MockUpstream::start(doc("kept", 1)).await;
    let slow = MockUpstream::start(doc("slow", 1)).await;
    let moved = MockUpstream::start(doc("moved", 1)).await;
    let moved_to = MockUpstream::start(doc("moved-to", 1)).await;
    let gone = MockUpstream::start(doc("gone", 1)).await;
    let fresh = MockUpstream::start(doc("fresh", 1)).await;
    let dir = tempfile::tempdir().unwrap();
    let before = format!(
        "{COMMON}\n{}\n{}\n{}\n{}",
        stream("kept", &kept.url(), "200ms"),
        stream("slow", &slow.url(), "1h"),
        stream("moved", &moved.url(), "200ms"),
        stream("gone", &gone.url(), "200ms"),
    );
    let process = Process::start(dir.path(), &before).await;
    let subscribe = |name: &str| {
        let url = process.url(&format!("/streams/{name}"));
        async move { SseClient::connect(&url, &[], false).await }
    };
    let mut kept_client = subscribe("kept").await;
    let mut slow_client = subscribe("slow").await;
    let mut moved_client = subscribe("moved").await;
    let mut gone_client = subscribe("gone").await;
    let kept_first = next_event(&mut kept_client).await;
    let slow_first = next_event(&mut slow_client).await;
    let moved_first = next_event(&mut moved_client).await;
    assert_eq!(next_event(&mut gone_client).await.event, "snapshot");
    assert_eq!(kept_first.event, "snapshot");

    let after = format!(
        "{COMMON}\n{}\n{}\n{}\n{}",
        stream("kept", &kept.url(), "200ms"),
        stream("slow", &slow.url(), "200ms"),
        stream("moved", &moved_to.url(), "200ms"),
        stream("fresh", &fresh.url(), "200ms"),
    );
    process.rewrite(&after);
    process.hangup();
    process.logged("configuration reloaded", SOON).await;

    // The removed stream's subscribers are told, then the stream ends.
    let told = next_event(&mut gone_client).await;
    assert_eq!(told.event, "error", "{told:?}");
    assert_eq!(told.json()["cause"], "stream-removed");
    assert_eq!(told.json()["status"], 410);
    assert!(
        gone_client.ends_within(SOON).await,
        "the removed stream ends"
    );

    // The new stream is listed and serves its document.
    let list = listing(&process).await;
    assert!(listed(&list, "fresh").is_some(), "{list}");
    assert!(listed(&list, "gone").is_none(), "{list}");
    let mut fresh_client = subscribe("fresh").await;
    let first = next_event(&mut fresh_client).await;
    assert_eq!(first.event, "snapshot");
    assert_eq!(first.json(), doc("fresh", 1));

    // A new URL: the stream starts over with the new upstream's document, in a new epoch,
    // to the subscribers it had.
    let restarted = next_event(&mut moved_client).await;
    assert_eq!(restarted.event, "snapshot", "{restarted:?}");
    assert_eq!(restarted.json(), doc("moved-to", 1));
    assert!(epoch(&restarted.id) > epoch(&moved_first.id));

    // A new interval applies live: an hourly stream now follows its upstream within a
    // fraction of a second, in the same epoch.
    slow.set(doc("slow", 2));
    let patch = next_event(&mut slow_client).await;
    assert_eq!(patch.event, "patch", "{patch:?}");
    assert_eq!(epoch(&patch.id), epoch(&slow_first.id));
    assert_eq!(
        listed(&listing(&process).await, "slow").unwrap()["upstream"]["interval_ms"],
        200
    );

    // The unchanged stream kept its subscriber, epoch and sequence: its next change is a
    // patch, not a snapshot.
    kept.set(doc("kept", 2));
    let patch = next_event(&mut kept_client).await;
    assert_eq!(patch.event, "patch", "{patch:?}");
    assert_eq!(epoch(&patch.id), epoch(&kept_first.id));
    let log = process.log();
    assert!(
        log.contains("removed") && log.contains("restarted") && log.contains("added"),
        "{log}"
    );
}

/// A configuration with `[webhooks]` (for the admin token) and the stream `a`.
fn with_admin(dir: &std::path::Path, stream_toml: &str, more: &str) -> String {
    format!(
        "{COMMON}\n{more}\n[webhooks]\ndatabase = \"{}\"\nadmin_token = \"{ADMIN}\"\n\n{stream_toml}",
        dir.join("outbox.db").display()
    )
}

async fn reload(process: &Process, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(process.url("/admin/reload"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reload_endpoint_needs_the_admin_token_and_refuses_what_it_cannot_apply() {
    let upstream = MockUpstream::start(doc("a", 1)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = |interval: &str, more: &str| {
        with_admin(dir.path(), &stream("a", &upstream.url(), interval), more)
    };
    let process = Process::start(dir.path(), &file("200ms", "")).await;
    let mut client = SseClient::connect(&process.url("/streams/a"), &[], false).await;
    let first = next_event(&mut client).await;

    assert_eq!(reload(&process, None).await.0, 401);
    assert_eq!(
        reload(&process, Some("wrong-token-0123456789")).await.0,
        401
    );

    // An invalid file: every problem listed, nothing changed.
    process.rewrite(&format!(
        "{}\n[[streams]]\nname = \"a\"\nsource = \"push\"\nunknown_key = 1\n",
        file("0s", "[log]\nformat = \"xml\"\n")
    ));
    let (status, body) = reload(&process, Some(ADMIN)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["reloaded"], false);
    let problems = body["problems"].as_array().unwrap();
    let keys: Vec<&str> = problems
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert!(problems.len() >= 3, "{body}");
    assert!(keys.iter().any(|k| k.contains("interval")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("log.format")), "{keys:?}");
    assert!(
        keys.iter()
            .any(|k| k.contains("unknown_key") || k.contains("streams[1]")),
        "{keys:?}"
    );

    // A section that cannot change live: refused, naming it; nothing else applied either.
    process.rewrite(&file("300ms", "[websocket]\nmax_subscriptions = 7\n"));
    let (status, body) = reload(&process, Some(ADMIN)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["needs_restart"][0]["section"], "websocket", "{body}");
    assert_eq!(
        listed(&listing(&process).await, "a").unwrap()["upstream"]["interval_ms"],
        200
    );

    // A valid one: applied, and the answer says what changed.
    process.rewrite(&file("300ms", ""));
    let (status, body) = reload(&process, Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reloaded"], true);
    assert_eq!(
        body["streams"],
        json!([{"stream": "a", "change": "updated", "fields": ["interval"]}])
    );
    assert_eq!(
        listed(&listing(&process).await, "a").unwrap()["upstream"]["interval_ms"],
        300
    );

    // The same file again: nothing changes.
    let (status, body) = reload(&process, Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], false, "{body}");

    // Through all of it the subscriber stayed, in the same epoch, with no new snapshot.
    upstream.set(doc("a", 2));
    let patch = next_event(&mut client).await;
    assert_eq!(patch.event, "patch", "{patch:?}");
    assert_eq!(epoch(&patch.id), epoch(&first.id));
}

const PUSH: &str = "test-push-token-0123456789";

/// A push stream `p` whose items are viewed by `kind`, with the named view `red` keeping
/// `kind = {red}`, and `history`.
fn viewed(red: &str, history: u64) -> String {
    format!(
        r#"{COMMON}
[push]
token = "{PUSH}"

[[streams]]
name = "p"
source = "push"
history = {history}

[streams.filtering]
entities = "/items"
key = "id"
aliases = {{ kind = "kind" }}

[[streams.views]]
name = "red"
filter = {{ kind = "{red}" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reconciles_views_and_starts_a_push_stream_over_from_its_document() {
    let dir = tempfile::tempdir().unwrap();
    let process = Process::start(dir.path(), &viewed("red", 100)).await;
    let items = json!({"items": [
        {"id": "1", "kind": "red", "note": "x".repeat(50)},
        {"id": "2", "kind": "blue", "note": "y".repeat(50)},
    ]});
    let pushed = reqwest::Client::new()
        .post(process.url("/streams/p"))
        .bearer_auth(PUSH)
        .json(&items)
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 200);
    let mut whole = SseClient::connect(&process.url("/streams/p"), &[], false).await;
    let mut red = SseClient::connect(&process.url("/streams/p@red"), &[], false).await;
    let first = next_event(&mut whole).await;
    let red_first = next_event(&mut red).await;
    assert_eq!(red_first.json()["items"].as_array().unwrap().len(), 1);
    assert_eq!(red_first.json()["items"][0]["id"], "1");

    // The named view now keeps blue items, and history changed: the stream starts over.
    process.rewrite(&viewed("blue", 50));
    process.hangup();
    process.logged("configuration reloaded", SOON).await;

    // The whole stream's subscriber stays and gets the document again, in a new epoch.
    let again = next_event(&mut whole).await;
    assert_eq!(again.event, "snapshot", "{again:?}");
    assert_eq!(again.json(), items);
    assert!(epoch(&again.id) > epoch(&first.id));
    // The old view's subscription ends; subscribing again gets the view as now configured.
    assert!(red.ends_within(SOON).await, "the old view ends");
    let mut red = SseClient::connect(&process.url("/streams/p@red"), &[], false).await;
    let now = next_event(&mut red).await;
    assert_eq!(now.event, "snapshot");
    assert_eq!(now.json()["items"].as_array().unwrap().len(), 1, "{now:?}");
    assert_eq!(now.json()["items"][0]["id"], "2");
    assert!(process.log().contains("restarted"), "{}", process.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reconciles_webhook_endpoints_and_concurrent_reloads_wait_their_turn() {
    use crate::webhook::{SECRET, TOKEN, endpoint, webhooks_toml};
    use patchwire::sinks::webhook::body::Mode;

    let upstream = MockUpstream::start(doc("a", 1)).await;
    let first = Receiver::start(&[SECRET]).await;
    let second = Receiver::start(&[SECRET]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = crate::support::store::TestStore::sqlite();
    let file = |endpoints: &str| {
        format!(
            "{COMMON}\n{}\n{endpoints}\n{}",
            webhooks_toml(&store, ""),
            stream("a", &upstream.url(), "200ms")
        )
    };
    let process = Process::start(
        dir.path(),
        &file(&endpoint("one", &first.url(), &["a"], Mode::Patch)),
    )
    .await;
    first
        .wait_for(SOON, "the first endpoint's snapshot", |hits| {
            !hits.is_empty()
        })
        .await;

    // A second endpoint in the file: created, and it gets its snapshot; the first one stays.
    process.rewrite(&file(&format!(
        "{}{}",
        endpoint("one", &first.url(), &["a"], Mode::Patch),
        endpoint("two", &second.url(), &["a"], Mode::Patch)
    )));
    let (a, b) = tokio::join!(reload(&process, Some(TOKEN)), reload(&process, Some(TOKEN)));
    // Two at once: one applies the file, the other waits and finds nothing more to change.
    assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}");
    let changed: Vec<bool> = [&a.1, &b.1].iter().map(|b| b["changed"] == true).collect();
    assert_eq!(changed.iter().filter(|c| **c).count(), 1, "{a:?} {b:?}");
    let applied = if changed[0] { &a.1 } else { &b.1 };
    assert_eq!(
        applied["webhook_endpoints"]["updated"],
        json!(["two"]),
        "{applied}"
    );
    second
        .wait_for(SOON, "the new endpoint's snapshot", |hits| {
            hits.iter().any(|h| h.kind() == "stream.snapshot")
        })
        .await;

    // Removed from the file: disabled, its deliveries kept.
    process.rewrite(&file(&endpoint("two", &second.url(), &["a"], Mode::Patch)));
    let (status, body) = reload(&process, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let shown: Value = reqwest::Client::new()
        .get(process.url("/admin/webhooks/one"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        shown["disabled"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("removed from the configuration")),
        "{shown}"
    );
}

/// The contracts describe the configuration in force: a stream a reload adds has its channel
/// in `/asyncapi.json` and its paths in `/openapi.json`, and one it removes has neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contracts_follow_a_reload() {
    let upstream = MockUpstream::start(doc("a", 1)).await;
    let dir = tempfile::tempdir().unwrap();
    let url = upstream.url();
    let process = Process::start(
        dir.path(),
        &format!("{COMMON}\n{}", stream("a", &url, "200ms")),
    )
    .await;
    let contracts = |process: &Process| {
        let asyncapi = process.url("/asyncapi.json");
        let openapi = process.url("/openapi.json");
        async move {
            let asyncapi: Value = reqwest::get(asyncapi).await.unwrap().json().await.unwrap();
            let openapi: Value = reqwest::get(openapi).await.unwrap().json().await.unwrap();
            (asyncapi, openapi)
        }
    };
    let (asyncapi, openapi) = contracts(&process).await;
    assert!(asyncapi["channels"]["a"].is_object(), "{asyncapi}");
    assert!(asyncapi["channels"]["b"].is_null());
    assert!(openapi["paths"]["/streams/b"].is_null());

    process.rewrite(&format!("{COMMON}\n{}", stream("b", &url, "200ms")));
    process.hangup();
    process.logged("configuration reloaded", SOON).await;
    let (asyncapi, openapi) = contracts(&process).await;
    assert!(asyncapi["channels"]["b"].is_object(), "{asyncapi}");
    assert!(asyncapi["channels"]["b.changes"].is_object(), "{asyncapi}");
    assert!(asyncapi["channels"]["a"].is_null(), "a was removed");
    assert!(
        openapi["paths"]["/streams/b"]["get"].is_object(),
        "{openapi}"
    );
    assert!(
        openapi["paths"]["/streams/b/changes"]["get"].is_object(),
        "{openapi}"
    );
    assert!(openapi["paths"]["/streams/a"].is_null(), "a was removed");
}

/// Vehicle `x` on route R1 at `r1`, `y` on R2 at `r2`, and a note large enough that a
/// one-field change is a patch.
fn vehicles(r1: u64, r2: u64) -> Value {
    json!({"note": "n".repeat(300), "vehicles": [
        {"id": "x", "route": "R1", "speed": r1},
        {"id": "y", "route": "R2", "speed": r2},
    ]})
}

/// The accepted deliveries of `stream`, each message once, in arrival order.
fn delivered(receiver: &Receiver, stream: &str) -> Vec<Hit> {
    let mut seen = std::collections::HashSet::new();
    receiver
        .accepted()
        .into_iter()
        .filter(|h| h.body["stream"] == stream && seen.insert(h.id()))
        .collect()
}

/// Waits until `receiver` rebuilds `expected` from `stream`'s deliveries (every signature
/// verified, every patch on the document held).
async fn rebuilds(receiver: &Receiver, stream: &str, expected: &Value) -> Vec<Hit> {
    let deadline = tokio::time::Instant::now() + SOON * 2;
    loop {
        let hits = delivered(receiver, stream);
        if !hits.is_empty() && crate::webhook::rebuild(&hits) == *expected {
            return hits;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stream}: never rebuilt {expected}; got {:?}",
            hits.iter()
                .map(|h| (h.kind().to_owned(), h.body["epoch"].clone(), h.seq()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With `[webhooks]`, what used to need a restart applies live: a stream the file adds gets a
/// dispatcher (its endpoint receives the snapshot, then patches); a view an endpoint starts
/// receiving gets one (and is released when it stops); a stream whose source changes (polled
/// to push) starts over with a fresh snapshot and its pushes are delivered; a removed stream's
/// dispatcher stops, and its deliveries already queued still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_starts_and_stops_webhook_dispatchers() {
    use crate::webhook::{SECRET, TOKEN, endpoint, webhooks_toml};
    use patchwire::sinks::webhook::body::Mode;

    let up_a = MockUpstream::start(vehicles(1, 1)).await;
    let up_b = MockUpstream::start(doc("b", 1)).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = crate::support::store::TestStore::sqlite();
    let a = format!(
        "{}[streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\n\
         aliases = {{ route = \"route\" }}\nlinger = \"1s\"\n",
        stream("a", &up_a.url(), "100ms")
    );
    let polled_b = stream("b", &up_b.url(), "100ms");
    let pushed_b = "[[streams]]\nname = \"b\"\nsource = \"push\"\n".to_owned();
    let file = |streams: &[&str], b: Option<&str>| {
        format!(
            "{COMMON}\n[push]\ntoken = \"push-token-0123456789\"\n{}\n{}\n{a}{}",
            webhooks_toml(&store, ""),
            endpoint("one", &receiver.url(), streams, Mode::Patch),
            b.unwrap_or_default()
        )
    };
    let process = Process::start(dir.path(), &file(&["a"], None)).await;
    rebuilds(&receiver, "a", &vehicles(1, 1)).await;

    // A new stream, and the endpoint receiving it: applied live, snapshot then patches.
    process.rewrite(&file(&["a", "b"], Some(&polled_b)));
    let (status, body) = reload(&process, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["needs_restart"], json!([]), "{body}");
    assert_eq!(
        body["streams"][1],
        json!({"stream": "b", "change": "added"})
    );
    rebuilds(&receiver, "b", &doc("b", 1)).await;
    up_b.set(doc("b", 2));
    let hits = rebuilds(&receiver, "b", &doc("b", 2)).await;
    assert_eq!(
        hits.iter().map(Hit::kind).collect::<Vec<_>>(),
        ["stream.snapshot", "stream.patch"]
    );

    // The endpoint starts receiving a view: it gets the view's document, then its changes.
    process.rewrite(&file(&["a", "b", "a?route=R1"], Some(&polled_b)));
    let (status, body) = reload(&process, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["webhook_endpoints"]["updated"],
        json!(["one"]),
        "{body}"
    );
    let view_of = |speed: u64| json!({"note": "n".repeat(300), "vehicles": [{"id": "x", "route": "R1", "speed": speed}]});
    let view = loop {
        let named = receiver.accepted().into_iter().find_map(|h| {
            h.body["stream"]
                .as_str()
                .filter(|s| s.starts_with("a@~"))
                .map(str::to_owned)
        });
        if let Some(named) = named {
            break named;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    rebuilds(&receiver, &view, &view_of(1)).await;
    up_a.set(vehicles(2, 1));
    let hits = rebuilds(&receiver, &view, &view_of(2)).await;
    assert_eq!(hits.last().unwrap().kind(), "stream.patch");
    let subscribers = |listing: &Value| -> Option<u64> {
        listed(listing, "a")?["views"]["active"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == view.as_str())?["subscribers"]
            .as_u64()
    };
    assert_eq!(subscribers(&listing(&process).await), Some(1));

    // It stops receiving it: the view's dispatcher stops and the view is released.
    process.rewrite(&file(&["a", "b"], Some(&polled_b)));
    let (status, body) = reload(&process, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let deadline = tokio::time::Instant::now() + SOON;
    while subscribers(&listing(&process).await).is_some_and(|n| n > 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the view was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // `b` becomes a push stream: it starts over (a new epoch, a snapshot to the endpoint),
    // and what is pushed is delivered.
    process.rewrite(&file(&["a", "b"], Some(&pushed_b)));
    let (status, body) = reload(&process, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["streams"][1],
        json!({"stream": "b", "change": "restarted", "fields": ["source"]})
    );
    let push = |document: Value| {
        let url = process.url("/streams/b");
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth("push-token-0123456789")
                .json(&document)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(push(doc("b", 3)).await, 200);
    let hits = rebuilds(&receiver, "b", &doc("b", 3)).await;
    let epochs: Vec<u64> = hits
        .iter()
        .map(|h| h.body["epoch"].as_u64().unwrap())
        .collect();
    let first_new = epochs
        .iter()
        .position(|e| *e != epochs[0])
        .expect("a new epoch");
    assert_eq!(hits[first_new].kind(), "stream.snapshot", "{epochs:?}");

    // A change queued while the receiver fails, then `b` is removed: its dispatcher stops,
    // and the queued delivery still arrives once the receiver answers.
    receiver.script([
        Reply::Status(503, None),
        Reply::Status(503, None),
        Reply::Status(503, None),
    ]);
    let failed = receiver.hits().len();
    assert_eq!(push(doc("b", 4)).await, 200);
    let deadline = tokio::time::Instant::now() + SOON;
    while receiver.hits().len() == failed {
        assert!(tokio::time::Instant::now() < deadline, "no attempt");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    process.rewrite(&file(&["a"], None));
    let (status, body) = reload(&process, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["streams"][1],
        json!({"stream": "b", "change": "removed"})
    );
    rebuilds(&receiver, "b", &doc("b", 4)).await;
    assert!(
        receiver.hits()[failed..].iter().any(|h| h.status == 503),
        "the delivery was pending during the reload"
    );
    // `a` goes on.
    up_a.set(vehicles(3, 1));
    rebuilds(&receiver, "a", &vehicles(3, 1)).await;
}

//! Catch-up over plain HTTP (`GET /streams/{name}/changes`): a client following only its
//! pages (and long-polls) rebuilds exactly what an SSE subscriber rebuilds, for streams and
//! views, across a restart of a stream with persisted history and across history eviction
//! (told to start again from a snapshot, never given a partial list); each kind of answer has
//! its cache headers; bad parameters are 400s that name them.

use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::support::cluster::TestCluster;
use crate::support::*;

/// A document with a keyed entity array: version `n` moves one item and changes the header.
fn document(n: u64) -> Value {
    let items: Vec<Value> = (0..6)
        .map(|i| json!({"id": format!("i{i}"), "value": if i == n % 6 { n } else { i }, "pad": "p".repeat(30)}))
        .collect();
    json!({"header": {"n": n, "notes": "n".repeat(200)}, "items": items})
}

/// One answer: status, headers, JSON body (`Null` when empty).
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn get(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Answer {
    get_at(&app.url(""), path, headers).await
}

/// `GET {base}{path}`: on any server (a cluster's node).
async fn get_at(base: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = reqwest::Client::new().get(format!("{base}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {bytes:?}"))
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn enc(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// A client that follows a stream through catch-up pages only.
struct Follower {
    /// `/streams/{name}/changes`.
    path: String,
    /// The stream's own parameters (filters), if any.
    filter: String,
    document: Option<Value>,
    next: Option<String>,
    snapshots: usize,
    patches: usize,
}

impl Follower {
    fn new(name: &str, filter: &str) -> Follower {
        Follower {
            path: format!("/streams/{name}/changes"),
            filter: filter.to_owned(),
            document: None,
            next: None,
            snapshots: 0,
            patches: 0,
        }
    }

    fn url(&self, extra: &str) -> String {
        let mut params: Vec<String> = Vec::new();
        if !self.filter.is_empty() {
            params.push(self.filter.clone());
        }
        if let Some(next) = &self.next {
            params.push(format!("after={}", enc(next)));
        }
        if !extra.is_empty() {
            params.push(extra.to_owned());
        }
        if params.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, params.join("&"))
        }
    }

    /// Asks for the next page and applies it (a 200); returns the answer whatever it is.
    async fn page(&mut self, app: &TestApp, extra: &str) -> Answer {
        self.page_at(&app.url(""), extra).await
    }

    /// [`Self::page`] from the server at `base`.
    async fn page_at(&mut self, base: &str, extra: &str) -> Answer {
        let answer = get_at(base, &self.url(extra), &[]).await;
        if answer.status == 200 {
            self.apply(&answer);
        }
        answer
    }

    fn apply(&mut self, answer: &Answer) {
        let body = &answer.body;
        assert_eq!(body["schema"], "patchwire.changes.v1", "{body}");
        for change in body["changes"].as_array().expect("changes") {
            let id = change["id"].as_str().expect("id");
            match change["kind"].as_str() {
                Some("snapshot") => {
                    self.document = Some(change["payload"].clone());
                    self.snapshots += 1;
                }
                Some("patch") => {
                    let document = self.document.as_mut().expect("a patch before a snapshot");
                    let patch: json_patch::Patch =
                        serde_json::from_value(change["payload"].clone()).expect("RFC 6902");
                    json_patch::patch(document, &patch)
                        .unwrap_or_else(|e| panic!("{id} does not apply: {e}"));
                    self.patches += 1;
                }
                other => panic!("unknown kind {other:?}"),
            }
            self.next = Some(id.to_owned());
        }
        let next = body["next"].as_str().expect("next");
        assert_eq!(answer.header("stream-next-offset"), Some(next));
        assert_eq!(
            answer.header("stream-up-to-date") == Some("true"),
            body["up_to_date"] == true
        );
        self.next = Some(next.to_owned());
    }

    /// Follows pages of at most `limit` changes until one is up to date; the pages read.
    async fn read_to_top(&mut self, app: &TestApp, limit: usize) -> usize {
        for pages in 1..1000 {
            let answer = self.page(app, &format!("limit={limit}")).await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            if answer.body["up_to_date"] == true {
                return pages;
            }
        }
        panic!("never up to date");
    }
}

#[tokio::test]
async fn a_catch_up_client_rebuilds_what_an_sse_subscriber_rebuilds() {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&format!(
        "{}[streams.diff]\nkeys = {{ \"/items\" = \"id\" }}\n",
        polled("doc", &upstream.url())
    ))
    .await;
    app.wait_for_seq("doc", 1).await;
    let mut sse = app.subscribe("doc", &[]).await;
    let mut rebuilt = Rebuilt::default();
    assert!(rebuilt.converge(&mut sse, &document(1), SOON).await);

    // Long-polls: each answer is the change that woke it, the same as SSE's.
    let mut follower = Follower::new("doc", "");
    follower.read_to_top(&app, 100).await;
    assert_eq!(follower.document.as_ref(), Some(&document(1)));
    for n in 2..=8 {
        let waiting = {
            let url = app.url(&follower.url("wait=10s"));
            tokio::spawn(async move { reqwest::get(url).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        upstream.set(document(n));
        assert!(rebuilt.converge(&mut sse, &document(n), SOON).await);
        let response = tokio::time::timeout(SOON, waiting).await.unwrap().unwrap();
        assert_eq!(response.status(), 200, "the long-poll woke with the change");
        assert!(response.headers().contains_key("stream-cursor"));
        let answer = Answer {
            status: 200,
            headers: response.headers().clone(),
            body: response.json().await.unwrap(),
        };
        follower.apply(&answer);
        // A poll may have caught two versions in one change, never more than one long-poll
        // answer behind: catch up to the top, then compare at the same event id.
        follower.read_to_top(&app, 100).await;
        assert_eq!(follower.document, rebuilt.document, "at version {n}");
        assert_eq!(follower.next.as_deref(), Some(rebuilt.last_id.as_str()));
    }
    assert!(follower.patches >= 7 && follower.snapshots == 1);

    // A new client reading small pages from the start gets the same document.
    let mut late = Follower::new("doc", "");
    let pages = late.read_to_top(&app, 1).await;
    assert_eq!(pages, 1, "from the start: the current document, up to date");
    assert_eq!(late.document, rebuilt.document);
    // And one reading from an early id, page by page.
    let mut early = Follower::new("doc", "");
    early.document = Some(document(1));
    early.next = Some(format!(
        "{}1",
        rebuilt.last_id.trim_end_matches(char::is_numeric)
    ));
    let pages = early.read_to_top(&app, 2).await;
    assert!(pages >= 4, "{pages} pages of at most 2 changes");
    assert_eq!(early.document, rebuilt.document);
    app.stop().await;
}

#[tokio::test]
async fn each_kind_of_answer_has_its_cache_headers() {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    app.wait_for_seq("doc", 1).await;
    for n in 2..=6 {
        upstream.set(document(n));
        app.wait_for_seq("doc", n).await;
    }
    let first = get(&app, "/streams/doc/changes", &[]).await;
    assert_eq!(first.status, 200);
    let top = first.body["next"].as_str().unwrap().to_owned();
    let id = |seq: u64| format!("{}{seq}", top.trim_end_matches(char::is_numeric));
    // From the start: the current document, cacheable for a moment.
    assert_eq!(first.header("cache-control"), Some("public, max-age=1"));
    assert_eq!(first.body["changes"][0]["kind"], "snapshot");
    assert_eq!(first.header("stream-up-to-date"), Some("true"));
    assert!(first.header("etag").is_some());

    // A completed range: immutable, with an ETag that revalidates.
    let range = get(
        &app,
        &format!("/streams/doc/changes?after={}&limit=2", enc(&id(1))),
        &[],
    )
    .await;
    assert_eq!(range.status, 200);
    assert_eq!(
        range.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    assert_eq!(range.header("stream-up-to-date"), None);
    assert_eq!(range.header("stream-next-offset"), Some(id(3).as_str()));
    assert_eq!(range.body["changes"].as_array().unwrap().len(), 2);
    let etag = range.header("etag").unwrap().to_owned();
    let again = get(
        &app,
        &format!("/streams/doc/changes?after={}&limit=2", enc(&id(1))),
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!((again.status, again.body.clone()), (304, Value::Null));

    // The tail: what reaches the top is cacheable for a moment only.
    let tail = get(
        &app,
        &format!("/streams/doc/changes?after={}", enc(&id(4))),
        &[],
    )
    .await;
    assert_eq!(tail.status, 200);
    assert_eq!(tail.header("cache-control"), Some("public, max-age=1"));
    assert_eq!(tail.header("stream-up-to-date"), Some("true"));
    assert_eq!(tail.header("stream-next-offset"), Some(top.as_str()));
    let at_top = get(
        &app,
        &format!("/streams/doc/changes?after={}", enc(&top)),
        &[],
    )
    .await;
    assert_eq!(at_top.status, 200);
    assert_eq!(at_top.body["changes"], json!([]));
    assert_eq!(at_top.header("cache-control"), Some("public, max-age=1"));

    // `after=now`: the top, never stored.
    let now = get(&app, "/streams/doc/changes?after=now", &[]).await;
    assert_eq!(
        (now.status, now.body["next"].as_str()),
        (200, Some(top.as_str()))
    );
    assert_eq!(now.header("cache-control"), Some("no-store"));

    // A long-poll that times out: 204, never stored, with the position and a cursor.
    let started = Instant::now();
    let timeout = get(
        &app,
        &format!("/streams/doc/changes?after={}&wait=300ms", enc(&top)),
        &[],
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(timeout.status, 204);
    assert_eq!(timeout.header("cache-control"), Some("no-store"));
    assert_eq!(timeout.header("stream-next-offset"), Some(top.as_str()));
    assert_eq!(timeout.header("stream-up-to-date"), Some("true"));
    let cursor: u64 = timeout.header("stream-cursor").unwrap().parse().unwrap();
    // Echoing the cursor always gets a later one (a cached answer cannot loop a client).
    let echoed = get(
        &app,
        &format!(
            "/streams/doc/changes?after={}&wait=100ms&cursor={cursor}",
            enc(&top)
        ),
        &[],
    )
    .await;
    let later: u64 = echoed.header("stream-cursor").unwrap().parse().unwrap();
    assert!(later > cursor, "{later} > {cursor}");

    // A long-poll answered at once (there are changes) is a page like any other.
    let answered = get(
        &app,
        &format!("/streams/doc/changes?after={}&wait=5s&limit=1", enc(&id(1))),
        &[],
    )
    .await;
    assert_eq!(answered.status, 200);
    assert_eq!(
        answered.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    assert!(answered.header("stream-cursor").is_some());

    // Gone and refused: never stored.
    let gone = get(
        &app,
        &format!("/streams/doc/changes?after={}", enc("doc:1:1")),
        &[],
    )
    .await;
    assert_eq!(gone.status, 410);
    assert_eq!(gone.header("cache-control"), Some("no-store"));
    let bad = get(&app, "/streams/doc/changes?after=nope", &[]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.header("cache-control"), Some("no-store"));
    app.stop().await;
}

#[tokio::test]
async fn a_long_poll_wakes_on_the_next_change_and_answers_204_when_none_comes() {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    app.wait_for_seq("doc", 1).await;
    let top = get(&app, "/streams/doc/changes?after=now", &[]).await.body["next"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = app.url(&format!(
        "/streams/doc/changes?after={}&wait=30s",
        enc(&top)
    ));
    let started = Instant::now();
    let waiting = tokio::spawn(async move { reqwest::get(url).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "it waits while nothing changes");
    upstream.set(document(2));
    let response = tokio::time::timeout(SOON, waiting).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["changes"][0]["kind"], "patch");
    assert_eq!(body["up_to_date"], true);
    let mut document = document(1);
    json_patch::patch(
        &mut document,
        &serde_json::from_value::<json_patch::Patch>(body["changes"][0]["payload"].clone())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(document, self::document(2));

    // `after=now&wait=` waits for the next change too, and times out empty.
    let started = Instant::now();
    let none = get(&app, "/streams/doc/changes?after=now&wait=500ms", &[]).await;
    assert_eq!(none.status, 204);
    assert!(started.elapsed() >= Duration::from_millis(500));
    app.stop().await;
}

#[tokio::test]
async fn bad_parameters_are_400s_that_name_them() {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    app.wait_for_seq("doc", 1).await;
    for (query, needle) in [
        ("after=garbage", "`after` must be an event id"),
        ("after=doc:1:x", "`after` must be an event id"),
        (
            "after=other:1:2",
            "`after` is an event id of \"other\", not of \"doc\"",
        ),
        ("after=now&wait=forever", "`wait` must be a duration"),
        ("after=now&wait=30", "`wait` must be a duration with a unit"),
        ("after=now&wait=2m", "at most 1m"),
        (
            "limit=0",
            "`limit` must be a number of changes from 1 to 100",
        ),
        ("cursor=abc", "`cursor`"),
        ("after=now&after=now", "`after` is given more than once"),
    ] {
        let answer = get(&app, &format!("/streams/doc/changes?{query}"), &[]).await;
        assert_eq!(answer.status, 400, "{query}: {}", answer.body);
        let message = answer.body["message"].as_str().unwrap();
        assert!(message.contains(needle), "{query}: {message}");
    }
    let missing = get(&app, "/streams/nope/changes", &[]).await;
    assert_eq!(missing.status, 404);
    assert!(missing.body["message"].as_str().unwrap().contains("nope"));
    app.stop().await;
}

#[tokio::test]
async fn an_id_older_than_history_is_told_to_start_from_the_snapshot() {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&format!("{}history = 3\n", polled("doc", &upstream.url()))).await;
    app.wait_for_seq("doc", 1).await;
    let mut follower = Follower::new("doc", "");
    follower.read_to_top(&app, 100).await;
    let behind = follower.next.clone().unwrap();
    for n in 2..=7 {
        upstream.set(document(n));
        app.wait_for_seq("doc", n).await;
    }
    // Its successors are no longer all in history: a 410 naming where to start again, never
    // a partial list.
    let gone = follower.page(&app, "").await;
    assert_eq!(gone.status, 410, "{}", gone.body);
    assert_eq!(gone.body["schema"], "patchwire.changes-gone.v1");
    assert_eq!(gone.body["stream"], "doc");
    assert!(
        gone.body["message"]
            .as_str()
            .unwrap()
            .contains("older than")
    );
    let restart = gone.body["snapshot"].as_str().unwrap();
    assert_eq!(restart, "/streams/doc/changes");
    // Following the link: the current document, then on as usual.
    let mut fresh = Follower::new("doc", "");
    fresh.path = restart.to_owned();
    fresh.read_to_top(&app, 100).await;
    assert_eq!(fresh.document, Some(document(7)));
    assert_eq!(fresh.snapshots, 1);
    upstream.set(document(8));
    app.wait_for_seq("doc", 8).await;
    fresh.read_to_top(&app, 100).await;
    assert_eq!((fresh.document, fresh.patches), (Some(document(8)), 1));
    // Another epoch (a previous process), or ahead of the stream: 410 too.
    let (stream, _) = behind.split_once(':').unwrap();
    for id in [
        format!("{stream}:1:8"),
        format!("{}99", behind.trim_end_matches(char::is_numeric)),
    ] {
        let answer = get(
            &app,
            &format!("/streams/doc/changes?after={}", enc(&id)),
            &[],
        )
        .await;
        assert_eq!(answer.status, 410, "{id}: {}", answer.body);
    }
    app.stop().await;
}

const PUSH_TOKEN: &str = "catch-up-push-token-0123456789";

async fn push_app(dir: &std::path::Path) -> TestApp {
    TestApp::from_toml(&format!(
        r#"
[push]
token = "{PUSH_TOKEN}"

[[streams]]
name = "prices"
source = "push"
history = 100

[webhooks]
database = "{}"
"#,
        dir.join("outbox.db").display()
    ))
    .await
}

async fn push(app: &TestApp, method: reqwest::Method, body: Value) {
    let response = reqwest::Client::new()
        .request(method, app.url("/streams/prices"))
        .bearer_auth(PUSH_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn catch_up_continues_across_a_restart_of_a_stream_with_stored_history() {
    let dir = tempfile::tempdir().unwrap();
    let app = push_app(dir.path()).await;
    let mut expected = json!({"eur": 1.0, "usd": 1.0, "notes": "n".repeat(200)});
    push(&app, reqwest::Method::POST, expected.clone()).await;
    let mut follower = Follower::new("prices", "");
    follower.read_to_top(&app, 100).await;
    let mut before_last = None;
    for n in 1..=4 {
        let patch = json!([{"op": "replace", "path": "/usd", "value": 1.0 + n as f64}]);
        push(&app, reqwest::Method::PATCH, patch.clone()).await;
        json_patch::patch(
            &mut expected,
            &serde_json::from_value::<json_patch::Patch>(patch).unwrap(),
        )
        .unwrap();
        before_last = follower.next.clone();
        follower.read_to_top(&app, 100).await;
    }
    assert_eq!(follower.document.as_ref(), Some(&expected));
    app.stop().await;

    // The same stream in the same epoch: the client's position continues exactly.
    let app = push_app(dir.path()).await;
    let at_top = follower.page(&app, "").await;
    assert_eq!(at_top.status, 200, "{}", at_top.body);
    assert_eq!(at_top.body["changes"], json!([]));
    let patch = json!([{"op": "replace", "path": "/eur", "value": 2.0}]);
    push(&app, reqwest::Method::PATCH, patch.clone()).await;
    json_patch::patch(
        &mut expected,
        &serde_json::from_value::<json_patch::Patch>(patch).unwrap(),
    )
    .unwrap();
    follower.read_to_top(&app, 100).await;
    assert_eq!(follower.document.as_ref(), Some(&expected));
    assert_eq!((follower.snapshots, follower.patches), (1, 5));
    // What the previous process held in memory is gone: an older position starts again.
    let old = before_last.unwrap();
    let gone = get(
        &app,
        &format!("/streams/prices/changes?after={}", enc(&old)),
        &[],
    )
    .await;
    assert_eq!(gone.status, 410, "{}", gone.body);
    app.stop().await;
}

fn fleet(version: u64) -> Value {
    let vehicle = |id: &str, route: &str, speed: u64| json!({"id": id, "route": route, "speed": speed, "pad": "p".repeat(40)});
    let moved = if version >= 3 { "R2" } else { "R1" };
    json!({
        "header": {"version": version, "notes": "n".repeat(600)},
        "vehicles": [
            vehicle("a", "R1", version),
            vehicle("moved", moved, 10 + version),
            vehicle("b", "R2", 20 + version),
        ]
    })
}

#[tokio::test]
async fn views_are_caught_up_like_streams() {
    let upstream = MockUpstream::start(fleet(1)).await;
    let app = TestApp::from_toml(&format!(
        "{}\n[streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\naliases = {{ route = \"route\" }}\n\n[[streams.views]]\nname = \"r2\"\nfilter = {{ route = \"R2\" }}\n",
        polled("fleet", &upstream.url())
    ))
    .await;
    app.wait_for_seq("fleet", 1).await;
    let mut sse_r1 = app.subscribe("fleet?route=R1", &[]).await;
    let mut sse_r2 = app.subscribe("fleet@r2", &[]).await;
    let (mut rebuilt_r1, mut rebuilt_r2) = (Rebuilt::default(), Rebuilt::default());
    let mut r1 = Follower::new("fleet", "route=R1");
    let mut r2 = Follower::new("fleet@r2", "");
    r1.read_to_top(&app, 100).await;
    r2.read_to_top(&app, 100).await;
    for n in 2..=5 {
        upstream.set(fleet(n));
        app.wait_for_seq("fleet", n).await;
        let r1_target = view(&fleet(n), "R1");
        let r2_target = view(&fleet(n), "R2");
        assert!(rebuilt_r1.converge(&mut sse_r1, &r1_target, SOON).await);
        assert!(rebuilt_r2.converge(&mut sse_r2, &r2_target, SOON).await);
        r1.read_to_top(&app, 1).await;
        r2.read_to_top(&app, 1).await;
        assert_eq!(r1.document.as_ref(), Some(&r1_target), "R1 at {n}");
        assert_eq!(r2.document.as_ref(), Some(&r2_target), "R2 at {n}");
        // The same positions as the SSE subscribers: the view's own ids.
        assert_eq!(r1.next.as_deref(), Some(rebuilt_r1.last_id.as_str()));
        assert_eq!(r2.next.as_deref(), Some(rebuilt_r2.last_id.as_str()));
    }
    assert!(r1.next.as_deref().unwrap().starts_with("fleet@~"));
    assert!(r2.next.as_deref().unwrap().starts_with("fleet@r2:"));
    // A view's position is not the stream's (nor another view's).
    let wrong = get(
        &app,
        &format!(
            "/streams/fleet/changes?after={}",
            enc(r2.next.as_deref().unwrap())
        ),
        &[],
    )
    .await;
    assert_eq!(wrong.status, 400, "{}", wrong.body);
    // A bad filter is the view's own 400.
    let bad = get(&app, "/streams/fleet/changes?line=R1", &[]).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body["message"]
            .as_str()
            .unwrap()
            .contains("unknown filter `line`")
    );
    app.stop().await;
}

fn view(document: &Value, route: &str) -> Value {
    let mut out = document.clone();
    let kept: Vec<Value> = document["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["route"] == route)
        .cloned()
        .collect();
    out["vehicles"] = Value::Array(kept);
    out
}

/// An independent client: Python's standard library for HTTP, `jsonpatch` to apply the
/// patches, `jsonschema` to check every page against the schema the server serves.
const PYTHON_FOLLOWER: &str = r#"
import json, sys, urllib.parse, urllib.request
import jsonpatch, jsonschema
base, name = sys.argv[1], sys.argv[2]
schema = json.load(urllib.request.urlopen(base + "/schemas/patchwire.changes.v1.json"))
validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
doc, after, pages = None, None, 0
if len(sys.argv) > 3:
    after, doc = sys.argv[3], json.loads(sys.argv[4])
while True:
    query = {"limit": "2"}
    if after is not None:
        query["after"] = after
    with urllib.request.urlopen(base + "/streams/" + name + "/changes?" + urllib.parse.urlencode(query)) as r:
        page = json.load(r)
        header = r.headers["Stream-Next-Offset"]
    validator.validate(page)
    pages += 1
    for change in page["changes"]:
        if change["kind"] == "snapshot":
            doc = change["payload"]
        else:
            doc = jsonpatch.apply_patch(doc, change["payload"])
    assert header == page["next"], (header, page["next"])
    after = page["next"]
    if page["up_to_date"]:
        break
print(json.dumps({"doc": doc, "pages": pages}))
"#;

#[tokio::test]
async fn an_independent_python_client_follows_the_pages() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import jsonpatch, jsonschema"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(status) if status.success()) {
        patchwire_test_data::skip::<()>(
            "python3 with `jsonpatch` and `jsonschema` is not available (pip install jsonpatch jsonschema)",
        );
        return;
    }
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    app.wait_for_seq("doc", 1).await;
    let first = get(&app, "/streams/doc/changes?after=now", &[]).await.body["next"]
        .as_str()
        .unwrap()
        .to_owned();
    for n in 2..=7 {
        upstream.set(document(n));
        app.wait_for_seq("doc", n).await;
    }
    let follow = |args: Vec<String>| async move {
        let output = tokio::process::Command::new("python3")
            .args(["-c", PYTHON_FOLLOWER])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await
            .expect("python3 ran");
        assert!(
            output.status.success(),
            "python client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    // From the first position, patch by patch, two per page.
    let result = follow(vec![
        app.url(""),
        "doc".into(),
        first,
        document(1).to_string(),
    ])
    .await;
    assert_eq!(result["doc"], document(7));
    assert_eq!(result["pages"], 3, "six patches, two per page");
    // From the start: the current document.
    let result = follow(vec![app.url(""), "doc".into()]).await;
    assert_eq!(result["doc"], document(7));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_of_a_cluster_answers_from_the_shared_log() {
    let upstream = MockUpstream::start(document(1)).await;
    let config = format!(
        r#"
[server]
shutdown_grace = "1s"

[[streams]]
name = "doc"
url = "{}"
interval = "150ms"
history = 100

[cluster]
redis = "{{redis}}"
prefix = "c"
lease_ttl = "1s"
probe_interval = "500ms"
"#,
        upstream.url()
    );
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let bases = [cluster.nodes[0].base(), cluster.nodes[1].base()];
    let mut sse = SseClient::connect(&cluster.nodes[0].stream_url("doc"), &[], false).await;
    let mut rebuilt = Rebuilt::default();
    assert!(rebuilt.converge(&mut sse, &document(1), SOON).await);

    // Pages from either node, in turn: the same ids, the same document. A long-poll on a node
    // a change behind the one the client last read from waits until it has that change.
    let mut follower = Follower::new("doc", "");
    let follow = async |follower: &mut Follower, base: &str, target: &str| {
        let deadline = Instant::now() + SOON;
        while follower.next.as_deref() != Some(target) {
            assert!(
                Instant::now() < deadline,
                "never reached {target} on {base}"
            );
            let answer = follower.page_at(base, "wait=2s").await;
            assert!(
                matches!(answer.status, 200 | 204),
                "{base}: {} {}",
                answer.status,
                answer.body
            );
        }
    };
    follow(&mut follower, &bases[1], &rebuilt.last_id).await;
    for n in 2..=7 {
        upstream.set(document(n));
        assert!(rebuilt.converge(&mut sse, &document(n), SOON).await);
        follow(&mut follower, &bases[n as usize % 2], &rebuilt.last_id).await;
        assert_eq!(follower.document, rebuilt.document, "at version {n}");
    }

    // A node restarted keeps the log's epoch: the client's position continues there.
    cluster.node("b").stop();
    cluster.node("b").restart();
    cluster.node("b").ready(Duration::from_secs(20)).await;
    upstream.set(document(8));
    assert!(rebuilt.converge(&mut sse, &document(8), SOON).await);
    follow(&mut follower, &bases[1], &rebuilt.last_id).await;
    assert_eq!(follower.document.as_ref(), Some(&document(8)));
    assert_eq!(
        follower.snapshots, 1,
        "one document, then only patches, on both nodes"
    );
}

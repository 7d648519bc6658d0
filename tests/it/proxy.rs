//! The Streamdata.io-compatible proxy mode through the real server: dynamic streams shared by
//! URL and headers, the proxy's parameters kept from the upstream, linger and eviction,
//! allowlist, SSRF and token refusals as SSE `error` events, reconnections, snapshot-only
//! mode, the native view, on-demand configured streams, and an off-the-shelf client.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::upstream::caller_document;
use crate::support::{
    MockUpstream, Rebuilt, SOON, SseClient, SseEvent, TestApp, config_from_toml, free_port, over,
    polled,
};

pub(crate) const TOKEN: &str = "token-for-tests-0123456789";
const OTHER_TOKEN: &str = "other-token-for-tests-0123";

/// The `[proxy]` table these tests start from: the mock API's 127.0.0.1 allowed, a poll every
/// 100 ms, a short linger, and two tokens allowing 1000 new connections a second. `proxy` holds
/// more of its keys, `tests` and `other` more keys of each token (TOML lines, over the start).
pub(crate) fn proxy_toml(proxy: &str, tests: &str, other: &str) -> String {
    let start = r#"
enabled = true
allowed_hosts = ["127.0.0.1"]
allow_private = true
interval = "100ms"
min_interval = "10ms"
linger = "400ms"
max_streams = 100
max_memory = "64 MiB"
timeout = "2s"
max_body = "1 MiB"
history = 16
"#;
    let token = |name: &str, secret: &str, own: &str| {
        let start =
            format!("name = \"{name}\"\ntoken = \"{secret}\"\nconnections_per_second = 1000\n");
        format!("[[proxy.tokens]]\n{}", over(&start, own))
    };
    format!(
        "[proxy]\n{}\n{}\n{}",
        over(start, proxy),
        token("tests", TOKEN, tests),
        token("other", OTHER_TOKEN, other)
    )
}

/// `/{upstream}` with the token and extra query parameters.
fn dynamic_path(api: &MockUpstream, path: &str, query: &str) -> String {
    let sep = if query.is_empty() { "" } else { "&" };
    format!("/{}?X-Sd-Token={TOKEN}{sep}{query}", api.url_at(path))
}

async fn open(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> SseClient {
    SseClient::connect(&app.url(path), headers, false).await
}

/// Reads events until one named `name` arrives.
async fn until(client: &mut SseClient, name: &str) -> SseEvent {
    loop {
        let event = client.expect(SOON).await;
        if event.event == name {
            return event;
        }
    }
}

fn assert_streamdata_patch(event: &SseEvent) {
    let ops: Vec<Value> = serde_json::from_str(&event.data).unwrap();
    for op in ops {
        let name = op["op"].as_str().unwrap();
        assert!(["add", "remove", "replace"].contains(&name), "{op}");
        assert_ne!(op["path"], "", "a patch never replaces the root: {op}");
    }
}

#[tokio::test]
async fn clients_asking_the_same_thing_share_one_stream_and_one_poller() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let path = dynamic_path(&api, "/v1/prices", "currency=eur");

    let mut a = open(&app, &path, &[]).await;
    let mut b = open(&app, &path, &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "text/event-stream");
    let name = a.headers["x-patchwire-stream"].to_str().unwrap().to_owned();
    assert!(name.starts_with('~'), "{name}");
    assert_eq!(b.headers["x-patchwire-stream"], name.as_str());

    let mut docs = [Rebuilt::default(), Rebuilt::default()];
    for (client, doc) in [&mut a, &mut b].into_iter().zip(&mut docs) {
        let first = client.expect(SOON).await;
        assert_eq!(first.event, "data", "{first:?}");
        assert!(!first.id.is_empty(), "every event has an id");
        doc.apply(&first);
        assert_eq!(doc.document, Some(caller_document("anonymous", 0)));
    }
    api.set_version(1);
    for (client, doc) in [&mut a, &mut b].into_iter().zip(&mut docs) {
        let patch = until(client, "patch").await;
        assert_streamdata_patch(&patch);
        assert!(!patch.id.is_empty());
        doc.apply(&patch);
        assert_eq!(doc.document, Some(caller_document("anonymous", 1)));
    }

    let listing: Value = reqwest::get(app.url("/streams"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listing["dynamic"]["streams"], 1, "{listing}");
    // One poller: a poll is due an interval (100 ms) after the previous one started and late
    // ones are skipped, never bursted, so 9 requests span at least 800 ms less the jitter of
    // when requests reach the upstream; two interleaved pollers would span about 400 ms. A
    // slow machine only makes polls later, which lengthens the span.
    let deadline = Instant::now() + SOON;
    while api.requests() < 9 {
        assert!(Instant::now() < deadline, "polling stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let requests = api.received();
    let span = requests[8].at.duration_since(requests[0].at);
    assert!(
        span >= Duration::from_millis(600),
        "9 polls within {span:?}: more than one poller"
    );
    assert_eq!(app.metric("patchwire_dynamic_streams").await, 1.0);
}

#[tokio::test]
async fn different_forwarded_headers_get_separate_streams_that_never_mix() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let alice = dynamic_path(&api, "/me", "X-Sd-Header=Authorization%3A%20Bearer%20alice");
    let bob = dynamic_path(&api, "/me", "X-Sd-Header=Authorization%3A%20Bearer%20bob");
    let mut a = open(&app, &alice, &[]).await;
    let mut b = open(&app, &bob, &[]).await;
    assert_ne!(
        a.headers["x-patchwire-stream"],
        b.headers["x-patchwire-stream"]
    );

    let first_a = a.expect(SOON).await;
    let first_b = b.expect(SOON).await;
    assert_eq!(first_a.json(), caller_document("Bearer alice", 0));
    assert_eq!(first_b.json(), caller_document("Bearer bob", 0));
    api.set_version(2);
    for (client, user) in [(&mut a, "alice"), (&mut b, "bob")] {
        let mut doc = Rebuilt {
            document: Some(caller_document(&format!("Bearer {user}"), 0)),
            ..Rebuilt::default()
        };
        assert!(
            doc.converge(client, &caller_document(&format!("Bearer {user}"), 2), SOON)
                .await
        );
    }
    // The upstream saw each credential, and only on its own requests.
    let users: std::collections::BTreeSet<String> = api
        .received()
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        users.into_iter().collect::<Vec<_>>(),
        ["Bearer alice", "Bearer bob"]
    );
}

#[tokio::test]
async fn the_proxy_parameters_never_reach_the_upstream() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let path = format!(
        "/{}?currency=eur&X-Sd-Token={TOKEN}&b=%20x&X-Sd-Header=X-Api-Key%3A%20k1",
        api.url_at("/v1/prices")
    );
    let mut client = open(&app, &path, &[]).await;
    client.expect(SOON).await;
    let request = &api.received()[0];
    assert_eq!(request.uri, "/v1/prices?currency=eur&b=%20x");
    assert_eq!(request.headers["x-api-key"], "k1");
    assert!(
        request
            .headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-sd-")),
        "{:?}",
        request.headers
    );

    // The token as a header works too, and is not forwarded either.
    let encoded = format!(
        "/{}",
        url::form_urlencoded::byte_serialize(api.url_at("/v2/x?y=1").as_bytes())
            .collect::<String>()
    );
    let mut client = open(&app, &encoded, &[("x-sd-token", TOKEN)]).await;
    assert_eq!(client.expect(SOON).await.event, "data");
    let request = api
        .received()
        .into_iter()
        .find(|r| r.uri.starts_with("/v2/"))
        .unwrap();
    assert_eq!(request.uri, "/v2/x?y=1");
    assert!(request.headers.get("x-sd-token").is_none());
}

#[tokio::test]
async fn a_stream_lingers_then_is_evicted_and_polling_stops() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let path = dynamic_path(&api, "/linger", "");
    let mut client = open(&app, &path, &[]).await;
    client.expect(SOON).await;
    drop(client);
    app.wait_for_metric(
        r#"patchwire_dynamic_evictions_total{cause="Linger""#,
        1.0,
        SOON,
    )
    .await;
    assert_eq!(app.metric("patchwire_dynamic_streams").await, 0.0);
    let after_eviction = api.requests();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        api.requests(),
        after_eviction,
        "polling stopped with the eviction"
    );

    // The next subscriber starts the stream again, with a fresh `data`.
    api.set_version(7);
    let mut client = open(&app, &path, &[]).await;
    let first = client.expect(SOON).await;
    assert_eq!(
        (first.event.as_str(), first.json()),
        ("data", caller_document("anonymous", 7))
    );
}

#[tokio::test]
async fn a_subscriber_returning_within_the_linger_period_keeps_the_stream() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let path = dynamic_path(&api, "/stay", "");
    let mut client = open(&app, &path, &[]).await;
    let name = client.headers["x-patchwire-stream"].clone();
    client.expect(SOON).await;
    drop(client);
    let mut client = open(&app, &path, &[]).await;
    assert_eq!(client.headers["x-patchwire-stream"], name);
    assert_eq!(client.expect(SOON).await.event, "data");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.metric("patchwire_dynamic_evictions_total").await, 0.0);
}

#[tokio::test]
async fn gzip_clients_get_the_same_events_compressed() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let mut client = SseClient::connect(&app.url(&dynamic_path(&api, "/gz", "")), &[], true).await;
    // reqwest negotiated gzip and decodes it (dropping the header): a broken stream fails here.
    let mut doc = Rebuilt::default();
    doc.apply(&client.expect(SOON).await);
    api.set_version(3);
    assert!(
        doc.converge(&mut client, &caller_document("anonymous", 3), SOON)
            .await
    );
    assert!(doc.patches >= 1);
    let raw = reqwest::Client::builder()
        .gzip(false)
        .build()
        .unwrap()
        .get(app.url(&dynamic_path(&api, "/gz", "")))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.headers()["content-encoding"], "gzip");
}

#[tokio::test]
async fn http2_clients_are_served_by_hyper_with_the_same_events() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut h2 =
        SseClient::connect_with(&client, &app.url(&dynamic_path(&api, "/h2", "")), &[]).await;
    assert!(
        h2.headers["x-patchwire-stream"]
            .to_str()
            .unwrap()
            .starts_with('~')
    );
    let mut doc = Rebuilt::default();
    let first = h2.expect(SOON).await;
    assert_eq!(first.event, "data");
    doc.apply(&first);
    api.set_version(4);
    assert!(
        doc.converge(&mut h2, &caller_document("anonymous", 4), SOON)
            .await
    );
    let refused = client
        .get(app.url(&format!("/{}", api.url_at("/h2"))))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 200);
    assert!(refused.text().await.unwrap().contains("token-missing"));
}

#[tokio::test]
async fn idle_dynamic_streams_send_keep_alive_comments() {
    let api = MockUpstream::per_caller().await;
    // The shortest keep-alive interval a file may ask for.
    let app = TestApp::from_toml(&proxy_toml("keepalive = \"1s\"", "", "")).await;
    let mut response = reqwest::get(app.url(&dynamic_path(&api, "/quiet", "")))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(SOON, async {
        while let Some(chunk) = response.chunk().await.unwrap() {
            seen.extend_from_slice(&chunk);
            if seen.windows(13).any(|w| w == b": keep-alive\n") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "{}", String::from_utf8_lossy(&seen));
}

#[tokio::test]
async fn a_reconnecting_client_gets_data_first() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let path = dynamic_path(&api, "/again", "");
    let mut client = open(&app, &path, &[]).await;
    client.expect(SOON).await;
    api.set_version(1);
    let patch = until(&mut client, "patch").await;
    drop(client);
    api.set_version(2);
    let mut client = open(&app, &path, &[("last-event-id", &patch.id)]).await;
    let first = client.expect(SOON).await;
    assert_eq!(first.event, "data", "{first:?}");
    let version = first.json()["version"].as_u64().unwrap();
    assert!(version >= 1, "{first:?}");
}

/// Opens `path`, checks that it is refused with `status` and `cause`, and returns the error.
async fn refused(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
    status: u64,
    cause: &str,
) -> Value {
    let error = refusal(app, path, headers).await;
    assert_eq!(
        (error["status"].as_u64(), error["cause"].as_str()),
        (Some(status), Some(cause)),
        "{path}: {error}"
    );
    error
}

/// Opens `path` and returns the single `error` event of a refusal (the stream then ends).
async fn refusal(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Value {
    let mut client = open(app, path, headers).await;
    assert_eq!(
        client.status, 200,
        "refusals are SSE errors on a 200 stream: {path}"
    );
    assert_eq!(client.headers["content-type"], "text/event-stream");
    let events = client.end(SOON).await.expect("the refused stream ends");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "error");
    let error = events[0].json();
    for key in ["status", "message", "cause", "timestamp", "sessionId"] {
        assert!(!error[key].is_null(), "{key} missing in {error}");
    }
    error
}

#[tokio::test]
async fn token_problems_are_error_events_on_a_200_stream() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "max_connections = 1")).await;
    let target = api.url_at("/t");

    let error = refused(&app, &format!("/{target}"), &[], 401, "token-missing").await;
    assert!(
        error["message"].as_str().unwrap().contains("X-Sd-Token"),
        "{error}"
    );
    let error = refused(
        &app,
        &format!("/{target}?X-Sd-Token=not-a-token"),
        &[],
        401,
        "token-unknown",
    )
    .await;
    assert!(
        !error.to_string().contains("not-a-token"),
        "the token is never echoed: {error}"
    );

    // The other token allows one connection at a time.
    let path = format!("/{target}?X-Sd-Token={OTHER_TOKEN}");
    let mut held = open(&app, &path, &[]).await;
    held.expect(SOON).await;
    refused(&app, &path, &[], 429, "too-many-connections").await;
    drop(held);
    // Its slot is released with the connection.
    let deadline = Instant::now() + SOON;
    loop {
        let mut again = open(&app, &path, &[]).await;
        if again.expect(SOON).await.event == "data" {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        app.metric(r#"patchwire_proxy_refusals_total{cause="token-missing""#)
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn new_connections_per_second_are_limited_per_token() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml(
        "",
        "connections_per_second = 1\nconnections_burst = 2",
        "",
    ))
    .await;
    let path = dynamic_path(&api, "/rate", "");
    let _a = open(&app, &path, &[]).await;
    let _b = open(&app, &path, &[]).await;
    refused(&app, &path, &[], 429, "rate-limited").await;
}

#[tokio::test]
async fn hosts_outside_the_allowlist_and_private_addresses_are_refused() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml(
        r#"allowed_hosts = ["127.0.0.1", "*.example.com"]"#,
        "",
        r#"allowed_hosts = ["*.example.com"]"#,
    ))
    .await;

    let port = api.addr().port();
    refused(
        &app,
        &format!("/http://localhost:{port}/x?X-Sd-Token={TOKEN}"),
        &[],
        403,
        "host-not-allowed",
    )
    .await;
    // The token's own list narrows the proxy's.
    refused(
        &app,
        &format!("/http://127.0.0.1:{port}/x?X-Sd-Token={OTHER_TOKEN}"),
        &[],
        403,
        "host-not-allowed",
    )
    .await;
    let error = refused(
        &app,
        &format!("/http://127.0.0.1:{port}/x?X-Sd-Token={TOKEN}&X-Sd-Header=NoColon"),
        &[],
        400,
        "invalid-target",
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("Name: value"),
        "{error}"
    );
    // Not a URL at all is not a dynamic stream: a plain 404.
    let response = reqwest::get(app.url(&format!("/ftp://127.0.0.1/x?X-Sd-Token={TOKEN}")))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // Without allow_private, an allowed name that resolves to loopback is refused after DNS,
    // and so is a loopback literal.
    let app = TestApp::from_toml(&proxy_toml(
        "allow_private = false\nallowed_hosts = [\"127.0.0.1\", \"localhost\"]",
        "",
        "",
    ))
    .await;
    for host in ["localhost", "127.0.0.1"] {
        let error = refused(
            &app,
            &format!("/http://{host}:{port}/x?X-Sd-Token={TOKEN}"),
            &[],
            403,
            "address-forbidden",
        )
        .await;
        assert!(
            error["message"].as_str().unwrap().contains("loopback"),
            "{error}"
        );
    }
    assert_eq!(api.requests(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn the_stream_limit_evicts_idle_streams_and_refuses_when_all_are_busy() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("max_streams = 1\nlinger = \"60s\"", "", "")).await;
    let mut first = open(&app, &dynamic_path(&api, "/one", ""), &[]).await;
    first.expect(SOON).await;
    refused(
        &app,
        &dynamic_path(&api, "/two", ""),
        &[],
        503,
        "too-many-streams",
    )
    .await;
    drop(first);
    // Idle (lingering) now: it makes room for the new one.
    let deadline = Instant::now() + SOON;
    loop {
        let mut second = open(&app, &dynamic_path(&api, "/two", ""), &[]).await;
        if second.expect(SOON).await.event == "data" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle stream was never evicted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        app.metric(r#"patchwire_dynamic_evictions_total{cause="Idle""#)
            .await,
        1.0
    );
    assert_eq!(app.metric("patchwire_dynamic_streams_limit").await, 1.0);
}

#[tokio::test]
async fn streams_outgrowing_the_memory_bound_are_ended_with_an_error() {
    let api = MockUpstream::per_caller().await;
    let mut config = config_from_toml(&proxy_toml("", "", ""));
    // Room for two documents, not three: far below the 1 MiB floor of a file's
    // `proxy.max_memory`, which the mock's small documents would never fill.
    let size = serde_json::to_vec(&caller_document("anonymous", 0))
        .unwrap()
        .len() as u64;
    config
        .proxy
        .as_mut()
        .expect("[proxy] is enabled")
        .max_memory = size * 5 / 2;
    let app = TestApp::spawn(config).await;
    let mut first = open(&app, &dynamic_path(&api, "/m1", ""), &[]).await;
    assert_eq!(first.expect(SOON).await.event, "data");
    let mut second = open(&app, &dynamic_path(&api, "/m2", ""), &[]).await;
    assert_eq!(second.expect(SOON).await.event, "data");
    let mut third = open(&app, &dynamic_path(&api, "/m3", ""), &[]).await;
    assert_eq!(third.expect(SOON).await.event, "data");
    // The least recently used document (the first stream's) made room: its subscriber is told.
    app.wait_for_metric(
        r#"patchwire_dynamic_evictions_total{cause="Memory""#,
        1.0,
        SOON,
    )
    .await;
    let error = until(&mut first, "error").await.json();
    assert_eq!(
        (error["status"].as_u64(), error["cause"].as_str()),
        (Some(503), Some("evicted"))
    );
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("proxy.max_memory"),
        "{error}"
    );
    assert!(first.ends_within(SOON).await, "the evicted stream ends");
    assert!(app.metric("patchwire_dynamic_snapshots_bytes").await <= (size * 5 / 2) as f64);
    assert_eq!(app.metric("patchwire_dynamic_streams").await, 2.0);
}

#[tokio::test]
async fn a_faster_subscriber_speeds_the_shared_poller_up_until_it_leaves() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml(
        "interval = \"800ms\"",
        "",
        "interval = \"100ms\"",
    ))
    .await;
    let target = api.url_at("/speed");
    let mut slow = open(&app, &format!("/{target}?X-Sd-Token={TOKEN}"), &[]).await;
    slow.expect(SOON).await;
    let polls_in = |window: Duration| {
        let api = &api;
        async move {
            let before = api.requests();
            tokio::time::sleep(window).await;
            api.requests() - before
        }
    };
    let alone = polls_in(Duration::from_millis(1000)).await;
    assert!(alone <= 2, "{alone} polls in 1 s at 800 ms");
    let mut fast = open(&app, &format!("/{target}?X-Sd-Token={OTHER_TOKEN}"), &[]).await;
    assert_eq!(
        fast.headers["x-patchwire-stream"],
        slow.headers["x-patchwire-stream"]
    );
    fast.expect(SOON).await;
    let together = polls_in(Duration::from_millis(1000)).await;
    assert!(together >= 5, "{together} polls in 1 s at 100 ms");
    drop(fast);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = polls_in(Duration::from_millis(1000)).await;
    assert!(
        again <= 2,
        "{again} polls in 1 s after the fast subscriber left"
    );
}

#[tokio::test]
async fn upstream_errors_are_streamdata_error_events() {
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    // A port nothing listens on.
    let closed = format!("127.0.0.1:{}", free_port());
    let mut client = open(&app, &format!("/http://{closed}/x?X-Sd-Token={TOKEN}"), &[]).await;
    let error = until(&mut client, "error").await;
    let body = error.json();
    assert_eq!(
        (body["status"].as_u64(), body["cause"].as_str()),
        (Some(502), Some("upstream-unavailable"))
    );
    assert_eq!(body["sessionId"].as_str().unwrap().len(), 16);
    assert!(body["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
}

#[tokio::test]
async fn accept_json_returns_the_document_once() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let response = reqwest::Client::new()
        .get(app.url(&dynamic_path(&api, "/once", "")))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["etag"]
            .to_str()
            .unwrap()
            .starts_with('"')
    );
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        caller_document("anonymous", 0)
    );
    let response = reqwest::Client::new()
        .get(app.url(&format!("/{}", api.url_at("/once"))))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "JSON clients get real statuses");
}

#[tokio::test]
async fn accept_json_names_the_stream_and_honours_gzip() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let raw = reqwest::Client::builder().no_gzip().build().unwrap();
    let response = raw
        .get(app.url(&dynamic_path(&api, "/gz", "")))
        .header("accept", "application/json")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let stream = response.headers()["x-patchwire-stream"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(stream.starts_with('~'), "{stream}");
    let compressed = response.bytes().await.unwrap();
    assert_eq!(&compressed[..2], &[0x1f, 0x8b]);
    let document_read: Value =
        serde_json::from_reader(flate2::read::GzDecoder::new(&compressed[..])).unwrap();
    assert_eq!(document_read, caller_document("anonymous", 0));

    // The SSE response names the same stream, and so does its native JSON view.
    let sse = open(&app, &dynamic_path(&api, "/gz", ""), &[]).await;
    assert_eq!(sse.headers["x-patchwire-stream"], stream.as_str());
    let view = reqwest::Client::new()
        .get(app.url(&format!("/streams/{stream}?X-Sd-Token={TOKEN}")))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(view.status(), 200);
    assert_eq!(view.headers()["x-patchwire-stream"], stream.as_str());
    assert_eq!(
        view.json::<Value>().await.unwrap(),
        caller_document("anonymous", 0)
    );
}

#[tokio::test]
async fn cors_preflight_allows_the_token_header() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let response = reqwest::Client::new()
        .request(
            http::Method::OPTIONS,
            app.url(&format!("/{}", api.url_at("/x"))),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "x-sd-token, last-event-id",
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let allowed = response.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("x-sd-token"), "{allowed}");
    let mut client = open(
        &app,
        &dynamic_path(&api, "/x", ""),
        &[("origin", "https://app.example")],
    )
    .await;
    assert_eq!(client.headers["access-control-allow-origin"], "*");
    client.expect(SOON).await;
}

#[tokio::test]
async fn the_native_view_of_a_dynamic_stream_needs_a_token_and_uses_native_names() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let mut client = open(&app, &dynamic_path(&api, "/native", ""), &[]).await;
    client.expect(SOON).await;
    let name = client.headers["x-patchwire-stream"]
        .to_str()
        .unwrap()
        .to_owned();

    let mut native = open(&app, &format!("/streams/{name}?X-Sd-Token={TOKEN}"), &[]).await;
    assert_eq!(native.status, 200);
    let first = native.expect(SOON).await;
    assert_eq!(
        (first.event.as_str(), first.json()),
        ("snapshot", caller_document("anonymous", 0))
    );
    let refused = reqwest::get(app.url(&format!("/streams/{name}")))
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let missing = reqwest::get(app.url(&format!("/streams/~0000?X-Sd-Token={TOKEN}")))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // Dynamic streams are not listed by name (their URLs may carry credentials).
    let listing: Value = reqwest::get(app.url("/streams"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!listing.to_string().contains(&name), "{listing}");
}

#[tokio::test]
async fn catch_up_of_a_dynamic_stream_takes_the_same_tokens_and_stays_private() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let mut client = open(&app, &dynamic_path(&api, "/catchup", ""), &[]).await;
    client.expect(SOON).await;
    let name = client.headers["x-patchwire-stream"]
        .to_str()
        .unwrap()
        .to_owned();
    let changes = app.url(&format!("/streams/{name}/changes"));
    // Without a token, or with an unknown one: the SSE subscription's refusals.
    let missing = reqwest::get(&changes).await.unwrap();
    assert_eq!(missing.status(), 401);
    let unknown = reqwest::get(format!("{changes}?X-Sd-Token=not-a-token-0123456789"))
        .await
        .unwrap();
    assert_eq!(unknown.status(), 401);
    // With it (here as the header): pages, which no shared cache may keep.
    let page = reqwest::Client::new()
        .get(&changes)
        .header("x-sd-token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["cache-control"], "private, max-age=1");
    assert_eq!(page.headers()["x-patchwire-stream"], name.as_str());
    let body: Value = page.json().await.unwrap();
    assert_eq!(body["stream"], name.as_str());
    assert_eq!(
        body["changes"][0]["payload"],
        caller_document("anonymous", 0)
    );
    // Where to start again never repeats the token.
    let gone = reqwest::get(format!("{changes}?X-Sd-Token={TOKEN}&after={name}:1:1"))
        .await
        .unwrap();
    assert_eq!(gone.status(), 410);
    let body: Value = gone.json().await.unwrap();
    assert_eq!(body["snapshot"], format!("/streams/{name}/changes"));
}

#[tokio::test]
async fn proxy_mode_is_off_unless_enabled() {
    let api = MockUpstream::per_caller().await;
    // No [proxy] table; a file names at least one stream then, and a push stream polls nothing.
    let app = TestApp::from_toml(
        r#"
[push]
token = "push-token-for-tests-0123456789"
[[streams]]
name = "pushed"
source = "push"
"#,
    )
    .await;
    refused(
        &app,
        &dynamic_path(&api, "/x", ""),
        &[],
        404,
        "proxy-disabled",
    )
    .await;
    assert_eq!(api.requests(), 0);
}

#[tokio::test]
async fn an_on_demand_stream_polls_only_while_subscribed() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&format!(
        "{}on_demand = true\nlinger = \"300ms\"\n",
        polled("lazy", &api.url_at("/lazy"))
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.requests(), 0, "no subscriber, no poll");
    let listing = app.listing("lazy").await;
    assert_eq!(
        listing["upstream"]["on_demand"]["linger_ms"], 300,
        "{listing}"
    );

    let mut client = app.subscribe("lazy", &[]).await;
    let first = client.expect(SOON).await;
    assert_eq!(
        (first.event.as_str(), first.json()),
        ("snapshot", caller_document("anonymous", 0))
    );
    drop(client);
    // Polling stops after the linger period.
    let deadline = Instant::now() + SOON;
    loop {
        let before = api.requests();
        tokio::time::sleep(Duration::from_millis(400)).await;
        if api.requests() == before {
            break;
        }
        assert!(Instant::now() < deadline, "polling never stopped");
    }
    // The stale document was dropped: a new subscriber gets a fresh one.
    api.set_version(5);
    let mut client = app.subscribe("lazy", &[]).await;
    let first = client.expect(SOON).await;
    assert_eq!(
        (first.event.as_str(), first.json()),
        ("snapshot", caller_document("anonymous", 5))
    );
}

/// The Python client: `sseclient-py` reads the stream, `jsonpatch` applies the patches, and it
/// prints the document after `versions` patches.
const PYTHON_CLIENT: &str = r#"
import json, sys, urllib.request
import jsonpatch, sseclient
url, patches_wanted = sys.argv[1], int(sys.argv[2])
response = urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "text/event-stream"}))
doc, patches = None, 0
for event in sseclient.SSEClient(response).events():
    if event.event == "data":
        doc = json.loads(event.data)
    elif event.event == "patch":
        ops = json.loads(event.data)
        assert all(op["op"] in ("add", "remove", "replace") and op["path"] for op in ops), ops
        doc = jsonpatch.apply_patch(doc, ops)
        patches += 1
        if patches == patches_wanted:
            print(json.dumps(doc, sort_keys=True))
            sys.exit(0)
    elif event.event == "error":
        print("error event: " + event.data, file=sys.stderr)
        sys.exit(2)
"#;

#[tokio::test]
async fn an_off_the_shelf_python_client_rebuilds_the_document() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import sseclient, jsonpatch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(status) if status.success()) {
        patchwire_test_data::skip::<()>(
            "python3 with `sseclient-py` and `jsonpatch` is not available (pip install sseclient-py jsonpatch)",
        );
        return;
    }
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let url = app.url(&dynamic_path(&api, "/python", ""));
    let child = tokio::process::Command::new("python3")
        .args(["-c", PYTHON_CLIENT, &url, "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 starts");
    // Wait until the client is subscribed and the first document was fetched (it is the
    // client's `data`), then change the document three times.
    app.wait_for_metric("patchwire_subscribers", 1.0, SOON)
        .await;
    while api.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut expected = caller_document("anonymous", 0);
    for version in 1..=3 {
        let before = api.requests();
        api.set_version(version);
        expected = caller_document("anonymous", version);
        // One poll at least, so each version is its own patch.
        while api.requests() < before + 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let output = tokio::time::timeout(SOON * 2, child.wait_with_output())
        .await
        .expect("the Python client finished")
        .expect("python3 ran");
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rebuilt: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(rebuilt, expected);
}

#[tokio::test]
async fn a_redirect_to_a_host_not_allowed_is_named_as_refused_and_shown_redacted() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let to: String = url::form_urlencoded::byte_serialize(
        b"http://user:pw-0451@evil.test/steal?key=s3cr3t-0451&format=json",
    )
    .collect();
    let path = dynamic_path(&api, "/v1/moved", &format!("redirect_to={to}&sig=q-0451"));
    let mut client = open(&app, &path, &[]).await;
    let error = until(&mut client, "error").await;
    let body = error.json();
    assert_eq!(
        (body["status"].as_u64(), body["cause"].as_str()),
        (Some(502), Some("redirect-refused")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(
            "redirect to http://evil.test/steal?key=REDACTED&format=json refused: evil.test is not in proxy.allowed_hosts"
        ),
        "{message}"
    );
    assert!(
        !message.contains("redirects"),
        "not a redirect limit: {message}"
    );
    assert!(
        message.starts_with(&format!("GET http://{}: redirect to", api.addr())),
        "a dynamic stream's upstream is named by its origin only: {message}"
    );
    assert!(
        !message.contains("0451"),
        "no secret, and the dynamic URL's host only: {message}"
    );
    assert!(api.requests() > 0, "the upstream was asked and redirected");
}

/// The private key of the Streamdata.io SDK's own tests (base64 of 72 characters).
const SIGNING_KEY: &str = "MmIyMzBlZGMtOGYyNi00OGY2LWI2YTYtZmY1OTFlMzY1NjNiYjNhMzc3NWMtMzMwMC00YmMzLWI0NGYtMmM1ZmU4MDAzMGFh";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `/{url}` signed as `streamdataio-js-sdk-auth` signs it at `ts` (the signature appended to
/// the URL, the token after it), with `sign_url` signed instead of `url` when given.
fn signed_path(url: &str, ts: u64, sign_url: Option<&str>) -> String {
    let key = patchwire::proxy::config::SigningKey::parse(SIGNING_KEY).unwrap();
    let signature =
        patchwire::proxy::signature::sign(&key, sign_url.unwrap_or(url), &ts.to_string());
    let encoded: String = url::form_urlencoded::byte_serialize(signature.as_bytes()).collect();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("/{url}{sep}X-Auth-Sd-Ts={ts}&X-Auth-Sd-S={encoded}&X-Sd-Token={TOKEN}")
}

/// The proxy with the signing secret on the `tests` token, which may `require` signatures.
fn signing_toml(require: bool) -> String {
    proxy_toml(
        "",
        &format!("signing_secret = \"{SIGNING_KEY}\"\nrequire_signature = {require}"),
        "",
    )
}

#[tokio::test]
async fn signed_clients_are_verified_and_share_one_stream_whatever_their_timestamps() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&signing_toml(true)).await;
    let url = api.url_at("/v1/prices?currency=eur");
    let now = now_ms();
    let mut a = open(&app, &signed_path(&url, now, None), &[]).await;
    let mut b = open(&app, &signed_path(&url, now - 1500, None), &[]).await;
    let first = a.expect(SOON).await;
    assert_eq!(first.event, "data", "{first:?}");
    assert_eq!(first.json(), caller_document("anonymous", 0));
    assert_eq!(b.expect(SOON).await.event, "data");
    assert_eq!(
        a.headers["x-patchwire-stream"], b.headers["x-patchwire-stream"],
        "different timestamps, one stream"
    );
    let listing: Value = reqwest::get(app.url("/streams"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listing["dynamic"]["streams"], 1, "{listing}");
    let requests = api.received();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(
            request.uri, "/v1/prices?currency=eur",
            "the signature is not forwarded"
        );
    }
}

#[tokio::test]
async fn stale_bad_and_missing_signatures_are_refused() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&signing_toml(true)).await;
    let url = api.url_at("/v1/prices?currency=eur");
    let now = now_ms();

    let stale = signed_path(&url, now - 10 * 60 * 1000, None);
    let error = refused(&app, &stale, &[], 401, "signature-expired").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("signature_max_skew"),
        "{error}"
    );
    let future = signed_path(&url, now + 10 * 60 * 1000, None);
    refused(&app, &future, &[], 401, "signature-expired").await;

    let other = api.url_at("/v1/prices?currency=usd");
    let bad = signed_path(&url, now, Some(&other));
    let error = refused(&app, &bad, &[], 401, "signature-invalid").await;
    assert!(
        !error["message"].as_str().unwrap().contains(SIGNING_KEY),
        "{error}"
    );

    let unsigned = dynamic_path(&api, "/v1/prices", "currency=eur");
    refused(&app, &unsigned, &[], 401, "signature-missing").await;
    // JSON clients get the status itself.
    let response = reqwest::Client::new()
        .get(app.url(&unsigned))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(api.requests(), 0, "nothing refused reached the upstream");

    // A token that does not require signatures still refuses a bad one.
    let app = TestApp::from_toml(&signing_toml(false)).await;
    refused(&app, &bad, &[], 401, "signature-invalid").await;
    let mut client = open(&app, &unsigned, &[]).await;
    assert_eq!(client.expect(SOON).await.event, "data", "unsigned is fine");
}

#[tokio::test]
async fn streamdata_events_are_ascii_by_default_and_raw_utf8_when_turned_off() {
    let api = MockUpstream::per_caller().await;
    for ascii_only in [true, false] {
        let app =
            TestApp::from_toml(&proxy_toml(&format!("ascii_only = {ascii_only}"), "", "")).await;
        let path = dynamic_path(&api, "/unicode", "");
        let mut client = open(&app, &path, &[]).await;
        let mut doc = Rebuilt::default();
        let first = client.expect(SOON).await;
        assert_eq!(first.event, "data", "{first:?}");
        assert_eq!(first.data.is_ascii(), ascii_only, "{}", first.data);
        doc.apply(&first);
        let label = |d: &Option<Value>| d.as_ref().unwrap()["label"].clone();
        let version = first.json()["version"].as_u64().unwrap();
        assert_eq!(
            label(&doc.document),
            format!("Zürich {version} 東京 😀 naïve")
        );
        api.set_version(version + 1);
        let patch = until(&mut client, "patch").await;
        assert_eq!(patch.data.is_ascii(), ascii_only, "{}", patch.data);
        if ascii_only {
            assert!(patch.data.contains(r"\u6771\u4eac"), "{}", patch.data);
            assert!(patch.data.contains(r"\ud83d\ude00"), "{}", patch.data);
        }
        doc.apply(&patch);
        assert_eq!(
            label(&doc.document),
            format!("Zürich {} 東京 😀 naïve", version + 1)
        );
    }
}

/// A view of `/prices` in the proxy's parameters: prices above 110 euros, their id and price.
const VIEW_QUERY: &str =
    "X-Sd-Entities=%2Fprices&X-Sd-Key=%2Fid&X-Sd-Where=%40.eur%20%3E%20110&X-Sd-Fields=id,eur";

/// What [`VIEW_QUERY`] keeps of [`caller_document`], evaluated here by hand.
fn expected_view(version: u64) -> Value {
    let mut doc = caller_document("anonymous", version);
    let kept: Vec<Value> = doc["prices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["eur"].as_u64().unwrap() > 110)
        .map(|p| serde_json::json!({"id": p["id"], "eur": p["eur"]}))
        .collect();
    assert!(
        !kept.is_empty() && kept.len() < 21,
        "the view filters something"
    );
    doc["prices"] = Value::Array(kept);
    doc
}

/// Reads `client`'s events into `doc` until it equals `expected` (or the wait times out).
async fn rebuild_until(client: &mut SseClient, doc: &mut Rebuilt, expected: &Value) {
    while doc.document.as_ref() != Some(expected) {
        let event = client.expect(SOON).await;
        if matches!(event.event.as_str(), "data" | "snapshot" | "patch") {
            doc.apply(&event);
        }
    }
}

#[tokio::test]
async fn a_view_of_a_dynamic_stream_shares_its_poller_and_never_reaches_the_upstream() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let plain = dynamic_path(&api, "/v1/prices", "currency=eur");
    let viewed = dynamic_path(&api, "/v1/prices", &format!("currency=eur&{VIEW_QUERY}"));

    let mut a = open(&app, &plain, &[]).await;
    let mut b = open(&app, &viewed, &[]).await;
    // The parameters as headers: another view (only the ids), of the same stream.
    let mut c = open(
        &app,
        &plain,
        &[("x-sd-entities", "/prices"), ("x-sd-fields", "id")],
    )
    .await;
    let name = |client: &SseClient| {
        client.headers["x-patchwire-stream"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let source = name(&a);
    let (view, other_view) = (name(&b), name(&c));
    assert!(
        view.starts_with(&format!("{source}@~")),
        "{view} of {source}"
    );
    assert!(
        other_view.starts_with(&format!("{source}@~")),
        "{other_view}"
    );
    assert_ne!(view, other_view);

    let only_ids = |version| {
        let mut doc = caller_document("anonymous", version);
        for price in doc["prices"].as_array_mut().unwrap() {
            *price = serde_json::json!({"id": price["id"]});
        }
        doc
    };
    let mut docs = [Rebuilt::default(), Rebuilt::default(), Rebuilt::default()];
    for version in [0, 1, 2] {
        api.set_version(version);
        rebuild_until(&mut a, &mut docs[0], &caller_document("anonymous", version)).await;
        rebuild_until(&mut b, &mut docs[1], &expected_view(version)).await;
        rebuild_until(&mut c, &mut docs[2], &only_ids(version)).await;
    }
    assert!(docs[1].patches >= 1, "the view was patched");

    // Its document over JSON is the same.
    let json: Value = reqwest::Client::new()
        .get(app.url(&viewed))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json, expected_view(2));

    let listing: Value = reqwest::get(app.url("/streams"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listing["dynamic"]["streams"], 1,
        "one source stream: {listing}"
    );
    // One poller, asked without the view's parameters.
    let requests = api.received();
    assert!(requests.len() >= 3);
    for request in &requests {
        assert_eq!(request.uri, "/v1/prices?currency=eur", "{request:?}");
        assert!(
            request
                .headers
                .keys()
                .all(|h| !h.as_str().starts_with("x-sd-")),
            "{request:?}"
        );
    }
    for pair in requests.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= Duration::from_millis(60), "two polls {gap:?} apart");
    }
}

#[tokio::test]
async fn a_view_of_a_dynamic_stream_resumes_from_its_last_event_id() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    let viewed = dynamic_path(&api, "/resume", VIEW_QUERY);
    // The plain stream keeps the source alive while the view's subscriber is away.
    let mut plain = open(&app, &dynamic_path(&api, "/resume", ""), &[]).await;
    plain.expect(SOON).await;
    let mut client = open(&app, &viewed, &[]).await;
    let view = client.headers["x-patchwire-stream"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut doc = Rebuilt::default();
    rebuild_until(&mut client, &mut doc, &expected_view(0)).await;
    api.set_version(1);
    rebuild_until(&mut client, &mut doc, &expected_view(1)).await;
    drop(client);

    api.set_version(2);
    let native = format!("/streams/{view}?X-Sd-Token={TOKEN}");
    let mut resumed = open(&app, &native, &[("last-event-id", &doc.last_id)]).await;
    assert_eq!(resumed.status, 200);
    let first = resumed.expect(SOON).await;
    assert_eq!(first.event, "patch", "a resumed view is patched: {first:?}");
    doc.apply(&first);
    rebuild_until(&mut resumed, &mut doc, &expected_view(2)).await;
    assert_eq!(doc.snapshots, 1, "one snapshot in all");

    let missing = reqwest::get(app.url(&format!("/streams/{view}0?X-Sd-Token={TOKEN}")))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn bad_view_parameters_are_refused_naming_the_parameter() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml("", "", "")).await;
    for (query, param) in [
        ("X-Sd-Where=%40.eur%20%3E%3E%201", "X-Sd-Where"),
        ("X-Sd-Fields=%2F", "X-Sd-Fields"),
        (
            "X-Sd-Where=%40.eur%3E1&X-Sd-Entities=prices",
            "X-Sd-Entities",
        ),
        ("X-Sd-Where=%40.eur%3E1&X-Sd-Key=", "X-Sd-Key"),
        ("X-Sd-Entities=%2Fprices", "X-Sd-Where"),
    ] {
        let path = dynamic_path(&api, "/bad", query);
        let error = refused(&app, &path, &[], 400, "bad-view").await;
        let message = error["message"].as_str().unwrap();
        assert!(message.starts_with(param), "{query}: {message}");
        let json = reqwest::Client::new()
            .get(app.url(&path))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(json.status(), 400, "{query}");
    }
    // A header counts as the parameter.
    let path = dynamic_path(&api, "/bad", "");
    let error = refused(&app, &path, &[("x-sd-where", "@.eur >")], 400, "bad-view").await;
    assert!(error["message"].as_str().unwrap().starts_with("X-Sd-Where"));
    // Views of one stream share where its entities are.
    let mut first = open(&app, &dynamic_path(&api, "/bad", VIEW_QUERY), &[]).await;
    first.expect(SOON).await;
    let other = dynamic_path(
        &api,
        "/bad",
        "X-Sd-Entities=%2Fprices&X-Sd-Key=%2Feur&X-Sd-Fields=eur",
    );
    let error = refused(&app, &other, &[], 400, "bad-view").await;
    assert!(
        error["message"].as_str().unwrap().contains("/prices"),
        "{error}"
    );
    assert_eq!(
        api.received()
            .iter()
            .filter(|r| r.uri.contains("X-Sd"))
            .count(),
        0
    );
}

#[tokio::test]
async fn a_dynamic_streams_views_are_bounded_and_linger_as_configured() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxy_toml(
        "linger = \"1m\"\nmax_views_per_stream = 1\nview_linger = \"1s\"",
        "",
        "",
    ))
    .await;
    let first = dynamic_path(&api, "/bounded", VIEW_QUERY);
    let second = dynamic_path(
        &api,
        "/bounded",
        "X-Sd-Entities=%2Fprices&X-Sd-Key=%2Fid&X-Sd-Fields=id",
    );
    let mut client = open(&app, &first, &[]).await;
    client.expect(SOON).await;
    // One view per stream: another is refused with views' own message.
    let error = refused(&app, &second, &[], 429, "too-many-views").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("at most 1 in this stream (proxy.max_views_per_stream)"),
        "{error}"
    );
    // The same view is not another one.
    let mut again = open(&app, &first, &[]).await;
    again.expect(SOON).await;
    drop(again);
    let left = std::time::Instant::now();
    drop(client);
    // Once its subscribers left, the view lingers (view_linger), then is evicted, making
    // room for another.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let mut other = open(&app, &second, &[]).await;
        let event = other.expect(SOON).await;
        if event.event != "error" {
            // Kept at least view_linger after its last subscriber left (the server saw it
            // leave after the client did).
            assert!(
                left.elapsed() >= Duration::from_secs(1),
                "evicted after {:?}, before view_linger",
                left.elapsed()
            );
            break;
        }
        assert!(event.data.contains("too-many-views"), "{event:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the view was never evicted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

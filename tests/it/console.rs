//! The console at `/`: its files and their headers, the listing figures it charts, and the page
//! itself in headless Chromium against a running server whose upstream changes.

use std::path::PathBuf;
use std::time::Duration;

use patchwire::sinks::webhook::body::Mode;
use serde_json::{Value, json};

use crate::support::chromium::Chromium;
use crate::support::*;
use crate::webhook::{SECRET, TOKEN, endpoint, webhooks_toml};

const LONG: Duration = Duration::from_secs(20);

/// Long enough that the hub publishes patches rather than whole documents.
/// Views included: a view's change here (one vehicle leaving, one joining, the header) is about
/// 350 bytes of patch, and a view that small must still be larger than its patch.
const PAD: &str = "a long enough note so that small patches stay smaller than the document, \
                   which is when the hub publishes a patch rather than the whole document; \
                   views too, whose documents hold only some of the vehicles but all of this \
                   header, so the note is long enough for a view's patch as well";

/// A fleet whose vehicles move, one leaving and one joining at every tick, with a key that
/// needs escaping in a JSON Pointer.
fn fleet(tick: u64) -> Value {
    json!({
        "header": {"tick": tick, "note": PAD, "a/b~c": {"odd key": tick.is_multiple_of(2)}},
        "vehicles": [
            {"id": "v1", "route": "R1", "km": tick, "stops": [tick, tick + 1]},
            {"id": "v2", "route": "R2", "km": 2 * tick, "status": null},
            {"id": format!("v{}", tick + 10), "route": "R1", "km": 0.5, "new": true},
        ],
    })
}

async fn get(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(app.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn console_files_are_served_with_a_strict_policy_and_revalidate() {
    let upstream = MockUpstream::start(fleet(1)).await;
    let app = TestApp::from_toml(&polled("fleet", &upstream.url())).await;
    let files = [
        ("/", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
        ("/console/icon.svg", "image/svg+xml"),
    ];
    let mut bodies = Vec::new();
    for (path, content_type) in files {
        let response = get(&app, path, &[]).await;
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_eq!(
            headers["content-security-policy"],
            patchwire::api::console::CONTENT_SECURITY_POLICY,
            "{path}"
        );
        let policy = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(directive), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe"), "{policy}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["cache-control"], "no-cache");
        let etag = headers["etag"].to_str().unwrap().to_owned();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
        let body = response.text().await.unwrap();
        assert!(!body.is_empty());

        let again = get(&app, path, &[("if-none-match", &etag)]).await;
        assert_eq!(again.status(), 304, "{path}");
        assert_eq!(again.headers()["etag"], etag.as_str());
        assert!(again.bytes().await.unwrap().is_empty());
        let other = get(&app, path, &[("if-none-match", "\"something-else\"")]).await;
        assert_eq!(other.status(), 200, "{path}");
        bodies.push((path, body));
    }

    // Everything the page loads or asks for is a path on this origin.
    let html = &bodies[0].1;
    for attribute in ["src=\"", "href=\""] {
        for (at, _) in html.match_indices(attribute) {
            let value = &html[at + attribute.len()..];
            assert!(
                (value.starts_with('/') && !value.starts_with("//")) || value.starts_with('#'),
                "index.html refers elsewhere: {}",
                &value[..value.find('"').unwrap()]
            );
        }
    }
    for (path, body) in &bodies {
        // The one absolute URL allowed is the SVG namespace, a name that is never fetched.
        let without_namespace = body.replace("http://www.w3.org/2000/svg", "");
        assert!(
            !without_namespace.contains("://"),
            "{path} names another origin"
        );
        for protocol_relative in ["\"//", "'//", "`//", "(//"] {
            assert!(
                !body.contains(protocol_relative),
                "{path}: {protocol_relative}"
            );
        }
        assert!(!body.contains("@import"), "{path}");
    }
    let script = &bodies[1].1;
    for forbidden in [
        "import(",
        "importScripts",
        "eval(",
        "new Function",
        "innerHTML",
        "document.write",
        "WebSocket(",
        "localStorage",
    ] {
        assert!(!script.contains(forbidden), "console.js uses {forbidden}");
    }
    // Requests are built from paths: every fetch and EventSource starts from a literal "/".
    for call in ["fetch(", "new EventSource("] {
        for (at, _) in script.match_indices(call) {
            let argument = script[at + call.len()..].trim_start();
            assert!(
                argument.starts_with("\"/") || argument.starts_with("path"),
                "console.js calls {call}{}",
                &argument[..argument.len().min(40)]
            );
        }
    }
    let css = &bodies[2].1;
    assert!(!css.contains("url("), "the stylesheet loads nothing");

    // The console does not shadow the API's own 404.
    assert_eq!(get(&app, "/console/nope.js", &[]).await.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn listing_counts_the_requests_and_bytes_subscribers_were_saved() {
    let upstream = MockUpstream::start(fleet(1)).await;
    let app = TestApp::from_toml(&format!(
        "{}\n[streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\naliases = {{ route = \"route\" }}\n",
        polled("fleet", &upstream.url())
    ))
    .await;
    app.wait_for_seq("fleet", 1).await;
    // Two subscribers of the stream, one of a view of it.
    let mut a = app.subscribe("fleet", &[]).await;
    let mut b = app.subscribe("fleet", &[]).await;
    let mut c = app.subscribe("fleet?route=R1", &[]).await;
    for client in [&mut a, &mut b, &mut c] {
        assert_eq!(client.expect(SOON).await.event, "snapshot");
    }
    // Both are counted from the next poll on: take the figures once a poll saw them.
    let start = app.listing("fleet").await["upstream"]["requests"]
        .as_u64()
        .unwrap();
    upstream.wait_for_requests(start as usize + 2, SOON).await;
    let before = app.listing("fleet").await;
    for tick in 2..=3 {
        upstream.set(fleet(tick));
        app.wait_for_seq("fleet", tick).await;
    }
    for (n, client) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
        for _ in 2..=3 {
            let e = client.expect(SOON).await;
            assert_eq!(e.event, "patch", "client {n}: {e:?}");
        }
    }
    let after = app.listing("fleet").await;

    let up = |listing: &Value, key: &str| listing["upstream"][key].as_u64().unwrap();
    let requests = up(&after, "requests") - up(&before, "requests");
    assert!(requests >= 2, "{before}\n{after}");
    // Three subscribers throughout, the view's included: each request stood for three.
    assert_eq!(
        up(&after, "subscriber_requests") - up(&before, "subscriber_requests"),
        3 * requests
    );
    let body = up(&after, "body_bytes") - up(&before, "body_bytes");
    // Two new documents at least (304s bring no body).
    let smallest = serde_json::to_vec(&fleet(2)).unwrap().len() as u64;
    assert!(body >= 2 * smallest, "{body} < 2 × {smallest}");
    assert_eq!(
        up(&after, "subscriber_bytes") - up(&before, "subscriber_bytes"),
        3 * body
    );

    // Sent: a snapshot and two patches to each, the view's included, nothing else counted
    // (keep-alives excluded).
    assert_eq!(after["sent"]["events"], 9, "{after}");
    let sent = after["sent"]["bytes"].as_u64().unwrap();
    assert!(sent > 2 * smallest, "two snapshots at least: {sent}");
    app.stop().await;
}

/// Where the screenshots go: under the target directory.
fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The page's streams table, one object per row.
const ROWS: &str = "JSON.stringify([...document.querySelectorAll('#streams-table tbody tr')]\
     .map((r) => ({name: r.dataset.stream, seq: +r.dataset.seq, subscribers: +r.dataset.subscribers,\
      changes: +r.dataset.changes, state: r.dataset.state})))";

/// The inspector's tree read back into JSON from the rendered nodes (types and values).
const TREE: &str = r#"(() => {
  const read = (li) => {
    const type = li.dataset.type;
    if (type !== "object" && type !== "array") return JSON.parse(li.dataset.value);
    const items = [...li.querySelector(":scope > details > ul").children];
    if (type === "array") return items.map(read);
    const out = {};
    for (const item of items) {
      const path = item.dataset.path;
      const token = path.slice(path.lastIndexOf("/") + 1).replace(/~1/g, "/").replace(/~0/g, "~");
      out[token] = read(item);
    }
    return out;
  };
  const root = document.querySelector('#tree li[data-path=""]');
  return root ? JSON.stringify(read(root)) : null;
})()"#;

/// What has focus: its focus key, id or label, and whether its outline shows.
const FOCUSED: &str = "(() => { const e = document.activeElement; if (!e || e === document.body) return null; \
     const s = getComputedStyle(e); return JSON.stringify({key: e.dataset.focusKey || e.id || e.getAttribute('aria-label') || e.textContent.trim().slice(0, 30), \
     tag: e.tagName, outline: s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0}); })()";

async fn focused(page: &mut Chromium) -> Value {
    let text = page.evaluate(FOCUSED).await;
    text.as_str()
        .map_or(Value::Null, |t| serde_json::from_str(t).unwrap())
}

/// Presses Tab until the control named `key` has focus (at most `max` presses); the focus
/// stops on the way.
async fn tab_to(page: &mut Chromium, key: &str, max: usize) -> Vec<Value> {
    let mut stops = Vec::new();
    for _ in 0..max {
        page.press("Tab", false).await;
        let now = focused(page).await;
        stops.push(now.clone());
        if now["key"] == key {
            return stops;
        }
    }
    panic!("Tab never reached {key}: {stops:?}");
}

async fn rows_match_listing(page: &mut Chromium, app: &TestApp) -> Value {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let listing: Value = get(app, "/streams", &[]).await.json().await.unwrap();
        let expected: Vec<Value> = listing["streams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let views: u64 = s["views"]["active"].as_array().map_or(0, |a| {
                    a.iter().map(|v| v["subscribers"].as_u64().unwrap()).sum()
                });
                json!([
                    s["name"],
                    s["seq"],
                    s["subscribers"].as_u64().unwrap() + views,
                    s["changes_published"]
                ])
            })
            .collect();
        let rows: Value =
            serde_json::from_str(page.evaluate(ROWS).await.as_str().unwrap()).unwrap();
        let shown: Vec<Value> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                json!([
                    r["name"],
                    r["seq"],
                    r["subscribers"].as_u64().unwrap(),
                    r["changes"]
                ])
            })
            .collect();
        if shown == expected {
            return rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the table shows {shown:?}, /streams says {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn console_in_chromium_follows_streams_and_lists_webhooks() {
    let Some(mut page) = Chromium::launch().await else {
        return;
    };
    let upstream = MockUpstream::start(fleet(1)).await;
    let alerts =
        MockUpstream::start(json!({"alerts": [{"id": 1, "text": "lift out of service"}]})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let store = TestStore::sqlite();
    let toml = format!(
        "{alerts}on_demand = true\n\n{fleet}\n[streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\n\
         aliases = {{ route = \"route\" }}\n\n[[streams.views]]\nname = \"r1\"\nfilter = {{ route = \"R1\" }}\n\n\
         {webhooks}\n{endpoint}\n{proxy}",
        alerts = polled("alerts", &alerts.url()),
        fleet = polled("fleet", &upstream.url()),
        webhooks = webhooks_toml(&store, ""),
        endpoint = endpoint("ep-fleet", &receiver.url(), &["fleet"], Mode::Patch),
        proxy = crate::proxy::proxy_toml("", "", ""),
    );
    let app = TestApp::from_toml(&toml).await;
    app.wait_for_seq("fleet", 1).await;

    page.viewport(1280, 900, 1.0, false).await;
    page.navigate(&app.url("/")).await;
    assert_eq!(page.evaluate("document.visibilityState").await, "visible");
    page.wait_for(
        "document.querySelectorAll('#streams-table tbody tr').length === 2",
        LONG,
    )
    .await;

    // The table is /streams.
    let rows = rows_match_listing(&mut page, &app).await;
    let states: Vec<(String, String)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        states.contains(&("fleet".into(), "polling".into())),
        "{states:?}"
    );
    // The webhook dispatcher subscribes to every stream (endpoints may be added at run time), so
    // the on-demand stream has a subscriber and polls.
    assert_eq!(app.listing("alerts").await["subscribers"], 1);
    let badge = page
        .evaluate("document.querySelector('tr[data-stream=alerts] .badge').textContent")
        .await;
    assert_eq!(badge, "polling (on demand)");
    let options = page
        .evaluate("[...document.querySelectorAll('#inspect-stream option')].map((o) => o.value).join(' ')")
        .await;
    assert_eq!(
        options, "alerts fleet fleet@r1",
        "streams and their named views"
    );

    // Keyboard: every control is reached in order, with a visible focus ring.
    let stops = tab_to(&mut page, "inspect:fleet", 30).await;
    assert_eq!(stops[0]["key"], "Skip to content", "{stops:?}");
    for stop in &stops {
        assert_eq!(stop["outline"], true, "no visible focus on {stop}");
    }
    // Enter on a stream's name follows it.
    page.press("Enter", false).await;
    page.wait_for(
        "document.querySelector('#inspect-status').dataset.lastId",
        LONG,
    )
    .await;
    let epoch = app.listing("fleet").await["epoch"].as_u64().unwrap();
    let curl = page
        .evaluate("document.querySelector('#curl-text').textContent")
        .await;
    assert_eq!(
        curl,
        format!("curl -N 'http://{}/streams/fleet'", app.addr),
        "copy curl"
    );

    // The document follows the upstream: the tree equals the JSON view after each change.
    for tick in 2..=3 {
        upstream.set(fleet(tick));
        app.wait_for_seq("fleet", tick).await;
        page.wait_for(
            &format!("document.querySelector('#inspect-status').dataset.lastId === 'fleet:{epoch}:{tick}'"),
            LONG,
        )
        .await;
        let tree: Value =
            serde_json::from_str(page.evaluate(TREE).await.as_str().unwrap()).unwrap();
        let (status, json_view) = app.json_view("fleet").await;
        assert_eq!(status, 200);
        assert_eq!(tree, json_view, "after tick {tick}");
        assert_eq!(tree, fleet(tick));
    }
    // The table kept up with the changes (and counts the inspector as a subscriber).
    let rows = rows_match_listing(&mut page, &app).await;
    assert_eq!(rows[1]["changes"], 3, "{rows}");
    assert!(
        page.evaluate("document.querySelectorAll('#tree .changed').length > 0")
            .await
            == true,
        "patched nodes are highlighted"
    );
    let kinds = page
        .evaluate(
            "[...document.querySelectorAll('#events li')].map((l) => l.dataset.kind).join(' ')",
        )
        .await;
    assert_eq!(kinds, "patch patch snapshot", "raw events, newest first");
    page.screenshot(&screenshots().join("desktop-inspector.png"))
        .await;

    // A view: the stream's named view, as listed.
    page.evaluate("document.querySelector('#inspect-stream').value = 'fleet@r1'; document.querySelector('#inspect-open').click()")
        .await;
    page.wait_for(
        &format!(
            "document.querySelector('#inspect-status').dataset.lastId === 'fleet@r1:{epoch}:3'"
        ),
        LONG,
    )
    .await;
    let tree: Value = serde_json::from_str(page.evaluate(TREE).await.as_str().unwrap()).unwrap();
    assert_eq!(tree, app.json_view("fleet@r1").await.1);
    assert_eq!(
        tree["vehicles"].as_array().unwrap().len(),
        2,
        "R1 only: {tree}"
    );

    // Webhooks: the token typed in, the endpoints listed as the admin API lists them.
    page.evaluate("document.querySelector('#main').focus()")
        .await;
    tab_to(&mut page, "admin-token", 40).await;
    page.type_text(TOKEN).await;
    let stops = tab_to(&mut page, "token-load", 3).await;
    assert_eq!(stops[0]["key"], "remember-token", "{stops:?}");
    page.press("Enter", false).await;
    page.wait_for(
        "document.querySelectorAll('#endpoints-table tbody tr').length > 0",
        LONG,
    )
    .await;
    let shown = page
        .evaluate("[...document.querySelectorAll('#endpoints-table tbody tr')].map((r) => r.dataset.endpoint + ':' + r.dataset.state).join(' ')")
        .await;
    let listed: Value = reqwest::Client::new()
        .get(app.url("/admin/webhooks"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected: Vec<String> = listed["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}:enabled", e["id"].as_str().unwrap()))
        .collect();
    assert_eq!(shown, expected.join(" "));
    assert_eq!(
        page.evaluate("sessionStorage.length").await,
        0,
        "the token is kept in memory only unless asked"
    );
    // Its deliveries, by keyboard: Tab to the endpoint's button, Enter.
    tab_to(&mut page, "deliveries:ep-fleet", 10).await;
    page.press("Enter", false).await;
    page.wait_for(
        "document.querySelectorAll('#deliveries-table tbody tr[data-state=delivered]').length > 0",
        LONG,
    )
    .await;
    assert!(!receiver.hits().is_empty());
    // Replaying a delivery: the admin API's action, answered in the page, redelivered with the
    // same webhook-id.
    let first = receiver.hits()[0].id();
    let hits = receiver.hits().len();
    page.evaluate(
        "document.querySelector('#deliveries-table tr[data-delivery=\"1\"] button').click()",
    )
    .await;
    page.wait_for(
        "document.querySelector('#webhooks-status').textContent === '1 delivery of ep-fleet queued again.'",
        LONG,
    )
    .await;
    let deadline = tokio::time::Instant::now() + LONG;
    while !receiver.hits()[hits..].iter().any(|h| h.id() == first) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Everything the page loaded came from this server.
    let origins = page
        .evaluate("[...new Set(performance.getEntriesByType('resource').map((e) => new URL(e.name).origin))].join(' ')")
        .await;
    assert_eq!(origins, format!("http://{}", app.addr));

    // The chart: bytes per refresh, once refreshes saw changes.
    for tick in 4..=7 {
        upstream.set(fleet(tick));
        app.wait_for_seq("fleet", tick).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    page.wait_for(
        "document.querySelectorAll('#chart polyline').length === 2",
        LONG,
    )
    .await;
    let label = page
        .evaluate("document.querySelector('#chart svg').getAttribute('aria-label')")
        .await;
    assert!(
        label.as_str().unwrap().contains("polling would cost"),
        "{label}"
    );

    let dir = screenshots();
    page.evaluate("window.scrollTo(0, 0)").await;
    page.screenshot(&dir.join("desktop.png")).await;

    // Nobody looking costs nothing: hidden, the page closes its stream and stops asking.
    let watching = |listing: Value| {
        listing["views"]["active"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "fleet@r1")
            .map_or(0, |v| v["subscribers"].as_u64().unwrap())
    };
    assert_eq!(watching(app.listing("fleet").await), 1);
    const ASKED: &str = "performance.getEntriesByType('resource').filter((e) => e.name.endsWith('/streams')).length";
    page.hide().await;
    assert_eq!(page.evaluate("document.visibilityState").await, "hidden");
    let deadline = tokio::time::Instant::now() + SOON;
    while watching(app.listing("fleet").await) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hidden page still follows the view"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = page.evaluate(ASKED).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        page.evaluate(ASKED).await,
        asked,
        "GET /streams while hidden"
    );
    assert_eq!(
        page.evaluate("document.querySelector('#connection').textContent")
            .await,
        "Paused while this page is hidden"
    );
    page.show().await;
    page.wait_for(&format!("{ASKED} > {asked}"), LONG).await;
    let deadline = tokio::time::Instant::now() + SOON;
    while watching(app.listing("fleet").await) != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "visible again, the page follows the view again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The proxy mode: its dynamic streams counted against their bounds, never named.
    let dynamic_url = app.url(&format!(
        "/{}?X-Sd-Token={}",
        alerts.url_at("/secret-path"),
        crate::proxy::TOKEN
    ));
    let mut dynamic = SseClient::connect(&dynamic_url, &[], false).await;
    assert_eq!(dynamic.expect(SOON).await.event, "data");
    let listing: Value = get(&app, "/streams", &[]).await.json().await.unwrap();
    let limits = &listing["dynamic"];
    assert_eq!(limits["streams"], 1, "{listing}");
    page.wait_for(
        &format!(
            "document.querySelector('#dynamic-count-text').textContent === '1 of {}'",
            limits["max_streams"]
        ),
        LONG,
    )
    .await;
    let text = page.evaluate("document.body.innerText").await;
    assert!(
        !text.as_str().unwrap().contains("secret-path"),
        "a dynamic stream's URL is never shown"
    );
    page.screenshot(&dir.join("desktop-proxy.png")).await;

    // At a phone's width: the page needs no sideways scrolling.
    page.viewport(390, 844, 2.0, true).await;
    page.wait_for("innerWidth === 390", SOON).await;
    let overflow = page
        .evaluate("document.documentElement.scrollWidth - innerWidth")
        .await;
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "wider than a phone by {overflow}px"
    );
    page.screenshot(&dir.join("phone.png")).await;
    println!("console screenshots: {}", dir.display());
    eprintln!("console screenshots: {}", dir.display());

    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_chromium_shows_the_cluster_and_which_node_polls_each_stream() {
    let upstream = MockUpstream::start(fleet(1)).await;
    let config = format!(
        r#"
[[streams]]
name = "fleet"
url = "{}"
interval = "200ms"

[cluster]
redis = "{{redis}}"
prefix = "console"
lease_ttl = "1s"
probe_interval = "500ms"
"#,
        upstream.url()
    );
    let Some(mut cluster) = crate::support::cluster::TestCluster::new(&config) else {
        return;
    };
    let Some(mut page) = Chromium::launch().await else {
        return;
    };
    cluster.start(&["node-a", "node-b"]).await;
    let base = cluster.nodes[1].base();
    page.viewport(1280, 900, 1.0, false).await;
    // A link that opens the console following a stream.
    page.navigate(&format!("{base}/#follow=fleet")).await;
    page.wait_for(
        "document.querySelector('#inspect-status').dataset.lastId",
        LONG,
    )
    .await;
    let tree: Value = serde_json::from_str(page.evaluate(TREE).await.as_str().unwrap()).unwrap();
    assert_eq!(tree, fleet(1));
    page.wait_for(
        "document.querySelectorAll('#cluster-nodes li').length === 2",
        LONG,
    )
    .await;
    assert_eq!(
        page.evaluate("document.querySelector('#cluster-node').textContent")
            .await,
        "node-b"
    );
    // Who polls fleet, as the lease in Redis says, shown in its row and under its node.
    let deadline = tokio::time::Instant::now() + LONG;
    let holder = loop {
        let listing: Value = reqwest::get(format!("{base}/streams"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(node) = listing["streams"][0]["lease"]["node"].as_str() {
            break node.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lease: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    page.wait_for(
        &format!(
            "document.querySelector('tr[data-stream=fleet] td.cluster-only').textContent === '{holder}' && \
             document.querySelector('#cluster-nodes li[data-node={holder}]').textContent.endsWith(': fleet')"
        ),
        LONG,
    )
    .await;
    let visible = page
        .evaluate("getComputedStyle(document.querySelector('th.cluster-only')).display")
        .await;
    assert_ne!(visible, "none", "the Polled by column shows in a cluster");
    // Without webhooks the panel says so and offers no token field.
    assert_eq!(
        page.evaluate("document.querySelector('#webhooks-status').textContent")
            .await,
        "Webhooks are not configured on this server."
    );
    assert_eq!(
        page.evaluate("document.querySelector('#admin-token').offsetParent === null")
            .await,
        true
    );
    page.screenshot(&screenshots().join("desktop-cluster.png"))
        .await;
    page.close().await;
}

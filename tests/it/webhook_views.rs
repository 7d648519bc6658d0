//! Webhook endpoints receiving a view (`fleet@r1`, or an ad hoc filter `fleet?route=R2`)
//! rather than the whole stream: they get only the view's changes, as patches chained on the
//! view's previous change (a view's sequence numbers are its source's, so they are sparse), their
//! receivers rebuild exactly the view's document, the view is not evicted while they follow it;
//! endpoints created through the admin API receive views too, validated as the file's are.

use std::time::Duration;

use patchwire::sinks::webhook::body::Mode;
use serde_json::{Value, json};

use crate::support::*;
use crate::webhook::{Admin, SECRET, endpoint, rebuild, webhooks_toml};

const LONG: Duration = Duration::from_secs(20);

/// Vehicle `a` on route R1 moving at `r1`, `b` on R2 at `r2`; a header large enough that a
/// view's patches are smaller than its document.
fn fleet(r1: u64, r2: u64) -> Value {
    json!({
        "header": {"notes": "n".repeat(600)},
        "vehicles": [
            {"id": "a", "route": "R1", "speed": r1},
            {"id": "b", "route": "R2", "speed": r2},
        ]
    })
}

/// `fleet` with views (a named `r1`, a linger much shorter than the test) and `endpoints`.
fn app_toml(upstream: &MockUpstream, store: &TestStore, endpoints: &[String]) -> String {
    format!(
        "{}[streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\n\
         aliases = {{ route = \"route\" }}\nlinger = \"1s\"\n\n\
         [[streams.views]]\nname = \"r1\"\nfilter = {{ route = \"R1\" }}\n\n{}{}",
        polled("fleet", &upstream.url()),
        webhooks_toml(store, ""),
        endpoints.concat()
    )
}

/// The deliveries accepted, each message once (retries removed).
fn unique(receiver: &Receiver) -> Vec<Hit> {
    let mut seen = std::collections::HashSet::new();
    receiver
        .accepted()
        .into_iter()
        .filter(|h| seen.insert(h.id()))
        .collect()
}

/// Waits until the server serves at `/streams/{view}` a document whose vehicle moves at `speed`
/// and `receiver` rebuilds it.
async fn converge(app: &TestApp, receiver: &Receiver, view: &str, speed: u64) -> Value {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let (status, served) = app.json_view(view).await;
        assert_eq!(status, 200, "{view}");
        let hits = unique(receiver);
        if served["vehicles"][0]["speed"] == speed && !hits.is_empty() && rebuild(&hits) == served {
            return served;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{view}: the receiver never rebuilt {served}; it has {:?}",
            hits.iter()
                .map(|h| (h.kind().to_owned(), h.seq()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn endpoints_on_views_receive_only_the_views_changes(store: TestStore) {
    let upstream = MockUpstream::start(fleet(1, 1)).await;
    let named = Receiver::start(&[SECRET]).await;
    let ad_hoc = Receiver::start(&[SECRET]).await;
    let app = TestApp::from_toml(&app_toml(
        &upstream,
        &store,
        &[
            endpoint("named", &named.url(), &["fleet@r1"], Mode::Patch),
            endpoint("adhoc", &ad_hoc.url(), &["fleet?route=R2"], Mode::Patch),
        ],
    ))
    .await;
    app.wait_for_seq("fleet", 1).await;
    converge(&app, &named, "fleet@r1", 1).await;
    converge(&app, &ad_hoc, "fleet?route=R2", 1).await;
    let first = &unique(&named)[0];
    assert_eq!(first.kind(), "stream.snapshot");
    assert_eq!(first.body["stream"], "fleet@r1");
    assert_eq!(
        first.body["data"]["vehicles"],
        json!([{"id": "a", "route": "R1", "speed": 1}])
    );
    let ad_hoc_stream = unique(&ad_hoc)[0].body["stream"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(ad_hoc_stream.starts_with("fleet@~"), "{ad_hoc_stream}");

    // Changes to one route or the other, each followed by a wait longer than the views'
    // linger: the views stay (their endpoints follow them) and their chains never break.
    for step in 1..=6u64 {
        let (r1, r2) = (1 + step.div_ceil(2), 1 + step / 2);
        upstream.set(fleet(r1, r2));
        let (changed, still) = if step % 2 == 1 {
            ((&named, "fleet@r1", r1), (&ad_hoc, "fleet?route=R2", r2))
        } else {
            ((&ad_hoc, "fleet?route=R2", r2), (&named, "fleet@r1", r1))
        };
        let before = unique(still.0).len();
        converge(&app, changed.0, changed.1, changed.2).await;
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(
            unique(still.0).len(),
            before,
            "step {step}: a change outside {} sent something",
            still.1
        );
        converge(&app, still.0, still.1, still.2).await;
    }
    for (receiver, stream) in [(&named, "fleet@r1"), (&ad_hoc, ad_hoc_stream.as_str())] {
        let hits = unique(receiver);
        assert_eq!(hits.len(), 4, "{stream}: a snapshot and three patches");
        // `rebuild` checked each patch's `base_seq` is the previous delivery's `seq`.
        assert!(
            hits[1..]
                .iter()
                .all(|h| h.kind() == "stream.patch" && h.body["stream"] == stream),
            "{stream}: patches after the first snapshot: {:?}",
            hits.iter().map(|h| h.body.clone()).collect::<Vec<_>>()
        );
        assert!(
            hits.iter()
                .any(|h| h.kind() == "stream.patch"
                    && h.body["base_seq"].as_u64() < Some(h.seq() - 1)),
            "{stream}: the view's changes are sparse, and a patch follows the view's previous \
             change, not seq - 1"
        );
    }
    assert_eq!(app.metric("patchwire_view_evictions_total").await, 0.0);

    app.stop().await;
}

crate::on_both_stores!(endpoints_on_views_receive_only_the_views_changes);

/// The views computed now of `fleet` (`/streams`' `active` list): name → subscribers.
async fn active_views(app: &TestApp) -> std::collections::BTreeMap<String, u64> {
    let listing: Value = reqwest::get(app.url("/streams"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    listing["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "fleet")
        .flat_map(|s| s["views"]["active"].as_array().cloned().unwrap_or_default())
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["subscribers"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The admin API takes views as the file does: `fleet@r1` and `fleet?route=R2` start their
/// dispatchers at once (the endpoint gets the view's document, then its changes only, and the
/// view stays past its linger), a bad view is a `422` naming the entry, changing an endpoint's
/// streams starts and stops views, and deleting the last endpoint on a view stops its
/// dispatcher and releases the view (evicted after its linger).
async fn admin_api_endpoints_receive_views(store: TestStore) {
    let upstream = MockUpstream::start(fleet(1, 1)).await;
    let named = Receiver::start(&[SECRET]).await;
    let ad_hoc = Receiver::start(&[SECRET]).await;
    let app = TestApp::from_toml(&app_toml(&upstream, &store, &[])).await;
    app.wait_for_seq("fleet", 1).await;
    let admin = Admin::new(&app);

    // Bad views: refused naming the entry and what was expected, nothing created.
    for (streams, expected) in [
        (json!(["fleet@nope"]), "streams[0]"),
        (json!(["fleet?colour=red"]), "streams[0]"),
        (json!(["fleet", "fleet@~0123456789ab"]), "streams[1]"),
        (json!(["fleet@r1", "fleet?route=R1"]), "already listed"),
        (json!(["nope@r1"]), "configured stream"),
    ] {
        let (status, body) = admin
            .call(
                "POST",
                "",
                Some(json!({"url": named.url(), "streams": streams, "secret": SECRET})),
            )
            .await;
        assert_eq!(status, 422, "{streams}: {body}");
        assert!(
            body.to_string().contains(expected),
            "{streams}: {expected:?} in {body}"
        );
    }
    let (_, listed) = admin.call("GET", "", None).await;
    assert_eq!(listed["endpoints"], json!([]), "{listed}");

    let create = |url: String, streams: Value| {
        let admin = &admin;
        async move {
            let (status, body) = admin
                .call(
                    "POST",
                    "",
                    Some(json!({"url": url, "streams": streams, "secret": SECRET})),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            body
        }
    };
    let first = create(named.url(), json!(["fleet@r1"])).await;
    let second = create(ad_hoc.url(), json!(["fleet?route=R2"])).await;
    let ad_hoc_name = second["streams"][0].as_str().unwrap().to_owned();
    assert!(ad_hoc_name.starts_with("fleet@~"), "{second}");
    converge(&app, &named, "fleet@r1", 1).await;
    converge(&app, &ad_hoc, "fleet?route=R2", 1).await;
    assert_eq!(unique(&named)[0].kind(), "stream.snapshot");
    assert_eq!(unique(&named)[0].body["stream"], "fleet@r1");
    assert_eq!(unique(&ad_hoc)[0].body["stream"], ad_hoc_name.as_str());

    // Changes to each route, with waits longer than the linger: both views stay, each
    // endpoint gets its view's changes only, as patches.
    for step in 1..=4u64 {
        let (r1, r2) = (1 + step.div_ceil(2), 1 + step / 2);
        upstream.set(fleet(r1, r2));
        converge(&app, &named, "fleet@r1", r1).await;
        converge(&app, &ad_hoc, "fleet?route=R2", r2).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    for (receiver, stream) in [(&named, "fleet@r1"), (&ad_hoc, ad_hoc_name.as_str())] {
        let hits = unique(receiver);
        assert_eq!(hits.len(), 3, "{stream}: a snapshot and two patches");
        assert!(
            hits[1..]
                .iter()
                .all(|h| h.kind() == "stream.patch" && h.body["stream"] == stream),
            "{stream}"
        );
    }
    assert_eq!(app.metric("patchwire_view_evictions_total").await, 0.0);
    let active = active_views(&app).await;
    assert!(active.get(&ad_hoc_name) >= Some(&1), "{active:?}");

    // The first endpoint moves from the named view to the ad hoc one and the whole stream:
    // it is owed both documents; the named view, followed by no one now, is released.
    let id = first["id"].as_str().unwrap().to_owned();
    let (status, body) = admin
        .call(
            "PATCH",
            &format!("/{id}"),
            Some(json!({"streams": ["fleet", "fleet?route=R2"]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["streams"], json!(["fleet", ad_hoc_name]), "{body}");
    named
        .wait_for(
            LONG,
            "the ad hoc view's and the stream's documents",
            |hits| {
                hits.iter()
                    .any(|h| h.body["stream"] == ad_hoc_name.as_str())
                    && hits.iter().any(|h| h.body["stream"] == "fleet")
            },
        )
        .await;

    // Deleting the last endpoints on the ad hoc view stops its dispatcher: the view has no
    // subscriber left (nor has the named one since the change), and is evicted at the next
    // change after its linger.
    for id in [id.as_str(), second["id"].as_str().unwrap()] {
        let (status, body) = admin.call("DELETE", &format!("/{id}"), None).await;
        assert_eq!(status, 204, "{body}");
    }
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let active = active_views(&app).await;
        if active.values().all(|subscribers| *subscribers == 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the views were never released: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = ad_hoc.hits().len();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    upstream.set(fleet(9, 9));
    app.wait_for_seq("fleet", 6).await;
    let active = active_views(&app).await;
    assert!(active.is_empty(), "evicted after their linger: {active:?}");
    assert_eq!(app.metric("patchwire_view_evictions_total").await, 2.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ad_hoc.hits().len(), before, "nothing after the delete");
    app.stop().await;
}

crate::on_both_stores!(admin_api_endpoints_receive_views);

/// An ad hoc view an endpoint created through the admin API receives is followed again after a
/// restart: its id cannot be turned back into its filter, so the endpoint's definition keeps
/// the filter as written.
async fn an_admin_api_view_is_followed_again_after_a_restart(store: TestStore) {
    let upstream = MockUpstream::start(fleet(1, 1)).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let toml = app_toml(&upstream, &store, &[]);
    let app = TestApp::from_toml(&toml).await;
    app.wait_for_seq("fleet", 1).await;
    let (status, body) = Admin::new(&app)
        .call(
            "POST",
            "",
            Some(json!({"url": receiver.url(), "streams": ["fleet?route=R2"], "secret": SECRET})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    converge(&app, &receiver, "fleet?route=R2", 1).await;
    app.stop().await;

    let app = TestApp::from_toml(&toml).await;
    app.wait_for_seq("fleet", 1).await;
    upstream.set(fleet(1, 2));
    converge(&app, &receiver, "fleet?route=R2", 2).await;
    let active = active_views(&app).await;
    assert_eq!(active.values().sum::<u64>(), 1, "followed: {active:?}");
    app.stop().await;
}

crate::on_both_stores!(an_admin_api_view_is_followed_again_after_a_restart);

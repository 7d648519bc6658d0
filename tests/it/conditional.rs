//! Conditional requests: the poller revalidates with `If-None-Match` / `If-Modified-Since`,
//! a 304 publishes nothing, and a body byte-identical (or equal as JSON) to the last one
//! publishes nothing either.

use serde_json::json;

use crate::support::*;

/// Subscribes and returns the client with its document rebuilt from the first snapshot.
async fn subscribed(app: &TestApp) -> (SseClient, Rebuilt) {
    let mut client = app.subscribe("doc", &[]).await;
    let mut rebuilt = Rebuilt::default();
    let first = client.expect(SOON).await;
    assert_eq!(first.event, "snapshot");
    rebuilt.apply(&first);
    (client, rebuilt)
}

/// Changes the document and asserts that the subscriber's very next event is the patch with
/// sequence number `seq` that produces it: nothing was published in between.
async fn next_event_is_the_patch(
    upstream: &MockUpstream,
    client: &mut SseClient,
    rebuilt: &mut Rebuilt,
    seq: u64,
) {
    upstream.update(|d| d["n"] = json!(d["n"].as_u64().unwrap() + 1));
    let event = client.expect(SOON).await;
    assert_eq!(event.event, "patch", "{event:?}");
    assert!(event.id.ends_with(&format!(":{seq}")), "{event:?}");
    rebuilt.apply(&event);
    assert_eq!(rebuilt.document.as_ref(), Some(&upstream.document()));
}

#[tokio::test]
async fn etag_revalidation_gets_304s_that_publish_nothing() {
    let upstream = MockUpstream::start(json!({"n": 1, "pad": "x".repeat(100)})).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let (mut client, mut rebuilt) = subscribed(&app).await;
    let first_etag = upstream.etag();
    let first_date = upstream.last_modified();

    upstream.wait_for_requests(4, SOON).await;
    let received = upstream.received();
    assert_eq!(received[0].header("if-none-match"), None);
    for r in &received[1..] {
        assert_eq!(r.header("if-none-match"), Some(first_etag.as_str()));
        assert_eq!(r.header("if-modified-since"), Some(first_date.as_str()));
    }
    let not_modified = app
        .metric(r#"patchwire_polls_total{stream="doc",outcome="NotModified""#)
        .await;
    assert!(not_modified >= 3.0, "304 polls counted: {not_modified}");
    let listing = app.listing("doc").await;
    assert_eq!(listing["seq"], 1, "{listing}");
    assert_eq!(listing["changes_published"], 1, "{listing}");
    assert_eq!(
        listing["upstream"]["last_outcome"]["result"],
        "not-modified"
    );

    next_event_is_the_patch(&upstream, &mut client, &mut rebuilt, 2).await;
    // The new validators replace the old ones.
    let seen = upstream.requests();
    upstream.wait_for_requests(seen + 1, SOON).await;
    let last = upstream.received().pop().unwrap();
    assert_eq!(last.header("if-none-match"), Some(upstream.etag().as_str()));
    assert_ne!(upstream.etag(), first_etag);
    assert_eq!(rebuilt.snapshots, 1);
    app.stop().await;
}

#[tokio::test]
async fn last_modified_alone_revalidates_with_if_modified_since() {
    let upstream = MockUpstream::start(json!({"n": 1, "pad": "x".repeat(100)})).await;
    upstream.validators(false, true);
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let (mut client, mut rebuilt) = subscribed(&app).await;
    let first_date = upstream.last_modified();

    upstream.wait_for_requests(4, SOON).await;
    let received = upstream.received();
    assert_eq!(received[0].header("if-modified-since"), None);
    for r in &received[1..] {
        assert_eq!(r.header("if-none-match"), None);
        assert_eq!(r.header("if-modified-since"), Some(first_date.as_str()));
    }
    assert!(
        app.metric(r#"patchwire_polls_total{stream="doc",outcome="NotModified""#)
            .await
            >= 3.0
    );

    next_event_is_the_patch(&upstream, &mut client, &mut rebuilt, 2).await;
    let seen = upstream.requests();
    upstream.wait_for_requests(seen + 1, SOON).await;
    let last = upstream.received().pop().unwrap();
    let date = upstream.last_modified();
    assert_ne!(date, first_date);
    assert_eq!(last.header("if-modified-since"), Some(date.as_str()));
    app.stop().await;
}

#[tokio::test]
async fn identical_bodies_publish_nothing() {
    let upstream =
        MockUpstream::start(json!({"n": 1, "list": ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]})).await;
    upstream.validators(false, false);
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let (mut client, mut rebuilt) = subscribed(&app).await;

    // Without validators every poll gets the whole body; the same bytes change nothing.
    upstream.wait_for_requests(4, SOON).await;
    for r in upstream.received() {
        assert_eq!(r.header("if-none-match"), None);
        assert_eq!(r.header("if-modified-since"), None);
    }
    let unchanged = app
        .metric(r#"patchwire_polls_total{stream="doc",outcome="Unchanged""#)
        .await;
    assert!(unchanged >= 3.0, "unchanged polls: {unchanged}");
    assert_eq!(app.metric("patchwire_changes_total").await, 1.0);
    assert_eq!(
        app.listing("doc").await["upstream"]["last_outcome"]["result"],
        "unchanged"
    );

    // Different bytes, the same JSON: parsed and compared, still nothing to publish.
    upstream
        .set_raw_body(b" {\n  \"list\" : [\"aaaaaaaaaaaa\",\"bbbbbbbbbbbb\"],\n  \"n\" : 1\n}\n");
    let seen = upstream.requests();
    upstream.wait_for_requests(seen + 2, SOON).await;
    assert_eq!(app.metric("patchwire_changes_total").await, 1.0);
    assert_eq!(app.listing("doc").await["seq"], 1);

    next_event_is_the_patch(&upstream, &mut client, &mut rebuilt, 2).await;
    assert_eq!(app.metric("patchwire_changes_total").await, 2.0);
    app.stop().await;
}

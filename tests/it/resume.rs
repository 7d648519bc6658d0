//! Resuming: a subscriber reconnecting with the id of the last event it applied (header
//! `Last-Event-ID` or query `lastEventId`) gets exactly the changes it missed; an id that
//! cannot be honoured (too old, malformed, from the future, another stream, another epoch,
//! a previous process) gets the current snapshot instead.

use serde_json::{Value, json};

use crate::support::*;

fn document(n: u64) -> Value {
    json!({"n": n, "items": ["alpha", "beta", "gamma", "delta"], "meta": {"source": "test"}})
}

/// Publishes `document(from..=to)` one change at a time, waiting for each to be published.
async fn publish(app: &TestApp, upstream: &MockUpstream, from: u64, to: u64, seq_of_first: u64) {
    for (i, n) in (from..=to).enumerate() {
        upstream.set(document(n));
        app.wait_for_seq("doc", seq_of_first + i as u64).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Header,
    Query,
}

async fn resubscribe(app: &TestApp, id: &str, via: Via) -> SseClient {
    match via {
        Via::Header => app.subscribe("doc", &[("last-event-id", id)]).await,
        Via::Query => {
            let url =
                reqwest::Url::parse_with_params(&app.url("/streams/doc"), [("lastEventId", id)])
                    .unwrap();
            SseClient::connect(url.as_str(), &[], false).await
        }
    }
}

async fn missed_patches_are_replayed(via: Via) {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    // The first poll must have read document 1 (seq 1) before document 2 is set.
    app.wait_for_seq("doc", 1).await;
    let mut client = app.subscribe("doc", &[]).await;
    let mut rebuilt = Rebuilt::default();
    for n in 2..=4 {
        upstream.set(document(n));
        assert!(rebuilt.converge(&mut client, &document(n), SOON).await);
    }
    let (stream, seq) = rebuilt.last_id.rsplit_once(':').unwrap();
    let stream = stream.to_owned();
    assert_eq!(seq, "4");
    drop(client);

    // Five changes while disconnected.
    publish(&app, &upstream, 5, 9, 5).await;

    let mut client = resubscribe(&app, &rebuilt.last_id, via).await;
    assert_eq!(client.status, 200);
    for seq in 5..=9 {
        let event = client.expect(SOON).await;
        assert_eq!(event.event, "patch", "{via:?}: {event:?}");
        assert_eq!(event.id, format!("{stream}:{seq}"), "{via:?}");
        rebuilt.apply(&event);
    }
    assert_eq!(rebuilt.document, Some(document(9)));
    // Nothing replayed twice, nothing extra: the next event is the next change.
    upstream.set(document(10));
    let event = client.expect(SOON).await;
    assert_eq!(
        (event.event.as_str(), event.id.as_str()),
        ("patch", format!("{stream}:10").as_str()),
        "{via:?}"
    );
    rebuilt.apply(&event);
    assert_eq!(rebuilt.document, Some(document(10)));
    assert_eq!(rebuilt.snapshots, 1, "resuming sends no snapshot");

    // Resuming at the latest id replays nothing and continues live.
    let mut current = resubscribe(&app, &event.id, via).await;
    upstream.set(document(11));
    let next = current.expect(SOON).await;
    assert_eq!(next.event, "patch");
    assert_eq!(next.id, format!("{stream}:11"));
    app.stop().await;
}

#[tokio::test]
async fn last_event_id_header_gets_exactly_the_missed_patches() {
    missed_patches_are_replayed(Via::Header).await;
}

#[tokio::test]
async fn last_event_id_query_gets_exactly_the_missed_patches() {
    missed_patches_are_replayed(Via::Query).await;
}

#[tokio::test]
async fn ids_that_cannot_be_resumed_get_the_current_snapshot() {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&format!("{}history = 3\n", polled("doc", &upstream.url()))).await;
    app.wait_for_seq("doc", 1).await;
    publish(&app, &upstream, 2, 8, 2).await;
    let epoch = app.listing("doc").await["epoch"].as_u64().unwrap();
    let current = format!("doc:{epoch}:8");

    // History keeps changes 6, 7 and 8: resuming after 5 is the oldest that replays.
    for via in [Via::Header, Via::Query] {
        let mut client = resubscribe(&app, &format!("doc:{epoch}:5"), via).await;
        for seq in 6..=8 {
            let event = client.expect(SOON).await;
            assert_eq!(event.event, "patch", "{via:?}");
            assert_eq!(event.id, format!("doc:{epoch}:{seq}"));
        }
    }

    let unusable = [
        format!("doc:{epoch}:4"),       // older than the history
        format!("doc:{epoch}:1"),       // much older
        format!("doc:{epoch}:99"),      // from the future
        format!("doc:{}:8", epoch - 1), // another epoch, same sequence
        format!("doc:{}:5", epoch + 1),
        format!("other:{epoch}:7"), // another stream
        "garbage".to_owned(),
        format!("doc:{epoch}:"),
        "doc:x:5".to_owned(),
        format!(":{epoch}:5"),
        "doc:1:2:3:4".to_owned(),
    ];
    for id in &unusable {
        for via in [Via::Header, Via::Query] {
            let mut client = resubscribe(&app, id, via).await;
            assert_eq!(client.status, 200);
            let event = client.expect(SOON).await;
            assert_eq!(event.event, "snapshot", "{id:?} via {via:?}");
            assert_eq!(event.id, current, "{id:?} via {via:?}");
            assert_eq!(event.json(), document(8), "{id:?} via {via:?}");
            // And it continues live from there.
            drop(client);
        }
    }
    let mut client = resubscribe(&app, "garbage", Via::Header).await;
    let mut rebuilt = Rebuilt::default();
    rebuilt.apply(&client.expect(SOON).await);
    upstream.set(document(9));
    let event = client.expect(SOON).await;
    assert_eq!(event.id, format!("doc:{epoch}:9"));
    rebuilt.apply(&event);
    assert_eq!(rebuilt.document, Some(document(9)));
    app.stop().await;
}

#[tokio::test]
async fn an_id_from_before_a_restart_gets_a_snapshot() {
    let upstream = MockUpstream::start(document(1)).await;
    let first = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let mut client = first.subscribe("doc", &[]).await;
    let old = client.expect(SOON).await;
    assert!(old.id.ends_with(":1"));
    drop(client);
    first.stop().await;

    // The document changes while the proxy is down; the new process starts again at seq 1,
    // so only the epoch tells the old id from a current one.
    upstream.set(document(2));
    let second = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    second.wait_for_seq("doc", 1).await;
    for via in [Via::Header, Via::Query] {
        let mut client = resubscribe(&second, &old.id, via).await;
        let event = client.expect(SOON).await;
        assert_eq!(event.event, "snapshot", "{via:?}");
        assert_ne!(event.id, old.id, "a new process has a new epoch");
        assert!(event.id.ends_with(":1"));
        assert_eq!(event.json(), document(2));
    }
    second.stop().await;
}

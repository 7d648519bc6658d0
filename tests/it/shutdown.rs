//! Graceful shutdown in-process: cancelling the application's token ends every subscriber's
//! stream cleanly (gzip ones with a complete gzip member) and the application returns well
//! within its grace period.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn shutdown_ends_every_stream_and_returns_promptly() {
    let upstream = MockUpstream::start(json!({"n": 0, "pad": "x".repeat(100)})).await;
    let app = TestApp::from_toml(&format!(
        "[server]\nshutdown_grace = \"5s\"\n{}",
        polled("doc", &upstream.url())
    ))
    .await;

    let mut plain = Vec::new();
    for _ in 0..3 {
        let mut client = app.subscribe("doc", &[]).await;
        assert_eq!(client.expect(SOON).await.event, "snapshot");
        plain.push(client);
    }
    let mut gzip = SseClient::connect(&app.url("/streams/doc"), &[], true).await;
    assert_eq!(gzip.expect(SOON).await.event, "snapshot");
    upstream.set(json!({"n": 1, "pad": "x".repeat(100)}));
    for client in plain.iter_mut().chain([&mut gzip]) {
        assert_eq!(client.expect(SOON).await.event, "patch");
    }
    let addr = app.addr;

    let took = app.stop().await;
    // Had the streams not ended, the server would have waited out the 5 s grace period.
    assert!(
        took < Duration::from_secs(4),
        "shutdown took {took:?} with subscribers connected"
    );
    for (i, client) in plain.iter_mut().enumerate() {
        let rest = client
            .end(SOON)
            .await
            .unwrap_or_else(|e| panic!("subscriber {i}: {e}"));
        assert!(
            rest.is_empty(),
            "subscriber {i} got {rest:?} after the change"
        );
    }
    // reqwest checks the gzip trailer: a cut stream would be an error here.
    gzip.end(SOON).await.expect("the gzip stream ends cleanly");

    // Nobody listens any more.
    let refused = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "still answering after shutdown: {refused:?}"
    );
}

#[tokio::test]
async fn shutdown_with_a_hanging_poll_and_a_client_that_never_reads_still_returns() {
    // A poll hanging on the upstream and a subscriber that never reads must not hold the
    // application past its grace period.
    let upstream = MockUpstream::start(json!({"n": 0})).await;
    let app = TestApp::from_toml(&format!(
        "[server]\nshutdown_grace = \"1s\"\n{}timeout = \"30s\"\n",
        polled("doc", &upstream.url())
    ))
    .await;
    let mut client = app.subscribe("doc", &[]).await;
    client.expect(SOON).await;
    let _silent = app.subscribe_raw("doc", 4096).await;
    upstream.fail(Failure::Hang(Duration::from_secs(60)));
    let deadline = tokio::time::Instant::now() + SOON;
    while !upstream.received().iter().any(|r| r.failed) {
        assert!(tokio::time::Instant::now() < deadline, "no poll hung");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = app.stop().await;
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    client.end(SOON).await.expect("the stream ends cleanly");
}

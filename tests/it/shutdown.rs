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

/// Streams added by a reload are the application's like any other: at SIGTERM the real binary
/// stops their pollers (one polling fast, one with a poll hanging on its upstream) and waits
/// for them, exits 0 well within its grace period, and their upstreams see no poll after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pollers_a_reload_started_stop_at_shutdown() {
    use crate::support::process::Process;

    let first = MockUpstream::start(json!({"n": 0})).await;
    let fast = MockUpstream::start(json!({"n": 0})).await;
    let hanging = MockUpstream::start(json!({"n": 0})).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = |name: &str, url: &str| {
        format!(
            "[[streams]]\nname = \"{name}\"\nurl = \"{url}\"\ninterval = \"100ms\"\ntimeout = \"30s\"\n"
        )
    };
    let common = "[server]\nshutdown_grace = \"5s\"\n[upstream.default_rate_limit]\nper_second = 1000\nburst = 1000\n";
    let mut process = Process::start(
        dir.path(),
        &format!("{common}{}", stream("first", &first.url())),
    )
    .await;
    process.rewrite(&format!(
        "{common}{}{}{}",
        stream("first", &first.url()),
        stream("fast", &fast.url()),
        stream("hanging", &hanging.url())
    ));
    hanging.fail(Failure::Hang(Duration::from_secs(60)));
    process.hangup();
    process.logged("configuration reloaded", SOON).await;
    fast.wait_for_requests(3, SOON).await;
    let deadline = tokio::time::Instant::now() + SOON;
    while !hanging.received().iter().any(|r| r.failed) {
        assert!(tokio::time::Instant::now() < deadline, "no poll hung");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (status, took) = process.terminate(Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        process.log()
    );
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} (the grace period is 5 s)"
    );
    let log = process.log();
    assert!(log.contains("patchwire stopped"), "{log}");
    assert!(
        !log.contains("did not stop within the grace period"),
        "every task stopped by itself: {log}"
    );
    let (fast_polls, hanging_polls) = (fast.requests(), hanging.requests());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fast.requests(),
        fast_polls,
        "a poll after the process exited"
    );
    assert_eq!(
        hanging.requests(),
        hanging_polls,
        "a poll after the process exited"
    );
}

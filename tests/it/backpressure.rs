//! Subscribers that do not keep up: one that never reads is closed by the stall watchdog, one
//! that reads slowly is resynced with a snapshot, and healthy subscribers of the same stream
//! keep receiving every change on time throughout.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

/// Bytes of the part of the document that changes every time.
const CHANGING: usize = 256 * 1024;

/// A document whose every version differs from the last in a large string (so each change
/// carries about `CHANGING` bytes), next to an unchanging part large enough that the patch
/// (with its `op` and `path`) stays smaller than the document: changes are patches, and the
/// only snapshots a subscriber sees are its first and its resyncs.
fn document(n: usize) -> Value {
    let unit = format!("{n:08}-");
    json!({
        "n": n,
        "fixed": "f".repeat(200),
        "changing": unit.repeat(CHANGING / unit.len()),
    })
}

/// The largest send buffer the kernel may give the server's socket (Linux autotuning caps it
/// at the third value of `tcp_wmem`).
fn max_send_buffer() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

/// The app with `server` (TOML lines of its `[server]` table), polling the stream `big` as
/// often as a file may ask for.
async fn start(upstream: &MockUpstream, server: &str) -> TestApp {
    TestApp::from_toml(&format!(
        "[server]\n{server}\n{}max_body = \"8 MiB\"\n",
        polled("big", &upstream.url())
    ))
    .await
}

#[tokio::test]
async fn a_stalled_subscriber_is_closed_while_others_keep_up() {
    let upstream = MockUpstream::start(document(0)).await;
    let app = start(&upstream, "stall_timeout = \"1s\"\nsubscriber_buffer = 8").await;

    let mut healthy = app.subscribe("big", &[]).await;
    let mut rebuilt = Rebuilt::default();
    assert!(rebuilt.converge(&mut healthy, &document(0), SOON).await);
    // Sends its GET, then never reads.
    let stalled = app.subscribe_raw("big", 16 * 1024).await;
    app.wait_for_metric(r#"patchwire_subscribers{stream="big"}"#, 2.0, SOON)
        .await;

    // Publish large changes until the server gives up on the stalled socket. Every change
    // reaches the healthy subscriber within the usual bound all along.
    let limit = 4 * max_send_buffer() / CHANGING + 100;
    let mut n = 0;
    let started = tokio::time::Instant::now();
    loop {
        n += 1;
        assert!(
            n <= limit,
            "the stalled connection was not closed after {limit} changes of {CHANGING} bytes"
        );
        upstream.set(document(n));
        assert!(
            rebuilt.converge(&mut healthy, &document(n), SOON).await,
            "change {n}: the healthy subscriber fell behind"
        );
        if app.metric("patchwire_stalled_connections_total").await >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no stall detected within 60 s"
        );
    }
    // Its subscription is gone (and with it what the server held for it) ...
    let deadline = tokio::time::Instant::now() + SOON;
    while app.metric(r#"patchwire_subscribers{stream="big"}"#).await != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled subscription was not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and when it finally reads, it finds what was in flight, then the end.
    let drained = stalled.drain(Duration::from_secs(30)).await;
    assert!(
        drained.closed,
        "the server did not close the stalled socket: {drained:?}"
    );

    // The healthy subscriber carries on.
    for _ in 0..3 {
        n += 1;
        upstream.set(document(n));
        assert!(rebuilt.converge(&mut healthy, &document(n), SOON).await);
    }
    assert_eq!(
        rebuilt.snapshots, 1,
        "the healthy subscriber never needed a resync"
    );
    assert_eq!(app.metric("patchwire_stalled_connections_total").await, 1.0);
    app.stop().await;
}

#[tokio::test]
async fn a_slow_subscriber_is_resynced_with_a_snapshot_and_converges() {
    const BUFFER: usize = 4;
    let upstream = MockUpstream::start(document(0)).await;
    // A stall timeout long enough that the slow reader is never taken for a stalled one.
    let app = start(
        &upstream,
        &format!("subscriber_buffer = {BUFFER}\nstall_timeout = \"120s\""),
    )
    .await;

    let mut slow = app
        .subscribe_raw("big", 16 * 1024)
        .await
        .into_sse(SOON)
        .await;
    assert_eq!(slow.status, 200);
    let mut rebuilt = Rebuilt::default();
    assert!(rebuilt.converge(&mut slow, &document(0), SOON).await);

    // While it reads nothing, publish until its connection has stopped taking events (the
    // socket buffers are full: `events_sent` stops following the sequence) and more than its
    // buffer of changes has been published since.
    let limit = 4 * max_send_buffer() / CHANGING + 100;
    let mut n = 0;
    loop {
        n += 1;
        assert!(n <= limit, "the slow subscriber never fell behind");
        upstream.set(document(n));
        app.wait_for_seq("big", n as u64 + 1).await;
        let sent = app
            .metric(r#"patchwire_events_sent_total{stream="big"}"#)
            .await as usize;
        if n + 1 >= sent + BUFFER + 3 {
            break;
        }
    }

    // Now it reads: what was in flight, a snapshot of the current document, then it is live.
    // Patches never skip a sequence number: only a snapshot may jump ahead.
    let mut seq = rebuilt
        .last_id
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    let target = document(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rebuilt.document.as_ref() != Some(&target) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = slow
            .next(left)
            .await
            .expect("the slow subscriber did not converge");
        let at: u64 = event.id.rsplit(':').next().unwrap().parse().unwrap();
        match event.event.as_str() {
            "patch" => assert_eq!(at, seq + 1, "a gap before {event:?}"),
            "snapshot" => assert!(at > seq, "a stale snapshot {}", event.id),
            other => panic!("unexpected {other} event"),
        }
        seq = at;
        rebuilt.apply(&event);
    }
    assert_eq!(rebuilt.snapshots, 2, "one resync snapshot");
    assert!(
        rebuilt.patches < n,
        "it skipped the changes it lagged behind on"
    );
    assert_eq!(
        app.metric(r#"patchwire_subscriber_resyncs_total{stream="big"}"#)
            .await,
        1.0
    );
    for m in n + 1..n + 3 {
        upstream.set(document(m));
        assert!(rebuilt.converge(&mut slow, &document(m), SOON).await);
    }
    assert_eq!(rebuilt.snapshots, 2, "live again: patches only");
    app.stop().await;
}

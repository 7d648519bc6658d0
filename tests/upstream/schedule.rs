//! The poll loop: fixed-rate schedule, no overlap, shared quotas, prompt shutdown.

use std::sync::Arc;
use std::time::Duration;

use patchwire::upstream::LastOutcome;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{Behaviour, MockUpstream, harness, harness_with, limiter, rate, stream};

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test]
async fn polls_never_overlap_and_keep_a_fixed_rate() {
    // Each request takes 60ms of a 100ms interval: a fixed-delay loop would poll every
    // 160ms, a fixed-rate one every 100ms.
    let mock = MockUpstream::start(Behaviour {
        delay: Duration::from_millis(60),
        ..Behaviour::default()
    })
    .await;
    mock.set_json(&json!({"v": 1}));
    let h = harness(stream("s", mock.url("/feed")));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    mock.wait_for_requests(7).await;
    shutdown.cancel();
    task.await.expect("poller task ends cleanly");

    assert_eq!(mock.max_in_flight(), 1, "polls overlapped");
    let times: Vec<Instant> = mock.seen().iter().map(|s| s.at).collect();
    let gaps = gaps(&times);
    let min = gaps.iter().min().copied().unwrap_or_default();
    let total: Duration = gaps.iter().sum();
    let mean = total / u32::try_from(gaps.len()).unwrap_or(1);
    assert!(min >= Duration::from_millis(70), "polled early: {gaps:?}");
    assert!(
        mean <= Duration::from_millis(140),
        "not fixed-rate: {gaps:?}"
    );
    assert_eq!(h.recorder.documents(), 1);
}

#[tokio::test]
async fn missed_ticks_are_skipped_not_caught_up() {
    let mock = MockUpstream::start(Behaviour {
        delay: Duration::from_millis(230),
        ..Behaviour::default()
    })
    .await;
    let mut h = harness(stream("s", mock.url("/feed")));
    let before = Instant::now();
    let step = h.poller.poll_once().await;
    assert_eq!(step.outcome, LastOutcome::Changed);
    // Started at ~0, finished at ~230ms: the ticks at 100 and 200ms are skipped.
    assert!(step.next_due > Instant::now(), "would burst to catch up");
    assert!(step.next_due >= before + Duration::from_millis(300));
    assert!(step.next_due <= before + Duration::from_millis(370));
}

#[tokio::test]
async fn two_streams_of_one_host_share_one_quota() {
    let mock = MockUpstream::start(Behaviour::default()).await;
    // 5 requests per second, no burst: one request every 200ms across both streams.
    let shared = limiter(rate(5, 1));
    let mut a = harness_with(stream("a", mock.url("/a")), Arc::clone(&shared));
    let mut b = harness_with(stream("b", mock.url("/b")), Arc::clone(&shared));
    let started = Instant::now();
    a.poller.poll_once().await;
    b.poller.poll_once().await;
    a.poller.poll_once().await;
    b.poller.poll_once().await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(550), "{elapsed:?}");
    let seen = mock.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/a", "/b", "/a", "/b"]);
    let gaps = gaps(&seen.iter().map(|s| s.at).collect::<Vec<_>>());
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(150)),
        "{gaps:?}"
    );

    // Separate limiters do not slow each other down.
    let mut c = harness_with(stream("c", mock.url("/c")), limiter(rate(5, 1)));
    let mut d = harness_with(stream("d", mock.url("/d")), limiter(rate(5, 1)));
    let started = Instant::now();
    c.poller.poll_once().await;
    d.poller.poll_once().await;
    assert!(started.elapsed() < Duration::from_millis(180));
}

async fn assert_stops_promptly(task: tokio::task::JoinHandle<()>, shutdown: &CancellationToken) {
    let cancelled = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_millis(500), task)
        .await
        .expect("the poller stops within 500ms")
        .expect("the poller task ends cleanly");
    assert!(cancelled.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn shutdown_interrupts_a_request_in_flight() {
    let mock = MockUpstream::start(Behaviour {
        delay: Duration::from_secs(30),
        ..Behaviour::default()
    })
    .await;
    let mut settings = stream("s", mock.url("/feed"));
    settings.timeout = Duration::from_secs(60);
    let h = harness(settings);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    mock.wait_for_requests(1).await;
    assert_stops_promptly(task, &shutdown).await;
    assert!(h.recorder.events().is_empty());
}

#[tokio::test]
async fn shutdown_interrupts_the_sleep_between_polls() {
    let mock = MockUpstream::start(Behaviour::default()).await;
    let mut settings = stream("s", mock.url("/feed"));
    settings.interval = Duration::from_secs(60);
    let h = harness(settings);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    mock.wait_for_requests(1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_stops_promptly(task, &shutdown).await;
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test]
async fn shutdown_interrupts_the_wait_for_the_rate_limit() {
    let mock = MockUpstream::start(Behaviour::default()).await;
    let shared = limiter(rate(1, 1));
    // Another stream of the group just spent the quota: the next request waits ~1s.
    assert!(shared.check().is_ok());
    let h = harness_with(stream("s", mock.url("/feed")), shared);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_stops_promptly(task, &shutdown).await;
    assert!(mock.seen().is_empty(), "no request beyond the quota");
}

#[tokio::test]
async fn a_failing_stream_keeps_polling_with_backoff_and_recovers() {
    let mock = MockUpstream::start(Behaviour {
        status: 500,
        ..Behaviour::default()
    })
    .await;
    let h = harness(stream("s", mock.url("/feed")));
    let status = h.poller.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    // Backoff 100ms then 200ms: three requests after ~300ms.
    mock.wait_for_requests(3).await;
    let times: Vec<Instant> = mock.seen().iter().map(|s| s.at).collect();
    let gaps = gaps(&times);
    assert!(gaps[0] >= Duration::from_millis(90), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(190), "{gaps:?}");
    mock.set(|b| b.status = 200);
    mock.set_json(&json!({"up": true}));
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.recorder.documents() == 0 {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    task.await.expect("poller task ends cleanly");
    let events = h.recorder.events();
    let recovered = events
        .iter()
        .position(|e| *e == crate::support::Event::Recovered)
        .expect("recovered was reported");
    assert_eq!(
        events[recovered + 1],
        crate::support::Event::Document(json!({"up": true}))
    );
    assert_eq!(status.read().consecutive_failures, 0);
}

//! The poll loop: fixed-rate schedule, no overlap, shared quotas, prompt shutdown.

use std::sync::Arc;
use std::time::Duration;

use patchwire::upstream::LastOutcome;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::poller::{
    Event, ScriptedUpstream, harness, harness_with, limiter, paused_harness, rate, stream,
    tokio_limiter,
};
use crate::support::{Failure, MockUpstream, SOON};

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

// The schedule itself runs on tokio's paused clock against a scripted upstream: every gap
// below is exact, whatever else the machine is doing.

#[tokio::test(start_paused = true)]
async fn polls_never_overlap_and_keep_a_fixed_rate() {
    // Each request takes 60ms of a 100ms interval: a fixed-delay loop would poll every
    // 160ms, a fixed-rate one every 100ms.
    let upstream = ScriptedUpstream::new(Duration::from_millis(60), &json!({"v": 1}));
    let h = paused_harness(
        &scripted("s"),
        Arc::clone(&upstream),
        tokio_limiter(rate(1000, 1000)),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    upstream.wait_for_requests(7).await;
    shutdown.cancel();
    task.await.expect("poller task ends cleanly");

    assert_eq!(upstream.max_in_flight(), 1, "polls overlapped");
    let gaps = gaps(&upstream.starts());
    assert!(
        gaps.iter().all(|g| *g == Duration::from_millis(100)),
        "not fixed-rate: {gaps:?}"
    );
    assert_eq!(h.recorder.documents(), 1);
}

#[tokio::test(start_paused = true)]
async fn missed_ticks_are_skipped_not_caught_up() {
    let upstream = ScriptedUpstream::new(Duration::from_millis(230), &json!({"v": 1}));
    let mut h = paused_harness(&scripted("s"), upstream, tokio_limiter(rate(1000, 1000)));
    let before = Instant::now();
    let step = h.poller.poll_once().await;
    assert_eq!(step.outcome, LastOutcome::Changed);
    // Started at 0, finished at 230ms: the ticks at 100 and 200ms are skipped.
    assert_eq!(step.next_due, before + Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn two_streams_of_one_host_share_one_quota() {
    let upstream = ScriptedUpstream::new(Duration::ZERO, &json!({"v": 1}));
    // 5 requests per second, no burst: one request every 200ms across both streams.
    let shared = tokio_limiter(rate(5, 1));
    let mut a = paused_harness(&scripted("a"), Arc::clone(&upstream), Arc::clone(&shared));
    let mut b = paused_harness(&scripted("b"), Arc::clone(&upstream), Arc::clone(&shared));
    let started = Instant::now();
    a.poller.poll_once().await;
    b.poller.poll_once().await;
    a.poller.poll_once().await;
    b.poller.poll_once().await;
    assert_eq!(started.elapsed(), Duration::from_millis(600));
    let gaps = gaps(&upstream.starts());
    assert!(
        gaps.iter().all(|g| *g == Duration::from_millis(200)),
        "{gaps:?}"
    );

    // Separate limiters do not slow each other down.
    let other = ScriptedUpstream::new(Duration::ZERO, &json!({"v": 1}));
    let mut c = paused_harness(
        &scripted("c"),
        Arc::clone(&other),
        tokio_limiter(rate(5, 1)),
    );
    let mut d = paused_harness(
        &scripted("d"),
        Arc::clone(&other),
        tokio_limiter(rate(5, 1)),
    );
    let started = Instant::now();
    c.poller.poll_once().await;
    d.poller.poll_once().await;
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_failing_stream_keeps_polling_with_backoff_and_recovers() {
    let upstream = ScriptedUpstream::new(Duration::ZERO, &json!({"up": false}));
    upstream.set_status(500);
    let h = paused_harness(
        &scripted("s"),
        Arc::clone(&upstream),
        tokio_limiter(rate(1000, 1000)),
    );
    let status = h.poller.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    // Backoff without jitter: 100ms, 200ms, 400ms.
    upstream.wait_for_requests(4).await;
    assert_eq!(
        gaps(&upstream.starts()),
        [100, 200, 400].map(Duration::from_millis)
    );
    upstream.set_status(200);
    upstream.set_body(&json!({"up": true}));
    upstream.wait_for_requests(5).await;
    while h.recorder.documents() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    shutdown.cancel();
    task.await.expect("poller task ends cleanly");
    let events = h.recorder.events();
    let recovered = events
        .iter()
        .position(|e| *e == Event::Recovered)
        .expect("recovered was reported");
    assert_eq!(events[recovered + 1], Event::Document(json!({"up": true})));
    assert_eq!(status.read().consecutive_failures, 0);
}

/// A stream `name` of a scripted upstream, which is never contacted over the network: the URL
/// only names the stream's rate-limit group.
fn scripted(name: &str) -> String {
    stream(name, "http://upstream.test/feed", "")
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
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::Hang(Duration::from_secs(30)));
    let h = harness(&stream("s", &mock.url_at("/feed"), "timeout = \"60s\""));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    mock.wait_for_requests(0, SOON).await;
    assert_stops_promptly(task, &shutdown).await;
    assert!(h.recorder.events().is_empty());
}

#[tokio::test]
async fn shutdown_interrupts_the_sleep_between_polls() {
    let mock = MockUpstream::start(json!({})).await;
    let h = harness(&stream("s", &mock.url_at("/feed"), "interval = \"60s\""));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    mock.wait_for_requests(0, SOON).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_stops_promptly(task, &shutdown).await;
    assert_eq!(mock.requests(), 1);
}

#[tokio::test]
async fn shutdown_interrupts_the_wait_for_the_rate_limit() {
    let mock = MockUpstream::start(json!({})).await;
    let shared = limiter(rate(1, 1));
    // Another stream of the group just spent the quota: the next request waits ~1s.
    assert!(shared.check().is_ok());
    let h = harness_with(&stream("s", &mock.url_at("/feed"), ""), shared);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_stops_promptly(task, &shutdown).await;
    assert_eq!(mock.requests(), 0, "no request beyond the quota");
}

/// A stream `name` of a scripted upstream polled every hour.
fn hourly(name: &str) -> String {
    stream(name, "http://upstream.test/feed", "interval = \"1h\"")
}

#[tokio::test(start_paused = true)]
async fn a_poll_asked_for_starts_at_once_and_the_schedule_goes_on() {
    let upstream = ScriptedUpstream::new(Duration::ZERO, &json!({"v": 1}));
    let h = paused_harness(
        &hourly("s"),
        Arc::clone(&upstream),
        tokio_limiter(rate(1000, 1000)),
    );
    let control = h.poller.control();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    upstream.wait_for_requests(1).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let asked = Instant::now();
    control.poll_now().expect("the quota allows it");
    upstream.wait_for_requests(2).await;
    assert_eq!(upstream.starts()[1], asked, "polled when asked");
    // The hourly schedule goes on from the poll asked for.
    tokio::time::sleep(Duration::from_secs(3601)).await;
    let starts = upstream.starts();
    assert_eq!(starts.len(), 3);
    assert_eq!(starts[2], asked + Duration::from_secs(3600));
    shutdown.cancel();
    task.await.expect("poller task ends cleanly");
}

#[tokio::test(start_paused = true)]
async fn a_poll_asked_for_is_refused_past_the_quota_and_takes_no_second_token() {
    let upstream = ScriptedUpstream::new(Duration::ZERO, &json!({"v": 1}));
    // One request a second, no burst.
    let h = paused_harness(
        &hourly("s"),
        Arc::clone(&upstream),
        tokio_limiter(rate(1, 1)),
    );
    let control = h.poller.control();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    upstream.wait_for_requests(1).await;
    let wait = control
        .poll_now()
        .expect_err("the first poll took the quota");
    // governor counts in nanoseconds of its own clock: within a millisecond of a second.
    assert!(
        wait > Duration::from_millis(998) && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    control.poll_now().expect("a second later it allows one");
    upstream.wait_for_requests(2).await;
    // The ask took the token: the poll did not wait for another one (a second more).
    let second = upstream.starts()[1] - started;
    assert!(second < Duration::from_millis(1010), "{second:?}");
    assert!(control.poll_now().is_err(), "and the quota is spent again");
    shutdown.cancel();
    task.await.expect("poller task ends cleanly");
}

#[tokio::test(start_paused = true)]
async fn a_new_interval_applies_from_the_last_poll() {
    let upstream = ScriptedUpstream::new(Duration::ZERO, &json!({"v": 1}));
    let h = paused_harness(
        &hourly("s"),
        Arc::clone(&upstream),
        tokio_limiter(rate(1000, 1000)),
    );
    let control = h.poller.control();
    let mut settings = patchwire::config::validate(
        patchwire::config::parse_raw(
            &crate::support::over(
                "",
                &stream("s", "http://upstream.test/feed", "interval = \"5s\""),
            ),
            patchwire::config::FileKind::Toml,
            None,
            Vec::new(),
        )
        .expect("parses"),
        None,
        &|_| None,
    )
    .expect("valid");
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(h.poller.run(shutdown.clone()));
    upstream.wait_for_requests(1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    control.reconfigure(
        Arc::new(settings.streams.remove(0)),
        tokio_limiter(rate(1000, 1000)),
    );
    upstream.wait_for_requests(3).await;
    let starts: Vec<Duration> = upstream.starts().iter().map(|s| *s - started).collect();
    assert_eq!(
        starts,
        [
            Duration::ZERO,
            Duration::from_secs(5),
            Duration::from_secs(10)
        ]
    );
    shutdown.cancel();
    task.await.expect("poller task ends cleanly");
}

//! `Poller::poll_once` step by step: what is published, what is skipped, failures, recovery.

use std::time::{Duration, SystemTime};

use patchwire::upstream::LastOutcome;
use serde_json::json;
use tokio::time::Instant;

use crate::support::poller::{Event, harness, stream};
use crate::support::{Failure, MockUpstream, free_port};

/// The mock serving `doc` without validators: every poll downloads it.
async fn unconditional(doc: serde_json::Value) -> MockUpstream {
    let mock = MockUpstream::start(doc).await;
    mock.validators(false, false);
    mock
}

#[tokio::test]
async fn etag_makes_the_next_poll_conditional_and_304_publishes_nothing() {
    let mock = MockUpstream::start(json!({"v": 1})).await;
    mock.validators(true, false);
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));

    let step = h.poller.poll_once().await;
    assert_eq!(step.outcome, LastOutcome::Changed);
    assert_eq!(h.recorder.events(), vec![Event::Document(json!({"v": 1}))]);

    let step = h.poller.poll_once().await;
    assert_eq!(step.outcome, LastOutcome::NotModified);
    assert_eq!(mock.last_received().header("if-none-match"), Some("\"v1\""));
    assert_eq!(h.recorder.documents(), 1, "a 304 is not published");

    // A new document, served with the ETag "v2".
    mock.set(json!({"v": 2}));
    let step = h.poller.poll_once().await;
    assert_eq!(step.outcome, LastOutcome::Changed);
    assert_eq!(
        h.recorder.events().last(),
        Some(&Event::Document(json!({"v": 2})))
    );
    let step = h.poller.poll_once().await;
    assert_eq!(step.outcome, LastOutcome::NotModified);
    assert_eq!(mock.last_received().header("if-none-match"), Some("\"v2\""));

    let metrics = h.metrics.encode();
    assert!(
        metrics.contains(r#"patchwire_polls_total{stream="s",outcome="Changed"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"patchwire_polls_total{stream="s",outcome="NotModified"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"patchwire_upstream_latency_seconds_count{stream="s"} 4"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn last_modified_makes_the_next_poll_conditional() {
    let mock = MockUpstream::start(json!({"v": 1})).await;
    mock.validators(false, true);
    let date = mock.last_modified();
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    assert_eq!(h.poller.poll_once().await.outcome, LastOutcome::Changed);
    assert_eq!(mock.last_received().header("if-modified-since"), None);
    assert_eq!(h.poller.poll_once().await.outcome, LastOutcome::NotModified);
    assert_eq!(
        mock.last_received().header("if-modified-since"),
        Some(date.as_str())
    );
    assert_eq!(h.recorder.documents(), 1);
}

#[tokio::test]
async fn a_byte_identical_body_is_not_published() {
    let mock = unconditional(json!({"v": 1})).await;
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    assert_eq!(h.poller.poll_once().await.outcome, LastOutcome::Changed);
    assert_eq!(h.poller.poll_once().await.outcome, LastOutcome::Unchanged);
    assert_eq!(
        h.recorder.documents(),
        1,
        "identical bytes skip decode and diff"
    );

    // Different bytes, same document: decoded and handed to the hub, which finds no change.
    mock.set_raw_body(b"{ \"v\" : 1 }");
    assert_eq!(h.poller.poll_once().await.outcome, LastOutcome::Unchanged);
    assert_eq!(h.recorder.documents(), 2);
}

/// What a test does to the mock upstream to break it.
type Breakage = fn(&MockUpstream);

/// One good poll, then `breakage` to the mock, then one failing poll (a 200 ms timeout, a
/// 1 KiB cap).
async fn failing_poll(breakage: Breakage, url_path: &str) -> (Event, LastOutcome) {
    let mock = unconditional(json!({"v": 1})).await;
    let mut h = harness(&stream(
        "s",
        &mock.url_at(url_path),
        "timeout = \"200ms\"\nmax_body = \"1 KiB\"",
    ));
    assert_eq!(h.poller.poll_once().await.outcome, LastOutcome::Changed);
    breakage(&mock);
    let step = h.poller.poll_once().await;
    assert_eq!(h.recorder.documents(), 1, "a failure publishes no document");
    (h.recorder.last_failure(), step.outcome)
}

fn failure_status(event: &Event) -> u16 {
    match event {
        Event::Failure { status, .. } => *status,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn every_kind_of_failure_is_reported_with_its_status() {
    let cases: Vec<(&str, Breakage, u16)> = vec![
        ("404", |m| m.fail(Failure::Status(404, None)), 404),
        ("500", |m| m.fail(Failure::Status(500, None)), 500),
        ("invalid JSON", |m| m.set_raw_body(b"{\"v\": "), 502),
        (
            "timeout",
            |m| m.fail(Failure::Hang(Duration::from_secs(5))),
            504,
        ),
        (
            "too large, chunked",
            |m| {
                m.fail(Failure::ChunkedThenHang {
                    chunk: 600,
                    chunks: 2,
                })
            },
            502,
        ),
        (
            "too large, Content-Length",
            |m| m.fail(Failure::LyingLength { length: 5000 }),
            502,
        ),
    ];
    for (name, breakage, expected) in cases {
        let (event, outcome) = failing_poll(breakage, "/feed").await;
        assert_eq!(failure_status(&event), expected, "{name}: {event:?}");
        match outcome {
            LastOutcome::Failed { status, message } => {
                assert_eq!(status, expected, "{name}");
                assert!(message.contains("/feed"), "{name}: {message}");
            }
            other => panic!("{name}: expected a failure, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn invalid_json_names_the_url_and_position() {
    let (event, _) = failing_poll(|m| m.set_raw_body(b"{\"v\": tru"), "/feed").await;
    let Event::Failure { message, .. } = event else {
        panic!("expected a failure");
    };
    assert!(message.contains("/feed"), "{message}");
    assert!(message.contains("invalid JSON at line 1"), "{message}");
}

#[tokio::test]
async fn connection_refused_is_a_502_failure() {
    let url = format!("http://127.0.0.1:{}/feed", free_port());
    let mut h = harness(&stream("s", &url, ""));
    let step = h.poller.poll_once().await;
    assert!(matches!(
        step.outcome,
        LastOutcome::Failed { status: 502, .. }
    ));
    assert_eq!(failure_status(&h.recorder.last_failure()), 502);
}

#[tokio::test]
async fn backoff_delays_grow_with_consecutive_failures() {
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::Status(500, None));
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    let mut delays = Vec::new();
    for _ in 0..4 {
        let before = Instant::now();
        let step = h.poller.poll_once().await;
        let after = Instant::now();
        let Event::Failure { retry_in, .. } = h.recorder.last_failure() else {
            unreachable!("last_failure returns failures");
        };
        // The next poll is due retry_in after the failure, not after one interval.
        assert!(step.next_due >= before + retry_in && step.next_due <= after + retry_in);
        delays.push(retry_in);
    }
    let expected: Vec<_> = [100, 200, 400, 800]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    assert_eq!(delays, expected);
    let report = h.poller.status().read();
    assert_eq!(report.consecutive_failures, 4);
    assert_eq!(report.upstream_requests, 4);
    assert!(matches!(
        report.last_outcome,
        Some(LastOutcome::Failed { status: 500, .. })
    ));
}

#[tokio::test]
async fn retry_after_in_seconds_is_honoured_on_429() {
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::Status(429, Some("3".into())));
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    let before = Instant::now();
    let step = h.poller.poll_once().await;
    let Event::Failure {
        status,
        retry_in,
        retry_after,
        ..
    } = h.recorder.last_failure()
    else {
        unreachable!("last_failure returns failures");
    };
    assert_eq!(status, 429);
    assert_eq!(retry_after, Some(Duration::from_secs(3)));
    assert_eq!(retry_in, Duration::from_secs(3), "not the 100ms backoff");
    assert!(step.next_due >= before + Duration::from_secs(3));
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured_on_503() {
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::Status(
        503,
        Some(httpdate::fmt_http_date(
            SystemTime::now() + Duration::from_secs(6),
        )),
    ));
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    h.poller.poll_once().await;
    let Event::Failure { retry_in, .. } = h.recorder.last_failure() else {
        unreachable!("last_failure returns failures");
    };
    // HTTP dates have one-second resolution.
    assert!(
        retry_in > Duration::from_secs(4) && retry_in <= Duration::from_secs(6),
        "{retry_in:?}"
    );
}

#[tokio::test]
async fn retry_after_is_capped_and_ignored_on_other_statuses() {
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::Status(503, Some("86400".into())));
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    h.poller.poll_once().await;
    let Event::Failure { retry_in, .. } = h.recorder.last_failure() else {
        unreachable!("last_failure returns failures");
    };
    assert_eq!(
        retry_in,
        Duration::from_secs(10),
        "capped at max_retry_after"
    );

    // The same Retry-After on a 500 is not honoured.
    mock.fail(Failure::Status(500, Some("86400".into())));
    h.poller.poll_once().await;
    let Event::Failure { retry_in, .. } = h.recorder.last_failure() else {
        unreachable!("last_failure returns failures");
    };
    assert_eq!(
        retry_in,
        Duration::from_millis(200),
        "plain backoff on a 500"
    );
}

#[tokio::test]
async fn recovery_reports_recovered_then_the_changed_document() {
    let mock = unconditional(json!({"v": 1})).await;
    let interval = Duration::from_millis(100);
    let mut h = harness(&stream("s", &mock.url_at("/feed"), "interval = \"100ms\""));
    h.poller.poll_once().await;
    mock.fail(Failure::Status(500, None));
    h.poller.poll_once().await;
    h.poller.poll_once().await;
    mock.recover();
    mock.set(json!({"v": 2}));
    let before = Instant::now();
    let step = h.poller.poll_once().await;
    assert!(step.recovered);
    assert_eq!(step.outcome, LastOutcome::Changed);
    // Back on the normal schedule.
    assert!(step.next_due <= before + interval + Duration::from_millis(50));
    let events = h.recorder.events();
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(events[0], Event::Document(json!({"v": 1})));
    assert!(matches!(events[1], Event::Failure { status: 500, .. }));
    assert!(matches!(events[2], Event::Failure { status: 500, .. }));
    assert_eq!(events[3], Event::Recovered);
    assert_eq!(events[4], Event::Document(json!({"v": 2})));
    assert_eq!(h.poller.status().read().consecutive_failures, 0);

    // The next failure starts the backoff from the beginning.
    mock.fail(Failure::Status(500, None));
    h.poller.poll_once().await;
    let Event::Failure { retry_in, .. } = h.recorder.last_failure() else {
        unreachable!("last_failure returns failures");
    };
    assert_eq!(retry_in, Duration::from_millis(100));
}

#[tokio::test]
async fn recovery_with_an_identical_body_reports_recovered_only() {
    let mock = unconditional(json!({"v": 1})).await;
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    h.poller.poll_once().await;
    mock.fail(Failure::Status(502, None));
    h.poller.poll_once().await;
    mock.recover();
    let step = h.poller.poll_once().await;
    assert!(step.recovered);
    assert_eq!(step.outcome, LastOutcome::Unchanged);
    let events = h.recorder.events();
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[2], Event::Recovered);
}

#[tokio::test]
async fn recovery_with_a_304_reports_recovered_only() {
    let mock = MockUpstream::start(json!({"v": 1})).await;
    mock.validators(true, false);
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    h.poller.poll_once().await;
    mock.fail(Failure::Status(500, None));
    h.poller.poll_once().await;
    mock.recover();
    let step = h.poller.poll_once().await;
    assert_eq!(step.outcome, LastOutcome::NotModified);
    assert!(step.recovered);
    assert_eq!(h.recorder.events().last(), Some(&Event::Recovered));
    assert_eq!(h.recorder.documents(), 1);
}

#[tokio::test]
async fn validators_of_a_failed_response_are_not_kept() {
    let mock = MockUpstream::start_with_body(b"not json").await;
    mock.validators(true, false);
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    let step = h.poller.poll_once().await;
    assert!(matches!(
        step.outcome,
        LastOutcome::Failed { status: 502, .. }
    ));
    // A kept etag would be sent back: from an upstream whose ETag does not follow its body,
    // the stream would get 304 and never recover.
    mock.set(json!({"fixed": true}));
    let step = h.poller.poll_once().await;
    assert_eq!(mock.last_received().header("if-none-match"), None);
    assert_eq!(step.outcome, LastOutcome::Changed);
    assert!(step.recovered);
    assert_eq!(
        h.recorder.events().last(),
        Some(&Event::Document(json!({"fixed": true})))
    );
}

#[tokio::test]
async fn gzip_encoded_upstream_bodies_are_decoded() {
    let mock = MockUpstream::start(json!({"vehicles": [{"id": "a"}, {"id": "b"}]})).await;
    mock.gzip(true);
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    assert_eq!(h.poller.poll_once().await.outcome, LastOutcome::Changed);
    assert_eq!(
        h.recorder.events(),
        vec![Event::Document(
            json!({"vehicles": [{"id": "a"}, {"id": "b"}]})
        )]
    );
}

#[tokio::test]
async fn status_reports_the_last_poll() {
    let mock = unconditional(json!({"v": 1})).await;
    let mut h = harness(&stream("s", &mock.url_at("/feed"), ""));
    let status = h.poller.status();
    assert_eq!(status.read().upstream_requests, 0);
    assert_eq!(status.read().last_outcome, None);
    let before = SystemTime::now();
    h.poller.poll_once().await;
    h.poller.poll_once().await;
    let report = status.read();
    assert_eq!(report.upstream_requests, 2);
    assert_eq!(report.last_outcome, Some(LastOutcome::Unchanged));
    assert_eq!(report.consecutive_failures, 0);
    let started = report.last_poll_started.expect("a poll started");
    assert!(started >= before);
    let due = report.next_poll_due.expect("a poll is due");
    assert!(due > started && due <= started + Duration::from_millis(200));
}

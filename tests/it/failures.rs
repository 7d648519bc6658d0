//! Upstream failures of every kind: subscribers get `error` events carrying
//! `{status, message, timestamp, retry_in_ms}`, the last good snapshot stays current (for new
//! subscribers and the JSON view), retries back off, `Retry-After` is honoured on 429/503, and
//! the first good poll pushes exactly the change that happened meanwhile.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

/// The test config's backoff: 100 ms doubling up to 800 ms, no jitter.
const BACKOFF_MS: [u64; 5] = [100, 200, 400, 800, 800];

fn document(n: u64) -> Value {
    json!({
        "n": n,
        "entities": (0..10)
            .map(|i| json!({"id": format!("e{i}"), "value": if i == 3 { n } else { i }}))
            .collect::<Vec<_>>(),
    })
}

/// How to make the upstream fail, and how to make it behave again.
enum Breakage {
    /// Inject this failure into the mock.
    Inject(Failure),
    /// Stop listening: connections are refused.
    Down,
}

impl Breakage {
    async fn apply(&self, upstream: &MockUpstream) {
        match self {
            Breakage::Inject(f) => upstream.fail(f.clone()),
            Breakage::Down => upstream.go_down().await,
        }
    }

    async fn repair(&self, upstream: &MockUpstream) {
        match self {
            Breakage::Inject(_) => upstream.recover(),
            Breakage::Down => upstream.come_back().await,
        }
    }
}

/// Checks an `error` event's shape and returns its body.
fn check_error_event(
    event: &SseEvent,
    id: &str,
    status: u16,
    cause: &str,
    message_has: &str,
) -> Value {
    assert_eq!(event.event, "error", "{event:?}");
    assert_eq!(
        event.id, id,
        "an error keeps the id of the last good document"
    );
    let body = event.json();
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["status", "message", "cause", "timestamp", "retry_in_ms"],
        "{body}"
    );
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["cause"], cause, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("GET http://127.0.0.1:"), "{message}");
    assert!(
        message.to_lowercase().contains(&message_has.to_lowercase()),
        "{message:?} should mention {message_has:?}"
    );
    httpdate::parse_http_date(body["timestamp"].as_str().unwrap()).expect("an HTTP date");
    assert!(body["retry_in_ms"].is_u64(), "{body}");
    body
}

/// The whole failure story for one kind of failure.
async fn fails_then_recovers(
    breakage: Breakage,
    status: u16,
    cause: &str,
    message_has: &str,
    timeout: &str,
) {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&format!(
        "{}timeout = \"{timeout}\"\n",
        polled("doc", &upstream.url())
    ))
    .await;
    let mut client = app.subscribe("doc", &[]).await;
    let mut rebuilt = Rebuilt::default();
    let first = client.expect(SOON).await;
    rebuilt.apply(&first);
    let good_id = first.id.clone();
    assert_eq!(rebuilt.document, Some(document(1)));

    breakage.apply(&upstream).await;
    // The document changes while the upstream cannot deliver it.
    upstream.set(document(2));

    // Consecutive failures back off: 100, 200, 400, 800 ms; nothing but errors arrives.
    let mut delays = Vec::new();
    for _ in 0..4 {
        let event = client.expect(SOON).await;
        let body = check_error_event(&event, &good_id, status, cause, message_has);
        delays.push(body["retry_in_ms"].as_u64().unwrap());
        rebuilt.apply(&event);
    }
    assert_eq!(delays, BACKOFF_MS[..4], "retry delays");
    assert_eq!(
        rebuilt.document,
        Some(document(1)),
        "the last snapshot stays"
    );

    // The upstream saw the retries no sooner than announced (a lower bound: a loaded
    // machine only makes gaps longer).
    let failed: Vec<_> = upstream
        .received()
        .into_iter()
        .filter(|r| r.failed)
        .collect();
    if !matches!(breakage, Breakage::Down) {
        assert!(failed.len() >= 4, "{} failed requests", failed.len());
        for (i, pair) in failed.windows(2).take(3).enumerate() {
            let gap = pair[1].at.duration_since(pair[0].at);
            let least = Duration::from_millis(BACKOFF_MS[i] - 5);
            assert!(
                gap >= least,
                "retry {} came {gap:?} after the failure, before the backoff of {least:?}",
                i + 1
            );
        }
    } else {
        assert!(failed.is_empty());
    }
    let listing = app.listing("doc").await;
    assert!(
        listing["upstream"]["consecutive_failures"]
            .as_u64()
            .unwrap()
            >= 4
    );
    assert_eq!(listing["failing"]["status"], status, "{listing}");
    assert_eq!(listing["upstream"]["last_outcome"]["result"], "error");
    assert!(
        app.metric(r#"patchwire_polls_total{stream="doc",outcome="Error""#)
            .await
            >= 4.0
    );

    // Meanwhile the last good document is what everyone gets.
    let (code, body) = app.json_view("doc").await;
    assert_eq!((code, body), (200, document(1)));
    let mut late = app.subscribe("doc", &[]).await;
    let snapshot = late.expect(SOON).await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.id, good_id);
    assert_eq!(snapshot.json(), document(1));
    let current = late.expect(SOON).await;
    check_error_event(&current, &good_id, status, cause, message_has);

    // Recovery is told, then pushes the change that happened meanwhile, as a patch after
    // the last id.
    breakage.repair(&upstream).await;
    let mut patch = None;
    let mut recovered = None;
    while patch.is_none() {
        let event = client.expect(SOON).await;
        match event.event.as_str() {
            "error" if recovered.is_none() => {
                check_error_event(&event, &good_id, status, cause, message_has);
            }
            "recovered" if recovered.is_none() => recovered = Some(event),
            "patch" if recovered.is_some() => patch = Some(event),
            _ => panic!("expected errors, `recovered`, then the patch: {event:?}"),
        }
    }
    let recovered = recovered.unwrap();
    assert_eq!(recovered.id, good_id);
    assert!(
        recovered.json()["failures"].as_u64().unwrap() >= 4,
        "{recovered:?}"
    );
    let patch = patch.unwrap();
    let (stream, seq) = good_id.rsplit_once(':').unwrap();
    assert_eq!(
        patch.id,
        format!("{stream}:{}", seq.parse::<u64>().unwrap() + 1)
    );
    rebuilt.apply(&patch);
    assert_eq!(rebuilt.document, Some(document(2)));
    assert_eq!(rebuilt.snapshots, 1);
    let mut late_rebuilt = Rebuilt::default();
    late_rebuilt.apply(&snapshot);
    assert!(late_rebuilt.converge(&mut late, &document(2), SOON).await);
    let listing = app.listing("doc").await;
    assert_eq!(listing["failing"], Value::Null, "{listing}");
    assert_eq!(listing["upstream"]["consecutive_failures"], 0);
    assert_eq!(app.json_view("doc").await, (200, document(2)));
    app.stop().await;
}

/// The stream's `timeout`, unless the test is about timeouts.
const TIMEOUT: &str = "2s";

#[tokio::test]
async fn server_errors() {
    fails_then_recovers(
        Breakage::Inject(Failure::Status(500, None)),
        500,
        "upstream-status",
        "HTTP 500",
        TIMEOUT,
    )
    .await;
}

#[tokio::test]
async fn client_errors() {
    fails_then_recovers(
        Breakage::Inject(Failure::Status(404, None)),
        404,
        "upstream-status",
        "HTTP 404",
        TIMEOUT,
    )
    .await;
}

#[tokio::test]
async fn timeouts() {
    fails_then_recovers(
        Breakage::Inject(Failure::Hang(Duration::from_secs(30))),
        504,
        "upstream-timeout",
        "timeout",
        "300ms",
    )
    .await;
}

#[tokio::test]
async fn refused_connections() {
    fails_then_recovers(
        Breakage::Down,
        502,
        "upstream-unavailable",
        "no response",
        TIMEOUT,
    )
    .await;
}

#[tokio::test]
async fn invalid_json() {
    fails_then_recovers(
        Breakage::Inject(Failure::InvalidJson),
        502,
        "upstream-invalid",
        "not a valid document",
        TIMEOUT,
    )
    .await;
}

#[tokio::test]
async fn bodies_over_the_cap() {
    // The stream's cap is 1 MiB; the body is streamed without a Content-Length.
    fails_then_recovers(
        Breakage::Inject(Failure::Oversize(2 << 20)),
        502,
        "upstream-unavailable",
        "max_body_bytes",
        TIMEOUT,
    )
    .await;
}

/// Subscribes to a fresh app on a failing upstream and returns the first error's body and
/// the gap the upstream saw between the first two failed requests (if `gaps`).
async fn first_errors(failure: Failure, errors: usize) -> (Vec<u64>, Vec<Duration>) {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let mut client = app.subscribe("doc", &[]).await;
    let first = client.expect(SOON).await;
    upstream.fail(failure);
    let mut delays = Vec::new();
    for _ in 0..errors {
        let event = client.expect(Duration::from_secs(10)).await;
        let body = check_error_event(
            &event,
            &first.id,
            event.json()["status"].as_u64().unwrap() as u16,
            "upstream-status",
            "HTTP",
        );
        delays.push(body["retry_in_ms"].as_u64().unwrap());
    }
    let failed: Vec<_> = upstream
        .received()
        .into_iter()
        .filter(|r| r.failed)
        .collect();
    let gaps = failed
        .windows(2)
        .map(|p| p[1].at.duration_since(p[0].at))
        .collect();
    app.stop().await;
    (delays, gaps)
}

#[tokio::test]
async fn retry_after_seconds_on_429_is_honoured() {
    let (delays, gaps) = first_errors(Failure::Status(429, Some("1".into())), 2).await;
    // Longer than the backoff (100, 200 ms): the upstream's wish wins.
    assert_eq!(delays, [1000, 1000]);
    assert!(!gaps.is_empty());
    assert!(
        gaps[0] >= Duration::from_millis(995),
        "retried after {:?} despite Retry-After: 1",
        gaps[0]
    );
}

#[tokio::test]
async fn retry_after_date_on_503_is_honoured() {
    let at = std::time::SystemTime::now() + Duration::from_secs(3);
    let (delays, gaps) =
        first_errors(Failure::Status(503, Some(httpdate::fmt_http_date(at))), 2).await;
    // An HTTP date has whole seconds, and the poll comes a little after the date was set: the
    // delay is up to 3 s, and far more than the backoff of 100 ms.
    assert!(
        (500..=3000).contains(&delays[0]),
        "retry in {} ms for a date about 3 s ahead",
        delays[0]
    );
    assert!(gaps[0] >= Duration::from_millis(delays[0] - 5), "{gaps:?}");
}

#[tokio::test]
async fn retry_after_is_capped_and_ignored_on_other_statuses() {
    // max_retry_after is 5 s in the test config.
    let (delays, _) = first_errors(Failure::Status(503, Some("3600".into())), 1).await;
    assert_eq!(delays, [5000]);
    // Retry-After on a 500 is not an instruction: plain backoff.
    let (delays, _) = first_errors(Failure::Status(500, Some("30".into())), 3).await;
    assert_eq!(delays, [100, 200, 400]);
}

#[tokio::test]
async fn a_stream_that_never_had_a_document_reports_errors_and_503() {
    let upstream = MockUpstream::start(document(1)).await;
    upstream.fail(Failure::Status(502, None));
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let mut client = app.subscribe("doc", &[]).await;
    let event = client.expect(SOON).await;
    assert_eq!(event.event, "error");
    assert_eq!(event.json()["status"], 502);
    let (code, body) = app.json_view("doc").await;
    assert_eq!(code, 503, "{body}");
    upstream.recover();
    let mut rebuilt = Rebuilt::default();
    rebuilt.apply(&event);
    assert!(rebuilt.converge(&mut client, &document(1), SOON).await);
    assert_eq!(rebuilt.snapshots, 1, "the first document is a snapshot");
    app.stop().await;
}

#[tokio::test]
async fn recovery_with_an_unchanged_document_is_told_to_those_who_saw_the_error() {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let mut client = app.subscribe("doc", &[]).await;
    let first = client.expect(SOON).await;
    assert_eq!(first.event, "snapshot");

    upstream.fail(Failure::Status(500, None));
    let error = client.expect(SOON).await;
    check_error_event(&error, &first.id, 500, "upstream-status", "HTTP 500");
    let failed_at = httpdate::parse_http_date(error.json()["timestamp"].as_str().unwrap()).unwrap();
    // The document does not change: the recovery publishes nothing, yet it is told.
    upstream.recover();
    let mut failures = 1;
    let recovered = loop {
        let event = client.expect(SOON).await;
        match event.event.as_str() {
            "error" => failures += 1,
            "recovered" => break event,
            _ => panic!("expected errors, then `recovered`: {event:?}"),
        }
    };
    assert_eq!(recovered.id, first.id, "the document did not change");
    let body = recovered.json();
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["since", "failures", "timestamp"], "{body}");
    assert_eq!(body["failures"], failures, "{body}");
    assert_eq!(
        httpdate::parse_http_date(body["since"].as_str().unwrap()).unwrap(),
        failed_at,
        "since the first error"
    );
    let listing = app.listing("doc").await;
    assert_eq!(listing["failing"], Value::Null, "{listing}");
    // The poller records its outcome just after it told the stream.
    let deadline = tokio::time::Instant::now() + SOON;
    while app.listing("doc").await["upstream"]["consecutive_failures"] != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listing still counts failures"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing else follows (no patch: the document is the same), and a newcomer is told
    // nothing of failures that ended before it came.
    assert!(client.next(Duration::from_millis(400)).await.is_none());
    let mut late = app.subscribe("doc", &[]).await;
    assert_eq!(late.expect(SOON).await.event, "snapshot");
    assert!(late.next(Duration::from_millis(300)).await.is_none());
    app.stop().await;
}

/// An upstream document nested deeper than patchwire holds is a failed poll like any other:
/// an `error` event naming the bound, the last good snapshot stays, the server stays up.
#[tokio::test]
async fn an_upstream_document_too_deep_is_an_error_and_the_stream_goes_on() {
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let mut client = app.subscribe("doc", &[]).await;
    let first = client.expect(SOON).await;
    assert_eq!(first.event, "snapshot");

    let depth = 20_000;
    let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    upstream.set_raw_body(deep.as_bytes());
    let event = client.expect(SOON).await;
    assert_eq!(event.event, "error", "{event:?}");
    assert_eq!(event.id, first.id, "the last good document stays current");
    let message = event.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("deeper than 127 levels"), "{message}");
    let (status, current) = app.json_view("doc").await;
    assert_eq!((status, current), (200, document(1)));

    upstream.set(document(2));
    let mut rebuilt = Rebuilt::default();
    rebuilt.apply(&first);
    assert!(rebuilt.converge(&mut client, &document(2), SOON).await);
    app.stop().await;
}

//! `POST /streams/{name}/poll` (poll now, within the rate limit) and `/readyz` on a single node.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const PUSH_TOKEN: &str = "test-push-token-0123456789";

/// `fleet` polled every hour from `upstream` (so only a poll asked for brings a change soon),
/// a push stream `prices`, and `more` TOML.
fn app_toml(upstream: &MockUpstream, more: &str) -> String {
    format!(
        r#"
[push]
token = "{PUSH_TOKEN}"

[[streams]]
name = "fleet"
url = "{}"
interval = "1h"

[[streams]]
name = "prices"
source = "push"

{more}
"#,
        upstream.url()
    )
}

/// A document whose one-field change is a patch (smaller than the document).
fn doc(v: u64) -> Value {
    json!({"v": v, "note": "x".repeat(200)})
}

async fn poll(app: &TestApp, name: &str, token: Option<&str>) -> (u16, Option<String>, Value) {
    let mut request = reqwest::Client::new().post(app.url(&format!("/streams/{name}/poll")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        retry_after,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_poll_asked_for_brings_the_change_long_before_the_interval() {
    let upstream = MockUpstream::start(doc(1)).await;
    let app = TestApp::from_toml(&app_toml(&upstream, "")).await;
    let mut client = app.subscribe("fleet", &[]).await;
    let first = client.expect(SOON).await;
    assert_eq!(first.event, "snapshot");
    assert_eq!(upstream.requests(), 1);

    upstream.set(doc(2));
    let (status, _, body) = poll(&app, "fleet", Some(PUSH_TOKEN)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["poll"], "scheduled");
    let patch = client.expect(SOON).await;
    assert_eq!(patch.event, "patch");
    assert_eq!(
        patch.json(),
        json!([{"op": "replace", "path": "/v", "value": 2}])
    );
    assert_eq!(upstream.requests(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_poll_asked_for_keeps_to_the_rate_limit() {
    let upstream = MockUpstream::start(doc(1)).await;
    // One request per second for the upstream's host: the first poll takes it.
    let app = TestApp::from_toml(&app_toml(
        &upstream,
        "[upstream.default_rate_limit]\nper_second = 1\nburst = 1\n",
    ))
    .await;
    let mut client = app.subscribe("fleet", &[]).await;
    client.expect(SOON).await;

    // Back to back, at most one of two asks fits in one second's quota: the other is a 429
    // saying when to come back.
    let (first, first_retry, _) = poll(&app, "fleet", Some(PUSH_TOKEN)).await;
    let (second, second_retry, body) = poll(&app, "fleet", Some(PUSH_TOKEN)).await;
    let refused = [(first, first_retry), (second, second_retry)]
        .into_iter()
        .filter(|(status, _)| *status == 429)
        .collect::<Vec<_>>();
    assert!(!refused.is_empty(), "{first} then {second}: {body}");
    for (_, retry_after) in &refused {
        let secs: u64 = retry_after
            .as_deref()
            .expect("a 429 says when to retry")
            .parse()
            .unwrap();
        assert_eq!(
            secs, 1,
            "a quota of one per second frees a request within 1 s"
        );
    }
    assert!(
        [first, second].iter().all(|s| *s == 202 || *s == 429),
        "{first} {second}"
    );

    // After the wait it says, the ask is accepted and the change arrives.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    upstream.set(doc(2));
    let (status, _, body) = poll(&app, "fleet", Some(PUSH_TOKEN)).await;
    assert_eq!(status, 202, "{body}");
    loop {
        let event = client.expect(SOON).await;
        if event.event == "patch" && event.json()[0]["value"] == 2 {
            break;
        }
    }
    // The initial poll, at most one accepted ask in the first second, the last ask.
    assert!(upstream.requests() <= 3, "{}", upstream.requests());
    app.stop().await;
}

#[tokio::test]
async fn poll_now_needs_a_token_a_stream_and_a_polled_one() {
    let upstream = MockUpstream::start(doc(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let admin = "test-admin-token-0123456789";
    let app = TestApp::from_toml(&app_toml(
        &upstream,
        &format!(
            "[webhooks]\ndatabase = \"{}\"\nadmin_token = \"{admin}\"\n",
            dir.path().join("outbox.db").display()
        ),
    ))
    .await;
    assert_eq!(poll(&app, "fleet", None).await.0, 401);
    assert_eq!(
        poll(&app, "fleet", Some("wrong-token-0123456789")).await.0,
        401
    );
    assert_eq!(poll(&app, "fleet", Some(admin)).await.0, 202);
    let (status, _, body) = poll(&app, "nope", Some(PUSH_TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = poll(&app, "prices", Some(PUSH_TOKEN)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("not polled"));

    // Ready: it serves and its outbox answers; the body says what was checked.
    let response = reqwest::get(app.url("/readyz")).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["checks"]["webhook_outbox"]["ok"], true, "{body}");
    app.stop().await;
}

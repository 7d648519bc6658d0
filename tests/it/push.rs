//! The push source: POST a document, PATCH it, and the changes reach subscribers through the
//! same diff, history and fan-out as polled changes.

use patchwire::config::{PushSettings, PushStreamSettings};
use patchwire::diff::DiffOptions;
use serde_json::{Value, json};

use crate::support::*;

const TOKEN: &str = "test-push-token-0123456789";

async fn push_app(polled_url: Option<&str>) -> TestApp {
    let mut config = config(
        polled_url
            .map(|u| vec![stream("polled", u)])
            .unwrap_or_default(),
    );
    config.push = Some(PushSettings {
        token: TOKEN.into(),
        max_body_bytes: 1 << 20,
    });
    config.push_streams = vec![PushStreamSettings {
        name: "prices".into(),
        history: 100,
        diff: DiffOptions::default(),
    }];
    TestApp::spawn(config).await
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, app.url("/streams/prices"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn pushed_documents_and_patches_reach_subscribers() {
    let app = push_app(None).await;
    let mut client = app.subscribe("prices", &[]).await;

    let doc = json!({"eur": 1.0, "usd": 1.08, "note": "x".repeat(100)});
    let (status, body) = send(&app, reqwest::Method::POST, Some(TOKEN), &doc.to_string()).await;
    assert_eq!(
        (status, body["seq"].as_u64(), body["change"].as_str()),
        (200, Some(1), Some("snapshot"))
    );
    let mut rebuilt = Rebuilt::default();
    rebuilt.apply(&client.expect(SOON).await);
    assert_eq!(rebuilt.document.as_ref(), Some(&doc));

    // A new whole document is diffed against the current one.
    let doc2 = json!({"eur": 1.0, "usd": 1.09, "note": "x".repeat(100)});
    let (status, body) = send(&app, reqwest::Method::POST, Some(TOKEN), &doc2.to_string()).await;
    assert_eq!((status, body["change"].as_str()), (200, Some("patch")));
    let event = client.expect(SOON).await;
    assert_eq!(event.event, "patch");
    assert_eq!(
        event.json(),
        json!([{"op": "replace", "path": "/usd", "value": 1.09}])
    );
    rebuilt.apply(&event);

    // A pushed patch, with operations subscribers never see (test, copy), is applied and
    // republished as a minimal add/remove/replace patch.
    let patch = json!([
        {"op": "test", "path": "/eur", "value": 1.0},
        {"op": "copy", "from": "/usd", "path": "/chf"},
        {"op": "remove", "path": "/note"}
    ]);
    let (status, body) = send(
        &app,
        reqwest::Method::PATCH,
        Some(TOKEN),
        &patch.to_string(),
    )
    .await;
    assert_eq!((status, body["seq"].as_u64()), (200, Some(3)), "{body}");
    let target = json!({"eur": 1.0, "usd": 1.09, "chf": 1.09});
    assert!(rebuilt.converge(&mut client, &target, SOON).await);

    // The same document again publishes nothing.
    let (status, body) = send(
        &app,
        reqwest::Method::POST,
        Some(TOKEN),
        &target.to_string(),
    )
    .await;
    assert_eq!(
        (status, body["change"].as_str(), body["seq"].as_u64()),
        (200, Some("none"), Some(3))
    );
    app.stop().await;
}

#[tokio::test]
async fn refusals_are_clear_and_publish_nothing() {
    let upstream = MockUpstream::start(json!({"n": 1})).await;
    let app = push_app(Some(&upstream.url())).await;

    // Patching before any document.
    let (status, body) = send(&app, reqwest::Method::PATCH, Some(TOKEN), "[]").await;
    assert_eq!(status, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("POST one first"));

    let (status, _) = send(&app, reqwest::Method::POST, None, "{}").await;
    assert_eq!(status, 401);
    let (status, _) = send(
        &app,
        reqwest::Method::POST,
        Some("wrong-token-wrong-token"),
        "{}",
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = send(&app, reqwest::Method::POST, Some(TOKEN), "{not json").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = send(
        &app,
        reqwest::Method::PATCH,
        Some(TOKEN),
        "{\"op\":\"add\"}",
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let (status, _) = send(
        &app,
        reqwest::Method::POST,
        Some(TOKEN),
        "{\"a\":1,\"b\":[1,2]}",
    )
    .await;
    assert_eq!(status, 200);
    // A patch that fails halfway leaves the document untouched (atomic) and publishes nothing.
    let failing = json!([{"op": "replace", "path": "/a", "value": 2}, {"op": "test", "path": "/b/0", "value": 9}]);
    let (status, body) = send(
        &app,
        reqwest::Method::PATCH,
        Some(TOKEN),
        &failing.to_string(),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let current: Value = reqwest::Client::new()
        .get(app.url("/streams/prices"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(current, json!({"a": 1, "b": [1, 2]}));

    // Polled streams do not accept pushes.
    let polled = reqwest::Client::new()
        .post(app.url("/streams/polled"))
        .bearer_auth(TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(polled.status(), 409);
    app.stop().await;
}

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
        history_bytes: 16 << 20,
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

/// `{"a": {"a": ... {}}}`, `depth` objects deep.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!({}), |inner, _| json!({ "a": inner }))
}

/// Each PATCH is within the parser's depth, but its path reaches into the document: successive
/// ones used to deepen it until the diff overflowed a worker's stack and the process aborted.
#[tokio::test]
async fn patches_cannot_deepen_a_document_past_the_bound() {
    let app = push_app(None).await;
    let (status, _) = send(&app, reqwest::Method::POST, Some(TOKEN), "{}").await;
    assert_eq!(status, 200);
    let mut path = String::new();
    let mut refused = None;
    for request in 0..40 {
        // 100 levels under the deepest point so far.
        let patch = json!([{"op": "add", "path": format!("{path}/a"), "value": nested(99)}]);
        let (status, body) = send(
            &app,
            reqwest::Method::PATCH,
            Some(TOKEN),
            &patch.to_string(),
        )
        .await;
        if status != 200 {
            refused = Some((request, status, body));
            break;
        }
        path.push_str(&"/a".repeat(100));
    }
    let (request, status, body) = refused.expect("a PATCH past the bound is refused");
    assert_eq!((request, status), (1, 422), "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("deeper than 127"),
        "{body}"
    );
    // The server is up and the document is the last accepted one.
    let (status, current) = app.json_view("prices").await;
    assert_eq!((status, current), (200, json!({"a": nested(99)})));

    // A POST body deeper than the bound is refused by name too.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let (status, body) = send(&app, reqwest::Method::POST, Some(TOKEN), &deep).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("deeper than 127"),
        "{body}"
    );
    app.stop().await;
}

/// Inserting at the front of an array moves every element after it: 25,000 such operations
/// in one request used to hold the stream's publishing lock for seconds. The work is bounded.
#[tokio::test]
async fn a_quadratic_patch_is_refused_before_it_costs_much() {
    let app = push_app(None).await;
    let (status, _) = send(&app, reqwest::Method::POST, Some(TOKEN), r#"{"a":[]}"#).await;
    assert_eq!(status, 200);
    let front = |n: usize| {
        Value::Array(
            (0..n)
                .map(|i| json!({"op": "add", "path": "/a/0", "value": i}))
                .collect(),
        )
        .to_string()
    };
    let (status, body) = send(&app, reqwest::Method::PATCH, Some(TOKEN), &front(25_000)).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("too costly"),
        "{body}"
    );
    let (_, current) = app.json_view("prices").await;
    assert_eq!(current, json!({"a": []}), "nothing was published");
    // An ordinary patch of the same kind still applies.
    let (status, body) = send(&app, reqwest::Method::PATCH, Some(TOKEN), &front(1000)).await;
    assert_eq!((status, body["seq"].as_u64()), (200, Some(2)), "{body}");
    app.stop().await;
}

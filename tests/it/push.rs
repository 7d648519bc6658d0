//! The push source: POST a document, PATCH it, and the changes reach subscribers through the
//! same diff, history and fan-out as polled changes.

use serde_json::{Value, json};

use crate::support::raw::RawConnection;
use crate::support::*;

const TOKEN: &str = "test-push-token-0123456789";

async fn push_app(polled_url: Option<&str>) -> TestApp {
    push_app_with(polled_url, "").await
}

/// The app with the push stream `prices` (and a polled stream `polled` at `polled_url`), and
/// `more` TOML after them.
async fn push_app_with(polled_url: Option<&str>, more: &str) -> TestApp {
    let polled = polled_url.map(|u| polled("polled", u)).unwrap_or_default();
    TestApp::from_toml(&format!(
        r#"
[push]
token = "{TOKEN}"
max_body = "1 MiB"

[[streams]]
name = "prices"
source = "push"
history = 100

{polled}
{more}
"#
    ))
    .await
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

/// A push request head on a raw connection, the body left for the test to send (or not).
fn push_head(token: Option<&str>, content_length: usize, extra: &str) -> String {
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    format!(
        "POST /streams/prices HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {content_length}\r\n{auth}{extra}\r\n"
    )
}

#[tokio::test]
async fn unauthenticated_pushes_are_refused_from_the_head_without_reading_the_body() {
    let app = push_app(None).await;
    for (token, extra) in [
        (None, "expect: 100-continue\r\n"),
        (None, ""),
        (Some("wrong-token-wrong-token"), "expect: 100-continue\r\n"),
    ] {
        // A body just under push.max_body is announced and never sent: the answer must come
        // without waiting for it, and close the connection (its unread body is not a request).
        let mut connection = RawConnection::open(app.addr).await;
        connection
            .send(push_head(token, (1 << 20) - 1, extra).as_bytes())
            .await;
        let answer = connection.read_to_close(SOON).await.unwrap_or_else(|| {
            panic!("still open (waiting for the body?):\n{}", connection.text())
        });
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(!answer.contains("100 Continue"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{answer}"
        );
    }

    // With the token, the client is told to continue and the push goes through.
    let body = r#"{"eur":1.0}"#;
    let mut connection = RawConnection::open(app.addr).await;
    connection
        .send(push_head(Some(TOKEN), body.len(), "expect: 100-continue\r\n").as_bytes())
        .await;
    connection.read_until("100 Continue", SOON).await;
    connection.send(body.as_bytes()).await;
    let answer = connection.read_until("\"snapshot\"", SOON).await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");

    // A declared body over push.max_body is refused before it is read, too.
    let mut connection = RawConnection::open(app.addr).await;
    connection
        .send(push_head(Some(TOKEN), (1 << 20) + 1, "").as_bytes())
        .await;
    let answer = connection.read_to_close(SOON).await.expect("closed");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    app.stop().await;
}

#[tokio::test]
async fn a_push_body_that_does_not_arrive_in_time_gets_408() {
    let app = push_app_with(None, "[server]\nbody_timeout = \"1s\"").await;
    let mut connection = RawConnection::open(app.addr).await;
    connection
        .send(push_head(Some(TOKEN), 100, "").as_bytes())
        .await;
    connection.send(b"{\"eur\":").await;
    let answer = connection
        .read_to_close(SOON)
        .await
        .unwrap_or_else(|| panic!("still open:\n{}", connection.text()));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("server.body_timeout"), "{answer}");
    // Nothing was published.
    assert_eq!(app.json_view("prices").await.0, 503);
    app.stop().await;
}

#[tokio::test]
async fn the_json_view_is_gzipped_for_clients_that_accept_it() {
    use std::io::Read as _;
    let app = push_app(None).await;
    let doc =
        json!({"rows": (0..2000).map(|i| json!({"id": i, "name": "row"})).collect::<Vec<_>>()});
    let (status, _) = send(&app, reqwest::Method::POST, Some(TOKEN), &doc.to_string()).await;
    assert_eq!(status, 200);

    // The raw bytes are gzip.
    let raw = reqwest::Client::builder().no_gzip().build().unwrap();
    let response = raw
        .get(app.url("/streams/prices"))
        .header("accept", "application/json")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-encoding"], "gzip");
    assert!(
        headers["vary"]
            .to_str()
            .unwrap()
            .contains("accept-encoding")
    );
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let compressed = response.bytes().await.unwrap();
    assert_eq!(&compressed[..2], &[0x1f, 0x8b]);
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_string(&mut plain)
        .unwrap();
    assert_eq!(serde_json::from_str::<Value>(&plain).unwrap(), doc);
    assert!(
        compressed.len() * 4 < plain.len(),
        "{} of {}",
        compressed.len(),
        plain.len()
    );

    // A gzip-capable client gets the document; revalidating with the tag gives 304.
    let client = reqwest::Client::new();
    let response = client
        .get(app.url("/streams/prices"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), doc);
    let revalidated = raw
        .get(app.url("/streams/prices"))
        .header("accept", "application/json")
        .header("accept-encoding", "gzip")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), 304);

    // Without Accept-Encoding, plain JSON with its own tag.
    let response = raw
        .get(app.url("/streams/prices"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("content-encoding").is_none());
    assert_ne!(response.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(response.json::<Value>().await.unwrap(), doc);
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

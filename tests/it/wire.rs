//! The SSE body on the wire: the `retry:` hint first, then the snapshot, and keep-alive
//! comments while nothing changes (which carry no event and do not advance the id).

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn retry_hint_first_then_snapshot_then_keep_alives_while_idle() {
    let upstream = MockUpstream::start(json!({"n": 1})).await;
    // The shortest keep-alive interval a file may ask for: the two the test waits for take 2 s.
    let app = TestApp::from_toml(&format!(
        "[server]\nkeepalive = \"1s\"\nretry = \"1500ms\"\n{}",
        polled("doc", &upstream.url())
    ))
    .await;
    app.wait_for_seq("doc", 1).await;

    let mut raw = app.subscribe_raw("doc", 64 * 1024).await;
    let head = raw.read_until(b"\r\n\r\n", SOON).await;
    let head = String::from_utf8_lossy(&head).into_owned();
    let (status_and_headers, first_bytes) = head.split_once("\r\n\r\n").unwrap();
    assert!(
        status_and_headers
            .to_lowercase()
            .contains("content-type: text/event-stream"),
        "{status_and_headers}"
    );
    let mut body = first_bytes.to_owned();
    while body.matches(": keep-alive\n\n").count() < 2 {
        let more = raw.read_until(b"\n\n", SOON).await;
        body.push_str(&String::from_utf8_lossy(&more));
    }
    let epoch = app.listing("doc").await["epoch"].as_u64().unwrap();
    let expected_start =
        format!("retry: 1500\n\nid: doc:{epoch}:1\nevent: snapshot\ndata: {{\"n\":1}}\n\n");
    assert!(
        body.starts_with(&expected_start),
        "expected {expected_start:?} first, got {body:?}"
    );
    let rest = &body[expected_start.len()..];
    assert!(
        rest.split("\n\n")
            .filter(|frame| !frame.is_empty())
            .all(|frame| frame == ": keep-alive"),
        "only keep-alives while idle: {rest:?}"
    );
    app.stop().await;
}

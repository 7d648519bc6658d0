//! Connection limits: HTTP/2 and keep-alive connections without a request in flight are
//! closed, and past `server.max_connections` new connections are refused while the open ones
//! keep being served.

use std::time::Duration;

use serde_json::json;

use crate::support::process::Process;
use crate::support::raw::RawConnection;
use crate::support::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: the client's half of the HTTP/2 handshake.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";

/// The app polling one stream `s`, with `server` (TOML lines of its `[server]` table).
async fn app_with(server: &str) -> (MockUpstream, TestApp) {
    let upstream = MockUpstream::start(json!({"n": 1})).await;
    let toml = format!("[server]\n{server}\n{}", polled("s", &upstream.url()));
    (upstream, TestApp::from_toml(&toml).await)
}

#[tokio::test]
async fn http2_connections_without_a_request_are_closed_after_the_header_timeout() {
    let (_upstream, app) = app_with("header_timeout = \"1s\"").await;
    // The preface alone, and the preface with the client's SETTINGS (a complete handshake).
    for hello in [PREFACE.to_vec(), [PREFACE, EMPTY_SETTINGS].concat()] {
        let mut connection = RawConnection::open(app.addr).await;
        connection.send(&hello).await;
        assert!(
            connection
                .read_to_close(Duration::from_secs(20))
                .await
                .is_some(),
            "a preface-only HTTP/2 connection stayed open"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_but_open_subscriptions_are_not() {
    let (upstream, app) = app_with("idle_timeout = \"1s\"").await;
    // An HTTP/1 keep-alive connection after its request.
    let mut connection = RawConnection::open(app.addr).await;
    connection.send(HEALTHZ).await;
    connection.read_until("ok\n", SOON).await;
    assert!(
        connection
            .read_to_close(Duration::from_secs(20))
            .await
            .is_some(),
        "an idle keep-alive connection stayed open"
    );

    // An HTTP/2 subscription (served by hyper) is a request in flight: it outlives the idle
    // timeout and still gets changes.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client.get(app.url("/streams/s")).send().await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let mut subscriber = SseClient::from_body(
        response.status(),
        response.headers().clone(),
        response.bytes_stream(),
    );
    let mut rebuilt = Rebuilt::default();
    rebuilt.apply(&subscriber.expect(SOON).await);
    assert_eq!(rebuilt.document, Some(json!({"n": 1})));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    upstream.set(json!({"n": 2}));
    assert!(
        rebuilt
            .converge(&mut subscriber, &json!({"n": 2}), SOON)
            .await
    );
    app.stop().await;
}

#[tokio::test]
async fn past_max_connections_new_connections_get_503_and_open_ones_are_served() {
    let (_upstream, app) = app_with("max_connections = 3").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut connection = RawConnection::open(app.addr).await;
        connection.send(HEALTHZ).await;
        connection.read_until("ok\n", SOON).await;
        held.push(connection);
    }
    let mut refused = RawConnection::open(app.addr).await;
    refused.send(HEALTHZ).await;
    let answer = refused.read_to_close(SOON).await.expect("closed");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("server.max_connections"), "{answer}");
    // An HTTP/2 client (prior knowledge) is refused in HTTP/2, not with bytes it cannot read.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("an HTTP/2 answer");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let text = response.text().await.unwrap();
    assert!(text.contains("server.max_connections"), "{text}");

    // An open keep-alive connection still answers.
    let mut first = held.remove(0);
    first.send(HEALTHZ).await;
    first.read_until("ok\nHTTP/1.1 200 OK\r\n", SOON).await;

    // Closing one makes room for a new one.
    drop(held);
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let mut connection = RawConnection::open(app.addr).await;
        connection.send(HEALTHZ).await;
        match connection.read_to_close(Duration::from_millis(500)).await {
            // Still refused while the server notices the closed connections.
            Some(text) if text.starts_with("HTTP/1.1 503") => {}
            Some(text) => panic!("unexpected answer {text}"),
            None => {
                assert!(
                    connection.text().starts_with("HTTP/1.1 200"),
                    "{}",
                    connection.text()
                );
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after closing connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// The soft and hard open-file limits of process `pid`, from `/proc/{pid}/limits`.
fn open_files_of(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next().expect("soft").to_owned();
    let hard = fields.next().expect("hard").to_owned();
    (soft, hard)
}

/// Every connection is a file descriptor: a soft limit below `server.max_connections` is
/// raised at start as far as the hard limit allows, and a hard limit too low is reported.
#[tokio::test]
async fn the_open_file_limit_is_raised_for_max_connections_or_reported() {
    let (hard_here, _) = open_files_of(std::process::id());
    let hard_here: u64 = hard_here.parse().unwrap_or(u64::MAX);
    if hard_here < 8192 {
        eprintln!("skipped: this process's hard open-file limit is {hard_here}, under 8192");
        return;
    }
    let upstream = MockUpstream::start(json!({"n": 1})).await;
    let toml = format!(
        "[server]\nmax_connections = 5000\n{}",
        polled("s", &upstream.url())
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let raised = Process::start_with_open_files(dir.path(), &toml, Some((1024, 8192))).await;
    assert_eq!(
        open_files_of(raised.pid()),
        ("5256".to_owned(), "8192".to_owned()),
        "max_connections plus 256 reserved, the hard limit kept; log:\n{}",
        raised.log()
    );
    assert!(!raised.log().contains("open-file limit is below"));
    // Its log goes to a file, not a terminal: plain text, no colour escapes.
    assert!(!raised.log().contains('\u{1b}'), "{}", raised.log());
    drop(raised);

    let dir = tempfile::tempdir().expect("temp dir");
    let short = Process::start_with_open_files(dir.path(), &toml, Some((1024, 2048))).await;
    assert_eq!(
        open_files_of(short.pid()),
        ("2048".to_owned(), "2048".to_owned())
    );
    short
        .logged("open-file limit is below", Duration::from_secs(5))
        .await;
    assert!(short.log().contains("1792 connections"), "{}", short.log());
}

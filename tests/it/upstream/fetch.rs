//! `Fetcher` against the mock: conditional headers, limits, redirects, errors.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use patchwire::redact::Redacted;
use patchwire::upstream::fetch::{RedirectError, redirect_policy};
use patchwire::upstream::{FetchError, FetchRequest, Fetched, Fetcher, Validators};
use serde_json::json;
use tokio::time::Instant;
use url::Url;

use crate::support::poller::header_value;
use crate::support::{Failure, MockUpstream, free_port};

fn url(mock: &MockUpstream, path: &str) -> Url {
    Url::parse(&mock.url_at(path)).expect("the mock's URL is valid")
}

fn fetcher() -> Fetcher {
    Fetcher::new("patchwire-test/1").expect("client builds")
}

async fn fetch_with(
    url: &Url,
    headers: &HeaderMap,
    timeout: Duration,
    max_body_bytes: u64,
) -> Result<Fetched, FetchError> {
    let shown = Redacted::new(url);
    let request = FetchRequest {
        url,
        shown: &shown,
        headers,
        timeout,
        max_body_bytes,
    };
    fetcher().fetch(&request, &Validators::default()).await
}

async fn fetch(url: &Url, max_body_bytes: u64) -> Result<Fetched, FetchError> {
    fetch_with(
        url,
        &HeaderMap::new(),
        Duration::from_secs(5),
        max_body_bytes,
    )
    .await
}

fn body(fetched: Fetched) -> Bytes {
    match fetched {
        Fetched::Body { body, .. } => body,
        Fetched::NotModified => panic!("expected a body, got 304"),
    }
}

#[tokio::test]
async fn sends_user_agent_and_configured_headers_and_returns_validators() {
    let mock = MockUpstream::start_with_body(b"{\"a\":1}").await;
    let date = mock.last_modified();
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", header_value("k-123"));
    let fetched = fetch_with(&url(&mock, "/feed"), &headers, Duration::from_secs(5), 1024)
        .await
        .expect("fetch succeeds");
    let Fetched::Body { body, validators } = fetched else {
        panic!("expected a body");
    };
    assert_eq!(body, Bytes::from_static(b"{\"a\":1}"));
    assert_eq!(validators.etag, Some(header_value("\"v1\"")));
    assert_eq!(validators.last_modified, Some(header_value(&date)));
    let seen = mock.last_received();
    assert_eq!(seen.header("user-agent"), Some("patchwire-test/1"));
    assert_eq!(seen.header("x-api-key"), Some("k-123"));
    assert_eq!(seen.header("if-none-match"), None);
    assert_eq!(seen.header("if-modified-since"), None);
}

#[tokio::test]
async fn validators_become_conditions_and_304_reads_no_body() {
    let mock = MockUpstream::start_with_body(b"{}").await;
    let date = mock.last_modified();
    let url = url(&mock, "/feed");
    let headers = HeaderMap::new();
    let shown = Redacted::new(&url);
    let request = FetchRequest {
        url: &url,
        shown: &shown,
        headers: &headers,
        timeout: Duration::from_secs(5),
        max_body_bytes: 1024,
    };
    let validators = Validators {
        etag: Some(header_value("\"v1\"")),
        last_modified: Some(header_value(&date)),
    };
    let fetched = fetcher()
        .fetch(&request, &validators)
        .await
        .expect("fetch succeeds");
    assert!(matches!(fetched, Fetched::NotModified), "{fetched:?}");
    let seen = mock.last_received();
    assert_eq!(seen.header("if-none-match"), Some("\"v1\""));
    assert_eq!(seen.header("if-modified-since"), Some(date.as_str()));
}

#[tokio::test]
async fn gzip_bodies_are_decompressed() {
    let doc = br#"{"vehicles":[{"id":"a","lat":1.5},{"id":"b","lat":2.5}]}"#;
    let mock = MockUpstream::start_with_body(doc).await;
    mock.gzip(true);
    let fetched = fetch(&url(&mock, "/feed"), 1024)
        .await
        .expect("fetch succeeds");
    assert_eq!(body(fetched), Bytes::from_static(doc));
    let accept = mock
        .last_received()
        .header("accept-encoding")
        .map(str::to_owned);
    assert!(
        accept.as_deref().is_some_and(|a| a.contains("gzip")),
        "{accept:?}"
    );
}

#[tokio::test]
async fn a_body_of_exactly_the_cap_is_accepted_one_more_byte_is_not() {
    let mock = MockUpstream::start_with_body(b"[1,2,3]").await;
    let fetched = fetch(&url(&mock, "/feed"), 7).await.expect("7 bytes fit");
    assert_eq!(body(fetched).len(), 7);
    let error = fetch(&url(&mock, "/feed"), 6)
        .await
        .expect_err("7 bytes > 6");
    assert!(
        matches!(error, FetchError::TooLarge { limit: 6, .. }),
        "{error:?}"
    );
    assert_eq!(error.status(), 502);
}

#[tokio::test]
async fn a_chunked_body_is_cut_off_as_soon_as_it_exceeds_the_cap() {
    // The mock never finishes the body: only an early cut-off avoids the timeout.
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::ChunkedThenHang {
        chunk: 512,
        chunks: 8,
    });
    let started = Instant::now();
    let error = fetch(&url(&mock, "/feed"), 1000)
        .await
        .expect_err("4 KiB > 1000 bytes");
    assert!(
        matches!(error, FetchError::TooLarge { limit: 1000, .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(error.to_string().contains(url(&mock, "/feed").as_str()));
}

#[tokio::test]
async fn a_too_large_content_length_is_rejected_before_reading_the_body() {
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::LyingLength { length: 10_000_000 });
    let started = Instant::now();
    let error = fetch(&url(&mock, "/feed"), 1 << 20)
        .await
        .expect_err("10 MB > 1 MiB");
    assert!(
        matches!(
            error,
            FetchError::TooLarge {
                limit: 1_048_576,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_connection_broken_mid_body_is_a_body_error() {
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::Truncated);
    let error = fetch(&url(&mock, "/feed"), 1 << 20)
        .await
        .expect_err("the body is incomplete");
    assert!(matches!(error, FetchError::Body { .. }), "{error:?}");
    assert_eq!(error.status(), 502);
}

#[tokio::test]
async fn follows_five_redirects_but_not_six() {
    let mock = MockUpstream::start_with_body(b"{\"ok\":true}").await;
    let fetched = fetch(&url(&mock, "/redirect/5"), 1024)
        .await
        .expect("5 redirects are followed");
    assert_eq!(body(fetched), Bytes::from_static(b"{\"ok\":true}"));
    let error = fetch(&url(&mock, "/redirect/6"), 1024)
        .await
        .expect_err("6 redirects are too many");
    assert!(
        matches!(
            error,
            FetchError::Redirect {
                source: RedirectError::TooMany,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("redirects"), "{error}");
    assert_eq!(error.status(), 502);
}

#[tokio::test]
async fn a_slow_upstream_times_out_with_504() {
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::Hang(Duration::from_secs(10)));
    let started = Instant::now();
    let error = fetch_with(
        &url(&mock, "/feed"),
        &HeaderMap::new(),
        Duration::from_millis(150),
        1024,
    )
    .await
    .expect_err("the upstream is too slow");
    let elapsed = started.elapsed();
    assert!(matches!(error, FetchError::Timeout { .. }), "{error:?}");
    assert_eq!(error.status(), 504);
    assert!(
        elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn connection_refused_is_a_connect_error_naming_the_url() {
    let url = Url::parse(&format!("http://127.0.0.1:{}/feed", free_port())).expect("valid URL");
    let error = fetch(&url, 1024).await.expect_err("nothing listens");
    assert!(matches!(error, FetchError::Connect { .. }), "{error:?}");
    assert_eq!(error.status(), 502);
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("GET {url}: no response")),
        "{text}"
    );
}

#[tokio::test]
async fn error_statuses_carry_retry_after_only_for_429_and_503() {
    let mock = MockUpstream::start(json!({})).await;
    for (status, expected) in [
        (429, Some(Duration::from_secs(7))),
        (503, Some(Duration::from_secs(7))),
        (500, None),
        (404, None),
    ] {
        mock.fail(Failure::Status(status, Some("7".into())));
        let error = fetch(&url(&mock, "/feed"), 1024)
            .await
            .expect_err("error status");
        assert_eq!(error.status(), status);
        assert_eq!(error.retry_after(), expected, "status {status}");
    }
}

#[tokio::test]
async fn errors_never_contain_header_values() {
    let mock = MockUpstream::start(json!({})).await;
    mock.fail(Failure::Status(401, None));
    let mut headers = HeaderMap::new();
    headers.insert("authorization", header_value("Bearer s3cret-token"));
    let error = fetch_with(&url(&mock, "/feed"), &headers, Duration::from_secs(5), 1024)
        .await
        .expect_err("401");
    assert_eq!(
        mock.last_received().header("authorization"),
        Some("Bearer s3cret-token")
    );
    for text in [error.to_string(), format!("{error:?}")] {
        assert!(!text.contains("s3cret"), "{text}");
    }
    assert_eq!(error.status(), 401);
}

#[tokio::test]
async fn the_cap_applies_to_the_decompressed_body() {
    // 100 KB of spaces compresses to a few hundred bytes: a small decompression bomb.
    let mock = MockUpstream::start_with_body(&vec![b' '; 100_000]).await;
    mock.gzip(true);
    let error = fetch(&url(&mock, "/feed"), 10_000)
        .await
        .expect_err("100 KB decompressed > 10 KB");
    assert!(
        matches!(error, FetchError::TooLarge { limit: 10_000, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_refused_redirect_is_named_with_its_redacted_target() {
    let mock = MockUpstream::start(json!({})).await;
    let refusing = Fetcher::client_builder("patchwire-test/1")
        .expect("valid user agent")
        .redirect(redirect_policy(|url| {
            (url.path() == "/redirect/0").then(|| "it is the last one".to_owned())
        }));
    let fetcher = Fetcher::build(refusing).expect("client builds");
    let url = url(&mock, "/redirect/2");
    let shown = Redacted::new(&url);
    let request = FetchRequest {
        url: &url,
        shown: &shown,
        headers: &HeaderMap::new(),
        timeout: Duration::from_secs(5),
        max_body_bytes: 1024,
    };
    let error = fetcher
        .fetch(&request, &Validators::default())
        .await
        .expect_err("the policy refuses the second redirect");
    assert_eq!(error.cause(), "redirect-refused");
    let text = error.to_string();
    assert!(
        text.ends_with(&format!(
            "/redirect/2: redirect to {} refused: it is the last one",
            mock.url_at("/redirect/0")
        )),
        "{text}"
    );
}

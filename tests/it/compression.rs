//! gzip for whole responses: the console's files and catch-up pages, fetched by Python's
//! `urllib` (which does not decode anything by itself) with and without
//! `Accept-Encoding: gzip`, decoded with Python's `gzip` and compared byte for byte.

use std::process::Stdio;

use serde_json::{Value, json};

use crate::support::*;

/// For each URL: the plain answer, the gzip answer (decoded), and revalidations with each tag.
const PYTHON_FETCHER: &str = r#"
import gzip, json, sys, urllib.request, urllib.error

def joined(pairs):
    # A header sent more than once (Vary) is one list.
    out = {}
    for name, value in pairs:
        name = name.lower()
        out[name] = out[name] + ", " + value if name in out else value
    return out

def fetch(url, headers):
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, joined(response.getheaders()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, joined(error.headers.items()), error.read()

results = {}
for url in sys.argv[1:]:
    status, plain_headers, plain = fetch(url, {"Accept-Encoding": "identity"})
    gz_status, gz_headers, compressed = fetch(url, {"Accept-Encoding": "gzip, deflate"})
    decoded = gzip.decompress(compressed) if gz_headers.get("content-encoding") == "gzip" else compressed
    revalidate = lambda tag, encoding: fetch(url, {"Accept-Encoding": encoding, "If-None-Match": tag})[0]
    results[url] = {
        "status": status,
        "gzip_status": gz_status,
        "content_encoding": gz_headers.get("content-encoding"),
        "plain_content_encoding": plain_headers.get("content-encoding"),
        "vary": gz_headers.get("vary", ""),
        "plain_vary": plain_headers.get("vary", ""),
        "etag": plain_headers.get("etag"),
        "gzip_etag": gz_headers.get("etag"),
        "cache_control": plain_headers.get("cache-control"),
        "gzip_cache_control": gz_headers.get("cache-control"),
        "identical": decoded == plain,
        "smaller": len(compressed) < len(plain),
        "gzip_tag_over_gzip": revalidate(gz_headers.get("etag", ""), "gzip"),
        "plain_tag_over_gzip": revalidate(plain_headers.get("etag", ""), "gzip"),
        "gzip_tag_over_identity": revalidate(gz_headers.get("etag", ""), "identity"),
    }
print(json.dumps(results))
"#;

fn document(n: u64) -> Value {
    json!({
        "n": n,
        "items": (0..40).map(|i| json!({"id": i, "name": format!("item {i}"), "v": n})).collect::<Vec<_>>(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_and_catch_up_pages_are_gzipped_for_clients_that_accept_it() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import gzip, urllib.request"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(status) if status.success()) {
        patchwire_test_data::skip::<()>("python3 is not available");
        return;
    }
    let upstream = MockUpstream::start(document(1)).await;
    let app = TestApp::from_toml(&format!(
        "{}interval = \"100ms\"\n",
        polled("doc", &upstream.url())
    ))
    .await;
    app.wait_for_seq("doc", 1).await;
    let first: Value = reqwest::get(app.url("/streams/doc/changes?after=now"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = first["next"].as_str().unwrap().to_owned();
    for n in 2..=7 {
        upstream.set(document(n));
        app.wait_for_seq("doc", n).await;
    }
    let range = app.url(&format!("/streams/doc/changes?after={first}&limit=2"));
    let tail = app.url(&format!("/streams/doc/changes?after={first}"));
    let console = [
        app.url("/"),
        app.url("/console/console.js"),
        app.url("/console/console.css"),
        app.url("/console/icon.svg"),
    ];
    let mut urls = vec![range.clone(), tail.clone()];
    urls.extend(console.iter().cloned());
    let output = tokio::process::Command::new("python3")
        .args(["-c", PYTHON_FETCHER])
        .args(&urls)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .expect("python3 ran");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Value = serde_json::from_slice(&output.stdout).unwrap();
    for url in &urls {
        let r = &results[url];
        assert_eq!(r["status"], 200, "{url}: {r}");
        assert_eq!(r["gzip_status"], 200, "{url}: {r}");
        assert_eq!(r["content_encoding"], "gzip", "{url}: {r}");
        assert!(r["plain_content_encoding"].is_null(), "{url}: {r}");
        assert_eq!(r["identical"], true, "{url}: the decoded body differs: {r}");
        for vary in [&r["vary"], &r["plain_vary"]] {
            assert!(
                vary.as_str()
                    .unwrap()
                    .to_ascii_lowercase()
                    .contains("accept-encoding"),
                "{url}: {r}"
            );
        }
        assert_ne!(
            r["etag"], r["gzip_etag"],
            "{url}: one tag per encoding: {r}"
        );
        assert!(r["gzip_etag"].is_string(), "{url}: {r}");
        // Either tag revalidates (both name the same content), whatever is asked.
        for key in [
            "gzip_tag_over_gzip",
            "plain_tag_over_gzip",
            "gzip_tag_over_identity",
        ] {
            assert_eq!(r[key], 304, "{url}: {key}: {r}");
        }
        assert_eq!(r["cache_control"], r["gzip_cache_control"], "{url}: {r}");
    }
    // A page inside history stays immutable compressed; the tail is not.
    assert!(
        results[&range]["gzip_cache_control"]
            .as_str()
            .unwrap()
            .contains("immutable"),
        "{}",
        results[&range]
    );
    assert!(
        !results[&tail]["gzip_cache_control"]
            .as_str()
            .unwrap()
            .contains("immutable"),
        "{}",
        results[&tail]
    );
    // Pages and the larger console files are worth compressing.
    for url in [&range, &tail, &console[0], &console[1], &console[2]] {
        assert_eq!(results[url]["smaller"], true, "{url}: {}", results[url]);
    }
    app.stop().await;
}

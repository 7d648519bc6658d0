//! The two transports give the same answers: a subscription on a connection's first HTTP/1.1
//! request (the direct path, written straight to the socket) and the same request over
//! HTTP/2 (hyper) get the same status, the same headers (but the hop-by-hop ones, which
//! HTTP/2 forbids, and `date`) and the same event bytes, for every kind of request.

use std::io::Write as _;

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::proxy::{TOKEN, proxy_toml};
use crate::support::*;

const ORIGIN: &str = "https://app.example";

/// What a transport answered: status, headers (lowercase names, sorted, hop-by-hop ones and
/// `date` left out) and the body bytes read so far.
#[derive(PartialEq, Eq)]
struct Answered {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Answered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answered")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

/// The configured stream's document at version `n`: one field changes, the rest stays (so a
/// change is a patch, not a snapshot).
fn document(n: u64) -> serde_json::Value {
    json!({"n": n, "name": "Zürich", "pad": "x".repeat(200)})
}

/// When to stop reading a body that does not end by itself.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// After this many SSE blocks (events, the `retry:` field) of a plain body.
    Events(usize),
    /// After this many SSE blocks of a gzip body.
    GzipEvents(usize),
    /// Until the body ends (its length, or the connection's close).
    End,
}

impl Until {
    fn reached(self, body: &[u8]) -> bool {
        let blocks = |text: &[u8]| text.windows(2).filter(|w| w == b"\n\n").count();
        match self {
            Until::Events(n) => blocks(body) >= n,
            Until::GzipEvents(n) => {
                let mut decoder = flate2::write::GzDecoder::new(Vec::new());
                // A prefix of a gzip body: what it decodes to so far.
                let _ = decoder.write_all(body).and_then(|()| decoder.flush());
                blocks(decoder.get_ref()) >= n
            }
            Until::End => false,
        }
    }
}

fn comparable(headers: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut kept: Vec<_> = headers
        .filter(|(name, _)| {
            !["connection", "transfer-encoding", "keep-alive", "date"].contains(&name.as_str())
        })
        .collect();
    kept.sort();
    kept
}

/// A response being read, on either transport.
struct Reading {
    answered: Answered,
    /// Whether the direct path wrote it (rather than hyper, after the direct path passed).
    direct: bool,
    body: Body,
}

enum Body {
    /// The rest of a raw HTTP/1.1 connection.
    Direct(TcpStream),
    /// An HTTP/2 response's body.
    H2(reqwest::Response),
}

impl Reading {
    /// `GET path` as a connection's first HTTP/1.1 request, on a raw socket: the direct path.
    async fn direct(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Reading {
        let mut socket = TcpStream::connect(app.addr).await.unwrap();
        let mut request = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n", app.addr);
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut read = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let end = loop {
            if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let n = tokio::time::timeout(SOON, socket.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{path}: no response head in time"))
                .unwrap();
            assert!(n > 0, "{path}: closed before the response head");
            read.extend_from_slice(&buf[..n]);
        };
        let text = String::from_utf8(read[..end].to_vec()).unwrap();
        let mut lines = text.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let fields: Vec<_> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        // hyper dates every response and keeps HTTP/1.1 connections open; the direct path
        // closes them.
        let direct = fields.iter().all(|(name, _)| name != "date")
            && fields.contains(&("connection".to_owned(), "close".to_owned()));
        Reading {
            answered: Answered {
                status: status.parse().unwrap(),
                headers: comparable(fields.into_iter()),
                body: read[end + 4..].to_vec(),
            },
            direct,
            body: Body::Direct(socket),
        }
    }

    /// The same request over HTTP/2 (prior knowledge): hyper.
    async fn h2(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Reading {
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .no_gzip()
            .build()
            .unwrap();
        let mut request = client.get(app.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        let headers = response.headers().iter().map(|(name, value)| {
            let value = value.to_str().unwrap().to_owned();
            (name.as_str().to_owned(), value)
        });
        Reading {
            answered: Answered {
                status: response.status().as_u16(),
                headers: comparable(headers),
                body: Vec::new(),
            },
            direct: false,
            body: Body::H2(response),
        }
    }

    /// Reads until `until`, the body's announced length, or its end.
    async fn read(&mut self, until: Until) -> &Answered {
        let length = self
            .answered
            .headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| value.parse::<usize>().ok());
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let body = &self.answered.body;
            if until.reached(body) || length.is_some_and(|n| body.len() >= n) {
                return &self.answered;
            }
            let more = match &mut self.body {
                Body::Direct(socket) => tokio::time::timeout(SOON, socket.read(&mut buf))
                    .await
                    .map(|read| read.unwrap_or(0))
                    .map(|n| buf[..n].to_vec()),
                Body::H2(response) => tokio::time::timeout(SOON, response.chunk())
                    .await
                    .map(|chunk| chunk.unwrap().map_or_else(Vec::new, |c| c.to_vec())),
            };
            let more = more
                .unwrap_or_else(|_| panic!("stalled after {:?}", String::from_utf8_lossy(body)));
            if more.is_empty() {
                return &self.answered;
            }
            self.answered.body.extend_from_slice(&more);
        }
    }
}

/// `text` with what differs between two refusals by nature hidden: the time and the random
/// session id of Streamdata.io `error` events.
fn masked(bytes: &[u8]) -> Vec<u8> {
    let Ok(mut text) = String::from_utf8(bytes.to_vec()) else {
        // Compressed: nothing to hide (refusals are never compressed).
        return bytes.to_vec();
    };
    for key in ["\"timestamp\":", "\"sessionId\":"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(key) {
            let start = from + at + key.len();
            let end = start + text[start..].find([',', '}']).unwrap();
            text.replace_range(start..end, "_");
            from = start;
        }
    }
    text.into_bytes()
}

/// Opens the same request on both transports.
async fn both(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> [Reading; 2] {
    [
        Reading::direct(app, path, headers).await,
        Reading::h2(app, path, headers).await,
    ]
}

/// Reads both until `until`; asserts they answered the same (the bytes masked as [`masked`]
/// says), that the answer is `status`, and whether the direct path wrote it. Returns it.
async fn same(readings: &mut [Reading; 2], until: Until, status: u16, direct: bool) -> Answered {
    let [one, two] = readings;
    assert_eq!(one.direct, direct, "served by the direct path");
    let mut one = clone(one.read(until).await);
    let mut two = clone(two.read(until).await);
    one.body = masked(&one.body);
    two.body = masked(&two.body);
    assert_eq!(one, two, "the direct path (left) and HTTP/2 (right) differ");
    assert_eq!(one.status, status, "{one:?}");
    one
}

fn clone(answered: &Answered) -> Answered {
    Answered {
        status: answered.status,
        headers: answered.headers.clone(),
        body: answered.body.clone(),
    }
}

/// Asks both transports once; asserts they answered the same, with `status`, and that the
/// direct path wrote its answer.
async fn same_answer(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
    until: Until,
    status: u16,
) -> Answered {
    same(&mut both(app, path, headers).await, until, status, true).await
}

fn header<'a>(answered: &'a Answered, name: &str) -> Option<&'a str> {
    answered
        .headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn the_direct_path_and_http2_give_the_same_answers() {
    let upstream = MockUpstream::start(document(1)).await;
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&format!(
        "[server.cors]\nallow_origins = [\"{ORIGIN}\"]\n{}{}",
        polled("doc", &upstream.url()),
        proxy_toml("", "", "")
    ))
    .await;
    app.wait_for_seq("doc", 1).await;
    let epoch = app.listing("doc").await["epoch"].as_u64().unwrap();
    let asking = [("accept", "text/event-stream"), ("origin", ORIGIN)];

    // A configured stream: `retry:`, its snapshot, then a live patch.
    let mut native = both(&app, "/streams/doc", &asking).await;
    let first = same(&mut native, Until::Events(2), 200, true).await;
    assert_eq!(header(&first, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&first, "access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(header(&first, "vary"), Some("accept-encoding, origin"));
    assert!(
        String::from_utf8_lossy(&first.body).contains("event: snapshot\n"),
        "{first:?}"
    );
    upstream.set(document(2));
    let live = same(&mut native, Until::Events(3), 200, true).await;
    assert!(
        String::from_utf8_lossy(&live.body).contains(&format!("id: doc:{epoch}:2\nevent: patch\n")),
        "{live:?}"
    );
    drop(native);

    // The same, gzip-encoded: the same compressed bytes.
    let gzip = [("accept-encoding", "gzip"), ("origin", ORIGIN)];
    let compressed = same_answer(&app, "/streams/doc", &gzip, Until::GzipEvents(2), 200).await;
    assert_eq!(header(&compressed, "content-encoding"), Some("gzip"));

    // Resuming: exactly the changes after the client's last event (header or query).
    upstream.set(document(3));
    app.wait_for_seq("doc", 3).await;
    let last = format!("doc:{epoch}:1");
    let resumed = [("last-event-id", last.as_str()), ("origin", ORIGIN)];
    let replay = same_answer(&app, "/streams/doc", &resumed, Until::Events(3), 200).await;
    let text = String::from_utf8_lossy(&replay.body).into_owned();
    assert!(
        text.contains(&format!("id: doc:{epoch}:2\nevent: patch\n"))
            && text.contains(&format!("id: doc:{epoch}:3\nevent: patch\n")),
        "{text}"
    );
    let query = format!("/streams/doc?lastEventId=doc:{epoch}:2");
    same_answer(&app, &query, &asking, Until::Events(2), 200).await;

    // A Streamdata.io (proxy-mode) subscription: `retry:`, then `data`; then its native view.
    let dynamic = format!("/{}?X-Sd-Token={TOKEN}", api.url_at("/prices"));
    let streamdata = same_answer(&app, &dynamic, &asking, Until::Events(2), 200).await;
    assert!(
        String::from_utf8_lossy(&streamdata.body).contains("event: data\n"),
        "{streamdata:?}"
    );
    let name = header(&streamdata, "x-patchwire-stream")
        .unwrap()
        .to_owned();
    let view = format!("/streams/{name}?X-Sd-Token={TOKEN}");
    same_answer(&app, &view, &asking, Until::Events(2), 200).await;

    // Refusals: an unknown stream (the router's, on both), a dynamic stream without a token,
    // or of a host the proxy does not allow, the native view without a token.
    let mut unknown = both(&app, "/streams/nope", &asking).await;
    same(&mut unknown, Until::End, 404, false).await;
    let no_token = format!("/{}", api.url_at("/prices"));
    let refused = same_answer(&app, &no_token, &asking, Until::End, 200).await;
    assert!(
        String::from_utf8_lossy(&refused.body).contains("\"cause\":\"token-missing\""),
        "{refused:?}"
    );
    let elsewhere = format!("/http://example.invalid/x?X-Sd-Token={TOKEN}");
    let refused = same_answer(&app, &elsewhere, &asking, Until::End, 200).await;
    assert!(
        String::from_utf8_lossy(&refused.body).contains("\"cause\":\"host-not-allowed\""),
        "{refused:?}"
    );
    same_answer(&app, &format!("/streams/{name}"), &asking, Until::End, 401).await;
    app.stop().await;
}

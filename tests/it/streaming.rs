//! Snapshot then patches: subscribers rebuild the upstream document exactly; N subscribers
//! cost one upstream poll; the JSON view, the listing, gzip and CORS.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::support::*;

/// A document with the shapes real feeds have: an entity array, nested objects, scalars.
fn initial_document() -> Value {
    json!({
        "header": {"version": "2.0", "timestamp": 1000},
        "entities": (0..20).map(|i| json!({"id": format!("e{i}"), "value": i, "tags": ["a", "b"]})).collect::<Vec<_>>(),
        "nested": {"a": {"b": {"c": [1, 2, 3]}}},
    })
}

/// One random edit: add, remove, edit or move entities, change nested values or the header.
fn mutate(doc: &mut Value, rng: &mut StdRng, next_id: &mut u32) {
    let entities = doc["entities"].as_array_mut().unwrap();
    match rng.random_range(0..7) {
        0 => {
            *next_id += 1;
            let at = rng.random_range(0..=entities.len());
            entities.insert(
                at,
                json!({"id": format!("n{next_id}"), "value": *next_id, "tags": []}),
            );
        }
        1 if !entities.is_empty() => {
            let at = rng.random_range(0..entities.len());
            entities.remove(at);
        }
        2 if !entities.is_empty() => {
            let at = rng.random_range(0..entities.len());
            entities[at]["value"] = json!(rng.random_range(0..1000));
            entities[at]["tags"]
                .as_array_mut()
                .unwrap()
                .push(json!("x"));
        }
        3 if entities.len() > 1 => {
            let from = rng.random_range(0..entities.len());
            let e = entities.remove(from);
            let to = rng.random_range(0..=entities.len());
            entities.insert(to, e);
        }
        4 => {
            let c = doc["nested"]["a"]["b"]["c"].as_array_mut().unwrap();
            if c.len() > 1 && rng.random_bool(0.5) {
                c.pop();
            } else {
                c.push(json!({"deep": rng.random_range(0..10)}));
            }
        }
        5 => {
            doc["nested"]["a"][format!("k{}", rng.random_range(0..5))] = json!("v");
        }
        _ => {
            let t = doc["header"]["timestamp"].as_u64().unwrap();
            doc["header"]["timestamp"] = json!(t + 1);
        }
    }
}

#[tokio::test]
async fn subscriber_rebuilds_the_upstream_document_exactly() {
    let upstream = MockUpstream::start(initial_document()).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let mut client = app.subscribe("doc", &[]).await;
    assert_eq!(client.status, 200);
    assert_eq!(client.headers["content-type"], "text/event-stream");
    assert_eq!(client.headers["cache-control"], "no-cache");

    let mut rebuilt = Rebuilt::default();
    let first = client.expect(SOON).await;
    assert_eq!(
        first.event, "snapshot",
        "the first event is the whole document"
    );
    rebuilt.apply(&first);
    assert_eq!(rebuilt.document.as_ref(), Some(&upstream.document()));

    let mut rng = StdRng::seed_from_u64(7);
    let mut next_id = 0;
    for round in 0..40 {
        upstream.update(|doc| {
            for _ in 0..rng.random_range(1..4) {
                mutate(doc, &mut rng, &mut next_id);
            }
        });
        let target = upstream.document();
        assert!(
            rebuilt.converge(&mut client, &target, SOON).await,
            "round {round}: the subscriber's document differs from the upstream's"
        );
    }
    assert_eq!(rebuilt.snapshots, 1, "only the first event is a snapshot");
    assert!(rebuilt.patches >= 40, "every change arrives as a patch");
    app.stop().await;
}

#[tokio::test]
async fn gzip_subscribers_rebuild_the_same_document() {
    let upstream = MockUpstream::start(initial_document()).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    // On the wire the body is gzip (checked on raw bytes: reqwest hides the header when it decodes).
    let raw = reqwest::Client::builder().gzip(false).build().unwrap();
    let mut response = raw
        .get(app.url("/streams/doc"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let head = response.chunk().await.unwrap().unwrap();
    assert_eq!(&head[..2], &[0x1f, 0x8b], "gzip magic");
    drop(response);

    let mut client = SseClient::connect(&app.url("/streams/doc"), &[], true).await;
    let mut rebuilt = Rebuilt::default();
    rebuilt.apply(&client.expect(SOON).await);
    let mut rng = StdRng::seed_from_u64(11);
    let mut next_id = 0;
    for _ in 0..10 {
        upstream.update(|doc| mutate(doc, &mut rng, &mut next_id));
        assert!(
            rebuilt
                .converge(&mut client, &upstream.document(), SOON)
                .await
        );
    }
    app.stop().await;
}

/// A raw SSE body (reqwest decodes nothing), gzip-decoded here when it is gzip.
struct RawBody {
    response: reqwest::Response,
    raw: Vec<u8>,
    gzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
}

impl RawBody {
    async fn open(url: &str, gzip: bool) -> RawBody {
        let http = reqwest::Client::builder().gzip(false).build().unwrap();
        let mut request = http.get(url).header("accept", "text/event-stream");
        if gzip {
            request = request.header("accept-encoding", "gzip");
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response
                .headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            gzip.then_some("gzip")
        );
        RawBody {
            response,
            raw: Vec::new(),
            gzip: gzip.then(|| flate2::write::GzDecoder::new(Vec::new())),
        }
    }

    /// The events as sent (each ends with a blank line), decoded.
    fn plain(&self) -> &[u8] {
        match &self.gzip {
            Some(decoder) => decoder.get_ref(),
            None => &self.raw,
        }
    }

    fn frames(&self) -> Vec<Vec<u8>> {
        let plain = self.plain();
        let mut frames = Vec::new();
        let mut start = 0;
        for end in 1..plain.len() {
            if plain[end - 1] == b'\n' && plain[end] == b'\n' {
                frames.push(plain[start..=end].to_vec());
                start = end + 1;
            }
        }
        frames
    }

    /// Reads until at least `n` whole events arrived.
    async fn until(&mut self, n: usize) -> Vec<Vec<u8>> {
        use std::io::Write as _;
        while self.frames().len() < n {
            let chunk = tokio::time::timeout(SOON, self.response.chunk())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{n} events did not arrive: {}",
                        String::from_utf8_lossy(self.plain())
                    )
                })
                .unwrap()
                .expect("the stream stays open");
            self.raw.extend_from_slice(&chunk);
            if let Some(decoder) = &mut self.gzip {
                decoder.write_all(&chunk).unwrap();
                decoder.flush().unwrap();
            }
        }
        self.frames()
    }
}

#[tokio::test]
async fn gzip_subscribers_decode_the_same_events_at_a_non_default_level() {
    use patchwire::wire::gzip::{Deflated, GZIP_HEADER, Level};
    let level = Level::BEST;
    assert_ne!(
        level,
        Level::DEFAULT,
        "the test is of a level other than the default"
    );
    let upstream = MockUpstream::start(initial_document()).await;
    let toml = format!(
        "{}[server]\ngzip_level = {}\nkeepalive = \"10m\"\n",
        polled("doc", &upstream.url()),
        level.get()
    );
    let app = TestApp::from_toml(&toml).await;
    let url = app.url("/streams/doc");
    let mut plain = RawBody::open(&url, false).await;
    let mut gzip = RawBody::open(&url, true).await;
    // `retry:` then the snapshot.
    plain.until(2).await;
    gzip.until(2).await;
    let mut rng = StdRng::seed_from_u64(14);
    let mut next_id = 0;
    for round in 0..5 {
        upstream.update(|doc| {
            mutate(doc, &mut rng, &mut next_id);
            // A change whatever the random edit did.
            doc["header"]["timestamp"] = json!(2000 + round);
        });
        // Each change is published before the next (whatever the poll timing).
        plain.until(3 + round).await;
        gzip.until(3 + round).await;
    }
    let sent = plain.until(7).await;
    let decoded = gzip.until(7).await;
    assert_eq!(
        decoded[..7],
        sent[..7],
        "the gzip subscriber decodes the plain subscriber's events"
    );
    // On the wire: the header, then each event deflated on its own at the configured level.
    let mut expected = GZIP_HEADER.to_vec();
    for frame in &sent[..7] {
        expected.extend_from_slice(&Deflated::new(frame, level).bytes);
    }
    assert!(
        gzip.raw.starts_with(&expected),
        "the events are deflated at level {}",
        level.get()
    );
    assert_ne!(
        expected[GZIP_HEADER.len()..],
        sent[..7]
            .iter()
            .flat_map(|frame| Deflated::new(frame, Level::FAST).bytes.to_vec())
            .collect::<Vec<u8>>(),
        "levels 1 and 9 differ on these events, so the level is what the check sees"
    );

    // The JSON view's gzip is the snapshot deflated at the same level.
    let http = reqwest::Client::builder().gzip(false).build().unwrap();
    let json = |gzip: bool| {
        let mut request = http.get(&url).header("accept", "application/json");
        if gzip {
            request = request.header("accept-encoding", "gzip");
        }
        request.send()
    };
    let mut tries = 0;
    let (plain_json, gzip_json) = loop {
        tries += 1;
        assert!(tries < 20, "the snapshot kept changing");
        let a = json(false).await.unwrap();
        let (tag, body) = (a.headers()["etag"].clone(), a.bytes().await.unwrap());
        let b = json(true).await.unwrap();
        assert_eq!(b.headers()["content-encoding"], "gzip");
        let gzip_tag = b.headers()["etag"].to_str().unwrap().to_owned();
        let gzip_body = b.bytes().await.unwrap();
        // The same snapshot both times (no poll in between).
        if gzip_tag == format!("{}+gzip\"", tag.to_str().unwrap().trim_end_matches('"')) {
            break (body, gzip_body);
        }
    };
    assert_eq!(
        gzip_json,
        patchwire::wire::gzip::member(&plain_json, level),
        "the JSON snapshot is deflated at level {}",
        level.get()
    );
    app.stop().await;
}

#[tokio::test]
async fn event_ids_name_stream_epoch_and_sequence() {
    let upstream = MockUpstream::start(json!({"n": 0, "pad": "x".repeat(200)})).await;
    let app = TestApp::from_toml(&polled("ids", &upstream.url())).await;
    let mut client = app.subscribe("ids", &[]).await;
    let first = client.expect(SOON).await;
    let parts: Vec<&str> = first.id.split(':').collect();
    assert_eq!(parts.len(), 3, "id {:?}", first.id);
    assert_eq!(parts[0], "ids");
    let epoch: u64 = parts[1].parse().unwrap();
    assert_eq!(parts[2], "1");
    upstream.update(|d| d["n"] = json!(1));
    let second = client.expect(SOON).await;
    assert_eq!(second.event, "patch");
    assert_eq!(second.id, format!("ids:{epoch}:2"));
    app.stop().await;
}

#[tokio::test]
async fn json_view_returns_the_snapshot_with_an_etag() {
    let upstream = MockUpstream::start(json!({"n": 1})).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let client = reqwest::Client::new();
    // Wait for the first poll.
    let mut response = None;
    for _ in 0..50 {
        let r = client
            .get(app.url("/streams/doc"))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            response = Some(r);
            break;
        }
        assert_eq!(
            r.status(),
            503,
            "before the first poll the stream has no document"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = response.expect("the stream never got its document");
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"n": 1}));
    let again = client
        .get(app.url("/streams/doc"))
        .header("accept", "application/json")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    upstream.set(json!({"n": 2}));
    let mut changed = false;
    for _ in 0..100 {
        let r = client
            .get(app.url("/streams/doc"))
            .header("accept", "application/json")
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);
            assert_eq!(r.json::<Value>().await.unwrap(), json!({"n": 2}));
            changed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(changed, "the JSON view never showed the new document");
    app.stop().await;
}

#[tokio::test]
async fn listing_health_metrics_cors_and_unknown_streams() {
    let upstream = MockUpstream::start(json!({"n": 1})).await;
    let app = TestApp::from_toml(&polled("doc", &upstream.url())).await;
    let mut sub = app
        .subscribe("doc", &[("origin", "https://example.org")])
        .await;
    assert_eq!(sub.headers["access-control-allow-origin"], "*");
    sub.expect(SOON).await;
    let client = reqwest::Client::new();

    let list: Value = client
        .get(app.url("/streams"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let s = &list["streams"][0];
    assert_eq!(s["name"], "doc");
    assert_eq!(s["seq"], 1);
    assert_eq!(s["subscribers"], 1);
    assert!(s["upstream"]["requests"].as_u64().unwrap() >= 1);
    assert_eq!(s["upstream"]["url"], upstream.url());
    assert!(s["upstream"]["last_poll_at"].is_string());

    assert_eq!(
        client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "patchwire_polls_total{",
        "patchwire_upstream_latency_seconds_bucket{",
        "patchwire_changes_total{",
        "patchwire_change_bytes_total{",
        "patchwire_snapshot_bytes_total{",
        "patchwire_subscribers{stream=\"doc\"} 1",
        "patchwire_events_sent_total{stream=\"doc\"}",
        "patchwire_stored_snapshots_bytes ",
    ] {
        assert!(
            metrics.contains(series),
            "metrics lack {series}:\n{metrics}"
        );
    }

    let stored = metrics
        .lines()
        .find_map(|l| l.strip_prefix("patchwire_stored_snapshots_bytes "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(
        stored,
        Some(r#"{"n":1}"#.len() as u64),
        "stored snapshot bytes:\n{metrics}"
    );

    let missing = client.get(app.url("/streams/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("nope"));
    app.stop().await;
}

#[tokio::test]
async fn a_thousand_subscribers_cost_one_upstream_request_per_interval() {
    let upstream = MockUpstream::start(json!({"n": 0, "pad": "x".repeat(100)})).await;
    let app = TestApp::from_toml(&format!(
        "{}interval = \"200ms\"\n",
        polled("shared", &upstream.url())
    ))
    .await;

    let http = reqwest::Client::builder().gzip(false).build().unwrap();
    let url = app.url("/streams/shared");
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push((
            SseClient::connect_with(&http, &url, &[]).await,
            Rebuilt::default(),
        ));
    }
    for (client, rebuilt) in &mut clients {
        let first = client.expect(SOON).await;
        assert_eq!(first.event, "snapshot");
        rebuilt.apply(&first);
    }
    // Count requests over whole intervals while everyone is subscribed and the document
    // keeps changing.
    let before = upstream.requests();
    let started = std::time::Instant::now();
    for n in 1..=5 {
        upstream.update(|d| d["n"] = json!(n));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let during = upstream.requests() - before;
    let intervals = elapsed.as_millis() as usize / 200;
    assert!(
        during <= intervals + 1 && during + 1 >= intervals,
        "{during} upstream requests in {elapsed:?} ({intervals} intervals) for 1000 subscribers"
    );
    // Every subscriber converges to the final document.
    let target = upstream.document();
    for (client, rebuilt) in &mut clients {
        assert!(
            rebuilt.converge(client, &target, SOON).await,
            "a subscriber did not converge"
        );
    }
    app.stop().await;
}

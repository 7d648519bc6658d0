//! The simulated feed over a real socket: validators, conditional GETs, manual time, errors.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use patchwire::sim::{
    FeedSettings, Fleet, ManualClock, SimClock, SimulatorSettings, router, serve,
};
use reqwest::StatusCode;
use reqwest::header::{
    CONTENT_TYPE, ETAG, HeaderMap, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const EPOCH: u64 = 1_700_000_000;

fn feed(name: &str, vehicles: usize) -> FeedSettings {
    FeedSettings {
        name: name.into(),
        seed: 42,
        vehicles,
        routes: 6,
        tick: Duration::from_secs(2),
        move_fraction: 0.3,
        churn: 0.02,
        epoch_seconds: Some(EPOCH),
    }
}

/// A simulator on 127.0.0.1:0 whose time the test turns by hand.
struct TestSim {
    base: String,
    clock: ManualClock,
    client: reqwest::Client,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestSim {
    async fn start(feeds: Vec<FeedSettings>) -> TestSim {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let clock = ManualClock::new();
        let app = router(feeds, SimClock::Manual(clock.clone()));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        TestSim {
            base: format!("http://{addr}"),
            clock,
            client: client(),
            shutdown,
            task,
        }
    }

    async fn get(&self, path: &str, headers: &[(reqwest::header::HeaderName, &str)]) -> Reply {
        let mut request = self.client.get(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(name.clone(), *value);
        }
        let response = request.send().await.expect("request to the simulator");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("response body").to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("simulator stops after cancellation")
            .expect("simulator task did not panic");
        assert!(result.is_ok(), "serve failed: {result:?}");
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: reqwest::header::HeaderName) -> String {
        self.headers
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .expect("ASCII header")
            .to_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

fn http_date(unix: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(unix))
}

fn expected_document(settings: &FeedSettings, tick: u64) -> Vec<u8> {
    let mut fleet = Fleet::new(settings);
    fleet.advance_to(tick);
    fleet.to_json().to_vec()
}

#[tokio::test]
async fn serves_the_document_with_validators() {
    let sim = TestSim::start(vec![feed("fleet", 50)]).await;
    let reply = sim.get("/feeds/fleet", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header(CONTENT_TYPE), "application/json");
    assert_eq!(reply.header(LAST_MODIFIED), http_date(EPOCH));
    let etag = reply.header(ETAG);
    assert!(etag.starts_with('"') && etag.ends_with("-0\""), "{etag}");
    assert_eq!(reply.body, expected_document(&feed("fleet", 50), 0));
    let doc = reply.json();
    assert_eq!(doc["header"]["tick"], 0);
    assert_eq!(doc["vehicles"].as_array().map(Vec::len), Some(50));
    sim.stop().await;
}

#[tokio::test]
async fn if_none_match_answers_304() {
    let sim = TestSim::start(vec![feed("fleet", 20)]).await;
    let etag = sim.get("/feeds/fleet", &[]).await.header(ETAG);
    let weak = format!("W/{etag}");
    let listed = format!("\"other\", {etag}");
    for tag in [etag.as_str(), weak.as_str(), listed.as_str(), "*"] {
        let reply = sim.get("/feeds/fleet", &[(IF_NONE_MATCH, tag)]).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_MODIFIED,
            "If-None-Match: {tag}"
        );
        assert!(reply.body.is_empty());
        assert_eq!(reply.header(ETAG), etag);
    }
    let reply = sim
        .get("/feeds/fleet", &[(IF_NONE_MATCH, "\"stale\"")])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // If-None-Match takes precedence: a mismatch is a 200 even with a later If-Modified-Since.
    let later = http_date(EPOCH + 3600);
    let reply = sim
        .get(
            "/feeds/fleet",
            &[
                (IF_NONE_MATCH, "\"stale\""),
                (IF_MODIFIED_SINCE, later.as_str()),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    sim.stop().await;
}

#[tokio::test]
async fn if_modified_since_answers_304_until_the_tick_moves() {
    let sim = TestSim::start(vec![feed("fleet", 20)]).await;
    let modified = sim.get("/feeds/fleet", &[]).await.header(LAST_MODIFIED);
    let later = http_date(EPOCH + 1);
    let earlier = http_date(EPOCH - 1);
    for (since, want) in [
        (modified.as_str(), StatusCode::NOT_MODIFIED),
        (later.as_str(), StatusCode::NOT_MODIFIED),
        (earlier.as_str(), StatusCode::OK),
        ("not a date", StatusCode::OK),
    ] {
        let reply = sim.get("/feeds/fleet", &[(IF_MODIFIED_SINCE, since)]).await;
        assert_eq!(reply.status, want, "If-Modified-Since: {since}");
    }
    sim.clock.advance(1);
    let reply = sim
        .get("/feeds/fleet", &[(IF_MODIFIED_SINCE, modified.as_str())])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header(LAST_MODIFIED), http_date(EPOCH + 2));
    sim.stop().await;
}

#[tokio::test]
async fn advancing_the_clock_serves_the_next_tick_under_a_new_etag() {
    let settings = feed("fleet", 80);
    let sim = TestSim::start(vec![settings.clone()]).await;
    let first = sim.get("/feeds/fleet", &[]).await;
    let first_tag = first.header(ETAG);
    sim.clock.advance(1);
    let second = sim
        .get("/feeds/fleet", &[(IF_NONE_MATCH, first_tag.as_str())])
        .await;
    assert_eq!(second.status, StatusCode::OK);
    assert_ne!(second.header(ETAG), first_tag);
    assert_eq!(second.json()["header"]["tick"], 1);
    assert_eq!(second.body, expected_document(&settings, 1));
    assert_ne!(second.json()["vehicles"], first.json()["vehicles"]);
    // Jumps forward, then back in time (recomputed from tick 0), give the same documents as
    // a fleet stepped directly.
    for tick in [7, 30, 3, 3] {
        sim.clock.set(tick);
        let reply = sim.get("/feeds/fleet", &[]).await;
        assert_eq!(
            reply.body,
            expected_document(&settings, tick),
            "tick {tick}"
        );
        assert!(reply.header(ETAG).ends_with(&format!("-{tick}\"")));
    }
    sim.stop().await;
}

#[tokio::test]
async fn concurrent_requests_for_a_tick_get_the_same_bytes() {
    let settings = feed("big", 5_000);
    let sim = TestSim::start(vec![settings.clone()]).await;
    sim.clock.set(12);
    let url = format!("{}/feeds/big", sim.base);
    let requests: Vec<_> = (0..16)
        .map(|_| {
            let (client, url) = (sim.client.clone(), url.clone());
            tokio::spawn(async move {
                let response = client.get(url).send().await.expect("request");
                response.bytes().await.expect("body").to_vec()
            })
        })
        .collect();
    let want = expected_document(&settings, 12);
    for request in requests {
        assert_eq!(request.await.expect("request task"), want);
    }
    sim.stop().await;
}

#[tokio::test]
async fn unknown_feed_is_a_json_404_and_feeds_are_listed() {
    let sim = TestSim::start(vec![feed("north", 10), feed("south", 30)]).await;
    let reply = sim.get("/feeds/east", &[]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.header(CONTENT_TYPE), "application/json");
    let message = reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("\"east\"") && message.contains("north"),
        "{message}"
    );

    sim.clock.set(5);
    let list = sim.get("/feeds", &[]).await;
    assert_eq!(list.status, StatusCode::OK);
    let feeds = list.json()["feeds"].clone();
    let summary: Vec<(String, u64, u64)> = feeds
        .as_array()
        .expect("a list of feeds")
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap_or_default().to_owned(),
                f["tick"].as_u64().unwrap_or(u64::MAX),
                f["vehicles"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("north".to_owned(), 5, 10), ("south".to_owned(), 5, 30)]
    );
    assert_eq!(feeds[1]["path"], "/feeds/south");
    let south = sim.get("/feeds/south", &[]).await;
    assert_eq!(south.json()["header"]["feed"], "south");
    sim.stop().await;
}

#[tokio::test]
async fn serve_runs_in_real_time_and_stops_on_cancellation() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let mut settings = feed("live", 30);
    settings.tick = Duration::from_millis(10);
    settings.epoch_seconds = None;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(
        listener,
        SimulatorSettings {
            listen: addr,
            feeds: vec![settings],
        },
        shutdown.clone(),
    ));
    let client = client();
    let url = format!("http://{addr}/feeds/live");
    let fetch = || async {
        let body = client
            .get(&url)
            .send()
            .await
            .expect("request")
            .bytes()
            .await
            .expect("body");
        serde_json::from_slice::<Value>(&body).expect("JSON body")
    };
    let first = fetch().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let stamp = first["header"]["timestamp"].as_u64().unwrap_or(0);
    assert!(stamp.abs_diff(now) <= 5, "timestamp {stamp}, now {now}");
    // Time passes by itself: wait (bounded) until a later tick is served.
    let first_tick = first["header"]["tick"].as_u64().unwrap_or(u64::MAX);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tick = fetch().await["header"]["tick"].as_u64().unwrap_or(0);
        if tick > first_tick {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tick stuck at {tick}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve returns after cancellation")
        .expect("serve did not panic");
    assert!(result.is_ok(), "{result:?}");
}

//! Starting the whole application in-process on 127.0.0.1 port 0, with test-sized settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use http::HeaderMap;
use patchwire::app::{self, Listeners};
use patchwire::config::{Config, Cors, LogFormat, LogSettings, ServerSettings};
use patchwire::diff::DiffOptions;
use patchwire::upstream::config::{BackoffSettings, RateLimit, StreamSettings, UpstreamSettings};
use patchwire::upstream::decode::Format;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use serde_json::Value;

use super::raw::RawSubscriber;
use super::sse::SseClient;

/// A stream polling `url` every 100 ms.
pub fn stream(name: &str, url: &str) -> StreamSettings {
    let url: url::Url = url.parse().unwrap();
    let group = format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap()
    );
    StreamSettings {
        name: name.to_owned(),
        url,
        headers: HeaderMap::new(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
        max_body_bytes: 1 << 20,
        format: Format::Json,
        history: 100,
        history_bytes: 16 << 20,
        rate_limit_group: group,
        diff: DiffOptions::default(),
        on_demand: None,
    }
}

/// A configuration with test-sized timings around `streams`.
pub fn config(streams: Vec<StreamSettings>) -> Config {
    Config {
        source: None,
        server: ServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            keepalive: Duration::from_secs(15),
            retry_hint: Duration::from_millis(500),
            subscriber_buffer: 64,
            stall_timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(2),
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            cors: Cors::AnyOrigin,
        },
        log: LogSettings {
            format: LogFormat::Plain,
            filter: "info".into(),
        },
        upstream: UpstreamSettings {
            user_agent: "patchwire-tests".into(),
            default_rate_limit: RateLimit {
                per_second: NonZeroU32::new(1000).unwrap(),
                burst: NonZeroU32::new(1000).unwrap(),
            },
            rate_limits: BTreeMap::new(),
            backoff: BackoffSettings {
                initial: Duration::from_millis(100),
                max: Duration::from_millis(800),
                multiplier: 2.0,
                jitter: 0.0,
                max_retry_after: Duration::from_secs(5),
            },
        },
        simulator: None,
        streams,
        push: None,
        push_streams: Vec::new(),
        webhooks: None,
        proxy: None,
        websocket: patchwire::sinks::ws::WebSocketSettings::default(),
    }
}

/// A running application.
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancel to shut it down.
    pub shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Starts the application with `config` (its listen addresses are replaced by port 0).
    pub async fn spawn(mut config: Config) -> TestApp {
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        let listeners = Listeners::bind(&config).await.unwrap();
        let addr = listeners.api.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app::run(config, listeners, shutdown.clone()));
        TestApp {
            addr,
            shutdown,
            handle,
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Subscribes to `/streams/{name}` with extra headers (plain, no gzip).
    pub async fn subscribe(&self, name: &str, headers: &[(&str, &str)]) -> SseClient {
        SseClient::connect(&self.url(&format!("/streams/{name}")), headers, false).await
    }

    /// Subscribes with a raw socket whose receive buffer is `rcvbuf` bytes (see [`RawSubscriber`]).
    pub async fn subscribe_raw(&self, name: &str, rcvbuf: usize) -> RawSubscriber {
        RawSubscriber::connect(self.addr, &format!("/streams/{name}"), rcvbuf).await
    }

    /// The sum of every sample of the metric `series` (a name, optionally with the start of
    /// its labels, e.g. `patchwire_polls_total{stream="a",outcome="Error"`); 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|line| {
                line.strip_prefix(series)
                    .is_some_and(|rest| rest.starts_with(['{', ' ', ',', '}']))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `metric(series)` is at least `at_least`; returns its value.
    pub async fn wait_for_metric(&self, series: &str, at_least: f64, timeout: Duration) -> f64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.metric(series).await;
            if value >= at_least {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {value}, expected at least {at_least} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The stream's entry in the `/streams` listing.
    pub async fn listing(&self, name: &str) -> Value {
        let list: Value = reqwest::get(self.url("/streams"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no stream {name} in {list}"))
            .clone()
    }

    /// Waits until the stream's sequence number is `seq`.
    pub async fn wait_for_seq(&self, name: &str, seq: u64) {
        let deadline = tokio::time::Instant::now() + super::SOON;
        loop {
            let now = self.listing(name).await["seq"].as_u64().unwrap();
            if now == seq {
                return;
            }
            assert!(now < seq, "stream {name} is at seq {now}, past {seq}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "stream {name} stayed at seq {now}, expected {seq}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `GET /streams/{name}` with `Accept: application/json`: status and body.
    pub async fn json_view(&self, name: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(self.url(&format!("/streams/{name}")))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Shuts down and waits; returns how long it took.
    pub async fn stop(self) -> Duration {
        let started = std::time::Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("the app did not stop within 10 s")
            .expect("the app task panicked")
            .expect("the app returned an error");
        started.elapsed()
    }
}

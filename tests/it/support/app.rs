//! Starting the whole application in-process on 127.0.0.1 port 0, configured as a user
//! configures it: TOML text, parsed and validated by `patchwire::config`.

use std::net::SocketAddr;
use std::time::Duration;

use patchwire::app::{self, Listeners};
use patchwire::config::{self, Config, FileKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use serde_json::Value;

use super::raw::RawSubscriber;
use super::sse::SseClient;

/// Test-sized settings under every test's own TOML: port 0, short timeouts and grace, a fast
/// retry schedule without jitter, a rate limit that never waits, polls every 100 ms (the
/// shortest a file may ask for).
pub const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"
retry = "500ms"
subscriber_buffer = 64
stall_timeout = "2s"
shutdown_grace = "2s"

[upstream]
user_agent = "patchwire-tests"

[upstream.default_rate_limit]
per_second = 1000
burst = 1000

[upstream.backoff]
initial = "100ms"
max = "800ms"
jitter = 0.0
max_retry_after = "5s"

[stream_defaults]
interval = "100ms"
timeout = "2s"
max_body = "1 MiB"
history = 100
"#;

/// The configuration a user's file holding `toml` laid over [`BASE`] (see [`over`]) gives:
/// parsed and validated by `patchwire::config` as `patchwire run` does, `${VAR}` references
/// resolving to nothing. Panics with every problem.
pub fn config_from_toml(toml: &str) -> Config {
    let text = over(BASE, toml);
    let raw = config::parse_raw(&text, FileKind::Toml, None, Vec::new())
        .unwrap_or_else(|e| panic!("{e}\nin:\n{text}"));
    config::validate(raw, None, &|_| None).unwrap_or_else(|e| panic!("{e}\nin:\n{text}"))
}

/// The TOML text `own` laid over `base`: tables merged key by key, every other value (arrays
/// of tables included) replaced by `own`'s.
pub fn over(base: &str, own: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(into)), toml::Value::Table(from)) => merge(into, from),
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let parse = |text: &str| -> toml::Table {
        text.parse()
            .unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"))
    };
    let mut merged = parse(base);
    merge(&mut merged, parse(own));
    toml::to_string(&merged).expect("a TOML table serializes")
}

/// `[[streams]]` named `name`, polling `url`, in TOML (keys written after it belong to it).
pub fn polled(name: &str, url: &str) -> String {
    format!("[[streams]]\nname = \"{name}\"\nurl = \"{url}\"\n")
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
    /// Starts the application configured by `toml` (see [`config_from_toml`]).
    pub async fn from_toml(toml: &str) -> TestApp {
        TestApp::spawn(config_from_toml(toml)).await
    }

    /// Starts the application with `config`: one loaded from a file, or one from
    /// [`config_from_toml`] that the test set beyond what a file may ask for (it says why).
    pub async fn spawn(config: Config) -> TestApp {
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

#[test]
fn own_keys_win_tables_merge_and_arrays_are_replaced() {
    let base = "a = 1\nb = [1, 2]\n[t]\nx = 1\ny = 1\n[[list]]\nk = 1\n";
    let own = "b = [3]\n[t]\ny = 2\n[[list]]\nk = 2\n";
    let merged: toml::Table = over(base, own).parse().unwrap();
    let expected: toml::Table = "a = 1\nb = [3]\n[t]\nx = 1\ny = 2\n[[list]]\nk = 2\n"
        .parse()
        .unwrap();
    assert_eq!(merged, expected);
}

//! Webhook delivery throughput and latency with a durable outbox, to a fast receiver on
//! 127.0.0.1.
//!
//! ```text
//! cargo run --release --example webhook_load                       # defaults below
//! cargo run --release --example webhook_load -- RATE SECONDS STREAMS ENDPOINTS [STORE]
//! ```
//!
//! `STORE` is `sqlite` (the default: a temporary file with `synchronous = FULL`), `postgres` (a
//! throwaway PostgreSQL server from the system's binaries, `initdb` into a temporary directory,
//! with its durable defaults: `fsync` and `synchronous_commit` on), a `postgres://` URL (an
//! empty database of your own), or `both`: SQLite, then PostgreSQL, in the same run, and a
//! table of the two.
//!
//! Publishes `RATE` changes per second (spread over `STREAMS` streams) for `SECONDS` seconds;
//! every endpoint subscribes to every stream, so each change is `ENDPOINTS` deliveries. Prints
//! deliveries per second (from the first publish to the last delivery received) and the
//! latency from `Stream::publish` to the receiver's handler, p50/p99/max. A rate of 0 publishes
//! as fast as possible (a backlog; latency then measures queueing). Traffic stays on
//! 127.0.0.1; the run ends by itself.

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use patchwire::diff::DiffOptions;
use patchwire::hub::{Hub, Publication, Stream, StreamOptions};
use patchwire::metrics::Metrics;
use patchwire::sinks::webhook::Webhooks;
use patchwire::sinks::webhook::body::{Format, Mode};
use patchwire::sinks::webhook::config::{
    PostgresStore, WebhookEndpointSettings, WebhookSettings, WebhookStore,
};
use patchwire::sinks::webhook::outbox::postgres::PostgresOutbox;
use patchwire::sinks::webhook::outbox::sqlite::SqliteOutbox;
use patchwire::sinks::webhook::outbox::{DeliveryFilter, DeliveryState, Outbox};
use patchwire::sinks::webhook::schedule::RetrySchedule;
use patchwire::sinks::webhook::sign::Secret;
use patchwire::snapshot::SnapshotStore;
use serde::Deserialize;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use patchwire_test_data::postgres::{Durability, TempPostgres};
use support::{arg, percentile};

/// Which outbox a run measures.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Store {
    Sqlite,
    /// A throwaway server.
    Postgres,
    /// A database of the user's.
    PostgresAt(String),
}

impl Store {
    fn name(&self) -> &'static str {
        match self {
            Store::Sqlite => "SQLite",
            Store::Postgres | Store::PostgresAt(_) => "PostgreSQL",
        }
    }
}

/// What one run measured.
struct Measured {
    store: &'static str,
    delivered: u64,
    expected: u64,
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

type Arrivals = Arc<Mutex<HashMap<(String, u64), Vec<Instant>>>>;

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    stream: &'a str,
    seq: u64,
}

fn receive(arrivals: &Arrivals, body: Bytes) {
    let at = Instant::now();
    if let Ok(head) = serde_json::from_slice::<Head<'_>>(&body) {
        arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((head.stream.to_owned(), head.seq))
            .or_default()
            .push(at);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = (|| -> Result<_, String> {
        Ok((
            arg(&args, 0, 1000)?,
            arg(&args, 1, 10)?,
            arg(&args, 2, 16)?,
            arg(&args, 3, 8)?,
        ))
    })();
    let stores = match args.get(4).map(String::as_str) {
        None | Some("sqlite") => vec![Store::Sqlite],
        Some("postgres") => vec![Store::Postgres],
        Some("both") => vec![Store::Sqlite, Store::Postgres],
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            vec![Store::PostgresAt(url.to_owned())]
        }
        Some(other) => {
            eprintln!(
                "webhook_load: expected STORE to be sqlite, postgres, both or a postgres:// URL, \
                 got {other:?}"
            );
            return ExitCode::FAILURE;
        }
    };
    let (rate, seconds, streams, endpoints) = match parsed {
        Ok(p) if p.2 > 0 && p.3 > 0 && p.1 > 0 => p,
        Ok(_) => {
            eprintln!("webhook_load: SECONDS, STREAMS and ENDPOINTS must be at least 1");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("webhook_load: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    support::run("webhook_load", async move {
        let mut table = Vec::new();
        for store in stores {
            // A throwaway server lives for its run only.
            let server = match store {
                Store::Postgres => Some(
                    TempPostgres::start(Durability::Durable)
                        .ok_or_else(|| anyhow::anyhow!("PostgreSQL is not installed"))?,
                ),
                _ => None,
            };
            let url = match (&store, &server) {
                (Store::PostgresAt(url), _) => Some(url.clone()),
                (_, Some(server)) => Some(server.url()),
                _ => None,
            };
            table.push(run(rate, seconds, streams, endpoints, store.name(), url).await?);
        }
        if table.len() > 1 {
            println!();
            println!("| store | deliveries | delivered/s | p50 | p99 |");
            println!("| --- | --- | --- | --- | --- |");
            for m in &table {
                println!(
                    "| {} | {} of {} | {:.0} | {:.1} ms | {:.1} ms |",
                    m.store,
                    m.delivered,
                    m.expected,
                    m.per_second,
                    m.p50.as_secs_f64() * 1e3,
                    m.p99.as_secs_f64() * 1e3
                );
            }
        }
        Ok(())
    })
}

async fn run(
    rate: u64,
    seconds: u64,
    stream_count: u64,
    endpoint_count: u64,
    store_name: &'static str,
    postgres: Option<String>,
) -> anyhow::Result<Measured> {
    let arrivals: Arrivals = Arc::default();
    let (addr, stop) = support::receiver(arrivals.clone(), receive).await?;

    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new());
    let snapshots = SnapshotStore::new();
    let names: Vec<String> = (0..stream_count).map(|i| format!("s{i}")).collect();
    let streams: Vec<Arc<Stream>> = names
        .iter()
        .map(|name| {
            hub.insert(Arc::new(Stream::new(
                name,
                StreamOptions {
                    history: 16,
                    history_bytes: u64::MAX,
                    buffer: 65_536,
                    diff: DiffOptions::default(),
                },
                snapshots.clone(),
                metrics.clone(),
            )))
        })
        .collect();
    let dir = tempfile::tempdir()?;
    let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
    let store = match &postgres {
        None => WebhookStore::Sqlite(dir.path().join("outbox.db")),
        Some(url) => WebhookStore::Postgres(PostgresStore {
            url: url.parse()?,
            connections: 16,
        }),
    };
    let settings = WebhookSettings {
        store: store.clone(),
        claim_timeout: Duration::from_secs(30),
        allow_private_targets: true,
        admin_token: None,
        schedule: RetrySchedule::default(),
        attempt_timeout: Duration::from_secs(15),
        disable_after: Duration::from_secs(3600),
        max_concurrency_per_endpoint: 256,
        workers: 256,
        backlog_limit: 1_000_000,
        retention: Duration::from_secs(3600),
        attempt_retention: Duration::from_secs(3600),
        rotation_overlap: Duration::from_secs(3600),
        operator: None,
        endpoints: (0..endpoint_count)
            .map(|i| WebhookEndpointSettings {
                id: format!("e{i}"),
                url: format!("http://{addr}/hook/{i}")
                    .parse()
                    .expect("a valid URL"),
                streams: names.clone(),
                views: Vec::new(),
                mode: Mode::Patch,
                format: Format::Json,
                headers: Default::default(),
                secret: secret.clone(),
                description: None,
                metadata: Default::default(),
                events: Default::default(),
                rate_limit: None,
            })
            .collect(),
    };
    let outbox: Arc<dyn Outbox> = match (&store, &postgres) {
        (WebhookStore::Sqlite(path), _) => Arc::new(SqliteOutbox::open(path).await?),
        (_, Some(url)) => {
            Arc::new(PostgresOutbox::open(url, 16, "the benchmark's database").await?)
        }
        (_, None) => anyhow::bail!("no PostgreSQL URL"),
    };
    let mut tasks = JoinSet::new();
    let shutdown = CancellationToken::new();
    Webhooks::start(
        &settings,
        outbox.clone(),
        hub.clone(),
        Arc::new(patchwire::views::Views::new()),
        &Default::default(),
        "patchwire-load",
        &mut tasks,
        shutdown.clone(),
        Arc::new(patchwire::metrics::Metrics::new()),
        None,
    )
    .await?;

    // Publish: documents with a counter and some payload; each change is a one-field patch.
    let pad = "x".repeat(200);
    let total = if rate == 0 {
        2_000 * seconds
    } else {
        rate * seconds
    };
    let mut published: HashMap<(String, u64), Instant> = HashMap::new();
    let started = Instant::now();
    for i in 0..total {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        } else if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
        let stream = &streams[(i % stream_count) as usize];
        let document = json!({"n": i, "pad": pad});
        let at = Instant::now();
        if let Publication::Published(change) = stream.publish(document) {
            published.insert((stream.name().to_owned(), change.seq), at);
        }
    }
    let publish_done = started.elapsed();
    let expected = published.len() as u64 * endpoint_count;

    let deadline = Instant::now() + Duration::from_secs(30 + seconds * 4);
    let mut last_count = 0;
    loop {
        let count: u64 = arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|v| v.len() as u64)
            .sum();
        if count >= expected || Instant::now() > deadline {
            last_count = last_count.max(count);
            break;
        }
        last_count = count;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last_arrival = arrivals
        .values()
        .flatten()
        .max()
        .map_or(elapsed, |t| t.duration_since(started));
    let mut latencies: Vec<Duration> = Vec::with_capacity(expected as usize);
    for (key, times) in &arrivals {
        if let Some(sent) = published.get(key) {
            latencies.extend(times.iter().map(|t| t.duration_since(*sent)));
        }
    }
    latencies.sort();
    println!(
        "{store_name}: streams {stream_count}, endpoints {endpoint_count} (every endpoint on every \
         stream), rate {} changes/s for {seconds} s",
        if rate == 0 {
            "max".to_owned()
        } else {
            rate.to_string()
        }
    );
    println!(
        "published {} changes in {:.2} s; expected {expected} deliveries, received {last_count}",
        published.len(),
        publish_done.as_secs_f64()
    );
    println!(
        "throughput: {:.0} deliveries/s (first publish to last delivery, {:.2} s)",
        last_count as f64 / last_arrival.as_secs_f64(),
        last_arrival.as_secs_f64()
    );
    println!(
        "latency publish -> received: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    shutdown.cancel();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if last_count < expected {
        // Explain the shortfall: what the outbox still holds, and why.
        let mut errors: HashMap<String, usize> = HashMap::new();
        for i in 0..endpoint_count {
            for state in [
                DeliveryState::Pending,
                DeliveryState::Dead,
                DeliveryState::Superseded,
            ] {
                let list = outbox
                    .deliveries(
                        format!("e{i}"),
                        DeliveryFilter {
                            state: Some(state),
                            before: None,
                            limit: 1_000_000,
                        },
                    )
                    .await?;
                for d in list {
                    let key = format!(
                        "{} after {} attempts: {}",
                        state.as_str(),
                        d.attempts,
                        d.last_error.unwrap_or_default()
                    );
                    *errors.entry(key).or_default() += 1;
                }
            }
        }
        for (error, n) in &errors {
            eprintln!("{n} deliveries {error}");
        }
        anyhow::bail!("only {last_count} of {expected} deliveries arrived");
    }
    Ok(Measured {
        store: store_name,
        delivered: last_count,
        expected,
        per_second: last_count as f64 / last_arrival.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    })
}

//! Broker sink throughput and latency: changes published with acknowledgement to NATS
//! JetStream or Redis Streams, and the time from `Stream::publish` to a consumer receiving
//! each one.
//!
//! ```text
//! cargo run --release --example broker_load -- nats nats://127.0.0.1:4222 RATE SECONDS STREAMS
//! cargo run --release --example broker_load -- redis redis://127.0.0.1:6379 RATE SECONDS STREAMS
//! benches/brokers/run.sh        # starts nats-server -js and redis-server on free ports, runs both
//! ```
//!
//! Publishes `RATE` changes per second (spread over `STREAMS` streams, default 1000 10 4) for
//! `SECONDS` seconds through a real sink (the default settings: batches of 256, a queue of
//! 10,000); a rate of 0 publishes as fast as possible. A consumer reads every message as it
//! arrives (a JetStream pull consumer on `patchwire.>`; `XREAD BLOCK` on every key). Prints the
//! changes per second from the first publish to the broker's acknowledgement of the last one,
//! the publish-to-consume latency, p50/p99/max, and how many changes reached the consumer only
//! inside a resync snapshot (offered faster than the broker takes them, the sink falls more
//! than its queue behind and resyncs). Traffic stays on the broker's address; the run ends
//! by itself.

// The shared receiver serves the webhook examples; this one reads brokers.
#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use patchwire::diff::DiffOptions;
use patchwire::hub::{Hub, Publication, Stream, StreamOptions};
use patchwire::metrics::Metrics;
use patchwire::sinks::broker::config::{BrokerKind, BrokerSinkSettings, RawSinks, Source};
use patchwire::sinks::broker::{Brokers, Turns};
use patchwire::snapshot::SnapshotStore;
use patchwire::validation::Problems;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use support::{arg, percentile};

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(kind), Some(url)) = (args.first().cloned(), args.get(1).cloned()) else {
        eprintln!("broker_load: expected KIND (nats or redis) and URL, then RATE SECONDS STREAMS");
        return ExitCode::FAILURE;
    };
    let parsed = (|| -> Result<_, String> {
        Ok((arg(&args, 2, 1000)?, arg(&args, 3, 10)?, arg(&args, 4, 4)?))
    })();
    let (rate, seconds, streams) = match parsed {
        Ok(p) if p.1 > 0 && p.2 > 0 => p,
        Ok(_) => {
            eprintln!("broker_load: SECONDS and STREAMS must be at least 1");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("broker_load: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    support::run("broker_load", run(kind, url, rate, seconds, streams))
}

/// The sink, validated from TOML as a user's file would be.
fn sink(kind: &str, url: &str, names: &[String]) -> anyhow::Result<BrokerSinkSettings> {
    let text = match kind {
        "nats" => format!("[[nats]]\nurl = \"{url}\"\njetstream = \"LOAD\"\n"),
        "redis" => format!("[[redis]]\nurl = \"{url}\"\nkey = \"load:{{stream}}\"\n"),
        other => anyhow::bail!("expected nats or redis, got {other:?}"),
    };
    let raw: RawSinks = toml::from_str(&text)?;
    let mut problems = Problems::default();
    let sources: Vec<Source<'_>> = names
        .iter()
        .map(|name| Source { name, views: None })
        .collect();
    let mut sinks = raw.validate(&sources, &|_| None, &mut problems);
    problems.finish(None, ())?;
    sinks
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no sink configured"))
}

fn ce_id(headers: &async_nats::HeaderMap) -> Option<String> {
    headers.get("ce-id").map(|v| v.as_str().to_owned())
}

/// Reads every message as it arrives, recording when its id first came.
async fn consume(
    sink: &BrokerSinkSettings,
    arrivals: Arrivals,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let record = |id: String| {
        arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_insert_with(Instant::now);
    };
    match &sink.kind {
        BrokerKind::Nats(nats) => {
            let client = async_nats::connect(nats.url.as_str()).await?;
            let context = async_nats::jetstream::new(client);
            // The sink creates the stream; wait for it.
            let stream = loop {
                if let Ok(stream) = context.get_stream(&nats.jetstream).await {
                    break stream;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let consumer = stream
                .create_consumer(async_nats::jetstream::consumer::pull::Config {
                    filter_subject: "patchwire.>".into(),
                    deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
                    ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                    ..Default::default()
                })
                .await?;
            let mut messages = consumer.messages().await?;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    message = messages.next() => match message {
                        Some(Ok(message)) => {
                            if let Some(id) = message.headers.as_ref().and_then(ce_id) {
                                record(id);
                            }
                        }
                        // A missed heartbeat under load; the stream goes on.
                        Some(Err(e)) => eprintln!("broker_load: consumer: {e}"),
                        None => return Ok(()),
                    },
                }
            }
        }
        BrokerKind::Redis(redis) => {
            let client = redis::Client::open(redis.url.as_str())?;
            let mut connection = client.get_multiplexed_async_connection().await?;
            let keys: Vec<String> = sink.streams.iter().map(|s| s.destination.clone()).collect();
            let mut after: Vec<String> = keys.iter().map(|_| "0-0".to_owned()).collect();
            loop {
                let mut command = redis::cmd("XREAD");
                command
                    .arg("BLOCK")
                    .arg(200)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&keys)
                    .arg(&after);
                let read = command.query_async::<redis::streams::StreamReadReply>(&mut connection);
                let reply = tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    reply = read => reply?,
                };
                for key in reply.keys {
                    let Some(i) = keys.iter().position(|k| *k == key.key) else {
                        continue;
                    };
                    for entry in key.ids {
                        if let Some(id) = entry.get::<String>("ce-id") {
                            record(id);
                        }
                        after[i] = entry.id;
                    }
                }
            }
        }
    }
}

/// Resync snapshots the sink published (from the metrics' text).
fn resyncs(metrics: &Metrics) -> f64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("patchwire_broker_resyncs_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

async fn run(
    kind: String,
    url: String,
    rate: u64,
    seconds: u64,
    stream_count: u64,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new());
    let snapshots = SnapshotStore::new();
    let names: Vec<String> = (0..stream_count).map(|i| format!("load{i}")).collect();
    let streams: Vec<Arc<Stream>> = names
        .iter()
        .map(|name| {
            hub.insert(Arc::new(Stream::new(
                name,
                StreamOptions {
                    history: 1000,
                    history_bytes: u64::MAX,
                    buffer: 65_536,
                    diff: DiffOptions::default(),
                },
                snapshots.clone(),
                metrics.clone(),
            )))
        })
        .collect();
    let sink = sink(&kind, &url, &names)?;
    let arrivals: Arrivals = Arc::default();
    let stop = CancellationToken::new();
    let consumer = {
        let (sink, arrivals, stop) = (sink.clone(), arrivals.clone(), stop.clone());
        tokio::spawn(async move { consume(&sink, arrivals, stop).await })
    };
    let shutdown = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let brokers = Brokers::start(
        std::slice::from_ref(&sink),
        &hub,
        &patchwire::views::Views::new(),
        false,
        &Turns::new(),
        tasks.clone(),
        shutdown.clone(),
        metrics.clone(),
    )
    .await?;
    // The first document of each stream, then wait until every sink acknowledged it, so the
    // measurement starts with connections made and streams created.
    for stream in &streams {
        stream.publish(json!({"n": 0, "pad": "x".repeat(200)}));
    }
    let ready = Instant::now() + Duration::from_secs(20);
    while brokers
        .statuses()
        .iter()
        .any(|s| s.acknowledged().is_none())
    {
        anyhow::ensure!(
            Instant::now() < ready,
            "the broker did not acknowledge within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pad = "x".repeat(200);
    let total = if rate == 0 {
        5_000 * seconds
    } else {
        rate * seconds
    };
    let mut published: HashMap<String, Instant> = HashMap::new();
    let started = Instant::now();
    for i in 1..=total {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        } else if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
        let stream = &streams[(i % stream_count) as usize];
        let at = Instant::now();
        if let Publication::Published(change) = stream.publish(json!({"n": i, "pad": pad})) {
            published.insert(change.id().to_string(), at);
        }
    }
    let publish_done = started.elapsed();
    // Until every stream's sink acknowledged its top, and the consumer saw every change.
    let deadline = Instant::now() + Duration::from_secs(30 + seconds * 4);
    let mut acknowledged_at = None;
    // Changes covered by a resync snapshot never arrive on their own: once the top is
    // acknowledged, stop when nothing new arrived for a second.
    let mut quiet_since = (0, Instant::now());
    loop {
        let acked = brokers.statuses().iter().all(|s| {
            let stream = hub.get(&s.stream);
            stream.is_some_and(|st| s.acknowledged().map(|p| p.seq) == Some(st.seq()))
        });
        if acked && acknowledged_at.is_none() {
            acknowledged_at = Some(started.elapsed());
        }
        let seen = {
            let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
            published
                .keys()
                .filter(|k| arrivals.contains_key(*k))
                .count()
        };
        if seen != quiet_since.0 {
            quiet_since = (seen, Instant::now());
        }
        let quiet = quiet_since.1.elapsed() > Duration::from_secs(1);
        if (acked && (seen == published.len() || quiet)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    match consumer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("broker_load: the consumer stopped: {e:#}"),
        Err(e) => eprintln!("broker_load: the consumer panicked: {e}"),
    }
    let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut latencies: Vec<Duration> = published
        .iter()
        .filter_map(|(id, sent)| Some(arrivals.get(id)?.duration_since(*sent)))
        .collect();
    latencies.sort();
    let acknowledged = acknowledged_at.unwrap_or_else(|| started.elapsed());
    println!(
        "{kind}: {} streams, rate {} changes/s for {seconds} s",
        stream_count,
        if rate == 0 {
            "max".to_owned()
        } else {
            rate.to_string()
        }
    );
    println!(
        "published {} changes in {:.2} s; the broker acknowledged the last one after {:.2} s: \
         {:.0} changes/s",
        published.len(),
        publish_done.as_secs_f64(),
        acknowledged.as_secs_f64(),
        published.len() as f64 / acknowledged.as_secs_f64()
    );
    println!(
        "consumed {} of {}; latency publish -> consumed: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        published.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        tasks.close();
        tasks.wait().await;
    })
    .await;
    if latencies.len() < published.len() {
        // Not lost: the sink fell more than its queue behind and published snapshots instead
        // (the consumer's document is whole; those changes' own messages never existed).
        println!(
            "{} changes were covered by snapshots: the sink fell behind by more than its queue \
             ({} resync snapshots)",
            published.len() - latencies.len(),
            resyncs(&metrics)
        );
    }
    Ok(())
}

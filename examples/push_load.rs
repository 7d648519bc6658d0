//! Push-to-durable latency and throughput: pushes through the real HTTP API of a `patchwire`
//! binary with webhooks enabled, to a fast receiver on 127.0.0.1.
//!
//! ```text
//! cargo run --release --example push_load -- BINARY [PUSHES] [CONCURRENCY] [STREAMS]
//! ```
//!
//! Starts `BINARY run` with a push source, `STREAMS` push streams (default 4) and one webhook
//! endpoint subscribed to all of them (outbox in a temporary directory), then sends `PUSHES`
//! (default 2000) `POST /streams/{name}` requests from `CONCURRENCY` (default 16) concurrent
//! clients, each a new document (a counter and 200 bytes of padding), spread round-robin over
//! the streams. Prints pushes per second and the request latency (sent to answered) p50/p99/
//! max, then waits until the receiver has the last change of every stream. Run it against two
//! binaries (the base commit's and this one's) to compare. Traffic stays on 127.0.0.1.

mod support;

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Bytes;
use serde_json::{Value, json};

use support::{arg, percentile};

const TOKEN: &str = "push-load-token-0123456789";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The highest `n` received per stream.
type Received = Arc<Vec<AtomicU64>>;

fn receive(received: &Received, body: Bytes) {
    if let Ok(body) = serde_json::from_slice::<Value>(&body) {
        let stream = body["stream"].as_str().unwrap_or_default();
        let index = stream
            .strip_prefix('p')
            .and_then(|i| i.parse::<usize>().ok());
        // A snapshot carries `n` in `data`; a patch replaces `/n`.
        let n = body["data"]["n"].as_u64().or_else(|| {
            body["data"].as_array().and_then(|ops| {
                ops.iter()
                    .find(|op| op["path"] == "/n")
                    .and_then(|op| op["value"].as_u64())
            })
        });
        if let (Some(i), Some(n)) = (index, n)
            && let Some(slot) = received.get(i)
        {
            slot.fetch_max(n, Ordering::Relaxed);
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(binary) = args.first().cloned() else {
        eprintln!("push_load: expected the path of a patchwire binary as the first argument");
        return ExitCode::FAILURE;
    };
    let parsed = (|| -> Result<_, String> {
        Ok((arg(&args, 1, 2000)?, arg(&args, 2, 16)?, arg(&args, 3, 4)?))
    })();
    let (pushes, concurrency, streams) = match parsed {
        Ok(p) if p.0 > 0 && p.1 > 0 && p.2 > 0 => p,
        Ok(_) => {
            eprintln!("push_load: PUSHES, CONCURRENCY and STREAMS must be at least 1");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("push_load: {e}");
            return ExitCode::FAILURE;
        }
    };
    support::run("push_load", run(&binary, pushes, concurrency, streams))
}

async fn run(binary: &str, pushes: u64, concurrency: u64, streams: u64) -> anyhow::Result<()> {
    let received: Received = Arc::new((0..streams).map(|_| AtomicU64::new(0)).collect());
    let (receiver, stop) = support::receiver(received.clone(), receive).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"1s\"\n\n[log]\nlevel = \"warn\"\n\n\
         [push]\ntoken = \"{TOKEN}\"\n\n"
    );
    let names: Vec<String> = (0..streams).map(|i| format!("p{i}")).collect();
    for name in &names {
        config.push_str(&format!(
            "[[streams]]\nname = \"{name}\"\nsource = \"push\"\n\n"
        ));
    }
    config.push_str(&format!(
        "[webhooks]\ndatabase = \"{db}\"\nallow_private_targets = true\n\n\
         [[webhooks.endpoints]]\nid = \"load\"\nurl = \"http://{receiver}/hook\"\nstreams = {streams}\nsecret = \"{SECRET}\"\n",
        db = dir.path().join("outbox.db").display(),
        streams = serde_json::to_string(&names)?,
    ));
    let config_path = dir.path().join("patchwire.toml");
    std::fs::write(&config_path, config)?;
    let mut child = tokio::process::Command::new(binary)
        .args(["run", "--config"])
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {binary}"))?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::try_from(concurrency).unwrap_or(usize::MAX))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{binary} never became healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pad = "x".repeat(200);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, base, next, names, pad) = (
            client.clone(),
            base.clone(),
            next.clone(),
            names.clone(),
            pad.clone(),
        );
        clients.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= pushes {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let name = &names[usize::try_from(i % names.len() as u64).unwrap_or(0)];
                let body = json!({"n": i + 1, "pad": pad}).to_string();
                let sent = Instant::now();
                let response = client
                    .post(format!("{base}/streams/{name}"))
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "push answered {}",
                    response.status()
                );
                latencies.push(sent.elapsed());
            }
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = clients.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    // Every stream's last push reached the receiver.
    let deadline = Instant::now() + Duration::from_secs(120);
    let last: Vec<u64> = (0..streams)
        .map(|s| {
            (0..pushes)
                .filter(|i| i % streams == s)
                .max()
                .map_or(0, |i| i + 1)
        })
        .collect();
    while !received
        .iter()
        .zip(&last)
        .all(|(got, want)| got.load(Ordering::Relaxed) >= *want)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the receiver never got every last change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = started.elapsed();
    println!(
        "pushes={pushes} concurrency={concurrency} streams={streams} pushes_per_s={:.0} \
         p50_ms={:.2} p99_ms={:.2} max_ms={:.2} all_delivered_after_s={:.2}",
        pushes as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        delivered.as_secs_f64(),
    );
    let _ = child.start_kill();
    let _ = child.wait().await;
    stop.cancel();
    Ok(())
}

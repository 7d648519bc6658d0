//! Fan-out benchmarks: one change to many in-process subscribers, snapshot serialization of
//! simulator fleets, and SSE framing (plain and deflated). The end-to-end comparison with
//! other servers is `benches/fanout/run.sh`; these isolate the in-process costs.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use patchwire::diff::DiffOptions;
use patchwire::hub::{Resume, Stream, StreamEvent, StreamOptions};
use patchwire::metrics::Metrics;
use patchwire::sim::{FeedSettings, Fleet};
use patchwire::sinks::sse;
use patchwire::snapshot::{Snapshot, SnapshotStore};
use patchwire::wire::{self, Dialect};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

fn document(k: u64) -> serde_json::Value {
    json!({"m": format!("MARK{k};"), "pad": "x".repeat(400)})
}

/// Time from `Stream::publish` until every one of `n` subscriber tasks (on a 2-thread
/// runtime, as on the project machine) has received the change.
fn publish_to_all(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout/publish_to_all");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for n in [1usize, 1_000, 10_000] {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let stream = Arc::new(Stream::new(
            "bench",
            StreamOptions {
                history: 16,
                history_bytes: u64::MAX,
                buffer: 256,
                diff: DiffOptions::default(),
            },
            SnapshotStore::new(),
            Arc::new(Metrics::new()),
        ));
        stream.publish(document(0));
        let remaining = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        for _ in 0..n {
            let mut live = stream.subscribe(&Resume::Fresh).live;
            let remaining = remaining.clone();
            let done = done_tx.clone();
            runtime.spawn(async move {
                loop {
                    match live.recv().await {
                        Ok(StreamEvent::Change(change, _)) => {
                            black_box(sse::change_frame(&change, Dialect::Native));
                            if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                                let _ = done.send(());
                            }
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    }
                }
            });
        }
        let mut k = 0u64;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    k += 1;
                    let doc = document(k);
                    remaining.store(n, Ordering::Release);
                    let started = Instant::now();
                    stream.publish(doc);
                    done_rx
                        .recv_timeout(Duration::from_secs(30))
                        .expect("every subscriber gets the change within 30 s");
                    total += started.elapsed();
                }
                total
            });
        });
        stream.close();
        runtime.shutdown_timeout(Duration::from_secs(5));
    }
    group.finish();
}

fn fleet(vehicles: usize) -> serde_json::Value {
    Fleet::new(&FeedSettings {
        name: "fleet".into(),
        seed: 42,
        vehicles,
        routes: 12,
        tick: Duration::from_secs(1),
        move_fraction: 0.3,
        churn: 0.02,
        epoch_seconds: Some(1_700_000_000),
    })
    .document()
}

/// `Snapshot::new` (serializing the document once for every subscriber) on fleet documents.
fn snapshot_serialization(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout/snapshot_new");
    group.sample_size(20);
    for vehicles in [1_000usize, 10_000] {
        let doc = fleet(vehicles);
        let bytes = Snapshot::new(1, 1, doc.clone()).json.len();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::from_parameter(vehicles), |b| {
            b.iter_batched(
                || doc.clone(),
                |doc| Snapshot::new(1, 1, doc),
                criterion::BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

/// Framing one event, and deflating it once for gzip subscribers.
fn sse_framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout/sse");
    let small = serde_json::to_vec(&json!([{"op": "replace", "path": "/m", "value": "MARK7;"}]))
        .expect("JSON");
    let medium = serde_json::to_vec(&document(7)).expect("JSON");
    let large = serde_json::to_vec(&fleet(1_000)).expect("JSON");
    for (name, payload) in [("patch", &small), ("430B", &medium), ("fleet1k", &large)] {
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_with_input(BenchmarkId::new("event", name), payload, |b, p| {
            b.iter(|| wire::sse::event(Some("bench:1700000000000:7"), "patch", p));
        });
        let event = wire::sse::event(Some("bench:1700000000000:7"), "patch", payload);
        group.bench_with_input(BenchmarkId::new("deflate", name), &event, |b, e| {
            b.iter(|| wire::gzip::Deflated::new(e, wire::gzip::Level::DEFAULT));
        });
    }
    group.finish();
}

criterion_group!(benches, publish_to_all, snapshot_serialization, sse_framing);
criterion_main!(benches);

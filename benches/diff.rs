//! Diff engine benchmark: patch bytes (raw and gzip), diff time per pair, and the time to parse
//! the new snapshot, next to `json_patch::diff` on the same pairs in the same run.
//!
//! Cases: the Bay Wheels GBFS `station_status` sequence and the three MBTA GTFS-realtime
//! sequences (decoded with `format = "gtfs-rt"` and diffed with its default keys and ignored
//! paths; `../shared/data`, skipped when absent), and synthetic fleets of 1k/10k/100k vehicles with 1% changing per poll, with and without
//! 1% churn (0.5% of vehicles leave, 0.5% join at random places).
//!
//! Run: `cargo bench --bench diff`. Two tables are printed first: sizes, then interleaved
//! timings (the fairest comparison on a loaded machine); criterion's groups follow. Set
//! `DIFF_BENCH_CASES=tripupdates,fleet-1k` to run only the cases whose names contain one of
//! the fragments (for profiling one case).

use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use flate2::Compression;
use flate2::write::GzEncoder;
use patchwire::diff::{self, DiffConfig, DiffOptions};
use patchwire::upstream::decode::gtfs_rt;
use patchwire::validation::Problems;
use serde_json::{Value, json};

/// A deterministic generator (xorshift64*), so every run measures the same pairs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn vehicle(id: u64, step: u64, rng: &mut Rng) -> Value {
    let jitter = (rng.next() % 1000) as f64 / 1e5;
    json!({
        "id": format!("veh-{id}"),
        "vehicle": {
            "trip": {"trip_id": format!("trip-{}", id * 7 % 9973), "route_id": format!("route-{}", id % 97), "direction_id": id % 2},
            "position": {"latitude": 42.3 + (id % 1000) as f64 / 1e4 + jitter, "longitude": -71.06 - (id % 977) as f64 / 1e4 - jitter, "bearing": (id * 37 % 360) as f64, "speed": (rng.next() % 20) as f64},
            "current_stop_sequence": (step + id) % 40,
            "current_status": "IN_TRANSIT_TO",
            "timestamp": 1_700_000_000 + step * 10,
            "vehicle": {"id": format!("y{id}"), "label": format!("{}", 1000 + id)},
        }
    })
}

/// `steps + 1` snapshots of a fleet of `n`, each poll changing 1% of the vehicles and, with
/// `churn`, replacing another 0.5% by new vehicles inserted at random positions.
fn fleet_sequence(n: usize, steps: usize, churn: bool) -> Vec<Value> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ n as u64);
    let mut entities: Vec<Value> = (0..n as u64).map(|id| vehicle(id, 0, &mut rng)).collect();
    let mut next_id = n as u64;
    let snapshot = |entities: &Vec<Value>, step: u64| json!({"header": {"gtfs_realtime_version": "2.0", "incrementality": "FULL_DATASET", "timestamp": 1_700_000_000 + step * 10}, "entity": entities});
    let mut out = vec![snapshot(&entities, 0)];
    for step in 1..=steps as u64 {
        for _ in 0..(n / 100).max(1) {
            let i = rng.below(entities.len());
            let id = entities[i]["id"]
                .as_str()
                .and_then(|s| s.strip_prefix("veh-"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            entities[i] = vehicle(id, step, &mut rng);
        }
        if churn {
            for _ in 0..(n / 200).max(1) {
                let i = rng.below(entities.len());
                entities.remove(i);
                let at = rng.below(entities.len() + 1);
                entities.insert(at, vehicle(next_id, step, &mut rng));
                next_id += 1;
            }
        }
        out.push(snapshot(&entities, step));
    }
    out
}

fn gbfs_sequence() -> Option<Vec<Value>> {
    let dir = Path::new("../shared/data/gbfs/baywheels-station_status");
    let Ok(entries) = std::fs::read_dir(dir) else {
        eprintln!("SKIP gbfs: {} is missing", dir.display());
        return None;
    };
    let mut names: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("station_status_"))
        })
        .collect();
    names.sort();
    let docs: Vec<Value> = names
        .iter()
        .filter_map(|p| {
            std::fs::read(p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        })
        .collect();
    (docs.len() >= 2).then_some(docs)
}

/// The polls of one MBTA GTFS-realtime sequence, decoded as a `gtfs-rt` stream decodes them.
fn gtfs_sequence(name: &str) -> Option<Vec<Value>> {
    let dir = Path::new("../shared/data/gtfs-rt/sequences/mbta-lamp").join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("SKIP gtfs-rt: {} is missing", dir.display());
        return None;
    };
    let mut names: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pb"))
        .collect();
    names.sort();
    let docs: Vec<Value> = names
        .iter()
        .filter_map(|p| std::fs::read(p).ok().and_then(|b| gtfs_rt::decode(&b).ok()))
        .collect();
    (docs.len() >= 2).then_some(docs)
}

/// The options a `format = "gtfs-rt"` stream gets by default.
fn gtfs_options() -> DiffOptions {
    let config = DiffConfig {
        keys: Some(
            gtfs_rt::DEFAULT_KEYS
                .iter()
                .map(|(array, key)| ((*array).to_owned(), (*key).to_owned()))
                .collect(),
        ),
        ignore: Some(
            gtfs_rt::DEFAULT_IGNORE
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
        ),
        ..DiffConfig::default()
    };
    let mut problems = Problems::default();
    config.validate("bench", &mut problems).unwrap_or_default()
}

fn gzip_len(bytes: &[u8]) -> usize {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    if enc.write_all(bytes).is_err() {
        return usize::MAX;
    }
    enc.finish().map_or(usize::MAX, |v| v.len())
}

fn median(mut xs: Vec<usize>) -> usize {
    xs.sort_unstable();
    xs[xs.len() / 2]
}

struct Case {
    name: String,
    snapshots: Vec<Value>,
    options: DiffOptions,
}

/// Whether the case named `name` is selected: `DIFF_BENCH_CASES` is a comma-separated list of
/// name fragments (e.g. `tripupdates,fleet-1k`); unset, every case runs.
fn selected(name: &str) -> bool {
    std::env::var("DIFF_BENCH_CASES").map_or(true, |filter| {
        filter
            .split(',')
            .any(|part| !part.is_empty() && name.contains(part))
    })
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    if selected("gbfs-baywheels")
        && let Some(snapshots) = gbfs_sequence()
    {
        cases.push(Case {
            name: "gbfs-baywheels".into(),
            snapshots,
            options: DiffOptions::default(),
        });
    }
    for (name, dir) in [
        ("gtfs-vehiclepositions", "vehiclepositions-2023-05-08T12Z"),
        ("gtfs-tripupdates", "tripupdates-2023-05-08T12Z"),
        ("gtfs-alerts", "alerts-2020-02-09T01Z"),
    ] {
        if !selected(name) {
            continue;
        }
        if let Some(snapshots) = gtfs_sequence(dir) {
            cases.push(Case {
                name: name.into(),
                snapshots,
                options: gtfs_options(),
            });
        }
    }
    for n in [1_000, 10_000, 100_000] {
        for churn in [false, true] {
            let name = format!(
                "fleet-{}k-{}",
                n / 1000,
                if churn { "churn" } else { "changes" }
            );
            if !selected(&name) {
                continue;
            }
            cases.push(Case {
                name,
                snapshots: fleet_sequence(n, if n >= 100_000 { 2 } else { 4 }, churn),
                options: DiffOptions::default(),
            });
        }
    }
    cases
}

/// Prints the size table (medians over the case's consecutive pairs).
fn report_sizes(cases: &[Case]) {
    println!("| case | pairs | snapshot B | patchwire B | gzip | json_patch B | gzip | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for case in cases {
        let (mut snap, mut ours, mut ours_gz, mut theirs, mut theirs_gz) =
            (vec![], vec![], vec![], vec![], vec![]);
        for pair in case.snapshots.windows(2) {
            let new = serde_json::to_vec(&pair[1]).unwrap_or_default();
            let a = serde_json::to_vec(&diff::diff(&pair[0], &pair[1], &case.options))
                .unwrap_or_default();
            let b = serde_json::to_vec(&json_patch::diff(&pair[0], &pair[1])).unwrap_or_default();
            snap.push(new.len());
            ours_gz.push(gzip_len(&a));
            theirs_gz.push(gzip_len(&b));
            ours.push(a.len());
            theirs.push(b.len());
        }
        let pairs = ours.len();
        let (o, t) = (median(ours), median(theirs));
        println!(
            "| {} | {pairs} | {} | {o} | {} | {t} | {} | 1/{:.1} |",
            case.name,
            median(snap),
            median(ours_gz),
            median(theirs_gz),
            t as f64 / o.max(1) as f64
        );
    }
}

/// Times patchwire, `json_patch::diff` and parsing interleaved, pair by pair and round by round,
/// so that load from other processes hits all alike, in a rotating order, so that none always
/// runs first on the pair's colder caches; prints medians per pair.
///
/// patchwire is timed twice: `diff_json` (the patch written as the JSON subscribers receive,
/// what a publisher runs: its time includes serializing the patch) and `diff` (the patch as
/// `json_patch` operations, as `json_patch::diff` returns it). The ratio is `diff_json`'s.
fn report_interleaved_times(cases: &[Case]) {
    println!(
        "| case | rounds x pairs | patchwire to JSON ms | patchwire ops ms | json_patch ms | parse ms | to JSON / parse | when first: to JSON / json_patch / parse ms | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for case in cases {
        // A multiple of the four measurements: each runs first (on colder caches) equally often.
        let rounds = if case.snapshots[0]["entity"].as_array().map_or(0, Vec::len) >= 100_000 {
            4
        } else {
            16
        };
        let texts: Vec<Vec<u8>> = case
            .snapshots
            .iter()
            .map(|s| serde_json::to_vec(s).unwrap_or_default())
            .collect();
        // ours (to JSON), ours (operations), json_patch, parse.
        let mut samples: [Vec<usize>; 4] = Default::default();
        // The same, counting only the runs that came first for their pair (coldest caches).
        let mut firsts: [Vec<usize>; 4] = Default::default();
        for round in 0..rounds {
            for (i, pair) in case.snapshots.windows(2).enumerate() {
                for turn in 0..4 {
                    let which = (round + i + turn) % 4;
                    let t = Instant::now();
                    match which {
                        0 => {
                            black_box(diff::diff_json(&pair[0], &pair[1], &case.options));
                        }
                        1 => {
                            black_box(diff::diff(&pair[0], &pair[1], &case.options));
                        }
                        2 => {
                            black_box(json_patch::diff(&pair[0], &pair[1]));
                        }
                        _ => {
                            black_box(serde_json::from_slice::<Value>(&texts[i + 1]).ok());
                        }
                    }
                    let elapsed = t.elapsed().as_nanos() as usize;
                    samples[which].push(elapsed);
                    if turn == 0 {
                        firsts[which].push(elapsed);
                    }
                }
            }
        }
        let [ours, ours_ops, theirs, parse] = samples;
        let [ours_first, _, theirs_first, parse_first] = firsts;
        let (of, tf, pf) = (
            median(ours_first),
            median(theirs_first),
            median(parse_first),
        );
        let samples = ours.len();
        let ms = |ns: usize| ns as f64 / 1e6;
        let (o, oo, t, p) = (
            median(ours),
            median(ours_ops),
            median(theirs),
            median(parse),
        );
        println!(
            "| {} | {rounds} x {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} / {:.2} | {:.2} |",
            case.name,
            samples / rounds,
            ms(o),
            ms(oo),
            ms(t),
            ms(p),
            o as f64 / p.max(1) as f64,
            ms(of),
            ms(tf),
            ms(pf),
            of as f64 / pf.max(1) as f64
        );
    }
}

fn bench(c: &mut Criterion) {
    let cases = cases();
    report_sizes(&cases);
    report_interleaved_times(&cases);
    let mut group = c.benchmark_group("diff");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for case in &cases {
        // The first pair of each synthetic case; for real sequences, their first pairs in turn
        // (at most 30; time per pair = total / pairs).
        let pairs: Vec<(&Value, &Value)> =
            if case.name.starts_with("gbfs") || case.name.starts_with("gtfs") {
                case.snapshots
                    .windows(2)
                    .take(30)
                    .map(|w| (&w[0], &w[1]))
                    .collect()
            } else {
                vec![(&case.snapshots[0], &case.snapshots[1])]
            };
        let bytes: Vec<Vec<u8>> = pairs
            .iter()
            .map(|(_, new)| serde_json::to_vec(new).unwrap_or_default())
            .collect();
        group.bench_with_input(
            BenchmarkId::new("patchwire", &case.name),
            &pairs,
            |b, pairs| {
                b.iter(|| {
                    for (old, new) in pairs {
                        black_box(diff::diff(old, new, &case.options));
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("patchwire-json", &case.name),
            &pairs,
            |b, pairs| {
                b.iter(|| {
                    for (old, new) in pairs {
                        black_box(diff::diff_json(old, new, &case.options));
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("json_patch", &case.name),
            &pairs,
            |b, pairs| {
                b.iter(|| {
                    for (old, new) in pairs {
                        black_box(json_patch::diff(old, new));
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("parse_snapshot", &case.name),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    for text in bytes {
                        black_box(serde_json::from_slice::<Value>(text).ok());
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! CPU per change with 0, 1, 10, 100 and 1,000 distinct equality views on the MBTA trip
//! updates in `../shared/data` (issue #14's second benchmark; skipped with a message when the
//! data is missing, except under `CI=true`).
//!
//! ```text
//! cargo bench --bench views                          # the interleaved table, then criterion
//! cargo bench --bench views -- no-such-benchmark     # the interleaved table only
//! VIEWS_BENCH_ROUNDS=5 VIEWS_BENCH_SETS=mixed cargo bench --bench views -- no-such-benchmark
//! ```
//!
//! What is measured is the CPU time of the publishing thread (`CLOCK_THREAD_CPUTIME_ID`: not
//! the time other processes hold the core on this shared machine) during `Stream::publish` of
//! the next recorded poll (a real change) on a `format = "gtfs-rt"` stream built from
//! configuration as the server builds it: the whole-stream diff, its snapshot's JSON, the
//! commit, and (with views) the derivation of every view from the change, each view diffed
//! and committed as a stream of its own, all of which runs on the publishing thread. Every
//! view has one subscriber (who never reads: framing and sending are the sinks' work, not
//! measured here). The baseline, **0 views**, is the same stream without views: the
//! whole-stream publish alone; `diff_json` is the whole-stream diff by itself (no snapshot,
//! no commit).
//!
//! Views are ad hoc equality filters on the aliases a `gtfs-rt` stream has, on values that
//! occur in the sequence, most frequent first (each view holds something):
//! - `mixed`: round-robin over `route`, `stop`, `trip`, `vehicle` (the 8 routes run out
//!   first, then stops, trips and vehicles alternate), then pairs of stops once the single
//!   values are used up;
//! - `route`: one route each (only 8 exist: a set stops there);
//! - `stop`, `trip`: one stop, one trip each, then pairs.
//!
//! The table (printed first) builds one stream per view count, each at the first poll, and
//! times every consecutive pair of polls on each in turn, round after round, rotating which
//! goes first, so that each runs on caches it warmed itself and a change in the machine's load
//! spreads over all of them; it reports the median per publish and how many entities the views
//! hold together (an entity in k views is counted k times). Criterion's groups `views/{set}/{n}`
//! follow (`VIEWS_BENCH_TABLE=0` skips the table).

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use patchwire::config::{self, FileKind};
use patchwire::diff::{self, DiffOptions};
use patchwire::hub::{Hub, Stream, StreamOptions, Subscription};
use patchwire::metrics::Metrics;
use patchwire::snapshot::SnapshotStore;
use patchwire::upstream::decode::{Format, decode};
use patchwire::views::config::ViewsSettings;
use patchwire::views::{Budget, StreamViews, Target, Views};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

const TRIP_UPDATES: &str = "gtfs-rt/sequences/mbta-lamp/tripupdates-2023-05-08T12Z";
const COUNTS: [usize; 5] = [0, 1, 10, 100, 1000];
const NAME: &str = "tripupdates";

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// The decoded polls, in order; `None` (skipped, or a failure under `CI=true`) without data.
fn documents() -> Option<Vec<Value>> {
    let dir = data_dir().join(TRIP_UPDATES);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "pb"))
            .collect(),
        Err(e) => {
            let why = format!(
                "views bench: no trip updates at {} ({e}; see /work/shared/data/README.md)",
                dir.display()
            );
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "CI=true and {why}"
            );
            eprintln!("SKIP: {why}");
            return None;
        }
    };
    files.sort();
    Some(
        files
            .iter()
            .map(|path| {
                let body =
                    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                decode(Format::GtfsRt, &body).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            })
            .collect(),
    )
}

/// What a `format = "gtfs-rt"` stream gets from a configuration that sets nothing else.
struct Configured {
    options: StreamOptions,
    views: ViewsSettings,
    max_views: usize,
}

fn configured() -> Configured {
    let text = format!(
        "[[streams]]\nname = \"{NAME}\"\nurl = \"https://upstream.example/feed\"\nformat = \"gtfs-rt\"\n"
    );
    let raw = config::parse_raw(&text, FileKind::Toml, None, Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let config = config::validate(raw, None, &|_| None).unwrap_or_else(|e| panic!("{e}"));
    let settings = &config.streams[0];
    Configured {
        options: StreamOptions {
            history: settings.history,
            history_bytes: settings.history_bytes,
            buffer: config.server.subscriber_buffer,
            diff: settings.diff.clone(),
        },
        views: settings
            .views
            .clone()
            .expect("a gtfs-rt stream has views by default"),
        max_views: config.max_views,
    }
}

/// The values of each alias in the sequence, most frequent (entities × polls) first.
fn alias_values(documents: &[Value]) -> BTreeMap<&'static str, Vec<String>> {
    let mut counts: BTreeMap<&'static str, HashMap<String, usize>> = BTreeMap::new();
    let mut add = |alias: &'static str, value: Option<&Value>| {
        if let Some(value) = value.and_then(Value::as_str) {
            *counts
                .entry(alias)
                .or_default()
                .entry(value.to_owned())
                .or_default() += 1;
        }
    };
    for document in documents {
        for entity in document["entity"].as_array().map_or(&[][..], Vec::as_slice) {
            let update = &entity["trip_update"];
            add("route", update["trip"].get("route_id"));
            add("trip", update["trip"].get("trip_id"));
            add("vehicle", update["vehicle"].get("id"));
            for stop in update["stop_time_update"]
                .as_array()
                .map_or(&[][..], Vec::as_slice)
            {
                add("stop", stop.get("stop_id"));
            }
        }
    }
    counts
        .into_iter()
        .map(|(alias, counts)| {
            let mut values: Vec<(String, usize)> = counts.into_iter().collect();
            values.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            (alias, values.into_iter().map(|(v, _)| v).collect())
        })
        .collect()
}

/// The first `n` queries of set `set`.
fn queries(set: &str, values: &BTreeMap<&'static str, Vec<String>>, n: usize) -> Vec<String> {
    let q = |alias: &str, value: &str| {
        format!("{alias}={}", utf8_percent_encode(value, NON_ALPHANUMERIC))
    };
    let none = Vec::new();
    let of = |alias: &str| values.get(alias).unwrap_or(&none);
    let mut out = Vec::new();
    let singles: Vec<&str> = match set {
        "mixed" => vec!["route", "stop", "trip", "vehicle"],
        other => vec![other],
    };
    let longest = singles.iter().map(|a| of(a).len()).max().unwrap_or(0);
    'singles: for i in 0..longest {
        for alias in &singles {
            if let Some(value) = of(alias).get(i) {
                if out.len() == n {
                    break 'singles;
                }
                out.push(q(alias, value));
            }
        }
    }
    // Then pairs of values (`stop=A,B`), where the set has more than one value.
    let pairs_of = if set == "mixed" { "stop" } else { set };
    let pool = of(pairs_of);
    if set != "route" {
        'pairs: for i in 0..pool.len() {
            for j in i + 1..pool.len() {
                if out.len() >= n {
                    break 'pairs;
                }
                out.push(format!(
                    "{pairs_of}={},{}",
                    utf8_percent_encode(&pool[i], NON_ALPHANUMERIC),
                    utf8_percent_encode(&pool[j], NON_ALPHANUMERIC)
                ));
            }
        }
    }
    out
}

/// One stream with `queries.len()` views, each with one subscriber, at the first poll.
struct Setup {
    label: String,
    stream: Arc<Stream>,
    subscriptions: Vec<Subscription>,
    /// The stream's views, if any.
    views: Option<Arc<StreamViews>>,
    /// The poll the stream holds now.
    at: usize,
}

impl Setup {
    fn new(
        label: String,
        configured: &Configured,
        queries: Option<&[String]>,
        first: &Value,
    ) -> Setup {
        let snapshots = SnapshotStore::new();
        let hub = Hub::new();
        let stream = hub.insert(Arc::new(Stream::new(
            NAME,
            configured.options.clone(),
            snapshots.clone(),
            Arc::new(Metrics::new()),
        )));
        let mut subscriptions = Vec::new();
        let mut held_views = None;
        if let Some(queries) = queries {
            let views = Views::new();
            views.attach(
                &stream,
                StreamViews::new(
                    &stream,
                    configured.views.clone(),
                    configured.options.clone(),
                    snapshots,
                    Budget::new(configured.max_views),
                ),
            );
            held_views = views.of(NAME);
            for query in queries {
                let target = match views.target(&hub, NAME, Some(query)) {
                    Some(Ok(target @ Target::View(..))) => target,
                    Some(Ok(Target::Whole(_))) => panic!("?{query} is not a view"),
                    Some(Err(e)) => panic!("?{query}: {e}"),
                    None => panic!("no stream {NAME}"),
                };
                subscriptions.push(
                    target
                        .subscribe(&patchwire::hub::Resume::Fresh)
                        .unwrap_or_else(|e| panic!("?{query}: {e}")),
                );
            }
        }
        stream.publish(first.clone());
        Setup {
            label,
            stream,
            subscriptions,
            views: held_views,
            at: 0,
        }
    }

    /// How many entities the views hold now, summed over the views.
    fn held(&self) -> usize {
        self.subscriptions
            .iter()
            .filter_map(|s| s.stream().snapshot())
            .map(|s| s.document["entity"].as_array().map_or(0, Vec::len))
            .sum()
    }

    /// Brings the stream to poll `i` (untimed when it is not there already), then times
    /// publishing poll `i + 1`.
    fn time_next(&mut self, documents: &[Value], i: usize) -> Duration {
        if self.at != i {
            self.stream.publish(documents[i].clone());
        }
        let next = documents[i + 1].clone();
        let started = thread_cpu();
        black_box(self.stream.publish(next));
        let elapsed = thread_cpu().saturating_sub(started);
        self.at = i + 1;
        elapsed
    }
}

/// The CPU time this thread has used: publishing (the diff, the views' derivation) runs on
/// the publishing thread, and unlike wall time this does not count the time other processes
/// on this shared machine hold the core.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always supported
    // on Linux.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } == 0;
    assert!(ok, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn sets() -> Vec<String> {
    std::env::var("VIEWS_BENCH_SETS")
        .unwrap_or_else(|_| "mixed,route,stop,trip".to_owned())
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// The interleaved table: median ms per publish of every setup, over the same pairs.
fn interleaved(documents: &[Value], configured: &Configured, diff_options: &DiffOptions) {
    let rounds: usize = std::env::var("VIEWS_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let values = alias_values(documents);
    println!(
        "distinct values in the sequence: {}",
        values
            .iter()
            .map(|(alias, v)| format!("{alias} {}", v.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for set in sets() {
        let mut setups = vec![Setup::new("0".to_owned(), configured, None, &documents[0])];
        for n in COUNTS.into_iter().filter(|&n| n > 0) {
            let queries = queries(&set, &values, n);
            if queries.len() < n {
                println!(
                    "set {set}: only {} distinct views (not {n}); larger counts skipped",
                    queries.len()
                );
                break;
            }
            setups.push(Setup::new(
                n.to_string(),
                configured,
                Some(&queries),
                &documents[0],
            ));
        }
        // Each round times every pair on each setup in turn (the diff alone last of all, or
        // first: the order rotates), so every setup runs on caches it warmed itself and a
        // change in the machine's load spreads over all of them.
        let k = setups.len() + 1;
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); k];
        for round in 0..rounds {
            for step in 0..k {
                let s = (round + step) % k;
                for i in 0..documents.len() - 1 {
                    let ms = if s == setups.len() {
                        let started = thread_cpu();
                        black_box(diff::diff_json(
                            &documents[i],
                            &documents[i + 1],
                            diff_options,
                        ));
                        thread_cpu().saturating_sub(started).as_secs_f64() * 1e3
                    } else {
                        setups[s].time_next(documents, i).as_secs_f64() * 1e3
                    };
                    times[s].push(ms);
                }
            }
        }
        let diff_alone = median(times[setups.len()].clone());
        let base = median(times[0].clone());
        println!();
        println!(
            "set {set}: {rounds} rounds × {} pairs, median ms per publish; \
             `diff_json` alone {diff_alone:.2} ms",
            documents.len() - 1
        );
        println!();
        println!(
            "| views | entities in them (last poll; the source has {}) | publish ms | × 0 views | × diff alone | view changes derived / rebuilt whole |",
            documents[documents.len() - 1]["entity"]
                .as_array()
                .map_or(0, Vec::len)
        );
        println!("|---|---|---|---|---|---|");
        for (setup, times) in setups.iter().zip(&times) {
            let m = median(times.clone());
            let (derived, rebuilt) = setup.views.as_ref().map_or((0, 0), |v| v.derivations());
            println!(
                "| {} | {} | {m:.2} | {:.2} | {:.2} | {derived} / {rebuilt} |",
                setup.label,
                setup.held(),
                m / base,
                m / diff_alone
            );
        }
    }
    println!();
}

fn bench(c: &mut Criterion) {
    let Some(documents) = documents() else {
        return;
    };
    assert!(documents.len() >= 2, "fewer than two trip-update polls");
    let configured = configured();
    if std::env::var("VIEWS_BENCH_TABLE").map_or(true, |v| v != "0") {
        interleaved(&documents, &configured, &configured.options.diff);
    }

    let values = alias_values(&documents);
    for set in sets() {
        let mut group = c.benchmark_group(format!("views/{set}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        for n in COUNTS {
            let queries = queries(&set, &values, n);
            if queries.len() < n {
                break;
            }
            let id = BenchmarkId::from_parameter(n);
            // Only the setups criterion will run are built (building 1,000 views takes a while).
            let mut setup = None;
            let mut next = 0usize;
            group.bench_function(id, |b| {
                let setup = setup.get_or_insert_with(|| {
                    Setup::new(
                        n.to_string(),
                        &configured,
                        (n > 0).then_some(&queries[..]),
                        &documents[0],
                    )
                });
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += setup.time_next(&documents, next);
                        next = (next + 1) % (documents.len() - 1);
                    }
                    total
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

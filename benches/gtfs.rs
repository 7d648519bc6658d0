//! Decode and diff time per poll on the real GTFS-realtime and GBFS sequences in
//! `../shared/data` (skipped with a message when the data is missing).
//!
//! ```text
//! cargo bench --bench gtfs
//! ```
//!
//! Per sequence: `decode` (one body into its JSON document), `diff` (one consecutive pair of
//! decoded documents with the format's default options) and `decode+diff` (both: what the
//! poller and the hub do per new body). Each iteration takes the next poll of the sequence, so
//! the mean is over the whole sequence.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use patchwire::config::{self, FileKind};
use patchwire::diff::{self, DiffOptions};
use patchwire::upstream::decode::{Format, decode};
use serde_json::Value;

const SEQUENCES: [(&str, &str, &str, Format); 4] = [
    (
        "vehiclepositions",
        "gtfs-rt/sequences/mbta-lamp/vehiclepositions-2023-05-08T12Z",
        ".pb",
        Format::GtfsRt,
    ),
    (
        "tripupdates",
        "gtfs-rt/sequences/mbta-lamp/tripupdates-2023-05-08T12Z",
        ".pb",
        Format::GtfsRt,
    ),
    (
        "alerts",
        "gtfs-rt/sequences/mbta-lamp/alerts-2020-02-09T01Z",
        ".pb",
        Format::GtfsRt,
    ),
    (
        "gbfs",
        "gbfs/baywheels-station_status",
        ".json",
        Format::Json,
    ),
];

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// The bodies of a sequence in poll order; `None` when the folder is missing.
fn bodies(dir: &Path, extension: &str) -> Option<Vec<Vec<u8>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.ends_with(extension)
                    && !n.starts_with("station_information")
                    && !n.starts_with("system_information")
            })
        })
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).ok())
        .collect::<Option<Vec<_>>>()
}

/// The diff options a stream of `format` gets from a configuration that sets nothing else.
fn default_options(format: Format) -> DiffOptions {
    let text = format!(
        "[[streams]]\nname = \"s\"\nurl = \"https://upstream.example/feed\"\nformat = \"{}\"\n",
        format.as_str()
    );
    let raw = config::parse_raw(&text, FileKind::Toml, None, Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut config = config::validate(raw, None, &|_| None).unwrap_or_else(|e| panic!("{e}"));
    config.streams.remove(0).diff
}

fn bench(c: &mut Criterion) {
    for (name, dir, extension, format) in SEQUENCES {
        let path = data_dir().join(dir);
        let Some(bodies) = bodies(&path, extension).filter(|b| b.len() >= 2) else {
            eprintln!("SKIP gtfs/{name}: no data at {}", path.display());
            continue;
        };
        let docs: Vec<Value> = bodies
            .iter()
            .map(|b| decode(format, b).unwrap_or_else(|e| panic!("{name}: {e}")))
            .collect();
        let options = default_options(format);
        let mut group = c.benchmark_group(format!("gtfs/{name}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));

        let mut next = 0usize;
        group.bench_function("decode", |b| {
            b.iter(|| {
                next = (next + 1) % bodies.len();
                black_box(decode(format, black_box(&bodies[next])))
            })
        });
        let mut next = 0usize;
        group.bench_function("diff", |b| {
            b.iter(|| {
                next = (next + 1) % (docs.len() - 1);
                black_box(diff::diff(&docs[next], &docs[next + 1], &options))
            })
        });
        let mut next = 0usize;
        group.bench_function("decode+diff", |b| {
            b.iter(|| {
                next = (next + 1) % (docs.len() - 1);
                let new = decode(format, &bodies[next + 1]).unwrap_or(Value::Null);
                black_box(diff::diff(&docs[next], &new, &options))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

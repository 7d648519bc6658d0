//! What a subscriber receives over a whole real sequence, against polling the upstream itself
//! every time.
//!
//! ```text
//! cargo run --release --example feed_bytes                  # data in ../shared/data
//! cargo run --release --example feed_bytes -- /path/to/data
//! ```
//!
//! For each recorded sequence (the MBTA GTFS-realtime polls and the Bay Wheels GBFS polls), the
//! polls go through the real publishing path (`decode`, then `hub::Stream::publish` with the
//! diff options a stream of that format gets by default, or those of a shipped example
//! configuration) and the SSE events are counted as
//! they go on the wire: plain, and gzip (each event deflated once, as the server does, plus the
//! gzip header and trailer). The upstream columns add up every poll's body: the protobuf as
//! served, and the same feed as compact JSON (for GTFS-realtime, the gtfs-rt projection), each
//! also gzip-compressed (flate2 level 6, as a CDN would). Keep-alives and the `retry:` line are
//! left out. Prints a Markdown table, then the mean decode + publish time per poll.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use patchwire::config::{self, FileKind};
use patchwire::diff::DiffOptions;
use patchwire::hub::{ChangeKind, Publication, Stream, StreamOptions};
use patchwire::metrics::Metrics;
use patchwire::sinks::sse;
use patchwire::snapshot::SnapshotStore;
use patchwire::upstream::decode::{Format, decode};
use patchwire::wire::Dialect;
use patchwire::wire::gzip::GZIP_HEADER;

/// The sequences measured: label, folder under the data directory, file name prefix, format,
/// and the example configuration whose first stream's diff options are used (`None`: the
/// format's defaults).
const SEQUENCES: [(&str, &str, &str, Format, Option<&str>); 5] = [
    (
        "MBTA VehiclePositions",
        "gtfs-rt/sequences/mbta-lamp/vehiclepositions-2023-05-08T12Z",
        "",
        Format::GtfsRt,
        None,
    ),
    (
        "MBTA TripUpdates",
        "gtfs-rt/sequences/mbta-lamp/tripupdates-2023-05-08T12Z",
        "",
        Format::GtfsRt,
        None,
    ),
    (
        "MBTA Alerts",
        "gtfs-rt/sequences/mbta-lamp/alerts-2020-02-09T01Z",
        "",
        Format::GtfsRt,
        None,
    ),
    (
        "Bay Wheels GBFS station_status",
        "gbfs/baywheels-station_status",
        "station_status_",
        Format::Json,
        None,
    ),
    (
        "Bay Wheels GBFS, `gbfs-station-status.toml` options",
        "gbfs/baywheels-station_status",
        "station_status_",
        Format::Json,
        Some("gbfs-station-status.toml"),
    ),
];

fn main() -> ExitCode {
    let data = match std::env::args().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    };
    if !data.is_dir() {
        eprintln!(
            "feed_bytes: expected the shared data directory at {} (pass its path as the first \
             argument)",
            data.display()
        );
        return ExitCode::FAILURE;
    }
    println!(
        "| Sequence | Polls | Upstream protobuf | Upstream protobuf, gzip | Upstream JSON | \
         Upstream JSON, gzip | Subscriber SSE | Subscriber SSE, gzip | Events (patch/snapshot) | \
         Polls publishing nothing |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut timings = Vec::new();
    for (label, dir, prefix, format, example) in SEQUENCES {
        let options = match example {
            None => default_options(format),
            Some(file) => example_options(file),
        };
        let measured =
            options.and_then(|options| measure(&data.join(dir), prefix, format, options));
        match measured {
            Ok(m) => {
                let pb = |n: Option<usize>| n.map_or_else(|| "—".to_owned(), kib);
                println!(
                    "| {label} | {} | {} | {} | {} | {} | {} ({:.1}% of JSON) | {} ({:.1}% of JSON gzip) | {}/{} | {} |",
                    m.polls,
                    pb(m.protobuf),
                    pb(m.protobuf_gzip),
                    kib(m.json),
                    kib(m.json_gzip),
                    kib(m.sse),
                    100.0 * m.sse as f64 / m.json as f64,
                    kib(m.sse_gzip),
                    100.0 * m.sse_gzip as f64 / m.json_gzip as f64,
                    m.patches,
                    m.snapshots,
                    m.quiet,
                );
                timings.push((label, m.polls, m.elapsed));
            }
            Err(message) => {
                eprintln!("feed_bytes: {label}: {message}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!();
    println!("Mean decode + publish (diff, serialize, frame, deflate) per poll, one run:");
    for (label, polls, elapsed) in timings {
        println!(
            "- {label}: {:.2} ms",
            elapsed.as_secs_f64() * 1000.0 / polls as f64
        );
    }
    ExitCode::SUCCESS
}

fn kib(bytes: usize) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

struct Measured {
    polls: usize,
    protobuf: Option<usize>,
    protobuf_gzip: Option<usize>,
    json: usize,
    json_gzip: usize,
    sse: usize,
    sse_gzip: usize,
    patches: usize,
    snapshots: usize,
    quiet: usize,
    elapsed: Duration,
}

fn gzip_len(bytes: &[u8]) -> usize {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().map_or(0, |v| v.len())
}

/// The diff options a stream of `format` gets from a configuration that sets nothing else.
fn default_options(format: Format) -> Result<DiffOptions, String> {
    let text = format!(
        "[[streams]]\nname = \"s\"\nurl = \"https://upstream.example/feed\"\nformat = \"{}\"\n",
        format.as_str()
    );
    let raw =
        config::parse_raw(&text, FileKind::Toml, None, Vec::new()).map_err(|e| e.to_string())?;
    let mut config = config::validate(raw, None, &|_| None).map_err(|e| e.to_string())?;
    Ok(config.streams.remove(0).diff)
}

/// The diff options of the first stream of `config/examples/{file}`.
fn example_options(file: &str) -> Result<DiffOptions, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/examples")
        .join(file);
    let mut config = config::load_with(&path, &|_| None, Vec::new()).map_err(|e| e.to_string())?;
    if config.streams.is_empty() {
        return Err(format!("{} has no stream", path.display()));
    }
    Ok(config.streams.remove(0).diff)
}

fn measure(
    dir: &Path,
    prefix: &str,
    format: Format,
    diff: DiffOptions,
) -> Result<Measured, String> {
    let extension = match format {
        Format::GtfsRt => ".pb",
        Format::Json => ".json",
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("listing {}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(extension))
        })
        .collect();
    files.sort();
    if files.len() < 2 {
        return Err(format!("expected at least two polls in {}", dir.display()));
    }
    let bodies = files
        .iter()
        .map(|path| std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display())))
        .collect::<Result<Vec<_>, _>>()?;

    let options = StreamOptions {
        history: 1000,
        history_bytes: u64::MAX,
        buffer: 16,
        diff,
    };
    let stream = Stream::new(
        "feed",
        options,
        SnapshotStore::new(),
        Arc::new(Metrics::new()),
    );
    let mut m = Measured {
        polls: bodies.len(),
        protobuf: None,
        protobuf_gzip: None,
        json: 0,
        json_gzip: 0,
        sse: 0,
        sse_gzip: GZIP_HEADER.len() + 10,
        patches: 0,
        snapshots: 0,
        quiet: 0,
        elapsed: Duration::ZERO,
    };
    for (path, body) in files.iter().zip(&bodies) {
        let started = Instant::now();
        let doc = decode(format, body).map_err(|e| format!("{}: {e}", path.display()))?;
        let publication = stream.publish(doc.clone());
        m.elapsed += started.elapsed();
        match publication {
            Publication::Published(change) => {
                let frame = sse::change_frame(&change, Dialect::Native);
                m.sse += frame.plain().len();
                m.sse_gzip += frame
                    .deflated(patchwire::wire::gzip::Level::DEFAULT)
                    .bytes
                    .len();
                match change.kind {
                    ChangeKind::Patch => m.patches += 1,
                    ChangeKind::Snapshot => m.snapshots += 1,
                }
            }
            Publication::Unchanged | Publication::Ignored => m.quiet += 1,
        }
        // The upstream side: what a client polling the feed itself downloads.
        let json = serde_json::to_vec(&doc).map_err(|e| e.to_string())?;
        m.json += json.len();
        m.json_gzip += gzip_len(&json);
        if format == Format::GtfsRt {
            *m.protobuf.get_or_insert(0) += body.len();
            *m.protobuf_gzip.get_or_insert(0) += gzip_len(body);
        }
    }
    Ok(m)
}

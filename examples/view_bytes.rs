//! What a subscriber of a one-route view receives over a whole real sequence, against polling
//! the whole protobuf every time (issue #14's first benchmark).
//!
//! ```text
//! cargo run --release --example view_bytes                  # data in ../shared/data
//! cargo run --release --example view_bytes -- /path/to/data
//! ```
//!
//! For the MBTA trip-updates and vehicle-positions sequences, a `format = "gtfs-rt"` stream is
//! built from configuration as the server builds it (its default diff options, history and
//! views: entities `/entity` keyed by `id`, aliases `route`, `trip`, `stop`, `vehicle`), with
//! its views attached through the hub's derivation hook. Before the first poll, one subscriber
//! asks for each route seen anywhere in the sequence (`/streams/{stream}?route={route}`,
//! resolved by `views::Views::target` as a request is) and one for the whole stream. Each poll
//! is decoded and published in process; every event each subscriber is sent is counted as it
//! goes on the wire in patchwire's SSE dialect: plain, and gzip (each event deflated once, as
//! the SSE sink does at the default `server.gzip_level`, plus the gzip header and the end of
//! the stream: final block and trailer; then a table of every level 1 to 9 with the CPU to
//! deflate all the events once at it). The first event is the view's snapshot, then its patches; keep-alives and the
//! `retry:` line are left out. Polling columns add up every poll's protobuf body, plain and
//! gzip-compressed (flate2 level 6, as a CDN would).
//!
//! Without the data directory the example prints why and exits successfully (skipped), except
//! under `CI=true`, where it fails.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use flate2::Compression;
use flate2::write::{DeflateEncoder, GzEncoder};
use patchwire::config::{self, FileKind};
use patchwire::hub::{
    ChangeKind, Hub, Initial, Resume, Stream, StreamEvent, StreamOptions, Subscription,
};
use patchwire::metrics::Metrics;
use patchwire::sinks::sse;
use patchwire::snapshot::SnapshotStore;
use patchwire::upstream::decode::{Format, decode};
use patchwire::views::{Budget, StreamViews, Target, Views};
use patchwire::wire::Dialect;
use patchwire::wire::gzip::{Deflated, GZIP_HEADER, Level};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use tokio::sync::broadcast::error::TryRecvError;

/// The sequences measured: the stream's name and its folder under the data directory.
const SEQUENCES: [(&str, &str); 2] = [
    (
        "tripupdates",
        "gtfs-rt/sequences/mbta-lamp/tripupdates-2023-05-08T12Z",
    ),
    (
        "vehiclepositions",
        "gtfs-rt/sequences/mbta-lamp/vehiclepositions-2023-05-08T12Z",
    ),
];

/// The end of a gzip stream after the last event: an empty final block (2 bytes) and the
/// trailer (CRC-32 and length, 8 bytes).
const GZIP_END: usize = 10;

fn main() -> ExitCode {
    let data = match std::env::args().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    };
    if !data.is_dir() {
        let why = format!(
            "view_bytes: the shared data directory {} is missing (pass its path as the first \
             argument; see /work/shared/data/README.md)",
            data.display()
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            eprintln!("{why}; CI=true, so this is a failure");
            return ExitCode::FAILURE;
        }
        eprintln!("SKIP: {why}");
        return ExitCode::SUCCESS;
    }
    for (name, dir) in SEQUENCES {
        match measure(name, &data.join(dir)) {
            Ok(report) => report.print(name, dir),
            Err(message) => {
                eprintln!("view_bytes: {name}: {message}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

const LEVEL_6: Compression = Compression::new(6);

/// What one subscriber was sent.
struct Received {
    patches: usize,
    snapshots: usize,
    plain: usize,
    gzip: usize,
    /// For comparison: each event deflated on its own at level 6 (the server's default
    /// `server.gzip_level`; the `gzip` column is at `Level::DEFAULT`)...
    gzip_level6: usize,
    /// ... and one deflate stream per subscriber at level 6, flushed after each event (each
    /// event compressed against the ones before it: a compressor per subscriber).
    gzip_stream: usize,
    stream: DeflateEncoder<Vec<u8>>,
    /// The events' frames.
    frames: Vec<Bytes>,
    /// SSE gzip at each `server.gzip_level` (index 0: level 1), the server's way.
    by_level: [usize; 9],
}

impl Default for Received {
    fn default() -> Self {
        let overhead = GZIP_HEADER.len() + GZIP_END;
        Received {
            patches: 0,
            snapshots: 0,
            plain: 0,
            gzip: overhead,
            gzip_level6: overhead,
            gzip_stream: overhead,
            stream: DeflateEncoder::new(Vec::new(), LEVEL_6),
            frames: Vec::new(),
            by_level: [overhead; 9],
        }
    }
}

/// `data` deflated with a sync flush by `encoder`: the bytes it added.
fn deflated_len(encoder: &mut DeflateEncoder<Vec<u8>>, data: &[u8]) -> usize {
    let before = encoder.get_ref().len();
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(data);
    let _ = encoder.flush();
    encoder.get_ref().len() - before
}

impl Received {
    fn count(&mut self, frame: &patchwire::wire::Frame, kind: ChangeKind) {
        let plain = frame.plain();
        self.frames.push(plain.clone());
        self.plain += plain.len();
        self.gzip += frame.deflated(Level::DEFAULT).bytes.len();
        self.gzip_level6 += deflated_len(&mut DeflateEncoder::new(Vec::new(), LEVEL_6), plain);
        self.gzip_stream += deflated_len(&mut self.stream, plain);
        match kind {
            ChangeKind::Patch => self.patches += 1,
            ChangeKind::Snapshot => self.snapshots += 1,
        }
    }
}

/// One subscriber: what it asked for, its subscription, and what it was sent.
struct Follower {
    route: Option<String>,
    subscription: Subscription,
    received: Received,
    /// Entities in the source's documents on this route, summed over the polls.
    entities: usize,
}

impl Follower {
    /// Counts every event waiting for this subscriber.
    fn drain(&mut self) -> Result<(), String> {
        loop {
            match self.subscription.live.try_recv() {
                Ok(StreamEvent::Change(change, _)) => {
                    let frame = sse::change_frame(&change, Dialect::Native);
                    self.received.count(frame, change.kind);
                }
                Ok(StreamEvent::Reset(snapshot)) => {
                    let stream = self.subscription.stream().clone();
                    let frame = sse::snapshot_frame(&stream, &snapshot, Dialect::Native);
                    self.received.count(frame, ChangeKind::Snapshot);
                }
                Ok(
                    StreamEvent::Failure(_) | StreamEvent::Recovered(_) | StreamEvent::KeepAlive,
                ) => {}
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Closed) => {
                    return Err(format!("{} closed", self.subscription.stream().name()));
                }
                Err(TryRecvError::Lagged(n)) => {
                    return Err(format!(
                        "{} lagged by {n} events",
                        self.subscription.stream().name()
                    ));
                }
            }
        }
    }
}

/// Every `server.gzip_level`, 1 to 9.
fn levels() -> impl Iterator<Item = Level> {
    Level::RANGE.filter_map(Level::new)
}

/// The time to deflate `events` once each as the server does (`Deflated::new`: a reset
/// compressor per thread, sync flush, CRC-32), at `level`; the smallest of five runs.
fn deflate_time(events: &[Bytes], level: Level) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        for event in events {
            std::hint::black_box(Deflated::new(event, level));
        }
        best = best.min(started.elapsed());
    }
    best
}

struct Report {
    polls: usize,
    /// Every distinct event framed (each view's, once), for the deflate timing.
    events: Vec<Bytes>,
    protobuf: usize,
    protobuf_gzip: usize,
    followers: Vec<Follower>,
}

fn gzip_len(bytes: &[u8]) -> usize {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().map_or(0, |v| v.len())
}

/// The route of a GTFS-realtime entity (trip update or vehicle), if it has one.
fn route_of(entity: &Value) -> Option<&str> {
    ["trip_update", "vehicle"]
        .iter()
        .find_map(|kind| entity.get(kind)?.get("trip")?.get("route_id")?.as_str())
}

fn entities(document: &Value) -> &[Value] {
    document["entity"].as_array().map_or(&[], Vec::as_slice)
}

fn measure(name: &str, dir: &Path) -> Result<Report, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("listing {}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "pb"))
        .collect();
    files.sort();
    if files.len() < 2 {
        return Err(format!("expected at least two polls in {}", dir.display()));
    }
    let mut bodies = Vec::with_capacity(files.len());
    let mut documents = Vec::with_capacity(files.len());
    for path in &files {
        let body = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        documents
            .push(decode(Format::GtfsRt, &body).map_err(|e| format!("{}: {e}", path.display()))?);
        bodies.push(body);
    }

    // The stream and its views, as the server builds them from this configuration.
    let text = format!(
        "[[streams]]\nname = \"{name}\"\nurl = \"https://upstream.example/feed\"\nformat = \"gtfs-rt\"\n"
    );
    let raw =
        config::parse_raw(&text, FileKind::Toml, None, Vec::new()).map_err(|e| e.to_string())?;
    let config = config::validate(raw, None, &|_| None).map_err(|e| e.to_string())?;
    let settings = config.streams.first().ok_or("no stream configured")?;
    let views_settings = settings
        .views
        .clone()
        .ok_or("a gtfs-rt stream has no views by default")?;
    let options = StreamOptions {
        history: settings.history,
        history_bytes: settings.history_bytes,
        // Every event of the sequence fits, so nobody lags between two drains.
        buffer: config.server.subscriber_buffer.max(64),
        diff: settings.diff.clone(),
    };
    let snapshots = SnapshotStore::new();
    let hub = Hub::new();
    let stream = hub.insert(Arc::new(Stream::new(
        name,
        options.clone(),
        snapshots.clone(),
        Arc::new(Metrics::new()),
    )));
    let views = Views::new();
    views.attach(
        &stream,
        StreamViews::new(
            &stream,
            views_settings,
            options,
            snapshots,
            Budget::new(config.max_views),
        ),
    );

    // Every route of the sequence, with how many of its entities each poll has.
    let mut routes: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = 0;
    for document in &documents {
        for entity in entities(document) {
            all += 1;
            if let Some(route) = route_of(entity) {
                *routes.entry(route.to_owned()).or_default() += 1;
            }
        }
    }
    let mut followers = Vec::with_capacity(routes.len() + 1);
    for (route, count) in routes
        .into_iter()
        .map(|(r, c)| (Some(r), c))
        .chain([(None, all)])
    {
        let query = route
            .as_deref()
            .map(|r| format!("route={}", utf8_percent_encode(r, NON_ALPHANUMERIC)));
        let target = match views.target(&hub, name, query.as_deref()) {
            Some(Ok(target)) => target,
            Some(Err(e)) => return Err(format!("?{}: {e}", query.unwrap_or_default())),
            None => return Err(format!("no stream {name}")),
        };
        if route.is_some() != matches!(target, Target::View(..)) {
            return Err(format!(
                "?{} did not resolve as expected",
                query.unwrap_or_default()
            ));
        }
        let subscription = target
            .subscribe(&Resume::Fresh)
            .map_err(|e| e.to_string())?;
        let mut follower = Follower {
            route,
            subscription,
            received: Received::default(),
            entities: count,
        };
        let initial = std::mem::take(&mut follower.subscription.initial);
        for event in initial {
            match event {
                Initial::Snapshot(snapshot) => {
                    let stream = follower.subscription.stream().clone();
                    let frame = sse::snapshot_frame(&stream, &snapshot, Dialect::Native);
                    follower.received.count(frame, ChangeKind::Snapshot);
                }
                Initial::Change(change) => {
                    let frame = sse::change_frame(&change, Dialect::Native);
                    follower.received.count(frame, change.kind);
                }
                Initial::Failure(_) => {}
            }
        }
        followers.push(follower);
    }

    let mut report = Report {
        polls: documents.len(),
        events: Vec::new(),
        protobuf: 0,
        protobuf_gzip: 0,
        followers,
    };
    for (body, document) in bodies.iter().zip(documents) {
        stream.publish(document);
        for follower in &mut report.followers {
            follower.drain()?;
        }
        report.protobuf += body.len();
        report.protobuf_gzip += gzip_len(body);
    }
    // Each view's subscriber got each of the view's events: every event is distinct.
    for follower in &mut report.followers {
        let received = &mut follower.received;
        for (level, total) in levels().zip(&mut received.by_level) {
            *total += received
                .frames
                .iter()
                .map(|frame| Deflated::new(frame, level).bytes.len())
                .sum::<usize>();
        }
        report.events.extend(std::mem::take(&mut received.frames));
    }
    Ok(report)
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

impl Report {
    fn print(&self, name: &str, dir: &str) {
        let polls = self.polls as f64;
        println!("### `{name}`: {} polls of `{dir}`", self.polls);
        println!();
        println!(
            "Polling the protobuf: {} plain, {} gzip.",
            kib(self.protobuf as f64),
            kib(self.protobuf_gzip as f64)
        );
        println!();
        println!(
            "| subscriber | entities per poll (mean) | events (patch/snapshot) | SSE plain | SSE gzip | \
             protobuf ÷ SSE, plain | **protobuf gzip ÷ SSE gzip** | for comparison: gzip level 6 \
             per event | ÷ | one level-6 stream per subscriber | ÷ |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        let gz = self.protobuf_gzip as f64;
        let row = |label: &str, entities: String, events: String, sizes: [f64; 4]| {
            let [plain, gzip, level6, stream] = sizes;
            println!(
                "| {label} | {entities} | {events} | {} | {} | {:.1}× | **{:.1}×** | {} | {:.1}× | {} | {:.1}× |",
                kib(plain),
                kib(gzip),
                self.protobuf as f64 / plain,
                gz / gzip,
                kib(level6),
                gz / level6,
                kib(stream),
                gz / stream,
            );
        };
        let sizes =
            |r: &Received| [r.plain, r.gzip, r.gzip_level6, r.gzip_stream].map(|n| n as f64);
        let follower_row = |label: &str, follower: &Follower| {
            let r = &follower.received;
            row(
                label,
                format!("{:.1}", follower.entities as f64 / polls),
                format!("{}/{}", r.patches, r.snapshots),
                sizes(r),
            );
        };
        let mut per_route: [Vec<f64>; 4] = Default::default();
        for follower in &self.followers {
            if let Some(route) = &follower.route {
                for (column, size) in per_route.iter_mut().zip(sizes(&follower.received)) {
                    column.push(size);
                }
                follower_row(&format!("`?route={route}`"), follower);
            }
        }
        let routes = per_route[0].len();
        row(
            &format!("**median over {routes} routes**"),
            String::new(),
            String::new(),
            per_route.map(median),
        );
        for follower in self.followers.iter().filter(|f| f.route.is_none()) {
            follower_row("whole stream (no filter)", follower);
        }
        println!();
        let bytes: usize = self.events.iter().map(Bytes::len).sum();
        println!(
            "By `server.gzip_level` (the server's default: {}): SSE gzip of the median one-route \
             subscriber and of the whole stream, and the CPU to deflate every event once (the {} \
             events of all the views above and the whole stream, {}), as the server does, best \
             of 5. Each level's time includes building its compressor once.",
            Level::DEFAULT.get(),
            self.events.len(),
            kib(bytes as f64),
        );
        println!();
        println!(
            "| level | median route SSE gzip | **protobuf gzip ÷** | whole stream SSE gzip | ÷ | \
             deflate CPU, all events | × level 1 | per poll |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let mut first = None;
        for level in levels() {
            let index = level.get() as usize - 1;
            let routes: Vec<f64> = self
                .followers
                .iter()
                .filter(|f| f.route.is_some())
                .map(|f| f.received.by_level[index] as f64)
                .collect();
            let route = median(routes);
            let whole = self
                .followers
                .iter()
                .find(|f| f.route.is_none())
                .map_or(0.0, |f| f.received.by_level[index] as f64);
            let time = deflate_time(&self.events, level).as_secs_f64();
            let base = *first.get_or_insert(time);
            println!(
                "| {} | {} | **{:.1}×** | {} | {:.1}× | {:.1} ms | {:.2}× | {:.2} ms |",
                level.get(),
                kib(route),
                gz / route,
                kib(whole),
                gz / whole,
                time * 1e3,
                time / base,
                time * 1e3 / polls,
            );
        }
        println!();
    }
}

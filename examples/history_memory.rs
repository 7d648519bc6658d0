//! The memory one stream holds after many changes: the MBTA trip-updates sequence published
//! over and over (cycled) into one `hub::Stream` with the default history.
//!
//! ```text
//! cargo run --example history_memory                      # data in ../shared/data, 1000 changes
//! cargo run --example history_memory -- /path/to/data 1000 [history_bytes]
//! ```
//!
//! Live heap bytes are counted by a wrapping global allocator (exact, unlike RSS, which the
//! allocator keeps after frees); RSS is printed too. The polls are decoded once, before the
//! first measurement, so what grows is what the stream keeps: the current snapshot, history,
//! and whatever each history entry pins.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use patchwire::config::{self, FileKind};
use patchwire::hub::{Publication, Stream, StreamOptions};
use patchwire::metrics::Metrics;
use patchwire::snapshot::SnapshotStore;
use patchwire::upstream::decode::{Format, decode};

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; only a counter is updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SEQUENCE: &str = "gtfs-rt/sequences/mbta-lamp/tripupdates-2023-05-08T12Z";

fn mib(bytes: isize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
            line["VmRSS:".len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let data = args.next().map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
        PathBuf::from,
    );
    let changes: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    // A third argument replaces the default `history_bytes` (e.g. to bound history by count only).
    let history_bytes: Option<u64> = args.next().and_then(|n| n.parse().ok());
    match run(&data.join(SEQUENCE), changes, history_bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("history_memory: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(dir: &Path, changes: usize, history_bytes: Option<u64>) -> Result<(), String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("listing {}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pb"))
        .collect();
    files.sort();
    let docs = files
        .iter()
        .map(|path| {
            let body = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            decode(Format::GtfsRt, &body).map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if docs.len() < 2 {
        return Err(format!("expected at least two polls in {}", dir.display()));
    }

    // The options a gtfs-rt stream gets from a configuration that sets nothing else.
    let text = "[[streams]]\nname = \"s\"\nurl = \"https://upstream.example/feed\"\nformat = \"gtfs-rt\"\n";
    let raw =
        config::parse_raw(text, FileKind::Toml, None, Vec::new()).map_err(|e| e.to_string())?;
    let settings = config::validate(raw, None, &|_| None)
        .map_err(|e| e.to_string())?
        .streams
        .remove(0);
    let options = StreamOptions {
        history: settings.history,
        history_bytes: history_bytes.unwrap_or(settings.history_bytes),
        buffer: 256,
        diff: settings.diff,
    };
    let stream = Stream::new(
        "tripupdates",
        options,
        SnapshotStore::new(),
        Arc::new(Metrics::new()),
    );

    let before = LIVE.load(Ordering::Relaxed);
    let rss_before = rss_kib();
    let mut published = 0;
    let mut polls = 0;
    while published < changes {
        let doc = docs[polls % docs.len()].clone();
        polls += 1;
        if let Publication::Published(_) = stream.publish(doc) {
            published += 1;
        }
    }
    let after = LIVE.load(Ordering::Relaxed);
    let rss_after = rss_kib();
    let (kept, kept_bytes) = stream.history_size();
    println!(
        "history_bytes {}: history holds {kept} changes, {:.1} MiB",
        history_bytes.unwrap_or(settings.history_bytes),
        kept_bytes as f64 / (1024.0 * 1024.0)
    );
    let snapshot = stream.snapshot().map_or(0, |s| s.json.len());
    println!(
        "{} polls ({} recorded, cycled), {published} changes, history {} changes",
        polls,
        docs.len(),
        settings.history,
    );
    println!(
        "live heap: {} -> {} (+{}, {:.1} KiB per change); RSS: +{:.1} MiB; current snapshot JSON {:.1} KiB",
        mib(before),
        mib(after),
        mib(after - before),
        (after - before) as f64 / 1024.0 / published as f64,
        (rss_after as f64 - rss_before as f64) / 1024.0,
        snapshot as f64 / 1024.0,
    );
    Ok(())
}

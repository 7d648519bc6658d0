//! Measures how long the simulated fleet takes to advance one tick and to serialize it.
//!
//! ```text
//! cargo run --release --example sim_step              # 1k, 10k and 100k vehicles
//! cargo run --release --example sim_step -- 2500 50000
//! ```
//!
//! Prints, per fleet size, the mean and fastest time of `step()`, of `to_json()`, and of both
//! together (what the server does for each new tick), and the document size. No assertions:
//! numbers depend on the machine; record them with the command in the benchmarks notes.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use patchwire::sim::{FeedSettings, Fleet};

fn main() -> ExitCode {
    let mut sizes = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.replace('_', "").parse::<usize>() {
            Ok(n) if n > 0 => sizes.push(n),
            _ => {
                eprintln!("sim_step: expected fleet sizes as positive whole numbers, got {arg:?}");
                return ExitCode::FAILURE;
            }
        }
    }
    if sizes.is_empty() {
        sizes = vec![1_000, 10_000, 100_000];
    }
    println!(
        "{:>9} {:>7} {:>6} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10} | {:>9}",
        "vehicles",
        "routes",
        "ticks",
        "step mean",
        "step min",
        "json mean",
        "json min",
        "both mean",
        "both min",
        "doc bytes"
    );
    for vehicles in sizes {
        measure(vehicles);
    }
    ExitCode::SUCCESS
}

fn measure(vehicles: usize) {
    let settings = FeedSettings {
        name: "fleet".into(),
        seed: 1,
        vehicles,
        routes: (vehicles / 100).clamp(8, 10_000),
        tick: Duration::from_secs(1),
        move_fraction: 0.3,
        churn: 0.02,
        epoch_seconds: Some(1_700_000_000),
    };
    let mut fleet = Fleet::new(&settings);
    for _ in 0..3 {
        fleet.step();
        std::hint::black_box(fleet.to_json());
    }
    let ticks = (2_000_000 / vehicles).clamp(10, 500);
    let (mut step, mut json) = (Vec::with_capacity(ticks), Vec::with_capacity(ticks));
    let mut bytes = 0;
    for _ in 0..ticks {
        let started = Instant::now();
        fleet.step();
        let stepped = Instant::now();
        let doc = std::hint::black_box(fleet.to_json());
        let done = Instant::now();
        bytes = doc.len();
        step.push(stepped - started);
        json.push(done - stepped);
    }
    let both: Vec<Duration> = step.iter().zip(&json).map(|(a, b)| *a + *b).collect();
    println!(
        "{:>9} {:>7} {:>6} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10} | {:>9}",
        vehicles,
        settings.routes,
        ticks,
        fmt(mean(&step)),
        fmt(min(&step)),
        fmt(mean(&json)),
        fmt(min(&json)),
        fmt(mean(&both)),
        fmt(min(&both)),
        bytes
    );
}

fn mean(samples: &[Duration]) -> Duration {
    samples.iter().sum::<Duration>() / samples.len().max(1) as u32
}

fn min(samples: &[Duration]) -> Duration {
    samples.iter().min().copied().unwrap_or_default()
}

fn fmt(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

//! Simulator configuration: the `[simulator]` table as written, and its validated settings.

use std::net::SocketAddr;
use std::time::Duration;

/// The simulator's validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatorSettings {
    /// Address the simulated feeds are served on.
    pub listen: SocketAddr,
    /// The feeds, each at `/feeds/{name}`.
    pub feeds: Vec<FeedSettings>,
}

/// One simulated fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedSettings {
    /// Served at `/feeds/{name}`.
    pub name: String,
    /// Same seed, same sequence of documents.
    pub seed: u64,
    /// Vehicles in service on average.
    pub vehicles: usize,
    /// Number of routes the vehicles run on.
    pub routes: usize,
    /// Time between two states of the fleet.
    pub tick: Duration,
    /// Fraction of vehicles that move at each tick, 0.0..=1.0.
    pub move_fraction: f64,
    /// Fraction of vehicles that leave (and as many that join) at each tick, 0.0..=1.0.
    pub churn: f64,
    /// Unix time (seconds) of tick 0; `None` means the serving process's start time, rounded
    /// to the second.
    pub epoch_seconds: Option<u64>,
}

/// The `[simulator]` table as written in the configuration file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Serve the simulated feeds (default true when the table is present).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address to serve on, e.g. `127.0.0.1:8081`.
    pub listen: String,
    /// The feeds (`[[simulator.feeds]]`).
    #[serde(default)]
    pub feeds: Vec<FeedConfig>,
}

/// One `[[simulator.feeds]]` entry as written in the configuration file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Served at `/feeds/{name}`.
    pub name: String,
    /// Seed (default 1).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Vehicles in service on average (default 100).
    #[serde(default = "default_vehicles")]
    pub vehicles: usize,
    /// Routes (default 8).
    #[serde(default = "default_routes")]
    pub routes: usize,
    /// Time between states, e.g. `"1s"` (default 1s).
    #[serde(default = "default_tick", with = "humantime_serde")]
    pub tick: Duration,
    /// Fraction of vehicles moving per tick (default 0.3).
    #[serde(default = "default_move_fraction")]
    pub move_fraction: f64,
    /// Fraction of vehicles leaving and joining per tick (default 0.02).
    #[serde(default = "default_churn")]
    pub churn: f64,
    /// Unix time in seconds of tick 0, for documents that are identical from run to run
    /// (default: the time the simulator starts).
    #[serde(default)]
    pub epoch: Option<u64>,
}

/// The latest accepted `epoch`: the start of year 9000, which leaves a thousand years of
/// ticks before timestamps leave the range an HTTP date can express (year 9999).
pub const MAX_EPOCH_SECONDS: u64 = 221_845_392_000;

fn default_true() -> bool {
    true
}
fn default_seed() -> u64 {
    1
}
fn default_vehicles() -> usize {
    100
}
fn default_routes() -> usize {
    8
}
fn default_tick() -> Duration {
    Duration::from_secs(1)
}
fn default_move_fraction() -> f64 {
    0.3
}
fn default_churn() -> f64 {
    0.02
}

impl SimulatorConfig {
    /// Validates this table, whose dotted key is `key` (normally `simulator`), recording
    /// problems. `None` when disabled or when there were problems.
    pub fn validate(
        &self,
        key: &str,
        problems: &mut crate::config::Problems,
    ) -> Option<SimulatorSettings> {
        let before = problems.len();
        let listen = match self.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push(
                    format!("{key}.listen"),
                    format!(
                        "expected an IP address and port such as \"127.0.0.1:8081\", got {:?}",
                        self.listen
                    ),
                );
                None
            }
        };
        let mut names = std::collections::HashSet::new();
        let mut feeds = Vec::with_capacity(self.feeds.len());
        for (i, feed) in self.feeds.iter().enumerate() {
            let fkey = format!("{key}.feeds[{i}]");
            if feed.name.is_empty()
                || !feed
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                problems.push(
                    format!("{fkey}.name"),
                    format!(
                        "expected letters, digits, '-', '_' or '.', got {:?}",
                        feed.name
                    ),
                );
            } else if !names.insert(feed.name.as_str()) {
                problems.push(
                    format!("{fkey}.name"),
                    format!("feed name {:?} is used twice", feed.name),
                );
            }
            if !(1..=1_000_000).contains(&feed.vehicles) {
                problems.push(
                    format!("{fkey}.vehicles"),
                    format!("expected 1 to 1000000, got {}", feed.vehicles),
                );
            }
            if !(1..=10_000).contains(&feed.routes) {
                problems.push(
                    format!("{fkey}.routes"),
                    format!("expected 1 to 10000, got {}", feed.routes),
                );
            }
            if feed.tick < Duration::from_millis(10) || feed.tick > Duration::from_secs(3600) {
                problems.push(
                    format!("{fkey}.tick"),
                    format!(
                        "expected a duration between 10ms and 1h, got {:?}",
                        feed.tick
                    ),
                );
            }
            for (name, value) in [("move_fraction", feed.move_fraction), ("churn", feed.churn)] {
                if !(0.0..=1.0).contains(&value) {
                    problems.push(
                        format!("{fkey}.{name}"),
                        format!("expected a number from 0 to 1, got {value}"),
                    );
                }
            }
            if let Some(epoch) = feed.epoch {
                if epoch > MAX_EPOCH_SECONDS {
                    problems.push(
                        format!("{fkey}.epoch"),
                        format!(
                            "expected Unix seconds from 0 to {MAX_EPOCH_SECONDS} (year 9000), got {epoch}"
                        ),
                    );
                }
            }
            feeds.push(FeedSettings {
                name: feed.name.clone(),
                seed: feed.seed,
                vehicles: feed.vehicles,
                routes: feed.routes,
                tick: feed.tick,
                move_fraction: feed.move_fraction,
                churn: feed.churn,
                epoch_seconds: feed.epoch,
            });
        }
        if self.enabled && self.feeds.is_empty() {
            problems.push(
                format!("{key}.feeds"),
                "expected at least one [[simulator.feeds]] entry",
            );
        }
        let listen = listen?;
        if !self.enabled || problems.len() > before {
            return None;
        }
        Some(SimulatorSettings { listen, feeds })
    }
}

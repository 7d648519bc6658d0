//! Simulator configuration: the `[simulator]` table as written, and its validated settings.

use std::net::SocketAddr;
use std::time::Duration;

use crate::validation::{Problems, duration_in, fraction, integer_in, socket_address, usize_of};

/// Built-in defaults of `[simulator]` and its feeds.
pub mod defaults {
    use std::time::Duration;

    /// `simulator.enabled` (when the table is present).
    pub const ENABLED: bool = true;
    /// `simulator.feeds[].seed`.
    pub const SEED: u64 = 1;
    /// `simulator.feeds[].vehicles`.
    pub const VEHICLES: usize = 100;
    /// `simulator.feeds[].routes`.
    pub const ROUTES: usize = 8;
    /// `simulator.feeds[].tick`.
    pub const TICK: Duration = Duration::from_secs(1);
    /// `simulator.feeds[].move_fraction`.
    pub const MOVE_FRACTION: f64 = 0.3;
    /// `simulator.feeds[].churn`.
    pub const CHURN: f64 = 0.02;
}

/// Inclusive bounds of the feeds' keys.
pub mod limits {
    use std::time::Duration;

    /// `simulator.feeds[].vehicles`.
    pub const VEHICLES: (u64, u64) = (1, 1_000_000);
    /// `simulator.feeds[].routes`.
    pub const ROUTES: (u64, u64) = (1, 10_000);
    /// `simulator.feeds[].tick`.
    pub const TICK: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(3600));
}

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
    /// Serve the simulated feeds ([default](defaults::ENABLED) when the table is present).
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
    /// Seed ([default](defaults::SEED)).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Vehicles in service on average ([default](defaults::VEHICLES), [bounds](limits::VEHICLES)).
    #[serde(default = "default_vehicles")]
    pub vehicles: usize,
    /// Routes ([default](defaults::ROUTES), [bounds](limits::ROUTES)).
    #[serde(default = "default_routes")]
    pub routes: usize,
    /// Time between states, e.g. `"1s"` ([default](defaults::TICK), [bounds](limits::TICK)).
    #[serde(default = "default_tick", with = "humantime_serde")]
    pub tick: Duration,
    /// Fraction of vehicles moving per tick, from 0 to 1 ([default](defaults::MOVE_FRACTION)).
    #[serde(default = "default_move_fraction")]
    pub move_fraction: f64,
    /// Fraction of vehicles leaving and joining per tick, from 0 to 1
    /// ([default](defaults::CHURN)).
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

// serde's `default = "..."` takes functions.
fn default_true() -> bool {
    defaults::ENABLED
}
fn default_seed() -> u64 {
    defaults::SEED
}
fn default_vehicles() -> usize {
    defaults::VEHICLES
}
fn default_routes() -> usize {
    defaults::ROUTES
}
fn default_tick() -> Duration {
    defaults::TICK
}
fn default_move_fraction() -> f64 {
    defaults::MOVE_FRACTION
}
fn default_churn() -> f64 {
    defaults::CHURN
}

impl SimulatorConfig {
    /// Validates this table, whose dotted key is `key` (normally `simulator`), recording
    /// problems. `None` when disabled or when there were problems.
    pub fn validate(&self, key: &str, problems: &mut Problems) -> Option<SimulatorSettings> {
        let before = problems.len();
        let listen = socket_address(
            problems,
            &format!("{key}.listen"),
            &self.listen,
            "\"127.0.0.1:8081\"",
        );
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
            // The keys are always set here (serde filled in their defaults): each is checked.
            let count = |n: usize| Some(u64::try_from(n).unwrap_or(u64::MAX));
            let vehicles = integer_in(
                problems,
                &format!("{fkey}.vehicles"),
                count(feed.vehicles),
                0,
                limits::VEHICLES,
            );
            let routes = integer_in(
                problems,
                &format!("{fkey}.routes"),
                count(feed.routes),
                0,
                limits::ROUTES,
            );
            let tick = duration_in(
                problems,
                &format!("{fkey}.tick"),
                Some(feed.tick),
                Duration::ZERO,
                limits::TICK,
            );
            let fraction_of = |problems: &mut Problems, name: &str, value: f64| {
                fraction(problems, &format!("{fkey}.{name}"), Some(value), 0.0)
            };
            let move_fraction = fraction_of(problems, "move_fraction", feed.move_fraction);
            let churn = fraction_of(problems, "churn", feed.churn);
            if let Some(epoch) = feed.epoch
                && epoch > MAX_EPOCH_SECONDS
            {
                problems.push(
                        format!("{fkey}.epoch"),
                        format!(
                            "expected Unix seconds from 0 to {MAX_EPOCH_SECONDS} (year 9000), got {epoch}"
                        ),
                    );
            }
            feeds.push(FeedSettings {
                name: feed.name.clone(),
                seed: feed.seed,
                vehicles: usize_of(vehicles),
                routes: usize_of(routes),
                tick,
                move_fraction,
                churn,
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(value: serde_json::Value) -> SimulatorConfig {
        match serde_json::from_value(value) {
            Ok(config) => config,
            Err(e) => panic!("test config does not parse: {e}"),
        }
    }

    /// Validates and returns the settings and the problems as `(key, message)` pairs.
    fn check(value: serde_json::Value) -> (Option<SimulatorSettings>, Vec<(String, String)>) {
        let mut problems = Problems::default();
        let settings = parse(value).validate("simulator", &mut problems);
        let listed = match problems.finish(None, ()) {
            Ok(()) => Vec::new(),
            Err(e) => e.problems.into_iter().map(|p| (p.key, p.message)).collect(),
        };
        (settings, listed)
    }

    #[test]
    fn defaults_fill_every_omitted_key() {
        let (settings, problems) =
            check(json!({ "listen": "127.0.0.1:8081", "feeds": [{ "name": "fleet" }] }));
        assert_eq!(problems, []);
        let settings = settings.expect("valid");
        assert_eq!(settings.listen, "127.0.0.1:8081".parse().expect("address"));
        assert_eq!(
            settings.feeds,
            [FeedSettings {
                name: "fleet".into(),
                seed: 1,
                vehicles: 100,
                routes: 8,
                tick: Duration::from_secs(1),
                move_fraction: 0.3,
                churn: 0.02,
                epoch_seconds: None,
            }]
        );
    }

    #[test]
    fn every_key_is_carried_over() {
        let (settings, problems) = check(json!({
            "listen": "[::1]:0",
            "feeds": [
                { "name": "a", "seed": 9, "vehicles": 100000, "routes": 40, "tick": "250ms",
                  "move_fraction": 1.0, "churn": 0.0, "epoch": 1700000000 },
                { "name": "b.2_x-y" },
            ],
        }));
        assert_eq!(problems, []);
        let feeds = settings.expect("valid").feeds;
        assert_eq!(
            feeds[0],
            FeedSettings {
                name: "a".into(),
                seed: 9,
                vehicles: 100_000,
                routes: 40,
                tick: Duration::from_millis(250),
                move_fraction: 1.0,
                churn: 0.0,
                epoch_seconds: Some(1_700_000_000),
            }
        );
        assert_eq!(feeds[1].name, "b.2_x-y");
    }

    #[test]
    fn each_bad_value_is_reported_at_its_key() {
        let cases = [
            (
                json!({ "listen": "localhost" }),
                "simulator.listen",
                "127.0.0.1:8081",
            ),
            (
                json!({ "feeds": [{ "name": "" }] }),
                "simulator.feeds[0].name",
                "letters",
            ),
            (
                json!({ "feeds": [{ "name": "a b" }] }),
                "simulator.feeds[0].name",
                "\"a b\"",
            ),
            (
                json!({ "feeds": [{ "name": "a" }, { "name": "a" }] }),
                "simulator.feeds[1].name",
                "twice",
            ),
            (
                json!({ "feeds": [{ "name": "a", "vehicles": 0 }] }),
                "simulator.feeds[0].vehicles",
                "got 0",
            ),
            (
                json!({ "feeds": [{ "name": "a", "vehicles": 1000001 }] }),
                "simulator.feeds[0].vehicles",
                "1000000",
            ),
            (
                json!({ "feeds": [{ "name": "a", "routes": 0 }] }),
                "simulator.feeds[0].routes",
                "1 to 10000",
            ),
            (
                json!({ "feeds": [{ "name": "a", "tick": "1ms" }] }),
                "simulator.feeds[0].tick",
                "10ms and 1h",
            ),
            (
                json!({ "feeds": [{ "name": "a", "tick": "2h" }] }),
                "simulator.feeds[0].tick",
                "10ms and 1h",
            ),
            (
                json!({ "feeds": [{ "name": "a", "move_fraction": 1.5 }] }),
                "simulator.feeds[0].move_fraction",
                "got 1.5",
            ),
            (
                json!({ "feeds": [{ "name": "a", "churn": -0.1 }] }),
                "simulator.feeds[0].churn",
                "got -0.1",
            ),
            (
                json!({ "feeds": [{ "name": "a", "epoch": 300000000000u64 }] }),
                "simulator.feeds[0].epoch",
                "300000000000",
            ),
            (json!({ "feeds": [] }), "simulator.feeds", "at least one"),
        ];
        for (overrides, key, expected) in cases {
            let mut config = json!({ "listen": "127.0.0.1:8081", "feeds": [{ "name": "ok" }] });
            for (k, v) in overrides.as_object().expect("an object") {
                config[k] = v.clone();
            }
            let (settings, problems) = check(config.clone());
            assert!(settings.is_none(), "{config} was accepted");
            assert_eq!(problems.len(), 1, "{config}: {problems:?}");
            assert_eq!(problems[0].0, key, "{config}");
            assert!(
                problems[0].1.contains(expected),
                "{config}: {}",
                problems[0].1
            );
        }
    }

    #[test]
    fn all_problems_are_reported_together() {
        let (settings, problems) = check(json!({
            "listen": "nope",
            "feeds": [{ "name": "a", "vehicles": 0, "churn": 2.0 }],
        }));
        assert!(settings.is_none());
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "simulator.listen",
                "simulator.feeds[0].vehicles",
                "simulator.feeds[0].churn"
            ]
        );
    }

    #[test]
    fn disabled_simulator_builds_nothing() {
        let (settings, problems) = check(json!({ "enabled": false, "listen": "127.0.0.1:8081" }));
        assert_eq!(problems, []);
        assert!(settings.is_none());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = serde_json::from_value::<SimulatorConfig>(json!({
            "listen": "127.0.0.1:8081",
            "feeds": [{ "name": "a", "vehicle": 5 }],
        }))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("unknown field `vehicle`"), "{err}");
    }
}

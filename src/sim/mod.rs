//! The simulated feed: a deterministic fleet of vehicles served over HTTP like a real polled API.
//!
//! - `config`: the `[simulator]` table ([`SimulatorConfig`]) and its validated settings
//!   ([`SimulatorSettings`], one [`FeedSettings`] per feed).
//! - `fleet`: [`Fleet`], vehicles moving along routes, joining and leaving; the document at a
//!   tick is a pure function of the feed's settings and the tick.
//! - `geo`, `rng`: platform-independent route geometry and the SplitMix64 generator, so the
//!   same seed gives the same bytes everywhere and across dependency upgrades.
//! - `clock`: [`SimClock`], real time or a [`ManualClock`] tests turn by hand.
//! - `server`: [`router`] and [`serve`], `GET /feeds` and `GET /feeds/{name}` with ETags.

mod clock;
mod config;
mod fleet;
mod geo;
mod rng;
mod server;

pub use clock::{ManualClock, SimClock};
pub use config::{
    FeedConfig, FeedSettings, MAX_EPOCH_SECONDS, SimulatorConfig, SimulatorSettings, defaults,
    limits,
};
pub use fleet::Fleet;
pub use server::{router, serve};

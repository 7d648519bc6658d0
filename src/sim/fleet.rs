//! The fleet: vehicles moving along routes, joining and leaving, as a pure function of the
//! feed's settings and the tick.
//!
//! Every tick draws from its own generator, seeded from `(seed, tick)`, and applies the same
//! rules in vehicle order, so the state at tick k depends only on the settings and k; the
//! server relies on that to compute tick k+1 from tick k instead of from scratch. All
//! quantities are integers (micro-degrees, tenths of m/s, whole degrees), so documents are
//! identical on every platform.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value};

use super::config::FeedSettings;
use super::geo::{self, Point, Route};
use super::rng::{SplitMix64, derive};

/// Digits in a vehicle id (`v00000017`): ids sort as strings in the same order as numbers
/// until 10^8 vehicles have joined; beyond that the id widens and vehicles stay in numeric order.
const ID_DIGITS: usize = 8;

/// Keeps the per-tick generators apart from the route generators.
const TICK_DOMAIN: u64 = 0x7469_636b; // "tick"

/// Progress along a leg, in thousandths, from which a vehicle reports `INCOMING_AT`.
const INCOMING_FROM: u16 = 800;

/// GTFS-realtime `VehicleStopStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    IncomingAt,
    StoppedAt,
    InTransitTo,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::IncomingAt => "INCOMING_AT",
            Status::StoppedAt => "STOPPED_AT",
            Status::InTransitTo => "IN_TRANSIT_TO",
        }
    }

    fn for_progress(progress: u16) -> Status {
        if progress == 0 {
            Status::StoppedAt
        } else if progress >= INCOMING_FROM {
            Status::IncomingAt
        } else {
            Status::InTransitTo
        }
    }
}

/// GTFS-realtime `OccupancyStatus`, from emptiest to fullest.
const OCCUPANCY: [&str; 6] = [
    "EMPTY",
    "MANY_SEATS_AVAILABLE",
    "FEW_SEATS_AVAILABLE",
    "STANDING_ROOM_ONLY",
    "CRUSHED_STANDING_ROOM_ONLY",
    "FULL",
];

/// One vehicle in service.
#[derive(Debug, Clone)]
struct Vehicle {
    /// Unique for the life of the feed; ids are handed out in increasing order.
    id: u64,
    /// Index into the fleet's routes.
    route: u32,
    /// The trip's number on its route.
    trip: u64,
    /// The stop the vehicle is at, or last left.
    at: u16,
    /// Running towards higher stop indices.
    forward: bool,
    /// Thousandths of the leg from `at` to the next stop; 0 when stopped at `at`.
    progress: u16,
    /// Whole degrees, 0 = north.
    bearing: u16,
    /// Tenths of a metre per second.
    speed: u16,
    /// Index into [`OCCUPANCY`].
    occupancy: u8,
    /// The tick at which the vehicle last moved (or joined).
    updated: u64,
}

/// A deterministic fleet of vehicles moving along routes; see the module documentation.
#[derive(Debug, Clone)]
pub struct Fleet {
    settings: FeedSettings,
    /// `settings.epoch_seconds`, resolved.
    epoch: u64,
    /// The feed name as a JSON string literal, escaped once.
    name_json: String,
    move_fraction: f64,
    churn: f64,
    routes: Vec<Route>,
    /// Trips started so far on each route, for trip numbers.
    trips: Vec<u64>,
    /// Always sorted by id: survivors keep their order and newcomers get larger ids.
    vehicles: Vec<Vehicle>,
    next_id: u64,
    tick: u64,
}

/// Unix seconds now, rounded to the nearest second.
pub(crate) fn now_epoch_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() + u64::from(d.subsec_millis() >= 500))
}

/// A fraction from the settings, made safe: NaN counts as 0, the rest is clamped to 0..=1.
fn fraction(value: f64) -> f64 {
    if value.is_nan() {
        0.0
    } else {
        value.clamp(0.0, 1.0)
    }
}

impl Fleet {
    /// The fleet at tick 0. An unset `epoch_seconds` is taken as now, rounded to the second;
    /// set it for timestamps that repeat from run to run. Settings are used as given (they
    /// need not have been validated): fractions are clamped to 0..=1 and at least one route
    /// is laid out.
    pub fn new(settings: &FeedSettings) -> Fleet {
        let epoch = settings.epoch_seconds.unwrap_or_else(now_epoch_seconds);
        Fleet::with_epoch(settings, epoch)
    }

    fn with_epoch(settings: &FeedSettings, epoch: u64) -> Fleet {
        let route_count = settings.routes.clamp(1, u32::MAX as usize);
        let routes: Vec<Route> = (0..route_count as u64)
            .map(|i| geo::route(settings.seed, i))
            .collect();
        let mut fleet = Fleet {
            settings: FeedSettings {
                epoch_seconds: Some(epoch),
                ..settings.clone()
            },
            epoch,
            name_json: Value::String(settings.name.clone()).to_string(),
            move_fraction: fraction(settings.move_fraction),
            churn: fraction(settings.churn),
            trips: vec![0; routes.len()],
            routes,
            vehicles: Vec::with_capacity(settings.vehicles),
            next_id: 1,
            tick: 0,
        };
        let mut rng = SplitMix64::new(derive(settings.seed, &[TICK_DOMAIN, 0]));
        for _ in 0..settings.vehicles {
            fleet.join(&mut rng);
        }
        fleet
    }

    /// The settings this fleet was built from, with `epoch_seconds` resolved.
    pub fn settings(&self) -> &FeedSettings {
        &self.settings
    }

    /// The current tick.
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// Vehicles in service now.
    pub fn len(&self) -> usize {
        self.vehicles.len()
    }

    /// True when no vehicle is in service.
    pub fn is_empty(&self) -> bool {
        self.vehicles.is_empty()
    }

    /// Unix seconds of tick `tick`: the epoch plus `tick` ticks, rounded down to the second
    /// (saturating; several sub-second ticks share a second).
    pub fn timestamp_of(&self, tick: u64) -> u64 {
        let nanos = u128::from(tick) * self.settings.tick.as_nanos() / 1_000_000_000;
        self.epoch
            .saturating_add(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Unix seconds of the current tick.
    pub fn timestamp(&self) -> u64 {
        self.timestamp_of(self.tick)
    }

    /// The largest distance the count of vehicles may stray from `settings.vehicles`:
    /// `floor(churn * vehicles / 4)`.
    pub fn max_count_deviation(&self) -> usize {
        (self.churn * self.settings.vehicles as f64 / 4.0).floor() as usize
    }

    /// Advances one tick: each vehicle leaves with probability `churn`, otherwise moves with
    /// probability `move_fraction`; then new vehicles join so the count lands within
    /// [`Fleet::max_count_deviation`] of `vehicles`.
    pub fn step(&mut self) {
        let tick = self.tick.saturating_add(1);
        self.tick = tick;
        let mut rng = SplitMix64::new(derive(self.settings.seed, &[TICK_DOMAIN, tick]));
        let (churn, move_fraction) = (self.churn, self.move_fraction);
        let routes = &self.routes;
        let trips = &mut self.trips;
        self.vehicles.retain_mut(|vehicle| {
            if rng.chance(churn) {
                return false;
            }
            if rng.chance(move_fraction) {
                advance(vehicle, routes, trips, &mut rng, tick);
            }
            true
        });
        let spread = self.max_count_deviation() as i64;
        let target = i64::try_from(self.settings.vehicles).unwrap_or(i64::MAX);
        let now = i64::try_from(self.vehicles.len()).unwrap_or(i64::MAX);
        let joining = target
            .saturating_sub(now)
            .saturating_add(rng.between(-spread, spread));
        for _ in 0..joining.max(0) {
            self.join(&mut rng);
        }
    }

    /// Moves to `tick`: forward step by step from the current state, or, for an earlier tick,
    /// from tick 0 again.
    pub fn advance_to(&mut self, tick: u64) {
        if tick < self.tick {
            *self = Fleet::with_epoch(&self.settings, self.epoch);
        }
        while self.tick < tick {
            self.step();
        }
    }

    /// Adds one vehicle with a fresh id somewhere along a random route.
    fn join(&mut self, rng: &mut SplitMix64) {
        let route_index = rng.below(self.routes.len() as u64) as usize;
        let stop_count = self.routes[route_index].stops.len() as i64;
        let forward = rng.chance(0.5);
        let at = if forward {
            rng.between(0, stop_count - 2)
        } else {
            rng.between(1, stop_count - 1)
        } as u16;
        let progress = rng.between(0, 999) as u16;
        let trip = &mut self.trips[route_index];
        *trip += 1;
        let mut vehicle = Vehicle {
            id: self.next_id,
            route: route_index as u32,
            trip: *trip,
            at,
            forward,
            progress,
            bearing: 0,
            speed: 0,
            occupancy: rng.between(0, 3) as u8,
            updated: self.tick,
        };
        vehicle.bearing = leg_bearing(&self.routes[route_index], &vehicle);
        if progress > 0 {
            vehicle.speed = rng.between(30, 150) as u16;
        }
        self.next_id += 1;
        self.vehicles.push(vehicle);
    }

    /// The current document as JSON, built as a [`Value`] (see [`Fleet::to_json`] for the
    /// bytes served; both describe the same document).
    pub fn document(&self) -> Value {
        let mut header = Map::new();
        header.insert("feed".into(), Value::String(self.settings.name.clone()));
        header.insert("tick".into(), self.tick.into());
        header.insert("timestamp".into(), self.timestamp().into());
        let vehicles = self
            .vehicles
            .iter()
            .map(|v| {
                let route = &self.routes[v.route as usize];
                let point = position(route, v);
                let mut position = Map::new();
                position.insert("lat".into(), (point.lat as f64 / 1e6).into());
                position.insert("lon".into(), (point.lon as f64 / 1e6).into());
                position.insert("bearing".into(), v.bearing.into());
                position.insert("speed".into(), (f64::from(v.speed) / 10.0).into());
                let mut vehicle = Map::new();
                vehicle.insert("id".into(), format!("v{:0ID_DIGITS$}", v.id).into());
                vehicle.insert("route".into(), format!("R{}", v.route + 1).into());
                vehicle.insert(
                    "trip".into(),
                    format!("R{}-{:04}", v.route + 1, v.trip).into(),
                );
                vehicle.insert("position".into(), Value::Object(position));
                vehicle.insert(
                    "stop".into(),
                    format!("R{}-S{:02}", v.route + 1, stop_index(v) + 1).into(),
                );
                vehicle.insert("status".into(), status(v).as_str().into());
                vehicle.insert("occupancy".into(), occupancy(v).into());
                vehicle.insert("updated".into(), self.timestamp_of(v.updated).into());
                Value::Object(vehicle)
            })
            .collect();
        let mut document = Map::new();
        document.insert("header".into(), Value::Object(header));
        document.insert("vehicles".into(), Value::Array(vehicles));
        Value::Object(document)
    }

    /// The current document as compact JSON. Written directly rather than through
    /// `serde_json` because this is the simulator's hot path at 100,000 vehicles and
    /// everything in it is an integer or a known ASCII string.
    pub fn to_json(&self) -> Bytes {
        let mut out = Vec::with_capacity(64 + self.vehicles.len() * 240);
        out.extend_from_slice(b"{\"header\":{\"feed\":");
        out.extend_from_slice(self.name_json.as_bytes());
        out.extend_from_slice(b",\"tick\":");
        push_u64(&mut out, self.tick);
        out.extend_from_slice(b",\"timestamp\":");
        push_u64(&mut out, self.timestamp());
        out.extend_from_slice(b"},\"vehicles\":[");
        for (i, v) in self.vehicles.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let route = &self.routes[v.route as usize];
            let point = position(route, v);
            let route_number = u64::from(v.route) + 1;
            out.extend_from_slice(b"{\"id\":\"v");
            push_padded(&mut out, v.id, ID_DIGITS);
            out.extend_from_slice(b"\",\"route\":\"R");
            push_u64(&mut out, route_number);
            out.extend_from_slice(b"\",\"trip\":\"R");
            push_u64(&mut out, route_number);
            out.push(b'-');
            push_padded(&mut out, v.trip, 4);
            out.extend_from_slice(b"\",\"position\":{\"lat\":");
            push_decimal(&mut out, point.lat, 6);
            out.extend_from_slice(b",\"lon\":");
            push_decimal(&mut out, point.lon, 6);
            out.extend_from_slice(b",\"bearing\":");
            push_u64(&mut out, u64::from(v.bearing));
            out.extend_from_slice(b",\"speed\":");
            push_decimal(&mut out, i64::from(v.speed), 1);
            out.extend_from_slice(b"},\"stop\":\"R");
            push_u64(&mut out, route_number);
            out.extend_from_slice(b"-S");
            push_padded(&mut out, u64::from(stop_index(v)) + 1, 2);
            out.extend_from_slice(b"\",\"status\":\"");
            out.extend_from_slice(status(v).as_str().as_bytes());
            out.extend_from_slice(b"\",\"occupancy\":\"");
            out.extend_from_slice(occupancy(v).as_bytes());
            out.extend_from_slice(b"\",\"updated\":");
            push_u64(&mut out, self.timestamp_of(v.updated));
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        Bytes::from(out)
    }
}

/// Moves a vehicle one tick along its route: departs if stopped (turning round and starting
/// a new trip at a terminus), otherwise covers 15-45% of its leg, arriving when it reaches
/// the end, where the load sometimes changes.
fn advance(
    vehicle: &mut Vehicle,
    routes: &[Route],
    trips: &mut [u64],
    rng: &mut SplitMix64,
    tick: u64,
) {
    let route = &routes[vehicle.route as usize];
    let last = (route.stops.len() - 1) as u16;
    vehicle.updated = tick;
    if vehicle.progress == 0 {
        let at_terminus = if vehicle.forward {
            vehicle.at >= last
        } else {
            vehicle.at == 0
        };
        if at_terminus {
            vehicle.forward = !vehicle.forward;
            let trip = &mut trips[vehicle.route as usize];
            *trip += 1;
            vehicle.trip = *trip;
        }
    }
    let progress = vehicle.progress + rng.between(150, 450) as u16;
    if progress >= 1000 {
        vehicle.at = next_stop(vehicle);
        vehicle.progress = 0;
        vehicle.speed = 0;
        if rng.chance(0.5) {
            let change = if rng.chance(0.5) { 1 } else { -1 };
            vehicle.occupancy =
                (i16::from(vehicle.occupancy) + change).clamp(0, OCCUPANCY.len() as i16 - 1) as u8;
        }
    } else {
        vehicle.progress = progress;
        vehicle.speed = rng.between(30, 150) as u16;
        vehicle.bearing = leg_bearing(route, vehicle);
    }
}

/// The stop after `at` in the vehicle's direction (only meaningful when not at a terminus).
fn next_stop(v: &Vehicle) -> u16 {
    if v.forward {
        v.at + 1
    } else {
        v.at.saturating_sub(1)
    }
}

/// The bearing of the leg the vehicle is on (it must not be at its terminus).
fn leg_bearing(route: &Route, v: &Vehicle) -> u16 {
    if v.forward {
        route.legs[v.at as usize]
    } else {
        (route.legs[v.at as usize - 1] + 180) % 360
    }
}

fn position(route: &Route, v: &Vehicle) -> Point {
    let here = route.stops[v.at as usize];
    if v.progress == 0 {
        here
    } else {
        geo::interpolate(here, route.stops[next_stop(v) as usize], v.progress)
    }
}

/// The stop reported: the one the vehicle is at, or the one it is heading for.
fn stop_index(v: &Vehicle) -> u16 {
    if v.progress == 0 { v.at } else { next_stop(v) }
}

fn status(v: &Vehicle) -> Status {
    Status::for_progress(v.progress)
}

fn occupancy(v: &Vehicle) -> &'static str {
    OCCUPANCY[usize::from(v.occupancy).min(OCCUPANCY.len() - 1)]
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    push_padded(out, n, 1);
}

/// Writes `n` in decimal, zero-padded to at least `width` digits.
fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(len)));
    out.extend_from_slice(&digits[i..]);
}

/// Writes `scaled / 10^decimals` as a JSON float: always with a fractional part (so it reads
/// back as a float, like `serde_json` writes an `f64`) and without trailing zeros.
fn push_decimal(out: &mut Vec<u8>, scaled: i64, decimals: u32) {
    if scaled < 0 {
        out.push(b'-');
    }
    let magnitude = scaled.unsigned_abs();
    let scale = 10u64.pow(decimals);
    push_u64(out, magnitude / scale);
    out.push(b'.');
    let mut fraction = magnitude % scale;
    let mut width = decimals as usize;
    while width > 1 && fraction % 10 == 0 {
        fraction /= 10;
        width -= 1;
    }
    push_padded(out, fraction, width);
}

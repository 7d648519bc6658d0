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
    /// set it for timestamps that repeat from run to run. Settings need not have been
    /// validated: fractions are clamped to 0..=1 (NaN counts as 0), at least one route is laid
    /// out, and no tick length overflows. Sizes are taken as given, so memory grows with
    /// `vehicles` and `routes` (validation caps them at 1,000,000 and 10,000).
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
            vehicles: Vec::with_capacity(settings.vehicles.min(1 << 20)),
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
        let nanos = u128::from(tick).saturating_mul(self.settings.tick.as_nanos()) / 1_000_000_000;
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
    while width > 1 && fraction.is_multiple_of(10) {
        fraction /= 10;
        width -= 1;
    }
    push_padded(out, fraction, width);
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn settings(seed: u64, vehicles: usize) -> FeedSettings {
        FeedSettings {
            name: "fleet".into(),
            seed,
            vehicles,
            routes: 8,
            tick: Duration::from_secs(1),
            move_fraction: 0.3,
            churn: 0.02,
            epoch_seconds: Some(1_700_000_000),
        }
    }

    fn parse(fleet: &Fleet) -> Value {
        match serde_json::from_slice(&fleet.to_json()) {
            Ok(value) => value,
            Err(e) => panic!("to_json is not JSON at tick {}: {e}", fleet.tick()),
        }
    }

    fn vehicles(doc: &Value) -> &Vec<Value> {
        doc["vehicles"].as_array().expect("vehicles is an array")
    }

    fn by_id(doc: &Value) -> BTreeMap<String, Value> {
        vehicles(doc)
            .iter()
            .map(|v| {
                (
                    v["id"].as_str().expect("id is a string").to_owned(),
                    v.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn same_seed_same_documents_different_seed_different() {
        let mut a = Fleet::new(&settings(7, 300));
        let mut b = Fleet::new(&settings(7, 300));
        let mut c = Fleet::new(&settings(8, 300));
        for _ in 0..30 {
            assert_eq!(a.to_json(), b.to_json(), "tick {}", a.tick());
            assert_ne!(
                a.document()["vehicles"],
                c.document()["vehicles"],
                "tick {}",
                a.tick()
            );
            a.step();
            b.step();
            c.step();
        }
    }

    #[test]
    fn state_at_a_tick_does_not_depend_on_the_path_there() {
        let mut stepped = Fleet::new(&settings(3, 200));
        for _ in 0..25 {
            stepped.step();
        }
        let mut jumped = Fleet::new(&settings(3, 200));
        jumped.advance_to(25);
        assert_eq!(jumped.to_json(), stepped.to_json());
        let mut back = Fleet::new(&settings(3, 200));
        back.advance_to(40);
        back.advance_to(25);
        assert_eq!(back.tick(), 25);
        assert_eq!(back.to_json(), stepped.to_json());
        back.advance_to(0);
        assert_eq!(back.to_json(), Fleet::new(&settings(3, 200)).to_json());
    }

    /// Guards the promise that a seed gives the same bytes across releases and dependency
    /// upgrades. If the model changes on purpose, update the digest and say so in the change log.
    #[test]
    fn documents_match_the_recorded_digest() {
        let mut fleet = Fleet::new(&settings(1, 100));
        fleet.advance_to(10);
        let json = fleet.to_json();
        let digest = json
            .iter()
            .fold(0u64, |acc, &b| derive(acc, &[u64::from(b)]));
        let head = String::from_utf8_lossy(&json[..json.len().min(400)]).into_owned();
        assert!(
            head.starts_with(
                "{\"header\":{\"feed\":\"fleet\",\"tick\":10,\"timestamp\":1700000010},\"vehicles\":[\
                 {\"id\":\"v00000001\",\"route\":\"R1\",\"trip\":\"R1-0001\",\"position\":\
                 {\"lat\":42.430709,\"lon\":-71.027433,\"bearing\":158,\"speed\":13.1},\
                 \"stop\":\"R1-S14\",\"status\":\"IN_TRANSIT_TO\",\"occupancy\":\"EMPTY\",\
                 \"updated\":1700000003}"
            ),
            "document now starts {head}"
        );
        assert_eq!(
            digest, 4_828_479_868_695_775_423,
            "document now starts {head}"
        );
    }

    #[test]
    fn to_json_and_document_agree() {
        let mut fleet = Fleet::new(&settings(5, 150));
        for _ in 0..20 {
            assert_eq!(parse(&fleet), fleet.document());
            fleet.step();
        }
    }

    #[test]
    fn document_has_the_promised_shape() {
        let mut fleet = Fleet::new(&settings(11, 120));
        fleet.advance_to(17);
        let doc = parse(&fleet);
        let keys = |v: &Value| -> Vec<String> {
            v.as_object().expect("an object").keys().cloned().collect()
        };
        assert_eq!(keys(&doc), ["header", "vehicles"]);
        assert_eq!(doc["header"], json_header("fleet", 17, 1_700_000_000 + 17));
        let list = vehicles(&doc);
        assert_eq!(list.len(), fleet.len());
        let mut previous = String::new();
        for v in list {
            assert_eq!(
                keys(v),
                [
                    "id",
                    "route",
                    "trip",
                    "position",
                    "stop",
                    "status",
                    "occupancy",
                    "updated"
                ]
            );
            assert_eq!(keys(&v["position"]), ["lat", "lon", "bearing", "speed"]);
            let id = v["id"].as_str().expect("id");
            assert!(id.len() == 9 && id.starts_with('v'), "{id}");
            assert!(
                id > previous.as_str(),
                "ids out of order: {previous} then {id}"
            );
            previous = id.to_owned();
            let route = v["route"].as_str().expect("route");
            let number: usize = route[1..].parse().expect("route number");
            assert!(
                route.starts_with('R') && (1..=8).contains(&number),
                "{route}"
            );
            let trip = v["trip"].as_str().expect("trip");
            assert!(trip.starts_with(&format!("{route}-")) && trip.len() >= route.len() + 5);
            let stop = v["stop"].as_str().expect("stop");
            assert!(stop.starts_with(&format!("{route}-S")), "{stop}");
            let lat = v["position"]["lat"].as_f64().expect("lat");
            let lon = v["position"]["lon"].as_f64().expect("lon");
            assert!((lat - 42.36).abs() < 0.5 && (lon + 71.06).abs() < 0.7);
            assert_eq!(
                (lat * 1e6).round() / 1e6,
                lat,
                "lat has more than 6 decimals"
            );
            assert!(v["position"]["bearing"].as_u64().expect("bearing") < 360);
            let speed = v["position"]["speed"].as_f64().expect("speed");
            let status = v["status"].as_str().expect("status");
            match status {
                "STOPPED_AT" => assert_eq!(speed, 0.0),
                "IN_TRANSIT_TO" | "INCOMING_AT" => assert!((3.0..=15.0).contains(&speed)),
                other => panic!("unexpected status {other}"),
            }
            assert!(OCCUPANCY.contains(&v["occupancy"].as_str().expect("occupancy")));
            let updated = v["updated"].as_u64().expect("updated");
            assert!((1_700_000_000..=1_700_000_017).contains(&updated));
        }
    }

    fn json_header(feed: &str, tick: u64, timestamp: u64) -> Value {
        serde_json::json!({ "feed": feed, "tick": tick, "timestamp": timestamp })
    }

    #[test]
    fn timestamps_follow_epoch_and_tick_length() {
        let mut s = settings(1, 10);
        s.tick = Duration::from_millis(250);
        let mut fleet = Fleet::new(&s);
        assert_eq!(fleet.timestamp(), 1_700_000_000);
        fleet.advance_to(3);
        assert_eq!(fleet.timestamp(), 1_700_000_000);
        fleet.advance_to(4);
        assert_eq!(fleet.timestamp(), 1_700_000_001);
        assert_eq!(fleet.timestamp_of(u64::MAX), 1_700_000_000 + u64::MAX / 4);
        s.tick = Duration::from_secs(3600);
        assert_eq!(Fleet::new(&s).timestamp_of(u64::MAX), u64::MAX);
        s.tick = Duration::MAX;
        assert_eq!(Fleet::new(&s).timestamp_of(u64::MAX), u64::MAX);
        s.tick = Duration::ZERO;
        assert_eq!(Fleet::new(&s).timestamp_of(u64::MAX), 1_700_000_000);
    }

    #[test]
    fn count_stays_within_the_promised_band_and_does_vary() {
        let mut s = settings(2, 1_000);
        s.churn = 0.1;
        let mut fleet = Fleet::new(&s);
        let band = fleet.max_count_deviation();
        assert_eq!(band, 25);
        let mut counts = HashSet::new();
        for _ in 0..300 {
            fleet.step();
            assert!(
                fleet.len().abs_diff(1_000) <= band,
                "{} vehicles",
                fleet.len()
            );
            counts.insert(fleet.len());
        }
        assert!(counts.len() > 10, "the count barely varies: {counts:?}");
    }

    #[test]
    fn ids_are_never_reused_and_churn_replaces_vehicles() {
        let mut s = settings(4, 500);
        s.churn = 0.05;
        let mut fleet = Fleet::new(&s);
        let mut gone = HashSet::new();
        let mut before: HashSet<String> = by_id(&parse(&fleet)).into_keys().collect();
        let mut max_seen = before.iter().max().cloned().unwrap_or_default();
        for _ in 0..100 {
            fleet.step();
            let now: HashSet<String> = by_id(&parse(&fleet)).into_keys().collect();
            let left: Vec<_> = before.difference(&now).cloned().collect();
            let joined: Vec<_> = now.difference(&before).cloned().collect();
            assert!(
                !left.is_empty() && !joined.is_empty(),
                "no churn at tick {}",
                fleet.tick()
            );
            for id in &joined {
                assert!(!gone.contains(id), "{id} came back");
                assert!(*id > max_seen, "{id} is not newer than {max_seen}");
            }
            max_seen = now.iter().max().cloned().unwrap_or(max_seen);
            gone.extend(left);
            before = now;
        }
    }

    #[test]
    fn about_move_fraction_of_vehicles_change_each_tick_and_only_they() {
        for move_fraction in [0.0, 0.1, 0.3, 1.0] {
            let mut s = settings(6, 2_000);
            s.move_fraction = move_fraction;
            s.churn = 0.01;
            let mut fleet = Fleet::new(&s);
            let mut before = by_id(&parse(&fleet));
            let (mut kept, mut changed) = (0usize, 0usize);
            for _ in 0..20 {
                fleet.step();
                let now = by_id(&parse(&fleet));
                let stamp = fleet.timestamp();
                for (id, old) in &before {
                    let Some(new) = now.get(id) else { continue };
                    kept += 1;
                    if new["updated"].as_u64() == Some(stamp) {
                        changed += 1;
                        assert_ne!(old["position"], new["position"], "{id} moved nowhere");
                    } else {
                        assert_eq!(old, new, "{id} changed without moving");
                    }
                }
                before = now;
            }
            let share = changed as f64 / kept as f64;
            assert!(
                (share - move_fraction).abs() < 0.02,
                "move_fraction {move_fraction}: {share} of vehicles changed"
            );
        }
    }

    #[test]
    fn vehicles_run_their_routes_end_to_end() {
        let mut s = settings(9, 50);
        s.move_fraction = 1.0;
        s.churn = 0.0;
        let mut fleet = Fleet::new(&s);
        let first_trips: BTreeMap<String, Value> = by_id(&parse(&fleet));
        let mut statuses = HashSet::new();
        for _ in 0..200 {
            fleet.step();
            for v in vehicles(&parse(&fleet)) {
                statuses.insert(v["status"].as_str().unwrap_or_default().to_owned());
            }
        }
        let last = by_id(&parse(&fleet));
        assert_eq!(
            first_trips.keys().collect::<Vec<_>>(),
            last.keys().collect::<Vec<_>>()
        );
        // 200 ticks of 15-45% of a leg is about 60 legs: every vehicle has turned round.
        for (id, v) in &last {
            assert_ne!(
                v["trip"], first_trips[id]["trip"],
                "{id} never finished a trip"
            );
        }
        assert_eq!(statuses.len(), 3, "{statuses:?}");
    }

    #[test]
    fn decimals_are_written_like_floats() {
        let cases: [(i64, u32, &str); 7] = [
            (-71_058_900, 6, "-71.0589"),
            (42_360_123, 6, "42.360123"),
            (42_000_000, 6, "42.0"),
            (-5, 6, "-0.000005"),
            (0, 1, "0.0"),
            (83, 1, "8.3"),
            (150, 1, "15.0"),
        ];
        for (scaled, decimals, want) in cases {
            let mut out = Vec::new();
            push_decimal(&mut out, scaled, decimals);
            assert_eq!(String::from_utf8_lossy(&out), want);
        }
        let mut out = Vec::new();
        push_padded(&mut out, 17, 8);
        push_padded(&mut out, 123_456_789, 8);
        push_u64(&mut out, u64::MAX);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "0000001712345678918446744073709551615"
        );
    }

    #[test]
    fn odd_names_are_escaped() {
        let mut s = settings(1, 3);
        s.name = "a\"b\\c\nd".into();
        let fleet = Fleet::new(&s);
        assert_eq!(parse(&fleet), fleet.document());
        assert_eq!(parse(&fleet)["header"]["feed"], "a\"b\\c\nd");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_settings_step_safely_within_bounds(
            seed: u64,
            vehicles in 0usize..200,
            routes in 0usize..20,
            move_fraction in prop_oneof![0.0..=1.0f64, Just(f64::NAN), -1.0..2.0f64],
            churn in prop_oneof![0.0..=1.0f64, Just(f64::NAN), -1.0..2.0f64],
            ticks in 0u64..40,
        ) {
            let s = FeedSettings {
                name: "p".into(),
                seed,
                vehicles,
                routes,
                tick: Duration::from_millis(100),
                move_fraction,
                churn,
                epoch_seconds: Some(0),
            };
            let mut fleet = Fleet::new(&s);
            let band = fleet.max_count_deviation();
            prop_assert!(band <= vehicles / 4);
            let mut last_max_id = 0u64;
            for _ in 0..ticks {
                fleet.step();
                prop_assert!(fleet.len().abs_diff(vehicles) <= band);
                let ids: Vec<u64> = fleet.vehicles.iter().map(|v| v.id).collect();
                prop_assert!(ids.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(ids.iter().all(|&id| id < fleet.next_id));
                prop_assert!(fleet.next_id >= last_max_id);
                last_max_id = fleet.next_id;
            }
            let doc: Value = serde_json::from_slice(&fleet.to_json())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(doc, fleet.document());
        }
    }
}

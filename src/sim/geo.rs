//! Route geometry in integer micro-degrees, computed with arithmetic that is identical on every
//! platform.
//!
//! `f64::sin`/`cos` call the platform's libm, whose last bit may differ between systems and
//! releases; one differing bit can flip a rounded coordinate and make "the same seed" produce a
//! different document. So the few trigonometric values the routes need come from a Taylor
//! series over plain `+ - * /`, which IEEE 754 rounds identically everywhere (Rust never fuses
//! or reorders float operations on its own), and every coordinate is then rounded to an integer.

use std::f64::consts::PI;

use super::rng::SplitMix64;

/// A point in micro-degrees (1e-6 degree, about 11 cm of latitude).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Point {
    /// Latitude in micro-degrees, north positive.
    pub(crate) lat: i64,
    /// Longitude in micro-degrees, east positive.
    pub(crate) lon: i64,
}

/// Where the routes are laid out: downtown Boston, whose transit agency publishes the
/// GTFS-realtime feeds this document imitates.
pub(crate) const CENTER: Point = Point {
    lat: 42_360_100,
    lon: -71_058_900,
};

/// One route: its stops in order and the bearing of each leg.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The stops, at least two.
    pub(crate) stops: Vec<Point>,
    /// `legs[i]` is the bearing in whole degrees (0 = north, 90 = east) from stop `i` to
    /// stop `i + 1`.
    pub(crate) legs: Vec<u16>,
}

/// Sine of `x` radians by its Taylor series after reducing `x` to `[-PI, PI]`; accurate to a
/// few ulps, which is far below the micro-degree rounding applied to every result.
pub(crate) fn sin(x: f64) -> f64 {
    if !x.is_finite() {
        return 0.0;
    }
    let mut x = x % (2.0 * PI);
    if x > PI {
        x -= 2.0 * PI;
    } else if x < -PI {
        x += 2.0 * PI;
    }
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    for k in 1..=14u32 {
        let k = f64::from(k);
        term *= -x2 / ((2.0 * k) * (2.0 * k + 1.0));
        sum += term;
    }
    sum
}

/// Cosine of `x` radians (see [`sin`]).
pub(crate) fn cos(x: f64) -> f64 {
    sin(x + PI / 2.0)
}

/// The point `distance` micro-degrees (of latitude) away from `from` in direction `bearing`
/// (whole degrees); longitude steps are widened by 1/cos(latitude) so legs look straight on
/// a map.
pub(crate) fn offset(from: Point, bearing: u16, distance: i64) -> Point {
    let radians = f64::from(bearing) * PI / 180.0;
    let lat_radians = (from.lat as f64 / 1e6) * PI / 180.0;
    let squash = cos(lat_radians).max(0.01);
    let dlat = cos(radians) * distance as f64;
    let dlon = sin(radians) * distance as f64 / squash;
    Point {
        lat: (from.lat + dlat.round() as i64).clamp(-90_000_000, 90_000_000),
        lon: from.lon + dlon.round() as i64,
    }
}

/// The point `per_mille`/1000 of the way from `a` to `b`, in integer arithmetic.
pub(crate) fn interpolate(a: Point, b: Point, per_mille: u16) -> Point {
    let f = i64::from(per_mille.min(1000));
    Point {
        lat: a.lat + (b.lat - a.lat) * f / 1000,
        lon: a.lon + (b.lon - a.lon) * f / 1000,
    }
}

/// Route `index` of the fleet seeded with `seed`: 8 to 24 stops, 250 to 900 m apart, winding
/// from a start 0.5 to 7 km from the center. Each route has its own generator so the layout of
/// one route does not depend on how many there are.
pub(crate) fn route(seed: u64, index: u64) -> Route {
    let mut rng = SplitMix64::new(super::rng::derive(seed, &[ROUTE_DOMAIN, index]));
    let stop_count = rng.between(8, 24) as usize;
    let start = offset(
        CENTER,
        rng.between(0, 359) as u16,
        rng.between(5_000, 60_000),
    );
    let mut heading = rng.between(0, 359);
    let mut stops = Vec::with_capacity(stop_count);
    let mut legs = Vec::with_capacity(stop_count - 1);
    stops.push(start);
    let mut at = start;
    for _ in 1..stop_count {
        heading = (heading + rng.between(-35, 35)).rem_euclid(360);
        let bearing = heading as u16;
        at = offset(at, bearing, rng.between(2_500, 8_000));
        stops.push(at);
        legs.push(bearing);
    }
    Route { stops, legs }
}

/// Keeps route generators apart from the per-tick generators.
const ROUTE_DOMAIN: u64 = 0x726f_7574_6573; // "routes"

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn series_agrees_with_libm() {
        for i in -720..=720 {
            let x = f64::from(i) * PI / 180.0;
            assert!((sin(x) - x.sin()).abs() < 1e-12, "sin({i} deg)");
            assert!((cos(x) - x.cos()).abs() < 1e-12, "cos({i} deg)");
        }
    }

    #[test]
    fn offset_goes_the_right_way() {
        let north = offset(CENTER, 0, 1_000);
        assert_eq!((north.lat - CENTER.lat, north.lon - CENTER.lon), (1_000, 0));
        let east = offset(CENTER, 90, 1_000);
        assert_eq!(east.lat, CENTER.lat);
        // At 42.36 degrees north a degree of longitude is cos(42.36) = 0.739 of a degree of latitude.
        assert_eq!(east.lon - CENTER.lon, 1_353);
        let south_west = offset(CENTER, 225, 1_000);
        assert!(south_west.lat < CENTER.lat && south_west.lon < CENTER.lon);
    }

    #[test]
    fn interpolate_hits_the_ends() {
        let a = Point { lat: 10, lon: -10 };
        let b = Point {
            lat: 1_010,
            lon: -2_010,
        };
        assert_eq!(interpolate(a, b, 0), a);
        assert_eq!(interpolate(a, b, 1000), b);
        assert_eq!(
            interpolate(a, b, 500),
            Point {
                lat: 510,
                lon: -1_010
            }
        );
    }

    proptest! {
        #[test]
        fn routes_are_well_formed(seed: u64, index in 0u64..100_000) {
            let r = route(seed, index);
            prop_assert!((8..=24).contains(&r.stops.len()));
            prop_assert_eq!(r.legs.len(), r.stops.len() - 1);
            for (i, leg) in r.legs.iter().enumerate() {
                prop_assert!(*leg < 360);
                prop_assert_ne!(r.stops[i], r.stops[i + 1]);
            }
            for stop in &r.stops {
                // Within about 30 km of the center.
                prop_assert!((stop.lat - CENTER.lat).abs() < 300_000);
                prop_assert!((stop.lon - CENTER.lon).abs() < 420_000);
            }
        }
    }
}

//! The retry schedule after failed polls: exponential backoff with jitter, and `Retry-After`.
//!
//! Pure functions over plain data so the schedule is tested without clocks or sockets.

use std::time::{Duration, SystemTime};

use http::HeaderValue;
use rand::Rng;

use super::config::BackoffSettings;

/// The delay before the next attempt after `consecutive_failures` failures in a row.
///
/// The base delay is `initial * multiplier^(n-1)` (saturating), capped at `max`; a count of 0
/// is treated as 1. The `jitter` fraction of the base is randomized downwards, so the result
/// lies in `[(1 - jitter) * base, base]` and proxies restarting together spread their retries.
/// An upstream's `Retry-After`, capped at `max_retry_after`, is a lower bound on the result.
pub fn delay(
    settings: &BackoffSettings,
    consecutive_failures: u32,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    let base = base_delay(settings, consecutive_failures);
    let jitter = clamp_fraction(settings.jitter);
    let jittered = if jitter > 0.0 {
        // random::<f64>() is in [0, 1): the subtracted part never exceeds jitter * base.
        let cut = jitter * rng.random::<f64>();
        mul_duration(base, 1.0 - cut).clamp(Duration::ZERO, base)
    } else {
        base
    };
    match retry_after {
        Some(retry_after) => jittered.max(retry_after.min(settings.max_retry_after)),
        None => jittered,
    }
}

/// The delay before jitter: `initial * multiplier^(n-1)`, capped at `max`, never panicking.
pub fn base_delay(settings: &BackoffSettings, consecutive_failures: u32) -> Duration {
    let exponent = consecutive_failures.saturating_sub(1);
    let multiplier = if settings.multiplier.is_finite() && settings.multiplier >= 1.0 {
        settings.multiplier
    } else {
        1.0
    };
    // powi takes an i32; anything beyond saturates to +inf for multipliers > 1, which the
    // cap below handles.
    let factor = multiplier.powi(i32::try_from(exponent).unwrap_or(i32::MAX));
    mul_duration(settings.initial, factor).min(settings.max)
}

/// Parses a `Retry-After` header: delta-seconds (`120`) or an HTTP-date, relative to `now`.
///
/// A date in the past means "retry now" (zero); anything unparseable is `None`.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if text.is_empty() {
        return None;
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for u64 is still "a very long time"; the caller caps it.
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `duration * factor`, saturating at `Duration::MAX` and at zero for non-positive factors.
fn mul_duration(duration: Duration, factor: f64) -> Duration {
    if factor.is_nan() || factor <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(duration.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

fn clamp_fraction(value: f64) -> f64 {
    if value.is_nan() {
        0.0
    } else {
        value.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn settings(jitter: f64) -> BackoffSettings {
        BackoffSettings {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter,
            max_retry_after: Duration::from_secs(300),
        }
    }

    #[test]
    fn grows_exponentially_then_caps() {
        let s = settings(0.0);
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<_> = (1..=9).map(|n| delay(&s, n, None, &mut rng)).collect();
        let expected: Vec<_> = [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
            .into_iter()
            .map(Duration::from_millis)
            .collect();
        assert_eq!(delays, expected);
    }

    #[test]
    fn zero_failures_is_treated_as_one() {
        let s = settings(0.0);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(delay(&s, 0, None, &mut rng), s.initial);
    }

    #[test]
    fn jitter_spreads_delays_below_the_base() {
        let s = settings(0.5);
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<_> = (0..100).map(|_| delay(&s, 3, None, &mut rng)).collect();
        let base = Duration::from_secs(2);
        assert!(delays.iter().all(|d| *d <= base && *d >= base / 2));
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 50, "jitter must randomize: {distinct:?}");
    }

    #[test]
    fn retry_after_is_a_lower_bound_capped_at_max_retry_after() {
        let s = settings(0.0);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            delay(&s, 1, Some(Duration::from_secs(30)), &mut rng),
            Duration::from_secs(30)
        );
        // Shorter than the backoff: the backoff wins.
        assert_eq!(
            delay(&s, 4, Some(Duration::from_secs(1)), &mut rng),
            Duration::from_secs(4)
        );
        // Longer than max_retry_after: capped.
        assert_eq!(
            delay(&s, 1, Some(Duration::from_secs(100_000)), &mut rng),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn parses_delta_seconds() {
        let now = SystemTime::UNIX_EPOCH;
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            parse_retry_after(&v("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(&v(" 0 "), now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(&v("99999999999999999999999"), now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_retry_after(&v("-5"), now), None);
        assert_eq!(parse_retry_after(&v("1.5"), now), None);
        assert_eq!(parse_retry_after(&v(""), now), None);
        assert_eq!(parse_retry_after(&v("soon"), now), None);
    }

    #[test]
    fn parses_http_dates_relative_to_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let in_a_minute = httpdate::fmt_http_date(now + Duration::from_secs(60));
        let value = HeaderValue::from_str(&in_a_minute).expect("formatted date is ASCII");
        assert_eq!(
            parse_retry_after(&value, now),
            Some(Duration::from_secs(60))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(60));
        let value = HeaderValue::from_str(&past).expect("formatted date is ASCII");
        assert_eq!(parse_retry_after(&value, now), Some(Duration::ZERO));
        // Non-UTF-8 bytes are not a date.
        let value = HeaderValue::from_bytes(b"\xff\xfe").expect("opaque bytes are allowed");
        assert_eq!(parse_retry_after(&value, now), None);
    }

    fn arb_settings() -> impl Strategy<Value = BackoffSettings> {
        (
            0u64..=u64::MAX / 2,
            0u64..=u64::MAX / 2,
            prop_oneof![1.0f64..10.0, Just(f64::MAX), Just(1e300)],
            0.0f64..=1.0,
            0u64..=1_000_000,
        )
            .prop_map(|(initial, max, multiplier, jitter, max_retry_after)| {
                BackoffSettings {
                    initial: Duration::from_millis(initial),
                    max: Duration::from_millis(max),
                    multiplier,
                    jitter,
                    max_retry_after: Duration::from_secs(max_retry_after),
                }
            })
    }

    proptest! {
        #[test]
        fn delay_stays_within_bounds(
            s in arb_settings(),
            failures in any::<u32>(),
            retry_after in proptest::option::of(0u64..=u64::MAX),
            seed in any::<u64>(),
        ) {
            let retry_after = retry_after.map(Duration::from_secs);
            let mut rng = StdRng::seed_from_u64(seed);
            let d = delay(&s, failures, retry_after, &mut rng);
            let base = base_delay(&s, failures);
            prop_assert!(base <= s.max);
            let ceiling = s.max.max(retry_after.unwrap_or(Duration::ZERO));
            prop_assert!(d <= ceiling, "{d:?} above {ceiling:?}");
            // Allow a nanosecond of floating-point rounding.
            let floor = mul_duration(base, 1.0 - s.jitter).saturating_sub(Duration::from_nanos(1));
            prop_assert!(d >= floor, "{d:?} below {floor:?}");
            if let Some(ra) = retry_after {
                prop_assert!(d >= ra.min(s.max_retry_after));
            }
        }

        #[test]
        fn base_delay_never_shrinks(s in arb_settings(), failures in 1u32..u32::MAX) {
            prop_assert!(base_delay(&s, failures + 1) >= base_delay(&s, failures));
        }

        #[test]
        fn parse_retry_after_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let _ = parse_retry_after(&value, SystemTime::now());
            }
        }
    }
}

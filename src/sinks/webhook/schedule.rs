//! When a failed delivery is tried again: the retry schedule, with jitter and the receiver's
//! `Retry-After`. A pure function over plain data.

use std::time::Duration;

use rand::Rng;

/// The default delays between attempts, in the spirit of Svix: immediately, 5 s, 5 min, 30 min,
/// 2 h, 5 h, 10 h, 10 h (eight attempts over about a day and a quarter).
pub const DEFAULT_SCHEDULE: [Duration; 8] = [
    Duration::ZERO,
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// The retry schedule of a delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySchedule {
    /// `delays[i]` is the wait before attempt `i` (the first entry is the wait before the
    /// first attempt, normally zero). Never empty.
    pub delays: Vec<Duration>,
    /// Fraction of each delay that is randomized downwards, 0..=1.
    pub jitter: f64,
    /// Longest `Retry-After` honoured; a longer one is shortened to this.
    pub max_retry_after: Duration,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule {
            delays: DEFAULT_SCHEDULE.to_vec(),
            jitter: 0.1,
            max_retry_after: Duration::from_secs(10 * 3600),
        }
    }
}

impl RetrySchedule {
    /// How many attempts a delivery gets before it is dead-lettered.
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.delays.len()).unwrap_or(u32::MAX)
    }

    /// The wait before the next attempt after `attempts_made` failed attempts, or `None` when the
    /// schedule is exhausted (the delivery is dead). A receiver's `Retry-After` is a lower bound,
    /// capped at `max_retry_after`; jitter only ever shortens a delay, by at most `jitter` of it.
    pub fn next_delay(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        let index = usize::try_from(attempts_made).ok()?;
        let base = *self.delays.get(index)?;
        let jitter = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        };
        let delay = if jitter > 0.0 && !base.is_zero() {
            let cut = jitter * rng.random::<f64>();
            Duration::try_from_secs_f64(base.as_secs_f64() * (1.0 - cut))
                .unwrap_or(base)
                .min(base)
        } else {
            base
        };
        Some(match retry_after {
            Some(after) => delay.max(after.min(self.max_retry_after)),
            None => delay,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn default_schedule_is_eight_attempts_then_dead() {
        let s = RetrySchedule {
            jitter: 0.0,
            ..RetrySchedule::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<_> = (0..10).map(|n| s.next_delay(n, None, &mut rng)).collect();
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(
            delays,
            vec![
                secs(0),
                secs(5),
                secs(300),
                secs(1800),
                secs(7200),
                secs(18000),
                secs(36000),
                secs(36000),
                None,
                None
            ]
        );
        assert_eq!(s.attempts(), 8);
    }

    #[test]
    fn retry_after_is_a_capped_lower_bound() {
        let s = RetrySchedule {
            delays: vec![Duration::ZERO, Duration::from_secs(5)],
            jitter: 0.0,
            max_retry_after: Duration::from_secs(60),
        };
        let mut rng = StdRng::seed_from_u64(1);
        let d = |after| {
            s.next_delay(
                1,
                Some(Duration::from_secs(after)),
                &mut StdRng::seed_from_u64(1),
            )
        };
        assert_eq!(d(1), Some(Duration::from_secs(5)));
        assert_eq!(d(30), Some(Duration::from_secs(30)));
        assert_eq!(d(3600), Some(Duration::from_secs(60)));
        // An exhausted schedule stays exhausted whatever the receiver says.
        assert_eq!(
            s.next_delay(2, Some(Duration::from_secs(1)), &mut rng),
            None
        );
    }

    proptest! {
        /// A delay lies within [(1 - jitter) * base, base], raised to a capped Retry-After.
        #[test]
        fn delays_stay_within_bounds(
            delays in proptest::collection::vec(0u64..100_000_000, 1..12),
            jitter in 0.0f64..=1.0,
            attempts in 0u32..16,
            retry_after in proptest::option::of(0u64..1_000_000),
            max_retry_after in 0u64..1_000_000,
            seed in any::<u64>(),
        ) {
            let s = RetrySchedule {
                delays: delays.iter().copied().map(Duration::from_millis).collect(),
                jitter,
                max_retry_after: Duration::from_secs(max_retry_after),
            };
            let retry_after = retry_after.map(Duration::from_secs);
            let got = s.next_delay(attempts, retry_after, &mut StdRng::seed_from_u64(seed));
            match delays.get(attempts as usize) {
                None => prop_assert_eq!(got, None),
                Some(&base) => {
                    let base = Duration::from_millis(base);
                    let d = got.unwrap();
                    let floor = base.mul_f64(1.0 - jitter).saturating_sub(Duration::from_nanos(1));
                    let lower = retry_after.map_or(Duration::ZERO, |r| r.min(s.max_retry_after));
                    prop_assert!(d >= floor.max(lower), "{d:?}");
                    prop_assert!(d <= base.max(lower), "{d:?}");
                }
            }
        }
    }
}

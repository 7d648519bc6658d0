//! SplitMix64, the pseudo-random generator behind the simulated fleet.
//!
//! Written here rather than taken from `rand` because the simulated documents must stay
//! byte-for-byte the same for a given seed across dependency upgrades: tests, recorded
//! benchmarks and anyone comparing two runs rely on that, and `rand` documents that the
//! algorithm behind its `StdRng`/`SmallRng` may change between versions. SplitMix64
//! (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014; the
//! seeding generator of xoshiro) is ten lines, passes BigCrush, and is good enough for
//! picking which vehicle moves.

/// The SplitMix64 generator: a 64-bit counter passed through a strong mixing function.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The SplitMix64 output function: a bijective, well-avalanching mix of 64 bits.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Derives an independent seed from a seed and a sequence of values (domain, index, ...).
pub(crate) fn derive(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix64(seed), |acc, &part| {
        mix64(acc ^ mix64(part.wrapping_add(GOLDEN_GAMMA)))
    })
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// A uniform number in `[0, 1)` with 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p` (never for `p <= 0` or NaN, always for `p >= 1`).
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// A uniform number in `0..n`; 0 when `n` is 0. Uses Lemire's multiply-shift, whose bias
    /// (below 2^-32 for the ranges used here) does not matter for a simulation.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A uniform number in `lo..=hi` (`lo` when `hi < lo`).
    pub(crate) fn between(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        let span = hi.abs_diff(lo).saturating_add(1);
        lo.wrapping_add(self.below(span) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_the_reference_sequence() {
        // First outputs of the reference C implementation (Vigna, splitmix64.c) for seed 1234567.
        let mut rng = SplitMix64::new(1_234_567);
        let expected = [
            6_457_827_717_110_365_317,
            3_203_168_211_198_807_973,
            9_817_491_932_198_370_423,
            4_593_380_528_125_082_431,
            16_408_922_859_458_223_821,
        ];
        for want in expected {
            assert_eq!(rng.next_u64(), want);
        }
    }

    #[test]
    fn chance_honours_the_extremes() {
        let mut rng = SplitMix64::new(9);
        for _ in 0..10_000 {
            assert!(!rng.chance(0.0));
            assert!(rng.chance(1.0));
            assert!(!rng.chance(f64::NAN));
        }
    }

    #[test]
    fn different_derivations_differ() {
        assert_ne!(derive(1, &[0, 1]), derive(1, &[1, 0]));
        assert_ne!(derive(1, &[0]), derive(2, &[0]));
        assert_eq!(derive(7, &[3, 4]), derive(7, &[3, 4]));
    }

    proptest! {
        #[test]
        fn between_stays_in_range(seed: u64, lo in -1000i64..1000, width in 0i64..1000) {
            let mut rng = SplitMix64::new(seed);
            for _ in 0..100 {
                let x = rng.between(lo, lo + width);
                prop_assert!((lo..=lo + width).contains(&x));
            }
        }

        #[test]
        fn next_f64_is_in_unit_interval(seed: u64) {
            let mut rng = SplitMix64::new(seed);
            for _ in 0..100 {
                let x = rng.next_f64();
                prop_assert!((0.0..1.0).contains(&x));
            }
        }
    }
}

//! Percentiles and summaries of measured values.

use serde::Serialize;

/// The nearest-rank percentile `q` (0 < q ≤ 1) of ascending `sorted` values: the smallest
/// value with at least `q` of all values at or below it. `None` when there are no values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50/p90/p99/max/mean of a set of values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// How many values.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// Summarizes `values` (sorted in place); `None` when empty.
    pub fn of(values: &mut [f64]) -> Option<Summary> {
        values.sort_unstable_by(f64::total_cmp);
        let count = values.len();
        Some(Summary {
            count,
            p50: percentile(values, 0.50)?,
            p90: percentile(values, 0.90)?,
            p99: percentile(values, 0.99)?,
            max: *values.last()?,
            mean: values.iter().sum::<f64>() / count as f64,
        })
    }

    /// Every value multiplied by `factor` (a unit change).
    pub fn scaled(self, factor: f64) -> Summary {
        Summary {
            count: self.count,
            p50: self.p50 * factor,
            p90: self.p90 * factor,
            p99: self.p99 * factor,
            max: self.max * factor,
            mean: self.mean * factor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), Some(50.0));
        assert_eq!(percentile(&v, 0.90), Some(90.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&v, 0.001), Some(1.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.51), Some(3.0));
    }

    #[test]
    fn summaries_sort_first() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        let s = Summary::of(&mut v).unwrap();
        assert_eq!(
            (s.count, s.p50, s.p90, s.max, s.mean),
            (5, 3.0, 5.0, 5.0, 3.0)
        );
        assert_eq!(Summary::of(&mut []), None);
    }
}

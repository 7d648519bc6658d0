//! Judging what the readers received: delivery, order, latency and time to reach everyone.
//! Pure: receipts in, numbers out.

use std::collections::HashMap;

use super::part::Receipts;

/// The changes a run judges.
#[derive(Debug, Clone)]
pub enum Judged {
    /// Marks `1..=K` published at these monotonic µs (`publish_us[k - 1]`).
    Published {
        /// When each change was published.
        publish_us: Vec<u64>,
    },
    /// These marks (ascending), observed without knowing when they were published.
    Observed {
        /// The marks.
        marks: Vec<u64>,
    },
}

impl Judged {
    fn marks(&self) -> Vec<u64> {
        match self {
            Judged::Published { publish_us } => (1..=publish_us.len() as u64).collect(),
            Judged::Observed { marks } => marks.clone(),
        }
    }
}

/// What the readers got, judged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delivery {
    /// Judged changes.
    pub changes: usize,
    /// Readers judged.
    pub readers: usize,
    /// First receipts of judged changes.
    pub delivered: u64,
    /// Judged (reader, change) pairs never received.
    pub missing: u64,
    /// Readers that missed at least one change.
    pub readers_missing: usize,
    /// Marks received after a higher mark.
    pub out_of_order: u64,
    /// Marks received again right after themselves or later.
    pub duplicates: u64,
    /// Marks that are not judged changes (publishing runs only: leftovers, garbage).
    pub foreign: u64,
    /// Publish-to-receive latency of every delivered (reader, change) pair, µs
    /// (publishing runs only).
    pub latencies_us: Vec<f64>,
    /// Per change: publish (or first receipt, when watching) to the last reader's receipt, µs.
    pub reach_all_us: Vec<f64>,
    /// Changes that did not reach every reader.
    pub incomplete_changes: usize,
}

/// Judges `readers` against `judged`.
pub fn check(readers: &[Receipts], judged: &Judged) -> Delivery {
    let marks = judged.marks();
    let index: HashMap<u64, usize> = marks.iter().enumerate().map(|(i, &m)| (m, i)).collect();
    let publish_us = match judged {
        Judged::Published { publish_us } => Some(publish_us),
        Judged::Observed { .. } => None,
    };
    let mut first = vec![u64::MAX; marks.len()];
    let mut last = vec![0u64; marks.len()];
    let mut reached = vec![0usize; marks.len()];
    let mut d = Delivery {
        changes: marks.len(),
        readers: readers.len(),
        ..Delivery::default()
    };
    let mut seen = vec![false; marks.len()];
    for reader in readers {
        seen.iter_mut().for_each(|s| *s = false);
        let mut highest: Option<u64> = None;
        for &(mark, at) in &reader.marks {
            match highest {
                Some(h) if mark == h => d.duplicates += 1,
                Some(h) if mark < h => d.out_of_order += 1,
                _ => {}
            }
            highest = highest.max(Some(mark));
            let Some(&i) = index.get(&mark) else {
                if publish_us.is_some() {
                    d.foreign += 1;
                }
                continue;
            };
            if seen[i] {
                if highest != Some(mark) {
                    d.duplicates += 1;
                }
                continue;
            }
            seen[i] = true;
            d.delivered += 1;
            reached[i] += 1;
            first[i] = first[i].min(at);
            last[i] = last[i].max(at);
            if let Some(publish_us) = publish_us {
                d.latencies_us.push(at.saturating_sub(publish_us[i]) as f64);
            }
        }
        let got = seen.iter().filter(|s| **s).count();
        if got < marks.len() {
            d.missing += (marks.len() - got) as u64;
            d.readers_missing += 1;
        }
    }
    for i in 0..marks.len() {
        if reached[i] < readers.len() {
            d.incomplete_changes += 1;
        }
        if reached[i] == 0 {
            continue;
        }
        let from = publish_us.map_or(first[i], |p| p[i]);
        d.reach_all_us.push(last[i].saturating_sub(from) as f64);
    }
    d
}

/// The marks to judge when watching: those first seen (by anyone) within
/// `[from_us, until_us]`, so that none was in flight at the start or the end.
pub fn observed_marks(readers: &[Receipts], from_us: u64, until_us: u64) -> Vec<u64> {
    let mut earliest: HashMap<u64, u64> = HashMap::new();
    for reader in readers {
        for &(mark, at) in &reader.marks {
            earliest
                .entry(mark)
                .and_modify(|e| *e = (*e).min(at))
                .or_insert(at);
        }
    }
    let mut marks: Vec<u64> = earliest
        .into_iter()
        .filter(|&(_, at)| (from_us..=until_us).contains(&at))
        .map(|(mark, _)| mark)
        .collect();
    marks.sort_unstable();
    marks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(marks: &[(u64, u64)]) -> Receipts {
        Receipts {
            marks: marks.to_vec(),
            ..Receipts::default()
        }
    }

    #[test]
    fn everything_delivered_in_order() {
        let readers = [
            reader(&[(1, 110), (2, 220), (3, 330)]),
            reader(&[(1, 150), (2, 210), (3, 390)]),
        ];
        let judged = Judged::Published {
            publish_us: vec![100, 200, 300],
        };
        let d = check(&readers, &judged);
        assert_eq!((d.delivered, d.missing, d.out_of_order), (6, 0, 0));
        assert_eq!(d.latencies_us, vec![10.0, 20.0, 30.0, 50.0, 10.0, 90.0]);
        assert_eq!(d.reach_all_us, vec![50.0, 20.0, 90.0]);
        assert_eq!(d.incomplete_changes, 0);
    }

    #[test]
    fn missing_reordered_duplicated_and_foreign() {
        let readers = [
            reader(&[(1, 110), (3, 330)]),
            reader(&[(2, 210), (1, 250), (3, 390), (3, 391), (9, 400)]),
        ];
        let judged = Judged::Published {
            publish_us: vec![100, 200, 300],
        };
        let d = check(&readers, &judged);
        assert_eq!(d.delivered, 5);
        assert_eq!((d.missing, d.readers_missing), (1, 1));
        assert_eq!((d.out_of_order, d.duplicates, d.foreign), (1, 1, 1));
        assert_eq!(d.incomplete_changes, 1);
    }

    #[test]
    fn watching_judges_the_observed_window() {
        let readers = [
            reader(&[(5, 100), (6, 200), (7, 300), (8, 400)]),
            reader(&[(6, 210), (8, 420)]),
        ];
        let marks = observed_marks(&readers, 150, 350);
        assert_eq!(marks, vec![6, 7]);
        let d = check(&readers, &Judged::Observed { marks });
        assert_eq!((d.delivered, d.missing, d.readers_missing), (3, 1, 1));
        assert_eq!(d.foreign, 0);
        assert!(d.latencies_us.is_empty());
        assert_eq!(d.reach_all_us, vec![10.0, 0.0]);
    }
}

//! Myers' O(ND) shortest edit script, with a bound on work.

/// A run of the edit script: `del` elements of the old sequence starting at `old` are replaced
/// by `ins` elements of the new sequence starting at `new`. Runs are in order and never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hunk {
    pub old: usize,
    pub del: usize,
    pub new: usize,
    pub ins: usize,
}

/// The shortest edit script turning `a` into `b`, as hunks; `None` when finding it would take
/// more than `max_work` steps (each step is one comparison or one cell of the search frontier,
/// so memory is also bounded by about `4 * max_work` bytes).
pub(crate) fn hunks<T: PartialEq>(a: &[T], b: &[T], max_work: usize) -> Option<Vec<Hunk>> {
    let n = a.len();
    let m = b.len();
    let (Ok(ni), Ok(mi)) = (i32::try_from(n), i32::try_from(m)) else {
        return None;
    };
    let max = ni + mi;
    // v[k + offset] is the furthest x reached on diagonal k; the extra slot covers k = d + 1.
    let offset = max + 1;
    let mut v = vec![0i32; 2 * (max as usize) + 3];
    // trace[d] holds v[-d-1 ..= d+1] as it was before step d.
    let mut trace: Vec<Vec<i32>> = Vec::new();
    let mut work = 0usize;
    for d in 0..=max {
        let lo = (offset - d - 1) as usize;
        let hi = (offset + d + 1) as usize;
        trace.push(v[lo..=hi].to_vec());
        work += (2 * d + 3) as usize;
        let mut k = -d;
        while k <= d {
            let ki = (offset + k) as usize;
            let mut x = if k == -d || (k != d && v[ki - 1] < v[ki + 1]) {
                v[ki + 1]
            } else {
                v[ki - 1] + 1
            };
            let mut y = x - k;
            while x < ni && y < mi && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
                work += 1;
            }
            v[ki] = x;
            if x >= ni && y >= mi {
                return Some(backtrack(&trace, ni, mi, d));
            }
            k += 2;
        }
        if work > max_work {
            return None;
        }
    }
    None
}

/// Walks the trace back from (n, m) and groups the edits into hunks.
fn backtrack(trace: &[Vec<i32>], n: i32, m: i32, depth: i32) -> Vec<Hunk> {
    // Edits from the end backwards: (x, y, is_insert) of each non-diagonal step's origin.
    let mut edits: Vec<(i32, i32, bool)> = Vec::with_capacity(depth as usize);
    let (mut x, mut y) = (n, m);
    for d in (1..=depth).rev() {
        let window = &trace[d as usize];
        // window[0] is diagonal -d-1.
        let at = |k: i32| window[(k + d + 1) as usize];
        let k = x - y;
        let prev_k = if k == -d || (k != d && at(k - 1) < at(k + 1)) {
            k + 1
        } else {
            k - 1
        };
        let prev_x = at(prev_k);
        let prev_y = prev_x - prev_k;
        // Diagonal moves back to the end of the previous step's edit.
        let shift = (x - prev_x).min(y - prev_y);
        let (ex, ey) = (x - shift, y - shift);
        edits.push((prev_x, prev_y, ex == prev_x));
        x = prev_x;
        y = prev_y;
        debug_assert!(ex == prev_x || ey == prev_y);
    }
    edits.reverse();
    let mut out: Vec<Hunk> = Vec::new();
    for (x, y, insert) in edits {
        let (x, y) = (x as usize, y as usize);
        if let Some(last) = out.last_mut()
            && last.old + last.del == x
            && last.new + last.ins == y
        {
            if insert {
                last.ins += 1;
            } else {
                last.del += 1;
            }
            continue;
        }
        out.push(Hunk {
            old: x,
            del: usize::from(!insert),
            new: y,
            ins: usize::from(insert),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn apply(a: &[u8], b: &[u8], hunks: &[Hunk]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        for h in hunks {
            out.extend_from_slice(&a[i..h.old]);
            out.extend_from_slice(&b[h.new..h.new + h.ins]);
            i = h.old + h.del;
        }
        out.extend_from_slice(&a[i..]);
        out
    }

    fn cost(hunks: &[Hunk]) -> usize {
        hunks.iter().map(|h| h.del + h.ins).sum()
    }

    /// Length of the longest common subsequence, by dynamic programming.
    fn lcs(a: &[u8], b: &[u8]) -> usize {
        let mut row = vec![0usize; b.len() + 1];
        for x in a {
            let mut diag = 0;
            for (j, y) in b.iter().enumerate() {
                let up = row[j + 1];
                row[j + 1] = if x == y {
                    diag + 1
                } else {
                    row[j + 1].max(row[j])
                };
                diag = up;
            }
        }
        row[b.len()]
    }

    #[test]
    fn known_scripts() {
        let a = b"abcabba";
        let b = b"cbabac";
        let h = hunks(a, b, usize::MAX).unwrap();
        assert_eq!(apply(a, b, &h), b);
        assert_eq!(cost(&h), 5);
        assert_eq!(hunks(b"", b"", 10).unwrap(), vec![]);
        assert_eq!(
            hunks(b"", b"xy", 10).unwrap(),
            vec![Hunk {
                old: 0,
                del: 0,
                new: 0,
                ins: 2
            }]
        );
    }

    #[test]
    fn gives_up_past_the_bound() {
        let a: Vec<u32> = (0..1000).collect();
        let b: Vec<u32> = (1000..2000).collect();
        assert!(hunks(&a, &b, 10_000).is_none());
        assert!(hunks(&a, &b, 10_000_000).is_some());
    }

    proptest! {
        #[test]
        fn script_is_correct_and_minimal(
            a in proptest::collection::vec(0u8..4, 0..40),
            b in proptest::collection::vec(0u8..4, 0..40),
        ) {
            let h = hunks(&a, &b, usize::MAX).unwrap();
            prop_assert_eq!(apply(&a, &b, &h), b.clone());
            prop_assert_eq!(cost(&h), a.len() + b.len() - 2 * lcs(&a, &b));
        }
    }
}

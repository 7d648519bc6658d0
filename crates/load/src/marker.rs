//! Finding sequence markers in a byte stream without parsing it: `MARK<k>;` in published
//! bodies (as ssebench does), or an SSE `id:` whose last `:`-separated field is a number.
//!
//! A marker is the prefix, then a run of `[A-Za-z0-9:._-]`, ended by any other byte. Its
//! number is the run's part after its last `:` (the whole run when it has none), which must be
//! all decimal digits: `MARK12;` is 12, `id: fleet:1763:42\n` (prefix `id: `) is 42, and
//! `MARKET;` is no marker. Scanning is incremental, so a marker split across reads is found
//! once, and costs one `memchr` per byte run outside markers.

/// The longest run after a prefix that is still considered a marker.
const MAX_RUN: usize = 64;

#[derive(Debug, Clone, Copy)]
enum State {
    /// This many bytes of the prefix matched.
    Prefix(usize),
    /// Inside the run after the prefix.
    Run {
        value: u64,
        digits: u32,
        valid: bool,
        len: usize,
    },
}

/// An incremental marker scanner for one connection.
#[derive(Debug, Clone)]
pub struct MarkerScanner {
    prefix: Box<[u8]>,
    /// KMP failure function of `prefix`.
    fail: Box<[usize]>,
    state: State,
}

fn in_run(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b':' | b'.' | b'_' | b'-')
}

impl MarkerScanner {
    /// A scanner for markers starting with `prefix` (not empty).
    pub fn new(prefix: &[u8]) -> Self {
        assert!(!prefix.is_empty(), "a marker prefix must not be empty");
        let mut fail = vec![0; prefix.len()];
        let mut k = 0;
        for i in 1..prefix.len() {
            while k > 0 && prefix[i] != prefix[k] {
                k = fail[k - 1];
            }
            if prefix[i] == prefix[k] {
                k += 1;
            }
            fail[i] = k;
        }
        MarkerScanner {
            prefix: prefix.into(),
            fail: fail.into(),
            state: State::Prefix(0),
        }
    }

    /// Scans the next bytes of the stream, calling `found` with each complete marker's number.
    pub fn scan(&mut self, mut input: &[u8], found: &mut impl FnMut(u64)) {
        while !input.is_empty() {
            if let State::Prefix(0) = self.state {
                match memchr::memchr(self.prefix[0], input) {
                    Some(at) => input = &input[at..],
                    None => return,
                }
            }
            let byte = input[0];
            input = &input[1..];
            self.step(byte, found);
        }
    }

    fn step(&mut self, byte: u8, found: &mut impl FnMut(u64)) {
        match self.state {
            State::Prefix(mut matched) => {
                while matched > 0 && self.prefix[matched] != byte {
                    matched = self.fail[matched - 1];
                }
                if self.prefix[matched] == byte {
                    matched += 1;
                }
                self.state = if matched == self.prefix.len() {
                    State::Run {
                        value: 0,
                        digits: 0,
                        valid: true,
                        len: 0,
                    }
                } else {
                    State::Prefix(matched)
                };
            }
            State::Run {
                value,
                digits,
                valid,
                len,
            } => {
                if !in_run(byte) || len == MAX_RUN {
                    if in_run(byte) {
                        // Too long to be a marker: resume looking for the prefix.
                        self.state = State::Prefix(0);
                        return;
                    }
                    if valid && digits > 0 {
                        found(value);
                    }
                    // The terminator may begin the next prefix (e.g. "\nid: ").
                    self.state = State::Prefix(0);
                    self.step(byte, found);
                    return;
                }
                self.state = match byte {
                    b':' => State::Run {
                        value: 0,
                        digits: 0,
                        valid: true,
                        len: len + 1,
                    },
                    b'0'..=b'9' => {
                        let next = value
                            .checked_mul(10)
                            .and_then(|v| v.checked_add(u64::from(byte - b'0')));
                        State::Run {
                            value: next.unwrap_or(0),
                            digits: digits + 1,
                            valid: valid && next.is_some(),
                            len: len + 1,
                        }
                    }
                    _ => State::Run {
                        value,
                        digits,
                        valid: false,
                        len: len + 1,
                    },
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scan_pieces(prefix: &[u8], pieces: &[&[u8]]) -> Vec<u64> {
        let mut scanner = MarkerScanner::new(prefix);
        let mut marks = Vec::new();
        for piece in pieces {
            scanner.scan(piece, &mut |k| marks.push(k));
        }
        marks
    }

    fn split(bytes: &[u8], points: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = points.iter().map(|p| p % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut at = 0;
        for cut in cuts {
            out.push(bytes[at..cut].to_vec());
            at = cut;
        }
        out.push(bytes[at..].to_vec());
        out
    }

    #[test]
    fn markers_in_bodies_and_ids() {
        let body = br#"data: [{"op":"replace","path":"/m","value":"MARK12;"}]"#;
        assert_eq!(scan_pieces(b"MARK", &[body]), vec![12]);
        assert_eq!(
            scan_pieces(b"MARK", &[b"MARKET; MARK; MARK7x; MARK3;"]),
            vec![3]
        );
        assert_eq!(scan_pieces(b"MARK", &[b"MAMARK5;MMARK6;"]), vec![5, 6]);
        let sse = b"id: fleet:1763:41\nevent: patch\ndata: []\n\nid: fleet:1763:42\n";
        assert_eq!(scan_pieces(b"\nid: ", &[b"\n", sse]), vec![41, 42]);
        assert_eq!(scan_pieces(b"id: ", &[b"id: 7\n"]), vec![7]);
        // A number that does not fit is not a marker.
        assert_eq!(
            scan_pieces(b"MARK", &[b"MARK99999999999999999999;"]),
            Vec::<u64>::new()
        );
        // Unterminated at the end of what was read: not yet found.
        assert_eq!(scan_pieces(b"MARK", &[b"MARK12"]), Vec::<u64>::new());
        // A self-overlapping prefix.
        assert_eq!(scan_pieces(b"aab", &[b"aaab1;"]), vec![1]);
    }

    proptest! {
        #[test]
        fn marks_among_filler_are_found_across_any_split(
            items in prop::collection::vec(
                (0u64..1_000_000, "[a-zA-Z0-9 {}\":,\\[\\]/\\n;]{0,40}"),
                0..30,
            ),
            points in prop::collection::vec(any::<usize>(), 0..30),
        ) {
            // Filler never contains 'M', so the only markers are the ones placed.
            let mut bytes = Vec::new();
            for (k, filler) in &items {
                let filler = filler.replace('M', "m");
                bytes.extend_from_slice(filler.as_bytes());
                bytes.extend_from_slice(format!("MARK{k};").as_bytes());
            }
            let pieces = split(&bytes, &points);
            let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let expected: Vec<u64> = items.iter().map(|(k, _)| *k).collect();
            prop_assert_eq!(scan_pieces(b"MARK", &refs), expected);
        }

        #[test]
        fn adversarial_streams_scan_the_same_whole_or_split(
            bytes in prop::collection::vec(
                prop::sample::select(b"MARK0129;:x\n".to_vec()), 0..400),
            points in prop::collection::vec(any::<usize>(), 0..30),
        ) {
            let whole = scan_pieces(b"MARK", &[&bytes]);
            let pieces = split(&bytes, &points);
            let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(scan_pieces(b"MARK", &refs), whole);
        }
    }
}

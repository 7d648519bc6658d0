//! The shared gzip encoding of SSE events, and of whole responses ([`member`]) (pure).
//!
//! For clients that accept gzip, each event is deflated once, independently of the others, as
//! a run of non-final deflate blocks ending on a byte boundary (a sync flush). Such runs
//! concatenate into one valid deflate stream, so a subscriber's gzip body is: a fixed header,
//! then the shared deflated events, then (when the stream ends) an empty final block and the
//! trailer. Only the trailer's CRC-32 and length are per subscriber, and they are combined from
//! per-event values.

use std::cell::RefCell;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress};

/// A deflate compression level, 1 (fastest) to 9 (smallest): `server.gzip_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level(u32);

impl Level {
    /// The fastest level.
    pub const FAST: Level = Level(1);
    /// The smallest output.
    pub const BEST: Level = Level(9);
    /// `server.gzip_level`'s default (chosen by measurement: BENCHMARKS.md, "gzip level").
    pub const DEFAULT: Level = Level(6);
    /// The accepted levels.
    pub const RANGE: std::ops::RangeInclusive<u32> = 1..=9;

    /// `level`, if within [`Level::RANGE`].
    pub fn new(level: u32) -> Option<Level> {
        Self::RANGE.contains(&level).then_some(Level(level))
    }

    /// The level as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for Level {
    fn default() -> Self {
        Level::DEFAULT
    }
}

/// A chunk of a gzip member's deflate stream: one event's bytes, with what the trailer needs.
#[derive(Debug, Clone)]
pub struct Deflated {
    /// Non-final deflate blocks ending on a byte boundary.
    pub bytes: Bytes,
    crc: crc32fast::Hasher,
    len: u32,
}

impl Deflated {
    /// Deflates `data` at `level` on its own (no reference to earlier chunks).
    pub fn new(data: &[u8], level: Level) -> Self {
        let bytes = COMPRESSOR.with(|compressor| {
            let mut compressor = compressor.borrow_mut();
            let compressor = match &mut *compressor {
                Some((built, compressor)) if *built == level => {
                    // A reset compressor has no history: this chunk references nothing before it.
                    compressor.reset();
                    compressor
                }
                slot => {
                    let (_, compressor) =
                        slot.insert((level, Compress::new(Compression::new(level.get()), false)));
                    compressor
                }
            };
            deflate_sync(compressor, data)
        });
        let mut crc = crc32fast::Hasher::new();
        crc.update(data);
        Deflated {
            bytes: Bytes::from(bytes),
            crc,
            // gzip's ISIZE is the length modulo 2^32.
            len: data.len() as u32,
        }
    }
}

thread_local! {
    /// One raw-deflate compressor per thread, reset for every event: building one costs far
    /// more than compressing a small patch. Rebuilt only when asked for another level (one
    /// server uses one level; tests may run servers with different ones on a thread).
    static COMPRESSOR: RefCell<Option<(Level, Compress)>> = const { RefCell::new(None) };
}

/// Compresses all of `data` and ends with a sync flush: non-final blocks ending on a byte
/// boundary.
fn deflate_sync(compressor: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    let mut input = data;
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(64));
        }
        let before = compressor.total_in();
        // Compressing into memory only fails on a corrupted stream state; a fresh reset
        // rules that out, and what was produced so far is still valid deflate.
        if compressor
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .is_err()
        {
            break;
        }
        let consumed = usize::try_from(compressor.total_in() - before).unwrap_or(input.len());
        input = &input[consumed.min(input.len())..];
        // The flush is complete once the input is used up and the output did not fill.
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
    }
    out
}

/// The fixed 10-byte gzip header (deflate, no name, no mtime, unknown OS).
pub const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];

/// `data` as one whole gzip member (header, the deflated data at `level`, trailer), for a
/// response compressed whole: made of the same parts as a subscriber's gzip body.
pub fn member(data: &[u8], level: Level) -> Bytes {
    let deflated = Deflated::new(data, level);
    let mut trailer = GzipTrailer::default();
    trailer.add(&deflated);
    let trailer = trailer.finish();
    let mut out = BytesMut::with_capacity(GZIP_HEADER.len() + deflated.bytes.len() + trailer.len());
    out.put_slice(&GZIP_HEADER);
    out.put_slice(&deflated.bytes);
    out.put_slice(&trailer);
    out.freeze()
}

/// What a gzip subscriber needs to close its body: the CRC-32 and length of all it was sent.
#[derive(Debug, Clone, Default)]
pub struct GzipTrailer {
    crc: crc32fast::Hasher,
    len: u32,
}

impl GzipTrailer {
    /// Accounts for a chunk that was sent.
    pub fn add(&mut self, chunk: &Deflated) {
        self.crc.combine(&chunk.crc);
        self.len = self.len.wrapping_add(chunk.len);
    }

    /// The bytes that end the gzip body: an empty final block, then CRC-32 and ISIZE.
    pub fn finish(self) -> Bytes {
        let mut out = BytesMut::with_capacity(10);
        // Final block, fixed Huffman codes, immediately end-of-block: bits 1,01,0000000.
        out.put_slice(&[0x03, 0x00]);
        out.put_u32_le(self.crc.finalize());
        out.put_u32_le(self.len);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Frame, sse};
    use flate2::read::GzDecoder;
    use proptest::prelude::*;
    use std::io::{Read, Write};

    fn gunzip(parts: &[Bytes]) -> Vec<u8> {
        let all: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        let mut out = Vec::new();
        GzDecoder::new(&all[..]).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn shared_deflated_events_make_one_valid_gzip_body() {
        let events: Vec<Frame> = (0..5)
            .map(|i| {
                Frame::new(sse::event(
                    Some(&format!("s:1:{i}")),
                    "patch",
                    format!("[{i}]").as_bytes(),
                ))
            })
            .collect();
        let mut body = vec![Bytes::from_static(&GZIP_HEADER)];
        let mut trailer = GzipTrailer::default();
        let mut plain = Vec::new();
        for e in &events {
            body.push(e.deflated(Level::FAST).bytes.clone());
            trailer.add(e.deflated(Level::FAST));
            plain.extend_from_slice(e.plain());
        }
        body.push(trailer.finish());
        assert_eq!(gunzip(&body), plain);
    }

    #[test]
    fn gzip_prefix_is_readable_before_the_end() {
        // A client reads each event as soon as it arrives, long before the trailer.
        let e = Frame::new(sse::event(Some("s:1:1"), "snapshot", b"{\"a\":1}"));
        let mut data = GZIP_HEADER.to_vec();
        data.extend_from_slice(&e.deflated(Level::FAST).bytes);
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        decoder.write_all(&data).unwrap();
        decoder.flush().unwrap();
        assert_eq!(decoder.get_ref().as_slice(), &e.plain()[..]);
    }

    #[test]
    fn levels_are_one_to_nine() {
        assert_eq!(Level::new(0), None);
        assert_eq!(Level::new(10), None);
        assert_eq!(Level::new(1), Some(Level::FAST));
        assert_eq!(Level::new(9), Some(Level::BEST));
        assert!(Level::RANGE.contains(&Level::DEFAULT.get()));
    }

    #[test]
    fn a_higher_level_is_smaller_on_repetitive_events_and_decodes_the_same() {
        let data = br#"{"entity":[{"id":"1","route":"Red"},{"id":"2","route":"Red"},{"id":"3","route":"Red"}]}"#.repeat(20);
        let fast = member(&data, Level::FAST);
        let best = member(&data, Level::BEST);
        assert!(best.len() <= fast.len(), "{} > {}", best.len(), fast.len());
        for body in [fast, best] {
            let mut out = Vec::new();
            GzDecoder::new(&body[..]).read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    proptest! {
        #[test]
        fn a_member_is_one_whole_gzip_body(data in proptest::collection::vec(any::<u8>(), 0..5000), level in Level::RANGE) {
            let mut out = Vec::new();
            GzDecoder::new(&member(&data, Level::new(level).unwrap())[..]).read_to_end(&mut out).unwrap();
            prop_assert_eq!(out, data);
        }

        #[test]
        fn gzip_round_trips(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8), level in Level::RANGE) {
            let level = Level::new(level).unwrap();
            let mut body = vec![Bytes::from_static(&GZIP_HEADER)];
            let mut trailer = GzipTrailer::default();
            let mut plain = Vec::new();
            for c in &chunks {
                let d = Deflated::new(c, level);
                trailer.add(&d);
                body.push(d.bytes.clone());
                plain.extend_from_slice(c);
            }
            body.push(trailer.finish());
            prop_assert_eq!(gunzip(&body), plain);
        }
    }
}

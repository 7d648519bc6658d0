//! SSE framing (pure): events, comments and the shared gzip encoding of each event.
//!
//! Every event is framed once and the bytes are shared by all subscribers. For clients that
//! accept gzip, each event is also deflated once, independently of the others, as a run of
//! non-final deflate blocks ending on a byte boundary (a sync flush). Such runs concatenate into
//! one valid deflate stream, so a subscriber's gzip body is: a fixed header, then the shared
//! deflated events, then (when the stream ends) an empty final block and the trailer. Only the
//! trailer's CRC-32 and length are per subscriber, and they are combined from per-event values.

use std::cell::RefCell;
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress};

/// Builds one SSE event. `data` may contain newlines: each line becomes its own `data:` field,
/// so the client reassembles exactly `data`.
pub fn event(id: Option<&str>, name: &str, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + name.len() + id.map_or(0, str::len) + 32);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_u8(b'\n');
    for line in split_lines(data) {
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// JSON text with every non-ASCII character written as a `\uXXXX` escape (a surrogate pair
/// above U+FFFF): the same JSON value, in bytes a client that splits UTF-8 sequences across
/// reads cannot corrupt (the Streamdata.io SDK's EventSource does). Non-ASCII characters can
/// only occur inside JSON strings, where the escape means the same character. ASCII input (the
/// common case) is returned as is; so is input that is not UTF-8 (never produced here).
pub fn ascii_json(json: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    if json.is_ascii() {
        return Cow::Borrowed(json);
    }
    let Ok(text) = std::str::from_utf8(json) else {
        return Cow::Borrowed(json);
    };
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // A two-byte character becomes six bytes, a four-byte one twelve: at most three times.
    let mut out = Vec::with_capacity(json.len() + json.len() / 2);
    let mut rest = text;
    while let Some(at) = rest.bytes().position(|b| !b.is_ascii()) {
        out.extend_from_slice(&rest.as_bytes()[..at]);
        let tail = &rest[at..];
        let Some(c) = tail.chars().next() else { break };
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            let u = *unit as usize;
            out.extend_from_slice(&[
                b'\\',
                b'u',
                HEX[u >> 12],
                HEX[(u >> 8) & 0xf],
                HEX[(u >> 4) & 0xf],
                HEX[u & 0xf],
            ]);
        }
        rest = &tail[c.len_utf8()..];
    }
    out.extend_from_slice(rest.as_bytes());
    Cow::Owned(out)
}

/// A comment line (ignored by clients); used for keep-alives.
pub fn comment(text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 4);
    for line in split_lines(text.as_bytes()) {
        out.put_slice(b": ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// The `retry:` field telling the client how long to wait before reconnecting.
pub fn retry(millis: u64) -> Bytes {
    Bytes::from(format!("retry: {millis}\n\n"))
}

/// Splits on `\r\n`, `\n` or `\r`, the line ends SSE recognizes; an empty input is one empty line.
fn split_lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => {
                let skip = if current[i] == b'\r' && current.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = Some(&current[i + skip..]);
                Some(&current[..i])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// An event's bytes, plain and (built on first use) gzip-ready, shared by every subscriber.
#[derive(Debug)]
pub struct EncodedEvent {
    plain: Bytes,
    deflated: OnceLock<Deflated>,
}

impl EncodedEvent {
    /// Wraps an already framed event.
    pub fn new(plain: Bytes) -> Self {
        EncodedEvent {
            plain,
            deflated: OnceLock::new(),
        }
    }

    /// The framed event as sent to clients without compression.
    pub fn plain(&self) -> &Bytes {
        &self.plain
    }

    /// The bytes this event holds: its frame, and its deflated form once built.
    pub fn retained_bytes(&self) -> usize {
        self.plain.len() + self.deflated.get().map_or(0, |d| d.bytes.len())
    }

    /// The framed event deflated for gzip subscribers (computed once).
    pub fn deflated(&self) -> &Deflated {
        self.deflated.get_or_init(|| Deflated::new(&self.plain))
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
    /// Deflates `data` on its own (no reference to earlier chunks).
    pub fn new(data: &[u8]) -> Self {
        let bytes = COMPRESSOR.with(|compressor| {
            let mut compressor = compressor.borrow_mut();
            // A reset compressor has no history: this chunk references nothing before it.
            compressor.reset();
            deflate_sync(&mut compressor, data)
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
    /// more than compressing a small patch.
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
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
    use flate2::read::GzDecoder;
    use proptest::prelude::*;
    use std::io::{Read, Write};

    /// Parses SSE text per the WHATWG algorithm (enough for these tests): (id, event, data).
    fn parse(text: &str) -> Vec<(Option<String>, String, String)> {
        let mut events = Vec::new();
        let (mut id, mut name, mut data): (Option<String>, String, Vec<String>) =
            (None, String::new(), Vec::new());
        let mut any = false;
        let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
        for line in normalized.split('\n') {
            if line.is_empty() {
                if any && !data.is_empty() {
                    events.push((id.take(), std::mem::take(&mut name), data.join("\n")));
                }
                data.clear();
                any = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            any = true;
            match field {
                "id" => id = Some(value.to_owned()),
                "event" => name = value.to_owned(),
                "data" => data.push(value.to_owned()),
                _ => {}
            }
        }
        events
    }

    #[test]
    fn frames_a_patch_event() {
        let f = event(Some("s:1:2"), "patch", br#"[{"op":"remove","path":"/a"}]"#);
        assert_eq!(
            &f[..],
            b"id: s:1:2\nevent: patch\ndata: [{\"op\":\"remove\",\"path\":\"/a\"}]\n\n"
        );
    }

    #[test]
    fn multiline_data_becomes_several_fields() {
        let f = event(None, "x", b"a\nb\r\nc\rd");
        assert_eq!(&f[..], b"event: x\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
        assert_eq!(parse(std::str::from_utf8(&f).unwrap())[0].2, "a\nb\nc\nd");
    }

    #[test]
    fn comment_and_retry() {
        assert_eq!(&comment("keep-alive")[..], b": keep-alive\n\n");
        assert_eq!(&retry(2000)[..], b"retry: 2000\n\n");
    }

    fn gunzip(parts: &[Bytes]) -> Vec<u8> {
        let all: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        let mut out = Vec::new();
        GzDecoder::new(&all[..]).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn shared_deflated_events_make_one_valid_gzip_body() {
        let events: Vec<EncodedEvent> = (0..5)
            .map(|i| {
                EncodedEvent::new(event(
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
            body.push(e.deflated().bytes.clone());
            trailer.add(e.deflated());
            plain.extend_from_slice(e.plain());
        }
        body.push(trailer.finish());
        assert_eq!(gunzip(&body), plain);
    }

    #[test]
    fn gzip_prefix_is_readable_before_the_end() {
        // A client reads each event as soon as it arrives, long before the trailer.
        let e = EncodedEvent::new(event(Some("s:1:1"), "snapshot", b"{\"a\":1}"));
        let mut data = GZIP_HEADER.to_vec();
        data.extend_from_slice(&e.deflated().bytes);
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        decoder.write_all(&data).unwrap();
        decoder.flush().unwrap();
        assert_eq!(decoder.get_ref().as_slice(), &e.plain()[..]);
    }

    #[test]
    fn ascii_json_escapes_accents_cjk_and_emoji() {
        let doc = serde_json::json!({"café": "naïve 東京 😀", "n": 1, "plain": "ascii"});
        let text = serde_json::to_vec(&doc).unwrap();
        let escaped = ascii_json(&text);
        assert!(escaped.is_ascii(), "{}", String::from_utf8_lossy(&escaped));
        let escaped = std::str::from_utf8(&escaped).unwrap();
        assert!(escaped.contains(r"caf\u00e9"), "{escaped}");
        assert!(escaped.contains(r"\u6771\u4eac"), "{escaped}");
        assert!(
            escaped.contains(r"\ud83d\ude00"),
            "a surrogate pair: {escaped}"
        );
        let back: serde_json::Value = serde_json::from_str(escaped).unwrap();
        assert_eq!(back, doc);
        let ascii = br#"{"a":"b"}"#;
        assert!(
            matches!(ascii_json(ascii), std::borrow::Cow::Borrowed(_)),
            "ASCII is not copied"
        );
    }

    proptest! {
        #[test]
        fn ascii_json_parses_to_the_same_value(strings in proptest::collection::vec(any::<String>(), 0..6)) {
            let doc = serde_json::json!({ "strings": strings, "keys": strings.iter().map(|s| (s.clone(), serde_json::Value::from(1))).collect::<serde_json::Map<String, serde_json::Value>>() });
            let text = serde_json::to_vec(&doc).unwrap();
            let escaped = ascii_json(&text);
            prop_assert!(escaped.is_ascii());
            let back: serde_json::Value = serde_json::from_slice(&escaped).unwrap();
            prop_assert_eq!(back, doc);
        }

        #[test]
        fn framing_round_trips(id in "[a-z0-9:]{0,12}", name in "[a-z]{1,10}", data in "(?s).{0,200}") {
            let f = event(Some(&id), &name, data.as_bytes());
            let parsed = parse(std::str::from_utf8(&f).unwrap());
            let expected = data.replace("\r\n", "\n").replace('\r', "\n");
            prop_assert_eq!(parsed, vec![(Some(id), name, expected)]);
        }

        #[test]
        fn gzip_round_trips(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut body = vec![Bytes::from_static(&GZIP_HEADER)];
            let mut trailer = GzipTrailer::default();
            let mut plain = Vec::new();
            for c in &chunks {
                let d = Deflated::new(c);
                trailer.add(&d);
                body.push(d.bytes.clone());
                plain.extend_from_slice(c);
            }
            body.push(trailer.finish());
            prop_assert_eq!(gunzip(&body), plain);
        }
    }
}

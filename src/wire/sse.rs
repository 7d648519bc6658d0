//! SSE framing (pure): events, comments and the `retry:` field, as the EventSource parser
//! reads them.

use std::sync::LazyLock;

use bytes::{BufMut, Bytes, BytesMut};

use super::Frame;

/// The keep-alive comment, framed (and deflated) once for the whole process.
pub static KEEP_ALIVE: LazyLock<Frame> = LazyLock::new(|| Frame::new(comment("keep-alive")));

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
        #[test]
        fn framing_round_trips(id in "[a-z0-9:]{0,12}", name in "[a-z]{1,10}", data in "(?s).{0,200}") {
            let f = event(Some(&id), &name, data.as_bytes());
            let parsed = parse(std::str::from_utf8(&f).unwrap());
            let expected = data.replace("\r\n", "\n").replace('\r', "\n");
            prop_assert_eq!(parsed, vec![(Some(id), name, expected)]);
        }
    }
}

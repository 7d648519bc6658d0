//! A minimal HTTP/1.1 response reader for load testing: the head, then a body that is chunked,
//! sized, or runs until the connection closes. Enough for any SSE server; nothing more.
//!
//! Decoding never copies: [`BodyDecoder::feed`] hands the caller slices of its input.

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No blank line within the head size limit.
    #[error("the response head is longer than {0} bytes")]
    HeadTooLong(usize),
    /// The first line is not `HTTP/1.x <status> ...`.
    #[error("malformed status line {0:?}")]
    StatusLine(String),
    /// A header line has no colon.
    #[error("malformed header line {0:?}")]
    HeaderLine(String),
    /// `Content-Length` is not a non-negative integer.
    #[error("invalid Content-Length {0:?}")]
    ContentLength(String),
    /// A chunk size line is not hexadecimal digits (optionally followed by extensions).
    #[error("malformed chunk size line")]
    ChunkSize,
    /// A chunk's data is not followed by CRLF, or a line ends in a bare CR.
    #[error("a chunk or trailer line does not end with CRLF")]
    ChunkTerminator,
}

/// The largest response head accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length` bytes.
    Length(u64),
    /// Everything until the server closes the connection (SSE servers such as floor.c).
    UntilClose,
}

/// The parts of a response head a load client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// How the body is delimited.
    pub body: BodyKind,
    /// The `Content-Type`, if any.
    pub content_type: Option<String>,
}

/// The length of the head (through its blank line) if `buf` holds a whole head.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a response head (the bytes through the blank line).
pub fn parse_head(head: &[u8]) -> Result<ResponseHead, HttpError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = parse_status_line(status_line)
        .ok_or_else(|| HttpError::StatusLine(status_line.chars().take(80).collect()))?;
    let mut chunked = false;
    let mut length = None;
    let mut content_type = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::HeaderLine(line.chars().take(80).collect()))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked is always the last coding when present (RFC 9112 §6.1).
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<u64>()
                .map_err(|_| HttpError::ContentLength(value.to_owned()))?;
            length = Some(n);
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.to_owned());
        }
    }
    let body = if matches!(status, 100..=199 | 204 | 304) {
        BodyKind::Length(0)
    } else if chunked {
        BodyKind::Chunked
    } else if let Some(n) = length {
        BodyKind::Length(n)
    } else {
        BodyKind::UntilClose
    };
    Ok(ResponseHead {
        status,
        body,
        content_type,
    })
}

fn parse_status_line(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("HTTP/1.")?;
    let mut parts = rest.splitn(3, ' ');
    let minor = parts.next()?;
    if minor.len() != 1 || !minor.as_bytes()[0].is_ascii_digit() {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits of a size.
    Size {
        value: u64,
        digits: u8,
    },
    /// Skipping chunk extensions up to CR.
    Extension {
        value: u64,
    },
    /// Expecting the LF of a size line.
    SizeLf {
        value: u64,
    },
    /// Inside a chunk's data, with this many bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// Inside the trailer section, this many bytes into the current line.
    Trailer {
        line: usize,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

/// Incremental `Transfer-Encoding: chunked` decoder: feed it any split of the wire bytes.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: Chunk,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: Chunk::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl ChunkedDecoder {
    /// Whether the last chunk and the trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Decodes `input`, passing each run of body bytes to `out`. Bytes after the end of the
    /// body are ignored.
    pub fn feed(&mut self, mut input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), HttpError> {
        while !input.is_empty() {
            if let Chunk::Data(left) = self.state {
                let take = usize::try_from(left).map_or(input.len(), |l| l.min(input.len()));
                out(&input[..take]);
                input = &input[take..];
                let left = left - take as u64;
                self.state = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                continue;
            }
            let byte = input[0];
            input = &input[1..];
            self.state = match self.state {
                Chunk::Size { value, digits } => match hex(byte) {
                    // 16 hex digits overflow nothing; more would.
                    Some(d) if digits < 16 => Chunk::Size {
                        value: value << 4 | u64::from(d),
                        digits: digits + 1,
                    },
                    Some(_) => return Err(HttpError::ChunkSize),
                    None if digits == 0 => return Err(HttpError::ChunkSize),
                    None => match byte {
                        b'\r' => Chunk::SizeLf { value },
                        b';' | b' ' | b'\t' => Chunk::Extension { value },
                        _ => return Err(HttpError::ChunkSize),
                    },
                },
                Chunk::Extension { value } => match byte {
                    b'\r' => Chunk::SizeLf { value },
                    b'\n' => return Err(HttpError::ChunkTerminator),
                    _ => Chunk::Extension { value },
                },
                Chunk::SizeLf { value } => match (byte, value) {
                    (b'\n', 0) => Chunk::Trailer { line: 0 },
                    (b'\n', n) => Chunk::Data(n),
                    _ => return Err(HttpError::ChunkTerminator),
                },
                Chunk::DataCr => match byte {
                    b'\r' => Chunk::DataLf,
                    _ => return Err(HttpError::ChunkTerminator),
                },
                Chunk::DataLf => match byte {
                    b'\n' => Chunk::Size {
                        value: 0,
                        digits: 0,
                    },
                    _ => return Err(HttpError::ChunkTerminator),
                },
                Chunk::Trailer { line } => match byte {
                    b'\r' => Chunk::TrailerLf { empty: line == 0 },
                    _ => Chunk::Trailer { line: line + 1 },
                },
                Chunk::TrailerLf { empty } => match (byte, empty) {
                    (b'\n', true) => Chunk::Done,
                    (b'\n', false) => Chunk::Trailer { line: 0 },
                    _ => return Err(HttpError::ChunkTerminator),
                },
                Chunk::Done => return Ok(()),
                Chunk::Data(_) => unreachable!("handled above"),
            };
        }
        Ok(())
    }
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Decodes a response body of any [`BodyKind`].
#[derive(Debug, Clone)]
pub enum BodyDecoder {
    /// Chunked transfer coding.
    Chunked(ChunkedDecoder),
    /// This many bytes remain.
    Length(u64),
    /// Until the connection closes.
    UntilClose,
}

impl BodyDecoder {
    /// A decoder for a body of `kind`.
    pub fn new(kind: BodyKind) -> Self {
        match kind {
            BodyKind::Chunked => BodyDecoder::Chunked(ChunkedDecoder::default()),
            BodyKind::Length(n) => BodyDecoder::Length(n),
            BodyKind::UntilClose => BodyDecoder::UntilClose,
        }
    }

    /// Whether the body has ended (a connection-delimited body ends only at close).
    pub fn is_done(&self) -> bool {
        match self {
            BodyDecoder::Chunked(c) => c.is_done(),
            BodyDecoder::Length(n) => *n == 0,
            BodyDecoder::UntilClose => false,
        }
    }

    /// Decodes `input`, passing body bytes to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), HttpError> {
        match self {
            BodyDecoder::Chunked(c) => c.feed(input, out),
            BodyDecoder::Length(left) => {
                let take = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
                if take > 0 {
                    out(&input[..take]);
                }
                *left -= take as u64;
                Ok(())
            }
            BodyDecoder::UntilClose => {
                if !input.is_empty() {
                    out(input);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(pieces: &[&[u8]]) -> Result<(Vec<u8>, bool), HttpError> {
        let mut decoder = ChunkedDecoder::default();
        let mut body = Vec::new();
        for piece in pieces {
            decoder.feed(piece, &mut |b| body.extend_from_slice(b))?;
        }
        Ok((body, decoder.is_done()))
    }

    fn encode(chunks: &[Vec<u8>], extensions: bool, upper: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        for chunk in chunks.iter().filter(|c| !c.is_empty()) {
            let size = if upper {
                format!("{:X}", chunk.len())
            } else {
                format!("{:x}", chunk.len())
            };
            wire.extend_from_slice(size.as_bytes());
            if extensions {
                wire.extend_from_slice(b";name=value");
            }
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n");
        if extensions {
            wire.extend_from_slice(b"X-Trailer: 1\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        wire
    }

    fn split_at_points(wire: &[u8], points: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = points.iter().map(|p| p % (wire.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut at = 0;
        for cut in cuts {
            pieces.push(wire[at..cut].to_vec());
            at = cut;
        }
        pieces.push(wire[at..].to_vec());
        pieces
    }

    proptest! {
        #[test]
        fn chunked_decoding_is_independent_of_how_the_wire_is_split(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..12),
            points in prop::collection::vec(any::<usize>(), 0..40),
            extensions in any::<bool>(),
            upper in any::<bool>(),
        ) {
            let wire = encode(&chunks, extensions, upper);
            let pieces = split_at_points(&wire, &points);
            let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let (body, done) = decode_all(&refs).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(body, chunks.concat());
            prop_assert!(done);
        }

        #[test]
        fn chunked_decoding_never_panics_on_garbage(
            wire in prop::collection::vec(any::<u8>(), 0..200),
            points in prop::collection::vec(any::<usize>(), 0..10),
        ) {
            let pieces = split_at_points(&wire, &points);
            let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let _ = decode_all(&refs);
        }
    }

    #[test]
    fn chunked_errors_are_reported() {
        assert_eq!(decode_all(&[b"zz\r\n"]), Err(HttpError::ChunkSize));
        assert_eq!(decode_all(&[b"\r\n"]), Err(HttpError::ChunkSize));
        assert_eq!(
            decode_all(&[b"11111111111111111\r\n"]),
            Err(HttpError::ChunkSize)
        );
        assert_eq!(decode_all(&[b"3\r\nabcX"]), Err(HttpError::ChunkTerminator));
        assert_eq!(decode_all(&[b"3\nabc"]), Err(HttpError::ChunkSize));
        // An unfinished body is not an error, just not done.
        assert_eq!(decode_all(&[b"3\r\nab"]), Ok((b"ab".to_vec(), false)));
        // Bytes after the end are ignored.
        assert_eq!(
            decode_all(&[b"1\r\na\r\n0\r\n\r\ngarbage"]),
            Ok((b"a".to_vec(), true))
        );
    }

    #[test]
    fn heads_are_parsed() {
        let head = parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(
            head,
            Ok(ResponseHead {
                status: 200,
                body: BodyKind::Chunked,
                content_type: Some("text/event-stream".into())
            })
        );
        let head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n");
        assert_eq!(head.map(|h| h.body), Ok(BodyKind::UntilClose));
        let head = parse_head(b"HTTP/1.0 404 Not Found\r\ncontent-length: 12\r\n\r\n");
        assert_eq!(
            head.map(|h| (h.status, h.body)),
            Ok((404, BodyKind::Length(12)))
        );
        let head = parse_head(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 12\r\n\r\n");
        assert_eq!(head.map(|h| h.body), Ok(BodyKind::Length(0)));
        assert!(matches!(
            parse_head(b"HTTP/2 200\r\n\r\n"),
            Err(HttpError::StatusLine(_))
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n"),
            Err(HttpError::HeaderLine(_))
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
            Err(HttpError::ContentLength(_))
        ));
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\n\r\nbody"), Some(19));
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\n"), None);
    }

    #[test]
    fn sized_and_close_delimited_bodies() {
        let mut d = BodyDecoder::new(BodyKind::Length(3));
        let mut body = Vec::new();
        d.feed(b"ab", &mut |b| body.extend_from_slice(b)).unwrap();
        assert!(!d.is_done());
        d.feed(b"cde", &mut |b| body.extend_from_slice(b)).unwrap();
        assert!(d.is_done());
        assert_eq!(body, b"abc");
        let mut d = BodyDecoder::new(BodyKind::UntilClose);
        d.feed(b"xyz", &mut |b| body.extend_from_slice(b)).unwrap();
        assert_eq!(body, b"abcxyz");
        assert!(!d.is_done());
    }
}

//! JSON Pointer patterns (`/entity/*/trip_update`) and relative key paths (`vehicle/vehicle/id`).
//!
//! Both use RFC 6901 escaping (`~0` is `~`, `~1` is `/`). In a pattern, a segment that is exactly
//! `*` matches any one token (an object key or an array index).

use std::fmt;

use json_patch::jsonptr::Pointer;
use serde_json::{Map, Value};

/// One segment of a [`PathPattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// `*`: any one token.
    Any,
    /// A literal token, decoded (`~1` already turned into `/`).
    Token(String),
}

impl Segment {
    fn matches(&self, token: &str) -> bool {
        match self {
            Segment::Any => true,
            Segment::Token(t) => t == token,
        }
    }

    /// Whether the array index `index` (whose token is its decimal form) matches.
    fn matches_index(&self, index: usize) -> bool {
        match self {
            Segment::Any => true,
            Segment::Token(t) => {
                // Only the canonical decimal form names an index: never `01` or `+1`.
                let canonical =
                    t.bytes().all(|b| b.is_ascii_digit()) && (t.len() == 1 || !t.starts_with('0'));
                canonical && t.parse() == Ok(index)
            }
        }
    }
}

/// A JSON Pointer whose segments may be `*` wildcards; `""` is the document root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    /// Parses `source`, which must be empty (the root) or start with `/`.
    pub fn parse(source: &str) -> Result<Self, String> {
        if source.is_empty() {
            return Ok(PathPattern {
                source: String::new(),
                segments: Vec::new(),
            });
        }
        let Some(rest) = source.strip_prefix('/') else {
            return Err(format!(
                "expected a JSON Pointer pattern starting with `/` (e.g. `/entity` or `/entity/*/trip_update`), got `{source}`"
            ));
        };
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            if raw == "*" {
                segments.push(Segment::Any);
            } else {
                segments.push(Segment::Token(
                    decode_token(raw).map_err(|e| format!("in pattern `{source}`: {e}"))?,
                ));
            }
        }
        Ok(PathPattern {
            source: source.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The segments, root first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// How many `*` segments the pattern has (fewer means more specific).
    pub fn wildcards(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Any))
            .count()
    }

    /// Whether segment `depth` exists and matches `token`.
    pub(crate) fn segment_matches(&self, depth: usize, token: &str) -> bool {
        self.segments
            .get(depth)
            .is_some_and(|segment| segment.matches(token))
    }

    /// Whether segment `depth` exists and matches the array index `index`.
    pub(crate) fn segment_matches_index(&self, depth: usize, index: usize) -> bool {
        self.segments
            .get(depth)
            .is_some_and(|segment| segment.matches_index(index))
    }

    /// True when `pointer` is this pattern's location or lies below it.
    pub fn covers(&self, pointer: &Pointer) -> bool {
        let mut tokens = pointer.tokens();
        for segment in &self.segments {
            match tokens.next() {
                Some(token) if segment.matches(&token.decoded()) => {}
                _ => return false,
            }
        }
        true
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Where an array element's identity lives, relative to the element: `id` or `vehicle/vehicle/id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPath {
    source: String,
    fields: Vec<String>,
}

impl KeyPath {
    /// Parses a relative path of object fields separated by `/` (RFC 6901 escapes allowed).
    pub fn parse(source: &str) -> Result<Self, String> {
        if source.is_empty() {
            return Err(
                "expected the identity field of the array's elements, e.g. `id` or `vehicle/vehicle/id`, got an empty string"
                    .to_owned(),
            );
        }
        if source.starts_with('/') {
            return Err(format!(
                "expected a path relative to the element, without a leading `/` (e.g. `vehicle/vehicle/id`), got `{source}`"
            ));
        }
        let mut fields = Vec::new();
        for raw in source.split('/') {
            if raw.is_empty() {
                return Err(format!(
                    "expected field names separated by single `/`, got an empty field in `{source}`"
                ));
            }
            fields.push(decode_token(raw).map_err(|e| format!("in key `{source}`: {e}"))?);
        }
        Ok(KeyPath {
            source: source.to_owned(),
            fields,
        })
    }

    /// The key path as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The decoded field names, outermost first.
    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    /// The value at this path inside `element`, if every step is an object holding the field.
    pub(crate) fn get<'v>(&self, element: &'v Value) -> Option<&'v Value> {
        self.fields
            .iter()
            .try_fold(element, |value, name| field(value.as_object()?, name))
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The value of `name` in `object`. Entities are small objects, and every element of a keyed
/// array is looked up: scanning a few keys costs less than hashing the name each time.
pub(crate) fn field<'v>(object: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    const SCAN_UP_TO: usize = 16;
    if object.len() <= SCAN_UP_TO {
        object
            .iter()
            .find_map(|(key, value)| (key == name).then_some(value))
    } else {
        object.get(name)
    }
}

/// Decodes one RFC 6901 token, rejecting a `~` not followed by `0` or `1`.
fn decode_token(raw: &str) -> Result<String, String> {
    if !raw.contains('~') {
        return Ok(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                other => {
                    let got =
                        other.map_or_else(|| "end of token".to_owned(), |c| format!("`~{c}`"));
                    return Err(format!(
                        "invalid escape {got} in `{raw}`: `~` must be followed by `0` (for `~`) or `1` (for `/`)"
                    ));
                }
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// The length of `token` escaped per RFC 6901 (`~` and `/` take two bytes).
pub(crate) fn escaped_len(token: &str) -> usize {
    token.len() + token.bytes().filter(|b| *b == b'~' || *b == b'/').count()
}

/// Appends `/` and `token`, escaped per RFC 6901, to a pointer being built.
pub(crate) fn push_token(path: &mut String, token: &str) {
    path.push('/');
    if !token.bytes().any(|b| b == b'~' || b == b'/') {
        path.push_str(token);
        return;
    }
    for c in token.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_decode_escapes_and_wildcards() {
        let p = PathPattern::parse("/a~1b/*/c~0d").unwrap();
        assert_eq!(
            p.segments(),
            &[
                Segment::Token("a/b".into()),
                Segment::Any,
                Segment::Token("c~d".into())
            ]
        );
        assert_eq!(p.wildcards(), 1);
        assert!(PathPattern::parse("").unwrap().segments().is_empty());
    }

    #[test]
    fn bad_patterns_say_what_was_expected() {
        let e = PathPattern::parse("entity").unwrap_err();
        assert!(e.contains("starting with `/`"), "{e}");
        let e = PathPattern::parse("/a~2").unwrap_err();
        assert!(e.contains("`~2`"), "{e}");
        let e = PathPattern::parse("/a~").unwrap_err();
        assert!(e.contains("end of token"), "{e}");
    }

    #[test]
    fn key_paths_are_relative_and_non_empty() {
        assert_eq!(
            KeyPath::parse("vehicle/vehicle/id").unwrap().fields(),
            &["vehicle", "vehicle", "id"]
        );
        assert_eq!(KeyPath::parse("a~1b").unwrap().fields(), &["a/b"]);
        assert!(KeyPath::parse("/id").unwrap_err().contains("leading `/`"));
        assert!(KeyPath::parse("").is_err());
        assert!(KeyPath::parse("a//b").unwrap_err().contains("empty field"));
    }

    #[test]
    fn covers_matches_prefixes_with_decoded_tokens() {
        let p = PathPattern::parse("/data/*/a~1b").unwrap();
        let at = |s: &str| Pointer::parse(s).unwrap().to_buf();
        assert!(p.covers(&at("/data/3/a~1b")));
        assert!(p.covers(&at("/data/x/a~1b/deeper")));
        assert!(!p.covers(&at("/data/3")));
        assert!(!p.covers(&at("/data/3/a")));
        assert!(!p.covers(&at("/other/3/a~1b")));
    }

    #[test]
    fn index_segments_match_only_the_decimal_form() {
        let p = PathPattern::parse("/a/0/12/*/012/+1").unwrap();
        assert!(p.segment_matches_index(1, 0));
        assert!(p.segment_matches_index(2, 12));
        assert!(!p.segment_matches_index(2, 1));
        assert!(p.segment_matches_index(3, 7));
        assert!(!p.segment_matches_index(4, 12));
        assert!(!p.segment_matches_index(5, 1));
        assert!(!p.segment_matches_index(0, 0));
        assert!(!p.segment_matches_index(6, 0));
    }

    #[test]
    fn push_token_escapes() {
        let mut s = String::new();
        push_token(&mut s, "a/b~c");
        push_token(&mut s, "plain");
        assert_eq!(s, "/a~1b~0c/plain");
        assert_eq!(1 + escaped_len("a/b~c") + 1 + escaped_len("plain"), s.len());
    }
}

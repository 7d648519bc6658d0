//! A change as a CloudEvent 1.0 (pure): its attributes, written as `ce-` headers (binary
//! mode: the payload travels as it is) or as one JSON object holding the payload under `data`
//! (structured mode, `application/cloudevents+json`). Broker messages and webhook deliveries
//! both write their events here, so the two read alike.
//!
//! Besides the required `id`, `source`, `type` and `specversion` and the optional `time` and
//! `datacontenttype`, patchwire adds the extension attributes a consumer needs to rebuild the
//! document: `stream`, `epoch`, `seq` and, for patches, `baseseq` (the sequence number the
//! patch applies to), all strings (CloudEvents integers are 32-bit; epochs are not).

use super::ChangeKind;

/// The CloudEvents version the attributes follow.
pub const SPEC_VERSION: &str = "1.0";

/// The media type of a structured-mode event.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// One change's event attributes.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// `id`: the event id, `{stream}:{epoch}:{seq}`.
    pub id: &'a str,
    /// `type`, e.g. `stream.patch`.
    pub kind_name: &'a str,
    /// `source`, e.g. `/streams/fleet`.
    pub source: &'a str,
    /// `time` (RFC 3339).
    pub time: &'a str,
    /// Patch or whole document: the payload's content type.
    pub kind: ChangeKind,
    /// `stream`.
    pub stream: &'a str,
    /// `epoch`.
    pub epoch: u64,
    /// `seq`.
    pub seq: u64,
    /// `baseseq`, for a patch.
    pub base_seq: Option<u64>,
}

/// The content type of a change's payload: `application/json-patch+json` for a patch,
/// `application/json` for a whole document.
pub fn content_type(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Patch => "application/json-patch+json",
        ChangeKind::Snapshot => "application/json",
    }
}

impl Attributes<'_> {
    /// The attributes as `ce-` headers (binary mode), in a fixed order, then `content-type`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("ce-specversion", SPEC_VERSION.to_owned()),
            ("ce-id", self.id.to_owned()),
            ("ce-type", self.kind_name.to_owned()),
            ("ce-source", self.source.to_owned()),
            ("ce-time", self.time.to_owned()),
            ("ce-stream", self.stream.to_owned()),
            ("ce-epoch", self.epoch.to_string()),
            ("ce-seq", self.seq.to_string()),
        ];
        if let Some(base) = self.base_seq {
            headers.push(("ce-baseseq", base.to_string()));
        }
        headers.push(("content-type", content_type(self.kind).to_owned()));
        headers
    }

    /// The event in structured mode: the same attributes as [`Self::headers`] (without the
    /// `ce-` prefix, `content-type` as `datacontenttype`) and `data`, the payload's JSON
    /// embedded as it is. `data` must be JSON.
    pub fn structured(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 320);
        out.push(b'{');
        for (n, (name, value)) in self.headers().iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            let name = match *name {
                "content-type" => "datacontenttype",
                other => other.trim_start_matches("ce-"),
            };
            push_string(&mut out, name);
            out.push(b':');
            push_string(&mut out, value);
        }
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(data);
        out.push(b'}');
        out
    }
}

/// `text` as a JSON string.
fn push_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buffer = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn patch() -> Attributes<'static> {
        Attributes {
            id: "fleet:9:5",
            kind_name: "stream.patch",
            source: "/streams/fleet",
            time: "2021-02-25T15:02:10.123Z",
            kind: ChangeKind::Patch,
            stream: "fleet",
            epoch: 9,
            seq: 5,
            base_seq: Some(4),
        }
    }

    #[test]
    fn binary_mode_headers() {
        let headers = patch().headers();
        let names: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "ce-specversion",
                "ce-id",
                "ce-type",
                "ce-source",
                "ce-time",
                "ce-stream",
                "ce-epoch",
                "ce-seq",
                "ce-baseseq",
                "content-type"
            ]
        );
        assert_eq!(headers[9].1, "application/json-patch+json");
    }

    #[test]
    fn structured_mode_is_json_with_the_same_attributes() {
        let event: Value =
            serde_json::from_slice(&patch().structured(br#"[{"op":"remove","path":"/a"}]"#))
                .expect("JSON");
        assert_eq!(
            event,
            json!({"specversion": "1.0", "id": "fleet:9:5", "type": "stream.patch",
                   "source": "/streams/fleet", "time": "2021-02-25T15:02:10.123Z",
                   "stream": "fleet", "epoch": "9", "seq": "5", "baseseq": "4",
                   "datacontenttype": "application/json-patch+json",
                   "data": [{"op": "remove", "path": "/a"}]})
        );
        let quoted = Attributes {
            stream: "a\"b\\c\u{1}é",
            base_seq: None,
            kind: ChangeKind::Snapshot,
            ..patch()
        };
        let event: Value = serde_json::from_slice(&quoted.structured(b"{}")).expect("JSON");
        assert_eq!(event["stream"], "a\"b\\c\u{1}é");
        assert!(event.get("baseseq").is_none());
        assert_eq!(event["datacontenttype"], "application/json");
    }
}

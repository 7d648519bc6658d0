//! What nodes tell each other over pub/sub: a change (written by the publish script, which
//! alone knows its sequence number), a failure or recovery of a stream's upstream, a lease
//! given up, and a node leaving. Lines separated by `\n`; the last field (a JSON payload) may
//! hold anything.
//!
//! Pub/sub is only a hint: a lost message is a gap the follower fills from the log.

use bytes::Bytes;

use crate::wire::ChangeKind as Kind;

/// The one-letter code of a change's kind in the log and the announcements.
pub fn code(kind: Kind) -> &'static str {
    match kind {
        Kind::Patch => "p",
        Kind::Snapshot => "s",
    }
}

/// The kind a code names.
pub fn kind_of(code: &[u8]) -> Option<Kind> {
    match code {
        b"p" => Some(Kind::Patch),
        b"s" => Some(Kind::Snapshot),
        _ => None,
    }
}

/// One change as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedChange {
    /// The epoch it belongs to.
    pub epoch: u64,
    /// Its sequence number.
    pub seq: u64,
    /// Patch or snapshot.
    pub kind: Kind,
    /// When it was published (ms since the Unix epoch).
    pub at_ms: u64,
    /// The patch or document JSON.
    pub payload: Bytes,
}

/// A message on the cluster's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// A change was appended to `stream`'s log.
    Change {
        /// The stream.
        stream: String,
        /// The change.
        change: LoggedChange,
    },
    /// The upstream of `stream` failed (`failure` is the JSON the holder stored in the meta
    /// hash) or recovered (`failure` is `None`).
    Health {
        /// The stream.
        stream: String,
        /// The epoch the holder published in.
        epoch: u64,
        /// The node that polled (it told its own subscribers already).
        node: String,
        /// The failure, or `None` for a recovery.
        failure: Option<Bytes>,
    },
    /// The holder of `stream`'s lease gave it up (shutdown or handover): whoever is next may
    /// take it now rather than after the lease's TTL.
    Released {
        /// The stream.
        stream: String,
    },
    /// A node left the live set (it shuts down): the others rank streams without it now
    /// rather than at their next heartbeat, so the next in line takes its leases at once.
    Left {
        /// The node.
        node: String,
    },
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed cluster message: {0}")]
pub struct Malformed(&'static str);

impl Announcement {
    /// The bytes of a health message (changes are encoded by the publish script).
    pub fn encode_health(stream: &str, epoch: u64, node: &str, failure: Option<&[u8]>) -> Vec<u8> {
        let mut out = match failure {
            Some(_) => format!("f\n{stream}\n{epoch}\n{node}\n").into_bytes(),
            None => format!("r\n{stream}\n{epoch}\n{node}\n").into_bytes(),
        };
        if let Some(json) = failure {
            out.extend_from_slice(json);
        }
        out
    }

    /// Reads a message.
    pub fn decode(bytes: &Bytes) -> Result<Announcement, Malformed> {
        let mut fields = Fields {
            rest: bytes.clone(),
        };
        match &*fields.next("type")? {
            b"c" => {
                let stream = fields.text("stream")?;
                let epoch = fields.number("epoch")?;
                let seq = fields.number("seq")?;
                let kind = kind_of(&fields.next("kind")?).ok_or(Malformed("kind"))?;
                let at_ms = fields.number("at")?;
                Ok(Announcement::Change {
                    stream,
                    change: LoggedChange {
                        epoch,
                        seq,
                        kind,
                        at_ms,
                        payload: fields.rest,
                    },
                })
            }
            b"f" | b"r" => {
                let failed = bytes.first() == Some(&b'f');
                let stream = fields.text("stream")?;
                let epoch = fields.number("epoch")?;
                let node = fields.text("node")?;
                Ok(Announcement::Health {
                    stream,
                    epoch,
                    node,
                    failure: failed.then_some(fields.rest),
                })
            }
            b"l" => Ok(Announcement::Released {
                stream: String::from_utf8(fields.rest.to_vec()).map_err(|_| Malformed("stream"))?,
            }),
            b"n" => Ok(Announcement::Left {
                node: String::from_utf8(fields.rest.to_vec()).map_err(|_| Malformed("node"))?,
            }),
            _ => Err(Malformed("type")),
        }
    }
}

struct Fields {
    rest: Bytes,
}

impl Fields {
    fn next(&mut self, what: &'static str) -> Result<Bytes, Malformed> {
        let end = self
            .rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(Malformed(what))?;
        let field = self.rest.split_to(end);
        let _newline = self.rest.split_to(1);
        Ok(field)
    }

    fn text(&mut self, what: &'static str) -> Result<String, Malformed> {
        String::from_utf8(self.next(what)?.to_vec()).map_err(|_| Malformed(what))
    }

    fn number(&mut self, what: &'static str) -> Result<u64, Malformed> {
        std::str::from_utf8(&self.next(what)?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(Malformed(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_change_as_the_script_writes_it() {
        let bytes =
            Bytes::from_static(b"c\nfleet\n1700\n42\np\n1700000000123\n[{\"op\":\"add\"}]\n\n");
        let Ok(Announcement::Change { stream, change }) = Announcement::decode(&bytes) else {
            panic!("not a change");
        };
        assert_eq!(stream, "fleet");
        assert_eq!(
            (change.epoch, change.seq, change.kind, change.at_ms),
            (1700, 42, Kind::Patch, 1_700_000_000_123)
        );
        // The payload is everything after the sixth line break, line breaks included.
        assert_eq!(&change.payload[..], b"[{\"op\":\"add\"}]\n\n");
    }

    #[test]
    fn a_release_and_a_departure_as_the_scripts_write_them() {
        assert_eq!(
            Announcement::decode(&Bytes::from_static(b"l\nfleet")),
            Ok(Announcement::Released {
                stream: "fleet".into()
            })
        );
        assert_eq!(
            Announcement::decode(&Bytes::from_static(b"n\nnode-a")),
            Ok(Announcement::Left {
                node: "node-a".into()
            })
        );
    }

    #[test]
    fn malformed_messages_are_refused_not_panicked_on() {
        for bad in [
            &b""[..],
            b"c",
            b"c\nfleet\nx\n1\np\n1\n",
            b"c\nfleet\n1\n1\nq\n1\n",
            b"z\n",
            b"c\n\xff\n1\n1\np\n1\n",
        ] {
            assert!(
                Announcement::decode(&Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn health_round_trips(stream in "[a-z~0-9]{1,12}", epoch: u64, node in "[a-z0-9-]{1,12}", failure in proptest::option::of(".*")) {
            let bytes = Announcement::encode_health(&stream, epoch, &node, failure.as_deref().map(str::as_bytes));
            let decoded = Announcement::decode(&Bytes::from(bytes));
            prop_assert_eq!(decoded, Ok(Announcement::Health {
                stream,
                epoch,
                node,
                failure: failure.map(Bytes::from),
            }));
        }

        #[test]
        fn anything_decodes_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Announcement::decode(&Bytes::from(bytes));
        }
    }
}

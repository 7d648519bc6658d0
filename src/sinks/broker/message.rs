//! What a broker receives for a change, and where a stream's line of messages stands. Pure.
//!
//! A message is CloudEvents 1.0 in binary mode: the payload is the change's data (the RFC 6902
//! patch, or the whole document), its attributes travel beside it (NATS headers, Redis entry
//! fields; Kafka record headers would be the same list). Besides the required `ce-id`,
//! `ce-source`, `ce-type` and `ce-specversion` and the optional `ce-time`, patchwire adds the
//! extension attributes a consumer needs to rebuild the document: `ce-stream`, `ce-epoch`,
//! `ce-seq` and, for patches, `ce-baseseq` (the sequence number the patch applies to). They
//! are written by `wire::cloudevents`, as webhook deliveries' CloudEvents are.

use std::time::SystemTime;

use bytes::Bytes;

use crate::hub::{EventId, Stream};
use crate::sinks::webhook::body::{Mode, event_type};
use crate::time::rfc3339;
use crate::wire::{ChangeKind, cloudevents};

/// One message for a broker: a change, or the document at a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The event id, `{stream}:{epoch}:{seq}` (`ce-id`, and JetStream's `Nats-Msg-Id`).
    pub id: String,
    /// Patch or whole document.
    pub kind: ChangeKind,
    /// The stream's name.
    pub stream: String,
    /// The stream's epoch.
    pub epoch: u64,
    /// The change's sequence number.
    pub seq: u64,
    /// For a patch, the sequence number of the document it applies to: `seq - 1` for a
    /// stream; for a view, which changes at some of its stream's sequence numbers only, the
    /// view's previous change.
    pub base_seq: Option<u64>,
    /// The CloudEvents `source`.
    pub source: String,
    /// When the change was published (RFC 3339).
    pub time: String,
    /// The patch or the document, JSON.
    pub payload: Bytes,
    /// A snapshot made to cover a gap (a resync), not one the stream published.
    pub resync: bool,
}

impl Message {
    /// The message for change `seq` of `epoch`, published `at`; a patch applies to the
    /// document at `base` (ignored for a snapshot).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: &str,
        source: &str,
        epoch: u64,
        seq: u64,
        kind: ChangeKind,
        base: u64,
        at: SystemTime,
        payload: Bytes,
        resync: bool,
    ) -> Message {
        Message {
            id: EventId {
                stream: stream.to_owned(),
                epoch,
                seq,
            }
            .to_string(),
            kind,
            stream: stream.to_owned(),
            epoch,
            seq,
            base_seq: match kind {
                ChangeKind::Patch => Some(base),
                ChangeKind::Snapshot => None,
            },
            source: source.to_owned(),
            time: rfc3339(at),
            payload,
            resync,
        }
    }

    /// Its position in the stream.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            seq: self.seq,
        }
    }

    /// The `content-type` of the payload.
    pub fn content_type(&self) -> &'static str {
        cloudevents::content_type(self.kind)
    }

    /// The CloudEvents attributes, as `ce-` headers (binary mode) in a fixed order, then
    /// `content-type` (written by `wire::cloudevents`, as webhook deliveries' are).
    pub fn attributes(&self) -> Vec<(&'static str, String)> {
        cloudevents::Attributes {
            id: &self.id,
            kind_name: event_type(self.kind),
            source: &self.source,
            time: &self.time,
            kind: self.kind,
            stream: &self.stream,
            epoch: self.epoch,
            seq: self.seq,
            base_seq: self.base_seq,
        }
        .headers()
    }

    /// The bytes this message holds while it waits (payload and attributes, roughly).
    pub fn weight(&self) -> usize {
        self.payload.len() + self.id.len() + self.source.len() + self.stream.len() + 128
    }
}

/// Where a stream's line of messages stands: the last message of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Its epoch.
    pub epoch: u64,
    /// Its sequence number.
    pub seq: u64,
}

impl Position {
    /// The position a broker's last message names by its `ce-id`, if it is one of `stream`'s
    /// (anything else on the destination, such as a message another producer wrote, is not).
    pub fn of_id(stream: &str, id: &str) -> Option<Position> {
        let id: EventId = id.parse().ok()?;
        (id.stream == stream).then_some(Position {
            epoch: id.epoch,
            seq: id.seq,
        })
    }

    /// The event id of this position in `stream`.
    pub fn event_id(&self, stream: &str) -> String {
        EventId {
            stream: stream.to_owned(),
            epoch: self.epoch,
            seq: self.seq,
        }
        .to_string()
    }
}

/// What the sink does with one change, given the last message its line holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing: the line already holds it (or a later document).
    Skip,
    /// The change as it is (its patch continues the line, or it is a snapshot).
    Change,
    /// The document after the change, whole: the line does not end right before it (or the
    /// sink publishes snapshots only).
    Document,
}

/// Decides how change `(epoch, seq)`, a patch of the document at `base` when it is one (and
/// known), continues a line ending at `last`: the webhooks' rule
/// ([`plan`](crate::sinks::webhook::body::plan), which a test holds this to) with the base said
/// rather than taken to be `seq - 1`, since a view changes at some of its stream's sequence
/// numbers only. A consumer never sees a patch whose base it lacks.
pub fn next(
    last: Option<Position>,
    epoch: u64,
    seq: u64,
    base: Option<u64>,
    kind: ChangeKind,
    mode: Mode,
) -> Next {
    match last {
        Some(l) if l.epoch == epoch && l.seq >= seq => Next::Skip,
        _ if kind == ChangeKind::Snapshot => Next::Change,
        Some(l) if mode == Mode::Patch && l.epoch == epoch && base == Some(l.seq) => Next::Change,
        _ => Next::Document,
    }
}

/// Whether `message` may follow a line ending at `last` without a gap.
pub fn continues(last: Option<Position>, message: &Message) -> bool {
    match message.kind {
        ChangeKind::Snapshot => true,
        ChangeKind::Patch => {
            last.is_some_and(|l| l.epoch == message.epoch && Some(l.seq) == message.base_seq)
        }
    }
}

/// How far the line ending at `last` is behind `stream`, in sequence numbers (every change of
/// the current epoch when the line is in another one).
pub fn lag(stream: &Stream, last: Option<Position>) -> u64 {
    let (epoch, top) = stream.position();
    match last {
        Some(last) if last.epoch == epoch => top.saturating_sub(last.seq),
        _ => top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(epoch: u64, seq: u64) -> Option<Position> {
        Some(Position { epoch, seq })
    }

    #[test]
    fn messages_carry_cloudevents_attributes() {
        let t = UNIX_EPOCH + Duration::from_millis(1_614_265_330_123);
        let m = Message::new(
            "fleet",
            "/streams/fleet",
            9,
            5,
            ChangeKind::Patch,
            4,
            t,
            Bytes::from_static(b"[]"),
            false,
        );
        assert_eq!(
            m.attributes(),
            vec![
                ("ce-specversion", "1.0".to_owned()),
                ("ce-id", "fleet:9:5".to_owned()),
                ("ce-type", "stream.patch".to_owned()),
                ("ce-source", "/streams/fleet".to_owned()),
                ("ce-time", "2021-02-25T15:02:10.123Z".to_owned()),
                ("ce-stream", "fleet".to_owned()),
                ("ce-epoch", "9".to_owned()),
                ("ce-seq", "5".to_owned()),
                ("ce-baseseq", "4".to_owned()),
                ("content-type", "application/json-patch+json".to_owned()),
            ]
        );
        let s = Message::new(
            "fleet",
            "s",
            9,
            6,
            ChangeKind::Snapshot,
            0,
            t,
            Bytes::new(),
            true,
        );
        assert!(s.attributes().iter().all(|(k, _)| *k != "ce-baseseq"));
        assert_eq!(s.content_type(), "application/json");
        assert_eq!(s.position(), Position { epoch: 9, seq: 6 });
    }

    #[test]
    fn positions_are_read_from_ids_of_the_same_stream() {
        assert_eq!(Position::of_id("fleet", "fleet:9:5"), at(9, 5));
        assert_eq!(Position::of_id("a:b", "a:b:9:5"), at(9, 5));
        assert_eq!(Position::of_id("fleet", "other:9:5"), None);
        assert_eq!(Position::of_id("fleet", "garbage"), None);
        assert_eq!(Position { epoch: 9, seq: 5 }.event_id("fleet"), "fleet:9:5");
    }

    #[test]
    fn a_line_continues_only_from_its_end() {
        use ChangeKind::{Patch, Snapshot};
        let p = Mode::Patch;
        assert_eq!(next(at(7, 4), 7, 5, Some(4), Patch, p), Next::Change);
        assert_eq!(next(at(7, 5), 7, 5, Some(4), Patch, p), Next::Skip);
        assert_eq!(next(at(7, 9), 7, 5, Some(0), Snapshot, p), Next::Skip);
        assert_eq!(next(at(7, 3), 7, 5, Some(4), Patch, p), Next::Document);
        assert_eq!(next(None, 7, 5, Some(4), Patch, p), Next::Document);
        assert_eq!(next(at(6, 40), 7, 5, Some(4), Patch, p), Next::Document);
        assert_eq!(next(at(6, 40), 7, 5, Some(0), Snapshot, p), Next::Change);
        assert_eq!(
            next(at(7, 4), 7, 5, Some(4), Patch, Mode::Snapshot),
            Next::Document
        );
        // A view's patch at 9 applies to its change at 5.
        assert_eq!(next(at(7, 5), 7, 9, Some(5), Patch, p), Next::Change);
        assert_eq!(next(at(7, 8), 7, 9, Some(5), Patch, p), Next::Document);
    }

    proptest! {
        /// Whatever the line holds, a message planned after it continues it: patches only ever
        /// follow their base.
        #[test]
        fn planned_messages_continue_the_line(
            last in proptest::option::of((0u64..3, 0u64..8)),
            epoch in 0u64..3,
            seq in 1u64..10,
            patch in any::<bool>(),
            snapshots in any::<bool>(),
            gap in 1u64..4,
        ) {
            let base = seq.saturating_sub(gap);
            let last = last.map(|(epoch, seq)| Position { epoch, seq });
            let kind = if patch { ChangeKind::Patch } else { ChangeKind::Snapshot };
            let mode = if snapshots { Mode::Snapshot } else { Mode::Patch };
            let t = UNIX_EPOCH;
            let message = match next(last, epoch, seq, Some(base), kind, mode) {
                Next::Skip => {
                    prop_assert!(last.is_some_and(|l| l.epoch == epoch && l.seq >= seq));
                    return Ok(());
                }
                Next::Change => Message::new("s", "s", epoch, seq, kind, base, t, Bytes::new(), false),
                Next::Document => Message::new("s", "s", epoch, seq, ChangeKind::Snapshot, 0, t, Bytes::new(), true),
            };
            prop_assert!(continues(last, &message));
            prop_assert!(!(snapshots && message.kind == ChangeKind::Patch));
        }

        /// For a stream (every patch applies to `seq - 1`) the rule is the webhooks' own.
        #[test]
        fn a_streams_line_follows_the_webhooks_plan(
            last in proptest::option::of((0u64..3, 0u64..8)),
            epoch in 0u64..3,
            seq in 1u64..10,
            patch in any::<bool>(),
            snapshots in any::<bool>(),
        ) {
            use crate::sinks::webhook::body::{Cursor, Plan, plan};
            let kind = if patch { ChangeKind::Patch } else { ChangeKind::Snapshot };
            let mode = if snapshots { Mode::Snapshot } else { Mode::Patch };
            let cursor = last.map(|(epoch, seq)| Cursor { epoch, seq });
            let expected = match plan(cursor, epoch, seq, patch, mode) {
                Plan::Skip => Next::Skip,
                Plan::Patch { .. } => Next::Change,
                Plan::Snapshot if !patch => Next::Change,
                Plan::Snapshot => Next::Document,
            };
            let last = last.map(|(epoch, seq)| Position { epoch, seq });
            prop_assert_eq!(next(last, epoch, seq, Some(seq - 1), kind, mode), expected);
        }
    }
}

//! What a delivery carries, and whether an endpoint gets a change as a patch or a snapshot.
//! Pure functions: the body is built once when a change is accepted and stored as bytes, so
//! every retry sends (and signs) exactly the same body.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::hub::EventId;
use crate::schemas;
use crate::time::rfc3339;
use crate::wire::{ChangeKind, cloudevents};

/// How an endpoint receives a stream's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every change as an RFC 6902 patch (a snapshot first, and after any gap).
    Patch,
    /// The whole document on every change.
    Snapshot,
}

impl Mode {
    /// `"patch"` or `"snapshot"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Patch => "patch",
            Mode::Snapshot => "snapshot",
        }
    }

    /// Parses `"patch"` or `"snapshot"`.
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "patch" => Some(Mode::Patch),
            "snapshot" => Some(Mode::Snapshot),
            _ => None,
        }
    }
}

/// What an endpoint receives of a stream, by the kind of delivery (`events = ["snapshots",
/// "patches"]`, the default; `"errors"` and `"recoveries"` add the stream's upstream failures
/// and recoveries).
///
/// Only change kinds a receiver can rebuild the document from are valid: `snapshots` alone
/// sends every change as the whole document (as `mode = "snapshot"` does, whatever the mode);
/// both send what the mode says; neither sends no changes at all (an endpoint that only
/// watches the upstream: `["errors", "recoveries"]`). `patches` without `snapshots` is
/// refused: a patch applies only to the document it follows, which a receiver gets as a
/// snapshot first and after any gap (a dead delivery, a collapsed backlog, a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    /// `stream.snapshot` deliveries.
    pub snapshots: bool,
    /// `stream.patch` deliveries.
    pub patches: bool,
    /// `stream.error` deliveries: the upstream started failing.
    pub errors: bool,
    /// `stream.recovered` deliveries: the upstream answers again after failing.
    pub recoveries: bool,
}

/// The names `events` accepts, in the order they are shown.
pub const EVENT_NAMES: [&str; 4] = ["snapshots", "patches", "errors", "recoveries"];

impl Default for Events {
    fn default() -> Self {
        Events {
            snapshots: true,
            patches: true,
            errors: false,
            recoveries: false,
        }
    }
}

/// Why an `events` list is refused; `at` is the index of the entry at fault, if one is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsError {
    /// The entry at fault (`None`: the whole list).
    pub at: Option<usize>,
    /// What was expected.
    pub message: String,
}

impl Events {
    /// Parses a list of names from [`EVENT_NAMES`]: at least one, each once, and `patches`
    /// only with `snapshots`.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Events, EventsError> {
        let mut events = Events {
            snapshots: false,
            patches: false,
            errors: false,
            recoveries: false,
        };
        for (i, name) in names.iter().enumerate() {
            let name = name.as_ref();
            let slot = match name {
                "snapshots" => &mut events.snapshots,
                "patches" => &mut events.patches,
                "errors" => &mut events.errors,
                "recoveries" => &mut events.recoveries,
                _ => {
                    return Err(EventsError {
                        at: Some(i),
                        message: format!(
                            "expected one of {}, got {name:?}",
                            EVENT_NAMES.map(|n| format!("{n:?}")).join(", ")
                        ),
                    });
                }
            };
            if *slot {
                return Err(EventsError {
                    at: Some(i),
                    message: format!("{name:?} is listed twice; name each kind once"),
                });
            }
            *slot = true;
        }
        if names.is_empty() {
            return Err(EventsError {
                at: None,
                message: format!(
                    "expected at least one of {}",
                    EVENT_NAMES.map(|n| format!("{n:?}")).join(", ")
                ),
            });
        }
        if events.patches && !events.snapshots {
            return Err(EventsError {
                at: None,
                message: "expected \"snapshots\" with \"patches\": a receiver can apply a patch \
                          only to the document it follows, which it gets as a snapshot first \
                          and after any gap; for whole documents only, list \"snapshots\" alone"
                    .into(),
            });
        }
        Ok(events)
    }

    /// The names of the kinds received, in [`EVENT_NAMES`] order.
    pub fn names(self) -> Vec<&'static str> {
        let mut names = Vec::new();
        for (on, name) in [
            (self.snapshots, "snapshots"),
            (self.patches, "patches"),
            (self.errors, "errors"),
            (self.recoveries, "recoveries"),
        ] {
            if on {
                names.push(name);
            }
        }
        names
    }

    /// Whether these are the default kinds (stored definitions leave them out then).
    pub fn is_default(&self) -> bool {
        *self == Events::default()
    }

    /// Whether the stream's changes are delivered at all (`snapshots` listed).
    pub fn changes(self) -> bool {
        self.snapshots
    }

    /// Whether deliveries of `kind` are made.
    pub fn wants(self, kind: NoticeKind) -> bool {
        match kind {
            NoticeKind::Error => self.errors,
            NoticeKind::Recovery => self.recoveries,
        }
    }

    /// How an endpoint with `mode` receives changes under these kinds: without patches,
    /// every change whole.
    pub fn mode(self, mode: Mode) -> Mode {
        if self.patches { mode } else { Mode::Snapshot }
    }
}

impl Serialize for Events {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.names())
    }
}

impl<'de> Deserialize<'de> for Events {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(deserializer)?;
        Events::parse(&names).map_err(|e| serde::de::Error::custom(e.message))
    }
}

/// A delivery that is not a change: what happened to the stream's upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    /// `stream.error`: the upstream started failing (the last good document stays current).
    Error,
    /// `stream.recovered`: the upstream answers again after failing.
    Recovery,
}

/// What a delivery carries: a change (patch or snapshot) or a notice (error or recovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryKind {
    /// A change.
    Change(ChangeKind),
    /// Not a change.
    Notice(NoticeKind),
}

impl DeliveryKind {
    /// An RFC 6902 patch.
    pub const PATCH: DeliveryKind = DeliveryKind::Change(ChangeKind::Patch);
    /// The whole document.
    pub const SNAPSHOT: DeliveryKind = DeliveryKind::Change(ChangeKind::Snapshot);
    /// The upstream started failing.
    pub const ERROR: DeliveryKind = DeliveryKind::Notice(NoticeKind::Error);
    /// The upstream recovered.
    pub const RECOVERY: DeliveryKind = DeliveryKind::Notice(NoticeKind::Recovery);

    /// Its webhook event type (the body's `type`, a CloudEvent's `type`).
    pub fn event_type(self) -> &'static str {
        match self {
            DeliveryKind::Change(kind) => event_type(kind),
            DeliveryKind::Notice(NoticeKind::Error) => "stream.error",
            DeliveryKind::Notice(NoticeKind::Recovery) => "stream.recovered",
        }
    }

    /// The kind a webhook event type names.
    pub fn of_event_type(name: &str) -> Option<DeliveryKind> {
        match name {
            "stream.patch" => Some(DeliveryKind::PATCH),
            "stream.snapshot" => Some(DeliveryKind::SNAPSHOT),
            "stream.error" => Some(DeliveryKind::ERROR),
            "stream.recovered" => Some(DeliveryKind::RECOVERY),
            _ => None,
        }
    }
}

impl From<ChangeKind> for DeliveryKind {
    fn from(kind: ChangeKind) -> Self {
        DeliveryKind::Change(kind)
    }
}

/// A delivery's `type`, its webhook event type: `stream.patch` (`data` is a patch from the
/// document at `base_seq`) or `stream.snapshot` (`data` is the whole document at `seq`); see
/// [`DeliveryKind::event_type`] for the notices.
pub fn event_type(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Patch => "stream.patch",
        ChangeKind::Snapshot => "stream.snapshot",
    }
}

/// The last change accepted for one (endpoint, stream) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The stream's epoch (a new process starts a new epoch).
    pub epoch: u64,
    /// The sequence number within the epoch.
    pub seq: u64,
}

/// What an endpoint gets for one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: the endpoint already has this change or a later document (a resync snapshot
    /// was taken after it was published).
    Skip,
    /// The change's patch; the endpoint's queue ends at `base_seq`.
    Patch {
        /// The sequence number the patch applies to.
        base_seq: u64,
    },
    /// The whole document: the endpoint wants snapshots, or its queue does not end right
    /// before this change (first delivery, new epoch, a gap after a dead delivery or a lag).
    Snapshot,
}

/// Decides how the change `(epoch, seq)` reaches an endpoint whose queue ends at `cursor`.
/// `is_patch` is false when the hub itself published a snapshot (first document, root type
/// change, or a patch larger than the document).
pub fn plan(cursor: Option<Cursor>, epoch: u64, seq: u64, is_patch: bool, mode: Mode) -> Plan {
    plan_after(cursor, epoch, seq, seq.saturating_sub(1), is_patch, mode)
}

/// [`plan`] for a change whose patch applies to the document at `base` (`seq - 1` for a
/// stream; for a view, which changes at some of its source's sequence numbers only, the
/// view's previous change).
pub fn plan_after(
    cursor: Option<Cursor>,
    epoch: u64,
    seq: u64,
    base: u64,
    is_patch: bool,
    mode: Mode,
) -> Plan {
    match cursor {
        Some(c) if c.epoch == epoch && c.seq >= seq => Plan::Skip,
        Some(c) if mode == Mode::Patch && is_patch && c.epoch == epoch && c.seq == base => {
            Plan::Patch { base_seq: c.seq }
        }
        _ => Plan::Snapshot,
    }
}

/// The JSON body of a delivery.
#[derive(Debug, Serialize)]
struct BodyJson<'a> {
    /// The envelope's name and major version (`schemas::WEBHOOK`).
    schema: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    stream: &'a str,
    epoch: u64,
    seq: u64,
    base_seq: Option<u64>,
    timestamp: String,
    data: &'a RawValue,
}

/// Why a body could not be built.
#[derive(Debug, thiserror::Error)]
#[error("the change's data is not valid JSON: {0}")]
pub struct BodyError(#[from] serde_json::Error);

/// Encodes `{"schema", "type", "stream", "epoch", "seq", "base_seq", "timestamp", "data"}`
/// (`schema` is `patchwire.webhook.v1`, [`schemas::WEBHOOK`]); `data` is
/// already-serialized JSON (a patch or a document), embedded without re-parsing its values.
pub fn encode(
    kind: ChangeKind,
    stream: &str,
    epoch: u64,
    seq: u64,
    base_seq: Option<u64>,
    at: SystemTime,
    data: &[u8],
) -> Result<Vec<u8>, BodyError> {
    let text = std::str::from_utf8(data).map_err(|_| {
        BodyError(<serde_json::Error as serde::de::Error>::custom(
            "data is not UTF-8",
        ))
    })?;
    let raw: &RawValue = serde_json::from_str(text)?;
    let body = BodyJson {
        schema: schemas::WEBHOOK,
        kind: event_type(kind),
        stream,
        epoch,
        seq,
        base_seq: match kind {
            ChangeKind::Patch => base_seq,
            ChangeKind::Snapshot => None,
        },
        timestamp: rfc3339(at),
        data: raw,
    };
    Ok(serde_json::to_vec(&body)?)
}

/// The `data` of a `stream.error` delivery: the failure as the SSE `error` event tells it
/// (`status`, `cause`, `message`), when (`timestamp`, and `since`: the first failure of the
/// run), when the next poll is due (`retry_in_ms`) and the stream's last good event
/// (`last_event_id`, `null` before its first document).
#[allow(clippy::too_many_arguments)]
pub fn error_data(
    stream: &str,
    epoch: u64,
    seq: u64,
    status: u16,
    cause: &str,
    message: &str,
    at: SystemTime,
    since: SystemTime,
    retry_in_ms: u64,
) -> serde_json::Value {
    serde_json::json!({
        "status": status,
        "cause": cause,
        "message": message,
        "timestamp": rfc3339(at),
        "since": rfc3339(since),
        "retry_in_ms": retry_in_ms,
        "last_event_id": last_event_id(stream, epoch, seq),
    })
}

/// The `data` of a `stream.recovered` delivery: when the failures began (`since`), how many
/// polls failed (`failures`), when the upstream answered again (`timestamp`), and the event
/// the stream recovered at (`last_event_id`: its document then, which the next change, if
/// any, follows on the same queue).
pub fn recovery_data(
    stream: &str,
    epoch: u64,
    seq: u64,
    since: SystemTime,
    failures: u32,
    at: SystemTime,
) -> serde_json::Value {
    serde_json::json!({
        "since": rfc3339(since),
        "failures": failures,
        "timestamp": rfc3339(at),
        "last_event_id": last_event_id(stream, epoch, seq),
    })
}

/// `{stream}:{epoch}:{seq}`, or `null` before the stream's first document.
fn last_event_id(stream: &str, epoch: u64, seq: u64) -> serde_json::Value {
    if seq == 0 {
        return serde_json::Value::Null;
    }
    EventId {
        stream: stream.to_owned(),
        epoch,
        seq,
    }
    .to_string()
    .into()
}

/// Encodes a notice under the same envelope as a change (`base_seq` always `null`; `epoch`
/// and `seq` name the stream's last good document, `seq` 0 before the first one).
pub fn encode_notice(
    kind: NoticeKind,
    stream: &str,
    epoch: u64,
    seq: u64,
    at: SystemTime,
    data: &serde_json::Value,
) -> Vec<u8> {
    let body = serde_json::json!({
        "schema": schemas::WEBHOOK,
        "type": DeliveryKind::Notice(kind).event_type(),
        "stream": stream,
        "epoch": epoch,
        "seq": seq,
        "base_seq": null,
        "timestamp": rfc3339(at),
        "data": data,
    });
    // A JSON value of strings and numbers: serializing cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// How an endpoint's deliveries are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The JSON body (`patchwire.webhook.v1`), `application/json`.
    #[default]
    Json,
    /// A CloudEvent 1.0 in structured mode: `application/cloudevents+json`, the change's
    /// `data` under `data`.
    Cloudevents,
    /// A CloudEvent 1.0 in binary mode: the attributes as `ce-` headers, the body the change's
    /// `data` alone (`application/json-patch+json` or `application/json`).
    CloudeventsBinary,
}

impl Format {
    /// `"json"`, `"cloudevents"` or `"cloudevents-binary"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cloudevents => "cloudevents",
            Format::CloudeventsBinary => "cloudevents-binary",
        }
    }
}

/// A delivery as sent to an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Its `content-type`.
    pub content_type: &'static str,
    /// Headers besides it (the `ce-` attributes in binary mode).
    pub headers: Vec<(&'static str, String)>,
    /// The bytes sent (and signed).
    pub body: bytes::Bytes,
}

/// What [`render`] reads back of a stored body.
#[derive(Debug, Deserialize)]
struct Stored<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    stream: std::borrow::Cow<'a, str>,
    epoch: u64,
    seq: u64,
    base_seq: Option<u64>,
    timestamp: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// A stored delivery body (what [`encode`] wrote) as `format` sends it: as it is, or as a
/// CloudEvent whose `id` is the event id, `source` `/streams/{stream}`, `type` the body's
/// `type`, `time` its `timestamp`, and whose data is the body's `data`. The same stored
/// bytes always render to the same bytes, so every retry sends (and signs) the same request.
pub fn render(format: Format, stored: &bytes::Bytes) -> Result<Rendered, BodyError> {
    if format == Format::Json {
        return Ok(Rendered {
            content_type: "application/json",
            headers: Vec::new(),
            body: stored.clone(),
        });
    }
    let body: Stored<'_> = serde_json::from_slice(stored)?;
    let delivery_kind = DeliveryKind::of_event_type(body.kind).unwrap_or(DeliveryKind::SNAPSHOT);
    let mut id = EventId {
        stream: body.stream.to_string(),
        epoch: body.epoch,
        seq: body.seq,
    }
    .to_string();
    // A change's id is its event id; a notice names the last good event, which a change
    // already has as its id: it gets its own (CloudEvents ids are unique per source).
    let kind = match delivery_kind {
        DeliveryKind::Change(kind) => kind,
        DeliveryKind::Notice(_) => {
            id = format!("{id}/{}/{}", delivery_kind.event_type(), body.timestamp);
            ChangeKind::Snapshot
        }
    };
    let source = format!("/streams/{}", body.stream);
    let attributes = cloudevents::Attributes {
        id: &id,
        kind_name: delivery_kind.event_type(),
        source: &source,
        time: body.timestamp,
        kind,
        stream: &body.stream,
        epoch: body.epoch,
        seq: body.seq,
        base_seq: body.base_seq,
    };
    let data = body.data.get().as_bytes();
    Ok(match format {
        Format::Cloudevents => Rendered {
            content_type: cloudevents::STRUCTURED_CONTENT_TYPE,
            headers: Vec::new(),
            body: attributes.structured(data).into(),
        },
        _ => {
            let mut headers = attributes.headers();
            headers.retain(|(name, _)| *name != "content-type");
            Rendered {
                content_type: cloudevents::content_type(kind),
                headers,
                body: bytes::Bytes::copy_from_slice(data),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};
    use std::time::{Duration, UNIX_EPOCH};

    const P: Mode = Mode::Patch;

    #[test]
    fn events_accept_the_rebuildable_combinations() {
        assert_eq!(
            Events::parse(&["snapshots", "patches"]),
            Ok(Events::default())
        );
        assert_eq!(
            Events::parse(&["patches", "snapshots"]),
            Ok(Events::default())
        );
        let snapshots = Events::parse(&["snapshots"]).unwrap();
        assert_eq!(snapshots.names(), vec!["snapshots"]);
        assert_eq!(snapshots.mode(Mode::Patch), Mode::Snapshot);
        assert_eq!(Events::default().mode(Mode::Patch), Mode::Patch);
        assert_eq!(Events::default().mode(Mode::Snapshot), Mode::Snapshot);
    }

    #[test]
    fn events_refuse_what_a_receiver_cannot_rebuild_from() {
        let unknown = Events::parse(&["snapshots", "error"]).unwrap_err();
        assert_eq!(unknown.at, Some(1));
        assert!(
            unknown
                .message
                .contains("\"snapshots\", \"patches\", \"errors\", \"recoveries\""),
            "{unknown:?}"
        );
        let patches = Events::parse(&["patches", "errors"]).unwrap_err();
        assert_eq!(patches.at, None);
        assert_eq!(
            Events::parse(&["snapshots", "snapshots"]).unwrap_err().at,
            Some(1)
        );
        let empty: [&str; 0] = [];
        assert_eq!(Events::parse(&empty).unwrap_err().at, None);
        let patches = Events::parse(&["patches"]).unwrap_err();
        assert!(
            patches.message.contains("\"snapshots\" with \"patches\""),
            "{patches:?}"
        );
    }

    #[test]
    fn errors_and_recoveries_come_with_the_changes_or_alone() {
        let all = Events::parse(&["snapshots", "patches", "errors", "recoveries"]).unwrap();
        assert!(all.changes() && all.wants(NoticeKind::Error) && all.wants(NoticeKind::Recovery));
        assert!(!Events::default().wants(NoticeKind::Error));
        assert!(!Events::default().wants(NoticeKind::Recovery));
        let watching = Events::parse(&["errors", "recoveries"]).unwrap();
        assert!(!watching.changes());
        assert_eq!(watching.names(), vec!["errors", "recoveries"]);
        let json = serde_json::to_string(&watching).unwrap();
        assert_eq!(serde_json::from_str::<Events>(&json).unwrap(), watching);
    }

    #[test]
    fn notices_carry_the_failure_and_the_last_good_event() {
        let t = UNIX_EPOCH + Duration::from_millis(1_614_265_330_123);
        let since = UNIX_EPOCH + Duration::from_millis(1_614_265_320_000);
        let data = error_data(
            "fleet",
            9,
            5,
            502,
            "status",
            "the upstream answered 502",
            t,
            since,
            2000,
        );
        let body = encode_notice(NoticeKind::Error, "fleet", 9, 5, t, &data);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"schema": "patchwire.webhook.v1", "type": "stream.error", "stream": "fleet",
                   "epoch": 9, "seq": 5, "base_seq": null, "timestamp": "2021-02-25T15:02:10.123Z",
                   "data": {"status": 502, "cause": "status", "message": "the upstream answered 502",
                            "timestamp": "2021-02-25T15:02:10.123Z",
                            "since": "2021-02-25T15:02:00.000Z", "retry_in_ms": 2000,
                            "last_event_id": "fleet:9:5"}})
        );
        // Before the first document there is no last good event.
        let data = recovery_data("fleet", 9, 0, since, 3, t);
        assert_eq!(data["last_event_id"], Value::Null);
        assert_eq!(data["failures"], 3);
        let body = bytes::Bytes::from(encode_notice(NoticeKind::Recovery, "fleet", 9, 0, t, &data));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "stream.recovered");
        // As CloudEvents: their own type, an id of their own, JSON data.
        let structured = render(Format::Cloudevents, &body).unwrap();
        let event: Value = serde_json::from_slice(&structured.body).unwrap();
        assert_eq!(event["type"], "stream.recovered");
        assert_eq!(
            event["id"],
            "fleet:9:0/stream.recovered/2021-02-25T15:02:10.123Z"
        );
        assert_eq!(event["datacontenttype"], "application/json");
        assert_eq!(event["data"]["failures"], 3);
        let binary = render(Format::CloudeventsBinary, &body).unwrap();
        assert!(
            binary
                .headers
                .contains(&("ce-type", "stream.recovered".to_owned()))
        );
        assert_eq!(binary.content_type, "application/json");
    }

    #[test]
    fn events_round_trip_as_a_list_of_names() {
        let json = serde_json::to_string(&Events::parse(&["snapshots"]).unwrap()).unwrap();
        assert_eq!(json, r#"["snapshots"]"#);
        assert_eq!(
            serde_json::from_str::<Events>(r#"["snapshots","patches"]"#).unwrap(),
            Events::default()
        );
        assert!(serde_json::from_str::<Events>(r#"["patch"]"#).is_err());
    }

    const S: Mode = Mode::Snapshot;

    fn at(epoch: u64, seq: u64) -> Option<Cursor> {
        Some(Cursor { epoch, seq })
    }

    #[test]
    fn patches_only_continue_an_unbroken_queue() {
        assert_eq!(plan(at(7, 4), 7, 5, true, P), Plan::Patch { base_seq: 4 });
        // First delivery, another epoch, a gap: the document.
        assert_eq!(plan(None, 7, 5, true, P), Plan::Snapshot);
        assert_eq!(plan(at(6, 4), 7, 5, true, P), Plan::Snapshot);
        assert_eq!(plan(at(7, 3), 7, 5, true, P), Plan::Snapshot);
        // The hub published a snapshot, or the endpoint wants snapshots.
        assert_eq!(plan(at(7, 4), 7, 5, false, P), Plan::Snapshot);
        assert_eq!(plan(at(7, 4), 7, 5, true, S), Plan::Snapshot);
        // Already covered by a resync snapshot taken later.
        assert_eq!(plan(at(7, 5), 7, 5, true, P), Plan::Skip);
        assert_eq!(plan(at(7, 9), 7, 5, true, S), Plan::Skip);
    }

    #[test]
    fn bodies_carry_the_documented_fields() {
        let t = UNIX_EPOCH + Duration::from_millis(1_614_265_330_123);
        let body = encode(
            ChangeKind::Patch,
            "fleet",
            9,
            5,
            Some(4),
            t,
            br#"[{"op":"remove","path":"/a"}]"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"schema": "patchwire.webhook.v1", "type": "stream.patch", "stream": "fleet",
                   "epoch": 9, "seq": 5, "base_seq": 4,
                   "timestamp": "2021-02-25T15:02:10.123Z", "data": [{"op": "remove", "path": "/a"}]})
        );
        let body = encode(
            ChangeKind::Snapshot,
            "fleet",
            9,
            6,
            Some(5),
            t,
            br#"{"a":1}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "stream.snapshot");
        assert_eq!(v["base_seq"], Value::Null);
        assert_eq!(v["data"], json!({"a": 1}));
        assert!(encode(ChangeKind::Snapshot, "s", 1, 1, None, t, b"{nope").is_err());
        assert!(encode(ChangeKind::Snapshot, "s", 1, 1, None, t, b"\xff").is_err());
    }

    #[test]
    fn bodies_render_as_json_or_cloudevents() {
        let t = UNIX_EPOCH + Duration::from_millis(1_614_265_330_123);
        let stored = bytes::Bytes::from(
            encode(
                ChangeKind::Patch,
                "fleet",
                9,
                5,
                Some(4),
                t,
                br#"[{"op":"remove","path":"/a"}]"#,
            )
            .unwrap(),
        );
        let json = render(Format::Json, &stored).unwrap();
        assert_eq!(
            (json.content_type, &json.body),
            ("application/json", &stored)
        );
        let structured = render(Format::Cloudevents, &stored).unwrap();
        assert_eq!(structured.content_type, "application/cloudevents+json");
        let event: Value = serde_json::from_slice(&structured.body).unwrap();
        assert_eq!(
            event,
            json!({"specversion": "1.0", "id": "fleet:9:5", "type": "stream.patch",
                   "source": "/streams/fleet", "time": "2021-02-25T15:02:10.123Z",
                   "stream": "fleet", "epoch": "9", "seq": "5", "baseseq": "4",
                   "datacontenttype": "application/json-patch+json",
                   "data": [{"op": "remove", "path": "/a"}]})
        );
        let binary = render(Format::CloudeventsBinary, &stored).unwrap();
        assert_eq!(binary.content_type, "application/json-patch+json");
        assert_eq!(&binary.body[..], br#"[{"op":"remove","path":"/a"}]"#);
        assert!(binary.headers.contains(&("ce-id", "fleet:9:5".to_owned())));
        assert!(
            binary
                .headers
                .iter()
                .all(|(name, _)| name.starts_with("ce-"))
        );
        // Rendering is a function of the stored bytes: every retry sends the same request.
        assert_eq!(render(Format::Cloudevents, &stored).unwrap(), structured);
        assert!(render(Format::Cloudevents, &bytes::Bytes::from_static(b"{}")).is_err());
    }

    proptest! {
        /// Whatever the cursor, a patch is planned only for the very next change in the same
        /// epoch, in patch mode, for a change the hub published as a patch.
        #[test]
        fn plan_never_breaks_the_chain(
            cursor in proptest::option::of((0u64..4, 0u64..10)),
            epoch in 0u64..4,
            seq in 1u64..12,
            is_patch in any::<bool>(),
            snapshot_mode in any::<bool>(),
        ) {
            let cursor = cursor.map(|(epoch, seq)| Cursor { epoch, seq });
            let mode = if snapshot_mode { S } else { P };
            match plan(cursor, epoch, seq, is_patch, mode) {
                Plan::Patch { base_seq } => {
                    prop_assert!(is_patch && !snapshot_mode);
                    prop_assert_eq!(cursor, Some(Cursor { epoch, seq: seq - 1 }));
                    prop_assert_eq!(base_seq, seq - 1);
                }
                Plan::Skip => prop_assert!(cursor.is_some_and(|c| c.epoch == epoch && c.seq >= seq)),
                Plan::Snapshot => {}
            }
        }
    }
}

//! The webhook outbox: durable endpoints, deliveries and per-(endpoint, stream) cursors, and
//! the current document of each push stream (stored in the same transactions as its changes'
//! deliveries, so a restart continues the stream in the epoch the endpoints' cursors hold).
//!
//! [`Outbox`] is the trait the dispatcher, the worker and the endpoint management use, and the
//! app reads push documents through at startup; [`sqlite::SqliteOutbox`] is the embedded
//! default (SQLite in WAL mode on a dedicated thread). Another store (PostgreSQL for a
//! cluster) is another file beside it implementing the same trait: nothing here names SQLite.
//! The outbox sits below the rest of the sink: it uses only the pure [`super::body`] (the plan
//! over a cursor, the bodies), [`super::sign`] (message ids) and the wire layer's
//! [`ChangeKind`].
//!
//! Invariants every implementation keeps:
//! - Accepting a change for its endpoints is atomic: every endpoint gets its delivery, or none.
//! - A delivery is pending until a receiver answered 2xx (`Delivered`), its schedule ran out
//!   (`Dead`), or a later snapshot made it pointless (`Superseded`); pending rows survive
//!   restarts, so every accepted change is delivered at least once.
//! - Per (endpoint, stream), deliveries are sent oldest first ([`Outbox::due`] returns only the
//!   oldest pending delivery of each pair), and a patch is only queued right after the delivery
//!   holding its base (see [`super::body::plan`]).
//! - Notices (a stream's upstream failing, recovering: [`Outbox::notice`]) share their pair's
//!   queue with its changes but are not changes: they move no cursor, a dead delivery's gap or
//!   a collapsed backlog supersedes only changes, and a dead notice leaves no gap.
//! - Operational events are stored once per key, in the transaction of what causes them, and
//!   handed out one at a time, oldest first ([`Outbox::operator_head`]).

pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::sinks::webhook::body::{
    self, BodyError, Cursor, DeliveryKind, Events, Format, Mode, NoticeKind, Plan,
};
use crate::wire::ChangeKind;

/// A boxed future of an outbox operation (the trait stays object-safe).
pub type OutboxFuture<T> = Pin<Box<dyn Future<Output = Result<T, OutboxError>> + Send>>;

/// Why an outbox operation failed. Every variant means "not done": the caller retries later
/// (storage) or stops (closed).
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The database could not be opened or prepared.
    #[error("cannot open the webhook outbox database {path}: {message}")]
    Open {
        /// The database file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A read or write failed (disk full, I/O error, corruption); nothing was changed.
    #[error("webhook outbox storage failed: {0}")]
    Storage(String),
    /// The outbox thread has stopped.
    #[error("the webhook outbox has stopped")]
    Closed,
    /// A newer dispatcher of the stream has written to the outbox (its lease passed to
    /// another node): this one must stop, nothing was written.
    #[error("another node now dispatches the stream's webhooks")]
    Fenced,
}

impl From<BodyError> for OutboxError {
    fn from(error: BodyError) -> Self {
        OutboxError::Storage(format!("cannot build a delivery body: {error}"))
    }
}

/// Where an endpoint was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `[[webhooks.endpoints]]` in the configuration: its definition is refreshed at startup.
    Config,
    /// Created through the admin API.
    Api,
}

/// An endpoint's definition, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Unique id: the configured id, or `ep_...` for endpoints created through the API.
    pub id: String,
    /// The target URL (http or https).
    pub url: String,
    /// The streams it receives.
    pub streams: Vec<String>,
    /// Patches or whole documents.
    pub mode: Mode,
    /// How deliveries are written (JSON or CloudEvents); absent in definitions stored before
    /// it existed, which are JSON.
    #[serde(default)]
    pub format: Format,
    /// Extra headers sent with every delivery.
    pub headers: BTreeMap<String, String>,
    /// The signing secret, `whsec_...`.
    pub secret: String,
    /// The secret before the last rotation, still signed with until `previous_expires_ms`.
    pub previous_secret: Option<String>,
    /// When the previous secret stops being used (Unix milliseconds).
    pub previous_expires_ms: Option<u64>,
    /// Config or API.
    pub source: Source,
    /// When it was created (Unix milliseconds).
    pub created_ms: u64,
    /// What it is for, for people (shown in the admin API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Free-form labels, for the people and tools managing it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Most attempts started per second (besides `Retry-After` and the concurrency limit);
    /// `None`: no such limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Which kinds of change it receives (left out when the default, both).
    #[serde(default, skip_serializing_if = "Events::is_default")]
    pub events: Events,
    /// The hash of the request that created it with an `Idempotency-Key` (its id is derived
    /// from the key), so a retry with another request is told apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_hash: Option<String>,
    /// For each ad hoc view among `streams` (`{stream}@~…`), its filter as written
    /// (`route=R1`): an ad hoc view's id cannot be turned back into its filter, and the view
    /// is followed again from it after a restart (stored in the definition's JSON, so older
    /// definitions read as none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub view_filters: BTreeMap<String, String>,
}

/// What [`Outbox::create_endpoint`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The endpoint is new; its status.
    New(EndpointStatus),
    /// An endpoint with that id exists already (unchanged): it, and its status.
    Existing(Box<EndpointRecord>, EndpointStatus),
}

/// Why and since when an endpoint receives nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disabled {
    /// When it was disabled (Unix milliseconds).
    pub at_ms: u64,
    /// Why, for the admin API.
    pub reason: String,
}

/// An endpoint's runtime status, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStatus {
    /// Set while the endpoint is disabled.
    pub disabled: Option<Disabled>,
    /// Since when every attempt has failed (cleared by a success).
    pub failing_since_ms: Option<u64>,
    /// Where this status stands in the order of the outbox's writes: a status read after a
    /// later write has a higher revision. Whoever keeps a copy (the registry) keeps the one
    /// with the highest, so a stale copy never overwrites a newer one.
    pub revision: u64,
}

/// The state of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its first or next attempt.
    Pending,
    /// A receiver answered 2xx.
    Delivered,
    /// Its retry schedule ran out (a dead letter).
    Dead,
    /// Replaced by a later snapshot before it was delivered (a backlog collapse or a gap).
    Superseded,
}

impl DeliveryState {
    /// The state's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
            DeliveryState::Superseded => "superseded",
        }
    }

    /// Parses a state's name.
    pub fn parse(text: &str) -> Option<DeliveryState> {
        match text {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "dead" => Some(DeliveryState::Dead),
            "superseded" => Some(DeliveryState::Superseded),
            _ => None,
        }
    }
}

/// One delivery: a message to one endpoint, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Row id: orders deliveries.
    pub id: i64,
    /// The endpoint.
    pub endpoint: String,
    /// The stream.
    pub stream: String,
    /// `webhook-id`: the same for every attempt and every replay of this message.
    pub msg_id: String,
    /// Patch or snapshot, error or recovery.
    pub kind: DeliveryKind,
    /// The stream's epoch.
    pub epoch: u64,
    /// The change's sequence number (for a notice, the stream's last good document's).
    pub seq: u64,
    /// For patches, the sequence number they apply to.
    pub base_seq: Option<u64>,
    /// The exact JSON body sent (and signed) on every attempt; empty in listings.
    pub body: Bytes,
    /// Its state.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (Unix milliseconds).
    pub next_attempt_ms: u64,
    /// The last attempt's error, if it failed.
    pub last_error: Option<String>,
    /// The last attempt's HTTP status, if the receiver answered.
    pub last_status: Option<u16>,
    /// When the delivery was queued (Unix milliseconds).
    pub created_ms: u64,
    /// When it was delivered, dead-lettered or superseded (Unix milliseconds).
    pub finished_ms: Option<u64>,
}

/// A change to queue for endpoints (a published change, or a resync of the current document).
#[derive(Debug, Clone)]
pub struct NewChange {
    /// The stream.
    pub stream: Arc<str>,
    /// The stream's epoch.
    pub epoch: u64,
    /// The change's sequence number.
    pub seq: u64,
    /// The sequence number `patch` applies to, when it is not `seq - 1`: a view's changes are
    /// sparse (it changes at some of its source's sequence numbers only), so its patch follows
    /// the view's previous change. `None`: `seq - 1`.
    pub base: Option<u64>,
    /// The RFC 6902 patch from `base`, when the hub published a patch; `None` for a
    /// snapshot (or a resync), which every endpoint gets as a document.
    pub patch: Option<Bytes>,
    /// The whole document at `seq`; `None` for a patch replayed from history (history keeps
    /// no documents). A target that would need the document then gets nothing for this
    /// change and its cursor is forgotten ([`Accepted::owed`]): the dispatcher queues the
    /// current document for it afterwards.
    pub document: Option<Bytes>,
    /// When the change was published.
    pub at: SystemTime,
}

/// A push stream's current document, as stored so a restart continues the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    /// The stream.
    pub stream: Arc<str>,
    /// The epoch the document was published in (a restarted stream keeps it).
    pub epoch: u64,
    /// The sequence number at which it became current.
    pub seq: u64,
    /// The document as JSON.
    pub document: Bytes,
    /// When it was published.
    pub at: SystemTime,
}

/// An endpoint a change is queued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The endpoint's id.
    pub endpoint: String,
    /// How it receives changes.
    pub mode: Mode,
}

/// What accepting a change did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Deliveries queued.
    pub queued: usize,
    /// Pairs whose backlog was collapsed into the queued snapshot.
    pub collapsed: usize,
    /// Pairs that needed the document, which the change did not carry: their cursor is
    /// forgotten and they are owed the current document ([`Outbox::owed`]).
    pub owed: usize,
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered 2xx.
    Delivered {
        /// Its status.
        status: u16,
    },
    /// The attempt failed.
    Failed {
        /// The receiver's status, if it answered.
        status: Option<u16>,
        /// What went wrong.
        error: String,
        /// When to try again (Unix milliseconds); `None` dead-letters the delivery.
        retry_at_ms: Option<u64>,
    },
}

/// When an attempt was made, how long it took, and the start of the receiver's answer: kept
/// in the attempt history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempt {
    /// When it was made (Unix milliseconds).
    pub at_ms: u64,
    /// From sending to the answer (or the failure).
    pub duration_ms: u64,
    /// The start of the receiver's answer body (at most
    /// [`EXCERPT`](crate::sinks::webhook::deliver::EXCERPT) bytes; empty without one).
    pub response: String,
}

impl Attempt {
    /// When it ended: the time the delivery's state records (finished, failing since).
    pub fn ended_ms(&self) -> u64 {
        self.at_ms.saturating_add(self.duration_ms)
    }

    /// An attempt made at `at_ms`, of no measured duration or answer (tests, replays).
    pub fn at(at_ms: u64) -> Attempt {
        Attempt {
            at_ms,
            ..Attempt::default()
        }
    }
}

/// How an attempt ended, as the history lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// A 2xx.
    Delivered,
    /// Failed; tried again later.
    Retrying,
    /// Failed; the delivery is dead.
    Dead,
}

impl AttemptResult {
    /// The name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Delivered => "delivered",
            AttemptResult::Retrying => "retrying",
            AttemptResult::Dead => "dead",
        }
    }

    /// Parses a name.
    pub fn parse(text: &str) -> Option<AttemptResult> {
        match text {
            "delivered" => Some(AttemptResult::Delivered),
            "retrying" => Some(AttemptResult::Retrying),
            "dead" => Some(AttemptResult::Dead),
            _ => None,
        }
    }

    /// The stored code (the databases' format: never renumber).
    pub fn code(self) -> i16 {
        match self {
            AttemptResult::Delivered => 0,
            AttemptResult::Retrying => 1,
            AttemptResult::Dead => 2,
        }
    }

    /// The result a stored code stands for.
    pub fn of_code(code: i16) -> AttemptResult {
        match code {
            0 => AttemptResult::Delivered,
            1 => AttemptResult::Retrying,
            _ => AttemptResult::Dead,
        }
    }

    /// What an outcome is.
    pub fn of(outcome: &AttemptOutcome) -> AttemptResult {
        match outcome {
            AttemptOutcome::Delivered { .. } => AttemptResult::Delivered,
            AttemptOutcome::Failed {
                retry_at_ms: Some(_),
                ..
            } => AttemptResult::Retrying,
            AttemptOutcome::Failed {
                retry_at_ms: None, ..
            } => AttemptResult::Dead,
        }
    }
}

/// One attempt in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptEntry {
    /// Orders attempts (newest have the highest).
    pub id: i64,
    /// The delivery.
    pub delivery: i64,
    /// Its `webhook-id`.
    pub msg_id: String,
    /// The stream.
    pub stream: String,
    /// When, how long, and the answer's start.
    pub attempt: Attempt,
    /// How it ended.
    pub result: AttemptResult,
    /// The receiver's status, if it answered.
    pub status: Option<u16>,
    /// What went wrong, if it failed.
    pub error: Option<String>,
}

/// Which attempts to list: filters, then newest first from `before`, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct AttemptFilter {
    /// Only this stream's.
    pub stream: Option<String>,
    /// Only those that ended so.
    pub result: Option<AttemptResult>,
    /// Only those the receiver answered with this status.
    pub status: Option<u16>,
    /// Made at or after (Unix milliseconds).
    pub since_ms: Option<u64>,
    /// Made before (Unix milliseconds).
    pub until_ms: Option<u64>,
    /// Only ids below this one (the next page).
    pub before: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

/// What recording an attempt changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The delivery went dead and no snapshot is queued after it: the pair needs one.
    pub needs_resync: bool,
    /// The endpoint's status after this attempt (`None` when it was deleted meanwhile).
    pub status: Option<EndpointStatus>,
    /// The pair's next delivery, claimed for the same worker, when [`Next`] asked for it and
    /// it is due (with its body).
    pub next: Option<Delivery>,
}

/// What [`Outbox::record`] is asked to do besides recording: claim the pair's next delivery
/// if it is due at `now_ms`, for `owner` for `hold`, so a busy pair goes on at once instead
/// of waiting for the worker's next claim.
#[derive(Debug, Clone)]
pub struct Next {
    /// Due at this time (Unix milliseconds).
    pub now_ms: u64,
    /// Who claims it.
    pub owner: Arc<str>,
    /// For how long.
    pub hold: Duration,
}

/// Which deliveries to send again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// One delivery (any finished state), by id.
    One(i64),
    /// Every dead delivery of the endpoint created at or after this time (Unix milliseconds).
    DeadSince(u64),
    /// Every delivery of the endpoint that was delivered or dead, created at or after this time
    /// (Unix milliseconds): a receiver that lost what it got recovers it all, in order (as
    /// Svix's "recover"). Superseded ones are not: a later snapshot replaced them.
    Since(u64),
}

/// What a worker asks of [`Outbox::due`]: due deliveries it may claim.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The time due dates are compared with (Unix milliseconds).
    pub now_ms: u64,
    /// At most this many.
    pub limit: usize,
    /// Pairs this worker has in flight (skipped).
    pub busy: Vec<(String, String)>,
    /// Endpoints at this worker's concurrency limit (skipped).
    pub full: Vec<String>,
    /// Attempts in flight at once to one endpoint, across every worker sharing the store.
    pub per_endpoint: usize,
    /// Who claims (the node's id): claims of a node that restarts are released at once.
    pub owner: Arc<str>,
    /// How long a claim holds its pair against other workers: a node killed mid-attempt
    /// leaves its claim, which another worker takes over after this.
    pub hold: Duration,
}

/// A filter for listing deliveries.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// Only this state.
    pub state: Option<DeliveryState>,
    /// Only ids below this one (paging backwards from the newest).
    pub before: Option<i64>,
    /// At most this many (newest first).
    pub limit: usize,
}

/// The stored code of a delivery state: the databases' format, never renumber.
pub fn state_code(state: DeliveryState) -> i16 {
    match state {
        DeliveryState::Pending => 0,
        DeliveryState::Delivered => 1,
        DeliveryState::Dead => 2,
        DeliveryState::Superseded => 3,
    }
}

/// The state a stored code stands for.
pub fn state_of(code: i16) -> DeliveryState {
    match code {
        0 => DeliveryState::Pending,
        1 => DeliveryState::Delivered,
        2 => DeliveryState::Dead,
        _ => DeliveryState::Superseded,
    }
}

/// The stored code of a delivery kind: the databases' format, never renumber. Changes are
/// below [`FIRST_NOTICE_CODE`]: what a dead delivery supersedes, what a backlog collapses and
/// counts, is only ever changes.
pub fn kind_code(kind: DeliveryKind) -> i16 {
    match kind {
        DeliveryKind::Change(ChangeKind::Patch) => 0,
        DeliveryKind::Change(ChangeKind::Snapshot) => 1,
        DeliveryKind::Notice(NoticeKind::Error) => 2,
        DeliveryKind::Notice(NoticeKind::Recovery) => 3,
    }
}

/// Whether a notice of `kind` is told to a pair now, updating `told`, what the pair was told:
/// `Some(cursor)` while it was told its stream fails (with its cursor then), `None` otherwise.
/// A `stream.error` is told unless the pair was told so and its cursor has not moved since
/// (the same run of failures, seen again by a node taking the stream over or a restarted
/// process); a `stream.recovered` only to a pair told of the failure. A run that ended unseen
/// (its recovery missed) is over once the pair's cursor moves.
pub fn told_now(
    told: &mut Option<Option<Cursor>>,
    kind: NoticeKind,
    cursor: Option<Cursor>,
) -> bool {
    match kind {
        NoticeKind::Error => {
            if *told == Some(cursor) {
                return false;
            }
            *told = Some(cursor);
            true
        }
        NoticeKind::Recovery => told.take().is_some(),
    }
}

/// A cursor as stored: its epoch and sequence number, both `NULL` for none.
pub fn stored_cursor(epoch: Option<i64>, seq: Option<i64>) -> Option<Cursor> {
    Some(Cursor {
        epoch: uint(epoch?),
        seq: uint(seq?),
    })
}

/// The lowest stored code of a notice (error, recovery).
pub const FIRST_NOTICE_CODE: i16 = 2;

/// The kind a stored code stands for.
pub fn kind_of(code: i16) -> DeliveryKind {
    match code {
        0 => DeliveryKind::PATCH,
        2 => DeliveryKind::ERROR,
        3 => DeliveryKind::RECOVERY,
        _ => DeliveryKind::SNAPSHOT,
    }
}

/// A notice to queue for endpoints: the stream's upstream started failing, or recovered.
/// Queued on each target's (endpoint, stream) queue after the changes accepted before it;
/// it moves no cursor (a patch still follows the change it applies to).
#[derive(Debug, Clone)]
pub struct NewNotice {
    /// The stream.
    pub stream: Arc<str>,
    /// Error or recovery.
    pub kind: NoticeKind,
    /// The stream's epoch.
    pub epoch: u64,
    /// The stream's last good document's sequence number (0 before the first).
    pub seq: u64,
    /// The body ([`body::encode_notice`]).
    pub body: Bytes,
}

/// An operational event to store for `webhooks.operator_url`: stored once per `key` (a
/// second store of the same key, by another node or after a crash, is a no-op), delivered
/// in the order stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorNote {
    /// What makes the event unique (e.g. `delivery.dead:{msg_id}:{attempt}`).
    pub key: String,
    /// Its `webhook-id`.
    pub msg_id: String,
    /// The signed body.
    pub body: Bytes,
    /// When it happened (Unix milliseconds).
    pub at_ms: u64,
}

/// The operational events an attempt's record stores with it, in its transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    /// Stored with the record (a delivery gone dead).
    pub always: Vec<OperatorNote>,
    /// Stored only if this record ends the endpoint's failures (`failing_since` cleared):
    /// `endpoint.recovered`.
    pub if_recovered: Option<OperatorNote>,
}

/// A stored operational event, claimed for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorDelivery {
    /// Row id: orders events.
    pub id: i64,
    /// Its `webhook-id`.
    pub msg_id: String,
    /// The signed body.
    pub body: Bytes,
    /// Attempts made so far.
    pub attempts: u32,
    /// When it is due (Unix milliseconds).
    pub next_attempt_ms: u64,
    /// When it was stored (Unix milliseconds).
    pub created_ms: u64,
}

/// What [`Outbox::operator_head`] found: the oldest undelivered operational event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorHead {
    /// None waits.
    Empty,
    /// It is not due yet, or another node holds it: look again at this time at the latest.
    Later(u64),
    /// Claimed for the caller.
    Due(OperatorDelivery),
}

/// A count, time or sequence number as a database integer (signed). Every value stored (times
/// in ms, epochs, sequence numbers) is far below `i64::MAX`; saturating keeps an absurd one
/// from wrapping.
pub fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A database integer as a count, time or sequence number (a negative one, never stored, as 0).
pub fn uint(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Whether a pair already holding `pending` deliveries has them superseded by the one being
/// queued: its backlog reached `webhooks.backlog_limit` (a limit of 0 counts as 1).
pub fn collapses(pending: usize, backlog_limit: usize) -> bool {
    pending >= backlog_limit.max(1)
}

/// A delivery's kind, the sequence number a patch applies to, and its body.
pub type Planned<'a> = (DeliveryKind, Option<u64>, &'a [u8]);

/// The bodies of one change's deliveries, each kind encoded at most once however many targets
/// get it. Every implementation of [`Outbox::accept`] builds its rows with it, so they all
/// store the same bytes.
pub struct Bodies<'a> {
    change: &'a NewChange,
    patch: Option<Vec<u8>>,
    snapshot: Option<Vec<u8>>,
}

impl<'a> Bodies<'a> {
    /// Nothing encoded yet.
    pub fn new(change: &'a NewChange) -> Self {
        Bodies {
            change,
            patch: None,
            snapshot: None,
        }
    }

    /// The kind, `base_seq` and body of the delivery a target gets under `plan` (never
    /// [`Plan::Skip`]); a collapsed backlog is always followed by a snapshot, since the patch's
    /// base was superseded with it.
    /// `None` when the target needs the document and the change does not carry it.
    pub fn delivery(
        &mut self,
        plan: Plan,
        collapse: bool,
    ) -> Result<Option<Planned<'_>>, BodyError> {
        let change = self.change;
        match (plan, &change.patch) {
            (Plan::Patch { base_seq }, Some(patch)) if !collapse => {
                if self.patch.is_none() {
                    self.patch = Some(body::encode(
                        ChangeKind::Patch,
                        &change.stream,
                        change.epoch,
                        change.seq,
                        Some(base_seq),
                        change.at,
                        patch,
                    )?);
                }
                Ok(Some((
                    DeliveryKind::PATCH,
                    Some(base_seq),
                    self.patch.as_deref().unwrap_or_default(),
                )))
            }
            _ => {
                let Some(document) = &change.document else {
                    return Ok(None);
                };
                if self.snapshot.is_none() {
                    self.snapshot = Some(body::encode(
                        ChangeKind::Snapshot,
                        &change.stream,
                        change.epoch,
                        change.seq,
                        None,
                        change.at,
                        document,
                    )?);
                }
                Ok(Some((
                    DeliveryKind::SNAPSHOT,
                    None,
                    self.snapshot.as_deref().unwrap_or_default(),
                )))
            }
        }
    }
}

/// The durable queue behind webhooks.
pub trait Outbox: Send + Sync {
    /// Every endpoint with its status.
    fn endpoints(&self) -> OutboxFuture<Vec<(EndpointRecord, EndpointStatus)>>;
    /// Creates or replaces an endpoint's definition (its status and deliveries are kept);
    /// returns its status, numbered after this write.
    fn put_endpoint(&self, record: EndpointRecord) -> OutboxFuture<EndpointStatus>;
    /// Stores a new endpoint unless one with its id exists (then returns that one, unchanged):
    /// atomic, so two nodes creating the same id make one.
    fn create_endpoint(&self, record: EndpointRecord) -> OutboxFuture<Created>;
    /// Sets or clears an endpoint's disabled status (clearing also clears `failing_since`);
    /// returns the status it then has, `None` when there is no such endpoint.
    fn set_disabled(
        &self,
        id: String,
        disabled: Option<Disabled>,
    ) -> OutboxFuture<Option<EndpointStatus>> {
        self.set_disabled_noted(id, disabled, None, None)
    }
    /// [`Outbox::set_disabled`], storing `note` in the same transaction when the endpoint's
    /// disabled status changed (enabled to disabled, or back). With `failing_since`, only if
    /// the endpoint is still failing since that time (what the caller decided from): a worker
    /// disabling an endpoint that failed for too long does not disable it again after an
    /// admin re-enabled it meanwhile (which clears `failing_since`), or after it recovered;
    /// then nothing changes and the answer is `None`, as for no such endpoint.
    fn set_disabled_noted(
        &self,
        id: String,
        disabled: Option<Disabled>,
        note: Option<OperatorNote>,
        failing_since: Option<u64>,
    ) -> OutboxFuture<Option<EndpointStatus>>;
    /// Removes an endpoint with its cursors and deliveries; false when there was none.
    fn delete_endpoint(&self, id: String) -> OutboxFuture<bool>;
    /// Queues `change` for each target in one transaction: a patch where the target's queue
    /// ends right before it, a snapshot otherwise, nothing where the target already has it.
    /// A pair holding `backlog_limit` pending deliveries has them superseded by one snapshot.
    /// Calls take effect in the order they were made, even when their futures are awaited
    /// later (the dispatcher submits consecutive changes before awaiting them).
    ///
    /// `fence` is the dispatcher's lease (`None` on a single node): once a change was
    /// accepted with a fence, one with a lower fence is refused ([`OutboxError::Fenced`]),
    /// so a dispatcher that lost its lease cannot write after its successor. Accepting is
    /// idempotent per (endpoint, stream, epoch, seq): a pair whose cursor already holds the
    /// change skips it, so two dispatchers overlapping in a handover never queue it twice.
    fn accept(
        &self,
        change: NewChange,
        targets: Vec<Target>,
        backlog_limit: usize,
        fence: Option<u64>,
    ) -> OutboxFuture<Accepted>;
    /// Queues `notice` for each of `targets` (endpoint ids) on their queues of the notice's
    /// stream, after every change accepted before it (calls take effect in call order, as
    /// [`Outbox::accept`]'s do, fenced the same way); cursors are not moved. Deleted endpoints
    /// get nothing. Returns how many were queued.
    fn notice(
        &self,
        notice: NewNotice,
        targets: Vec<String>,
        fence: Option<u64>,
    ) -> OutboxFuture<usize>;
    /// Each target's cursor on `stream` (`None`: no cursor, or forgotten after a gap).
    fn cursors(&self, stream: String) -> OutboxFuture<Vec<(String, Option<Cursor>)>>;
    /// The endpoints owed the document of `stream`: their cursor was forgotten (a dead
    /// delivery with nothing after it, a change replayed without its document) or marked by
    /// [`Outbox::owe_snapshot`]. The stream's dispatcher queues the current document for them.
    fn owed(&self, stream: String) -> OutboxFuture<Vec<String>>;
    /// Marks `endpoint` as owed the current document of each of `streams` (created,
    /// re-enabled or redefined: whichever node dispatches a stream then queues it).
    fn owe_snapshot(&self, endpoint: String, streams: Vec<String>) -> OutboxFuture<()>;
    /// Claims the oldest pending delivery of each (endpoint, stream) pair of an enabled
    /// endpoint whose next attempt is due, soonest first, at most `limit`, skipping `busy`
    /// pairs, the endpoints in `full` and pairs another worker holds, so a saturated
    /// endpoint's heads never crowd out the others'. A claim holds its pair until the attempt
    /// is recorded ([`Outbox::record`]) or released, or for `hold` at most.
    fn due(&self, claim: Claim) -> OutboxFuture<Vec<Delivery>>;
    /// Releases the claim on delivery `id` without recording an attempt.
    fn release(&self, id: i64) -> OutboxFuture<()>;
    /// Stores a stream's current document, unless a newer one of the same epoch is stored.
    /// Takes effect in call order with [`Outbox::accept`] (same queue, same transactions).
    fn save_document(&self, document: StoredDocument) -> OutboxFuture<()>;
    /// Every stored document.
    fn documents(&self) -> OutboxFuture<Vec<StoredDocument>>;
    /// When the earliest pending head of an enabled endpoint is due (Unix milliseconds).
    fn next_due_ms(&self) -> OutboxFuture<Option<u64>>;
    /// Records an attempt of delivery `id` (the delivery's state, and an entry of the attempt
    /// history), and releases its claim; with `next`, also claims the pair's next delivery if
    /// it is due ([`Recorded::next`]).
    fn record(
        &self,
        id: i64,
        outcome: AttemptOutcome,
        attempt: Attempt,
        next: Option<Next>,
    ) -> OutboxFuture<Recorded> {
        self.record_noted(id, outcome, attempt, next, Notes::default())
    }
    /// [`Outbox::record`], storing the operational events `notes` in the same transaction.
    fn record_noted(
        &self,
        id: i64,
        outcome: AttemptOutcome,
        attempt: Attempt,
        next: Option<Next>,
        notes: Notes,
    ) -> OutboxFuture<Recorded>;
    /// Stores an operational event unless one with its key is stored (true when stored now).
    fn note(&self, note: OperatorNote) -> OutboxFuture<bool>;
    /// Claims the oldest undelivered operational event for `owner` for `hold` if it is due at
    /// `now_ms` and no live claim holds it: events are sent one at a time, in order, by
    /// whichever node claims the head.
    fn operator_head(
        &self,
        now_ms: u64,
        owner: Arc<str>,
        hold: Duration,
    ) -> OutboxFuture<OperatorHead>;
    /// Records an attempt of operational event `id`: delivered, retried at `retry_at_ms`, or
    /// given up (dead); releases its claim.
    fn operator_record(&self, id: i64, outcome: AttemptOutcome, at_ms: u64) -> OutboxFuture<()>;
    /// An endpoint's attempt history, newest first ([`Outbox::prune_attempts`] removes old
    /// entries).
    fn attempts(&self, endpoint: String, filter: AttemptFilter) -> OutboxFuture<Vec<AttemptEntry>>;
    /// An endpoint's deliveries, newest first, without bodies.
    fn deliveries(&self, endpoint: String, filter: DeliveryFilter) -> OutboxFuture<Vec<Delivery>>;
    /// Queues the selected deliveries again (same `webhook-id` and body, attempts reset) at the
    /// end of their pairs' queues, in their original order; returns how many.
    fn replay(&self, endpoint: String, which: Replay, now_ms: u64) -> OutboxFuture<usize>;
    /// Deletes finished deliveries (delivered, dead, superseded) and finished operational
    /// events that finished before `before_ms`; returns how many.
    fn prune(&self, before_ms: u64) -> OutboxFuture<usize>;
    /// Answers a trivial query: the store is open and its queue moves (`/readyz`).
    fn check(&self) -> OutboxFuture<()>;
    /// Deletes the attempt history's entries of attempts made before `before_ms`; returns how
    /// many.
    fn prune_attempts(&self, before_ms: u64) -> OutboxFuture<usize>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn change(patch: bool) -> NewChange {
        NewChange {
            stream: Arc::from("s"),
            epoch: 3,
            seq: 8,
            base: None,
            patch: patch.then(|| Bytes::from_static(br#"[{"op":"add","path":"/n","value":8}]"#)),
            document: Some(Bytes::from_static(br#"{"n":8}"#)),
            at: std::time::UNIX_EPOCH,
        }
    }

    fn json(body: &[u8]) -> Value {
        serde_json::from_slice(body).unwrap()
    }

    /// A patch only where the plan says so and no backlog was collapsed; every other target
    /// gets the document.
    #[test]
    fn bodies_follow_the_plan_and_a_collapse_ends_in_a_snapshot() {
        let change = change(true);
        let mut bodies = Bodies::new(&change);
        let (kind, base, body) = bodies
            .delivery(Plan::Patch { base_seq: 7 }, false)
            .unwrap()
            .unwrap();
        assert_eq!((kind, base), (DeliveryKind::PATCH, Some(7)));
        assert_eq!(json(body)["data"][0]["op"], "add");
        let (kind, base, body) = bodies
            .delivery(Plan::Patch { base_seq: 7 }, true)
            .unwrap()
            .unwrap();
        assert_eq!((kind, base), (DeliveryKind::SNAPSHOT, None));
        assert_eq!(json(body)["data"]["n"], 8);
        let (kind, _, _) = bodies.delivery(Plan::Snapshot, false).unwrap().unwrap();
        assert_eq!(kind, DeliveryKind::SNAPSHOT);
        // A change the hub published as a snapshot has no patch to send.
        let change = self::change(false);
        let (kind, _, _) = Bodies::new(&change)
            .delivery(Plan::Patch { base_seq: 7 }, false)
            .unwrap()
            .unwrap();
        assert_eq!(kind, DeliveryKind::SNAPSHOT);
        // A patch replayed from history carries no document: a snapshot cannot be made.
        let mut replayed = self::change(true);
        replayed.document = None;
        let mut bodies = Bodies::new(&replayed);
        assert!(bodies.delivery(Plan::Snapshot, false).unwrap().is_none());
        assert!(
            bodies
                .delivery(Plan::Patch { base_seq: 7 }, false)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_backlog_collapses_at_its_limit() {
        assert!(!collapses(2, 3));
        assert!(collapses(3, 3));
        assert!(collapses(1, 0));
        assert!(!collapses(0, 0));
    }
}

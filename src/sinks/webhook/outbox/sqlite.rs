//! The embedded outbox: SQLite in WAL mode, owned by one dedicated thread.
//!
//! The async side never touches SQLite: every operation is a job sent to the outbox thread,
//! which runs queued jobs in one transaction (each in its own savepoint, so one failing job
//! does not undo the others) and answers each only after the transaction committed. Batching
//! is what makes durable writes fast: one fsync covers every job that queued meanwhile.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Row, params};
use tokio::sync::oneshot;

use super::{
    Accepted, AttemptOutcome, Bodies, Delivery, DeliveryFilter, DeliveryState, Disabled,
    EndpointRecord, EndpointStatus, NewChange, Outbox, OutboxError, OutboxFuture, Recorded, Replay,
    StoredDocument, Target, collapses,
};
use crate::sinks::webhook::body::{self, Cursor, Plan};
use crate::sinks::webhook::sign::message_id;
use crate::time::unix_ms;
use crate::wire::ChangeKind;

/// Jobs run in one transaction at most.
const BATCH: usize = 1024;

type Done = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Done + Send>;

impl From<rusqlite::Error> for OutboxError {
    fn from(error: rusqlite::Error) -> Self {
        OutboxError::Storage(error.to_string())
    }
}

/// The SQLite outbox. Dropping it lets the thread finish the queued jobs and close the file.
pub struct SqliteOutbox {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Numbers status reads in the order the outbox thread runs them (see
    /// [`EndpointStatus::revision`]).
    revision: Arc<AtomicU64>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS endpoints (
    id TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    disabled_at_ms INTEGER,
    disabled_reason TEXT,
    failing_since_ms INTEGER
);
-- One row per (endpoint, stream) pair that ever had a delivery: where its queue ends
-- (NULL after a gap: the next change is a snapshot). Also the pairs the worker scans.
CREATE TABLE IF NOT EXISTS cursors (
    endpoint_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    epoch INTEGER,
    seq INTEGER,
    PRIMARY KEY (endpoint_id, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    base_seq INTEGER,
    body BLOB NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    last_status INTEGER,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX IF NOT EXISTS deliveries_pending
    ON deliveries (endpoint_id, stream, id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS deliveries_by_endpoint ON deliveries (endpoint_id, id);
-- The current document of each push stream, so a restart continues it (same epoch and seq).
CREATE TABLE IF NOT EXISTS documents (
    stream TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    document BLOB NOT NULL,
    at_ms INTEGER NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = 1;
";

const PENDING: i64 = 0;
const DELIVERED: i64 = 1;
const DEAD: i64 = 2;
const SUPERSEDED: i64 = 3;

fn state_code(state: DeliveryState) -> i64 {
    match state {
        DeliveryState::Pending => PENDING,
        DeliveryState::Delivered => DELIVERED,
        DeliveryState::Dead => DEAD,
        DeliveryState::Superseded => SUPERSEDED,
    }
}

fn state_from(code: i64) -> DeliveryState {
    match code {
        PENDING => DeliveryState::Pending,
        DELIVERED => DeliveryState::Delivered,
        DEAD => DeliveryState::Dead,
        _ => DeliveryState::Superseded,
    }
}

/// The stored codes are the database's format (`deliveries.kind`): never renumber them.
fn kind_code(kind: ChangeKind) -> i64 {
    match kind {
        ChangeKind::Patch => 0,
        ChangeKind::Snapshot => 1,
    }
}

/// SQLite integers are signed; every value stored here (times in ms, epochs, sequence
/// numbers) is far below `i64::MAX`, and saturating keeps an absurd one from wrapping.
fn sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn unsql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

const DELIVERY_COLUMNS: &str = "id, endpoint_id, stream, msg_id, kind, epoch, seq, base_seq, \
     state, attempts, next_attempt_ms, last_error, last_status, created_ms, finished_ms";

/// A delivery from a row of `DELIVERY_COLUMNS`, without its body.
fn delivery(row: &Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: row.get(0)?,
        endpoint: row.get(1)?,
        stream: row.get(2)?,
        msg_id: row.get(3)?,
        kind: if row.get::<_, i64>(4)? == 0 {
            ChangeKind::Patch
        } else {
            ChangeKind::Snapshot
        },
        epoch: unsql(row.get(5)?),
        seq: unsql(row.get(6)?),
        base_seq: row.get::<_, Option<i64>>(7)?.map(unsql),
        body: Bytes::new(),
        state: state_from(row.get(8)?),
        attempts: u32::try_from(row.get::<_, i64>(9)?).unwrap_or(u32::MAX),
        next_attempt_ms: unsql(row.get(10)?),
        last_error: row.get(11)?,
        last_status: row
            .get::<_, Option<i64>>(12)?
            .and_then(|s| u16::try_from(s).ok()),
        created_ms: unsql(row.get(13)?),
        finished_ms: row.get::<_, Option<i64>>(14)?.map(unsql),
    })
}

impl SqliteOutbox {
    /// Opens (creating if needed) the database at `path` in WAL mode and starts its thread.
    /// `":memory:"` gives a private in-memory database (tests).
    pub async fn open(path: &Path) -> Result<SqliteOutbox, OutboxError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, opened) = oneshot::channel();
        let path = path.to_path_buf();
        let name = path.display().to_string();
        std::thread::Builder::new()
            .name("webhook-outbox".into())
            .spawn(move || match connect(&path) {
                Ok(conn) => {
                    let _ = ready.send(Ok(()));
                    serve(&conn, &queue);
                }
                Err(error) => {
                    let _ = ready.send(Err(error));
                }
            })
            .map_err(|e| OutboxError::Open {
                path: name.clone(),
                message: format!("cannot start the outbox thread: {e}"),
            })?;
        opened.await.map_err(|_| OutboxError::Closed)??;
        Ok(SqliteOutbox {
            jobs: Mutex::new(jobs),
            revision: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Runs `f` on the outbox thread inside the current batch's transaction.
    fn call<T, F>(&self, f: F) -> OutboxFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, OutboxError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, OutboxError>>();
        let job: Job = Box::new(move |conn| {
            let result = in_savepoint(conn, f);
            Box::new(move |committed| {
                let _ = reply.send(match committed {
                    Ok(()) => result,
                    Err(message) => Err(OutboxError::Storage(message)),
                });
            })
        });
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .is_ok();
        Box::pin(async move {
            if !sent {
                return Err(OutboxError::Closed);
            }
            answer.await.map_err(|_| OutboxError::Closed)?
        })
    }
}

fn connect(path: &Path) -> Result<Connection, OutboxError> {
    let fail = |message: String| OutboxError::Open {
        path: path.display().to_string(),
        message,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
        && path != Path::new(":memory:")
    {
        return Err(fail(format!(
            "the directory {} does not exist (create it, or set webhooks.database)",
            dir.display()
        )));
    }
    let conn = Connection::open(path).map_err(|e| fail(e.to_string()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| fail(e.to_string()))?;
    // WAL: readers never block the writer; FULL: a commit is on disk before its job is
    // answered, so an accepted change survives a crash of the process or the machine.
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .map_err(|e| fail(format!("cannot enable WAL mode: {e}")))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| fail(e.to_string()))?;
    if version > 1 {
        return Err(fail(format!(
            "the database has schema version {version}, newer than this patchwire (1); \
             use a newer patchwire or another file"
        )));
    }
    conn.execute_batch(SCHEMA)
        .map_err(|e| fail(format!("cannot create the schema: {e}")))?;
    Ok(conn)
}

/// The outbox thread: batches queued jobs into transactions until every sender is gone.
fn serve(conn: &Connection, queue: &mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
            let message = error.to_string();
            for job in batch {
                // The job never ran: answer it with the error.
                let done = job_failed(job, conn, &message);
                done(Err(message.clone()));
            }
            continue;
        }
        let dones: Vec<Done> = batch.into_iter().map(|job| job(conn)).collect();
        let committed = conn.execute_batch("COMMIT").map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            e.to_string()
        });
        for done in dones {
            done(committed.clone());
        }
    }
}

/// Runs a job whose transaction could not start, inside a savepoint that is rolled back, only
/// to obtain its completion (which then reports the error).
fn job_failed(job: Job, conn: &Connection, _message: &str) -> Done {
    let _ = conn.execute_batch("SAVEPOINT failed");
    let done = job(conn);
    let _ = conn.execute_batch("ROLLBACK TO failed; RELEASE failed");
    done
}

fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, OutboxError>,
) -> Result<T, OutboxError> {
    conn.execute_batch("SAVEPOINT job")?;
    let result = f(conn);
    let end = if result.is_ok() {
        "RELEASE job"
    } else {
        "ROLLBACK TO job; RELEASE job"
    };
    conn.execute_batch(end)?;
    result
}

fn accept(
    conn: &Connection,
    change: &NewChange,
    targets: &[Target],
    backlog_limit: usize,
) -> Result<Accepted, OutboxError> {
    let now = unix_ms(std::time::SystemTime::now());
    let mut rng = rand::rng();
    let mut bodies = Bodies::new(change);
    let mut accepted = Accepted::default();
    let stream: &str = &change.stream;
    for target in targets {
        let cursor = conn
            .prepare_cached(
                "SELECT epoch, seq FROM cursors WHERE endpoint_id = ?1 AND stream = ?2",
            )?
            .query_row(params![target.endpoint, stream], |r| {
                Ok(
                    match (r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?) {
                        (Some(epoch), Some(seq)) => Some(Cursor {
                            epoch: unsql(epoch),
                            seq: unsql(seq),
                        }),
                        _ => None,
                    },
                )
            })
            .optional()?
            .flatten();
        let plan = body::plan(
            cursor,
            change.epoch,
            change.seq,
            change.patch.is_some(),
            target.mode,
        );
        if plan == Plan::Skip {
            continue;
        }
        let pending: i64 = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM deliveries WHERE endpoint_id = ?1 AND stream = ?2 AND state = 0",
            )?
            .query_row(params![target.endpoint, stream], |r| r.get(0))?;
        let collapse = collapses(
            usize::try_from(pending).unwrap_or(usize::MAX),
            backlog_limit,
        );
        if collapse {
            conn.prepare_cached(
                "UPDATE deliveries SET state = 3, finished_ms = ?3 \
                 WHERE endpoint_id = ?1 AND stream = ?2 AND state = 0",
            )?
            .execute(params![target.endpoint, stream, sql(now)])?;
            accepted.collapsed += 1;
        }
        let (kind, base_seq, bytes) = bodies.delivery(plan, collapse)?;
        conn.prepare_cached(
            "INSERT INTO deliveries (endpoint_id, stream, msg_id, kind, epoch, seq, base_seq, \
             body, state, attempts, next_attempt_ms, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, 0, ?9, ?9)",
        )?
        .execute(params![
            target.endpoint,
            stream,
            message_id(now, &mut rng),
            kind_code(kind),
            sql(change.epoch),
            sql(change.seq),
            base_seq.map(sql),
            bytes,
            sql(now),
        ])?;
        conn.prepare_cached(
            "INSERT INTO cursors (endpoint_id, stream, epoch, seq) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (endpoint_id, stream) DO UPDATE SET epoch = ?3, seq = ?4",
        )?
        .execute(params![
            target.endpoint,
            stream,
            sql(change.epoch),
            sql(change.seq)
        ])?;
        accepted.queued += 1;
    }
    Ok(accepted)
}

fn record(
    conn: &Connection,
    id: i64,
    outcome: &AttemptOutcome,
    now: u64,
    revision: &AtomicU64,
) -> Result<Recorded, OutboxError> {
    let Some((endpoint, stream, state)) = conn
        .prepare_cached("SELECT endpoint_id, stream, state FROM deliveries WHERE id = ?1")?
        .query_row([id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .optional()?
    else {
        // Deleted with its endpoint while in flight.
        return Ok(Recorded::default());
    };
    let mut recorded = Recorded::default();
    match outcome {
        AttemptOutcome::Delivered { status } => {
            conn.prepare_cached(
                "UPDATE deliveries SET attempts = attempts + 1, last_status = ?2, \
                 last_error = NULL, state = CASE WHEN state = 0 THEN 1 ELSE state END, \
                 finished_ms = COALESCE(finished_ms, ?3) WHERE id = ?1",
            )?
            .execute(params![id, status, sql(now)])?;
            conn.prepare_cached("UPDATE endpoints SET failing_since_ms = NULL WHERE id = ?1 AND failing_since_ms IS NOT NULL")?
                .execute([&endpoint])?;
        }
        AttemptOutcome::Failed {
            status,
            error,
            retry_at_ms,
        } => {
            match retry_at_ms {
                Some(at) => {
                    conn.prepare_cached(
                        "UPDATE deliveries SET attempts = attempts + 1, last_status = ?2, \
                         last_error = ?3, next_attempt_ms = ?4 WHERE id = ?1",
                    )?
                    .execute(params![id, status, error, sql(*at)])?;
                }
                None => {
                    conn.prepare_cached(
                        "UPDATE deliveries SET attempts = attempts + 1, last_status = ?2, \
                         last_error = ?3, state = CASE WHEN state = 0 THEN 2 ELSE state END, \
                         finished_ms = COALESCE(finished_ms, ?4) WHERE id = ?1",
                    )?
                    .execute(params![id, status, error, sql(now)])?;
                    if state == PENDING {
                        recorded.needs_resync = supersede_after_gap(conn, &endpoint, &stream, now)?;
                    }
                }
            }
            conn.prepare_cached(
                "UPDATE endpoints SET failing_since_ms = COALESCE(failing_since_ms, ?2) WHERE id = ?1",
            )?
            .execute(params![endpoint, sql(now)])?;
        }
    }
    recorded.status = read_status(conn, &endpoint, revision)?;
    Ok(recorded)
}

/// An endpoint's status now, numbered in the outbox thread's order of operations.
fn read_status(
    conn: &Connection,
    endpoint: &str,
    revision: &AtomicU64,
) -> Result<Option<EndpointStatus>, OutboxError> {
    let status = conn
        .prepare_cached(
            "SELECT disabled_at_ms, disabled_reason, failing_since_ms FROM endpoints WHERE id = ?1",
        )?
        .query_row([endpoint], |r| {
            Ok(status_of(r.get(0)?, r.get(1)?, r.get(2)?, revision))
        })
        .optional()?;
    Ok(status)
}

/// After a dead delivery, the pair's pending deliveries up to the next snapshot lack their base:
/// they are superseded. Without a pending snapshot, the cursor is forgotten (so the next change
/// is a snapshot) and the caller is told to queue one now.
fn supersede_after_gap(
    conn: &Connection,
    endpoint: &str,
    stream: &str,
    now: u64,
) -> Result<bool, OutboxError> {
    let first_snapshot: Option<i64> = conn
        .prepare_cached(
            "SELECT MIN(id) FROM deliveries WHERE endpoint_id = ?1 AND stream = ?2 AND state = 0 \
             AND kind = 1",
        )?
        .query_row(params![endpoint, stream], |r| r.get(0))?;
    conn.prepare_cached(
        "UPDATE deliveries SET state = 3, finished_ms = ?3 WHERE endpoint_id = ?1 AND stream = ?2 \
         AND state = 0 AND id < ?4",
    )?
    .execute(params![
        endpoint,
        stream,
        sql(now),
        first_snapshot.unwrap_or(i64::MAX)
    ])?;
    if first_snapshot.is_some() {
        return Ok(false);
    }
    conn.prepare_cached(
        "UPDATE cursors SET epoch = NULL, seq = NULL WHERE endpoint_id = ?1 AND stream = ?2",
    )?
    .execute(params![endpoint, stream])?;
    Ok(true)
}

/// The oldest pending delivery of every pair of an enabled endpoint: one index seek per pair
/// (`deliveries_pending`), however long the backlogs are.
const HEADS: &str = "SELECT d.id, d.endpoint_id, d.stream, d.msg_id, d.kind, d.epoch, d.seq, \
     d.base_seq, d.state, d.attempts, d.next_attempt_ms, d.last_error, d.last_status, \
     d.created_ms, d.finished_ms \
     FROM cursors c \
     JOIN endpoints e ON e.id = c.endpoint_id AND e.disabled_at_ms IS NULL \
     JOIN deliveries d ON d.id = (SELECT MIN(id) FROM deliveries \
         WHERE endpoint_id = c.endpoint_id AND stream = c.stream AND state = 0)";

fn due(
    conn: &Connection,
    now: u64,
    limit: usize,
    busy: &[(String, String)],
    full: &[String],
) -> Result<Vec<Delivery>, OutboxError> {
    let busy: HashSet<(&str, &str)> = busy.iter().map(|(e, s)| (e.as_str(), s.as_str())).collect();
    let full: HashSet<&str> = full.iter().map(String::as_str).collect();
    // No LIMIT: there is one head per pair, and skipping happens here.
    let mut statement = conn.prepare_cached(&format!(
        "{HEADS} WHERE d.next_attempt_ms <= ?1 ORDER BY d.next_attempt_ms, d.id"
    ))?;
    let rows = statement.query_map(params![sql(now)], delivery)?;
    let mut out = Vec::with_capacity(limit.min(1024));
    for row in rows {
        if out.len() >= limit {
            break;
        }
        let d = row?;
        if full.contains(d.endpoint.as_str())
            || busy.contains(&(d.endpoint.as_str(), d.stream.as_str()))
        {
            continue;
        }
        out.push(d);
    }
    // Bodies only for the deliveries handed out (busy pairs' heads are skipped above).
    let mut body = conn.prepare_cached("SELECT body FROM deliveries WHERE id = ?1")?;
    for d in &mut out {
        d.body = Bytes::from(body.query_row([d.id], |r| r.get::<_, Vec<u8>>(0))?);
    }
    Ok(out)
}

fn status_of(
    disabled_at: Option<i64>,
    reason: Option<String>,
    failing: Option<i64>,
    revision: &AtomicU64,
) -> EndpointStatus {
    EndpointStatus {
        // Only the outbox thread reads statuses, one job at a time: the order is its order.
        revision: revision.fetch_add(1, Ordering::Relaxed) + 1,
        disabled: disabled_at.map(|at| Disabled {
            at_ms: unsql(at),
            reason: reason.unwrap_or_default(),
        }),
        failing_since_ms: failing.map(unsql),
    }
}

fn copy_for_replay(conn: &Connection, ids: &[i64], now: u64) -> Result<usize, OutboxError> {
    let mut copied = 0;
    for id in ids {
        copied += conn
            .prepare_cached(
                "INSERT INTO deliveries (endpoint_id, stream, msg_id, kind, epoch, seq, base_seq, \
                 body, state, attempts, next_attempt_ms, created_ms) \
                 SELECT endpoint_id, stream, msg_id, kind, epoch, seq, base_seq, body, 0, 0, ?2, ?2 \
                 FROM deliveries WHERE id = ?1",
            )?
            .execute(params![id, sql(now)])?;
    }
    Ok(copied)
}

impl Outbox for SqliteOutbox {
    fn endpoints(&self) -> OutboxFuture<Vec<(EndpointRecord, EndpointStatus)>> {
        let revision = self.revision.clone();
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id, definition, disabled_at_ms, disabled_reason, failing_since_ms \
                 FROM endpoints ORDER BY id",
            )?;
            let rows = statement.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    status_of(r.get(2)?, r.get(3)?, r.get(4)?, &revision),
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, definition, status) = row?;
                let record: EndpointRecord = serde_json::from_str(&definition).map_err(|e| {
                    OutboxError::Storage(format!("endpoint {id:?} is stored unreadably: {e}"))
                })?;
                out.push((record, status));
            }
            Ok(out)
        })
    }

    fn put_endpoint(&self, record: EndpointRecord) -> OutboxFuture<()> {
        self.call(move |conn| {
            let definition = serde_json::to_string(&record)
                .map_err(|e| OutboxError::Storage(format!("cannot encode an endpoint: {e}")))?;
            conn.prepare_cached(
                "INSERT INTO endpoints (id, definition) VALUES (?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET definition = ?2",
            )?
            .execute(params![record.id, definition])?;
            Ok(())
        })
    }

    fn set_disabled(
        &self,
        id: String,
        disabled: Option<Disabled>,
    ) -> OutboxFuture<Option<EndpointStatus>> {
        let revision = self.revision.clone();
        self.call(move |conn| {
            let changed = match disabled {
                Some(d) => conn
                    .prepare_cached(
                        "UPDATE endpoints SET disabled_at_ms = ?2, disabled_reason = ?3 WHERE id = ?1",
                    )?
                    .execute(params![id, sql(d.at_ms), d.reason])?,
                None => conn
                    .prepare_cached(
                        "UPDATE endpoints SET disabled_at_ms = NULL, disabled_reason = NULL, \
                         failing_since_ms = NULL WHERE id = ?1",
                    )?
                    .execute([&id])?,
            };
            if changed == 0 {
                return Ok(None);
            }
            read_status(conn, &id, &revision)
        })
    }

    fn delete_endpoint(&self, id: String) -> OutboxFuture<bool> {
        self.call(move |conn| {
            conn.prepare_cached("DELETE FROM deliveries WHERE endpoint_id = ?1")?
                .execute([&id])?;
            conn.prepare_cached("DELETE FROM cursors WHERE endpoint_id = ?1")?
                .execute([&id])?;
            let removed = conn
                .prepare_cached("DELETE FROM endpoints WHERE id = ?1")?
                .execute([&id])?;
            Ok(removed > 0)
        })
    }

    fn accept(
        &self,
        change: NewChange,
        targets: Vec<Target>,
        backlog_limit: usize,
    ) -> OutboxFuture<Accepted> {
        self.call(move |conn| accept(conn, &change, &targets, backlog_limit))
    }

    fn due(
        &self,
        now_ms: u64,
        limit: usize,
        busy: Vec<(String, String)>,
        full: Vec<String>,
    ) -> OutboxFuture<Vec<Delivery>> {
        self.call(move |conn| due(conn, now_ms, limit, &busy, &full))
    }

    fn save_document(&self, document: StoredDocument) -> OutboxFuture<()> {
        self.call(move |conn| {
            // Never step back: a resync of an older snapshot must not overwrite a newer one.
            conn.prepare_cached(
                "INSERT INTO documents (stream, epoch, seq, document, at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (stream) DO UPDATE SET epoch = ?2, seq = ?3, document = ?4, at_ms = ?5 \
                 WHERE epoch != ?2 OR seq < ?3",
            )?
            .execute(params![
                &*document.stream,
                sql(document.epoch),
                sql(document.seq),
                &document.document[..],
                sql(unix_ms(document.at)),
            ])?;
            Ok(())
        })
    }

    fn documents(&self) -> OutboxFuture<Vec<StoredDocument>> {
        self.call(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT stream, epoch, seq, document, at_ms FROM documents")?;
            let rows = statement.query_map([], |r| {
                Ok(StoredDocument {
                    stream: Arc::from(r.get::<_, String>(0)?),
                    epoch: unsql(r.get(1)?),
                    seq: unsql(r.get(2)?),
                    document: Bytes::from(r.get::<_, Vec<u8>>(3)?),
                    at: std::time::UNIX_EPOCH + Duration::from_millis(unsql(r.get(4)?)),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn next_due_ms(&self) -> OutboxFuture<Option<u64>> {
        self.call(|conn| {
            let next: Option<i64> = conn
                .prepare_cached(&format!(
                    "SELECT MIN(next_attempt_ms) FROM ({HEADS}) AS heads"
                ))?
                .query_row([], |r| r.get(0))?;
            Ok(next.map(unsql))
        })
    }

    fn record(&self, id: i64, outcome: AttemptOutcome, now_ms: u64) -> OutboxFuture<Recorded> {
        let revision = self.revision.clone();
        self.call(move |conn| record(conn, id, &outcome, now_ms, &revision))
    }

    fn deliveries(&self, endpoint: String, filter: DeliveryFilter) -> OutboxFuture<Vec<Delivery>> {
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE endpoint_id = ?1 \
                 AND (?2 IS NULL OR state = ?2) AND id < ?3 ORDER BY id DESC LIMIT ?4"
            ))?;
            let rows = statement.query_map(
                params![
                    endpoint,
                    filter.state.map(state_code),
                    filter.before.unwrap_or(i64::MAX),
                    i64::try_from(filter.limit).unwrap_or(i64::MAX),
                ],
                delivery,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn replay(&self, endpoint: String, which: Replay, now_ms: u64) -> OutboxFuture<usize> {
        self.call(move |conn| {
            let ids: Vec<i64> = match which {
                Replay::One(id) => conn
                    .prepare_cached(
                        "SELECT id FROM deliveries WHERE id = ?1 AND endpoint_id = ?2 AND state != 0",
                    )?
                    .query_map(params![id, endpoint], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
                Replay::DeadSince(since) => conn
                    .prepare_cached(
                        "SELECT id FROM deliveries WHERE endpoint_id = ?1 AND state = 2 \
                         AND created_ms >= ?2 ORDER BY id",
                    )?
                    .query_map(params![endpoint, sql(since)], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
            };
            copy_for_replay(conn, &ids, now_ms)
        })
    }

    fn prune(&self, before_ms: u64) -> OutboxFuture<usize> {
        self.call(move |conn| {
            Ok(conn
                .prepare_cached("DELETE FROM deliveries WHERE state != 0 AND finished_ms < ?1")?
                .execute([sql(before_ms)])?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::webhook::body::{Format, Mode};
    use crate::sinks::webhook::outbox::Source;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::SystemTime;

    fn endpoint(id: &str) -> EndpointRecord {
        EndpointRecord {
            id: id.into(),
            url: "http://127.0.0.1:1/hook".into(),
            streams: vec!["s".into()],
            mode: Mode::Patch,
            format: Format::Json,
            headers: BTreeMap::new(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            previous_secret: None,
            previous_expires_ms: None,
            source: Source::Api,
            created_ms: 1,
        }
    }

    fn change(epoch: u64, seq: u64, patch: bool) -> NewChange {
        NewChange {
            stream: Arc::from("s"),
            epoch,
            seq,
            patch: patch.then(|| Bytes::from_static(br#"[{"op":"add","path":"/n","value":1}]"#)),
            document: Bytes::from(format!(r#"{{"n":{seq}}}"#)),
            at: SystemTime::now(),
        }
    }

    fn target(id: &str, mode: Mode) -> Target {
        Target {
            endpoint: id.into(),
            mode,
        }
    }

    async fn memory() -> SqliteOutbox {
        SqliteOutbox::open(Path::new(":memory:")).await.unwrap()
    }

    async fn pending(outbox: &SqliteOutbox, id: &str) -> Vec<(ChangeKind, u64, Option<u64>)> {
        let mut all = outbox
            .deliveries(
                id.into(),
                DeliveryFilter {
                    state: Some(DeliveryState::Pending),
                    before: None,
                    limit: 1000,
                },
            )
            .await
            .unwrap();
        all.reverse();
        all.iter().map(|d| (d.kind, d.seq, d.base_seq)).collect()
    }

    #[tokio::test]
    async fn first_a_snapshot_then_patches_per_mode() {
        let outbox = memory().await;
        outbox.put_endpoint(endpoint("a")).await.unwrap();
        outbox.put_endpoint(endpoint("b")).await.unwrap();
        let targets = vec![target("a", Mode::Patch), target("b", Mode::Snapshot)];
        for seq in 1..=3 {
            let accepted = outbox
                .accept(change(5, seq, seq > 1), targets.clone(), 100)
                .await
                .unwrap();
            assert_eq!(accepted.queued, 2);
        }
        use ChangeKind::*;
        assert_eq!(
            pending(&outbox, "a").await,
            vec![
                (Snapshot, 1, None),
                (Patch, 2, Some(1)),
                (Patch, 3, Some(2))
            ]
        );
        assert_eq!(
            pending(&outbox, "b").await,
            vec![
                (Snapshot, 1, None),
                (Snapshot, 2, None),
                (Snapshot, 3, None)
            ]
        );
        // A new epoch (a restart) begins with a snapshot.
        outbox
            .accept(change(6, 1, false), targets.clone(), 100)
            .await
            .unwrap();
        outbox
            .accept(change(6, 2, true), targets.clone(), 100)
            .await
            .unwrap();
        assert_eq!(
            pending(&outbox, "a").await[3..],
            [(Snapshot, 1, None), (Patch, 2, Some(1))]
        );
        // A change the pair already has (a resync snapshot was newer) is skipped.
        let again = outbox
            .accept(change(6, 2, true), targets, 100)
            .await
            .unwrap();
        assert_eq!(again.queued, 0);
    }

    #[tokio::test]
    async fn only_the_oldest_pending_delivery_of_a_pair_is_due() {
        let outbox = memory().await;
        outbox.put_endpoint(endpoint("a")).await.unwrap();
        outbox.put_endpoint(endpoint("b")).await.unwrap();
        let targets = vec![target("a", Mode::Patch), target("b", Mode::Patch)];
        for seq in 1..=3 {
            outbox
                .accept(change(1, seq, seq > 1), targets.clone(), 100)
                .await
                .unwrap();
        }
        let now = u64::MAX / 4;
        let due = outbox.due(now, 10, vec![], vec![]).await.unwrap();
        assert_eq!(
            due.iter()
                .map(|d| (d.endpoint.as_str(), d.seq))
                .collect::<Vec<_>>(),
            [("a", 1), ("b", 1)]
        );
        assert!(!due[0].body.is_empty());
        // A busy pair is skipped; a delivered head uncovers the next one.
        let busy = vec![("a".to_owned(), "s".to_owned())];
        assert_eq!(outbox.due(now, 10, busy, vec![]).await.unwrap().len(), 1);
        // An endpoint at its concurrency limit is skipped whole.
        let rest = outbox.due(now, 10, vec![], vec!["a".into()]).await.unwrap();
        assert_eq!(
            rest.iter().map(|d| d.endpoint.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        outbox
            .record(due[0].id, AttemptOutcome::Delivered { status: 200 }, now)
            .await
            .unwrap();
        let mut due = outbox.due(now, 10, vec![], vec![]).await.unwrap();
        due.sort_by(|x, y| x.endpoint.cmp(&y.endpoint));
        assert_eq!(
            due.iter()
                .map(|d| (d.endpoint.as_str(), d.seq))
                .collect::<Vec<_>>(),
            [("a", 2), ("b", 1)]
        );
        // A retry in the future blocks its pair (later deliveries wait), not the others.
        let head_b = due[1].id;
        let failed = AttemptOutcome::Failed {
            status: Some(500),
            error: "500".into(),
            retry_at_ms: Some(now + 1000),
        };
        let recorded = outbox.record(head_b, failed, now).await.unwrap();
        assert_eq!(recorded.status.and_then(|s| s.failing_since_ms), Some(now));
        let due = outbox.due(now, 10, vec![], vec![]).await.unwrap();
        assert_eq!(
            due.iter().map(|d| d.endpoint.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert!(
            outbox
                .next_due_ms()
                .await
                .unwrap()
                .is_some_and(|t| t <= now)
        );
        // Disabled endpoints have nothing due.
        outbox
            .set_disabled(
                "a".into(),
                Some(Disabled {
                    at_ms: now,
                    reason: "test".into(),
                }),
            )
            .await
            .unwrap();
        assert!(
            outbox
                .due(now, 10, vec![], vec![])
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(outbox.next_due_ms().await.unwrap(), Some(now + 1000));
    }

    #[tokio::test]
    async fn a_dead_delivery_supersedes_the_patches_that_lacked_its_base() {
        let outbox = memory().await;
        outbox.put_endpoint(endpoint("a")).await.unwrap();
        let targets = vec![target("a", Mode::Patch)];
        for seq in 1..=3 {
            outbox
                .accept(change(1, seq, seq > 1), targets.clone(), 100)
                .await
                .unwrap();
        }
        let head = outbox
            .due(u64::MAX / 4, 1, vec![], vec![])
            .await
            .unwrap()
            .remove(0);
        let dead = AttemptOutcome::Failed {
            status: None,
            error: "timed out".into(),
            retry_at_ms: None,
        };
        let recorded = outbox.record(head.id, dead, 10).await.unwrap();
        assert!(recorded.needs_resync);
        assert!(pending(&outbox, "a").await.is_empty());
        let dead = outbox
            .deliveries(
                "a".into(),
                DeliveryFilter {
                    state: Some(DeliveryState::Dead),
                    before: None,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            (dead.len(), dead[0].attempts, dead[0].last_error.as_deref()),
            (1, 1, Some("timed out"))
        );
        // The cursor is gone: the next change is a snapshot, never a patch without its base.
        outbox
            .accept(change(1, 4, true), targets.clone(), 100)
            .await
            .unwrap();
        assert_eq!(
            pending(&outbox, "a").await,
            [(ChangeKind::Snapshot, 4, None)]
        );
        // With a snapshot queued after the gap, only the patches before it are superseded and
        // no resync is needed.
        let first_dead = dead[0].clone();
        outbox
            .accept(change(1, 5, true), targets.clone(), 100)
            .await
            .unwrap();
        outbox
            .accept(change(1, 6, false), targets.clone(), 100)
            .await
            .unwrap();
        let head = outbox
            .due(u64::MAX / 4, 1, vec![], vec![])
            .await
            .unwrap()
            .remove(0);
        assert_eq!(head.seq, 4);
        let dead = AttemptOutcome::Failed {
            status: Some(500),
            error: "500".into(),
            retry_at_ms: None,
        };
        assert!(!outbox.record(head.id, dead, 10).await.unwrap().needs_resync);
        assert_eq!(
            pending(&outbox, "a").await,
            [(ChangeKind::Snapshot, 6, None)]
        );
        // Replay puts the same messages (same webhook-id and body) back at the end of the queue.
        let replayed = outbox
            .replay("a".into(), Replay::DeadSince(0), 20)
            .await
            .unwrap();
        assert_eq!(replayed, 2);
        assert_eq!(
            pending(&outbox, "a").await,
            [
                (ChangeKind::Snapshot, 6, None),
                (ChangeKind::Snapshot, 1, None),
                (ChangeKind::Snapshot, 4, None)
            ]
        );
        let six = outbox
            .due(u64::MAX / 4, 1, vec![], vec![])
            .await
            .unwrap()
            .remove(0);
        outbox
            .record(six.id, AttemptOutcome::Delivered { status: 204 }, 30)
            .await
            .unwrap();
        let again = outbox
            .due(u64::MAX / 4, 1, vec![], vec![])
            .await
            .unwrap()
            .remove(0);
        assert_eq!(
            (again.msg_id.as_str(), again.attempts),
            (first_dead.msg_id.as_str(), 0)
        );
        assert_eq!(again.seq, 1);
        // Replaying one delivery by id; a pending one cannot be replayed.
        assert_eq!(
            outbox
                .replay("a".into(), Replay::One(six.id), 40)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            outbox
                .replay("a".into(), Replay::One(again.id), 40)
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            outbox
                .replay("b".into(), Replay::One(six.id), 40)
                .await
                .unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn a_long_backlog_collapses_into_one_snapshot() {
        let outbox = memory().await;
        outbox.put_endpoint(endpoint("a")).await.unwrap();
        let targets = vec![target("a", Mode::Patch)];
        for seq in 1..=5 {
            outbox
                .accept(change(1, seq, seq > 1), targets.clone(), 3)
                .await
                .unwrap();
        }
        // 1, 2, 3 pending; 4 found three pending: all superseded, 4 queued as a snapshot; 5 patches it.
        assert_eq!(
            pending(&outbox, "a").await,
            [
                (ChangeKind::Snapshot, 4, None),
                (ChangeKind::Patch, 5, Some(4))
            ]
        );
        let superseded = outbox
            .deliveries(
                "a".into(),
                DeliveryFilter {
                    state: Some(DeliveryState::Superseded),
                    before: None,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        assert_eq!(superseded.len(), 3);
        assert_eq!(outbox.prune(u64::MAX / 2).await.unwrap(), 3);
    }

    /// Statuses are numbered in the order the outbox ran the operations, whatever order
    /// their callers see the answers in.
    #[tokio::test]
    async fn statuses_are_numbered_in_the_outbox_order() {
        let outbox = memory().await;
        outbox.put_endpoint(endpoint("a")).await.unwrap();
        let disabled = Disabled {
            at_ms: 5,
            reason: "test".into(),
        };
        let first = outbox.set_disabled("a".into(), Some(disabled.clone()));
        let second = outbox.set_disabled("a".into(), None);
        let second = second.await.unwrap().unwrap();
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.disabled, Some(disabled));
        assert_eq!(second.disabled, None);
        assert!(second.revision > first.revision);
        assert_eq!(
            outbox.set_disabled("nope".into(), None).await.unwrap(),
            None
        );
    }

    /// A push stream's document is stored and read back; an older one never replaces it.
    #[tokio::test]
    async fn documents_never_step_back() {
        let outbox = memory().await;
        let doc = |epoch, seq, json: &'static str| StoredDocument {
            stream: Arc::from("s"),
            epoch,
            seq,
            document: Bytes::from_static(json.as_bytes()),
            at: std::time::UNIX_EPOCH + Duration::from_millis(7),
        };
        outbox.save_document(doc(1, 2, "{\"n\":2}")).await.unwrap();
        outbox.save_document(doc(1, 1, "{\"n\":1}")).await.unwrap();
        assert_eq!(
            outbox.documents().await.unwrap(),
            vec![doc(1, 2, "{\"n\":2}")]
        );
        // Another epoch (a stream that started afresh) replaces it.
        outbox.save_document(doc(2, 1, "[]")).await.unwrap();
        assert_eq!(outbox.documents().await.unwrap(), vec![doc(2, 1, "[]")]);
    }

    #[tokio::test]
    async fn everything_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        {
            let outbox = SqliteOutbox::open(&path).await.unwrap();
            outbox.put_endpoint(endpoint("a")).await.unwrap();
            outbox
                .accept(change(1, 1, false), vec![target("a", Mode::Patch)], 10)
                .await
                .unwrap();
        }
        let outbox = SqliteOutbox::open(&path).await.unwrap();
        let endpoints = outbox.endpoints().await.unwrap();
        let fresh = EndpointStatus {
            revision: endpoints[0].1.revision,
            ..EndpointStatus::default()
        };
        assert_eq!(endpoints, vec![(endpoint("a"), fresh)]);
        assert_eq!(
            pending(&outbox, "a").await,
            [(ChangeKind::Snapshot, 1, None)]
        );
        let mode: String = {
            let conn = Connection::open(&path).unwrap();
            conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(mode, "wal");
        assert!(outbox.delete_endpoint("a".into()).await.unwrap());
        assert!(pending(&outbox, "a").await.is_empty());
    }

    #[tokio::test]
    async fn a_missing_directory_is_a_clear_error() {
        let err = SqliteOutbox::open(Path::new("/nonexistent-dir/x/outbox.db"))
            .await
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent-dir/x") && text.contains("does not exist"),
            "{text}"
        );
    }
}

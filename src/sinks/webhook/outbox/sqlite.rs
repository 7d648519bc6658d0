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
    Accepted, Attempt, AttemptEntry, AttemptFilter, AttemptOutcome, AttemptResult, Bodies, Claim,
    Created, Delivery, DeliveryFilter, Disabled, EndpointRecord, EndpointStatus, NewChange,
    NewNotice, Next, Notes, OperatorDelivery, OperatorHead, OperatorNote, Outbox, OutboxError,
    OutboxFuture, Recorded, Replay, StoredDocument, Target, collapses, int, kind_code, kind_of,
    state_code, state_of, stored_cursor, told_now, uint,
};
use crate::sinks::webhook::body::DeliveryKind;
use crate::sinks::webhook::body::{self, Cursor, Plan};
use crate::sinks::webhook::sign::message_id;
use crate::time::unix_ms;

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
-- Every attempt, for the history the admin API lists (pruned after webhooks.attempt_retention).
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id INTEGER NOT NULL,
    endpoint_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    result INTEGER NOT NULL,
    status INTEGER,
    error TEXT,
    response TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_endpoint ON attempts (endpoint_id, id);
CREATE INDEX IF NOT EXISTS attempts_at ON attempts (at_ms);
-- The highest dispatcher fence that wrote each stream's changes (see Outbox::accept).
CREATE TABLE IF NOT EXISTS fences (
    stream TEXT PRIMARY KEY,
    fence INTEGER NOT NULL
) WITHOUT ROWID;
-- Version 2: operational events for webhooks.operator_url, stored when they happen and sent
-- in order (state: 0 pending, 1 delivered, 2 dead), each once per key. Deliveries gained the
-- notice kinds (2 error, 3 recovery) in the same version: a version-1 patchwire would read
-- them as snapshots, so it refuses this file.
CREATE TABLE IF NOT EXISTS operator_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    msg_id TEXT NOT NULL,
    body BLOB NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX IF NOT EXISTS operator_events_pending ON operator_events (id) WHERE state = 0;
";

/// Version 3: whether each pair was told its stream fails (a `stream.error` queued, no
/// `stream.recovered` since), and where its cursor was then (see [`super::told_now`]). Run
/// once, with the version, in one transaction.
const SCHEMA_V3: &str = "
BEGIN;
ALTER TABLE cursors ADD COLUMN failing INTEGER NOT NULL DEFAULT 0;
ALTER TABLE cursors ADD COLUMN failing_epoch INTEGER;
ALTER TABLE cursors ADD COLUMN failing_seq INTEGER;
PRAGMA user_version = 3;
COMMIT;
";

/// The schema version this code writes (older files are upgraded when opened).
const SCHEMA_VERSION: i64 = 3;

const PENDING: i64 = 0;

fn sql(value: u64) -> i64 {
    int(value)
}

fn unsql(value: i64) -> u64 {
    uint(value)
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
        kind: kind_of(row.get(4)?),
        epoch: unsql(row.get(5)?),
        seq: unsql(row.get(6)?),
        base_seq: row.get::<_, Option<i64>>(7)?.map(unsql),
        body: Bytes::new(),
        state: state_of(row.get(8)?),
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
    if version > SCHEMA_VERSION {
        return Err(fail(format!(
            "the database has schema version {version}, newer than this patchwire \
             ({SCHEMA_VERSION}); use a newer patchwire or another file"
        )));
    }
    conn.execute_batch(SCHEMA)
        .map_err(|e| fail(format!("cannot create the schema: {e}")))?;
    if version < 3 {
        conn.execute_batch(SCHEMA_V3).map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            fail(format!("cannot upgrade the schema to version 3: {e}"))
        })?;
    }
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

/// Refuses a write by a dispatcher whose fence is below the stream's highest (see
/// [`Outbox::accept`]); records the fence otherwise.
fn check_fence(conn: &Connection, stream: &str, fence: Option<u64>) -> Result<(), OutboxError> {
    let Some(fence) = fence else {
        return Ok(());
    };
    let changed = conn
        .prepare_cached(
            "INSERT INTO fences (stream, fence) VALUES (?1, ?2) \
             ON CONFLICT (stream) DO UPDATE SET fence = ?2 WHERE fence <= ?2",
        )?
        .execute(params![stream, sql(fence)])?;
    if changed == 0 {
        return Err(OutboxError::Fenced);
    }
    Ok(())
}

/// Forgets a pair's cursor: its next delivery is a snapshot, and it is owed one now.
fn forget_cursor(conn: &Connection, endpoint: &str, stream: &str) -> Result<(), OutboxError> {
    conn.prepare_cached(
        "INSERT INTO cursors (endpoint_id, stream, epoch, seq) VALUES (?1, ?2, NULL, NULL) \
         ON CONFLICT (endpoint_id, stream) DO UPDATE SET epoch = NULL, seq = NULL",
    )?
    .execute(params![endpoint, stream])?;
    Ok(())
}

fn accept(
    conn: &Connection,
    change: &NewChange,
    targets: &[Target],
    backlog_limit: usize,
    fence: Option<u64>,
) -> Result<Accepted, OutboxError> {
    check_fence(conn, &change.stream, fence)?;
    let now = unix_ms(std::time::SystemTime::now());
    let mut rng = rand::rng();
    let mut bodies = Bodies::new(change);
    let mut accepted = Accepted::default();
    let stream: &str = &change.stream;
    for target in targets {
        // An endpoint deleted since the caller listed it gets nothing.
        let exists = conn
            .prepare_cached("SELECT 1 FROM endpoints WHERE id = ?1")?
            .exists([&target.endpoint])?;
        if !exists {
            continue;
        }
        let cursor = conn
            .prepare_cached(
                "SELECT epoch, seq FROM cursors WHERE endpoint_id = ?1 AND stream = ?2",
            )?
            .query_row(params![target.endpoint, stream], |r| {
                Ok(stored_cursor(r.get(0)?, r.get(1)?))
            })
            .optional()?
            .flatten();
        let plan = body::plan_after(
            cursor,
            change.epoch,
            change.seq,
            change.base.unwrap_or(change.seq.saturating_sub(1)),
            change.patch.is_some(),
            target.mode,
        );
        if plan == Plan::Skip {
            continue;
        }
        // Counted from the pending index alone (filtering on `kind` would read every pending
        // row, per change, and made a backlog quadratic: 3x fewer deliveries/s); the few
        // notices a pair may have pending count towards its backlog like changes.
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
            // Changes only: a notice never lacks a base, and says what no snapshot says.
            conn.prepare_cached(
                "UPDATE deliveries SET state = 3, finished_ms = ?3 \
                 WHERE endpoint_id = ?1 AND stream = ?2 AND state = 0 AND kind < 2",
            )?
            .execute(params![target.endpoint, stream, sql(now)])?;
            accepted.collapsed += 1;
        }
        let Some((kind, base_seq, bytes)) = bodies.delivery(plan, collapse)? else {
            forget_cursor(conn, &target.endpoint, stream)?;
            accepted.owed += 1;
            continue;
        };
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

/// Queues a notice for its targets: after what each pair has queued, no cursor moved. A pair
/// without a cursor row gets one (forgotten: it is owed a document it never got), so the
/// worker finds its queue.
fn notice(
    conn: &Connection,
    notice: &NewNotice,
    targets: &[String],
    fence: Option<u64>,
) -> Result<usize, OutboxError> {
    check_fence(conn, &notice.stream, fence)?;
    let now = unix_ms(std::time::SystemTime::now());
    let mut rng = rand::rng();
    let stream: &str = &notice.stream;
    let mut queued = 0;
    for endpoint in targets {
        let exists = conn
            .prepare_cached("SELECT 1 FROM endpoints WHERE id = ?1")?
            .exists([endpoint])?;
        if !exists {
            continue;
        }
        conn.prepare_cached(
            "INSERT INTO cursors (endpoint_id, stream, epoch, seq) VALUES (?1, ?2, NULL, NULL) \
             ON CONFLICT (endpoint_id, stream) DO NOTHING",
        )?
        .execute(params![endpoint, stream])?;
        let (cursor, mut told) = conn
            .prepare_cached(
                "SELECT epoch, seq, failing, failing_epoch, failing_seq FROM cursors \
                 WHERE endpoint_id = ?1 AND stream = ?2",
            )?
            .query_row(params![endpoint, stream], |r| {
                let told = r
                    .get::<_, bool>(2)?
                    .then(|| Ok::<_, rusqlite::Error>(stored_cursor(r.get(3)?, r.get(4)?)))
                    .transpose()?;
                Ok((stored_cursor(r.get(0)?, r.get(1)?), told))
            })?;
        if !told_now(&mut told, notice.kind, cursor) {
            continue;
        }
        conn.prepare_cached(
            "UPDATE cursors SET failing = ?3, failing_epoch = ?4, failing_seq = ?5 \
             WHERE endpoint_id = ?1 AND stream = ?2",
        )?
        .execute(params![
            endpoint,
            stream,
            told.is_some(),
            told.flatten().map(|c| sql(c.epoch)),
            told.flatten().map(|c| sql(c.seq)),
        ])?;
        conn.prepare_cached(
            "INSERT INTO deliveries (endpoint_id, stream, msg_id, kind, epoch, seq, base_seq, \
             body, state, attempts, next_attempt_ms, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7, 0, 0, ?8, ?8)",
        )?
        .execute(params![
            endpoint,
            stream,
            message_id(now, &mut rng),
            kind_code(DeliveryKind::Notice(notice.kind)),
            sql(notice.epoch),
            sql(notice.seq),
            &notice.body[..],
            sql(now),
        ])?;
        queued += 1;
    }
    Ok(queued)
}

/// Stores an operational event unless its key is stored; true when stored now.
fn note(conn: &Connection, note: &OperatorNote) -> Result<bool, OutboxError> {
    let stored = conn
        .prepare_cached(
            "INSERT INTO operator_events (key, msg_id, body, state, attempts, next_attempt_ms, \
             created_ms) VALUES (?1, ?2, ?3, 0, 0, ?4, ?4) ON CONFLICT (key) DO NOTHING",
        )?
        .execute(params![
            note.key,
            note.msg_id,
            &note.body[..],
            sql(note.at_ms)
        ])?;
    Ok(stored > 0)
}

fn record(
    conn: &Connection,
    id: i64,
    outcome: &AttemptOutcome,
    attempt: &Attempt,
    revision: &AtomicU64,
    next: Option<&Next>,
    notes: &Notes,
) -> Result<Recorded, OutboxError> {
    let now = attempt.ended_ms();
    let Some((endpoint, stream, state, msg_id, kind)) = conn
        .prepare_cached(
            "SELECT endpoint_id, stream, state, msg_id, kind FROM deliveries WHERE id = ?1",
        )?
        .query_row([id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i16>(4)?,
            ))
        })
        .optional()?
    else {
        // Deleted with its endpoint while in flight.
        return Ok(Recorded::default());
    };
    let (status, error) = match outcome {
        AttemptOutcome::Delivered { status } => (Some(*status), None),
        AttemptOutcome::Failed { status, error, .. } => (*status, Some(error.as_str())),
    };
    conn.prepare_cached(
        "INSERT INTO attempts (delivery_id, endpoint_id, stream, msg_id, at_ms, duration_ms, \
         result, status, error, response) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        id,
        endpoint,
        stream,
        msg_id,
        sql(attempt.at_ms),
        sql(attempt.duration_ms),
        AttemptResult::of(outcome).code(),
        status,
        error,
        attempt.response,
    ])?;
    let mut recorded = Recorded::default();
    match outcome {
        AttemptOutcome::Delivered { status } => {
            conn.prepare_cached(
                "UPDATE deliveries SET attempts = attempts + 1, last_status = ?2, \
                 last_error = NULL, state = CASE WHEN state = 0 THEN 1 ELSE state END, \
                 finished_ms = COALESCE(finished_ms, ?3) WHERE id = ?1",
            )?
            .execute(params![id, status, sql(now)])?;
            let recovered = conn.prepare_cached("UPDATE endpoints SET failing_since_ms = NULL WHERE id = ?1 AND failing_since_ms IS NOT NULL")?
                .execute([&endpoint])?;
            if recovered > 0
                && let Some(recovery) = &notes.if_recovered
            {
                note(conn, recovery)?;
            }
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
                    // A dead notice leaves no gap: no change lacks its base.
                    if state == PENDING && kind < super::FIRST_NOTICE_CODE {
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
    for event in &notes.always {
        note(conn, event)?;
    }
    recorded.status = read_status(conn, &endpoint, revision)?;
    if let Some(next) = next {
        // One process: the worker's own bookkeeping holds the pair, nothing is written.
        let mut statement = conn.prepare_cached(&format!(
            "{HEADS} WHERE c.endpoint_id = ?1 AND c.stream = ?2 AND d.next_attempt_ms <= ?3"
        ))?;
        recorded.next = statement
            .query_row(params![endpoint, stream, sql(next.now_ms)], delivery)
            .optional()?;
        if let Some(d) = &mut recorded.next {
            d.body = Bytes::from(
                conn.prepare_cached("SELECT body FROM deliveries WHERE id = ?1")?
                    .query_row([d.id], |r| r.get::<_, Vec<u8>>(0))?,
            );
        }
    }
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
         AND state = 0 AND id < ?4 AND kind < 2",
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
    fn check(&self) -> OutboxFuture<()> {
        self.call(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
    }

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

    fn put_endpoint(&self, record: EndpointRecord) -> OutboxFuture<EndpointStatus> {
        let revision = self.revision.clone();
        self.call(move |conn| {
            let definition = serde_json::to_string(&record)
                .map_err(|e| OutboxError::Storage(format!("cannot encode an endpoint: {e}")))?;
            conn.prepare_cached(
                "INSERT INTO endpoints (id, definition) VALUES (?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET definition = ?2",
            )?
            .execute(params![record.id, definition])?;
            read_status(conn, &record.id, &revision)?.ok_or_else(|| {
                OutboxError::Storage(format!(
                    "endpoint {:?} vanished as it was stored",
                    record.id
                ))
            })
        })
    }

    fn create_endpoint(&self, record: EndpointRecord) -> OutboxFuture<Created> {
        let revision = self.revision.clone();
        self.call(move |conn| {
            let definition = serde_json::to_string(&record)
                .map_err(|e| OutboxError::Storage(format!("cannot encode an endpoint: {e}")))?;
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO endpoints (id, definition) VALUES (?1, ?2) \
                     ON CONFLICT (id) DO NOTHING",
                )?
                .execute(params![record.id, definition])?;
            let existing: String = conn
                .prepare_cached("SELECT definition FROM endpoints WHERE id = ?1")?
                .query_row([&record.id], |r| r.get(0))?;
            let status = read_status(conn, &record.id, &revision)?.ok_or_else(|| {
                OutboxError::Storage(format!(
                    "endpoint {:?} vanished as it was stored",
                    record.id
                ))
            })?;
            if inserted > 0 {
                return Ok(Created::New(status));
            }
            let existing: EndpointRecord = serde_json::from_str(&existing).map_err(|e| {
                OutboxError::Storage(format!(
                    "endpoint {:?} is stored unreadably: {e}",
                    record.id
                ))
            })?;
            Ok(Created::Existing(Box::new(existing), status))
        })
    }

    fn set_disabled_noted(
        &self,
        id: String,
        disabled: Option<Disabled>,
        event: Option<OperatorNote>,
        failing_since: Option<u64>,
    ) -> OutboxFuture<Option<EndpointStatus>> {
        let revision = self.revision.clone();
        self.call(move |conn| {
            let Some((was, failing)) = conn
                .prepare_cached(
                    "SELECT disabled_at_ms IS NOT NULL, failing_since_ms FROM endpoints \
                     WHERE id = ?1",
                )?
                .query_row([&id], |r| Ok((r.get::<_, bool>(0)?, r.get::<_, Option<i64>>(1)?)))
                .optional()?
            else {
                return Ok(None);
            };
            if let Some(since) = failing_since
                && failing != Some(sql(since))
            {
                return Ok(None);
            }
            if let Some(event) = &event
                && was != disabled.is_some()
            {
                note(conn, event)?;
            }
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
            conn.prepare_cached("DELETE FROM attempts WHERE endpoint_id = ?1")?
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
        fence: Option<u64>,
    ) -> OutboxFuture<Accepted> {
        self.call(move |conn| accept(conn, &change, &targets, backlog_limit, fence))
    }

    fn cursors(&self, stream: String) -> OutboxFuture<Vec<(String, Option<Cursor>)>> {
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT endpoint_id, epoch, seq FROM cursors WHERE stream = ?1 ORDER BY endpoint_id",
            )?;
            let rows = statement.query_map([&stream], |r| {
                let cursor = stored_cursor(r.get(1)?, r.get(2)?);
                Ok((r.get::<_, String>(0)?, cursor))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn owed(&self, stream: String) -> OutboxFuture<Vec<String>> {
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT endpoint_id FROM cursors WHERE stream = ?1 AND seq IS NULL \
                 ORDER BY endpoint_id",
            )?;
            let rows = statement.query_map([&stream], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn owe_snapshot(&self, endpoint: String, streams: Vec<String>) -> OutboxFuture<()> {
        self.call(move |conn| {
            for stream in &streams {
                forget_cursor(conn, &endpoint, stream)?;
            }
            Ok(())
        })
    }

    /// One process owns the file: the worker's own in-flight pairs (`busy`, `full`) are every
    /// claim there is, so nothing is written.
    fn due(&self, claim: Claim) -> OutboxFuture<Vec<Delivery>> {
        self.call(move |conn| due(conn, claim.now_ms, claim.limit, &claim.busy, &claim.full))
    }

    fn release(&self, _id: i64) -> OutboxFuture<()> {
        Box::pin(async { Ok(()) })
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

    fn record_noted(
        &self,
        id: i64,
        outcome: AttemptOutcome,
        attempt: Attempt,
        next: Option<Next>,
        notes: Notes,
    ) -> OutboxFuture<Recorded> {
        let revision = self.revision.clone();
        self.call(move |conn| {
            record(
                conn,
                id,
                &outcome,
                &attempt,
                &revision,
                next.as_ref(),
                &notes,
            )
        })
    }

    fn notice(
        &self,
        notice: NewNotice,
        targets: Vec<String>,
        fence: Option<u64>,
    ) -> OutboxFuture<usize> {
        self.call(move |conn| self::notice(conn, &notice, &targets, fence))
    }

    fn note(&self, event: OperatorNote) -> OutboxFuture<bool> {
        self.call(move |conn| note(conn, &event))
    }

    /// One process owns the file and runs one sender: the head is the caller's.
    fn operator_head(
        &self,
        now_ms: u64,
        _owner: Arc<str>,
        _hold: Duration,
    ) -> OutboxFuture<OperatorHead> {
        self.call(move |conn| {
            let head = conn
                .prepare_cached(
                    "SELECT id, msg_id, body, attempts, next_attempt_ms, created_ms \
                     FROM operator_events WHERE state = 0 ORDER BY id LIMIT 1",
                )?
                .query_row([], |r| {
                    Ok(OperatorDelivery {
                        id: r.get(0)?,
                        msg_id: r.get(1)?,
                        body: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                        attempts: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(u32::MAX),
                        next_attempt_ms: unsql(r.get(4)?),
                        created_ms: unsql(r.get(5)?),
                    })
                })
                .optional()?;
            Ok(match head {
                None => OperatorHead::Empty,
                Some(head) if head.next_attempt_ms > now_ms => {
                    OperatorHead::Later(head.next_attempt_ms)
                }
                Some(head) => OperatorHead::Due(head),
            })
        })
    }

    fn operator_record(&self, id: i64, outcome: AttemptOutcome, at_ms: u64) -> OutboxFuture<()> {
        self.call(move |conn| {
            match outcome {
                AttemptOutcome::Delivered { .. } => conn
                    .prepare_cached(
                        "UPDATE operator_events SET state = 1, attempts = attempts + 1, \
                         last_error = NULL, finished_ms = ?2 WHERE id = ?1",
                    )?
                    .execute(params![id, sql(at_ms)])?,
                AttemptOutcome::Failed {
                    error,
                    retry_at_ms: Some(retry),
                    ..
                } => conn
                    .prepare_cached(
                        "UPDATE operator_events SET attempts = attempts + 1, last_error = ?2, \
                         next_attempt_ms = ?3 WHERE id = ?1",
                    )?
                    .execute(params![id, error, sql(retry)])?,
                AttemptOutcome::Failed {
                    error,
                    retry_at_ms: None,
                    ..
                } => conn
                    .prepare_cached(
                        "UPDATE operator_events SET state = 2, attempts = attempts + 1, \
                         last_error = ?2, finished_ms = ?3 WHERE id = ?1",
                    )?
                    .execute(params![id, error, sql(at_ms)])?,
            };
            Ok(())
        })
    }

    fn attempts(&self, endpoint: String, filter: AttemptFilter) -> OutboxFuture<Vec<AttemptEntry>> {
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id, delivery_id, msg_id, stream, at_ms, duration_ms, response, result, \
                 status, error FROM attempts WHERE endpoint_id = ?1 \
                 AND (?2 IS NULL OR stream = ?2) AND (?3 IS NULL OR result = ?3) \
                 AND (?4 IS NULL OR status = ?4) AND at_ms >= ?5 AND at_ms < ?6 AND id < ?7 \
                 ORDER BY id DESC LIMIT ?8",
            )?;
            let rows = statement.query_map(
                params![
                    endpoint,
                    filter.stream,
                    filter.result.map(AttemptResult::code),
                    filter.status,
                    sql(filter.since_ms.unwrap_or(0)),
                    sql(filter.until_ms.unwrap_or(u64::MAX)),
                    filter.before.unwrap_or(i64::MAX),
                    i64::try_from(filter.limit).unwrap_or(i64::MAX),
                ],
                |r| {
                    Ok(AttemptEntry {
                        id: r.get(0)?,
                        delivery: r.get(1)?,
                        msg_id: r.get(2)?,
                        stream: r.get(3)?,
                        attempt: Attempt {
                            at_ms: unsql(r.get(4)?),
                            duration_ms: unsql(r.get(5)?),
                            response: r.get(6)?,
                        },
                        result: AttemptResult::of_code(r.get(7)?),
                        status: r
                            .get::<_, Option<i64>>(8)?
                            .and_then(|s| u16::try_from(s).ok()),
                        error: r.get(9)?,
                    })
                },
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
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
                Replay::Since(since) => conn
                    .prepare_cached(
                        "SELECT id FROM deliveries WHERE endpoint_id = ?1 AND state IN (1, 2) \
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
            let deliveries = conn
                .prepare_cached("DELETE FROM deliveries WHERE state != 0 AND finished_ms < ?1")?
                .execute([sql(before_ms)])?;
            let events = conn
                .prepare_cached(
                    "DELETE FROM operator_events WHERE state != 0 AND finished_ms < ?1",
                )?
                .execute([sql(before_ms)])?;
            Ok(deliveries + events)
        })
    }

    fn prune_attempts(&self, before_ms: u64) -> OutboxFuture<usize> {
        self.call(move |conn| {
            Ok(conn
                .prepare_cached("DELETE FROM attempts WHERE at_ms < ?1")?
                .execute([sql(before_ms)])?)
        })
    }
}

/// What every store must do is tested against both in `tests/it/outbox.rs`; these are the
/// file's own properties.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::webhook::body::{Format, Mode};
    use crate::sinks::webhook::outbox::{DeliveryState, Source};
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
            description: None,
            metadata: Default::default(),
            rate_limit: None,
            events: Default::default(),
            request_hash: None,
            view_filters: Default::default(),
        }
    }

    #[tokio::test]
    async fn everything_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        {
            let outbox = SqliteOutbox::open(&path).await.unwrap();
            outbox.put_endpoint(endpoint("a")).await.unwrap();
            let change = NewChange {
                stream: Arc::from("s"),
                epoch: 1,
                seq: 1,
                base: None,
                patch: None,
                document: Some(Bytes::from_static(b"{}")),
                at: SystemTime::now(),
            };
            let target = Target {
                endpoint: "a".into(),
                mode: Mode::Patch,
            };
            outbox.accept(change, vec![target], 10, None).await.unwrap();
        }
        let outbox = SqliteOutbox::open(&path).await.unwrap();
        let endpoints = outbox.endpoints().await.unwrap();
        let fresh = EndpointStatus {
            revision: endpoints[0].1.revision,
            ..EndpointStatus::default()
        };
        assert_eq!(endpoints, vec![(endpoint("a"), fresh)]);
        let pending = outbox
            .deliveries(
                "a".into(),
                DeliveryFilter {
                    state: Some(DeliveryState::Pending),
                    before: None,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            pending.iter().map(|d| (d.kind, d.seq)).collect::<Vec<_>>(),
            [(DeliveryKind::SNAPSHOT, 1)]
        );
        let mode: String = {
            let conn = Connection::open(&path).unwrap();
            conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(mode, "wal");
        assert!(outbox.delete_endpoint("a".into()).await.unwrap());
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

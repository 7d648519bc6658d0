//! The shared outbox: PostgreSQL, which every node of a cluster reaches.
//!
//! The nodes share endpoints, deliveries, cursors and claims here. What keeps the rules of
//! [`super`] across processes:
//! - **One writer per stream at a time.** Every accept of a stream locks the stream's row of
//!   `patchwire_fences` first, so accepts of one stream are serialized whichever node makes
//!   them; a dispatcher whose fence is below the highest recorded is refused
//!   ([`OutboxError::Fenced`]). A pair's cursor row is locked before it is read, and a dead
//!   delivery locks it too before superseding what follows it, so a patch is never planned on a
//!   base that is being superseded.
//! - **One delivery in flight per pair, across nodes.** Only a pair's oldest pending delivery
//!   (its head) is ever claimed, and a claim (`claimed_by`, `claimed_until_ms` in the database's
//!   clock) is taken with `FOR UPDATE SKIP LOCKED` on a head whose claim is absent or expired.
//!   Recording the attempt releases it; a node killed mid-attempt leaves it, and another node
//!   takes the delivery again (same `webhook-id`) once it expires.
//! - **Durable before answered.** Every operation is answered after its transaction committed.
//!
//! Throughput comes from batching, as with SQLite: accepts queue to one task that runs each
//! stream's queued changes in one transaction (streams in parallel, on pooled connections), and
//! attempts' outcomes queue to one task that records them together.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::{
    Accepted, Attempt, AttemptEntry, AttemptFilter, AttemptOutcome, AttemptResult, Bodies, Claim,
    Created, Delivery, DeliveryFilter, DeliveryState, Disabled, EndpointRecord, EndpointStatus,
    FIRST_NOTICE_CODE, NewChange, NewNotice, Next, Notes, OperatorDelivery, OperatorHead,
    OperatorNote, Outbox, OutboxError, OutboxFuture, Recorded, Replay, StoredDocument, Target,
    collapses, int, kind_code, kind_of, state_code, state_of, stored_cursor, told_now, uint,
};
use crate::sinks::webhook::body::DeliveryKind;
use crate::sinks::webhook::body::{self, Cursor, Plan};
use crate::sinks::webhook::sign::message_id;
use crate::time::unix_ms;

/// Jobs taken into one round of transactions at most.
const BATCH: usize = 1024;

/// The schema version this code writes; a database with a newer one is refused.
const SCHEMA_VERSION: i32 = 3;

/// Serializes schema migrations of nodes starting at once (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x7061_7463_6877_6972; // "patchwir"

/// The first schema. Names are prefixed so the tables can live in a database shared with
/// other applications.
const SCHEMA_V1: &str = "
CREATE SEQUENCE patchwire_revisions;
CREATE TABLE patchwire_endpoints (
    id text PRIMARY KEY,
    definition text NOT NULL,
    disabled_at_ms bigint,
    disabled_reason text,
    failing_since_ms bigint,
    revision bigint NOT NULL DEFAULT nextval('patchwire_revisions')
);
-- One row per (endpoint, stream) pair that ever had a delivery: where its queue ends (NULL
-- after a gap, or when the pair is owed the current document). Also the pairs workers scan.
CREATE TABLE patchwire_cursors (
    endpoint_id text NOT NULL,
    stream text NOT NULL,
    epoch bigint,
    seq bigint,
    PRIMARY KEY (endpoint_id, stream)
);
CREATE TABLE patchwire_deliveries (
    id bigserial PRIMARY KEY,
    endpoint_id text NOT NULL,
    stream text NOT NULL,
    msg_id text NOT NULL,
    kind smallint NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    base_seq bigint,
    body bytea NOT NULL,
    state smallint NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_ms bigint NOT NULL,
    last_error text,
    last_status integer,
    created_ms bigint NOT NULL,
    finished_ms bigint,
    claimed_by text,
    claimed_until_ms bigint
) WITH (fillfactor = 80);
-- Few indexes, none on the claim columns: a claim (and its release) is then a HOT update,
-- which touches no index; room is left on each page for it.
CREATE INDEX patchwire_deliveries_pending
    ON patchwire_deliveries (endpoint_id, stream, id) WHERE state = 0;
CREATE INDEX patchwire_deliveries_by_endpoint ON patchwire_deliveries (endpoint_id, id);
-- Every attempt, for the history the admin API lists (pruned after webhooks.attempt_retention).
CREATE TABLE patchwire_attempts (
    id bigserial PRIMARY KEY,
    delivery_id bigint NOT NULL,
    endpoint_id text NOT NULL,
    stream text NOT NULL,
    msg_id text NOT NULL,
    at_ms bigint NOT NULL,
    duration_ms bigint NOT NULL,
    result smallint NOT NULL,
    status integer,
    error text,
    response text NOT NULL
);
CREATE INDEX patchwire_attempts_by_endpoint ON patchwire_attempts (endpoint_id, id);
CREATE INDEX patchwire_attempts_at ON patchwire_attempts (at_ms);
-- The current document of each push stream (a single node's: a cluster keeps them in Redis).
CREATE TABLE patchwire_documents (
    stream text PRIMARY KEY,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    document bytea NOT NULL,
    at_ms bigint NOT NULL
);
-- The highest dispatcher fence that wrote each stream's changes; its row is the stream's
-- accept lock.
CREATE TABLE patchwire_fences (
    stream text PRIMARY KEY,
    fence bigint NOT NULL
);
";

/// Version 2: operational events for `webhooks.operator_url`, stored once per key when they
/// happen and sent in order by whichever node claims the head (state: 0 pending, 1 delivered,
/// 2 dead). Deliveries gained the notice kinds (2 error, 3 recovery) in the same version: a
/// version-1 patchwire would read them as snapshots, so it refuses this database.
const SCHEMA_V2: &str = "
CREATE TABLE patchwire_operator_events (
    id bigserial PRIMARY KEY,
    key text NOT NULL UNIQUE,
    msg_id text NOT NULL,
    body bytea NOT NULL,
    state smallint NOT NULL DEFAULT 0,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_ms bigint NOT NULL,
    last_error text,
    created_ms bigint NOT NULL,
    finished_ms bigint,
    claimed_by text,
    claimed_until_ms bigint
);
CREATE INDEX patchwire_operator_events_pending ON patchwire_operator_events (id) WHERE state = 0;
";

/// Version 3: whether each pair was told its stream fails (a `stream.error` queued, no
/// `stream.recovered` since), and where its cursor was then: a node taking the stream over, or
/// a process restarted, while the upstream still fails tells no one twice.
const SCHEMA_V3: &str = "
ALTER TABLE patchwire_cursors
    ADD COLUMN failing boolean NOT NULL DEFAULT false,
    ADD COLUMN failing_epoch bigint,
    ADD COLUMN failing_seq bigint;
";

/// The database's clock in Unix milliseconds: claims are timed by it, so the nodes' clocks
/// need not agree.
const DB_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

const DELIVERY_COLUMNS: &str = "id, endpoint_id, stream, msg_id, kind, epoch, seq, base_seq, \
     state, attempts, next_attempt_ms, last_error, last_status, created_ms, finished_ms";

/// What PostgreSQL said: the server's message (severity, text, detail) when there is one,
/// not only "db error"; the client's otherwise (a refused connection, a timeout).
fn said(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("PostgreSQL: {db}"),
        None => match std::error::Error::source(error) {
            Some(cause) => format!("PostgreSQL: {error}: {cause}"),
            None => format!("PostgreSQL: {error}"),
        },
    }
}

impl From<tokio_postgres::Error> for OutboxError {
    fn from(error: tokio_postgres::Error) -> Self {
        OutboxError::Storage(said(&error))
    }
}

impl From<deadpool_postgres::PoolError> for OutboxError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(error) => {
                OutboxError::Storage(format!("no PostgreSQL connection: {}", said(&error)))
            }
            other => OutboxError::Storage(format!("no PostgreSQL connection: {other}")),
        }
    }
}

/// A delivery from a row of `DELIVERY_COLUMNS` (and `body` after them, when selected).
fn delivery(row: &tokio_postgres::Row) -> Delivery {
    delivery_at(row, 0)
}

/// A delivery from the `DELIVERY_COLUMNS` of a row starting at column `at` (and `body` after
/// them, when selected).
fn delivery_at(row: &tokio_postgres::Row, at: usize) -> Delivery {
    Delivery {
        id: row.get(at),
        endpoint: row.get(at + 1),
        stream: row.get(at + 2),
        msg_id: row.get(at + 3),
        kind: kind_of(row.get(at + 4)),
        epoch: uint(row.get(at + 5)),
        seq: uint(row.get(at + 6)),
        base_seq: row.get::<_, Option<i64>>(at + 7).map(uint),
        body: if row.len() > at + 15 {
            Bytes::from(row.get::<_, Vec<u8>>(at + 15))
        } else {
            Bytes::new()
        },
        state: state_of(row.get(at + 8)),
        attempts: u32::try_from(row.get::<_, i32>(at + 9)).unwrap_or(0),
        next_attempt_ms: uint(row.get(at + 10)),
        last_error: row.get(at + 11),
        last_status: row
            .get::<_, Option<i32>>(at + 12)
            .and_then(|s| u16::try_from(s).ok()),
        created_ms: uint(row.get(at + 13)),
        finished_ms: row.get::<_, Option<i64>>(at + 14).map(uint),
    }
}

/// An endpoint's status from `disabled_at_ms, disabled_reason, failing_since_ms, revision`
/// starting at column `at`.
fn status(row: &tokio_postgres::Row, at: usize) -> EndpointStatus {
    EndpointStatus {
        disabled: row.get::<_, Option<i64>>(at).map(|ms| Disabled {
            at_ms: uint(ms),
            reason: row.get::<_, Option<String>>(at + 1).unwrap_or_default(),
        }),
        failing_since_ms: row.get::<_, Option<i64>>(at + 2).map(uint),
        revision: uint(row.get(at + 3)),
    }
}

/// A job for the accept task: one stream's change or document, answered after its commit.
enum Write {
    Accept {
        change: NewChange,
        targets: Vec<Target>,
        backlog_limit: usize,
        fence: Option<u64>,
        reply: oneshot::Sender<Result<Accepted, OutboxError>>,
    },
    Save {
        document: StoredDocument,
        reply: oneshot::Sender<Result<(), OutboxError>>,
    },
    Notice {
        notice: NewNotice,
        targets: Vec<String>,
        fence: Option<u64>,
        reply: oneshot::Sender<Result<usize, OutboxError>>,
    },
}

impl Write {
    fn stream(&self) -> &str {
        match self {
            Write::Accept { change, .. } => &change.stream,
            Write::Save { document, .. } => &document.stream,
            Write::Notice { notice, .. } => &notice.stream,
        }
    }

    fn fail(self, error: &OutboxError) {
        let error = match error {
            OutboxError::Fenced => OutboxError::Fenced,
            OutboxError::Closed => OutboxError::Closed,
            other => OutboxError::Storage(other.to_string()),
        };
        match self {
            Write::Accept { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Write::Save { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Write::Notice { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// A job for the record task.
struct RecordJob {
    id: i64,
    outcome: AttemptOutcome,
    attempt: Attempt,
    next: Option<Next>,
    notes: Notes,
    reply: oneshot::Sender<Result<Recorded, OutboxError>>,
}

/// The PostgreSQL outbox. Dropping it lets its tasks finish the queued jobs.
pub struct PostgresOutbox {
    pool: Pool,
    /// Connections whose commits do not wait for the disk (`synchronous_commit = off`), for
    /// claims and releases only: a claim lost to a crash of the database server just lets
    /// another worker send the delivery again (same `webhook-id`), which at-least-once
    /// allows; it is never the record of an accepted change or of an answer.
    claims: Pool,
    writes: mpsc::UnboundedSender<Write>,
    records: mpsc::UnboundedSender<RecordJob>,
}

impl PostgresOutbox {
    /// Connects to `url` with a pool of at most `connections`, applies the schema migrations
    /// (serialized across nodes starting at once) and starts the batching tasks. `shown` names
    /// the database in errors (without its password).
    pub async fn open(
        url: &str,
        connections: usize,
        shown: &str,
    ) -> Result<PostgresOutbox, OutboxError> {
        let fail = |message: String| OutboxError::Open {
            path: shown.to_owned(),
            message,
        };
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| fail(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("patchwire");
        }
        let build = |config: tokio_postgres::Config, size: usize| {
            let manager = Manager::from_config(
                config,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(10)))
                .create_timeout(Some(Duration::from_secs(10)))
                .build()
                .map_err(|e| fail(e.to_string()))
        };
        let mut quick = config.clone();
        let options = match config.get_options() {
            Some(options) => format!("{options} -c synchronous_commit=off"),
            None => "-c synchronous_commit=off".to_owned(),
        };
        quick.options(&options);
        // Most connections go to the batches (accepts, records) and reads; a few to claims.
        let connections = connections.max(4);
        let pool = build(config, connections - connections / 4)?;
        let claims = build(quick, connections / 4)?;
        migrate(&pool).await.map_err(|e| fail(e.to_string()))?;
        let (writes, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(pool.clone(), queue, Arc::default()));
        let (records, queue) = mpsc::unbounded_channel();
        tokio::spawn(record_loop(pool.clone(), queue));
        Ok(PostgresOutbox {
            pool,
            claims,
            writes,
            records,
        })
    }
}

/// Creates or upgrades the schema, one node at a time.
async fn migrate(pool: &Pool) -> Result<(), OutboxError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS patchwire_schema (version integer NOT NULL)")
        .await?;
    let version: Option<i32> = tx
        .query_one("SELECT max(version) FROM patchwire_schema", &[])
        .await?
        .get(0);
    match version {
        None | Some(1 | 2) => {
            if version.is_none() {
                tx.batch_execute(SCHEMA_V1).await?;
            }
            if version.is_none_or(|v| v < 2) {
                tx.batch_execute(SCHEMA_V2).await?;
            }
            tx.batch_execute(SCHEMA_V3).await?;
            tx.execute(
                "INSERT INTO patchwire_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await?;
        }
        Some(v) if v > SCHEMA_VERSION => {
            return Err(OutboxError::Storage(format!(
                "the database has schema version {v}, newer than this patchwire \
                 ({SCHEMA_VERSION}); use a newer patchwire or another database"
            )));
        }
        Some(_) => {}
    }
    tx.commit().await?;
    Ok(())
}

/// The accept task: takes every queued write, groups them by stream (keeping their order) and
/// runs each stream's group in one transaction, the streams in parallel.
/// Upper bounds of pairs' pending deliveries, per stream, as this process last counted and
/// then added to them; valid while its accepts carry the same fence (no other dispatcher
/// wrote the stream meanwhile). Deliveries only leave the pending state elsewhere, so a bound
/// stays an upper bound: below the backlog limit it proves no collapse is due, and the pair
/// is not counted again (counting a long backlog is the expensive part of an accept).
#[derive(Debug, Default)]
struct Bound {
    fence: Option<u64>,
    pending: HashMap<String, usize>,
}

type Bounds = Arc<std::sync::Mutex<HashMap<String, Bound>>>;

async fn write_loop(pool: Pool, mut queue: mpsc::UnboundedReceiver<Write>, bounds: Bounds) {
    while let Some(first) = queue.recv().await {
        let mut groups: Vec<(String, Vec<Write>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut taken = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            let stream = job.stream().to_owned();
            let at = *index.entry(stream.clone()).or_insert_with(|| {
                groups.push((stream, Vec::new()));
                groups.len() - 1
            });
            groups[at].1.push(job);
            taken += 1;
            if taken < BATCH {
                next = queue.try_recv().ok();
            }
        }
        let rounds = groups
            .into_iter()
            .map(|(stream, jobs)| run_writes(&pool, stream, jobs, &bounds));
        futures_util::future::join_all(rounds).await;
    }
}

/// One stream's queued writes, in one transaction.
async fn run_writes(pool: &Pool, stream: String, jobs: Vec<Write>, bounds: &Bounds) {
    let mut jobs: Vec<Option<Write>> = jobs.into_iter().map(Some).collect();
    let result = write_group(pool, &stream, &mut jobs, bounds).await;
    if result.is_err() {
        bounds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&stream);
    }
    match result {
        Ok(answers) => {
            for (job, answer) in jobs.into_iter().zip(answers) {
                match (job, answer) {
                    (Some(Write::Accept { reply, .. }), Answer::Accepted(accepted)) => {
                        let _ = reply.send(Ok(accepted));
                    }
                    (Some(Write::Save { reply, .. }), Answer::Saved) => {
                        let _ = reply.send(Ok(()));
                    }
                    (Some(Write::Notice { reply, .. }), Answer::Noticed(queued)) => {
                        let _ = reply.send(Ok(queued));
                    }
                    (Some(job), Answer::Fenced) => job.fail(&OutboxError::Fenced),
                    (Some(job), _) => job.fail(&OutboxError::Storage(
                        "internal error: a write got another job's answer".into(),
                    )),
                    (None, _) => {}
                }
            }
        }
        Err(error) => {
            for job in jobs.into_iter().flatten() {
                job.fail(&error);
            }
        }
    }
}

/// What one write of a group came to, once the group's transaction commits.
enum Answer {
    Accepted(Accepted),
    Saved,
    Noticed(usize),
    Fenced,
}

/// A delivery row to insert.
struct Row {
    endpoint: String,
    msg_id: String,
    kind: i16,
    epoch: i64,
    seq: i64,
    base_seq: Option<i64>,
    body: Vec<u8>,
    state: i16,
    finished_ms: Option<i64>,
}

/// Plans and writes one stream's group of accepts and documents in one transaction: the
/// fence, then every pair's cursor and pending count read once, every change planned in
/// order in memory (`body::plan` over the cursors as they advance), and the rows written with
/// one statement each.
async fn write_group(
    pool: &Pool,
    stream: &str,
    jobs: &mut [Option<Write>],
    bounds: &Bounds,
) -> Result<Vec<Answer>, OutboxError> {
    // Every target named (refused ones too: only the answers differ), and the largest
    // backlog limit.
    let mut named: Vec<String> = jobs
        .iter()
        .filter_map(|job| match job {
            Some(Write::Accept { targets, .. }) => Some(
                targets
                    .iter()
                    .map(|t| t.endpoint.clone())
                    .collect::<Vec<_>>(),
            ),
            Some(Write::Notice { targets, .. }) => Some(targets.clone()),
            _ => None,
        })
        .flatten()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    named.sort();
    let max_limit = jobs
        .iter()
        .filter_map(|job| match job {
            Some(Write::Accept { backlog_limit, .. }) => Some(*backlog_limit),
            _ => None,
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let limit = int(u64::try_from(max_limit).unwrap_or(u64::MAX));
    // The pairs whose bound cannot prove that this group collapses nothing are counted.
    let fences: HashSet<Option<u64>> = jobs
        .iter()
        .filter_map(|job| match job {
            Some(Write::Accept { fence, .. } | Write::Notice { fence, .. }) => Some(*fence),
            _ => None,
        })
        .collect();
    let group_fence = (fences.len() == 1).then(|| fences.into_iter().next().flatten());
    let accepts = jobs
        .iter()
        .filter(|job| matches!(job, Some(Write::Accept { .. })))
        .count();
    let known: HashMap<String, usize> = {
        let bounds = bounds.lock().unwrap_or_else(|e| e.into_inner());
        match (bounds.get(stream), group_fence) {
            (Some(bound), Some(fence)) if bound.fence == fence => named
                .iter()
                .filter_map(|e| {
                    let pending = *bound.pending.get(e)?;
                    (pending.saturating_add(accepts) < max_limit).then(|| (e.clone(), pending))
                })
                .collect(),
            _ => HashMap::new(),
        }
    };
    let to_count: Vec<&String> = named.iter().filter(|e| !known.contains_key(*e)).collect();
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // Sent together (pipelined), run in this order: the stream's accept lock and its fence;
    // which targets still exist (one may have been deleted on another node after this one's
    // registry listed it: it gets nothing); the pairs' cursors, locked (a dead delivery of
    // one of these pairs waits until this commits); their pending deliveries, counted only up
    // to the largest backlog limit (a longer backlog collapses anyway).
    let statements = futures_util::future::try_join4(
        tx.prepare_cached(
            "INSERT INTO patchwire_fences (stream, fence) VALUES ($1, 0) \
             ON CONFLICT (stream) DO UPDATE SET fence = patchwire_fences.fence RETURNING fence",
        ),
        tx.prepare_cached("SELECT id FROM patchwire_endpoints WHERE id = ANY($1)"),
        tx.prepare_cached(
            "SELECT endpoint_id, epoch, seq, failing, failing_epoch, failing_seq \
             FROM patchwire_cursors \
             WHERE stream = $1 AND endpoint_id = ANY($2) ORDER BY endpoint_id FOR UPDATE",
        ),
        tx.prepare_cached(
            "SELECT e, (SELECT count(*) FROM (SELECT 1 FROM patchwire_deliveries \
             WHERE endpoint_id = e AND stream = $1 AND state = 0 AND kind < 2 LIMIT $3) AS p) \
             FROM unnest($2::text[]) AS e",
        ),
    )
    .await?;
    let fence_params: [&(dyn ToSql + Sync); 1] = [&stream];
    let named_params: [&(dyn ToSql + Sync); 1] = [&named];
    let cursor_params: [&(dyn ToSql + Sync); 2] = [&stream, &named];
    let count_params: [&(dyn ToSql + Sync); 3] = [&stream, &to_count, &limit];
    let (fence_rows, existing_rows, cursor_rows, count_rows) = futures_util::future::try_join4(
        tx.query(&statements.0, &fence_params),
        tx.query(&statements.1, &named_params),
        tx.query(&statements.2, &cursor_params),
        tx.query(&statements.3, &count_params),
    )
    .await?;
    let recorded: i64 = fence_rows
        .first()
        .map(|row| row.get(0))
        .ok_or_else(|| OutboxError::Storage("the stream's fence row is missing".into()))?;
    let mut fence = uint(recorded);
    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(jobs.len());
    for job in jobs.iter() {
        let refused = match job {
            Some(
                Write::Accept {
                    fence: Some(mine), ..
                }
                | Write::Notice {
                    fence: Some(mine), ..
                },
            ) if *mine < fence => true,
            Some(
                Write::Accept {
                    fence: Some(mine), ..
                }
                | Write::Notice {
                    fence: Some(mine), ..
                },
            ) => {
                fence = *mine;
                false
            }
            _ => false,
        };
        answers.push(refused.then_some(Answer::Fenced));
    }
    let existing: HashSet<String> = existing_rows.iter().map(|row| row.get(0)).collect();
    let mut cursors: HashMap<String, Option<Cursor>> = HashMap::new();
    // What each pair was told (see `told_now`).
    let mut told: HashMap<String, Option<Option<Cursor>>> = HashMap::new();
    for row in &cursor_rows {
        cursors.insert(row.get(0), stored_cursor(row.get(1), row.get(2)));
        let failing = row.get::<_, bool>(3);
        told.insert(
            row.get(0),
            failing.then(|| stored_cursor(row.get(4), row.get(5))),
        );
    }
    let mut pending: HashMap<String, usize> = known;
    for row in &count_rows {
        let count: i64 = row.get(1);
        pending.insert(row.get(0), usize::try_from(count).unwrap_or(usize::MAX));
    }

    let now = unix_ms(std::time::SystemTime::now());
    let mut rng = StdRng::from_os_rng();
    let mut rows: Vec<Row> = Vec::new();
    // Pairs whose stored pending deliveries a collapse supersedes (before this group's rows).
    let mut collapsed_stored: BTreeMap<String, ()> = BTreeMap::new();
    let mut moved: BTreeMap<String, Option<Cursor>> = BTreeMap::new();
    let mut saved: Option<&StoredDocument> = None;
    // Pairs a notice is queued for: their cursor row is made if missing (the worker scans
    // pairs by it), never moved.
    let mut noticed: BTreeMap<String, ()> = BTreeMap::new();
    for (job, answer) in jobs.iter().zip(answers.iter_mut()) {
        if answer.is_some() {
            continue;
        }
        match job {
            Some(Write::Save { document, .. }) => {
                let newer = saved.is_none_or(|s| s.epoch != document.epoch || s.seq < document.seq);
                if newer {
                    saved = Some(document);
                }
                *answer = Some(Answer::Saved);
            }
            Some(Write::Notice {
                notice, targets, ..
            }) => {
                let mut queued = 0;
                for endpoint in targets {
                    if !existing.contains(endpoint) {
                        continue;
                    }
                    let cursor = cursors.get(endpoint).copied().flatten();
                    let told = told.entry(endpoint.clone()).or_default();
                    if !told_now(told, notice.kind, cursor) {
                        continue;
                    }
                    rows.push(Row {
                        endpoint: endpoint.clone(),
                        msg_id: message_id(now, &mut rng),
                        kind: kind_code(DeliveryKind::Notice(notice.kind)),
                        epoch: int(notice.epoch),
                        seq: int(notice.seq),
                        base_seq: None,
                        body: notice.body.to_vec(),
                        state: 0,
                        finished_ms: None,
                    });
                    noticed.insert(endpoint.clone(), ());
                    queued += 1;
                }
                *answer = Some(Answer::Noticed(queued));
            }
            Some(Write::Accept {
                change,
                targets,
                backlog_limit,
                ..
            }) => {
                let mut bodies = Bodies::new(change);
                let mut accepted = Accepted::default();
                for target in targets {
                    if !existing.contains(&target.endpoint) {
                        continue;
                    }
                    let cursor = cursors.get(&target.endpoint).copied().flatten();
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
                    let count = pending.entry(target.endpoint.clone()).or_default();
                    let collapse = collapses(*count, *backlog_limit);
                    if collapse {
                        collapsed_stored.insert(target.endpoint.clone(), ());
                        for row in rows.iter_mut().filter(|r| {
                            r.endpoint == target.endpoint
                                && r.state == 0
                                && r.kind < FIRST_NOTICE_CODE
                        }) {
                            row.state = state_code(DeliveryState::Superseded);
                            row.finished_ms = Some(int(now));
                        }
                        *count = 0;
                        accepted.collapsed += 1;
                    }
                    let Some((kind, base_seq, bytes)) = bodies.delivery(plan, collapse)? else {
                        cursors.insert(target.endpoint.clone(), None);
                        moved.insert(target.endpoint.clone(), None);
                        accepted.owed += 1;
                        continue;
                    };
                    rows.push(Row {
                        endpoint: target.endpoint.clone(),
                        msg_id: message_id(now, &mut rng),
                        kind: kind_code(kind),
                        epoch: int(change.epoch),
                        seq: int(change.seq),
                        base_seq: base_seq.map(int),
                        body: bytes.to_vec(),
                        state: 0,
                        finished_ms: None,
                    });
                    let at = Some(Cursor {
                        epoch: change.epoch,
                        seq: change.seq,
                    });
                    cursors.insert(target.endpoint.clone(), at);
                    moved.insert(target.endpoint.clone(), at);
                    *count += 1;
                    accepted.queued += 1;
                }
                *answer = Some(Answer::Accepted(accepted));
            }
            None => {}
        }
    }

    // A collapse supersedes the stored pending deliveries first (never this group's rows).
    if !collapsed_stored.is_empty() {
        let endpoints: Vec<&String> = collapsed_stored.keys().collect();
        tx.execute(
            "UPDATE patchwire_deliveries SET state = 3, finished_ms = $3 \
             WHERE stream = $1 AND endpoint_id = ANY($2) AND state = 0 AND kind < 2",
            &[&stream, &endpoints, &int(now)],
        )
        .await?;
    }
    // The rest in any order: sent together (pipelined).
    let cursor_endpoints: Vec<&String> = moved.keys().collect();
    let noticed: Vec<&String> = noticed.keys().collect();
    let epochs: Vec<Option<i64>> = moved.values().map(|c| c.map(|c| int(c.epoch))).collect();
    let seqs: Vec<Option<i64>> = moved.values().map(|c| c.map(|c| int(c.seq))).collect();
    // A queued notice told its pair the stream fails, or no longer does.
    let told_of = |e: &String| told.get(e).copied().flatten();
    let told_failing: Vec<bool> = noticed.iter().map(|e| told_of(e).is_some()).collect();
    let told_epochs: Vec<Option<i64>> = noticed
        .iter()
        .map(|e| told_of(e).flatten().map(|c| int(c.epoch)))
        .collect();
    let told_seqs: Vec<Option<i64>> = noticed
        .iter()
        .map(|e| told_of(e).flatten().map(|c| int(c.seq)))
        .collect();
    type Step<'t> =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), OutboxError>> + Send + 't>>;
    let mut steps: Vec<Step<'_>> = Vec::new();
    let fence_now = int(fence);
    if fence > uint(recorded) {
        let tx = &tx;
        steps.push(Box::pin(async move {
            tx.execute(
                "UPDATE patchwire_fences SET fence = $2 WHERE stream = $1",
                &[&stream, &fence_now],
            )
            .await?;
            Ok(())
        }));
    }
    if !rows.is_empty() {
        steps.push(Box::pin(insert_rows(&tx, stream, &rows, now)));
    }
    if !moved.is_empty() {
        let tx = &tx;
        let (cursor_endpoints, epochs, seqs) = (&cursor_endpoints, &epochs, &seqs);
        steps.push(Box::pin(async move {
            tx.execute(
                "INSERT INTO patchwire_cursors (endpoint_id, stream, epoch, seq) \
                 SELECT e, $1, ep, sq FROM unnest($2::text[], $3::bigint[], $4::bigint[]) \
                     AS u(e, ep, sq) \
                 ON CONFLICT (endpoint_id, stream) \
                 DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq",
                &[&stream, cursor_endpoints, epochs, seqs],
            )
            .await?;
            Ok(())
        }));
    }
    if !noticed.is_empty() {
        let tx = &tx;
        let (noticed, told_failing, told_epochs, told_seqs) =
            (&noticed, &told_failing, &told_epochs, &told_seqs);
        steps.push(Box::pin(async move {
            tx.execute(
                "INSERT INTO patchwire_cursors (endpoint_id, stream, epoch, seq, failing, \
                 failing_epoch, failing_seq) \
                 SELECT e, $1, NULL, NULL, f, fe, fs \
                 FROM unnest($2::text[], $3::boolean[], $4::bigint[], $5::bigint[]) \
                     AS u(e, f, fe, fs) \
                 ON CONFLICT (endpoint_id, stream) DO UPDATE SET failing = excluded.failing, \
                 failing_epoch = excluded.failing_epoch, failing_seq = excluded.failing_seq",
                &[&stream, noticed, told_failing, told_epochs, told_seqs],
            )
            .await?;
            Ok(())
        }));
    }
    if let Some(document) = saved {
        steps.push(Box::pin(save_document(&tx, document)));
    }
    futures_util::future::try_join_all(steps).await?;
    tx.commit().await?;
    {
        let mut bounds = bounds.lock().unwrap_or_else(|e| e.into_inner());
        match group_fence {
            Some(fence) => {
                pending.retain(|endpoint, _| existing.contains(endpoint));
                bounds.insert(stream.to_owned(), Bound { fence, pending });
            }
            None => {
                bounds.remove(stream);
            }
        }
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or(Answer::Saved))
        .collect())
}

/// Inserts a group's deliveries in order (ids follow the order of `rows`).
async fn insert_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    stream: &str,
    rows: &[Row],
    now: u64,
) -> Result<(), OutboxError> {
    let endpoints: Vec<&str> = rows.iter().map(|r| r.endpoint.as_str()).collect();
    let msg_ids: Vec<&str> = rows.iter().map(|r| r.msg_id.as_str()).collect();
    let kinds: Vec<i16> = rows.iter().map(|r| r.kind).collect();
    let epochs: Vec<i64> = rows.iter().map(|r| r.epoch).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let bases: Vec<Option<i64>> = rows.iter().map(|r| r.base_seq).collect();
    let bodies: Vec<&[u8]> = rows.iter().map(|r| r.body.as_slice()).collect();
    let states: Vec<i16> = rows.iter().map(|r| r.state).collect();
    let finished: Vec<Option<i64>> = rows.iter().map(|r| r.finished_ms).collect();
    let statement = tx
        .prepare_cached(
            "INSERT INTO patchwire_deliveries (endpoint_id, stream, msg_id, kind, epoch, seq, \
             base_seq, body, state, attempts, next_attempt_ms, created_ms, finished_ms) \
             SELECT e, $1, m, k, ep, sq, b, bd, st, 0, $11, $11, f \
             FROM unnest($2::text[], $3::text[], $4::smallint[], $5::bigint[], $6::bigint[], \
                         $7::bigint[], $8::bytea[], $9::smallint[], $10::bigint[]) \
                  WITH ORDINALITY AS u(e, m, k, ep, sq, b, bd, st, f, n) \
             ORDER BY n",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 11] = [
        &stream,
        &endpoints,
        &msg_ids,
        &kinds,
        &epochs,
        &seqs,
        &bases,
        &bodies,
        &states,
        &finished,
        &int(now),
    ];
    tx.execute(&statement, &params).await?;
    Ok(())
}

async fn save_document(
    tx: &deadpool_postgres::Transaction<'_>,
    document: &StoredDocument,
) -> Result<(), OutboxError> {
    // Never step back: a resync of an older snapshot must not overwrite a newer one.
    tx.execute(
        "INSERT INTO patchwire_documents (stream, epoch, seq, document, at_ms) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (stream) DO UPDATE SET epoch = $2, seq = $3, document = $4, at_ms = $5 \
         WHERE patchwire_documents.epoch <> $2 OR patchwire_documents.seq < $3",
        &[
            &&*document.stream,
            &int(document.epoch),
            &int(document.seq),
            &&document.document[..],
            &int(unix_ms(document.at)),
        ],
    )
    .await?;
    Ok(())
}

/// Record batches committing at once: a batch is taken while others commit, so their
/// commits share the server's flushes.
const RECORD_BATCHES: usize = 4;

/// The record task: records the queued outcomes in batches, each in one transaction, up to
/// [`RECORD_BATCHES`] at once (each delivery has one attempt recorded at a time, so batches
/// never touch the same delivery).
async fn record_loop(pool: Pool, mut queue: mpsc::UnboundedReceiver<RecordJob>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(RECORD_BATCHES));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < BATCH {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            match record_batch(&pool, &jobs).await {
                Ok(answers) => {
                    for (job, answer) in jobs.into_iter().zip(answers) {
                        let _ = job.reply.send(Ok(answer));
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    for job in jobs {
                        let _ = job.reply.send(Err(OutboxError::Storage(message.clone())));
                    }
                }
            }
            drop(slot);
        });
    }
}

/// Records a batch of outcomes: failures one by one (a dead delivery locks its pair's cursor
/// first, then supersedes what lacks its base), deliveries in one statement, then the
/// endpoints' statuses.
async fn record_batch(pool: &Pool, jobs: &[RecordJob]) -> Result<Vec<Recorded>, OutboxError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut answers: Vec<Recorded> = vec![Recorded::default(); jobs.len()];
    // Which endpoint each job's delivery belongs to (none: deleted while in flight).
    let mut endpoint_of: Vec<Option<String>> = vec![None; jobs.len()];
    let mut failed: Vec<(String, i64)> = Vec::new();

    let delivered: Vec<(usize, i64, i32, i64)> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, job)| match &job.outcome {
            AttemptOutcome::Delivered { status } => {
                Some((i, job.id, i32::from(*status), int(job.attempt.ended_ms())))
            }
            AttemptOutcome::Failed { .. } => None,
        })
        .collect();
    for (i, job) in jobs.iter().enumerate() {
        let AttemptOutcome::Failed {
            status,
            error,
            retry_at_ms,
        } = &job.outcome
        else {
            continue;
        };
        let Some(row) = tx
            .query_opt(
                "SELECT endpoint_id, stream, state, kind FROM patchwire_deliveries WHERE id = $1",
                &[&job.id],
            )
            .await?
        else {
            continue;
        };
        let (endpoint, stream, state, kind): (String, String, i16, i16) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let status = status.map(i32::from);
        match retry_at_ms {
            Some(at) => {
                tx.execute(
                    "UPDATE patchwire_deliveries SET attempts = attempts + 1, last_status = $2, \
                     last_error = $3, next_attempt_ms = $4, claimed_by = NULL, \
                     claimed_until_ms = NULL WHERE id = $1",
                    &[&job.id, &status, &error, &int(*at)],
                )
                .await?;
            }
            None => {
                // The pair's cursor first, as accepts lock it: no patch is planned on this
                // delivery's base while what follows it is superseded.
                tx.execute(
                    "SELECT 1 FROM patchwire_cursors WHERE endpoint_id = $1 AND stream = $2 \
                     FOR UPDATE",
                    &[&endpoint, &stream],
                )
                .await?;
                tx.execute(
                    "UPDATE patchwire_deliveries SET attempts = attempts + 1, last_status = $2, \
                     last_error = $3, state = CASE WHEN state = 0 THEN 2 ELSE state END, \
                     finished_ms = COALESCE(finished_ms, $4), claimed_by = NULL, \
                     claimed_until_ms = NULL WHERE id = $1",
                    &[&job.id, &status, &error, &int(job.attempt.ended_ms())],
                )
                .await?;
                // A dead notice leaves no gap: no change lacks its base.
                if state == 0 && kind < FIRST_NOTICE_CODE {
                    answers[i].needs_resync =
                        supersede_after_gap(&tx, &endpoint, &stream, job.attempt.ended_ms())
                            .await?;
                }
            }
        }
        failed.push((endpoint.clone(), int(job.attempt.ended_ms())));
        endpoint_of[i] = Some(endpoint);
    }
    // Failed attempts that asked for the next delivery (after a dead one: its successor).
    let failed_jobs: Vec<usize> = (0..jobs.len())
        .filter(|i| matches!(jobs[*i].outcome, AttemptOutcome::Failed { .. }))
        .collect();
    let mut nexts = claim_next(&tx, jobs, &endpoint_of, &failed_jobs).await?;
    failed.sort();
    failed.dedup_by(|a, b| a.0 == b.0);
    if !failed.is_empty() {
        let endpoints: Vec<&String> = failed.iter().map(|f| &f.0).collect();
        let times: Vec<i64> = failed.iter().map(|f| f.1).collect();
        tx.execute(
            "UPDATE patchwire_endpoints e SET failing_since_ms = u.t, \
             revision = nextval('patchwire_revisions') \
             FROM (SELECT id, t FROM unnest($1::text[], $2::bigint[]) AS x(id, t) ORDER BY id) AS u \
             WHERE e.id = u.id AND e.failing_since_ms IS NULL",
            &[&endpoints, &times],
        )
        .await?;
    }
    // The delivered ones, each pair's next delivery claimed where asked, and every endpoint's
    // status: two statements sent together (pipelined), run in order.
    let ids: Vec<i64> = delivered.iter().map(|d| d.1).collect();
    let statuses: Vec<i32> = delivered.iter().map(|d| d.2).collect();
    let times: Vec<i64> = delivered.iter().map(|d| d.3).collect();
    let asking: Vec<(i64, &Next)> = delivered
        .iter()
        .filter_map(|d| jobs[d.0].next.as_ref().map(|n| (d.1, n)))
        .collect();
    let asking_ids: Vec<i64> = asking.iter().map(|a| a.0).collect();
    let owners: Vec<&str> = asking.iter().map(|a| &*a.1.owner).collect();
    let holds: Vec<i64> = asking
        .iter()
        .map(|a| int(u64::try_from(a.1.hold.as_millis()).unwrap_or(u64::MAX)))
        .collect();
    let dues: Vec<i64> = asking.iter().map(|a| int(a.1.now_ms)).collect();
    let all_ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
    let failed_endpoints: Vec<&String> = failed.iter().map(|f| &f.0).collect();
    let finish_text = finish_statement();
    let (finish, report, history) = futures_util::future::try_join3(
        tx.prepare_cached(&finish_text),
        tx.prepare_cached(REPORT),
        tx.prepare_cached(HISTORY),
    )
    .await?;
    let results: Vec<i16> = jobs
        .iter()
        .map(|j| AttemptResult::of(&j.outcome).code())
        .collect();
    let codes: Vec<Option<i32>> = jobs
        .iter()
        .map(|j| match &j.outcome {
            AttemptOutcome::Delivered { status } => Some(i32::from(*status)),
            AttemptOutcome::Failed { status, .. } => status.map(i32::from),
        })
        .collect();
    let errors: Vec<Option<&str>> = jobs
        .iter()
        .map(|j| match &j.outcome {
            AttemptOutcome::Delivered { .. } => None,
            AttemptOutcome::Failed { error, .. } => Some(error.as_str()),
        })
        .collect();
    let ats: Vec<i64> = jobs.iter().map(|j| int(j.attempt.at_ms)).collect();
    let durations: Vec<i64> = jobs.iter().map(|j| int(j.attempt.duration_ms)).collect();
    let responses: Vec<&str> = jobs.iter().map(|j| j.attempt.response.as_str()).collect();
    let history_params: [&(dyn ToSql + Sync); 7] = [
        &all_ids, &ats, &durations, &results, &codes, &errors, &responses,
    ];

    let finish_params: [&(dyn ToSql + Sync); 7] =
        [&ids, &statuses, &times, &asking_ids, &owners, &holds, &dues];
    let report_params: [&(dyn ToSql + Sync); 3] = [&all_ids, &ids, &failed_endpoints];
    let (_, finished, reported) = futures_util::future::try_join3(
        tx.execute(&history, &history_params),
        tx.query(&finish, &finish_params),
        tx.query(&report, &report_params),
    )
    .await?;
    // The operational events, in the same transaction: a dead delivery's always, an
    // endpoint's recovery only if this batch cleared its failures.
    let cleared: HashSet<String> = reported
        .iter()
        .filter(|row| row.get::<_, bool>(5))
        .map(|row| row.get::<_, String>(0))
        .collect();
    let finished_endpoint: HashMap<i64, String> = finished
        .iter()
        .map(|row| (row.get::<_, i64>(0), row.get::<_, String>(1)))
        .collect();
    let mut notes: Vec<&OperatorNote> = Vec::new();
    for job in jobs {
        notes.extend(&job.notes.always);
        if let Some(note) = &job.notes.if_recovered
            && finished_endpoint
                .get(&job.id)
                .is_some_and(|endpoint| cleared.contains(endpoint))
        {
            notes.push(note);
        }
    }
    insert_notes(&tx, &notes).await?;
    tx.commit().await?;

    let by_id: HashMap<i64, usize> = jobs.iter().enumerate().map(|(i, j)| (j.id, i)).collect();
    for row in &finished {
        let done: i64 = row.get(0);
        let Some(&i) = by_id.get(&done) else {
            continue;
        };
        endpoint_of[i] = Some(row.get(1));
        // Column 2 is the claimed row's `done`; its delivery follows.
        if row.get::<_, Option<i64>>(3).is_some() {
            nexts.push((i, delivery_at(row, 3)));
        }
    }
    let statuses: HashMap<String, EndpointStatus> = reported
        .iter()
        .map(|row| (row.get::<_, String>(0), status(row, 1)))
        .collect();
    for (answer, endpoint) in answers.iter_mut().zip(&endpoint_of) {
        answer.status = endpoint.as_ref().and_then(|e| statuses.get(e).cloned());
    }
    for (i, next) in nexts {
        answers[i].next = Some(next);
    }
    Ok(answers)
}

/// Records delivered attempts and, where asked, claims each pair's next delivery (the first
/// pending one after the finished head) when due and free: one statement. `$1..$3`: the
/// delivered ids, statuses and times; `$4..$7`: the ids asking, owners, holds and times.
/// Returns per finished delivery its id, its endpoint, and the next delivery's columns (NULL
/// when none was claimed).
fn finish_statement() -> String {
    let columns = DELIVERY_COLUMNS
        .split(", ")
        .map(|c| format!("c.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "WITH now AS (SELECT {DB_NOW} AS ms), \
         done AS (UPDATE patchwire_deliveries d SET attempts = d.attempts + 1, last_status = u.s, \
             last_error = NULL, state = CASE WHEN d.state = 0 THEN 1 ELSE d.state END, \
             finished_ms = COALESCE(d.finished_ms, u.t), claimed_by = NULL, \
             claimed_until_ms = NULL \
             FROM unnest($1::bigint[], $2::integer[], $3::bigint[]) AS u(id, s, t) \
             WHERE d.id = u.id RETURNING d.id, d.endpoint_id, d.stream), \
         wanted AS (SELECT done.id AS done, done.endpoint_id, done.stream, w.owner, w.hold, w.due \
             FROM done JOIN unnest($4::bigint[], $5::text[], $6::bigint[], $7::bigint[]) \
                 AS w(id, owner, hold, due) ON w.id = done.id \
             JOIN patchwire_endpoints e ON e.id = done.endpoint_id AND e.disabled_at_ms IS NULL), \
         heads AS (SELECT h.id, wanted.done, wanted.owner, wanted.hold FROM wanted \
             CROSS JOIN LATERAL (SELECT d.id, d.next_attempt_ms, d.claimed_until_ms \
                 FROM patchwire_deliveries d WHERE d.endpoint_id = wanted.endpoint_id \
                 AND d.stream = wanted.stream AND d.state = 0 AND d.id > wanted.done \
                 ORDER BY d.id LIMIT 1) AS h \
             CROSS JOIN now \
             WHERE h.next_attempt_ms <= wanted.due \
               AND (h.claimed_until_ms IS NULL OR h.claimed_until_ms < now.ms)), \
         claimed AS (UPDATE patchwire_deliveries c SET claimed_by = heads.owner, \
             claimed_until_ms = (SELECT ms FROM now) + heads.hold \
             FROM heads WHERE c.id = heads.id \
             RETURNING heads.done, {columns}, c.body) \
         SELECT done.id, done.endpoint_id, claimed.* FROM done \
         LEFT JOIN claimed ON claimed.done = done.id"
    )
}

/// The batch's attempts, into the history (before the deliveries are updated: their endpoint,
/// stream and id are read from them).
const HISTORY: &str = "INSERT INTO patchwire_attempts (delivery_id, endpoint_id, stream, msg_id, \
     at_ms, duration_ms, result, status, error, response) \
     SELECT d.id, d.endpoint_id, d.stream, d.msg_id, u.at, u.duration, u.result, u.status, \
         u.error, u.response \
     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::smallint[], $5::integer[], \
         $6::text[], $7::text[]) AS u(id, at, duration, result, status, error, response) \
     JOIN patchwire_deliveries d ON d.id = u.id";

/// Every endpoint of the batch's deliveries (`$1`) with its status after it: those with a
/// delivered attempt (`$2`) and no failed one (`$3`) are no longer failing. One statement.
const REPORT: &str = "WITH touched AS (SELECT DISTINCT endpoint_id AS id \
         FROM patchwire_deliveries WHERE id = ANY($1)), \
     cleared AS (UPDATE patchwire_endpoints SET failing_since_ms = NULL, \
         revision = nextval('patchwire_revisions') \
         WHERE id IN (SELECT x.id FROM patchwire_endpoints x \
             WHERE x.id IN (SELECT endpoint_id FROM patchwire_deliveries WHERE id = ANY($2)) \
               AND x.id <> ALL($3) AND x.failing_since_ms IS NOT NULL \
             ORDER BY x.id FOR UPDATE) \
         RETURNING id, failing_since_ms, revision) \
     SELECT e.id, e.disabled_at_ms, e.disabled_reason, \
         CASE WHEN c.id IS NULL THEN e.failing_since_ms ELSE c.failing_since_ms END, \
         COALESCE(c.revision, e.revision), c.id IS NOT NULL \
     FROM patchwire_endpoints e JOIN touched t ON t.id = e.id \
     LEFT JOIN cleared c ON c.id = e.id";

/// Claims, for each job that asked ([`Next`]), its pair's next delivery when it is due and
/// free, for the same worker: the record's own transaction sees the head it just finished.
/// Returns (job index, delivery).
async fn claim_next(
    tx: &deadpool_postgres::Transaction<'_>,
    jobs: &[RecordJob],
    endpoint_of: &[Option<String>],
    only: &[usize],
) -> Result<Vec<(usize, Delivery)>, OutboxError> {
    let mut wanted: Vec<(usize, &Next, String)> = Vec::new();
    for &i in only {
        if let (Some(next), Some(endpoint)) = (&jobs[i].next, &endpoint_of[i]) {
            wanted.push((i, next, endpoint.clone()));
        }
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = wanted.iter().map(|w| jobs[w.0].id).collect();
    let owners: Vec<&str> = wanted.iter().map(|w| &*w.1.owner).collect();
    let holds: Vec<i64> = wanted
        .iter()
        .map(|w| int(u64::try_from(w.1.hold.as_millis()).unwrap_or(u64::MAX)))
        .collect();
    let dues: Vec<i64> = wanted.iter().map(|w| int(w.1.now_ms)).collect();
    let statement = tx
        .prepare_cached(&format!(
            "WITH now AS (SELECT {DB_NOW} AS ms), \
             wanted AS (SELECT f.endpoint_id, f.stream, w.owner, w.hold, w.due, w.done \
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[]) \
                     AS w(done, owner, hold, due) \
                 JOIN patchwire_deliveries f ON f.id = w.done \
                 JOIN patchwire_endpoints e ON e.id = f.endpoint_id AND e.disabled_at_ms IS NULL), \
             heads AS (SELECT h.id, wanted.owner, wanted.hold, wanted.done FROM wanted \
                 CROSS JOIN LATERAL (SELECT d.id, d.next_attempt_ms, d.claimed_until_ms \
                     FROM patchwire_deliveries d WHERE d.endpoint_id = wanted.endpoint_id \
                     AND d.stream = wanted.stream AND d.state = 0 ORDER BY d.id LIMIT 1) AS h \
                 CROSS JOIN now \
                 WHERE h.next_attempt_ms <= wanted.due \
                   AND (h.claimed_until_ms IS NULL OR h.claimed_until_ms < now.ms)), \
             locked AS (SELECT x.id FROM patchwire_deliveries x \
                 WHERE x.id IN (SELECT id FROM heads) FOR UPDATE SKIP LOCKED) \
             UPDATE patchwire_deliveries d SET claimed_by = heads.owner, \
                 claimed_until_ms = (SELECT ms FROM now) + heads.hold \
             FROM heads WHERE d.id = heads.id AND d.id IN (SELECT id FROM locked) \
             RETURNING heads.done, {}, d.body",
            DELIVERY_COLUMNS
                .split(", ")
                .map(|c| format!("d.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .await?;
    let rows = tx
        .query(&statement, &[&ids, &owners, &holds, &dues])
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let done: i64 = row.get(0);
        let Some(w) = wanted.iter().find(|w| jobs[w.0].id == done) else {
            continue;
        };
        out.push((w.0, delivery_at(&row, 1)));
    }
    Ok(out)
}

/// Stores operational events, each unless its key is stored (in the caller's transaction).
async fn insert_notes(
    tx: &deadpool_postgres::Transaction<'_>,
    notes: &[&OperatorNote],
) -> Result<(), OutboxError> {
    for note in notes {
        tx.execute(
            "INSERT INTO patchwire_operator_events (key, msg_id, body, next_attempt_ms, \
             created_ms) VALUES ($1, $2, $3, $4, $4) ON CONFLICT (key) DO NOTHING",
            &[&note.key, &note.msg_id, &&note.body[..], &int(note.at_ms)],
        )
        .await?;
    }
    Ok(())
}

/// After a dead delivery, the pair's pending deliveries up to the next snapshot lack their
/// base: they are superseded. Without a pending snapshot the cursor is forgotten (the next
/// change is a snapshot, and the pair is owed one now): returns true.
async fn supersede_after_gap(
    tx: &deadpool_postgres::Transaction<'_>,
    endpoint: &str,
    stream: &str,
    now: u64,
) -> Result<bool, OutboxError> {
    let first_snapshot: Option<i64> = tx
        .query_one(
            "SELECT min(id) FROM patchwire_deliveries WHERE endpoint_id = $1 AND stream = $2 \
             AND state = 0 AND kind = 1",
            &[&endpoint, &stream],
        )
        .await?
        .get(0);
    tx.execute(
        "UPDATE patchwire_deliveries SET state = 3, finished_ms = $3 \
         WHERE endpoint_id = $1 AND stream = $2 AND state = 0 AND id < $4 AND kind < 2",
        &[
            &endpoint,
            &stream,
            &int(now),
            &first_snapshot.unwrap_or(i64::MAX),
        ],
    )
    .await?;
    if first_snapshot.is_some() {
        return Ok(false);
    }
    tx.execute(
        "UPDATE patchwire_cursors SET epoch = NULL, seq = NULL \
         WHERE endpoint_id = $1 AND stream = $2",
        &[&endpoint, &stream],
    )
    .await?;
    Ok(true)
}

/// Claims due heads in one statement: the head (oldest pending delivery) of every pair of an
/// enabled endpoint, due, unclaimed or whose claim expired (in the database's clock), not
/// among the caller's full endpoints and busy pairs (`$2`, `$3`), soonest first; at most
/// `$4` in flight per endpoint counting every node's live claims (only heads are ever
/// claimed, so those are the claimed heads), at most `$5` in all; each
/// locked with `SKIP LOCKED` (another node claiming it now keeps it) and checked again under
/// the lock before it is claimed for `$6` until now + `$7`. One index probe per pair
/// (`patchwire_deliveries_pending`), however long the backlogs.
const CLAIM: &str = "WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms), \
     every AS (SELECT h.id, h.endpoint_id, c.stream, h.next_attempt_ms, \
         h.claimed_until_ms >= now.ms AS claimed FROM patchwire_cursors c \
     JOIN patchwire_endpoints e ON e.id = c.endpoint_id AND e.disabled_at_ms IS NULL \
     CROSS JOIN LATERAL (SELECT d.id, d.endpoint_id, d.next_attempt_ms, d.claimed_until_ms \
     FROM patchwire_deliveries d \
     WHERE d.endpoint_id = c.endpoint_id AND d.stream = c.stream AND d.state = 0 \
     ORDER BY d.id LIMIT 1) AS h \
     CROSS JOIN now), \
     live AS (SELECT endpoint_id, count(*) AS n FROM every WHERE claimed GROUP BY endpoint_id), \
     heads AS (SELECT id, endpoint_id, next_attempt_ms FROM every \
     WHERE next_attempt_ms <= $1 AND claimed IS NOT TRUE \
     AND NOT (endpoint_id = ANY($2)) \
     AND NOT ((endpoint_id || E'\\x1f' || stream) = ANY($3))), \
     ranked AS (SELECT heads.id, heads.next_attempt_ms, coalesce(live.n, 0) + row_number() \
     OVER (PARTITION BY heads.endpoint_id ORDER BY heads.next_attempt_ms, heads.id) AS place \
     FROM heads LEFT JOIN live ON live.endpoint_id = heads.endpoint_id), \
     picked AS (SELECT id FROM ranked WHERE place <= $4 ORDER BY next_attempt_ms, id LIMIT $5) \
     UPDATE patchwire_deliveries SET claimed_by = $6, \
     claimed_until_ms = (SELECT ms FROM now) + $7 \
     WHERE id IN (SELECT x.id FROM patchwire_deliveries x \
     WHERE x.id IN (SELECT id FROM picked) AND x.state = 0 \
     AND (x.claimed_until_ms IS NULL OR x.claimed_until_ms < (SELECT ms FROM now)) \
     FOR UPDATE SKIP LOCKED) \
     RETURNING ";

async fn claim(
    client: &deadpool_postgres::Object,
    claim: Claim,
) -> Result<Vec<Delivery>, OutboxError> {
    if claim.limit == 0 {
        return Ok(Vec::new());
    }
    let busy: Vec<String> = claim
        .busy
        .iter()
        .map(|(endpoint, stream)| format!("{endpoint}\u{1f}{stream}"))
        .collect();
    let per_endpoint = int(u64::try_from(claim.per_endpoint.max(1)).unwrap_or(u64::MAX));
    let limit = int(u64::try_from(claim.limit).unwrap_or(u64::MAX));
    let hold = int(u64::try_from(claim.hold.as_millis()).unwrap_or(u64::MAX));
    let statement = client
        .prepare_cached(&format!("{CLAIM}{DELIVERY_COLUMNS}, body"))
        .await?;
    let rows = client
        .query(
            &statement,
            &[
                &int(claim.now_ms),
                &claim.full,
                &busy,
                &per_endpoint,
                &limit,
                &&*claim.owner,
                &hold,
            ],
        )
        .await?;
    let mut out: Vec<Delivery> = rows.iter().map(delivery).collect();
    out.sort_by_key(|d| (d.next_attempt_ms, d.id));
    Ok(out)
}

impl Outbox for PostgresOutbox {
    fn endpoints(&self) -> OutboxFuture<Vec<(EndpointRecord, EndpointStatus)>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let rows = client
                .query(
                    "SELECT id, definition, disabled_at_ms, disabled_reason, \
                     failing_since_ms, revision FROM patchwire_endpoints ORDER BY id",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let id: String = row.get(0);
                    let definition: String = row.get(1);
                    let record: EndpointRecord =
                        serde_json::from_str(&definition).map_err(|e| {
                            OutboxError::Storage(format!(
                                "endpoint {id:?} is stored unreadably: {e}"
                            ))
                        })?;
                    Ok((record, status(row, 2)))
                })
                .collect()
        })
    }

    fn put_endpoint(&self, record: EndpointRecord) -> OutboxFuture<EndpointStatus> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let definition = serde_json::to_string(&record)
                .map_err(|e| OutboxError::Storage(format!("cannot encode an endpoint: {e}")))?;
            let row = client
                .query_one(
                    "INSERT INTO patchwire_endpoints (id, definition) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET definition = $2 \
                     RETURNING disabled_at_ms, disabled_reason, failing_since_ms, revision",
                    &[&record.id, &definition],
                )
                .await?;
            Ok(status(&row, 0))
        })
    }

    fn create_endpoint(&self, record: EndpointRecord) -> OutboxFuture<Created> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let definition = serde_json::to_string(&record)
                .map_err(|e| OutboxError::Storage(format!("cannot encode an endpoint: {e}")))?;
            // Inserted, or the row that was there (a no-op update returns it, locked).
            let row = client
                .query_one(
                    "INSERT INTO patchwire_endpoints (id, definition) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET definition = patchwire_endpoints.definition \
                     RETURNING (xmax = 0) AS inserted, definition, disabled_at_ms, \
                     disabled_reason, failing_since_ms, revision",
                    &[&record.id, &definition],
                )
                .await?;
            let status = status(&row, 2);
            if row.get::<_, bool>(0) {
                return Ok(Created::New(status));
            }
            let stored: String = row.get(1);
            let existing: EndpointRecord = serde_json::from_str(&stored).map_err(|e| {
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
        note: Option<OperatorNote>,
        failing_since: Option<u64>,
    ) -> OutboxFuture<Option<EndpointStatus>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            // Locked, so of two nodes changing the status at once, one sees the other's change
            // (and stores no second event), and a guarded change sees what it is guarded by.
            let Some(was) = tx
                .query_opt(
                    "SELECT disabled_at_ms IS NOT NULL, failing_since_ms \
                     FROM patchwire_endpoints WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?
            else {
                return Ok(None);
            };
            let was_disabled: bool = was.get(0);
            if let Some(since) = failing_since
                && was.get::<_, Option<i64>>(1) != Some(int(since))
            {
                return Ok(None);
            }
            let row = match &disabled {
                Some(d) => {
                    tx.query_one(
                        "UPDATE patchwire_endpoints SET disabled_at_ms = $2, \
                         disabled_reason = $3, revision = nextval('patchwire_revisions') \
                         WHERE id = $1 RETURNING disabled_at_ms, disabled_reason, \
                         failing_since_ms, revision",
                        &[&id, &int(d.at_ms), &d.reason],
                    )
                    .await?
                }
                None => {
                    tx.query_one(
                        "UPDATE patchwire_endpoints SET disabled_at_ms = NULL, \
                         disabled_reason = NULL, failing_since_ms = NULL, \
                         revision = nextval('patchwire_revisions') WHERE id = $1 \
                         RETURNING disabled_at_ms, disabled_reason, failing_since_ms, \
                         revision",
                        &[&id],
                    )
                    .await?
                }
            };
            if let Some(note) = &note
                && was_disabled != disabled.is_some()
            {
                insert_notes(&tx, &[note]).await?;
            }
            tx.commit().await?;
            Ok(Some(status(&row, 0)))
        })
    }

    fn delete_endpoint(&self, id: String) -> OutboxFuture<bool> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.execute(
                "DELETE FROM patchwire_deliveries WHERE endpoint_id = $1",
                &[&id],
            )
            .await?;
            tx.execute(
                "DELETE FROM patchwire_cursors WHERE endpoint_id = $1",
                &[&id],
            )
            .await?;
            tx.execute(
                "DELETE FROM patchwire_attempts WHERE endpoint_id = $1",
                &[&id],
            )
            .await?;
            let removed = tx
                .execute("DELETE FROM patchwire_endpoints WHERE id = $1", &[&id])
                .await?;
            tx.commit().await?;
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
        let (reply, answer) = oneshot::channel();
        let sent = self
            .writes
            .send(Write::Accept {
                change,
                targets,
                backlog_limit,
                fence,
                reply,
            })
            .is_ok();
        answered(sent, answer)
    }

    fn notice(
        &self,
        notice: NewNotice,
        targets: Vec<String>,
        fence: Option<u64>,
    ) -> OutboxFuture<usize> {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .writes
            .send(Write::Notice {
                notice,
                targets,
                fence,
                reply,
            })
            .is_ok();
        answered(sent, answer)
    }

    fn note(&self, note: OperatorNote) -> OutboxFuture<bool> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let stored = client
                .execute(
                    "INSERT INTO patchwire_operator_events (key, msg_id, body, next_attempt_ms, \
                     created_ms) VALUES ($1, $2, $3, $4, $4) ON CONFLICT (key) DO NOTHING",
                    &[&note.key, &note.msg_id, &&note.body[..], &int(note.at_ms)],
                )
                .await?;
            Ok(stored > 0)
        })
    }

    fn operator_head(
        &self,
        now_ms: u64,
        owner: Arc<str>,
        hold: Duration,
    ) -> OutboxFuture<OperatorHead> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            // The head, locked (waiting for a node claiming it now, never skipping it: the
            // events go in order); then held by that node's claim, so this one looks later.
            let Some(row) = tx
                .query_opt(
                    &format!(
                        "SELECT id, msg_id, body, attempts, next_attempt_ms, created_ms, \
                         claimed_until_ms >= {DB_NOW} AS held, \
                         claimed_until_ms - {DB_NOW} AS left_ms \
                         FROM patchwire_operator_events WHERE state = 0 ORDER BY id LIMIT 1 \
                         FOR UPDATE"
                    ),
                    &[],
                )
                .await?
            else {
                let waiting = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM patchwire_operator_events WHERE state = 0)",
                        &[],
                    )
                    .await?;
                tx.commit().await?;
                let waiting: bool = waiting.get(0);
                return Ok(if waiting {
                    OperatorHead::Later(now_ms + 1_000)
                } else {
                    OperatorHead::Empty
                });
            };
            let head = OperatorDelivery {
                id: row.get(0),
                msg_id: row.get(1),
                body: Bytes::from(row.get::<_, Vec<u8>>(2)),
                attempts: u32::try_from(row.get::<_, i32>(3)).unwrap_or(0),
                next_attempt_ms: uint(row.get(4)),
                created_ms: uint(row.get(5)),
            };
            let held = row.get::<_, Option<bool>>(6).unwrap_or(false);
            if held {
                let left = uint(row.get::<_, Option<i64>>(7).unwrap_or(0));
                tx.commit().await?;
                return Ok(OperatorHead::Later(now_ms + left.max(1)));
            }
            if head.next_attempt_ms > now_ms {
                tx.commit().await?;
                return Ok(OperatorHead::Later(head.next_attempt_ms));
            }
            let hold = int(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
            tx.execute(
                &format!(
                    "UPDATE patchwire_operator_events SET claimed_by = $2, \
                     claimed_until_ms = {DB_NOW} + $3 WHERE id = $1"
                ),
                &[&head.id, &&*owner, &hold],
            )
            .await?;
            tx.commit().await?;
            Ok(OperatorHead::Due(head))
        })
    }

    fn operator_record(&self, id: i64, outcome: AttemptOutcome, at_ms: u64) -> OutboxFuture<()> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            match outcome {
                AttemptOutcome::Delivered { .. } => {
                    client
                        .execute(
                            "UPDATE patchwire_operator_events SET state = 1, \
                             attempts = attempts + 1, last_error = NULL, finished_ms = $2, \
                             claimed_by = NULL, claimed_until_ms = NULL WHERE id = $1",
                            &[&id, &int(at_ms)],
                        )
                        .await?
                }
                AttemptOutcome::Failed {
                    error,
                    retry_at_ms: Some(retry),
                    ..
                } => {
                    client
                        .execute(
                            "UPDATE patchwire_operator_events SET attempts = attempts + 1, \
                             last_error = $2, next_attempt_ms = $3, claimed_by = NULL, \
                             claimed_until_ms = NULL WHERE id = $1",
                            &[&id, &error, &int(retry)],
                        )
                        .await?
                }
                AttemptOutcome::Failed {
                    error,
                    retry_at_ms: None,
                    ..
                } => {
                    client
                        .execute(
                            "UPDATE patchwire_operator_events SET state = 2, \
                             attempts = attempts + 1, last_error = $2, finished_ms = $3, \
                             claimed_by = NULL, claimed_until_ms = NULL WHERE id = $1",
                            &[&id, &error, &int(at_ms)],
                        )
                        .await?
                }
            };
            Ok(())
        })
    }

    fn cursors(&self, stream: String) -> OutboxFuture<Vec<(String, Option<Cursor>)>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let rows = client
                .query(
                    "SELECT endpoint_id, epoch, seq FROM patchwire_cursors WHERE stream = $1 \
                     ORDER BY endpoint_id",
                    &[&stream],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let cursor = stored_cursor(r.get(1), r.get(2));
                    (r.get(0), cursor)
                })
                .collect())
        })
    }

    fn owed(&self, stream: String) -> OutboxFuture<Vec<String>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let rows = client
                .query(
                    "SELECT endpoint_id FROM patchwire_cursors WHERE stream = $1 \
                     AND seq IS NULL ORDER BY endpoint_id",
                    &[&stream],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn owe_snapshot(&self, endpoint: String, streams: Vec<String>) -> OutboxFuture<()> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            client
                .execute(
                    "INSERT INTO patchwire_cursors (endpoint_id, stream, epoch, seq) \
                     SELECT $1, s, NULL, NULL FROM unnest($2::text[]) AS s \
                     ON CONFLICT (endpoint_id, stream) DO UPDATE SET epoch = NULL, seq = NULL",
                    &[&endpoint, &streams],
                )
                .await?;
            Ok(())
        })
    }

    fn due(&self, request: Claim) -> OutboxFuture<Vec<Delivery>> {
        let pool = self.claims.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            claim(&client, request).await
        })
    }

    fn release(&self, id: i64) -> OutboxFuture<()> {
        let pool = self.claims.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            client
                .execute(
                    "UPDATE patchwire_deliveries SET claimed_by = NULL, \
                     claimed_until_ms = NULL WHERE id = $1",
                    &[&id],
                )
                .await?;
            Ok(())
        })
    }

    fn save_document(&self, document: StoredDocument) -> OutboxFuture<()> {
        let (reply, answer) = oneshot::channel();
        let sent = self.writes.send(Write::Save { document, reply }).is_ok();
        answered(sent, answer)
    }

    fn documents(&self) -> OutboxFuture<Vec<StoredDocument>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let rows = client
                .query(
                    "SELECT stream, epoch, seq, document, at_ms FROM patchwire_documents",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| StoredDocument {
                    stream: Arc::from(r.get::<_, String>(0)),
                    epoch: uint(r.get(1)),
                    seq: uint(r.get(2)),
                    document: Bytes::from(r.get::<_, Vec<u8>>(3)),
                    at: std::time::UNIX_EPOCH + Duration::from_millis(uint(r.get(4))),
                })
                .collect())
        })
    }

    fn next_due_ms(&self) -> OutboxFuture<Option<u64>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let now = int(unix_ms(std::time::SystemTime::now()));
            // A claimed head is due again when its claim expires (in the database's clock,
            // moved into this node's).
            let row = client
                .query_one(
                    &format!(
                        "SELECT min(greatest(h.next_attempt_ms, \
                         coalesce(h.claimed_until_ms - {DB_NOW} + $1 + 1, 0))) \
                         FROM patchwire_cursors c \
                         JOIN patchwire_endpoints e ON e.id = c.endpoint_id \
                             AND e.disabled_at_ms IS NULL \
                         CROSS JOIN LATERAL (SELECT d.next_attempt_ms, d.claimed_until_ms \
                             FROM patchwire_deliveries d WHERE d.endpoint_id = c.endpoint_id \
                             AND d.stream = c.stream AND d.state = 0 ORDER BY d.id LIMIT 1) AS h"
                    ),
                    &[&now],
                )
                .await?;
            Ok(row.get::<_, Option<i64>>(0).map(uint))
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
        let (reply, answer) = oneshot::channel();
        let sent = self
            .records
            .send(RecordJob {
                id,
                outcome,
                attempt,
                next,
                notes,
                reply,
            })
            .is_ok();
        answered(sent, answer)
    }

    fn attempts(&self, endpoint: String, filter: AttemptFilter) -> OutboxFuture<Vec<AttemptEntry>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let result = filter.result.map(AttemptResult::code);
            let status = filter.status.map(i32::from);
            let limit = int(u64::try_from(filter.limit).unwrap_or(u64::MAX));
            let rows = client
                .query(
                    "SELECT id, delivery_id, msg_id, stream, at_ms, duration_ms, response, result, \
                     status, error FROM patchwire_attempts WHERE endpoint_id = $1 \
                     AND ($2::text IS NULL OR stream = $2) \
                     AND ($3::smallint IS NULL OR result = $3) \
                     AND ($4::integer IS NULL OR status = $4) \
                     AND at_ms >= $5 AND at_ms < $6 AND id < $7 ORDER BY id DESC LIMIT $8",
                    &[
                        &endpoint,
                        &filter.stream,
                        &result,
                        &status,
                        &int(filter.since_ms.unwrap_or(0)),
                        &int(filter.until_ms.unwrap_or(u64::MAX)),
                        &filter.before.unwrap_or(i64::MAX),
                        &limit,
                    ],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| AttemptEntry {
                    id: r.get(0),
                    delivery: r.get(1),
                    msg_id: r.get(2),
                    stream: r.get(3),
                    attempt: Attempt {
                        at_ms: uint(r.get(4)),
                        duration_ms: uint(r.get(5)),
                        response: r.get(6),
                    },
                    result: AttemptResult::of_code(r.get(7)),
                    status: r
                        .get::<_, Option<i32>>(8)
                        .and_then(|s| u16::try_from(s).ok()),
                    error: r.get(9),
                })
                .collect())
        })
    }

    fn deliveries(&self, endpoint: String, filter: DeliveryFilter) -> OutboxFuture<Vec<Delivery>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let state = filter.state.map(state_code);
            let rows = client
                .query(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS} FROM patchwire_deliveries \
                         WHERE endpoint_id = $1 AND ($2::smallint IS NULL OR state = $2) \
                         AND id < $3 ORDER BY id DESC LIMIT $4"
                    ),
                    &[
                        &endpoint,
                        &state,
                        &filter.before.unwrap_or(i64::MAX),
                        &int(u64::try_from(filter.limit).unwrap_or(u64::MAX)),
                    ],
                )
                .await?;
            Ok(rows.iter().map(delivery).collect())
        })
    }

    fn replay(&self, endpoint: String, which: Replay, now_ms: u64) -> OutboxFuture<usize> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let (condition, arg): (&str, i64) = match which {
                Replay::One(id) => ("id = $3 AND state <> 0", id),
                Replay::DeadSince(since) => ("state = 2 AND created_ms >= $3", int(since)),
                Replay::Since(since) => ("state IN (1, 2) AND created_ms >= $3", int(since)),
            };
            let copied = client
                .execute(
                    &format!(
                        "INSERT INTO patchwire_deliveries (endpoint_id, stream, msg_id, kind, \
                         epoch, seq, base_seq, body, state, attempts, next_attempt_ms, \
                         created_ms) \
                         SELECT endpoint_id, stream, msg_id, kind, epoch, seq, base_seq, body, \
                         0, 0, $2, $2 FROM patchwire_deliveries \
                         WHERE endpoint_id = $1 AND {condition} ORDER BY id"
                    ),
                    &[&endpoint, &int(now_ms), &arg],
                )
                .await?;
            Ok(usize::try_from(copied).unwrap_or(usize::MAX))
        })
    }

    fn prune(&self, before_ms: u64) -> OutboxFuture<usize> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let removed = client
                .execute(
                    "DELETE FROM patchwire_deliveries WHERE state <> 0 AND finished_ms < $1",
                    &[&int(before_ms)],
                )
                .await?;
            let events = client
                .execute(
                    "DELETE FROM patchwire_operator_events WHERE state <> 0 AND finished_ms < $1",
                    &[&int(before_ms)],
                )
                .await?;
            Ok(usize::try_from(removed + events).unwrap_or(usize::MAX))
        })
    }

    fn check(&self) -> OutboxFuture<()> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            client.query_one("SELECT 1", &[]).await?;
            Ok(())
        })
    }

    fn prune_attempts(&self, before_ms: u64) -> OutboxFuture<usize> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let removed = client
                .execute(
                    "DELETE FROM patchwire_attempts WHERE at_ms < $1",
                    &[&int(before_ms)],
                )
                .await?;
            Ok(usize::try_from(removed).unwrap_or(usize::MAX))
        })
    }
}

/// The answer to a job sent to a writer task (`sent`: whether the task took it); a task gone
/// is the outbox closed.
fn answered<T: Send + 'static>(
    sent: bool,
    answer: oneshot::Receiver<Result<T, OutboxError>>,
) -> OutboxFuture<T> {
    Box::pin(async move {
        if !sent {
            return Err(OutboxError::Closed);
        }
        answer.await.map_err(|_| OutboxError::Closed)?
    })
}

//! What every webhook outbox must do, on both stores (SQLite and PostgreSQL): patches only
//! after the delivery holding their base, one head per pair, dead letters superseding what
//! lacks its base, backlogs collapsing, fences, idempotent accepts, pairs owed a document;
//! and, for the store nodes share, claims that hold across processes and expire.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use patchwire::sinks::webhook::body::{DeliveryKind, Mode, NoticeKind};
use patchwire::sinks::webhook::outbox::postgres::PostgresOutbox;
use patchwire::sinks::webhook::outbox::sqlite::SqliteOutbox;
use patchwire::sinks::webhook::outbox::{
    Attempt, AttemptEntry, AttemptFilter, AttemptOutcome, AttemptResult, Claim, DeliveryFilter,
    DeliveryState, Disabled, EndpointRecord, NewChange, NewNotice, Next, Notes, OperatorHead,
    OperatorNote, Outbox, OutboxError, Replay, Source, StoredDocument, Target,
};
use patchwire::wire::ChangeKind;

use crate::support::TestStore;

fn endpoint(id: &str) -> EndpointRecord {
    EndpointRecord {
        id: id.into(),
        url: "http://127.0.0.1:1/hook".into(),
        streams: vec!["s".into()],
        mode: Mode::Patch,
        headers: Default::default(),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        previous_secret: None,
        previous_expires_ms: None,
        source: Source::Api,
        created_ms: 1,
        description: None,
        metadata: Default::default(),
        rate_limit: None,
        events: Default::default(),
        format: Default::default(),
        request_hash: None,
        view_filters: Default::default(),
    }
}

fn change(epoch: u64, seq: u64, patch: bool) -> NewChange {
    NewChange {
        stream: Arc::from("s"),
        epoch,
        seq,
        base: None,
        patch: patch.then(|| Bytes::from_static(br#"[{"op":"add","path":"/n","value":1}]"#)),
        document: Some(Bytes::from(format!(r#"{{"n":{seq}}}"#))),
        at: SystemTime::now(),
    }
}

fn target(id: &str, mode: Mode) -> Target {
    Target {
        endpoint: id.into(),
        mode,
    }
}

/// Far in the future: everything queued is due.
const LATER: u64 = u64::MAX / 4;

fn claim(owner: &str, limit: usize) -> Claim {
    Claim {
        now_ms: LATER,
        limit,
        busy: Vec::new(),
        full: Vec::new(),
        per_endpoint: 100,
        owner: Arc::from(owner),
        hold: Duration::from_secs(60),
    }
}

async fn pending(outbox: &dyn Outbox, id: &str) -> Vec<(ChangeKind, u64, Option<u64>)> {
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
    all.iter()
        .filter_map(|d| match d.kind {
            DeliveryKind::Change(kind) => Some((kind, d.seq, d.base_seq)),
            DeliveryKind::Notice(_) => None,
        })
        .collect()
}

/// Every pending delivery of an endpoint, changes and notices, oldest first.
async fn queue(outbox: &dyn Outbox, id: &str) -> Vec<(DeliveryKind, u64)> {
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
    all.iter().map(|d| (d.kind, d.seq)).collect()
}

fn notice(kind: NoticeKind, seq: u64) -> NewNotice {
    NewNotice {
        stream: Arc::from("s"),
        kind,
        epoch: 1,
        seq,
        body: Bytes::from(format!(r#"{{"notice":{seq}}}"#)),
    }
}

fn note(key: &str) -> OperatorNote {
    OperatorNote {
        key: key.into(),
        msg_id: format!("msg_{key}"),
        body: Bytes::from(format!(r#"{{"key":"{key}"}}"#)),
        at_ms: 5,
    }
}

/// Records a delivered attempt (which also releases a claim).
async fn delivered(outbox: &dyn Outbox, id: i64) {
    outbox
        .record(
            id,
            AttemptOutcome::Delivered { status: 200 },
            Attempt::at(1),
            None,
        )
        .await
        .unwrap();
}

async fn first_a_snapshot_then_patches_per_mode(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    outbox.put_endpoint(endpoint("b")).await.unwrap();
    let targets = vec![target("a", Mode::Patch), target("b", Mode::Snapshot)];
    for seq in 1..=3 {
        let accepted = outbox
            .accept(change(5, seq, seq > 1), targets.clone(), 100, None)
            .await
            .unwrap();
        assert_eq!(accepted.queued, 2);
    }
    use ChangeKind::*;
    assert_eq!(
        pending(&*outbox, "a").await,
        [
            (Snapshot, 1, None),
            (Patch, 2, Some(1)),
            (Patch, 3, Some(2))
        ]
    );
    assert_eq!(
        pending(&*outbox, "b").await,
        [
            (Snapshot, 1, None),
            (Snapshot, 2, None),
            (Snapshot, 3, None)
        ]
    );
    // A new epoch (a restart) begins with a snapshot.
    outbox
        .accept(change(6, 1, false), targets.clone(), 100, None)
        .await
        .unwrap();
    outbox
        .accept(change(6, 2, true), targets.clone(), 100, None)
        .await
        .unwrap();
    assert_eq!(
        pending(&*outbox, "a").await[3..],
        [(Snapshot, 1, None), (Patch, 2, Some(1))]
    );
    // A change the pair already has (a resync snapshot was newer, or another dispatcher
    // accepted it during a handover) is skipped.
    let again = outbox
        .accept(change(6, 2, true), targets, 100, None)
        .await
        .unwrap();
    assert_eq!(again.queued, 0);
    // Consecutive calls take effect in call order even when awaited together.
    let targets = vec![target("a", Mode::Patch)];
    let calls: Vec<_> = (3..=6)
        .map(|seq| outbox.accept(change(6, seq, true), targets.clone(), 100, None))
        .collect();
    for accepted in futures_util::future::join_all(calls).await {
        assert_eq!(accepted.unwrap().queued, 1);
    }
    let tail: Vec<_> = pending(&*outbox, "a").await[5..].to_vec();
    assert_eq!(
        tail,
        [
            (Patch, 3, Some(2)),
            (Patch, 4, Some(3)),
            (Patch, 5, Some(4)),
            (Patch, 6, Some(5))
        ]
    );
}

async fn only_the_oldest_pending_delivery_of_a_pair_is_due(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    outbox.put_endpoint(endpoint("b")).await.unwrap();
    let targets = vec![target("a", Mode::Patch), target("b", Mode::Patch)];
    for seq in 1..=3 {
        outbox
            .accept(change(1, seq, seq > 1), targets.clone(), 100, None)
            .await
            .unwrap();
    }
    let due = outbox.due(claim("w", 10)).await.unwrap();
    let mut heads: Vec<_> = due.iter().map(|d| (d.endpoint.as_str(), d.seq)).collect();
    heads.sort();
    assert_eq!(heads, [("a", 1), ("b", 1)]);
    assert!(due.iter().all(|d| !d.body.is_empty()));
    for d in &due {
        outbox.release(d.id).await.unwrap();
    }
    // A busy pair is skipped; an endpoint at its concurrency limit is skipped whole.
    let busy = Claim {
        busy: vec![("a".to_owned(), "s".to_owned())],
        ..claim("w", 10)
    };
    let got = outbox.due(busy).await.unwrap();
    assert_eq!(
        got.iter().map(|d| d.endpoint.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    for d in &got {
        outbox.release(d.id).await.unwrap();
    }
    let full = Claim {
        full: vec!["a".to_owned()],
        ..claim("w", 10)
    };
    let got = outbox.due(full).await.unwrap();
    assert_eq!(
        got.iter().map(|d| d.endpoint.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    for d in &got {
        outbox.release(d.id).await.unwrap();
    }
    // A delivered head uncovers the next one.
    let head_a = due.iter().find(|d| d.endpoint == "a").unwrap().id;
    delivered(&*outbox, head_a).await;
    let mut due = outbox.due(claim("w", 10)).await.unwrap();
    due.sort_by(|x, y| x.endpoint.cmp(&y.endpoint));
    assert_eq!(
        due.iter()
            .map(|d| (d.endpoint.as_str(), d.seq))
            .collect::<Vec<_>>(),
        [("a", 2), ("b", 1)]
    );
    // A retry in the future blocks its pair (later deliveries wait), not the others.
    let failed = AttemptOutcome::Failed {
        status: Some(500),
        error: "500".into(),
        retry_at_ms: Some(LATER + 1000),
    };
    let recorded = outbox
        .record(due[1].id, failed, Attempt::at(7), None)
        .await
        .unwrap();
    assert_eq!(recorded.status.and_then(|s| s.failing_since_ms), Some(7));
    outbox.release(due[0].id).await.unwrap();
    let again = outbox.due(claim("w", 10)).await.unwrap();
    assert_eq!(
        again
            .iter()
            .map(|d| d.endpoint.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    outbox.release(again[0].id).await.unwrap();
    // Disabled endpoints have nothing due.
    outbox
        .set_disabled(
            "a".into(),
            Some(Disabled {
                at_ms: 1,
                reason: "test".into(),
            }),
        )
        .await
        .unwrap();
    assert!(outbox.due(claim("w", 10)).await.unwrap().is_empty());
    assert_eq!(outbox.next_due_ms().await.unwrap(), Some(LATER + 1000));
}

async fn a_dead_delivery_supersedes_the_patches_that_lacked_its_base(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    let targets = vec![target("a", Mode::Patch)];
    for seq in 1..=3 {
        outbox
            .accept(change(1, seq, seq > 1), targets.clone(), 100, None)
            .await
            .unwrap();
    }
    let head = outbox.due(claim("w", 1)).await.unwrap().remove(0);
    let dead = AttemptOutcome::Failed {
        status: None,
        error: "timed out".into(),
        retry_at_ms: None,
    };
    let recorded = outbox
        .record(head.id, dead, Attempt::at(10), None)
        .await
        .unwrap();
    assert!(recorded.needs_resync);
    assert!(pending(&*outbox, "a").await.is_empty());
    // The pair is owed the document now.
    assert_eq!(outbox.owed("s".into()).await.unwrap(), ["a"]);
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
        .accept(change(1, 4, true), targets.clone(), 100, None)
        .await
        .unwrap();
    assert_eq!(
        pending(&*outbox, "a").await,
        [(ChangeKind::Snapshot, 4, None)]
    );
    assert!(outbox.owed("s".into()).await.unwrap().is_empty());
    // With a snapshot queued after the gap, only the patches before it are superseded.
    let first_dead = dead[0].clone();
    outbox
        .accept(change(1, 5, true), targets.clone(), 100, None)
        .await
        .unwrap();
    outbox
        .accept(change(1, 6, false), targets.clone(), 100, None)
        .await
        .unwrap();
    let head = outbox.due(claim("w", 1)).await.unwrap().remove(0);
    assert_eq!(head.seq, 4);
    let dead = AttemptOutcome::Failed {
        status: Some(500),
        error: "500".into(),
        retry_at_ms: None,
    };
    assert!(
        !outbox
            .record(head.id, dead, Attempt::at(10), None)
            .await
            .unwrap()
            .needs_resync
    );
    assert_eq!(
        pending(&*outbox, "a").await,
        [(ChangeKind::Snapshot, 6, None)]
    );
    // Replay puts the same messages (same webhook-id and body) back at the end of the queue.
    let replayed = outbox
        .replay("a".into(), Replay::DeadSince(0), 20)
        .await
        .unwrap();
    assert_eq!(replayed, 2);
    assert_eq!(
        pending(&*outbox, "a").await,
        [
            (ChangeKind::Snapshot, 6, None),
            (ChangeKind::Snapshot, 1, None),
            (ChangeKind::Snapshot, 4, None)
        ]
    );
    let six = outbox.due(claim("w", 1)).await.unwrap().remove(0);
    delivered(&*outbox, six.id).await;
    let again = outbox.due(claim("w", 1)).await.unwrap().remove(0);
    assert_eq!(
        (again.msg_id.as_str(), again.attempts, again.seq),
        (first_dead.msg_id.as_str(), 0, 1)
    );
    // Replaying one delivery by id; a pending one, or another endpoint's, cannot be.
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

async fn a_long_backlog_collapses_into_one_snapshot(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    let targets = vec![target("a", Mode::Patch)];
    // Two of them awaited together: a backlog collapses within one batch too.
    for seq in 1..=3 {
        outbox
            .accept(change(1, seq, seq > 1), targets.clone(), 3, None)
            .await
            .unwrap();
    }
    let four = outbox.accept(change(1, 4, true), targets.clone(), 3, None);
    let five = outbox.accept(change(1, 5, true), targets.clone(), 3, None);
    assert_eq!(four.await.unwrap().collapsed, 1);
    assert_eq!(five.await.unwrap().collapsed, 0);
    // 1, 2, 3 pending; 4 found three pending: all superseded, 4 queued as a snapshot.
    assert_eq!(
        pending(&*outbox, "a").await,
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
    assert_eq!(outbox.prune(LATER).await.unwrap(), 3);
}

/// Statuses are numbered in the order the store applied the operations, whatever order their
/// callers see the answers in.
async fn statuses_are_numbered_in_the_store_order(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    let disabled = Disabled {
        at_ms: 5,
        reason: "test".into(),
    };
    let first = outbox
        .set_disabled("a".into(), Some(disabled.clone()))
        .await
        .unwrap()
        .unwrap();
    let second = outbox
        .set_disabled("a".into(), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.disabled, Some(disabled));
    assert_eq!(second.disabled, None);
    assert!(second.revision > first.revision);
    assert_eq!(
        outbox.set_disabled("nope".into(), None).await.unwrap(),
        None
    );
    assert!(outbox.delete_endpoint("a".into()).await.unwrap());
    assert!(!outbox.delete_endpoint("a".into()).await.unwrap());
}

/// A push stream's document is stored and read back; an older one never replaces it.
async fn documents_never_step_back(store: TestStore) {
    let outbox = store.open_fresh().await;
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

/// A dispatcher that lost its lease cannot write after its successor: its fence is refused
/// and nothing of its change is written; the successor's fence and higher ones pass.
async fn a_stale_fence_is_refused_and_writes_nothing(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    let targets = vec![target("a", Mode::Patch)];
    outbox
        .accept(change(1, 1, false), targets.clone(), 100, Some(5))
        .await
        .unwrap();
    // The successor (fence 6) writes; the old holder (5) is refused from then on.
    outbox
        .accept(change(1, 2, true), targets.clone(), 100, Some(6))
        .await
        .unwrap();
    match outbox
        .accept(change(1, 3, true), targets.clone(), 100, Some(5))
        .await
    {
        Err(OutboxError::Fenced) => {}
        other => panic!("expected the old fence refused, got {other:?}"),
    }
    assert_eq!(pending(&*outbox, "a").await.len(), 2);
    // Fences are per stream: another stream's writer is not affected.
    let mut other = change(1, 1, false);
    other.stream = Arc::from("t");
    assert_eq!(
        outbox
            .accept(other, targets.clone(), 100, Some(1))
            .await
            .unwrap()
            .queued,
        1
    );
    let accepted = outbox
        .accept(change(1, 3, true), targets, 100, Some(7))
        .await
        .unwrap();
    assert_eq!(accepted.queued, 1);
}

/// A change replayed from history carries no document: pairs that would need one get nothing
/// for it, are owed the document, and get the next change as a snapshot; `owe_snapshot` marks
/// pairs the same way.
async fn pairs_needing_a_missing_document_are_owed_it(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    outbox.put_endpoint(endpoint("b")).await.unwrap();
    let targets = vec![target("a", Mode::Patch), target("b", Mode::Snapshot)];
    outbox
        .accept(change(1, 1, false), targets.clone(), 100, None)
        .await
        .unwrap();
    let mut replayed = change(1, 2, true);
    replayed.document = None;
    let accepted = outbox
        .accept(replayed, targets.clone(), 100, None)
        .await
        .unwrap();
    assert_eq!((accepted.queued, accepted.owed), (1, 1));
    assert_eq!(outbox.owed("s".into()).await.unwrap(), ["b"]);
    let cursors = outbox.cursors("s".into()).await.unwrap();
    assert_eq!(cursors.len(), 2);
    assert_eq!(cursors[0].1.map(|c| c.seq), Some(2));
    assert_eq!(cursors[1].1, None);
    outbox
        .owe_snapshot("a".into(), vec!["s".into(), "t".into()])
        .await
        .unwrap();
    assert_eq!(outbox.owed("s".into()).await.unwrap(), ["a", "b"]);
    assert_eq!(outbox.owed("t".into()).await.unwrap(), ["a"]);
    outbox
        .accept(change(1, 3, true), targets, 100, None)
        .await
        .unwrap();
    assert!(outbox.owed("s".into()).await.unwrap().is_empty());
    assert_eq!(
        pending(&*outbox, "a").await[2..],
        [(ChangeKind::Snapshot, 3, None)]
    );
    // A target that no longer exists gets nothing (deleted on another node).
    let accepted = outbox
        .accept(
            change(1, 4, true),
            vec![target("gone", Mode::Patch)],
            100,
            None,
        )
        .await
        .unwrap();
    assert_eq!(accepted.queued, 0);
}

/// Recording an attempt can hand the worker its pair's next delivery at once (due, and for a
/// shared store claimed for it): never one that is not due, never another pair's.
async fn a_record_hands_over_the_pairs_next_delivery(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    for seq in 1..=3 {
        outbox
            .accept(
                change(1, seq, seq > 1),
                vec![target("a", Mode::Patch)],
                100,
                None,
            )
            .await
            .unwrap();
    }
    let next = |now_ms| {
        Some(Next {
            now_ms,
            owner: Arc::from("w"),
            hold: Duration::from_secs(60),
        })
    };
    let head = outbox.due(claim("w", 10)).await.unwrap().remove(0);
    let recorded = outbox
        .record(
            head.id,
            AttemptOutcome::Delivered { status: 200 },
            Attempt::at(1),
            next(LATER),
        )
        .await
        .unwrap();
    let second = recorded.next.expect("the next delivery");
    assert_eq!((second.seq, second.endpoint.as_str()), (2, "a"));
    assert!(!second.body.is_empty());
    if store.is_shared() {
        assert!(
            outbox.due(claim("other", 10)).await.unwrap().is_empty(),
            "handed over claimed"
        );
    }
    // A retry in the future: the same delivery stays the head, nothing is handed over.
    let failed = AttemptOutcome::Failed {
        status: Some(500),
        error: "500".into(),
        retry_at_ms: Some(LATER + 1),
    };
    let recorded = outbox
        .record(second.id, failed, Attempt::at(2), next(LATER))
        .await
        .unwrap();
    assert!(recorded.next.is_none());
    // Not yet due at the worker's time: nothing.
    let third_due = outbox
        .due(Claim {
            now_ms: LATER + 2,
            ..claim("w", 10)
        })
        .await
        .unwrap()
        .remove(0);
    assert_eq!(third_due.id, second.id);
    let recorded = outbox
        .record(
            third_due.id,
            AttemptOutcome::Delivered { status: 200 },
            Attempt::at(3),
            next(0),
        )
        .await
        .unwrap();
    assert!(recorded.next.is_none(), "seq 3 is due, but not at time 0");
}

/// Every recorded attempt is an entry of the history (time, duration, result, status, the
/// answer's start, the error), listed newest first, filtered by stream, result, status and
/// time, paged by id; pruning removes old entries only; deleting an endpoint removes its own.
async fn every_attempt_is_in_the_history(store: TestStore) {
    let outbox = store.open_fresh().await;
    let mut other = endpoint("b");
    other.streams = vec!["s".into(), "t".into()];
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    outbox.put_endpoint(other).await.unwrap();
    let targets = vec![target("a", Mode::Patch), target("b", Mode::Patch)];
    outbox
        .accept(change(1, 1, false), targets.clone(), 100, None)
        .await
        .unwrap();
    let mut on_t = change(1, 1, false);
    on_t.stream = Arc::from("t");
    outbox
        .accept(on_t, vec![target("b", Mode::Patch)], 100, None)
        .await
        .unwrap();
    let retrying = AttemptOutcome::Failed {
        status: Some(503),
        error: "the receiver answered 503 Service Unavailable".into(),
        retry_at_ms: Some(0),
    };
    let attempt = |at_ms, duration_ms, response: &str| Attempt {
        at_ms,
        duration_ms,
        response: response.into(),
    };
    // a/s: fails at 1000, fails without an answer at 2000, delivered at 3000.
    let head = |endpoint: &'static str, stream: &'static str| {
        let outbox = outbox.clone();
        async move {
            let all = outbox.due(claim("w", 10)).await.unwrap();
            let found = all
                .iter()
                .find(|d| d.endpoint == endpoint && d.stream == stream)
                .expect("a due delivery")
                .clone();
            for d in all {
                if d.id != found.id {
                    outbox.release(d.id).await.unwrap();
                }
            }
            found
        }
    };
    let a = head("a", "s").await;
    outbox
        .record(a.id, retrying.clone(), attempt(1000, 30, "busy"), None)
        .await
        .unwrap();
    let timed_out = AttemptOutcome::Failed {
        status: None,
        error: "no answer within 15s".into(),
        retry_at_ms: Some(0),
    };
    let a2 = head("a", "s").await;
    assert_eq!(a2.id, a.id, "the same delivery is retried");
    outbox
        .record(a.id, timed_out, attempt(2000, 15000, ""), None)
        .await
        .unwrap();
    head("a", "s").await;
    outbox
        .record(
            a.id,
            AttemptOutcome::Delivered { status: 204 },
            attempt(3000, 5, "ok"),
            None,
        )
        .await
        .unwrap();
    // b/s dead at 4000, b/t delivered at 5000.
    let b = head("b", "s").await;
    let dead = AttemptOutcome::Failed {
        status: Some(500),
        error: "the receiver answered 500".into(),
        retry_at_ms: None,
    };
    outbox
        .record(b.id, dead, attempt(4000, 7, "oops"), None)
        .await
        .unwrap();
    let bt = head("b", "t").await;
    outbox
        .record(
            bt.id,
            AttemptOutcome::Delivered { status: 200 },
            attempt(5000, 1, ""),
            None,
        )
        .await
        .unwrap();

    let list = |endpoint: &str, filter: AttemptFilter| {
        let outbox = outbox.clone();
        let endpoint = endpoint.to_owned();
        async move { outbox.attempts(endpoint, filter).await.unwrap() }
    };
    let all = |limit| AttemptFilter {
        limit,
        ..AttemptFilter::default()
    };
    let history = list("a", all(10)).await;
    assert_eq!(history.len(), 3);
    let newest = &history[0];
    assert_eq!(newest.attempt, attempt(3000, 5, "ok"));
    assert_eq!(
        (newest.result, newest.status, newest.error.as_deref()),
        (AttemptResult::Delivered, Some(204), None)
    );
    assert_eq!(
        (
            newest.delivery,
            newest.msg_id.as_str(),
            newest.stream.as_str()
        ),
        (a.id, a.msg_id.as_str(), "s")
    );
    assert_eq!(
        (
            history[1].result,
            history[1].status,
            history[1].error.as_deref()
        ),
        (AttemptResult::Retrying, None, Some("no answer within 15s"))
    );
    assert_eq!(history[1].attempt.duration_ms, 15000);
    assert_eq!(history[2].attempt, attempt(1000, 30, "busy"));
    assert_eq!(history[2].status, Some(503));
    assert!(history[0].id > history[1].id && history[1].id > history[2].id);
    // Pages: newest first, each below the previous page's last id.
    let first = list("a", all(2)).await;
    assert_eq!(
        first.iter().map(|e| e.id).collect::<Vec<_>>(),
        [history[0].id, history[1].id]
    );
    let rest = list(
        "a",
        AttemptFilter {
            before: Some(first[1].id),
            ..all(2)
        },
    )
    .await;
    assert_eq!(
        rest.iter().map(|e| e.id).collect::<Vec<_>>(),
        [history[2].id]
    );
    // Filters.
    let results =
        |entries: Vec<AttemptEntry>| entries.iter().map(|e| e.attempt.at_ms).collect::<Vec<_>>();
    let retries = AttemptFilter {
        result: Some(AttemptResult::Retrying),
        ..all(10)
    };
    assert_eq!(results(list("a", retries).await), [2000, 1000]);
    let status = AttemptFilter {
        status: Some(503),
        ..all(10)
    };
    assert_eq!(results(list("a", status).await), [1000]);
    let window = AttemptFilter {
        since_ms: Some(2000),
        until_ms: Some(3000),
        ..all(10)
    };
    assert_eq!(results(list("a", window).await), [2000]);
    assert_eq!(results(list("b", all(10)).await), [5000, 4000]);
    let on_t = AttemptFilter {
        stream: Some("t".into()),
        ..all(10)
    };
    assert_eq!(results(list("b", on_t).await), [5000]);
    let dead_ones = AttemptFilter {
        result: Some(AttemptResult::Dead),
        ..all(10)
    };
    let dead_list = list("b", dead_ones).await;
    assert_eq!(results(dead_list.clone()), [4000]);
    assert_eq!(
        dead_list[0].error.as_deref(),
        Some("the receiver answered 500")
    );
    // Pruning removes attempts made before the time, of every endpoint, and nothing else.
    assert_eq!(outbox.prune_attempts(2500).await.unwrap(), 2);
    assert_eq!(results(list("a", all(10)).await), [3000]);
    assert_eq!(results(list("b", all(10)).await), [5000, 4000]);
    // Deleting an endpoint deletes its history.
    outbox.delete_endpoint("b".into()).await.unwrap();
    assert!(list("b", all(10)).await.is_empty());
    assert_eq!(results(list("a", all(10)).await), [3000]);
}

/// Notices (errors, recoveries) queue on the pair's queue after the changes before them, move
/// no cursor (the next patch still follows its base), are delivered in order, never
/// superseded by a collapse or a dead delivery, and a dead notice leaves no gap.
async fn notices_queue_in_order_with_changes(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    outbox.put_endpoint(endpoint("quiet")).await.unwrap();
    let targets = vec![target("a", Mode::Patch)];
    // A notice to a pair that never had a change: its queue is made (and it is owed the
    // document it never got).
    let queued = outbox
        .notice(notice(NoticeKind::Error, 0), vec!["quiet".into()], None)
        .await
        .unwrap();
    assert_eq!(queued, 1);
    assert_eq!(queue(&*outbox, "quiet").await, [(DeliveryKind::ERROR, 0)]);
    for seq in 1..=2 {
        outbox
            .accept(change(1, seq, seq > 1), targets.clone(), 100, None)
            .await
            .unwrap();
    }
    // Queued without awaiting in between: call order is queue order.
    let error = outbox.notice(
        notice(NoticeKind::Error, 2),
        vec!["a".into(), "gone".into()],
        None,
    );
    let third = outbox.accept(change(1, 3, true), targets.clone(), 100, None);
    let recovery = outbox.notice(notice(NoticeKind::Recovery, 3), vec!["a".into()], None);
    assert_eq!(error.await.unwrap(), 1, "a deleted endpoint gets nothing");
    third.await.unwrap();
    recovery.await.unwrap();
    assert_eq!(
        queue(&*outbox, "a").await,
        [
            (DeliveryKind::SNAPSHOT, 1),
            (DeliveryKind::PATCH, 2),
            (DeliveryKind::ERROR, 2),
            (DeliveryKind::PATCH, 3),
            (DeliveryKind::RECOVERY, 3),
        ]
    );
    // Delivered head by head in that order; a dead notice supersedes nothing.
    let mut sent = Vec::new();
    for _ in 0..5 {
        let head = outbox
            .due(claim("w", 10))
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.endpoint == "a")
            .unwrap();
        sent.push(head.kind);
        if head.kind == DeliveryKind::ERROR {
            assert_eq!(&head.body[..], br#"{"notice":2}"#);
            let dead = AttemptOutcome::Failed {
                status: Some(500),
                error: "500".into(),
                retry_at_ms: None,
            };
            let recorded = outbox
                .record(head.id, dead, Attempt::at(10), None)
                .await
                .unwrap();
            assert!(!recorded.needs_resync, "a dead notice leaves no gap");
        } else {
            delivered(&*outbox, head.id).await;
        }
    }
    assert_eq!(
        sent,
        [
            DeliveryKind::SNAPSHOT,
            DeliveryKind::PATCH,
            DeliveryKind::ERROR,
            DeliveryKind::PATCH,
            DeliveryKind::RECOVERY
        ]
    );
    // A backlog collapse supersedes the changes, never the notices.
    outbox
        .notice(notice(NoticeKind::Error, 3), vec!["a".into()], None)
        .await
        .unwrap();
    for seq in 4..=6 {
        outbox
            .accept(change(1, seq, true), targets.clone(), 2, None)
            .await
            .unwrap();
    }
    assert_eq!(
        queue(&*outbox, "a").await,
        [(DeliveryKind::ERROR, 3), (DeliveryKind::SNAPSHOT, 6)]
    );
    // Fenced as accepts are.
    outbox
        .accept(change(1, 7, true), targets.clone(), 100, Some(5))
        .await
        .unwrap();
    assert!(matches!(
        outbox
            .notice(notice(NoticeKind::Recovery, 7), vec!["a".into()], Some(4))
            .await,
        Err(OutboxError::Fenced)
    ));
}

/// Operational events are stored once per key, with the record or status change causing
/// them (a recovery only when the record ends the failures; a disable or re-enable only when
/// the status changes), and handed out one at a time, oldest first, retried when due.
async fn operator_events_are_stored_once_and_sent_in_order(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    let owner: Arc<str> = Arc::from("n1");
    let hold = Duration::from_secs(60);
    assert_eq!(
        outbox
            .operator_head(LATER, owner.clone(), hold)
            .await
            .unwrap(),
        OperatorHead::Empty
    );
    assert!(outbox.note(note("first")).await.unwrap());
    assert!(!outbox.note(note("first")).await.unwrap(), "once per key");
    // Disabling stores its event; disabling again (another node, another attempt) does not.
    let off = || Disabled {
        at_ms: 7,
        reason: "gone".into(),
    };
    outbox
        .set_disabled_noted("a".into(), Some(off()), Some(note("disabled-1")), None)
        .await
        .unwrap();
    outbox
        .set_disabled_noted("a".into(), Some(off()), Some(note("disabled-2")), None)
        .await
        .unwrap();
    outbox
        .set_disabled_noted("a".into(), None, Some(note("enabled")), None)
        .await
        .unwrap();
    // A dead delivery's event is stored with its record; a recovery only if the record ends
    // the endpoint's failures.
    outbox
        .accept(
            change(1, 1, false),
            vec![target("a", Mode::Patch)],
            100,
            None,
        )
        .await
        .unwrap();
    outbox
        .accept(
            change(1, 2, false),
            vec![target("a", Mode::Patch)],
            100,
            None,
        )
        .await
        .unwrap();
    let head = outbox.due(claim("w", 1)).await.unwrap().remove(0);
    let dead = AttemptOutcome::Failed {
        status: Some(500),
        error: "500".into(),
        retry_at_ms: None,
    };
    outbox
        .record_noted(
            head.id,
            dead,
            Attempt::at(10),
            None,
            Notes {
                always: vec![note("dead")],
                if_recovered: Some(note("not-recovered")),
            },
        )
        .await
        .unwrap();
    let head = outbox.due(claim("w", 1)).await.unwrap().remove(0);
    outbox
        .record_noted(
            head.id,
            AttemptOutcome::Delivered { status: 200 },
            Attempt::at(11),
            None,
            Notes {
                always: Vec::new(),
                if_recovered: Some(note("recovered")),
            },
        )
        .await
        .unwrap();
    // A delivery to an endpoint that was not failing stores no recovery.
    outbox
        .accept(
            change(1, 3, false),
            vec![target("a", Mode::Patch)],
            100,
            None,
        )
        .await
        .unwrap();
    let head = outbox.due(claim("w", 1)).await.unwrap().remove(0);
    outbox
        .record_noted(
            head.id,
            AttemptOutcome::Delivered { status: 200 },
            Attempt::at(12),
            None,
            Notes {
                always: Vec::new(),
                if_recovered: Some(note("recovered-again")),
            },
        )
        .await
        .unwrap();

    let mut sent = Vec::new();
    let mut retried = false;
    loop {
        match outbox
            .operator_head(LATER, owner.clone(), hold)
            .await
            .unwrap()
        {
            OperatorHead::Empty => break,
            OperatorHead::Later(at) => panic!("nothing should wait (until {at})"),
            OperatorHead::Due(event) => {
                if !retried {
                    // The first attempt fails: retried when due, before anything after it.
                    retried = true;
                    outbox
                        .operator_record(
                            event.id,
                            AttemptOutcome::Failed {
                                status: Some(503),
                                error: "503".into(),
                                retry_at_ms: Some(LATER + 1),
                            },
                            1,
                        )
                        .await
                        .unwrap();
                    assert!(matches!(
                        outbox.operator_head(LATER, owner.clone(), hold).await.unwrap(),
                        OperatorHead::Later(at) if at == LATER + 1
                    ));
                    let again = outbox
                        .operator_head(LATER + 1, owner.clone(), hold)
                        .await
                        .unwrap();
                    let OperatorHead::Due(again) = again else {
                        panic!("the retry is due: {again:?}");
                    };
                    assert_eq!((again.id, again.attempts), (event.id, 1));
                    assert_eq!(again.msg_id, event.msg_id, "same webhook-id");
                }
                sent.push(event.msg_id.clone());
                outbox
                    .operator_record(event.id, AttemptOutcome::Delivered { status: 204 }, 2)
                    .await
                    .unwrap();
            }
        }
    }
    assert_eq!(
        sent,
        [
            "msg_first",
            "msg_disabled-1",
            "msg_enabled",
            "msg_dead",
            "msg_recovered"
        ]
    );
    // Delivered events are pruned with finished deliveries.
    assert!(outbox.prune(u64::MAX / 2).await.unwrap() >= 5);
}

/// A database made by an earlier version (schema 1: no operational events, no pair told its
/// stream fails) opens: its endpoints and deliveries are kept, events can be stored, and
/// notices tell each pair once.
async fn an_old_schema_database_is_upgraded(store: TestStore) {
    match store.fresh_database().await {
        None => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("outbox.db");
            {
                let outbox = SqliteOutbox::open(&path).await.unwrap();
                outbox.put_endpoint(endpoint("a")).await.unwrap();
                outbox
                    .accept(
                        change(1, 1, false),
                        vec![target("a", Mode::Patch)],
                        100,
                        None,
                    )
                    .await
                    .unwrap();
            }
            {
                // Back to version 1, as the previous patchwire left it.
                let conn = rusqlite::Connection::open(&path).unwrap();
                conn.execute_batch(
                    "DROP TABLE operator_events; ALTER TABLE cursors DROP COLUMN failing; \
                     ALTER TABLE cursors DROP COLUMN failing_epoch; \
                     ALTER TABLE cursors DROP COLUMN failing_seq; PRAGMA user_version = 1;",
                )
                .unwrap();
            }
            let outbox = SqliteOutbox::open(&path).await.unwrap();
            assert_eq!(pending(&outbox, "a").await.len(), 1);
            assert!(outbox.note(note("after")).await.unwrap());
            let version: i64 = rusqlite::Connection::open(&path)
                .unwrap()
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(version, 3);
            told_once(&outbox).await;
        }
        Some(url) => {
            {
                let outbox = PostgresOutbox::open(&url, 4, "test").await.unwrap();
                outbox.put_endpoint(endpoint("a")).await.unwrap();
                outbox
                    .accept(
                        change(1, 1, false),
                        vec![target("a", Mode::Patch)],
                        100,
                        None,
                    )
                    .await
                    .unwrap();
            }
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
                .batch_execute(
                    "DROP TABLE patchwire_operator_events; \
                     ALTER TABLE patchwire_cursors DROP COLUMN failing, \
                     DROP COLUMN failing_epoch, DROP COLUMN failing_seq; \
                     DELETE FROM patchwire_schema WHERE version >= 2; \
                     INSERT INTO patchwire_schema (version) SELECT 1 \
                     WHERE NOT EXISTS (SELECT 1 FROM patchwire_schema)",
                )
                .await
                .unwrap();
            let outbox = PostgresOutbox::open(&url, 4, "test").await.unwrap();
            assert_eq!(pending(&outbox, "a").await.len(), 1);
            assert!(outbox.note(note("after")).await.unwrap());
            let version: i32 = client
                .query_one("SELECT max(version) FROM patchwire_schema", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(version, 3);
            told_once(&outbox).await;
        }
    }
}

/// A worker disables an endpoint that failed for too long only while it still fails since the
/// time it decided from: not after an admin re-enabled it meanwhile (which clears the time),
/// and not from a stale time once it fails again; a disable not applied stores no event.
async fn a_disable_for_failing_too_long_yields_to_a_re_enable(store: TestStore) {
    let outbox = store.open_fresh().await;
    outbox.put_endpoint(endpoint("a")).await.unwrap();
    outbox
        .accept(
            change(1, 1, false),
            vec![target("a", Mode::Patch)],
            100,
            None,
        )
        .await
        .unwrap();
    let outbox = &*outbox;
    let fail_at = |at: u64| async move {
        let due = outbox.due(claim("w", 10)).await.unwrap();
        assert_eq!(due.len(), 1, "the delivery is due again");
        let failed = AttemptOutcome::Failed {
            status: Some(500),
            error: "500".into(),
            // Due again at once (claims are made at LATER).
            retry_at_ms: Some(at),
        };
        let recorded = outbox
            .record(due[0].id, failed, Attempt::at(at), None)
            .await
            .unwrap();
        recorded.status.and_then(|s| s.failing_since_ms)
    };
    assert_eq!(fail_at(7).await, Some(7));
    // An admin re-enables it (it was never disabled: clearing clears the failing time too).
    let enabled = outbox
        .set_disabled("a".into(), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(enabled.failing_since_ms, None);
    let off = || Disabled {
        at_ms: 20,
        reason: "failing".into(),
    };
    let disable = |since: u64, key: &'static str| {
        outbox.set_disabled_noted("a".into(), Some(off()), Some(note(key)), Some(since))
    };
    assert_eq!(
        disable(7, "late").await.unwrap(),
        None,
        "re-enabled meanwhile"
    );
    // It fails again: a disable decided from the old time is still not applied.
    assert_eq!(fail_at(11).await, Some(11));
    assert_eq!(disable(7, "stale").await.unwrap(), None);
    let statuses = outbox.endpoints().await.unwrap();
    assert!(statuses.iter().all(|(_, status)| status.disabled.is_none()));
    // Neither stored its event (a key not stored yet is stored now).
    assert!(outbox.note(note("late")).await.unwrap());
    assert!(outbox.note(note("stale")).await.unwrap());
    // Decided from the time it shows: applied, with its event.
    let status = disable(11, "timely").await.unwrap().expect("disabled");
    assert_eq!(
        status.disabled.map(|d| d.reason),
        Some("failing".to_owned())
    );
    assert!(
        !outbox.note(note("timely")).await.unwrap(),
        "stored with the disable"
    );
}

/// After an upgrade, a pair is told once that its stream fails.
async fn told_once(outbox: &dyn Outbox) {
    let error = || notice(NoticeKind::Error, 1);
    assert_eq!(
        outbox
            .notice(error(), vec!["a".into()], None)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        outbox
            .notice(error(), vec!["a".into()], None)
            .await
            .unwrap(),
        0
    );
}

/// Each pair is told once that its stream fails, however many dispatchers (a node taking the
/// stream over, a restarted process) see the same run of failures, and told it recovered only
/// if it was told it failed; a run whose recovery went unseen is over once the pair's cursor
/// moves (a change was delivered since), so the next failure is told.
async fn a_failing_stream_is_told_once_per_run(store: TestStore) {
    let outbox = store.open_fresh().await;
    let outbox = &*outbox;
    for id in ["a", "b", "c"] {
        outbox.put_endpoint(endpoint(id)).await.unwrap();
    }
    let ab = || vec!["a".to_owned(), "b".to_owned()];
    let accept = |seq: u64| async move {
        outbox
            .accept(
                change(1, seq, seq > 1),
                vec![target("a", Mode::Patch), target("b", Mode::Patch)],
                100,
                None,
            )
            .await
            .unwrap()
    };
    accept(1).await;
    let tell = |kind: NoticeKind, seq: u64, targets: Vec<String>| async move {
        outbox
            .notice(notice(kind, seq), targets, None)
            .await
            .unwrap()
    };
    assert_eq!(tell(NoticeKind::Error, 1, vec!["a".into()]).await, 1);
    // Another node takes the stream over, still failing: only `b`, not told yet, is told.
    assert_eq!(tell(NoticeKind::Error, 1, ab()).await, 1);
    assert_eq!(
        tell(NoticeKind::Error, 1, ab()).await,
        0,
        "a restarted process"
    );
    // `c` was never told it failed: it is not told it recovered.
    let mut all = ab();
    all.push("c".into());
    assert_eq!(tell(NoticeKind::Recovery, 1, all.clone()).await, 2);
    assert_eq!(tell(NoticeKind::Recovery, 1, all).await, 0);
    // A new run is told again.
    assert_eq!(tell(NoticeKind::Error, 1, ab()).await, 2);
    // Its recovery unseen (the process died, the next one's first poll answered), a change
    // moves the cursors: the next failure is a new run.
    accept(2).await;
    assert_eq!(tell(NoticeKind::Error, 2, ab()).await, 2);
    assert_eq!(tell(NoticeKind::Error, 2, ab()).await, 0);
    let kinds = |q: Vec<(DeliveryKind, u64)>| q.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let error = DeliveryKind::Notice(NoticeKind::Error);
    let recovery = DeliveryKind::Notice(NoticeKind::Recovery);
    assert_eq!(
        kinds(queue(outbox, "a").await),
        [
            DeliveryKind::SNAPSHOT,
            error,
            recovery,
            error,
            DeliveryKind::PATCH,
            error
        ]
    );
    assert_eq!(
        kinds(queue(outbox, "b").await),
        [
            DeliveryKind::SNAPSHOT,
            error,
            recovery,
            error,
            DeliveryKind::PATCH,
            error
        ]
    );
    assert!(queue(outbox, "c").await.is_empty());
}

crate::on_both_stores!(
    notices_queue_in_order_with_changes,
    a_failing_stream_is_told_once_per_run,
    a_disable_for_failing_too_long_yields_to_a_re_enable,
    operator_events_are_stored_once_and_sent_in_order,
    an_old_schema_database_is_upgraded,
    every_attempt_is_in_the_history,
    a_record_hands_over_the_pairs_next_delivery,
    first_a_snapshot_then_patches_per_mode,
    only_the_oldest_pending_delivery_of_a_pair_is_due,
    a_dead_delivery_supersedes_the_patches_that_lacked_its_base,
    a_long_backlog_collapses_into_one_snapshot,
    statuses_are_numbered_in_the_store_order,
    documents_never_step_back,
    a_stale_fence_is_refused_and_writes_nothing,
    pairs_needing_a_missing_document_are_owed_it,
);

/// Two processes on one PostgreSQL database: a head claimed by one is not handed to the
/// other until the claim is recorded, released, or expires; an expired claim hands over the
/// same message (same `webhook-id`). Claims are timed by the database's clock.
#[tokio::test]
async fn claims_hold_across_processes_until_they_expire() {
    let Some(store) = TestStore::postgres() else {
        return;
    };
    let url = store.fresh_database().await.unwrap();
    let first: Arc<dyn Outbox> = Arc::new(PostgresOutbox::open(&url, 4, "first").await.unwrap());
    first.put_endpoint(endpoint("a")).await.unwrap();
    for seq in 1..=2 {
        first
            .accept(
                change(1, seq, seq > 1),
                vec![target("a", Mode::Patch)],
                100,
                None,
            )
            .await
            .unwrap();
    }
    // The same database through another pool, as another node has.
    let second = PostgresOutbox::open(&url, 4, "second").await.unwrap();
    let short = |owner: &str| Claim {
        hold: Duration::from_millis(800),
        ..claim(owner, 10)
    };
    let taken = first.due(short("node-a")).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert!(
        second.due(short("node-b")).await.unwrap().is_empty(),
        "a claimed head is not handed out twice, nor is the next delivery of its pair"
    );
    // Node a dies without recording: after the hold, node b gets the same message.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let retaken = second.due(short("node-b")).await.unwrap();
    assert_eq!(retaken.len(), 1);
    assert_eq!(
        (retaken[0].id, &retaken[0].msg_id),
        (taken[0].id, &taken[0].msg_id)
    );
    // Recorded: the next head is free for anyone at once.
    delivered(&second, retaken[0].id).await;
    let next = first.due(short("node-a")).await.unwrap();
    assert_eq!(next.iter().map(|d| d.seq).collect::<Vec<_>>(), [2]);
    // Released: free at once too.
    first.release(next[0].id).await.unwrap();
    assert_eq!(second.due(short("node-b")).await.unwrap().len(), 1);
    // At most `per_endpoint` claims per endpoint across processes.
    first.put_endpoint(endpoint("m")).await.unwrap();
    for stream in ["x", "y", "z"] {
        let mut c = change(1, 1, false);
        c.stream = Arc::from(stream);
        first
            .accept(c, vec![target("m", Mode::Patch)], 100, None)
            .await
            .unwrap();
    }
    let two = Claim {
        per_endpoint: 2,
        ..claim("node-a", 10)
    };
    assert_eq!(first.due(two.clone()).await.unwrap().len(), 2);
    assert!(second.due(two).await.unwrap().is_empty());
}

/// Accepts of one stream from two processes at once (a handover) queue each change once.
#[tokio::test]
async fn concurrent_accepts_from_two_processes_queue_each_change_once() {
    let Some(store) = TestStore::postgres() else {
        return;
    };
    let url = store.fresh_database().await.unwrap();
    let first: Arc<dyn Outbox> = Arc::new(PostgresOutbox::open(&url, 4, "first").await.unwrap());
    first.put_endpoint(endpoint("a")).await.unwrap();
    let second: Arc<dyn Outbox> = Arc::new(PostgresOutbox::open(&url, 4, "second").await.unwrap());
    let targets = vec![target("a", Mode::Patch)];
    let mut calls = Vec::new();
    for seq in 1..=50 {
        for outbox in [&first, &second] {
            calls.push(outbox.accept(change(1, seq, seq > 1), targets.clone(), 1000, Some(9)));
        }
    }
    for result in futures_util::future::join_all(calls).await {
        result.unwrap();
    }
    let queued = pending(&*first, "a").await;
    let seqs: Vec<u64> = queued.iter().map(|q| q.1).collect();
    let mut unique = seqs.clone();
    unique.dedup();
    assert_eq!(seqs, unique, "a change queued twice: {queued:?}");
    // Every queued patch continues the one before it.
    for pair in queued.windows(2) {
        if pair[1].0 == ChangeKind::Patch {
            assert_eq!(pair[1].2, Some(pair[0].1), "{queued:?}");
        }
    }
    assert_eq!(seqs.last(), Some(&50));
}

/// Two nodes on one PostgreSQL database: the same status change made by both stores one
/// operational event (whichever commits second sees the change made), concurrent notes of one
/// key store one, and the head claimed by one node is not handed to the other until its
/// claim is recorded or expires.
#[tokio::test]
async fn operator_events_are_recorded_once_across_nodes() {
    let Some(store) = TestStore::postgres() else {
        return;
    };
    let url = store.fresh_database().await.unwrap();
    let first: Arc<dyn Outbox> = Arc::new(PostgresOutbox::open(&url, 4, "first").await.unwrap());
    let second: Arc<dyn Outbox> = Arc::new(PostgresOutbox::open(&url, 4, "second").await.unwrap());
    first.put_endpoint(endpoint("a")).await.unwrap();
    let off = |at_ms| Disabled {
        at_ms,
        reason: "every attempt failed".into(),
    };
    // Both nodes disable the endpoint at once, each with its own note (their own times).
    let (one, two) = tokio::join!(
        first.set_disabled_noted(
            "a".into(),
            Some(off(1)),
            Some(note("disabled-on-first")),
            None
        ),
        second.set_disabled_noted(
            "a".into(),
            Some(off(2)),
            Some(note("disabled-on-second")),
            None
        ),
    );
    assert!(one.unwrap().unwrap().disabled.is_some());
    assert!(two.unwrap().unwrap().disabled.is_some());
    // Both store the same key at once.
    let (one, two) = tokio::join!(first.note(note("same")), second.note(note("same")));
    assert_eq!(
        [one.unwrap(), two.unwrap()].iter().filter(|s| **s).count(),
        1
    );
    let hold = Duration::from_millis(800);
    let OperatorHead::Due(head) = first
        .operator_head(LATER, Arc::from("node-a"), hold)
        .await
        .unwrap()
    else {
        panic!("the first event is due");
    };
    // Held by node-a: node-b waits.
    assert!(matches!(
        second
            .operator_head(LATER, Arc::from("node-b"), hold)
            .await
            .unwrap(),
        OperatorHead::Later(_)
    ));
    // Node-a dies holding it: after the claim expires node-b sends the same event.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let OperatorHead::Due(again) = second
        .operator_head(LATER, Arc::from("node-b"), hold)
        .await
        .unwrap()
    else {
        panic!("the expired claim is taken over");
    };
    assert_eq!((again.id, &again.msg_id), (head.id, &head.msg_id));
    let mut sent = Vec::new();
    let mut next = Some(again);
    while let Some(event) = next.take() {
        sent.push(event.msg_id.clone());
        second
            .operator_record(event.id, AttemptOutcome::Delivered { status: 200 }, 3)
            .await
            .unwrap();
        if let OperatorHead::Due(event) = first
            .operator_head(LATER, Arc::from("node-a"), hold)
            .await
            .unwrap()
        {
            next = Some(event);
        }
    }
    assert_eq!(sent.len(), 2, "one disable, one note of the key: {sent:?}");
    assert!(sent[0].starts_with("msg_disabled-on-"), "{sent:?}");
    assert_eq!(sent[1], "msg_same");
}

//! The cluster's Redis scripts against a real `redis-server`: fenced, sequenced appends,
//! bounded logs, leases and heartbeats.

use std::time::Duration;

use patchwire::cluster::keys::Keys;
use patchwire::cluster::store::{Append, Appended, Claimed, Lease, Retention, Store};
use patchwire::wire::ChangeKind as Kind;

use crate::support::redis::RedisServer;

async fn store(server: &RedisServer) -> Store {
    let client = redis::Client::open(server.url()).expect("redis url");
    let connection = client
        .get_connection_manager()
        .await
        .expect("connecting to redis");
    Store::new(connection, Keys::new("t"))
}

const RETAIN: Retention = Retention {
    history: 4,
    history_bytes: 1 << 20,
    ttl: Duration::from_secs(60),
};

fn snapshot(epoch: Option<u64>, base: u64, doc: &[u8]) -> Append<'_> {
    Append {
        fence: None,
        epoch,
        base,
        kind: Kind::Snapshot,
        payload: doc,
        at_ms: 1,
        document: None,
        new_epoch: 77,
        reset: false,
        config: None,
    }
}

fn patch(epoch: u64, base: u64, patch: &[u8]) -> Append<'_> {
    Append {
        fence: None,
        epoch: Some(epoch),
        base,
        kind: Kind::Patch,
        payload: patch,
        at_ms: 2,
        document: None,
        new_epoch: 0,
        reset: false,
        config: None,
    }
}

#[tokio::test]
async fn appends_are_sequenced_and_a_stale_base_conflicts() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;

    // Only a snapshot may start an epoch.
    let refused = store
        .append("s", &patch(77, 0, b"[]"), &RETAIN)
        .await
        .expect("append");
    assert_eq!(
        refused,
        Appended::Conflict {
            epoch: None,
            seq: 0
        }
    );

    let first = store
        .append("s", &snapshot(None, 0, b"{\"a\":1}"), &RETAIN)
        .await
        .expect("append");
    assert_eq!(
        first,
        Appended::Ok {
            epoch: 77,
            seq: 1,
            pending: 0
        }
    );
    let op = br#"[{"op":"replace","path":"/a","value":2}]"#;
    let second = store
        .append("s", &patch(77, 1, op), &RETAIN)
        .await
        .expect("append");
    assert_eq!(
        second,
        Appended::Ok {
            epoch: 77,
            seq: 2,
            pending: op.len() as u64
        }
    );

    // A writer that did not see seq 2 is told where the top is, and nothing is written.
    let stale = store
        .append("s", &patch(77, 1, op), &RETAIN)
        .await
        .expect("append");
    assert_eq!(
        stale,
        Appended::Conflict {
            epoch: Some(77),
            seq: 2
        }
    );
    // Another epoch is a conflict too.
    let other = store
        .append("s", &patch(76, 2, op), &RETAIN)
        .await
        .expect("append");
    assert_eq!(
        other,
        Appended::Conflict {
            epoch: Some(77),
            seq: 2
        }
    );

    let loaded = store
        .load("s", 10)
        .await
        .expect("load")
        .expect("stream exists");
    assert_eq!((loaded.epoch, loaded.seq, loaded.snap_seq), (77, 2, 1));
    assert_eq!(loaded.document.as_deref(), Some(&b"{\"a\":1}"[..]));
    let seqs: Vec<u64> = loaded.changes.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(&loaded.changes[1].payload[..], op);
    assert_eq!(loaded.changes[1].kind, Kind::Patch);
}

#[tokio::test]
async fn the_log_is_trimmed_but_never_past_the_stored_document() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    store
        .append("s", &snapshot(None, 0, b"{}"), &RETAIN)
        .await
        .expect("append");
    // Twelve patches without a checkpoint: history is 4, but every patch after the stored
    // document (seq 1) is needed to rebuild the current one, so none may go.
    for base in 1..=12 {
        store
            .append("s", &patch(77, base, b"[1]"), &RETAIN)
            .await
            .expect("append");
    }
    let loaded = store.load("s", 4).await.expect("load").expect("exists");
    assert_eq!(loaded.changes.first().map(|c| c.seq), Some(2));
    assert_eq!(loaded.changes.last().map(|c| c.seq), Some(13));

    // A checkpoint at 14 lets the log shrink to the last four.
    let mut with_document = patch(77, 13, b"[2]");
    with_document.document = Some(b"{\"x\":1}");
    let checkpoint = store
        .append("s", &with_document, &RETAIN)
        .await
        .expect("append");
    assert_eq!(
        checkpoint,
        Appended::Ok {
            epoch: 77,
            seq: 14,
            pending: 0
        }
    );
    let all = store.range("s", 77, 1, 100).await.expect("range");
    let seqs: Vec<u64> = all.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [11, 12, 13, 14]);
    let loaded = store.load("s", 4).await.expect("load").expect("exists");
    assert_eq!(loaded.snap_seq, 14);
    assert_eq!(loaded.document.as_deref(), Some(&b"{\"x\":1}"[..]));

    // The byte budget trims too (here: below one entry, so only what the document covers goes).
    let tight = Retention {
        history_bytes: 1,
        ..RETAIN
    };
    store
        .append("s", &patch(77, 14, b"[3]"), &tight)
        .await
        .expect("append");
    let seqs: Vec<u64> = store
        .range("s", 77, 1, 100)
        .await
        .expect("range")
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(seqs, [15]);
}

/// Stream `s`'s epoch and top.
async fn position(store: &Store) -> Option<(u64, u64)> {
    store.positions(&["s"]).await.expect("positions")[0]
}

/// A node reloaded with other content settings claims the log: the log of the previous
/// configuration ends, its holder is fenced and its lease freed, nodes still running the
/// previous configuration neither take the lease nor append, and the new configuration's
/// first write starts a new epoch with a snapshot.
#[tokio::test]
async fn a_claim_for_another_configuration_ends_the_log_and_stands_the_others_by() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    let ttl = Duration::from_secs(10);
    // A log from before configurations were recorded: the first claim keeps it.
    let mut first = snapshot(None, 0, b"{\"v\":1}");
    assert!(matches!(
        store.append("s", &first, &RETAIN).await.expect("append"),
        Appended::Ok { .. }
    ));
    assert_eq!(
        store.claim("s", "a", "old", &RETAIN).await.expect("claim"),
        Claimed::Recorded
    );
    assert_eq!(
        store.claim("s", "b", "old", &RETAIN).await.expect("claim"),
        Claimed::Same
    );
    let Lease::Held { fence: old, .. } = store
        .acquire("s", "a", ttl, &RETAIN, Some("old"))
        .await
        .expect("acquire")
    else {
        panic!("a free lease is taken");
    };
    assert_eq!(position(&store).await, Some((77, 1)));
    assert!(store.runs_config_of("s", "b").await.expect("configs"));

    // b is reloaded with a new source.
    assert_eq!(
        store.claim("s", "b", "new", &RETAIN).await.expect("claim"),
        Claimed::Claimed
    );
    assert_eq!(position(&store).await, None, "the old log ended");
    assert_eq!(store.holder("s").await.expect("holder"), None);
    assert!(!store.renew("s", "a", old, ttl).await.expect("renew"));
    // a, not reloaded, can neither take the lease nor write the old source.
    assert_eq!(
        store
            .acquire("s", "a", ttl, &RETAIN, Some("old"))
            .await
            .expect("acquire"),
        Lease::OtherConfig
    );
    first.config = Some("old");
    first.new_epoch = 90;
    assert_eq!(
        store.append("s", &first, &RETAIN).await.expect("append"),
        Appended::Stale
    );
    let mut fenced = first;
    fenced.config = Some("new");
    fenced.fence = Some(old);
    assert_eq!(
        store.append("s", &fenced, &RETAIN).await.expect("append"),
        Appended::Fenced
    );
    assert!(!store.runs_config_of("s", "a").await.expect("configs"));
    assert!(store.runs_config_of("s", "b").await.expect("configs"));
    // b takes the lease and starts the new epoch with a snapshot.
    let Lease::Held { fence, poll, .. } = store
        .acquire("s", "b", ttl, &RETAIN, Some("new"))
        .await
        .expect("acquire")
    else {
        panic!("the freed lease is taken by the new configuration");
    };
    assert!(fence > old);
    assert_eq!(poll.etag, None);
    let mut fresh = snapshot(None, 0, b"{\"v\":2}");
    fresh.fence = Some(fence);
    fresh.config = Some("new");
    fresh.new_epoch = 90;
    assert!(matches!(
        store.append("s", &fresh, &RETAIN).await.expect("append"),
        Appended::Ok {
            epoch: 90,
            seq: 1,
            ..
        }
    ));
    // a is reloaded too: its claim changes nothing, and it may hold the lease again.
    assert_eq!(
        store.claim("s", "a", "new", &RETAIN).await.expect("claim"),
        Claimed::Same
    );
    assert!(store.runs_config_of("s", "a").await.expect("configs"));
    assert_eq!(position(&store).await, Some((90, 1)));
}

#[tokio::test]
async fn a_fence_stops_a_holder_that_lost_its_lease() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    let ttl = Duration::from_millis(300);

    let Lease::Held { fence: old, .. } = store
        .acquire("s", "a", ttl, &RETAIN, None)
        .await
        .expect("acquire")
    else {
        panic!("a free lease is taken");
    };
    assert_eq!(
        store
            .acquire("s", "b", ttl, &RETAIN, None)
            .await
            .expect("acquire"),
        Lease::HeldBy("a".into())
    );
    let mut first = snapshot(None, 0, b"{}");
    first.fence = Some(old);
    assert!(matches!(
        store.append("s", &first, &RETAIN).await.expect("append"),
        Appended::Ok { .. }
    ));

    // a pauses past its TTL; b takes over with a newer fence.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let Lease::Held { fence: new, .. } = store
        .acquire("s", "b", ttl, &RETAIN, None)
        .await
        .expect("acquire")
    else {
        panic!("an expired lease is taken");
    };
    assert!(new > old);
    // a wakes up: it can neither renew nor publish.
    assert!(!store.renew("s", "a", old, ttl).await.expect("renew"));
    let mut late = patch(77, 1, b"[]");
    late.fence = Some(old);
    assert_eq!(
        store.append("s", &late, &RETAIN).await.expect("append"),
        Appended::Fenced
    );
    assert_eq!(
        store
            .polled("s", old, Some("\"x\""), None, &RETAIN)
            .await
            .expect("polled"),
        None
    );
    assert!(
        !store
            .health("s", old, 77, "a", Some(b"{}"))
            .await
            .expect("health")
    );
    // b can.
    late.fence = Some(new);
    assert!(matches!(
        store.append("s", &late, &RETAIN).await.expect("append"),
        Appended::Ok { seq: 2, .. }
    ));
    assert!(store.renew("s", "b", new, ttl).await.expect("renew"));
    assert!(!store.release("s", "a", old).await.expect("release"));
    assert!(store.release("s", "b", new).await.expect("release"));
}

#[tokio::test]
async fn the_next_holder_inherits_the_poll_state() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    let ttl = Duration::from_secs(10);
    let Lease::Held { fence, poll, .. } = store
        .acquire("s", "a", ttl, &RETAIN, None)
        .await
        .expect("acquire")
    else {
        panic!("free lease");
    };
    assert_eq!(poll.polls, 0);
    let at = store
        .polled(
            "s",
            fence,
            Some("\"v1\""),
            Some("Wed, 21 Oct 2015 07:28:00 GMT"),
            &RETAIN,
        )
        .await
        .expect("polled")
        .expect("not fenced");
    assert!(store.release("s", "a", fence).await.expect("release"));
    let Lease::Held { poll, now_ms, .. } = store
        .acquire("s", "b", ttl, &RETAIN, None)
        .await
        .expect("acquire")
    else {
        panic!("released lease");
    };
    assert_eq!(poll.etag.as_deref(), Some("\"v1\""));
    assert_eq!(
        poll.last_modified.as_deref(),
        Some("Wed, 21 Oct 2015 07:28:00 GMT")
    );
    assert_eq!(poll.last_poll_ms, Some(at));
    assert_eq!(poll.polls, 1);
    assert!(now_ms >= at);
}

#[tokio::test]
async fn heartbeats_list_live_nodes_and_forget_silent_ones() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    store
        .heartbeat("a", Some(Duration::from_millis(200)))
        .await
        .expect("heartbeat");
    let live = store
        .heartbeat("b", Some(Duration::from_secs(10)))
        .await
        .expect("heartbeat");
    assert_eq!(live, ["a", "b"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let live = store
        .heartbeat("b", Some(Duration::from_secs(10)))
        .await
        .expect("heartbeat");
    assert_eq!(live, ["b"]);
    let live = store.heartbeat("b", None).await.expect("leave");
    assert!(live.is_empty());
}

#[tokio::test]
async fn announcements_carry_the_logged_change() {
    use futures_util::StreamExt as _;
    use patchwire::cluster::message::Announcement;
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    let client = redis::Client::open(server.url()).expect("url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(store.keys().channel())
        .await
        .expect("subscribe");
    store
        .append("s", &snapshot(None, 0, b"{\n}"), &RETAIN)
        .await
        .expect("append");
    let message = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .expect("an announcement")
        .expect("a message");
    let decoded = Announcement::decode(&bytes::Bytes::from(message.get_payload_bytes().to_vec()));
    let Ok(Announcement::Change { stream, change }) = decoded else {
        panic!("{decoded:?}");
    };
    assert_eq!(
        (stream.as_str(), change.epoch, change.seq, change.kind),
        ("s", 77, 1, Kind::Snapshot)
    );
    assert_eq!(&change.payload[..], b"{\n}");
}

#[tokio::test]
async fn a_shared_rate_limit_holds_across_clients() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let a = store(&server).await;
    let b = store(&server).await;
    let period = Duration::from_secs(60);
    // 3 per minute, bursts of 2: two go at once, whichever node asks; the third waits ~20 s.
    assert_eq!(a.rate("host", 3, period, 2).await.expect("rate"), None);
    assert_eq!(b.rate("host", 3, period, 2).await.expect("rate"), None);
    let wait = a
        .rate("host", 3, period, 2)
        .await
        .expect("rate")
        .expect("must wait");
    assert!(
        wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
        "{wait:?}"
    );
    // Another limit is independent.
    assert_eq!(b.rate("other", 3, period, 2).await.expect("rate"), None);
}

#[tokio::test]
async fn connection_limits_count_every_node_until_a_dead_one_expires() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server).await;
    let long = Duration::from_secs(60);
    assert_eq!(
        store
            .connections("tok", "a", 1, 3, long)
            .await
            .expect("admit"),
        Some(1)
    );
    assert_eq!(
        store
            .connections("tok", "a", 1, 3, long)
            .await
            .expect("admit"),
        Some(2)
    );
    let short = Duration::from_millis(200);
    assert_eq!(
        store
            .connections("tok", "b", 1, 3, short)
            .await
            .expect("admit"),
        Some(3)
    );
    // The limit is cluster-wide.
    assert_eq!(
        store
            .connections("tok", "a", 1, 3, long)
            .await
            .expect("admit"),
        None
    );
    assert_eq!(
        store
            .connections("tok", "c", 1, 3, long)
            .await
            .expect("admit"),
        None
    );
    // A release makes room.
    assert_eq!(
        store
            .connections("tok", "a", -1, 3, long)
            .await
            .expect("release"),
        Some(2)
    );
    assert_eq!(
        store
            .connections("tok", "c", 1, 3, long)
            .await
            .expect("admit"),
        Some(3)
    );
    // b dies (stops refreshing): its connection stops counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store
            .connections("tok", "a", 1, 3, long)
            .await
            .expect("admit"),
        Some(3)
    );
}

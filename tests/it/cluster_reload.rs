//! Reloading the configuration of a cluster's nodes one at a time, through the real binary on
//! a real `redis-server`: streams added, removed and restarted live, with subscribers on
//! every node, and the period when some nodes run the new file and others the old one.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::cluster::TestCluster;
use crate::support::*;

/// A document whose one-field change is a patch (smaller than the document).
fn doc(name: &str, v: u64) -> Value {
    json!({"feed": name, "v": v, "note": "x".repeat(200)})
}

/// The epoch of an event id `{stream}:{epoch}:{seq}`.
fn epoch(id: &str) -> u64 {
    id.rsplit(':')
        .nth(1)
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("not an event id: {id:?}"))
}

/// A cluster configuration with these `[[streams]]`.
fn config(streams: &str) -> String {
    format!(
        r#"
[server]
keepalive = "1s"
shutdown_grace = "1s"

[upstream.backoff]
initial = "100ms"
max = "500ms"

[upstream.default_rate_limit]
per_second = 1000
burst = 1000

[push]
token = "push-token-0123456789"

{streams}

[cluster]
redis = "{{redis}}"
prefix = "t"
lease_ttl = "1s"
probe_interval = "500ms"
"#
    )
}

fn stream(name: &str, url: &str) -> String {
    format!("[[streams]]\nname = \"{name}\"\nurl = \"{url}\"\ninterval = \"200ms\"\n")
}

/// The next event that is not a keep-alive's empty one.
async fn next_event(client: &mut SseClient) -> SseEvent {
    loop {
        let event = client.expect(SOON).await;
        if !event.event.is_empty() {
            return event;
        }
    }
}

/// The events (keep-alives left out) a client receives within `window`.
async fn events_within(client: &mut SseClient, window: Duration) -> Vec<SseEvent> {
    let deadline = tokio::time::Instant::now() + window;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return events;
        }
        match client.next(left).await {
            Some(event) if event.event.is_empty() => {}
            Some(event) => events.push(event),
            None => return events,
        }
    }
}

/// Which node sent each upstream request, in order.
fn pollers(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .received()
        .iter()
        .map(|r| {
            r.headers
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// The upstream requests of a `window`, once things settled: one node polls, once per
/// interval (200 ms), not once per node.
async fn polled_by_one_node(upstream: &MockUpstream, window: Duration, logs: &dyn Fn() -> String) {
    let before = upstream.requests();
    tokio::time::sleep(window).await;
    let polls = upstream.requests() - before;
    let intervals = (window.as_millis() / 200) as usize;
    let distinct: BTreeSet<String> = pollers(upstream)[before..].iter().cloned().collect();
    assert!(
        polls <= intervals + 2 && polls + 3 >= intervals,
        "{polls} upstream requests in {window:?} ({intervals} intervals): {distinct:?}; logs:\n{}",
        logs()
    );
    assert_eq!(distinct.len(), 1, "one node polls: {distinct:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_reloaded_one_at_a_time_add_and_remove_a_stream() {
    let kept = MockUpstream::start(doc("kept", 1)).await;
    let fresh = MockUpstream::start(doc("fresh", 1)).await;
    let before = config(&stream("kept", &kept.url()));
    let Some(mut cluster) = TestCluster::new(&before) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let mut kept_a = SseClient::connect(&cluster.nodes[0].stream_url("kept"), &[], false).await;
    let kept_first = next_event(&mut kept_a).await;
    assert_eq!(kept_first.event, "snapshot");

    // Added: a first, then b, seconds apart.
    let with_fresh = config(&format!(
        "{}{}[[streams]]\nname = \"board\"\nsource = \"push\"\n",
        stream("kept", &kept.url()),
        stream("fresh", &fresh.url())
    ));
    cluster.rewrite(&with_fresh);
    cluster.nodes[0].reload(SOON).await;
    let mut fresh_a = SseClient::connect(&cluster.nodes[0].stream_url("fresh"), &[], false).await;
    let first = next_event(&mut fresh_a).await;
    assert_eq!(first.event, "snapshot", "{first:?}");
    assert_eq!(first.json(), doc("fresh", 1));
    let answer = reqwest::get(cluster.nodes[1].stream_url("board"))
        .await
        .expect("GET");
    assert_eq!(answer.status(), 404, "b serves only what its file had");
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.nodes[1].reload(SOON).await;
    let mut fresh_b = SseClient::connect(&cluster.nodes[1].stream_url("fresh"), &[], false).await;
    let first_b = next_event(&mut fresh_b).await;
    assert_eq!(first_b.event, "snapshot", "{first_b:?}");
    assert_eq!(first_b.json(), doc("fresh", 1));
    assert_eq!(first_b.id, first.id, "both nodes serve the one log");

    // The push stream added is written through the log by either node.
    let client = reqwest::Client::new();
    let push = |node: usize, body: Value| {
        client
            .post(cluster.nodes[node].stream_url("board"))
            .bearer_auth("push-token-0123456789")
            .json(&body)
            .send()
    };
    let mut board_a = SseClient::connect(&cluster.nodes[0].stream_url("board"), &[], false).await;
    let mut board_b = SseClient::connect(&cluster.nodes[1].stream_url("board"), &[], false).await;
    let answer = push(0, doc("board", 1)).await.expect("push");
    assert!(answer.status().is_success(), "{}", answer.status());
    let answer = push(1, doc("board", 2)).await.expect("push");
    assert!(answer.status().is_success(), "{}", answer.status());
    for client in [&mut board_a, &mut board_b] {
        let mut rebuilt = Rebuilt::default();
        assert!(
            rebuilt.converge(client, &doc("board", 2), SOON).await,
            "logs:\n{}",
            cluster.logs()
        );
    }

    // Subscribers on both nodes get the same changes, polled by one node.
    fresh.set(doc("fresh", 2));
    let patch_a = next_event(&mut fresh_a).await;
    let patch_b = next_event(&mut fresh_b).await;
    assert_eq!(patch_a.event, "patch", "{patch_a:?}");
    assert_eq!((&patch_a.id, &patch_a.data), (&patch_b.id, &patch_b.data));
    tokio::time::sleep(Duration::from_secs(1)).await;
    polled_by_one_node(&fresh, Duration::from_secs(2), &|| cluster.logs()).await;
    // The stream that did not change kept its subscribers and its epoch.
    kept.set(doc("kept", 2));
    let kept_patch = next_event(&mut kept_a).await;
    assert_eq!(kept_patch.event, "patch", "{kept_patch:?}");
    assert_eq!(epoch(&kept_patch.id), epoch(&kept_first.id));

    // Removed: a first; its subscribers are told and end, b's still follow the stream.
    cluster.rewrite(&before);
    cluster.nodes[0].reload(SOON).await;
    let told = next_event(&mut fresh_a).await;
    assert_eq!(told.event, "error", "{told:?}");
    assert_eq!(told.json()["cause"], "stream-removed");
    assert_eq!(told.json()["status"], 410);
    assert!(
        fresh_a.ends_within(SOON).await,
        "the removed stream ends on a"
    );
    fresh.set(doc("fresh", 3));
    let still = next_event(&mut fresh_b).await;
    assert_eq!(
        still.event, "patch",
        "b, not reloaded, still serves the stream: {still:?}"
    );
    cluster.nodes[1].reload(SOON).await;
    let told = next_event(&mut fresh_b).await;
    assert_eq!(told.event, "error", "{told:?}");
    assert_eq!(told.json()["cause"], "stream-removed");
    assert_eq!(told.json()["status"], 410);
    assert!(
        fresh_b.ends_within(SOON).await,
        "the removed stream ends on b"
    );
    // Nobody polls it any more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let polls = fresh.requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fresh.requests(), polls, "a removed stream is not polled");
    for node in &cluster.nodes {
        let answer = reqwest::get(node.stream_url("fresh")).await.expect("GET");
        assert_eq!(answer.status(), 404, "node {}", node.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_source_starts_the_log_over_once_and_nodes_not_reloaded_stand_by() {
    let old = MockUpstream::start(doc("old", 1)).await;
    let new = MockUpstream::start(doc("new", 1)).await;
    let Some(mut cluster) = TestCluster::new(&config(&stream("moved", &old.url()))) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let mut on_a = SseClient::connect(&cluster.nodes[0].stream_url("moved"), &[], false).await;
    let mut on_b = SseClient::connect(&cluster.nodes[1].stream_url("moved"), &[], false).await;
    let first_event = next_event(&mut on_a).await;
    assert_eq!(first_event.json(), doc("old", 1));
    assert_eq!(next_event(&mut on_b).await.id, first_event.id);
    let first_id = first_event.id;

    // The node holding the lease polls the old source; the other is reloaded first, so the
    // holder is the node that would go on polling and writing the old source unless told.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let holder = pollers(&old)
        .last()
        .cloned()
        .expect("the old source was polled");
    let (first, later) = if holder.ends_with("-a") {
        (1, 0)
    } else {
        (0, 1)
    };
    let (mut reloaded, mut not_yet) = if first == 0 {
        (on_a, on_b)
    } else {
        (on_b, on_a)
    };
    let reloaded_agent = cluster.nodes[first].user_agent();

    cluster.rewrite(&config(&stream("moved", &new.url())));
    cluster.nodes[first].reload(SOON).await;
    for client in [&mut reloaded, &mut not_yet] {
        let restarted = next_event(client).await;
        assert_eq!(restarted.event, "snapshot", "{restarted:?}");
        assert_eq!(restarted.json(), doc("new", 1));
        assert!(epoch(&restarted.id) > epoch(&first_id));
    }
    // The mixed period: the old upstream changes, but the node not reloaded (the old
    // holder) neither polls it nor writes it; the new source is polled by the reloaded node
    // and reaches the other's subscribers too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old_polls = old.requests();
    old.set(doc("old", 2));
    new.set(doc("new", 2));
    let mut seen = events_within(&mut reloaded, Duration::from_secs(2)).await;
    let seen_later = events_within(&mut not_yet, Duration::from_millis(200)).await;
    assert_eq!(
        old.requests(),
        old_polls,
        "a node not reloaded polled the old source; logs:\n{}",
        cluster.logs()
    );
    for event in seen.iter().chain(&seen_later) {
        assert!(
            !event.data.contains("old"),
            "the old source was written after the new one: {event:?}"
        );
    }
    assert_eq!(
        seen.iter().map(|e| (&e.id, &e.data)).collect::<Vec<_>>(),
        seen_later
            .iter()
            .map(|e| (&e.id, &e.data))
            .collect::<Vec<_>>(),
        "both nodes' subscribers get the same changes"
    );
    assert!(
        seen.iter().any(|e| e.event == "patch"),
        "the new source's change arrived: {seen:?}"
    );
    assert!(
        pollers(&new).iter().all(|ua| *ua == reloaded_agent),
        "only the reloaded node polls the new source: {:?}",
        pollers(&new)
    );

    // The other node reloaded: the log goes on in the same epoch (no second start-over),
    // one node polls.
    let restarted_epoch = epoch(&seen.pop().expect("an event").id);
    cluster.nodes[later].reload(SOON).await;
    new.set(doc("new", 3));
    for client in [&mut reloaded, &mut not_yet] {
        let mut rebuilt = Rebuilt {
            document: Some(doc("new", 2)),
            ..Rebuilt::default()
        };
        assert!(
            rebuilt.converge(client, &doc("new", 3), SOON).await,
            "logs:\n{}",
            cluster.logs()
        );
        assert_eq!(rebuilt.snapshots, 0, "no second start-over");
        assert_eq!(epoch(&rebuilt.last_id), restarted_epoch);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    polled_by_one_node(&new, Duration::from_secs(2), &|| cluster.logs()).await;
    assert_eq!(old.requests(), old_polls, "nobody polls the old source");

    // Moved again, the lease holder reloaded first this time: it gives up the old source at
    // once and starts the new one over, the other node stands by until reloaded.
    let third = MockUpstream::start(doc("third", 1)).await;
    let holder = pollers(&new).last().cloned().expect("polled");
    let (first, later) = if holder.ends_with("-a") {
        (0, 1)
    } else {
        (1, 0)
    };
    cluster.rewrite(&config(&stream("moved", &third.url())));
    cluster.nodes[first].reload(SOON).await;
    for client in [&mut reloaded, &mut not_yet] {
        let mut rebuilt = Rebuilt::default();
        assert!(
            rebuilt.converge(client, &doc("third", 1), SOON).await,
            "logs:\n{}",
            cluster.logs()
        );
        assert!(epoch(&rebuilt.last_id) > restarted_epoch);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new_polls = new.requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        new.requests(),
        new_polls,
        "nobody polls the previous source"
    );
    assert!(
        pollers(&third)
            .iter()
            .all(|ua| *ua == cluster.nodes[first].user_agent()),
        "only the reloaded node polls the new source: {:?}",
        pollers(&third)
    );
    cluster.nodes[later].reload(SOON).await;
    third.set(doc("third", 2));
    for client in [&mut reloaded, &mut not_yet] {
        let mut rebuilt = Rebuilt {
            document: Some(doc("third", 1)),
            ..Rebuilt::default()
        };
        assert!(
            rebuilt.converge(client, &doc("third", 2), SOON).await,
            "logs:\n{}",
            cluster.logs()
        );
        assert_eq!(rebuilt.snapshots, 0, "no second start-over");
    }
}

/// The accepted deliveries of `stream`, in arrival order.
/// `[webhooks]` on `store`, with endpoint `e` receiving `streams` (a TOML array) at
/// `receiver` in patch mode.
fn webhooks_toml(store: &TestStore, receiver: &Receiver, streams: &str) -> String {
    format!(
        r#"
[webhooks]
{}allow_private_targets = true
schedule = ["0s", "100ms", "200ms", "400ms", "800ms", "1s"]
jitter = 0.0
[[webhooks.endpoints]]
id = "e"
url = "{}"
streams = {streams}
mode = "patch"
secret = "{}"
"#,
        store.toml(),
        receiver.url(),
        crate::webhook::SECRET,
    )
}

fn accepted_of(
    hits: &[crate::support::receiver::Hit],
    stream: &str,
) -> Vec<crate::support::receiver::Hit> {
    hits.iter()
        .filter(|h| h.status < 300 && h.body["stream"] == stream)
        .cloned()
        .collect()
}

/// Two nodes on one PostgreSQL outbox, both reloaded with a stream added and an endpoint now
/// receiving it: the node holding the new stream's lease dispatches it, so the endpoint gets
/// its snapshot and then its patches exactly once each, in order, in one epoch, every
/// signature verified by the independent `standardwebhooks` crate. Both reloaded with the
/// stream removed: nothing more of it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_added_by_reloading_both_nodes_is_delivered_once_to_its_webhooks() {
    use crate::webhook::{SECRET, rebuild};
    let kept = MockUpstream::start(doc("kept", 1)).await;
    let fresh = MockUpstream::start(doc("fresh", 1)).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let Some(store) = TestStore::postgres() else {
        return;
    };
    let webhooks = |streams: &str| webhooks_toml(&store, &receiver, streams);
    let before = config(&stream("kept", &kept.url())) + &webhooks(r#"["kept"]"#);
    let Some(mut cluster) = TestCluster::new(&before) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let with_fresh = config(&format!(
        "{}{}[[streams]]\nname = \"board\"\nsource = \"push\"\n",
        stream("kept", &kept.url()),
        stream("fresh", &fresh.url())
    )) + &webhooks(r#"["kept", "fresh", "board"]"#);
    cluster.rewrite(&with_fresh);
    cluster.nodes[0].reload(SOON).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[1].reload(SOON).await;
    // A push stream takes a lease for its webhooks: pushed through either node, its holder
    // dispatches it.
    let client = reqwest::Client::new();
    for v in 2..=6u64 {
        fresh.set(doc("fresh", v));
        let node = &cluster.nodes[(v % 2) as usize];
        let status = client
            .post(node.stream_url("board"))
            .bearer_auth("push-token-0123456789")
            .json(&doc("board", v))
            .send()
            .await
            .expect("push")
            .status();
        assert_eq!(status, 200, "{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let done = fresh.document();
    let hits = receiver
        .wait_for(SOON, "the new streams' last documents", |hits| {
            let fresh = accepted_of(hits, "fresh");
            let board = accepted_of(hits, "board");
            !fresh.is_empty()
                && rebuild(&fresh) == done
                && !board.is_empty()
                && rebuild(&board) == doc("board", 6)
        })
        .await;
    let board = accepted_of(&hits, "board");
    let seqs: Vec<u64> = board.iter().map(|h| h.seq()).collect();
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5],
        "every push once, in order; logs:\n{}",
        cluster.logs()
    );
    let logs = cluster.logs();
    let delivered = accepted_of(&hits, "fresh");
    assert_eq!(delivered[0].kind(), "stream.snapshot", "{logs}");
    let ids: BTreeSet<String> = delivered.iter().map(|h| h.id()).collect();
    assert_eq!(
        ids.len(),
        delivered.len(),
        "each message once; logs:\n{logs}"
    );
    let epochs: BTreeSet<u64> = delivered
        .iter()
        .map(|h| h.body["epoch"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(epochs.len(), 1, "one epoch; logs:\n{logs}");
    let seqs: Vec<u64> = delivered.iter().map(|h| h.seq()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] + 1 == w[1]),
        "every change once, in order: {seqs:?}; logs:\n{logs}"
    );
    assert!(
        delivered.iter().skip(1).all(|h| h.kind() == "stream.patch"),
        "a snapshot then patches: {:?}",
        delivered
            .iter()
            .map(|h| h.kind().to_owned())
            .collect::<Vec<_>>()
    );

    // Removed on both nodes: nothing more of it is dispatched.
    let without = config(&stream("kept", &kept.url())) + &webhooks(r#"["kept"]"#);
    cluster.rewrite(&without);
    cluster.nodes[0].reload(SOON).await;
    cluster.nodes[1].reload(SOON).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = accepted_of(&receiver.hits(), "fresh").len();
    for v in 7..=9 {
        fresh.set(doc("fresh", v));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        accepted_of(&receiver.hits(), "fresh").len(),
        settled,
        "a removed stream is no longer delivered; logs:\n{}",
        cluster.logs()
    );
}

/// Two nodes with a Redis broker sink publishing every stream, both reloaded with a stream
/// added: its line is published by one node at a time, in one epoch without duplicates, and
/// the independent consumer rebuilds its document. Removed on both: its line stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_added_by_reloading_both_nodes_is_published_once_to_brokers() {
    use crate::support::brokers::{rebuild, redis_entries};
    let kept = MockUpstream::start(doc("kept", 1)).await;
    let fresh = MockUpstream::start(doc("fresh", 1)).await;
    let sink = "\n[[sinks.redis]]\nurl = \"{redis}\"\nkey = \"out:{stream}\"\ntimeout = \"1s\"\n";
    let before = config(&stream("kept", &kept.url())) + sink;
    let Some(mut cluster) = TestCluster::new(&before) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let with_fresh = config(&format!(
        "{}{}",
        stream("kept", &kept.url()),
        stream("fresh", &fresh.url())
    )) + sink;
    cluster.rewrite(&with_fresh);
    cluster.nodes[0].reload(SOON).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[1].reload(SOON).await;
    for v in 2..=6 {
        fresh.set(doc("fresh", v));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let done = fresh.document();
    let url = cluster.redis.url();
    let deadline = tokio::time::Instant::now() + SOON;
    let (messages, line) = loop {
        let messages = redis_entries(&url, "out:fresh").await;
        let line = match rebuild("fresh", &messages) {
            Ok(line) if line.document.as_ref() == Some(&done) => break (messages, line),
            other => other,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new stream's line never reached {done}: {line:?}; logs:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(line.epochs.len(), 1, "one epoch: {messages:#?}");
    assert_eq!(line.duplicates, 0, "published once: {messages:#?}");
    assert_eq!(line.snapshots_after_first, 0, "{messages:#?}");

    // Removed on both nodes: its line stops.
    let without = config(&stream("kept", &kept.url())) + sink;
    cluster.rewrite(&without);
    cluster.nodes[0].reload(SOON).await;
    cluster.nodes[1].reload(SOON).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let settled = redis_entries(&url, "out:fresh").await.len();
    for v in 7..=9 {
        fresh.set(doc("fresh", v));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        redis_entries(&url, "out:fresh").await.len(),
        settled,
        "a removed stream is no longer published; logs:\n{}",
        cluster.logs()
    );
}

/// Two nodes, webhooks on SQLite run by node `a` alone (`cluster.webhooks_node`), both reloaded
/// with a stream added that an endpoint now receives: node `a` dispatches it whichever node
/// polls it (it follows the log), so the endpoint gets its snapshot and then every change once,
/// in order, in one epoch, signatures verified by the independent `standardwebhooks` crate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_added_by_reload_is_delivered_by_the_webhooks_node_on_sqlite() {
    use crate::webhook::{SECRET, rebuild};
    let kept = MockUpstream::start(doc("kept", 1)).await;
    let fresh = MockUpstream::start(doc("fresh", 1)).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let store = TestStore::sqlite();
    // `webhooks_node` goes in [cluster], the last table of `config`.
    let webhooks = |streams: &str| {
        "webhooks_node = \"a\"\n".to_owned() + &webhooks_toml(&store, &receiver, streams)
    };
    let before = config(&stream("kept", &kept.url())) + &webhooks(r#"["kept"]"#);
    let Some(mut cluster) = TestCluster::new(&before) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let with_fresh = config(&format!(
        "{}{}",
        stream("kept", &kept.url()),
        stream("fresh", &fresh.url())
    )) + &webhooks(r#"["kept", "fresh"]"#);
    cluster.rewrite(&with_fresh);
    cluster.nodes[0].reload(SOON).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[1].reload(SOON).await;
    for v in 2..=6u64 {
        fresh.set(doc("fresh", v));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let done = fresh.document();
    let hits = receiver
        .wait_for(SOON, "the new stream's last document", |hits| {
            let fresh = accepted_of(hits, "fresh");
            !fresh.is_empty() && rebuild(&fresh) == done
        })
        .await;
    let logs = cluster.logs();
    let delivered = accepted_of(&hits, "fresh");
    assert_eq!(delivered[0].kind(), "stream.snapshot", "{logs}");
    assert!(
        delivered.iter().all(|h| !h.verified_by.is_empty()),
        "unsigned"
    );
    let ids: BTreeSet<String> = delivered.iter().map(|h| h.id()).collect();
    assert_eq!(
        ids.len(),
        delivered.len(),
        "each message once; logs:\n{logs}"
    );
    let epochs: BTreeSet<u64> = delivered
        .iter()
        .map(|h| h.body["epoch"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(epochs.len(), 1, "one epoch; logs:\n{logs}");
    let seqs: Vec<u64> = delivered.iter().map(|h| h.seq()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order: {seqs:?}; logs:\n{logs}"
    );
}

/// Two nodes on one PostgreSQL outbox, a stream with a webhook endpoint, both reloaded with the
/// stream's source changed: the log starts over once, so the endpoint gets the new source's
/// document as a snapshot in one new epoch (never a patch across the two sources), then its
/// changes, each message once, dispatched by whichever node holds the new lease; signatures
/// verified by the independent `standardwebhooks` crate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_source_reaches_the_webhooks_once_as_a_new_epoch() {
    use crate::webhook::{SECRET, rebuild};
    let old = MockUpstream::start(doc("old", 1)).await;
    let new = MockUpstream::start(doc("new", 1)).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let Some(store) = TestStore::postgres() else {
        return;
    };
    let webhooks = webhooks_toml(&store, &receiver, r#"["moved"]"#);
    let Some(mut cluster) = TestCluster::new(&(config(&stream("moved", &old.url())) + &webhooks))
    else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    old.set(doc("old", 2));
    receiver
        .wait_for(SOON, "the old source's change", |hits| {
            let moved = accepted_of(hits, "moved");
            !moved.is_empty() && rebuild(&moved) == doc("old", 2)
        })
        .await;
    cluster.rewrite(&(config(&stream("moved", &new.url())) + &webhooks));
    cluster.nodes[0].reload(SOON).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[1].reload(SOON).await;
    for v in 2..=4u64 {
        new.set(doc("new", v));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let hits = receiver
        .wait_for(SOON, "the new source's last document", |hits| {
            let moved = accepted_of(hits, "moved");
            !moved.is_empty() && rebuild(&moved) == doc("new", 4)
        })
        .await;
    assert!(hits.iter().all(|h| !h.verified_by.is_empty()), "unsigned");
    let logs = cluster.logs();
    let delivered = accepted_of(&hits, "moved");
    let ids: BTreeSet<String> = delivered.iter().map(|h| h.id()).collect();
    assert_eq!(
        ids.len(),
        delivered.len(),
        "each message once; logs:\n{logs}"
    );
    let epoch_of = |h: &crate::support::receiver::Hit| h.body["epoch"].as_u64().unwrap_or_default();
    let epochs: Vec<u64> = delivered.iter().map(epoch_of).collect();
    let distinct: BTreeSet<u64> = epochs.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        2,
        "the log started over once: {epochs:?}; logs:\n{logs}"
    );
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "epochs in order: {epochs:?}"
    );
    let first_new = delivered
        .iter()
        .position(|h| epoch_of(h) == *distinct.last().unwrap_or(&0))
        .unwrap_or_default();
    assert_eq!(
        delivered[first_new].kind(),
        "stream.snapshot",
        "the new epoch begins with a snapshot; logs:\n{logs}"
    );
    assert!(
        delivered[first_new..]
            .iter()
            .all(|h| !h.body.to_string().contains("\"old\"")),
        "nothing of the old source after the new one; logs:\n{logs}"
    );
}

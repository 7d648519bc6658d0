//! The cluster mode through the real binary: several nodes on one real `redis-server`, a mock
//! upstream that changes, real SSE subscribers on every node.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::cluster::TestCluster;
use crate::support::*;

/// A configuration every node shares: one polled stream, one push stream, short leases.
fn config(upstream: &str, interval: &str) -> String {
    format!(
        r#"
[server]
keepalive = "1s"
shutdown_grace = "1s"

[upstream.backoff]
initial = "100ms"
max = "500ms"

[[streams]]
name = "fleet"
url = "{upstream}"
interval = "{interval}"

[[streams]]
name = "board"
source = "push"

[push]
token = "push-token-0123456789"

[cluster]
redis = "{{redis}}"
prefix = "t"
lease_ttl = "1s"
probe_interval = "500ms"
"#
    )
}

fn vehicles(n: u64) -> Value {
    json!({"vehicles": (0..20).map(|i| json!({"id": i, "pos": n * 100 + i, "note": "a field long enough that patches stay smaller than the document"})).collect::<Vec<_>>()})
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_poll_once_and_every_subscriber_rebuilds_the_document() {
    let upstream = MockUpstream::start(vehicles(0)).await;
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "250ms")) else {
        return;
    };
    cluster.start(&["a", "b", "c"]).await;

    // 1,000 subscribers spread over the three nodes.
    let client = reqwest::Client::new();
    let mut subscribers = Vec::new();
    for i in 0..1000 {
        let node = &cluster.nodes[i % 3];
        subscribers.push(SseClient::connect_with(&client, &node.stream_url("fleet"), &[]).await);
    }
    let before = upstream.requests();
    let started = tokio::time::Instant::now();
    for n in 1..=8 {
        upstream.set(vehicles(n));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let target = upstream.document();
    for (i, subscriber) in subscribers.iter_mut().enumerate() {
        let mut rebuilt = Rebuilt::default();
        assert!(
            rebuilt.converge(subscriber, &target, SOON).await,
            "subscriber {i} did not rebuild the document; logs:\n{}",
            cluster.logs()
        );
        assert_eq!(rebuilt.snapshots, 1, "subscriber {i} got a second snapshot");
    }
    let elapsed = started.elapsed();
    let polls = upstream.requests() - before;
    // One poll per interval for the whole cluster, not one per node.
    let intervals = (elapsed.as_millis() / 250) as usize;
    assert!(
        polls <= intervals + 2,
        "{polls} upstream requests in {elapsed:?} ({intervals} intervals); pollers: {:?}",
        pollers(&upstream)
    );
    assert!(
        polls + 2 >= intervals,
        "too few polls: {polls} in {intervals} intervals"
    );
    let distinct: BTreeSet<String> = pollers(&upstream)[before..].iter().cloned().collect();
    assert_eq!(distinct.len(), 1, "one node polled: {distinct:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_moving_to_another_node_resumes_with_exactly_the_missed_patches() {
    let upstream = MockUpstream::start(vehicles(0)).await;
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "100ms")) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let mut first = SseClient::connect(&cluster.nodes[0].stream_url("fleet"), &[], false).await;
    let mut rebuilt = Rebuilt::default();
    upstream.set(vehicles(1));
    assert!(rebuilt.converge(&mut first, &vehicles(1), SOON).await);
    drop(first);
    // Changes happen while the subscriber is away.
    for n in 2..=5 {
        upstream.set(vehicles(n));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let last_id = rebuilt.last_id.clone();
    let mut moved = SseClient::connect(
        &cluster.nodes[1].stream_url("fleet"),
        &[("last-event-id", &last_id)],
        false,
    )
    .await;
    assert!(rebuilt.converge(&mut moved, &vehicles(5), SOON).await);
    assert_eq!(
        rebuilt.snapshots, 1,
        "the other node resumed without a snapshot"
    );
    assert!(rebuilt.patches >= 4, "{} patches", rebuilt.patches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_resuming_on_a_node_still_starting_gets_exactly_the_missed_patches() {
    let upstream = MockUpstream::start(vehicles(0)).await;
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "100ms")) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let mut first = SseClient::connect(&cluster.node("a").stream_url("fleet"), &[], false).await;
    let mut rebuilt = Rebuilt::default();
    upstream.set(vehicles(1));
    assert!(rebuilt.converge(&mut first, &vehicles(1), SOON).await);
    drop(first);
    cluster.node("b").stop();
    // Changes happen while the subscriber is away.
    for n in 2..=4 {
        upstream.set(vehicles(n));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // b starts while Redis does not answer: it serves HTTP before it could read the log, as
    // any node does for a moment when it starts (a subscriber reconnecting at once, or a load
    // balancer that does not wait for /readyz, lands in that moment).
    cluster.redis.pause();
    cluster.node("b").restart();
    cluster.node("b").live(SOON).await;
    let url = cluster.node("b").stream_url("fleet");
    let last_id = rebuilt.last_id.clone();
    let resuming = tokio::spawn(async move {
        SseClient::connect(&url, &[("last-event-id", &last_id)], false).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.redis.resume();
    let mut moved = resuming.await.expect("the subscriber connects");
    assert!(
        rebuilt.converge(&mut moved, &vehicles(4), SOON).await,
        "logs:\n{}",
        cluster.logs()
    );
    assert_eq!(
        rebuilt.snapshots, 1,
        "resumed on the starting node without a snapshot"
    );
    assert!(rebuilt.patches >= 3, "{} patches", rebuilt.patches);
}

/// The sequence number of an event id `stream:epoch:seq`.
fn seq_of(id: &str) -> (u64, u64) {
    let mut parts = id.rsplitn(3, ':');
    let seq = parts.next().and_then(|s| s.parse().ok()).expect("seq");
    let epoch = parts.next().and_then(|s| s.parse().ok()).expect("epoch");
    (epoch, seq)
}

/// A subscriber that checks, as it rebuilds the document, that it sees every change once and
/// in order: after its first snapshot, each event's sequence number is the previous one plus
/// one, in one epoch.
struct Checked {
    client: SseClient,
    rebuilt: Rebuilt,
    position: Option<(u64, u64)>,
    node: String,
    /// A subscriber that falls behind may get a snapshot again (a resync): allowed when set.
    resyncs: bool,
}

impl Checked {
    async fn connect(node: &crate::support::cluster::Node, stream: &str) -> Checked {
        Checked {
            client: SseClient::connect(&node.stream_url(stream), &[], false).await,
            rebuilt: Rebuilt::default(),
            position: None,
            node: node.name.clone(),
            resyncs: false,
        }
    }

    /// Reads events until the document is `target`.
    async fn until(&mut self, target: &Value, within: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        while self.rebuilt.document.as_ref() != Some(target) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(event) = self.client.next(left).await else {
                return Err(format!(
                    "subscriber on {} stopped at {:?} without reaching the target",
                    self.node, self.position
                ));
            };
            if event.event == "patch" || event.event == "snapshot" {
                let (epoch, seq) = seq_of(&event.id);
                match (self.position, event.event.as_str()) {
                    (Some((e, s)), "patch") if e != epoch || seq != s + 1 => {
                        return Err(format!(
                            "subscriber on {} got {}:{} after {e}:{s}",
                            self.node, epoch, seq
                        ));
                    }
                    (Some(_), "snapshot") if !self.resyncs => {
                        return Err(format!("subscriber on {} got a second snapshot", self.node));
                    }
                    _ => {}
                }
                self.position = Some((epoch, seq));
            }
            self.rebuilt.apply(&event);
        }
        Ok(())
    }
}

/// Changes the upstream's document every `every` until the returned sender is dropped or
/// told to stop; the last version is read from the upstream.
fn keep_changing(
    upstream: std::sync::Arc<MockUpstream>,
    every: Duration,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut n = 100;
        loop {
            n += 1;
            upstream.set(vehicles(n));
            tokio::select! {
                _ = &mut stopped => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    stop
}

/// The node that polls once the cluster `names` settled (the stream's rendezvous owner), and
/// its User-Agent, once it has polled.
async fn settled_poller(upstream: &MockUpstream, names: &[&str]) -> (String, String) {
    let nodes: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let owner = patchwire::cluster::rendezvous::ranking("fleet", &nodes)[0].to_owned();
    let agent = format!("patchwire-node-{owner}");
    let deadline = tokio::time::Instant::now() + SOON;
    while pollers(upstream).last() != Some(&agent) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{owner} never polled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (owner, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_holder_moves_polling_and_subscribers_see_no_gap() {
    let upstream = std::sync::Arc::new(MockUpstream::start(vehicles(0)).await);
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "200ms")) else {
        return;
    };
    cluster.start(&["a", "b", "c"]).await;
    let (holder_name, holder) = settled_poller(&upstream, &["a", "b", "c"]).await;
    let mut subscribers = Vec::new();
    for node in cluster.nodes.iter().filter(|n| n.name != holder_name) {
        for _ in 0..2 {
            subscribers.push(Checked::connect(node, "fleet").await);
        }
    }
    let stop = keep_changing(upstream.clone(), Duration::from_millis(150));
    tokio::time::sleep(Duration::from_millis(600)).await;

    let killed_at = std::time::Instant::now();
    let requests_before = upstream.requests();
    cluster.node(&holder_name).kill();
    // The next request from another node: within the lease's TTL plus one interval (plus
    // slack for a loaded machine: the figure itself is measured in BENCHMARKS.md).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let taken_over = loop {
        let received = upstream.received();
        if let Some(r) = received[requests_before..].iter().find(|r| {
            r.headers.get("user-agent").and_then(|v| v.to_str().ok()) != Some(holder.as_str())
        }) {
            break r.at;
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let gap = taken_over.duration_since(killed_at);
    assert!(
        gap <= Duration::from_millis(1000 + 200 + 1500),
        "failover took {gap:?}"
    );

    tokio::time::sleep(Duration::from_millis(800)).await;
    drop(stop);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let target = upstream.document();
    for subscriber in &mut subscribers {
        if let Err(problem) = subscriber.until(&target, SOON).await {
            panic!("{problem}; logs:\n{}", cluster.logs());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_the_holder_hands_polling_over_at_once() {
    let upstream = std::sync::Arc::new(MockUpstream::start(vehicles(0)).await);
    // A step (a third of the TTL) of 2 s: whatever waits for a heartbeat or a step shows.
    let config =
        config(&upstream.url(), "100ms").replace(r#"lease_ttl = "1s""#, r#"lease_ttl = "6s""#);
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let (holder_name, holder) = settled_poller(&upstream, &["a", "b"]).await;
    let other = if holder_name == "a" { "b" } else { "a" };
    // Stop the holder right after the other node's heartbeat: its next one is a whole step
    // away, so only the holder's leaving tells it at once that it is next.
    let client = ::redis::Client::open(cluster.redis.url()).expect("redis url");
    let connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let score = |node: &'static str| {
        let mut connection = connection.clone();
        async move {
            ::redis::cmd("ZSCORE")
                .arg("t:nodes")
                .arg(node)
                .query_async::<Option<f64>>(&mut connection)
                .await
                .expect("ZSCORE")
        }
    };
    let before = score(other).await;
    while score(other).await == before {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let requests_before = upstream.requests();
    let stopped = std::time::Instant::now();
    cluster.node(&holder_name).stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let taken_over = loop {
        let received = upstream.received();
        if let Some(r) = received[requests_before..].iter().find(|r| {
            r.headers.get("user-agent").and_then(|v| v.to_str().ok()) != Some(holder.as_str())
        }) {
            break r.at;
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody took over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // At once: well within the step (the next poll is due one interval after the holder's
    // last, so it follows the lease within 100 ms).
    let gap = taken_over.duration_since(stopped);
    assert!(
        gap < Duration::from_millis(800),
        "the handover took {gap:?}; logs:\n{}",
        cluster.logs()
    );
    drop(connection);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_holder_wakes_up_fenced_and_the_log_stays_one_line() {
    let upstream = std::sync::Arc::new(MockUpstream::start(vehicles(0)).await);
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "200ms")) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let (holder_name, holder) = settled_poller(&upstream, &["a", "b"]).await;
    let mut subscribers = Vec::new();
    for node in &cluster.nodes {
        subscribers.push(Checked::connect(node, "fleet").await);
    }
    let stop = keep_changing(upstream.clone(), Duration::from_millis(150));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The holder stops for three lease lifetimes (a long GC pause, a frozen VM).
    cluster.node(&holder_name).pause();
    let paused_at = upstream.requests();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during: Vec<String> = pollers(&upstream)[paused_at..].to_vec();
    assert!(
        during.iter().any(|ua| *ua != holder),
        "another node polls while the holder is paused: {during:?}"
    );
    cluster.node(&holder_name).resume();
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target = upstream.document();
    // Every node, the woken one included, serves one line of changes ending at the
    // upstream's document.
    for subscriber in &mut subscribers {
        if let Err(problem) = subscriber.until(&target, SOON).await {
            panic!("{problem}; logs:\n{}", cluster.logs());
        }
    }
    // It learned at its first renewal (or at its first write, refused by the fence) that the
    // lease had moved; as the stream's rendezvous owner it may take it back since.
    let woken = cluster.node(&holder_name).log();
    assert!(
        woken.contains("lease lost") || woken.contains("no longer polls"),
        "the woken holder says it lost the lease:\n{woken}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_restarted_in_turn_keeps_the_epoch() {
    let upstream = std::sync::Arc::new(MockUpstream::start(vehicles(0)).await);
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "150ms")) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let mut first = SseClient::connect(&cluster.nodes[0].stream_url("fleet"), &[], false).await;
    let mut rebuilt = Rebuilt::default();
    upstream.set(vehicles(1));
    assert!(rebuilt.converge(&mut first, &vehicles(1), SOON).await);
    drop(first);
    let (epoch, _) = seq_of(&rebuilt.last_id);
    // A rolling deploy: each node stopped and started again, changes flowing meanwhile.
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        cluster.node(name).stop();
        upstream.set(vehicles(10 + i as u64));
        tokio::time::sleep(Duration::from_millis(400)).await;
        cluster.node(name).restart();
        cluster.node(name).ready(Duration::from_secs(20)).await;
    }
    upstream.set(vehicles(20));
    for name in ["a", "b"] {
        let mut resumed = Rebuilt {
            document: rebuilt.document.clone(),
            last_id: rebuilt.last_id.clone(),
            ..Rebuilt::default()
        };
        let mut client = SseClient::connect(
            &cluster.node(name).stream_url("fleet"),
            &[("last-event-id", &rebuilt.last_id)],
            false,
        )
        .await;
        assert!(
            resumed.converge(&mut client, &vehicles(20), SOON).await,
            "resume on {name}; logs:\n{}",
            cluster.logs()
        );
        assert_eq!(resumed.snapshots, 0, "resumed on {name} without a snapshot");
        assert_eq!(seq_of(&resumed.last_id).0, epoch, "same epoch on {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_empty_starts_a_new_epoch_with_a_snapshot_never_a_wrong_patch() {
    let upstream = std::sync::Arc::new(MockUpstream::start(vehicles(0)).await);
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "150ms")) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        let mut client = SseClient::connect(&node.stream_url("fleet"), &[], false).await;
        let mut rebuilt = Rebuilt::default();
        upstream.set(vehicles(1));
        assert!(rebuilt.converge(&mut client, &vehicles(1), SOON).await);
        clients.push((client, rebuilt));
    }
    let (old_epoch, _) = seq_of(&clients[0].1.last_id);
    cluster.redis.restart_empty();
    upstream.set(vehicles(2));
    for (client, rebuilt) in &mut clients {
        // `Rebuilt` panics on a patch that does not apply: none may arrive.
        assert!(
            rebuilt
                .converge(client, &vehicles(2), Duration::from_secs(20))
                .await,
            "logs:\n{}",
            cluster.logs()
        );
        assert_eq!(rebuilt.snapshots, 2, "a new epoch begins with a snapshot");
        assert_ne!(seq_of(&rebuilt.last_id).0, old_epoch, "a new epoch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_to_two_nodes_at_once_are_each_logged_once_in_order() {
    let upstream = MockUpstream::start(vehicles(0)).await;
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "1s")) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let client = reqwest::Client::new();
    let push = |node: &str, method: reqwest::Method, body: Value| {
        let url = format!("{node}/streams/board");
        client
            .request(method, url)
            .bearer_auth("push-token-0123456789")
            .json(&body)
            .send()
    };
    let status = push(
        &cluster.nodes[0].base(),
        reqwest::Method::POST,
        json!({"items": []}),
    )
    .await
    .expect("push")
    .status();
    assert_eq!(status, 200);
    let mut watcher = SseClient::connect(&cluster.nodes[1].stream_url("board"), &[], false).await;

    let writers = ["a", "b"].map(|name| {
        let base = cluster.node(name).base();
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                let body =
                    json!([{"op": "add", "path": "/items/-", "value": format!("{base}-{i}")}]);
                loop {
                    let answer = client
                        .patch(format!("{base}/streams/board"))
                        .bearer_auth("push-token-0123456789")
                        .json(&body)
                        .send()
                        .await
                        .expect("push");
                    match answer.status().as_u16() {
                        200 => break,
                        // Contended: the same patch again, as the answer says.
                        409 | 503 => tokio::time::sleep(Duration::from_millis(10)).await,
                        other => panic!(
                            "push answered {other}: {}",
                            answer.text().await.unwrap_or_default()
                        ),
                    }
                }
            }
            base
        })
    });
    let mut bases = Vec::new();
    for writer in writers {
        bases.push(writer.await.expect("writer"));
    }
    // Every accepted patch is in the document once, each writer's in its own order. Node a
    // follows node b's last pushes through pub/sub, a moment after b answered them.
    let deadline = tokio::time::Instant::now() + SOON;
    let (answer, items) = loop {
        let answer: Value = client
            .get(cluster.nodes[0].stream_url("board"))
            .header("accept", "application/json")
            .send()
            .await
            .expect("json view")
            .json()
            .await
            .expect("json");
        let items: Vec<String> = answer["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect();
        if items.len() >= 80 || tokio::time::Instant::now() > deadline {
            break (answer, items);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(items.len(), 80, "{items:?}");
    for base in &bases {
        let mine: Vec<&String> = items
            .iter()
            .filter(|i| i.starts_with(base.as_str()))
            .collect();
        let expected: Vec<String> = (0..40).map(|i| format!("{base}-{i}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>());
    }
    // A subscriber on the other node rebuilt the same document, one change per push.
    let mut rebuilt = Rebuilt::default();
    assert!(rebuilt.converge(&mut watcher, &answer, SOON).await);
    assert_eq!(seq_of(&rebuilt.last_id).1, 81);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_a_node_keeps_its_subscribers_and_is_not_ready_until_it_returns() {
    let upstream = std::sync::Arc::new(MockUpstream::start(vehicles(0)).await);
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "150ms")) else {
        return;
    };
    cluster.start(&["a"]).await;
    let mut client = SseClient::connect(&cluster.nodes[0].stream_url("fleet"), &[], false).await;
    let mut rebuilt = Rebuilt::default();
    upstream.set(vehicles(1));
    assert!(rebuilt.converge(&mut client, &vehicles(1), SOON).await);

    cluster.redis.pause();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while cluster.nodes[0].readyz().await != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready without redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The answer names what failed.
    let body: serde_json::Value = reqwest::get(format!("{}/readyz", cluster.nodes[0].base()))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("readyz answers JSON");
    assert_eq!(body["failed"], serde_json::json!(["redis"]), "{body}");
    assert_eq!(body["checks"]["redis"]["ok"], false, "{body}");
    let health = reqwest::get(format!("{}/healthz", cluster.nodes[0].base()))
        .await
        .expect("healthz")
        .status();
    assert_eq!(health, 200, "alive all the same");
    // The subscriber is still connected (keep-alives flow) and keeps its document.
    let keepalive_or_event = client.next(Duration::from_secs(3)).await;
    assert!(keepalive_or_event.is_some() || !client.ends_within(Duration::from_millis(10)).await);

    cluster.redis.resume();
    cluster.nodes[0].ready(Duration::from_secs(20)).await;
    upstream.set(vehicles(2));
    assert!(
        rebuilt
            .converge(&mut client, &vehicles(2), Duration::from_secs(20))
            .await
    );
    assert_eq!(
        rebuilt.snapshots, 1,
        "the log survived: same epoch, no snapshot"
    );
    let log = cluster.nodes[0].log();
    let warnings = log.matches("WARN").count();
    assert!(
        warnings < 20,
        "no flood of warnings while redis was away ({warnings}):\n{log}"
    );
}

const PROXY_TOKEN: &str = "proxy-token-0123456789";

/// Every node's configuration for the proxy mode: no configured stream, dynamic ones only.
fn proxy_config(linger: &str, max_connections: usize) -> String {
    format!(
        r#"
[server]
keepalive = "1s"
shutdown_grace = "1s"

[proxy]
enabled = true
allowed_hosts = ["127.0.0.1"]
allow_private = true
interval = "200ms"
min_interval = "100ms"
linger = "{linger}"

[[proxy.tokens]]
name = "app"
token = "{PROXY_TOKEN}"
max_connections = {max_connections}

[cluster]
redis = "{{redis}}"
prefix = "t"
lease_ttl = "1s"
probe_interval = "500ms"
"#
    )
}

/// `GET /{upstream URL}` on `node`, as a Streamdata.io client asks.
async fn open_dynamic(node: &crate::support::cluster::Node, upstream: &MockUpstream) -> SseClient {
    let url = format!(
        "{}/{}?X-Sd-Token={PROXY_TOKEN}",
        node.base(),
        upstream.url()
    );
    SseClient::connect(&url, &[], false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dynamic_stream_opened_on_two_nodes_is_one_stream_polled_once() {
    let upstream = std::sync::Arc::new(MockUpstream::start(vehicles(0)).await);
    let Some(mut cluster) = TestCluster::new(&proxy_config("1s", 10)) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let mut on_a = open_dynamic(&cluster.nodes[0], &upstream).await;
    let mut on_b = open_dynamic(&cluster.nodes[1], &upstream).await;
    let (mut seen_a, mut seen_b) = (Rebuilt::default(), Rebuilt::default());
    let stop = keep_changing(upstream.clone(), Duration::from_millis(150));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = upstream.requests();
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let polls = upstream.requests() - before;
    let intervals = (started.elapsed().as_millis() / 200) as usize;
    assert!(
        polls <= intervals + 2,
        "{polls} requests in {intervals} intervals: {:?}; logs:\n{}",
        &pollers(&upstream)[before..],
        cluster.logs()
    );
    drop(stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target = upstream.document();
    assert!(
        seen_a.converge(&mut on_a, &target, SOON).await,
        "logs:\n{}",
        cluster.logs()
    );
    assert!(
        seen_b.converge(&mut on_b, &target, SOON).await,
        "logs:\n{}",
        cluster.logs()
    );
    // The same stream on both nodes: the same ids.
    assert_eq!(seen_a.last_id, seen_b.last_id);

    // Everyone leaves: after the linger, nobody polls, and the stream's log is forgotten once.
    drop((on_a, on_b));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let quiet = upstream.requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        upstream.requests(),
        quiet,
        "polling stopped after the linger"
    );
    let client = ::redis::Client::open(cluster.redis.url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("t:{~*")
        .query_async(&mut connection)
        .await
        .expect("keys");
    assert!(
        keys.is_empty(),
        "the stream's keys are gone: {keys:?}; logs:\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tokens_connection_limit_holds_across_the_cluster() {
    let upstream = MockUpstream::start(vehicles(0)).await;
    let Some(mut cluster) = TestCluster::new(&proxy_config("5s", 2)) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let mut first = open_dynamic(&cluster.nodes[0], &upstream).await;
    let mut second = open_dynamic(&cluster.nodes[1], &upstream).await;
    for client in [&mut first, &mut second] {
        let event = client.expect(SOON).await;
        assert_eq!(event.event, "data", "admitted: {event:?}");
    }
    // A third connection, on either node, is one too many for the token.
    for node in &cluster.nodes {
        let mut third = open_dynamic(node, &upstream).await;
        let event = third.expect(SOON).await;
        assert_eq!(event.event, "error", "{event:?}");
        assert_eq!(event.json()["cause"], "too-many-connections", "{event:?}");
    }
    // One leaves: a connection is possible again.
    drop(first);
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let mut again = open_dynamic(&cluster.nodes[1], &upstream).await;
        let event = again.expect(SOON).await;
        if event.event == "data" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With a PostgreSQL store every node shares, no node is named: the holder of a stream's
/// lease dispatches it, every node's workers deliver, and each change arrives once, in order,
/// whichever node it was pushed through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_are_delivered_once_by_the_cluster_from_its_shared_store() {
    let upstream = MockUpstream::start(vehicles(0)).await;
    let receiver = Receiver::start(&[crate::webhook::SECRET]).await;
    let Some(store) = TestStore::postgres() else {
        return;
    };
    let webhooks = format!(
        "\n[webhooks]\n{}allow_private_targets = true\nschedule = [\"0s\", \"100ms\", \"200ms\"]\njitter = 0.0\n[[webhooks.endpoints]]\nid = \"e\"\nurl = \"{}\"\nstreams = [\"board\"]\nmode = \"patch\"\nsecret = \"{}\"\n",
        store.toml(),
        receiver.url(),
        crate::webhook::SECRET
    );
    let config = config(&upstream.url(), "1s") + &webhooks;
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let client = reqwest::Client::new();
    // Pushes through both nodes: the node holding the stream's lease dispatches every change
    // once, whichever node received it.
    for i in 0..10 {
        let node = &cluster.nodes[i % 2];
        let status = client
            .post(format!("{}/streams/board", node.base()))
            .bearer_auth("push-token-0123456789")
            .json(&json!({"n": i, "pad": "a field long enough that patches stay smaller than the document"}))
            .send()
            .await
            .expect("push")
            .status();
        assert_eq!(status, 200);
    }
    let hits = receiver
        .wait_for(Duration::from_secs(20), "ten changes", |hits| {
            hits.iter().any(|h| h.seq() == 10)
        })
        .await;
    let seqs: Vec<u64> = hits.iter().map(|h| h.seq()).collect();
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<_>>(),
        "each change once, in order"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.hits().len(), 10, "and nothing more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_on_demand_stream_is_polled_once_while_anyone_anywhere_subscribes() {
    let upstream = MockUpstream::start(vehicles(0)).await;
    let config = config(&upstream.url(), "200ms").replace(
        "interval = \"200ms\"\n",
        "interval = \"200ms\"\non_demand = true\nlinger = \"1s\"\n",
    );
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(upstream.requests(), 0, "nobody subscribes: nobody polls");
    let mut on_b = SseClient::connect(&cluster.nodes[1].stream_url("fleet"), &[], false).await;
    let mut rebuilt = Rebuilt::default();
    upstream.set(vehicles(1));
    assert!(
        rebuilt.converge(&mut on_b, &vehicles(1), SOON).await,
        "logs:\n{}",
        cluster.logs()
    );
    let before = upstream.requests();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let polls = upstream.requests() - before;
    assert!(polls <= 12, "one poller: {polls} requests in 2 s at 200 ms");
    let agents: BTreeSet<String> = pollers(&upstream)[before..].iter().cloned().collect();
    assert_eq!(agents.len(), 1, "{agents:?}");
    drop(on_b);
    // The linger runs out: polling stops everywhere.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = upstream.requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(upstream.requests(), quiet, "nobody polls after the linger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_while_it_publishes_leaves_no_half_written_change() {
    let upstream = MockUpstream::start(vehicles(0)).await;
    let Some(mut cluster) = TestCluster::new(&config(&upstream.url(), "1s")) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let client = reqwest::Client::new();
    let base_a = cluster.nodes[0].base();
    let first = client
        .post(format!("{base_a}/streams/board"))
        .bearer_auth("push-token-0123456789")
        .json(&json!({"items": []}))
        .send()
        .await
        .expect("push");
    assert_eq!(first.status(), 200);
    let mut watcher = Checked::connect(&cluster.nodes[1], "board").await;
    // A publisher this fast outruns a subscriber's buffer: resyncs are fine, gaps are not.
    watcher.resyncs = true;
    // A publisher hammering node a with patches while it is killed.
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut accepted = 0u64;
            for i in 0..10_000 {
                let answer = client
                    .patch(format!("{base_a}/streams/board"))
                    .bearer_auth("push-token-0123456789")
                    .json(&json!([{"op": "add", "path": "/items/-", "value": i}]))
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == 200 => accepted += 1,
                    _ => break,
                }
            }
            accepted
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.node("a").kill();
    let accepted = publisher.await.expect("publisher");
    assert!(
        accepted > 5,
        "only {accepted} pushes went through before the kill"
    );
    // Every change node b serves is whole: its subscriber rebuilt the document without a gap,
    // and it holds at least every push node a answered 2xx (a change committed to the log
    // before the kill may have gone unanswered).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer: Value = client
        .get(cluster.nodes[1].stream_url("board"))
        .header("accept", "application/json")
        .send()
        .await
        .expect("json view")
        .json()
        .await
        .expect("json");
    let items = answer["items"].as_array().expect("items").len() as u64;
    assert!(items >= accepted, "{items} items, {accepted} accepted");
    let expected: Vec<Value> = (0..items).map(|i| json!(i)).collect();
    assert_eq!(
        answer["items"],
        Value::Array(expected),
        "in order, none twice"
    );
    if let Err(problem) = watcher.until(&answer, SOON).await {
        panic!("{problem}; logs:\n{}", cluster.logs());
    }
}

/// With an SQLite store (each node's own file) a cluster's webhooks are delivered by the one
/// node `cluster.webhooks_node` names: every change once, in order, whichever node it was
/// pushed through; the other node sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_are_delivered_once_by_the_node_named_for_them() {
    let upstream = MockUpstream::start(vehicles(0)).await;
    let receiver = Receiver::start(&[crate::webhook::SECRET]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let webhooks = format!(
        "\n[webhooks]\ndatabase = \"{}\"\nallow_private_targets = true\nschedule = [\"0s\", \"100ms\", \"200ms\"]\njitter = 0.0\n[[webhooks.endpoints]]\nid = \"e\"\nurl = \"{}\"\nstreams = [\"board\"]\nmode = \"patch\"\nsecret = \"{}\"\n",
        dir.path().join("outbox.db").display(),
        receiver.url(),
        crate::webhook::SECRET
    );
    // `webhooks_node` goes in [cluster], the last table of `config`.
    let config = config(&upstream.url(), "1s") + "webhooks_node = \"a\"\n" + &webhooks;
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let client = reqwest::Client::new();
    // Pushes through both nodes: node a delivers every change, node b none.
    for i in 0..10 {
        let node = &cluster.nodes[i % 2];
        let status = client
            .post(format!("{}/streams/board", node.base()))
            .bearer_auth("push-token-0123456789")
            .json(&json!({"n": i, "pad": "a field long enough that patches stay smaller than the document"}))
            .send()
            .await
            .expect("push")
            .status();
        assert_eq!(status, 200);
    }
    let hits = receiver
        .wait_for(Duration::from_secs(20), "ten changes", |hits| {
            hits.iter().any(|h| h.seq() == 10)
        })
        .await;
    let seqs: Vec<u64> = hits.iter().map(|h| h.seq()).collect();
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<_>>(),
        "each change once, in order"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.hits().len(), 10, "and nothing more");
    assert!(
        receiver
            .hits()
            .iter()
            .all(|h| h.headers["user-agent"] == "patchwire-node-a"),
        "all from node a"
    );
    // Node b's admin API says where the webhooks are.
    let answer = client
        .get(format!("{}/admin/webhooks", cluster.nodes[1].base()))
        .send()
        .await
        .expect("admin");
    assert_eq!(answer.status(), 404);
    let answer: Value = answer.json().await.expect("a JSON error");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains("node \"a\""), "{answer}");
}

/// Two nodes on one PostgreSQL outbox and one Redis; the node that is delivering is killed
/// with SIGKILL in the middle of a delivery. The other node takes over the streams' dispatch
/// (their leases) and, once the dead node's claim expires, the delivery it held, with the same
/// `webhook-id`. Every accepted change of both streams (a push stream and a polled one)
/// arrives, each once (bar retries of the same message), in order, its chain of patches
/// verified and every signature checked by the independent `standardwebhooks` crate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_delivery_loses_no_webhook_and_keeps_the_order() {
    use crate::webhook::{SECRET, rebuild};
    let upstream = MockUpstream::start(vehicles(0)).await;
    let receiver = Receiver::start(&[SECRET]).await;
    // Slow enough that a delivery is always in flight.
    receiver.set_delay(Duration::from_millis(300));
    let Some(store) = TestStore::postgres() else {
        return;
    };
    let webhooks = format!(
        r#"
[webhooks]
{}allow_private_targets = true
schedule = ["0s", "100ms", "200ms", "400ms", "800ms", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]
jitter = 0.0
attempt_timeout = "1s"
claim_timeout = "2s"
[[webhooks.endpoints]]
id = "e"
url = "{}"
streams = ["board", "fleet"]
mode = "patch"
secret = "{SECRET}"
"#,
        store.toml(),
        receiver.url(),
    );
    let config = config(&upstream.url(), "250ms") + &webhooks;
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let client = reqwest::Client::new();
    let bases: Vec<String> = cluster.nodes.iter().map(|n| n.base()).collect();
    let push = |node: usize, n: u64| {
        let url = format!("{}/streams/board", bases[node]);
        let client = client.clone();
        async move {
            client
                .post(url)
                .bearer_auth("push-token-0123456789")
                .json(&json!({"n": n, "pad": "a field long enough that patches stay smaller than the document"}))
                .send()
                .await
                .expect("push")
                .status()
                .as_u16()
        }
    };
    // Changes through both nodes, and polls of the upstream by whichever node holds `fleet`.
    for n in 1..=8u64 {
        assert_eq!(push((n % 2) as usize, n).await, 200);
        if n % 2 == 0 {
            upstream.set(vehicles(n));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Kill the node whose delivery just arrived (it is in flight for 300 ms).
    let seen = receiver.arrivals().len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let victim = loop {
        let arrivals = receiver.arrivals();
        if let Some(last) = arrivals.get(seen..).and_then(<[_]>::last) {
            break last.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery in flight; logs:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let name = victim
        .user_agent
        .strip_prefix("patchwire-node-")
        .unwrap_or_else(|| panic!("a delivery from an unknown sender: {victim:?}"))
        .to_owned();
    cluster.node(&name).kill();
    let survivor = usize::from(name == "a");
    // More changes through the survivor, which takes the dead node's leases.
    for n in 9..=16u64 {
        assert_eq!(push(survivor, n).await, 200);
        if n % 2 == 0 {
            upstream.set(vehicles(n));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fleet_done = upstream.document();
    let hits = receiver
        .wait_for(
            Duration::from_secs(40),
            "every change of both streams",
            |hits| {
                let ok: Vec<Hit> = hits.iter().filter(|h| h.status < 300).cloned().collect();
                let board = of_stream(&ok, "board");
                let fleet = of_stream(&ok, "fleet");
                board.iter().any(|h| h.seq() == 16)
                    && !fleet.is_empty()
                    && rebuild(&first_of_each(&fleet)) == fleet_done
            },
        )
        .await;
    let accepted: Vec<Hit> = hits.into_iter().filter(|h| h.status < 300).collect();
    let logs = cluster.logs();
    for (stream, last) in [("board", json!({"n": 16})), ("fleet", fleet_done.clone())] {
        let delivered = first_of_each(&of_stream(&accepted, stream));
        // In order, each patch on the document the receiver holds, every signature verified.
        let document = rebuild(&delivered);
        if stream == "board" {
            assert_eq!(document["n"], last["n"], "{stream}; logs:\n{logs}");
            // Every accepted push arrived, in order, as one message each.
            let seqs: Vec<u64> = delivered.iter().map(Hit::seq).collect();
            assert_eq!(
                seqs,
                (1..=16).collect::<Vec<_>>(),
                "board: every change once, in order; logs:\n{logs}"
            );
        } else {
            assert_eq!(document, last, "{stream}; logs:\n{logs}");
            let seqs: Vec<u64> = delivered.iter().map(Hit::seq).collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "fleet in order: {seqs:?}"
            );
        }
    }
    // The delivery the dead node had in flight was sent again by the survivor, same id.
    let retried = accepted
        .iter()
        .find(|h| h.id() == victim.id && h.headers["user-agent"] != victim.user_agent.as_str());
    let retried = retried.unwrap_or_else(|| {
        panic!(
            "the survivor never sent {} (in flight on {name} when it was killed); logs:\n{logs}",
            victim.id
        )
    });
    assert!(
        retried.at.duration_since(victim.at) >= Duration::from_secs(1),
        "taken over before the claim could expire: {:?}",
        retried.at.duration_since(victim.at)
    );
}

/// The hits of `stream`.
fn of_stream(hits: &[Hit], stream: &str) -> Vec<Hit> {
    hits.iter()
        .filter(|h| h.body["stream"] == stream)
        .cloned()
        .collect()
}

/// The first accepted delivery of each message (retries of the same `webhook-id` dropped).
fn first_of_each(hits: &[Hit]) -> Vec<Hit> {
    let mut seen = BTreeSet::new();
    hits.iter()
        .filter(|h| seen.insert(h.id()))
        .cloned()
        .collect()
}

/// Vehicles on three lines; `n` moves them.
/// The node holding `stream`'s lease as node `base` lists it, with the listing.
async fn lease_holder(
    client: &reqwest::Client,
    base: &str,
    stream: &str,
) -> (Option<String>, Value) {
    let listing: Value = client
        .get(format!("{base}/streams"))
        .send()
        .await
        .expect("listing")
        .json()
        .await
        .expect("JSON");
    let holder = listing["streams"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == stream))
        .and_then(|s| s["lease"]["node"].as_str())
        .map(str::to_owned);
    (holder, listing)
}

fn lined(n: u64) -> Value {
    json!({"vehicles": (0..12u64).map(|i| json!({"id": i, "line": format!("L{}", (i + n / 3) % 3), "pos": n * 100 + i, "note": "a field long enough that patches stay smaller than the document"})).collect::<Vec<_>>()})
}

fn line_view(document: &Value, line: &str) -> Value {
    let kept: Vec<Value> = document["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["line"] == line)
        .cloned()
        .collect();
    json!({ "vehicles": kept })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_computes_the_same_view_events_and_a_view_resumes_across_nodes() {
    let upstream = MockUpstream::start(lined(0)).await;
    let toml = config(&upstream.url(), "100ms").replace(
        "[[streams]]\nname = \"board\"",
        "[streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\naliases = { line = \"line\" }\n\n[[streams]]\nname = \"board\"",
    );
    assert!(toml.contains("[streams.filtering]"));
    let Some(mut cluster) = TestCluster::new(&toml) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let view = "fleet?line=L1";
    let mut on_a = SseClient::connect(&cluster.nodes[0].stream_url(view), &[], false).await;
    let mut on_b = SseClient::connect(&cluster.nodes[1].stream_url(view), &[], false).await;
    let (mut rebuilt_a, mut rebuilt_b) = (Rebuilt::default(), Rebuilt::default());
    for n in 1..=4 {
        upstream.set(lined(n));
        let expected = line_view(&lined(n), "L1");
        assert!(
            rebuilt_a.converge(&mut on_a, &expected, SOON).await,
            "node a, {n}"
        );
        assert!(
            rebuilt_b.converge(&mut on_b, &expected, SOON).await,
            "node b, {n}"
        );
        // The same change of the view has the same id on both nodes.
        assert_eq!(rebuilt_a.last_id, rebuilt_b.last_id);
    }
    assert!(
        rebuilt_a.last_id.starts_with("fleet@~"),
        "{}",
        rebuilt_a.last_id
    );
    // Node a's subscriber leaves; changes happen; it resumes on node b with what it missed.
    drop(on_a);
    for n in 5..=8 {
        upstream.set(lined(n));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut moved = SseClient::connect(
        &cluster.nodes[1].stream_url(view),
        &[("last-event-id", &rebuilt_a.last_id)],
        false,
    )
    .await;
    // Every change of the view it missed is replayed (each moves L1's vehicles), rather than
    // one snapshot of the current view.
    let target = line_view(&lined(8), "L1");
    let mut replayed = Vec::new();
    while rebuilt_a.document.as_ref() != Some(&target) {
        let event = moved.expect(SOON).await;
        replayed.push(seq_of(&event.id).1);
        rebuilt_a.apply(&event);
    }
    assert_eq!(replayed.len(), 4, "{replayed:?}");
    assert!(replayed.windows(2).all(|w| w[0] < w[1]), "{replayed:?}");
}

/// Two nodes on one PostgreSQL outbox and one Redis; an endpoint created through the admin API
/// receives a view (`fleet?line=L1`), which the node holding `fleet`'s lease dispatches under
/// that lease. That node is killed with SIGKILL while deliveries are in flight: the survivor
/// takes the lease and the view's dispatch. Every view change the receiver accepted came in
/// order, each patch on the document it held, every signature checked by the independent
/// `standardwebhooks` crate, and the document it rebuilds is the view the survivor serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_endpoint_from_the_admin_api_survives_the_kill_of_its_dispatching_node() {
    use crate::webhook::{SECRET, rebuild};
    let upstream = MockUpstream::start(lined(0)).await;
    let receiver = Receiver::start(&[SECRET]).await;
    receiver.set_delay(Duration::from_millis(200));
    let Some(store) = TestStore::postgres() else {
        return;
    };
    let webhooks = format!(
        r#"
[webhooks]
{}allow_private_targets = true
admin_token = "admin-token-0123456789"
schedule = ["0s", "100ms", "200ms", "400ms", "800ms", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]
jitter = 0.0
attempt_timeout = "1s"
claim_timeout = "2s"
"#,
        store.toml(),
    );
    let config = config(&upstream.url(), "250ms").replace(
        "[[streams]]\nname = \"board\"",
        "[streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\naliases = { line = \"line\" }\nlinger = \"1s\"\n\n[[streams]]\nname = \"board\"",
    ) + &webhooks;
    assert!(config.contains("[streams.filtering]"));
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let client = reqwest::Client::new();
    let bases: Vec<String> = cluster.nodes.iter().map(|n| n.base()).collect();
    let view = "fleet?line=L1";

    // Created on node a, whichever node holds the stream: the holder follows the view.
    let created: Value = client
        .post(format!("{}/admin/webhooks", bases[0]))
        .bearer_auth("admin-token-0123456789")
        .json(&json!({"url": receiver.url(), "streams": [view], "secret": SECRET}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("JSON");
    let name = created["streams"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no view in {created}"))
        .to_owned();
    assert!(name.starts_with("fleet@~"), "{created}");
    let of_view = |hits: &[Hit]| -> Vec<Hit> {
        first_of_each(
            &hits
                .iter()
                .filter(|h| h.status < 300 && h.body["stream"] == name.as_str())
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    receiver
        .wait_for(Duration::from_secs(20), "the view's document", |hits| {
            !of_view(hits).is_empty()
        })
        .await;
    for n in 1..=6u64 {
        upstream.set(lined(n));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Kill the node dispatching `fleet` and its view, deliveries in flight.
    let (holder, listing) = lease_holder(&client, &bases[0], "fleet").await;
    let holder = holder.unwrap_or_else(|| panic!("nobody holds fleet: {listing}"));
    cluster.node(&holder).kill();
    let survivor = usize::from(holder == "a");
    for n in 7..=12u64 {
        upstream.set(lined(n));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let served = || {
        let url = format!("{}/streams/{view}", bases[survivor]);
        let client = client.clone();
        async move {
            client
                .get(url)
                .header("accept", "application/json")
                .send()
                .await
                .expect("the view")
                .json::<Value>()
                .await
                .expect("JSON")
        }
    };
    let expected = line_view(&lined(12), "L1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let delivered = of_view(&receiver.hits());
        let rebuilt = rebuild(&delivered);
        if rebuilt == expected {
            assert_eq!(served().await, rebuilt, "the view the survivor serves");
            let seqs: Vec<u64> = delivered.iter().map(Hit::seq).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
            assert!(
                delivered.iter().any(|h| h.kind() == "stream.patch"),
                "the view's changes came as patches"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the receiver never rebuilt the view: {rebuilt} != {expected}; logs:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every delivery the receiver accepted is a change of the view, in one chain.
    let accepted: Vec<Hit> = receiver
        .hits()
        .into_iter()
        .filter(|h| h.status < 300)
        .collect();
    assert!(accepted.iter().all(|h| h.body["stream"] == name.as_str()));
}

/// Two nodes on one PostgreSQL outbox, the upstream failing: the endpoint is told once. The
/// holder tells it `stream.error`; it is killed; the other node takes the lease while the
/// upstream still fails (it sees the failure as it starts dispatching) and tells no second
/// error; when the upstream answers, the endpoint is told `stream.recovered` once, then the
/// change. Signatures checked by the independent `standardwebhooks` crate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_taking_over_a_failing_stream_tells_no_second_error() {
    use crate::webhook::{SECRET, unique};
    let upstream = MockUpstream::start(
        json!({"n": 0, "pad": "a field long enough that patches stay smaller than the document"}),
    )
    .await;
    let receiver = Receiver::start(&[SECRET]).await;
    let Some(store) = TestStore::postgres() else {
        return;
    };
    let config = config(&upstream.url(), "100ms")
        + &format!(
            r#"
[webhooks]
{}allow_private_targets = true
jitter = 0.0
attempt_timeout = "1s"
claim_timeout = "2s"

[[webhooks.endpoints]]
id = "watch"
url = "{}"
streams = ["fleet"]
events = ["snapshots", "patches", "errors", "recoveries"]
secret = "{SECRET}"
"#,
            store.toml(),
            receiver.url(),
        );
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    let kinds = |hits: &[Hit]| -> Vec<String> {
        unique(hits)
            .iter()
            .filter(|h| h.body["stream"] == "fleet")
            .map(|h| h.kind().to_owned())
            .collect()
    };
    receiver
        .wait_for(Duration::from_secs(20), "the first document", |hits| {
            hits.iter().any(|h| h.kind() == "stream.snapshot")
        })
        .await;
    upstream.fail(Failure::Status(500, None));
    receiver
        .wait_for(Duration::from_secs(20), "the error", |hits| {
            hits.iter().any(|h| h.kind() == "stream.error")
        })
        .await;
    let client = reqwest::Client::new();
    let (holder, listing) = lease_holder(&client, &cluster.nodes[0].base(), "fleet").await;
    let holder = holder.unwrap_or_else(|| panic!("nobody holds fleet: {listing}"));
    cluster.node(&holder).kill();
    let survivor = usize::from(holder == "a");
    // The survivor takes the lease and polls, still failing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (node, listing) = lease_holder(&client, &cluster.nodes[survivor].base(), "fleet").await;
        if node.as_deref() == Some(cluster.nodes[survivor].name.as_str()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the survivor never took the lease: {listing}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let polls = upstream.requests();
    upstream
        .wait_for_requests(polls + 3, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        kinds(&receiver.hits()),
        ["stream.snapshot", "stream.error"],
        "told once, before and after the takeover\n{}",
        cluster.logs()
    );
    upstream.update(|d| d["n"] = json!(1));
    upstream.recover();
    let hits = receiver
        .wait_for(Duration::from_secs(20), "the recovery and n = 1", |hits| {
            hits.iter().any(|h| h.kind() == "stream.recovered")
                && hits
                    .iter()
                    .any(|h| h.kind() == "stream.patch" || h.body["data"]["n"] == json!(1))
        })
        .await;
    assert!(hits.iter().all(|h| !h.verified_by.is_empty()), "unsigned");
    let kinds = kinds(&hits);
    let count = |kind: &str| kinds.iter().filter(|k| *k == kind).count();
    assert_eq!(
        (count("stream.error"), count("stream.recovered")),
        (1, 1),
        "{kinds:?}"
    );
    let at = |kind: &str| kinds.iter().position(|k| k == kind).unwrap();
    assert!(at("stream.error") < at("stream.recovered"), "{kinds:?}");
}

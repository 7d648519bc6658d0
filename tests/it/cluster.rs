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

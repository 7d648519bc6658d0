//! Lease keepers of several nodes against a real `redis-server`: one holder at a time, an
//! immediate handover on shutdown, a takeover after the TTL when the holder vanishes.

use std::sync::Arc;
use std::time::Duration;

use patchwire::cluster::keys::Keys;
use patchwire::cluster::lease::{self, Holding, Keeper};
use patchwire::cluster::store::{Retention, Store};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::redis::RedisServer;

const TTL: Duration = Duration::from_millis(600);
const RETAIN: Retention = Retention {
    history: 10,
    history_bytes: 1 << 20,
    ttl: Duration::from_secs(60),
};

struct Node {
    held: watch::Receiver<Option<Holding>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

async fn node(server: &RedisServer, name: &str, stream: &str, ttl: Duration) -> Node {
    let client = redis::Client::open(server.url()).expect("url");
    let store = Store::new(
        client.get_connection_manager().await.expect("connect"),
        Keys::new("t"),
    );
    let shutdown = CancellationToken::new();
    let (nodes_tx, nodes) = watch::channel(Arc::from(Vec::new()));
    let (reachable, _) = watch::channel(false);
    let node: Arc<str> = Arc::from(name);
    // Join the live set before keeping leases, as the application does.
    let live = store.heartbeat(name, Some(ttl)).await.expect("heartbeat");
    nodes_tx.send_replace(live.into());
    let membership = tokio::spawn(lease::membership(
        store.clone(),
        node.clone(),
        ttl,
        nodes_tx,
        reachable,
        Arc::new(Notify::new()),
        std::sync::Arc::new(patchwire::metrics::Metrics::new()),
        shutdown.clone(),
    ));
    let (held_tx, held) = watch::channel(None);
    let keeper = Keeper {
        store,
        node,
        stream: stream.to_owned(),
        ttl,
        retention: RETAIN,
        nodes,
        released: Arc::new(Notify::new()),
        held: held_tx,
        metrics: std::sync::Arc::new(patchwire::metrics::Metrics::new()),
        taking: lease::Taking::Always,
        node_shutdown: shutdown.clone(),
        config: watch::channel(None).1,
    };
    let keeper = tokio::spawn(keeper.run(shutdown.clone()));
    Node {
        held,
        shutdown,
        tasks: vec![membership, keeper],
    }
}

async fn until_held(node: &Node, within: Duration) -> Holding {
    let mut held = node.held.clone();
    let holding = tokio::time::timeout(within, held.wait_for(Option::is_some))
        .await
        .expect("the lease is taken in time")
        .expect("keeper alive");
    holding.clone().expect("held")
}

#[tokio::test]
async fn one_holder_then_an_immediate_handover_on_shutdown() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // A long TTL: a handover that waited for it would be plain to see.
    let ttl = Duration::from_secs(6);
    let a = node(&server, "a", "s", ttl).await;
    let b = node(&server, "b", "s", ttl).await;
    // Exactly one of them holds it.
    tokio::time::sleep(TTL).await;
    let holders = [&a, &b]
        .iter()
        .filter(|n| n.held.borrow().is_some())
        .count();
    assert_eq!(holders, 1);
    let (holder, other) = if a.held.borrow().is_some() {
        (a, b)
    } else {
        (b, a)
    };
    let first = holder.held.borrow().clone().expect("held");

    let stopped = Instant::now();
    holder.shutdown.cancel();
    for task in holder.tasks {
        task.await.expect("keeper ends");
    }
    let taken = until_held(&other, ttl).await;
    // Before the TTL: the holder released it and left the live set.
    assert!(
        stopped.elapsed() < ttl,
        "handover took {:?}",
        stopped.elapsed()
    );
    assert!(taken.id > first.id, "a newer fence");
}

#[tokio::test]
async fn a_vanished_holder_is_replaced_after_its_ttl() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let a = node(&server, "a", "s", TTL).await;
    let b = node(&server, "b", "s", TTL).await;
    // Once both are live the lease settles on the stream's rendezvous owner (the first node
    // may have taken it alone, then handed it over).
    let nodes = ["a".to_owned(), "b".to_owned()];
    let owner_is_a = patchwire::cluster::rendezvous::ranking("s", &nodes)[0] == "a";
    let (holder, other) = if owner_is_a { (a, b) } else { (b, a) };
    until_held(&holder, TTL * 10).await;
    // The holder's process dies: nothing is released, its heartbeat stops.
    let died = Instant::now();
    for task in &holder.tasks {
        task.abort();
    }
    let _ = until_held(&other, TTL * 10).await;
    let took = died.elapsed();
    // Never while the lease could still be the dead holder's (it was renewed at most a third
    // of the TTL before it died).
    assert!(
        took >= TTL * 2 / 3 - Duration::from_millis(50),
        "taken over too early: {took:?}"
    );
}

#[tokio::test]
async fn an_owner_that_stops_renewing_is_replaced_as_its_lease_expires() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // A step (a third of the TTL) of 500 ms.
    let ttl = Duration::from_millis(1500);
    let a = node(&server, "a", "s", ttl).await;
    let b = node(&server, "b", "s", ttl).await;
    let nodes = ["a".to_owned(), "b".to_owned()];
    let owner_is_a = patchwire::cluster::rendezvous::ranking("s", &nodes)[0] == "a";
    let (holder, holder_name, other) = if owner_is_a { (a, "a", b) } else { (b, "b", a) };
    until_held(&holder, ttl * 10).await;
    // The holder stops renewing but stays listed live, as a node killed between its renewal
    // and its heartbeat is until its heartbeat runs out: only its lease tells that it is gone.
    holder.tasks[1].abort();
    let client = redis::Client::open(server.url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    loop {
        let lease: Option<String> = redis::cmd("GET")
            .arg("t:{s}:lease")
            .query_async(&mut connection)
            .await
            .expect("GET");
        if !lease.is_some_and(|l| l.starts_with(&format!("{holder_name} "))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let expired = Instant::now();
    let _ = until_held(&other, ttl * 10).await;
    // The next in line takes it as it expires, not a step (500 ms) later, so a failover takes
    // the TTL plus one poll, not plus a step.
    let after = expired.elapsed();
    assert!(
        after < Duration::from_millis(250),
        "taken {after:?} after the lease expired"
    );
}

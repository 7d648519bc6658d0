//! Broker sinks against real brokers: Debian's `nats-server -js` and `redis-server` on free
//! loopback ports, read by consumers that know nothing of patchwire's code (a JetStream pull
//! consumer, `XREAD`, and Python's `nats-py` and `redis-py`).

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::brokers::{Line, jetstream_messages, rebuild, redis_entries, redis_len};
use crate::support::cluster::TestCluster;
use crate::support::nats::NatsServer;
use crate::support::redis::RedisServer;
use crate::support::*;

const TOKEN: &str = "push-token-0123456789";

/// Waits long enough for a broker sink to retry after its broker came back (its backoff
/// reaches 5 s).
const RECOVERY: Duration = Duration::from_secs(30);

/// The sinks' TOML: NATS at `nats`, Redis at `redis`, `more` keys in both.
fn sinks(nats: &str, redis: &str, more: &str) -> String {
    format!(
        r#"
[[sinks.nats]]
url = "{nats}"
timeout = "1s"
{more}

[[sinks.redis]]
url = "{redis}"
key = "out:{{stream}}"
timeout = "1s"
{more}
"#
    )
}

/// An app with the polled stream `fleet` (at `upstream`) and the push stream `board`.
fn app_config(upstream: &str, sinks: &str) -> String {
    format!(
        r#"
[push]
token = "{TOKEN}"

{fleet}
[[streams]]
name = "board"
source = "push"
history = 1000

{sinks}
"#,
        fleet = polled("fleet", upstream),
    )
}

async fn push(base: &str, method: reqwest::Method, body: Value) -> u16 {
    reqwest::Client::new()
        .request(method, format!("{base}/streams/board"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

async fn json_view(base: &str, stream: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}/streams/{stream}"))
        .header("accept", "application/json")
        .send()
        .await
        .expect("json view")
        .json()
        .await
        .expect("json")
}

/// The stream's sink entries in `/streams` on `base`.
async fn sink_positions(base: &str, stream: &str) -> Vec<Value> {
    let list: Value = reqwest::get(format!("{base}/streams"))
        .await
        .expect("listing")
        .json()
        .await
        .expect("json");
    list["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .find(|s| s["name"] == stream)
        .and_then(|s| s["sinks"].as_array().cloned())
        .unwrap_or_default()
}

/// Waits until every sink of `stream` on `base` has the broker acknowledge the stream's top;
/// returns them (not its views' sinks).
async fn wait_acknowledged(base: &str, stream: &str, within: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let list: Value = reqwest::get(format!("{base}/streams"))
            .await
            .expect("listing")
            .json()
            .await
            .expect("json");
        let entry = list["streams"]
            .as_array()
            .expect("streams")
            .iter()
            .find(|s| s["name"] == stream)
            .cloned()
            .expect("the stream");
        let top = format!("{stream}:{}:{}", entry["epoch"], entry["seq"]);
        // The stream's own sinks (its views' have ids of their own).
        let sinks: Vec<Value> = entry["sinks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["view"].is_null())
            .cloned()
            .collect();
        if !sinks.is_empty()
            && sinks
                .iter()
                .all(|s| s["acknowledged"] == json!(top) && s["lag"] == 0)
        {
            return sinks;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sinks of {stream} did not reach {top} within {within:?}: {sinks:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn checked(stream: &str, broker: &str, messages: &[crate::support::brokers::Received]) -> Line {
    rebuild(stream, messages).unwrap_or_else(|problem| {
        panic!("{broker}'s line of {stream} is broken: {problem}\n{messages:#?}")
    })
}

/// Five vehicles; `n` moves the first (a small patch, never larger than the document).
fn vehicles(n: u64) -> Value {
    json!({"vehicles": (0..5u64)
        .map(|i| json!({"id": format!("v{i}"), "lat": if i == 0 { n } else { i * 100 }}))
        .collect::<Vec<_>>()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_both_brokers_rebuild_every_document_in_order() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start(vehicles(0)).await;
    let app = TestApp::from_toml(&app_config(
        &upstream.url(),
        &sinks(&nats.url(), &redis.url(), ""),
    ))
    .await;
    let base = app.url("");
    let base = base.trim_end_matches('/');
    let mut sse = app.subscribe("board", &[]).await;
    assert_eq!(
        push(
            base,
            reqwest::Method::POST,
            json!({"items": [], "note": "x".repeat(200)})
        )
        .await,
        200
    );
    for i in 0..150 {
        assert_eq!(
            push(
                base,
                reqwest::Method::PATCH,
                json!([{"op": "add", "path": "/items/-", "value": {"n": i}}])
            )
            .await,
            200
        );
    }
    app.wait_for_seq("fleet", 1).await;
    for n in 1..=5 {
        upstream.set(vehicles(n));
        app.wait_for_seq("fleet", n + 1).await;
    }
    let board = json_view(base, "board").await;
    let mut rebuilt = Rebuilt::default();
    rebuilt.converge(&mut sse, &board, SOON).await;

    for stream in ["board", "fleet"] {
        let positions = wait_acknowledged(base, stream, SOON).await;
        assert!(
            positions.iter().all(|p| p["state"] == "publishing"),
            "{positions:#?}"
        );
        let expected = json_view(base, stream).await;
        let nats_line = checked(
            stream,
            "NATS",
            &jetstream_messages(&nats.url(), "PATCHWIRE", &format!("patchwire.{stream}")).await,
        );
        let redis_line = checked(
            stream,
            "Redis",
            &redis_entries(&redis.url(), &format!("out:{stream}")).await,
        );
        for line in [&nats_line, &redis_line] {
            assert_eq!(line.document.as_ref(), Some(&expected), "{stream}");
            assert_eq!(line.duplicates, 0);
            assert_eq!(line.snapshots_after_first, 0, "one snapshot, then patches");
            let top = app.listing(stream).await["seq"].as_u64().expect("seq");
            assert_eq!(
                line.seqs,
                (1..=top).collect::<Vec<_>>(),
                "every change once"
            );
        }
    }
    // Each message names its source; the metrics count what was published and acknowledged.
    let messages = jetstream_messages(&nats.url(), "PATCHWIRE", "patchwire.fleet").await;
    assert_eq!(messages[0].header("ce-source"), "/streams/fleet");
    assert!(messages[0].header("ce-time").ends_with('Z'));
    let acknowledged = app.metric("patchwire_broker_acknowledged_total").await;
    assert!(acknowledged >= 2.0 * 157.0, "{acknowledged}");
    assert_eq!(app.metric("patchwire_broker_lag").await, 0.0);
    assert_eq!(app.metric("patchwire_broker_resyncs_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_are_trimmed_to_about_maxlen() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start(vehicles(0)).await;
    let app = TestApp::from_toml(&app_config(
        &upstream.url(),
        &format!(
            r#"
[[sinks.nats]]
url = "{nats}"
streams = ["board"]
batch = 16
max_messages_per_subject = 50

[[sinks.redis]]
url = "{redis}"
key = "out:{{stream}}"
streams = ["board"]
batch = 16
maxlen = 20
"#,
            nats = nats.url(),
            redis = redis.url()
        ),
    ))
    .await;
    let base = app.url("");
    let base = base.trim_end_matches('/');
    assert_eq!(
        push(base, reqwest::Method::POST, json!({"n": 0})).await,
        200
    );
    for n in 1..=250 {
        assert_eq!(
            push(base, reqwest::Method::POST, json!({"n": n})).await,
            200
        );
    }
    wait_acknowledged(base, "board", SOON).await;
    // Trimming is approximate (whole nodes of at most 100 entries go): well below 250, at
    // least 20, and the last entry is the last change.
    let len = redis_len(&redis.url(), "out:board").await;
    assert!((20..=140).contains(&len), "XLEN {len}");
    let entries = redis_entries(&redis.url(), "out:board").await;
    assert_eq!(entries.last().expect("entries").seq(), 251);
    // JetStream keeps max_messages_per_subject.
    let messages = jetstream_messages(&nats.url(), "PATCHWIRE", "patchwire.board").await;
    assert_eq!(messages.len(), 50);
    assert_eq!(messages.last().expect("messages").seq(), 251);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_never_holds_up_subscribers_and_the_sink_resyncs_when_it_is_back() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start(vehicles(0)).await;
    let app = TestApp::from_toml(&app_config(
        &upstream.url(),
        &sinks(
            &nats.url(),
            &redis.url(),
            "streams = [\"board\"]\nbuffer = 10",
        ),
    ))
    .await;
    let base = app.url("");
    let base = base.trim_end_matches('/');
    let mut sse = app.subscribe("board", &[]).await;
    let mut rebuilt = Rebuilt::default();
    // A document larger than any patch, so that every change is published as a patch.
    assert_eq!(
        push(
            base,
            reqwest::Method::POST,
            json!({"items": [], "note": "x".repeat(200)})
        )
        .await,
        200
    );
    for i in 0..5 {
        push(
            base,
            reqwest::Method::PATCH,
            json!([{"op": "add", "path": "/items/-", "value": i}]),
        )
        .await;
    }
    wait_acknowledged(base, "board", SOON).await;

    // Both brokers go away (Redis loses everything: it keeps nothing on disk here).
    nats.kill();
    redis.kill();
    for i in 5..60 {
        assert_eq!(
            push(
                base,
                reqwest::Method::PATCH,
                json!([{"op": "add", "path": "/items/-", "value": i}])
            )
            .await,
            200
        );
    }
    // Every push was answered and the subscriber has every change while both brokers are
    // still down: nothing waited for them.
    let expected = json_view(base, "board").await;
    rebuilt.converge(&mut sse, &expected, SOON).await;
    // Past its buffer the sink is behind; until the broker answers it retries.
    let positions = sink_positions(base, "board").await;
    assert!(
        positions.iter().all(|p| p["state"] == "behind"
            || p["state"] == "retrying"
            || p["state"] == "connecting"),
        "{positions:#?}"
    );
    assert!(app.metric("patchwire_broker_errors_total").await >= 1.0);

    nats.restart();
    redis.restart_empty();
    wait_acknowledged(base, "board", RECOVERY).await;
    assert!(app.metric("patchwire_broker_resyncs_total").await >= 2.0);
    // NATS kept its messages: the line goes on with a snapshot that covers the outage.
    let nats_line = checked(
        "board",
        "NATS",
        &jetstream_messages(&nats.url(), "PATCHWIRE", "patchwire.board").await,
    );
    assert_eq!(nats_line.document.as_ref(), Some(&expected));
    assert_eq!(nats_line.snapshots_after_first, 1, "{:?}", nats_line.seqs);
    // Redis came back empty: it starts with the current document.
    let redis_messages = redis_entries(&redis.url(), "out:board").await;
    assert!(redis_messages[0].is_snapshot());
    let redis_line = checked("board", "Redis", &redis_messages);
    assert_eq!(redis_line.document.as_ref(), Some(&expected));
    // And it goes on from there.
    push(
        base,
        reqwest::Method::PATCH,
        json!([{"op": "add", "path": "/items/-", "value": 60}]),
    )
    .await;
    wait_acknowledged(base, "board", SOON).await;
    let expected = json_view(base, "board").await;
    let redis_line = checked(
        "board",
        "Redis",
        &redis_entries(&redis.url(), "out:board").await,
    );
    assert_eq!(redis_line.document.as_ref(), Some(&expected));

    // Redis loses everything while the sink is idle: the next patch has no base there, so the
    // sink finds out and starts the key again with the document.
    redis.restart_empty();
    push(
        base,
        reqwest::Method::PATCH,
        json!([{"op": "add", "path": "/items/-", "value": 61}]),
    )
    .await;
    wait_acknowledged(base, "board", RECOVERY).await;
    let expected = json_view(base, "board").await;
    let redis_messages = redis_entries(&redis.url(), "out:board").await;
    assert!(redis_messages[0].is_snapshot(), "{redis_messages:#?}");
    let redis_line = checked("board", "Redis", &redis_messages);
    assert_eq!(redis_line.document.as_ref(), Some(&expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_jetstream_stream_is_verified_and_a_conflict_fails_the_start_clearly() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let context = async_nats::jetstream::new(client);
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: "EVENTS".into(),
            subjects: vec!["other.>".into()],
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .expect("create");
    let upstream = MockUpstream::start(vehicles(0)).await;
    let toml = app_config(
        &upstream.url(),
        &format!(
            "[[sinks.nats]]\nurl = \"{}\"\njetstream = \"EVENTS\"\n",
            nats.url()
        ),
    );
    let config = config_from_toml(&toml);
    let listeners = patchwire::app::Listeners::bind(&config)
        .await
        .expect("bind");
    let error = match patchwire::app::App::build(
        config,
        listeners,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    {
        Ok(_) => panic!("the start should fail"),
        Err(e) => format!("{e:#}"),
    };
    for expected in [
        "cannot start the broker sinks (`sinks`)",
        "sink \"nats\"",
        "the JetStream stream \"EVENTS\" exists with settings that conflict",
        "max_age is 1h, `max_age` says 7days",
        "max_messages_per_subject is -1, `max_messages_per_subject` says 100000",
    ] {
        assert!(error.contains(expected), "{expected:?} not in: {error}");
    }

    // The same stream with the sink's limits is adopted, and the sink's subjects are added.
    let toml = toml.replace(
        "jetstream = \"EVENTS\"\n",
        "jetstream = \"EVENTS\"\nmax_age = \"1h\"\nmax_messages_per_subject = 1000\n",
    );
    let mut info = context.get_stream("EVENTS").await.expect("stream");
    let mut config = info.info().await.expect("info").config.clone();
    config.max_messages_per_subject = 1000;
    config.max_bytes = 1 << 30;
    config.duplicate_window = Duration::from_secs(120);
    context.update_stream(config).await.expect("update");
    let app = TestApp::from_toml(&toml).await;
    app.wait_for_seq("fleet", 1).await;
    let base = app.url("");
    wait_acknowledged(base.trim_end_matches('/'), "fleet", SOON).await;
    let mut info = context.get_stream("EVENTS").await.expect("stream");
    let subjects = info.info().await.expect("info").config.subjects.clone();
    assert!(
        subjects.contains(&"patchwire.fleet".to_owned()),
        "{subjects:?}"
    );
}

/// One node of a cluster (the binary, killed with SIGKILL mid-flow) publishing a push stream
/// to both brokers: after the restart the node resumes from what each broker holds, so every
/// change arrives once, in order, in the same epoch, with no snapshot to cover a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_flow_resumes_from_the_brokers_with_no_gap() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let config = format!(
        r#"
[server]
shutdown_grace = "1s"

[[streams]]
name = "board"
source = "push"
history = 10000
history_bytes = "64 MiB"

[push]
token = "{TOKEN}"

[[sinks.nats]]
url = "{nats}"
timeout = "1s"
batch = 8

[[sinks.redis]]
url = "{{redis}}"
key = "out:{{stream}}"
timeout = "1s"
batch = 8

[cluster]
redis = "{{redis}}"
prefix = "t"
lease_ttl = "1s"
probe_interval = "500ms"
"#,
        nats = nats.url()
    );
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a"]).await;
    let base = cluster.nodes[0].base();
    // A document larger than any patch, so that every change is published as a patch.
    assert_eq!(
        push(
            &base,
            reqwest::Method::POST,
            json!({"items": [], "note": "x".repeat(200)})
        )
        .await,
        200
    );
    let publisher = {
        let base = base.clone();
        tokio::spawn(async move {
            let mut accepted = 0u64;
            for i in 0..100_000 {
                let status = push(
                    &base,
                    reqwest::Method::PATCH,
                    json!([{"op": "add", "path": "/items/-", "value": i}]),
                )
                .await;
                if status != 200 {
                    break;
                }
                accepted += 1;
            }
            accepted
        })
    };
    tokio::time::sleep(Duration::from_millis(2000)).await;
    cluster.node("a").kill();
    let accepted = publisher.await.expect("publisher");
    assert!(accepted > 5, "only {accepted} pushes before the kill");
    cluster.node("a").restart();
    cluster.nodes[0].ready(Duration::from_secs(20)).await;
    for i in 0..5 {
        assert_eq!(
            push(
                &base,
                reqwest::Method::PATCH,
                json!([{"op": "add", "path": "/items/-", "value": format!("after-{i}")}])
            )
            .await,
            200
        );
    }
    let expected = json_view(&base, "board").await;
    let items = expected["items"].as_array().expect("items").len() as u64;
    assert!(items >= accepted + 5, "{items} items, {accepted} accepted");
    let sinks = wait_acknowledged(&base, "board", RECOVERY).await;
    assert_eq!(sinks.len(), 2);
    let lines = [
        (
            "NATS",
            jetstream_messages(&nats.url(), "PATCHWIRE", "patchwire.board").await,
        ),
        (
            "Redis",
            redis_entries(&cluster.redis.url(), "out:board").await,
        ),
    ];
    for (broker, messages) in lines {
        let line = checked("board", broker, &messages);
        assert_eq!(line.document.as_ref(), Some(&expected), "{broker}");
        assert_eq!(
            line.epochs.len(),
            1,
            "{broker}: the epoch survives the kill"
        );
        assert_eq!(
            line.snapshots_after_first, 0,
            "{broker}: the restart needed no snapshot"
        );
        assert_eq!(
            line.seqs,
            (1..=items + 1).collect::<Vec<_>>(),
            "{broker}: every change once, in order"
        );
        assert_eq!(line.duplicates, 0, "{broker}: duplicates were removed");
    }
}

/// Python's `nats-py` and `redis-py` read the brokers and rebuild the documents with Python's
/// `jsonpatch`: an implementation that shares nothing with patchwire's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_rebuild_the_documents() {
    let present = std::process::Command::new("python3")
        .args(["-c", "import nats, redis, jsonpatch"])
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        let why = "python3 with nats-py, redis and jsonpatch is missing \
                   (python3 -m pip install nats-py redis jsonpatch)";
        assert!(!patchwire_test_data::ci(), "CI=true and {why}");
        eprintln!("SKIP: {why}");
        return;
    }
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start(vehicles(0)).await;
    let app = TestApp::from_toml(&app_config(
        &upstream.url(),
        &sinks(&nats.url(), &redis.url(), ""),
    ))
    .await;
    let base = app.url("");
    let base = base.trim_end_matches('/');
    push(
        base,
        reqwest::Method::POST,
        json!({"items": [], "é": "ünïcode"}),
    )
    .await;
    for i in 0..40 {
        push(
            base,
            reqwest::Method::PATCH,
            json!([{"op": "add", "path": "/items/-", "value": {"i": i}}]),
        )
        .await;
    }
    push(
        base,
        reqwest::Method::PATCH,
        json!([{"op": "remove", "path": "/items/3"}]),
    )
    .await;
    wait_acknowledged(base, "board", SOON).await;
    let script = r#"
import asyncio, json, sys
import jsonpatch, nats, redis

def apply(messages):
    doc, seen = None, set()
    for headers, data in messages:
        if headers["ce-id"] in seen:
            continue
        seen.add(headers["ce-id"])
        if headers["ce-type"] == "stream.snapshot":
            doc = data
        else:
            doc = jsonpatch.apply_patch(doc, data)
    return doc

async def from_nats(url):
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.subscribe("patchwire.board", ordered_consumer=True)
    messages = []
    while True:
        try:
            msg = await sub.next_msg(timeout=1)
        except nats.errors.TimeoutError:
            break
        messages.append((dict(msg.headers or {}), json.loads(msg.data)))
    await nc.close()
    return apply(messages)

def from_redis(url):
    r = redis.Redis.from_url(url)
    messages, after = [], "0-0"
    while True:
        answer = r.xread({"out:board": after}, count=100)
        if not answer:
            break
        for entry_id, fields in answer[0][1]:
            after = entry_id
            fields = {k.decode(): v for k, v in fields.items()}
            data = json.loads(fields.pop("data"))
            messages.append(({k: v.decode() for k, v in fields.items()}, data))
    return apply(messages)

print(json.dumps({"nats": asyncio.run(from_nats(sys.argv[1])), "redis": from_redis(sys.argv[2])}))
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, &nats.url(), &redis.url()])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rebuilt: Value = serde_json::from_slice(&output.stdout).expect("JSON from python");
    let expected = json_view(base, "board").await;
    assert_eq!(rebuilt["nats"], expected);
    assert_eq!(rebuilt["redis"], expected);
}

/// Two nodes and a polled stream: only the lease holder publishes it (the other shows
/// `standby`); when the holder is killed, the node that takes the lease reads the broker's
/// last message back and continues the same line; so does a view of the stream (the standby
/// keeps the view while it stands by, so its history covers where the broker's line of the
/// view ends, even when the holder died before publishing its last changes there).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_lease_holder_publishes_and_its_successor_continues_the_line() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let upstream = std::sync::Arc::new(MockUpstream::start(vehicles(0)).await);
    let config = format!(
        r#"
[server]
shutdown_grace = "1s"

[[streams]]
name = "fleet"
url = "{upstream}"
interval = "200ms"
history = 10000

[streams.filtering]
entities = "/vehicles"
key = "id"
aliases = {{ vid = "id" }}

[[sinks.nats]]
url = "{nats}"
timeout = "1s"
streams = ["fleet", "fleet?vid=v0,v1,v2,v3"]

[[sinks.redis]]
url = "{{redis}}"
key = "out:{{stream}}"
timeout = "1s"

[cluster]
redis = "{{redis}}"
prefix = "t"
lease_ttl = "1s"
probe_interval = "500ms"
"#,
        upstream = upstream.url(),
        nats = nats.url()
    );
    let Some(mut cluster) = TestCluster::new(&config) else {
        return;
    };
    cluster.start(&["a", "b"]).await;
    // Which node publishes: the one whose sinks say so, the other standing by.
    let states = |positions: &[Value]| -> Vec<String> {
        positions
            .iter()
            .map(|p| p["state"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let deadline = tokio::time::Instant::now() + SOON;
    let holder = loop {
        let a = states(&sink_positions(&cluster.nodes[0].base(), "fleet").await);
        let b = states(&sink_positions(&cluster.nodes[1].base(), "fleet").await);
        let publishing = |s: &[String]| s.len() == 3 && s.iter().all(|s| s == "publishing");
        let standby = |s: &[String]| s.len() == 3 && s.iter().all(|s| s == "standby");
        if publishing(&a) && standby(&b) {
            break 0;
        }
        if publishing(&b) && standby(&a) {
            break 1;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a: {a:?}, b: {b:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let other = 1 - holder;
    // The standby keeps the view its sink publishes (subscribed), so the view's history grows
    // there too, before any takeover.
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let list: Value = reqwest::get(format!("{}/streams", cluster.nodes[other].base()))
            .await
            .expect("listing")
            .json()
            .await
            .expect("json");
        let kept = list["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "fleet")
            .flat_map(|s| s["views"]["active"].as_array().cloned().unwrap_or_default())
            .any(|v| v["subscribers"].as_u64() >= Some(1));
        if kept {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby does not keep the view: {list:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in 1..=5 {
        upstream.set(vehicles(n));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let holder_name = cluster.nodes[holder].name.clone();
    cluster.node(&holder_name).kill();
    for n in 6..=10 {
        upstream.set(vehicles(n));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let base = cluster.nodes[other].base();
    let expected = upstream.document();
    let deadline = tokio::time::Instant::now() + RECOVERY;
    while json_view(&base, "fleet").await != expected {
        assert!(tokio::time::Instant::now() < deadline, "{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let positions = wait_acknowledged(&base, "fleet", RECOVERY).await;
    assert!(
        positions.iter().all(|p| p["state"] == "publishing"),
        "{positions:#?}"
    );
    let lines = [
        (
            "NATS",
            jetstream_messages(&nats.url(), "PATCHWIRE", "patchwire.fleet").await,
        ),
        (
            "Redis",
            redis_entries(&cluster.redis.url(), "out:fleet").await,
        ),
    ];
    for (broker, messages) in lines {
        let line = checked("fleet", broker, &messages);
        assert_eq!(line.document.as_ref(), Some(&expected), "{broker}");
        assert_eq!(
            line.epochs.len(),
            1,
            "{broker}: one epoch across the handover"
        );
        assert_eq!(line.snapshots_after_first, 0, "{broker}: no gap to cover");
        assert_eq!(line.duplicates, 0, "{broker}");
    }
    let view = json_view(&base, "fleet?vid=v0,v1,v2,v3").await;
    let view_sink = sink_positions(&base, "fleet")
        .await
        .iter()
        .find_map(|p| p["view"].as_str())
        .expect("the view's sink in /streams")
        .to_owned();
    let name = format!("fleet@{view_sink}");
    let nats_url = nats.url();
    let subject = format!("patchwire.fleet.{view_sink}");
    let line = line_reaching(&name, "NATS", &view, || {
        jetstream_messages(&nats_url, "PATCHWIRE", &subject)
    })
    .await;
    assert_eq!(
        line.epochs.len(),
        1,
        "the view: one epoch across the handover"
    );
    assert_eq!(
        line.snapshots_after_first, 0,
        "the view: its successor continued from history"
    );
}

/// A push stream whose vehicles have routes, with the named view `r1` (route R1); its views
/// linger 1 s unwatched.
fn views_config(sinks: &str) -> String {
    format!(
        r#"
[push]
token = "{TOKEN}"

[[streams]]
name = "board"
source = "push"

[streams.filtering]
entities = "/vehicles"
key = "id"
aliases = {{ route = "route" }}
linger = "1s"

[[streams.views]]
name = "r1"
filter = {{ route = "R1" }}

{sinks}
"#
    )
}

/// The view's document as a subscriber's JSON request gets it (`board@r1`, `board?route=R2`).
async fn view_json(base: &str, view: &str) -> Value {
    json_view(base, view).await
}

/// Waits until `read` rebuilds `expected` from a whole line, and returns that line.
async fn line_reaching<F, Fut>(name: &str, broker: &str, expected: &Value, mut read: F) -> Line
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<crate::support::brokers::Received>>,
{
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let messages = read().await;
        let line = checked(name, broker, &messages);
        if line.document.as_ref() == Some(expected) {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{broker}'s line of {name} never reached {expected}: {line:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Views published to both brokers: a named view and an ad hoc one, each on its own subject
/// and key, carry the view's snapshot then its patches (ids of the view, sparse sequence
/// numbers, each patch naming its real base), and a consumer rebuilds exactly the view's JSON.
/// A view the sink follows is not evicted after its linger, and Python's `nats-py` and
/// `redis-py` rebuild the same documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_are_published_and_consumers_rebuild_the_views_documents() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let more = r#"streams = ["board@r1", "board?route=R2,R4"]"#;
    let app = TestApp::from_toml(&views_config(&sinks(&nats.url(), &redis.url(), more))).await;
    let base = app.url("");
    let base = base.trim_end_matches('/');
    let vehicle = |id: &str, route: &str, lat: u64| json!({"id": id, "route": route, "lat": lat});
    assert_eq!(
        push(
            base,
            reqwest::Method::POST,
            // The note keeps every patch smaller than the view's document (a larger one is
            // published whole, as a snapshot).
            json!({"note": "x".repeat(300), "vehicles": [vehicle("a", "R1", 0), vehicle("b", "R2", 0), vehicle("c", "R3", 0)]})
        )
        .await,
        200
    );
    let patch = |path: &str, value: Value| json!([{"op": "replace", "path": path, "value": value}]);
    for n in 1..=6u64 {
        // a (R1), b (R2) and c (R3, in neither view) move in turn.
        let path = ["/vehicles/0/lat", "/vehicles/1/lat", "/vehicles/2/lat"][(n % 3) as usize];
        assert_eq!(
            push(base, reqwest::Method::PATCH, patch(path, json!(n))).await,
            200
        );
    }
    // Longer than the views' linger: followed by the sinks, they stay.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // c joins R1, then b leaves R2 for R4 (still in the ad hoc view), then a vehicle arrives.
    for body in [
        patch("/vehicles/2/route", json!("R1")),
        patch("/vehicles/1/route", json!("R4")),
        json!([{"op": "add", "path": "/vehicles/-", "value": vehicle("d", "R2", 9)}]),
        patch("/vehicles/2/lat", json!(99)),
    ] {
        assert_eq!(push(base, reqwest::Method::PATCH, body).await, 200);
    }
    let top = app.listing("board").await["seq"].as_u64().expect("seq");
    let r1 = view_json(base, "board@r1").await;
    let r2 = view_json(base, "board?route=R4,R2").await;
    assert_eq!(r1["vehicles"].as_array().map(Vec::len), Some(2), "{r1}");
    assert_eq!(r2["vehicles"].as_array().map(Vec::len), Some(2), "{r2}");
    let ad_hoc = app.listing("board").await;
    let sinks = ad_hoc["sinks"].as_array().cloned().unwrap_or_default();
    let r2_name = sinks
        .iter()
        .filter_map(|s| s["view"].as_str())
        .find(|v| v.starts_with('~'))
        .map(|v| format!("board@{v}"))
        .unwrap_or_else(|| panic!("the ad hoc view's sinks in /streams: {sinks:#?}"));
    for (name, expected, subject, key) in [
        (
            "board@r1".to_owned(),
            &r1,
            "patchwire.board.r1".to_owned(),
            "patchwire:board@r1".to_owned(),
        ),
        (
            r2_name.clone(),
            &r2,
            format!("patchwire.board.{}", &r2_name["board@".len()..]),
            format!("patchwire:{r2_name}"),
        ),
    ] {
        let (nats_url, redis_url) = (nats.url(), redis.url());
        let nats_line = line_reaching(&name, "NATS", expected, || {
            jetstream_messages(&nats_url, "PATCHWIRE", &subject)
        })
        .await;
        let redis_line =
            line_reaching(&name, "Redis", expected, || redis_entries(&redis_url, &key)).await;
        for line in [&nats_line, &redis_line] {
            assert_eq!(
                line.snapshots_after_first, 0,
                "{name}: one snapshot, then patches"
            );
            assert_eq!(line.duplicates, 0);
            assert!(
                line.seqs.len() < top as usize && line.seqs.len() >= 4,
                "{name}: a view changes at some of the stream's changes only: {:?} of {top}",
                line.seqs
            );
        }
        assert_eq!(nats_line.seqs, redis_line.seqs, "{name}");
    }
    // The sinks kept the views alive past their linger: both are still listed, each with its
    // subscriber (the sink), and every publisher caught up.
    let messages = jetstream_messages(&nats.url(), "PATCHWIRE", "patchwire.board.r1").await;
    assert_eq!(messages[0].header("ce-source"), "/streams/board@r1");
    assert_eq!(app.metric("patchwire_view_evictions_total").await, 0.0);
    for sink in app.listing("board").await["sinks"]
        .as_array()
        .expect("sinks")
    {
        assert_eq!(sink["state"], "publishing", "{sink}");
        assert_eq!(sink["lag"], 0, "{sink}");
    }

    let present = std::process::Command::new("python3")
        .args(["-c", "import nats, redis, jsonpatch"])
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        let why = "python3 with nats-py, redis and jsonpatch is missing \
                   (python3 -m pip install nats-py redis jsonpatch)";
        assert!(!patchwire_test_data::ci(), "CI=true and {why}");
        eprintln!("SKIP: {why}");
        return;
    }
    let script = r#"
import asyncio, json, sys
import jsonpatch, nats, redis

def apply(messages):
    doc, held = None, None
    for headers, data in messages:
        position = (headers["ce-epoch"], headers["ce-seq"])
        if headers["ce-type"] == "stream.snapshot":
            doc = data
        elif held == (headers["ce-epoch"], headers["ce-baseseq"]):
            doc = jsonpatch.apply_patch(doc, data)
        else:
            raise SystemExit("a patch whose base is not held: %r after %r" % (headers, held))
        held = position
    return doc

async def from_nats(url, subject):
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True)
    messages = []
    while True:
        try:
            msg = await sub.next_msg(timeout=1)
        except nats.errors.TimeoutError:
            break
        messages.append((dict(msg.headers or {}), json.loads(msg.data)))
    await nc.close()
    return apply(messages)

def from_redis(url, key):
    r = redis.Redis.from_url(url)
    messages, after = [], "0-0"
    while True:
        answer = r.xread({key: after}, count=100)
        if not answer:
            break
        for entry_id, fields in answer[0][1]:
            after = entry_id
            fields = {k.decode(): v for k, v in fields.items()}
            data = json.loads(fields.pop("data"))
            messages.append(({k: v.decode() for k, v in fields.items()}, data))
    return apply(messages)

print(json.dumps({"nats": asyncio.run(from_nats(sys.argv[1], sys.argv[2])), "redis": from_redis(sys.argv[3], sys.argv[4])}))
"#;
    let output = tokio::process::Command::new("python3")
        .args([
            "-c",
            script,
            &nats.url(),
            "patchwire.board.r1",
            &redis.url(),
            "patchwire:board@r1",
        ])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rebuilt: Value = serde_json::from_slice(&output.stdout).expect("JSON from python");
    assert_eq!(rebuilt["nats"], r1);
    assert_eq!(rebuilt["redis"], r1);
}

/// JetStream's per-subject fence against a real `nats-server -js`: a publisher that did not see
/// another's messages (a node that lost its lease with a batch in flight) is refused, stores
/// nothing, and once it has read the subject's last message back it continues after it. Every
/// message is fenced (a cluster's mode), or the first of each pipelined batch (a single node's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_publisher_is_fenced_off_the_subject() {
    use patchwire::sinks::broker::config::{NatsSettings, Storage};
    use patchwire::sinks::broker::message::{Message, Position};
    use patchwire::sinks::broker::nats::{Fence, Nats};
    use patchwire::sinks::broker::{Broker, BrokerError};
    use patchwire::wire::ChangeKind;

    let Some(nats) = NatsServer::start() else {
        return;
    };
    let settings = NatsSettings {
        url: nats.url(),
        jetstream: "FENCE".into(),
        storage: Storage::Memory,
        replicas: 1,
        max_age: Duration::from_secs(3600),
        max_bytes: 1 << 20,
        max_messages_per_subject: 1000,
        duplicate_window: Duration::from_secs(60),
    };
    let subjects = vec![
        "fence.every".to_owned(),
        "fence.first".to_owned(),
        "fence.dup".to_owned(),
    ];
    // Ids are the JetStream stream's (duplicates are dropped by id across its subjects): each
    // round publishes its own patchwire stream.
    let message = |stream: &str, seq: u64, kind: ChangeKind| {
        Message::new(
            stream,
            "/streams/s",
            1,
            seq,
            kind,
            seq.saturating_sub(1),
            std::time::UNIX_EPOCH,
            bytes::Bytes::from(format!("{{\"seq\":{seq}}}")),
            false,
        )
    };
    let at = |seq| Some(Position { epoch: 1, seq });
    for (subject, fence, s) in [
        ("fence.every", Fence::Every, "every"),
        ("fence.first", Fence::First, "first"),
    ] {
        let message = |seq, kind| message(s, seq, kind);
        let old = Nats::connect(settings.clone(), subjects.clone(), SOON, fence);
        let new = Nats::connect(settings.clone(), subjects.clone(), SOON, fence);
        let blind = Nats::connect(settings.clone(), subjects.clone(), SOON, fence);
        old.prepare().await.expect("prepare");
        new.prepare().await.expect("prepare");
        // One that read the subject back empty...
        assert_eq!(blind.last(subject, s).await.expect("last"), None);
        // ...while the old holder publishes 1 and 2.
        assert_eq!(old.last(subject, s).await.expect("last"), None);
        old.publish(
            subject,
            &[
                message(1, ChangeKind::Snapshot),
                message(2, ChangeKind::Patch),
            ],
        )
        .await
        .expect("the first publisher");
        // The subject is no longer empty: the blind one's document is refused.
        assert!(
            matches!(
                blind
                    .publish(subject, &[message(5, ChangeKind::Snapshot)])
                    .await,
                Err(BrokerError::Overtaken(_))
            ),
            "{fence:?}: a publish expecting an empty subject"
        );
        // The new holder reads 2 back and continues: 3, 4.
        assert_eq!(new.last(subject, s).await.expect("last"), at(2));
        new.publish(
            subject,
            &[message(3, ChangeKind::Patch), message(4, ChangeKind::Patch)],
        )
        .await
        .expect("the new holder");
        // The old holder's late batch (its line had jumped to a snapshot at 6) is refused:
        // nothing of it lands after 4.
        let late = [
            message(6, ChangeKind::Snapshot),
            message(7, ChangeKind::Patch),
        ];
        match old.publish(subject, &late).await {
            Err(BrokerError::Overtaken(why)) => assert!(why.contains(subject), "{why}"),
            other => panic!("{fence:?}: the stale batch was not fenced off: {other:?}"),
        }
        let stored = jetstream_messages(&nats.url(), "FENCE", subject).await;
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq()).collect();
        if fence == Fence::Every {
            assert_eq!(seqs, [1, 2, 3, 4], "{fence:?}");
        } else {
            // Pipelined: only the batch's first message carries the fence, so the rest of a
            // stale batch may land (what `Fence::Every` is for, in a cluster).
            assert_eq!(seqs[..4], [1, 2, 3, 4], "{fence:?}");
        }
        // Read back, the old publisher continues after the subject's last message.
        let last = old.last(subject, s).await.expect("last");
        let next = last.map_or(1, |p| p.seq + 1);
        old.publish(subject, &[message(next, ChangeKind::Snapshot)])
            .await
            .expect("after reading the line back");
        let stored = jetstream_messages(&nats.url(), "FENCE", subject).await;
        assert_eq!(stored.last().map(|m| m.seq()), Some(next));
    }
    // A duplicate is acknowledged with the original's sequence, and the next message is fenced
    // on it: a publisher that re-sends what the subject holds, after someone else wrote past
    // it, is refused rather than landing after the other's line.
    let message = |seq, kind| message("dup", seq, kind);
    let old = Nats::connect(settings.clone(), subjects.clone(), SOON, Fence::Every);
    let new = Nats::connect(settings.clone(), subjects.clone(), SOON, Fence::Every);
    assert_eq!(new.last("fence.dup", "dup").await.expect("last"), None);
    assert_eq!(old.last("fence.dup", "dup").await.expect("last"), None);
    old.publish("fence.dup", &[message(1, ChangeKind::Snapshot)])
        .await
        .expect("1");
    assert_eq!(new.last("fence.dup", "dup").await.expect("last"), at(1));
    old.publish("fence.dup", &[message(5, ChangeKind::Snapshot)])
        .await
        .expect("5");
    // `new` re-sends 1 (JetStream answers it as a duplicate, with 1's sequence), then 2 fenced
    // on 1: refused, 5 is there.
    let answer = new
        .publish(
            "fence.dup",
            &[
                message(1, ChangeKind::Snapshot),
                message(2, ChangeKind::Patch),
            ],
        )
        .await;
    assert!(
        matches!(answer, Err(BrokerError::Overtaken(_))),
        "{answer:?}"
    );
    let stored = jetstream_messages(&nats.url(), "FENCE", "fence.dup").await;
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq()).collect();
    assert_eq!(seqs, [1, 5]);
}

/// A message over the NATS server's `max_payload` is never published cut or skipped: the sink
/// retries it, says why in `/streams` and counts it (`patchwire_broker_oversized_total`); once
/// its queue is past `buffer`, it resyncs with the current document, which goes out when it
/// fits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_payload_is_retried_shown_and_covered_by_a_later_snapshot() {
    let Some(nats) = NatsServer::start_with("max_payload: 4096\n") else {
        return;
    };
    let config = format!(
        r#"
[push]
token = "{TOKEN}"

[[streams]]
name = "board"
source = "push"

[[sinks.nats]]
url = "{nats}"
timeout = "1s"
buffer = 2
"#,
        nats = nats.url()
    );
    let app = TestApp::from_toml(&config).await;
    let base = app.url("");
    let base = base.trim_end_matches('/');
    let small = json!({"items": [], "note": "x".repeat(100)});
    assert_eq!(push(base, reqwest::Method::POST, small).await, 200);
    wait_acknowledged(base, "board", SOON).await;
    // A change of 6 KB: its patch is over the server's limit.
    let big = json!([{"op": "add", "path": "/items/-", "value": "y".repeat(6000)}]);
    assert_eq!(push(base, reqwest::Method::PATCH, big).await, 200);
    let deadline = tokio::time::Instant::now() + SOON;
    let sink = loop {
        let sink = sink_positions(base, "board").await.remove(0);
        if sink["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("max_payload"))
        {
            break sink;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sink:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        sink["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("board:") && e.contains("4096 bytes")),
        "{sink:#}"
    );
    assert!(app.metric("patchwire_broker_oversized_total").await >= 1.0);
    // The document shrinks again; past `buffer` queued messages the sink resyncs with it.
    for body in [
        json!([{"op": "remove", "path": "/items/0"}]),
        json!([{"op": "replace", "path": "/note", "value": "z"}]),
        json!([{"op": "add", "path": "/items/-", "value": 1}]),
    ] {
        assert_eq!(push(base, reqwest::Method::PATCH, body).await, 200);
    }
    let expected = json_view(base, "board").await;
    let nats_url = nats.url();
    let line = line_reaching("board", "NATS", &expected, || {
        jetstream_messages(&nats_url, "PATCHWIRE", "patchwire.board")
    })
    .await;
    assert!(line.snapshots_after_first >= 1, "{line:?}");
    assert!(
        !line.seqs.contains(&2),
        "the oversized change was never published: {line:?}"
    );
}

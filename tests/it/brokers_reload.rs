//! Broker sinks changed by a configuration reload of a running `patchwire` process (SIGHUP),
//! against real `nats-server -js` and `redis-server`, read after each reload by consumers
//! that know nothing of patchwire's code (a JetStream pull consumer and `XREAD`): sinks
//! added, changed and removed, streams added and removed, a view published, and a broker that
//! cannot be reached at the reload.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::brokers::{Line, jetstream_messages, rebuild, redis_entries};
use crate::support::nats::NatsServer;
use crate::support::process::Process;
use crate::support::redis::RedisServer;
use crate::support::*;

const TOKEN: &str = "push-token-0123456789";

/// The push streams `names` (`board` with a view `red` of its red items), the push token,
/// and `sinks`.
fn config(names: &[&str], sinks: &str) -> String {
    config_with(names, sinks, "red")
}

/// [`config`], the view `red` keeping the items of `color`.
fn config_with(names: &[&str], sinks: &str, color: &str) -> String {
    let mut toml =
        format!("[server]\nshutdown_grace = \"1s\"\n\n[push]\ntoken = \"{TOKEN}\"\n\n{sinks}\n");
    for name in names {
        toml.push_str(&format!(
            "[[streams]]\nname = \"{name}\"\nsource = \"push\"\nhistory = 1000\n"
        ));
        if *name == "board" {
            toml.push_str(&format!(
                "[streams.filtering]\nentities = \"/items\"\nkey = \"i\"\n\
                 aliases = {{ color = \"color\" }}\n\
                 [[streams.views]]\nname = \"red\"\nfilter = {{ color = \"{color}\" }}\n",
            ));
        }
    }
    toml
}

/// A Redis sink `name` writing `{prefix}:{stream}`, publishing `streams` (all: `None`).
fn redis_sink(name: &str, url: &str, prefix: &str, streams: Option<&str>) -> String {
    let streams = streams.map_or(String::new(), |s| format!("streams = {s}\n"));
    format!(
        "[[sinks.redis]]\nname = \"{name}\"\nurl = \"{url}\"\nkey = \"{prefix}:{{stream}}\"\n\
         view_key = \"{prefix}:{{stream}}@{{view}}\"\ntimeout = \"1s\"\n{streams}\n"
    )
}

/// The NATS sink `n`, publishing every stream.
fn nats_sink(url: &str) -> String {
    format!("[[sinks.nats]]\nname = \"n\"\nurl = \"{url}\"\ntimeout = \"1s\"\n\n")
}

async fn push(process: &Process, name: &str, method: reqwest::Method, body: Value) {
    let status = reqwest::Client::new()
        .request(method, process.url(&format!("/streams/{name}")))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("push")
        .status();
    assert!(status.is_success(), "push to {name}: {status}");
}

/// Adds item `i` (red when even) to stream `name`.
async fn add_item(process: &Process, name: &str, i: u64) {
    let color = if i.is_multiple_of(2) { "red" } else { "blue" };
    push(
        process,
        name,
        reqwest::Method::PATCH,
        json!([{"op": "add", "path": "/items/-", "value": {"i": i, "color": color}}]),
    )
    .await;
}

async fn document(process: &Process, path: &str) -> Value {
    reqwest::Client::new()
        .get(process.url(path))
        .header("accept", "application/json")
        .send()
        .await
        .expect("json view")
        .json()
        .await
        .expect("json")
}

async fn listing(process: &Process) -> Value {
    reqwest::get(process.url("/streams"))
        .await
        .expect("listing")
        .json()
        .await
        .expect("json")
}

/// Every sink entry of `/streams`, across streams.
async fn sink_entries(process: &Process) -> Vec<Value> {
    listing(process).await["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .flat_map(|s| s["sinks"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Waits until the publishers of `sinks` for `name` (a stream, or `stream@view`) have the
/// broker acknowledge what they follow, and nothing is queued; returns their entries.
async fn settled(process: &Process, name: &str, sinks: &[&str]) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (stream, view) = name
        .split_once('@')
        .map_or((name, None), |(s, v)| (s, Some(v)));
    loop {
        let list = listing(process).await;
        let entry = list["streams"]
            .as_array()
            .expect("streams")
            .iter()
            .find(|s| s["name"] == stream)
            .cloned()
            .unwrap_or_else(|| panic!("no stream {stream}: {list}"));
        let top = format!("{stream}:{}:{}", entry["epoch"], entry["seq"]);
        let mine: Vec<Value> = entry["sinks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| sinks.contains(&s["sink"].as_str().unwrap_or_default()))
            .filter(|s| s["view"].as_str() == view)
            .cloned()
            .collect();
        let done = mine.len() == sinks.len()
            && mine.iter().all(|s| {
                s["state"] == "publishing"
                    && s["queued"] == 0
                    && s["lag"] == 0
                    // A view's line ends at its own last change, not the stream's.
                    && (view.is_some() || s["acknowledged"] == json!(top))
            });
        if done {
            return mine;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sinks {sinks:?} of {name} did not settle: {mine:#?}\nlog:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn checked(name: &str, broker: &str, messages: &[crate::support::brokers::Received]) -> Line {
    rebuild(name, messages).unwrap_or_else(|problem| {
        panic!("{broker}'s line of {name} is broken: {problem}\n{messages:#?}")
    })
}

/// What a consumer of Redis key `key` rebuilds of `name`.
async fn from_redis(redis: &RedisServer, key: &str, name: &str) -> Line {
    checked(name, key, &redis_entries(&redis.url(), key).await)
}

/// What a JetStream consumer of `patchwire.{stream}` rebuilds.
async fn from_nats(nats: &NatsServer, stream: &str) -> Line {
    let subject = format!("patchwire.{stream}");
    checked(
        stream,
        &subject,
        &jetstream_messages(&nats.url(), "PATCHWIRE", &subject).await,
    )
}

/// Sends SIGHUP and returns the reload's answer, read from the log.
async fn hangup(process: &Process) -> Value {
    const ANSWERED: &str = "SIGHUP: reload answered";
    let before = process.log().matches(ANSWERED).count();
    process.hangup();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = process.log();
        if let Some(line) = log.lines().filter(|l| l.contains(ANSWERED)).nth(before) {
            // The answer is the JSON object that ends the line (after terminal colours).
            let answer = line
                .find("{\"")
                .map(|at| line[at..].trim())
                .unwrap_or_else(|| panic!("no answer in {line:?}"));
            return serde_json::from_str(answer)
                .unwrap_or_else(|e| panic!("the answer {answer:?} is not JSON: {e}"));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload did not answer within 10 s (it must not hang); the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The answer's line for sink `name`.
fn sink_answer<'a>(answer: &'a Value, name: &str) -> &'a Value {
    answer["sinks"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["sink"] == name))
        .unwrap_or_else(|| panic!("no sink {name} in {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_add_change_and_remove_sinks_and_streams_and_consumers_rebuild_every_document() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // At start: `board` (and its view `red`) and `gone`; the Redis sink `r` publishes
    // `board` and its view, the NATS sink every stream.
    let r = |prefix: &str| redis_sink("r", &redis.url(), prefix, Some(r#"["board", "board@red"]"#));
    let first = format!("{}{}", r("one"), nats_sink(&nats.url()));
    let process = Process::start(dir.path(), &config(&["board", "gone"], &first)).await;
    push(
        &process,
        "board",
        reqwest::Method::POST,
        json!({"items": []}),
    )
    .await;
    push(
        &process,
        "gone",
        reqwest::Method::POST,
        json!({"items": []}),
    )
    .await;
    for i in 0..6 {
        add_item(&process, "board", i).await;
    }
    settled(&process, "board", &["r", "n"]).await;
    settled(&process, "board@red", &["r"]).await;
    let r_before = settled(&process, "board", &["r"]).await;
    // (The first changes of a small document go out whole: their patches are larger.)
    let nats_before = from_nats(&nats, "board").await;

    // 1. A stream added (the NATS sink, publishing every stream, starts again with its new
    // subject; `r` does not publish it and is untouched) and a sink added for it.
    let second = format!(
        "{first}{}",
        redis_sink("extra", &redis.url(), "two", Some(r#"["fresh"]"#))
    );
    let answer = hangup(&process).await;
    assert_eq!(
        answer["changed"], false,
        "the file did not change yet: {answer}"
    );
    process.rewrite(&config(&["board", "gone", "fresh"], &second));
    let answer = hangup(&process).await;
    assert_eq!(answer["reloaded"], true, "{answer}");
    assert_eq!(sink_answer(&answer, "r")["change"], "unchanged", "{answer}");
    assert_eq!(sink_answer(&answer, "n")["change"], "restarted", "{answer}");
    assert_eq!(sink_answer(&answer, "extra")["change"], "added", "{answer}");
    assert_eq!(sink_answer(&answer, "extra")["started"], json!(["fresh"]));
    // `r` kept its publishers: their counts go on, not from zero.
    let r_after = settled(&process, "board", &["r"]).await;
    assert_eq!(
        r_after[0]["acknowledged_messages"], r_before[0]["acknowledged_messages"],
        "{r_after:?}"
    );
    push(
        &process,
        "fresh",
        reqwest::Method::POST,
        json!({"items": []}),
    )
    .await;
    for i in 6..10 {
        add_item(&process, "board", i).await;
        add_item(&process, "fresh", i).await;
    }
    settled(&process, "board", &["r", "n"]).await;
    settled(&process, "fresh", &["n", "extra"]).await;
    settled(&process, "gone", &["n"]).await;
    let board = document(&process, "/streams/board").await;
    let fresh = document(&process, "/streams/fresh").await;
    assert_eq!(
        from_redis(&redis, "one:board", "board").await.document,
        Some(board.clone())
    );
    assert_eq!(
        from_nats(&nats, "board").await.document,
        Some(board.clone())
    );
    assert_eq!(
        from_nats(&nats, "fresh").await.document,
        Some(fresh.clone())
    );
    assert_eq!(
        from_redis(&redis, "two:fresh", "fresh").await.document,
        Some(fresh.clone())
    );
    let red = document(&process, "/streams/board@red").await;
    assert_eq!(
        from_redis(&redis, "one:board@red", "board@red")
            .await
            .document,
        Some(red.clone()),
        "the view's publisher kept following it"
    );
    // Restarting the NATS sink cost no gap and no snapshot: it read the broker back and
    // went on with patches.
    let line = from_nats(&nats, "board").await;
    assert_eq!(
        line.snapshots_after_first, nats_before.snapshots_after_first,
        "{line:?}"
    );
    assert_eq!(line.duplicates, 0, "{line:?}");

    // 2. A stream removed, a sink removed, and a sink changed (another key: its publishers
    // start again, on the new key, from the current documents).
    let third = format!("{}{}", r("moved"), nats_sink(&nats.url()));
    process.rewrite(&config(&["board", "fresh"], &third));
    let answer = hangup(&process).await;
    assert_eq!(answer["reloaded"], true, "{answer}");
    assert_eq!(
        sink_answer(&answer, "extra")["change"],
        "removed",
        "{answer}"
    );
    // A new key is each publisher's own setting: they start again, the broker connection
    // stays.
    let r_answer = sink_answer(&answer, "r");
    assert_eq!(r_answer["change"], "updated", "{answer}");
    assert_eq!(
        r_answer["stopped"],
        json!(["board", "board@red"]),
        "{answer}"
    );
    assert_eq!(
        r_answer["started"],
        json!(["board", "board@red"]),
        "{answer}"
    );
    for i in 10..14 {
        add_item(&process, "board", i).await;
        add_item(&process, "fresh", i).await;
    }
    settled(&process, "board", &["r", "n"]).await;
    settled(&process, "board@red", &["r"]).await;
    settled(&process, "fresh", &["n"]).await;
    let entries = sink_entries(&process).await;
    assert!(
        entries.iter().all(|s| s["sink"] != "extra"),
        "the removed sink is gone: {entries:#?}"
    );
    let board = document(&process, "/streams/board").await;
    let fresh = document(&process, "/streams/fresh").await;
    let red = document(&process, "/streams/board@red").await;
    assert_eq!(
        from_redis(&redis, "moved:board", "board").await.document,
        Some(board.clone())
    );
    assert_eq!(
        from_redis(&redis, "moved:board@red", "board@red")
            .await
            .document,
        Some(red)
    );
    assert_eq!(
        from_nats(&nats, "board").await.document,
        Some(board.clone())
    );
    assert_eq!(
        from_nats(&nats, "fresh").await.document,
        Some(fresh.clone())
    );
    // The removed sink and the old key got nothing more.
    assert_ne!(
        from_redis(&redis, "two:fresh", "fresh").await.document,
        Some(fresh)
    );
    assert_ne!(
        from_redis(&redis, "one:board", "board").await.document,
        Some(board)
    );

    // 3. A sink whose broker cannot be reached: the reload does not hang, applies, says so;
    // the sink shows its error in `/readyz` and retries.
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let fourth = format!("{third}{}", redis_sink("dead", &dead, "d", None));
    process.rewrite(&config(&["board", "fresh"], &fourth));
    let started = std::time::Instant::now();
    let answer = hangup(&process).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(answer["reloaded"], true, "{answer}");
    let dead_answer = sink_answer(&answer, "dead");
    assert_eq!(dead_answer["change"], "added", "{answer}");
    assert!(
        !dead_answer["errors"].as_array().unwrap().is_empty(),
        "the answer says the broker failed: {answer}"
    );
    let ready: Value = reqwest::get(process.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dead_states: Vec<&Value> = ready["checks"]["brokers"]["sinks"]
        .as_array()
        .expect("brokers in /readyz")
        .iter()
        .filter(|s| s["sink"] == "dead")
        .collect();
    assert!(!dead_states.is_empty(), "{ready}");
    assert!(
        dead_states.iter().all(|s| s["state"] != "publishing"),
        "{ready}"
    );
    // The other sinks go on.
    add_item(&process, "board", 14).await;
    settled(&process, "board", &["r", "n"]).await;
}

/// A view's filter changed: its publisher follows the new view. Then removing every sink stops
/// them all, and the view they published is released (no subscriber left: `/streams` shows
/// none on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_view_is_followed_and_removing_every_sink_releases_it() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sinks = redis_sink("r", &redis.url(), "k", Some(r#"["board", "board@red"]"#));
    let process = Process::start(dir.path(), &config(&["board"], &sinks)).await;
    push(
        &process,
        "board",
        reqwest::Method::POST,
        json!({"items": []}),
    )
    .await;
    add_item(&process, "board", 0).await;
    settled(&process, "board@red", &["r"]).await;
    // The subscribers of the view `red` (none: not active).
    let watching = |list: &Value| {
        list["streams"][0]["views"]["active"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == "board@red")
            .map_or(0, |v| v["subscribers"].as_u64().unwrap_or(0))
    };
    assert_eq!(
        watching(&listing(&process).await),
        1,
        "the sink follows the view"
    );

    // The view's filter changes: the stream's views are replaced, and the sink's publisher of
    // the view starts again on the new one (its other publisher is untouched).
    process.rewrite(&config_with(&["board"], &sinks, "blue"));
    let answer = hangup(&process).await;
    assert_eq!(answer["reloaded"], true, "{answer}");
    let r = sink_answer(&answer, "r");
    assert_eq!(r["stopped"], json!(["board@red"]), "{answer}");
    assert_eq!(r["started"], json!(["board@red"]), "{answer}");
    add_item(&process, "board", 1).await;
    add_item(&process, "board", 3).await;
    settled(&process, "board@red", &["r"]).await;
    let blue = document(&process, "/streams/board@red").await;
    assert_eq!(
        from_redis(&redis, "k:board@red", "board@red")
            .await
            .document,
        Some(blue.clone()),
        "the consumer rebuilds the new view"
    );
    assert_eq!(blue["items"].as_array().map(Vec::len), Some(2), "{blue}");
    assert_eq!(
        watching(&listing(&process).await),
        1,
        "the sink follows the new view"
    );
    process.rewrite(&config(&["board"], ""));
    let answer = hangup(&process).await;
    assert_eq!(answer["reloaded"], true, "{answer}");
    assert_eq!(sink_answer(&answer, "r")["change"], "removed", "{answer}");
    let list = listing(&process).await;
    assert!(list["streams"][0].get("sinks").is_none(), "{list}");
    let ready: Value = reqwest::get(process.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(ready["checks"].get("brokers").is_none(), "{ready}");
    let entries_before = redis_entries(&redis.url(), "k:board").await.len();
    add_item(&process, "board", 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        redis_entries(&redis.url(), "k:board").await.len(),
        entries_before,
        "nothing published after the sink was removed"
    );
    assert_eq!(
        watching(&listing(&process).await),
        0,
        "the view was released with the sink"
    );
}

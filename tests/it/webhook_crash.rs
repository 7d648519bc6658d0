//! The crash test: the real binary with a backlog in flight to a slow receiver is killed with
//! SIGKILL and restarted on the same database; every change it had accepted still arrives, in
//! order per stream, with duplicates only as redeliveries of the same `webhook-id`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::support::*;
use crate::webhook::{SECRET, rebuild, unique};

const PAD: &str = "a field long enough that small patches stay smaller than the document itself";

fn spawn_binary(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_patchwire"))
        .args(["run", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the patchwire binary starts")
}

/// `kill -KILL pid` (std's `Child::kill` also sends SIGKILL on Unix: the fallback when the
/// `kill` program is missing).
fn sigkill(child: &mut Child) {
    match Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
    {
        Ok(status) => assert!(status.success(), "kill -KILL failed: {status}"),
        Err(_) => child.kill().unwrap(),
    }
    child.wait().unwrap();
}

/// Every delivery the outbox holds: webhook-id → (epoch, seq, state).
fn stored(db: &Path) -> BTreeMap<String, (i64, i64, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut statement = conn
        .prepare("SELECT msg_id, epoch, seq, state FROM deliveries")
        .unwrap();
    statement
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?)))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_a_backlog_in_flight_loses_nothing() {
    let upstream = Arc::new(MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await);
    let receiver = Receiver::start(&[SECRET]).await;
    // Slower than changes arrive: a backlog builds up in the outbox.
    receiver.set_delay(Duration::from_millis(150));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let config = dir.path().join("patchwire.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
shutdown_grace = "1s"

[log]
level = "warn"

[[streams]]
name = "fleet"
url = "{upstream}"
interval = "100ms"

[webhooks]
database = "{db}"
allow_private_targets = true
schedule = ["0s", "100ms", "200ms", "400ms", "800ms", "1s", "1s", "1s", "1s", "1s"]
jitter = 0.0
attempt_timeout = "5s"

[[webhooks.endpoints]]
id = "crash"
url = "{receiver}"
streams = ["fleet"]
secret = "{SECRET}"
"#,
            upstream = upstream.url(),
            db = db.display(),
            receiver = receiver.url(),
        ),
    )
    .unwrap();

    // The upstream changes every 50 ms until told to stop.
    let stop_changes = tokio_util::sync::CancellationToken::new();
    let changer = {
        let stop = stop_changes.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.is_cancelled() {
                n += 1;
                upstream.update(|d| {
                    d["n"] = json!(n);
                    d["items"].as_array_mut().unwrap().push(json!({"id": n}));
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n
        })
    };

    let mut first = spawn_binary(&config, &dir.path().join("first.log"));
    receiver
        .wait_for(
            Duration::from_secs(30),
            "ten deliveries before the kill",
            |h| h.len() >= 10,
        )
        .await;
    // Kill while a backlog is pending in the outbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pending = stored(&db)
            .values()
            .filter(|(_, _, state)| *state == 0)
            .count();
        if pending >= 5 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no backlog built up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigkill(&mut first);
    let accepted_before_kill = stored(&db);
    let pending_at_kill = accepted_before_kill
        .values()
        .filter(|(_, _, s)| *s == 0)
        .count();
    assert!(
        pending_at_kill >= 5,
        "the kill happened with {pending_at_kill} pending"
    );

    let mut second = spawn_binary(&config, &dir.path().join("second.log"));
    // Let the second process accept some changes of its own, then let everything drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_changes.cancel();
    changer.await.unwrap();
    receiver.set_delay(Duration::ZERO);
    let final_document = upstream.document();
    let hits = receiver
        .wait_for(Duration::from_secs(60), "the final document", |hits| {
            let mut seen = BTreeSet::new();
            let unique: Vec<Hit> = hits
                .iter()
                .filter(|h| h.status == 200 && seen.insert(h.id()))
                .cloned()
                .collect();
            !unique.is_empty() && rebuild(&unique) == final_document
        })
        .await;
    sigkill(&mut second);

    // Every change accepted before the kill arrived.
    let received: BTreeSet<String> = hits
        .iter()
        .filter(|h| h.status == 200)
        .map(Hit::id)
        .collect();
    let missing: Vec<_> = accepted_before_kill
        .iter()
        .filter(|(id, (_, _, state))| *state != 3 && !received.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "accepted but never delivered: {missing:?}"
    );
    // Duplicates are only redeliveries of the same message: one id per (epoch, seq, type).
    let mut ids: HashMap<(u64, u64, String), BTreeSet<String>> = HashMap::new();
    for h in &hits {
        ids.entry((
            h.body["epoch"].as_u64().unwrap(),
            h.seq(),
            h.kind().to_owned(),
        ))
        .or_default()
        .insert(h.id());
    }
    assert!(
        ids.values().all(|set| set.len() == 1),
        "the same change under two ids: {ids:?}"
    );
    // In order: the first arrival of each message rebuilds the document through an unbroken
    // chain of patches (`rebuild` checks every base), across both epochs.
    let mut seen = BTreeSet::new();
    let unique: Vec<Hit> = hits
        .iter()
        .filter(|h| h.status == 200 && seen.insert(h.id()))
        .cloned()
        .collect();
    assert_eq!(rebuild(&unique), final_document);
    let epochs: BTreeSet<u64> = unique
        .iter()
        .map(|h| h.body["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs.len(), 2, "deliveries from both processes");
    eprintln!(
        "crash test: {} accepted before the kill ({pending_at_kill} pending), {} requests, {} unique",
        accepted_before_kill.len(),
        hits.len(),
        unique.len()
    );
    assert!(unique.iter().all(|h| !h.verified_by.is_empty()));
}

const OPERATOR_SECRET: &str = "whsec_0xXHqonBMVzu3z/Rlbzy8GzLrlBTZ5PvjXNmZKPqORI=";

/// Every stored operational event: webhook-id → (state, attempts); none while the process
/// has not made its schema yet.
async fn operator_events(store: &TestStore) -> BTreeMap<String, (i64, i64)> {
    let Some(url) = store.postgres_url() else {
        let path = store.sqlite_path();
        if !path.exists() {
            return BTreeMap::new();
        }
        let conn = rusqlite::Connection::open(path).unwrap();
        let Ok(mut statement) = conn.prepare("SELECT msg_id, state, attempts FROM operator_events")
        else {
            return BTreeMap::new();
        };
        return statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?))))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    };
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let Ok(rows) = client
        .query(
            "SELECT msg_id, state, attempts FROM patchwire_operator_events",
            &[],
        )
        .await
    else {
        return BTreeMap::new();
    };
    rows.iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (i64::from(r.get::<_, i16>(1)), i64::from(r.get::<_, i32>(2))),
            )
        })
        .collect()
}

/// An operational event survives a SIGKILL: an endpoint is disabled (its receiver answers
/// 410) while the operator URL is down; the process is killed, restarted on the same
/// database, and the operator comes up: the event arrives exactly once by `webhook-id`,
/// signed (verified by the independent library), the same message as stored before the kill.
async fn sigkill_keeps_an_undelivered_operator_event(store: TestStore) {
    let upstream = Arc::new(MockUpstream::start(json!({"n": 0, "pad": PAD})).await);
    let receiver = Receiver::start(&[SECRET]).await;
    receiver.script([Reply::Status(410, None)]);
    // The operator's address, with nothing listening yet: the operator is down.
    let operator_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("patchwire.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
shutdown_grace = "1s"

[log]
level = "warn"

[[streams]]
name = "fleet"
url = "{upstream}"
interval = "100ms"

[webhooks]
{store}allow_private_targets = true
schedule = ["0s", "200ms", "500ms", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]
jitter = 0.0
attempt_timeout = "2s"
operator_url = "http://{operator_addr}/ops"
operator_secret = "{OPERATOR_SECRET}"

[[webhooks.endpoints]]
id = "gone"
url = "{receiver}"
streams = ["fleet"]
secret = "{SECRET}"
"#,
            upstream = upstream.url(),
            store = store.toml(),
            receiver = receiver.url(),
        ),
    )
    .unwrap();
    let mut first = Killed(spawn_binary(&config, &dir.path().join("first.log")));
    // The event is stored, and its first attempts failed (nothing listens).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let events = operator_events(&store).await;
        if events.values().any(|(_, attempts)| *attempts >= 2) {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no operator event stored and tried: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stored.len(), 1, "{stored:?}");
    let (stored_id, (state, _)) = stored.iter().next().unwrap();
    assert_eq!(*state, 0, "not delivered before the kill");
    sigkill(&mut first.0);

    let _second = Killed(spawn_binary(&config, &dir.path().join("second.log")));
    let operator = Receiver::start_at(operator_addr, &[OPERATOR_SECRET]).await;
    operator
        .wait_for(
            Duration::from_secs(30),
            "the endpoint.disabled event",
            |hits| hits.iter().any(|h| h.kind() == "endpoint.disabled"),
        )
        .await;
    // Give a duplicate time to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hits = operator.hits();
    let ids: BTreeSet<String> = hits.iter().map(Hit::id).collect();
    assert_eq!(
        ids.iter().collect::<Vec<_>>(),
        [stored_id],
        "exactly once, as stored before the kill: {:?}",
        hits.iter().map(|h| h.body.clone()).collect::<Vec<_>>()
    );
    assert!(hits.iter().all(|h| !h.verified_by.is_empty()), "unsigned");
    let event = &hits[0];
    assert_eq!(event.body["schema"], "patchwire.operator.v1");
    assert_eq!(event.body["data"]["endpoint"], "gone");
    assert!(
        event.body["data"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("410"),
        "{}",
        event.body
    );
    // Recorded as delivered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while operator_events(&store).await.get(stored_id).map(|e| e.0) != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not recorded as delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

crate::on_both_stores!(sigkill_keeps_an_undelivered_operator_event);

/// A failing upstream is told once: the stream starts failing, its endpoint gets its
/// `stream.error`; the process is killed with SIGKILL and restarted on the same database while
/// the upstream still fails (the new process sees the failure as new); the endpoint gets no
/// second `stream.error`, and one `stream.recovered` when the upstream answers again, before
/// the change it brings. Signed (verified by the independent library).
async fn sigkill_while_failing_tells_the_failure_once(store: TestStore) {
    let upstream = Arc::new(MockUpstream::start(json!({"n": 0, "pad": PAD})).await);
    let receiver = Receiver::start(&[SECRET]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("patchwire.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
shutdown_grace = "1s"

[log]
level = "warn"

[upstream.backoff]
initial = "100ms"
max = "200ms"

[[streams]]
name = "fleet"
url = "{upstream}"
interval = "100ms"

[webhooks]
{store}allow_private_targets = true
jitter = 0.0
attempt_timeout = "1s"
claim_timeout = "2s"

[[webhooks.endpoints]]
id = "watch"
url = "{receiver}"
streams = ["fleet"]
events = ["snapshots", "patches", "errors", "recoveries"]
secret = "{SECRET}"
"#,
            upstream = upstream.url(),
            store = store.toml(),
            receiver = receiver.url(),
        ),
    )
    .unwrap();
    let kinds = |hits: &[Hit]| {
        unique(hits)
            .iter()
            .map(|h| h.kind().to_owned())
            .collect::<Vec<_>>()
    };
    let mut first = Killed(spawn_binary(&config, &dir.path().join("first.log")));
    receiver
        .wait_for(Duration::from_secs(30), "the first document", |hits| {
            hits.iter().any(|h| h.kind() == "stream.snapshot")
        })
        .await;
    upstream.fail(Failure::Status(500, None));
    receiver
        .wait_for(Duration::from_secs(30), "the error", |hits| {
            hits.iter().any(|h| h.kind() == "stream.error")
        })
        .await;
    sigkill(&mut first.0);

    let polls = upstream.requests();
    let _second = Killed(spawn_binary(&config, &dir.path().join("second.log")));
    // The new process polls, fails, and would tell the failure as new.
    upstream
        .wait_for_requests(polls + 5, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        kinds(&receiver.hits()),
        ["stream.snapshot", "stream.error"],
        "told once, before and after the restart"
    );
    upstream.update(|d| d["n"] = json!(1));
    upstream.recover();
    let hits = receiver
        .wait_for(Duration::from_secs(30), "the recovery and n = 1", |hits| {
            let changes: Vec<Hit> = unique(hits)
                .into_iter()
                .filter(|h| h.kind() == "stream.snapshot" || h.kind() == "stream.patch")
                .collect();
            hits.iter().any(|h| h.kind() == "stream.recovered")
                && rebuild(&changes)["n"] == json!(1)
        })
        .await;
    assert!(hits.iter().all(|h| !h.verified_by.is_empty()), "unsigned");
    let kinds = kinds(&hits);
    assert_eq!(
        kinds.iter().filter(|k| *k == "stream.error").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| *k == "stream.recovered").count(),
        1,
        "{kinds:?}"
    );
    let at = |kind: &str| kinds.iter().position(|k| k == kind).unwrap();
    assert!(at("stream.error") < at("stream.recovered"), "{kinds:?}");
}

crate::on_both_stores!(sigkill_while_failing_tells_the_failure_once);

const PUSH_TOKEN: &str = "crash-push-token-0123456789";

/// Kills the process if the test fails before it does.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits until `GET /healthz` answers 200 (panics with the log after 30 s).
async fn healthy(child: &mut Child, base: &str, log: &Path) {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "patchwire exited with {status}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let up = client
            .get(format!("{base}/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if up {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz never answered:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn push(client: &reqwest::Client, base: &str, method: reqwest::Method, body: String) -> u16 {
    client
        .request(method, format!("{base}/streams/prices"))
        .bearer_auth(PUSH_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A push answered 2xx is durable: killed with SIGKILL the moment the answer arrives and
/// restarted on the same database, the receiver still gets the change (an unbroken, signed
/// chain of patches, no reset), and the push stream has its document back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_a_push_is_answered_loses_nothing() {
    let receiver = Receiver::start(&[SECRET]).await;
    // The receiver is slow: nothing but the outbox holds the last changes at the kill.
    receiver.set_delay(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let config = dir.path().join("patchwire.toml");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "1s"

[log]
level = "warn"

[push]
token = "{PUSH_TOKEN}"

[[streams]]
name = "prices"
source = "push"

[webhooks]
database = "{db}"
allow_private_targets = true
schedule = ["0s", "100ms", "200ms", "400ms", "800ms", "1s", "1s", "1s", "1s", "1s"]
jitter = 0.0

[[webhooks.endpoints]]
id = "crash"
url = "{receiver}"
streams = ["prices"]
secret = "{SECRET}"
"#,
            db = db.display(),
            receiver = receiver.url(),
        ),
    )
    .unwrap();
    let client = reqwest::Client::new();

    let first_log = dir.path().join("first.log");
    let mut first = Killed(spawn_binary(&config, &first_log));
    healthy(&mut first.0, &base, &first_log).await;
    let mut document = json!({"n": 0, "pad": PAD, "items": []});
    assert_eq!(
        push(&client, &base, reqwest::Method::POST, document.to_string()).await,
        200
    );
    for n in 1..=20 {
        let patch = json!([
            {"op": "replace", "path": "/n", "value": n},
            {"op": "add", "path": "/items/-", "value": {"id": n}},
        ]);
        let status = push(&client, &base, reqwest::Method::PATCH, patch.to_string()).await;
        assert_eq!(status, 200);
        json_patch::patch(
            &mut document,
            &serde_json::from_value::<json_patch::Patch>(patch).unwrap(),
        )
        .unwrap();
    }
    // The moment the last answer arrived.
    sigkill(&mut first.0);

    let second_log = dir.path().join("second.log");
    let mut second = Killed(spawn_binary(&config, &second_log));
    healthy(&mut second.0, &base, &second_log).await;
    let view: serde_json::Value = client
        .get(format!("{base}/streams/prices"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        view, document,
        "the push stream's document after the restart"
    );

    // One more change after the restart continues the chain (a patch on the restored seq).
    let patch = json!([{"op": "replace", "path": "/n", "value": 21}]);
    assert_eq!(
        push(&client, &base, reqwest::Method::PATCH, patch.to_string()).await,
        200
    );
    json_patch::patch(
        &mut document,
        &serde_json::from_value::<json_patch::Patch>(patch).unwrap(),
    )
    .unwrap();
    receiver.set_delay(Duration::ZERO);
    let unique_of = |hits: &[Hit]| -> Vec<Hit> {
        let mut seen = BTreeSet::new();
        hits.iter()
            .filter(|h| h.status == 200 && seen.insert(h.id()))
            .cloned()
            .collect()
    };
    let hits = receiver
        .wait_for(
            Duration::from_secs(60),
            "the change after the restart",
            |hits| unique_of(hits).iter().any(|h| h.seq() == 22),
        )
        .await;
    sigkill(&mut second.0);
    let unique = unique_of(&hits);
    // Every change, in order, each once: the chain rebuilds the document with every base
    // checked, all signed, and the only snapshot is the very first delivery.
    assert_eq!(rebuild(&unique), document);
    assert_eq!(
        unique.iter().map(Hit::seq).collect::<Vec<_>>(),
        (1..=22).collect::<Vec<u64>>()
    );
    let snapshots: Vec<u64> = unique
        .iter()
        .filter(|h| h.kind() == "stream.snapshot")
        .map(Hit::seq)
        .collect();
    assert_eq!(snapshots, vec![1], "a reset after the restart");
    assert!(unique.iter().all(|h| !h.verified_by.is_empty()));
}

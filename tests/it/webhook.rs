//! Webhooks end to end: the real application, a mock upstream that changes, and a receiver that
//! verifies every delivery with the independent `standardwebhooks` crate.

use std::sync::Arc;
use std::time::Duration;

use patchwire::sinks::webhook::body::{Format, Mode};
use patchwire::sinks::webhook::outbox::{
    AttemptFilter, AttemptOutcome, Claim, DeliveryFilter, DeliveryState, EndpointRecord,
    EndpointStatus, NewChange, Outbox, Source, Target,
};
use patchwire::sinks::webhook::registry::{Endpoint, Registry};
use patchwire::sinks::webhook::schedule::RetrySchedule;
use patchwire::sinks::webhook::worker::{FollowUp, Worker, WorkerSettings};
use serde_json::{Value, json};

use crate::support::raw::RawConnection;
use crate::support::*;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const TOKEN: &str = "test-admin-token-0123456789";
const LONG: Duration = Duration::from_secs(20);
/// Makes documents large enough that the hub publishes patches rather than snapshots.
const PAD: &str = "a long enough field so that small patches stay smaller than the document, \
                   which is when the hub publishes a patch rather than the whole document";

/// The `[webhooks]` table of these tests: the outbox in `dir`, private targets allowed, the admin
/// token, a fast retry schedule without jitter; `own` (TOML lines of more keys) over it.
pub fn webhooks_toml(store: &TestStore, own: &str) -> String {
    let start = format!(
        r#"
{}
allow_private_targets = true
admin_token = "{TOKEN}"
schedule = ["0s", "100ms", "200ms", "300ms", "400ms"]
jitter = 0.0
max_retry_after = "5s"
attempt_timeout = "500ms"
disable_after = "1h"
max_concurrency_per_endpoint = 4
workers = 16
retention = "1h"
rotation_overlap = "1h"
"#,
        store.toml()
    );
    format!("[webhooks]\n{}", over(&start, own))
}

/// A configured endpoint receiving `streams` at `url`, as `[[webhooks.endpoints]]`.
pub fn endpoint(id: &str, url: &str, streams: &[&str], mode: Mode) -> String {
    format!(
        r#"
[[webhooks.endpoints]]
id = "{id}"
url = "{url}"
streams = {streams}
mode = "{mode}"
secret = "{SECRET}"
[webhooks.endpoints.headers]
X-Tenant = "t1"
"#,
        streams = serde_json::to_string(streams).unwrap(),
        mode = mode.as_str(),
    )
}

/// Rebuilds the document from deliveries in arrival order, checking the patch chain: every
/// patch's `base_seq` is the sequence number the receiver holds. Returns the document.
pub fn rebuild(hits: &[Hit]) -> Value {
    let mut doc = Value::Null;
    let mut at: Option<(u64, u64)> = None;
    for hit in hits {
        assert!(
            !hit.verified_by.is_empty(),
            "unverified delivery {:?}",
            hit.body
        );
        let epoch = hit.body["epoch"].as_u64().unwrap();
        match hit.kind() {
            "stream.snapshot" => doc = hit.body["data"].clone(),
            "stream.patch" => {
                let base = hit.body["base_seq"].as_u64().unwrap();
                assert_eq!(
                    at,
                    Some((epoch, base)),
                    "a patch whose base the receiver lacks"
                );
                let patch: json_patch::Patch =
                    serde_json::from_value(hit.body["data"].clone()).unwrap();
                json_patch::patch(&mut doc, &patch).unwrap();
            }
            other => panic!("unknown type {other}"),
        }
        at = Some((epoch, hit.seq()));
    }
    doc
}

/// Deliveries of the same message again (retries) removed, keeping the first.
pub(crate) fn unique(hits: &[Hit]) -> Vec<Hit> {
    let mut seen = std::collections::HashSet::new();
    hits.iter()
        .filter(|h| seen.insert(h.id()))
        .cloned()
        .collect()
}

pub struct Admin {
    base: String,
    client: reqwest::Client,
}

impl Admin {
    pub fn new(app: &TestApp) -> Admin {
        Admin {
            base: app.url("/admin/webhooks"),
            client: reqwest::Client::new(),
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// The app polling `fleet` at `upstream`, with `[webhooks]` (`webhooks`: more of its keys) and
/// `endpoints` configured.
fn webhooks_app_toml(
    upstream: &MockUpstream,
    store: &TestStore,
    endpoints: &[String],
    webhooks: &str,
) -> String {
    format!(
        "{}{}{}",
        polled("fleet", &upstream.url()),
        webhooks_toml(store, webhooks),
        endpoints.concat()
    )
}

async fn start(
    upstream: &MockUpstream,
    store: &TestStore,
    endpoints: &[String],
    webhooks: &str,
) -> TestApp {
    TestApp::from_toml(&webhooks_app_toml(upstream, store, endpoints, webhooks)).await
}

/// Changes the upstream document `n` times, waiting each time until `receiver` has it.
async fn change_and_wait(upstream: &MockUpstream, receiver: &Receiver, from: i64, n: i64) {
    for i in from..from + n {
        upstream.update(|d| {
            d["n"] = json!(i);
            d["items"].as_array_mut().unwrap().push(json!({"id": i}));
        });
        receiver
            .wait_for(LONG, &format!("n = {i}"), |hits| {
                let accepted: Vec<Hit> = hits.iter().filter(|h| h.status < 300).cloned().collect();
                !accepted.is_empty() && rebuild(&unique(&accepted))["n"] == json!(i)
            })
            .await;
    }
}

async fn every_change_arrives_signed_in_order_as_patches_or_documents(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let patches = Receiver::start(&[SECRET]).await;
    let documents = Receiver::start(&[SECRET]).await;
    let app = start(
        &upstream,
        &store,
        &[
            endpoint("patches", &patches.url(), &["fleet"], Mode::Patch),
            endpoint("documents", &documents.url(), &["fleet"], Mode::Snapshot),
        ],
        "",
    )
    .await;
    change_and_wait(&upstream, &patches, 1, 15).await;
    let hits = patches.accepted();
    assert_eq!(rebuild(&hits), upstream.document());
    assert_eq!(hits[0].kind(), "stream.snapshot");
    assert!(
        hits[1..].iter().all(|h| h.kind() == "stream.patch"),
        "patch mode sends patches after the first snapshot"
    );
    // Headers: signature verified (above), custom header, JSON body with the documented fields.
    let first = &hits[0];
    assert_eq!(first.headers["x-tenant"], "t1");
    assert_eq!(first.headers["content-type"], "application/json");
    assert_eq!(first.body["schema"], "patchwire.webhook.v1");
    for key in [
        "type",
        "stream",
        "epoch",
        "seq",
        "base_seq",
        "timestamp",
        "data",
    ] {
        assert!(first.body.get(key).is_some(), "missing {key}");
    }
    assert_eq!(first.body["stream"], "fleet");
    let docs = documents
        .wait_for(LONG, "the last document", |hits| {
            hits.last()
                .is_some_and(|h| h.body["data"]["n"] == json!(15))
        })
        .await;
    assert!(
        docs.iter()
            .all(|h| h.kind() == "stream.snapshot" && !h.verified_by.is_empty())
    );
    let seqs: Vec<u64> = docs.iter().map(Hit::seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "documents in order: {seqs:?}"
    );
    app.stop().await;
}

async fn failures_timeouts_and_retry_after_are_retried_with_the_same_id(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    // Three failures, a hang past the attempt timeout, a 429 asking for 1 s, then success.
    receiver.script([
        Reply::Status(500, None),
        Reply::Status(503, None),
        Reply::Status(400, None),
        Reply::Delay(Duration::from_secs(2)),
        Reply::Status(429, Some("1")),
    ]);
    let app = start(
        &upstream,
        &store,
        &[endpoint("hook", &receiver.url(), &["fleet"], Mode::Patch)],
        r#"schedule = ["0s", "50ms", "50ms", "50ms", "50ms", "50ms", "50ms"]"#,
    )
    .await;
    let hits = receiver
        .wait_for(LONG, "six attempts", |hits| hits.len() >= 6)
        .await;
    let first_id = hits[0].id();
    let attempts: Vec<&Hit> = hits.iter().take(6).collect();
    assert_eq!(attempts.len(), 6);
    assert!(
        attempts.iter().all(|h| h.id() == first_id),
        "retries keep the webhook-id"
    );
    assert_eq!(
        attempts.iter().map(|h| h.status).collect::<Vec<_>>(),
        [500, 503, 400, 200, 429, 200]
    );
    // The hang was abandoned (the receiver answered 200 too late): the next attempt came anyway.
    // After the 429 with Retry-After: 1, the next attempt waited at least that long
    // (the schedule alone would have retried after 50 ms).
    assert!(
        attempts[5].at - attempts[4].at >= Duration::from_millis(950),
        "{:?}",
        attempts[5].at - attempts[4].at
    );
    // Later changes still arrive in order.
    change_and_wait(&upstream, &receiver, 1, 3).await;
    assert_eq!(rebuild(&unique(&receiver.accepted())), upstream.document());
    app.stop().await;
}

async fn gone_disables_the_endpoint_until_the_admin_api_re_enables_it(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    receiver.script([Reply::Status(410, None)]);
    let app = start(
        &upstream,
        &store,
        &[endpoint("hook", &receiver.url(), &["fleet"], Mode::Patch)],
        "",
    )
    .await;
    let admin = Admin::new(&app);
    receiver.wait_for(LONG, "the 410", |h| !h.is_empty()).await;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let (status, view) = admin.call("GET", "/hook", None).await;
        assert_eq!(status, 200);
        if view["disabled"].is_object() {
            assert!(
                view["disabled"]["reason"].as_str().unwrap().contains("410"),
                "{view}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never disabled: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Changes while disabled are not sent.
    upstream.update(|d| d["n"] = json!(1));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(receiver.hits().len(), 1);
    let (status, view) = admin
        .call("PATCH", "/hook", Some(json!({"disabled": false})))
        .await;
    assert_eq!((status, view["disabled"].clone()), (200, Value::Null));
    // Re-enabled: the pending delivery, then a snapshot of the current document.
    receiver
        .wait_for(LONG, "the current document after re-enabling", |hits| {
            hits.iter().filter(|h| h.status == 200).count() >= 1
                && rebuild(&unique(
                    &hits
                        .iter()
                        .filter(|h| h.status == 200)
                        .cloned()
                        .collect::<Vec<_>>(),
                ))["n"]
                    == json!(1)
        })
        .await;
    app.stop().await;
}

async fn a_dead_letter_is_listed_followed_by_a_snapshot_and_replayed_with_its_id(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    // Five attempts (the schedule's length), all failing: the first delivery goes dead.
    receiver.script((0..5).map(|_| Reply::Status(500, None)));
    let app = start(
        &upstream,
        &store,
        &[endpoint("hook", &receiver.url(), &["fleet"], Mode::Patch)],
        "",
    )
    .await;
    let admin = Admin::new(&app);
    let dead_id = receiver
        .wait_for(LONG, "five failures", |h| h.len() >= 5)
        .await[0]
        .id();
    let dead = loop {
        let (status, list) = admin.call("GET", "/hook/dead-letters", None).await;
        assert_eq!(status, 200);
        if let Some(d) = list["deliveries"]
            .as_array()
            .and_then(|a| a.first())
            .cloned()
        {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dead["webhook_id"], json!(dead_id));
    assert_eq!(dead["attempts"], json!(5));
    assert_eq!(dead["last_status"], json!(500));
    assert!(dead["last_error"].as_str().unwrap().contains("500"));
    // The attempts are counted by result.
    let attempts = |result: &'static str| {
        let app = &app;
        async move {
            app.metric(&format!(
                r#"patchwire_webhook_attempts_total{{endpoint="hook",result="{result}""#
            ))
            .await
        }
    };
    assert_eq!(attempts("Retrying").await, 4.0);
    assert_eq!(attempts("Dead").await, 1.0);
    assert!(app.metric("patchwire_webhook_attempt_seconds_count").await >= 5.0);
    // After the gap a snapshot arrives (never a patch without its base), then patches again.
    change_and_wait(&upstream, &receiver, 1, 3).await;
    let after: Vec<Hit> = receiver.accepted();
    assert_eq!(after[0].kind(), "stream.snapshot");
    assert_eq!(rebuild(&unique(&after)), upstream.document());
    // Replay the dead letter: the same message again.
    let (status, answer) = admin
        .call(
            "POST",
            &format!("/hook/deliveries/{}/replay", dead["id"]),
            None,
        )
        .await;
    assert_eq!((status, answer["replayed"].clone()), (202, json!(1)));
    receiver
        .wait_for(LONG, "the replayed message", |hits| {
            hits.iter()
                .filter(|h| h.status == 200 && h.id() == dead_id)
                .count()
                == 1
        })
        .await;
    // Replay by time: every dead letter since a time before the first one.
    let (status, answer) = admin
        .call(
            "POST",
            "/hook/replay",
            Some(json!({"since": "2000-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!((status, answer["replayed"].clone()), (202, json!(1)));
    let (status, answer) = admin
        .call("POST", "/hook/replay", Some(json!({"since": "yesterday"})))
        .await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("RFC 3339"));
    app.stop().await;
}

async fn runtime_endpoints_rotate_secrets_and_survive_restarts(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[]).await;
    let app = start(&upstream, &store, &[], "").await;
    let admin = Admin::new(&app);
    let (status, created) = admin
        .call(
            "POST",
            "",
            Some(json!({"url": receiver.url(), "streams": ["fleet"]})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let old = created["secret"].as_str().unwrap().to_owned();
    assert!(old.starts_with("whsec_"));
    receiver.add_secret(&old);
    // A new endpoint gets the current document at once.
    receiver
        .wait_for(LONG, "the first snapshot", |h| !h.is_empty())
        .await;
    // The secret is shown only at creation.
    let (_, shown) = admin.call("GET", &format!("/{id}"), None).await;
    assert!(shown.get("secret").is_none() && !shown.to_string().contains(&old));
    let (_, listed) = admin.call("GET", "", None).await;
    assert!(!listed.to_string().contains(&old));
    // Rotation: both signatures while the overlap lasts.
    let (status, rotated) = admin
        .call("POST", &format!("/{id}/rotate-secret"), None)
        .await;
    assert_eq!(status, 200);
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    receiver.add_secret(&new);
    change_and_wait(&upstream, &receiver, 1, 1).await;
    let last = receiver.hits().pop().unwrap();
    assert_eq!(
        last.verified_by,
        vec![0, 1],
        "signed with the old and the new secret"
    );
    app.stop().await;

    // Restart on the same database: the endpoint is still there and still delivers.
    let app = start(&upstream, &store, &[], "").await;
    let admin = Admin::new(&app);
    let (status, view) = admin.call("GET", &format!("/{id}"), None).await;
    assert_eq!(status, 200, "{view}");
    change_and_wait(&upstream, &receiver, 2, 1).await;
    // The format is part of the definition, shown and changed like the mode.
    assert_eq!(view["format"], "json");
    let (status, changed) = admin
        .call(
            "PATCH",
            &format!("/{id}"),
            Some(json!({"format": "cloudevents-binary"})),
        )
        .await;
    assert_eq!(
        (status, &changed["format"]),
        (200, &json!("cloudevents-binary"))
    );
    let (status, refused) = admin
        .call("PATCH", &format!("/{id}"), Some(json!({"format": "xml"})))
        .await;
    assert_eq!(status, 400, "{refused}");
    let (status, _) = admin.call("DELETE", &format!("/{id}"), None).await;
    assert_eq!(status, 204);
    let (status, _) = admin.call("GET", &format!("/{id}"), None).await;
    assert_eq!(status, 404);
    app.stop().await;
}

async fn the_admin_api_checks_its_token_and_its_input(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0})).await;
    let app = start(&upstream, &store, &[], "allow_private_targets = false").await;
    let client = reqwest::Client::new();
    let url = app.url("/admin/webhooks");
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    let wrong = client.get(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let admin = Admin::new(&app);
    for (body, needle) in [
        (
            json!({"url": "http://127.0.0.1:9/x", "streams": ["fleet"]}),
            "loopback",
        ),
        (
            json!({"url": "http://localhost:9/x", "streams": ["fleet"]}),
            "loopback",
        ),
        (
            json!({"url": "http://[::1]:9/x", "streams": ["fleet"]}),
            "loopback",
        ),
        (
            json!({"url": "http://10.1.2.3/x", "streams": ["fleet"]}),
            "private",
        ),
        (
            json!({"url": "http://192.168.0.10/x", "streams": ["fleet"]}),
            "private",
        ),
        (
            json!({"url": "http://169.254.169.254/latest/meta-data", "streams": ["fleet"]}),
            "metadata",
        ),
        (
            json!({"url": "http://169.254.1.1/x", "streams": ["fleet"]}),
            "link-local",
        ),
        (
            json!({"url": "http://[fe80::1]/x", "streams": ["fleet"]}),
            "link-local",
        ),
        (
            json!({"url": "ftp://example.com/x", "streams": ["fleet"]}),
            "http or https",
        ),
        (
            json!({"url": "http://203.0.113.5/x", "streams": ["nope"]}),
            "configured stream",
        ),
        (
            json!({"url": "http://203.0.113.5/x", "streams": []}),
            "at least one",
        ),
        (
            json!({"url": "http://203.0.113.5/x", "streams": ["fleet", "fleet"]}),
            "streams[1]: \"fleet\" is already listed at streams[0]",
        ),
        (
            json!({"url": "http://203.0.113.5/x", "streams": ["fleet"], "secret": "whsec_short"}),
            "secret",
        ),
        (
            json!({"url": "http://203.0.113.5/x", "streams": ["fleet"], "headers": {"webhook-id": "x"}}),
            "headers.webhook-id",
        ),
    ] {
        let (status, answer) = admin.call("POST", "", Some(body.clone())).await;
        assert_eq!(status, 422, "{body} -> {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let (status, answer) = admin.call("POST", "", Some(json!({"url": 5}))).await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = admin.call("GET", "/ep_missing", None).await;
    assert_eq!(status, 404);
    app.stop().await;
}

async fn redirects_are_never_followed(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    receiver.script([Reply::Redirect]);
    let app = start(
        &upstream,
        &store,
        &[endpoint("hook", &receiver.url(), &["fleet"], Mode::Patch)],
        "",
    )
    .await;
    let hits = receiver
        .wait_for(LONG, "the retry after the redirect", |h| h.len() >= 2)
        .await;
    assert_eq!(hits[0].status, 302);
    assert!(
        hits.iter().all(|h| h.path == "/hook"),
        "the redirect was followed"
    );
    assert_eq!(hits[0].id(), hits[1].id());
    app.stop().await;
}

async fn without_a_token_the_admin_api_is_disabled_and_without_webhooks_absent(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0})).await;
    // `[webhooks]` without `admin_token`.
    let app = TestApp::from_toml(&format!(
        "{}[webhooks]\n{}",
        polled("fleet", &upstream.url()),
        store.toml()
    ))
    .await;
    let answer = reqwest::get(app.url("/admin/webhooks")).await.unwrap();
    assert_eq!(answer.status(), 403);
    assert!(
        answer
            .text()
            .await
            .unwrap()
            .contains("webhooks.admin_token")
    );
    app.stop().await;
    let app = TestApp::from_toml(&polled("fleet", &upstream.url())).await;
    let answer = reqwest::get(app.url("/admin/webhooks")).await.unwrap();
    assert_eq!(answer.status(), 404);
    assert!(answer.text().await.unwrap().contains("[webhooks]"));
    app.stop().await;
}

async fn an_endpoint_failing_for_disable_after_is_disabled(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    receiver.script((0..1000).map(|_| Reply::Status(500, None)));
    let schedule = serde_json::to_string(&vec!["50ms"; 50]).unwrap();
    let mut config = config_from_toml(&webhooks_app_toml(
        &upstream,
        &store,
        &[endpoint("hook", &receiver.url(), &["fleet"], Mode::Patch)],
        &format!("schedule = {schedule}"),
    ));
    // Below the one minute floor of a file's `webhooks.disable_after`, which the test would
    // otherwise wait for.
    config.webhooks.as_mut().expect("[webhooks]").disable_after = Duration::from_millis(300);
    let app = TestApp::spawn(config).await;
    let admin = Admin::new(&app);
    let deadline = tokio::time::Instant::now() + LONG;
    let view = loop {
        let (_, view) = admin.call("GET", "/hook", None).await;
        if view["disabled"].is_object() {
            break view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never disabled: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reason = view["disabled"]["reason"].as_str().unwrap();
    assert!(reason.contains("disable_after"), "{reason}");
    assert!(view["failing_since"].is_string(), "{view}");
    // Nothing more is attempted while disabled.
    let attempts = receiver.hits().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.hits().len(), attempts);
    app.stop().await;
}

async fn names_resolving_to_private_addresses_are_refused_at_delivery(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    // The name passes the (pure) configuration check; the resolver refuses what it resolves to.
    let url = receiver.url().replace("127.0.0.1", "localhost");
    let app = start(
        &upstream,
        &store,
        &[endpoint("hook", &url, &["fleet"], Mode::Patch)],
        "allow_private_targets = false",
    )
    .await;
    let admin = Admin::new(&app);
    let deadline = tokio::time::Instant::now() + LONG;
    let delivery = loop {
        let (_, list) = admin.call("GET", "/hook/deliveries", None).await;
        if let Some(d) = list["deliveries"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["attempts"].as_u64() >= Some(1)))
        {
            break d.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no attempt: {list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = delivery["last_error"].as_str().unwrap();
    assert!(
        error.contains("loopback") && error.contains("allow_private_targets"),
        "{error}"
    );
    assert!(error.starts_with("refused: "), "{error}");
    // A refusal is permanent: dead at the first attempt, and the endpoint is disabled with
    // the reason, so no resync follows to die again.
    assert_eq!(delivery["state"], "dead", "{delivery}");
    assert_eq!(delivery["attempts"], 1, "{delivery}");
    let view = loop {
        let (_, view) = admin.call("GET", "/hook", None).await;
        if view["disabled"].is_object() {
            break view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not disabled: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reason = view["disabled"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("refused") && reason.contains("loopback"),
        "{reason}"
    );
    // More changes queue nothing for it, and nothing is attempted again.
    upstream.update(|d| d["n"] = json!(1));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, list) = admin.call("GET", "/hook/deliveries", None).await;
    let deliveries = list["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{list}");
    assert_eq!(deliveries[0]["attempts"], 1, "{list}");
    assert!(receiver.hits().is_empty(), "the receiver was reached");
    app.stop().await;
}

async fn a_slow_endpoint_never_delays_the_others(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let slow = Receiver::start(&[SECRET]).await;
    // Requests are recorded when answered: nothing is recorded for 15 s.
    slow.set_delay(Duration::from_secs(15));
    let fast = Receiver::start(&[SECRET]).await;
    let app = start(
        &upstream,
        &store,
        &[
            endpoint("slow", &slow.url(), &["fleet"], Mode::Patch),
            endpoint("fast", &fast.url(), &["fleet"], Mode::Patch),
        ],
        "attempt_timeout = \"20s\"\nworkers = 2\nmax_concurrency_per_endpoint = 1",
    )
    .await;
    // Five changes reach the fast endpoint while the slow one still holds its first delivery.
    change_and_wait(&upstream, &fast, 1, 5).await;
    assert!(
        slow.hits().len() <= 1,
        "the slow endpoint got {} requests",
        slow.hits().len()
    );
    assert_eq!(rebuild(&unique(&fast.accepted())), upstream.document());
    app.stop().await;
}

/// The worker's attempts started step by step: at most `max_concurrency_per_endpoint` attempts
/// per endpoint, at most one per (endpoint, stream), at most `workers` overall.
async fn start_due_bounds_concurrency_per_pair_endpoint_and_pool(store: TestStore) {
    // Answers after 15 s: every attempt started stays in flight for the whole test.
    let receiver = Receiver::start(&[SECRET]).await;
    receiver.set_delay(Duration::from_secs(15));
    // (pool, per endpoint, expected in flight) with 2 endpoints x 3 streams = 6 pairs.
    for (workers, per_endpoint, expected) in [(3, 2, 3), (10, 2, 4), (10, 5, 6)] {
        let (outbox, worker) =
            two_endpoints_three_streams(&store, &receiver, workers, per_endpoint).await;
        assert_eq!(
            worker.start_due().await.unwrap(),
            expected,
            "{workers} {per_endpoint}"
        );
        assert_eq!(worker.in_flight(), expected);
        // Nothing more while those are in flight.
        assert_eq!(worker.start_due().await.unwrap(), 0);
        // Another worker asking: six pairs have a head, and in a shared store those in
        // flight are claimed.
        let due = outbox.due(claim("another", 100)).await.unwrap();
        let unclaimed = if store.is_shared() { 6 - expected } else { 6 };
        assert_eq!(due.len(), unclaimed, "{workers} {per_endpoint}");
        assert!(
            due.iter().all(|d| d.seq == 1),
            "only the oldest of each pair is ever due"
        );
    }
}

/// A claim of up to `limit` due deliveries by `owner`, as a worker makes it.
fn claim(owner: &str, limit: usize) -> Claim {
    Claim {
        now_ms: u64::MAX / 4,
        limit,
        busy: Vec::new(),
        full: Vec::new(),
        per_endpoint: 100,
        owner: Arc::from(owner),
        hold: Duration::from_secs(60),
    }
}

async fn two_endpoints_three_streams(
    store: &TestStore,
    receiver: &Receiver,
    workers: usize,
    per_endpoint: usize,
) -> (Arc<dyn Outbox>, Arc<Worker>) {
    let settings = WorkerSettings {
        per_endpoint,
        workers,
        ..worker_settings()
    };
    queued(
        store,
        receiver,
        &["one", "two"],
        &["a", "b", "c"],
        2,
        settings,
    )
    .await
}

/// Test-sized worker settings: private targets allowed, nothing disabled for failing.
fn worker_settings() -> WorkerSettings {
    WorkerSettings {
        schedule: RetrySchedule::default(),
        attempt_timeout: Duration::from_secs(30),
        disable_after: Duration::from_secs(3600),
        per_endpoint: 4,
        workers: 16,
        allow_private: true,
        retention: Duration::from_secs(3600),
        attempt_retention: Duration::from_secs(3600),
        user_agent: "test".into(),
        owner: Arc::from("test-worker"),
        claim_timeout: Duration::from_secs(60),
        poll: None,
    }
}

/// An outbox in memory where each of `endpoints` (patch mode, at `receiver`) subscribes to
/// every one of `streams` and has `changes` changes of each queued (a snapshot, then patches),
/// and a worker over it that no task runs: the test drives it.
async fn queued(
    store: &TestStore,
    receiver: &Receiver,
    endpoints: &[&str],
    streams: &[&str],
    changes: u64,
    settings: WorkerSettings,
) -> (Arc<dyn Outbox>, Arc<Worker>) {
    let outbox = store.open_fresh().await;
    let registry = Arc::new(Registry::new());
    for id in endpoints {
        let record = EndpointRecord {
            id: (*id).into(),
            url: receiver.url(),
            streams: streams.iter().map(|s| (*s).to_owned()).collect(),
            mode: Mode::Patch,
            format: Format::Json,
            headers: Default::default(),
            secret: SECRET.into(),
            previous_secret: None,
            previous_expires_ms: None,
            source: Source::Api,
            created_ms: 0,
            description: None,
            metadata: Default::default(),
            rate_limit: None,
            events: Default::default(),
            request_hash: None,
            view_filters: Default::default(),
        };
        outbox.put_endpoint(record.clone()).await.unwrap();
        registry.put(Endpoint::new(record, EndpointStatus::default()).unwrap());
    }
    for stream in streams {
        for seq in 1..=changes {
            let change = NewChange {
                stream: Arc::from(*stream),
                epoch: 1,
                seq,
                base: None,
                patch: (seq > 1).then(|| bytes::Bytes::from_static(b"[]")),
                document: Some(bytes::Bytes::from_static(br#"{"a":1}"#)),
                at: std::time::SystemTime::now(),
            };
            let targets = endpoints
                .iter()
                .map(|e| Target {
                    endpoint: (*e).into(),
                    mode: Mode::Patch,
                })
                .collect();
            outbox.accept(change, targets, 100, None).await.unwrap();
        }
    }
    let worker = Worker::new(
        outbox.clone(),
        registry,
        settings,
        Arc::new(tokio::sync::Notify::new()),
        Default::default(),
        Arc::new(patchwire::metrics::Metrics::new()),
    )
    .unwrap();
    (outbox, Arc::new(worker))
}

/// `try_step` takes one delivery through its whole attempt, without sleeping: sent signed to
/// a real receiver, its outcome recorded, what it means for the endpoint decided. A 2xx is
/// delivered; a 500 is kept for a retry (due at once on this schedule) that is sent with the
/// same `webhook-id`; a delivery whose schedule runs out is dead and its pair needs a snapshot.
async fn try_step_drives_one_delivery_to_completion(store: TestStore) {
    let receiver = Receiver::start(&[SECRET]).await;
    let settings = WorkerSettings {
        schedule: RetrySchedule {
            delays: vec![Duration::ZERO, Duration::ZERO],
            jitter: 0.0,
            max_retry_after: Duration::ZERO,
        },
        ..worker_settings()
    };
    // seq 1 (a snapshot), 2 and 3 (patches) for one pair.
    let (outbox, worker) = queued(&store, &receiver, &["one"], &["a"], 3, settings).await;
    let step = || async { worker.try_step().await.unwrap().expect("a delivery is due") };

    let first = step().await;
    assert_eq!(
        (first.delivery.seq, &first.outcome),
        (1, &Some(AttemptOutcome::Delivered { status: 200 }))
    );
    assert!(first.recorded);
    assert_eq!(first.follow_up, FollowUp::Nothing);
    assert_eq!(worker.in_flight(), 0, "the slot is released");
    let hits = receiver.hits();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].id(), first.delivery.msg_id);
    assert_eq!((hits[0].kind(), hits[0].seq()), ("stream.snapshot", 1));
    assert_eq!(hits[0].verified_by, [0]);
    let listed = outbox
        .deliveries(
            "one".into(),
            DeliveryFilter {
                limit: 10,
                ..DeliveryFilter::default()
            },
        )
        .await
        .unwrap();
    let recorded = listed.iter().find(|d| d.id == first.delivery.id).unwrap();
    assert_eq!(
        (recorded.state, recorded.attempts),
        (DeliveryState::Delivered, 1)
    );

    receiver.script([Reply::Status(500, None)]);
    let failed = step().await;
    assert_eq!(failed.delivery.seq, 2);
    match &failed.outcome {
        Some(AttemptOutcome::Failed {
            status: Some(500),
            retry_at_ms: Some(_),
            ..
        }) => {}
        other => panic!("expected a retry, got {other:?}"),
    }
    assert_eq!(failed.follow_up, FollowUp::Nothing);
    let retried = step().await;
    assert_eq!(
        (retried.delivery.msg_id.as_str(), retried.delivery.attempts),
        (failed.delivery.msg_id.as_str(), 1)
    );
    assert_eq!(
        retried.outcome,
        Some(AttemptOutcome::Delivered { status: 200 })
    );

    receiver.script([Reply::Status(500, None), Reply::Status(503, None)]);
    assert_eq!(step().await.delivery.seq, 3);
    let dead = step().await;
    match &dead.outcome {
        Some(AttemptOutcome::Failed {
            status: Some(503),
            retry_at_ms: None,
            ..
        }) => {}
        other => panic!("expected a dead letter, got {other:?}"),
    }
    assert_eq!(dead.follow_up, FollowUp::Resync);
    assert!(
        worker.try_step().await.unwrap().is_none(),
        "nothing is left"
    );
    let seqs: Vec<(u64, u16)> = receiver
        .hits()
        .iter()
        .map(|h| (h.seq(), h.status))
        .collect();
    assert_eq!(seqs, [(1, 200), (2, 500), (2, 200), (3, 500), (3, 503)]);
}

/// The admin API reads bodies only after the token was checked from the head, and within
/// `server.body_timeout`: a body that never arrives gets 408 and the connection is closed.
async fn admin_bodies_are_read_after_the_token_and_within_the_deadline(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0})).await;
    let app = TestApp::from_toml(&format!(
        "[server]\nbody_timeout = \"1s\"\n{}",
        webhooks_app_toml(&upstream, &store, &[], "")
    ))
    .await;
    let head = |token: &str| {
        format!(
            "POST /admin/webhooks HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: 1000\r\nexpect: 100-continue\r\nauthorization: Bearer {token}\r\n\r\n"
        )
    };

    // A wrong token: 401 at once, no `100 Continue`, the body never read.
    let mut connection = RawConnection::open(app.addr).await;
    connection.send(head("wrong-token").as_bytes()).await;
    let answer = connection
        .read_to_close(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still open:\n{}", connection.text()));
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");

    // The right token, a body that stops half way: 408 within the deadline.
    let mut connection = RawConnection::open(app.addr).await;
    connection.send(head(TOKEN).as_bytes()).await;
    connection.send(b"{\"url\": \"http://").await;
    let answer = connection
        .read_to_close(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still open:\n{}", connection.text()));
    assert!(answer.contains("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("server.body_timeout"), "{answer}");
    app.stop().await;
}

/// Recovery: everything delivered (or dead) since a time is sent again, in its order, with
/// the same `webhook-id`s; bad requests are refused with what was expected.
async fn recovery_sends_everything_since_a_time_again_in_order(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let app = start(
        &upstream,
        &store,
        &[endpoint("hook", &receiver.url(), &["fleet"], Mode::Patch)],
        "",
    )
    .await;
    let admin = Admin::new(&app);
    let before = time_text(std::time::SystemTime::now() - Duration::from_secs(60));
    change_and_wait(&upstream, &receiver, 1, 4).await;
    // The receiver has them; wait until the outbox recorded them all.
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let (_, list) = admin
            .call("GET", "/hook/deliveries?state=pending", None)
            .await;
        if list["deliveries"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still pending: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first: Vec<Hit> = unique(&receiver.accepted());
    let (status, answer) = admin
        .call("POST", "/hook/recover", Some(json!({ "since": before })))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["recovered"], json!(first.len()), "{answer}");
    let all = receiver
        .wait_for(LONG, "everything again", |hits| {
            hits.len() >= first.len() * 2
        })
        .await;
    let again: Vec<String> = all[first.len()..].iter().map(Hit::id).collect();
    let ids: Vec<String> = first.iter().map(Hit::id).collect();
    assert_eq!(again, ids, "the same messages, in the same order");
    // Nothing since a time after the last one.
    let now = time_text(std::time::SystemTime::now());
    let (status, answer) = admin
        .call("POST", "/hook/recover", Some(json!({ "since": now })))
        .await;
    assert_eq!((status, answer["recovered"].clone()), (202, json!(0)));
    for (path, body, expected, needle) in [
        (
            "/hook/recover",
            json!({"since": "last tuesday"}),
            422,
            "RFC 3339",
        ),
        (
            "/hook/recover",
            json!({"since": "2999-01-01T00:00:00Z"}),
            422,
            "in the past",
        ),
        ("/hook/recover", json!({}), 400, "since"),
        (
            "/hook/recover",
            json!({"since": before, "x": 1}),
            400,
            "unknown field",
        ),
        ("/nope/recover", json!({"since": before}), 404, "nope"),
    ] {
        let (status, answer) = admin.call("POST", path, Some(body.clone())).await;
        assert_eq!(status, expected, "{body}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{body}: {answer}"
        );
    }
    app.stop().await;
}

/// `t` as RFC 3339.
fn time_text(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

const PUSH_TOKEN: &str = "test-push-token-0123456789";

/// The app with the push stream `board` and the polled `fleet`, `[webhooks]` on `store`.
async fn push_and_webhooks(upstream: &MockUpstream, store: &TestStore, webhooks: &str) -> TestApp {
    TestApp::from_toml(&format!(
        "[push]\ntoken = \"{PUSH_TOKEN}\"\n\n[[streams]]\nname = \"board\"\nsource = \"push\"\n\n{}",
        webhooks_app_toml(upstream, store, &[], webhooks)
    ))
    .await
}

async fn push_board(app: &TestApp, n: u64) {
    let status = reqwest::Client::new()
        .post(app.url("/streams/board"))
        .bearer_auth(PUSH_TOKEN)
        .json(&json!({"n": n, "pad": PAD}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

/// An endpoint's description and metadata are kept and shown; its rate limit spaces its
/// attempts; each is checked, and the admin API names what is wrong.
async fn endpoints_carry_a_description_metadata_and_a_rate_limit(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let app = push_and_webhooks(&upstream, &store, "").await;
    let admin = Admin::new(&app);
    let (status, created) = admin
        .call(
            "POST",
            "",
            Some(json!({
                "url": receiver.url(), "streams": ["board"], "secret": SECRET,
                "description": "billing's copy of the board",
                "metadata": {"team": "billing", "ticket": "OPS-7"},
                "rate_limit": 5,
            })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let (_, shown) = admin.call("GET", &format!("/{id}"), None).await;
    assert_eq!(shown["description"], "billing's copy of the board");
    assert_eq!(
        shown["metadata"],
        json!({"team": "billing", "ticket": "OPS-7"})
    );
    assert_eq!(shown["rate_limit"], 5);
    // Twelve changes at once: at 5 attempts per second (a burst of 5, then one every
    // 200 ms) the twelfth cannot start before 1.4 s after the first (less the first
    // request's own connection set-up, as the receiver times arrivals).
    for n in 1..=12 {
        push_board(&app, n).await;
    }
    let hits = receiver
        .wait_for(LONG, "twelve changes", |hits| {
            hits.iter().any(|h| h.seq() == 12)
        })
        .await;
    let spread = hits.last().unwrap().at - hits[0].at;
    assert!(
        spread >= Duration::from_millis(1000),
        "12 attempts in {spread:?}"
    );
    assert_eq!(rebuild(&unique(&hits))["n"], json!(12));
    // Changed, cleared, and shown so.
    let (status, changed) = admin
        .call(
            "PATCH",
            &format!("/{id}"),
            Some(json!({"description": null, "metadata": {"team": "ops"}, "rate_limit": null})),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["description"], Value::Null);
    assert_eq!(changed["metadata"], json!({"team": "ops"}));
    assert_eq!(changed["rate_limit"], Value::Null);
    let many: serde_json::Map<String, Value> =
        (0..51).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (body, expected, needle) in [
        (
            json!({"description": "x".repeat(1025)}),
            422,
            "description: expected at most 1024",
        ),
        (
            json!({"metadata": many}),
            422,
            "metadata: expected at most 50 entries",
        ),
        (
            json!({"metadata": {"": "v"}}),
            422,
            "metadata.\"\": expected a key of 1 to 64",
        ),
        (
            json!({"metadata": {"k": "v".repeat(1025)}}),
            422,
            "metadata.\"k\": expected a value",
        ),
        (
            json!({"rate_limit": 0}),
            422,
            "rate_limit: expected attempts per second from 1",
        ),
        (
            json!({"rate_limit": 20000}),
            422,
            "rate_limit: expected attempts per second",
        ),
        (json!({"rate_limit": "fast"}), 400, "rate_limit"),
        (json!({"metadata": ["a"]}), 400, "metadata"),
    ] {
        let (status, answer) = admin
            .call("PATCH", &format!("/{id}"), Some(body.clone()))
            .await;
        assert_eq!(status, expected, "{body}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: {message}");
        let mut create = body.clone();
        create["url"] = json!(receiver.url());
        create["streams"] = json!(["board"]);
        let (status, answer) = admin.call("POST", "", Some(create)).await;
        assert_eq!(status, expected, "create {body}: {answer}");
    }
    app.stop().await;
}

/// A test delivery: signed like any other, sent at once, its answer returned; nothing is
/// queued. Bad requests and unknown endpoints are refused.
async fn a_test_delivery_is_signed_sent_at_once_and_its_answer_returned(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let app = start(
        &upstream,
        &store,
        &[endpoint("hook", &receiver.url(), &["fleet"], Mode::Patch)],
        "",
    )
    .await;
    let admin = Admin::new(&app);
    // Let the first snapshot through, so the receiver's next answer is the test's.
    receiver
        .wait_for(LONG, "the first snapshot", |h| !h.is_empty())
        .await;
    receiver.script([Reply::Body(202, "thanks, got it")]);
    let (status, answer) = admin.call("POST", "/hook/test", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["delivered"], true, "{answer}");
    assert_eq!(answer["status"], 202, "{answer}");
    assert_eq!(answer["response"], "thanks, got it", "{answer}");
    assert!(answer["duration_ms"].is_u64(), "{answer}");
    let hit = receiver
        .hits()
        .into_iter()
        .find(|h| h.body["type"] == "webhook.test")
        .expect("the test delivery");
    assert_eq!(hit.verified_by, [0], "signed with the endpoint's secret");
    assert_eq!(Some(hit.id().as_str()), answer["webhook_id"].as_str());
    assert_eq!(hit.body["endpoint"], "hook");
    // A failing receiver: the answer says so; nothing is retried or listed.
    receiver.script([Reply::Body(500, "boom")]);
    let (status, answer) = admin.call("POST", "/hook/test", Some(json!({}))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (
            answer["delivered"].clone(),
            answer["status"].clone(),
            answer["response"].clone()
        ),
        (json!(false), json!(500), json!("boom"))
    );
    assert!(
        answer["error"].as_str().unwrap().contains("500"),
        "{answer}"
    );
    let (_, list) = admin.call("GET", "/hook/deliveries", None).await;
    assert!(
        !list
            .to_string()
            .contains(answer["webhook_id"].as_str().unwrap()),
        "a test is not a delivery: {list}"
    );
    for (path, body, expected) in [
        ("/nope/test", json!({}), 404),
        ("/hook/test", json!({"payload": 1}), 400),
        ("/hook/test", json!([1]), 400),
    ] {
        let (status, answer) = admin.call("POST", path, Some(body.clone())).await;
        assert_eq!(status, expected, "{path} {body}: {answer}");
        assert!(answer["message"].is_string(), "{answer}");
    }
    app.stop().await;
}

/// A create retried with the same `Idempotency-Key` makes one endpoint and answers it again
/// (its secret too); the key with another request, or a malformed key, is refused.
async fn a_create_retried_with_its_idempotency_key_makes_one_endpoint(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0})).await;
    let receiver = Receiver::start(&[]).await;
    let app = start(&upstream, &store, &[], "").await;
    let client = reqwest::Client::new();
    let create = |key: Option<String>, body: String| {
        let client = client.clone();
        let url = app.url("/admin/webhooks");
        async move {
            let mut request = client
                .post(url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body);
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, replayed, body)
        }
    };
    let body = format!(r#"{{"url": "{}", "streams": ["fleet"]}}"#, receiver.url());
    let key = Some("4f1c0a2e-7d1b-4c55-9f0e-1b2c3d4e5f60".to_owned());
    let (status, replayed, first) = create(key.clone(), body.clone()).await;
    assert_eq!((status, replayed), (201, false), "{first}");
    // The same request again (spaced differently): the same endpoint, secret and all.
    let again = format!(
        r#"{{ "streams" : ["fleet"], "url" : "{}" }}"#,
        receiver.url()
    );
    let (status, replayed, second) = create(key.clone(), again).await;
    assert_eq!((status, replayed), (201, true), "{second}");
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["secret"], second["secret"]);
    let (_, listed) = Admin::new(&app).call("GET", "", None).await;
    assert_eq!(listed["endpoints"].as_array().unwrap().len(), 1, "{listed}");
    // Another request with the same key.
    let other = format!(
        r#"{{"url": "{}", "streams": ["fleet"], "mode": "snapshot"}}"#,
        receiver.url()
    );
    let (status, _, answer) = create(key.clone(), other).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"),
        "{answer}"
    );
    // Without a key: a new endpoint each time.
    let (status, _, third) = create(None, body.clone()).await;
    assert_eq!(status, 201);
    assert_ne!(third["id"], first["id"]);
    for bad in [String::new(), "k".repeat(256)] {
        let (status, _, answer) = create(Some(bad), body.clone()).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("Idempotency-Key"),
            "{answer}"
        );
    }
    app.stop().await;
}

/// Verifies `v1a` signatures of `hits` with `public_key` (`whpk_...`) in Python's
/// `cryptography` (OpenSSL's ed25519), an implementation independent of ours (ring); returns
/// how many verified, or `None` (skip) without it.
fn verify_v1a_in_python(public_key: &str, hits: &[Hit]) -> Option<usize> {
    use base64::Engine as _;
    let ready = std::process::Command::new("python3")
        .args([
            "-c",
            "import cryptography.hazmat.primitives.asymmetric.ed25519",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        return patchwire_test_data::skip(
            "Python's cryptography package is missing (pip install cryptography)",
        );
    }
    let messages: Vec<Value> = hits
        .iter()
        .map(|h| {
            let header = |name: &str| h.headers[name].to_str().unwrap().to_owned();
            json!({
                "id": header("webhook-id"),
                "timestamp": header("webhook-timestamp"),
                "signature": header("webhook-signature"),
                "body": base64::engine::general_purpose::STANDARD.encode(&h.raw),
            })
        })
        .collect();
    let script = r#"
import base64, json, sys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
key = Ed25519PublicKey.from_public_bytes(base64.b64decode(sys.argv[1].removeprefix("whpk_")))
verified = 0
for m in json.load(sys.stdin):
    signed = (m["id"] + "." + m["timestamp"] + ".").encode() + base64.b64decode(m["body"])
    for part in m["signature"].split(" "):
        version, _, signature = part.partition(",")
        if version != "v1a":
            continue
        try:
            key.verify(base64.b64decode(signature), signed)
            verified += 1
            break
        except InvalidSignature:
            pass
print(verified)
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, public_key])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&messages).unwrap().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "the Python verifier failed");
    Some(
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap(),
    )
}

/// An endpoint signing with ed25519 (`v1a`): created through the admin API, its public key
/// shown (its private key never), every delivery's signature verified by an independent
/// implementation with that public key; a rotation keeps the scheme; bad keys are refused.
async fn ed25519_endpoints_sign_v1a_verified_with_their_public_key(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[]).await;
    let app = start(&upstream, &store, &[], "").await;
    let admin = Admin::new(&app);
    let (status, created) = admin
        .call(
            "POST",
            "",
            Some(json!({"url": receiver.url(), "streams": ["fleet"], "signing": "v1a"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["signing"], "v1a");
    assert!(
        created.get("secret").is_none(),
        "the private key is never shown: {created}"
    );
    let public_key = created["public_key"].as_str().unwrap().to_owned();
    assert!(public_key.starts_with("whpk_"), "{public_key}");
    let id = created["id"].as_str().unwrap().to_owned();
    change_and_wait_unverified(&upstream, &receiver, 1, 3).await;
    let hits = receiver.accepted();
    assert!(hits.iter().all(|h| {
        h.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .starts_with("v1a,")
    }));
    if let Some(verified) = verify_v1a_in_python(&public_key, &hits) {
        assert_eq!(verified, hits.len(), "every v1a signature verifies");
        // A tampered body does not.
        let mut tampered = hits[0].clone();
        tampered.raw = bytes::Bytes::from_static(b"{}");
        assert_eq!(verify_v1a_in_python(&public_key, &[tampered]), Some(0));
    }
    // Rotation: a new key of the same scheme; during the overlap both sign.
    let (status, rotated) = admin
        .call("POST", &format!("/{id}/rotate-secret"), None)
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new_key = rotated["public_key"].as_str().unwrap().to_owned();
    assert!(
        rotated.get("secret").is_none() && new_key != public_key,
        "{rotated}"
    );
    let before = receiver.hits().len();
    change_and_wait_unverified(&upstream, &receiver, 4, 1).await;
    let last = &receiver.hits()[before..];
    let header = last[0].headers["webhook-signature"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(header.matches("v1a,").count(), 2, "{header}");
    if let Some(verified) = verify_v1a_in_python(&new_key, last) {
        assert_eq!(verified, last.len());
    }
    for (body, needle) in [
        (
            json!({"url": receiver.url(), "streams": ["fleet"], "secret": "whsk_AAAA"}),
            "32 bytes",
        ),
        (
            json!({"url": receiver.url(), "streams": ["fleet"], "signing": "v2"}),
            "signing",
        ),
        (
            json!({"url": receiver.url(), "streams": ["fleet"], "signing": "v1a", "secret": SECRET}),
            "does not match",
        ),
    ] {
        let (status, answer) = admin.call("POST", "", Some(body.clone())).await;
        assert!(matches!(status, 400 | 422), "{body}: {status} {answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{body}: {answer}"
        );
    }
    app.stop().await;
}

/// As [`change_and_wait`], for receivers that cannot verify (asymmetric signatures).
async fn change_and_wait_unverified(
    upstream: &MockUpstream,
    receiver: &Receiver,
    from: i64,
    n: i64,
) {
    for i in from..from + n {
        upstream.update(|d| {
            d["n"] = json!(i);
            d["items"].as_array_mut().unwrap().push(json!({"id": i}));
        });
        receiver
            .wait_for(LONG, &format!("n = {i}"), |hits| {
                hits.iter()
                    .any(|h| h.status < 300 && h.body["data"]["n"] == json!(i))
                    || hits.iter().any(|h| {
                        h.status < 300
                            && h.body["data"]
                                .as_array()
                                .is_some_and(|ops| ops.iter().any(|op| op["value"] == json!(i)))
                    })
            })
            .await;
    }
}

/// Every attempt is listed by `GET /admin/webhooks/{id}/attempts`, newest first: when, how
/// long, how it ended, the receiver's status, the start of its answer and the error; filtered
/// by stream, result, status and time, paged by `before`/`next_before`; bad parameters are
/// refused naming them, an unknown endpoint is 404.
async fn every_attempt_is_listed_with_its_answer(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let long_answer = "x".repeat(5000).leak();
    // A 500 with a body, a hang past the attempt timeout, a 202 with a long body.
    receiver.script([
        Reply::Body(500, "not now"),
        Reply::Delay(Duration::from_secs(2)),
        Reply::Body(202, long_answer),
    ]);
    let app = start(
        &upstream,
        &store,
        &[endpoint("hook", &receiver.url(), &["fleet"], Mode::Patch)],
        "",
    )
    .await;
    let admin = Admin::new(&app);
    let list = |query: &'static str| {
        let admin = &admin;
        async move {
            admin
                .call("GET", &format!("/hook/attempts{query}"), None)
                .await
        }
    };
    let deadline = tokio::time::Instant::now() + LONG;
    let history = loop {
        let (status, answer) = list("").await;
        assert_eq!(status, 200, "{answer}");
        if answer["attempts"].as_array().unwrap().len() >= 3 {
            break answer["attempts"].as_array().unwrap().clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "three attempts: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let newest = history.len() - 3;
    let [delivered, hung, failed] = [0, 1, 2].map(|i| history[newest + i].clone());
    assert_eq!(delivered["result"], "delivered", "{delivered}");
    assert_eq!(delivered["status"], 202);
    assert_eq!(delivered["error"], Value::Null);
    assert_eq!(
        delivered["response"].as_str().unwrap().len(),
        1024,
        "a bounded excerpt"
    );
    assert_eq!(hung["result"], "retrying", "{hung}");
    assert_eq!(hung["status"], Value::Null);
    assert!(
        hung["error"].as_str().unwrap().contains("no answer within"),
        "{hung}"
    );
    assert!(hung["duration_ms"].as_u64().unwrap() >= 400, "{hung}");
    assert_eq!(failed["result"], "retrying", "{failed}");
    assert_eq!(
        (failed["status"].clone(), failed["response"].clone()),
        (json!(500), json!("not now"))
    );
    assert!(
        failed["error"].as_str().unwrap().contains("500"),
        "{failed}"
    );
    for entry in [&delivered, &hung, &failed] {
        assert_eq!(entry["stream"], "fleet");
        assert_eq!(
            entry["webhook_id"], failed["webhook_id"],
            "one delivery, retried"
        );
        assert!(
            entry["duration_ms"].is_u64() && entry["at"].is_string(),
            "{entry}"
        );
    }
    let ids = |answer: &Value| -> Vec<i64> {
        answer["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_i64().unwrap())
            .collect()
    };
    // Filters.
    let (_, retrying) = list("?result=retrying").await;
    assert_eq!(
        ids(&retrying),
        [hung["id"].as_i64().unwrap(), failed["id"].as_i64().unwrap()]
    );
    let (_, five_hundred) = list("?status=500&stream=fleet").await;
    assert_eq!(ids(&five_hundred), [failed["id"].as_i64().unwrap()]);
    let (_, elsewhere) = list("?stream=other").await;
    assert_eq!(ids(&elsewhere), Vec::<i64>::new());
    let since = hung["at"].as_str().unwrap().to_owned();
    let (status, from_hung) = admin
        .call(
            "GET",
            &format!("/hook/attempts?since={since}&until=2999-01-01T00:00:00Z"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{from_hung}");
    // The 500 came before the hang (the schedule's 100 ms at least).
    assert_eq!(
        ids(&from_hung),
        [
            delivered["id"].as_i64().unwrap(),
            hung["id"].as_i64().unwrap()
        ]
    );
    let (_, before_all) = list("?until=2000-01-01T00:00:00Z").await;
    assert_eq!(ids(&before_all), Vec::<i64>::new());
    // Pages of one: each page's next_before leads to the next, the last has none.
    let mut seen = Vec::new();
    let mut query = "?limit=1".to_owned();
    loop {
        let (status, page) = admin
            .call("GET", &format!("/hook/attempts{query}"), None)
            .await;
        assert_eq!(status, 200, "{page}");
        let page_ids = ids(&page);
        assert!(page_ids.len() <= 1, "{page}");
        seen.extend(page_ids);
        match page["next_before"].as_i64() {
            Some(next) => query = format!("?limit=1&before={next}"),
            None => break,
        }
        assert!(seen.len() <= history.len(), "pages never end: {page}");
    }
    assert_eq!(seen, ids(&json!({"attempts": history})));
    // Bad parameters name themselves; an unknown endpoint is 404.
    for (query, named) in [
        ("?since=yesterday", "since"),
        ("?until=2026-13-01T00:00:00Z", "until"),
        (
            "?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
            "until",
        ),
        ("?result=failed", "result"),
        ("?status=abc", "status"),
        ("?limit=0", "limit"),
        ("?limit=5000", "limit"),
        ("?before=x", "before"),
        ("?colour=red", "colour"),
        ("?stream=a&stream=b", "stream"),
    ] {
        let (status, answer) = list(query).await;
        assert_eq!(status, 400, "{query}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.starts_with(named), "{query}: {message}");
    }
    let (status, answer) = admin.call("GET", "/nope/attempts", None).await;
    assert_eq!(status, 404, "{answer}");
    app.stop().await;
}

/// The worker prunes the attempt history after `attempt_retention`, independently of the
/// finished deliveries' `retention`.
async fn the_worker_prunes_attempts_after_their_retention(store: TestStore) {
    let receiver = Receiver::start(&[SECRET]).await;
    let settings = WorkerSettings {
        // Every attempt is already too old; finished deliveries are kept an hour.
        attempt_retention: Duration::ZERO,
        ..worker_settings()
    };
    let (outbox, worker) = queued(&store, &receiver, &["one"], &["a"], 2, settings).await;
    for _ in 0..2 {
        worker.try_step().await.unwrap().expect("a delivery is due");
    }
    let history = || async {
        outbox
            .attempts(
                "one".into(),
                AttemptFilter {
                    limit: 10,
                    ..AttemptFilter::default()
                },
            )
            .await
            .unwrap()
    };
    assert_eq!(history().await.len(), 2);
    // Made at least a millisecond before the prune's "now".
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(worker.prune().await, (0, 2));
    assert!(history().await.is_empty());
    let kept = outbox
        .deliveries(
            "one".into(),
            DeliveryFilter {
                limit: 10,
                ..DeliveryFilter::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(kept.len(), 2, "the deliveries stay for their own retention");
}

/// An endpoint chooses the kinds of change it receives: `["snapshots"]` gets every change as
/// the whole document (whatever its mode), the default gets patches after a first snapshot.
/// The file and the admin API both check the list and name what is wrong.
async fn endpoints_choose_the_kinds_of_change_they_receive(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let patches = Receiver::start(&[SECRET]).await;
    let documents = Receiver::start(&[SECRET]).await;
    let snapshots_only = format!(
        "\n[[webhooks.endpoints]]\nid = \"documents\"\nurl = \"{}\"\nstreams = [\"fleet\"]\n\
         mode = \"patch\"\nevents = [\"snapshots\"]\nsecret = \"{SECRET}\"\n",
        documents.url()
    );
    let app = start(
        &upstream,
        &store,
        &[
            endpoint("patches", &patches.url(), &["fleet"], Mode::Patch),
            snapshots_only,
        ],
        "",
    )
    .await;
    change_and_wait(&upstream, &patches, 1, 6).await;
    let hits = patches.accepted();
    assert!(
        hits[1..].iter().any(|h| h.kind() == "stream.patch"),
        "the default sends patches"
    );
    let docs = documents
        .wait_for(LONG, "the last document", |hits| {
            hits.last().is_some_and(|h| h.body["data"]["n"] == json!(6))
        })
        .await;
    assert!(
        docs.iter()
            .all(|h| h.kind() == "stream.snapshot" && !h.verified_by.is_empty()),
        "snapshots only: {:?}",
        docs.iter().map(Hit::kind).collect::<Vec<_>>()
    );
    assert!(docs.len() >= 6, "every change whole: {}", docs.len());
    assert_eq!(rebuild(&docs), upstream.document());
    let admin = Admin::new(&app);
    let (_, shown) = admin.call("GET", "/documents", None).await;
    assert_eq!(shown["events"], json!(["snapshots"]));
    let (_, shown) = admin.call("GET", "/patches", None).await;
    assert_eq!(shown["events"], json!(["snapshots", "patches"]));
    // A configured endpoint's kinds come from the file.
    let (status, answer) = admin
        .call(
            "PATCH",
            "/documents",
            Some(json!({"events": ["snapshots", "patches"]})),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    // Through the API: created with a list, changed, shown so; bad lists refused.
    let (status, created) = admin
        .call(
            "POST",
            "",
            Some(json!({"url": documents.url(), "streams": ["fleet"], "events": ["snapshots"]})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["events"], json!(["snapshots"]));
    let id = created["id"].as_str().unwrap().to_owned();
    let (status, changed) = admin
        .call(
            "PATCH",
            &format!("/{id}"),
            Some(json!({"events": ["patches", "snapshots"]})),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["events"], json!(["snapshots", "patches"]));
    for (events, expected, needle) in [
        (
            json!(["snapshots", "error"]),
            422,
            "events[1]: expected one of \"snapshots\", \"patches\", \"errors\", \"recoveries\", got \"error\"",
        ),
        (
            json!(["errors", "errors"]),
            422,
            "events[1]: \"errors\" is listed twice",
        ),
        (
            json!(["patches"]),
            422,
            "events: expected \"snapshots\" with \"patches\"",
        ),
        (json!([]), 422, "events: expected at least one of"),
        (
            json!(["snapshots", "snapshots"]),
            422,
            "events[1]: \"snapshots\" is listed twice",
        ),
        (json!("snapshots"), 400, "events"),
    ] {
        let (status, answer) = admin
            .call("PATCH", &format!("/{id}"), Some(json!({"events": events})))
            .await;
        assert_eq!(status, expected, "{events}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{events}: {message}");
        let (status, answer) = admin
            .call(
                "POST",
                "",
                Some(json!({"url": documents.url(), "streams": ["fleet"], "events": events})),
            )
            .await;
        assert_eq!(status, expected, "create {events}: {answer}");
    }
    app.stop().await;
}

/// An upstream that fails then recovers: an endpoint listing `errors` and `recoveries` gets
/// one `stream.error` when the stream starts failing (not one per failed poll, not one for a
/// changed cause) and one `stream.recovered` when it answers again, in order with the
/// stream's changes on the same queue, signed (verified by the independent library); an
/// endpoint without them never gets either; an endpoint listing only `errors` gets nothing
/// else.
async fn upstream_failures_and_recoveries_reach_the_endpoints_that_list_them(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let watch = Receiver::start(&[SECRET]).await;
    let plain = Receiver::start(&[SECRET]).await;
    let alarm = Receiver::start(&[SECRET]).await;
    let cloud = Receiver::start(&[SECRET]).await;
    let with_events = |id: &str, url: &str, events: &str| {
        format!(
            "\n[[webhooks.endpoints]]\nid = \"{id}\"\nurl = \"{url}\"\nstreams = [\"fleet\"]\n\
             events = {events}\nsecret = \"{SECRET}\"\n"
        )
    };
    let app = TestApp::from_toml(&format!(
        "[[streams]]\nname = \"fleet\"\nurl = \"{}\"\ninterval = \"100ms\"\n{}{}{}{}{}format = \"cloudevents\"\n",
        upstream.url(),
        webhooks_toml(&store, ""),
        with_events(
            "watch",
            &watch.url(),
            r#"["snapshots", "patches", "errors", "recoveries"]"#
        ),
        endpoint("plain", &plain.url(), &["fleet"], Mode::Patch),
        with_events("alarm", &alarm.url(), r#"["errors"]"#),
        with_events(
            "cloud",
            &cloud.url(),
            r#"["snapshots", "errors", "recoveries"]"#
        ),
    ))
    .await;
    change_and_wait(&upstream, &watch, 1, 1).await;
    let before = unique(&watch.accepted())
        .last()
        .map(|h| (h.body["epoch"].as_u64().unwrap(), h.seq()))
        .unwrap();
    // Failing: one error, however many polls fail, whatever their cause.
    upstream.fail(Failure::Status(500, None));
    let hits = watch
        .wait_for(LONG, "the error", |hits| {
            hits.iter().any(|h| h.kind() == "stream.error")
        })
        .await;
    let error = hits.iter().find(|h| h.kind() == "stream.error").unwrap();
    assert_eq!(error.body["data"]["status"], 500, "{}", error.body);
    assert_eq!(
        error.body["data"]["last_event_id"],
        json!(format!("fleet:{}:{}", before.0, before.1))
    );
    assert_eq!(
        (error.body["epoch"].as_u64(), error.body["seq"].as_u64()),
        (Some(before.0), Some(before.1))
    );
    assert_eq!(error.body["schema"], "patchwire.webhook.v1");
    let polls = upstream.requests();
    upstream
        .wait_for_requests(polls + 3, Duration::from_secs(20))
        .await;
    upstream.fail(Failure::Status(503, None));
    let polls = upstream.requests();
    upstream
        .wait_for_requests(polls + 2, Duration::from_secs(20))
        .await;
    // Recovering, with a change: the recovery comes before it.
    upstream.update(|d| d["n"] = json!(2));
    upstream.recover();
    let hits = watch
        .wait_for(LONG, "the recovery and n = 2", |hits| {
            let changes: Vec<Hit> = unique(hits)
                .into_iter()
                .filter(|h| h.kind() == "stream.snapshot" || h.kind() == "stream.patch")
                .collect();
            hits.iter().any(|h| h.kind() == "stream.recovered")
                && !changes.is_empty()
                && rebuild(&changes)["n"] == json!(2)
        })
        .await;
    let hits = unique(&hits);
    assert!(hits.iter().all(|h| !h.verified_by.is_empty()), "unsigned");
    let kinds: Vec<&str> = hits.iter().map(Hit::kind).collect();
    let errors = kinds.iter().filter(|k| **k == "stream.error").count();
    let recoveries = kinds.iter().filter(|k| **k == "stream.recovered").count();
    assert_eq!((errors, recoveries), (1, 1), "{kinds:?}");
    let at = |kind: &str| kinds.iter().position(|k| *k == kind).unwrap();
    assert!(at("stream.error") < at("stream.recovered"), "{kinds:?}");
    let recovered = &hits[at("stream.recovered")];
    assert_eq!(
        recovered.body["data"]["last_event_id"],
        json!(format!("fleet:{}:{}", before.0, before.1)),
        "recovered at the last good document"
    );
    assert!(recovered.body["data"]["failures"].as_u64().unwrap() >= 5);
    // The change after the recovery follows it on the queue.
    let last = hits.last().unwrap();
    assert!(
        last.seq() > before.1 && last.kind() != "stream.recovered",
        "{kinds:?}"
    );
    // The endpoint with the default kinds never heard of it; the one listing only errors
    // got the error alone.
    change_and_wait(&upstream, &plain, 3, 1).await;
    let plain_kinds: Vec<String> = plain
        .accepted()
        .iter()
        .map(|h| h.kind().to_owned())
        .collect();
    assert!(
        plain_kinds
            .iter()
            .all(|k| k == "stream.snapshot" || k == "stream.patch"),
        "{plain_kinds:?}"
    );
    let alarms = unique(&alarm.accepted());
    assert_eq!(
        alarms.iter().map(Hit::kind).collect::<Vec<_>>(),
        ["stream.error"],
        "errors only"
    );
    assert!(!alarms[0].verified_by.is_empty());
    // As CloudEvents (structured): their own type, an id that is not a change's, the data.
    let events = cloud
        .wait_for(LONG, "the CloudEvents error and recovery", |hits| {
            hits.iter().any(|h| h.kind() == "stream.recovered")
        })
        .await;
    let error = events.iter().find(|h| h.kind() == "stream.error").unwrap();
    assert_eq!(
        error.headers["content-type"],
        "application/cloudevents+json"
    );
    assert_eq!(error.body["specversion"], "1.0");
    assert_eq!(error.body["data"]["status"], 500);
    let id = error.body["id"].as_str().unwrap();
    assert!(
        id.starts_with(&format!("fleet:{}:{}/stream.error/", before.0, before.1)),
        "{id}"
    );
    assert!(events.iter().all(|h| !h.verified_by.is_empty()));
    app.stop().await;
}

const OPERATOR_SECRET: &str = "whsec_0xXHqonBMVzu3z/Rlbzy8GzLrlBTZ5PvjXNmZKPqORI=";

/// Waits until the operator has an event of type `kind` (for endpoint `hook`) and returns it.
async fn operator_event(operator: &Receiver, kind: &str) -> Hit {
    let hits = operator
        .wait_for(LONG, kind, |hits| hits.iter().any(|h| h.kind() == kind))
        .await;
    hits.into_iter().find(|h| h.kind() == kind).unwrap()
}

/// Operational events reach `webhooks.operator_url`, signed with `operator_secret` (verified
/// by the independent library): a dead delivery, the endpoint recovering when the snapshot
/// after it succeeds, a 410 disabling it, and the admin API re-enabling it.
async fn operational_events_reach_the_operator_signed(store: TestStore) {
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let receiver = Receiver::start(&[SECRET]).await;
    let operator = Receiver::start(&[OPERATOR_SECRET]).await;
    // The operator fails once: its events are retried.
    operator.script([Reply::Status(503, None)]);
    // Five attempts (the schedule's length), all failing: the first delivery goes dead.
    receiver.script((0..5).map(|_| Reply::Status(500, None)));
    let app = start(
        &upstream,
        &store,
        &[endpoint("hook", &receiver.url(), &["fleet"], Mode::Patch)],
        &format!(
            "operator_url = \"{}\"\noperator_secret = \"{OPERATOR_SECRET}\"\n",
            operator.url()
        ),
    )
    .await;
    let dead_id = receiver
        .wait_for(LONG, "five failures", |h| h.len() >= 5)
        .await[0]
        .id();
    let dead = operator_event(&operator, "delivery.dead").await;
    assert_eq!(
        dead.body["data"],
        json!({"endpoint": "hook", "stream": "fleet", "webhook_id": dead_id,
               "reason": "the receiver answered 500 Internal Server Error"}),
        "{}",
        dead.body
    );
    assert!(dead.body["timestamp"].is_string());
    // The snapshot after the dead letter is delivered: the endpoint recovered.
    let recovered = operator_event(&operator, "endpoint.recovered").await;
    assert_eq!(recovered.body["data"]["endpoint"], "hook");
    assert_eq!(recovered.body["data"]["stream"], "fleet");
    let snapshot_id = receiver.accepted()[0].id();
    assert_eq!(recovered.body["data"]["webhook_id"], json!(snapshot_id));
    // A 410 disables it.
    receiver.script([Reply::Status(410, None)]);
    upstream.update(|d| d["n"] = json!(1));
    let disabled = operator_event(&operator, "endpoint.disabled").await;
    assert_eq!(disabled.body["data"]["endpoint"], "hook");
    assert!(
        disabled.body["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("410"),
        "{}",
        disabled.body
    );
    // Re-enabled through the admin API.
    let (status, _) = Admin::new(&app)
        .call("PATCH", "/hook", Some(json!({"disabled": false})))
        .await;
    assert_eq!(status, 200);
    let hits = operator
        .wait_for(LONG, "the re-enabling", |hits| {
            hits.iter()
                .any(|h| h.body["data"]["reason"] == json!("re-enabled through the admin API"))
        })
        .await;
    // Every event signed with the operator's secret (and each type once, retries aside).
    assert!(hits.iter().all(|h| !h.verified_by.is_empty()), "unsigned");
    assert_eq!(hits[0].status, 503);
    assert_eq!(hits[0].id(), hits[1].id(), "a retry keeps its webhook-id");
    let kinds: Vec<String> = unique(&hits).iter().map(|h| h.kind().to_owned()).collect();
    assert_eq!(
        kinds,
        [
            "delivery.dead",
            "endpoint.recovered",
            "endpoint.disabled",
            "endpoint.recovered"
        ],
        "in order"
    );
    app.stop().await;
}

crate::on_both_stores!(
    upstream_failures_and_recoveries_reach_the_endpoints_that_list_them,
    operational_events_reach_the_operator_signed,
    endpoints_choose_the_kinds_of_change_they_receive,
    the_worker_prunes_attempts_after_their_retention,
    every_attempt_is_listed_with_its_answer,
    ed25519_endpoints_sign_v1a_verified_with_their_public_key,
    a_create_retried_with_its_idempotency_key_makes_one_endpoint,
    a_test_delivery_is_signed_sent_at_once_and_its_answer_returned,
    endpoints_carry_a_description_metadata_and_a_rate_limit,
    recovery_sends_everything_since_a_time_again_in_order,
    every_change_arrives_signed_in_order_as_patches_or_documents,
    failures_timeouts_and_retry_after_are_retried_with_the_same_id,
    gone_disables_the_endpoint_until_the_admin_api_re_enables_it,
    a_dead_letter_is_listed_followed_by_a_snapshot_and_replayed_with_its_id,
    runtime_endpoints_rotate_secrets_and_survive_restarts,
    the_admin_api_checks_its_token_and_its_input,
    redirects_are_never_followed,
    without_a_token_the_admin_api_is_disabled_and_without_webhooks_absent,
    an_endpoint_failing_for_disable_after_is_disabled,
    names_resolving_to_private_addresses_are_refused_at_delivery,
    a_slow_endpoint_never_delays_the_others,
    start_due_bounds_concurrency_per_pair_endpoint_and_pool,
    try_step_drives_one_delivery_to_completion,
    admin_bodies_are_read_after_the_token_and_within_the_deadline,
);

/// A stream that starts over while its dispatcher is behind (a cluster node reloading its copy
/// from the log right as changes arrive) gets the document it started over with queued, then
/// the changes after it as patches. The dispatcher used to queue the stream's current
/// document instead, a later one, and the outbox then skipped the changes before it as stale.
#[tokio::test]
async fn a_reset_queues_the_document_it_started_over_with_and_the_changes_after_it() {
    use patchwire::hub::{Stream, StreamOptions};
    use patchwire::sinks::webhook::dispatcher::Dispatcher;
    use patchwire::sinks::webhook::outbox::sqlite::SqliteOutbox;
    use patchwire::snapshot::SnapshotStore;

    let outbox: Arc<dyn Outbox> = Arc::new(
        SqliteOutbox::open(std::path::Path::new(":memory:"))
            .await
            .unwrap(),
    );
    let registry = Arc::new(Registry::new());
    let record = EndpointRecord {
        id: "e".into(),
        // Nothing is delivered: no worker runs.
        url: "http://127.0.0.1:9/".into(),
        streams: vec!["s".to_owned()],
        mode: Mode::Patch,
        format: Format::Json,
        headers: Default::default(),
        secret: SECRET.into(),
        previous_secret: None,
        previous_expires_ms: None,
        source: Source::Api,
        created_ms: 0,
        description: None,
        metadata: Default::default(),
        rate_limit: None,
        events: Default::default(),
        request_hash: None,
        view_filters: Default::default(),
    };
    outbox.put_endpoint(record.clone()).await.unwrap();
    registry.put(Endpoint::new(record, EndpointStatus::default()).unwrap());
    let options = StreamOptions {
        history: 10,
        history_bytes: 1 << 20,
        buffer: 64,
        diff: Default::default(),
    };
    let metrics = Arc::new(patchwire::metrics::Metrics::new());
    let stream = Arc::new(Stream::new("s", options, SnapshotStore::new(), metrics));
    let (_requests, requests) = tokio::sync::mpsc::unbounded_channel();
    let dispatcher = Dispatcher::new(
        stream.clone(),
        outbox.clone(),
        registry,
        100,
        Arc::new(tokio::sync::Notify::new()),
        requests,
        false,
    );
    let committed = dispatcher.committed();
    let document = |n: u64| json!({"n": n, "pad": PAD});
    stream.publish(document(1));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(dispatcher.run(shutdown.clone()));
    committed.reached(1, LONG).await.expect("change 1 queued");
    // The stream starts over at its document, then four changes follow, all before the
    // dispatcher (on this one-thread runtime) runs again.
    let current = stream.snapshot().expect("a document");
    stream.reset(
        current.epoch,
        current.seq,
        current.document.clone(),
        std::time::SystemTime::now(),
        Vec::new(),
    );
    for n in 2..=5 {
        stream.publish(document(n));
    }
    committed.reached(5, LONG).await.expect("changes queued");
    let mut queued: Vec<(u64, String)> = outbox
        .deliveries(
            "e".into(),
            DeliveryFilter {
                state: None,
                before: None,
                limit: 100,
            },
        )
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.seq, format!("{:?}", d.kind)))
        .collect();
    queued.reverse();
    let seqs: Vec<u64> = queued.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5], "{queued:?}");
    shutdown.cancel();
    task.await.expect("the dispatcher stops");
}

/// Reads deliveries with Python's CloudEvents SDK (`cloudevents`, its HTTP binding, both
/// modes) and checks the JSON ones against the schema the server serves (`jsonschema`): one
/// JSON line per delivery, `{"event": attributes and data}` or `{"valid": true}`.
const PYTHON_CLOUDEVENTS: &str = r#"
import json, sys, urllib.request
import jsonschema
from cloudevents.v1.http import from_http
schema = json.load(urllib.request.urlopen(sys.argv[1] + "/schemas/patchwire.webhook.v1.json"))
validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
for line in sys.stdin:
    hit = json.loads(line)
    if hit["format"] == "json":
        validator.validate(json.loads(hit["body"]))
        print(json.dumps({"valid": True}))
    else:
        event = from_http(hit["headers"], hit["body"].encode())
        attributes = dict(event.get_attributes())
        attributes["data"] = event.data
        print(json.dumps({"event": attributes}))
"#;

#[tokio::test]
async fn cloudevents_endpoints_are_read_by_the_cloudevents_sdk() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import cloudevents.v1.http, jsonschema"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !matches!(probe, Ok(status) if status.success()) {
        patchwire_test_data::skip::<()>(
            "python3 with `cloudevents` and `jsonschema` is not available (pip install cloudevents jsonschema)",
        );
        return;
    }
    let upstream = MockUpstream::start(json!({"n": 0, "items": [], "pad": PAD})).await;
    let structured = Receiver::start(&[SECRET]).await;
    let binary = Receiver::start(&[SECRET]).await;
    let plain = Receiver::start(&[SECRET]).await;
    let store = TestStore::sqlite();
    let with_format = |id: &str, url: &str, format: &str| {
        endpoint(id, url, &["fleet"], Mode::Patch).replace(
            "mode = \"patch\"",
            &format!("mode = \"patch\"\nformat = \"{format}\""),
        )
    };
    let app = start(
        &upstream,
        &store,
        &[
            with_format("structured", &structured.url(), "cloudevents"),
            with_format("binary", &binary.url(), "cloudevents-binary"),
            with_format("plain", &plain.url(), "json"),
        ],
        "",
    )
    .await;
    change_and_wait(&upstream, &plain, 1, 3).await;
    let plain_hits = unique(&plain.accepted());
    // The same changes reach the other endpoints (a poll may have caught two versions).
    let last = plain_hits.last().unwrap().seq().to_string();
    let reached = |hits: &[Hit]| {
        hits.iter()
            .any(|h| h.headers.get("ce-seq").is_some_and(|s| *s == *last) || h.body["seq"] == *last)
    };
    let structured_hits = unique(&structured.wait_for(LONG, "the last change", reached).await);
    let binary_hits = unique(&binary.wait_for(LONG, "the last change", reached).await);

    let mut lines = String::new();
    for (format, hits) in [
        ("cloudevents", &structured_hits),
        ("cloudevents-binary", &binary_hits),
        ("json", &plain_hits),
    ] {
        for hit in hits {
            assert!(
                !hit.verified_by.is_empty(),
                "{format}: signed over the bytes sent"
            );
            let headers: serde_json::Map<String, Value> = hit
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), json!(v.to_str().unwrap())))
                .collect();
            lines.push_str(
                &json!({"format": format, "headers": headers, "body": hit.body.to_string()})
                    .to_string(),
            );
            lines.push('\n');
        }
    }
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", PYTHON_CLOUDEVENTS, &app.url("")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 starts");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(lines.as_bytes()).await.unwrap();
    }
    let output = child.wait_with_output().await.expect("python3 ran");
    assert!(
        output.status.success(),
        "the CloudEvents SDK refused a delivery: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (structured_read, rest) = read.split_at(structured_hits.len());
    let (binary_read, plain_read) = rest.split_at(binary_hits.len());
    assert!(plain_read.iter().all(|r| r["valid"] == true));
    for (mode, events, hits) in [
        ("structured", structured_read, &structured_hits),
        ("binary", binary_read, &binary_hits),
    ] {
        let mut document = Value::Null;
        let mut at = None;
        for (event, hit) in events.iter().map(|r| &r["event"]).zip(hits.iter()) {
            let (epoch, seq) = (
                event["epoch"].as_str().unwrap().parse::<u64>().unwrap(),
                event["seq"].as_str().unwrap().parse::<u64>().unwrap(),
            );
            assert_eq!(event["specversion"], "1.0");
            assert_eq!(event["id"], format!("fleet:{epoch}:{seq}"), "{mode}");
            assert_eq!(event["source"], "/streams/fleet");
            assert!(event["time"].as_str().is_some_and(|t| t.ends_with('Z')));
            // The webhook id stays the Standard Webhooks one, beside the event's.
            assert!(hit.id().starts_with("msg_"));
            match event["type"].as_str().unwrap() {
                "stream.snapshot" => {
                    assert_eq!(event["datacontenttype"], "application/json", "{mode}");
                    document = event["data"].clone();
                }
                "stream.patch" => {
                    assert_eq!(event["datacontenttype"], "application/json-patch+json");
                    let base: u64 = event["baseseq"].as_str().unwrap().parse().unwrap();
                    assert_eq!(at, Some((epoch, base)), "{mode}: an unbroken chain");
                    let patch: json_patch::Patch =
                        serde_json::from_value(event["data"].clone()).unwrap();
                    json_patch::patch(&mut document, &patch).unwrap();
                }
                other => panic!("{mode}: type {other}"),
            }
            at = Some((epoch, seq));
        }
        assert_eq!(document, upstream.document(), "{mode}");
    }
    assert_eq!(
        structured_hits[0].headers["content-type"],
        "application/cloudevents+json"
    );
    assert_eq!(
        binary_hits[1].headers["content-type"],
        "application/json-patch+json"
    );
    app.stop().await;
}

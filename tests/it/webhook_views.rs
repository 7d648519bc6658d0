//! Webhook endpoints receiving a view (`fleet@r1`, or an ad hoc filter `fleet?route=R2`)
//! rather than the whole stream: they get only the view's changes, as patches chained on the
//! view's previous change (a view's sequence numbers are its source's, so they are sparse), their
//! receivers rebuild exactly the view's document, the view is not evicted while they follow it,
//! and the admin API says what it takes.

use std::time::Duration;

use patchwire::sinks::webhook::body::Mode;
use serde_json::{Value, json};

use crate::support::*;
use crate::webhook::{Admin, SECRET, endpoint, rebuild, webhooks_toml};

const LONG: Duration = Duration::from_secs(20);

/// Vehicle `a` on route R1 moving at `r1`, `b` on R2 at `r2`; a header large enough that a
/// view's patches are smaller than its document.
fn fleet(r1: u64, r2: u64) -> Value {
    json!({
        "header": {"notes": "n".repeat(600)},
        "vehicles": [
            {"id": "a", "route": "R1", "speed": r1},
            {"id": "b", "route": "R2", "speed": r2},
        ]
    })
}

/// `fleet` with views (a named `r1`, a linger much shorter than the test) and `endpoints`.
fn app_toml(upstream: &MockUpstream, store: &TestStore, endpoints: &[String]) -> String {
    format!(
        "{}[streams.filtering]\nentities = \"/vehicles\"\nkey = \"id\"\n\
         aliases = {{ route = \"route\" }}\nlinger = \"1s\"\n\n\
         [[streams.views]]\nname = \"r1\"\nfilter = {{ route = \"R1\" }}\n\n{}{}",
        polled("fleet", &upstream.url()),
        webhooks_toml(store, ""),
        endpoints.concat()
    )
}

/// The deliveries accepted, each message once (retries removed).
fn unique(receiver: &Receiver) -> Vec<Hit> {
    let mut seen = std::collections::HashSet::new();
    receiver
        .accepted()
        .into_iter()
        .filter(|h| seen.insert(h.id()))
        .collect()
}

/// Waits until the server serves at `/streams/{view}` a document whose vehicle moves at `speed`
/// and `receiver` rebuilds it.
async fn converge(app: &TestApp, receiver: &Receiver, view: &str, speed: u64) -> Value {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let (status, served) = app.json_view(view).await;
        assert_eq!(status, 200, "{view}");
        let hits = unique(receiver);
        if served["vehicles"][0]["speed"] == speed && !hits.is_empty() && rebuild(&hits) == served {
            return served;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{view}: the receiver never rebuilt {served}; it has {:?}",
            hits.iter()
                .map(|h| (h.kind().to_owned(), h.seq()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn endpoints_on_views_receive_only_the_views_changes(store: TestStore) {
    let upstream = MockUpstream::start(fleet(1, 1)).await;
    let named = Receiver::start(&[SECRET]).await;
    let ad_hoc = Receiver::start(&[SECRET]).await;
    let app = TestApp::from_toml(&app_toml(
        &upstream,
        &store,
        &[
            endpoint("named", &named.url(), &["fleet@r1"], Mode::Patch),
            endpoint("adhoc", &ad_hoc.url(), &["fleet?route=R2"], Mode::Patch),
        ],
    ))
    .await;
    app.wait_for_seq("fleet", 1).await;
    converge(&app, &named, "fleet@r1", 1).await;
    converge(&app, &ad_hoc, "fleet?route=R2", 1).await;
    let first = &unique(&named)[0];
    assert_eq!(first.kind(), "stream.snapshot");
    assert_eq!(first.body["stream"], "fleet@r1");
    assert_eq!(
        first.body["data"]["vehicles"],
        json!([{"id": "a", "route": "R1", "speed": 1}])
    );
    let ad_hoc_stream = unique(&ad_hoc)[0].body["stream"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(ad_hoc_stream.starts_with("fleet@~"), "{ad_hoc_stream}");

    // Changes to one route or the other, each followed by a wait longer than the views'
    // linger: the views stay (their endpoints follow them) and their chains never break.
    for step in 1..=6u64 {
        let (r1, r2) = (1 + step.div_ceil(2), 1 + step / 2);
        upstream.set(fleet(r1, r2));
        let (changed, still) = if step % 2 == 1 {
            ((&named, "fleet@r1", r1), (&ad_hoc, "fleet?route=R2", r2))
        } else {
            ((&ad_hoc, "fleet?route=R2", r2), (&named, "fleet@r1", r1))
        };
        let before = unique(still.0).len();
        converge(&app, changed.0, changed.1, changed.2).await;
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(
            unique(still.0).len(),
            before,
            "step {step}: a change outside {} sent something",
            still.1
        );
        converge(&app, still.0, still.1, still.2).await;
    }
    for (receiver, stream) in [(&named, "fleet@r1"), (&ad_hoc, ad_hoc_stream.as_str())] {
        let hits = unique(receiver);
        assert_eq!(hits.len(), 4, "{stream}: a snapshot and three patches");
        // `rebuild` checked each patch's `base_seq` is the previous delivery's `seq`.
        assert!(
            hits[1..]
                .iter()
                .all(|h| h.kind() == "stream.patch" && h.body["stream"] == stream),
            "{stream}: patches after the first snapshot: {:?}",
            hits.iter().map(|h| h.body.clone()).collect::<Vec<_>>()
        );
        assert!(
            hits.iter()
                .any(|h| h.kind() == "stream.patch"
                    && h.body["base_seq"].as_u64() < Some(h.seq() - 1)),
            "{stream}: the view's changes are sparse, and a patch follows the view's previous \
             change, not seq - 1"
        );
    }
    assert_eq!(app.metric("patchwire_view_evictions_total").await, 0.0);

    // The admin API names the problem.
    let admin = Admin::new(&app);
    for streams in [json!(["fleet@r1"]), json!(["fleet?route=R1"])] {
        let (status, body) = admin
            .call(
                "POST",
                "",
                Some(json!({"url": named.url(), "streams": streams})),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert!(body.to_string().contains("names a view"), "{body}");
    }
    app.stop().await;
}

crate::on_both_stores!(endpoints_on_views_receive_only_the_views_changes);

//! Off-the-shelf WebSocket clients against the real server: Python `websockets` (documents
//! rebuilt with Python `jsonpatch`) and Chromium's own `WebSocket` in a headless page. Each
//! rebuilds two streams on one connection, unsubscribes while changes flow, resumes exactly
//! after its connection drops, and is refused with SSE's causes and the connection's bounds.

use serde_json::{Value, json};

use crate::support::scripted::Scripted;
use crate::support::*;

fn fleet(n: u64) -> Value {
    json!({
        "tick": n,
        "vehicles": [{"id": "a", "km": n, "route": "R1"}, {"id": "b", "km": 2 * n, "route": "R2"}],
        "operator": "a long enough description of the operator of this fleet of vehicles",
    })
}

fn alerts(n: u64) -> Value {
    json!({
        "alerts": (0..n).map(|i| json!({"id": i, "text": format!("alerte n°{i} ✓")})).collect::<Vec<_>>(),
        "source": "a long enough description of where these alerts come from, to be patched",
    })
}

/// The same session for every client.
async fn scenario(mut client: Scripted) {
    let fleet_api = MockUpstream::start(fleet(1)).await;
    let alerts_api = MockUpstream::start(alerts(1)).await;
    let app = TestApp::from_toml(&format!(
        "[websocket]\nmax_subscriptions = 2\n\n{}\n{}",
        polled("fleet", &fleet_api.url()),
        polled("alerts", &alerts_api.url())
    ))
    .await;
    app.wait_for_seq("fleet", 1).await;
    app.wait_for_seq("alerts", 1).await;
    let url = format!("ws://{}/ws", app.addr);

    // Two streams on one connection, each rebuilt as changes flow.
    client.connect(&url).await;
    let subscribe =
        |id: &str, stream: &str| json!({"type": "subscribe", "id": id, "stream": stream});
    let answer = client
        .send(subscribe("f", "fleet"), &["subscribed", "refused"])
        .await;
    assert_eq!(
        answer,
        json!({"type": "subscribed", "id": "f", "stream": "fleet"})
    );
    let answer = client
        .send(subscribe("a", "alerts"), &["subscribed", "refused"])
        .await;
    assert_eq!(answer["stream"], "alerts");
    for n in 2..=3 {
        fleet_api.set(fleet(n));
        alerts_api.set(alerts(n));
        client.converge("fleet", &fleet(n)).await;
        client.converge("alerts", &alerts(n)).await;
    }

    // Bounds and refusals keep the connection open.
    let refused = client
        .send(subscribe("x", "nope"), &["subscribed", "refused"])
        .await;
    assert_eq!(refused["cause"], "too-many-subscriptions", "{refused}");
    let refused = client
        .send(
            json!({"type": "unsubscribe", "id": "zz"}),
            &["unsubscribed", "refused"],
        )
        .await;
    assert_eq!(
        (refused["status"].clone(), refused["cause"].clone()),
        (json!(404), json!("no-such-subscription"))
    );

    // Unsubscribed while changes flow: nothing more of that stream.
    let answer = client
        .send(json!({"type": "unsubscribe", "id": "a"}), &["unsubscribed"])
        .await;
    assert_eq!(answer["stream"], "alerts");
    alerts_api.set(alerts(7));
    app.wait_for_seq("alerts", 4).await;
    let refused = client
        .send(subscribe("x", "nope"), &["subscribed", "refused"])
        .await;
    assert_eq!(refused["cause"], "no-such-stream", "{refused}");
    fleet_api.set(fleet(4));
    client.converge("fleet", &fleet(4)).await;
    let state = client.state().await;
    assert_eq!(state["docs"]["alerts"], alerts(3));

    // The connection drops; changes go on; the subscription resumes exactly.
    client.drop_connection().await;
    let last = state["last"]["fleet"].as_str().unwrap().to_owned();
    for n in 5..=6 {
        fleet_api.set(fleet(n));
        app.wait_for_seq("fleet", n).await;
    }
    client.connect(&url).await;
    let mut resume = subscribe("f", "fleet");
    resume["last_event_id"] = Value::from(last);
    client.send(resume, &["subscribed"]).await;
    client.converge("fleet", &fleet(6)).await;
    let state = client.state().await;
    assert_eq!(
        state["snapshots"]["fleet"], 1,
        "resuming sends no snapshot: {state}"
    );
    assert_eq!(state["patches"]["fleet"], 5, "{state}");
    client.finish().await;
    app.wait_for_metric("patchwire_websocket_closes_total", 2.0, SOON)
        .await;
    app.stop().await;
}

#[tokio::test]
async fn python_websockets_rebuilds_several_streams_on_one_connection() {
    if let Some(client) = Scripted::python().await {
        scenario(client).await;
    }
}

#[tokio::test]
async fn chromium_websocket_rebuilds_several_streams_on_one_connection() {
    if let Some(client) = Scripted::chromium().await {
        scenario(client).await;
    }
}

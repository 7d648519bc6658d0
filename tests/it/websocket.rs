//! The WebSocket transport through the real server with a Rust client: several streams on one
//! connection, subscribe and unsubscribe while changes flow, exact resume after the connection
//! drops, refusals with SSE's causes, bounds with their close codes, tokens of the proxy mode,
//! and an upgrade that reaches hyper (a later request of a keep-alive connection).

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use patchwire::config::Config;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::proxy::{TOKEN, proxy_toml};
use crate::support::upstream::caller_document;
use crate::support::ws::{Ended, WsClient, WsDocuments};
use crate::support::*;

/// Documents large enough that a change is a patch, not a new snapshot.
fn fleet(n: u64) -> Value {
    json!({
        "tick": n,
        "vehicles": [{"id": "a", "km": n}, {"id": "b", "km": 2 * n}],
        "operator": "a long enough description of the operator of this fleet of vehicles",
    })
}

fn alerts(n: u64) -> Value {
    json!({
        "alerts": (0..n).map(|i| json!({"id": i, "text": format!("alert {i}")})).collect::<Vec<_>>(),
        "source": "a long enough description of where these alerts come from, to be patched",
    })
}

/// Two polled streams, `fleet` and `alerts`, configured from `toml` (a `[websocket]` table,
/// or nothing for its defaults), with `adjust` setting what a file cannot.
async fn two_streams_with(
    toml: &str,
    adjust: impl FnOnce(&mut Config),
) -> (TestApp, MockUpstream, MockUpstream) {
    let fleet_api = MockUpstream::start(fleet(1)).await;
    let alerts_api = MockUpstream::start(alerts(1)).await;
    let mut config = config_from_toml(&format!(
        "{toml}\n{}\n{}",
        polled("fleet", &fleet_api.url()),
        polled("alerts", &alerts_api.url())
    ));
    adjust(&mut config);
    (TestApp::spawn(config).await, fleet_api, alerts_api)
}

/// Two polled streams, `fleet` and `alerts`, configured from `toml`.
async fn two_streams(toml: &str) -> (TestApp, MockUpstream, MockUpstream) {
    two_streams_with(toml, |_| {}).await
}

/// Sends `message` and returns the `refused` answer.
async fn refused(client: &mut WsClient, message: Value) -> Value {
    client.send(message).await;
    client.until("refused").await
}

#[tokio::test]
async fn one_connection_rebuilds_several_streams_and_follows_subscriptions() {
    let (app, fleet_api, alerts_api) = two_streams("").await;
    app.wait_for_seq("fleet", 1).await;
    app.wait_for_seq("alerts", 1).await;
    let mut client = WsClient::connect(&app, "", &[]).await;
    client.subscribe("f", "fleet", None).await;
    assert_eq!(
        client.expect().await,
        json!({"type": "subscribed", "id": "f", "stream": "fleet"})
    );
    client.subscribe("a", "alerts", None).await;
    let mut docs = WsDocuments::default();
    // The first subscription's snapshot may come before or after the second's answer.
    loop {
        let message = client.expect().await;
        if message["type"] == "subscribed" {
            assert_eq!(
                message,
                json!({"type": "subscribed", "id": "a", "stream": "alerts"})
            );
            break;
        }
        assert!(docs.apply(&message), "{message}");
    }
    for n in 2..=4 {
        fleet_api.set(fleet(n));
        alerts_api.set(alerts(n));
        assert!(
            docs.converge(
                &mut client,
                &[("fleet", &fleet(n)), ("alerts", &alerts(n))],
                SOON
            )
            .await
        );
    }
    let fleet_doc = &docs.streams["fleet"];
    assert_eq!((fleet_doc.snapshots, fleet_doc.patches), (1, 3));
    assert!(
        fleet_doc.last_id.starts_with("fleet:"),
        "{}",
        fleet_doc.last_id
    );
    assert_eq!(app.metric("patchwire_websocket_subscriptions").await, 2.0);

    // Unsubscribed: acknowledged, and nothing more of that stream, while the other flows.
    client.send(json!({"type": "unsubscribe", "id": "a"})).await;
    loop {
        let message = client.expect().await;
        if message["type"] == "unsubscribed" {
            assert_eq!(
                message,
                json!({"type": "unsubscribed", "id": "a", "stream": "alerts"})
            );
            break;
        }
        docs.apply(&message);
    }
    alerts_api.set(alerts(9));
    app.wait_for_seq("alerts", 5).await;
    fleet_api.set(fleet(5));
    assert!(
        docs.converge(&mut client, &[("fleet", &fleet(5))], SOON)
            .await
    );
    assert_eq!(docs.document("alerts"), Some(&alerts(4)));
    // Subscribing again starts from the current snapshot.
    client.subscribe("a2", "alerts", None).await;
    assert_eq!(client.expect().await["type"], "subscribed");
    assert!(
        docs.converge(&mut client, &[("alerts", &alerts(9))], SOON)
            .await
    );
    assert_eq!(docs.streams["alerts"].snapshots, 2);
    client.close().await;
    app.wait_for_metric("patchwire_websocket_closes_total{code=\"1000\"", 1.0, SOON)
        .await;
    app.stop().await;
}

#[tokio::test]
async fn a_resumed_subscription_gets_exactly_what_it_missed() {
    let (app, fleet_api, _alerts_api) = two_streams("").await;
    app.wait_for_seq("fleet", 1).await;
    let mut client = WsClient::connect(&app, "", &[]).await;
    client.subscribe("f", "fleet", None).await;
    let mut docs = WsDocuments::default();
    assert_eq!(client.expect().await["type"], "subscribed");
    for n in 2..=3 {
        fleet_api.set(fleet(n));
        assert!(
            docs.converge(&mut client, &[("fleet", &fleet(n))], SOON)
                .await
        );
    }
    let last = docs.streams["fleet"].last_id.clone();
    drop(client);
    for n in 4..=6 {
        fleet_api.set(fleet(n));
        app.wait_for_seq("fleet", n).await;
    }
    let mut client = WsClient::connect(&app, "", &[]).await;
    client.subscribe("f", "fleet", Some(&last)).await;
    assert_eq!(client.expect().await["type"], "subscribed");
    let (prefix, _) = last.rsplit_once(':').unwrap();
    for seq in 4..=6 {
        let message = client.expect().await;
        assert_eq!(message["type"], "patch", "{message}");
        assert_eq!(message["id"], format!("{prefix}:{seq}"));
        docs.apply(&message);
    }
    assert_eq!(docs.document("fleet"), Some(&fleet(6)));
    assert_eq!(
        docs.streams["fleet"].snapshots, 1,
        "resuming sends no snapshot"
    );
    // An id that cannot be honoured gets the current snapshot, never an error.
    client.subscribe("g", "alerts", Some("alerts:1:999")).await;
    assert_eq!(client.expect().await["type"], "subscribed");
    assert_eq!(client.expect().await["type"], "snapshot");
    app.stop().await;
}

#[tokio::test]
async fn refusals_name_their_cause_and_keep_the_connection() {
    let (app, _fleet, _alerts) = two_streams("[websocket]\nmax_subscriptions = 2\n").await;
    let mut client = WsClient::connect(&app, "", &[]).await;
    let answer = refused(
        &mut client,
        json!({"type": "subscribe", "id": "x", "stream": "nope"}),
    )
    .await;
    assert_eq!(
        (&answer["id"], &answer["status"], &answer["cause"]),
        (&json!("x"), &json!(404), &json!("no-such-stream"))
    );
    let answer = refused(&mut client, json!({"type": "subscribe", "id": "x"})).await;
    assert_eq!(answer["cause"], "invalid-message");
    assert_eq!(answer["status"], 400);
    client.send_raw(Message::Text("{not json".into())).await;
    assert_eq!(client.until("refused").await["cause"], "invalid-message");
    let answer = refused(
        &mut client,
        json!({"type": "subscribe", "id": "p", "url": "http://127.0.0.1:1/x"}),
    )
    .await;
    assert_eq!(answer["cause"], "proxy-disabled", "{answer}");

    client.subscribe("f", "fleet", None).await;
    assert_eq!(client.until("subscribed").await["id"], "f");
    let answer = refused(
        &mut client,
        json!({"type": "subscribe", "id": "f", "stream": "alerts"}),
    )
    .await;
    assert_eq!(answer["cause"], "duplicate-id");
    let answer = refused(
        &mut client,
        json!({"type": "subscribe", "id": "f2", "stream": "fleet"}),
    )
    .await;
    assert_eq!(answer["cause"], "already-subscribed");
    client.subscribe("a", "alerts", None).await;
    assert_eq!(client.until("subscribed").await["id"], "a");
    let answer = refused(
        &mut client,
        json!({"type": "subscribe", "id": "c", "stream": "fleet"}),
    )
    .await;
    assert_eq!(
        (answer["status"].clone(), answer["cause"].clone()),
        (json!(429), json!("too-many-subscriptions"))
    );
    let answer = refused(&mut client, json!({"type": "unsubscribe", "id": "zz"})).await;
    assert_eq!(answer["cause"], "no-such-subscription");
    client
        .send(json!({"type": "ping", "data": [1, "two"]}))
        .await;
    assert_eq!(
        client.until("pong").await,
        json!({"type": "pong", "data": [1, "two"]})
    );
    assert!(
        app.metric("patchwire_websocket_refusals_total{cause=\"invalid-message\"")
            .await
            >= 2.0
    );
    app.stop().await;
}

#[tokio::test]
async fn bounds_close_the_connection_with_a_clear_code() {
    let toml = "[websocket]\nmax_message_size = \"1 KiB\"\nmax_messages_per_second = 5\n";
    let (app, _fleet, _alerts) = two_streams_with(toml, |config| {
        // Below the floors of a file's ping_interval (1s) and idle_timeout (2s), which spare
        // real clients on slow links: the idle close is waited for here, within SOON.
        config.websocket.ping_interval = Duration::from_millis(200);
        config.websocket.idle_timeout = Duration::from_millis(700);
    })
    .await;

    let mut client = WsClient::connect(&app, "", &[]).await;
    let big = "x".repeat(2000);
    client.send(json!({"type": "ping", "data": big})).await;
    match client.ended(SOON).await {
        Ended::Closed(1009, reason) => {
            assert!(reason.contains("over the limit of 1024"), "{reason}")
        }
        other => panic!("expected a 1009 close, got {other:?}"),
    }

    let mut client = WsClient::connect(&app, "", &[]).await;
    client.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert!(matches!(client.ended(SOON).await, Ended::Closed(1003, _)));

    let mut client = WsClient::connect(&app, "", &[]).await;
    for _ in 0..10 {
        client.send(json!({"type": "ping"})).await;
    }
    let mut pongs = 0;
    let refusal = loop {
        let message = client.expect().await;
        if message["type"] == "pong" {
            pongs += 1;
            continue;
        }
        break message;
    };
    // A burst of max_messages_per_second (and what refilled meanwhile, on a slow machine).
    assert!((5..10).contains(&pongs), "{pongs} pongs");
    assert_eq!(refusal["cause"], "too-many-messages");
    assert_eq!(
        client.ended(SOON).await,
        Ended::Closed(1008, "too-many-messages".into())
    );

    // A client that never reads (so never answers pings) is closed once idle_timeout passes.
    let client = WsClient::connect(&app, "", &[]).await;
    app.wait_for_metric("patchwire_websocket_closes_total{code=\"4000\"", 1.0, SOON)
        .await;
    drop(client);
    // Not a WebSocket request: 426 with a message.
    let response = reqwest::get(app.url("/ws")).await.unwrap();
    assert_eq!(response.status(), 426);
    assert_eq!(response.headers()["upgrade"], "websocket");
    app.stop().await;
}

/// The proxy mode of the proxy tests, its `tests` token allowing 3 connections.
fn proxied() -> String {
    proxy_toml("", "max_connections = 3", "")
}

#[tokio::test]
async fn dynamic_streams_need_a_token_whose_limits_count_connections_and_subscriptions() {
    let api = MockUpstream::per_caller().await;
    let app = TestApp::from_toml(&proxied()).await;
    let url = api.url_at("/v1/prices");

    // No token: refused with the proxy's cause; the connection stays.
    let mut anonymous = WsClient::connect(&app, "", &[]).await;
    anonymous
        .send(json!({"type": "subscribe", "id": "p", "url": url}))
        .await;
    let answer = anonymous.until("refused").await;
    assert_eq!(
        (answer["status"].clone(), answer["cause"].clone()),
        (json!(401), json!("token-missing"))
    );

    // A bad token in the handshake: refused, then closed with 1008.
    let mut bad = WsClient::connect(&app, "?X-Sd-Token=not-a-token-0123456789", &[]).await;
    assert_eq!(bad.expect().await["cause"], "token-unknown");
    assert_eq!(
        bad.ended(SOON).await,
        Ended::Closed(1008, "token-unknown".into())
    );

    // The token as the first message: one slot for the connection, one per subscription.
    let mut client = WsClient::connect(&app, "", &[]).await;
    client.send(json!({"type": "auth", "token": TOKEN})).await;
    assert_eq!(
        client.expect().await,
        json!({"type": "authenticated", "token": "tests"})
    );
    client
        .send(json!({"type": "subscribe", "id": "p", "url": url}))
        .await;
    let subscribed = client.until("subscribed").await;
    let stream = subscribed["stream"].as_str().unwrap().to_owned();
    assert!(stream.starts_with('~'), "{stream}");
    let mut docs = WsDocuments::default();
    assert!(
        docs.converge(
            &mut client,
            &[(stream.as_str(), &caller_document("anonymous", 0))],
            SOON
        )
        .await
    );
    api.set_version(1);
    assert!(
        docs.converge(
            &mut client,
            &[(stream.as_str(), &caller_document("anonymous", 1))],
            SOON
        )
        .await
    );
    // The same stream by its native name is the same stream: already subscribed.
    client.subscribe("v", &stream, None).await;
    assert_eq!(client.until("refused").await["cause"], "already-subscribed");
    // A second URL takes the third slot; a third is over the token's max_connections (3).
    client
        .send(json!({"type": "subscribe", "id": "q", "url": api.url_at("/v1/other")}))
        .await;
    assert_eq!(client.until("subscribed").await["id"], "q");
    client
        .send(json!({"type": "subscribe", "id": "r", "url": api.url_at("/v1/third")}))
        .await;
    let answer = client.until("refused").await;
    assert_eq!(
        (answer["id"].clone(), answer["cause"].clone()),
        (json!("r"), json!("too-many-connections"))
    );
    // Unsubscribing gives the slot back.
    client.send(json!({"type": "unsubscribe", "id": "q"})).await;
    client.until("unsubscribed").await;
    client
        .send(json!({"type": "subscribe", "id": "r", "url": api.url_at("/v1/third")}))
        .await;
    assert_eq!(client.until("subscribed").await["id"], "r");

    // Resume by native name after the connection drops: exact.
    let last = docs.streams[&stream].last_id.clone();
    client.close().await;
    api.set_version(2);
    let mut again = WsClient::connect(&app, &format!("?X-Sd-Token={TOKEN}"), &[]).await;
    assert_eq!(again.expect().await["type"], "authenticated");
    again.subscribe("p", &stream, Some(&last)).await;
    assert_eq!(again.until("subscribed").await["stream"], stream.as_str());
    let next = again.expect().await;
    assert_eq!(next["type"], "patch", "{next}");
    docs.apply(&next);
    assert_eq!(
        docs.document(&stream),
        Some(&caller_document("anonymous", 2))
    );
    app.stop().await;
}

#[tokio::test]
async fn an_upgrade_on_a_reused_connection_is_served_through_hyper() {
    let (app, _fleet, _alerts) = two_streams("").await;
    app.wait_for_seq("fleet", 1).await;
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1);
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    ws.send(Message::Text(
        json!({"type": "subscribe", "id": "f", "stream": "fleet"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        if let Some(Ok(Message::Text(text))) = ws.next().await {
            let message: Value = serde_json::from_str(&text).unwrap();
            kinds.push(message["type"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(kinds, ["subscribed", "snapshot"]);
    assert_eq!(app.metric("patchwire_websocket_connections").await, 1.0);
    app.stop().await;
}

/// `patchwire-load`'s WebSocket mode against the real server: every subscriber gets every
/// change, in order, from the same shared messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_delivers_every_change_to_websocket_subscribers() {
    use clap::Parser as _;

    const PUSH_TOKEN: &str = "ws-load-token-0123456789";
    let app = TestApp::from_toml(&format!(
        r#"
[push]
token = "{PUSH_TOKEN}"
max_body = "1 MiB"

[[streams]]
name = "bench"
source = "push"
history = 100
history_bytes = "16 MiB"
"#
    ))
    .await;
    let auth = format!("Authorization: Bearer {PUSH_TOKEN}");
    let argv = [
        "patchwire-load".to_owned(),
        "--url".to_owned(),
        format!("ws://{}/ws", app.addr),
        "--ws-message".to_owned(),
        json!({"type": "subscribe", "id": "b", "stream": "bench"}).to_string(),
        "--publish-url".to_owned(),
        app.url("/streams/bench"),
        "--header".to_owned(),
        auth,
        "--changes".to_owned(),
        "5".to_owned(),
        "--interval".to_owned(),
        "50ms".to_owned(),
        "-n".to_owned(),
        "100".to_owned(),
        "--settle".to_owned(),
        "100ms".to_owned(),
        "--drain-timeout".to_owned(),
        "5s".to_owned(),
    ];
    let plan = patchwire_load::Args::try_parse_from(argv)
        .unwrap()
        .validate()
        .expect("a valid plan");
    let report = patchwire_load::run(&plan, None)
        .await
        .expect("the run completes");
    assert_eq!(
        (report.readers, report.rejected, report.failed),
        (100, 0, 0),
        "{report}"
    );
    assert_eq!(report.delivered, 500, "{report}");
    assert_eq!(
        (report.missing, report.out_of_order, report.duplicates),
        (0, 0, 0),
        "{report}"
    );
    assert!(app.metric("patchwire_websocket_messages_sent_total").await >= 600.0);
    app.stop().await;
}

/// A client that stops reading while large changes flow falls behind the stream's buffer and,
/// once it reads again, gets a fresh snapshot of its subscription (as an SSE subscriber
/// would), then the live changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_resynced_with_a_snapshot() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    const PUSH_TOKEN: &str = "ws-slow-token-0123456789";
    let app = TestApp::from_toml(&format!(
        r#"
[server]
subscriber_buffer = 8
stall_timeout = "30s"

[push]
token = "{PUSH_TOKEN}"
max_body = "8 MiB"

[[streams]]
name = "big"
source = "push"
history = 4
history_bytes = "64 MiB"
"#
    ))
    .await;
    let push = |n: usize| {
        let app_url = app.url("/streams/big");
        async move {
            // Every change replaces a large value: a large patch.
            let body = json!({"n": n, "blob": format!("{n}-").repeat(40_000)});
            let response = reqwest::Client::new()
                .post(app_url)
                .bearer_auth(PUSH_TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success());
            body
        }
    };
    push(0).await;
    // A client with a small receive buffer, which then stops reading.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(app.addr).await.unwrap();
    let request = format!("ws://{}/ws", app.addr)
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    let subscribe = json!({"type": "subscribe", "id": "b", "stream": "big"});
    ws.send(Message::Text(subscribe.to_string().into()))
        .await
        .unwrap();
    let mut last = Value::Null;
    for n in 1..=60 {
        last = push(n).await;
    }
    // Reading again: a snapshot comes after the backlog, and the document ends current.
    let mut docs = WsDocuments::default();
    let mut snapshots = 0;
    loop {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("the connection ended");
        };
        let message: Value = serde_json::from_str(&text).unwrap();
        if message["type"] == "snapshot" {
            snapshots += 1;
        }
        docs.apply(&message);
        if docs.document("big") == Some(&last) {
            break;
        }
    }
    assert!(
        snapshots >= 2,
        "the first snapshot, then a resync: {snapshots}"
    );
    assert!(app.metric("patchwire_websocket_resyncs_total").await >= 1.0);
    app.stop().await;
}

/// Shutdown closes every connection with 1001 (going away), subscriptions or not.
#[tokio::test]
async fn shutdown_closes_connections_with_going_away() {
    let (app, _fleet, _alerts) = two_streams("").await;
    let mut subscribed = WsClient::connect(&app, "", &[]).await;
    subscribed.subscribe("f", "fleet", None).await;
    assert_eq!(subscribed.until("subscribed").await["id"], "f");
    let mut idle = WsClient::connect(&app, "", &[]).await;
    app.wait_for_metric("patchwire_websocket_connections", 2.0, SOON)
        .await;
    app.shutdown.cancel();
    for client in [&mut subscribed, &mut idle] {
        assert!(
            matches!(client.ended(SOON).await, Ended::Closed(1001, _)),
            "a close frame with 1001"
        );
    }
    app.stop().await;
}

//! No configured secret ever reaches an output. A configuration loaded from TOML puts random
//! secrets (through `${VAR}`) in a stream's userinfo, query and headers, a webhook endpoint's
//! userinfo, query and headers, a proxy token and the admin token; the real app then fails to
//! poll and to deliver, serves a dynamic stream, and is read through every window an operator
//! or a subscriber has: SSE events (native and Streamdata), `/streams`, `/metrics`, the admin
//! API, `patchwire check`'s description and the logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;

use crate::support::*;

/// Every log line written while a test runs on the current thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Secrets {
    stream: String,
    hook: String,
    token: String,
    admin: String,
}

impl Secrets {
    fn all(&self) -> [&str; 4] {
        [&self.stream, &self.hook, &self.token, &self.admin]
    }

    fn env(&self, name: &str) -> Option<String> {
        match name {
            "STREAM_SECRET" => Some(self.stream.clone()),
            "HOOK_SECRET" => Some(self.hook.clone()),
            "PROXY_TOKEN" => Some(self.token.clone()),
            "ADMIN_TOKEN" => Some(self.admin.clone()),
            _ => None,
        }
    }
}

async fn get(url: &str, bearer: Option<&str>) -> String {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.text().await.unwrap()
}

/// Reads events until `errors` `error` events arrived; returns them all as text.
async fn events_until_errors(client: &mut SseClient, errors: usize) -> String {
    let mut seen = 0;
    let mut text = String::new();
    while seen < errors {
        let event = client.expect(SOON).await;
        seen += usize::from(event.event == "error");
        text.push_str(&format!("{}\n{}\n{}\n", event.id, event.event, event.data));
    }
    text
}

async fn run(secrets: Secrets) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    // The test's runtime is single-threaded: every task of the app logs here.
    let _logging = tracing::subscriber::set_default(subscriber);

    let upstream = MockUpstream::start(json!({"n": 1})).await;
    let closed_port = free_port();
    let port = upstream.addr().port();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[upstream.backoff]
initial = "100ms"
max = "200ms"
jitter = 0.0

[[streams]]
name = "secretive"
url = "http://user-${{STREAM_SECRET}}:${{STREAM_SECRET}}@127.0.0.1:{port}/doc?key=${{STREAM_SECRET}}&format=json#${{STREAM_SECRET}}"
interval = "100ms"
[streams.headers]
Authorization = "Bearer ${{STREAM_SECRET}}"

[webhooks]
database = "{db}"
allow_private_targets = true
admin_token = "${{ADMIN_TOKEN}}"
schedule = ["0s", "100ms", "100ms"]
attempt_timeout = "500ms"

[[webhooks.endpoints]]
id = "hook"
url = "http://hook-${{HOOK_SECRET}}:${{HOOK_SECRET}}@127.0.0.1:{closed_port}/in?token=${{HOOK_SECRET}}"
streams = ["secretive"]
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
[webhooks.endpoints.headers]
X-Key = "${{HOOK_SECRET}}"

[proxy]
enabled = true
allowed_hosts = ["127.0.0.1"]
allow_private = true
interval = "100ms"
[[proxy.tokens]]
name = "app"
token = "${{PROXY_TOKEN}}"
"#,
        db = dir.path().join("outbox.db").display(),
    );
    let path = dir.path().join("patchwire.toml");
    std::fs::write(&path, toml).unwrap();
    let config = patchwire::config::load_with(&path, &|name| secrets.env(name), Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));

    let mut outputs = vec![patchwire::config::describe(&config)];
    let app = TestApp::spawn(config).await;
    let mut native = app.subscribe("secretive", &[]).await;
    assert_eq!(native.expect(SOON).await.event, "snapshot");
    let dynamic_url = app.url(&format!(
        "/{}?key={}&X-Sd-Token={}",
        upstream.url(),
        secrets.stream,
        secrets.token
    ));
    let mut dynamic = SseClient::connect(&dynamic_url, &[], false).await;
    assert_eq!(dynamic.expect(SOON).await.event, "data");

    upstream.fail(Failure::Status(500, None));
    outputs.push(events_until_errors(&mut native, 2).await);
    outputs.push(events_until_errors(&mut dynamic, 2).await);
    let admin = Some(secrets.admin.as_str());
    // The snapshot's delivery fails (nothing listens there) and records why.
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let deliveries = get(&app.url("/admin/webhooks/hook/deliveries"), admin).await;
        let attempted = serde_json::from_str::<serde_json::Value>(&deliveries)
            .unwrap()
            .to_string()
            .contains("\"last_error\":\"");
        outputs.push(deliveries);
        if attempted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery attempt recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    outputs.push(get(&app.url("/admin/webhooks"), admin).await);
    outputs.push(get(&app.url("/admin/webhooks/hook"), admin).await);
    outputs.push(get(&app.url("/streams"), None).await);
    outputs.push(get(&app.url("/metrics"), None).await);
    drop((native, dynamic));
    app.stop().await;
    outputs.push(String::from_utf8(logs.0.lock().unwrap().clone()).unwrap());

    let everything = outputs.join("\n");
    for secret in secrets.all() {
        for (i, output) in outputs.iter().enumerate() {
            assert!(
                !output.contains(secret),
                "output {i} shows a secret:\n{output}"
            );
        }
    }
    // The windows were open: the outputs do show what they are about.
    for expected in [
        "127.0.0.1",
        "key=REDACTED",
        "format=json",
        "HTTP 500",
        "poll failed",
    ] {
        assert!(
            everything.contains(expected),
            "{expected:?} missing from the outputs"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3))]

    #[test]
    fn no_configured_secret_reaches_any_output(
        stream in "[A-Za-z0-9]{20}",
        hook in "[A-Za-z0-9]{20}",
        token in "[A-Za-z0-9]{20}",
        admin in "[A-Za-z0-9]{20}",
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(Secrets { stream, hook, token, admin }));
    }
}

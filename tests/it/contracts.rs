//! The contracts (`/asyncapi.json`, `/openapi.json`, `patchwire asyncapi|openapi`) checked by
//! their own ecosystems' tools: the AsyncAPI Initiative's parser (`@asyncapi/parser`, run with
//! Node from `tests/contracts/`, installed there by `npm ci`), Python's `jsonschema` (the
//! schemas against the documents actually streamed) and `openapi-spec-validator`, and
//! Schemathesis, which property-tests every operation of the OpenAPI document against a live
//! server. Each skips with a message when its tool is missing, except under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::{BASE, Rebuilt, Receiver, SseClient, TestApp, free_port, over};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/contracts/`: the Node package of the AsyncAPI parser and the checking scripts.
fn tools_dir() -> PathBuf {
    repo().join("tests/contracts")
}

fn skip<T>(why: &str) -> Option<T> {
    patchwire_test_data::skip(why)
}

/// Node with `@asyncapi/parser` installed in `tests/contracts/`, or a skip.
fn asyncapi_parser() -> Option<()> {
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return skip(
            "node is not installed: the AsyncAPI documents are not checked by @asyncapi/parser",
        );
    }
    if !tools_dir().join("node_modules/@asyncapi/parser").exists() {
        return skip("@asyncapi/parser is not installed: run `npm ci` in tests/contracts");
    }
    Some(())
}

/// `python3` with `module` importable, or a skip.
fn python_module(module: &str, package: &str) -> Option<()> {
    let found = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output();
    if found.is_ok_and(|o| o.status.success()) {
        Some(())
    } else {
        skip(&format!(
            "the Python package {package} is not installed (python3 -m pip install {package})"
        ))
    }
}

fn show(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `node validate-asyncapi.mjs files...`; panics with the parser's diagnostics on failure.
fn assert_valid_asyncapi(files: &[PathBuf]) {
    let output = Command::new("node")
        .arg("validate-asyncapi.mjs")
        .args(files)
        .current_dir(tools_dir())
        .output()
        .expect("node runs");
    let shown = show(&output);
    assert!(
        output.status.success(),
        "@asyncapi/parser refused:\n{shown}"
    );
    for file in files {
        assert!(
            shown.contains(&format!("{}: valid AsyncAPI 3.0.0", file.display())),
            "{shown}"
        );
    }
    eprintln!("{shown}");
}

/// The binary, run from the crate root with the examples' environment and no `PATCHWIRE_*`
/// overrides.
fn patchwire(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_patchwire"));
    command.current_dir(repo()).args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PATCHWIRE") {
            command.env_remove(name);
        }
    }
    command
        .env("API_TOKEN", "tok-123-secret")
        .env("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .env("PATCHWIRE_ADMIN_TOKEN", "tok-123-secret-admin")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs")
}

/// A configuration with everything the contracts describe: views (one projecting, one by
/// expression), `allow_move`, a `schema` file, a `gtfs-rt` stream, a push stream, webhooks and
/// their admin API, the proxy mode and both broker sinks. Returns its directory and path.
fn everything() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("config/schemas/fleet.json"),
        dir.path().join("fleet.json"),
    )
    .unwrap();
    let path = dir.path().join("everything.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "0.0.0.0:8080"

[push]
token = "push-token-0123456789"

[[streams]]
name = "fleet"
url = "http://127.0.0.1:8081/feeds/fleet"
schema = "fleet.json"
[streams.diff]
allow_move = true
[streams.filtering]
entities = "/vehicles"
key = "id"
aliases = { route = "route" }
[[streams.views]]
name = "r1"
filter = { route = "R1" }
[[streams.views]]
name = "positions"
filter = { route = "R2" }
fields = ["position"]
[[streams.views]]
name = "stopped"
where = "@.status == 'STOPPED_AT'"

[[streams]]
name = "vehicle-positions"
url = "https://cdn.example.com/realtime/VehiclePositions.pb"
format = "gtfs-rt"

[[streams]]
name = "prices"
source = "push"

[webhooks]
database = "outbox.db"
admin_token = "admin-token-0123456789"
operator_url = "https://ops.example.com/patchwire"
operator_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
[[webhooks.endpoints]]
id = "billing"
url = "https://hooks.example.com/patchwire"
streams = ["prices"]
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
format = "cloudevents-binary"

[proxy]
enabled = true
allowed_hosts = ["api.example.com"]
[[proxy.tokens]]
name = "web"
token = "proxy-token-0123456789"

[[sinks.nats]]
url = "nats://127.0.0.1:4222"

[[sinks.redis]]
url = "redis://user:secret@127.0.0.1:6379"
streams = ["prices"]
mode = "snapshot"
"#,
    )
    .unwrap();
    (dir, path)
}

/// Every configuration file shipped (`config/`, `config/examples/`, its `cluster/`).
fn shipped() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["config", "config/examples", "config/examples/cluster"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if matches!(ext, "toml" | "yaml" | "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    files
}

/// `patchwire {command} --config file` for every shipped file and the everything file, each
/// written to `out`; checks that the command is deterministic and never shows a secret.
fn generate(command: &str, out: &Path) -> Vec<PathBuf> {
    let (_dir, everything) = everything();
    let mut written = Vec::new();
    for config in shipped().into_iter().chain([everything]) {
        let config = config.to_str().unwrap();
        let first = patchwire(&[command, "--config", config]);
        assert!(
            first.status.success(),
            "{command} {config}:\n{}",
            show(&first)
        );
        let again = patchwire(&[command, "--config", config]);
        assert_eq!(
            first.stdout, again.stdout,
            "{command} {config} is not deterministic"
        );
        let text = String::from_utf8(first.stdout).unwrap();
        for secret in [
            "tok-123-secret",
            "whsec_",
            "admin-token-",
            "push-token-",
            "user:secret",
        ] {
            assert!(
                !text.contains(secret),
                "{command} {config} shows {secret:?}"
            );
        }
        let name = Path::new(config).file_name().unwrap().to_string_lossy();
        let path = out.join(format!("{name}.{command}.json"));
        std::fs::write(&path, text).unwrap();
        written.push(path);
    }
    written
}

#[test]
fn every_shipped_configuration_gives_an_asyncapi_document_the_asyncapi_parser_accepts() {
    let Some(()) = asyncapi_parser() else { return };
    let out = tempfile::tempdir().unwrap();
    let files = generate("asyncapi", out.path());
    assert_valid_asyncapi(&files);
    // The everything file: a channel per stream and named view, push, webhooks, the proxy's
    // dialect, WebSocket and both brokers; its streams' schemas as configured.
    let doc: Value =
        serde_json::from_slice(&std::fs::read(files.last().unwrap()).unwrap()).unwrap();
    let channels = doc["channels"].as_object().unwrap();
    for channel in [
        "fleet",
        "fleet.views.r1",
        "fleet.views.positions",
        "fleet.views.stopped",
        "vehicle-positions",
        "prices",
        "prices.push",
        "prices.webhook",
        "proxy",
        "websocket",
        "sink-nats.fleet",
        "sink-redis.prices",
        "fleet.changes",
        "fleet.views.r1.changes",
        "prices.changes",
        "webhooks.operator",
    ] {
        assert!(
            channels.contains_key(channel),
            "no channel {channel}: {:?}",
            channels.keys()
        );
    }
    assert_eq!(channels["fleet.views.r1"]["address"], "/streams/fleet@r1");
    assert_eq!(
        channels["fleet.views.r1.changes"]["address"],
        "/streams/fleet@r1/changes"
    );
    let webhook: Vec<&String> = channels["prices.webhook"]["messages"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(webhook, ["delivery", "cloudevent", "cloudeventBinary"]);
    let schemas = &doc["components"]["schemas"];
    // The served envelopes are components under their own names, their `$defs` beside them.
    for (name, text) in patchwire::schemas::ALL {
        let served: Value = serde_json::from_str(text).unwrap();
        assert_eq!(schemas[name]["title"], served["title"], "{name}");
        assert_eq!(schemas[name]["required"], served["required"], "{name}");
    }
    assert_eq!(
        schemas["patchwire.changes.v1"]["properties"]["changes"]["items"]["$ref"],
        "#/components/schemas/patchwire.changes.v1.change"
    );
    assert_eq!(
        schemas["fleet.document"]["properties"]["vehicles"]["items"]["required"][0],
        "id"
    );
    assert_eq!(
        schemas["vehicle-positions.document"]["required"],
        json!(["header"])
    );
    assert!(
        schemas["fleet.views.positions.document"]["properties"]["vehicles"]["items"]
            .get("required")
            .is_none(),
        "a projecting view requires nothing"
    );
    let ops: Vec<&str> = schemas["PatchWithMove"]["items"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["properties"]["op"]["const"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["add", "remove", "replace", "move"]);
    assert_eq!(doc["servers"]["sink-redis"]["host"], "127.0.0.1:6379");
    let security = doc["components"]["securitySchemes"].as_object().unwrap();
    let names: Vec<&String> = security.keys().collect();
    assert_eq!(
        names,
        [
            "pushToken",
            "adminToken",
            "proxyTokenQuery",
            "proxyTokenHeader"
        ]
    );
}

#[test]
fn every_shipped_configuration_gives_a_valid_openapi_document() {
    let Some(()) = python_module("openapi_spec_validator", "openapi-spec-validator") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let files = generate("openapi", out.path());
    let script = "import json, sys\nfrom openapi_spec_validator import validate\n\
                  for f in sys.argv[1:]:\n    validate(json.load(open(f)))\n    print(f, 'valid')";
    let output = Command::new("python3")
        .args(["-c", script])
        .args(&files)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    // The everything file: catch-up per stream, named view and dynamic stream, polling on
    // request, reload, the served schemas, the console, every admin route.
    let doc: Value =
        serde_json::from_slice(&std::fs::read(files.last().unwrap()).unwrap()).unwrap();
    for (path, method) in [
        ("/streams/fleet/changes", "get"),
        ("/streams/fleet@r1/changes", "get"),
        ("/streams/prices/changes", "get"),
        ("/streams/{name}/poll", "post"),
        ("/admin/reload", "post"),
        ("/schemas/{file}", "get"),
        ("/", "get"),
        ("/console/console.js", "get"),
        ("/admin/webhooks/{id}/test", "post"),
        ("/admin/webhooks/{id}/recover", "post"),
        ("/admin/webhooks/{id}/attempts", "get"),
        ("/streams/~{id}/changes", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "no {method} {path}");
    }
    assert_eq!(
        doc["paths"]["/streams/fleet/changes"]["get"]["responses"]["410"]["content"]["application/json"]
            ["schema"]["$ref"],
        "#/components/schemas/patchwire.changes-gone.v1"
    );
}

#[test]
fn the_contract_commands_refuse_a_bad_configuration_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[streams]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/\"\ninterval = \"0s\"\nschema = \"missing.json\"\n",
    )
    .unwrap();
    for command in ["asyncapi", "openapi"] {
        let output = patchwire(&[command, "--config", path.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(2), "{}", show(&output));
        assert!(output.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&output.stderr);
        for needle in [
            "error: invalid configuration",
            "bad.toml: 2 problems",
            "`streams[0].interval`",
            "`streams[0].schema`: expected a readable JSON Schema file",
            "missing.json",
        ] {
            assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A simulator feed on a free port and the TOML of a `[simulator]` serving it.
fn simulator(vehicles: u32) -> (String, String) {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/feeds/fleet");
    let toml = format!(
        "[simulator]\nlisten = \"127.0.0.1:{port}\"\n[[simulator.feeds]]\nname = \"fleet\"\n\
         vehicles = {vehicles}\nroutes = 3\ntick = \"200ms\"\nchurn = 0.05\n"
    );
    (url, toml)
}

/// Waits until stream `name` has a document.
async fn first_document(app: &TestApp, name: &str) {
    for _ in 0..100 {
        if app.json_view(name).await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("stream {name} has no document");
}

/// The documents and patches a subscriber of `path` receives until it has `patches` patches.
async fn streamed(app: &TestApp, path: &str, patches: usize) -> (Vec<Value>, Vec<Value>) {
    let mut client = SseClient::connect(&app.url(path), &[], false).await;
    let mut rebuilt = Rebuilt::default();
    let (mut documents, mut sent) = (Vec::new(), Vec::new());
    while rebuilt.patches < patches {
        let event = client
            .next(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{path}: only {} patches", rebuilt.patches));
        rebuilt.apply(&event);
        if event.event == "patch" {
            sent.push(event.json());
        }
        if let Some(document) = &rebuilt.document {
            documents.push(document.clone());
        }
    }
    (documents, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_schemas_and_the_patch_schema_validate_what_is_streamed() {
    let Some(()) = python_module("jsonschema", "jsonschema") else {
        return;
    };
    let (url, sim) = simulator(40);
    let schema_file = repo().join("config/schemas/fleet.json");
    let app = TestApp::from_toml(&format!(
        r#"{sim}
[[streams]]
name = "fleet"
url = "{url}"
[streams.filtering]
entities = "/vehicles"
key = "id"
aliases = {{ route = "route" }}
[[streams.views]]
name = "r1"
filter = {{ route = "R1" }}
[[streams.views]]
name = "positions"
filter = {{ route = "R2" }}
fields = ["position"]

[[streams]]
name = "named"
url = "{url}"
schema = "{}"
"#,
        schema_file.display()
    ))
    .await;
    first_document(&app, "fleet").await;
    first_document(&app, "named").await;
    // The schemas served now: inferred from the current document, or the named file.
    let doc: Value = reqwest::get(app.url("/asyncapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let components = doc["components"]["schemas"].clone();
    assert!(
        components["fleet.document"]["description"]
            .as_str()
            .unwrap()
            .starts_with("Inferred"),
        "{}",
        components["fleet.document"]
    );
    let file: Value = serde_json::from_slice(&std::fs::read(&schema_file).unwrap()).unwrap();
    assert_eq!(components["named.document"], file);

    let mut checks = Vec::new();
    let mut all_patches = Vec::new();
    for (path, schema) in [
        ("/streams/fleet", "fleet.document"),
        ("/streams/fleet@r1", "fleet.views.r1.document"),
        ("/streams/fleet@positions", "fleet.views.positions.document"),
        ("/streams/named", "named.document"),
    ] {
        let (documents, patches) = streamed(&app, path, 8).await;
        checks.push(json!({"schema": schema, "instances": documents}));
        all_patches.extend(patches);
    }
    checks.push(json!({"schema": "Patch", "instances": all_patches}));
    let dir = tempfile::tempdir().unwrap();
    let checks_file = dir.path().join("checks.json");
    std::fs::write(
        &checks_file,
        serde_json::to_vec(&json!({"components": components, "checks": checks})).unwrap(),
    )
    .unwrap();
    let output = Command::new("python3")
        .arg(tools_dir().join("validate_instances.py"))
        .arg(&checks_file)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    eprintln!("{}", show(&output));

    // The live document, inferred schemas included, passes the AsyncAPI parser too.
    if asyncapi_parser().is_some() {
        let live = dir.path().join("live.json");
        std::fs::write(&live, serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_valid_asyncapi(&[live]);
    }
    app.stop().await;
}

/// Regressions of what Schemathesis found (kept as plain tests, so they run without it).
#[tokio::test]
async fn methods_and_malformed_parameters_answer_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::from_toml(&format!(
        r#"
[push]
token = "push-token-0123456789"
[[streams]]
name = "prices"
source = "push"
[webhooks]
database = "{}"
admin_token = "admin-token-0123456789"
"#,
        dir.path().join("outbox.db").display()
    ))
    .await;
    let client = reqwest::Client::new();
    let send = |method: &str, path: &str| {
        client
            .request(method.parse().unwrap(), app.url(path))
            .bearer_auth("admin-token-0123456789")
            .send()
    };
    // A method a path does not route is a 405 naming those it does (the push routes' token
    // check ran first, answering 401).
    let response = send("DELETE", "/streams/prices").await.unwrap();
    assert_eq!(response.status(), 405);
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let response = send("TRACE", "/ws").await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(send("HEAD", "/ws").await.unwrap().status(), 426);
    // Malformed admin parameters are JSON 400s, like every other refusal of the API.
    for path in [
        "/admin/webhooks/x/deliveries?limit=-1",
        "/admin/webhooks/x/dead-letters?unknown=1",
        "/admin/webhooks/x/deliveries/9223372036854775808/replay",
    ] {
        let method = if path.ends_with("replay") {
            "POST"
        } else {
            "GET"
        };
        let response = send(method, path).await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{path}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], 400, "{path}");
    }
    app.stop().await;
}

/// The Schemathesis configuration: the two bearer tokens by security scheme, and the one check
/// switched off for operations whose valid inputs a JSON Schema cannot describe (see
/// [`schemathesis_finds_nothing_against_a_live_server`]).
const SCHEMATHESIS_TOML: &str = r#"
[auth.openapi.pushToken]
bearer = "push-token-0123456789"
[auth.openapi.adminToken]
bearer = "admin-token-0123456789"

[[operations]]
include-operation-id-regex = "^getStream:"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "patchDocument:prices"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "websocket"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "proxyStream"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id-regex = "^catchUp:"
checks.positive_data_acceptance.enabled = false
parameters = { "query.wait" = "1s" }

[[operations]]
include-operation-id = "listWebhookAttempts"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id-regex = "^(recoverWebhook|replayWebhookDeadLetters)$"
checks.positive_data_acceptance.enabled = false

[auth.openapi.proxyTokenQuery]
api_key = "proxy-token-0123456789"
"#;

/// Schemathesis generates inputs for every operation of `/openapi.json` (valid and invalid
/// ones, examples, boundaries, then stateful sequences) and checks every answer against the
/// document: no 5xx, documented statuses, content types, headers and schemas, invalid input
/// refused, methods not routed answered 405. What is left out, and why:
/// - `createWebhook` and `updateWebhook`: their generated `url`s would make the server deliver
///   to arbitrary hosts (tests never reach the internet); the configured endpoint, to a local
///   receiver, gives the other admin operations a real id.
/// - `positive_data_acceptance` (schema-valid input must be accepted) for stream GETs (alias
///   values, `where` and `fields` have grammars, RFC 9535 and JSON Pointer lists, that a JSON
///   Schema does not describe; they are 400s with the reason), for `PATCH` (a well-formed patch
///   may not apply to the current document: 422), for `GET /ws` (an upgrade needs headers
///   OpenAPI cannot require; without them it is a 426), and for the proxy's `GET /{target}`
///   (its `X-Sd-Where`/`X-Sd-Fields` views have the same grammars).
/// - `positive_data_acceptance` for catch-up: `after` is an event id of the stream (or `now`),
///   which a JSON Schema cannot tie to the stream; and `wait` is fixed to `1s`, so that a
///   long-poll never outlasts the request timeout (a pattern cannot bound a duration).
/// - `positive_data_acceptance` for the attempt history (`until` must be after `since`) and
///   for recovery and dead-letter replay (`since` must be in the past): relations to each other
///   and to the clock that a JSON Schema cannot state; both are 4xx answers naming the field.
/// - SSE: every request asks for `Accept: application/json`, since an event stream never ends
///   (its events are the AsyncAPI document's, checked above).
/// - The proxy mode allows only 127.0.0.1, which its SSRF guard refuses (no
///   `allow_private`): generated targets never reach a network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_against_a_live_server() {
    let found = Command::new("schemathesis").arg("--version").output();
    if !found.is_ok_and(|o| o.status.success()) {
        skip::<()>("schemathesis is not installed (python3 -m pip install schemathesis)");
        return;
    }
    let receiver = Receiver::start(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]).await;
    let (url, sim) = simulator(20);
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"{sim}
[push]
token = "push-token-0123456789"

[[streams]]
name = "fleet"
url = "{url}"
[streams.filtering]
entities = "/vehicles"
key = "id"
aliases = {{ route = "route", status = "status" }}
[[streams.views]]
name = "r1"
filter = {{ route = "R1" }}
[[streams.views]]
name = "positions"
filter = {{ route = "R2" }}
fields = ["position"]

[[streams]]
name = "prices"
source = "push"

[proxy]
enabled = true
allowed_hosts = ["127.0.0.1"]
[[proxy.tokens]]
name = "web"
token = "proxy-token-0123456789"

[webhooks]
database = "{}"
admin_token = "admin-token-0123456789"
allow_private_targets = true
[[webhooks.endpoints]]
id = "local"
url = "{}"
streams = ["prices"]
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
"#,
        dir.path().join("outbox.db").display(),
        receiver.url(),
    );
    // From a file, so that `POST /admin/reload` reloads it (unchanged: a 200).
    let file = dir.path().join("patchwire.toml");
    std::fs::write(&file, over(BASE, &toml)).unwrap();
    let app =
        TestApp::spawn(patchwire::config::load(&file).unwrap_or_else(|e| panic!("{e}"))).await;
    first_document(&app, "fleet").await;
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, SCHEMATHESIS_TOML).unwrap();
    let spec = app.url("/openapi.json");
    let report = dir.path().join("report");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("schemathesis")
            .arg("--config-file")
            .arg(&config)
            .arg("--no-color")
            .args(["run", &spec])
            .args([
                "--max-examples",
                "15",
                "--seed",
                "1",
                "--request-timeout",
                "5",
            ])
            .args(["--header", "Accept: application/json"])
            .args(["--exclude-operation-id", "createWebhook"])
            .args(["--exclude-operation-id", "updateWebhook"])
            .arg("--report-dir")
            .arg(&report)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let shown = show(&output);
    assert!(
        output.status.success(),
        "Schemathesis found failures:\n{shown}"
    );
    assert!(shown.contains("Tested:"), "{shown}");
    eprintln!("{shown}");
    app.stop().await;
}

/// The GTFS-realtime projection's schema (what `/asyncapi.json` says of a `gtfs-rt` stream)
/// validates the projections of MBTA's real feeds: vehicle positions, trip updates, alerts.
#[test]
fn the_gtfs_rt_projection_schema_validates_real_feeds() {
    let Some(()) = python_module("jsonschema", "jsonschema") else {
        return;
    };
    let mut instances = Vec::new();
    for sequence in patchwire_test_data::GTFS_RT_SEQUENCES {
        let Some(bodies) = patchwire_test_data::gtfs_rt_bodies(sequence) else {
            return;
        };
        // A few polls of each: the first, one in the middle, the last.
        let picks = [0, bodies.len() / 2, bodies.len() - 1];
        for i in picks {
            let (name, body) = &bodies[i];
            let projected = patchwire::upstream::decode::gtfs_rt::decode(body)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            instances.push(projected);
        }
    }
    let schema = patchwire::upstream::decode::gtfs_rt::projection_schema();
    let dir = tempfile::tempdir().unwrap();
    let checks = dir.path().join("checks.json");
    std::fs::write(
        &checks,
        serde_json::to_vec(&json!({
            "components": {"projection": schema},
            "checks": [{"schema": "projection", "instances": instances}],
        }))
        .unwrap(),
    )
    .unwrap();
    let output = Command::new("python3")
        .arg(tools_dir().join("validate_instances.py"))
        .arg(&checks)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    assert!(
        show(&output).contains("projection: 9 instances checked"),
        "{}",
        show(&output)
    );
}

/// The served webhook envelope (`patchwire.webhook.v1`, as its components) describes and
/// validates every kind of delivery: changes, and the notices `stream.error` and
/// `stream.recovered` (before the first document too); a notice without its failure's
/// status, or with a type it does not know, is refused.
#[test]
fn the_webhook_envelope_validates_changes_errors_and_recoveries() {
    use patchwire::sinks::webhook::body::{
        NoticeKind, encode, encode_notice, error_data, recovery_data,
    };
    use patchwire::wire::ChangeKind;
    let Some(()) = python_module("jsonschema", "jsonschema") else {
        return;
    };
    let t = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    let json = |bytes: Vec<u8>| serde_json::from_slice::<Value>(&bytes).unwrap();
    let error = error_data(
        "fleet",
        2,
        7,
        502,
        "connect",
        "cannot reach the upstream",
        t,
        t,
        1500,
    );
    let early = error_data("fleet", 2, 0, 504, "timeout", "timed out", t, t, 1000);
    let valid = vec![
        json(encode(ChangeKind::Snapshot, "fleet", 2, 7, None, t, br#"{"a":1}"#).unwrap()),
        json(encode(ChangeKind::Patch, "fleet", 2, 8, Some(7), t, br#"[]"#).unwrap()),
        json(encode_notice(NoticeKind::Error, "fleet", 2, 7, t, &error)),
        json(encode_notice(NoticeKind::Error, "fleet", 2, 0, t, &early)),
        json(encode_notice(
            NoticeKind::Recovery,
            "fleet",
            2,
            7,
            t,
            &recovery_data("fleet", 2, 7, t, 4, t),
        )),
    ];
    let mut no_status = valid[2].clone();
    no_status["data"].as_object_mut().unwrap().remove("status");
    let mut unknown = valid[4].clone();
    unknown["type"] = json!("stream.gone");
    let mut recovery_as_error = valid[4].clone();
    recovery_as_error["type"] = json!("stream.error");
    let components = Value::Object(patchwire::contracts::schemas::envelopes());
    let run = |instances: Vec<Value>| {
        let dir = tempfile::tempdir().unwrap();
        let checks = dir.path().join("checks.json");
        std::fs::write(
            &checks,
            serde_json::to_vec(&json!({
                "components": components,
                "checks": [{"schema": "patchwire.webhook.v1", "instances": instances}],
            }))
            .unwrap(),
        )
        .unwrap();
        Command::new("python3")
            .arg(tools_dir().join("validate_instances.py"))
            .arg(&checks)
            .output()
            .unwrap()
    };
    let output = run(valid);
    assert!(output.status.success(), "{}", show(&output));
    for bad in [no_status, unknown, recovery_as_error] {
        let output = run(vec![bad.clone()]);
        assert!(!output.status.success(), "accepted: {bad}");
    }
}

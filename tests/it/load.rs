//! The load tool's library against the real application in-process: every subscriber gets
//! every change in order, stalls do not stop the others, and failures are reported clearly.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use patchwire_load::{self as load, Args, LoadError};
use serde_json::json;

use crate::support::{self, MockUpstream, TestApp, free_port};

const TOKEN: &str = "load-test-token-0123456789";

async fn push_app(polled: Option<&str>) -> TestApp {
    let polled = polled
        .map(|u| support::polled("polled", u))
        .unwrap_or_default();
    TestApp::from_toml(&format!(
        r#"
[server]
subscriber_buffer = 256

[push]
token = "{TOKEN}"
max_body = "1 MiB"

[[streams]]
name = "bench"
source = "push"
history = 100

{polled}
"#
    ))
    .await
}

/// The `patchwire-load` binary of this build. It belongs to another package of the workspace,
/// so Cargo does not hand its path to this test (`CARGO_BIN_EXE_*` is per package): it sits
/// beside this test's `deps/` directory once built (`cargo test --workspace` builds it), and
/// otherwise is built here with the same Cargo.
fn load_binary() -> std::path::PathBuf {
    let test_exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in <target>/<profile>/deps");
    let exe = profile_dir.join(format!("patchwire-load{}", std::env::consts::EXE_SUFFIX));
    if !exe.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "patchwire-load", "--bin", "patchwire-load"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo starts");
        assert!(status.success(), "cargo build -p patchwire-load failed");
    }
    assert!(exe.exists(), "{} was not built", exe.display());
    exe
}

fn args(app: &TestApp, extra: &[&str]) -> Args {
    let url = app.url("/streams/bench");
    let mut argv = vec![
        "patchwire-load".to_owned(),
        "--url".to_owned(),
        url.clone(),
        "--settle".to_owned(),
        "100ms".to_owned(),
        "--drain-timeout".to_owned(),
        "5s".to_owned(),
    ];
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    Args::try_parse_from(argv).expect("valid arguments")
}

fn publishing<'a>(app_url: &'a str, auth: &'a str) -> Vec<&'a str> {
    vec![
        "--publish-url",
        app_url,
        "--header",
        auth,
        "--changes",
        "5",
        "--interval",
        "50ms",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_subscribers_get_five_changes_in_order() {
    let app = push_app(None).await;
    let publish = app.url("/streams/bench");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let mut extra = publishing(&publish, &auth);
    let pid = std::process::id().to_string();
    extra.extend(["-n", "200", "--pid", &pid]);
    let plan = args(&app, &extra).validate().expect("a valid plan");

    let report = load::run(&plan, None).await.expect("the run completes");

    assert_eq!(
        (report.readers, report.rejected, report.failed),
        (200, 0, 0)
    );
    assert_eq!(report.changes, 5);
    assert_eq!(report.delivered, 1000, "{report}");
    assert_eq!((report.missing, report.out_of_order), (0, 0), "{report}");
    assert_eq!((report.duplicates, report.foreign), (0, 0), "{report}");
    assert!(!report.delivery_failed());
    let latency = report.latency_ms.expect("latencies");
    assert_eq!(latency.count, 1000);
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    assert_eq!(report.reach_all_ms.expect("reach-all").count, 5);
    // patchwire sends a small patch, not the 430-byte body: `[{"op":"replace",...}]`.
    assert!(
        report.wire_bytes_per_event > 50.0 && report.wire_bytes_per_event < 300.0,
        "{report}"
    );
    let server = report.server.expect("server measurements for --pid");
    assert!(server.cpu_s >= 0.0 && server.rss_idle_kib > 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_and_source_addresses_add_up() {
    let app = push_app(None).await;
    let publish = app.url("/streams/bench");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let mut extra = publishing(&publish, &auth);
    extra.extend([
        "-n",
        "90",
        "--workers",
        "3",
        "--source-addrs",
        "127.0.0.1,127.0.0.2",
    ]);
    let plan = args(&app, &extra).validate().expect("a valid plan");
    // The real binary, re-executed with --worker for each of the 3 parts.
    let exe = load_binary();

    let report = load::run(&plan, Some(&exe))
        .await
        .expect("the run completes");

    assert_eq!((report.processes, report.workers), (3, 3));
    assert_eq!(report.source_addrs, vec!["127.0.0.1", "127.0.0.2"]);
    assert_eq!((report.readers, report.delivered), (90, 450), "{report}");
    assert_eq!((report.missing, report.out_of_order), (0, 0), "{report}");
    assert_eq!(report.latency_ms.expect("latencies").count, 450);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_spread_over_several_urls_are_reported_per_url() {
    let app = push_app(None).await;
    let publish = app.url("/streams/bench");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let pid = std::process::id().to_string();
    let mut extra = publishing(&publish, &auth);
    // The same server under two URLs (a cluster's nodes in the benchmark), one --pid each and
    // one more (a cluster's Redis: counted in the total only), subscribers spread round-robin
    // over worker processes.
    extra.extend([
        "--url",
        &publish,
        "-n",
        "91",
        "--workers",
        "3",
        "--pid",
        &pid,
        "--pid",
        &pid,
        "--pid",
        &pid,
    ]);
    let plan = args(&app, &extra).validate().expect("a valid plan");
    let exe = load_binary();

    let report = load::run(&plan, Some(&exe))
        .await
        .expect("the run completes");

    assert_eq!((report.readers, report.delivered), (91, 455), "{report}");
    let per_url: Vec<(usize, u64, u64)> = report
        .targets
        .iter()
        .map(|t| (t.readers, t.delivered, t.missing))
        .collect();
    assert_eq!(per_url, vec![(46, 230, 0), (45, 225, 0)], "{report}");
    for target in &report.targets {
        assert_eq!(
            target.latency_ms.expect("latencies").count as u64,
            target.delivered
        );
        assert_eq!(target.pid, Some(std::process::id()));
        assert!(target.cpu_us_per_event.is_some(), "{report}");
    }
    let server = report.server.expect("server measurements for --pid");
    assert_eq!(server.processes.len(), 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscribers_do_not_hold_back_the_others() {
    let app = push_app(None).await;
    let publish = app.url("/streams/bench");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let mut extra = publishing(&publish, &auth);
    // Changes of 64 KiB each, so stalled sockets fill up.
    extra.extend([
        "-n",
        "50",
        "--stalled-fraction",
        "0.2",
        "--body-template",
        r#"{"m":"MARK@@K@@;","pad":"@@K@@-@@PAD@@"}"#,
        "--body-size",
        "65536",
    ]);
    let plan = args(&app, &extra).validate().expect("a valid plan");

    let report = load::run(&plan, None).await.expect("the run completes");

    assert_eq!((report.readers, report.stalled), (40, 10), "{report}");
    assert_eq!((report.delivered, report.missing), (200, 0), "{report}");
    assert!(report.wire_bytes_per_event > 65_000.0, "{report}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_is_an_error_that_says_why() {
    let app = push_app(None).await;
    let publish = app.url("/streams/bench");
    let extra = publishing(&publish, "Authorization: Bearer wrong-token-0123456789");
    let plan = args(&app, &[&extra[..], &["-n", "3"]].concat())
        .validate()
        .expect("a valid plan");

    let error = load::run(&plan, None).await.expect_err("401 fails the run");

    assert!(matches!(error, LoadError::Publish(_)), "{error:?}");
    assert!(error.to_string().contains("HTTP 401"), "{error}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_a_polled_stream_checks_order_and_delivery() {
    let upstream = Arc::new(MockUpstream::start(json!({"n": 0})).await);
    let app = push_app(Some(&upstream.url())).await;
    // Change the upstream every 150 ms (the stream polls every 100 ms) while watching.
    let changer = {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            for n in 1.. {
                tokio::time::sleep(Duration::from_millis(150)).await;
                upstream.set(json!({"n": n}));
            }
        })
    };
    let extra = [
        "-n",
        "20",
        "--duration",
        "2500ms",
        "--grace",
        "500ms",
        "--marker",
        "id: polled:",
    ];
    let mut args = args(&app, &extra);
    args.url = vec![app.url("/streams/polled")];
    let plan = args.validate().expect("a valid plan");

    let report = load::run(&plan, None).await.expect("the run completes");
    changer.abort();

    assert!(report.changes >= 5, "{report}");
    assert_eq!(report.delivered, 20 * report.changes as u64, "{report}");
    assert_eq!((report.missing, report.out_of_order), (0, 0), "{report}");
    assert!(report.latency_ms.is_none());
    app.stop().await;
}

#[tokio::test]
async fn nobody_connecting_is_an_error() {
    // A port nothing listens on.
    let url = format!("http://127.0.0.1:{}/streams/x", free_port());
    let plan = Args::try_parse_from([
        "patchwire-load",
        "--url",
        &url,
        "--publish-url",
        &url,
        "-n",
        "2",
    ])
    .expect("valid arguments")
    .validate()
    .expect("a valid plan");

    let error = load::run(&plan, None)
        .await
        .expect_err("nothing to connect to");

    assert!(matches!(error, LoadError::NobodyConnected(_)), "{error}");
    assert!(error.to_string().contains("connect"), "{error}");
}

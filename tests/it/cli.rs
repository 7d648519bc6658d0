//! The `patchwire` binary itself: `--version` and `--help`, `check` on every shipped
//! configuration and on bad ones, and `run` serving real subscribers until SIGTERM, with the
//! listener moved by an environment override.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use tempfile::TempDir;

use crate::support::free_port;

const SOON: Duration = Duration::from_secs(10);

/// The binary, run from the crate root with a clean `PATCHWIRE_*` environment and backtraces
/// on (so a panic would show in the output the tests check).
fn patchwire() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_patchwire"));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PATCHWIRE") {
            command.env_remove(name);
        }
    }
    command
        .env_remove("RUST_LOG")
        .env_remove("API_TOKEN")
        .env("RUST_BACKTRACE", "1");
    command
}

fn run(command: &mut Command) -> (Output, String, String) {
    let output = command.output().expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

fn assert_no_panic(text: &str) {
    for marker in ["panicked", "stack backtrace", "RUST_BACKTRACE", "unwrap()"] {
        assert!(!text.contains(marker), "{marker:?} in output:\n{text}");
    }
}

#[test]
fn version_and_help() {
    let (output, stdout, _) = run(patchwire().arg("--version"));
    assert!(output.status.success());
    assert_eq!(
        stdout.trim(),
        format!("patchwire {}", env!("CARGO_PKG_VERSION"))
    );

    let (output, stdout, _) = run(patchwire().arg("--help"));
    assert!(output.status.success());
    for needle in ["polling-to-push", "run", "check", "simulate", "--version"] {
        assert!(
            stdout.contains(needle),
            "--help lacks {needle:?}:\n{stdout}"
        );
    }
    let (output, stdout, _) = run(patchwire().args(["check", "--help"]));
    assert!(output.status.success());
    assert!(stdout.contains("--config"), "{stdout}");

    let (output, _, stderr) = run(patchwire().arg("--no-such-flag"));
    assert!(!output.status.success());
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
    assert_no_panic(&stderr);
}

fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["config", "config/examples"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn check_accepts_every_shipped_configuration() {
    let files = shipped_configs();
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        let secret = "test-token-0f9a";
        let (output, stdout, stderr) = run(patchwire()
            .args(["check", "--config"])
            .arg(&file)
            .env("API_TOKEN", secret)
            .env("PATCHWIRE_ADMIN_TOKEN", "tok-123-secret-admin")
            .env("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
        assert!(
            output.status.success(),
            "{}: {}\n{stderr}",
            file.display(),
            output.status
        );
        assert!(
            stdout.contains(&format!("{}: ok", file.display())),
            "{stdout}"
        );
        for secret in [
            secret,
            "tok-123-secret-admin",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "check printed a secret:\n{stdout}\n{stderr}"
            );
        }
    }
}

#[test]
fn check_rejects_bad_configurations_with_file_key_and_expectation() {
    const STREAM: &str = "[[streams]]\nname = \"a\"\nurl = \"http://example.com/a\"\n";
    let cases: Vec<(&str, String, &str, &[&str])> = vec![
        (
            "unknown.toml",
            format!("colour = \"red\"\n{STREAM}"),
            "`colour`",
            &["unknown key"],
        ),
        (
            "listen.toml",
            format!("[server]\nlisten = \"localhost\"\n{STREAM}"),
            "`server.listen`",
            &["IP address and port", "\"localhost\""],
        ),
        (
            "interval.toml",
            format!("{STREAM}interval = \"0s\"\n"),
            "`streams[0].interval`",
            &["between 100ms and"],
        ),
        (
            "url.toml",
            "[[streams]]\nname = \"a\"\nurl = \"not a url\"\n".to_owned(),
            "`streams[0].url`",
            &["absolute http or https URL"],
        ),
        (
            "missing.yaml",
            "streams:\n  - url: http://example.com/\n".to_owned(),
            "`streams[0].name`",
            &["missing required key"],
        ),
        (
            "syntax.toml",
            "[server\nlisten = 1\n".to_owned(),
            "line 1",
            &["invalid TOML syntax", "expected `]`"],
        ),
        (
            "syntax.yaml",
            "streams: [\n".to_owned(),
            "line 2",
            &["invalid YAML syntax"],
        ),
    ];
    let dir = TempDir::new().unwrap();
    for (name, text, key, expectations) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (output, stdout, stderr) = run(patchwire().args(["check", "--config"]).arg(&path));
        assert!(!output.status.success(), "{name} was accepted:\n{stdout}");
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{name}: the error does not name the file:\n{stderr}"
        );
        assert!(stderr.contains(key), "{name}: no {key} in:\n{stderr}");
        for expectation in expectations {
            assert!(
                stderr.contains(expectation),
                "{name}: no {expectation:?} in:\n{stderr}"
            );
        }
        assert_no_panic(&stderr);
        assert!(!stdout.contains(": ok"), "{name}: {stdout}");
    }

    // A missing file and a missing secret, both on the command line of a real run.
    let missing = dir.path().join("nope.toml");
    let (output, _, stderr) = run(patchwire().args(["run", "--config"]).arg(&missing));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
    assert_no_panic(&stderr);
    // Without a command, `--config` is `run`'s.
    let (output, _, stderr) = run(patchwire().arg("--config").arg(&missing));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    let (output, _, stderr) =
        run(patchwire().args(["check", "--config", "config/examples/json-api.toml"]));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.contains("API_TOKEN"), "{stderr}");
    assert!(
        stderr.contains("`streams[0].headers.Authorization`"),
        "{stderr}"
    );
    assert_no_panic(&stderr);
}

#[test]
fn check_prints_every_problem_at_once_naming_environment_variables() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nsubscriber_buffer = \"lots\"\n\
         [[streams]]\nname = \"a\"\nurl = \"http://example.com/a\"\nhistory = 1.5\n\
         [[streams]]\nname = \"b\"\nurl = \"http://example.com/b\"\ninterval = \"0s\"\n",
    )
    .unwrap();
    let (output, stdout, stderr) = run(patchwire()
        .args(["check", "--config"])
        .arg(&path)
        .env("PATCHWIRE__STREAMS__7__INTERVAL", "2s"));
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
    for needle in [
        "4 problems",
        "`server.subscriber_buffer`: expected a non-negative integer",
        "`streams[0].history`: expected a non-negative integer",
        "`streams[1].interval`",
        "`streams[7].interval`",
        "PATCHWIRE__STREAMS__7__INTERVAL",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in:\n{stderr}");
    }
    assert_no_panic(&stderr);
}

#[tokio::test]
async fn a_proxy_only_configuration_checks_and_runs() {
    let config = |api: u16, _: u16| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{api}\"\n[proxy]\nenabled = true\n\
             allowed_hosts = [\"api.example.com\"]\n[[proxy.tokens]]\nname = \"web\"\n\
             token = \"proxy-token-0123456789\"\n"
        )
    };
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(free_port(), 0)).unwrap();
    let (output, stdout, stderr) = run(patchwire().args(["check", "--config"]).arg(&path));
    assert!(output.status.success(), "{stdout}{stderr}");
    assert_no_panic(&stderr);

    let mut running = start(config, |_, _| Vec::new(), |api, _| api).await;
    let listing = reqwest::get(format!("http://{}/streams", running.addr))
        .await
        .unwrap();
    assert_eq!(listing.status(), 200, "{}", running.log());
    let status = running.terminate(SOON).await;
    assert!(status.success(), "exit status {status}:\n{}", running.log());
    assert_no_panic(&running.log());
}

/// A running `patchwire run`; killed if the test ends without stopping it.
struct Running {
    child: Child,
    addr: SocketAddr,
    /// The two ports the configuration was made with.
    ports: (u16, u16),
    _dir: TempDir,
    log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "patchwire did not exit within {timeout:?} of SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts `patchwire run` with the config `make(api_port, other_port)` (and `env`), on
/// fresh free ports, until `/healthz` answers at the address `serving(api, other)` —
/// retrying with other ports if one was taken in between.
async fn start(
    make: impl Fn(u16, u16) -> String,
    env: impl Fn(u16, u16) -> Vec<(String, String)>,
    serving: impl Fn(u16, u16) -> u16,
) -> Running {
    start_command("run", "/healthz", make, env, serving).await
}

/// Like [`start`], for `patchwire {command}`, ready once `ready_path` answers 200.
async fn start_command(
    command: &str,
    ready_path: &str,
    make: impl Fn(u16, u16) -> String,
    env: impl Fn(u16, u16) -> Vec<(String, String)>,
    serving: impl Fn(u16, u16) -> u16,
) -> Running {
    start_prepared(command, ready_path, make, env, serving, |_| {}).await
}

/// Like [`start_command`], with `prepare` adjusting the command before it is spawned.
async fn start_prepared(
    command: &str,
    ready_path: &str,
    make: impl Fn(u16, u16) -> String,
    env: impl Fn(u16, u16) -> Vec<(String, String)>,
    serving: impl Fn(u16, u16) -> u16,
    prepare: impl Fn(&mut Command),
) -> Running {
    for _attempt in 0..5 {
        let (a, b) = (free_port(), free_port());
        if a == b {
            continue;
        }
        let dir = TempDir::new().unwrap();
        let config = dir.path().join("patchwire.toml");
        std::fs::write(&config, make(a, b)).unwrap();
        let log = dir.path().join("stderr.log");
        let mut child = patchwire();
        child
            .args([command, "--config"])
            .arg(&config)
            .envs(env(a, b))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        prepare(&mut child);
        let child = child.spawn().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", serving(a, b)).parse().unwrap();
        let mut running = Running {
            child,
            addr,
            ports: (a, b),
            _dir: dir,
            log,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = running.child.try_wait().unwrap() {
                let log = running.log();
                assert!(
                    log.contains("cannot listen"),
                    "patchwire exited with {status}:\n{log}"
                );
                break; // A port was taken meanwhile: try others.
            }
            let healthy = client
                .get(format!("http://{addr}{ready_path}"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if healthy {
                return running;
            }
            assert!(
                Instant::now() < deadline,
                "{ready_path} never answered:\n{}",
                running.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("could not start patchwire on free ports");
}

fn simulated(api: u16, sim: u16) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{api}"
shutdown_grace = "5s"

[log]
level = "info"

[simulator]
listen = "127.0.0.1:{sim}"

[[simulator.feeds]]
name = "fleet"
seed = 3
vehicles = 30
routes = 3
tick = "100ms"

[[streams]]
name = "fleet"
url = "http://127.0.0.1:{sim}/feeds/fleet"
interval = "100ms"
"#
    )
}

#[tokio::test]
async fn run_serves_subscribers_and_exits_cleanly_on_sigterm() {
    let mut running = start(simulated, |_, _| Vec::new(), |api, _| api).await;
    let response = reqwest::get(format!("http://{}/streams/fleet", running.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut events = response.bytes_stream().eventsource();
    let mut document = None;
    let mut patches = 0;
    while patches == 0 {
        let event = tokio::time::timeout(SOON, events.next())
            .await
            .unwrap_or_else(|_| panic!("no event in time:\n{}", running.log()))
            .expect("the stream is open")
            .expect("a well-formed event");
        match event.event.as_str() {
            "snapshot" => document = Some(serde_json::from_str(&event.data).unwrap()),
            "patch" => {
                let doc: &mut serde_json::Value =
                    document.as_mut().expect("a snapshot before patches");
                let patch: json_patch::Patch = serde_json::from_str(&event.data).unwrap();
                json_patch::patch(doc, &patch).expect("the patch applies");
                patches += 1;
            }
            other => panic!("unexpected {other} event: {}", event.data),
        }
    }

    let status = running.terminate(SOON).await;
    assert!(status.success(), "exit status {status}:\n{}", running.log());
    // The subscriber's stream ended (cleanly or not: the process is gone either way).
    let ended = tokio::time::timeout(SOON, async {
        while let Some(item) = events.next().await {
            if item.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the SSE stream stayed open after exit");
    let log = running.log();
    assert!(log.contains("SIGTERM"), "{log}");
    assert_no_panic(&log);
}

#[tokio::test]
async fn listen_address_env_override_moves_the_listener() {
    let mut running = start(
        |configured, _| {
            format!(
                "[server]\nlisten = \"127.0.0.1:{configured}\"\n\n[[streams]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/never\"\n"
            )
        },
        |_, actual| {
            vec![(
                "PATCHWIRE__SERVER__LISTEN".to_owned(),
                format!("127.0.0.1:{actual}"),
            )]
        },
        |_, actual| actual,
    )
    .await;
    let configured = running.ports.0;
    assert_ne!(configured, running.addr.port());
    let refused = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{configured}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "the configured address still answers: {refused:?}"
    );
    let listing: serde_json::Value = reqwest::get(format!("http://{}/streams", running.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listing["streams"][0]["name"], "a");
    let status = running.terminate(SOON).await;
    assert!(status.success(), "exit status {status}:\n{}", running.log());
}

#[test]
fn patchwire_config_env_names_the_file_for_every_command() {
    // Run from an empty directory, so the built-in default `config/default.toml` does not
    // exist: whichever file is loaded shows in the error.
    let dir = TempDir::new().unwrap();
    let chosen = dir.path().join("chosen.toml");
    let cases: [&[&str]; 4] = [&["check"], &["run"], &["simulate"], &[]];
    for args in cases {
        let (output, _, stderr) = run(patchwire()
            .current_dir(dir.path())
            .args(args)
            .env("PATCHWIRE_CONFIG", &chosen));
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&chosen.display().to_string()),
            "`patchwire {}` ignored PATCHWIRE_CONFIG:\n{stderr}",
            args.join(" ")
        );
        assert_no_panic(&stderr);
    }
}

#[tokio::test]
async fn simulate_serves_the_feeds_until_sigterm() {
    let mut running = start_command(
        "simulate",
        "/feeds/fleet",
        simulated,
        |_, _| Vec::new(),
        |_, sim| sim,
    )
    .await;
    let url = format!("http://{}/feeds/fleet", running.addr);
    let first: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert!(first.is_object() || first.is_array(), "{first}");
    // The proxy itself does not run.
    let api = running.ports.0;
    let refused = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{api}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(refused.is_err(), "simulate also served the proxy");
    let status = running.terminate(SOON).await;
    assert!(status.success(), "exit status {status}:\n{}", running.log());
    assert_no_panic(&running.log());
}

/// Out of file descriptors (a low `ulimit -n` and a flood of connections), the server keeps
/// serving the connections it has, logs the accept failures a bounded number of times, and
/// accepts again once descriptors are free.
#[tokio::test]
async fn out_of_file_descriptors_the_server_backs_off_and_keeps_serving() {
    use std::os::unix::process::CommandExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const NOFILE: libc::rlim_t = 96;
    let limit_files = |command: &mut Command| {
        // SAFETY: only async-signal-safe `setrlimit` runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: NOFILE,
                    rlim_max: NOFILE,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    };
    let mut running = start_prepared(
        "run",
        "/healthz",
        simulated,
        |_, _| Vec::new(),
        |api, _| api,
        limit_files,
    )
    .await;
    let healthz = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut held = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    held.write_all(healthz).await.unwrap();
    let n = tokio::time::timeout(SOON, held.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    // More connections than descriptors; none sends a request. Past the listen backlog a
    // connect would wait for SYN retries: those are given up on.
    let mut flood = Vec::new();
    for _ in 0..200 {
        let connect = tokio::net::TcpStream::connect(running.addr);
        if let Ok(Ok(connection)) = tokio::time::timeout(Duration::from_millis(200), connect).await
        {
            flood.push(connection);
        }
    }
    let failing = Instant::now() + SOON;
    while !running.log().contains("accept failed") {
        assert!(
            Instant::now() < failing,
            "never ran out of descriptors:\n{}",
            running.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stay out of descriptors for a few seconds: the loop keeps failing meanwhile, and logs
    // at most once per 10s interval (the unthrottled loop logged ~20 lines a second).
    let before = running.log().matches("accept failed").count();
    tokio::time::sleep(Duration::from_secs(3)).await;

    held.write_all(healthz).await.unwrap();
    let n = tokio::time::timeout(SOON, held.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("the held connection went unanswered:\n{}", running.log()))
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let lines = running.log().matches("accept failed").count() - before;
    assert!(
        lines <= 1,
        "{lines} accept-failure lines in ~3s:\n{}",
        running.log()
    );

    // Once the flood goes away, new connections are accepted again.
    drop(flood);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answered = client
            .get(format!("http://{}/healthz", running.addr))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if answered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new connection accepted:\n{}",
            running.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = running.terminate(SOON).await;
    assert!(status.success(), "exit status {status}:\n{}", running.log());
    assert_no_panic(&running.log());
}

//! Off-the-shelf WebSocket clients driven by the same JSON commands: Python `websockets`
//! (`ws_client.py`, a child process, commands on stdin) and Chromium's `WebSocket`
//! (`ws_client.js` in a headless page, commands evaluated through the DevTools protocol).
//! A client whose component is missing is skipped with a message, except under `CI=true`.

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// A client that runs the commands of `ws_client.py` / `ws_client.js`.
pub enum Scripted {
    /// Python `websockets`.
    Python(Box<Python>),
    /// A headless Chromium page.
    Chromium(Box<Chromium>),
}

/// The Python client's process.
pub struct Python {
    /// The interpreter running the script.
    child: Child,
    /// Commands go here.
    stdin: ChildStdin,
    /// Replies come from here.
    stdout: Lines<BufReader<ChildStdout>>,
}

/// Skips (prints why and returns `None`) outside CI, fails under `CI=true`.
fn skip<T>(why: &str) -> Option<T> {
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "CI=true and {why}"
    );
    eprintln!("SKIP: {why}");
    None
}

impl Scripted {
    /// Python with `websockets` and `jsonpatch`, or `None` (skipped) when missing.
    pub async fn python() -> Option<Scripted> {
        let probe = std::process::Command::new("python3")
            .args(["-c", "import websockets, jsonpatch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(probe, Ok(status) if status.success()) {
            return skip(
                "python3 with `websockets` and `jsonpatch` is not available \
                 (pip install websockets jsonpatch)",
            );
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/support/ws_client.py");
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Some(Scripted::Python(Box::new(Python {
            child,
            stdin,
            stdout,
        })))
    }

    /// Headless Chromium, or `None` (skipped) when it is not installed.
    pub async fn chromium() -> Option<Scripted> {
        Chromium::launch()
            .await
            .map(|c| Scripted::Chromium(Box::new(c)))
    }

    /// Runs one command; panics with the client's error if it failed.
    pub async fn command(&mut self, command: Value) -> Value {
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, self.run(&command))
            .await
            .unwrap_or_else(|_| panic!("no reply to {command} within {COMMAND_TIMEOUT:?}"));
        match reply.get("ok") {
            Some(ok) => ok.clone(),
            None => panic!("{command} failed: {}", reply["error"]),
        }
    }

    async fn run(&mut self, command: &Value) -> Value {
        match self {
            Scripted::Python(python) => {
                let Python { stdin, stdout, .. } = &mut **python;
                stdin
                    .write_all(format!("{command}\n").as_bytes())
                    .await
                    .unwrap();
                let line = stdout
                    .next_line()
                    .await
                    .unwrap()
                    .expect("the Python client exited");
                serde_json::from_str(&line).unwrap()
            }
            Scripted::Chromium(chromium) => chromium.handle(command).await,
        }
    }

    /// Opens a connection to `url`.
    pub async fn connect(&mut self, url: &str) {
        self.command(json!({"op": "connect", "url": url})).await;
    }

    /// Sends `message`, then reads until a message of one of `until`'s types; returns it.
    pub async fn send(&mut self, message: Value, until: &[&str]) -> Value {
        self.command(json!({"op": "send", "message": message, "until": until}))
            .await
    }

    /// Reads until the rebuilt document of `stream` is `doc`.
    pub async fn converge(&mut self, stream: &str, doc: &Value) {
        self.command(json!({"op": "converge", "stream": stream, "doc": doc}))
            .await;
    }

    /// Closes the connection; the documents stay.
    pub async fn drop_connection(&mut self) {
        self.command(json!({"op": "drop"})).await;
    }

    /// `{docs, last, snapshots, patches}`, each by stream.
    pub async fn state(&mut self) -> Value {
        self.command(json!({"op": "state"})).await
    }

    /// Stops the client.
    pub async fn finish(self) {
        match self {
            Scripted::Python(python) => {
                let Python {
                    mut child, stdin, ..
                } = *python;
                drop(stdin);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            }
            Scripted::Chromium(chromium) => chromium.close().await,
        }
    }
}

type Cdp = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Headless Chromium on a fresh profile, loopback only, driven over the DevTools protocol.
pub struct Chromium {
    _child: Child,
    _profile: tempfile::TempDir,
    cdp: Cdp,
    session: String,
    next_id: u64,
}

impl Chromium {
    async fn launch() -> Option<Chromium> {
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists());
        let Some(binary) = binary else {
            return skip("Chromium is not installed (apt-get install chromium)");
        };
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-dev-shm-usage",
                // Nothing but the loopback is reachable.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let endpoint = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = stderr.next_line().await {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return Some(url.trim().to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("chromium prints its DevTools endpoint");
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
        let (cdp, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .expect("the DevTools endpoint accepts");
        let mut chromium = Chromium {
            _child: child,
            _profile: profile,
            cdp,
            session: String::new(),
            next_id: 0,
        };
        let target = chromium
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = chromium
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        chromium.session = attached["sessionId"].as_str().unwrap().to_owned();
        chromium
            .evaluate(include_str!("ws_client.js").to_owned())
            .await;
        Some(chromium)
    }

    /// Calls a DevTools method (on the page once attached); its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut call = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            call["sessionId"] = Value::from(self.session.clone());
        }
        self.cdp
            .send(Message::Text(call.to_string().into()))
            .await
            .unwrap();
        loop {
            let Some(Ok(Message::Text(text))) = self.cdp.next().await else {
                panic!("the DevTools connection ended");
            };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    panic!("{method} failed: {error}");
                }
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page, awaiting a promise; its value.
    async fn evaluate(&mut self, expression: String) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("the page threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    async fn handle(&mut self, command: &Value) -> Value {
        self.evaluate(format!("patchwireClient.handle({command})"))
            .await
    }

    async fn close(mut self) {
        let close = json!({"id": 0, "method": "Browser.close"});
        if self
            .cdp
            .send(Message::Text(close.to_string().into()))
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(Ok(_)) = self.cdp.next().await {}
            })
            .await;
        }
    }
}

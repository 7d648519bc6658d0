//! Off-the-shelf WebSocket clients driven by the same JSON commands: Python `websockets`
//! (`ws_client.py`, a child process, commands on stdin) and Chromium's `WebSocket`
//! (`ws_client.js` in a headless page, commands evaluated through the DevTools protocol).
//! A client whose component is missing is skipped with a message, except under `CI=true`.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::chromium::Chromium;
use super::skip;

/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// A client that runs the commands of `ws_client.py` / `ws_client.js`.
pub enum Scripted {
    /// Python `websockets`.
    Python(Box<Python>),
    /// A headless Chromium page running `ws_client.js`.
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
        let mut chromium = Chromium::launch().await?;
        chromium.evaluate(include_str!("ws_client.js")).await;
        Some(Scripted::Chromium(Box::new(chromium)))
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
            Scripted::Chromium(chromium) => {
                chromium
                    .evaluate(format!("patchwireClient.handle({command})"))
                    .await
            }
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

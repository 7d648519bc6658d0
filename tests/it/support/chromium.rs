//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, on a fresh
//! profile, able to reach nothing but the loopback: the WebSocket clients' browser and the
//! console's. Missing, it is skipped with a message, except under `CI=true`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::skip;

type Cdp = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Headless Chromium with one page, attached.
pub struct Chromium {
    _child: Child,
    _profile: tempfile::TempDir,
    cdp: Cdp,
    session: String,
    /// The page's target.
    target: String,
    /// Another tab, in front of the page while it is hidden.
    other: Option<String>,
    next_id: u64,
}

impl Chromium {
    /// Starts Chromium on `about:blank`, or `None` (skipped) when it is not installed.
    pub async fn launch() -> Option<Chromium> {
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|path| Path::new(path).exists());
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
                "--disable-extensions",
                "--disable-default-apps",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--font-render-hinting=none",
                // Nothing but the loopback is reachable.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--no-proxy-server",
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
            target: String::new(),
            other: None,
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
        chromium.target = target["targetId"].as_str().unwrap().to_owned();
        Some(chromium)
    }

    /// Calls a DevTools method (on the page once attached); its result. Events are dropped.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call_on(&session, method, params).await
    }

    /// Calls a DevTools method of the browser (`Target.*`).
    async fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.call_on("", method, params).await
    }

    async fn call_on(&mut self, session: &str, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut call = json!({"id": id, "method": method, "params": params});
        if !session.is_empty() {
            call["sessionId"] = Value::from(session);
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
    pub async fn evaluate(&mut self, expression: impl Into<String>) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression.into(), "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("the page threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is truthy (every 100 ms, at most `timeout`); its value.
    pub async fn wait_for(&mut self, expression: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.evaluate(expression).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "`{expression}` still {value} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens `url` in the page and waits until it has loaded.
    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.enable", json!({})).await;
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for(
            &format!(
                "location.href === {} && document.readyState === 'complete'",
                serde_json::to_string(url).unwrap()
            ),
            Duration::from_secs(20),
        )
        .await;
    }

    /// Lays the page out at `width` × `height` CSS pixels (`mobile`: a phone's viewport).
    pub async fn viewport(&mut self, width: u32, height: u32, scale: f64, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile}),
        )
        .await;
    }

    /// Saves a PNG of the whole page (beyond the viewport) to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let metrics = self.call("Page.getLayoutMetrics", json!({})).await;
        let size = &metrics["cssContentSize"];
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
                }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("a screenshot"))
            .expect("base64");
        std::fs::write(path, png).unwrap();
    }

    /// Presses and releases a key (`Tab`, `Enter`, …), with Shift if `shift`.
    pub async fn press(&mut self, key: &str, shift: bool) {
        let (code, text) = match key {
            "Tab" => (9, ""),
            "Enter" => (13, "\r"),
            " " => (32, " "),
            "Escape" => (27, ""),
            other => panic!("no key code for {other:?}"),
        };
        let modifiers = if shift { 8 } else { 0 };
        let down = json!({
            "type": if text.is_empty() { "rawKeyDown" } else { "keyDown" },
            "key": key, "code": if key == " " { "Space" } else { key },
            "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code,
            "text": text, "unmodifiedText": text, "modifiers": modifiers,
        });
        self.call("Input.dispatchKeyEvent", down).await;
        let up = json!({
            "type": "keyUp", "key": key, "code": if key == " " { "Space" } else { key },
            "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code, "modifiers": modifiers,
        });
        self.call("Input.dispatchKeyEvent", up).await;
    }

    /// Hides the page (its `visibilityState` becomes `hidden`) behind another tab.
    pub async fn hide(&mut self) {
        let other = self
            .call_browser("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let other = other["targetId"].as_str().unwrap().to_owned();
        self.call_browser("Target.activateTarget", json!({"targetId": other}))
            .await;
        self.other = Some(other);
    }

    /// Brings the page to the front again.
    pub async fn show(&mut self) {
        if let Some(other) = self.other.take() {
            self.call_browser("Target.closeTarget", json!({"targetId": other}))
                .await;
        }
        let target = self.target.clone();
        self.call_browser("Target.activateTarget", json!({"targetId": target}))
            .await;
    }

    /// Types `text` into the focused element.
    pub async fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({"text": text})).await;
    }

    /// Closes the browser.
    pub async fn close(mut self) {
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

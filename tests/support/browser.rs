//! A headless Chromium driven through the DevTools protocol, for tests of
//! pages: one tab, JavaScript evaluated in it, screenshots. Chromium is
//! Debian's `chromium` (scripts/provision.sh installs it), or the binary
//! `CHROMIUM_BIN` names; it runs with a profile of its own in a temporary
//! directory and is killed on drop.
#![allow(dead_code)] // each test binary uses its own part of the support code

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const START: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(30);

/// A running headless Chromium and a DevTools connection to its one tab.
pub struct Browser {
    child: Child,
    socket: tokio::sync::Mutex<WebSocketStream<MaybeTlsStream<TcpStream>>>,
    next_id: AtomicU64,
    _profile: tempfile::TempDir,
}

/// The Chromium binary: `CHROMIUM_BIN`, else `chromium` on PATH.
pub fn chromium_bin() -> PathBuf {
    std::env::var_os("CHROMIUM_BIN").map_or_else(|| "chromium".into(), PathBuf::from)
}

impl Browser {
    /// Starts Chromium with a `width`×`height` window and connects to its tab.
    pub async fn start(width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().expect("a profile directory");
        let mut child = Command::new(chromium_bin())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); scripts/provision.sh installs Debian's chromium",
                    chromium_bin().display()
                )
            });
        let port = devtools_port(&mut child);
        let list = crate::support::http::get_blocking(
            &format!("http://127.0.0.1:{port}/json/list"),
            START,
        )
        .unwrap_or_else(|e| panic!("DevTools target list: {e}"));
        let targets: Value = serde_json::from_str(&list.1).expect("target list is JSON");
        let tab = targets
            .as_array()
            .and_then(|all| all.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target in {targets}"))
            .to_owned();
        let (socket, _) = tokio_tungstenite::connect_async(&tab)
            .await
            .unwrap_or_else(|e| panic!("DevTools socket {tab}: {e}"));
        Browser {
            child,
            socket: tokio::sync::Mutex::new(socket),
            next_id: AtomicU64::new(0),
            _profile: profile,
        }
    }

    /// Calls DevTools method `method`; its result (events are skipped).
    pub async fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let request = json!({ "id": id, "method": method, "params": params });
        let mut socket = self.socket.lock().await;
        socket
            .send(Message::text(request.to_string()))
            .await
            .expect("send to DevTools");
        let answer = tokio::time::timeout(CALL, async {
            while let Some(message) = socket.next().await {
                let message = message.expect("DevTools socket");
                let Ok(text) = message.to_text() else {
                    continue;
                };
                let Ok(value) = serde_json::from_str::<Value>(text) else {
                    continue;
                };
                if value["id"] == id {
                    return value;
                }
            }
            panic!("DevTools closed the socket during {method}");
        })
        .await
        .unwrap_or_else(|_| panic!("{method}: no answer within {CALL:?}"));
        assert!(answer["error"].is_null(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// Opens `url` in the tab and waits for its load event.
    pub async fn open(&self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        let complete = "document.readyState === 'complete'";
        crate::support::eventually(&format!("{url} to load"), START, || async {
            self.evaluate(complete).await.as_bool().filter(|done| *done)
        })
        .await;
    }

    /// The value of JavaScript `expression` in the tab (JSON-serialisable).
    pub async fn evaluate(&self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Saves a PNG of the tab's viewport at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let data = shot["data"].as_str().expect("screenshot data");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("screenshot is base64");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// Reads Chromium's stderr until it names its DevTools port; the rest of
/// stderr is drained in the background so Chromium never blocks on it.
fn devtools_port(child: &mut Child) -> u16 {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (found, port) = mpsc::channel();
    std::thread::spawn(move || {
        let mut found = Some(found);
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("DevTools listening on ws://127.0.0.1:").nth(1) {
                let port = rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
                if let (Some(sender), Some(port)) = (found.take(), port) {
                    let _ = sender.send(Ok(port));
                }
            } else if found.is_some() {
                seen.push_str(&line);
                seen.push('\n');
            }
        }
        if let Some(sender) = found {
            let _ = sender.send(Err(seen));
        }
    });
    match port.recv_timeout(START) {
        Ok(Ok(port)) => port,
        Ok(Err(stderr)) => panic!("chromium exited before DevTools listened:\n{stderr}"),
        Err(_) => panic!("chromium did not open DevTools within {START:?}"),
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

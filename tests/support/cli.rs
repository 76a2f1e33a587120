//! Helpers for the service-side tests: a tap on the fleet's subjects that
//! parses every message as docs/protocol.md says, and the `rollcall` binary (or
//! any program) as a real child process, killed on drop, with its output
//! read line by line against a deadline.
#![allow(dead_code)] // each test binary uses its own part of the support code

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rollcall::protocol::{Event, EventKind, Subjects};

/// One message seen on `<prefix>.>`, with when it arrived.
#[derive(Debug)]
pub struct Seen {
    pub subject: String,
    pub event: Event,
    pub at: Instant,
}

/// A raw async-nats subscriber on every subject of one fleet.
pub struct Tap {
    pub client: async_nats::Client,
    subscriber: async_nats::Subscriber,
    subjects: Subjects,
}

impl Tap {
    pub async fn new(url: &str) -> Tap {
        let client = async_nats::connect(url)
            .await
            .expect("tap connects to NATS");
        let subjects = Subjects::default();
        let subscriber = client
            .subscribe(subjects.events_wildcard())
            .await
            .expect("tap subscribes");
        client.flush().await.expect("subscription is on the server");
        Tap {
            client,
            subscriber,
            subjects,
        }
    }

    /// The next event message, parsed; panics on an invalid one or none
    /// within `limit`. Catalog records, which the event wildcard hears too,
    /// are skipped.
    pub async fn next(&mut self, limit: Duration) -> Seen {
        let deadline = tokio::time::Instant::now() + limit;
        let message = loop {
            let message = tokio::time::timeout_at(deadline, self.subscriber.next())
                .await
                .unwrap_or_else(|_| panic!("no event on the wire within {limit:?}"))
                .expect("tap subscription open");
            if !self.subjects.is_catalog_record(&message.subject) {
                break message;
            }
        };
        let at = Instant::now();
        let event = self
            .subjects
            .parse_event(&message.subject, &message.payload)
            .unwrap_or_else(|e| {
                panic!(
                    "invalid event on {}: {e}: {:?}",
                    message.subject,
                    String::from_utf8_lossy(&message.payload)
                )
            });
        Seen {
            subject: message.subject.to_string(),
            event,
            at,
        }
    }

    /// Skips events until one of `kind` for instance `id` arrives.
    pub async fn until(&mut self, kind: EventKind, id: &str, limit: Duration) -> Seen {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {kind} of {id} within {limit:?}");
            let seen = self.next(left).await;
            if seen.event.kind() == kind && seen.event.id() == id {
                return seen;
            }
        }
    }

    /// Asserts that nothing at all arrives for `quiet`.
    pub async fn silent_for(&mut self, quiet: Duration) {
        if let Ok(Some(message)) = tokio::time::timeout(quiet, self.subscriber.next()).await {
            panic!(
                "expected silence, got {} {:?}",
                message.subject,
                String::from_utf8_lossy(&message.payload)
            );
        }
    }
}

/// `rollcall <args>` as a command, logging at info to stderr.
pub fn rollcall(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rollcall"));
    command.args(args).env("ROLLCALL_LOG", "info");
    command
}

/// A child process, killed on drop, its stdout and stderr collected line by
/// line in the background. Dropped by a failing test, it prints what it
/// said on stderr, so the failure shows why.
pub struct Process {
    child: Child,
    /// The command line, to name the process in a failure.
    command: String,
    stdout: mpsc::Receiver<String>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    pub fn spawn(mut command: Command) -> Process {
        let line = format!("{command:?}");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let (lines, stdout) = mpsc::channel();
        let out = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err = child.stderr.take().expect("stderr is piped");
        let collected = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(err);
            let mut buffer = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                if let Ok(mut text) = collected.lock() {
                    text.push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
            }
        });
        Process {
            child,
            command: line,
            stdout,
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The next line of stdout; panics (showing stderr) when none comes
    /// within `limit`.
    pub fn line(&self, limit: Duration) -> String {
        self.stdout.recv_timeout(limit).unwrap_or_else(|_| {
            panic!(
                "no stdout line within {limit:?}; stderr:\n{}",
                self.stderr_text()
            )
        })
    }

    /// Skips stdout lines until one contains `needle`.
    pub fn line_containing(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.line(left);
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Waits until stderr contains `needle` (a log line saying it is ready).
    pub fn wait_stderr(&self, needle: &str, limit: Duration) {
        self.wait_stderr_times(needle, 1, limit);
    }

    /// Waits until stderr contains `needle` at least `times` times.
    pub fn wait_stderr_times(&self, needle: &str, times: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.stderr_text().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "stderr did not say {needle:?} {times} times within {limit:?}:\n{}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sends SIGTERM (or another signal name) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, at most `limit`; its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {limit:?}; stderr:\n{}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Some(reader) = self.stderr_reader.take() {
                let _ = reader.join();
            }
            let said = self.stderr_text();
            let tail: Vec<&str> = said.lines().rev().take(60).collect();
            eprintln!(
                "--- stderr of {} (last {} lines):",
                self.command,
                tail.len()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs a command to completion (at most `limit`): exit code, stdout, stderr.
pub fn run(command: Command, limit: Duration) -> (Option<i32>, String, String) {
    let mut process = Process::spawn(command);
    let code = process.wait(limit);
    let mut out = Vec::new();
    while let Ok(line) = process.stdout.recv_timeout(Duration::from_millis(200)) {
        out.push(line);
    }
    if let Some(reader) = process.stderr_reader.take() {
        let _ = reader.join();
    }
    (code, out.join("\n"), process.stderr_text())
}

/// A blocking `GET path` to `authority` (127.0.0.1:port) on a fresh
/// connection: the status code and the body.
pub fn http_get(authority: &str, path: &str) -> (u16, String) {
    let url = format!("http://{authority}{path}");
    crate::support::http::get_blocking(&url, Duration::from_secs(5))
        .map(|(status, body)| (status.as_u16(), body))
        .unwrap_or_else(|e| panic!("{e}"))
}

//! Real processes for integration tests: a `nats-server -js` on a free port
//! with its own store, killed on drop; discovery and a balancer running
//! in-process against it; the one wait helper, [`eventually`]; and, in
//! [`http`], the one HTTP backend and client; [`balancer`], a balancer in
//! process fed through a channel.
#![allow(dead_code)] // each test binary uses its own part of the support code

// Test binaries written before `support::http` existed load this file as
// `#[path = "support/http.rs"] mod http_support;` too.
pub mod balancer;
#[allow(clippy::duplicate_mod)]
pub mod http;

use std::ffi::OsString;
use std::future::Future;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server` with JetStream, on 127.0.0.1.
pub struct NatsServer {
    process: ServerProcess,
    port: u16,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on a free port.
    pub fn start() -> NatsServer {
        Self::start_inner(None)
    }

    /// Starts a server with `config` (a path, relative to the crate root or
    /// absolute); the port and store dir are still chosen here.
    pub fn with_config(config: impl AsRef<Path>) -> NatsServer {
        Self::start_inner(Some(crate_root().join(config)))
    }

    fn start_inner(config: Option<PathBuf>) -> NatsServer {
        let store = tempfile::tempdir().expect("create a temp dir for the JetStream store");
        let port = free_port();
        let mut args: Vec<OsString> = Vec::new();
        if let Some(config) = config {
            args.extend(["-c".into(), config.into()]);
        }
        args.extend(["-js", "-a", "127.0.0.1", "-p"].map(OsString::from));
        args.push(port.to_string().into());
        args.extend(["-sd".into(), store.path().into()]);
        NatsServer {
            process: ServerProcess::start(args, port),
            port,
            _store: store,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts it again on the same port and store, after [`NatsServer::stop`].
    pub fn restart(&mut self) {
        self.process.restart();
    }
}

/// One `nats-server` child process: started with its arguments, ready once
/// its client port accepts connections, killed (SIGKILL, as abrupt as a
/// crash) on [`ServerProcess::stop`] or drop. Every server the tests run,
/// alone or in a cluster, goes through here.
pub struct ServerProcess {
    child: Option<Child>,
    args: Vec<OsString>,
    port: u16,
}

impl ServerProcess {
    /// `nats-server <args>`, waited for on `port`.
    pub fn start(args: Vec<OsString>, port: u16) -> ServerProcess {
        let mut process = ServerProcess {
            child: None,
            args,
            port,
        };
        process.spawn();
        process
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends signal `name` (STOP, CONT...) to the running server.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("the server runs");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Starts it again with the same arguments (so the same port and store).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        // The server's log goes to a file, shown when it fails to start (or
        // to the terminal with NATS_SERVER_LOG set).
        let log = tempfile::NamedTempFile::new().expect("a temp file for the nats-server log");
        let stderr = if std::env::var_os("NATS_SERVER_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::from(log.reopen().expect("reopen the nats-server log"))
        };
        let child = Command::new(nats_server_bin())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {:?}: {e}; run scripts/test.sh (it installs nats-server) or put nats-server on PATH",
                    nats_server_bin()
                )
            });
        let child = self.child.insert(child);
        // A server that exits at once (its port taken meanwhile, a bad
        // config) is named as such, not waited on for the whole limit.
        let limit = Duration::from_secs(20);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server {:?} exited with {status} before listening on {}:\n{}",
                    self.args,
                    self.port,
                    std::fs::read_to_string(log.path()).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < limit,
                "nats-server did not listen on 127.0.0.1:{} within {limit:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The crate's root directory.
pub fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `NATS_SERVER_BIN`, else the project's `.venv/bin/nats-server`, else PATH.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return bin.into();
    }
    let venv = crate_root().join(".venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("nats-server")
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// Blocks until something accepts connections on `port`.
pub fn wait_for_port(port: u16, limit: Duration) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < limit,
            "nothing listened on 127.0.0.1:{port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Awaits `probe` until it yields `Some`, checking again every few
/// milliseconds, and returns what it yielded; panics naming `what` when
/// `limit` passes first. The one way tests wait for something they cannot
/// await directly.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Discovery running in-process against a real server, stopped on
/// [`RunningDiscovery::stop`] or drop.
pub struct RunningDiscovery {
    discovery: Option<rollcall::discovery::Discovery>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningDiscovery {
    /// Starts discovery under the default prefix on its own connection.
    pub async fn start(url: &str) -> RunningDiscovery {
        let connection = rollcall::connect::NatsOptions::new(url)
            .connect("test-discovery")
            .await
            .expect("discovery connects to the test server");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let discovery = rollcall::discovery::spawn(
            &connection,
            rollcall::protocol::Subjects::default(),
            async {
                let _ = stopped.await;
            },
        )
        .await
        .expect("discovery starts");
        RunningDiscovery {
            discovery: Some(discovery),
            stop: Some(stop),
        }
    }

    pub fn get(&self) -> &rollcall::discovery::Discovery {
        self.discovery.as_ref().expect("running until stopped")
    }

    /// Stops it and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(discovery) = self.discovery.take() {
            discovery.wait().await.expect("discovery stops cleanly");
        }
    }
}

/// A plain client, as a service or an operator would have.
pub async fn client(url: &str) -> async_nats::Client {
    async_nats::connect(url)
        .await
        .expect("connect to the test server")
}

/// The next snapshot on a subscription, or a panic after `limit`.
pub async fn next_snapshot(
    subscription: &mut async_nats::Subscriber,
    limit: Duration,
) -> rollcall::protocol::Snapshot {
    use futures::StreamExt;
    let message = tokio::time::timeout(limit, subscription.next())
        .await
        .unwrap_or_else(|_| panic!("no snapshot within {limit:?}"))
        .expect("subscription open");
    rollcall::protocol::Subjects::default()
        .parse_snapshot(&message.subject, &message.payload)
        .expect("discovery publishes valid snapshots")
}

/// A register (or heartbeat) payload written by hand, as a client in another
/// language would: an instance of `service` at 127.0.0.1:`port`, with the
/// fields of `extra` (an object, e.g. `{"ttl_ms": 60000}`) added.
pub fn register_json(service: &str, id: &str, port: u16, extra: serde_json::Value) -> String {
    let mut record = serde_json::json!({
        "service": service,
        "id": id,
        "address": "127.0.0.1",
        "port": port,
    });
    if let (Some(record), serde_json::Value::Object(extra)) = (record.as_object_mut(), extra) {
        record.extend(extra);
    }
    record.to_string()
}

/// The sum of the samples of Prometheus text `text` that `selector` picks:
/// a family name, then optionally labels they must carry, as
/// `name{key="value",...}`. `None` when no sample matches.
pub fn metric_sum(text: &str, selector: &str) -> Option<u64> {
    let (family, wanted) = match selector.split_once('{') {
        Some((family, labels)) => (family, labels.trim_end_matches('}')),
        None => (selector, ""),
    };
    let wanted: Vec<&str> = wanted.split(',').filter(|l| !l.is_empty()).collect();
    let mut found = None;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((name_and_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match name_and_labels.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (name_and_labels, ""),
        };
        let carried: Vec<&str> = labels.split(',').collect();
        if name == family && wanted.iter().all(|w| carried.contains(w)) {
            let value: f64 = value.parse().ok()?;
            *found.get_or_insert(0) += value as u64;
        }
    }
    found
}

//! Real processes for integration tests: a `nats-server -js` on a port it
//! picks itself, with its own store, killed on drop; discovery and a
//! balancer running in-process against it; the one wait helper,
//! [`eventually`]; and, in [`http`], the one HTTP backend and client;
//! [`balancer`], a balancer in process fed through a channel.
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
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A running `nats-server` with JetStream, on 127.0.0.1.
pub struct NatsServer {
    process: ServerProcess,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on a port it picks itself.
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
        let mut args: Vec<OsString> = Vec::new();
        if let Some(config) = config {
            args.extend(["-c".into(), config.into()]);
        }
        args.extend(["-js", "-a", "127.0.0.1", "-sd"].map(OsString::from));
        args.push(store.path().into());
        NatsServer {
            process: ServerProcess::start_on_any_port(args),
            _store: store,
        }
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// Stops the server (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts it again on the same port and store, after [`NatsServer::stop`].
    pub fn restart(&mut self) {
        self.process.restart();
    }

    /// Everything the server logged so far, over restarts.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// The line nats-server logs once its client port is bound.
const LISTENING: &str = "Listening for client connections on ";

/// One `nats-server` child process: started with its arguments, ready once
/// its client port accepts connections, killed (SIGKILL, as abrupt as a
/// crash) on [`ServerProcess::stop`] or drop. Every server the tests run,
/// alone or in a cluster, goes through here. Its log goes to a file, read
/// by [`ServerProcess::log`], shown when it fails to start, and copied to
/// the terminal on drop with `NATS_SERVER_LOG` set.
pub struct ServerProcess {
    child: Option<Child>,
    args: Vec<OsString>,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl ServerProcess {
    /// `nats-server <args>`, waited for on `port`; 0 when the arguments let
    /// the server bind a port itself (`listen: 127.0.0.1:-1`), read from its
    /// log.
    pub fn start(args: Vec<OsString>, port: u16) -> ServerProcess {
        let mut process = ServerProcess::new(args, port);
        process.spawn();
        if process.port == 0 {
            process.port = process.listening_port();
        }
        process
    }

    /// `nats-server <args> -p -1`: the server binds a free port itself (no
    /// other test can take it between a look and the bind), read from its
    /// log; a restart asks for that same port.
    pub fn start_on_any_port(mut args: Vec<OsString>) -> ServerProcess {
        args.extend(["-p", "-1"].map(OsString::from));
        let mut process = ServerProcess::start(args, 0);
        let any = process.args.len() - 1;
        process.args[any] = process.port.to_string().into();
        process
    }

    fn new(args: Vec<OsString>, port: u16) -> ServerProcess {
        ServerProcess {
            child: None,
            args,
            port,
            log: tempfile::NamedTempFile::new().expect("a temp file for the nats-server log"),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
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

    /// Starts it again with the same arguments (so the same port and
    /// store). Should another process have taken the port meanwhile, it
    /// tries again until that one lets go.
    pub fn restart(&mut self) {
        self.stop();
        let limit = Duration::from_secs(20);
        let start = Instant::now();
        while let Err(exited) = self.try_spawn() {
            assert!(start.elapsed() < limit, "{exited}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the server logged so far, over restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        if let Err(exited) = self.try_spawn() {
            panic!("{exited}");
        }
    }

    /// Starts the server and waits until it listens; `Err` (with its log)
    /// when it exits first (its port taken, a bad config).
    fn try_spawn(&mut self) -> Result<(), String> {
        let runs = self.log().matches(LISTENING).count();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log.path())
            .expect("open the nats-server log");
        let child = Command::new(nats_server_bin())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {:?}: {e}; run scripts/test.sh (it installs nats-server) or put nats-server on PATH",
                    nats_server_bin()
                )
            });
        self.child = Some(child);
        // Listening once it says so in this run (a connect could reach
        // another process that holds the port).
        let limit = Duration::from_secs(20);
        let start = Instant::now();
        while self.log().matches(LISTENING).count() <= runs {
            let child = self.child.as_mut().expect("just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "nats-server {:?} exited with {status} before listening:\n{}",
                    self.args,
                    self.log()
                ));
            }
            assert!(
                start.elapsed() < limit,
                "nats-server {:?} did not listen within {limit:?}:\n{}",
                self.args,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// The port of the last "Listening for client connections on" line.
    fn listening_port(&self) -> u16 {
        let log = self.log();
        let line = log
            .lines()
            .rfind(|line| line.contains(LISTENING))
            .expect("the server logged its client port");
        let address = &line[line.find(LISTENING).unwrap() + LISTENING.len()..];
        let (_, port) = address
            .trim()
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        port.parse()
            .unwrap_or_else(|e| panic!("no port in {line:?}: {e}"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("NATS_SERVER_LOG").is_some() {
            eprintln!("nats-server {:?} log:\n{}", self.args, self.log());
        }
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

/// A port that was free a moment ago, for a server started next. Taken
/// below the kernel's range of ephemeral ports (`ip_local_port_range`), so
/// no outgoing connection of another test can be given it before the
/// server binds it, and never handed out twice by this process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1_000);
    // Each test binary starts elsewhere in the span: a port a binary just
    // let go of is not the next one's first pick.
    let offset = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let port = LOWEST + offset.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("a port below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOWEST} and {}", LOWEST + span);
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

/// Catalog records on a plain subscription, assembled into per-service
/// snapshots as a balancer does ([`rollcall::subscription::Held`]): what a
/// test observes of the catalog on the wire.
pub struct CatalogFeed {
    subscription: async_nats::Subscriber,
    held: rollcall::subscription::Held,
}

impl CatalogFeed {
    /// Follows the records on `subject` (`rollcall.catalog.>`, or
    /// `rollcall.catalog.web.*` for one service) from now on.
    pub async fn subscribe(client: &async_nats::Client, subject: &str) -> CatalogFeed {
        let subscription = client
            .subscribe(subject.to_owned())
            .await
            .expect("subscribe to the catalog");
        client.flush().await.expect("flush the subscription");
        CatalogFeed::from(subscription)
    }

    /// The snapshot of the service of `message`'s record once it is taken
    /// in; `None` for a stale record.
    pub fn take(&mut self, message: &async_nats::Message) -> Option<rollcall::protocol::Snapshot> {
        let record = rollcall::protocol::Subjects::default()
            .parse_record(&message.subject, &message.payload)
            .expect("discovery publishes valid records");
        let service = record.service.clone();
        self.held.offer(record).ok()?;
        self.held.snapshot(&service)
    }

    /// The snapshot of the service of the next record taken in; `None` once
    /// the subscription ends.
    pub async fn next_taken(&mut self) -> Option<rollcall::protocol::Snapshot> {
        use futures::StreamExt;
        loop {
            let message = self.subscription.next().await?;
            if let Some(snapshot) = self.take(&message) {
                return Some(snapshot);
            }
        }
    }

    /// The next record's service snapshot, or a panic after `limit`.
    pub async fn next(&mut self, limit: Duration) -> rollcall::protocol::Snapshot {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let message = tokio::time::timeout_at(deadline, self.subscription.next())
                .await
                .unwrap_or_else(|_| panic!("no catalog record within {limit:?}"))
                .expect("subscription open");
            if let Some(snapshot) = self.take(&message) {
                return snapshot;
            }
        }
    }

    /// Takes in every record the catalog stream holds now (all services).
    pub async fn seed(&mut self, client: &async_nats::Client) {
        let js = async_nats::jetstream::new(client.clone());
        let stored = rollcall::catalog_stream::read_records(&js, &Default::default())
            .await
            .expect("the catalog stream is readable");
        for stored in stored.records {
            let _ = self.held.offer(stored.record);
        }
    }

    /// The next message, raw, within `limit`.
    pub async fn message(&mut self, limit: Duration) -> Option<async_nats::Message> {
        use futures::StreamExt;
        tokio::time::timeout(limit, self.subscription.next())
            .await
            .ok()
            .flatten()
    }
}

impl From<async_nats::Subscriber> for CatalogFeed {
    fn from(subscription: async_nats::Subscriber) -> CatalogFeed {
        CatalogFeed {
            subscription,
            held: rollcall::subscription::Held::default(),
        }
    }
}

/// The next record's service snapshot on `feed`, or a panic after `limit`.
pub async fn next_snapshot(
    feed: &mut CatalogFeed,
    limit: Duration,
) -> rollcall::protocol::Snapshot {
    feed.next(limit).await
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

//! The compose stack run for real: `scripts/compose.sh up` on the local
//! Docker engine, then faults across containers while a client on the host
//! counts failed requests through the balancer on 127.0.0.1:8080 and a NATS
//! subscriber on the host (127.0.0.1:4222, the read-only `watch` user) sees
//! every snapshot discovery publishes. Without a Docker engine the tests
//! say so on one line and pass.
//!
//! One stack per test run, brought up by the first test that needs it and
//! taken down (`down -v`) when the last one ends or any one panics; the tests
//! take turns on it. Each fault test prints its figures.

#[path = "support/http.rs"]
mod http_support;
mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rollcall::protocol::Snapshot;
use support::{crate_root, eventually};

/// Writes a line to stderr past the test harness's capture, so the figures
/// and a skip show in a plain `cargo test` run.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Fixed, so a stack left by an interrupted run is removed before the next.
const PROJECT: &str = "rollcall-compose-test";
const PROXY: &str = "http://127.0.0.1:8080/";
const READY: &str = "http://127.0.0.1:9090/readyz";
const WATCH_URL: &str = "nats://watch:watch-dev-password@127.0.0.1:4222";
const REGISTER_URL: &str = "nats://web:web-dev-password@127.0.0.1:4222";
const WEBS: [&str; 3] = ["web1", "web2", "web3"];
/// The instances' TTL and heartbeat interval: the example web service
/// announces with the defaults.
const TTL: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The tests of this file; the last to finish
/// takes the stack down. When another set runs (a filter, --ignored), the
/// stack goes down when the test binary exits.
const TESTS: usize = 7;

struct Shared {
    up: bool,
    finished: usize,
    /// The skip is said once per run, not once per test.
    skip_said: bool,
}

static STACK: Mutex<Shared> = Mutex::new(Shared {
    up: false,
    finished: 0,
    skip_said: false,
});

/// A test's turn on the stack. Dropping it takes the stack down when this was
/// the last test or when the test panicked (the next test starts a fresh one).
struct Turn {
    shared: MutexGuard<'static, Shared>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.shared.finished += 1;
        if self.shared.up && (std::thread::panicking() || self.shared.finished == TESTS) {
            let _ = compose_sh(&["down", "-v", "--remove-orphans"]);
            self.shared.up = false;
        }
    }
}

/// The stack, up and healthy, for one test; None (after printing why) when no
/// Docker engine answers.
fn turn() -> Option<Turn> {
    let mut shared = STACK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Err(why) = engine() {
        shared.finished += 1;
        if !shared.skip_said {
            say!("compose tests skipped: {why}");
            shared.skip_said = true;
        }
        return None;
    }
    if !shared.up {
        // A leftover of an interrupted run goes first.
        compose_sh(&["down", "-v", "--remove-orphans"]).expect("remove a leftover stack");
        let started = Instant::now();
        let output = compose_sh(&["up"]).expect("scripts/compose.sh up");
        say!(
            "stack: built (when changed), started and healthy in {:.1} s; {}",
            started.elapsed().as_secs_f64(),
            output
                .lines()
                .filter(|l| l.starts_with("compose:"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        shared.up = true;
        take_down_after(std::process::id());
    } else {
        // The previous test may have restarted a container: `up` again
        // changes nothing but waits until every service is healthy. A stack
        // a fault left unhealthy is reported, then started afresh so the
        // next test meets the state it expects.
        if let Err(why) = compose_sh(&["up"]) {
            say!(
                "stack left unhealthy by the previous test, started afresh: {}",
                last_lines(&why, 6)
            );
            say!("health checks: {}", health_report());
            compose_sh(&["down", "-v", "--remove-orphans"]).expect("take the stack down");
            compose_sh(&["up"]).expect("scripts/compose.sh up");
        }
    }
    Some(Turn { shared })
}

/// Takes the stack down once process `pid` has exited, whatever tests ran.
fn take_down_after(pid: u32) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; exec \"$0\" down -v --remove-orphans"
    );
    let spawned = Command::new("sh")
        .args(["-c", &script])
        .arg(crate_root().join("scripts/compose.sh"))
        .env("COMPOSE_PROJECT_NAME", PROJECT)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(error) = spawned {
        say!("cannot watch for the end of the tests ({error}); run scripts/compose.sh down -v");
    }
}

fn engine() -> Result<(), String> {
    let output = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "no Docker engine answers ({})",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Runs scripts/compose.sh under the tests' project name: its stdout and
/// stderr, or why it failed.
/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Every container's health status and its last check's output.
fn health_report() -> String {
    let ids = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={PROJECT}"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut args = vec![
        "inspect",
        "-f",
        "{{.Name}} {{if .State.Health}}{{.State.Health.Status}} {{range .State.Health.Log}}{{.ExitCode}}:{{.Output}};{{end}}{{else}}no-check{{end}}",
    ];
    args.extend(ids.split_whitespace());
    std::process::Command::new("docker")
        .args(&args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " / "))
        .unwrap_or_default()
}

fn compose_sh(args: &[&str]) -> Result<String, String> {
    let output = script_command(args)
        .output()
        .map_err(|e| format!("cannot run scripts/compose.sh: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("scripts/compose.sh {args:?} failed:\n{text}"))
    }
}

/// scripts/compose.sh under the tests' project name, without the variables
/// cargo sets for a test: its release build must look like one from a shell
/// (ring's build script reruns when CARGO_MANIFEST_DIR changes), or every
/// test run would rebuild it.
fn script_command(args: &[&str]) -> Command {
    let mut command = Command::new(crate_root().join("scripts/compose.sh"));
    command.args(args).env("COMPOSE_PROJECT_NAME", PROJECT);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo = name == "CARGO"
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref());
        if set_by_cargo {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// `scripts/compose.sh ARGS` off the async workers; panics when it fails.
async fn compose(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        compose_sh(&args).unwrap_or_else(|e| panic!("{e}"))
    })
    .await
    .expect("compose.sh task")
}

/// `docker ARGS` on a service's container (its id takes the place of `{}`).
async fn docker(args: &[&str], service: &str) {
    let id = compose(&["ps", "-q", service]).await.trim().to_owned();
    assert!(!id.is_empty(), "no container for {service}");
    let args: Vec<String> = args.iter().map(|a| a.replace("{}", &id)).collect();
    let output = tokio::task::spawn_blocking(move || Command::new("docker").args(&args).output())
        .await
        .expect("docker task")
        .expect("run docker");
    assert!(
        output.status.success(),
        "docker: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A client on the host sending GET / through the balancer back to back,
/// counting the answers that are not 200.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: u64,
    failed: u64,
    first_failures: Vec<String>,
}

impl Load {
    fn start() -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let client = http_support::client();
                let mut counts = Counts::default();
                while !stop.load(Ordering::Relaxed) {
                    counts.total += 1;
                    let answer = http_support::get(&client, PROXY).await;
                    if !matches!(&answer, Ok((status, _)) if status.is_success()) {
                        counts.failed += 1;
                        if counts.first_failures.len() < 5 {
                            counts.first_failures.push(format!("{answer:?}"));
                        }
                    }
                    // Paced so the client leaves the 2 cores to the stack.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                counts
            }
        });
        Load { stop, task }
    }

    async fn finish(self, test: &str) -> Counts {
        self.stop.store(true, Ordering::Relaxed);
        let counts = self.task.await.expect("load task");
        say!(
            "{test}: failed/total requests {}/{}",
            counts.failed,
            counts.total
        );
        assert_eq!(
            counts.failed, 0,
            "{test}: failed requests, the first: {:?}",
            counts.first_failures
        );
        counts
    }
}

/// A client on the host, logged in as the URL's user.
async fn nats(url: &str) -> async_nats::Client {
    rollcall::connect::NatsOptions::new(url)
        .connect("compose-test")
        .await
        .unwrap_or_else(|e| panic!("the host reaches NATS on 127.0.0.1:4222: {e}"))
        .client
}

/// Every snapshot of `web` discovery publishes, seen from the host.
struct Snapshots {
    seen: Arc<Mutex<Vec<Snapshot>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Snapshots {
    async fn follow() -> Snapshots {
        let client = nats(WATCH_URL).await;
        let mut subscription = client
            .subscribe("rollcall.catalog.web.*")
            .await
            .expect("subscribe to the web catalog");
        client.flush().await.expect("subscription registered");
        // Records assembled into snapshots, as a balancer does: what the
        // stream keeps first (a record only comes live when it changes),
        // then every live one.
        let mut held = rollcall::subscription::Held::default();
        let subjects = rollcall::protocol::Subjects::default();
        let js = async_nats::jetstream::new(client.clone());
        let stored = rollcall::catalog_stream::read_records(&js, &subjects)
            .await
            .expect("read the catalog stream");
        for stored in stored.records {
            if stored.record.service == "web" {
                let _ = held.offer(stored.record);
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let _client = client;
                while let Some(message) = subscription.next().await {
                    let record = rollcall::protocol::Subjects::default()
                        .parse_record(&message.subject, &message.payload)
                        .expect("a valid record");
                    if held.offer(record).is_ok() {
                        let snapshot: Snapshot = held.snapshot("web").expect("web is held");
                        seen.lock().expect("snapshots").push(snapshot);
                    }
                }
            }
        });
        Snapshots { seen, task }
    }

    fn ids(&self) -> Vec<Vec<String>> {
        self.seen
            .lock()
            .expect("snapshots")
            .iter()
            .map(|s| s.instances.iter().map(|i| i.id.clone()).collect())
            .collect()
    }

    fn latest(&self) -> Option<Vec<String>> {
        self.ids().pop()
    }

    /// Asserts no snapshot seen so far lacked one of `WEBS`.
    fn none_shrunken(&self, test: &str) {
        let ids = self.ids();
        for (i, set) in ids.iter().enumerate() {
            assert!(
                WEBS.iter().all(|web| set.iter().any(|id| id == web)),
                "{test}: snapshot {i} of {} lacks a live instance: {set:?}",
                ids.len()
            );
        }
    }
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn whole(ids: &[String]) -> bool {
    WEBS.iter().all(|web| ids.iter().any(|id| id == web))
}

/// A new instance, announced from the host (for the web1 container) with a
/// heartbeat every 500 ms as services do, shows up in a snapshot;
/// deregistered, it leaves again and the rest stay.
async fn join_and_leave(snapshots: &Snapshots) {
    let web = nats(REGISTER_URL).await;
    let heartbeat = tokio::spawn({
        let web = web.clone();
        async move {
            let record =
                r#"{"service":"web","id":"web4","address":"web1","port":8000,"ttl_ms":3000}"#;
            loop {
                let _ = web
                    .publish("rollcall.heartbeat.web.web4", record.into())
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    eventually("web4 in a snapshot", Duration::from_secs(20), || async {
        snapshots
            .latest()
            .filter(|ids| ids.iter().any(|id| id == "web4"))
    })
    .await;
    heartbeat.abort();
    web.publish("rollcall.deregister.web.web4", "{}".into())
        .await
        .expect("deregister web4");
    web.flush().await.expect("flush");
    eventually(
        "web4 gone, the rest whole",
        Duration::from_secs(10),
        || async {
            snapshots
                .latest()
                .filter(|ids| whole(ids) && !ids.iter().any(|id| id == "web4"))
        },
    )
    .await;
}

/// The messages of `count` requests in a row through the balancer.
async fn rotation(count: usize) -> Vec<String> {
    let client = http_support::client();
    let mut messages = Vec::new();
    for _ in 0..count {
        let (status, body) = http_support::must_get(&client, PROXY).await;
        assert!(status.is_success(), "{status}: {body}");
        messages.push(body.trim().to_owned());
    }
    messages
}

async fn ready() -> bool {
    let client = http_support::client();
    matches!(http_support::get(&client, READY).await, Ok((status, _)) if status.is_success())
}

#[tokio::test(flavor = "multi_thread")]
async fn all_services_are_healthy_and_requests_rotate_across_the_three_messages() {
    let Some(_turn) = turn() else { return };
    let states = compose(&["ps"]).await;
    for service in ["nats", "discovery", "balancer", "web1", "web2", "web3"] {
        let line = states
            .lines()
            .find(|l| l.contains(&format!("_{service}_")) || l.contains(&format!("-{service}-")))
            .unwrap_or_else(|| panic!("{service} in ps:\n{states}"));
        assert!(
            line.contains("(healthy)"),
            "{service} is not healthy: {line}"
        );
    }
    assert!(ready().await, "the balancer's /readyz");
    let messages = rotation(9).await;
    let mut first: Vec<&str> = messages[..3].iter().map(String::as_str).collect();
    first.sort_unstable();
    assert_eq!(
        first,
        ["hello from web1", "hey from web3", "hi from web2"],
        "{messages:?}"
    );
    for (i, message) in messages.iter().enumerate().skip(3) {
        assert_eq!(message, &messages[i - 3], "strict rotation: {messages:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watch_container_sees_registrations_and_catalog_records() {
    let Some(_turn) = turn() else { return };
    compose(&["restart", "web2"]).await;
    eventually(
        "the watch container to log web2's registration and its catalog record",
        Duration::from_secs(20),
        || async {
            let logs = compose(&["logs", "--no-color", "nats-box"]).await;
            let registered = logs
                .lines()
                .any(|l| l.contains("register") && l.contains("web/web2 web2:8000"));
            let joined = logs
                .lines()
                .any(|l| l.contains("joined") && l.contains("web/web2 web2:8000"));
            (registered && joined).then_some(())
        },
    )
    .await;
    eventually("web2 back in rotation", Duration::from_secs(20), || async {
        rotation(3)
            .await
            .iter()
            .any(|m| m == "hi from web2")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_web_container_leaves_after_its_ttl_and_returns_when_started() {
    let Some(_turn) = turn() else { return };
    let snapshots = Snapshots::follow().await;
    let load = Load::start();
    // From before the command: the kill may land before `docker` returns.
    let killed = Instant::now();
    docker(&["kill", "{}"], "web1").await;
    eventually("web1 gone from the catalog", TTL * 3, || async {
        snapshots
            .latest()
            .filter(|ids| !ids.iter().any(|id| id == "web1"))
    })
    .await;
    let gone = killed.elapsed();
    docker(&["start", "{}"], "web1").await;
    let started = Instant::now();
    eventually("web1 back in rotation", Duration::from_secs(30), || async {
        rotation(3)
            .await
            .iter()
            .any(|m| m == "hello from web1")
            .then_some(())
    })
    .await;
    say!(
        "kill web1: gone from the catalog {:.2} s after the kill (TTL {} s); back in rotation {:.2} s after start",
        gone.as_secs_f64(),
        TTL.as_secs(),
        started.elapsed().as_secs_f64()
    );
    // The TTL runs from its last heartbeat, up to one interval before the kill.
    assert!(gone >= TTL - HEARTBEAT, "left before its TTL: {gone:?}");
    load.finish("kill web1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_discovery_under_load_shrinks_nothing_and_a_new_instance_joins_after() {
    let Some(_turn) = turn() else { return };
    let snapshots = Snapshots::follow().await;
    let load = Load::start();
    let restarting = Instant::now();
    compose(&["restart", "discovery"]).await;
    eventually(
        "discovery healthy again",
        Duration::from_secs(30),
        || async {
            let id = compose(&["ps", "-q", "discovery"]).await;
            let output = Command::new("docker")
                .args(["inspect", "-f", "{{.State.Health.Status}}", id.trim()])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&output.stdout).trim() == "healthy").then_some(())
        },
    )
    .await;
    let healthy = restarting.elapsed();
    join_and_leave(&snapshots).await;
    say!(
        "restart discovery: healthy again after {:.2} s; {} snapshots, none shrunken",
        healthy.as_secs_f64(),
        snapshots.ids().len()
    );
    snapshots.none_shrunken("restart discovery");
    load.finish("restart discovery").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_nats_for_five_seconds_keeps_routing_and_the_balancer_resyncs_after() {
    let Some(_turn) = turn() else { return };
    let load = Load::start();
    compose(&["stop", "nats"]).await;
    eventually(
        "the balancer to see NATS gone",
        Duration::from_secs(10),
        || async { (!ready().await).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let messages = rotation(3).await;
    assert_eq!(
        messages.len(),
        3,
        "routing on the last catalog: {messages:?}"
    );
    compose(&["start", "nats"]).await;
    let started = Instant::now();
    eventually(
        "the balancer ready again",
        Duration::from_secs(30),
        || async { ready().await.then_some(()) },
    )
    .await;
    let resynced = started.elapsed();
    let snapshots = Snapshots::follow().await;
    eventually("all three in rotation", Duration::from_secs(15), || async {
        let mut messages = rotation(3).await;
        messages.sort();
        (messages == ["hello from web1", "hey from web3", "hi from web2"]).then_some(())
    })
    .await;
    say!(
        "stop nats 5 s: balancer re-synced {:.2} s after nats started",
        resynced.as_secs_f64()
    );
    snapshots.none_shrunken("stop nats");
    load.finish("stop nats").await;
}

/// Cuts discovery off for longer than the TTL with `cut`, restores it with
/// `restore`, and asserts nothing was expired for it.
async fn discovery_cut_off(test: &str, cut: &[&str], restore: &[&str]) {
    let network = format!("{PROJECT}_default");
    let cut: Vec<String> = cut.iter().map(|a| a.replace("NET", &network)).collect();
    let restore: Vec<String> = restore.iter().map(|a| a.replace("NET", &network)).collect();
    let snapshots = Snapshots::follow().await;
    let load = Load::start();
    docker(
        &cut.iter().map(String::as_str).collect::<Vec<_>>(),
        "discovery",
    )
    .await;
    tokio::time::sleep(TTL + Duration::from_secs(2)).await;
    docker(
        &restore.iter().map(String::as_str).collect::<Vec<_>>(),
        "discovery",
    )
    .await;
    let restored = Instant::now();
    // It hears events again, and its catalog is whole: a join and a leave
    // come through with every other instance still there.
    join_and_leave(&snapshots).await;
    say!(
        "{test}: catalog whole again {:.2} s after discovery was back; {} snapshots",
        restored.elapsed().as_secs_f64(),
        snapshots.ids().len()
    );
    load.finish(test).await;
    snapshots.none_shrunken(test);
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_cut_from_the_network_longer_than_the_ttl_expires_nothing() {
    let Some(_turn) = turn() else { return };
    discovery_cut_off(
        "network disconnect discovery",
        &["network", "disconnect", "NET", "{}"],
        &["network", "connect", "--alias", "discovery", "NET", "{}"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_paused_longer_than_the_ttl_expires_nothing() {
    let Some(_turn) = turn() else { return };
    discovery_cut_off("pause discovery", &["pause", "{}"], &["unpause", "{}"]).await;
}

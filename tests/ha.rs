//! Discovery without a single point of failure, with real processes: three
//! `rollcall discovery` replicas on one real nats-server, instances
//! heartbeating, a balancer and a client request loop through it. Each test
//! breaks something (kill -9 the leader, freeze it or a follower, race for
//! the fence, restart NATS, cut the leader off in a network namespace) and
//! then checks what every catalog subscriber saw: revisions strictly
//! increasing per service, no snapshot missing an instance that was alive,
//! no failed client request. One more floods the event subjects with junk
//! while instances deregister, and counts what was lost.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/ha.rs"]
mod ha;
#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cli::{rollcall, Process};
use ha::{record, replica, Fleet, Seen};
use rollcall::protocol::Instance;
use support::http::{client, get};
use support::{eventually, NatsServer};
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(10);
/// Longer than [`ha::TTL_MS`]: a freeze this long would expire everything if
/// the frozen replica trusted its own clock.
const FREEZE: Duration = Duration::from_millis(2500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_hands_over_in_under_a_second() {
    let mut fleet = Fleet::one_server(3).await;
    fleet.kill_the_leader().await;
    fleet.change_reaches_subscribers().await;
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_fenced_out_and_expires_nothing() {
    let mut fleet = Fleet::one_server(3).await;
    fleet.freeze_the_leader(FREEZE).await;
    fleet.change_reaches_subscribers().await;
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_frozen_replica_expires_nothing_because_of_its_freeze() {
    let mut fleet = Fleet::one_server(1).await;
    let leader = fleet.leader_after(0).await;
    fleet.signal(&leader, "STOP");
    tokio::time::sleep(FREEZE).await;
    fleet.signal(&leader, "CONT");
    let replica = fleet.process(&leader).as_ref().unwrap();
    eventually("the replica notices its own stall", LIMIT, || async {
        replica.stderr_text().contains("stood still").then_some(())
    })
    .await;
    fleet.change_reaches_subscribers().await;
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_for_an_empty_fence_elect_exactly_one() {
    let fleet = Fleet::one_server(3).await;
    let first = fleet.leader_after(0).await;
    // A second of heartbeats: had two won, two replicas would heartbeat.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = fleet.seen.lock().unwrap();
    let leaders: std::collections::BTreeSet<(&str, u64)> = seen
        .leaders
        .iter()
        .map(|l| (l.replica.as_str(), l.epoch))
        .collect();
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    let led = fleet
        .replicas
        .iter()
        .flatten()
        .filter(|p| p.stderr_text().contains("leading the catalog"))
        .count();
    assert_eq!(led, 1, "exactly one replica took the fence");
    assert_eq!(
        leaders.iter().next().map(|l| l.0),
        Some(first.replica.as_str())
    );
    drop(seen);
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_keeps_every_invariant() {
    let mut fleet = Fleet::one_server(3).await;
    fleet.leader_after(0).await;
    fleet.servers.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.servers.restart();
    fleet.change_reaches_subscribers().await;
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_discovery_promptly_while_nats_is_down() {
    let mut server = NatsServer::start();
    let mut lone = replica(&server.url(), "d0");
    lone.wait_stderr("leading the catalog", LIMIT);
    server.stop();
    lone.wait_stderr("lost the NATS connection", LIMIT);
    let asked = std::time::Instant::now();
    lone.signal("TERM");
    lone.wait(Duration::from_secs(5));
    eprintln!("SIGTERM with NATS down -> exit: {:?}", asked.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezing_the_leader_then_a_follower_keeps_every_invariant() {
    let mut fleet = Fleet::one_server(3).await;
    let (first, second) = fleet.freeze_the_leader(FREEZE).await;
    // Now a replica that never led.
    let follower = (0..3)
        .map(|i| format!("d{i}"))
        .find(|name| *name != first.replica && *name != second.replica)
        .unwrap();
    let index: usize = follower[1..].parse().unwrap();
    let frozen = fleet.replicas[index].as_ref().unwrap();
    frozen.signal("STOP");
    tokio::time::sleep(FREEZE).await;
    frozen.signal("CONT");
    eventually(
        "the thawed follower notices its own stall",
        LIMIT,
        || async { frozen.stderr_text().contains("stood still").then_some(()) },
    )
    .await;
    fleet.change_reaches_subscribers().await;
    let epochs: Vec<(String, u64)> = fleet
        .leaderships()
        .into_iter()
        .filter(|(_, epoch)| *epoch > second.epoch)
        .collect();
    assert!(
        epochs.is_empty(),
        "a thawed follower took over from a live leader: {epochs:?}"
    );
    assert!(!frozen.stderr_text().contains("leading the catalog"));
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_as_the_leader_dies_makes_no_second_leader() {
    let mut fleet = Fleet::one_server(2).await;
    let old = fleet.leader_after(0).await;
    fleet.signal(&old, "KILL");
    let killed = tokio::time::Instant::now();
    let added = fleet.add_replica();
    let new = fleet.leader_after(old.epoch).await;
    let took = killed.elapsed();
    assert!(took < Duration::from_millis(1500), "takeover took {took:?}");
    fleet.change_reaches_subscribers().await;
    let mut by_epoch: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (replica, epoch) in fleet.leaderships() {
        by_epoch.entry(epoch).or_default().push(replica);
    }
    assert!(
        by_epoch.values().all(|replicas| replicas.len() == 1),
        "two replicas led under one epoch: {by_epoch:?}"
    );
    assert_eq!(
        by_epoch.range(old.epoch + 1..).count(),
        1,
        "one takeover, not a flap: {by_epoch:?}"
    );
    let joined = fleet.replicas[added].as_ref().unwrap().stderr_text();
    let role = if new.replica == format!("d{added}") {
        "leading the catalog"
    } else {
        "following the catalog leader"
    };
    assert!(
        joined.contains(role),
        "the new replica is not {role}:\n{joined}"
    );
    fleet.check();
}

/// A network namespace joined to this one by a veth pair with private
/// addresses: a process run inside reaches the host only over the pair, so
/// taking the host's end down cuts it off. Deleted on drop (the pair goes
/// with it), also when the test panics.
struct Netns {
    name: String,
    host_end: String,
    /// The host end's address, which the namespace reaches.
    host: std::net::Ipv4Addr,
}

impl Netns {
    /// A namespace named after this process; `Err` saying why when it cannot
    /// be made (not root, no `ip`).
    fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        let (name, host_end, inner_end) = (
            format!("rollcall-ha-{pid}"),
            format!("rch{pid}"),
            format!("rcn{pid}"),
        );
        ip(&["netns", "add", &name])?;
        let netns = Netns {
            name,
            host_end,
            host: std::net::Ipv4Addr::new(10, 213, (pid % 250) as u8, 1),
        };
        let host = format!("{}/30", netns.host);
        let inner = format!("10.213.{}.2/30", pid % 250);
        let ns = netns.name.as_str();
        ip(&[
            "link",
            "add",
            &netns.host_end,
            "type",
            "veth",
            "peer",
            "name",
            &inner_end,
            "netns",
            ns,
        ])?;
        ip(&["addr", "add", &host, "dev", &netns.host_end])?;
        ip(&["-n", ns, "addr", "add", &inner, "dev", &inner_end])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", &inner_end, "up"])?;
        netns.restore();
        Ok(netns)
    }

    /// `command`, run inside the namespace.
    fn exec(&self, command: std::process::Command) -> std::process::Command {
        let mut inside = std::process::Command::new("ip");
        inside.args(["netns", "exec", &self.name]);
        inside.arg(command.get_program()).args(command.get_args());
        for (key, value) in command.get_envs() {
            if let Some(value) = value {
                inside.env(key, value);
            }
        }
        inside
    }

    fn cut(&self) {
        ip(&["link", "set", &self.host_end, "down"]).expect("take the veth down");
    }

    fn restore(&self) {
        ip(&["link", "set", &self.host_end, "up"]).expect("bring the veth up");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_end]);
    }
}

/// `ip <args>`: `Err` with what it said when it fails or cannot run.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// Relays TCP from `host`:<a free port> to 127.0.0.1:`port`, where the
/// server listens; returns the NATS URL on `host`. Stops with the runtime.
async fn relay(host: std::net::Ipv4Addr, port: u16) -> String {
    let listener = TcpListener::bind((host, 0)).await.expect("bind the relay");
    let url = format!("nats://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut server).await;
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_nats_is_fenced_out_and_follows_once_back() {
    let netns = match Netns::create() {
        Ok(netns) => netns,
        Err(why) => {
            // Past the harness's capture, so a skip shows in a plain run.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "network cut-off test skipped: {why} (needs root and iproute2)"
            );
            return;
        }
    };
    let server = NatsServer::start();
    let inside = relay(netns.host, server.port()).await;
    let urls = vec![server.url()];
    let fleet = Fleet::start_with(server, &urls, LIMIT, |urls| {
        let url = &urls[0];
        let command = rollcall(&["discovery", "--nats", &inside, "--replica", "d0"]);
        let cut_off = Process::spawn(netns.exec(command));
        cut_off.wait_stderr("leading the catalog", LIMIT);
        vec![
            Some(cut_off),
            Some(replica(url, "d1")),
            Some(replica(url, "d2")),
        ]
    })
    .await;
    let old = fleet.leader_after(0).await;
    assert_eq!(old.replica, "d0", "the replica in the namespace leads");
    netns.cut();
    let cut = tokio::time::Instant::now();
    let cut_off = fleet.replicas[0].as_ref().unwrap();
    eventually("the cut-off leader steps down", LIMIT, || async {
        let log = cut_off.stderr_text();
        log.contains("cannot hear this replica's own leader heartbeat")
            .then_some(())
    })
    .await;
    let noticed = cut.elapsed();
    let new = fleet.leader_after(old.epoch).await;
    let took = cut.elapsed();
    assert!(took < Duration::from_millis(1500), "takeover took {took:?}");
    assert!(
        noticed < Duration::from_secs(2),
        "stepped down after {noticed:?}"
    );
    // The cut outlasts the TTL: a leader trusting its own silence would
    // expire every instance.
    tokio::time::sleep(FREEZE.saturating_sub(cut.elapsed())).await;
    netns.restore();
    eventually("the cut-off replica follows once back", LIMIT, || async {
        let log = cut_off.stderr_text();
        log.contains("following the catalog leader").then_some(())
    })
    .await;
    fleet.change_reaches_subscribers().await;
    assert_ne!(new.replica, old.replica);
    let led_again = fleet
        .leaderships()
        .into_iter()
        .any(|(replica, epoch)| replica == old.replica && epoch > old.epoch);
    assert!(!led_again, "the cut-off replica took over again");
    eprintln!(
        "veth down -> new leader heartbeat: {took:?}; old leader stepped down after {noticed:?}"
    );
    fleet.check();
}

/// Publishers flooding the event subjects with junk during the test.
const FLOODERS: usize = 4;
/// Junk messages each publisher sends.
const FLOOD: usize = 100;
/// As big as nats/single.conf's `max_payload` lets a message be.
const JUNK_BYTES: usize = 1024 * 1024 - 512;
/// Instances that deregister in the middle of the flood.
const LEAVING: usize = 20;

/// What one discovery replica's connection went through under a flood.
struct FloodOutcome {
    /// Deregistrations that never took effect.
    lost: usize,
    /// Junk messages counted as too large.
    too_large: u64,
    /// Log lines about invalid events.
    logged: usize,
    took: Duration,
    /// The discovery process's peak resident memory, in MiB.
    peak_mib: u64,
    server_log: String,
    discovery_log: String,
}

/// Starts nats/single.conf and one discovery, registers [`LEAVING`]
/// instances that never expire, floods every event kind with junk from
/// [`FLOODERS`] publishers while those instances deregister, then registers
/// a marker from the deregistering client: once the marker is in a
/// snapshot, every deregistration sent before it has been folded (or lost).
async fn flood_while_deregistering() -> FloodOutcome {
    let server = nats_extra::ConfiguredServer::from_file("nats/single.conf");
    let admin = support::free_port();
    let discovery = Process::spawn(rollcall(&[
        "discovery",
        "--nats",
        &server.url(),
        "--replica",
        "d0",
        "--admin",
        &format!("127.0.0.1:{admin}"),
    ]));
    discovery.wait_stderr("leading the catalog", LIMIT);
    let nats = support::client(&server.url()).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    record(&nats, Arc::clone(&seen)).await;
    let ids: Vec<String> = (0..LEAVING).map(|i| format!("web-{i}")).collect();
    for id in &ids {
        let mut instance = Instance::new("web", id, "127.0.0.1", 9);
        instance.ttl_ms = 600_000;
        let payload = serde_json::to_vec(&instance).unwrap();
        let subject = format!("rollcall.register.web.{id}");
        nats.publish(subject, payload.into()).await.unwrap();
    }
    let latest = |seen: &Seen| seen.snapshots.last().cloned();
    eventually("every instance registered", LIMIT, || async {
        latest(&seen.lock().unwrap()).filter(|s| s.instances.len() == LEAVING)
    })
    .await;
    let started = tokio::time::Instant::now();
    let mut flooders = Vec::new();
    for _ in 0..FLOODERS {
        let flooder = support::client(&server.url()).await;
        flooders.push(tokio::spawn(async move {
            let junk = bytes::Bytes::from(vec![b'x'; JUNK_BYTES]);
            for n in 0..FLOOD {
                let kind = ["register", "heartbeat", "deregister"][n % 3];
                let subject = format!("rollcall.{kind}.x.y");
                flooder.publish(subject, junk.clone()).await.unwrap();
            }
            flooder.flush().await.unwrap();
        }));
    }
    for id in &ids {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let subject = format!("rollcall.deregister.web.{id}");
        nats.publish(subject, "{}".into()).await.unwrap();
    }
    for flooder in flooders {
        flooder.await.unwrap();
    }
    let took = started.elapsed();
    let mut marker = Instance::new("web", "marker", "127.0.0.1", 9);
    marker.ttl_ms = 600_000;
    let payload: bytes::Bytes = serde_json::to_vec(&marker).unwrap().into();
    let after = eventually("the marker folded after the flood", LIMIT * 3, || async {
        // Again every 200 ms: one sent while discovery reconnects is lost.
        let _ = nats
            .publish("rollcall.heartbeat.web.marker", payload.clone())
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = seen.lock().unwrap();
        let last = latest(&seen)?;
        last.instances
            .iter()
            .any(|i| i.id == "marker")
            .then_some(last)
    })
    .await;
    let metrics = http_text(&format!("http://127.0.0.1:{admin}/metrics")).await;
    let peak_mib = peak_memory_kib(discovery.id()) / 1024;
    let discovery_log = discovery.stderr_text();
    FloodOutcome {
        lost: after.instances.len() - 1,
        too_large: support::metric_sum(
            &metrics,
            "rollcall_discovery_invalid_events_total{reason=\"too_large\"}",
        )
        .unwrap_or(0),
        logged: discovery_log.matches("ignoring an invalid event").count(),
        took,
        peak_mib,
        server_log: server.log(),
        discovery_log,
    }
}

async fn http_text(url: &str) -> String {
    let (status, body) = get(&client(), url).await.expect("reach the admin endpoint");
    assert!(status.is_success(), "GET {url}: {status}");
    body
}

/// `VmHWM` of process `pid`: its peak resident memory so far.
fn peak_memory_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_oversized_events_loses_no_deregistration() {
    let outcome = flood_while_deregistering().await;
    eprintln!(
        "flood of {} x {JUNK_BYTES} B from {FLOODERS} publishers in {:?}: {} of {LEAVING} deregistrations lost, {} counted too large, {} log lines, discovery peak RSS {} MiB",
        FLOODERS * FLOOD,
        outcome.took,
        outcome.lost,
        outcome.too_large,
        outcome.logged,
        outcome.peak_mib,
    );
    assert!(
        !outcome.server_log.contains("Slow Consumer"),
        "the server cut a client off:\n{}",
        outcome.server_log
    );
    assert!(
        !outcome.discovery_log.contains("lost the NATS connection")
            && !outcome.discovery_log.contains("slow consumer"),
        "discovery lost messages:\n{}",
        outcome.discovery_log
    );
    assert_eq!(
        outcome.lost, 0,
        "deregistrations lost; discovery said:\n{}",
        outcome.discovery_log
    );
    assert_eq!(
        outcome.too_large,
        (FLOODERS * FLOOD) as u64,
        "every junk message counted"
    );
    let seconds = outcome.took.as_secs() as usize + 2;
    assert!(
        outcome.logged <= seconds,
        "{} log lines about invalid events in {:?}",
        outcome.logged,
        outcome.took
    );
}

//! Discovery without a single point of failure, with real processes: three
//! `rollcall discovery` replicas on one real nats-server, instances
//! heartbeating, a balancer and a client request loop through it. Each test
//! breaks something (kill -9 the leader, freeze it, race for the fence,
//! restart NATS) and then checks what every catalog subscriber saw:
//! revisions strictly increasing per service, no snapshot missing an
//! instance that was alive, no failed client request.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/ha.rs"]
mod ha;
mod support;

use std::time::Duration;

use ha::{replica, Fleet};
use support::{eventually, NatsServer};

const LIMIT: Duration = Duration::from_secs(10);
/// Longer than [`ha::TTL_MS`]: a freeze this long would expire everything if
/// the frozen replica trusted its own clock.
const FREEZE: Duration = Duration::from_millis(2500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_hands_over_in_under_a_second() {
    let mut fleet = Fleet::one_server(3).await;
    let old = fleet.leader_after(0).await;
    fleet.signal(&old, "KILL");
    let killed = tokio::time::Instant::now();
    let new = fleet.leader_after(old.epoch).await;
    let took = killed.elapsed();
    assert_ne!(new.replica, old.replica);
    assert!(took < Duration::from_millis(1500), "takeover took {took:?}");
    eprintln!("kill -9 -> new leader heartbeat: {took:?}");
    fleet.change_reaches_subscribers().await;
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_fenced_out_and_expires_nothing() {
    let mut fleet = Fleet::one_server(3).await;
    let old = fleet.leader_after(0).await;
    fleet.signal(&old, "STOP");
    let new = fleet.leader_after(old.epoch).await;
    tokio::time::sleep(FREEZE).await;
    fleet.signal(&old, "CONT");
    let frozen = fleet.process(&old).as_ref().unwrap();
    eventually("the thawed leader stops writing", LIMIT, || async {
        let log = frozen.stderr_text();
        (log.contains("stopping writes") || log.contains("following the catalog leader"))
            .then_some(())
    })
    .await;
    fleet.change_reaches_subscribers().await;
    assert_ne!(new.replica, old.replica);
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

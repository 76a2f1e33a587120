//! Discovery without a single point of failure on a three-node NATS cluster
//! (nats/cluster/): three `rollcall discovery` replicas, each preferring its
//! own node, three instances heartbeating through different nodes, a
//! balancer and a client request loop through it. Each test breaks
//! something (kill -9 or freeze the leading replica, restart every NATS node
//! in turn, kill -9 or freeze the node leading the catalog stream's raft
//! group) and checks what every catalog subscriber saw: revisions strictly
//! increasing per service, no snapshot missing an instance that was alive,
//! no failed client request.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/ha.rs"]
mod ha;
#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::time::Duration;

use cli::{rollcall, Process};
use ha::Fleet;
use nats_extra::{wait_healthy, Cluster};
use rollcall::protocol::Subjects;
use support::eventually;

/// A JetStream stream-leader election in nats-server 2.15 waits out a
/// randomised election timeout of several seconds, and a write that hit the
/// leaderless moment waits out its ack timeout before it is sent again.
const LIMIT: Duration = Duration::from_secs(30);
/// Longer than [`ha::TTL_MS`]: a freeze this long would expire everything if
/// the frozen replica trusted its own clock.
const FREEZE: Duration = Duration::from_millis(2500);

/// A cluster and a fleet of three replicas on it.
async fn fleet() -> Fleet<Cluster> {
    let cluster = Cluster::start();
    let urls = cluster.url_list();
    Fleet::start(cluster, &urls, 3, LIMIT).await
}

/// `$JS.API.STREAM.INFO.<catalog stream>` as JSON, asked through `nats`;
/// `None` while no answer comes (no stream leader, no meta leader).
async fn stream_info(nats: &async_nats::Client) -> Option<serde_json::Value> {
    let subject = format!(
        "$JS.API.STREAM.INFO.{}",
        Subjects::default().catalog_stream()
    );
    let request = nats.request(subject, bytes::Bytes::new());
    let reply = tokio::time::timeout(Duration::from_secs(2), request)
        .await
        .ok()?
        .ok()?;
    serde_json::from_slice(&reply.payload).ok()
}

/// The server name of the catalog stream's leader, once it has one.
async fn stream_leader(fleet: &Fleet<Cluster>) -> String {
    eventually("the catalog stream has a leader", LIMIT, || async {
        let info = stream_info(&fleet.nats).await?;
        info["cluster"]["leader"].as_str().map(str::to_owned)
    })
    .await
}

/// Waits until node `index` is healthy again and the catalog stream has a
/// leader and two followers that are current: then any one node may go.
async fn wait_whole(fleet: &Fleet<Cluster>, index: usize) {
    wait_healthy(fleet.servers.nodes[index].monitor_port, LIMIT);
    eventually(
        "every copy of the catalog stream current",
        LIMIT,
        || async {
            let info = stream_info(&fleet.nats).await?;
            let cluster = &info["cluster"];
            let followers = cluster["replicas"].as_array()?;
            let current = followers.iter().all(|r| r["current"] == true);
            (cluster["leader"].is_string() && followers.len() == 2 && current).then_some(())
        },
    )
    .await;
}

/// Whether any replica logged `needle`.
fn any_replica_said(fleet: &Fleet<Cluster>, needle: &str) -> bool {
    (fleet.replicas.iter().flatten()).any(|p| p.stderr_text().contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_on_a_cluster_replicates_the_catalog_stream_three_times() {
    let fleet = fleet().await;
    let info = stream_info(&fleet.nats).await.expect("stream info");
    assert_eq!(info["config"]["num_replicas"], 3, "{info}");
    wait_whole(&fleet, 0).await;
    fleet.check();
}

/// A cluster booting node by node (after a power cut, or compose starting
/// one container first): discovery started on the first node up, before
/// JetStream can elect a meta leader, keeps trying, says so, and leads
/// once the other nodes join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_started_before_jetstream_is_ready_waits_for_it() {
    let mut cluster = Cluster::start();
    for node in &mut cluster.nodes {
        node.stop();
    }
    cluster.nodes[0].restart();
    let url = cluster.nodes[0].url();
    let discovery = Process::spawn(rollcall(&[
        "discovery",
        "--nats",
        &url,
        "--replica",
        "early",
    ]));
    discovery.wait_stderr("yet; trying again", LIMIT);
    assert!(
        !discovery.stderr_text().contains("leading the catalog"),
        "led with one node of three"
    );
    let nats = async_nats::connect(&url).await.expect("connect to node 1");
    let subjects = Subjects::default();
    let mut feed = support::CatalogFeed::subscribe(&nats, &subjects.catalog_wildcard()).await;
    cluster.nodes[1].restart();
    cluster.nodes[2].restart();
    discovery.wait_stderr("leading the catalog", LIMIT);
    nats.publish(
        "rollcall.register.web.web-1",
        support::register_json("web", "web-1", 8080, serde_json::json!({})).into(),
    )
    .await
    .expect("publish a register");
    let snapshot = feed.next(LIMIT).await;
    assert_eq!(snapshot.service, "web");
    assert_eq!(
        snapshot
            .instances
            .iter()
            .map(|i| i.id.as_str())
            .collect::<Vec<_>>(),
        ["web-1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_on_a_cluster_hands_over_in_under_a_second() {
    let mut fleet = fleet().await;
    fleet.kill_the_leader().await;
    fleet.change_reaches_subscribers().await;
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_on_a_cluster_is_fenced_out_and_expires_nothing() {
    let mut fleet = fleet().await;
    fleet.freeze_the_leader(FREEZE).await;
    fleet.change_reaches_subscribers().await;
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_nats_node_in_turn_keeps_every_invariant() {
    let mut fleet = fleet().await;
    fleet.leader_after(0).await;
    wait_whole(&fleet, 0).await;
    for index in 0..3 {
        fleet.servers.nodes[index].stop();
        fleet.joins(&format!("web-while-{index}-down")).await;
        fleet.servers.nodes[index].restart();
        wait_whole(&fleet, index).await;
        fleet.joins(&format!("web-after-{index}")).await;
    }
    fleet.check();
}

/// Once a leader writes and every copy of the stream is current: the
/// node leading the catalog stream, by name and index.
async fn stream_leader_node(fleet: &Fleet<Cluster>) -> (String, usize) {
    fleet.leader_after(0).await;
    wait_whole(fleet, 0).await;
    let leader = stream_leader(fleet).await;
    let index = (fleet.servers.nodes.iter())
        .position(|node| node.name() == leader)
        .expect("the stream leader is a node of the cluster");
    (leader, index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_catalog_streams_leader_node_loses_no_write() {
    let mut fleet = fleet().await;
    let (leader, index) = stream_leader_node(&fleet).await;
    fleet.servers.nodes[index].stop();
    let killed = tokio::time::Instant::now();
    // Written while the stream has no leader: refused or unacknowledged,
    // then written again until a new stream leader stores it.
    fleet.joins("web-during-election").await;
    eprintln!(
        "stream leader {leader} kill -9 -> change stored: {:?}",
        killed.elapsed()
    );
    assert!(
        any_replica_said(&fleet, "a record was not stored; writing it again"),
        "no write hit the leaderless stream: the retry path was not taken"
    );
    assert_ne!(stream_leader(&fleet).await, leader);
    fleet.servers.nodes[index].restart();
    wait_whole(&fleet, index).await;
    fleet.joins("web-after-restart").await;
    fleet.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezing_the_catalog_streams_leader_node_loses_no_write() {
    let mut fleet = fleet().await;
    let (leader, index) = stream_leader_node(&fleet).await;
    // The instance heartbeating through the frozen node cannot be heard
    // until its client gives up on the node: it may expire, rightly.
    let cut_off = fleet.alive.remove(index).id;
    fleet.servers.nodes[index].signal("STOP");
    let frozen = tokio::time::Instant::now();
    // Written while the stream's leader cannot answer: unacknowledged
    // until the ack timeout, then written again until a new stream leader
    // stores it. When the leading replica was on the frozen node too, the
    // replica taking over retries its fence write the same way first.
    fleet.joins("web-during-freeze").await;
    eprintln!(
        "stream leader {leader} SIGSTOP -> change stored: {:?} ({cut_off} cut off)",
        frozen.elapsed()
    );
    let snapshot_retried = any_replica_said(&fleet, "a record was not stored; writing it again");
    let fence_retried = any_replica_said(&fleet, "cannot write the catalog fence");
    assert!(
        snapshot_retried || fence_retried,
        "no write hit the frozen stream leader: the retry path was not taken"
    );
    fleet.servers.nodes[index].signal("CONT");
    wait_whole(&fleet, index).await;
    fleet.joins("web-after-thaw").await;
    fleet.check();
}

//! A three-node NATS cluster (nats/cluster/): losing the node a balancer is
//! connected to costs it nothing but a re-sync from another node (no
//! request fails, changes arrive live again after it), and discovery, on a
//! surviving node, keeps the catalog.

#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nats_extra::Cluster;
use rollcall::balancer::{self, routes::Routes, BalancerConfig};
use rollcall::catalog_stream;
use rollcall::connect::NatsOptions;
use rollcall::protocol::Subjects;
use rollcall::subscription::{self, Stats as SubscriptionStats};
use support::eventually;
use support::http::{self, HttpBackend, TestClient};

/// A JetStream meta leader election takes several seconds (nats-server
/// draws its election timeout from 4-9 s), and a catalog read that hit the
/// leaderless moment waits out its request timeout before the next try.
const LIMIT: Duration = Duration::from_secs(30);

/// Once re-synced, the balancer follows live snapshots again: a change
/// takes traffic within this (it takes milliseconds; the limit is far
/// below the [`LIMIT`] a re-sync may take, so a change that only arrived
/// with some later re-read would fail it).
const LIVE_LIMIT: Duration = Duration::from_secs(3);

/// The bodies of `n` requests through the balancer, sorted; every one must
/// be a 200.
async fn bodies(client: &TestClient, port: u16, n: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    for _ in 0..n {
        let (status, body) = http::must_get(client, &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(status, 200, "{body}");
        bodies.push(body);
    }
    bodies.sort();
    bodies
}

async fn register(service: &async_nats::Client, id: &str, port: u16) {
    let record = support::register_json("web", id, port, serde_json::json!({"ttl_ms": 60000}));
    service
        .publish(format!("rollcall.register.web.{id}"), record.into())
        .await
        .expect("publish");
    service.flush().await.expect("flush");
}

/// Which node dies under the balancer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    /// A node that leads neither JetStream's meta group nor the stream.
    Follower,
    /// The JetStream meta leader: consumers (and so the stream re-read)
    /// wait for a new one to be elected.
    MetaLeader,
}

/// Runs the scenario: the balancer serves every request all along, the
/// catalog is re-read from the stream within [`LIMIT`] of the kill, and a
/// change made then takes traffic within [`LIVE_LIMIT`].
async fn kill_the_balancers_node(victim: Victim) {
    let mut cluster = Cluster::start();
    let subjects = Subjects::default();

    // In a cluster the catalog stream must be replicated, or it dies with
    // the one node that holds it: created here with 3 replicas before
    // discovery starts (discovery keeps a stream that exists).
    let admin = support::client(&cluster.nodes[0].url()).await;
    let mut stream = async_nats::jetstream::new(admin)
        .create_stream(catalog_stream::stream_config(&subjects, 3))
        .await
        .expect("create the replicated catalog stream");
    let stream_leader = stream
        .info()
        .await
        .expect("stream info")
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("the stream has a leader");
    let meta_leader = nats_extra::meta_leader(cluster.nodes[0].monitor_port)
        .expect("the cluster has a JetStream meta leader");
    let name = |i: usize| format!("rollcall-{}", cluster.nodes[i].name_number);
    let doomed = (0..3)
        .find(|&i| match victim {
            Victim::MetaLeader => name(i) == meta_leader,
            Victim::Follower => name(i) != meta_leader && name(i) != stream_leader,
        })
        .expect("such a node");
    let doomed_name = name(doomed);
    let (other, third) = ((doomed + 1) % 3, (doomed + 2) % 3);

    // Each client starts on one node, learns the others from the server and
    // moves there when its node goes away.
    let discovery = support::RunningDiscovery::start(&cluster.nodes[other].url()).await;
    let service = support::client(&cluster.nodes[third].url()).await;
    let backends = [
        HttpBackend::start("one").await,
        HttpBackend::start("two").await,
        HttpBackend::start("three").await,
    ];
    register(&service, "web-1", backends[0].port()).await;
    register(&service, "web-2", backends[1].port()).await;

    // The balancer, following the catalog through the doomed node.
    let connection = NatsOptions::new(cluster.nodes[doomed].url())
        .connect("test-balancer")
        .await
        .expect("connect to the doomed node");
    let stats = Arc::new(SubscriptionStats::default());
    let updates = subscription::follow_with_stats(&connection, subjects.clone(), stats.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the balancer");
    let proxy = listener.local_addr().expect("balancer address").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = BalancerConfig::new(Routes::parse(&["web"]).expect("route"));
    let balancer = tokio::spawn(balancer::serve(listener, None, config, updates, async {
        let _ = stopped.await;
    }));
    let client = http::client();
    let url = format!("http://127.0.0.1:{proxy}/");
    eventually("the balancer routes to both instances", LIMIT, || async {
        let routed = http::get(&client, &url)
            .await
            .is_ok_and(|(status, _)| status == 200)
            && bodies(&client, proxy, 2).await == ["one", "two"];
        routed.then_some(())
    })
    .await;

    let resets_before = stats.resets.load(Ordering::Relaxed);
    let killed = Instant::now();
    cluster.nodes[doomed].stop();
    // Serving all along: every request until the re-sync reaches a live
    // instance.
    let served = Cell::new(0);
    eventually("the catalog re-sync from the stream", LIMIT, || async {
        assert_eq!(bodies(&client, proxy, 2).await, ["one", "two"]);
        served.set(served.get() + 2);
        (stats.resets.load(Ordering::Relaxed) > resets_before).then_some(())
    })
    .await;
    let resynced = killed.elapsed();

    // Changes still reach the balancer, live.
    let registered = Instant::now();
    register(&service, "web-3", backends[2].port()).await;
    eventually("the new instance takes traffic", LIVE_LIMIT, || async {
        (bodies(&client, proxy, 3).await == ["one", "three", "two"]).then_some(())
    })
    .await;
    eprintln!(
        "killed the balancer's node {doomed_name} ({victim:?}; meta leader {meta_leader}, \
         stream leader {stream_leader}): catalog re-synced from the stream after {resynced:?}, \
         {} requests served meanwhile, none failed; a change made afterwards was routed \
         after {:?}",
        served.get(),
        registered.elapsed()
    );
    // Discovery, on a surviving node, kept the catalog.
    assert_eq!(discovery.get().catalog().await[0].instances.len(), 3);

    let _ = stop.send(());
    balancer
        .await
        .expect("the balancer task ran")
        .expect("the balancer stopped cleanly");
    discovery.stop().await;
}

#[tokio::test]
async fn losing_a_follower_node_costs_the_balancer_only_a_resync() {
    kill_the_balancers_node(Victim::Follower).await;
}

#[tokio::test]
async fn losing_the_jetstream_meta_leader_delays_only_the_stream_resync() {
    kill_the_balancers_node(Victim::MetaLeader).await;
}

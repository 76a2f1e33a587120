//! A three-node NATS cluster (nats/cluster/): losing the node a balancer is
//! connected to costs it nothing but a re-sync from another node, and
//! discovery, on a surviving node, keeps the catalog.

#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use nats_extra::Cluster;
use rollcall::catalog::Update;
use rollcall::catalog_stream;
use rollcall::connect::NatsOptions;
use rollcall::protocol::Subjects;

/// A JetStream meta leader election takes several seconds (nats-server
/// draws its election timeout from 4-9 s), and a catalog read that hit the
/// leaderless moment waits out its request timeout before the next try.
const LIMIT: Duration = Duration::from_secs(30);

fn register_json(id: &str, port: u16) -> String {
    format!(r#"{{"service":"web","id":"{id}","address":"127.0.0.1","port":{port},"ttl_ms":60000}}"#)
}

async fn next_update(updates: &mut (impl futures::Stream<Item = Update> + Unpin)) -> Update {
    tokio::time::timeout(LIMIT, updates.next())
        .await
        .expect("an update in time")
        .expect("updates open")
}

async fn register(service: &async_nats::Client, id: &str, port: u16) {
    service
        .publish(
            format!("rollcall.register.web.{id}"),
            register_json(id, port).into(),
        )
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

/// Runs the scenario; returns (reconnected after, catalog re-synced after).
async fn kill_the_balancers_node(victim: Victim) -> (Duration, Duration) {
    let mut cluster = Cluster::start();
    let subjects = Subjects::default();

    // In a cluster the catalog stream must be replicated, or it dies with
    // the one node that holds it: created here with 3 replicas before
    // discovery starts (discovery keeps a stream that exists).
    let admin = support::client(&cluster.nodes[0].url()).await;
    let mut stream = async_nats::jetstream::new(admin)
        .create_stream(async_nats::jetstream::stream::Config {
            num_replicas: 3,
            ..catalog_stream::stream_config(&subjects)
        })
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
    register(&service, "web-1", 5001).await;
    register(&service, "web-2", 5002).await;

    let balancer = NatsOptions::new(cluster.nodes[doomed].url())
        .connect("test-balancer")
        .await
        .expect("connect to the doomed node");
    let mut events = balancer.events();
    let mut updates = Box::pin(rollcall::subscription::follow(&balancer, subjects.clone()));
    // The first reset may come before both registers were folded.
    let mut held = 0;
    while held < 2 {
        held = match next_update(&mut updates).await {
            Update::Reset(snapshots) => snapshots.iter().map(|s| s.instances.len()).sum(),
            Update::Service(snapshot) => snapshot.instances.len(),
        };
    }

    let killed = Instant::now();
    cluster.nodes[doomed].stop();
    let reconnected = tokio::time::timeout(LIMIT, async {
        loop {
            if let Ok(async_nats::Event::Connected) = events.recv().await {
                return killed.elapsed();
            }
        }
    })
    .await
    .expect("the balancer reconnected to another node");
    let resynced = loop {
        if let Update::Reset(snapshots) = next_update(&mut updates).await {
            assert_eq!(snapshots.len(), 1);
            let ids: Vec<&str> = snapshots[0]
                .instances
                .iter()
                .map(|i| i.id.as_str())
                .collect();
            assert_eq!(ids, ["web-1", "web-2"], "the whole catalog came back");
            break killed.elapsed();
        }
    };
    eprintln!(
        "killed the balancer's node {doomed_name} ({victim:?}; meta leader {meta_leader}, \
         stream leader {stream_leader}): reconnected after {reconnected:?}, \
         catalog re-synced from the stream after {resynced:?}"
    );

    // Changes still flow live, and discovery (on a surviving node) kept the
    // catalog.
    register(&service, "web-3", 5003).await;
    let Update::Service(snapshot) = next_update(&mut updates).await else {
        panic!("a live snapshot after the re-sync")
    };
    assert_eq!(snapshot.instances.len(), 3);
    assert_eq!(discovery.get().catalog()[0].instances.len(), 3);
    discovery.stop().await;
    (reconnected, resynced)
}

#[tokio::test]
async fn losing_a_follower_node_costs_the_balancer_a_quick_resync() {
    kill_the_balancers_node(Victim::Follower).await;
}

#[tokio::test]
async fn losing_the_jetstream_meta_leader_delays_only_the_stream_resync() {
    let (reconnected, resynced) = kill_the_balancers_node(Victim::MetaLeader).await;
    assert!(reconnected < resynced, "core NATS is back before JetStream");
}

//! A three-node NATS cluster (nats/cluster/): losing the node a balancer is
//! connected to costs it nothing but a re-sync from another node, and
//! discovery, on a surviving node, keeps the catalog.

#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nats_extra::{get, http_backend, Cluster};
use rollcall::balancer::{self, routes::Routes, BalancerConfig};
use rollcall::catalog_stream;
use rollcall::connect::NatsOptions;
use rollcall::protocol::Subjects;
use rollcall::subscription::{self, Stats as SubscriptionStats};

/// A JetStream meta leader election takes several seconds (nats-server
/// draws its election timeout from 4-9 s), and a catalog read that hit the
/// leaderless moment waits out its request timeout before the next try.
const LIMIT: Duration = Duration::from_secs(30);

fn register_json(id: &str, port: u16) -> String {
    format!(r#"{{"service":"web","id":"{id}","address":"127.0.0.1","port":{port},"ttl_ms":60000}}"#)
}

/// Polls until `condition` holds, or panics naming `what`.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut condition: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The bodies of `n` requests through the balancer; every one must be a 200.
async fn bodies(port: u16, n: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    for _ in 0..n {
        let (status, body) = get(port, "/").await.expect("the balancer answers");
        assert_eq!(status, 200, "{body}");
        bodies.push(body);
    }
    bodies.sort();
    bodies
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
    let (port_1, backend_1) = http_backend("one").await;
    let (port_2, backend_2) = http_backend("two").await;
    let (port_3, backend_3) = http_backend("three").await;
    register(&service, "web-1", port_1).await;
    register(&service, "web-2", port_2).await;

    // The balancer, following the catalog through the doomed node.
    let connection = NatsOptions::new(cluster.nodes[doomed].url())
        .connect("test-balancer")
        .await
        .expect("connect to the doomed node");
    let mut link = connection.link();
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
    eventually("the balancer routes to both instances", || async {
        get(proxy, "/")
            .await
            .is_some_and(|(status, _)| status == 200)
            && bodies(proxy, 2).await == ["one", "two"]
    })
    .await;

    let resets_before = stats.resets.load(Ordering::Relaxed);
    let killed = Instant::now();
    cluster.nodes[doomed].stop();
    let reconnected = tokio::time::timeout(LIMIT, async {
        let _ = link.wait_for(|link| link.generation > 1).await;
        killed.elapsed()
    })
    .await
    .expect("the balancer reconnected to another node");
    // Serving all along: every request until the re-sync reaches a live
    // instance.
    let mut served = 0;
    while stats.resets.load(Ordering::Relaxed) == resets_before {
        assert!(
            killed.elapsed() < LIMIT,
            "no catalog re-sync within {LIMIT:?}"
        );
        assert_eq!(bodies(proxy, 2).await, ["one", "two"]);
        served += 2;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resynced = killed.elapsed();
    eprintln!(
        "killed the balancer's node {doomed_name} ({victim:?}; meta leader {meta_leader}, \
         stream leader {stream_leader}): reconnected after {reconnected:?}, \
         catalog re-synced from the stream after {resynced:?}; \
         {served} requests served meanwhile, none failed"
    );

    // Changes still reach the balancer, and discovery (on a surviving node)
    // kept the catalog.
    register(&service, "web-3", port_3).await;
    eventually("the new instance takes traffic", || async {
        bodies(proxy, 3).await == ["one", "three", "two"]
    })
    .await;
    assert_eq!(discovery.get().catalog()[0].instances.len(), 3);

    let _ = stop.send(());
    balancer
        .await
        .expect("the balancer task ran")
        .expect("the balancer stopped cleanly");
    discovery.stop().await;
    for backend in [backend_1, backend_2, backend_3] {
        backend.abort();
    }
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

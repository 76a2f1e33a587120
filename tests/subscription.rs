//! The balancer's view of the catalog through a real nats-server: a Reset
//! from the stream first, live snapshots after, stale revisions dropped, and
//! a re-sync after the server comes back.

mod support;

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use rollcall::connect::NatsOptions;
use rollcall::protocol::{Instance, Snapshot, Subjects};
use rollcall::subscription::Update;
use support::{client, next_snapshot, CatalogFeed, NatsServer, RunningDiscovery};

const LIMIT: Duration = Duration::from_secs(5);

type Updates = Pin<Box<dyn Stream<Item = Update> + Send>>;

async fn follow(url: &str) -> Updates {
    let connection = NatsOptions::new(url)
        .connect("test-balancer")
        .await
        .expect("connect");
    Box::pin(rollcall::subscription::follow(
        &connection,
        Subjects::default(),
    ))
}

async fn next(updates: &mut Updates) -> Update {
    tokio::time::timeout(LIMIT, updates.next())
        .await
        .expect("an update within the limit")
        .expect("the stream goes on")
}

async fn register(client: &async_nats::Client, id: &str, port: u16) {
    let instance = Instance::new("web", id, "127.0.0.1", port);
    client
        .publish(
            format!("rollcall.register.web.{id}"),
            serde_json::to_vec(&instance).unwrap().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
}

fn ids(snapshot: &Snapshot) -> Vec<&str> {
    snapshot.instances.iter().map(|i| i.id.as_str()).collect()
}

#[tokio::test]
async fn a_late_balancer_starts_from_the_stream_then_follows_live() {
    let server = NatsServer::start();
    let discovery = RunningDiscovery::start(&server.url()).await;
    let service = client(&server.url()).await;
    let mut published = CatalogFeed::subscribe(&service, "rollcall.catalog.web.*").await;
    register(&service, "a", 1).await;
    let first = next_snapshot(&mut published, LIMIT).await;
    register(&service, "b", 2).await;
    let second = next_snapshot(&mut published, LIMIT).await;
    assert!(second.revision > first.revision);

    let mut updates = follow(&server.url()).await;
    let Update::Reset(all) = next(&mut updates).await else {
        panic!("the first update is a Reset");
    };
    assert_eq!(all.len(), 1);
    assert_eq!(ids(&all[0]), ["a", "b"]);
    assert_eq!(all[0].revision, second.revision);

    register(&service, "c", 3).await;
    let Update::Service(live) = next(&mut updates).await else {
        panic!("then live snapshots");
    };
    assert_eq!(ids(&live), ["a", "b", "c"]);
    assert!(live.revision > second.revision);
    discovery.stop().await;
}

#[tokio::test]
async fn records_that_are_not_newer_are_dropped() {
    let server = NatsServer::start();
    let js = async_nats::jetstream::new(client(&server.url()).await);
    rollcall::catalog_stream::ensure(&js, &Subjects::default(), 1)
        .await
        .unwrap();
    let connection = NatsOptions::new(server.url())
        .connect("test-balancer")
        .await
        .expect("connect");
    let stats = std::sync::Arc::new(rollcall::subscription::Stats::default());
    let mut updates: Updates = Box::pin(rollcall::subscription::follow_with_stats(
        &connection,
        Subjects::default(),
        std::sync::Arc::clone(&stats),
    ));
    assert_eq!(next(&mut updates).await, Update::Reset(Vec::new()));

    let publisher = client(&server.url()).await;
    let record = |revision: u64, port: u16| {
        format!(
            r#"{{"service":"web","id":"a","revision":{revision},"instance":{}}}"#,
            serde_json::to_string(&Instance::new("web", "a", "127.0.0.1", port)).unwrap()
        )
    };
    let snapshot = |revision: u64, port: u16| Snapshot {
        service: "web".into(),
        revision,
        instances: vec![Instance::new("web", "a", "127.0.0.1", port)],
    };
    for (revision, port) in [(5, 1), (5, 2), (4, 3), (6, 4)] {
        publisher
            .publish("rollcall.catalog.web.a", record(revision, port).into())
            .await
            .unwrap();
    }
    publisher
        .publish("rollcall.catalog.web.a", "{broken".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    // Records already waiting are taken in together: the last update holds
    // the newest, whatever came in between.
    let mut last = next(&mut updates).await;
    while last != Update::Service(snapshot(6, 4)) {
        assert_eq!(
            last,
            Update::Service(snapshot(5, 1)),
            "only newer revisions"
        );
        last = next(&mut updates).await;
    }
    // The one stale filter counts what it dropped, for a balancer's metrics.
    rollcall_eventually_counts(&stats).await;
}

/// Waits until the stale and invalid records are counted.
async fn rollcall_eventually_counts(stats: &rollcall::subscription::Stats) {
    use std::sync::atomic::Ordering::Relaxed;
    support::eventually("the stale and invalid records counted", LIMIT, || async {
        (stats.stale.load(Relaxed) == 2 && stats.invalid.load(Relaxed) == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn after_a_nats_restart_the_balancer_resyncs_within_two_seconds() {
    let mut server = NatsServer::start();
    let discovery = RunningDiscovery::start(&server.url()).await;
    let service = client(&server.url()).await;
    let mut updates = follow(&server.url()).await;
    assert_eq!(next(&mut updates).await, Update::Reset(Vec::new()));
    register(&service, "a", 1).await;
    assert!(matches!(next(&mut updates).await, Update::Service(_)));

    server.stop();
    // While NATS is away, the balancer is told nothing: it keeps what it has.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), updates.next())
            .await
            .is_err(),
        "no update may arrive while NATS is down"
    );
    server.restart();
    let back = Instant::now();
    let Update::Reset(all) = next(&mut updates).await else {
        panic!("a reconnect brings a Reset");
    };
    let resync = back.elapsed();
    assert_eq!(ids(&all[0]), ["a"]);
    assert!(resync < Duration::from_secs(2), "re-sync took {resync:?}");
    eprintln!("re-sync after the server came back: {resync:?}");
    discovery.stop().await;
}

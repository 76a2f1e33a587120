//! Catalog version 3 at scale, through a real nats-server: a service far
//! over the old one-snapshot-per-service limit (1 MB) reaches a balancer
//! and takes traffic, one change costs one small record, and a balancer
//! that starts late reads exactly the live set from the stream.

mod support;

use std::time::Duration;

use futures::StreamExt;
use http::StatusCode;
use rollcall::connect::NatsOptions;
use rollcall::protocol::{Instance, Presence, Subjects};
use support::balancer::TestBalancer;
use support::http::HttpBackend;
use support::{client, eventually, NatsServer, RunningDiscovery};

/// Over the 1 MB a whole-service snapshot could hold (about 9,000).
const INSTANCES: usize = 20_000;
const LIMIT: Duration = Duration::from_secs(60);

/// Instance `n` of `web`, on one of the real backends (they share ports).
fn instance(n: usize, backends: &[HttpBackend]) -> Instance {
    let backend = &backends[n % backends.len()];
    let mut instance = Instance::new("web", format!("web-{n:05}"), "127.0.0.1", backend.port());
    // Long enough that the test needs no heartbeats.
    instance.ttl_ms = 600_000;
    instance
}

async fn register(nats: &async_nats::Client, instances: impl Iterator<Item = Instance>) {
    for instance in instances {
        let subject = format!("rollcall.register.web.{}", instance.id);
        let payload = serde_json::to_vec(&instance).expect("serializes");
        nats.publish(subject, payload.into())
            .await
            .expect("publish");
    }
    nats.flush().await.expect("flush");
}

async fn deregister(nats: &async_nats::Client, id: &str) {
    let subject = format!("rollcall.deregister.web.{id}");
    nats.publish(subject, "{}".into()).await.expect("publish");
    nats.flush().await.expect("flush");
}

/// A balancer routing `web`, fed by the catalog subscription.
async fn balancer(url: &str) -> TestBalancer {
    let lb = TestBalancer::start(&["web"]).await;
    let connection = NatsOptions::new(url)
        .connect("scale-balancer")
        .await
        .expect("connect");
    let mut updates = Box::pin(rollcall::subscription::follow(
        &connection,
        Subjects::default(),
    ));
    let feed = lb.updates.clone();
    tokio::spawn(async move {
        let _connection = connection;
        while let Some(update) = updates.next().await {
            if feed.send(update).is_err() {
                return;
            }
        }
    });
    lb
}

/// A request through the balancer's proxy port.
async fn proxy_get(lb: &TestBalancer) -> (StatusCode, String) {
    support::http::must_get(&lb.client, &format!("http://{}/", lb.addr)).await
}

/// The ids `/catalog` lists for `web`, once it lists `count`.
async fn listed(lb: &TestBalancer, count: usize) -> Vec<String> {
    eventually(&format!("/catalog to list {count}"), LIMIT, || async {
        let (status, body) = lb.admin("/catalog").await;
        assert_eq!(status, StatusCode::OK);
        let catalog: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let instances = catalog["services"][0]["instances"].as_array()?.clone();
        (instances.len() == count).then(|| {
            instances
                .iter()
                .map(|i| i["id"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_over_the_old_limit_takes_traffic_and_one_change_is_one_small_record() {
    let server = NatsServer::start();
    let discovery = RunningDiscovery::start(&server.url()).await;
    let nats = client(&server.url()).await;
    let mut backends = Vec::new();
    for name in ["b-0", "b-1", "b-2", "b-3"] {
        backends.push(HttpBackend::start(name).await);
    }
    let lb = balancer(&server.url()).await;

    register(&nats, (0..INSTANCES).map(|n| instance(n, &backends))).await;
    let ids = listed(&lb, INSTANCES).await;
    assert_eq!(ids.first().map(String::as_str), Some("web-00000"));
    for _ in 0..8 {
        let (status, body) = proxy_get(&lb).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let served: usize = backends.iter().map(HttpBackend::served).sum();
    assert_eq!(served, 8, "every request reached an instance");

    // One deregistration: exactly one record stored and one republished,
    // as small as it would be in a service of one.
    let watcher = client(&server.url()).await;
    let mut catalog = watcher.subscribe("rollcall.catalog.>").await.unwrap();
    let mut stored = watcher.subscribe("rollcall.catalog-store.>").await.unwrap();
    watcher.flush().await.unwrap();
    deregister(&nats, "web-00007").await;
    let record = tokio::time::timeout(LIMIT, catalog.next())
        .await
        .expect("a record within the limit")
        .expect("subscription open");
    assert_eq!(record.subject.as_str(), "rollcall.catalog.web.web-00007");
    let parsed = Subjects::default()
        .parse_record(&record.subject, &record.payload)
        .expect("a valid record");
    assert!(matches!(parsed.presence, Presence::Left(_)), "{parsed:?}");
    assert!(
        record.payload.len() < 128,
        "{} bytes for one instance",
        record.payload.len()
    );
    let write = tokio::time::timeout(LIMIT, stored.next())
        .await
        .expect("the write within the limit")
        .expect("subscription open");
    assert_eq!(write.payload, record.payload, "stored as republished");
    listed(&lb, INSTANCES - 1).await;
    // Nothing else was written for that change.
    let more = tokio::time::timeout(Duration::from_millis(300), catalog.next()).await;
    assert!(more.is_err(), "a second record: {more:?}");
    let more = tokio::time::timeout(Duration::from_millis(10), stored.next()).await;
    assert!(more.is_err(), "a second write: {more:?}");

    lb.stop().await;
    discovery.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_balancer_reads_exactly_the_live_set_after_churn() {
    let server = NatsServer::start();
    let discovery = RunningDiscovery::start(&server.url()).await;
    let nats = client(&server.url()).await;
    let backends = vec![
        HttpBackend::start("b-0").await,
        HttpBackend::start("b-1").await,
    ];
    let early = balancer(&server.url()).await;

    register(&nats, (0..300).map(|n| instance(n, &backends))).await;
    listed(&early, 300).await;
    // Churn: a third leave, some come back on another port, a few join.
    for n in (0..300).step_by(3) {
        deregister(&nats, &format!("web-{n:05}")).await;
    }
    let mut moved = Vec::new();
    for n in (0..300).step_by(9) {
        let mut back = instance(n, &backends);
        back.port = backends[(n + 1) % backends.len()].port();
        moved.push(back);
    }
    register(&nats, moved.clone().into_iter()).await;
    register(&nats, (300..320).map(|n| instance(n, &backends))).await;
    let live = 300 - 100 + moved.len() + 20;
    let seen_early = listed(&early, live).await;

    let late = balancer(&server.url()).await;
    let seen_late = listed(&late, live).await;
    assert_eq!(
        seen_late, seen_early,
        "the stream holds exactly the live set"
    );
    let (_, body) = late.admin("/catalog").await;
    let catalog: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let web_9 = (catalog["services"][0]["instances"].as_array())
        .and_then(|all| all.iter().find(|i| i["id"] == "web-00009").cloned())
        .expect("web-00009 came back");
    assert!(
        web_9.to_string().contains(&moved[1].port.to_string()),
        "on its new port: {web_9}"
    );
    let (status, _) = proxy_get(&late).await;
    assert_eq!(status, StatusCode::OK);

    early.stop().await;
    late.stop().await;
    discovery.stop().await;
}

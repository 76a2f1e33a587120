//! Discovery through a real nats-server: what a client no one here wrote
//! sees on the wire and in the catalog stream.

mod support;

use std::time::{Duration, Instant};

use rollcall::catalog_stream;
use rollcall::protocol::Subjects;
use support::{client, eventually, next_snapshot, CatalogFeed, NatsServer, RunningDiscovery};

const LIMIT: Duration = Duration::from_secs(5);

fn register_json(id: &str, port: u16, ttl_ms: u64) -> String {
    format!(
        r#"{{"service":"web","id":"{id}","address":"127.0.0.1","port":{port},"ttl_ms":{ttl_ms},"weight":1,"tags":["v2"],"meta":{{"zone":"a"}}}}"#
    )
}

async fn publish(client: &async_nats::Client, subject: &str, payload: String) {
    client
        .publish(subject.to_owned(), payload.into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
}

async fn register(client: &async_nats::Client, id: &str, port: u16, ttl_ms: u64) {
    let subject = format!("rollcall.register.web.{id}");
    publish(client, &subject, register_json(id, port, ttl_ms)).await;
}

async fn stored(client: &async_nats::Client) -> Vec<rollcall::protocol::Snapshot> {
    let js = async_nats::jetstream::new(client.clone());
    catalog_stream::read_last(&js, &Subjects::default())
        .await
        .expect("the catalog stream is readable")
        .snapshots
        .into_iter()
        .map(|s| s.snapshot)
        .collect()
}

/// A server, discovery on it, and a client subscribed to `catalog_subject`.
async fn setup(
    catalog_subject: &str,
) -> (
    NatsServer,
    RunningDiscovery,
    async_nats::Client,
    CatalogFeed,
) {
    let server = NatsServer::start();
    let discovery = RunningDiscovery::start(&server.url()).await;
    let service = client(&server.url()).await;
    let catalog = CatalogFeed::subscribe(&service, catalog_subject).await;
    (server, discovery, service, catalog)
}

#[tokio::test]
async fn register_reaches_the_catalog_subject_and_the_stream() {
    let (_server, discovery, service, mut catalog) = setup("rollcall.catalog.>").await;

    let sent = Instant::now();
    publish(
        &service,
        "rollcall.register.web.web-1",
        register_json("web-1", 5001, 3000),
    )
    .await;
    let snapshot = next_snapshot(&mut catalog, LIMIT).await;
    let latency = sent.elapsed();
    assert_eq!(snapshot.service, "web");
    assert!(snapshot.revision > 0);
    assert_eq!(snapshot.instances.len(), 1);
    assert_eq!(snapshot.instances[0].port, 5001);
    assert_eq!(snapshot.instances[0].meta["zone"], "a");
    eprintln!("register -> snapshot: {latency:?}");

    assert_eq!(stored(&service).await, [snapshot]);
    discovery.stop().await;
}

#[tokio::test]
async fn heartbeats_publish_nothing_and_deregister_removes() {
    let (_server, discovery, service, mut catalog) = setup("rollcall.catalog.>").await;

    register(&service, "a", 1, 3000).await;
    let joined = next_snapshot(&mut catalog, LIMIT).await;
    assert_eq!(joined.instances.len(), 1);
    for _ in 0..20 {
        publish(
            &service,
            "rollcall.heartbeat.web.a",
            register_json("a", 1, 3000),
        )
        .await;
    }
    publish(&service, "rollcall.deregister.web.a", "{}".into()).await;
    let gone = next_snapshot(&mut catalog, LIMIT).await;
    assert!(
        gone.instances.is_empty(),
        "no snapshot came between register and deregister"
    );
    assert!(gone.revision > joined.revision);
    discovery.stop().await;
}

#[tokio::test]
async fn silent_instances_expire_after_their_ttl() {
    let (_server, discovery, service, mut catalog) = setup("rollcall.catalog.web.*").await;

    // Discovery hears the register after it is sent, so its deadline is
    // no earlier than 300 ms after this instant (the join snapshot may
    // reach this test late on a loaded machine: it is no reference).
    let sent = Instant::now();
    register(&service, "a", 1, 300).await;
    let joined = next_snapshot(&mut catalog, LIMIT).await;
    assert_eq!(joined.instances.len(), 1);
    let expired = next_snapshot(&mut catalog, LIMIT).await;
    let after = sent.elapsed();
    assert!(expired.instances.is_empty());
    assert!(
        after >= Duration::from_millis(300),
        "expired early: {after:?}"
    );
    eprintln!("ttl 300ms -> expired after {after:?}");
    discovery.stop().await;
}

#[tokio::test]
async fn invalid_events_change_nothing_and_discovery_keeps_running() {
    let (_server, discovery, service, mut catalog) = setup("rollcall.catalog.>").await;
    register(&service, "a", 1, 3000).await;
    let before = next_snapshot(&mut catalog, LIMIT).await;

    let bad: [(&str, String); 8] = [
        ("rollcall.hello.web.b", register_json("b", 1, 3000)),
        ("rollcall.register.web.b", "{oops".into()),
        (
            "rollcall.register.web.b",
            r#"{"service":"web","id":"b"}"#.into(),
        ),
        (
            "rollcall.register.web.b",
            register_json("b", 1, 3000).replace("\"port\":1", "\"port\":\"1\""),
        ),
        ("rollcall.register.web.b", register_json("b", 1, 99)),
        ("rollcall.register.web.c", register_json("b", 1, 3000)),
        (
            "rollcall.heartbeat.web.a",
            register_json("a", 1, 3000).replace("\"weight\":1", "\"weight\":10001"),
        ),
        ("rollcall.deregister.web.a", "nope".into()),
    ];
    for (subject, payload) in &bad {
        publish(&service, subject, payload.clone()).await;
    }
    register(&service, "z", 2, 3000).await;
    let after = next_snapshot(&mut catalog, LIMIT).await;
    let ids: Vec<_> = after.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a", "z"]);
    assert!(after.revision > before.revision);
    assert_eq!(after.instances[0], before.instances[0], "a is untouched");
    let stats = discovery.get().stats();
    assert_eq!(
        stats.invalid.load(std::sync::atomic::Ordering::Relaxed),
        bad.len() as u64
    );
    discovery.stop().await;
}

#[tokio::test]
async fn a_restarted_discovery_adopts_the_catalog_and_publishes_no_shrunken_set() {
    let (server, first, service, mut catalog) = setup("rollcall.catalog.>").await;
    register(&service, "a", 1, 3000).await;
    next_snapshot(&mut catalog, LIMIT).await;
    register(&service, "b", 2, 3000).await;
    let last = next_snapshot(&mut catalog, LIMIT).await;
    first.stop().await;

    let second = RunningDiscovery::start(&server.url()).await;
    assert_eq!(second.get().catalog().await, std::slice::from_ref(&last));
    // The next thing on the wire is the next change, with the next revision:
    // nothing empty or shrunken was published at start.
    register(&service, "c", 3, 3000).await;
    let next = next_snapshot(&mut catalog, LIMIT).await;
    assert!(next.revision > last.revision);
    assert_eq!(next.instances.len(), 3);
    second.stop().await;
}

#[tokio::test]
async fn the_catalog_converges_after_a_nats_server_restart() {
    let mut server = NatsServer::start();
    let discovery = RunningDiscovery::start(&server.url()).await;
    let service = client(&server.url()).await;
    register(&service, "a", 1, 3000).await;
    let watcher = client(&server.url()).await;
    let js = async_nats::jetstream::new(watcher.clone());
    eventually("a stored in the catalog stream", LIMIT, || async {
        catalog_stream::read_last(&js, &Subjects::default())
            .await
            .is_ok_and(|l| l.snapshots.len() == 1)
            .then_some(())
    })
    .await;

    server.restart();
    // Every client reconnects by itself; b registers once its own client is back.
    let mut catalog = CatalogFeed::subscribe(&watcher, "rollcall.catalog.web.*").await;
    catalog.seed(&watcher).await;
    let catalog = std::sync::Arc::new(tokio::sync::Mutex::new(catalog));
    let b = register_json("b", 2, 3000);
    let snapshot = eventually("b to join after the restart", LIMIT, || {
        let (service, b, catalog) = (service.clone(), b.clone(), catalog.clone());
        async move {
            publish(&service, "rollcall.register.web.b", b).await;
            let mut catalog = catalog.lock().await;
            let message = catalog.message(Duration::from_millis(200)).await?;
            catalog
                .take(&message)
                .filter(|s| s.instances.iter().any(|i| i.id == "b"))
        }
    })
    .await;
    let ids: Vec<_> = snapshot.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "a survived the outage, b joined after it");
    assert_eq!(stored(&watcher).await, [snapshot]);
    discovery.stop().await;
}

#[tokio::test]
async fn a_version_1_stream_is_reshaped_in_place_and_keeps_its_catalog() {
    let server = NatsServer::start();
    let service = client(&server.url()).await;
    let js = async_nats::jetstream::new(service.clone());
    // The catalog stream as version 1 made it: snapshots stored as published.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ROLLCALL_CATALOG".into(),
        subjects: vec!["rollcall.catalog.>".into()],
        max_messages_per_subject: 1,
        ..Default::default()
    })
    .await
    .expect("create a version 1 stream");
    let kept = format!(
        r#"{{"service":"web","revision":41,"instances":[{}]}}"#,
        register_json("a", 1, 3000)
    );
    js.publish("rollcall.catalog.web", kept.into())
        .await
        .expect("store")
        .await
        .expect("stored");
    let mut catalog = CatalogFeed::subscribe(&service, "rollcall.catalog.web.*").await;

    let discovery = RunningDiscovery::start(&server.url()).await;
    let written = next_snapshot(&mut catalog, LIMIT).await;
    assert!(written.revision > 41);
    assert_eq!(written.instances.len(), 1, "the kept instance is not lost");
    assert_eq!(stored(&service).await, [written]);
    discovery.stop().await;
}

#[tokio::test]
async fn a_version_2_stream_is_reshaped_in_place_and_its_snapshots_become_records() {
    let server = NatsServer::start();
    let service = client(&server.url()).await;
    let js = async_nats::jetstream::new(service.clone());
    // The catalog stream as version 2 made it: one snapshot per service on
    // the store subject, republished, without message TTLs.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ROLLCALL_CATALOG".into(),
        subjects: vec![
            "rollcall.catalog-store.>".into(),
            "rollcall.catalog-fence".into(),
        ],
        republish: Some(async_nats::jetstream::stream::Republish {
            source: "rollcall.catalog-store.>".into(),
            destination: "rollcall.catalog.>".into(),
            headers_only: false,
        }),
        max_messages_per_subject: 1,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("create a version 2 stream");
    let kept = format!(
        r#"{{"service":"web","revision":41,"instances":[{},{}]}}"#,
        register_json("a", 1, 3000),
        register_json("b", 2, 3000)
    );
    js.publish("rollcall.catalog-store.web", kept.into())
        .await
        .expect("store")
        .await
        .expect("stored");
    let mut catalog = CatalogFeed::subscribe(&service, "rollcall.catalog.web.*").await;

    let discovery = RunningDiscovery::start(&server.url()).await;
    next_snapshot(&mut catalog, LIMIT).await;
    let written = next_snapshot(&mut catalog, LIMIT).await;
    assert!(written.revision > 41);
    let ids: Vec<_> = written.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "no kept instance is lost");
    assert_eq!(stored(&service).await, [written]);
    let stream = js.get_stream("ROLLCALL_CATALOG").await.expect("the stream");
    assert!(
        stream
            .direct_get_last_for_subject("rollcall.catalog-store.web")
            .await
            .is_err(),
        "the old snapshot is purged"
    );
    assert!(stream.cached_info().config.allow_message_ttl);
    discovery.stop().await;
}

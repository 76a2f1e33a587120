//! Partitioned discovery (README "Shards"): the three-node cluster of
//! nats/cluster/sharded/ maps the version 1 event subjects into 16
//! partitions by service; shard A owns 0-7, shard B 8-15, and a standby of A
//! owns 0-7 too. Services in both halves heartbeat on the plain subjects, a
//! balancer follows the one shared catalog and a client requests every
//! service throughout. Killing A hands its partitions, and only those, to
//! the standby, with no failed request.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/ha.rs"]
mod ha;
#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::{Balancer, BalancerConfig};
use rollcall::connect::NatsOptions;
use rollcall::partition::partition_of;
use rollcall::protocol::{Instance, Leadership, Snapshot, Subjects};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use cli::{rollcall, Process};
use ha::{client_preferring, rotated};
use nats_extra::{Cluster, ConfiguredServer};
use support::crate_root;
use support::eventually;
use support::http::{client, get, HttpBackend};

/// A stream-leader election on a cluster can take several seconds.
const LIMIT: Duration = Duration::from_secs(30);
const TTL_MS: u64 = 1500;
/// The mapping's N in nats/cluster/partitions.conf.
const N: u32 = 16;
/// Services in shard A's partitions (0-7) and in shard B's (8-15).
const IN_A: [&str; 2] = ["web", "api"];
const IN_B: [&str; 2] = ["billing", "search"];

/// Every stored snapshot and every partition's leader heartbeat seen.
#[derive(Default)]
struct Seen {
    snapshots: Vec<Snapshot>,
    leaders: Vec<(u32, Leadership)>,
}

impl Seen {
    /// Per partition, every (replica, epoch) that said it leads.
    fn leaderships(&self) -> BTreeMap<u32, BTreeSet<(String, u64)>> {
        let mut by_partition: BTreeMap<u32, BTreeSet<(String, u64)>> = BTreeMap::new();
        for (partition, beat) in &self.leaders {
            by_partition
                .entry(*partition)
                .or_default()
                .insert((beat.replica.clone(), beat.epoch));
        }
        by_partition
    }
}

async fn record(nats: &async_nats::Client, seen: Arc<Mutex<Seen>>) {
    let subjects = Subjects::default();
    let mut catalog = support::CatalogFeed::subscribe(nats, &subjects.catalog_wildcard()).await;
    let mut leaders = nats.subscribe(subjects.partition_leaders()).await.unwrap();
    nats.flush().await.unwrap();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(snapshot) = catalog.next_taken() => seen.lock().unwrap().snapshots.push(snapshot),
                Some(m) = leaders.next() => {
                    let partition = m.subject.rsplit('.').next().and_then(|p| p.parse().ok()).expect("a partition's heartbeat");
                    let beat: Leadership = serde_json::from_slice(&m.payload).expect("valid heartbeat");
                    seen.lock().unwrap().leaders.push((partition, beat));
                }
                else => return,
            }
        }
    });
}

/// `rollcall discovery --partitions PARTITIONS` named `name`, preferring
/// the node at `first` of `urls`.
fn shard(urls: &[String], first: usize, name: &str, partitions: &str) -> Process {
    shard_with(urls, first, name, partitions, &[])
}

/// [`shard`] with more arguments.
fn shard_with(
    urls: &[String],
    first: usize,
    name: &str,
    partitions: &str,
    more: &[&str],
) -> Process {
    let urls = rotated(urls, first);
    let mut args = vec![
        "discovery",
        "--nats",
        &urls,
        "--replica",
        name,
        "--partitions",
        partitions,
    ];
    args.extend(more);
    Process::spawn(rollcall(&args))
}

/// A client of the cluster preferring the node at `first` of `urls`.
async fn connect(urls: &[String], first: usize) -> async_nats::Client {
    client_preferring(&rotated(urls, first)).await
}

/// Heartbeats `instance` on its plain version 1 subject every 200 ms
/// until the sender is dropped.
fn heartbeat(nats: async_nats::Client, instance: Instance) -> oneshot::Sender<()> {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let subject = format!("rollcall.heartbeat.{}.{}", instance.service, instance.id);
    let payload: bytes::Bytes = serde_json::to_vec(&instance).unwrap().into();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = ticks.tick() => {
                    let _ = nats.publish(subject.clone(), payload.clone()).await;
                }
            }
        }
    });
    stop
}

/// A balancer routing `/<service>` to each service, following the catalog:
/// its URL and the sender that stops it.
async fn balancer(urls: &str, services: &[&str]) -> (String, oneshot::Sender<()>) {
    let connection = NatsOptions::new(urls)
        .connect("shards-balancer")
        .await
        .unwrap();
    let updates = rollcall::subscription::follow(&connection, Subjects::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let routes: Vec<String> = services.iter().map(|s| format!("/{s}={s}")).collect();
    let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
    let balancer = Balancer::new(BalancerConfig::new(Routes::parse(&routes).unwrap()));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(balancer.serve(listener, None, updates, async {
        let _ = stopped.await;
    }));
    (address, stop)
}

/// Revisions strictly increase per service, and from the first snapshot of
/// a service listing all its `alive` instances on, none lacks one.
fn check_snapshots(seen: &Seen, alive: &[Instance]) {
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut joined: BTreeSet<&str> = BTreeSet::new();
    for snapshot in &seen.snapshots {
        let service = snapshot.service.as_str();
        if let Some(held) = last.insert(service, snapshot.revision) {
            assert!(
                snapshot.revision > held,
                "revision went from {held} to {} on {service}",
                snapshot.revision
            );
        }
        let own: Vec<&Instance> = alive.iter().filter(|i| i.service == service).collect();
        let lists_all = own
            .iter()
            .all(|a| snapshot.instances.iter().any(|i| i.id == a.id));
        if joined.contains(service) {
            assert!(
                lists_all,
                "{service} revision {} lacks a live instance: {:?}",
                snapshot.revision, snapshot.instances
            );
        } else if lists_all {
            joined.insert(service);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_and_a_standby_share_the_catalog_and_the_standby_takes_over_one_shard() {
    for service in IN_A {
        assert!(partition_of(service, N) < 8, "{service} is not in 0-7");
    }
    for service in IN_B {
        assert!(partition_of(service, N) >= 8, "{service} is not in 8-15");
    }
    let cluster = Cluster::start_set("nats/cluster/sharded");
    let urls = cluster.url_list();
    let nats = connect(&urls, 0).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    record(&nats, Arc::clone(&seen)).await;

    let mut shard_a = Some(shard(&urls, 0, "a", "0-7/16"));
    let admin_b = format!("127.0.0.1:{}", support::free_port());
    let _shard_b = shard_with(&urls, 1, "b", "8-15/16", &["--admin", &admin_b]);
    // Every partition led, A's by A and B's by B, before the standby starts.
    let expected_leader = |p: u32| if p < 8 { "a" } else { "b" };
    eventually("a leader for each of the 16 partitions", LIMIT, || async {
        let leaderships = seen.lock().unwrap().leaderships();
        (leaderships.len() == 16).then_some(())
    })
    .await;
    let metrics = cli::http_get(&admin_b, "/metrics").1;
    for (partition, leaders) in seen.lock().unwrap().leaderships().range(8..) {
        let epoch = leaders.first().expect("a leader").1;
        for line in [
            format!("rollcall_discovery_partition_is_leader{{partition=\"{partition}\"}} 1"),
            format!("rollcall_discovery_partition_epoch{{partition=\"{partition}\"}} {epoch}"),
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "no {line} in\n{metrics}"
            );
        }
    }
    let standby = shard(&urls, 2, "a2", "0-7/16");
    standby.wait_stderr_times("following the catalog leader", 8, LIMIT);

    let mut alive = Vec::new();
    let mut stops = BTreeMap::new();
    let mut backends = Vec::new();
    for (k, service) in IN_A.iter().chain(&IN_B).enumerate() {
        for n in 1..=2 {
            let id = format!("{service}-{n}");
            let backend = HttpBackend::start(&id).await;
            let mut instance = Instance::new(*service, &id, "127.0.0.1", backend.port());
            instance.ttl_ms = TTL_MS;
            let through = connect(&urls, k + n).await;
            stops.insert(id, heartbeat(through, instance.clone()));
            alive.push(instance);
            backends.push(backend);
        }
    }
    let services: Vec<&str> = IN_A.iter().chain(&IN_B).copied().collect();
    let (balancer_url, _balancer) = balancer(&rotated(&urls, 0), &services).await;
    let http = client();
    for service in &services {
        let url = format!("{balancer_url}/{service}");
        eventually(
            &format!("{service} through the balancer"),
            LIMIT,
            || async {
                let (status, body) = get(&http, &url).await.ok()?;
                (status.is_success() && body.starts_with(service)).then_some(())
            },
        )
        .await;
    }
    let (failed, served) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let request_loop = {
        let (failed, served) = (Arc::clone(&failed), Arc::clone(&served));
        let urls: Vec<String> = services
            .iter()
            .map(|s| format!("{balancer_url}/{s}"))
            .collect();
        tokio::spawn(async move {
            let http = client();
            for url in urls.iter().cycle() {
                match get(&http, url).await {
                    Ok((status, _)) if status.is_success() => {
                        served.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let before = seen.lock().unwrap().leaderships();
    for (partition, leaders) in &before {
        let replicas: Vec<&str> = leaders.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(
            replicas,
            [expected_leader(*partition)],
            "partition {partition} has exactly one leader, its shard"
        );
    }

    shard_a.as_ref().unwrap().signal("KILL");
    let killed = tokio::time::Instant::now();
    eventually("the standby leads all of A's partitions", LIMIT, || async {
        let leaderships = seen.lock().unwrap().leaderships();
        (0..8)
            .all(|p| leaderships[&p].iter().any(|(r, _)| r == "a2"))
            .then_some(())
    })
    .await;
    eprintln!(
        "kill -9 shard A -> standby leads its 8 partitions: {:?}",
        killed.elapsed()
    );
    shard_a.take();

    // A partition of A's after the takeover: an instance leaves, and the
    // balancer stops sending to it.
    let leaving = "web-2";
    drop(stops.remove(leaving));
    alive.retain(|i| i.id != leaving);
    nats.publish(format!("rollcall.deregister.web.{leaving}"), "{}".into())
        .await
        .unwrap();
    eventually("the deregistration stored", LIMIT, || async {
        let seen = seen.lock().unwrap();
        let last = seen.snapshots.iter().rev().find(|s| s.service == "web")?;
        (!last.instances.iter().any(|i| i.id == leaving)).then_some(())
    })
    .await;
    let web = format!("{balancer_url}/web");
    eventually("the balancer sends web only to web-1", LIMIT, || async {
        for _ in 0..20 {
            let (_, body) = get(&http, &web).await.ok()?;
            if !body.starts_with("web-1") {
                return None;
            }
        }
        Some(())
    })
    .await;
    request_loop.abort();

    let seen = seen.lock().unwrap();
    let after = seen.leaderships();
    for partition in 0..8 {
        let replicas: Vec<(&str, u64)> = after[&partition]
            .iter()
            .map(|(r, e)| (r.as_str(), *e))
            .collect();
        let [("a", old), ("a2", new)] = replicas[..] else {
            panic!("partition {partition}: not one takeover by the standby: {replicas:?}");
        };
        assert!(new > old, "partition {partition}: epoch {old} -> {new}");
    }
    for partition in 8..16 {
        assert_eq!(
            after[&partition], before[&partition],
            "shard B's partition {partition} kept its leader and epoch"
        );
    }
    check_snapshots(&seen, &alive);
    let (code, _, said) = cli::run(rollcall(&["catalog", "--nats", &rotated(&urls, 0)]), LIMIT);
    assert_eq!(code, Some(0), "{said}");
    for (partition, leaders) in &after {
        let (replica, epoch) = leaders.last().expect("a leader");
        let line = format!("partition {partition}: leader {replica} epoch {epoch} ");
        assert!(said.contains(&line), "no {line:?} in\n{said}");
    }
    assert!(served.load(Ordering::Relaxed) > 0);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests");
    assert!(
        standby.stderr_text().contains("leading the catalog"),
        "the standby said it leads"
    );
}

#[tokio::test]
async fn the_server_puts_each_service_where_partition_of_says_and_keeps_reply_subjects() {
    let mapping = std::fs::read_to_string(crate_root().join("nats/cluster/partitions.conf"))
        .expect("read partitions.conf");
    let server = ConfiguredServer::from_text(&format!(
        "listen: 127.0.0.1:{{port}}\nhttp: 127.0.0.1:{{monitor}}\n{mapping}"
    ));
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut mapped = nats.subscribe("rollcall.partition.>").await.unwrap();
    nats.flush().await.unwrap();
    let services: Vec<String> = (0..200)
        .map(|k| format!("svc-{k}"))
        .chain(IN_A.iter().chain(&IN_B).map(|s| s.to_string()))
        .collect();
    let mut landed = BTreeSet::new();
    for service in &services {
        for kind in ["register", "heartbeat", "deregister"] {
            let sent = format!("rollcall.{kind}.{service}.i-1");
            nats.publish(sent.clone(), "{}".into()).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), mapped.next())
                .await
                .expect("the mapped event")
                .expect("subscribed");
            let expected = partition_of(service, N);
            assert_eq!(
                got.subject.as_str(),
                format!("rollcall.partition.{expected}.{kind}.{service}.i-1"),
                "{sent}"
            );
            landed.insert(expected);
        }
    }
    assert_eq!(
        landed.len(),
        N as usize,
        "200 services reach every partition"
    );

    // An override is a request: mapped by its service, answered on its inbox.
    let mut operator = nats
        .subscribe("rollcall.partition.*.operator.>")
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let answering = nats.clone();
    tokio::spawn(async move {
        while let Some(m) = operator.next().await {
            if let Some(reply) = m.reply {
                let _ = answering.publish(reply, m.subject.to_string().into()).await;
            }
        }
    });
    let answer = nats
        .request("rollcall.operator.drain.billing.b-1", "{}".into())
        .await
        .expect("answered through the mapping");
    assert_eq!(
        std::str::from_utf8(&answer.payload).unwrap(),
        format!(
            "rollcall.partition.{}.operator.drain.billing.b-1",
            partition_of("billing", N)
        )
    );
}

#[tokio::test]
async fn a_catalog_stream_from_before_partitions_and_records_gains_their_fences_in_place() {
    let server = support::NatsServer::start();
    let nats = support::client(&server.url()).await;
    let js = async_nats::jetstream::new(nats.clone());
    let subjects = Subjects::default();
    let mut before = rollcall::catalog_stream::stream_config(&subjects, 1);
    before.subjects.retain(|s| !s.ends_with(".*"));
    assert_eq!(
        before.subjects,
        ["rollcall.catalog-store.>", "rollcall.catalog-fence"]
    );
    js.create_stream(before).await.expect("the old stream");
    let stored = Snapshot {
        service: "web".into(),
        revision: 9,
        instances: vec![Instance::new("web", "web-1", "127.0.0.1", 5001)],
    };
    js.publish(
        "rollcall.catalog-store.web",
        serde_json::to_vec(&stored).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .expect("stored");

    let discovery = support::RunningDiscovery::start(&server.url()).await;
    let mut stream = js.get_stream(subjects.catalog_stream()).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.config.subjects,
        [
            "rollcall.catalog-store.>",
            "rollcall.catalog-fence",
            "rollcall.catalog-fence.*"
        ]
    );
    assert!(info.config.allow_message_ttl, "tombstones may carry a TTL");
    let catalog = discovery.get().catalog().await;
    let kept: Vec<_> = catalog.iter().map(|s| (&s.service, &s.instances)).collect();
    assert_eq!(
        kept,
        [(&stored.service, &stored.instances)],
        "what it kept stays"
    );
    discovery.stop().await;
}

#[tokio::test]
async fn unpartitioned_discovery_refuses_to_start_beside_shards() {
    let server = support::NatsServer::start();
    let urls = [server.url()];
    let shard = shard(&urls, 0, "a", "0-15/16");
    shard.wait_stderr_times("leading the catalog", 16, LIMIT);
    let (code, _, said) = cli::run(rollcall(&["discovery", "--nats", &urls[0]]), LIMIT);
    assert_ne!(code, Some(0));
    for needle in [
        "holds the fences of 16 partitions",
        "Start it with --partitions LIST/N",
        "nats stream purge ROLLCALL_CATALOG --subject 'rollcall.catalog-fence.*'",
    ] {
        assert!(said.contains(needle), "no {needle:?} in\n{said}");
    }
}

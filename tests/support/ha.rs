//! A fleet for the failover tests: `rollcall discovery` replicas as child
//! processes on one nats-server or a cluster, instances of `web`
//! heartbeating (each through its own node when there are several), a
//! balancer and a client request loop through it, and a record of every
//! snapshot and leader heartbeat to check the invariants against:
//! revisions strictly increasing per service, no snapshot missing an
//! instance that was alive, no failed client request.
//!
//! Loaded as `#[path = "support/ha.rs"] mod ha;` next to `mod support;` and
//! `#[path = "support/cli.rs"] mod cli;`.
#![allow(dead_code)] // each test binary uses its own part of the support code

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::{Balancer, BalancerConfig};
use rollcall::connect::NatsOptions;
use rollcall::protocol::{Instance, Leadership, Snapshot, Subjects};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::cli::{rollcall, Process};
use crate::support::http::{client, get, HttpBackend};
use crate::support::{eventually, NatsServer};

/// The instances' TTL: a freeze longer than this would expire everything if
/// the frozen replica trusted its own clock.
pub const TTL_MS: u64 = 1500;

/// Everything a catalog subscriber and the leader heartbeat showed.
#[derive(Default)]
pub struct Seen {
    pub snapshots: Vec<Snapshot>,
    pub leaders: Vec<Leadership>,
}

/// Replicas, instances, a balancer and a client over `servers` (a
/// [`NatsServer`], a cluster), which the tests break.
pub struct Fleet<S> {
    pub servers: S,
    pub replicas: Vec<Option<Process>>,
    pub nats: async_nats::Client,
    pub seen: Arc<Mutex<Seen>>,
    /// The instances that heartbeat (and must be in every snapshot).
    pub alive: Vec<Instance>,
    /// The servers' client URLs.
    pub urls: Vec<String>,
    /// How long any one awaited event may take.
    pub limit: Duration,
    failed: Arc<AtomicU64>,
    served: Arc<AtomicU64>,
    _backends: Vec<HttpBackend>,
    _stop: Vec<oneshot::Sender<()>>,
}

/// `rollcall discovery --nats URLS --replica NAME` as a child process.
pub fn replica(urls: &str, name: &str) -> Process {
    Process::spawn(rollcall(&["discovery", "--nats", urls, "--replica", name]))
}

/// `urls` starting from the `first`-th (wrapping), comma-separated: a
/// client given these prefers that node and fails over to the others.
pub fn rotated(urls: &[String], first: usize) -> String {
    let n = urls.len();
    (0..n)
        .map(|k| urls[(first + k) % n].as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A client connected to `urls` (comma-separated) tried in their order,
/// noticing a server that stopped answering within about a second, as
/// discovery does.
pub async fn client_preferring(urls: &str) -> async_nats::Client {
    let addresses: Vec<async_nats::ServerAddr> = (urls.split(','))
        .map(|url| url.parse().expect("a valid NATS URL"))
        .collect();
    async_nats::ConnectOptions::new()
        .retain_servers_order()
        .ping_interval(Duration::from_millis(500))
        .connect(addresses)
        .await
        .expect("connect to the test servers")
}

impl Fleet<NatsServer> {
    /// A fresh server and a fleet of `replicas` on it.
    pub async fn one_server(replicas: usize) -> Fleet<NatsServer> {
        let server = NatsServer::start();
        let urls = vec![server.url()];
        Fleet::start(server, &urls, replicas, Duration::from_secs(10)).await
    }
}

impl<S> Fleet<S> {
    /// `replicas` discovery processes (replica `i` preferring node `i`),
    /// three instances of `web` heartbeating (instance `k` through node
    /// `k`), a balancer and a request loop through it, over `servers`
    /// reachable at `urls`; each awaited step may take `limit`.
    pub async fn start(servers: S, urls: &[String], replicas: usize, limit: Duration) -> Fleet<S> {
        Fleet::start_with(servers, urls, limit, |urls| {
            (0..replicas)
                .map(|i| Some(replica(&rotated(urls, i), &format!("d{i}"))))
                .collect()
        })
        .await
    }

    /// [`Fleet::start`] with the replicas `spawn` starts, given the URLs
    /// (named `d<index>` so that [`Fleet::process`] finds them).
    pub async fn start_with(
        servers: S,
        urls: &[String],
        limit: Duration,
        spawn: impl FnOnce(&[String]) -> Vec<Option<Process>>,
    ) -> Fleet<S> {
        let nats = client_preferring(&rotated(urls, 0)).await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        record(&nats, Arc::clone(&seen)).await;
        let replicas = spawn(urls);
        let mut backends = Vec::new();
        let mut alive = Vec::new();
        let mut stop = Vec::new();
        for (k, id) in ["web-1", "web-2", "web-3"].into_iter().enumerate() {
            let backend = HttpBackend::start(id).await;
            let mut instance = Instance::new("web", id, "127.0.0.1", backend.port());
            instance.ttl_ms = TTL_MS;
            let through = client_preferring(&rotated(urls, k)).await;
            stop.push(heartbeat(through, vec![instance.clone()]));
            alive.push(instance);
            backends.push(backend);
        }
        let (balancer_url, balancer_stop) = balancer(&rotated(urls, 0)).await;
        stop.push(balancer_stop);
        let (failed, served) = (Arc::default(), Arc::default());
        let fleet = Fleet {
            servers,
            replicas,
            nats,
            seen,
            alive,
            urls: urls.to_vec(),
            limit,
            failed: Arc::clone(&failed),
            served: Arc::clone(&served),
            _backends: backends,
            _stop: stop,
        };
        fleet.wait_for_all_three().await;
        fleet.wait_for_replicas().await;
        let http = client();
        eventually("the balancer routes", limit, || async {
            let answer = get(&http, &balancer_url).await;
            answer.ok().filter(|(status, _)| status.is_success())
        })
        .await;
        fleet.request_loop(balancer_url, failed, served);
        // The loop under way before any fault, so every test's check sees
        // requests served through whatever it broke.
        eventually("a request served by the loop", limit, || async {
            (fleet.served.load(Ordering::Relaxed) > 0).then_some(())
        })
        .await;
        fleet
    }

    async fn wait_for_all_three(&self) {
        eventually(
            "a snapshot with all three instances",
            self.limit,
            || async {
                let seen = self.seen.lock().unwrap();
                seen.snapshots
                    .iter()
                    .any(|s| s.instances.len() == 3)
                    .then_some(())
            },
        )
        .await;
    }

    /// Every replica past its start (the stored catalog adopted): a fault
    /// made before then would time a replica's start, not a takeover. On a
    /// cluster a replica's first look at the catalog stream can wait out a
    /// request timeout while another replica creates the stream.
    async fn wait_for_replicas(&self) {
        for replica in self.replicas.iter().flatten() {
            eventually("every replica started", self.limit, || async {
                replica
                    .stderr_text()
                    .contains("discovery started")
                    .then_some(())
            })
            .await;
        }
    }

    fn request_loop(&self, url: String, failed: Arc<AtomicU64>, served: Arc<AtomicU64>) {
        tokio::spawn(async move {
            let http = client();
            loop {
                match get(&http, &url).await {
                    Ok((status, _)) if status.is_success() => {
                        served.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }

    /// The replica leading now, by the newest heartbeat, once one with an
    /// epoch above `epoch_above` is heard.
    pub async fn leader_after(&self, epoch_above: u64) -> Leadership {
        eventually("a leader heartbeat", self.limit, || async {
            let seen = self.seen.lock().unwrap();
            seen.leaders
                .last()
                .filter(|l| l.epoch > epoch_above)
                .cloned()
        })
        .await
    }

    /// The process of replica `leader.replica`.
    pub fn process(&mut self, leader: &Leadership) -> &mut Option<Process> {
        let index: usize = leader.replica[1..].parse().expect("replicas are d<N>");
        &mut self.replicas[index]
    }

    /// Sends signal `signal` (KILL, STOP, CONT...) to `leader`'s process.
    /// Kills the leader (SIGKILL) and returns once another replica leads,
    /// asserting it took under 1.5 s.
    pub async fn kill_the_leader(&mut self) {
        let old = self.leader_after(0).await;
        self.signal(&old, "KILL");
        let killed = tokio::time::Instant::now();
        let new = self.leader_after(old.epoch).await;
        let took = killed.elapsed();
        assert_ne!(new.replica, old.replica);
        assert!(took < Duration::from_millis(1500), "takeover took {took:?}");
        eprintln!("kill -9 -> new leader heartbeat: {took:?}");
    }

    /// Freezes the leader (SIGSTOP) for `freeze`, longer than the TTL,
    /// and thaws it once another replica leads; returns once the thawed one
    /// has stopped writing: (the frozen leader, the one that took over).
    pub async fn freeze_the_leader(&mut self, freeze: Duration) -> (Leadership, Leadership) {
        let old = self.leader_after(0).await;
        self.signal(&old, "STOP");
        let new = self.leader_after(old.epoch).await;
        tokio::time::sleep(freeze).await;
        self.signal(&old, "CONT");
        let limit = self.limit;
        let thawed = self.process(&old).as_ref().unwrap();
        eventually("the thawed leader stops writing", limit, || async {
            let log = thawed.stderr_text();
            (log.contains("stopping writes") || log.contains("following the catalog leader"))
                .then_some(())
        })
        .await;
        assert_ne!(new.replica, old.replica);
        (old, new)
    }

    /// Starts one more replica, `d<N>`, and returns N.
    pub fn add_replica(&mut self) -> usize {
        let index = self.replicas.len();
        let added = replica(&rotated(&self.urls, index), &format!("d{index}"));
        self.replicas.push(Some(added));
        index
    }

    /// Every leader heartbeat's (replica, epoch), once each.
    pub fn leaderships(&self) -> std::collections::BTreeSet<(String, u64)> {
        let seen = self.seen.lock().unwrap();
        seen.leaders
            .iter()
            .map(|l| (l.replica.clone(), l.epoch))
            .collect()
    }

    pub fn signal(&mut self, leader: &Leadership, signal: &str) {
        self.process(leader)
            .as_ref()
            .expect("the leader runs")
            .signal(signal);
    }

    /// Registers `web-new` and waits until a stored snapshot lists it.
    pub async fn change_reaches_subscribers(&self) -> Snapshot {
        self.joins("web-new").await
    }

    /// Registers an instance `id` of `web` (weight 0, so it takes no
    /// traffic) and waits until a stored snapshot lists it.
    pub async fn joins(&self, id: &str) -> Snapshot {
        let mut extra = Instance::new("web", id, "127.0.0.1", 9);
        extra.ttl_ms = 600_000;
        extra.weight = 0;
        let payload: bytes::Bytes = serde_json::to_vec(&extra).unwrap().into();
        let subject = format!("rollcall.heartbeat.web.{id}");
        let probes = AtomicU64::new(0);
        eventually("the change stored and republished", self.limit, || async {
            // Sent again every 200 ms, as an instance heartbeats: one sent
            // while the client has not yet noticed a dead server is lost.
            if probes.fetch_add(1, Ordering::Relaxed) % 40 == 0 {
                let _ = self.nats.publish(subject.clone(), payload.clone()).await;
            }
            let seen = self.seen.lock().unwrap();
            seen.snapshots
                .iter()
                .rev()
                .find(|s| s.instances.iter().any(|i| i.id == id))
                .cloned()
        })
        .await
    }

    /// The three invariants, over everything seen.
    pub fn check(&self) {
        let seen = self.seen.lock().unwrap();
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        for snapshot in &seen.snapshots {
            if let Some(held) = last.insert(&snapshot.service, snapshot.revision) {
                assert!(
                    snapshot.revision > held,
                    "revision went from {held} to {} on {}",
                    snapshot.revision,
                    snapshot.service
                );
            }
        }
        let lists_all =
            |s: &Snapshot| (self.alive.iter()).all(|a| s.instances.iter().any(|i| i.id == a.id));
        // Before the first snapshot listing them all, they were still joining.
        let joined = seen.snapshots.iter().position(lists_all).unwrap_or(0);
        for snapshot in &seen.snapshots[joined..] {
            for instance in &self.alive {
                assert!(
                    snapshot.instances.iter().any(|i| i.id == instance.id),
                    "a snapshot (revision {}) lacks {}, which was alive",
                    snapshot.revision,
                    instance.id
                );
            }
        }
        assert!(self.served.load(Ordering::Relaxed) > 0);
        assert_eq!(self.failed.load(Ordering::Relaxed), 0, "failed requests");
    }
}

/// Records every leader heartbeat and, for every record on
/// `rollcall.catalog.>`, the snapshot of its service assembled as a
/// balancer does.
pub async fn record(nats: &async_nats::Client, seen: Arc<Mutex<Seen>>) {
    let subjects = Subjects::default();
    let mut catalog = crate::support::CatalogFeed::subscribe(nats, "rollcall.catalog.>").await;
    let mut leaders = nats.subscribe(subjects.leader_heartbeat()).await.unwrap();
    nats.flush().await.unwrap();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(snapshot) = catalog.next_taken() => seen.lock().unwrap().snapshots.push(snapshot),
                Some(m) = leaders.next() => {
                    let beat: Leadership = serde_json::from_slice(&m.payload).expect("valid heartbeat");
                    seen.lock().unwrap().leaders.push(beat);
                }
                else => return,
            }
        }
    });
}

/// Heartbeats every instance each 200 ms until the sender is dropped.
fn heartbeat(nats: async_nats::Client, instances: Vec<Instance>) -> oneshot::Sender<()> {
    let (stop, mut stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = ticks.tick() => {
                    for instance in &instances {
                        let subject = format!("rollcall.heartbeat.web.{}", instance.id);
                        let payload = serde_json::to_vec(instance).unwrap();
                        let _ = nats.publish(subject, payload.into()).await;
                    }
                }
            }
        }
    });
    stop
}

/// A balancer routing `web`, following the catalog through `urls`: its
/// proxy URL and the sender that stops it.
async fn balancer(urls: &str) -> (String, oneshot::Sender<()>) {
    let connection = NatsOptions::new(urls).connect("ha-balancer").await.unwrap();
    let updates = rollcall::subscription::follow(&connection, Subjects::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}/", listener.local_addr().unwrap());
    let balancer = Balancer::new(BalancerConfig::new(Routes::parse(&["web"]).unwrap()));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(balancer.serve(listener, None, updates, async {
        let _ = stopped.await;
    }));
    (address, stop)
}

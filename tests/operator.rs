//! Operator overrides through real processes: a real nats-server, real
//! `rollcall discovery` processes, a balancer following the catalog over
//! NATS, real backends on 127.0.0.1, instances heartbeating, and the
//! `rollcall drain` / `undrain` / `weight` commands as a user runs them.

#[path = "support/cli.rs"]
mod cli;
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http::StatusCode;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::{Applied, Balancer, BalancerConfig};
use rollcall::connect::NatsOptions;
use rollcall::protocol::{Instance, Snapshot, Subjects};
use support::http::{client, get, HttpBackend, TestClient};
use support::{eventually, free_port, metric_sum, NatsServer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use cli::{http_get, rollcall, run, Process};

const LIMIT: Duration = Duration::from_secs(10);
const TTL_MS: u64 = 1500;
const BEAT: Duration = Duration::from_millis(300);

/// `rollcall <args> --nats <url>`, run to completion off the runtime's
/// threads: exit code, stdout, stderr.
async fn cli(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    args.extend(["--nats".to_owned(), url.to_owned()]);
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(rollcall(&args), LIMIT)
    })
    .await
    .expect("the command ran")
}

/// A `rollcall discovery` process, once it has logged `ready`.
fn discovery(url: &str, replica: &str, admin: Option<u16>, ready: &str) -> Process {
    let mut args = vec!["discovery", "--nats", url, "--replica", replica];
    let admin = admin.map(|port| format!("127.0.0.1:{port}"));
    if let Some(admin) = &admin {
        args.extend(["--admin", admin.as_str()]);
    }
    let process = Process::spawn(rollcall(&args));
    tokio::task::block_in_place(|| process.wait_stderr(ready, LIMIT));
    process
}

const LEADING: &str = "leading the catalog";
const FOLLOWING: &str = "following the catalog leader";

/// Instances heartbeating every [`BEAT`] until taken out; how many
/// heartbeats each was sent.
#[derive(Clone, Default)]
struct Heartbeats {
    instances: Arc<Mutex<BTreeMap<String, Instance>>>,
    beats: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Heartbeats {
    fn start(nats: async_nats::Client) -> Heartbeats {
        let heartbeats = Heartbeats::default();
        let running = heartbeats.clone();
        tokio::spawn(async move {
            let subjects = Subjects::default();
            loop {
                let instances: Vec<Instance> = running.lock_instances().values().cloned().collect();
                for instance in instances {
                    let subject = subjects.event(
                        rollcall::protocol::EventKind::Heartbeat,
                        "web",
                        &instance.id,
                    );
                    let payload = serde_json::to_vec(&instance).expect("serializes");
                    if nats.publish(subject, payload.into()).await.is_ok() {
                        *running.lock_beats().entry(instance.id).or_default() += 1;
                    }
                }
                tokio::time::sleep(BEAT).await;
            }
        });
        heartbeats
    }

    fn lock_instances(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instance>> {
        self.instances.lock().expect("not poisoned")
    }

    fn lock_beats(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.beats.lock().expect("not poisoned")
    }

    fn add(&self, backend: &HttpBackend) {
        let mut instance = Instance::new("web", backend.name.as_str(), "127.0.0.1", backend.port());
        instance.ttl_ms = TTL_MS;
        self.lock_instances().insert(backend.name.clone(), instance);
    }

    fn beats(&self, id: &str) -> u64 {
        self.lock_beats().get(id).copied().unwrap_or(0)
    }
}

/// A balancer in this process, following the catalog over NATS, on a real
/// socket.
struct Front {
    url: String,
    applied: watch::Receiver<Applied>,
    http: TestClient,
    _stop: oneshot::Sender<()>,
}

impl Front {
    async fn start(nats_url: &str) -> Front {
        let connection = NatsOptions::new(nats_url)
            .connect("test-balancer")
            .await
            .expect("balancer connects");
        let updates = rollcall::subscription::follow(&connection, Subjects::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let balancer = Balancer::new(BalancerConfig::new(
            Routes::parse(&["web"]).expect("routes"),
        ));
        let applied = balancer.applied();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(balancer.serve(listener, None, updates, async {
            let _ = stopped.await;
        }));
        Front {
            url,
            applied,
            http: client(),
            _stop: stop,
        }
    }

    /// Waits until the balancer routes on `snapshot`'s revision or later.
    async fn routes(&mut self, snapshot: &Snapshot) {
        let revision = snapshot.revision;
        tokio::time::timeout(
            LIMIT,
            self.applied.wait_for(|a| a.revision("web") >= revision),
        )
        .await
        .unwrap_or_else(|_| panic!("the balancer never routed revision {revision}"))
        .expect("the balancer is running");
    }

    /// How many of `n` sequential requests each backend answered.
    async fn shares(&self, n: usize) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let (status, body) = get(&self.http, &format!("{}/", self.url))
                .await
                .expect("an answer");
            assert_eq!(status, StatusCode::OK, "{body}");
            *seen.entry(body).or_default() += 1;
        }
        seen
    }
}

/// The catalog of `web` as published, followed from now on.
async fn follow_web(nats: &async_nats::Client) -> support::CatalogFeed {
    support::CatalogFeed::subscribe(nats, "rollcall.catalog.web.*").await
}

/// Skips snapshots until one satisfies `wanted`; panics naming `what`
/// after [`LIMIT`].
async fn snapshot_where(
    feed: &mut support::CatalogFeed,
    what: &str,
    wanted: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let found = tokio::time::timeout(LIMIT, async {
        loop {
            let snapshot = feed.next(LIMIT).await;
            if wanted(&snapshot) {
                return snapshot;
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no snapshot with {what} within {LIMIT:?}"))
}

fn member<'s>(snapshot: &'s Snapshot, id: &str) -> Option<&'s Instance> {
    snapshot.instances.iter().find(|i| i.id == id)
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_in_flight_finish_and_holds_through_heartbeats_failovers_and_restarts() {
    let server = NatsServer::start();
    let url = server.url();
    let nats = support::client(&url).await;
    let mut catalog = follow_web(&nats).await;
    let first = discovery(&url, "d1", None, LEADING);
    let standby = discovery(&url, "d1b", None, FOLLOWING);
    let heartbeats = Heartbeats::start(nats.clone());
    let backends = [
        HttpBackend::start("web-1").await,
        HttpBackend::start("web-2").await,
        HttpBackend::start("web-3").await,
    ];
    heartbeats.add(&backends[0]);
    heartbeats.add(&backends[1]);
    let mut front = Front::start(&url).await;
    let both = snapshot_where(&mut catalog, "web-1 and web-2", |s| s.instances.len() == 2).await;
    front.routes(&both).await;

    // A slow request in flight on one of them; that one is drained.
    let http = front.http.clone();
    let slow_url = format!("{}/slow?ms=1500", front.url);
    let slow = tokio::spawn(async move { get(&http, &slow_url).await });
    let busy = eventually("the slow request reaches a backend", LIMIT, || async {
        backends[..2].iter().find(|b| b.received() == 1)
    })
    .await;
    let (drained, other) = (
        busy.name.as_str(),
        if busy.name == "web-1" {
            "web-2"
        } else {
            "web-1"
        },
    );
    let target = format!("web/{drained}");
    let (code, stdout, stderr) = cli(&url, &["drain", &target, "--by", "alice"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        format!("{target} drained by alice: weight 0 (own 1)")
    );
    let applied = snapshot_where(&mut catalog, "the drain", |s| {
        member(s, drained).is_some_and(|i| i.weight == 0)
    })
    .await;
    front.routes(&applied).await;
    assert_eq!(busy.served(), 0, "the slow request is still in flight");
    assert_eq!(front.shares(6).await, counts(&[(other, 6)]));
    let (status, body) = slow
        .await
        .expect("the request task")
        .expect("the in-flight request is answered");
    assert_eq!((status, body.as_str()), (StatusCode::OK, drained));

    // Heartbeats do not undo it.
    let beats = heartbeats.beats(drained);
    eventually(
        "three more heartbeats of the drained instance",
        LIMIT,
        || async { (heartbeats.beats(drained) >= beats + 3).then_some(()) },
    )
    .await;
    assert_eq!(front.shares(4).await, counts(&[(other, 4)]));
    let (code, table, stderr) = cli(&url, &["catalog", "web"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("web      {drained}")))
        .unwrap_or_else(|| panic!("{drained} is listed:\n{table}"));
    assert!(row.ends_with("drained by alice"), "{row}");

    // Nor does a kill -9 of the leader: the hot standby folded the drain
    // too, and its first own snapshot (web-3 joining) still has it.
    first.signal("KILL");
    drop(first);
    tokio::task::block_in_place(|| standby.wait_stderr(LEADING, LIMIT));
    let restarted = discovery(&url, "d2", None, FOLLOWING);
    heartbeats.add(&backends[2]);
    let joined = snapshot_where(&mut catalog, "web-3 joins", |s| s.instances.len() == 3).await;
    let held = member(&joined, drained).expect("still live");
    assert_eq!(held.weight, 0);
    assert_eq!(held.operator.as_ref().map(|o| o.by.as_str()), Some("alice"));
    front.routes(&joined).await;
    assert_eq!(front.shares(6).await, counts(&[(other, 3), ("web-3", 3)]));

    // Nor a kill -9 of that one: a discovery started after the drain
    // adopted it from the stored catalog with the instance.
    standby.signal("KILL");
    drop(standby);
    tokio::task::block_in_place(|| restarted.wait_stderr(LEADING, LIMIT));
    let (code, stdout, stderr) = cli(&url, &["weight", "web/web-3", "3", "--by", "bob"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "web/web-3 weight 3 by bob: weight 3 (own 1)");
    let weighted = snapshot_where(&mut catalog, "web-3 weighted", |s| {
        member(s, "web-3").is_some_and(|i| i.weight == 3)
    })
    .await;
    assert_eq!(member(&weighted, drained).map(|i| i.weight), Some(0));
    front.routes(&weighted).await;
    assert_eq!(front.shares(8).await, counts(&[(other, 2), ("web-3", 6)]));

    // Undrained, it takes its share again; back to its own weight, web-3
    // takes an equal share.
    let (code, stdout, stderr) = cli(&url, &["undrain", &target, "--by", "bob"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("{target} live: weight 1 (own 1)"));
    let back = snapshot_where(&mut catalog, "the undrain", |s| {
        member(s, drained).is_some_and(|i| i.weight == 1)
    })
    .await;
    front.routes(&back).await;
    assert_eq!(
        front.shares(10).await,
        counts(&[("web-1", 2), ("web-2", 2), ("web-3", 6)])
    );
    let (code, stdout, stderr) = cli(&url, &["weight", "web/web-3", "own"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "web/web-3 live: weight 1 (own 1)");
    let equal = snapshot_where(&mut catalog, "web-3 at its own weight", |s| {
        member(s, "web-3").is_some_and(|i| i.weight == 1)
    })
    .await;
    front.routes(&equal).await;
    assert_eq!(
        front.shares(6).await,
        counts(&[("web-1", 2), ("web-2", 2), ("web-3", 2)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_publish_drains_shows_in_watch_and_a_new_registration_comes_back_without_it() {
    let server = NatsServer::start();
    let url = server.url();
    let nats = support::client(&url).await;
    let mut catalog = follow_web(&nats).await;
    let _discovery = discovery(&url, "d1", None, LEADING);
    let register =
        support::register_json("web", "web-1", 5001, serde_json::json!({"ttl_ms": 60000}));
    nats.publish("rollcall.register.web.web-1", register.clone().into())
        .await
        .expect("publish");
    snapshot_where(&mut catalog, "web-1 joins", |s| s.instances.len() == 1).await;
    let watch = Process::spawn(rollcall(&["watch", "web", "--events-only", "--nats", &url]));
    tokio::task::block_in_place(|| watch.wait_stderr("watching", LIMIT));

    // As `nats pub rollcall.operator.drain.web.web-1 '{"by":"carol"}'`.
    nats.publish(
        "rollcall.operator.drain.web.web-1",
        r#"{"by":"carol"}"#.into(),
    )
    .await
    .expect("publish");
    let drained = snapshot_where(&mut catalog, "the drain", |s| s.instances[0].weight == 0).await;
    let operator = drained.instances[0]
        .operator
        .clone()
        .expect("an operator block");
    assert!(operator.drain);
    assert_eq!((operator.by.as_str(), operator.own_weight), ("carol", 1));
    tokio::task::block_in_place(|| {
        let line = watch.line_containing("override", LIMIT);
        assert!(
            line.ends_with("override   web/web-1 drain by carol"),
            "{line}"
        );
        let line = watch.line_containing("(drained by carol)", LIMIT);
        assert!(
            line.contains("web/web-1 127.0.0.1:5001 rev=") && line.contains(" weight=0 "),
            "{line}"
        );
    });

    nats.publish("rollcall.deregister.web.web-1", "{}".into())
        .await
        .expect("publish");
    nats.publish("rollcall.register.web.web-1", register.into())
        .await
        .expect("publish");
    let again = snapshot_where(&mut catalog, "web-1 back", |s| s.instances.len() == 1).await;
    assert_eq!(again.instances[0].weight, 1);
    assert_eq!(
        again.instances[0].operator, None,
        "the override left with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_override_gets_a_clear_error_and_is_counted() {
    let server = NatsServer::start();
    let url = server.url();
    let nats = support::client(&url).await;
    let mut catalog = follow_web(&nats).await;
    let admin = free_port();
    let _discovery = discovery(&url, "d1", Some(admin), LEADING);
    let register =
        support::register_json("web", "web-1", 5001, serde_json::json!({"ttl_ms": 60000}));
    nats.publish("rollcall.register.web.web-1", register.into())
        .await
        .expect("publish");
    snapshot_where(&mut catalog, "web-1 joins", |s| s.instances.len() == 1).await;

    // Refused by the command itself (clap exits 2) or by discovery (1).
    for (args, code, says) in [
        (&["drain", "web"][..], 2, "\"web\" is not SERVICE/ID"),
        (&["drain", "web/we.b"], 2, "id \"we.b\" contains '.'"),
        (
            &["weight", "web/web-1", "20000"],
            2,
            "neither a weight 0..10000 nor `own`",
        ),
        (
            &["drain", "web/web-1", "--by", ""],
            2,
            "0 characters; give 1 to 64",
        ),
        (
            &["drain", "web/nope"],
            1,
            "rollcall: web/nope is not a live instance",
        ),
        (
            &["undrain", "api/web-1"],
            1,
            "api/web-1 is not a live instance",
        ),
    ] {
        let (exit, stdout, stderr) = cli(&url, args).await;
        assert_eq!(exit, Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    }

    // Published by hand: counted by reason, and the catalog unchanged.
    for (subject, payload) in [
        ("rollcall.operator.drain.web.web-1", r#"{"by":""}"#),
        ("rollcall.operator.weight.web.web-1", r#"{"by":"a"}"#),
        (
            "rollcall.operator.weight.web.web-1",
            r#"{"by":"a","weight":"5"}"#,
        ),
        ("rollcall.operator.pause.web.web-1", r#"{"by":"a"}"#),
        ("rollcall.operator.drain.web.web-1", "drain!"),
    ] {
        nats.publish(subject, payload.into())
            .await
            .expect("publish");
    }
    let mut claimed = serde_json::from_str::<serde_json::Value>(&support::register_json(
        "web",
        "web-1",
        5001,
        serde_json::json!({"ttl_ms": 60000}),
    ))
    .expect("json");
    claimed["weight"] = 0.into();
    claimed["operator"] =
        serde_json::json!({"drain": true, "own_weight": 1, "by": "me", "at_ms": 1});
    nats.publish("rollcall.heartbeat.web.web-1", claimed.to_string().into())
        .await
        .expect("publish");
    nats.flush().await.expect("flush");
    let admin = format!("127.0.0.1:{admin}");
    let expected = [
        (
            r#"rollcall_discovery_invalid_overrides_total{reason="unknown_instance"}"#,
            2,
        ),
        (
            r#"rollcall_discovery_invalid_overrides_total{reason="bad_by"}"#,
            1,
        ),
        (
            r#"rollcall_discovery_invalid_overrides_total{reason="bad_weight"}"#,
            2,
        ),
        (
            r#"rollcall_discovery_invalid_overrides_total{reason="bad_subject"}"#,
            1,
        ),
        (
            r#"rollcall_discovery_invalid_overrides_total{reason="bad_json"}"#,
            1,
        ),
        (
            r#"rollcall_discovery_invalid_events_total{reason="operator_in_event"}"#,
            1,
        ),
        // Present for every action, and none applied.
        ("rollcall_discovery_overrides_total", 0),
    ];
    eventually("every bad override counted", LIMIT, || {
        let admin = admin.clone();
        async move {
            let (_, text) = tokio::task::spawn_blocking(move || http_get(&admin, "/metrics"))
                .await
                .expect("scraped");
            let seen: Vec<u64> = expected
                .iter()
                .map(|(selector, _)| metric_sum(&text, selector).unwrap_or(u64::MAX))
                .collect();
            (seen == expected.map(|(_, n)| n)).then_some(())
        }
    })
    .await;
    // A register carrying a block of its own got nowhere either.
    let (_, table, _) = cli(&url, &["catalog", "web"]).await;
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|row| row.ends_with("live")),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_discovery_answering_the_command_says_so() {
    let server = NatsServer::start();
    let url = server.url();
    let (code, _, stderr) = cli(&url, &["drain", "web/web-1"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no discovery listens on rollcall.operator.drain.web.web-1"),
        "{stderr}"
    );
    // Something listens but nothing answers (a discovery failing over).
    let nats = support::client(&url).await;
    let mut silent = nats
        .subscribe("rollcall.operator.>")
        .await
        .expect("subscribe");
    nats.flush().await.expect("flush");
    let (code, _, stderr) = cli(
        &url,
        &["drain", "web/web-1", "--timeout", "300ms", "--by", "dave"],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no discovery answered on rollcall.operator.drain.web.web-1 within 300ms"),
        "{stderr}"
    );
    let heard = silent.next().await.expect("the request arrived");
    assert_eq!(&heard.payload[..], br#"{"by":"dave"}"#);
}

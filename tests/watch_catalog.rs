//! `rollcall watch` and `rollcall catalog` as real processes, against a real
//! nats-server with discovery and announcers running in the test.
//!
//! The tests read the child's output with blocking calls, so they run on a
//! multi-threaded runtime: discovery and the NATS client keep a thread while
//! the test's thread waits for a line.

#[path = "support/cli.rs"]
mod cli;
mod support;

use std::time::Duration;

use cli::{rollcall, run, Process};
use rollcall::announcer::{Announcement, Announcer};
use rollcall::discovery::Discovery;
use rollcall::protocol::{Instance, Subjects};
use support::NatsServer;
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(5);

struct Fleet {
    _discovery: Discovery,
    _stop: oneshot::Sender<()>,
    client: async_nats::Client,
}

async fn discovery(nats: &NatsServer) -> Fleet {
    let connection = rollcall::connect::NatsOptions::new(nats.url())
        .connect("test-discovery")
        .await
        .unwrap();
    let client = connection.client.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let discovery = rollcall::discovery::spawn(&connection, Subjects::default(), async {
        let _ = stopped.await;
    })
    .await
    .expect("discovery starts");
    Fleet {
        _discovery: discovery,
        _stop: stop,
        client,
    }
}

async fn announce(fleet: &Fleet, service: &str, id: &str, port: u16) -> Announcement {
    let mut instance = Instance::new(service, id, "127.0.0.1", port);
    instance.tags = vec!["v2".into()];
    Announcer::with_client(fleet.client.clone(), Subjects::default(), instance)
        .start()
        .await
        .expect("announces")
}

/// Waits until the catalog stream holds `count` instances of `service`.
async fn stored(fleet: &Fleet, service: &str, count: usize) {
    let js = async_nats::jetstream::new(fleet.client.clone());
    let what = format!("the catalog stream to hold {count} instances of {service}");
    support::eventually(&what, WAIT, || async {
        let last = rollcall::catalog_stream::read_last(&js, &Subjects::default())
            .await
            .ok()?;
        last.snapshots
            .iter()
            .any(|s| s.snapshot.service == service && s.snapshot.instances.len() == count)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_events_records_and_invalid_messages() {
    let nats = NatsServer::start();
    let fleet = discovery(&nats).await;
    let url = nats.url();
    let watch = Process::spawn(rollcall(&["watch", "--nats", &url]));
    watch.wait_stderr("watching", WAIT);

    let _web_1 = announce(&fleet, "web", "web-1", 5001).await;
    let line = watch.line_containing("register", WAIT);
    assert!(
        line.contains("register   web/web-1 127.0.0.1:5001 ttl=3000ms weight=1 tags=v2"),
        "{line}"
    );
    let line = watch.line_containing("joined", WAIT);
    assert!(
        line.contains("joined     web/web-1 127.0.0.1:5001 rev=") && line.ends_with(" weight=1"),
        "{line}"
    );

    fleet
        .client
        .publish("rollcall.register.web.bad", "{\"service\":\"web\"".into())
        .await
        .unwrap();
    let line = watch.line_containing("invalid", WAIT);
    assert!(line.contains("rollcall.register.web.bad"), "{line}");
    assert!(line.contains("not valid JSON"), "{line}");
    // Still running after the invalid message.
    let _api = announce(&fleet, "api", "api-1", 6001).await;
    watch.line_containing("register   api/api-1", WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_one_service_as_json() {
    let nats = NatsServer::start();
    let fleet = discovery(&nats).await;
    let url = nats.url();
    let mut watch = Process::spawn(rollcall(&["watch", "--nats", &url, "web", "--json"]));
    watch.wait_stderr("watching", WAIT);

    let _api = announce(&fleet, "api", "api-1", 6001).await;
    let web = announce(&fleet, "web", "web-1", 5001).await;
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let line = watch.line(WAIT);
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(value["service"], "web", "only web is watched: {line}");
        if value["kind"] == "register" {
            assert_eq!(value["instance"]["port"], 5001);
        }
        if value["kind"] == "joined" {
            assert_eq!(value["id"], "web-1");
            assert_eq!(value["instance"]["port"], 5001);
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        if !kinds.contains(&kind) && kind != "heartbeat" {
            kinds.push(kind);
        }
    }
    kinds.sort();
    assert_eq!(kinds, ["joined", "register"]);
    web.deregister().await.unwrap();
    watch.line_containing("\"deregister\"", WAIT);
    let left = watch.line_containing("\"left\"", WAIT);
    assert!(left.contains("\"left\":\"deregistered\""), "{left}");
    watch.signal("TERM");
    assert_eq!(watch.wait(WAIT), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_prints_the_stored_catalog() {
    let nats = NatsServer::start();
    let url = nats.url();

    // Before discovery ever ran, the stream does not exist.
    let (code, _, stderr) = run(rollcall(&["catalog", "--nats", &url]), WAIT);
    assert!(matches!(code, Some(c) if c != 0), "exited {code:?}");
    assert!(stderr.contains("does not exist yet"), "{stderr}");

    let fleet = discovery(&nats).await;
    let _web_1 = announce(&fleet, "web", "web-1", 5001).await;
    let _web_2 = announce(&fleet, "web", "web-2", 5002).await;
    let _api = announce(&fleet, "api", "api-1", 6001).await;
    stored(&fleet, "web", 2).await;
    stored(&fleet, "api", 1).await;

    let (code, table, stderr) = run(rollcall(&["catalog", "--nats", &url]), WAIT);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["SERVICE", "INSTANCE", "ADDRESS", "PORT", "WEIGHT", "TTL", "TAGS", "CHANGED", "STATE"]
    );
    assert_eq!(lines.len(), 4, "{table}");
    assert_eq!(
        lines[1][..7],
        ["api", "api-1", "127.0.0.1", "6001", "1", "3s", "v2"]
    );
    assert_eq!(
        lines[2][..7],
        ["web", "web-1", "127.0.0.1", "5001", "1", "3s", "v2"]
    );
    assert_eq!(
        lines[3][..7],
        ["web", "web-2", "127.0.0.1", "5002", "1", "3s", "v2"]
    );

    // A service the catalog does not have is an error naming it.
    let (code, stdout, stderr) = run(rollcall(&["catalog", "--nats", &url, "nope"]), WAIT);
    assert!(matches!(code, Some(c) if c != 0), "exited {code:?}");
    assert!(
        stderr.contains("the catalog has no service named nope (it has: api, web)"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");

    let (code, json, stderr) = run(
        rollcall(&["catalog", "--nats", &url, "web", "--json"]),
        WAIT,
    );
    assert_eq!(code, Some(0), "{stderr}");
    let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let services = value.as_array().expect("an array of services");
    assert_eq!(services.len(), 1, "{json}");
    assert_eq!(services[0]["service"], "web");
    assert!(
        services[0]["revision"].as_u64().is_some_and(|r| r >= 2),
        "{json}"
    );
    let ids: Vec<&str> = services[0]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, ["web-1", "web-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_starts_with_the_current_catalog_unless_told_not_to() {
    let nats = NatsServer::start();
    let fleet = discovery(&nats).await;
    let url = nats.url();
    let _web_1 = announce(&fleet, "web", "web-1", 5001).await;
    let _api = announce(&fleet, "api", "api-1", 6001).await;
    stored(&fleet, "web", 1).await;
    stored(&fleet, "api", 1).await;

    let watch = Process::spawn(rollcall(&["watch", "--nats", &url]));
    let first = watch.line(WAIT);
    assert!(
        first.contains(" current    api rev=") && first.ends_with("[api-1@127.0.0.1:6001]"),
        "{first}"
    );
    let second = watch.line(WAIT);
    assert!(
        second.contains(" current    web rev=") && second.ends_with("[web-1@127.0.0.1:5001]"),
        "{second}"
    );

    let json = Process::spawn(rollcall(&["watch", "--nats", &url, "web", "--json"]));
    let value: serde_json::Value = serde_json::from_str(&json.line(WAIT)).expect("JSON");
    assert_eq!(value["kind"], "current");
    assert_eq!(value["service"], "web");
    assert_eq!(value["instances"][0]["id"], "web-1");

    let events_only = Process::spawn(rollcall(&["watch", "--nats", &url, "--events-only"]));
    events_only.wait_stderr("watching", WAIT);
    let _web_2 = announce(&fleet, "web", "web-2", 5002).await;
    let mut lines = Vec::new();
    while !lines
        .last()
        .is_some_and(|l: &String| l.contains("register   web/web-2"))
    {
        lines.push(events_only.line(WAIT));
    }
    assert!(
        lines.iter().all(|line| !line.contains(" current ")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_can_leave_heartbeats_out() {
    let nats = NatsServer::start();
    let fleet = discovery(&nats).await;
    let url = nats.url();
    let all = Process::spawn(rollcall(&["watch", "--nats", &url]));
    let quiet = Process::spawn(rollcall(&["watch", "--nats", &url, "--no-heartbeats"]));
    all.wait_stderr("watching", WAIT);
    quiet.wait_stderr("watching", WAIT);

    let instance = Instance::new("web", "web-1", "127.0.0.1", 5001);
    let _web_1 = Announcer::with_client(fleet.client.clone(), Subjects::default(), instance)
        .interval(Duration::from_millis(100))
        .start()
        .await
        .expect("announces");
    all.line_containing("heartbeat  web/web-1", WAIT);
    // A later event from the same client: both watchers saw the heartbeats
    // before it.
    let _web_2 = announce(&fleet, "web", "web-2", 5002).await;
    all.line_containing("register   web/web-2", WAIT);
    let mut lines = Vec::new();
    while !lines
        .last()
        .is_some_and(|l: &String| l.contains("register   web/web-2"))
    {
        lines.push(quiet.line(WAIT));
    }
    assert!(
        lines
            .iter()
            .any(|line| line.contains("register   web/web-1")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|line| !line.contains("heartbeat")),
        "{lines:#?}"
    );
}

#[test]
fn both_fail_clearly_when_nats_is_unreachable() {
    let url = format!("nats://127.0.0.1:{}", support::free_port());
    for command in [
        vec!["watch", "--nats", &url],
        vec!["catalog", "--nats", &url],
        vec!["catalog", "--nats", &url, "--json"],
    ] {
        let (code, stdout, stderr) = run(rollcall(&command), WAIT);
        assert!(
            matches!(code, Some(c) if c != 0),
            "{command:?} exited {code:?}"
        );
        assert!(
            stderr.contains("cannot reach NATS"),
            "{command:?}: {stderr}"
        );
        assert!(stdout.is_empty(), "{command:?} printed {stdout}");
    }
}

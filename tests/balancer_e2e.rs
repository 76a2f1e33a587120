//! The whole path through real processes: services register on a real
//! nats-server, discovery folds and publishes, the catalog subscription feeds
//! the balancer, clients reach the instances through it.

#[path = "support/http.rs"]
mod http_support;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::{Applied, Balancer, BalancerConfig};
use rollcall::connect::NatsOptions;
use rollcall::protocol::{Instance, Subjects};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use http_support::{client, get, HttpBackend, TestClient};
use support::{eventually, free_port, wait_for_port, NatsServer, RunningDiscovery};

const LIMIT: Duration = Duration::from_secs(10);

async fn announce(nats: &async_nats::Client, kind: &str, backend: &HttpBackend) {
    let mut instance = Instance::new("web", backend.name.as_str(), "127.0.0.1", backend.port());
    // Long enough that no test needs heartbeats.
    instance.ttl_ms = 60_000;
    let payload = serde_json::to_vec(&instance).expect("an instance serializes");
    nats.publish(
        format!("rollcall.{kind}.web.{}", backend.name),
        payload.into(),
    )
    .await
    .expect("publish");
    nats.flush().await.expect("flush");
}

/// Polls `url` until `accept` holds for the answer; the time that took.
async fn until(
    client: &TestClient,
    url: &str,
    what: &str,
    accept: impl Fn(&(StatusCode, String)) -> bool,
) -> Duration {
    let start = Instant::now();
    let accept = &accept;
    eventually(what, LIMIT, || async move {
        get(client, url).await.ok().filter(accept).map(|_| ())
    })
    .await;
    start.elapsed()
}

/// Waits until the balancer routes on a revision of `web` above `held`;
/// returns it.
async fn routes_after(applied: &mut watch::Receiver<Applied>, held: u64) -> u64 {
    tokio::time::timeout(LIMIT, applied.wait_for(|a| a.revision("web") > held))
        .await
        .unwrap_or_else(|_| panic!("web never went past revision {held}"))
        .expect("the balancer is running")
        .revision("web")
}

/// The bodies of `n` sequential requests.
async fn bodies(client: &TestClient, url: &str, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let (status, body) = get(client, url).await.expect("an answer");
        assert_eq!(status, StatusCode::OK, "{body}");
        seen.push(body);
    }
    seen
}

#[tokio::test]
async fn register_deregister_and_a_nats_restart_under_the_balancer() {
    let mut server = NatsServer::start();
    let discovery = RunningDiscovery::start(&server.url()).await;
    let nats = support::client(&server.url()).await;
    let web1 = HttpBackend::start("web-1").await;
    let web2 = HttpBackend::start("web-2").await;
    let web3 = HttpBackend::start("web-3").await;

    let connection = NatsOptions::new(server.url())
        .connect("test-balancer")
        .await
        .expect("balancer connects");
    let updates = rollcall::subscription::follow(&connection, Subjects::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("address"));
    let (stop, stopped) = oneshot::channel::<()>();
    let balancer = Balancer::new(BalancerConfig::new(
        Routes::parse(&["web"]).expect("routes"),
    ));
    let mut applied = balancer.applied();
    let balancer = tokio::spawn(balancer.serve(listener, None, updates, async {
        let _ = stopped.await;
    }));
    let http = client();

    let (status, body) = get(&http, &url).await.expect("answer");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    // Each register and deregister below is one revision of `web`.
    let start = Instant::now();
    announce(&nats, "register", &web1).await;
    let joined = routes_after(&mut applied, 0).await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "register → routed took {took:?}"
    );
    assert_eq!(bodies(&http, &url, 2).await, ["web-1", "web-1"]);
    announce(&nats, "register", &web2).await;
    let second = routes_after(&mut applied, joined).await;
    let mut seen = bodies(&http, &url, 4).await;
    seen.sort();
    assert_eq!(seen, ["web-1", "web-1", "web-2", "web-2"]);

    announce(&nats, "deregister", &web1).await;
    routes_after(&mut applied, second).await;
    let after = web1.served();
    assert!(bodies(&http, &url, 10).await.iter().all(|b| b == "web-2"));
    assert_eq!(
        web1.served(),
        after,
        "no request reaches a deregistered instance"
    );

    // NATS goes away: the balancer keeps routing on what it has.
    server.stop();
    assert!(bodies(&http, &url, 5).await.iter().all(|b| b == "web-2"));
    server.restart();
    // Back: the subscription re-syncs and follows live changes again. The
    // new instance heartbeats, as a real one does, since whatever it sent
    // while clients were still reconnecting may be lost.
    eventually("web-3 routed after the NATS restart", LIMIT, || async {
        heartbeat(&nats, &web3).await;
        let seen = bodies(&http, &url, 2).await;
        seen.iter().any(|b| b == "web-3").then_some(())
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(LIMIT, balancer)
        .await
        .expect("balancer stops")
        .expect("task")
        .expect("no error");
    discovery.stop().await;
}

/// A heartbeat that may be lost while NATS is away.
async fn heartbeat(nats: &async_nats::Client, backend: &HttpBackend) {
    let mut instance = Instance::new("web", backend.name.as_str(), "127.0.0.1", backend.port());
    instance.ttl_ms = 60_000;
    if let Ok(payload) = serde_json::to_vec(&instance) {
        let _ = nats
            .publish(
                format!("rollcall.heartbeat.web.{}", backend.name),
                payload.into(),
            )
            .await;
        let _ = tokio::time::timeout(Duration::from_millis(100), nats.flush()).await;
    }
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_cli_routes_what_registers_and_stops_on_sigterm() {
    let server = NatsServer::start();
    let discovery = RunningDiscovery::start(&server.url()).await;
    let nats = support::client(&server.url()).await;
    let web1 = HttpBackend::start("web-1").await;
    let (port, admin) = (free_port(), free_port());
    let mut balancer = Process(
        Command::new(env!("CARGO_BIN_EXE_rollcall"))
            .args(["balancer", "--nats", &server.url()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .arg("web")
            .stderr(Stdio::null())
            .spawn()
            .expect("start rollcall balancer"),
    );
    wait_for_port(port, LIMIT);
    let url = format!("http://127.0.0.1:{port}/");
    let http = client();
    announce(&nats, "register", &web1).await;
    until(&http, &url, "web-1 routed by the CLI", |a| a.1 == "web-1").await;
    let (status, catalog) = get(&http, &format!("http://127.0.0.1:{admin}/catalog"))
        .await
        .expect("admin answers");
    assert_eq!(status, StatusCode::OK);
    assert!(catalog.contains("\"web-1\""), "{catalog}");

    let terminated = Command::new("kill")
        .args(["-TERM", &balancer.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(terminated.success());
    let status = eventually("the balancer to exit on SIGTERM", LIMIT, || {
        let exited = balancer.0.try_wait().expect("wait");
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status:?}");
    discovery.stop().await;
}

#[test]
fn the_cli_refuses_a_bad_route_naming_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_rollcall"))
        .args([
            "balancer",
            "--listen",
            "127.0.0.1:0",
            "web",
            "/api=bad.name",
        ])
        .output()
        .expect("run rollcall balancer");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("\"/api=bad.name\""), "{stderr}");
    assert!(stderr.contains("only A-Z a-z 0-9 _ -"), "{stderr}");
}

//! `/metrics` of a real discovery, agent and balancer (processes, against a
//! real nats-server) after some traffic, read by Prometheus' own Python
//! parser (`prometheus_client`, installed by scripts/provision.sh): every
//! family appears once with its type, and the counters moved as they should.
//! Skipped, saying so, when `ROLLCALL_PYTHON` is unset.

#[path = "support/cli.rs"]
mod cli;
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use cli::{rollcall, Process};
use http::StatusCode;
use support::http::{client, get, must_get, HttpBackend, TestClient};
use support::{eventually, free_port, NatsServer};

const WAIT: Duration = Duration::from_secs(10);
const REQUESTS: u64 = 12;

/// Turns Prometheus text into `[{name, type, samples: [[name, labels, value]]}]`.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
families = [
    {"name": f.name, "type": f.type,
     "samples": [[s.name, s.labels, s.value] for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
]
print(json.dumps(families))
"#;

/// One scrape as the parser read it: family name → (type, samples).
struct Scrape {
    families: BTreeMap<String, (String, Vec<Sample>)>,
    text: String,
}

struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Scrape {
    /// Parses `text` with the Python parser; asserts that each family comes
    /// once and has a type.
    fn parse(python: &std::ffi::OsStr, text: String) -> Scrape {
        let mut child = Command::new(python)
            .args(["-c", PARSE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python");
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(text.as_bytes())
            .expect("write to python");
        let output = child.wait_with_output().expect("python ends");
        assert!(
            output.status.success(),
            "the parser refused the text ({}):\n{text}",
            String::from_utf8_lossy(&output.stderr)
        );
        let parsed: Vec<serde_json::Value> =
            serde_json::from_slice(&output.stdout).expect("the script prints JSON");
        let mut families = BTreeMap::new();
        for family in parsed {
            let name = family["name"].as_str().expect("name").to_owned();
            let kind = family["type"].as_str().expect("type").to_owned();
            assert!(
                kind != "unknown" && kind != "untyped",
                "family {name} has no TYPE in\n{text}"
            );
            let samples = family["samples"]
                .as_array()
                .expect("samples")
                .iter()
                .map(|s| Sample {
                    name: s[0].as_str().expect("sample name").to_owned(),
                    labels: serde_json::from_value(s[1].clone()).expect("labels"),
                    value: s[2].as_f64().expect("value"),
                })
                .collect();
            let previous = families.insert(name.clone(), (kind, samples));
            assert!(previous.is_none(), "family {name} appears twice in\n{text}");
        }
        Scrape { families, text }
    }

    /// The sum of the samples named `sample` carrying every label of `labels`.
    fn value(&self, sample: &str, labels: &[(&str, &str)]) -> f64 {
        self.families
            .values()
            .flat_map(|(_, samples)| samples)
            .filter(|s| s.name == sample)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn assert_families(&self, expected: &[(&str, &str)]) {
        for (name, kind) in expected {
            match self.families.get(*name) {
                Some((found, _)) => assert_eq!(found, kind, "type of {name}"),
                None => panic!("no family {name} in\n{}", self.text),
            }
        }
    }
}

async fn scrape(client: &TestClient, python: &std::ffi::OsStr, admin: u16) -> Scrape {
    let (status, text) = must_get(client, &format!("http://127.0.0.1:{admin}/metrics")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    Scrape::parse(python, text)
}

/// A rollcall process with `--admin` on a free port; the port.
fn start(args: &[&str]) -> (Process, u16) {
    let admin = free_port();
    let address = format!("127.0.0.1:{admin}");
    let mut all = args.to_vec();
    all.extend(["--admin", &address]);
    (Process::spawn(rollcall(&all)), admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_serves_metrics_a_prometheus_parser_reads() {
    let Some(python) = std::env::var_os("ROLLCALL_PYTHON") else {
        eprintln!("skipped: ROLLCALL_PYTHON is unset; `source scripts/provision.sh` sets it");
        return;
    };
    let nats = NatsServer::start();
    let url = nats.url();
    let web = HttpBackend::start("web-1").await;
    let port = web.port().to_string();
    let check = format!("http://127.0.0.1:{port}/");
    let (_discovery, discovery_admin) = start(&["discovery", "--nats", &url]);
    #[rustfmt::skip]
    let (_agent, agent_admin) = start(&[
        "agent", "--nats", &url, "--service", "web", "--id", "web-1",
        "--address", "127.0.0.1", "--port", &port, "--check", &check,
        "--interval", "200ms", "--ttl", "2s",
    ]);
    let listen = free_port();
    let listen_address = format!("127.0.0.1:{listen}");
    let (_balancer, balancer_admin) = start(&[
        "balancer",
        "--nats",
        &url,
        "--listen",
        &listen_address,
        "web",
    ]);

    let http = client();
    let proxied = format!("http://{listen_address}/");
    eventually("the balancer routes to web-1", WAIT, || async {
        let answer = get(&http, &proxied).await.ok()?;
        (answer == (StatusCode::OK, "web-1".to_owned())).then_some(())
    })
    .await;
    // Discovery is listening now (web-1 reached the balancer through it):
    // one event that breaks the protocol, for it to count.
    let nats_client = support::client(&url).await;
    nats_client
        .publish("rollcall.register.web.bad", "not json".into())
        .await
        .expect("publish");
    nats_client.flush().await.expect("flush");

    let instance = [
        ("service", "web"),
        ("instance", "web-1"),
        ("answered_by", "instance"),
    ];
    let requests = "rollcall_balancer_requests_total";
    let before = scrape(&http, &python, balancer_admin).await;
    for _ in 0..REQUESTS {
        assert_eq!(must_get(&http, &proxied).await.0, StatusCode::OK);
    }
    let after = scrape(&http, &python, balancer_admin).await;
    assert_eq!(
        after.value(requests, &instance) - before.value(requests, &instance),
        REQUESTS as f64,
        "{}",
        after.text
    );
    let latency = "rollcall_balancer_upstream_latency_seconds_count";
    assert!(
        after.value(latency, &instance[..2]) >= REQUESTS as f64,
        "{}",
        after.text
    );
    assert_eq!(
        after.value("rollcall_balancer_live_instances", &[("service", "web")]),
        1.0
    );
    assert_eq!(after.value("rollcall_nats_connected", &[]), 1.0);
    #[rustfmt::skip]
    after.assert_families(&[
        ("rollcall_balancer_requests", "counter"),
        ("rollcall_balancer_upstream_latency_seconds", "histogram"),
        ("rollcall_balancer_upstream_failures", "counter"),
        ("rollcall_balancer_retries", "counter"),
        ("rollcall_balancer_ejections", "counter"),
        ("rollcall_balancer_client_aborts", "counter"),
        ("rollcall_balancer_hyper_answers", "counter"),
        ("rollcall_balancer_loops_refused", "counter"),
        ("rollcall_balancer_admin_refused", "counter"),
        ("rollcall_balancer_header_timeouts", "counter"),
        ("rollcall_balancer_idle_closed", "counter"),
        ("rollcall_balancer_body_timeouts", "counter"),
        ("rollcall_balancer_in_flight_requests", "gauge"),
        ("rollcall_balancer_open_client_connections", "gauge"),
        ("rollcall_balancer_ejected_instances", "gauge"),
        ("rollcall_balancer_live_instances", "gauge"),
        ("rollcall_balancer_catalog_revision", "gauge"),
        ("rollcall_balancer_catalog_updates", "counter"),
        ("rollcall_balancer_last_contact_age_seconds", "gauge"),
        ("rollcall_nats_connected", "gauge"),
        ("rollcall_nats_reconnects", "counter"),
    ]);

    let bad_json = [("reason", "bad_json")];
    let discovery = eventually(
        "discovery counts heartbeats and the bad event",
        WAIT,
        || async {
            let scrape = scrape(&http, &python, discovery_admin).await;
            let heartbeats = [("kind", "heartbeat")];
            let invalid = scrape.value("rollcall_discovery_invalid_events_total", &bad_json);
            (scrape.value("rollcall_discovery_events_total", &heartbeats) > 0.0 && invalid > 0.0)
                .then_some(scrape)
        },
    )
    .await;
    assert_eq!(
        discovery.value("rollcall_discovery_invalid_events_total", &bad_json),
        1.0
    );
    let reasons = &discovery.families["rollcall_discovery_invalid_events"].1;
    assert_eq!(reasons.len(), 12, "every reason starts at zero");
    let actions = &discovery.families["rollcall_discovery_overrides"].1;
    assert_eq!(
        actions.len(),
        4,
        "drain, undrain, weight, clear start at zero"
    );
    let refusals = &discovery.families["rollcall_discovery_invalid_overrides"].1;
    assert_eq!(refusals.len(), 9, "every reason starts at zero");
    assert!(discovery.value("rollcall_discovery_records_published_total", &[]) >= 1.0);
    // Only the leader publishes: the one discovery leads.
    assert_eq!(discovery.value("rollcall_discovery_is_leader", &[]), 1.0);
    assert!(discovery.value("rollcall_discovery_epoch", &[]) >= 1.0);
    let web_service = [("service", "web")];
    assert_eq!(
        discovery.value("rollcall_discovery_live_instances", &web_service),
        1.0
    );
    assert_eq!(discovery.value("rollcall_nats_connected", &[]), 1.0);
    #[rustfmt::skip]
    discovery.assert_families(&[
        ("rollcall_discovery_events", "counter"),
        ("rollcall_discovery_invalid_events", "counter"),
        ("rollcall_discovery_records_published", "counter"),
        ("rollcall_discovery_publish_failures", "counter"),
        ("rollcall_discovery_live_instances", "gauge"),
        ("rollcall_discovery_is_leader", "gauge"),
        ("rollcall_discovery_epoch", "gauge"),
        ("rollcall_discovery_overrides", "counter"),
        ("rollcall_discovery_invalid_overrides", "counter"),
        ("rollcall_nats_connected", "gauge"),
        ("rollcall_nats_reconnects", "counter"),
    ]);

    let agent = eventually("the agent counts heartbeats", WAIT, || async {
        let scrape = scrape(&http, &python, agent_admin).await;
        (scrape.value("rollcall_agent_heartbeats_total", &[]) > 0.0).then_some(scrape)
    })
    .await;
    assert!(agent.value("rollcall_agent_checks_total", &[("result", "pass")]) >= 1.0);
    #[rustfmt::skip]
    agent.assert_families(&[
        ("rollcall_agent_checks", "counter"),
        ("rollcall_agent_heartbeats", "counter"),
        ("rollcall_agent_publish_failures", "counter"),
        ("rollcall_nats_connected", "gauge"),
    ]);

    for admin in [discovery_admin, agent_admin, balancer_admin] {
        let readyz = format!("http://127.0.0.1:{admin}/readyz");
        assert_eq!(must_get(&http, &readyz).await.0, StatusCode::OK, "{readyz}");
    }
}

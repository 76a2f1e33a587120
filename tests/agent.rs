//! `rollcall agent` as a real process against a real nats-server, checking a
//! real HTTP target that the test flips between healthy and failing.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cli::{rollcall, run, Process, Tap};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use nats_extra::ConfiguredServer;
use rollcall::protocol::{Event, EventKind};
use support::NatsServer;

const WAIT: Duration = Duration::from_secs(5);

/// An HTTP server on 127.0.0.1 answering 200 while `healthy`, else 503.
async fn health_target(healthy: Arc<AtomicBool>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/health", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let healthy = healthy.clone();
            let service = hyper::service::service_fn(move |_request| {
                let status = if healthy.load(Ordering::SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                async move {
                    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    url
}

fn agent(nats: &NatsServer, id: &str, extra: &[&str]) -> Process {
    let url = nats.url();
    let mut args = vec![
        "agent",
        "--nats",
        &url,
        "--service",
        "py",
        "--id",
        id,
        "--address",
        "127.0.0.1",
        "--port",
        "5001",
        "--interval",
        "100ms",
        "--ttl",
        "1s",
        "--tag",
        "v2",
        "--meta",
        "zone=a",
    ];
    args.extend_from_slice(extra);
    Process::spawn(rollcall(&args))
}

#[tokio::test]
async fn heartbeats_only_while_the_check_passes() {
    let nats = NatsServer::start();
    let mut tap = Tap::new(&nats.url()).await;
    let healthy = Arc::new(AtomicBool::new(true));
    let check = health_target(healthy.clone()).await;
    let mut process = agent(
        &nats,
        "py-1",
        &[
            "--check",
            &check,
            "--check-timeout",
            "200ms",
            "--fail-after",
            "3",
        ],
    );

    let register = tap.until(EventKind::Register, "py-1", WAIT).await;
    let Event::Register(instance) = register.event else {
        unreachable!("until returns the kind asked for")
    };
    assert_eq!(instance.authority(), "127.0.0.1:5001");
    assert_eq!(instance.ttl_ms, 1000);
    assert_eq!(instance.tags, ["v2"]);
    assert_eq!(instance.meta.get("zone").map(String::as_str), Some("a"));
    for _ in 0..2 {
        let beat = tap.next(WAIT).await;
        assert_eq!(beat.event.kind(), EventKind::Heartbeat);
    }

    healthy.store(false, Ordering::SeqCst);
    let failing_since = std::time::Instant::now();
    // Heartbeats already sent (queued at the tap, or one whose check passed
    // just before the flip) are read at once; after them the agent holds its
    // heartbeats through the failing checks until the third deregisters.
    // Held, the gap before the deregister is at least two intervals; had the
    // heartbeats gone on, it would be one.
    let mut last_beat = failing_since;
    let deregister = loop {
        let seen = tap.next(WAIT).await;
        match seen.event.kind() {
            EventKind::Heartbeat => last_beat = last_beat.max(seen.at),
            EventKind::Deregister => break seen,
            EventKind::Register => panic!("register while failing"),
        }
    };
    let held = deregister.at - last_beat;
    assert!(
        held >= Duration::from_millis(150),
        "heartbeats went on while the check failed: the last came {held:?} before the deregister"
    );
    let took = deregister.at - failing_since;
    assert!(
        took < Duration::from_secs(2),
        "deregistered {took:?} after the check began failing (3 checks at 100 ms)"
    );
    tap.silent_for(Duration::from_millis(300)).await;
    let log = process.stderr_text();
    assert!(
        log.contains("health check failed too often; deregistering")
            && log.contains("answered 503"),
        "the log says why: {log}"
    );

    healthy.store(true, Ordering::SeqCst);
    tap.until(EventKind::Register, "py-1", WAIT).await;
    assert_eq!(tap.next(WAIT).await.event.kind(), EventKind::Heartbeat);

    process.signal("TERM");
    tap.until(EventKind::Deregister, "py-1", WAIT).await;
    assert_eq!(process.wait(WAIT), Some(0), "{}", process.stderr_text());
}

/// The README's first try, a check URL that answers 404: nothing is
/// announced, and the log says so, and why, at the default level. (The
/// test waits on the log with blocking calls: the check target needs a
/// thread of its own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_never_passes_says_why_and_announces_nothing() {
    let nats = NatsServer::start();
    let mut tap = Tap::new(&nats.url()).await;
    let check = health_target(Arc::new(AtomicBool::new(false))).await;
    let process = agent(&nats, "py-3", &["--check", &check, "--fail-after", "2"]);
    // Reminders come at the 1st, 2nd and 4th failure.
    process.wait_stderr("failures=4", WAIT);
    let log = process.stderr_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("health check has not passed yet"))
        .collect();
    assert_eq!(warnings.len(), 3, "{log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("answered 503"),
        "{log}"
    );
    assert!(!log.contains("registered"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a redirected log: {log:?}"
    );
    // On the wire: only the start-up permission probe, an empty deregister.
    let probe = tap.next(WAIT).await;
    assert_eq!(probe.subject, "rollcall.deregister.py.py-3");
    tap.silent_for(Duration::from_millis(300)).await;
}

/// A user allowed only another service's subjects: the agent stops at start
/// naming the refusal, and never claims to be registered.
#[test]
fn refused_publishes_stop_the_agent_before_it_claims_anything() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let url = server.secure_url("api");
    let args = [
        "agent",
        "--nats",
        &url,
        "--service",
        "web",
        "--id",
        "web-7",
        "--address",
        "127.0.0.1",
        "--port",
        "5001",
    ];
    let (code, _, stderr) = run(rollcall(&args), WAIT);
    assert!(
        matches!(code, Some(c) if c != 0),
        "exited {code:?}: {stderr}"
    );
    assert!(
        stderr
            .contains("permission denied publishing to rollcall.deregister.web.web-7 as user api"),
        "{stderr}"
    );
    assert!(!stderr.contains("registered"), "{stderr}");
}

#[tokio::test]
async fn without_a_check_it_announces_until_sigint() {
    let nats = NatsServer::start();
    let mut tap = Tap::new(&nats.url()).await;
    let mut process = agent(&nats, "py-2", &[]);
    tap.until(EventKind::Register, "py-2", WAIT).await;
    tap.until(EventKind::Heartbeat, "py-2", WAIT).await;
    process.signal("INT");
    let seen = tap.until(EventKind::Deregister, "py-2", WAIT).await;
    assert_eq!(seen.subject, "rollcall.deregister.py.py-2");
    assert_eq!(process.wait(WAIT), Some(0), "{}", process.stderr_text());
}

#[test]
fn bad_flags_fail_naming_the_flag() {
    let base = [
        "agent",
        "--nats",
        "nats://127.0.0.1:1",
        "--service",
        "web",
        "--id",
        "w1",
        "--address",
        "127.0.0.1",
        "--port",
        "80",
    ];
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("--service", "we.b")], "--service"),
        (&[("--id", "a b")], "--id"),
        (&[("--port", "0")], "--port"),
        (&[("--ttl", "50ms")], "--ttl"),
        (&[("--ttl", "11m")], "--ttl"),
        (&[("--meta", "zone")], "--meta"),
        (&[("--check", "ftp://x/health")], "--check"),
        (&[("--interval", "soon")], "--interval"),
        (&[("--weight", "10001")], "--weight"),
        (&[("--address", "a b")], "--address"),
        (&[("--interval", "5s")], "--interval"),
    ];
    for (changes, flag) in cases {
        let mut args: Vec<&str> = base.to_vec();
        for (name, value) in *changes {
            match args.iter().position(|a| a == name) {
                Some(at) => args[at + 1] = value,
                None => args.extend([*name, *value]),
            }
        }
        let (code, _, stderr) = run(rollcall(&args), WAIT);
        assert!(
            matches!(code, Some(c) if c != 0),
            "{changes:?} exited {code:?}"
        );
        assert!(stderr.contains(flag), "{changes:?}: {stderr}");
    }
}

#[test]
fn unreachable_nats_fails_with_a_clear_message() {
    let port = support::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let args = [
        "agent",
        "--nats",
        &url,
        "--service",
        "web",
        "--id",
        "w1",
        "--address",
        "127.0.0.1",
        "--port",
        "80",
    ];
    let (code, _, stderr) = run(rollcall(&args), Duration::from_secs(10));
    assert!(matches!(code, Some(c) if c != 0), "exited {code:?}");
    assert!(stderr.contains("cannot reach NATS"), "{stderr}");
}

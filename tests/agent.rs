//! `rollcall agent` as a real process against a real nats-server, checking a
//! real HTTP target that the test flips between healthy and failing.

#[path = "support/cli.rs"]
mod cli;
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

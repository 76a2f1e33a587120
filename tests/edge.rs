//! The balancer as an edge proxy, through raw TCP sockets on 127.0.0.1:
//! timeouts and the connection cap, strict answers, the access log and
//! loop detection. The balancer runs in-process, fed from a channel.
//!
//! Tests of timeouts run on paused time: the clock jumps to the next timer
//! only when no task is ready, and a loopback socket's data is ready as soon
//! as it was written, so the instants measured are the timeouts themselves.

#[path = "support/http.rs"]
mod http_support;
mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollcall::balancer::access_log::{AccessLog, LogFormat};
use rollcall::protocol::{Instance, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use http_support::HttpBackend;
use support::balancer::{exchange, read_to_close, status, TestBalancer};
use support::eventually;

const DEADLINE: Duration = Duration::from_secs(5);

impl TestBalancer {
    /// Routes `service` to instances at `ports` and waits until applied.
    async fn route_to(&self, service: &str, ports: &[u16]) {
        let instances = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                Instance::new(service, format!("{service}-{}", i + 1), "127.0.0.1", *port)
            })
            .collect();
        let revision = self.applied.borrow().revision(service) + 1;
        self.publish(Snapshot {
            service: service.into(),
            revision,
            instances,
        })
        .await;
    }
}

/// Reads until the peer closes; how long that took.
async fn closed_after(stream: &mut TcpStream, since: Instant) -> Duration {
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return since.elapsed(),
            Ok(_) => {}
        }
    }
}

/// A get through the balancer that must answer 200 from `expected`.
async fn must_serve(edge: &TestBalancer, expected: &str) {
    let answer = exchange(
        edge.addr,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(answer.ends_with(expected), "{answer}");
}

/// A backend on raw TCP that reads what it is sent and answers what
/// `answer` says after the first read, then holds the connection open.
async fn raw_backend(answer: &'static [u8]) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        let mut held = tokio::task::JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            held.spawn(async move {
                let mut buffer = [0u8; 4096];
                if stream.read(&mut buffer).await.unwrap_or(0) > 0 {
                    let _ = stream.write_all(answer).await;
                }
                while stream.read(&mut buffer).await.unwrap_or(0) > 0 {}
                std::future::pending::<()>().await;
            });
        }
    });
    (port, task)
}

/// A balancer with these header and idle timeouts, routing `web` to one
/// backend (returned to be kept alive).
async fn timed_edge(header: Duration, idle: Duration) -> (HttpBackend, TestBalancer) {
    let web = HttpBackend::start("web-1").await;
    let edge = TestBalancer::start_with(&["web"], |config| {
        config.limits.header_timeout = header;
        config.limits.idle_timeout = idle;
    })
    .await;
    edge.route_to("web", &[web.port()]).await;
    (web, edge)
}

#[tokio::test(start_paused = true)]
async fn slow_heads_and_idle_connections_close_at_their_timeouts_while_clients_are_served() {
    let (_web, edge) = timed_edge(Duration::from_secs(3), Duration::from_secs(1)).await;
    let started = Instant::now();

    // Slowloris: a header line every 500 ms, never the end of the head.
    let mut slow = TcpStream::connect(edge.addr).await.expect("connect");
    let slowloris = tokio::spawn(async move {
        slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .expect("write");
        let mut buffer = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_millis(500), slow.read(&mut buffer)).await {
                Ok(Ok(0) | Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => panic!("a partial head got an answer"),
                Err(_) => {
                    let _ = slow.write_all(b"X-Slow: 1\r\n").await;
                }
            }
        }
    });
    // Silent from the start; and silent after one answered request.
    let mut silent = TcpStream::connect(edge.addr).await.expect("connect");
    let mut kept = TcpStream::connect(edge.addr).await.expect("connect");
    kept.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 512];
    let read = kept.read(&mut head).await.expect("answer");
    assert!(head[..read].starts_with(b"HTTP/1.1 200"));
    let answered = started.elapsed();

    assert_eq!(
        closed_after(&mut silent, started).await,
        Duration::from_secs(1)
    );
    let kept_for = closed_after(&mut kept, started).await - answered;
    assert_eq!(
        kept_for,
        Duration::from_secs(1),
        "idle 1 s after its answer"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !slowloris.is_finished(),
        "the slow head still counts as reading"
    );
    must_serve(&edge, "web-1").await;
    let took = slowloris.await.expect("slowloris task");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_millis(3100),
        "{took:?}"
    );
    assert_eq!(
        edge.metric("rollcall_balancer_header_timeouts_total").await,
        1
    );
    assert_eq!(edge.metric("rollcall_balancer_idle_closed_total").await, 2);
    edge.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_h2_preface_alone_is_closed_at_the_idle_timeout() {
    let edge = TestBalancer::start_with(&["web"], |config| {
        config.limits.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let started = Instant::now();
    let mut h2 = TcpStream::connect(edge.addr).await.expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(closed_after(&mut h2, started).await, Duration::from_secs(2));
    edge.stop().await;
}

/// The header timeout times HTTP/1 heads; between the streams of an h2c
/// connection only the idle timeout counts.
#[tokio::test(start_paused = true)]
async fn an_h2c_connection_between_requests_closes_at_the_idle_timeout() {
    use http_body_util::{BodyExt, Empty};
    let (_web, edge) = timed_edge(Duration::from_secs(1), Duration::from_secs(3)).await;
    let stream = TcpStream::connect(edge.addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(format!("http://{}/", edge.addr))
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 answer");
    assert_eq!(response.status(), hyper::StatusCode::OK);
    response.into_body().collect().await.expect("h2 body");
    let answered = Instant::now();
    let _ = connection.await.expect("connection task");
    assert_eq!(answered.elapsed(), Duration::from_secs(3));
    assert_eq!(
        edge.metric("rollcall_balancer_header_timeouts_total").await,
        0
    );
    assert_eq!(edge.metric("rollcall_balancer_idle_closed_total").await, 1);
    edge.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_declared_but_unsent_body_is_answered_408_without_blaming_the_instance() {
    let web = HttpBackend::start("web-1").await;
    // Reads the whole request before answering, so a stalled streamed body
    // is the only thing that can end the exchange.
    let (sink, _sink_task) = raw_backend(b"").await;
    let edge = TestBalancer::start_with(&["web", "/sink=sink"], |config| {
        config.limits.body_timeout = Duration::from_secs(2);
    })
    .await;
    edge.route_to("web", &[web.port()]).await;
    edge.route_to("sink", &[sink]).await;
    for (request, what) in [
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789",
            "kept body",
        ),
        (
            "POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n0123456789",
            "streamed body",
        ),
    ] {
        let started = Instant::now();
        let answer = exchange(edge.addr, request).await;
        assert_eq!(status(&answer), 408, "{what}: {answer}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_millis(2100),
            "{what}: {took:?}"
        );
    }
    assert_eq!(web.received(), 0, "a body never read whole never leaves");
    assert_eq!(
        edge.metric("rollcall_balancer_body_timeouts_total").await,
        2
    );
    assert_eq!(edge.metric("rollcall_balancer_ejections_total").await, 0);
    edge.stop().await;
}

#[tokio::test]
async fn an_instance_answering_408_is_passed_through_and_not_counted_as_a_client_stall() {
    let (web, _task) =
        raw_backend(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 4\r\n\r\nslow").await;
    let edge = TestBalancer::start(&["web"]).await;
    edge.route_to("web", &[web]).await;
    let answer = exchange(
        edge.addr,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 408, "{answer}");
    assert!(
        answer.ends_with("slow"),
        "the instance's own body: {answer}"
    );
    assert_eq!(
        edge.metric("rollcall_balancer_body_timeouts_total").await,
        0
    );
    edge.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stalled_instance_body_is_cut_at_the_upstream_body_timeout() {
    let (stalled, _task) =
        raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789").await;
    let edge = TestBalancer::start_with(&["web"], |config| {
        config.limits.upstream_body_timeout = Duration::from_secs(2);
    })
    .await;
    edge.route_to("web", &[stalled]).await;
    let started = Instant::now();
    let mut client = TcpStream::connect(edge.addr).await.expect("connect");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let text = read_to_close(&mut client).await;
    let took = started.elapsed();
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("0123456789"),
        "{text}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(2100),
        "{took:?}"
    );
    edge.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_connection_cap_holds_and_the_admin_port_answers_at_it() {
    let web = HttpBackend::start("web-1").await;
    let edge = TestBalancer::start_with(&["web"], |config| {
        config.limits.max_connections = 2;
    })
    .await;
    edge.route_to("web", &[web.port()]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(edge.addr).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let mut head = [0u8; 512];
        assert!(stream.read(&mut head).await.expect("answer") > 0);
        held.push(stream);
    }
    // The third waits in the listen queue: connected, never answered.
    let mut third = TcpStream::connect(edge.addr)
        .await
        .expect("the kernel queues it");
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buffer = [0u8; 512];
    let waited = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buffer)).await;
    assert!(waited.is_err(), "served beyond the cap");
    let health = exchange(
        edge.admin,
        "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&health), 200, "{health}");
    drop(held.pop());
    let answer = read_to_close(&mut third).await;
    assert_eq!(status(&answer), 200, "served once a slot is free: {answer}");
    edge.stop().await;
}

/// A `Write` the test can read back.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lines").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    async fn wait(&self, count: usize) -> Vec<String> {
        eventually("access-log lines", DEADLINE, || async {
            let text = String::from_utf8_lossy(&self.0.lock().expect("lines")).into_owned();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            (lines.len() >= count).then_some(lines)
        })
        .await
    }
}

#[tokio::test]
async fn the_access_log_writes_one_line_per_request_as_text_or_json() {
    let web = HttpBackend::start("web-1").await;
    for format in [LogFormat::Text, LogFormat::Json] {
        let lines = Lines::default();
        let edge = TestBalancer::start_with(&["web", "/none=none"], |config| {
            config.access_log = Some(AccessLog::new(format, lines.clone()));
        })
        .await;
        edge.route_to("web", &[web.port()]).await;
        must_serve(&edge, "web-1").await;
        let answer = exchange(
            edge.addr,
            "GET /none?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&answer), 503);
        let logged = lines.wait(2).await;
        assert_eq!(logged.len(), 2, "{logged:?}");
        match format {
            LogFormat::Text => {
                let fields: Vec<&str> = logged[0].split(' ').collect();
                assert_eq!(fields[2..6], ["\"GET", "/\"", "200", "5"], "{logged:?}");
                assert_eq!(fields[7..], ["web", "web-1", "0"], "{logged:?}");
                let fields: Vec<&str> = logged[1].split(' ').collect();
                assert_eq!(fields[3..5], ["/none?x=1\"", "503"], "{logged:?}");
                assert_eq!(fields[7..], ["none", "-", "0"], "{logged:?}");
            }
            LogFormat::Json => {
                let first: serde_json::Value = serde_json::from_str(&logged[0]).expect("JSON");
                assert_eq!(first["method"], "GET");
                assert_eq!(first["path"], "/");
                assert_eq!(first["status"], 200);
                assert_eq!(first["bytes"], 5);
                assert_eq!(first["service"], "web");
                assert_eq!(first["instance"], "web-1");
                assert_eq!(first["retries"], 0);
                assert!(first["duration_ms"].as_f64().is_some(), "{first}");
                assert!(first["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("127.0.0.1:")));
                let second: serde_json::Value = serde_json::from_str(&logged[1]).expect("JSON");
                assert_eq!(second["status"], 503);
                assert_eq!(second["instance"], serde_json::Value::Null);
            }
        }
        edge.stop().await;
    }
}

#[tokio::test]
async fn strict_answers_for_hosts_absolute_form_and_malformed_requests() {
    let web = HttpBackend::start("web-1").await;
    let api = HttpBackend::start("api-1").await;
    let edge = TestBalancer::start_with(&["web.test=web", "api.test=api"], |_| {}).await;
    edge.route_to("web", &[web.port()]).await;
    edge.route_to("api", &[api.port()]).await;
    let cases = [
        (
            "GET / HTTP/1.1\r\nHost: web.test\r\nHost: api.test\r\n",
            400,
            "more than one Host",
        ),
        ("GET / HTTP/1.1\r\n", 400, "needs a Host"),
        ("GET / HTTP/1.0\r\nHost: web.test\r\n", 200, "web-1"),
        (
            "GET http://api.test/x HTTP/1.1\r\nHost: web.test\r\n",
            200,
            "api-1",
        ),
        ("GET / HTTP/1.1\r\nHost web.test\r\n", 400, ""),
    ];
    for (head, expected, needle) in cases {
        let answer = exchange(edge.addr, &format!("{head}Connection: close\r\n\r\n")).await;
        assert_eq!(status(&answer), expected, "{head:?}: {answer}");
        assert!(answer.contains(needle), "{head:?}: {answer}");
    }
    assert_eq!(
        web.received() + api.received(),
        2,
        "refused requests never leave"
    );
    assert_eq!(
        edge.metric("rollcall_balancer_hyper_answers_total").await,
        1
    );
    assert_eq!(
        edge.metric("rollcall_balancer_requests_total{class=\"4xx\"}")
            .await,
        2,
        "hyper's own 400 is counted apart from ours"
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_bad_chunked_body_is_the_clients_400_and_an_abort_is_no_instance_failure() {
    let web = HttpBackend::start("web-1").await;
    let (sink, _sink_task) = raw_backend(b"").await;
    let edge = TestBalancer::start_with(&["web", "/sink=sink"], |_| {}).await;
    edge.route_to("web", &[web.port()]).await;
    edge.route_to("sink", &[sink]).await;
    let answer = exchange(
        edge.addr,
        "POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc\r\nZZ\r\n",
    )
    .await;
    assert_eq!(status(&answer), 400, "{answer}");

    let mut leaving = TcpStream::connect(edge.addr).await.expect("connect");
    leaving
        .write_all(b"GET /slow?ms=60000 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    eventually("the request to reach the instance", DEADLINE, || async {
        (web.received() == 1).then_some(())
    })
    .await;
    drop(leaving);
    eventually("the abort to be counted", DEADLINE, || async {
        (edge.metric("rollcall_balancer_client_aborts_total").await == 1).then_some(())
    })
    .await;
    assert_eq!(
        edge.metric("rollcall_balancer_requests_total{class=\"5xx\"}")
            .await,
        0
    );
    assert_eq!(edge.metric("rollcall_balancer_ejections_total").await, 0);
    must_serve(&edge, "web-1").await;
    edge.stop().await;
}

#[tokio::test]
async fn a_self_registered_loop_is_refused_with_508_after_one_hop() {
    let edge = TestBalancer::start_with(&["web"], |_| {}).await;
    edge.route_to("web", &[edge.addr.port()]).await;
    let answer = exchange(
        edge.addr,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 508, "{answer}");
    assert!(
        answer.contains("came back to balancer rollcall-"),
        "{answer}"
    );
    assert_eq!(
        edge.metric("rollcall_balancer_loops_refused_total").await,
        1
    );
    assert_eq!(
        edge.metric("rollcall_balancer_requests_total{class=\"5xx\"}")
            .await,
        2,
        "the refusal, and the first hop passing it on: nothing more"
    );
    edge.stop().await;
}

//! The balancer through real sockets: real HTTP backends on 127.0.0.1:0, the
//! balancer on a real listener, catalog updates fed from a channel.
//!
//! Tests of timeouts run on paused time: the clock jumps to the next timer
//! only when no task is ready, and a loopback socket's data is ready as soon
//! as it was written, so real sockets and paused time mix.

#[path = "support/http.rs"]
mod http_support;
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use rollcall::protocol::{Instance, Snapshot};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use http_support::{client, get, get_with, must_get, HttpBackend};
use support::balancer::TestBalancer;
use support::eventually;

const DEADLINE: Duration = Duration::from_secs(5);

impl TestBalancer {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        must_get(&self.client, &self.url(path)).await
    }

    async fn catalog(&self) -> serde_json::Value {
        let (status, body) = self.admin("/catalog").await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_str(&body).expect("/catalog is JSON")
    }
}

fn instance(service: &str, backend: &HttpBackend) -> Instance {
    Instance::new(service, backend.name.as_str(), "127.0.0.1", backend.port())
}

fn snapshot(service: &str, revision: u64, backends: &[&HttpBackend]) -> Snapshot {
    let mut instances: Vec<Instance> = backends.iter().map(|b| instance(service, b)).collect();
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    Snapshot {
        service: service.into(),
        revision,
        instances,
    }
}

async fn backends(names: &[&str]) -> Vec<HttpBackend> {
    let mut started = Vec::new();
    for name in names {
        started.push(HttpBackend::start(name).await);
    }
    started
}

#[tokio::test]
async fn sequential_requests_rotate_exactly_over_three_instances() {
    let web = backends(&["web-1", "web-2", "web-3"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[2], &web[0], &web[1]]))
        .await;
    let mut seen = Vec::new();
    for _ in 0..9 {
        let (status, body) = lb.get("/").await;
        assert_eq!(status, StatusCode::OK);
        seen.push(body);
    }
    // Each run of 3 reaches each instance once, in id order.
    assert_eq!(
        seen,
        ["web-1", "web-2", "web-3", "web-1", "web-2", "web-3", "web-1", "web-2", "web-3"]
    );
    lb.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;
    for path in ["/", "/empty", "/headers", "/", "/empty"]
        .iter()
        .cycle()
        .take(20)
    {
        let (status, _) = lb.get(path).await;
        assert!(status.is_success(), "{path}: {status}");
    }
    let request = http::Request::head(lb.url("/"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = lb.client.request(request).await.expect("HEAD answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(lb.get("/").await.1, "web-1");
    assert_eq!(web[0].served(), 22);
    assert_eq!(
        web[0].connections(),
        1,
        "sequential requests share one connection"
    );
    lb.stop().await;
}

#[tokio::test]
async fn a_joining_instance_gets_traffic_and_a_removed_one_none() {
    let web = backends(&["web-1", "web-2", "web-3"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0], &web[1]])).await;
    assert_eq!(lb.get("/").await.1, "web-1");

    lb.publish(snapshot("web", 2, &[&web[0], &web[1], &web[2]]))
        .await;
    let next: Vec<String> = futures_collect(&lb, 3).await;
    assert_eq!(next, ["web-2", "web-3", "web-1"]);

    lb.publish(snapshot("web", 3, &[&web[0], &web[2]])).await;
    let before = web[1].served();
    let after: Vec<String> = futures_collect(&lb, 10).await;
    assert!(after.iter().all(|b| b != "web-2"), "{after:?}");
    assert_eq!(
        web[1].served(),
        before,
        "a removed instance gets no request"
    );

    // Stale revisions never reach the balancer: the feed drops and counts
    // them (tests/subscription.rs), and /metrics shows the feed's count.
    assert_eq!(
        lb.metric("rollcall_balancer_catalog_updates_total{result=\"stale\"}")
            .await,
        0
    );
    lb.stop().await;
}

async fn futures_collect(lb: &TestBalancer, n: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    for _ in 0..n {
        let (status, body) = lb.get("/").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        bodies.push(body);
    }
    bodies
}

#[tokio::test]
async fn a_killed_instance_costs_no_failed_request_and_is_ejected() {
    let web = backends(&["web-1", "web-2", "web-3"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0], &web[1], &web[2]]))
        .await;
    futures_collect(&lb, 3).await;
    web[1].kill();

    let bodies = futures_collect(&lb, 30).await;
    assert!(bodies.iter().all(|b| b != "web-2"), "{bodies:?}");
    // Once ejected it is skipped: the rest alternate strictly.
    let tail = &bodies[bodies.len() - 4..];
    assert_eq!(tail[0], tail[2]);
    assert_ne!(tail[0], tail[1]);
    assert_eq!(lb.metric("rollcall_balancer_ejections_total").await, 1);
    assert_eq!(lb.metric("rollcall_balancer_retries_total").await, 1);
    assert_eq!(
        lb.metric("rollcall_balancer_upstream_failures_total{kind=\"connect\"}")
            .await,
        1
    );
    let catalog = lb.catalog().await;
    let web2 = &catalog["services"][0]["instances"][1];
    assert_eq!(web2["id"], "web-2");
    assert_eq!(web2["ejected"], true, "{catalog}");
    lb.stop().await;
}

#[tokio::test]
async fn a_connection_closed_before_the_answer_is_retried_only_when_idempotent() {
    let web = backends(&["web-1", "web-2", "web-3"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0], &web[1], &web[2]]))
        .await;
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let (status, body) = lb.get("/crash/web-2").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        bodies.push(body);
    }
    assert_eq!(bodies, ["web-1", "web-3", "web-1"]);
    assert_eq!(lb.metric("rollcall_balancer_retries_total").await, 1);
    // Closing a connection is no proof the instance is gone: no ejection.
    assert_eq!(lb.metric("rollcall_balancer_ejections_total").await, 0);

    // A POST may have done its work before the connection closed: no retry.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let request = http::Request::post(lb.url("/crash/web-2"))
            .body(Full::new(Bytes::from_static(b"order")))
            .expect("request");
        let response = lb.client.request(request).await.expect("answer");
        statuses.push(response.status());
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::OK, StatusCode::BAD_GATEWAY]
    );
    assert_eq!(lb.metric("rollcall_balancer_retries_total").await, 1);
    lb.stop().await;
}

#[tokio::test]
async fn a_connection_reset_before_the_answer_is_retried_when_idempotent() {
    let web = [
        HttpBackend::start("web-1").await,
        HttpBackend::start_resetting("web-2").await,
    ];
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0], &web[1]])).await;
    for _ in 0..2 {
        let (status, body) = lb.get("/crash/web-2").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "web-1");
    }
    assert_eq!(lb.metric("rollcall_balancer_retries_total").await, 1);
    lb.stop().await;
}

#[tokio::test]
async fn no_live_instance_answers_503_naming_the_service() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start(&["web", "/api=api"]).await;
    // Never seen.
    let (status, body) = lb.get("/api/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("\"api\""), "{body}");

    lb.publish(snapshot("web", 1, &[&web[0]])).await;
    assert_eq!(lb.get("/").await.0, StatusCode::OK);
    lb.publish(snapshot("web", 2, &[])).await;
    let (status, body) = lb.get("/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("\"web\""), "{body}");
    assert!(
        lb.metric("rollcall_balancer_requests_total{class=\"5xx\",answered_by=\"rollcall\"}")
            .await
            >= 2
    );
    lb.stop().await;
}

#[tokio::test]
async fn no_matching_route_answers_404() {
    let lb = TestBalancer::start(&["/api=api", "example.com=site"]).await;
    let (status, body) = lb.get("/other").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("/other"), "{body}");
    assert_eq!(lb.get("/apix").await.0, StatusCode::NOT_FOUND);
    lb.stop().await;
}

#[tokio::test]
async fn no_reachable_instance_answers_502() {
    let dead = backends(&["web-1", "web-2"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&dead[0], &dead[1]])).await;
    for backend in &dead {
        backend.kill();
    }
    let (status, body) = lb.get("/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("\"web\""), "{body}");
    assert!(body.contains("web-1") && body.contains("web-2"), "{body}");
    assert_eq!(lb.metric("rollcall_balancer_retries_total").await, 1);
    // Both ejected: the balancer still tries them (fails open), so the
    // answer stays 502, not 503.
    assert_eq!(lb.get("/").await.0, StatusCode::BAD_GATEWAY);
    lb.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_instance_answers_504_after_the_upstream_timeout() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start_with(&["web"], |config| {
        config.upstream_timeout = Duration::from_millis(200);
    })
    .await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;
    let started = Instant::now();
    let (status, body) = lb.get("/slow?ms=3000").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(
        lb.get("/slow?ms=10").await,
        (StatusCode::OK, "web-1".into())
    );
    lb.stop().await;
}

#[tokio::test]
async fn routes_match_host_path_and_longest_prefix() {
    let all = backends(&["web-1", "api-1", "apiv2-1", "site-1"]).await;
    let lb = TestBalancer::start(&["web", "/api=api", "/api/v2=apiv2", "Example.com=site"]).await;
    lb.publish(snapshot("web", 1, &[&all[0]])).await;
    lb.publish(snapshot("api", 1, &[&all[1]])).await;
    lb.publish(snapshot("apiv2", 1, &[&all[2]])).await;
    lb.publish(snapshot("site", 1, &[&all[3]])).await;
    let cases = [
        ("/", None, "web-1"),
        ("/apix", None, "web-1"),
        ("/api", None, "api-1"),
        ("/api/users?x=1", None, "api-1"),
        ("/api/v2/users", None, "apiv2-1"),
        ("/api/v2x", None, "api-1"),
        ("/api/v2", Some("example.COM:8080"), "site-1"),
        ("/", Some("other.org"), "web-1"),
    ];
    for (path, host, expected) in cases {
        let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
        let (status, body) = get_with(&lb.client, &lb.url(path), &headers)
            .await
            .expect("answer");
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, expected),
            "{path} {host:?}"
        );
    }
    lb.stop().await;
}

#[tokio::test]
async fn forwarded_headers_are_added_and_hop_by_hop_ones_dropped() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;
    let (status, body) = get_with(
        &lb.client,
        &lb.url("/headers"),
        &[
            ("host", "shop.example:9000"),
            ("x-forwarded-for", "10.1.2.3"),
            ("x-forwarded-for", "10.4.5.6"),
            ("connection", "x-session-hop"),
            ("x-session-hop", "drop me"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic xyz"),
            ("te", "trailers"),
            ("x-request-id", "abc-123"),
            ("user-agent", "rollcall-test"),
        ],
    )
    .await
    .expect("answer");
    assert_eq!(status, StatusCode::OK);
    let headers: Vec<&str> = body.lines().collect();
    for expected in [
        "x-forwarded-for: 10.1.2.3, 10.4.5.6, 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: shop.example:9000",
        "host: shop.example:9000",
        "x-request-id: abc-123",
        "user-agent: rollcall-test",
    ] {
        assert!(
            headers.contains(&expected),
            "missing {expected:?} in {headers:?}"
        );
    }
    for dropped in ["x-session-hop", "keep-alive", "proxy-authorization", "te:"] {
        assert!(
            !headers.iter().any(|h| h.starts_with(dropped)),
            "{dropped} was forwarded: {headers:?}"
        );
    }
    lb.stop().await;
}

/// A body of `len` bytes in 64 KiB chunks, deterministic, with its hash.
fn generated_body(
    len: usize,
) -> (
    impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>>,
    Vec<u8>,
) {
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let chunk = Bytes::from(chunk);
    let count = len / chunk.len();
    let mut hasher = Sha256::new();
    for _ in 0..count {
        hasher.update(&chunk);
    }
    let stream = futures::stream::iter((0..count).map(move |_| Ok(Frame::data(chunk.clone()))));
    (stream, hasher.finalize().to_vec())
}

#[tokio::test]
async fn a_large_body_streams_both_ways() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;

    let (stream, sent_hash) = generated_body(32 * 1024 * 1024);
    let request = http::Request::post(lb.url("/echo"))
        .body(StreamBody::new(stream))
        .expect("request");
    let streaming_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<StreamBody<_>>();
    let response = streaming_client.request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut hasher = Sha256::new();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            received += data.len();
            hasher.update(&data);
        }
    }
    assert_eq!(received, 32 * 1024 * 1024);
    assert_eq!(hasher.finalize().to_vec(), sent_hash);
    lb.stop().await;
}

#[tokio::test]
async fn bodies_stream_without_waiting_for_their_end() {
    // The client sends its second chunk only after the first came back: a
    // proxy that buffered the request or the response whole would hang.
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;

    let (sender, receiver) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let request = http::Request::post(lb.url("/echo"))
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        ))
        .expect("request");
    let streaming_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<StreamBody<_>>();
    sender
        .send(Ok(Frame::data(Bytes::from_static(b"ping-1"))))
        .await
        .expect("send first chunk");
    let response = tokio::time::timeout(DEADLINE, streaming_client.request(request))
        .await
        .expect("response head before the request body ended")
        .expect("response");
    let mut body = response.into_body();
    for round in 1..=3 {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .unwrap_or_else(|_| {
                panic!("echo of chunk {round} did not come back while the request was open")
            })
            .expect("a frame")
            .expect("frame ok");
        assert_eq!(
            frame.into_data().expect("data"),
            format!("ping-{round}").as_bytes()
        );
        if round < 3 {
            sender
                .send(Ok(Frame::data(Bytes::from(format!("ping-{}", round + 1)))))
                .await
                .expect("send next chunk");
        }
    }
    drop(sender);
    lb.stop().await;
}

#[tokio::test]
async fn membership_churn_under_load_fails_no_request() {
    let stable = backends(&["web-1", "web-2"]).await;
    let lb = Arc::new(TestBalancer::start(&["web"]).await);
    lb.publish(snapshot("web", 1, &[&stable[0], &stable[1]]))
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (lb, stop, ok) = (lb.clone(), stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let client = client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match get(&client, &lb.url("/")).await {
                    Ok((StatusCode::OK, _)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{other:?}")),
                }
            }
            failures
        }));
    }

    // Every 100 ms an instance joins (started first, then announced) or
    // leaves (removed from the set, then killed at once, like a process
    // that exits right after deregistering).
    let mut revision = 1;
    let mut extra: Option<HttpBackend> = None;
    for round in 0..24 {
        revision += 1;
        match extra.take() {
            None => {
                let joining = HttpBackend::start(&format!("web-x{round}")).await;
                lb.publish(snapshot(
                    "web",
                    revision,
                    &[&stable[0], &stable[1], &joining],
                ))
                .await;
                extra = Some(joining);
            }
            Some(leaving) => {
                lb.publish(snapshot("web", revision, &[&stable[0], &stable[1]]))
                    .await;
                leaving.kill();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.expect("client task"));
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 500,
        "only {} requests",
        ok.load(Ordering::Relaxed)
    );
    match Arc::try_unwrap(lb) {
        Ok(lb) => lb.stop().await,
        Err(_) => panic!("client tasks still hold the balancer"),
    }
}

/// Sends `GET path` in the background and returns once `backend` has it.
async fn send_in_flight(
    lb: &TestBalancer,
    backend: &HttpBackend,
    path: &str,
) -> tokio::task::JoinHandle<Result<(StatusCode, String), String>> {
    let url = lb.url(path);
    let in_flight = tokio::spawn(async move { get(&client(), &url).await });
    eventually("the request to reach the backend", DEADLINE, || async {
        (backend.received() > 0).then_some(())
    })
    .await;
    in_flight
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_an_in_flight_request_then_stops_accepting() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;
    let in_flight = send_in_flight(&lb, &web[0], "/slow?ms=400").await;
    let addr = lb.addr;
    lb.stop().await;
    let answer = in_flight
        .await
        .expect("task")
        .expect("the in-flight request completes");
    assert_eq!(answer, (StatusCode::OK, "web-1".to_owned()));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test]
async fn each_worker_serves_the_address_with_connections_of_its_own() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start_workers(&["web"], 2).await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;
    // A client connection per request: the kernel spreads them over the
    // two workers' sockets (both get some, but for odds of 2 in 2^40).
    for _ in 0..40 {
        let answer = get(&client(), &lb.url("/")).await.expect("answer");
        assert_eq!(answer, (StatusCode::OK, "web-1".to_owned()));
    }
    assert_eq!(web[0].served(), 40);
    assert_eq!(
        web[0].connections(),
        2,
        "each worker reuses one connection of its own"
    );
    lb.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_the_in_flight_requests_of_every_worker() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start_workers(&["web"], 2).await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;
    // On connections of their own, so on both workers (but for odds of 2
    // in 2^16); the worker runtimes keep real time, so the wait is real.
    let in_flight: Vec<_> = (0..16)
        .map(|_| {
            let url = lb.url("/slow?ms=300");
            tokio::spawn(async move { get(&client(), &url).await })
        })
        .collect();
    eventually("every request to reach the backend", DEADLINE, || async {
        (web[0].received() == 16).then_some(())
    })
    .await;
    let addr = lb.addr;
    lb.stop().await;
    for request in in_flight {
        let answer = request.await.expect("task").expect("completes");
        assert_eq!(answer, (StatusCode::OK, "web-1".to_owned()));
    }
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "every worker's listener is closed after shutdown"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_no_longer_than_the_drain_timeout() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start_with(&["web"], |config| {
        config.drain_timeout = Duration::from_millis(200);
    })
    .await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;
    let in_flight = send_in_flight(&lb, &web[0], "/slow?ms=10000").await;
    let started = Instant::now();
    lb.stop().await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let cut = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .expect("the cut request ends at once")
        .expect("task");
    assert!(
        cut.is_err(),
        "the connection was closed, not answered: {cut:?}"
    );
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    lb.publish(snapshot("web", 1, &[&web[0]])).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    // The client keeps one HTTP/2 connection: the second request is the
    // connection's second stream.
    for _ in 0..2 {
        let (status, body) = must_get(&h2, &lb.url("/headers")).await;
        assert_eq!(status, StatusCode::OK);
        // The backend speaks HTTP/1.1 and still learns the host the client asked for.
        assert!(body.contains(&format!("host: {}", lb.addr)), "{body}");
    }
    lb.stop().await;
}

#[tokio::test]
async fn admin_endpoint_answers() {
    let web = backends(&["web-1"]).await;
    let lb = TestBalancer::start(&["web"]).await;
    assert_eq!(lb.admin("/healthz").await, (StatusCode::OK, "ok\n".into()));
    let (_, metrics) = lb.admin("/metrics").await;
    assert!(
        !metrics.contains("rollcall_balancer_last_contact_age_seconds{"),
        "no age before the first snapshot: {metrics}"
    );
    lb.publish(snapshot("web", 7, &[&web[0]])).await;
    let (_, metrics) = lb.admin("/metrics").await;
    assert!(
        metrics.contains("rollcall_balancer_last_contact_age_seconds{service=\"web\"} "),
        "{metrics}"
    );
    assert_eq!(
        lb.metric("rollcall_balancer_catalog_revision{service=\"web\"}")
            .await,
        7
    );
    lb.get("/").await;
    assert_eq!(
        lb.metric("rollcall_balancer_live_instances{service=\"web\"}")
            .await,
        1
    );
    assert_eq!(
        lb.metric("rollcall_balancer_requests_total{service=\"web\",instance=\"web-1\",class=\"2xx\",answered_by=\"instance\"}")
            .await,
        1
    );
    assert_eq!(
        lb.metric("rollcall_balancer_catalog_updates_total{result=\"applied\"}")
            .await,
        1
    );
    let catalog = lb.catalog().await;
    assert_eq!(catalog["services"][0]["revision"], 7);
    assert_eq!(catalog["services"][0]["instances"][0]["id"], "web-1");
    assert_eq!(catalog["routes"][0], "web");
    assert_eq!(lb.admin("/nope").await.0, StatusCode::NOT_FOUND);
    lb.stop().await;
}

//! Passive health and upgrades through real sockets on 127.0.0.1: bad
//! instances (answering 500 to everything, accepting and never answering,
//! closing without an answer) beside good ones, each ejected after its
//! threshold with clients seeing at most that many failures; the ejection
//! cap; a WebSocket echo through the balancer; CONNECT refused.
//!
//! An ejection lasts 1 s the first time; the requests of a test take a few
//! milliseconds, so a bad instance comes back within a test only on a very
//! slow machine, and the counts are checked against the ejections seen.

#[path = "support/http.rs"]
mod http_support;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::{Applied, Balancer, BalancerConfig, BalancerError};
use rollcall::catalog::Update;
use rollcall::protocol::{Instance, Snapshot};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use http_support::{client, HttpBackend, TestClient};

const DEADLINE: Duration = Duration::from_secs(5);

struct TestBalancer {
    addr: SocketAddr,
    admin: SocketAddr,
    updates: mpsc::UnboundedSender<Update>,
    applied: watch::Receiver<Applied>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), BalancerError>>,
    client: TestClient,
}

impl TestBalancer {
    async fn start(tweak: impl FnOnce(&mut BalancerConfig)) -> TestBalancer {
        let mut config = BalancerConfig::new(Routes::parse(&["web"]).expect("valid routes"));
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = listener.local_addr().expect("proxy address");
        let admin_addr = admin.local_addr().expect("admin address");
        let (updates, receiver) = mpsc::unbounded_channel();
        let (shutdown, stop) = oneshot::channel::<()>();
        let balancer = Balancer::new(config);
        let applied = balancer.applied();
        let task = tokio::spawn(balancer.serve(
            listener,
            Some(admin),
            UnboundedReceiverStream::new(receiver),
            async {
                let _ = stop.await;
            },
        ));
        TestBalancer {
            addr,
            admin: admin_addr,
            updates,
            applied,
            shutdown: Some(shutdown),
            task,
            client: client(),
        }
    }

    /// Routes `web` to `ports` (named `web-1`, `web-2`...) and waits until
    /// the balancer does.
    async fn publish(&self, ports: &[u16]) {
        let instances = ports
            .iter()
            .enumerate()
            .map(|(i, port)| Instance::new("web", format!("web-{}", i + 1), "127.0.0.1", *port))
            .collect();
        let snapshot = Snapshot {
            service: "web".into(),
            revision: 1,
            instances,
        };
        self.updates
            .send(Update::Service(snapshot))
            .expect("balancer is running");
        let mut applied = self.applied.clone();
        tokio::time::timeout(DEADLINE, applied.wait_for(|a| a.revision("web") >= 1))
            .await
            .expect("the balancer applies the snapshot")
            .expect("balancer is running");
    }

    /// The status of `n` sequential requests, with `method`.
    async fn statuses(&self, method: http::Method, n: usize) -> Vec<StatusCode> {
        let mut statuses = Vec::new();
        for _ in 0..n {
            let request = http::Request::builder()
                .method(method.clone())
                .uri(format!("http://{}/", self.addr))
                .body(Full::new(Bytes::from_static(b"order")))
                .expect("request");
            let response = self.client.request(request).await.expect("an answer");
            statuses.push(response.status());
            response.into_body().collect().await.expect("whole body");
        }
        statuses
    }

    async fn metric(&self, name: &str) -> u64 {
        let url = format!("http://{}/metrics", self.admin);
        let (_, body) = http_support::must_get(&self.client, &url).await;
        body.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name:?} in\n{body}"))
    }

    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let result = tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task does not panic");
        result.expect("serve ends without error");
    }
}

const EJECTIONS: &str = "rollcall_balancer_ejections_total";

/// How a bad instance fails every request.
#[derive(Clone, Copy)]
enum Fault {
    /// Answers 500 at once, on kept-alive connections.
    ServerError,
    /// Accepts and reads, never answers.
    Hang,
    /// Reads the request head and closes the connection.
    Close,
}

/// A bad instance on 127.0.0.1, counting the requests (for `ServerError`)
/// or connections (otherwise) it took.
struct BadBackend {
    port: u16,
    taken: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BadBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BadBackend {
    async fn start(fault: Fault) -> BadBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let taken = Arc::new(AtomicUsize::new(0));
        let counter = taken.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(fail(fault, stream, counter.clone()));
            }
        });
        BadBackend { port, taken, task }
    }

    fn taken(&self) -> usize {
        self.taken.load(Ordering::SeqCst)
    }
}

async fn fail(fault: Fault, mut stream: TcpStream, taken: Arc<AtomicUsize>) {
    match fault {
        Fault::ServerError => {
            let service = hyper::service::service_fn(move |_request| {
                taken.fetch_add(1, Ordering::SeqCst);
                let mut response = http::Response::new(Full::new(Bytes::from_static(b"broken")));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                async { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        Fault::Hang => {
            taken.fetch_add(1, Ordering::SeqCst);
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        }
        Fault::Close => {
            taken.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buffer[..n]),
                }
            }
        }
    }
}

/// `web-1` and `web-3` good, `web-2` failing with `fault`.
async fn one_bad_of_three(
    fault: Fault,
    tweak: impl FnOnce(&mut BalancerConfig),
) -> (TestBalancer, BadBackend, [HttpBackend; 2]) {
    let good = [
        HttpBackend::start("web-1").await,
        HttpBackend::start("web-3").await,
    ];
    let bad = BadBackend::start(fault).await;
    let lb = TestBalancer::start(tweak).await;
    lb.publish(&[good[0].port(), bad.port, good[1].port()])
        .await;
    (lb, bad, good)
}

fn count(statuses: &[StatusCode], status: StatusCode) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

#[tokio::test]
async fn an_instance_answering_500_is_ejected_after_five_and_clients_see_five() {
    let (lb, bad, _good) = one_bad_of_three(Fault::ServerError, |_| {}).await;
    let statuses = lb.statuses(http::Method::GET, 60).await;
    let failures = count(&statuses, StatusCode::INTERNAL_SERVER_ERROR);
    let ejections = lb.metric(EJECTIONS).await as usize;
    assert!(ejections >= 1, "never ejected: {statuses:?}");
    assert_eq!(failures, bad.taken());
    assert!(
        failures <= 5 * ejections,
        "{failures} 500s for {ejections} ejections"
    );
    assert_eq!(count(&statuses, StatusCode::OK), 60 - failures);
    lb.stop().await;
}

#[tokio::test]
async fn an_instance_that_never_answers_is_ejected_after_three_timeouts() {
    let (lb, bad, _good) = one_bad_of_three(Fault::Hang, |config| {
        config.upstream_timeout = Duration::from_millis(200);
    })
    .await;
    // A POST may have been acted on: not resent, the client gets the 504.
    let statuses = lb.statuses(http::Method::POST, 30).await;
    let failures = count(&statuses, StatusCode::GATEWAY_TIMEOUT);
    let ejections = lb.metric(EJECTIONS).await as usize;
    assert!(ejections >= 1, "never ejected: {statuses:?}");
    assert!(failures >= 3, "{statuses:?}");
    assert!(
        failures <= 3 * ejections,
        "{failures} 504s for {ejections} ejections"
    );
    assert_eq!(count(&statuses, StatusCode::OK), 30 - failures);
    assert_eq!(failures, bad.taken());
    lb.stop().await;
}

#[tokio::test]
async fn a_get_to_an_instance_that_never_answers_is_retried_elsewhere() {
    let (lb, bad, _good) = one_bad_of_three(Fault::Hang, |config| {
        config.upstream_timeout = Duration::from_millis(200);
    })
    .await;
    let statuses = lb.statuses(http::Method::GET, 12).await;
    assert_eq!(count(&statuses, StatusCode::OK), 12, "{statuses:?}");
    assert!(bad.taken() >= 3, "the hanging instance had its turns");
    assert_eq!(lb.metric(EJECTIONS).await, 1);
    lb.stop().await;
}

#[tokio::test]
async fn an_instance_that_closes_without_answering_is_ejected_after_three() {
    let (lb, bad, _good) = one_bad_of_three(Fault::Close, |_| {}).await;
    let gets = lb.statuses(http::Method::GET, 9).await;
    assert_eq!(count(&gets, StatusCode::OK), 9, "GETs are resent: {gets:?}");
    assert_eq!(bad.taken(), 3);
    assert_eq!(lb.metric(EJECTIONS).await, 1);
    lb.stop().await;

    let (lb, bad, _good) = one_bad_of_three(Fault::Close, |_| {}).await;
    let posts = lb.statuses(http::Method::POST, 30).await;
    let failures = count(&posts, StatusCode::BAD_GATEWAY);
    let ejections = lb.metric(EJECTIONS).await as usize;
    assert!(ejections >= 1, "never ejected: {posts:?}");
    assert!(
        failures <= 3 * ejections,
        "{failures} 502s for {ejections} ejections"
    );
    assert_eq!(failures, bad.taken());
    lb.stop().await;
}

#[tokio::test]
async fn no_more_than_half_of_the_instances_are_ejected_at_once() {
    let bad = [
        BadBackend::start(Fault::ServerError).await,
        BadBackend::start(Fault::ServerError).await,
        BadBackend::start(Fault::ServerError).await,
        BadBackend::start(Fault::ServerError).await,
    ];
    let lb = TestBalancer::start(|_| {}).await;
    lb.publish(&bad.each_ref().map(|b| b.port)).await;
    let statuses = lb.statuses(http::Method::GET, 40).await;
    assert_eq!(count(&statuses, StatusCode::INTERNAL_SERVER_ERROR), 40);
    assert_eq!(lb.metric(EJECTIONS).await, 2, "half of 4");
    let served: Vec<usize> = bad.each_ref().map(BadBackend::taken).into();
    assert_eq!(served.iter().filter(|&&n| n > 5).count(), 2, "{served:?}");
    lb.stop().await;
}

//! A balancer in process on 127.0.0.1, fed catalog updates through a
//! channel as the catalog feed would, for the tests that drive the proxy.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::{workers, Applied, Balancer, BalancerConfig, BalancerError};
use rollcall::protocol::Snapshot;
use rollcall::subscription::Update;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::http::{client, must_get, TestClient};

const DEADLINE: Duration = Duration::from_secs(5);

/// The proxy and admin listeners, the update channel, and the applied
/// revisions to await.
pub struct TestBalancer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub updates: mpsc::UnboundedSender<Update>,
    pub applied: watch::Receiver<Applied>,
    pub shutdown: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), BalancerError>>,
    pub client: TestClient,
}

impl TestBalancer {
    pub async fn start(routes: &[&str]) -> TestBalancer {
        Self::start_with(routes, |_| {}).await
    }

    /// Starts one with `routes`, its configuration changed by `tweak`.
    pub async fn start_with(
        routes: &[&str],
        tweak: impl FnOnce(&mut BalancerConfig),
    ) -> TestBalancer {
        Self::start_on(routes, 1, tweak).await
    }

    /// Starts one with `routes` served by `workers` runtimes sharing its
    /// address.
    pub async fn start_workers(routes: &[&str], workers: usize) -> TestBalancer {
        Self::start_on(routes, workers, |_| {}).await
    }

    async fn start_on(
        routes: &[&str],
        workers: usize,
        tweak: impl FnOnce(&mut BalancerConfig),
    ) -> TestBalancer {
        let mut config = BalancerConfig::new(Routes::parse(routes).expect("valid routes"));
        tweak(&mut config);
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let (listener, others) = workers::bind(any_port, workers).expect("bind proxy");
        let listener = TcpListener::from_std(listener).expect("proxy listener");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = listener.local_addr().expect("proxy address");
        let admin_addr = admin.local_addr().expect("admin address");
        let (updates, receiver) = mpsc::unbounded_channel();
        let (shutdown, stop) = oneshot::channel::<()>();
        let balancer = Balancer::with_workers(config, others);
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

    /// Sends `snapshot` and waits until the balancer routes on it.
    pub async fn publish(&self, snapshot: Snapshot) {
        let (service, revision) = (snapshot.service.clone(), snapshot.revision);
        self.updates
            .send(Update::Service(snapshot))
            .expect("balancer is running");
        let mut applied = self.applied.clone();
        tokio::time::timeout(
            DEADLINE,
            applied.wait_for(|applied| applied.revision(&service) >= revision),
        )
        .await
        .unwrap_or_else(|_| panic!("{service} never reached revision {revision}"))
        .expect("balancer is running");
    }

    /// GET `path` on the admin port.
    pub async fn admin(&self, path: &str) -> (StatusCode, String) {
        must_get(&self.client, &format!("http://{}{}", self.admin, path)).await
    }

    /// The sum of the `/metrics` samples `selector` picks (see
    /// [`super::metric_sum`]).
    pub async fn metric(&self, selector: &str) -> u64 {
        let (_, body) = self.admin("/metrics").await;
        super::metric_sum(&body, selector)
            .unwrap_or_else(|| panic!("no metric {selector:?} in\n{body}"))
    }

    /// Shuts the balancer down and waits for `serve` to return.
    pub async fn stop(mut self) {
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

/// Sends `request` as raw bytes on a new connection to `addr` and reads
/// until the balancer closes: the whole answer.
pub async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    read_to_close(&mut stream).await
}

/// Everything `stream` receives until the peer closes (at most [`DEADLINE`]).
pub async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code of a raw answer's status line.
pub fn status(answer: &str) -> u16 {
    answer
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

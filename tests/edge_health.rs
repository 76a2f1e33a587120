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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rollcall::balancer::BalancerConfig;
use rollcall::protocol::{Instance, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use http_support::HttpBackend;

use support::balancer::TestBalancer;

const DEADLINE: Duration = Duration::from_secs(5);

impl TestBalancer {
    /// Routes `web` to `ports` (named `web-1`, `web-2`...) and waits until
    /// the balancer does.
    async fn route_to(&self, ports: &[u16]) {
        let instances = ports
            .iter()
            .enumerate()
            .map(|(i, port)| Instance::new("web", format!("web-{}", i + 1), "127.0.0.1", *port))
            .collect();
        self.publish(Snapshot {
            service: "web".into(),
            revision: 1,
            instances,
        })
        .await;
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
    let lb = TestBalancer::start_with(&["web"], tweak).await;
    lb.route_to(&[good[0].port(), bad.port, good[1].port()])
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
    let lb = TestBalancer::start_with(&["web"], |_| {}).await;
    lb.route_to(&bad.each_ref().map(|b| b.port)).await;
    let statuses = lb.statuses(http::Method::GET, 40).await;
    assert_eq!(count(&statuses, StatusCode::INTERNAL_SERVER_ERROR), 40);
    assert_eq!(lb.metric(EJECTIONS).await, 2, "half of 4");
    let served: Vec<usize> = bad.each_ref().map(BadBackend::taken).into();
    assert_eq!(served.iter().filter(|&&n| n > 5).count(), 2, "{served:?}");
    lb.stop().await;
}

/// RFC 6455's own example: the key a client sends and the accept value it
/// must get back (SHA-1 and base64 of the key and the protocol's GUID).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket echo instance: answers the handshake with 101, then sends
/// back each frame's payload unmasked with the same opcode until a close.
async fn websocket_backend() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|mut request: http::Request<_>| async move {
                let key = request.headers().get("sec-websocket-key").cloned();
                let mut response = http::Response::new(Full::new(Bytes::new()));
                if key.as_ref().and_then(|k| k.to_str().ok()) != Some(WS_KEY) {
                    *response.status_mut() = StatusCode::BAD_REQUEST;
                    return Ok::<_, std::convert::Infallible>(response);
                }
                let upgraded = hyper::upgrade::on(&mut request);
                tokio::spawn(async move {
                    if let Ok(upgraded) = upgraded.await {
                        echo_frames(TokioIo::new(upgraded)).await;
                    }
                });
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let headers = response.headers_mut();
                headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
                headers.insert("connection", http::HeaderValue::from_static("Upgrade"));
                headers.insert(
                    "sec-websocket-accept",
                    http::HeaderValue::from_static(WS_ACCEPT),
                );
                Ok(response)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    (port, task)
}

/// One frame: (opcode, payload), unmasked; `None` at the end of the stream.
async fn read_frame(stream: &mut (impl AsyncReadExt + Unpin)) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.ok()?;
    let opcode = head[0] & 0x0f;
    let masked = head[1] & 0x80 != 0;
    // Payloads here stay under 126 bytes: no extended length.
    let length = usize::from(head[1] & 0x7f);
    let mut mask = [0u8; 4];
    if masked {
        stream.read_exact(&mut mask).await.ok()?;
    }
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.ok()?;
    if masked {
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
    }
    Some((opcode, payload))
}

/// A final frame; masked as a client must send it when `mask` is given.
fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![0x80 | opcode, payload.len() as u8];
    match mask {
        Some(mask) => {
            out[1] |= 0x80;
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

async fn echo_frames(mut stream: impl AsyncReadExt + AsyncWriteExt + Unpin) {
    while let Some((opcode, payload)) = read_frame(&mut stream).await {
        if stream
            .write_all(&frame(opcode, &payload, None))
            .await
            .is_err()
            || opcode == 8
        {
            break;
        }
    }
}

#[tokio::test]
async fn a_websocket_echo_passes_through_as_one_request() {
    let (port, backend) = websocket_backend().await;
    let lb = TestBalancer::start_with(&["web"], |_| {}).await;
    lb.route_to(&[port]).await;
    let mut stream = TcpStream::connect(lb.addr).await.expect("connect");
    let handshake = format!(
        "GET /chat HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        lb.addr
    );
    stream
        .write_all(handshake.as_bytes())
        .await
        .expect("send handshake");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = stream.read_u8().await.expect("response head");
        head.push(byte);
    }
    let head = String::from_utf8(head)
        .expect("text head")
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("upgrade: websocket\r\n"), "{head}");
    assert!(head.contains("connection: upgrade\r\n"), "{head}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}\r\n",
            WS_ACCEPT.to_ascii_lowercase()
        )),
        "{head}"
    );

    for text in ["hello through the balancer", "and again"] {
        let sent = frame(1, text.as_bytes(), Some([1, 2, 3, 4]));
        stream.write_all(&sent).await.expect("send a frame");
        let echoed = read_frame(&mut stream).await.expect("an echo");
        assert_eq!(echoed, (1, text.as_bytes().to_vec()));
    }
    stream
        .write_all(&frame(8, b"", Some([9, 9, 9, 9])))
        .await
        .expect("send close");
    assert_eq!(read_frame(&mut stream).await, Some((8, Vec::new())));
    // The instance closed after the close frame; the balancer passes it on.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
    assert_eq!(
        read.expect("closed within the deadline")
            .expect("clean close"),
        0
    );

    assert_eq!(
        lb.metric("rollcall_balancer_requests_total{class=\"1xx\"}")
            .await,
        1
    );
    assert_eq!(
        lb.metric("rollcall_balancer_requests_total{class=\"2xx\"}")
            .await,
        0
    );
    backend.abort();
    lb.stop().await;
}

#[tokio::test]
async fn connect_is_answered_405() {
    let good = HttpBackend::start("web-1").await;
    let lb = TestBalancer::start_with(&["web"], |_| {}).await;
    lb.route_to(&[good.port()]).await;
    let mut stream = TcpStream::connect(lb.addr).await.expect("connect");
    stream
        .write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .expect("send CONNECT");
    let mut answer = vec![0u8; 512];
    let n = stream.read(&mut answer).await.expect("an answer");
    let answer = String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 405 "), "{answer}");
    assert!(answer.contains("\r\nallow: get, "), "{answer}");
    assert_eq!(good.received(), 0, "nothing reached the instance");
    lb.stop().await;
}

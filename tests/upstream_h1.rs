//! The balancer's HTTP/1.1 client side against instances that write exact
//! bytes, through raw TCP sockets on 127.0.0.1: responses that would let an
//! instance smuggle a second response are refused (502, counted as broken,
//! the answer naming why), bodies end where their framing says, and a
//! connection is only reused when its response ended cleanly.

#[path = "support/http.rs"]
mod http_support;
mod support;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollcall::protocol::{Instance, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::balancer::{exchange, status, TestBalancer};

const DEADLINE: Duration = Duration::from_secs(5);
const BROKEN: &str = "rollcall_balancer_upstream_failures_total{kind=\"broken\"}";

/// What the instance does with one request.
struct Answer {
    bytes: Vec<u8>,
    /// Close the connection after writing.
    close: bool,
    /// Written this many bytes at a time, each sent on its own (no Nagle),
    /// so the proxy reads the head in pieces; 0 for all at once.
    piece: usize,
}

fn answer(bytes: &[u8]) -> Answer {
    Answer {
        bytes: bytes.to_vec(),
        close: false,
        piece: 0,
    }
}

fn answer_then_close(bytes: &[u8]) -> Answer {
    Answer {
        close: true,
        ..answer(bytes)
    }
}

fn answer_in_pieces(bytes: &[u8], piece: usize) -> Answer {
    Answer {
        piece,
        ..answer(bytes)
    }
}

/// A backend on raw TCP: each request head read, on whatever connection,
/// is answered with the next of its answers, byte for byte. Counts the
/// connections it accepted.
struct Scripted {
    port: u16,
    connections: Arc<AtomicUsize>,
    /// Connections it closed, told as they close.
    closed: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    async fn start(answers: Vec<Answer>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        let (closing, closed) = tokio::sync::watch::channel(0);
        let closing = Arc::new(closing);
        let task = tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (answers, closing) = (answers.clone(), closing.clone());
                held.spawn(async move {
                    serve(stream, answers).await;
                    closing.send_modify(|closed| *closed += 1);
                });
            }
        });
        Scripted {
            port,
            connections,
            closed,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Waits until it has closed `count` connections.
    async fn closed(&mut self, count: usize) {
        tokio::time::timeout(DEADLINE, self.closed.wait_for(|closed| *closed >= count))
            .await
            .expect("the backend closes in time")
            .expect("the backend runs");
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, answers: Arc<Mutex<VecDeque<Answer>>>) {
    let _ = stream.set_nodelay(true);
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        while !read.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buffer[..n]),
            }
        }
        let end = read
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        read.drain(..end);
        let next = answers.lock().expect("answers").pop_front();
        let Some(next) = next else { return };
        let piece = if next.piece == 0 {
            next.bytes.len()
        } else {
            next.piece
        };
        for bytes in next.bytes.chunks(piece) {
            if stream.write_all(bytes).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        if next.close {
            return;
        }
    }
}

/// A balancer routing `web` to `backend`, its instance named `web-1`.
async fn routed_to(backend: &Scripted) -> TestBalancer {
    let edge = TestBalancer::start(&["web"]).await;
    route(&edge, "web-1", backend.port).await;
    edge
}

/// Routes `web` to the backend at `port`, its instance named `id`.
async fn route(edge: &TestBalancer, id: &str, port: u16) {
    let revision = edge.applied.borrow().revision("web") + 1;
    edge.publish(Snapshot {
        service: "web".into(),
        revision,
        instances: vec![Instance::new("web", id, "127.0.0.1", port)],
    })
    .await;
}

async fn get(edge: &TestBalancer) -> String {
    exchange(
        edge.addr,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// The body of a whole answer, chunks joined.
fn body(answer: &str) -> String {
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_owned();
    }
    let mut joined = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size, 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        joined.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    joined
}

#[tokio::test]
async fn responses_that_could_smuggle_are_refused_502_naming_why_and_counted() {
    let cases: [(&[u8], &str); 6] = [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "response with both Transfer-Encoding and Content-Length",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            "response with differing Content-Length values",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello",
            "invalid Content-Length \"0x5\"",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding \"gzip, chunked\" is not chunked alone",
        ),
        (
            b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            "malformed response head: invalid HTTP version",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Big: 01234567890123456789012345678901234567890123456789\
              01234567890123456789012345678901234567890123456789\r\n\r\n",
            "response head larger than the 100-byte limit",
        ),
    ];
    let edge = TestBalancer::start_with(&["web"], |config| {
        config.limits.upstream_head_limit = 100;
    })
    .await;
    for (broken, (bytes, why)) in cases.into_iter().enumerate() {
        let backend = Scripted::start(vec![answer(bytes)]).await;
        route(&edge, &format!("web-{broken}"), backend.port).await;
        let text = get(&edge).await;
        assert_eq!(status(&text), 502, "{text}");
        assert!(
            text.contains("the instance's response cannot be passed on") && text.contains(why),
            "names {why:?}: {text}"
        );
        let id = format!("web-{broken}");
        let counted = format!(
            "rollcall_balancer_upstream_failures_total{{kind=\"broken\",instance=\"{id}\"}}"
        );
        assert_eq!(edge.metric(&counted).await, 1, "{why}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn a_bad_chunk_or_a_truncated_body_cuts_the_answer_and_the_connection_goes() {
    let backend = Scripted::start(vec![
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"),
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX"),
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n"),
        answer_then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"),
    ])
    .await;
    let edge = routed_to(&backend).await;
    for round in 1..=3 {
        // The answer is cut: at most its head and what came before the
        // fault, never the last chunk.
        let text = get(&edge).await;
        assert!(text.is_empty() || status(&text) == 200, "{text}");
        assert!(!text.ends_with("0\r\n\r\n"), "{text}");
        assert_eq!(
            backend.connections(),
            round,
            "never reused after a bad body"
        );
    }
    let text = get(&edge).await;
    assert!(
        text.is_empty() || body(&text).len() < 10,
        "cut short: {text}"
    );
    let text = get(&edge).await;
    assert_eq!(body(&text), "next", "{text}");
    assert_eq!(backend.connections(), 5);
    edge.stop().await;
}

#[tokio::test]
async fn a_close_delimited_body_is_passed_whole_and_its_connection_not_reused() {
    let backend = Scripted::start(vec![
        answer_then_close(b"HTTP/1.1 200 OK\r\n\r\nuntil the instance closes"),
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"),
    ])
    .await;
    let edge = routed_to(&backend).await;
    let text = get(&edge).await;
    assert_eq!(status(&text), 200, "{text}");
    assert_eq!(body(&text), "until the instance closes");
    let text = get(&edge).await;
    assert_eq!(body(&text), "next");
    assert_eq!(backend.connections(), 2);
    edge.stop().await;
}

#[tokio::test]
async fn bodiless_answers_chunked_trailers_and_lengths_keep_one_connection() {
    let backend = Scripted::start(vec![
        answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
        answer(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n"),
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"),
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n"),
        answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast"),
        answer_in_pieces(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nbyte\r\n5\r\n by b\r\n3\r\nyte\r\n0\r\n\r\n",
            3,
        ),
    ])
    .await;
    let edge = routed_to(&backend).await;
    let text = get(&edge).await;
    assert_eq!(status(&text), 204, "{text}");
    assert!(text.ends_with("\r\n\r\n"), "no body: {text}");
    let text = get(&edge).await;
    assert_eq!(status(&text), 304, "{text}");
    assert!(text.ends_with("\r\n\r\n"), "no body: {text}");
    let text = exchange(
        edge.addr,
        "HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&text), 200, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("content-length: 11"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\n"), "no body: {text}");
    let text = get(&edge).await;
    assert_eq!(body(&text), "hello world", "{text}");
    let text = get(&edge).await;
    assert_eq!(status(&text), 200, "the 100 is skipped: {text}");
    assert_eq!(body(&text), "last");
    let text = get(&edge).await;
    assert_eq!(body(&text), "byte by byte", "read in pieces: {text}");
    assert_eq!(backend.connections(), 1, "every answer ended cleanly");
    assert_eq!(edge.metric(BROKEN).await, 0);
    edge.stop().await;
}

#[tokio::test]
async fn bytes_sent_past_a_response_never_reach_the_next_request() {
    let backend = Scripted::start(vec![
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"),
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"),
    ])
    .await;
    let edge = routed_to(&backend).await;
    let text = get(&edge).await;
    assert_eq!(body(&text), "ok", "{text}");
    let text = get(&edge).await;
    assert_eq!(body(&text), "second", "{text}");
    assert_eq!(
        backend.connections(),
        2,
        "the pipelined connection was dropped"
    );
    edge.stop().await;
}

#[tokio::test]
async fn an_idle_connection_the_instance_closed_is_dropped_at_checkout() {
    let mut backend = Scripted::start(vec![
        // Says nothing of closing, then closes while the connection idles.
        answer_then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"),
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"),
    ])
    .await;
    let edge = routed_to(&backend).await;
    assert_eq!(body(&get(&edge).await), "first");
    backend.closed(1).await;
    let text = get(&edge).await;
    assert_eq!(status(&text), 200, "not a failed attempt: {text}");
    assert_eq!(body(&text), "second");
    assert_eq!(backend.connections(), 2);
    let failures = "rollcall_balancer_upstream_failures_total{instance=\"web-1\"}";
    assert_eq!(
        edge.metric(failures).await,
        0,
        "the stale one was never tried"
    );
    assert_eq!(edge.metric("rollcall_balancer_retries_total").await, 0);
    edge.stop().await;
}

//! The dashboard on the balancer's admin port, over raw TCP sockets on
//! 127.0.0.1: the page and its files, the stream of server-sent events at
//! `/events` (the whole state first, a frame per membership change, figures
//! every second), and how the stream fares against the admin endpoint's
//! timeouts and connection cap. The balancer runs in-process, fed from a
//! channel.
//!
//! On paused time: the clock jumps to the next timer only when no task is
//! ready, so a stats frame comes every second of that clock exactly.

#[path = "support/http.rs"]
mod http_support;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use rollcall::balancer::limits::ADMIN_MAX_CONNECTIONS;
use rollcall::protocol::{Instance, Operator, Snapshot};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use http_support::HttpBackend;
use support::balancer::TestBalancer;

const DEADLINE: Duration = Duration::from_secs(30);

/// One frame of the stream: its `event:` name (a comment's whole line,
/// empty for `retry:`) and its data.
#[derive(Debug)]
struct SseFrame {
    event: String,
    data: Value,
}

/// A client of `/events` on a connection of its own, reading the chunked
/// body frame by frame.
struct Sse {
    reader: BufReader<TcpStream>,
    /// Body bytes read but not yet made into frames.
    pending: String,
}

impl Sse {
    async fn open(admin: SocketAddr) -> Sse {
        let mut stream = TcpStream::connect(admin).await.expect("connect admin");
        stream
            .write_all(b"GET /events HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n")
            .await
            .expect("write");
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: text/event-stream"), "{head}");
        assert!(lower.contains("transfer-encoding: chunked"), "{head}");
        Sse {
            reader,
            pending: String::new(),
        }
    }

    /// The next frame, or `None` once the server ended the stream.
    async fn next(&mut self) -> Option<SseFrame> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let text: String = self.pending.drain(..end + 2).collect();
                return Some(parse_frame(&text));
            }
            let mut size = String::new();
            if self.reader.read_line(&mut size).await.unwrap_or(0) == 0 {
                return None;
            }
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).await.expect("chunk");
            self.pending
                .push_str(std::str::from_utf8(&chunk[..size]).expect("utf-8"));
        }
    }

    /// The next frame that is neither `stats`, a comment nor `retry`;
    /// panics after [`DEADLINE`] without one.
    async fn next_change(&mut self) -> SseFrame {
        let mut skipped = Vec::new();
        let found = tokio::time::timeout(DEADLINE, async {
            loop {
                let frame = self.next().await.expect("the stream goes on");
                let comment = frame.event.starts_with(':');
                if !frame.event.is_empty() && !comment && frame.event != "stats" {
                    return frame;
                }
                skipped.push(frame);
            }
        })
        .await;
        let last = skipped.last();
        found.unwrap_or_else(|_| panic!("no change within {DEADLINE:?}; last frame: {last:?}"))
    }
}

fn parse_frame(text: &str) -> SseFrame {
    let mut frame = SseFrame {
        event: String::new(),
        data: Value::Null,
    };
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("event: ") {
            frame.event = name.to_owned();
        } else if line.starts_with(':') {
            frame.event = line.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            frame.data = serde_json::from_str(data).expect("data is JSON");
        }
    }
    frame
}

/// `(instance, kind)` of each event in a frame.
fn kinds(frame: &SseFrame) -> Vec<(String, String)> {
    frame.data["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            let field = |name: &str| e[name].as_str().expect("string").to_owned();
            (field("instance"), field("kind"))
        })
        .collect()
}

/// `(id, state)` of the instances of the first service in a frame.
fn instances(frame: &SseFrame) -> Vec<(String, String)> {
    frame.data["services"][0]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            let field = |name: &str| i[name].as_str().expect("string").to_owned();
            (field("id"), field("state"))
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn snapshot(revision: u64, instances: Vec<Instance>) -> Snapshot {
    Snapshot {
        service: "web".into(),
        revision,
        instances,
    }
}

fn instance(id: &str, port: u16) -> Instance {
    Instance::new("web", id, "127.0.0.1", port)
}

fn drained(id: &str, port: u16) -> Instance {
    let mut instance = instance(id, port);
    instance.weight = 0;
    instance.operator = Some(Operator {
        drain: true,
        weight: None,
        own_weight: 1,
        by: "ops".into(),
        at_ms: 0,
    });
    instance
}

#[tokio::test(start_paused = true)]
async fn a_page_gets_the_state_first_then_each_change_and_a_reconnect_starts_from_the_state() {
    let edge = TestBalancer::start(&["web"]).await;
    edge.publish(snapshot(
        1,
        vec![instance("w1", 5001), instance("w2", 5002)],
    ))
    .await;
    let mut page = Sse::open(edge.admin).await;
    let state = page.next_change().await;
    assert_eq!(state.event, "state");
    assert_eq!(instances(&state), pairs(&[("w1", "live"), ("w2", "live")]));
    assert_eq!(kinds(&state), pairs(&[("w1", "joined"), ("w2", "joined")]));

    let three = vec![
        instance("w1", 5001),
        instance("w2", 5002),
        instance("w3", 5003),
    ];
    edge.publish(snapshot(2, three)).await;
    let change = page.next_change().await;
    assert_eq!(change.event, "change");
    assert_eq!(kinds(&change), pairs(&[("w3", "joined")]));
    assert_eq!(instances(&change).len(), 3);

    edge.publish(snapshot(3, vec![drained("w2", 5002), instance("w3", 5003)]))
        .await;
    let change = page.next_change().await;
    let mut seen = kinds(&change);
    seen.sort();
    assert_eq!(seen, pairs(&[("w1", "left"), ("w2", "drained")]));
    assert_eq!(
        instances(&change),
        pairs(&[("w2", "draining"), ("w3", "live")])
    );
    assert_eq!(change.data["services"][0]["instances"][0]["weight"], 0);

    edge.publish(snapshot(
        4,
        vec![instance("w2", 5002), instance("w3", 5003)],
    ))
    .await;
    assert_eq!(kinds(&page.next_change().await), pairs(&[("w2", "back")]));

    // A page that reconnects: everything so far, in order, then the rest.
    let mut again = Sse::open(edge.admin).await;
    let state = again.next_change().await;
    assert_eq!(state.event, "state");
    let all = pairs(&[
        ("w1", "joined"),
        ("w2", "joined"),
        ("w3", "joined"),
        ("w1", "left"),
        ("w2", "drained"),
        ("w2", "back"),
    ]);
    let mut got = kinds(&state);
    got[3..5].sort();
    assert_eq!(got, all);
    let seqs: Vec<u64> = state.data["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);

    edge.stop().await;
    let ended =
        tokio::time::timeout(DEADLINE, async { while page.next().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the stream ends when the balancer stops");
}

#[tokio::test(start_paused = true)]
async fn a_quiet_stream_sends_keep_alives_and_outlives_the_admin_idle_timeout() {
    let edge = TestBalancer::start_with(&["web"], |config| {
        config.limits.idle_timeout = Duration::from_secs(1);
        config.dashboard.keepalive = Duration::from_secs(3);
    })
    .await;
    edge.publish(snapshot(1, vec![instance("w1", 5001)])).await;
    let mut page = Sse::open(edge.admin).await;
    assert_eq!(page.next_change().await.event, "state");
    let started = Instant::now();
    let mut idle = TcpStream::connect(edge.admin).await.expect("connect");
    let closed = tokio::spawn(async move {
        let mut buffer = [0u8; 64];
        while idle.read(&mut buffer).await.unwrap_or(0) > 0 {}
        started.elapsed()
    });

    // No traffic, so no figure changes: only keep-alive comments, one per
    // 3 s of silence, on a connection idle far past the 1 s idle timeout.
    let mut comments_at = Vec::new();
    while comments_at.len() < 3 {
        let frame = page.next().await.expect("the stream goes on");
        assert_eq!(frame.event, ": keep-alive", "only comments: {frame:?}");
        comments_at.push(started.elapsed().as_secs());
    }
    assert_eq!(comments_at, [3, 6, 9], "a keep-alive per 3 s of silence");
    assert_eq!(closed.await.expect("idle task"), Duration::from_secs(1));
    edge.publish(snapshot(
        2,
        vec![instance("w1", 5001), instance("w2", 5002)],
    ))
    .await;
    assert_eq!(kinds(&page.next_change().await), pairs(&[("w2", "joined")]));
    edge.stop().await;
}

#[tokio::test(start_paused = true)]
async fn requests_show_as_the_instances_rate_and_p99() {
    let web = HttpBackend::start("w1").await;
    let edge = TestBalancer::start(&["web"]).await;
    edge.publish(snapshot(1, vec![instance("w1", web.port())]))
        .await;
    let mut page = Sse::open(edge.admin).await;
    let url = format!("http://{}/", edge.addr);
    for _ in 0..7 {
        let (status, body) = http_support::must_get(&edge.client, &url).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "w1"));
    }
    // However the requests fell across samples, the rates of one-second
    // samples add up to the requests sent, and a p99 shows once any came.
    let mut total = 0.0;
    let mut p99 = Value::Null;
    let summed = tokio::time::timeout(DEADLINE, async {
        while total < 7.0 {
            let frame = page.next().await.expect("the stream goes on");
            if frame.event == "stats" {
                let w1 = &frame.data["services"][0]["instances"][0];
                total += w1["rate"].as_f64().expect("rate");
                if total > 0.0 {
                    p99 = w1["p99_ms"].clone();
                    assert!(p99.as_f64().is_some_and(|ms| ms >= 0.0), "{frame:?}");
                }
            }
        }
    })
    .await;
    assert!(
        summed.is_ok(),
        "the rates add up to {total} after {DEADLINE:?}"
    );
    assert_eq!(total, 7.0);
    assert!(!p99.is_null());
    let next = loop {
        let frame = page.next().await.expect("the stream goes on");
        if frame.event == "stats" {
            break frame;
        }
    };
    assert_eq!(next.data["services"][0]["instances"][0]["rate"], 0.0);
    edge.stop().await;
}

#[tokio::test]
async fn the_page_and_its_files_are_served_and_bad_requests_are_refused() {
    let edge = TestBalancer::start(&["web"]).await;
    let client = &edge.client;
    for (path, content_type, needle) in [
        ("/", "text/html", "dashboard.js"),
        (
            "/dashboard.js",
            "text/javascript",
            "EventSource(\"events\")",
        ),
        ("/dashboard.css", "text/css", "state-ejected"),
    ] {
        let url = format!("http://{}{path}", edge.admin);
        let request = http::Request::get(&url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let response = client.request(request).await.expect("answer");
        assert_eq!(response.status(), 200, "{path}");
        let got = response.headers()["content-type"].to_str().expect("ascii");
        assert!(got.starts_with(content_type), "{path}: {got}");
        let (_, body) = edge.admin(path).await;
        assert!(body.contains(needle), "{path}: {body}");
    }
    for (request, status) in [
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "405",
        ),
        (
            "POST /events HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "405",
        ),
        ("DELETE /events HTTP/1.1\r\nHost: a\r\n\r\n", "405"),
        ("GET /dashboard.png HTTP/1.1\r\nHost: a\r\n\r\n", "404"),
    ] {
        let mut stream = TcpStream::connect(edge.admin).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = vec![0u8; 1024];
        let read = stream.read(&mut answer).await.expect("answer");
        let answer = String::from_utf8_lossy(&answer[..read]);
        assert_eq!(&answer[9..12], status, "{request:?} → {answer}");
        if status == "405" {
            assert!(
                answer.to_ascii_lowercase().contains("allow: get"),
                "{answer}"
            );
            let method = request.split(' ').next().expect("method");
            assert!(
                answer.contains(&format!("{method} is not served here")),
                "{answer}"
            );
        }
    }
    let refused = "rollcall_balancer_admin_refused_total";
    assert_eq!(
        edge.metric(&format!("{refused}{{status=\"405\"}}")).await,
        3
    );
    assert_eq!(
        edge.metric(&format!("{refused}{{status=\"404\"}}")).await,
        1
    );
    edge.stop().await;
}

#[tokio::test(start_paused = true)]
async fn open_streams_count_against_the_admin_connection_cap() {
    let edge = TestBalancer::start(&["web"]).await;
    let mut pages = Vec::new();
    for _ in 0..ADMIN_MAX_CONNECTIONS {
        let mut page = Sse::open(edge.admin).await;
        assert_eq!(page.next_change().await.event, "state");
        pages.push(page);
    }
    let mut late = TcpStream::connect(edge.admin).await.expect("connect");
    late.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut answer = [0u8; 256];
    let waited = tokio::time::timeout(Duration::from_secs(5), late.read(&mut answer)).await;
    assert!(
        waited.is_err(),
        "no answer while every permit is held by a stream"
    );
    drop(pages.pop());
    let read = tokio::time::timeout(DEADLINE, late.read(&mut answer))
        .await
        .expect("answered once a stream closed")
        .expect("read");
    assert!(answer[..read].starts_with(b"HTTP/1.1 200"));
    edge.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_ejection_shows_when_it_begins_and_when_it_ends() {
    let alive = HttpBackend::start("w1").await;
    let dead = HttpBackend::start("w2").await;
    let dead_port = dead.port();
    dead.kill();
    let edge = TestBalancer::start(&["web"]).await;
    let set = vec![instance("w1", alive.port()), instance("w2", dead_port)];
    edge.publish(snapshot(1, set)).await;
    let mut page = Sse::open(edge.admin).await;
    assert_eq!(page.next_change().await.event, "state");
    let started = Instant::now();
    // Two requests: one of them meets the refused connection, is retried
    // on w1, and w2 is ejected for 1 s.
    let url = format!("http://{}/", edge.addr);
    for _ in 0..2 {
        let (status, body) = http_support::must_get(&edge.client, &url).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "w1"));
    }
    let ejected = page.next_change().await;
    let ejected_at = started.elapsed();
    assert_eq!(kinds(&ejected), pairs(&[("w2", "ejected")]));
    assert_eq!(
        instances(&ejected),
        pairs(&[("w1", "live"), ("w2", "ejected")])
    );
    assert_eq!(
        ejected.data["events"][0]["detail"],
        "for 1s, failure 1 in a row"
    );
    let back = page.next_change().await;
    assert_eq!(kinds(&back), pairs(&[("w2", "back")]));
    assert_eq!(back.data["events"][0]["detail"], "ejection over");
    assert_eq!(
        started.elapsed() - ejected_at,
        Duration::from_secs(1),
        "back the instant its 1 s ejection ends"
    );
    edge.stop().await;
}

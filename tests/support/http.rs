//! The tests' one HTTP backend and one HTTP client: hyper servers in this
//! process on 127.0.0.1:0, each answering with its name, and a hyper client
//! (awaited, or blocking for code that cannot await).
//!
//! Paths a backend serves:
//! - anything else: `<name>` (and header `x-backend: <name>`);
//! - `/headers`: the request's headers, one `name: value` line each, sorted;
//! - `/echo`: the request body streamed back as it arrives;
//! - `/empty`: 204 without a body;
//! - `/slow?ms=N`: its name after N milliseconds;
//! - `/crash/<name>`: the backend called `<name>` closes the connection
//!   without an answer (others answer as usual); a backend started with
//!   [`HttpBackend::start_resetting`] resets it instead, as the kernel does
//!   for a process that died with a request unread.
#![allow(dead_code)] // each test binary uses its own part of the support code

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

type Body = BoxBody<Bytes, hyper::Error>;

/// A running backend. Dropping it (or [`HttpBackend::kill`]) closes the
/// listener and every open connection at once, like a crashed process.
pub struct HttpBackend {
    pub name: String,
    pub addr: SocketAddr,
    served: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpBackend {
    pub async fn start(name: &str) -> HttpBackend {
        Self::start_with(name, false).await
    }

    /// A backend whose connections end with a reset (RST), not a close.
    pub async fn start_resetting(name: &str) -> HttpBackend {
        Self::start_with(name, true).await
    }

    async fn start_with(name: &str, reset: bool) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a backend on 127.0.0.1:0");
        let addr = listener.local_addr().expect("backend address");
        let served = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept(
            listener,
            name.to_owned(),
            served.clone(),
            received.clone(),
            connections.clone(),
            reset,
        ));
        HttpBackend {
            name: name.to_owned(),
            addr,
            served,
            received,
            connections,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests answered so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Requests that reached the backend, answered or not yet.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Closes the listener and all connections, without a word to anyone.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    name: String,
    served: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
    connection_count: Arc<AtomicUsize>,
    reset: bool,
) {
    // Connections live in this set, so aborting the accept task ends them too.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if reset {
            // Linger 0: closing sends RST instead of FIN. (The deprecation is
            // about a lingering close blocking the thread; a zero linger
            // never waits.)
            #[allow(deprecated)]
            stream
                .set_linger(Some(Duration::ZERO))
                .expect("set SO_LINGER on a backend connection");
        }
        connection_count.fetch_add(1, Ordering::SeqCst);
        let name = name.clone();
        let served = served.clone();
        let received = received.clone();
        let service = hyper::service::service_fn(move |request| {
            let name = name.clone();
            let served = served.clone();
            received.fetch_add(1, Ordering::SeqCst);
            async move {
                if request.uri().path() == format!("/crash/{name}") {
                    return Err("crash requested");
                }
                let response = answer(&name, request).await;
                served.fetch_add(1, Ordering::SeqCst);
                Ok(response)
            }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn answer(name: &str, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let mut response = match path.as_str() {
        "/headers" => {
            let mut lines: Vec<String> = request
                .headers()
                .iter()
                .map(|(k, v)| format!("{}: {}", k, v.to_str().unwrap_or("<binary>")))
                .collect();
            lines.sort();
            Response::new(full(lines.join("\n") + "\n"))
        }
        "/echo" => Response::new(request.into_body().boxed()),
        "/empty" => {
            let mut response = Response::new(full(String::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        "/slow" => {
            let ms: u64 = query
                .strip_prefix("ms=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(name.to_owned()))
        }
        _ => Response::new(full(name.to_owned())),
    };
    response.headers_mut().insert(
        "x-backend",
        http::HeaderValue::from_str(name).expect("backend names are header-safe"),
    );
    response
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

/// A keep-alive HTTP/1.1 client for the tests.
pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `url` with extra `headers`; the status and body as text.
pub async fn get_with(
    client: &TestClient,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, String), String> {
    let mut request = Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("build request: {e}"))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("GET {url}: {e:?}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {url} body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub async fn get(client: &TestClient, url: &str) -> Result<(StatusCode, String), String> {
    get_with(client, url, &[]).await
}

/// GET that must succeed at the HTTP level.
pub async fn must_get(client: &TestClient, url: &str) -> (StatusCode, String) {
    match get(client, url).await {
        Ok(answer) => answer,
        Err(error) => panic!("{error}"),
    }
}

/// [`get`] on a connection of its own, for code that cannot await (a plain
/// `#[test]`, a start-up wait): runs on a runtime of its own in a thread of
/// its own, so it works inside an async test too; an error after `limit`.
pub fn get_blocking(url: &str, limit: Duration) -> Result<(StatusCode, String), String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("a runtime for GET {url}: {e}"))?;
                runtime.block_on(async {
                    tokio::time::timeout(limit, get(&client(), url))
                        .await
                        .map_err(|_| format!("GET {url}: no answer within {limit:?}"))?
                })
            })
            .join()
            .expect("the GET thread does not panic")
    })
}

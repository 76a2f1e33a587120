//! Stage 4c, the reverse proxy: a client's request → its route's service →
//! the next instance of that service's set → the instance's response, body
//! streamed both ways.
//!
//! Clients speak HTTP/1.1 or h2c (hyper-util's auto server); instances are
//! reached over kept-alive HTTP/1.1 connections pooled per instance
//! ([`super::upstream`]).
//!
//! Retry: when no connection to an instance can be made (refused, reset or
//! timed out while connecting), the instance is ejected and the request goes
//! to the next one, at most once per live instance. The request has not
//! been built at that point, so any request qualifies, whatever its method
//! or body. Once a request went out on a connection that then closed
//! without an answer, it is sent elsewhere only when it can be sent again:
//! its body is empty or was small enough to keep ([`REPLAY_LIMIT`], read
//! whole before the first attempt), and either it never left or its method
//! is idempotent (GET, HEAD, PUT, DELETE, OPTIONS, TRACE), since the
//! instance may have acted on it.
//!
//! Answers of its own: 404 no route, 503 no live instance (naming the
//! service), 502 no instance reachable, 504 no response head within the
//! upstream timeout.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::rotation::Member;
use super::upstream::{ConnectError, PooledBody, RequestBody};
use super::{BalancerConfig, Shared};

/// The largest request body kept in memory so the request can be retried on
/// another instance. Bigger or unsized bodies stream without retry.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// Body of responses to clients: an instance's stream, or an answer of ours.
pub type ClientBody = Either<PooledBody, Full<Bytes>>;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const HTTP: HeaderValue = HeaderValue::from_static("http");

/// Hop-by-hop headers (RFC 9110 §7.6.1), besides any `proxy-*` and those
/// named in `Connection`.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    KEEP_ALIVE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

struct Proxy {
    shared: Arc<Shared>,
    upstream_timeout: Duration,
    connect_timeout: Duration,
}

/// Accepts on `listener` until `shutdown`; then drains in-flight requests
/// for at most `config.drain_timeout`.
pub(super) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    config: &BalancerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let proxy = Arc::new(Proxy {
        shared,
        upstream_timeout: config.upstream_timeout,
        connect_timeout: config.connect_timeout,
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    // Held here so that connections still open after the drain timeout end
    // with `serve`, not whenever the runtime goes.
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Small responses must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), service(proxy.clone(), peer))
                        .into_owned();
                    let connection = graceful.watch(connection);
                    connections.spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%peer, %error, "client connection ended with an error");
                        }
                    });
                    // Reap finished connections so the set only holds open ones.
                    while connections.try_join_next().is_some() {}
                }
                Err(error) => {
                    // Out of file descriptors, mostly: wait instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("no longer accepting; finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections finished"),
        () = tokio::time::sleep(config.drain_timeout) => {
            tracing::warn!(
                timeout = ?config.drain_timeout,
                open = connections.len(),
                "drain timeout reached; closing the remaining connections"
            );
        }
    }
    connections.shutdown().await;
}

fn service(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ClientBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ClientBody>, Infallible>> + Send,
> + Clone {
    // Formatted once per connection, not per request.
    let client_ip = HeaderValue::from_str(&peer.ip().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    hyper::service::service_fn(move |request| {
        let proxy = proxy.clone();
        let client_ip = client_ip.clone();
        async move {
            let response = proxy.handle(request, client_ip).await;
            proxy.shared.metrics.count_response(response.status());
            Ok(response)
        }
    })
}

/// The request as it goes upstream, minus the instance.
struct Prepared {
    method: http::Method,
    path_and_query: PathAndQuery,
    headers: HeaderMap,
    body: Replay,
}

enum Replay {
    /// Can be sent again: no body, or a small one read whole.
    Bytes(Option<Bytes>),
    /// Streamed once.
    Stream(Option<Incoming>),
}

impl Proxy {
    async fn handle(
        &self,
        request: Request<Incoming>,
        client_ip: HeaderValue,
    ) -> Response<ClientBody> {
        let (parts, body) = request.into_parts();
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()));
        let Some(index) = self.shared.routes.find(host, parts.uri.path()) else {
            return own_answer(
                StatusCode::NOT_FOUND,
                format!(
                    "no route for host {:?} path {:?}\n",
                    host.unwrap_or(""),
                    parts.uri.path()
                ),
            );
        };
        let service = &self.shared.routes.services()[index];
        let rotation = &self.shared.rotations[index];

        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        add_forwarded(&mut headers, &parts.uri, client_ip);
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let body = match replayable(body).await {
            Ok(body) => body,
            Err(error) => {
                return own_answer(
                    StatusCode::BAD_REQUEST,
                    format!("could not read the request body: {error}\n"),
                )
            }
        };
        let mut prepared = Prepared {
            method: parts.method,
            path_and_query,
            headers,
            body,
        };

        let mut tried: Vec<Arc<Member>> = Vec::new();
        loop {
            let set = rotation.load_full();
            let live = set.live_count();
            let Some(member) = pick(&set, &tried) else {
                if tried.is_empty() {
                    return own_answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("service {service:?} has no live instance\n"),
                    );
                }
                return unreachable_answer(service, &tried);
            };
            let connect_timeout = self.connect_timeout;
            let attempt = async {
                let checkout = member
                    .upstream
                    .checkout(connect_timeout)
                    .await
                    .map_err(Failure::Connect)?;
                let request = prepared.request().ok_or(Failure::BodyGone)?;
                checkout.send(request).await.map_err(Failure::Send)
            };
            match tokio::time::timeout(self.upstream_timeout, attempt).await {
                Ok(Ok(response)) => {
                    if member.health.failures > 0 {
                        rotation.recovered(member.id());
                        tracing::info!(service = %service, instance = %member.id(), "instance answers again");
                    }
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    return Response::from_parts(parts, Either::Left(body));
                }
                Ok(Err(Failure::Connect(error))) => {
                    let metrics = &self.shared.metrics;
                    metrics.connect_failures.fetch_add(1, Ordering::Relaxed);
                    let now = tokio::time::Instant::now().into_std();
                    if let Some(length) = rotation.eject(member.id(), now) {
                        metrics.ejections.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            service = %service,
                            instance = %member.id(),
                            %error,
                            ejected_for = ?length,
                            "cannot connect to instance; ejected"
                        );
                    }
                    tried.push(member);
                    // The request was not built yet: any body can still go.
                    if tried.len() >= live {
                        return unreachable_answer(service, &tried);
                    }
                    metrics.retries.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(Failure::Send(error)))
                    if prepared.can_replay() && unanswered(&error, &prepared.method) =>
                {
                    // A kept-alive connection the instance closed as the
                    // request went out: an instance that just exited, or an
                    // idle timeout racing us. Not proof enough to eject;
                    // if the instance is gone, the next connection to it fails
                    // and ejects it.
                    tracing::debug!(
                        service = %service,
                        instance = %member.id(),
                        error = %error_chain(&error),
                        "connection closed before an answer; trying the next instance"
                    );
                    tried.push(member);
                    if tried.len() >= live {
                        return unreachable_answer(service, &tried);
                    }
                    self.shared.metrics.retries.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(failure)) => {
                    let reason = match &failure {
                        Failure::Send(error) => error_chain(error),
                        other => other.to_string(),
                    };
                    tracing::warn!(
                        service = %service,
                        instance = %member.id(),
                        address = %member.authority,
                        %reason,
                        "request to instance failed"
                    );
                    return own_answer(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "instance {:?} of service {service:?} failed: {reason}\n",
                            member.id(),
                        ),
                    );
                }
                Err(_elapsed) => {
                    tracing::warn!(
                        service = %service,
                        instance = %member.id(),
                        timeout = ?self.upstream_timeout,
                        "instance did not answer in time"
                    );
                    return own_answer(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "instance {:?} of service {service:?} did not answer within {:?}\n",
                            member.id(),
                            self.upstream_timeout
                        ),
                    );
                }
            }
        }
    }
}

/// The next member not tried yet for this request.
fn pick(set: &super::rotation::ServiceSet, tried: &[Arc<Member>]) -> Option<Arc<Member>> {
    let now = || tokio::time::Instant::now().into_std();
    // With weights a member appears several times per period, so picks may
    // land on one already tried; one period reaches every member.
    for _ in 0..set.period() {
        let member = set.next(now)?;
        if !tried.iter().any(|t| t.id() == member.id()) {
            return Some(member.clone());
        }
    }
    None
}

/// Whether a send failed without an answer in a way that allows sending the
/// request elsewhere: it never left (the connection closed first), or its
/// kept-alive connection closed before any response byte and the method is
/// idempotent (the instance may have seen it, so only a request that may be
/// repeated qualifies).
fn unanswered(error: &hyper::Error, method: &http::Method) -> bool {
    error.is_canceled()
        || error.is_closed()
        || (error.is_incomplete_message() && method.is_idempotent())
}

/// How one attempt at an instance failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Connect(ConnectError),
    #[error("{0}")]
    Send(hyper::Error),
    #[error("the request body was already sent to another instance")]
    BodyGone,
}

fn unreachable_answer(service: &str, tried: &[Arc<Member>]) -> Response<ClientBody> {
    let ids: Vec<&str> = tried.iter().map(|m| m.id()).collect();
    own_answer(
        StatusCode::BAD_GATEWAY,
        format!("no instance of service {service:?} could be reached (tried {ids:?})\n"),
    )
}

impl Prepared {
    fn can_replay(&self) -> bool {
        matches!(self.body, Replay::Bytes(_))
    }

    /// The request for one attempt, in origin form (`/path?query`): the
    /// connection already goes to the instance. The headers are cloned only
    /// when the request might be sent again.
    fn request(&mut self) -> Option<Request<RequestBody>> {
        let (body, headers) = match &mut self.body {
            Replay::Bytes(bytes) => (
                Either::Right(Full::new(bytes.clone().unwrap_or_default())),
                self.headers.clone(),
            ),
            Replay::Stream(stream) => (
                Either::Left(stream.take()?),
                std::mem::take(&mut self.headers),
            ),
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = Uri::from(self.path_and_query.clone());
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        Some(request)
    }
}

/// Reads a small declared-length body whole so the request can be retried;
/// leaves any other body streaming.
async fn replayable(body: Incoming) -> Result<Replay, hyper::Error> {
    if body.is_end_stream() {
        return Ok(Replay::Bytes(None));
    }
    match body.size_hint().exact() {
        Some(length) if length <= REPLAY_LIMIT => {
            let bytes = body.collect().await?.to_bytes();
            Ok(Replay::Bytes(Some(bytes)))
        }
        _ => Ok(Replay::Stream(Some(body))),
    }
}

/// Removes the headers that describe one connection, not the message.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present costs
    // less than a hash lookup per hop-by-hop name. Headers named in
    // `Connection` only count when `Connection` itself is there.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(connection) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = connection
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if headers
        .keys()
        .any(|name| name.as_str().starts_with("proxy-"))
    {
        let proxy_headers: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy_headers {
            headers.remove(name);
        }
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str().starts_with("proxy-")
}

/// Appends the client to `X-Forwarded-For`; sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host` to what this hop saw, and keeps the `Host` the client
/// asked for (an h2 client sends it as the URI authority).
fn add_forwarded(headers: &mut HeaderMap, uri: &Uri, client_ip: HeaderValue) {
    // Entries, not get-then-insert: one hash lookup per header.
    match headers.entry(X_FORWARDED_FOR) {
        header::Entry::Occupied(mut earlier) => {
            // Several lines count as one comma-separated list, in order.
            let mut joined = Vec::new();
            for value in earlier.iter() {
                joined.extend_from_slice(value.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(client_ip.as_bytes());
            earlier.insert(HeaderValue::from_bytes(&joined).unwrap_or(client_ip));
        }
        header::Entry::Vacant(none) => {
            none.insert(client_ip);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HTTP);
    match headers.get(header::HOST).cloned() {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            if let Some(host) = uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                headers.insert(X_FORWARDED_HOST, host.clone());
                headers.insert(header::HOST, host);
            }
        }
    }
}

fn own_answer(status: StatusCode, body: String) -> Response<ClientBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An error and its causes on one line: hyper's own message leaves the
/// cause (the I/O error) out.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

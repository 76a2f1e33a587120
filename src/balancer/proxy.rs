//! The reverse proxy, the balancer's data path: a client's request → its
//! route's service → the next instance of that service's set → the
//! instance's response, body streamed both ways.
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

use super::rotation::{Member, Rotation, ServiceSet};
use super::upstream::{PooledBody, RequestBody, UpstreamConnectError};
use super::{BalancerConfig, Shared};
use crate::metrics::{Held, UpstreamFailure};

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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // One buffer, one write(2): hyper's vectored path sets up 64 iovecs on
    // every flush, which costs more than copying a response chunk.
    builder.http1().writev(false);
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
                    let proxy = proxy.clone();
                    connections.spawn(async move {
                        let _open = Held::new(&proxy.shared.metrics.open_connections);
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
            let _in_flight = Held::new(&proxy.shared.metrics.in_flight);
            Ok(proxy.handle(request, client_ip).await)
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
    /// Route → prepare → attempts at instances until one answers or the
    /// retry policy ([`next_step`]) says what to answer instead.
    async fn handle(
        &self,
        request: Request<Incoming>,
        client_ip: HeaderValue,
    ) -> Response<ClientBody> {
        let (parts, body) = request.into_parts();
        let index = match self.route(&parts) {
            Ok(index) => index,
            Err(refusal) => {
                self.shared.metrics.own_answer(None, refusal.status);
                return refusal.into_response();
            }
        };
        let response = match prepare(parts, body, client_ip).await {
            Ok(prepared) => self.forward(index, prepared).await,
            Err(refusal) => refusal.into_response(),
        };
        // Instances' answers were counted as they came, with their instance.
        if let Either::Right(_) = response.body() {
            self.shared
                .metrics
                .own_answer(Some(index), response.status());
        }
        response
    }

    /// The index of the service the request goes to, or the 404 answer.
    fn route(&self, parts: &http::request::Parts) -> Result<usize, Refusal> {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()));
        self.shared
            .routes
            .find(host, parts.uri.path())
            .ok_or_else(|| Refusal {
                status: StatusCode::NOT_FOUND,
                text: format!(
                    "no route for host {:?} path {:?}\n",
                    host.unwrap_or(""),
                    parts.uri.path()
                ),
            })
    }

    /// Sends `prepared` to the service's instances in rotation, one after
    /// another while the retry policy allows.
    async fn forward(&self, index: usize, mut prepared: Prepared) -> Response<ClientBody> {
        let service = &self.shared.routes.services()[index];
        let rotation = &self.shared.rotations[index];
        let mut tried: Vec<Arc<Member>> = Vec::new();
        loop {
            let set = rotation.load_full();
            let Some(member) = pick(&set, &tried) else {
                if tried.is_empty() {
                    return own_answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("service {service:?} has no live instance\n"),
                    );
                }
                return unreachable_answer(service, &tried);
            };
            let began = std::time::Instant::now();
            let error = match self.attempt(&member, &mut prepared).await {
                Ok(response) => {
                    if let Some(metrics) = self.shared.metrics.instance(index, member.id()) {
                        metrics.answered(response.status(), began.elapsed());
                    }
                    return answered(rotation, service, &member, response);
                }
                Err(error) => error,
            };
            let failure = error.failure();
            if let Some(metrics) = self.shared.metrics.instance(index, member.id()) {
                metrics.failed(error.kind(failure));
            }
            if failure == Failure::Connect {
                self.eject(rotation, service, &member, &error);
            }
            let next = next_step(failure, prepared.facts(), tried.len() + 1, set.live_count());
            log_failure(service, &member, &error, failure, next);
            tried.push(member);
            match next {
                Next::Retry => {
                    self.shared.metrics.retries.inc();
                }
                Next::AllTried => return unreachable_answer(service, &tried),
                Next::Answer(status) => return failed_answer(status, service, &tried, &error),
            }
        }
    }

    /// One attempt at `member`: a connection, the request, the response
    /// head, all within the upstream timeout.
    async fn attempt(
        &self,
        member: &Member,
        prepared: &mut Prepared,
    ) -> Result<Response<PooledBody>, AttemptError> {
        let attempt = async {
            let checkout = member.upstream.checkout(self.connect_timeout).await?;
            let request = prepared.request().ok_or(AttemptError::BodyGone)?;
            checkout.send(request).await.map_err(AttemptError::Send)
        };
        tokio::time::timeout(self.upstream_timeout, attempt)
            .await
            .unwrap_or(Err(AttemptError::TimedOut(self.upstream_timeout)))
    }

    /// Takes `member` out of rotation after a failed connection.
    fn eject(&self, rotation: &Rotation, service: &str, member: &Member, error: &AttemptError) {
        let now = tokio::time::Instant::now().into_std();
        if let Some(length) = rotation.eject(member.id(), now) {
            self.shared.metrics.ejections.inc();
            tracing::warn!(
                service = %service,
                instance = %member.id(),
                error = %Chain(error),
                ejected_for = ?length,
                "cannot connect to instance; ejected"
            );
        }
    }
}

/// The instance's response, passed on; an instance that had failed before
/// counts as healthy again.
fn answered(
    rotation: &Rotation,
    service: &str,
    member: &Member,
    response: Response<PooledBody>,
) -> Response<ClientBody> {
    if member.health.failures > 0 {
        rotation.recovered(member.id());
        tracing::info!(service = %service, instance = %member.id(), "instance answers again");
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(body))
}

/// Logs a failed attempt at the level its consequence deserves: connection
/// failures were logged when ejecting, a resend is routine, an answer of
/// ours is not.
fn log_failure(service: &str, member: &Member, error: &AttemptError, failure: Failure, next: Next) {
    match (failure, next) {
        (Failure::Connect, Next::Retry | Next::AllTried) => {}
        (_, Next::Retry | Next::AllTried) => {
            // A kept-alive connection the instance closed as the request
            // went out: an instance that just exited, or an idle timeout
            // racing us. Not proof enough to eject; if the instance is gone,
            // the next connection to it fails and ejects it.
            tracing::debug!(
                service = %service,
                instance = %member.id(),
                error = %Chain(error),
                "connection closed before an answer; trying the next instance"
            );
        }
        (_, Next::Answer(_)) => tracing::warn!(
            service = %service,
            instance = %member.id(),
            address = %member.authority,
            error = %Chain(error),
            "request to instance failed"
        ),
    }
}

/// The request's route and headers made ready to go upstream, and its body
/// read whole when small enough to send again; or the 400 answer when the
/// body cannot be read.
async fn prepare(
    parts: http::request::Parts,
    body: Incoming,
    client_ip: HeaderValue,
) -> Result<Prepared, Refusal> {
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    add_forwarded(&mut headers, &parts.uri, client_ip);
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let body = replayable(body).await.map_err(|error| Refusal {
        status: StatusCode::BAD_REQUEST,
        text: format!("could not read the request body: {}\n", Chain(&error)),
    })?;
    Ok(Prepared {
        method: parts.method,
        path_and_query,
        headers,
        body,
    })
}

/// A request refused before any instance saw it: an answer of ours, kept
/// small until it becomes a response.
struct Refusal {
    status: StatusCode,
    text: String,
}

impl Refusal {
    fn into_response(self) -> Response<ClientBody> {
        own_answer(self.status, self.text)
    }
}

/// The next member not tried yet for this request.
fn pick(set: &ServiceSet, tried: &[Arc<Member>]) -> Option<Arc<Member>> {
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

/// How an attempt failed, as far as the retry policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No connection could be had (refused, reset or timed out while
    /// connecting): the request was not built yet.
    Connect,
    /// The connection closed before the request went out.
    NotSent,
    /// The request went out on a kept-alive connection that then closed or
    /// was reset before a whole response head came back: the instance may
    /// have acted on it.
    Unanswered,
    /// Anything else the instance did wrong.
    Broken,
    /// No response head within the upstream timeout.
    TimedOut,
}

/// What the retry policy needs to know of the request.
#[derive(Debug, Clone, Copy)]
struct RequestFacts {
    /// Its method may be repeated (GET, HEAD, PUT, DELETE, OPTIONS, TRACE).
    idempotent: bool,
    /// Its body can be sent again: none, or small enough to have been kept.
    replayable: bool,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Send the request to the next instance not tried yet.
    Retry,
    /// Every live instance has been tried: 502, naming them.
    AllTried,
    /// Answer the client with this status, naming the instance that failed.
    Answer(StatusCode),
}

/// The retry policy, after a `failure` with `tried` instances tried for this
/// request (the failed one included) out of `live`. A request is sent
/// elsewhere only when it can be sent again: it was never built (connect
/// failure), or its body was kept and either it never left or its method
/// is idempotent.
fn next_step(failure: Failure, request: RequestFacts, tried: usize, live: usize) -> Next {
    let may_resend = match failure {
        Failure::Connect => true,
        Failure::NotSent => request.replayable,
        Failure::Unanswered => request.replayable && request.idempotent,
        Failure::Broken => false,
        Failure::TimedOut => return Next::Answer(StatusCode::GATEWAY_TIMEOUT),
    };
    if !may_resend {
        Next::Answer(StatusCode::BAD_GATEWAY)
    } else if tried >= live {
        Next::AllTried
    } else {
        Next::Retry
    }
}

fn was_reset(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = cause.source();
    }
    false
}

/// Why one attempt at an instance failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Connect(#[from] UpstreamConnectError),
    #[error(transparent)]
    Send(hyper::Error),
    #[error("the request body was already sent to another instance")]
    BodyGone,
    #[error("no response head within {0:?}")]
    TimedOut(Duration),
}

impl AttemptError {
    /// How Prometheus is told the attempt failed: `failure` as the retry
    /// policy sees it, with a reset told apart from a quiet close.
    fn kind(&self, failure: Failure) -> UpstreamFailure {
        match (failure, self) {
            (Failure::Connect, _) => UpstreamFailure::connect,
            (Failure::TimedOut, _) => UpstreamFailure::timeout,
            (Failure::NotSent, _) => UpstreamFailure::closed,
            (Failure::Unanswered, AttemptError::Send(error)) if was_reset(error) => {
                UpstreamFailure::reset
            }
            (Failure::Unanswered, _) => UpstreamFailure::closed,
            (Failure::Broken, _) => UpstreamFailure::broken,
        }
    }

    fn failure(&self) -> Failure {
        match self {
            AttemptError::Connect(_) => Failure::Connect,
            AttemptError::Send(error) if error.is_canceled() || error.is_closed() => {
                Failure::NotSent
            }
            // A reset is how a kept-alive connection to an instance that
            // just died usually ends.
            AttemptError::Send(error) if error.is_incomplete_message() || was_reset(error) => {
                Failure::Unanswered
            }
            AttemptError::Send(_) | AttemptError::BodyGone => Failure::Broken,
            AttemptError::TimedOut(_) => Failure::TimedOut,
        }
    }
}

/// An answer of ours for the last instance `tried`.
fn failed_answer(
    status: StatusCode,
    service: &str,
    tried: &[Arc<Member>],
    error: &AttemptError,
) -> Response<ClientBody> {
    let id = tried.last().map(|m| m.id()).unwrap_or_default();
    own_answer(
        status,
        format!(
            "instance {id:?} of service {service:?} failed: {}\n",
            Chain(error)
        ),
    )
}

fn unreachable_answer(service: &str, tried: &[Arc<Member>]) -> Response<ClientBody> {
    let ids: Vec<&str> = tried.iter().map(|m| m.id()).collect();
    own_answer(
        StatusCode::BAD_GATEWAY,
        format!("no instance of service {service:?} could be reached (tried {ids:?})\n"),
    )
}

impl Prepared {
    fn facts(&self) -> RequestFacts {
        RequestFacts {
            idempotent: self.method.is_idempotent(),
            replayable: matches!(self.body, Replay::Bytes(_)),
        }
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

/// An error and its causes on one line, each printed once: errors here
/// keep their cause as `source` and leave it out of their own message.
struct Chain<'e>(&'e dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::routes::Routes;
    use crate::protocol::{Instance, Snapshot};
    use crate::subscription::Update;

    const GET_EMPTY: RequestFacts = RequestFacts {
        idempotent: true,
        replayable: true,
    };
    const POST_SMALL: RequestFacts = RequestFacts {
        idempotent: false,
        replayable: true,
    };
    const PUT_STREAMED: RequestFacts = RequestFacts {
        idempotent: true,
        replayable: false,
    };
    const BAD_GATEWAY: Next = Next::Answer(StatusCode::BAD_GATEWAY);

    #[test]
    fn a_connect_failure_moves_on_whatever_the_request() {
        for request in [GET_EMPTY, POST_SMALL, PUT_STREAMED] {
            assert_eq!(next_step(Failure::Connect, request, 1, 3), Next::Retry);
            assert_eq!(next_step(Failure::Connect, request, 2, 3), Next::Retry);
        }
    }

    #[test]
    fn once_every_live_instance_is_tried_the_answer_names_them() {
        assert_eq!(next_step(Failure::Connect, GET_EMPTY, 3, 3), Next::AllTried);
        assert_eq!(next_step(Failure::NotSent, GET_EMPTY, 2, 2), Next::AllTried);
        assert_eq!(
            next_step(Failure::Unanswered, GET_EMPTY, 1, 1),
            Next::AllTried
        );
        // A set that shrank meanwhile still ends the tries.
        assert_eq!(
            next_step(Failure::Connect, POST_SMALL, 3, 2),
            Next::AllTried
        );
    }

    #[test]
    fn an_unanswered_request_is_resent_only_when_idempotent_and_kept() {
        assert_eq!(next_step(Failure::Unanswered, GET_EMPTY, 1, 3), Next::Retry);
        assert_eq!(
            next_step(Failure::Unanswered, POST_SMALL, 1, 3),
            BAD_GATEWAY
        );
        assert_eq!(
            next_step(Failure::Unanswered, PUT_STREAMED, 1, 3),
            BAD_GATEWAY
        );
    }

    #[test]
    fn a_request_that_never_left_is_resent_when_its_body_was_kept() {
        assert_eq!(next_step(Failure::NotSent, GET_EMPTY, 1, 3), Next::Retry);
        assert_eq!(next_step(Failure::NotSent, POST_SMALL, 1, 3), Next::Retry);
        assert_eq!(next_step(Failure::NotSent, PUT_STREAMED, 1, 3), BAD_GATEWAY);
    }

    #[test]
    fn other_failures_answer_502_and_a_timeout_504_without_retry() {
        for request in [GET_EMPTY, POST_SMALL, PUT_STREAMED] {
            assert_eq!(next_step(Failure::Broken, request, 1, 3), BAD_GATEWAY);
            assert_eq!(
                next_step(Failure::TimedOut, request, 1, 3),
                Next::Answer(StatusCode::GATEWAY_TIMEOUT)
            );
        }
    }

    #[test]
    fn a_connect_error_prints_each_cause_once() {
        let error = AttemptError::from(UpstreamConnectError::Tcp {
            address: "127.0.0.1:9".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(error.failure(), Failure::Connect);
        let text = Chain(&error).to_string();
        assert_eq!(text, "cannot connect to 127.0.0.1:9: connection refused");
    }

    /// Under paused time the clock jumps to the next timer whenever the
    /// runtime waits on sockets; the only timers here are the proxy's own,
    /// so the jump lands on the upstream timeout.
    #[tokio::test(start_paused = true)]
    async fn an_instance_that_never_answers_gets_504_at_the_upstream_timeout() {
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = silent.local_addr().expect("address").port();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
            }
        });
        let shared = Arc::new(Shared::new(Routes::parse(&["web"]).expect("routes")));
        shared.apply(Update::Service(Snapshot {
            service: "web".into(),
            revision: 1,
            instances: vec![Instance::new("web", "web-1", "127.0.0.1", port)],
        }));
        let proxy = Proxy {
            shared: shared.clone(),
            upstream_timeout: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(2),
        };
        let prepared = Prepared {
            method: http::Method::GET,
            path_and_query: PathAndQuery::from_static("/"),
            headers: HeaderMap::new(),
            body: Replay::Bytes(None),
        };
        let started = tokio::time::Instant::now();
        let response = proxy.forward(0, prepared).await;
        let took = started.elapsed();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(shared.metrics.retries.get(), 0, "a timeout is not retried");
        assert_eq!(shared.metrics.ejections.get(), 0);
        holder.abort();
    }

    #[test]
    fn a_timeout_is_classified_as_one() {
        let error = AttemptError::TimedOut(Duration::from_millis(200));
        assert_eq!(error.failure(), Failure::TimedOut);
        assert_eq!(Chain(&error).to_string(), "no response head within 200ms");
    }
}

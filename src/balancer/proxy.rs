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
//! instance may have acted on it. The same holds after no response head
//! came within the upstream timeout.
//!
//! Every attempt's outcome feeds the instance's passive health
//! ([`super::outlier`]): 5xx answers, timeouts and closes without an answer
//! in a row eject it, as a failed connection does at once.
//!
//! Answers of its own: 404 no route, 503 no live instance (naming the
//! service), 502 no instance reachable, 504 no response head within the
//! upstream timeout, 405 for CONNECT (upgrades go to [`super::upgrade`]);
//! and for a client at fault, never counted against an
//! instance: 400 for a duplicate Host, a missing one on HTTP/1.1 or a
//! request body with bad framing, 408 for a request body that paused
//! beyond the body timeout, 508 for a request that already passed through
//! this balancer (its `Via` names it). A client gone before its answer is
//! counted as an abort (nginx's 499). An absolute-form request is routed
//! by its own authority, which also becomes the `Host` sent upstream.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::access_log::{AccessLog, Entry};
use super::limits::{self, Activity, BodyError, Flight, Gate, IdleBody, Quiet, Tracked};
use super::outlier::Outcome;
use super::rotation::{Member, ServiceSet};
use super::tls::{self, Tls};
use super::upgrade;
use super::upstream::{
    self, EncodedHead, Forwarded, PooledBody, RequestBody, RequestHead, UpstreamConnectError,
    UpstreamError,
};
use super::{BalancerConfig, Shared};
use crate::metrics::{BalancerMetrics, Held, UpstreamFailure};
use crate::ErrorChain;

/// The largest request body kept in memory so the request can be retried on
/// another instance. Bigger or unsized bodies stream without retry.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// nginx's code for a client gone before its answer; never sent.
const CLIENT_CLOSED: u16 = 499;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const HTTP: HeaderValue = HeaderValue::from_static("http");
const HTTPS: HeaderValue = HeaderValue::from_static("https");
/// `Via` entries this balancer adds: `1.1 <its name>`.
const VIA_PROTOCOL: &str = "1.1 ";

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
    body_timeout: Duration,
    upstream_body_timeout: Duration,
    /// The largest response head taken from an instance.
    head_limit: usize,
    /// `Via` value this balancer appends: `1.1 <its name>`.
    via: HeaderValue,
    access_log: Option<AccessLog>,
}

/// Accepts on `listener` until `shutdown`, at most
/// `config.limits.max_connections` connections at once; then drains
/// in-flight requests for at most `config.drain_timeout`.
pub(super) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    shared: Arc<Shared>,
    config: &BalancerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let limits = &config.limits;
    let via = HeaderValue::from_str(&format!("{VIA_PROTOCOL}{}", shared.via))
        .unwrap_or_else(|_| HeaderValue::from_static("1.1 rollcall"));
    let proxy = Arc::new(Proxy {
        shared,
        upstream_timeout: config.upstream_timeout,
        connect_timeout: config.connect_timeout,
        body_timeout: limits.body_timeout,
        upstream_body_timeout: limits.upstream_body_timeout,
        head_limit: limits.upstream_head_limit,
        via,
        access_log: config.access_log.clone(),
    });
    let mut builder = limits::server_builder(limits);
    // One buffer, one write(2): hyper's vectored path sets up 64 iovecs on
    // every flush, which costs more than copying a response chunk. The
    // header timeout is each connection's `Activity`'s, not hyper's timer
    // per request.
    builder.http1().writev(false).header_read_timeout(None);
    let mut gate = Gate::new(listener, limits.max_connections, "proxy");
    let graceful = GracefulShutdown::new();
    // Held here so that connections still open after the drain timeout end
    // with `serve`, not whenever the runtime goes.
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            (stream, peer, permit) = gate.accept() => {
                // Small responses must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                let activity = Activity::new();
                let stream = Tracked::new(tls::Stream::new(stream, tls.as_deref()), activity.clone());
                let connection = builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        service(proxy.clone(), peer, tls.is_some(), activity.clone()),
                    )
                    .into_owned();
                let connection = graceful.watch(connection);
                let proxy = proxy.clone();
                let (idle, head) = (limits.idle_timeout, Some(limits.header_timeout));
                connections.spawn(async move {
                    // The permit goes when the connection does.
                    let _permit = permit;
                    let metrics = &proxy.shared.metrics;
                    let _open = Held::new(&metrics.open_connections);
                    let ended = limits::until_quiet(connection, activity.quiet(idle, head)).await;
                    connection_ended(metrics, peer, ended);
                });
                // Reap finished connections so the set only holds open ones.
                while connections.try_join_next().is_some() {}
            },
            () = &mut shutdown => break,
        }
    }
    drop(gate);
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

/// Counts and logs how a client connection ended: by itself, with an
/// error, or closed by the idle or the header timeout.
fn connection_ended(
    metrics: &BalancerMetrics,
    peer: SocketAddr,
    ended: Result<Result<(), Box<dyn std::error::Error + Send + Sync>>, Quiet>,
) {
    match ended {
        Ok(Err(error)) => connection_failed(metrics, peer, &*error),
        Ok(Ok(())) => {}
        Err(Quiet::Idle) => {
            metrics.idle_closed.inc();
            tracing::debug!(%peer, "client connection idle; closed");
        }
        Err(Quiet::HeadLate) => {
            metrics.header_timeouts.inc();
            tracing::debug!(%peer, "request head not whole within the header timeout; closed");
        }
    }
}

/// Counts what a client connection's error says about the client: a head
/// hyper answered itself (400, 414, 431).
fn connection_failed(
    metrics: &BalancerMetrics,
    peer: SocketAddr,
    error: &(dyn std::error::Error + Send + Sync + 'static),
) {
    if let Some(error) = error.downcast_ref::<hyper::Error>() {
        if error.is_parse() && !error.is_parse_version_h2() {
            let status = if error.is_parse_too_large() {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            metrics.hyper_answer(status);
        }
    }
    tracing::debug!(%peer, %error, "client connection ended with an error");
}

fn service(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    secure: bool,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ClientBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ClientBody>, Infallible>> + Send,
> + Clone {
    // Formatted once per connection, not per request.
    let client_ip = HeaderValue::from_str(&peer.ip().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    hyper::service::service_fn(move |mut request: Request<Incoming>| {
        tls::mark(&mut request, secure);
        if request.version() == http::Version::HTTP_2 {
            activity.without_heads();
        }
        let proxy = proxy.clone();
        let client_ip = client_ip.clone();
        let flight = activity.begin();
        async move {
            let _in_flight = Held::new(&proxy.shared.metrics.in_flight);
            let mut exchange = Exchange::new(&proxy, peer, &request);
            let mut response = proxy.handle(request, client_ip, &mut exchange).await;
            exchange.answered(response.status());
            response.body_mut().finish_with(flight, exchange.log.take());
            Ok(response)
        }
    })
}

/// One request from its head to its answer; dropped before the answer, it
/// counts (and logs) the client's abort.
struct Exchange<'p> {
    metrics: &'p BalancerMetrics,
    log: Option<Logged>,
    answered: bool,
    /// The number of the service it was routed to, once it was.
    service: Option<usize>,
}

impl<'p> Exchange<'p> {
    fn new(proxy: &'p Proxy, peer: SocketAddr, request: &Request<Incoming>) -> Self {
        let log = proxy.access_log.as_ref().map(|log| Logged {
            log: log.clone(),
            entry: Box::new(Entry::new(peer, request.method(), request.uri())),
            started: std::time::Instant::now(),
        });
        Exchange {
            metrics: &proxy.shared.metrics,
            log,
            answered: false,
            service: None,
        }
    }

    fn entry(&mut self) -> Option<&mut Entry> {
        self.log.as_mut().map(|logged| &mut *logged.entry)
    }

    fn answered(&mut self, status: StatusCode) {
        self.answered = true;
        if let Some(logged) = &mut self.log {
            logged.entry.status = status.as_u16();
        }
        if status.as_u16() == CLIENT_CLOSED {
            self.metrics.client_abort(self.service);
        }
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics.client_abort(self.service);
            if let Some(mut logged) = self.log.take() {
                logged.entry.status = CLIENT_CLOSED;
                logged.write(0);
            }
        }
    }
}

/// An access-log entry waiting for its answer to be sent.
struct Logged {
    log: AccessLog,
    entry: Box<Entry>,
    started: std::time::Instant,
}

impl Logged {
    fn write(mut self, bytes: u64) {
        self.entry.bytes = bytes;
        self.entry.duration = self.started.elapsed();
        self.log.write(&self.entry);
    }
}

/// Body of responses to clients: an instance's stream (cut when it pauses
/// beyond the upstream body timeout), or an answer of ours. It holds its
/// request in flight on the connection, and its access-log entry, until
/// hyper drops it once sent or abandoned.
pub(crate) struct ClientBody {
    inner: Either<IdleBody<PooledBody>, Full<Bytes>>,
    flight: Option<Flight>,
    log: Option<Logged>,
    bytes: u64,
}

impl ClientBody {
    fn upstream(body: PooledBody, limit: Duration) -> Self {
        Self::new(Either::Left(IdleBody::new(body, limit)))
    }

    /// A whole body of rollcall's own (or an instance's, read whole).
    pub(super) fn full(bytes: Bytes) -> Self {
        Self::new(Either::Right(Full::new(bytes)))
    }

    fn new(inner: Either<IdleBody<PooledBody>, Full<Bytes>>) -> Self {
        ClientBody {
            inner,
            flight: None,
            log: None,
            bytes: 0,
        }
    }

    /// Whether rollcall wrote this body, not an instance.
    fn is_own(&self) -> bool {
        matches!(self.inner, Either::Right(_))
    }

    fn finish_with(&mut self, flight: Flight, log: Option<Logged>) {
        self.flight = Some(flight);
        self.log = log;
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(logged) = self.log.take() {
            logged.write(self.bytes);
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Either::Left(upstream) => Pin::new(upstream).poll_frame(cx),
            Either::Right(own) => Pin::new(own).poll_frame(cx).map_err(|never| match never {}),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) if this.log.is_some() => {
                this.bytes += frame.data_ref().map_or(0, |data| data.len() as u64);
            }
            Poll::Ready(Some(Err(error))) => {
                tracing::warn!(error = %ErrorChain(error), "response body from instance cut");
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request as it goes upstream, minus the instance.
struct Prepared {
    method: http::Method,
    head: EncodedHead,
    body: Replay,
}

enum Replay {
    /// Can be sent again: no body, or a small one read whole.
    Bytes(Option<Bytes>),
    /// Streamed once.
    Stream(Option<IdleBody<Incoming>>),
}

impl Proxy {
    /// Route → prepare → attempts at instances until one answers or the
    /// retry policy ([`next_step`]) says what to answer instead.
    async fn handle(
        &self,
        request: Request<Incoming>,
        client_ip: HeaderValue,
        exchange: &mut Exchange<'_>,
    ) -> Response<ClientBody> {
        let (parts, body) = request.into_parts();
        if upgrade::is_connect(&parts) {
            let response = upgrade::connect_refused();
            self.shared.metrics.own_answer(None, response.status());
            return response;
        }
        if let Err(refusal) = self.check_loop(&parts.headers) {
            self.shared.metrics.own_answer(None, refusal.status);
            return refusal.into_response();
        }
        let index = match self.route(&parts) {
            Ok(index) => index,
            Err(refusal) => {
                self.shared.metrics.own_answer(None, refusal.status);
                return refusal.into_response();
            }
        };
        exchange.service = Some(index);
        if let Some(entry) = exchange.entry() {
            entry.service = Some(self.shared.routes.services()[index].clone());
        }
        if upgrade::is_upgrade(&parts) {
            // Counted in `upgrade`, instance answers included.
            let request = Request::from_parts(parts, body);
            let bounds = upgrade::Bounds {
                connect_timeout: self.connect_timeout,
                upstream_timeout: self.upstream_timeout,
                head_limit: self.head_limit,
            };
            return Box::pin(upgrade::forward(
                &self.shared,
                index,
                request,
                client_ip,
                bounds,
            ))
            .await;
        }
        let via = self.via.clone();
        let (method, head, body) = prepare(parts, body, client_ip, via, self.body_timeout);
        let response = match replayable(body).await {
            Ok(body) => {
                let prepared = Prepared { method, head, body };
                self.forward(index, prepared, exchange.entry()).await
            }
            Err(error) => Refusal {
                status: client_fault(&error),
                text: format!("could not read the request body: {}\n", ErrorChain(&error)),
            }
            .into_response(),
        };
        // Instances' answers were counted as they came, with their instance;
        // a client gone (499) was answered by no one.
        // An instance may answer 408 itself; only ours is a client body
        // that stalled.
        let status = response.status();
        if response.body().is_own() && status.as_u16() != CLIENT_CLOSED {
            self.shared.metrics.own_answer(Some(index), status);
            if status == StatusCode::REQUEST_TIMEOUT {
                self.shared.metrics.body_timeouts.inc();
            }
        }
        response
    }

    /// The 508 answer when the request already passed through this
    /// balancer: an instance registered at the balancer's own address
    /// would otherwise send each request round until descriptors run out.
    fn check_loop(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        // A pass over the few headers costs less than a hash lookup.
        let mut seen = headers.iter().filter(|(name, _)| *name == header::VIA);
        if seen.any(|(_, via)| via.to_str().is_ok_and(|via| via.contains(&self.shared.via))) {
            self.shared.metrics.loops_refused.inc();
            return Err(Refusal {
                status: StatusCode::LOOP_DETECTED,
                text: format!(
                    "request came back to balancer {}: an instance points at the balancer itself\n",
                    self.shared.via
                ),
            });
        }
        Ok(())
    }

    /// The index of the service the request goes to; or the 400 answer for
    /// a bad `Host`, or the 404 answer.
    fn route(&self, parts: &http::request::Parts) -> Result<usize, Refusal> {
        let host = request_host(parts)?;
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
    async fn forward(
        &self,
        index: usize,
        mut prepared: Prepared,
        mut entry: Option<&mut Entry>,
    ) -> Response<ClientBody> {
        let service = &self.shared.routes.services()[index];
        let rotation = &self.shared.rotations[index];
        let mut tried: Vec<Arc<Member>> = Vec::new();
        loop {
            // The set is read, not kept: the member picked is.
            let (picked, live) = {
                let set = rotation.load();
                (pick(&set, &tried), set.live_count())
            };
            let Some(member) = picked else {
                if tried.is_empty() {
                    return own_answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("service {service:?} has no live instance\n"),
                    );
                }
                return unreachable_answer(service, &tried);
            };
            if let Some(entry) = entry.as_deref_mut() {
                entry.instance = Some(member.id().to_owned());
                entry.retries = tried.len() as u32;
            }
            let began = std::time::Instant::now();
            let error = match self.attempt(&member, &mut prepared).await {
                Ok(response) => {
                    let (metrics, status) = (&self.shared.metrics, response.status());
                    if let Some(instance) = member.handles(metrics, index) {
                        instance.answered(status, began.elapsed());
                    }
                    rotation.observe(
                        metrics,
                        service,
                        &member,
                        Outcome::of_status(status),
                        &status,
                    );
                    return answered(response, self.upstream_body_timeout);
                }
                Err(error) => error,
            };
            let failure = error.failure();
            let instance = member.handles(&self.shared.metrics, index);
            if let (Some(instance), Some(kind)) = (instance, error.kind(failure)) {
                instance.failed(kind);
            }
            if let Some(outcome) = failure.outcome() {
                let metrics = &self.shared.metrics;
                rotation.observe(metrics, service, &member, outcome, &ErrorChain(&error));
            }
            let next = next_step(failure, prepared.facts(), tried.len() + 1, live);
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

    /// One attempt at `member`: a connection (within the connect timeout),
    /// the request, the response head (within the upstream timeout of the
    /// request going out).
    async fn attempt(
        &self,
        member: &Member,
        prepared: &mut Prepared,
    ) -> Result<Response<PooledBody>, AttemptError> {
        let checkout = member.upstream.checkout(self.connect_timeout).await?;
        let body = prepared.body().ok_or(AttemptError::BodyGone)?;
        let sent = checkout.send(&prepared.head, body, self.head_limit, self.upstream_timeout);
        sent.await.map_err(|error| match error {
            UpstreamError::TimedOut(timeout) => AttemptError::TimedOut(timeout),
            error => AttemptError::Send(error),
        })
    }
}

/// The instance's response, passed on.
fn answered(response: Response<PooledBody>, body_timeout: Duration) -> Response<ClientBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ClientBody::upstream(body, body_timeout))
}

/// Logs a failed attempt at the level its consequence deserves: connection
/// failures were logged when ejecting, a resend is routine, an answer of
/// ours is not.
fn log_failure(service: &str, member: &Member, error: &AttemptError, failure: Failure, next: Next) {
    match (failure, next) {
        (Failure::Connect, Next::Retry | Next::AllTried) => {}
        (Failure::Client(status), _) => tracing::debug!(
            service = %service,
            instance = %member.id(),
            error = %ErrorChain(error),
            %status,
            "the client's request body failed; not the instance's fault"
        ),
        (_, Next::Retry | Next::AllTried) => {
            // A kept-alive connection the instance closed as the request
            // went out (an instance that just exited, or an idle timeout
            // racing us), or no answer in time. One is not proof enough to
            // eject; passive health counts them in a row.
            tracing::debug!(
                service = %service,
                instance = %member.id(),
                error = %ErrorChain(error),
                "no answer; trying the next instance"
            );
        }
        (_, Next::Answer(_)) => tracing::warn!(
            service = %service,
            instance = %member.id(),
            address = %member.authority,
            error = %ErrorChain(error),
            "request to instance failed"
        ),
    }
}

/// The request's head written out for instances, and its body under the
/// body timeout. The head is written before the body is read and the header
/// map and URI dropped with this call: their bytes are the client
/// connection's read buffer, which hyper can then reuse instead of
/// allocating another. Not `async`: its locals stay out of the request's
/// future, which hyper moves whole.
fn prepare(
    parts: http::request::Parts,
    body: Incoming,
    client_ip: HeaderValue,
    via: HeaderValue,
    body_timeout: Duration,
) -> (http::Method, EncodedHead, IdleBody<Incoming>) {
    let http::request::Parts {
        method,
        uri,
        mut headers,
        extensions,
        ..
    } = parts;
    strip_hop_by_hop(&mut headers);
    let forwarded = forwarded(&uri, &extensions, client_ip, Some(via));
    let body = IdleBody::new(body, body_timeout);
    let length = upstream::stream_length(&body);
    let head = RequestHead {
        method: &method,
        target: uri.path_and_query().map_or("/", PathAndQuery::as_str),
        headers: &headers,
        forwarded: &forwarded,
    }
    .encode(length);
    (method, head, body)
}

/// The host a request is routed by: the URI's own authority when it has
/// one (absolute form, or h2's `:authority`), else its one `Host`. The 400
/// answer for more than one `Host`, an unreadable one, or none on HTTP/1.1
/// (RFC 9112 §3.2).
fn request_host(parts: &http::request::Parts) -> Result<Option<&str>, Refusal> {
    let bad = |text: &str| Refusal {
        status: StatusCode::BAD_REQUEST,
        text: format!("{text}\n"),
    };
    let mut hosts = (parts.headers.iter())
        .filter(|(name, _)| *name == header::HOST)
        .map(|(_, host)| host);
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    if host.is_none() && parts.version == Version::HTTP_11 {
        return Err(bad("an HTTP/1.1 request needs a Host header"));
    }
    let host = match host.map(HeaderValue::to_str).transpose() {
        Ok(host) => host,
        Err(_) => return Err(bad("the Host header is not readable text")),
    };
    Ok(parts.uri.authority().map(|a| a.as_str()).or(host))
}

/// The status for a request body that failed on the client's side: 408
/// when it paused too long, 499 when the client went away mid-body, 400
/// for bad framing.
fn client_fault(error: &BodyError) -> StatusCode {
    match error {
        BodyError::Idle(_) => StatusCode::REQUEST_TIMEOUT,
        BodyError::Read(error) if error.is_incomplete_message() || was_reset(error) => {
            StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST)
        }
        BodyError::Read(_) => StatusCode::BAD_REQUEST,
        // Not the client's: only an instance's body fails this way.
        BodyError::Upstream(_) => StatusCode::BAD_GATEWAY,
    }
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

impl Failure {
    /// What the failure tells of the instance's health, if anything: a
    /// connection closed before the request went out is a pool race, and a
    /// broken exchange may be the client's doing.
    fn outcome(self) -> Option<Outcome> {
        match self {
            Failure::Connect => Some(Outcome::ConnectFailure),
            Failure::Unanswered | Failure::TimedOut => Some(Outcome::GatewayFailure),
            Failure::NotSent | Failure::Broken | Failure::Client(_) => None,
        }
    }
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
    /// The client's request body failed (paused too long, bad framing,
    /// client gone): the client's answer, not the instance's fault.
    Client(StatusCode),
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
/// is idempotent. A timeout ends in 504, whether it was the only try or the
/// last.
fn next_step(failure: Failure, request: RequestFacts, tried: usize, live: usize) -> Next {
    let may_resend = match failure {
        Failure::Connect => true,
        Failure::NotSent => request.replayable,
        Failure::Unanswered | Failure::TimedOut => request.replayable && request.idempotent,
        Failure::Broken => false,
        Failure::Client(status) => return Next::Answer(status),
    };
    if failure == Failure::TimedOut && (!may_resend || tried >= live) {
        Next::Answer(StatusCode::GATEWAY_TIMEOUT)
    } else if !may_resend {
        Next::Answer(StatusCode::BAD_GATEWAY)
    } else if tried >= live {
        Next::AllTried
    } else {
        Next::Retry
    }
}

/// Whether the client's connection was reset under hyper.
fn was_reset(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return upstream::is_reset(io);
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
    Send(UpstreamError),
    #[error("the request body was already sent to another instance")]
    BodyGone,
    #[error("no response head within {0:?}")]
    TimedOut(Duration),
}

impl AttemptError {
    /// How Prometheus is told the attempt failed: `failure` as the retry
    /// policy sees it, with a reset told apart from a quiet close. `None`
    /// when the client's side failed, not the instance.
    fn kind(&self, failure: Failure) -> Option<UpstreamFailure> {
        let kind = match (failure, self) {
            (Failure::Client(_), _) => return None,
            (Failure::Connect, _) => UpstreamFailure::connect,
            (Failure::TimedOut, _) => UpstreamFailure::timeout,
            (Failure::NotSent, _) => UpstreamFailure::closed,
            (Failure::Unanswered, AttemptError::Send(error)) if error.was_reset() => {
                UpstreamFailure::reset
            }
            (Failure::Unanswered, _) => UpstreamFailure::closed,
            (Failure::Broken, _) => UpstreamFailure::broken,
        };
        Some(kind)
    }

    fn failure(&self) -> Failure {
        if let Some(client) = self.client_body_error() {
            return Failure::Client(client_fault(client));
        }
        match self {
            AttemptError::Connect(_) => Failure::Connect,
            AttemptError::Send(UpstreamError::NotSent(_)) => Failure::NotSent,
            // A reset is how a kept-alive connection to an instance that
            // just died usually ends.
            AttemptError::Send(error) if error.is_unanswered() => Failure::Unanswered,
            AttemptError::Send(_) | AttemptError::BodyGone => Failure::Broken,
            AttemptError::TimedOut(_) => Failure::TimedOut,
        }
    }
}

impl AttemptError {
    /// The client's body error that made sending fail, if that is why.
    fn client_body_error(&self) -> Option<&BodyError> {
        match self {
            AttemptError::Send(UpstreamError::RequestBody(error)) => Some(error),
            _ => None,
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
            ErrorChain(error)
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

    /// The body for one attempt; `None` once a streamed body was sent.
    fn body(&mut self) -> Option<RequestBody> {
        match &mut self.body {
            Replay::Bytes(bytes) => Some(RequestBody::Whole(bytes.clone().unwrap_or_default())),
            Replay::Stream(stream) => stream.take().map(RequestBody::Stream),
        }
    }
}

/// Reads a small declared-length body whole so the request can be retried;
/// leaves any other body streaming.
async fn replayable(body: IdleBody<Incoming>) -> Result<Replay, BodyError> {
    if body.is_end_stream() {
        return Ok(Replay::Bytes(None));
    }
    match body.size_hint().exact() {
        Some(length) if length <= REPLAY_LIMIT => {
            // Boxed: the request's future, moved whole into hyper, stays
            // small for the many requests with no body.
            let bytes = Box::pin(body.collect()).await?.to_bytes();
            Ok(Replay::Bytes(Some(bytes)))
        }
        _ => Ok(Replay::Stream(Some(body))),
    }
}

/// Removes the headers that describe one connection, not the message.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

/// What this hop adds to a request's head for the instance: the client in
/// `X-Forwarded-For`, the scheme it used in `X-Forwarded-Proto` (`https`
/// on a request [`tls::mark`]ed secure), and the host it asked for in
/// `X-Forwarded-Host` and `Host` (an h2 client sends it as the URI
/// authority, which outranks `Host`, RFC 9112 §3.2.2).
pub(super) fn forwarded(
    uri: &Uri,
    extensions: &http::Extensions,
    client_ip: HeaderValue,
    via: Option<HeaderValue>,
) -> Forwarded {
    Forwarded {
        client_ip,
        proto: if tls::is_secure(extensions) {
            HTTPS
        } else {
            HTTP
        },
        authority: uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        via,
    }
}

fn own_answer(status: StatusCode, body: String) -> Response<ClientBody> {
    let mut response = Response::new(ClientBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
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
    fn other_failures_answer_502_without_retry() {
        for request in [GET_EMPTY, POST_SMALL, PUT_STREAMED] {
            assert_eq!(next_step(Failure::Broken, request, 1, 3), BAD_GATEWAY);
        }
    }

    #[test]
    fn a_timeout_is_retried_when_idempotent_and_kept_else_answered_504() {
        const TIMEOUT: Next = Next::Answer(StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(next_step(Failure::TimedOut, GET_EMPTY, 1, 3), Next::Retry);
        assert_eq!(next_step(Failure::TimedOut, GET_EMPTY, 3, 3), TIMEOUT);
        assert_eq!(next_step(Failure::TimedOut, POST_SMALL, 1, 3), TIMEOUT);
        assert_eq!(next_step(Failure::TimedOut, PUT_STREAMED, 1, 3), TIMEOUT);
    }

    #[test]
    fn a_connect_error_prints_each_cause_once() {
        let error = AttemptError::from(UpstreamConnectError::Tcp {
            address: "127.0.0.1:9".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(error.failure(), Failure::Connect);
        let text = ErrorChain(&error).to_string();
        assert_eq!(text, "cannot connect to 127.0.0.1:9: connection refused");
    }

    /// A proxy for one service `web` whose one instance is at `port`, with
    /// an upstream timeout of 200 ms.
    fn proxy_to(port: u16) -> Proxy {
        let shared = Arc::new(Shared::new(Routes::parse(&["web"]).expect("routes")));
        shared.apply(Update::Service(Snapshot {
            service: "web".into(),
            revision: 1,
            instances: vec![Instance::new("web", "web-1", "127.0.0.1", port)],
        }));
        Proxy {
            shared,
            upstream_timeout: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(60),
            upstream_body_timeout: Duration::from_secs(60),
            head_limit: crate::balancer::h1::DEFAULT_HEAD_LIMIT,
            via: HeaderValue::from_static("1.1 test"),
            access_log: None,
        }
    }

    /// `GET /` with no body, as [`prepare`] leaves it.
    fn get() -> Prepared {
        let forwarded = forwarded(
            &Uri::from_static("/"),
            &http::Extensions::new(),
            HeaderValue::from_static("127.0.0.1"),
            None,
        );
        let head = RequestHead {
            method: &http::Method::GET,
            target: "/",
            headers: &HeaderMap::new(),
            forwarded: &forwarded,
        };
        Prepared {
            method: http::Method::GET,
            head: head.encode(Some(0)),
            body: Replay::Bytes(None),
        }
    }

    /// Sends `get()` through `proxy`: its status and how long it took.
    async fn timed_get(proxy: &Proxy) -> (StatusCode, Duration) {
        let started = tokio::time::Instant::now();
        let response = proxy.forward(0, get(), None).await;
        (response.status(), started.elapsed())
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
        let proxy = proxy_to(port);
        let (status, took) = timed_get(&proxy).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(
            proxy.shared.metrics.retries.get(),
            0,
            "a timeout is not retried"
        );
        assert_eq!(proxy.shared.metrics.ejections.get(), 0);
        holder.abort();
    }

    /// The upstream timeout's timer stays with a pooled connection: after
    /// it lapsed while the connection sat idle, the next request on that
    /// connection still gets the whole timeout, and then its 504.
    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_times_out_its_next_request_afresh() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let instance = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = instance.local_addr().expect("address").port();
        // Answers the first request on its one connection, then only reads.
        let answering = tokio::spawn(async move {
            let (mut stream, _) = instance.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let read = stream.read(&mut buf).await.expect("first request");
            assert!(buf[..read].ends_with(b"\r\n\r\n"), "one whole head");
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            stream.write_all(answer).await.expect("answer");
            while stream.read(&mut buf).await.is_ok_and(|read| read > 0) {}
        });
        let proxy = proxy_to(port);
        let response = proxy.forward(0, get(), None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.expect("body");
        assert_eq!(body.to_bytes(), "ok");
        // Idle in the pool well past the first request's deadline.
        tokio::time::advance(Duration::from_secs(1)).await;
        let (status, took) = timed_get(&proxy).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(proxy.shared.metrics.retries.get(), 0);
        answering.abort();
    }

    #[test]
    fn a_client_failure_answers_the_client_without_retry() {
        let timeout = Next::Answer(StatusCode::REQUEST_TIMEOUT);
        for request in [GET_EMPTY, POST_SMALL, PUT_STREAMED] {
            let failure = Failure::Client(StatusCode::REQUEST_TIMEOUT);
            assert_eq!(next_step(failure, request, 1, 3), timeout);
        }
    }

    fn parts(request: http::request::Builder) -> http::request::Parts {
        request.body(()).expect("request").into_parts().0
    }

    #[test]
    fn the_host_is_the_uris_authority_else_the_one_host_header() {
        let host = |request| {
            request_host(&parts(request))
                .map(|host| host.map(str::to_owned))
                .map_err(|r| r.status)
        };
        let origin = Request::get("/x").header(header::HOST, "web.test");
        assert_eq!(host(origin), Ok(Some("web.test".into())));
        let absolute = Request::get("http://api.test/x").header(header::HOST, "web.test");
        assert_eq!(host(absolute), Ok(Some("api.test".into())));
        let http10 = Request::get("/x").version(Version::HTTP_10);
        assert_eq!(host(http10), Ok(None));
        let h2 = Request::get("http://api.test/x").version(Version::HTTP_2);
        assert_eq!(host(h2), Ok(Some("api.test".into())));
    }

    #[test]
    fn a_missing_or_doubled_host_is_the_clients_400() {
        let host = |request| {
            request_host(&parts(request))
                .map(|host| host.map(str::to_owned))
                .map_err(|r| r.status)
        };
        assert_eq!(host(Request::get("/x")), Err(StatusCode::BAD_REQUEST));
        let twice = Request::get("/x")
            .header(header::HOST, "a")
            .header(header::HOST, "b");
        assert_eq!(host(twice), Err(StatusCode::BAD_REQUEST));
        let unreadable = Request::get("/x").header(
            header::HOST,
            HeaderValue::from_bytes(b"caf\xe9").expect("opaque bytes are a valid value"),
        );
        assert_eq!(host(unreadable), Err(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn a_timeout_is_classified_as_one() {
        let error = AttemptError::TimedOut(Duration::from_millis(200));
        assert_eq!(error.failure(), Failure::TimedOut);
        assert_eq!(
            ErrorChain(&error).to_string(),
            "no response head within 200ms"
        );
    }
}

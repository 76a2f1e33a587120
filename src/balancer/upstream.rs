//! Upstream connections, under the proxy: one instance's pool of kept-alive
//! HTTP/1.1 connections, and the client side of HTTP/1.1 on them, driven by
//! the request that uses the connection: no task of its own, no channels.
//!
//! Each [`Member`](super::rotation::Member) carries its instance's pool, and
//! a new set keeps the pools of members whose address did not change. So a
//! pool lives exactly as long as its instance is in some set: when an
//! instance leaves, its idle connections close with the last set holding it.
//!
//! Why not hyper's client: each of its connections runs as a task of its
//! own, fed requests and handing back responses over channels, which cost
//! more than the HTTP/1.1 it speaks. Here the request's own future writes
//! the head (and the body, chunked when its length is unknown) and reads
//! the response head ([`super::h1`] parses it); the response body reads the
//! rest from the socket, still sending what is left of the request body,
//! and puts the connection back into its pool at the body's clean end.
//! The proxy writes a request's head once ([`RequestHead::encode`]) for all
//! its attempts; each connection keeps its upstream-timeout timer from one
//! request to the next.
//!
//! Each worker runtime ([`set_worker`]) has its own idle list per instance:
//! a socket is registered with the runtime that opened it, so the requests
//! using it stay on that runtime's thread.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::h1::{self, Decoded, Decoder, HeadReader, ParseError, Truncated};
use super::limits::{BodyError, IdleBody};

/// Body of requests sent upstream.
pub enum RequestBody {
    /// The client's own stream, cut when it pauses too long.
    Stream(IdleBody<Incoming>),
    /// Bytes kept so the request can be sent again; maybe none.
    Whole(Bytes),
}

/// At most this many idle connections are kept per instance and worker; a
/// connection coming back to a full pool is closed.
pub const MAX_IDLE: usize = 512;

/// Room made in the read buffer when less than [`MIN_READ`] is left. A
/// buffer serves one response after another until it is used up: the
/// heads and bodies taken off it share its bytes, so making room each time
/// would mean a new buffer per response.
const READ_SIZE: usize = 16 * 1024;
const MIN_READ: usize = 4 * 1024;

thread_local! {
    /// The worker this thread serves requests for; 0 outside any worker.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as worker `index`: the connections it opens and
/// takes come from that worker's idle lists.
pub(crate) fn set_worker(index: usize) {
    WORKER.with(|worker| worker.set(index));
}

/// Why no connection to an instance could be had. The message names the
/// address; the cause, when there is one, is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamConnectError {
    #[error("cannot connect to {address}")]
    Tcp {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {address} within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

/// Why an exchange with an instance failed, once connected.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Writing the request failed before any of it went out: the instance
    /// cannot have seen it.
    #[error("the connection was closed before the request went out")]
    NotSent(#[source] io::Error),
    #[error("the connection closed before a whole response head came")]
    Closed,
    #[error("the connection failed before a whole response head came")]
    Head(#[source] io::Error),
    #[error("no response head within {0:?}")]
    TimedOut(Duration),
    #[error("the instance's response cannot be passed on")]
    Malformed(#[source] ParseError),
    #[error("the instance switched protocols though the request asked for no upgrade")]
    UnaskedUpgrade,
    #[error("the response body was cut")]
    Truncated(#[source] Truncated),
    #[error("reading the response body failed")]
    Body(#[source] io::Error),
    #[error("sending the request failed")]
    Send(#[source] io::Error),
    /// The client's request body failed while it was being sent.
    #[error("the request body failed")]
    RequestBody(#[source] BodyError),
}

impl UpstreamError {
    /// The connection closed or was reset before a whole response head
    /// came back, after the request went out: the way a kept-alive
    /// connection to an instance that just went away ends.
    pub fn is_unanswered(&self) -> bool {
        match self {
            UpstreamError::Closed => true,
            UpstreamError::Head(error) => is_reset(error),
            _ => false,
        }
    }

    /// Whether the connection was reset, not closed quietly.
    pub fn was_reset(&self) -> bool {
        matches!(self, UpstreamError::Head(error) if is_reset(error))
    }
}

/// An error saying the peer went away.
pub(crate) fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// The kept-alive connections to one instance.
pub struct Upstream {
    host: String,
    port: u16,
    /// One idle list per worker.
    pools: Box<[Pool]>,
}

/// One worker's idle connections to an instance, on a cache line of its own
/// so that workers on different cores do not contend for it.
///
/// Connections stay boxed from their opening to their closing: a request's
/// futures and its response body move theirs several times over.
#[repr(align(64))]
#[derive(Default)]
struct Pool(Mutex<Idle>);

/// Idle connections, each in the box it keeps for its whole life.
#[allow(clippy::vec_box)]
type Idle = Vec<Box<Connection>>;

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// An instance at `host:port`, with an idle list for each of `workers`.
    pub fn new(host: &str, port: u16, workers: usize) -> Self {
        Upstream {
            host: host.to_owned(),
            port,
            pools: (0..workers.max(1)).map(|_| Pool::default()).collect(),
        }
    }

    /// The calling worker's idle list.
    fn pool(&self) -> &Mutex<Idle> {
        let worker = WORKER.with(Cell::get);
        &self.pools[worker % self.pools.len()].0
    }

    /// An idle connection the instance has not closed, or a new one.
    pub async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<Checkout, UpstreamConnectError> {
        loop {
            let popped = self
                .pool()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let Some(connection) = popped else { break };
            if connection.is_idle() {
                return Ok(Checkout {
                    connection,
                    home: Some(self.clone()),
                });
            }
        }
        Ok(Checkout {
            connection: Box::pin(self.connect(connect_timeout)).await?,
            home: Some(self.clone()),
        })
    }

    /// A new connection that never goes back to the pool: for an upgrade.
    pub async fn open(&self, connect_timeout: Duration) -> Result<Checkout, UpstreamConnectError> {
        Ok(Checkout {
            connection: self.connect(connect_timeout).await?,
            home: None,
        })
    }

    async fn connect(&self, timeout: Duration) -> Result<Box<Connection>, UpstreamConnectError> {
        let address = || format!("{}:{}", self.host, self.port);
        let connecting = TcpStream::connect((self.host.as_str(), self.port));
        let stream = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(UpstreamConnectError::Tcp {
                    address: address(),
                    source,
                })
            }
            Err(_) => {
                return Err(UpstreamConnectError::Timeout {
                    address: address(),
                    timeout,
                })
            }
        };
        // Small requests must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok(Box::new(Connection {
            stream,
            input: BytesMut::new(),
            heads: HeadReader::default(),
            output: Vec::new(),
            written: 0,
            sent_any: false,
            body: None,
            chunked: false,
            send_failed: false,
            timer: None,
        }))
    }

    fn give_back(&self, mut connection: Box<Connection>) {
        connection.sent_any = false;
        let mut idle = self.pool().lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(connection);
        }
    }
}

/// One connection to an instance, and the request being sent on it.
struct Connection {
    stream: TcpStream,
    /// Read from the instance, not handed out yet.
    input: BytesMut,
    heads: HeadReader,
    /// To write: the request head, then pieces of its body. Reused.
    output: Vec<u8>,
    /// Bytes of `output` written.
    written: usize,
    /// Some of this request has gone out.
    sent_any: bool,
    /// The request body left to send, when it streams.
    body: Option<IdleBody<Incoming>>,
    /// The streaming body goes chunked: its length is not known.
    chunked: bool,
    /// Writing failed after the response head came: the rest of the
    /// request is dropped, the response still read.
    send_failed: bool,
    /// The upstream timeout of the request in flight, kept from one request
    /// to the next: moving a registered timer's deadline later costs next
    /// to nothing, while a new timer is registered and removed each time.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Connection {
    /// Sets the upstream timeout's deadline for the request going out.
    fn arm(&mut self, deadline: Instant) {
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    /// Nothing came from the instance while the connection was idle: no
    /// close, no stray bytes.
    fn is_idle(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
    }

    /// The whole request is out.
    fn sent(&self) -> bool {
        self.body.is_none() && self.written == self.output.len()
    }

    /// Puts the request head into `output`, with the body when it is kept
    /// whole, so that both go in one write.
    fn encode(&mut self, head: &EncodedHead, body: RequestBody) {
        let out = &mut self.output;
        out.clear();
        self.written = 0;
        out.extend_from_slice(&head.bytes);
        self.chunked = head.length.is_none();
        self.body = match body {
            RequestBody::Whole(bytes) => {
                out.extend_from_slice(&bytes);
                None
            }
            RequestBody::Stream(_) if head.length == Some(0) => None,
            RequestBody::Stream(stream) => Some(stream),
        };
    }

    /// Writes what is left of the request, taking body frames as they
    /// come; ready once all of it is out.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        loop {
            while self.written < self.output.len() {
                let pending = &self.output[self.written..];
                match ready!(Pin::new(&mut self.stream).poll_write(cx, pending)) {
                    Ok(0) => {
                        return Poll::Ready(Err(self.send_error(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(written) => {
                        self.written += written;
                        self.sent_any = true;
                    }
                    Err(error) => return Poll::Ready(Err(self.send_error(error))),
                }
            }
            self.output.clear();
            self.written = 0;
            let Some(body) = &mut self.body else {
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of the request are not passed on.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        self.output
                            .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        self.output.extend_from_slice(&data);
                        self.output.extend_from_slice(b"\r\n");
                    } else {
                        self.output.extend_from_slice(&data);
                    }
                }
                Some(Err(error)) => {
                    self.body = None;
                    return Poll::Ready(Err(UpstreamError::RequestBody(error)));
                }
                None => {
                    if self.chunked {
                        self.output.extend_from_slice(b"0\r\n\r\n");
                    }
                    self.body = None;
                }
            }
        }
    }

    fn send_error(&self, error: io::Error) -> UpstreamError {
        if self.sent_any {
            UpstreamError::Send(error)
        } else {
            UpstreamError::NotSent(error)
        }
    }

    /// Reads more from the instance into `input`: the count read, 0 at its
    /// end.
    ///
    /// Through `AsyncRead`, which forgets the socket's readiness after a
    /// read shorter than the room given (the socket is then drained): the
    /// next look at it, [`Connection::is_idle`] when it is taken from the
    /// pool, costs no system call unless the instance sent something since.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.input.capacity() - self.input.len() < MIN_READ {
            self.input.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.input)
    }

    /// Sends the request while reading the response head; 1xx heads other
    /// than 101 are skipped.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        limit: usize,
    ) -> Poll<Result<h1::Head, UpstreamError>> {
        if !self.sent() {
            if let Poll::Ready(Err(error)) = self.poll_send(cx) {
                return Poll::Ready(Err(error));
            }
        }
        loop {
            if !self.input.is_empty() {
                match self.heads.take(&mut self.input, head_request, limit) {
                    // An interim answer: the final one follows.
                    Ok(Some(head))
                        if head.status.is_informational()
                            && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        continue
                    }
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(error) => return Poll::Ready(Err(UpstreamError::Malformed(error))),
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Err(UpstreamError::Closed)),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Err(UpstreamError::Head(error))),
            }
        }
    }
}

/// Methods whose request carries content, so an empty one is announced as
/// `Content-Length: 0`.
fn expects_content(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT || *method == Method::PATCH
}

/// A connection taken for one request.
pub struct Checkout {
    /// Boxed: it moves with the request's futures and its response body.
    connection: Box<Connection>,
    /// The instance whose pool takes the connection back; `None` for one
    /// that must not go back (an upgrade's).
    home: Option<Arc<Upstream>>,
}

/// What a request's head says: its method, its target in origin form
/// (`/path?query`) and its headers, of which `Content-Length` and
/// `Transfer-Encoding` are left to the body being sent, and what this hop
/// adds.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    pub forwarded: &'a Forwarded,
}

/// A request head as it goes on the wire, written once for every attempt
/// at it: the client's request and its header map can go as soon as it is.
#[derive(Debug)]
pub struct EncodedHead {
    bytes: Vec<u8>,
    /// The length of the body it announces; `None`: sent chunked.
    length: Option<u64>,
    /// A `HEAD` request: its response has no body whatever it says.
    head_request: bool,
}

impl RequestHead<'_> {
    /// The head for a body of `length` bytes (`None`: not known, so the
    /// body goes chunked).
    pub fn encode(&self, length: Option<u64>) -> EncodedHead {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        // One pass over the headers, noting the ones this hop extends.
        let mut seen = Seen::default();
        for (name, value) in self.headers {
            // Framing is this hop's, written below, as are forwarded
            // headers.
            if name == header::CONTENT_LENGTH
                || name == header::TRANSFER_ENCODING
                || self.forwarded.replaces(name, value, &mut seen)
            {
                continue;
            }
            field(&mut out, name.as_str(), [], value);
        }
        self.forwarded.encode(self.headers, &seen, &mut out);
        match length {
            // RFC 9110 §8.6: a request whose method expects content says
            // even when it has none.
            Some(0) if !expects_content(self.method) => {}
            Some(length) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(length.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        out.extend_from_slice(b"\r\n");
        EncodedHead {
            bytes: out,
            length,
            head_request: *self.method == Method::HEAD,
        }
    }
}

impl RequestBody {
    /// Its length when known: what its head announces.
    pub fn length(&self) -> Option<u64> {
        match self {
            RequestBody::Whole(bytes) => Some(bytes.len() as u64),
            RequestBody::Stream(stream) => stream_length(stream),
        }
    }
}

/// The length a client's streamed body will have, when known: none at its
/// end, else what its framing declared.
pub fn stream_length(stream: &IdleBody<Incoming>) -> Option<u64> {
    if stream.is_end_stream() {
        Some(0)
    } else {
        stream.size_hint().exact()
    }
}

/// The headers a hop adds, written as the head goes out instead of put into
/// the request's header map, which would have to grow for them.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// Appended to `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// `X-Forwarded-Proto`.
    pub proto: HeaderValue,
    /// The host the request named in its URI, sent as `Host`; else its
    /// `Host` goes on as it came. Either is also `X-Forwarded-Host`.
    pub authority: Option<HeaderValue>,
    /// Appended to `Via`, when given.
    pub via: Option<HeaderValue>,
}

/// What the pass over a request's headers found of those a hop extends.
#[derive(Default)]
struct Seen<'h> {
    host: Option<&'h HeaderValue>,
    forwarded_for: bool,
    via: bool,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

impl Forwarded {
    /// Whether `name` is a header this hop writes itself, noting in `seen`
    /// those whose values it extends.
    fn replaces<'h>(&self, name: &HeaderName, value: &'h HeaderValue, seen: &mut Seen<'h>) -> bool {
        if *name == header::HOST {
            seen.host.get_or_insert(value);
            self.authority.is_some()
        } else if *name == header::VIA {
            seen.via = true;
            self.via.is_some()
        } else if name.as_str().starts_with("x-forwarded-") {
            seen.forwarded_for |= *name == X_FORWARDED_FOR;
            *name == X_FORWARDED_FOR || *name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST
        } else {
            false
        }
    }

    /// Writes the headers, lists appended to what `headers` already holds.
    fn encode(&self, headers: &HeaderMap, seen: &Seen<'_>, out: &mut Vec<u8>) {
        // Looked up only when present: most requests carry neither list.
        let earlier = |present: bool, name: HeaderName| {
            present
                .then(|| headers.get_all(name).into_iter())
                .into_iter()
                .flatten()
        };
        if let Some(authority) = &self.authority {
            field(out, header::HOST.as_str(), [], authority);
        }
        let forwarded_for = earlier(seen.forwarded_for, X_FORWARDED_FOR);
        field(
            out,
            X_FORWARDED_FOR.as_str(),
            forwarded_for,
            &self.client_ip,
        );
        field(out, X_FORWARDED_PROTO.as_str(), [], &self.proto);
        if let Some(host) = self.authority.as_ref().or(seen.host) {
            field(out, X_FORWARDED_HOST.as_str(), [], host);
        }
        if let Some(via) = &self.via {
            field(
                out,
                header::VIA.as_str(),
                earlier(seen.via, header::VIA),
                via,
            );
        }
    }
}

/// Writes one header line: `name: ` the `earlier` values, each followed by
/// `, `, then `value`; several lines of a list count as one, in order.
fn field<'v>(
    out: &mut Vec<u8>,
    name: &str,
    earlier: impl IntoIterator<Item = &'v HeaderValue>,
    value: &HeaderValue,
) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for earlier in earlier {
        out.extend_from_slice(earlier.as_bytes());
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

impl Checkout {
    /// Sends a request, reading a response head of at most `head_limit`
    /// bytes within `timeout` of sending it; the connection goes back to
    /// the pool once the response body has been read to its end and the
    /// response lets it be kept. The head is copied out before the future
    /// is first polled, so it is only borrowed.
    pub fn send(
        mut self,
        head: &EncodedHead,
        body: RequestBody,
        head_limit: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response<PooledBody>, UpstreamError>> {
        let head_request = head.head_request;
        self.connection.encode(head, body);
        async move {
            let response = self
                .exchange(head_request, head_limit, Some(timeout))
                .await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                return Err(UpstreamError::UnaskedUpgrade);
            }
            Ok(response)
        }
    }

    /// Sends an upgrade request: after a 101 the connection is the
    /// caller's, through [`PooledBody::upgraded`].
    pub async fn upgrade(
        mut self,
        head: RequestHead<'_>,
        body: RequestBody,
        head_limit: usize,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let head = head.encode(body.length());
        self.connection.encode(&head, body);
        self.exchange(head.head_request, head_limit, None).await
    }

    /// Writes the request encoded and reads the response head, within
    /// `timeout` when given.
    async fn exchange(
        mut self,
        head_request: bool,
        head_limit: usize,
        timeout: Option<Duration>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let connection = &mut *self.connection;
        if let Some(timeout) = timeout {
            connection.arm(Instant::now() + timeout);
        }
        let head = poll_fn(|cx| {
            let head = connection.poll_head(cx, head_request, head_limit);
            if let (Poll::Pending, Some(timer), Some(timeout)) =
                (&head, &mut connection.timer, timeout)
            {
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(UpstreamError::TimedOut(timeout)));
                }
            }
            head
        })
        .await?;
        let upgraded = head.status == StatusCode::SWITCHING_PROTOCOLS;
        let mut response = Response::new(());
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        let mut body = PooledBody {
            decoder: Decoder::new(head.framing),
            keep_alive: head.keep_alive && !upgraded,
            checkout: Some(self),
        };
        if !upgraded {
            body.release_if_done();
        }
        Ok(response.map(|()| body))
    }
}

/// A stream switched to another protocol after a 101, and what the
/// instance sent past the 101's head.
pub struct Upgraded {
    pub stream: TcpStream,
    pub read_ahead: Bytes,
}

/// A response body read from its connection, which goes back to the pool
/// at the body's end when the response allows. A body dropped before its
/// end takes the connection with it (closed), since the rest of the
/// response would still be on the wire.
pub struct PooledBody {
    decoder: Decoder,
    keep_alive: bool,
    checkout: Option<Checkout>,
}

impl PooledBody {
    /// Once the body ended: the connection back to its pool when the whole
    /// request went out, the response allows it and the instance sent
    /// nothing beyond it; else closed.
    fn release_if_done(&mut self) {
        if !self.decoder.is_done() {
            return;
        }
        let Some(Checkout { connection, home }) = self.checkout.take() else {
            return;
        };
        let reusable = self.keep_alive
            && connection.sent()
            && !connection.send_failed
            && connection.input.is_empty();
        if let (true, Some(home)) = (reusable, home) {
            home.give_back(connection);
        }
    }

    /// The connection of a 101 answer, handed over.
    pub fn upgraded(mut self) -> Option<Upgraded> {
        let mut connection = *self.checkout.take()?.connection;
        Some(Upgraded {
            stream: connection.stream,
            read_ahead: connection.input.split().freeze(),
        })
    }

    /// Sends more of the request body, if any is left; a failure to write
    /// only stops sending, while the client's body failing ends the
    /// response too.
    fn drive_send(connection: &mut Connection, cx: &mut Context<'_>) -> Result<(), UpstreamError> {
        if connection.sent() || connection.send_failed {
            return Ok(());
        }
        match connection.poll_send(cx) {
            Poll::Ready(Err(UpstreamError::RequestBody(error))) => {
                Err(UpstreamError::RequestBody(error))
            }
            Poll::Ready(Err(_)) => {
                connection.send_failed = true;
                connection.body = None;
                Ok(())
            }
            Poll::Ready(Ok(())) | Poll::Pending => Ok(()),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        self.release_if_done();
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = &mut *self;
        let Some(checkout) = &mut this.checkout else {
            return Poll::Ready(None);
        };
        let connection = &mut checkout.connection;
        let failed = |this: &mut Self, error| {
            this.checkout = None;
            Poll::Ready(Some(Err(error)))
        };
        if let Err(error) = Self::drive_send(connection, cx) {
            return failed(this, error);
        }
        loop {
            match this.decoder.decode(&mut connection.input) {
                Ok(Decoded::Data(data)) => {
                    this.release_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Trailers(trailers)) => {
                    this.release_if_done();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Decoded::End) => {
                    this.release_if_done();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(error) => return failed(this, UpstreamError::Malformed(error)),
            }
            match connection.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    if let Err(cut) = this.decoder.closed() {
                        return failed(this, UpstreamError::Truncated(cut));
                    }
                    // Read until close: the connection is not kept.
                    this.checkout = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => return failed(this, UpstreamError::Body(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

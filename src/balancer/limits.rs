//! Edge limits, around the proxy's and the admin endpoint's listeners: how
//! long a client may take over each part of an exchange, how many clients
//! are served at once, and how accept errors are borne.
//!
//! - `Gate`: accepts only while a connection permit is free, and on an
//!   accept error (out of file descriptors, mostly) backs off briefly and
//!   logs at a bounded rate.
//! - `Activity`: one connection's last read, requests in flight and when it
//!   began waiting for its next request, so a connection idle between
//!   requests is closed at the idle timeout and one whose next HTTP/1
//!   request head is not whole in time at the header timeout.
//! - [`IdleBody`]: a body that fails when no data comes for a while, for the
//!   client's request body and the instance's response body alike.
//!
//! The proxy keeps the header timeout on `Activity`, one timer per
//! connection looked at only when it is due, rather than hyper's
//! `header_read_timeout` (a timer set and cancelled per request). Both
//! start the clock when the connection opens or its last request ends, so
//! a kept-alive HTTP/1 connection waiting for its next request is closed by
//! whichever timeout is shorter. The admin endpoint, not on the hot path,
//! uses hyper's (`server_builder` gives it the timer).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Default wait for a whole request head (nginx `client_header_timeout`
/// is 60 s, HAProxy's documentation suggests `timeout http-request` of a
/// few seconds; hyper's own default is 30 s): a head fits in one round trip.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default wait for the next request on a connection with none in flight
/// (nginx `keepalive_timeout` 75 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Default longest pause within a client's request body (nginx
/// `client_body_timeout` 60 s).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default longest pause within an instance's response body (nginx
/// `proxy_read_timeout` 60 s).
pub const DEFAULT_UPSTREAM_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default interval of HTTP/2 keep-alive pings on an h2 connection.
pub const DEFAULT_H2_PING_INTERVAL: Duration = Duration::from_secs(60);
/// Default wait for a ping's acknowledgement before closing (hyper's 20 s).
pub const DEFAULT_H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections the admin endpoint serves at once; beyond, it stops
/// accepting until one closes.
pub const ADMIN_MAX_CONNECTIONS: usize = 32;
/// File descriptors left aside from the client cap for the process itself:
/// listeners, NATS, logs, the admin endpoint's connections.
const FD_RESERVE: u64 = 64 + ADMIN_MAX_CONNECTIONS as u64;
/// Used when the open-file limit cannot be read or is unlimited.
const FALLBACK_MAX_CONNECTIONS: usize = 4096;
/// Accept errors are logged at most once per this long.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(1);
/// Pause after an accept error: long enough not to spin, short enough that
/// a descriptor freed meanwhile is taken up at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The timeouts and the connection cap of the client side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// From waiting for a request head to having all of it (HTTP/1).
    pub header_timeout: Duration,
    /// A connection with no request in flight and nothing read this long
    /// is closed.
    pub idle_timeout: Duration,
    /// Longest pause between two reads of a client's request body: 408.
    pub body_timeout: Duration,
    /// Longest pause between two reads of an instance's response body: the
    /// response is cut.
    pub upstream_body_timeout: Duration,
    /// The largest response head taken from an instance; a bigger one is
    /// answered 502.
    pub upstream_head_limit: usize,
    /// HTTP/2 keep-alive ping interval, and the wait for each answer.
    pub h2_ping_interval: Duration,
    pub h2_ping_timeout: Duration,
    /// Client connections served at once; beyond, accepting waits.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            upstream_body_timeout: DEFAULT_UPSTREAM_BODY_TIMEOUT,
            upstream_head_limit: super::h1::DEFAULT_HEAD_LIMIT,
            h2_ping_interval: DEFAULT_H2_PING_INTERVAL,
            h2_ping_timeout: DEFAULT_H2_PING_TIMEOUT,
            max_connections: default_max_connections(),
        }
    }
}

/// Half of the open-file limit left after `FD_RESERVE`: each client
/// connection may hold one connection to an instance as well.
pub fn default_max_connections() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    max_connections_for(limit)
}

fn max_connections_for(open_files: Option<u64>) -> usize {
    match open_files {
        Some(limit) => usize::try_from(limit.saturating_sub(FD_RESERVE) / 2)
            .unwrap_or(FALLBACK_MAX_CONNECTIONS)
            .max(1),
        None => FALLBACK_MAX_CONNECTIONS,
    }
}

/// A server builder (HTTP/1.1 and h2c) with the timeouts of `limits`.
pub(crate) fn server_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.h2_ping_interval)
        .keep_alive_timeout(limits.h2_ping_timeout);
    builder
}

/// A listener that accepts only while a connection permit is free.
pub(crate) struct Gate {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    what: &'static str,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Gate {
    pub(crate) fn new(listener: TcpListener, max_connections: usize, what: &'static str) -> Self {
        Gate {
            listener,
            permits: Arc::new(Semaphore::new(max_connections)),
            what,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// The next connection, with the permit it holds until it closes.
    /// Cancel-safe: nothing is lost when the future is dropped.
    pub(crate) async fn accept(&mut self) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
        loop {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                unreachable!("the semaphore is never closed")
            };
            match self.listener.accept().await {
                Ok((stream, peer)) => return (stream, peer, permit),
                Err(error) => {
                    drop(permit);
                    self.accept_failed(&error);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    fn accept_failed(&mut self, error: &std::io::Error) {
        let now = Instant::now();
        if should_log(self.last_logged, now, ACCEPT_ERROR_LOG_EVERY) {
            tracing::warn!(
                listener = self.what,
                %error,
                also_since_last_line = self.unlogged,
                "cannot accept a connection; pausing accepts briefly"
            );
            self.last_logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
    }
}

/// Whether a repeated event seen at `now` is logged, when it was last
/// logged at `last`: at most once per `every`.
fn should_log(last: Option<Instant>, now: Instant, every: Duration) -> bool {
    last.is_none_or(|last| now.duration_since(last) >= every)
}

/// One connection's activity: when it last read, how many requests are in
/// flight on it.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` of the last read or request end.
    last_ms: AtomicU64,
    /// Milliseconds after `opened` of the start of the wait for the next
    /// request head: 0, or the end of the last request.
    waiting_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Whether its requests come as HTTP/1 heads, the header timeout's
    /// business; off once an HTTP/2 request is seen.
    heads: AtomicBool,
}

/// Why [`Activity::quiet`] says a connection should close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quiet {
    /// Nothing read and no request in flight for the idle timeout.
    Idle,
    /// The next request head not whole within the header timeout.
    HeadLate,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            waiting_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            heads: AtomicBool::new(true),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn stamp(&self) {
        self.last_ms.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    fn at(&self, ms: &AtomicU64) -> Instant {
        self.opened + Duration::from_millis(ms.load(Ordering::Relaxed))
    }

    /// The connection carries HTTP/2: no request heads to time.
    pub(crate) fn without_heads(&self) {
        self.heads.store(false, Ordering::Relaxed);
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> Flight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Flight(self.clone())
    }

    /// Resolves once the connection has had no request in flight and read
    /// nothing for `idle` ([`Quiet::Idle`]), or, given `head`, has waited
    /// that long for a whole request head since it opened or its last
    /// request ended ([`Quiet::HeadLate`]), whichever comes first.
    pub(crate) async fn quiet(&self, idle: Duration, head: Option<Duration>) -> Quiet {
        loop {
            let head = head.filter(|_| self.heads.load(Ordering::Relaxed));
            let idle_due = self.at(&self.last_ms) + idle;
            let head_due = head.map(|head| self.at(&self.waiting_ms) + head);
            let now = Instant::now();
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                // A request in flight stamps the connection when it ends,
                // so looking again one (shortest) limit later is soon
                // enough.
                let recheck = head.map_or(idle, |head| head.min(idle));
                tokio::time::sleep_until(now + recheck).await;
                continue;
            }
            let (due, quiet) = match head_due {
                Some(head_due) if head_due <= idle_due => (head_due, Quiet::HeadLate),
                _ => (idle_due, Quiet::Idle),
            };
            if due <= now {
                return quiet;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// Runs `connection` until it ends (`Ok` of its output) or `quiet`
/// resolves (`Err` of its output). `quiet` is polled only when its own
/// timer woke the task, not on each of the connection's many wake-ups.
pub(crate) async fn until_quiet<C: Future, Q: Future>(
    connection: C,
    quiet: Q,
) -> Result<C::Output, Q::Output> {
    let mut connection = std::pin::pin!(connection);
    let mut quiet = std::pin::pin!(quiet);
    let woken = Arc::new(QuietWake {
        // Polled once at first, so that it sets its timer.
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let quiet_waker = Waker::from(woken.clone());
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = connection.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        woken.task.register(cx.waker());
        if woken.woken.swap(false, Ordering::AcqRel) {
            if let Poll::Ready(output) = quiet.as_mut().poll(&mut Context::from_waker(&quiet_waker))
            {
                return Poll::Ready(Err(output));
            }
        }
        Poll::Pending
    })
    .await
}

/// The waker [`until_quiet`] polls its quiet future with: it notes that the
/// quiet future has something to say, then wakes the task.
struct QuietWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for QuietWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// A request in flight on its connection, until dropped.
#[derive(Debug)]
pub(crate) struct Flight(Arc<Activity>);

impl Drop for Flight {
    fn drop(&mut self) {
        let now = self.0.elapsed_ms();
        self.0.last_ms.store(now, Ordering::Relaxed);
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.waiting_ms.store(now, Ordering::Relaxed);
        }
    }
}

/// A client stream that stamps its [`Activity`] on every read.
pub(crate) struct Tracked<S> {
    stream: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub(crate) fn new(stream: S, activity: Arc<Activity>) -> Self {
        Tracked { stream, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.stamp();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Why a body ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("no body data for {0:?}")]
    Idle(Duration),
    #[error("cannot read the body")]
    Read(#[source] hyper::Error),
    #[error("cannot read the instance's body")]
    Upstream(#[source] Box<super::upstream::UpstreamError>),
}

impl From<hyper::Error> for BodyError {
    fn from(error: hyper::Error) -> Self {
        BodyError::Read(error)
    }
}

impl From<super::upstream::UpstreamError> for BodyError {
    fn from(error: super::upstream::UpstreamError) -> Self {
        BodyError::Upstream(Box::new(error))
    }
}

/// A body that fails with [`BodyError::Idle`] when no frame comes for
/// `limit`. The timer is set only when the body has to wait.
pub struct IdleBody<B> {
    body: B,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl<B> IdleBody<B> {
    pub fn new(body: B, limit: Duration) -> Self {
        IdleBody {
            body,
            limit,
            timer: None,
            waiting: false,
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|result| result.map_err(Into::into)));
        }
        let deadline = Instant::now() + this.limit;
        let timer = match &mut this.timer {
            Some(timer) => {
                if !this.waiting {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        this.waiting = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Idle(this.limit)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_half_of_what_the_reserve_does_not_take() {
        assert_eq!(max_connections_for(Some(1024)), (1024 - 96) / 2);
        assert_eq!(max_connections_for(Some(10)), 1, "never zero");
        assert_eq!(max_connections_for(None), FALLBACK_MAX_CONNECTIONS);
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_are_logged_at_most_once_a_second() {
        let start = Instant::now();
        let every = Duration::from_secs(1);
        assert!(should_log(None, start, every));
        assert!(!should_log(
            Some(start),
            start + Duration::from_millis(999),
            every
        ));
        assert!(should_log(Some(start), start + every, every));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_busy_with_wake_ups_still_ends_at_the_idle_timeout() {
        let activity = Activity::new();
        let started = Instant::now();
        // Wakes its task every second and never ends, nor reads anything.
        let ticking = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let ended = until_quiet(ticking, activity.quiet(Duration::from_secs(10), None)).await;
        assert_eq!(ended, Err(Quiet::Idle));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_first_gives_its_output() {
        let activity = Activity::new();
        let quick = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            7
        };
        let ended = until_quiet(quick, activity.quiet(Duration::from_secs(10), None)).await;
        assert_eq!(ended, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_after_its_last_read_or_request() {
        let activity = Activity::new();
        let flight = activity.begin();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move {
                let started = Instant::now();
                let quiet = activity.quiet(Duration::from_secs(10), None).await;
                (quiet, started.elapsed())
            }
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        drop(flight);
        let took = idle.await.expect("idle task");
        assert_eq!(
            took,
            (Quiet::Idle, Duration::from_secs(35)),
            "10 s after the request ended"
        );
    }

    /// Reads every 500 ms, never a whole head.
    async fn trickle(activity: &Activity) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            activity.stamp();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_still_arriving_is_late_at_the_header_timeout() {
        let activity = Activity::new();
        let started = Instant::now();
        let (idle, head) = (Duration::from_secs(1), Some(Duration::from_secs(3)));
        let ended = until_quiet(trickle(&activity), activity.quiet(idle, head)).await;
        assert_eq!(ended, Err(Quiet::HeadLate));
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_head_is_timed_from_the_end_of_the_last_request() {
        let activity = Activity::new();
        let flight = activity.begin();
        let (idle, head) = (Duration::from_secs(60), Some(Duration::from_secs(10)));
        let quiet = tokio::spawn({
            let activity = activity.clone();
            async move {
                let started = Instant::now();
                let quiet = until_quiet(trickle(&activity), activity.quiet(idle, head)).await;
                (quiet, started.elapsed())
            }
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        drop(flight);
        let took = quiet.await.expect("quiet task");
        assert_eq!(took, (Err(Quiet::HeadLate), Duration::from_secs(35)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_has_no_head_to_time() {
        let activity = Activity::new();
        activity.without_heads();
        let started = Instant::now();
        let (idle, head) = (Duration::from_secs(10), Some(Duration::from_secs(3)));
        let ended = until_quiet(std::future::pending::<()>(), activity.quiet(idle, head)).await;
        assert_eq!(ended, Err(Quiet::Idle));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}

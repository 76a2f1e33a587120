//! Upstream connections, under the proxy: one instance's pool of kept-alive
//! HTTP/1.1 connections, handing the proxy a connection ready for one
//! request and taking it back when the response body has been read.
//!
//! Each [`Member`](super::rotation::Member) carries its instance's pool, and
//! a new set keeps the pools of members whose address did not change. So a
//! pool lives exactly as long as its instance is in some set: when an
//! instance leaves, its idle connections close with the last set holding it.
//!
//! Why not hyper-util's pooled client: it keys one global pool by
//! scheme+authority (a hash and a lock per checkout and per return), races a
//! lazy connect against each checkout and moves large futures around. Here a
//! checkout is a short lock on the instance's own idle list and a `pop`.
//!
//! Each worker runtime ([`set_worker`]) has its own idle list per instance:
//! a connection's task runs on the runtime that opened it, so the requests
//! using it stay on that runtime's thread.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::limits::IdleBody;

/// Body of requests sent upstream: the client's own stream (cut when it
/// pauses too long), or bytes kept so the request can be sent again.
pub(crate) type RequestBody = Either<IdleBody<Incoming>, Full<Bytes>>;

/// At most this many idle connections are kept per instance and worker; a
/// connection coming back to a full pool is closed.
pub const MAX_IDLE: usize = 512;

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
        source: std::io::Error,
    },
    #[error("cannot connect to {address} within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("HTTP/1.1 handshake with {address} failed")]
    Handshake {
        address: String,
        #[source]
        source: hyper::Error,
    },
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
#[repr(align(64))]
#[derive(Default)]
struct Pool(Mutex<Vec<SendRequest<RequestBody>>>);

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
    fn pool(&self) -> &Mutex<Vec<SendRequest<RequestBody>>> {
        let worker = WORKER.with(Cell::get);
        &self.pools[worker % self.pools.len()].0
    }

    /// An idle connection that is ready for a request, or a new one.
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
            let Some(mut sender) = popped else { break };
            if sender.is_closed() {
                continue;
            }
            // Just back from a response, the connection may not have
            // signalled readiness yet; it does so at once unless it closed.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Ok(Checkout {
                    sender,
                    upstream: self.clone(),
                });
            }
        }
        let sender = self.connect(connect_timeout).await?;
        Ok(Checkout {
            sender,
            upstream: self.clone(),
        })
    }

    async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<SendRequest<RequestBody>, UpstreamConnectError> {
        let address = || format!("{}:{}", self.host, self.port);
        let stream = match tokio::time::timeout(
            timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
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
        let (sender, connection) = http1::Builder::new()
            // See the server side (`proxy::serve`): one buffer, one write(2).
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamConnectError::Handshake {
                address: address(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn give_back(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.pool().lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }
}

/// A connection taken from the pool for one request.
pub struct Checkout {
    sender: SendRequest<RequestBody>,
    upstream: Arc<Upstream>,
}

impl Checkout {
    /// Sends `request`; the connection goes back to the pool once the
    /// response body has been read to its end.
    pub async fn send(
        mut self,
        request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, hyper::Error> {
        let response = self.sender.send_request(request).await?;
        Ok(response.map(|body| {
            let mut pooled = PooledBody {
                body,
                checkout: Some(self),
            };
            pooled.release_if_done();
            pooled
        }))
    }
}

/// A response body that returns its connection to the pool at its end. A
/// body dropped before its end takes the connection with it (closed), since
/// the rest of the response would still be on the wire.
pub struct PooledBody {
    body: Incoming,
    checkout: Option<Checkout>,
}

impl PooledBody {
    fn release_if_done(&mut self) {
        if self.body.is_end_stream() {
            if let Some(checkout) = self.checkout.take() {
                checkout.upstream.give_back(checkout.sender);
            }
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(checkout) = this.checkout.take() {
                    checkout.upstream.give_back(checkout.sender);
                }
            }
            Poll::Ready(Some(Ok(_))) => this.release_if_done(),
            Poll::Ready(Some(Err(_))) => this.checkout = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

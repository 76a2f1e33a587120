//! A runtime per core: the listening sockets the workers share, and the
//! workers beyond the first, each a single-threaded tokio runtime on a
//! thread of its own serving its own listener.
//!
//! The kernel spreads new connections over the sockets of one address
//! (`SO_REUSEPORT`), so a connection, its requests and the connections to
//! instances they use stay on one core with no hand-over between threads.
//! What is shared stays shared: the sets, passive health and the metrics
//! ([`Shared`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{proxy, upstream, BalancerConfig, Shared};

/// Pending connections each listening socket holds (the `listen(2)`
/// backlog), as nginx's default on Linux.
const BACKLOG: i32 = 511;

/// Why the workers' sockets or runtimes could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot listen on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start worker {index}")]
    Start {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// The CPUs this process may run on (its affinity mask, as
/// `std::thread::available_parallelism` reads it): the default number of
/// workers.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// `count` listening sockets on `address`, all sharing it (`SO_REUSEPORT`
/// when more than one), for as many workers: the first for
/// [`Balancer::serve`](super::Balancer::serve), the others for
/// [`Balancer::with_workers`](super::Balancer::with_workers). A port 0
/// becomes the port the first socket got. An address another process
/// listens on is refused, as it is for a single socket.
pub fn bind(
    address: SocketAddr,
    count: usize,
) -> Result<(std::net::TcpListener, Vec<std::net::TcpListener>), WorkerError> {
    let shared = count > 1;
    let failed = |address| move |source| WorkerError::Listen { address, source };
    if shared && address.port() != 0 {
        // Sockets sharing a port do not see each other as busy: a socket
        // without the option tells whether another process holds it.
        drop(listen(address, false).map_err(failed(address))?);
    }
    let first = listen(address, shared).map_err(failed(address))?;
    let address = first.local_addr().map_err(failed(address))?;
    let others = (1..count)
        .map(|_| listen(address, true).map_err(failed(address)))
        .collect::<Result<_, _>>()?;
    Ok((first, others))
}

/// One non-blocking listening socket on `address`; `shared` with others.
fn listen(address: SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Worker `index` (1 and up; 0 is the caller's runtime) serving `listener`
/// until `stop`, then draining as [`proxy::serve`] does.
pub(super) fn start(
    index: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    config: BalancerConfig,
    stop: CancellationToken,
) -> Result<JoinHandle<()>, WorkerError> {
    let failed = |source| WorkerError::Start { index, source };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(failed)?;
    listener.set_nonblocking(true).map_err(failed)?;
    let listener = {
        let _entered = runtime.enter();
        TcpListener::from_std(listener).map_err(failed)?
    };
    std::thread::Builder::new()
        .name(format!("rollcall-worker-{index}"))
        .spawn(move || {
            upstream::set_worker(index);
            runtime.block_on(proxy::serve(
                listener,
                None,
                shared,
                &config,
                stop.cancelled_owned(),
            ));
        })
        .map_err(failed)
}

/// Waits for the workers' threads to end, off the runtime's own thread.
pub(super) async fn join(workers: Vec<JoinHandle<()>>) {
    if workers.is_empty() {
        return;
    }
    let joined = tokio::task::spawn_blocking(move || {
        workers
            .into_iter()
            .map(JoinHandle::join)
            .filter(Result::is_err)
            .count()
    })
    .await;
    match joined {
        Ok(0) => {}
        Ok(panicked) => tracing::error!(panicked, "worker threads panicked"),
        Err(error) => tracing::error!(%error, "cannot wait for the worker threads"),
    }
}

//! The balancer on a fixed set of instances, with no NATS: a harness for
//! throughput benchmarks against nginx and HAProxy.
//!
//! Run with:
//! `cargo run --release --example static_balancer -- [--workers N] 127.0.0.1:8083 127.0.0.1:9001 127.0.0.1:9002 127.0.0.1:9003`
//! (worker runtimes, one per CPU the process may use by default; the listen
//! address, then the instances of the one service `web`, routed for every
//! request). The first worker runs on the main thread, as `rollcall
//! balancer` does. `ROLLCALL_LOG=debug` for the request log.

use std::net::SocketAddr;

use anyhow::Context;
use futures::StreamExt;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::{workers, Balancer, BalancerConfig};
use rollcall::protocol::{Instance, Snapshot};
use rollcall::subscription::Update;

const USAGE: &str = "usage: static_balancer [--workers N] LISTEN INSTANCE...";

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROLLCALL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let mut args = std::env::args().skip(1).peekable();
    let mut workers = workers::available_cpus();
    if args.peek().map(String::as_str) == Some("--workers") {
        args.next();
        let count = args.next().context(USAGE)?;
        workers = count
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("--workers {count:?} is not a number above 0"))?;
    }
    let listen: SocketAddr = args
        .next()
        .context(USAGE)?
        .parse()
        .context("the listen address is not IP:PORT")?;
    let mut instances = Vec::new();
    for (n, address) in args.enumerate() {
        let address: SocketAddr = address
            .parse()
            .with_context(|| format!("instance {address:?} is not IP:PORT"))?;
        instances.push(Instance::new(
            "web",
            format!("web-{}", n + 1),
            address.ip().to_string(),
            address.port(),
        ));
    }
    let snapshot = Snapshot {
        service: "web".into(),
        revision: 1,
        instances,
    };
    let (listener, others) = workers::bind(listen, workers)?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let config = BalancerConfig::new(Routes::parse(&["web"])?);
    // One Reset, then the stream stays open: the set never changes.
    let updates =
        futures::stream::iter([Update::Reset(vec![snapshot])]).chain(futures::stream::pending());
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    Balancer::with_workers(config, others)
        .serve(listener, None, updates, shutdown)
        .await?;
    Ok(())
}

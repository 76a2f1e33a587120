//! The balancer on a fixed set of instances, with no NATS: a harness for
//! throughput benchmarks against nginx and HAProxy.
//!
//! Run with:
//! `cargo run --release --example static_balancer -- 127.0.0.1:8083 127.0.0.1:9001 127.0.0.1:9002 127.0.0.1:9003`
//! (listen address, then the instances of the one service `web`, routed
//! for every request). `ROLLCALL_LOG=debug` for the request log.

use std::net::SocketAddr;

use anyhow::Context;
use futures::StreamExt;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::{serve, BalancerConfig};
use rollcall::protocol::{Instance, Snapshot};
use rollcall::subscription::Update;

fn main() -> anyhow::Result<()> {
    // ROLLCALL_RUNTIME=current_thread measures the single-threaded scheduler.
    let runtime = match std::env::var("ROLLCALL_RUNTIME").as_deref() {
        Ok("current_thread") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROLLCALL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let listen = args
        .next()
        .context("usage: static_balancer LISTEN INSTANCE...")?;
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
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let config = BalancerConfig::new(Routes::parse(&["web"])?);
    // One Reset, then the stream stays open: the set never changes.
    let updates =
        futures::stream::iter([Update::Reset(vec![snapshot])]).chain(futures::stream::pending());
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(listener, None, config, updates, shutdown).await?;
    Ok(())
}

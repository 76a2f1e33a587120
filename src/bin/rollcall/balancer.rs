//! `rollcall balancer`: the HTTP reverse proxy as a process, fed by the
//! catalog subscription.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::{Balancer, BalancerConfig, SourceCheck};
use rollcall::permissions::balancer_needs;
use tokio::net::TcpListener;

use crate::args::{parse_duration, shutdown_signal, NatsArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Address clients connect to.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics, /catalog); off
    /// when not given.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    // The defaults are the library's `DEFAULT_*_TIMEOUT`s, spelled for --help.
    /// Longest wait for an instance's response head before answering 504.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DUR")]
    pub upstream_timeout: Duration,
    /// Longest wait for a connection to an instance before trying the next.
    #[arg(long, value_parser = parse_duration, default_value = "2s", value_name = "DUR")]
    pub connect_timeout: Duration,
    /// On SIGINT/SIGTERM, how long in-flight requests get to finish.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DUR")]
    pub drain_timeout: Duration,
    /// SERVICE, /PATH=SERVICE, HOST=SERVICE or HOST/PATH=SERVICE; the longest
    /// match wins and a bare SERVICE catches everything else.
    #[arg(required = true, value_name = "ROUTE")]
    pub routes: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    // Bad routes and busy ports are reported before anything connects.
    let routes = Routes::parse(&args.routes)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = match args.admin {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} for the admin endpoint"))?,
        ),
        None => None,
    };
    let connection = args.nats.options().connect("rollcall-balancer").await?;
    // A refused catalog subscription would leave the balancer blind, not dead.
    connection
        .check_access(&balancer_needs(&args.nats.prefix))
        .await?;
    let updates = rollcall::subscription::follow(&connection, args.nats.prefix.clone());
    let link = connection.link();
    let source = SourceCheck::new(move || link.borrow().connected);
    let config = BalancerConfig {
        routes,
        upstream_timeout: args.upstream_timeout,
        connect_timeout: args.connect_timeout,
        drain_timeout: args.drain_timeout,
        source,
    };
    let balancer = Balancer::new(config);
    tokio::spawn(balancer.nats_metrics().follow(connection.link()));
    balancer
        .serve(listener, admin, updates, shutdown_signal())
        .await
        .context("balancer stopped")?;
    Ok(())
}

//! `rollcall discovery`: the catalog fold as a process.

use std::time::Duration;

use anyhow::Context;
use rollcall::discovery::DiscoveryConfig;
use rollcall::metrics::DiscoveryMetrics;
use rollcall::permissions::discovery_needs;

use crate::admin;
use crate::args::{shutdown_signal, NatsArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Copies of the catalog stream when discovery creates it: 1 on a single
    /// server, 3 on a three-node cluster. An existing stream is kept as is.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), value_name = "N")]
    pub replicas: u8,
    /// This replica's name in the catalog fence, the leader heartbeat and
    /// the logs (several `rollcall discovery` may run on one NATS; one
    /// leads). Default: `<host>-<pid>-<start>`.
    #[arg(long, env = "ROLLCALL_REPLICA", value_name = "NAME")]
    pub replica: Option<String>,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics); off when
    /// not given.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut registry = rollcall::metrics::registry();
    let metrics = DiscoveryMetrics::new(&mut registry);
    let listener = admin::bind(args.admin).await?;
    let mut options = args.nats.options();
    // Two missed pings and the link counts as lost: a replica cut off from
    // NATS notices within about a second, like the leader's heartbeats.
    options.ping_interval = options.ping_interval.min(Duration::from_millis(500));
    let connection = options.connect("rollcall-discovery").await?;
    let _admin = admin::start(listener, registry, &connection, metrics.nats.clone());
    // A refused subscription would otherwise leave discovery deaf, not dead.
    connection
        .check_access(&discovery_needs(&args.nats.prefix))
        .await?;
    let discovery = rollcall::discovery::spawn_with(
        &connection,
        args.nats.prefix.clone(),
        DiscoveryConfig {
            stream_replicas: usize::from(args.replicas),
            metrics,
            replica: args.replica,
        },
        shutdown_signal(),
    )
    .await
    .context("discovery could not start")?;
    discovery.wait().await.context("discovery stopped")?;
    Ok(())
}

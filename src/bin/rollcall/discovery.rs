//! `rollcall discovery`: the catalog fold as a process.

use std::time::Duration;

use anyhow::Context;
use rollcall::discovery::DiscoveryConfig;
use rollcall::metrics::DiscoveryMetrics;
use rollcall::permissions::discovery_needs;

use crate::admin;
use crate::args::{parse_duration, shutdown_signal, NatsArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Copies of the catalog stream when discovery creates it: `auto` makes
    /// 3 when the server is part of a cluster (so the catalog survives the
    /// loss of a node) and 1 on a single server; or a number, 1 to 5. An
    /// existing stream is kept as is.
    #[arg(long, default_value = "auto", value_parser = parse_replicas, value_name = "auto|N")]
    pub replicas: StreamReplicas,
    /// This replica's name in the catalog fence, the leader heartbeat and
    /// the logs (several `rollcall discovery` may run on one NATS; one
    /// leads). Default: `<host>-<pid>-<start>`.
    #[arg(long, env = "ROLLCALL_REPLICA", value_name = "NAME")]
    pub replica: Option<String>,
    /// How long the catalog stream keeps the record of an instance that
    /// left (a tombstone): live balancers learn it left from it, and a new
    /// leader that it need not come back. At least 1s; the default is
    /// Consul's KV tombstone TTL.
    #[arg(long, value_name = "DUR", value_parser = parse_tombstone_ttl, default_value = "15m")]
    pub tombstone_ttl: Duration,
    /// Event messages held while discovery is busy before NATS drops the
    /// next (a slow consumer): a fleet registering at once, and the catalog
    /// records that come back on the event subscription, wait here. The
    /// default is nats.go's pending limit per subscription (512 Ki messages).
    #[arg(long, value_name = "N", default_value_t = 524_288, value_parser = clap::value_parser!(u32).range(1024..))]
    pub event_buffer: u32,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics); off when
    /// not given.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,
}

/// How many copies of the catalog stream to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamReplicas {
    /// 3 on a cluster, 1 on a single server.
    Auto,
    Fixed(u8),
}

impl StreamReplicas {
    /// The number for a server that is (`clustered`) or is not in a cluster.
    fn resolve(self, clustered: bool) -> usize {
        match self {
            StreamReplicas::Fixed(n) => usize::from(n),
            StreamReplicas::Auto if clustered => 3,
            StreamReplicas::Auto => 1,
        }
    }
}

fn parse_tombstone_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl < Duration::from_secs(1) {
        return Err(format!(
            "{text:?} is under 1s: JetStream keeps a message for whole seconds"
        ));
    }
    Ok(ttl)
}

fn parse_replicas(text: &str) -> Result<StreamReplicas, String> {
    if text == "auto" {
        return Ok(StreamReplicas::Auto);
    }
    match text.parse::<u8>() {
        Ok(n @ 1..=5) => Ok(StreamReplicas::Fixed(n)),
        _ => Err(format!(
            "{text:?} is not `auto` or a number of copies from 1 to 5 (JetStream's limit)"
        )),
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut registry = rollcall::metrics::registry();
    let metrics = DiscoveryMetrics::new(&mut registry);
    let listener = admin::bind(args.admin).await?;
    let mut options = args.nats.options();
    // Two missed pings and the link counts as lost: a replica cut off from
    // NATS notices within about a second, like the leader's heartbeats.
    options.ping_interval = options.ping_interval.min(Duration::from_millis(500));
    options.subscription_capacity = args.event_buffer as usize;
    let connection = options.connect("rollcall-discovery").await?;
    let _admin = admin::start(listener, registry, &connection, metrics.nats.clone());
    // A refused subscription would otherwise leave discovery deaf, not dead.
    connection
        .check_access(&discovery_needs(&args.nats.prefix))
        .await?;
    let cluster = connection.client.server_info().cluster;
    let stream_replicas = args.replicas.resolve(cluster.is_some());
    tracing::info!(
        ?cluster,
        stream_replicas,
        "copies of the catalog stream, if it is created"
    );
    let discovery = rollcall::discovery::spawn_with(
        &connection,
        args.nats.prefix.clone(),
        DiscoveryConfig {
            stream_replicas,
            metrics,
            replica: args.replica,
            tombstone_ttl: args.tombstone_ttl,
        },
        shutdown_signal(),
    )
    .await
    .context("discovery could not start")?;
    discovery.wait().await.context("discovery stopped")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_three_copies_on_a_cluster_and_one_alone() {
        let auto = parse_replicas("auto").unwrap();
        assert_eq!(auto.resolve(true), 3);
        assert_eq!(auto.resolve(false), 1);
        assert_eq!(parse_replicas("2").unwrap().resolve(true), 2);
        assert_eq!(parse_replicas("1").unwrap().resolve(true), 1);
    }

    #[test]
    fn a_bad_count_is_named() {
        for bad in ["0", "6", "three", ""] {
            let error = parse_replicas(bad).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
    }
}

//! `rollcall discovery`: the catalog fold as a process.

use std::time::Duration;

use anyhow::Context;
use rollcall::catalog_stream;
use rollcall::discovery::DiscoveryConfig;
use rollcall::metrics::DiscoveryMetrics;
use rollcall::partition::{Partitions, PartitionsError};
use rollcall::permissions::discovery_needs;
use rollcall::protocol::Subjects;

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
    /// Own these partitions of the event subjects, out of the N of the
    /// server's mapping (nats/cluster/partitions.conf): `0-7/16`,
    /// `0-3,8,9/16`. One fenced writer per partition, each with its own
    /// leader; a standby is another process with the same partitions.
    /// Without it: every event, unpartitioned, on unmapped servers.
    #[arg(long, value_name = "LIST/N", value_parser = parse_partitions)]
    pub partitions: Option<Partitions>,
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

/// An unpartitioned discovery beside shards would hear no event (the
/// servers map them into partitions) and, leading the catalog, expire every
/// instance it adopted: refused while the catalog stream holds partition
/// fences.
async fn refuse_beside_shards(
    client: &async_nats::Client,
    subjects: &Subjects,
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let listed = catalog_stream::retry_transient("list the partition fences", || {
        catalog_stream::read_partition_fences(&js, subjects)
    });
    let fences = match listed.await {
        Ok(fences) => fences,
        Err(error) => {
            // No stream yet (a first start), or no right to list it.
            tracing::debug!(%error, "cannot list partition fences");
            return Ok(());
        }
    };
    let Some((last, _)) = fences.last() else {
        return Ok(());
    };
    anyhow::bail!(
        "the catalog stream {} holds the fences of {} partitions (the highest {last}): \
         discovery runs as shards here, and without --partitions this one would hear \
         no event and expire the catalog. Start it with --partitions LIST/N; to go back \
         to unpartitioned discovery, remove the mapping from every NATS node, stop every \
         shard and purge the fences (nats stream purge {} --subject '{}.catalog-fence.*')",
        subjects.catalog_stream(),
        fences.len(),
        subjects.catalog_stream(),
        subjects.prefix()
    )
}

fn parse_partitions(text: &str) -> Result<Partitions, String> {
    text.parse().map_err(|e: PartitionsError| e.to_string())
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
    let prefix = &args.nats.prefix;
    let partitioned: Vec<_> = match &args.partitions {
        Some(partitions) => partitions.iter().map(|p| prefix.in_partition(p)).collect(),
        None => vec![prefix.clone()],
    };
    for subjects in &partitioned {
        connection.check_access(&discovery_needs(subjects)).await?;
    }
    if args.partitions.is_none() {
        refuse_beside_shards(&connection.client, prefix).await?;
    }
    let cluster = connection.client.server_info().cluster;
    let stream_replicas = args.replicas.resolve(cluster.is_some());
    tracing::info!(
        ?cluster,
        stream_replicas,
        "copies of the catalog stream, if it is created"
    );
    let config = DiscoveryConfig {
        stream_replicas,
        metrics,
        replica: args.replica,
        tombstone_ttl: args.tombstone_ttl,
    };
    let writers = match &args.partitions {
        Some(partitions) => {
            tracing::info!(%partitions, "one writer per owned partition");
            rollcall::discovery::spawn_partitions(
                &connection,
                prefix,
                partitions,
                config,
                shutdown_signal(),
            )
            .await
        }
        None => {
            rollcall::discovery::spawn_with(&connection, prefix.clone(), config, shutdown_signal())
                .await
                .map(|d| vec![d])
        }
    }
    .context("discovery could not start")?;
    futures::future::try_join_all(writers.into_iter().map(|d| d.wait()))
        .await
        .context("discovery stopped")?;
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
    fn a_bad_partitions_flag_says_what_is_wrong() {
        assert_eq!(
            parse_partitions("8-15/16").map(|p| p.to_string()),
            Ok("8-15/16".to_owned())
        );
        for (bad, says) in [
            ("0-7", "no `/N`"),
            ("0/0", "0 partitions"),
            ("16/16", "does not exist in 16"),
            ("/16", "no partition listed"),
        ] {
            let error = parse_partitions(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn a_bad_count_is_named() {
        for bad in ["0", "6", "three", ""] {
            let error = parse_replicas(bad).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
    }
}

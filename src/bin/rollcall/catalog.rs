//! `rollcall catalog`: the current catalog, read once from the catalog
//! stream, as a table or JSON.

use std::time::SystemTime;

use rollcall::catalog_stream;
use rollcall::connect::NatsOptions;
use rollcall::fleet_view::{catalog_json, catalog_table, leader_line, only_service};

use crate::args::FleetArgs;

/// What to show: the fleet or one service, as text or JSON.
pub type Args = FleetArgs;

pub async fn run(args: Args) -> anyhow::Result<()> {
    let options = NatsOptions {
        quiet: true,
        ..args.nats.options()
    };
    let connection = options.connect("rollcall catalog").await?;
    let js = async_nats::jetstream::new(connection.client);
    let mut last = catalog_stream::read_last(&js, &args.nats.prefix).await?;
    if last.invalid > 0 {
        tracing::warn!(
            invalid = last.invalid,
            "the catalog stream holds invalid snapshots; they are left out"
        );
    }
    if let Some(service) = &args.service {
        last.snapshots = only_service(last.snapshots, service)?;
    }
    let now = SystemTime::now();
    // On stderr: the table and the JSON on stdout keep their shape.
    let partitions = catalog_stream::read_partition_fences(&js, &args.nats.prefix)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot tell which discovery replica leads each partition");
            Vec::new()
        });
    match catalog_stream::read_fence(&js, &args.nats.prefix).await {
        // A partitioned fleet has no unpartitioned leader to speak of.
        Ok(None) if !partitions.is_empty() => {}
        Ok(leader) => eprintln!("{}", leader_line(leader.as_ref(), now)),
        Err(error) => tracing::warn!(%error, "cannot tell which discovery replica leads"),
    }
    for (partition, leader) in &partitions {
        eprintln!("partition {partition}: {}", leader_line(Some(leader), now));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&catalog_json(&last.snapshots, now))?
        );
    } else {
        print!("{}", catalog_table(&last.snapshots, now));
    }
    Ok(())
}

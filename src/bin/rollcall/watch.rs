//! `rollcall watch`: every event and snapshot of the fleet (or of one
//! service), live, one line or one JSON object each.

use std::io::Write;
use std::time::SystemTime;

use futures::StreamExt;
use rollcall::fleet_view::Observed;

use crate::args::{shutdown_signal, FleetArgs};

/// What to show: the fleet or one service, as text or JSON.
pub type Args = FleetArgs;

pub async fn run(args: Args) -> anyhow::Result<()> {
    let subjects = &args.nats.prefix;
    let connection = args.nats.options().connect("rollcall watch").await?;
    let client = &connection.client;
    let filters = match &args.service {
        Some(service) => vec![
            subjects.service_events(service),
            subjects.catalog(service),
            subjects.leader_heartbeat(),
        ],
        None => vec![subjects.all()],
    };
    let mut subscriptions = Vec::new();
    for filter in &filters {
        let subscription = client
            .subscribe(filter.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot subscribe to {filter}: {e}"))?;
        subscriptions.push(subscription);
    }
    client
        .flush()
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to {}: {e}", filters.join(" and ")))?;
    tracing::info!(subjects = %filters.join(" "), "watching");

    let mut messages = futures::stream::select_all(subscriptions);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut stdout = std::io::stdout().lock();
    let (mut seen, mut invalid) = (0u64, 0u64);
    // The leader heartbeats ten times a second: shown when it changes.
    let mut leader: Option<(String, u64)> = None;
    loop {
        let message = tokio::select! {
            () = &mut shutdown => break,
            message = messages.next() => match message {
                Some(message) => message,
                None => anyhow::bail!("the NATS subscription ended"),
            },
        };
        // Discovery's own writes: their stored copies come republished.
        if subjects.is_catalog_write(&message.subject) {
            continue;
        }
        let now = SystemTime::now();
        let observed = Observed::read(subjects, &message.subject, &message.payload);
        if let Observed::Leader(beat) = &observed {
            let current = Some((beat.replica.clone(), beat.epoch));
            if current == leader {
                continue;
            }
            leader = current;
        }
        seen += 1;
        if observed.is_invalid() {
            invalid += 1;
        }
        let written = if args.json {
            writeln!(stdout, "{}", observed.json(now))
        } else {
            writeln!(stdout, "{}", observed.line(now))
        };
        // A closed pipe (`rollcall watch | head`) ends the watch quietly.
        if written.and_then(|()| stdout.flush()).is_err() {
            break;
        }
    }
    tracing::info!(messages = seen, invalid, "watch ended");
    Ok(())
}

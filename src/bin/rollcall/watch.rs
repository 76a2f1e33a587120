//! `rollcall watch`: the fleet's (or one service's) current catalog, then
//! every event and catalog record (joined, changed, left), live, one line
//! or one JSON object each.

use std::collections::HashMap;
use std::io::Write;
use std::time::SystemTime;

use futures::StreamExt;
use rollcall::catalog_stream;
use rollcall::connect::NatsOptions;
use rollcall::fleet_view::{current_json, current_line, Membership, Observed};
use rollcall::protocol::Subjects;

use crate::args::{shutdown_signal, FleetArgs};

/// What to show: the fleet or one service, as text or JSON, and which lines.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Skip the current catalog at start: only what happens from now on.
    #[arg(long)]
    events_only: bool,
    /// Leave heartbeats out (they repeat every interval for every instance).
    #[arg(long)]
    no_heartbeats: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let fleet = &args.fleet;
    let subjects = &fleet.nats.prefix;
    let options = NatsOptions {
        quiet: true,
        ..fleet.nats.options()
    };
    let connection = options.connect("rollcall watch").await?;
    let client = &connection.client;
    let filters = filters(subjects, fleet.service.as_deref());
    let subscriptions = subscribe(client, &filters).await?;

    let mut stdout = std::io::stdout().lock();
    // Subscribed first, so nothing that changes while the stream is read is
    // missed; a change may then show twice, or only in the current state,
    // never not at all.
    let mut members = Membership::default();
    if !args.events_only && !print_current(&mut stdout, client, fleet, &mut members).await {
        return Ok(());
    }
    // Logged once the current state is out: what changes from here on
    // shows as a change.
    tracing::info!(subjects = %filters.join(" "), "watching");

    let mut messages = futures::stream::select_all(subscriptions);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let (mut seen, mut invalid) = (0u64, 0u64);
    // A leader heartbeats ten times a second: shown when it changes, per
    // partition.
    let mut leaders: HashMap<Option<String>, (String, u64)> = HashMap::new();
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
        let mut observed = Observed::read(subjects, &message.subject, &message.payload);
        members.note(&mut observed);
        if let Some((partition, beat)) = observed.leader() {
            let current = (beat.replica.clone(), beat.epoch);
            if leaders.get(&partition.map(str::to_owned)) == Some(&current) {
                continue;
            }
            leaders.insert(partition.map(str::to_owned), current);
        }
        seen += 1;
        if observed.is_invalid() {
            invalid += 1;
        }
        if args.no_heartbeats && observed.is_heartbeat() {
            continue;
        }
        let written = if fleet.json {
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

/// What to subscribe to: every subject under the prefix, or one service's
/// events, overrides and catalog (also as a server mapping partitioned
/// them) and the leaders' heartbeats.
fn filters(subjects: &Subjects, service: Option<&str>) -> Vec<String> {
    match service {
        Some(service) => [
            subjects.service_events(service),
            subjects.service_overrides(service),
            subjects.service_catalog(service),
            subjects.leader_heartbeat(),
            subjects.partition_leaders(),
        ]
        .into_iter()
        .chain(subjects.partitioned_service(service))
        .collect(),
        None => vec![subjects.all()],
    }
}

/// One subscription per filter, confirmed by the server.
async fn subscribe(
    client: &async_nats::Client,
    filters: &[String],
) -> anyhow::Result<Vec<async_nats::Subscriber>> {
    let mut subscriptions = Vec::new();
    for filter in filters {
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
    Ok(subscriptions)
}

/// Prints the current catalog, one `current` line per service, and notes
/// its instances in `members`; false when stdout is closed.
async fn print_current(
    stdout: &mut impl Write,
    client: &async_nats::Client,
    fleet: &FleetArgs,
    members: &mut Membership,
) -> bool {
    let current = current_state(client, &fleet.nats.prefix, fleet.service.as_deref()).await;
    members.seed(&current);
    current.iter().all(|stored| {
        let line = if fleet.json {
            current_json(stored).to_string()
        } else {
            current_line(stored)
        };
        writeln!(stdout, "{line}").is_ok()
    })
}

/// The stored snapshots (of `service` only, when given). A catalog that
/// cannot be read is no reason to stop watching: the live messages still
/// come, so this warns and shows none.
async fn current_state(
    client: &async_nats::Client,
    subjects: &Subjects,
    service: Option<&str>,
) -> Vec<catalog_stream::Stored> {
    let js = async_nats::jetstream::new(client.clone());
    match catalog_stream::read_last(&js, subjects).await {
        Ok(last) => last
            .snapshots
            .into_iter()
            .filter(|stored| service.is_none_or(|s| stored.snapshot.service == s))
            .collect(),
        Err(error) => {
            tracing::warn!("no current catalog to show: {error}");
            Vec::new()
        }
    }
}

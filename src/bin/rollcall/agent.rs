//! `rollcall agent`: announces a service written in any language, gated by
//! its HTTP health check.

use std::collections::BTreeMap;
use std::time::Duration;

use rollcall::agent::{AgentConfig, AgentError, Check, DEFAULT_FAIL_AFTER};
use rollcall::announcer::AnnounceError;
use rollcall::protocol::{validate_name, Instance, ProtocolError, TTL_MS_RANGE, WEIGHT_RANGE};

use rollcall::metrics::AgentMetrics;

use crate::admin;
use crate::args::{parse_duration, parse_service, shutdown_signal, NatsArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    nats: NatsArgs,
    /// Service name (A-Z a-z 0-9 _ -, at most 64).
    #[arg(long, value_parser = parse_service)]
    service: String,
    /// Instance id, unique within the service (A-Z a-z 0-9 _ -, at most 64).
    #[arg(long, value_parser = parse_id)]
    id: String,
    /// Address the balancer connects to (IP address or DNS name).
    #[arg(long)]
    address: String,
    /// Port the balancer connects to.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// HTTP URL that must answer 2xx for the instance to stay announced.
    #[arg(long, value_name = "URL", value_parser = parse_check_url)]
    check: Option<http::Uri>,
    /// How long the check may take.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1s")]
    check_timeout: Duration,
    /// Heartbeat (and check) interval.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1s")]
    interval: Duration,
    /// Time to live: the instance leaves when nothing was heard for this long
    /// (100ms to 10m).
    #[arg(long, value_name = "DUR", value_parser = parse_ttl, default_value = "3s")]
    ttl: Duration,
    /// Share of traffic relative to the other instances (0 to 10000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(i64::from(*WEIGHT_RANGE.start())..=i64::from(*WEIGHT_RANGE.end())), default_value_t = 1)]
    weight: u32,
    /// A free label; repeat for more.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// A free key=value; repeat for more.
    #[arg(long = "meta", value_name = "K=V", value_parser = parse_meta)]
    meta: Vec<(String, String)>,
    /// Deregister after this many failed checks in a row.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), default_value_t = DEFAULT_FAIL_AFTER)]
    fail_after: u32,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics); off when
    /// not given.
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
}

fn parse_id(name: &str) -> Result<String, String> {
    validate_name("id", name).map_err(|e| e.to_string())?;
    Ok(name.to_owned())
}

fn parse_check_url(url: &str) -> Result<http::Uri, String> {
    Check::parse_url(url).map_err(|e| e.to_string())
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if TTL_MS_RANGE.contains(&ms) {
        Ok(ttl)
    } else {
        Err(format!(
            "{text} is outside the allowed range 100ms to 10m (ttl_ms {}..{})",
            TTL_MS_RANGE.start(),
            TTL_MS_RANGE.end()
        ))
    }
}

fn parse_meta(pair: &str) -> Result<(String, String), String> {
    match pair.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{pair:?} is not KEY=VALUE")),
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let instance = Instance {
        service: args.service,
        id: args.id,
        address: args.address,
        port: args.port,
        ttl_ms: u64::try_from(args.ttl.as_millis()).unwrap_or(u64::MAX),
        weight: args.weight,
        tags: args.tags,
        meta: args.meta.into_iter().collect::<BTreeMap<_, _>>(),
        operator: None,
    };
    let mut registry = rollcall::metrics::registry();
    let config = AgentConfig {
        check: args.check.map(|url| Check {
            url,
            timeout: args.check_timeout,
        }),
        interval: args.interval,
        fail_after: args.fail_after,
        instance,
        metrics: AgentMetrics::new(&mut registry),
    };
    // Refuse a bad record (say, --address with a space) before connecting.
    config.validate().map_err(|error| {
        let flag = match &error {
            AgentError::Announce(AnnounceError::InvalidInstance(ProtocolError::BadAddress {
                ..
            })) => "--address",
            AgentError::Announce(AnnounceError::IntervalTooLong { .. }) => "--interval",
            _ => "flags",
        };
        anyhow::Error::new(error).context(format!("invalid {flag}"))
    })?;
    let name = format!(
        "rollcall agent {}/{}",
        config.instance.service, config.instance.id
    );
    let listener = admin::bind(args.admin).await?;
    let connection = args.nats.options().connect(&name).await?;
    let nats = config.metrics.nats.clone();
    let _admin = admin::start(listener, registry, &connection, nats);
    rollcall::agent::run(
        &connection,
        args.nats.prefix.clone(),
        config,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

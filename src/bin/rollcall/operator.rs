//! `rollcall drain`, `rollcall undrain`, `rollcall weight`: an operator's
//! override of one live instance, sent as a NATS request on
//! `<prefix>.operator.<action>.<service>.<instance>`; the leading discovery
//! answers with the instance as it now stands, or why nothing changed.

use std::time::Duration;

use anyhow::Context;
use async_nats::RequestErrorKind;
use rollcall::connect::NatsOptions;
use rollcall::fleet_view::state;
use rollcall::protocol::{validate_name, OverrideChange, OverrideReply, WEIGHT_RANGE};
use serde_json::json;

use crate::args::{parse_duration, NatsArgs};

/// Which instance, who asks, how long to wait.
#[derive(clap::Args, Debug)]
pub struct Target {
    #[command(flatten)]
    nats: NatsArgs,
    /// The instance, as SERVICE/ID (`rollcall catalog` lists them).
    #[arg(value_name = "SERVICE/ID", value_parser = parse_target)]
    instance: (String, String),
    /// Who asks, 1 to 64 characters ($USER@<hostname> by default): shown by
    /// `rollcall catalog` and `rollcall watch` beside the override.
    #[arg(long, value_name = "NAME", default_value_t = default_by(), value_parser = parse_by)]
    by: String,
    /// How long to wait for discovery's answer. It answers once the new
    /// snapshot is stored (a stored write is given 750 ms); 2 s covers that
    /// and a round trip, yet names a missing or failing-over discovery at
    /// once rather than hanging.
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
}

/// `rollcall weight`: the target and the weight.
#[derive(clap::Args, Debug)]
pub struct WeightArgs {
    #[command(flatten)]
    target: Target,
    /// The weight to use instead of the instance's own, 0..10000; `own`
    /// drops the operator's weight, so the instance's own applies again.
    #[arg(value_name = "N|own", value_parser = parse_weight)]
    weight: Weight,
}

/// A weight argument: a number, or back to the instance's own.
#[derive(Debug, Clone, Copy)]
struct Weight(Option<u32>);

pub async fn drain(target: Target) -> anyhow::Result<()> {
    send(target, OverrideChange::Drain).await
}

pub async fn undrain(target: Target) -> anyhow::Result<()> {
    send(target, OverrideChange::Undrain).await
}

pub async fn weight(args: WeightArgs) -> anyhow::Result<()> {
    send(args.target, OverrideChange::Weight(args.weight.0)).await
}

/// Sends the override as a request and prints the instance as discovery
/// now holds it; an error naming what went wrong otherwise.
async fn send(target: Target, change: OverrideChange) -> anyhow::Result<()> {
    let (service, id) = &target.instance;
    let options = NatsOptions {
        quiet: true,
        ..target.nats.options()
    };
    let connection = options.connect("rollcall operator").await?;
    let subject = target.nats.prefix.operator(change.action(), service, id);
    let mut payload = json!({ "by": target.by });
    if let OverrideChange::Weight(weight) = change {
        payload["weight"] = json!(weight);
    }
    let request = connection
        .client
        .request(subject.clone(), payload.to_string().into());
    let answer = tokio::time::timeout(target.timeout, request)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no discovery answered on {subject} within {}: is a `rollcall discovery` leading on this NATS and prefix? (`rollcall catalog` names the leader)",
                humantime::format_duration(target.timeout)
            )
        })?
        .map_err(|error| match error.kind() {
            RequestErrorKind::NoResponders => anyhow::anyhow!(
                "no discovery listens on {subject}: start `rollcall discovery` on this NATS and prefix"
            ),
            _ => anyhow::Error::new(error).context(format!("cannot send the override on {subject}")),
        })?;
    let reply: OverrideReply = serde_json::from_slice(&answer.payload)
        .with_context(|| format!("discovery's answer on {subject} is not an override reply"))?;
    let instance = match (reply.ok, reply.instance) {
        (true, Some(instance)) => instance,
        _ => {
            let error = reply.error.as_deref().unwrap_or("refused without a reason");
            // Most reasons name the instance already (`web/web-9 is not a
            // live instance`); the others get it in front.
            if error.starts_with(&format!("{service}/{id} ")) {
                anyhow::bail!("{error}");
            }
            anyhow::bail!("discovery refused the override of {service}/{id}: {error}");
        }
    };
    let own = instance
        .operator
        .as_ref()
        .map_or(instance.weight, |o| o.own_weight);
    println!(
        "{service}/{id} {}: weight {} (own {own})",
        state(&instance),
        instance.weight
    );
    Ok(())
}

/// `SERVICE/ID`, each checked by the protocol's name rules.
fn parse_target(text: &str) -> Result<(String, String), String> {
    let (service, id) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not SERVICE/ID (for example web/web-1)"))?;
    validate_name("service", service).map_err(|e| e.to_string())?;
    validate_name("id", id).map_err(|e| e.to_string())?;
    Ok((service.to_owned(), id.to_owned()))
}

fn parse_by(text: &str) -> Result<String, String> {
    let len = text.chars().count();
    if len == 0 || len > rollcall::protocol::MAX_NAME_LEN {
        return Err(format!("{len} characters; give 1 to 64"));
    }
    Ok(text.to_owned())
}

fn parse_weight(text: &str) -> Result<Weight, String> {
    if text == "own" {
        return Ok(Weight(None));
    }
    text.parse::<u32>()
        .ok()
        .filter(|weight| WEIGHT_RANGE.contains(weight))
        .map(|weight| Weight(Some(weight)))
        .ok_or_else(|| format!("{text:?} is neither a weight 0..10000 nor `own`"))
}

/// `$USER@<hostname>`: who runs the command, on which machine.
fn default_by() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "operator".to_owned());
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    let by = format!("{user}@{host}");
    by.chars().take(rollcall::protocol::MAX_NAME_LEN).collect()
}

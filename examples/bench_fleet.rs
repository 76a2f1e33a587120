//! Run with `cargo run --release --example bench_fleet -- --nats URL --service web
//! 127.0.0.1:19001 127.0.0.1:19002 [--churn 127.0.0.1:19003 --every 100ms --for 30s]`
//!
//! Announces already running backends for the benchmarks in `bench/`: each
//! `ADDR:PORT` is registered as instance `<service>-<port>`, heartbeats every
//! `--interval`, and is deregistered on SIGINT/SIGTERM. With `--churn`, that
//! one backend alternately joins and leaves every `--every` for `--for`
//! (membership churn under load), then prints `CHURN changes=N` and stays
//! registered until stopped.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rollcall::protocol::{EventKind, Instance, Subjects};
use tokio::signal::unix::{signal, SignalKind};

#[path = "bench_support/mod.rs"]
mod bench_support;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long, default_value = "web")]
    service: String,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    interval: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    ttl: Duration,
    /// A backend that joins and leaves in turn.
    #[arg(long)]
    churn: Option<SocketAddr>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    every: Duration,
    #[arg(long = "for", value_parser = humantime::parse_duration, default_value = "30s")]
    churn_for: Duration,
    /// Backends that stay registered.
    backends: Vec<SocketAddr>,
}

fn instance(args: &Args, addr: SocketAddr) -> Instance {
    let mut instance = Instance::new(
        args.service.as_str(),
        format!("{}-{}", args.service, addr.port()),
        addr.ip().to_string(),
        addr.port(),
    );
    instance.ttl_ms = args.ttl.as_millis() as u64;
    instance
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = async_nats::connect(&args.nats)
        .await
        .with_context(|| format!("connecting to {}", args.nats))?;
    let subjects = Subjects::default();
    let fleet: Vec<Instance> = args.backends.iter().map(|a| instance(&args, *a)).collect();
    for i in &fleet {
        i.validate()?;
        bench_support::publish(&client, &subjects, EventKind::Register, i).await?;
    }
    client.flush().await?;
    eprintln!("bench_fleet: registered {} instance(s)", fleet.len());

    let churner = args.churn.map(|a| instance(&args, a));
    let mut churn_member = false;
    let mut changes = 0u64;
    let mut churn_done = churner.is_none();
    let churn_until = tokio::time::Instant::now() + args.churn_for;
    let mut heartbeat = tokio::time::interval(args.interval);
    let mut churn_tick = tokio::time::interval(args.every);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = heartbeat.tick() => {
                for i in fleet.iter().chain(churner.iter().filter(|_| churn_member)) {
                    bench_support::publish(&client, &subjects, EventKind::Heartbeat, i).await?;
                }
            }
            _ = churn_tick.tick(), if !churn_done => {
                let Some(i) = churner.as_ref() else { continue };
                if tokio::time::Instant::now() >= churn_until {
                    churn_done = true;
                    println!("CHURN changes={changes}");
                    continue;
                }
                let kind = if churn_member { EventKind::Deregister } else { EventKind::Register };
                bench_support::publish(&client, &subjects, kind, i).await?;
                client.flush().await?;
                churn_member = !churn_member;
                changes += 1;
            }
        }
    }
    for i in fleet.iter().chain(churner.iter().filter(|_| churn_member)) {
        bench_support::publish(&client, &subjects, EventKind::Deregister, i).await?;
    }
    client.flush().await?;
    Ok(())
}

//! `rollcall`: one binary, one subcommand per role. Argument parsing, logging
//! set-up and process signals live here; the work is done by the library.

mod agent;
mod args;
mod balancer;
mod catalog;
mod demo;
mod discovery;
mod watch;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "rollcall",
    version,
    about = "Reactive service discovery and load balancing over NATS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fold register/heartbeat/deregister events into the live catalog and
    /// publish a snapshot per service on every change.
    Discovery(discovery::Args),
    /// The HTTP reverse proxy: each request to a live instance of its
    /// route's service, round-robin, following the catalog over NATS.
    Balancer(Box<balancer::Args>),
    /// Announce a service written in any language, gated by its health check.
    Agent(Box<agent::Args>),
    /// Print every event and snapshot as it happens, one line each.
    Watch(watch::Args),
    /// Print the current catalog once, from the catalog stream.
    Catalog(catalog::Args),
    /// The whole stack on one machine, for a first look.
    Demo(demo::Args),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("ROLLCALL_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Discovery(args) => discovery::run(args).await,
        Command::Balancer(args) => balancer::run(*args).await,
        Command::Agent(args) => agent::run(*args).await,
        Command::Watch(args) => watch::run(args).await,
        Command::Catalog(args) => catalog::run(args).await,
        Command::Demo(args) => demo::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rollcall: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! `rollcall`: one binary, one subcommand per role. Argument parsing, logging
//! set-up and process signals live here; the work is done by the library.

mod args;
mod balancer;
mod discovery;

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
    Balancer(balancer::Args),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("ROLLCALL_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Discovery(args) => discovery::run(args).await,
        Command::Balancer(args) => balancer::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rollcall: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

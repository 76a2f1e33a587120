//! `rollcall`: one binary, one subcommand per role. Argument parsing, logging
//! set-up and process signals live here; the work is done by the library.

mod admin;
mod agent;
mod args;
mod balancer;
mod catalog;
mod demo;
mod discovery;
mod operator;
mod probe;
mod watch;

use std::io::IsTerminal;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "rollcall",
    version,
    propagate_version = true,
    about = "Reactive service discovery and load balancing over NATS"
)]
struct Cli {
    /// How log lines on stderr are written: `text` for people, `json` (one
    /// object per line) for log collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "ROLLCALL_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// Print the current catalog, then every event and snapshot as it
    /// happens, one line each.
    Watch(watch::Args),
    /// Print the current catalog once, from the catalog stream.
    Catalog(catalog::Args),
    /// Take an instance out of rotation: it gets no new requests, those in
    /// flight finish. Holds through its heartbeats until `undrain`, or until
    /// it leaves.
    Drain(operator::Target),
    /// Put a drained instance back into rotation.
    Undrain(operator::Target),
    /// Give an instance a weight of the operator's (0..10000) instead of its
    /// own, or `own` to go back to its own.
    Weight(operator::WeightArgs),
    /// The whole stack on one machine, for a first look.
    Demo(demo::Args),
    /// GET a URL once and exit 0 on a 2xx: a container health check.
    Probe(probe::Args),
    /// Print a shell completion script: `rollcall completions bash >
    /// ~/.local/share/bash-completion/completions/rollcall`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = runtime(&cli.command).and_then(|runtime| runtime.block_on(run(cli.command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            match cli.log_format {
                LogFormat::Text => eprintln!("rollcall: {error:#}"),
                // A log collector reading JSON lines gets the reason as one.
                LogFormat::Json => {
                    tracing::error!(error = format!("{error:#}"), "rollcall stopped")
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// The balancer serves its first worker on a single-threaded runtime (its
/// other workers get runtimes of their own); every other role runs on the
/// multi-threaded one.
fn runtime(command: &Command) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match command {
        Command::Balancer(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .build()
        .map_err(|error| anyhow::Error::new(error).context("cannot start the tokio runtime"))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Discovery(args) => discovery::run(args).await,
        Command::Balancer(args) => balancer::run(*args).await,
        Command::Agent(args) => agent::run(*args).await,
        Command::Watch(args) => watch::run(args).await,
        Command::Catalog(args) => catalog::run(args).await,
        Command::Drain(target) => operator::drain(target).await,
        Command::Undrain(target) => operator::undrain(target).await,
        Command::Weight(args) => operator::weight(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Probe(args) => probe::run(args).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "rollcall",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// async-nats modules that log the server URL with its password (debug) or
/// the CONNECT line with every credential (trace): held at info whatever
/// `ROLLCALL_LOG` asks, so no log level shows a secret.
const CREDENTIAL_LOGGERS: [&str; 2] = ["async_nats::connector", "async_nats::connection"];

/// Logs to stderr at the level `ROLLCALL_LOG` sets (info by default), in
/// colour only when stderr is a terminal and `NO_COLOR` is unset, so a
/// redirected log holds no escape codes.
fn init_logging(format: LogFormat) {
    let filter = match EnvFilter::try_from_env("ROLLCALL_LOG") {
        Ok(asked) => CREDENTIAL_LOGGERS.iter().fold(asked, |filter, target| {
            match format!("{target}=info").parse() {
                Ok(cap) => filter.add_directive(cap),
                Err(_) => filter,
            }
        }),
        Err(_) => EnvFilter::new("info,async_nats=warn"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).init();
        }
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

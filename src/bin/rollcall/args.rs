//! Flags shared by every subcommand that talks to NATS, named alike everywhere
//! and each with an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use rollcall::connect::{NatsOptions, DEFAULT_URL};
use rollcall::protocol::{validate_name, Subjects, DEFAULT_PREFIX};

#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated; may carry user:password@.
    // The environment's value may carry a password: --help never shows it.
    #[arg(long = "nats", env = "NATS_URL", default_value = DEFAULT_URL, value_name = "URL", hide_env_values = true)]
    pub url: String,
    /// Subject prefix of the fleet (one token: A-Z a-z 0-9 _ -).
    #[arg(long, env = "ROLLCALL_PREFIX", default_value = DEFAULT_PREFIX, value_parser = parse_prefix)]
    pub prefix: Subjects,
    /// NATS `.creds` file (JWT and nkey seed).
    #[arg(long, env = "NATS_CREDS", value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// NATS nkey seed (starts with SU).
    #[arg(long, env = "NATS_NKEY", value_name = "SEED", hide_env_values = true)]
    pub nkey: Option<String>,
    /// NATS authentication token.
    #[arg(long, env = "NATS_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to verify the NATS server with (turns TLS on).
    #[arg(long, env = "NATS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for TLS; needs --tls-key.
    #[arg(long, env = "NATS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Client key for TLS; needs --tls-cert.
    #[arg(long, env = "NATS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl NatsArgs {
    pub fn options(&self) -> NatsOptions {
        NatsOptions {
            url: self.url.clone(),
            creds_file: self.creds.clone(),
            nkey_seed: self.nkey.clone(),
            token: self.token.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            ..NatsOptions::default()
        }
    }
}

fn parse_prefix(prefix: &str) -> Result<Subjects, String> {
    Subjects::new(prefix).map_err(|e| e.to_string())
}

/// The flags of the commands that show the fleet (`watch`, `catalog`).
#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Only this service.
    #[arg(value_parser = parse_service)]
    pub service: Option<String>,
    /// JSON instead of text (`watch`: one object per line).
    #[arg(long)]
    pub json: bool,
}

/// A service name argument, checked by the protocol's name rules.
pub fn parse_service(name: &str) -> Result<String, String> {
    validate_name("service", name).map_err(|e| e.to_string())?;
    Ok(name.to_owned())
}

/// Reads `500ms`, `3s`, `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration like 500ms, 3s or 1m"))
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

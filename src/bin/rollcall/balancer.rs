//! `rollcall balancer`: the HTTP reverse proxy as a process, fed by the
//! catalog subscription.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rollcall::balancer::access_log::{AccessLog, LogFormat};
use rollcall::balancer::dashboard::DashboardSettings;
use rollcall::balancer::limits::{default_max_connections, Limits};
use rollcall::balancer::outlier::OutlierPolicy;
use rollcall::balancer::routes::Routes;
use rollcall::balancer::tls::Tls;
use rollcall::balancer::workers;
use rollcall::balancer::{Balancer, BalancerConfig, SourceCheck};
use rollcall::permissions::balancer_needs;
use tokio::net::TcpListener;

use crate::args::{parse_duration, shutdown_signal, NatsArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Address clients connect to.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Threads serving requests, each with its own event loop, its own
    /// listening socket on --listen (SO_REUSEPORT) and its own connections to
    /// instances; the default is one per CPU this process may run on.
    #[arg(long, default_value_t = default_workers(), value_name = "N")]
    pub workers: NonZeroUsize,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics, /catalog); off
    /// when not given.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    // The defaults are the library's `DEFAULT_*_TIMEOUT`s, spelled for --help.
    /// Longest wait for an instance's response head before answering 504.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DUR")]
    pub upstream_timeout: Duration,
    /// Longest wait for a connection to an instance before trying the next.
    #[arg(long, value_parser = parse_duration, default_value = "2s", value_name = "DUR")]
    pub connect_timeout: Duration,
    /// On SIGINT/SIGTERM, how long in-flight requests get to finish.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DUR")]
    pub drain_timeout: Duration,
    // Boxed: the command enum stays small whatever flags are added here.
    #[command(flatten)]
    pub https: Box<HttpsArgs>,
    #[command(flatten)]
    pub outlier: OutlierArgs,
    /// Longest wait for a whole request head (HTTP/1); on HTTP/1 it also
    /// bounds the wait for the next request on a kept-alive connection.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DUR")]
    pub header_timeout: Duration,
    /// A client connection with no request in flight and nothing read for
    /// this long is closed.
    #[arg(long, value_parser = parse_duration, default_value = "75s", value_name = "DUR")]
    pub idle_timeout: Duration,
    /// Longest pause within a client's request body before answering 408.
    #[arg(long, value_parser = parse_duration, default_value = "60s", value_name = "DUR")]
    pub body_timeout: Duration,
    /// Longest pause within an instance's response body before cutting it.
    #[arg(long, value_parser = parse_duration, default_value = "60s", value_name = "DUR")]
    pub upstream_body_timeout: Duration,
    /// Largest response head (status line and headers, in bytes) taken
    /// from an instance; a bigger one is answered 502.
    #[arg(long, default_value_t = rollcall::balancer::h1::DEFAULT_HEAD_LIMIT, value_name = "BYTES")]
    pub upstream_head_limit: usize,
    /// Interval of HTTP/2 keep-alive pings to clients.
    #[arg(long, value_parser = parse_duration, default_value = "60s", value_name = "DUR")]
    pub h2_ping_interval: Duration,
    /// Wait for a ping's acknowledgement before closing the h2 connection.
    #[arg(long, value_parser = parse_duration, default_value = "20s", value_name = "DUR")]
    pub h2_ping_timeout: Duration,
    /// Client connections served at once; beyond, new ones wait in the
    /// listen queue. The default is half of (the open-file limit - 96), so
    /// descriptors stay free for instance connections and the admin port.
    #[arg(long, default_value_t = default_max_connections(), value_name = "N")]
    pub max_connections: usize,
    /// Write one line per request to stdout (time, client, method, path,
    /// status, bytes, duration, service, instance, retries).
    #[arg(long)]
    pub access_log: bool,
    /// Format of the access log.
    #[arg(long, value_enum, default_value = "text", value_name = "FORMAT")]
    pub access_log_format: AccessLogFormat,
    /// A dashboard stream (/events) silent this long sends a keep-alive
    /// comment, within the 60 s after which nginx would close it.
    #[arg(long, value_parser = parse_keepalive, default_value = "15s", value_name = "DUR")]
    pub dashboard_keepalive: Duration,
    /// Membership events the dashboard keeps for a page that connects.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..), default_value_t = 100, value_name = "N")]
    pub dashboard_events: u16,
    /// SERVICE, /PATH=SERVICE, HOST=SERVICE or HOST/PATH=SERVICE; the longest
    /// match wins and a bare SERVICE catches everything else.
    #[arg(required = true, value_name = "ROUTE")]
    pub routes: Vec<String>,
}

/// A keep-alive interval: a duration above zero.
fn parse_keepalive(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err("the keep-alive interval must be above zero".into()),
        interval => Ok(interval),
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AccessLogFormat {
    Text,
    Json,
}

impl Args {
    fn limits(&self) -> Limits {
        Limits {
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            body_timeout: self.body_timeout,
            upstream_body_timeout: self.upstream_body_timeout,
            upstream_head_limit: self.upstream_head_limit,
            h2_ping_interval: self.h2_ping_interval,
            h2_ping_timeout: self.h2_ping_timeout,
            max_connections: self.max_connections,
        }
    }

    fn access_log(&self) -> Option<AccessLog> {
        let format = match self.access_log_format {
            AccessLogFormat::Text => LogFormat::Text,
            AccessLogFormat::Json => LogFormat::Json,
        };
        self.access_log
            .then(|| AccessLog::new(format, std::io::stdout()))
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    // Bad routes and busy ports are reported before anything connects.
    let routes = Routes::parse(&args.routes)?;
    let (listener, others) = workers::bind(args.listen, args.workers.get())?;
    let listener = TcpListener::from_std(listener)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = match args.admin {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} for the admin endpoint"))?,
        ),
        None => None,
    };
    let https = match (args.https.https, &args.https.cert, &args.https.key) {
        (Some(address), Some(cert), Some(key)) => {
            let tls = Tls::load(cert, key)?;
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} for HTTPS"))?;
            tokio::spawn(reload_on_sighup(tls.clone()));
            Some((listener, tls))
        }
        _ => None,
    };
    let connection = args.nats.options().connect("rollcall-balancer").await?;
    // A refused catalog subscription would leave the balancer blind, not dead.
    connection
        .check_access(&balancer_needs(&args.nats.prefix))
        .await?;
    let link = connection.link();
    let source = SourceCheck::new(move || link.borrow().connected);
    let config = BalancerConfig {
        limits: args.limits(),
        access_log: args.access_log(),
        dashboard: DashboardSettings {
            keepalive: args.dashboard_keepalive,
            recent_events: usize::from(args.dashboard_events),
        },
        routes,
        upstream_timeout: args.upstream_timeout,
        connect_timeout: args.connect_timeout,
        drain_timeout: args.drain_timeout,
        source,
        outlier: args.outlier.policy(),
        feed: Default::default(),
    };
    let updates = rollcall::subscription::follow_with_stats(
        &connection,
        args.nats.prefix.clone(),
        Arc::clone(&config.feed),
    );
    let mut balancer = Balancer::with_workers(config, others);
    tokio::spawn(balancer.nats_metrics().follow(connection.link()));
    if let Some((listener, tls)) = https {
        balancer = balancer.https(listener, tls);
    }
    balancer
        .serve(listener, admin, updates, shutdown_signal())
        .await
        .context("balancer stopped")?;
    Ok(())
}

/// One worker per CPU the process may run on (nginx's `worker_processes
/// auto`).
fn default_workers() -> NonZeroUsize {
    NonZeroUsize::new(workers::available_cpus()).unwrap_or(NonZeroUsize::MIN)
}

/// Re-reads the HTTPS certificate and key on every SIGHUP.
async fn reload_on_sighup(tls: Arc<Tls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            return tracing::error!(%error, "cannot listen for SIGHUP; no certificate reloads")
        }
    };
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => {
                tracing::info!(certificate = %tls.certificate().display(), "certificate reloaded")
            }
            Err(error) => tracing::error!(
                error = %anyhow::Error::from(error),
                "certificate reload failed; keeping the certificate in use"
            ),
        }
    }
}

/// HTTPS for clients.
#[derive(clap::Args, Debug)]
pub struct HttpsArgs {
    /// Also serve HTTPS (HTTP/1.1 and h2 by ALPN) on this address; needs
    /// --cert and --key, re-read on SIGHUP.
    #[arg(long, value_name = "ADDR", requires_all = ["cert", "key"])]
    pub https: Option<SocketAddr>,
    /// PEM certificate chain for --https.
    #[arg(long, value_name = "FILE", requires = "https")]
    pub cert: Option<PathBuf>,
    /// PEM private key for --https.
    #[arg(long, value_name = "FILE", requires = "https")]
    pub key: Option<PathBuf>,
}

/// Passive health; the defaults are `outlier::DEFAULT_*`, spelled for --help.
#[derive(clap::Args, Debug)]
pub struct OutlierArgs {
    /// Eject an instance after this many 5xx answers or failures in a row
    /// (Envoy consecutive_5xx); 0: never.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub eject_after_5xx: u32,
    /// Eject an instance after this many timeouts or closes without an answer
    /// in a row; 0: never.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub eject_after_gateway_failures: u32,
    /// At most this share of a service's instances ejected at once (always
    /// at least one; Envoy max_ejection_percent).
    #[arg(long, default_value_t = 50, value_name = "PERCENT",
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_ejection_percent: u32,
    /// An instance that joins or returns from ejection ramps up to its full
    /// share over this long (HAProxy slowstart); 0s: at once.
    #[arg(long, value_parser = parse_duration, default_value = "0s", value_name = "DUR")]
    pub slow_start: Duration,
}

impl OutlierArgs {
    fn policy(&self) -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx: self.eject_after_5xx,
            consecutive_gateway_failures: self.eject_after_gateway_failures,
            max_ejection_percent: self.max_ejection_percent,
            slow_start: self.slow_start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_flag_defaults_are_the_librarys() {
        let command = Command::try_parse_from(["balancer", "web"]).expect("parses");
        assert_eq!(command.args.limits(), Limits::default());
        assert!(command.args.access_log().is_none(), "off by default");
    }
}

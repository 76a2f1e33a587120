//! `rollcall demo`: the whole stack on one machine, for a first look. A
//! nats-server (unless `--nats` names one), discovery, a balancer routing
//! `web` with its dashboard on the admin port, and three announced web
//! instances, all stopped on ctrl-c.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rollcall::announcer::{Announcement, Announcer};
use rollcall::balancer::routes::Routes;
use rollcall::balancer::BalancerConfig;
use rollcall::connect::{Connection, NatsOptions};
use rollcall::protocol::{Instance, Subjects};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::args::shutdown_signal;

/// The three instances: id and what each says.
const INSTANCES: [(&str, &str); 3] = [("web-1", "hello"), ("web-2", "bonjour"), ("web-3", "hola")];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the balancer listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the balancer's admin endpoint serves its dashboard (`/`),
    /// `/metrics` and `/catalog`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Use this NATS instead of starting a nats-server.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "cannot listen on {}; pick another with --listen",
            args.listen
        )
    })?;
    let admin = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("cannot listen on {}; pick another with --admin", args.admin))?;
    let (url, nats_server) = match args.nats {
        Some(url) => (url, None),
        None => {
            let server = NatsServer::start().await?;
            (server.url(), Some(server))
        }
    };
    let subjects = Subjects::default();
    let connection = NatsOptions::new(&url).connect("rollcall demo").await?;
    let stop = CancellationToken::new();

    let discovery = rollcall::discovery::spawn(
        &connection,
        subjects.clone(),
        stop.clone().cancelled_owned(),
    )
    .await
    .context("discovery could not start")?;
    let routes = Routes::parse(&["web"]).context("the demo's route")?;
    let updates = rollcall::subscription::follow(&connection, subjects.clone());
    let balancer = tokio::spawn(rollcall::balancer::serve(
        listener,
        Some(admin),
        BalancerConfig::new(routes),
        updates,
        stop.clone().cancelled_owned(),
    ));
    let (announcements, lines) = start_instances(&connection, &subjects, &stop).await?;
    wait_for_catalog(&discovery).await;
    let addresses = (args.listen, args.admin);
    print_banner(&url, nats_server.is_some(), &subjects, addresses, &lines);

    shutdown_signal().await;
    // Out of the rotation first, then stop everything else.
    for announcement in announcements {
        if let Err(error) = announcement.deregister().await {
            tracing::warn!(%error, "deregister failed");
        }
    }
    stop.cancel();
    balancer.await?.context("balancer")?;
    discovery.wait().await.context("discovery")?;
    close(&connection).await;
    if let Some(server) = nats_server {
        server.stop().await;
    }
    println!("rollcall demo stopped");
    Ok(())
}

/// Serves and announces the three instances; their announcements, and a
/// line each for the banner.
async fn start_instances(
    connection: &Connection,
    subjects: &Subjects,
    stop: &CancellationToken,
) -> anyhow::Result<(Vec<Announcement>, Vec<String>)> {
    let mut announcements = Vec::new();
    let mut lines = Vec::new();
    for (id, message) in INSTANCES {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let body = Bytes::from(format!("{message} from {id}\n"));
        tokio::spawn(serve_instance(listener, body, stop.clone()));
        let instance = Instance::new("web", id, "127.0.0.1", address.port());
        let announcement = Announcer::new(connection, subjects.clone(), instance)
            .start()
            .await
            .with_context(|| format!("cannot announce {id}"))?;
        announcements.push(announcement);
        lines.push(format!(
            "  {id:<12} http://{address}  says \"{message} from {id}\""
        ));
    }
    Ok((announcements, lines))
}

/// What runs where, and what to try.
fn print_banner(
    url: &str,
    own_server: bool,
    subjects: &Subjects,
    (listen, admin): (SocketAddr, SocketAddr),
    instances: &[String],
) {
    let started = if own_server {
        "started by the demo"
    } else {
        "given with --nats"
    };
    println!("rollcall demo is running:");
    println!("  {:<12} {url}  ({started})", "nats-server");
    println!(
        "  {:<12} folding register/heartbeat/deregister into snapshots on {}",
        "discovery",
        subjects.catalog_wildcard()
    );
    println!(
        "  {:<12} http://{listen}  routing every request to service web",
        "balancer"
    );
    for line in instances {
        println!("{line}");
    }
    println!("try:   curl http://{listen}/   (again: each answer comes from the next instance)");
    println!("dashboard: http://{admin}/   (instances, request rates and events, live)");
    let me = this_binary();
    println!("watch: {me} watch --nats {url} --no-heartbeats");
    println!("list:  {me} catalog --nats {url}");
    println!("ctrl-c stops everything");
}

/// How to run this very binary from the current directory:
/// `target/release/rollcall` when it was built here, its full path
/// otherwise (`rollcall` is on nobody's PATH after a `cargo build`).
fn this_binary() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "rollcall".to_owned();
    };
    let relative = std::env::current_dir()
        .ok()
        .and_then(|dir| exe.strip_prefix(dir).ok().map(PathBuf::from));
    relative.unwrap_or(exe).display().to_string()
}

/// Closes the connection before the server goes, so nothing reports the
/// server's exit as a lost connection.
async fn close(connection: &Connection) {
    let mut link = connection.link();
    if let Err(error) = connection.client.drain().await {
        tracing::debug!(%error, "closing the NATS connection");
    }
    let closed = link.wait_for(|link| !link.connected);
    if tokio::time::timeout(Duration::from_secs(2), closed)
        .await
        .is_err()
    {
        tracing::debug!("the NATS connection did not close within 2 s");
    }
}

/// Waits (up to 5 s) until discovery lists all three instances, so the curl
/// line printed next works at once.
async fn wait_for_catalog(discovery: &rollcall::discovery::Discovery) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let live = discovery
            .catalog()
            .await
            .iter()
            .find(|s| s.service == "web")
            .map_or(0, |s| s.instances.len());
        if live == INSTANCES.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!("discovery does not list all three instances yet");
}

/// One demo instance: answers every request with `body`.
async fn serve_instance(listener: TcpListener, body: Bytes, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            },
        };
        let body = body.clone();
        let service = hyper::service::service_fn(move |_request| {
            let response = Response::new(Full::new(body.clone()));
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The demo's own nats-server with JetStream, on a free port, in a
/// temporary store; killed when the demo stops (or drops it).
struct NatsServer {
    child: tokio::process::Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl NatsServer {
    async fn start() -> anyhow::Result<NatsServer> {
        let binary = nats_server_bin();
        let store = tempfile::tempdir().context("cannot create a store for nats-server")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port for nats-server")?
            .port();
        let mut child = tokio::process::Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("-sd")
            .arg(store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}; run scripts/demo.sh (it installs nats-server), \
                     set NATS_SERVER_BIN, or give --nats URL",
                    binary.display()
                )
            })?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("{} exited at start ({status})", binary.display());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not listen on port {port} within 10 s",
                    binary.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(NatsServer {
            child,
            port,
            _store: store,
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn stop(mut self) {
        if let Err(error) = self.child.kill().await {
            tracing::warn!(%error, "cannot stop nats-server");
        }
    }
}

/// `NATS_SERVER_BIN`, else the project's `.venv/bin/nats-server` when run
/// from the project, else `nats-server` from PATH.
fn nats_server_bin() -> PathBuf {
    if let Some(binary) = std::env::var_os("NATS_SERVER_BIN") {
        return binary.into();
    }
    let venv = PathBuf::from(".venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("nats-server")
}

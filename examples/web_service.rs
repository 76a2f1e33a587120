//! Run with `cargo run --example web_service -- --name web-1 --port 0 --message hello`
//! (a nats-server on 127.0.0.1:4222, or `--nats URL`).
//!
//! A small HTTP service that announces itself with `rollcall::announcer`:
//! `GET /` answers `<message> from <name>`, `GET /health` answers 200. On
//! SIGINT or SIGTERM it deregisters first, then stops accepting and lets
//! in-flight requests finish, so a balancer never sends it a request it
//! would refuse.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rollcall::announcer::Announcer;
use rollcall::connect::{NatsOptions, DEFAULT_URL};
use rollcall::protocol::{Instance, Subjects, DEFAULT_PREFIX};
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    /// Instance id, announced as the instance of the service.
    #[arg(long, default_value = "web-1")]
    name: String,
    /// Port to listen on; 0 picks a free one (printed on start).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to listen on and announce.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// What `GET /` says.
    #[arg(long, default_value = "hello")]
    message: String,
    #[arg(long, env = "NATS_URL", default_value = DEFAULT_URL)]
    nats: String,
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// Service to announce the instance under.
    #[arg(long, default_value = "web")]
    service: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let subjects = Subjects::new(&args.prefix).context("--prefix")?;

    let listener = TcpListener::bind((args.address.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.address, args.port))?;
    let bound = listener.local_addr()?;
    println!("{} listening on {bound}", args.name);

    let connection = NatsOptions::new(&args.nats).connect(&args.name).await?;
    let instance = Instance::new(&args.service, &args.name, &args.address, bound.port());
    let announcement = Announcer::new(&connection, subjects, instance)
        .start()
        .await
        .context("cannot announce the service")?;

    let body = Bytes::from(format!("{} from {}\n", args.message, args.name));
    let (stop_accepting, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => serve(&graceful, stream, peer, body.clone()),
                    Err(error) => tracing::warn!(%error, "accept failed"),
                },
                _ = &mut stopped => break,
            }
        }
        drop(listener);
        if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests still open after 10 s; closing them");
        }
    });

    shutdown_signal().await;
    // Out of the rotation first, while still serving what is on its way.
    announcement.deregister().await?;
    let _ = stop_accepting.send(());
    server.await?;
    Ok(())
}

fn serve(
    graceful: &GracefulShutdown,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    body: Bytes,
) {
    let service = hyper::service::service_fn(move |request| respond(request, body.clone()));
    let connection = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
    });
}

async fn respond(
    request: Request<Incoming>,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => (StatusCode::OK, body),
        (&Method::GET, "/health") => (StatusCode::OK, Bytes::from_static(b"ok\n")),
        _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    Ok(response)
}

async fn shutdown_signal() {
    let mut terminate = match tokio::signal::unix::signal(
        tokio::signal::unix::SignalKind::terminate(),
    ) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only ctrl-c stops this service");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

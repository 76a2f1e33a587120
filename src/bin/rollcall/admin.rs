//! `--admin ADDR` for the components without pages of their own (discovery,
//! the agent): `/healthz`, `/readyz` (while NATS is connected), `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use prometheus_client::registry::Registry;
use rollcall::admin_http::NatsComponent;
use rollcall::balancer::limits::Limits;
use rollcall::connect::Connection;
use rollcall::metrics::NatsMetrics;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Binds the admin address, when given, before anything connects: a busy
/// port is reported first.
pub async fn bind(address: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match address {
        Some(address) => TcpListener::bind(address)
            .await
            .map(Some)
            .with_context(|| format!("cannot listen on {address} for the admin endpoint")),
        None => Ok(None),
    }
}

/// Follows the NATS link into `nats` and serves `registry` on `listener`,
/// when there is one, until the returned guard is dropped.
pub fn start(
    listener: Option<TcpListener>,
    registry: Registry,
    connection: &Connection,
    nats: NatsMetrics,
) -> Option<Stop> {
    tokio::spawn(nats.follow(connection.link()));
    let listener = listener?;
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "admin endpoint listening");
    }
    let endpoint = Arc::new(NatsComponent {
        registry,
        link: connection.link(),
    });
    Some(Stop(tokio::spawn(rollcall::admin_http::serve(
        listener,
        endpoint,
        Limits::default(),
    ))))
}

/// Stops the admin endpoint when dropped.
pub struct Stop(JoinHandle<()>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

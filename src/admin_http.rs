//! The admin endpoint every long-running component can serve beside its
//! work: `GET /healthz` (alive), `GET /readyz` (200 while the component can
//! do its job), `GET /metrics` (Prometheus text) and whatever pages the
//! component adds ([`Endpoint::page`]).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::balancer::limits::{self, Activity, Gate, Limits, Tracked, ADMIN_MAX_CONNECTIONS};
use crate::connect::Link;

/// What one component shows on its admin endpoint.
pub trait Endpoint: Send + Sync + 'static {
    /// Whether an orchestrator may count on the component now.
    fn ready(&self) -> bool;
    /// Why it is not ready, for the 503's body.
    fn not_ready_reason(&self) -> &'static str;
    /// The `/metrics` text.
    fn metrics(&self) -> String;
    /// A page besides the standard three: its content type and body.
    fn page(&self, _path: &str) -> Option<(&'static str, String)> {
        None
    }
}

/// An endpoint for a component whose readiness is its NATS link and whose
/// metrics need no refresh at scrape time (discovery, the agent).
pub struct NatsComponent {
    pub registry: Registry,
    pub link: watch::Receiver<Link>,
}

impl Endpoint for NatsComponent {
    fn ready(&self) -> bool {
        self.link.borrow().connected
    }

    fn not_ready_reason(&self) -> &'static str {
        "not ready: NATS disconnected"
    }

    fn metrics(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}

/// Serves `endpoint` on `listener` until the task is dropped, with the
/// timeouts of `limits` and a cap of its own ([`ADMIN_MAX_CONNECTIONS`]), so
/// neither slow clients nor many of them can take it down.
pub async fn serve(listener: TcpListener, endpoint: Arc<dyn Endpoint>, limits: Limits) {
    let builder = limits::server_builder(&limits);
    let mut gate = Gate::new(listener, ADMIN_MAX_CONNECTIONS, "admin");
    loop {
        let (stream, peer, permit) = gate.accept().await;
        let endpoint = endpoint.clone();
        let service = hyper::service::service_fn(move |request| {
            let response = answer(endpoint.as_ref(), &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let activity = Activity::new();
        let stream = Tracked::new(stream, activity.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let idle_timeout = limits.idle_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                ended = connection => if let Err(error) = ended {
                    tracing::debug!(%peer, %error, "admin connection ended with an error");
                },
                () = activity.idle(idle_timeout) => {
                    tracing::debug!(%peer, "admin connection idle; closed");
                }
            }
        });
    }
}

fn answer(endpoint: &dyn Endpoint, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
            "text/plain",
        );
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if endpoint.ready() => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", endpoint.not_ready_reason()),
            "text/plain",
        ),
        "/metrics" => text(
            StatusCode::OK,
            endpoint.metrics(),
            crate::metrics::CONTENT_TYPE,
        ),
        other => match endpoint.page(other) {
            Some((content_type, body)) => text(StatusCode::OK, body, content_type),
            None => text(
                StatusCode::NOT_FOUND,
                format!("no {other:?} here; try /healthz, /readyz or /metrics\n"),
                "text/plain",
            ),
        },
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

//! The admin endpoint every long-running component can serve beside its
//! work: `GET /healthz` (alive), `GET /readyz` (200 while the component can
//! do its job), `GET /metrics` (Prometheus text) and whatever pages the
//! component adds ([`Endpoint::page`]) or streams it serves as server-sent
//! events ([`Endpoint::events`]).
//!
//! A stream of events counts as a request in flight for as long as it is
//! open, so the idle timeout never cuts it; it holds one of the
//! [`ADMIN_MAX_CONNECTIONS`] like any connection, and it ends when the
//! endpoint stops.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
    /// A stream of server-sent events (`text/event-stream`): its frames,
    /// each already in the wire format.
    fn events(&self, _path: &str) -> Option<BoxStream<'static, Bytes>> {
        None
    }
    /// Counts a request refused with `status` (404, 405).
    fn refused(&self, _status: StatusCode) {}
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

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
    // Dropped with this future: every open stream of events ends.
    let stopping = CancellationToken::new();
    let _stop_streams = stopping.clone().drop_guard();
    loop {
        let (stream, peer, permit) = gate.accept().await;
        let endpoint = endpoint.clone();
        let activity = Activity::new();
        let service = hyper::service::service_fn({
            let (activity, stopping) = (activity.clone(), stopping.clone());
            move |request| {
                let response = match endpoint.events(request.uri().path()) {
                    Some(frames) if request.method() == Method::GET => {
                        event_stream(frames, &activity, &stopping)
                    }
                    _ => answer(endpoint.as_ref(), &request),
                };
                async move { Ok::<_, Infallible>(response) }
            }
        });
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
                _ = activity.quiet(idle_timeout, None) => {
                    tracing::debug!(%peer, "admin connection idle; closed");
                }
            }
        });
    }
}

/// A `text/event-stream` response of `frames`, a request in flight on
/// its connection until it ends (`stopping`, or the stream's own end).
fn event_stream(
    frames: BoxStream<'static, Bytes>,
    activity: &Arc<Activity>,
    stopping: &CancellationToken,
) -> Response<Body> {
    let flight = activity.begin();
    let frames = frames
        .take_until(stopping.clone().cancelled_owned())
        .map(move |frame| {
            let _open = &flight;
            Ok(Frame::data(frame))
        });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx would otherwise buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn answer(endpoint: &dyn Endpoint, request: &Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        refused(endpoint, request, StatusCode::METHOD_NOT_ALLOWED);
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not served here; only GET is\n", request.method()),
            "text/plain",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
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
            None => {
                refused(endpoint, request, StatusCode::NOT_FOUND);
                text(
                    StatusCode::NOT_FOUND,
                    format!("no {other:?} here; try /healthz, /readyz or /metrics\n"),
                    "text/plain",
                )
            }
        },
    }
}

/// Counts and logs a refused request.
fn refused(endpoint: &dyn Endpoint, request: &Request<Incoming>, status: StatusCode) {
    endpoint.refused(status);
    tracing::debug!(
        method = %request.method(),
        path = request.uri().path(),
        status = status.as_u16(),
        "admin request refused"
    );
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

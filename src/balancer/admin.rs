//! Stage 4d, the admin endpoint: what the balancer routes on and how it
//! fares, for people and for Prometheus. `GET /healthz` (alive), `GET
//! /readyz` (200 once the catalog is read, while NATS is connected), `GET
//! /metrics` (Prometheus text format), `GET /catalog` (JSON).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::Shared;

/// Serves the admin endpoint on `listener` until the task is dropped.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin endpoint cannot accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |request| {
            let response = answer(&shared, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
}

fn answer(shared: &Shared, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
            "text/plain",
        );
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if shared.ready() => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: catalog not read yet or NATS disconnected\n".into(),
            "text/plain",
        ),
        "/metrics" => text(StatusCode::OK, metrics(shared), "text/plain; version=0.0.4"),
        "/catalog" => text(StatusCode::OK, catalog(shared), "application/json"),
        other => text(
            StatusCode::NOT_FOUND,
            format!("no {other:?} here; try /healthz, /readyz, /metrics or /catalog\n"),
            "text/plain",
        ),
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

/// The Prometheus text exposition of [`super::Metrics`] and the sets.
pub fn metrics(shared: &Shared) -> String {
    let m = &shared.metrics;
    let mut out = String::new();
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    let _ = writeln!(
        out,
        "# HELP rollcall_balancer_responses_total Responses sent to clients, by status class.\n# TYPE rollcall_balancer_responses_total counter"
    );
    for (i, count) in m.responses.iter().enumerate() {
        let _ = writeln!(
            out,
            "rollcall_balancer_responses_total{{class=\"{}xx\"}} {}",
            i + 1,
            count.load(Ordering::Relaxed)
        );
    }
    counter(
        &mut out,
        "rollcall_balancer_upstream_connect_failures_total",
        "Connections to instances that could not be made.",
        m.connect_failures.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "rollcall_balancer_retries_total",
        "Requests sent again to another instance after a failed connection.",
        m.retries.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "rollcall_balancer_ejections_total",
        "Instances taken out of rotation after a failed connection.",
        m.ejections.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP rollcall_balancer_catalog_updates_total Catalog snapshots received, by outcome.\n# TYPE rollcall_balancer_catalog_updates_total counter"
    );
    for (result, count) in [
        ("applied", &m.updates_applied),
        ("stale", &m.updates_stale),
        ("unrouted", &m.updates_unrouted),
        ("bad_instance", &m.updates_bad),
    ] {
        let _ = writeln!(
            out,
            "rollcall_balancer_catalog_updates_total{{result=\"{result}\"}} {}",
            count.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP rollcall_balancer_live_instances Instances taking traffic, per service (ejected ones included).\n# TYPE rollcall_balancer_live_instances gauge"
    );
    let now = Instant::now();
    for rotation in &shared.rotations {
        let set = rotation.load();
        let ejected = set
            .members()
            .iter()
            .filter(|member| !member.is_eligible(now))
            .count();
        let _ = writeln!(
            out,
            "rollcall_balancer_live_instances{{service=\"{}\"}} {}\nrollcall_balancer_ejected_instances{{service=\"{}\"}} {}",
            set.service(),
            set.live_count(),
            set.service(),
            ejected
        );
    }
    let last = m.last_update_ms.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP rollcall_balancer_last_catalog_update_age_seconds Time since the last catalog update was applied (-1: none yet).\n# TYPE rollcall_balancer_last_catalog_update_age_seconds gauge"
    );
    let age = if last == 0 {
        -1.0
    } else {
        (shared.started.elapsed().as_millis() as u64).saturating_sub(last) as f64 / 1000.0
    };
    let _ = writeln!(
        out,
        "rollcall_balancer_last_catalog_update_age_seconds {age}"
    );
    out
}

/// The sets the balancer routes on, as JSON.
pub fn catalog(shared: &Shared) -> String {
    let now = Instant::now();
    let services: Vec<serde_json::Value> = shared
        .rotations
        .iter()
        .map(|rotation| {
            let set = rotation.load();
            let instances: Vec<serde_json::Value> = set
                .members()
                .iter()
                .map(|member| {
                    let ejected_for_ms = member
                        .health
                        .ejected_until
                        .map(|until| until.saturating_duration_since(now).as_millis() as u64)
                        .filter(|ms| *ms > 0);
                    serde_json::json!({
                        "id": member.id(),
                        "address": member.authority.as_str(),
                        "weight": member.instance.weight,
                        "failures": member.health.failures,
                        "ejected": ejected_for_ms.is_some(),
                        "ejected_for_ms": ejected_for_ms,
                    })
                })
                .collect();
            serde_json::json!({
                "service": set.service(),
                "revision": set.revision(),
                "live": set.live_count(),
                "instances": instances,
            })
        })
        .collect();
    let routes: Vec<&str> = shared.routes.routes().map(|r| r.text.as_str()).collect();
    serde_json::json!({ "routes": routes, "services": services }).to_string() + "\n"
}

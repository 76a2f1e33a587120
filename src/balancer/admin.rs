//! The admin endpoint, beside the proxy: what the balancer routes on and how
//! it fares, for people and for Prometheus. `GET /healthz` (alive), `GET
//! /readyz` (200 once the catalog is read, while NATS is connected), `GET
//! /metrics` (Prometheus text format), `GET /catalog` (JSON).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::limits::{self, Activity, Gate, Limits, Tracked, ADMIN_MAX_CONNECTIONS};
use super::Shared;

/// Serves the admin endpoint on `listener` until the task is dropped, with
/// the proxy's timeouts and a cap of its own ([`ADMIN_MAX_CONNECTIONS`]), so
/// neither slow clients nor many of them can take it down.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, limits: Limits) {
    let builder = limits::server_builder(&limits);
    let mut gate = Gate::new(listener, ADMIN_MAX_CONNECTIONS, "admin");
    loop {
        let (stream, peer, permit) = gate.accept().await;
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |request| {
            let response = answer(&shared, &request);
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
    let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    family(
        &mut out,
        "rollcall_balancer_responses_total",
        "counter",
        "Responses sent to clients, by status class.",
        classes
            .iter()
            .zip(&m.responses)
            .map(|(class, count)| (Some(("class", *class)), count.get())),
    );
    for (name, help, count) in [
        (
            "rollcall_balancer_upstream_connect_failures_total",
            "Connections to instances that could not be made.",
            &m.connect_failures,
        ),
        (
            "rollcall_balancer_retries_total",
            "Requests sent again to another instance after a failed connection.",
            &m.retries,
        ),
        (
            "rollcall_balancer_ejections_total",
            "Instances taken out of rotation after a failed connection.",
            &m.ejections,
        ),
        (
            "rollcall_balancer_client_aborts_total",
            "Clients gone before their answer was sent (499).",
            &m.client_aborts,
        ),
        (
            "rollcall_balancer_malformed_heads_total",
            "Malformed request heads answered 400, 414 or 431 by the HTTP layer.",
            &m.malformed_heads,
        ),
        (
            "rollcall_balancer_loops_refused_total",
            "Requests that came back to this balancer, refused with 508.",
            &m.loops_refused,
        ),
        (
            "rollcall_balancer_header_timeouts_total",
            "Client connections closed for a request head not sent in time.",
            &m.header_timeouts,
        ),
        (
            "rollcall_balancer_idle_closed_total",
            "Client connections closed after the idle timeout.",
            &m.idle_closed,
        ),
        (
            "rollcall_balancer_body_timeouts_total",
            "Client request bodies that paused beyond the body timeout (408).",
            &m.body_timeouts,
        ),
    ] {
        family(&mut out, name, "counter", help, [(None, count.get())]);
    }
    family(
        &mut out,
        "rollcall_balancer_catalog_updates_total",
        "counter",
        "Catalog snapshots received, by outcome.",
        [
            ("applied", m.updates_applied.get()),
            ("stale", m.feed.stale.load(Ordering::Relaxed)),
            ("unrouted", m.updates_unrouted.get()),
            ("bad_instance", m.updates_bad.get()),
        ]
        .map(|(result, count)| (Some(("result", result)), count)),
    );
    instance_gauges(&mut out, shared);
    family(
        &mut out,
        "rollcall_balancer_last_catalog_update_age_seconds",
        "gauge",
        "Time since the last catalog update was applied (-1: none yet).",
        [(None, last_update_age(shared))],
    );
    out
}

/// Per service: instances taking traffic, and those of them ejected.
fn instance_gauges(out: &mut String, shared: &Shared) {
    let now = tokio::time::Instant::now().into_std();
    let sets: Vec<_> = shared.rotations.iter().map(|r| r.load_full()).collect();
    family(
        out,
        "rollcall_balancer_live_instances",
        "gauge",
        "Instances taking traffic, per service (ejected ones included).",
        sets.iter()
            .map(|set| (Some(("service", set.service())), set.live_count())),
    );
    family(
        out,
        "rollcall_balancer_ejected_instances",
        "gauge",
        "Instances out of rotation after failed connections, per service.",
        sets.iter().map(|set| {
            let ejected = set.members().iter().filter(|m| !m.is_eligible(now));
            (Some(("service", set.service())), ejected.count())
        }),
    );
}

/// Seconds since the last catalog update was applied; -1 before the first.
fn last_update_age(shared: &Shared) -> f64 {
    let last = shared.metrics.last_update_ms.load(Ordering::Relaxed);
    if last == 0 {
        return -1.0;
    }
    (shared.started.elapsed().as_millis() as u64).saturating_sub(last) as f64 / 1000.0
}

/// One metric family: its `HELP` and `TYPE` lines, then a sample per
/// `(label, value)`, the label as `(name, value)` when there is one.
fn family<'a, V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Option<(&'a str, &'a str)>, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (label, value) in samples {
        let _ = match label {
            Some((key, label)) => writeln!(out, "{name}{{{key}=\"{label}\"}} {value}"),
            None => writeln!(out, "{name} {value}"),
        };
    }
}

/// The sets the balancer routes on, as JSON.
pub fn catalog(shared: &Shared) -> String {
    let now = tokio::time::Instant::now().into_std();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::routes::Routes;

    #[test]
    fn every_sample_follows_the_help_and_type_of_its_family() {
        let shared = Shared::new(Routes::parse(&["web", "/api=api"]).expect("routes"));
        shared.metrics.retries.inc();
        let text = metrics(&shared);
        let mut family = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap_or("");
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                assert_eq!(name, family, "{line:?} outside its family in\n{text}");
            }
        }
        assert!(
            text.contains("\nrollcall_balancer_retries_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("\nrollcall_balancer_ejected_instances{service=\"api\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("\nrollcall_balancer_last_catalog_update_age_seconds -1\n"),
            "{text}"
        );
    }
}

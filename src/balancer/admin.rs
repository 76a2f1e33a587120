//! The balancer's admin endpoint (served by [`crate::admin_http`]): what it
//! routes on and how it fares, for people and for Prometheus. `/readyz` is
//! 200 once the catalog is read and while NATS is connected; `/catalog` is
//! the sets as JSON; `/` is the dashboard, live through `/events`
//! ([`super::dashboard`]).

use bytes::Bytes;
use futures::stream::BoxStream;

use crate::admin_http::Endpoint;

use super::{dashboard, Shared};

impl Endpoint for Shared {
    fn ready(&self) -> bool {
        Shared::ready(self)
    }

    fn not_ready_reason(&self) -> &'static str {
        "not ready: catalog not read yet or NATS disconnected"
    }

    fn metrics(&self) -> String {
        metrics(self)
    }

    fn page(&self, path: &str) -> Option<(&'static str, String)> {
        match path {
            "/catalog" => Some(("application/json", catalog(self))),
            other => dashboard::asset(other),
        }
    }

    fn events(&self, path: &str) -> Option<BoxStream<'static, Bytes>> {
        (path == "/events").then(|| dashboard::events(self))
    }

    fn refused(&self, status: http::StatusCode) {
        let status = status.as_u16();
        self.metrics
            .admin_refused
            .get_or_create(&crate::metrics::StatusLabels { status })
            .inc();
    }
}

/// The Prometheus text of the balancer's registry, with the gauges that
/// describe the sets brought up to date first.
pub fn metrics(shared: &Shared) -> String {
    let now = tokio::time::Instant::now().into_std();
    for (index, rotation) in shared.rotations.iter().enumerate() {
        let set = rotation.load();
        let ejected = set.ejected_count(now);
        shared.metrics.observe_set(index, set.live_count(), ejected);
    }
    shared.metrics.observe_feed();
    crate::metrics::encode(&shared.registry)
}

/// One instance in `/catalog`.
#[derive(serde::Serialize)]
struct Listed<'a> {
    id: &'a str,
    address: &'a str,
    weight: u32,
    failures: u32,
    ejected: bool,
    ejected_for_ms: Option<u64>,
}

/// The whole of `/catalog`.
#[derive(serde::Serialize)]
struct Listing<'a> {
    routes: Vec<&'a str>,
    services: Vec<ListedService<'a>>,
}

/// One service in `/catalog`.
#[derive(serde::Serialize)]
struct ListedService<'a> {
    service: &'a str,
    revision: u64,
    live: usize,
    instances: Vec<Listed<'a>>,
}

/// The sets the balancer routes on, as JSON. Serialized from borrowed
/// fields: a service of 100,000 instances is one pass, with no tree of
/// JSON values built first.
pub fn catalog(shared: &Shared) -> String {
    let now = tokio::time::Instant::now().into_std();
    let sets: Vec<_> = shared.rotations.iter().map(|r| r.load_full()).collect();
    let services: Vec<ListedService> = sets
        .iter()
        .map(|set| ListedService {
            service: set.service(),
            revision: set.revision(),
            live: set.live_count(),
            instances: set
                .members()
                .iter()
                .map(|member| {
                    let ejected_for_ms = member
                        .health
                        .ejected_until
                        .map(|until| until.saturating_duration_since(now).as_millis() as u64)
                        .filter(|ms| *ms > 0);
                    Listed {
                        id: member.id(),
                        address: member.authority.as_str(),
                        weight: member.instance.weight,
                        failures: member.health.failures,
                        ejected: ejected_for_ms.is_some(),
                        ejected_for_ms,
                    }
                })
                .collect(),
        })
        .collect();
    let routes: Vec<&str> = shared.routes.routes().map(|r| r.text.as_str()).collect();
    let listing = Listing { routes, services };
    // Strings, numbers and lists only: serializing cannot fail.
    serde_json::to_string(&listing).expect("/catalog serializes") + "\n"
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

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
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| *base == family)
                    .unwrap_or(name);
                assert_eq!(base, family, "{line:?} outside its family in\n{text}");
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
            !text.contains("rollcall_balancer_last_contact_age_seconds{"),
            "no age before any contact: {text}"
        );
    }

    #[test]
    fn the_feeds_stale_drops_are_read_at_scrape_time() {
        let mut shared = Shared::new(Routes::parse(&["web"]).expect("routes"));
        let feed = Arc::new(crate::subscription::Stats::default());
        shared.metrics.feed = Arc::clone(&feed);
        feed.stale.store(2, Ordering::Relaxed);
        let stale = "\nrollcall_balancer_catalog_updates_total{result=\"stale\"} ";
        assert!(metrics(&shared).contains(&format!("{stale}2\n")));
        feed.stale.store(5, Ordering::Relaxed);
        let text = metrics(&shared);
        assert!(text.contains(&format!("{stale}5\n")), "{text}");
    }
}

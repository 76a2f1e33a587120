//! What every long-running component reports to Prometheus: one registry per
//! process, one typed struct of metric families per component
//! ([`BalancerMetrics`], [`DiscoveryMetrics`], [`AgentMetrics`]) plus the
//! NATS link ([`NatsMetrics`]) they all share. The admin endpoint
//! ([`crate::admin_http`]) serves [`encode`]'s text at `/metrics`.
//!
//! Families are registered once, at start; the code that counts holds
//! handles (an `Arc` inside each metric), so counting is an atomic add. The
//! balancer's per-request families are resolved per instance when a snapshot
//! is applied ([`InstanceMetrics`]), not looked up by label on each request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::connect::Link;
use crate::protocol::{EventKind, OverrideAction, ProtocolError};

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A registry whose every name starts with `rollcall_`.
pub fn registry() -> Registry {
    Registry::with_prefix("rollcall")
}

/// The Prometheus text format (0.0.4) of everything in `registry`: the
/// format every scraper and `prometheus_client`'s parser read.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut text, registry);
    text
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub service: String,
    pub instance: String,
}

/// One request answered: by an instance (`instance` names it) or by
/// rollcall itself (`instance` empty; `service` empty when no route matched).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub instance: String,
    pub class: &'static str,
    pub answered_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub service: String,
    pub instance: String,
    pub kind: UpstreamFailure,
}

/// How an attempt at an instance failed.
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum UpstreamFailure {
    /// No connection could be made.
    connect,
    /// No response head within the upstream timeout.
    timeout,
    /// The connection was reset, or closed mid-answer, after the request
    /// went out.
    reset,
    /// The connection closed before the request went out.
    closed,
    /// Anything else the instance did wrong.
    broken,
}

impl UpstreamFailure {
    /// In declaration order: `kind as usize` indexes it.
    const ALL: [UpstreamFailure; 5] = [
        UpstreamFailure::connect,
        UpstreamFailure::timeout,
        UpstreamFailure::reset,
        UpstreamFailure::closed,
        UpstreamFailure::broken,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The status class of `status` as an index into [`CLASSES`].
fn class_index(status: http::StatusCode) -> usize {
    usize::from(status.as_u16() / 100).clamp(1, 5) - 1
}

/// The NATS link of any component: up or down, and how often it came back.
#[derive(Clone, Debug, Default)]
pub struct NatsMetrics {
    pub connected: Gauge,
    pub reconnects: Counter,
}

impl NatsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = NatsMetrics::default();
        let nats = registry.sub_registry_with_prefix("nats");
        nats.register(
            "connected",
            "1 while the NATS connection is up, 0 while it is down",
            metrics.connected.clone(),
        );
        nats.register(
            "reconnects",
            "Times the NATS connection came back after being lost",
            metrics.reconnects.clone(),
        );
        metrics
    }

    /// Follows `link` until its sender is gone (the connection dropped).
    pub async fn follow(self, mut link: watch::Receiver<Link>) {
        // The first connection (generation 1) is no reconnect.
        let mut seen = link.borrow().generation.max(1);
        loop {
            let now = *link.borrow_and_update();
            self.connected.set(i64::from(now.connected));
            if now.generation > seen {
                self.reconnects.inc_by(now.generation - seen);
                seen = now.generation;
            }
            if link.changed().await.is_err() {
                return;
            }
        }
    }
}

/// The balancer's families. Fixed label sets are exported at zero from the
/// start, so dashboards can be built on them before the first occurrence.
#[derive(Debug)]
pub struct BalancerMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub upstream_latency: Family<InstanceLabels, Histogram>,
    pub upstream_failures: Family<FailureLabels, Counter>,
    pub retries: Counter,
    pub ejections: Counter,
    /// Woken at each ejection, so the dashboard shows it at once.
    pub ejected: tokio::sync::Notify,
    /// Clients that went away before their answer (nginx's 499).
    pub client_aborts: Family<ServiceLabels, Counter>,
    /// Requests hyper refused before the proxy saw them (400, 414, 431).
    pub hyper_answers: Family<StatusLabels, Counter>,
    /// Requests that came back to this balancer, refused with 508.
    pub loops_refused: Counter,
    /// Admin requests refused: a method other than GET (405), no such
    /// page (404).
    pub admin_refused: Family<StatusLabels, Counter>,
    /// Client connections closed for a request head not sent in time.
    pub header_timeouts: Counter,
    /// Client connections closed after the idle timeout.
    pub idle_closed: Counter,
    /// Client request bodies that paused beyond the body timeout (408).
    pub body_timeouts: Counter,
    pub in_flight: Gauge,
    pub open_connections: Gauge,
    pub ejected_instances: Family<ServiceLabels, Gauge>,
    pub live_instances: Family<ServiceLabels, Gauge>,
    pub catalog_revision: Family<ServiceLabels, Gauge>,
    pub catalog_updates: Family<ResultLabels, Counter>,
    pub last_contact_age: Family<ServiceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub nats: NatsMetrics,
    /// The catalog feed's own counters: its stale drops are the balancer's,
    /// copied into `catalog_updates` at scrape time ([`Self::observe_feed`]).
    pub feed: Arc<crate::subscription::Stats>,
    /// Held while copying the feed's stale count, so two scrapes at once
    /// do not both add the same drops.
    stale_copy: Mutex<()>,
    services: Vec<String>,
    /// Per service (same order as `services`): its instances' handles.
    instances: Vec<ArcSwap<HashMap<String, Arc<InstanceMetrics>>>>,
    /// Per service: when its last snapshot arrived, stale or not.
    contacts: Vec<Mutex<Option<Instant>>>,
}

/// One instance's request handles, resolved once per snapshot.
#[derive(Debug)]
pub struct InstanceMetrics {
    responses: [Counter; 5],
    latency: Histogram,
    failures: [Counter; 5],
    /// The same latencies in finer buckets, read by the dashboard.
    latency_counts: LatencyCounts,
}

impl InstanceMetrics {
    /// The instance answered `status`, its response head `took` after the
    /// attempt began.
    pub fn answered(&self, status: http::StatusCode, took: Duration) {
        self.responses[class_index(status)].inc();
        self.latency.observe(took.as_secs_f64());
        self.latency_counts.observe(took);
    }

    /// Answers received from the instance so far, every status class.
    pub fn answers(&self) -> u64 {
        self.responses.iter().map(Counter::get).sum()
    }

    /// Its latencies so far, bucket by bucket ([`LatencyCounts`]).
    pub fn latency_counts(&self) -> [u64; LATENCY_BUCKETS] {
        self.latency_counts.read()
    }

    /// An attempt at the instance failed.
    pub fn failed(&self, kind: UpstreamFailure) {
        self.failures[kind as usize].inc();
    }
}

/// Buckets of [`LatencyCounts`]: 4 per doubling from 1 µs, the last one
/// open-ended (from about 67 s).
pub const LATENCY_BUCKETS: usize = 4 * 26;

/// Latencies counted in log-linear buckets, one atomic add each: 4 buckets
/// per power of two of microseconds, so a bucket's upper bound is at most
/// 25 % above any latency in it. Prometheus' histogram keeps coarser
/// buckets (a factor of 2) and cannot be read back; this one can.
#[derive(Debug)]
pub struct LatencyCounts([AtomicU64; LATENCY_BUCKETS]);

impl Default for LatencyCounts {
    fn default() -> Self {
        LatencyCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl LatencyCounts {
    pub fn observe(&self, took: Duration) {
        self.0[latency_bucket(took)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(&self) -> [u64; LATENCY_BUCKETS] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// The bucket of `took`: the power of two of its microseconds and the next
/// two bits below the top one.
pub fn latency_bucket(took: Duration) -> usize {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
    let exponent = 63 - micros.leading_zeros() as usize;
    let quarter = if exponent >= 2 {
        (micros >> (exponent - 2)) & 3
    } else {
        (micros << (2 - exponent)) & 3
    };
    (exponent * 4 + quarter as usize).min(LATENCY_BUCKETS - 1)
}

/// The upper bound of bucket `index` of [`latency_bucket`].
pub fn latency_bucket_bound(index: usize) -> Duration {
    let (exponent, quarter) = (index / 4, (index % 4) as u64);
    Duration::from_nanos(((5 + quarter) << exponent) * 1000 / 4)
}

/// One unit of a gauge (a request in flight, an open connection), held
/// until dropped: a request whose client went away leaves the gauge too.
pub struct Held<'a>(&'a Gauge);

impl<'a> Held<'a> {
    pub fn new(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Held(gauge)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl BalancerMetrics {
    /// Registers the balancer's families for `services` (the routed ones).
    pub fn new(registry: &mut Registry, services: &[String]) -> Self {
        let metrics = BalancerMetrics {
            requests: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            upstream_failures: Family::default(),
            retries: Counter::default(),
            ejections: Counter::default(),
            ejected: tokio::sync::Notify::new(),
            client_aborts: Family::default(),
            hyper_answers: Family::default(),
            loops_refused: Counter::default(),
            admin_refused: Family::default(),
            header_timeouts: Counter::default(),
            idle_closed: Counter::default(),
            body_timeouts: Counter::default(),
            in_flight: Gauge::default(),
            open_connections: Gauge::default(),
            ejected_instances: Family::default(),
            live_instances: Family::default(),
            catalog_revision: Family::default(),
            catalog_updates: Family::default(),
            last_contact_age: Family::default(),
            nats: NatsMetrics::new(registry),
            feed: Arc::default(),
            stale_copy: Mutex::new(()),
            services: services.to_vec(),
            instances: services.iter().map(|_| ArcSwap::default()).collect(),
            contacts: services.iter().map(|_| Mutex::new(None)).collect(),
        };
        // Fixed label sets start at zero, so a dashboard sees them before
        // the first occurrence.
        for result in ["applied", "stale", "unrouted", "bad_instance"] {
            metrics
                .catalog_updates
                .get_or_create_owned(&ResultLabels { result });
        }
        for status in [400, 414, 431] {
            metrics
                .hyper_answers
                .get_or_create_owned(&StatusLabels { status });
        }
        for status in [404, 405] {
            metrics
                .admin_refused
                .get_or_create_owned(&StatusLabels { status });
        }
        for service in services {
            let labels = ServiceLabels {
                service: service.clone(),
            };
            metrics.client_aborts.get_or_create_owned(&labels);
        }
        metrics.register(registry.sub_registry_with_prefix("balancer"));
        metrics
    }

    /// The counters of requests, attempts and refusals.
    fn register(&self, r: &mut Registry) {
        r.register("requests", "Requests answered, by service, instance, status class and who answered (instance or rollcall)", self.requests.clone());
        r.register(
            "upstream_latency_seconds",
            "From an attempt's start to the instance's response head",
            self.upstream_latency.clone(),
        );
        r.register(
            "upstream_failures",
            "Failed attempts at instances, by kind",
            self.upstream_failures.clone(),
        );
        r.register(
            "retries",
            "Requests sent again to another instance after a failed attempt",
            self.retries.clone(),
        );
        r.register(
            "ejections",
            "Instances taken out of rotation after a failed connection",
            self.ejections.clone(),
        );
        r.register(
            "client_aborts",
            "Clients that went away before their answer",
            self.client_aborts.clone(),
        );
        r.register(
            "hyper_answers",
            "Requests refused by the HTTP server itself, by status",
            self.hyper_answers.clone(),
        );
        r.register(
            "loops_refused",
            "Requests that came back to this balancer, refused with 508",
            self.loops_refused.clone(),
        );
        r.register(
            "admin_refused",
            "Admin requests refused, by status (404 no such page, 405 not a GET)",
            self.admin_refused.clone(),
        );
        r.register(
            "header_timeouts",
            "Client connections closed for a request head not sent in time",
            self.header_timeouts.clone(),
        );
        r.register(
            "idle_closed",
            "Client connections closed after the idle timeout",
            self.idle_closed.clone(),
        );
        r.register(
            "body_timeouts",
            "Client request bodies that paused beyond the body timeout (408)",
            self.body_timeouts.clone(),
        );
        self.register_state(r);
    }

    /// The gauges of what is open and routed on now, and the catalog's.
    fn register_state(&self, r: &mut Registry) {
        r.register(
            "in_flight_requests",
            "Requests being answered now",
            self.in_flight.clone(),
        );
        r.register(
            "open_client_connections",
            "Client connections open now",
            self.open_connections.clone(),
        );
        r.register(
            "ejected_instances",
            "Instances out of rotation after failed connections, per service",
            self.ejected_instances.clone(),
        );
        r.register(
            "live_instances",
            "Instances in the set, per service (ejected ones included)",
            self.live_instances.clone(),
        );
        r.register(
            "catalog_revision",
            "Revision of the set routed on, per service",
            self.catalog_revision.clone(),
        );
        r.register(
            "catalog_updates",
            "Catalog snapshots received, by outcome (applied, stale, unrouted, bad_instance)",
            self.catalog_updates.clone(),
        );
        r.register(
            "last_contact_age_seconds",
            "Time since the last snapshot of the service arrived; absent before the first",
            self.last_contact_age.clone(),
        );
    }

    /// The handles of instance `id` of service number `index`, when it is in
    /// the set.
    pub fn instance(&self, index: usize, id: &str) -> Option<Arc<InstanceMetrics>> {
        self.instances.get(index)?.load().get(id).cloned()
    }

    /// The handles of every instance of service number `index`, by id.
    pub fn instances_of(&self, index: usize) -> Arc<HashMap<String, Arc<InstanceMetrics>>> {
        self.instances
            .get(index)
            .map(ArcSwap::load_full)
            .unwrap_or_default()
    }

    /// The set of service number `index` now holds `ids`: resolves their
    /// handles and drops the series of instances that left.
    pub fn set_instances<'a>(&self, index: usize, ids: impl Iterator<Item = &'a str>) {
        let service = &self.services[index];
        let old = self.instances[index].load_full();
        let mut new = HashMap::with_capacity(old.len());
        for id in ids {
            let handles = old.get(id).cloned().unwrap_or_else(|| {
                Arc::new(InstanceMetrics {
                    responses: CLASSES.map(|class| {
                        self.requests
                            .get_or_create_owned(&answer(service, id, class, "instance"))
                    }),
                    latency: self
                        .upstream_latency
                        .get_or_create_owned(&instance_labels(service, id)),
                    failures: UpstreamFailure::ALL.map(|kind| {
                        self.upstream_failures
                            .get_or_create_owned(&failure(service, id, kind))
                    }),
                    latency_counts: LatencyCounts::default(),
                })
            });
            new.insert(id.to_owned(), handles);
        }
        for id in old.keys().filter(|id| !new.contains_key(*id)) {
            for class in CLASSES {
                self.requests
                    .remove(&answer(service, id, class, "instance"));
            }
            self.upstream_latency.remove(&instance_labels(service, id));
            for kind in UpstreamFailure::ALL {
                self.upstream_failures.remove(&failure(service, id, kind));
            }
        }
        self.instances[index].store(Arc::new(new));
    }

    /// An answer of rollcall's own: a 404 (no service) or the proxy's
    /// 502/503/504 and 400 for service number `index`.
    pub fn own_answer(&self, index: Option<usize>, status: http::StatusCode) {
        let service = index.map_or("", |i| self.services[i].as_str());
        self.requests
            .get_or_create(&answer(
                service,
                "",
                CLASSES[class_index(status)],
                "rollcall",
            ))
            .inc();
    }

    /// A client went away before its answer; `index` is its service's
    /// number once the request was routed.
    pub fn client_abort(&self, index: Option<usize>) {
        let service = index.map_or("", |i| self.services[i].as_str());
        self.client_aborts
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Hyper answered a malformed request head itself with `status`.
    pub fn hyper_answer(&self, status: http::StatusCode) {
        let status = status.as_u16();
        self.hyper_answers
            .get_or_create(&StatusLabels { status })
            .inc();
    }

    /// At scrape time: the stale snapshots the feed dropped so far.
    pub fn observe_feed(&self) {
        let _copying = self
            .stale_copy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let dropped = self.feed.stale.load(std::sync::atomic::Ordering::Relaxed);
        let stale = self
            .catalog_updates
            .get_or_create_owned(&ResultLabels { result: "stale" });
        stale.inc_by(dropped.saturating_sub(stale.get()));
    }

    pub fn catalog_update(&self, result: &'static str) {
        self.catalog_updates
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// A snapshot of service number `index` arrived.
    pub fn contact(&self, index: usize) {
        *self.contacts[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// The set of service number `index` now routes on `revision`.
    pub fn revision(&self, index: usize, revision: u64) {
        self.catalog_revision
            .get_or_create(&self.service_labels(index))
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    /// At scrape time: the sets as they are now, and the contact ages.
    pub fn observe_set(&self, index: usize, live: usize, ejected: usize) {
        let labels = self.service_labels(index);
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.live_instances.get_or_create(&labels).set(count(live));
        self.ejected_instances
            .get_or_create(&labels)
            .set(count(ejected));
        let contact = *self.contacts[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = contact {
            self.last_contact_age
                .get_or_create(&labels)
                .set(at.elapsed().as_secs_f64());
        }
    }

    fn service_labels(&self, index: usize) -> ServiceLabels {
        ServiceLabels {
            service: self.services[index].clone(),
        }
    }
}

fn answer(service: &str, instance: &str, class: &'static str, by: &'static str) -> RequestLabels {
    RequestLabels {
        service: service.to_owned(),
        instance: instance.to_owned(),
        class,
        answered_by: by,
    }
}

fn failure(service: &str, id: &str, kind: UpstreamFailure) -> FailureLabels {
    FailureLabels {
        service: service.to_owned(),
        instance: id.to_owned(),
        kind,
    }
}

fn instance_labels(service: &str, id: &str) -> InstanceLabels {
    InstanceLabels {
        service: service.to_owned(),
        instance: id.to_owned(),
    }
}

/// Discovery's families. `is_leader` and `epoch` follow the election: the
/// epoch is this replica's own while it leads, else the highest it heard.
#[derive(Clone, Debug)]
pub struct DiscoveryMetrics {
    pub events: Family<KindLabels, Counter>,
    /// `events` per kind, resolved once: counted on every message.
    by_kind: [Counter; 4],
    pub invalid_events: Family<ReasonLabels, Counter>,
    pub records_published: Counter,
    pub publish_failures: Counter,
    pub live_instances: Family<ServiceLabels, Gauge>,
    pub is_leader: Gauge,
    pub epoch: Gauge,
    /// `is_leader` of each partition a partitioned process owns.
    pub partition_is_leader: Family<PartitionLabels, Gauge>,
    /// `epoch` of each partition a partitioned process owns.
    pub partition_epoch: Family<PartitionLabels, Gauge>,
    /// Operator overrides applied, by action.
    pub overrides: Family<ActionLabels, Counter>,
    /// Operator overrides that changed nothing, by reason.
    pub invalid_overrides: Family<ReasonLabels, Counter>,
    pub nats: NatsMetrics,
}

/// Families registered nowhere: for a discovery nobody scrapes.
impl Default for DiscoveryMetrics {
    fn default() -> Self {
        DiscoveryMetrics::new(&mut Registry::default())
    }
}

const EVENT_KINDS: [&str; 4] = ["register", "heartbeat", "deregister", "unknown"];

impl DiscoveryMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let events: Family<KindLabels, Counter> = Family::default();
        let metrics = DiscoveryMetrics {
            by_kind: EVENT_KINDS.map(|kind| events.get_or_create_owned(&KindLabels { kind })),
            events,
            invalid_events: Family::default(),
            records_published: Counter::default(),
            publish_failures: Counter::default(),
            live_instances: Family::default(),
            is_leader: Gauge::default(),
            epoch: Gauge::default(),
            partition_is_leader: Family::default(),
            partition_epoch: Family::default(),
            overrides: Family::default(),
            invalid_overrides: Family::default(),
            nats: NatsMetrics::new(registry),
        };
        for reason in INVALID_REASONS {
            metrics
                .invalid_events
                .get_or_create_owned(&ReasonLabels { reason });
        }
        for action in OverrideAction::ALL {
            metrics.overrides.get_or_create_owned(&ActionLabels {
                action: action.as_str(),
            });
        }
        for reason in INVALID_OVERRIDE_REASONS {
            metrics
                .invalid_overrides
                .get_or_create_owned(&ReasonLabels { reason });
        }
        metrics.register(registry.sub_registry_with_prefix("discovery"));
        metrics
    }

    /// The families of partition `partition`'s writer: its `is_leader` and
    /// `epoch` are the partition's; every other family is shared.
    pub fn for_partition(&self, partition: u32) -> DiscoveryMetrics {
        let labels = PartitionLabels {
            partition: partition.to_string(),
        };
        DiscoveryMetrics {
            is_leader: self.partition_is_leader.get_or_create_owned(&labels),
            epoch: self.partition_epoch.get_or_create_owned(&labels),
            ..self.clone()
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "events",
            "Event messages received, by kind (register, heartbeat, deregister, unknown)",
            self.events.clone(),
        );
        r.register(
            "invalid_events",
            "Event messages ignored because they broke the protocol, by reason",
            self.invalid_events.clone(),
        );
        r.register(
            "records_published",
            "Catalog records stored (one per instance change written)",
            self.records_published.clone(),
        );
        r.register(
            "publish_failures",
            "Catalog records not stored (each is written again)",
            self.publish_failures.clone(),
        );
        r.register(
            "live_instances",
            "Live instances, per service, as last published",
            self.live_instances.clone(),
        );
        r.register(
            "is_leader",
            "1 while this discovery publishes the catalog",
            self.is_leader.clone(),
        );
        r.register(
            "epoch",
            "The leadership epoch this discovery knows",
            self.epoch.clone(),
        );
        r.register(
            "partition_is_leader",
            "1 while this discovery publishes the catalog of the partition (--partitions)",
            self.partition_is_leader.clone(),
        );
        r.register(
            "partition_epoch",
            "The leadership epoch of the partition this discovery knows (--partitions)",
            self.partition_epoch.clone(),
        );
        r.register(
            "overrides",
            "Operator overrides applied, by action (drain, undrain, weight, clear)",
            self.overrides.clone(),
        );
        r.register(
            "invalid_overrides",
            "Operator overrides that changed nothing (bad message, instance not live), by reason",
            self.invalid_overrides.clone(),
        );
    }

    /// One event message of `kind` (`None`: its subject names no kind).
    pub fn event(&self, kind: Option<EventKind>) {
        let index = match kind {
            Some(EventKind::Register) => 0,
            Some(EventKind::Heartbeat) => 1,
            Some(EventKind::Deregister) => 2,
            None => 3,
        };
        self.by_kind[index].inc();
    }

    pub fn invalid(&self, error: &ProtocolError) {
        let reason = invalid_reason(error);
        self.invalid_events
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// An override of `action` was applied.
    pub fn override_applied(&self, action: OverrideAction) {
        self.overrides
            .get_or_create(&ActionLabels {
                action: action.as_str(),
            })
            .inc();
    }

    /// An override changed nothing, for `reason` (see [`invalid_reason`]).
    pub fn invalid_override(&self, reason: &'static str) {
        self.invalid_overrides
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A record of `service`, which now has `live` instances, was stored.
    pub fn published(&self, service: &str, live: usize) {
        self.records_published.inc();
        self.live_instances
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(i64::try_from(live).unwrap_or(i64::MAX));
    }
}

const INVALID_REASONS: [&str; 12] = [
    "bad_name",
    "bad_subject",
    "bad_json",
    "out_of_range",
    "bad_address",
    "subject_mismatch",
    "unsorted_snapshot",
    "too_large",
    "operator_in_event",
    "bad_by",
    "bad_weight",
    "wrong_partition",
];

/// Why an override changed nothing: the protocol reasons, and an instance
/// that is not live.
const INVALID_OVERRIDE_REASONS: [&str; 9] = [
    "bad_name",
    "bad_subject",
    "bad_json",
    "out_of_range",
    "too_large",
    "bad_by",
    "bad_weight",
    "wrong_partition",
    UNKNOWN_INSTANCE,
];

/// The reason label of an override for an instance that is not live.
pub const UNKNOWN_INSTANCE: &str = "unknown_instance";

/// The rule an invalid event or override broke, as a label with few values.
pub fn invalid_reason(error: &ProtocolError) -> &'static str {
    match error {
        ProtocolError::EmptyName { .. }
        | ProtocolError::NameTooLong { .. }
        | ProtocolError::BadNameChar { .. } => "bad_name",
        ProtocolError::ForeignSubject { .. }
        | ProtocolError::UnknownKind { .. }
        | ProtocolError::SubjectShape { .. } => "bad_subject",
        ProtocolError::BadJson { .. } => "bad_json",
        ProtocolError::OutOfRange { .. } => "out_of_range",
        ProtocolError::BadAddress { .. } => "bad_address",
        ProtocolError::SubjectMismatch { .. } => "subject_mismatch",
        ProtocolError::UnsortedSnapshot { .. } => "unsorted_snapshot",
        ProtocolError::BadRecord { .. } => "bad_record",
        ProtocolError::TooLarge { .. } => "too_large",
        ProtocolError::OperatorInEvent { .. } => "operator_in_event",
        ProtocolError::UnknownAction { .. } => "bad_subject",
        ProtocolError::BadBy { .. } => "bad_by",
        ProtocolError::MissingWeight
        | ProtocolError::BadWeight { .. }
        | ProtocolError::UnexpectedWeight { .. } => "bad_weight",
        ProtocolError::WrongPartition { .. } => "wrong_partition",
    }
}

/// The agent's families.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    pub checks: Family<ResultLabels, Counter>,
    pub heartbeats: Counter,
    pub publish_failures: Family<KindLabels, Counter>,
    pub nats: NatsMetrics,
}

impl AgentMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = AgentMetrics {
            nats: NatsMetrics::new(registry),
            ..AgentMetrics::default()
        };
        for result in ["pass", "fail"] {
            metrics.checks.get_or_create_owned(&ResultLabels { result });
        }
        for kind in EventKind::ALL.map(EventKind::as_str) {
            metrics
                .publish_failures
                .get_or_create_owned(&KindLabels { kind });
        }
        let r = registry.sub_registry_with_prefix("agent");
        r.register(
            "checks",
            "Health checks run, by result (pass, fail)",
            metrics.checks.clone(),
        );
        r.register("heartbeats", "Heartbeats sent", metrics.heartbeats.clone());
        r.register(
            "publish_failures",
            "Events that could not be sent, by kind",
            metrics.publish_failures.clone(),
        );
        metrics
    }

    /// An event of `kind` was handed to NATS (`sent`) or could not be.
    pub fn sent(&self, kind: EventKind, sent: bool) {
        if !sent {
            let kind = kind.as_str();
            self.publish_failures
                .get_or_create(&KindLabels { kind })
                .inc();
        } else if kind == EventKind::Heartbeat {
            self.heartbeats.inc();
        }
    }

    pub fn check(&self, passed: bool) {
        let result = if passed { "pass" } else { "fail" };
        self.checks.get_or_create(&ResultLabels { result }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_help_type_and_samples() {
        let mut registry = registry();
        let metrics = BalancerMetrics::new(&mut registry, &["web".to_owned()]);
        metrics.retries.inc();
        let text = encode(&registry);
        assert!(
            text.contains(
                "# TYPE rollcall_balancer_retries_total counter\nrollcall_balancer_retries_total 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn instance_handles_count_under_their_labels_and_leave_with_the_instance() {
        let mut registry = registry();
        let metrics = BalancerMetrics::new(&mut registry, &["web".to_owned()]);
        metrics.set_instances(0, ["w1", "w2"].into_iter());
        let w1 = metrics.instance(0, "w1").expect("w1 resolved");
        w1.answered(http::StatusCode::OK, Duration::from_millis(2));
        let text = encode(&registry);
        let sample = "rollcall_balancer_requests_total{service=\"web\",instance=\"w1\",class=\"2xx\",answered_by=\"instance\"} 1";
        assert!(text.contains(sample), "{text}");
        metrics.set_instances(0, ["w2"].into_iter());
        assert!(metrics.instance(0, "w1").is_none());
        let text = encode(&registry);
        assert!(!text.contains("instance=\"w1\""), "{text}");
        assert!(text.contains("instance=\"w2\""), "{text}");
    }

    #[test]
    fn last_contact_age_is_absent_until_a_snapshot_arrives() {
        let mut registry = registry();
        let metrics = BalancerMetrics::new(&mut registry, &["web".to_owned()]);
        metrics.observe_set(0, 0, 0);
        assert!(!encode(&registry).contains("rollcall_balancer_last_contact_age_seconds{"));
        metrics.contact(0);
        metrics.observe_set(0, 0, 0);
        assert!(encode(&registry)
            .contains("rollcall_balancer_last_contact_age_seconds{service=\"web\"} "));
    }

    #[tokio::test]
    async fn nats_metrics_follow_the_link_and_count_only_reconnects() {
        let metrics = NatsMetrics::default();
        let (sender, link) = watch::channel(Link {
            connected: true,
            generation: 1,
        });
        // One thread: each yield lets `follow` see the link as it is.
        let following = tokio::spawn(metrics.clone().follow(link));
        tokio::task::yield_now().await;
        assert_eq!(metrics.connected.get(), 1);
        sender.send_replace(Link {
            connected: false,
            generation: 1,
        });
        tokio::task::yield_now().await;
        assert_eq!(metrics.connected.get(), 0);
        sender.send_replace(Link {
            connected: true,
            generation: 2,
        });
        drop(sender);
        following.await.expect("follow ends with its sender");
        assert_eq!(metrics.connected.get(), 1);
        assert_eq!(metrics.reconnects.get(), 1);
    }
}

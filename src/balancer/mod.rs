//! The balancer, last stage of the data path: a stream of catalog
//! [`Update`]s in, HTTP requests from clients spread round-robin over each
//! service's live instances out.
//!
//! It never sees NATS: [`serve`] (or [`Balancer::serve`]) takes a listener,
//! its configuration, any `Stream` of updates and a shutdown future, so
//! tests feed it from a channel and the binary from `subscription::follow`.
//! [`Balancer::applied`] tells a caller which revisions it routes on.
//!
//! - [`rotation`]: one service's round-robin set, swapped whole on change.
//! - [`routes`]: `ROUTE` arguments → which service a request goes to.
//! - [`proxy`]: the hyper reverse proxy (retries, ejections, own answers).
//! - [`upstream`]: each instance's pool of kept-alive connections.
//! - [`admin`]: `/healthz`, `/metrics`, `/catalog`.
//!
//! Updates: `Update::Service` replaces one service's set when its revision
//! is above the one held (otherwise it is counted as stale and ignored).
//! `Update::Reset` is authoritative only for the services it lists: a
//! service it does not list keeps its current set, because a Reset after a
//! reconnect may come from a catalog stream that does not (yet) hold every
//! service, and the protocol (`docs/protocol.md`) asks a balancer to keep
//! routing on the last snapshot it has rather than drop traffic. A service that really lost
//! its last instance arrives as a snapshot with no instances.

pub mod admin;
pub mod proxy;
pub mod rotation;
pub mod routes;
pub mod upstream;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::protocol::Snapshot;
use crate::subscription::Update;
use rotation::{Outcome, Rotation};
use routes::Routes;

/// Default time from sending a request upstream to its response head.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to open a connection to an instance.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time in-flight requests get to finish after shutdown begins.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the balancer needs besides its sockets and its updates.
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    pub routes: Routes,
    /// From the request sent upstream to the response head; beyond it the
    /// client gets a 504. The response body then streams without a limit.
    pub upstream_timeout: Duration,
    /// To open a TCP connection to an instance; beyond it the instance counts
    /// as unreachable (ejected, and the request retried elsewhere).
    pub connect_timeout: Duration,
    /// After shutdown begins, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
    /// The counters of the catalog feed given to `serve`
    /// ([`follow_with_stats`](crate::subscription::follow_with_stats)), for
    /// `/metrics`.
    pub feed: Arc<crate::subscription::Stats>,
}

impl BalancerConfig {
    pub fn new(routes: Routes) -> Self {
        BalancerConfig {
            routes,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            feed: Arc::default(),
        }
    }
}

/// Why the balancer could not run.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("cannot read the address of the {what} listener")]
    LocalAddr {
        what: &'static str,
        source: std::io::Error,
    },
}

/// State shared by the proxy, the catalog task and the admin endpoint.
#[derive(Debug)]
pub struct Shared {
    pub routes: Routes,
    /// One per entry of `routes.services()`, same order.
    pub rotations: Vec<Rotation>,
    pub metrics: Metrics,
    pub started: Instant,
    applied: watch::Sender<Applied>,
}

impl Shared {
    pub fn new(routes: Routes) -> Self {
        let rotations = routes.services().iter().map(|s| Rotation::new(s)).collect();
        Shared {
            routes,
            rotations,
            metrics: Metrics::default(),
            started: Instant::now(),
            applied: watch::Sender::new(Applied::default()),
        }
    }

    fn rotation(&self, service: &str) -> Option<&Rotation> {
        self.routes
            .services()
            .iter()
            .position(|s| s == service)
            .map(|index| &self.rotations[index])
    }

    /// Applies one catalog update to the sets, then tells the watchers of
    /// [`Balancer::applied`].
    pub fn apply(&self, update: Update) {
        let snapshots = match update {
            Update::Reset(snapshots) => {
                tracing::debug!(services = snapshots.len(), "catalog reset");
                snapshots
            }
            Update::Service(snapshot) => vec![snapshot],
        };
        let held: Vec<(&str, u64)> = snapshots
            .iter()
            .filter_map(|snapshot| self.apply_snapshot(snapshot))
            .collect();
        self.metrics
            .last_update_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.applied.send_modify(|applied| {
            applied.updates += 1;
            for (service, revision) in held {
                applied.revisions.insert(service.to_owned(), revision);
            }
        });
    }

    /// Applies one snapshot; for a routed service, the service and the
    /// revision its set holds afterwards.
    fn apply_snapshot<'s>(&self, snapshot: &'s Snapshot) -> Option<(&'s str, u64)> {
        let Some(rotation) = self.rotation(&snapshot.service) else {
            self.metrics.updates_unrouted.inc();
            tracing::debug!(service = %snapshot.service, "snapshot of a service no route names, ignored");
            return None;
        };
        match rotation.apply(snapshot) {
            Outcome::Replaced {
                membership_changed,
                skipped,
            } => {
                self.metrics.updates_applied.inc();
                for id in skipped {
                    self.metrics.updates_bad.inc();
                    tracing::warn!(
                        service = %snapshot.service,
                        instance = %id,
                        "instance address cannot be an HTTP authority, left out of rotation"
                    );
                }
                let ids: Vec<&str> = snapshot.instances.iter().map(|i| i.id.as_str()).collect();
                if membership_changed {
                    tracing::info!(
                        service = %snapshot.service,
                        revision = snapshot.revision,
                        instances = ?ids,
                        "set changed"
                    );
                } else {
                    tracing::debug!(
                        service = %snapshot.service,
                        revision = snapshot.revision,
                        "snapshot applied, same members"
                    );
                }
            }
        }
        Some((&snapshot.service, rotation.load().revision()))
    }
}

/// What the balancer has applied so far, as [`Balancer::applied`] reports
/// it after each catalog update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Catalog updates taken in, whatever came of them (applied, stale or
    /// naming no routed service).
    pub updates: u64,
    revisions: BTreeMap<String, u64>,
}

impl Applied {
    /// The revision of the set `service` routes on; 0 before its first
    /// snapshot or for a service no route names.
    pub fn revision(&self, service: &str) -> u64 {
        self.revisions.get(service).copied().unwrap_or(0)
    }
}

/// What `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Responses sent to clients by status class: index 0 is 1xx … 4 is 5xx.
    pub responses: [Counter; 5],
    pub connect_failures: Counter,
    pub retries: Counter,
    pub ejections: Counter,
    pub updates_applied: Counter,
    /// The catalog feed's own counters: its stale drops are the balancer's.
    pub feed: Arc<crate::subscription::Stats>,
    pub updates_unrouted: Counter,
    pub updates_bad: Counter,
    /// Milliseconds after start when the last update was applied; 0 for none.
    pub last_update_ms: AtomicU64,
}

impl Metrics {
    pub fn count_response(&self, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.responses[class].inc();
    }
}

/// A count that only goes up. Relaxed: no counter orders any other memory.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A balancer not yet serving: built first so a caller can watch what it
/// applies before any update arrives.
#[derive(Debug)]
pub struct Balancer {
    config: BalancerConfig,
    shared: Arc<Shared>,
}

impl Balancer {
    pub fn new(config: BalancerConfig) -> Self {
        let mut shared = Shared::new(config.routes.clone());
        shared.metrics.feed = Arc::clone(&config.feed);
        Balancer {
            config,
            shared: Arc::new(shared),
        }
    }

    /// Changes after each catalog update has been applied to the sets, so a
    /// caller can await a revision instead of polling `/catalog`.
    pub fn applied(&self) -> watch::Receiver<Applied> {
        self.shared.applied.subscribe()
    }

    /// Runs the balancer on `listener` (and, when given, the admin endpoint
    /// on `admin`) until `shutdown` resolves; then stops accepting, lets
    /// in-flight requests finish (up to `drain_timeout`) and returns.
    ///
    /// While `updates` is open its items replace the sets; when it ends,
    /// the balancer keeps routing on the last sets it has.
    pub async fn serve(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        updates: impl Stream<Item = Update> + Send + 'static,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), BalancerError> {
        let Balancer { config, shared } = self;
        let address = local_addr(&listener, "proxy")?;
        let follower = tokio::spawn(follow(shared.clone(), updates));
        let admin_task = match admin {
            Some(admin) => {
                let admin_address = local_addr(&admin, "admin")?;
                tracing::info!(address = %admin_address, "admin endpoint listening");
                Some(tokio::spawn(admin::serve(admin, shared.clone())))
            }
            None => None,
        };
        tracing::info!(
            %address,
            routes = ?config.routes.routes().map(|r| r.text.as_str()).collect::<Vec<_>>(),
            "balancer listening"
        );
        proxy::serve(listener, shared, &config, shutdown).await;
        follower.abort();
        if let Some(task) = admin_task {
            task.abort();
        }
        Ok(())
    }
}

/// [`Balancer::serve`] for a caller that does not watch what is applied.
pub async fn serve(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: BalancerConfig,
    updates: impl Stream<Item = Update> + Send + 'static,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BalancerError> {
    Balancer::new(config)
        .serve(listener, admin, updates, shutdown)
        .await
}

fn local_addr(listener: &TcpListener, what: &'static str) -> Result<SocketAddr, BalancerError> {
    listener
        .local_addr()
        .map_err(|source| BalancerError::LocalAddr { what, source })
}

async fn follow(shared: Arc<Shared>, updates: impl Stream<Item = Update>) {
    let mut updates = std::pin::pin!(updates);
    while let Some(update) = updates.next().await {
        shared.apply(update);
    }
    tracing::warn!("catalog updates ended; routing on the last sets received");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Instance;

    fn snapshot(service: &str, revision: u64, ids: &[&str]) -> Snapshot {
        Snapshot {
            service: service.into(),
            revision,
            instances: ids
                .iter()
                .enumerate()
                .map(|(i, id)| Instance::new(service, *id, "127.0.0.1", 5000 + i as u16))
                .collect(),
        }
    }

    fn ids(shared: &Shared, service: &str) -> Vec<String> {
        let rotation = shared.rotation(service).expect("routed");
        let set = rotation.load();
        set.members().iter().map(|m| m.id().to_owned()).collect()
    }

    #[test]
    fn a_reset_is_authoritative_only_for_the_services_it_lists() {
        let shared = Shared::new(Routes::parse(&["web", "/api=api"]).expect("routes"));
        shared.apply(Update::Service(snapshot("web", 1, &["w1"])));
        shared.apply(Update::Service(snapshot("api", 1, &["a1"])));
        shared.apply(Update::Reset(vec![snapshot("web", 2, &["w1", "w2"])]));
        assert_eq!(ids(&shared, "web"), ["w1", "w2"]);
        assert_eq!(ids(&shared, "api"), ["a1"], "api keeps its last set");
        assert_eq!(shared.metrics.updates_applied.get(), 3);
    }

    #[test]
    fn unrouted_snapshots_are_counted_and_ignored() {
        let shared = Shared::new(Routes::parse(&["web"]).expect("routes"));
        shared.apply(Update::Service(snapshot("web", 3, &["w1"])));
        shared.apply(Update::Reset(vec![
            snapshot("web", 4, &["w1"]),
            snapshot("other", 9, &["o1"]),
        ]));
        assert_eq!(ids(&shared, "web"), ["w1"]);
        assert_eq!(shared.metrics.updates_unrouted.get(), 1);
    }

    #[test]
    fn an_instance_with_an_unusable_address_is_left_out_and_counted() {
        let shared = Shared::new(Routes::parse(&["web"]).expect("routes"));
        let mut bad = snapshot("web", 1, &["w1", "w2"]);
        bad.instances[0].address = "bad host".into();
        shared.apply(Update::Service(bad));
        assert_eq!(ids(&shared, "web"), ["w2"]);
        assert_eq!(shared.metrics.updates_bad.get(), 1);
    }

    #[test]
    fn applied_reports_each_update_and_the_revisions_held() {
        let shared = Shared::new(Routes::parse(&["web", "/api=api"]).expect("routes"));
        let applied = shared.applied.subscribe();
        shared.apply(Update::Service(snapshot("web", 2, &["w1"])));
        shared.apply(Update::Reset(vec![
            snapshot("web", 3, &[]),
            snapshot("api", 4, &["a1"]),
            snapshot("other", 9, &["o1"]),
        ]));
        let seen = applied.borrow();
        assert_eq!(seen.updates, 2);
        assert_eq!(seen.revision("web"), 3);
        assert_eq!(seen.revision("api"), 4);
        assert_eq!(seen.revision("other"), 0, "unrouted services are not held");
    }
}

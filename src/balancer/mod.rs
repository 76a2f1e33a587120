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
//! - [`outlier`]: passive health, the policy of ejections and slow start.
//! - [`routes`]: `ROUTE` arguments → which service a request goes to.
//! - `proxy`: the hyper reverse proxy (retries, ejections, own answers).
//! - `upgrade`: WebSocket and other upgrades tunnelled, CONNECT refused.
//! - `upstream`: each instance's pool of kept-alive connections, and the
//!   HTTP/1.1 client side on them.
//! - [`h1`]: instances' responses as bytes: head, framing, chunks.
//! - [`workers`]: a runtime per core, sharing the listening address.
//! - [`limits`]: timeouts and the connection cap of both listeners.
//! - [`access_log`]: one line per request, when asked for.
//! - `admin`: what the admin endpoint shows (`/metrics`, `/catalog`).
//! - [`dashboard`]: the page at `/` of the admin port and its live
//!   `/events`.
//! - [`tls`]: HTTPS for clients, certificates reloadable.
//!
//! Updates: `Update::Service` replaces one service's set when its revision
//! is above the one held (otherwise it is counted as stale and ignored).
//! `Update::Reset` is authoritative only for the services it lists: a
//! service it does not list keeps its current set, because a Reset after a
//! reconnect may come from a catalog stream that does not (yet) hold every
//! service, and the protocol (`docs/protocol.md`) asks a balancer to keep
//! routing on the last snapshot it has rather than drop traffic. A service that really lost
//! its last instance arrives as a snapshot with no instances.

pub mod access_log;
mod admin;
pub mod dashboard;
pub mod h1;
pub mod limits;
pub mod outlier;
mod proxy;
pub mod rotation;
pub mod routes;
pub mod tls;
mod upgrade;
mod upstream;
pub mod workers;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use access_log::AccessLog;
use limits::Limits;

use crate::metrics::BalancerMetrics;
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
    /// client gets a 504. The response body then streams, each pause in it
    /// bounded by `limits.upstream_body_timeout`.
    pub upstream_timeout: Duration,
    /// To open a TCP connection to an instance; beyond it the instance counts
    /// as unreachable (ejected, and the request retried elsewhere).
    pub connect_timeout: Duration,
    /// After shutdown begins, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
    /// Whether the source of the updates is connected now, for `/readyz`.
    pub source: SourceCheck,
    /// Passive health: ejection thresholds and cap, slow start.
    pub outlier: outlier::OutlierPolicy,
    /// Client-side timeouts and the connection cap.
    pub limits: Limits,
    /// One line per request, when given.
    pub access_log: Option<AccessLog>,
    /// The dashboard's keep-alive and memory of events.
    pub dashboard: dashboard::DashboardSettings,
    /// The counters of the catalog feed given to `serve`
    /// ([`follow_with_stats`](crate::subscription::follow_with_stats)), for
    /// `/metrics`.
    pub feed: Arc<crate::subscription::Stats>,
}

/// Asks whether the source of the catalog updates (NATS, in the binary) is
/// connected right now. The balancer keeps routing either way; only
/// `/readyz` tells, so an orchestrator can see a balancer routing blind.
#[derive(Clone)]
pub struct SourceCheck(Arc<dyn Fn() -> bool + Send + Sync>);

impl SourceCheck {
    pub fn new(connected: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        SourceCheck(Arc::new(connected))
    }

    /// For a source that cannot be cut off, such as a channel.
    pub fn always() -> Self {
        SourceCheck::new(|| true)
    }

    pub fn connected(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for SourceCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SourceCheck").finish_non_exhaustive()
    }
}

impl BalancerConfig {
    pub fn new(routes: Routes) -> Self {
        BalancerConfig {
            routes,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            source: SourceCheck::always(),
            outlier: outlier::OutlierPolicy::default(),
            limits: Limits::default(),
            access_log: None,
            dashboard: dashboard::DashboardSettings::default(),
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
    #[error(transparent)]
    Worker(#[from] workers::WorkerError),
}

/// State shared by the proxy, the catalog task and the admin endpoint.
#[derive(Debug)]
pub struct Shared {
    pub routes: Routes,
    /// One per entry of `routes.services()`, same order.
    pub rotations: Vec<Rotation>,
    pub metrics: BalancerMetrics,
    /// Holds every family of `metrics`, for `/metrics`.
    pub registry: prometheus_client::registry::Registry,
    /// Names this balancer in the `Via` header of the requests it forwards,
    /// so a request that comes back to it is recognised.
    pub via: String,
    applied: watch::Sender<Applied>,
    /// Set by the first Reset: the whole catalog has been read once.
    pub catalog_read: AtomicBool,
    pub source: SourceCheck,
    /// What the dashboard shows and sends.
    pub board: dashboard::Board,
}

impl Shared {
    pub fn new(routes: Routes) -> Self {
        Shared::with_policy(routes, outlier::OutlierPolicy::default(), 1)
    }

    /// Sets whose instances keep one connection pool for each of `workers`.
    pub(crate) fn with_policy(
        routes: Routes,
        policy: outlier::OutlierPolicy,
        workers: usize,
    ) -> Self {
        let rotations = routes
            .services()
            .iter()
            .map(|s| Rotation::with_policy(s, policy, workers))
            .collect();
        let mut registry = crate::metrics::registry();
        let metrics = BalancerMetrics::new(&mut registry, routes.services());
        Shared {
            routes,
            rotations,
            metrics,
            registry,
            via: via_name(),
            applied: watch::Sender::new(Applied::default()),
            catalog_read: AtomicBool::new(false),
            source: SourceCheck::always(),
            board: dashboard::Board::default(),
        }
    }

    /// Ready to be sent traffic by an orchestrator: the catalog has been
    /// read and its source is connected.
    pub fn ready(&self) -> bool {
        self.catalog_read.load(Ordering::Relaxed) && self.source.connected()
    }

    fn service_index(&self, service: &str) -> Option<usize> {
        self.routes.services().iter().position(|s| s == service)
    }

    /// Applies one catalog update to the sets, then tells the watchers of
    /// [`Balancer::applied`].
    pub fn apply(&self, update: Update) {
        let snapshots = match update {
            Update::Reset(snapshots) => {
                tracing::debug!(services = snapshots.len(), "catalog reset");
                self.catalog_read.store(true, Ordering::Relaxed);
                snapshots
            }
            Update::Service(snapshot) => vec![snapshot],
        };
        let held: Vec<(&str, u64)> = snapshots
            .iter()
            .filter_map(|snapshot| self.apply_snapshot(snapshot))
            .collect();
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
        let Some(index) = self.service_index(&snapshot.service) else {
            self.metrics.catalog_update("unrouted");
            tracing::debug!(service = %snapshot.service, "snapshot of a service no route names, ignored");
            return None;
        };
        let rotation = &self.rotations[index];
        self.metrics.contact(index);
        match rotation.apply(snapshot) {
            Outcome::Replaced {
                membership_changed,
                skipped,
            } => {
                self.metrics.catalog_update("applied");
                self.metrics.revision(index, snapshot.revision);
                let set = rotation.load();
                self.metrics
                    .set_instances(index, set.members().iter().map(|m| m.id()));
                let now = tokio::time::Instant::now().into_std();
                self.board.observe(&self.rotations, index, &set, now);
                for id in skipped {
                    self.metrics.catalog_update("bad_instance");
                    tracing::warn!(
                        service = %snapshot.service,
                        instance = %id,
                        "instance address cannot be an HTTP authority, left out of rotation"
                    );
                }
                if membership_changed {
                    // A count, not the ids: a big service's list would be
                    // megabytes per change.
                    tracing::info!(
                        service = %snapshot.service,
                        revision = snapshot.revision,
                        instances = set.members().len(),
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

/// `rollcall-` and 64 random bits: unique per balancer, so two balancers
/// chained on purpose do not take each other for a loop. `RandomState`'s
/// keys are random per process and differ for each one made, which is all
/// the randomness this needs.
fn via_name() -> String {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
    format!("rollcall-{random:016x}")
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

/// A balancer not yet serving: built first so a caller can watch what it
/// applies before any update arrives.
#[derive(Debug)]
pub struct Balancer {
    config: BalancerConfig,
    shared: Arc<Shared>,
    https: Option<(TcpListener, Arc<tls::Tls>)>,
    /// The listeners of the workers beyond the one `serve` runs on.
    workers: Vec<std::net::TcpListener>,
}

impl Balancer {
    /// A balancer serving on the runtime that runs [`Balancer::serve`].
    pub fn new(config: BalancerConfig) -> Self {
        Balancer::with_workers(config, Vec::new())
    }

    /// A balancer that also serves each of `workers` (sockets sharing the
    /// address of the listener given to [`Balancer::serve`], from
    /// [`workers::bind`]) with a single-threaded runtime on a thread of its
    /// own. Each worker keeps its own connections to instances; the sets,
    /// passive health and metrics are shared. HTTPS is served by the first
    /// runtime only.
    pub fn with_workers(config: BalancerConfig, workers: Vec<std::net::TcpListener>) -> Self {
        let count = 1 + workers.len();
        let mut shared = Shared {
            source: config.source.clone(),
            board: dashboard::Board::new(config.dashboard),
            ..Shared::with_policy(config.routes.clone(), config.outlier, count)
        };
        shared.metrics.feed = Arc::clone(&config.feed);
        Balancer {
            config,
            shared: Arc::new(shared),
            https: None,
            workers,
        }
    }

    /// Also serves clients over TLS on `listener` with `tls`'s certificate,
    /// beside the plain listener.
    pub fn https(mut self, listener: TcpListener, tls: Arc<tls::Tls>) -> Self {
        self.https = Some((listener, tls));
        self
    }

    /// Changes after each catalog update has been applied to the sets, so a
    /// caller can await a revision instead of polling `/catalog`.
    pub fn applied(&self) -> watch::Receiver<Applied> {
        self.shared.applied.subscribe()
    }

    /// The families of the NATS link, for the caller that owns it to follow
    /// ([`crate::metrics::NatsMetrics::follow`]).
    pub fn nats_metrics(&self) -> crate::metrics::NatsMetrics {
        self.shared.metrics.nats.clone()
    }

    /// Runs the balancer on `listener` and the workers' listeners (and, when
    /// given, the admin endpoint on `admin`) until `shutdown` resolves; then
    /// every worker stops accepting, lets its in-flight requests finish (up
    /// to `drain_timeout`), and it returns once all have.
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
        let Balancer {
            config,
            shared,
            https,
            workers,
        } = self;
        let address = local_addr(&listener, "proxy")?;
        let https_address = match &https {
            Some((listener, _)) => Some(local_addr(listener, "HTTPS")?),
            None => None,
        };
        // Stops the workers when shutdown begins, or when `serve` is dropped.
        let stop = CancellationToken::new();
        let _stop_on_drop = stop.clone().drop_guard();
        let mut threads = Vec::with_capacity(workers.len());
        for (index, listener) in (1..).zip(workers) {
            let (shared, config) = (shared.clone(), config.clone());
            threads.push(workers::start(
                index,
                listener,
                shared,
                config,
                stop.clone(),
            )?);
        }
        let follower = tokio::spawn(follow(shared.clone(), updates));
        let admin_task = match admin {
            Some(admin) => {
                let admin_address = local_addr(&admin, "admin")?;
                tracing::info!(address = %admin_address, "admin endpoint listening");
                let endpoint: Arc<dyn crate::admin_http::Endpoint> = shared.clone();
                let limits = config.limits.clone();
                let sampler = tokio::spawn(dashboard::sample(shared.clone()));
                let admin = tokio::spawn(crate::admin_http::serve(admin, endpoint, limits));
                Some((admin, sampler))
            }
            None => None,
        };
        tracing::info!(
            %address,
            workers = 1 + threads.len(),
            routes = ?config.routes.routes().map(|r| r.text.as_str()).collect::<Vec<_>>(),
            "balancer listening"
        );
        let shutdown = {
            let stop = stop.clone();
            async move {
                shutdown.await;
                stop.cancel();
            }
        }
        .shared();
        let plain = proxy::serve(listener, None, shared.clone(), &config, shutdown.clone());
        match (https, https_address) {
            (Some((listener, tls)), Some(address)) => {
                tracing::info!(%address, certificate = %tls.certificate().display(), "HTTPS listening");
                let secure = proxy::serve(listener, Some(tls), shared, &config, shutdown);
                tokio::join!(plain, secure);
            }
            _ => plain.await,
        }
        workers::join(threads).await;
        follower.abort();
        if let Some((admin, sampler)) = admin_task {
            admin.abort();
            sampler.abort();
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

    fn updates(shared: &Shared, result: &'static str) -> u64 {
        let labels = crate::metrics::ResultLabels { result };
        shared.metrics.catalog_updates.get_or_create(&labels).get()
    }

    fn ids(shared: &Shared, service: &str) -> Vec<String> {
        let rotation = &shared.rotations[shared.service_index(service).expect("routed")];
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
        assert_eq!(updates(&shared, "applied"), 3);
    }

    #[test]
    fn ready_once_a_reset_is_applied_and_only_while_the_source_is_connected() {
        let connected = Arc::new(AtomicBool::new(true));
        let shared = Shared {
            source: SourceCheck::new({
                let connected = connected.clone();
                move || connected.load(Ordering::Relaxed)
            }),
            ..Shared::new(Routes::parse(&["web"]).expect("routes"))
        };
        shared.apply(Update::Service(snapshot("web", 1, &["w1"])));
        assert!(!shared.ready(), "one live snapshot is not the catalog");
        shared.apply(Update::Reset(vec![]));
        assert!(shared.ready());
        connected.store(false, Ordering::Relaxed);
        assert!(!shared.ready(), "not ready while the source is away");
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
        assert_eq!(updates(&shared, "unrouted"), 1);
    }

    #[test]
    fn an_instance_with_an_unusable_address_is_left_out_and_counted() {
        let shared = Shared::new(Routes::parse(&["web"]).expect("routes"));
        let mut bad = snapshot("web", 1, &["w1", "w2"]);
        bad.instances[0].address = "bad host".into();
        shared.apply(Update::Service(bad));
        assert_eq!(ids(&shared, "web"), ["w2"]);
        assert_eq!(updates(&shared, "bad_instance"), 1);
    }

    #[test]
    fn each_balancer_has_its_own_via_name() {
        let (one, two) = (via_name(), via_name());
        assert!(one.starts_with("rollcall-") && one.len() == 25, "{one}");
        assert_ne!(one, two);
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

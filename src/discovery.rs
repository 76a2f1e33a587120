//! Stage 2, discovery: register/heartbeat/deregister messages from NATS go
//! through the [`catalog`](crate::catalog) fold; every change is published as
//! a snapshot on `<prefix>.catalog.<service>` (kept by the catalog stream) and
//! handed on as a stream of [`Update`]s.
//!
//! Expiry sleeps until the catalog's next deadline; nothing scans. While the
//! NATS connection is down nothing can be heard, so nothing expires, and on
//! reconnect every instance counts as just heard.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::{jetstream, Client};
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::catalog::{payload_digest, Catalog, Change, Update};
use crate::catalog_stream::{self, CatalogStreamError};
use crate::protocol::{EventKind, Snapshot, Subjects};

/// Events folded before the changed services are published: under load one
/// snapshot covers many changes; when idle every event publishes at once.
const BATCH: usize = 4096;
/// The longest a change waits to be published while events keep arriving
/// faster than they are folded (a fleet joining at once): snapshots of a
/// busy service go out every few milliseconds, not once per event.
const MAX_COALESCE: Duration = Duration::from_millis(5);
/// How often to look at the connection again while it is down.
const BLIND_RECHECK: Duration = Duration::from_millis(100);

/// Why discovery could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot subscribe to {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
    #[error(transparent)]
    CatalogStream(#[from] CatalogStreamError),
    #[error("cannot adopt the stored catalog: {0}")]
    Adopt(CatalogStreamError),
    #[error("the NATS connection closed for good while following {subject}")]
    Closed { subject: String },
    #[error("the discovery task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Counters of a running discovery, readable at any time.
#[derive(Debug, Default)]
pub struct Stats {
    /// Event messages received, valid or not.
    pub events: AtomicU64,
    /// Event messages ignored because they broke the protocol.
    pub invalid: AtomicU64,
    /// Catalog changes (joins, updates, leaves).
    pub changes: AtomicU64,
    /// Instances that left by expiry.
    pub expired: AtomicU64,
    /// Snapshots published.
    pub published: AtomicU64,
    /// Snapshots that could not be handed to the NATS client.
    pub publish_failures: AtomicU64,
    /// Services adopted from the catalog stream at start.
    pub adopted_services: AtomicU64,
    /// Live instances right now.
    pub live_instances: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running discovery component.
pub struct Discovery {
    updates: broadcast::Sender<Update>,
    latest: Latest,
    stats: Arc<Stats>,
    task: JoinHandle<Result<(), DiscoveryError>>,
}

impl Discovery {
    /// The catalog as it changes: first a [`Update::Reset`] with every
    /// service, then one [`Update::Service`] per published snapshot. A
    /// consumer that falls behind gets a fresh `Reset` instead of the
    /// updates it missed.
    pub fn updates(&self) -> impl Stream<Item = Update> + Send + 'static {
        let receiver = self.updates.subscribe();
        let latest = Arc::clone(&self.latest);
        let reset = Update::Reset(current(&latest));
        futures::stream::once(async move { reset }).chain(futures::stream::unfold(
            (receiver, latest),
            |(mut receiver, latest)| async move {
                let update = match receiver.recv().await {
                    Ok(update) => update,
                    Err(broadcast::error::RecvError::Lagged(_)) => Update::Reset(current(&latest)),
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                Some((update, (receiver, latest)))
            },
        ))
    }

    /// The last published snapshot of every service.
    pub fn catalog(&self) -> Vec<Snapshot> {
        current(&self.latest)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Waits for discovery to stop (after its shutdown future resolved).
    pub async fn wait(self) -> Result<(), DiscoveryError> {
        self.task.await?
    }
}

/// The last published snapshot of every service, kept as the bytes that were
/// published (shared with the NATS client, not a second copy of the catalog).
type Latest = Arc<Mutex<BTreeMap<String, Bytes>>>;

fn current(latest: &Mutex<BTreeMap<String, Bytes>>) -> Vec<Snapshot> {
    latest
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .filter_map(|payload| serde_json::from_slice(payload).ok())
        .collect()
}

/// Starts discovery on `client`: subscribes to the event subjects, makes sure
/// the catalog stream exists, adopts the snapshots it keeps, then folds
/// events until `shutdown` resolves. Errors here are start-up errors; the
/// running task survives bad events and NATS outages.
pub async fn spawn(
    client: Client,
    subjects: Subjects,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Discovery, DiscoveryError> {
    spawn_with(client, subjects, DiscoveryConfig::default(), shutdown).await
}

/// Settings of discovery beyond the connection and the prefix.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Copies of the catalog stream when discovery has to create it.
    pub stream_replicas: usize,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig { stream_replicas: 1 }
    }
}

/// [`spawn`] with explicit settings.
pub async fn spawn_with(
    client: Client,
    subjects: Subjects,
    config: DiscoveryConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Discovery, DiscoveryError> {
    // One subscription for all kinds: NATS keeps one sender's messages in
    // order only within a subscription, and a deregister must not overtake
    // the heartbeat sent before it.
    let subject = subjects.events_wildcard();
    let events =
        client
            .subscribe(subject.clone())
            .await
            .map_err(|e| DiscoveryError::Subscribe {
                subject: subject.clone(),
                reason: e.to_string(),
            })?;
    client
        .flush()
        .await
        .map_err(|e| DiscoveryError::Subscribe {
            subject,
            reason: e.to_string(),
        })?;
    let js = jetstream::new(client.clone());
    catalog_stream::ensure(&js, &subjects, config.stream_replicas).await?;
    let stored = catalog_stream::read_last(&js, &subjects)
        .await
        .map_err(DiscoveryError::Adopt)?;

    let stats = Arc::new(Stats::default());
    let mut catalog = Catalog::new();
    let now = Instant::now().into_std();
    let mut latest = BTreeMap::new();
    for stored in stored.snapshots {
        if let Ok(payload) = serde_json::to_vec(&stored.snapshot) {
            latest.insert(stored.snapshot.service.clone(), Bytes::from(payload));
        }
        catalog.adopt(stored.snapshot, now);
        Stats::bump(&stats.adopted_services);
    }
    stats
        .live_instances
        .store(catalog.live_instances() as u64, Ordering::Relaxed);
    tracing::info!(
        services = catalog.services(),
        instances = catalog.live_instances(),
        prefix = subjects.prefix(),
        "discovery started; adopted the stored catalog"
    );

    let outlet = NatsOutlet {
        client,
        js,
        subjects: subjects.clone(),
        replicas: config.stream_replicas,
    };
    Ok(start(
        outlet, events, subjects, catalog, latest, stats, shutdown,
    ))
}

fn start<O: Outlet + 'static>(
    outlet: O,
    events: impl Stream<Item = async_nats::Message> + Unpin + Send + 'static,
    subjects: Subjects,
    catalog: Catalog,
    latest: BTreeMap<String, Bytes>,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Discovery {
    let (updates, _) = broadcast::channel(1024);
    let latest = Arc::new(Mutex::new(latest));
    let fold = Fold {
        outlet,
        subjects,
        catalog,
        stats: Arc::clone(&stats),
        updates: updates.clone(),
        latest: Arc::clone(&latest),
        dirty: BTreeSet::new(),
    };
    let task = tokio::spawn(fold.run(events, shutdown));
    Discovery {
        updates,
        latest,
        stats,
        task,
    }
}

/// Where the fold's snapshots go. NATS, but for the fold's own tests.
trait Outlet: Send {
    /// Whether events can be heard right now.
    fn connected(&self) -> bool;
    /// How many times the connection was (re)established so far.
    fn connections(&self) -> u64;
    /// Publishes one service's snapshot, already serialized.
    fn publish(
        &mut self,
        service: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// After a reconnect: whether the server forgot the stored catalog (so
    /// everything must be published again).
    fn catalog_lost(&mut self) -> impl Future<Output = bool> + Send;
    fn flush(&mut self) -> impl Future<Output = ()> + Send;
}

struct NatsOutlet {
    client: Client,
    js: jetstream::Context,
    subjects: Subjects,
    replicas: usize,
}

impl Outlet for NatsOutlet {
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn connections(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Relaxed)
    }

    async fn publish(&mut self, service: &str, payload: Bytes) -> Result<(), String> {
        self.client
            .publish(self.subjects.catalog(service), payload)
            .await
            .map_err(|e| e.to_string())
    }

    async fn catalog_lost(&mut self) -> bool {
        match catalog_stream::ensure(&self.js, &self.subjects, self.replicas).await {
            Ok(created) => created,
            Err(error) => {
                tracing::error!(%error, "cannot check the catalog stream after reconnecting");
                false
            }
        }
    }

    async fn flush(&mut self) {
        if let Err(error) = self.client.flush().await {
            tracing::warn!(%error, "could not flush the last snapshots at shutdown");
        }
    }
}

/// The state of the running loop.
struct Fold<O> {
    outlet: O,
    subjects: Subjects,
    catalog: Catalog,
    stats: Arc<Stats>,
    updates: broadcast::Sender<Update>,
    latest: Latest,
    /// Services changed since the last publish.
    dirty: BTreeSet<String>,
}

impl<O: Outlet> Fold<O> {
    async fn run(
        mut self,
        mut events: impl Stream<Item = async_nats::Message> + Unpin + Send,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DiscoveryError> {
        tokio::pin!(shutdown);
        let mut blind = false;
        let mut connections = self.outlet.connections();
        // When the oldest unpublished change happened, if any.
        let mut dirty_since: Option<Instant> = None;
        loop {
            let wake = if blind {
                Some(Instant::now() + BLIND_RECHECK)
            } else {
                self.catalog.next_deadline().map(Instant::from_std)
            };
            // Publish once nothing more is waiting, or when changes have
            // waited long enough under a load that never lets up.
            let mut publish = true;
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                // Before the events, so that expiry runs under any load.
                () = sleep_until(wake) => {
                    // A reconnect since the last look means a spell in which
                    // nothing could be heard, however short.
                    let reconnected = self.outlet.connections() != connections;
                    if !self.outlet.connected() {
                        if !blind {
                            tracing::warn!("NATS is unreachable: holding the catalog, no instance expires until it is back");
                        }
                        blind = true;
                    } else if blind || reconnected {
                        blind = false;
                        connections = self.outlet.connections();
                        self.catalog.refresh_all(Instant::now().into_std());
                        tracing::info!("NATS is back: every instance counts as just heard");
                        self.recover_stream().await;
                    } else {
                        self.expire();
                    }
                }
                message = events.next() => {
                    let Some(message) = message else {
                        return Err(DiscoveryError::Closed { subject: self.subjects.all() });
                    };
                    self.handle(&message);
                    // Fold whatever else is already here before publishing.
                    // Unconstrained: tokio's cooperative budget would end the
                    // batch early and make every few events a snapshot.
                    let mut drained = false;
                    for _ in 1..BATCH {
                        match tokio::task::unconstrained(events.next()).now_or_never() {
                            Some(Some(message)) => self.handle(&message),
                            Some(None) => {
                                return Err(DiscoveryError::Closed { subject: self.subjects.all() })
                            }
                            None => {
                                drained = true;
                                break;
                            }
                        }
                    }
                    if !drained && !self.dirty.is_empty() {
                        let since = *dirty_since.get_or_insert_with(Instant::now);
                        publish = since.elapsed() >= MAX_COALESCE;
                    }
                    if !drained {
                        // Let the timer and other tasks in between batches.
                        tokio::task::yield_now().await;
                    }
                }
            }
            if publish {
                dirty_since = None;
                self.publish_dirty().await;
            }
        }
        self.outlet.flush().await;
        tracing::info!(
            events = self.stats.events.load(Ordering::Relaxed),
            invalid = self.stats.invalid.load(Ordering::Relaxed),
            published = self.stats.published.load(Ordering::Relaxed),
            "discovery stopped"
        );
        Ok(())
    }

    fn handle(&mut self, message: &async_nats::Message) {
        Stats::bump(&self.stats.events);
        let now = Instant::now().into_std();
        // Most events are heartbeats repeating the last one byte for byte:
        // those only move a deadline, without parsing the JSON again.
        let repeatable = match self.subjects.parse_event_subject(&message.subject) {
            Ok((EventKind::Deregister, _, _)) | Err(_) => None,
            Ok((_, service, id)) => {
                let digest = payload_digest(&message.payload);
                if self.catalog.refresh(service, id, digest, now) {
                    return;
                }
                Some((service, id, digest))
            }
        };
        let event = match self
            .subjects
            .parse_event(&message.subject, &message.payload)
        {
            Ok(event) => event,
            Err(error) => {
                Stats::bump(&self.stats.invalid);
                tracing::warn!(subject = %message.subject, %error, "ignoring an invalid event");
                return;
            }
        };
        if let Some(change) = self.catalog.apply(event, now) {
            self.note(change);
        }
        if let Some((service, id, digest)) = repeatable {
            self.catalog.set_digest(service, id, digest);
        }
    }

    fn expire(&mut self) {
        for change in self.catalog.expire(Instant::now().into_std()) {
            Stats::bump(&self.stats.expired);
            self.note(change);
        }
    }

    fn note(&mut self, change: Change) {
        Stats::bump(&self.stats.changes);
        let address = self
            .catalog
            .instance(&change.service, &change.id)
            .map(|i| i.authority());
        tracing::info!(
            service = %change.service,
            id = %change.id,
            address = address.as_deref().unwrap_or("-"),
            revision = change.revision,
            "{}",
            change.kind.as_str()
        );
        self.dirty.insert(change.service);
    }

    /// When the server lost the catalog stream (restarted without its
    /// store), fills it again with what this discovery knows.
    async fn recover_stream(&mut self) {
        if self.outlet.catalog_lost().await {
            tracing::warn!("the catalog stream was gone; publishing every service again");
            for snapshot in self.catalog.snapshots() {
                self.publish(snapshot).await;
            }
        }
    }

    async fn publish_dirty(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        self.stats
            .live_instances
            .store(self.catalog.live_instances() as u64, Ordering::Relaxed);
        for service in std::mem::take(&mut self.dirty) {
            let Some(snapshot) = self.catalog.snapshot(&service) else {
                continue;
            };
            self.publish(snapshot).await;
        }
    }

    async fn publish(&mut self, snapshot: Snapshot) {
        let payload = match serde_json::to_vec(&snapshot) {
            Ok(payload) => Bytes::from(payload),
            Err(error) => {
                Stats::bump(&self.stats.publish_failures);
                tracing::error!(service = %snapshot.service, %error, "cannot serialize a snapshot");
                return;
            }
        };
        match self
            .outlet
            .publish(&snapshot.service, payload.clone())
            .await
        {
            Ok(()) => Stats::bump(&self.stats.published),
            Err(error) => {
                Stats::bump(&self.stats.publish_failures);
                tracing::error!(service = %snapshot.service, %error, "cannot publish a snapshot");
            }
        }
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(snapshot.service.clone(), payload);
        // Nobody following the updates is fine.
        let _ = self.updates.send(Update::Service(snapshot));
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::AtomicBool;

    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::protocol::Instance;

    /// Stands in for NATS on the publishing side only: the fold's own
    /// behaviour in time is what these tests pin down.
    struct RecordingOutlet {
        connected: Arc<AtomicBool>,
        connections: Arc<AtomicU64>,
        published: mpsc::UnboundedSender<Snapshot>,
    }

    impl Outlet for RecordingOutlet {
        fn connected(&self) -> bool {
            self.connected.load(Ordering::SeqCst)
        }

        fn connections(&self) -> u64 {
            self.connections.load(Ordering::SeqCst)
        }

        async fn publish(&mut self, service: &str, payload: Bytes) -> Result<(), String> {
            let snapshot: Snapshot = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
            assert_eq!(snapshot.service, service);
            self.published.send(snapshot).map_err(|e| e.to_string())
        }

        async fn catalog_lost(&mut self) -> bool {
            false
        }

        async fn flush(&mut self) {}
    }

    struct Harness {
        events: mpsc::UnboundedSender<async_nats::Message>,
        updates: Pin<Box<dyn Stream<Item = Update> + Send>>,
        published: mpsc::UnboundedReceiver<Snapshot>,
        connected: Arc<AtomicBool>,
        connections: Arc<AtomicU64>,
        discovery: Discovery,
        _stop: oneshot::Sender<()>,
    }

    impl Harness {
        async fn start(adopted: Vec<Snapshot>) -> Harness {
            let (events, receiver) = mpsc::unbounded_channel();
            let (published_tx, published) = mpsc::unbounded_channel();
            let connected = Arc::new(AtomicBool::new(true));
            let connections = Arc::new(AtomicU64::new(1));
            let (stop, stopped) = oneshot::channel::<()>();
            let mut catalog = Catalog::new();
            let mut latest = BTreeMap::new();
            for snapshot in adopted {
                let payload = serde_json::to_vec(&snapshot).expect("a snapshot serializes");
                latest.insert(snapshot.service.clone(), Bytes::from(payload));
                catalog.adopt(snapshot, Instant::now().into_std());
            }
            let discovery = start(
                RecordingOutlet {
                    connected: Arc::clone(&connected),
                    connections: Arc::clone(&connections),
                    published: published_tx,
                },
                Box::pin(futures::stream::unfold(receiver, |mut r| async move {
                    r.recv().await.map(|m| (m, r))
                })),
                Subjects::default(),
                catalog,
                latest,
                Arc::default(),
                async {
                    let _ = stopped.await;
                },
            );
            let mut updates: Pin<Box<dyn Stream<Item = Update> + Send>> =
                Box::pin(discovery.updates());
            let first = updates.next().await;
            assert!(matches!(first, Some(Update::Reset(_))), "{first:?}");
            Harness {
                events,
                updates,
                published,
                connected,
                connections,
                discovery,
                _stop: stop,
            }
        }

        fn send(&self, subject: &str, payload: &str) {
            self.events
                .send(async_nats::Message {
                    subject: subject.into(),
                    reply: None,
                    payload: payload.to_owned().into(),
                    headers: None,
                    status: None,
                    description: None,
                    length: payload.len(),
                })
                .expect("the fold is running");
        }

        fn register(&self, instance: &Instance) {
            let subject =
                Subjects::default().event(EventKind::Register, &instance.service, &instance.id);
            self.send(&subject, &serde_json::to_string(instance).unwrap());
        }

        fn heartbeat(&self, instance: &Instance) {
            let subject =
                Subjects::default().event(EventKind::Heartbeat, &instance.service, &instance.id);
            self.send(&subject, &serde_json::to_string(instance).unwrap());
        }

        async fn next_snapshot(&mut self) -> Snapshot {
            let update = self.updates.next().await.expect("discovery is running");
            let Update::Service(snapshot) = update else {
                panic!("expected one service's snapshot, got {update:?}");
            };
            let published = self.published.recv().await.expect("published");
            assert_eq!(
                published, snapshot,
                "what is handed on is what is published"
            );
            snapshot
        }
    }

    fn web(id: &str, ttl_ms: u64) -> Instance {
        let mut instance = Instance::new("web", id, "127.0.0.1", 8000);
        instance.ttl_ms = ttl_ms;
        instance
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_expires_exactly_at_its_ttl() {
        let mut h = Harness::start(Vec::new()).await;
        let t0 = Instant::now();
        h.register(&web("a", 3000));
        let joined = h.next_snapshot().await;
        assert_eq!(joined.instances, [web("a", 3000)]);
        assert_eq!(joined.revision, 1);
        let expired = h.next_snapshot().await;
        assert!(expired.instances.is_empty());
        assert_eq!(expired.revision, 2);
        assert_eq!(t0.elapsed(), Duration::from_millis(3000));
        assert_eq!(h.discovery.stats().expired.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_an_instance_and_publish_nothing() {
        let mut h = Harness::start(Vec::new()).await;
        let t0 = Instant::now();
        h.register(&web("a", 1000));
        h.next_snapshot().await;
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(600)).await;
            h.heartbeat(&web("a", 1000));
        }
        let last_heard = Instant::now();
        let expired = h.next_snapshot().await;
        assert!(expired.instances.is_empty());
        assert_eq!(expired.revision, 2, "the heartbeats published nothing");
        assert_eq!(last_heard.elapsed(), Duration::from_millis(1000));
        assert_eq!(last_heard - t0, Duration::from_millis(3000));
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_events_change_nothing_and_are_counted() {
        let mut h = Harness::start(Vec::new()).await;
        h.register(&web("a", 3000));
        h.next_snapshot().await;
        let bad = [
            ("rollcall.register.web.b", "{not json"),
            (
                "rollcall.register.web.b",
                r#"{"service":"web","id":"b","address":"h"}"#,
            ),
            (
                "rollcall.register.web.b",
                r#"{"service":"web","id":"b","address":"h","port":0}"#,
            ),
            (
                "rollcall.register.web.b",
                r#"{"service":"api","id":"b","address":"h","port":1}"#,
            ),
            (
                "rollcall.heartbeat.web.*",
                r#"{"service":"web","id":"*","address":"h","port":1}"#,
            ),
            ("rollcall.deregister.web.a", "not json"),
        ];
        for (subject, payload) in bad {
            h.send(subject, payload);
        }
        h.register(&web("c", 3000));
        let next = h.next_snapshot().await;
        let ids: Vec<_> = next.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(
            ids,
            ["a", "c"],
            "only the valid register changed the catalog"
        );
        assert_eq!(next.revision, 2);
        let stats = h.discovery.stats();
        assert_eq!(stats.invalid.load(Ordering::Relaxed), bad.len() as u64);
        assert_eq!(stats.events.load(Ordering::Relaxed), bad.len() as u64 + 2);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_expires_while_nats_is_unreachable() {
        let mut h = Harness::start(Vec::new()).await;
        h.register(&web("a", 1000));
        h.next_snapshot().await;
        h.connected.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(30)).await;
        h.connected.store(true, Ordering::SeqCst);
        h.connections.fetch_add(1, Ordering::SeqCst);
        // Once the fold sees the reconnect, a full TTL of grace.
        let back = Instant::now();
        let expired = h.next_snapshot().await;
        assert!(expired.instances.is_empty());
        let waited = back.elapsed();
        assert!(
            waited >= Duration::from_millis(1000)
                && waited <= BLIND_RECHECK + Duration::from_millis(1000),
            "expired {waited:?} after NATS came back"
        );
        assert_eq!(expired.revision, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_reconnect_between_deadlines_forgives_the_silence() {
        let mut h = Harness::start(Vec::new()).await;
        h.register(&web("a", 1000));
        h.next_snapshot().await;
        // The link dropped and came back before the deadline was looked at.
        h.connections.fetch_add(1, Ordering::SeqCst);
        let t0 = Instant::now();
        let expired = h.next_snapshot().await;
        assert!(expired.instances.is_empty());
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(2000),
            "one TTL of grace after the deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn adopted_instances_publish_nothing_until_they_change() {
        let adopted = Snapshot {
            service: "web".into(),
            revision: 7,
            instances: vec![web("a", 2000), web("b", 2000)],
        };
        let mut h = Harness::start(vec![adopted.clone()]).await;
        assert_eq!(h.discovery.catalog(), [adopted]);
        let t0 = Instant::now();
        h.heartbeat(&web("a", 2000));
        h.heartbeat(&web("b", 2000));
        let expired = h.next_snapshot().await;
        assert_eq!(
            expired.revision, 9,
            "both left by expiry, in one or two snapshots"
        );
        assert!(expired.instances.is_empty());
        assert_eq!(t0.elapsed(), Duration::from_millis(2000));
    }
}

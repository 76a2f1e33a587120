//! Discovery: register/heartbeat/deregister messages from NATS go through
//! the [`catalog`](crate::catalog) fold; every change is published as a
//! snapshot on `<prefix>.catalog.<service>` (kept by the catalog stream),
//! where [`subscription`](crate::subscription) picks it up for balancers.
//!
//! Expiry sleeps until the catalog's next deadline; nothing scans. While the
//! NATS connection is down nothing can be heard, so nothing expires, and on
//! reconnect every instance counts as just heard.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::client::{FlushErrorKind, SubscribeErrorKind};
use async_nats::{jetstream, Client};
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::catalog::{payload_digest, Catalog, Change};
use crate::catalog_stream::{self, CatalogStreamError};
use crate::connect::{Connection, Link, NatsError};
use crate::metrics::DiscoveryMetrics;
use crate::protocol::{EventKind, Snapshot, Subjects};

/// Events folded before the changed services are published: under load one
/// snapshot covers many changes; when idle every event publishes at once.
const BATCH: usize = 4096;
/// The longest a change waits to be published while events keep arriving
/// faster than they are folded (a fleet joining at once): snapshots of a
/// busy service go out every few milliseconds, not once per event.
const MAX_COALESCE: Duration = Duration::from_millis(5);

/// Why discovery could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot subscribe to {subject}")]
    Subscribe {
        subject: String,
        #[source]
        source: NatsError<SubscribeErrorKind>,
    },
    #[error("cannot flush the subscription to {subject}")]
    Flush {
        subject: String,
        #[source]
        source: NatsError<FlushErrorKind>,
    },
    #[error(transparent)]
    CatalogStream(#[from] CatalogStreamError),
    #[error("cannot adopt the stored catalog")]
    Adopt(#[source] CatalogStreamError),
    #[error("the NATS connection closed for good while following {subject}")]
    Closed { subject: String },
    #[error("the discovery task failed")]
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
    latest: Latest,
    stats: Arc<Stats>,
    task: JoinHandle<Result<(), DiscoveryError>>,
}

impl Discovery {
    /// The last published snapshot of every service: what an embedding
    /// program (the demo) or a test can look at without a NATS round trip.
    pub fn catalog(&self) -> Vec<Snapshot> {
        latest_snapshots(&self.latest)
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

fn latest_snapshots(latest: &Mutex<BTreeMap<String, Bytes>>) -> Vec<Snapshot> {
    latest
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .filter_map(|payload| serde_json::from_slice(payload).ok())
        .collect()
}

/// Starts discovery on `connection`: subscribes to the event subjects, makes
/// sure the catalog stream exists, adopts the snapshots it keeps, then folds
/// events until `shutdown` resolves. Errors here are start-up errors; the
/// running task survives bad events and NATS outages.
pub async fn spawn(
    connection: &Connection,
    subjects: Subjects,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Discovery, DiscoveryError> {
    spawn_with(connection, subjects, DiscoveryConfig::default(), shutdown).await
}

/// Settings of discovery beyond the connection and the prefix.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Copies of the catalog stream when discovery has to create it.
    pub stream_replicas: usize,
    pub metrics: DiscoveryMetrics,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            stream_replicas: 1,
            metrics: DiscoveryMetrics::default(),
        }
    }
}

/// [`spawn`] with explicit settings.
pub async fn spawn_with(
    connection: &Connection,
    subjects: Subjects,
    config: DiscoveryConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Discovery, DiscoveryError> {
    let client = connection.client.clone();
    // One subscription for all kinds: NATS keeps one sender's messages in
    // order only within a subscription, and a deregister must not overtake
    // the heartbeat sent before it.
    let subject = subjects.events_wildcard();
    let events =
        client
            .subscribe(subject.clone())
            .await
            .map_err(|source| DiscoveryError::Subscribe {
                subject: subject.clone(),
                source: NatsError(source),
            })?;
    client
        .flush()
        .await
        .map_err(|source| DiscoveryError::Flush {
            subject,
            source: NatsError(source),
        })?;
    let js = jetstream::new(client.clone());
    catalog_stream::ensure(&js, &subjects, config.stream_replicas).await?;
    let stored = catalog_stream::read_last(&js, &subjects)
        .await
        .map_err(DiscoveryError::Adopt)?;
    let adopted: Vec<Snapshot> = stored.snapshots.into_iter().map(|s| s.snapshot).collect();
    let wire = NatsWire {
        client,
        js,
        subjects: subjects.clone(),
        replicas: config.stream_replicas,
    };
    Ok(start(
        wire,
        events,
        connection.link(),
        subjects,
        adopted,
        config.metrics,
        shutdown,
    ))
}

/// Adopts `adopted` and runs the worker in a task of its own.
fn start<W: Wire + 'static>(
    wire: W,
    events: impl Stream<Item = async_nats::Message> + Unpin + Send + 'static,
    link: watch::Receiver<Link>,
    subjects: Subjects,
    adopted: Vec<Snapshot>,
    metrics: DiscoveryMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Discovery {
    let stats = Arc::new(Stats::default());
    let mut catalog = Catalog::new();
    let now = Instant::now().into_std();
    let mut latest = BTreeMap::new();
    for snapshot in adopted {
        if let Ok(payload) = serde_json::to_vec(&snapshot) {
            latest.insert(snapshot.service.clone(), Bytes::from(payload));
        }
        catalog.adopt(snapshot, now);
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
    let latest = Arc::new(Mutex::new(latest));
    let generation = link.borrow().generation;
    let worker = Worker {
        wire,
        subjects,
        catalog,
        stats: Arc::clone(&stats),
        metrics,
        latest: Arc::clone(&latest),
        dirty: BTreeSet::new(),
        dirty_since: None,
        blind: false,
        generation,
    };
    let task = tokio::spawn(worker.run(events, link, shutdown));
    Discovery {
        latest,
        stats,
        task,
    }
}

/// Where discovery's snapshots go: NATS, but for the worker's own tests.
trait Wire: Send {
    /// Publishes one service's snapshot, already serialized.
    fn publish(
        &mut self,
        service: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), async_nats::PublishError>> + Send;
    /// After a reconnect: whether the server forgot the stored catalog (so
    /// everything must be published again).
    fn catalog_lost(&mut self) -> impl Future<Output = bool> + Send;
    fn flush(&mut self) -> impl Future<Output = ()> + Send;
}

struct NatsWire {
    client: Client,
    js: jetstream::Context,
    subjects: Subjects,
    replicas: usize,
}

impl Wire for NatsWire {
    async fn publish(
        &mut self,
        service: &str,
        payload: Bytes,
    ) -> Result<(), async_nats::PublishError> {
        self.client
            .publish(self.subjects.catalog(service), payload)
            .await
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

/// The running loop around the catalog fold: events in, expiry on time,
/// snapshots out.
struct Worker<W> {
    wire: W,
    subjects: Subjects,
    catalog: Catalog,
    stats: Arc<Stats>,
    metrics: DiscoveryMetrics,
    latest: Latest,
    /// Services changed since the last publish.
    dirty: BTreeSet<String>,
    /// When the oldest unpublished change happened, if any.
    dirty_since: Option<Instant>,
    /// NATS was found unreachable: nothing can be heard, nothing expires.
    blind: bool,
    /// The link generation at the last look.
    generation: u64,
}

impl<W: Wire> Worker<W> {
    async fn run(
        mut self,
        mut events: impl Stream<Item = async_nats::Message> + Unpin + Send,
        mut link: watch::Receiver<Link>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DiscoveryError> {
        tokio::pin!(shutdown);
        loop {
            // Blind, only the link's return can end the spell.
            let wake = if self.blind {
                None
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
                () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    let now = *link.borrow_and_update();
                    self.look(now).await;
                }
                Ok(()) = link.changed(), if self.blind => {
                    let now = *link.borrow_and_update();
                    self.look(now).await;
                }
                message = events.next() => {
                    let Some(message) = message else {
                        return Err(DiscoveryError::Closed { subject: self.subjects.all() });
                    };
                    publish = self.fold_batch(&message, &mut events).await?;
                }
            }
            if publish {
                self.dirty_since = None;
                self.publish_dirty().await;
            }
        }
        self.wire.flush().await;
        tracing::info!(
            events = self.stats.events.load(Ordering::Relaxed),
            invalid = self.stats.invalid.load(Ordering::Relaxed),
            published = self.stats.published.load(Ordering::Relaxed),
            "discovery stopped"
        );
        Ok(())
    }

    /// At a deadline, or when the link changes while blind: expire what is
    /// due, unless the link is down (go blind) or came back since the last
    /// look, however briefly (forgive the silence).
    async fn look(&mut self, link: Link) {
        if !link.connected {
            if !self.blind {
                tracing::warn!("NATS is unreachable: holding the catalog, no instance expires until it is back");
            }
            self.blind = true;
        } else if self.blind || link.generation != self.generation {
            self.blind = false;
            self.generation = link.generation;
            self.catalog.refresh_all(Instant::now().into_std());
            tracing::info!("NATS is back: every instance counts as just heard");
            self.recover_stream().await;
        } else {
            self.expire();
        }
    }

    /// Folds `first` and whatever else is already waiting, up to [`BATCH`];
    /// whether to publish now.
    async fn fold_batch(
        &mut self,
        first: &async_nats::Message,
        events: &mut (impl Stream<Item = async_nats::Message> + Unpin + Send),
    ) -> Result<bool, DiscoveryError> {
        self.handle(first);
        // Unconstrained: tokio's cooperative budget would end the batch
        // early and make every few events a snapshot.
        for _ in 1..BATCH {
            match tokio::task::unconstrained(events.next()).now_or_never() {
                Some(Some(message)) => self.handle(&message),
                Some(None) => {
                    return Err(DiscoveryError::Closed {
                        subject: self.subjects.all(),
                    })
                }
                None => return Ok(true),
            }
        }
        let publish = self.dirty.is_empty()
            || self.dirty_since.get_or_insert_with(Instant::now).elapsed() >= MAX_COALESCE;
        // Let the timer and other tasks in between batches.
        tokio::task::yield_now().await;
        Ok(publish)
    }

    fn handle(&mut self, message: &async_nats::Message) {
        Stats::bump(&self.stats.events);
        let now = Instant::now().into_std();
        // Most events are heartbeats repeating the last one byte for byte:
        // those only move a deadline, without parsing the JSON again.
        let parsed = self.subjects.parse_event_subject(&message.subject);
        self.metrics
            .event(parsed.as_ref().ok().map(|(kind, _, _)| *kind));
        let repeatable = match parsed {
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
                self.metrics.invalid(&error);
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
        if let Some(conflict) = self.catalog.take_conflict(&change) {
            tracing::warn!("{conflict}");
        }
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
        if self.wire.catalog_lost().await {
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
                self.metrics.publish_failures.inc();
                tracing::error!(service = %snapshot.service, %error, "cannot serialize a snapshot");
                return;
            }
        };
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(snapshot.service.clone(), payload.clone());
        match self.wire.publish(&snapshot.service, payload).await {
            Ok(()) => {
                Stats::bump(&self.stats.published);
                self.metrics
                    .published(&snapshot.service, snapshot.instances.len());
            }
            Err(error) => {
                Stats::bump(&self.stats.publish_failures);
                self.metrics.publish_failures.inc();
                tracing::error!(service = %snapshot.service, %error, "cannot publish a snapshot");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::protocol::Instance;

    /// Stands in for NATS on the publishing side only: the worker's own
    /// behaviour in time is what these tests pin down.
    struct RecordingWire {
        published: mpsc::UnboundedSender<Snapshot>,
    }

    impl Wire for RecordingWire {
        async fn publish(
            &mut self,
            service: &str,
            payload: Bytes,
        ) -> Result<(), async_nats::PublishError> {
            let snapshot: Snapshot = serde_json::from_slice(&payload).expect("a snapshot");
            assert_eq!(snapshot.service, service);
            self.published
                .send(snapshot)
                .map_err(|_| async_nats::client::PublishErrorKind::Send.into())
        }

        async fn catalog_lost(&mut self) -> bool {
            false
        }

        async fn flush(&mut self) {}
    }

    const UP: Link = Link {
        connected: true,
        generation: 1,
    };

    struct Harness {
        events: mpsc::UnboundedSender<async_nats::Message>,
        published: mpsc::UnboundedReceiver<Snapshot>,
        link: watch::Sender<Link>,
        discovery: Discovery,
        _stop: oneshot::Sender<()>,
    }

    impl Harness {
        async fn start(adopted: Vec<Snapshot>) -> Harness {
            let (events, receiver) = mpsc::unbounded_channel();
            let (published_tx, published) = mpsc::unbounded_channel();
            let (link, link_rx) = watch::channel(UP);
            let (stop, stopped) = oneshot::channel::<()>();
            let discovery = start(
                RecordingWire {
                    published: published_tx,
                },
                Box::pin(futures::stream::unfold(receiver, |mut r| async move {
                    r.recv().await.map(|m| (m, r))
                })),
                link_rx,
                Subjects::default(),
                adopted,
                DiscoveryMetrics::default(),
                async {
                    let _ = stopped.await;
                },
            );
            Harness {
                events,
                published,
                link,
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
                .expect("the worker is running");
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

        fn set_link(&self, connected: bool, generation: u64) {
            self.link
                .send(Link {
                    connected,
                    generation,
                })
                .expect("the worker watches the link");
        }

        async fn next_snapshot(&mut self) -> Snapshot {
            let snapshot = self.published.recv().await.expect("published");
            assert!(
                self.discovery.catalog().contains(&snapshot),
                "what is published is what the catalog shows"
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
        h.set_link(false, 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        h.set_link(true, 2);
        // From the reconnect, a full TTL of grace.
        let back = Instant::now();
        let expired = h.next_snapshot().await;
        assert!(expired.instances.is_empty());
        let waited = back.elapsed();
        assert_eq!(
            waited,
            Duration::from_millis(1000),
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
        h.set_link(true, 2);
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

//! Discovery: register/heartbeat/deregister messages from NATS go through
//! the [`catalog`](crate::catalog) fold; every change is written as the
//! record of the instance it changed, kept by the catalog stream and
//! republished on `<prefix>.catalog.<service>.<instance>`, where
//! [`subscription`](crate::subscription) picks it up for balancers.
//!
//! Expiry sleeps until the catalog's next deadline; nothing scans. While the
//! NATS connection is down nothing can be heard, so nothing expires, and on
//! reconnect every instance counts as just heard.
//!
//! Several replicas may run on one NATS: every one folds every event (hot
//! standbys), one leads and writes ([`leader`] decides when to try, the
//! catalog stream's fence decides who wins, `fence` talks to it). A write
//! carries the leader's epoch and the stream refuses it once another replica
//! took over, so a superseded leader never gets a record to a balancer.
//!
//! Its own stalls are not the fleet's failures: before expiring, the loop
//! folds every event already waiting, and a loop turn that came far later
//! than its timer asked (the process was frozen or starved) gives every
//! instance a fresh TTL instead of expiring it, and the leader a full
//! silence before a follower takes over from it. When most of a service
//! expires at once after a normal turn, that is published: the process did
//! hear the silence, and a balancer keeping dead instances would send them
//! traffic (balancers retry, see the proxy's policy).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::client::{FlushErrorKind, SubscribeErrorKind};
use async_nats::jetstream;
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::catalog::{payload_digest, Catalog, Change, ChangeKind, Overridden};
use crate::catalog_stream::{self, CatalogStreamError};
use crate::connect::{Connection, Link, NatsError};
use crate::metrics::{invalid_reason, DiscoveryMetrics, UNKNOWN_INSTANCE};
use crate::partition::Partitions;
use crate::protocol::{
    EventKind, Leadership, Left, Override, OverrideReply, Presence, ProtocolError, Record,
    Snapshot, Subjects, LEADER_HEARTBEAT, MAX_EVENT_BYTES,
};

mod fence;
pub mod leader;
mod records;

use leader::{Decision, Election, Role};

/// Events folded before the changed instances are written: under load one
/// record covers many changes of its instance; when idle every event is
/// written at once.
const BATCH: usize = 4096;
/// The most records written in one turn of the loop: every record comes
/// back twice on the event subscription (stored and republished), and the
/// events that arrive while a window is written must be folded before the
/// subscription's buffer fills (a write of 100,000 records at once would
/// overflow it).
const WRITE_WINDOW: usize = 4096;
/// The longest a change waits to be published while events keep arriving
/// faster than they are folded (a fleet joining at once): records go out
/// every few milliseconds, not once per event.
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
    #[error("the NATS connection closed for good while following {subject}")]
    Closed { subject: String },
    #[error("the discovery task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("asked to stop before the catalog stream could be opened")]
    StoppedStarting,
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
    /// Records stored (one per instance change written).
    pub published: AtomicU64,
    /// Records that were not stored (written again).
    pub publish_failures: AtomicU64,
    /// Services adopted from the catalog stream at start.
    pub adopted_services: AtomicU64,
    /// Live instances right now.
    pub live_instances: AtomicU64,
    /// 1 while this replica leads (writes the catalog), else 0.
    pub leading: AtomicU64,
    /// The epoch this replica leads under, or last led under.
    pub epoch: AtomicU64,
    /// Times this replica took over.
    pub takeovers: AtomicU64,
    /// Writes the stream refused because another replica had taken over.
    pub superseded: AtomicU64,
    /// Loop turns that came so late (a frozen or starved process) that
    /// every instance got a fresh TTL instead of expiring.
    pub stalls: AtomicU64,
    /// Operator overrides applied (a repeated one included).
    pub overrides: AtomicU64,
    /// Operator overrides that changed nothing: a bad message, or an
    /// instance that is not live.
    pub invalid_overrides: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running discovery component.
pub struct Discovery {
    queries: mpsc::Sender<oneshot::Sender<Vec<Snapshot>>>,
    stats: Arc<Stats>,
    task: JoinHandle<Result<(), DiscoveryError>>,
}

impl Discovery {
    /// The catalog as this replica folded it, one snapshot per service:
    /// what an embedding program (the demo) or a test can look at without
    /// reading the stream. Built on demand by the running worker (nothing
    /// keeps a second copy); empty once discovery stopped.
    pub async fn catalog(&self) -> Vec<Snapshot> {
        let (answer, answered) = oneshot::channel();
        if self.queries.send(answer).await.is_err() {
            return Vec::new();
        }
        answered.await.unwrap_or_default()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Waits for discovery to stop (after its shutdown future resolved).
    pub async fn wait(self) -> Result<(), DiscoveryError> {
        self.task.await?
    }
}

/// Starts discovery on `connection`: subscribes to the event subjects, makes
/// sure the catalog stream exists, adopts the records it keeps, then folds
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
    /// This replica's name in the fence, the heartbeat and the logs;
    /// `<host>-<pid>-<start ms>` when `None`.
    pub replica: Option<String>,
    /// How long the catalog stream keeps the tombstone of an instance that
    /// left (at least a second).
    pub tombstone_ttl: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            stream_replicas: 1,
            metrics: DiscoveryMetrics::default(),
            replica: None,
            tombstone_ttl: catalog_stream::TOMBSTONE_TTL,
        }
    }
}

/// An epoch as the value of a gauge.
fn gauge(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}

/// `<host>-<pid>-<start ms>`: different for every process, also across
/// restarts of one.
fn default_replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!("{host}-{}-{}", std::process::id(), unix_ms() % 1_000_000)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn subscribe(
    client: &async_nats::Client,
    subject: String,
) -> Result<async_nats::Subscriber, DiscoveryError> {
    client
        .subscribe(subject.clone())
        .await
        .map_err(|source| DiscoveryError::Subscribe {
            subject,
            source: NatsError(source),
        })
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
    let events = subscribe(&client, subject.clone()).await?;
    let leaders = subscribe(&client, subjects.leader_heartbeat()).await?;
    // Every replica folds the overrides, so a standby that takes over has
    // them; only the leader answers.
    let overrides = subscribe(&client, subjects.operator_wildcard()).await?;
    client
        .flush()
        .await
        .map_err(|source| DiscoveryError::Flush {
            subject,
            source: NatsError(source),
        })?;
    let js = jetstream::new(client.clone());
    let shutdown = shutdown.boxed().shared();
    let opened = catalog_stream::retry_transient("open the catalog stream", || async {
        let ensured = catalog_stream::ensure(&js, &subjects, config.stream_replicas).await?;
        let stored = catalog_stream::read_last(&js, &subjects).await?;
        Ok((ensured, stored))
    });
    let (ensured, stored) = tokio::select! {
        opened = opened => opened?,
        () = shutdown.clone() => return Err(DiscoveryError::StoppedStarting),
    };
    let mut wire = fence::NatsWire::new(
        client,
        subjects.clone(),
        config.stream_replicas,
        config.tombstone_ttl,
    );
    let fence = wire.fence().await;
    let adopted = Adopted {
        stored: stored.snapshots.into_iter().map(|s| s.snapshot).collect(),
        migrated: ensured.migrated,
        fence,
    };
    let replica = config.replica.unwrap_or_else(default_replica_name);
    Ok(start(
        wire,
        Inputs {
            events,
            leaders,
            overrides,
            link: connection.link(),
        },
        subjects,
        replica,
        adopted,
        config.metrics,
        shutdown,
    ))
}

/// Starts one fenced writer per partition of `partitions` (`rollcall
/// discovery --partitions`): each [`spawn_with`] on the partition's
/// subjects, with its own election, and `is_leader` and `epoch` labelled by
/// partition; all stop when `shutdown` resolves.
pub async fn spawn_partitions(
    connection: &Connection,
    subjects: &Subjects,
    partitions: &Partitions,
    config: DiscoveryConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Vec<Discovery>, DiscoveryError> {
    let shutdown = shutdown.boxed().shared();
    let replica = config.replica.clone().unwrap_or_else(default_replica_name);
    let mut writers = Vec::new();
    for partition in partitions.iter() {
        let config = DiscoveryConfig {
            metrics: config.metrics.for_partition(partition.index()),
            replica: Some(replica.clone()),
            ..config.clone()
        };
        let subjects = subjects.in_partition(partition);
        writers.push(spawn_with(connection, subjects, config, shutdown.clone()).await?);
    }
    Ok(writers)
}

/// What discovery hears: events, leader heartbeats, operator overrides,
/// the link's state.
struct Inputs<E, L> {
    events: E,
    leaders: L,
    /// Plain subscriptions both, so of one type.
    overrides: L,
    link: watch::Receiver<Link>,
}

/// What a starting discovery finds in the catalog stream.
#[derive(Debug, Default)]
struct Adopted {
    stored: Vec<Snapshot>,
    /// Kept by a stream of an older shape: adopted, and written as records
    /// by the first takeover (they are no longer stored).
    migrated: Vec<Snapshot>,
    /// The fence's epoch, `None` when no replica ever led.
    fence: Option<u64>,
}

/// Adopts `adopted` and runs the worker in a task of its own.
fn start<W, E, L>(
    wire: W,
    inputs: Inputs<E, L>,
    subjects: Subjects,
    replica: String,
    adopted: Adopted,
    metrics: DiscoveryMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Discovery
where
    W: Wire + 'static,
    E: Stream<Item = async_nats::Message> + Unpin + Send + 'static,
    L: Stream<Item = async_nats::Message> + Unpin + Send + 'static,
{
    let stats = Arc::new(Stats::default());
    let mut catalog = Catalog::new();
    let now = Instant::now().into_std();
    // A partition's writer keeps only its partition's services.
    for snapshot in adopted
        .stored
        .into_iter()
        .chain(adopted.migrated)
        .filter(|s| subjects.owns(&s.service))
    {
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
        %replica,
        "discovery started; adopted the stored catalog"
    );
    let span = match subjects.partition() {
        Some(partition) => tracing::info_span!("partition", %partition),
        None => tracing::Span::none(),
    };
    let (queries, asked) = mpsc::channel(16);
    let generation = inputs.link.borrow().generation;
    let worker = Worker {
        wire,
        subjects,
        catalog,
        stats: Arc::clone(&stats),
        metrics,
        asked,
        dirty: BTreeMap::new(),
        unstored: BTreeMap::new(),
        dirty_since: None,
        replies: Vec::new(),
        blind: false,
        generation,
        election: Election::new(replica, adopted.fence, now),
        last_turn: Instant::now(),
        invalid_log: InvalidLog::default(),
    };
    let task = tokio::spawn(worker.run(inputs, shutdown).instrument(span));
    Discovery {
        queries,
        stats,
        task,
    }
}

/// One record to write: serialized, with its key, and whether it is a
/// tombstone (kept only for the tombstone TTL).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Write {
    service: String,
    id: String,
    payload: Bytes,
    left: Option<Left>,
}

/// An instance changed since the last write: the revision of its last
/// change, and why it left should it be gone when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    revision: u64,
    left: Left,
}

/// What became of one fenced record write.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Written {
    Stored,
    /// Another replica took over: the fence holds this sequence, if known.
    Superseded(Option<u64>),
    /// Not known to be stored (no stream leader, a timeout): write again.
    Failed(String),
}

/// What became of a takeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fenced {
    Won(u64),
    /// The fence holds this sequence (if known): someone else leads.
    Lost(Option<u64>),
}

/// Where discovery's writes go: NATS, but for the worker's own tests.
trait Wire: Send {
    /// Writes records under `epoch`, each only if the fence still holds
    /// it; what became of each, in order.
    fn write(&mut self, epoch: u64, batch: Vec<Write>)
        -> impl Future<Output = Vec<Written>> + Send;
    /// Says, unstored, that this replica leads.
    fn heartbeat(&mut self, payload: Bytes) -> impl Future<Output = ()> + Send;
    /// Answers a request (an override) on its reply subject.
    fn reply(&mut self, subject: String, payload: Bytes) -> impl Future<Output = ()> + Send;
    /// Writes the fence if its last sequence is `expected`.
    fn take_over(&mut self, expected: u64, payload: Bytes) -> impl Future<Output = Fenced> + Send;
    /// The fence's epoch now, `None` when never written.
    fn fence(&mut self) -> impl Future<Output = Option<u64>> + Send;
    /// The stored records, for a new leader to adopt.
    fn read_stored(
        &mut self,
    ) -> impl Future<Output = Result<Vec<Record>, CatalogStreamError>> + Send;
    /// After a reconnect: whether the server forgot the stored catalog.
    fn catalog_lost(&mut self) -> impl Future<Output = bool> + Send;
    fn flush(&mut self) -> impl Future<Output = ()> + Send;
    /// The floor of new revisions: the wall clock in microseconds.
    fn clock(&self) -> u64;
}

/// Invalid events are logged at most this often, each line saying how many
/// were ignored since the last: junk flooding the event subjects must not
/// become a flood of log lines (the metrics count every one).
const INVALID_LOG_EVERY: Duration = Duration::from_secs(1);

/// The log of invalid events, thinned to one line per [`INVALID_LOG_EVERY`].
#[derive(Debug, Default)]
struct InvalidLog {
    last: Option<Instant>,
    /// Invalid events since the last line that it did not show.
    unlogged: u64,
}

impl InvalidLog {
    fn note(&mut self, subject: &str, error: &ProtocolError) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < INVALID_LOG_EVERY) {
            self.unlogged += 1;
            return;
        }
        self.last = Some(now);
        let also_ignored = std::mem::take(&mut self.unlogged);
        tracing::warn!(%subject, %error, also_ignored, "ignoring an invalid event");
    }
}

/// A loop turn this much later than the last one means the process itself
/// stood still: the loop wakes at least every [`LEADER_HEARTBEAT`].
const STALL: Duration = Duration::from_secs(1);

/// The running loop around the catalog fold: events in, expiry on time,
/// records out when leading.
struct Worker<W> {
    wire: W,
    subjects: Subjects,
    catalog: Catalog,
    stats: Arc<Stats>,
    metrics: DiscoveryMetrics,
    /// Asks for the folded catalog ([`Discovery::catalog`]).
    asked: mpsc::Receiver<oneshot::Sender<Vec<Snapshot>>>,
    /// Instances changed since the last write.
    dirty: BTreeMap<(String, String), Pending>,
    /// Instances whose last write is not known to be stored: written again
    /// at the next tick, under a new revision.
    unstored: BTreeMap<(String, String), Left>,
    /// When the oldest unpublished change happened, if any.
    dirty_since: Option<Instant>,
    /// Answers to overrides, sent once their records are written.
    replies: Vec<(String, Bytes)>,
    /// NATS was found unreachable: nothing can be heard, nothing expires.
    blind: bool,
    /// The link generation at the last look.
    generation: u64,
    election: Election,
    /// When the loop last took a tick or looked at deadlines.
    last_turn: Instant,
    invalid_log: InvalidLog,
}

impl<W: Wire> Worker<W> {
    async fn run<E, L>(
        mut self,
        mut inputs: Inputs<E, L>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DiscoveryError>
    where
        E: Stream<Item = async_nats::Message> + Unpin + Send,
        L: Stream<Item = async_nats::Message> + Unpin + Send,
    {
        tokio::pin!(shutdown);
        let mut ticks = tokio::time::interval(LEADER_HEARTBEAT);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                // First what the leaders say, so that a thawed leader learns
                // it was superseded before anything else.
                Some(message) = inputs.leaders.next() => self.on_leader(&message),
                Some(message) = inputs.overrides.next() => self.on_override(&message),
                Some(answer) = self.asked.recv() => {
                    let _ = answer.send(self.catalog.snapshots());
                    publish = false;
                }
                _ = ticks.tick() => self.tick(&mut inputs.events).await?,
                // Before the events, so that expiry runs under any load.
                () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    let now = *inputs.link.borrow_and_update();
                    self.look(now, &mut inputs.events).await?;
                }
                Ok(()) = inputs.link.changed(), if self.blind => {
                    let now = *inputs.link.borrow_and_update();
                    self.look(now, &mut inputs.events).await?;
                }
                message = inputs.events.next() => {
                    let Some(message) = message else {
                        return Err(DiscoveryError::Closed { subject: self.subjects.all() });
                    };
                    publish = self.fold_batch(&message, &mut inputs.events).await?;
                }
                // Records left over from the last write: the next window,
                // once the events that came meanwhile are folded.
                () = std::future::ready(()), if self.election.epoch().is_some() && !self.dirty.is_empty() => {}
            }
            if publish {
                self.dirty_since = None;
                self.publish_dirty().await;
                // Answered once every record is written, the override's too.
                if self.dirty.is_empty() {
                    for (subject, payload) in std::mem::take(&mut self.replies) {
                        self.wire.reply(subject, payload).await;
                    }
                }
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

    /// A leader heartbeat: someone else leads, or this leader heard itself.
    fn on_leader(&mut self, message: &async_nats::Message) {
        let Ok(heartbeat) = serde_json::from_slice::<Leadership>(&message.payload) else {
            tracing::debug!(subject = %message.subject, "ignoring an unreadable leader heartbeat");
            return;
        };
        let known = self.stats.epoch.load(Ordering::Relaxed);
        if self.election.heard(&heartbeat, Instant::now().into_std()) {
            tracing::warn!(leader = %heartbeat.replica, epoch = heartbeat.epoch, "superseded: another replica leads; stopping writes");
            self.stepped_down();
        }
        if heartbeat.replica != self.election.replica() && heartbeat.epoch > known {
            self.stats.epoch.store(heartbeat.epoch, Ordering::Relaxed);
            self.metrics.epoch.set(gauge(heartbeat.epoch));
            tracing::info!(leader = %heartbeat.replica, epoch = heartbeat.epoch, since_ms = heartbeat.since_ms, "following the catalog leader");
        }
    }

    /// An operator's override: folded by every replica; the leader answers
    /// a request with the instance as it now stands, or why nothing changed.
    fn on_override(&mut self, message: &async_nats::Message) {
        let reply = match self.apply_override(message) {
            Ok(instance) => OverrideReply {
                ok: true,
                instance: Some(instance),
                error: None,
                reason: None,
            },
            Err((reason, error)) => {
                Stats::bump(&self.stats.invalid_overrides);
                self.metrics.invalid_override(reason);
                tracing::warn!(subject = %message.subject, %error, "ignoring an invalid override");
                OverrideReply {
                    ok: false,
                    instance: None,
                    error: Some(error),
                    reason: Some(reason.to_owned()),
                }
            }
        };
        let Some(subject) = &message.reply else {
            return;
        };
        if self.election.epoch().is_none() {
            return;
        }
        match serde_json::to_vec(&reply) {
            Ok(payload) => self
                .replies
                .push((subject.to_string(), Bytes::from(payload))),
            Err(error) => tracing::error!(%error, "cannot serialize an override reply"),
        }
    }

    /// Parses and folds one override; the instance as it now stands, or
    /// the reason label and the message of why nothing changed.
    fn apply_override(
        &mut self,
        message: &async_nats::Message,
    ) -> Result<crate::protocol::Instance, (&'static str, String)> {
        let request: Override = self
            .subjects
            .parse_override(&message.subject, &message.payload)
            .map_err(|error| (invalid_reason(&error), error.to_string()))?;
        self.catalog.set_clock(self.wire.clock());
        let Overridden { instance, change } = self
            .catalog
            .apply_override(&request, unix_ms())
            .map_err(|error| (UNKNOWN_INSTANCE, error.to_string()))?;
        Stats::bump(&self.stats.overrides);
        self.metrics.override_applied(request.change.action());
        let Some(change) = change else {
            tracing::debug!(service = %request.service, id = %request.id, by = %request.by, change = %request.change, "override changed nothing");
            return Ok(instance);
        };
        Stats::bump(&self.stats.changes);
        tracing::info!(
            service = %change.service,
            id = %change.id,
            by = %request.by,
            change = %request.change,
            weight = instance.weight,
            revision = change.revision,
            "overridden by an operator"
        );
        self.mark(&change);
        Ok(instance)
    }

    fn stepped_down(&mut self) {
        self.stats.leading.store(0, Ordering::Relaxed);
        self.metrics.is_leader.set(0);
        self.unstored.clear();
    }

    /// Every [`LEADER_HEARTBEAT`]: notice a stall, run the election, say
    /// that this replica leads, write again what was not stored.
    async fn tick(
        &mut self,
        events: &mut (impl Stream<Item = async_nats::Message> + Unpin + Send),
    ) -> Result<(), DiscoveryError> {
        self.notice_stall(events)?;
        let now = Instant::now().into_std();
        match self.election.tick(now) {
            Decision::Wait => {}
            Decision::StepDown => {
                tracing::warn!("cannot hear this replica's own leader heartbeat: stopping writes");
                self.election.follow(None, now);
                self.stepped_down();
            }
            Decision::TakeOver { expected } => self.take_over(expected).await,
        }
        if let Role::Leader { epoch, since_ms } = self.election.role() {
            let beat = Leadership {
                replica: self.election.replica().to_owned(),
                epoch,
                since_ms,
            };
            if let Ok(payload) = serde_json::to_vec(&beat) {
                self.wire.heartbeat(Bytes::from(payload)).await;
            }
            self.catalog.set_clock(self.wire.clock());
            for ((service, id), left) in std::mem::take(&mut self.unstored) {
                let revision = self.fresh_revision(&service);
                self.dirty.insert((service, id), Pending { revision, left });
            }
        }
        Ok(())
    }

    /// When the loop turned far later than it asked to (the process was
    /// frozen or starved), first folds every event already waiting, then
    /// counts every instance, and the leader, as just heard: the silence was
    /// this process's.
    fn notice_stall(
        &mut self,
        events: &mut (impl Stream<Item = async_nats::Message> + Unpin + Send),
    ) -> Result<(), DiscoveryError> {
        let now = Instant::now();
        let gap = now - self.last_turn;
        self.last_turn = now;
        if gap < STALL {
            return Ok(());
        }
        self.drain(events)?;
        self.catalog.refresh_all(now.into_std());
        self.election.stalled(now.into_std());
        Stats::bump(&self.stats.stalls);
        tracing::warn!(
            stalled_ms = gap.as_millis() as u64,
            "this process stood still; every instance gets a fresh TTL instead of expiring"
        );
        Ok(())
    }

    /// Fences this replica in as the leader, expecting the fence at
    /// `expected`; once in, adopts what the stored catalog has that this
    /// replica does not know, and writes every service that differs.
    async fn take_over(&mut self, expected: u64) {
        let now = Instant::now().into_std();
        let since_ms = unix_ms();
        let claim = Leadership {
            replica: self.election.replica().to_owned(),
            epoch: 0,
            since_ms,
        };
        let Ok(payload) = serde_json::to_vec(&claim) else {
            return;
        };
        let epoch = match self.wire.take_over(expected, Bytes::from(payload)).await {
            Fenced::Won(epoch) => epoch,
            Fenced::Lost(actual) => {
                tracing::debug!(expected, ?actual, "another replica holds the fence");
                self.election.follow(actual, now);
                return;
            }
        };
        let stored = match self.wire.read_stored().await {
            // The stream is the fleet's: a partition's writer takes its own.
            Ok(stored) => stored
                .into_iter()
                .filter(|s| self.subjects.owns(&s.service))
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "took the fence but cannot read the stored catalog; not writing until it can");
                self.election.follow(Some(epoch), now);
                return;
            }
        };
        self.election.won(epoch, since_ms, now);
        Stats::bump(&self.stats.takeovers);
        self.stats.leading.store(1, Ordering::Relaxed);
        self.stats.epoch.store(epoch, Ordering::Relaxed);
        self.metrics.is_leader.set(1);
        self.metrics.epoch.set(gauge(epoch));
        tracing::info!(replica = %self.election.replica(), epoch, since_ms, "leading the catalog");
        self.adopt_stored(stored, now);
    }

    /// What a new leader does with its predecessor's catalog: never shrink
    /// it for want of a heartbeat, continue its revisions, and write exactly
    /// the records that differ from the stored ones (tombstones for stored
    /// live instances it knows left).
    fn adopt_stored(&mut self, stored: Vec<Record>, now: std::time::Instant) {
        self.catalog.set_clock(self.wire.clock());
        let stored = records::by_service(stored);
        for (service, records) in &stored {
            self.catalog
                .adopt_unknown(&records::snapshot(service, records), now);
        }
        for (service, id, left) in records::differences(&self.catalog, &stored) {
            let revision = self.fresh_revision(&service);
            self.dirty.insert((service, id), Pending { revision, left });
        }
    }

    /// A new revision of `service` without a change: for a record written
    /// again, so no two stored records of a service share a revision.
    fn fresh_revision(&mut self, service: &str) -> u64 {
        self.catalog.bump(service);
        self.catalog.revision(service).unwrap_or_default()
    }

    /// At a deadline, or when the link changes while blind: expire what is
    /// due, unless the link is down (go blind) or came back since the last
    /// look, however briefly (forgive the silence).
    async fn look(
        &mut self,
        link: Link,
        events: &mut (impl Stream<Item = async_nats::Message> + Unpin + Send),
    ) -> Result<(), DiscoveryError> {
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
            if self.wire.catalog_lost().await {
                tracing::warn!(
                    "the catalog stream was gone; the next leader writes every service again"
                );
            }
        } else {
            self.notice_stall(events)?;
            // What is already waiting was heard before now.
            self.drain(events)?;
            self.expire();
        }
        Ok(())
    }

    /// Folds every event already waiting.
    fn drain(
        &mut self,
        events: &mut (impl Stream<Item = async_nats::Message> + Unpin + Send),
    ) -> Result<(), DiscoveryError> {
        self.catalog.set_clock(self.wire.clock());
        loop {
            match tokio::task::unconstrained(events.next()).now_or_never() {
                Some(Some(message)) => self.handle(&message),
                Some(None) => {
                    return Err(DiscoveryError::Closed {
                        subject: self.subjects.all(),
                    })
                }
                None => return Ok(()),
            }
        }
    }

    /// Folds `first` and whatever else is already waiting, up to [`BATCH`];
    /// whether to publish now.
    async fn fold_batch(
        &mut self,
        first: &async_nats::Message,
        events: &mut (impl Stream<Item = async_nats::Message> + Unpin + Send),
    ) -> Result<bool, DiscoveryError> {
        self.catalog.set_clock(self.wire.clock());
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
        // The catalog's own records (the leader's writes and the stream's
        // republished copies) match the event wildcard too: not events.
        if self.subjects.is_catalog_record(&message.subject) {
            return;
        }
        Stats::bump(&self.stats.events);
        let now = Instant::now().into_std();
        let parsed = self.subjects.parse_event_subject(&message.subject);
        self.metrics
            .event(parsed.as_ref().ok().map(|(kind, _, _)| *kind));
        // Before any hashing or parsing: a flood of big junk costs a length
        // check per message, so the connection keeps up with it.
        if message.payload.len() > MAX_EVENT_BYTES {
            let error = ProtocolError::TooLarge {
                what: "the event payload (bytes)",
                size: message.payload.len(),
                limit: MAX_EVENT_BYTES,
            };
            return self.reject(&message.subject, &error);
        }
        // Most events are heartbeats repeating the last one byte for byte:
        // those only move a deadline, without parsing the JSON again.
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
            Err(error) => return self.reject(&message.subject, &error),
        };
        if let Some(change) = self.catalog.apply(event, now) {
            self.note(change);
        }
        if let Some((service, id, digest)) = repeatable {
            self.catalog.set_digest(service, id, digest);
        }
    }

    /// An event that broke the protocol: counted by reason, logged at most
    /// once per [`INVALID_LOG_EVERY`].
    fn reject(&mut self, subject: &str, error: &ProtocolError) {
        Stats::bump(&self.stats.invalid);
        self.metrics.invalid(error);
        self.invalid_log.note(subject, error);
    }

    fn expire(&mut self) {
        self.catalog.set_clock(self.wire.clock());
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
        let address = self.catalog.authority(&change.service, &change.id);
        tracing::info!(
            service = %change.service,
            id = %change.id,
            address = address.as_deref().unwrap_or("-"),
            revision = change.revision,
            "{}",
            change.kind.as_str()
        );
        // The coalescing bound counts from the change, not from the end of
        // the batch it came in.
        self.dirty_since.get_or_insert_with(Instant::now);
        self.mark(&change);
    }

    /// Notes that `change`'s instance must be written.
    fn mark(&mut self, change: &Change) {
        let left = match change.kind {
            ChangeKind::Expired => Left::Expired,
            _ => Left::Deregistered,
        };
        let pending = Pending {
            revision: change.revision,
            left,
        };
        self.dirty
            .insert((change.service.clone(), change.id.clone()), pending);
    }

    async fn publish_dirty(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        self.stats
            .live_instances
            .store(self.catalog.live_instances() as u64, Ordering::Relaxed);
        let Some(epoch) = self.election.epoch() else {
            // A follower folds the same events; the leader writes them.
            self.dirty.clear();
            return;
        };
        let batch = self.dirty_records(WRITE_WINDOW);
        let outcomes = self.wire.write(epoch, batch.clone()).await;
        for (write, written) in batch.into_iter().zip(outcomes) {
            self.settle(epoch, write, written);
        }
    }

    /// The records of up to `most` changed instances, serialized, taken out
    /// of the changed set.
    fn dirty_records(&mut self, most: usize) -> Vec<Write> {
        // Oldest change first: the stream then keeps (and republishes) a
        // service's records in the order of their revisions, so every
        // reader sees them rise; what does not fit waits for the next turn.
        let mut due: Vec<_> = std::mem::take(&mut self.dirty).into_iter().collect();
        due.sort_unstable_by_key(|(_, pending)| pending.revision);
        let later = due.split_off(due.len().min(most));
        self.dirty.extend(later);
        let mut batch = Vec::with_capacity(due.len());
        for ((service, id), pending) in due {
            let presence = match self.catalog.effective(&service, &id) {
                Some(instance) => Presence::Live(instance),
                None => Presence::Left(pending.left),
            };
            let revision = pending.revision;
            let left = match presence {
                Presence::Left(left) => Some(left),
                Presence::Live(_) => None,
            };
            let record = Record {
                service,
                id,
                revision,
                presence,
            };
            match serde_json::to_vec(&record) {
                Ok(payload) => batch.push(Write {
                    service: record.service,
                    id: record.id,
                    payload: Bytes::from(payload),
                    left,
                }),
                Err(error) => {
                    Stats::bump(&self.stats.publish_failures);
                    self.metrics.publish_failures.inc();
                    tracing::error!(service = %record.service, id = %record.id, %error, "cannot serialize a record");
                }
            }
        }
        batch
    }

    /// What follows one write: counted when stored, a step down when
    /// superseded, written again when not known to be stored.
    fn settle(&mut self, epoch: u64, write: Write, written: Written) {
        match written {
            Written::Stored => {
                Stats::bump(&self.stats.published);
                let live = self.catalog.live_in(&write.service);
                self.metrics.published(&write.service, live);
            }
            Written::Superseded(actual) => {
                Stats::bump(&self.stats.superseded);
                if self.election.epoch().is_some() {
                    tracing::warn!(epoch, ?actual, "the catalog stream refused a write: another replica took over; stopping writes");
                    self.election.follow(actual, Instant::now().into_std());
                    self.stepped_down();
                }
            }
            Written::Failed(error) => {
                Stats::bump(&self.stats.publish_failures);
                self.metrics.publish_failures.inc();
                tracing::warn!(service = %write.service, id = %write.id, %error, "a record was not stored; writing it again");
                if self.election.epoch().is_some() {
                    let left = write.left.unwrap_or(Left::Deregistered);
                    self.unstored.insert((write.service, write.id), left);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::protocol::Instance;

    /// Stands in for NATS on the writing side: what is written is
    /// recorded; the fence is free unless told otherwise, the leader
    /// heartbeat comes straight back, and the clock stands at 0 so revisions
    /// count 1, 2, 3.
    struct RecordingWire {
        published: mpsc::UnboundedSender<Snapshot>,
        echo: mpsc::UnboundedSender<async_nats::Message>,
        replies: mpsc::UnboundedSender<(String, OverrideReply)>,
        /// Writes are refused as superseded while set.
        superseded: Arc<AtomicBool>,
        /// Writes fail (no stream leader) while set.
        failing: Arc<AtomicBool>,
        stored: BTreeMap<(String, String), Record>,
        fence: u64,
    }

    impl RecordingWire {
        /// The stored records of `service`, assembled as a balancer does.
        fn assembled(&self, service: &str) -> Snapshot {
            let records = self.stored.values().filter(|r| r.service == service);
            Snapshot {
                service: service.to_owned(),
                revision: records.clone().map(|r| r.revision).max().unwrap_or(0),
                instances: records.filter_map(|r| r.instance().cloned()).collect(),
            }
        }
    }

    /// The records a stored snapshot stands for.
    fn records_of(snapshot: &Snapshot) -> impl Iterator<Item = Record> + '_ {
        snapshot.instances.iter().map(|instance| Record {
            service: snapshot.service.clone(),
            id: instance.id.clone(),
            revision: snapshot.revision,
            presence: Presence::Live(instance.clone()),
        })
    }

    impl Wire for RecordingWire {
        async fn write(&mut self, _epoch: u64, batch: Vec<Write>) -> Vec<Written> {
            let mut outcomes = Vec::new();
            let mut touched = std::collections::BTreeSet::new();
            for write in batch {
                if self.superseded.load(Ordering::SeqCst) {
                    outcomes.push(Written::Superseded(Some(self.fence + 1)));
                    continue;
                }
                if self.failing.load(Ordering::SeqCst) {
                    outcomes.push(Written::Failed("no stream leader".into()));
                    continue;
                }
                let record: Record = serde_json::from_slice(&write.payload).expect("a record");
                assert_eq!((&record.service, &record.id), (&write.service, &write.id));
                assert_eq!(write.left.is_some(), record.instance().is_none());
                // As the stream keeps them: a service's revisions rise in
                // the order its records are written.
                let last = self.assembled(&record.service).revision;
                assert!(
                    record.revision > last,
                    "{}/{} written at revision {} after {last}",
                    record.service,
                    record.id,
                    record.revision
                );
                touched.insert(record.service.clone());
                self.stored.insert((write.service, write.id), record);
                outcomes.push(Written::Stored);
            }
            for service in touched {
                let _ = self.published.send(self.assembled(&service));
            }
            outcomes
        }

        async fn reply(&mut self, subject: String, payload: Bytes) {
            let reply: OverrideReply = serde_json::from_slice(&payload).expect("a reply");
            let _ = self.replies.send((subject, reply));
        }

        async fn heartbeat(&mut self, payload: Bytes) {
            let _ = self
                .echo
                .send(message("rollcall.discovery.leader", payload));
        }

        async fn take_over(&mut self, expected: u64, _payload: Bytes) -> Fenced {
            if expected != self.fence {
                return Fenced::Lost(Some(self.fence));
            }
            self.fence += 1;
            Fenced::Won(self.fence)
        }

        async fn fence(&mut self) -> Option<u64> {
            (self.fence > 0).then_some(self.fence)
        }

        async fn read_stored(&mut self) -> Result<Vec<Record>, CatalogStreamError> {
            Ok(self.stored.values().cloned().collect())
        }

        async fn catalog_lost(&mut self) -> bool {
            false
        }

        async fn flush(&mut self) {}

        fn clock(&self) -> u64 {
            0
        }
    }

    fn message(subject: &str, payload: Bytes) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: None,
            length: payload.len(),
            payload,
            headers: None,
            status: None,
            description: None,
        }
    }

    fn channel_stream(
        receiver: mpsc::UnboundedReceiver<async_nats::Message>,
    ) -> impl Stream<Item = async_nats::Message> + Unpin + Send + 'static {
        Box::pin(futures::stream::unfold(receiver, |mut r| async move {
            r.recv().await.map(|m| (m, r))
        }))
    }

    const UP: Link = Link {
        connected: true,
        generation: 1,
    };

    struct Harness {
        events: mpsc::UnboundedSender<async_nats::Message>,
        overrides: mpsc::UnboundedSender<async_nats::Message>,
        replies: mpsc::UnboundedReceiver<(String, OverrideReply)>,
        published: mpsc::UnboundedReceiver<Snapshot>,
        link: watch::Sender<Link>,
        superseded: Arc<AtomicBool>,
        failing: Arc<AtomicBool>,
        discovery: Discovery,
        _stop: oneshot::Sender<()>,
    }

    impl Harness {
        async fn start(adopted: Vec<Snapshot>) -> Harness {
            Harness::start_with(Adopted {
                stored: adopted.clone(),
                migrated: Vec::new(),
                fence: None,
            })
            .await
        }

        async fn start_with(adopted: Adopted) -> Harness {
            Harness::start_in(Subjects::default(), adopted).await
        }

        /// A worker on `subjects`: a partition's, say.
        async fn start_in(subjects: Subjects, adopted: Adopted) -> Harness {
            let (events, receiver) = mpsc::unbounded_channel();
            let (echo, leaders) = mpsc::unbounded_channel();
            let (overrides, overrides_rx) = mpsc::unbounded_channel();
            let (replies_tx, replies) = mpsc::unbounded_channel();
            let (published_tx, published) = mpsc::unbounded_channel();
            let (link, link_rx) = watch::channel(UP);
            let (stop, stopped) = oneshot::channel::<()>();
            let superseded = Arc::new(AtomicBool::new(false));
            let failing = Arc::new(AtomicBool::new(false));
            let wire = RecordingWire {
                published: published_tx,
                echo,
                replies: replies_tx,
                superseded: Arc::clone(&superseded),
                failing: Arc::clone(&failing),
                stored: (adopted.stored.iter().flat_map(records_of))
                    .map(|r| ((r.service.clone(), r.id.clone()), r))
                    .collect(),
                fence: adopted.fence.unwrap_or(0),
            };
            let inputs = Inputs {
                events: channel_stream(receiver),
                leaders: channel_stream(leaders),
                overrides: channel_stream(overrides_rx),
                link: link_rx,
            };
            let discovery = start(
                wire,
                inputs,
                subjects,
                "test-replica".into(),
                adopted,
                DiscoveryMetrics::default(),
                async {
                    let _ = stopped.await;
                },
            );
            Harness {
                events,
                overrides,
                replies,
                published,
                link,
                superseded,
                failing,
                discovery,
                _stop: stop,
            }
        }

        fn send(&self, subject: &str, payload: &str) {
            self.events
                .send(message(subject, payload.to_owned().into()))
                .expect("the worker is running");
        }

        /// An override as `rollcall drain` sends it: with a reply subject.
        fn request(&self, subject: &str, payload: &str) {
            let mut message = message(subject, payload.to_owned().into());
            message.reply = Some("_INBOX.test".into());
            self.overrides.send(message).expect("the worker is running");
        }

        async fn answer(&mut self) -> OverrideReply {
            let (subject, reply) = self.replies.recv().await.expect("an answer");
            assert_eq!(subject, "_INBOX.test");
            reply
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
                self.discovery.catalog().await.contains(&snapshot),
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
    async fn records_changed_together_are_written_oldest_change_first() {
        let mut h = Harness::start(Vec::new()).await;
        // Changed in the order z, a: written a-then-z (key order) the
        // stream would keep revision 2 before revision 1.
        for id in ["z", "y", "a"] {
            h.register(&web(id, 3000));
        }
        let mut last = 0;
        while last < 3 {
            let snapshot = h.next_snapshot().await;
            assert!(snapshot.revision > last, "revisions rise as written");
            last = snapshot.revision;
        }
        assert_eq!(h.discovery.catalog().await[0].instances.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_an_instance_and_publish_nothing() {
        let mut h = Harness::start(Vec::new()).await;
        let t0 = Instant::now();
        h.register(&web("a", 1000));
        h.next_snapshot().await;
        for _ in 0..5 {
            // A sleep, not a jump of the clock: the worker keeps turning,
            // as a process that is not frozen does.
            tokio::time::sleep(Duration::from_millis(600)).await;
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
        // Valid but for its size: whitespace after the JSON.
        let json = serde_json::to_string(&web("a", 3000)).unwrap();
        let oversized = format!("{json:MAX_EVENT_BYTES$} ");
        let bad = [
            ("rollcall.heartbeat.web.a", oversized.as_str()),
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
        assert_eq!(h.discovery.catalog().await, [adopted]);
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
    #[tokio::test(start_paused = true)]
    async fn a_frozen_process_expires_nothing_because_of_its_own_freeze() {
        let mut h = Harness::start(Vec::new()).await;
        h.register(&web("a", 1000));
        h.next_snapshot().await;
        // A jump of the clock with no turn of the loop: SIGSTOP, a stalled VM.
        tokio::time::advance(Duration::from_secs(5)).await;
        let thawed = Instant::now();
        let expired = h.next_snapshot().await;
        assert!(expired.instances.is_empty());
        assert_eq!(
            thawed.elapsed(),
            Duration::from_millis(1000),
            "a full TTL from the thaw, not an expiry at once"
        );
        assert_eq!(h.discovery.stats().stalls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn most_of_a_service_falling_silent_leaves_at_its_ttl_without_a_hold() {
        let mut h = Harness::start(Vec::new()).await;
        for id in ["a", "b", "c", "d"] {
            h.register(&web(id, 1000));
        }
        assert_eq!(h.next_snapshot().await.instances.len(), 4);
        let t0 = Instant::now();
        // Only `a` goes on heartbeating; the loop turns on time throughout.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            h.heartbeat(&web("a", 1000));
        }
        let shrunk = h.next_snapshot().await;
        assert_eq!(
            shrunk.instances,
            [web("a", 1000)],
            "three of four left at once"
        );
        assert_eq!(t0.elapsed(), Duration::from_millis(1000), "at their TTL");
        let stats = h.discovery.stats();
        assert_eq!(stats.expired.load(Ordering::Relaxed), 3);
        assert_eq!(stats.stalls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_superseded_leader_stops_writing_at_once() {
        let mut h = Harness::start(Vec::new()).await;
        h.register(&web("a", 3000));
        h.next_snapshot().await;
        h.superseded.store(true, Ordering::SeqCst);
        h.register(&web("b", 3000));
        eventually_stat(&h, |s| s.superseded.load(Ordering::Relaxed) == 1).await;
        let stats = h.discovery.stats();
        assert_eq!(stats.leading.load(Ordering::Relaxed), 0);
        h.register(&web("c", 3000));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            stats.superseded.load(Ordering::Relaxed),
            1,
            "a follower tries no further write"
        );
        assert!(h.published.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_folds_but_writes_only_once_the_leader_is_silent() {
        let mut h = Harness::start_with(Adopted {
            fence: Some(4),
            ..Adopted::default()
        })
        .await;
        let t0 = Instant::now();
        h.register(&web("a", 3000));
        let first = h.next_snapshot().await;
        assert_eq!(first.instances, [web("a", 3000)]);
        let waited = t0.elapsed();
        assert!(
            waited >= leader::TAKEOVER_AFTER
                && waited <= leader::TAKEOVER_AFTER + leader::MAX_JITTER + LEADER_HEARTBEAT,
            "took over after {waited:?} of silence"
        );
        assert_eq!(h.discovery.stats().epoch.load(Ordering::Relaxed), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_was_not_stored_is_written_again_until_it_is() {
        let mut h = Harness::start(Vec::new()).await;
        h.register(&web("a", 3000));
        let first = h.next_snapshot().await;
        h.failing.store(true, Ordering::SeqCst);
        h.register(&web("b", 3000));
        eventually_stat(&h, |s| s.publish_failures.load(Ordering::Relaxed) >= 2).await;
        h.failing.store(false, Ordering::SeqCst);
        let stored = h.next_snapshot().await;
        assert_eq!(stored.instances, [web("a", 3000), web("b", 3000)]);
        assert!(
            stored.revision > first.revision + 1,
            "a new revision per try"
        );
        assert_eq!(h.discovery.stats().leading.load(Ordering::Relaxed), 1);
    }

    /// Waits, in paused time, until the worker's counters satisfy `done`.
    async fn eventually_stat(h: &Harness, done: impl Fn(&Stats) -> bool) {
        for _ in 0..100 {
            if done(h.discovery.stats()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the worker's counters never got there: {:?}",
            h.discovery.stats()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_leader_applies_an_override_publishes_it_then_answers() {
        let mut h = Harness::start(Vec::new()).await;
        h.register(&web("a", 3000));
        h.next_snapshot().await;
        h.request("rollcall.operator.drain.web.a", r#"{"by":"alice"}"#);
        let drained = h.next_snapshot().await;
        assert_eq!(drained.revision, 2);
        assert_eq!(drained.instances[0].weight, 0);
        let answer = h.answer().await;
        assert!(answer.ok, "{answer:?}");
        assert_eq!(answer.instance.as_ref(), Some(&drained.instances[0]));
        // Heartbeats neither undo it nor publish.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        h.heartbeat(&web("a", 3000));
        h.request(
            "rollcall.operator.weight.web.a",
            r#"{"by":"bob","weight":4}"#,
        );
        let weighted = h.next_snapshot().await;
        assert_eq!(weighted.revision, 3, "the heartbeat published nothing");
        let operator = weighted.instances[0].operator.clone().expect("overridden");
        assert_eq!((operator.drain, operator.weight), (true, Some(4)));
        assert_eq!(operator.by, "bob");
        assert_eq!(h.answer().await.instance.map(|i| i.weight), Some(0));
        assert_eq!(h.discovery.stats().overrides.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bad_override_changes_nothing_and_is_answered_and_counted() {
        let mut h = Harness::start(Vec::new()).await;
        h.register(&web("a", 3000));
        h.next_snapshot().await;
        for (subject, payload, reason, says) in [
            (
                "rollcall.operator.drain.web.zz",
                r#"{"by":"a"}"#,
                "unknown_instance",
                "web/zz is not a live instance",
            ),
            (
                "rollcall.operator.drain.api.a",
                r#"{"by":"a"}"#,
                "unknown_instance",
                "api/a is not a live instance",
            ),
            (
                "rollcall.operator.drain.web.a",
                r#"{"by":""}"#,
                "bad_by",
                "field `by`",
            ),
            (
                "rollcall.operator.drain.web.a",
                "nope",
                "bad_json",
                "not valid JSON",
            ),
            (
                "rollcall.operator.weight.web.a",
                r#"{"by":"a"}"#,
                "bad_weight",
                "needs field `weight`",
            ),
            (
                "rollcall.operator.weight.web.a",
                r#"{"by":"a","weight":20000}"#,
                "out_of_range",
                "0..10000",
            ),
            (
                "rollcall.operator.stop.web.a",
                r#"{"by":"a"}"#,
                "bad_subject",
                "unknown operator action",
            ),
        ] {
            h.request(subject, payload);
            let answer = h.answer().await;
            assert!(!answer.ok, "{subject} {payload}");
            assert_eq!(
                answer.reason.as_deref(),
                Some(reason),
                "{subject} {payload}"
            );
            let error = answer.error.unwrap_or_default();
            assert!(error.contains(says), "{subject} {payload}: {error}");
        }
        assert_eq!(
            h.discovery
                .stats()
                .invalid_overrides
                .load(Ordering::Relaxed),
            7
        );
        h.register(&web("b", 3000));
        let next = h.next_snapshot().await;
        assert_eq!(next.revision, 2, "no override changed the catalog");
        assert!(next.instances.iter().all(|i| i.operator.is_none()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_folds_overrides_silently_and_a_raw_publish_gets_no_answer() {
        let mut h = Harness::start_with(Adopted {
            fence: Some(4),
            ..Adopted::default()
        })
        .await;
        h.register(&web("a", 3000));
        // Events and overrides come on two subscriptions, in no order
        // between them: the register is folded first.
        tokio::time::sleep(Duration::from_millis(1)).await;
        h.request(
            "rollcall.operator.weight.web.a",
            r#"{"by":"bob","weight":3}"#,
        );
        // Taking over, it writes the catalog it folded as a follower.
        let first = h.next_snapshot().await;
        assert_eq!(first.instances[0].weight, 3);
        assert!(h.replies.try_recv().is_err(), "a follower answers nothing");
        h.overrides
            .send(message(
                "rollcall.operator.clear.web.a",
                r#"{"by":"bob"}"#.into(),
            ))
            .expect("running");
        let cleared = h.next_snapshot().await;
        assert_eq!(cleared.instances, [web("a", 3000)]);
        assert!(h.replies.try_recv().is_err(), "no reply subject, no answer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partitions_writer_adopts_and_folds_only_its_own_services() {
        use crate::partition::{partition_of, Partition};
        let partition = Partition::new(partition_of("web", 16), 16).unwrap();
        let mut other = web("a", 3000);
        other.service = "api".into();
        assert!(!partition.owns("api"));
        let stored_web = Snapshot {
            service: "web".into(),
            revision: 5,
            instances: vec![web("a", 3000)],
        };
        let stored_api = Snapshot {
            service: "api".into(),
            revision: 3,
            instances: vec![other.clone()],
        };
        let mut h = Harness::start_in(
            Subjects::default().in_partition(partition),
            Adopted {
                stored: vec![stored_api, stored_web.clone()],
                ..Adopted::default()
            },
        )
        .await;
        assert_eq!(
            h.discovery.catalog().await,
            [stored_web],
            "api is another partition's"
        );
        let json = |i: &Instance| serde_json::to_string(i).unwrap();
        other.id = "b".into();
        h.send("rollcall.partition.1.register.api.b", &json(&other));
        h.send(
            "rollcall.partition.1.heartbeat.web.a",
            &json(&web("a", 3000)),
        );
        h.send(
            "rollcall.partition.1.register.web.b",
            &json(&web("b", 3000)),
        );
        let next = h.next_snapshot().await;
        assert_eq!(next.service, "web");
        assert_eq!(next.instances, [web("a", 3000), web("b", 3000)]);
        assert!(next.revision > 5, "the stored revisions continue");
        let stats = h.discovery.stats();
        assert_eq!(stats.invalid.load(Ordering::Relaxed), 1, "the api event");
        assert_eq!(stats.adopted_services.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopted_override_survives_a_restart() {
        let mut own = web("a", 2000);
        own.weight = 5;
        let mut drained = own.clone();
        drained.weight = 0;
        drained.operator = Some(crate::protocol::Operator {
            drain: true,
            weight: None,
            own_weight: 5,
            by: "alice".into(),
            at_ms: 1,
        });
        let stored = Snapshot {
            service: "web".into(),
            revision: 7,
            instances: vec![drained],
        };
        let mut h = Harness::start(vec![stored.clone()]).await;
        assert_eq!(h.discovery.catalog().await, [stored]);
        h.heartbeat(&own);
        h.request("rollcall.operator.undrain.web.a", r#"{"by":"bob"}"#);
        let undrained = h.next_snapshot().await;
        assert_eq!(
            undrained.instances,
            [own],
            "undrained, it takes its own weight again"
        );
    }
}

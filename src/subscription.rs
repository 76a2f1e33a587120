//! The catalog subscription: the one place that turns catalog records from
//! NATS into a stream of [`Update`]s for a balancer, and the one place that
//! drops stale revisions ([`Held`]).
//!
//! The catalog stream keeps one record per instance (catalog version 3);
//! this assembles them into one snapshot per service, so a balancer still
//! swaps whole sets. On start, and again after every reconnect, it reads
//! every stored record and, once the read is complete, hands on a
//! [`Update::Reset`] that replaces what was held (never a partial view); in
//! between it follows live records on a core subscription (the fast path).
//! A record whose revision is not above the one held for its instance is
//! dropped. After a live record, every record already waiting is taken in
//! too, and each changed service is handed on once. While NATS is away,
//! nothing is handed on, so the balancer keeps routing on the last catalog
//! it has.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{jetstream, Client};
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::catalog_stream::{self, CatalogStreamError, LastRecords};
use crate::connect::{Connection, Link};
use crate::protocol::{Instance, Presence, Record, Snapshot, Subjects};

/// The most live records taken in before the changed services are handed
/// on: a burst of 100,000 changes becomes a few updates, and a never-ending
/// burst still reaches the balancer.
const COALESCE: usize = 65_536;

/// Updates waiting for the balancer: one. While it applies one, records go
/// on being taken in, and each service changed meanwhile is handed on once
/// it is ready for the next, so a slow rebuild of a big set is never
/// repeated for every record that arrived during it.
const UPDATES_BUFFER: usize = 1;

/// An item of the catalog feed, as a balancer consumes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The whole catalog: sent first, and again after every reconnect.
    /// Services not listed are unknown, not necessarily empty.
    Reset(Vec<Snapshot>),
    /// One service's new live set.
    Service(Snapshot),
}

/// Counters of a catalog subscription, readable at any time.
#[derive(Debug, Default)]
pub struct Stats {
    /// Live records taken in.
    pub applied: AtomicU64,
    /// Records dropped because their revision was not newer.
    pub stale: AtomicU64,
    /// Catalog messages that were not valid records.
    pub invalid: AtomicU64,
    /// Resets handed on (start and every re-sync).
    pub resets: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        Stats::add(counter, 1);
    }

    fn add(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// One instance as held: the revision of its newest record, the instance
/// when live, and how many stream reads had begun when it came live.
#[derive(Debug, Clone)]
struct Entry {
    revision: u64,
    instance: Option<Instance>,
    /// A read that began after this record came (a higher number) holds it
    /// or something newer; one that began before may not.
    heard: u64,
}

/// The records of one service.
#[derive(Debug, Default)]
struct Service {
    /// The highest record revision seen (tombstones count).
    revision: u64,
    instances: BTreeMap<String, Entry>,
}

impl Service {
    fn snapshot(&self, service: &str) -> Snapshot {
        Snapshot {
            service: service.to_owned(),
            revision: self.revision,
            instances: self
                .instances
                .values()
                .filter_map(|e| e.instance.clone())
                .collect(),
        }
    }

    fn take(&mut self, id: String, entry: Entry) {
        self.revision = self.revision.max(entry.revision);
        self.instances.insert(id, entry);
    }
}

/// The newest record of every instance seen, by service: the filter that
/// keeps a revision from going backwards, and the assembly of records into
/// snapshots. Gone instances are remembered until a stream read that began
/// after they left replaces the whole.
#[derive(Debug, Default)]
pub struct Held {
    services: HashMap<String, Service>,
    /// Stream reads begun so far.
    reads: u64,
}

impl Held {
    /// Keeps a live `record` when its revision is above the one held for
    /// its instance (or none is held); otherwise returns the revision held.
    pub fn offer(&mut self, record: Record) -> Result<(), u64> {
        let service = self.services.entry(record.service).or_default();
        if let Some(held) = service.instances.get(&record.id) {
            if record.revision <= held.revision {
                return Err(held.revision);
            }
        }
        let entry = Entry {
            revision: record.revision,
            instance: match record.presence {
                Presence::Live(instance) => Some(instance),
                Presence::Left(_) => None,
            },
            heard: self.reads,
        };
        service.take(record.id, entry);
        Ok(())
    }

    /// The snapshot of `service` assembled from the records held.
    pub fn snapshot(&self, service: &str) -> Option<Snapshot> {
        self.services.get(service).map(|s| s.snapshot(service))
    }

    /// Every service's snapshot, by service name.
    pub fn all(&self) -> Vec<Snapshot> {
        let mut all: Vec<Snapshot> = (self.services.iter())
            .map(|(name, service)| service.snapshot(name))
            .collect();
        all.sort_by(|a, b| a.service.cmp(&b.service));
        all
    }

    /// A stream read begins: its number, for [`Held::replace`].
    fn read_began(&mut self) -> u64 {
        self.reads += 1;
        self.reads
    }

    /// Replaces what is held with the complete read number `read`, for
    /// every service the read lists: an instance it does not list is gone
    /// (its tombstone was forgotten), unless its record came live after
    /// the read began and is newer than what the read holds. A service the
    /// read does not list at all is kept as held (the stream may have been
    /// lost). Returns the services the read listed.
    pub(crate) fn replace(&mut self, records: Vec<Record>, read: u64) -> BTreeSet<String> {
        let mut read_services: HashMap<String, Service> = HashMap::new();
        for record in records {
            let entry = Entry {
                revision: record.revision,
                instance: match record.presence {
                    Presence::Live(instance) => Some(instance),
                    Presence::Left(_) => None,
                },
                heard: 0,
            };
            (read_services.entry(record.service).or_default()).take(record.id, entry);
        }
        let listed: BTreeSet<String> = read_services.keys().cloned().collect();
        for (name, mut fresh) in read_services {
            if let Some(held) = self.services.remove(&name) {
                fresh.revision = fresh.revision.max(held.revision);
                for (id, entry) in held.instances {
                    let newer = fresh
                        .instances
                        .get(&id)
                        .is_none_or(|f| f.revision < entry.revision);
                    if entry.heard >= read && newer {
                        fresh.instances.insert(id, entry);
                    }
                }
            }
            self.services.insert(name, fresh);
        }
        listed
    }
}

/// Follows the catalog of the fleet under `subjects`. The stream ends only
/// when the NATS client is closed for good; dropping it stops the work.
pub fn follow(
    connection: &Connection,
    subjects: Subjects,
) -> impl Stream<Item = Update> + Send + 'static {
    follow_with_stats(connection, subjects, Arc::default())
}

/// [`follow`], counting into `stats`.
pub fn follow_with_stats(
    connection: &Connection,
    subjects: Subjects,
    stats: Arc<Stats>,
) -> impl Stream<Item = Update> + Send + 'static {
    let (sender, receiver) = mpsc::channel(UPDATES_BUFFER);
    let client = connection.client.clone();
    let link = connection.link();
    tokio::spawn(async move {
        let follower = Follower {
            subjects: subjects.clone(),
            held: Held::default(),
            sender,
            stats,
        };
        if let Some(source) = NatsSource::subscribe(client, subjects, &follower.sender).await {
            follower.run(source, link).await;
        }
    });
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|update| (update, receiver))
    })
}

type StreamResult = Result<LastRecords, CatalogStreamError>;

/// What the follower reads: NATS, but for the follower's own tests.
trait Source: Send {
    /// Every stored record, from the catalog stream: a read of its own, so
    /// live records go on while it waits (on a node that just lost the
    /// stream's leader it can wait out a whole request timeout).
    fn read_stream(&self) -> impl Future<Output = StreamResult> + Send + 'static;
    /// The next live catalog message; `None` once the client is closed.
    fn next_live(&mut self) -> impl Future<Output = Option<async_nats::Message>> + Send;
}

struct NatsSource {
    js: jetstream::Context,
    subjects: Subjects,
    live: async_nats::Subscriber,
}

impl NatsSource {
    /// Subscribes to live records, retrying until it works or nobody
    /// listens any more. Subscribed before the stream is read, so nothing
    /// published in between is missed; async-nats re-subscribes after
    /// reconnects.
    async fn subscribe(
        client: Client,
        subjects: Subjects,
        listener: &mpsc::Sender<Update>,
    ) -> Option<NatsSource> {
        let subject = subjects.catalog_wildcard();
        loop {
            match client.subscribe(subject.clone()).await {
                Ok(live) => {
                    return Some(NatsSource {
                        js: jetstream::new(client),
                        subjects,
                        live,
                    })
                }
                Err(error) => {
                    tracing::error!(%subject, %error, "cannot subscribe to the catalog; retrying");
                    if listener.is_closed() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

impl Source for NatsSource {
    fn read_stream(&self) -> impl Future<Output = StreamResult> + Send + 'static {
        let (js, subjects) = (self.js.clone(), self.subjects.clone());
        async move { catalog_stream::read_records(&js, &subjects).await }
    }

    async fn next_live(&mut self) -> Option<async_nats::Message> {
        self.live.next().await
    }
}

struct Follower {
    subjects: Subjects,
    held: Held,
    sender: mpsc::Sender<Update>,
    stats: Arc<Stats>,
}

/// Where the read of the catalog stream stands.
enum StreamRead {
    /// Read the stream (again) at `at`.
    Due {
        attempt: u32,
        at: Instant,
    },
    Done,
}

/// A read of the stream under way, and its number.
type Reading = (u64, Pin<Box<dyn Future<Output = StreamResult> + Send>>);

impl Follower {
    async fn run(mut self, mut source: impl Source, mut link: watch::Receiver<Link>) {
        let mut generation = link.borrow_and_update().generation;
        let mut read = StreamRead::Due {
            attempt: 0,
            at: Instant::now(),
        };
        let mut reading: Option<Reading> = None;
        // Services changed by live records and not yet handed on.
        let mut changed = BTreeSet::new();
        let sender = self.sender.clone();
        loop {
            let due = match read {
                StreamRead::Due { at, .. } if reading.is_none() => Some(at),
                _ => None,
            };
            tokio::select! {
                () = self.sender.closed() => return,
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    reading = Some((self.held.read_began(), Box::pin(source.read_stream())));
                }
                result = async { reading.as_mut().expect("guarded by is_some").1.as_mut().await }, if reading.is_some() => {
                    let number = reading.take().map_or(0, |(number, _)| number);
                    let StreamRead::Due { attempt, .. } = read else { continue };
                    read = match self.stream_read(result, number, attempt).await {
                        Some(read) => read,
                        None => return,
                    };
                }
                message = source.next_live() => {
                    let Some(message) = message else {
                        tracing::error!(subject = %self.subjects.catalog_wildcard(), "the catalog subscription ended: the NATS client was closed");
                        return;
                    };
                    self.live(message, &mut source, &mut changed);
                }
                permit = sender.reserve(), if !changed.is_empty() => {
                    let Ok(permit) = permit else { return };
                    let snapshot = changed.pop_first().and_then(|service| self.held.snapshot(&service));
                    if let Some(snapshot) = snapshot {
                        permit.send(Update::Service(snapshot));
                    }
                }
                // Without a sender the link never changes and this branch
                // stays off: live records go on, without re-syncs.
                Ok(()) = link.changed() => {
                    let now = *link.borrow_and_update();
                    if !now.connected {
                        tracing::warn!("NATS connection lost: the catalog is stale until it is back; routing on the last one");
                    } else if now.generation != generation {
                        generation = now.generation;
                        tracing::info!("NATS connection back: re-reading the catalog stream");
                        // A read begun on the old connection may never be
                        // answered: start again.
                        reading = None;
                        read = StreamRead::Due { attempt: 0, at: Instant::now() };
                    }
                }
            }
        }
    }

    /// What follows a finished read of the stream: done, or another try
    /// after a delay. `None` when nobody listens any more.
    async fn stream_read(
        &mut self,
        result: StreamResult,
        number: u64,
        attempt: u32,
    ) -> Option<StreamRead> {
        match result {
            Ok(last) => {
                Stats::add(&self.stats.invalid, last.invalid as u64);
                let records = last.records.into_iter().map(|s| s.record).collect();
                self.reset(records, number)
                    .await
                    .then_some(StreamRead::Done)
            }
            Err(error) => {
                if attempt == 0 {
                    tracing::warn!(%error, "cannot read the catalog stream; following live records and retrying");
                } else {
                    tracing::debug!(%error, attempt, "catalog stream still unreadable");
                }
                let attempt = attempt.saturating_add(1);
                // An absolute deadline: live records arriving in between
                // must not put the retry off.
                Some(StreamRead::Due {
                    attempt,
                    at: Instant::now() + retry_delay(attempt),
                })
            }
        }
    }

    /// Takes in `first` and every live record already waiting (up to
    /// [`COALESCE`]), noting the services they changed.
    fn live(
        &mut self,
        first: async_nats::Message,
        source: &mut impl Source,
        changed: &mut BTreeSet<String>,
    ) {
        self.take(&first, changed);
        for _ in 1..COALESCE {
            // Unconstrained: tokio's cooperative budget would end the
            // burst early and make every few records an update.
            match tokio::task::unconstrained(source.next_live()).now_or_never() {
                Some(Some(message)) => self.take(&message, changed),
                _ => break,
            }
        }
    }

    /// Takes in one live record if it is newer, noting its service.
    fn take(&mut self, message: &async_nats::Message, changed: &mut BTreeSet<String>) {
        let record = match self
            .subjects
            .parse_record(&message.subject, &message.payload)
        {
            Ok(record) => record,
            Err(error) => {
                Stats::bump(&self.stats.invalid);
                tracing::warn!(subject = %message.subject, %error, "ignoring an invalid catalog record");
                return;
            }
        };
        let (service, id, revision) = (record.service.clone(), record.id.clone(), record.revision);
        if let Err(held) = self.held.offer(record) {
            Stats::bump(&self.stats.stale);
            tracing::debug!(%service, %id, revision, held, "ignoring a record that is not newer");
            return;
        }
        Stats::bump(&self.stats.applied);
        changed.insert(service);
    }

    /// Replaces what is held with the complete read number `read` (see
    /// [`Held::replace`]) and hands on the services it listed as a Reset.
    async fn reset(&mut self, records: Vec<Record>, read: u64) -> bool {
        let listed = self.held.replace(records, read);
        let all: Vec<Snapshot> = listed
            .iter()
            .filter_map(|service| self.held.snapshot(service))
            .collect();
        tracing::info!(services = all.len(), "catalog synced from the stream");
        Stats::bump(&self.stats.resets);
        self.sender.send(Update::Reset(all)).await.is_ok()
    }
}

/// 0 ms for the first read, then 100 ms doubling up to 800 ms: a re-sync after
/// a reconnect is done well within two seconds of the server being back.
fn retry_delay(attempt: u32) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(100u64 << (attempt - 1).min(3))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use super::*;
    use crate::catalog_stream::StoredRecord;
    use crate::protocol::Left;

    #[test]
    fn resync_retries_quickly_and_keeps_trying() {
        let delays: Vec<u128> = (0..7).map(|a| retry_delay(a).as_millis()).collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 800, 800]);
    }

    fn instance(id: &str, port: u16) -> Instance {
        Instance::new("web", id, "127.0.0.1", port)
    }

    fn live(id: &str, revision: u64, port: u16) -> Record {
        Record {
            service: "web".into(),
            id: id.into(),
            revision,
            presence: Presence::Live(instance(id, port)),
        }
    }

    fn gone(id: &str, revision: u64) -> Record {
        Record {
            service: "web".into(),
            id: id.into(),
            revision,
            presence: Presence::Left(Left::Deregistered),
        }
    }

    fn web(revision: u64, instances: &[(&str, u16)]) -> Snapshot {
        Snapshot {
            service: "web".into(),
            revision,
            instances: instances.iter().map(|(id, p)| instance(id, *p)).collect(),
        }
    }

    #[test]
    fn a_stale_record_changes_nothing_whatever_it_says() {
        let mut held = Held::default();
        assert_eq!(held.offer(live("a", 5, 1)), Ok(()));
        assert_eq!(held.offer(live("a", 5, 2)), Err(5));
        assert_eq!(held.offer(gone("a", 4)), Err(5));
        assert_eq!(held.offer(live("b", 3, 3)), Ok(()), "per instance");
        assert_eq!(held.all(), [web(5, &[("a", 1), ("b", 3)])]);
        assert_eq!(held.offer(gone("a", 6)), Ok(()));
        assert_eq!(
            held.offer(live("a", 6, 1)),
            Err(6),
            "a gone one is remembered"
        );
        assert_eq!(held.all(), [web(6, &[("b", 3)])]);
    }

    #[test]
    fn a_complete_read_replaces_what_is_held() {
        let mut held = Held::default();
        held.offer(live("a", 1, 1)).unwrap();
        held.offer(live("b", 2, 2)).unwrap();
        // b's tombstone was missed and the stream forgot it.
        let read = held.read_began();
        let listed = held.replace(vec![live("a", 1, 1), live("c", 3, 3)], read);
        assert_eq!(listed.into_iter().collect::<Vec<_>>(), ["web"]);
        assert_eq!(held.all(), [web(3, &[("a", 1), ("c", 3)])]);
    }

    #[test]
    fn a_live_tombstone_newer_than_a_concurrent_read_wins() {
        let mut held = Held::default();
        held.offer(live("a", 1, 1)).unwrap();
        let read = held.read_began();
        // While the read runs, a leaves and b joins; the read saw neither.
        held.offer(gone("a", 2)).unwrap();
        held.offer(live("b", 3, 2)).unwrap();
        held.replace(vec![live("a", 1, 1)], read);
        assert_eq!(held.all(), [web(3, &[("b", 2)])]);
        assert_eq!(held.offer(live("a", 1, 1)), Err(2), "still remembered");
        // A read that began after the tombstone, which the stream forgot.
        let read = held.read_began();
        held.replace(vec![live("b", 3, 2)], read);
        assert_eq!(held.offer(live("a", 1, 1)), Ok(()), "forgotten by now");
    }

    /// `record` as the catalog stream republishes it.
    fn live_message(record: &Record) -> async_nats::Message {
        let payload = serde_json::to_vec(record).expect("a record serializes");
        async_nats::Message {
            subject: Subjects::default()
                .catalog(&record.service, &record.id)
                .into(),
            reply: None,
            length: payload.len(),
            payload: payload.into(),
            headers: None,
            status: None,
            description: None,
        }
    }

    /// Stands in for NATS: stream reads fail while `failing`, and each read
    /// reports when it happened.
    struct Scripted {
        failing: Arc<AtomicBool>,
        /// Reads begun while set are never answered (a node that lost the
        /// stream's leader).
        hanging: Arc<AtomicBool>,
        stored: Arc<Mutex<Vec<Record>>>,
        reads: mpsc::UnboundedSender<Instant>,
        live: mpsc::UnboundedReceiver<async_nats::Message>,
    }

    impl Source for Scripted {
        fn read_stream(&self) -> impl Future<Output = StreamResult> + Send + 'static {
            let _ = self.reads.send(Instant::now());
            let hanging = self.hanging.load(Ordering::SeqCst);
            let result = if self.failing.load(Ordering::SeqCst) {
                Err(CatalogStreamError::Missing {
                    stream: "ROLLCALL_CATALOG".into(),
                })
            } else {
                let stored = self.stored.lock().expect("not poisoned").clone();
                Ok(LastRecords {
                    records: (stored.into_iter())
                        .map(|record| StoredRecord {
                            record,
                            published: std::time::SystemTime::UNIX_EPOCH,
                        })
                        .collect(),
                    invalid: 0,
                })
            };
            async move {
                if hanging {
                    std::future::pending::<()>().await;
                }
                result
            }
        }

        async fn next_live(&mut self) -> Option<async_nats::Message> {
            self.live.recv().await
        }
    }

    struct Harness {
        failing: Arc<AtomicBool>,
        hanging: Arc<AtomicBool>,
        stored: Arc<Mutex<Vec<Record>>>,
        reads: mpsc::UnboundedReceiver<Instant>,
        live: mpsc::UnboundedSender<async_nats::Message>,
        link: watch::Sender<Link>,
        updates: mpsc::Receiver<Update>,
    }

    const UP: Link = Link {
        connected: true,
        generation: 1,
    };

    impl Harness {
        fn start(failing: bool, stored: Vec<Record>) -> Harness {
            let failing = Arc::new(AtomicBool::new(failing));
            let hanging = Arc::new(AtomicBool::new(false));
            let stored = Arc::new(Mutex::new(stored));
            let (reads_tx, reads) = mpsc::unbounded_channel();
            let (live, live_rx) = mpsc::unbounded_channel();
            let (link, link_rx) = watch::channel(UP);
            let (sender, updates) = mpsc::channel(UPDATES_BUFFER);
            let source = Scripted {
                failing: Arc::clone(&failing),
                hanging: Arc::clone(&hanging),
                stored: Arc::clone(&stored),
                reads: reads_tx,
                live: live_rx,
            };
            let follower = Follower {
                subjects: Subjects::default(),
                held: Held::default(),
                sender,
                stats: Arc::default(),
            };
            tokio::spawn(follower.run(source, link_rx));
            Harness {
                failing,
                hanging,
                stored,
                reads,
                live,
                link,
                updates,
            }
        }

        fn publish(&self, record: &Record) {
            self.live
                .send(live_message(record))
                .expect("the follower is running");
        }

        fn reconnect(&self, generation: u64) {
            self.link
                .send(Link {
                    connected: true,
                    generation,
                })
                .expect("follower listens");
        }

        async fn read(&mut self) -> Instant {
            self.reads.recv().await.expect("the follower is running")
        }

        async fn update(&mut self) -> Update {
            self.updates.recv().await.expect("the follower is running")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn live_records_do_not_put_off_a_failed_stream_read() {
        let mut h = Harness::start(true, Vec::new());
        let first = h.read().await;
        // Live records every 50 ms, faster than the 100 ms retry delay.
        let live = h.live.clone();
        let publisher = tokio::spawn(async move {
            for revision in 1..=40 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if live.send(live_message(&live_record(revision))).is_err() {
                    return;
                }
            }
        });
        let second = h.read().await;
        assert_eq!(
            second - first,
            retry_delay(1),
            "the retry kept its deadline"
        );
        let third = h.read().await;
        assert_eq!(third - second, retry_delay(2));
        publisher.abort();
    }

    fn live_record(revision: u64) -> Record {
        live("a", revision, 1)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_first_then_newer_live_records_and_a_resync_on_reconnect() {
        let mut h = Harness::start(false, vec![live("a", 3, 1)]);
        assert_eq!(h.update().await, Update::Reset(vec![web(3, &[("a", 1)])]));
        for (revision, port) in [(3, 2), (2, 3), (4, 4)] {
            h.publish(&live("a", revision, port));
        }
        assert_eq!(h.update().await, Update::Service(web(4, &[("a", 4)])));

        h.link
            .send(Link {
                connected: false,
                ..UP
            })
            .expect("follower listens");
        h.failing.store(true, Ordering::SeqCst);
        let lost = h.read().await;
        h.reconnect(2);
        let back = Instant::now();
        let failed = h.read().await;
        assert_eq!(failed, back, "a reconnect re-reads at once");
        h.failing.store(false, Ordering::SeqCst);
        assert_eq!(h.read().await - failed, retry_delay(1));
        assert!(lost <= back);
        assert_eq!(
            h.update().await,
            Update::Reset(vec![web(4, &[("a", 1)])]),
            "a read begun after the live record replaces it: the stream is the truth"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn live_records_go_on_while_a_stream_read_hangs_and_beat_it() {
        let mut h = Harness::start(false, vec![live("a", 3, 1)]);
        h.read().await;
        assert_eq!(h.update().await, Update::Reset(vec![web(3, &[("a", 1)])]));
        h.hanging.store(true, Ordering::SeqCst);
        h.reconnect(2);
        h.read().await;
        h.publish(&live("b", 4, 2));
        let began = Instant::now();
        assert_eq!(
            h.update().await,
            Update::Service(web(4, &[("a", 1), ("b", 2)]))
        );
        assert_eq!(began.elapsed(), Duration::ZERO, "not held behind the read");
        // A reconnect while it hangs starts a read that is answered; a
        // leaves meanwhile, which that read does not hold yet.
        h.hanging.store(false, Ordering::SeqCst);
        h.stored.lock().expect("not poisoned").push(live("b", 4, 2));
        h.reconnect(3);
        h.read().await;
        h.publish(&gone("a", 5));
        let (first, last) = (h.update().await, h.update().await);
        let listed = |update: &Update| match update {
            Update::Reset(all) => all.iter().flat_map(ids).collect::<Vec<_>>(),
            Update::Service(snapshot) => ids(snapshot),
        };
        // In whichever order the read and the tombstone came, a stays gone.
        assert_eq!(listed(&last), ["b"], "after {first:?}");
    }

    fn ids(snapshot: &Snapshot) -> Vec<String> {
        snapshot.instances.iter().map(|i| i.id.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_records_is_one_update_per_service() {
        let mut h = Harness::start(false, Vec::new());
        assert_eq!(h.update().await, Update::Reset(Vec::new()));
        let mut api = live("x", 1, 9);
        api.service = "api".into();
        api.presence = Presence::Live(Instance::new("api", "x", "127.0.0.1", 9));
        for n in 0..1000u16 {
            h.publish(&live(&format!("i{n:04}"), u64::from(n) + 1, n + 1));
        }
        h.publish(&api);
        let Update::Service(first) = h.update().await else {
            panic!("a service update");
        };
        let Update::Service(second) = h.update().await else {
            panic!("a service update");
        };
        assert_eq!((first.service.as_str(), first.instances.len()), ("api", 1));
        assert_eq!(
            (second.service.as_str(), second.instances.len()),
            ("web", 1000)
        );
        assert_eq!(second.revision, 1000);
        assert!(h.updates.try_recv().is_err(), "one update per service");
    }
}

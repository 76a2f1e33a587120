//! The catalog subscription: the one place that turns catalog messages from
//! NATS into a stream of [`Update`]s for a balancer, and the one place that
//! drops stale revisions ([`Held`]).
//!
//! On start, and again after every reconnect, it reads the last snapshot of
//! every service from the catalog stream and hands on a [`Update::Reset`];
//! in between it follows live snapshots on a core subscription (the fast
//! path). A snapshot whose revision is not above the one held is dropped.
//! While NATS is away, nothing is handed on, so the balancer keeps routing
//! on the last catalog it has.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{jetstream, Client};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::catalog_stream::{self, CatalogStreamError, LastSnapshots};
use crate::connect::{Connection, Link};
use crate::protocol::{Snapshot, Subjects};

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
    /// Live snapshots handed on.
    pub applied: AtomicU64,
    /// Snapshots dropped because their revision was not newer.
    pub stale: AtomicU64,
    /// Catalog messages that were not valid snapshots.
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

/// The newest snapshot of every service seen: the filter that keeps a
/// revision from going backwards.
#[derive(Debug, Default)]
pub struct Held(HashMap<String, Snapshot>);

impl Held {
    /// Keeps `snapshot` when its revision is above the one held for its
    /// service (or none is held); otherwise returns the revision held.
    pub(crate) fn offer(&mut self, snapshot: Snapshot) -> Result<(), u64> {
        match self.0.get(&snapshot.service) {
            Some(held) if snapshot.revision <= held.revision => Err(held.revision),
            _ => {
                self.0.insert(snapshot.service.clone(), snapshot);
                Ok(())
            }
        }
    }

    /// Every snapshot held, by service name.
    pub fn all(&self) -> Vec<Snapshot> {
        let mut all: Vec<Snapshot> = self.0.values().cloned().collect();
        all.sort_by(|a, b| a.service.cmp(&b.service));
        all
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
    let (sender, receiver) = mpsc::channel(256);
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

type StreamResult = Result<LastSnapshots, CatalogStreamError>;

/// What the follower reads: NATS, but for the follower's own tests.
trait Source: Send {
    /// The last snapshot of every service, from the catalog stream: a read
    /// of its own, so live snapshots go on while it waits (on a node that
    /// just lost the stream's leader it can wait out a whole request
    /// timeout).
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
    /// Subscribes to live snapshots, retrying until it works or nobody
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
        async move { catalog_stream::read_last(&js, &subjects).await }
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

impl Follower {
    async fn run(mut self, mut source: impl Source, mut link: watch::Receiver<Link>) {
        let mut generation = link.borrow_and_update().generation;
        let mut read = StreamRead::Due {
            attempt: 0,
            at: Instant::now(),
        };
        let mut reading: Option<Pin<Box<dyn Future<Output = StreamResult> + Send>>> = None;
        loop {
            let due = match read {
                StreamRead::Due { at, .. } if reading.is_none() => Some(at),
                _ => None,
            };
            tokio::select! {
                () = self.sender.closed() => return,
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    reading = Some(Box::pin(source.read_stream()));
                }
                result = async { reading.as_mut().expect("guarded by is_some").await }, if reading.is_some() => {
                    reading = None;
                    let StreamRead::Due { attempt, .. } = read else { continue };
                    read = match self.stream_read(result, attempt).await {
                        Some(read) => read,
                        None => return,
                    };
                }
                message = source.next_live() => {
                    let Some(message) = message else {
                        tracing::error!(subject = %self.subjects.catalog_wildcard(), "the catalog subscription ended: the NATS client was closed");
                        return;
                    };
                    if !self.live(&message).await {
                        return;
                    }
                }
                // Without a sender the link never changes and this branch
                // stays off: live snapshots go on, without re-syncs.
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
    async fn stream_read(&mut self, result: StreamResult, attempt: u32) -> Option<StreamRead> {
        match result {
            Ok(last) => {
                Stats::add(&self.stats.invalid, last.invalid as u64);
                self.reset(last.snapshots.into_iter().map(|s| s.snapshot))
                    .await
                    .then_some(StreamRead::Done)
            }
            Err(error) => {
                if attempt == 0 {
                    tracing::warn!(%error, "cannot read the catalog stream; following live snapshots and retrying");
                } else {
                    tracing::debug!(%error, attempt, "catalog stream still unreadable");
                }
                let attempt = attempt.saturating_add(1);
                // An absolute deadline: live snapshots arriving in between
                // must not put the retry off.
                Some(StreamRead::Due {
                    attempt,
                    at: Instant::now() + retry_delay(attempt),
                })
            }
        }
    }

    /// Hands on one live snapshot if it is newer. False when nobody listens.
    async fn live(&mut self, message: &async_nats::Message) -> bool {
        let snapshot = match self
            .subjects
            .parse_snapshot(&message.subject, &message.payload)
        {
            Ok(snapshot) => snapshot,
            Err(error) => {
                Stats::bump(&self.stats.invalid);
                tracing::warn!(subject = %message.subject, %error, "ignoring an invalid snapshot");
                return true;
            }
        };
        let (service, revision) = (snapshot.service.clone(), snapshot.revision);
        if let Err(held) = self.held.offer(snapshot.clone()) {
            Stats::bump(&self.stats.stale);
            tracing::debug!(%service, revision, held, "ignoring a snapshot that is not newer");
            return true;
        }
        Stats::bump(&self.stats.applied);
        self.sender.send(Update::Service(snapshot)).await.is_ok()
    }

    /// Merges what the stream holds into what is held (the newer revision
    /// wins) and hands the whole on as a Reset.
    async fn reset(&mut self, stored: impl Iterator<Item = Snapshot>) -> bool {
        for snapshot in stored {
            // An older stored revision loses to the one held: nothing to do.
            let _ = self.held.offer(snapshot);
        }
        let all = self.held.all();
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

    use super::*;
    use crate::catalog_stream::Stored;
    use crate::protocol::Instance;

    #[test]
    fn resync_retries_quickly_and_keeps_trying() {
        let delays: Vec<u128> = (0..7).map(|a| retry_delay(a).as_millis()).collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 800, 800]);
    }

    #[test]
    fn a_stale_revision_changes_nothing_whatever_it_lists() {
        let mut held = Held::default();
        let set = |revision: u64, ports: &[u16]| Snapshot {
            service: "web".into(),
            revision,
            instances: ports
                .iter()
                .map(|p| Instance::new("web", format!("i{p}"), "127.0.0.1", *p))
                .collect(),
        };
        assert_eq!(held.offer(set(5, &[1])), Ok(()));
        assert_eq!(held.offer(set(5, &[1, 2])), Err(5));
        assert_eq!(held.offer(set(4, &[])), Err(5));
        assert_eq!(held.all(), [set(5, &[1])]);
    }

    #[test]
    fn only_a_newer_revision_is_held() {
        let mut held = Held::default();
        assert_eq!(held.offer(snapshot(5, 1)), Ok(()));
        assert_eq!(held.offer(snapshot(5, 2)), Err(5));
        assert_eq!(held.offer(snapshot(4, 3)), Err(5));
        assert_eq!(held.offer(snapshot(6, 4)), Ok(()));
        assert_eq!(held.all(), [snapshot(6, 4)]);
    }

    fn snapshot(revision: u64, port: u16) -> Snapshot {
        Snapshot {
            service: "web".into(),
            revision,
            instances: vec![Instance::new("web", "a", "127.0.0.1", port)],
        }
    }

    /// `snapshot` as discovery publishes it.
    fn live_message(snapshot: &Snapshot) -> async_nats::Message {
        let payload = serde_json::to_vec(snapshot).expect("a snapshot serializes");
        async_nats::Message {
            subject: Subjects::default().catalog(&snapshot.service).into(),
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
        stored: Vec<Snapshot>,
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
                Ok(LastSnapshots {
                    snapshots: (self.stored.iter().cloned())
                        .map(|snapshot| Stored {
                            snapshot,
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
        fn start(failing: bool, stored: Vec<Snapshot>) -> Harness {
            let failing = Arc::new(AtomicBool::new(failing));
            let hanging = Arc::new(AtomicBool::new(false));
            let (reads_tx, reads) = mpsc::unbounded_channel();
            let (live, live_rx) = mpsc::unbounded_channel();
            let (link, link_rx) = watch::channel(UP);
            let (sender, updates) = mpsc::channel(256);
            let source = Scripted {
                failing: Arc::clone(&failing),
                hanging: Arc::clone(&hanging),
                stored,
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
                reads,
                live,
                link,
                updates,
            }
        }

        fn publish(&self, snapshot: &Snapshot) {
            self.live
                .send(live_message(snapshot))
                .expect("the follower is running");
        }

        async fn read(&mut self) -> Instant {
            self.reads.recv().await.expect("the follower is running")
        }

        async fn update(&mut self) -> Update {
            self.updates.recv().await.expect("the follower is running")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn live_snapshots_do_not_put_off_a_failed_stream_read() {
        let mut h = Harness::start(true, Vec::new());
        let first = h.read().await;
        // Live snapshots every 50 ms, faster than the 100 ms retry delay.
        let live = h.live.clone();
        let publisher = tokio::spawn(async move {
            for revision in 1..=40 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if live.send(live_message(&snapshot(revision, 1))).is_err() {
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

    #[tokio::test(start_paused = true)]
    async fn a_reset_first_then_newer_live_snapshots_and_a_resync_on_reconnect() {
        let mut h = Harness::start(false, vec![snapshot(3, 1)]);
        assert_eq!(h.update().await, Update::Reset(vec![snapshot(3, 1)]));
        for (revision, port) in [(3, 2), (2, 3), (4, 4)] {
            h.publish(&snapshot(revision, port));
        }
        assert_eq!(h.update().await, Update::Service(snapshot(4, 4)));

        h.link
            .send(Link {
                connected: false,
                ..UP
            })
            .expect("follower listens");
        h.failing.store(true, Ordering::SeqCst);
        let lost = h.read().await;
        h.link
            .send(Link {
                connected: true,
                generation: 2,
            })
            .expect("follower listens");
        let back = Instant::now();
        let failed = h.read().await;
        assert_eq!(failed, back, "a reconnect re-reads at once");
        h.failing.store(false, Ordering::SeqCst);
        assert_eq!(h.read().await - failed, retry_delay(1));
        assert!(lost <= back);
        assert_eq!(
            h.update().await,
            Update::Reset(vec![snapshot(4, 4)]),
            "the held revision beats the older stored one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn live_snapshots_go_on_while_a_stream_read_hangs() {
        let mut h = Harness::start(false, vec![snapshot(3, 1)]);
        assert_eq!(h.update().await, Update::Reset(vec![snapshot(3, 1)]));
        h.hanging.store(true, Ordering::SeqCst);
        h.link
            .send(Link {
                connected: true,
                generation: 2,
            })
            .expect("follower listens");
        h.read().await;
        h.publish(&snapshot(4, 2));
        let began = Instant::now();
        assert_eq!(h.update().await, Update::Service(snapshot(4, 2)));
        assert_eq!(began.elapsed(), Duration::ZERO, "not held behind the read");
        // A reconnect while it hangs starts a read that is answered.
        h.hanging.store(false, Ordering::SeqCst);
        h.link
            .send(Link {
                connected: true,
                generation: 3,
            })
            .expect("follower listens");
        h.read().await;
        assert_eq!(h.update().await, Update::Reset(vec![snapshot(4, 2)]));
    }
}

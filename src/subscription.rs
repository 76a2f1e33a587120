//! Stage 3, the catalog subscription: the one place that turns catalog
//! messages from NATS into a stream of [`Update`]s for a balancer.
//!
//! On start, and again after every reconnect, it reads the last snapshot of
//! every service from the catalog stream and hands on a [`Update::Reset`];
//! in between it follows live snapshots on a core subscription (the fast
//! path). A snapshot whose revision is not above the one held is dropped.
//! While NATS is away, nothing is handed on, so the balancer keeps routing
//! on the last catalog it has.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{jetstream, Client};
use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc};

use crate::catalog::Update;
use crate::catalog_stream;
use crate::connect::Connection;
use crate::protocol::{Snapshot, Subjects};

/// Counters of a catalog subscription.
#[derive(Debug, Default)]
pub struct SubscriptionStats {
    /// Live snapshots handed on.
    pub applied: AtomicU64,
    /// Snapshots dropped because their revision was not newer.
    pub stale: AtomicU64,
    /// Catalog messages that were not valid snapshots.
    pub invalid: AtomicU64,
    /// Resets handed on (start and every re-sync).
    pub resets: AtomicU64,
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
    stats: Arc<SubscriptionStats>,
) -> impl Stream<Item = Update> + Send + 'static {
    let (sender, receiver) = mpsc::channel(256);
    let follower = Follower {
        client: connection.client.clone(),
        events: connection.events(),
        subjects,
        held: HashMap::new(),
        sender,
        stats,
    };
    tokio::spawn(follower.run());
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|update| (update, receiver))
    })
}

struct Follower {
    client: Client,
    events: broadcast::Receiver<async_nats::Event>,
    subjects: Subjects,
    /// The newest snapshot of every service seen, from the stream or live.
    held: HashMap<String, Snapshot>,
    sender: mpsc::Sender<Update>,
    stats: Arc<SubscriptionStats>,
}

/// The state of the stream read.
enum Sync {
    /// Read the stream (again) at the next chance.
    Needed {
        attempt: u32,
    },
    Done,
}

impl Follower {
    async fn run(mut self) {
        let subject = self.subjects.catalog_wildcard();
        // Subscribed before the stream is read, so nothing published in
        // between is missed; async-nats re-subscribes after reconnects.
        let mut live = loop {
            match self.client.subscribe(subject.clone()).await {
                Ok(subscription) => break subscription,
                Err(error) => {
                    tracing::error!(%subject, %error, "cannot subscribe to the catalog; retrying");
                    if self.sender.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let js = jetstream::new(self.client.clone());
        let mut sync = Sync::Needed { attempt: 0 };
        loop {
            let retry = match sync {
                Sync::Needed { attempt } => Some(retry_delay(attempt)),
                Sync::Done => None,
            };
            tokio::select! {
                () = self.sender.closed() => return,
                () = sleep_or_never(retry) => {
                    let Sync::Needed { attempt } = sync else { continue };
                    sync = match catalog_stream::read_last(&js, &self.subjects).await {
                        Ok(last) => {
                            self.stats.invalid.fetch_add(last.invalid as u64, Ordering::Relaxed);
                            if !self.reset(last.snapshots.into_iter().map(|s| s.snapshot)).await {
                                return;
                            }
                            Sync::Done
                        }
                        Err(error) => {
                            if attempt == 0 {
                                tracing::warn!(%error, "cannot read the catalog stream; following live snapshots and retrying");
                            } else {
                                tracing::debug!(%error, attempt, "catalog stream still unreadable");
                            }
                            Sync::Needed { attempt: attempt.saturating_add(1) }
                        }
                    };
                }
                message = live.next() => {
                    let Some(message) = message else {
                        tracing::error!(%subject, "the catalog subscription ended: the NATS client was closed");
                        return;
                    };
                    if !self.live(&message).await {
                        return;
                    }
                }
                event = self.events.recv() => match event {
                    Ok(async_nats::Event::Connected) => {
                        tracing::info!("NATS connection back: re-reading the catalog stream");
                        sync = Sync::Needed { attempt: 0 };
                    }
                    Ok(async_nats::Event::Disconnected) => {
                        tracing::warn!("NATS connection lost: the catalog is stale until it is back; routing on the last one");
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => sync = Sync::Needed { attempt: 0 },
                    Err(broadcast::error::RecvError::Closed) => {
                        // The connection's event sender is gone; keep
                        // following live snapshots without re-syncs.
                        self.events = broadcast::channel(1).1;
                    }
                },
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
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(subject = %message.subject, %error, "ignoring an invalid snapshot");
                return true;
            }
        };
        if let Some(held) = self.held.get(&snapshot.service) {
            if snapshot.revision <= held.revision {
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(service = %snapshot.service, revision = snapshot.revision, held = held.revision, "ignoring a snapshot that is not newer");
                return true;
            }
        }
        self.held.insert(snapshot.service.clone(), snapshot.clone());
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        self.sender.send(Update::Service(snapshot)).await.is_ok()
    }

    /// Merges what the stream holds into what is held (the newer revision
    /// wins) and hands the whole on as a Reset.
    async fn reset(&mut self, stored: impl Iterator<Item = Snapshot>) -> bool {
        for snapshot in stored {
            let newer = self
                .held
                .get(&snapshot.service)
                .is_none_or(|held| snapshot.revision > held.revision);
            if newer {
                self.held.insert(snapshot.service.clone(), snapshot);
            }
        }
        let mut all: Vec<Snapshot> = self.held.values().cloned().collect();
        all.sort_by(|a, b| a.service.cmp(&b.service));
        tracing::info!(services = all.len(), "catalog synced from the stream");
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
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

async fn sleep_or_never(delay: Option<Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::retry_delay;

    #[test]
    fn resync_retries_quickly_and_keeps_trying() {
        let delays: Vec<u128> = (0..7).map(|a| retry_delay(a).as_millis()).collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 800, 800]);
    }
}

//! The sender: a Rust service announces itself. Registers on start,
//! heartbeats every interval, re-registers when its record changes or NATS
//! comes back, and deregisters on shutdown; it hands discovery the register,
//! heartbeat and deregister events of docs/protocol.md. A [`Gate`] consulted
//! at every beat can hold heartbeats or withdraw the instance (`rollcall
//! agent` gates on an HTTP health check); this is the one heartbeat engine.
//!
//! Deregistration is explicit and awaited ([`Announcement::deregister`]) so a
//! service can take itself out of rotation *before* its listener closes;
//! dropping the handle deregisters too, on a best-effort basis, from the
//! background task.
//!
//! ```no_run
//! use std::time::Duration;
//! use rollcall::announcer::Announcer;
//! use rollcall::connect::NatsOptions;
//! use rollcall::protocol::{Instance, Subjects};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let connection = NatsOptions::new("nats://127.0.0.1:4222").connect("web-1").await?;
//! let instance = Instance::new("web", "web-1", "127.0.0.1", 8081);
//! let announcement = Announcer::new(&connection, Subjects::default(), instance)
//!     .interval(Duration::from_secs(1))
//!     .start()
//!     .await?;
//! // … serve until asked to stop, then leave the rotation first:
//! announcement.deregister().await?;
//! // … and only now close the listener.
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use async_nats::client::{FlushErrorKind, PublishErrorKind};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::connect::{Connection, Link, NatsError};
use crate::metrics::AgentMetrics;
use crate::protocol::{EventKind, Instance, ProtocolError, Subjects};

/// How often a heartbeat goes out when nothing else is said.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// How long one publish (or the flush after a register or deregister) may take
/// before it counts as failed: NATS being away must not hang a shutdown.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Checks that `instance` may be announced with heartbeats every `interval`:
/// a valid record, and an interval above zero and below its TTL (or it
/// would expire between heartbeats).
pub(crate) fn check_announcement(
    instance: &Instance,
    interval: Duration,
) -> Result<(), AnnounceError> {
    instance
        .validate()
        .map_err(AnnounceError::InvalidInstance)?;
    if interval.is_zero() || interval >= instance.ttl() {
        return Err(AnnounceError::IntervalTooLong {
            interval,
            ttl: instance.ttl(),
        });
    }
    Ok(())
}

/// What went wrong while announcing, with the subject or instance involved.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("instance record refused before announcing")]
    InvalidInstance(#[source] ProtocolError),
    #[error("heartbeat interval {interval:?} is not below the instance's ttl_ms ({ttl:?}); the instance would expire between heartbeats")]
    IntervalTooLong { interval: Duration, ttl: Duration },
    #[error("update may not change the identity: announcing {service}/{id}, update names {new_service}/{new_id}; deregister and start a new announcement instead")]
    IdentityChanged {
        service: String,
        id: String,
        new_service: String,
        new_id: String,
    },
    #[error("cannot publish on {subject}")]
    Publish {
        subject: String,
        #[source]
        source: NatsError<PublishErrorKind>,
    },
    #[error("cannot flush {subject} to NATS")]
    Flush {
        subject: String,
        #[source]
        source: NatsError<FlushErrorKind>,
    },
    #[error("NATS did not take {subject} within {after:?}; is the connection up?")]
    Timeout { subject: String, after: Duration },
    #[error("the announcement task of {service}/{id} has stopped")]
    Stopped { service: String, id: String },
}

/// Where announcements go: NATS in production. A seam so the timing of the
/// loop can be checked with paused time and a channel, which real sockets do
/// not mix with.
pub trait Wire: Clone + Send + Sync + 'static {
    fn publish(
        &self,
        subject: String,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), AnnounceError>> + Send;
    fn flush(&self, subject: &str) -> impl Future<Output = Result<(), AnnounceError>> + Send;
}

impl Wire for async_nats::Client {
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), AnnounceError> {
        async_nats::Client::publish(self, subject.clone(), payload)
            .await
            .map_err(|source| AnnounceError::Publish {
                subject,
                source: NatsError(source),
            })
    }

    async fn flush(&self, subject: &str) -> Result<(), AnnounceError> {
        async_nats::Client::flush(self)
            .await
            .map_err(|source| AnnounceError::Flush {
                subject: subject.to_owned(),
                source: NatsError(source),
            })
    }
}

/// Sends the three events for instances of one fleet, each bounded by
/// [`SEND_TIMEOUT`]. Register and deregister are flushed, so they are on the
/// wire when the call returns; heartbeats are not, their loss is harmless.
#[derive(Debug, Clone)]
pub(crate) struct Publisher<W = async_nats::Client> {
    wire: W,
    subjects: Subjects,
    metrics: Option<AgentMetrics>,
}

impl Publisher {
    pub fn new(client: async_nats::Client, subjects: Subjects) -> Self {
        Publisher {
            wire: client,
            subjects,
            metrics: None,
        }
    }
}

impl<W: Wire> Publisher<W> {
    pub async fn register(&self, instance: &Instance) -> Result<(), AnnounceError> {
        self.send(EventKind::Register, instance, true).await
    }

    pub async fn heartbeat(&self, instance: &Instance) -> Result<(), AnnounceError> {
        self.send(EventKind::Heartbeat, instance, false).await
    }

    pub async fn deregister(&self, instance: &Instance) -> Result<(), AnnounceError> {
        self.send(EventKind::Deregister, instance, true).await
    }

    async fn send(
        &self,
        kind: EventKind,
        instance: &Instance,
        flush: bool,
    ) -> Result<(), AnnounceError> {
        let subject = self.subjects.event(kind, &instance.service, &instance.id);
        // The deregister carries the record too: a reader with `nats sub`
        // sees who left, and docs/protocol.md allows it.
        let payload = Bytes::from(
            serde_json::to_vec(instance).expect("an Instance always serializes to JSON"),
        );
        let sending = async {
            self.wire.publish(subject.clone(), payload).await?;
            if flush {
                self.wire.flush(&subject).await?;
            }
            Ok(())
        };
        let result = tokio::time::timeout(SEND_TIMEOUT, sending)
            .await
            .unwrap_or_else(|_| {
                Err(AnnounceError::Timeout {
                    subject: subject.clone(),
                    after: SEND_TIMEOUT,
                })
            });
        if let Some(metrics) = &self.metrics {
            metrics.sent(kind, result.is_ok());
        }
        result
    }
}

/// What a [`Gate`] allows at one beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Be in the catalog: heartbeat, or register if out.
    Announce,
    /// Stay silent this beat and let the TTL decide if it lasts.
    Hold,
    /// Leave the catalog: deregister if in, stay out.
    Withdraw,
}

/// Consulted before every beat (and before the first register): whether the
/// instance may be announced now.
pub trait Gate: Send + 'static {
    fn verdict(&mut self) -> impl Future<Output = Verdict> + Send;
}

/// The gate of a service that announces itself: always open.
#[derive(Debug, Clone, Copy, Default)]
pub struct Always;

impl Gate for Always {
    async fn verdict(&mut self) -> Verdict {
        Verdict::Announce
    }
}

/// Configures one announcement; [`Announcer::start`] begins it.
pub struct Announcer<W = async_nats::Client, G = Always> {
    publisher: Publisher<W>,
    instance: Instance,
    interval: Duration,
    link: watch::Receiver<Link>,
    gate: G,
}

impl Announcer {
    /// Announces `instance` over `connection`, re-registering right after
    /// every reconnect (learned from the connection's [`Link`]).
    pub fn new(connection: &Connection, subjects: Subjects, instance: Instance) -> Self {
        let mut announcer = Self::with_client(connection.client.clone(), subjects, instance);
        announcer.link = connection.link();
        announcer
    }

    /// Announces over a bare client. Without the connection's link a
    /// reconnect is noticed by nobody here; the next heartbeat, which carries
    /// the whole record, brings the instance back within one interval.
    pub fn with_client(client: async_nats::Client, subjects: Subjects, instance: Instance) -> Self {
        Announcer {
            publisher: Publisher::new(client, subjects),
            instance,
            interval: DEFAULT_INTERVAL,
            // A link that never changes: its sender is gone.
            link: watch::channel(Link::default()).1,
            gate: Always,
        }
    }
}

impl<W: Wire, G: Gate> Announcer<W, G> {
    /// Heartbeat interval; [`DEFAULT_INTERVAL`] unless set.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Counts heartbeats and failed sends into `metrics`.
    pub fn metrics(mut self, metrics: AgentMetrics) -> Self {
        self.publisher.metrics = Some(metrics);
        self
    }

    /// Consults `gate` before the first register and every beat after.
    pub fn gate<H: Gate>(self, gate: H) -> Announcer<W, H> {
        Announcer {
            publisher: self.publisher,
            instance: self.instance,
            interval: self.interval,
            link: self.link,
            gate,
        }
    }

    /// Checks the record, asks the gate, registers if it allows (flushed: on
    /// the wire when this returns) and starts heartbeating in a background
    /// task.
    pub async fn start(mut self) -> Result<Announcement, AnnounceError> {
        check_announcement(&self.instance, self.interval)?;
        let registered = self.gate.verdict().await == Verdict::Announce;
        if registered {
            self.publisher.register(&self.instance).await?;
            tracing::info!(
                service = %self.instance.service,
                id = %self.instance.id,
                address = %self.instance.authority(),
                "registered"
            );
        }
        let (commands, receiver) = mpsc::channel(8);
        let handle = Announcement {
            commands,
            service: self.instance.service.clone(),
            id: self.instance.id.clone(),
        };
        let generation = self.link.borrow_and_update().generation;
        let task = Task {
            publisher: self.publisher,
            instance: self.instance,
            interval: self.interval,
            link: self.link,
            generation,
            gate: self.gate,
            registered,
            commands: receiver,
        };
        tokio::spawn(task.run());
        Ok(handle)
    }
}

/// A running announcement. Dropping it deregisters in the background (best
/// effort); call [`Announcement::deregister`] to know it is done.
#[derive(Debug)]
pub struct Announcement {
    commands: mpsc::Sender<Command>,
    service: String,
    id: String,
}

enum Command {
    Update(Instance, oneshot::Sender<Result<(), AnnounceError>>),
    Deregister(oneshot::Sender<Result<(), AnnounceError>>),
}

impl Announcement {
    /// Replaces the record and registers it at once. The service and id must
    /// stay the same.
    pub async fn update(&self, instance: Instance) -> Result<(), AnnounceError> {
        instance
            .validate()
            .map_err(AnnounceError::InvalidInstance)?;
        if instance.service != self.service || instance.id != self.id {
            return Err(AnnounceError::IdentityChanged {
                service: self.service.clone(),
                id: self.id.clone(),
                new_service: instance.service,
                new_id: instance.id,
            });
        }
        self.ask(|reply| Command::Update(instance, reply)).await
    }

    /// Deregisters (flushed: on the wire when this returns) and stops
    /// heartbeating. Sends nothing when the gate had withdrawn the instance.
    pub async fn deregister(self) -> Result<(), AnnounceError> {
        self.ask(Command::Deregister).await
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), AnnounceError>>) -> Command,
    ) -> Result<(), AnnounceError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || AnnounceError::Stopped {
            service: self.service.clone(),
            id: self.id.clone(),
        };
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

struct Task<W, G> {
    publisher: Publisher<W>,
    instance: Instance,
    interval: Duration,
    link: watch::Receiver<Link>,
    /// The link generation the instance was last registered on.
    generation: u64,
    gate: G,
    /// Whether the instance is meant to be in the catalog (the gate has not
    /// withdrawn it).
    registered: bool,
    commands: mpsc::Receiver<Command>,
}

impl<W: Wire, G: Gate> Task<W, G> {
    async fn run(mut self) {
        let mut ticker = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        // After a stall, beat once and keep the rhythm from there, rather
        // than sending a burst of heartbeats nobody needs.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.beat().await,
                command = self.commands.recv() => match command {
                    Some(Command::Update(instance, reply)) => {
                        self.instance = instance;
                        let result = self.publisher.register(&self.instance).await;
                        if result.is_ok() {
                            self.registered = true;
                            tracing::info!(service = %self.instance.service, id = %self.instance.id, "re-registered with a new record");
                        }
                        ticker.reset();
                        let _ = reply.send(result);
                    }
                    Some(Command::Deregister(reply)) => {
                        let _ = reply.send(self.deregister().await);
                        return;
                    }
                    None => {
                        // The handle was dropped without a deregister.
                        if let Err(error) = self.deregister().await {
                            tracing::warn!(%error, "deregister on drop failed; the instance leaves at its TTL");
                        }
                        return;
                    }
                },
                // Without a sender (a bare client) the link never changes
                // and this branch stays off.
                Ok(()) = self.link.changed() => {
                    if self.on_link().await {
                        ticker.reset();
                    }
                }
            }
        }
    }

    /// One beat: what the gate allows.
    async fn beat(&mut self) {
        let (service, id) = (&self.instance.service, &self.instance.id);
        match self.gate.verdict().await {
            Verdict::Announce if self.registered => {
                if let Err(error) = self.publisher.heartbeat(&self.instance).await {
                    tracing::warn!(%error, "heartbeat not sent; retrying at the next interval");
                }
            }
            Verdict::Announce => match self.publisher.register(&self.instance).await {
                Ok(()) => {
                    self.registered = true;
                    tracing::info!(%service, %id, address = %self.instance.authority(), "registered");
                }
                Err(error) => {
                    tracing::warn!(%error, "register not sent; retrying at the next interval")
                }
            },
            Verdict::Hold => {}
            Verdict::Withdraw if self.registered => {
                self.registered = false;
                match self.publisher.deregister(&self.instance).await {
                    Ok(()) => tracing::info!(%service, %id, "deregistered"),
                    Err(error) => {
                        tracing::warn!(%error, "deregister not sent; the instance leaves at its TTL")
                    }
                }
            }
            Verdict::Withdraw => {}
        }
    }

    async fn deregister(&mut self) -> Result<(), AnnounceError> {
        if !self.registered {
            return Ok(());
        }
        let result = self.publisher.deregister(&self.instance).await;
        if result.is_ok() {
            tracing::info!(service = %self.instance.service, id = %self.instance.id, "deregistered");
        }
        result
    }

    /// Re-registers once the link is back after a spell away (whatever the
    /// server forgot meanwhile); true when a register went out.
    async fn on_link(&mut self) -> bool {
        let link = *self.link.borrow_and_update();
        if !link.connected || link.generation == self.generation {
            return false;
        }
        self.generation = link.generation;
        if !self.registered {
            return false;
        }
        match self.publisher.register(&self.instance).await {
            Ok(()) => {
                tracing::info!(service = %self.instance.service, id = %self.instance.id, "re-registered after reconnect");
                true
            }
            Err(error) => {
                tracing::warn!(%error, "re-register after reconnect failed; the next heartbeat carries the record");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what would have gone to NATS.
    #[derive(Clone)]
    struct Recorder(mpsc::UnboundedSender<(String, Instance)>);

    impl Wire for Recorder {
        async fn publish(&self, subject: String, payload: Bytes) -> Result<(), AnnounceError> {
            let instance = serde_json::from_slice(&payload).expect("announcer sends Instances");
            let _ = self.0.send((subject, instance));
            Ok(())
        }

        async fn flush(&self, _subject: &str) -> Result<(), AnnounceError> {
            Ok(())
        }
    }

    fn announcer(
        link: watch::Receiver<Link>,
    ) -> (
        Announcer<Recorder>,
        mpsc::UnboundedReceiver<(String, Instance)>,
    ) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let announcer = Announcer {
            publisher: Publisher {
                wire: Recorder(sender),
                subjects: Subjects::default(),
                metrics: None,
            },
            instance: Instance::new("web", "web-1", "127.0.0.1", 8081),
            interval: Duration::from_millis(500),
            link,
            gate: Always,
        };
        (announcer, receiver)
    }

    /// A link nobody changes.
    fn still() -> watch::Receiver<Link> {
        watch::channel(Link::default()).1
    }

    const UP: Link = Link {
        connected: true,
        generation: 1,
    };

    async fn next(
        sent: &mut mpsc::UnboundedReceiver<(String, Instance)>,
    ) -> (String, Instance, Instant) {
        let (subject, instance) = sent.recv().await.expect("the task is running");
        (subject, instance, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn registers_then_heartbeats_exactly_at_the_interval() {
        let (announcer, mut sent) = announcer(still());
        let started = Instant::now();
        let handle = announcer.start().await.expect("valid record");
        let (subject, _, at) = next(&mut sent).await;
        assert_eq!(subject, "rollcall.register.web.web-1");
        assert_eq!(at, started);
        for beat in 1..=4 {
            let (subject, instance, at) = next(&mut sent).await;
            assert_eq!(subject, "rollcall.heartbeat.web.web-1");
            assert_eq!(instance.port, 8081);
            assert_eq!(at - started, Duration::from_millis(500) * beat);
        }
        handle.deregister().await.expect("deregisters");
        let (subject, _, _) = next(&mut sent).await;
        assert_eq!(subject, "rollcall.deregister.web.web-1");
        assert!(sent.recv().await.is_none(), "nothing after a deregister");
    }

    #[tokio::test(start_paused = true)]
    async fn update_registers_at_once_and_restarts_the_rhythm() {
        let (announcer, mut sent) = announcer(still());
        let handle = announcer.start().await.expect("valid record");
        next(&mut sent).await;
        tokio::time::advance(Duration::from_millis(200)).await;
        let mut changed = Instance::new("web", "web-1", "127.0.0.1", 8081);
        changed.weight = 5;
        let updated_at = Instant::now();
        handle.update(changed).await.expect("same identity");
        let (subject, instance, _) = next(&mut sent).await;
        assert_eq!(subject, "rollcall.register.web.web-1");
        assert_eq!(instance.weight, 5);
        let (subject, instance, at) = next(&mut sent).await;
        assert_eq!(subject, "rollcall.heartbeat.web.web-1");
        assert_eq!(instance.weight, 5, "heartbeats carry the new record");
        assert_eq!(at - updated_at, Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_re_registers_immediately() {
        let (link, receiver) = watch::channel(UP);
        let (announcer, mut sent) = announcer(receiver);
        let _handle = announcer.start().await.expect("valid record");
        next(&mut sent).await;
        tokio::time::advance(Duration::from_millis(100)).await;
        let reconnected_at = Instant::now();
        link.send(Link {
            connected: false,
            ..UP
        })
        .expect("task listens");
        link.send(Link {
            connected: true,
            generation: 2,
        })
        .expect("task listens");
        let (subject, _, at) = next(&mut sent).await;
        assert_eq!(subject, "rollcall.register.web.web-1");
        assert_eq!(at, reconnected_at);
    }

    /// A gate that answers from a script, one verdict per beat, then keeps
    /// the last.
    struct Scripted(std::collections::VecDeque<Verdict>);

    impl Gate for Scripted {
        async fn verdict(&mut self) -> Verdict {
            match self.0.len() {
                0 => Verdict::Announce,
                1 => self.0[0],
                _ => self.0.pop_front().unwrap_or(Verdict::Announce),
            }
        }
    }

    fn scripted(verdicts: &[Verdict]) -> Scripted {
        Scripted(verdicts.iter().copied().collect())
    }

    #[tokio::test(start_paused = true)]
    async fn a_gate_holds_heartbeats_withdraws_and_lets_back_in() {
        use Verdict::{Announce, Hold, Withdraw};
        let (announcer, mut sent) = announcer(still());
        let gate = scripted(&[Announce, Announce, Hold, Hold, Withdraw, Withdraw, Announce]);
        let started = Instant::now();
        let handle = announcer.gate(gate).start().await.expect("valid record");
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (subject, _, at) = next(&mut sent).await;
            seen.push((subject, at - started));
        }
        let ms = Duration::from_millis;
        assert_eq!(
            seen,
            [
                ("rollcall.register.web.web-1".to_owned(), ms(0)),
                ("rollcall.heartbeat.web.web-1".to_owned(), ms(500)),
                ("rollcall.deregister.web.web-1".to_owned(), ms(2000)),
                ("rollcall.register.web.web-1".to_owned(), ms(3000)),
            ],
            "held at 1000 and 1500 ms, out at 2000 and silent at 2500 ms"
        );
        let (subject, _, at) = next(&mut sent).await;
        assert_eq!(subject, "rollcall.heartbeat.web.web-1");
        assert_eq!(at - started, ms(3500));
        handle.deregister().await.expect("deregisters");
    }

    #[tokio::test(start_paused = true)]
    async fn a_withdrawn_instance_stays_out_through_reconnects_and_shutdown() {
        let (link, receiver) = watch::channel(UP);
        let (announcer, mut sent) = announcer(receiver);
        let handle = announcer
            .gate(scripted(&[Verdict::Withdraw]))
            .start()
            .await
            .expect("valid record");
        link.send(Link {
            connected: true,
            generation: 2,
        })
        .expect("task listens");
        tokio::time::advance(Duration::from_secs(2)).await;
        handle.deregister().await.expect("nothing to send");
        assert!(
            sent.recv().await.is_none(),
            "never in the catalog, so nothing was sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_handle_deregisters() {
        let (announcer, mut sent) = announcer(still());
        let handle = announcer.start().await.expect("valid record");
        next(&mut sent).await;
        drop(handle);
        let (subject, _, _) = next(&mut sent).await;
        assert_eq!(subject, "rollcall.deregister.web.web-1");
    }

    #[tokio::test]
    async fn bad_records_and_updates_are_refused_naming_the_field() {
        let (mut bad, _sent) = announcer(still());
        bad.instance.port = 0;
        let error = bad.start().await.expect_err("port 0 is refused");
        assert!(
            crate::ErrorChain(&error).to_string().contains("port"),
            "{error}"
        );

        let (mut slow, _sent) = announcer(still());
        slow.interval = Duration::from_secs(3);
        let error = slow.start().await.expect_err("interval must be below ttl");
        assert!(
            matches!(error, AnnounceError::IntervalTooLong { .. }),
            "{error}"
        );

        let (good, _sent) = announcer(still());
        let handle = good.start().await.expect("valid");
        let error = handle
            .update(Instance::new("web", "web-2", "127.0.0.1", 8081))
            .await
            .expect_err("identity is fixed");
        assert!(
            matches!(error, AnnounceError::IdentityChanged { .. }),
            "{error}"
        );
        let error = handle
            .update(Instance::new("web", "web-1", "has space", 8081))
            .await
            .expect_err("bad address");
        assert!(
            crate::ErrorChain(&error).to_string().contains("address"),
            "{error}"
        );
    }
}

//! Stage 1, the sender: a Rust service announces itself. Registers on start,
//! heartbeats every interval, re-registers when its record changes or NATS
//! comes back, and deregisters on shutdown; it hands discovery the register,
//! heartbeat and deregister events of PROTOCOL.md.
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

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use crate::connect::Connection;
use crate::protocol::{EventKind, Instance, ProtocolError, Subjects};

/// How often a heartbeat goes out when nothing else is said.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// How long one publish (or the flush after a register or deregister) may take
/// before it counts as failed: NATS being away must not hang a shutdown.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Checks that `instance` may be announced with heartbeats every `interval`:
/// a valid record, and an interval above zero and below its TTL (or it
/// would expire between heartbeats).
pub fn check_announcement(instance: &Instance, interval: Duration) -> Result<(), AnnounceError> {
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
    #[error("instance record refused before announcing: {0}")]
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
    #[error("cannot publish on {subject}: {source}")]
    Publish {
        subject: String,
        source: async_nats::PublishError,
    },
    #[error("cannot flush {subject} to NATS: {source}")]
    Flush {
        subject: String,
        source: async_nats::client::FlushError,
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
            .map_err(|source| AnnounceError::Publish { subject, source })
    }

    async fn flush(&self, subject: &str) -> Result<(), AnnounceError> {
        async_nats::Client::flush(self)
            .await
            .map_err(|source| AnnounceError::Flush {
                subject: subject.to_owned(),
                source,
            })
    }
}

/// Sends the three events for instances of one fleet, each bounded by
/// [`SEND_TIMEOUT`]. Register and deregister are flushed, so they are on the
/// wire when the call returns; heartbeats are not, their loss is harmless.
#[derive(Debug, Clone)]
pub struct Publisher<W = async_nats::Client> {
    wire: W,
    subjects: Subjects,
}

impl Publisher {
    pub fn new(client: async_nats::Client, subjects: Subjects) -> Self {
        Publisher {
            wire: client,
            subjects,
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
        // sees who left, and PROTOCOL.md allows it.
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
        tokio::time::timeout(SEND_TIMEOUT, sending)
            .await
            .unwrap_or_else(|_| {
                Err(AnnounceError::Timeout {
                    subject: subject.clone(),
                    after: SEND_TIMEOUT,
                })
            })
    }
}

/// Configures one announcement; [`Announcer::start`] begins it.
pub struct Announcer<W = async_nats::Client> {
    publisher: Publisher<W>,
    instance: Instance,
    interval: Duration,
    events: Option<broadcast::Receiver<async_nats::Event>>,
}

impl Announcer {
    /// Announces `instance` over `connection`, re-registering right after
    /// every reconnect (learned from the connection's events).
    pub fn new(connection: &Connection, subjects: Subjects, instance: Instance) -> Self {
        let mut announcer = Self::with_client(connection.client.clone(), subjects, instance);
        announcer.events = Some(connection.events());
        announcer
    }

    /// Announces over a bare client. Without connection events a reconnect is
    /// noticed by nobody here; the next heartbeat, which carries the whole
    /// record, brings the instance back within one interval.
    pub fn with_client(client: async_nats::Client, subjects: Subjects, instance: Instance) -> Self {
        Announcer {
            publisher: Publisher::new(client, subjects),
            instance,
            interval: DEFAULT_INTERVAL,
            events: None,
        }
    }
}

impl<W: Wire> Announcer<W> {
    /// Heartbeat interval; [`DEFAULT_INTERVAL`] unless set.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Checks the record, registers (flushed: it is on the wire when this
    /// returns) and starts heartbeating in a background task.
    pub async fn start(self) -> Result<Announcement, AnnounceError> {
        check_announcement(&self.instance, self.interval)?;
        self.publisher.register(&self.instance).await?;
        tracing::info!(
            service = %self.instance.service,
            id = %self.instance.id,
            address = %self.instance.authority(),
            "registered"
        );
        let (commands, receiver) = mpsc::channel(8);
        let handle = Announcement {
            commands,
            service: self.instance.service.clone(),
            id: self.instance.id.clone(),
        };
        let task = Task {
            publisher: self.publisher,
            instance: self.instance,
            interval: self.interval,
            events: self.events,
            disconnected: false,
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
    /// heartbeating.
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

struct Task<W> {
    publisher: Publisher<W>,
    instance: Instance,
    interval: Duration,
    events: Option<broadcast::Receiver<async_nats::Event>>,
    /// Set by a disconnect, so the `Connected` of the first connection, which
    /// may arrive late, does not count as a reconnect.
    disconnected: bool,
    commands: mpsc::Receiver<Command>,
}

impl<W: Wire> Task<W> {
    async fn run(mut self) {
        let mut ticker = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        // After a stall, beat once and keep the rhythm from there, rather
        // than sending a burst of heartbeats nobody needs.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(error) = self.publisher.heartbeat(&self.instance).await {
                        tracing::warn!(%error, "heartbeat not sent; retrying at the next interval");
                    }
                }
                command = self.commands.recv() => match command {
                    Some(Command::Update(instance, reply)) => {
                        self.instance = instance;
                        let result = self.publisher.register(&self.instance).await;
                        if result.is_ok() {
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
                event = next_event(&mut self.events) => {
                    if self.on_connection_event(event).await {
                        ticker.reset();
                    }
                }
            }
        }
    }

    async fn deregister(&self) -> Result<(), AnnounceError> {
        let result = self.publisher.deregister(&self.instance).await;
        if result.is_ok() {
            tracing::info!(service = %self.instance.service, id = %self.instance.id, "deregistered");
        }
        result
    }

    /// Re-registers after a reconnect (or after missing events, to be safe);
    /// true when a register went out.
    async fn on_connection_event(
        &mut self,
        event: Result<async_nats::Event, broadcast::error::RecvError>,
    ) -> bool {
        match event {
            Ok(async_nats::Event::Disconnected) => {
                self.disconnected = true;
                false
            }
            Ok(async_nats::Event::Connected) if !self.disconnected => false,
            Ok(async_nats::Event::Connected) | Err(broadcast::error::RecvError::Lagged(_)) => {
                self.disconnected = false;
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
            Ok(_) => false,
            Err(broadcast::error::RecvError::Closed) => {
                self.events = None;
                false
            }
        }
    }
}

/// The next connection event, or never when there is no event source.
pub(crate) async fn next_event(
    events: &mut Option<broadcast::Receiver<async_nats::Event>>,
) -> Result<async_nats::Event, broadcast::error::RecvError> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
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
        events: Option<broadcast::Receiver<async_nats::Event>>,
    ) -> (
        Announcer<Recorder>,
        mpsc::UnboundedReceiver<(String, Instance)>,
    ) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let announcer = Announcer {
            publisher: Publisher {
                wire: Recorder(sender),
                subjects: Subjects::default(),
            },
            instance: Instance::new("web", "web-1", "127.0.0.1", 8081),
            interval: Duration::from_millis(500),
            events,
        };
        (announcer, receiver)
    }

    async fn next(
        sent: &mut mpsc::UnboundedReceiver<(String, Instance)>,
    ) -> (String, Instance, Instant) {
        let (subject, instance) = sent.recv().await.expect("the task is running");
        (subject, instance, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn registers_then_heartbeats_exactly_at_the_interval() {
        let (announcer, mut sent) = announcer(None);
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
        let (announcer, mut sent) = announcer(None);
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
        let (events, receiver) = broadcast::channel(4);
        let (announcer, mut sent) = announcer(Some(receiver));
        let _handle = announcer.start().await.expect("valid record");
        next(&mut sent).await;
        tokio::time::advance(Duration::from_millis(100)).await;
        let reconnected_at = Instant::now();
        events
            .send(async_nats::Event::Disconnected)
            .expect("task listens");
        events
            .send(async_nats::Event::Connected)
            .expect("task listens");
        let (subject, _, at) = next(&mut sent).await;
        assert_eq!(subject, "rollcall.register.web.web-1");
        assert_eq!(at, reconnected_at);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_handle_deregisters() {
        let (announcer, mut sent) = announcer(None);
        let handle = announcer.start().await.expect("valid record");
        next(&mut sent).await;
        drop(handle);
        let (subject, _, _) = next(&mut sent).await;
        assert_eq!(subject, "rollcall.deregister.web.web-1");
    }

    #[tokio::test]
    async fn bad_records_and_updates_are_refused_naming_the_field() {
        let (mut bad, _sent) = announcer(None);
        bad.instance.port = 0;
        let error = bad.start().await.expect_err("port 0 is refused");
        assert!(error.to_string().contains("port"), "{error}");

        let (mut slow, _sent) = announcer(None);
        slow.interval = Duration::from_secs(3);
        let error = slow.start().await.expect_err("interval must be below ttl");
        assert!(
            matches!(error, AnnounceError::IntervalTooLong { .. }),
            "{error}"
        );

        let (good, _sent) = announcer(None);
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
        assert!(error.to_string().contains("address"), "{error}");
    }
}

//! The announcer against a real nats-server, watched by a raw subscriber:
//! what a discovery component would see on the wire.

#[path = "support/cli.rs"]
mod cli;
mod support;

use std::time::Duration;

use cli::Tap;
use rollcall::announcer::{AnnounceError, Announcer};
use rollcall::connect::NatsOptions;
use rollcall::protocol::{Event, EventKind, Instance, Subjects};
use support::{eventually, NatsServer};

const INTERVAL: Duration = Duration::from_millis(100);
const WAIT: Duration = Duration::from_secs(3);

fn web(id: &str) -> Instance {
    Instance::new("web", id, "127.0.0.1", 8081)
}

#[tokio::test]
async fn registers_heartbeats_updates_and_deregisters() {
    let nats = NatsServer::start();
    let mut tap = Tap::new(&nats.url()).await;
    let connection = NatsOptions::new(nats.url()).connect("web-1").await.unwrap();

    let announcement = Announcer::new(&connection, Subjects::default(), web("web-1"))
        .interval(INTERVAL)
        .start()
        .await
        .expect("starts");
    // Flushed before start returns: the register is already on the wire.
    let register = tap.next(WAIT).await;
    assert_eq!(register.subject, "rollcall.register.web.web-1");
    assert_eq!(register.event, Event::Register(web("web-1")));

    // The exact rhythm is checked with paused time in the unit tests; here
    // the bounds allow for the tap's own delays on a busy machine. Three
    // heartbeats take at least three intervals from the register (the
    // register is read at once, it was flushed before start returned), and
    // none is more than a few intervals late.
    let mut previous = register.at;
    for _ in 0..3 {
        let beat = tap.next(WAIT).await;
        assert_eq!(beat.event, Event::Heartbeat(web("web-1")));
        let gap = beat.at - previous;
        assert!(
            gap < INTERVAL * 4,
            "heartbeat {gap:?} after the previous one, at an interval of {INTERVAL:?}"
        );
        previous = beat.at;
    }
    let span = previous - register.at;
    assert!(
        span >= INTERVAL * 5 / 2,
        "three heartbeats within {span:?} of the register, at an interval of {INTERVAL:?}"
    );

    let mut changed = web("web-1");
    changed.weight = 7;
    changed.tags = vec!["canary".into()];
    announcement.update(changed.clone()).await.expect("updates");
    let seen = tap.until(EventKind::Register, "web-1", WAIT).await;
    assert_eq!(seen.event, Event::Register(changed.clone()));
    let beat = tap.next(WAIT).await;
    assert_eq!(beat.event, Event::Heartbeat(changed));

    announcement.deregister().await.expect("deregisters");
    let seen = tap.until(EventKind::Deregister, "web-1", WAIT).await;
    assert_eq!(seen.subject, "rollcall.deregister.web.web-1");
    tap.silent_for(INTERVAL * 3).await;
}

#[tokio::test]
async fn dropping_the_handle_deregisters() {
    let nats = NatsServer::start();
    let mut tap = Tap::new(&nats.url()).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let announcement = Announcer::with_client(client, Subjects::default(), web("web-2"))
        .interval(INTERVAL)
        .start()
        .await
        .expect("starts");
    tap.until(EventKind::Register, "web-2", WAIT).await;
    drop(announcement);
    tap.until(EventKind::Deregister, "web-2", WAIT).await;
    tap.silent_for(INTERVAL * 3).await;
}

#[tokio::test]
async fn re_registers_right_after_nats_restarts() {
    let mut nats = NatsServer::start();
    let connection = NatsOptions::new(nats.url()).connect("web-3").await.unwrap();
    // The tap must not race the announcer to the restarted server, so the
    // register events are kept by a file-backed stream, which the server
    // restores before it lets any client in.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TAP".into(),
        subjects: vec!["rollcall.register.>".into()],
        ..Default::default()
    })
    .await
    .expect("creates the tap stream");

    // Heartbeats far apart, so a register within a second of the restart can
    // only come from the reconnect.
    let mut instance = web("web-3");
    instance.ttl_ms = 60_000;
    let _announcement = Announcer::new(&connection, Subjects::default(), instance)
        .interval(Duration::from_secs(30))
        .start()
        .await
        .expect("starts");
    let mut stream = js.get_stream("TAP").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);

    nats.restart();
    eventually(
        "a re-register after the restart",
        Duration::from_secs(5),
        || {
            let stream = stream.clone();
            async move {
                // A request sent while the client is still reconnecting is lost;
                // ask again rather than wait for the 5 s JetStream timeout.
                let mut stream = stream;
                let info = tokio::time::timeout(Duration::from_millis(500), stream.info()).await;
                matches!(info, Ok(Ok(info)) if info.state.messages >= 2).then_some(())
            }
        },
    )
    .await;
    let message = stream.get_raw_message(2).await.unwrap();
    assert_eq!(message.subject.as_str(), "rollcall.register.web.web-3");
}

#[tokio::test]
async fn bad_records_fail_at_start_naming_the_field() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut instance = web("web-4");
    instance.ttl_ms = 50;
    let error = Announcer::with_client(client.clone(), Subjects::default(), instance)
        .start()
        .await
        .expect_err("ttl 50 ms is refused");
    assert!(
        matches!(error, AnnounceError::InvalidInstance(_)),
        "{error}"
    );
    assert!(printed(&error).contains("ttl_ms"), "{error}");

    let error = Announcer::with_client(client, Subjects::default(), web("a.b"))
        .start()
        .await
        .expect_err("a dot in the id is refused");
    assert!(printed(&error).contains("id"), "{error}");
}

/// An error and its causes, as the binary prints them (`{:#}`).
fn printed(error: &AnnounceError) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(next) = cause {
        text = format!("{text}: {next}");
        cause = next.source();
    }
    text
}

//! The Python example service (standard library + nats-py) follows the wire
//! protocol: its register, heartbeat and deregister parse with
//! `Subjects::parse_event`, and discovery lists it. Skipped, with a note,
//! when `ROLLCALL_PYTHON` is unset (scripts/provision.sh exports it).

#[path = "support/cli.rs"]
mod cli;
mod support;

use std::process::Command;
use std::time::Duration;

use cli::{http_get, Process, Tap};
use rollcall::protocol::{Event, EventKind, Subjects};
use support::{crate_root, eventually, NatsServer};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_service_registers_heartbeats_and_deregisters() {
    let Some(python) = std::env::var_os("ROLLCALL_PYTHON") else {
        eprintln!("skipped: ROLLCALL_PYTHON is unset; `source scripts/provision.sh` sets it");
        return;
    };
    let nats = NatsServer::start();
    let mut tap = Tap::new(&nats.url()).await;
    let connection = rollcall::connect::NatsOptions::new(nats.url())
        .connect("test-discovery")
        .await
        .unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    let discovery = rollcall::discovery::spawn(&connection, Subjects::default(), async {
        let _ = stopped.await;
    })
    .await
    .expect("discovery starts");

    let mut command = Command::new(python);
    command
        .arg(crate_root().join("examples/python_service.py"))
        .args(["--name", "py-1", "--message", "hi", "--interval", "0.2"])
        .args(["--nats", &nats.url()]);
    let mut service = Process::spawn(command);
    let line = service.line(WAIT);
    let authority = line
        .strip_prefix("py-1 listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();

    // Tap::until panics on any message that does not parse as docs/protocol.md says.
    let register = tap.until(EventKind::Register, "py-1", WAIT).await;
    let Event::Register(instance) = register.event else {
        unreachable!("until returns the kind asked for")
    };
    assert_eq!(instance.service, "web");
    assert_eq!(instance.authority(), authority);
    assert_eq!(instance.tags, ["python"]);
    let beat = tap.until(EventKind::Heartbeat, "py-1", WAIT).await;
    let second = tap.until(EventKind::Heartbeat, "py-1", WAIT).await;
    let gap = second.at - beat.at;
    assert!(
        gap < Duration::from_secs(1),
        "heartbeats {gap:?} apart at an interval of 200 ms"
    );

    eventually("discovery to list py-1", WAIT, || async {
        let catalog = discovery.catalog().await;
        (catalog.iter())
            .any(|s| s.service == "web" && s.instances.iter().any(|i| i.id == "py-1"))
            .then_some(())
    })
    .await;
    assert_eq!(
        http_get(&authority, "/"),
        (200, "hi from py-1\n".to_owned())
    );
    assert_eq!(http_get(&authority, "/health").0, 200);

    service.signal("TERM");
    let seen = tap.until(EventKind::Deregister, "py-1", WAIT).await;
    assert_eq!(seen.subject, "rollcall.deregister.web.py-1");
    assert_eq!(service.wait(WAIT), Some(0), "{}", service.stderr_text());
    eventually("discovery to drop py-1", WAIT, || async {
        let catalog = discovery.catalog().await;
        (!catalog
            .iter()
            .any(|s| s.service == "web" && s.instances.iter().any(|i| i.id == "py-1")))
        .then_some(())
    })
    .await;
}

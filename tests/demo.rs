//! `rollcall demo` as a real process: its own nats-server, discovery, a
//! balancer and three instances, answering real HTTP in rotation.

#[path = "support/cli.rs"]
mod cli;
mod support;

use std::time::{Duration, Instant};

use cli::{http_get, rollcall, Process};
use support::{free_port, nats_server_bin};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn the_demo_answers_in_rotation_over_its_three_instances() {
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut command = rollcall(&["demo", "--listen", &listen, "--admin", &admin]);
    command.env("NATS_SERVER_BIN", nats_server_bin());
    let mut demo = Process::spawn(command);
    let nats_line = demo.line_containing("nats-server", WAIT);
    let nats_port: u16 = nats_line
        .split("nats://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no NATS URL in {nats_line:?}"));
    demo.line_containing(&format!("curl http://{listen}/"), WAIT);
    demo.line_containing(&format!("dashboard: http://{admin}/"), WAIT);
    let (status, page) = http_get(&admin, "/");
    assert_eq!(status, 200);
    assert!(page.contains("dashboard.js"), "{page}");
    // The command it suggests runs as printed, from where the demo runs.
    let watch = demo.line_containing("watch: ", WAIT);
    let binary = watch
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no command in {watch:?}"));
    let catalog = std::process::Command::new(binary)
        .args([
            "catalog",
            "--nats",
            &format!("nats://127.0.0.1:{nats_port}"),
        ])
        .output()
        .unwrap_or_else(|e| panic!("{watch:?} names {binary}, which does not run: {e}"));
    assert!(catalog.status.success(), "{catalog:?}");

    // The balancer follows discovery within milliseconds; wait until three
    // sequential requests reach the three instances.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last: Vec<String> = Vec::new();
    let first_round = loop {
        let (status, body) = http_get(&listen, "/");
        if status == 200 {
            last.push(body);
        }
        if last.len() >= 3 {
            let window = last[last.len() - 3..].to_vec();
            let mut sorted = window.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() == 3 {
                break window;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no round over three instances; answers so far: {last:?}"
        );
    };
    let mut messages = first_round.clone();
    messages.sort();
    assert_eq!(
        messages,
        [
            "bonjour from web-2\n",
            "hello from web-1\n",
            "hola from web-3\n"
        ]
    );
    let second_round: Vec<String> = (0..3)
        .map(|_| {
            let (status, body) = http_get(&listen, "/");
            assert_eq!(status, 200, "{body}");
            body
        })
        .collect();
    assert_eq!(second_round, first_round, "strict rotation");

    demo.signal("INT");
    assert_eq!(demo.wait(WAIT), Some(0), "{}", demo.stderr_text());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(),
        "the demo's nats-server still runs after the demo stopped"
    );
}

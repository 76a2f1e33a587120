//! The command line as a newcomer meets it, through the built binary:
//! `--version` everywhere, no secret in `--help`, errors or logs, logs
//! without colour codes when redirected and as JSON on request, quiet
//! one-shot commands, shell completions, discovery's warning when two
//! senders claim one instance id, and the demo script's build.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::time::Duration;

use cli::{rollcall, run, Process};
use nats_extra::ConfiguredServer;
use support::NatsServer;

const WAIT: Duration = Duration::from_secs(5);

const SUBCOMMANDS: [&str; 10] = [
    "discovery",
    "balancer",
    "agent",
    "watch",
    "catalog",
    "drain",
    "undrain",
    "weight",
    "demo",
    "completions",
];

#[test]
fn every_subcommand_answers_version() {
    let version = env!("CARGO_PKG_VERSION");
    let (code, stdout, stderr) = run(rollcall(&["--version"]), WAIT);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("rollcall {version}"));
    for command in SUBCOMMANDS {
        let (code, stdout, stderr) = run(rollcall(&[command, "--version"]), WAIT);
        assert_eq!(code, Some(0), "{command} --version: {stderr}");
        assert_eq!(stdout, format!("rollcall-{command} {version}"));
    }
}

#[test]
fn help_shows_no_secret_from_the_environment() {
    let secrets = [
        ("NATS_URL", "nats://discovery:s3cret-pw@127.0.0.1:4222"),
        ("NATS_TOKEN", "s3cret-token"),
        ("NATS_NKEY", "SUs3cret-seed"),
    ];
    for args in std::iter::once(vec!["--help"])
        .chain(SUBCOMMANDS.iter().map(|command| vec![*command, "--help"]))
    {
        let mut command = rollcall(&args);
        command.envs(secrets);
        let (code, help, stderr) = run(command, WAIT);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!help.contains("s3cret"), "{args:?} shows a secret:\n{help}");
        if args[0] == "catalog" {
            assert!(help.contains("[env: NATS_URL]"), "{help}");
        }
    }
}

#[test]
fn errors_show_no_password() {
    let port = support::free_port();
    for url in [
        format!("nats://alice:s3cret@127.0.0.1:{port}"),
        // An unescaped `@` in the password.
        format!("nats://alice:p@s3cret@127.0.0.1:{port}"),
        "nats://alice:s3cret@127.0.0.1:notaport".to_owned(),
    ] {
        for subcommand in ["catalog", "watch", "discovery"] {
            let (code, _, stderr) = run(rollcall(&[subcommand, "--nats", &url]), WAIT);
            assert!(matches!(code, Some(c) if c != 0), "{url}: exited {code:?}");
            assert!(stderr.contains("alice:***@127.0.0.1"), "{stderr}");
            assert!(!stderr.contains("s3cret"), "{subcommand} {url}: {stderr}");
        }
    }
}

#[test]
fn watch_logs_quietly_without_colour_or_password() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let url = server.secure_url("watch");
    let watch = Process::spawn(rollcall(&["watch", "--nats", &url]));
    watch.wait_stderr("watching", WAIT);
    let log = watch.stderr_text();
    assert!(!log.contains("connected to NATS"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a redirected log: {log:?}"
    );

    // Even at the most verbose level the password stays out.
    let mut command = rollcall(&["catalog", "--nats", &url]);
    command.env("ROLLCALL_LOG", "trace");
    let (_, _, log) = run(command, WAIT);
    assert!(log.contains("watch:***@"), "{log}");
    assert!(!log.contains("watch-dev-password"), "{log}");
}

#[test]
fn catalog_says_nothing_but_its_answer() {
    let nats = NatsServer::start();
    // No discovery ran: the stream is missing, the one message says so.
    // (At the default level: `rollcall()` asks for info from every crate.)
    let mut command = rollcall(&["catalog", "--nats", &nats.url()]);
    command.env_remove("ROLLCALL_LOG");
    let (code, _, stderr) = run(command, WAIT);
    assert!(matches!(code, Some(c) if c != 0), "exited {code:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("does not exist yet"), "{stderr}");
}

#[test]
fn logs_can_be_json_lines() {
    let nats = NatsServer::start();
    let url = nats.url();
    let watch = Process::spawn(rollcall(&["watch", "--nats", &url, "--log-format", "json"]));
    watch.wait_stderr("watching", WAIT);
    let log = watch.stderr_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|line| line["level"] == "INFO" && line["fields"]["message"] == "watching"),
        "{log}"
    );

    // The final error too, as one object.
    let unreachable = format!("nats://127.0.0.1:{}", support::free_port());
    let mut command = rollcall(&["catalog", "--nats", &unreachable]);
    command.env("ROLLCALL_LOG_FORMAT", "json");
    let (code, _, stderr) = run(command, WAIT);
    assert!(matches!(code, Some(c) if c != 0));
    let error: serde_json::Value =
        serde_json::from_str(stderr.trim()).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(error["level"], "ERROR");
    let reason = error["fields"]["error"].as_str().unwrap_or_default();
    assert!(reason.contains("cannot reach NATS"), "{stderr}");
}

#[test]
fn completions_for_common_shells() {
    for (shell, marker) in [
        ("bash", "complete -F _rollcall"),
        ("zsh", "#compdef rollcall"),
        ("fish", "complete -c rollcall"),
    ] {
        let (code, script, stderr) = run(rollcall(&["completions", shell]), WAIT);
        assert_eq!(code, Some(0), "{shell}: {stderr}");
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("no-heartbeats"), "{shell} completes flags");
    }
    let (code, _, stderr) = run(rollcall(&["completions", "cmd"]), WAIT);
    assert!(matches!(code, Some(c) if c != 0));
    assert!(stderr.contains("possible values"), "{stderr}");
}

/// Two agents announcing the same id at different ports: discovery flips
/// the record at every heartbeat and says why, once.
#[test]
fn discovery_warns_once_when_two_senders_claim_one_id() {
    let nats = NatsServer::start();
    let url = nats.url();
    let discovery = Process::spawn(rollcall(&["discovery", "--nats", &url]));
    discovery.wait_stderr("discovery started", WAIT);
    let agent = |port: &str| {
        Process::spawn(rollcall(&[
            "agent",
            "--nats",
            &url,
            "--service",
            "web",
            "--id",
            "web-1",
            "--address",
            "127.0.0.1",
            "--port",
            port,
            "--interval",
            "100ms",
        ]))
    };
    let _first = agent("5001");
    let _second = agent("5002");
    // The record flips with every heartbeat of either sender.
    discovery.wait_stderr_times("updated", 6, WAIT);
    let log = discovery.stderr_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("two senders announce web/web-1"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("give each its own id"),
        "{log}"
    );
}

#[test]
fn the_demo_script_shows_its_build() {
    let script = std::fs::read_to_string(support::crate_root().join("scripts/demo.sh"))
        .expect("scripts/demo.sh");
    let build = script
        .lines()
        .find(|line| line.starts_with("cargo build"))
        .expect("the script builds");
    assert!(!build.contains("--quiet"), "{build}");
    assert!(
        script.contains("first time takes a few minutes"),
        "{script}"
    );
    assert!(
        script.contains("exec target/release/rollcall demo"),
        "{script}"
    );
}

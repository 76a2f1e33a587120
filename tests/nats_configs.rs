//! The nats-server configs shipped in nats/ are valid, start, and grant
//! exactly what docs/security.md says (the permissions themselves are
//! exercised in tests/security.rs).

#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::path::PathBuf;

use nats_extra::{validate_config, ConfiguredServer};
use rollcall::connect::{NatsConnectError, NatsOptions};
use support::crate_root;

/// Every `.conf` under nats/, found on disk so a new one cannot be missed.
fn shipped_configs() -> Vec<PathBuf> {
    let mut configs = Vec::new();
    let mut dirs = vec![crate_root().join("nats")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read nats/") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "conf") {
                configs.push(path);
            }
        }
    }
    configs.sort();
    configs
}

#[test]
fn every_shipped_config_is_valid() {
    let configs = shipped_configs();
    let names: Vec<String> = configs
        .iter()
        .map(|p| {
            p.strip_prefix(crate_root())
                .unwrap_or(p)
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "nats/cluster/node-1.conf",
            "nats/cluster/node-2.conf",
            "nats/cluster/node-3.conf",
            "nats/cluster/partitions.conf",
            "nats/cluster/sharded/node-1.conf",
            "nats/cluster/sharded/node-2.conf",
            "nats/cluster/sharded/node-3.conf",
            "nats/secure.conf",
            "nats/single.conf"
        ]
    );
    for config in &configs {
        if let Err(complaint) = validate_config(config) {
            panic!("{} is not valid: {complaint}", config.display());
        }
    }
}

#[test]
fn a_broken_config_is_caught_by_the_validation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broken.conf");
    std::fs::write(
        &path,
        "authorization { users: [ { user: a, permissions: { publish: \n",
    )
    .expect("write config");
    assert!(validate_config(&path).is_err());
}

#[test]
fn the_shipped_defaults_stay_on_loopback_with_limits() {
    for name in [
        "nats/single.conf",
        "nats/secure.conf",
        "nats/cluster/node-1.conf",
    ] {
        let text = std::fs::read_to_string(crate_root().join(name)).expect("read config");
        for setting in [
            "listen: 127.0.0.1:",
            "http: 127.0.0.1:",
            "max_payload:",
            "write_deadline:",
            "ping_interval:",
            "max_connections:",
            "store_dir:",
        ] {
            assert!(text.contains(setting), "{name} lacks {setting}");
        }
    }
    let cluster = std::fs::read_to_string(crate_root().join("nats/cluster/node-2.conf"))
        .expect("read config");
    for setting in [
        "server_name: rollcall-2",
        "name: rollcall",
        "nats-route://127.0.0.1:6221",
    ] {
        assert!(cluster.contains(setting), "node-2.conf lacks {setting}");
    }
}

#[tokio::test]
async fn single_conf_runs_jetstream() {
    let server = ConfiguredServer::from_file("nats/single.conf");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let info = js.query_account().await.expect("JetStream is on");
    assert_eq!(info.streams, 0);
}

#[tokio::test]
async fn secure_conf_knows_every_role_and_nobody_else() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    for user in ["web", "api", "discovery", "balancer", "operator", "watch"] {
        NatsOptions::new(server.secure_url(user))
            .connect("test")
            .await
            .unwrap_or_else(|e| panic!("{user} with its dev password: {e}"));
    }
    for (url, who) in [
        (server.url(), "anonymous"),
        (
            server.url_as("web", "api-dev-password"),
            "another user's password",
        ),
        (
            server.url_as("nobody", "nobody-dev-password"),
            "an unknown user",
        ),
    ] {
        let refused = NatsOptions::new(url).connect("test").await;
        assert!(
            matches!(refused, Err(NatsConnectError::Unauthorized { .. })),
            "{who}: {refused:?}"
        );
    }
}

//! More real `nats-server`s for the security and cluster tests: a server
//! from a config file or text with its own ports and store put in (so the
//! shipped configs in nats/ are what runs), a three-node cluster from
//! nats/cluster/, and the credentials those servers need: users' JWTs and
//! `.creds` files signed with nkeys, and a TLS CA with server and client
//! certificates.
#![allow(dead_code)] // each test binary uses its own part of the support code

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::support::http::{self, HttpBackend};
use crate::support::{crate_root, free_port, nats_server_bin, ServerProcess};

/// `nats-server -c CONFIG` with the config's ports and store replaced (the
/// client port one the server binds itself); killed on drop.
pub struct ConfiguredServer {
    process: ServerProcess,
    pub port: u16,
    pub monitor_port: u16,
    /// N of a cluster node's `server_name: rollcall-N`; 0 elsewhere.
    pub name_number: usize,
    dir: tempfile::TempDir,
}

impl ConfiguredServer {
    /// Starts the config file `path` (relative to the crate root) with its
    /// `listen`, `http` and `store_dir` lines replaced.
    pub fn from_file(path: &str) -> ConfiguredServer {
        let text = std::fs::read_to_string(crate_root().join(path))
            .unwrap_or_else(|e| panic!("read {path}: {e}"));
        Self::from_text_with(None, free_port(), |port, monitor, store| {
            relocate(
                &text,
                &[
                    ("listen:", format!("listen: 127.0.0.1:{port}")),
                    ("http:", format!("http: 127.0.0.1:{monitor}")),
                    ("store_dir:", format!("store_dir: {store:?}")),
                ],
            )
        })
    }

    /// Starts a config given as text; `{port}`, `{monitor}` and `{store}`
    /// are filled in.
    pub fn from_text(template: &str) -> ConfiguredServer {
        Self::from_text_with(None, free_port(), |port, monitor, store| {
            template
                .replace("{port}", port)
                .replace("{monitor}", &monitor.to_string())
                .replace("{store}", &format!("{store:?}"))
        })
    }

    /// The client port is `port`, or (`None`) one the server binds itself
    /// (`-1`, read from its log: no other test can take it in between).
    fn from_text_with(
        port: Option<u16>,
        monitor_port: u16,
        make: impl FnOnce(&str, u16, &Path) -> String,
    ) -> ConfiguredServer {
        let listen = port.map_or("-1".to_owned(), |p| p.to_string());
        Self::from_tree(port, monitor_port, |dir, store| {
            let config = dir.join("server.conf");
            std::fs::write(&config, make(&listen, monitor_port, store))
                .expect("write server config");
            config
        })
    }

    /// `nats-server -c` the file `write` puts into the server's own
    /// directory (given with the store path inside it), with whatever files
    /// that one includes.
    fn from_tree(
        port: Option<u16>,
        monitor_port: u16,
        write: impl FnOnce(&Path, &Path) -> PathBuf,
    ) -> ConfiguredServer {
        let dir = tempfile::tempdir().expect("temp dir for a nats-server");
        let store = dir.path().join("store");
        let config = write(dir.path(), &store);
        let process = ServerProcess::start(vec!["-c".into(), config.into()], port.unwrap_or(0));
        ConfiguredServer {
            port: process.port(),
            process,
            monitor_port,
            name_number: 0,
            dir,
        }
    }

    /// A directory that lives as long as the server, for key and cert files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `nats://USER:PASSWORD@127.0.0.1:<port>`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// The dev password of a user of nats/secure.conf.
    pub fn secure_url(&self, user: &str) -> String {
        self.url_as(user, &format!("{user}-dev-password"))
    }

    /// SIGKILL, as abrupt as a crash.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts it again with the same config (ports, store), after
    /// [`ConfiguredServer::stop`].
    pub fn restart(&mut self) {
        self.process.restart();
    }

    /// Sends signal `name` (STOP to freeze it, CONT to thaw it).
    pub fn signal(&self, name: &str) {
        self.process.signal(name);
    }

    /// Its `server_name` in a cluster: `rollcall-N`.
    pub fn name(&self) -> String {
        format!("rollcall-{}", self.name_number)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// Replaces every line that starts (after indentation) with one of the
/// keys; each key must be found, so a renamed setting fails loudly here.
pub fn relocate(config: &str, replacements: &[(&str, String)]) -> String {
    let mut found = vec![false; replacements.len()];
    let lines: Vec<String> = config
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            for (i, (key, new)) in replacements.iter().enumerate() {
                if trimmed.starts_with(key) {
                    found[i] = true;
                    return format!("{}{new}", &line[..line.len() - trimmed.len()]);
                }
            }
            line.to_owned()
        })
        .collect();
    for (i, (key, _)) in replacements.iter().enumerate() {
        assert!(found[i], "no line starting with {key:?} in the config");
    }
    lines.join("\n")
}

/// `nats-server -t -c FILE`: Ok, or the server's complaint.
pub fn validate_config(path: &Path) -> Result<(), String> {
    let output = Command::new(nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run nats-server: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The three nodes of nats/cluster/, on free ports, routed to each other.
pub struct Cluster {
    pub nodes: Vec<ConfiguredServer>,
}

impl Cluster {
    /// Starts nats/cluster/node-{1,2,3}.conf with every client, monitor and
    /// route port and the store dirs replaced, and waits until JetStream is
    /// ready on every node (a meta leader was elected).
    pub fn start() -> Cluster {
        Cluster::start_set("nats/cluster")
    }

    /// Starts the config set `set`'s node-{1,2,3}.conf (`nats/cluster`,
    /// `nats/cluster/sharded`) as shipped, each from a copy of nats/cluster/
    /// whose node configs have their ports and store dir replaced (the
    /// server itself reads what a config includes), and waits until
    /// JetStream is ready on every node.
    pub fn start_set(set: &str) -> Cluster {
        let within = set
            .strip_prefix("nats/cluster")
            .map(|rest| rest.trim_start_matches('/'))
            .unwrap_or_else(|| panic!("{set} is not under nats/cluster"));
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let nodes: Vec<ConfiguredServer> = (1..=3)
            .map(|n| {
                let (client, monitor, _) = ports[n - 1];
                let mut node = ConfiguredServer::from_tree(Some(client), monitor, |dir, store| {
                    copy_cluster_configs(dir, store, &ports);
                    dir.join(within).join(format!("node-{n}.conf"))
                });
                node.name_number = n;
                node
            })
            .collect();
        let cluster = Cluster { nodes };
        for node in &cluster.nodes {
            wait_healthy(node.monitor_port, Duration::from_secs(20));
        }
        cluster
    }

    /// Every node's URL.
    pub fn url_list(&self) -> Vec<String> {
        self.nodes.iter().map(ConfiguredServer::url).collect()
    }

    /// Every node's URL, comma-separated, as `--nats` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(ConfiguredServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Copies every file of nats/cluster/ (and its directories) into `dir`,
/// the node configs with their ports replaced by `ports` and their store
/// dir by `store`.
fn copy_cluster_configs(dir: &Path, store: &Path, ports: &[(u16, u16, u16)]) {
    let root = crate_root().join("nats/cluster");
    let mut pending = vec![root.clone()];
    while let Some(from) = pending.pop() {
        let to = dir.join(from.strip_prefix(&root).expect("under nats/cluster"));
        std::fs::create_dir_all(&to).expect("create a config directory");
        for entry in std::fs::read_dir(&from).expect("read a config directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let is_node = from == root && text.contains("store_dir:");
            let text = if is_node {
                with_test_ports(&text, store, ports)
            } else {
                text
            };
            let name = path.file_name().expect("a file name");
            std::fs::write(to.join(name), text).expect("write a config copy");
        }
    }
}

/// A node config with its store dir and every shipped port replaced.
fn with_test_ports(text: &str, store: &Path, ports: &[(u16, u16, u16)]) -> String {
    let mut text = relocate(text, &[("store_dir:", format!("store_dir: {store:?}"))]);
    // Every shipped port becomes a placeholder first, so that a new port
    // (42231, say) is never mistaken for a shipped one (4223) still to
    // replace.
    let mut swaps = Vec::new();
    for (i, (client, monitor, route)) in ports.iter().enumerate() {
        let node = i + 1;
        swaps.push((format!("422{node}"), *client));
        swaps.push((format!("822{node}"), *monitor));
        swaps.push((format!("622{node}"), *route));
    }
    for (k, (shipped, _)) in swaps.iter().enumerate() {
        text = text.replace(
            &format!("127.0.0.1:{shipped}"),
            &format!("127.0.0.1:@port{k}@"),
        );
    }
    for (k, (_, port)) in swaps.iter().enumerate() {
        text = text.replace(&format!("@port{k}@"), &port.to_string());
    }
    text
}

/// Polls the monitor's `/healthz` (200 once JetStream is up and, in a
/// cluster, has a meta leader).
pub fn wait_healthy(monitor_port: u16, limit: Duration) {
    let start = Instant::now();
    loop {
        if http_status(monitor_port, "/healthz") == Some(200) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "nats-server monitor on port {monitor_port} not healthy within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    monitor_get(port, path).map(|(status, _)| status)
}

/// A GET on a node's monitor port: status and body.
fn monitor_get(port: u16, path: &str) -> Option<(u16, String)> {
    http::get_blocking(
        &format!("http://127.0.0.1:{port}{path}"),
        Duration::from_secs(2),
    )
    .ok()
    .map(|(status, body)| (status.as_u16(), body))
}

/// The server name of the JetStream meta leader, as a node's `/jsz` sees it.
pub fn meta_leader(monitor_port: u16) -> Option<String> {
    let (_, body) = monitor_get(monitor_port, "/jsz")?;
    let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
    jsz["meta_cluster"]["leader"].as_str().map(str::to_owned)
}

/// Operator, account and user keys and JWTs for decentralised auth, as
/// `nsc` would make them: the operator signs the account, the account
/// signs the user.
pub struct JwtChain {
    pub operator_jwt: String,
    /// The system account JetStream needs in operator mode.
    pub system_public: String,
    pub system_jwt: String,
    pub account_public: String,
    pub account_jwt: String,
    pub user_jwt: String,
    pub user_seed: String,
}

impl JwtChain {
    pub fn new(user_name: &str) -> JwtChain {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let user = nkeys::KeyPair::new_user();
        let system = nkeys::KeyPair::new_account();
        let system_jwt = sign_jwt(
            &operator,
            &system.public_key(),
            "SYS",
            serde_json::json!({"type": "account", "version": 2}),
        );
        let operator_jwt = sign_jwt(
            &operator,
            &operator.public_key(),
            "rollcall-test-operator",
            serde_json::json!({
                "type": "operator", "version": 2,
                "system_account": system.public_key()
            }),
        );
        let account_jwt = sign_jwt(
            &operator,
            &account.public_key(),
            "rollcall-test-account",
            serde_json::json!({
                "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1,
                           "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
                           "mem_storage": -1, "disk_storage": -1, "streams": -1,
                           "consumer": -1},
                "default_permissions": {"pub": {}, "sub": {}},
                "type": "account", "version": 2
            }),
        );
        let user_jwt = sign_jwt(
            &account,
            &user.public_key(),
            user_name,
            serde_json::json!({
                "pub": {"allow": ["rollcall.>", "$JS.API.>"]},
                "sub": {"allow": ["rollcall.>", "_INBOX.>"]},
                "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2
            }),
        );
        JwtChain {
            operator_jwt,
            system_public: system.public_key(),
            system_jwt,
            account_public: account.public_key(),
            account_jwt,
            user_jwt,
            user_seed: user.seed().expect("a generated user key has a seed"),
        }
    }

    /// The user's `.creds` file, in the format `nsc` writes.
    pub fn creds(&self) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            self.user_jwt, self.user_seed
        )
    }
}

/// A NATS JWT: base64url header and claims, signed by `issuer`'s nkey.
fn sign_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let issued_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{subject}{issued_at}"),
        "iat": issued_at,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = b64.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let signature = issuer
        .sign(signing_input.as_bytes())
        .expect("sign with a generated key");
    format!("{signing_input}.{}", b64.encode(signature))
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, written as PEM files into `dir`.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    pub fn generate(dir: &Path) -> TlsFiles {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, SanType,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "rollcall test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-sign the CA");

        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        server_params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .expect("sign the server certificate");

        let mut client_params =
            CertificateParams::new(Vec::<String>::new()).expect("client params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, "balancer");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().expect("client key");
        let client_cert = client_params
            .signed_by(&client_key, &ca)
            .expect("sign the client certificate");

        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        TlsFiles {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server-key.pem", server_key.serialize_pem()),
            client_cert: write("client.pem", client_cert.pem()),
            client_key: write("client-key.pem", client_key.serialize_pem()),
        }
    }
}

/// An HTTP backend on 127.0.0.1 answering every request with `body`;
/// runs until the returned task is aborted. An [`HttpBackend`] underneath;
/// new tests use that directly.
pub async fn http_backend(body: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
    let backend = HttpBackend::start(body).await;
    let port = backend.port();
    // Aborting the task drops the backend, which stops it.
    let task = tokio::spawn(async move {
        let _backend = backend;
        std::future::pending::<()>().await
    });
    (port, task)
}

/// `GET path` on 127.0.0.1:port over a fresh connection: status and body.
pub async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    http::get(&http::client(), &format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()
        .map(|(status, body)| (status.as_u16(), body))
}

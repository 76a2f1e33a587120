//! Credentials and permissions against real nats-servers: every credential
//! kind connects (and a wrong one is refused with a clear error), and under
//! nats/secure.conf each role can do its job and nothing else, with every
//! refusal reported as a [`PermissionDenied`] naming subject and user.

#[path = "support/nats_extra.rs"]
mod nats_extra;
mod support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ::http::StatusCode;
use futures::StreamExt;
use nats_extra::{ConfiguredServer, JwtChain, TlsFiles};
use rollcall::connect::{AccessError, Connection, NatsConnectError, NatsOptions};
use rollcall::permissions::{self, Access, Operation, PermissionDenied};
use rollcall::protocol::Subjects;
use rollcall::subscription::Update;
use support::http::{self, HttpBackend};
use support::RunningDiscovery;

const LIMIT: Duration = Duration::from_secs(5);

async fn connect(options: NatsOptions) -> Connection {
    let url = options.redacted_url();
    options
        .connect("rollcall-test")
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The error a connection with `options` is refused with.
async fn refused(options: NatsOptions, why: &str) -> NatsConnectError {
    match options.connect("rollcall-test").await {
        Ok(_) => panic!("connected although {why}"),
        Err(error) => error,
    }
}

async fn connect_as(server: &ConfiguredServer, user: &str) -> Connection {
    connect(NatsOptions::new(server.secure_url(user))).await
}

/// Discovery under its own user (its access checked first), and web-1
/// registered by the `web` user and in its catalog.
struct SecureDiscovery {
    connection: Connection,
    discovery: rollcall::discovery::Discovery,
    stop: tokio::sync::oneshot::Sender<()>,
    web: Connection,
}

impl SecureDiscovery {
    async fn with_web_1(server: &ConfiguredServer, subjects: &Subjects) -> SecureDiscovery {
        let connection = connect_as(server, "discovery").await;
        connection
            .check_access(&permissions::discovery_needs(subjects))
            .await
            .expect("discovery may hear events and overrides");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let discovery = rollcall::discovery::spawn(&connection, subjects.clone(), async {
            let _ = stopped.await;
        })
        .await
        .expect("discovery starts under its own user");
        let web = connect_as(server, "web").await;
        publish(
            &web,
            "rollcall.register.web.web-1",
            register_json("web", "web-1", 5001),
        )
        .await;
        lists("web joins the catalog", &discovery, "web").await;
        SecureDiscovery {
            connection,
            discovery,
            stop,
            web,
        }
    }
}

/// Publishes and receives one message: the connection really works.
async fn round_trip(connection: &Connection, subject: &str) {
    let client = &connection.client;
    let mut subscription = client
        .subscribe(subject.to_owned())
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    client
        .publish(subject.to_owned(), "ping".into())
        .await
        .expect("publish");
    let message = tokio::time::timeout(LIMIT, subscription.next())
        .await
        .expect("the message came back in time")
        .expect("subscription open");
    assert_eq!(&message.payload[..], b"ping");
}

async fn next_denial(
    connection: &mut tokio::sync::broadcast::Receiver<PermissionDenied>,
) -> PermissionDenied {
    tokio::time::timeout(LIMIT, connection.recv())
        .await
        .expect("the server refused within the limit")
        .expect("denials channel open")
}

/// A refused JetStream request only times out; no need to wait long here.
fn quick_jetstream(connection: &Connection) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(300))
        .build(connection.client.clone())
}

fn register_json(service: &str, id: &str, port: u16) -> String {
    support::register_json(service, id, port, serde_json::json!({}))
}

async fn publish(connection: &Connection, subject: &str, payload: String) {
    connection
        .client
        .publish(subject.to_owned(), payload.into())
        .await
        .expect("publish");
    connection.client.flush().await.expect("flush");
}

/// Waits until `condition` holds, or panics naming `what`.
/// Waits until `discovery`'s catalog lists `service`.
async fn lists(what: &str, discovery: &rollcall::discovery::Discovery, service: &str) {
    support::eventually(what, LIMIT, || async {
        let catalog = discovery.catalog().await;
        catalog.iter().any(|s| s.service == service).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------- credentials

#[tokio::test]
async fn user_and_password_in_the_url_connect_and_a_wrong_one_is_refused() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let connection = connect_as(&server, "web").await;
    assert_eq!(connection.identity(), "user web");

    let refused = NatsOptions::new(server.url_as("web", "not-the-password"))
        .connect("rollcall-test")
        .await
        .expect_err("a wrong password is refused");
    assert!(
        matches!(refused, NatsConnectError::Unauthorized { .. }),
        "{refused:?}"
    );
    let message = refused.to_string();
    assert!(
        message.contains("refused the credentials of user web"),
        "{message}"
    );
    assert!(
        !message.contains("not-the-password"),
        "the password leaked: {message}"
    );
}

#[tokio::test]
async fn a_token_connects_from_the_flag_or_the_url() {
    let server = ConfiguredServer::from_text(
        "listen: 127.0.0.1:{port}\nauthorization { token: \"s3cret-token\" }\n",
    );
    let by_flag = connect(NatsOptions {
        token: Some("s3cret-token".into()),
        ..NatsOptions::new(server.url())
    })
    .await;
    round_trip(&by_flag, "token.flag").await;
    let by_url = connect(NatsOptions::new(format!(
        "nats://s3cret-token@127.0.0.1:{}",
        server.port
    )))
    .await;
    round_trip(&by_url, "token.url").await;

    let refused = refused(
        NatsOptions {
            token: Some("wrong".into()),
            ..NatsOptions::new(server.url())
        },
        "the token is wrong",
    )
    .await;
    assert!(
        matches!(refused, NatsConnectError::Unauthorized { .. }),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_nkey_seed_connects() {
    let user = nkeys::KeyPair::new_user();
    let server = ConfiguredServer::from_text(&format!(
        "listen: 127.0.0.1:{{port}}\nauthorization {{ users: [ {{ nkey: {} }} ] }}\n",
        user.public_key()
    ));
    let seed = user.seed().expect("a generated key has a seed");
    let connection = connect(NatsOptions {
        nkey_seed: Some(seed),
        ..NatsOptions::new(server.url())
    })
    .await;
    assert_eq!(connection.identity(), format!("nkey {}", user.public_key()));
    round_trip(&connection, "nkey.works").await;

    let stranger = nkeys::KeyPair::new_user();
    let refused = refused(
        NatsOptions {
            nkey_seed: Some(stranger.seed().expect("seed")),
            ..NatsOptions::new(server.url())
        },
        "the nkey is unknown",
    )
    .await;
    assert!(
        refused.to_string().contains(&stranger.public_key()),
        "the error names the key: {refused}"
    );
}

#[tokio::test]
async fn a_creds_file_connects_with_operator_signed_jwts() {
    let chain = JwtChain::new("balancer");
    let dir = tempfile::tempdir().expect("temp dir");
    let operator = dir.path().join("operator.jwt");
    std::fs::write(&operator, &chain.operator_jwt).expect("write operator JWT");
    let server = ConfiguredServer::from_text(&format!(
        "listen: 127.0.0.1:{{port}}\njetstream {{ store_dir: {{store}} }}\n\
         operator: {operator:?}\nsystem_account: {}\nresolver: MEMORY\n\
         resolver_preload: {{ {}: \"{}\", {}: \"{}\" }}\n",
        chain.system_public,
        chain.account_public,
        chain.account_jwt,
        chain.system_public,
        chain.system_jwt
    ));
    let creds = dir.path().join("balancer.creds");
    std::fs::write(&creds, chain.creds()).expect("write creds file");
    let connection = connect(NatsOptions {
        creds_file: Some(creds.clone()),
        ..NatsOptions::new(server.url())
    })
    .await;
    round_trip(&connection, "rollcall.creds").await;

    // The user JWT allows rollcall.> only: the JWT's permissions apply.
    let mut denials = connection.denials();
    publish(&connection, "elsewhere", String::new()).await;
    let denied = next_denial(&mut denials).await;
    assert_eq!(denied.subject, "elsewhere");
    assert_eq!(
        denied.user,
        format!("the user of creds file {}", creds.display())
    );

    // The same file through the CLI's environment variable.
    catalog_with_env(&[
        ("NATS_URL", server.url()),
        ("NATS_CREDS", creds.display().to_string()),
    ])
    .expect("NATS_CREDS connects");

    let missing = refused(
        NatsOptions {
            creds_file: Some(dir.path().join("missing.creds")),
            ..NatsOptions::new(server.url())
        },
        "the creds file is missing",
    )
    .await;
    assert!(
        matches!(missing, NatsConnectError::CredsFile { .. }),
        "{missing:?}"
    );
}

#[tokio::test]
async fn tls_with_a_client_certificate_connects() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = TlsFiles::generate(dir.path());
    let server = ConfiguredServer::from_text(&format!(
        "listen: 127.0.0.1:{{port}}\ntls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 2 }}\n",
        tls.server_cert, tls.server_key, tls.ca
    ));
    let options = NatsOptions {
        tls_ca: Some(tls.ca.clone()),
        tls_cert: Some(tls.client_cert.clone()),
        tls_key: Some(tls.client_key.clone()),
        ..NatsOptions::new(server.url())
    };
    let connection = connect(options.clone()).await;
    round_trip(&connection, "tls.works").await;

    refused(
        NatsOptions {
            tls_cert: None,
            tls_key: None,
            ..options.clone()
        },
        "verify: true needs a client certificate",
    )
    .await;
    let half = refused(
        NatsOptions {
            tls_key: None,
            ..options
        },
        "a certificate without its key is no client certificate",
    )
    .await;
    assert!(
        matches!(
            half,
            NatsConnectError::HalfClientCert {
                given: "--tls-cert"
            }
        ),
        "{half:?}"
    );
}

#[test]
fn the_cli_says_why_when_the_password_is_wrong_and_exits_non_zero() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let start = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_rollcall"))
        .args(["discovery", "--nats"])
        .arg(server.url_as("discovery", "wrong-password"))
        .env("ROLLCALL_LOG", "off")
        .output()
        .expect("run rollcall");
    assert!(!output.status.success(), "exit status {:?}", output.status);
    assert!(
        start.elapsed() < LIMIT,
        "no retry loop: took {:?}",
        start.elapsed()
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refused the credentials of user discovery"),
        "stderr: {stderr}"
    );
    assert!(
        !stderr.contains("wrong-password"),
        "the password leaked: {stderr}"
    );
}

/// Runs a rollcall subcommand as `user` under secure.conf; it must exit
/// non-zero at once with a message naming the refused subject and the user.
fn refused_at_start(args: &[&str], user: &str, expected: &str) {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_rollcall"))
        .args(args)
        .arg("--nats")
        .arg(server.secure_url(user))
        .env("ROLLCALL_LOG", "error")
        .env("NO_COLOR", "1")
        .output()
        .expect("run rollcall");
    assert!(!output.status.success(), "exit status {:?}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(expected), "stderr: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the refusal took {:?} to surface",
        started.elapsed()
    );
}

#[test]
fn a_discovery_started_under_the_wrong_user_exits_naming_the_refusal() {
    refused_at_start(
        &["discovery"],
        "balancer",
        "permission denied subscribing to rollcall.*.*.* as user balancer",
    );
}

#[test]
fn a_balancer_started_under_a_service_user_exits_naming_the_refusal() {
    refused_at_start(
        &["balancer", "--listen", "127.0.0.1:0", "web"],
        "web",
        "permission denied subscribing to rollcall.catalog.> as user web",
    );
}

/// Runs `rollcall catalog` with only environment variables for NATS; Ok
/// when it got as far as JetStream (connected, authenticated), else stderr.
fn catalog_with_env(env: &[(&str, String)]) -> Result<(), String> {
    let output = Command::new(env!("CARGO_BIN_EXE_rollcall"))
        .arg("catalog")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("ROLLCALL_LOG", "off")
        .output()
        .expect("run rollcall catalog");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    // No discovery ran, so the stream is missing: that error proves the
    // connection itself worked.
    if stderr.contains("ROLLCALL_CATALOG does not exist yet") {
        Ok(())
    } else {
        Err(stderr)
    }
}

#[test]
fn the_cli_takes_every_credential_kind_from_the_environment() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = TlsFiles::generate(dir.path());
    let user = nkeys::KeyPair::new_user();
    let server = ConfiguredServer::from_text(&format!(
        "listen: 127.0.0.1:{{port}}\njetstream {{ store_dir: {{store}} }}\n\
         tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n\
         authorization {{ users: [ {{ nkey: {} }} ] }}\n",
        tls.server_cert,
        tls.server_key,
        tls.ca,
        user.public_key()
    ));
    let tls_env = |cert: &std::path::Path| {
        vec![
            ("NATS_URL", server.url()),
            ("NATS_CA", tls.ca.display().to_string()),
            ("NATS_CERT", cert.display().to_string()),
            ("NATS_KEY", tls.client_key.display().to_string()),
        ]
    };
    let mut env = tls_env(&tls.client_cert);
    env.push(("NATS_NKEY", user.seed().expect("seed")));
    catalog_with_env(&env).expect("NATS_URL, NATS_CA/CERT/KEY and NATS_NKEY connect");

    let mut stranger = tls_env(&tls.client_cert);
    stranger.push((
        "NATS_NKEY",
        nkeys::KeyPair::new_user().seed().expect("seed"),
    ));
    let refused = catalog_with_env(&stranger).expect_err("an unknown nkey is refused");
    assert!(
        refused.contains("refused the credentials of nkey U"),
        "{refused}"
    );

    let token_server = ConfiguredServer::from_text(
        "listen: 127.0.0.1:{port}\njetstream { store_dir: {store} }\nauthorization { token: \"t0ken\" }\n",
    );
    catalog_with_env(&[
        ("NATS_URL", token_server.url()),
        ("NATS_TOKEN", "t0ken".into()),
    ])
    .expect("NATS_TOKEN connects");
}

// ---------------------------------------------------------------- permissions

#[tokio::test]
async fn a_service_cannot_speak_for_another_nor_read_the_catalog() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let discovery = RunningDiscovery::start(&server.secure_url("discovery")).await;
    let api = connect_as(&server, "api").await;
    let web = connect_as(&server, "web").await;
    let stats = discovery.get().stats();
    publish(
        &api,
        "rollcall.register.api.api-1",
        register_json("api", "api-1", 6001),
    )
    .await;
    lists("api joins the catalog", discovery.get(), "api").await;
    let api_before = discovery.get().catalog().await;

    let mut denials = web.denials();
    publish(
        &web,
        "rollcall.heartbeat.api.api-1",
        register_json("api", "api-1", 6666),
    )
    .await;
    let denied = next_denial(&mut denials).await;
    assert_eq!(
        (
            denied.operation,
            denied.subject.as_str(),
            denied.user.as_str()
        ),
        (
            Operation::Publish,
            "rollcall.heartbeat.api.api-1",
            "user web"
        )
    );
    assert!(denied
        .to_string()
        .starts_with("permission denied publishing to rollcall.heartbeat.api.api-1 as user web"));
    assert_eq!(web.denied_count(), 1);

    // The server handles one connection's messages in order: once web's own
    // register is in, the refused heartbeat would have been too.
    publish(
        &web,
        "rollcall.register.web.web-1",
        register_json("web", "web-1", 5001),
    )
    .await;
    lists("web joins the catalog", discovery.get(), "web").await;
    let api_after: Vec<_> = discovery
        .get()
        .catalog()
        .await
        .into_iter()
        .filter(|s| s.service == "api")
        .collect();
    assert_eq!(api_after, api_before, "api's catalog is unchanged");
    assert_eq!(stats.events.load(Ordering::Relaxed), 2);

    // Reading: neither the live snapshots, nor other users' replies, nor the
    // stream.
    for subject in ["rollcall.catalog.>", "rollcall.catalog.api.*", "_INBOX.>"] {
        let refused = web
            .check_access(&[Access::Subscribe(subject.into())])
            .await
            .expect_err("web may not read");
        let AccessError::Denied(denied) = refused else {
            panic!("{subject}: {refused}")
        };
        assert_eq!(denied.subject, subject);
        assert_eq!(denied.operation, Operation::Subscribe);
        assert!(denied.to_string().starts_with(&format!(
            "permission denied subscribing to {subject} as user web"
        )));
    }
    let mut denials = web.denials();
    assert!(quick_jetstream(&web)
        .get_stream("ROLLCALL_CATALOG")
        .await
        .is_err());
    // The request's reply inbox is refused first, then the request itself.
    let inbox = next_denial(&mut denials).await;
    assert!(inbox.subject.starts_with("_INBOX."), "{inbox}");
    let denied = next_denial(&mut denials).await;
    assert_eq!(denied.subject, "$JS.API.STREAM.INFO.ROLLCALL_CATALOG");
    discovery.stop().await;
}

#[tokio::test]
async fn a_wildcard_token_in_an_allowed_subject_is_still_rejected_by_discovery() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let discovery = RunningDiscovery::start(&server.secure_url("discovery")).await;
    let web = connect_as(&server, "web").await;
    let stats = discovery.get().stats();
    publish(
        &web,
        "rollcall.heartbeat.web.*",
        register_json("web", "*", 5001),
    )
    .await;
    publish(
        &web,
        "rollcall.register.web.>",
        register_json("web", ">", 5002),
    )
    .await;
    // Then a valid one, which arrives after both.
    publish(
        &web,
        "rollcall.register.web.web-1",
        register_json("web", "web-1", 5003),
    )
    .await;
    lists("the valid register is folded", discovery.get(), "web").await;
    // nats-server passes a literal wildcard token through when the allow
    // pattern matches it (`rollcall.heartbeat.web.*` matches itself): the
    // subject permission alone does not stop it, discovery's validation does.
    assert_eq!(web.denied_count(), 0);
    assert_eq!(
        stats.events.load(Ordering::Relaxed),
        3,
        "every event reached discovery"
    );
    assert_eq!(
        stats.invalid.load(Ordering::Relaxed),
        2,
        "both wildcards counted invalid"
    );
    let web_snapshot = discovery
        .get()
        .catalog()
        .await
        .into_iter()
        .find(|s| s.service == "web")
        .expect("web is in the catalog");
    let ids: Vec<&str> = web_snapshot
        .instances
        .iter()
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(ids, ["web-1"]);
    discovery.stop().await;
}

#[tokio::test]
async fn a_balancer_cannot_publish_a_snapshot_nor_change_the_stream() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let discovery = RunningDiscovery::start(&server.secure_url("discovery")).await;
    let balancer = connect_as(&server, "balancer").await;
    let watch = connect_as(&server, "watch").await;
    let mut seen = support::CatalogFeed::subscribe(&watch.client, "rollcall.catalog.>").await;

    let mut denials = balancer.denials();
    publish(
        &balancer,
        "rollcall.catalog.web.web-9",
        r#"{"service":"web","id":"web-9","revision":99,"left":"expired"}"#.to_owned(),
    )
    .await;
    let denied = next_denial(&mut denials).await;
    assert!(
        denied.to_string().starts_with(
            "permission denied publishing to rollcall.catalog.web.web-9 as user balancer"
        ),
        "{denied}"
    );

    // The start-up check says the same, for a publish as for a subscription.
    let refused = balancer
        .check_access(&[
            Access::Subscribe("rollcall.catalog.>".into()),
            Access::Publish("rollcall.catalog.web.web-9".into()),
        ])
        .await
        .expect_err("the balancer may not publish snapshots");
    assert!(
        matches!(&refused, AccessError::Denied(d) if d.operation == Operation::Publish),
        "{refused}"
    );
    let denied = next_denial(&mut denials).await;
    assert_eq!(denied.subject, "rollcall.catalog.web.web-9");

    let js = quick_jetstream(&balancer);
    assert!(js.delete_stream("ROLLCALL_CATALOG").await.is_err());
    let denied = next_denial(&mut denials).await;
    assert_eq!(denied.subject, "$JS.API.STREAM.DELETE.ROLLCALL_CATALOG");
    assert_eq!(balancer.denied_count(), 3);

    // The refused snapshot reached nobody: the next catalog message watch
    // sees is discovery's own.
    let web = connect_as(&server, "web").await;
    publish(
        &web,
        "rollcall.register.web.web-1",
        register_json("web", "web-1", 5001),
    )
    .await;
    let snapshot = support::next_snapshot(&mut seen, LIMIT).await;
    assert_eq!(snapshot.service, "web");
    assert_ne!(
        snapshot.revision, 99,
        "discovery's own, not the refused one"
    );
    assert_eq!(snapshot.instances.len(), 1);

    // Still connected and counting; a refusal is never fatal at run time.
    assert_eq!(
        balancer.client.connection_state(),
        async_nats::connection::State::Connected
    );
    discovery.stop().await;
}

#[tokio::test]
async fn discovery_and_balancer_work_end_to_end_under_secure_conf() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let subjects = Subjects::default();
    let SecureDiscovery {
        connection: discovery_connection,
        discovery,
        stop,
        web,
    } = SecureDiscovery::with_web_1(&server, &subjects).await;

    // A balancer starting now reads the stream, then follows live.
    let balancer = connect_as(&server, "balancer").await;
    balancer
        .check_access(&permissions::balancer_needs(&subjects))
        .await
        .expect("the balancer may follow the catalog");
    let mut updates = Box::pin(rollcall::subscription::follow(&balancer, subjects.clone()));
    let first = tokio::time::timeout(LIMIT, updates.next())
        .await
        .expect("a reset in time")
        .expect("updates open");
    let Update::Reset(snapshots) = first else {
        panic!("the first update is a reset: {first:?}")
    };
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0].instances[0].id, "web-1");

    publish(
        &web,
        "rollcall.register.web.web-2",
        register_json("web", "web-2", 5002),
    )
    .await;
    let next = tokio::time::timeout(LIMIT, updates.next())
        .await
        .expect("a live snapshot in time")
        .expect("updates open");
    let Update::Service(snapshot) = next else {
        panic!("a live snapshot: {next:?}")
    };
    assert_eq!(snapshot.instances.len(), 2);

    // Nobody was refused anything on the way: the permissions are enough.
    assert_eq!(discovery_connection.denied_count(), 0);
    assert_eq!(balancer.denied_count(), 0);
    assert_eq!(web.denied_count(), 0);

    // And a service user in the balancer's place is stopped at start-up.
    let refused = web
        .check_access(&permissions::balancer_needs(&subjects))
        .await
        .expect_err("web may not follow the catalog");
    assert_eq!(
        refused.to_string().split(';').next(),
        Some("permission denied subscribing to rollcall.catalog.> as user web")
    );
    let _ = stop.send(());
    discovery.wait().await.expect("discovery stops cleanly");
}

#[tokio::test]
async fn the_stack_serves_http_with_every_component_under_its_own_user() {
    use rollcall::announcer::Announcer;
    use rollcall::balancer::{self, routes::Routes, BalancerConfig};
    use rollcall::protocol::Instance;

    let server = ConfiguredServer::from_file("nats/secure.conf");
    let subjects = Subjects::default();
    let discovery = RunningDiscovery::start(&server.secure_url("discovery")).await;

    // Two web instances, announced by the library as the `web` user.
    let web = connect_as(&server, "web").await;
    let backends = [
        HttpBackend::start("one").await,
        HttpBackend::start("two").await,
    ];
    let mut announcements = Vec::new();
    for (id, backend) in ["web-1", "web-2"].into_iter().zip(&backends) {
        let instance = Instance::new("web", id, "127.0.0.1", backend.port());
        announcements.push(
            Announcer::new(&web, subjects.clone(), instance)
                .start()
                .await
                .expect("web may announce web instances"),
        );
    }

    // The balancer, as the `balancer` user.
    let connection = connect_as(&server, "balancer").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the balancer");
    let proxy = listener.local_addr().expect("balancer address").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let balancer = tokio::spawn(balancer::serve(
        listener,
        None,
        BalancerConfig::new(Routes::parse(&["web"]).expect("route")),
        rollcall::subscription::follow(&connection, subjects.clone()),
        async {
            let _ = stopped.await;
        },
    ));
    let client = http::client();
    let url = format!("http://127.0.0.1:{proxy}/");
    // The bodies of two requests, sorted; failed ones left out.
    let two_bodies = || async {
        let mut bodies = Vec::new();
        for _ in 0..2 {
            if let Ok((StatusCode::OK, body)) = http::get(&client, &url).await {
                bodies.push(body);
            }
        }
        bodies.sort();
        bodies
    };
    support::eventually("the balancer routes to both", LIMIT, || async {
        (two_bodies().await == ["one", "two"]).then_some(())
    })
    .await;

    // Leaving works too: web-1 deregisters and takes no more requests.
    let first = announcements.remove(0);
    first
        .deregister()
        .await
        .expect("web may deregister its instance");
    support::eventually("web-1 leaves the rotation", LIMIT, || async {
        (two_bodies().await == ["two", "two"]).then_some(())
    })
    .await;

    for (who, connection) in [("web", &web), ("balancer", &connection)] {
        assert_eq!(connection.denied_count(), 0, "{who} was refused something");
    }

    // People look with the read-only `watch` user.
    let catalog = tokio::process::Command::new(env!("CARGO_BIN_EXE_rollcall"))
        .args(["catalog", "--json", "--nats"])
        .arg(server.secure_url("watch"))
        .env("ROLLCALL_LOG", "warn")
        .output()
        .await
        .expect("run rollcall catalog");
    let stdout = String::from_utf8_lossy(&catalog.stdout);
    assert!(
        catalog.status.success(),
        "rollcall catalog as watch: {}",
        String::from_utf8_lossy(&catalog.stderr)
    );
    assert!(stdout.contains("web-2"), "{stdout}");
    assert!(!String::from_utf8_lossy(&catalog.stderr).contains("permission denied"));
    let _ = stop.send(());
    balancer
        .await
        .expect("the balancer task ran")
        .expect("the balancer stopped cleanly");
    for announcement in announcements {
        announcement.deregister().await.expect("deregister");
    }
    discovery.stop().await;
}

#[tokio::test]
async fn only_the_operator_role_may_override_and_discovery_answers_it() {
    let server = ConfiguredServer::from_file("nats/secure.conf");
    let subjects = Subjects::default();
    let SecureDiscovery {
        connection: discovery_connection,
        discovery,
        stop,
        web: _web,
    } = SecureDiscovery::with_web_1(&server, &subjects).await;

    // No role but the operator's may publish an override: not the service
    // itself, not the balancer, not a watcher.
    let subject = "rollcall.operator.drain.web.web-1";
    for user in ["web", "balancer", "watch"] {
        let connection = connect_as(&server, user).await;
        let mut denials = connection.denials();
        publish(&connection, subject, r#"{"by":"mallory"}"#.into()).await;
        let denied = next_denial(&mut denials).await;
        assert_eq!(
            (denied.operation, denied.subject.as_str()),
            (Operation::Publish, subject),
            "{user}"
        );
    }

    // The operator's request is folded and answered (discovery may answer
    // the requests it receives, and only those).
    let operator = connect_as(&server, "operator").await;
    let answer = tokio::time::timeout(
        LIMIT,
        operator.client.request(subject, r#"{"by":"alice"}"#.into()),
    )
    .await
    .expect("answered in time")
    .expect("discovery answers");
    let reply: rollcall::protocol::OverrideReply =
        serde_json::from_slice(&answer.payload).expect("an override reply");
    assert!(reply.ok, "{reply:?}");
    let drained = reply.instance.expect("the instance");
    assert_eq!(
        (drained.weight, drained.operator.map(|o| o.by)),
        (0, Some("alice".to_owned()))
    );
    let stored = rollcall::catalog_stream::read_last(
        &async_nats::jetstream::new(operator.client.clone()),
        &subjects,
    )
    .await
    .expect("the operator reads the catalog");
    assert_eq!(stored.snapshots[0].snapshot.instances[0].weight, 0);
    let stats = discovery.stats();
    assert_eq!(stats.overrides.load(Ordering::Relaxed), 1, "only alice's");
    assert_eq!(stats.invalid_overrides.load(Ordering::Relaxed), 0);
    assert_eq!(operator.denied_count(), 0);
    assert_eq!(discovery_connection.denied_count(), 0);
    let _ = stop.send(());
    discovery.wait().await.expect("discovery stops cleanly");
}

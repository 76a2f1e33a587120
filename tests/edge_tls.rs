//! HTTPS through real sockets on 127.0.0.1: a test CA made here, the
//! balancer's HTTPS listener beside its plain one, HTTP/1.1 and h2 chosen
//! by ALPN, and a certificate swapped by a reload (what SIGHUP does in the
//! binary) while a connection opened before keeps working.

#[path = "support/http.rs"]
mod http_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rollcall::balancer::routes::Routes;
use rollcall::balancer::tls::Tls;
use rollcall::balancer::{Balancer, BalancerConfig};
use rollcall::protocol::{Instance, Snapshot};
use rollcall::subscription::Update;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use http_support::HttpBackend;

const DEADLINE: Duration = Duration::from_secs(5);

type Ca = CertifiedIssuer<'static, KeyPair>;

fn test_ca() -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "rollcall test CA");
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

/// A certificate for localhost and 127.0.0.1 named `name`, written with
/// its key over `cert` and `key`; returns the certificate as sent on the
/// wire.
fn issue(ca: &Ca, name: &str, cert: &Path, key: &Path) -> CertificateDer<'static> {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.distinguished_name.push(DnType::CommonName, name);
    let key_pair = KeyPair::generate().expect("key");
    let issued = params.signed_by(&key_pair, ca).expect("sign");
    std::fs::write(cert, issued.pem()).expect("write the certificate");
    std::fs::write(key, key_pair.serialize_pem()).expect("write the key");
    issued.der().clone()
}

/// A TLS connection to `address` offering `alpn`; the protocol chosen and
/// the certificate the server showed.
async fn connect(
    ca: &Ca,
    address: std::net::SocketAddr,
    alpn: &[u8],
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    Vec<u8>,
    CertificateDer<'static>,
) {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).expect("trust the test CA");
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(address).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the test CA's certificate");
    let (_, session) = stream.get_ref();
    let chosen = session.alpn_protocol().unwrap_or_default().to_vec();
    let shown = session.peer_certificates().expect("a certificate")[0].clone();
    (stream, chosen, shown)
}

async fn body_of(response: http::Response<hyper::body::Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn get(uri: &str) -> Request<Empty<Bytes>> {
    Request::get(uri)
        .header(http::header::HOST, "localhost")
        .body(Empty::new())
        .expect("request")
}

struct Setup {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    ca: Ca,
    first: CertificateDer<'static>,
    tls: Arc<Tls>,
    https: std::net::SocketAddr,
    _backend: HttpBackend,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), rollcall::balancer::BalancerError>>,
}

async fn start() -> Setup {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ca = test_ca();
    let first = issue(&ca, "first", &cert, &key);
    let tls = Tls::load(&cert, &key).expect("load the certificate");

    let backend = HttpBackend::start("web-1").await;
    let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let secure = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let https = secure.local_addr().expect("address");
    let balancer = Balancer::new(BalancerConfig::new(
        Routes::parse(&["web"]).expect("routes"),
    ))
    .https(secure, tls.clone());
    let mut applied = balancer.applied();
    let (updates, receiver) = tokio::sync::mpsc::unbounded_channel();
    updates
        .send(Update::Service(Snapshot {
            service: "web".into(),
            revision: 1,
            instances: vec![Instance::new("web", "web-1", "127.0.0.1", backend.port())],
        }))
        .expect("send");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(balancer.serve(
        plain,
        None,
        tokio_stream::wrappers::UnboundedReceiverStream::new(receiver),
        async {
            let _ = stopped.await;
        },
    ));
    tokio::time::timeout(DEADLINE, applied.wait_for(|a| a.revision("web") == 1))
        .await
        .expect("applied in time")
        .expect("running");
    Setup {
        _dir: dir,
        cert,
        key,
        ca,
        first,
        tls,
        https,
        _backend: backend,
        stop,
        task,
    }
}

impl Setup {
    async fn stop(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve does not panic");
        result.expect("serve ends without error");
    }
}

#[tokio::test]
async fn https_serves_http1_and_h2_by_alpn() {
    let setup = start().await;

    let (stream, chosen, shown) = connect(&setup.ca, setup.https, b"http/1.1").await;
    assert_eq!(chosen, b"http/1.1");
    assert_eq!(shown, setup.first);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 over TLS");
    tokio::spawn(connection);
    let response = sender.send_request(get("/")).await.expect("answer");
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(body_of(response).await, (StatusCode::OK, "web-1".into()));
    let response = sender.send_request(get("/headers")).await.expect("answer");
    let (_, headers) = body_of(response).await;
    assert!(headers.contains("x-forwarded-proto: https\n"), "{headers}");

    let (stream, chosen, _) = connect(&setup.ca, setup.https, b"h2").await;
    assert_eq!(chosen, b"h2");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 over TLS");
    tokio::spawn(connection);
    let response = sender
        .send_request(get("https://localhost/"))
        .await
        .expect("answer");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(body_of(response).await, (StatusCode::OK, "web-1".into()));
    setup.stop().await;
}

#[tokio::test]
async fn a_reload_swaps_the_certificate_and_keeps_open_connections() {
    let setup = start().await;
    let (stream, _, shown) = connect(&setup.ca, setup.https, b"http/1.1").await;
    assert_eq!(shown, setup.first);
    let (mut open, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 over TLS");
    tokio::spawn(connection);
    let response = open.send_request(get("/")).await.expect("answer");
    assert_eq!(body_of(response).await.0, StatusCode::OK);

    let second = issue(&setup.ca, "second", &setup.cert, &setup.key);
    setup.tls.reload().expect("reload the new certificate");
    let (_, _, shown) = connect(&setup.ca, setup.https, b"http/1.1").await;
    assert_eq!(shown, second, "a new connection gets the new certificate");
    let response = open.send_request(get("/")).await.expect("answer");
    assert_eq!(
        body_of(response).await,
        (StatusCode::OK, "web-1".into()),
        "the connection opened before the reload still works"
    );

    // A reload that fails names the file and keeps the certificate in use.
    std::fs::write(&setup.cert, "not a certificate\n").expect("spoil the file");
    let error = setup.tls.reload().expect_err("nothing to load");
    let cert_path = setup.cert.display().to_string();
    assert!(error.to_string().contains(&cert_path), "{error}");
    let (_, _, shown) = connect(&setup.ca, setup.https, b"http/1.1").await;
    assert_eq!(shown, second);
    setup.stop().await;
}

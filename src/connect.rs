//! How every component reaches NATS: the URL and any credential kind (user
//! and password in the URL, a token, an nkey seed, a `.creds` file, TLS), a
//! short ping interval so a hung server is noticed in seconds, unlimited
//! reconnects with backoff, and the state of the link as one [`Link`] every
//! component watches; permission violations become [`PermissionDenied`]
//! errors naming the subject and the user, logged, counted and broadcast.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};
use tokio::sync::{broadcast, watch};

use crate::permissions::{Access, PermissionDenied};

/// How long [`Connection::check_access`] waits for the server to refuse.
/// The server answers a refused SUB or PUB at once, but async-nats offers no
/// ping round trip to wait for and hands server errors to the event callback
/// on a task of its own; on 127.0.0.1 or a LAN the refusal is in well within
/// this.
pub const ACCESS_CHECK_GRACE: Duration = Duration::from_millis(250);

/// Where NATS is when nothing else says.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// An async-nats error that prints each cause once. async-nats writes its
/// cause into its own message *and* returns it as the source, so a printer
/// that walks the chain (`anyhow`'s `{:#}`) would show the cause twice. This
/// shows the cause's text (or the kind, when there is no cause) and hands on
/// the cause's own source.
#[derive(Debug)]
pub struct NatsError<K>(pub async_nats::error::Error<K>)
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq;

impl<K> NatsError<K>
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq,
{
    fn cause(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

impl<K> fmt::Display for NatsError<K>
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cause() {
            Some(cause) => write!(f, "{cause}"),
            None => write!(f, "{}", self.0.kind()),
        }
    }
}

impl<K> std::error::Error for NatsError<K>
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq,
{
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause().and_then(std::error::Error::source)
    }
}

/// A connection that could not be made, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    #[error("NATS at {url} refused the credentials{user} (check the user/password, token, nkey or .creds file)")]
    Unauthorized {
        url: String,
        user: String,
        #[source]
        source: NatsError<ConnectErrorKind>,
    },
    #[error("cannot reach NATS at {url} (is nats-server running there?)")]
    Unreachable {
        url: String,
        #[source]
        source: NatsError<ConnectErrorKind>,
    },
    #[error("TLS with NATS at {url} failed (check the CA, certificate and key files)")]
    Tls {
        url: String,
        #[source]
        source: NatsError<ConnectErrorKind>,
    },
    #[error("cannot read the credentials file {path}")]
    CredsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--tls-cert and --tls-key go together; only {given} was given")]
    HalfClientCert { given: &'static str },
}

/// A start-up check that could not be completed, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Denied(#[from] PermissionDenied),
    #[error("cannot check {access} on NATS")]
    Check {
        access: Access,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Everything needed to open a NATS connection.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// One URL or several, comma-separated; user and password may be in it.
    pub url: String,
    pub creds_file: Option<PathBuf>,
    pub nkey_seed: Option<String>,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// How often the client pings the server; two missed pongs and the
    /// connection counts as lost.
    pub ping_interval: Duration,
    /// Logs the first connection at debug instead of info: for one-shot
    /// commands (`catalog`, `watch`) whose output is the point. Reconnects
    /// and losses are logged as always.
    pub quiet: bool,
    /// Messages a subscription holds before NATS drops the next (a slow
    /// consumer); async-nats's default unless a role needs more.
    pub subscription_capacity: usize,
}

/// async-nats's own default [`NatsOptions::subscription_capacity`].
pub const SUBSCRIPTION_CAPACITY: usize = 65_536;

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            url: DEFAULT_URL.to_owned(),
            creds_file: None,
            nkey_seed: None,
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            ping_interval: Duration::from_secs(2),
            quiet: false,
            subscription_capacity: SUBSCRIPTION_CAPACITY,
        }
    }
}

/// The state of the link to NATS, as every component sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Link {
    /// Whether messages can flow right now; false for good once the client
    /// is closed.
    pub connected: bool,
    /// How many times the link was established: 1 after the first
    /// connection, one more for every reconnect. A change while `connected`
    /// stayed true still means a spell in which nothing could be heard.
    pub generation: u64,
}

impl Link {
    /// The link after `event`; `None` when the event does not change it.
    /// async-nats may report the first `Connected` after `connect` returned,
    /// so a `Connected` while connected is no reconnect.
    pub fn after(self, event: &Event) -> Option<Link> {
        match event {
            Event::Connected if !self.connected => Some(Link {
                connected: true,
                generation: self.generation + 1,
            }),
            Event::Disconnected | Event::Closed if self.connected => Some(Link {
                connected: false,
                ..self
            }),
            _ => None,
        }
    }
}

/// An open client, the state of its link, and the server's refusals.
#[derive(Debug, Clone)]
pub struct Connection {
    pub client: Client,
    link: watch::Receiver<Link>,
    denials: broadcast::Sender<PermissionDenied>,
    denied: Arc<AtomicU64>,
    identity: String,
}

impl Connection {
    /// The state of the link, now and as it changes.
    pub fn link(&self) -> watch::Receiver<Link> {
        self.link.clone()
    }

    /// Permission violations from now on, already parsed (and logged at
    /// error level). A lagging receiver loses the oldest.
    pub fn denials(&self) -> broadcast::Receiver<PermissionDenied> {
        self.denials.subscribe()
    }

    /// How many publishes and subscriptions the server refused so far.
    pub fn denied_count(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Who this connection authenticated as, for messages: `user balancer`,
    /// `nkey UA…`, `the user of creds file x.creds`, `a token`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Checks at start-up that the server allows everything in `needs`, so a
    /// component that would otherwise wait forever on a refused subscription
    /// exits with the refusal instead. Subscriptions are made and dropped
    /// again; publishes send an empty message (see [`Access::Publish`]).
    /// Returns the first refusal.
    pub async fn check_access(&self, needs: &[Access]) -> Result<(), AccessError> {
        let mut denials = self.denials();
        let mut probes = Vec::new();
        for access in needs {
            let failed = |source: Box<dyn std::error::Error + Send + Sync>| AccessError::Check {
                access: access.clone(),
                source,
            };
            match access {
                Access::Subscribe(subject) => {
                    let subscriber = self
                        .client
                        .subscribe(subject.clone())
                        .await
                        .map_err(|e| failed(Box::new(NatsError(e))))?;
                    probes.push(subscriber);
                }
                Access::Publish(subject) => self
                    .client
                    .publish(subject.clone(), bytes::Bytes::new())
                    .await
                    .map_err(|e| failed(Box::new(NatsError(e))))?,
            }
        }
        if let Some(access) = needs.first() {
            self.client.flush().await.map_err(|e| AccessError::Check {
                access: access.clone(),
                source: Box::new(NatsError(e)),
            })?;
        }
        let refusal = async {
            loop {
                match denials.recv().await {
                    Ok(denied) => {
                        let asked = needs.iter().any(|access| {
                            access.operation() == denied.operation
                                && access.subject() == denied.subject
                        });
                        if asked {
                            return Some(denied);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        };
        let result = match tokio::time::timeout(ACCESS_CHECK_GRACE, refusal).await {
            Ok(Some(denied)) => Err(AccessError::Denied(denied)),
            Ok(None) | Err(_) => Ok(()),
        };
        // Dropping a subscriber unsubscribes it.
        drop(probes);
        result
    }
}

impl NatsOptions {
    /// Options for `url` with no credentials beyond what the URL carries.
    pub fn new(url: impl Into<String>) -> Self {
        NatsOptions {
            url: url.into(),
            ..NatsOptions::default()
        }
    }

    /// Who these options authenticate as, for messages (never a secret).
    pub fn identity(&self) -> String {
        if let Some(path) = &self.creds_file {
            return format!("the user of creds file {}", path.display());
        }
        if let Some(seed) = &self.nkey_seed {
            return match nkeys::KeyPair::from_seed(seed) {
                Ok(pair) => format!("nkey {}", pair.public_key()),
                Err(_) => "an nkey seed that does not parse".to_owned(),
            };
        }
        if self.token.is_some() {
            return "a token".to_owned();
        }
        match url_credentials(&self.url) {
            Some(UrlCredentials::UserPassword(user, _)) => format!("user {user}"),
            Some(UrlCredentials::Token(_)) => "a token".to_owned(),
            None if self.tls_cert.is_some() => "the TLS client certificate".to_owned(),
            None => "no user (no credentials given)".to_owned(),
        }
    }

    /// The URL with any password replaced by `***`, for messages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Connects, naming the connection `name` on the server (it shows in
    /// `nats server report connections`). Fails at once, with the cause, when
    /// the first connection cannot be made; reconnects forever afterwards.
    pub async fn connect(&self, name: &str) -> Result<Connection, NatsConnectError> {
        let url = self.redacted_url();
        let identity = self.identity();
        let (link_sender, link) = watch::channel(Link::default());
        let (denials, _) = broadcast::channel(64);
        let denied = Arc::new(AtomicU64::new(0));
        let watcher = EventWatcher {
            url: url.clone(),
            identity: identity.clone(),
            link: link_sender.clone(),
            denials: denials.clone(),
            denied: Arc::clone(&denied),
            closing: Arc::new(AtomicBool::new(false)),
            quiet: self.quiet,
        };
        let client = self
            .credentials()
            .await?
            .name(name)
            .ping_interval(self.ping_interval)
            .subscription_capacity(self.subscription_capacity)
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                watcher.on(event);
                async {}
            })
            .connect(server_list(&self.url))
            .await
            .map_err(|source| refused(source, &url, &identity))?;
        // The first `Connected` event may come later, or may have come.
        link_sender.send_if_modified(|link| {
            let first = link.generation == 0;
            if first {
                *link = Link {
                    connected: true,
                    generation: 1,
                };
            }
            first
        });
        Ok(Connection {
            client,
            link,
            denials,
            denied,
            identity,
        })
    }

    /// The async-nats options carrying the credentials and TLS settings.
    async fn credentials(&self) -> Result<ConnectOptions, NatsConnectError> {
        let mut options = ConnectOptions::new();
        if let Some(path) = &self.creds_file {
            options = options.credentials_file(path).await.map_err(|source| {
                NatsConnectError::CredsFile {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        match url_credentials(&self.url) {
            Some(UrlCredentials::UserPassword(user, password)) => {
                options = options.user_and_password(user, password);
            }
            Some(UrlCredentials::Token(token)) => options = options.token(token),
            None => {}
        }
        // An explicit --token wins over one in the URL.
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true)),
            (Some(_), None) => Err(NatsConnectError::HalfClientCert {
                given: "--tls-cert",
            }),
            (None, Some(_)) => Err(NatsConnectError::HalfClientCert { given: "--tls-key" }),
            (None, None) => Ok(options),
        }
    }
}

/// Why the first connection failed, in the terms of what to check.
fn refused(source: async_nats::ConnectError, url: &str, identity: &str) -> NatsConnectError {
    let url = url.to_owned();
    let source = NatsError(source);
    match source.0.kind() {
        ConnectErrorKind::AuthorizationViolation => NatsConnectError::Unauthorized {
            user: format!(" of {identity}"),
            url,
            source,
        },
        ConnectErrorKind::Tls => NatsConnectError::Tls { url, source },
        _ => NatsConnectError::Unreachable { url, source },
    }
}

/// Receives the client's connection events: moves the [`Link`], turns
/// permission violations into [`PermissionDenied`], logs the rest.
struct EventWatcher {
    url: String,
    identity: String,
    link: watch::Sender<Link>,
    denials: broadcast::Sender<PermissionDenied>,
    denied: Arc<AtomicU64>,
    /// Set once the client drains or closes on purpose.
    closing: Arc<AtomicBool>,
    /// See [`NatsOptions::quiet`].
    quiet: bool,
}

impl EventWatcher {
    fn on(&self, event: Event) {
        if matches!(event, Event::Draining | Event::Closed) {
            self.closing.store(true, Ordering::Relaxed);
        }
        self.link.send_if_modified(|link| match link.after(&event) {
            Some(next) => {
                *link = next;
                true
            }
            None => false,
        });
        let denial = match &event {
            Event::ServerError(async_nats::ServerError::Other(message)) => {
                PermissionDenied::from_server_error(message, &self.identity)
            }
            _ => None,
        };
        match denial {
            Some(denied) => {
                self.denied.fetch_add(1, Ordering::Relaxed);
                tracing::error!(url = %self.url, "{denied}");
                // Nobody listening is fine: the denial is logged.
                let _ = self.denials.send(denied);
            }
            None if self.quiet
                && matches!(event, Event::Connected)
                && self.link.borrow().generation <= 1 =>
            {
                tracing::debug!(url = %self.url, "connected to NATS")
            }
            None => log_event(&self.url, &event, self.closing.load(Ordering::Relaxed)),
        }
    }
}

/// 0 ms, then doubling from 100 ms up to 2 s: a restarted server is found
/// again quickly, a dead one is not hammered.
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(5);
    Duration::from_millis(100 * 2u64.pow(exponent)).min(Duration::from_secs(2))
}

/// Logs one connection event. Once the client is closing on purpose, the
/// end of the connection is no news.
fn log_event(url: &str, event: &Event, closing: bool) {
    match event {
        Event::Connected => tracing::info!(%url, "connected to NATS"),
        Event::Closed | Event::Disconnected | Event::ClientError(_) if closing => {
            tracing::debug!(%url, event = %event, "NATS connection closed")
        }
        Event::Disconnected => {
            tracing::warn!(%url, "lost the NATS connection; reconnecting")
        }
        Event::ServerError(error) => tracing::error!(%url, %error, "NATS server error"),
        Event::SlowConsumer(sid) => {
            tracing::warn!(%url, sid, "slow consumer: NATS dropped messages for a subscription")
        }
        other => tracing::info!(%url, event = %other, "NATS connection event"),
    }
}

/// The comma-separated URLs of `--nats` one by one (async-nats takes a
/// list, not a comma-separated string); the client tries them all and moves
/// to another when its server goes away.
fn server_list(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// Credentials written into a URL: `nats://user:password@host` or
/// `nats://token@host`.
#[derive(Debug, PartialEq, Eq)]
enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

/// The credentials of the first of the comma-separated URLs that has any,
/// percent-decoded (a password with `@` or `:` in it is written `%40`, `%3A`).
/// async-nats does not read them from the URL itself.
fn url_credentials(urls: &str) -> Option<UrlCredentials> {
    urls.split(',').map(str::trim).find_map(|url| {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let (userinfo, _) = rest.rsplit_once('@')?;
        Some(match userinfo.split_once(':') {
            Some((user, password)) => {
                UrlCredentials::UserPassword(percent_decode(user), percent_decode(password))
            }
            None => UrlCredentials::Token(percent_decode(userinfo)),
        })
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            // The last `@` ends the userinfo: an unescaped `@` in a password
            // must not leave its tail in the message.
            let redacted = match rest.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("***@{host}"),
                },
                None => rest.to_owned(),
            };
            if scheme.is_empty() {
                redacted
            } else {
                format!("{scheme}://{redacted}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_never_reach_messages() {
        assert_eq!(redact("nats://a:secret@h:4222"), "nats://a:***@h:4222");
        assert_eq!(redact("nats://tok@h:4222"), "nats://***@h:4222");
        assert_eq!(
            redact("nats://h1:4222,nats://u:p@h2"),
            "nats://h1:4222,nats://u:***@h2"
        );
        assert_eq!(redact("h:4222"), "h:4222");
        assert_eq!(redact("nats://a:p@ss@h:4222"), "nats://a:***@h:4222");
    }

    #[test]
    fn every_comma_separated_url_is_a_server_to_try() {
        assert_eq!(
            server_list("nats://a:4222, nats://b:4222,nats://u:p@c:4222,"),
            ["nats://a:4222", "nats://b:4222", "nats://u:p@c:4222"]
        );
        assert_eq!(server_list("nats://a:4222"), ["nats://a:4222"]);
    }

    #[test]
    fn credentials_come_out_of_the_url() {
        assert_eq!(
            url_credentials("nats://alice:p%40ss%3Aword@h:4222"),
            Some(UrlCredentials::UserPassword(
                "alice".into(),
                "p@ss:word".into()
            ))
        );
        assert_eq!(
            url_credentials("nats://h1:4222, nats://s3cret@h2:4222"),
            Some(UrlCredentials::Token("s3cret".into()))
        );
        assert_eq!(url_credentials("nats://h:4222"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(NatsOptions::new("nats://web:pw@h").identity(), "user web");
        assert_eq!(
            NatsOptions::new("nats://h").identity(),
            "no user (no credentials given)"
        );
    }

    #[test]
    fn reconnect_delay_backs_off_to_two_seconds() {
        let delays: Vec<u64> = (1..=8)
            .map(|a| reconnect_delay(a).as_millis() as u64)
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn the_link_counts_connections_once_each() {
        let mut link = Link::default();
        let mut seen = Vec::new();
        for event in [
            Event::Connected,
            Event::Connected,
            Event::Disconnected,
            Event::Disconnected,
            Event::Connected,
            Event::SlowConsumer(1),
        ] {
            if let Some(next) = link.after(&event) {
                link = next;
                seen.push((link.connected, link.generation));
            }
        }
        assert_eq!(seen, [(true, 1), (false, 1), (true, 2)]);
    }
}

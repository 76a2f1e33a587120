//! How every component reaches NATS: the URL and any credential kind (user
//! and password in the URL, a token, an nkey seed, a `.creds` file, TLS), a
//! short ping interval so a hung server is noticed in seconds, unlimited
//! reconnects with backoff, and connection events logged and handed on.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions};
use tokio::sync::broadcast;

/// Where NATS is when nothing else says.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// A connection that could not be made, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("NATS at {url} refused the credentials{user}: check the user/password, token, nkey or .creds file ({source})")]
    Unauthorized {
        url: String,
        user: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot reach NATS at {url}: {source}; is nats-server running there?")]
    Unreachable {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("TLS with NATS at {url} failed: {source}; check the CA, certificate and key files")]
    Tls {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot read the credentials file {path}: {source}")]
    CredsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--tls-cert and --tls-key go together; only {given} was given")]
    HalfClientCert { given: &'static str },
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
}

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
        }
    }
}

/// An open client, and the connection events (disconnected, reconnected,
/// server errors such as permission violations) for whoever needs them.
#[derive(Debug, Clone)]
pub struct Connection {
    pub client: Client,
    events: broadcast::Sender<async_nats::Event>,
}

impl Connection {
    /// Connection events from now on. A lagging receiver loses the oldest.
    pub fn events(&self) -> broadcast::Receiver<async_nats::Event> {
        self.events.subscribe()
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

    /// The URL with any password replaced by `***`, for messages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Connects, naming the connection `name` on the server (it shows in
    /// `nats server report connections`). Fails at once, with the cause, when
    /// the first connection cannot be made; reconnects forever afterwards.
    pub async fn connect(&self, name: &str) -> Result<Connection, ConnectError> {
        let url = self.redacted_url();
        let mut options = ConnectOptions::new();
        if let Some(path) = &self.creds_file {
            options =
                options
                    .credentials_file(path)
                    .await
                    .map_err(|source| ConnectError::CredsFile {
                        path: path.clone(),
                        source,
                    })?;
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true);
            }
            (Some(_), None) => {
                return Err(ConnectError::HalfClientCert {
                    given: "--tls-cert",
                })
            }
            (None, Some(_)) => return Err(ConnectError::HalfClientCert { given: "--tls-key" }),
            (None, None) => {}
        }
        let (events, _) = broadcast::channel(64);
        let sender = events.clone();
        let log_url = url.clone();
        options = options
            .name(name)
            .ping_interval(self.ping_interval)
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                log_event(&log_url, &event);
                // Nobody listening is fine: the event is logged.
                let _ = sender.send(event);
                async {}
            });
        let client =
            options
                .connect(self.url.as_str())
                .await
                .map_err(|source| match source.kind() {
                    ConnectErrorKind::AuthorizationViolation => ConnectError::Unauthorized {
                        user: user_of(&self.url)
                            .map(|u| format!(" for user {u}"))
                            .unwrap_or_default(),
                        url: url.clone(),
                        source,
                    },
                    ConnectErrorKind::Tls => ConnectError::Tls {
                        url: url.clone(),
                        source,
                    },
                    _ => ConnectError::Unreachable {
                        url: url.clone(),
                        source,
                    },
                })?;
        Ok(Connection { client, events })
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

fn log_event(url: &str, event: &async_nats::Event) {
    use async_nats::Event;
    match event {
        Event::Connected => tracing::info!(%url, "connected to NATS"),
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

/// The user name in `nats://user:pass@host`, if any.
fn user_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (userinfo, _) = rest.split_once('@')?;
    Some(userinfo.split_once(':').map_or(userinfo, |(user, _)| user))
}

fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            let redacted = match rest.split_once('@') {
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
        assert_eq!(user_of("nats://alice:pw@h"), Some("alice"));
        assert_eq!(user_of("nats://h:4222"), None);
    }

    #[test]
    fn reconnect_delay_backs_off_to_two_seconds() {
        let delays: Vec<u64> = (1..=8)
            .map(|a| reconnect_delay(a).as_millis() as u64)
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1600, 2000, 2000]);
    }
}

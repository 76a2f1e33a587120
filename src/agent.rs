//! Stage 1, the sender for services in any language: announces an instance
//! on its behalf, heartbeating only while the instance's HTTP health check
//! answers 2xx, deregistering after a run of failed checks and registering
//! again when it recovers. Hands discovery the same events as the announcer.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;

use crate::announcer::{check_announcement, next_event, AnnounceError, Publisher};
use crate::connect::Connection;
use crate::protocol::{Instance, Subjects};

/// Consecutive failed checks after which the instance is deregistered.
pub const DEFAULT_FAIL_AFTER: u32 = 3;
/// How long a health check may take before it counts as failed.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// A configuration the agent cannot run with, naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("check URL {url:?} {reason}")]
    BadCheckUrl { url: String, reason: &'static str },
    #[error("fail-after must be at least 1")]
    FailAfterZero,
    #[error(transparent)]
    Announce(#[from] AnnounceError),
}

/// An HTTP GET that must answer 2xx within `timeout`.
#[derive(Debug, Clone)]
pub struct Check {
    pub url: Uri,
    pub timeout: Duration,
}

impl Check {
    /// Parses and checks a check URL: `http://host[:port]/path`.
    pub fn parse_url(url: &str) -> Result<Uri, AgentError> {
        let bad = |reason| AgentError::BadCheckUrl {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url
            .parse()
            .map_err(|_| bad("is not a URL; write it like http://127.0.0.1:8080/health"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => return Err(bad("must use http:// (the check speaks plain HTTP)")),
            None => {
                return Err(bad(
                    "has no scheme; write it like http://127.0.0.1:8080/health",
                ))
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        Ok(uri)
    }
}

/// What the agent announces and how.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub instance: Instance,
    pub interval: Duration,
    pub check: Option<Check>,
    pub fail_after: u32,
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), AgentError> {
        check_announcement(&self.instance, self.interval)?;
        if self.fail_after == 0 {
            return Err(AgentError::FailAfterZero);
        }
        if let Some(check) = &self.check {
            Check::parse_url(&check.url.to_string())?;
        }
        Ok(())
    }
}

/// What to send after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Register,
    Heartbeat,
    Deregister,
    /// Failing, but not yet `fail_after` times in a row: stay silent and let
    /// the TTL decide if it lasts.
    Hold,
    /// Failing and already out of the catalog.
    Nothing,
}

/// The pure decision: check results in, actions out.
#[derive(Debug, Clone)]
pub struct Gate {
    fail_after: u32,
    failures: u32,
}

impl Gate {
    pub fn new(fail_after: u32) -> Self {
        Gate {
            fail_after,
            failures: 0,
        }
    }

    /// Failed checks in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The action after one check, given whether the instance is in the
    /// catalog now.
    pub fn next(&mut self, healthy: bool, registered: bool) -> Action {
        if healthy {
            self.failures = 0;
            return if registered {
                Action::Heartbeat
            } else {
                Action::Register
            };
        }
        self.failures = self.failures.saturating_add(1);
        match (registered, self.failures >= self.fail_after) {
            (true, true) => Action::Deregister,
            (true, false) => Action::Hold,
            (false, _) => Action::Nothing,
        }
    }
}

/// Runs the agent until `shutdown` resolves, then deregisters (if the
/// instance is in the catalog) and returns.
pub async fn run(
    connection: &Connection,
    subjects: Subjects,
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    config.validate()?;
    let publisher = Publisher::new(connection.client.clone(), subjects);
    let mut events = Some(connection.events());
    let prober = config.check.as_ref().map(Prober::new);
    let instance = &config.instance;
    let mut gate = Gate::new(config.fail_after);
    let mut registered = false;
    let mut disconnected = false;
    // The first tick is immediate: register (or check) at once.
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {
                let outcome = match &prober {
                    Some(prober) => prober.probe().await,
                    None => Ok(()),
                };
                let action = gate.next(outcome.is_ok(), registered);
                if let Err(reason) = &outcome {
                    log_failed_check(instance, &gate, action, reason);
                }
                registered = perform(&publisher, instance, action, registered).await;
            }
            event = next_event(&mut events) => match event {
                Ok(async_nats::Event::Disconnected) => disconnected = true,
                Ok(async_nats::Event::Connected) if disconnected && registered => {
                    disconnected = false;
                    registered = perform(&publisher, instance, Action::Register, false).await;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) if registered => {
                    registered = perform(&publisher, instance, Action::Register, false).await;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => events = None,
            },
        }
    }
    if registered {
        publisher.deregister(instance).await?;
        tracing::info!(service = %instance.service, id = %instance.id, "deregistered on shutdown");
    }
    Ok(())
}

/// Sends what `action` says; whether the instance is in the catalog after.
async fn perform(
    publisher: &Publisher,
    instance: &Instance,
    action: Action,
    registered: bool,
) -> bool {
    let (service, id) = (&instance.service, &instance.id);
    match action {
        Action::Register => match publisher.register(instance).await {
            Ok(()) => {
                tracing::info!(%service, %id, address = %instance.authority(), "registered");
                true
            }
            Err(error) => {
                tracing::warn!(%error, "register not sent; retrying at the next interval");
                false
            }
        },
        Action::Heartbeat => {
            if let Err(error) = publisher.heartbeat(instance).await {
                tracing::warn!(%error, "heartbeat not sent; retrying at the next interval");
            }
            true
        }
        Action::Deregister => match publisher.deregister(instance).await {
            Ok(()) => {
                tracing::info!(%service, %id, "deregistered");
                false
            }
            Err(error) => {
                tracing::warn!(%error, "deregister not sent; the instance leaves at its TTL");
                false
            }
        },
        Action::Hold | Action::Nothing => registered,
    }
}

/// Every failed check is logged with its reason: at warn while it changes
/// something (heartbeats held, then the deregister), at debug while the
/// instance is out and the check keeps failing.
fn log_failed_check(instance: &Instance, gate: &Gate, action: Action, reason: &str) {
    let (service, id) = (&instance.service, &instance.id);
    let failures = gate.failures();
    match action {
        Action::Hold => {
            tracing::warn!(%service, %id, failures, %reason, "health check failed; holding heartbeats")
        }
        Action::Deregister => {
            tracing::warn!(%service, %id, failures, %reason, "health check failed too often; deregistering")
        }
        _ => tracing::debug!(%service, %id, failures, %reason, "health check still failing"),
    }
}

/// Runs the HTTP health check (also `rollcall probe`'s).
pub struct Prober {
    client: Client<HttpConnector, Empty<Bytes>>,
    check: Check,
}

impl Prober {
    pub fn new(check: &Check) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(check.timeout));
        Prober {
            client: Client::builder(TokioExecutor::new()).build(connector),
            check: check.clone(),
        }
    }

    /// Ok when the check answers 2xx in time; otherwise why not.
    pub async fn probe(&self) -> Result<(), String> {
        let url = &self.check.url;
        match tokio::time::timeout(self.check.timeout, self.client.get(url.clone())).await {
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("GET {url} answered {}", response.status())),
            Ok(Err(error)) => Err(format!("GET {url} failed: {error}")),
            Err(_) => Err(format!(
                "GET {url} took longer than {:?}",
                self.check.timeout
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_holds_then_deregisters_after_a_run_of_failures_and_recovers() {
        let mut gate = Gate::new(3);
        assert_eq!(gate.next(false, false), Action::Nothing, "never up yet");
        assert_eq!(gate.next(true, false), Action::Register);
        assert_eq!(gate.next(true, true), Action::Heartbeat);
        assert_eq!(gate.next(false, true), Action::Hold);
        assert_eq!(gate.next(true, true), Action::Heartbeat, "one blip resets");
        assert_eq!(gate.next(false, true), Action::Hold);
        assert_eq!(gate.next(false, true), Action::Hold);
        assert_eq!(gate.next(false, true), Action::Deregister);
        assert_eq!(gate.next(false, false), Action::Nothing);
        assert_eq!(gate.next(true, false), Action::Register);
    }

    #[test]
    fn fail_after_one_deregisters_at_the_first_failure() {
        let mut gate = Gate::new(1);
        assert_eq!(gate.next(false, true), Action::Deregister);
    }

    #[test]
    fn check_urls_are_checked() {
        assert!(Check::parse_url("http://127.0.0.1:8080/health").is_ok());
        for (url, says) in [
            ("https://127.0.0.1/health", "http://"),
            ("127.0.0.1:8080/health", "write it like http://"),
            ("not a url", "not a URL"),
            ("/health", "scheme"),
        ] {
            let error = Check::parse_url(url).expect_err(url).to_string();
            assert!(error.contains(says), "{url}: {error}");
        }
    }

    #[test]
    fn configs_are_checked() {
        let config = AgentConfig {
            instance: Instance::new("web", "w1", "127.0.0.1", 80),
            interval: Duration::from_secs(1),
            check: None,
            fail_after: 3,
        };
        assert!(config.validate().is_ok());
        let slow = AgentConfig {
            interval: Duration::from_secs(3),
            ..config.clone()
        };
        assert!(matches!(
            slow.validate(),
            Err(AgentError::Announce(AnnounceError::IntervalTooLong { .. }))
        ));
        let never = AgentConfig {
            fail_after: 0,
            ..config
        };
        assert!(matches!(never.validate(), Err(AgentError::FailAfterZero)));
    }
}

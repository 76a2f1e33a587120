//! The sender for services in any language: announces an instance on its
//! behalf through the [`announcer`](crate::announcer), gated by the
//! instance's HTTP health check: heartbeats only while it answers 2xx,
//! deregisters after a run of failed checks, registers again when it
//! recovers.

use std::future::Future;
use std::time::Duration;

use crate::announcer::{check_announcement, AnnounceError, Announcer, Gate, Verdict};
use crate::connect::{AccessError, Connection};
use crate::metrics::AgentMetrics;
use crate::permissions::Access;
use crate::protocol::{EventKind, Instance, Subjects};
use bytes::Bytes;
use http::Uri;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Consecutive failed checks after which the instance is deregistered.
pub const DEFAULT_FAIL_AFTER: u32 = 3;
/// How long a health check may take before it counts as failed.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// A configuration the agent cannot run with, naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("check URL {url:?} {reason}")]
    BadCheckUrl { url: String, reason: &'static str },
    #[error("check URL {url:?} is not a URL; write it like http://127.0.0.1:8080/health")]
    NotAUrl {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("fail-after must be at least 1")]
    FailAfterZero,
    #[error(transparent)]
    Announce(#[from] AnnounceError),
    #[error(transparent)]
    Access(#[from] AccessError),
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
        let uri: Uri = url.parse().map_err(|source| AgentError::NotAUrl {
            url: url.to_owned(),
            source,
        })?;
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
    /// Counts checks and what is sent; [`AgentMetrics::default`] when
    /// nobody scrapes them.
    pub metrics: AgentMetrics,
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

/// The pure decision: check results in, verdicts out. Failing checks hold
/// heartbeats until `fail_after` of them in a row withdraw the instance.
#[derive(Debug, Clone)]
pub(crate) struct FailureRun {
    fail_after: u32,
    failures: u32,
}

impl FailureRun {
    pub fn new(fail_after: u32) -> Self {
        FailureRun {
            fail_after,
            failures: 0,
        }
    }

    /// Failed checks in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The verdict after one check.
    pub fn next(&mut self, healthy: bool) -> Verdict {
        if healthy {
            self.failures = 0;
            return Verdict::Announce;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.fail_after {
            Verdict::Withdraw
        } else {
            Verdict::Hold
        }
    }
}

/// What the agent must be allowed to publish, checked before anything is
/// announced. The probe is an empty deregister of the agent's own id, the
/// one event an agent about to register may send without harm: an instance
/// that is not live ignores it, and a stale record of this id is about to be
/// replaced anyway.
pub(crate) fn agent_needs(subjects: &Subjects, instance: &Instance) -> Vec<Access> {
    vec![Access::Publish(subjects.event(
        EventKind::Deregister,
        &instance.service,
        &instance.id,
    ))]
}

/// Runs the agent until `shutdown` resolves, then deregisters (if the
/// instance is in the catalog) and returns. Fails first, announcing
/// nothing, when the server refuses the instance's subjects.
pub async fn run(
    connection: &Connection,
    subjects: Subjects,
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    config.validate()?;
    connection
        .check_access(&agent_needs(&subjects, &config.instance))
        .await?;
    let gate = HealthGate {
        prober: config.check.as_ref().map(Prober::new),
        run: FailureRun::new(config.fail_after),
        passed: false,
        service: config.instance.service.clone(),
        id: config.instance.id.clone(),
        metrics: config.metrics.clone(),
    };
    let announcement = Announcer::new(connection, subjects, config.instance)
        .interval(config.interval)
        .metrics(config.metrics)
        .gate(gate)
        .start()
        .await?;
    shutdown.await;
    announcement.deregister().await?;
    Ok(())
}

/// The health check as the announcer's gate.
struct HealthGate {
    prober: Option<Prober>,
    run: FailureRun,
    /// Whether any check has passed yet.
    passed: bool,
    service: String,
    id: String,
    metrics: AgentMetrics,
}

impl Gate for HealthGate {
    async fn verdict(&mut self) -> Verdict {
        let outcome = match &self.prober {
            Some(prober) => {
                let outcome = prober.probe().await;
                self.metrics.check(outcome.is_ok());
                outcome
            }
            None => Ok(()),
        };
        let verdict = self.run.next(outcome.is_ok());
        match &outcome {
            Ok(()) => self.passed = true,
            Err(reason) => self.log_failure(verdict, reason),
        }
        verdict
    }
}

/// What one failed check is worth saying at warn level; `None` keeps it at
/// debug. Loud while it changes something (heartbeats held, then the
/// deregister); while the instance is out and the check keeps failing, or
/// has never passed, loud at the 1st, 2nd, 4th, 8th... failure in a row, so
/// a check that can never pass is seen at once without a line per interval.
fn failure_warning(
    passed_before: bool,
    verdict: Verdict,
    failures: u32,
    fail_after: u32,
) -> Option<&'static str> {
    let reminder = failures.is_power_of_two();
    match verdict {
        _ if !passed_before => reminder.then_some(
            "health check has not passed yet, so the instance is not announced \
             (is --check the right URL?)",
        ),
        Verdict::Hold => Some("health check failed; holding heartbeats"),
        Verdict::Withdraw if failures == fail_after => {
            Some("health check failed too often; deregistering")
        }
        _ => reminder.then_some("health check still failing; the instance stays out"),
    }
}

impl HealthGate {
    /// Every failed check is logged with its reason, at the level
    /// [`failure_warning`] decides.
    fn log_failure(&self, verdict: Verdict, reason: &str) {
        let (service, id) = (&self.service, &self.id);
        let failures = self.run.failures();
        match failure_warning(self.passed, verdict, failures, self.run.fail_after) {
            Some(message) => tracing::warn!(%service, %id, failures, %reason, "{message}"),
            None => tracing::debug!(%service, %id, failures, %reason, "health check still failing"),
        }
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
            Ok(Err(error)) => Err(format!("GET {url} failed: {}", crate::ErrorChain(&error))),
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
    fn a_run_of_failures_holds_then_withdraws_and_one_success_resets_it() {
        use Verdict::{Announce, Hold, Withdraw};
        let mut run = FailureRun::new(3);
        let checks = [true, true, false, true, false, false, false, false, true];
        let verdicts: Vec<Verdict> = checks.iter().map(|&ok| run.next(ok)).collect();
        assert_eq!(
            verdicts,
            [Announce, Announce, Hold, Announce, Hold, Hold, Withdraw, Withdraw, Announce],
            "one blip resets the run"
        );
    }

    #[test]
    fn a_check_that_never_passed_warns_at_growing_intervals() {
        let loud: Vec<u32> = (1..=20)
            .filter(|&n| failure_warning(false, Verdict::Withdraw, n, 3).is_some())
            .collect();
        assert_eq!(loud, [1, 2, 4, 8, 16]);
        let first = failure_warning(false, Verdict::Hold, 1, 3).expect("loud");
        assert!(first.contains("not passed yet"), "{first}");
        assert!(
            !failure_warning(false, Verdict::Withdraw, 4, 4)
                .expect("loud")
                .contains("deregistering"),
            "nothing was registered"
        );
    }

    #[test]
    fn a_check_that_passed_before_warns_while_it_changes_something() {
        let said = |verdict, n| failure_warning(true, verdict, n, 3);
        assert_eq!(
            said(Verdict::Hold, 1),
            Some("health check failed; holding heartbeats")
        );
        assert_eq!(
            said(Verdict::Hold, 2),
            Some("health check failed; holding heartbeats")
        );
        assert_eq!(
            said(Verdict::Withdraw, 3),
            Some("health check failed too often; deregistering")
        );
        let out: Vec<u32> = (4..=20)
            .filter(|&n| said(Verdict::Withdraw, n).is_some())
            .collect();
        assert_eq!(out, [4, 8, 16], "then reminders only");
    }

    #[tokio::test]
    async fn a_failed_check_names_the_cause() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/health", closed.local_addr().expect("address"));
        drop(closed);
        let prober = Prober::new(&Check {
            url: url.parse().expect("valid URL"),
            timeout: Duration::from_secs(1),
        });
        let reason = prober.probe().await.expect_err("nothing listens");
        assert!(reason.contains("refused"), "{reason}");
    }

    #[test]
    fn fail_after_one_withdraws_at_the_first_failure() {
        let mut run = FailureRun::new(1);
        assert_eq!(run.next(false), Verdict::Withdraw);
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
            metrics: AgentMetrics::default(),
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

//! Passive health (outlier detection) as a pure policy: which outcomes of
//! requests take an instance out of rotation, how many of a service's
//! instances may be out at once, and how much of its share an instance that
//! joined or came back gets while it warms up. No clock, no socket:
//! [`super::rotation`] keeps the state and applies these rules.
//!
//! Defaults and the anchor each follows:
//! - 5 answers 500–599 in a row eject (Envoy `consecutive_5xx` = 5);
//!   gateway failures (timeouts, resets, closes without an answer) count
//!   there too, as Envoy counts locally-originated failures as 5xx;
//! - 3 gateway failures in a row eject (Envoy `consecutive_gateway_failure`
//!   is 5 but off by default; nginx `max_fails` is 1). Each costs a client
//!   up to a whole upstream timeout, so fewer than 5, yet more than 1 since
//!   one closed kept-alive connection is no proof the instance is gone;
//! - a refused connection ejects at once, as before (nginx `max_fails=1`):
//!   it costs microseconds to see and no client sees it;
//! - at most 50 % of a service's live instances are out at once, and always
//!   at least one (Envoy `max_ejection_percent`, whose default of 10 % would
//!   never let a 3-instance service eject anyone);
//! - slow start is off (HAProxy `slowstart`, nginx `slow_start` and Envoy's
//!   slow start are all off by default): a fleet that scales up under load
//!   wants the new instance's full share at once unless told otherwise.

use std::time::{Duration, Instant};

pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_CONSECUTIVE_GATEWAY_FAILURES: u32 = 3;
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
pub const DEFAULT_SLOW_START: Duration = Duration::ZERO;

/// A ramping member's share, in 1/[`FULL_SHARE`]ths of its weight.
pub const FULL_SHARE: u32 = 1024;

/// What one attempt at an instance came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head with a status below 500.
    Answered,
    /// A response head with a status 500–599.
    ServerError,
    /// A timeout, a reset, a close without an answer or a broken answer.
    GatewayFailure,
    /// No connection could be made.
    ConnectFailure,
}

impl Outcome {
    pub fn of_status(status: http::StatusCode) -> Outcome {
        if status.is_server_error() {
            Outcome::ServerError
        } else {
            Outcome::Answered
        }
    }
}

/// Failures in a row since the instance last answered below 500.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streak {
    /// 5xx answers and gateway failures.
    pub server_errors: u32,
    /// Gateway failures only.
    pub gateway_failures: u32,
}

impl Streak {
    /// Both counts in one word, so a member keeps them in one atomic.
    pub fn pack(self) -> u64 {
        (u64::from(self.server_errors) << 32) | u64::from(self.gateway_failures)
    }

    pub fn unpack(word: u64) -> Streak {
        Streak {
            server_errors: (word >> 32) as u32,
            gateway_failures: word as u32,
        }
    }
}

/// Why an instance is to be ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Connect,
    ServerErrors(u32),
    GatewayFailures(u32),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Connect => write!(f, "connection failed"),
            Reason::ServerErrors(n) => write!(f, "{n} failures or 5xx answers in a row"),
            Reason::GatewayFailures(n) => write!(f, "{n} timeouts or closes in a row"),
        }
    }
}

/// The passive health settings of a balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// 5xx answers (or gateway failures) in a row that eject; 0: never.
    pub consecutive_5xx: u32,
    /// Gateway failures in a row that eject; 0: never.
    pub consecutive_gateway_failures: u32,
    /// The share of a service's live instances that may be ejected at once.
    pub max_ejection_percent: u32,
    /// How long an instance that joined or came back from an ejection takes
    /// to reach its full share; zero: at once.
    pub slow_start: Duration,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_5xx: DEFAULT_CONSECUTIVE_5XX,
            consecutive_gateway_failures: DEFAULT_CONSECUTIVE_GATEWAY_FAILURES,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
            slow_start: DEFAULT_SLOW_START,
        }
    }
}

impl OutlierPolicy {
    /// The streak after `outcome`, and the reason to eject when it crossed
    /// a threshold (the streak then starts again from zero).
    pub fn record(&self, streak: Streak, outcome: Outcome) -> (Streak, Option<Reason>) {
        let crossed = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        let next = match outcome {
            Outcome::Answered => return (Streak::default(), None),
            Outcome::ConnectFailure => return (Streak::default(), Some(Reason::Connect)),
            Outcome::ServerError => Streak {
                server_errors: streak.server_errors.saturating_add(1),
                gateway_failures: 0,
            },
            Outcome::GatewayFailure => Streak {
                server_errors: streak.server_errors.saturating_add(1),
                gateway_failures: streak.gateway_failures.saturating_add(1),
            },
        };
        if crossed(next.gateway_failures, self.consecutive_gateway_failures) {
            let reason = Reason::GatewayFailures(next.gateway_failures);
            return (Streak::default(), Some(reason));
        }
        if crossed(next.server_errors, self.consecutive_5xx) {
            return (
                Streak::default(),
                Some(Reason::ServerErrors(next.server_errors)),
            );
        }
        (next, None)
    }

    /// How many of `live` instances may be ejected at once: the percentage,
    /// rounded down, but at least one so a lone bad instance beside a good
    /// one is always taken out.
    pub fn ejection_cap(&self, live: usize) -> usize {
        (live * self.max_ejection_percent.min(100) as usize / 100).max(1)
    }

    /// The share of its weight, in 1/[`FULL_SHARE`]ths, that an instance
    /// ramping since `since` gets at `now`: linear over the slow-start
    /// window, as HAProxy's `slowstart` ramps the weight.
    pub fn share(&self, since: Instant, now: Instant) -> u32 {
        let window = self.slow_start.as_nanos();
        let elapsed = now.saturating_duration_since(since).as_nanos();
        if window == 0 || elapsed >= window {
            return FULL_SHARE;
        }
        (elapsed * u128::from(FULL_SHARE) / window) as u32
    }
}

/// Whether the pick at cursor `position` of a member with `share` goes to
/// it. The golden-ratio hash of consecutive positions spreads evenly over
/// `0..FULL_SHARE`, so about `share` of every `FULL_SHARE` picks pass,
/// evenly spaced, with no state and no lock.
pub fn admits(share: u32, position: usize) -> bool {
    if share >= FULL_SHARE {
        return true;
    }
    let spread = (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54;
    (spread as u32) < share
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: &OutlierPolicy, outcomes: &[Outcome]) -> Vec<Option<Reason>> {
        let mut streak = Streak::default();
        outcomes
            .iter()
            .map(|&outcome| {
                let (next, reason) = policy.record(streak, outcome);
                streak = next;
                reason
            })
            .collect()
    }

    #[test]
    fn five_5xx_in_a_row_eject_and_an_answer_starts_again() {
        let policy = OutlierPolicy::default();
        let mut outcomes = vec![Outcome::ServerError; 4];
        outcomes.push(Outcome::Answered);
        outcomes.extend([Outcome::ServerError; 5]);
        let reasons = run(&policy, &outcomes);
        assert!(reasons[..9].iter().all(Option::is_none), "{reasons:?}");
        assert_eq!(reasons[9], Some(Reason::ServerErrors(5)));
    }

    #[test]
    fn three_gateway_failures_in_a_row_eject_and_count_as_5xx_too() {
        let policy = OutlierPolicy::default();
        let reasons = run(&policy, &[Outcome::GatewayFailure; 3]);
        assert_eq!(reasons, [None, None, Some(Reason::GatewayFailures(3))]);
        // Mixed: two gateway failures, a 5xx breaks that run, but all five
        // are failures in a row.
        let mixed = [
            Outcome::GatewayFailure,
            Outcome::GatewayFailure,
            Outcome::ServerError,
            Outcome::GatewayFailure,
            Outcome::ServerError,
        ];
        let reasons = run(&policy, &mixed);
        assert_eq!(reasons[4], Some(Reason::ServerErrors(5)), "{reasons:?}");
        assert!(reasons[..4].iter().all(Option::is_none), "{reasons:?}");
    }

    #[test]
    fn a_connect_failure_ejects_at_once_and_zero_thresholds_never_eject() {
        let policy = OutlierPolicy {
            consecutive_5xx: 0,
            consecutive_gateway_failures: 0,
            ..OutlierPolicy::default()
        };
        assert_eq!(
            run(&policy, &[Outcome::ConnectFailure]),
            [Some(Reason::Connect)]
        );
        let many = vec![Outcome::GatewayFailure; 50];
        assert!(run(&policy, &many).iter().all(Option::is_none));
    }

    #[test]
    fn the_ejection_cap_is_a_share_of_live_instances_but_at_least_one() {
        let policy = OutlierPolicy::default();
        let caps: Vec<usize> = [1, 2, 3, 4, 5, 10].map(|n| policy.ejection_cap(n)).into();
        assert_eq!(caps, [1, 1, 1, 2, 2, 5]);
        let all = OutlierPolicy {
            max_ejection_percent: 100,
            ..policy
        };
        assert_eq!(all.ejection_cap(3), 3);
    }

    #[test]
    fn the_share_ramps_linearly_over_the_window() {
        let policy = OutlierPolicy {
            slow_start: Duration::from_secs(10),
            ..OutlierPolicy::default()
        };
        let t0 = Instant::now();
        let at = |s: u64| policy.share(t0, t0 + Duration::from_secs(s));
        assert_eq!(at(0), 0);
        assert_eq!(at(5), FULL_SHARE / 2);
        assert_eq!(at(10), FULL_SHARE);
        assert_eq!(at(60), FULL_SHARE);
        let off = OutlierPolicy::default();
        assert_eq!(off.share(t0, t0), FULL_SHARE);
    }

    #[test]
    fn admits_lets_about_the_share_through_evenly() {
        for share in [0, 100, 512, 900, FULL_SHARE] {
            let passed = (0..10_240).filter(|&p| admits(share, p)).count();
            let expected = share as usize * 10;
            assert!(passed.abs_diff(expected) <= 20, "{share}: {passed}");
        }
        // Evenly: no long run of refusals at half share.
        let longest = (0..1024)
            .map(|p| admits(512, p))
            .collect::<Vec<_>>()
            .split(|&passed| passed)
            .map(<[bool]>::len)
            .max();
        assert!(longest <= Some(3), "{longest:?}");
    }
}

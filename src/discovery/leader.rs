//! The leader election of discovery replicas, as a pure policy: heartbeats
//! heard and the passing of time in, what to do out. Safety is not decided
//! here (the catalog stream's fence refuses a superseded writer); this only
//! decides when to try a takeover and when to stop writing.

use std::time::{Duration, Instant};

use crate::protocol::Leadership;

/// Silence from the leader after which a follower tries to take over: six
/// missed heartbeats, so one late or lost heartbeat never causes a takeover;
/// with the jitter and one tick, a fail-over stays under a second.
pub const TAKEOVER_AFTER: Duration = Duration::from_millis(600);
/// The most each replica adds to [`TAKEOVER_AFTER`], so that followers
/// rarely race for the fence (when they do, the fence picks one).
pub const MAX_JITTER: Duration = Duration::from_millis(150);

/// What a replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    Leader {
        epoch: u64,
        /// When it took over, in milliseconds since the Unix epoch.
        since_ms: u64,
    },
}

/// What [`Election::tick`] asks of the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Wait,
    /// Write the fence, expecting its last sequence to be `expected`.
    TakeOver {
        expected: u64,
    },
    /// The leader cannot hear its own heartbeat: stop writing.
    StepDown,
}

/// One replica's view of the election.
#[derive(Debug)]
pub struct Election {
    replica: String,
    role: Role,
    /// The newest epoch this replica knows of (heartbeats, fence reads,
    /// refused takeovers).
    known_epoch: u64,
    /// A follower: when it last heard the leader (or started waiting). A
    /// leader: when it last heard its own heartbeat.
    heard: Instant,
    jitter: Duration,
    /// No fence was ever written: the first replica takes over at once.
    eager: bool,
}

impl Election {
    /// A follower that has heard nothing yet, knowing the last epoch
    /// stored in the fence (`None`: no replica ever led, so no leader can be
    /// alive and it tries at once).
    pub fn new(replica: String, fence: Option<u64>, now: Instant) -> Election {
        let jitter = jitter(&replica);
        Election {
            replica,
            role: Role::Follower,
            known_epoch: fence.unwrap_or(0),
            heard: now,
            jitter,
            eager: fence.is_none(),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The epoch to write under, when leading.
    pub fn epoch(&self) -> Option<u64> {
        match self.role {
            Role::Leader { epoch, .. } => Some(epoch),
            Role::Follower => None,
        }
    }

    /// A leader heartbeat was heard. Returns true when this replica led and
    /// learned it was superseded (it must stop writing).
    pub fn heard(&mut self, heartbeat: &Leadership, now: Instant) -> bool {
        if let Role::Leader { epoch, .. } = self.role {
            if heartbeat.replica == self.replica && heartbeat.epoch == epoch {
                self.heard = now;
                return false;
            }
        }
        // An older epoch is a superseded leader that has not noticed yet.
        if heartbeat.epoch < self.known_epoch {
            return false;
        }
        self.known_epoch = heartbeat.epoch;
        self.eager = false;
        let superseded = matches!(self.role, Role::Leader { epoch, .. } if epoch < heartbeat.epoch);
        if superseded || self.role == Role::Follower {
            self.role = Role::Follower;
            self.heard = now;
        }
        superseded
    }

    /// What to do at `now`.
    pub fn tick(&self, now: Instant) -> Decision {
        let silence = now.saturating_duration_since(self.heard);
        match self.role {
            Role::Follower if self.eager || silence >= TAKEOVER_AFTER + self.jitter => {
                Decision::TakeOver {
                    expected: self.known_epoch,
                }
            }
            Role::Leader { .. } if silence >= TAKEOVER_AFTER => Decision::StepDown,
            _ => Decision::Wait,
        }
    }

    /// This process stood still until `now` (frozen, starved): the silence
    /// it saw was its own, so it waits a full silence again before taking
    /// over or stepping down. A live leader's next heartbeat then keeps a
    /// follower following, and a superseded leader learns it from the
    /// newer heartbeat or the fence.
    pub fn stalled(&mut self, now: Instant) {
        self.heard = now;
    }

    /// The fence write succeeded: this replica leads under `epoch`.
    pub fn won(&mut self, epoch: u64, since_ms: u64, now: Instant) {
        self.role = Role::Leader { epoch, since_ms };
        self.known_epoch = epoch;
        self.heard = now;
    }

    /// The fence holds `actual` (a refused takeover or a refused write), or
    /// the takeover failed for another reason (`None`): follow, and wait a
    /// full silence again before the next try.
    pub fn follow(&mut self, actual: Option<u64>, now: Instant) {
        // The stream's word is the truth, even when lower: a stream lost
        // and recreated starts its sequences again.
        if let Some(actual) = actual {
            self.known_epoch = actual;
        }
        self.eager = false;
        self.role = Role::Follower;
        self.heard = now;
    }
}

/// A replica's own extra wait, from its name (no random source needed:
/// names differ by host, process id and start time).
fn jitter(replica: &str) -> Duration {
    use std::hash::{DefaultHasher, Hasher};
    let mut hasher = DefaultHasher::new();
    hasher.write(replica.as_bytes());
    let max = MAX_JITTER.as_millis() as u64;
    Duration::from_millis(hasher.finish() % (max + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(replica: &str, epoch: u64) -> Leadership {
        Leadership {
            replica: replica.into(),
            epoch,
            since_ms: 1,
        }
    }

    #[test]
    fn a_follower_takes_over_after_silence_and_not_before() {
        let t0 = Instant::now();
        let mut election = Election::new("b".into(), Some(4), t0);
        let patience = TAKEOVER_AFTER + election.jitter;
        assert!(patience <= TAKEOVER_AFTER + MAX_JITTER);
        assert!(!election.heard(&beat("a", 4), t0 + Duration::from_millis(500)));
        assert_eq!(
            election.tick(t0 + Duration::from_millis(500) + patience - Duration::from_millis(1)),
            Decision::Wait
        );
        assert_eq!(
            election.tick(t0 + Duration::from_millis(500) + patience),
            Decision::TakeOver { expected: 4 }
        );
    }

    #[test]
    fn a_superseded_leader_is_ignored_by_followers_and_steps_down() {
        let t0 = Instant::now();
        let mut follower = Election::new("c".into(), Some(0), t0);
        follower.heard(&beat("b", 7), t0);
        let later = t0 + TAKEOVER_AFTER;
        assert!(!follower.heard(&beat("a", 3), later), "an old epoch");
        assert_eq!(
            follower.tick(later + MAX_JITTER),
            Decision::TakeOver { expected: 7 },
            "the old leader's heartbeat did not count as the leader's"
        );

        let mut old = Election::new("a".into(), Some(0), t0);
        old.won(3, 1, t0);
        assert!(old.heard(&beat("b", 7), t0));
        assert_eq!(old.role(), Role::Follower);
        assert_eq!(old.epoch(), None);
    }

    #[test]
    fn a_leader_that_cannot_hear_itself_steps_down() {
        let t0 = Instant::now();
        let mut election = Election::new("a".into(), Some(0), t0);
        election.won(2, 1, t0);
        assert!(!election.heard(&beat("a", 2), t0 + Duration::from_millis(100)));
        assert_eq!(
            election.tick(t0 + Duration::from_millis(100) + TAKEOVER_AFTER),
            Decision::StepDown
        );
        assert_eq!(
            election.tick(t0 + Duration::from_millis(99) + TAKEOVER_AFTER),
            Decision::Wait
        );
    }

    #[test]
    fn a_stall_is_not_the_leaders_silence() {
        let t0 = Instant::now();
        let mut election = Election::new("b".into(), Some(4), t0);
        election.heard(&beat("a", 4), t0);
        let thawed = t0 + Duration::from_secs(5);
        election.stalled(thawed);
        assert_eq!(election.tick(thawed), Decision::Wait);
        assert_eq!(
            election.tick(thawed + TAKEOVER_AFTER + MAX_JITTER),
            Decision::TakeOver { expected: 4 },
            "a leader still silent a full wait after the thaw is gone"
        );
        let mut leader = Election::new("a".into(), Some(4), t0);
        leader.won(5, 1, t0);
        leader.stalled(thawed);
        assert_eq!(leader.tick(thawed), Decision::Wait);
    }

    #[test]
    fn with_no_fence_ever_written_the_first_replica_tries_at_once() {
        let t0 = Instant::now();
        let mut election = Election::new("a".into(), None, t0);
        assert_eq!(election.tick(t0), Decision::TakeOver { expected: 0 });
        election.follow(Some(1), t0);
        assert_eq!(election.tick(t0), Decision::Wait, "lost: waits like anyone");
    }

    #[test]
    fn a_refused_takeover_learns_the_fence_even_when_lower() {
        let t0 = Instant::now();
        let mut election = Election::new("a".into(), Some(57), t0);
        election.follow(Some(2), t0);
        assert_eq!(
            election.tick(t0 + TAKEOVER_AFTER + MAX_JITTER),
            Decision::TakeOver { expected: 2 },
            "a recreated stream's fence is believed"
        );
    }
}

//! The round-robin set, first step of the balancer: one service's live
//! instances, their weights and their ejection state in ONE immutable
//! snapshot behind one atomic swap, handing the proxy the next instance to
//! try.
//!
//! `next()` is a `load()` plus a `fetch_add` and an index into a precomputed
//! sequence: no lock, no allocation. Everything that changes the set (a
//! catalog snapshot, an ejection, a recovery) builds a new [`ServiceSet`] and
//! swaps it in. Keeping health in the same snapshot as membership means a
//! reader never sees an instance list from one moment paired with health
//! from another.
//!
//! Order: equal weights rotate strictly in `id` order, so each run of N
//! sequential picks reaches each of the N instances once. Unequal weights
//! follow nginx's smooth weighted round-robin, computed once per set.
//!
//! Time is an argument (`now`): ejections expire by the clock the caller
//! passes, so tests need no sleeping.
//!
//! Passive health follows [`super::outlier`]'s policy: each member counts
//! its failures in a row in an atomic of its own (an answer below 500 is
//! one load when nothing failed), and only an ejection builds a new set.
//! Slow start lives in the set too: a member that joined or came back from
//! an ejection carries the instant its ramp began, and a pick that lands on
//! it passes with the probability its share has reached (a hash of the
//! cursor position, [`outlier::admits`]), otherwise the pick moves on.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::uri::Authority;

use super::outlier::{self, Outcome as Attempt, OutlierPolicy, Reason, Streak, FULL_SHARE};
use super::upstream::Upstream;
use crate::metrics::{BalancerMetrics, InstanceMetrics};
use crate::protocol::{Instance, Snapshot};

/// How long an instance that refused a connection stays out of rotation the
/// first time; each further failure without a success in between doubles it.
pub(crate) const FIRST_EJECTION: Duration = Duration::from_secs(1);
/// The longest ejection: an instance that keeps refusing is still retried
/// this often, so it comes back on its own once it listens again.
pub const MAX_EJECTION: Duration = Duration::from_secs(30);

/// The longest precomputed weighted sequence of a small set. The exact
/// smooth weighted round-robin period is `sum(weights) / gcd(weights)`,
/// which with weights up to 10,000 and hundreds of instances would be
/// millions of entries per service (4 bytes each). Beyond this length, or
/// [`SLOTS_PER_INSTANCE`] per instance when that is more, the weights are
/// scaled down proportionally (a non-zero weight stays at least 1), so
/// shares stay within about `instances / MAX_SEQUENCE` of the exact ones
/// while a small set costs at most 32 KiB.
pub const MAX_SEQUENCE: usize = 8192;
/// Sequence slots a big set may spend per instance (4 bytes each): weights
/// whose reduced sum stays within this many per instance (1 to 4, 1 and
/// 10, ...) keep their exact shares at any size.
pub const SLOTS_PER_INSTANCE: usize = 8;

/// One instance as the proxy sees it: where to connect, its kept-alive
/// connections, and whether it is ejected.
#[derive(Debug)]
pub struct Member {
    pub instance: Instance,
    /// `address:port`, parsed once so a request only clones it.
    pub authority: Authority,
    /// Carried into every new set while the address stays the same, so the
    /// connections outlive set changes and close when the instance leaves.
    pub upstream: Arc<Upstream>,
    pub health: Health,
    /// Failures in a row ([`Streak::pack`]ed), counted without a new set.
    streak: AtomicU64,
    /// When its slow start began (joined, or back from an ejection).
    ramp_from: Option<Instant>,
    /// Its request handles, looked up by id on first use and kept: the
    /// handles of an id stay the same while it is in the set.
    handles: OnceLock<Arc<InstanceMetrics>>,
}

impl Member {
    /// Whether the member may take a request at `now`.
    pub(crate) fn is_eligible(&self, now: Instant) -> bool {
        self.health.ejected_until.is_none_or(|until| now >= until)
    }

    /// A copy with `health` and `ramp_from`, carrying the failure streak.
    fn with(&self, health: Health, ramp_from: Option<Instant>) -> Member {
        Member {
            instance: self.instance.clone(),
            authority: self.authority.clone(),
            upstream: self.upstream.clone(),
            health,
            streak: AtomicU64::new(self.streak.load(Ordering::Relaxed)),
            ramp_from,
            handles: self.handles.clone(),
        }
    }

    pub fn id(&self) -> &str {
        &self.instance.id
    }

    /// Its request handles in `metrics`, where its service is number
    /// `index`; `None` until the metrics know the instance.
    pub(crate) fn handles(
        &self,
        metrics: &BalancerMetrics,
        index: usize,
    ) -> Option<&Arc<InstanceMetrics>> {
        if let Some(handles) = self.handles.get() {
            return Some(handles);
        }
        let handles = metrics.instance(index, self.id())?;
        Some(self.handles.get_or_init(|| handles))
    }
}

/// Connection failures seen by this balancer since the member last answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// Failures in a row; 0 when healthy.
    pub failures: u32,
    /// Out of rotation until then.
    pub ejected_until: Option<Instant>,
}

/// The immutable set one service routes on.
#[derive(Debug)]
pub struct ServiceSet {
    service: Arc<str>,
    revision: u64,
    /// In `id` order.
    members: Vec<Arc<Member>>,
    /// Indices into `members`: one period of the rotation. Weight-0 members
    /// never appear.
    sequence: Vec<u32>,
    /// Position of the next pick. Lives in the set so a swap can place the
    /// new set's cursor where the old rotation left off.
    cursor: AtomicUsize,
    /// Whether any member is ejected or ramping; when not, a pick needs no
    /// clock.
    any_held: bool,
    /// Members with a weight above 0.
    live: usize,
    /// When the ejections of this set end, earliest first.
    ejection_ends: Vec<Instant>,
    /// The slow-start window of the rotation this set belongs to.
    policy: OutlierPolicy,
    /// Runtimes serving requests: each instance keeps one pool per worker.
    workers: usize,
}

impl ServiceSet {
    /// The set of a service not seen yet: no instances, revision 0.
    pub fn empty(service: &str) -> Self {
        ServiceSet::empty_with(service, OutlierPolicy::default(), 1)
    }

    fn empty_with(service: &str, policy: OutlierPolicy, workers: usize) -> Self {
        ServiceSet {
            service: Arc::from(service),
            revision: 0,
            members: Vec::new(),
            sequence: Vec::new(),
            cursor: AtomicUsize::new(0),
            any_held: false,
            live: 0,
            ejection_ends: Vec::new(),
            policy,
            workers: workers.max(1),
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

    /// Picks in one full round of the rotation.
    pub fn period(&self) -> usize {
        self.sequence.len()
    }

    /// Members that take traffic (weight above 0), ejected or not.
    pub(crate) fn live_count(&self) -> usize {
        self.live
    }

    /// The first end of an ejection after `now`: when a member of this set
    /// changes state without a new set.
    pub(crate) fn next_ejection_end(&self, now: Instant) -> Option<Instant> {
        let running = self.ejection_ends.partition_point(|&end| end <= now);
        self.ejection_ends.get(running).copied()
    }

    /// Members out of rotation at `now`.
    pub(crate) fn ejected_count(&self, now: Instant) -> usize {
        let running = self.ejection_ends.partition_point(|&end| end <= now);
        self.ejection_ends.len() - running
    }

    /// The next member in rotation at `now`, skipping ejected ones and
    /// thinning ramping ones to their share. When every member with weight
    /// is ejected, the balancer fails open: it returns the next one anyway. An ejection is only this balancer's guess
    /// from a refused connection, and a refused connection costs
    /// microseconds, while refusing to try could turn a fleet that just came
    /// back into a minute of 502s. `None` only when nothing takes traffic.
    pub fn next(&self, now: impl Fn() -> Instant) -> Option<&Arc<Member>> {
        let len = self.sequence.len();
        if len == 0 {
            return None;
        }
        let first = self.cursor.fetch_add(1, Ordering::Relaxed);
        let member = self.at(first);
        if !self.any_held {
            return Some(member);
        }
        let now = now();
        // A ramping member refused every time still beats an ejected one.
        let mut refused = None;
        let mut position = first;
        for step in 0..len {
            if step > 0 {
                position = self.cursor.fetch_add(1, Ordering::Relaxed);
            }
            let candidate = self.at(position);
            if !candidate.is_eligible(now) {
                continue;
            }
            if outlier::admits(self.share_of(candidate, now), position) {
                return Some(candidate);
            }
            refused.get_or_insert(candidate);
        }
        Some(refused.unwrap_or(member))
    }

    /// `member`'s share of its weight at `now`, in 1/[`FULL_SHARE`]ths.
    fn share_of(&self, member: &Member, now: Instant) -> u32 {
        member
            .ramp_from
            .map_or(FULL_SHARE, |since| self.policy.share(since, now))
    }

    fn at(&self, position: usize) -> &Arc<Member> {
        let index = self.sequence[position % self.sequence.len()] as usize;
        &self.members[index]
    }

    fn position_of(&self, id: &str) -> Option<usize> {
        // Members are in `id` order (see `from_snapshot`).
        self.members.binary_search_by(|m| m.id().cmp(id)).ok()
    }

    /// Builds the set for `snapshot`, carrying over from `previous` the
    /// ejection state of members whose address did not change and the place
    /// in the rotation.
    ///
    /// Where the rotation continues: when the sequence is the same (same
    /// ids, same weights: only ejections or unrelated fields changed), the
    /// cursor continues exactly. Otherwise the next pick is the first
    /// member whose id comes after the last one picked, wrapping around. For
    /// equal weights that is exactly "carry on in id order": a joining
    /// instance is visited when its turn in id order comes, and no remaining
    /// instance is skipped or visited twice by the change.
    ///
    /// A member new to a set that had members starts its slow start at
    /// `now`; the first members of a set take their full share at once, as
    /// a balancer that just started has nothing else to send traffic to.
    pub fn from_snapshot(
        snapshot: &Snapshot,
        previous: &ServiceSet,
        now: Instant,
    ) -> (Self, Vec<String>) {
        let mut instances: Vec<&Instance> = snapshot.instances.iter().collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        instances.dedup_by(|a, b| a.id == b.id);
        let mut skipped = Vec::new();
        let mut members = Vec::with_capacity(instances.len());
        // Both in id order: walked side by side, not searched per member.
        let mut old = previous.members.iter().peekable();
        for instance in instances {
            let Ok(authority) = Authority::try_from(instance.authority()) else {
                skipped.push(instance.id.clone());
                continue;
            };
            while old.next_if(|m| m.id() < instance.id.as_str()).is_some() {}
            let kept =
                (old.next_if(|m| m.id() == instance.id)).filter(|m| m.authority == authority);
            let ramp_from = match kept {
                Some(m) => m.ramp_from,
                None if previous.members.is_empty() => None,
                None => Some(now),
            }
            // A finished ramp is dropped so picks stop reading the clock.
            .filter(|&since| previous.policy.share(since, now) < FULL_SHARE);
            let member = match kept {
                // Unchanged: the same member, so a big set's rebuild copies
                // pointers, and whoever compares sets sees it is the same.
                Some(m) if m.instance == *instance && m.ramp_from == ramp_from => m.clone(),
                Some(m) => Arc::new(Member {
                    instance: instance.clone(),
                    ..m.with(m.health, ramp_from)
                }),
                None => Arc::new(Member {
                    instance: instance.clone(),
                    authority,
                    upstream: Arc::new(Upstream::new(
                        &instance.address,
                        instance.port,
                        previous.workers,
                    )),
                    health: Health::default(),
                    streak: AtomicU64::new(0),
                    ramp_from,
                    handles: OnceLock::new(),
                }),
            };
            members.push(member);
        }
        let set = ServiceSet::assemble(
            previous.service.clone(),
            snapshot.revision,
            members,
            previous,
        );
        (set, skipped)
    }

    /// A copy of this set with `id`'s health replaced by `update(health)`.
    /// A new ejection also moves the start of its slow start to the
    /// ejection's end.
    fn with_health(&self, id: &str, update: impl FnOnce(Health) -> Health) -> Option<Self> {
        let index = self.position_of(id)?;
        let mut members = self.members.clone();
        let old = &members[index];
        let health = update(old.health);
        let ramp_from = match health.ejected_until {
            Some(until) if !self.policy.slow_start.is_zero() => Some(until),
            _ => old.ramp_from,
        };
        members[index] = Arc::new(old.with(health, ramp_from));
        Some(ServiceSet::assemble(
            self.service.clone(),
            self.revision,
            members,
            self,
        ))
    }

    fn assemble(
        service: Arc<str>,
        revision: u64,
        members: Vec<Arc<Member>>,
        previous: &ServiceSet,
    ) -> Self {
        let weights: Vec<u32> = members.iter().map(|m| m.instance.weight).collect();
        let sequence = smooth_weighted_sequence(&weights);
        let any_held = members
            .iter()
            .any(|m| m.health.ejected_until.is_some() || m.ramp_from.is_some());
        let cursor = continue_rotation(previous, &members, &sequence);
        let live = members.iter().filter(|m| m.instance.weight > 0).count();
        let mut ejection_ends: Vec<Instant> = members
            .iter()
            .filter_map(|m| m.health.ejected_until)
            .collect();
        ejection_ends.sort_unstable();
        ServiceSet {
            live,
            ejection_ends,
            service,
            revision,
            members,
            sequence,
            cursor: AtomicUsize::new(cursor),
            any_held,
            policy: previous.policy,
            workers: previous.workers,
        }
    }
}

/// Where the new rotation starts, given where the old one is (see
/// [`ServiceSet::from_snapshot`]).
fn continue_rotation(previous: &ServiceSet, members: &[Arc<Member>], sequence: &[u32]) -> usize {
    let old_cursor = previous.cursor.load(Ordering::Relaxed);
    if previous.sequence.is_empty() || sequence.is_empty() {
        return 0;
    }
    let same_rotation = previous.sequence == sequence
        && previous.members.len() == members.len()
        && previous
            .members
            .iter()
            .zip(members)
            .all(|(a, b)| a.id() == b.id() && a.instance.weight == b.instance.weight);
    if same_rotation {
        return old_cursor;
    }
    let last_picked = previous.at(old_cursor.wrapping_sub(1));
    let last_id = last_picked.id();
    sequence
        .iter()
        .position(|&index| members[index as usize].id() > last_id)
        .unwrap_or(0)
}

/// One period of nginx's smooth weighted round-robin over `weights`, as
/// indices, after the weights are reduced ([`reduced_weights`]). Equal
/// weights give plain id order.
pub(crate) fn smooth_weighted_sequence(weights: &[u32]) -> Vec<u32> {
    smooth_weighted(&reduced_weights(weights))
}

/// Members of one weight, in id order, and the picks the class has had.
struct Class {
    weight: i64,
    members: Vec<u32>,
    picks: usize,
}

/// nginx's smooth weighted round-robin, exactly: each step adds every weight
/// to its member's current value, picks the highest current (the first in
/// `id` order on a tie) and takes the total off it.
///
/// Computed one class of equal weights at a time rather than member by
/// member. After `t` steps a member's current value is `t * weight - total
/// * picks`, so members of one weight differ only by whole totals: the
/// highest of a class is the one picked least, the first in id order on a
/// tie, and a class is therefore picked round-robin in id order. Each step
/// compares one candidate per class: O(total * classes), and as `classes`
/// distinct weights sum to at most `total`, classes <= sqrt(2 * total).
fn smooth_weighted(weights: &[u32]) -> Vec<u32> {
    let mut by_weight: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for (index, &weight) in (0u32..).zip(weights) {
        if weight > 0 {
            by_weight.entry(weight).or_default().push(index);
        }
    }
    let mut classes: Vec<Class> = by_weight
        .into_iter()
        .map(|(weight, members)| Class {
            weight: i64::from(weight),
            members,
            picks: 0,
        })
        .collect();
    let total: i64 = classes
        .iter()
        .map(|c| c.weight * c.members.len() as i64)
        .sum();
    let mut sequence = Vec::with_capacity(total as usize);
    for step in 1..=total {
        let mut best: Option<(i64, u32, usize)> = None;
        for (at, class) in classes.iter().enumerate() {
            let len = class.members.len();
            let current = step * class.weight - total * (class.picks / len) as i64;
            let member = class.members[class.picks % len];
            let higher = |&(value, index, _): &(i64, u32, usize)| {
                current > value || (current == value && member < index)
            };
            if best.is_none_or(|b| higher(&b)) {
                best = Some((current, member, at));
            }
        }
        if let Some((_, member, at)) = best {
            classes[at].picks += 1;
            sequence.push(member);
        }
    }
    sequence
}

/// Weights divided by their gcd, then scaled to fit [`MAX_SEQUENCE`] or
/// [`SLOTS_PER_INSTANCE`] per instance, whichever is more.
fn reduced_weights(weights: &[u32]) -> Vec<u32> {
    let divisor = weights
        .iter()
        .copied()
        .filter(|&w| w > 0)
        .fold(0, gcd)
        .max(1);
    let mut reduced: Vec<u32> = weights.iter().map(|w| w / divisor).collect();
    let total: u64 = reduced.iter().map(|&w| u64::from(w)).sum();
    let live = reduced.iter().filter(|&&w| w > 0).count();
    let cap = MAX_SEQUENCE.max(live * SLOTS_PER_INSTANCE) as u64;
    if total > cap {
        for w in &mut reduced {
            if *w > 0 {
                *w = ((u64::from(*w) * cap / total) as u32).max(1);
            }
        }
    }
    reduced
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// How long the `failures`-th failure in a row ejects for.
pub(crate) fn ejection_for(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_EJECTION
        .saturating_mul(1 << doublings)
        .min(MAX_EJECTION)
}

/// A service's current set, swapped whole on every change.
#[derive(Debug)]
pub struct Rotation {
    current: ArcSwap<ServiceSet>,
    /// Serializes writers (the catalog task, ejections, recoveries) so none
    /// loses another's change; readers never touch it.
    write: Mutex<()>,
    policy: OutlierPolicy,
}

impl Rotation {
    pub fn new(service: &str) -> Self {
        Rotation::with_policy(service, OutlierPolicy::default(), 1)
    }

    /// A rotation whose instances keep one connection pool per worker.
    pub(crate) fn with_policy(service: &str, policy: OutlierPolicy, workers: usize) -> Self {
        Rotation {
            current: ArcSwap::from_pointee(ServiceSet::empty_with(service, policy, workers)),
            write: Mutex::new(()),
            policy,
        }
    }

    /// The current set, for one request's picks.
    pub fn load(&self) -> arc_swap::Guard<Arc<ServiceSet>> {
        self.current.load()
    }

    /// The current set, to keep.
    pub(crate) fn load_full(&self) -> Arc<ServiceSet> {
        self.current.load_full()
    }

    /// Replaces the set with `snapshot`. The feed filtered stale revisions
    /// already ([`Held`](crate::subscription::Held)). Returns what happened.
    pub fn apply(&self, snapshot: &Snapshot) -> Outcome {
        self.apply_at(snapshot, tokio::time::Instant::now().into_std())
    }

    /// [`Rotation::apply`] at `now`, when joining members start their slow
    /// start.
    pub(crate) fn apply_at(&self, snapshot: &Snapshot, now: Instant) -> Outcome {
        let _writer = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.current.load_full();
        let (set, skipped) = ServiceSet::from_snapshot(snapshot, &previous, now);
        let membership_changed = previous.members.len() != set.members.len()
            || previous.members.iter().zip(&set.members).any(|(a, b)| {
                a.id() != b.id()
                    || a.authority != b.authority
                    || a.instance.weight != b.instance.weight
            });
        self.current.store(Arc::new(set));
        Outcome::Replaced {
            membership_changed,
            skipped,
        }
    }

    /// Takes `id` out of rotation after a failed connection at `now`, for
    /// longer each ejection in a row. Returns the ejection's length, or
    /// `None` when the instance has left the set meanwhile or the service
    /// already has as many instances out as the policy allows.
    pub fn eject(&self, id: &str, now: Instant) -> Option<Duration> {
        match self.take_out(id, Reason::Connect, now) {
            Report::Ejected { length, .. } => Some(length),
            _ => None,
        }
    }

    /// Feeds the outcome of one attempt at `member` to its passive health:
    /// counts it, ejects when a threshold is crossed (within the ejection
    /// cap), clears the failures after an answer.
    pub fn report(&self, member: &Member, outcome: Attempt, now: Instant) -> Report {
        if outcome == Attempt::Answered {
            // The hot path: one load when nothing had failed.
            if member.streak.load(Ordering::Relaxed) != 0 {
                member.streak.store(0, Ordering::Relaxed);
            }
            if member.health.failures == 0 {
                return Report::Nothing;
            }
            self.recovered(member.id());
            return Report::Recovered;
        }
        let mut crossed = None;
        let _ = member
            .streak
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let (next, reason) = self.policy.record(Streak::unpack(word), outcome);
                crossed = reason;
                Some(next.pack())
            });
        match crossed {
            Some(reason) => self.take_out(member.id(), reason, now),
            None => Report::Nothing,
        }
    }

    /// [`Rotation::report`], counted in `metrics` and logged; `cause` names
    /// what happened.
    pub(crate) fn observe(
        &self,
        metrics: &BalancerMetrics,
        service: &str,
        member: &Member,
        outcome: Attempt,
        cause: &dyn std::fmt::Display,
    ) {
        let report = self.report(member, outcome, tokio::time::Instant::now().into_std());
        if matches!(report, Report::Ejected { .. }) {
            metrics.ejections.inc();
            metrics.ejected.notify_one();
        }
        report.log(service, member, cause);
    }

    /// Ejects `id` unless the cap of ejected members is reached.
    fn take_out(&self, id: &str, reason: Reason, now: Instant) -> Report {
        let _writer = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.current.load_full();
        let out = previous
            .members
            .iter()
            .filter(|m| m.id() != id && m.instance.weight > 0 && !m.is_eligible(now))
            .count();
        if out >= self.policy.ejection_cap(previous.live) {
            return Report::Capped { reason, out };
        }
        let mut length = Duration::ZERO;
        let set = previous.with_health(id, |health| {
            let failures = health.failures.saturating_add(1);
            length = ejection_for(failures);
            Health {
                failures,
                ejected_until: Some(now + length),
            }
        });
        let Some(set) = set else {
            return Report::Gone;
        };
        self.current.store(Arc::new(set));
        Report::Ejected { length, reason }
    }

    /// Clears `id`'s failures after it answered.
    pub(crate) fn recovered(&self, id: &str) {
        let _writer = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.current.load_full();
        if let Some(set) = previous.with_health(id, |_| Health::default()) {
            self.current.store(Arc::new(set));
        }
    }
}

/// What [`Rotation::report`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Counted, nothing else changed.
    Nothing,
    /// An instance that had been ejected answers again.
    Recovered,
    /// Out of rotation for `length`.
    Ejected { length: Duration, reason: Reason },
    /// A threshold was crossed, but `out` instances of the service are
    /// already ejected, as many as the policy allows.
    Capped { reason: Reason, out: usize },
    /// The instance left the set meanwhile.
    Gone,
}

impl Report {
    /// Logs what changed for `member` of `service`; `cause` is the failure
    /// that made the report.
    pub fn log(&self, service: &str, member: &Member, cause: &dyn std::fmt::Display) {
        match self {
            Report::Nothing | Report::Gone => {}
            Report::Recovered => {
                tracing::info!(service = %service, instance = %member.id(), "instance answers again");
            }
            Report::Ejected { length, reason } => tracing::warn!(
                service = %service,
                instance = %member.id(),
                error = %cause,
                %reason,
                ejected_for = ?length,
                "instance ejected"
            ),
            Report::Capped { reason, out } => tracing::warn!(
                service = %service,
                instance = %member.id(),
                error = %cause,
                %reason,
                already_out = out,
                "instance kept in rotation: the ejection cap is reached"
            ),
        }
    }
}

/// The outcome of [`Rotation::apply`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The set was replaced. `skipped` lists instances whose address cannot
    /// be an HTTP authority.
    Replaced {
        membership_changed: bool,
        skipped: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(revision: u64, members: &[(&str, u32)]) -> Snapshot {
        Snapshot {
            service: "web".into(),
            revision,
            instances: members
                .iter()
                .enumerate()
                .map(|(i, (id, weight))| {
                    let mut instance = Instance::new("web", *id, "127.0.0.1", 5000 + i as u16);
                    instance.weight = *weight;
                    instance
                })
                .collect(),
        }
    }

    fn picks(rotation: &Rotation, n: usize, now: Instant) -> Vec<String> {
        (0..n)
            .map(|_| {
                let set = rotation.load();
                set.next(|| now)
                    .map(|m| m.id().to_owned())
                    .unwrap_or_default()
            })
            .collect()
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn equal_weights_rotate_strictly_in_id_order() {
        let rotation = Rotation::new("web");
        // Listed out of order: the set sorts by id.
        rotation.apply(&snapshot(1, &[("c", 1), ("a", 1), ("b", 1)]));
        let now = Instant::now();
        assert_eq!(
            picks(&rotation, 9, now),
            ids(&["a", "b", "c", "a", "b", "c", "a", "b", "c"])
        );
    }

    #[test]
    fn weights_follow_nginx_smooth_weighted_round_robin() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 5), ("b", 1), ("c", 1)]));
        assert_eq!(
            picks(&rotation, 14, Instant::now()),
            ids(&["a", "a", "b", "a", "c", "a", "a", "a", "a", "b", "a", "c", "a", "a"])
        );
    }

    /// nginx's smooth weighted round-robin, step by step over every member.
    fn nginx_reference(weights: &[u32]) -> Vec<u32> {
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut sequence = Vec::new();
        for _ in 0..total {
            let mut best = None;
            for (i, &w) in weights.iter().enumerate().filter(|(_, &w)| w > 0) {
                current[i] += i64::from(w);
                if best.is_none_or(|b: usize| current[i] > current[b]) {
                    best = Some(i);
                }
            }
            if let Some(b) = best {
                current[b] -= total;
                sequence.push(b as u32);
            }
        }
        sequence
    }

    #[test]
    fn mixed_weights_give_exactly_nginx_sequence() {
        // A fixed pseudo-random walk over small sets: sizes 1 to 12, weights
        // 0 to 9, equal weights side by side and apart.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound) as u32
        };
        for _ in 0..2000 {
            let len = 1 + next(12) as usize;
            let weights: Vec<u32> = (0..len).map(|_| next(10)).collect();
            assert_eq!(
                smooth_weighted(&weights),
                nginx_reference(&weights),
                "weights {weights:?}"
            );
        }
        for weights in [&[5, 1, 1][..], &[1, 2, 1, 2, 3], &[4, 4, 1, 4], &[0, 0]] {
            assert_eq!(smooth_weighted(weights), nginx_reference(weights));
        }
    }

    #[test]
    fn a_large_mixed_set_gets_exact_shares() {
        let weights: Vec<u32> = (0..100_000).map(|i| 1 + i % 4).collect();
        let sequence = smooth_weighted_sequence(&weights);
        assert_eq!(sequence.len(), 250_000);
        let mut counts = vec![0u32; weights.len()];
        for &index in &sequence {
            counts[index as usize] += 1;
        }
        assert_eq!(counts, weights);
        // Where the member-by-member reference is still quick enough to
        // run: the same sequence, not only the same shares.
        let some: Vec<u32> = (0..1000).map(|i| [3, 1, 4, 1, 5, 9, 2, 6][i % 8]).collect();
        assert_eq!(smooth_weighted(&some), nginx_reference(&some));
    }

    #[test]
    fn weights_are_reduced_by_their_gcd() {
        assert_eq!(smooth_weighted_sequence(&[10, 20]), vec![1, 0, 1]);
        assert_eq!(smooth_weighted_sequence(&[3, 3, 3]), vec![0, 1, 2]);
    }

    #[test]
    fn long_sequences_are_capped_keeping_shares() {
        let weights = [10_000, 9_999, 9_998, 1];
        let sequence = smooth_weighted_sequence(&weights);
        assert!(sequence.len() <= MAX_SEQUENCE);
        let count = |i: u32| sequence.iter().filter(|&&x| x == i).count();
        assert!(count(3) >= 1, "a non-zero weight keeps at least one slot");
        let share = count(0) as f64 / sequence.len() as f64;
        assert!((share - 10_000.0 / 29_998.0).abs() < 0.01, "share {share}");
        // A big set with a wide range of weights: its per-instance budget
        // (a scaled weight rounds up to 1 at most once per instance).
        let wide: Vec<u32> = (0..10_000).map(|i| 1 + i % 100).collect();
        let sequence = smooth_weighted_sequence(&wide);
        assert!(sequence.len() <= wide.len() * (SLOTS_PER_INSTANCE + 1));
        let heaviest = sequence.iter().filter(|&&i| i == 99).count();
        assert!((15..=17).contains(&heaviest), "{heaviest}");
    }

    #[test]
    fn weight_zero_takes_no_traffic() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 0), ("c", 1)]));
        assert_eq!(
            picks(&rotation, 4, Instant::now()),
            ids(&["a", "c", "a", "c"])
        );
        assert_eq!(rotation.load().live_count(), 2);

        rotation.apply(&snapshot(2, &[("a", 0)]));
        assert!(rotation.load().next(Instant::now).is_none());
    }

    #[test]
    fn an_unknown_service_has_no_instance() {
        let rotation = Rotation::new("web");
        assert!(rotation.load().next(Instant::now).is_none());
    }

    #[test]
    fn a_join_mid_rotation_continues_in_id_order() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("c", 1)]));
        let now = Instant::now();
        assert_eq!(picks(&rotation, 1, now), ids(&["a"]));
        rotation.apply(&snapshot(2, &[("a", 1), ("b", 1), ("c", 1)]));
        assert_eq!(picks(&rotation, 5, now), ids(&["b", "c", "a", "b", "c"]));
    }

    #[test]
    fn a_leave_mid_rotation_skips_no_one_and_repeats_no_one() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 1), ("c", 1), ("d", 1)]));
        let now = Instant::now();
        assert_eq!(picks(&rotation, 2, now), ids(&["a", "b"]));
        // The next one due (c) leaves: d is next, then the rotation wraps.
        rotation.apply(&snapshot(2, &[("a", 1), ("b", 1), ("d", 1)]));
        assert_eq!(picks(&rotation, 4, now), ids(&["d", "a", "b", "d"]));
        // The one picked last (d) leaves: wrap to the first.
        rotation.apply(&snapshot(3, &[("a", 1), ("b", 1)]));
        assert_eq!(picks(&rotation, 3, now), ids(&["a", "b", "a"]));
    }

    #[test]
    fn a_drained_member_is_not_picked_even_failing_open() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 0)]));
        let t0 = Instant::now();
        rotation.eject("a", t0);
        assert_eq!(
            picks(&rotation, 3, t0),
            ids(&["a", "a", "a"]),
            "every member with weight ejected: fail open, but only among them"
        );
    }

    #[test]
    fn ejected_instances_are_skipped_until_the_ejection_ends() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 1), ("c", 1)]));
        let t0 = Instant::now();
        assert_eq!(rotation.eject("b", t0), Some(FIRST_EJECTION));
        assert_eq!(picks(&rotation, 4, t0), ids(&["a", "c", "a", "c"]));
        let later = t0 + FIRST_EJECTION;
        assert_eq!(picks(&rotation, 3, later), ids(&["a", "b", "c"]));
    }

    #[test]
    fn ejections_grow_and_a_success_clears_them() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 1)]));
        let t0 = Instant::now();
        assert_eq!(rotation.eject("a", t0), Some(Duration::from_secs(1)));
        assert_eq!(rotation.eject("a", t0), Some(Duration::from_secs(2)));
        assert_eq!(rotation.eject("a", t0), Some(Duration::from_secs(4)));
        for _ in 0..10 {
            rotation.eject("a", t0);
        }
        assert_eq!(rotation.eject("a", t0), Some(MAX_EJECTION));
        rotation.recovered("a");
        assert_eq!(rotation.load().members()[0].health, Health::default());
        assert_eq!(rotation.eject("a", t0), Some(FIRST_EJECTION));
        assert_eq!(rotation.eject("gone", t0), None);
    }

    #[test]
    fn ejection_survives_an_unrelated_catalog_change_but_not_a_new_address() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 1)]));
        let t0 = Instant::now();
        rotation.eject("a", t0);
        rotation.apply(&snapshot(2, &[("a", 1), ("b", 1), ("c", 1)]));
        assert!(!rotation.load().members()[0].is_eligible(t0));

        let mut moved = snapshot(3, &[("a", 1), ("b", 1), ("c", 1)]);
        moved.instances[0].port = 6000;
        rotation.apply(&moved);
        assert!(rotation.load().members()[0].is_eligible(t0));
    }

    #[test]
    fn all_ejected_fails_open_in_rotation() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 1)]));
        let t0 = Instant::now();
        rotation.eject("a", t0);
        rotation.eject("b", t0);
        let got = picks(&rotation, 2, t0);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|id| id == "a" || id == "b"), "{got:?}");
    }

    #[test]
    fn an_ejection_keeps_the_place_in_the_rotation() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 1), ("c", 1)]));
        let t0 = Instant::now();
        assert_eq!(picks(&rotation, 1, t0), ids(&["a"]));
        rotation.eject("c", t0);
        rotation.recovered("c");
        assert_eq!(picks(&rotation, 3, t0), ids(&["b", "c", "a"]));
    }

    #[test]
    fn a_weight_change_continues_after_the_last_pick() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 1), ("c", 1)]));
        let t0 = Instant::now();
        assert_eq!(picks(&rotation, 1, t0), ids(&["a"]));
        rotation.apply(&snapshot(2, &[("a", 2), ("b", 1), ("c", 1)]));
        let next = picks(&rotation, 1, t0);
        assert_ne!(next, ids(&["a"]), "a was just picked; {next:?}");
    }

    fn member(rotation: &Rotation, id: &str) -> Arc<Member> {
        let set = rotation.load();
        set.members()[set.position_of(id).expect("member")].clone()
    }

    fn report_n(
        rotation: &Rotation,
        id: &str,
        outcome: Attempt,
        n: usize,
        now: Instant,
    ) -> Vec<Report> {
        (0..n)
            .map(|_| rotation.report(&member(rotation, id), outcome, now))
            .collect()
    }

    fn shares(
        rotation: &Rotation,
        n: usize,
        now: Instant,
    ) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for id in picks(rotation, n, now) {
            *counts.entry(id).or_default() += 1;
        }
        counts
    }

    #[test]
    fn five_5xx_in_a_row_eject_and_an_answer_clears_the_streak() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 1), ("c", 1)]));
        let t0 = Instant::now();
        let reports = report_n(&rotation, "b", Attempt::ServerError, 4, t0);
        assert!(reports.iter().all(|r| *r == Report::Nothing), "{reports:?}");
        assert_eq!(
            rotation.report(&member(&rotation, "b"), Attempt::Answered, t0),
            Report::Nothing
        );
        report_n(&rotation, "b", Attempt::ServerError, 4, t0);
        assert_eq!(
            rotation.report(&member(&rotation, "b"), Attempt::ServerError, t0),
            Report::Ejected {
                length: FIRST_EJECTION,
                reason: Reason::ServerErrors(5)
            }
        );
        assert_eq!(picks(&rotation, 4, t0), ids(&["a", "c", "a", "c"]));
        // Back, failing again: the growing ejection goes on.
        let later = t0 + FIRST_EJECTION;
        let reports = report_n(&rotation, "b", Attempt::GatewayFailure, 3, later);
        assert_eq!(
            reports[2],
            Report::Ejected {
                length: 2 * FIRST_EJECTION,
                reason: Reason::GatewayFailures(3)
            }
        );
    }

    #[test]
    fn no_more_than_the_capped_share_is_ejected_at_once() {
        let rotation = Rotation::new("web");
        rotation.apply(&snapshot(1, &[("a", 1), ("b", 1), ("c", 1), ("d", 1)]));
        let t0 = Instant::now();
        assert!(rotation.eject("a", t0).is_some());
        assert!(rotation.eject("b", t0).is_some());
        let reports = report_n(&rotation, "c", Attempt::ServerError, 5, t0);
        assert_eq!(
            reports[4],
            Report::Capped {
                reason: Reason::ServerErrors(5),
                out: 2
            }
        );
        assert_eq!(rotation.eject("d", t0), None);
        assert_eq!(picks(&rotation, 4, t0), ids(&["c", "d", "c", "d"]));
        // Once one is back, another may go.
        let later = t0 + FIRST_EJECTION;
        assert!(rotation.eject("d", later).is_some());
    }

    fn slow(window: u64) -> Rotation {
        Rotation::with_policy(
            "web",
            OutlierPolicy {
                slow_start: Duration::from_secs(window),
                ..OutlierPolicy::default()
            },
            1,
        )
    }

    #[test]
    fn a_joining_instance_ramps_its_share_over_the_slow_start_window() {
        let rotation = slow(10);
        let t0 = Instant::now();
        rotation.apply_at(&snapshot(1, &[("a", 1), ("b", 1)]), t0);
        // The first members take their full share at once.
        assert_eq!(shares(&rotation, 100, t0)["a"], 50);
        rotation.apply_at(&snapshot(2, &[("a", 1), ("b", 1), ("c", 1)]), t0);
        let share_of_c = |secs: u64| {
            let at = t0 + Duration::from_secs(secs);
            shares(&rotation, 3000, at).get("c").copied().unwrap_or(0)
        };
        let ramp: Vec<usize> = [0, 2, 5, 8, 10].map(share_of_c).into();
        assert_eq!(ramp[0], 0, "{ramp:?}");
        assert!(ramp.windows(2).all(|w| w[0] < w[1]), "{ramp:?}");
        assert_eq!(ramp[4], 1000, "the full share at the end: {ramp:?}");
        // Halfway, about half of its full third (thinned picks go on to the next).
        assert!((450..=650).contains(&ramp[2]), "{ramp:?}");
    }

    #[test]
    fn an_instance_back_from_ejection_ramps_from_the_ejection_end() {
        let rotation = slow(10);
        let t0 = Instant::now();
        rotation.apply_at(&snapshot(1, &[("a", 1), ("b", 1)]), t0);
        rotation.eject("b", t0);
        let back = t0 + FIRST_EJECTION;
        assert_eq!(shares(&rotation, 100, back).get("b"), None);
        let half = shares(&rotation, 1000, back + Duration::from_secs(5))["b"];
        assert!((250..=400).contains(&half), "{half}");
        let full = shares(&rotation, 1000, back + Duration::from_secs(10))["b"];
        assert_eq!(full, 500);
    }

    #[test]
    fn a_lone_ramping_instance_still_takes_requests() {
        let rotation = slow(10);
        let t0 = Instant::now();
        rotation.apply_at(&snapshot(1, &[("a", 1)]), t0);
        rotation.apply_at(&snapshot(2, &[("a", 1), ("b", 1)]), t0);
        rotation.eject("a", t0);
        assert_eq!(picks(&rotation, 3, t0), ids(&["b", "b", "b"]));
    }
}

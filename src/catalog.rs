//! The fold: validated events and the passing of time turn into the
//! live catalog, and into the [`Change`]s that discovery publishes as snapshots.
//!
//! Pure: state, event and `now` in, changes out. No clock, no NATS, no tasks.
//!
//! Revisions are a hybrid logical clock: each change takes
//! `max(previous + 1, clock)`, where the caller sets `clock` to the wall
//! clock in microseconds ([`Catalog::set_clock`]). So a revision strictly
//! increases per service, and a discovery that lost the stored catalog (and
//! its own memory of it) still starts above every revision a balancer holds.
//! Expiry is kept per instance in a deadline heap, so the caller can sleep
//! until [`Catalog::next_deadline`] instead of scanning.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::protocol::{Event, Instance, Operator, Override, OverrideChange, Snapshot};

mod record;

use record::Record;

/// What one event or one expiry did to the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub service: String,
    pub id: String,
    pub kind: ChangeKind,
    /// The service's revision after this change.
    pub revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The instance was not live and now is.
    Joined,
    /// A live instance announced a different record (address, port, weight…).
    Updated,
    /// The instance said goodbye.
    Deregistered,
    /// Nothing was heard from the instance for its `ttl_ms`.
    Expired,
    /// An operator drained, undrained, weighted or cleared it.
    Overridden,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Joined => "joined",
            ChangeKind::Updated => "updated",
            ChangeKind::Deregistered => "deregistered",
            ChangeKind::Expired => "expired",
            ChangeKind::Overridden => "overridden",
        }
    }
}

/// Two senders announcing one instance id with different records: the
/// record flips back to the one it replaced, every heartbeat. Reported once
/// per pair of records, for the caller to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conflict {
    pub service: String,
    pub id: String,
    /// The record held now and the one it replaced, which it replaced before.
    pub records: [Instance; 2],
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [now, before] = &self.records;
        write!(
            f,
            "two senders announce {}/{} with different records ({} and {}); \
             the catalog flips between them at every heartbeat: give each its own id",
            self.service,
            self.id,
            now.authority(),
            before.authority()
        )
    }
}

/// An override for an instance the catalog does not hold: it changes
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{service}/{id} is not a live instance; an override applies only to a registered one (`rollcall catalog {service}` lists them)")]
pub struct NotLive {
    pub service: String,
    pub id: String,
}

/// What operators set on one live instance, kept beside (never inside) the
/// instance's own record, so heartbeats replace the record and leave this.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    drain: bool,
    weight: Option<u32>,
    by: String,
    at_ms: u64,
}

impl From<Operator> for Held {
    fn from(operator: Operator) -> Held {
        Held {
            drain: operator.drain,
            weight: operator.weight,
            by: operator.by,
            at_ms: operator.at_ms,
        }
    }
}

impl Held {
    /// What `change` leaves. Once nothing is overridden it stays as a
    /// marker of when that was (see [`Held::is_set`]), so a takeover can
    /// tell a lifted override from one it missed.
    fn after(held: Option<&Held>, change: OverrideChange, by: &str, at_ms: u64) -> Held {
        let (drain, weight) = Held::key(held);
        let (drain, weight) = match change {
            OverrideChange::Drain => (true, weight),
            OverrideChange::Undrain => (false, weight),
            OverrideChange::Weight(set) => (drain, set),
            OverrideChange::Clear => (false, None),
        };
        Held {
            drain,
            weight,
            by: by.to_owned(),
            at_ms,
        }
    }

    /// Whether it overrides anything (a lifted override does not).
    fn is_set(&self) -> bool {
        self.drain || self.weight.is_some()
    }

    fn key(held: Option<&Held>) -> (bool, Option<u32>) {
        held.map_or((false, None), |h| (h.drain, h.weight))
    }

    /// Whether `other` overrides the same way (who and when aside).
    fn same_as(held: Option<&Held>, other: &Held) -> bool {
        Held::key(held) == Held::key(Some(other))
    }
}

/// What an override did: the instance as it now stands (its override
/// merged in), and the change, `None` when it left things as they were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overridden {
    pub instance: Instance,
    pub change: Option<Change>,
}

/// Whether a conflict was seen for an instance's current pair of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ConflictState {
    #[default]
    None,
    /// Seen at the last update, not yet taken by the caller.
    New,
    /// Taken: stays quiet while the same two records keep flipping.
    Reported,
}

impl ConflictState {
    /// The state after an update that did (`flipped_back`) or did not bring
    /// back the record before the last one.
    fn after_update(self, flipped_back: bool) -> ConflictState {
        match (self, flipped_back) {
            (_, false) => ConflictState::None,
            (ConflictState::None, true) => ConflictState::New,
            (state, true) => state,
        }
    }
}

/// A digest of an event's payload bytes, for [`Catalog::refresh`]: equal
/// digests stand for equal payloads (a collision needs about 2^64 tries).
pub fn payload_digest(payload: &[u8]) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut hasher = DefaultHasher::new();
    hasher.write(payload);
    hasher.finish()
}

/// One live instance. Its service and id are the keys it is found by.
#[derive(Debug)]
struct Live {
    /// Its own record, as it announced it.
    record: Record,
    /// A digest of the payload that last carried this record, so a repeated
    /// heartbeat can be recognised without parsing it.
    digest: Option<u64>,
    deadline: Instant,
    /// The deadline of this instance's entry in the heap; the one entry that
    /// counts when several were pushed.
    scheduled: Instant,
    /// The record the last update replaced; boxed, as most instances never
    /// change and pay only a null pointer for it.
    previous: Option<Box<Record>>,
    conflict: ConflictState,
    /// The operators' override, if any; boxed, as most instances never
    /// have one.
    held: Option<Box<Held>>,
}

impl Live {
    fn new(record: Record, deadline: Instant) -> Live {
        Live {
            record,
            digest: None,
            deadline,
            scheduled: deadline,
            previous: None,
            conflict: ConflictState::None,
            held: None,
        }
    }

    /// An instance as a stored snapshot lists it: its `operator` block
    /// becomes the override again, and its own weight its record's.
    fn stored(mut instance: Instance, deadline: Instant) -> Live {
        let held = instance.operator.take().map(|operator| {
            instance.weight = operator.own_weight;
            Box::new(Held::from(operator))
        });
        Live {
            held,
            ..Live::new(Record::new(&instance), deadline)
        }
    }

    /// The record as snapshots show it: the override merged over the
    /// instance's own, `weight` the effective one.
    fn effective(&self, service: &str, id: &str) -> Instance {
        let mut instance = self.record.instance(service, id);
        if let Some(held) = self.held.as_ref().filter(|h| h.is_set()) {
            let own_weight = instance.weight;
            instance.weight = match (held.drain, held.weight) {
                (true, _) => 0,
                (false, weight) => weight.unwrap_or(own_weight),
            };
            instance.operator = Some(Operator {
                drain: held.drain,
                weight: held.weight,
                own_weight,
                by: held.by.clone(),
                at_ms: held.at_ms,
            });
        }
        instance
    }

    /// Takes a different record in, keeping the one it replaces.
    fn update(&mut self, record: Record) {
        let flipped_back = self.previous.as_deref() == Some(&record);
        let replaced = std::mem::replace(&mut self.record, record);
        self.previous = Some(Box::new(replaced));
        self.conflict = self.conflict.after_update(flipped_back);
    }
}

#[derive(Debug)]
struct ServiceEntry {
    /// The service's name, shared by its expiry heap entries.
    name: Arc<str>,
    revision: u64,
    instances: BTreeMap<Arc<str>, Live>,
    /// Instances seen leaving (deregistered, expired), each until a TTL
    /// after it left: a stored snapshot written before it left must not
    /// bring it back ([`Catalog::adopt_unknown`]).
    departed: HashMap<Arc<str>, Instant>,
    /// The size of `departed` at which the tombstones past their time are
    /// swept out (doubling, so sweeping costs O(1) per departure).
    sweep_at: usize,
}

/// The fewest tombstones of a service before any is swept out.
const MIN_SWEEP: usize = 64;

impl ServiceEntry {
    fn new(name: Arc<str>) -> ServiceEntry {
        ServiceEntry {
            name,
            revision: 0,
            instances: BTreeMap::new(),
            departed: HashMap::new(),
            sweep_at: 0,
        }
    }

    /// Remembers that `live` left at `now`.
    fn departed(&mut self, id: Arc<str>, live: &Live, now: Instant) {
        self.departed.insert(id, now + live.record.ttl());
        if self.departed.len() >= self.sweep_at {
            self.departed.retain(|_, until| *until > now);
            self.sweep_at = (self.departed.len() * 2).max(MIN_SWEEP);
        }
    }

    /// Whether `id` was seen leaving less than a TTL before `now`.
    fn left_recently(&self, id: &str, now: Instant) -> bool {
        self.departed.get(id).is_some_and(|until| *until > now)
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            service: self.name.to_string(),
            revision: self.revision,
            instances: self
                .instances
                .iter()
                .map(|(id, live)| live.effective(&self.name, id))
                .collect(),
        }
    }
}

/// An expiry heap entry: when, which service, which instance.
type Due = (Instant, Arc<str>, Arc<str>);

/// The live catalog of every service.
#[derive(Debug, Default)]
pub struct Catalog {
    services: HashMap<Arc<str>, ServiceEntry>,
    /// Earliest-first expiry candidates. A heartbeat only moves an instance's
    /// `deadline`; its heap entry is checked, and pushed again if it moved,
    /// when it comes due. So a heartbeat costs no heap work. The names are
    /// the ones the maps hold, shared.
    deadlines: BinaryHeap<Reverse<Due>>,
    live: usize,
    /// The floor of the next revision (wall-clock microseconds); 0 keeps
    /// revisions counting 1, 2, 3.
    clock: u64,
}

/// The entry of `service`, made if it is new.
fn service_entry<'a>(
    services: &'a mut HashMap<Arc<str>, ServiceEntry>,
    service: &str,
) -> &'a mut ServiceEntry {
    let name: Arc<str> = Arc::from(service);
    services
        .entry(Arc::clone(&name))
        .or_insert_with(|| ServiceEntry::new(name))
}

/// The revision after `previous` when the clock reads `clock`.
fn next_revision(previous: u64, clock: u64) -> u64 {
    previous.saturating_add(1).max(clock)
}

impl Catalog {
    pub fn new() -> Self {
        Catalog::default()
    }

    /// Sets the floor of the revisions of the changes that follow.
    pub fn set_clock(&mut self, clock: u64) {
        self.clock = clock;
    }

    /// Takes in a snapshot stored by another writer (a new leader adopting
    /// its predecessor's catalog): instances it does not know join with a
    /// fresh TTL, unless this catalog saw them leave less than a TTL ago (the
    /// snapshot was stored before they left); known ones keep their record
    /// and deadline, and revisions continue above the stored one. Returns
    /// whether this catalog now differs from the stored snapshot, so it must
    /// be written.
    pub(crate) fn adopt_unknown(&mut self, stored: &Snapshot, now: Instant) -> bool {
        let entry = self.services.get(stored.service.as_str());
        let unknown: Vec<Instance> = stored
            .instances
            .iter()
            .filter(|i| {
                entry.is_none_or(|e| {
                    !e.instances.contains_key(i.id.as_str()) && !e.left_recently(&i.id, now)
                })
            })
            .cloned()
            .collect();
        self.take_newer_overrides(stored);
        self.adopt(
            Snapshot {
                service: stored.service.clone(),
                revision: stored.revision,
                instances: unknown,
            },
            now,
        );
        self.snapshot(&stored.service)
            .is_some_and(|own| own.instances != stored.instances)
    }

    /// Takes, for instances this catalog knows, the overrides `stored`
    /// carries that were set after this catalog's own: one this replica
    /// missed while it followed (disconnected, say) is not lost on takeover.
    /// An override lifted here (undrained, cleared) counts as set when it
    /// was lifted, so a lift newer than the stored override stands. One this
    /// catalog holds and `stored` lacks is kept: a clear the old leader
    /// stored cannot be told from a write it never made, and an override
    /// kept is the safer error (an operator sees it and clears it again).
    fn take_newer_overrides(&mut self, stored: &Snapshot) {
        let Some(entry) = self.services.get_mut(stored.service.as_str()) else {
            return;
        };
        for instance in &stored.instances {
            let (Some(operator), Some(live)) = (
                &instance.operator,
                entry.instances.get_mut(instance.id.as_str()),
            ) else {
                continue;
            };
            if live
                .held
                .as_ref()
                .is_none_or(|held| held.at_ms < operator.at_ms)
            {
                live.held = Some(Box::new(Held::from(operator.clone())));
            }
        }
    }

    /// Gives `service` a new revision without a change: for a snapshot that
    /// must be written again when it is not known whether the first write
    /// was stored, so no two stored snapshots share a revision.
    pub(crate) fn bump(&mut self, service: &str) {
        if let Some(entry) = self.services.get_mut(service) {
            entry.revision = next_revision(entry.revision, self.clock);
        }
    }

    /// Takes in a snapshot kept from an earlier run: its instances count as
    /// just heard, keep their overrides (an `operator` block), and the
    /// service's revisions continue from it. Returns no change: nothing
    /// changed for anyone who saw that snapshot.
    pub fn adopt(&mut self, snapshot: Snapshot, now: Instant) {
        let entry = service_entry(&mut self.services, &snapshot.service);
        entry.revision = entry.revision.max(snapshot.revision);
        for instance in snapshot.instances {
            let deadline = now + instance.ttl();
            let id: Arc<str> = Arc::from(instance.id.as_str());
            let live = Live::stored(instance, deadline);
            if entry.instances.insert(Arc::clone(&id), live).is_none() {
                self.live += 1;
            }
            self.deadlines
                .push(Reverse((deadline, Arc::clone(&entry.name), id)));
        }
    }

    /// Folds one event in. A heartbeat or register that changes nothing but
    /// the deadline returns `None`.
    pub fn apply(&mut self, event: Event, now: Instant) -> Option<Change> {
        match event {
            Event::Register(instance) | Event::Heartbeat(instance) => self.upsert(instance, now),
            Event::Deregister { service, id } => {
                let entry = self.services.get_mut(service.as_str())?;
                let (key, live) = entry.instances.remove_entry(id.as_str())?;
                entry.departed(key, &live, now);
                self.live -= 1;
                entry.revision = next_revision(entry.revision, self.clock);
                Some(Change {
                    revision: entry.revision,
                    service,
                    id,
                    kind: ChangeKind::Deregistered,
                })
            }
        }
    }

    /// Folds one operator override in, stamped `at_ms` (milliseconds since
    /// the Unix epoch). One that leaves the override as it was (a second
    /// drain) is no change; one for an instance that is not live changes
    /// nothing and is an error.
    pub fn apply_override(
        &mut self,
        request: &Override,
        at_ms: u64,
    ) -> Result<Overridden, NotLive> {
        let not_live = || NotLive {
            service: request.service.clone(),
            id: request.id.clone(),
        };
        let entry = self
            .services
            .get_mut(request.service.as_str())
            .ok_or_else(not_live)?;
        let live = entry
            .instances
            .get_mut(request.id.as_str())
            .ok_or_else(not_live)?;
        let held = Held::after(live.held.as_deref(), request.change, &request.by, at_ms);
        if Held::same_as(live.held.as_deref(), &held) {
            return Ok(Overridden {
                instance: live.effective(&request.service, &request.id),
                change: None,
            });
        }
        live.held = Some(Box::new(held));
        entry.revision = next_revision(entry.revision, self.clock);
        Ok(Overridden {
            instance: live.effective(&request.service, &request.id),
            change: Some(Change {
                service: request.service.clone(),
                id: request.id.clone(),
                kind: ChangeKind::Overridden,
                revision: entry.revision,
            }),
        })
    }

    fn upsert(&mut self, instance: Instance, now: Instant) -> Option<Change> {
        let deadline = now + instance.ttl();
        // The lookup by &str first: the common case, an event of a known
        // service, allocates nothing.
        let entry = match self.services.get_mut(instance.service.as_str()) {
            Some(entry) => entry,
            None => service_entry(&mut self.services, &instance.service),
        };
        if let Some(live) = entry.instances.get_mut(instance.id.as_str()) {
            live.deadline = deadline;
            if deadline < live.scheduled {
                // The TTL shrank: the heap entry would fire late.
                live.scheduled = deadline;
                self.deadlines.push(Reverse((
                    deadline,
                    Arc::clone(&entry.name),
                    Arc::from(instance.id.as_str()),
                )));
            }
            if live.record.matches(&instance) {
                return None;
            }
            live.update(Record::new(&instance));
            entry.revision = next_revision(entry.revision, self.clock);
            return Some(Change {
                service: instance.service,
                id: instance.id,
                kind: ChangeKind::Updated,
                revision: entry.revision,
            });
        }
        let id: Arc<str> = Arc::from(instance.id.as_str());
        entry.departed.remove(&id);
        entry
            .instances
            .insert(Arc::clone(&id), Live::new(Record::new(&instance), deadline));
        entry.revision = next_revision(entry.revision, self.clock);
        self.live += 1;
        self.deadlines
            .push(Reverse((deadline, Arc::clone(&entry.name), id)));
        Some(Change {
            service: instance.service,
            id: instance.id,
            kind: ChangeKind::Joined,
            revision: entry.revision,
        })
    }

    /// The fast path of a heartbeat that repeats the last one byte for byte:
    /// when `service`/`id` is live and [`Catalog::set_digest`] recorded
    /// `digest` for it, only its deadline moves, and `true` says the event
    /// is fully handled (it changed nothing). Otherwise nothing is touched.
    pub fn refresh(&mut self, service: &str, id: &str, digest: u64, now: Instant) -> bool {
        let Some(live) = self
            .services
            .get_mut(service)
            .and_then(|entry| entry.instances.get_mut(id))
        else {
            return false;
        };
        if live.digest != Some(digest) {
            return false;
        }
        live.deadline = now + live.record.ttl();
        true
    }

    /// Records the digest of the payload whose record `service`/`id` now
    /// holds (after [`Catalog::apply`] of that payload's event).
    pub fn set_digest(&mut self, service: &str, id: &str, digest: u64) {
        if let Some(live) = self
            .services
            .get_mut(service)
            .and_then(|entry| entry.instances.get_mut(id))
        {
            live.digest = Some(digest);
        }
    }

    /// The conflict an [`ChangeKind::Updated`] change revealed, once: when
    /// the update brought back the record its predecessor replaced, two
    /// senders claim the id. `None` for every other change, and for later
    /// flips between the same two records.
    pub(crate) fn take_conflict(&mut self, change: &Change) -> Option<Conflict> {
        if change.kind != ChangeKind::Updated {
            return None;
        }
        let (service, id) = (change.service.as_str(), change.id.as_str());
        let live = self.services.get_mut(service)?.instances.get_mut(id)?;
        if live.conflict != ConflictState::New {
            return None;
        }
        live.conflict = ConflictState::Reported;
        let before = live.previous.as_deref()?.instance(service, id);
        Some(Conflict {
            service: change.service.clone(),
            id: change.id.clone(),
            records: [live.record.instance(service, id), before],
        })
    }

    /// Removes every instance whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        while let Some(Reverse((due, _, _))) = self.deadlines.peek() {
            if *due > now {
                break;
            }
            let Some(Reverse((due, service, id))) = self.deadlines.pop() else {
                break;
            };
            let Some(entry) = self.services.get_mut(&service) else {
                continue;
            };
            let Some(live) = entry.instances.get_mut(&id) else {
                continue;
            };
            if live.scheduled != due {
                continue;
            }
            if live.deadline > now {
                live.scheduled = live.deadline;
                self.deadlines.push(Reverse((live.deadline, service, id)));
                continue;
            }
            if let Some(live) = entry.instances.remove(&id) {
                entry.departed(Arc::clone(&id), &live, now);
            }
            self.live -= 1;
            entry.revision = next_revision(entry.revision, self.clock);
            changes.push(Change {
                revision: entry.revision,
                service: service.to_string(),
                id: id.to_string(),
                kind: ChangeKind::Expired,
            });
        }
        changes
    }

    /// Counts every live instance as heard at `now`: for when the caller could
    /// not hear anything for a while (its NATS connection was down), so
    /// silence was not the instances' fault.
    pub(crate) fn refresh_all(&mut self, now: Instant) {
        for entry in self.services.values_mut() {
            for live in entry.instances.values_mut() {
                live.deadline = live.deadline.max(now + live.record.ttl());
            }
        }
    }

    /// When [`Catalog::expire`] should run next: never later than the
    /// earliest deadline, sometimes earlier (a heartbeat moved it).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((due, _, _))| *due)
    }

    /// The current snapshot of one service, if it was ever seen.
    pub fn snapshot(&self, service: &str) -> Option<Snapshot> {
        self.services.get(service).map(ServiceEntry::snapshot)
    }

    /// One live instance as snapshots show it: its override merged in.
    pub fn effective(&self, service: &str, id: &str) -> Option<Instance> {
        self.services
            .get(service)?
            .instances
            .get(id)
            .map(|live| live.effective(service, id))
    }

    /// One live instance's own record, as it announced it.
    pub fn instance(&self, service: &str, id: &str) -> Option<Instance> {
        self.services
            .get(service)?
            .instances
            .get(id)
            .map(|live| live.record.instance(service, id))
    }

    /// `address:port` of one live instance, for a log line: cheaper than
    /// [`Catalog::instance`], which unpacks the whole record.
    pub fn authority(&self, service: &str, id: &str) -> Option<String> {
        self.services
            .get(service)?
            .instances
            .get(id)
            .map(|live| live.record.authority())
    }

    /// Every service's snapshot, sorted by service name.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        let mut all: Vec<Snapshot> = self.services.values().map(ServiceEntry::snapshot).collect();
        all.sort_by(|a, b| a.service.cmp(&b.service));
        all
    }

    /// The revision of `service`, if it was ever seen.
    pub fn revision(&self, service: &str) -> Option<u64> {
        self.services.get(service).map(|entry| entry.revision)
    }

    /// Live instances of one service.
    pub fn live_in(&self, service: &str) -> usize {
        self.services
            .get(service)
            .map_or(0, |entry| entry.instances.len())
    }

    /// Live instances across all services.
    pub fn live_instances(&self) -> usize {
        self.live
    }

    /// Services ever seen, including those with no live instance.
    pub fn services(&self) -> usize {
        self.services.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn instance(service: &str, id: &str, port: u16) -> Instance {
        Instance::new(service, id, "127.0.0.1", port)
    }

    fn ids(catalog: &Catalog, service: &str) -> Vec<String> {
        catalog
            .snapshot(service)
            .map(|s| s.instances.into_iter().map(|i| i.id).collect())
            .unwrap_or_default()
    }

    #[test]
    fn register_joins_and_heartbeat_without_change_is_silent() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        let change = catalog
            .apply(Event::Register(instance("web", "a", 1)), t0)
            .expect("a new instance is a change");
        assert_eq!(change.kind, ChangeKind::Joined);
        assert_eq!(change.revision, 1);
        assert_eq!(
            catalog.apply(Event::Heartbeat(instance("web", "a", 1)), t0),
            None
        );
        assert_eq!(
            catalog.apply(Event::Register(instance("web", "a", 1)), t0),
            None
        );
        assert_eq!(catalog.snapshot("web").unwrap().revision, 1);
    }

    #[test]
    fn first_heartbeat_also_joins() {
        let mut catalog = Catalog::new();
        let change = catalog
            .apply(Event::Heartbeat(instance("web", "a", 1)), Instant::now())
            .unwrap();
        assert_eq!(change.kind, ChangeKind::Joined);
    }

    #[test]
    fn heartbeat_extends_the_deadline() {
        let t0 = Instant::now();
        let ttl = Duration::from_millis(3000);
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        let t1 = t0 + Duration::from_millis(2000);
        catalog.apply(Event::Heartbeat(instance("web", "a", 1)), t1);
        assert!(
            catalog.expire(t0 + ttl).is_empty(),
            "deadline moved to t1+ttl"
        );
        assert_eq!(ids(&catalog, "web"), ["a"]);
        assert!(catalog.next_deadline().unwrap() > t0 + ttl);
        let changes = catalog.expire(t1 + ttl);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].kind, ChangeKind::Expired);
        assert!(ids(&catalog, "web").is_empty());
    }

    #[test]
    fn expiry_happens_exactly_at_the_deadline() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        let mut short = instance("web", "a", 1);
        short.ttl_ms = 500;
        catalog.apply(Event::Register(short), t0);
        assert_eq!(
            catalog.next_deadline(),
            Some(t0 + Duration::from_millis(500))
        );
        assert!(catalog
            .expire(t0 + Duration::from_millis(500) - Duration::from_nanos(1))
            .is_empty());
        let changes = catalog.expire(t0 + Duration::from_millis(500));
        assert_eq!(
            changes,
            vec![Change {
                service: "web".into(),
                id: "a".into(),
                kind: ChangeKind::Expired,
                revision: 2
            }]
        );
        assert_eq!(catalog.next_deadline(), None);
        assert_eq!(catalog.live_instances(), 0);
    }

    #[test]
    fn a_shrunk_ttl_expires_on_the_new_deadline() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        let mut short = instance("web", "a", 1);
        short.ttl_ms = 200;
        let change = catalog.apply(Event::Heartbeat(short), t0).unwrap();
        assert_eq!(change.kind, ChangeKind::Updated);
        assert_eq!(
            catalog.next_deadline(),
            Some(t0 + Duration::from_millis(200))
        );
        assert_eq!(catalog.expire(t0 + Duration::from_millis(200)).len(), 1);
        assert!(catalog.expire(t0 + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn refresh_all_forgives_a_blind_spell() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        let back = t0 + Duration::from_secs(10);
        catalog.refresh_all(back);
        assert!(catalog.expire(back).is_empty());
        assert!(catalog
            .expire(back + Duration::from_millis(2999))
            .is_empty());
        assert_eq!(catalog.expire(back + Duration::from_secs(3)).len(), 1);
    }

    #[test]
    fn a_repeated_payload_only_moves_the_deadline() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        assert!(!catalog.refresh("web", "a", 7, t0), "unknown instance");
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        assert!(
            !catalog.refresh("web", "a", 7, t0),
            "no digest recorded yet"
        );
        catalog.set_digest("web", "a", 7);
        assert!(!catalog.refresh("web", "a", 8, t0), "another payload");
        let t1 = t0 + Duration::from_secs(2);
        assert!(catalog.refresh("web", "a", 7, t1));
        assert!(catalog.expire(t0 + Duration::from_secs(3)).is_empty());
        assert_eq!(catalog.expire(t1 + Duration::from_secs(3)).len(), 1);
        assert!(
            !catalog.refresh("web", "a", 7, t1),
            "gone instances are not revived"
        );
    }

    #[test]
    fn a_changed_record_is_a_change() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        let moved = instance("web", "a", 2);
        let change = catalog.apply(Event::Heartbeat(moved), t0).unwrap();
        assert_eq!(change.kind, ChangeKind::Updated);
        let mut heavier = instance("web", "a", 2);
        heavier.weight = 5;
        let change = catalog.apply(Event::Register(heavier), t0).unwrap();
        assert_eq!(change.kind, ChangeKind::Updated);
        assert_eq!(change.revision, 3);
        let snapshot = catalog.snapshot("web").unwrap();
        assert_eq!(snapshot.instances[0].port, 2);
        assert_eq!(snapshot.instances[0].weight, 5);
    }

    #[test]
    fn two_senders_of_one_id_are_reported_once_per_pair_of_records() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        let (mine, theirs, third) = (
            instance("web", "a", 1),
            instance("web", "a", 2),
            instance("web", "a", 3),
        );
        let mut conflicts = Vec::new();
        for record in [&mine, &theirs, &mine, &theirs, &mine, &third, &mine] {
            if let Some(change) = catalog.apply(Event::Heartbeat(record.clone()), t0) {
                conflicts.push(catalog.take_conflict(&change));
            }
        }
        let found = Conflict {
            service: "web".into(),
            id: "a".into(),
            records: [mine.clone(), theirs.clone()],
        };
        // Joined, a genuine update, then the flip back: reported once, and
        // not again while the same two records alternate; a new record ends
        // the run and a new flip back is a new report.
        assert_eq!(conflicts.len(), 7);
        assert_eq!(conflicts[..2], [None, None]);
        assert_eq!(conflicts[2], Some(found.clone()));
        assert_eq!(conflicts[3..6], [None, None, None]);
        assert_eq!(
            conflicts[6],
            Some(Conflict {
                service: "web".into(),
                id: "a".into(),
                records: [mine, third],
            })
        );
        let message = found.to_string();
        assert!(
            message.contains("web/a") && message.contains("127.0.0.1:1 and 127.0.0.1:2"),
            "{message}"
        );
    }

    #[test]
    fn an_instance_that_changes_its_record_once_is_no_conflict() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        for port in [2, 3, 4] {
            let change = catalog
                .apply(Event::Register(instance("web", "a", port)), t0)
                .expect("a changed record");
            assert_eq!(catalog.take_conflict(&change), None);
        }
    }

    #[test]
    fn deregister_removes_and_unknown_deregister_is_a_no_op() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        catalog.apply(Event::Register(instance("web", "b", 2)), t0);
        let gone = |id: &str| Event::Deregister {
            service: "web".into(),
            id: id.into(),
        };
        let change = catalog.apply(gone("a"), t0).unwrap();
        assert_eq!(change.kind, ChangeKind::Deregistered);
        assert_eq!(ids(&catalog, "web"), ["b"]);
        assert_eq!(catalog.apply(gone("a"), t0), None);
        assert_eq!(catalog.apply(gone("zzz"), t0), None);
        assert_eq!(
            catalog.apply(
                Event::Deregister {
                    service: "nope".into(),
                    id: "a".into()
                },
                t0
            ),
            None
        );
        assert_eq!(catalog.services(), 1, "an unknown service is not created");
        // The stale heap entry of `a` must not expire anything.
        assert!(catalog.expire(t0 + Duration::from_millis(2999)).is_empty());
        assert_eq!(catalog.expire(t0 + Duration::from_millis(3000)).len(), 1);
    }

    #[test]
    fn many_services_are_independent_and_sorted() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        for service in ["web", "api", "db"] {
            for id in ["c", "a", "b"] {
                catalog.apply(Event::Register(instance(service, id, 1)), t0);
            }
        }
        assert_eq!(catalog.live_instances(), 9);
        let all = catalog.snapshots();
        let names: Vec<_> = all.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(names, ["api", "db", "web"]);
        for snapshot in &all {
            assert_eq!(snapshot.revision, 3);
            snapshot.validate().expect("snapshots are sorted by id");
            assert_eq!(
                snapshot.instances.iter().map(|i| &i.id).collect::<Vec<_>>(),
                ["a", "b", "c"]
            );
        }
        catalog.apply(
            Event::Deregister {
                service: "db".into(),
                id: "b".into(),
            },
            t0,
        );
        assert_eq!(catalog.snapshot("db").unwrap().revision, 4);
        assert_eq!(catalog.snapshot("web").unwrap().revision, 3);
    }

    #[test]
    fn revision_strictly_increases_through_every_kind_of_change() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        let mut seen = Vec::new();
        let mut record = |change: Option<Change>| {
            if let Some(c) = change {
                seen.push(c.revision);
            }
        };
        record(catalog.apply(Event::Register(instance("web", "a", 1)), t0));
        record(catalog.apply(Event::Register(instance("web", "b", 1)), t0));
        record(catalog.apply(Event::Heartbeat(instance("web", "a", 9)), t0));
        record(catalog.apply(
            Event::Deregister {
                service: "web".into(),
                id: "a".into(),
            },
            t0,
        ));
        for change in catalog.expire(t0 + Duration::from_secs(3)) {
            record(Some(change));
        }
        record(catalog.apply(Event::Register(instance("web", "a", 1)), t0));
        assert_eq!(seen, [1, 2, 3, 4, 5, 6]);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn an_emptied_service_keeps_its_revision() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        catalog.expire(t0 + Duration::from_secs(3));
        let empty = catalog.snapshot("web").unwrap();
        assert!(empty.instances.is_empty());
        assert_eq!(empty.revision, 2);
    }

    #[test]
    fn adopted_snapshots_count_as_just_heard_and_continue_revisions() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        let kept = Snapshot {
            service: "web".into(),
            revision: 41,
            instances: vec![instance("web", "a", 1), instance("web", "b", 2)],
        };
        let later = t0 + Duration::from_secs(60);
        catalog.adopt(kept.clone(), later);
        assert_eq!(catalog.snapshot("web").unwrap(), kept);
        assert_eq!(
            catalog.apply(
                Event::Heartbeat(instance("web", "a", 1)),
                later + Duration::from_secs(1)
            ),
            None,
            "a heartbeat matching the adopted record changes nothing"
        );
        assert!(catalog
            .expire(later + Duration::from_millis(2999))
            .is_empty());
        let change = catalog
            .apply(Event::Register(instance("web", "c", 3)), later)
            .unwrap();
        assert_eq!(change.revision, 42);
        let expired = catalog.expire(later + Duration::from_secs(3));
        assert_eq!(expired.len(), 2, "b and c were never heard again");
    }
    #[test]
    fn revisions_follow_the_clock_and_never_go_back() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.set_clock(1_000_000);
        let joined = catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        assert_eq!(joined.map(|c| c.revision), Some(1_000_000));
        // The wall clock stepped back (NTP): still strictly increasing.
        catalog.set_clock(5);
        let moved = catalog.apply(Event::Register(instance("web", "a", 2)), t0);
        assert_eq!(moved.map(|c| c.revision), Some(1_000_001));
        catalog.bump("web");
        assert_eq!(catalog.snapshot("web").unwrap().revision, 1_000_002);
    }

    #[test]
    fn a_stored_snapshot_does_not_bring_back_what_was_seen_leaving() {
        let t0 = Instant::now();
        let ttl = instance("web", "a", 1).ttl();
        let mut catalog = Catalog::new();
        for id in ["a", "b", "c"] {
            catalog.apply(Event::Register(instance("web", id, 1)), t0);
        }
        // Stored while all three were live; then a follower hears b leave
        // and c fall silent.
        let stored = catalog.snapshot("web").unwrap();
        let left = catalog.apply(
            Event::Deregister {
                service: "web".into(),
                id: "b".into(),
            },
            t0 + ttl / 2,
        );
        assert!(left.is_some());
        catalog.apply(Event::Heartbeat(instance("web", "a", 1)), t0 + ttl);
        assert_eq!(catalog.expire(t0 + ttl).len(), 1, "c expired");
        let taking_over = t0 + ttl + Duration::from_millis(10);
        assert!(
            catalog.adopt_unknown(&stored, taking_over),
            "b and c stay gone"
        );
        assert_eq!(
            catalog.snapshot("web").unwrap().instances,
            [instance("web", "a", 1)]
        );
        // A TTL after they left, a stored snapshot is believed again: had
        // they come back, their heartbeats would have said so meanwhile.
        let much_later = t0 + ttl * 3;
        catalog.adopt_unknown(&stored, much_later);
        assert_eq!(catalog.snapshot("web").unwrap().instances.len(), 3);
    }

    #[test]
    fn a_new_leader_adopts_only_what_it_does_not_know_and_never_shrinks() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 9)), t0);
        let stored = Snapshot {
            service: "web".into(),
            revision: 40,
            instances: vec![instance("web", "a", 1), instance("web", "b", 2)],
        };
        let later = t0 + Duration::from_secs(2);
        assert!(
            catalog.adopt_unknown(&stored, later),
            "a's newer record differs from the stored one"
        );
        let own = catalog.snapshot("web").unwrap();
        assert_eq!(own.revision, 40);
        assert_eq!(
            own.instances,
            [instance("web", "a", 9), instance("web", "b", 2)]
        );
        assert_eq!(
            catalog.expire(t0 + Duration::from_secs(3)).len(),
            1,
            "a keeps its deadline"
        );
        assert!(
            catalog
                .expire(later + Duration::from_millis(2999))
                .is_empty(),
            "b got a fresh TTL"
        );
        let same = catalog.snapshot("web").unwrap();
        assert!(!catalog.adopt_unknown(&same, later), "nothing to write");
    }

    fn operator(change: OverrideChange, by: &str) -> Override {
        Override {
            service: "web".into(),
            id: "a".into(),
            change,
            by: by.into(),
        }
    }

    /// The change an override made, if any.
    fn apply_override(
        catalog: &mut Catalog,
        request: &Override,
        at_ms: u64,
    ) -> Result<Option<Change>, NotLive> {
        let done = catalog.apply_override(request, at_ms)?;
        assert_eq!(
            Some(&done.instance),
            catalog.effective(&request.service, &request.id).as_ref(),
            "the instance as it now stands"
        );
        Ok(done.change)
    }

    fn web_a(catalog: &Catalog) -> Instance {
        catalog.effective("web", "a").expect("web/a is live")
    }

    #[test]
    fn a_drain_holds_through_heartbeats_and_own_weight_follows_the_instance() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        let change = apply_override(
            &mut catalog,
            &operator(OverrideChange::Drain, "alice"),
            1_000,
        )
        .expect("a is live")
        .expect("draining is a change");
        assert_eq!(change.kind, ChangeKind::Overridden);
        assert_eq!(change.revision, 2);
        let drained = catalog.snapshot("web").unwrap().instances.remove(0);
        assert_eq!(drained.weight, 0);
        assert_eq!(
            drained.operator,
            Some(Operator {
                drain: true,
                weight: None,
                own_weight: 1,
                by: "alice".into(),
                at_ms: 1_000
            })
        );
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            catalog.apply(Event::Heartbeat(instance("web", "a", 1)), t1),
            None,
            "the same heartbeat changes nothing, the drain stays"
        );
        let mut heavier = instance("web", "a", 1);
        heavier.weight = 7;
        let change = catalog.apply(Event::Heartbeat(heavier), t1).unwrap();
        assert_eq!(change.kind, ChangeKind::Updated);
        let still = web_a(&catalog);
        assert_eq!(still.weight, 0, "drained whatever the instance announces");
        assert_eq!(still.operator.map(|o| o.own_weight), Some(7));
        assert_eq!(catalog.instance("web", "a").map(|i| i.weight), Some(7));
    }

    #[test]
    fn effective_weight_is_zero_when_drained_else_the_operators_else_its_own() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        let mut own = instance("web", "a", 1);
        own.weight = 3;
        catalog.apply(Event::Register(own), t0);
        let mut weights = Vec::new();
        for change in [
            OverrideChange::Weight(Some(5)),
            OverrideChange::Drain,
            OverrideChange::Undrain,
            OverrideChange::Weight(None),
            OverrideChange::Drain,
            OverrideChange::Weight(Some(9)),
            OverrideChange::Clear,
        ] {
            apply_override(&mut catalog, &operator(change, "bob"), 5)
                .expect("a is live")
                .unwrap_or_else(|| panic!("{change} is a change"));
            let now = web_a(&catalog);
            weights.push((now.weight, now.operator.map(|o| (o.drain, o.weight))));
        }
        assert_eq!(
            weights,
            [
                (5, Some((false, Some(5)))),
                (0, Some((true, Some(5)))),
                (5, Some((false, Some(5)))),
                (3, None),
                (0, Some((true, None))),
                (0, Some((true, Some(9)))),
                (3, None),
            ]
        );
        assert_eq!(catalog.snapshot("web").unwrap().revision, 8);
    }

    #[test]
    fn an_override_that_changes_nothing_publishes_nothing() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        assert!(
            apply_override(&mut catalog, &operator(OverrideChange::Drain, "alice"), 1)
                .unwrap()
                .is_some()
        );
        assert_eq!(
            apply_override(&mut catalog, &operator(OverrideChange::Drain, "bob"), 2),
            Ok(None)
        );
        assert_eq!(
            web_a(&catalog).operator.map(|o| o.by),
            Some("alice".into()),
            "who set it stays who changed it"
        );
        apply_override(&mut catalog, &operator(OverrideChange::Clear, "alice"), 3).unwrap();
        for change in [
            OverrideChange::Undrain,
            OverrideChange::Clear,
            OverrideChange::Weight(None),
        ] {
            assert_eq!(
                apply_override(&mut catalog, &operator(change, "bob"), 4),
                Ok(None),
                "{change}"
            );
        }
        assert_eq!(catalog.snapshot("web").unwrap().revision, 3);
    }

    #[test]
    fn an_override_for_an_instance_that_is_not_live_changes_nothing() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        let drain = operator(OverrideChange::Drain, "alice");
        let error = apply_override(&mut catalog, &drain, 1).unwrap_err();
        assert_eq!(error.to_string().split(' ').next(), Some("web/a"));
        assert_eq!(catalog.services(), 0, "no service is created");
        catalog.apply(Event::Register(instance("web", "b", 1)), t0);
        assert!(apply_override(&mut catalog, &drain, 1).is_err());
        assert_eq!(catalog.snapshot("web").unwrap().revision, 1);
    }

    #[test]
    fn an_instance_that_leaves_comes_back_without_its_override() {
        let t0 = Instant::now();
        let mut catalog = Catalog::new();
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        apply_override(&mut catalog, &operator(OverrideChange::Drain, "alice"), 1).unwrap();
        catalog.apply(
            Event::Deregister {
                service: "web".into(),
                id: "a".into(),
            },
            t0,
        );
        catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        assert_eq!(web_a(&catalog), instance("web", "a", 1));
        apply_override(
            &mut catalog,
            &operator(OverrideChange::Weight(Some(4)), "bob"),
            2,
        )
        .unwrap();
        assert_eq!(catalog.expire(t0 + Duration::from_secs(3)).len(), 1);
        catalog.apply(
            Event::Register(instance("web", "a", 1)),
            t0 + Duration::from_secs(3),
        );
        assert_eq!(
            web_a(&catalog),
            instance("web", "a", 1),
            "expiry forgets it too"
        );
    }

    #[test]
    fn an_adopted_override_survives_with_the_instances_own_weight() {
        let t0 = Instant::now();
        let mut first = Catalog::new();
        let mut own = instance("web", "a", 1);
        own.weight = 2;
        first.apply(Event::Register(own.clone()), t0);
        apply_override(
            &mut first,
            &operator(OverrideChange::Weight(Some(6)), "bob"),
            9,
        )
        .unwrap();
        let stored = first.snapshot("web").unwrap();
        let mut restarted = Catalog::new();
        restarted.adopt(stored.clone(), t0);
        assert_eq!(restarted.snapshot("web").unwrap(), stored);
        assert_eq!(restarted.instance("web", "a"), Some(own.clone()));
        assert_eq!(
            restarted.apply(Event::Heartbeat(own), t0),
            None,
            "the instance's own heartbeat matches what was adopted"
        );
        assert_eq!(web_a(&restarted).weight, 6);
        assert!(!restarted.adopt_unknown(&stored, t0), "nothing to write");
    }

    #[test]
    fn a_takeover_takes_an_override_this_replica_missed() {
        let t0 = Instant::now();
        let mut leader = Catalog::new();
        let mut standby = Catalog::new();
        for catalog in [&mut leader, &mut standby] {
            catalog.apply(Event::Register(instance("web", "a", 1)), t0);
        }
        apply_override(&mut leader, &operator(OverrideChange::Drain, "alice"), 5).unwrap();
        let stored = leader.snapshot("web").unwrap();
        assert!(
            !standby.adopt_unknown(&stored, t0),
            "the standby now agrees with what is stored"
        );
        assert_eq!(web_a(&standby).weight, 0, "still drained after takeover");

        // One lifted here later than the stored one was set stays lifted.
        apply_override(&mut standby, &operator(OverrideChange::Undrain, "bob"), 7).unwrap();
        assert!(standby.adopt_unknown(&stored, t0), "differs: to be written");
        assert_eq!(web_a(&standby), instance("web", "a", 1), "undrained");
    }
}

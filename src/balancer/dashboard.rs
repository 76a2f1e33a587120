//! The dashboard at `/` of the balancer's admin port: every routed
//! service's instances (address, weight, tags, age, state, request rate,
//! p99 latency) and the membership events this balancer saw, kept live by
//! server-sent events at `/events`.
//!
//! - [`Board`] remembers when each instance was first seen, the state last
//!   shown for it and its latest figures, and a log of recent events. It
//!   compares a set against what it showed before ([`Board::observe`]):
//!   after each applied snapshot, and for ejections, which begin and end
//!   without a snapshot: when one begins (the proxy wakes [`sample`]) and
//!   at the instant the first running one ends.
//! - [`sample`] runs once a second while a page is watching: each
//!   instance's answers and latency counts
//!   ([`crate::metrics::InstanceMetrics`]) are read, so a request costs the
//!   dashboard nothing beyond the counters' atomic adds, and a big fleet
//!   nobody watches costs no work per second.
//! - A new set is compared with the last one member by member in id order;
//!   members both sets share unchanged are skipped, so a change to one of
//!   100,000 instances touches one entry.
//! - [`events`] is one client's stream: a `state` frame first (every
//!   reconnect of an `EventSource` starts from the whole current state),
//!   then `change` frames as events happen, `stats` frames each second
//!   some figure changed, and a keep-alive comment after a silence.
//!
//! A balancer only sees snapshots, so an instance that deregistered and
//! one whose TTL expired both show as `left`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::rotation::{ejection_for, Member, Rotation, ServiceSet};
use super::Shared;
use crate::metrics::{latency_bucket_bound, InstanceMetrics, LATENCY_BUCKETS};
use crate::protocol::Operator;

/// How often the figures are sampled and sent.
pub const STATS_EVERY: Duration = Duration::from_secs(1);
/// Default silence after which a stream sends a comment, so proxies
/// between the page and the balancer do not close it as idle (nginx's
/// `proxy_read_timeout` is 60 s).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
/// The p99 is over the latencies of the last this many samples.
pub const P99_WINDOW: usize = 10;
/// Default number of events kept for a page that (re)connects.
pub const DEFAULT_RECENT_EVENTS: usize = 100;

/// What an operator may tune on the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DashboardSettings {
    /// Silence after which a stream sends a keep-alive comment; above zero.
    pub keepalive: Duration,
    /// Events kept for a page that (re)connects; at least one.
    pub recent_events: usize,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        DashboardSettings {
            keepalive: DEFAULT_KEEPALIVE,
            recent_events: DEFAULT_RECENT_EVENTS,
        }
    }
}
/// Frames a slow client may fall behind before its stream ends (its
/// `EventSource` then reconnects and starts from the current state).
const BACKLOG: usize = 64;
/// How long an `EventSource` waits before reconnecting.
const RETRY_MS: u64 = 1000;

const PAGE: &str = include_str!("dashboard/index.html");
const STYLE: &str = include_str!("dashboard/dashboard.css");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

/// The dashboard's static files: content type and body.
pub(crate) fn asset(path: &str) -> Option<(&'static str, String)> {
    let (content_type, body) = match path {
        "/" => ("text/html; charset=utf-8", PAGE),
        "/dashboard.css" => ("text/css; charset=utf-8", STYLE),
        "/dashboard.js" => ("text/javascript; charset=utf-8", SCRIPT),
        _ => return None,
    };
    Some((content_type, body.to_owned()))
}

/// What an instance is, as the page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Takes its share of requests.
    Live,
    /// An operator drained it: no new requests.
    Draining,
    /// Out of rotation after failures, until its ejection ends.
    Ejected,
}

impl State {
    fn of(member: &Member, now: Instant) -> State {
        if member.instance.operator.as_ref().is_some_and(|o| o.drain) {
            State::Draining
        } else if member.is_eligible(now) {
            State::Live
        } else {
            State::Ejected
        }
    }
}

/// One change of membership or state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Increases by one per event, from 1.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub service: String,
    pub instance: String,
    /// `joined`, `left`, `drained`, `ejected` or `back`.
    pub kind: &'static str,
    pub detail: String,
}

/// An instance's figures over the last sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    /// Answers per second.
    pub rate: f64,
    /// The 99th percentile of latency over [`P99_WINDOW`] samples, as the
    /// upper bound of its bucket (at most 25 % above); `None` without any
    /// answer in the window.
    pub p99: Option<Duration>,
}

/// What the board remembers of one instance.
#[derive(Debug)]
struct Seen {
    since: Instant,
    state: State,
    figures: Figures,
}

/// What the board showed of one service.
#[derive(Debug, Default)]
struct Shown {
    /// By instance id.
    seen: HashMap<String, Seen>,
    /// The set compared last, and when: the next set is compared with it
    /// member by member, and a member both hold unchanged (the same `Arc`)
    /// is skipped unless an ejection of its could have ended meanwhile.
    set: Option<(Arc<ServiceSet>, Instant)>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By service number.
    services: Vec<Shown>,
    events: VecDeque<Event>,
    last_seq: u64,
}

/// The figures of one sample, by service number and instance id.
type Sampled = Vec<HashMap<String, Figures>>;

/// The dashboard's memory and its broadcast of frames.
#[derive(Debug)]
pub struct Board {
    inner: Mutex<Inner>,
    frames: broadcast::Sender<Bytes>,
    settings: DashboardSettings,
}

impl Default for Board {
    fn default() -> Self {
        Board::new(DashboardSettings::default())
    }
}

impl Board {
    pub fn new(settings: DashboardSettings) -> Self {
        Board {
            inner: Mutex::default(),
            frames: broadcast::Sender::new(BACKLOG),
            settings: DashboardSettings {
                keepalive: settings.keepalive.max(Duration::from_millis(1)),
                recent_events: settings.recent_events.max(1),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Compares service number `index`'s `set` with what the board showed,
    /// records an event per difference, and sends them to every page.
    pub fn observe(
        &self,
        rotations: &[Rotation],
        index: usize,
        set: &Arc<ServiceSet>,
        now: Instant,
    ) {
        let mut inner = self.lock();
        let events = inner.compare(index, set, now, self.settings.recent_events);
        if events.is_empty() {
            return;
        }
        for event in &events {
            tracing::debug!(service = %event.service, instance = %event.instance, kind = event.kind, "dashboard event");
        }
        if self.frames.receiver_count() > 0 {
            let data = json!({ "events": events, "services": inner.view(rotations, now) });
            let _ = self.frames.send(frame("change", &data));
        }
    }

    /// A new page's first frame (the whole state) and its subscription to
    /// what follows, taken together so no event falls between them.
    fn subscribe(&self, rotations: &[Rotation]) -> (Bytes, broadcast::Receiver<Bytes>) {
        let inner = self.lock();
        let now = tokio::time::Instant::now().into_std();
        let data = json!({ "events": inner.events, "services": inner.view(rotations, now) });
        (frame("state", &data), self.frames.subscribe())
    }

    /// Compares every set with what the board showed: for ejections,
    /// which begin and end without a snapshot.
    fn look_again(&self, rotations: &[Rotation]) {
        let now = tokio::time::Instant::now().into_std();
        for (index, rotation) in rotations.iter().enumerate() {
            self.observe(rotations, index, &rotation.load_full(), now);
        }
    }

    /// Takes a sample's figures, looks at the sets again, and sends a
    /// `stats` frame when a figure changed: a fleet without traffic sends
    /// nothing but keep-alives (pages count ages on their own).
    fn tick(&self, rotations: &[Rotation], figures: Sampled) {
        self.look_again(rotations);
        let now = tokio::time::Instant::now().into_std();
        let mut inner = self.lock();
        let mut changed = false;
        for (index, shown) in inner.services.iter_mut().enumerate() {
            for (id, seen) in &mut shown.seen {
                let new = figures
                    .get(index)
                    .and_then(|f| f.get(id))
                    .copied()
                    .unwrap_or_default();
                changed |= seen.figures != new;
                seen.figures = new;
            }
        }
        if changed && self.frames.receiver_count() > 0 {
            let data = json!({ "services": inner.view(rotations, now) });
            let _ = self.frames.send(frame("stats", &data));
        }
    }

    /// The events kept, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.lock().events.iter().cloned().collect()
    }

    /// Whether a page is following the events.
    fn watched(&self) -> bool {
        self.frames.receiver_count() > 0
    }
}

impl Inner {
    /// The events that make what service `index` shows into `set`.
    fn compare(
        &mut self,
        index: usize,
        set: &Arc<ServiceSet>,
        now: Instant,
        keep: usize,
    ) -> Vec<Event> {
        if self.services.len() <= index {
            self.services.resize_with(index + 1, Shown::default);
        }
        let shown = &mut self.services[index];
        let previous = shown.set.replace((set.clone(), now));
        if let Some((old, looked)) = &previous {
            // The same set, and none of its ejections ended since: no member
            // changed state.
            let quiet = set.next_ejection_end(*looked).is_none_or(|end| end > now);
            if Arc::ptr_eq(old, set) && quiet {
                return Vec::new();
            }
        }
        let old_members = previous.as_ref().map_or(&[][..], |(old, _)| old.members());
        let (mut changes, gone) = shown.diff(old_members, set.members(), now);
        for id in gone {
            shown.seen.remove(&id);
            let detail = "no longer in the catalog (deregistered or expired)".to_owned();
            changes.push((id, "left", detail));
        }
        changes
            .into_iter()
            .map(|(instance, kind, detail)| {
                self.record(set.service(), instance, kind, detail, keep)
            })
            .collect()
    }

    fn record(
        &mut self,
        service: &str,
        instance: String,
        kind: &'static str,
        detail: String,
        keep: usize,
    ) -> Event {
        self.last_seq += 1;
        let at_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let event = Event {
            seq: self.last_seq,
            at_ms,
            service: service.to_owned(),
            instance,
            kind,
            detail,
        };
        while self.events.len() >= keep {
            self.events.pop_front();
        }
        self.events.push_back(event.clone());
        event
    }

    /// Every routed service with its instances as the page shows them.
    fn view(&self, rotations: &[Rotation], now: Instant) -> Value {
        let services: Vec<Value> = rotations
            .iter()
            .enumerate()
            .map(|(index, rotation)| {
                let set = rotation.load();
                let instances: Vec<Value> = set
                    .members()
                    .iter()
                    .map(|member| self.instance_view(index, member, now))
                    .collect();
                json!({
                    "service": set.service(),
                    "revision": set.revision(),
                    "instances": instances,
                })
            })
            .collect();
        Value::Array(services)
    }

    fn instance_view(&self, index: usize, member: &Member, now: Instant) -> Value {
        let seen = (self.services.get(index)).and_then(|shown| shown.seen.get(member.id()));
        let figures = seen.map(|s| s.figures).unwrap_or_default();
        let age = seen.map_or(Duration::ZERO, |s| now.saturating_duration_since(s.since));
        json!({
            "id": member.id(),
            "address": member.authority.as_str(),
            "weight": member.instance.weight,
            "tags": member.instance.tags,
            "age_s": age.as_secs(),
            "state": State::of(member, now),
            "override": override_text(member.instance.operator.as_ref()),
            "rate": (figures.rate * 10.0).round() / 10.0,
            "p99_ms": figures.p99.map(|p| p.as_secs_f64() * 1000.0),
        })
    }
}

/// A change the board records: instance, kind, detail.
type Change = (String, &'static str, String);

impl Shown {
    /// Walks `old` and `new` (both in id order) side by side: the changes
    /// of the members of `new`, recorded in `seen`, and the ids that left.
    fn diff(
        &mut self,
        old: &[Arc<Member>],
        new: &[Arc<Member>],
        now: Instant,
    ) -> (Vec<Change>, Vec<String>) {
        let mut changes = Vec::new();
        let mut gone = Vec::new();
        let mut old = old.iter().peekable();
        for member in new {
            while let Some(left) = old.next_if(|o| o.id() < member.id()) {
                gone.push(left.id().to_owned());
            }
            let unchanged = old
                .next_if(|o| o.id() == member.id())
                .is_some_and(|o| Arc::ptr_eq(o, member) && o.health.ejected_until.is_none());
            if unchanged {
                continue;
            }
            let state = State::of(member, now);
            match self.seen.get_mut(member.id()) {
                None => {
                    let weight = member.instance.weight;
                    let detail = format!("at {}, weight {weight}", member.authority);
                    changes.push((member.id().to_owned(), "joined", detail));
                    let seen = Seen {
                        since: now,
                        state,
                        figures: Figures::default(),
                    };
                    self.seen.insert(member.id().to_owned(), seen);
                }
                Some(seen) if seen.state != state => {
                    let (kind, detail) = transition(member, seen.state, state);
                    changes.push((member.id().to_owned(), kind, detail));
                    seen.state = state;
                }
                Some(_) => {}
            }
        }
        gone.extend(old.map(|left| left.id().to_owned()));
        (changes, gone)
    }
}

/// What an operator set on an instance and who, as the page shows it
/// under its state ("drained by alice", "weight 5 by bob"); null when
/// nothing is set.
fn override_text(operator: Option<&Operator>) -> Option<String> {
    let operator = operator?;
    let what = match (operator.drain, operator.weight) {
        (true, Some(weight)) => format!("drained, weight {weight}"),
        (true, None) => "drained".to_owned(),
        (false, Some(weight)) => format!("weight {weight}"),
        (false, None) => return None,
    };
    Some(format!("{what} by {}", operator.by))
}

/// The event (kind and detail) of a member that went from `old` to `new`.
fn transition(member: &Member, old: State, new: State) -> (&'static str, String) {
    match (old, new) {
        (_, State::Draining) => {
            let by = member
                .instance
                .operator
                .as_ref()
                .map_or("", |o| o.by.as_str());
            ("drained", format!("by {by}"))
        }
        (_, State::Ejected) => {
            let failures = member.health.failures;
            let length = ejection_for(failures);
            let detail = format!("for {length:?}, failure {failures} in a row");
            ("ejected", detail)
        }
        (State::Draining, State::Live) => ("back", "drain lifted".to_owned()),
        (_, State::Live) => ("back", "ejection over".to_owned()),
    }
}

/// One server-sent event: `event: NAME` and its JSON on one `data:` line.
fn frame(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// One page's stream of frames: the whole state, then what follows, with a
/// comment after the keep-alive interval of silence. It ends when the client falls
/// more than a backlog behind; the client's reconnect starts afresh.
pub(crate) fn events(shared: &Shared) -> BoxStream<'static, Bytes> {
    let (first, receiver) = shared.board.subscribe(&shared.rotations);
    let keepalive = shared.board.settings.keepalive;
    let retry = Bytes::from(format!("retry: {RETRY_MS}\n\n"));
    let rest = stream::unfold(receiver, move |mut receiver| async move {
        match tokio::time::timeout(keepalive, receiver.recv()).await {
            Err(_) => Some((Bytes::from_static(b": keep-alive\n\n"), receiver)),
            Ok(Ok(frame)) => Some((frame, receiver)),
            Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                tracing::debug!(missed, "a dashboard client fell behind; its stream ends");
                None
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => None,
        }
    });
    stream::iter([retry, first]).chain(rest).boxed()
}

/// One instance's counts at the last sample, and its latency counts per
/// sample over the window.
struct Window {
    answers: u64,
    counts: [u64; LATENCY_BUCKETS],
    recent: VecDeque<[u64; LATENCY_BUCKETS]>,
}

impl Window {
    /// From zero: an instance's counters start when it joins the set, less
    /// than one sample before its window is made.
    fn new() -> Self {
        Window {
            answers: 0,
            counts: [0; LATENCY_BUCKETS],
            recent: VecDeque::with_capacity(P99_WINDOW),
        }
    }

    /// The figures since the last sample, `elapsed` ago.
    fn advance(&mut self, handles: &InstanceMetrics, elapsed: Duration) -> Figures {
        let answers = handles.answers();
        let counts = handles.latency_counts();
        let delta: [u64; LATENCY_BUCKETS] =
            std::array::from_fn(|i| counts[i].saturating_sub(self.counts[i]));
        if self.recent.len() == P99_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(delta);
        let seconds = elapsed.as_secs_f64();
        let rate = if seconds > 0.0 {
            answers.saturating_sub(self.answers) as f64 / seconds
        } else {
            0.0
        };
        (self.answers, self.counts) = (answers, counts);
        let window: [u64; LATENCY_BUCKETS] =
            std::array::from_fn(|i| self.recent.iter().map(|d| d[i]).sum());
        Figures {
            rate,
            p99: percentile(&window, 0.99),
        }
    }
}

/// The upper bound of the bucket holding quantile `q` of `counts`.
fn percentile(counts: &[u64; LATENCY_BUCKETS], q: f64) -> Option<Duration> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut below = 0;
    for (index, count) in counts.iter().enumerate() {
        below += count;
        if below >= rank {
            return Some(latency_bucket_bound(index));
        }
    }
    None
}

/// Samples every instance's figures once per [`STATS_EVERY`] for the
/// dashboard, and looks at the sets again as soon as an ejection begins
/// ([`BalancerMetrics::ejected`](crate::metrics::BalancerMetrics)) or ends,
/// until the task is dropped.
pub(crate) async fn sample(shared: Arc<Shared>) {
    let mut windows: Vec<HashMap<String, Window>> = Vec::new();
    let mut ticks = tokio::time::interval(STATS_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = ticks.tick().await;
    loop {
        let now = tokio::time::Instant::now().into_std();
        let ejection_ends = (shared.rotations.iter())
            .filter_map(|rotation| rotation.load().next_ejection_end(now))
            .min();
        let ejection_over = async {
            match ejection_ends {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        let now = tokio::select! {
            now = ticks.tick() => now,
            () = shared.metrics.ejected.notified() => {
                shared.board.look_again(&shared.rotations);
                continue;
            }
            () = ejection_over => {
                shared.board.look_again(&shared.rotations);
                continue;
            }
        };
        // The figures are only sent, so with no page watching, a big
        // fleet's counters are not read at all. `last` stays: the first
        // sample once a page watches again spans the whole pause.
        if !shared.board.watched() {
            continue;
        }
        let elapsed = now.duration_since(last);
        last = now;
        let figures = sample_once(&shared, &mut windows, elapsed);
        shared.board.tick(&shared.rotations, figures);
    }
}

/// Every instance's figures over the `elapsed` since the last sample.
fn sample_once(
    shared: &Shared,
    windows: &mut Vec<HashMap<String, Window>>,
    elapsed: Duration,
) -> Sampled {
    windows.resize_with(shared.rotations.len(), HashMap::new);
    let mut figures = Vec::with_capacity(windows.len());
    for (index, windows) in windows.iter_mut().enumerate() {
        let instances = shared.metrics.instances_of(index);
        windows.retain(|id, _| instances.contains_key(id));
        let mut sampled = HashMap::with_capacity(instances.len());
        for (id, handles) in instances.iter() {
            let window = windows.entry(id.clone()).or_insert_with(Window::new);
            sampled.insert(id.clone(), window.advance(handles, elapsed));
        }
        figures.push(sampled);
    }
    figures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::latency_bucket;
    use crate::protocol::{Instance, Operator, Snapshot};

    #[test]
    fn a_latencys_bucket_bound_is_at_most_a_quarter_above_it() {
        for micros in [
            1, 2, 3, 5, 7, 100, 999, 1000, 1234, 65_432, 999_999, 30_000_000,
        ] {
            let took = Duration::from_micros(micros);
            let bound = latency_bucket_bound(latency_bucket(took));
            assert!(bound > took, "{took:?} → {bound:?}");
            assert!(
                bound.as_nanos() * 4 <= took.as_nanos() * 5,
                "{took:?} → {bound:?}"
            );
        }
        let last = latency_bucket(Duration::from_secs(3600));
        assert_eq!(
            last,
            LATENCY_BUCKETS - 1,
            "beyond the last bound: the last bucket"
        );
    }

    #[test]
    fn the_p99_is_the_bucket_below_which_99_percent_fall() {
        let mut counts = [0; LATENCY_BUCKETS];
        assert_eq!(percentile(&counts, 0.99), None, "no answer, no p99");
        let fast = latency_bucket(Duration::from_millis(1));
        let slow = latency_bucket(Duration::from_secs(1));
        counts[fast] = 99;
        counts[slow] = 1;
        assert_eq!(percentile(&counts, 0.99), Some(latency_bucket_bound(fast)));
        counts[fast] = 98;
        counts[slow] = 2;
        assert_eq!(percentile(&counts, 0.99), Some(latency_bucket_bound(slow)));
    }

    fn snapshot(revision: u64, instances: Vec<Instance>) -> Snapshot {
        Snapshot {
            service: "web".into(),
            revision,
            instances,
        }
    }

    fn kinds(board: &Board) -> Vec<(String, &'static str)> {
        board
            .recent()
            .into_iter()
            .map(|e| (e.instance, e.kind))
            .collect()
    }

    #[test]
    fn each_change_of_a_set_is_one_event_in_order() {
        let rotations = [Rotation::new("web")];
        let board = Board::default();
        let t0 = Instant::now();
        let web = |id: &str| Instance::new("web", id, "127.0.0.1", 5000);
        let apply = |revision, instances, now| {
            rotations[0].apply_at(&snapshot(revision, instances), now);
            board.observe(&rotations, 0, &rotations[0].load(), now);
        };
        apply(1, vec![web("a"), web("b"), web("c")], t0);
        rotations[0].eject("a", t0);
        board.observe(&rotations, 0, &rotations[0].load(), t0);
        board.observe(
            &rotations,
            0,
            &rotations[0].load(),
            t0 + Duration::from_millis(999),
        );
        board.observe(
            &rotations,
            0,
            &rotations[0].load(),
            t0 + Duration::from_secs(1),
        );
        let mut drained = web("b");
        drained.weight = 0;
        drained.operator = Some(Operator {
            drain: true,
            weight: None,
            own_weight: 1,
            by: "ops".into(),
            at_ms: 0,
        });
        let t2 = t0 + Duration::from_secs(2);
        apply(2, vec![web("a"), drained], t2);
        apply(3, vec![web("a"), web("b")], t2);
        let expected = [
            ("a", "joined"),
            ("b", "joined"),
            ("c", "joined"),
            ("a", "ejected"),
            ("a", "back"),
            ("b", "drained"),
            ("c", "left"),
            ("b", "back"),
        ];
        let expected: Vec<(String, &str)> = expected
            .iter()
            .map(|(id, kind)| ((*id).to_owned(), *kind))
            .collect();
        assert_eq!(kinds(&board), expected);
        let events = board.recent();
        assert_eq!(events[3].detail, "for 1s, failure 1 in a row");
        assert_eq!(events[5].detail, "by ops");
        assert_eq!(events[7].detail, "drain lifted");
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    }

    #[test]
    fn the_log_keeps_the_most_recent_events() {
        let rotations = [Rotation::new("web")];
        let board = Board::default();
        let now = Instant::now();
        for revision in 1..=(DEFAULT_RECENT_EVENTS as u64) {
            let id = format!("i{revision}");
            let instances = vec![Instance::new("web", id, "127.0.0.1", 5000)];
            rotations[0].apply_at(&snapshot(revision, instances), now);
            board.observe(&rotations, 0, &rotations[0].load(), now);
        }
        let events = board.recent();
        assert_eq!(events.len(), DEFAULT_RECENT_EVENTS);
        assert_eq!(
            events.last().map(|e| e.seq),
            Some(2 * DEFAULT_RECENT_EVENTS as u64 - 1)
        );
        assert_eq!(events[0].seq, DEFAULT_RECENT_EVENTS as u64);
    }

    #[test]
    fn an_override_reads_as_what_was_set_and_by_whom() {
        let set = |drain, weight| Operator {
            drain,
            weight,
            own_weight: 1,
            by: "alice".into(),
            at_ms: 0,
        };
        assert_eq!(override_text(None), None);
        assert_eq!(override_text(Some(&set(false, None))), None);
        for (operator, text) in [
            (set(true, None), "drained by alice"),
            (set(false, Some(5)), "weight 5 by alice"),
            (set(true, Some(5)), "drained, weight 5 by alice"),
        ] {
            assert_eq!(override_text(Some(&operator)).as_deref(), Some(text));
        }
    }
}

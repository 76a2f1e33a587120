//! The end of the line, for people: what `rollcall watch` and `rollcall
//! catalog` print. Events, catalog records and the stored catalog become one
//! readable line each, or one JSON object each, and a message that breaks
//! the protocol is shown as invalid with the reason instead of being dropped.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::catalog_stream::Stored;
use crate::protocol::{
    Event, Instance, Leadership, Override, Presence, Record, Snapshot, Subjects,
};

/// One message seen on the fleet's subjects, as understood.
// One value per message, printed and dropped at once: boxing would only add
// an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A valid register, heartbeat or deregister. `instance` is the record
    /// the message carried (a deregister may carry none).
    Event {
        event: Event,
        instance: Option<Instance>,
    },
    /// One instance's catalog record, and what it says happened.
    Record { record: Record, kind: RecordKind },
    /// The leading discovery replica's heartbeat.
    Leader(Leadership),
    /// An operator's override, as sent (discovery may still refuse it: an
    /// instance that is not live).
    Override(Override),
    /// Anything under the prefix that breaks docs/protocol.md, and why.
    Invalid { subject: String, reason: String },
    /// An event or override the server's mapping put into a partition, or
    /// a partition's leader heartbeat: what it is, and the partition token.
    Partitioned {
        partition: String,
        observed: Box<Observed>,
    },
}

impl Observed {
    /// Reads one message: a catalog subject as a record, anything else as
    /// an event. A live record reads as `changed` until a [`Membership`]
    /// tells joins apart.
    pub fn read(subjects: &Subjects, subject: &str, payload: &[u8]) -> Observed {
        let invalid = |error: crate::protocol::ProtocolError| Observed::Invalid {
            subject: subject.to_owned(),
            reason: error.to_string(),
        };
        if let Some((partition, unmapped)) = subjects.unmap(subject) {
            return Observed::partitioned(partition, subjects, &unmapped, payload);
        }
        let leader = subjects.leader_heartbeat();
        if let Some(partition) =
            (subject.strip_prefix(leader.as_str())).and_then(|rest| rest.strip_prefix('.'))
        {
            return Observed::partitioned(partition, subjects, &leader, payload);
        }
        if subject == leader {
            return serde_json::from_slice(payload).map_or_else(
                |e| Observed::Invalid {
                    subject: subject.to_owned(),
                    reason: format!("not a leader heartbeat: {e}"),
                },
                Observed::Leader,
            );
        }
        if subjects.is_operator(subject) {
            return subjects
                .parse_override(subject, payload)
                .map_or_else(invalid, Observed::Override);
        }
        if subjects.is_catalog(subject) {
            return subjects
                .parse_record(subject, payload)
                .map_or_else(invalid, |record| {
                    let kind = match record.presence {
                        Presence::Live(_) => RecordKind::Changed,
                        Presence::Left(_) => RecordKind::Left,
                    };
                    Observed::Record { record, kind }
                });
        }
        match subjects.parse_event(subject, payload) {
            Ok(event) => {
                let instance = match &event {
                    Event::Register(instance) | Event::Heartbeat(instance) => {
                        Some(instance.clone())
                    }
                    // A deregister may carry the whole record; show its
                    // address when it does.
                    Event::Deregister { .. } => serde_json::from_slice(payload).ok(),
                };
                Observed::Event { event, instance }
            }
            Err(error) => invalid(error),
        }
    }

    fn partitioned(
        partition: &str,
        subjects: &Subjects,
        subject: &str,
        payload: &[u8],
    ) -> Observed {
        Observed::Partitioned {
            partition: partition.to_owned(),
            observed: Box::new(Observed::read(subjects, subject, payload)),
        }
    }

    pub fn is_invalid(&self) -> bool {
        match self {
            Observed::Partitioned { observed, .. } => observed.is_invalid(),
            other => matches!(other, Observed::Invalid { .. }),
        }
    }

    pub fn is_heartbeat(&self) -> bool {
        match self {
            Observed::Partitioned { observed, .. } => observed.is_heartbeat(),
            other => matches!(
                other,
                Observed::Event {
                    event: Event::Heartbeat(_),
                    ..
                }
            ),
        }
    }

    /// A leader heartbeat: its partition (`None`: the unpartitioned
    /// leader's) and what it says.
    pub fn leader(&self) -> Option<(Option<&str>, &Leadership)> {
        match self {
            Observed::Leader(leader) => Some((None, leader)),
            Observed::Partitioned {
                partition,
                observed,
            } => match observed.as_ref() {
                Observed::Leader(leader) => Some((Some(partition.as_str()), leader)),
                _ => None,
            },
            _ => None,
        }
    }

    /// One line for people: time, kind, service, instance, address:port;
    /// for records what happened, the instance and the revision.
    pub fn line(&self, at: SystemTime) -> String {
        let time = humantime::format_rfc3339_millis(at);
        match self {
            Observed::Event { event, instance } => {
                let target = instance
                    .as_ref()
                    .map(Instance::authority)
                    .unwrap_or_else(|| "-".to_owned());
                let mut line = format!(
                    "{time} {:<10} {}/{} {target}",
                    event.kind().as_str(),
                    event.service(),
                    event.id()
                );
                if let (Some(instance), false) =
                    (instance, matches!(event, Event::Deregister { .. }))
                {
                    let _ = write!(
                        line,
                        " ttl={}ms weight={}",
                        instance.ttl_ms, instance.weight
                    );
                    if !instance.tags.is_empty() {
                        let _ = write!(line, " tags={}", instance.tags.join(","));
                    }
                }
                line
            }
            Observed::Record { record, kind } => record_line(record, *kind, &time.to_string()),
            Observed::Leader(leader) => format!(
                "{time} {:<10} {} epoch={} since={}",
                "leader",
                leader.replica,
                leader.epoch,
                since(leader)
            ),
            Observed::Override(request) => format!(
                "{time} {:<10} {}/{} {} by {}",
                "override", request.service, request.id, request.change, request.by
            ),
            Observed::Invalid { subject, reason } => {
                format!("{time} {:<10} {subject}: {reason}", "invalid")
            }
            Observed::Partitioned {
                partition,
                observed,
            } => format!("{} partition={partition}", observed.line(at)),
        }
    }

    /// One JSON object.
    pub fn json(&self, at: SystemTime) -> Value {
        let time = humantime::format_rfc3339_millis(at).to_string();
        match self {
            Observed::Event { event, instance } => json!({
                "time": time,
                "kind": event.kind().as_str(),
                "service": event.service(),
                "id": event.id(),
                "instance": instance,
            }),
            Observed::Record { record, kind } => {
                let mut value = json!({
                    "time": time,
                    "kind": kind.as_str(),
                    "service": record.service,
                    "id": record.id,
                    "revision": record.revision,
                });
                match &record.presence {
                    Presence::Live(instance) => value["instance"] = json!(instance),
                    Presence::Left(left) => value["left"] = json!(left.as_str()),
                }
                value
            }
            Observed::Leader(leader) => json!({
                "time": time,
                "kind": "leader",
                "replica": leader.replica,
                "epoch": leader.epoch,
                "since": since(leader),
            }),
            Observed::Override(request) => json!({
                "time": time,
                "kind": "override",
                "service": request.service,
                "id": request.id,
                "action": request.change.action().as_str(),
                "weight": match request.change {
                    crate::protocol::OverrideChange::Weight(weight) => json!(weight),
                    _ => Value::Null,
                },
                "by": request.by,
            }),
            Observed::Invalid { subject, reason } => json!({
                "time": time,
                "kind": "invalid",
                "subject": subject,
                "reason": reason,
            }),
            Observed::Partitioned {
                partition,
                observed,
            } => {
                let mut object = observed.json(at);
                object["partition"] = json!(partition);
                object
            }
        }
    }
}

/// What a catalog record says happened to its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Joined,
    /// Live and already known (or not known to be new).
    Changed,
    Left,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Joined => "joined",
            RecordKind::Changed => "changed",
            RecordKind::Left => "left",
        }
    }
}

/// The live instances a watcher has seen, to tell a record that joins from
/// one that changes.
#[derive(Debug, Default)]
pub struct Membership(HashSet<(String, String)>);

impl Membership {
    /// Starts from the stored catalog.
    pub fn seed(&mut self, stored: &[Stored]) {
        for Stored { snapshot, .. } in stored {
            for instance in &snapshot.instances {
                self.0
                    .insert((snapshot.service.clone(), instance.id.clone()));
            }
        }
    }

    /// Notes a record and says `joined` for an instance not seen live.
    pub fn note(&mut self, observed: &mut Observed) {
        let Observed::Record { record, kind } = observed else {
            return;
        };
        let key = (record.service.clone(), record.id.clone());
        *kind = match record.presence {
            Presence::Left(_) => {
                self.0.remove(&key);
                RecordKind::Left
            }
            Presence::Live(_) if self.0.insert(key) => RecordKind::Joined,
            Presence::Live(_) => RecordKind::Changed,
        };
    }
}

/// One record in one line: time, what happened, service/id, address,
/// revision, weight and whether an operator overrode it; or why it left.
fn record_line(record: &Record, kind: RecordKind, time: &str) -> String {
    let head = format!(
        "{time} {:<10} {}/{}",
        kind.as_str(),
        record.service,
        record.id
    );
    match &record.presence {
        Presence::Live(instance) => {
            let mut line = format!(
                "{head} {} rev={} weight={}",
                instance.authority(),
                record.revision,
                instance.weight
            );
            if instance.operator.is_some() {
                let _ = write!(line, " ({})", state(instance));
            }
            line
        }
        Presence::Left(left) => format!("{head} rev={} ({})", record.revision, left.as_str()),
    }
}

/// One snapshot in one line: time, `kind`, service, revision and the
/// instances as `id@address:port`.
fn snapshot_line(kind: &str, snapshot: &Snapshot, at: SystemTime) -> String {
    let ids: Vec<String> = snapshot
        .instances
        .iter()
        .map(|i| match &i.operator {
            Some(_) => format!("{}@{}({})", i.id, i.authority(), state(i)),
            None => format!("{}@{}", i.id, i.authority()),
        })
        .collect();
    format!(
        "{} {kind:<10} {} rev={} instances={} [{}]",
        humantime::format_rfc3339_millis(at),
        snapshot.service,
        snapshot.revision,
        snapshot.instances.len(),
        ids.join(" ")
    )
}

/// A service's stored snapshot as the line `watch` starts with, kind
/// `current`, stamped with when it was published.
pub fn current_line(stored: &Stored) -> String {
    snapshot_line("current", &stored.snapshot, stored.published)
}

/// The same as one JSON object, kind `current`.
pub fn current_json(stored: &Stored) -> Value {
    json!({
        "time": humantime::format_rfc3339_millis(stored.published).to_string(),
        "kind": "current",
        "service": stored.snapshot.service,
        "revision": stored.snapshot.revision,
        "instances": stored.snapshot.instances,
    })
}

/// Whether an operator overrode `instance`, and who: `live`, `drained by
/// alice`, `weight 5 by bob`, `drained by alice, weight 5`.
pub fn state(instance: &Instance) -> String {
    match &instance.operator {
        None => "live".to_owned(),
        Some(operator) => match (operator.drain, operator.weight) {
            (true, None) => format!("drained by {}", operator.by),
            (true, Some(weight)) => format!("drained by {}, weight {weight}", operator.by),
            (false, Some(weight)) => format!("weight {weight} by {}", operator.by),
            (false, None) => format!("set by {}", operator.by),
        },
    }
}

// The snapshot carries no time per instance (when it was last heard lives
// only in discovery), so the one time column is the service's: CHANGED, how
// long ago its last snapshot was published. TTL is the instance's own.
// STATE comes last: it may hold spaces (`drained by alice`).
const HEADER: [&str; 9] = [
    "SERVICE", "INSTANCE", "ADDRESS", "PORT", "WEIGHT", "TTL", "TAGS", "CHANGED", "STATE",
];

/// The catalog as a table: one row per instance, a `-` row for a service
/// that has none. CHANGED is how long ago the service's snapshot was
/// published, that is, since the service's last change; STATE whether an
/// operator overrode the instance ([`state`]).
pub fn catalog_table(stored: &[Stored], now: SystemTime) -> String {
    let mut rows: Vec<[String; 9]> = vec![HEADER.map(str::to_owned)];
    for Stored {
        snapshot,
        published,
    } in stored
    {
        let changed = age(*published, now);
        if snapshot.instances.is_empty() {
            let mut row: [String; 9] = std::array::from_fn(|_| "-".to_owned());
            row[0] = snapshot.service.clone();
            row[7] = changed.clone();
            rows.push(row);
        }
        for instance in &snapshot.instances {
            rows.push([
                snapshot.service.clone(),
                instance.id.clone(),
                instance.address.clone(),
                instance.port.to_string(),
                instance.weight.to_string(),
                humantime::format_duration(instance.ttl()).to_string(),
                if instance.tags.is_empty() {
                    "-".into()
                } else {
                    instance.tags.join(",")
                },
                changed.clone(),
                state(instance),
            ]);
        }
    }
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut table = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        table.push_str(cells.join("  ").trim_end());
        table.push('\n');
    }
    table
}

/// A service the catalog has never seen, and the ones it has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the catalog has no service named {service} (it has: {known})")]
pub struct UnknownService {
    pub service: String,
    /// The services it has, comma-separated, or `none`.
    pub known: String,
}

/// Keeps only `service`'s snapshot; an error naming it when there is none.
pub fn only_service(stored: Vec<Stored>, service: &str) -> Result<Vec<Stored>, UnknownService> {
    let known: Vec<&str> = stored.iter().map(|s| s.snapshot.service.as_str()).collect();
    let known = if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    };
    let kept: Vec<Stored> = stored
        .into_iter()
        .filter(|s| s.snapshot.service == service)
        .collect();
    if kept.is_empty() {
        return Err(UnknownService {
            service: service.to_owned(),
            known,
        });
    }
    Ok(kept)
}

/// The catalog as JSON: one object per service with its revision, when it
/// was published, and its instances.
pub fn catalog_json(stored: &[Stored], now: SystemTime) -> Value {
    Value::Array(
        stored
            .iter()
            .map(|Stored { snapshot, published }| {
                json!({
                    "service": snapshot.service,
                    "revision": snapshot.revision,
                    "published": humantime::format_rfc3339_millis(*published).to_string(),
                    "age_ms": u64::try_from(now.duration_since(*published).unwrap_or_default().as_millis()).unwrap_or(u64::MAX),
                    "instances": snapshot.instances,
                })
            })
            .collect(),
    )
}

/// When `leader` took over, as an RFC 3339 time.
fn since(leader: &Leadership) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(leader.since_ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// Who writes the catalog, for `rollcall catalog`: `leader <replica> epoch
/// <n> since <time> (<age> ago)`, or that no replica ever led.
pub fn leader_line(leader: Option<&Leadership>, now: SystemTime) -> String {
    match leader {
        Some(leader) => {
            let at = SystemTime::UNIX_EPOCH + Duration::from_millis(leader.since_ms);
            format!(
                "leader {} epoch {} since {} ({} ago)",
                leader.replica,
                leader.epoch,
                since(leader),
                age(at, now)
            )
        }
        None => "no discovery replica has led this catalog yet".to_owned(),
    }
}

/// `1h2m`, `3m4s`, `5s`, rounded down to whole seconds.
fn age(published: SystemTime, now: SystemTime) -> String {
    let seconds = now.duration_since(published).unwrap_or_default().as_secs();
    humantime::format_duration(Duration::from_secs(seconds))
        .to_string()
        .replace(' ', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> SystemTime {
        humantime::parse_rfc3339("2026-11-27T12:00:00.250Z").expect("valid time")
    }

    const WEB_1: &str = r#"{"service":"web","id":"web-1","address":"127.0.0.1","port":5001,"ttl_ms":3000,"weight":2,"tags":["v2"]}"#;

    fn read(subject: &str, payload: &str) -> Observed {
        Observed::read(&Subjects::default(), subject, payload.as_bytes())
    }

    #[test]
    fn events_read_as_one_line_each() {
        let register = read("rollcall.register.web.web-1", WEB_1);
        assert_eq!(
            register.line(at()),
            "2026-11-27T12:00:00.250Z register   web/web-1 127.0.0.1:5001 ttl=3000ms weight=2 tags=v2"
        );
        let deregister = read("rollcall.deregister.web.web-1", "{}");
        assert_eq!(
            deregister.line(at()),
            "2026-11-27T12:00:00.250Z deregister web/web-1 -"
        );
        let with_record = read("rollcall.deregister.web.web-1", WEB_1);
        assert!(with_record.line(at()).ends_with("web/web-1 127.0.0.1:5001"));
    }

    #[test]
    fn partitioned_events_and_leaders_name_their_partition() {
        let heartbeat = read("rollcall.partition.1.heartbeat.web.web-1", WEB_1);
        assert!(heartbeat.is_heartbeat());
        assert_eq!(
            heartbeat.line(at()),
            "2026-11-27T12:00:00.250Z heartbeat  web/web-1 127.0.0.1:5001 ttl=3000ms weight=2 tags=v2 partition=1"
        );
        assert_eq!(heartbeat.json(at())["partition"], "1");
        assert_eq!(heartbeat.json(at())["kind"], "heartbeat");
        let beat = r#"{"replica":"shard-a","epoch":41,"since_ms":0}"#;
        let leader = read("rollcall.discovery.leader.3", beat);
        let (partition, said) = leader.leader().expect("a leader heartbeat");
        assert_eq!(
            (partition, said.replica.as_str(), said.epoch),
            (Some("3"), "shard-a", 41)
        );
        assert!(leader.line(at()).ends_with(" partition=3"));
        let unpartitioned = read("rollcall.discovery.leader", beat);
        assert_eq!(unpartitioned.leader().map(|(p, _)| p), Some(None));
        let junk = read("rollcall.partition.1.heartbeat.web.web-1", "{");
        assert!(junk.is_invalid());
        assert!(junk.line(at()).contains("rollcall.heartbeat.web.web-1"));
    }

    #[test]
    fn records_read_as_joined_changed_and_left_with_the_revision() {
        let joined = r#"{"service":"web","id":"a","revision":7,"instance":{"service":"web","id":"a","address":"127.0.0.1","port":1,"weight":2}}"#;
        let left = r#"{"service":"web","id":"a","revision":8,"left":"expired"}"#;
        let mut members = Membership::default();
        let mut lines = Vec::new();
        for payload in [joined, joined, left] {
            let mut observed = read("rollcall.catalog.web.a", payload);
            members.note(&mut observed);
            lines.push(observed.line(at()));
        }
        assert_eq!(
            lines,
            [
                "2026-11-27T12:00:00.250Z joined     web/a 127.0.0.1:1 rev=7 weight=2",
                "2026-11-27T12:00:00.250Z changed    web/a 127.0.0.1:1 rev=7 weight=2",
                "2026-11-27T12:00:00.250Z left       web/a rev=8 (expired)",
            ]
        );
        let value = read("rollcall.catalog.web.a", left).json(at());
        assert_eq!(value["kind"], "left");
        assert_eq!(value["revision"], 8);
        assert_eq!(value["left"], "expired");
        let value = read("rollcall.catalog.web.a", joined).json(at());
        assert_eq!(value["instance"]["port"], 1);
    }

    #[test]
    fn invalid_messages_are_shown_with_the_reason() {
        let observed = read("rollcall.register.web.web-1", r#"{"service":"web"}"#);
        assert!(observed.is_invalid());
        let line = observed.line(at());
        assert!(line.contains("invalid"), "{line}");
        assert!(line.contains("rollcall.register.web.web-1"), "{line}");
        assert!(line.contains("missing field `id`"), "{line}");
        let value = observed.json(at());
        assert_eq!(value["kind"], "invalid");
        assert!(read("rollcall.catalog.web.a", "[]").is_invalid());
        assert!(read("rollcall.hello.web.a", "{}").is_invalid());
        assert!(read("rollcall.register.web.a", "\u{0}\u{1}").is_invalid());
    }

    #[test]
    fn event_json_carries_the_record() {
        let value = read("rollcall.heartbeat.web.web-1", WEB_1).json(at());
        assert_eq!(value["kind"], "heartbeat");
        assert_eq!(value["time"], "2026-11-27T12:00:00.250Z");
        assert_eq!(value["instance"]["port"], 5001);
    }

    fn operator(drain: bool, weight: Option<u32>, by: &str) -> crate::protocol::Operator {
        crate::protocol::Operator {
            drain,
            weight,
            own_weight: 1,
            by: by.into(),
            at_ms: 0,
        }
    }

    #[test]
    fn overrides_read_as_one_line_and_show_in_snapshots() {
        let line = read(
            "rollcall.operator.weight.web.web-1",
            r#"{"by":"bob","weight":5}"#,
        )
        .line(at());
        assert!(
            line.ends_with("override   web/web-1 weight 5 by bob"),
            "{line}"
        );
        let own = read(
            "rollcall.operator.weight.web.web-1",
            r#"{"by":"bob","weight":null}"#,
        );
        assert!(own.line(at()).ends_with("web/web-1 weight own by bob"));
        assert_eq!(own.json(at())["weight"], Value::Null);
        assert_eq!(own.json(at())["action"], "weight");
        let bad = read("rollcall.operator.drain.web.web-1", r#"{"by":""}"#);
        assert!(bad.is_invalid(), "{bad:?}");
        let web = &stored()[1].snapshot;
        let line = snapshot_line("snapshot", web, at());
        assert!(
            line.ends_with(
                "[web-1@127.0.0.1:5001(drained by alice) web-2@10.0.0.2:80(weight 5 by bob)]"
            ),
            "{line}"
        );
        let mut both = web.instances[0].clone();
        both.operator = Some(operator(true, Some(3), "carol"));
        assert_eq!(state(&both), "drained by carol, weight 3");
        assert_eq!(state(&Instance::new("web", "x", "h", 1)), "live");
    }

    fn stored() -> Vec<Stored> {
        let mut a = Instance::new("web", "web-1", "127.0.0.1", 5001);
        a.weight = 0;
        a.operator = Some(operator(true, None, "alice"));
        let mut b = Instance::new("web", "web-2", "10.0.0.2", 80);
        b.tags = vec!["v2".into(), "canary".into()];
        b.weight = 5;
        b.operator = Some(operator(false, Some(5), "bob"));
        vec![
            Stored {
                snapshot: Snapshot {
                    service: "api".into(),
                    revision: 3,
                    instances: vec![],
                },
                published: at() - Duration::from_secs(3700),
            },
            Stored {
                snapshot: Snapshot {
                    service: "web".into(),
                    revision: 9,
                    instances: vec![a, b],
                },
                published: at() - Duration::from_millis(4900),
            },
        ]
    }

    #[test]
    fn the_catalog_reads_as_an_aligned_table() {
        let table = catalog_table(&stored(), at());
        let expected = "\
SERVICE  INSTANCE  ADDRESS    PORT  WEIGHT  TTL  TAGS       CHANGED  STATE
api      -         -          -     -       -    -          1h1m40s  -
web      web-1     127.0.0.1  5001  0       3s   -          4s       drained by alice
web      web-2     10.0.0.2   80    5       3s   v2,canary  4s       weight 5 by bob
";
        assert_eq!(table, expected);
    }

    #[test]
    fn one_service_is_kept_and_an_unknown_one_is_named() {
        let web = only_service(stored(), "web").expect("web is known");
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].snapshot.revision, 9);
        let error = only_service(stored(), "nope").expect_err("nope is unknown");
        assert_eq!(
            error.to_string(),
            "the catalog has no service named nope (it has: api, web)"
        );
        let error = only_service(Vec::new(), "web").expect_err("empty catalog");
        assert!(error.to_string().ends_with("(it has: none)"), "{error}");
    }

    #[test]
    fn the_current_state_reads_like_a_snapshot_stamped_when_published() {
        let state = stored();
        assert_eq!(
            current_line(&state[1]),
            "2026-11-27T11:59:55.350Z current    web rev=9 instances=2 [web-1@127.0.0.1:5001(drained by alice) web-2@10.0.0.2:80(weight 5 by bob)]"
        );
        let value = current_json(&state[0]);
        assert_eq!(value["kind"], "current");
        assert_eq!(value["service"], "api");
        assert_eq!(value["instances"], json!([]));
    }

    #[test]
    fn heartbeats_can_be_told_apart() {
        assert!(read("rollcall.heartbeat.web.web-1", WEB_1).is_heartbeat());
        assert!(!read("rollcall.register.web.web-1", WEB_1).is_heartbeat());
        assert!(!read("rollcall.heartbeat.web.web-1", "{").is_heartbeat());
    }

    #[test]
    fn the_catalog_as_json_lists_services_with_revisions() {
        let value = catalog_json(&stored(), at());
        assert_eq!(value[0]["service"], "api");
        assert_eq!(value[0]["instances"], json!([]));
        assert_eq!(value[1]["revision"], 9);
        assert_eq!(value[1]["age_ms"], 4900);
        assert_eq!(value[1]["instances"][1]["tags"], json!(["v2", "canary"]));
    }
}

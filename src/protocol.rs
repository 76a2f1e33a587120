//! The wire: the JSON records and NATS subjects of protocol version 1
//! (`docs/protocol.md`), and the rules every sender and receiver checks.
//!
//! Everything that crosses NATS is built and parsed here and nowhere else; the
//! catalog fold receives [`Event`]s that already passed these checks.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::partition::{partition_of, Partition};

/// The subject prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "rollcall";
/// Longest service, instance or prefix token.
pub const MAX_NAME_LEN: usize = 64;
/// `ttl_ms` when an Instance does not carry one.
pub const DEFAULT_TTL_MS: u64 = 3_000;
/// `weight` when an Instance does not carry one.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Allowed range of `ttl_ms`.
pub const TTL_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=600_000;
/// The largest event payload a receiver takes: a record is a few hundred
/// bytes; a bigger one would make every snapshot of its service that big.
pub const MAX_EVENT_BYTES: usize = 16 * 1024;
/// The most `tags`, and the most `meta` entries, one record may carry.
pub const MAX_LABELS: usize = 64;
/// Allowed range of `weight`.
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 0..=10_000;
/// Longest `address` (a DNS name is at most 253 characters).
pub const MAX_ADDRESS_LEN: usize = 253;

/// Why a name, subject or payload was refused. Each variant names the field or
/// token and the rule it broke, so one log line tells the sender what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{what} is empty; it must be 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ -")]
    EmptyName { what: &'static str },
    #[error("{what} {name:?} is {len} characters long; at most {MAX_NAME_LEN} are allowed")]
    NameTooLong {
        what: &'static str,
        name: String,
        len: usize,
    },
    #[error("{what} {name:?} contains {bad:?}; only A-Z a-z 0-9 _ - are allowed")]
    BadNameChar {
        what: &'static str,
        name: String,
        bad: char,
    },
    #[error("subject {subject:?} is not a rollcall subject under prefix {prefix:?}")]
    ForeignSubject { subject: String, prefix: String },
    #[error("subject {subject:?} has an unknown kind {kind:?}; expected register, heartbeat, deregister or catalog")]
    UnknownKind { subject: String, kind: String },
    #[error("subject {subject:?} has the wrong number of tokens; expected {expected}")]
    SubjectShape {
        subject: String,
        expected: &'static str,
    },
    #[error("payload is not valid JSON for {what}: {reason}")]
    BadJson { what: &'static str, reason: String },
    #[error("field `{field}` is {value}, outside the allowed range {range}")]
    OutOfRange {
        field: &'static str,
        value: i128,
        range: &'static str,
    },
    #[error("field `address` {reason}")]
    BadAddress { reason: &'static str },
    #[error("field `{field}` is {payload:?} but the subject says {subject:?}; they must be equal")]
    SubjectMismatch {
        field: &'static str,
        payload: String,
        subject: String,
    },
    #[error("snapshot of {service:?} lists instance {id:?} twice or out of id order")]
    UnsortedSnapshot { service: String, id: String },
    #[error("{what} is too large: {size}, at most {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("a {kind} must not carry `operator`: only an operator sets it, on <prefix>.operator.<action>.<service>.<instance>")]
    OperatorInEvent { kind: EventKind },
    #[error("subject {subject:?} has an unknown operator action {action:?}; expected drain, undrain, weight or clear")]
    UnknownAction { subject: String, action: String },
    #[error("field `by` is {len} characters long; it must be 1 to {MAX_NAME_LEN} characters naming who asks")]
    BadBy { len: usize },
    #[error("action `weight` needs field `weight`: an integer 0..10000, or null to go back to the instance's own weight")]
    MissingWeight,
    #[error("field `weight` is {value}; it must be an integer 0..10000, or null to go back to the instance's own weight")]
    BadWeight { value: String },
    #[error("field `weight` is only for action `weight`, not `{action}`")]
    UnexpectedWeight { action: OverrideAction },
    #[error("subject {subject:?} came through partition {token} but service {service:?} hashes to partition {hashed} of {count}: the server's mapping and `--partitions .../{count}` must have the same number of partitions")]
    WrongPartition {
        subject: String,
        service: String,
        token: String,
        hashed: u32,
        count: u32,
    },
    #[error("catalog record of {service}/{id}: {reason}")]
    BadRecord {
        service: String,
        id: String,
        reason: &'static str,
    },
}

/// Checks a service, instance or prefix token: 1 to 64 characters from
/// `A-Z a-z 0-9 _ -`.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), ProtocolError> {
    if name.is_empty() {
        return Err(ProtocolError::EmptyName { what });
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(ProtocolError::BadNameChar {
            what,
            name: name.to_owned(),
            bad,
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ProtocolError::NameTooLong {
            what,
            name: name.to_owned(),
            len: name.len(),
        });
    }
    Ok(())
}

/// One instance of a service: the register and heartbeat payload, and an
/// element of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawInstance")]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub ttl_ms: u64,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// An operator's override, merged by discovery over the instance's own
    /// record; only in snapshots, never in an instance's own events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<Operator>,
}

/// What an operator set on one instance (`rollcall drain`, `rollcall
/// weight`): carried in snapshots beside the instance, whose `weight` is
/// then the effective one (0 while drained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    /// Drained: takes no new requests; requests in flight finish.
    #[serde(default)]
    pub drain: bool,
    /// The weight the operator set, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The weight the instance itself announces.
    pub own_weight: u32,
    /// Who set it, as the operator's command said.
    pub by: String,
    /// When it was last changed, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// What an operator asks of one instance: the `<action>` token of
/// `<prefix>.operator.<action>.<service>.<instance>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverrideAction {
    Drain,
    Undrain,
    Weight,
    Clear,
}

impl OverrideAction {
    pub const ALL: [OverrideAction; 4] = [
        OverrideAction::Drain,
        OverrideAction::Undrain,
        OverrideAction::Weight,
        OverrideAction::Clear,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OverrideAction::Drain => "drain",
            OverrideAction::Undrain => "undrain",
            OverrideAction::Weight => "weight",
            OverrideAction::Clear => "clear",
        }
    }

    fn parse(token: &str) -> Option<OverrideAction> {
        OverrideAction::ALL
            .into_iter()
            .find(|action| action.as_str() == token)
    }
}

impl fmt::Display for OverrideAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an override message changes, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideChange {
    Drain,
    Undrain,
    /// The operator's weight; `None` (`"weight": null`) drops it, so the
    /// instance's own weight applies again.
    Weight(Option<u32>),
    Clear,
}

impl OverrideChange {
    pub fn action(self) -> OverrideAction {
        match self {
            OverrideChange::Drain => OverrideAction::Drain,
            OverrideChange::Undrain => OverrideAction::Undrain,
            OverrideChange::Weight(_) => OverrideAction::Weight,
            OverrideChange::Clear => OverrideAction::Clear,
        }
    }
}

impl fmt::Display for OverrideChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverrideChange::Weight(Some(weight)) => write!(f, "weight {weight}"),
            OverrideChange::Weight(None) => f.write_str("weight own"),
            other => f.write_str(other.action().as_str()),
        }
    }
}

/// One validated override message: which instance, what, and who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub service: String,
    pub id: String,
    pub change: OverrideChange,
    /// Who asks, 1 to 64 characters.
    pub by: String,
}

/// The Override payload as it arrives: `weight` kept as raw JSON, so that
/// absent, `null` and a bad value are told apart.
#[derive(Deserialize)]
struct RawOverride {
    by: String,
    #[serde(default, deserialize_with = "present")]
    weight: Option<serde_json::Value>,
}

/// A field that is present, `null` included.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(deserializer).map(Some)
}

/// Discovery's answer to an override sent as a request: the instance as
/// it now stands (its `weight` the effective one), or why nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<Instance>,
    /// Why the override was refused, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the override was refused, as a metric label (`unknown_instance`,
    /// `bad_json`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Instance {
    /// A record with the protocol's defaults for `ttl_ms` and `weight`, no
    /// tags and no meta. Call [`Instance::validate`] before sending it.
    pub fn new(
        service: impl Into<String>,
        id: impl Into<String>,
        address: impl Into<String>,
        port: u16,
    ) -> Self {
        Instance {
            service: service.into(),
            id: id.into(),
            address: address.into(),
            port,
            ttl_ms: DEFAULT_TTL_MS,
            weight: DEFAULT_WEIGHT,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            operator: None,
        }
    }

    /// Checks every rule of the protocol that the types alone do not.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        validate_name("service", &self.service)?;
        validate_name("id", &self.id)?;
        validate_address(&self.address)?;
        check_range("port", i128::from(self.port), &(1..=65_535), "1..65535")?;
        check_range(
            "ttl_ms",
            i128::from(self.ttl_ms),
            &(i128::from(*TTL_MS_RANGE.start())..=i128::from(*TTL_MS_RANGE.end())),
            "100..600000",
        )?;
        check_range(
            "weight",
            i128::from(self.weight),
            &(i128::from(*WEIGHT_RANGE.start())..=i128::from(*WEIGHT_RANGE.end())),
            "0..10000",
        )?;
        for (what, count) in [
            ("field `tags` (entries)", self.tags.len()),
            ("field `meta` (entries)", self.meta.len()),
        ] {
            if count > MAX_LABELS {
                return Err(ProtocolError::TooLarge {
                    what,
                    size: count,
                    limit: MAX_LABELS,
                });
            }
        }
        Ok(())
    }

    /// The time to live as a duration.
    pub fn ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.ttl_ms)
    }

    /// `address:port`, bracketing IPv6 literals, ready for a URI authority.
    pub fn authority(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

fn validate_address(address: &str) -> Result<(), ProtocolError> {
    if address.is_empty() {
        return Err(ProtocolError::BadAddress {
            reason: "is empty; give an IP address or DNS name",
        });
    }
    if address.len() > MAX_ADDRESS_LEN {
        return Err(ProtocolError::BadAddress {
            reason: "is longer than 253 characters",
        });
    }
    if address
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "/?#@".contains(c))
    {
        return Err(ProtocolError::BadAddress {
            reason: "contains whitespace or one of / ? # @; give a bare IP address or DNS name",
        });
    }
    Ok(())
}

fn check_range(
    field: &'static str,
    value: i128,
    allowed: &std::ops::RangeInclusive<i128>,
    range: &'static str,
) -> Result<(), ProtocolError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ProtocolError::OutOfRange {
            field,
            value,
            range,
        })
    }
}

/// The Instance as it arrives: numbers wide enough that an out-of-range value
/// is reported by field and range, not as a serde integer overflow.
#[derive(Deserialize)]
struct RawInstance {
    service: String,
    id: String,
    address: String,
    port: i64,
    #[serde(default = "default_ttl")]
    ttl_ms: i64,
    #[serde(default = "default_weight")]
    weight: i64,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    #[serde(default)]
    operator: Option<Operator>,
}

fn default_ttl() -> i64 {
    DEFAULT_TTL_MS as i64
}

fn default_weight() -> i64 {
    i64::from(DEFAULT_WEIGHT)
}

impl TryFrom<RawInstance> for Instance {
    type Error = ProtocolError;

    fn try_from(raw: RawInstance) -> Result<Self, ProtocolError> {
        check_range("port", raw.port.into(), &(1..=65_535), "1..65535")?;
        check_range("ttl_ms", raw.ttl_ms.into(), &(100..=600_000), "100..600000")?;
        check_range("weight", raw.weight.into(), &(0..=10_000), "0..10000")?;
        let instance = Instance {
            service: raw.service,
            id: raw.id,
            address: raw.address,
            port: raw.port as u16,
            ttl_ms: raw.ttl_ms as u64,
            weight: raw.weight as u32,
            tags: raw.tags,
            meta: raw.meta,
            operator: raw.operator,
        };
        instance.validate()?;
        Ok(instance)
    }
}

/// The full live set of one service, published on `<prefix>.catalog.<service>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub service: String,
    pub revision: u64,
    pub instances: Vec<Instance>,
}

impl Snapshot {
    /// Checks the service name, and that instances belong to the service and
    /// are sorted by `id` without repeats.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        validate_name("service", &self.service)?;
        let mut previous: Option<&str> = None;
        for instance in &self.instances {
            if instance.service != self.service {
                return Err(ProtocolError::SubjectMismatch {
                    field: "instances[].service",
                    payload: instance.service.clone(),
                    subject: self.service.clone(),
                });
            }
            if previous.is_some_and(|p| p >= instance.id.as_str()) {
                return Err(ProtocolError::UnsortedSnapshot {
                    service: self.service.clone(),
                    id: instance.id.clone(),
                });
            }
            previous = Some(&instance.id);
        }
        Ok(())
    }
}

/// Why an instance left, as its tombstone record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Left {
    /// It said goodbye (or a new leader knew it had left).
    Deregistered,
    /// Nothing was heard from it for its `ttl_ms`.
    Expired,
}

impl Left {
    pub fn as_str(self) -> &'static str {
        match self {
            Left::Deregistered => "deregistered",
            Left::Expired => "expired",
        }
    }
}

/// What a catalog record says of its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// Live, as balancers route to it: `weight` the effective one, with the
    /// operator's override if any.
    Live(Instance),
    /// Gone: a tombstone, kept by the catalog stream for its TTL.
    Left(Left),
}

/// One instance's entry in the catalog (catalog version 3), stored on
/// `<prefix>.catalog-store.<service>.<instance>` and republished on
/// `<prefix>.catalog.<service>.<instance>`. `revision` is the service's
/// revision at this change: it strictly increases across all the records of
/// one service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRecord")]
pub struct Record {
    pub service: String,
    pub id: String,
    pub revision: u64,
    pub presence: Presence,
}

impl Record {
    /// The live instance, `None` for a tombstone.
    pub fn instance(&self) -> Option<&Instance> {
        match &self.presence {
            Presence::Live(instance) => Some(instance),
            Presence::Left(_) => None,
        }
    }
}

impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut record = serializer.serialize_struct("Record", 4)?;
        record.serialize_field("service", &self.service)?;
        record.serialize_field("id", &self.id)?;
        record.serialize_field("revision", &self.revision)?;
        match &self.presence {
            Presence::Live(instance) => record.serialize_field("instance", instance)?,
            Presence::Left(left) => record.serialize_field("left", left)?,
        }
        record.end()
    }
}

#[derive(Deserialize)]
struct RawRecord {
    service: String,
    id: String,
    revision: u64,
    instance: Option<Instance>,
    left: Option<Left>,
}

impl TryFrom<RawRecord> for Record {
    type Error = ProtocolError;

    fn try_from(raw: RawRecord) -> Result<Self, ProtocolError> {
        validate_name("service", &raw.service)?;
        validate_name("id", &raw.id)?;
        let bad = |reason| ProtocolError::BadRecord {
            service: raw.service.clone(),
            id: raw.id.clone(),
            reason,
        };
        let presence = match (raw.instance, raw.left) {
            (Some(instance), None) => {
                check_tokens(&instance.service, &instance.id, &raw.service, &raw.id)?;
                Presence::Live(instance)
            }
            (None, Some(left)) => Presence::Left(left),
            (Some(_), Some(_)) => return Err(bad("it carries both `instance` and `left`")),
            (None, None) => return Err(bad("it carries neither `instance` nor `left`")),
        };
        Ok(Record {
            service: raw.service,
            id: raw.id,
            revision: raw.revision,
            presence,
        })
    }
}

/// How often the leading discovery replica says so on
/// [`Subjects::leader_heartbeat`].
pub const LEADER_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(100);

/// Which discovery replica writes the catalog (protocol version 2, catalog
/// side): the payload of the fence message and of the leader heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leadership {
    /// The replica's name: `<host>-<pid>-<start>` unless configured.
    pub replica: String,
    /// The catalog stream's sequence of the fence message that made this
    /// replica leader; 0 in the fence message itself (the sequence is only
    /// known once stored). Higher is newer.
    #[serde(default)]
    pub epoch: u64,
    /// When it took over, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// The kinds of event subject a service (or an agent for it) publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Register,
    Heartbeat,
    Deregister,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [
        EventKind::Register,
        EventKind::Heartbeat,
        EventKind::Deregister,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Register => "register",
            EventKind::Heartbeat => "heartbeat",
            EventKind::Deregister => "deregister",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated event, as the catalog fold consumes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Register(Instance),
    Heartbeat(Instance),
    Deregister { service: String, id: String },
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Register(_) => EventKind::Register,
            Event::Heartbeat(_) => EventKind::Heartbeat,
            Event::Deregister { .. } => EventKind::Deregister,
        }
    }

    pub fn service(&self) -> &str {
        match self {
            Event::Register(i) | Event::Heartbeat(i) => &i.service,
            Event::Deregister { service, .. } => service,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Event::Register(i) | Event::Heartbeat(i) => &i.id,
            Event::Deregister { id, .. } => id,
        }
    }
}

/// The deregister payload: `{}` or an Instance. Only `service` and `id` are
/// looked at, and only to check them against the subject.
#[derive(Deserialize)]
struct DeregisterBody {
    service: Option<String>,
    id: Option<String>,
}

/// The subjects of one fleet, all under one prefix; a discovery writer of
/// one partition uses [`Subjects::in_partition`]'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    partition: Option<Partition>,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects {
            prefix: DEFAULT_PREFIX.to_owned(),
            partition: None,
        }
    }
}

impl Subjects {
    /// Subjects under `prefix`, a single token with the same rules as names.
    pub fn new(prefix: &str) -> Result<Self, ProtocolError> {
        validate_name("prefix", prefix)?;
        Ok(Subjects {
            prefix: prefix.to_owned(),
            partition: None,
        })
    }

    /// The subjects of one partition's writer: its events, overrides,
    /// fence and leader heartbeat are the partition's (docs/protocol.md,
    /// "Partitions"); the catalog is the fleet's.
    pub fn in_partition(&self, partition: Partition) -> Subjects {
        Subjects {
            prefix: self.prefix.clone(),
            partition: Some(partition),
        }
    }

    pub fn partition(&self) -> Option<Partition> {
        self.partition
    }

    /// Whether `service` is this writer's: always when unpartitioned.
    pub fn owns(&self, service: &str) -> bool {
        self.partition.is_none_or(|p| p.owns(service))
    }

    /// The partition token and the event or override subject as its sender
    /// published it, of a subject the server's mapping partitioned
    /// (`<prefix>.partition.<p>.<rest>` gives `<p>` and `<prefix>.<rest>`);
    /// `None` for any other subject.
    pub fn unmap<'s>(&self, subject: &'s str) -> Option<(&'s str, String)> {
        let rest = self.strip_prefix(subject).ok()?;
        let (token, rest) = rest.strip_prefix("partition.")?.split_once('.')?;
        Some((token, format!("{}.{rest}", self.prefix)))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.<kind>.<service>.<instance>`.
    pub fn event(&self, kind: EventKind, service: &str, id: &str) -> String {
        format!("{}.{}.{service}.{id}", self.prefix, kind.as_str())
    }

    /// `<prefix>.*.*.*`: every event of every kind, on one subscription so
    /// that one sender's events arrive in the order they were sent; a
    /// partition's, `<prefix>.partition.<p>.*.*.*`.
    pub fn events_wildcard(&self) -> String {
        match self.partition {
            None => format!("{}.*.*.*", self.prefix),
            Some(p) => format!("{}.partition.{}.*.*.*", self.prefix, p.index()),
        }
    }

    /// `<prefix>.catalog.<service>.<instance>`: where the catalog stream
    /// republishes the record of one instance.
    pub fn catalog(&self, service: &str, id: &str) -> String {
        format!("{}.catalog.{service}.{id}", self.prefix)
    }

    /// `<prefix>.catalog.<service>.*`: the records of one service.
    pub fn service_catalog(&self, service: &str) -> String {
        format!("{}.catalog.{service}.*", self.prefix)
    }

    /// `<prefix>.catalog.>`: every record.
    pub fn catalog_wildcard(&self) -> String {
        format!("{}.catalog.>", self.prefix)
    }

    /// `<prefix>.catalog-store.<service>.<instance>`: where the leading
    /// discovery writes a record; the catalog stream keeps it and
    /// republishes it on [`Subjects::catalog`] only once stored, so a refused
    /// write reaches no balancer.
    pub(crate) fn catalog_store(&self, service: &str, id: &str) -> String {
        format!("{}.catalog-store.{service}.{id}", self.prefix)
    }

    /// `<prefix>.catalog-store.>`: every stored record.
    pub(crate) fn catalog_store_wildcard(&self) -> String {
        format!("{}.catalog-store.>", self.prefix)
    }

    /// `<prefix>.catalog-store.*`: where catalog version 2 stored one
    /// snapshot per service (read once, when reshaping the stream).
    pub(crate) fn catalog_store_v2(&self) -> String {
        format!("{}.catalog-store.*", self.prefix)
    }

    /// `<prefix>.catalog-fence`: the one stored message naming the leading
    /// discovery replica; its stream sequence is the leader's epoch. A
    /// partition's: `<prefix>.catalog-fence.<p>`.
    pub(crate) fn catalog_fence(&self) -> String {
        match self.partition {
            None => format!("{}.catalog-fence", self.prefix),
            Some(p) => format!("{}.catalog-fence.{}", self.prefix, p.index()),
        }
    }

    /// The catalog stream's fence subjects: the fleet's and every
    /// partition's (`<prefix>.catalog-fence.*`).
    pub(crate) fn catalog_fences(&self) -> [String; 2] {
        [
            format!("{}.catalog-fence", self.prefix),
            format!("{}.catalog-fence.*", self.prefix),
        ]
    }

    /// `<prefix>.operator.<action>.<service>.<instance>`.
    pub fn operator(&self, action: OverrideAction, service: &str, id: &str) -> String {
        format!(
            "{}.operator.{}.{service}.{id}",
            self.prefix,
            action.as_str()
        )
    }

    /// `<prefix>.operator.>`: every override; a partition's,
    /// `<prefix>.partition.<p>.operator.>`.
    pub fn operator_wildcard(&self) -> String {
        match self.partition {
            None => format!("{}.operator.>", self.prefix),
            Some(p) => format!("{}.partition.{}.operator.>", self.prefix, p.index()),
        }
    }

    /// `<prefix>.operator.*.<service>.*`: every override of one service.
    pub fn service_overrides(&self, service: &str) -> String {
        format!("{}.operator.*.{service}.*", self.prefix)
    }

    /// Whether `subject` is under `<prefix>.operator.`, valid or not.
    pub fn is_operator(&self, subject: &str) -> bool {
        self.strip_prefix(subject)
            .is_ok_and(|rest| rest.starts_with("operator."))
    }

    /// Splits an override subject into its action and its service and
    /// instance tokens, checking the tokens against the name rules.
    pub fn parse_operator_subject<'s>(
        &self,
        subject: &'s str,
    ) -> Result<(OverrideAction, &'s str, &'s str), ProtocolError> {
        let shape = || ProtocolError::SubjectShape {
            subject: subject.to_owned(),
            expected: "<prefix>.operator.<action>.<service>.<instance>",
        };
        let rest = self.strip_events_prefix(subject)?;
        let rest = rest.strip_prefix("operator.").ok_or_else(shape)?;
        let tokens: Vec<&str> = rest.split('.').collect();
        let [action, service, id] = tokens[..] else {
            return Err(shape());
        };
        let action = OverrideAction::parse(action).ok_or_else(|| ProtocolError::UnknownAction {
            subject: subject.to_owned(),
            action: action.to_owned(),
        })?;
        validate_name("service token", service)?;
        validate_name("instance token", id)?;
        self.check_partition(subject, service)?;
        Ok((action, service, id))
    }

    /// Parses and checks one override message: the subject's tokens, the
    /// JSON, `by`, and `weight` (required, and only allowed, for `weight`).
    pub fn parse_override(&self, subject: &str, payload: &[u8]) -> Result<Override, ProtocolError> {
        let (action, service, id) = self.parse_operator_subject(subject)?;
        if payload.len() > MAX_EVENT_BYTES {
            return Err(ProtocolError::TooLarge {
                what: "the override payload (bytes)",
                size: payload.len(),
                limit: MAX_EVENT_BYTES,
            });
        }
        let raw: RawOverride =
            serde_json::from_slice(payload).map_err(|e| ProtocolError::BadJson {
                what: "an Override",
                reason: e.to_string(),
            })?;
        let len = raw.by.chars().count();
        if len == 0 || len > MAX_NAME_LEN {
            return Err(ProtocolError::BadBy { len });
        }
        let change = match (action, raw.weight) {
            (OverrideAction::Weight, None) => return Err(ProtocolError::MissingWeight),
            (OverrideAction::Weight, Some(value)) => {
                OverrideChange::Weight(override_weight(&value)?)
            }
            (action, Some(_)) => return Err(ProtocolError::UnexpectedWeight { action }),
            (OverrideAction::Drain, None) => OverrideChange::Drain,
            (OverrideAction::Undrain, None) => OverrideChange::Undrain,
            (OverrideAction::Clear, None) => OverrideChange::Clear,
        };
        Ok(Override {
            service: service.to_owned(),
            id: id.to_owned(),
            change,
            by: raw.by,
        })
    }

    /// `<prefix>.discovery.leader`: the leader's heartbeat (plain NATS, not
    /// stored), a [`Leadership`] every [`LEADER_HEARTBEAT`]; a partition's
    /// leader: `<prefix>.discovery.leader.<p>`.
    pub fn leader_heartbeat(&self) -> String {
        match self.partition {
            None => format!("{}.discovery.leader", self.prefix),
            Some(p) => format!("{}.discovery.leader.{}", self.prefix, p.index()),
        }
    }

    /// `<prefix>.discovery.leader.*`: every partition's leader heartbeat.
    pub fn partition_leaders(&self) -> String {
        format!("{}.discovery.leader.*", self.prefix)
    }

    /// `<prefix>.>`: everything of this fleet.
    pub fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// The JetStream stream that keeps the last snapshot per service:
    /// `<PREFIX>_CATALOG`.
    pub fn catalog_stream(&self) -> String {
        format!("{}_CATALOG", self.prefix.to_ascii_uppercase())
    }

    /// Splits an event subject into its kind and its service and instance
    /// tokens, checking the tokens against the name rules.
    pub fn parse_event_subject<'s>(
        &self,
        subject: &'s str,
    ) -> Result<(EventKind, &'s str, &'s str), ProtocolError> {
        let rest = self.strip_events_prefix(subject)?;
        let mut tokens = rest.split('.');
        let kind = match tokens.next().unwrap_or_default() {
            "register" => EventKind::Register,
            "heartbeat" => EventKind::Heartbeat,
            "deregister" => EventKind::Deregister,
            other => {
                return Err(ProtocolError::UnknownKind {
                    subject: subject.to_owned(),
                    kind: other.to_owned(),
                })
            }
        };
        match (tokens.next(), tokens.next(), tokens.next()) {
            (Some(service), Some(id), None) => {
                validate_name("service token", service)?;
                validate_name("instance token", id)?;
                self.check_partition(subject, service)?;
                Ok((kind, service, id))
            }
            _ => Err(ProtocolError::SubjectShape {
                subject: subject.to_owned(),
                expected: "<prefix>.<kind>.<service>.<instance>",
            }),
        }
    }

    /// The service and instance tokens of a record's subject (live, or as
    /// the catalog stream stores it).
    pub(crate) fn parse_catalog_subject<'s>(
        &self,
        subject: &'s str,
    ) -> Result<(&'s str, &'s str), ProtocolError> {
        let rest = self.strip_prefix(subject)?;
        let mut tokens = rest.split('.');
        match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
            (Some("catalog" | "catalog-store"), Some(service), Some(id), None) => {
                validate_name("service token", service)?;
                validate_name("instance token", id)?;
                Ok((service, id))
            }
            (Some("catalog" | "catalog-store"), ..) => Err(ProtocolError::SubjectShape {
                subject: subject.to_owned(),
                expected: "<prefix>.catalog.<service>.<instance>",
            }),
            (kind, ..) => Err(ProtocolError::UnknownKind {
                subject: subject.to_owned(),
                kind: kind.unwrap_or_default().to_owned(),
            }),
        }
    }

    /// The service token of a snapshot's subject as catalog versions 1
    /// (`<prefix>.catalog.<service>`) and 2 (`<prefix>.catalog-store.<service>`)
    /// stored it.
    fn parse_snapshot_subject<'s>(&self, subject: &'s str) -> Result<&'s str, ProtocolError> {
        let rest = self.strip_prefix(subject)?;
        match rest.split_once('.') {
            Some(("catalog" | "catalog-store", service)) if !service.contains('.') => {
                validate_name("service token", service)?;
                Ok(service)
            }
            Some(("catalog" | "catalog-store", _)) => Err(ProtocolError::SubjectShape {
                subject: subject.to_owned(),
                expected: "<prefix>.catalog.<service>",
            }),
            _ => Err(ProtocolError::UnknownKind {
                subject: subject.to_owned(),
                kind: rest.split('.').next().unwrap_or_default().to_owned(),
            }),
        }
    }

    /// What follows `<prefix>.` of an event or override subject, or
    /// `<prefix>.partition.<p>.` of a partition's.
    fn strip_events_prefix<'s>(&self, subject: &'s str) -> Result<&'s str, ProtocolError> {
        let rest = self.strip_prefix(subject)?;
        let Some(partition) = self.partition else {
            return Ok(rest);
        };
        rest.strip_prefix("partition.")
            .and_then(|rest| rest.split_once('.'))
            .filter(|(token, _)| token.parse::<u32>().ok() == Some(partition.index()))
            .map(|(_, rest)| rest)
            .ok_or_else(|| ProtocolError::SubjectShape {
                subject: subject.to_owned(),
                expected:
                    "<prefix>.partition.<p>.<kind>.<service>.<instance> with this writer's <p>",
            })
    }

    /// A partition's writer refuses a service that does not hash into its
    /// partition: the server's mapping has another number of partitions.
    fn check_partition(&self, subject: &str, service: &str) -> Result<(), ProtocolError> {
        let Some(partition) = self.partition else {
            return Ok(());
        };
        let hashed = partition_of(service, partition.count());
        if hashed == partition.index() {
            return Ok(());
        }
        Err(ProtocolError::WrongPartition {
            subject: subject.to_owned(),
            service: service.to_owned(),
            token: partition.index().to_string(),
            hashed,
            count: partition.count(),
        })
    }

    fn strip_prefix<'s>(&self, subject: &'s str) -> Result<&'s str, ProtocolError> {
        subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .ok_or_else(|| ProtocolError::ForeignSubject {
                subject: subject.to_owned(),
                prefix: self.prefix.clone(),
            })
    }

    /// Parses and checks one event message: the subject's tokens, the JSON,
    /// every field rule, and that `service`/`id` equal the subject's tokens.
    pub fn parse_event(&self, subject: &str, payload: &[u8]) -> Result<Event, ProtocolError> {
        let (kind, service, id) = self.parse_event_subject(subject)?;
        if payload.len() > MAX_EVENT_BYTES {
            return Err(ProtocolError::TooLarge {
                what: "the event payload (bytes)",
                size: payload.len(),
                limit: MAX_EVENT_BYTES,
            });
        }
        match kind {
            EventKind::Register | EventKind::Heartbeat => {
                let instance: Instance =
                    serde_json::from_slice(payload).map_err(|e| ProtocolError::BadJson {
                        what: "an Instance",
                        reason: e.to_string(),
                    })?;
                check_tokens(&instance.service, &instance.id, service, id)?;
                if instance.operator.is_some() {
                    return Err(ProtocolError::OperatorInEvent { kind });
                }
                Ok(if kind == EventKind::Register {
                    Event::Register(instance)
                } else {
                    Event::Heartbeat(instance)
                })
            }
            EventKind::Deregister => {
                // An empty body means the same as `{}`: the subject says it all.
                if !payload.iter().all(u8::is_ascii_whitespace) {
                    let body: DeregisterBody =
                        serde_json::from_slice(payload).map_err(|e| ProtocolError::BadJson {
                            what: "a deregister ({} or an Instance)",
                            reason: e.to_string(),
                        })?;
                    check_tokens(
                        body.service.as_deref().unwrap_or(service),
                        body.id.as_deref().unwrap_or(id),
                        service,
                        id,
                    )?;
                }
                Ok(Event::Deregister {
                    service: service.to_owned(),
                    id: id.to_owned(),
                })
            }
        }
    }

    /// Parses and checks one record of the catalog (live or stored): the
    /// subject's tokens, the JSON, and that `service`/`id` equal them.
    pub fn parse_record(&self, subject: &str, payload: &[u8]) -> Result<Record, ProtocolError> {
        let (service, id) = self.parse_catalog_subject(subject)?;
        let record: Record =
            serde_json::from_slice(payload).map_err(|e| ProtocolError::BadJson {
                what: "a Record",
                reason: e.to_string(),
            })?;
        check_tokens(&record.service, &record.id, service, id)?;
        Ok(record)
    }

    /// Parses and checks one snapshot as catalog versions 1 and 2 stored
    /// it, for reshaping an old stream.
    pub(crate) fn parse_snapshot(
        &self,
        subject: &str,
        payload: &[u8],
    ) -> Result<Snapshot, ProtocolError> {
        let service = self.parse_snapshot_subject(subject)?;
        let snapshot: Snapshot =
            serde_json::from_slice(payload).map_err(|e| ProtocolError::BadJson {
                what: "a Snapshot",
                reason: e.to_string(),
            })?;
        if snapshot.service != service {
            return Err(ProtocolError::SubjectMismatch {
                field: "service",
                payload: snapshot.service,
                subject: service.to_owned(),
            });
        }
        snapshot.validate()?;
        Ok(snapshot)
    }

    /// Every event and override of one service as a server mapping
    /// partitioned them: `<prefix>.partition.*.*.<service>.*` and
    /// `<prefix>.partition.*.operator.*.<service>.*`.
    pub fn partitioned_service(&self, service: &str) -> [String; 2] {
        [
            format!("{}.partition.*.*.{service}.*", self.prefix),
            format!("{}.partition.*.operator.*.{service}.*", self.prefix),
        ]
    }

    /// `<prefix>.*.<service>.*`: every event of one service.
    pub fn service_events(&self, service: &str) -> String {
        format!("{}.*.{service}.*", self.prefix)
    }

    /// Whether `subject` is one of discovery's own writes to the catalog
    /// stream (a record's store subject or the fence): people and balancers
    /// follow the republished records instead, which are only the stored
    /// ones.
    pub fn is_catalog_write(&self, subject: &str) -> bool {
        self.strip_prefix(subject).is_ok_and(|rest| {
            rest.starts_with("catalog-store.")
                || rest == "catalog-fence"
                || rest.starts_with("catalog-fence.")
        })
    }

    /// Whether `subject` is under `<prefix>.catalog.`, valid or not.
    pub(crate) fn is_catalog(&self, subject: &str) -> bool {
        self.strip_prefix(subject)
            .is_ok_and(|rest| rest.starts_with("catalog."))
    }

    /// Whether `subject` is a catalog record's, stored or republished: it
    /// has as many tokens as an event, so the event wildcard
    /// ([`Subjects::events_wildcard`]) hears it too, and it is no event.
    pub fn is_catalog_record(&self, subject: &str) -> bool {
        self.strip_prefix(subject)
            .is_ok_and(|rest| rest.starts_with("catalog.") || rest.starts_with("catalog-store."))
    }
}

/// The `weight` of a `weight` override: `null` or an integer in
/// [`WEIGHT_RANGE`].
fn override_weight(value: &serde_json::Value) -> Result<Option<u32>, ProtocolError> {
    if value.is_null() {
        return Ok(None);
    }
    let Some(weight) = value.as_i64() else {
        return Err(ProtocolError::BadWeight {
            value: value.to_string(),
        });
    };
    check_range("weight", weight.into(), &(0..=10_000), "0..10000")?;
    Ok(Some(weight as u32))
}

fn check_tokens(
    service: &str,
    id: &str,
    subject_service: &str,
    subject_id: &str,
) -> Result<(), ProtocolError> {
    if service != subject_service {
        return Err(ProtocolError::SubjectMismatch {
            field: "service",
            payload: service.to_owned(),
            subject: subject_service.to_owned(),
        });
    }
    if id != subject_id {
        return Err(ProtocolError::SubjectMismatch {
            field: "id",
            payload: id.to_owned(),
            subject: subject_id.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects() -> Subjects {
        Subjects::default()
    }

    const WEB_1: &str = r#"{"service":"web","id":"web-1","address":"127.0.0.1","port":5001,"ttl_ms":3000,"weight":1,"tags":["v2"],"meta":{"zone":"a"}}"#;

    #[test]
    fn a_partitions_writer_reads_its_partition_and_refuses_another_hash() {
        use crate::partition::{partition_of, Partition};
        assert_eq!((partition_of("web", 16), partition_of("api", 16)), (1, 7));
        let subjects = subjects().in_partition(Partition::new(1, 16).unwrap());
        assert_eq!(subjects.events_wildcard(), "rollcall.partition.1.*.*.*");
        assert_eq!(
            subjects.operator_wildcard(),
            "rollcall.partition.1.operator.>"
        );
        assert_eq!(subjects.catalog_fence(), "rollcall.catalog-fence.1");
        assert_eq!(subjects.leader_heartbeat(), "rollcall.discovery.leader.1");
        assert_eq!(
            subjects.parse_event_subject("rollcall.partition.1.heartbeat.web.a"),
            Ok((EventKind::Heartbeat, "web", "a"))
        );
        assert_eq!(
            subjects
                .parse_operator_subject("rollcall.partition.1.operator.drain.web.a")
                .map(|(action, ..)| action),
            Ok(OverrideAction::Drain)
        );
        // `api` hashes to 7 of 16: the server's mapping has another N.
        for subject in [
            "rollcall.partition.1.register.api.a",
            "rollcall.partition.1.operator.drain.api.a",
        ] {
            let refused = if subject.contains(".operator.") {
                subjects.parse_operator_subject(subject).map(|_| ())
            } else {
                subjects.parse_event_subject(subject).map(|_| ())
            }
            .unwrap_err();
            assert_eq!(
                refused,
                ProtocolError::WrongPartition {
                    subject: subject.into(),
                    service: "api".into(),
                    token: "1".into(),
                    hashed: 7,
                    count: 16,
                }
            );
            let message = refused.to_string();
            assert!(
                message.contains("through partition 1") && message.contains("partition 7 of 16"),
                "{message}"
            );
        }
        for foreign in [
            "rollcall.partition.2.register.web.a",
            "rollcall.register.web.a",
        ] {
            assert!(
                matches!(
                    subjects.parse_event_subject(foreign),
                    Err(ProtocolError::SubjectShape { .. })
                ),
                "{foreign}"
            );
        }
        assert!(subjects.owns("web") && !subjects.owns("api"));
        assert!(Subjects::default().owns("api"));
        assert_eq!(
            Subjects::default().unmap("rollcall.partition.1.register.web.a"),
            Some(("1", "rollcall.register.web.a".to_owned()))
        );
        assert_eq!(Subjects::default().unmap("rollcall.register.web.a"), None);
        assert!(Subjects::default().is_catalog_write("rollcall.catalog-fence.3"));
        assert_eq!(
            Subjects::default().catalog_fences(),
            ["rollcall.catalog-fence", "rollcall.catalog-fence.*"]
        );
    }

    #[test]
    fn the_protocol_example_parses_and_round_trips() {
        let event = subjects()
            .parse_event("rollcall.register.web.web-1", WEB_1.as_bytes())
            .expect("the example of docs/protocol.md is valid");
        let Event::Register(instance) = event else {
            panic!("a register subject gives a Register event, got {event:?}");
        };
        assert_eq!(instance.address, "127.0.0.1");
        assert_eq!(instance.port, 5001);
        assert_eq!(instance.tags, vec!["v2".to_owned()]);
        assert_eq!(instance.meta.get("zone").map(String::as_str), Some("a"));
        let json = serde_json::to_string(&instance).expect("serializes");
        assert_eq!(json, WEB_1);
        let back: Instance = serde_json::from_str(&json).expect("parses back");
        assert_eq!(back, instance);
    }

    #[test]
    fn defaults_apply_and_unknown_fields_are_ignored() {
        let payload = br#"{"service":"web","id":"a","address":"h","port":1,"future":{"x":1}}"#;
        let Event::Heartbeat(instance) = subjects()
            .parse_event("rollcall.heartbeat.web.a", payload)
            .expect("valid")
        else {
            panic!("heartbeat subject gives a Heartbeat event");
        };
        assert_eq!(instance.ttl_ms, 3000);
        assert_eq!(instance.weight, 1);
        assert!(instance.tags.is_empty() && instance.meta.is_empty());
    }

    fn register_error(payload: &str) -> ProtocolError {
        subjects()
            .parse_event("rollcall.register.web.web-1", payload.as_bytes())
            .expect_err("must be rejected")
    }

    #[test]
    fn bad_json_is_rejected() {
        let err = register_error("{not json");
        assert!(matches!(err, ProtocolError::BadJson { .. }), "{err}");
        let err = register_error("[1,2]");
        assert!(matches!(err, ProtocolError::BadJson { .. }), "{err}");
    }

    #[test]
    fn missing_fields_are_named() {
        for field in ["service", "id", "address", "port"] {
            let mut value: serde_json::Value = serde_json::from_str(WEB_1).unwrap();
            value.as_object_mut().unwrap().remove(field);
            let err = register_error(&value.to_string());
            assert!(
                err.to_string()
                    .contains(&format!("missing field `{field}`")),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn wrong_types_are_rejected() {
        for (field, value) in [
            ("port", r#""5001""#),
            ("port", "50.5"),
            ("ttl_ms", "true"),
            ("weight", r#""1""#),
            ("service", "7"),
            ("tags", r#""v2""#),
            ("meta", r#"{"zone":1}"#),
        ] {
            let mut json: serde_json::Value = serde_json::from_str(WEB_1).unwrap();
            json[field] = serde_json::from_str(value).unwrap();
            let err = register_error(&json.to_string());
            assert!(
                matches!(err, ProtocolError::BadJson { .. }),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn out_of_range_numbers_name_field_and_range() {
        for (field, value, range) in [
            ("port", "0", "1..65535"),
            ("port", "65536", "1..65535"),
            ("port", "-1", "1..65535"),
            ("ttl_ms", "99", "100..600000"),
            ("ttl_ms", "600001", "100..600000"),
            ("weight", "10001", "0..10000"),
            ("weight", "-1", "0..10000"),
        ] {
            let mut json: serde_json::Value = serde_json::from_str(WEB_1).unwrap();
            json[field] = serde_json::from_str(value).unwrap();
            let err = register_error(&json.to_string());
            let text = err.to_string();
            assert!(
                text.contains(field) && text.contains(range) && text.contains(value),
                "{field}={value}: {text}"
            );
        }
    }

    #[test]
    fn range_edges_are_accepted() {
        for (field, value) in [
            ("port", "1"),
            ("port", "65535"),
            ("ttl_ms", "100"),
            ("ttl_ms", "600000"),
            ("weight", "0"),
            ("weight", "10000"),
        ] {
            let mut json: serde_json::Value = serde_json::from_str(WEB_1).unwrap();
            json[field] = serde_json::from_str(value).unwrap();
            subjects()
                .parse_event("rollcall.register.web.web-1", json.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{field}={value} is allowed: {e}"));
        }
    }

    #[test]
    fn payload_must_match_subject_tokens() {
        let err = subjects()
            .parse_event("rollcall.register.api.web-1", WEB_1.as_bytes())
            .unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::SubjectMismatch {
                    field: "service",
                    ..
                }
            ),
            "{err}"
        );
        let err = subjects()
            .parse_event("rollcall.heartbeat.web.web-2", WEB_1.as_bytes())
            .unwrap_err();
        assert!(
            matches!(err, ProtocolError::SubjectMismatch { field: "id", .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_names_are_rejected_everywhere() {
        let long = "a".repeat(65);
        for name in ["a.b", "*", ">", "has space", "", long.as_str(), "é"] {
            assert!(validate_name("service", name).is_err(), "{name:?}");
            let mut instance = Instance::new(name, "i", "127.0.0.1", 80);
            assert!(instance.validate().is_err(), "service {name:?}");
            instance = Instance::new("web", name, "127.0.0.1", 80);
            assert!(instance.validate().is_err(), "id {name:?}");
        }
        assert!(validate_name("service", &"a".repeat(64)).is_ok());
        assert!(validate_name("service", "Web_1-x").is_ok());
        let err = validate_name("service", &long).unwrap_err();
        assert!(err.to_string().contains("65 characters"), "{err}");
    }

    #[test]
    fn wildcard_and_malformed_subjects_are_rejected() {
        let s = subjects();
        for subject in [
            "rollcall.register.*.web-1",
            "rollcall.register.web.>",
            "rollcall.register.web",
            "rollcall.register.web.a.b",
            "rollcall.hello.web.a",
            "other.register.web.a",
            "rollcallx.register.web.a",
        ] {
            assert!(
                s.parse_event(subject, WEB_1.as_bytes()).is_err(),
                "{subject}"
            );
        }
    }

    #[test]
    fn bad_addresses_are_rejected() {
        for address in ["", "a b", "http://x", "x/y", &"a".repeat(254)] {
            let instance = Instance::new("web", "a", address, 80);
            let err = instance.validate().unwrap_err();
            assert!(
                matches!(err, ProtocolError::BadAddress { .. }),
                "{address:?}"
            );
        }
        for address in ["10.0.0.1", "::1", "web-1.internal"] {
            Instance::new("web", "a", address, 80)
                .validate()
                .unwrap_or_else(|e| panic!("{address}: {e}"));
        }
    }

    #[test]
    fn deregister_accepts_empty_object_or_instance() {
        let s = subjects();
        let expected = Event::Deregister {
            service: "web".into(),
            id: "web-1".into(),
        };
        for payload in ["{}", "", WEB_1, r#"{"reason":"shutdown"}"#] {
            assert_eq!(
                s.parse_event("rollcall.deregister.web.web-1", payload.as_bytes())
                    .unwrap(),
                expected,
                "{payload:?}"
            );
        }
        assert!(s
            .parse_event("rollcall.deregister.web.web-2", WEB_1.as_bytes())
            .is_err());
        assert!(s
            .parse_event("rollcall.deregister.web.web-1", b"nope")
            .is_err());
    }

    #[test]
    fn subjects_follow_the_prefix() {
        let s = Subjects::new("acme").unwrap();
        assert_eq!(
            s.event(EventKind::Heartbeat, "web", "w1"),
            "acme.heartbeat.web.w1"
        );
        assert_eq!(s.catalog("web", "w1"), "acme.catalog.web.w1");
        assert_eq!(s.catalog_store("web", "w1"), "acme.catalog-store.web.w1");
        assert_eq!(s.service_catalog("web"), "acme.catalog.web.*");
        assert_eq!(s.catalog_wildcard(), "acme.catalog.>");
        assert_eq!(s.catalog_stream(), "ACME_CATALOG");
        assert_eq!(Subjects::default().catalog_stream(), "ROLLCALL_CATALOG");
        assert!(Subjects::new("a.b").is_err());
        assert!(s
            .parse_event("rollcall.register.web.web-1", WEB_1.as_bytes())
            .is_err());
    }

    #[test]
    fn snapshots_are_checked() {
        let s = subjects();
        let a = Instance::new("web", "a", "127.0.0.1", 1);
        let b = Instance::new("web", "b", "127.0.0.1", 2);
        let good = Snapshot {
            service: "web".into(),
            revision: 4,
            instances: vec![a.clone(), b.clone()],
        };
        let json = serde_json::to_vec(&good).unwrap();
        assert_eq!(
            s.parse_snapshot("rollcall.catalog-store.web", &json)
                .unwrap(),
            good
        );
        assert!(s.parse_snapshot("rollcall.catalog.api", &json).is_err());
        let unsorted = Snapshot {
            instances: vec![b, a],
            ..good
        };
        let json = serde_json::to_vec(&unsorted).unwrap();
        assert!(matches!(
            s.parse_snapshot("rollcall.catalog.web", &json),
            Err(ProtocolError::UnsortedSnapshot { .. })
        ));
    }

    #[test]
    fn records_are_checked_and_read_as_documented() {
        let s = subjects();
        let live = r#"{"service":"web","id":"a","revision":7,"instance":{"service":"web","id":"a","address":"127.0.0.1","port":1,"ttl_ms":3000,"weight":1}}"#;
        let record = s
            .parse_record("rollcall.catalog.web.a", live.as_bytes())
            .unwrap();
        assert_eq!(record.revision, 7);
        assert_eq!(
            record.instance(),
            Some(&Instance::new("web", "a", "127.0.0.1", 1))
        );
        assert_eq!(serde_json::to_string(&record).unwrap(), live);
        let gone = r#"{"service":"web","id":"a","revision":8,"left":"deregistered"}"#;
        let record = s
            .parse_record("rollcall.catalog-store.web.a", gone.as_bytes())
            .unwrap();
        assert_eq!(record.presence, Presence::Left(Left::Deregistered));
        assert_eq!(serde_json::to_string(&record).unwrap(), gone);
        for (subject, payload) in [
            ("rollcall.catalog.web.b", gone),
            ("rollcall.catalog.web", gone),
            ("rollcall.catalog.web.a.x", gone),
            (
                "rollcall.catalog.web.a",
                r#"{"service":"web","id":"a","revision":8}"#,
            ),
            (
                "rollcall.catalog.web.a",
                r#"{"service":"web","id":"a","revision":8,"left":"gone"}"#,
            ),
        ] {
            assert!(
                s.parse_record(subject, payload.as_bytes()).is_err(),
                "{subject} {payload}"
            );
        }
        let both = live.replace(r#""revision":7,"#, r#""revision":7,"left":"expired","#);
        let error = s
            .parse_record("rollcall.catalog.web.a", both.as_bytes())
            .unwrap_err();
        assert!(
            error.to_string().contains("both `instance` and `left`"),
            "{error}"
        );
        let other = live.replace(
            r#"{"service":"web","id":"a","address"#,
            r#"{"service":"web","id":"b","address"#,
        );
        assert!(s
            .parse_record("rollcall.catalog.web.a", other.as_bytes())
            .is_err());
    }

    fn override_error(subject: &str, payload: &str) -> ProtocolError {
        subjects()
            .parse_override(subject, payload.as_bytes())
            .expect_err("must be rejected")
    }

    #[test]
    fn overrides_parse_for_every_action() {
        let s = subjects();
        let parse = |subject: &str, payload: &str| {
            s.parse_override(subject, payload.as_bytes())
                .unwrap_or_else(|e| panic!("{subject} {payload}: {e}"))
        };
        let drain = parse("rollcall.operator.drain.web.web-1", r#"{"by":"alice"}"#);
        assert_eq!(
            drain,
            Override {
                service: "web".into(),
                id: "web-1".into(),
                change: OverrideChange::Drain,
                by: "alice".into(),
            }
        );
        for (subject, payload, change) in [
            (
                "rollcall.operator.undrain.web.a",
                r#"{"by":"b"}"#,
                OverrideChange::Undrain,
            ),
            (
                "rollcall.operator.clear.web.a",
                r#"{"by":"b","note":1}"#,
                OverrideChange::Clear,
            ),
            (
                "rollcall.operator.weight.web.a",
                r#"{"by":"b","weight":0}"#,
                OverrideChange::Weight(Some(0)),
            ),
            (
                "rollcall.operator.weight.web.a",
                r#"{"by":"b","weight":10000}"#,
                OverrideChange::Weight(Some(10_000)),
            ),
            (
                "rollcall.operator.weight.web.a",
                r#"{"by":"b","weight":null}"#,
                OverrideChange::Weight(None),
            ),
        ] {
            assert_eq!(
                parse(subject, payload).change,
                change,
                "{subject} {payload}"
            );
        }
        let by = "é".repeat(64);
        let payload = serde_json::json!({ "by": by }).to_string();
        assert_eq!(
            parse("rollcall.operator.drain.web.a", &payload).by,
            by,
            "64 characters, not bytes"
        );
    }

    #[test]
    fn every_bad_override_payload_is_named() {
        let subject = "rollcall.operator.drain.web.a";
        let weight = "rollcall.operator.weight.web.a";
        let long = serde_json::json!({ "by": "a".repeat(65) }).to_string();
        let big = serde_json::json!({ "by": "a", "pad": "x".repeat(MAX_EVENT_BYTES) }).to_string();
        for (subject, payload, expected) in [
            (subject, "{not json", "not valid JSON for an Override"),
            (subject, "", "not valid JSON for an Override"),
            (subject, "{}", "missing field `by`"),
            (subject, r#"{"by":7}"#, "not valid JSON for an Override"),
            (subject, r#"{"by":""}"#, "field `by` is 0 characters long"),
            (subject, &long, "field `by` is 65 characters long"),
            (
                subject,
                r#"{"by":"a","weight":3}"#,
                "only for action `weight`, not `drain`",
            ),
            (subject, &big, "too large"),
            (
                weight,
                r#"{"by":"a"}"#,
                "action `weight` needs field `weight`",
            ),
            (
                weight,
                r#"{"by":"a","weight":10001}"#,
                "field `weight` is 10001, outside the allowed range 0..10000",
            ),
            (
                weight,
                r#"{"by":"a","weight":-1}"#,
                "field `weight` is -1, outside",
            ),
            (
                weight,
                r#"{"by":"a","weight":"5"}"#,
                r#"field `weight` is "5"; it must be an integer"#,
            ),
            (
                weight,
                r#"{"by":"a","weight":1.5}"#,
                "field `weight` is 1.5; it must be an integer",
            ),
        ] {
            let error = override_error(subject, payload).to_string();
            assert!(error.contains(expected), "{payload}: {error}");
        }
    }

    #[test]
    fn every_bad_override_subject_is_named() {
        let payload = r#"{"by":"alice"}"#;
        for (subject, expected) in [
            (
                "rollcall.operator.pause.web.a",
                "unknown operator action \"pause\"",
            ),
            ("rollcall.operator.drain.web", "wrong number of tokens"),
            ("rollcall.operator.drain.web.a.b", "wrong number of tokens"),
            (
                "rollcall.operator.drain.*.a",
                "service token \"*\" contains",
            ),
            (
                "rollcall.operator.drain.web.>",
                "instance token \">\" contains",
            ),
            ("rollcall.register.web.a", "wrong number of tokens"),
            ("other.operator.drain.web.a", "not a rollcall subject"),
        ] {
            let error = override_error(subject, payload).to_string();
            assert!(error.contains(expected), "{subject}: {error}");
        }
        let s = Subjects::new("acme").unwrap();
        assert_eq!(
            s.operator(OverrideAction::Weight, "web", "w1"),
            "acme.operator.weight.web.w1"
        );
        assert_eq!(s.operator_wildcard(), "acme.operator.>");
        assert!(s.is_operator("acme.operator.anything"));
        assert!(!s.is_operator("rollcall.operator.drain.web.a"));
    }

    #[test]
    fn an_instance_announcing_an_operator_block_is_refused() {
        let mut json: serde_json::Value = serde_json::from_str(WEB_1).unwrap();
        json["operator"] =
            serde_json::json!({"drain": false, "own_weight": 1, "by": "me", "at_ms": 1});
        for kind in ["register", "heartbeat"] {
            let error = subjects()
                .parse_event(
                    &format!("rollcall.{kind}.web.web-1"),
                    json.to_string().as_bytes(),
                )
                .expect_err("only operators set `operator`");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("a {kind} must not carry `operator`")),
                "{error}"
            );
        }
    }
}

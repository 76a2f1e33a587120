//! The memory of the catalog: the `<PREFIX>_CATALOG` JetStream
//! stream keeps one record per instance (catalog version 3, the model of a
//! JetStream KV bucket). Discovery creates it and adopts it on restart;
//! balancers and `rollcall catalog` read it to start from the whole catalog
//! instead of waiting for the next change.
//!
//! Records are written on `<prefix>.catalog-store.<service>.<instance>` and
//! the stream republishes each one it stored on
//! `<prefix>.catalog.<service>.<instance>`: live subscribers only ever see
//! stored records, so a write the stream refuses (a superseded leader's)
//! reaches no one. A tombstone (an instance that left) carries a TTL, after
//! which the stream forgets it. The stream also keeps the fence,
//! `<prefix>.catalog-fence`, whose sequence is the leader's epoch, and each
//! partition's, `<prefix>.catalog-fence.<p>`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use futures::{StreamExt, TryStreamExt};

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};

use crate::connect::NatsError;
use crate::protocol::{Instance, Leadership, Presence, ProtocolError, Record, Snapshot, Subjects};

/// What went wrong with the catalog stream, naming it.
#[derive(Debug, thiserror::Error)]
pub enum CatalogStreamError {
    #[error("the JetStream stream {stream} does not exist yet: start `rollcall discovery` (it creates the stream) and try again")]
    Missing { stream: String },
    #[error("cannot look up the JetStream stream {stream} (is JetStream enabled on the server, nats-server -js, and may this user use its API?)")]
    Lookup {
        stream: String,
        #[source]
        source: NatsError<GetStreamErrorKind>,
    },
    #[error("cannot create the JetStream stream {stream} with {replicas} copies (is JetStream enabled on the server, nats-server -js, may this user create it, and are there {replicas} JetStream servers? see --replicas)")]
    Create {
        stream: String,
        replicas: usize,
        #[source]
        source: NatsError<CreateStreamErrorKind>,
    },
    #[error("cannot read the last records from {stream}")]
    Read {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the server announced {pending} more records in {stream} but delivered none")]
    Starved { stream: String, pending: u64 },
    #[error("cannot give the JetStream stream {stream} the catalog version 3 shape (store and fence subjects, republished, message TTLs: nats-server 2.11 or later); may this user update it?")]
    Update {
        stream: String,
        #[source]
        source: NatsError<CreateStreamErrorKind>,
    },
    #[error("cannot purge the old snapshots ({filter}) from {stream}; may this user purge it ($JS.API.STREAM.PURGE.{stream})?")]
    Purge {
        stream: String,
        filter: String,
        #[source]
        source: NatsError<stream::PurgeErrorKind>,
    },
    #[error("cannot read the catalog fence {subject}")]
    Fence {
        subject: String,
        #[source]
        source: NatsError<stream::DirectGetErrorKind>,
    },
}

impl CatalogStreamError {
    /// Whether trying again may succeed: the server did not answer in time,
    /// or JetStream said it is not available yet (a cluster electing its
    /// meta or stream leader answers 503, or not at all). A refusal, a bad
    /// name or a shape the server rejects is not.
    pub fn is_transient(&self) -> bool {
        /// JetStream's "temporarily unavailable" status.
        fn unavailable(error: &jetstream::Error) -> bool {
            error.code() == 503
        }
        match self {
            CatalogStreamError::Missing { .. } => false,
            CatalogStreamError::Lookup { source, .. } => match source.0.kind() {
                GetStreamErrorKind::Request => true,
                GetStreamErrorKind::JetStream(error) => unavailable(&error),
                _ => false,
            },
            CatalogStreamError::Create { source, .. }
            | CatalogStreamError::Update { source, .. } => match source.0.kind() {
                CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => {
                    true
                }
                CreateStreamErrorKind::JetStream(error) => unavailable(&error),
                _ => false,
            },
            // A read fails for good only if JetStream answered so (the
            // stream was deleted meanwhile, say); unanswered, it may succeed.
            CatalogStreamError::Read { source, .. } => {
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
                while let Some(error) = cause {
                    if let Some(answer) = error.downcast_ref::<jetstream::Error>() {
                        return unavailable(answer);
                    }
                    cause = error.source();
                }
                true
            }
            CatalogStreamError::Starved { .. } => true,
            CatalogStreamError::Purge { source, .. } => match source.0.kind() {
                stream::PurgeErrorKind::Request | stream::PurgeErrorKind::TimedOut => true,
                stream::PurgeErrorKind::JetStream(error) => unavailable(&error),
            },
            CatalogStreamError::Fence { source, .. } => matches!(
                source.0.kind(),
                stream::DirectGetErrorKind::TimedOut | stream::DirectGetErrorKind::Request
            ),
        }
    }
}

/// The first wait before trying again when JetStream is not available yet;
/// doubled on each try up to [`LAST_RETRY`], NATS clients' reconnect wait.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(2);

/// Runs `attempt` until it succeeds or fails for good: a transient failure
/// ([`CatalogStreamError::is_transient`], such as a cluster still electing
/// its leaders at boot) is logged, naming `what` was tried, and tried again
/// after a wait doubling from 100 ms to 2 s.
pub async fn retry_transient<T, F>(
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> Result<T, CatalogStreamError>
where
    F: std::future::Future<Output = Result<T, CatalogStreamError>>,
{
    let mut delay = FIRST_RETRY;
    loop {
        match attempt().await {
            Err(error) if error.is_transient() => {
                tracing::warn!(
                    error = %crate::ErrorChain(&error),
                    retry_in = ?delay,
                    "cannot {what} yet; trying again"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(LAST_RETRY);
            }
            done => return done,
        }
    }
}

/// What [`ensure`] found.
#[derive(Debug, Clone, Default)]
pub struct Ensured {
    /// The stream did not exist: the server forgot the catalog.
    pub created: bool,
    /// Snapshots kept by a stream of the catalog version 1 shape (stored on
    /// `<prefix>.catalog.<service>`) or version 2 shape
    /// (`<prefix>.catalog-store.<service>`), now purged from it and to be
    /// written again by the leader, as records.
    pub migrated: Vec<Snapshot>,
}

/// The fence as stored: who leads and since when; `epoch` is the message's
/// stream sequence.
pub async fn read_fence(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<Option<Leadership>, CatalogStreamError> {
    let subject = subjects.catalog_fence();
    let stream = open(js, subjects).await?;
    read_fence_on(&stream, subject).await
}

/// Every partition's fence, `<prefix>.catalog-fence.<p>` (`rollcall
/// discovery --partitions`), by partition, ascending.
pub async fn read_partition_fences(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<Vec<(u32, Leadership)>, CatalogStreamError> {
    let name = subjects.catalog_stream();
    let read_error = |source: Box<dyn std::error::Error + Send + Sync>| CatalogStreamError::Read {
        stream: name.clone(),
        source,
    };
    let stream = open(js, subjects).await?;
    let [_, wildcard] = subjects.catalog_fences();
    let mut listed = stream
        .info_with_subjects(wildcard)
        .await
        .map_err(|e| read_error(Box::new(e)))?;
    let mut fences = Vec::new();
    while let Some((subject, _)) = listed
        .try_next()
        .await
        .map_err(|e| read_error(Box::new(e)))?
    {
        let Some(partition) = subject.rsplit('.').next().and_then(|p| p.parse().ok()) else {
            continue;
        };
        if let Some(leader) = read_fence_on(&stream, subject).await? {
            fences.push((partition, leader));
        }
    }
    fences.sort_by_key(|(partition, _)| *partition);
    Ok(fences)
}

/// The fence stored on `subject`, its epoch the message's sequence.
async fn read_fence_on(
    stream: &jetstream::stream::Stream<()>,
    subject: String,
) -> Result<Option<Leadership>, CatalogStreamError> {
    let fence_error = |source| CatalogStreamError::Fence {
        subject: subject.clone(),
        source: NatsError(source),
    };
    match stream.direct_get_last_for_subject(subject.clone()).await {
        Ok(message) => {
            let mut leadership: Leadership =
                serde_json::from_slice(&message.payload).unwrap_or(Leadership {
                    replica: "?".to_owned(),
                    epoch: 0,
                    since_ms: 0,
                });
            leadership.epoch = message.sequence;
            Ok(Some(leadership))
        }
        Err(e) if matches!(e.kind(), stream::DirectGetErrorKind::NotFound) => Ok(None),
        Err(e) => Err(fence_error(e)),
    }
}

/// A service's snapshot assembled from its stored records, with the time
/// its newest record was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub snapshot: Snapshot,
    pub published: SystemTime,
}

/// The last snapshots of every service, and how many stored messages were
/// not valid records (each was logged).
#[derive(Debug, Clone, Default)]
pub struct LastSnapshots {
    pub snapshots: Vec<Stored>,
    pub invalid: usize,
}

/// One record as the stream keeps it, with the time it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub record: Record,
    pub published: SystemTime,
}

/// Every record the stream keeps (the last per instance), and how many
/// stored messages were not valid records (each was logged).
#[derive(Debug, Clone, Default)]
pub struct LastRecords {
    pub records: Vec<StoredRecord>,
    pub invalid: usize,
}

impl LastRecords {
    /// The records assembled into one snapshot per service: its live
    /// instances by id, its revision the highest of its records (those of
    /// gone instances count). A service whose every instance left is listed
    /// empty while its tombstones are kept.
    pub fn snapshots(self) -> LastSnapshots {
        let mut services: BTreeMap<String, (Stored, BTreeMap<String, Instance>)> = BTreeMap::new();
        for StoredRecord { record, published } in self.records {
            let (stored, live) = services.entry(record.service.clone()).or_insert_with(|| {
                let snapshot = Snapshot {
                    service: record.service.clone(),
                    revision: 0,
                    instances: Vec::new(),
                };
                let stored = Stored {
                    snapshot,
                    published: SystemTime::UNIX_EPOCH,
                };
                (stored, BTreeMap::new())
            });
            stored.snapshot.revision = stored.snapshot.revision.max(record.revision);
            stored.published = stored.published.max(published);
            if let Presence::Live(instance) = record.presence {
                live.insert(record.id, instance);
            }
        }
        let snapshots = services
            .into_values()
            .map(|(mut stored, live)| {
                stored.snapshot.instances = live.into_values().collect();
                stored
            })
            .collect();
        LastSnapshots {
            snapshots,
            invalid: self.invalid,
        }
    }
}

/// How long the stream keeps a tombstone when discovery is not told
/// otherwise (`--tombstone-ttl`): Consul's KV tombstone TTL.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(15 * 60);

/// The stream's configuration: the catalog subjects, one message per
/// subject, kept on disk in `replicas` copies (1 on a single server; 3 in a
/// three-node cluster, so the catalog survives the loss of a node).
pub fn stream_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: subjects.catalog_stream(),
        description: Some("rollcall: the catalog, one record per instance".to_owned()),
        subjects: [subjects.catalog_store_wildcard()]
            .into_iter()
            .chain(subjects.catalog_fences())
            .collect(),
        republish: Some(stream::Republish {
            source: subjects.catalog_store_wildcard(),
            destination: subjects.catalog_wildcard(),
            headers_only: false,
        }),
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        allow_direct: true,
        allow_message_ttl: true,
        ..stream::Config::default()
    }
}

/// Opens the catalog stream, creating it with `replicas` copies if missing,
/// and gives a stream of the catalog version 1 or 2 shape the version 3 one
/// in place, handing back the snapshots it kept so that none is lost.
pub async fn ensure(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<Ensured, CatalogStreamError> {
    let name = subjects.catalog_stream();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| CatalogStreamError::Read {
                    stream: name.clone(),
                    source: Box::new(NatsError(e)),
                })?;
            if info.config.num_replicas < replicas {
                tracing::warn!(
                    stream = %name,
                    copies = info.config.num_replicas,
                    wanted = replicas,
                    "the catalog stream has fewer copies than asked; kept as is (`nats stream edit --replicas` changes it)"
                );
            }
            let wanted = stream_config(subjects, info.config.num_replicas);
            let same_subjects = info.config.subjects == wanted.subjects;
            if same_subjects && info.config.republish.is_some() && info.config.allow_message_ttl {
                return Ok(Ensured::default());
            }
            // Version 2 stored snapshots on the store subjects (and had no
            // partition fences), version 1 on the live ones.
            let old = if info.config.republish.is_some() {
                subjects.catalog_store_v2()
            } else {
                format!("{}.catalog.*", subjects.prefix())
            };
            migrate(js, subjects, wanted, old).await
        }
        Err(error) if is_stream_not_found(&error.kind()) => {
            js.create_stream(stream_config(subjects, replicas))
                .await
                .map_err(|source| CatalogStreamError::Create {
                    stream: name.clone(),
                    replicas,
                    source: NatsError(source),
                })?;
            tracing::info!(stream = %name, "created the catalog stream");
            Ok(Ensured {
                created: true,
                migrated: Vec::new(),
            })
        }
        Err(source) => Err(CatalogStreamError::Lookup {
            stream: name,
            source: NatsError(source),
        }),
    }
}

/// Reads the snapshots an older stream kept on `old`, gives it the
/// version 3 shape, then purges them: what they held goes to the leader.
async fn migrate(
    js: &jetstream::Context,
    subjects: &Subjects,
    wanted: stream::Config,
    old: String,
) -> Result<Ensured, CatalogStreamError> {
    let name = subjects.catalog_stream();
    let (snapshots, invalid) = read_last_on(js, subjects, old.clone(), |subject, payload| {
        subjects.parse_snapshot(subject, payload)
    })
    .await?;
    js.update_stream(wanted)
        .await
        .map_err(|source| CatalogStreamError::Update {
            stream: name.clone(),
            source: NatsError(source),
        })?;
    open(js, subjects)
        .await?
        .purge()
        .filter(old.clone())
        .await
        .map_err(|source| CatalogStreamError::Purge {
            stream: name.clone(),
            filter: old,
            source: NatsError(source),
        })?;
    tracing::warn!(
        stream = %name,
        services = snapshots.len(),
        invalid,
        "gave the catalog stream the version 3 shape (one record per instance); the leader writes its snapshots again as records"
    );
    Ok(Ensured {
        created: false,
        migrated: snapshots
            .into_iter()
            .map(|(snapshot, _)| snapshot)
            .collect(),
    })
}

/// Every record the stream keeps, with an ephemeral consumer that delivers
/// the last message per subject; complete once it returns.
pub async fn read_records(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<LastRecords, CatalogStreamError> {
    let (records, invalid) = read_last_on(
        js,
        subjects,
        subjects.catalog_store_wildcard(),
        |subject, payload| subjects.parse_record(subject, payload),
    )
    .await?;
    let records = records
        .into_iter()
        .map(|(record, published)| StoredRecord { record, published })
        .collect();
    Ok(LastRecords { records, invalid })
}

/// The last snapshot of every service, assembled from [`read_records`].
pub async fn read_last(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<LastSnapshots, CatalogStreamError> {
    Ok(read_records(js, subjects).await?.snapshots())
}

/// The last message of every subject under `filter`, each parsed by
/// `parse`, with the time it was stored; and how many did not parse.
async fn read_last_on<T>(
    js: &jetstream::Context,
    subjects: &Subjects,
    filter: String,
    parse: impl Fn(&str, &[u8]) -> Result<T, ProtocolError>,
) -> Result<(Vec<(T, SystemTime)>, usize), CatalogStreamError> {
    let name = subjects.catalog_stream();
    let read_error = |source: Box<dyn std::error::Error + Send + Sync>| CatalogStreamError::Read {
        stream: name.clone(),
        source,
    };
    let stream = open(js, subjects).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ack_policy: consumer::AckPolicy::None,
            filter_subject: filter,
            inactive_threshold: Duration::from_secs(10),
            memory_storage: true,
            ..consumer::pull::Config::default()
        })
        .await
        .map_err(|e| match e.kind() {
            stream::ConsumerErrorKind::JetStream(js_error)
                if js_error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                CatalogStreamError::Missing {
                    stream: name.clone(),
                }
            }
            _ => read_error(Box::new(NatsError(e))),
        })?;
    let mut pending = consumer.cached_info().num_pending;
    let (mut last, mut invalid) = (Vec::new(), 0);
    while pending > 0 {
        let batch_size = usize::try_from(pending).unwrap_or(usize::MAX).min(4096);
        let mut batch = consumer
            .fetch()
            .max_messages(batch_size)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| read_error(Box::new(NatsError(e))))?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(read_error)?;
            got += 1;
            let info = message.info().map_err(read_error)?;
            pending = info.pending;
            let published = SystemTime::from(info.published);
            match parse(&message.subject, &message.payload) {
                Ok(parsed) => last.push((parsed, published)),
                Err(error) => {
                    invalid += 1;
                    tracing::warn!(subject = %message.subject, %error, "ignoring an invalid message in the catalog stream");
                }
            }
        }
        if got == 0 {
            return Err(CatalogStreamError::Starved {
                stream: name,
                pending,
            });
        }
    }
    Ok((last, invalid))
}

/// The catalog stream's handle, without asking the server for its info.
async fn open(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<jetstream::stream::Stream<()>, CatalogStreamError> {
    js.get_stream_no_info(subjects.catalog_stream())
        .await
        .map_err(|e| CatalogStreamError::Read {
            stream: subjects.catalog_stream(),
            source: Box::new(NatsError(e)),
        })
}

fn is_stream_not_found(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

//! The memory of the catalog: the `<PREFIX>_CATALOG` JetStream
//! stream keeps the last snapshot of every service. Discovery creates it and
//! adopts it on restart; balancers and `rollcall catalog` read it to start
//! from the whole catalog instead of waiting for the next change.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};

use crate::connect::NatsError;
use crate::protocol::{Snapshot, Subjects};

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
    #[error("cannot create the JetStream stream {stream} (is JetStream enabled on the server, nats-server -js, and may this user create it?)")]
    Create {
        stream: String,
        #[source]
        source: NatsError<CreateStreamErrorKind>,
    },
    #[error("cannot read the last snapshots from {stream}")]
    Read {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the server announced {pending} more snapshots in {stream} but delivered none")]
    Starved { stream: String, pending: u64 },
}

/// A snapshot as the stream keeps it, with the time it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub snapshot: Snapshot,
    pub published: SystemTime,
}

/// The last snapshots of every service, and how many stored messages were
/// not valid snapshots (each was logged).
#[derive(Debug, Clone, Default)]
pub struct LastSnapshots {
    pub snapshots: Vec<Stored>,
    pub invalid: usize,
}

/// The stream's configuration: the catalog subjects, one message per
/// subject, kept on disk in `replicas` copies (1 on a single server; 3 in a
/// three-node cluster, so the catalog survives the loss of a node).
pub fn stream_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: subjects.catalog_stream(),
        description: Some("rollcall: the last catalog snapshot of every service".to_owned()),
        subjects: vec![subjects.catalog_wildcard()],
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        allow_direct: true,
        ..stream::Config::default()
    }
}

/// Opens the catalog stream, creating it with `replicas` copies if missing.
/// Returns whether it was created, so that a caller holding a catalog knows
/// the server forgot it.
pub async fn ensure(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<bool, CatalogStreamError> {
    let name = subjects.catalog_stream();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            if let Ok(info) = existing.info().await {
                if info.config.max_messages_per_subject != 1 {
                    tracing::warn!(
                        stream = %name,
                        max_messages_per_subject = info.config.max_messages_per_subject,
                        "the catalog stream keeps more than one message per subject; \
                         readers only use the last"
                    );
                }
            }
            Ok(false)
        }
        Err(error) if is_stream_not_found(&error.kind()) => {
            js.create_stream(stream_config(subjects, replicas))
                .await
                .map_err(|source| CatalogStreamError::Create {
                    stream: name.clone(),
                    source: NatsError(source),
                })?;
            tracing::info!(stream = %name, "created the catalog stream");
            Ok(true)
        }
        Err(source) => Err(CatalogStreamError::Lookup {
            stream: name,
            source: NatsError(source),
        }),
    }
}

/// Reads the last snapshot of every service from the stream, with an
/// ephemeral consumer that delivers the last message per subject.
pub async fn read_last(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<LastSnapshots, CatalogStreamError> {
    let name = subjects.catalog_stream();
    let read_error = |source: Box<dyn std::error::Error + Send + Sync>| CatalogStreamError::Read {
        stream: name.clone(),
        source,
    };
    let stream = js
        .get_stream_no_info(&name)
        .await
        .map_err(|e| read_error(Box::new(NatsError(e))))?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ack_policy: consumer::AckPolicy::None,
            filter_subject: subjects.catalog_wildcard(),
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
    let mut last = LastSnapshots::default();
    while pending > 0 {
        let batch_size = usize::try_from(pending).unwrap_or(usize::MAX).min(1024);
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
            match subjects.parse_snapshot(&message.subject, &message.payload) {
                Ok(snapshot) => last.snapshots.push(Stored {
                    snapshot,
                    published,
                }),
                Err(error) => {
                    last.invalid += 1;
                    tracing::warn!(subject = %message.subject, %error, "ignoring an invalid snapshot in the catalog stream");
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
    last.snapshots
        .sort_by(|a, b| a.snapshot.service.cmp(&b.snapshot.service));
    Ok(last)
}

fn is_stream_not_found(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

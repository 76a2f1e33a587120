//! Discovery's writes to NATS: the fenced record writes and the fence
//! itself (a compare-and-set on `<prefix>.catalog-fence`), the leader
//! heartbeat, and the stored catalog a new leader adopts.

use std::time::{Duration, SystemTime};

use async_nats::header::{self, HeaderMap};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::{jetstream, Client};
use bytes::Bytes;

use super::{Acked, Fenced, Wire, Write, Written};
use crate::catalog_stream::{self, CatalogStreamError};
use crate::protocol::{Record, Subjects};

/// How long a stored write may take to be acknowledged: long enough for a
/// loaded single server, short enough that the records are written again
/// within a leader heartbeat or two when the stream's leader is gone.
const ACK_TIMEOUT: Duration = Duration::from_millis(750);
/// The header naming the subject whose last sequence a write expects.
const EXPECTED_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

pub(super) struct NatsWire {
    client: Client,
    js: jetstream::Context,
    subjects: Subjects,
    replicas: usize,
    tombstone_ttl: Duration,
    /// Whether records go as atomic batches ([`NatsWire::batches_pay`]):
    /// learnt at the first write after each takeover, `None` until then.
    atomic: Option<bool>,
    /// Batches sent: with the epoch, a batch id no other write shares
    /// (epochs are sequences of one stream, so no two leaders share one).
    batches: u64,
}

/// What became of a write, once its acknowledgement came (or did not).
async fn settle(ack: jetstream::context::PublishAckFuture) -> Written {
    match ack.await {
        Ok(_) => Written::Stored,
        Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
            Written::Superseded(actual_sequence(&error))
        }
        Err(error) => Written::Failed(error.to_string()),
    }
}

impl NatsWire {
    pub(super) fn new(
        client: Client,
        subjects: Subjects,
        replicas: usize,
        tombstone_ttl: Duration,
    ) -> NatsWire {
        let js = jetstream::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .build(client.clone());
        NatsWire {
            client,
            js,
            subjects,
            replicas,
            tombstone_ttl,
            atomic: None,
            batches: 0,
        }
    }

    /// Whether the catalog stream, as the server keeps it, is better
    /// written in atomic batches. On a replicated stream the server refuses
    /// a fenced write while an earlier one on the same fence is not yet
    /// applied (error 10164: 997 of 1000 pipelined records here), and a
    /// batch is one proposal under one fence check. On one server a batch
    /// is staged in a file store of its own and costs more than pipelined
    /// records (2.5 ms for one record against 0.2 ms).
    async fn batches_pay(&self) -> bool {
        match catalog_stream::config(&self.js, &self.subjects).await {
            Ok(config) => config.num_replicas > 1 && config.allow_atomic_publish,
            Err(error) => {
                tracing::warn!(%error, "cannot read the catalog stream's configuration; writing records one at a time");
                false
            }
        }
    }

    /// One atomic batch (ADR-50): every record but the last is sent without
    /// a reply subject, the last commits the batch and brings the one
    /// acknowledgement. Every record carries the fence check (the server
    /// checks the fence once per batch and keeps the answer), so none is
    /// stored under a superseded epoch.
    async fn write_batch(&mut self, epoch: u64, batch: &[Write]) -> Acked {
        self.batches += 1;
        let id = format!("{epoch}-{}", self.batches);
        let fence = self.subjects.catalog_fence();
        let records = batch.len();
        let each = move |written: Written| vec![written; records];
        for (sequence, write) in (1..).zip(batch) {
            let mut headers = HeaderMap::new();
            headers.insert(header::NATS_BATCH_ID, id.as_str());
            headers.insert(header::NATS_BATCH_SEQUENCE, sequence.to_string().as_str());
            headers.insert(
                header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                epoch.to_string().as_str(),
            );
            headers.insert(EXPECTED_SUBJECT, fence.as_str());
            if write.left.is_some() {
                headers.insert(
                    header::NATS_MESSAGE_TTL,
                    self.tombstone_ttl.as_secs().to_string().as_str(),
                );
            }
            let subject = self.subjects.catalog_store(&write.service, &write.id);
            if sequence < records {
                let sent = self
                    .client
                    .publish_with_headers(subject, headers, write.payload.clone())
                    .await;
                if let Err(error) = sent {
                    let error = format!("cannot send record {sequence} of batch {id}: {error}");
                    return Box::pin(std::future::ready(each(Written::Failed(error))));
                }
                continue;
            }
            headers.insert(header::NATS_BATCH_COMMIT, header::NATS_BATCH_COMMIT_FINAL);
            let publish = Publish::build()
                .payload(write.payload.clone())
                .headers(headers);
            return match self.js.send_publish(subject, publish).await {
                Ok(ack) => Box::pin(async move { each(settle(ack).await) }),
                Err(error) => {
                    Box::pin(std::future::ready(each(Written::Failed(error.to_string()))))
                }
            };
        }
        Box::pin(std::future::ready(Vec::new()))
    }
}

/// The last sequence the stream reported when it refused a write that
/// expected another (`wrong last sequence: 12`).
pub(super) fn actual_sequence(error: &async_nats::jetstream::context::PublishError) -> Option<u64> {
    if error.kind() != PublishErrorKind::WrongLastSequence {
        return None;
    }
    let text = std::error::Error::source(error)?.to_string();
    let digits = text.split("wrong last sequence:").nth(1)?.trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

impl Wire for NatsWire {
    /// An atomic batch where [`NatsWire::batches_pay`]; elsewhere every
    /// record its own fenced write, all sent before any acknowledgement is
    /// awaited. Either way a write costs one round trip, however many
    /// records it holds.
    async fn write(&mut self, epoch: u64, batch: &[Write]) -> Acked {
        let atomic = match self.atomic {
            Some(atomic) => atomic,
            None => *self.atomic.insert(self.batches_pay().await),
        };
        if atomic {
            return self.write_batch(epoch, batch).await;
        }
        let fence = self.subjects.catalog_fence();
        let mut acks = Vec::with_capacity(batch.len());
        for write in batch {
            let mut publish = Publish::build()
                .payload(write.payload.clone())
                .expected_last_subject_sequence(epoch)
                .header(EXPECTED_SUBJECT, fence.as_str());
            if write.left.is_some() {
                publish = publish.ttl(self.tombstone_ttl);
            }
            let subject = self.subjects.catalog_store(&write.service, &write.id);
            acks.push(self.js.send_publish(subject, publish).await);
        }
        Box::pin(async move {
            let mut outcomes = Vec::with_capacity(acks.len());
            for ack in acks {
                outcomes.push(match ack {
                    Ok(ack) => settle(ack).await,
                    Err(error) => Written::Failed(error.to_string()),
                });
            }
            outcomes
        })
    }

    async fn heartbeat(&mut self, payload: Bytes) {
        if let Err(error) = self
            .client
            .publish(self.subjects.leader_heartbeat(), payload)
            .await
        {
            tracing::debug!(%error, "cannot send the leader heartbeat");
        }
    }

    async fn reply(&mut self, subject: String, payload: Bytes) {
        if let Err(error) = self.client.publish(subject, payload).await {
            tracing::warn!(%error, "cannot answer an override");
        }
    }

    async fn take_over(&mut self, expected: u64, payload: Bytes) -> Fenced {
        let publish = Publish::build()
            .payload(payload)
            .expected_last_subject_sequence(expected);
        let result = match self
            .js
            .send_publish(self.subjects.catalog_fence(), publish)
            .await
        {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match result {
            Ok(ack) => {
                // The stream may have changed since the last term.
                self.atomic = None;
                Fenced::Won(ack.sequence)
            }
            Err(error) => {
                let actual = actual_sequence(&error);
                if actual.is_none() {
                    tracing::warn!(%error, "cannot write the catalog fence");
                }
                Fenced::Lost(actual)
            }
        }
    }

    async fn fence(&mut self) -> Option<u64> {
        match catalog_stream::read_fence(&self.js, &self.subjects).await {
            Ok(fence) => fence.map(|f| f.epoch),
            Err(error) => {
                tracing::warn!(%error, "cannot read the catalog fence; waiting for a leader");
                Some(0)
            }
        }
    }

    async fn read_stored(&mut self) -> Result<Vec<Record>, CatalogStreamError> {
        let last = catalog_stream::read_records(&self.js, &self.subjects).await?;
        Ok(last.records.into_iter().map(|s| s.record).collect())
    }

    async fn catalog_lost(&mut self) -> bool {
        match catalog_stream::ensure(&self.js, &self.subjects, self.replicas).await {
            Ok(ensured) => ensured.created,
            Err(error) => {
                tracing::error!(%error, "cannot check the catalog stream after reconnecting");
                false
            }
        }
    }

    async fn flush(&mut self) {
        // NATS may be down at shutdown: the flush must not outlast the drain.
        match tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not flush the last messages at shutdown")
            }
            Err(_) => tracing::warn!("NATS did not take the last messages within 2 s; stopping"),
        }
    }

    fn clock(&self) -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }
}

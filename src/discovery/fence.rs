//! Discovery's writes to NATS: the fenced record writes and the fence
//! itself (a compare-and-set on `<prefix>.catalog-fence`), the leader
//! heartbeat, and the stored catalog a new leader adopts.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::{jetstream, Client};
use bytes::Bytes;

use super::{Fenced, Wire, Write, Written};
use crate::catalog_stream::{self, CatalogStreamError};
use crate::protocol::{Record, Subjects};

/// How long a stored write may take to be acknowledged: long enough for a
/// loaded single server, short enough that the loop is not held up past a
/// leader heartbeat or two when the stream's leader is gone.
const ACK_TIMEOUT: Duration = Duration::from_millis(750);
/// The header naming the subject whose last sequence a write expects.
const EXPECTED_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";
/// The most writes awaiting their acknowledgement at once: a fleet joining
/// at once is written in a few round trips, and the client's buffers stay
/// bounded.
const IN_FLIGHT: usize = 4096;

pub(super) struct NatsWire {
    client: Client,
    js: jetstream::Context,
    subjects: Subjects,
    replicas: usize,
    tombstone_ttl: Duration,
}

type Ack =
    Result<jetstream::context::PublishAckFuture, async_nats::jetstream::context::PublishError>;

/// What became of a write, once its acknowledgement came (or did not).
async fn settle(ack: Ack) -> Written {
    let result = match ack {
        Ok(ack) => ack.await.map(|_| ()),
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => Written::Stored,
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
        }
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
    async fn write(&mut self, epoch: u64, batch: Vec<Write>) -> Vec<Written> {
        let fence = self.subjects.catalog_fence();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut acks = VecDeque::with_capacity(batch.len().min(IN_FLIGHT));
        // Sent ahead of their acks, up to IN_FLIGHT awaiting at once: a
        // batch costs a few round trips, not one per record.
        for write in batch {
            if acks.len() == IN_FLIGHT {
                if let Some(ack) = acks.pop_front() {
                    outcomes.push(settle(ack).await);
                }
            }
            let mut publish = Publish::build()
                .payload(write.payload)
                .expected_last_subject_sequence(epoch)
                .header(EXPECTED_SUBJECT, fence.as_str());
            if write.left.is_some() {
                publish = publish.ttl(self.tombstone_ttl);
            }
            let subject = self.subjects.catalog_store(&write.service, &write.id);
            acks.push_back(self.js.send_publish(subject, publish).await);
        }
        for ack in acks {
            outcomes.push(settle(ack).await);
        }
        outcomes
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
            Ok(ack) => Fenced::Won(ack.sequence),
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

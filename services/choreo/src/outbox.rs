//! Writing outgoing events into the caller's open transaction. Nothing here
//! talks to NATS: the [`crate::relay`] publishes rows once they are committed.
use std::sync::Arc;

use sqlx::PgConnection;

use crate::envelope::{Envelope, EventPayload};
use prost::Message;

/// Writes this service's events into its outbox table.
#[derive(Clone, Debug)]
pub struct Outbox {
    producer: Arc<str>,
    subject_prefix: Arc<str>,
}

impl Outbox {
    pub fn new(producer: &str, subject_prefix: &str) -> Self {
        Outbox {
            producer: producer.into(),
            subject_prefix: subject_prefix.into(),
        }
    }

    /// The name written in the envelope's `producer` field.
    pub fn producer(&self) -> &str {
        &self.producer
    }

    /// Inserts a new event for `saga_id`, caused by `cause`, into the open transaction `tx`.
    pub async fn emit<P: EventPayload>(
        &self,
        tx: &mut PgConnection,
        saga_id: &str,
        cause: Option<&Envelope>,
        payload: &P,
    ) -> Result<Envelope, sqlx::Error> {
        let mut envelope = Envelope::new(&self.producer, saga_id, cause, payload);
        // The work that writes the event is its parent in the trace.
        if let Some(traceparent) = crate::telemetry::current_traceparent() {
            envelope.traceparent = traceparent;
        }
        self.insert(tx, &envelope).await?;
        Ok(envelope)
    }

    /// Inserts an already built envelope (its event id is the dedup key downstream).
    pub async fn insert(
        &self,
        tx: &mut PgConnection,
        envelope: &Envelope,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO choreo_outbox (event_id, subject, event_type, saga_id, payload, traceparent)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(envelope.id())
        .bind(format!("{}.{}", self.subject_prefix, envelope.event_type))
        .bind(&envelope.event_type)
        .bind(&envelope.saga_id)
        .bind(envelope.encode_to_vec())
        .bind(&envelope.traceparent)
        .execute(tx)
        .await?;
        Ok(())
    }
}

//! What a service writes: a [`Handler`] for its typed events. The platform
//! decodes each consumed event once (through [`Decode`]) and hands the typed
//! value over inside the inbox transaction.
use tracing::Instrument;

use crate::Tx;
use crate::envelope::{Envelope, Reject};
use crate::inbox::Batched;

/// A service's reaction to the events it consumes. Business rules only: write
/// rows and outgoing events into `tx`; the platform commits and acks.
///
/// Only events of the service's subscription (derived from the choreography)
/// reach it; anything else is acknowledged unread before any decoding.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The service's events, decoded once by the platform.
    type Event: Decode;

    async fn handle(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        event: Self::Event,
    ) -> Result<(), HandleError>;

    /// Whether events of different sagas may share one transaction: when
    /// events queue up, the consumer applies them together and commits once
    /// ([`crate::inbox::apply_batch`]). When the effects lock rows that
    /// several sagas share, such as a product's stock, two batches could take
    /// those rows in opposite orders and wait on each other until
    /// PostgreSQL's deadlock check (a second) breaks the tie: lock them all
    /// in one order first, in [`Handler::before_batch`], or say no here.
    fn batches(&self) -> bool {
        true
    }

    /// Runs in a batch's transaction before the effects of its new events
    /// (`events`, in delivery order; duplicates left out): the place to
    /// lock the shared rows they will touch, all in one order.
    async fn before_batch(
        &self,
        _tx: &mut Tx<'_>,
        _events: &[(&Envelope, &Self::Event)],
    ) -> Result<(), HandleError> {
        Ok(())
    }

    /// The effects of a batch's new events (in delivery order; duplicates
    /// left out), after [`Handler::before_batch`]: [`Handler::handle`] for
    /// each, in its span. A handler that can write a whole batch in fewer
    /// statements than one per event does it here.
    ///
    /// Not called for a batch in which a compensable step claimed a barrier
    /// row ([`crate::step`]): the platform then runs [`Handler::handle`]
    /// for each event itself, and withdraws each event's untaken claims
    /// before the next event runs.
    async fn handle_all(
        &self,
        tx: &mut Tx<'_>,
        events: Vec<Batched<'_, Self::Event>>,
    ) -> Result<(), HandleError> {
        for Batched {
            envelope,
            event,
            span,
        } in events
        {
            self.handle(tx, envelope, event).instrument(span).await?;
        }
        Ok(())
    }
}

/// The decode table of a set of events: event type and schema version to a
/// typed payload. An unknown type or version is a [`Reject`].
pub trait Decode: Sized + Clone + Send + Sync + 'static {
    fn decode(envelope: &Envelope) -> Result<Self, Reject>;
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The event cannot be read by this service: park it, never retry.
    #[error(transparent)]
    Reject(#[from] Reject),
    /// A database error: retried.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Any other transient failure: retried.
    #[error("{0}")]
    Transient(String),
}

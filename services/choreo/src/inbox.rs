//! The inbox step (DESIGN rule 2): dedup, effects and commit for one event in
//! one transaction, or for a batch of events in one. The consumer runs it for
//! every delivery; dead-letter replay runs the same step, so a replayed event
//! is applied at most once.
use sqlx::PgPool;
use tracing::Instrument;

use crate::Tx;
use crate::envelope::{Envelope, Reject};
use crate::handler::{Decode, HandleError, Handler};

/// What happened to one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Effects committed.
    Applied,
    /// Seen before: nothing done.
    Duplicate,
    /// Not readable: must be parked.
    Parked(Reject),
}

type AfterCommit = Vec<Box<dyn FnOnce() + Send>>;

tokio::task_local! {
    static AFTER_COMMIT: std::cell::RefCell<AfterCommit>;
}

/// Runs `f` once the transaction of the event being handled has committed, and
/// never if it rolls back: for counters and other things outside the database
/// that must not count an attempt that is retried. Outside a handler, runs `f` now.
pub fn after_commit(f: impl FnOnce() + Send + 'static) {
    let mut f = Some(f);
    let _ = AFTER_COMMIT.try_with(|queue| {
        if let Some(f) = f.take() {
            queue.borrow_mut().push(Box::new(f));
        }
    });
    if let Some(f) = f {
        f();
    }
}

/// Whether a database error can never go away on retry: an integrity
/// constraint (SQLSTATE class 23: unique, foreign key, check, not null).
fn refused_for_good(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code.starts_with("23"))
}

/// Decodes `envelope` for `handler` and runs the inbox step; an event the
/// handler cannot read is [`Outcome::Parked`] without opening a transaction.
pub async fn apply<H: Handler>(
    pool: &PgPool,
    handler: &H,
    envelope: &Envelope,
) -> Result<Outcome, HandleError> {
    match H::Event::decode(envelope) {
        Ok(event) => apply_decoded(pool, handler, envelope, event).await,
        Err(reject) => Ok(Outcome::Parked(reject)),
    }
}

/// The inbox step for an event already decoded.
pub async fn apply_decoded<H: Handler>(
    pool: &PgPool,
    handler: &H,
    envelope: &Envelope,
    event: H::Event,
) -> Result<Outcome, HandleError> {
    after_commit_of(
        |outcome| matches!(outcome, Ok(Outcome::Applied)),
        apply_in_tx(pool, handler, envelope, event),
    )
    .await
}

/// One event of a batch, with the span its effects run in.
pub struct Batched<'a, E> {
    pub envelope: &'a Envelope,
    pub event: E,
    pub span: tracing::Span,
}

/// The inbox step for several events in one transaction: each recorded in
/// the inbox and its effects run in delivery order (one saga's events keep
/// theirs), then one commit for all. Each is [`Outcome::Applied`] or
/// [`Outcome::Duplicate`]. If any of them fails, or would have to be parked,
/// the error comes back and nothing of the batch is committed: the caller
/// then applies each event on its own with [`apply_decoded`], so one bad
/// event is retried or parked without taking the others with it.
pub async fn apply_batch<H: Handler>(
    pool: &PgPool,
    handler: &H,
    events: Vec<Batched<'_, H::Event>>,
) -> Result<Vec<Outcome>, HandleError> {
    after_commit_of(Result::is_ok, batch_in_tx(pool, handler, events)).await
}

/// Runs `work`, which commits its own transaction, and once `committed`
/// says it did, publishes the events it wrote and runs its [`after_commit`] work.
async fn after_commit_of<T>(
    committed: impl FnOnce(&T) -> bool,
    work: impl Future<Output = T>,
) -> T {
    let ((result, after), written) =
        crate::outbox::capture(AFTER_COMMIT.scope(Default::default(), async {
            let result = work.await;
            (result, AFTER_COMMIT.with(|queue| queue.take()))
        }))
        .await;
    if committed(&result) {
        // Committed: the events it wrote go out now, not at the relay's next sweep.
        written.publish().await;
        for f in after {
            f();
        }
    }
    result
}

/// Records `envelope` in the inbox of the open `tx` and, if it was not
/// there yet, runs its effects; whether it was new.
async fn record_and_handle<H: Handler>(
    tx: &mut Tx,
    handler: &H,
    envelope: &Envelope,
    event: H::Event,
) -> Result<bool, HandleError> {
    let fresh = record_in_inbox(tx, &[envelope]).await?[0];
    if fresh {
        handler.handle(tx, envelope, event).await?;
    }
    Ok(fresh)
}

async fn apply_in_tx<H: Handler>(
    pool: &PgPool,
    handler: &H,
    envelope: &Envelope,
    event: H::Event,
) -> Result<Outcome, HandleError> {
    let mut tx = pool.begin().await?;
    match record_and_handle(&mut tx, handler, envelope, event).await {
        Ok(true) => {
            tx.commit().await?;
            Ok(Outcome::Applied)
        }
        Ok(false) => {
            tx.rollback().await?;
            Ok(Outcome::Duplicate)
        }
        Err(HandleError::Reject(reject)) => {
            tx.rollback().await?;
            Ok(Outcome::Parked(reject))
        }
        Err(HandleError::Database(e)) if refused_for_good(&e) => {
            tx.rollback().await?;
            Ok(Outcome::Parked(Reject::Invalid(format!(
                "the database refuses its effects: {e}"
            ))))
        }
        Err(e) => Err(e),
    }
}

async fn batch_in_tx<H: Handler>(
    pool: &PgPool,
    handler: &H,
    events: Vec<Batched<'_, H::Event>>,
) -> Result<Vec<Outcome>, HandleError> {
    let mut tx = pool.begin().await?;
    let envelopes: Vec<&Envelope> = events.iter().map(|b| b.envelope).collect();
    let fresh = record_in_inbox(&mut tx, &envelopes).await?;
    let new_events: Vec<(&Envelope, &H::Event)> = events
        .iter()
        .zip(&fresh)
        .filter(|(_, fresh)| **fresh)
        .map(|(b, _)| (b.envelope, &b.event))
        .collect();
    handler.before_batch(&mut tx, &new_events).await?;
    let mut outcomes = Vec::with_capacity(events.len());
    for (
        Batched {
            envelope,
            event,
            span,
        },
        fresh,
    ) in events.into_iter().zip(fresh)
    {
        if fresh {
            // On error the transaction is dropped, and with it rolled back.
            handler
                .handle(&mut tx, envelope, event)
                .instrument(span)
                .await?;
        }
        outcomes.push(if fresh {
            Outcome::Applied
        } else {
            Outcome::Duplicate
        });
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Records events in the inbox of the open `tx`, in one statement; whether
/// each was new (an event given twice is new only the first time).
async fn record_in_inbox(tx: &mut Tx, envelopes: &[&Envelope]) -> Result<Vec<bool>, sqlx::Error> {
    let ids: Vec<uuid::Uuid> = envelopes.iter().map(|e| e.id()).collect();
    let types: Vec<&str> = envelopes.iter().map(|e| e.event_type.as_str()).collect();
    let sagas: Vec<&str> = envelopes.iter().map(|e| e.saga_id.as_str()).collect();
    let mut inserted: std::collections::HashSet<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO choreo_inbox (event_id, event_type, saga_id)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])
         ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
    )
    .bind(&ids)
    .bind(&types)
    .bind(&sagas)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    Ok(ids.iter().map(|id| inserted.remove(id)).collect())
}

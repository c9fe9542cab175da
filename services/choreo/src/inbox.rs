//! The inbox step (DESIGN rule 2): dedup, effects and commit for one event in
//! one transaction, or for a batch of events in one. The consumer runs it for
//! every delivery; dead-letter replay runs the same step, so a replayed event
//! is applied at most once.
use sqlx::{Acquire, Postgres};
use tracing::Instrument;

use crate::Tx;
use crate::barrier::{self, Claim, Claimed, Claims};
use crate::batch;
use crate::envelope::{Envelope, Reject};
use crate::handler::{Decode, HandleError, Handler};
use crate::outbox;

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
///
/// `db` is where the transaction begins: a pool, or a connection its caller
/// keeps across transactions ([`crate::db::HeldConnection`]).
pub async fn apply<'c, H: Handler>(
    db: impl Acquire<'c, Database = Postgres>,
    handler: &H,
    claims: &Claims,
    envelope: &Envelope,
) -> Result<Outcome, HandleError> {
    match H::Event::decode(envelope) {
        Ok(event) => apply_decoded(db, handler, claims, envelope, event).await,
        Err(reject) => Ok(Outcome::Parked(reject)),
    }
}

/// The inbox step for an event already decoded.
pub async fn apply_decoded<'c, H: Handler>(
    db: impl Acquire<'c, Database = Postgres>,
    handler: &H,
    claims: &Claims,
    envelope: &Envelope,
    event: H::Event,
) -> Result<Outcome, HandleError> {
    after_commit_of(
        |outcome| matches!(outcome, Ok(Outcome::Applied)),
        outbox::at_end_of(apply_in_tx(db, handler, claims, envelope, event)),
    )
    .await
}

/// [`apply_decoded`] on a connection, trying the event's
/// [`Handler::effect_alone`] first: how the consumer applies an event that
/// comes alone. The effect of an event that triggers a step's action is
/// applied only with that step's barrier claim, in the same statement; an
/// event that asks for a compensation, or whose effect does not hold, goes
/// through its transaction.
pub async fn apply_alone_or_in_tx<H: Handler>(
    conn: &mut sqlx::PgConnection,
    handler: &H,
    claims: &Claims,
    envelope: &Envelope,
    event: H::Event,
) -> Result<Outcome, HandleError> {
    let (effect, claim) = match claims.get(&envelope.event_type) {
        Some(Claim::Compensation(_)) => (None, None),
        Some(Claim::Action(step)) => (handler.effect_alone(envelope, &event), Some(*step)),
        None => (handler.effect_alone(envelope, &event), None),
    };
    if let Some(effect) = effect {
        match apply_alone(conn, effect, envelope, claim).await {
            Ok(Some(outcome)) => return Ok(outcome),
            Ok(None) => {}
            // Nothing was written: the transaction meets the same error, if
            // it lasts, and says what it means (retried, or parked).
            Err(e) => {
                tracing::debug!(error = %e, "the effect alone failed; applying the event in a transaction")
            }
        }
    }
    apply_decoded(conn, handler, claims, envelope, event).await
}

/// Records `envelope` in the inbox and has `effect` (with the barrier claim
/// of the step `claim`, if any) in one statement, outside any transaction:
/// [`Outcome::Applied`], [`Outcome::Duplicate`] (nothing written), or
/// `None` when the effect did not hold (nothing written either). The event
/// the effect emits is published at once, and what it runs after commit
/// runs: the statement has committed.
async fn apply_alone(
    conn: &mut sqlx::PgConnection,
    mut effect: crate::handler::Effect,
    envelope: &Envelope,
    claim: Option<&'static str>,
) -> Result<Option<Outcome>, sqlx::Error> {
    use sqlx::Row as _;
    let committed = effect.take_committed();
    let (sql, arguments, emits) = effect.with_inbox(envelope, claim)?;
    let error = match sqlx::query_with(sqlx::AssertSqlSafe(sql), arguments)
        .fetch_one(conn)
        .await
    {
        Ok(row) => {
            if let Some(emitted) = emits {
                emitted.publish(row.try_get("choreo_outbox_seq")?);
            }
            committed.into_iter().for_each(|f| f());
            return Ok(Some(Outcome::Applied));
        }
        Err(error) => error,
    };
    let code = error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|code| code.into_owned());
    match code.as_deref() {
        Some(crate::handler::SEEN_BEFORE) => Ok(Some(Outcome::Duplicate)),
        Some(crate::handler::DID_NOT_HOLD) => Ok(None),
        _ => Err(error),
    }
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
pub async fn apply_batch<'c, H: Handler>(
    db: impl Acquire<'c, Database = Postgres>,
    handler: &H,
    claims: &Claims,
    events: Vec<Batched<'_, H::Event>>,
) -> Result<Vec<Outcome>, HandleError> {
    after_commit_of(
        Result::is_ok,
        outbox::at_end_of(batch_in_tx(db, handler, claims, events)),
    )
    .await
}

/// [`apply_batch`] for events not yet decoded, as [`apply`] is to
/// [`apply_decoded`]: each decoded for `handler`, none with a span of its
/// own. One it cannot read fails the whole batch, as one to be parked does.
pub async fn apply_as_batch<'c, H: Handler, E: std::borrow::Borrow<Envelope>>(
    db: impl Acquire<'c, Database = Postgres>,
    handler: &H,
    claims: &Claims,
    envelopes: &[E],
) -> Result<Vec<Outcome>, HandleError> {
    let batch = envelopes
        .iter()
        .map(|envelope| {
            let envelope = envelope.borrow();
            Ok(Batched {
                envelope,
                event: H::Event::decode(envelope)?,
                span: tracing::Span::none(),
            })
        })
        .collect::<Result<Vec<_>, Reject>>()?;
    apply_batch(db, handler, claims, batch).await
}

/// Runs `work`, which commits its own transaction, and once `committed`
/// says it did, publishes the events it wrote and runs its [`after_commit`] work.
async fn after_commit_of<T>(
    committed: impl FnOnce(&T) -> bool,
    work: impl Future<Output = T>,
) -> T {
    let ((result, after), written) =
        outbox::capture(AFTER_COMMIT.scope(Default::default(), async {
            let result = work.await;
            (result, AFTER_COMMIT.with(|queue| queue.take()))
        }))
        .await;
    if committed(&result) {
        // Committed: the events it wrote go out now, not at the relay's next sweep.
        written.publish();
        for f in after {
            f();
        }
    }
    result
}

/// Records `envelope` in the inbox of the open `tx` and, if it was not
/// there yet, runs its effects; whether it was new.
async fn record_and_handle<H: Handler>(
    tx: &mut Tx<'_>,
    handler: &H,
    claims: &Claims,
    envelope: &Envelope,
    event: H::Event,
) -> Result<bool, HandleError> {
    let (fresh, claimed) = record_in_inbox(tx, &[envelope], claims).await?;
    if fresh[0] {
        barrier::with_claims(claimed, handle(tx, handler, envelope, event)).await?;
    }
    Ok(fresh[0])
}

/// Runs the handler on a new event, then withdraws the barrier claims made
/// for it that its handler did not take.
async fn handle<H: Handler>(
    tx: &mut Tx<'_>,
    handler: &H,
    envelope: &Envelope,
    event: H::Event,
) -> Result<(), HandleError> {
    handler.handle(tx, envelope, event).await?;
    let untaken = barrier::untaken_claims(envelope.id());
    if !untaken.is_empty() {
        barrier::withdraw(tx, &envelope.saga_id, &untaken).await?;
    }
    Ok(())
}

async fn apply_in_tx<'c, H: Handler>(
    db: impl Acquire<'c, Database = Postgres>,
    handler: &H,
    claims: &Claims,
    envelope: &Envelope,
    event: H::Event,
) -> Result<Outcome, HandleError> {
    let mut tx = db.begin().await?;
    match record_and_handle(&mut tx, handler, claims, envelope, event).await {
        Ok(true) => {
            outbox::write_at_end(&mut tx).await?;
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

async fn batch_in_tx<'c, H: Handler>(
    db: impl Acquire<'c, Database = Postgres>,
    handler: &H,
    claims: &Claims,
    events: Vec<Batched<'_, H::Event>>,
) -> Result<Vec<Outcome>, HandleError> {
    let mut tx = db.begin().await?;
    let envelopes: Vec<&Envelope> = events.iter().map(|b| b.envelope).collect();
    let (fresh, claimed) = record_in_inbox(&mut tx, &envelopes, claims).await?;
    let one_by_one = !claimed.is_empty();
    barrier::with_claims(
        claimed,
        batch::scope(handle_batch(tx, handler, events, fresh, one_by_one)),
    )
    .await
}

/// A batch's effects and commit, once its events are in the inbox: the
/// handler's [`Handler::before_batch`], then its [`Handler::handle_all`],
/// or, where the batch made barrier claims (`one_by_one`), each event's
/// effects and then the withdrawal of its untaken claims, one event after
/// the other; then the outgoing events, the handler's
/// [`Handler::after_batch`] and the commit.
async fn handle_batch<H: Handler>(
    mut tx: Tx<'_>,
    handler: &H,
    events: Vec<Batched<'_, H::Event>>,
    fresh: Vec<bool>,
    one_by_one: bool,
) -> Result<Vec<Outcome>, HandleError> {
    let new_events: Vec<(&Envelope, &H::Event)> = events
        .iter()
        .zip(&fresh)
        .filter(|(_, fresh)| **fresh)
        .map(|(b, _)| (b.envelope, &b.event))
        .collect();
    handler.before_batch(&mut tx, &new_events).await?;
    let outcomes = fresh
        .iter()
        .map(|fresh| match fresh {
            true => Outcome::Applied,
            false => Outcome::Duplicate,
        })
        .collect();
    let new_events: Vec<Batched<'_, H::Event>> = events
        .into_iter()
        .zip(fresh)
        .filter_map(|(batched, fresh)| fresh.then_some(batched))
        .collect();
    // On error the transaction is dropped, and with it rolled back.
    if one_by_one {
        for Batched {
            envelope,
            event,
            span,
        } in new_events
        {
            handle(&mut tx, handler, envelope, event)
                .instrument(span)
                .await?;
        }
    } else {
        handler.handle_all(&mut tx, new_events).await?;
    }
    outbox::write_at_end(&mut tx).await?;
    handler.after_batch(&mut tx).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Records events in the inbox of the open `tx` and makes the barrier claims
/// `claims` ties to their types, in one statement: whether each event was new
/// (an event given twice is new only the first time), and the claims made.
///
/// A claim is made only for a new event, and only for the first event of the
/// batch that claims its (saga, step) row: a later one in the same batch finds
/// that row through [`barrier`], as it would in a transaction of its own. A
/// row that exists already is left alone, and the step asks the database.
async fn record_in_inbox(
    tx: &mut Tx<'_>,
    envelopes: &[&Envelope],
    claims: &Claims,
) -> Result<(Vec<bool>, Vec<Claimed>), sqlx::Error> {
    let ids: Vec<uuid::Uuid> = envelopes.iter().map(|e| e.id()).collect();
    let types: Vec<&str> = envelopes.iter().map(|e| e.event_type.as_str()).collect();
    let sagas: Vec<&str> = envelopes.iter().map(|e| e.saga_id.as_str()).collect();
    let mut first_claims = std::collections::HashSet::new();
    let asked: Vec<Option<Claim>> = envelopes
        .iter()
        .map(|e| {
            claims
                .get(&e.event_type)
                .copied()
                .filter(|claim| first_claims.insert((e.saga_id.as_str(), claim.step())))
        })
        .collect();
    // Where no event claims a row (the order service's events, say), the
    // plain insert: the statement with claims costs more to run.
    const INBOX_ONLY: &str = "INSERT INTO choreo_inbox (event_id, event_type, saga_id)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])
         ON CONFLICT (event_id) DO NOTHING RETURNING event_id, false";
    let steps: Vec<Option<&str>> = asked.iter().map(|c| c.map(Claim::step)).collect();
    let states: Vec<Option<&str>> = asked.iter().map(|c| c.map(Claim::first_state)).collect();
    let with_claims = asked.iter().any(Option::is_some);
    let query = sqlx::query_as(if !with_claims {
        INBOX_ONLY
    } else {
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
                 AS i (event_id, event_type, saga_id, step, state)
         ), fresh AS (
             INSERT INTO choreo_inbox (event_id, event_type, saga_id)
             SELECT event_id, event_type, saga_id FROM input
             ON CONFLICT (event_id) DO NOTHING RETURNING event_id
         ), claimed AS (
             INSERT INTO choreo_barrier (saga_id, step, state)
             SELECT input.saga_id, input.step, input.state
             FROM input JOIN fresh USING (event_id)
             WHERE input.step IS NOT NULL
             ON CONFLICT (saga_id, step) DO NOTHING RETURNING saga_id, step
         )
         SELECT fresh.event_id, bool_or(claimed.step IS NOT NULL)
         FROM fresh
         JOIN input USING (event_id)
         LEFT JOIN claimed ON claimed.saga_id = input.saga_id AND claimed.step = input.step
         GROUP BY fresh.event_id"
    })
    .bind(&ids)
    .bind(&types)
    .bind(&sagas);
    let rows: Vec<(uuid::Uuid, bool)> = if with_claims {
        query.bind(&steps).bind(&states)
    } else {
        query
    }
    .fetch_all(&mut **tx)
    .await?;
    let mut inserted: std::collections::HashMap<uuid::Uuid, bool> = rows.into_iter().collect();
    let mut claimed = Vec::new();
    let fresh = ids
        .iter()
        .zip(&asked)
        .map(|(id, asked)| match inserted.remove(id) {
            Some(made_claim) => {
                if let (true, Some(claim)) = (made_claim, asked) {
                    claimed.push((*id, *claim));
                }
                true
            }
            None => false,
        })
        .collect();
    Ok((fresh, claimed))
}

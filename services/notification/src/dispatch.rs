//! Sends queued messages after the transaction that queued them committed:
//! at once, handed over by the handler after its commit, or by a poll.
//!
//! The handler only writes a PENDING row (and its saga step's barrier row) in
//! the consumer's transaction, so a slow or absent provider never holds up the
//! consumer, and a rolled-back handler never sent anything. Here each due row
//! is taken with `FOR UPDATE SKIP LOCKED` (every instance runs a dispatcher;
//! each row goes to one of them), sent, and marked in the same transaction
//! that writes the saga event that follows: `notification.sent` after a
//! confirmation went out, `notification.failed` when it never will. A provider
//! that is down is tried again with backoff; the order's deadline bounds how
//! long the saga waits for it.
use std::sync::Arc;
use std::time::Duration;

use choreo::{Envelope, Outbox};
use contracts::events::v1 as ev;
use prost::Message;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::handler::record_failure;
use crate::message::{Kind, Status};
use crate::sender::{SendError, Sender, scrubbed};

/// The longest wait between two attempts at one message.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Sends messages until `shutdown`: those whose ids `queued` hands over
/// (the handler's, once its transaction committed) at once, all that are
/// queued by then in one batch; and, every `poll`, whatever is due and was
/// not sent that way (a retry after the provider failed, a message queued
/// before a crash, another instance's). A poll takes one batch first; only
/// when it was full (more are due) do `workers` batches go in flight at once
/// (`SKIP LOCKED` keeps them and the hand-overs apart).
pub async fn run(
    pool: PgPool,
    outbox: Outbox,
    sender: Arc<dyn Sender>,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<Uuid>,
    poll: Duration,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let mut next_poll = tokio::time::Instant::now() + poll;
    // Rounds come one after another, each a transaction: one connection for
    // them all (its statements keep their plans, see `choreo::db::HeldConnection`),
    // and one for each worker that drains a backlog beside it, opened when
    // it is first needed.
    let mut db = choreo::db::HeldConnection::like(&pool);
    let mut drains: Vec<_> = (0..limits.workers.max(1))
        .map(|_| choreo::db::HeldConnection::like(&pool))
        .collect();
    while !shutdown.is_cancelled() {
        let first = tokio::select! {
            id = queued.recv() => id,
            _ = tokio::time::sleep_until(next_poll) => None,
            _ = shutdown.cancelled() => break,
        };
        if let Some(first) = first {
            let mut ids = vec![first];
            while ids.len() < limits.batch as usize {
                match queued.try_recv() {
                    Ok(id) => ids.push(id),
                    Err(_) => break,
                }
            }
            let sent = db
                .run(async |conn| {
                    choreo::outbox::publish_after_commit(dispatch_these(
                        conn,
                        &outbox,
                        sender.as_ref(),
                        &ids,
                    ))
                    .await
                })
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "dispatch failed; the poll will retry");
            }
            continue;
        }
        next_poll = tokio::time::Instant::now() + poll;
        let first = db
            .run(async |conn| {
                choreo::outbox::publish_after_commit(dispatch(
                    conn,
                    &outbox,
                    sender.as_ref(),
                    limits.batch,
                ))
                .await
            })
            .await;
        match first {
            Ok(done) if done.len() as i64 >= limits.batch => {
                let draining = drains
                    .iter_mut()
                    .map(|db| drain(db, &outbox, sender.as_ref(), limits.batch, &shutdown));
                futures::future::join_all(draining).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "dispatch failed; will retry"),
        }
    }
    db.close().await;
    for db in drains {
        db.close().await;
    }
}

/// How much the dispatcher does at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Batches in flight.
    pub workers: usize,
    /// Messages per batch (one transaction; their provider calls run together).
    pub batch: i64,
}

/// Sends due batches one after another until none is due, on `db`.
async fn drain(
    db: &mut choreo::db::HeldConnection,
    outbox: &Outbox,
    sender: &dyn Sender,
    batch: i64,
    shutdown: &CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let round = db
            .run(async |conn| {
                choreo::outbox::publish_after_commit(dispatch(conn, outbox, sender, batch)).await
            })
            .await;
        match round {
            // A full batch: more may be due.
            Ok(done) if done.len() as i64 >= batch => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "dispatch failed; will retry");
                return;
            }
        }
    }
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dispatched {
    Sent,
    Failed(String),
    /// The provider is unavailable; the message waits for its next attempt.
    Deferred(String),
}

impl Dispatched {
    fn label(&self) -> &'static str {
        match self {
            Dispatched::Sent => "sent",
            Dispatched::Failed(_) => "failed",
            Dispatched::Deferred(_) => "deferred",
        }
    }
}

/// A queued message whose time has come.
#[derive(sqlx::FromRow)]
struct Due {
    notification_id: Uuid,
    order_id: Uuid,
    kind: Kind,
    customer: String,
    recipient: String,
    body: String,
    cause: Option<Vec<u8>>,
    attempts: i32,
}

/// Sends up to `limit` due messages, oldest first, and records what happened
/// to each in one transaction (with the saga events that follow). Returns
/// what became of each; empty when nothing is due. If the commit fails, the
/// batch is sent again later under the same notification ids.
///
/// Its statements keep their plans: the dispatcher runs it on a held
/// connection, which drops them every [`choreo::db::PLAN_LIFETIME`], so the
/// scan for due messages is planned from the table as it is now.
pub async fn dispatch<'c>(
    db: impl sqlx::Acquire<'c, Database = sqlx::Postgres>,
    outbox: &Outbox,
    sender: &dyn Sender,
    limit: i64,
) -> Result<Vec<Dispatched>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let due: Vec<Due> = sqlx::query_as(
        "SELECT notification_id, order_id, kind, customer, recipient, body, cause, attempts
         FROM notifications
         WHERE status = $2 AND next_attempt_at <= now()
         ORDER BY next_attempt_at
         LIMIT $1
         FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .bind(Status::Pending)
    .fetch_all(&mut *tx)
    .await?;
    send_and_record(tx, outbox, sender, due).await
}

/// Sends the messages `ids` (those still pending, due, and not taken by
/// another round), the way [`dispatch`] sends due ones.
///
/// Each id is looked up by key, one after the other. Written as a filter on
/// the table (`WHERE notification_id = ANY($1) AND status = ...`), the
/// query lets PostgreSQL intersect the key lookups with a scan of all of
/// `notifications_due`, which still lists every message sent since the
/// last vacuum: each round would walk thousands of entries at a few hundred
/// orders a second, ten times the work of the lookups. Its statements keep
/// their plans, as [`dispatch`]'s do.
pub async fn dispatch_these<'c>(
    db: impl sqlx::Acquire<'c, Database = sqlx::Postgres>,
    outbox: &Outbox,
    sender: &dyn Sender,
    ids: &[Uuid],
) -> Result<Vec<Dispatched>, sqlx::Error> {
    // Each id once: the join below would return a message once per mention.
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut tx = db.begin().await?;
    let due: Vec<Due> = sqlx::query_as(
        "SELECT n.notification_id, n.order_id, n.kind, n.customer, n.recipient, n.body, n.cause, n.attempts
         FROM unnest($1::uuid[]) AS handed (notification_id)
         JOIN notifications n USING (notification_id)
         WHERE n.status = $2 AND n.next_attempt_at <= now()
         ORDER BY n.next_attempt_at
         FOR UPDATE OF n SKIP LOCKED",
    )
    .bind(&ids)
    .bind(Status::Pending)
    .fetch_all(&mut *tx)
    .await?;
    send_and_record(tx, outbox, sender, due).await
}

/// Sends the messages locked in `tx` and records each answer there, then
/// commits.
async fn send_and_record(
    mut tx: choreo::Tx<'_>,
    outbox: &Outbox,
    sender: &dyn Sender,
    due: Vec<Due>,
) -> Result<Vec<Dispatched>, sqlx::Error> {
    if due.is_empty() {
        return Ok(Vec::new());
    }
    // Each message is its own span in its order's trace, child of the event that asked for it.
    let spans: Vec<(tracing::Span, Option<Envelope>)> = due
        .iter()
        .map(|message| {
            let cause = message
                .cause
                .as_deref()
                .and_then(|bytes| Envelope::decode(bytes).ok());
            let span = tracing::info_span!(
                "send notification",
                order_id = %message.order_id,
                notification_id = %message.notification_id,
                kind = %message.kind,
            );
            if let Some(cause) = &cause {
                choreo::telemetry::set_parent(&span, &cause.traceparent);
            }
            (span, cause)
        })
        .collect();
    let answers = futures::future::join_all(due.iter().zip(&spans).map(|(message, (span, _))| {
        async move {
            let id = message.notification_id.to_string();
            sender.send(&id, &message.recipient, &message.body).await
        }
        .instrument(span.clone())
    }))
    .await;
    let mut outcomes = Vec::with_capacity(due.len());
    let mut sent = Vec::new();
    let mut events = Vec::new();
    for ((message, (span, cause)), answer) in due.iter().zip(&spans).zip(answers) {
        let (outcome, event) = record(&mut tx, outbox, sender, message, cause.as_ref(), answer)
            .instrument(span.clone())
            .await?;
        if outcome == Dispatched::Sent {
            sent.push(message.notification_id);
        }
        events.extend(event);
        outcomes.push(outcome);
    }
    // The usual answer, sent, is marked for all at once, and the events
    // written in one statement.
    if !sent.is_empty() {
        sqlx::query(
            "UPDATE notifications SET status = $2, sent_at = now(), attempts = attempts + 1, last_error = NULL
             WHERE notification_id = ANY($1)",
        )
        .bind(&sent)
        .bind(Status::Sent)
        .execute(&mut *tx)
        .await?;
    }
    outbox.insert_all(&mut tx, &events).await?;
    tx.commit().await?;
    for (message, outcome) in due.iter().zip(&outcomes) {
        metrics::counter!("notifications_total", "kind" => message.kind.as_str(), "outcome" => outcome.label())
            .increment(1);
    }
    Ok(outcomes)
}

/// Marks one message by the provider's answer (a sent one is left to the
/// caller, which marks all of them at once), and builds the saga event a
/// confirmation's answer calls for, for the caller to write.
async fn record(
    tx: &mut PgConnection,
    outbox: &Outbox,
    sender: &dyn Sender,
    message: &Due,
    cause: Option<&Envelope>,
    answer: Result<(), SendError>,
) -> Result<(Dispatched, Option<Envelope>), sqlx::Error> {
    let id = message.notification_id;
    let order_id = message.order_id;
    let saga_id = order_id.to_string();
    let confirmation = message.kind == Kind::Confirmation;
    Ok(match answer {
        Ok(()) => {
            let sent = confirmation.then(|| {
                let sent = ev::NotificationSent {
                    notification_id: id.to_string(),
                    channel: sender.channel().to_owned(),
                };
                outbox.envelope(&saga_id, cause, &sent)
            });
            tracing::info!("notification sent");
            (Dispatched::Sent, sent)
        }
        Err(SendError::Undeliverable(why)) => {
            let why = scrubbed(&why, &message.recipient);
            let reason = format!("customer {} cannot be reached: {why}", message.customer);
            sqlx::query(
                "UPDATE notifications SET status = $3, attempts = attempts + 1, last_error = $2
                 WHERE notification_id = $1",
            )
            .bind(id)
            .bind(&why)
            .bind(Status::Failed)
            .execute(&mut *tx)
            .await?;
            let failed = if confirmation {
                let failed = record_failure(tx, order_id, reason.clone()).await?;
                Some(outbox.envelope(&saga_id, cause, &failed))
            } else {
                tracing::info!(%reason, "cancellation notice undeliverable");
                None
            };
            (Dispatched::Failed(reason), failed)
        }
        Err(SendError::Unavailable(why)) => {
            let why = scrubbed(&why, &message.recipient);
            let wait = backoff(message.attempts);
            sqlx::query(
                "UPDATE notifications
                 SET attempts = attempts + 1, last_error = $2,
                     next_attempt_at = now() + make_interval(secs => $3)
                 WHERE notification_id = $1",
            )
            .bind(id)
            .bind(&why)
            .bind(wait.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            tracing::warn!(error = %why, retry_in = ?wait, "notification deferred");
            (Dispatched::Deferred(why), None)
        }
    })
}

/// 1 s, 2 s, 4 s ... up to [`MAX_BACKOFF`], by attempts made so far.
fn backoff(attempts: i32) -> Duration {
    let exponent = attempts.clamp(0, 6) as u32;
    (Duration::from_secs(1) * 2u32.pow(exponent)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(6), Duration::from_secs(60));
        assert_eq!(backoff(100), Duration::from_secs(60));
    }
}

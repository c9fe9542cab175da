//! Sends queued messages after the transaction that queued them committed.
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

use choreo::db::Wakeup;
use choreo::{Envelope, Outbox};
use contracts::events::v1 as ev;
use prost::Message;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::sender::{SendError, Sender};

/// The channel the handler notifies (in its transaction, so at commit) when it queues a message.
pub const CHANNEL: &str = "notifications_due";
/// The longest wait between two attempts at one message.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Sends due messages until `shutdown`; woken by [`CHANNEL`], polling every `poll`.
pub async fn run(
    pool: PgPool,
    outbox: Outbox,
    sender: Arc<dyn Sender>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let mut wakeup = Wakeup::new(pool.clone(), CHANNEL, poll);
    wakeup.listen().await;
    while !shutdown.is_cancelled() {
        loop {
            match dispatch_one(&pool, &outbox, sender.as_ref()).await {
                Ok(Some(_)) if !shutdown.is_cancelled() => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch failed; will retry");
                    break;
                }
            }
        }
        wakeup.wait(&shutdown).await;
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

/// A queued message whose time has come.
#[derive(sqlx::FromRow)]
struct Due {
    notification_id: Uuid,
    order_id: String,
    kind: String,
    customer: String,
    recipient: String,
    body: String,
    cause: Option<Vec<u8>>,
    attempts: i32,
}

/// Sends the oldest due message, if any, and records what happened.
pub async fn dispatch_one(
    pool: &PgPool,
    outbox: &Outbox,
    sender: &dyn Sender,
) -> Result<Option<Dispatched>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let due: Option<Due> = sqlx::query_as(
        "SELECT notification_id, order_id, kind, customer, recipient, body, cause, attempts
         FROM notifications
         WHERE status = 'PENDING' AND next_attempt_at <= now()
         ORDER BY next_attempt_at
         LIMIT 1
         FOR UPDATE SKIP LOCKED",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(Due {
        notification_id: id,
        order_id,
        kind,
        customer,
        recipient,
        body,
        cause,
        attempts,
    }) = due
    else {
        return Ok(None);
    };
    let cause = cause.and_then(|bytes| Envelope::decode(bytes.as_slice()).ok());
    let span = tracing::info_span!(
        "send notification",
        order_id = %order_id,
        notification_id = %id,
        kind = %kind,
    );
    if let Some(cause) = &cause {
        choreo::telemetry::set_parent(&span, &cause.traceparent);
    }
    async {
        let outcome = match sender.send(&id.to_string(), &recipient, &body).await {
            Ok(()) => {
                sqlx::query(
                    "UPDATE notifications SET status = 'SENT', sent_at = now(), attempts = attempts + 1, last_error = NULL
                     WHERE notification_id = $1",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                if kind == "CONFIRMATION" {
                    let sent = ev::NotificationSent {
                        notification_id: id.to_string(),
                        channel: sender.channel().to_owned(),
                    };
                    outbox.emit(&mut tx, &order_id, cause.as_ref(), &sent).await?;
                }
                tracing::info!("notification sent");
                Dispatched::Sent
            }
            Err(SendError::Undeliverable(why)) => {
                let reason = format!("customer {customer} cannot be reached: {why}");
                sqlx::query(
                    "UPDATE notifications SET status = 'FAILED', attempts = attempts + 1, last_error = $2
                     WHERE notification_id = $1",
                )
                .bind(id)
                .bind(&why)
                .execute(&mut *tx)
                .await?;
                if kind == "CONFIRMATION" {
                    sqlx::query(
                        "INSERT INTO notification_failures (order_id, reason) VALUES ($1, $2)
                         ON CONFLICT (order_id) DO NOTHING",
                    )
                    .bind(&order_id)
                    .bind(&reason)
                    .execute(&mut *tx)
                    .await?;
                    let failed = ev::NotificationFailed {
                        reason: reason.clone(),
                    };
                    outbox.emit(&mut tx, &order_id, cause.as_ref(), &failed).await?;
                }
                tracing::info!(%reason, "notification failed");
                Dispatched::Failed(reason)
            }
            Err(SendError::Unavailable(why)) => {
                let wait = backoff(attempts);
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
                Dispatched::Deferred(why)
            }
        };
        tx.commit().await?;
        let label = match &outcome {
            Dispatched::Sent => "sent",
            Dispatched::Failed(_) => "failed",
            Dispatched::Deferred(_) => "deferred",
        };
        metrics::counter!("notifications_total", "kind" => kind.clone(), "outcome" => label)
            .increment(1);
        Ok(Some(outcome))
    }
    .instrument(span)
    .await
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

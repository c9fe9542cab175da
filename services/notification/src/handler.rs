//! Notification's rules: tell the customer once their order is scheduled; if
//! they cannot be reached, fail the order; when an order is compensated after
//! the customer was told, send a cancellation notice.
//!
//! The handler queues messages; the [`crate::dispatch`]er sends them once the
//! handler's transaction has committed, and writes the event that follows.
use choreo::choreography::Step;
use choreo::step::{self, CompensableStep, Undo, Verdict};
use choreo::{Config, Effect, Envelope, HandleError, Outbox, Reject, Tx};
use contracts::events::v1 as ev;
use contracts::{CHOREOGRAPHY, SagaEvent};
use prost::Message;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::message::{Kind, Status};

pub struct NotificationHandler {
    pub outbox: Outbox,
    pub config: Config,
    /// Recorded with each message.
    pub channel: String,
    /// Where a queued message's id goes once its transaction commits, for the
    /// dispatcher to send it at once (none: the dispatcher's poll finds it).
    pub due: Option<tokio::sync::mpsc::UnboundedSender<Uuid>>,
}

/// A message to queue.
struct Outgoing<'a> {
    kind: Kind,
    customer: &'a str,
    recipient: &'a str,
    text: String,
}

/// The customer cannot be told: records why (the order's note in
/// ListNotifications) and returns the `notification.failed` to write, which
/// starts the compensation. Used by the dispatcher (the provider says the
/// message can never be delivered); the step writes [`failure`] itself.
pub(crate) async fn record_failure(
    tx: &mut PgConnection,
    order_id: Uuid,
    reason: String,
) -> Result<ev::NotificationFailed, sqlx::Error> {
    failure(order_id, &reason).run(tx).await?;
    Ok(ev::NotificationFailed { reason })
}

/// Records why the customer of `order_id` cannot be told, as one statement
/// (which always holds: a second reason for one order is left out).
fn failure(order_id: Uuid, reason: &str) -> Effect {
    let logged = reason.to_owned();
    Effect::new(
        "recorded AS (
             INSERT INTO notification_failures (order_id, reason) VALUES ($1, $2)
             ON CONFLICT (order_id) DO NOTHING)",
        "SELECT true",
    )
    .bind(order_id)
    .bind(reason)
    .after_commit(move || tracing::info!(reason = %logged, "notification failed"))
}

impl NotificationHandler {
    /// Writes a PENDING message for the dispatcher, caused by `envelope`, as
    /// one statement, which hands its id to the dispatcher once committed.
    fn queued(&self, envelope: &Envelope, message: Outgoing<'_>) -> Result<Effect, Reject> {
        let id = Uuid::now_v7();
        let due = self.due.clone();
        let kind = message.kind;
        Ok(Effect::new(
            "queued AS (
                 INSERT INTO notifications (notification_id, order_id, kind, customer, recipient, channel, body, cause)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING notification_id)",
            "SELECT notification_id FROM queued",
        )
        .bind(id)
        .bind(contracts::order_id_of(envelope)?)
        .bind(kind)
        .bind(message.customer)
        .bind(message.recipient)
        .bind(self.channel.as_str())
        .bind(message.text.as_str())
        .bind(envelope.encode_to_vec())
        .after_commit(move || {
            if let Some(due) = due {
                let _ = due.send(id);
            }
            tracing::info!(notification_id = %id, %kind, "notification queued");
        }))
    }

    /// The step's work as one statement: the confirmation queued for the
    /// dispatcher (which writes `notification.sent` or `.failed` once it
    /// went out or never will), or a failure the configuration injects.
    fn confirm(
        &self,
        envelope: &Envelope,
        shipment: &ev::ShippingScheduled,
    ) -> Result<step::WorkStatement<ev::NotificationSent, ev::NotificationFailed>, Reject> {
        let order_id = contracts::order_id_of(envelope)?;
        if let Some(reason) = self.config.injected_failure() {
            let recorded = failure(order_id, &reason);
            return Ok((recorded, Verdict::Failed(ev::NotificationFailed { reason })));
        }
        let text = format!(
            "Your order {order_id} is on its way with {} (shipment {}).",
            shipment.carrier, shipment.shipment_id
        );
        let message = Outgoing {
            kind: Kind::Confirmation,
            customer: &shipment.customer,
            recipient: &shipment.contact,
            text,
        };
        Ok((self.queued(envelope, message)?, Verdict::Later))
    }

    /// A confirmation that has not gone out yet is withdrawn, and the customer
    /// never hears of the order; one that went out is followed by a
    /// cancellation notice. Returns whether a notice was queued.
    ///
    /// If the dispatcher is sending the confirmation right now it holds the
    /// row's lock: the UPDATE waits for its commit, then finds it SENT.
    async fn withdraw_or_apologise(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
    ) -> Result<bool, HandleError> {
        let order_id = contracts::order_id_of(envelope)?;
        let withdrawn = sqlx::query(
            "UPDATE notifications SET status = $2
             WHERE order_id = $1 AND kind = $3 AND status = $4",
        )
        .bind(order_id)
        .bind(Status::Withdrawn)
        .bind(Kind::Confirmation)
        .bind(Status::Pending)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if withdrawn > 0 {
            tracing::info!("confirmation withdrawn before it went out");
            return Ok(false);
        }
        let told: Option<(String, String)> = sqlx::query_as(
            "SELECT customer, recipient FROM notifications
             WHERE order_id = $1 AND kind = $2 AND status = $3",
        )
        .bind(order_id)
        .bind(Kind::Confirmation)
        .bind(Status::Sent)
        .fetch_optional(&mut **tx)
        .await?;
        let Some((customer, recipient)) = told else {
            return Ok(false);
        };
        let message = Outgoing {
            kind: Kind::Cancellation,
            customer: &customer,
            recipient: &recipient,
            text: format!("Sorry: your order {order_id} was cancelled and will not be delivered."),
        };
        self.queued(envelope, message)?.run(tx).await?;
        Ok(true)
    }
}

#[async_trait::async_trait]
impl CompensableStep for NotificationHandler {
    const STEP: &'static Step = CHOREOGRAPHY.step("notify");
    type Event = SagaEvent;
    type Input = ev::ShippingScheduled;
    type Success = ev::NotificationSent;
    type Failure = ev::NotificationFailed;
    type Compensated = ev::NotificationCancelled;

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Queues the confirmation; the dispatcher sends it after commit and
    /// writes `notification.sent` (or `.failed`) then.
    async fn work(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        shipment: ev::ShippingScheduled,
    ) -> Result<Verdict<ev::NotificationSent, ev::NotificationFailed>, HandleError> {
        let (statement, verdict) = self.confirm(envelope, &shipment)?;
        statement.run(tx).await?;
        Ok(verdict)
    }

    fn work_as_statement(
        &self,
        envelope: &Envelope,
        shipment: &ev::ShippingScheduled,
    ) -> Option<step::WorkStatement<ev::NotificationSent, ev::NotificationFailed>> {
        self.confirm(envelope, shipment).ok()
    }

    async fn undo(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        undo: Undo,
        cause: String,
    ) -> Result<ev::NotificationCancelled, HandleError> {
        let notice_sent = match undo {
            Undo::NeverDone => false,
            Undo::Work => self.withdraw_or_apologise(tx, envelope).await?,
        };
        Ok(ev::NotificationCancelled { notice_sent, cause })
    }
}

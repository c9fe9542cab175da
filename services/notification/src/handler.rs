//! Notification's rules: tell the customer once their order is scheduled; if
//! they cannot be reached, fail the order; when an order is compensated after
//! the customer was told, send a cancellation notice.
//!
//! The handler queues messages; the [`crate::dispatch`]er sends them once the
//! handler's transaction has committed, and writes the event that follows.
use choreo::barrier::{self, Compensation};
use choreo::{Config, Envelope, HandleError, Handler, Outbox, Reject, Tx};
use contracts::SagaEvent;
use contracts::events::v1 as ev;
use prost::Message;
use sqlx::PgConnection;
use uuid::Uuid;

/// The barrier step notification owns.
const STEP: &str = "notify";

pub struct NotificationHandler {
    pub outbox: Outbox,
    pub config: Config,
    /// Recorded with each message.
    pub channel: String,
}

/// A message to queue.
struct Outgoing<'a> {
    kind: &'a str,
    customer: &'a str,
    recipient: &'a str,
    text: String,
}

/// The customer cannot be told: records why (the order's note in
/// ListNotifications) and writes `notification.failed`, which starts the
/// compensation. Used by the handler (an injected failure) and by the
/// dispatcher (the provider says the message can never be delivered).
pub(crate) async fn fail_order(
    tx: &mut PgConnection,
    outbox: &Outbox,
    order_id: &str,
    cause: Option<&Envelope>,
    reason: String,
) -> Result<(), sqlx::Error> {
    tracing::info!(%reason, "notification failed");
    sqlx::query(
        "INSERT INTO notification_failures (order_id, reason) VALUES ($1, $2)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(&reason)
    .execute(&mut *tx)
    .await?;
    outbox
        .emit(tx, order_id, cause, &ev::NotificationFailed { reason })
        .await?;
    Ok(())
}

impl NotificationHandler {
    /// Writes a PENDING message for the dispatcher, caused by `envelope`, and
    /// wakes the dispatcher when the transaction commits.
    async fn queue(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
        message: Outgoing<'_>,
    ) -> Result<Uuid, HandleError> {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO notifications (notification_id, order_id, kind, customer, recipient, channel, body, cause)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(&envelope.saga_id)
        .bind(message.kind)
        .bind(message.customer)
        .bind(message.recipient)
        .bind(&self.channel)
        .bind(&message.text)
        .bind(envelope.encode_to_vec())
        .execute(&mut **tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(crate::dispatch::CHANNEL)
            .execute(&mut **tx)
            .await?;
        tracing::info!(notification_id = %id, kind = message.kind, "notification queued");
        Ok(id)
    }

    async fn notify(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
        shipment: ev::ShippingScheduled,
    ) -> Result<(), HandleError> {
        let order_id = envelope.saga_id.as_str();
        if !barrier::action(tx, order_id, STEP).await?.proceeds(STEP) {
            return Ok(());
        }
        if let Some(reason) = self.config.injected_failure() {
            fail_order(tx, &self.outbox, order_id, Some(envelope), reason).await?;
            return Ok(());
        }
        let text = format!(
            "Your order {order_id} is on its way with {} (shipment {}).",
            shipment.carrier, shipment.shipment_id
        );
        let message = Outgoing {
            kind: "CONFIRMATION",
            customer: &shipment.customer,
            recipient: &shipment.contact,
            text,
        };
        self.queue(tx, envelope, message).await?;
        Ok(())
    }

    async fn take_back(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
        cause: String,
    ) -> Result<(), HandleError> {
        let order_id = envelope.saga_id.as_str();
        let notice_sent = match barrier::compensation(tx, order_id, STEP).await? {
            Compensation::AlreadyCompensated => return Ok(()),
            Compensation::NothingToUndo => false,
            Compensation::Undo => self.withdraw_or_apologise(tx, envelope).await?,
        };
        tracing::info!(notice_sent, "notification compensated");
        self.outbox
            .emit(
                tx,
                order_id,
                Some(envelope),
                &ev::NotificationCancelled { notice_sent, cause },
            )
            .await?;
        Ok(())
    }

    /// A confirmation that has not gone out yet is withdrawn, and the customer
    /// never hears of the order; one that went out is followed by a
    /// cancellation notice. Returns whether a notice was queued.
    ///
    /// If the dispatcher is sending the confirmation right now it holds the
    /// row's lock: the UPDATE waits for its commit, then finds it SENT.
    async fn withdraw_or_apologise(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
    ) -> Result<bool, HandleError> {
        let order_id = envelope.saga_id.as_str();
        let withdrawn = sqlx::query(
            "UPDATE notifications SET status = 'WITHDRAWN'
             WHERE order_id = $1 AND kind = 'CONFIRMATION' AND status = 'PENDING'",
        )
        .bind(order_id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if withdrawn > 0 {
            tracing::info!("confirmation withdrawn before it went out");
            return Ok(false);
        }
        let told: Option<(String, String)> = sqlx::query_as(
            "SELECT customer, recipient FROM notifications
             WHERE order_id = $1 AND kind = 'CONFIRMATION' AND status = 'SENT'",
        )
        .bind(order_id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some((customer, recipient)) = told else {
            return Ok(false);
        };
        let message = Outgoing {
            kind: "CANCELLATION",
            customer: &customer,
            recipient: &recipient,
            text: format!("Sorry: your order {order_id} was cancelled and will not be delivered."),
        };
        self.queue(tx, envelope, message).await?;
        Ok(true)
    }
}

#[async_trait::async_trait]
impl Handler for NotificationHandler {
    fn reacts_to(&self, envelope: &Envelope) -> Result<bool, Reject> {
        Ok(matches!(
            SagaEvent::decode(envelope)?,
            SagaEvent::ShippingScheduled(_) | SagaEvent::OrderCancelled(_)
        ))
    }

    async fn handle(&self, tx: &mut Tx, envelope: &Envelope) -> Result<(), HandleError> {
        match SagaEvent::decode(envelope)? {
            SagaEvent::ShippingScheduled(shipment) => self.notify(tx, envelope, shipment).await,
            // A customer cancel or a deadline: compensation starts here, at the last step.
            SagaEvent::OrderCancelled(e) => self.take_back(tx, envelope, e.reason).await,
            _ => Ok(()),
        }
    }
}

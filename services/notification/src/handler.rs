//! Notification's rules: tell the customer once their order is scheduled; if
//! they cannot be reached, fail the order; when an order is compensated after
//! the customer was told, send a cancellation notice.
use std::sync::Arc;

use choreo::barrier::{self, Compensation};
use choreo::{Config, Envelope, HandleError, Handler, Outbox, Reject, Tx};
use contracts::SagaEvent;
use contracts::events::v1 as ev;
use uuid::Uuid;

use crate::sender::{Sender, reachable};

/// The barrier step notification owns.
const STEP: &str = "notify";

pub struct NotificationHandler {
    pub outbox: Outbox,
    pub config: Config,
    pub sender: Arc<dyn Sender>,
}

impl NotificationHandler {
    async fn deliver(
        &self,
        tx: &mut Tx,
        order_id: &str,
        kind: &str,
        recipient: &str,
        text: &str,
    ) -> Result<Uuid, HandleError> {
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO notifications (notification_id, order_id, kind, recipient, channel) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(order_id)
            .bind(kind)
            .bind(recipient)
            .bind(self.sender.channel())
            .execute(&mut **tx)
            .await?;
        self.sender
            .send(&id.to_string(), recipient, text)
            .await
            .map_err(HandleError::Transient)?;
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
        let unreachable = match reachable(&shipment.contact) {
            Err(reason) => Some(format!(
                "customer {} cannot be reached: {reason}",
                shipment.customer
            )),
            Ok(()) if self.config.inject_failure() => {
                Some("injected failure (configured failure rate)".to_owned())
            }
            Ok(()) => None,
        };
        if let Some(reason) = unreachable {
            tracing::info!(%reason, "notification failed");
            sqlx::query("INSERT INTO notification_failures (order_id, reason) VALUES ($1, $2)")
                .bind(order_id)
                .bind(&reason)
                .execute(&mut **tx)
                .await?;
            self.outbox
                .emit(
                    tx,
                    order_id,
                    Some(envelope),
                    &ev::NotificationFailed { reason },
                )
                .await?;
            return Ok(());
        }
        let text = format!(
            "Your order {order_id} is on its way with {} (shipment {}).",
            shipment.carrier, shipment.shipment_id
        );
        let id = self
            .deliver(tx, order_id, "CONFIRMATION", &shipment.contact, &text)
            .await?;
        let sent = ev::NotificationSent {
            notification_id: id.to_string(),
            channel: self.sender.channel().to_owned(),
        };
        self.outbox
            .emit(tx, order_id, Some(envelope), &sent)
            .await?;
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
            Compensation::Undo => {
                let told: Option<String> = sqlx::query_scalar(
                    "SELECT recipient FROM notifications WHERE order_id = $1 AND kind = 'CONFIRMATION'",
                )
                .bind(order_id)
                .fetch_optional(&mut **tx)
                .await?;
                match told {
                    Some(recipient) => {
                        let text = format!(
                            "Sorry: your order {order_id} was cancelled and will not be delivered."
                        );
                        self.deliver(tx, order_id, "CANCELLATION", &recipient, &text)
                            .await?;
                        true
                    }
                    None => false,
                }
            }
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

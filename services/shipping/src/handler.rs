//! Shipping's rules: schedule a shipment for a reserved order if the carrier
//! serves its destination; cancel it when the order is compensated.
use choreo::barrier::{self, Compensation};
use choreo::{Config, Envelope, HandleError, Handler, Outbox, Reject, Tx};
use contracts::SagaEvent;
use contracts::events::v1 as ev;
use uuid::Uuid;

/// The barrier step shipping owns.
const STEP: &str = "ship";

pub struct ShippingHandler {
    pub outbox: Outbox,
    pub config: Config,
    pub carrier: String,
    pub served: Vec<String>,
}

impl ShippingHandler {
    async fn schedule(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
        order: ev::InventoryReserved,
    ) -> Result<(), HandleError> {
        let order_id = envelope.saga_id.as_str();
        if !barrier::action(tx, order_id, STEP).await?.proceeds(STEP) {
            return Ok(());
        }
        let failure = if !self.served.contains(&order.destination) {
            Some(format!(
                "carrier {} does not serve destination {}",
                self.carrier, order.destination
            ))
        } else {
            self.config.injected_failure()
        };
        if let Some(reason) = failure {
            tracing::info!(%reason, "shipment failed");
            sqlx::query("INSERT INTO shipments (order_id, status, destination, reason) VALUES ($1, 'FAILED', $2, $3)")
                .bind(order_id)
                .bind(&order.destination)
                .bind(&reason)
                .execute(&mut **tx)
                .await?;
            self.outbox
                .emit(tx, order_id, Some(envelope), &ev::ShippingFailed { reason })
                .await?;
            return Ok(());
        }
        let shipment_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO shipments (order_id, shipment_id, status, carrier, destination) VALUES ($1, $2, 'SCHEDULED', $3, $4)",
        )
        .bind(order_id)
        .bind(shipment_id)
        .bind(&self.carrier)
        .bind(&order.destination)
        .execute(&mut **tx)
        .await?;
        tracing::info!(%shipment_id, "shipment scheduled");
        let scheduled = ev::ShippingScheduled {
            shipment_id: shipment_id.to_string(),
            carrier: self.carrier.clone(),
            destination: order.destination,
            contact: order.contact,
            customer: order.customer,
        };
        self.outbox
            .emit(tx, order_id, Some(envelope), &scheduled)
            .await?;
        Ok(())
    }

    async fn cancel(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
        cause: String,
    ) -> Result<(), HandleError> {
        let order_id = envelope.saga_id.as_str();
        let cancelled: Option<Uuid> = match barrier::compensation(tx, order_id, STEP).await? {
            Compensation::AlreadyCompensated => return Ok(()),
            Compensation::NothingToUndo => {
                sqlx::query(
                    "INSERT INTO shipments (order_id, status, reason) VALUES ($1, 'NEVER_MADE', 'compensated before any shipment')",
                )
                .bind(order_id)
                .execute(&mut **tx)
                .await?;
                None
            }
            Compensation::Undo => sqlx::query_scalar(
                "UPDATE shipments SET status = 'CANCELLED', reason = 'order compensated', updated_at = now()
                 WHERE order_id = $1 AND status = 'SCHEDULED' RETURNING shipment_id",
            )
            .bind(order_id)
            .fetch_optional(&mut **tx)
            .await?,
        };
        tracing::info!(shipment = ?cancelled, "shipment compensated");
        let payload = ev::ShippingCancelled {
            cause,
            shipment_id: cancelled.map(|id| id.to_string()).unwrap_or_default(),
            nothing_scheduled: cancelled.is_none(),
        };
        self.outbox
            .emit(tx, order_id, Some(envelope), &payload)
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Handler for ShippingHandler {
    fn reacts_to(&self, envelope: &Envelope) -> Result<bool, Reject> {
        Ok(matches!(
            SagaEvent::decode(envelope)?,
            SagaEvent::InventoryReserved(_)
                | SagaEvent::NotificationFailed(_)
                | SagaEvent::NotificationCancelled(_)
        ))
    }

    async fn handle(&self, tx: &mut Tx, envelope: &Envelope) -> Result<(), HandleError> {
        match SagaEvent::decode(envelope)? {
            SagaEvent::InventoryReserved(order) => self.schedule(tx, envelope, order).await,
            // The customer could not be told, or notification finished its own compensation.
            SagaEvent::NotificationFailed(e) => {
                let cause = contracts::cause("notification", &e.reason);
                self.cancel(tx, envelope, cause).await
            }
            SagaEvent::NotificationCancelled(e) => self.cancel(tx, envelope, e.cause).await,
            _ => Ok(()),
        }
    }
}

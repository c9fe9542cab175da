//! Shipping's rules: schedule a shipment for a reserved order if the carrier
//! serves its destination; cancel it when the order is compensated.
use choreo::choreography::Step;
use choreo::step::{self, CompensableStep, Undo, Verdict};
use choreo::{Config, Effect, Envelope, HandleError, Outbox, Tx};
use contracts::events::v1 as ev;
use contracts::{CHOREOGRAPHY, SagaEvent};
use uuid::Uuid;

/// Where an order's shipment stands (the `shipments.status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ShipmentStatus {
    Scheduled,
    /// No shipment could be made.
    Failed,
    /// Scheduled, then cancelled by the compensation.
    Cancelled,
    /// Compensated before any shipment; a late inventory.reserved is refused.
    NeverMade,
}

pub struct ShippingHandler {
    pub outbox: Outbox,
    pub config: Config,
    pub carrier: String,
    pub served: Vec<String>,
}

impl ShippingHandler {
    /// Schedules the shipment of `order_id`, or records why none can be
    /// made, in one statement: the step's work alone and in a transaction
    /// alike.
    fn schedule(
        &self,
        order_id: Uuid,
        order: &ev::InventoryReserved,
    ) -> step::WorkStatement<ev::ShippingScheduled, ev::ShippingFailed> {
        let failure = if !self.served.contains(&order.destination) {
            Some(format!(
                "carrier {} does not serve destination {}",
                self.carrier, order.destination
            ))
        } else {
            self.config.injected_failure()
        };
        if let Some(reason) = failure {
            let failed = Effect::new(
                "written AS (
                     INSERT INTO shipments (order_id, status, destination, reason)
                     VALUES ($1, $2, $3, $4) RETURNING order_id)",
                "SELECT order_id FROM written",
            )
            .bind(order_id)
            .bind(ShipmentStatus::Failed)
            .bind(order.destination.clone())
            .bind(reason.clone());
            return (failed, Verdict::Failed(ev::ShippingFailed { reason }));
        }
        let shipment_id = Uuid::now_v7();
        let scheduled = Effect::new(
            "written AS (
                 INSERT INTO shipments (order_id, shipment_id, status, carrier, destination)
                 VALUES ($1, $2, $3, $4, $5) RETURNING order_id)",
            "SELECT order_id FROM written",
        )
        .bind(order_id)
        .bind(shipment_id)
        .bind(ShipmentStatus::Scheduled)
        .bind(self.carrier.clone())
        .bind(order.destination.clone());
        let scheduled_event = ev::ShippingScheduled {
            shipment_id: shipment_id.to_string(),
            carrier: self.carrier.clone(),
            destination: order.destination.clone(),
            contact: order.contact.clone(),
            customer: order.customer.clone(),
        };
        (scheduled, Verdict::Succeeded(scheduled_event))
    }
}

#[async_trait::async_trait]
impl CompensableStep for ShippingHandler {
    const STEP: &'static Step = CHOREOGRAPHY.step("ship");
    type Event = SagaEvent;
    type Input = ev::InventoryReserved;
    type Success = ev::ShippingScheduled;
    type Failure = ev::ShippingFailed;
    type Compensated = ev::ShippingCancelled;

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn work_as_statement(
        &self,
        envelope: &Envelope,
        order: &ev::InventoryReserved,
    ) -> Option<step::WorkStatement<ev::ShippingScheduled, ev::ShippingFailed>> {
        Some(self.schedule(contracts::order_id_of(envelope).ok()?, order))
    }

    async fn work(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        order: ev::InventoryReserved,
    ) -> Result<Verdict<ev::ShippingScheduled, ev::ShippingFailed>, HandleError> {
        let (statement, verdict) = self.schedule(contracts::order_id_of(envelope)?, &order);
        statement.run(tx).await?;
        match &verdict {
            Verdict::Failed(failed) => tracing::info!(reason = %failed.reason, "shipment failed"),
            _ => tracing::info!("shipment scheduled"),
        }
        Ok(verdict)
    }

    async fn undo(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        undo: Undo,
        cause: String,
    ) -> Result<ev::ShippingCancelled, HandleError> {
        let order_id = contracts::order_id_of(envelope)?;
        let cancelled: Option<Uuid> = match undo {
            Undo::NeverDone => {
                sqlx::query(
                    "INSERT INTO shipments (order_id, status, reason) VALUES ($1, $2, 'compensated before any shipment')",
                )
                .bind(order_id)
                .bind(ShipmentStatus::NeverMade)
                .execute(&mut **tx)
                .await?;
                None
            }
            Undo::Work => sqlx::query_scalar(
                "UPDATE shipments SET status = $2, reason = 'order compensated', updated_at = now()
                 WHERE order_id = $1 AND status = $3 RETURNING shipment_id",
            )
            .bind(order_id)
            .bind(ShipmentStatus::Cancelled)
            .bind(ShipmentStatus::Scheduled)
            .fetch_optional(&mut **tx)
            .await?,
        };
        Ok(ev::ShippingCancelled {
            cause,
            shipment_id: cancelled.map(|id| id.to_string()).unwrap_or_default(),
            nothing_scheduled: cancelled.is_none(),
        })
    }
}

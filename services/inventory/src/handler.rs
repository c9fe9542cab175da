//! Inventory's rules: hold every line of an order or none; give back exactly
//! what was held when the order is compensated.
use choreo::step::{self, CompensableStep, Undo, Verdict};
use choreo::{Config, Envelope, HandleError, Handler, Outbox, Reject, Tx};
use contracts::SagaEvent;
use contracts::events::v1 as ev;
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

/// Where an order's reservation stands (the `reservations.status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReservationStatus {
    /// Every line is held.
    Held,
    /// Not every line could be held; nothing is.
    Rejected,
    /// Held, then given back by the compensation.
    Released,
    /// Compensated before any reservation; a late order.created is refused.
    NeverMade,
}

pub struct InventoryHandler {
    pub outbox: Outbox,
    pub config: Config,
}

/// Why an order cannot be held, or `None` when every line was taken.
/// Lines are taken in SKU order so two orders never wait on each other's rows.
async fn take(
    tx: &mut PgConnection,
    lines: &[ev::OrderLine],
) -> Result<Option<String>, sqlx::Error> {
    let mut sorted: Vec<&ev::OrderLine> = lines.iter().collect();
    sorted.sort_by(|a, b| a.sku.cmp(&b.sku));
    if let [line] = sorted[..] {
        // One line is taken or not: no savepoint needed (two statements fewer).
        return take_line(tx, line).await;
    }
    let mut attempt = tx.begin().await?; // a savepoint: all lines or none
    for line in sorted {
        if let Some(refusal) = take_line(&mut attempt, line).await? {
            attempt.rollback().await?;
            return Ok(Some(refusal));
        }
    }
    attempt.commit().await?;
    Ok(None)
}

/// Takes one line's quantity from its SKU's stock; why not, when it cannot.
async fn take_line(
    tx: &mut PgConnection,
    line: &ev::OrderLine,
) -> Result<Option<String>, sqlx::Error> {
    let taken = sqlx::query(
        "UPDATE stock SET available = available - $2, reserved = reserved + $2
         WHERE sku = $1 AND available >= $2",
    )
    .bind(&line.sku)
    .bind(line.quantity as i64)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if taken == 0 {
        let available: Option<i64> =
            sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1")
                .bind(&line.sku)
                .fetch_optional(&mut *tx)
                .await?;
        return Ok(Some(match available {
            None => format!("unknown SKU {}", line.sku),
            Some(n) => format!(
                "not enough stock of {} ({n} available, {} ordered)",
                line.sku, line.quantity
            ),
        }));
    }
    Ok(None)
}

async fn record(
    tx: &mut PgConnection,
    order_id: Uuid,
    status: ReservationStatus,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO reservations (order_id, status, reason) VALUES ($1, $2, $3)
         ON CONFLICT (order_id) DO UPDATE SET status = $2, reason = $3, updated_at = now()",
    )
    .bind(order_id)
    .bind(status)
    .bind(reason)
    .execute(tx)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl CompensableStep for InventoryHandler {
    const NAME: &'static str = "reserve";
    type Input = ev::OrderCreated;
    type Success = ev::InventoryReserved;
    type Failure = ev::InventoryRejected;
    type Compensated = ev::InventoryReleased;

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    async fn work(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
        order: ev::OrderCreated,
    ) -> Result<Verdict<ev::InventoryReserved, ev::InventoryRejected>, HandleError> {
        let order_id = contracts::order_id_of(envelope)?;
        let refusal = match self.config.injected_failure() {
            Some(reason) => Some(reason),
            None => take(tx, &order.lines).await?,
        };
        if let Some(reason) = refusal {
            tracing::info!(%reason, "reservation rejected");
            record(tx, order_id, ReservationStatus::Rejected, &reason).await?;
            return Ok(Verdict::Failed(ev::InventoryRejected { reason }));
        }
        record(tx, order_id, ReservationStatus::Held, "").await?;
        for line in &order.lines {
            sqlx::query(
                "INSERT INTO reservation_lines (order_id, sku, quantity) VALUES ($1, $2, $3)",
            )
            .bind(order_id)
            .bind(&line.sku)
            .bind(line.quantity as i64)
            .execute(&mut **tx)
            .await?;
        }
        tracing::info!(lines = order.lines.len(), "stock reserved");
        Ok(Verdict::Succeeded(ev::InventoryReserved {
            lines: order.lines,
            destination: order.destination,
            contact: order.contact,
            customer: order.customer,
        }))
    }

    async fn undo(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
        undo: Undo,
        cause: String,
    ) -> Result<ev::InventoryReleased, HandleError> {
        let order_id = contracts::order_id_of(envelope)?;
        let released = match undo {
            Undo::NeverDone => {
                record(
                    tx,
                    order_id,
                    ReservationStatus::NeverMade,
                    "compensated before any reservation",
                )
                .await?;
                vec![]
            }
            Undo::Work => {
                let held: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT l.sku, l.quantity FROM reservation_lines l JOIN reservations r USING (order_id)
                     WHERE order_id = $1 AND r.status = $2 ORDER BY l.sku",
                )
                .bind(order_id)
                .bind(ReservationStatus::Held)
                .fetch_all(&mut **tx)
                .await?;
                for (sku, quantity) in &held {
                    sqlx::query("UPDATE stock SET available = available + $2, reserved = reserved - $2 WHERE sku = $1")
                        .bind(sku)
                        .bind(quantity)
                        .execute(&mut **tx)
                        .await?;
                }
                if !held.is_empty() {
                    record(
                        tx,
                        order_id,
                        ReservationStatus::Released,
                        "order compensated",
                    )
                    .await?;
                }
                held
            }
        };
        Ok(ev::InventoryReleased {
            cause,
            nothing_held: released.is_empty(),
            released: released
                .into_iter()
                .map(|(sku, quantity)| ev::OrderLine {
                    sku,
                    quantity: quantity as u32,
                })
                .collect(),
        })
    }
}

#[async_trait::async_trait]
impl Handler for InventoryHandler {
    type Event = SagaEvent;

    async fn handle(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
        event: SagaEvent,
    ) -> Result<(), HandleError> {
        let cause = event.cause(envelope).unwrap_or_default();
        match event {
            SagaEvent::OrderCreated(order) => step::act(self, tx, envelope, order).await,
            // Shipping failed, or shipping finished its own compensation: give the stock back.
            SagaEvent::ShippingFailed(_) | SagaEvent::ShippingCancelled(_) => {
                step::compensate(self, tx, envelope, cause).await
            }
            _ => Err(Reject::NotConsumed(envelope.event_type.clone()).into()),
        }
    }

    /// A reservation locks its products' stock rows, which every order of
    /// those products shares: two batches could lock them in opposite orders.
    fn batches(&self) -> bool {
        false
    }
}

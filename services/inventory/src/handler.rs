//! Inventory's rules: hold every line of an order or none; give back exactly
//! what was held when the order is compensated.
use choreo::choreography::Step;
use choreo::step::{self, CompensableStep, Undo, Verdict};
use choreo::{Config, Effect, Envelope, HandleError, Outbox, Tx};
use contracts::events::v1 as ev;
use contracts::{CHOREOGRAPHY, SagaEvent};
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

/// Why an order of several lines cannot be held, or `None` when every line
/// was taken. Lines are taken in SKU order so two orders never wait on each
/// other's rows, under a savepoint: all lines or none.
async fn take(
    tx: &mut PgConnection,
    lines: &[ev::OrderLine],
) -> Result<Option<String>, sqlx::Error> {
    let mut sorted: Vec<&ev::OrderLine> = lines.iter().collect();
    sorted.sort_by(|a, b| a.sku.cmp(&b.sku));
    let mut attempt = tx.begin().await?;
    for line in sorted {
        let taken = sqlx::query(
            "UPDATE stock SET available = available - $2, reserved = reserved + $2
             WHERE sku = $1 AND available >= $2",
        )
        .bind(&line.sku)
        .bind(line.quantity as i64)
        .execute(&mut *attempt)
        .await?
        .rows_affected();
        if taken == 0 {
            let refusal = refusal(&mut attempt, line).await?;
            attempt.rollback().await?;
            return Ok(Some(refusal));
        }
    }
    attempt.commit().await?;
    Ok(None)
}

/// Why `line` cannot be taken from its SKU's stock.
async fn refusal(tx: &mut PgConnection, line: &ev::OrderLine) -> Result<String, sqlx::Error> {
    let available: Option<i64> = sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1")
        .bind(&line.sku)
        .fetch_optional(tx)
        .await?;
    Ok(match available {
        None => format!("unknown SKU {}", line.sku),
        Some(n) => format!(
            "not enough stock of {} ({n} available, {} ordered)",
            line.sku, line.quantity
        ),
    })
}

async fn record(
    tx: &mut PgConnection,
    order_id: Uuid,
    status: ReservationStatus,
    reason: &str,
) -> Result<(), sqlx::Error> {
    recorded(order_id, status, reason).run(tx).await?;
    Ok(())
}

/// The order's reservation recorded as `status`, for `reason`, as one
/// statement (which always holds).
fn recorded(order_id: Uuid, status: ReservationStatus, reason: &str) -> Effect {
    Effect::new(
        "written AS (
             INSERT INTO reservations (order_id, status, reason) VALUES ($1, $2, $3)
             ON CONFLICT (order_id) DO UPDATE SET status = $2, reason = $3, updated_at = now()
             RETURNING order_id)",
        "SELECT order_id FROM written",
    )
    .bind(order_id)
    .bind(status)
    .bind(reason)
}

/// Records the order's reservation as held, with its lines, in one statement.
async fn hold(
    tx: &mut PgConnection,
    order_id: Uuid,
    lines: &[ev::OrderLine],
) -> Result<(), sqlx::Error> {
    let skus: Vec<&str> = lines.iter().map(|l| l.sku.as_str()).collect();
    let quantities: Vec<i64> = lines.iter().map(|l| i64::from(l.quantity)).collect();
    sqlx::query(
        "WITH held AS (
             INSERT INTO reservations (order_id, status, reason) VALUES ($1, $2, '')
             ON CONFLICT (order_id) DO UPDATE SET status = $2, reason = '', updated_at = now()
             RETURNING order_id)
         INSERT INTO reservation_lines (order_id, sku, quantity)
         SELECT held.order_id, line.sku, line.quantity
         FROM held, unnest($3::text[], $4::bigint[]) AS line (sku, quantity)",
    )
    .bind(order_id)
    .bind(ReservationStatus::Held)
    .bind(&skus)
    .bind(&quantities)
    .execute(tx)
    .await?;
    Ok(())
}

/// Turns a reservation [`hold`] wrote into a refusal: no lines, and why.
async fn refuse(tx: &mut PgConnection, order_id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH no_lines AS (DELETE FROM reservation_lines WHERE order_id = $1)
         UPDATE reservations SET status = $2, reason = $3, updated_at = now() WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(ReservationStatus::Rejected)
    .bind(reason)
    .execute(tx)
    .await?;
    Ok(())
}

impl InventoryHandler {
    /// The reservation of `order_id` as one statement, and its verdict when
    /// the statement holds: a refusal the configuration injects, or an
    /// order of one line taken from its SKU's stock and held (nothing is
    /// written when there is not enough: the statement does not hold, and
    /// [`refusal`] says why). The SKU's row, which every order of that
    /// product waits for, is locked from the statement to the commit, as
    /// when it is taken last. `None` for an order of several lines, which
    /// takes its SKUs one by one under a savepoint.
    fn reserve(
        &self,
        order_id: Uuid,
        order: &ev::OrderCreated,
    ) -> Option<step::WorkStatement<ev::InventoryReserved, ev::InventoryRejected>> {
        if let Some(reason) = self.config.injected_failure() {
            let rejected = recorded(order_id, ReservationStatus::Rejected, &reason);
            return Some((rejected, Verdict::Failed(ev::InventoryRejected { reason })));
        }
        let [line] = &order.lines[..] else {
            return None;
        };
        let held = Effect::new(
            "taken AS (
                 UPDATE stock SET available = available - $4, reserved = reserved + $4
                 WHERE sku = $3 AND available >= $4 RETURNING sku),
             held AS (
                 INSERT INTO reservations (order_id, status, reason) SELECT $1, $2, '' FROM taken
                 ON CONFLICT (order_id) DO UPDATE SET status = $2, reason = '', updated_at = now()
                 RETURNING order_id),
             line AS (
                 INSERT INTO reservation_lines (order_id, sku, quantity) SELECT order_id, $3, $4 FROM held)",
            "SELECT order_id FROM held",
        )
        .bind(order_id)
        .bind(ReservationStatus::Held)
        .bind(line.sku.as_str())
        .bind(i64::from(line.quantity));
        let reserved = ev::InventoryReserved {
            lines: order.lines.clone(),
            destination: order.destination.clone(),
            contact: order.contact.clone(),
            customer: order.customer.clone(),
        };
        Some((held, Verdict::Succeeded(reserved)))
    }
}

#[async_trait::async_trait]
impl CompensableStep for InventoryHandler {
    const STEP: &'static Step = CHOREOGRAPHY.step("reserve");
    type Event = SagaEvent;
    type Input = ev::OrderCreated;
    type Success = ev::InventoryReserved;
    type Failure = ev::InventoryRejected;
    type Compensated = ev::InventoryReleased;

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    async fn work(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        order: ev::OrderCreated,
    ) -> Result<Verdict<ev::InventoryReserved, ev::InventoryRejected>, HandleError> {
        let order_id = contracts::order_id_of(envelope)?;
        let verdict = match self.reserve(order_id, &order) {
            Some((statement, verdict)) => {
                if statement.run(tx).await? {
                    verdict
                } else {
                    // Only an order's one line can fail to be taken: there
                    // is not enough of it, and nothing was written.
                    let [line] = &order.lines[..] else {
                        return Err(HandleError::Transient(format!(
                            "the reservation of {} lines did not hold",
                            order.lines.len()
                        )));
                    };
                    let reason = refusal(tx, line).await?;
                    record(tx, order_id, ReservationStatus::Rejected, &reason).await?;
                    Verdict::Failed(ev::InventoryRejected { reason })
                }
            }
            None => {
                // The reservation is written first and the stock taken last, so
                // the SKUs' rows (which every order of those SKUs waits for) stay
                // locked only through the outbox insert and the commit.
                hold(tx, order_id, &order.lines).await?;
                match take(tx, &order.lines).await? {
                    Some(reason) => {
                        refuse(tx, order_id, &reason).await?;
                        Verdict::Failed(ev::InventoryRejected { reason })
                    }
                    None => Verdict::Succeeded(ev::InventoryReserved {
                        lines: order.lines,
                        destination: order.destination,
                        contact: order.contact,
                        customer: order.customer,
                    }),
                }
            }
        };
        match &verdict {
            Verdict::Failed(rejected) => {
                tracing::info!(reason = %rejected.reason, "reservation rejected")
            }
            Verdict::Succeeded(reserved) => {
                tracing::info!(lines = reserved.lines.len(), "stock reserved")
            }
            Verdict::Later => {}
        }
        Ok(verdict)
    }

    fn work_as_statement(
        &self,
        envelope: &Envelope,
        order: &ev::OrderCreated,
    ) -> Option<step::WorkStatement<ev::InventoryReserved, ev::InventoryRejected>> {
        self.reserve(contracts::order_id_of(envelope).ok()?, order)
    }

    async fn undo(
        &self,
        tx: &mut Tx<'_>,
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

    /// A reservation locks its products' stock rows, which every order of
    /// those products shares. A batch locks every row its events will touch
    /// first, in SKU order, as a single order takes its lines: two batches
    /// (or a batch and a single order) never wait on each other in a circle.
    async fn before_batch(
        &self,
        tx: &mut Tx<'_>,
        events: &[(&Envelope, &SagaEvent)],
    ) -> Result<(), HandleError> {
        let mut ordered: Vec<&str> = Vec::new();
        let mut compensated: Vec<Uuid> = Vec::new();
        for (envelope, event) in events {
            match event {
                SagaEvent::OrderCreated(order) => {
                    ordered.extend(order.lines.iter().map(|l| l.sku.as_str()));
                }
                _ if Self::STEP
                    .compensated_by
                    .contains(&envelope.event_type.as_str()) =>
                {
                    // An unreadable id locks nothing here; its event is refused later.
                    compensated.extend(contracts::order_id_of(envelope).ok());
                }
                _ => {}
            }
        }
        sqlx::query(LOCK_STOCK)
            .bind(&ordered)
            .bind(&compensated)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// Locks the stock rows a batch will touch, in SKU order (ORDER BY comes
/// before FOR UPDATE): the SKUs its orders name (`$1`) and those the
/// reservations of its compensated orders (`$2`) hold. One list of keys, so
/// the rows are found through the primary key. (Written as `sku = ANY($1)
/// OR sku IN (SELECT ...)`, the OR kept PostgreSQL from using the key and
/// every batch read the whole table, dead row versions included: about 900
/// buffers a batch at 650 orders/s, against 15 by key.)
pub const LOCK_STOCK: &str = "SELECT sku FROM stock
     WHERE sku = ANY($1::text[] || ARRAY(SELECT sku FROM reservation_lines WHERE order_id = ANY($2)))
     ORDER BY sku FOR UPDATE";

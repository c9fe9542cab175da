//! Inventory's rules: hold every line of an order or none; give back exactly
//! what was held when the order is compensated.
use std::collections::{BTreeMap, HashMap};

use choreo::batch;
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

/// The stock of a batch's products, which its orders take and its
/// compensations give back event by event, and which is written once, just
/// before the batch commits ([`SETTLE_STOCK`]). A product's row, which
/// every order of it waits for, is then locked through that statement and
/// the commit only, not through the whole batch: a second instance's batch
/// does its own work meanwhile. Its orders are decided against what the
/// stock held when the batch began (read without a lock); if another
/// transaction has taken so much since that the batch's take no longer
/// fits, the settling statement does not hold and the batch is applied
/// again, event by event, each with its row locked (nothing oversold).
#[derive(Debug, Default)]
struct BatchStock {
    /// What each SKU the batch's orders name holds: as read when the batch
    /// began, less what its orders took, plus what its compensations gave
    /// back. A SKU not here has no stock row.
    available: HashMap<String, i64>,
    /// What the batch takes from each SKU, net of what it gives back
    /// (negative where it gives back more); in SKU order.
    taken: BTreeMap<String, i64>,
}

impl BatchStock {
    /// Takes every line of an order (whose SKUs differ) or none, checked in
    /// SKU order as [`take`] takes them: why not, when not.
    fn take(&mut self, lines: &[ev::OrderLine]) -> Result<(), String> {
        let mut sorted: Vec<&ev::OrderLine> = lines.iter().collect();
        sorted.sort_by(|a, b| a.sku.cmp(&b.sku));
        for line in &sorted {
            match self.available.get(&line.sku) {
                None => return Err(format!("unknown SKU {}", line.sku)),
                Some(&available) if available < i64::from(line.quantity) => {
                    return Err(format!(
                        "not enough stock of {} ({available} available, {} ordered)",
                        line.sku, line.quantity
                    ));
                }
                Some(_) => {}
            }
        }
        for line in sorted {
            self.move_stock(&line.sku, i64::from(line.quantity));
        }
        Ok(())
    }

    /// Gives back what a reservation held.
    fn give_back(&mut self, held: &[(String, i64)]) {
        for (sku, quantity) in held {
            self.move_stock(sku, -quantity);
        }
    }

    /// Takes `taken` of `sku` (gives it back where negative).
    fn move_stock(&mut self, sku: &str, taken: i64) {
        if let Some(available) = self.available.get_mut(sku) {
            *available -= taken;
        }
        *self.taken.entry(sku.to_owned()).or_default() += taken;
    }
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

/// The success event of the reservation of `order`.
fn reserved(order: ev::OrderCreated) -> ev::InventoryReserved {
    ev::InventoryReserved {
        lines: order.lines,
        destination: order.destination,
        contact: order.contact,
        customer: order.customer,
    }
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
        Some((held, Verdict::Succeeded(reserved(order.clone()))))
    }

    /// The reservation of `order_id` in a transaction of its own: its
    /// products' rows are locked as it takes them, until the commit.
    async fn reserve_now(
        &self,
        tx: &mut Tx<'_>,
        order_id: Uuid,
        order: ev::OrderCreated,
    ) -> Result<Verdict<ev::InventoryReserved, ev::InventoryRejected>, HandleError> {
        Ok(match self.reserve(order_id, &order) {
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
                    None => Verdict::Succeeded(reserved(order)),
                }
            }
        })
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
        // In a batch: a refusal the configuration injects, or every line
        // taken from the batch's stock ([`BatchStock`]), or none and why.
        let taken_in_batch =
            batch::with(
                |stock: &mut BatchStock| match self.config.injected_failure() {
                    Some(reason) => Err(reason),
                    None => stock.take(&order.lines),
                },
            );
        let verdict = match taken_in_batch {
            Some(Ok(())) => {
                hold(tx, order_id, &order.lines).await?;
                Verdict::Succeeded(reserved(order))
            }
            Some(Err(reason)) => {
                record(tx, order_id, ReservationStatus::Rejected, &reason).await?;
                Verdict::Failed(ev::InventoryRejected { reason })
            }
            None => self.reserve_now(tx, order_id, order).await?,
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
                if batch::with(|stock: &mut BatchStock| stock.give_back(&held)).is_none() {
                    for (sku, quantity) in &held {
                        sqlx::query("UPDATE stock SET available = available + $2, reserved = reserved - $2 WHERE sku = $1")
                            .bind(sku)
                            .bind(quantity)
                            .execute(&mut **tx)
                            .await?;
                    }
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

    /// A batch reads the stock of the products its orders name, without a
    /// lock, and keeps it: its orders take from that, and its compensations
    /// give back to it ([`BatchStock`]).
    async fn before_batch(
        &self,
        tx: &mut Tx<'_>,
        events: &[(&Envelope, &SagaEvent)],
    ) -> Result<(), HandleError> {
        let ordered: Vec<&str> = events
            .iter()
            .filter_map(|(_, event)| match event {
                SagaEvent::OrderCreated(order) => Some(order.lines.iter().map(|l| l.sku.as_str())),
                _ => None,
            })
            .flatten()
            .collect();
        let available: Vec<(String, i64)> =
            sqlx::query_as("SELECT sku, available FROM stock WHERE sku = ANY($1)")
                .bind(&ordered)
                .fetch_all(&mut **tx)
                .await?;
        batch::keep(BatchStock {
            available: available.into_iter().collect(),
            taken: BTreeMap::new(),
        });
        Ok(())
    }

    /// Writes what the batch took and gave back, locking each product's row
    /// in SKU order ([`SETTLE_STOCK`]); a transient error, which rolls the
    /// batch back, where another transaction has taken too much of a
    /// product since the batch read it.
    async fn after_batch(&self, tx: &mut Tx<'_>) -> Result<(), HandleError> {
        let Some(stock) = batch::take::<BatchStock>() else {
            return Ok(());
        };
        let (skus, taken): (Vec<String>, Vec<i64>) =
            stock.taken.into_iter().filter(|(_, n)| *n != 0).unzip();
        if skus.is_empty() {
            return Ok(());
        }
        let settled: Vec<String> = sqlx::query_scalar(SETTLE_STOCK)
            .bind(&skus)
            .bind(&taken)
            .fetch_all(&mut **tx)
            .await?;
        if settled.len() < skus.len() {
            let short: Vec<&String> = skus.iter().filter(|s| !settled.contains(s)).collect();
            tracing::info!(skus = ?short, "stock taken meanwhile: the batch is applied again event by event");
            return Err(HandleError::Transient(format!(
                "the stock of {short:?} was taken by another transaction since this batch read it; \
                 its events are applied one by one"
            )));
        }
        Ok(())
    }
}

/// Takes what a batch took from each SKU (`$1`, in SKU order) and gives
/// back what it gave back, net (`$2`), where the stock still has it;
/// returns the SKUs it wrote. The rows are locked first, in SKU order (the
/// materialized CTE's ORDER BY comes before its FOR UPDATE), as a single
/// order takes its lines: two batches, or a batch and a single order, never
/// wait on each other in a circle. Found by key, whatever the size of the
/// catalogue.
pub const SETTLE_STOCK: &str = "WITH locked AS MATERIALIZED (
         SELECT sku FROM stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE)
     UPDATE stock SET available = stock.available - d.taken, reserved = stock.reserved + d.taken
     FROM locked JOIN unnest($1::text[], $2::bigint[]) AS d (sku, taken) USING (sku)
     WHERE stock.sku = locked.sku AND stock.available >= d.taken
     RETURNING stock.sku";

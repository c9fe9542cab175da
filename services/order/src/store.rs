//! Reading and writing the order service's tables. Every write takes the
//! caller's transaction, so state, status history and outbox rows commit together.
use std::collections::HashMap;
use std::time::Duration;

use choreo::grpc::timestamp;
use choreo::{Effect, Envelope};
use contracts::order::v1 as api;
use sqlx::{FromRow, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::domain::{NewOrder, Status};

/// Inserts a new order with its lines, its first status change, the
/// timeline's line for `created` (the event it is placed with) and
/// `created` itself in `outbox`, in one statement, and returns the order
/// as written; `None` when the idempotency key is taken (then nothing is
/// written). One statement is atomic: an order alone needs no transaction.
pub async fn insert(
    conn: &mut PgConnection,
    outbox: &choreo::Outbox,
    id: Uuid,
    order: &NewOrder,
    deadline: Duration,
    created: &Envelope,
    detail: &str,
) -> Result<Option<api::Order>, sqlx::Error> {
    let (skus, quantities): (Vec<&str>, Vec<i32>) = order
        .lines
        .iter()
        .map(|(sku, quantity)| (sku.as_str(), *quantity as i32))
        .unzip();
    // Nobody can watch an order before it exists, so its first status
    // change notifies nobody.
    let statement = Effect::new(
        "placed AS (
             INSERT INTO orders (order_id, customer, destination, contact, status, idempotency_key, fingerprint, deadline_at, changes)
             VALUES ($1, $2, $3, $4, $8, $5, $6, now() + make_interval(secs => $7), 1)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING order_id, customer, destination, contact, status, reason, stuck, created_at, updated_at),
         lines AS (
             INSERT INTO order_lines (order_id, line_no, sku, quantity)
             SELECT placed.order_id, line.no - 1, line.sku, line.quantity
             FROM placed, unnest($9::text[], $10::int[]) WITH ORDINALITY AS line (sku, quantity, no)),
         first_change AS (
             INSERT INTO order_status_changes (order_id, seq, status, reason)
             SELECT order_id, 1, status, '' FROM placed),
         timeline AS (
             INSERT INTO order_timeline (event_id, order_id, event_type, producer, occurred_at, detail, causation_id)
             SELECT $11, order_id, $12, $13, $14, $15, NULL FROM placed
             RETURNING occurred_at)",
        "SELECT placed.*, timeline.occurred_at FROM placed, timeline",
    )
    .bind(id)
    .bind(&order.customer)
    .bind(&order.destination)
    .bind(&order.contact)
    .bind(&order.idempotency_key)
    .bind(order.fingerprint())
    .bind(deadline.as_secs_f64())
    .bind(Status::Pending)
    .bind(&skus)
    .bind(&quantities)
    .bind(created.id())
    .bind(&created.event_type)
    .bind(&created.producer)
    .bind(created.occurred_at())
    .bind(detail);
    let Some(row) = outbox.insert_with(conn, statement, created).await? else {
        return Ok(None);
    };
    let mut placed = order_from_row(&row);
    placed.items = order
        .lines
        .iter()
        .map(|(sku, quantity)| api::OrderItem {
            sku: sku.clone(),
            quantity: *quantity,
        })
        .collect();
    placed.timeline = vec![api::TimelineEntry {
        event_id: created.id().to_string(),
        event_type: created.event_type.clone(),
        producer: created.producer.clone(),
        occurred_at: Some(timestamp(row.get("occurred_at"))),
        detail: detail.to_owned(),
        causation_id: String::new(),
    }];
    Ok(Some(placed))
}

/// The order a key was used for, and what it asked for.
pub async fn find_by_key(
    tx: &mut PgConnection,
    key: &str,
) -> Result<Option<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as("SELECT order_id, fingerprint FROM orders WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(tx)
        .await
}

/// Locks the order's row for the rest of the transaction and returns its status.
pub async fn lock(tx: &mut PgConnection, id: Uuid) -> Result<Option<Status>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(tx)
        .await
}

/// Moves the order to `status`; `reason` is kept only if the order has none yet.
/// Forward progress pushes the deadline out by `deadline`.
pub async fn set_status(
    tx: &mut PgConnection,
    id: Uuid,
    status: Status,
    reason: Option<&str>,
    deadline: Duration,
) -> Result<(), sqlx::Error> {
    let moved = move_effect(id, &Status::ALL, status, reason, deadline, None)
        .run(tx)
        .await?;
    moved.then_some(()).ok_or(sqlx::Error::RowNotFound)
}

/// Moves the order to `status` if it is in a status that may become it
/// ([`Status::may_become`]), and in the same statement adds `event` to its
/// timeline: the usual case of an event that moves an order, as an
/// [`Effect`] the platform runs together with the event's inbox insert, in
/// one statement where [`lock_heard`] and [`write_heard`] take two. It does
/// not hold, and writes nothing, when the order is not in such a status (or
/// does not exist): the event then goes through those two.
pub fn event_and_move_effect(
    id: Uuid,
    event: &Envelope,
    detail: &str,
    status: Status,
    reason: Option<&str>,
    deadline: Duration,
) -> Effect {
    let from: Vec<Status> = Status::ALL
        .into_iter()
        .filter(|from| from.may_become(status))
        .collect();
    move_effect(id, &from, status, reason, deadline, Some((event, detail)))
}

/// The one statement behind [`set_status`] and [`event_and_move_effect`]:
/// the move (if the order is in one of `from`), its place in the status
/// history (for WatchOrder), the event on the timeline if one is given and,
/// if anybody watches the order, the notification that wakes the watches
/// (see `watch`: the row lock orders it against a watch that starts at the
/// same moment). It holds if the order moved.
fn move_effect(
    id: Uuid,
    from: &[Status],
    status: Status,
    reason: Option<&str>,
    deadline: Duration,
    event: Option<(&Envelope, &str)>,
) -> Effect {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    Effect::new(
        "moved AS (
             UPDATE orders SET status = $2, reason = CASE WHEN reason = '' THEN COALESCE($3, '') ELSE reason END, stuck = '', updated_at = now(),
                    deadline_at = CASE WHEN $13 THEN now() + make_interval(secs => $4) ELSE deadline_at END,
                    changes = changes + 1
             WHERE order_id = $1 AND status = ANY($6::text[]) RETURNING changes, reason, watchers),
         changed AS (
             INSERT INTO order_status_changes (order_id, seq, status, reason)
             SELECT $1, changes, $2, reason FROM moved),
         recorded AS (
             INSERT INTO order_timeline (event_id, order_id, event_type, producer, occurred_at, detail, causation_id)
             SELECT $7, $1, $8, $9, $10, $11, $12 FROM moved WHERE $7::uuid IS NOT NULL
             ON CONFLICT (event_id) DO NOTHING)",
        "SELECT (SELECT pg_notify($5, $1::text) WHERE moved.watchers > 0) FROM moved",
    )
    .bind(id)
    .bind(status)
    .bind(reason)
    .bind(deadline.as_secs_f64())
    .bind(crate::watch::CHANNEL)
    .bind(from)
    .bind(event.map(|(e, _)| e.id()))
    .bind(event.map(|(e, _)| e.event_type.as_str()))
    .bind(event.map(|(e, _)| e.producer.as_str()))
    .bind(event.map(|(e, _)| e.occurred_at()))
    .bind(event.map(|(_, detail)| detail))
    .bind(event.and_then(|(e, _)| Uuid::parse_str(&e.causation_id).ok()))
    .bind(status.restarts_deadline())
}

/// An order's row as the events of one transaction find it, locked, and as
/// they leave it: [`write_heard`] writes back what they changed.
#[derive(Debug, sqlx::FromRow)]
pub struct Heard {
    pub status: Status,
    /// Why it is being compensated ('' while nobody said).
    pub reason: String,
    /// Why its saga is stuck ('' when it is not).
    pub stuck: String,
    /// How many status changes it has had (the last one's seq).
    pub changes: i32,
    /// How many watches follow it: a move notifies them.
    pub watchers: i32,
    /// The events changed the row.
    #[sqlx(skip)]
    pub touched: bool,
    /// They moved it, to a status with a deadline of its own.
    #[sqlx(skip)]
    pub deadline_pushed: bool,
    /// They moved it.
    #[sqlx(skip)]
    pub moved: bool,
}

/// Locks the rows of orders `ids` for the rest of the transaction, in order
/// id order (PostgreSQL sorts before it locks, so two transactions that
/// hear the same orders never wait on each other in a circle), and reads
/// them. An order that does not exist is missing from the map.
pub async fn lock_heard(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Heard>, sqlx::Error> {
    let rows: Vec<(Uuid, Heard)> = sqlx::query(
        "SELECT order_id, status, reason, stuck, changes, watchers FROM orders
         WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
    )
    .bind(ids)
    .try_map(|row: sqlx::postgres::PgRow| Ok((row.try_get("order_id")?, Heard::from_row(&row)?)))
    .fetch_all(tx)
    .await?;
    Ok(rows.into_iter().collect())
}

/// A status change an event made, for the order's history.
pub struct Change {
    pub order_id: Uuid,
    pub seq: i32,
    pub status: Status,
    pub reason: String,
}

/// An event's line on its order's timeline.
pub struct Line<'a> {
    pub order_id: Uuid,
    pub event: &'a Envelope,
    pub detail: String,
}

/// Writes what a transaction's events did to their orders, in one
/// statement: each changed row ([`Heard`]), the status changes in order,
/// every event's line on the timeline (once per event id), and a
/// notification for each order that moved while somebody watches it.
pub async fn write_heard(
    tx: &mut PgConnection,
    orders: &HashMap<Uuid, Heard>,
    changes: &[Change],
    timeline: &[Line<'_>],
    deadline: Duration,
) -> Result<(), sqlx::Error> {
    let touched: Vec<(&Uuid, &Heard)> = orders.iter().filter(|(_, o)| o.touched).collect();
    let causes: Vec<Option<Uuid>> = timeline
        .iter()
        .map(|l| Uuid::parse_str(&l.event.causation_id).ok())
        .collect();
    let watched: Vec<Uuid> = orders
        .iter()
        .filter(|(_, o)| o.moved && o.watchers > 0)
        .map(|(id, _)| *id)
        .collect();
    sqlx::query(
        "WITH updated AS (
             UPDATE orders SET status = o.status, reason = o.reason, stuck = o.stuck, changes = o.changes, updated_at = now(),
                    deadline_at = CASE WHEN o.deadline_pushed THEN now() + make_interval(secs => $7) ELSE orders.deadline_at END
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::bool[])
                 AS o (order_id, status, reason, stuck, changes, deadline_pushed)
             WHERE orders.order_id = o.order_id),
         changed AS (
             INSERT INTO order_status_changes (order_id, seq, status, reason)
             SELECT * FROM unnest($8::uuid[], $9::int[], $10::text[], $11::text[])),
         recorded AS (
             INSERT INTO order_timeline (event_id, order_id, event_type, producer, occurred_at, detail, causation_id)
             SELECT * FROM unnest($12::uuid[], $13::uuid[], $14::text[], $15::text[], $16::timestamptz[], $17::text[], $18::uuid[])
             ON CONFLICT (event_id) DO NOTHING)
         SELECT pg_notify($19, id::text) FROM unnest($20::uuid[]) AS id",
    )
    .bind(touched.iter().map(|(id, _)| **id).collect::<Vec<_>>())
    .bind(touched.iter().map(|(_, o)| o.status.as_str()).collect::<Vec<_>>())
    .bind(touched.iter().map(|(_, o)| o.reason.as_str()).collect::<Vec<_>>())
    .bind(touched.iter().map(|(_, o)| o.stuck.as_str()).collect::<Vec<_>>())
    .bind(touched.iter().map(|(_, o)| o.changes).collect::<Vec<_>>())
    .bind(touched.iter().map(|(_, o)| o.deadline_pushed).collect::<Vec<_>>())
    .bind(deadline.as_secs_f64())
    .bind(changes.iter().map(|c| c.order_id).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.seq).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.status.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.reason.as_str()).collect::<Vec<_>>())
    .bind(timeline.iter().map(|l| l.event.id()).collect::<Vec<_>>())
    .bind(timeline.iter().map(|l| l.order_id).collect::<Vec<_>>())
    .bind(timeline.iter().map(|l| l.event.event_type.as_str()).collect::<Vec<_>>())
    .bind(timeline.iter().map(|l| l.event.producer.as_str()).collect::<Vec<_>>())
    .bind(timeline.iter().map(|l| l.event.occurred_at()).collect::<Vec<_>>())
    .bind(timeline.iter().map(|l| l.detail.as_str()).collect::<Vec<_>>())
    .bind(causes)
    .bind(crate::watch::CHANNEL)
    .bind(watched)
    .execute(tx)
    .await?;
    Ok(())
}

/// Counts one more (`+1`) or one fewer (`-1`) watch of the order; `false`
/// when there is no such order. Its own statement and commit, taking the
/// order's row lock: a status change that commits before it is seen by the
/// watch's first read, and one that commits after it sees the count and notifies.
pub async fn count_watch(pool: &PgPool, id: Uuid, by: i32) -> Result<bool, sqlx::Error> {
    Ok(
        sqlx::query("UPDATE orders SET watchers = GREATEST(watchers + $2, 0) WHERE order_id = $1")
            .bind(id)
            .bind(by)
            .execute(pool)
            .await?
            .rows_affected()
            == 1,
    )
}

/// Adds `event` to the order's timeline (once per event id), locking the
/// order's row for the rest of the transaction (a no-op where the
/// transaction holds it already), and returns the order's status; `None`
/// (and nothing written) when there is no such order. One statement: every
/// event an order hears needs both.
pub async fn record_event(
    tx: &mut PgConnection,
    id: Uuid,
    event: &Envelope,
    detail: &str,
) -> Result<Option<Status>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH locked AS (SELECT status FROM orders WHERE order_id = $2 FOR UPDATE),
         recorded AS (
             INSERT INTO order_timeline (event_id, order_id, event_type, producer, occurred_at, detail, causation_id)
             SELECT $1, $2, $3, $4, $5, $6, $7 FROM locked ON CONFLICT (event_id) DO NOTHING)
         SELECT status FROM locked",
    )
    .bind(event.id())
    .bind(id)
    .bind(&event.event_type)
    .bind(&event.producer)
    .bind(event.occurred_at())
    .bind(detail)
    .bind(Uuid::parse_str(&event.causation_id).ok())
    .fetch_optional(tx)
    .await
}

/// The whole story of one order, or `None` if there is no such order: read
/// in one snapshot (a read-only repeatable-read transaction), so the status
/// and the timeline always agree.
pub async fn load(pool: &PgPool, id: Uuid) -> Result<Option<api::Order>, sqlx::Error> {
    let mut tx = snapshot(pool).await?;
    let order = load_in(&mut tx, id).await?;
    tx.commit().await?;
    Ok(order)
}

/// A read-only repeatable-read transaction: every read in it sees one snapshot.
async fn snapshot(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// [`load`] inside a transaction the caller holds (e.g. the one that just wrote it).
pub async fn load_in(tx: &mut PgConnection, id: Uuid) -> Result<Option<api::Order>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT order_id, customer, destination, contact, status, reason, stuck, created_at, updated_at FROM orders WHERE order_id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    let mut order = order_from_row(&row);
    let lines: Vec<(String, i32)> = sqlx::query_as(
        "SELECT sku, quantity FROM order_lines WHERE order_id = $1 ORDER BY line_no",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    order.items = lines
        .into_iter()
        .map(|(sku, quantity)| api::OrderItem {
            sku,
            quantity: quantity as u32,
        })
        .collect();
    let events: Vec<TimelineRow> = sqlx::query_as(
        "SELECT event_id, event_type, producer, occurred_at, detail, causation_id FROM order_timeline
         WHERE order_id = $1 ORDER BY occurred_at, event_id",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    order.timeline = events
        .into_iter()
        .map(|row| api::TimelineEntry {
            event_id: row.event_id.to_string(),
            event_type: row.event_type,
            producer: row.producer,
            occurred_at: Some(timestamp(row.occurred_at)),
            detail: row.detail,
            causation_id: row
                .causation_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        })
        .collect();
    Ok(Some(order))
}

#[derive(sqlx::FromRow)]
struct TimelineRow {
    event_id: Uuid,
    event_type: String,
    producer: String,
    occurred_at: chrono::DateTime<chrono::Utc>,
    detail: String,
    causation_id: Option<Uuid>,
}

fn order_from_row(row: &sqlx::postgres::PgRow) -> api::Order {
    let status = row.get::<Status, _>("status").to_proto();
    api::Order {
        order_id: row.get::<Uuid, _>("order_id").to_string(),
        customer: row.get("customer"),
        destination: row.get("destination"),
        contact: row.get("contact"),
        items: vec![],
        status: status as i32,
        reason: row.get("reason"),
        stuck: row.get("stuck"),
        created_at: Some(timestamp(row.get("created_at"))),
        updated_at: Some(timestamp(row.get("updated_at"))),
        timeline: vec![],
    }
}

/// Which orders a list asks for.
#[derive(Debug, Default)]
pub struct Filter {
    pub status: Option<Status>,
    pub stuck_only: bool,
    /// Exactly this customer.
    pub customer: Option<String>,
}

/// One page of orders, newest first, of those `filter` keeps, after `after`.
pub async fn list(
    pool: &PgPool,
    filter: &Filter,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<api::Order>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT order_id, customer, destination, contact, status, reason, stuck, created_at, updated_at FROM orders
         WHERE ($1::text IS NULL OR status = $1::text) AND ($2::uuid IS NULL OR order_id < $2)
           AND (NOT $4 OR stuck <> '') AND ($5::text IS NULL OR customer = $5::text)
         ORDER BY order_id DESC LIMIT $3",
    )
    .bind(filter.status)
    .bind(after)
    .bind(limit)
    .bind(filter.stuck_only)
    .bind(filter.customer.as_deref())
    .fetch_all(pool)
    .await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get("order_id")).collect();
    let lines: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT order_id, sku, quantity FROM order_lines WHERE order_id = ANY($1) ORDER BY order_id, line_no",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let mut order = order_from_row(row);
            let id: Uuid = row.get("order_id");
            order.items = lines
                .iter()
                .filter(|(o, _, _)| *o == id)
                .map(|(_, sku, quantity)| api::OrderItem {
                    sku: sku.clone(),
                    quantity: *quantity as u32,
                })
                .collect();
            order
        })
        .collect())
}

/// How many orders are in each status, in [`Status::ALL`] order, zeros included.
pub async fn status_counts<'e>(
    db: impl sqlx::PgExecutor<'e>,
) -> Result<Vec<(Status, i64)>, sqlx::Error> {
    let counted: Vec<(Status, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status")
            .fetch_all(db)
            .await?;
    Ok(Status::ALL
        .into_iter()
        .map(|status| {
            let n = counted
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n);
            (status, n)
        })
        .collect())
}

/// [`status_counts`] and how many orders are stuck, from one snapshot.
pub async fn count(pool: &PgPool) -> Result<(Vec<(Status, i64)>, i64), sqlx::Error> {
    let mut tx = snapshot(pool).await?;
    let counts = status_counts(&mut *tx).await?;
    let stuck = sqlx::query_scalar("SELECT count(*) FROM orders WHERE stuck <> ''")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((counts, stuck))
}

/// Status changes of an order after position `after`, in order.
pub async fn changes_after(
    pool: &PgPool,
    id: Uuid,
    after: i32,
) -> Result<Vec<api::StatusChange>, sqlx::Error> {
    let rows: Vec<(i32, Status, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT seq, status, reason, at FROM order_status_changes WHERE order_id = $1 AND seq > $2 ORDER BY seq",
    )
    .bind(id)
    .bind(after)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(seq, status, reason, at)| api::StatusChange {
            order_id: id.to_string(),
            status: status.to_proto() as i32,
            reason,
            at: Some(timestamp(at)),
            sequence: seq as u32,
        })
        .collect())
}

/// Open orders whose deadline passed, locked so one instance handles each.
pub async fn lock_overdue(
    tx: &mut PgConnection,
    limit: i64,
) -> Result<Vec<(Uuid, Status)>, sqlx::Error> {
    let open: Vec<&str> = Status::ALL
        .into_iter()
        .filter(|s| s.is_open())
        .map(Status::as_str)
        .collect();
    sqlx::query_as(
        "SELECT order_id, status FROM orders
         WHERE status = ANY($2) AND deadline_at < now()
         ORDER BY deadline_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .bind(open)
    .fetch_all(tx)
    .await
}

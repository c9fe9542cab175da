//! Inventory's rules against a real PostgreSQL, events applied through the
//! platform's inbox step exactly as the consumer applies them.
use std::time::Duration;

use choreo::inbox::{Outcome, apply};
use choreo::{Config, Envelope, Outbox};
use contracts::events::v1 as ev;
use inventory::handler::InventoryHandler;
use sqlx::PgPool;

async fn database() -> (harness::Postgres, PgPool) {
    let (pg, url) = harness::fresh_database().await.unwrap();
    let migrations = sqlx::migrate!("../../migrations/inventory");
    let pool = choreo::db::open(&url, Duration::from_secs(10), &migrations)
        .await
        .unwrap();
    sqlx::query("INSERT INTO stock (sku, available) VALUES ('BOOK', 10), ('PEN', 1)")
        .execute(&pool)
        .await
        .unwrap();
    (pg, pool)
}

fn handler() -> InventoryHandler {
    InventoryHandler {
        outbox: Outbox::new("inventory", "saga"),
        config: Config::new("nats://unused", "postgres://unused"),
    }
}

fn created(order: &str, lines: &[(&str, u32)]) -> Envelope {
    let payload = ev::OrderCreated {
        customer: "ada".into(),
        destination: "DE".into(),
        contact: "ada@example.com".into(),
        lines: lines
            .iter()
            .map(|(sku, quantity)| ev::OrderLine {
                sku: (*sku).into(),
                quantity: *quantity,
            })
            .collect(),
    };
    Envelope::new("order", order, None, &payload)
}

async fn stock(pool: &PgPool, sku: &str) -> (i64, i64) {
    sqlx::query_as("SELECT available, reserved FROM stock WHERE sku = $1")
        .bind(sku)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The order's reservation status and how many lines it holds.
async fn reservation(pool: &PgPool, order: &str) -> (String, i64) {
    sqlx::query_as(
        "SELECT status, (SELECT count(*) FROM reservation_lines l WHERE l.order_id = r.order_id)
         FROM reservations r WHERE order_id = $1::uuid",
    )
    .bind(order)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn emitted(pool: &PgPool, order: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM choreo_outbox WHERE saga_id = $1 ORDER BY seq")
        .bind(order)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_lines_or_none_and_a_redelivered_order_takes_stock_once() {
    let (_pg, pool) = database().await;
    let h = handler();
    let order = uuid::Uuid::now_v7().to_string();
    let event = created(&order, &[("BOOK", 3), ("PEN", 1)]);
    assert_eq!(
        apply(&pool, &h, &claims(), &event).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        apply(&pool, &h, &claims(), &event).await.unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(stock(&pool, "BOOK").await, (7, 3));
    assert_eq!(stock(&pool, "PEN").await, (0, 1));

    // PEN is gone: the BOOK line of this order must not be taken either.
    let second = uuid::Uuid::now_v7().to_string();
    apply(
        &pool,
        &h,
        &claims(),
        &created(&second, &[("BOOK", 2), ("PEN", 1)]),
    )
    .await
    .unwrap();
    assert_eq!(stock(&pool, "BOOK").await, (7, 3));
    assert_eq!(emitted(&pool, &second).await, ["inventory.rejected"]);
    assert_eq!(reservation(&pool, &order).await, ("HELD".into(), 2));
    assert_eq!(
        reservation(&pool, &second).await,
        ("REJECTED".into(), 0),
        "a refused reservation holds no lines"
    );

    // One line (taken without a savepoint): held when there is enough,
    // refused with nothing taken when there is not.
    let third = uuid::Uuid::now_v7().to_string();
    apply(&pool, &h, &claims(), &created(&third, &[("BOOK", 7)]))
        .await
        .unwrap();
    assert_eq!(stock(&pool, "BOOK").await, (0, 10));
    assert_eq!(emitted(&pool, &third).await, ["inventory.reserved"]);
    let fourth = uuid::Uuid::now_v7().to_string();
    apply(&pool, &h, &claims(), &created(&fourth, &[("BOOK", 1)]))
        .await
        .unwrap();
    assert_eq!(stock(&pool, "BOOK").await, (0, 10));
    assert_eq!(emitted(&pool, &fourth).await, ["inventory.rejected"]);
    assert_eq!(reservation(&pool, &third).await, ("HELD".into(), 1));
    assert_eq!(reservation(&pool, &fourth).await, ("REJECTED".into(), 0));
    // A product nobody stocks: refused, and the reason says which.
    let fifth = uuid::Uuid::now_v7().to_string();
    apply(&pool, &h, &claims(), &created(&fifth, &[("NOPE", 1)]))
        .await
        .unwrap();
    assert_eq!(reservation(&pool, &fifth).await, ("REJECTED".into(), 0));
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT reason FROM reservations WHERE order_id = ANY($1::uuid[]) ORDER BY order_id",
    )
    .bind([&fourth, &fifth])
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        reasons,
        [
            "not enough stock of BOOK (0 available, 1 ordered)",
            "unknown SKU NOPE"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_before_the_reservation_bars_it_for_good() {
    let (_pg, pool) = database().await;
    let h = handler();
    let order = uuid::Uuid::now_v7().to_string();
    let cancel = Envelope::new(
        "shipping",
        &order,
        None,
        &ev::ShippingCancelled {
            shipment_id: String::new(),
            nothing_scheduled: true,
            cause: "customer: changed my mind".into(),
        },
    );
    assert_eq!(
        apply(&pool, &h, &claims(), &cancel).await.unwrap(),
        Outcome::Applied
    );
    // The forward event arrives late: refused, no stock held.
    assert_eq!(
        apply(&pool, &h, &claims(), &created(&order, &[("BOOK", 4)]))
            .await
            .unwrap(),
        Outcome::Applied
    );
    assert_eq!(stock(&pool, "BOOK").await, (10, 0));
    let status: String =
        sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1::uuid")
            .bind(&order)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "NEVER_MADE");
    assert_eq!(emitted(&pool, &order).await, ["inventory.released"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_compensations_release_once() {
    let (_pg, pool) = database().await;
    let h = handler();
    let order = uuid::Uuid::now_v7().to_string();
    apply(&pool, &h, &claims(), &created(&order, &[("BOOK", 4)]))
        .await
        .unwrap();
    assert_eq!(stock(&pool, "BOOK").await, (6, 4));
    let failed = Envelope::new(
        "shipping",
        &order,
        None,
        &ev::ShippingFailed { reason: "x".into() },
    );
    let cancelled = Envelope::new("shipping", &order, None, &ev::ShippingCancelled::default());
    apply(&pool, &h, &claims(), &failed).await.unwrap();
    apply(&pool, &h, &claims(), &cancelled).await.unwrap();
    assert_eq!(stock(&pool, "BOOK").await, (10, 0), "released exactly once");
    assert_eq!(
        emitted(&pool, &order).await,
        ["inventory.reserved", "inventory.released"]
    );
}

/// The barrier claims inventory's consumer makes, from the declaration.
fn claims() -> choreo::barrier::Claims {
    contracts::CHOREOGRAPHY.subscription("inventory").claims
}

/// Two batches whose orders take the same products in opposite orders, side
/// by side, round after round: each locks every stock row it touches at its
/// end, in SKU order, so they never wait on each other in a circle
/// (PostgreSQL would abort one as a deadlock, and the consumer would apply
/// its events one by one after a second's wait). The stock comes out exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_taking_the_same_products_in_opposite_orders_never_deadlock() {
    let (_pg, pool) = database().await;
    sqlx::query("UPDATE stock SET available = 1000")
        .execute(&pool)
        .await
        .unwrap();
    let h = handler();
    let rounds = 20;
    let order = || uuid::Uuid::now_v7().to_string();
    let declared = claims();
    for _ in 0..rounds {
        let one = [
            created(&order(), &[("BOOK", 1)]),
            created(&order(), &[("PEN", 1)]),
        ];
        let other = [
            created(&order(), &[("PEN", 1)]),
            created(&order(), &[("BOOK", 1)]),
        ];
        let (one, other) = tokio::join!(
            choreo::inbox::apply_as_batch(&pool, &h, &declared, &one),
            choreo::inbox::apply_as_batch(&pool, &h, &declared, &other)
        );
        assert_eq!(
            one.expect("a batch failed"),
            [Outcome::Applied, Outcome::Applied]
        );
        assert_eq!(
            other.expect("a batch failed"),
            [Outcome::Applied, Outcome::Applied]
        );
    }
    for sku in ["BOOK", "PEN"] {
        assert_eq!(stock(&pool, sku).await, (1000 - 2 * rounds, 2 * rounds));
    }
}

/// A batch settles its stock in one statement that finds the rows by key,
/// whatever the size of the catalogue, and writes only what the stock
/// still has: it returns the SKUs it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_settles_its_stock_found_by_key_where_the_stock_has_it() {
    let (_pg, pool) = database().await;
    let h = handler();
    let held = uuid::Uuid::now_v7();
    let outcome = apply(
        &pool,
        &h,
        &claims(),
        &created(&held.to_string(), &[("PEN", 1), ("BOOK", 2)]),
    )
    .await
    .unwrap();
    assert_eq!(outcome, Outcome::Applied);
    for statement in [
        "INSERT INTO stock (sku, available) SELECT 'SKU-' || n, 100 FROM generate_series(1, 2000) n",
        "ANALYZE stock",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let skus = ["BOOK", "PEN", "SKU-7", "SKU-8"];
    let taken = [3_i64, -1, 101, 100];
    let mut settled: Vec<String> = sqlx::query_scalar(inventory::handler::SETTLE_STOCK)
        .bind(skus)
        .bind(taken)
        .fetch_all(&pool)
        .await
        .unwrap();
    settled.sort();
    assert_eq!(settled, ["BOOK", "PEN", "SKU-8"], "SKU-7 has 100, not 101");
    assert_eq!(stock(&pool, "BOOK").await, (5, 5));
    assert_eq!(stock(&pool, "PEN").await, (1, 0), "given back");
    assert_eq!(stock(&pool, "SKU-7").await, (100, 0));
    assert_eq!(stock(&pool, "SKU-8").await, (0, 100));
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN {}",
        inventory::handler::SETTLE_STOCK
    )))
    .bind(skus)
    .bind(taken)
    .fetch_all(&pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("Index Cond: (sku = ANY"), "{plan}");
    assert!(!plan.contains("Seq Scan on stock"), "{plan}");
}

/// The statement of a backend of `pool`'s database that waits for a lock,
/// once one does (within 10 s).
async fn waiting_for_a_lock(pool: &PgPool) -> String {
    for _ in 0..200 {
        let waiting: Option<String> = sqlx::query_scalar(
            "SELECT query FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(query) = waiting {
            return query;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no backend waited for a lock within 10 s");
}

/// A batch of `orders` orders of `quantity` BOOKs each, applied in a task
/// of its own while another transaction holds BOOK's row: once it waits
/// for that row, which must be in the statement that settles its stock.
async fn a_batch_waiting_to_settle(
    pool: &PgPool,
    orders: usize,
    quantity: u32,
) -> (
    Vec<Envelope>,
    tokio::task::JoinHandle<Result<Vec<Outcome>, choreo::HandleError>>,
) {
    let orders: Vec<Envelope> = (0..orders)
        .map(|_| created(&uuid::Uuid::now_v7().to_string(), &[("BOOK", quantity)]))
        .collect();
    let batch = tokio::spawn({
        let pool = pool.clone();
        let orders = orders.clone();
        async move { choreo::inbox::apply_as_batch(&pool, &handler(), &claims(), &orders).await }
    });
    assert_eq!(
        waiting_for_a_lock(pool).await,
        inventory::handler::SETTLE_STOCK
    );
    (orders, batch)
}

/// A batch takes its products' rows last: while another transaction holds
/// BOOK's row, a batch of BOOK orders does all its work and waits only in
/// its last statement, the one that settles the stock, and goes on once
/// that row is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_for_a_products_row_only_in_its_last_statement() {
    let (_pg, pool) = database().await;
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT sku FROM stock WHERE sku = 'BOOK' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let (orders, batch) = a_batch_waiting_to_settle(&pool, 3, 2).await;
    holder.commit().await.unwrap();
    assert_eq!(batch.await.unwrap().unwrap(), vec![Outcome::Applied; 3]);
    assert_eq!(stock(&pool, "BOOK").await, (4, 6));
    for order in &orders {
        assert_eq!(emitted(&pool, &order.saga_id).await, ["inventory.reserved"]);
    }
}

/// A batch decides its orders against the stock as it read it, without a
/// lock. Where another transaction has taken so much since that the
/// batch's take no longer fits, nothing of the batch is written; applied
/// one by one, as the consumer then applies them, its orders take only
/// what is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_stock_was_taken_meanwhile_writes_nothing_and_oversells_nothing() {
    let (_pg, pool) = database().await;
    let mut taker = pool.begin().await.unwrap();
    sqlx::query("UPDATE stock SET available = 1, reserved = 9 WHERE sku = 'BOOK'")
        .execute(&mut *taker)
        .await
        .unwrap();
    let (orders, batch) = a_batch_waiting_to_settle(&pool, 2, 1).await;
    taker.commit().await.unwrap();
    match batch.await.unwrap() {
        Err(choreo::HandleError::Transient(why)) => assert!(why.contains("BOOK"), "{why}"),
        other => panic!("the batch should have been refused: {other:?}"),
    }
    assert_eq!(stock(&pool, "BOOK").await, (1, 9));
    for order in &orders {
        assert_eq!(emitted(&pool, &order.saga_id).await, Vec::<String>::new());
    }
    for order in &orders {
        assert_eq!(
            apply(&pool, &handler(), &claims(), order).await.unwrap(),
            Outcome::Applied
        );
    }
    assert_eq!(stock(&pool, "BOOK").await, (0, 10));
    assert_eq!(
        emitted(&pool, &orders[0].saga_id).await,
        ["inventory.reserved"]
    );
    assert_eq!(
        emitted(&pool, &orders[1].saga_id).await,
        ["inventory.rejected"]
    );
}

/// In a batch, the rules are the ones an order alone meets: every line or
/// none, the same reasons, and what a compensation gives back can be taken
/// by a later order of the same batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_batch_orders_take_every_line_or_none_and_compensations_give_back() {
    let (_pg, pool) = database().await;
    let h = handler();
    let id = || uuid::Uuid::now_v7().to_string();
    let (first, second, third, fourth, fifth, sixth) = (id(), id(), id(), id(), id(), id());
    let batch = [
        created(&first, &[("BOOK", 4)]),
        created(&second, &[("PEN", 1), ("BOOK", 4)]),
        created(&third, &[("BOOK", 4)]),
        created(&fourth, &[("BOOK", 1), ("PEN", 1)]),
        created(&fifth, &[("NOPE", 1)]),
        Envelope::new(
            "shipping",
            &first,
            None,
            &ev::ShippingFailed { reason: "x".into() },
        ),
        created(&sixth, &[("BOOK", 4)]),
    ];
    let outcomes = choreo::inbox::apply_as_batch(&pool, &h, &claims(), &batch)
        .await
        .unwrap();
    assert_eq!(outcomes, vec![Outcome::Applied; 7]);
    assert_eq!(stock(&pool, "BOOK").await, (2, 8));
    assert_eq!(stock(&pool, "PEN").await, (0, 1));
    let expected = [
        (&first, "RELEASED", "order compensated"),
        (&second, "HELD", ""),
        (
            &third,
            "REJECTED",
            "not enough stock of BOOK (2 available, 4 ordered)",
        ),
        (
            &fourth,
            "REJECTED",
            "not enough stock of PEN (0 available, 1 ordered)",
        ),
        (&fifth, "REJECTED", "unknown SKU NOPE"),
        (&sixth, "HELD", ""),
    ];
    for (order, status, reason) in expected {
        let found: (String, String) =
            sqlx::query_as("SELECT status, reason FROM reservations WHERE order_id = $1::uuid")
                .bind(order)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(found, (status.to_owned(), reason.to_owned()), "{order}");
    }
    assert_eq!(reservation(&pool, &fourth).await, ("REJECTED".into(), 0));
    assert_eq!(reservation(&pool, &sixth).await, ("HELD".into(), 1));
    assert_eq!(
        emitted(&pool, &first).await,
        ["inventory.reserved", "inventory.released"]
    );
}

/// Applies `envelope` as the consumer applies an event that comes alone:
/// its effect in one statement where it has one, in a transaction otherwise.
async fn apply_alone(pool: &PgPool, h: &InventoryHandler, envelope: &Envelope) -> Outcome {
    let event = <contracts::SagaEvent as choreo::handler::Decode>::decode(envelope).unwrap();
    let mut conn = pool.acquire().await.unwrap();
    choreo::inbox::apply_alone_or_in_tx(&mut conn, h, &claims(), envelope, event)
        .await
        .unwrap()
}

/// An order of one line that comes alone is reserved, or refused by an
/// injected failure, in one statement with its inbox insert, its barrier
/// claim and its outcome event; everything else (not enough stock, several
/// lines, a repeat, an order after its compensation) goes through its
/// transaction with the same rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_of_one_line_that_comes_alone_is_reserved_in_one_statement_and_no_rule_changes() {
    let (_pg, pool) = database().await;
    let h = handler();
    let order = || uuid::Uuid::now_v7().to_string();

    let one = order();
    let event = created(&one, &[("BOOK", 3)]);
    assert_eq!(apply_alone(&pool, &h, &event).await, Outcome::Applied);
    assert_eq!(apply_alone(&pool, &h, &event).await, Outcome::Duplicate);
    assert_eq!(stock(&pool, "BOOK").await, (7, 3), "taken once");
    assert_eq!(reservation(&pool, &one).await, ("HELD".into(), 1));
    assert_eq!(emitted(&pool, &one).await, ["inventory.reserved"]);
    assert!(harness::written_by_first_statement(&pool, "reservations", &one).await);

    // Not enough: the statement does not hold, and the transaction says why.
    let short = order();
    apply_alone(&pool, &h, &created(&short, &[("PEN", 2)])).await;
    assert_eq!(stock(&pool, "PEN").await, (1, 0));
    assert_eq!(reservation(&pool, &short).await, ("REJECTED".into(), 0));
    assert_eq!(emitted(&pool, &short).await, ["inventory.rejected"]);
    assert!(!harness::written_by_first_statement(&pool, "reservations", &short).await);
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM reservations WHERE order_id = $1::uuid")
            .bind(&short)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(reason, "not enough stock of PEN (1 available, 2 ordered)");

    // Several lines: in a transaction, all or none.
    let two = order();
    apply_alone(&pool, &h, &created(&two, &[("BOOK", 1), ("PEN", 1)])).await;
    assert_eq!(reservation(&pool, &two).await, ("HELD".into(), 2));
    assert!(!harness::written_by_first_statement(&pool, "reservations", &two).await);
    assert_eq!(stock(&pool, "BOOK").await, (6, 4));
    assert_eq!(stock(&pool, "PEN").await, (0, 1));

    // Compensated first: the late order finds the barrier row taken, goes
    // through its transaction, and is refused there.
    let late = order();
    let cancelled = Envelope::new("shipping", &late, None, &ev::ShippingCancelled::default());
    assert_eq!(apply_alone(&pool, &h, &cancelled).await, Outcome::Applied);
    apply_alone(&pool, &h, &created(&late, &[("BOOK", 1)])).await;
    assert_eq!(reservation(&pool, &late).await, ("NEVER_MADE".into(), 0));
    assert_eq!(stock(&pool, "BOOK").await, (6, 4));
    assert_eq!(emitted(&pool, &late).await, ["inventory.released"]);

    // An injected refusal is one statement too, and takes no stock.
    let mut failing = handler();
    failing.config.injected_failure_rate = 1.0;
    let refused = order();
    apply_alone(&pool, &failing, &created(&refused, &[("BOOK", 1)])).await;
    assert_eq!(reservation(&pool, &refused).await, ("REJECTED".into(), 0));
    assert_eq!(emitted(&pool, &refused).await, ["inventory.rejected"]);
    assert!(harness::written_by_first_statement(&pool, "reservations", &refused).await);
    assert_eq!(stock(&pool, "BOOK").await, (6, 4));

    // The reserved order's release gives back what the statement took.
    let failed = Envelope::new(
        "shipping",
        &one,
        None,
        &ev::ShippingFailed { reason: "x".into() },
    );
    apply_alone(&pool, &h, &failed).await;
    assert_eq!(stock(&pool, "BOOK").await, (9, 1));
    assert_eq!(reservation(&pool, &one).await.0, "RELEASED");
}

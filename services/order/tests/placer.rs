//! PlaceOrder's grouped writes against a real PostgreSQL: orders placed
//! together share one transaction, each written as it would be alone; one
//! that cannot be written fails alone; a key used twice in one group
//! places one order; the writer keeps its own connections, and one the
//! database dropped costs no order.
mod common;

use std::time::Duration;

use choreo::{Envelope, Outbox};
use common::database;
use contracts::events::v1 as ev;
use order::domain::NewOrder;
use order::placer::Placer;
use sqlx::PgPool;
use uuid::Uuid;

/// A placer writing to `pool`, its rows left to a relay (none runs here).
fn placer(pool: &PgPool) -> Placer {
    Placer::new(
        pool.clone(),
        Outbox::new("order", "saga"),
        Duration::from_secs(30),
    )
}

/// An order of `quantity` books under `key`, and its `order.created`.
fn order(key: &str, quantity: u32) -> (Uuid, NewOrder, Envelope) {
    let id = Uuid::now_v7();
    let order = NewOrder {
        customer: "ada".into(),
        destination: "DE".into(),
        contact: "ada@example.com".into(),
        lines: vec![("BOOK".into(), quantity)],
        idempotency_key: key.into(),
    };
    let created = Envelope::new(
        "order",
        &id.to_string(),
        None,
        &ev::OrderCreated {
            customer: "ada".into(),
            destination: "DE".into(),
            contact: "ada@example.com".into(),
            lines: vec![ev::OrderLine {
                sku: "BOOK".into(),
                quantity,
            }],
        },
    );
    (id, order, created)
}

/// Places `orders` at once (all queued before the writer runs: one thread).
async fn place_together(
    placer: &Placer,
    orders: Vec<(Uuid, NewOrder, Envelope)>,
) -> Vec<Result<Option<contracts::order::v1::Order>, choreo::grpc::ApiError>> {
    futures::future::join_all(
        orders
            .into_iter()
            .map(|(id, order, created)| placer.place(id, order, created, "placed".into())),
    )
    .await
}

/// (orders, the transactions that wrote them, outbox rows).
async fn written(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders), (SELECT count(DISTINCT xmin::text) FROM orders),
                (SELECT count(*) FROM choreo_outbox)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn orders_placed_together_share_one_transaction_each_as_written_alone() {
    let (_pg, pool) = database().await;
    let placer = placer(&pool);
    let orders: Vec<_> = (0..20).map(|i| order(&format!("key-{i}"), 1)).collect();
    let ids: Vec<Uuid> = orders.iter().map(|(id, _, _)| *id).collect();

    let outcomes = place_together(&placer, orders).await;

    assert_eq!(
        written(&pool).await,
        (20, 1, 20),
        "twenty orders, one transaction"
    );
    for (id, outcome) in ids.iter().zip(outcomes) {
        let placed = outcome.unwrap().expect("a new key places an order");
        assert_eq!(placed.order_id, id.to_string());
        // The answer is what a read of the order gives.
        let read = order::store::load(&pool, *id).await.unwrap().unwrap();
        assert_eq!(placed, read);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_order_that_cannot_be_written_fails_alone_and_the_others_are_placed() {
    let (_pg, pool) = database().await;
    let placer = placer(&pool);
    // A quantity of 0 passes no validation; the database refuses it.
    let orders = vec![order("a", 1), order("b", 0), order("c", 1)];

    let outcomes = place_together(&placer, orders).await;

    assert!(outcomes[0].as_ref().unwrap().is_some());
    assert!(outcomes[1].is_err(), "{:?}", outcomes[1]);
    assert!(outcomes[2].as_ref().unwrap().is_some());
    let (orders, _, outbox) = written(&pool).await;
    assert_eq!(
        (orders, outbox),
        (2, 2),
        "the two good orders, nothing of the bad one"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_key_used_twice_in_one_group_places_one_order() {
    let (_pg, pool) = database().await;
    let placer = placer(&pool);

    let outcomes = place_together(&placer, vec![order("same", 1), order("same", 1)]).await;

    assert!(outcomes[0].as_ref().unwrap().is_some());
    assert!(outcomes[1].as_ref().unwrap().is_none(), "the key was taken");
    assert_eq!(written(&pool).await, (1, 1, 1));
}

#[tokio::test(flavor = "current_thread")]
async fn the_writer_keeps_its_own_connections_not_the_pools() {
    let (_pg, pool) = database().await;
    // A pool of one connection, taken: a writer that took its connections
    // from the pool would wait for it (and time out here).
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let _taken = small.acquire().await.unwrap();
    let placer = placer(&small);

    let (id, new, created) = order("own", 1);
    let placed = tokio::time::timeout(
        Duration::from_secs(5),
        placer.place(id, new, created, "placed".into()),
    )
    .await
    .expect("placed without a connection of the pool")
    .unwrap();

    assert!(placed.is_some());
    assert_eq!(written(&pool).await, (1, 1, 1));
}

#[tokio::test(flavor = "current_thread")]
async fn an_order_placed_after_the_database_dropped_the_writers_connection_is_placed() {
    let (_pg, pool) = database().await;
    let placer = placer(&pool);
    let (id, new, created) = order("before", 1);
    placer
        .place(id, new, created, "placed".into())
        .await
        .unwrap()
        .unwrap();
    // The database drops every other connection to it (as a restart would):
    // the writer's held one among them.
    let dropped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(dropped >= 1, "the writer's connection was open");

    let (id, new, created) = order("after", 1);
    let placed = placer.place(id, new, created, "placed".into()).await;

    assert!(
        placed.unwrap().is_some(),
        "written again on a fresh connection"
    );
    let (orders, _, outbox) = written(&pool).await;
    assert_eq!((orders, outbox), (2, 2));
}

//! The order's reactions to saga events against a real PostgreSQL, applied
//! through the platform's inbox step as the consumer applies them.
mod common;

use std::time::Duration;

use choreo::inbox::{Outcome, apply};
use choreo::{Envelope, EventPayload, HandleError};
use common::database;
use contracts::events::v1 as ev;
use order::handler::OrderHandler;
use sqlx::PgPool;

async fn place(pool: &PgPool) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    let order = order::domain::NewOrder {
        customer: "ada".into(),
        destination: "DE".into(),
        contact: "ada@example.com".into(),
        lines: vec![("BOOK".into(), 1)],
        idempotency_key: id.to_string(),
    };
    let created = event(
        id,
        ev::OrderCreated {
            customer: "ada".into(),
            destination: "DE".into(),
            contact: "ada@example.com".into(),
            lines: vec![ev::OrderLine {
                sku: "BOOK".into(),
                quantity: 1,
            }],
        },
    );
    let mut tx = pool.begin().await.unwrap();
    let written = order::store::insert(
        &mut tx,
        &outbox(),
        id,
        &order,
        Duration::from_secs(30),
        &created,
        "placed: BOOK x1 to DE",
    )
    .await
    .unwrap()
    .expect("a new idempotency key places an order");
    tx.commit().await.unwrap();
    // PlaceOrder answers with what the insert returns: it must be what a
    // read of the order gives, field for field.
    let read = order::store::load(pool, id).await.unwrap().unwrap();
    assert_eq!(written, read);
    assert_eq!(read.items.len(), 1);
    assert_eq!(read.timeline.len(), 1);
    assert_eq!(read.timeline[0].event_id, created.event_id);
    id
}

#[tokio::test]
async fn an_idempotency_key_used_before_places_nothing() {
    let (_pg, pool) = database().await;
    let first = place(&pool).await;
    let order: (String, String) =
        sqlx::query_as("SELECT idempotency_key, fingerprint FROM orders WHERE order_id = $1")
            .bind(first)
            .fetch_one(&pool)
            .await
            .unwrap();
    let again = order::domain::NewOrder {
        customer: "ada".into(),
        destination: "DE".into(),
        contact: "ada@example.com".into(),
        lines: vec![("BOOK".into(), 1)],
        idempotency_key: order.0,
    };
    let id = uuid::Uuid::now_v7();
    let created = event(id, ev::OrderCreated::default());
    let mut tx = pool.begin().await.unwrap();
    let written = order::store::insert(
        &mut tx,
        &outbox(),
        id,
        &again,
        Duration::from_secs(30),
        &created,
        "",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(written.is_none());
    let rows: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM order_lines),
                (SELECT count(*) FROM order_status_changes), (SELECT count(*) FROM order_timeline)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, (1, 1, 1, 1), "only the first order's rows");
}

/// The order service's outbox, with no publisher: the relay's.
fn outbox() -> choreo::Outbox {
    choreo::Outbox::new("order", "saga")
}

/// An event for order `id` as its declared producer writes it.
fn event<P: EventPayload>(id: uuid::Uuid, payload: P) -> Envelope {
    let producer = contracts::CHOREOGRAPHY
        .event(P::EVENT_TYPE)
        .expect("a declared event")
        .producer;
    Envelope::new(producer, &id.to_string(), None, &payload)
}

/// Inventory's answer for the order `place` makes: its one line held.
fn reserved() -> ev::InventoryReserved {
    ev::InventoryReserved {
        lines: vec![ev::OrderLine {
            sku: "BOOK".into(),
            quantity: 1,
        }],
        ..Default::default()
    }
}

/// Applies one event for order `id` through the inbox step, as the consumer would.
async fn deliver<P: EventPayload>(
    pool: &PgPool,
    h: &OrderHandler,
    id: uuid::Uuid,
    payload: P,
) -> Outcome {
    apply(pool, h, &Default::default(), &event(id, payload))
        .await
        .unwrap()
}

async fn status(pool: &PgPool, id: uuid::Uuid) -> (String, String) {
    sqlx::query_as("SELECT status, reason FROM orders WHERE order_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_forward_events_still_complete_the_order() {
    let (_pg, pool) = database().await;
    let h = OrderHandler {
        deadline: Duration::from_secs(30),
    };
    let id = place(&pool).await;
    // A redelivery put the last step first.
    deliver(&pool, &h, id, ev::NotificationSent::default()).await;
    deliver(&pool, &h, id, ev::ShippingScheduled::default()).await;
    deliver(&pool, &h, id, reserved()).await;
    assert_eq!(status(&pool, id).await.0, "COMPLETED");
    let changes: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM order_status_changes WHERE order_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(changes, ["PENDING", "COMPLETED"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_never_revive_a_cancelled_order_and_the_first_reason_stays() {
    let (_pg, pool) = database().await;
    let h = OrderHandler {
        deadline: Duration::from_secs(30),
    };
    let id = place(&pool).await;
    deliver(&pool, &h, id, reserved()).await;
    deliver(
        &pool,
        &h,
        id,
        ev::ShippingFailed {
            reason: "no road".into(),
        },
    )
    .await;
    assert_eq!(
        status(&pool, id).await,
        ("CANCELLING".into(), "shipping: no road".into())
    );
    deliver(&pool, &h, id, ev::InventoryReleased::default()).await;
    deliver(&pool, &h, id, ev::NotificationSent::default()).await;
    deliver(
        &pool,
        &h,
        id,
        ev::NotificationFailed {
            reason: "later".into(),
        },
    )
    .await;
    assert_eq!(
        status(&pool, id).await,
        ("CANCELLED".into(), "shipping: no road".into())
    );
    let timeline: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_timeline WHERE order_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        timeline, 6,
        "every event is on the timeline (its placing and the five delivered), even the ones that changed nothing"
    );
}

/// What the order service keeps of an order id in the tables beside `orders`
/// (its lines, status changes and timeline): rows of each. Nothing but the
/// service's statements keeps these from naming an order that does not
/// exist (the tables have no foreign keys: each check cost a trigger).
async fn rows_beside(pool: &PgPool, id: uuid::Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM order_lines WHERE order_id = $1)
              + (SELECT count(*) FROM order_status_changes WHERE order_id = $1)
              + (SELECT count(*) FROM order_timeline WHERE order_id = $1)",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_for_an_unknown_order_is_parked_not_dropped() {
    let (_pg, pool) = database().await;
    let h = OrderHandler {
        deadline: Duration::from_secs(30),
    };
    let claims = choreo::barrier::Claims::new();
    let parked = |outcome: &Outcome| matches!(outcome, Outcome::Parked(reason) if reason.to_string().contains("does not exist"));
    // Alone: an event that would move an order, and one that would not
    // (a stuck report).
    for payload in [
        event(uuid::Uuid::now_v7(), ev::NotificationSent::default()),
        a_whole_life(uuid::Uuid::now_v7()).swap_remove(3),
    ] {
        let outcome = apply(&pool, &h, &claims, &payload).await.unwrap();
        assert!(parked(&outcome), "{outcome:?}");
    }
    // In a batch, between two known orders' events: the batch fails as a
    // whole and writes nothing; the consumer then applies its events one by
    // one, and that one is parked.
    let (a, unknown, b) = (place(&pool).await, uuid::Uuid::now_v7(), place(&pool).await);
    let batch = [
        event(a, reserved()),
        event(unknown, reserved()),
        event(b, reserved()),
    ];
    let failed = choreo::inbox::apply_as_batch(&pool, &h, &claims, &batch).await;
    assert!(
        matches!(&failed, Err(HandleError::Reject(reason)) if reason.to_string().contains("does not exist")),
        "{failed:?}"
    );
    for id in [a, b] {
        assert_eq!(
            status(&pool, id).await.0,
            "PENDING",
            "the failed batch wrote nothing"
        );
    }
    let mut outcomes = Vec::new();
    for envelope in &batch {
        outcomes.push(apply(&pool, &h, &claims, envelope).await.unwrap());
    }
    assert_eq!(outcomes[0], Outcome::Applied);
    assert!(parked(&outcomes[1]), "{:?}", outcomes[1]);
    assert_eq!(outcomes[2], Outcome::Applied);
    for id in [a, b] {
        assert_eq!(status(&pool, id).await.0, "RESERVED");
    }
    assert_eq!(
        rows_beside(&pool, unknown).await,
        0,
        "nothing written for an order that does not exist"
    );
    assert_eq!(
        rows_beside(&pool, a).await,
        5,
        "a line, two changes, two timeline events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_overtakes_its_failure_still_brings_the_reason() {
    // Found by the chaos suite: inventory.released handled before the
    // shipping.failed that caused it left a CANCELLED order with no reason.
    let (_pg, pool) = database().await;
    let h = OrderHandler {
        deadline: Duration::from_secs(30),
    };
    let id = place(&pool).await;
    deliver(&pool, &h, id, reserved()).await;
    let released = ev::InventoryReleased {
        cause: "shipping: no road".into(),
        ..Default::default()
    };
    deliver(&pool, &h, id, released).await;
    assert_eq!(
        status(&pool, id).await,
        ("CANCELLED".into(), "shipping: no road".into())
    );
    deliver(
        &pool,
        &h,
        id,
        ev::ShippingFailed {
            reason: "no road".into(),
        },
    )
    .await;
    assert_eq!(
        status(&pool, id).await,
        ("CANCELLED".into(), "shipping: no road".into())
    );
}

/// The next notification on the watch channel within `wait`, if any.
async fn notified(listener: &mut sqlx::postgres::PgListener, wait: Duration) -> Option<String> {
    tokio::time::timeout(wait, listener.recv())
        .await
        .ok()
        .map(|n| n.unwrap().payload().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_change_notifies_only_while_somebody_watches_the_order() {
    let (_pg, pool) = database().await;
    let h = OrderHandler {
        deadline: Duration::from_secs(30),
    };
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(order::watch::CHANNEL).await.unwrap();
    let unwatched = place(&pool).await;
    let watched = place(&pool).await;
    // Placing notifies nobody: no watch can follow an order before it exists.
    assert_eq!(
        notified(&mut listener, Duration::from_millis(300)).await,
        None
    );

    assert!(order::store::count_watch(&pool, watched, 1).await.unwrap());
    deliver(&pool, &h, unwatched, reserved()).await;
    deliver(&pool, &h, watched, reserved()).await;
    // Only the watched order's change is announced (the unwatched one came first).
    assert_eq!(
        notified(&mut listener, Duration::from_secs(5)).await,
        Some(watched.to_string())
    );
    assert_eq!(
        notified(&mut listener, Duration::from_millis(300)).await,
        None
    );

    // The watch ends: its order's changes go quiet again.
    assert!(order::store::count_watch(&pool, watched, -1).await.unwrap());
    deliver(&pool, &h, watched, ev::ShippingScheduled::default()).await;
    assert_eq!(
        notified(&mut listener, Duration::from_millis(300)).await,
        None
    );
    assert_eq!(status(&pool, watched).await.0, "SCHEDULED");
    // A count never goes below zero, and an unknown order is no order.
    assert!(order::store::count_watch(&pool, watched, -1).await.unwrap());
    let watchers: i32 = sqlx::query_scalar("SELECT watchers FROM orders WHERE order_id = $1")
        .bind(watched)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(watchers, 0);
    assert!(
        !order::store::count_watch(&pool, uuid::Uuid::now_v7(), 1)
            .await
            .unwrap()
    );
}

/// Two instances apply batches side by side that hear the same orders in
/// opposite orders (one order's next event can come before its last one is
/// applied). Each batch locks its orders' rows first, in order id order, so
/// they never wait on each other in a circle (PostgreSQL would abort one as
/// a deadlock, and its events would be applied one by one a second later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_hearing_the_same_orders_in_opposite_orders_never_deadlock() {
    let (_pg, pool) = database().await;
    let h = OrderHandler {
        deadline: Duration::from_secs(30),
    };
    let claims = choreo::barrier::Claims::new();
    for _ in 0..20 {
        let (a, b) = (place(&pool).await, place(&pool).await);
        let one = [event(a, reserved()), event(b, reserved())];
        let other = [
            event(b, ev::ShippingScheduled::default()),
            event(a, ev::ShippingScheduled::default()),
        ];
        let (one, other) = tokio::join!(
            choreo::inbox::apply_as_batch(&pool, &h, &claims, &one),
            choreo::inbox::apply_as_batch(&pool, &h, &claims, &other)
        );
        for outcomes in [one, other] {
            assert_eq!(
                outcomes.expect("a batch failed"),
                [Outcome::Applied, Outcome::Applied]
            );
        }
        for id in [a, b] {
            assert_eq!(status(&pool, id).await.0, "SCHEDULED");
        }
    }
}

/// Everything the order service keeps of an order that events can change:
/// its row, its status history and its timeline.
async fn kept(
    pool: &PgPool,
    id: uuid::Uuid,
) -> (
    String,
    String,
    String,
    i32,
    Vec<(i32, String, String)>,
    Vec<(String, String)>,
) {
    let (status, reason, stuck, changes): (String, String, String, i32) =
        sqlx::query_as("SELECT status, reason, stuck, changes FROM orders WHERE order_id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    let history = sqlx::query_as(
        "SELECT seq, status, reason FROM order_status_changes WHERE order_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    let timeline = sqlx::query_as(
        "SELECT event_type, detail FROM order_timeline WHERE order_id = $1 ORDER BY occurred_at, event_id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    (status, reason, stuck, changes, history, timeline)
}

/// An order's whole unhappy life: forward twice, a failure with its reason,
/// a saga reported stuck, the compensation that ends it, and a late event.
fn a_whole_life(id: uuid::Uuid) -> Vec<Envelope> {
    let stuck = choreo::proto::Stuck {
        service: "inventory".into(),
        event_type: "notification.failed".into(),
        error: "database away".into(),
        deliveries: 5,
        ..Default::default()
    };
    vec![
        event(id, reserved()),
        event(id, ev::ShippingScheduled::default()),
        event(
            id,
            ev::NotificationFailed {
                reason: "no address".into(),
            },
        ),
        Envelope::new("inventory", &id.to_string(), None, &stuck),
        event(
            id,
            ev::InventoryReleased {
                cause: "notification: no address".into(),
                ..Default::default()
            },
        ),
        event(id, ev::NotificationSent::default()),
    ]
}

/// The order service applies a batch in two statements, its events' effects
/// worked out in memory in between; an event alone that moves its order
/// takes one statement that moves it in SQL. What a batch leaves must be
/// what the same events leave applied one by one, field for field, also
/// when the batch mixes several orders' events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_leaves_its_orders_as_its_events_one_by_one_would() {
    let (_pg, pool) = database().await;
    let h = OrderHandler {
        deadline: Duration::from_secs(30),
    };
    let claims = choreo::barrier::Claims::new();
    let (alone, batched, beside) = (place(&pool).await, place(&pool).await, place(&pool).await);
    for (n, envelope) in a_whole_life(alone).iter().enumerate() {
        assert_eq!(
            apply(&pool, &h, &claims, envelope).await.unwrap(),
            Outcome::Applied
        );
        if n == 3 {
            let (status, _, stuck, ..) = kept(&pool, alone).await;
            assert_eq!(status, "CANCELLING");
            assert!(stuck.contains("database away"), "marked stuck: {stuck:?}");
        }
    }
    // The batch interleaves another order's whole life with this one's.
    let batch: Vec<Envelope> = a_whole_life(batched)
        .into_iter()
        .zip(a_whole_life(beside))
        .flat_map(|(a, b)| [a, b])
        .collect();
    let outcomes = choreo::inbox::apply_as_batch(&pool, &h, &claims, &batch)
        .await
        .expect("the batch applies");
    assert_eq!(outcomes, vec![Outcome::Applied; 12]);
    let one_by_one = kept(&pool, alone).await;
    assert_eq!(one_by_one.0, "CANCELLED");
    assert_eq!(one_by_one.1, "notification: no address");
    assert_eq!(
        one_by_one.2, "",
        "the compensation that ended it cleared the stuck mark"
    );
    assert_eq!(
        one_by_one.3, 5,
        "placed, reserved, scheduled, cancelling, cancelled"
    );
    assert_eq!(one_by_one.5.len(), 7, "placed and the six events");
    for id in [batched, beside] {
        assert_eq!(kept(&pool, id).await, one_by_one);
    }
}

//! End-to-end: a step that keeps failing shows the order stuck, over gRPC,
//! until it recovers.
use std::time::Duration;

use contracts::order::v1 as api;
use e2e::{Options, OrderStatus, SETTLE, new_key as key, order_request, system, timeline};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_keeps_failing_shows_the_order_stuck_until_it_recovers() {
    let sys = system(Options {
        extra_env: vec![("STUCK_AFTER_DELIVERIES".into(), "2".into())],
        ..Options::default()
    })
    .await;
    sys.set_stock("BOOK", 5).await.unwrap();
    // Break inventory's schema behind its back: every reservation now fails
    // with a database error, which is retried, never dropped.
    let inventory_db = sqlx::PgPool::connect(&sys.databases[1]).await.unwrap();
    sqlx::query("ALTER TABLE stock RENAME TO stock_away")
        .execute(&inventory_db)
        .await
        .unwrap();
    let placed = sys
        .place(order_request(
            &key(),
            "jo",
            "DE",
            "jo@example.com",
            &[("BOOK", 1)],
        ))
        .await
        .unwrap();

    let deadline = std::time::Instant::now() + SETTLE;
    let stuck = loop {
        let o = sys.get(&placed.order_id).await.unwrap();
        if !o.stuck.is_empty() {
            break o;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the order never showed stuck"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stuck.status(), OrderStatus::Pending);
    assert!(
        stuck
            .stuck
            .starts_with("inventory keeps failing on order.created")
            && stuck.stuck.contains("stock"),
        "{}",
        stuck.stuck
    );
    let listed = sys
        .order
        .clone()
        .list_orders(api::ListOrdersRequest {
            stuck_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.orders.len(), 1);
    assert_eq!(listed.orders[0].order_id, placed.order_id);

    // The operator repairs the schema: the retried event goes through.
    sqlx::query("ALTER TABLE stock_away RENAME TO stock")
        .execute(&inventory_db)
        .await
        .unwrap();
    let done = sys.wait_terminal(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(done.status(), OrderStatus::Completed);
    assert_eq!(done.stuck, "");
    assert!(
        timeline(&done).contains(&"choreo.stuck"),
        "{:?}",
        timeline(&done)
    );
    let book = sys.stock("BOOK").await.unwrap();
    assert_eq!(
        (book.available, book.reserved),
        (4, 1),
        "reserved once despite the retries"
    );
}

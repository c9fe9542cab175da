//! Personal data has a retention: once an order has ended and
//! PERSONAL_DATA_RETENTION_DAYS have passed (0 here, so at once), the
//! services' cleanup erases its contact address and the messages' recipients
//! and bodies; an order still running keeps its own.
use std::time::Duration;

use e2e::{Options, OrderStatus, SETTLE, new_key, order_request, system};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contact_of_an_ended_order_is_erased_after_its_retention_and_a_running_one_keeps_it() {
    let mut sys = system(Options {
        extra_env: vec![
            ("PERSONAL_DATA_RETENTION_DAYS".into(), "0".into()),
            ("CLEANUP_INTERVAL_SECS".into(), "1".into()),
        ],
        ..Options::default()
    })
    .await;
    sys.set_stock("BOOK", 10).await.unwrap();
    let ended = sys.place_one("BOOK").await.unwrap();
    let done = sys.wait_terminal(&ended.order_id, SETTLE).await.unwrap();
    assert_eq!(done.status(), OrderStatus::Completed);

    // An order that cannot move on while inventory is down stays open.
    sys.service("inventory").kill().unwrap();
    let running = sys
        .place(order_request(
            &new_key(),
            "bo",
            "DE",
            "bo@example.com",
            &[("BOOK", 1)],
        ))
        .await
        .unwrap();

    harness::eventually("the ended order's contact is erased", SETTLE, || async {
        sys.get(&ended.order_id)
            .await
            .is_ok_and(|o| o.contact.is_empty())
    })
    .await;
    harness::eventually(
        "the sent confirmation's recipient is erased",
        SETTLE,
        || async {
            sys.notifications(&ended.order_id).await.is_ok_and(|n| {
                !n.notifications.is_empty()
                    && n.notifications.iter().all(|m| !m.recipient.contains("ada"))
            })
        },
    )
    .await;
    // Several sweeps later the running order still has its address.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = sys.get(&running.order_id).await.unwrap();
    assert_eq!(still.status(), OrderStatus::Pending);
    assert_eq!(still.contact, "bo@example.com");
    // The ended order's history stays: status, lines, timeline.
    let erased = sys.get(&ended.order_id).await.unwrap();
    assert_eq!(erased.status(), OrderStatus::Completed);
    assert_eq!(erased.items.len(), 1);
}

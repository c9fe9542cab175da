//! Hostile events, published by someone with rights on the stream: a consumer
//! checks each against the declared choreography and the payload's contract
//! before any effect, and parks what fails with the reason.
use std::time::Duration;

use choreo::Envelope;
use contracts::events::v1 as ev;
use e2e::{Options, OrderStatus, SETTLE, system};
use prost::Message;

async fn parked_in(sys: &e2e::System, service: &str, n: usize) -> Vec<choreo::proto::DeadLetter> {
    let mut parked = Vec::new();
    for _ in 0..100 {
        parked = sys.dead_letters(service).await.unwrap();
        if parked.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    parked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misrouted_events_are_parked_and_change_nothing() {
    let mut sys = system(Options::default()).await;
    sys.set_stock("BOOK", 10).await.unwrap();
    // Shipping is down: the order waits, RESERVED.
    tokio::task::block_in_place(|| sys.service("shipping").kill()).unwrap();
    let placed = sys.place_one("BOOK").await.unwrap();
    sys.wait_for(&placed.order_id, &[OrderStatus::Reserved], SETTLE)
        .await
        .unwrap();

    // A notification.sent on shipping.scheduled's subject, and one on its own
    // subject that claims to come from inventory.
    let sent = ev::NotificationSent {
        notification_id: "forged".into(),
        channel: "mail".into(),
    };
    let misrouted = Envelope::new("notification", &placed.order_id, None, &sent);
    sys.publish_raw("shipping.scheduled", misrouted.encode_to_vec())
        .await
        .unwrap();
    let impostor = Envelope::new("inventory", &placed.order_id, None, &sent);
    sys.publish_raw("notification.sent", impostor.encode_to_vec())
        .await
        .unwrap();
    let parked = parked_in(&sys, "order", 2).await;
    let reasons: Vec<&str> = parked.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("forged or misrouted: subject")
            && reasons[0].contains("\"notification.sent\""),
        "{}",
        reasons[0]
    );
    assert_eq!(
        reasons[1],
        "forged or misrouted: notification.sent claims producer \"inventory\", but the choreography names notification"
    );
    let notification_parked = parked_in(&sys, "notification", 1).await;
    assert!(
        notification_parked[0]
            .reason
            .starts_with("forged or misrouted"),
        "{notification_parked:?}"
    );
    assert_eq!(
        sys.get(&placed.order_id).await.unwrap().status(),
        OrderStatus::Reserved
    );

    // An order.created that breaks its contract (a SKU twice) is parked by
    // inventory at its first delivery, and holds nothing.
    let forged_order = uuid::Uuid::now_v7().to_string();
    let twice = ev::OrderCreated {
        customer: "mallory".into(),
        destination: "DE".into(),
        contact: "m@example.com".into(),
        lines: vec![
            ev::OrderLine {
                sku: "BOOK".into(),
                quantity: 1,
            },
            ev::OrderLine {
                sku: "BOOK".into(),
                quantity: 2,
            },
        ],
    };
    let forged = Envelope::new("order", &forged_order, None, &twice);
    sys.publish_raw("order.created", forged.encode_to_vec())
        .await
        .unwrap();
    let parked = parked_in(&sys, "inventory", 1).await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(
        parked[0].reason,
        "contract violated: order.created line 2: SKU BOOK appears twice"
    );
    assert_eq!(parked[0].replays, 0);
    assert_eq!(
        sys.stock("BOOK").await.unwrap().reserved,
        1,
        "only the real order holds stock"
    );

    // The real order goes on once shipping is back.
    tokio::task::block_in_place(|| sys.service("shipping").restart()).unwrap();
    let done = sys.wait_terminal(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(done.status(), OrderStatus::Completed, "{}", done.reason);
}

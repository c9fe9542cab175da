//! End-to-end: the real binaries, spoken to only over gRPC, as a client would:
//! the happy path, every failure path and its compensations, a customer's
//! cancel and the order's deadline.
use std::time::Duration;

use contracts::inventory::v1::ReservationStatus;
use contracts::notification::v1::{NotificationKind, NotificationStatus};
use contracts::order::v1 as api;
use contracts::shipping::v1::ShipmentStatus;
use e2e::{Options, OrderStatus, SETTLE, new_key as key, order_request, system, timeline};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_completes_with_one_reservation_one_shipment_one_notification() {
    let sys = system(Options::default()).await;
    sys.set_stock("BOOK", 10).await.unwrap();
    sys.set_stock("PEN", 5).await.unwrap();
    let placed = sys
        .place(order_request(
            &key(),
            "ada",
            "DE",
            "ada@example.com",
            &[("BOOK", 2), ("PEN", 1)],
        ))
        .await
        .unwrap();
    // The answer is the order as its own transaction wrote it.
    assert_eq!(placed.status(), OrderStatus::Pending);

    let done = sys.wait_terminal(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(
        done.status(),
        OrderStatus::Completed,
        "reason: {}",
        done.reason
    );
    assert_eq!(done.reason, "");
    assert_eq!(
        timeline(&done),
        [
            "order.created",
            "inventory.reserved",
            "shipping.scheduled",
            "notification.sent"
        ]
    );
    assert!(
        done.timeline
            .iter()
            .all(|e| !e.producer.is_empty() && e.occurred_at.is_some())
    );

    let reservation = sys.reservation(&placed.order_id).await.unwrap();
    assert_eq!(reservation.status(), ReservationStatus::Held);
    assert_eq!(reservation.lines.len(), 2);
    let shipment = sys.shipment(&placed.order_id).await.unwrap();
    assert_eq!(shipment.status(), ShipmentStatus::Scheduled);
    assert!(!shipment.shipment_id.is_empty());
    let notes = sys
        .settled_notifications(&placed.order_id, SETTLE)
        .await
        .unwrap();
    assert_eq!(notes.notifications.len(), 1);
    assert_eq!(
        notes.notifications[0].kind(),
        NotificationKind::Confirmation
    );
    assert_eq!(notes.notifications[0].status(), NotificationStatus::Sent);
    assert!(notes.notifications[0].sent_at.is_some());
    assert_eq!(notes.notifications[0].recipient, "ada@example.com");

    let book = sys.stock("BOOK").await.unwrap();
    assert_eq!((book.available, book.reserved), (8, 2));
    let pen = sys.stock("PEN").await.unwrap();
    assert_eq!((pen.available, pen.reserved), (4, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_path_ends_cancelled_with_its_reason_and_compensations_in_reverse_order() {
    let sys = system(Options::default()).await;
    sys.set_stock("BOOK", 10).await.unwrap();
    sys.set_stock("RARE", 1).await.unwrap();

    let no_stock = sys
        .place(order_request(
            &key(),
            "bo",
            "DE",
            "bo@example.com",
            &[("BOOK", 1), ("RARE", 3)],
        ))
        .await
        .unwrap();
    let unserved = sys
        .place(order_request(
            &key(),
            "cy",
            "AQ",
            "cy@example.com",
            &[("BOOK", 2)],
        ))
        .await
        .unwrap();
    let unreachable = sys
        .place(order_request(
            &key(),
            "di",
            "FR",
            "di@nowhere.invalid",
            &[("BOOK", 3)],
        ))
        .await
        .unwrap();

    // Inventory refuses: nothing held anywhere, no compensation needed.
    let o = sys.wait_terminal(&no_stock.order_id, SETTLE).await.unwrap();
    assert_eq!(o.status(), OrderStatus::Cancelled);
    assert_eq!(
        o.reason,
        "inventory: not enough stock of RARE (1 available, 3 ordered)"
    );
    assert_eq!(timeline(&o), ["order.created", "inventory.rejected"]);
    assert_eq!(
        sys.reservation(&o.order_id).await.unwrap().status(),
        ReservationStatus::Rejected
    );
    assert_eq!(
        sys.shipment(&o.order_id).await.unwrap_err().code(),
        Code::NotFound
    );

    // Shipping fails: inventory gives the stock back.
    let o = sys.wait_terminal(&unserved.order_id, SETTLE).await.unwrap();
    assert_eq!(o.status(), OrderStatus::Cancelled);
    assert_eq!(
        o.reason,
        "shipping: carrier Parcelo does not serve destination AQ"
    );
    assert_eq!(
        timeline(&o),
        [
            "order.created",
            "inventory.reserved",
            "shipping.failed",
            "inventory.released"
        ]
    );
    assert_eq!(
        sys.reservation(&o.order_id).await.unwrap().status(),
        ReservationStatus::Released
    );
    assert_eq!(
        sys.shipment(&o.order_id).await.unwrap().status(),
        ShipmentStatus::Failed
    );

    // Notification fails: shipping cancels, then inventory releases.
    let o = sys
        .wait_terminal(&unreachable.order_id, SETTLE)
        .await
        .unwrap();
    assert_eq!(o.status(), OrderStatus::Cancelled);
    assert!(
        o.reason
            .starts_with("notification: customer di cannot be reached")
            && o.reason.contains("does not exist"),
        "{}",
        o.reason
    );
    assert_eq!(
        timeline(&o),
        [
            "order.created",
            "inventory.reserved",
            "shipping.scheduled",
            "notification.failed",
            "shipping.cancelled",
            "inventory.released"
        ]
    );
    assert_eq!(
        sys.shipment(&o.order_id).await.unwrap().status(),
        ShipmentStatus::Cancelled
    );
    assert_eq!(
        sys.reservation(&o.order_id).await.unwrap().status(),
        ReservationStatus::Released
    );
    // The confirmation was queued and bounced; nothing went out.
    let notes = sys
        .settled_notifications(&o.order_id, SETTLE)
        .await
        .unwrap();
    let bounced: Vec<_> = notes
        .notifications
        .iter()
        .map(|n| (n.kind(), n.status()))
        .collect();
    assert_eq!(
        bounced,
        [(NotificationKind::Confirmation, NotificationStatus::Failed)]
    );
    assert!(
        notes.notifications[0].last_error.contains("does not exist"),
        "{:?}",
        notes.notifications[0]
    );
    assert!(notes.note.contains("cannot be reached"), "{}", notes.note);
    // The customer's address is in no reason, timeline line or log line (the
    // query APIs still answer it as the order's contact).
    let mut story: Vec<&str> = o.timeline.iter().map(|e| e.detail.as_str()).collect();
    story.extend([
        o.reason.as_str(),
        notes.note.as_str(),
        notes.notifications[0].last_error.as_str(),
    ]);
    let story = story.join("\n");
    assert!(!story.contains("di@nowhere.invalid"), "{story}");
    for service in e2e::SERVICES {
        let log = std::fs::read_to_string(sys.log_path(service)).unwrap();
        assert!(
            !log.contains("di@nowhere.invalid"),
            "{service} logged the address"
        );
    }

    // Every unit is back on the shelf.
    let book = sys.stock("BOOK").await.unwrap();
    assert_eq!((book.available, book.reserved), (10, 0));
    let rare = sys.stock("RARE").await.unwrap();
    assert_eq!((rare.available, rare.reserved), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_cancel_mid_flow_undoes_every_step() {
    let mut sys = system(Options::default()).await;
    sys.set_stock("BOOK", 5).await.unwrap();
    // Notification is down, so the order stops at SCHEDULED.
    sys.service("notification").kill().unwrap();
    let placed = sys
        .place(order_request(
            &key(),
            "ed",
            "GB",
            "ed@example.com",
            &[("BOOK", 2)],
        ))
        .await
        .unwrap();
    sys.wait_for(&placed.order_id, &[OrderStatus::Scheduled], SETTLE)
        .await
        .unwrap();

    let cancelled = sys
        .clients
        .order
        .clone()
        .cancel_order(api::CancelOrderRequest {
            order_id: placed.order_id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status(), OrderStatus::Cancelling);
    sys.service("notification").restart().unwrap();

    let o = sys.wait_terminal(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(o.status(), OrderStatus::Cancelled);
    assert_eq!(o.reason, "customer: changed my mind");
    let events = timeline(&o);
    let tail: Vec<&str> = events
        .iter()
        .copied()
        .filter(|t| t.ends_with("cancelled") || t.ends_with("released"))
        .collect();
    assert_eq!(
        tail,
        [
            "order.cancelled",
            "notification.cancelled",
            "shipping.cancelled",
            "inventory.released"
        ],
        "compensation walks back in reverse order: {events:?}"
    );
    assert_eq!(
        sys.shipment(&o.order_id).await.unwrap().status(),
        ShipmentStatus::Cancelled
    );
    // Notification, back, reads the stream in order: it queues the
    // confirmation it owed (older than the cancel), then the compensation
    // either withdraws it before it goes out or, if the dispatcher was first,
    // follows it with a cancellation notice; a late notification.sent does
    // not complete the order.
    let sent: Vec<(NotificationKind, NotificationStatus)> = sys
        .settled_notifications(&o.order_id, SETTLE)
        .await
        .unwrap()
        .notifications
        .iter()
        .map(|n| (n.kind(), n.status()))
        .collect();
    if events.contains(&"notification.sent") {
        assert_eq!(
            sent,
            [
                (NotificationKind::Confirmation, NotificationStatus::Sent),
                (NotificationKind::Cancellation, NotificationStatus::Sent)
            ]
        );
    } else {
        assert!(
            sent.is_empty()
                || sent
                    == [(
                        NotificationKind::Confirmation,
                        NotificationStatus::Withdrawn
                    )],
            "{sent:?}"
        );
    }
    let book = sys.stock("BOOK").await.unwrap();
    assert_eq!((book.available, book.reserved), (5, 0));

    // Cancelling again changes nothing; a completed order cannot be cancelled.
    let again = sys
        .clients
        .order
        .clone()
        .cancel_order(api::CancelOrderRequest {
            order_id: placed.order_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.status(), again.reason.as_str()),
        (OrderStatus::Cancelled, "customer: changed my mind")
    );
    let done = sys
        .place(order_request(
            &key(),
            "ed",
            "GB",
            "ed@example.com",
            &[("BOOK", 1)],
        ))
        .await
        .unwrap();
    sys.wait_for(&done.order_id, &[OrderStatus::Completed], SETTLE)
        .await
        .unwrap();
    let refused = sys
        .clients
        .order
        .clone()
        .cancel_order(api::CancelOrderRequest {
            order_id: done.order_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_while_shipping_is_down_cancels_and_nothing_revives_the_order() {
    let mut sys = system(Options {
        order_deadline_secs: 3,
        ..Options::default()
    })
    .await;
    sys.set_stock("BOOK", 5).await.unwrap();
    sys.service("shipping").kill().unwrap();
    let placed = sys
        .place(order_request(
            &key(),
            "fy",
            "NL",
            "fy@example.com",
            &[("BOOK", 2)],
        ))
        .await
        .unwrap();
    sys.wait_for(&placed.order_id, &[OrderStatus::Reserved], SETTLE)
        .await
        .unwrap();
    let cancelling = sys
        .wait_for(&placed.order_id, &[OrderStatus::Cancelling], SETTLE)
        .await
        .unwrap();
    assert_eq!(
        cancelling.reason,
        "deadline: no progress within 3s while waiting for shipping to schedule a shipment"
    );

    sys.service("shipping").restart().unwrap();
    let o = sys.wait_terminal(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(o.status(), OrderStatus::Cancelled);
    assert!(o.reason.starts_with("deadline:"), "{}", o.reason);
    // Shipping, back, sees the reservation (it is older in the stream) and then
    // the compensation: whatever it did is undone, nothing is live.
    let shipment = sys.shipment(&o.order_id).await.unwrap();
    assert!(
        matches!(
            shipment.status(),
            ShipmentStatus::Cancelled | ShipmentStatus::NeverMade
        ),
        "{shipment:?}"
    );
    assert!(
        sys.notifications(&o.order_id)
            .await
            .unwrap()
            .notifications
            .is_empty()
    );
    let book = sys.stock("BOOK").await.unwrap();
    assert_eq!((book.available, book.reserved), (5, 0));

    // Give any late event time to arrive: the order stays cancelled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = sys.get(&o.order_id).await.unwrap();
    assert_eq!(later.status(), OrderStatus::Cancelled);
    assert!(!timeline(&later).contains(&"notification.sent"));
}

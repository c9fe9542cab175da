//! End-to-end: the real binaries, spoken to only over gRPC, as a client would.
use std::time::Duration;

use contracts::inventory::v1::ReservationStatus;
use contracts::notification::v1::{NotificationKind, NotificationStatus};
use contracts::order::v1 as api;
use contracts::shipping::v1::ShipmentStatus;
use e2e::{Options, OrderStatus, System, order_request, timeline};
use futures::StreamExt;
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(60);

async fn system(options: Options) -> System {
    System::start(options).await.expect("system starts")
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_and_bad_requests() {
    let sys = system(Options::default()).await;
    sys.set_stock("BOOK", 10).await.unwrap();
    let mut client = sys.clients.order.clone();
    let request = order_request(&key(), "gus", "DE", "gus@example.com", &[("BOOK", 1)]);
    let first = client
        .place_order(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = client
        .place_order(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(
        first.order.unwrap().order_id,
        second.order.unwrap().order_id
    );

    let mut changed = request.clone();
    changed.items[0].quantity = 2;
    let reused = client.place_order(changed).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert!(
        reused.message().contains("use a new key"),
        "{}",
        reused.message()
    );

    let bad: Vec<(api::PlaceOrderRequest, &str)> = vec![
        (order_request(&key(), "h", "DE", "", &[]), "items is empty"),
        (
            order_request(&key(), "h", "DE", "", &[("BOOK", 0)]),
            "quantity 0 is out of range",
        ),
        (
            order_request(&key(), "h", "DE", "", &[("BOOK", 4_000_000_000)]),
            "out of range",
        ),
        (
            order_request(&key(), "", "DE", "", &[("BOOK", 1)]),
            "customer is required",
        ),
        (
            order_request("", "h", "DE", "", &[("BOOK", 1)]),
            "idempotency_key is required",
        ),
        (
            order_request(&key(), "h", "", "", &[("BOOK", 1)]),
            "two-letter",
        ),
        (
            order_request(&key(), "h", "DE", "", &[("", 1)]),
            "sku is required",
        ),
        (
            order_request(&key(), &"x".repeat(10_000), "DE", "", &[("BOOK", 1)]),
            "longer than",
        ),
        (
            order_request(&key(), "h", "DE", "", &[("BOOK", 1), ("BOOK", 2)]),
            "appears twice",
        ),
        (
            order_request(&key(), "h", "DE", "", &vec![("BOOK", 1); 51]),
            "too many",
        ),
    ];
    for (request, expected) in bad {
        let status = client.place_order(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(expected),
            "{:?} should mention {expected:?}",
            status.message()
        );
    }
    let listed = client
        .list_orders(api::ListOrdersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.orders.len(), 1, "bad requests wrote nothing");

    let missing = client
        .get_order(api::GetOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let garbled = client
        .get_order(api::GetOrderRequest {
            order_id: "not-an-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(garbled.code(), Code::InvalidArgument);
    let unknown_sku = sys
        .clients
        .inventory
        .clone()
        .get_stock(contracts::inventory::v1::GetStockRequest { sku: "NOPE".into() })
        .await
        .unwrap_err();
    assert_eq!(unknown_sku.code(), Code::NotFound);
    let page = client
        .list_orders(api::ListOrdersRequest {
            page_size: 100_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(page.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_order_streams_each_change_once_in_order_to_the_end() {
    let sys = system(Options::default()).await;
    sys.set_stock("BOOK", 3).await.unwrap();
    let placed = sys
        .place(order_request(
            &key(),
            "ida",
            "US",
            "ida@example.com",
            &[("BOOK", 1)],
        ))
        .await
        .unwrap();
    let stream = sys
        .clients
        .order
        .clone()
        .watch_order(api::WatchOrderRequest {
            order_id: placed.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let changes: Vec<api::StatusChange> =
        tokio::time::timeout(SETTLE, stream.map(|c| c.unwrap()).collect())
            .await
            .expect("the watch ends at a terminal status");
    let statuses: Vec<OrderStatus> = changes.iter().map(|c| c.status()).collect();
    assert_eq!(
        statuses,
        [
            OrderStatus::Pending,
            OrderStatus::Reserved,
            OrderStatus::Scheduled,
            OrderStatus::Completed
        ]
    );
    let sequences: Vec<u32> = changes.iter().map(|c| c.sequence).collect();
    assert_eq!(sequences, [1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_never_oversell_and_list_pages_cover_every_order() {
    let sys = system(Options::default()).await;
    sys.set_stock("HOT", 5).await.unwrap();
    let placed = futures::future::join_all((0..12).map(|i| {
        let sys = &sys;
        async move {
            sys.place(order_request(
                &key(),
                &format!("c{i}"),
                "DE",
                "c@example.com",
                &[("HOT", 1)],
            ))
            .await
            .unwrap()
        }
    }))
    .await;
    let mut completed = 0;
    for order in &placed {
        let o = sys.wait_terminal(&order.order_id, SETTLE).await.unwrap();
        if o.status() == OrderStatus::Completed {
            completed += 1;
        } else {
            assert!(o.reason.contains("not enough stock of HOT"), "{}", o.reason);
        }
    }
    assert_eq!(completed, 5);
    let hot = sys.stock("HOT").await.unwrap();
    assert_eq!((hot.available, hot.reserved), (0, 5));

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = sys
            .clients
            .order
            .clone()
            .list_orders(api::ListOrdersRequest {
                status: 0,
                page_size: 5,
                page_token: token,
                stuck_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.orders.into_iter().map(|o| o.order_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 12);
    let completed_only = sys
        .clients
        .order
        .clone()
        .list_orders(api::ListOrdersRequest {
            status: api::OrderStatus::Completed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(completed_only.orders.len(), 5);
}

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

//! End-to-end: what a gRPC client can ask and how bad requests are answered:
//! idempotency keys, validation, watching an order, listing pages under load.

use std::time::Duration;

use contracts::order::v1 as api;
use e2e::{Options, OrderStatus, SETTLE, new_key as key, order_request, system};
use futures::StreamExt;
use tonic::Code;

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
                ..Default::default()
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

    // One customer's orders, and the counts a dashboard shows.
    let of_c3 = sys
        .clients
        .order
        .clone()
        .list_orders(api::ListOrdersRequest {
            customer: "c3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = of_c3.orders.iter().map(|o| o.order_id.as_str()).collect();
    assert_eq!(ids, [placed[3].order_id.as_str()]);
    let counts = sys
        .clients
        .order
        .clone()
        .count_orders(api::CountOrdersRequest {})
        .await
        .unwrap()
        .into_inner();
    let count = |s: OrderStatus| {
        counts
            .counts
            .iter()
            .find(|c| c.status() == s)
            .map(|c| c.count)
    };
    assert_eq!(counts.counts.len(), 6, "every status, zeros included");
    assert_eq!(count(OrderStatus::Completed), Some(5));
    assert_eq!(count(OrderStatus::Cancelled), Some(7));
    assert_eq!(count(OrderStatus::Pending), Some(0));
    assert_eq!(counts.stuck, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_capped_and_end_when_the_service_stops() {
    let mut sys = system(Options {
        extra_env: vec![("WATCH_LIMIT".into(), "300".into())],
        ..Options::default()
    })
    .await;
    sys.set_stock("BOOK", 10).await.unwrap();
    // Shipping is down: the order stays open and every watch stays open.
    tokio::task::block_in_place(|| sys.service("shipping").kill()).unwrap();
    let placed = sys
        .place(order_request(
            &key(),
            "ada",
            "DE",
            "ada@example.com",
            &[("BOOK", 1)],
        ))
        .await
        .unwrap();
    let addr = format!("http://127.0.0.1:{}", sys.ports[0]);
    let mut watches = Vec::new();
    // Two connections: one HTTP/2 connection carries at most 256 streams.
    for connection in 0..2 {
        let channel = tonic::transport::Endpoint::from_shared(addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = api::order_service_client::OrderServiceClient::new(channel);
        for _ in 0..150 {
            let stream = client
                .watch_order(api::WatchOrderRequest {
                    order_id: placed.order_id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("connection {connection}: {e}"))
                .into_inner();
            watches.push(stream);
        }
    }
    let refused = sys
        .clients
        .order
        .clone()
        .watch_order(api::WatchOrderRequest {
            order_id: placed.order_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    let started = std::time::Instant::now();
    tokio::task::block_in_place(|| sys.service("order").stop(Duration::from_secs(10))).unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM with 300 watches open took {took:?}"
    );
    // Each watch ends (told the server is going away, or cut), none hangs.
    for mut watch in watches {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(item) = watch.next().await {
                if item.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(end.is_ok(), "a watch outlived the server");
    }
}

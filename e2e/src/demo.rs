//! The demo's story, shared by the demo binary and the tests: seed stock,
//! place orders that walk the happy path and every failure path, show
//! progress, and print what became of each order and which compensations ran.
use std::time::{Duration, Instant};

use contracts::order::v1 as api;

use crate::{Clients, OrderStatus, order_request};

struct Scenario {
    name: &'static str,
    request: api::PlaceOrderRequest,
    cancel: bool,
}

fn scenarios(happy: usize) -> Vec<Scenario> {
    let key = || uuid::Uuid::new_v4().to_string();
    let destinations = ["DE", "US", "FR", "JP", "GB", "NL"];
    let mut list: Vec<Scenario> = (0..happy)
        .map(|i| Scenario {
            name: "happy path",
            request: order_request(
                &key(),
                &format!("customer-{i}"),
                destinations[i % destinations.len()],
                &format!("customer-{i}@example.com"),
                &[("BOOK", 1 + (i as u32 % 3)), ("PEN", 2)],
            ),
            cancel: false,
        })
        .collect();
    list.extend([
        Scenario {
            name: "out of stock",
            request: order_request(
                &key(),
                "bo",
                "DE",
                "bo@example.com",
                &[("BOOK", 1), ("RARE", 5)],
            ),
            cancel: false,
        },
        Scenario {
            name: "unserved destination",
            request: order_request(&key(), "cy", "AQ", "cy@example.com", &[("MUG", 2)]),
            cancel: false,
        },
        Scenario {
            name: "unreachable customer",
            request: order_request(&key(), "di", "FR", "di@nowhere.invalid", &[("MUG", 1)]),
            cancel: false,
        },
        Scenario {
            name: "customer cancels",
            request: order_request(&key(), "ed", "GB", "ed@example.com", &[("BOOK", 2)]),
            cancel: true,
        },
    ]);
    list
}

fn status_name(status: OrderStatus) -> &'static str {
    status.as_str_name().trim_start_matches("ORDER_STATUS_")
}

/// Runs the story against `sys` and returns each order's scenario and final state.
pub async fn run(sys: &Clients, happy: usize) -> anyhow::Result<Vec<(&'static str, api::Order)>> {
    for (sku, units) in [("BOOK", 100), ("PEN", 100), ("MUG", 20), ("RARE", 1)] {
        sys.set_stock(sku, units).await?;
    }
    println!("stock seeded: BOOK 100, PEN 100, MUG 20, RARE 1");

    let mut placed = Vec::new();
    for scenario in scenarios(happy) {
        let order = sys.place(scenario.request.clone()).await?;
        if scenario.cancel {
            sys.order
                .clone()
                .cancel_order(api::CancelOrderRequest {
                    order_id: order.order_id.clone(),
                    reason: "changed my mind".into(),
                })
                .await?;
        }
        placed.push((scenario.name, order.order_id));
    }
    println!("placed {} orders; waiting for each to finish", placed.len());

    let started = Instant::now();
    let finished = loop {
        let mut orders = Vec::new();
        for (_, id) in &placed {
            orders.push(sys.get(id).await?);
        }
        let count = |s: OrderStatus| orders.iter().filter(|o| o.status() == s).count();
        let done = count(OrderStatus::Completed) + count(OrderStatus::Cancelled);
        println!(
            "  {:>5.1}s  pending {}  reserved {}  scheduled {}  cancelling {}  | completed {}  cancelled {}",
            started.elapsed().as_secs_f64(),
            count(OrderStatus::Pending),
            count(OrderStatus::Reserved),
            count(OrderStatus::Scheduled),
            count(OrderStatus::Cancelling),
            count(OrderStatus::Completed),
            count(OrderStatus::Cancelled),
        );
        if done == orders.len() {
            break orders;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "orders did not finish in 120s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    println!();
    println!(
        "{:<36}  {:<21}  {:<9}  reason / compensations",
        "order", "scenario", "status"
    );
    for ((scenario, _), order) in placed.iter().zip(&finished) {
        let compensations: Vec<&str> = order
            .timeline
            .iter()
            .filter(|e| e.event_type.ends_with(".cancelled") || e.event_type.ends_with(".released"))
            .map(|e| e.event_type.as_str())
            .collect();
        println!(
            "{:<36}  {:<21}  {:<9}  {}",
            order.order_id,
            scenario,
            status_name(order.status()),
            order.reason
        );
        if !compensations.is_empty() {
            println!("{:<71}  compensation: {}", "", compensations.join(" -> "));
        }
    }
    println!();
    println!("{:<6} {:>10} {:>10}", "SKU", "available", "reserved");
    for sku in ["BOOK", "PEN", "MUG", "RARE"] {
        let stock = sys.stock(sku).await?;
        println!("{:<6} {:>10} {:>10}", sku, stock.available, stock.reserved);
    }

    Ok(placed
        .iter()
        .map(|(scenario, _)| *scenario)
        .zip(finished)
        .collect())
}

//! The demo: starts the whole system (its own NATS and PostgreSQL unless
//! NATS_URL / DATABASE_URL are given), seeds stock, places orders that walk
//! the happy path and every failure path, shows progress, and prints what
//! became of each order and which compensations ran.
use std::time::{Duration, Instant};

use clap::Parser;
use contracts::order::v1 as api;
use e2e::{Clients, Options, OrderStatus, System, order_request};

#[derive(Parser)]
#[command(about = "Run the order saga end to end and show what happened")]
struct Args {
    /// Happy-path orders to place besides one of each failure.
    #[arg(long, default_value_t = 6)]
    happy: usize,
    /// Keep the system running afterwards (on ports 50051..50054) for sagactl or grpcurl.
    #[arg(long)]
    keep_running: bool,
    /// Seconds an order may stall before its deadline cancels it.
    #[arg(long, default_value_t = 20)]
    deadline_secs: u64,
    /// Drive services that already run (docker-compose) instead of starting them.
    #[arg(long)]
    external: bool,
    #[arg(long, env = "ORDER_ADDR", default_value = "http://127.0.0.1:50051")]
    order_addr: String,
    #[arg(long, env = "INVENTORY_ADDR", default_value = "http://127.0.0.1:50052")]
    inventory_addr: String,
    #[arg(long, env = "SHIPPING_ADDR", default_value = "http://127.0.0.1:50053")]
    shipping_addr: String,
    #[arg(
        long,
        env = "NOTIFICATION_ADDR",
        default_value = "http://127.0.0.1:50054"
    )]
    notification_addr: String,
}

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Keeps the system (when this demo started it) alive until the end.
    let (_system, sys): (Option<System>, Clients) = if args.external {
        println!("connecting to the running services...");
        let clients = Clients::connect(
            &args.order_addr,
            &args.inventory_addr,
            &args.shipping_addr,
            &args.notification_addr,
            Duration::from_secs(120),
        )
        .await?;
        (None, clients)
    } else {
        println!("starting NATS, PostgreSQL and the four services...");
        let system = System::start(Options {
            order_deadline_secs: args.deadline_secs,
            log: "warn".into(),
            well_known_ports: args.keep_running,
            ..Options::default()
        })
        .await?;
        println!("service logs: {}", system.logs.display());
        let clients = system.clients.clone();
        (Some(system), clients)
    };

    for (sku, units) in [("BOOK", 100), ("PEN", 100), ("MUG", 20), ("RARE", 1)] {
        sys.set_stock(sku, units).await?;
    }
    println!("stock seeded: BOOK 100, PEN 100, MUG 20, RARE 1");

    let mut placed = Vec::new();
    for scenario in scenarios(args.happy) {
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

    if args.keep_running && !args.external {
        println!();
        println!("the system keeps running; try:");
        println!("  cargo run -q -p sagactl -- list");
        println!("  cargo run -q -p sagactl -- get {}", placed[0].1);
        println!(
            "  grpcurl -plaintext -d '{{\"order_id\":\"{}\"}}' 127.0.0.1:50051 order.v1.OrderService/GetOrder",
            placed[0].1
        );
        println!("press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}

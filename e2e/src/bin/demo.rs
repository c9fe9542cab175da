//! The demo: starts the whole system (its own NATS and PostgreSQL unless
//! NATS_URL / DATABASE_URL are given), seeds stock, places orders that walk
//! the happy path and every failure path, shows progress, and prints what
//! became of each order and which compensations ran.
use std::time::Duration;

use clap::Parser;
use e2e::{Clients, Options, System};

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
    /// The admin token of the running services, when they ask for one.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Keeps the system (when this demo started it) alive until the end.
    let (system, sys): (Option<System>, Clients) = if args.external {
        println!("connecting to the running services...");
        let clients = Clients::connect(
            &args.order_addr,
            &args.inventory_addr,
            &args.shipping_addr,
            &args.notification_addr,
            args.admin_token.as_deref(),
            None,
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

    let outcomes = e2e::demo::run(&sys, args.happy).await?;
    if args.keep_running && !args.external {
        println!();
        println!("the system keeps running; try:");
        println!("  cargo run -q -p sagactl -- list");
        println!(
            "  cargo run -q -p sagactl -- get {}",
            outcomes[0].1.order_id
        );
        println!(
            "  grpcurl -plaintext -d '{{\"order_id\":\"{}\"}}' 127.0.0.1:50051 order.v1.OrderService/GetOrder",
            outcomes[0].1.order_id
        );
        if let Some(system) = &system {
            let console = system.console(8080).await?;
            println!(
                "  open the console: {}/orders/{}",
                console.url, outcomes[0].1.order_id
            );
            println!("press Ctrl-C to stop");
            // SIGTERM too: either way the system is dropped and its servers stop.
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(choreo::runtime::cancel_on_signal(stop.clone()));
            stop.cancelled().await;
        }
    }
    Ok(())
}

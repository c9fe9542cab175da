//! order: wires config and the platform runtime around the order service.
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Order service of the saga: PlaceOrder, GetOrder, ListOrders, CancelOrder, WatchOrder"
)]
struct Args {
    #[command(flatten)]
    platform: choreo::Config,
    #[command(flatten)]
    rules: order::Rules,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    choreo::Service::new(
        "order",
        &contracts::CHOREOGRAPHY,
        choreo::Ports {
            grpc: 50051,
            metrics: 9101,
        },
        args.platform,
        sqlx::migrate!("../../migrations/order"),
    )
    .run(|context| order::parts(context, args.rules))
    .await
}

//! inventory: wires config and the platform runtime around the inventory service.
use clap::Parser;

#[derive(Parser)]
#[command(about = "Inventory service of the saga: reserves and releases stock")]
struct Args {
    #[command(flatten)]
    platform: choreo::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    choreo::Service::new(
        "inventory",
        &contracts::CHOREOGRAPHY,
        choreo::Ports {
            grpc: 50052,
            metrics: 9102,
        },
        args.platform,
        sqlx::migrate!("../../migrations/inventory"),
    )
    .run(inventory::parts)
    .await
}

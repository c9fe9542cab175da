//! shipping: wires config and the platform runtime around the shipping service.
use clap::Parser;

#[derive(Parser)]
#[command(about = "Shipping service of the saga: schedules and cancels shipments")]
struct Args {
    #[command(flatten)]
    platform: choreo::Config,
    #[command(flatten)]
    rules: shipping::Rules,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    choreo::Service::new(
        "shipping",
        &contracts::CHOREOGRAPHY,
        choreo::Ports {
            grpc: 50053,
            metrics: 9103,
        },
        args.platform,
        sqlx::migrate!("../../migrations/shipping"),
    )
    .run(|context| shipping::parts(context, args.rules))
    .await
}

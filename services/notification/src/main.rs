//! notification: wires config and the platform runtime around the notification service.
use clap::Parser;

#[derive(Parser)]
#[command(about = "Notification service of the saga: tells customers, or takes it back")]
struct Args {
    #[command(flatten)]
    platform: choreo::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    choreo::Service::new(
        "notification",
        &contracts::CHOREOGRAPHY,
        choreo::Ports {
            grpc: 50054,
            metrics: 9104,
        },
        args.platform,
        sqlx::migrate!("../../migrations/notification"),
    )
    .run(notification::parts)
    .await
}

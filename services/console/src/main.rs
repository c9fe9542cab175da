//! console: wires config and telemetry around the saga console's web server.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = console::Config::parse();
    let _telemetry = choreo::telemetry::init(config.log_format, "console", None);
    console::run(config).await
}

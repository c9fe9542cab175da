//! The console's settings: where it listens, where each service's gRPC API
//! and metrics are, and the credentials it acts with.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;

#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "console",
    about = "The saga console: orders, their sagas live, dead letters, stock and health, in a browser"
)]
pub struct Config {
    /// Where the console listens. Off loopback it asks for CONSOLE_PASSWORD.
    #[arg(long, env = "CONSOLE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    #[arg(long, env = "ORDER_ADDR", default_value = "http://127.0.0.1:50051")]
    pub order_addr: String,
    #[arg(long, env = "INVENTORY_ADDR", default_value = "http://127.0.0.1:50052")]
    pub inventory_addr: String,
    #[arg(long, env = "SHIPPING_ADDR", default_value = "http://127.0.0.1:50053")]
    pub shipping_addr: String,
    #[arg(
        long,
        env = "NOTIFICATION_ADDR",
        default_value = "http://127.0.0.1:50054"
    )]
    pub notification_addr: String,
    /// Prometheus endpoints, for the health page ("" leaves one out).
    #[arg(
        long,
        env = "ORDER_METRICS_URL",
        default_value = "http://127.0.0.1:9101/metrics"
    )]
    pub order_metrics: String,
    #[arg(
        long,
        env = "INVENTORY_METRICS_URL",
        default_value = "http://127.0.0.1:9102/metrics"
    )]
    pub inventory_metrics: String,
    #[arg(
        long,
        env = "SHIPPING_METRICS_URL",
        default_value = "http://127.0.0.1:9103/metrics"
    )]
    pub shipping_metrics: String,
    #[arg(
        long,
        env = "NOTIFICATION_METRICS_URL",
        default_value = "http://127.0.0.1:9104/metrics"
    )]
    pub notification_metrics: String,
    /// The services' client token: reading, listing, watching and cancelling orders.
    #[arg(long, env = "CLIENT_TOKEN", hide_env_values = true)]
    pub client_token: Option<String>,
    /// The services' admin token: dead letters, replay and stock changes
    /// (without it, and with a client token, those pages say so).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The certificate authority the services' TLS certificates are signed by (PEM), for https:// addresses.
    #[arg(long, env = "SAGA_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// The password a browser must give (HTTP Basic, any user name); required off loopback.
    #[arg(long, env = "CONSOLE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// A file holding CONSOLE_PASSWORD (a secret mounted by compose).
    #[arg(long, env = "CONSOLE_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Serve off loopback with no password: anyone who reaches the port acts
    /// with the console's tokens. Only behind a proxy that authenticates.
    #[arg(long, env = "INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Seconds between the health page's samples.
    #[arg(long, env = "HEALTH_SAMPLE_SECS", default_value_t = 2)]
    pub health_sample_secs: u64,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = choreo::config::LogFormat::Text)]
    pub log_format: choreo::config::LogFormat,
}

impl Config {
    /// The password browsers must give, if any: CONSOLE_PASSWORD or the file's first line.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading CONSOLE_PASSWORD_FILE {}", path.display()))?;
            let password = text.lines().next().unwrap_or("").trim().to_owned();
            anyhow::ensure!(
                !password.is_empty(),
                "CONSOLE_PASSWORD_FILE {} is empty",
                path.display()
            );
            return Ok(Some(password));
        }
        Ok(self.password.clone().filter(|p| !p.is_empty()))
    }

    /// Refuses an open console off loopback: it acts with the services' tokens.
    pub fn check_exposure(&self, password: Option<&str>) -> anyhow::Result<()> {
        if self.addr.ip().is_loopback() || password.is_some() || self.insecure_no_auth {
            return Ok(());
        }
        anyhow::bail!(
            "the console would listen on {} with no password, so anyone who reaches it could act with its tokens: \
             set CONSOLE_PASSWORD (or CONSOLE_PASSWORD_FILE), listen on 127.0.0.1, or pass --insecure-no-auth",
            self.addr
        )
    }
}

//! Settings every service shares, from flags or the environment. A service
//! flattens this into its own `clap` arguments and adds its business knobs.
use std::net::SocketAddr;
use std::time::Duration;

/// `RELAY_SWEEP_AFTER_MS` unless set.
pub const DEFAULT_RELAY_SWEEP_AFTER_MS: u64 = 2000;

/// The settings of `T` (a service's `clap::Args`) at their defaults, the
/// environment's variables still applied; `args` gives those without one.
/// Parsed through clap on purpose: the `#[arg(default_value..)]`s are the
/// one place each default is written.
pub fn defaults_of<T: clap::Args + clap::FromArgMatches>(args: &[&str]) -> T {
    let matches = T::augment_args(clap::Command::new("defaults"))
        .no_binary_name(true)
        .try_get_matches_from(args)
        .expect("built-in defaults parse");
    T::from_arg_matches(&matches).expect("built-in defaults parse")
}

#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// NATS server with JetStream.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS user this service connects as [default: the service's name when a password is given].
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// Password of the NATS user (or NATS_PASSWORD_FILE, e.g. a mounted secret).
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// File holding the NATS user's password (its first line).
    #[arg(long, env = "NATS_PASSWORD_FILE")]
    pub nats_password_file: Option<std::path::PathBuf>,
    /// Create or update the stream and this service's consumer at start.
    /// Needs a NATS user allowed to (the admin); a service user is not, and
    /// finds both made by the setup step (`sagactl provision`).
    #[arg(long, env = "PROVISION_JETSTREAM", default_value_t = false)]
    pub provision_jetstream: bool,
    /// This service's own PostgreSQL database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Address the gRPC API listens on [default: 127.0.0.1 and the service's own port].
    #[arg(long, env = "GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// What the JetStream streams are named after: `<STREAM>_<PRODUCER>`
    /// holds each producing service's events (`SAGA_ORDER`, ...), and
    /// `<STREAM>_STUCK` the platform's stuck reports.
    #[arg(long, env = "STREAM", default_value = "SAGA")]
    pub stream: String,
    /// Subject prefix of the streams; an event goes to `<prefix>.<event type>`.
    #[arg(long, env = "SUBJECT_PREFIX", default_value = "saga")]
    pub subject_prefix: String,
    /// How long the stream keeps events, in seconds (also bounds inbox retention).
    #[arg(long, env = "STREAM_MAX_AGE_SECS", default_value_t = 7 * 24 * 3600)]
    pub stream_max_age_secs: u64,
    /// Copies of the stream a NATS cluster keeps (1 on a single server, 3 on a 3-node cluster).
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// JetStream duplicate window for Nats-Msg-Id, in seconds.
    #[arg(long, env = "DUPLICATE_WINDOW_SECS", default_value_t = 120)]
    pub duplicate_window_secs: u64,
    /// Events handled at once; events of one saga never run side by side.
    #[arg(long, env = "CONSUMER_LANES", default_value_t = 16)]
    pub consumer_lanes: usize,
    /// Events of a busy lane applied in one transaction at most (1: each in its own).
    #[arg(long, env = "CONSUMER_BATCH", default_value_t = 32)]
    pub consumer_batch: usize,
    /// Lanes of a service whose events are applied in batches (instead of
    /// CONSUMER_LANES): few, so that what arrives while a lane commits
    /// queues behind it and goes into its next transaction. One measured
    /// fastest on two cores (docs/bench/round-2026-12-03-f.md).
    #[arg(long, env = "CONSUMER_BATCH_LANES", default_value_t = 1)]
    pub consumer_batch_lanes: usize,
    /// How long a batching lane whose events come close together waits
    /// after one arrived for more to share its transaction, in
    /// microseconds (0: never waits; a quiet lane never does).
    #[arg(long, env = "CONSUMER_LINGER_US", default_value_t = 0)]
    pub consumer_linger_us: u64,
    /// Messages delivered and not yet acknowledged, at most.
    #[arg(long, env = "MAX_ACK_PENDING", default_value_t = 512)]
    pub max_ack_pending: i64,
    /// Seconds JetStream waits for an ack before redelivering. A delivery
    /// lost on its way (its node killed or cut off, a consumer leader
    /// change) comes again only after this, so it stays well below the
    /// order's deadline (`ORDER_DEADLINE_SECS`, 30), which cancels an order
    /// that makes no progress for that long. A handler slower than this
    /// costs no more than a redelivery the inbox absorbs.
    #[arg(long, env = "ACK_WAIT_SECS", default_value_t = 10)]
    pub ack_wait_secs: u64,
    /// Outbox rows the relay reads and publishes at a time; at most 1000,
    /// what nats-server takes as one atomic batch.
    #[arg(long, env = "RELAY_BATCH", default_value_t = 1000)]
    pub relay_batch: i64,
    /// Relay polling fallback when no NOTIFY arrives, in milliseconds.
    #[arg(long, env = "RELAY_POLL_MS", default_value_t = 500)]
    pub relay_poll_ms: u64,
    /// The code that commits an event publishes it at once; the relay
    /// publishes only rows still unsent this long after their commit (a
    /// crash, a broker outage), in milliseconds. 0: the relay publishes
    /// every row, woken by each insert, and nothing is published at commit.
    #[arg(long, env = "RELAY_SWEEP_AFTER_MS", default_value_t = DEFAULT_RELAY_SWEEP_AFTER_MS)]
    pub relay_sweep_after_ms: u64,
    /// How often sent outbox rows and old inbox rows are deleted, in seconds.
    #[arg(long, env = "CLEANUP_INTERVAL_SECS", default_value_t = 300)]
    pub cleanup_interval_secs: u64,
    /// Days personal data (contact addresses, message bodies) is kept after
    /// its saga ended; then the cleanup task erases it.
    #[arg(long, env = "PERSONAL_DATA_RETENTION_DAYS", default_value_t = 30)]
    pub personal_data_retention_days: u64,
    /// Serve Prometheus metrics here [default: 127.0.0.1 and the service's own metrics port].
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Bearer token of the client role (place, read, list, watch, cancel).
    #[arg(long, env = "CLIENT_TOKEN", hide_env_values = true)]
    pub client_token: Option<String>,
    /// Bearer token of the admin role (also stock changes and dead letters).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// PEM certificate (chain) the gRPC API serves TLS with; needs TLS_KEY.
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of TLS_CERT.
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Serve the gRPC API without tokens on a non-loopback address. Without
    /// this flag a service refuses to, so an open API is never an accident.
    #[arg(long, env = "INSECURE_NO_AUTH", default_value_t = false)]
    pub insecure_no_auth: bool,
    /// OTLP/gRPC endpoint to export traces to, e.g. http://127.0.0.1:4317; none means no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// After this many deliveries of an event that keeps failing, report it
    /// (a `choreo.stuck` event) while it goes on being retried.
    #[arg(long, env = "STUCK_AFTER_DELIVERIES", default_value_t = 10)]
    pub stuck_after_deliveries: u64,
    /// Chance (0 to 1) that a forward business step fails on purpose, for load and chaos runs.
    #[arg(long, env = "INJECTED_FAILURE_RATE", default_value_t = 0.0)]
    pub injected_failure_rate: f64,
    /// Log format: one line of text, or one JSON object, per event.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Defaults for everything but the two URLs and the listen address (tests, the demo).
    pub fn new(nats_url: &str, database_url: &str) -> Self {
        let mut config = Self::defaults();
        config.nats_url = nats_url.to_owned();
        config.database_url = database_url.to_owned();
        config.grpc_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config
    }

    /// Every setting at its default (the environment's variables still
    /// apply), with no database: for tools that only talk to NATS
    /// ([`defaults_of`]: no `Default` impl writing each default twice).
    pub fn defaults() -> Self {
        defaults_of(&["--database-url", ""])
    }

    /// Draws whether this step should fail on purpose (see
    /// `injected_failure_rate`); if so, the reason to give.
    pub fn injected_failure(&self) -> Option<String> {
        (self.injected_failure_rate > 0.0 && rand::random::<f64>() < self.injected_failure_rate)
            .then(|| "injected failure (configured failure rate)".to_owned())
    }

    /// The NATS login of service `service`: user and password, if a password
    /// is configured (directly or in a file).
    pub fn nats_login(&self, service: &str) -> anyhow::Result<Option<crate::runtime::NatsLogin>> {
        let password = match (&self.nats_password, &self.nats_password_file) {
            (Some(password), _) => password.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("reading NATS_PASSWORD_FILE {}: {e}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            (None, None) => return Ok(None),
        };
        Ok(Some(crate::runtime::NatsLogin {
            user: self.nats_user.clone().unwrap_or_else(|| service.to_owned()),
            password,
        }))
    }

    /// The gRPC server's TLS settings, when a certificate and key are configured.
    pub fn server_tls(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            anyhow::ensure!(
                self.tls_cert.is_none() && self.tls_key.is_none(),
                "TLS needs both TLS_CERT and TLS_KEY"
            );
            return Ok(None);
        };
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
        };
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        Ok(Some(
            tonic::transport::ServerTlsConfig::new().identity(identity),
        ))
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }

    pub fn duplicate_window(&self) -> Duration {
        Duration::from_secs(self.duplicate_window_secs)
    }

    pub fn stream_max_age(&self) -> Duration {
        Duration::from_secs(self.stream_max_age_secs)
    }

    /// The subject filter that covers every saga event.
    pub fn all_events_subject(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }
}

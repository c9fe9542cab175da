//! The whole saga as a user meets it: the harness's NATS and PostgreSQL, the
//! four real service binaries as processes, and gRPC clients to them. Used by
//! the end-to-end tests and by the demo.
pub mod bench;
pub mod browser;
pub mod chaos;
pub mod demo;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use choreo::auth::Bearer;
use contracts::inventory::v1::{
    self as inventory, inventory_service_client::InventoryServiceClient,
};
use contracts::notification::v1::{
    self as notification, notification_service_client::NotificationServiceClient,
};
use contracts::order::v1::{self as order, order_service_client::OrderServiceClient};
use contracts::shipping::v1::{self as shipping, shipping_service_client::ShippingServiceClient};
use harness::{Infra, Proxy, ServiceProcess, free_port};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A connection to one service that sends the configured token, if any.
pub type Conn = InterceptedService<Channel, Bearer>;

pub use order::OrderStatus;

/// The four services, in saga order.
pub const SERVICES: [&str; 4] = ["order", "inventory", "shipping", "notification"];

/// How long a test waits for an order to settle before it calls it stuck.
pub const SETTLE: Duration = Duration::from_secs(60);

/// Starts the whole system for a test (panics if it cannot).
pub async fn system(options: Options) -> System {
    System::start(options).await.expect("system starts")
}

/// Runs `work` (a command that starts a [`System`]) until it ends or
/// Ctrl-C / SIGTERM arrives; then drops it, and with it its system, so the
/// servers it started stop too. PostgreSQL runs in a session of its own
/// (`pg_ctl`) and would outlive a process that just died.
pub async fn until_signal<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(choreo::runtime::cancel_on_signal(stop.clone()));
    tokio::select! {
        result = work => result,
        _ = stop.cancelled() => anyhow::bail!("interrupted; the servers it started are stopped"),
    }
}

/// A fresh idempotency key.
pub fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Knobs a test or the demo may turn.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds an open order may stall before the order service cancels it.
    pub order_deadline_secs: u64,
    /// Chance that a forward step fails on purpose (inventory, shipping, notification).
    pub injected_failure_rate: f64,
    /// Log level of the services (RUST_LOG).
    pub log: String,
    /// Listen on the services' well-known ports (50051..50054), as sagactl expects,
    /// instead of free ones.
    pub well_known_ports: bool,
    /// Put a [`Proxy`] between each service and NATS and PostgreSQL, so the
    /// network between them can be cut, stalled or delayed.
    pub proxies: bool,
    /// Export traces to this OTLP/gRPC endpoint.
    pub otlp_endpoint: Option<String>,
    /// More environment for every service, e.g. ("STUCK_AFTER_DELIVERIES", "2").
    pub extra_env: Vec<(String, String)>,
    /// Run our own NATS with fsync before ack turned off (benchmarks that
    /// measure its cost only; the shipped configuration fsyncs).
    pub relaxed_fsync: bool,
    /// Serve the gRPC APIs over TLS, with a certificate the harness makes
    /// for 127.0.0.1 and localhost (its own authority); the clients trust it.
    pub tls: bool,
    /// Run our own PostgreSQL with `fsync` and `synchronous_commit` on (the
    /// benchmark; tests run without, on throwaway folders).
    pub durable_postgres: bool,
    /// More settings for that PostgreSQL (`-c name=value ...`); only with
    /// `durable_postgres`, the one server of our own it always starts.
    pub postgres_settings: String,
    /// Leave the services' polling intervals at their shipped defaults
    /// instead of the tests' shorter ones (the benchmark).
    pub shipped_intervals: bool,
    /// Run NATS as a 3-node JetStream cluster (streams with three replicas,
    /// the services given every node's URL) instead of one server.
    pub cluster: bool,
    /// The folder of the build whose services run (`None`: this build's,
    /// [`harness::bin_dir`]): the benchmark sets two builds side by side.
    pub bin_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            order_deadline_secs: 60,
            injected_failure_rate: 0.0,
            log: "info".into(),
            well_known_ports: false,
            proxies: false,
            otlp_endpoint: None,
            extra_env: Vec::new(),
            relaxed_fsync: false,
            tls: false,
            durable_postgres: false,
            postgres_settings: String::new(),
            shipped_intervals: false,
            cluster: false,
            bin_dir: None,
        }
    }
}

#[derive(Clone)]
pub struct Clients {
    pub order: OrderServiceClient<Conn>,
    pub inventory: InventoryServiceClient<Conn>,
    pub shipping: ShippingServiceClient<Conn>,
    pub notification: NotificationServiceClient<Conn>,
}

pub struct System {
    pub infra: Infra,
    /// Service logs, kept after the run (printed when a test fails).
    pub logs: PathBuf,
    pub processes: Vec<ServiceProcess>,
    /// More instances of the services, started by [`System::scale_to`]; they
    /// run until the system is dropped or scaled back.
    pub extra_instances: Vec<ServiceProcess>,
    pub ports: Vec<u16>,
    /// What this run's JetStream streams are named after (STREAM): see
    /// [`System::stream_names`].
    pub stream: String,
    /// Subject prefix of this run (SUBJECT_PREFIX): an event goes to `<prefix>.<event type>`.
    pub subject_prefix: String,
    /// Prometheus port of each service, in [`SERVICES`] order.
    pub metrics_ports: Vec<u16>,
    pub clients: Clients,
    /// Per service, in [`SERVICES`] order: (proxy to NATS, proxy to PostgreSQL).
    pub proxies: Vec<(Proxy, Proxy)>,
    /// Database URL of each service, in [`SERVICES`] order.
    pub databases: Vec<String>,
    /// The certificate the services serve TLS with (PEM), when [`Options::tls`] asked for it.
    pub tls_ca: Option<Vec<u8>>,
    /// The 3-node NATS cluster, when [`Options::cluster`] asked for one
    /// (then `infra.nats` names it by URL and cannot be killed as one).
    pub cluster: Option<harness::NatsCluster>,
    /// The services' client and admin tokens, when [`Options::extra_env`] set them.
    pub tokens: (Option<String>, Option<String>),
    /// The folder of the build whose binaries run ([`Options::bin_dir`]).
    pub bin_dir: PathBuf,
}

/// The saga console, running as its own process against a [`System`].
pub struct Console {
    pub process: ServiceProcess,
    /// Where a browser opens it, e.g. `http://127.0.0.1:8080`.
    pub url: String,
}

/// The body of `GET path` on a loopback HTTP/1 server, which must answer 200.
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.split(' ').nth(1) == Some("200"),
        "GET {path} answered {}",
        head.lines().next().unwrap_or("nothing")
    );
    Ok(body.to_owned())
}

/// A client of the system's NATS (one server, or any node of the cluster).
async fn nats_client(url: &str) -> anyhow::Result<async_nats::Client> {
    choreo::runtime::connect_once(url, "e2e", None).await
}

/// A service's gRPC URL on loopback: `https` when it serves TLS.
fn grpc_url(tls: bool, port: u16) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://127.0.0.1:{port}")
}

async fn channel(addr: &str, ca: Option<&[u8]>, timeout: Duration) -> anyhow::Result<Channel> {
    let endpoint = choreo::grpc::endpoint(addr, ca)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(20));
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let check = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if check.is_ok() {
                return Ok(channel);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no healthy gRPC server at {addr} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl System {
    /// The names of this run's streams: one per producing service and one
    /// for the stuck reports ([`choreo::provision::streams`]).
    pub fn stream_names(&self) -> Vec<String> {
        choreo::provision::streams(&contracts::CHOREOGRAPHY, &self.stream, &self.subject_prefix)
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    /// Messages in all of this run's streams now.
    pub async fn stream_messages(&self) -> anyhow::Result<u64> {
        let js = async_nats::jetstream::new(nats_client(self.infra.nats.url()).await?);
        let mut messages = 0;
        for name in self.stream_names() {
            messages += js.get_stream(&name).await?.info().await?.state.messages;
        }
        Ok(messages)
    }

    /// Deliveries and acks of each service's durable consumers so far
    /// (summed over the streams it reads), in [`SERVICES`] order:
    /// (deliveries, acks), redeliveries included.
    pub async fn consumer_counts(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        let js = async_nats::jetstream::new(nats_client(self.infra.nats.url()).await?);
        let mut counts = Vec::new();
        for service in SERVICES {
            let (mut delivered, mut acked) = (0, 0);
            for (spec, _) in choreo::provision::sources_of(
                &contracts::CHOREOGRAPHY,
                service,
                &self.stream,
                &self.subject_prefix,
            ) {
                let info = js
                    .get_stream(&spec.name)
                    .await?
                    .consumer_info(service)
                    .await?;
                delivered += info.delivered.consumer_sequence;
                acked += info.ack_floor.consumer_sequence;
            }
            counts.push((delivered, acked));
        }
        Ok(counts)
    }

    /// Publishes raw bytes to `<prefix>.<subject_suffix>` as an outsider
    /// would, with a fresh message id, and waits for the PubAck.
    pub async fn publish_raw(&self, subject_suffix: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let client = nats_client(self.infra.nats.url()).await?;
        async_nats::jetstream::new(client)
            .send_publish(
                format!("{}.{subject_suffix}", self.subject_prefix),
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(bytes.into())
                    .message_id(uuid::Uuid::new_v4().to_string()),
            )
            .await?
            .await?;
        Ok(())
    }

    /// What service `name` has parked, over its `choreo.v1.DeadLetters` API.
    pub async fn dead_letters(&self, name: &str) -> anyhow::Result<Vec<choreo::proto::DeadLetter>> {
        let i = SERVICES
            .iter()
            .position(|s| *s == name)
            .ok_or_else(|| anyhow::anyhow!("no service {name:?}"))?;
        let channel = channel(
            &self.grpc_url(i),
            self.tls_ca.as_deref(),
            Duration::from_secs(10),
        )
        .await?;
        let listed = choreo::proto::dead_letters_client::DeadLettersClient::new(channel)
            .list_dead_letters(choreo::proto::ListDeadLettersRequest { limit: 1000 })
            .await?
            .into_inner();
        Ok(listed.dead_letters)
    }

    /// Message `seq` of the stream of `producer`'s events as it is stored
    /// (subject and raw bytes).
    pub async fn stream_message(
        &self,
        producer: &str,
        seq: u64,
    ) -> anyhow::Result<async_nats::jetstream::message::StreamMessage> {
        let client = nats_client(self.infra.nats.url()).await?;
        let message = async_nats::jetstream::new(client)
            .get_stream(choreo::provision::stream_name(&self.stream, producer))
            .await?
            .get_raw_message(seq)
            .await?;
        Ok(message)
    }

    /// Starts NATS, PostgreSQL and the four services, and waits until each answers health checks.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        // Network faults and kills need servers of our own.
        let (infra, cluster) = if options.cluster {
            let cluster = harness::NatsCluster::start().await?;
            cluster.wait_for_jetstream(Duration::from_secs(60)).await?;
            let postgres = tokio::task::spawn_blocking(harness::Postgres::start_own).await??;
            let infra = Infra {
                nats: harness::Nats::external(&cluster.url()),
                postgres,
            };
            (infra, Some(cluster))
        } else if options.relaxed_fsync || options.durable_postgres {
            let nats = if options.relaxed_fsync {
                let config = harness::relaxed_nats_fsync_config();
                tokio::task::spawn_blocking(move || harness::Nats::start_own_with_config(config))
                    .await??
            } else {
                tokio::task::spawn_blocking(harness::Nats::start_own).await??
            };
            let postgres = if options.durable_postgres {
                let settings = options.postgres_settings.clone();
                tokio::task::spawn_blocking(move || {
                    harness::Postgres::start_own_durable_with(&settings)
                })
                .await??
            } else {
                tokio::task::spawn_blocking(harness::Postgres::start).await??
            };
            (Infra { nats, postgres }, None)
        } else if options.proxies {
            (tokio::task::spawn_blocking(Infra::start_own).await??, None)
        } else {
            (tokio::task::spawn_blocking(Infra::start).await??, None)
        };
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let logs = std::env::temp_dir().join("saga-e2e").join(&run);
        std::fs::create_dir_all(&logs)?;
        let tls_ca = if options.tls {
            let made = rcgen::generate_simple_self_signed(vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
            ])?;
            std::fs::write(logs.join("tls-cert.pem"), made.cert.pem())?;
            std::fs::write(logs.join("tls-key.pem"), made.signing_key.serialize_pem())?;
            Some(made.cert.pem().into_bytes())
        } else {
            None
        };
        let bin_dir = options.bin_dir.clone().unwrap_or_else(harness::bin_dir);
        let mut processes = Vec::new();
        let mut ports = Vec::new();
        let mut databases = Vec::new();
        let mut proxies = Vec::new();
        let mut metrics_ports = Vec::new();
        if infra.postgres.is_own() {
            infra.postgres.run_init_script().await?;
        }
        // Our own NATS enforces deploy/nats.conf's users: the services log in
        // as themselves, with the names that file grants (the defaults), and
        // the setup step provisions as the admin, as in docker-compose. A
        // shared server (NATS_URL) gets names of this run, and each service
        // provisions its own consumer.
        let own_nats = options.cluster || infra.nats.is_own();
        let defaults = choreo::Config::defaults();
        let (stream, subject_prefix) = if own_nats {
            (defaults.stream.clone(), defaults.subject_prefix.clone())
        } else {
            (format!("SAGA_{run}"), format!("saga_{run}"))
        };
        let service_nats_url = match &cluster {
            Some(cluster) => cluster.client_url(),
            None => infra.nats.client_url(),
        };
        if own_nats {
            let mut setup = choreo::Config::new(infra.nats.url(), "");
            setup.stream = stream.clone();
            setup.subject_prefix = subject_prefix.clone();
            if options.cluster {
                setup.stream_replicas = 3;
            }
            choreo::provision::setup(&setup, &contracts::CHOREOGRAPHY).await?;
        }
        for (i, name) in SERVICES.into_iter().enumerate() {
            // On our own cluster the databases are the ones deploy/postgres-init.sql
            // makes (as in docker-compose); on a shared server, names of this run.
            let db_name = if infra.postgres.is_own() {
                name.to_owned()
            } else {
                format!("{name}_{run}")
            };
            let database = infra.postgres.create_database(&db_name).await?;
            let port = if options.well_known_ports {
                50051 + i as u16
            } else {
                free_port()
            };
            let (nats_url, database_url) = if options.proxies && !options.cluster {
                let nats = Proxy::start(infra.nats.port()).await?;
                let pg = Proxy::start(infra.postgres.port()).await?;
                let urls = (
                    format!("nats://127.0.0.1:{}", nats.port()),
                    format!(
                        "postgres://{name}:{}@127.0.0.1:{}/{db_name}",
                        harness::password(name),
                        pg.port()
                    ),
                );
                proxies.push((nats, pg));
                urls
            } else if infra.postgres.is_own() {
                // As its own role, which may connect to its own database only.
                (
                    service_nats_url.clone(),
                    infra.postgres.database_url_as(name, &db_name),
                )
            } else {
                (service_nats_url.clone(), database.clone())
            };
            let env = vec![
                ("NATS_URL", nats_url),
                ("DATABASE_URL", database_url),
                ("GRPC_ADDR", format!("127.0.0.1:{port}")),
                ("STREAM", stream.clone()),
                ("SUBJECT_PREFIX", subject_prefix.clone()),
                (
                    "ORDER_DEADLINE_SECS",
                    options.order_deadline_secs.to_string(),
                ),
                (
                    "INJECTED_FAILURE_RATE",
                    options.injected_failure_rate.to_string(),
                ),
                ("RUST_LOG", options.log.clone()),
            ];
            let metrics_port = free_port();
            metrics_ports.push(metrics_port);
            let mut env: Vec<(String, String)> =
                env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            env.push(("METRICS_ADDR".into(), format!("127.0.0.1:{metrics_port}")));
            if options.cluster {
                env.push(("STREAM_REPLICAS".into(), "3".into()));
            }
            if own_nats {
                env.push(("NATS_USER".into(), name.to_owned()));
                env.push(("NATS_PASSWORD".into(), harness::password(name)));
            } else {
                env.push(("PROVISION_JETSTREAM".into(), "true".into()));
            }
            if !options.shipped_intervals {
                env.push(("RELAY_POLL_MS".into(), "200".into()));
                env.push(("DEADLINE_CHECK_MS".into(), "250".into()));
            }
            if tls_ca.is_some() {
                env.push((
                    "TLS_CERT".into(),
                    logs.join("tls-cert.pem").display().to_string(),
                ));
                env.push((
                    "TLS_KEY".into(),
                    logs.join("tls-key.pem").display().to_string(),
                ));
            }
            env.extend(options.extra_env.iter().cloned());
            if let Some(endpoint) = &options.otlp_endpoint {
                env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()));
                env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()));
            }
            processes.push(ServiceProcess::start_in(
                &bin_dir,
                name,
                env,
                logs.join(format!("{name}.log")),
            )?);
            ports.push(port);
            databases.push(database);
        }
        let url = |port: u16| grpc_url(tls_ca.is_some(), port);
        let token = |name: &str| {
            options
                .extra_env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let tokens = (token("CLIENT_TOKEN"), token("ADMIN_TOKEN"));
        // With tokens configured, the harness acts as the operator.
        let clients = Clients::connect(
            &url(ports[0]),
            &url(ports[1]),
            &url(ports[2]),
            &url(ports[3]),
            tokens.1.as_deref(),
            tls_ca.as_deref(),
            Duration::from_secs(60),
        )
        .await?;
        Ok(System {
            infra,
            logs,
            processes,
            extra_instances: Vec::new(),
            ports,
            metrics_ports,
            stream,
            subject_prefix,
            clients,
            databases,
            proxies,
            tls_ca,
            cluster,
            tokens,
            bin_dir,
        })
    }

    /// Starts the console on `port` (0: a free one) against this system's
    /// services, with their tokens, and waits until it answers.
    pub async fn console(&self, port: u16) -> anyhow::Result<Console> {
        let port = if port == 0 { free_port() } else { port };
        let mut env = vec![
            ("CONSOLE_ADDR".to_owned(), format!("127.0.0.1:{port}")),
            ("HEALTH_SAMPLE_SECS".to_owned(), "1".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        for (i, name) in SERVICES.iter().enumerate() {
            let upper = name.to_uppercase();
            env.push((format!("{upper}_ADDR"), self.grpc_url(i)));
            env.push((
                format!("{upper}_METRICS_URL"),
                format!("http://127.0.0.1:{}/metrics", self.metrics_ports[i]),
            ));
        }
        if let Some(token) = &self.tokens.0 {
            env.push(("CLIENT_TOKEN".into(), token.clone()));
        }
        if let Some(token) = &self.tokens.1 {
            env.push(("ADMIN_TOKEN".into(), token.clone()));
        }
        if self.tls_ca.is_some() {
            env.push((
                "SAGA_CA_CERT".into(),
                self.logs.join("tls-cert.pem").display().to_string(),
            ));
        }
        let process =
            ServiceProcess::start_in(&self.bin_dir, "console", env, self.logs.join("console.log"))?;
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = http_get(port, "/healthz").await {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the console did not answer within 30 s: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Console { process, url })
    }

    /// The gRPC URL of service `i` (in [`SERVICES`] order).
    pub fn grpc_url(&self, i: usize) -> String {
        grpc_url(self.tls_ca.is_some(), self.ports[i])
    }

    /// The process of service `name`, to kill or restart.
    pub fn service(&mut self, name: &str) -> &mut ServiceProcess {
        self.processes
            .iter_mut()
            .find(|p| p.name() == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// Starts a second instance of service `name` beside the first (same
    /// database, same durable consumer), on a free gRPC port.
    pub fn twin(&self, name: &str) -> anyhow::Result<ServiceProcess> {
        let first = self
            .processes
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| anyhow::anyhow!("no service {name}"))?;
        // Each instance its own log: `name-twin-1.log`, `name-twin-2.log`...
        let log = (1..)
            .map(|n| self.logs.join(format!("{name}-twin-{n}.log")))
            .find(|log| !log.exists())
            .expect("an unused log name");
        first.twin(
            &[
                ("GRPC_ADDR", format!("127.0.0.1:{}", free_port())),
                ("METRICS_ADDR", format!("127.0.0.1:{}", free_port())),
            ],
            log,
        )
    }

    /// Runs `instances` instances of every service: starts [`System::twin`]s
    /// beside the first ones (or stops the extra ones, for 1).
    pub fn scale_to(&mut self, instances: usize) -> anyhow::Result<()> {
        self.extra_instances.clear();
        for _ in 1..instances {
            for service in SERVICES {
                let twin = self.twin(service)?;
                self.extra_instances.push(twin);
            }
        }
        Ok(())
    }

    /// The Prometheus text of service `name`'s metrics endpoint.
    pub async fn metrics(&self, name: &str) -> anyhow::Result<String> {
        let i = SERVICES
            .iter()
            .position(|s| *s == name)
            .ok_or_else(|| anyhow::anyhow!("no service {name}"))?;
        http_get(self.metrics_ports[i], "/metrics").await
    }

    /// Where a service writes its log.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}

impl Clients {
    /// Connects to running services (e.g. the docker-compose ones), waiting until each is healthy.
    pub async fn connect(
        order: &str,
        inventory: &str,
        shipping: &str,
        notification: &str,
        token: Option<&str>,
        ca: Option<&[u8]>,
        wait: Duration,
    ) -> anyhow::Result<Self> {
        let bearer = Bearer::new(token)?;
        let conn = |channel| InterceptedService::new(channel, bearer.clone());
        Ok(Clients {
            order: OrderServiceClient::new(conn(channel(order, ca, wait).await?)),
            inventory: InventoryServiceClient::new(conn(channel(inventory, ca, wait).await?)),
            shipping: ShippingServiceClient::new(conn(channel(shipping, ca, wait).await?)),
            notification: NotificationServiceClient::new(conn(
                channel(notification, ca, wait).await?,
            )),
        })
    }

    pub async fn set_stock(&self, sku: &str, available: u64) -> anyhow::Result<()> {
        self.inventory
            .clone()
            .set_stock(inventory::SetStockRequest {
                sku: sku.into(),
                available,
            })
            .await?;
        Ok(())
    }

    pub async fn stock(&self, sku: &str) -> anyhow::Result<inventory::Stock> {
        Ok(self
            .inventory
            .clone()
            .get_stock(inventory::GetStockRequest { sku: sku.into() })
            .await?
            .into_inner())
    }

    /// One unit of `sku` for ada, to DE, with a fresh idempotency key: the
    /// plain order a test needs when the order itself is not the point.
    pub async fn place_one(&self, sku: &str) -> anyhow::Result<order::Order> {
        self.place(order_request(
            &new_key(),
            "ada",
            "DE",
            "ada@example.com",
            &[(sku, 1)],
        ))
        .await
    }

    pub async fn place(&self, request: order::PlaceOrderRequest) -> anyhow::Result<order::Order> {
        let response = self.order.clone().place_order(request).await?.into_inner();
        response
            .order
            .ok_or_else(|| anyhow::anyhow!("PlaceOrder answered without an order"))
    }

    pub async fn get(&self, order_id: &str) -> anyhow::Result<order::Order> {
        Ok(self
            .order
            .clone()
            .get_order(order::GetOrderRequest {
                order_id: order_id.into(),
            })
            .await?
            .into_inner())
    }

    /// Polls the order until its status is one of `wanted`.
    pub async fn wait_for(
        &self,
        order_id: &str,
        wanted: &[OrderStatus],
        timeout: Duration,
    ) -> anyhow::Result<order::Order> {
        let deadline = Instant::now() + timeout;
        loop {
            let order = self.get(order_id).await;
            if let Ok(order) = &order
                && wanted.contains(&order.status())
            {
                return Ok(order.clone());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "order {order_id} did not reach {wanted:?} within {timeout:?}; last seen {:?}",
                    order.map(|o| (o.status(), o.reason))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the order is COMPLETED or CANCELLED.
    pub async fn wait_terminal(
        &self,
        order_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<order::Order> {
        self.wait_for(
            order_id,
            &[OrderStatus::Completed, OrderStatus::Cancelled],
            timeout,
        )
        .await
    }

    pub async fn reservation(
        &self,
        order_id: &str,
    ) -> Result<inventory::Reservation, tonic::Status> {
        self.inventory
            .clone()
            .get_reservation(inventory::GetReservationRequest {
                order_id: order_id.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn shipment(&self, order_id: &str) -> Result<shipping::Shipment, tonic::Status> {
        self.shipping
            .clone()
            .get_shipment(shipping::GetShipmentRequest {
                order_id: order_id.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn notifications(
        &self,
        order_id: &str,
    ) -> anyhow::Result<notification::ListNotificationsResponse> {
        Ok(self
            .notification
            .clone()
            .list_notifications(notification::ListNotificationsRequest {
                order_id: order_id.into(),
            })
            .await?
            .into_inner())
    }

    /// The notifications of an order once none is waiting to be sent (a
    /// cancellation notice can still be queued when the order has ended).
    pub async fn settled_notifications(
        &self,
        order_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<notification::ListNotificationsResponse> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notes = self.notifications(order_id).await?;
            let pending = notes
                .notifications
                .iter()
                .any(|n| n.status() == notification::NotificationStatus::Pending);
            if !pending {
                return Ok(notes);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "order {order_id}: notifications still pending after {timeout:?}: {notes:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A place-order request with one line per `(sku, quantity)`.
pub fn order_request(
    key: &str,
    customer: &str,
    destination: &str,
    contact: &str,
    items: &[(&str, u32)],
) -> order::PlaceOrderRequest {
    order::PlaceOrderRequest {
        customer: customer.into(),
        destination: destination.into(),
        items: items
            .iter()
            .map(|(sku, quantity)| order::OrderItem {
                sku: (*sku).into(),
                quantity: *quantity,
            })
            .collect(),
        idempotency_key: key.into(),
        contact: contact.into(),
    }
}

/// The client helpers of [`Clients`] work on a [`System`] directly.
impl std::ops::Deref for System {
    type Target = Clients;

    fn deref(&self) -> &Clients {
        &self.clients
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "service logs of this run are kept in {}",
                self.logs.display()
            );
        }
    }
}

/// The event types on an order's timeline, in order.
pub fn timeline(order: &order::Order) -> Vec<&str> {
    order
        .timeline
        .iter()
        .map(|e| e.event_type.as_str())
        .collect()
}

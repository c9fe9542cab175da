//! Wires one service: database and migrations, NATS and provisioning, the
//! relay, the consumer, the cleanup task and the gRPC server, all stopped
//! by one shutdown token. A service's `main` builds a [`Service`] and hands it
//! its handler and API; nothing else.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;

use crate::choreography::Choreography;
use crate::config::Config;
use crate::consumer::Consumer;
use crate::handler::Handler;
use crate::outbox::Outbox;
use crate::relay::Relay;
use crate::{cleanup, db, grpc, provision};

/// Connections the gRPC API may hold at once (its own pool).
const API_POOL_SIZE: u32 = 10;
/// How long the marker gathers published ids before one UPDATE marks them
/// sent: long enough that one UPDATE carries many rows at load (fewer
/// transactions per saga), far below the relay's sweep delay
/// (`RELAY_SWEEP_AFTER_MS`, 2 s; a quarter of it when that is shorter), so
/// the relay does not republish rows the marker is about to mark.
const MARK_LINGER: Duration = Duration::from_millis(200);

/// What a service hands the runtime once its database is ready.
pub struct Parts<H> {
    /// Reacts to consumed events.
    pub handler: Arc<H>,
    /// The service's gRPC API.
    pub routes: Routes,
    /// Fully qualified gRPC service names, reported SERVING by health.
    pub service_names: Vec<&'static str>,
    /// Encoded descriptor set of the API, served by reflection.
    pub descriptor: &'static [u8],
    /// Full paths (`/package.Service/Method`) only the admin token may call.
    pub admin_methods: Vec<&'static str>,
    /// How the service erases personal data past its retention (none if it keeps none).
    pub erasures: Vec<crate::cleanup::Erasure>,
}

/// What a service's builder may use: its database, its outbox, its settings,
/// and a place to run background tasks that stop with the service.
#[derive(Clone)]
pub struct Context {
    /// For the consumer, the relay and background tasks.
    pub pool: PgPool,
    /// For the gRPC API: a pool of its own, so requests can never take the
    /// connections the saga's own work needs.
    pub api_pool: PgPool,
    pub outbox: Outbox,
    pub config: Config,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

pub struct Service {
    name: &'static str,
    choreography: &'static Choreography,
    ports: Ports,
    config: Config,
    migrator: Migrator,
}

/// A service's own ports on 127.0.0.1, used unless `GRPC_ADDR` / `METRICS_ADDR` say otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub grpc: u16,
    pub metrics: u16,
}

impl Service {
    /// `name` is the service's name in `choreography` (what it consumes and
    /// produces), the producer name in envelopes and the durable consumer
    /// name; `ports` are where it listens unless configured otherwise.
    pub fn new(
        name: &'static str,
        choreography: &'static Choreography,
        ports: Ports,
        config: Config,
        migrator: Migrator,
    ) -> Self {
        Service {
            name,
            choreography,
            ports,
            config,
            migrator,
        }
    }

    /// Runs until SIGINT or SIGTERM.
    pub async fn run<F, H>(self, build: F) -> anyhow::Result<()>
    where
        F: FnOnce(&Context) -> Parts<H>,
        H: Handler,
    {
        let telemetry = crate::telemetry::init(
            self.config.log_format,
            self.name,
            self.config.otlp_endpoint.as_deref(),
        );
        let metrics_addr = self
            .config
            .metrics_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.ports.metrics)));
        crate::telemetry::serve_metrics(metrics_addr)?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let result = self.run_until(build, shutdown).await;
        telemetry.shutdown();
        result
    }

    /// Runs until `shutdown` is cancelled, then stops taking work, finishes
    /// in-flight handlers and publishes, drains NATS and closes the pool.
    pub async fn run_until<F, H>(self, build: F, shutdown: CancellationToken) -> anyhow::Result<()>
    where
        F: FnOnce(&Context) -> Parts<H>,
        H: Handler,
    {
        let config = self.config;
        let grpc_addr = config
            .grpc_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.ports.grpc)));
        let tokens = config.client_token.is_some() || config.admin_token.is_some();
        anyhow::ensure!(
            tokens || grpc_addr.ip().is_loopback() || config.insecure_no_auth,
            "refusing to serve the gRPC API on {grpc_addr} without tokens: set CLIENT_TOKEN and ADMIN_TOKEN, \
             listen on loopback, or pass --insecure-no-auth (INSECURE_NO_AUTH=true) to run it open on purpose"
        );
        let tls = config.server_tls()?;
        if tls.is_none() && !grpc_addr.ip().is_loopback() {
            tracing::warn!(
                %grpc_addr,
                "serving the gRPC API without TLS off loopback: tokens and customer data cross the network in clear; \
                 set TLS_CERT and TLS_KEY unless a trusted network or a TLS proxy carries it"
            );
        }
        let pool = db::open(
            &config.database_url,
            Duration::from_secs(60),
            &self.migrator,
        )
        .await?;
        let api_pool =
            db::connect_sized(&config.database_url, Duration::from_secs(60), API_POOL_SIZE).await?;

        let login = config.nats_login(self.name)?;
        let (client, js) = connect_nats(&config.nats_url, self.name, login.as_ref()).await?;
        let subscription = self.choreography.subscription(self.name);
        if config.provision_jetstream
            && retry_until(&shutdown, "provisioning JetStream", || {
                provision::ensure_streams(&js, &config, self.choreography, self.name)
            })
            .await
            .is_none()
        {
            return Ok(());
        }
        let sources = provision::ConsumerSource::all_of(&js, &config, self.choreography, self.name);
        for source in &sources {
            if retry_until(&shutdown, "finding the durable consumers", || source.get())
                .await
                .is_none()
            {
                return Ok(());
            }
        }

        let tasks = TaskTracker::new();
        let mut outbox = Outbox::new(self.name, &config.subject_prefix);
        let sweep_after = Duration::from_millis(config.relay_sweep_after_ms);
        if !sweep_after.is_zero() {
            let (marks, acked) = tokio::sync::mpsc::unbounded_channel();
            tasks.spawn(crate::relay::mark_sent_in_batches(
                pool.clone(),
                acked,
                MARK_LINGER.min(sweep_after / 4),
                shutdown.clone(),
            ));
            outbox = outbox.publishing_through(crate::relay::Publisher::new(
                js.clone(),
                marks,
                sweep_after,
            ));
        }
        let context = Context {
            pool: pool.clone(),
            api_pool: api_pool.clone(),
            outbox,
            config: config.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        };
        let parts = build(&context);

        let relay = Relay::new(
            pool.clone(),
            js.clone(),
            config.relay_batch,
            Duration::from_millis(config.relay_poll_ms),
        )
        .sweeping_after(sweep_after);
        let leadership = relay.leadership();
        tasks.spawn(relay.run(shutdown.clone()));
        // Every service also serves its dead letters, replayed through its own handler.
        let dead_letters =
            crate::dead_letters::DeadLettersServer::new(crate::dead_letters::DeadLetterApi {
                pool: api_pool.clone(),
                handler: parts.handler.clone(),
            });
        let routes = parts.routes.add_service(dead_letters);
        let mut service_names = parts.service_names;
        service_names.push(crate::dead_letters::SERVICE_NAME);
        let consumer_loop = Consumer::new(
            pool.clone(),
            parts.handler,
            subscription,
            config.consumer_lanes,
        )
        .batching(config.consumer_batch, config.consumer_batch_lanes)
        .lingering(Duration::from_micros(config.consumer_linger_us))
        .report_stuck(context.outbox.clone(), config.stuck_after_deliveries)
        .preferred_while(leadership);
        tasks.spawn(consumer_loop.run(sources, shutdown.clone()));
        tasks.spawn(crate::relay::sample_backlog(
            pool.clone(),
            Duration::from_secs(2),
            shutdown.clone(),
        ));
        tasks.spawn(cleanup::run(
            pool.clone(),
            cleanup::Retention::derive(&config),
            parts.erasures.clone(),
            Duration::from_secs(config.cleanup_interval_secs),
            shutdown.clone(),
        ));
        tracing::info!(service = self.name, "started");

        let mut admin_paths: std::collections::HashSet<String> = parts
            .admin_methods
            .iter()
            .map(|p| (*p).to_owned())
            .collect();
        admin_paths.extend(
            ["ListDeadLetters", "ReplayDeadLetter", "GetDeadLetter"]
                .map(|m| format!("/{}/{m}", crate::dead_letters::SERVICE_NAME)),
        );
        let policy = crate::auth::Policy {
            client_token: config.client_token.clone(),
            admin_token: config.admin_token.clone(),
            admin_paths,
        };
        let served = grpc::serve(
            grpc_addr,
            routes,
            &service_names,
            &[parts.descriptor, crate::DESCRIPTOR_SET],
            policy,
            tls,
            shutdown.clone(),
        )
        .await;
        // Whether the server stopped by request or by error, stop everything.
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        if let Err(e) = client.drain().await {
            tracing::warn!(error = %e, "draining NATS failed");
        }
        pool.close().await;
        api_pool.close().await;
        tracing::info!(service = self.name, "stopped");
        served
    }
}

/// A NATS user and its password.
#[derive(Clone)]
pub struct NatsLogin {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for NatsLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NatsLogin {{ user: {:?}, password: <hidden> }}",
            self.user
        )
    }
}

/// The prefix of user `user`'s reply subjects. Each user has its own, and
/// may subscribe only below it (deploy/nats.conf), so no user can read the
/// replies another gets: PubAcks, JetStream API answers, pulled messages.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// `url`'s servers (comma-separated) without logins, and the login the
/// first of them carries (`nats://user:password@host:port`), if any: the
/// NATS client library does not read logins from URLs itself.
pub fn split_login(url: &str) -> (Vec<String>, Option<NatsLogin>) {
    let mut login = None;
    let servers = url
        .split(',')
        .map(str::trim)
        .map(|server| {
            let (scheme, rest) = server.split_once("://").unwrap_or(("nats", server));
            match rest.rsplit_once('@') {
                Some((userinfo, host)) => {
                    if login.is_none() {
                        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                        login = Some(NatsLogin {
                            user: user.to_owned(),
                            password: password.to_owned(),
                        });
                    }
                    format!("{scheme}://{host}")
                }
                None => server.to_owned(),
            }
        })
        .collect();
    (servers, login)
}

/// Connect options for `login` (or the one in `url`), with the login's own
/// reply prefix; and the servers to dial.
fn options_for(
    url: &str,
    name: &str,
    login: Option<&NatsLogin>,
) -> (async_nats::ConnectOptions, Vec<String>) {
    let (servers, in_url) = split_login(url);
    let mut options = async_nats::ConnectOptions::new().name(name);
    if let Some(login) = login.or(in_url.as_ref()) {
        options = options
            .user_and_password(login.user.clone(), login.password.clone())
            .custom_inbox_prefix(inbox_prefix(&login.user));
    }
    (options, servers)
}

/// A NATS client that keeps reconnecting for ever (the broker may be down at
/// start or restart at any time), to a server of its pool picked as
/// [`pick_server`] says, and a JetStream context with a bounded PubAck wait.
/// `url` may list several servers of a cluster, comma-separated; it may
/// also carry a user and password (`nats://user:password@host`), or `login` does.
pub async fn connect_nats(
    url: &str,
    name: &str,
    login: Option<&NatsLogin>,
) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
    let (options, servers) = options_for(url, name, login);
    let last_dialled = Arc::new(std::sync::Mutex::new(None));
    let client = options
        .reconnect_to_server_callback(move |servers, left| {
            let last_dialled = last_dialled.clone();
            async move {
                let mut last = last_dialled.lock().unwrap_or_else(|e| e.into_inner());
                pick_server(&servers, &left, &mut last)
            }
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                other => tracing::warn!(event = %other, "NATS connection"),
            }
        })
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .connect(servers)
        .await?;
    let js = jetstream::ContextBuilder::new()
        .ack_timeout(Duration::from_secs(5))
        .build(client.clone());
    Ok((client, js))
}

/// The least time between two moves of a process's NATS connection to
/// another node ([`move_to_another_node`]).
const MOVE_EVERY: Duration = Duration::from_secs(10);

/// Has `client` reconnect, to whichever server of its pool its reconnect
/// picks, when it is connected and its pool (the servers it was given and
/// those the cluster told it of) holds another: for a node cut off from the
/// rest of its cluster. Such a node keeps its clients but has no JetStream
/// leader to take their requests, so every pull and publish through it
/// reaches nobody until the cut heals, while the other nodes serve. The
/// reconnect picks another node than this one ([`pick_server`]); the
/// caller may ask again while the trouble lasts, at most once every
/// [`MOVE_EVERY`] a process. Whether it asked. `by` says who asks, as the
/// log line and `saga_nats_node_moves_total{by}` say it: `pull`, a pull
/// loop whose pulls have reached nobody twice in a row ([`crate::consumer`]),
/// or `relay`, the leading relay whose publishes have failed for
/// [`crate::relay::MOVE_AFTER_FAILING`].
pub async fn move_to_another_node(client: &async_nats::Client, by: &'static str) -> bool {
    if client.connection_state() != async_nats::connection::State::Connected {
        return false;
    }
    match client.server_pool().await {
        Ok(pool) if pool.len() > 1 => {}
        _ => return false,
    }
    let node = client.server_info().server_name;
    {
        let mut last = LAST_MOVE.lock().unwrap_or_else(|e| e.into_inner());
        if last
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < MOVE_EVERY)
        {
            return false;
        }
        *last = Some((node.clone(), std::time::Instant::now()));
    }
    tracing::warn!(%node, by, "this NATS node has taken no JetStream request for a while; moving to another");
    let asked = client.force_reconnect().await.is_ok();
    if asked {
        metrics::counter!("saga_nats_node_moves_total", "by" => by).increment(1);
    }
    asked
}

/// The node a client of this process was last asked to move away from
/// ([`move_to_another_node`]), and when: no client of the process moves
/// again for [`MOVE_EVERY`] after that, and this one's reconnect picks
/// another node meanwhile ([`pick_server`]).
static LAST_MOVE: std::sync::Mutex<Option<(String, std::time::Instant)>> =
    std::sync::Mutex::new(None);

/// The server a client dials next, as async-nats picks one (at random among
/// those of its pool with the fewest failed attempts in a row), except the
/// one it dialled last (`last`) when that is the node it was asked to move
/// away from (`left`, the server it was connected to) and the pool holds
/// another. Remembers the pick in `last`.
fn pick_server(
    servers: &[async_nats::Server],
    left: &async_nats::ServerInfo,
    last: &mut Option<async_nats::ServerAddr>,
) -> Option<async_nats::ReconnectToServer> {
    use rand::seq::IndexedRandom;
    let leaving = LAST_MOVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|(node, at)| *node == left.server_name && at.elapsed() < MOVE_EVERY);
    let mut candidates: Vec<&async_nats::Server> = servers
        .iter()
        .filter(|s| !(leaving && last.as_ref() == Some(&s.addr)))
        .collect();
    if candidates.is_empty() {
        candidates = servers.iter().collect();
    }
    let fewest = candidates.iter().map(|s| s.failed_attempts).min()?;
    candidates.retain(|s| s.failed_attempts == fewest);
    let chosen = candidates.choose(&mut rand::rng())?.addr.clone();
    *last = Some(chosen.clone());
    Some(async_nats::ReconnectToServer {
        addr: chosen,
        delay: None,
    })
}

/// The wait before reconnect attempt `attempts`: at once, then doubling from
/// 50 ms up to 250 ms. async-nats's default grows to 4 s, so a service found
/// the broker back up to 4 s late after an outage, and every saga waited
/// with it; four attempts a second per process while the broker is away
/// (each a refused connection on its port) cost it nothing.
fn reconnect_delay(attempts: usize) -> Duration {
    const MAX: Duration = Duration::from_millis(250);
    match attempts {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(50)
            .saturating_mul(1 << (n - 2).min(10))
            .min(MAX),
    }
}

/// A NATS client for a tool or a test: one attempt, failing with the reason
/// (a wrong login, nobody listening) instead of retrying. `url` as for
/// [`connect_nats`].
pub async fn connect_once(
    url: &str,
    name: &str,
    login: Option<&NatsLogin>,
) -> anyhow::Result<async_nats::Client> {
    let (options, servers) = options_for(url, name, login);
    options
        .connection_timeout(Duration::from_secs(10))
        .connect(servers)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "connecting to NATS at {}: {e}",
                split_login(url).0.join(",")
            )
        })
}

/// Calls `attempt` until it succeeds, backing off; `None` if shut down first.
pub async fn retry_until<T, F, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(e) => tracing::warn!(error = %e, "{what} failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(3));
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}

#[cfg(test)]
mod node_pick_tests {
    use super::*;

    fn pool() -> Vec<async_nats::Server> {
        // A pool as the client reports it, one server an address.
        [
            "nats://127.0.0.1:4001",
            "nats://127.0.0.1:4002",
            "nats://127.0.0.1:4003",
        ]
        .iter()
        .map(|url| async_nats::Server {
            addr: url.parse().unwrap(),
            failed_attempts: 0,
            did_connect: false,
            is_discovered: false,
            last_error: None,
        })
        .collect()
    }

    fn connected_to(name: &str) -> async_nats::ServerInfo {
        async_nats::ServerInfo {
            server_name: name.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn a_client_asked_to_leave_its_node_dials_another_and_otherwise_any() {
        let servers = pool();
        let first: async_nats::ServerAddr = "nats://127.0.0.1:4001".parse().unwrap();
        let mut picked_first = 0;
        for _ in 0..60 {
            let mut last = Some(first.clone());
            let pick = pick_server(&servers, &connected_to("n1"), &mut last).unwrap();
            assert_eq!(last.as_ref(), Some(&pick.addr), "the pick is remembered");
            picked_first += usize::from(pick.addr == first);
        }
        assert!(picked_first > 0, "not asked to leave: any server");
        *LAST_MOVE.lock().unwrap() = Some(("n1".to_owned(), std::time::Instant::now()));
        for _ in 0..60 {
            let mut last = Some(first.clone());
            let pick = pick_server(&servers, &connected_to("n1"), &mut last).unwrap();
            assert_ne!(pick.addr, first, "asked to leave n1, dialled at 4001");
        }
        // Another client of the process, on another node: not leaving.
        let mut picked_first = 0;
        for _ in 0..60 {
            let mut last = Some(first.clone());
            let pick = pick_server(&servers, &connected_to("n2"), &mut last).unwrap();
            picked_first += usize::from(pick.addr == first);
        }
        assert!(picked_first > 0);
        // Failed attempts count first, as async-nats's own pick has them.
        let mut failing = pool();
        failing[1].failed_attempts = 3;
        failing[2].failed_attempts = 1;
        let mut last = None;
        let pick = pick_server(&failing, &connected_to("n1"), &mut last).unwrap();
        assert_eq!(pick.addr, first);
        // A pool of the node being left alone: that node.
        let mut last = Some(first.clone());
        let pick = pick_server(&servers[..1], &connected_to("n1"), &mut last).unwrap();
        assert_eq!(pick.addr, first);
    }
}

//! The chaos run: many concurrent orders while a seeded schedule kills
//! services (one or two at once), the broker and the database, cuts, stalls
//! and delays the network between a service and NATS or PostgreSQL, and runs a
//! second instance of a service for a while. Then, once things are quiet, it
//! checks the promises the system makes, over gRPC and in each service's
//! database. The same seed replays the same schedule and the same orders.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use contracts::order::v1 as api;
use harness::{Mode, ServiceProcess};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use tonic::Code;

use crate::{Options, SERVICES, System, order_request};

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub seed: u64,
    pub orders: usize,
    /// How long faults are injected (orders are placed over the same span).
    pub fault_window: Duration,
    /// How long the system may take to settle once the faults stop.
    pub quiet_timeout: Duration,
    pub order_deadline_secs: u64,
    /// NATS as a 3-node cluster, and node faults (leader kills, node kills,
    /// a node cut off) instead of the single-server faults.
    pub cluster: bool,
    /// Instances of each service for the whole run, sharing its database,
    /// durable consumer and network links. A kill fault kills the first
    /// instance; the others carry on.
    pub instances: usize,
    /// The services' log filter (their RUST_LOG): `info` unless a run asks
    /// for more, e.g. `info,choreo::relay=debug` to see refused batches.
    pub service_log: String,
}

impl Profile {
    /// The profile CI runs: a few minutes on 2 cores, every kind of fault.
    pub fn short(seed: u64) -> Self {
        Profile {
            name: "short",
            seed,
            orders: 200,
            fault_window: Duration::from_secs(60),
            quiet_timeout: Duration::from_secs(180),
            order_deadline_secs: 20,
            cluster: false,
            instances: 1,
            service_log: "info".into(),
        }
    }

    /// The cluster profile CI runs: a 3-node NATS cluster, every node fault.
    pub fn cluster(seed: u64) -> Self {
        Profile {
            name: "cluster",
            seed,
            orders: 120,
            fault_window: Duration::from_secs(60),
            quiet_timeout: Duration::from_secs(180),
            order_deadline_secs: 30,
            cluster: true,
            instances: 1,
            service_log: "info".into(),
        }
    }

    /// The cluster profile at length.
    pub fn cluster_long(seed: u64) -> Self {
        Profile {
            name: "cluster-long",
            orders: 3000,
            fault_window: Duration::from_secs(600),
            quiet_timeout: Duration::from_secs(300),
            ..Profile::cluster(seed)
        }
    }

    /// Thousands of orders over ten minutes of faults.
    pub fn long(seed: u64) -> Self {
        Profile {
            name: "long",
            seed,
            orders: 3000,
            fault_window: Duration::from_secs(600),
            quiet_timeout: Duration::from_secs(300),
            order_deadline_secs: 30,
            cluster: false,
            instances: 1,
            service_log: "info".into(),
        }
    }

    /// `CHAOS_PROFILE` (short, long, cluster or cluster-long), `CHAOS_SEED`
    /// (else a fresh one), `CHAOS_ORDERS`, `CHAOS_INSTANCES` (of each service)
    /// and `CHAOS_LOG` (the services' log filter).
    pub fn from_env() -> Self {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        let mut profile = match std::env::var("CHAOS_PROFILE").as_deref() {
            Ok("long") => Profile::long(seed),
            Ok("cluster") => Profile::cluster(seed),
            Ok("cluster-long") => Profile::cluster_long(seed),
            _ => Profile::short(seed),
        };
        if let Some(orders) = std::env::var("CHAOS_ORDERS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            profile.orders = orders;
        }
        if let Some(instances) = std::env::var("CHAOS_INSTANCES")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            profile.instances = instances;
        }
        if let Ok(log) = std::env::var("CHAOS_LOG") {
            profile.service_log = log;
        }
        profile
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Nats,
    Postgres,
}

#[derive(Debug, Clone)]
pub enum Fault {
    KillService {
        service: &'static str,
        pause: Duration,
    },
    KillTwo {
        services: [&'static str; 2],
        pause: Duration,
    },
    KillNats {
        pause: Duration,
    },
    KillPostgres {
        pause: Duration,
    },
    Network {
        service: &'static str,
        link: Link,
        mode: Mode,
        span: Duration,
    },
    SecondInstance {
        service: &'static str,
        span: Duration,
    },
    /// SIGKILL the node that leads the run's stream number `stream` (in
    /// [`System::stream_names`] order), restart it after `pause`.
    KillStreamLeader {
        stream: usize,
        pause: Duration,
    },
    /// SIGKILL cluster node `node`, restart it after `pause`.
    KillNode {
        node: usize,
        pause: Duration,
    },
    /// Cut node `node`'s routes to the other two for `span` (clients still reach it).
    IsolateNode {
        node: usize,
        span: Duration,
    },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillService { .. } => "kill a service",
            Fault::KillTwo { .. } => "kill two services",
            Fault::KillNats { .. } => "kill nats-server",
            Fault::KillPostgres { .. } => "stop postgres (immediate)",
            Fault::Network {
                mode: Mode::Cut, ..
            } => "network cut",
            Fault::Network {
                mode: Mode::Stall, ..
            } => "network stall",
            Fault::Network { .. } => "network delay",
            Fault::SecondInstance { .. } => "second instance",
            Fault::KillStreamLeader { .. } => "kill the stream leader",
            Fault::KillNode { .. } => "kill a nats node",
            Fault::IsolateNode { .. } => "cut a nats node off",
        }
    }

    /// How long the fault holds the schedule (a second instance runs on in the background).
    fn holds(&self) -> Duration {
        match self {
            Fault::KillService { pause, .. }
            | Fault::KillTwo { pause, .. }
            | Fault::KillNats { pause }
            | Fault::KillPostgres { pause }
            | Fault::KillStreamLeader { pause, .. }
            | Fault::KillNode { pause, .. } => *pause,
            Fault::Network { span, .. } | Fault::IsolateNode { span, .. } => *span,
            Fault::SecondInstance { .. } => Duration::ZERO,
        }
    }
}

/// Fault kinds of the single-server profiles (0..8) and of the cluster ones (8..12).
const KINDS: std::ops::Range<u8> = 0..8;
const CLUSTER_KINDS: std::ops::Range<u8> = 8..12;

fn make_fault(kind: u8, rng: &mut StdRng) -> Fault {
    let service = |rng: &mut StdRng| SERVICES[rng.random_range(0..SERVICES.len())];
    let pause = |rng: &mut StdRng| Duration::from_millis(rng.random_range(300..3000));
    let span = |rng: &mut StdRng| Duration::from_millis(rng.random_range(1000..5000));
    let link = |rng: &mut StdRng| {
        if rng.random_bool(0.5) {
            Link::Nats
        } else {
            Link::Postgres
        }
    };
    match kind {
        0 => Fault::KillService {
            service: service(rng),
            pause: pause(rng),
        },
        1 => {
            let mut two = SERVICES;
            two.shuffle(rng);
            Fault::KillTwo {
                services: [two[0], two[1]],
                pause: pause(rng),
            }
        }
        2 => Fault::KillNats { pause: pause(rng) },
        3 => Fault::KillPostgres { pause: pause(rng) },
        4 => Fault::Network {
            service: service(rng),
            link: link(rng),
            mode: Mode::Cut,
            span: span(rng),
        },
        5 => Fault::Network {
            service: service(rng),
            link: link(rng),
            mode: Mode::Stall,
            span: span(rng),
        },
        6 => Fault::Network {
            service: service(rng),
            link: link(rng),
            mode: Mode::Delay(Duration::from_millis(rng.random_range(20..200))),
            span: span(rng),
        },
        7 => Fault::SecondInstance {
            service: service(rng),
            span: Duration::from_millis(rng.random_range(5000..15000)),
        },
        // A node down or cut off for a few seconds, longer than an election.
        8 => Fault::KillStreamLeader {
            // Any run's streams, whatever they are named after: as many.
            stream: rng.random_range(
                0..choreo::provision::streams(&contracts::CHOREOGRAPHY, "SAGA", "saga").len(),
            ),
            pause: Duration::from_millis(rng.random_range(1000..8000)),
        },
        9 => Fault::KillNode {
            node: rng.random_range(0..3),
            pause: Duration::from_millis(rng.random_range(1000..8000)),
        },
        10 => Fault::IsolateNode {
            node: rng.random_range(0..3),
            span: Duration::from_millis(rng.random_range(3000..10000)),
        },
        // A node cut off for long: past the quorum loss of a leader it holds
        // (about 20 s), after which its clients' pulls reach nobody, and
        // past the relay's MOVE_AFTER_FAILING, so the services have to move
        // their clients to the other side of the cut.
        _ => Fault::IsolateNode {
            node: rng.random_range(0..3),
            span: Duration::from_millis(rng.random_range(20_000..30_000)),
        },
    }
}

/// The fault schedule of a seed: one of every kind first (in a seeded order),
/// then seeded picks, each at its offset from the start, until `window` is
/// full. The cluster profiles draw node faults, the others the rest.
pub fn schedule(seed: u64, window: Duration, cluster: bool) -> Vec<(Duration, Fault)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let range = if cluster { CLUSTER_KINDS } else { KINDS };
    let mut kinds: Vec<u8> = range.clone().collect();
    kinds.shuffle(&mut rng);
    let mut at = Duration::from_secs(2);
    let mut faults = Vec::new();
    while at < window {
        let kind = kinds
            .get(faults.len())
            .copied()
            .unwrap_or_else(|| rng.random_range(range.clone()));
        let fault = make_fault(kind, &mut rng);
        let gap = Duration::from_millis(rng.random_range(1000..3000));
        faults.push((at, fault.clone()));
        at += fault.holds() + gap;
    }
    faults
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scenario {
    Happy,
    ScarceStock,
    UnservedDestination,
    UnreachableCustomer,
    CustomerCancel,
}

struct Planned {
    scenario: Scenario,
    request: api::PlaceOrderRequest,
    start_at: Duration,
    cancel_after: Option<Duration>,
}

/// Stock seeded before the run; RARE is scarce so orders compete for it.
pub const INITIAL_STOCK: [(&str, u64); 4] = [
    ("BOOK", 100_000),
    ("PEN", 100_000),
    ("MUG", 100_000),
    ("RARE", 30),
];

fn plan(profile: &Profile) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(profile.seed ^ 0x005e_ed0f_0de5);
    let spread = profile.fault_window.mul_f64(0.9);
    (0..profile.orders)
        .map(|i| {
            let roll = rng.random_range(0..100);
            let scenario = match roll {
                0..55 => Scenario::Happy,
                55..65 => Scenario::ScarceStock,
                65..75 => Scenario::UnservedDestination,
                75..85 => Scenario::UnreachableCustomer,
                _ => Scenario::CustomerCancel,
            };
            let key = format!("chaos-{}-{i}", profile.seed);
            let customer = format!("c{i}");
            let contact = format!("c{i}@example.com");
            let books = rng.random_range(1..4);
            let request = match scenario {
                Scenario::Happy | Scenario::CustomerCancel => order_request(
                    &key,
                    &customer,
                    "DE",
                    &contact,
                    &[("BOOK", books), ("PEN", 1)],
                ),
                Scenario::ScarceStock => {
                    order_request(&key, &customer, "FR", &contact, &[("MUG", 1), ("RARE", 3)])
                }
                Scenario::UnservedDestination => {
                    order_request(&key, &customer, "AQ", &contact, &[("MUG", 2)])
                }
                Scenario::UnreachableCustomer => order_request(
                    &key,
                    &customer,
                    "US",
                    &format!("c{i}@nowhere.invalid"),
                    &[("BOOK", 1)],
                ),
            };
            Planned {
                scenario,
                request,
                start_at: spread.mul_f64(i as f64 / profile.orders.max(1) as f64),
                cancel_after: (scenario == Scenario::CustomerCancel)
                    .then(|| Duration::from_millis(rng.random_range(0..3000))),
            }
        })
        .collect()
}

struct Placed {
    scenario: Scenario,
    order_id: Result<String, String>,
}

/// Places one planned order as a patient client would: retry with the same
/// idempotency key until it is accepted, then (for a cancel) cancel it.
async fn place(
    client: crate::Clients,
    planned: Planned,
    started: Instant,
    give_up: Duration,
) -> Placed {
    tokio::time::sleep(planned.start_at.saturating_sub(started.elapsed())).await;
    let deadline = Instant::now() + give_up;
    let mut order = client.order;
    let order_id = loop {
        match order.place_order(planned.request.clone()).await {
            Ok(response) => {
                break Ok(response
                    .into_inner()
                    .order
                    .map(|o| o.order_id)
                    .unwrap_or_default());
            }
            Err(status) if Instant::now() > deadline => {
                break Err(format!("could not place within {give_up:?}: {status}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    if let (Ok(id), Some(after)) = (&order_id, planned.cancel_after) {
        tokio::time::sleep(after).await;
        loop {
            let cancel = order
                .cancel_order(api::CancelOrderRequest {
                    order_id: id.clone(),
                    reason: "chaos customer changed their mind".into(),
                })
                .await;
            match cancel {
                Ok(_) => break,
                Err(status) if status.code() == Code::FailedPrecondition => break, // completed first
                Err(_) if Instant::now() > deadline => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    Placed {
        scenario: planned.scenario,
        order_id,
    }
}

async fn inject(
    sys: &mut System,
    fault: &Fault,
    twins: &mut Vec<(ServiceProcess, Instant)>,
) -> anyhow::Result<()> {
    match fault {
        Fault::KillService { service, pause } => {
            tokio::task::block_in_place(|| sys.service(service).kill())?;
            tokio::time::sleep(*pause).await;
            tokio::task::block_in_place(|| sys.service(service).restart())?;
        }
        Fault::KillTwo { services, pause } => {
            for service in services {
                tokio::task::block_in_place(|| sys.service(service).kill())?;
            }
            tokio::time::sleep(*pause).await;
            for service in services {
                tokio::task::block_in_place(|| sys.service(service).restart())?;
            }
        }
        Fault::KillNats { pause } => {
            tokio::task::block_in_place(|| sys.infra.nats.kill())?;
            tokio::time::sleep(*pause).await;
            tokio::task::block_in_place(|| sys.infra.nats.restart())?;
        }
        Fault::KillPostgres { pause } => {
            tokio::task::block_in_place(|| sys.infra.postgres.kill())?;
            tokio::time::sleep(*pause).await;
            tokio::task::block_in_place(|| sys.infra.postgres.restart())?;
        }
        Fault::Network {
            service,
            link,
            mode,
            span,
        } => {
            let i = SERVICES
                .iter()
                .position(|s| s == service)
                .expect("known service");
            let proxy = match link {
                Link::Nats => &sys.proxies[i].0,
                Link::Postgres => &sys.proxies[i].1,
            };
            proxy.set(*mode);
            tokio::time::sleep(*span).await;
            proxy.set(Mode::Pass);
        }
        Fault::SecondInstance { service, span } => {
            twins.push((
                tokio::task::block_in_place(|| sys.twin(service))?,
                Instant::now() + *span,
            ));
        }
        Fault::KillStreamLeader { stream, pause } => {
            // Right after another fault the stream may still be electing one.
            let js = jetstream_at(sys.infra.nats.url()).await;
            let names = sys.stream_names();
            let stream = &names[*stream];
            let mut leader = None;
            for _ in 0..20 {
                if let Some(js) = &js {
                    leader = stream_cluster(js, stream, Duration::from_secs(2))
                        .await
                        .and_then(|c| c.leader);
                }
                if leader.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let cluster = sys.cluster.as_mut().expect("a cluster profile");
            let node = leader
                .as_deref()
                .and_then(|name| cluster.index_of(name))
                .unwrap_or(0);
            eprintln!("chaos:        {stream}'s leader is {leader:?}: killing node {node}");
            tokio::task::block_in_place(|| cluster.kill(node))?;
            tokio::time::sleep(*pause).await;
            tokio::task::block_in_place(|| cluster.restart(node))?;
        }
        Fault::KillNode { node, pause } => {
            let cluster = sys.cluster.as_mut().expect("a cluster profile");
            tokio::task::block_in_place(|| cluster.kill(*node))?;
            tokio::time::sleep(*pause).await;
            tokio::task::block_in_place(|| cluster.restart(*node))?;
        }
        Fault::IsolateNode { node, span } => {
            let cluster = sys.cluster.as_ref().expect("a cluster profile");
            cluster.isolate(*node, Mode::Cut);
            tokio::time::sleep(*span).await;
            cluster.isolate(*node, Mode::Pass);
        }
    }
    Ok(())
}

/// Waits (up to 60 s) until every saga stream has a leader and both other
/// replicas are current: a cluster profile takes down one node at a time,
/// and a node restarted a moment ago that has not caught up yet would make
/// the next fault a loss of two. Returns how long it waited.
async fn wait_for_a_whole_cluster(sys: &System) -> Duration {
    let started = Instant::now();
    let Some(js) = jetstream_at(sys.infra.nats.url()).await else {
        return started.elapsed();
    };
    let streams = sys.stream_names();
    while started.elapsed() < Duration::from_secs(60) {
        let mut whole = true;
        for stream in &streams {
            whole &= stream_cluster(&js, stream, Duration::from_secs(2))
                .await
                .is_some_and(|cluster| {
                    cluster.leader.is_some()
                        && cluster.replicas.len() == 2
                        && cluster.replicas.iter().all(|r| r.current && !r.offline)
                });
        }
        if whole {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

/// A JetStream context on the system's NATS (any node of a cluster), if it
/// answers within 2 s.
async fn jetstream_at(url: &str) -> Option<async_nats::jetstream::Context> {
    let client = tokio::time::timeout(
        Duration::from_secs(2),
        choreo::runtime::connect_once(url, "chaos", None),
    )
    .await
    .ok()?
    .ok()?;
    Some(async_nats::jetstream::new(client))
}

/// The saga stream's cluster state (leader, replicas), if it answers within `wait`.
async fn stream_cluster(
    js: &async_nats::jetstream::Context,
    stream: &str,
    wait: Duration,
) -> Option<async_nats::jetstream::stream::ClusterInfo> {
    tokio::time::timeout(wait, async {
        js.get_stream(stream)
            .await
            .ok()?
            .info()
            .await
            .ok()?
            .cluster
            .clone()
    })
    .await
    .ok()
    .flatten()
}

/// What the samplers saw while faults ran: events applied over time (the
/// order service's timeline rows) and each stream's leader, as it changed.
#[derive(Default)]
struct Samples {
    applied: Vec<(Instant, i64)>,
    leaders: BTreeMap<String, Vec<Option<String>>>,
}

/// Samples every 100 ms until `stop`: the order database's timeline count
/// and, on a cluster, every stream's leader.
async fn sample(
    order_db: String,
    nats_url: String,
    streams: Vec<String>,
    cluster: bool,
    stop: tokio_util::sync::CancellationToken,
) -> Samples {
    let mut samples = Samples::default();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(&order_db);
    let js = if cluster {
        jetstream_at(&nats_url).await
    } else {
        None
    };
    let mut tick = 0u64;
    while !stop.is_cancelled() {
        if let Ok(pool) = &pool
            && let Ok(Ok(n)) = tokio::time::timeout(
                Duration::from_millis(500),
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM order_timeline").fetch_one(pool),
            )
            .await
        {
            samples.applied.push((Instant::now(), n));
        }
        if let Some(js) = &js
            && tick.is_multiple_of(3)
        {
            for stream in &streams {
                let leader = stream_cluster(js, stream, Duration::from_millis(500))
                    .await
                    .and_then(|c| c.leader);
                let seen = samples.leaders.entry(stream.clone()).or_default();
                if seen.last() != Some(&leader) {
                    seen.push(leader);
                }
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// For each fault start, how long until the next event was applied; the longest.
fn longest_stall(
    samples: &Samples,
    faults: &[(Instant, &'static str)],
) -> Option<(Duration, &'static str)> {
    faults
        .iter()
        .filter_map(|(at, kind)| {
            let before = samples
                .applied
                .iter()
                .take_while(|(t, _)| t <= at)
                .last()?
                .1;
            let next = samples
                .applied
                .iter()
                .find(|(t, n)| t > at && *n > before)?;
            Some((next.0 - *at, *kind))
        })
        .max_by_key(|(stall, _)| *stall)
}

/// What a run saw and what it found broken.
#[derive(Debug, Default)]
pub struct Report {
    pub profile: String,
    pub seed: u64,
    pub orders: usize,
    /// Instances of each service that ran throughout.
    pub instances: usize,
    pub faults: BTreeMap<&'static str, usize>,
    pub outcomes: BTreeMap<(String, String), usize>,
    pub redeliveries: usize,
    pub duplicates_absorbed: usize,
    /// Messages handed to the provider again, with the same notification id
    /// (a crash between the send and its commit): expected, harmless to a
    /// provider that honours the id as an idempotency key.
    pub provider_repeats: usize,
    pub time_to_quiet: Duration,
    pub run_time: Duration,
    /// Leader changes of the saga stream seen by the sampler (cluster profiles).
    pub leader_changes: usize,
    /// The longest time from a fault to the next event applied, and its fault.
    pub longest_stall: Option<(Duration, &'static str)>,
    pub violations: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "chaos run: profile {}, seed {}", self.profile, self.seed)?;
        writeln!(f, "  replay with CHAOS_SEED={}", self.seed)?;
        writeln!(f, "  orders: {}", self.orders)?;
        if self.instances > 1 {
            writeln!(
                f,
                "  instances of each service: {} throughout (kills hit the first)",
                self.instances
            )?;
        }
        writeln!(f, "  faults injected:")?;
        for (kind, n) in &self.faults {
            writeln!(f, "    {kind:<28} {n}")?;
        }
        writeln!(f, "  outcomes:")?;
        for ((scenario, status), n) in &self.outcomes {
            writeln!(f, "    {scenario:<22} {status:<11} {n}")?;
        }
        writeln!(f, "  redeliveries handled: {}", self.redeliveries)?;
        writeln!(
            f,
            "  duplicates absorbed by inboxes: {}",
            self.duplicates_absorbed
        )?;
        writeln!(
            f,
            "  messages handed to the provider again (same id): {}",
            self.provider_repeats
        )?;
        writeln!(
            f,
            "  time to quiet after the last fault: {:.1}s",
            self.time_to_quiet.as_secs_f64()
        )?;
        writeln!(f, "  whole run: {:.1}s", self.run_time.as_secs_f64())?;
        if self.profile.starts_with("cluster") {
            writeln!(f, "  stream leader changes seen: {}", self.leader_changes)?;
        }
        if let Some((stall, kind)) = self.longest_stall {
            writeln!(
                f,
                "  longest stall, from a fault to the next applied event: {:.1}s ({kind})",
                stall.as_secs_f64()
            )?;
        }
        if self.violations.is_empty() {
            writeln!(f, "  invariants: all hold")
        } else {
            writeln!(f, "  INVARIANTS BROKEN ({}):", self.violations.len())?;
            for v in self.violations.iter().take(50) {
                writeln!(f, "    {v}")?;
            }
            Ok(())
        }
    }
}

fn exited_by_itself(instance: &ServiceProcess) -> String {
    format!(
        "an extra instance of {} exited by itself (see {})",
        instance.name(),
        instance.log().display()
    )
}

/// Runs a whole chaos profile and returns its report (violations included).
pub async fn run(profile: Profile) -> anyhow::Result<Report> {
    let started_run = Instant::now();
    let mut sys = System::start(Options {
        order_deadline_secs: profile.order_deadline_secs,
        log: profile.service_log.clone(),
        proxies: !profile.cluster,
        cluster: profile.cluster,
        ..Options::default()
    })
    .await?;
    eprintln!(
        "chaos: seed {} ({} profile), logs in {}",
        profile.seed,
        profile.name,
        sys.logs.display()
    );
    for (sku, units) in INITIAL_STOCK {
        sys.set_stock(sku, units).await?;
    }
    tokio::task::block_in_place(|| sys.scale_to(profile.instances))?;

    let started = Instant::now();
    let give_up = profile.fault_window + Duration::from_secs(120);
    let placers: Vec<_> = plan(&profile)
        .into_iter()
        .map(|planned| tokio::spawn(place(sys.clients.clone(), planned, started, give_up)))
        .collect();

    let mut report = Report {
        profile: profile.name.into(),
        seed: profile.seed,
        orders: profile.orders,
        instances: profile.instances,
        ..Report::default()
    };
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn(sample(
        sys.databases[0].clone(),
        sys.infra.nats.url().to_owned(),
        sys.stream_names(),
        profile.cluster,
        stop_sampling.clone(),
    ));
    let mut fault_times = Vec::new();
    let mut twins: Vec<(ServiceProcess, Instant)> = Vec::new();
    for (at, fault) in schedule(profile.seed, profile.fault_window, profile.cluster) {
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        if profile.cluster {
            let waited = wait_for_a_whole_cluster(&sys).await;
            if waited > Duration::from_secs(1) {
                eprintln!(
                    "chaos:        waited {:.1}s for all three replicas to be current",
                    waited.as_secs_f64()
                );
            }
        }
        eprintln!("chaos: {:>6.1}s {fault:?}", started.elapsed().as_secs_f64());
        fault_times.push((Instant::now(), fault.kind()));
        inject(&mut sys, &fault, &mut twins).await?;
        *report.faults.entry(fault.kind()).or_default() += 1;
        twins.retain_mut(|(twin, until)| {
            if !twin.is_running() {
                report.violations.push(exited_by_itself(twin));
                return false;
            }
            if Instant::now() < *until {
                return true;
            }
            let _ = twin.kill();
            false
        });
    }
    for (twin, _) in &mut twins {
        if !twin.is_running() {
            report.violations.push(exited_by_itself(twin));
        }
        twin.kill()?;
    }
    let faults_over = Instant::now();

    let mut placed = Vec::new();
    for placer in placers {
        placed.push(placer.await?);
    }
    let databases = connect_all(&sys).await?;
    let mut streams = Streams {
        nats_url: sys.infra.nats.url().to_owned(),
        names: sys.stream_names(),
        js: None,
    };
    wait_for_quiet(&databases, &mut streams, &placed, profile.quiet_timeout).await;
    report.time_to_quiet = faults_over.elapsed();
    stop_sampling.cancel();
    let samples = sampler.await?;
    report.leader_changes = samples
        .leaders
        .values()
        .map(|leaders| {
            leaders
                .iter()
                .flatten()
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|w| w[0] != w[1])
                .count()
        })
        .sum();
    report.longest_stall = longest_stall(&samples, &fault_times);
    check(&sys, &databases, &placed, &mut report).await?;
    for instance in &mut sys.extra_instances {
        if !instance.is_running() {
            report.violations.push(exited_by_itself(instance));
        }
        instance.kill()?;
    }
    report.run_time = started_run.elapsed();
    let logs = count_in_logs(&sys.logs);
    report.redeliveries = logs.redeliveries;
    report.duplicates_absorbed = logs.duplicates;
    report.provider_repeats = logs.provider_repeats;
    Ok(report)
}

async fn connect_all(sys: &System) -> anyhow::Result<Vec<PgPool>> {
    let mut pools = Vec::new();
    for url in &sys.databases {
        pools.push(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await?,
        );
    }
    Ok(pools)
}

async fn unsent_total(databases: &[PgPool]) -> i64 {
    let mut total = 0;
    for pool in databases {
        total += sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM choreo_outbox WHERE sent_at IS NULL",
        )
        .fetch_one(pool)
        .await
        .unwrap_or(i64::MAX / 8);
    }
    total
}

/// Messages the notification service has queued and not yet sent or given up on.
async fn queued_notifications(notification_db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM notifications WHERE status = 'PENDING'")
        .fetch_one(notification_db)
        .await
        .unwrap_or(i64::MAX / 8)
}

/// The saga's streams on the system's NATS, for [`Streams::unacknowledged`],
/// with a connection made at the first ask and kept while it answers.
struct Streams {
    nats_url: String,
    names: Vec<String>,
    js: Option<async_nats::jetstream::Context>,
}

impl Streams {
    /// Messages of the saga's streams that a service has not acknowledged
    /// yet, summed over every durable consumer: not yet delivered, or
    /// delivered and not acknowledged (being handled, retried, or lost on its
    /// way to a pull the service no longer reads, which comes again after the
    /// ack wait). `None` when NATS does not answer within a few seconds (the
    /// next ask connects again).
    async fn unacknowledged(&mut self) -> Option<u64> {
        use futures::StreamExt;
        if self.js.is_none() {
            self.js = jetstream_at(&self.nats_url).await;
        }
        let js = self.js.as_ref()?;
        let count = async {
            let mut total = 0;
            for name in &self.names {
                let stream = js.get_stream(name).await.ok()?;
                let mut consumers = stream.consumers();
                while let Some(info) = consumers.next().await {
                    let info = info.ok()?;
                    total += info.num_pending + info.num_ack_pending as u64;
                }
            }
            Some(total)
        };
        let total = tokio::time::timeout(Duration::from_secs(5), count)
            .await
            .ok()
            .flatten();
        if total.is_none() {
            self.js = None;
        }
        total
    }
}

/// Waits until every placed order has ended, every outbox is empty, no
/// message is queued for the provider, and every consumer has acknowledged
/// every event of its streams. An order ends on the event that ends it, and
/// the events it only records (its timeline) may still be on their way then;
/// the checks that follow need them all. The order database tells when
/// orders ended (fast, and exact about when quiet came); the checks read
/// every order over gRPC as well.
async fn wait_for_quiet(
    databases: &[PgPool],
    streams: &mut Streams,
    placed: &[Placed],
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let placed_ok = placed.iter().filter(|p| p.order_id.is_ok()).count() as i64;
    let mut last_said = Instant::now();
    // Quiet twice in a row, half a second apart: an event handled between
    // the reads of one round may have written another that the outbox read
    // did not see.
    let mut quiet_rounds = 0;
    while Instant::now() < deadline {
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orders WHERE status IN ('COMPLETED', 'CANCELLED')",
        )
        .fetch_one(&databases[0])
        .await
        .unwrap_or(0);
        let open = placed_ok - ended;
        let unsent = unsent_total(databases).await;
        let queued = queued_notifications(&databases[3]).await;
        let unacknowledged = streams.unacknowledged().await;
        if open <= 0 && unsent == 0 && queued == 0 && unacknowledged == Some(0) {
            quiet_rounds += 1;
            if quiet_rounds == 2 {
                return;
            }
        } else {
            quiet_rounds = 0;
        }
        if last_said.elapsed() >= Duration::from_secs(10) {
            let unacknowledged = unacknowledged.map_or("unknown".to_owned(), |n| n.to_string());
            eprintln!(
                "chaos: waiting for quiet: {open} orders open, {unsent} outbox rows unsent, {queued} notifications queued, {unacknowledged} events unacknowledged"
            );
            last_said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the services' logs tell: redeliveries, duplicates the inboxes
/// absorbed, and messages handed to the mail provider more than once.
#[derive(Debug, Default, PartialEq, Eq)]
struct FromLogs {
    redeliveries: usize,
    duplicates: usize,
    provider_repeats: usize,
}

/// The line notification's log sender writes per message
/// (`notification::sender::LOG_SENDER_DELIVERED`).
const DELIVERED: &str = "delivered by the log sender";

fn count_in_logs(dir: &std::path::Path) -> FromLogs {
    let mut counts = FromLogs::default();
    let mut deliveries: HashMap<String, usize> = HashMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path()) {
            counts.redeliveries += text.matches("redelivered").count();
            counts.duplicates += text.matches("duplicate delivery absorbed").count();
            for line in text.lines() {
                if let Some(id) = delivered_id(line) {
                    *deliveries.entry(id.to_owned()).or_default() += 1;
                }
            }
        }
    }
    counts.provider_repeats = deliveries.values().map(|n| n - 1).sum();
    counts
}

/// The notification id of a log sender's delivery line.
fn delivered_id(line: &str) -> Option<&str> {
    let after = &line[line.find(DELIVERED)? + DELIVERED.len()..];
    let id = after
        .split("notification_id=")
        .nth(1)?
        .trim_start_matches('"');
    id.get(..36)
}

/// Checks every invariant; each broken one names the order (or SKU) and what is wrong.
/// What each service's database says about every order, read once after quiet.
struct Facts {
    lines: Vec<(uuid::Uuid, String, i32)>,
    timeline: Vec<(uuid::Uuid, String)>,
    reservations: HashMap<String, String>,
    reserved_lines: HashMap<String, i64>,
    shipments: HashMap<String, String>,
    /// (order, kind, how many SENT).
    sent: Vec<(String, String, i64)>,
}

impl Facts {
    async fn read(databases: &[PgPool]) -> anyhow::Result<Self> {
        let [orders_db, inventory_db, shipping_db, notification_db] = databases else {
            anyhow::bail!("expected four databases");
        };
        Ok(Facts {
            lines: sqlx::query_as("SELECT order_id, sku, quantity FROM order_lines")
                .fetch_all(orders_db)
                .await?,
            timeline: sqlx::query_as("SELECT order_id, event_type FROM order_timeline")
                .fetch_all(orders_db)
                .await?,
            reservations: sqlx::query_as("SELECT order_id::text, status FROM reservations")
                .fetch_all(inventory_db)
                .await?
                .into_iter()
                .collect(),
            reserved_lines: sqlx::query_as(
                "SELECT order_id::text, count(*) FROM reservation_lines GROUP BY order_id",
            )
            .fetch_all(inventory_db)
            .await?
            .into_iter()
            .collect(),
            shipments: sqlx::query_as("SELECT order_id::text, status FROM shipments")
                .fetch_all(shipping_db)
                .await?
                .into_iter()
                .collect(),
            sent: sqlx::query_as(
                "SELECT order_id::text, kind, count(*) FROM notifications WHERE status = 'SENT' GROUP BY order_id, kind",
            )
            .fetch_all(notification_db)
            .await?,
        })
    }
}

/// One order as the invariants see it: its final state over gRPC and its
/// effects in every service's database.
struct OrderView<'a> {
    id: String,
    scenario: Scenario,
    order: api::Order,
    events: Vec<&'a str>,
    lines: Vec<&'a (uuid::Uuid, String, i32)>,
    reservation: Option<&'a str>,
    reserved_lines: i64,
    shipment: Option<&'a str>,
    confirmations: i64,
    cancellations: i64,
}

impl<'a> OrderView<'a> {
    fn new(
        facts: &'a Facts,
        id: String,
        scenario: Scenario,
        order: api::Order,
    ) -> anyhow::Result<Self> {
        let uuid = uuid::Uuid::parse_str(&id)?;
        let sent = |kind: &str| {
            facts
                .sent
                .iter()
                .find(|(o, k, _)| *o == id && k == kind)
                .map(|(_, _, n)| *n)
                .unwrap_or(0)
        };
        Ok(OrderView {
            events: facts
                .timeline
                .iter()
                .filter(|(o, _)| *o == uuid)
                .map(|(_, t)| t.as_str())
                .collect(),
            lines: facts.lines.iter().filter(|(o, _, _)| *o == uuid).collect(),
            reservation: facts.reservations.get(&id).map(String::as_str),
            reserved_lines: facts.reserved_lines.get(&id).copied().unwrap_or(0),
            shipment: facts.shipments.get(&id).map(String::as_str),
            confirmations: sent("CONFIRMATION"),
            cancellations: sent("CANCELLATION"),
            id,
            scenario,
            order,
        })
    }

    fn has(&self, event_type: &str) -> bool {
        self.events.contains(&event_type)
    }
}

/// Invariant 1: every order ends COMPLETED or CANCELLED.
fn every_order_ends(o: &OrderView, v: &mut Vec<String>) {
    let status = o.order.status();
    if !matches!(
        status,
        api::OrderStatus::Completed | api::OrderStatus::Cancelled
    ) {
        v.push(format!(
            "order {}: stuck in {status:?} ({})",
            o.id, o.order.reason
        ));
    }
}

/// Invariant 4: no effect twice: every event type at most once per order.
fn no_effect_twice(o: &OrderView, v: &mut Vec<String>) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &o.events {
        *counts.entry(t).or_default() += 1;
    }
    for (t, n) in counts.iter().filter(|(_, n)| **n > 1) {
        v.push(format!(
            "order {}: {t} happened {n} times (an effect applied twice)",
            o.id
        ));
    }
}

/// Invariant 3: a completed order has one reservation of all its lines, one
/// live shipment and exactly one confirmation.
fn completed_has_exactly_its_effects(o: &OrderView, v: &mut Vec<String>) {
    if o.order.status() != api::OrderStatus::Completed {
        return;
    }
    let id = &o.id;
    if o.reservation != Some("HELD") {
        v.push(format!(
            "order {id}: COMPLETED but reservation is {:?}",
            o.reservation
        ));
    }
    if o.reserved_lines != o.lines.len() as i64 {
        v.push(format!(
            "order {id}: COMPLETED but holds {} lines of {}",
            o.reserved_lines,
            o.lines.len()
        ));
    }
    if o.shipment != Some("SCHEDULED") {
        v.push(format!(
            "order {id}: COMPLETED but shipment is {:?}",
            o.shipment
        ));
    }
    if (o.confirmations, o.cancellations) != (1, 0) {
        v.push(format!(
            "order {id}: COMPLETED with {} confirmations and {} cancellation notices",
            o.confirmations, o.cancellations
        ));
    }
}

/// Invariant 3, the other side: a cancelled order holds no stock, has no live
/// shipment, no confirmation without a cancellation notice, and a reason.
fn cancelled_holds_nothing(o: &OrderView, v: &mut Vec<String>) {
    if o.order.status() != api::OrderStatus::Cancelled {
        return;
    }
    let id = &o.id;
    if o.reservation == Some("HELD") {
        v.push(format!("order {id}: CANCELLED but still holds stock"));
    }
    if o.shipment == Some("SCHEDULED") {
        v.push(format!("order {id}: CANCELLED but its shipment is live"));
    }
    if o.confirmations != o.cancellations {
        v.push(format!(
            "order {id}: CANCELLED, customer told it ships and never told otherwise"
        ));
    }
    if o.order.reason.is_empty() {
        v.push(format!("order {id}: CANCELLED without a reason"));
    }
}

/// Invariant 6: the timeline fits the final state.
fn timeline_fits(o: &OrderView, v: &mut Vec<String>) {
    let (id, events) = (&o.id, &o.events);
    match o.order.status() {
        api::OrderStatus::Completed
            if !o.has("notification.sent")
                || o.has("inventory.released")
                || o.has("inventory.rejected")
                || o.has("order.cancelled") =>
        {
            v.push(format!("order {id}: COMPLETED but timeline is {events:?}"));
        }
        api::OrderStatus::Cancelled => {
            if !(o.has("inventory.released") || o.has("inventory.rejected")) {
                v.push(format!(
                    "order {id}: CANCELLED but the timeline shows no end of compensation: {events:?}"
                ));
            }
            if o.has("notification.sent") && !o.has("notification.cancelled") {
                v.push(format!(
                    "order {id}: CANCELLED after notification.sent without notification.cancelled"
                ));
            }
        }
        _ => {}
    }
}

/// A failure on purpose ends the order CANCELLED by the step that failed (or
/// by its deadline, when faults held it up that long).
fn failure_is_named(o: &OrderView, v: &mut Vec<String>) {
    let expected = match o.scenario {
        Scenario::UnservedDestination => "shipping: carrier",
        Scenario::UnreachableCustomer => "notification: customer",
        _ => return,
    };
    let reason = &o.order.reason;
    if o.order.status() != api::OrderStatus::Cancelled
        || !(reason.starts_with(expected) || reason.starts_with("deadline:"))
    {
        v.push(format!(
            "order {}: {:?} ended {:?} with reason {reason:?}",
            o.id,
            o.scenario,
            o.order.status()
        ));
    }
}

/// Invariant 2: stock is conserved per SKU: initial = available + reserved,
/// and what is reserved is what completed orders hold.
async fn stock_is_conserved(
    inventory_db: &PgPool,
    held_by_completed: &HashMap<String, i64>,
    v: &mut Vec<String>,
) -> anyhow::Result<()> {
    let stock: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT sku, available, reserved FROM stock")
            .fetch_all(inventory_db)
            .await?;
    for (sku, initial) in INITIAL_STOCK {
        let Some((_, available, reserved)) = stock.iter().find(|(s, _, _)| s == sku) else {
            v.push(format!("sku {sku}: missing from stock"));
            continue;
        };
        let held = held_by_completed.get(sku).copied().unwrap_or(0);
        if available + reserved != initial as i64 || *reserved != held {
            v.push(format!(
                "sku {sku}: initial {initial}, available {available}, reserved {reserved}, held by completed orders {held}"
            ));
        }
    }
    Ok(())
}

/// Invariant 5: nothing left behind: no outbox row unsent, nothing parked, no
/// message still queued.
async fn nothing_left_behind(databases: &[PgPool], v: &mut Vec<String>) -> anyhow::Result<()> {
    for (name, pool) in SERVICES.iter().zip(databases) {
        let unsent: i64 =
            sqlx::query_scalar("SELECT count(*) FROM choreo_outbox WHERE sent_at IS NULL")
                .fetch_one(pool)
                .await?;
        if unsent > 0 {
            v.push(format!("{name}: {unsent} outbox rows never sent"));
        }
        let parked: Vec<(String, String)> =
            sqlx::query_as("SELECT subject, reason FROM choreo_dead_letter")
                .fetch_all(pool)
                .await?;
        for (subject, reason) in parked {
            v.push(format!("{name}: dead letter on {subject}: {reason}"));
        }
    }
    let queued = queued_notifications(&databases[3]).await;
    if queued > 0 {
        v.push(format!(
            "notification: {queued} messages still queued, never sent"
        ));
    }
    Ok(())
}

/// Checks every invariant over every placed order and the services' databases.
async fn check(
    sys: &System,
    databases: &[PgPool],
    placed: &[Placed],
    report: &mut Report,
) -> anyhow::Result<()> {
    let facts = Facts::read(databases).await?;
    let v = &mut report.violations;
    let mut held_by_completed: HashMap<String, i64> = HashMap::new();
    for p in placed {
        let id = match &p.order_id {
            Ok(id) => id.clone(),
            Err(e) => {
                v.push(format!(
                    "client: {:?} order was never accepted: {e}",
                    p.scenario
                ));
                continue;
            }
        };
        let order = match sys.get(&id).await {
            Ok(o) => o,
            Err(e) => {
                v.push(format!("order {id}: cannot be read: {e}"));
                continue;
            }
        };
        let view = OrderView::new(&facts, id, p.scenario, order)?;
        let status = view.order.status();
        *report
            .outcomes
            .entry((
                format!("{:?}", p.scenario),
                status
                    .as_str_name()
                    .trim_start_matches("ORDER_STATUS_")
                    .to_owned(),
            ))
            .or_default() += 1;
        every_order_ends(&view, v);
        no_effect_twice(&view, v);
        completed_has_exactly_its_effects(&view, v);
        cancelled_holds_nothing(&view, v);
        timeline_fits(&view, v);
        failure_is_named(&view, v);
        if status == api::OrderStatus::Completed {
            for (_, sku, quantity) in &view.lines {
                *held_by_completed.entry(sku.clone()).or_default() += *quantity as i64;
            }
        }
    }
    stock_is_conserved(&databases[1], &held_by_completed, v).await?;
    nothing_left_behind(databases, v).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_line_gives_its_notification_id() {
        let line = "2026-11-25T17:29:03Z INFO send notification{order_id=01a213c0-fa93-72f5-9102-90f8c3de9c59 notification_id=01a213c0-fadf-779a-8c0b-f400ca039eaf kind=CONFIRMATION}: notification::sender: delivered by the log sender notification_id=\"01a213c0-fadf-779a-8c0b-f400ca039eaf\" recipient=\"c0@example.com\"";
        assert_eq!(
            delivered_id(line),
            Some("01a213c0-fadf-779a-8c0b-f400ca039eaf")
        );
        assert_eq!(delivered_id("notification sent notification_id=x"), None);
    }

    #[test]
    fn a_seed_replays_the_same_schedule_with_every_kind_of_fault() {
        let a = format!("{:?}", schedule(7, Duration::from_secs(60), false));
        let b = format!("{:?}", schedule(7, Duration::from_secs(60), false));
        assert_eq!(a, b);
        assert_ne!(
            a,
            format!("{:?}", schedule(8, Duration::from_secs(60), false))
        );
        let kinds = |cluster| -> std::collections::BTreeSet<&str> {
            schedule(7, Duration::from_secs(60), cluster)
                .iter()
                .map(|(_, f)| f.kind())
                .collect()
        };
        assert_eq!(kinds(false).len(), 8, "{:?}", kinds(false));
        assert_eq!(
            kinds(true),
            [
                "cut a nats node off",
                "kill a nats node",
                "kill the stream leader"
            ]
            .into()
        );
        // One cut lasts long enough for the services to have to move.
        assert!(
            schedule(7, Duration::from_secs(60), true)
                .iter()
                .any(|(_, f)| matches!(f, Fault::IsolateNode { span, .. } if *span >= Duration::from_secs(20))),
            "no long cut"
        );
    }
}

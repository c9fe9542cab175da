//! The benchmark a user runs (`load`): in one run, on one system, it
//! measures what the saga costs and how fast it goes, and says it as a
//! table, as JSON and as a picture.
//!
//! 1. The limit: C, the raw commit rate of one saga-step-shaped transaction
//!    (inbox insert, conditional update, outbox insert) on the same
//!    PostgreSQL, at the given concurrency.
//! 2. Closed loop: clients that wait for their order's saga to end before
//!    placing the next, over a spread catalogue (Zipf over many SKUs) and a
//!    flash sale (every order for one SKU; stock is checked for overselling).
//!    Each loop places orders for at least `closed_secs` (and `orders` at
//!    the least), so that its start and end, where fewer sagas are in
//!    flight, are a small part of it on a fast machine too.
//!    The spread catalogue runs once for each number of clients asked for,
//!    and its peak is the run with the most sagas/s: more sagas in flight
//!    make larger batches, so the peak is found, not assumed. The flash
//!    sale runs with the peak's clients.
//! 3. Open loop: orders arriving at a fixed rate, half the spread peak;
//!    latency placed -> COMPLETED. And one order at a time on an idle system.
//! 4. Cost per completed saga: the services' own PostgreSQL commits and
//!    rollbacks (`pg_stat_database`; the benchmark reads nothing from the
//!    services' databases while it counts), NATS messages, deliveries and
//!    acks, and each process's CPU seconds and peak memory.
//! 5. Per hop: send to PubAck per service (its metrics), and, per step,
//!    from the event that triggers it to the event it writes (timelines).
//! 6. The headline R = completed sagas/s x 6 / C (six state changes a saga).
//!
//! A saga's end is seen on NATS (its last event: `notification.sent`,
//! `inventory.released` or `inventory.rejected`), so waiting costs the
//! services nothing; latencies are read from the order database afterwards.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;

use crate::{OrderStatus, SERVICES, System, order_request};

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Instances of each service (for the report; the caller starts them).
    pub instances: usize,
    /// The numbers of closed-loop clients (each with one order in flight)
    /// the spread catalogue runs with, in turn; the hot SKU runs with the
    /// one that gave the peak.
    pub clients: Vec<usize>,
    /// Orders per closed-loop catalogue, at the least.
    pub orders: usize,
    /// Seconds a closed loop goes on placing orders, at the least: the
    /// clients stop once `orders` are placed and this long has passed.
    pub closed_secs: f64,
    /// SKUs of the spread catalogue (Zipf, s = 1).
    pub skus: usize,
    /// Seconds of open-loop arrivals.
    pub open_secs: f64,
    /// The open loop's arrival rate, as a fraction of the spread peak.
    pub open_at: f64,
    /// Or a fixed arrival rate, in orders/s, whatever the peak (to set
    /// runs of different code side by side at the same load).
    pub open_rate: Option<f64>,
    /// Lighter open loops run first, each for `open_secs`, as fractions of
    /// the main one's rate: how the latency grows with the load, and up to
    /// which rate p99 stays within `p99_within_ms`.
    pub sweep_at: Vec<f64>,
    /// The p99 a rate must keep to count as within (the issue's target:
    /// [`P99_WITHIN_MS`]).
    pub p99_within_ms: f64,
    /// Then up to this many more open loops, each halfway between the
    /// highest rate run whose p99 stayed within `p99_within_ms` and the
    /// lowest above it whose p99 did not ([`next_probe`]): where between
    /// the sweep's rates the latency gives out.
    pub p99_probes: usize,
    /// Orders placed one at a time on an idle system.
    pub alone: usize,
    /// Connections measuring C, and for how long.
    pub limit_clients: usize,
    pub limit_secs: f64,
    /// Also count each service's statements per saga over each closed loop
    /// and open loop (the table shows the spread one's, the hot SKU's and
    /// the open loop's at half the peak; needs PostgreSQL started with pg_stat_statements
    /// preloaded).
    pub statements: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The latency at each whole percent, 0 to 100 (for the picture).
    pub quantiles_ms: Vec<f64>,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Percentiles::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
        Percentiles {
            count: ms.len(),
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
            quantiles_ms: (0..=100).map(|p| at(p as f64 / 100.0)).collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceCost {
    pub service: String,
    pub commits_per_saga: f64,
    pub rollbacks_per_saga: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessCost {
    pub process: String,
    pub cpu_seconds: f64,
    pub cpu_ms_per_saga: f64,
    /// How long its threads were ready to run but waited for a core, per
    /// saga: the kernel's run delay (`/proc/<pid>/task/*/schedstat`),
    /// summed over its threads (PostgreSQL: over the postmaster and its
    /// live backends). None where the kernel does not keep it.
    pub waited_ms_per_saga: Option<f64>,
    pub peak_rss_mb: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Cost {
    /// The services' own transactions per completed saga, rollbacks included.
    pub transactions_per_saga: f64,
    pub commits_per_saga: f64,
    pub rollbacks_per_saga: f64,
    pub per_service: Vec<ServiceCost>,
    pub published_per_saga: f64,
    pub deliveries_per_saga: f64,
    pub acks_per_saga: f64,
    pub processes: Vec<ProcessCost>,
}

impl Cost {
    /// The processes of the system measured: the services, nats-server and
    /// PostgreSQL, not the benchmark's own.
    fn system(&self) -> impl Iterator<Item = &ProcessCost> {
        self.processes.iter().filter(|p| p.process != "load")
    }

    /// "1.9: 1.9 commits + 0.0 rollbacks (order 1.3+0.0, ...)"
    fn transactions(&self) -> String {
        format!(
            "{:.1}: {:.1} commits + {:.1} rollbacks ({})",
            self.transactions_per_saga,
            self.commits_per_saga,
            self.rollbacks_per_saga,
            self.per_service
                .iter()
                .map(|s| format!(
                    "{} {:.1}+{:.1}",
                    s.service, s.commits_per_saga, s.rollbacks_per_saga
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// "order 0.7 ms (waited 1.2), 18 MB; ..."
    fn cpu(&self) -> String {
        self.processes
            .iter()
            .map(|p| {
                let waited = p
                    .waited_ms_per_saga
                    .map(|w| format!(" (waited {w:.1})"))
                    .unwrap_or_default();
                format!(
                    "{} {:.1} ms{waited}, {:.0} MB",
                    p.process, p.cpu_ms_per_saga, p.peak_rss_mb
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ClosedLoop {
    pub catalogue: String,
    /// Clients, each with one order in flight.
    pub clients: usize,
    pub orders: usize,
    pub completed: usize,
    pub seconds: f64,
    pub sagas_per_sec: f64,
    pub latency: Percentiles,
    /// Sagas ended in each tenth of a second of the run (the last tenth is
    /// cut short where the run ended).
    pub ended_per_tenth: Vec<u32>,
    pub cost: Cost,
    /// Where the whole machine's CPU time went while the clients ran.
    pub machine: MachineCpu,
    /// With `statements`: per service, its statements' calls per saga,
    /// most frequent first (the services' own: read before the benchmark
    /// reads any order back).
    pub statements: Vec<(String, Vec<(f64, String)>)>,
}

/// The whole machine's CPU time over a run, in % of all cores' time (from
/// `/proc/stat`): what no process's own CPU shows (interrupt work such as
/// loopback networking, time taken by the hypervisor) and how much was idle.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MachineCpu {
    pub user_percent: f64,
    pub system_percent: f64,
    /// Hard and soft interrupts: on one machine, mostly loopback networking.
    pub interrupts_percent: f64,
    pub iowait_percent: f64,
    /// Time the hypervisor gave to other guests: a noisy neighbour.
    pub steal_percent: f64,
    pub idle_percent: f64,
}

impl MachineCpu {
    /// The machine's CPU ticks so far: user, nice, system, idle, iowait,
    /// irq, softirq, steal (empty where there is no `/proc/stat`).
    fn ticks() -> Vec<u64> {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("cpu "))?;
                Some(
                    line.split_whitespace()
                        .skip(1)
                        .take(8)
                        .filter_map(|f| f.parse().ok())
                        .collect(),
                )
            })
            .unwrap_or_default()
    }

    fn summary(&self) -> String {
        format!(
            "user {:.0}%, system {:.0}%, interrupts {:.0}% (loopback networking: in no process's CPU), iowait {:.0}%, stolen by the hypervisor {:.0}%, idle {:.0}%",
            self.user_percent,
            self.system_percent,
            self.interrupts_percent,
            self.iowait_percent,
            self.steal_percent,
            self.idle_percent
        )
    }

    fn between(before: &[u64], after: &[u64]) -> Self {
        if before.len() < 8 || after.len() < 8 {
            return MachineCpu::default();
        }
        let d: Vec<f64> = (0..8)
            .map(|i| after[i].saturating_sub(before[i]) as f64)
            .collect();
        let total: f64 = d.iter().sum();
        if total == 0.0 {
            return MachineCpu::default();
        }
        let pct = |ticks: f64| ticks * 100.0 / total;
        MachineCpu {
            user_percent: pct(d[0] + d[1]),
            system_percent: pct(d[2]),
            idle_percent: pct(d[3]),
            iowait_percent: pct(d[4]),
            interrupts_percent: pct(d[5] + d[6]),
            steal_percent: pct(d[7]),
        }
    }
}

/// What ran beside the services over a stretch of the run: PostgreSQL's
/// own background work, and the whole machine's CPU.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Beside {
    /// Autovacuum and autoanalyze runs on the services' tables that ended.
    pub autovacuums: i64,
    pub autoanalyzes: i64,
    /// Checkpoints PostgreSQL began (timed or requested).
    pub checkpoints: i64,
    pub machine: MachineCpu,
    /// Each autovacuum or autoanalyze of a table that ended: its
    /// database's name and when it ended (Unix time, seconds).
    #[serde(skip)]
    pub autovacuum_ends: Vec<(String, f64)>,
}

/// The counters `Beside` is the difference of.
struct BesideCounters {
    autovacuums: i64,
    autoanalyzes: i64,
    checkpoints: i64,
    machine: Vec<u64>,
    /// Each table's last autovacuum's and autoanalyze's end: its database,
    /// the table and which of the two, and when (Unix time, seconds).
    last_ends: Vec<(String, String, f64)>,
}

impl BesideCounters {
    async fn read(sys: &System) -> anyhow::Result<Self> {
        let (mut autovacuums, mut autoanalyzes) = (0, 0);
        let mut last_ends = Vec::new();
        for url in &sys.databases {
            let mut db = PgConnection::connect(url).await?;
            let (vacuums, analyzes): (i64, i64) = sqlx::query_as(
                "SELECT COALESCE(sum(autovacuum_count), 0)::int8, \
                        COALESCE(sum(autoanalyze_count), 0)::int8 FROM pg_stat_user_tables",
            )
            .fetch_one(&mut db)
            .await?;
            // Only each table's last ends are kept: a loop longer than
            // `autovacuum_naptime` (a minute unless set) may miss a
            // database's earlier round.
            let ends: Vec<(String, String, f64)> = sqlx::query_as(
                "SELECT current_database()::text, relname || ' ' || what, \
                        extract(epoch FROM ended)::float8 \
                 FROM pg_stat_user_tables, \
                      LATERAL (VALUES ('vacuum', last_autovacuum), ('analyze', last_autoanalyze)) \
                          AS runs (what, ended) \
                 WHERE ended IS NOT NULL",
            )
            .fetch_all(&mut db)
            .await?;
            last_ends.extend(ends);
            db.close().await?;
            autovacuums += vacuums;
            autoanalyzes += analyzes;
        }
        let mut admin = PgConnection::connect(&admin_url(&sys.infra.postgres)).await?;
        let checkpoints: i64 =
            sqlx::query_scalar("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
                .fetch_one(&mut admin)
                .await?;
        admin.close().await?;
        Ok(BesideCounters {
            autovacuums,
            autoanalyzes,
            checkpoints,
            machine: MachineCpu::ticks(),
            last_ends,
        })
    }

    fn minus(&self, before: &BesideCounters) -> Beside {
        Beside {
            autovacuums: self.autovacuums - before.autovacuums,
            autoanalyzes: self.autoanalyzes - before.autoanalyzes,
            checkpoints: self.checkpoints - before.checkpoints,
            machine: MachineCpu::between(&before.machine, &self.machine),
            autovacuum_ends: self
                .last_ends
                .iter()
                .filter(|end| !before.last_ends.contains(end))
                .map(|(database, _, at)| (database.clone(), *at))
                .collect(),
        }
    }
}

/// The p99 an open-loop rate is held to unless told otherwise (the
/// issue's target): the benchmark reports the highest rate run within it
/// and searches for where between its rates the latency gives out.
pub const P99_WITHIN_MS: f64 = 50.0;

/// Where the p99 gives out, from the `(rate, p99)` of the open loops run:
/// the highest rate whose p99 stayed within `within_ms` (none if no rate's
/// did), and the lowest rate above it whose p99 did not (none if no such
/// rate was run).
pub fn p99_edge(runs: &[(f64, f64)], within_ms: f64) -> (Option<f64>, Option<f64>) {
    let within = runs
        .iter()
        .filter(|(_, p99)| *p99 <= within_ms)
        .map(|(rate, _)| *rate)
        .max_by(f64::total_cmp);
    let beyond = runs
        .iter()
        .filter(|(rate, p99)| *p99 > within_ms && *rate > within.unwrap_or(0.0))
        .map(|(rate, _)| *rate)
        .min_by(f64::total_cmp);
    (within, beyond)
}

/// The rate of the next open loop in the search for the highest one whose
/// p99 stays within `within_ms`, from the `(rate, p99)` of the loops run
/// so far: halfway between the two ends of [`p99_edge`] (from 0 when no
/// rate was within). `None` when there is nothing left to narrow: no rate
/// above the highest within was beyond it, or the two are within 5% of the
/// higher (closer than runs of one rate agree).
pub fn next_probe(runs: &[(f64, f64)], within_ms: f64) -> Option<f64> {
    let (within, beyond) = p99_edge(runs, within_ms);
    let (within, beyond) = (within.unwrap_or(0.0), beyond?);
    let next = (within + beyond) / 2.0;
    (beyond - within > beyond * 0.05 && next >= 1.0).then_some(next)
}

/// One open loop: its rate, its latency, and what a saga cost in it.
#[derive(Debug, Clone, Serialize)]
pub struct OpenLoop {
    pub rate_per_sec: f64,
    /// Placed -> COMPLETED.
    pub latency: Percentiles,
    /// The services' PostgreSQL transactions per saga.
    pub transactions_per_saga: f64,
    /// CPU of the services, nats-server and PostgreSQL per saga (not the
    /// benchmark's own).
    pub system_cpu_ms_per_saga: f64,
    /// How long their threads waited for a core per saga, ready to run
    /// (the kernel's run delay; None where it keeps none). Times the rate,
    /// it is how many of them waited at any moment on average: the queue
    /// for the cores that a busy machine's latency is made of.
    pub system_waited_ms_per_saga: Option<f64>,
    /// The whole machine's idle time while the orders arrived.
    pub idle_percent: f64,
    /// The share of the machine the hypervisor gave to other guests
    /// meanwhile: a row that lost much of it measured the neighbours too.
    pub stolen_percent: f64,
    /// Each process's CPU per saga and peak RSS (`load`'s too): where a
    /// saga's CPU goes at this rate.
    pub processes: Vec<ProcessCost>,
    /// Where its slowest sagas spent their time, and when they were placed.
    pub tail: Tail,
}

/// The hops of a happy saga, as the order's timeline shows them: from the
/// order's placing to `inventory.reserved`, to `shipping.scheduled`, to
/// `notification.sent` (each event's time is its producer's), and to the
/// order's COMPLETED.
pub const HOPS: [&str; 4] = [
    "placed -> reserved",
    "reserved -> scheduled",
    "scheduled -> sent",
    "sent -> COMPLETED",
];

/// One completed saga of an open loop: when it was placed, in seconds
/// from the loop's first order, and its time in each of [`HOPS`], ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SagaTimes {
    pub placed_secs: f64,
    pub hops_ms: [f64; 4],
}

/// Where the slowest sagas of an open loop spent their time: in one hop
/// (one service, or the broker between two), in all of them alike (a queue
/// for the cores), or in a few moments of the loop (a stall: they were
/// placed close together).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tail {
    /// The sagas whose placed -> COMPLETED was the loop's p99 or more.
    pub sagas: usize,
    /// Their mean time in each of [`HOPS`], ms.
    pub hops_ms: [f64; 4],
    /// Each hop's median over all the loop's sagas, ms.
    pub median_hops_ms: [f64; 4],
    /// The half-seconds of the loop in which they were placed, each as
    /// seconds from the loop's first order, with how many of them it
    /// placed; and how many half-seconds the loop had.
    pub placed: Vec<(f64, usize)>,
    pub half_seconds: usize,
    /// When the loop's first order was placed (Unix time, seconds): to
    /// set `placed` beside the servers' logs.
    pub first_placed_unix_secs: f64,
    /// PostgreSQL's autovacuum rounds that ended while the loop ran: a
    /// burst of work beside which a stall's half-seconds may sit.
    pub autovacuum_rounds: Vec<AutovacuumRound>,
}

/// One database's autovacuum round in an open loop: its tables' vacuums
/// and analyzes that ended close together, in seconds from the loop's
/// first order (PostgreSQL's clock against `load`'s: one machine's, when
/// `load` started the servers).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutovacuumRound {
    pub database: String,
    /// When its first and its last vacuum or analyze ended.
    pub first_ended_secs: f64,
    pub last_ended_secs: f64,
    /// The vacuums and analyzes it ran.
    pub runs: usize,
}

/// Two ends of one database's vacuums or analyzes further apart than this
/// are two rounds: the launcher visits a database once every
/// `autovacuum_naptime` (a minute unless set), and a round of the
/// services' few tables takes a few seconds at most.
const ROUND_GAP_SECS: f64 = 5.0;

impl AutovacuumRound {
    /// The rounds of `ends` (each a database's name and a vacuum's or an
    /// analyze's end, Unix time), in seconds from `origin_unix_secs`, by
    /// when they began to end.
    pub fn group(ends: &[(String, f64)], origin_unix_secs: f64) -> Vec<AutovacuumRound> {
        let mut ends = ends.to_vec();
        ends.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut rounds: Vec<AutovacuumRound> = Vec::new();
        for (database, at) in ends {
            let at = at - origin_unix_secs;
            match rounds.last_mut() {
                Some(round)
                    if round.database == database
                        && at - round.last_ended_secs <= ROUND_GAP_SECS =>
                {
                    round.last_ended_secs = at;
                    round.runs += 1;
                }
                _ => rounds.push(AutovacuumRound {
                    database,
                    first_ended_secs: at,
                    last_ended_secs: at,
                    runs: 1,
                }),
            }
        }
        rounds.sort_by(|a, b| a.first_ended_secs.total_cmp(&b.first_ended_secs));
        rounds
    }
}

impl Tail {
    /// The tail of `sagas` at and above `p99_ms` (placed -> COMPLETED),
    /// of a loop whose first order was placed at `first_placed_unix_secs`.
    pub fn of(sagas: &[SagaTimes], p99_ms: f64, first_placed_unix_secs: f64) -> Self {
        if sagas.is_empty() {
            return Tail::default();
        }
        let total = |s: &SagaTimes| s.hops_ms.iter().sum::<f64>();
        // A saga's hops add up to its placed -> COMPLETED, but for the
        // rounding of four sums instead of one.
        let slow: Vec<&SagaTimes> = sagas.iter().filter(|s| total(s) >= p99_ms - 1e-6).collect();
        let half_second = |s: &SagaTimes| (s.placed_secs * 2.0).floor() as i64;
        let mut hops_ms = [0.0; 4];
        let mut median_hops_ms = [0.0; 4];
        for hop in 0..4 {
            if !slow.is_empty() {
                hops_ms[hop] = slow.iter().map(|s| s.hops_ms[hop]).sum::<f64>() / slow.len() as f64;
            }
            median_hops_ms[hop] =
                Percentiles::of(sagas.iter().map(|s| s.hops_ms[hop]).collect()).p50_ms;
        }
        let mut placed: Vec<(f64, usize)> = Vec::new();
        let mut halves: Vec<i64> = slow.iter().map(|s| half_second(s)).collect();
        halves.sort_unstable();
        for half in halves {
            match placed.last_mut() {
                Some((at, n)) if *at == half as f64 / 2.0 => *n += 1,
                _ => placed.push((half as f64 / 2.0, 1)),
            }
        }
        let first = sagas.iter().map(half_second).min().unwrap_or(0);
        let last = sagas.iter().map(half_second).max().unwrap_or(0);
        Tail {
            sagas: slow.len(),
            hops_ms,
            median_hops_ms,
            placed,
            half_seconds: (last - first + 1) as usize,
            first_placed_unix_secs,
            autovacuum_rounds: Vec::new(),
        }
    }
}

/// The counted side of an open loop, its latency read at the end.
struct OpenLoopRun {
    rate: f64,
    ids: Vec<String>,
    /// Placed -> COMPLETED, read once the loop was counted.
    latency: Percentiles,
    tail: Tail,
    cost: Cost,
    beside: Beside,
    /// Each service's send -> PubAck over the loop.
    puback: Vec<PubAckWait>,
    /// With `statements`: per service, its statements' calls per saga.
    statements: Vec<(String, Vec<(f64, String)>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    pub service: String,
    /// Mean time from the publisher's send to the PubAck, over the spread
    /// run (the name is older: a row waiting for a free send after its
    /// commit is not in it).
    pub commit_to_puback_ms: f64,
    /// The p99 of the same wait, as the upper bound of the histogram bucket
    /// it falls in (`saga_publish_latency_seconds`); none without sends, or
    /// when it is above the last bucket.
    pub send_to_puback_p99_at_most_ms: Option<f64>,
    /// From the event that triggers the service's work to the event it writes.
    pub trigger_to_reaction: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: String,
    pub postgres: String,
    pub nats: String,
    pub settings: String,
    pub limit_commits_per_sec: f64,
    /// C measured again once every other measurement is done: on a shared
    /// machine its speed can move during a run, and the two show by how much.
    pub limit_at_end_commits_per_sec: f64,
    /// The spread catalogue at each number of clients asked for, in turn.
    pub spread_by_clients: Vec<ByClients>,
    /// The spread catalogue's peak: the run above with the most sagas/s.
    pub spread: ClosedLoop,
    pub hot: ClosedLoop,
    pub hot_oversold: bool,
    pub open_rate_per_sec: f64,
    pub open_loop: Percentiles,
    /// Every open loop run, by rate: the lighter ones (`sweep_at`), the
    /// main one and the search's probes (`p99_probes`).
    pub open_loops: Vec<OpenLoop>,
    /// The p99 a rate had to keep to count as within ([`Settings::p99_within_ms`]).
    pub p99_within_ms: f64,
    /// The highest of those rates whose p99 was within `p99_within_ms`
    /// (none if no rate's was).
    pub p99_within_up_to_per_sec: Option<f64>,
    /// The lowest rate above that one whose p99 was beyond it (none if no
    /// such rate was run): the latency gives out between the two.
    pub p99_beyond_from_per_sec: Option<f64>,
    /// The open loop's slowest order placed in each second: a tail that
    /// comes from a stall shows as a few bad seconds, one from queueing as
    /// many.
    pub open_loop_worst_per_second_ms: Vec<f64>,
    /// Per hop over the open loop's orders (PubAck means over the open loop).
    pub open_loop_hops: Vec<Hop>,
    /// What ran beside the services from the open loop's first order to
    /// its last end (an autovacuum run counts once it has ended).
    pub open_loop_beside: Beside,
    /// The open loop's cost per saga, its sagas in smaller batches than the
    /// closed loop's: counted from its first order until the outboxes are
    /// quiet again, so the services' background work over that window is
    /// in it too (a larger share the lower the rate).
    pub open_loop_cost: Cost,
    /// With `statements`: per service, its statements' calls per saga over
    /// the open loop at half the peak (the benchmark's reads among them).
    pub open_loop_statements: Vec<(String, Vec<(f64, String)>)>,
    pub alone: Percentiles,
    /// Per hop over the orders placed one at a time.
    pub alone_hops: Vec<Hop>,
    pub hops: Vec<Hop>,
    /// R = spread sagas/s x 6 / C.
    pub headline_r: f64,
}

/// One run of the spread catalogue's closed loop, at one number of clients.
#[derive(Debug, Clone, Serialize)]
pub struct ByClients {
    pub clients: usize,
    pub sagas_per_sec: f64,
    pub latency: Percentiles,
    pub transactions_per_saga: f64,
    /// The share of the machine the hypervisor took while the clients ran.
    pub stolen_percent: f64,
}

/// Sagas whose last event has been seen, and who waits for which.
#[derive(Default)]
struct Ends {
    waiting: HashMap<String, oneshot::Sender<()>>,
    ended: HashMap<String, Instant>,
}

/// Tells a client when its order's saga has ended, from the events on NATS.
#[derive(Clone)]
struct EndWatcher {
    ends: Arc<Mutex<Ends>>,
}

impl EndWatcher {
    async fn start(sys: &System) -> anyhow::Result<Self> {
        let client = choreo::runtime::connect_once(sys.infra.nats.url(), "bench", None).await?;
        let ends = Arc::new(Mutex::new(Ends::default()));
        for last in [
            "notification.sent",
            "inventory.released",
            "inventory.rejected",
        ] {
            let mut events = client
                .subscribe(format!("{}.{last}", sys.subject_prefix))
                .await?;
            let ends = ends.clone();
            tokio::spawn(async move {
                while let Some(message) = events.next().await {
                    let Ok(envelope) = choreo::Envelope::from_bytes(&message.payload) else {
                        continue;
                    };
                    let mut ends = ends.lock().expect("ends");
                    ends.ended.insert(envelope.saga_id.clone(), Instant::now());
                    if let Some(waiter) = ends.waiting.remove(&envelope.saga_id) {
                        let _ = waiter.send(());
                    }
                }
            });
        }
        client.flush().await?;
        Ok(EndWatcher { ends })
    }

    /// Waits until order `id`'s saga has ended.
    async fn wait(&self, id: &str) -> anyhow::Result<()> {
        let receiver = {
            let mut ends = self.ends.lock().expect("ends");
            if ends.ended.contains_key(id) {
                return Ok(());
            }
            let (sender, receiver) = oneshot::channel();
            ends.waiting.insert(id.to_owned(), sender);
            receiver
        };
        tokio::time::timeout(Duration::from_secs(120), receiver)
            .await
            .map_err(|_| anyhow::anyhow!("order {id} did not end within 120 s"))??;
        Ok(())
    }

    fn ended_at(&self, id: &str) -> Option<Instant> {
        self.ends.lock().expect("ends").ended.get(id).copied()
    }
}

/// SKUs by Zipf's law (s = 1): the k-th most popular is ordered 1/k as often.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                total += 1.0 / k as f64;
                total
            })
            .collect();
        Zipf { cumulative }
    }

    fn sample(&self) -> usize {
        let total = *self.cumulative.last().expect("at least one SKU");
        let x = rand::random::<f64>() * total;
        self.cumulative.partition_point(|c| *c < x)
    }
}

fn sku(i: usize) -> String {
    format!("S{i:05}")
}

const HOT: &str = "HOT";
/// Each SKU's stock: more than any closed loop sells, so that every order
/// can be served, and on the hot SKU what is left plus what completed must
/// be it.
const STOCK: u64 = 10_000_000;

/// Runs every measurement on `sys` and returns the report.
pub async fn run(sys: &System, settings: &Settings) -> anyhow::Result<Report> {
    let watcher = EndWatcher::start(sys).await?;
    for i in 0..settings.skus {
        sys.set_stock(&sku(i), STOCK).await?;
    }
    sys.set_stock(HOT, STOCK).await?;
    let admin_url = admin_url(&sys.infra.postgres);

    // C, at the start and again at the end of the run.
    let measure_limit = || {
        commit_limit(
            &sys.infra.postgres,
            settings.limit_clients,
            settings.limit_secs,
        )
    };
    eprintln!("bench: measuring C, the saga-step commit rate of this PostgreSQL...");
    let limit = measure_limit().await?;

    let zipf = Arc::new(Zipf::new(settings.skus));
    let mut spread_tried = Vec::new();
    for &clients in &settings.clients {
        eprintln!(
            "bench: closed loop, {} orders and {} s at the least, over {} SKUs, {clients} clients...",
            settings.orders, settings.closed_secs, settings.skus
        );
        let zipf = zipf.clone();
        spread_tried.push(
            closed_loop(
                sys,
                &watcher,
                settings,
                clients,
                &format!("{} SKUs (Zipf)", settings.skus),
                move || sku(zipf.sample()),
            )
            .await?,
        );
    }
    let peak = spread_tried
        .iter()
        .enumerate()
        .max_by(|(_, a), (_, b)| a.0.sagas_per_sec.total_cmp(&b.0.sagas_per_sec))
        .map(|(i, _)| i)
        .ok_or_else(|| anyhow::anyhow!("no closed-loop clients given"))?;
    let mut spread = spread_tried[peak].0.clone();
    let puback = publish_latencies(sys, None).await?;

    eprintln!(
        "bench: closed loop, {} orders and {} s at the least, for one SKU, {} clients...",
        settings.orders, settings.closed_secs, spread.clients
    );
    let (mut hot, hot_ids) = closed_loop(
        sys,
        &watcher,
        settings,
        spread.clients,
        "one hot SKU",
        || HOT.to_owned(),
    )
    .await?;
    let left = sys.stock(HOT).await?.available;
    let hot_oversold = left + hot.completed as u64 != STOCK;

    let rate = settings
        .open_rate
        .unwrap_or(spread.sagas_per_sec * settings.open_at)
        .max(1.0);
    // The closed loop's reads through the APIs are counted once flushed.
    tokio::time::sleep(STATS_FLUSH).await;
    let mut open_runs = Vec::new();
    for fraction in &settings.sweep_at {
        open_runs.push(measured_open_loop(sys, &watcher, settings, rate * fraction).await?);
    }
    let main_open = measured_open_loop(sys, &watcher, settings, rate).await?;
    for _ in 0..settings.p99_probes {
        let known: Vec<(f64, f64)> = open_runs
            .iter()
            .chain([&main_open])
            .map(|run| (run.rate, run.latency.p99_ms))
            .collect();
        let Some(probe) = next_probe(&known, settings.p99_within_ms) else {
            break;
        };
        open_runs.push(measured_open_loop(sys, &watcher, settings, probe).await?);
    }

    eprintln!("bench: {} orders one at a time...", settings.alone);
    let puback_before_alone = publish_totals(sys).await?;
    let mut alone_ids = Vec::new();
    for _ in 0..settings.alone {
        let id = sys.place(request(&sku(0))).await?.order_id;
        watcher.wait(&id).await?;
        alone_ids.push(id);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let alone_puback = publish_latencies(sys, Some(&puback_before_alone)).await?;

    eprintln!("bench: measuring C again...");
    let limit_at_end = measure_limit().await?;

    // Everything is counted; now the order database may be read.
    let mut order_db = PgConnection::connect(&sys.databases[0]).await?;
    let open_ids = &main_open.ids;
    let mut open_loops = Vec::new();
    for run in open_runs.iter().chain([&main_open]) {
        open_loops.push(OpenLoop {
            rate_per_sec: run.rate,
            latency: run.latency.clone(),
            transactions_per_saga: run.cost.transactions_per_saga,
            system_cpu_ms_per_saga: run.cost.system().map(|p| p.cpu_ms_per_saga).sum(),
            system_waited_ms_per_saga: run.cost.system().map(|p| p.waited_ms_per_saga).sum(),
            idle_percent: run.beside.machine.idle_percent,
            stolen_percent: run.beside.machine.steal_percent,
            processes: run.cost.processes.clone(),
            tail: run.tail.clone(),
        });
    }
    // The main open loop's row is the last one made.
    let open_loop = open_loops
        .last()
        .expect("the main open loop ran")
        .latency
        .clone();
    open_loops.sort_by(|a, b| a.rate_per_sec.total_cmp(&b.rate_per_sec));
    let (p99_within_up_to_per_sec, p99_beyond_from_per_sec) = p99_edge(
        &open_loops
            .iter()
            .map(|run| (run.rate_per_sec, run.latency.p99_ms))
            .collect::<Vec<_>>(),
        settings.p99_within_ms,
    );
    let alone = Percentiles::of(completion_ms(&mut order_db, &alone_ids).await?);
    let mut spread_by_clients = Vec::new();
    for (run, ids) in &spread_tried {
        spread_by_clients.push(ByClients {
            clients: run.clients,
            sagas_per_sec: run.sagas_per_sec,
            latency: Percentiles::of(completion_ms(&mut order_db, ids).await?),
            transactions_per_saga: run.cost.transactions_per_saga,
            stolen_percent: run.machine.steal_percent,
        });
    }
    spread.latency = spread_by_clients[peak].latency.clone();
    hot.latency = Percentiles::of(completion_ms(&mut order_db, &hot_ids).await?);
    let open_loop_worst_per_second_ms = worst_per_second_ms(&mut order_db, open_ids).await?;
    let open_loop_hops = hops(&mut order_db, open_ids, main_open.puback).await?;
    let alone_hops = hops(&mut order_db, &alone_ids, alone_puback).await?;
    let hops = hops(&mut order_db, &spread_tried[peak].1, puback).await?;
    let headline_r = spread.sagas_per_sec * 6.0 / limit;
    Ok(Report {
        machine: machine(),
        postgres: format!(
            "PostgreSQL {} (fsync {}, synchronous_commit {})",
            setting(&admin_url, "server_version").await?,
            setting(&admin_url, "fsync").await?,
            setting(&admin_url, "synchronous_commit").await?
        ),
        nats: nats_description(sys),
        settings: format!("{settings:?}"),
        limit_commits_per_sec: limit,
        limit_at_end_commits_per_sec: limit_at_end,
        spread_by_clients,
        spread,
        hot,
        hot_oversold,
        open_rate_per_sec: rate,
        open_loop,
        open_loops,
        p99_within_ms: settings.p99_within_ms,
        p99_within_up_to_per_sec,
        p99_beyond_from_per_sec,
        open_loop_worst_per_second_ms,
        open_loop_hops,
        open_loop_beside: main_open.beside,
        open_loop_cost: main_open.cost,
        open_loop_statements: main_open.statements,
        alone,
        alone_hops,
        hops,
        headline_r,
    })
}

/// A one-unit order of `sku` with a fresh idempotency key.
fn request(sku: &str) -> contracts::order::v1::PlaceOrderRequest {
    order_request(
        &uuid::Uuid::new_v4().to_string(),
        "bench",
        "DE",
        "bench@example.com",
        &[(sku, 1)],
    )
}

/// `clients` clients, each placing an order and waiting for its saga to end
/// before the next, until `orders` are placed and `closed_secs` have
/// passed; counted from the first place to the last end, and quiet again.
async fn closed_loop(
    sys: &System,
    watcher: &EndWatcher,
    settings: &Settings,
    clients: usize,
    catalogue: &str,
    pick: impl Fn() -> String + Send + Sync + 'static,
) -> anyhow::Result<(ClosedLoop, Vec<String>)> {
    let pick = Arc::new(pick);
    // Whatever ran before (stock set-up, the previous run's reads) is
    // counted by PostgreSQL's statistics only once its backends flush them.
    tokio::time::sleep(STATS_FLUSH).await;
    let before = Counters::read(sys).await?;
    if settings.statements {
        reset_statements(sys).await?;
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let machine_before = MachineCpu::ticks();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(settings.closed_secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, pick, api, watcher, total) = (
            next.clone(),
            pick.clone(),
            sys.clients.clone(),
            watcher.clone(),
            settings.orders,
        );
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total
                || Instant::now() < until
            {
                let id = api.place(request(&pick())).await?.order_id;
                watcher.wait(&id).await?;
                ids.push(id);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await??);
    }
    let machine = MachineCpu::between(&machine_before, &MachineCpu::ticks());
    let last_end = ids
        .iter()
        .filter_map(|id| watcher.ended_at(id))
        .max()
        .unwrap_or_else(Instant::now);
    let seconds = last_end.duration_since(started).as_secs_f64();
    let mut ended_per_tenth = vec![0u32; ((seconds * 10.0).ceil() as usize).max(1)];
    let last_tenth = ended_per_tenth.len() - 1;
    for id in &ids {
        if let Some(at) = watcher.ended_at(id) {
            let tenth = (at.duration_since(started).as_secs_f64() * 10.0) as usize;
            ended_per_tenth[tenth.min(last_tenth)] += 1;
        }
    }
    quiet(sys).await?;
    let after = Counters::read(sys).await?;
    let statements = if settings.statements {
        statements_per_saga(sys, ids.len()).await?
    } else {
        Vec::new()
    };
    // The order service marks COMPLETED after the last event: count from its database later.
    let completed = count_completed(sys, &ids).await?;
    let cost = after.minus(&before, completed.max(1));
    let run = ClosedLoop {
        catalogue: catalogue.to_owned(),
        clients,
        orders: ids.len(),
        completed,
        seconds,
        sagas_per_sec: ids.len() as f64 / seconds,
        latency: Percentiles::default(),
        ended_per_tenth,
        cost,
        machine,
        statements,
    };
    Ok((run, ids))
}

/// Completed orders among `ids`, over the order API (after the counters are read).
async fn count_completed(sys: &System, ids: &[String]) -> anyhow::Result<usize> {
    let mut completed = 0;
    for id in ids {
        if sys.get(id).await?.status() == OrderStatus::Completed {
            completed += 1;
        }
    }
    Ok(completed)
}

/// An open loop at `rate` for `settings.open_secs`, counted from its first
/// order until the outboxes are quiet again (its latency is read later,
/// from the order database).
async fn measured_open_loop(
    sys: &System,
    watcher: &EndWatcher,
    settings: &Settings,
    rate: f64,
) -> anyhow::Result<OpenLoopRun> {
    let rate = rate.max(1.0);
    eprintln!(
        "bench: open loop at {rate:.0} orders/s for {} s...",
        settings.open_secs
    );
    let (before, beside_before) = (Counters::read(sys).await?, BesideCounters::read(sys).await?);
    let puback_before = publish_totals(sys).await?;
    if settings.statements {
        reset_statements(sys).await?;
    }
    let ids = open_loop(sys, watcher, rate, settings.open_secs, settings.skus).await?;
    let beside = BesideCounters::read(sys).await?.minus(&beside_before);
    quiet(sys).await?;
    let puback = publish_latencies(sys, Some(&puback_before)).await?;
    let cost = Counters::read(sys).await?.minus(&before, ids.len());
    let statements = if settings.statements {
        statements_per_saga(sys, ids.len()).await?
    } else {
        Vec::new()
    };
    let (latency, mut tail) = latency_between_windows(sys, &ids).await?;
    tail.autovacuum_rounds =
        AutovacuumRound::group(&beside.autovacuum_ends, tail.first_placed_unix_secs);
    Ok(OpenLoopRun {
        rate,
        ids,
        latency,
        tail,
        cost,
        beside,
        puback,
        statements,
    })
}

/// Orders arriving at `rate` per second for `secs`, whatever the system does.
async fn open_loop(
    sys: &System,
    watcher: &EndWatcher,
    rate: f64,
    secs: f64,
    skus: usize,
) -> anyhow::Result<Vec<String>> {
    let total = (rate * secs).round() as usize;
    let zipf = Arc::new(Zipf::new(skus));
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
        let (clients, watcher, zipf) = (sys.clients.clone(), watcher.clone(), zipf.clone());
        tasks.push(tokio::spawn(async move {
            let id = clients.place(request(&sku(zipf.sample()))).await?.order_id;
            watcher.wait(&id).await?;
            anyhow::Ok(id)
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await??);
    }
    Ok(ids)
}

/// Sagas completed per second over a closed loop of `seconds`, a point at
/// the middle of each tenth of a second: its count over its length. The
/// last tenth, cut short where the loop ended, joins the one before it (a
/// few sagas over a sliver of time would draw a spike).
pub fn throughput_over_time(ended_per_tenth: &[u32], seconds: f64) -> Vec<(f64, f64)> {
    let mut spans: Vec<(f64, f64, u32)> = ended_per_tenth
        .iter()
        .enumerate()
        .map(|(i, n)| (i as f64 / 10.0, (i + 1) as f64 / 10.0, *n))
        .collect();
    if let Some(last) = spans.pop() {
        let end = seconds.max(last.0 + 0.01).min(last.1);
        match spans.last_mut() {
            Some(before) if end - last.0 < 0.1 - 1e-9 => {
                before.1 = end;
                before.2 += last.2;
            }
            _ => spans.push((last.0, end, last.2)),
        }
    }
    spans
        .into_iter()
        .map(|(start, end, n)| ((start + end) / 2.0, n as f64 / (end - start)))
        .collect()
}

/// Placed -> COMPLETED over `ids`, read between two measured windows on a
/// connection of its own: it is closed, and its backend has reported its
/// one transaction as it ended, before the next window counts.
async fn latency_between_windows(
    sys: &System,
    ids: &[String],
) -> anyhow::Result<(Percentiles, Tail)> {
    let mut db = PgConnection::connect(&sys.databases[0]).await?;
    let latency = Percentiles::of(completion_ms(&mut db, ids).await?);
    let (first_placed_unix_secs, sagas) = saga_times(&mut db, ids).await?;
    let tail = Tail::of(&sagas, latency.p99_ms, first_placed_unix_secs);
    db.close().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((latency, tail))
}

/// An idle PostgreSQL backend flushes its transaction counts to
/// `pg_stat_database` within 10 s (PGSTAT_IDLE_INTERVAL); a busy one every
/// second. The background work of those seconds is counted too.
const STATS_FLUSH: Duration = Duration::from_secs(11);

/// Waits until no service has an unsent outbox row (their own gauge) and
/// the statistics have been flushed.
async fn quiet(sys: &System) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // The gauge is sampled every 2 s: wait for a fresh sample first.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let mut backlog = 0.0;
        for service in SERVICES {
            backlog += metric(&sys.metrics(service).await?, "saga_outbox_backlog");
        }
        if backlog == 0.0 {
            tokio::time::sleep(STATS_FLUSH).await;
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the outboxes did not drain");
    }
}

/// The value of a metric without labels (summed over label sets if any).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum()`: the sum of no floats is -0.0, printed "-0".
        .fold(0.0, |total, value| total + value)
}

/// Atomic batches a service's relay and publisher have had stored, and
/// refused, since it started.
fn atomic_batch_counts(metrics: &str) -> (f64, f64) {
    (
        metric(metrics, "saga_relay_atomic_batches_total"),
        metric(metrics, "saga_relay_atomic_batches_refused_total"),
    )
}

/// Each service's send-to-PubAck histogram so far.
async fn publish_totals(sys: &System) -> anyhow::Result<Vec<PublishHistogram>> {
    let mut totals = Vec::new();
    for service in SERVICES {
        let text = sys.metrics(service).await?;
        totals.push(PublishHistogram::read(&text));
    }
    Ok(totals)
}

/// A service's `saga_publish_latency_seconds` as its metrics said it.
#[derive(Debug, Clone, Default)]
struct PublishHistogram {
    sum: f64,
    count: f64,
    /// (upper bound in seconds, sends within it), cumulative, by bound.
    buckets: Vec<(f64, f64)>,
}

impl PublishHistogram {
    fn read(text: &str) -> Self {
        let name = "saga_publish_latency_seconds";
        let buckets = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix("_bucket{")?;
                let le = rest.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect();
        PublishHistogram {
            sum: metric(text, &format!("{name}_sum")),
            count: metric(text, &format!("{name}_count")),
            buckets,
        }
    }

    /// The sends after `before`: its counts taken from these.
    fn since(&self, before: &PublishHistogram) -> PubAckWait {
        let count = self.count - before.count;
        if count <= 0.0 {
            return PubAckWait::default();
        }
        let within = |bound: f64| {
            let of = |h: &PublishHistogram| {
                h.buckets
                    .iter()
                    .find(|(le, _)| *le == bound)
                    .map_or(0.0, |(_, n)| *n)
            };
            of(self) - of(before)
        };
        let p99_at_most_ms = self
            .buckets
            .iter()
            .map(|(le, _)| *le)
            .find(|le| within(*le) >= count * 0.99)
            .filter(|le| le.is_finite())
            .map(|le| (le * 10_000.0).round() / 10.0);
        PubAckWait {
            mean_ms: (self.sum - before.sum) / count * 1000.0,
            p99_at_most_ms,
        }
    }
}

/// A service's wait from send to PubAck over a window.
#[derive(Debug, Clone, Default)]
struct PubAckWait {
    mean_ms: f64,
    /// The upper bound of the bucket its p99 falls in.
    p99_at_most_ms: Option<f64>,
}

/// Each service's send-to-PubAck since `before` ([`publish_totals`]), or
/// over the whole run without it.
async fn publish_latencies(
    sys: &System,
    before: Option<&[PublishHistogram]>,
) -> anyhow::Result<Vec<PubAckWait>> {
    let now = publish_totals(sys).await?;
    Ok(now
        .iter()
        .enumerate()
        .map(|(i, histogram)| {
            let zero = PublishHistogram::default();
            histogram.since(before.and_then(|b| b.get(i)).unwrap_or(&zero))
        })
        .collect())
}

/// What the counters said at one moment.
struct Counters {
    /// Per service database: (commits, rollbacks).
    transactions: Vec<(i64, i64)>,
    published: u64,
    /// Summed over the services' consumers.
    deliveries: u64,
    acks: u64,
    processes: Vec<ProcessUse>,
}

impl Counters {
    async fn read(sys: &System) -> anyhow::Result<Self> {
        let mut admin = PgConnection::connect(&admin_url(&sys.infra.postgres)).await?;
        let mut transactions = Vec::new();
        for url in &sys.databases {
            let name = url.rsplit('/').next().unwrap_or_default();
            let row: (i64, i64) = sqlx::query_as(
                "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
            )
            .bind(name)
            .fetch_one(&mut admin)
            .await?;
            transactions.push(row);
        }
        admin.close().await?;
        let counts = sys.consumer_counts().await?;
        let published = sys.stream_messages().await?;
        Ok(Counters {
            transactions,
            published,
            deliveries: counts.iter().map(|c| c.0).sum(),
            acks: counts.iter().map(|c| c.1).sum(),
            processes: process_use(sys),
        })
    }

    fn minus(&self, before: &Counters, sagas: usize) -> Cost {
        let n = sagas as f64;
        let per_service: Vec<ServiceCost> = SERVICES
            .iter()
            .enumerate()
            .map(|(i, s)| ServiceCost {
                service: (*s).to_owned(),
                commits_per_saga: (self.transactions[i].0 - before.transactions[i].0) as f64 / n,
                rollbacks_per_saga: (self.transactions[i].1 - before.transactions[i].1) as f64 / n,
            })
            .collect();
        let commits: f64 = per_service.iter().map(|s| s.commits_per_saga).sum();
        let rollbacks: f64 = per_service.iter().map(|s| s.rollbacks_per_saga).sum();
        let processes = self
            .processes
            .iter()
            .map(|now| {
                let then = before.processes.iter().find(|p| p.name == now.name);
                let cpu = now.cpu_seconds - then.map_or(0.0, |p| p.cpu_seconds);
                // A thread that exits takes its run delay with it (a
                // backend that closed, say): never below nothing.
                let waited = now
                    .waited_seconds
                    .map(|w| (w - then.and_then(|p| p.waited_seconds).unwrap_or(0.0)).max(0.0));
                ProcessCost {
                    process: now.name.clone(),
                    cpu_seconds: cpu,
                    cpu_ms_per_saga: cpu * 1000.0 / n,
                    waited_ms_per_saga: waited.map(|w| w * 1000.0 / n),
                    peak_rss_mb: now.peak_rss_mb,
                }
            })
            .collect();
        Cost {
            transactions_per_saga: commits + rollbacks,
            commits_per_saga: commits,
            rollbacks_per_saga: rollbacks,
            per_service,
            published_per_saga: (self.published - before.published) as f64 / n,
            deliveries_per_saga: (self.deliveries - before.deliveries) as f64 / n,
            acks_per_saga: (self.acks - before.acks) as f64 / n,
            processes,
        }
    }
}

/// What one process (or a service's instances together) has used so far.
#[derive(Debug)]
struct ProcessUse {
    name: String,
    cpu_seconds: f64,
    /// Seconds its threads were ready to run but waited for a core.
    waited_seconds: Option<f64>,
    peak_rss_mb: f64,
}

/// The CPU seconds, the seconds waited for a core, and the peak RSS (MB)
/// of each service, nats-server, PostgreSQL (the postmaster with its
/// backends: their CPU and waits summed, their private memory summed plus
/// the shared memory once) and the benchmark itself.
fn process_use(sys: &System) -> Vec<ProcessUse> {
    let mut found: Vec<ProcessUse> = Vec::new();
    // A service's instances together: their CPU and waits summed, the largest peak RSS.
    for process in sys.processes.iter().chain(&sys.extra_instances) {
        if let Some(pid) = process.pid() {
            let (cpu, _) = cpu_of(pid);
            let waited = waited_of(pid);
            let rss = status_kb(pid, "VmHWM") / 1024.0;
            match found.iter_mut().find(|f| f.name == process.name()) {
                Some(service) => {
                    service.cpu_seconds += cpu;
                    service.waited_seconds = service.waited_seconds.zip(waited).map(|(a, b)| a + b);
                    service.peak_rss_mb = service.peak_rss_mb.max(rss);
                }
                None => found.push(ProcessUse {
                    name: process.name().to_owned(),
                    cpu_seconds: cpu,
                    waited_seconds: waited,
                    peak_rss_mb: rss,
                }),
            }
        }
    }
    if let Some(pid) = sys.infra.nats.pid() {
        found.push(ProcessUse {
            name: "nats-server".into(),
            cpu_seconds: cpu_of(pid).0,
            waited_seconds: waited_of(pid),
            peak_rss_mb: status_kb(pid, "VmHWM") / 1024.0,
        });
    }
    if let Some(postmaster) = sys.infra.postgres.postmaster_pid() {
        let (own, exited_children) = cpu_of(postmaster);
        let mut cpu = own + exited_children;
        let mut waited = waited_of(postmaster);
        let mut private_kb = status_kb(postmaster, "RssAnon");
        let mut shared_kb = status_kb(postmaster, "RssShmem");
        for child in children_of(postmaster) {
            cpu += cpu_of(child).0;
            waited = waited.map(|w| w + waited_of(child).unwrap_or(0.0));
            private_kb += status_kb(child, "RssAnon");
            shared_kb = shared_kb.max(status_kb(child, "RssShmem"));
        }
        found.push(ProcessUse {
            name: "postgres".into(),
            cpu_seconds: cpu,
            waited_seconds: waited,
            peak_rss_mb: (private_kb + shared_kb) / 1024.0,
        });
    }
    // The benchmark itself (its gRPC clients and watcher) shares the cores.
    let own = std::process::id();
    found.push(ProcessUse {
        name: "load".into(),
        cpu_seconds: cpu_of(own).0,
        waited_seconds: waited_of(own),
        peak_rss_mb: status_kb(own, "VmHWM") / 1024.0,
    });
    found
}

/// Seconds the threads of process `pid` that are alive now have spent
/// ready to run but waiting for a core (the second figure of each
/// `/proc/<pid>/task/<tid>/schedstat`, in nanoseconds); None where the
/// kernel keeps no such figures (or the process is gone).
fn waited_of(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut waited_ns = None;
    for task in tasks.flatten() {
        let Ok(line) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue; // exited meanwhile
        };
        if let Some(ns) = run_delay_ns(&line) {
            *waited_ns.get_or_insert(0u64) += ns;
        }
    }
    waited_ns.map(|ns| ns as f64 / 1e9)
}

/// The run delay of a `schedstat` line: "<on the cpu ns> <waited ns> <timeslices>".
fn run_delay_ns(schedstat: &str) -> Option<u64> {
    let fields: Vec<&str> = schedstat.split_whitespace().collect();
    match fields.as_slice() {
        [_, waited, _] => waited.parse().ok(),
        _ => None,
    }
}

/// (own CPU seconds, CPU seconds of waited-for children) of process `pid`.
fn cpu_of(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the command name (which may hold spaces) start at state.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse().ok())
        .collect();
    let ticks = 100.0; // USER_HZ on Linux
    match fields.as_slice() {
        [utime, stime, cutime, cstime] => ((utime + stime) / ticks, (cutime + cstime) / ticks),
        _ => (0.0, 0.0),
    }
}

fn status_kb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Milliseconds from each order's placing to its COMPLETED, for the completed ones.
async fn completion_ms(db: &mut PgConnection, ids: &[String]) -> anyhow::Result<Vec<f64>> {
    let ids: Vec<uuid::Uuid> = ids.iter().filter_map(|i| i.parse().ok()).collect();
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM (c.at - o.created_at))::float8 * 1000
         FROM orders o JOIN order_status_changes c ON c.order_id = o.order_id
         WHERE o.order_id = ANY($1) AND c.status = 'COMPLETED'",
    )
    .bind(&ids)
    .fetch_all(&mut *db)
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// The completed sagas among `ids`, each with its time in each of
/// [`HOPS`], and when the first of them was placed (Unix time, seconds).
async fn saga_times(
    db: &mut PgConnection,
    ids: &[String],
) -> anyhow::Result<(f64, Vec<SagaTimes>)> {
    let ids: Vec<uuid::Uuid> = ids.iter().filter_map(|i| i.parse().ok()).collect();
    let rows: Vec<(f64, f64, f64, f64, f64, f64)> = sqlx::query_as(
        "WITH t AS (
             SELECT o.created_at,
                    (SELECT min(occurred_at) FROM order_timeline e
                     WHERE e.order_id = o.order_id AND e.event_type = 'inventory.reserved') AS reserved,
                    (SELECT min(occurred_at) FROM order_timeline e
                     WHERE e.order_id = o.order_id AND e.event_type = 'shipping.scheduled') AS scheduled,
                    (SELECT min(occurred_at) FROM order_timeline e
                     WHERE e.order_id = o.order_id AND e.event_type = 'notification.sent') AS sent,
                    c.at AS completed
             FROM orders o JOIN order_status_changes c ON c.order_id = o.order_id
             WHERE o.order_id = ANY($1) AND c.status = 'COMPLETED')
         SELECT EXTRACT(EPOCH FROM min(created_at) OVER ())::float8,
                EXTRACT(EPOCH FROM (created_at - min(created_at) OVER ()))::float8,
                EXTRACT(EPOCH FROM (reserved - created_at))::float8 * 1000,
                EXTRACT(EPOCH FROM (scheduled - reserved))::float8 * 1000,
                EXTRACT(EPOCH FROM (sent - scheduled))::float8 * 1000,
                EXTRACT(EPOCH FROM (completed - sent))::float8 * 1000
         FROM t WHERE reserved IS NOT NULL AND scheduled IS NOT NULL AND sent IS NOT NULL",
    )
    .bind(&ids)
    .fetch_all(&mut *db)
    .await?;
    let first = rows.first().map_or(0.0, |r| r.0);
    let sagas = rows
        .into_iter()
        .map(|(_, placed_secs, a, b, c, d)| SagaTimes {
            placed_secs,
            hops_ms: [a, b, c, d],
        })
        .collect();
    Ok((first, sagas))
}

/// The slowest placed -> COMPLETED of the orders among `ids` placed in each
/// second, from the first one placed.
async fn worst_per_second_ms(db: &mut PgConnection, ids: &[String]) -> anyhow::Result<Vec<f64>> {
    let ids: Vec<uuid::Uuid> = ids.iter().filter_map(|i| i.parse().ok()).collect();
    let rows: Vec<(f64, f64)> = sqlx::query_as(
        "WITH l AS (
             SELECT o.created_at, EXTRACT(EPOCH FROM (c.at - o.created_at))::float8 * 1000 AS ms
             FROM orders o JOIN order_status_changes c ON c.order_id = o.order_id
             WHERE o.order_id = ANY($1) AND c.status = 'COMPLETED'),
         s AS (
             SELECT floor(EXTRACT(EPOCH FROM (created_at - min(created_at) OVER ())))::float8 AS second, ms
             FROM l)
         SELECT second, max(ms) FROM s GROUP BY second ORDER BY second",
    )
    .bind(&ids)
    .fetch_all(&mut *db)
    .await?;
    Ok(rows.into_iter().map(|r| r.1).collect())
}

/// Per step: from the event that triggers it to the event its service writes,
/// from the order's timeline; and each service's send-to-PubAck.
async fn hops(
    db: &mut PgConnection,
    ids: &[String],
    puback: Vec<PubAckWait>,
) -> anyhow::Result<Vec<Hop>> {
    let ids: Vec<uuid::Uuid> = ids.iter().filter_map(|i| i.parse().ok()).collect();
    let mut result = Vec::new();
    let steps = [
        ("order", "notification.sent", None),
        ("inventory", "order.created", Some("inventory.reserved")),
        ("shipping", "inventory.reserved", Some("shipping.scheduled")),
        (
            "notification",
            "shipping.scheduled",
            Some("notification.sent"),
        ),
    ];
    for (i, (service, trigger, reaction)) in steps.into_iter().enumerate() {
        let rows: Vec<(f64,)> = match reaction {
            Some(reaction) => {
                sqlx::query_as(
                    "SELECT EXTRACT(EPOCH FROM (r.occurred_at - t.occurred_at))::float8 * 1000
                     FROM order_timeline t JOIN order_timeline r ON r.order_id = t.order_id
                     WHERE t.order_id = ANY($1) AND t.event_type = $2 AND r.event_type = $3",
                )
                .bind(&ids)
                .bind(trigger)
                .bind(reaction)
                .fetch_all(&mut *db)
                .await?
            }
            // The order service's own hop: the last event to COMPLETED.
            None => {
                sqlx::query_as(
                    "SELECT EXTRACT(EPOCH FROM (c.at - t.occurred_at))::float8 * 1000
                     FROM order_timeline t JOIN order_status_changes c ON c.order_id = t.order_id
                     WHERE t.order_id = ANY($1) AND t.event_type = $2 AND c.status = 'COMPLETED'",
                )
                .bind(&ids)
                .bind(trigger)
                .fetch_all(&mut *db)
                .await?
            }
        };
        let wait = puback.get(i).cloned().unwrap_or_default();
        result.push(Hop {
            service: service.to_owned(),
            commit_to_puback_ms: wait.mean_ms,
            send_to_puback_p99_at_most_ms: wait.p99_at_most_ms,
            trigger_to_reaction: Percentiles::of(rows.into_iter().map(|r| r.0).collect()),
        });
    }
    Ok(result)
}

/// One line for a table: each hop's send -> PubAck and trigger -> reaction.
fn per_hop(hops: &[Hop]) -> String {
    hops.iter()
        .map(|h| {
            let p99 = match h.send_to_puback_p99_at_most_ms {
                Some(bound) => format!("p99 <= {bound} ms"),
                None => "p99 -".to_owned(),
            };
            format!(
                "{} {:.1} ms, {p99}; {:.0} / {:.0} ms",
                h.service,
                h.commit_to_puback_ms,
                h.trigger_to_reaction.p50_ms,
                h.trigger_to_reaction.p99_ms
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

async fn reset_statements(sys: &System) -> anyhow::Result<()> {
    for url in &sys.databases {
        let mut db = PgConnection::connect(url).await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut db)
            .await?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&mut db)
            .await?;
    }
    Ok(())
}

/// Each service database's statements with their calls per saga.
async fn statements_per_saga(
    sys: &System,
    sagas: usize,
) -> anyhow::Result<Vec<(String, Vec<(f64, String)>)>> {
    let mut db = PgConnection::connect(&sys.databases[0]).await?;
    let mut result = Vec::new();
    for (service, url) in SERVICES.iter().zip(&sys.databases) {
        let name = url.rsplit('/').next().unwrap_or_default();
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT s.calls, to_char(s.total_exec_time, '99990.0') || ' ms  '
                    || regexp_replace(left(s.query, 100), '\\s+', ' ', 'g')
             FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
             WHERE d.datname = $1 ORDER BY s.calls DESC LIMIT 14",
        )
        .bind(name)
        .fetch_all(&mut db)
        .await?;
        result.push((
            (*service).to_owned(),
            rows.into_iter()
                .map(|(calls, query)| (calls as f64 / sagas.max(1) as f64, query))
                .collect(),
        ));
    }
    Ok(result)
}

/// C: commits per second of one saga-step-shaped transaction (an inbox
/// insert, a conditional update of one of 1000 rows, an outbox insert) from
/// `clients` connections for `secs`, in a scratch database of the same server.
async fn commit_limit(
    postgres: &harness::Postgres,
    clients: usize,
    secs: f64,
) -> anyhow::Result<f64> {
    let mut admin = PgConnection::connect(&admin_url(postgres)).await?;
    sqlx::query("DROP DATABASE IF EXISTS bench_limit")
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    let url = postgres.create_database("bench_limit").await?;
    let mut setup = PgConnection::connect(&url).await?;
    for statement in [
        "CREATE TABLE inbox (event_id UUID PRIMARY KEY, received_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        "CREATE TABLE rows (id INT PRIMARY KEY, n BIGINT NOT NULL)",
        "INSERT INTO rows SELECT g, 0 FROM generate_series(0, 999) g",
        "CREATE TABLE outbox (seq BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL, sent_at TIMESTAMPTZ)",
    ] {
        sqlx::query(statement).execute(&mut setup).await?;
    }
    setup.close().await?;
    // Every client connects before the clock starts, and each commits at
    // least once: on a loaded machine connecting alone can outlast a short
    // window, and a rate of zero would say nothing about the server.
    let mut connections = Vec::new();
    for _ in 0..clients {
        connections.push(PgConnection::connect(&url).await?);
    }
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for mut db in connections {
        tasks.push(tokio::spawn(async move {
            let mut commits = 0u64;
            loop {
                let mut tx = db.begin().await?;
                sqlx::query("INSERT INTO inbox (event_id) VALUES ($1)")
                    .bind(uuid::Uuid::new_v4())
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE rows SET n = n + 1 WHERE id = $1 AND n >= 0")
                    .bind(rand::random_range(0..1000))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO outbox (payload) VALUES ($1)")
                    .bind(vec![0u8; 200])
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                commits += 1;
                if Instant::now() >= until {
                    break;
                }
            }
            anyhow::Ok(commits)
        }));
    }
    let mut commits = 0;
    for task in tasks {
        commits += task.await??;
    }
    Ok(commits as f64 / started.elapsed().as_secs_f64())
}

/// How far `end` is from `start`, in percent of `start`.
fn drift_percent(start: f64, end: f64) -> f64 {
    if start > 0.0 {
        (end - start) / start * 100.0
    } else {
        0.0
    }
}

fn admin_url(postgres: &harness::Postgres) -> String {
    postgres.database_url("postgres")
}

async fn setting(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let mut db = PgConnection::connect(admin_url).await?;
    let value: String = sqlx::query_scalar("SELECT current_setting($1)")
        .bind(name)
        .fetch_one(&mut db)
        .await?;
    Ok(value)
}

fn nats_description(sys: &System) -> String {
    let version = harness::nats_server_program()
        .ok()
        .and_then(|p| std::process::Command::new(p).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "nats-server".into());
    let fsync = if sys
        .infra
        .nats
        .config_text()
        .contains("sync_interval: always")
    {
        "fsync before ack"
    } else {
        "WITHOUT fsync before ack (relaxed)"
    };
    format!("{version}, {fsync}")
}

/// Cores, memory and kernel of this machine.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))?
                .split_once(':')
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {memory_gib:.0} GiB")
}

impl Report {
    /// The report as a Markdown table, the way the README shows it.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |measure: &str, value: String| {
            out.push_str(&format!("| {measure} | {value} |\n"));
        };
        row("machine", self.machine.clone());
        row("settings", self.settings.clone());
        row("servers", format!("{}; {}", self.postgres, self.nats));
        row(
            "C: saga-step commits/s of this PostgreSQL",
            format!("{:.0}", self.limit_commits_per_sec),
        );
        row(
            "C again at the end (how far the machine's speed moved)",
            format!(
                "{:.0} ({:+.0}%)",
                self.limit_at_end_commits_per_sec,
                drift_percent(
                    self.limit_commits_per_sec,
                    self.limit_at_end_commits_per_sec
                )
            ),
        );
        row(
            &format!(
                "closed loop, {}, by clients: completed sagas/s; placed -> COMPLETED p50 / p99",
                self.spread.catalogue
            ),
            self.spread_by_clients
                .iter()
                .map(|run| {
                    format!(
                        "{} clients {:.1}/s, {:.0} / {:.0} ms{}",
                        run.clients,
                        run.sagas_per_sec,
                        run.latency.p50_ms,
                        run.latency.p99_ms,
                        stolen(run.stolen_percent)
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        );
        for run in [&self.spread, &self.hot] {
            row(
                &format!("closed loop, {}: completed sagas/s", run.catalogue),
                format!(
                    "{:.1} ({} clients, {} orders, {} completed, {:.1} s); placed -> COMPLETED p50 {:.0} ms, p99 {:.0} ms{}",
                    run.sagas_per_sec,
                    run.clients,
                    run.orders,
                    run.completed,
                    run.seconds,
                    run.latency.p50_ms,
                    run.latency.p99_ms,
                    stolen(run.machine.steal_percent)
                ),
            );
        }
        row(
            "one hot SKU / spread throughput",
            format!(
                "{:.2}{}",
                self.hot.sagas_per_sec / self.spread.sagas_per_sec,
                if self.hot_oversold {
                    " — OVERSOLD"
                } else {
                    ", never oversold"
                }
            ),
        );
        row(
            "R = spread sagas/s x 6 / C",
            format!("{:.2}", self.headline_r),
        );
        row(
            &format!(
                "open loop at {:.0}/s: placed -> COMPLETED",
                self.open_rate_per_sec
            ),
            percentiles(&self.open_loop),
        );
        row(
            "open loops by rate: placed -> COMPLETED p50 / p99; transactions, CPU ms and ms waited for a core (services, NATS, PostgreSQL) per saga, and how many of their threads waited at a time; the machine idle",
            self.open_loops
                .iter()
                .map(|run| {
                    let waited = run
                        .system_waited_ms_per_saga
                        .map(|w| {
                            format!(
                                ", waited {w:.1} ms ({:.1} at a time)",
                                w * run.rate_per_sec / 1000.0
                            )
                        })
                        .unwrap_or_default();
                    format!(
                        "{:.0}/s: {:.0} / {:.0} ms, {:.1} tx, {:.1} ms{waited}, {:.0}% idle{}",
                        run.rate_per_sec,
                        run.latency.p50_ms,
                        run.latency.p99_ms,
                        run.transactions_per_saga,
                        run.system_cpu_ms_per_saga,
                        run.idle_percent,
                        stolen(run.stolen_percent)
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        );
        row(
            &format!(
                "open loops' slowest sagas (p99 and up): ms in each hop ({}), against every saga's median; in how many of the loop's half-seconds they were placed (how many at how many s from its first order); the autovacuum rounds that ended meanwhile (s)",
                HOPS.join(", ")
            ),
            self.open_loops
                .iter()
                .map(|run| {
                    let ms = |hops: &[f64; 4]| {
                        hops.iter()
                            .map(|h| format!("{h:.1}"))
                            .collect::<Vec<_>>()
                            .join(" / ")
                    };
                    let placed = run
                        .tail
                        .placed
                        .iter()
                        .map(|(at, n)| format!("{n}@{at:.1}"))
                        .collect::<Vec<_>>()
                        .join(" ");
                    let rounds = match run.tail.autovacuum_rounds.as_slice() {
                        [] => "no autovacuum round".to_string(),
                        rounds => rounds
                            .iter()
                            .map(|r| {
                                format!(
                                    "{} {:.1}-{:.1}",
                                    r.database, r.first_ended_secs, r.last_ended_secs
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
                    };
                    format!(
                        "{:.0}/s: {} sagas, {} against {}, in {} of {} ({placed}); {rounds}",
                        run.rate_per_sec,
                        run.tail.sagas,
                        ms(&run.tail.hops_ms),
                        ms(&run.tail.median_hops_ms),
                        run.tail.placed.len(),
                        run.tail.half_seconds
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        );
        row(
            &format!(
                "highest open-loop rate run with p99 <= {:.0} ms",
                self.p99_within_ms
            ),
            {
                let of_peak = |rate: f64| {
                    format!(
                        "{rate:.0}/s ({:.0}% of the spread peak)",
                        rate * 100.0 / self.spread.sagas_per_sec
                    )
                };
                let within = match self.p99_within_up_to_per_sec {
                    Some(rate) => of_peak(rate),
                    None => "none of the rates run".into(),
                };
                match self.p99_beyond_from_per_sec {
                    Some(rate) => format!("{within}; beyond it from {}", of_peak(rate)),
                    None => within,
                }
            },
        );
        row(
            "one order alone: placed -> COMPLETED",
            percentiles(&self.alone),
        );
        let cost = &self.spread.cost;
        row(
            "services' PostgreSQL transactions per saga (spread)",
            cost.transactions(),
        );
        row(
            "NATS per saga (spread)",
            format!(
                "{:.1} published, {:.1} delivered, {:.1} acked",
                cost.published_per_saga, cost.deliveries_per_saga, cost.acks_per_saga
            ),
        );
        row(
            "CPU ms per saga, peak RSS (spread; a service's instances together, the largest RSS)",
            cost.cpu(),
        );
        let m = &self.spread.machine;
        row(
            "the machine's CPU while the spread clients ran (all cores)",
            m.summary(),
        );
        for (name, hops) in [
            ("spread", &self.hops),
            ("open loop", &self.open_loop_hops),
            ("alone", &self.alone_hops),
        ] {
            row(
                &format!(
                    "per hop ({name}): send -> PubAck mean, p99 (bucket bound); trigger -> reaction p50 / p99"
                ),
                per_hop(hops),
            );
        }
        row(
            "services' PostgreSQL transactions per saga (open loop)",
            self.open_loop_cost.transactions(),
        );
        row(
            "CPU ms per saga, peak RSS (open loop)",
            self.open_loop_cost.cpu(),
        );
        let b = &self.open_loop_beside;
        row(
            "beside the open loop",
            format!(
                "PostgreSQL: {} autovacuums, {} autoanalyzes, {} checkpoints; the machine: {}",
                b.autovacuums,
                b.autoanalyzes,
                b.checkpoints,
                b.machine.summary()
            ),
        );
        row(
            "open loop: slowest order placed in each second, ms",
            self.open_loop_worst_per_second_ms
                .iter()
                .map(|ms| format!("{ms:.0}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
        let mut table = format!("| measure | value |\n| --- | --- |\n{out}");
        for (run, by_service) in [
            ("spread", &self.spread.statements),
            ("hot SKU", &self.hot.statements),
            ("open loop", &self.open_loop_statements),
        ] {
            for (service, statements) in by_service {
                table.push_str(&format!("\n{service}: statements per saga ({run})\n"));
                for (per_saga, query) in statements {
                    table.push_str(&format!("  {per_saga:>6.2}  {query}\n"));
                }
            }
        }
        table
    }

    /// Throughput over time (both closed loops) and the latency distribution
    /// (open loop, and one order alone), as one SVG.
    pub fn svg(&self) -> String {
        let (w, h) = (900.0, 320.0);
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
            w
        );
        // Left: completed sagas per second.
        let plot = |x0: f64, title: &str, series: &[Series], x_label: &str, y_label: &str| {
            let (pw, ph, left, top) = (360.0, 220.0, x0 + 50.0, 40.0);
            let max_x = series
                .iter()
                .flat_map(|s| s.2.iter().map(|p| p.0))
                .fold(1.0_f64, f64::max);
            let max_y = axis_top(
                series
                    .iter()
                    .flat_map(|s| s.2.iter().map(|p| p.1))
                    .fold(1.0_f64, f64::max),
            );
            let mut g = format!(
                "<text x=\"{}\" y=\"20\" font-weight=\"bold\">{title}</text>\n<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>\n",
                x0 + 50.0
            );
            for i in 0..=4 {
                let y = top + ph - ph * i as f64 / 4.0;
                g.push_str(&format!(
                    "<text x=\"{}\" y=\"{:.0}\" text-anchor=\"end\">{:.0}</text>\n",
                    left - 4.0,
                    y + 4.0,
                    max_y * i as f64 / 4.0
                ));
                let x = left + pw * i as f64 / 4.0;
                // A short axis (a closed loop of under 10 s) in tenths.
                let tick = max_x * i as f64 / 4.0;
                let tick = if max_x < 10.0 {
                    format!("{tick:.1}")
                } else {
                    format!("{tick:.0}")
                };
                g.push_str(&format!(
                    "<text x=\"{x:.0}\" y=\"{}\" text-anchor=\"middle\">{tick}</text>\n",
                    top + ph + 16.0,
                ));
            }
            g.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 {} {})\">{y_label}</text>\n",
                left + pw / 2.0, top + ph + 34.0, x0 + 12.0, top + ph / 2.0, x0 + 12.0, top + ph / 2.0
            ));
            for (i, (name, colour, points)) in series.iter().enumerate() {
                let path: Vec<String> = points
                    .iter()
                    .map(|(x, y)| {
                        format!(
                            "{:.1},{:.1}",
                            left + pw * x / max_x,
                            top + ph - ph * y / max_y
                        )
                    })
                    .collect();
                g.push_str(&format!(
                    "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{name}</text>\n",
                    path.join(" "),
                    left + 8.0,
                    top + 16.0 + 14.0 * i as f64
                ));
            }
            g
        };
        let per_second = |run: &ClosedLoop| throughput_over_time(&run.ended_per_tenth, run.seconds);
        out.push_str(&plot(
            0.0,
            "Closed loop: sagas completed per second",
            &[
                (&self.spread.catalogue, "#1f77b4", per_second(&self.spread)),
                ("one hot SKU", "#d62728", per_second(&self.hot)),
            ],
            "seconds",
            "sagas/s",
        ));
        let cdf = |p: &Percentiles| -> Vec<(f64, f64)> {
            p.quantiles_ms
                .iter()
                .enumerate()
                .map(|(i, ms)| (*ms, i as f64))
                .collect()
        };
        out.push_str(&plot(
            450.0,
            "Placed to COMPLETED: latency distribution",
            &[
                (
                    &format!("open loop at {:.0}/s", self.open_rate_per_sec),
                    "#2ca02c",
                    cdf(&self.open_loop),
                ),
                ("one order alone", "#9467bd", cdf(&self.alone)),
            ],
            "ms",
            "% of orders",
        ));
        out.push_str(&format!(
            "<text x=\"10\" y=\"{}\" fill=\"#555\">{} — {} — {}</text>\n</svg>\n",
            h - 10.0,
            self.machine,
            self.postgres,
            self.nats
        ));
        out
    }
}

/// The top of a chart's axis of four ticks, at or above `max`: four times
/// a round step (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten), so
/// every tick reads as a round number and the chart fills most of it.
pub fn axis_top(max: f64) -> f64 {
    let rough = (max / 4.0).max(f64::MIN_POSITIVE);
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= rough * (1.0 - 1e-9))
        .unwrap_or(10.0 * power);
    4.0 * step
}

/// A line of a chart: its name, colour and points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// Below this share of the machine taken by the hypervisor a row says
/// nothing of it: a percent or two comes and goes on any guest.
const STOLEN_WORTH_SAYING: f64 = 3.0;

/// What a row adds when the hypervisor took a share of the machine worth
/// saying while it ran (its figure then measured the neighbours too).
fn stolen(percent: f64) -> String {
    if percent >= STOLEN_WORTH_SAYING {
        format!(" (the hypervisor took {percent:.0}% of the machine)")
    } else {
        String::new()
    }
}

fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} orders)",
        p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms, p.count
    )
}

/// How a backlog of unsent events drains once the broker is back.
#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub orders: usize,
    /// PlaceOrder rate while NATS was down: the producer's peak.
    pub placed_per_sec: f64,
    /// Outbox rows published per second once NATS was back.
    pub drained_per_sec: f64,
    /// Messages the streams took per second meanwhile, every service's: the
    /// order service's backlog shares the broker with the events the other
    /// services write as they work through it.
    pub stream_per_sec: f64,
    pub drain_seconds: f64,
    /// The order service's unsent rows at each second after NATS came back.
    pub unsent_each_second: Vec<i64>,
    /// Atomic batches the order service's relay had stored, and had refused
    /// as a whole (then sent row by row), when the backlog was gone.
    pub atomic_batches: f64,
    pub atomic_batches_refused: f64,
    /// The order service's resident memory when NATS came back, and its
    /// largest while the backlog drained, in MB.
    pub order_rss_mb_at_start: f64,
    pub order_rss_mb_peak: f64,
    /// Cores each process used while the backlog drained (its CPU seconds
    /// over the drain's), largest first: where the drain's time goes.
    pub cores: Vec<(String, f64)>,
    /// Where the whole machine's CPU time went meanwhile.
    pub machine: MachineCpu,
}

/// Stops NATS, places `orders` orders from `clients` clients (their events
/// pile up in the order service's outbox), starts NATS again and measures
/// how fast the backlog is published.
pub async fn drain(sys: &mut System, orders: usize, clients: usize) -> anyhow::Result<Drain> {
    let order_pid = sys.processes[0]
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the order service is not running"))?;
    let mut order_db = PgConnection::connect(&sys.databases[0]).await?;
    // The counters run from the service's start: count the drain's own.
    let batches_before = atomic_batch_counts(&sys.metrics("order").await?);
    tokio::task::block_in_place(|| sys.infra.nats.kill())?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, clients) = (next.clone(), sys.clients.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < orders {
                clients.place(request(&sku(0))).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let placed_per_sec = orders as f64 / started.elapsed().as_secs_f64();
    let backlog = unsent(&mut order_db).await?;
    eprintln!("bench: {backlog} events waiting in the order service's outbox; starting NATS again");
    let order_rss_mb_at_start = status_kb(order_pid, "VmRSS") / 1024.0;
    let mut order_rss_mb_peak = order_rss_mb_at_start;
    tokio::task::block_in_place(|| sys.infra.nats.restart())?;
    let back = Instant::now();
    let (use_before, machine_before) = (process_use(sys), MachineCpu::ticks());
    let mut stream_at_start = None;
    let mut unsent_each_second = vec![backlog];
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        order_rss_mb_peak = order_rss_mb_peak.max(status_kb(order_pid, "VmRSS") / 1024.0);
        if stream_at_start.is_none() {
            // Once the restarted server answers.
            stream_at_start = sys.stream_messages().await.ok();
        }
        let left = unsent(&mut order_db).await?;
        if back.elapsed().as_secs() as usize >= unsent_each_second.len() {
            unsent_each_second.push(left);
        }
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(1800),
            "the backlog did not drain"
        );
    }
    let drain_seconds = back.elapsed().as_secs_f64();
    let machine = MachineCpu::between(&machine_before, &MachineCpu::ticks());
    let mut cores: Vec<(String, f64)> = process_use(sys)
        .into_iter()
        .map(|now| {
            let before = use_before
                .iter()
                .find(|p| p.name == now.name)
                .map_or(0.0, |p| p.cpu_seconds);
            (now.name, (now.cpu_seconds - before) / drain_seconds)
        })
        .collect();
    cores.sort_by(|a, b| b.1.total_cmp(&a.1));
    let batches_after = atomic_batch_counts(&sys.metrics("order").await?);
    let atomic_batches = batches_after.0 - batches_before.0;
    let atomic_batches_refused = batches_after.1 - batches_before.1;
    let stream_taken = sys.stream_messages().await? - stream_at_start.unwrap_or_default();
    Ok(Drain {
        orders,
        placed_per_sec,
        drained_per_sec: backlog as f64 / drain_seconds,
        stream_per_sec: stream_taken as f64 / drain_seconds,
        drain_seconds,
        unsent_each_second,
        atomic_batches,
        atomic_batches_refused,
        order_rss_mb_at_start,
        order_rss_mb_peak,
        cores,
        machine,
    })
}

impl Drain {
    pub fn line(&self) -> String {
        format!(
            "| drain: {} events queued while NATS was down (placed at {:.0}/s) | published at {:.0}/s once it was back ({:.2}x the producer), {:.1} s, while the streams took {:.0} messages/s from all services; order service RSS {:.0} MB -> peak {:.0} MB; its relay's atomic batches {:.0} stored, {:.0} refused; unsent at each second: {}; cores used: {}; the machine: {} |",
            self.orders,
            self.placed_per_sec,
            self.drained_per_sec,
            self.drained_per_sec / self.placed_per_sec,
            self.drain_seconds,
            self.stream_per_sec,
            self.order_rss_mb_at_start,
            self.order_rss_mb_peak,
            self.atomic_batches,
            self.atomic_batches_refused,
            self.unsent_each_second
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            self.cores
                .iter()
                .map(|(process, cores)| format!("{process} {cores:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.machine.summary()
        )
    }
}

/// Outbox rows not yet published.
async fn unsent(db: &mut PgConnection) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM choreo_outbox WHERE sent_at IS NULL")
            .fetch_one(db)
            .await?,
    )
}

/// One of the two setups a comparison sets side by side ([`compare`]): a
/// build, by the folder of its binaries, and the instances of each service
/// it runs.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// What the table and the reports' files call it (`A`, `i2`).
    pub name: String,
    pub bin_dir: std::path::PathBuf,
    pub instances: usize,
}

impl Setup {
    fn describe(&self) -> String {
        format!(
            "{}: the build in {}, {} instance{} of each service",
            self.name,
            self.bin_dir.display(),
            self.instances,
            if self.instances == 1 { "" } else { "s" }
        )
    }
}

/// One open loop of a compared run.
#[derive(Debug, Clone, Serialize)]
pub struct ComparedOpenLoop {
    pub rate_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The CPU of the services, nats-server and PostgreSQL per saga.
    pub system_cpu_ms_per_saga: f64,
    /// How long their threads waited for a core per saga.
    pub system_waited_ms_per_saga: Option<f64>,
}

/// One run of a comparison ([`compare`]).
#[derive(Debug, Clone, Serialize)]
pub struct ComparedRun {
    pub round: usize,
    /// The setup that ran: 0 (the first, A) or 1 (B).
    pub setup: usize,
    pub limit_commits_per_sec: f64,
    pub limit_at_end_commits_per_sec: f64,
    pub spread_sagas_per_sec: f64,
    pub hot_sagas_per_sec: f64,
    pub hot_oversold: bool,
    /// Every open loop, in the run's order: the lighter ones, the main
    /// one, the search's probes.
    pub open_loops: Vec<ComparedOpenLoop>,
    /// The most the hypervisor took of the machine in any loop of the run.
    pub stolen_percent: f64,
}

impl ComparedRun {
    fn of(round: usize, setup: usize, report: &Report) -> ComparedRun {
        let closed = [&report.spread, &report.hot].map(|l| l.machine.steal_percent);
        let open = report.open_loops.iter().map(|l| l.stolen_percent);
        ComparedRun {
            round,
            setup,
            limit_commits_per_sec: report.limit_commits_per_sec,
            limit_at_end_commits_per_sec: report.limit_at_end_commits_per_sec,
            spread_sagas_per_sec: report.spread.sagas_per_sec,
            hot_sagas_per_sec: report.hot.sagas_per_sec,
            hot_oversold: report.hot_oversold,
            open_loops: report
                .open_loops
                .iter()
                .map(|l| ComparedOpenLoop {
                    rate_per_sec: l.rate_per_sec,
                    p50_ms: l.latency.p50_ms,
                    p99_ms: l.latency.p99_ms,
                    system_cpu_ms_per_saga: l.system_cpu_ms_per_saga,
                    system_waited_ms_per_saga: l.system_waited_ms_per_saga,
                })
                .collect(),
            stolen_percent: closed.into_iter().chain(open).fold(0.0, f64::max),
        }
    }
}

/// Alternating runs of two setups ([`compare`]): two builds, or one build
/// with one instance of each service and with more. On one machine a pair
/// alone says little (one build's runs have differed by 1.7x), so the
/// figures are the ratio of the sums over every round, the medians of each
/// open loop's latency, and in how many rounds B did better, with each
/// round's figures beside them.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub setups: [Setup; 2],
    pub runs: Vec<ComparedRun>,
}

/// Where a comparison's open loop stands: its rate, each setup's median
/// p50 and p99, and in how many rounds of how many B's p50 and p99 were
/// the lower.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenLoopVerdict {
    pub rate_per_sec: f64,
    /// Whether the rate moved by more than 1% between runs (it follows
    /// each run's peak unless the rate is fixed, `--open-rate`).
    pub rates_differ: bool,
    pub median_p50_ms: [f64; 2],
    pub median_p99_ms: [f64; 2],
    pub median_cpu_ms_per_saga: [f64; 2],
    /// The median time the system's threads waited for a core a saga;
    /// None unless every run read it.
    pub median_waited_ms_per_saga: [Option<f64>; 2],
    pub b_lower_p50: usize,
    pub b_lower_p99: usize,
    pub rounds: usize,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl Comparison {
    /// B's sagas/s over A's, summed over every round that ran both:
    /// (spread catalogue, hot SKU).
    pub fn ratio(&self) -> (f64, f64) {
        let (mut a, mut b) = ((0.0, 0.0), (0.0, 0.0));
        for (first, second) in self.rounds() {
            a.0 += first.spread_sagas_per_sec;
            a.1 += first.hot_sagas_per_sec;
            b.0 += second.spread_sagas_per_sec;
            b.1 += second.hot_sagas_per_sec;
        }
        (b.0 / a.0, b.1 / a.1)
    }

    /// Each round that ran both: its run of A, then its run of B.
    fn rounds(&self) -> Vec<(&ComparedRun, &ComparedRun)> {
        let of = |round, setup| {
            self.runs
                .iter()
                .find(|r| r.round == round && r.setup == setup)
        };
        let mut rounds: Vec<usize> = self.runs.iter().map(|r| r.round).collect();
        rounds.dedup();
        rounds
            .into_iter()
            .filter_map(|round| Some((of(round, 0)?, of(round, 1)?)))
            .collect()
    }

    /// Each open loop that every run of every round that ran both has,
    /// by its place in the runs' order.
    pub fn open_loops(&self) -> Vec<OpenLoopVerdict> {
        let rounds = self.rounds();
        let loops = rounds
            .iter()
            .map(|(a, b)| a.open_loops.len().min(b.open_loops.len()))
            .min()
            .unwrap_or(0);
        (0..loops)
            .map(|i| {
                let each = |setup: usize, figure: fn(&ComparedOpenLoop) -> f64| -> Vec<f64> {
                    rounds
                        .iter()
                        .map(|pair| figure(&[pair.0, pair.1][setup].open_loops[i]))
                        .collect()
                };
                let rates: Vec<f64> = each(0, |l| l.rate_per_sec)
                    .into_iter()
                    .chain(each(1, |l| l.rate_per_sec))
                    .collect();
                let (low, high) = rates.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), r| {
                    (lo.min(*r), hi.max(*r))
                });
                let lower = |figure: fn(&ComparedOpenLoop) -> f64| {
                    each(1, figure)
                        .iter()
                        .zip(each(0, figure))
                        .filter(|(b, a)| **b < *a)
                        .count()
                };
                OpenLoopVerdict {
                    rate_per_sec: median(rates),
                    rates_differ: high > low * 1.01,
                    median_p50_ms: [median(each(0, |l| l.p50_ms)), median(each(1, |l| l.p50_ms))],
                    median_p99_ms: [median(each(0, |l| l.p99_ms)), median(each(1, |l| l.p99_ms))],
                    median_cpu_ms_per_saga: [
                        median(each(0, |l| l.system_cpu_ms_per_saga)),
                        median(each(1, |l| l.system_cpu_ms_per_saga)),
                    ],
                    // A median only where every run read the wait.
                    median_waited_ms_per_saga: [0, 1].map(|setup| {
                        rounds
                            .iter()
                            .map(|pair| {
                                [pair.0, pair.1][setup].open_loops[i].system_waited_ms_per_saga
                            })
                            .collect::<Option<Vec<f64>>>()
                            .map(median)
                    }),
                    b_lower_p50: lower(|l| l.p50_ms),
                    b_lower_p99: lower(|l| l.p99_ms),
                    rounds: rounds.len(),
                }
            })
            .collect()
    }

    pub fn table(&self) -> String {
        let [a, b] = [&self.setups[0].name, &self.setups[1].name];
        let mut table = format!(
            "{}\n{}\n\n| round | C start / end ({a}; {b}) | spread sagas/s: {a}, {b} | hot SKU sagas/s: {a}, {b} | {b} / {a}: spread, hot | open loops, p50 / p99 ms ({a}; {b}) | the hypervisor took, at most ({a}; {b}) |\n| --- | --- | --- | --- | --- | --- | --- |\n",
            self.setups[0].describe(),
            self.setups[1].describe(),
        );
        let loops = |run: &ComparedRun| {
            run.open_loops
                .iter()
                .map(|l| format!("{:.0}/s {:.0} / {:.0}", l.rate_per_sec, l.p50_ms, l.p99_ms))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (first, second) in self.rounds() {
            let order = if self.runs.iter().position(|r| std::ptr::eq(r, first))
                < self.runs.iter().position(|r| std::ptr::eq(r, second))
            {
                a
            } else {
                b
            };
            table.push_str(&format!(
                "| {} ({order} first) | {:.0} / {:.0}; {:.0} / {:.0} | {:.1}, {:.1} | {:.1}, {:.1} | {:.2}x, {:.2}x | {}; {} | {:.0}%; {:.0}% |\n",
                first.round,
                first.limit_commits_per_sec,
                first.limit_at_end_commits_per_sec,
                second.limit_commits_per_sec,
                second.limit_at_end_commits_per_sec,
                first.spread_sagas_per_sec,
                second.spread_sagas_per_sec,
                first.hot_sagas_per_sec,
                second.hot_sagas_per_sec,
                second.spread_sagas_per_sec / first.spread_sagas_per_sec,
                second.hot_sagas_per_sec / first.hot_sagas_per_sec,
                loops(first),
                loops(second),
                first.stolen_percent,
                second.stolen_percent,
            ));
        }
        let (spread, hot) = self.ratio();
        let oversold = self.runs.iter().any(|r| r.hot_oversold);
        let rounds = match self.rounds().len() {
            1 => "1 round".to_string(),
            n => format!("{n} rounds"),
        };
        table.push_str(&format!(
            "| sums over {rounds} | | | | {spread:.2}x, {hot:.2}x | | |\n"
        ));
        let verdicts = self.open_loops();
        let waited =
            |ms: Option<f64>| ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
        if !verdicts.is_empty() {
            table.push_str(&format!(
                "\n| open loop | {a}: p50 / p99, medians | {b}: p50 / p99, medians | {b} lower: p50; p99 | CPU a saga, medians: {a}; {b} | waited for a core a saga, medians: {a}; {b} |\n| --- | --- | --- | --- | --- | --- |\n"
            ));
            for v in verdicts {
                table.push_str(&format!(
                    "| {:.0}/s{} | {:.0} / {:.0} ms | {:.0} / {:.0} ms | in {} of {}; in {} of {} | {:.1}; {:.1} ms | {}; {} |\n",
                    v.rate_per_sec,
                    if v.rates_differ {
                        " (the median: each run's rate follows its peak)"
                    } else {
                        ""
                    },
                    v.median_p50_ms[0],
                    v.median_p99_ms[0],
                    v.median_p50_ms[1],
                    v.median_p99_ms[1],
                    v.b_lower_p50,
                    v.rounds,
                    v.b_lower_p99,
                    v.rounds,
                    v.median_cpu_ms_per_saga[0],
                    v.median_cpu_ms_per_saga[1],
                    waited(v.median_waited_ms_per_saga[0]),
                    waited(v.median_waited_ms_per_saga[1]),
                ));
            }
        }
        table.push_str(&format!(
            "\nthe hot SKU {}",
            if oversold {
                "was OVERSOLD in a run"
            } else {
                "was never oversold"
            }
        ));
        table
    }
}

/// Runs the benchmark `rounds` times with each of two setups, alternating
/// which goes first (A in odd rounds, B in even ones, so that a machine
/// that drifts through the rounds favours neither), each run on a system
/// of its own that `start` gives for the setup's build (new servers and
/// services, so no run inherits another's tables or streams), and writes
/// each run's report to `<out>/<setup's name>-r<round>.json` as it ends,
/// and the comparison so far to `<out>/comparison.json`.
pub async fn compare<F, Fut>(
    start: F,
    settings: &Settings,
    setups: [Setup; 2],
    rounds: usize,
    out: &std::path::Path,
) -> anyhow::Result<Comparison>
where
    F: Fn(&Setup) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<System>>,
{
    anyhow::ensure!(
        setups[0].bin_dir != setups[1].bin_dir || setups[0].instances != setups[1].instances,
        "both setups run the same build with the same instances: there is nothing to compare"
    );
    std::fs::create_dir_all(out)?;
    let mut comparison = Comparison {
        setups,
        runs: Vec::new(),
    };
    for round in 1..=rounds {
        let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for i in order {
            let setup = comparison.setups[i].clone();
            eprintln!("bench: round {round} of {rounds}, {}", setup.describe());
            let mut sys = start(&setup).await?;
            sys.scale_to(setup.instances)?;
            let settings = Settings {
                instances: setup.instances,
                ..settings.clone()
            };
            let report = run(&sys, &settings).await?;
            drop(sys);
            std::fs::write(
                out.join(format!("{}-r{round}.json", setup.name)),
                serde_json::to_string_pretty(&report)?,
            )?;
            comparison.runs.push(ComparedRun::of(round, i, &report));
            // As it stands, so that a comparison cut short keeps its rounds.
            std::fs::write(
                out.join("comparison.json"),
                serde_json::to_string_pretty(&comparison)?,
            )?;
        }
    }
    Ok(comparison)
}

#[cfg(test)]
mod tests {
    use super::{
        AutovacuumRound, ComparedOpenLoop, ComparedRun, Comparison, MachineCpu, OpenLoopVerdict,
        STOLEN_WORTH_SAYING, SagaTimes, Setup, Tail, axis_top, drift_percent, next_probe, p99_edge,
        run_delay_ns, stolen, throughput_over_time, waited_of,
    };
    use std::time::Duration;

    #[test]
    fn autovacuum_ends_are_grouped_into_each_databases_rounds_from_the_loops_start() {
        let at = |database: &str, secs: f64| (database.to_string(), 1.8e9 + secs);
        // The order database's round ends its tables over 2.4 s, with a
        // gap of 3 s inside it; inventory's round comes between, and the
        // order database's next one 60 s later.
        let ends = [
            at("order", 18.2),
            at("inventory", 6.5),
            at("order", 16.6),
            at("order", 75.0),
            at("inventory", 6.9),
            at("order", 19.0),
            at("order", 13.6),
        ];
        let rounds = AutovacuumRound::group(&ends, 1.8e9 + 0.5);
        let seen: Vec<(&str, f64, f64, usize)> = rounds
            .iter()
            .map(|r| {
                let secs = |s: f64| (s * 10.0).round() / 10.0;
                (
                    r.database.as_str(),
                    secs(r.first_ended_secs),
                    secs(r.last_ended_secs),
                    r.runs,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("inventory", 6.0, 6.4, 2),
                ("order", 13.1, 18.5, 4),
                ("order", 74.5, 74.5, 1),
            ]
        );
        assert!(AutovacuumRound::group(&[], 0.0).is_empty());
    }

    #[test]
    fn the_tail_says_which_hop_its_sagas_waited_in_and_when_they_were_placed() {
        // 100 sagas over 10 s, 2, 2, 3 and 1 ms a hop; the two placed at
        // 5.0 and 5.1 s waited 40 ms more in the third hop.
        let mut sagas: Vec<SagaTimes> = (0..100)
            .map(|i| SagaTimes {
                placed_secs: i as f64 / 10.0,
                hops_ms: [2.0, 2.0, 3.0, 1.0],
            })
            .collect();
        sagas[50].hops_ms[2] = 43.0;
        sagas[51].hops_ms[2] = 43.0;
        let tail = Tail::of(&sagas, 48.0, 1.8e9);
        assert_eq!(tail.sagas, 2);
        assert_eq!(tail.hops_ms, [2.0, 2.0, 43.0, 1.0]);
        assert_eq!(tail.median_hops_ms, [2.0, 2.0, 3.0, 1.0]);
        // Both in the half-second from 5.0 s, of the loop's 20.
        assert_eq!(tail.placed, [(5.0, 2)]);
        assert_eq!(tail.half_seconds, 20);
        assert_eq!(tail.first_placed_unix_secs, 1.8e9);

        // A queue: every saga a little slower, the slowest spread out.
        for (i, s) in sagas.iter_mut().enumerate() {
            s.hops_ms = [2.0 + (i % 10) as f64; 4];
        }
        let tail = Tail::of(&sagas, 44.0, 1.8e9);
        assert_eq!(tail.sagas, 10);
        assert_eq!(tail.hops_ms, [11.0; 4]);
        assert_eq!(tail.placed.len(), 10);
        assert_eq!(Tail::of(&[], 1.0, 1.8e9).sagas, 0);
    }

    #[test]
    fn a_comparison_sums_every_round_that_ran_both_and_takes_each_open_loops_medians() {
        let run = |round, setup, spread, hot, p99s: [f64; 2]| ComparedRun {
            round,
            setup,
            limit_commits_per_sec: 6000.0,
            limit_at_end_commits_per_sec: 5000.0,
            spread_sagas_per_sec: spread,
            hot_sagas_per_sec: hot,
            hot_oversold: false,
            open_loops: p99s
                .iter()
                .enumerate()
                .map(|(i, p99)| ComparedOpenLoop {
                    rate_per_sec: [100.0, 400.0][i],
                    p50_ms: p99 / 4.0,
                    p99_ms: *p99,
                    system_cpu_ms_per_saga: p99 / 10.0,
                    system_waited_ms_per_saga: Some(p99 / 5.0),
                })
                .collect(),
            stolen_percent: if round == 2 { 12.4 } else { 0.0 },
        };
        let setup = |name: &str, dir: &str, instances| Setup {
            name: name.into(),
            bin_dir: dir.into(),
            instances,
        };
        let comparison = Comparison {
            setups: [setup("A", "/a", 1), setup("B", "/b", 1)],
            runs: vec![
                run(1, 0, 1000.0, 800.0, [20.0, 200.0]),
                run(1, 1, 1200.0, 800.0, [16.0, 100.0]),
                // Round 2 ran B first.
                run(2, 1, 1000.0, 1000.0, [40.0, 120.0]),
                run(2, 0, 1000.0, 1200.0, [24.0, 160.0]),
                run(3, 0, 900.0, 900.0, [28.0, 80.0]),
                run(3, 1, 1000.0, 800.0, [32.0, 100.0]),
                // A round cut short (Ctrl-C) counts for nothing.
                run(4, 1, 5000.0, 5000.0, [1.0, 1.0]),
            ],
        };
        let (spread, hot) = comparison.ratio();
        assert!((spread - 3200.0 / 2900.0).abs() < 1e-9, "{spread}");
        assert!((hot - 2600.0 / 2900.0).abs() < 1e-9, "{hot}");
        assert_eq!(
            comparison.open_loops(),
            [
                OpenLoopVerdict {
                    rate_per_sec: 100.0,
                    rates_differ: false,
                    median_p50_ms: [6.0, 8.0],
                    median_p99_ms: [24.0, 32.0],
                    median_cpu_ms_per_saga: [2.4, 3.2],
                    median_waited_ms_per_saga: [Some(4.8), Some(6.4)],
                    b_lower_p50: 1,
                    b_lower_p99: 1,
                    rounds: 3,
                },
                OpenLoopVerdict {
                    rate_per_sec: 400.0,
                    rates_differ: false,
                    median_p50_ms: [40.0, 25.0],
                    median_p99_ms: [160.0, 100.0],
                    median_cpu_ms_per_saga: [16.0, 10.0],
                    median_waited_ms_per_saga: [Some(32.0), Some(20.0)],
                    b_lower_p50: 2,
                    b_lower_p99: 2,
                    rounds: 3,
                },
            ]
        );
        let table = comparison.table();
        assert!(
            table.starts_with(
                "A: the build in /a, 1 instance of each service\nB: the build in /b, 1 instance of each service\n"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| 1 (A first) | 6000 / 5000; 6000 / 5000 | 1000.0, 1200.0 | 800.0, 800.0 | 1.20x, 1.00x | 100/s 5 / 20, 400/s 50 / 200; 100/s 4 / 16, 400/s 25 / 100 | 0%; 0% |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| 2 (B first) | 6000 / 5000; 6000 / 5000 | 1000.0, 1000.0 | 1200.0, 1000.0 | 1.00x, 0.83x |"
            ),
            "{table}"
        );
        assert!(table.contains("| 12%; 12% |"), "{table}");
        assert!(
            table.contains("| sums over 3 rounds | | | | 1.10x, 0.90x | | |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| 400/s | 40 / 160 ms | 25 / 100 ms | in 2 of 3; in 2 of 3 | 16.0; 10.0 ms | 32.0 ms; 20.0 ms |"
            ),
            "{table}"
        );
        assert!(table.ends_with("the hot SKU was never oversold"), "{table}");
    }

    #[test]
    fn an_open_loops_rate_that_follows_each_runs_peak_is_said_to_differ() {
        let run = |round, setup, rate| ComparedRun {
            round,
            setup,
            limit_commits_per_sec: 1.0,
            limit_at_end_commits_per_sec: 1.0,
            spread_sagas_per_sec: 1.0,
            hot_sagas_per_sec: 1.0,
            hot_oversold: false,
            open_loops: vec![ComparedOpenLoop {
                rate_per_sec: rate,
                p50_ms: 1.0,
                p99_ms: 2.0,
                system_cpu_ms_per_saga: 3.0,
                system_waited_ms_per_saga: None,
            }],
            stolen_percent: 0.0,
        };
        let setup = |name: &str, instances| Setup {
            name: name.into(),
            bin_dir: "/same".into(),
            instances,
        };
        let comparison = Comparison {
            setups: [setup("i1", 1), setup("i2", 2)],
            runs: vec![run(1, 0, 300.0), run(1, 1, 340.0)],
        };
        let verdicts = comparison.open_loops();
        assert!(verdicts[0].rates_differ);
        assert_eq!(verdicts[0].rate_per_sec, 320.0);
        // Runs that could not read the wait for a core say so.
        assert_eq!(verdicts[0].median_waited_ms_per_saga, [None, None]);
        assert!(comparison.table().contains("| 3.0; 3.0 ms | -; - |"));
        assert!(
            comparison
                .table()
                .contains("| 320/s (the median: each run's rate follows its peak) |"),
            "{}",
            comparison.table()
        );
        assert!(
            comparison
                .table()
                .contains("i2: the build in /same, 2 instances of each service"),
        );
    }

    #[test]
    fn a_row_says_what_the_hypervisor_took_only_when_it_is_worth_saying() {
        assert_eq!(stolen(0.0), "");
        assert_eq!(stolen(STOLEN_WORTH_SAYING - 0.1), "");
        assert_eq!(stolen(21.6), " (the hypervisor took 22% of the machine)");
    }

    #[test]
    fn the_drift_of_c_is_its_change_in_percent_of_the_first_figure() {
        assert_eq!(drift_percent(4000.0, 3000.0), -25.0);
        assert_eq!(drift_percent(2000.0, 2500.0), 25.0);
        assert_eq!(drift_percent(0.0, 2500.0), 0.0);
    }

    #[test]
    fn a_process_whose_threads_outnumber_the_cores_is_seen_waiting_for_them() {
        assert_eq!(run_delay_ns("2510901 838270 12\n"), Some(838270));
        assert_eq!(run_delay_ns("garbage"), None);
        let me = std::process::id();
        let before = waited_of(me).expect("this kernel keeps each thread's run delay");
        // Twice as many spinning threads as cores, for 300 ms: half of them
        // wait at any moment, so together they wait about as long as they run.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let until = std::time::Instant::now() + Duration::from_millis(300);
        let spinners: Vec<_> = (0..cores * 2)
            .map(|_| {
                std::thread::spawn(move || {
                    while std::time::Instant::now() < until {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        // Read while they still run: a thread's figures leave with it.
        std::thread::sleep(Duration::from_millis(250));
        let during = waited_of(me).expect("still readable");
        spinners.into_iter().for_each(|t| t.join().unwrap());
        assert!(
            during - before > 0.05,
            "{cores} cores, {} threads spinning for 250 ms waited only {:.3} s",
            cores * 2,
            during - before
        );
        assert_eq!(waited_of(u32::MAX), None, "no such process");
    }

    #[test]
    fn the_machine_split_is_each_kind_of_tick_over_all_of_them() {
        // user nice system idle iowait irq softirq steal
        let before = [100, 0, 50, 1000, 10, 0, 5, 0];
        let after = [140, 10, 70, 1010, 15, 2, 13, 5];
        let m = MachineCpu::between(&before, &after);
        assert_eq!(m.user_percent, 50.0);
        assert_eq!(m.system_percent, 20.0);
        assert_eq!(m.idle_percent, 10.0);
        assert_eq!(m.iowait_percent, 5.0);
        assert_eq!(m.interrupts_percent, 10.0);
        assert_eq!(m.steal_percent, 5.0);
        assert!(
            MachineCpu::ticks().len() == 8,
            "this machine has /proc/stat"
        );
    }

    #[test]
    fn the_search_halves_the_gap_between_the_highest_rate_within_50_ms_and_the_next_beyond() {
        // The sweep: a tenth and a quarter within, half the peak beyond.
        let mut runs = vec![(50.0, 17.0), (125.0, 27.0), (500.0, 110.0)];
        assert_eq!(next_probe(&runs, 50.0), Some(312.5));
        runs.push((312.5, 70.0));
        assert_eq!(next_probe(&runs, 50.0), Some(218.75));
        runs.push((218.75, 40.0));
        assert_eq!(next_probe(&runs, 50.0), Some(265.625));
        // A rate beyond below the highest within (noise) does not bound it.
        assert_eq!(
            next_probe(&[(100.0, 60.0), (200.0, 40.0), (400.0, 90.0)], 50.0),
            Some(300.0)
        );
        // Nothing within: from nought.
        assert_eq!(
            next_probe(&[(40.0, 80.0), (100.0, 200.0)], 50.0),
            Some(20.0)
        );
    }

    #[test]
    fn the_edge_is_the_highest_rate_within_and_the_lowest_above_it_beyond() {
        let runs = [(100.0, 60.0), (200.0, 40.0), (300.0, 70.0), (400.0, 90.0)];
        assert_eq!(p99_edge(&runs, 50.0), (Some(200.0), Some(300.0)));
        assert_eq!(p99_edge(&runs, 100.0), (Some(400.0), None));
        assert_eq!(p99_edge(&runs, 10.0), (None, Some(100.0)));
        assert_eq!(p99_edge(&[], 50.0), (None, None));
    }

    #[test]
    fn the_search_stops_when_nothing_is_beyond_or_the_gap_is_within_5_percent() {
        assert_eq!(next_probe(&[(50.0, 17.0), (500.0, 40.0)], 50.0), None);
        assert_eq!(next_probe(&[(96.0, 40.0), (100.0, 60.0)], 50.0), None);
        assert_eq!(next_probe(&[(94.0, 40.0), (100.0, 60.0)], 50.0), Some(97.0));
        assert_eq!(next_probe(&[(1.5, 60.0)], 50.0), None, "no rate under 1/s");
        assert_eq!(next_probe(&[], 50.0), None);
    }

    #[test]
    fn an_axis_ends_at_four_round_steps_at_or_above_its_largest_value() {
        assert_eq!(axis_top(100.0), 100.0);
        assert_eq!(axis_top(3190.0), 3200.0);
        assert_eq!(axis_top(142.0), 160.0);
        assert_eq!(axis_top(2100.0), 2400.0);
        assert_eq!(axis_top(1.0), 1.0);
        assert_eq!(axis_top(37.0), 40.0);
    }

    #[test]
    fn throughput_over_time_is_each_tenths_count_over_its_length() {
        // 1.25 s: twelve full tenths and a last one of 0.05 s, which joins
        // the twelfth: 140 sagas over 0.15 s.
        let mut tenths = vec![100; 12];
        tenths.push(40);
        let points = throughput_over_time(&tenths, 1.25);
        assert_eq!(points.len(), 12);
        assert!((points[0].0 - 0.05).abs() < 1e-9 && (points[0].1 - 1000.0).abs() < 1e-6);
        assert!((points[11].0 - 1.175).abs() < 1e-9, "{:?}", points[11]);
        assert!(
            (points[11].1 - 140.0 / 0.15).abs() < 1e-6,
            "{:?}",
            points[11]
        );
        // A loop that ends on a tenth keeps every tenth its own.
        let whole = throughput_over_time(&[10, 20], 0.2);
        assert_eq!(whole.len(), 2);
        for ((x, y), (want_x, want_y)) in whole.iter().zip([(0.05, 100.0), (0.15, 200.0)]) {
            assert!(
                (x - want_x).abs() < 1e-9 && (y - want_y).abs() < 1e-6,
                "{whole:?}"
            );
        }
        // A loop that ended at once still gives a finite rate.
        assert!(throughput_over_time(&[3], 0.0)[0].1.is_finite());
    }
}

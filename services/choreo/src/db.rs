//! Connecting to the service's database and applying migrations: the
//! platform's tables (tracked apart, in `_choreo_migrations`) then the service's.
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Longest a statement may run; longest a transaction may sit idle. A stuck
/// query or a forgotten transaction is cut off instead of holding locks and
/// connections for ever.
pub const STATEMENT_TIMEOUT: &str = "30s";
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "60s";
/// What the planner takes a page fetched out of order (by key) to cost, a
/// page read in sequence costing 1. A service's tables live in memory,
/// where the two cost about the same; PostgreSQL's default, 4 (for disks
/// that seek), priced a batch of 32 orders looked up by key above a scan
/// of the whole `orders` table at a few thousand rows, so the order
/// service's batches read every row of it (seen with `auto_explain` during
/// `load`). 1.1 is the usual setting for data on SSD or in memory.
pub const RANDOM_PAGE_COST: &str = "1.1";
/// How long a [`HeldConnection`] keeps its prepared statements (and with
/// them PostgreSQL's plans) before it drops them all. A statement run once
/// per batch over a table that grows (a lookup by a batch of keys, `=
/// ANY($1)` or a join with `unnest($1)`; a scan for due rows) may be planned
/// once for all its runs (PostgreSQL's generic plan) from what the table
/// looked like then; made while a young table held a few rows, that plan
/// reads the whole table (a sequential scan was cheapest), and keeps doing
/// so as the table grows until an analyze happens to replan it: measured,
/// about 500 buffers a round for 10 notifications at 10,000 rows, against
/// 40 looked up by key. Dropped every 10 s, such a plan reads a table whole
/// for seconds at most, and the next one is made from the table as it is.
///
/// Planning each batch's statements anew instead took a quarter of the
/// services' statement time in an open loop at 300 orders/s
/// (`pg_stat_statements` with `track_planning`); kept for 10 s,
/// PostgreSQL's CPU per saga fell by a tenth
/// (`docs/bench/round-2026-12-05-z.md`). The batch statements of a saga's
/// path run on held connections: a consumer's lane, the order placer and
/// the notification dispatcher. A pooled connection lives for many minutes
/// and keeps its statements as long, so a statement there must find its
/// rows by key whatever its plan (as the relay's mark by seq does).
pub const PLAN_LIFETIME: Duration = Duration::from_secs(10);

/// A count sampled on a timer over a table that only grows (orders by
/// status for a gauge or a health page) reads every row, so its cost grows
/// with the table. Its sampler waits at least this many times as long as
/// the last count took, so counting costs at most a fiftieth of the time
/// however large the table grows. Measured: counting a million orders by
/// status took 125-130 ms (190-200 ms in one backend without parallel
/// workers), a tenth of a core at one count every 2 s; counted every 6.5 s
/// instead. The 20,000 orders of a benchmark run took 12 ms, counted at the
/// usual interval.
const WAIT_PER_COUNTING: u32 = 50;

/// How long a sampler waits before its next count: `every`, or longer when
/// its last count took more than a fiftieth of that ([`WAIT_PER_COUNTING`]).
pub fn next_count_in(every: Duration, counting_took: Duration) -> Duration {
    every.max(counting_took * WAIT_PER_COUNTING)
}

/// Runs a sampler's `count` and returns its result with how long it took,
/// for [`next_count_in`]: zero when it failed (the database away can take a
/// pool's whole wait, which says nothing of what counting costs).
pub async fn timed_count<T, E>(
    count: impl std::future::Future<Output = Result<T, E>>,
) -> (Result<T, E>, Duration) {
    let started = tokio::time::Instant::now();
    let counted = count.await;
    let took = if counted.is_ok() {
        started.elapsed()
    } else {
        Duration::ZERO
    };
    (counted, took)
}

/// Longest a worker waits for a database connection: a pooled one, or a
/// [`HeldConnection`]'s connect or ping.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool for `url`, retrying until the database answers or `give_up` passes.
pub async fn connect(url: &str, give_up: Duration) -> anyhow::Result<PgPool> {
    connect_sized(url, give_up, 20).await
}

/// A pool of at most `size` connections for `url` (see [`connect`]).
pub async fn connect_sized(url: &str, give_up: Duration, size: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse::<PgConnectOptions>()?.options([
        ("statement_timeout", STATEMENT_TIMEOUT),
        (
            "idle_in_transaction_session_timeout",
            IDLE_IN_TRANSACTION_TIMEOUT,
        ),
        ("random_page_cost", RANDOM_PAGE_COST),
    ]);
    let deadline = tokio::time::Instant::now() + give_up;
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(CONNECTION_TIMEOUT)
            .connect_with(options.clone())
            .await;
        match attempt {
            Ok(pool) => return Ok(pool),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "database not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A pool for `url` (see [`connect`]) with the platform's and `service`'s
/// migrations applied: how a service, and a test of its rules, opens its database.
pub async fn open(url: &str, give_up: Duration, service: &Migrator) -> anyhow::Result<PgPool> {
    let pool = connect(url, give_up).await?;
    migrate(&pool, service).await?;
    Ok(pool)
}

/// Applies the platform's migrations and then `service`'s.
pub async fn migrate(pool: &PgPool, service: &Migrator) -> anyhow::Result<()> {
    platform_migrator().run(pool).await?;
    service.run(pool).await?;
    Ok(())
}

/// The platform's own migrations (outbox, inbox, dead letters, barrier).
pub fn platform_migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("../../migrations/choreo");
    migrator.dangerous_set_table_name("_choreo_migrations");
    migrator
}

/// Sleeps until a `NOTIFY` on a channel, a poll interval, or shutdown, whichever
/// comes first: how background workers (the relay, a service's own
/// dispatchers) wake for new rows without waiting out a whole poll. The poll
/// covers every gap: a listener that cannot connect or has lost its
/// connection, and a notification sent while nobody listened.
pub struct Wakeup {
    pool: PgPool,
    channel: &'static str,
    poll: Duration,
    listener: Option<sqlx::postgres::PgListener>,
}

impl Wakeup {
    pub fn new(pool: PgPool, channel: &'static str, poll: Duration) -> Self {
        Wakeup {
            pool,
            channel,
            poll,
            listener: None,
        }
    }

    /// Listens from now on, so a notification sent before the next
    /// [`Wakeup::wait`] is not missed. Errors leave the poll to cover.
    pub async fn listen(&mut self) {
        if self.listener.is_some() {
            return;
        }
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
            listener.listen(self.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listener.await {
            Ok(listener) => self.listener = Some(listener),
            Err(e) => {
                tracing::debug!(error = %e, channel = self.channel, "cannot listen yet; polling")
            }
        }
    }

    /// Waits for a notification (taking every one already buffered with
    /// it), the poll interval, or `shutdown`.
    pub async fn wait(&mut self, shutdown: &tokio_util::sync::CancellationToken) {
        self.listen().await;
        let poll = self.poll;
        let notified = async {
            match self.listener.as_mut() {
                Some(listener) => {
                    if listener.recv().await.is_err() {
                        // The listener reconnects on its next call; the poll covers the gap.
                        tokio::time::sleep(poll).await;
                    }
                    // Notifications that came meanwhile ask for the same round:
                    // one wake-up for all of them, not one (mostly empty) round each.
                    while listener.next_buffered().is_some() {}
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// How long a [`HeldConnection`] may sit unused before it is pinged first.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(10);

/// A connection one worker keeps for all its transactions, opened with a
/// pool's options but outside it: a consumer's lane, whose every event is a
/// transaction. The pool pings a connection when it is taken and again
/// when it is given back, two round trips on top of the five of an event's
/// transaction (BEGIN, inbox, effects, outbox, COMMIT) that a held one
/// does without.
///
/// What the pool's pings are for stays: after a transaction on it failed
/// ([`HeldConnection::run`]), and before its first use after an idle
/// spell, the connection is pinged and dropped if it does not answer, so
/// the next transaction opens a fresh one (after the database restarted,
/// say).
///
/// Its statements are prepared once and keep their plans, for
/// [`PLAN_LIFETIME`] at most: then it drops them all, and the next run of
/// each is prepared and planned from the tables as they are by then.
pub struct HeldConnection {
    options: std::sync::Arc<PgConnectOptions>,
    conn: Option<sqlx::PgConnection>,
    last_used: tokio::time::Instant,
    /// When the connection's prepared statements were last dropped (or it was opened).
    plans_since: tokio::time::Instant,
    plan_lifetime: Duration,
}

impl HeldConnection {
    /// Opens connections like `pool` does (same server, same session
    /// settings), on first use.
    pub fn like(pool: &PgPool) -> Self {
        HeldConnection {
            options: pool.connect_options(),
            conn: None,
            last_used: tokio::time::Instant::now(),
            plans_since: tokio::time::Instant::now(),
            plan_lifetime: PLAN_LIFETIME,
        }
    }

    /// The same, with prepared statements kept for `lifetime` instead of
    /// [`PLAN_LIFETIME`].
    pub fn with_plan_lifetime(mut self, lifetime: Duration) -> Self {
        self.plan_lifetime = lifetime;
        self
    }

    /// Runs `work` (one transaction's) on the connection, opened first if
    /// there is none. When it fails, the connection is checked before the
    /// next transaction may use it.
    pub async fn run<T, E: From<sqlx::Error>>(
        &mut self,
        work: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, E>,
    ) -> Result<T, E> {
        let result = match self.get().await {
            Ok(conn) => work(conn).await,
            Err(e) => Err(e.into()),
        };
        if result.is_err() {
            self.check().await;
        }
        result
    }

    /// The connection, opened if there is none.
    async fn get(&mut self) -> Result<&mut sqlx::PgConnection, sqlx::Error> {
        if self.last_used.elapsed() > CHECK_AFTER_IDLE {
            self.check().await;
        }
        if self.plans_since.elapsed() > self.plan_lifetime {
            self.drop_plans().await;
        }
        self.last_used = tokio::time::Instant::now();
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                self.plans_since = tokio::time::Instant::now();
                let connect =
                    <sqlx::PgConnection as sqlx::Connection>::connect_with(self.options.as_ref());
                tokio::time::timeout(CONNECTION_TIMEOUT, connect)
                    .await
                    .map_err(|_| {
                        sqlx::Error::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting took longer than {CONNECTION_TIMEOUT:?}"),
                        ))
                    })??
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Keeps the connection if it answers a ping, drops it if not: after
    /// a transaction on it failed, or an idle spell. A transaction left
    /// open by a failure is rolled back on the way.
    async fn check(&mut self) {
        self.keep_if("does not answer", async |conn| {
            sqlx::Connection::ping(conn).await
        })
        .await;
    }

    /// Drops the connection's prepared statements (on the server too), so
    /// each is planned again from the tables as they are now; drops the
    /// connection if that fails.
    async fn drop_plans(&mut self) {
        self.plans_since = tokio::time::Instant::now();
        self.keep_if("did not drop its statements", async |conn| {
            sqlx::Connection::clear_cached_statements(conn).await
        })
        .await;
    }

    /// Asks the connection, if there is one, to do `ask`, and drops it when
    /// that fails or takes longer than [`CONNECTION_TIMEOUT`], so the next
    /// transaction opens a fresh one.
    async fn keep_if(
        &mut self,
        otherwise: &str,
        ask: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<(), sqlx::Error>,
    ) {
        if let Some(conn) = self.conn.as_mut() {
            let answered = tokio::time::timeout(CONNECTION_TIMEOUT, ask(conn)).await;
            if !matches!(answered, Ok(Ok(()))) {
                tracing::debug!("held database connection {otherwise}; opening another");
                self.conn = None;
            }
        }
    }

    /// Says goodbye to the server, if there is a connection.
    pub async fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, sqlx::Connection::close(conn)).await;
        }
    }
}

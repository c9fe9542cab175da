//! Failover on a 3-node JetStream cluster (streams with three replicas): the
//! stream's leader is SIGKILLed while a relay publishes and a consumer
//! applies. Publishes that time out during the election are retried under the
//! same Nats-Msg-Id, the consumer carries on without a restart, and every
//! event lands once in the stream and is applied once. And a consumer cut
//! off with its node pulls again once the node is back, even when its
//! durable consumer cannot be looked up there; one whose node stays cut
//! off moves to another node and pulls there.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use choreo::choreography::Subscription;
use choreo::consumer::Consumer;
use choreo::provision::StreamSpec;
use choreo::relay::Relay;
use choreo::{Config, Decode, Envelope, EventPayload, HandleError, Handler, Outbox, Reject, Tx};
use tokio_util::sync::CancellationToken;

#[derive(Clone, PartialEq, prost::Message)]
struct Tick {
    #[prost(uint32, tag = "1")]
    n: u32,
}
impl EventPayload for Tick {
    const EVENT_TYPE: &'static str = "test.tick";
    const SCHEMA_VERSION: u32 = 1;
}
impl Decode for Tick {
    fn decode(envelope: &Envelope) -> Result<Self, Reject> {
        envelope.payload()
    }
}

struct CountEffects;

#[async_trait::async_trait]
impl Handler for CountEffects {
    type Event = Tick;

    async fn handle(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        _: Tick,
    ) -> Result<(), HandleError> {
        sqlx::query(
            "INSERT INTO effects (event_id, applied, at) VALUES ($1, 1, clock_timestamp())
             ON CONFLICT (event_id) DO UPDATE SET applied = effects.applied + 1",
        )
        .bind(envelope.id())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// The stream's info; JetStream API requests may time out while the cluster
/// settles after a kill, so ask again for a while.
async fn info_of(
    stream: &mut async_nats::jetstream::stream::Stream,
) -> async_nats::jetstream::stream::Info {
    for _ in 0..40 {
        if let Ok(info) = stream.info().await {
            return info.clone();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("no stream info within 20 s");
}

/// A 3-node cluster with JetStream up, a fresh database with the effects
/// table, and a service's configuration on them (streams of three replicas).
async fn on_a_cluster() -> (
    harness::NatsCluster,
    harness::Postgres,
    sqlx::PgPool,
    Config,
) {
    let cluster = harness::NatsCluster::start().await.expect("cluster");
    cluster
        .wait_for_jetstream(Duration::from_secs(30))
        .await
        .unwrap();
    let (pg, db) = harness::fresh_database().await.unwrap();
    let mut config = Config::new(&cluster.url(), &db);
    config.provision_jetstream = true;
    config.stream_replicas = 3;
    config.relay_poll_ms = 50;
    config.ack_wait_secs = 5;
    let no_service_migrations = sqlx::migrate::Migrator::with_migrations(vec![]);
    let pool = choreo::db::open(&db, Duration::from_secs(10), &no_service_migrations)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE effects (event_id UUID PRIMARY KEY, applied INT NOT NULL, at TIMESTAMPTZ NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    (cluster, pg, pool, config)
}

/// Ticks `from..to`, each committed in its own transaction.
async fn emit(pool: &sqlx::PgPool, config: &Config, ticks: std::ops::Range<u32>) {
    let outbox = Outbox::new("test", &config.subject_prefix);
    for n in ticks {
        let mut tx = pool.begin().await.unwrap();
        outbox
            .emit(&mut tx, &format!("saga-{}", n % 10), None, &Tick { n })
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
}

async fn applied(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until `n` events are applied, failing after `within`.
async fn until_applied(pool: &sqlx::PgPool, n: i64, within: Duration) {
    let deadline = Instant::now() + within;
    while applied(pool).await < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} events applied within {within:?}",
            applied(pool).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A relay publishing the ticks through `publisher` and a consumer applying
/// them, pulling through `puller`, once the stream is made.
struct Running {
    stream: async_nats::jetstream::stream::Stream,
    stats: Arc<choreo::consumer::ConsumerStats>,
    relay_stats: Arc<choreo::relay::RelayStats>,
    shutdown: CancellationToken,
    relay: tokio::task::JoinHandle<()>,
    consumer: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(
        pool: &sqlx::PgPool,
        config: &Config,
        publisher: async_nats::jetstream::Context,
        puller: async_nats::jetstream::Context,
    ) -> Self {
        let spec = StreamSpec::everything(config);
        let stream = choreo::provision::ensure_stream(&publisher, config, &spec, "test")
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let relay = Relay::new(pool.clone(), publisher, 64, Duration::from_millis(50));
        let relay_stats = relay.stats();
        let relay = tokio::spawn(relay.run(shutdown.clone()));
        let subscription = Subscription::of(&[Tick::EVENT_TYPE]);
        let source = choreo::provision::ConsumerSource::new(
            puller,
            config.clone(),
            "ticks",
            spec,
            subscription.subjects(&config.subject_prefix),
        );
        let consumer = Consumer::new(pool.clone(), Arc::new(CountEffects), subscription, 4);
        let stats = consumer.stats();
        let consumer = tokio::spawn(consumer.run(vec![source], shutdown.clone()));
        Running {
            stream,
            stats,
            relay_stats,
            shutdown,
            relay,
            consumer,
        }
    }

    /// Checks that no event was applied twice, and stops.
    async fn stop(self, pool: &sqlx::PgPool) {
        let twice: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE applied > 1")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(twice, 0, "an event was applied twice");
        self.shutdown.cancel();
        self.relay.await.unwrap();
        self.consumer.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_loses_nothing_and_doubles_nothing() {
    const EVENTS: u32 = 300;
    let (cluster, _pg, pool, config) = on_a_cluster().await;
    let url = cluster.url();
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let (_client, js) = choreo::runtime::connect_nats(&url, "test", None)
        .await
        .unwrap();
    let mut running = Running::start(&pool, &config, js.clone(), js).await;
    let stream = &mut running.stream;
    assert_eq!(info_of(stream).await.config.num_replicas, 3);

    // One event every 20 ms, each in its own transaction, as handlers would.
    let emitter = {
        let (pool, config) = (pool.clone(), config.clone());
        tokio::spawn(async move {
            for n in 0..EVENTS {
                emit(&pool, &config, n..n + 1).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = info_of(stream)
        .await
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("the stream has a leader");
    let killed = cluster
        .lock()
        .await
        .index_of(&leader)
        .expect("a node of ours");
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&pool)
        .await
        .unwrap();
    let kill_time = Instant::now();
    let killed_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&pool)
        .await
        .unwrap();
    cluster.lock().await.kill(killed).unwrap();
    // Stall: from the kill to the first event applied after it.
    let stall = loop {
        let after: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE at > $1")
            .bind(killed_at)
            .fetch_one(&pool)
            .await
            .unwrap();
        if after > 0 {
            break kill_time.elapsed();
        }
        assert!(
            kill_time.elapsed() < Duration::from_secs(60),
            "no event applied within 60 s of the leader kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let new_leader = info_of(stream)
        .await
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap_or_default();
    println!(
        "leader {leader} killed with {before} of {EVENTS} applied; first event applied {} ms later; new leader {new_leader}",
        stall.as_millis()
    );
    emitter.await.unwrap();
    tokio::task::block_in_place(|| {
        let mut cluster = cluster.blocking_lock();
        cluster.restart(killed)
    })
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = applied(&pool).await;
        if applied == EVENTS as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {applied} of {EVENTS} events applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unsent: i64 =
        sqlx::query_scalar("SELECT count(*) FROM choreo_outbox WHERE sent_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unsent, 0);
    assert_eq!(
        info_of(stream).await.state.messages,
        EVENTS as u64,
        "the stream holds each event once: retried publishes kept their Nats-Msg-Id"
    );
    running.stop(&pool).await;
}

/// A consumer whose node was cut off from the others pulls again once the
/// node is back, even when its durable consumer cannot be looked up there.
/// On a cluster whose nodes die every few seconds, a lookup often goes to a
/// dying node and waits out the client's whole request timeout while
/// pulling works; here node 0 refuses the lookups instead (its admin may no
/// longer ask for stream or consumer info, nor create either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_lookup_gets_no_answer_pulls_from_the_consumer_found_before() {
    let (mut cluster, _pg, pool, config) = on_a_cluster().await;
    // The relay publishes through node 1, the consumer pulls through node 0 only.
    let (_publisher, js_1) = choreo::runtime::connect_nats(cluster.node_url(1), "relay", None)
        .await
        .unwrap();
    let (_puller, js_0) = choreo::runtime::connect_nats(cluster.node_url(0), "consumer", None)
        .await
        .unwrap();
    let running = Running::start(&pool, &config, js_1, js_0.clone()).await;
    emit(&pool, &config, 0..10).await;
    until_applied(&pool, 10, Duration::from_secs(30)).await;

    let admin = "{ user: admin, password: $NATS_ADMIN_PASSWORD }";
    assert!(harness::NATS_CONFIG.contains(admin));
    let no_lookups = harness::NATS_CONFIG.replace(
        admin,
        r#"{ user: admin, password: $NATS_ADMIN_PASSWORD, permissions: { publish: { deny: [
            "$JS.API.STREAM.INFO.>", "$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>",
            "$JS.API.CONSUMER.INFO.>", "$JS.API.CONSUMER.CREATE.>", "$JS.API.CONSUMER.DURABLE.CREATE.>"] } } }"#,
    );
    tokio::task::block_in_place(|| cluster.reload(0, no_lookups)).unwrap();
    let looked_up = tokio::time::timeout(
        Duration::from_secs(3),
        js_0.get_stream(&StreamSpec::everything(&config).name),
    )
    .await;
    assert!(
        !matches!(looked_up, Ok(Ok(_))),
        "node 0 still answers lookups"
    );

    // Cut off, node 0 answers pulls with "no responders" until the consumer
    // gives them up to look its durable consumer up again.
    cluster.isolate(0, harness::Mode::Cut);
    let cut = Instant::now();
    while running.stats.pulls_given_up.load(Ordering::Relaxed) == 0 {
        assert!(
            cut.elapsed() < Duration::from_secs(60),
            "the consumer did not give its pulls up within 60 s of its node's cut"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.isolate(0, harness::Mode::Pass);
    emit(&pool, &config, 10..20).await;
    until_applied(&pool, 20, Duration::from_secs(30)).await;
    running.stop(&pool).await;
}

/// This process's metrics, as a service's endpoint serves them (one
/// recorder for the whole test process).
fn metrics_of_this_process() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("a metrics recorder")
        })
        .clone()
}

/// Which side of the flow [`moves_off_a_node_that_stays_cut_off`] cuts off.
#[derive(Clone, Copy)]
enum CutOff {
    Consumer,
    Relay,
}

/// Puts the `cut_off` side's client on whichever node it dials and the
/// other side's on another, applies ten events, then cuts that node off
/// from the other two, writes ten more and waits `within` for them: the
/// cut-off side has to move its client to a node on the other side of the
/// cut. Checks that it moved and is no longer on the cut-off node.
async fn moves_off_a_node_that_stays_cut_off(cut_off: CutOff, within: Duration) {
    let metrics = metrics_of_this_process();
    let (cluster, _pg, pool, config) = on_a_cluster().await;
    let (client, js) = choreo::runtime::connect_nats(&cluster.url(), "cut-off", None)
        .await
        .unwrap();
    // The client connects in the background.
    let connected = Instant::now();
    while client.server_info().server_name.is_empty() {
        assert!(
            connected.elapsed() < Duration::from_secs(10),
            "not connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on = cluster
        .index_of(&client.server_info().server_name)
        .expect("a node of ours");
    let (_other, js_other) =
        choreo::runtime::connect_nats(cluster.node_url((on + 1) % 3), "across", None)
            .await
            .unwrap();
    let running = match cut_off {
        CutOff::Consumer => Running::start(&pool, &config, js_other, js).await,
        CutOff::Relay => Running::start(&pool, &config, js, js_other).await,
    };
    emit(&pool, &config, 0..10).await;
    until_applied(&pool, 10, Duration::from_secs(30)).await;

    cluster.isolate(on, harness::Mode::Cut);
    let cut = Instant::now();
    emit(&pool, &config, 10..20).await;
    until_applied(&pool, 20, within).await;
    let (moves, by) = match cut_off {
        CutOff::Consumer => (running.stats.node_moves.load(Ordering::Relaxed), "pull"),
        CutOff::Relay => (
            running.relay_stats.node_moves.load(Ordering::Relaxed),
            "relay",
        ),
    };
    let moved_to = client.server_info().server_name;
    println!(
        "cut off n{}; it moved {moves} time(s), to {moved_to}, and the ten events were applied {} ms after the cut",
        on + 1,
        cut.elapsed().as_millis()
    );
    assert!(moves >= 1);
    assert_ne!(
        moved_to,
        harness::node_name(on),
        "still on the cut-off node"
    );
    let counted = format!("saga_nats_node_moves_total{{by=\"{by}\"}}");
    let text = metrics.render();
    assert!(
        text.lines().any(|line| line.starts_with(&counted)),
        "no {counted} in the metrics:\n{text}"
    );
    cluster.isolate(on, harness::Mode::Pass);
    running.stop(&pool).await;
}

/// A consumer whose node is cut off from the other two, and stays cut off,
/// moves its client to another node and pulls there. The cut-off node
/// keeps its clients, but every pull through it reaches nobody until the
/// cut heals, while the other two serve. When the consumer's leader was on
/// the cut-off node, that node goes on answering its pulls (expired, empty)
/// until it finds it lost its quorum, about 20 s here; then they reach
/// nobody, the consumer gives them up twice (3 s each) and moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_node_stays_cut_off_moves_to_another_node_and_pulls_there() {
    moves_off_a_node_that_stays_cut_off(CutOff::Consumer, Duration::from_secs(60)).await;
}

/// A relay whose node is cut off from the other two, and stays cut off,
/// moves its client to another node once its publishes have failed for
/// [`choreo::relay::MOVE_AFTER_FAILING`], and publishes there. The
/// consumer pulls through a node on the other side of the cut, so only the
/// relay's own rule can end the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_node_stays_cut_off_moves_to_another_node_and_publishes_there() {
    moves_off_a_node_that_stays_cut_off(CutOff::Relay, Duration::from_secs(90)).await;
}

//! Failover on a 3-node JetStream cluster (streams with three replicas): the
//! stream's leader is SIGKILLed while a relay publishes and a consumer
//! applies. Publishes that time out during the election are retried under the
//! same Nats-Msg-Id, the consumer carries on without a restart, and every
//! event lands once in the stream and is applied once.
use std::sync::Arc;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_loses_nothing_and_doubles_nothing() {
    const EVENTS: u32 = 300;
    let cluster = harness::NatsCluster::start().await.expect("cluster");
    cluster
        .wait_for_jetstream(Duration::from_secs(30))
        .await
        .unwrap();
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let (_pg, db) = harness::fresh_database().await.unwrap();
    let url = cluster.lock().await.url();
    let mut config = Config::new(&url, &db);
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
    let (_client, js) = choreo::runtime::connect_nats(&url, "test", None)
        .await
        .unwrap();
    let subscription = Subscription::of(&[Tick::EVENT_TYPE]);
    let mut stream =
        choreo::provision::ensure_stream(&js, &config, &StreamSpec::everything(&config), "test")
            .await
            .unwrap();
    assert_eq!(info_of(&mut stream).await.config.num_replicas, 3);

    let shutdown = CancellationToken::new();
    let relay = Relay::new(pool.clone(), js.clone(), 64, Duration::from_millis(50));
    let relay_task = tokio::spawn(relay.run(shutdown.clone()));
    let source = choreo::provision::ConsumerSource::new(
        js.clone(),
        config.clone(),
        "ticks",
        StreamSpec::everything(&config),
        subscription.subjects(&config.subject_prefix),
    );
    let consumer = Consumer::new(pool.clone(), Arc::new(CountEffects), subscription, 4);
    let consumer_task = tokio::spawn(consumer.run(vec![source], shutdown.clone()));

    // One event every 20 ms, each in its own transaction, as handlers would.
    let outbox = Outbox::new("test", &config.subject_prefix);
    let emitter = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for n in 0..EVENTS {
                let mut tx = pool.begin().await.unwrap();
                outbox
                    .emit(&mut tx, &format!("saga-{}", n % 10), None, &Tick { n })
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = info_of(&mut stream)
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
    let new_leader = info_of(&mut stream)
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
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(&pool)
            .await
            .unwrap();
        if applied == EVENTS as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {applied} of {EVENTS} events applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let twice: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE applied > 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(twice, 0, "an event was applied twice");
    let unsent: i64 =
        sqlx::query_scalar("SELECT count(*) FROM choreo_outbox WHERE sent_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unsent, 0);
    assert_eq!(
        info_of(&mut stream).await.state.messages,
        EVENTS as u64,
        "the stream holds each event once: retried publishes kept their Nats-Msg-Id"
    );
    shutdown.cancel();
    relay_task.await.unwrap();
    consumer_task.await.unwrap();
}

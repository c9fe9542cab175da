//! The platform library against a real nats-server and a real PostgreSQL,
//! both started by the harness and killed where a test needs a crash.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage};
use choreo::barrier::{self, Action, Compensation};
use choreo::choreography::Subscription;
use choreo::consumer::{self, Consumer};
use choreo::dead_letters;
use choreo::inbox::{self, Outcome};
use choreo::relay::Relay;
use choreo::{Config, Decode, Envelope, EventPayload, HandleError, Handler, Outbox, Reject, Tx};
use harness::Infra;
use prost::Message;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Clone, PartialEq, prost::Message)]
struct Ping {
    #[prost(uint32, tag = "1")]
    n: u32,
}
impl EventPayload for Ping {
    const EVENT_TYPE: &'static str = "test.ping";
    const SCHEMA_VERSION: u32 = 1;
}
impl Decode for Ping {
    fn decode(envelope: &Envelope) -> Result<Self, Reject> {
        envelope.payload()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct Mystery {}
impl EventPayload for Mystery {
    const EVENT_TYPE: &'static str = "test.mystery";
    const SCHEMA_VERSION: u32 = 1;
}

/// Counts how many times each event's effect was applied.
struct CountEffects {
    delay: Duration,
}

#[async_trait::async_trait]
impl Handler for CountEffects {
    type Event = Ping;

    async fn handle(&self, tx: &mut Tx, event: &Envelope, _ping: Ping) -> Result<(), HandleError> {
        sqlx::query(
            "INSERT INTO effects (event_id, applied) VALUES ($1, 1)
             ON CONFLICT (event_id) DO UPDATE SET applied = effects.applied + 1",
        )
        .bind(event.id())
        .execute(&mut **tx)
        .await?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(())
    }
}

struct Setup {
    infra: Infra,
    pool: PgPool,
    config: Config,
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
}

async fn setup() -> Setup {
    setup_with(Infra::start).await
}

/// With servers of our own whatever the environment says: for tests that kill them.
async fn setup_own() -> Setup {
    setup_with(Infra::start_own).await
}

async fn setup_with(start: fn() -> anyhow::Result<Infra>) -> Setup {
    let infra = tokio::task::spawn_blocking(start)
        .await
        .unwrap()
        .expect("infra");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db = infra.postgres.fresh_database().await.unwrap();
    let mut config = Config::new(infra.nats.url(), &db);
    config.stream = format!("T{id}");
    config.subject_prefix = format!("t{id}");
    config.relay_poll_ms = 100;
    config.ack_wait_secs = 5;
    let no_service_migrations = sqlx::migrate::Migrator::with_migrations(vec![]);
    let pool = choreo::db::open(&db, Duration::from_secs(10), &no_service_migrations)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE effects (event_id UUID PRIMARY KEY, applied INT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let (_client, js) = choreo::runtime::connect_nats(infra.nats.url(), "test")
        .await
        .unwrap();
    let stream = choreo::provision::ensure_stream(&js, &config, "test")
        .await
        .unwrap();
    Setup {
        infra,
        pool,
        config,
        js,
        stream,
    }
}

struct RunningConsumer {
    stats: Arc<consumer::ConsumerStats>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningConsumer {
    /// Shuts the consumer down and waits for its in-flight messages.
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

impl Setup {
    fn outbox(&self) -> Outbox {
        Outbox::new("test", &self.config.subject_prefix)
    }

    fn relay(&self, batch: i64) -> Relay {
        Relay::new(
            self.pool.clone(),
            self.js.clone(),
            batch,
            Duration::from_millis(100),
        )
    }

    /// Commits `n` ping events in one transaction.
    async fn emit(&self, n: u32) -> Vec<Envelope> {
        let outbox = self.outbox();
        let mut tx = self.pool.begin().await.unwrap();
        let mut sent = Vec::new();
        for i in 0..n {
            sent.push(
                outbox
                    .emit(&mut tx, &format!("saga-{}", i % 7), None, &Ping { n: i })
                    .await
                    .unwrap(),
            );
        }
        tx.commit().await.unwrap();
        sent
    }

    async fn stream_messages(&self) -> u64 {
        let mut stream = self.js.get_stream(&self.config.stream).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    async fn unsent(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM choreo_outbox WHERE sent_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Publishes raw bytes to the stream with their own message id.
    async fn publish_raw(&self, subject_suffix: &str, bytes: Vec<u8>) {
        self.js
            .send_publish(
                format!("{}.{subject_suffix}", self.config.subject_prefix),
                PublishMessage::build()
                    .payload(bytes.into())
                    .message_id(uuid::Uuid::new_v4().to_string()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn consumer(&self, durable: &str) -> jetstream::consumer::PullConsumer {
        self.source(durable).get().await.unwrap()
    }

    /// A consumer of `handler` with `lanes` lanes on durable `durable`, running until stopped.
    /// Consumes the ping events only.
    fn consume<H: Handler>(&self, handler: Arc<H>, lanes: usize, durable: &str) -> RunningConsumer {
        let subscription = Subscription::of(&[Ping::EVENT_TYPE]);
        let consumer = Consumer::new(self.pool.clone(), handler, subscription, lanes);
        let stats = consumer.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer.run(self.source(durable), shutdown.clone()));
        RunningConsumer {
            stats,
            shutdown,
            task,
        }
    }

    fn source(&self, durable: &str) -> choreo::provision::ConsumerSource {
        choreo::provision::ConsumerSource::new(
            self.js.clone(),
            self.config.clone(),
            durable,
            Subscription::of(&[Ping::EVENT_TYPE]),
        )
    }

    async fn effect_counts(&self) -> Vec<i32> {
        sqlx::query_scalar("SELECT applied FROM effects ORDER BY event_id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_while_nats_is_down_arrive_once_after_it_returns() {
    let mut s = setup_own().await;
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(s.relay(64).run(shutdown.clone()));

    s.infra.nats.kill().unwrap();
    s.emit(150).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.unsent().await,
        150,
        "nothing can be sent while NATS is down"
    );
    s.infra.nats.restart().unwrap();

    eventually(
        "every outbox row marked sent",
        Duration::from_secs(60),
        || async { s.unsent().await == 0 },
    )
    .await;
    assert_eq!(s.stream_messages().await, 150);
    shutdown.cancel();
    relay.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_crash_between_puback_and_mark_republishes_and_the_stream_keeps_one_copy() {
    let s = setup().await;
    s.emit(40).await;
    let crashed = s.relay(256);
    let mut conn = s.pool.acquire().await.unwrap();
    let round = crashed.publish(&mut conn).await.unwrap();
    assert_eq!(round.acked.len(), 40, "first relay saw every PubAck");
    drop(conn); // the relay dies here: nothing is marked sent
    assert_eq!(s.unsent().await, 40);

    let shutdown = CancellationToken::new();
    let relay = s.relay(256);
    let stats = relay.stats();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    eventually("rows marked sent", Duration::from_secs(30), || async {
        s.unsent().await == 0
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(
        stats.published.load(Ordering::SeqCst),
        40,
        "the second relay published every row again"
    );
    assert_eq!(
        s.stream_messages().await,
        40,
        "JetStream dropped the copies by Nats-Msg-Id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_each_row_once_and_only_one_leads() {
    let s = setup().await;
    let shutdown = CancellationToken::new();
    let (a, b) = (s.relay(32), s.relay(32));
    let (stats_a, stats_b) = (a.stats(), b.stats());
    let tasks = [
        tokio::spawn(a.run(shutdown.clone())),
        tokio::spawn(b.run(shutdown.clone())),
    ];
    for _ in 0..10 {
        s.emit(30).await;
        assert!(
            !(stats_a.leader.load(Ordering::SeqCst) && stats_b.leader.load(Ordering::SeqCst)),
            "two leaders at once"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    eventually("rows marked sent", Duration::from_secs(30), || async {
        s.unsent().await == 0
    })
    .await;
    shutdown.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let published =
        stats_a.published.load(Ordering::SeqCst) + stats_b.published.load(Ordering::SeqCst);
    assert_eq!(
        published, 300,
        "each row published exactly once across both relays"
    );
    assert!(
        stats_a.published.load(Ordering::SeqCst) == 0
            || stats_b.published.load(Ordering::SeqCst) == 0,
        "only one relay published"
    );
    assert_eq!(s.stream_messages().await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_shutdown_mid_batch_loses_nothing_and_doubles_nothing() {
    let s = setup().await;
    s.emit(5000).await;
    let shutdown = CancellationToken::new();
    let relay = s.relay(20);
    let stats = relay.stats();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    while stats.published.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    shutdown.cancel();
    task.await.unwrap();
    let after_first = s.unsent().await;
    assert!(
        after_first > 0,
        "shutdown came mid-way (unsent {after_first})"
    );

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(s.relay(256).run(shutdown.clone()));
    eventually("rows marked sent", Duration::from_secs(60), || async {
        s.unsent().await == 0
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(s.stream_messages().await, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_delivery_is_applied_once() {
    let s = setup().await;
    let handler = Arc::new(CountEffects {
        delay: Duration::ZERO,
    });
    let twice = Envelope::new("test", "saga-1", None, &Ping { n: 1 });
    // Different message ids, so JetStream's duplicate window cannot help.
    s.publish_raw("test.ping", twice.encode_to_vec()).await;
    s.publish_raw("test.ping", twice.encode_to_vec()).await;
    // Consumer killed after commit, before ack: the effect is committed and the
    // message is still in the stream, to be delivered again.
    let committed = Envelope::new("test", "saga-2", None, &Ping { n: 2 });
    assert_eq!(
        inbox::apply(&s.pool, handler.as_ref(), &committed)
            .await
            .unwrap(),
        Outcome::Applied
    );
    s.publish_raw("test.ping", committed.encode_to_vec()).await;

    let consumer = s.consume(handler, 4, "dup");
    let stats = consumer.stats.clone();
    eventually(
        "three deliveries handled",
        Duration::from_secs(30),
        || async {
            stats.applied.load(Ordering::SeqCst) + stats.duplicates.load(Ordering::SeqCst) == 3
        },
    )
    .await;
    consumer.stop().await;
    assert_eq!(stats.applied.load(Ordering::SeqCst), 1);
    assert_eq!(stats.duplicates.load(Ordering::SeqCst), 2);
    assert_eq!(s.effect_counts().await, vec![1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_messages_are_parked_with_a_reason_and_the_next_one_is_handled() {
    let s = setup().await;
    s.publish_raw("test.ping", b"\xff\xfe not protobuf at all".to_vec())
        .await;
    // A type this consumer does not subscribe to: its filter keeps it out.
    s.publish_raw(
        "test.mystery",
        Envelope::new("test", "saga-1", None, &Mystery {}).encode_to_vec(),
    )
    .await;
    let mut future_version = Envelope::new("test", "saga-1", None, &Ping { n: 1 });
    future_version.schema_version = 99;
    s.publish_raw("test.ping", future_version.encode_to_vec())
        .await;
    let valid = Envelope::new("test", "saga-1", None, &Ping { n: 2 });
    s.publish_raw("test.ping", valid.encode_to_vec()).await;

    let consumer = s.consume(
        Arc::new(CountEffects {
            delay: Duration::ZERO,
        }),
        4,
        "dlq",
    );
    let stats = consumer.stats.clone();
    eventually(
        "the valid message handled",
        Duration::from_secs(30),
        || async {
            stats.applied.load(Ordering::SeqCst) == 1 && stats.parked.load(Ordering::SeqCst) == 2
        },
    )
    .await;
    consumer.stop().await;

    let parked: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
        "SELECT stream_seq, reason, raw FROM choreo_dead_letter ORDER BY stream_seq",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap();
    let reasons: Vec<&str> = parked.iter().map(|(_, r, _)| r.as_str()).collect();
    assert_eq!(parked.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("not an event envelope"),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[1].contains("unsupported schema version 99"),
        "{}",
        reasons[1]
    );
    assert_eq!(
        parked[0].2, b"\xff\xfe not protobuf at all",
        "raw bytes kept"
    );
    assert_eq!(s.effect_counts().await, vec![1]);
    assert_eq!(
        stats.ignored.load(Ordering::SeqCst),
        0,
        "the unsubscribed type never reached the consumer"
    );
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM choreo_inbox")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(inbox, 1, "only the valid ping went through the inbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_shutdown_mid_batch_loses_nothing_and_doubles_nothing() {
    let s = setup().await;
    for i in 0..300u32 {
        let env = Envelope::new("test", &format!("saga-{}", i % 40), None, &Ping { n: i });
        s.publish_raw("test.ping", env.encode_to_vec()).await;
    }
    let handler = Arc::new(CountEffects {
        delay: Duration::from_millis(5),
    });
    let first = s.consume(handler.clone(), 8, "stop");
    let stats = first.stats.clone();
    eventually("a third handled", Duration::from_secs(30), || async {
        stats.applied.load(Ordering::SeqCst) >= 100
    })
    .await;
    first.stop().await;
    let handled_before = stats.applied.load(Ordering::SeqCst);
    assert!(handled_before < 300, "shutdown came mid-way");

    let second = s.consume(handler, 8, "stop");
    eventually("all 300 applied", Duration::from_secs(60), || async {
        s.effect_counts().await.len() == 300
    })
    .await;
    second.stop().await;
    assert!(
        s.effect_counts().await.iter().all(|&n| n == 1),
        "an effect was applied twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_barrier_orders_actions_and_compensations() {
    let s = setup().await;
    let mut tx = s.pool.begin().await.unwrap();
    // Compensation before action: recorded, nothing to undo, action refused for good.
    assert_eq!(
        barrier::compensation(&mut tx, "a", "reserve")
            .await
            .unwrap(),
        Compensation::NothingToUndo
    );
    assert_eq!(
        barrier::compensation(&mut tx, "a", "reserve")
            .await
            .unwrap(),
        Compensation::AlreadyCompensated
    );
    assert_eq!(
        barrier::action(&mut tx, "a", "reserve").await.unwrap(),
        Action::Refused
    );
    assert_eq!(
        barrier::action(&mut tx, "a", "reserve").await.unwrap(),
        Action::Refused
    );
    // Action, repeat, compensation, repeat, late action.
    assert_eq!(
        barrier::action(&mut tx, "b", "reserve").await.unwrap(),
        Action::Proceed
    );
    assert_eq!(
        barrier::action(&mut tx, "b", "reserve").await.unwrap(),
        Action::AlreadyDone
    );
    assert_eq!(
        barrier::compensation(&mut tx, "b", "reserve")
            .await
            .unwrap(),
        Compensation::Undo
    );
    assert_eq!(
        barrier::compensation(&mut tx, "b", "reserve")
            .await
            .unwrap(),
        Compensation::AlreadyCompensated
    );
    assert_eq!(
        barrier::action(&mut tx, "b", "reserve").await.unwrap(),
        Action::Refused
    );
    // Steps are independent.
    assert_eq!(
        barrier::action(&mut tx, "b", "ship").await.unwrap(),
        Action::Proceed
    );
    tx.commit().await.unwrap();

    // Racing action and compensation in two transactions: exactly one consistent story.
    for round in 0..20 {
        let saga = format!("race-{round}");
        let (pa, pc) = (s.pool.clone(), s.pool.clone());
        let (sa, sc) = (saga.clone(), saga.clone());
        let act = tokio::spawn(async move {
            let mut tx = pa.begin().await.unwrap();
            let r = barrier::action(&mut tx, &sa, "step").await.unwrap();
            tx.commit().await.unwrap();
            r
        });
        let comp = tokio::spawn(async move {
            let mut tx = pc.begin().await.unwrap();
            let r = barrier::compensation(&mut tx, &sc, "step").await.unwrap();
            tx.commit().await.unwrap();
            r
        });
        let (a, c) = (act.await.unwrap(), comp.await.unwrap());
        assert!(
            matches!(
                (a, c),
                (Action::Proceed, Compensation::Undo)
                    | (Action::Refused, Compensation::NothingToUndo)
            ),
            "inconsistent race outcome {a:?} / {c:?}"
        );
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct Pong {
    #[prost(uint32, tag = "1")]
    n: u32,
}
impl EventPayload for Pong {
    const EVENT_TYPE: &'static str = "test.pong";
    const SCHEMA_VERSION: u32 = 1;
}

/// Either of the two event types a service consumes as it evolves.
#[derive(Clone, Debug)]
#[allow(dead_code)] // the handler records the envelope's type, not the payload
enum PingOrPong {
    Ping(Ping),
    Pong(Pong),
}
impl Decode for PingOrPong {
    fn decode(envelope: &Envelope) -> Result<Self, Reject> {
        match envelope.event_type.as_str() {
            Ping::EVENT_TYPE => envelope.payload().map(PingOrPong::Ping),
            Pong::EVENT_TYPE => envelope.payload().map(PingOrPong::Pong),
            other => Err(Reject::UnknownType(other.to_owned())),
        }
    }
}

/// Records the type of each event it is given.
struct RecordsTypes;

#[async_trait::async_trait]
impl Handler for RecordsTypes {
    type Event = PingOrPong;

    async fn handle(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
        _event: PingOrPong,
    ) -> Result<(), HandleError> {
        sqlx::query("INSERT INTO effects (event_id, applied) VALUES ($1, 1)")
            .bind(envelope.id())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_with_another_subscription_moves_the_filter_and_loses_nothing() {
    let s = setup().await;
    let publish = |n: u32, pong: bool| {
        let envelope = if pong {
            Envelope::new("test", "saga-1", None, &Pong { n })
        } else {
            Envelope::new("test", "saga-1", None, &Ping { n })
        };
        let suffix = envelope.event_type.clone();
        let id = envelope.id();
        let s = &s;
        async move {
            s.publish_raw(&suffix, envelope.encode_to_vec()).await;
            id
        }
    };
    // Each version is a process of its own: its own connection, closed when it stops.
    let run = |types: &'static [&'static str]| {
        let s = &s;
        async move {
            let (client, js) = choreo::runtime::connect_nats(s.infra.nats.url(), "evolving")
                .await
                .unwrap();
            let source = choreo::provision::ConsumerSource::new(
                js,
                s.config.clone(),
                "evolving",
                Subscription::of(types),
            );
            let consumer = Consumer::new(
                s.pool.clone(),
                Arc::new(RecordsTypes),
                Subscription::of(types),
                2,
            );
            let stats = consumer.stats();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(consumer.run(source, shutdown.clone()));
            (
                client,
                RunningConsumer {
                    stats,
                    shutdown,
                    task,
                },
            )
        }
    };
    let stop = |(client, consumer): (async_nats::Client, RunningConsumer)| async move {
        consumer.stop().await;
        client.drain().await.unwrap();
    };
    let applied = |ids: Vec<uuid::Uuid>| {
        let pool = s.pool.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM effects WHERE event_id = ANY($1)")
                    .bind(&ids)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            n as usize == ids.len()
        }
    };

    // Version 1 consumes pings only.
    let v1 = run(&[Ping::EVENT_TYPE]).await;
    let first = vec![publish(1, false).await, publish(2, false).await];
    eventually("v1 handles its pings", Duration::from_secs(20), || {
        applied(first.clone())
    })
    .await;
    stop(v1).await;

    // While no instance runs, both types arrive.
    let pong_early = publish(3, true).await;
    let ping_early = publish(4, false).await;

    // Version 2 consumes pongs too: it gets everything published since v1 stopped.
    let v2 = run(&[Ping::EVENT_TYPE, Pong::EVENT_TYPE]).await;
    eventually(
        "v2 handles what arrived meanwhile",
        Duration::from_secs(20),
        || applied(vec![pong_early, ping_early]),
    )
    .await;
    let info = s
        .stream
        .get_consumer::<pull::Config>("evolving")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    let mut filters = info.filter_subjects.clone();
    filters.sort();
    assert_eq!(
        filters,
        [
            format!("{}.test.ping", s.config.subject_prefix),
            format!("{}.test.pong", s.config.subject_prefix)
        ]
    );
    assert_eq!(
        info.metadata.get("saga.service").map(String::as_str),
        Some("evolving")
    );
    stop(v2).await;

    // Version 3 consumes pongs only: later pings are filtered out, pongs arrive.
    let ping_late = publish(5, false).await;
    let pong_late = publish(6, true).await;
    let v3 = run(&[Pong::EVENT_TYPE]).await;
    eventually("v3 handles the pong", Duration::from_secs(20), || {
        applied(vec![pong_late])
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !applied(vec![ping_late]).await,
        "a ping reached a consumer that no longer reads pings"
    );
    assert_eq!(v3.1.stats.ignored.load(Ordering::SeqCst), 0);
    stop(v3).await;
    assert_eq!(s.effect_counts().await.len(), 5, "each event applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_is_idempotent() {
    let s = setup().await;
    choreo::provision::ensure_stream(&s.js, &s.config, "test")
        .await
        .unwrap();
    s.consumer("same").await;
    s.consumer("same").await;
    let info =
        s.js.get_stream(&s.config.stream)
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap();
    assert_eq!(info.config.duplicate_window, s.config.duplicate_window());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republish_past_the_duplicate_window_is_absorbed_by_the_inbox() {
    let mut s = setup().await;
    s.config.stream = format!("{}W", s.config.stream);
    s.config.subject_prefix = format!("{}w", s.config.subject_prefix);
    s.config.duplicate_window_secs = 1;
    s.stream = choreo::provision::ensure_stream(&s.js, &s.config, "test")
        .await
        .unwrap();
    s.emit(25).await;
    let relay = s.relay(256);
    let mut conn = s.pool.acquire().await.unwrap();
    assert_eq!(relay.publish(&mut conn).await.unwrap().acked.len(), 25);
    drop(conn); // PubAcks seen, rows never marked: the relay was cut off
    tokio::time::sleep(Duration::from_millis(2500)).await; // the duplicate window passes
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(s.relay(256).run(shutdown.clone()));
    eventually("rows marked sent", Duration::from_secs(30), || async {
        s.unsent().await == 0
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(
        s.stream_messages().await,
        50,
        "past the window JetStream keeps both copies"
    );

    let consumer = s.consume(
        Arc::new(CountEffects {
            delay: Duration::ZERO,
        }),
        4,
        "late",
    );
    let stats = consumer.stats.clone();
    eventually("both copies handled", Duration::from_secs(30), || async {
        stats.applied.load(Ordering::SeqCst) + stats.duplicates.load(Ordering::SeqCst) == 50
    })
    .await;
    consumer.stop().await;
    assert_eq!(stats.duplicates.load(Ordering::SeqCst), 25);
    let counts = s.effect_counts().await;
    assert_eq!(counts.len(), 25);
    assert!(counts.iter().all(|&n| n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_only_rows_past_their_retention() {
    let s = setup().await;
    s.emit(10).await;
    sqlx::query("UPDATE choreo_outbox SET sent_at = now() - interval '1 hour' WHERE seq <= 4")
        .execute(&s.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE choreo_outbox SET sent_at = now() WHERE seq BETWEEN 5 AND 6")
        .execute(&s.pool)
        .await
        .unwrap();
    for (id, age) in [
        (uuid::Uuid::now_v7(), "30 days"),
        (uuid::Uuid::now_v7(), "1 day"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO choreo_inbox (event_id, event_type, saga_id, received_at) VALUES ($1, 't', 's', now() - interval '{age}')"
        )))
        .bind(id)
        .execute(&s.pool)
        .await
        .unwrap();
    }
    let retention = choreo::cleanup::Retention::derive(&s.config);
    assert_eq!(retention.sent_outbox, s.config.duplicate_window());
    assert_eq!(
        retention.inbox,
        s.config.stream_max_age() + s.config.duplicate_window()
    );
    let (outbox, inbox) = choreo::cleanup::sweep(&s.pool, retention).await.unwrap();
    assert_eq!(
        (outbox, inbox),
        (4, 1),
        "old sent rows and the 30-day inbox row go; the rest stays"
    );
    assert_eq!(s.unsent().await, 4, "unsent rows are never deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_broker_lost_is_recreated_and_nothing_is_applied_twice() {
    let s = setup().await;
    let handler = Arc::new(CountEffects {
        delay: Duration::ZERO,
    });
    for i in 0..20u32 {
        let env = Envelope::new("test", &format!("saga-{i}"), None, &Ping { n: i });
        s.publish_raw("test.ping", env.encode_to_vec()).await;
    }
    let consumer = s.consume(handler, 4, "lost");
    let stats = consumer.stats.clone();
    eventually("the first 20 applied", Duration::from_secs(30), || async {
        stats.applied.load(Ordering::SeqCst) == 20
    })
    .await;
    // The broker forgets the durable consumer (as a crashed nats-server can).
    s.stream.delete_consumer("lost").await.unwrap();
    for i in 20..30u32 {
        let env = Envelope::new("test", &format!("saga-{i}"), None, &Ping { n: i });
        s.publish_raw("test.ping", env.encode_to_vec()).await;
    }
    eventually(
        "the consumer re-created and the last 10 applied",
        Duration::from_secs(60),
        || async { stats.applied.load(Ordering::SeqCst) == 30 },
    )
    .await;
    // The re-created consumer starts from the beginning: the inbox absorbs the first 20.
    eventually("the replay absorbed", Duration::from_secs(30), || async {
        stats.duplicates.load(Ordering::SeqCst) == 20
    })
    .await;
    consumer.stop().await;
    assert!(s.effect_counts().await.iter().all(|&n| n == 1));
    assert_eq!(s.effect_counts().await.len(), 30);
}

/// Registers an after-commit count, then fails its first `failures` attempts.
struct CountsAfterCommit {
    failures: std::sync::atomic::AtomicUsize,
    counted: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl Handler for CountsAfterCommit {
    type Event = Ping;

    async fn handle(&self, _tx: &mut Tx, event: &Envelope, _ping: Ping) -> Result<(), HandleError> {
        let counted = self.counted.clone();
        inbox::after_commit(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        if event.event_type == Mystery::EVENT_TYPE {
            return Err(HandleError::Reject(choreo::Reject::UnknownType(
                event.event_type.clone(),
            )));
        }
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(HandleError::Transient("database hiccup".into()));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_commit_work_runs_once_per_committed_event_and_never_for_a_rolled_back_attempt() {
    let s = setup().await;
    let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = CountsAfterCommit {
        failures: 2.into(),
        counted: counted.clone(),
    };
    let event = Envelope::new("test", "saga-1", None, &Ping { n: 1 });
    for _ in 0..2 {
        assert!(inbox::apply(&s.pool, &handler, &event).await.is_err());
    }
    assert_eq!(
        counted.load(Ordering::SeqCst),
        0,
        "two rolled-back attempts"
    );
    assert_eq!(
        inbox::apply(&s.pool, &handler, &event).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(counted.load(Ordering::SeqCst), 1);
    assert_eq!(
        inbox::apply(&s.pool, &handler, &event).await.unwrap(),
        Outcome::Duplicate
    );
    let unreadable = Envelope::new("test", "saga-1", None, &Mystery {});
    assert!(matches!(
        inbox::apply(&s.pool, &handler, &unreadable).await.unwrap(),
        Outcome::Parked(_)
    ));
    assert_eq!(counted.load(Ordering::SeqCst), 1);
    // Outside a handler there is no transaction to wait for: it runs at once.
    let now = counted.clone();
    inbox::after_commit(move || {
        now.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(counted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_and_replayed_once_the_service_can_read_it() {
    use choreo::dead_letters::DeadLetterApi;
    use choreo::proto::dead_letters_server::DeadLetters;
    use choreo::proto::{ListDeadLettersRequest, ReplayDeadLetterRequest};
    use tonic::{Code, Request};

    let s = setup().await;
    let api = DeadLetterApi {
        pool: s.pool.clone(),
        handler: Arc::new(CountEffects {
            delay: Duration::ZERO,
        }),
    };
    // Parked as a consumer parks: garbage, and a ping an older build could not read.
    let ping = Envelope::new("test", "saga-1", None, &Ping { n: 7 });
    dead_letters::park(
        &s.pool,
        "S",
        1,
        "t.garbage",
        "not an event envelope",
        b"\xff\x00junk",
    )
    .await
    .unwrap();
    let old_reason = "unknown event type \"test.ping\"";
    for seq in [2, 3] {
        dead_letters::park(
            &s.pool,
            "S",
            seq,
            "t.test.ping",
            old_reason,
            &ping.encode_to_vec(),
        )
        .await
        .unwrap();
    }
    let listed = api
        .list_dead_letters(Request::new(ListDeadLettersRequest { limit: 0 }))
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].reason, "not an event envelope");
    assert_eq!(listed[1].reason, old_reason);
    let replay = |id: i64| api.replay_dead_letter(Request::new(ReplayDeadLetterRequest { id }));

    // Still garbage: kept, with the reason of this try.
    let refused = replay(listed[0].id).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("still cannot be read"),
        "{refused:?}"
    );
    // Readable now: applied once and gone; its copy is a duplicate and gone too.
    let first = replay(listed[1].id).await.unwrap().into_inner();
    assert_eq!(first.outcome, "applied");
    let second = replay(listed[2].id).await.unwrap().into_inner();
    assert_eq!(second.outcome, "duplicate");
    let applied: i32 = sqlx::query_scalar("SELECT applied FROM effects WHERE event_id = $1")
        .bind(ping.id())
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(applied, 1);
    assert_eq!(
        replay(listed[1].id).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(replay(0).await.unwrap_err().code(), Code::InvalidArgument);

    let left = api
        .list_dead_letters(Request::new(ListDeadLettersRequest { limit: 10 }))
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].replays, 1);
    assert!(
        left[0].reason.starts_with("malformed message"),
        "{:?}",
        left[0]
    );
    let too_many = api
        .list_dead_letters(Request::new(ListDeadLettersRequest { limit: 5000 }))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
}

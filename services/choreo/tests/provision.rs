//! Provisioning against a real nats-server: idempotent, and a new version
//! with another subscription moves its consumer's filter without losing events.
mod common;

use common::*;

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
        tx: &mut Tx<'_>,
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
            let (client, js) = choreo::runtime::connect_nats(s.infra.nats.url(), "evolving", None)
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
async fn a_consumer_made_before_priorities_gets_them_in_place() {
    let s = setup().await;
    // As an earlier version provisioned it: no priority group.
    let subjects = Subscription::of(&[Ping::EVENT_TYPE]).subjects(&s.config.subject_prefix);
    s.stream
        .create_consumer(pull::Config {
            durable_name: Some("old".to_owned()),
            filter_subjects: subjects,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    for n in 0..3 {
        let ping = Envelope::new("test", "saga", None, &Ping { n });
        s.publish_raw("test.ping", ping.encode_to_vec()).await;
    }
    let consumer = s.consumer("old").await;
    assert!(choreo::provision::pulls_by_priority(&consumer));
    let mut consumer = consumer;
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.config.priority_policy,
        jetstream::consumer::PriorityPolicy::Prioritized
    );
    assert_eq!(
        info.num_pending, 3,
        "the update kept the consumer's position"
    );
}

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
                StreamSpec::everything(&s.config),
                Subscription::of(types).subjects(&s.config.subject_prefix),
            );
            let consumer = Consumer::new(
                s.pool.clone(),
                Arc::new(RecordsTypes),
                Subscription::of(types),
                2,
            );
            let stats = consumer.stats();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(consumer.run(vec![source], shutdown.clone()));
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
    s.one_stream().await;
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

/// Two services: `maker` writes `part.made`, which `checker` reads; `checker`
/// writes `part.checked`, which `maker` reads, with the stuck reports.
const PARTS: choreo::Choreography = choreo::Choreography {
    start: "part.made",
    cancel: "part.checked",
    events: &[
        choreo::choreography::Event {
            name: "part.made",
            producer: "maker",
            payload: "part.made",
            versions: &[1],
            consumers: &[("checker", choreo::choreography::Role::Forward)],
        },
        choreo::choreography::Event {
            name: "part.checked",
            producer: "checker",
            payload: "part.checked",
            versions: &[1],
            consumers: &[("maker", choreo::choreography::Role::Ends)],
        },
    ],
    steps: &[],
    stuck_reports_to: &["maker"],
};

/// The test's streams: each one's subjects and its consumers' filters.
async fn layout(s: &Setup) -> Vec<(String, Vec<String>, Vec<(String, Vec<String>)>)> {
    let mut found = Vec::new();
    let mut names = s.js.stream_names();
    let mut all = Vec::new();
    while let Some(name) = futures::StreamExt::next(&mut names).await {
        let name = name.unwrap();
        // Other tests' streams may share the server.
        if name.starts_with(&s.config.stream) {
            all.push(name);
        }
    }
    all.sort();
    for name in all {
        let stream = s.js.get_stream(&name).await.unwrap();
        let mut consumers = Vec::new();
        let mut infos = stream.consumers();
        while let Some(info) = futures::StreamExt::next(&mut infos).await {
            let info = info.unwrap();
            let mut filter = info.config.filter_subjects.clone();
            filter.sort();
            consumers.push((info.name, filter));
        }
        consumers.sort();
        found.push((
            name,
            stream.cached_info().config.subjects.clone(),
            consumers,
        ));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_producer_gets_a_stream_and_each_consumer_reads_its_producers_streams() {
    let s = setup().await;
    let (t, p) = (&s.config.stream, &s.config.subject_prefix);
    // The test's own one-stream layout goes first, as an earlier version's would.
    choreo::provision::retire_one_stream_layout(&s.js, &s.config)
        .await
        .unwrap();
    let done = choreo::provision::provision_all(&s.js, &s.config, &PARTS)
        .await
        .unwrap();
    assert_eq!(
        done,
        [
            format!("checker (reads {t}_MAKER)"),
            format!("maker (reads {t}_CHECKER, {t}_STUCK)")
        ]
    );
    let expected = vec![
        (
            format!("{t}_CHECKER"),
            vec![format!("{p}.part.checked")],
            vec![("maker".to_owned(), vec![format!("{p}.part.checked")])],
        ),
        (
            format!("{t}_MAKER"),
            vec![format!("{p}.part.made")],
            vec![("checker".to_owned(), vec![format!("{p}.part.made")])],
        ),
        (
            format!("{t}_STUCK"),
            vec![format!("{p}.choreo.stuck")],
            vec![("maker".to_owned(), vec![format!("{p}.choreo.stuck")])],
        ),
    ];
    assert_eq!(layout(&s).await, expected);

    // Each event is stored in its producer's stream only; a subject the
    // choreography does not declare is stored nowhere.
    let stored =
        s.js.publish(format!("{p}.part.made"), "made".into())
            .await
            .unwrap()
            .await
            .unwrap();
    assert_eq!(stored.stream, format!("{t}_MAKER"));
    let undeclared =
        s.js.publish(format!("{p}.part.lost"), "lost".into())
            .await
            .unwrap()
            .await;
    assert!(undeclared.is_err(), "no stream takes an undeclared subject");

    // Provisioning again changes nothing and keeps what is stored.
    choreo::provision::provision_all(&s.js, &s.config, &PARTS)
        .await
        .unwrap();
    assert_eq!(layout(&s).await, expected);
    let mut maker = s.js.get_stream(format!("{t}_MAKER")).await.unwrap();
    assert_eq!(maker.info().await.unwrap().state.messages, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_stream_layout_is_retired_only_once_its_consumers_handled_everything() {
    let s = setup().await;
    let t = &s.config.stream;
    // An earlier version's stream, with a consumer that has one event to go.
    let mut old = s.consumer("checker").await;
    s.publish_raw(
        "test.ping",
        Envelope::new("test", "saga", None, &Ping { n: 1 }).encode_to_vec(),
    )
    .await;
    let refused = choreo::provision::provision_all(&s.js, &s.config, &PARTS)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&format!("stream {t} holds every saga event"))
            && refused.contains("checker: 1")
            && refused.contains("run the old version until they are handled"),
        "{refused}"
    );
    let kept = s.js.get_stream(t).await.expect("the old stream is kept");
    assert!(
        !kept.cached_info().config.sealed,
        "the old version still publishes to it"
    );
    assert!(s.js.get_stream(format!("{t}_MAKER")).await.is_err());

    // Once the old version handled it, the old stream gives way to the new ones.
    let mut messages = old
        .fetch()
        .group(choreo::provision::PULL_GROUP)
        .priority(0)
        .max_messages(1)
        .messages()
        .await
        .unwrap();
    let message = futures::StreamExt::next(&mut messages)
        .await
        .unwrap()
        .unwrap();
    message.double_ack().await.unwrap();
    assert_eq!(old.info().await.unwrap().num_ack_pending, 0);
    choreo::provision::provision_all(&s.js, &s.config, &PARTS)
        .await
        .unwrap();
    assert!(s.js.get_stream(t).await.is_err(), "the old stream is gone");
    assert!(s.js.get_stream(format!("{t}_MAKER")).await.is_ok());
}

#[test]
fn subjects_match_as_nats_matches_them() {
    use choreo::provision::subject_matches;
    assert!(subject_matches("saga.>", "saga.order.created"));
    assert!(!subject_matches("saga.>", "saga"));
    assert!(subject_matches("saga.*.created", "saga.order.created"));
    assert!(!subject_matches("saga.*", "saga.order.created"));
    assert!(subject_matches("saga.order.created", "saga.order.created"));
    assert!(!subject_matches(
        "saga.order.created",
        "saga.order.cancelled"
    ));
    assert!(!subject_matches("saga.order", "saga.order.created"));
}

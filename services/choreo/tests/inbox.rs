//! The consumer and its inbox step against a real nats-server and PostgreSQL:
//! each event applied once, unreadable ones parked and replayable, nothing lost
//! on shutdown or when the broker loses the consumer.
mod common;

use common::*;

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
        inbox::apply(&s.pool, handler.as_ref(), &Default::default(), &committed)
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
    // Slow enough, and in batches small enough, that the 300 cannot all be
    // applied between the poll that sees 100 and the stop: at most 8 lanes x
    // 4 events are in flight when it comes, and the rest take 0.75 s.
    let handler = Arc::new(CountEffects {
        delay: Duration::from_millis(20),
    });
    let first = s.consume_batching(handler.clone(), 8, 4, "stop");
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
    // The re-created consumer starts from the beginning: the inbox absorbs
    // the first 20, no more and no fewer (the count says which, if not).
    eventually("the replay absorbed", Duration::from_secs(30), || async {
        stats.duplicates.load(Ordering::SeqCst) >= 20
    })
    .await;
    assert_eq!(
        stats.duplicates.load(Ordering::SeqCst),
        20,
        "duplicates absorbed after the replay"
    );
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

    async fn handle(
        &self,
        _tx: &mut Tx<'_>,
        event: &Envelope,
        _ping: Ping,
    ) -> Result<(), HandleError> {
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
        assert!(
            inbox::apply(&s.pool, &handler, &Default::default(), &event)
                .await
                .is_err()
        );
    }
    assert_eq!(
        counted.load(Ordering::SeqCst),
        0,
        "two rolled-back attempts"
    );
    assert_eq!(
        inbox::apply(&s.pool, &handler, &Default::default(), &event)
            .await
            .unwrap(),
        Outcome::Applied
    );
    assert_eq!(counted.load(Ordering::SeqCst), 1);
    assert_eq!(
        inbox::apply(&s.pool, &handler, &Default::default(), &event)
            .await
            .unwrap(),
        Outcome::Duplicate
    );
    let unreadable = Envelope::new("test", "saga-1", None, &Mystery {});
    assert!(matches!(
        inbox::apply(&s.pool, &handler, &Default::default(), &unreadable)
            .await
            .unwrap(),
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

/// Breaks a unique constraint every time: its effect can never be written.
struct ViolatesAConstraint;

#[async_trait::async_trait]
impl Handler for ViolatesAConstraint {
    type Event = Ping;

    async fn handle(&self, tx: &mut Tx<'_>, _: &Envelope, _: Ping) -> Result<(), HandleError> {
        for _ in 0..2 {
            sqlx::query("INSERT INTO effects (event_id, applied) VALUES ('00000000-0000-0000-0000-000000000001', 1)")
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_the_database_refuses_for_good_is_parked_at_its_first_delivery() {
    let s = setup().await;
    let ping = Envelope::new("test", "saga-1", None, &Ping { n: 1 });
    s.publish_raw("test.ping", ping.encode_to_vec()).await;
    let consumer = s.consume(Arc::new(ViolatesAConstraint), 2, "constraint");
    let stats = consumer.stats.clone();
    eventually("the event parked", Duration::from_secs(20), || async {
        stats.parked.load(Ordering::SeqCst) == 1
    })
    .await;
    consumer.stop().await;
    assert_eq!(stats.retries.load(Ordering::SeqCst), 0, "never retried");
    assert_eq!(stats.redeliveries.load(Ordering::SeqCst), 0);
    let reason: String = sqlx::query_scalar("SELECT reason FROM choreo_dead_letter")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert!(
        reason.starts_with("contract violated: the database refuses its effects")
            && reason.contains("duplicate key"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_on_the_wrong_subject_or_from_the_wrong_producer_is_parked_as_forged() {
    let s = setup().await;
    // Declared: pings come from "pinger" only.
    let mut subscription = Subscription::of(&[Ping::EVENT_TYPE]);
    subscription
        .producers
        .insert(Ping::EVENT_TYPE.into(), vec!["pinger".into()]);
    let misrouted = Envelope::new("pinger", "saga-1", None, &Mystery {});
    s.publish_raw("test.ping", misrouted.encode_to_vec()).await;
    let impostor = Envelope::new("mallory", "saga-1", None, &Ping { n: 1 });
    s.publish_raw("test.ping", impostor.encode_to_vec()).await;
    let genuine = Envelope::new("pinger", "saga-1", None, &Ping { n: 2 });
    s.publish_raw("test.ping", genuine.encode_to_vec()).await;

    let source = s.source_of("origin", &subscription);
    let consumer = Consumer::new(
        s.pool.clone(),
        Arc::new(CountEffects {
            delay: Duration::ZERO,
        }),
        subscription,
        2,
    );
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(vec![source], shutdown.clone()));
    eventually(
        "two parked, one applied",
        Duration::from_secs(20),
        || async {
            stats.parked.load(Ordering::SeqCst) == 2 && stats.applied.load(Ordering::SeqCst) == 1
        },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap();
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM choreo_dead_letter ORDER BY stream_seq")
            .fetch_all(&s.pool)
            .await
            .unwrap();
    assert_eq!(
        reasons,
        [
            format!(
                "forged or misrouted: subject \"{}.test.ping\" carries an event of type \"test.mystery\"",
                s.config.subject_prefix
            ),
            "forged or misrouted: test.ping claims producer \"mallory\", but the choreography names pinger".to_owned(),
        ]
    );
    assert_eq!(
        s.effect_counts().await,
        vec![1],
        "only the genuine ping had an effect"
    );
}

/// Records each ping it applies in `seen`, in the order applied; refuses
/// ping `reject` for good (after writing, so its rollback shows), fails ping
/// `flaky` once, and counts its after-commit work. Each effect takes 2 ms,
/// so a lane's events queue behind the one it applies even on a loaded
/// machine (the test's batches must form; they did not once in CI, with the
/// lanes keeping up with the pull one event at a time). The ping of the
/// same saga just before each bad one (so on its lane) takes 300 ms: the bad
/// one finds a queue behind it and goes in a batch, never alone (once in CI
/// the refused one came to an idle lane, and no batch failed for it).
struct RecordsOrder {
    reject: u32,
    flaky: u32,
    failed_once: std::sync::atomic::AtomicBool,
    counted: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl Handler for RecordsOrder {
    type Event = Ping;

    async fn handle(
        &self,
        tx: &mut Tx<'_>,
        event: &Envelope,
        ping: Ping,
    ) -> Result<(), HandleError> {
        sqlx::query("INSERT INTO seen (saga, n) VALUES ($1, $2)")
            .bind(&event.saga_id)
            .bind(ping.n as i32)
            .execute(&mut **tx)
            .await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
        if ping.n + SAGAS == self.reject || ping.n + SAGAS == self.flaky {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if ping.n == self.reject {
            return Err(Reject::Invalid(format!("ping {} is refused", ping.n)).into());
        }
        if ping.n == self.flaky && !self.failed_once.swap(true, Ordering::SeqCst) {
            return Err(HandleError::Transient("flaky once".into()));
        }
        let counted = self.counted.clone();
        inbox::after_commit(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        Ok(())
    }
}

/// The sagas the batch test's pings are spread over (ping n is saga n % 25's).
const SAGAS: u32 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_events_are_applied_in_batches_in_order_and_one_bad_event_costs_the_others_nothing()
{
    let s = setup().await;
    sqlx::query("CREATE TABLE seen (at BIGSERIAL PRIMARY KEY, saga TEXT NOT NULL, n INT NOT NULL)")
        .execute(&s.pool)
        .await
        .unwrap();
    // Queued before the consumer starts: every lane finds a backlog.
    let total = 400u32;
    for n in 0..total {
        let env = Envelope::new("test", &format!("saga-{}", n % SAGAS), None, &Ping { n });
        s.publish_raw("test.ping", env.encode_to_vec()).await;
    }
    // One ping already applied: its redelivery in a batch is a duplicate.
    let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = Arc::new(RecordsOrder {
        reject: 137,
        flaky: 251,
        failed_once: false.into(),
        counted: counted.clone(),
    });
    let early = Envelope::new("test", "saga-early", None, &Ping { n: 1000 });
    assert_eq!(
        inbox::apply(&s.pool, handler.as_ref(), &Default::default(), &early)
            .await
            .unwrap(),
        Outcome::Applied
    );
    s.publish_raw("test.ping", early.encode_to_vec()).await;

    let consumer = s.consume_batching(handler, 4, 16, "batches");
    let stats = consumer.stats.clone();
    eventually("every ping handled", Duration::from_secs(60), || async {
        stats.applied.load(Ordering::SeqCst)
            + stats.duplicates.load(Ordering::SeqCst)
            + stats.parked.load(Ordering::SeqCst)
            == u64::from(total) + 1
    })
    .await;
    consumer.stop().await;

    assert_eq!(stats.applied.load(Ordering::SeqCst), u64::from(total) - 1);
    assert_eq!(stats.duplicates.load(Ordering::SeqCst), 1);
    assert_eq!(stats.parked.load(Ordering::SeqCst), 1);
    let batches = stats.batches.load(Ordering::SeqCst);
    assert!(batches > 0, "no batch formed");
    assert!(
        stats.batch_fallbacks.load(Ordering::SeqCst) >= 2,
        "the refused and the flaky ping each failed a batch"
    );
    // Fewer transactions than events: the batches committed many at once.
    let inbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM choreo_inbox")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(inbox_rows, i64::from(total)); // 399 pings and the early one
    assert_eq!(
        counted.load(Ordering::SeqCst),
        total as usize,
        "after-commit work once per committed event (the early one included), never for a rolled-back batch"
    );
    let seen: Vec<(String, i32)> = sqlx::query_as("SELECT saga, n FROM seen ORDER BY at")
        .fetch_all(&s.pool)
        .await
        .unwrap();
    // Each ping's effect committed once; the refused one never.
    let mut ns: Vec<i32> = seen.iter().map(|(_, n)| *n).collect();
    ns.sort_unstable();
    let expected: Vec<i32> = (0..total as i32)
        .filter(|&n| n != 137)
        .chain([1000])
        .collect();
    assert_eq!(ns, expected);
    // And each saga's pings in the order they were published.
    let mut last: std::collections::HashMap<&str, i32> = Default::default();
    for (saga, n) in &seen {
        if let Some(before) = last.insert(saga.as_str(), *n) {
            assert!(before < *n, "{saga}: ping {n} applied after ping {before}");
        }
    }
    let reason: String = sqlx::query_scalar("SELECT reason FROM choreo_dead_letter")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert!(reason.contains("ping 137 is refused"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_applies_an_event_it_holds_twice_once_and_one_seen_before_not_at_all() {
    let s = setup().await;
    sqlx::query("CREATE TABLE seen (at BIGSERIAL PRIMARY KEY, saga TEXT NOT NULL, n INT NOT NULL)")
        .execute(&s.pool)
        .await
        .unwrap();
    let handler = RecordsOrder {
        reject: u32::MAX,
        flaky: u32::MAX,
        failed_once: false.into(),
        counted: Default::default(),
    };
    let earlier = Envelope::new("test", "saga-a", None, &Ping { n: 1 });
    inbox::apply(&s.pool, &handler, &Default::default(), &earlier)
        .await
        .unwrap();
    let twice = Envelope::new("test", "saga-a", None, &Ping { n: 2 });
    let other = Envelope::new("test", "saga-b", None, &Ping { n: 3 });
    let outcomes = inbox::apply_as_batch(
        &s.pool,
        &handler,
        &Default::default(),
        &[&earlier, &twice, &other, &twice],
    )
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        [
            Outcome::Duplicate,
            Outcome::Applied,
            Outcome::Applied,
            Outcome::Duplicate
        ]
    );
    let seen: Vec<i32> = sqlx::query_scalar("SELECT n FROM seen ORDER BY at")
        .fetch_all(&s.pool)
        .await
        .unwrap();
    assert_eq!(seen, [1, 2, 3], "each effect once, in the batch's order");
}

/// Records which database session applied each event.
struct RecordsSession;

#[async_trait::async_trait]
impl Handler for RecordsSession {
    type Event = Ping;

    async fn handle(&self, tx: &mut Tx<'_>, event: &Envelope, _: Ping) -> Result<(), HandleError> {
        sqlx::query("INSERT INTO sessions (event_id, backend) VALUES ($1, pg_backend_pid())")
            .bind(event.id())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_keeps_one_connection_and_opens_another_when_the_database_drops_it() {
    let s = setup().await;
    sqlx::query("CREATE TABLE sessions (event_id UUID PRIMARY KEY, backend INT NOT NULL)")
        .execute(&s.pool)
        .await
        .unwrap();
    let sessions = |saga: &'static str| {
        let pool = s.pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>(
                "SELECT DISTINCT backend FROM sessions JOIN choreo_inbox USING (event_id)
                 WHERE saga_id LIKE $1",
            )
            .bind(format!("{saga}%"))
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    // One lane, one event per transaction.
    let consumer = s.consume_batching(Arc::new(RecordsSession), 1, 1, "held");
    let stats = consumer.stats.clone();
    s.emit_with(10, |n| format!("before-{n}")).await;
    s.relay_until_sent(s.relay(100), Duration::from_secs(10))
        .await;
    eventually("ten applied", Duration::from_secs(30), || async {
        stats.applied.load(Ordering::SeqCst) == 10
    })
    .await;
    let before = sessions("before").await;
    assert_eq!(before.len(), 1, "ten transactions, one session: {before:?}");

    // The database ends that session (as a restart or an administrator would).
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect_with(&s.pool.connect_options())
            .await
            .unwrap();
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(before[0])
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(ended);

    s.emit_with(10, |n| format!("after-{n}")).await;
    s.relay_until_sent(s.relay(100), Duration::from_secs(10))
        .await;
    eventually("ten more applied", Duration::from_secs(30), || async {
        stats.applied.load(Ordering::SeqCst) == 20
    })
    .await;
    consumer.stop().await;
    let after = sessions("after").await;
    assert_eq!(after.len(), 1, "one new session for the rest: {after:?}");
    assert_ne!(after, before);
    assert!(
        stats.retries.load(Ordering::SeqCst) >= 1,
        "the first one after failed once"
    );
    assert_eq!(stats.duplicates.load(Ordering::SeqCst), 0);
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(applied, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_lane_waits_a_moment_for_more_events_and_a_quiet_one_does_not() {
    let s = setup().await;
    let handler = Arc::new(CountEffects {
        delay: Duration::ZERO,
    });
    let consumer = s.consume_lingering(handler, Duration::from_millis(100), "lingers");
    let stats = consumer.stats.clone();
    let applied = |n: u64| {
        let stats = stats.clone();
        async move { stats.applied.load(Ordering::SeqCst) == n }
    };

    // The consumer is pulling: nothing queues from here on.
    let first = Envelope::new("test", "first", None, &Ping { n: 0 });
    s.publish_raw("test.ping", first.encode_to_vec()).await;
    eventually("the first applied", Duration::from_secs(30), || applied(1)).await;
    assert_eq!(stats.batches.load(Ordering::SeqCst), 0);

    // An event every 20 ms, each applied long before the next arrives: once
    // the lane has seen a few, it waits up to 100 ms for more to join.
    let mut every = tokio::time::interval(Duration::from_millis(20));
    for n in 0..50 {
        every.tick().await;
        let env = Envelope::new("test", &format!("busy-{n}"), None, &Ping { n });
        s.publish_raw("test.ping", env.encode_to_vec()).await;
    }
    eventually("fifty more applied", Duration::from_secs(30), || {
        applied(51)
    })
    .await;
    let batches = stats.batches.load(Ordering::SeqCst);
    assert!(
        batches >= 3,
        "a busy lane shares its transactions: {batches} batches"
    );

    // After a quiet second, an event is applied as it comes: the next one,
    // 30 ms behind it, does not find it still waiting.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for n in 0..2 {
        let env = Envelope::new("test", &format!("quiet-{n}"), None, &Ping { n });
        s.publish_raw("test.ping", env.encode_to_vec()).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    eventually("two more applied", Duration::from_secs(30), || applied(53)).await;
    consumer.stop().await;
    assert_eq!(
        stats.batches.load(Ordering::SeqCst),
        batches,
        "a quiet lane does not wait"
    );
    assert_eq!(stats.duplicates.load(Ordering::SeqCst), 0);
    assert_eq!(s.effect_counts().await, vec![1; 53], "each effect once");
}

//! The relay against a real nats-server and PostgreSQL: outbox rows reach the
//! stream once, whatever stops or crashes, and a republish past the duplicate
//! window is absorbed downstream.
mod common;

use common::*;

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

/// PubAcks that never come cost a round one PubAck wait, not one a row.
/// Here the broker is frozen (SIGSTOP) once the rows' messages left the
/// client, as a node killed or cut off under a client loses the PubAcks of
/// what it was sent. The PubAcks used to be awaited one after another,
/// each waited for from when it was awaited: a relay's row-by-row batch
/// of 57 rows stalled 285 s in a cluster chaos run (seed 64), and this
/// round of 20 took 100 s. Nothing is lost or doubled once the broker is
/// back: the rows stay unsent and go again, the stored copies dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_that_never_come_cost_one_wait_for_the_whole_round_not_one_a_row() {
    let s = setup_own().await;
    s.emit(20).await;
    let relay = s.relay(256).row_by_row();
    let mut conn = s.pool.acquire().await.unwrap();
    let nats = s.infra.nats.pid().expect("our own nats-server");
    signal(nats, "STOP");
    let started = Instant::now();
    let round = relay.publish(&mut conn).await;
    let took = started.elapsed();
    signal(nats, "CONT");
    let round = round.unwrap();
    assert_eq!(round.attempted, 20);
    assert!(
        round.acked.is_empty(),
        "the frozen broker acknowledged nothing"
    );
    let error = round.error.expect("the round failed");
    assert!(error.contains("timed out"), "{error}");
    let wait = choreo::relay::PUBACK_WAIT;
    assert!(
        took < wait * 2,
        "a round of 20 rows whose PubAcks never came took {took:?}: more than one PubAck wait ({wait:?}), as if each were waited for in turn"
    );
    drop(conn);
    assert_eq!(
        s.unsent().await,
        20,
        "nothing unacknowledged is marked sent"
    );

    s.relay_until_sent(s.relay(256), Duration::from_secs(30))
        .await;
    assert_eq!(s.stream_messages().await, 20, "each row once");
}

/// Sends `signal` (STOP, CONT) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
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

    let relay = s.relay(256);
    let stats = relay.stats();
    s.relay_until_sent(relay, Duration::from_secs(30)).await;
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
    let (leads_a, leads_b) = (a.leadership(), b.leadership());
    let tasks = [
        tokio::spawn(a.run(shutdown.clone())),
        tokio::spawn(b.run(shutdown.clone())),
    ];
    for _ in 0..10 {
        s.emit(30).await;
        assert!(
            !(*leads_a.borrow() == Some(true) && *leads_b.borrow() == Some(true)),
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

    s.relay_until_sent(s.relay(256), Duration::from_secs(60))
        .await;
    assert_eq!(s.stream_messages().await, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republish_past_the_duplicate_window_is_absorbed_by_the_inbox() {
    let mut s = setup().await;
    s.config.stream = format!("{}W", s.config.stream);
    s.config.subject_prefix = format!("{}w", s.config.subject_prefix);
    s.config.duplicate_window_secs = 1;
    s.stream = s.one_stream().await;
    s.emit(25).await;
    let relay = s.relay(256);
    let mut conn = s.pool.acquire().await.unwrap();
    assert_eq!(relay.publish(&mut conn).await.unwrap().acked.len(), 25);
    drop(conn); // PubAcks seen, rows never marked: the relay was cut off
    tokio::time::sleep(Duration::from_millis(2500)).await; // the duplicate window passes
    s.relay_until_sent(s.relay(256), Duration::from_secs(30))
        .await;
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
async fn a_backlog_of_many_batches_reaches_the_stream_in_outbox_order_and_a_row_that_commits_late_follows()
 {
    let s = setup().await;
    // A transaction that takes the first seq and commits only at the end.
    let mut late = s.pool.begin().await.unwrap();
    let late_event = s
        .outbox()
        .emit(&mut late, "saga-late", None, &Ping { n: 1000 })
        .await
        .unwrap();
    let sent = s.emit(300).await;
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(s.relay(8).run(shutdown.clone()));
    eventually("the backlog published", Duration::from_secs(60), || async {
        s.unsent().await == 0 && s.stream_messages().await == 300
    })
    .await;
    late.commit().await.unwrap();
    eventually(
        "the late row published too",
        Duration::from_secs(60),
        || async { s.unsent().await == 0 && s.stream_messages().await == 301 },
    )
    .await;
    shutdown.cancel();
    relay.await.unwrap();

    let events = s.stream_events().await;
    let ids: Vec<String> = events.iter().map(|(id, _)| id.clone()).collect();
    let batches: std::collections::BTreeSet<&String> = events[..300]
        .iter()
        .filter_map(|(_, b)| b.as_ref())
        .collect();
    assert!(
        events[..300].iter().all(|(_, b)| b.is_some()) && batches.len() >= 300 / 8,
        "the backlog went as atomic batches of at most 8 ({} batches)",
        batches.len()
    );
    let mut expected: Vec<String> = sent.iter().map(|e| e.event_id.clone()).collect();
    expected.push(late_event.event_id);
    assert_eq!(
        ids, expected,
        "the stream holds the outbox's rows in seq order, the late one last"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_partly_in_the_stream_already_goes_once_in_order_row_by_row_where_refused_atomic_after()
 {
    let s = setup().await;
    let first = s.emit(20).await;
    // A relay that crashed after its PubAcks: 20 rows stored, none marked sent.
    let crashed = s.relay(256).row_by_row();
    let mut conn = s.pool.acquire().await.unwrap();
    assert_eq!(crashed.publish(&mut conn).await.unwrap().acked.len(), 20);
    drop(conn);
    let second = s.emit(40).await;

    let shutdown = CancellationToken::new();
    let relay = s.relay(16);
    let stats = relay.stats();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    eventually("the backlog published", Duration::from_secs(30), || async {
        s.unsent().await == 0
    })
    .await;
    assert_eq!(stats.published.load(Ordering::SeqCst), 60);
    let third = s.emit(40).await;
    eventually(
        "the new rows published",
        Duration::from_secs(30),
        || async { s.unsent().await == 0 },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap();

    let events = s.stream_events().await;
    let expected: Vec<String> = [first, second, third]
        .concat()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    let ids: Vec<String> = events.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, expected, "each row once, in outbox order");
    // Batches of 16: rows 1-16 (all stored) and 17-32 (four stored) were
    // each refused and sent again row by row; from row 33 on, atomic.
    assert!(
        events[..32].iter().all(|(_, batch)| batch.is_none()),
        "a refused batch went again row by row"
    );
    assert!(
        events[32..].iter().all(|(_, batch)| batch.is_some()),
        "after each refused batch, atomic batches went on"
    );
}

/// Atomic batches that share no saga are with the broker together: one
/// refused goes again row by row after the later ones got in, which no
/// saga's order minds. (Batches that share a saga wait for each other: in
/// the test above every batch holds events of the same seven sagas, and the
/// stream keeps outbox order.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_batches_of_other_sagas_are_out_together_and_a_refused_one_follows_them() {
    let s = setup().await;
    let first = s.emit_with(1, |i| format!("first-{i}")).await;
    // A relay that crashed after its PubAck: the first row stored, not marked sent.
    let crashed = s.relay(256).row_by_row();
    let mut conn = s.pool.acquire().await.unwrap();
    assert_eq!(crashed.publish(&mut conn).await.unwrap().acked.len(), 1);
    drop(conn);
    let rest = s.emit_with(63, |i| format!("rest-{i}")).await;

    s.relay_until_sent(s.relay(16), Duration::from_secs(30))
        .await;
    let ids: Vec<String> = s
        .stream_events()
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // Batch 1 (the stored row and 15 more) was refused while batches 2-4
    // were out; they got in, and then batch 1 went row by row.
    let expected: Vec<String> = [&first[..], &rest[15..], &rest[..15]]
        .concat()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(
        ids, expected,
        "each row once, the refused batch after those out with it"
    );
}

/// A setup whose stream was made as an older version made it: without
/// atomic batches.
async fn setup_without_atomic_batches() -> Setup {
    let mut s = setup().await;
    s.config.stream = format!("{}N", s.config.stream);
    s.config.subject_prefix = format!("{}n", s.config.subject_prefix);
    s.js.create_stream(jetstream::stream::Config {
        name: s.config.stream.clone(),
        subjects: vec![s.config.all_events_subject()],
        ..Default::default()
    })
    .await
    .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_stream_without_atomic_batches_the_relay_goes_row_by_row_and_setup_allows_them() {
    let s = setup_without_atomic_batches().await;
    let sent = s.emit(50).await;
    s.relay_until_sent(s.relay(16), Duration::from_secs(30))
        .await;
    let events = s.stream_events().await;
    let ids: Vec<String> = events.iter().map(|(id, _)| id.clone()).collect();
    let expected: Vec<String> = sent.into_iter().map(|e| e.event_id).collect();
    assert_eq!(ids, expected, "each row once, in outbox order");
    assert!(events.iter().all(|(_, batch)| batch.is_none()));

    let stream = s.one_stream().await;
    assert!(
        stream.cached_info().config.allow_atomic_publish,
        "provisioning allows atomic batches on a stream made without them"
    );
}

/// While NATS is away, a row published right after its commit is left to
/// the relay: nothing of it waits in the client's reconnect buffer to reach
/// the stream when NATS is back (where, already stored, it would make the
/// broker refuse the relay's atomic batch that holds the same row, and that
/// batch go again row by row, an fsync each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_committed_while_nats_is_away_are_left_to_the_relay_not_to_the_clients_buffer() {
    let mut s = setup_own().await;
    let (outbox, shutdown, marker) = publishing_outbox(&s);
    let connected =
        |s: &Setup| s.js.client().connection_state() == async_nats::connection::State::Connected;

    s.infra.nats.kill().unwrap();
    eventually(
        "the client sees NATS gone",
        Duration::from_secs(10),
        || async { !connected(&s) },
    )
    .await;
    let written = commit_rows(&s, &outbox, 0..20).await;
    written.publish();
    s.infra.nats.restart().unwrap();
    eventually("the client back", Duration::from_secs(30), || async {
        connected(&s)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.stream_messages().await,
        0,
        "rows published while NATS was away reached the stream once it was back"
    );
    assert_eq!(s.unsent().await, 20);

    s.relay_until_sent(s.relay(256), Duration::from_secs(30))
        .await;
    assert_eq!(s.stream_messages().await, 20);
    shutdown.cancel();
    marker.await.unwrap();
}

/// An outbox that publishes right after commit, as a service's does, and
/// the marker that marks its acknowledged rows sent (cancel the token,
/// then await the marker).
fn publishing_outbox(
    s: &Setup,
) -> (
    choreo::outbox::Outbox,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    publishing_outbox_on(
        s,
        s.js.clone(),
        Duration::from_millis(choreo::config::DEFAULT_RELAY_SWEEP_AFTER_MS),
    )
}

/// [`publishing_outbox`], its publisher sending on `js` and leaving to the
/// relay an event whose saga has one unsent for longer than `sweep_after`.
fn publishing_outbox_on(
    s: &Setup,
    js: jetstream::Context,
    sweep_after: Duration,
) -> (
    choreo::outbox::Outbox,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (marks, acked) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let marker = tokio::spawn(choreo::relay::mark_sent_in_batches(
        s.pool.clone(),
        acked,
        Duration::from_millis(5),
        shutdown.clone(),
    ));
    let outbox =
        s.outbox()
            .publishing_through(choreo::relay::Publisher::new(js, marks, sweep_after));
    (outbox, shutdown, marker)
}

/// Emits one event for each saga `saga-{i}`, i in `sagas`, in one
/// transaction through `outbox`, and returns the rows to publish.
async fn commit_rows(
    s: &Setup,
    outbox: &choreo::outbox::Outbox,
    sagas: std::ops::Range<u32>,
) -> choreo::outbox::Written {
    let (_, written) = choreo::outbox::capture(async {
        let mut tx = s.pool.begin().await.unwrap();
        for i in sagas {
            outbox
                .emit(&mut tx, &format!("saga-{i}"), None, &Ping { n: i })
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    })
    .await;
    written
}

/// [`commit_rows`], published right after the commit, as a service does.
async fn commit_and_publish(s: &Setup, outbox: &choreo::outbox::Outbox, first: u32, n: u32) {
    commit_rows(s, outbox, first..first + n).await.publish();
}

/// The many rows of one transaction go right after its commit as one
/// atomic batch (four fsyncs of the broker's for all of them), fewer as
/// plain publishes while the broker keeps up; both are marked sent once
/// acknowledged. A batch the broker refuses (one of its rows stored
/// already) is left whole to the relay, which sends it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_rows_go_after_commit_as_one_atomic_batch_and_a_refused_one_to_the_relay() {
    let s = setup().await;
    let (outbox, shutdown, marker) = publishing_outbox(&s);
    let many = choreo::relay::ATOMIC_WHILE_AHEAD_FROM as u32 + 4;
    // Under a batch even if they queue together with the lone row.
    let fewer = choreo::relay::ATOMIC_WHILE_AHEAD_FROM as u32 - 2;

    commit_and_publish(&s, &outbox, 0, many).await;
    // The publisher merges whatever is queued when it takes a send: had
    // the lone row come before it took the many, it would join their batch.
    eventually(
        "the many rows marked sent",
        Duration::from_secs(10),
        || async { s.unsent().await == 0 },
    )
    .await;
    commit_and_publish(&s, &outbox, many, 1).await;
    commit_and_publish(&s, &outbox, many + 1, fewer).await;
    eventually("every row marked sent", Duration::from_secs(10), || async {
        s.unsent().await == 0
    })
    .await;
    let events = s.stream_events().await;
    let sent = many + 1 + fewer;
    assert_eq!(events.len(), sent as usize);
    let batch = events[0].1.clone();
    assert!(batch.is_some(), "the many rows went as an atomic batch");
    assert!(
        events[..many as usize].iter().all(|(_, b)| *b == batch),
        "all {many} in the same batch: {events:?}"
    );
    assert!(
        events[many as usize..].iter().all(|(_, b)| b.is_none()),
        "a lone row, and fewer than a batch while the broker keeps up, go as plain publishes: {events:?}"
    );

    // A relay that crashed after its PubAck stored the first row of the
    // next transaction and marked nothing: the publisher's batch holding
    // that row is refused whole, and the relay sends the rest, once.
    let refused = choreo::relay::ATOMIC_WHILE_AHEAD_FROM as u32 + 2;
    let crashed = s.relay(1).row_by_row();
    let written = commit_rows(&s, &outbox, sent..sent + refused).await;
    let mut conn = s.pool.acquire().await.unwrap();
    assert_eq!(crashed.publish(&mut conn).await.unwrap().acked.len(), 1);
    drop(conn);
    written.publish();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        s.stream_messages().await,
        u64::from(sent + 1),
        "the refused batch stored nothing"
    );
    assert_eq!(
        s.unsent().await,
        i64::from(refused),
        "its rows are left to the relay"
    );
    s.relay_until_sent(s.relay(256), Duration::from_secs(30))
        .await;
    assert_eq!(
        s.stream_messages().await,
        u64::from(sent + refused),
        "each row once"
    );

    shutdown.cancel();
    marker.await.unwrap();
}

/// The rows of transactions that queue for the publisher together (their
/// commits came while its sends were out, or before its task came round)
/// go together, in commit order: enough of them
/// ([`choreo::relay::ATOMIC_WHILE_AHEAD_FROM`]) as one atomic batch, a few
/// fsyncs of the broker's for all of them, though no transaction wrote
/// that many.
#[tokio::test]
async fn the_rows_of_transactions_that_queue_together_go_as_one_atomic_batch_in_commit_order() {
    let s = setup().await;
    let (outbox, shutdown, marker) = publishing_outbox(&s);
    // Four transactions, each of fewer rows than an atomic batch takes.
    let rows = choreo::relay::ATOMIC_WHILE_AHEAD_FROM.div_ceil(4) as u32;
    let mut committed = Vec::new();
    for t in 0..4 {
        committed.push(commit_rows(&s, &outbox, t * rows..(t + 1) * rows).await);
    }
    // On this one-thread runtime the publisher's task runs only at the next
    // await: all four transactions' rows are queued when it does.
    for written in committed {
        written.publish();
    }
    eventually("every row marked sent", Duration::from_secs(10), || async {
        s.unsent().await == 0
    })
    .await;
    let events = s.stream_events().await;
    let batch = events[0].1.clone();
    assert!(
        batch.is_some() && events.iter().all(|(_, b)| *b == batch),
        "the four transactions' rows went as one atomic batch: {events:?}"
    );
    let in_commit_order: Vec<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM choreo_outbox ORDER BY seq")
            .fetch_all(&s.pool)
            .await
            .unwrap()
            .iter()
            .map(uuid::Uuid::to_string)
            .collect();
    let ids: Vec<String> = events.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 4 * rows as usize);
    assert_eq!(ids, in_commit_order, "in commit order");

    shutdown.cancel();
    marker.await.unwrap();
}

/// While every one of the publisher's sends is out (the broker is behind
/// on its stream), the next send goes as an atomic batch from
/// [`choreo::relay::ATOMIC_WHILE_BEHIND_FROM`] rows: there each plain
/// publish would queue for an fsync of its own. The same rows go plain
/// once the broker keeps up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_every_send_is_out_fewer_rows_go_as_an_atomic_batch() {
    let s = setup_own().await;
    let proxy = harness::Proxy::start(s.infra.nats.port()).await.unwrap();
    let through_proxy = s.infra.nats.url().replace(
        &format!("127.0.0.1:{}", s.infra.nats.port()),
        &format!("127.0.0.1:{}", proxy.port()),
    );
    let (client, js) = choreo::runtime::connect_nats(&through_proxy, "test", None)
        .await
        .unwrap();
    eventually(
        "connected through the proxy",
        Duration::from_secs(10),
        || async { client.connection_state() == async_nats::connection::State::Connected },
    )
    .await;
    let (outbox, shutdown, marker) = publishing_outbox_on(
        &s,
        js,
        Duration::from_millis(choreo::config::DEFAULT_RELAY_SWEEP_AFTER_MS),
    );
    let few = choreo::relay::ATOMIC_WHILE_BEHIND_FROM as u32;
    assert!(few < choreo::relay::ATOMIC_WHILE_AHEAD_FROM as u32);

    // The broker hears nothing while the proxy holds the bytes: four
    // single rows take every send, and `few` rows queue behind them.
    proxy.set(harness::Mode::Stall);
    for i in 0..4 {
        commit_and_publish(&s, &outbox, i, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    commit_and_publish(&s, &outbox, 4, few).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.set(harness::Mode::Pass);
    eventually("every row marked sent", Duration::from_secs(10), || async {
        s.unsent().await == 0
    })
    .await;
    // Then the same number of rows with every send free.
    commit_and_publish(&s, &outbox, 4 + few, few).await;
    eventually("every row marked sent", Duration::from_secs(10), || async {
        s.unsent().await == 0
    })
    .await;

    let events = s.stream_events().await;
    assert_eq!(events.len(), (4 + 2 * few) as usize);
    assert!(
        events[..4].iter().all(|(_, b)| b.is_none()),
        "the lone rows went plain: {events:?}"
    );
    let behind = &events[4..(4 + few) as usize];
    assert!(
        behind[0].1.is_some() && behind.iter().all(|(_, b)| *b == behind[0].1),
        "the rows that waited for a send went as one atomic batch: {events:?}"
    );
    assert!(
        events[(4 + few) as usize..]
            .iter()
            .all(|(_, b)| b.is_none()),
        "as many rows with a send free went plain: {events:?}"
    );

    shutdown.cancel();
    marker.await.unwrap();
}

/// On a stream without atomic batches, the publisher's first batch is
/// refused and left to the relay; from then on it sends row by row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_stream_without_atomic_batches_the_publisher_goes_row_by_row() {
    let s = setup_without_atomic_batches().await;
    let (outbox, shutdown, marker) = publishing_outbox(&s);

    // Enough rows for an atomic batch, twice.
    let n = choreo::relay::ATOMIC_WHILE_AHEAD_FROM as u32 + 2;
    commit_and_publish(&s, &outbox, 0, n).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.stream_messages().await, 0, "the atomic batch was refused");
    assert_eq!(s.unsent().await, i64::from(n));
    commit_and_publish(&s, &outbox, n, n).await;
    eventually(
        "the second transaction's rows sent",
        Duration::from_secs(10),
        || async { s.unsent().await == i64::from(n) },
    )
    .await;
    assert_eq!(s.stream_messages().await, u64::from(n));
    s.relay_until_sent(s.relay(256), Duration::from_secs(30))
        .await;
    assert_eq!(s.stream_messages().await, u64::from(2 * n));
    assert!(s.stream_events().await.iter().all(|(_, b)| b.is_none()));

    shutdown.cancel();
    marker.await.unwrap();
}

/// A write and its event in one statement ([`choreo::Outbox::insert_with`]),
/// no transaction around it, as PlaceOrder writes an order alone: both in
/// one transaction, the event published right after and marked sent; a
/// statement that writes nothing writes no event. Through an outbox
/// without a publisher, the relay (woken by its NOTIFY) sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_and_its_event_in_one_statement_go_out_together_and_no_write_no_event() {
    let s = setup().await;
    let (outbox, shutdown, marker) = publishing_outbox(&s);
    let note = |id: uuid::Uuid| {
        choreo::Effect::new(
            "noted AS (
                 INSERT INTO choreo_inbox (event_id, event_type, saga_id) VALUES ($1, 'noted', $2)
                 ON CONFLICT (event_id) DO NOTHING RETURNING event_id)",
            "SELECT event_id FROM noted",
        )
        .bind(id)
        .bind(format!("saga-{id}"))
    };
    let write = |outbox: choreo::Outbox, id: uuid::Uuid| {
        let pool = s.pool.clone();
        choreo::outbox::publish_after_commit(async move {
            let envelope = outbox.envelope(&format!("saga-{id}"), None, &Ping { n: 1 });
            let mut conn = pool.acquire().await.unwrap();
            outbox
                .insert_with(&mut conn, note(id), &envelope)
                .await
                .map(|row| row.map(|row| sqlx::Row::get::<uuid::Uuid, _>(&row, "event_id")))
        })
    };

    let first = uuid::Uuid::now_v7();
    assert_eq!(write(outbox.clone(), first).await.unwrap(), Some(first));
    assert_eq!(
        write(outbox.clone(), first).await.unwrap(),
        None,
        "nothing written the second time"
    );
    eventually("the event marked sent", Duration::from_secs(10), || async {
        s.unsent().await == 0
    })
    .await;
    assert_eq!(s.stream_messages().await, 1, "one event, published once");

    let second = uuid::Uuid::now_v7();
    assert_eq!(write(s.outbox(), second).await.unwrap(), Some(second));
    assert_eq!(s.unsent().await, 1, "no publisher: left to the relay");
    // Unsent, the event's row is as its transaction wrote it.
    let together: bool = sqlx::query_scalar(
        "SELECT (SELECT xmin::text FROM choreo_inbox WHERE event_id = $1)
              = (SELECT xmin::text FROM choreo_outbox WHERE sent_at IS NULL)",
    )
    .bind(second)
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert!(together, "the write and its event committed together");
    let shutdown_relay = CancellationToken::new();
    let relay = tokio::spawn(s.relay(64).run(shutdown_relay.clone()));
    eventually("the relay sent it", Duration::from_secs(10), || async {
        s.unsent().await == 0
    })
    .await;
    assert_eq!(s.stream_messages().await, 2);
    shutdown_relay.cancel();
    relay.await.unwrap();
    shutdown.cancel();
    marker.await.unwrap();
}

/// A saga's events do not pass each other on their way to the stream when
/// the send after commit of the first failed and another instance wrote
/// the next past the relay's sweep delay: that one is left to the relay
/// too, which sends both in the order they were written. Events of other
/// sagas still go at once.
/// (Seen in a cluster chaos run, seed 69: a saga's `shipping.cancelled`
/// reached the stream before its `shipping.scheduled`, committed 36 s
/// earlier, whose publish after commit had failed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_written_after_an_unsent_one_of_its_saga_follows_it_through_the_relay() {
    let s = setup().await;
    // Instance A sends to a broker without the stream: its sends fail.
    let elsewhere = tokio::task::spawn_blocking(harness::Nats::start_own)
        .await
        .unwrap()
        .unwrap();
    let (_client, nowhere) = choreo::runtime::connect_nats(elsewhere.url(), "test", None)
        .await
        .unwrap();
    // A sweep delay below the default: the rule follows the setting.
    let sweep_after = Duration::from_millis(500);
    let (a, a_shutdown, a_marker) = publishing_outbox_on(&s, nowhere, sweep_after);
    let (b, b_shutdown, b_marker) = publishing_outbox_on(&s, s.js.clone(), sweep_after);

    commit_and_publish(&s, &a, 0, 1).await; // saga-0's first event
    // Past the relay's sweep delay: the row is the relay's now.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(s.unsent().await, 1, "A's send failed: its row is unsent");
    // B writes saga-0's second event and saga-1's first, in one transaction.
    commit_and_publish(&s, &b, 0, 2).await;
    eventually(
        "saga-1's event in the stream",
        Duration::from_secs(10),
        || async { s.stream_messages().await >= 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        s.stream_messages().await,
        1,
        "saga-0's second event went out before its first"
    );
    assert_eq!(
        s.unsent().await,
        2,
        "both of saga-0's events wait for the relay"
    );

    s.relay_until_sent(s.relay(256), Duration::from_secs(30))
        .await;
    let saga_0: Vec<String> = sqlx::query_scalar(
        "SELECT event_id::text FROM choreo_outbox WHERE saga_id = 'saga-0' ORDER BY seq",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap();
    let in_stream: Vec<String> = s
        .stream_events()
        .await
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| saga_0.contains(id))
        .collect();
    assert_eq!(in_stream, saga_0, "saga-0's events in the order written");
    assert_eq!(s.stream_messages().await, 3);
    for (shutdown, marker) in [(a_shutdown, a_marker), (b_shutdown, b_marker)] {
        shutdown.cancel();
        marker.await.unwrap();
    }
}

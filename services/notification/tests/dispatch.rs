//! Notification's rules against a real PostgreSQL: messages are queued by the
//! handler (through the platform's inbox step, as the consumer applies them)
//! and sent by the dispatcher after commit. The provider is the one part that
//! is scripted here: it stands for a mail service outside the system.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::inbox::{Outcome, apply};
use choreo::{Config, Envelope, Outbox};
use contracts::events::v1 as ev;
use notification::dispatch::{Dispatched, dispatch};
use notification::handler::NotificationHandler;
use notification::sender::{LogSender, SendError, Sender};
use prost::Message;
use sqlx::PgPool;

async fn database() -> (harness::Postgres, PgPool) {
    let (pg, url) = harness::fresh_database().await.unwrap();
    let migrations = sqlx::migrate!("../../migrations/notification");
    let pool = choreo::db::open(&url, Duration::from_secs(10), &migrations)
        .await
        .unwrap();
    (pg, pool)
}

fn outbox() -> Outbox {
    Outbox::new("notification", "saga")
}

/// The barrier claims notification's consumer makes, from the declaration.
fn claims() -> choreo::barrier::Claims {
    contracts::CHOREOGRAPHY.subscription("notification").claims
}

/// `event` through the inbox step, as the consumer hands it over.
async fn handled(pool: &PgPool, event: &Envelope) -> Outcome {
    apply(pool, &handler(), &claims(), event).await.unwrap()
}

fn handler() -> NotificationHandler {
    NotificationHandler {
        outbox: outbox(),
        config: Config::new("nats://unused", "postgres://unused"),
        channel: "test".into(),
        due: None,
    }
}

fn scheduled(order: &str, contact: &str) -> Envelope {
    Envelope::new(
        "shipping",
        order,
        None,
        &ev::ShippingScheduled {
            shipment_id: "s-1".into(),
            carrier: "Parcel".into(),
            destination: "DE".into(),
            contact: contact.into(),
            customer: "ada".into(),
        },
    )
}

fn cancelled(order: &str) -> Envelope {
    Envelope::new(
        "order",
        order,
        None,
        &ev::OrderCancelled {
            reason: "customer: changed my mind".into(),
        },
    )
}

/// Events the service wrote for `order`, oldest first.
async fn emitted(pool: &PgPool, order: &str) -> Vec<Envelope> {
    let rows: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM choreo_outbox WHERE saga_id = $1 ORDER BY seq")
            .bind(order)
            .fetch_all(pool)
            .await
            .unwrap();
    rows.iter()
        .map(|bytes| Envelope::decode(bytes.as_slice()).unwrap())
        .collect()
}

/// One round of the dispatcher, one message at most.
async fn dispatch_one(pool: &PgPool, sender: &dyn Sender) -> Option<Dispatched> {
    let mut done = dispatch(pool, &outbox(), sender, 1).await.unwrap();
    assert!(done.len() <= 1);
    done.pop()
}

fn types(events: &[Envelope]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

async fn statuses(pool: &PgPool, order: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT kind, status FROM notifications WHERE order_id = $1::uuid ORDER BY queued_at, notification_id",
    )
    .bind(order)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A provider that is down for its first `outages` calls, bounces `.invalid`
/// domains, always defers `greylisted@` addresses, and counts the calls per
/// notification id.
#[derive(Default)]
struct Provider {
    outages: Mutex<usize>,
    calls: Mutex<HashMap<String, usize>>,
}

#[async_trait::async_trait]
impl Sender for Provider {
    fn channel(&self) -> &str {
        "test"
    }

    async fn send(&self, id: &str, recipient: &str, _text: &str) -> Result<(), SendError> {
        *self.calls.lock().unwrap().entry(id.to_owned()).or_default() += 1;
        if recipient.ends_with(".invalid") {
            return Err(SendError::Undeliverable(format!("{recipient} bounced")));
        }
        if recipient.starts_with("greylisted@") {
            return Err(SendError::Unavailable("try again later".into()));
        }
        let mut outages = self.outages.lock().unwrap();
        if *outages > 0 {
            *outages -= 1;
            return Err(SendError::Unavailable("503 from the provider".into()));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_goes_out_after_commit_and_survives_a_provider_outage() {
    let (_pg, pool) = database().await;
    let order = uuid::Uuid::now_v7().to_string();
    let cause = scheduled(&order, "ada@example.com");
    assert_eq!(handled(&pool, &cause).await, Outcome::Applied);
    // Queued, not sent: nothing follows in the saga yet.
    assert!(emitted(&pool, &order).await.is_empty());
    assert_eq!(
        statuses(&pool, &order).await,
        [("CONFIRMATION".into(), "PENDING".into())]
    );

    let provider = Provider {
        outages: Mutex::new(2),
        ..Default::default()
    };
    assert!(matches!(
        dispatch_one(&pool, &provider).await,
        Some(Dispatched::Deferred(_))
    ));
    // Backing off: not due again at once.
    assert_eq!(dispatch_one(&pool, &provider).await, None);
    let make_due = "UPDATE notifications SET next_attempt_at = now()";
    sqlx::query(make_due).execute(&pool).await.unwrap();
    assert!(matches!(
        dispatch_one(&pool, &provider).await,
        Some(Dispatched::Deferred(_))
    ));
    sqlx::query(make_due).execute(&pool).await.unwrap();
    assert_eq!(dispatch_one(&pool, &provider).await, Some(Dispatched::Sent));
    assert_eq!(dispatch_one(&pool, &provider).await, None);

    // Three calls, all with the one notification id (the provider's idempotency key).
    let calls = provider.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls.values().copied().collect::<Vec<_>>(), [3]);
    let (attempts, error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM notifications WHERE order_id = $1::uuid")
            .bind(&order)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((attempts, error), (3, None));

    // The saga goes on, caused by the event that asked for the message.
    let events = emitted(&pool, &order).await;
    assert_eq!(types(&events), ["notification.sent"]);
    assert_eq!(events[0].causation_id, cause.event_id);
    let sent = ev::NotificationSent::decode(events[0].payload.as_slice()).unwrap();
    assert_eq!(sent.notification_id, *calls.keys().next().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_fails_the_order_with_the_providers_reason() {
    let (_pg, pool) = database().await;
    let order = uuid::Uuid::now_v7().to_string();
    handled(&pool, &scheduled(&order, "ada@nowhere.invalid")).await;
    let outcome = dispatch_one(&pool, &LogSender).await;
    let Some(Dispatched::Failed(reason)) = outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.starts_with(
            "customer ada cannot be reached: mail bounced: domain nowhere.invalid does not exist"
        ),
        "{reason}"
    );
    let events = emitted(&pool, &order).await;
    assert_eq!(types(&events), ["notification.failed"]);
    let failed = ev::NotificationFailed::decode(events[0].payload.as_slice()).unwrap();
    assert_eq!(failed.reason, reason);
    assert_eq!(
        statuses(&pool, &order).await,
        [("CONFIRMATION".into(), "FAILED".into())]
    );
    // Given up on, not retried.
    sqlx::query("UPDATE notifications SET next_attempt_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(dispatch_one(&pool, &LogSender).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_withdraws_a_confirmation_not_yet_sent() {
    let (_pg, pool) = database().await;
    let order = uuid::Uuid::now_v7().to_string();
    handled(&pool, &scheduled(&order, "ada@example.com")).await;
    handled(&pool, &cancelled(&order)).await;

    let provider = Provider::default();
    assert_eq!(dispatch_one(&pool, &provider).await, None);
    assert!(provider.calls.lock().unwrap().is_empty());
    assert_eq!(
        statuses(&pool, &order).await,
        [("CONFIRMATION".into(), "WITHDRAWN".into())]
    );
    let events = emitted(&pool, &order).await;
    assert_eq!(types(&events), ["notification.cancelled"]);
    let undone = ev::NotificationCancelled::decode(events[0].payload.as_slice()).unwrap();
    assert!(!undone.notice_sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_after_the_confirmation_went_out_sends_one_notice() {
    let (_pg, pool) = database().await;
    let order = uuid::Uuid::now_v7().to_string();
    let provider = Provider::default();
    handled(&pool, &scheduled(&order, "ada@example.com")).await;
    assert_eq!(dispatch_one(&pool, &provider).await, Some(Dispatched::Sent));
    handled(&pool, &cancelled(&order)).await;
    // The same compensation redelivered under another event id: one notice.
    handled(&pool, &cancelled(&order)).await;
    assert_eq!(dispatch_one(&pool, &provider).await, Some(Dispatched::Sent));
    assert_eq!(dispatch_one(&pool, &provider).await, None);
    assert_eq!(
        statuses(&pool, &order).await,
        [
            ("CONFIRMATION".into(), "SENT".into()),
            ("CANCELLATION".into(), "SENT".into())
        ]
    );
    assert_eq!(provider.calls.lock().unwrap().len(), 2);
    // Only the confirmation moves the saga on; the notice is a courtesy.
    let events = emitted(&pool, &order).await;
    assert_eq!(
        types(&events),
        ["notification.sent", "notification.cancelled"]
    );
    let undone = ev::NotificationCancelled::decode(events[1].payload.as_slice()).unwrap();
    assert!(undone.notice_sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_send_each_message_once() {
    let (_pg, pool) = database().await;
    let orders: Vec<String> = (0..60).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    for order in &orders {
        handled(&pool, &scheduled(order, "ada@example.com")).await;
    }
    let provider = Arc::new(Provider::default());
    let drain = |pool: PgPool, provider: Arc<Provider>| async move {
        let mut sent = 0;
        loop {
            let batch = dispatch(&pool, &outbox(), provider.as_ref(), 7)
                .await
                .unwrap();
            if batch.is_empty() {
                return sent;
            }
            assert!(batch.iter().all(|o| *o == Dispatched::Sent), "{batch:?}");
            sent += batch.len();
        }
    };
    let (a, b) = tokio::join!(
        tokio::spawn(drain(pool.clone(), provider.clone())),
        tokio::spawn(drain(pool.clone(), provider.clone())),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a + b, orders.len(), "dispatcher a sent {a}, b sent {b}");
    let calls = provider.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), orders.len());
    assert!(calls.values().all(|n| *n == 1), "{calls:?}");
    for order in &orders {
        assert_eq!(types(&emitted(&pool, order).await), ["notification.sent"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_records_each_answer_on_its_own() {
    let (_pg, pool) = database().await;
    let contacts = [
        "ada@example.com",
        "bo@nowhere.invalid",
        "greylisted@example.com",
        "cy@example.com",
    ];
    let orders: Vec<String> = contacts
        .iter()
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    for (order, contact) in orders.iter().zip(contacts) {
        handled(&pool, &scheduled(order, contact)).await;
    }
    let provider = Provider::default();
    let outcomes = dispatch(&pool, &outbox(), &provider, 10).await.unwrap();
    assert_eq!(outcomes.len(), 4);
    assert_eq!(outcomes[0], Dispatched::Sent);
    assert!(matches!(&outcomes[1], Dispatched::Failed(r) if r.contains("bounced")));
    assert!(matches!(&outcomes[2], Dispatched::Deferred(_)));
    assert_eq!(outcomes[3], Dispatched::Sent);
    for sent in [&orders[0], &orders[3]] {
        assert_eq!(types(&emitted(&pool, sent).await), ["notification.sent"]);
        assert_eq!(
            statuses(&pool, sent).await,
            [("CONFIRMATION".into(), "SENT".into())]
        );
    }
    assert_eq!(
        types(&emitted(&pool, &orders[1]).await),
        ["notification.failed"]
    );
    assert_eq!(
        statuses(&pool, &orders[1]).await,
        [("CONFIRMATION".into(), "FAILED".into())]
    );
    assert!(emitted(&pool, &orders[2]).await.is_empty());
    assert_eq!(
        statuses(&pool, &orders[2]).await,
        [("CONFIRMATION".into(), "PENDING".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_failure_fails_the_order_without_queueing_anything() {
    let (_pg, pool) = database().await;
    let order = uuid::Uuid::now_v7().to_string();
    let mut failing = handler();
    failing.config.injected_failure_rate = 1.0;
    apply(
        &pool,
        &failing,
        &claims(),
        &scheduled(&order, "ada@example.com"),
    )
    .await
    .unwrap();
    assert!(statuses(&pool, &order).await.is_empty());
    let events = emitted(&pool, &order).await;
    assert_eq!(types(&events), ["notification.failed"]);
    let failed = ev::NotificationFailed::decode(events[0].payload.as_slice()).unwrap();
    assert_eq!(failed.reason, "injected failure (configured failure rate)");
    let note: String =
        sqlx::query_scalar("SELECT reason FROM notification_failures WHERE order_id = $1::uuid")
            .bind(&order)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(note, failed.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_error_that_quotes_the_address_is_masked_everywhere() {
    let (_pg, pool) = database().await;
    let order = uuid::Uuid::now_v7().to_string();
    handled(&pool, &scheduled(&order, "ada@nowhere.invalid")).await;
    let provider = Provider::default();
    let outcome = dispatch_one(&pool, &provider).await;
    let Some(Dispatched::Failed(reason)) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(
        reason,
        "customer ada cannot be reached: a***@nowhere.invalid bounced"
    );
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT last_error FROM notifications WHERE order_id = $1::uuid
         UNION ALL SELECT reason FROM notification_failures WHERE order_id = $1::uuid",
    )
    .bind(&order)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(stored.iter().all(|s| !s.contains("ada@")), "{stored:?}");
}

/// Applies `event` as the consumer applies one that comes alone: its effect
/// in one statement where it has one, in a transaction otherwise.
async fn handled_alone(pool: &PgPool, h: &NotificationHandler, event: &Envelope) -> Outcome {
    let decoded = <contracts::SagaEvent as choreo::Decode>::decode(event).unwrap();
    let mut conn = pool.acquire().await.unwrap();
    choreo::inbox::apply_alone_or_in_tx(&mut conn, h, &claims(), event, decoded)
        .await
        .unwrap()
}

/// The ids handed to the dispatcher so far.
fn handed_over(due: &mut tokio::sync::mpsc::UnboundedReceiver<uuid::Uuid>) -> Vec<uuid::Uuid> {
    std::iter::from_fn(|| due.try_recv().ok()).collect()
}

/// A scheduled order that comes alone has its confirmation queued in one
/// statement with its inbox insert and barrier claim, and its id goes to the
/// dispatcher once that statement has committed, exactly once; a repeat, or
/// a trigger after its compensation, goes through its transaction and
/// queues nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_order_alone_is_queued_in_one_statement_and_handed_over_once_committed() {
    let (_pg, pool) = database().await;
    let (send, mut due) = tokio::sync::mpsc::unbounded_channel();
    let h = NotificationHandler {
        due: Some(send),
        ..handler()
    };
    let order = uuid::Uuid::now_v7().to_string();
    let event = scheduled(&order, "ada@example.com");
    assert_eq!(handled_alone(&pool, &h, &event).await, Outcome::Applied);
    assert_eq!(handled_alone(&pool, &h, &event).await, Outcome::Duplicate);
    let queued: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT notification_id FROM notifications WHERE order_id = $1::uuid")
            .bind(&order)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        handed_over(&mut due),
        queued,
        "one message, handed over once"
    );
    assert!(harness::written_by_first_statement(&pool, "notifications", &order).await);
    assert!(
        emitted(&pool, &order).await.is_empty(),
        "the dispatcher writes the outcome"
    );
    assert_eq!(
        dispatch_one(&pool, &LogSender).await,
        Some(Dispatched::Sent)
    );
    assert_eq!(types(&emitted(&pool, &order).await), ["notification.sent"]);

    // Compensated first: the late trigger is refused in its transaction.
    let late = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        handled_alone(&pool, &h, &cancelled(&late)).await,
        Outcome::Applied
    );
    assert_eq!(
        handled_alone(&pool, &h, &scheduled(&late, "bob@example.com")).await,
        Outcome::Applied
    );
    assert!(statuses(&pool, &late).await.is_empty());
    assert!(handed_over(&mut due).is_empty());
    assert_eq!(
        types(&emitted(&pool, &late).await),
        ["notification.cancelled"]
    );

    // An injected failure is one statement too: its reason and its event.
    let mut failing = NotificationHandler {
        due: h.due.clone(),
        ..handler()
    };
    failing.config.injected_failure_rate = 1.0;
    let failed = uuid::Uuid::now_v7().to_string();
    handled_alone(&pool, &failing, &scheduled(&failed, "cy@example.com")).await;
    assert!(statuses(&pool, &failed).await.is_empty());
    assert!(handed_over(&mut due).is_empty());
    assert!(harness::written_by_first_statement(&pool, "notification_failures", &failed).await);
    assert_eq!(
        types(&emitted(&pool, &failed).await),
        ["notification.failed"]
    );

    // A notice queued by a compensation, in its transaction, is handed over
    // once that commits.
    handled_alone(&pool, &h, &cancelled(&order)).await;
    let notices = handed_over(&mut due);
    assert_eq!(notices.len(), 1);
    assert_eq!(
        statuses(&pool, &order).await,
        [
            ("CONFIRMATION".into(), "SENT".into()),
            ("CANCELLATION".into(), "PENDING".into())
        ]
    );
}

/// Messages handed over by id are sent once each, however often an id is
/// named, and only while due: one the provider deferred waits for its next
/// attempt, even when its id comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_handed_over_are_sent_once_each_and_only_when_due() {
    let (_pg, pool) = database().await;
    let (send, mut due) = tokio::sync::mpsc::unbounded_channel();
    let h = NotificationHandler {
        due: Some(send),
        ..handler()
    };
    let (sent, deferred) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    handled_alone(&pool, &h, &scheduled(&sent, "ada@example.com")).await;
    handled_alone(&pool, &h, &scheduled(&deferred, "greylisted@example.com")).await;
    let ids = handed_over(&mut due);
    assert_eq!(ids.len(), 2);
    let provider = Provider::default();
    let twice: Vec<uuid::Uuid> = ids.iter().chain(&ids).copied().collect();
    let outcomes = notification::dispatch::dispatch_these(&pool, &outbox(), &provider, &twice)
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert!(outcomes.contains(&Dispatched::Sent));
    assert!(
        provider
            .calls
            .lock()
            .unwrap()
            .values()
            .all(|calls| *calls == 1)
    );
    // The deferred one is not due again at once: handed over again, it waits.
    let again = notification::dispatch::dispatch_these(&pool, &outbox(), &provider, &ids)
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(provider.calls.lock().unwrap().len(), 2);
    assert_eq!(
        statuses(&pool, &deferred).await,
        [("CONFIRMATION".into(), "PENDING".into())]
    );
    assert_eq!(types(&emitted(&pool, &sent).await), ["notification.sent"]);
}

/// The dispatcher's loop: messages queued while nobody handed them over
/// (before a crash, say) are found by its poll, a backlog of more than a
/// batch is drained by its workers, and a message handed over meanwhile
/// goes at once. Each is sent once and each order's saga goes on once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_polls_for_a_backlog_drains_it_and_sends_each_message_once() {
    let (_pg, pool) = database().await;
    let backlog: Vec<String> = (0..23).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    for order in &backlog {
        handled(&pool, &scheduled(order, "ada@example.com")).await;
    }
    let provider = Arc::new(Provider::default());
    let (hand_over, queued) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let dispatcher = tokio::spawn(notification::dispatch::run(
        pool.clone(),
        outbox(),
        provider.clone(),
        queued,
        Duration::from_millis(100),
        notification::dispatch::Limits {
            workers: 2,
            batch: 4,
        },
        shutdown.clone(),
    ));
    // One more, handed over the way the handler does once it committed.
    let (send, mut due) = tokio::sync::mpsc::unbounded_channel();
    let h = NotificationHandler {
        due: Some(send),
        ..handler()
    };
    let alone = uuid::Uuid::now_v7().to_string();
    handled_alone(&pool, &h, &scheduled(&alone, "ada@example.com")).await;
    for id in handed_over(&mut due) {
        hand_over.send(id).unwrap();
    }
    let orders: Vec<&String> = backlog.iter().chain([&alone]).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notifications WHERE status <> 'SENT'")
                .fetch_one(&pool)
                .await
                .unwrap();
        if pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pending} messages still unsent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    dispatcher.await.unwrap();
    let calls = provider.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), orders.len());
    assert!(calls.values().all(|n| *n == 1), "{calls:?}");
    for order in orders {
        assert_eq!(types(&emitted(&pool, order).await), ["notification.sent"]);
    }
}

//! An event whose whole effect is one statement ([`Handler::effect_alone`]) is
//! applied with its inbox insert as that one statement, against a real
//! PostgreSQL: once, all or nothing, and through its transaction when the
//! effect does not hold, its step's barrier row is taken, or it asks for a
//! compensation.
mod common;

use choreo::Effect;
use choreo::barrier::Claim;
use common::*;

/// Even pings have an effect alone: `applied` set to 1. Odd ones' effect
/// writes 1 as well but does not hold. In a transaction, [`Handler::handle`]
/// adds 100, so the figure tells which way an event went and whether a
/// refused effect left anything behind.
struct EvenAlone;

#[async_trait::async_trait]
impl Handler for EvenAlone {
    type Event = Ping;

    async fn handle(&self, tx: &mut Tx<'_>, event: &Envelope, _: Ping) -> Result<(), HandleError> {
        sqlx::query(
            "INSERT INTO effects (event_id, applied) VALUES ($1, 100)
             ON CONFLICT (event_id) DO UPDATE SET applied = effects.applied + 100",
        )
        .bind(event.id())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    fn effect_alone(&self, envelope: &Envelope, ping: &Ping) -> Option<Effect> {
        Some(
            Effect::new(
                "written AS (
                     INSERT INTO effects (event_id, applied) VALUES ($1, 1)
                     ON CONFLICT (event_id) DO UPDATE SET applied = effects.applied + 1
                     RETURNING applied)",
                "SELECT FROM written WHERE $2",
            )
            .bind(envelope.id())
            .bind(ping.n.is_multiple_of(2)),
        )
    }
}

/// Applies `envelope` as the consumer applies an event that comes alone.
async fn apply_alone(s: &Setup, claims: &barrier::Claims, envelope: &Envelope) -> Outcome {
    let mut conn = s.pool.acquire().await.unwrap();
    let ping = <Ping as Decode>::decode(envelope).unwrap();
    inbox::apply_alone_or_in_tx(&mut conn, &EvenAlone, claims, envelope, ping)
        .await
        .unwrap()
}

async fn inbox_rows(s: &Setup, envelope: &Envelope) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM choreo_inbox WHERE event_id = $1")
        .bind(envelope.id())
        .fetch_one(&s.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_alone_is_applied_as_one_statement_once() {
    let s = setup().await;
    let even = Envelope::new("test", "saga-1", None, &Ping { n: 2 });
    for expected in [Outcome::Applied, Outcome::Duplicate] {
        assert_eq!(apply_alone(&s, &Default::default(), &even).await, expected);
    }
    assert_eq!(
        s.effect_counts().await,
        vec![1],
        "the effect alone, once; no transaction"
    );
    assert_eq!(inbox_rows(&s, &even).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_that_does_not_hold_writes_nothing_and_its_event_goes_through_its_transaction() {
    let s = setup().await;
    let odd = Envelope::new("test", "saga-1", None, &Ping { n: 3 });
    assert_eq!(
        apply_alone(&s, &Default::default(), &odd).await,
        Outcome::Applied
    );
    assert_eq!(
        s.effect_counts().await,
        vec![100],
        "the refused statement left nothing; the transaction did the work"
    );
    assert_eq!(inbox_rows(&s, &odd).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steps_trigger_alone_holds_only_with_its_barrier_claim_and_a_compensation_goes_through_its_transaction()
 {
    let s = setup().await;
    let first = Envelope::new("test", "saga-1", None, &Ping { n: 4 });
    let again = Envelope::new("test", "saga-1", None, &Ping { n: 6 });
    let action = [(first.event_type.clone(), Claim::Action("ping"))]
        .into_iter()
        .collect();
    // The first trigger claims the row in its statement; the next one of
    // the same saga finds it taken and goes through its transaction.
    assert_eq!(apply_alone(&s, &action, &first).await, Outcome::Applied);
    assert_eq!(apply_alone(&s, &action, &again).await, Outcome::Applied);
    let mut counts = s.effect_counts().await;
    counts.sort();
    assert_eq!(counts, vec![1, 100]);
    let state: String = sqlx::query_scalar(
        "SELECT state FROM choreo_barrier WHERE saga_id = 'saga-1' AND step = 'ping'",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!(state, "done");
    // An event that asks for a compensation never goes alone.
    let back = Envelope::new("test", "saga-2", None, &Ping { n: 8 });
    let compensation = [(back.event_type.clone(), Claim::Compensation("ping"))]
        .into_iter()
        .collect();
    assert_eq!(
        apply_alone(&s, &compensation, &back).await,
        Outcome::Applied
    );
    let mut counts = s.effect_counts().await;
    counts.sort();
    assert_eq!(counts, vec![1, 100, 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_applies_an_event_alone_as_one_statement_and_a_redelivery_as_a_duplicate() {
    let s = setup().await;
    let even = Envelope::new("test", "saga-1", None, &Ping { n: 6 });
    let odd = Envelope::new("test", "saga-2", None, &Ping { n: 7 });
    // One at a time, so that none shares a batch's transaction: the event,
    // the same event again under another message id (past the broker's
    // duplicate window), and one whose effect does not hold.
    let consumer = s.consume(Arc::new(EvenAlone), 4, "alone");
    let stats = consumer.stats.clone();
    for (envelope, handled) in [(&even, 1), (&even, 2), (&odd, 3)] {
        s.publish_raw("test.ping", envelope.encode_to_vec()).await;
        eventually("the delivery handled", Duration::from_secs(30), || async {
            stats.applied.load(Ordering::SeqCst) + stats.duplicates.load(Ordering::SeqCst)
                == handled
        })
        .await;
    }
    consumer.stop().await;
    assert_eq!(stats.applied.load(Ordering::SeqCst), 2);
    assert_eq!(stats.duplicates.load(Ordering::SeqCst), 1);
    let mut counts = s.effect_counts().await;
    counts.sort();
    assert_eq!(counts, vec![1, 100]);
}

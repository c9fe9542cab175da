//! Property test through the consumer's path against a real PostgreSQL:
//! mutated order.created events, each decoded and applied by the inbox step
//! exactly as the consumer does. Every one is applied or parked, none is an
//! error left to retry for ever, and stock stays conserved.
use std::time::Duration;

use choreo::inbox::{Outcome, apply};
use choreo::{Config, Envelope, Outbox};
use contracts::events::v1 as ev;
use inventory::handler::InventoryHandler;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as Cases, TestRunner};
use prost::Message;

#[test]
fn mutated_orders_are_applied_or_parked_and_stock_is_conserved() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_pg, pool) = runtime.block_on(async {
        let (pg, url) = harness::fresh_database().await.unwrap();
        let migrations = sqlx::migrate!("../../migrations/inventory");
        let pool = choreo::db::open(&url, Duration::from_secs(10), &migrations)
            .await
            .unwrap();
        sqlx::query("INSERT INTO stock (sku, available) VALUES ('BOOK', 100000), ('PEN', 100000)")
            .execute(&pool)
            .await
            .unwrap();
        (pg, pool)
    });
    let handler = InventoryHandler {
        outbox: Outbox::new("inventory", "saga"),
        config: Config::new("nats://unused", "postgres://unused"),
    };
    let claims = contracts::CHOREOGRAPHY.subscription("inventory").claims;
    let mut runner = TestRunner::new(Cases {
        cases: 300,
        failure_persistence: None,
        ..Cases::default()
    });
    let mutation = (vec((any::<Index>(), any::<u8>()), 0..4), any::<bool>());
    let outcomes: [std::cell::Cell<usize>; 3] = Default::default();
    runner
        .run(&mutation, |(flips, keep_valid)| {
            let order = ev::OrderCreated {
                customer: "ada".into(),
                destination: "DE".into(),
                contact: "ada@example.com".into(),
                lines: vec![
                    ev::OrderLine {
                        sku: "BOOK".into(),
                        quantity: 2,
                    },
                    ev::OrderLine {
                        sku: "PEN".into(),
                        quantity: 1,
                    },
                ],
            };
            let envelope = Envelope::new("order", &uuid::Uuid::now_v7().to_string(), None, &order);
            let mut bytes = envelope.encode_to_vec();
            if !keep_valid {
                for (at, mask) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] ^= mask;
                }
            }
            let outcome = runtime.block_on(async {
                match Envelope::from_bytes(&bytes) {
                    Ok(event) => apply(&pool, &handler, &claims, &event).await,
                    Err(reject) => Ok(Outcome::Parked(reject)),
                }
            });
            match outcome {
                Ok(Outcome::Applied) => outcomes[0].set(outcomes[0].get() + 1),
                Ok(Outcome::Duplicate) => outcomes[1].set(outcomes[1].get() + 1),
                Ok(Outcome::Parked(_)) => outcomes[2].set(outcomes[2].get() + 1),
                Err(e) => prop_assert!(false, "an error the consumer would retry for ever: {e}"),
            }
            Ok(())
        })
        .unwrap();
    let [applied, duplicates, parked] = outcomes.map(|n| n.get());
    println!("applied {applied}, duplicates {duplicates}, parked {parked}");
    assert!(
        applied > 0 && parked > 0,
        "applied {applied}, parked {parked}"
    );
    let conserved: Vec<(String, i64)> = runtime
        .block_on(
            sqlx::query_as("SELECT sku, available + reserved FROM stock ORDER BY sku")
                .fetch_all(&pool),
        )
        .unwrap();
    assert_eq!(
        conserved,
        [("BOOK".to_owned(), 100000), ("PEN".to_owned(), 100000)]
    );
}

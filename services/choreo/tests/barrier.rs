//! The compensation barrier against a real PostgreSQL: late actions refused,
//! early compensations recorded, races resolved consistently.
mod common;

use common::*;

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

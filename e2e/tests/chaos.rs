//! The short chaos profile: at least 200 orders and a fault of every kind,
//! then every invariant checked; once with one instance of each service and
//! once with two throughout. `CHAOS_SEED` replays a run.
use e2e::chaos::Profile;

async fn every_invariant_holds(profile: Profile) {
    assert!(profile.orders >= 200 || std::env::var("CHAOS_ORDERS").is_ok());
    let report = e2e::chaos::run(profile).await.expect("chaos run");
    println!("{report}");
    assert_eq!(
        report.faults.len(),
        8,
        "a fault of every kind: {:?}",
        report.faults
    );
    assert!(report.violations.is_empty(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_order_ends_correctly_whatever_crashes() {
    every_invariant_holds(Profile::from_env()).await;
}

/// Two instances of every service share each database and durable
/// consumer for the whole run; the kills hit one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_order_ends_correctly_with_two_instances_of_every_service() {
    every_invariant_holds(Profile {
        instances: 2,
        ..Profile::from_env()
    })
    .await;
}

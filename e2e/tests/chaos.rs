//! The short chaos profile: at least 200 orders and a fault of every kind,
//! then every invariant checked. `CHAOS_SEED` replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_order_ends_correctly_whatever_crashes() {
    let profile = e2e::chaos::Profile::from_env();
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

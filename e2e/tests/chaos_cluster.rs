//! The cluster chaos profile: at least 100 orders on a 3-node NATS cluster
//! (the stream with three replicas) while a seeded schedule kills the stream's
//! leader, kills any node and cuts a node off from the other two, restarting
//! or healing each; then every invariant checked. `CHAOS_SEED` replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_order_ends_correctly_whatever_nats_node_fails() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let profile = e2e::chaos::Profile::cluster(seed);
    assert!(profile.orders >= 100);
    let report = e2e::chaos::run(profile).await.expect("chaos run");
    println!("{report}");
    assert_eq!(
        report.faults.len(),
        3,
        "a fault of every kind: {:?}",
        report.faults
    );
    assert!(report.violations.is_empty(), "{report}");
}

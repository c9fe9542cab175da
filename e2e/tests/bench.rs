//! The benchmark (`load`) runs end to end on a small load, and its report
//! holds together: every order ended, the hot SKU was never oversold, and
//! each loop's cost was counted on its own. Nothing here is timed: speed
//! is what the benchmark measures, not what a test asserts.
use e2e::bench::{Settings, run};
use e2e::{Options, system};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs_and_its_report_holds_together() {
    let sys = system(Options::default()).await;
    let settings = Settings {
        instances: 1,
        clients: vec![2, 4],
        // Few orders and a loop that asks for more time than they take on
        // an idle machine, so that the clients go on placing past them.
        orders: 6,
        closed_secs: 1.5,
        skus: 20,
        open_secs: 2.0,
        open_at: 0.5,
        // A fixed rate, so that the search's probe is at least 1/s.
        open_rate: Some(16.0),
        sweep_at: vec![0.25],
        // No rate keeps a p99 of 0 ms: the search must probe below the
        // lowest rate run, halfway to nought.
        p99_within_ms: 0.0,
        p99_probes: 1,
        alone: 2,
        limit_clients: 2,
        limit_secs: 0.5,
        statements: false,
    };
    let report = run(&sys, &settings).await.unwrap();

    assert!(report.limit_commits_per_sec > 0.0 && report.limit_at_end_commits_per_sec > 0.0);
    // Each closed loop placed its 6 orders at least and went on for its
    // 1.5 s, and every order it placed ended and was counted. (How many
    // more than 6 it placed is the machine's speed: beside the chaos tests
    // in CI, a debug build's saga has taken 1.6 s, and four clients placed
    // 6 orders in all before their 1.5 s were up. A loop that stopped at 6
    // on a machine where they take less than 1.5 s fails on seconds.)
    for closed in [&report.spread, &report.hot] {
        assert!(
            closed.orders >= settings.orders && closed.seconds >= settings.closed_secs,
            "{closed:?}"
        );
        assert_eq!(closed.completed, closed.orders, "{}", closed.catalogue);
        assert!(closed.sagas_per_sec > 0.0);
        assert_eq!(closed.latency.count, closed.orders);
    }
    assert!(!report.hot_oversold);
    // The spread catalogue ran once per number of clients; its peak is the
    // fastest of them, and the hot SKU ran with the peak's clients.
    let tried: Vec<usize> = report.spread_by_clients.iter().map(|r| r.clients).collect();
    assert_eq!(tried, [2, 4]);
    for run in &report.spread_by_clients {
        assert!(run.latency.count >= settings.orders, "{run:?}");
        assert!(run.sagas_per_sec <= report.spread.sagas_per_sec, "{run:?}");
    }
    assert!(
        report
            .spread_by_clients
            .iter()
            .any(|r| (r.clients, r.sagas_per_sec)
                == (report.spread.clients, report.spread.sagas_per_sec)),
        "the peak is one of the runs"
    );
    // Each row carries what the hypervisor took while it ran: the peak's
    // is the spread loop's, the main open loop's what was beside it.
    let peak = report
        .spread_by_clients
        .iter()
        .find(|r| r.clients == report.spread.clients)
        .unwrap();
    assert_eq!(peak.stolen_percent, report.spread.machine.steal_percent);
    let main_open = report
        .open_loops
        .iter()
        .find(|r| r.rate_per_sec == report.open_rate_per_sec)
        .unwrap();
    assert_eq!(
        main_open.stolen_percent,
        report.open_loop_beside.machine.steal_percent
    );
    assert_eq!(report.hot.clients, report.spread.clients);
    assert_eq!(
        report.open_loop.count,
        (report.open_rate_per_sec * settings.open_secs).round() as usize,
        "every order of the open loop ended and was timed"
    );
    assert_eq!(report.alone.count, 2);
    // The lighter open loop ran first, at a quarter of the main one's
    // rate, and then the search's one probe, halfway between nought (no
    // rate was within 0 ms) and the lowest rate beyond; all are listed by
    // rate, each with its own orders and cost.
    let rates: Vec<f64> = report.open_loops.iter().map(|r| r.rate_per_sec).collect();
    assert_eq!(rates, [2.0, 4.0, 16.0]);
    assert_eq!(report.open_rate_per_sec, 16.0);
    assert_eq!(
        (
            report.p99_within_up_to_per_sec,
            report.p99_beyond_from_per_sec
        ),
        (None, Some(2.0))
    );
    for run in &report.open_loops {
        assert_eq!(
            run.latency.count,
            (run.rate_per_sec * settings.open_secs).round() as usize,
            "{run:?}"
        );
        assert!(
            run.transactions_per_saga >= 1.0 && run.system_cpu_ms_per_saga > 0.0,
            "{run:?}"
        );
        // The row's CPU is its processes' but the benchmark's own.
        let of_processes: f64 = run
            .processes
            .iter()
            .filter(|p| p.process != "load")
            .map(|p| p.cpu_ms_per_saga)
            .sum();
        assert!(
            (of_processes - run.system_cpu_ms_per_saga).abs() < 1e-9 && run.processes.len() == 7,
            "{run:?}"
        );
    }
    assert_eq!(report.open_loops[2].latency, report.open_loop);

    // Each window counted its own sagas: PlaceOrder alone is one commit of
    // the order service per saga, a happy saga publishes four events and
    // each of the six deliveries is acknowledged.
    for (window, cost) in [
        ("spread", &report.spread.cost),
        ("hot", &report.hot.cost),
        ("open loop", &report.open_loop_cost),
    ] {
        assert!(
            cost.per_service[0].commits_per_saga >= 1.0,
            "{window}: {cost:?}"
        );
        assert!(
            (cost.published_per_saga - 4.0).abs() < 0.01,
            "{window}: {cost:?}"
        );
        assert!(
            cost.deliveries_per_saga >= 6.0 && cost.acks_per_saga >= 6.0,
            "{window}: {cost:?}"
        );
        let processes: Vec<&str> = cost.processes.iter().map(|p| p.process.as_str()).collect();
        assert_eq!(
            processes,
            [
                "order",
                "inventory",
                "shipping",
                "notification",
                "nats-server",
                "postgres",
                "load"
            ],
            "{window}"
        );
    }

    // Each loop's hops are its own orders' (every step of every saga seen
    // in the order's timeline), and each send -> PubAck (its mean and its
    // p99) is over that loop's publishes only: every service published in each.
    for (window, hops, sagas) in [
        ("spread", &report.hops, report.spread.orders),
        ("open loop", &report.open_loop_hops, report.open_loop.count),
        ("alone", &report.alone_hops, 2),
    ] {
        let services: Vec<&str> = hops.iter().map(|h| h.service.as_str()).collect();
        assert_eq!(
            services,
            ["order", "inventory", "shipping", "notification"],
            "{window}"
        );
        for hop in hops {
            assert_eq!(hop.trigger_to_reaction.count, sagas, "{window}: {hop:?}");
            assert!(hop.commit_to_puback_ms > 0.0, "{window}: {hop:?}");
            // Its tail comes from the services' histogram: a bucket's bound.
            let p99 = hop
                .send_to_puback_p99_at_most_ms
                .unwrap_or_else(|| panic!("{window}: no p99 in {hop:?}"));
            assert!(
                choreo::telemetry::PUBLISH_LATENCY_BUCKETS
                    .iter()
                    .any(|bound| (bound * 1000.0 - p99).abs() < 1e-6),
                "{window}: {hop:?}"
            );
        }
    }

    let table = report.table();
    for row in [
        "per hop (spread)",
        "per hop (open loop)",
        "per hop (alone)",
        "services' PostgreSQL transactions per saga (open loop)",
        "CPU ms per saga, peak RSS (open loop)",
        "beside the open loop",
        "by clients",
        "open loops by rate",
        "highest open-loop rate run with p99 <= 0 ms",
    ] {
        assert!(table.contains(row), "no row {row:?} in\n{table}");
    }
    assert!(
        table.contains("none of the rates run; beyond it from 2/s"),
        "{table}"
    );
    assert!(report.svg().starts_with("<svg"));
    serde_json::to_string(&report).unwrap();
}

/// The drain (`load --drain`): orders placed while NATS is down wait in the
/// order service's outbox, and once it is back every one of them is
/// published; the report says how fast, and where the machine's time went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_queued_while_nats_is_down_is_published_once_it_is_back() {
    let mut sys = system(Options::default()).await;
    let drained = e2e::bench::drain(&mut sys, 200, 4).await.unwrap();

    assert_eq!(drained.orders, 200);
    assert_eq!(
        drained.unsent_each_second.first(),
        Some(&200),
        "each order waited as one unsent row: {drained:?}"
    );
    assert!(drained.placed_per_sec > 0.0 && drained.drained_per_sec > 0.0);
    assert!(
        drained.stream_per_sec >= drained.drained_per_sec,
        "{drained:?}"
    );
    assert!(drained.order_rss_mb_at_start > 0.0);
    assert!(drained.order_rss_mb_peak >= drained.order_rss_mb_at_start);
    // Every process's CPU counts from the broker's return.
    let processes: Vec<&str> = drained.cores.iter().map(|(p, _)| p.as_str()).collect();
    for process in ["order", "inventory", "nats-server", "postgres", "load"] {
        assert!(processes.contains(&process), "{drained:?}");
    }
    assert!(
        drained.cores.iter().all(|(_, cores)| *cores >= 0.0)
            && drained.cores.windows(2).all(|w| w[0].1 >= w[1].1),
        "{drained:?}"
    );
    assert!(
        drained.line().contains("cores used: "),
        "{}",
        drained.line()
    );
    serde_json::to_string(&drained).unwrap();
}

/// `load --instances 2 --rounds N`: a run with one instance of each
/// service, then one with two, each on a system started for it, every
/// run's report written as it ends, and the comparison of their sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comparing_instance_counts_runs_one_and_then_more_each_on_a_system_of_its_own() {
    let settings = Settings {
        instances: 1,
        clients: vec![2],
        orders: 4,
        closed_secs: 0.5,
        skus: 5,
        open_secs: 1.0,
        open_at: 0.5,
        open_rate: Some(8.0),
        sweep_at: vec![],
        p99_within_ms: 50.0,
        p99_probes: 0,
        alone: 1,
        limit_clients: 2,
        limit_secs: 0.3,
        statements: false,
    };
    let out = tempfile::tempdir().unwrap();
    let started = std::sync::atomic::AtomicUsize::new(0);
    let start = || {
        started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        e2e::System::start(Options::default())
    };

    let refused = e2e::bench::compare_instances(start, &settings, 1, 1, out.path()).await;
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("2 or more instances"),
        "one instance set beside one is no comparison"
    );
    assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 0);

    let comparison = e2e::bench::compare_instances(start, &settings, 2, 1, out.path())
        .await
        .unwrap();
    assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 2);
    let runs: Vec<(usize, usize)> = comparison
        .runs
        .iter()
        .map(|r| (r.round, r.instances))
        .collect();
    assert_eq!(runs, [(1, 1), (1, 2)]);
    for run in &comparison.runs {
        assert!(
            run.spread_sagas_per_sec > 0.0 && run.hot_sagas_per_sec > 0.0 && !run.hot_oversold,
            "{run:?}"
        );
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.path().join(format!("i{}-r1.json", run.instances))).unwrap(),
        )
        .unwrap();
        assert!(
            report["settings"]
                .as_str()
                .unwrap()
                .contains(&format!("instances: {}", run.instances)),
            "{report}"
        );
        // The run's share taken by the hypervisor: the larger of its two
        // closed loops' (a percentage, so within 1e-9 after serde_json).
        let stolen = |lp: &str| report[lp]["machine"]["steal_percent"].as_f64().unwrap();
        assert!(
            (stolen("spread").max(stolen("hot")) - run.stolen_percent).abs() <= 1e-9,
            "{run:?}"
        );
        // serde_json reads a float back to within a unit of its last place.
        let written = report["spread"]["sagas_per_sec"].as_f64().unwrap();
        assert!(
            (written - run.spread_sagas_per_sec).abs() <= 1e-9 * run.spread_sagas_per_sec,
            "{written} {run:?}"
        );
    }
    let (spread, hot) = comparison.ratio();
    assert!(spread > 0.0 && hot > 0.0, "{spread} {hot}");
    assert!(comparison.table().contains("| sums over 1 round |"));
}

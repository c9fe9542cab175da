//! The benchmark (`load`) runs end to end on a small load, and its report
//! holds together: every order ended, the hot SKU was never oversold, and
//! each loop's cost was counted on its own. Nothing here is timed: speed
//! is what the benchmark measures, not what a test asserts.
use e2e::bench::{Settings, Setup, run};
use e2e::{Options, system};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs_and_its_report_holds_together() {
    // PostgreSQL of its own (the benchmark's, fsync on), whose autovacuum
    // visits each database every second and takes every table that
    // changed at all, so that its rounds end while the short loops run.
    let sys = system(Options {
        durable_postgres: true,
        postgres_settings: "-c autovacuum_naptime=1 \
             -c autovacuum_analyze_threshold=1 -c autovacuum_analyze_scale_factor=0 \
             -c autovacuum_vacuum_threshold=1 -c autovacuum_vacuum_scale_factor=0 \
             -c autovacuum_vacuum_insert_threshold=1 -c autovacuum_vacuum_insert_scale_factor=0"
            .into(),
        ..Options::default()
    })
    .await;
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
    assert!(
        report
            .open_loops
            .iter()
            .any(|run| !run.tail.autovacuum_rounds.is_empty()),
        "autovacuum, visiting every database each second, ended a round in some loop: {:?}",
        report.open_loops
    );
    for run in &report.open_loops {
        assert_eq!(
            run.latency.count,
            (run.rate_per_sec * settings.open_secs).round() as usize,
            "{run:?}"
        );
        // Its slowest sagas, read from each order's timeline: at least
        // the one at its p99, each counted in one of the loop's
        // half-seconds, every hop's median above nought (each hop of a
        // saga is an event after the one before it), and their hops
        // adding up to between the loop's p99 and its slowest saga.
        let tail = &run.tail;
        assert!(
            tail.sagas >= 1
                && !tail.placed.is_empty()
                && tail.placed.len() <= tail.half_seconds
                && tail.half_seconds <= (settings.open_secs * 2.0).ceil() as usize + 1,
            "{run:?}"
        );
        assert!(tail.median_hops_ms.iter().all(|h| *h > 0.0), "{run:?}");
        assert_eq!(
            tail.placed.iter().map(|(_, n)| n).sum::<usize>(),
            tail.sagas,
            "{run:?}"
        );
        assert!(tail.first_placed_unix_secs > 1.7e9, "{run:?}");
        // The autovacuum rounds that ended while it ran, each of a
        // service's database, between the loop's start and its sagas'
        // ends (its counters were read just before its first order).
        for round in &tail.autovacuum_rounds {
            assert!(
                e2e::SERVICES
                    .iter()
                    .any(|service| round.database.contains(service))
                    && round.runs >= 1
                    && -1.0 < round.first_ended_secs
                    && round.first_ended_secs <= round.last_ended_secs
                    && round.last_ended_secs < settings.open_secs + 60.0,
                "{round:?} of {run:?}"
            );
        }
        let slowest: f64 = tail.hops_ms.iter().sum();
        assert!(
            slowest >= run.latency.p99_ms - 1e-6 && slowest <= run.latency.max_ms + 1e-6,
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
        // So is its wait for a core: every process's threads woke and
        // waited, if only microseconds, for a core to run on.
        let waited: Vec<f64> = run
            .processes
            .iter()
            .map(|p| p.waited_ms_per_saga.expect("this kernel keeps run delays"))
            .collect();
        assert!(waited.iter().all(|w| *w > 0.0), "{run:?}");
        let system_waited = run.system_waited_ms_per_saga.expect("every process's");
        assert!(
            (waited[..6].iter().sum::<f64>() - system_waited).abs() < 1e-9,
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
    // Each open loop's wait for a core, and each process's.
    assert!(
        table.matches(" at a time), ").count() == 3
            && table.contains("postgres ")
            && table.contains(" ms (waited "),
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

/// `load --instances 2 --rounds N` and `load --against DIR --rounds N`:
/// each setup's run on a system started for it from its build's folder,
/// every run's report written as it ends, and the comparison of their
/// sums and open loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comparison_runs_each_setup_on_a_system_of_its_own_from_its_build() {
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
    let other = linked_build();
    let started = std::sync::Mutex::new(Vec::new());
    let start = |setup: &Setup| {
        started.lock().unwrap().push(setup.name.clone());
        e2e::System::start(Options {
            bin_dir: Some(setup.bin_dir.clone()),
            ..Options::default()
        })
    };
    let setup = |name: &str, bin_dir: &std::path::Path, instances| Setup {
        name: name.into(),
        bin_dir: bin_dir.to_path_buf(),
        instances,
    };

    let same = [
        setup("A", &harness::bin_dir(), 1),
        setup("B", &harness::bin_dir(), 1),
    ];
    let refused = e2e::bench::compare(start, &settings, same, 1, out.path()).await;
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("nothing to compare"),
        "a setup set beside itself is no comparison"
    );
    assert!(started.lock().unwrap().is_empty());

    let setups = [
        setup("i1", &harness::bin_dir(), 1),
        setup("B", other.path(), 2),
    ];
    let comparison = e2e::bench::compare(start, &settings, setups, 1, out.path())
        .await
        .unwrap();
    assert_eq!(*started.lock().unwrap(), ["i1", "B"]);
    let runs: Vec<(usize, usize)> = comparison.runs.iter().map(|r| (r.round, r.setup)).collect();
    assert_eq!(runs, [(1, 0), (1, 1)]);
    for run in &comparison.runs {
        assert!(
            run.spread_sagas_per_sec > 0.0 && run.hot_sagas_per_sec > 0.0 && !run.hot_oversold,
            "{run:?}"
        );
        let setup = &comparison.setups[run.setup];
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.path().join(format!("{}-r1.json", setup.name))).unwrap(),
        )
        .unwrap();
        assert!(
            report["settings"]
                .as_str()
                .unwrap()
                .contains(&format!("instances: {}", setup.instances)),
            "{report}"
        );
        // The run's share taken by the hypervisor: the largest of its
        // loops' (a percentage, so within 1e-9 after serde_json).
        let closed = |lp: &str| report[lp]["machine"]["steal_percent"].as_f64().unwrap();
        let stolen = report["open_loops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["stolen_percent"].as_f64().unwrap())
            .fold(closed("spread").max(closed("hot")), f64::max);
        assert!((stolen - run.stolen_percent).abs() <= 1e-9, "{run:?}");
        // serde_json reads a float back to within a unit of its last place.
        let written = report["spread"]["sagas_per_sec"].as_f64().unwrap();
        assert!(
            (written - run.spread_sagas_per_sec).abs() <= 1e-9 * run.spread_sagas_per_sec,
            "{written} {run:?}"
        );
        let open = &report["open_loops"][0];
        assert_eq!(run.open_loops.len(), 1, "{run:?}");
        // As above: within a unit of the last place, as serde_json reads it.
        let written = open["latency"]["p99_ms"].as_f64().unwrap();
        let p99 = run.open_loops[0].p99_ms;
        assert!((written - p99).abs() <= 1e-9 * p99, "{written} {run:?}");
    }
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("comparison.json")).unwrap())
            .unwrap();
    assert_eq!(written["runs"].as_array().unwrap().len(), 2, "{written}");
    assert_eq!(written["setups"][1]["instances"], 2, "{written}");
    let (spread, hot) = comparison.ratio();
    assert!(spread > 0.0 && hot > 0.0, "{spread} {hot}");
    let table = comparison.table();
    assert!(table.contains("| sums over 1 round |"), "{table}");
    assert!(table.contains("| 8/s | "), "{table}");
    // Both runs read their processes' wait for a core.
    let verdict = &comparison.open_loops()[0];
    assert!(
        verdict
            .median_waited_ms_per_saga
            .iter()
            .all(|w| w.is_some_and(|w| w > 0.0)),
        "{verdict:?}"
    );
    assert!(
        table.contains(&format!(
            "B: the build in {}, 2 instances of each service",
            other.path().display()
        )),
        "{table}"
    );
}

/// A system started from another build's folder runs that build's
/// binaries, and so do the instances it scales to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_runs_the_binaries_of_the_build_it_is_given_and_so_do_its_twins() {
    let other = linked_build();
    let mut sys = system(Options {
        bin_dir: Some(other.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    sys.scale_to(2).unwrap();
    assert_eq!(sys.extra_instances.len(), e2e::SERVICES.len());
    for process in sys.processes.iter().chain(&sys.extra_instances) {
        let pid = process.pid().expect("running");
        let read = || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        // A process just spawned may not have its arguments in place yet
        // (its parent goes on while its exec is still under way).
        harness::eventually(
            "the process's arguments",
            std::time::Duration::from_secs(10),
            || async { !read().is_empty() },
        )
        .await;
        let cmdline = read();
        let program = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap());
        assert_eq!(
            std::path::Path::new(&*program),
            other.path().join(process.name()),
            "{}",
            process.name()
        );
    }
}

/// Another build for a comparison: this one's service binaries, linked
/// from a folder of their own.
fn linked_build() -> tempfile::TempDir {
    let other = tempfile::tempdir().unwrap();
    for name in e2e::SERVICES {
        std::os::unix::fs::symlink(harness::bin_dir().join(name), other.path().join(name)).unwrap();
    }
    other
}

//! The benchmark: in one run it measures C (this PostgreSQL's saga-step
//! commit rate), the closed-loop peak over a spread catalogue (at each
//! number of clients given, `--clients`) and one hot SKU, latency under an
//! open loop at half that peak (`--open-at`) and for one order alone, what
//! each saga costs (transactions, messages, CPU, memory) and each hop's
//! time; it prints a table and writes JSON and an SVG. With `--rounds N`
//! it compares instead: alternating runs of two setups (one instance of
//! each service and `--instances`, or this build and the one in
//! `--against DIR`), their figures side by side.
//!
//! cargo build --release --workspace --bins && target/release/load
//!
//! It starts its own NATS (fsync before ack, as shipped) and PostgreSQL
//! (fsync and synchronous_commit on) unless NATS_URL / DATABASE_URL name
//! servers to use. See e2e/src/bench.rs for what each figure means.
use clap::Parser;
use e2e::bench::{Settings, Setup, run};
use e2e::{Options, System};

#[derive(Parser)]
#[command(about = "Measure what the saga costs and how fast it goes, in one run")]
struct Args {
    /// Closed-loop clients, each with one order in flight: the spread
    /// catalogue runs with each number in turn, and its peak is the run
    /// with the most sagas/s (the hot SKU and the drain use the peak's).
    #[arg(long, value_delimiter = ',', default_values_t = [32, 64, 128, 256])]
    clients: Vec<usize>,
    /// Orders per closed-loop catalogue, at the least.
    #[arg(long, default_value_t = 2000)]
    orders: usize,
    /// Seconds each closed loop goes on placing orders, at the least (its
    /// start and end, with fewer sagas in flight, are then a small part).
    #[arg(long, default_value_t = 5.0)]
    closed_secs: f64,
    /// SKUs of the spread catalogue (Zipf-distributed).
    #[arg(long, default_value_t = 1000)]
    skus: usize,
    /// Seconds of open-loop arrivals.
    #[arg(long, default_value_t = 20.0)]
    open_secs: f64,
    /// The open loop's arrival rate, as a fraction of the spread peak.
    #[arg(long, default_value_t = 0.5)]
    open_at: f64,
    /// Or a fixed open-loop arrival rate in orders/s, whatever the peak (to
    /// compare runs at the same load).
    #[arg(long)]
    open_rate: Option<f64>,
    /// Lighter open loops run first, as fractions of the open loop's rate
    /// (each for --open-secs): the latency at each load, and the highest
    /// rate whose p99 stays within --p99-within-ms. `--sweep-at` with no
    /// value: none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = [0.1, 0.25])]
    sweep_at: Vec<f64>,
    /// The p99 an open loop's rate must keep to count as within.
    #[arg(long, default_value_t = e2e::bench::P99_WITHIN_MS)]
    p99_within_ms: f64,
    /// Then up to this many more open loops, each halfway between the
    /// highest rate run whose p99 stayed within --p99-within-ms and the
    /// lowest above it whose p99 did not (0: none).
    #[arg(long, default_value_t = 3)]
    p99_probes: usize,
    /// Orders placed one at a time on an idle system.
    #[arg(long, default_value_t = 20)]
    alone: usize,
    /// Connections measuring C, and for how many seconds.
    #[arg(long, default_value_t = 8)]
    limit_clients: usize,
    #[arg(long, default_value_t = 5.0)]
    limit_secs: f64,
    /// Also list each service's statements per saga (start with
    /// HARNESS_POSTGRES_OPTIONS="-c shared_preload_libraries=pg_stat_statements").
    #[arg(long)]
    statements: bool,
    /// Run NATS without fsync before ack (the figure is labelled relaxed).
    #[arg(long)]
    relaxed_fsync: bool,
    /// Instances of each service (sharing its database and durable consumer).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Instead of one run, compare: this many rounds of a run with one
    /// instance of each service and a run with --instances (or, with
    /// --against, of this build and that one), alternating, each on
    /// servers and services of its own; prints each round, the ratio of the
    /// sums and each open loop's median latencies, and writes each run's
    /// report to <out>/instances/ (<out>/builds/).
    #[arg(long, default_value_t = 0)]
    rounds: usize,
    /// With --rounds: set the build whose binaries are in this folder (B)
    /// beside this one (A, SAGA_BIN_DIR or load's own folder), each with
    /// --instances of each service.
    #[arg(long)]
    against: Option<std::path::PathBuf>,
    /// Afterwards, queue this many orders' events while NATS is down and
    /// measure how fast the backlog drains once it is back (0: skip).
    #[arg(long, default_value_t = 0)]
    drain: usize,
    /// Where to write bench.json and bench.svg.
    #[arg(long, default_value = "target/bench")]
    out: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    e2e::until_signal(bench(Args::parse())).await
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let options = Options {
        log: "warn".into(),
        relaxed_fsync: args.relaxed_fsync,
        durable_postgres: std::env::var_os("DATABASE_URL").is_none(),
        shipped_intervals: true,
        ..Options::default()
    };
    let settings = Settings {
        instances: args.instances,
        clients: args.clients.clone(),
        orders: args.orders,
        closed_secs: args.closed_secs,
        skus: args.skus,
        open_secs: args.open_secs,
        open_at: args.open_at,
        open_rate: args.open_rate,
        sweep_at: args.sweep_at.clone(),
        p99_within_ms: args.p99_within_ms,
        p99_probes: args.p99_probes,
        alone: args.alone,
        limit_clients: args.limit_clients,
        limit_secs: args.limit_secs,
        statements: args.statements,
    };
    anyhow::ensure!(
        args.against.is_none() || args.rounds > 0,
        "--against compares two builds over rounds: give --rounds too"
    );
    if args.rounds > 0 {
        anyhow::ensure!(
            args.drain == 0,
            "--rounds compares throughput and latency; measure the drain (--drain) in a run of its own"
        );
        let this = harness::bin_dir();
        let (setups, out) = match &args.against {
            Some(other) => {
                anyhow::ensure!(
                    other.join("order").exists(),
                    "{} holds no service binaries (build them with cargo build --release --workspace --bins and copy target/release's)",
                    other.display()
                );
                let setup = |name: &str, bin_dir| Setup {
                    name: name.into(),
                    bin_dir,
                    instances: args.instances,
                };
                (
                    [setup("A", this), setup("B", other.clone())],
                    args.out.join("builds"),
                )
            }
            None => {
                anyhow::ensure!(
                    args.instances >= 2,
                    "comparing instance counts needs 2 or more instances to set beside one (--instances), or another build (--against)"
                );
                let setup = |instances| Setup {
                    name: format!("i{instances}"),
                    bin_dir: this.clone(),
                    instances,
                };
                (
                    [setup(1), setup(args.instances)],
                    args.out.join("instances"),
                )
            }
        };
        eprintln!(
            "load: {} rounds of {} and {}, on {}",
            args.rounds,
            setups[0].name,
            setups[1].name,
            e2e::bench::machine()
        );
        let comparison = e2e::bench::compare(
            |setup: &Setup| {
                System::start(Options {
                    bin_dir: Some(setup.bin_dir.clone()),
                    ..options.clone()
                })
            },
            &settings,
            setups,
            args.rounds,
            &out,
        )
        .await?;
        println!("{}", comparison.table());
        eprintln!(
            "wrote each run's report and comparison.json in {}",
            out.display()
        );
        return Ok(());
    }
    let mut sys = System::start(options).await?;
    // The extra instances run until the end of the benchmark.
    sys.scale_to(args.instances)?;
    eprintln!(
        "load: {} instance(s) of each service; binaries in {}, on {}",
        args.instances,
        harness::bin_dir().display(),
        e2e::bench::machine()
    );
    let report = run(&sys, &settings).await?;
    println!("{}", report.table());
    if args.drain > 0 {
        sys.scale_to(1)?;
        let drained = e2e::bench::drain(&mut sys, args.drain, report.spread.clients).await?;
        println!("{}", drained.line());
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(
            args.out.join("drain.json"),
            serde_json::to_string_pretty(&drained)?,
        )?;
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("bench.svg"), report.svg())?;
    eprintln!("wrote {0}/bench.json and {0}/bench.svg", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_runs_by_default_at_a_tenth_and_a_quarter_and_can_be_left_out() {
        let sweep = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("load").chain(args.iter().copied()))
                .unwrap()
                .sweep_at
        };
        assert_eq!(sweep(&[]), [0.1, 0.25]);
        assert_eq!(sweep(&["--sweep-at", "0.2,0.3"]), [0.2, 0.3]);
        assert!(sweep(&["--sweep-at"]).is_empty());
        assert!(sweep(&["--sweep-at", "--orders", "10"]).is_empty());
    }

    #[test]
    fn the_search_holds_the_p99_to_50_ms_in_three_probes_unless_told_otherwise() {
        let parse = |args: &[&str]| {
            let args =
                Args::try_parse_from(std::iter::once("load").chain(args.iter().copied())).unwrap();
            (args.p99_within_ms, args.p99_probes)
        };
        assert_eq!(parse(&[]), (50.0, 3));
        assert_eq!(
            parse(&["--p99-within-ms", "20", "--p99-probes", "0"]),
            (20.0, 0)
        );
    }
}

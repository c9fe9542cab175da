//! The load benchmark: places N happy-path orders from C concurrent clients
//! against the real services and reports throughput and end-to-end latency
//! (PlaceOrder accepted -> notification.sent recorded), from each order's timeline.
//!
//! cargo build --release --workspace --bins && target/release/load --orders 2000 --concurrency 32
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use e2e::{Options, OrderStatus, System, order_request};

#[derive(Parser)]
#[command(about = "Measure orders per second and end-to-end latency of the saga")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Run NATS without fsync before ack, to measure what `sync_interval: always` costs.
    #[arg(long)]
    relaxed_fsync: bool,
}

fn seconds(t: &Option<prost_types::Timestamp>) -> f64 {
    t.as_ref()
        .map(|t| t.seconds as f64 + t.nanos as f64 / 1e9)
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sys = System::start(Options {
        log: "warn".into(),
        relaxed_fsync: args.relaxed_fsync,
        ..Options::default()
    })
    .await?;
    sys.set_stock("BOOK", 10_000_000).await?;
    println!(
        "load: {} orders from {} concurrent clients, binaries in {}, NATS {}",
        args.orders,
        args.concurrency,
        harness::bin_dir().display(),
        if args.relaxed_fsync {
            "WITHOUT fsync before ack (relaxed)"
        } else {
            "with fsync before ack (sync_interval: always)"
        }
    );

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    // The services stamp events with this machine's clock: the end-to-end time
    // is read from their timestamps, not from how fast this client polls.
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let clients: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (next, clients, total) = (next.clone(), sys.clients.clone(), args.orders);
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return anyhow::Ok(ids);
                    }
                    let request = order_request(
                        &format!("load-{i}"),
                        &format!("c{i}"),
                        "DE",
                        "c@example.com",
                        &[("BOOK", 1)],
                    );
                    ids.push(clients.place(request).await?.order_id);
                }
            })
        })
        .collect();
    let mut ids = Vec::new();
    for client in clients {
        ids.extend(client.await??);
    }
    let placed_in = started.elapsed();

    // Wait until every order is done, checking the newest first (they finish last).
    let mut open: Vec<&String> = ids.iter().collect();
    while !open.is_empty() {
        let order = sys.get(open[open.len() - 1]).await?;
        if matches!(
            order.status(),
            OrderStatus::Completed | OrderStatus::Cancelled
        ) {
            open.pop();
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "orders did not finish"
        );
    }

    let mut latencies = Vec::with_capacity(ids.len());
    let mut completed = 0;
    let mut last_done = started_at;
    for id in &ids {
        let order = sys.get(id).await?;
        if order.status() == OrderStatus::Completed {
            completed += 1;
        }
        if let Some(last) = order.timeline.last() {
            let done = seconds(&last.occurred_at);
            latencies.push(done - seconds(&order.created_at));
            last_done = last_done.max(done);
        }
    }
    let done_in = Duration::from_secs_f64(last_done - started_at);
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize] * 1000.0;
    println!(
        "  placed:      {:>8.1} PlaceOrder/s ({} in {:.2}s)",
        ids.len() as f64 / placed_in.as_secs_f64(),
        ids.len(),
        placed_in.as_secs_f64()
    );
    println!(
        "  completed:   {:>8.1} orders/s end to end ({completed} completed, the last {:.2}s after the first was placed)",
        ids.len() as f64 / done_in.as_secs_f64(),
        done_in.as_secs_f64()
    );
    println!(
        "  latency ms:  p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
        pct(0.50),
        pct(0.95),
        pct(0.99),
        pct(1.0)
    );
    let counts = sys.consumer_counts().await?;
    let per_saga = |n: u64| n as f64 / completed.max(1) as f64;
    let (deliveries, acks) = counts
        .iter()
        .fold((0, 0), |(d, a), (dd, aa)| (d + dd, a + aa));
    println!(
        "  NATS per completed saga: {:.2} deliveries, {:.2} acks ({})",
        per_saga(deliveries),
        per_saga(acks),
        e2e::SERVICES
            .iter()
            .zip(&counts)
            .map(|(s, (d, _))| format!("{s} {:.2}", per_saga(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

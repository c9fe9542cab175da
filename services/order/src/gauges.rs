//! Order counts by status for the metrics endpoint, sampled from the table
//! (every instance reports the same numbers; they are facts of the database).
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The sampler waits at least this many times as long as its last count
/// took before counting again, so counting costs the database at most a
/// fiftieth of its time however large `orders` grows. The count reads
/// every order (by the status index once vacuum has marked the table's
/// pages visible): measured, 125-130 ms for a million orders (190-200 ms
/// in one backend without parallel workers), a tenth of a core at one
/// count every 2 s, so it is made every 6.5 s there; 12 ms for the 20,000
/// orders of a benchmark run, counted at the usual interval.
const WAIT_PER_COUNTING: u32 = 50;

/// How long the sampler waits before its next count: `every`, or longer
/// when the last count took more than a fiftieth of that.
pub fn next_count_in(every: Duration, counting_took: Duration) -> Duration {
    every.max(counting_took * WAIT_PER_COUNTING)
}

/// Samples how many orders are in each status into the `saga_orders` gauge,
/// every `every` or less often on a table too large to count that often
/// ([`next_count_in`]).
pub async fn sample_statuses(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        let started = tokio::time::Instant::now();
        // A count that failed (the database away: it can take the pool's
        // whole wait) says nothing of what counting costs.
        let took = match crate::store::status_counts(&pool).await {
            Ok(counts) => {
                for (status, n) in counts {
                    metrics::gauge!("saga_orders", "status" => status.as_str()).set(n as f64);
                }
                started.elapsed()
            }
            Err(_) => Duration::ZERO,
        };
        tokio::select! {
            _ = tokio::time::sleep(next_count_in(every, took)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_that_takes_long_is_made_less_often() {
        let every = Duration::from_secs(2);
        assert_eq!(next_count_in(every, Duration::from_millis(12)), every);
        assert_eq!(
            next_count_in(every, Duration::from_millis(170)),
            Duration::from_millis(8500)
        );
        assert_eq!(
            next_count_in(every, Duration::from_secs(2)),
            Duration::from_secs(100)
        );
    }
}

//! Order counts by status for the metrics endpoint, sampled from the table
//! (every instance reports the same numbers; they are facts of the database).
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Samples how many orders are in each status into the `saga_orders` gauge,
/// every `every` or less often on a table too large to count that often
/// ([`choreo::db::next_count_in`]).
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
            _ = tokio::time::sleep(choreo::db::next_count_in(every, took)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

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
        let (counted, took) = choreo::db::timed_count(crate::store::status_counts(&pool)).await;
        if let Ok(counts) = counted {
            for (status, n) in counts {
                metrics::gauge!("saga_orders", "status" => status.as_str()).set(n as f64);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(choreo::db::next_count_in(every, took)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

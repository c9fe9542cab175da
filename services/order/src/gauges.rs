//! Order counts by status for the metrics endpoint, sampled from the table
//! (every instance reports the same numbers; they are facts of the database).
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Samples how many orders are in each status into the `saga_orders` gauge.
pub async fn sample_statuses(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        if let Ok(counts) = crate::store::status_counts(&pool).await {
            for (status, n) in counts {
                metrics::gauge!("saga_orders", "status" => status.as_str()).set(n as f64);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

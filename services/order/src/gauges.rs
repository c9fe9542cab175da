//! Order counts by status for the metrics endpoint, sampled from the table
//! (every instance reports the same numbers; they are facts of the database).
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::domain::Status;

/// Samples how many orders are in each status into the `saga_orders` gauge.
pub async fn sample_statuses(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        let counts: Result<Vec<(Status, i64)>, sqlx::Error> =
            sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status")
                .fetch_all(&pool)
                .await;
        if let Ok(counts) = counts {
            for status in Status::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| *s == status)
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                metrics::gauge!("saga_orders", "status" => status.as_str()).set(n as f64);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

//! What the order service's database tests share.
use std::time::Duration;

use sqlx::PgPool;

/// A fresh database on the harness's PostgreSQL, with the platform's and
/// the order service's migrations applied.
pub async fn database() -> (harness::Postgres, PgPool) {
    let (pg, url) = harness::fresh_database().await.unwrap();
    let migrations = sqlx::migrate!("../../migrations/order");
    let pool = choreo::db::open(&url, Duration::from_secs(10), &migrations)
        .await
        .unwrap();
    (pg, pool)
}

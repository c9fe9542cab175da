//! Connecting to the service's database and applying migrations: the
//! platform's tables (tracked apart, in `_choreo_migrations`) then the service's.
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// A pool for `url`, retrying until the database answers or `give_up` passes.
pub async fn connect(url: &str, give_up: Duration) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    let deadline = tokio::time::Instant::now() + give_up;
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = PgPoolOptions::new()
            .max_connections(20)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await;
        match attempt {
            Ok(pool) => return Ok(pool),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "database not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Applies the platform's migrations and then `service`'s.
pub async fn migrate(pool: &PgPool, service: &Migrator) -> anyhow::Result<()> {
    platform_migrator().run(pool).await?;
    service.run(pool).await?;
    Ok(())
}

/// The platform's own migrations (outbox, inbox, dead letters, barrier).
pub fn platform_migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("../../migrations/choreo");
    migrator.dangerous_set_table_name("_choreo_migrations");
    migrator
}

//! Keeps the plumbing tables from growing for ever, with retentions derived
//! from the stream's own settings rather than guessed:
//! - a sent outbox row is never published again; it is kept for one
//!   duplicate window (long enough to answer "was this sent?" while
//!   JetStream itself still remembers the message id);
//! - an inbox row must outlive every copy of its event that could still be
//!   delivered: copies live in the stream for at most `max_age`, and a relay
//!   republish lands within the duplicate window, so it is kept for
//!   `max_age + duplicate_window`.
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub sent_outbox: Duration,
    pub inbox: Duration,
}

impl Retention {
    pub fn derive(config: &Config) -> Self {
        Retention {
            sent_outbox: config.duplicate_window(),
            inbox: config.stream_max_age() + config.duplicate_window(),
        }
    }
}

/// Deletes what retention allows; returns (outbox rows, inbox rows) deleted.
pub async fn sweep(pool: &PgPool, retention: Retention) -> Result<(u64, u64), sqlx::Error> {
    let outbox = sqlx::query(
        "DELETE FROM choreo_outbox WHERE sent_at IS NOT NULL AND sent_at < now() - make_interval(secs => $1)",
    )
    .bind(retention.sent_outbox.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    let inbox = sqlx::query(
        "DELETE FROM choreo_inbox WHERE received_at < now() - make_interval(secs => $1)",
    )
    .bind(retention.inbox.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok((outbox, inbox))
}

/// Sweeps every `every` until `shutdown`.
pub async fn run(pool: PgPool, retention: Retention, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        match sweep(&pool, retention).await {
            Ok((outbox, inbox)) if outbox + inbox > 0 => {
                tracing::info!(outbox, inbox, "cleanup deleted expired plumbing rows")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cleanup failed; will retry"),
        }
    }
}

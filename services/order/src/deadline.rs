//! The order's deadline: an open order that makes no progress in time is
//! cancelled with a reason naming the step it waited for. Every instance
//! runs this; `FOR UPDATE SKIP LOCKED` gives each overdue order to one of them.
use std::time::Duration;

use choreo::Outbox;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{handler, store};

pub async fn run(
    pool: PgPool,
    outbox: Outbox,
    deadline: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let swept = choreo::outbox::publish_after_commit(sweep(&pool, &outbox, deadline));
        if let Err(e) = swept.await {
            tracing::warn!(error = %e, "deadline sweep failed; will retry");
        }
    }
}

/// Cancels the overdue orders; returns how many.
pub async fn sweep(
    pool: &PgPool,
    outbox: &Outbox,
    deadline: Duration,
) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let overdue = store::lock_overdue(&mut tx, 100).await?;
    for (id, status) in &overdue {
        let reason = format!(
            "deadline: no progress within {}s while waiting for {}",
            deadline.as_secs(),
            status.waiting_for()
        );
        tracing::info!(order_id = %id, %reason, "order deadline passed");
        handler::start_cancel(&mut tx, outbox, *id, &reason, deadline).await?;
    }
    tx.commit().await?;
    Ok(overdue.len())
}

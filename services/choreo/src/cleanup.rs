//! Keeps the plumbing tables from growing for ever, with retentions derived
//! from the stream's own settings rather than guessed, and erases the
//! personal data a service no longer needs:
//! - a sent outbox row is never published again; it is kept for one
//!   duplicate window (long enough to answer "was this sent?" while
//!   JetStream itself still remembers the message id);
//! - an inbox row must outlive every copy of its event that could still be
//!   delivered: copies live in the stream for at most `max_age`, and a relay
//!   republish lands within the duplicate window, so it is kept for
//!   `max_age + duplicate_window`. A barrier row and a stuck report answer
//!   questions about the same deliveries, so they are kept as long; a dead
//!   letter holds a copy of an event's bytes (possibly personal data), and
//!   is kept as long as the stream could still hold the event, too;
//! - personal data (a contact address, a message body) is erased by the
//!   service's own [`Erasure`] rules once its saga has ended and
//!   `PERSONAL_DATA_RETENTION_DAYS` have passed.
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub sent_outbox: Duration,
    /// Inbox rows, barrier rows, stuck reports and dead letters.
    pub inbox: Duration,
    /// Personal data of ended sagas.
    pub personal_data: Duration,
}

impl Retention {
    pub fn derive(config: &Config) -> Self {
        Retention {
            sent_outbox: config.duplicate_window(),
            inbox: config.stream_max_age() + config.duplicate_window(),
            personal_data: Duration::from_secs(config.personal_data_retention_days * 24 * 3600),
        }
    }
}

/// A service's rule for erasing personal data it no longer needs: one SQL
/// statement that blanks it in rows whose saga ended more than `$1` seconds
/// ago (a float), and marks them so the next sweep passes them by.
#[derive(Debug, Clone, Copy)]
pub struct Erasure {
    /// What it erases, for the log: e.g. "contact addresses of ended orders".
    pub what: &'static str,
    pub statement: &'static str,
}

/// Rows each sweep deleted or erased.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub outbox: u64,
    pub inbox: u64,
    pub barrier: u64,
    pub stuck: u64,
    pub dead_letters: u64,
    pub erased: u64,
}

impl Swept {
    fn total(&self) -> u64 {
        self.outbox + self.inbox + self.barrier + self.stuck + self.dead_letters + self.erased
    }
}

/// Deletes what retention allows and applies `erasures`.
pub async fn sweep(
    pool: &PgPool,
    retention: Retention,
    erasures: &[Erasure],
) -> Result<Swept, sqlx::Error> {
    let delete = |statement: &'static str, age: Duration| async move {
        sqlx::query(statement)
            .bind(age.as_secs_f64())
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
    };
    let mut swept = Swept {
        outbox: delete(
            "DELETE FROM choreo_outbox WHERE sent_at IS NOT NULL AND sent_at < now() - make_interval(secs => $1)",
            retention.sent_outbox,
        )
        .await?,
        inbox: delete(
            "DELETE FROM choreo_inbox WHERE received_at < now() - make_interval(secs => $1)",
            retention.inbox,
        )
        .await?,
        barrier: delete(
            "DELETE FROM choreo_barrier WHERE updated_at < now() - make_interval(secs => $1)",
            retention.inbox,
        )
        .await?,
        stuck: delete(
            "DELETE FROM choreo_stuck WHERE reported_at < now() - make_interval(secs => $1)",
            retention.inbox,
        )
        .await?,
        dead_letters: delete(
            "DELETE FROM choreo_dead_letter WHERE parked_at < now() - make_interval(secs => $1)",
            retention.inbox,
        )
        .await?,
        erased: 0,
    };
    for erasure in erasures {
        let erased = delete(erasure.statement, retention.personal_data).await?;
        if erased > 0 {
            tracing::info!(
                erased,
                what = erasure.what,
                "erased personal data past its retention"
            );
        }
        swept.erased += erased;
    }
    Ok(swept)
}

/// Sweeps every `every` until `shutdown`.
pub async fn run(
    pool: PgPool,
    retention: Retention,
    erasures: Vec<Erasure>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        match sweep(&pool, retention, &erasures).await {
            Ok(swept) if swept.total() > 0 => {
                tracing::info!(
                    ?swept,
                    "cleanup deleted or erased rows past their retention"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cleanup failed; will retry"),
        }
    }
}

//! Publishes committed outbox rows to JetStream.
//!
//! One relay per service database is active at a time: it holds a session
//! advisory lock on a dedicated connection and does all its reads and writes on
//! that connection, so losing the connection loses the lock and the relay steps
//! down. Rows are picked by `sent_at IS NULL` in `seq` order (never by "id above
//! the last one sent": ids commit out of order). A batch is published with
//! several PubAcks in flight; only acknowledged rows are marked sent. A crash
//! between PubAck and marking republishes, and JetStream's duplicate window
//! (`Nats-Msg-Id` = event id) or, past it, the consumers' inbox drops the copy.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Session advisory lock key ("choreo" in ASCII); advisory locks are per database.
const LEADER_LOCK: i64 = 0x63686f72656f;
/// The longest wait between publish rounds that fail. Short: the usual cause
/// is a stream leader election (a few seconds on a cluster), and every second
/// waited past its end is a second every saga stalls.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Counters a test or metrics endpoint can read.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Outbox rows this relay published and saw acknowledged.
    pub published: AtomicU64,
    /// Whether this relay holds the leader lock right now.
    pub leader: AtomicBool,
}

/// The result of one publish round.
#[derive(Debug, Default)]
pub struct Published {
    /// Unsent rows found.
    pub attempted: usize,
    /// Event ids whose PubAck arrived.
    pub acked: Vec<Uuid>,
    /// The first publish error, if any row was not acknowledged.
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    batch: i64,
    poll: Duration,
    stats: Arc<RelayStats>,
}

impl Relay {
    pub fn new(pool: PgPool, js: jetstream::Context, batch: i64, poll: Duration) -> Self {
        Relay {
            pool,
            js,
            batch,
            poll,
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown`: waits for leadership, then relays.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.lead(&shutdown).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "relay lost its database connection; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One term: take the lock (or return when shut down), relay until the connection fails.
    async fn lead(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?.detach();
        loop {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK)
                .fetch_one(&mut conn)
                .await?;
            if locked {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll * 2) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        tracing::info!("relay is the leader for this database");
        self.stats.leader.store(true, Ordering::SeqCst);
        let result = self.relay_as_leader(&mut conn, shutdown).await;
        self.stats.leader.store(false, Ordering::SeqCst);
        let _ = conn.close().await; // closing the session releases the lock
        result
    }

    async fn relay_as_leader(
        &self,
        conn: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut wakeup = crate::db::Wakeup::new(self.pool.clone(), "choreo_outbox", self.poll);
        wakeup.listen().await;
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let round = self.publish(conn).await?;
            self.mark_sent(conn, &round.acked).await?;
            if let Some(error) = &round.error {
                tracing::warn!(%error, unsent = round.attempted - round.acked.len(), "publish failed; will retry");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            backoff = Duration::from_millis(100);
            if round.attempted as i64 >= self.batch {
                continue; // more rows are waiting
            }
            wakeup.wait(shutdown).await;
        }
        Ok(())
    }

    /// Publishes up to one batch of unsent rows, PubAcks in flight together,
    /// and reports which were acknowledged. Does not mark anything sent.
    pub async fn publish(&self, conn: &mut PgConnection) -> Result<Published, sqlx::Error> {
        let rows: Vec<(Uuid, String, Vec<u8>, String)> = sqlx::query_as(
            "SELECT event_id, subject, payload, traceparent FROM choreo_outbox
             WHERE sent_at IS NULL ORDER BY seq LIMIT $1",
        )
        .bind(self.batch)
        .fetch_all(&mut *conn)
        .await?;
        let mut round = Published {
            attempted: rows.len(),
            ..Published::default()
        };
        let mut in_flight = Vec::with_capacity(rows.len());
        let started = std::time::Instant::now();
        for (event_id, subject, payload, traceparent) in rows {
            let mut message = PublishMessage::build()
                .payload(payload.into())
                .message_id(event_id.to_string());
            if !traceparent.is_empty() {
                message = message.header("traceparent", traceparent.as_str());
            }
            match self.js.send_publish(subject, message).await {
                Ok(ack) => in_flight.push((event_id, ack)),
                Err(e) => {
                    round.error = Some(e.to_string());
                    break;
                }
            }
        }
        for (event_id, ack) in in_flight {
            match ack.await {
                Ok(_) => {
                    metrics::histogram!("saga_publish_latency_seconds")
                        .record(started.elapsed().as_secs_f64());
                    round.acked.push(event_id)
                }
                Err(e) => {
                    round.error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        self.stats
            .published
            .fetch_add(round.acked.len() as u64, Ordering::Relaxed);
        metrics::counter!("saga_outbox_published_total").increment(round.acked.len() as u64);
        Ok(round)
    }

    /// Marks acknowledged rows sent.
    pub async fn mark_sent(
        &self,
        conn: &mut PgConnection,
        acked: &[Uuid],
    ) -> Result<(), sqlx::Error> {
        if acked.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE choreo_outbox SET sent_at = now() WHERE event_id = ANY($1) AND sent_at IS NULL",
        )
        .bind(acked)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// Samples the outbox backlog and the age of its oldest unsent row into
/// gauges every `every`, until `shutdown`.
pub async fn sample_backlog(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        let sample: Result<(i64, Option<f64>), sqlx::Error> = sqlx::query_as(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM choreo_outbox WHERE sent_at IS NULL",
        )
        .fetch_one(&pool)
        .await;
        if let Ok((backlog, oldest)) = sample {
            metrics::gauge!("saga_outbox_backlog").set(backlog as f64);
            metrics::gauge!("saga_outbox_oldest_unsent_age_seconds").set(oldest.unwrap_or(0.0));
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

//! Retention against a real PostgreSQL: only rows past their derived
//! retention are deleted.
mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_only_rows_past_their_retention() {
    let s = setup().await;
    s.emit(10).await;
    sqlx::query("UPDATE choreo_outbox SET sent_at = now() - interval '1 hour' WHERE seq <= 4")
        .execute(&s.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE choreo_outbox SET sent_at = now() WHERE seq BETWEEN 5 AND 6")
        .execute(&s.pool)
        .await
        .unwrap();
    for (id, age) in [
        (uuid::Uuid::now_v7(), "30 days"),
        (uuid::Uuid::now_v7(), "1 day"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO choreo_inbox (event_id, event_type, saga_id, received_at) VALUES ($1, 't', 's', now() - interval '{age}')"
        )))
        .bind(id)
        .execute(&s.pool)
        .await
        .unwrap();
    }
    let retention = choreo::cleanup::Retention::derive(&s.config);
    assert_eq!(retention.sent_outbox, s.config.duplicate_window());
    assert_eq!(
        retention.inbox,
        s.config.stream_max_age() + s.config.duplicate_window()
    );
    let (outbox, inbox) = choreo::cleanup::sweep(&s.pool, retention).await.unwrap();
    assert_eq!(
        (outbox, inbox),
        (4, 1),
        "old sent rows and the 30-day inbox row go; the rest stays"
    );
    assert_eq!(s.unsent().await, 4, "unsent rows are never deleted");
}

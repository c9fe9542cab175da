//! Retention against a real PostgreSQL: only rows past their derived
//! retention are deleted, and a service's erasure rule blanks only the
//! personal data of sagas that ended longer ago than its retention.
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
    for age in ["30 days", "1 day"] {
        let when = format!("now() - interval '{age}'");
        for statement in [
            format!(
                "INSERT INTO choreo_barrier (saga_id, step, state, updated_at) VALUES ('{age}', 'x', 'done', {when})"
            ),
            format!(
                "INSERT INTO choreo_stuck (event_id, reported_at) VALUES ('{}', {when})",
                uuid::Uuid::now_v7()
            ),
            format!(
                "INSERT INTO choreo_dead_letter (stream, stream_seq, subject, reason, raw, parked_at) VALUES ('S', {}, 's', 'r', '\\x00', {when})",
                age.len()
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&s.pool)
                .await
                .unwrap();
        }
    }
    let swept = choreo::cleanup::sweep(&s.pool, retention, &[])
        .await
        .unwrap();
    assert_eq!(
        swept,
        choreo::cleanup::Swept {
            outbox: 4,
            inbox: 1,
            barrier: 1,
            stuck: 1,
            dead_letters: 1,
            erased: 0
        },
        "old sent rows and every 30-day row go; the rest stays"
    );
    assert_eq!(s.unsent().await, 4, "unsent rows are never deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_rule_blanks_personal_data_of_ended_sagas_past_retention_only() {
    let s = setup().await;
    sqlx::query(
        "CREATE TABLE people (id INT PRIMARY KEY, contact TEXT NOT NULL, ended BOOL NOT NULL,
                              ended_at TIMESTAMPTZ NOT NULL, erased_at TIMESTAMPTZ)",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO people VALUES
           (1, 'old@example.com', true, now() - interval '31 days', NULL),
           (2, 'recent@example.com', true, now() - interval '29 days', NULL),
           (3, 'open@example.com', false, now() - interval '90 days', NULL)",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    let rule = choreo::cleanup::Erasure {
        what: "contacts of ended sagas",
        statement: "UPDATE people SET contact = '', erased_at = now()
                    WHERE erased_at IS NULL AND ended AND ended_at < now() - make_interval(secs => $1)",
    };
    let retention = choreo::cleanup::Retention::derive(&s.config);
    assert_eq!(
        retention.personal_data,
        Duration::from_secs(30 * 24 * 3600),
        "30 days by default"
    );
    let first = choreo::cleanup::sweep(&s.pool, retention, &[rule])
        .await
        .unwrap();
    assert_eq!(first.erased, 1);
    let again = choreo::cleanup::sweep(&s.pool, retention, &[rule])
        .await
        .unwrap();
    assert_eq!(again.erased, 0, "an erased row is passed by");
    let contacts: Vec<String> = sqlx::query_scalar("SELECT contact FROM people ORDER BY id")
        .fetch_all(&s.pool)
        .await
        .unwrap();
    assert_eq!(contacts, ["", "recent@example.com", "open@example.com"]);
}

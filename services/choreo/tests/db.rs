//! The platform's database connections against a real PostgreSQL: a runaway
//! statement or a forgotten transaction is cut off, not left holding locks.
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_and_idle_transactions_have_time_limits() {
    let (_pg, url) = harness::fresh_database().await.unwrap();
    let pool = choreo::db::connect(&url, Duration::from_secs(10))
        .await
        .unwrap();
    let statement: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    let idle: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((statement.as_str(), idle.as_str()), ("30s", "1min"));
    // A statement past the limit is cancelled (a lower limit, for speed).
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL statement_timeout = '100ms'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let error = sqlx::query("SELECT pg_sleep(5)")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("statement timeout"), "{error}");
}

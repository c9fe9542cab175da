//! The platform's database connections against a real PostgreSQL: a runaway
//! statement or a forgotten transaction is cut off, not left holding locks;
//! a held connection keeps its plans for a while, not for ever.
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

/// The services' connections price a page fetched by key near one read in
/// sequence (their data is in memory), so a batch of keys is looked up by
/// key, not by a scan of the whole table, once the table has a few
/// thousand rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_keys_is_looked_up_by_key_in_a_table_of_a_few_thousand_rows() {
    let (_pg, url) = harness::fresh_database().await.unwrap();
    let pool = choreo::db::connect(&url, Duration::from_secs(10))
        .await
        .unwrap();
    let cost: String = sqlx::query_scalar("SHOW random_page_cost")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(cost, choreo::db::RANDOM_PAGE_COST);
    for statement in [
        "CREATE TABLE rows (id uuid PRIMARY KEY, body text NOT NULL)",
        "INSERT INTO rows SELECT gen_random_uuid(), repeat('x', 100) FROM generate_series(1, 3000)",
        "ANALYZE rows",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN UPDATE rows SET body = '' FROM (SELECT id FROM rows LIMIT 32) AS batch (id)
         WHERE rows.id = batch.id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("Index Scan using rows_pkey"), "{plan}");
}

/// A count over a growing table is sampled less often once it takes long:
/// at most a fiftieth of the time goes to counting.
#[test]
fn a_count_that_takes_long_is_made_less_often() {
    let every = Duration::from_secs(2);
    let next = choreo::db::next_count_in;
    assert_eq!(next(every, Duration::ZERO), every);
    assert_eq!(next(every, Duration::from_millis(12)), every);
    assert_eq!(
        next(every, Duration::from_millis(130)),
        Duration::from_millis(6500)
    );
    assert_eq!(
        next(every, Duration::from_secs(2)),
        Duration::from_secs(100)
    );
}

/// A count is timed when it answers; one that failed counts as free, so a
/// database away does not stretch the wait before the next.
#[tokio::test]
async fn a_failed_count_does_not_stretch_the_wait() {
    let (counted, took) = choreo::db::timed_count(async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<_, ()>(7)
    })
    .await;
    assert_eq!(counted, Ok(7));
    assert!(took >= Duration::from_millis(20), "{took:?}");
    let (counted, took) = choreo::db::timed_count(async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Err::<u32, _>("away")
    })
    .await;
    assert_eq!((counted, took), (Err("away"), Duration::ZERO));
}

/// A held connection keeps its prepared statements (and their plans) from
/// one transaction to the next, and drops them all once they are older
/// than its plan lifetime, on the same connection, so the next run of each
/// is planned from the tables as they are then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_connection_drops_its_plans_after_their_lifetime() {
    let (_pg, url) = harness::fresh_database().await.unwrap();
    let pool = choreo::db::connect(&url, Duration::from_secs(10))
        .await
        .unwrap();
    let mut held =
        choreo::db::HeldConnection::like(&pool).with_plan_lifetime(Duration::from_millis(500));
    // The backend's id and whether the marked statement is prepared on it.
    let look = async |held: &mut choreo::db::HeldConnection, run_marked: bool| {
        held.run(async |conn| {
            const MARKED: &str = "SELECT 1 AS marked WHERE $1";
            if run_marked {
                sqlx::query(MARKED).bind(true).execute(&mut *conn).await?;
            }
            sqlx::query_as::<_, (i32, bool)>(
                "SELECT pg_backend_pid(), EXISTS (SELECT 1 FROM pg_prepared_statements
                 WHERE statement = $1)",
            )
            .bind(MARKED)
            .fetch_one(&mut *conn)
            .await
        })
        .await
        .unwrap()
    };
    let (backend, prepared) = look(&mut held, true).await;
    assert!(prepared, "a statement run on a held connection is prepared");
    assert_eq!(look(&mut held, false).await, (backend, true), "and kept");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        look(&mut held, false).await,
        (backend, false),
        "dropped once older than the plan lifetime, on the same connection"
    );
    assert_eq!(
        look(&mut held, true).await,
        (backend, true),
        "prepared anew"
    );
}

//! Least privilege on both servers, as deploy/ configures them for
//! docker-compose and the harness alike.
//!
//! NATS (deploy/nats.conf, the four services running as their own users):
//! nobody connects without a login, a service user cannot publish another
//! service's event, read the events off the wire, look at a stream it does
//! not read, pull from another's consumer, or change a stream; only the
//! admin can.
//!
//! PostgreSQL (deploy/postgres-init.sql): each service's role reaches its
//! own database only, with its password, and is no superuser.
use std::time::Duration;

use async_nats::jetstream;
use e2e::{Options, system};
use tokio::sync::mpsc;

/// A client logged in as `user`, with its own reply prefix (as the services
/// connect), and the errors the server sends it.
async fn login(
    url: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<(async_nats::Client, mpsc::UnboundedReceiver<String>)> {
    let (errors, received) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(choreo::runtime::inbox_prefix(user))
        .event_callback(move |event| {
            let errors = errors.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = errors.send(e.to_string());
                }
            }
        })
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await?;
    Ok((client, received))
}

/// The next error the server sends, within a few seconds.
async fn next_error(errors: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(5), errors.recv())
        .await
        .expect("the server reports the violation")
        .expect("the connection is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_user_may_do_its_own_part_and_nothing_else() {
    let sys = system(Options::default()).await;
    let url = sys.infra.nats.client_url();
    let stream_of = |producer: &str| choreo::provision::stream_name(&sys.stream, producer);
    let subject = |event: &str| format!("{}.{event}", sys.subject_prefix);

    // No login, or a wrong one: refused at connect.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url.as_str())
        .await;
    let refused = anonymous.expect_err("an anonymous connect is refused");
    assert!(
        refused.to_string().to_lowercase().contains("authorization"),
        "{refused}"
    );
    let wrong = login(&url, "inventory", "not-the-password").await;
    assert!(wrong.is_err(), "a wrong password is refused");

    // A place order runs through all four users' permissions end to end.
    let clients = &sys.clients;
    clients.set_stock("BOOK", 5).await.unwrap();
    let placed = clients
        .place(e2e::order_request(
            &e2e::new_key(),
            "ada",
            "US",
            "ada@example.com",
            &[("BOOK", 1)],
        ))
        .await
        .unwrap();
    let done = clients
        .wait_terminal(&placed.order_id, e2e::SETTLE)
        .await
        .unwrap();
    assert_eq!(done.status(), e2e::OrderStatus::Completed);

    let admin = jetstream::new(
        choreo::runtime::connect_once(sys.infra.nats.url(), "test-admin", None)
            .await
            .unwrap(),
    );
    let sent_before = sys.stream_messages().await.unwrap();

    let (inventory, mut errors) = login(&url, "inventory", &harness::password("inventory"))
        .await
        .unwrap();
    // Forbidden requests get no answer: wait for one only briefly.
    let inventory_js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(inventory.clone());

    // Its own event is accepted (the stream acknowledges it) ...
    let own = inventory_js
        .publish(subject("inventory.reserved"), "not a real envelope".into())
        .await
        .unwrap()
        .await;
    assert!(own.is_ok(), "inventory may publish its own events: {own:?}");

    // ... another service's is rejected by the server and never stored.
    let forged = inventory_js
        .publish(subject("notification.sent"), "forged".into())
        .await
        .unwrap()
        .await;
    assert!(forged.is_err(), "no PubAck for a forbidden subject");
    let said = next_error(&mut errors).await;
    assert!(
        said.to_lowercase().contains("permissions violation") && said.contains("notification.sent"),
        "{said}"
    );
    let stream = admin.get_stream(stream_of("notification")).await.unwrap();
    assert!(
        stream
            .get_last_raw_message_by_subject(&subject("notification.sent"))
            .await
            .map(|m| m.payload.as_ref() != b"forged")
            .unwrap_or(true),
        "the forged event is not in the stream"
    );

    // It cannot read the events off the wire ...
    let _sniffer = inventory
        .subscribe(format!("{}.>", sys.subject_prefix))
        .await
        .unwrap();
    let said = next_error(&mut errors).await;
    assert!(
        said.to_lowercase()
            .contains("permissions violation for subscription"),
        "{said}"
    );

    // ... nor look at a stream it does not read (notification's events) ...
    let unread = inventory_js.get_stream(stream_of("notification")).await;
    assert!(
        unread.is_err(),
        "inventory does not read notification's stream"
    );
    let said = next_error(&mut errors).await;
    assert!(said.contains("STREAM.INFO"), "{said}");

    // ... nor pull from another service's consumer on a stream it reads
    // (order reads shipping's events too) ...
    let other = inventory_js
        .get_stream(stream_of("shipping"))
        .await
        .unwrap()
        .get_consumer::<jetstream::consumer::pull::Config>("order")
        .await;
    assert!(other.is_err(), "inventory may not look up order's consumer");
    let said = next_error(&mut errors).await;
    assert!(said.contains("CONSUMER.INFO"), "{said}");

    // ... nor delete or change a stream, its own included.
    let deleted = inventory_js.delete_stream(stream_of("inventory")).await;
    assert!(deleted.is_err(), "a service user cannot delete a stream");
    let said = next_error(&mut errors).await;
    assert!(
        said.to_lowercase().contains("permissions violation") && said.contains("STREAM.DELETE"),
        "{said}"
    );
    let purged = inventory_js
        .get_stream(stream_of("order"))
        .await
        .unwrap()
        .purge()
        .await;
    assert!(purged.is_err(), "a service user cannot purge the stream");
    let created = inventory_js
        .create_stream(jetstream::stream::Config {
            name: "EVERYTHING".into(),
            subjects: vec![">".into()],
            ..Default::default()
        })
        .await;
    assert!(created.is_err(), "a service user cannot create a stream");

    // The streams are whole: everything before, plus inventory's own publish.
    let after = sys.stream_messages().await.unwrap();
    assert_eq!(after, sent_before + 1);
    assert!(admin.get_stream("EVERYTHING").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_role_reaches_its_own_database_only() {
    use sqlx::Connection;
    let postgres = tokio::task::spawn_blocking(harness::Postgres::start_own)
        .await
        .unwrap()
        .unwrap();
    postgres.run_init_script().await.unwrap();

    // Its own database, as a role that is no superuser and cannot make roles or databases.
    let mut own = sqlx::PgConnection::connect(&postgres.database_url_as("inventory", "inventory"))
        .await
        .expect("inventory reaches its own database");
    let (superuser, create_role, create_db): (bool, bool, bool) = sqlx::query_as(
        "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut own)
    .await
    .unwrap();
    assert_eq!((superuser, create_role, create_db), (false, false, false));
    sqlx::query("CREATE TABLE mine (id INT PRIMARY KEY)")
        .execute(&mut own)
        .await
        .expect("it owns its database: its migrations can create tables");

    // Another service's database: refused, whichever way round.
    for (role, database) in [
        ("inventory", "order"),
        ("order", "inventory"),
        ("shipping", "notification"),
    ] {
        let refused = sqlx::PgConnection::connect(&postgres.database_url_as(role, database))
            .await
            .expect_err("a service role cannot connect to another service's database");
        assert!(
            refused
                .to_string()
                .contains("permission denied for database"),
            "{role} -> {database}: {refused}"
        );
    }

    // The right role with a wrong password: refused (scram over TCP, no trust).
    let url = postgres
        .database_url_as("inventory", "inventory")
        .replace(&harness::password("inventory"), "guessed");
    let refused = sqlx::PgConnection::connect(&url)
        .await
        .expect_err("a wrong password is refused");
    assert!(
        refused
            .to_string()
            .contains("password authentication failed"),
        "{refused}"
    );
}

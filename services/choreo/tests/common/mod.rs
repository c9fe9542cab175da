//! What the platform's tests share: a real nats-server and PostgreSQL from
//! the harness, a stream and database of the test's own, a ping event, and a
//! handler that counts its effects.
#![allow(dead_code, unused_imports)] // each test file uses a part of it
pub use std::sync::Arc;
pub use std::sync::atomic::Ordering;
pub use std::time::{Duration, Instant};

pub use async_nats::jetstream::{self, consumer::pull, message::PublishMessage};
pub use choreo::barrier::{self, Action, Compensation};
pub use choreo::choreography::Subscription;
pub use choreo::consumer::{self, Consumer};
pub use choreo::dead_letters;
pub use choreo::inbox::{self, Outcome};
pub use choreo::provision::StreamSpec;
pub use choreo::relay::Relay;
pub use choreo::{
    Config, Decode, Envelope, EventPayload, HandleError, Handler, Outbox, Reject, Tx,
};
pub use harness::Infra;
pub use harness::eventually;
pub use prost::Message;
pub use sqlx::PgPool;
pub use tokio_util::sync::CancellationToken;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    #[prost(uint32, tag = "1")]
    pub n: u32,
}
impl EventPayload for Ping {
    const EVENT_TYPE: &'static str = "test.ping";
    const SCHEMA_VERSION: u32 = 1;
}
impl Decode for Ping {
    fn decode(envelope: &Envelope) -> Result<Self, Reject> {
        envelope.payload()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Mystery {}
impl EventPayload for Mystery {
    const EVENT_TYPE: &'static str = "test.mystery";
    const SCHEMA_VERSION: u32 = 1;
}

/// Counts how many times each event's effect was applied.
pub struct CountEffects {
    pub delay: Duration,
}

#[async_trait::async_trait]
impl Handler for CountEffects {
    type Event = Ping;

    async fn handle(
        &self,
        tx: &mut Tx<'_>,
        event: &Envelope,
        _ping: Ping,
    ) -> Result<(), HandleError> {
        sqlx::query(
            "INSERT INTO effects (event_id, applied) VALUES ($1, 1)
             ON CONFLICT (event_id) DO UPDATE SET applied = effects.applied + 1",
        )
        .bind(event.id())
        .execute(&mut **tx)
        .await?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(())
    }
}

pub struct Setup {
    pub infra: Infra,
    pub pool: PgPool,
    pub config: Config,
    pub js: jetstream::Context,
    pub stream: jetstream::stream::Stream,
}

pub async fn setup() -> Setup {
    setup_with(Infra::start).await
}

/// With servers of our own whatever the environment says: for tests that kill them.
pub async fn setup_own() -> Setup {
    setup_with(Infra::start_own).await
}

pub async fn setup_with(start: fn() -> anyhow::Result<Infra>) -> Setup {
    let infra = tokio::task::spawn_blocking(start)
        .await
        .unwrap()
        .expect("infra");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db = infra.postgres.fresh_database().await.unwrap();
    let mut config = Config::new(infra.nats.url(), &db);
    config.provision_jetstream = true;
    config.stream = format!("T{id}");
    config.subject_prefix = format!("t{id}");
    config.relay_poll_ms = 100;
    config.ack_wait_secs = 5;
    let no_service_migrations = sqlx::migrate::Migrator::with_migrations(vec![]);
    let pool = choreo::db::open(&db, Duration::from_secs(10), &no_service_migrations)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE effects (event_id UUID PRIMARY KEY, applied INT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let (_client, js) = choreo::runtime::connect_nats(infra.nats.url(), "test", None)
        .await
        .unwrap();
    let stream =
        choreo::provision::ensure_stream(&js, &config, &StreamSpec::everything(&config), "test")
            .await
            .unwrap();
    Setup {
        infra,
        pool,
        config,
        js,
        stream,
    }
}

pub struct RunningConsumer {
    pub stats: Arc<consumer::ConsumerStats>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl RunningConsumer {
    /// Shuts the consumer down and waits for its in-flight messages.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

impl Setup {
    pub fn outbox(&self) -> Outbox {
        Outbox::new("test", &self.config.subject_prefix)
    }

    pub fn relay(&self, batch: i64) -> Relay {
        Relay::new(
            self.pool.clone(),
            self.js.clone(),
            batch,
            Duration::from_millis(100),
        )
    }

    /// Runs `relay` until no outbox row is unsent (failing past `within`),
    /// then shuts it down.
    pub async fn relay_until_sent(&self, relay: Relay, within: Duration) {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        eventually("every outbox row marked sent", within, || async {
            self.unsent().await == 0
        })
        .await;
        shutdown.cancel();
        task.await.unwrap();
    }

    /// Commits `n` ping events of seven sagas in one transaction.
    pub async fn emit(&self, n: u32) -> Vec<Envelope> {
        self.emit_with(n, |i| format!("saga-{}", i % 7)).await
    }

    /// Commits `n` ping events in one transaction, the `i`th of saga `saga(i)`.
    pub async fn emit_with(&self, n: u32, saga: impl Fn(u32) -> String) -> Vec<Envelope> {
        let outbox = self.outbox();
        let mut tx = self.pool.begin().await.unwrap();
        let mut sent = Vec::new();
        for i in 0..n {
            sent.push(
                outbox
                    .emit(&mut tx, &saga(i), None, &Ping { n: i })
                    .await
                    .unwrap(),
            );
        }
        tx.commit().await.unwrap();
        sent
    }

    /// The test's one stream (every subject under its prefix), created or
    /// brought up to date for its configuration as it is now.
    pub async fn one_stream(&self) -> jetstream::stream::Stream {
        choreo::provision::ensure_stream(
            &self.js,
            &self.config,
            &StreamSpec::everything(&self.config),
            "test",
        )
        .await
        .unwrap()
    }

    pub async fn stream_messages(&self) -> u64 {
        let mut stream = self.js.get_stream(&self.config.stream).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// The stream's messages in stream order: each one's event id and
    /// whether it came in an atomic batch (its `Nats-Batch-Id`).
    pub async fn stream_events(&self) -> Vec<(String, Option<String>)> {
        let stream = self.js.get_stream(&self.config.stream).await.unwrap();
        let mut events = Vec::new();
        for seq in 1..=self.stream_messages().await {
            let message = stream.get_raw_message(seq).await.unwrap();
            let batch = message
                .headers
                .get("Nats-Batch-Id")
                .map(|v| v.as_str().to_owned());
            events.push((
                Envelope::from_bytes(&message.payload).unwrap().event_id,
                batch,
            ));
        }
        events
    }

    pub async fn unsent(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM choreo_outbox WHERE sent_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Publishes raw bytes to the stream with their own message id.
    pub async fn publish_raw(&self, subject_suffix: &str, bytes: Vec<u8>) {
        self.js
            .send_publish(
                format!("{}.{subject_suffix}", self.config.subject_prefix),
                PublishMessage::build()
                    .payload(bytes.into())
                    .message_id(uuid::Uuid::new_v4().to_string()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    pub async fn consumer(&self, durable: &str) -> jetstream::consumer::PullConsumer {
        self.source(durable).get().await.unwrap()
    }

    /// A consumer of `handler` with `lanes` lanes on durable `durable`, running until stopped,
    /// batching as shipped. Consumes the ping events only.
    pub fn consume<H: Handler>(
        &self,
        handler: Arc<H>,
        lanes: usize,
        durable: &str,
    ) -> RunningConsumer {
        self.consume_batching(handler, lanes, self.config.consumer_batch, durable)
    }

    /// [`Setup::consume`] applying up to `batch` queued events per transaction.
    pub fn consume_batching<H: Handler>(
        &self,
        handler: Arc<H>,
        lanes: usize,
        batch: usize,
        durable: &str,
    ) -> RunningConsumer {
        self.run_consumer(
            Consumer::new(self.pool.clone(), handler, Self::pings(), lanes).batching(batch, lanes),
            durable,
        )
    }

    /// One batching lane that waits up to `linger` for more events when they come close together.
    pub fn consume_lingering<H: Handler>(
        &self,
        handler: Arc<H>,
        linger: Duration,
        durable: &str,
    ) -> RunningConsumer {
        self.run_consumer(
            Consumer::new(self.pool.clone(), handler, Self::pings(), 1)
                .batching(self.config.consumer_batch, 1)
                .lingering(linger),
            durable,
        )
    }

    /// [`Setup::consume`] with one lane, pulling ahead of the durable's
    /// other consumers while `leading` says so (as a service instance
    /// whose relay leads).
    pub fn consume_preferred<H: Handler>(
        &self,
        handler: Arc<H>,
        leading: tokio::sync::watch::Receiver<Option<bool>>,
        durable: &str,
    ) -> RunningConsumer {
        self.run_consumer(
            Consumer::new(self.pool.clone(), handler, Self::pings(), 1)
                .batching(self.config.consumer_batch, 1)
                .preferred_while(leading),
            durable,
        )
    }

    fn pings() -> Subscription {
        Subscription::of(&[Ping::EVENT_TYPE])
    }

    fn run_consumer<H: Handler>(&self, consumer: Consumer<H>, durable: &str) -> RunningConsumer {
        let stats = consumer.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer.run(vec![self.source(durable)], shutdown.clone()));
        RunningConsumer {
            stats,
            shutdown,
            task,
        }
    }

    /// The durable consumer `durable` of the pings, on the test's one stream.
    pub fn source(&self, durable: &str) -> choreo::provision::ConsumerSource {
        self.source_of(durable, &Self::pings())
    }

    /// The durable consumer `durable` of `subscription`, on the test's one stream.
    pub fn source_of(
        &self,
        durable: &str,
        subscription: &Subscription,
    ) -> choreo::provision::ConsumerSource {
        choreo::provision::ConsumerSource::new(
            self.js.clone(),
            self.config.clone(),
            durable,
            StreamSpec::everything(&self.config),
            subscription.subjects(&self.config.subject_prefix),
        )
    }

    pub async fn effect_counts(&self) -> Vec<i32> {
        sqlx::query_scalar("SELECT applied FROM effects ORDER BY event_id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }
}

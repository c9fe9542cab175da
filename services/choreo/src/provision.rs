//! Streams and durable consumers, created idempotently at start.
//!
//! nats-server 2.9 ignores `filter_subjects` (plural) and consumer metadata, so
//! each service has ONE durable pull consumer with a single filter over the
//! whole saga stream and lets its handler pick the events it reacts to.
use async_nats::jetstream::{self, consumer::pull, stream};

use crate::config::Config;

/// Where a service's consumer loop gets its durable consumer, at start and
/// again whenever the broker has lost it (a crashed nats-server can come back
/// without a consumer it had just created, or with an older ack floor).
#[derive(Clone)]
pub struct ConsumerSource {
    js: jetstream::Context,
    config: Config,
    durable: String,
}

impl ConsumerSource {
    pub fn new(js: jetstream::Context, config: Config, durable: &str) -> Self {
        ConsumerSource {
            js,
            config,
            durable: durable.to_owned(),
        }
    }

    /// Ensures the stream and the durable consumer exist, and returns the consumer.
    pub async fn get(&self) -> anyhow::Result<jetstream::consumer::PullConsumer> {
        let stream = ensure_stream(&self.js, &self.config).await?;
        ensure_consumer(&stream, &self.durable, &self.config).await
    }
}

/// The stream every saga event goes to.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &Config,
) -> anyhow::Result<stream::Stream> {
    let stream = js
        .get_or_create_stream(stream::Config {
            name: config.stream.clone(),
            subjects: vec![config.all_events_subject()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_age: config.stream_max_age(),
            duplicate_window: config.duplicate_window(),
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating stream {}: {e}", config.stream))?;
    Ok(stream)
}

/// The durable pull consumer named `durable` over every saga event.
pub async fn ensure_consumer(
    stream: &stream::Stream,
    durable: &str,
    config: &Config,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    let consumer = stream
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: config.all_events_subject(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_wait: config.ack_wait(),
                max_ack_pending: config.max_ack_pending,
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("creating consumer {durable}: {e}"))?;
    Ok(consumer)
}

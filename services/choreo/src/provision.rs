//! The stream and each service's durable consumer, created or brought up to
//! date at start (and again whenever the broker has lost them).
//!
//! A service's durable consumer filters exactly the subjects of its
//! subscription (`filter_subjects`, nats-server 2.10+), so the broker delivers
//! it only what it consumes. Provisioning is create-or-update: a new version of
//! a service that consumes more or fewer events moves the existing consumer's
//! filter, keeping its position, so nothing published meanwhile is lost.
//!
//! Only a process's first provisioning updates the consumer. When the loop
//! comes back after a broker outage it reuses the consumer as it finds it
//! (creating it only if the broker lost it), so an old instance still running
//! during a rolling deploy cannot narrow the filter the new version set.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::jetstream::consumer::{DeliverPolicy, PriorityPolicy, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, stream};

use crate::choreography::Subscription;
use crate::config::Config;

/// Where a service's consumer loop gets its durable consumer, at start and
/// again whenever the broker has lost it (a crashed nats-server can come back
/// without a consumer it had just created, or with an older ack floor).
#[derive(Clone)]
pub struct ConsumerSource {
    js: jetstream::Context,
    config: Config,
    durable: String,
    subscription: Subscription,
    /// Whether this process has brought the consumer up to date already.
    updated: Arc<AtomicBool>,
}

impl ConsumerSource {
    /// The NATS connection the consumer pulls on.
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    /// The durable consumer `durable` (the service's name) over `subscription`.
    pub fn new(
        js: jetstream::Context,
        config: Config,
        durable: &str,
        subscription: Subscription,
    ) -> Self {
        ConsumerSource {
            js,
            config,
            durable: durable.to_owned(),
            subscription,
            updated: Arc::default(),
        }
    }

    /// The durable consumer. With `provision_jetstream` it first makes sure
    /// the stream and the consumer exist with this service's filter; without
    /// (a service user may not create either) it finds them as the setup
    /// step made them, and says so if they are missing or filter otherwise.
    pub async fn get(&self) -> anyhow::Result<jetstream::consumer::PullConsumer> {
        if !self.config.provision_jetstream {
            return self.find().await;
        }
        let stream = ensure_stream(&self.js, &self.config, &self.durable).await?;
        if self.updated.load(Ordering::SeqCst)
            && let Ok(consumer) = stream.get_consumer(&self.durable).await
        {
            return Ok(consumer);
        }
        let consumer =
            ensure_consumer(&stream, &self.durable, &self.subscription, &self.config).await?;
        self.updated.store(true, Ordering::SeqCst);
        Ok(consumer)
    }
}

impl ConsumerSource {
    async fn find(&self) -> anyhow::Result<jetstream::consumer::PullConsumer> {
        let setup = "run the setup step with NATS admin rights (`sagactl provision`), \
                     or start the service with PROVISION_JETSTREAM=true and an admin login";
        let stream = self.js.get_stream(&self.config.stream).await.map_err(|e| {
            anyhow::anyhow!("looking up stream {}: {e}; {setup}", self.config.stream)
        })?;
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&self.durable)
            .await
            .map_err(|e| anyhow::anyhow!("looking up consumer {}: {e}; {setup}", self.durable))?;
        if !self.updated.swap(true, Ordering::SeqCst) {
            let wanted: BTreeSet<String> = self
                .subscription
                .subjects(&self.config.subject_prefix)
                .into_iter()
                .collect();
            let info = consumer.info().await?;
            let current: BTreeSet<String> = filter_of(&info.config)
                .into_iter()
                .map(str::to_owned)
                .collect();
            if wanted != current {
                tracing::warn!(
                    consumer = self.durable,
                    has = ?current,
                    wants = ?wanted,
                    "the consumer filters other subjects than this version consumes; {setup}"
                );
            }
        }
        Ok(consumer)
    }
}

/// The subjects a consumer filters, whichever of the two fields holds them.
fn filter_of(config: &jetstream::consumer::Config) -> BTreeSet<&str> {
    if config.filter_subjects.is_empty() {
        [config.filter_subject.as_str()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect()
    } else {
        config.filter_subjects.iter().map(String::as_str).collect()
    }
}

/// The setup step as a command runs it: connects as `config`'s login (the
/// admin by default), fails at once if it cannot, and provisions everything.
pub async fn setup(
    config: &Config,
    choreography: &crate::choreography::Choreography,
) -> anyhow::Result<Vec<String>> {
    let login = config.nats_login(crate::broker_access::ADMIN_USER)?;
    let client = crate::runtime::connect_once(&config.nats_url, "setup", login.as_ref()).await?;
    let js = jetstream::new(client.clone());
    let done = provision_all(&js, config, choreography).await?;
    client.flush().await?;
    Ok(done)
}

/// The setup step: the stream, and the durable consumer of every service
/// of `choreography` with its filter, created or brought up to date. Needs
/// a NATS login allowed to manage JetStream (deploy/nats.conf's admin).
pub async fn provision_all(
    js: &jetstream::Context,
    config: &Config,
    choreography: &crate::choreography::Choreography,
) -> anyhow::Result<Vec<String>> {
    let stream = ensure_stream(js, config, "setup").await?;
    let mut done = Vec::new();
    for service in choreography.services() {
        let subscription = choreography.subscription(service);
        if subscription.subjects(&config.subject_prefix).is_empty() {
            continue;
        }
        ensure_consumer(&stream, service, &subscription, config).await?;
        done.push(service.to_owned());
    }
    Ok(done)
}

/// Who provisioned a stream or consumer: the service and the platform version.
fn metadata(service: &str) -> HashMap<String, String> {
    HashMap::from([
        ("saga.service".to_owned(), service.to_owned()),
        (
            "saga.platform_version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ])
}

/// The stream every saga event goes to, created by `service` if missing.
/// It allows atomic batches (the relay sends its batches so, a few fsyncs
/// per batch instead of one per event); a stream made before it did is
/// brought up to date.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &Config,
    service: &str,
) -> anyhow::Result<stream::Stream> {
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: config.stream.clone(),
            subjects: vec![config.all_events_subject()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_age: config.stream_max_age(),
            duplicate_window: config.duplicate_window(),
            num_replicas: config.stream_replicas,
            allow_atomic_publish: true,
            metadata: metadata(service),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating stream {}: {e}", config.stream))?;
    let found = stream.cached_info().config.clone();
    if !found.allow_atomic_publish {
        js.update_stream(stream::Config {
            allow_atomic_publish: true,
            ..found
        })
        .await
        .map_err(|e| anyhow::anyhow!("allowing atomic batches on stream {}: {e}", config.stream))?;
        stream = js.get_stream(&config.stream).await?;
    }
    Ok(stream)
}

/// The priority group every instance of a service pulls its durable
/// consumer in. The consumer's policy is `prioritized` (nats-server 2.12+):
/// a message goes to the waiting pull with the lowest priority number, and
/// among equals in turn. The instance whose relay leads pulls at 0, the
/// others at 1 ([`crate::consumer::Consumer::preferred_while`]), so one
/// instance takes every event while it keeps up, in batches as large as a
/// lone instance's, and the others take what it leaves: the overflow when
/// it falls behind, everything the moment it is gone.
pub const PULL_GROUP: &str = "instances";

/// Whether `consumer` pulls in [`PULL_GROUP`] by priority (a consumer
/// provisioned before it did pulls without a group, every instance in turn).
pub fn pulls_by_priority(consumer: &jetstream::consumer::PullConsumer) -> bool {
    let config = &consumer.cached_info().config;
    config.priority_policy == PriorityPolicy::Prioritized
        && config
            .priority_groups
            .iter()
            .any(|group| group == PULL_GROUP)
}

/// The durable pull consumer named `durable`, filtering exactly the subjects
/// of `subscription`: created if missing, left as it is if its filter is
/// ours, updated in place when we consume fewer subjects, and recreated from
/// its ack floor when we consume more.
///
/// nats-server does not rewind a consumer whose filter grows: messages of
/// the new subjects that it already stepped over (published while the old
/// filter ran) would never come. So a widened consumer is updated and then
/// reset to its ack floor (consumer reset, nats-server 2.14+): the messages
/// after the floor that were already handled come again and the inbox
/// absorbs them. Events of the new subjects from before that floor are not
/// replayed: a backfill is an operator's decision.
pub async fn ensure_consumer(
    stream: &stream::Stream,
    durable: &str,
    subscription: &Subscription,
    config: &Config,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    let wanted = subscription.subjects(&config.subject_prefix);
    anyhow::ensure!(
        !wanted.is_empty(),
        "{durable} consumes no event: nothing to subscribe to"
    );
    let ours = |deliver_policy| pull::Config {
        durable_name: Some(durable.to_owned()),
        filter_subjects: wanted.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        deliver_policy,
        ack_wait: config.ack_wait(),
        max_ack_pending: config.max_ack_pending,
        max_deliver: -1,
        metadata: metadata(durable),
        priority_groups: vec![PULL_GROUP.to_owned()],
        priority_policy: PriorityPolicy::Prioritized,
        ..Default::default()
    };
    let create = |deliver_policy| async move {
        stream
            .create_consumer(ours(deliver_policy))
            .await
            .map_err(|e| anyhow::anyhow!("creating or updating consumer {durable}: {e}"))
    };
    let info = match stream.consumer_info(durable).await {
        Ok(info) => info,
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            return create(DeliverPolicy::All).await;
        }
        Err(e) => anyhow::bail!("looking up consumer {durable}: {e}"),
    };
    let current = filter_of(&info.config);
    let wanted_set: BTreeSet<&str> = wanted.iter().map(String::as_str).collect();
    if wanted_set.is_subset(&current) {
        // The same or fewer subjects: an update in place keeps the position.
        if wanted_set != current {
            tracing::info!(consumer = durable, from = ?current, to = ?wanted_set, "narrowing the consumer's filter");
        }
        return create(info.config.deliver_policy).await;
    }
    tracing::info!(
        consumer = durable,
        from = ?current,
        to = ?wanted_set,
        ack_floor = info.ack_floor.stream_sequence,
        "widening the consumer's filter: updating it and resetting it to its ack floor"
    );
    let consumer = create(info.config.deliver_policy).await?;
    stream
        .reset_consumer(durable, None)
        .await
        .map_err(|e| anyhow::anyhow!("resetting consumer {durable} to its ack floor: {e}"))?;
    Ok(consumer)
}

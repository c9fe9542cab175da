//! The streams and each service's durable consumers, created or brought up
//! to date at start (and again whenever the broker has lost them).
//!
//! Each producing service's events go to a stream of its own
//! (`SAGA_ORDER` holds exactly the subjects of the events the choreography
//! says the order service writes, and so on), and the platform's stuck
//! reports, which any service writes, to one more (`SAGA_STUCK`): see
//! [`streams`]. A stream stores and fsyncs its messages one after another,
//! so streams side by side keep one producer's burst from queueing behind
//! another's. A service has a durable consumer, named after it, on each
//! stream it reads ([`sources_of`]), and its consumer loop pulls from all of
//! them into the same lanes.
//!
//! A service's durable consumer filters exactly the subjects of its
//! subscription on that stream (`filter_subjects`, nats-server 2.10+), so the
//! broker delivers it only what it consumes. Provisioning is
//! create-or-update: a new version of a service that consumes more or fewer
//! events moves the existing consumer's filter, keeping its position, so
//! nothing published meanwhile is lost.
//!
//! Only a process's first provisioning updates the consumer. When the loop
//! comes back after a broker outage it reuses the consumer as it finds it
//! (creating it only if the broker lost it), so an old instance still running
//! during a rolling deploy cannot narrow the filter the new version set.
//!
//! Versions before per-producer streams kept every event in one stream
//! (`SAGA`, subjects `saga.>`), whose subjects overlap the new streams'.
//! Provisioning retires it once its consumers have handled everything in
//! it, and refuses, saying what is left, before that
//! ([`retire_one_stream_layout`]).
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::jetstream::consumer::{DeliverPolicy, PriorityPolicy, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, stream};

use crate::choreography::{Choreography, STUCK};
use crate::config::Config;

/// Where a service's consumer loop gets its durable consumer, at start and
/// again whenever the broker has lost it (a crashed nats-server can come back
/// without a consumer it had just created, or with an older ack floor).
#[derive(Clone)]
pub struct ConsumerSource {
    js: jetstream::Context,
    config: Config,
    durable: String,
    /// The stream the consumer reads.
    stream: StreamSpec,
    /// The subjects of that stream the consumer takes.
    filter: Vec<String>,
    /// Whether this process has brought the consumer up to date already.
    updated: Arc<AtomicBool>,
}

impl ConsumerSource {
    /// The JetStream context the consumer is pulled and acknowledged on.
    pub fn jetstream(&self) -> jetstream::Context {
        self.js.clone()
    }

    /// The durable consumer `durable` (the service's name) on `stream`,
    /// taking the subjects `filter` of it.
    pub fn new(
        js: jetstream::Context,
        config: Config,
        durable: &str,
        stream: StreamSpec,
        filter: Vec<String>,
    ) -> Self {
        ConsumerSource {
            js,
            config,
            durable: durable.to_owned(),
            stream,
            filter,
            updated: Arc::default(),
        }
    }

    /// Service `service`'s durable consumer on each stream it reads
    /// ([`sources_of`]), in the streams' order.
    pub fn all_of(
        js: &jetstream::Context,
        config: &Config,
        choreography: &Choreography,
        service: &str,
    ) -> Vec<ConsumerSource> {
        sources_of(
            choreography,
            service,
            &config.stream,
            &config.subject_prefix,
        )
        .into_iter()
        .map(|(stream, filter)| {
            ConsumerSource::new(js.clone(), config.clone(), service, stream, filter)
        })
        .collect()
    }

    /// The stream this consumer reads.
    pub fn stream(&self) -> &StreamSpec {
        &self.stream
    }

    /// The durable consumer. With `provision_jetstream` it first makes sure
    /// the stream and the consumer exist with this service's filter; without
    /// (a service user may not create either) it finds them as the setup
    /// step made them, and says so if they are missing or filter otherwise.
    pub async fn get(&self) -> anyhow::Result<jetstream::consumer::PullConsumer> {
        if !self.config.provision_jetstream {
            return self.find().await;
        }
        let stream = ensure_stream(&self.js, &self.config, &self.stream, &self.durable).await?;
        if self.updated.load(Ordering::SeqCst)
            && let Ok(consumer) = stream.get_consumer(&self.durable).await
        {
            return Ok(consumer);
        }
        let consumer = ensure_consumer(&stream, &self.durable, &self.filter, &self.config).await?;
        self.updated.store(true, Ordering::SeqCst);
        Ok(consumer)
    }
}

impl ConsumerSource {
    async fn find(&self) -> anyhow::Result<jetstream::consumer::PullConsumer> {
        let setup = "run the setup step with NATS admin rights (`sagactl provision`), \
                     or start the service with PROVISION_JETSTREAM=true and an admin login";
        let name = &self.stream.name;
        let stream = self
            .js
            .get_stream(name)
            .await
            .map_err(|e| anyhow::anyhow!("looking up stream {name}: {e}; {setup}"))?;
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(&self.durable).await.map_err(|e| {
                anyhow::anyhow!(
                    "looking up consumer {} on {name}: {e}; {setup}",
                    self.durable
                )
            })?;
        if !self.updated.swap(true, Ordering::SeqCst) {
            let wanted: BTreeSet<String> = self.filter.iter().cloned().collect();
            let info = consumer.info().await?;
            let current: BTreeSet<String> = filter_of(&info.config)
                .into_iter()
                .map(str::to_owned)
                .collect();
            if wanted != current {
                tracing::warn!(
                    consumer = self.durable,
                    stream = %name,
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
pub async fn setup(config: &Config, choreography: &Choreography) -> anyhow::Result<Vec<String>> {
    let login = config.nats_login(crate::broker_access::ADMIN_USER)?;
    let client = crate::runtime::connect_once(&config.nats_url, "setup", login.as_ref()).await?;
    let js = jetstream::new(client.clone());
    let done = provision_all(&js, config, choreography).await?;
    client.flush().await?;
    Ok(done)
}

/// The setup step: every stream of `choreography`, and each service's
/// durable consumer on each stream it reads, with its filter, created or
/// brought up to date (the one-stream layout of earlier versions retired
/// first). Says what it provisioned: a line per service. Needs a NATS login
/// allowed to manage JetStream (deploy/nats.conf's admin).
pub async fn provision_all(
    js: &jetstream::Context,
    config: &Config,
    choreography: &Choreography,
) -> anyhow::Result<Vec<String>> {
    let streams = ensure_streams(js, config, choreography, "setup").await?;
    let mut done = Vec::new();
    for service in choreography.services() {
        let sources = sources_of(
            choreography,
            service,
            &config.stream,
            &config.subject_prefix,
        );
        if sources.is_empty() {
            continue;
        }
        let mut read = Vec::new();
        for (spec, filter) in sources {
            let stream = streams
                .iter()
                .find(|s| s.cached_info().config.name == spec.name)
                .ok_or_else(|| anyhow::anyhow!("stream {} was not provisioned", spec.name))?;
            ensure_consumer(stream, service, &filter, config).await?;
            read.push(spec.name);
        }
        done.push(format!("{service} (reads {})", read.join(", ")));
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

/// One JetStream stream: its name and the subjects it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
}

impl StreamSpec {
    /// One stream named `config.stream` holding every subject under the
    /// prefix: the layout of versions before per-producer streams, and a
    /// test's that needs no more than one.
    pub fn everything(config: &Config) -> Self {
        StreamSpec {
            name: config.stream.clone(),
            subjects: vec![config.all_events_subject()],
        }
    }

    /// Whether a message published to `subject` goes to this stream.
    pub fn holds(&self, subject: &str) -> bool {
        self.subjects.iter().any(|s| subject_matches(s, subject))
    }
}

/// Whether NATS subject filter `filter` (`*` one token, `>` the rest)
/// matches `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let (mut filter, mut subject) = (filter.split('.'), subject.split('.'));
    loop {
        match (filter.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(f), Some(s)) if f == "*" || f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What the stream of the platform's stuck reports is named after, in
/// place of a producer: `<stream>_STUCK`.
pub const STUCK_STREAM: &str = "stuck";

/// The name of the stream holding the events of `producer` (a service, or
/// [`STUCK_STREAM`]): `<stream>_<PRODUCER>`, e.g. `SAGA_ORDER`.
pub fn stream_name(stream: &str, producer: &str) -> String {
    format!("{stream}_{}", producer.to_ascii_uppercase())
}

/// The streams of `choreography`, named from `stream` and holding subjects
/// under `prefix`: one per producing service, holding exactly the subjects
/// of the events it is declared to write (in declaration order of the
/// producers), and one holding the platform's stuck reports, which every
/// service writes. A publish to any other subject finds no stream.
pub fn streams(choreography: &Choreography, stream: &str, prefix: &str) -> Vec<StreamSpec> {
    let mut specs: Vec<StreamSpec> = Vec::new();
    for event in choreography.events {
        let name = stream_name(stream, event.producer);
        let subject = format!("{prefix}.{}", event.name);
        match specs.iter_mut().find(|s| s.name == name) {
            Some(spec) => spec.subjects.push(subject),
            None => specs.push(StreamSpec {
                name,
                subjects: vec![subject],
            }),
        }
    }
    specs.push(StreamSpec {
        name: stream_name(stream, STUCK_STREAM),
        subjects: vec![format!("{prefix}.{STUCK}")],
    });
    specs
}

/// The streams `service` reads, each with the subjects of it that the
/// service consumes: its durable consumer's filter there.
pub fn sources_of(
    choreography: &Choreography,
    service: &str,
    stream: &str,
    prefix: &str,
) -> Vec<(StreamSpec, Vec<String>)> {
    let consumed = choreography.subscription(service).subjects(prefix);
    streams(choreography, stream, prefix)
        .into_iter()
        .filter_map(|spec| {
            let filter: Vec<String> = consumed
                .iter()
                .filter(|subject| spec.holds(subject))
                .cloned()
                .collect();
            (!filter.is_empty()).then_some((spec, filter))
        })
        .collect()
}

/// Every stream of `choreography`, created by `service` if missing or
/// brought up to date, after retiring the one-stream layout of earlier
/// versions ([`retire_one_stream_layout`]).
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &Config,
    choreography: &Choreography,
    service: &str,
) -> anyhow::Result<Vec<stream::Stream>> {
    retire_one_stream_layout(js, config).await?;
    let mut made = Vec::new();
    for spec in streams(choreography, &config.stream, &config.subject_prefix) {
        made.push(ensure_stream(js, config, &spec, service).await?);
    }
    Ok(made)
}

/// Deletes the stream of earlier versions, `config.stream` holding every
/// subject under the prefix, once every consumer on it has handled all it
/// holds: its subjects overlap the per-producer streams', which cannot exist
/// beside it. It is sealed first (it takes no more events) and counted
/// again. While a consumer still has events in it to handle, refuses and
/// says which and how many: run the old version until they are handled and
/// stop it, then provision again. Nothing to do without that stream.
pub async fn retire_one_stream_layout(
    js: &jetstream::Context,
    config: &Config,
) -> anyhow::Result<()> {
    let old = StreamSpec::everything(config);
    let mut stream = match js.get_stream(&old.name).await {
        Ok(stream) => stream,
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(error)
                if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                return Ok(());
            }
            _ => anyhow::bail!("looking up stream {}: {e}", old.name),
        },
    };
    let info = stream.info().await?.clone();
    if info.config.subjects != old.subjects {
        return Ok(());
    }
    let refuse = |unhandled: Vec<String>| {
        anyhow::anyhow!(
            "stream {} holds every saga event, as versions before per-producer streams did, \
             and its consumers have not handled all of them yet ({}); run the old version until \
             they are handled and stop it, then provision again",
            old.name,
            unhandled.join(", ")
        )
    };
    let unhandled = unhandled_in(&stream).await?;
    if !unhandled.is_empty() {
        return Err(refuse(unhandled));
    }
    // Sealed, it takes no more events: one an old relay published after
    // the count above would be lost with the stream. (A publish it refuses
    // stays in its outbox, and goes to the new streams once they exist.)
    // Counted again once sealed, it is safe to delete.
    if !info.config.sealed {
        js.update_stream(stream::Config {
            sealed: true,
            ..info.config.clone()
        })
        .await
        .map_err(|e| anyhow::anyhow!("sealing stream {}: {e}", old.name))?;
    }
    let unhandled = unhandled_in(&stream).await?;
    if !unhandled.is_empty() {
        return Err(refuse(unhandled));
    }
    js.delete_stream(&old.name)
        .await
        .map_err(|e| anyhow::anyhow!("deleting stream {}: {e}", old.name))?;
    tracing::info!(
        stream = %old.name,
        messages = info.state.messages,
        "retired the one-stream layout of earlier versions: every event in it was handled"
    );
    Ok(())
}

/// Each consumer of `stream` with events in it not yet handled (pending or
/// awaiting its ack), as `name: count`.
async fn unhandled_in(stream: &stream::Stream) -> anyhow::Result<Vec<String>> {
    let mut unhandled = Vec::new();
    let mut consumers = stream.consumers();
    while let Some(consumer) = futures::StreamExt::next(&mut consumers).await {
        let consumer = consumer.map_err(|e| anyhow::anyhow!("listing consumers: {e}"))?;
        let left = consumer.num_pending + consumer.num_ack_pending as u64;
        if left > 0 {
            unhandled.push(format!("{}: {left}", consumer.name));
        }
    }
    Ok(unhandled)
}

/// Stream `spec`, created by `service` if missing. It allows atomic batches
/// (the relay sends its batches so, a few fsyncs per batch instead of one
/// per event); a stream made before it did, or holding other subjects (the
/// choreography gained or lost an event), is brought up to date.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &Config,
    spec: &StreamSpec,
    service: &str,
) -> anyhow::Result<stream::Stream> {
    let name = &spec.name;
    let stream = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: spec.subjects.clone(),
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
        .map_err(|e| anyhow::anyhow!("creating stream {name}: {e}"))?;
    let found = stream.cached_info().config.clone();
    let same_subjects = found.subjects.iter().collect::<BTreeSet<_>>()
        == spec.subjects.iter().collect::<BTreeSet<_>>();
    if found.allow_atomic_publish && same_subjects {
        return Ok(stream);
    }
    tracing::info!(stream = %name, from = ?found.subjects, to = ?spec.subjects, "bringing the stream up to date");
    js.update_stream(stream::Config {
        allow_atomic_publish: true,
        subjects: spec.subjects.clone(),
        ..found
    })
    .await
    .map_err(|e| anyhow::anyhow!("updating stream {name}: {e}"))?;
    Ok(js.get_stream(name).await?)
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
/// `filter`: created if missing, left as it is if its filter is
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
    filter: &[String],
    config: &Config,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    anyhow::ensure!(
        !filter.is_empty(),
        "{durable} consumes no event: nothing to subscribe to"
    );
    let ours = |deliver_policy| pull::Config {
        durable_name: Some(durable.to_owned()),
        filter_subjects: filter.to_vec(),
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
    let wanted_set: BTreeSet<&str> = filter.iter().map(String::as_str).collect();
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

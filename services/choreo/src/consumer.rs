//! The pull loop: a durable pull consumer, events spread over lanes, the inbox
//! step for each, retries, and stuck reports.
//!
//! Messages are spread over a fixed number of lanes by saga id, so one saga's
//! events are handled one at a time in delivery order while different sagas
//! run side by side. For each message:
//! 1. decode the envelope; a message that is not one is parked (dead letter);
//! 2. an event whose subject, type and producer disagree with the declared
//!    choreography is parked as forged or misrouted; one of a type outside the
//!    service's [`Subscription`] is acknowledged unread: no transaction, never
//!    parked;
//! 3. decode the payload once into the handler's typed event; an unknown
//!    version or unreadable payload is parked with the reason;
//! 4. run the [`crate::inbox`] step (dedup, effects, commit) and ack only after
//!    the commit. Any other error is retried in the lane with backoff (on
//!    the event's first delivery only), then nak'ed with a delay for
//!    redelivery.
//!
//! A lane that is busy gathers what queues behind it: the next time it takes
//! all of it (up to the batch size), and step 4 runs for those events in one
//! transaction, one commit and then the acks of all. If any of them fails,
//! nothing of the batch is committed and each is applied on its own, so one
//! bad event costs the others a second try, never their effects. An idle
//! lane takes one event at a time: batches cost no latency.
//!
//! A service reads each producer's events from that producer's stream, with
//! a durable consumer there ([`crate::provision::sources_of`]); a pull loop
//! per consumer hands every message to the same lanes, so the lanes, the
//! inbox and the barrier see one flow whatever stream an event came from.
//!
//! Every instance of a service pulls from the same durable consumers. Where
//! the consumer pulls by priority ([`crate::provision::PULL_GROUP`]), the
//! instance whose relay leads pulls first and the others behind it: one
//! instance takes every event while it keeps up, so batches stay as large as
//! a lone instance's; the others take what it leaves when it falls behind,
//! and everything the moment it is gone (its pull goes with its connection).
//! When leadership moves, an instance sends its next pull requests at its
//! new place and reads what the broker sends its old ones until they are
//! over, at most [`crate::pull::EXPIRES`] later ([`crate::pull`]): no message
//! is left to come again after the ack wait. An instance that shuts down
//! hands back what it was sent and has not applied (nak): the others take it
//! at once ([`crate::pull::Pulls::hand_back`]).
//!
//! A lane can be told to linger ([`Consumer::lingering`], off as shipped):
//! while its events have lately arrived less than twice the linger apart
//! (on average), it waits until the linger has passed since an event arrived
//! for others to share that event's transaction. An event on a quiet lane
//! never waits.
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::choreography::Subscription;
use crate::db::HeldConnection;
use crate::envelope::{Envelope, Reject};
use crate::handler::{Decode, HandleError, Handler};
use crate::inbox::{Outcome, apply_alone_or_in_tx};
use crate::outbox::Outbox;
use crate::provision::ConsumerSource;
use crate::pull::{Pulled, Pulls};

/// Counters a test or metrics endpoint can read.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    pub parked: AtomicU64,
    /// Delivered but outside the subscription: acknowledged unread.
    pub ignored: AtomicU64,
    pub retries: AtomicU64,
    pub redeliveries: AtomicU64,
    /// Transactions that committed several events at once.
    pub batches: AtomicU64,
    /// Batches that failed and were applied one event at a time instead.
    pub batch_fallbacks: AtomicU64,
    /// Times a pull loop gave its pulls up to look its durable consumer up
    /// again: the broker could not be reached for a while, or the consumer
    /// was lost.
    pub pulls_given_up: AtomicU64,
    /// Times a pull loop asked its NATS client to move to another node:
    /// it had given its pulls up twice in a row, each time after 3 s of
    /// pull requests that reached nobody ([`crate::runtime::move_to_another_node`]).
    pub node_moves: AtomicU64,
    /// The priority the open pull asks for (0 first): `None` before the
    /// first pull, or for a consumer without a priority group.
    pub pulling_at: std::sync::Mutex<Option<usize>>,
}

const IN_LANE_ATTEMPTS: u32 = 5;
/// How long a starting instance waits to learn whether its relay leads
/// before it pulls (behind the others) anyway.
const LEADERSHIP_WAIT: Duration = Duration::from_secs(2);
/// How long a pull loop that lost the broker waits for a lookup of its
/// durable consumer before it pulls again from the one it found before. On
/// a cluster whose nodes come and go, a lookup sent to a node as it dies
/// waits out the client's whole request timeout (10 s), and
/// the next one may meet the next death: a service once pulled nothing
/// from one stream for 45 s, while pulling from it worked for much of that.
const LOOKUP_WAIT: Duration = Duration::from_secs(2);

pub struct Consumer<H: Handler> {
    pool: PgPool,
    handler: Arc<H>,
    subscription: Subscription,
    lanes: usize,
    /// Events applied in one transaction at most.
    batch: usize,
    /// How long a busy lane waits after an event arrived for more to join it.
    linger: Duration,
    stats: Arc<ConsumerStats>,
    stuck: Option<(Outbox, u64)>,
    /// Whether this instance leads (its relay's [`crate::relay::Relay::leadership`]).
    preferred: Option<tokio::sync::watch::Receiver<Option<bool>>>,
}

/// Resolves when `preferred` changes; never without one, or once its relay is gone.
async fn changed(preferred: Option<&mut tokio::sync::watch::Receiver<Option<bool>>>) {
    if let Some(preferred) = preferred
        && preferred.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Hands `message` to its saga's lane; false once the lanes are gone.
async fn route(senders: &[mpsc::Sender<Arrived>], message: jetstream::Message) -> bool {
    let decoded = Envelope::from_bytes(&message.payload);
    let key = match &decoded {
        Ok(env) => env.saga_id.as_str(),
        Err(_) => message.subject.as_str(),
    };
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    let lane = (hasher.finish() % senders.len() as u64) as usize;
    let arrived = Arrived {
        message,
        decoded,
        at: Instant::now(),
    };
    senders[lane].send(arrived).await.is_ok()
}

impl<H: Handler> Consumer<H> {
    /// A consumer that hands `handler` the events of `subscription`.
    pub fn new(pool: PgPool, handler: Arc<H>, subscription: Subscription, lanes: usize) -> Self {
        Consumer {
            pool,
            handler,
            subscription,
            lanes: lanes.max(1),
            batch: 1,
            linger: Duration::ZERO,
            stats: Arc::default(),
            stuck: None,
            preferred: None,
        }
    }

    /// Once an event has been delivered `after` times and still fails, write a
    /// `choreo.stuck` event for its saga through `outbox` (once per event).
    pub fn report_stuck(mut self, outbox: Outbox, after: u64) -> Self {
        self.stuck = Some((outbox, after.max(1)));
        self
    }

    /// When events queue up in a lane, apply up to `events` of them in one
    /// transaction (if the handler [`Handler::batches`]), in `lanes` lanes
    /// instead of the one-at-a-time count; `events` 1: one at a time.
    ///
    /// Few lanes batch best: events arriving while a lane's transaction
    /// runs queue behind it and share its next commit, so under load the
    /// commits per event fall, and an idle lane still takes each event at once.
    pub fn batching(mut self, events: usize, lanes: usize) -> Self {
        self.batch = events.max(1);
        if self.batch > 1 && self.handler.batches() {
            self.lanes = lanes.max(1);
        }
        self
    }

    /// When a batching lane's events have lately arrived less than twice
    /// `linger` apart on average, it waits until `linger` after an event
    /// arrived for more to share its transaction (or until the batch is
    /// full). An event saves a transaction whenever another joins it; it
    /// waits at most `linger`, and only while events keep coming. Zero: a
    /// lane takes what has queued and never waits.
    pub fn lingering(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Pull ahead of the service's other instances while `leading` says
    /// this one leads, behind them otherwise (when the durable consumer
    /// pulls by priority: [`crate::provision::PULL_GROUP`]). Without it, an
    /// instance pulls at the front, level with any other.
    pub fn preferred_while(mut self, leading: tokio::sync::watch::Receiver<Option<bool>>) -> Self {
        self.preferred = Some(leading);
        self
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Pulls from every one of `sources` (a service's durable consumers, one
    /// per stream it reads) into the same lanes and handles the messages
    /// until `shutdown`; then finishes the message each lane is on and hands
    /// the rest back to JetStream (nak).
    pub async fn run(self, sources: Vec<ConsumerSource>, shutdown: CancellationToken) {
        let lanes = TaskTracker::new();
        let mut senders = Vec::with_capacity(self.lanes);
        let this = Arc::new(self);
        for _ in 0..this.lanes {
            let (tx, rx) = mpsc::channel::<Arrived>(32);
            senders.push(tx);
            lanes.spawn(this.clone().lane(rx, shutdown.clone()));
        }
        let pulls = TaskTracker::new();
        for source in sources {
            pulls.spawn(
                this.clone()
                    .pull_loop(source, senders.clone(), shutdown.clone()),
            );
        }
        drop(senders);
        pulls.close();
        pulls.wait().await;
        lanes.close();
        lanes.wait().await;
    }

    /// Pulls from `source` and hands each message to its lane until
    /// `shutdown` (or the lanes are gone).
    async fn pull_loop(
        self: Arc<Self>,
        source: ConsumerSource,
        senders: Vec<mpsc::Sender<Arrived>>,
        shutdown: CancellationToken,
    ) {
        let stream = source.stream().name.clone();
        let mut preferred = self.preferred.clone();
        // The consumer this loop last found, and whether it left its pull
        // because the broker could not be reached (rather than because the
        // consumer was lost): then a lookup that fails is no reason to stop
        // pulling from the consumer found before.
        let mut found: Option<jetstream::consumer::PullConsumer> = None;
        let mut unreachable = false;
        // Times in a row this loop gave its pulls up to requests that
        // reached nobody, with no message in between.
        let mut unanswered = 0u32;
        'pull: while !shutdown.is_cancelled() {
            let fallback = found.clone().filter(|_| unreachable);
            let looked_up = match fallback {
                Some(_) => tokio::time::timeout(LOOKUP_WAIT, source.get())
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {LOOKUP_WAIT:?}"))),
                None => source.get().await,
            };
            let consumer = match (looked_up, fallback) {
                (Ok(consumer), _) => {
                    found = Some(consumer.clone());
                    consumer
                }
                (Err(e), Some(before)) => {
                    tracing::warn!(%stream, error = %e, "cannot look the durable consumer up; pulling from the one found before");
                    before
                }
                (Err(e), _) => {
                    tracing::warn!(%stream, error = %e, "cannot reach the durable consumer yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            unreachable = false;
            let by_priority = crate::provision::pulls_by_priority(&consumer);
            let priority = self.pull_priority(by_priority, preferred.as_mut()).await;
            let mut pulls = match Pulls::open(consumer, source.jetstream(), priority).await {
                Ok(pulls) => {
                    tracing::info!(
                        %stream,
                        ?priority,
                        "pulling events (priority 0 first; none: all instances in turn)"
                    );
                    self.pulling_at(priority);
                    pulls
                }
                Err(e) => {
                    tracing::warn!(%stream, error = %e, "cannot pull messages yet; retrying");
                    unreachable = true;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            let mut failures = 0u32;
            loop {
                let next = tokio::select! {
                    next = pulls.next() => next,
                    // This instance began or stopped leading: ask at its new
                    // place from now on.
                    () = changed(preferred.as_mut()), if by_priority => {
                        let from = pulls.priority();
                        let to = self.pull_priority(by_priority, preferred.as_mut()).await;
                        if to != from {
                            if pulls.move_to(to).await.is_err() {
                                unreachable = true;
                                self.stats.pulls_given_up.fetch_add(1, Ordering::Relaxed);
                                continue 'pull;
                            }
                            tracing::info!(%stream, ?from, ?to, "pulling at a new priority");
                        }
                        continue;
                    }
                    _ = shutdown.cancelled() => {
                        pulls.hand_back().await;
                        break 'pull;
                    }
                };
                match next {
                    Pulled::Message(message) => {
                        failures = 0;
                        unanswered = 0;
                        if !route(&senders, *message).await {
                            break 'pull;
                        }
                    }
                    Pulled::Settled(priority) => self.pulling_at(priority),
                    Pulled::Hiccup(e) => {
                        // Usually the broker is away and pulling recovers by
                        // itself; a long run of errors may mean the consumer
                        // is gone, so make sure it exists again.
                        failures += 1;
                        tracing::debug!(%stream, error = %e, failures, "pull hiccup (broker away?)");
                        if failures >= 30 {
                            unreachable = true;
                            self.stats.pulls_given_up.fetch_add(1, Ordering::Relaxed);
                            // Twice in a row: the node may be cut off from
                            // its cluster, where another would answer.
                            unanswered += 1;
                            if unanswered >= 2
                                && crate::runtime::move_to_another_node(
                                    &source.jetstream().client(),
                                    "pull",
                                )
                                .await
                            {
                                self.stats.node_moves.fetch_add(1, Ordering::Relaxed);
                                unanswered = 0;
                            }
                            continue 'pull;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Pulled::Lost(e) => {
                        tracing::warn!(%stream, error = %e, "pulling again");
                        self.stats.pulls_given_up.fetch_add(1, Ordering::Relaxed);
                        continue 'pull;
                    }
                }
            }
        }
    }

    /// The priority this instance pulls at: `None` when the consumer pulls
    /// without a group (provisioned before priorities, or a test's own),
    /// 0 while this instance's relay leads or when nothing says who leads,
    /// 1 otherwise. At start it waits a moment for the relay's first try
    /// for the lock, so an instance starts in its place.
    async fn pull_priority(
        &self,
        by_priority: bool,
        preferred: Option<&mut tokio::sync::watch::Receiver<Option<bool>>>,
    ) -> Option<usize> {
        if !by_priority {
            return None;
        }
        let Some(preferred) = preferred else {
            return Some(0);
        };
        let _ = tokio::time::timeout(LEADERSHIP_WAIT, preferred.wait_for(Option::is_some)).await;
        let leads = *preferred.borrow_and_update() == Some(true);
        Some(if leads { 0 } else { 1 })
    }

    /// Records the priority the open pull asks for (also as the gauge
    /// `saga_consumer_pull_priority`, absent without a priority group).
    fn pulling_at(&self, priority: Option<usize>) {
        *self.stats.pulling_at.lock().unwrap() = priority;
        if let Some(priority) = priority {
            metrics::gauge!("saga_consumer_pull_priority").set(priority as f64);
        }
    }

    async fn lane(self: Arc<Self>, mut rx: mpsc::Receiver<Arrived>, shutdown: CancellationToken) {
        // Every event is a transaction: the lane keeps one connection for them all.
        let mut db = HeldConnection::like(&self.pool);
        let linger = if self.batch > 1 && self.handler.batches() {
            self.linger
        } else {
            Duration::ZERO
        };
        let mut pace = Pace::default();
        while let Some(first) = rx.recv().await {
            pace.arrived(first.at);
            // What queued in the lane while it was busy goes in one batch.
            let mut batch = vec![first];
            while batch.len() < self.batch {
                match rx.try_recv() {
                    Ok(next) => {
                        pace.arrived(next.at);
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            // On a busy lane, what arrives within the linger joins it too.
            if !linger.is_zero() && pace.closer_than(linger * 2) {
                let until = batch[0].at + linger;
                while batch.len() < self.batch {
                    let next = tokio::select! {
                        next = tokio::time::timeout_at(until, rx.recv()) => next,
                        _ = shutdown.cancelled() => break,
                    };
                    match next {
                        Ok(Some(next)) => {
                            pace.arrived(next.at);
                            batch.push(next);
                        }
                        _ => break,
                    }
                }
            }
            if shutdown.is_cancelled() {
                for arrived in batch {
                    let _ = arrived.message.ack_with(AckKind::Nak(None)).await;
                }
                continue;
            }
            let mut ready = Vec::with_capacity(batch.len());
            for Arrived {
                message, decoded, ..
            } in batch
            {
                if let Some(event) = self.check(message, decoded).await {
                    ready.push(event);
                }
            }
            if ready.len() > 1 && self.handler.batches() {
                self.apply_together(&mut db, ready, &shutdown).await;
            } else {
                for event in ready {
                    self.apply_alone(&mut db, event, &shutdown).await;
                }
            }
        }
        db.close().await;
    }

    /// Steps 1 to 3: an event ready for the inbox step, or `None` when the
    /// message was parked or acknowledged unread.
    async fn check(
        &self,
        message: jetstream::Message,
        decoded: Result<Envelope, Reject>,
    ) -> Option<Ready<H::Event>> {
        let (stream, stream_seq, delivered) = match message.info() {
            Ok(info) => (info.stream.to_owned(), info.stream_sequence, info.delivered),
            Err(_) => (String::new(), 0, 1),
        };
        if delivered > 1 {
            self.stats.redeliveries.fetch_add(1, Ordering::Relaxed);
        }
        let envelope = match decoded.and_then(|e| {
            self.subscription
                .check_origin(&message.subject, &e)
                .map(|()| e)
        }) {
            Ok(envelope) => envelope,
            Err(reject) => {
                self.park(&message, &stream, stream_seq, &reject).await;
                return None;
            }
        };
        if !self.subscription.consumes(&envelope.event_type) {
            self.stats.ignored.fetch_add(1, Ordering::Relaxed);
            // The type is the sender's choice, not ours: one label for all of them.
            metrics::counter!("saga_events_handled_total", "event_type" => "other", "outcome" => "ignored")
                .increment(1);
            ack(&message).await;
            return None;
        }
        let typed = match H::Event::decode(&envelope) {
            Ok(typed) => typed,
            Err(reject) => {
                handled(&envelope, "parked");
                self.park(&message, &stream, stream_seq, &reject).await;
                return None;
            }
        };
        let span = tracing::info_span!(
            "event",
            otel.name = %format!("handle {}", envelope.event_type),
            order_id = %envelope.saga_id,
            event_id = %envelope.event_id,
            event_type = %envelope.event_type,
            delivered
        );
        crate::telemetry::set_parent(&span, &envelope.traceparent);
        if delivered > 1 {
            metrics::counter!("saga_redeliveries_total").increment(1);
            span.in_scope(|| tracing::info!("redelivered"));
        }
        Some(Ready {
            message,
            envelope,
            typed,
            stream,
            stream_seq,
            delivered,
            span,
        })
    }

    /// Step 4 for several events in one transaction; if any of them fails,
    /// none is committed and each is applied on its own instead.
    async fn apply_together(
        &self,
        db: &mut HeldConnection,
        events: Vec<Ready<H::Event>>,
        shutdown: &CancellationToken,
    ) {
        let batch = events
            .iter()
            .map(|e| crate::inbox::Batched {
                envelope: &e.envelope,
                event: e.typed.clone(),
                span: e.span.clone(),
            })
            .collect();
        let applied = db
            .run(async |conn| {
                crate::inbox::apply_batch(
                    conn,
                    self.handler.as_ref(),
                    &self.subscription.claims,
                    batch,
                )
                .await
            })
            .await;
        match applied {
            Ok(outcomes) => {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                metrics::histogram!("saga_consumer_batch_events").record(events.len() as f64);
                for (event, outcome) in events.iter().zip(outcomes) {
                    let _entered = event.span.enter();
                    self.count(&event.envelope, &outcome);
                    ack(&event.message).await;
                }
            }
            Err(e) => {
                self.stats.batch_fallbacks.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("saga_consumer_batch_fallbacks_total").increment(1);
                tracing::debug!(error = %e, events = events.len(), "a batch failed; applying its events one at a time");
                for event in events {
                    self.apply_alone(db, event, shutdown).await;
                }
            }
        }
    }

    /// Step 4 for one event, retried in the lane, then nak'ed.
    async fn apply_alone(
        &self,
        db: &mut HeldConnection,
        event: Ready<H::Event>,
        shutdown: &CancellationToken,
    ) {
        let Ready {
            message,
            envelope,
            typed,
            stream,
            stream_seq,
            delivered,
            span,
        } = event;
        async {
            // A redelivered event already had its tries in a lane (or its
            // service died under it): it gets one, and then JetStream's
            // delayed redelivery spaces the next ones, so an event that
            // keeps failing never holds its lane's other sagas for long.
            let attempts = if delivered > 1 { 1 } else { IN_LANE_ATTEMPTS };
            let mut backoff = Duration::from_millis(50);
            for attempt in 1..=attempts {
                let applied = db
                    .run(async |conn| {
                        apply_alone_or_in_tx(
                            conn,
                            self.handler.as_ref(),
                            &self.subscription.claims,
                            &envelope,
                            typed.clone(),
                        )
                        .await
                    })
                    .await;
                match applied {
                    Ok(Outcome::Parked(reject)) => {
                        handled(&envelope, "parked");
                        return self.park(&message, &stream, stream_seq, &reject).await;
                    }
                    Ok(outcome) => {
                        self.count(&envelope, &outcome);
                        ack(&message).await;
                        return;
                    }
                    Err(e) => {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        handled(&envelope, "retried");
                        tracing::warn!(error = %e, attempt, "handling failed; will retry");
                        if attempt == attempts || shutdown.is_cancelled() {
                            self.report_if_stuck(&envelope, delivered, &e).await;
                            break;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
        .instrument(span)
        .await
    }

    /// Counts a committed outcome (applied or duplicate).
    fn count(&self, envelope: &Envelope, outcome: &Outcome) {
        if *outcome == Outcome::Duplicate {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            handled(envelope, "duplicate");
            tracing::info!("duplicate delivery absorbed by the inbox");
        } else {
            self.stats.applied.fetch_add(1, Ordering::Relaxed);
            handled(envelope, "applied");
            tracing::debug!("handled");
        }
    }

    async fn report_if_stuck(&self, event: &Envelope, delivered: i64, error: &HandleError) {
        let Some((outbox, after)) = &self.stuck else {
            return;
        };
        if (delivered.max(0) as u64) < *after {
            return;
        }
        let report = async {
            let mut tx = self.pool.begin().await?;
            let first = sqlx::query(
                "INSERT INTO choreo_stuck (event_id) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(event.id())
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if first {
                let stuck = crate::proto::Stuck {
                    event_id: event.event_id.clone(),
                    event_type: event.event_type.clone(),
                    service: outbox.producer().to_owned(),
                    error: error.to_string(),
                    deliveries: delivered as u32,
                };
                outbox
                    .emit(&mut tx, &event.saga_id, Some(event), &stuck)
                    .await?;
            }
            tx.commit().await?;
            Ok::<bool, sqlx::Error>(first)
        };
        match report.await {
            Ok(true) => {
                metrics::counter!("saga_stuck_total").increment(1);
                tracing::error!(
                    delivered,
                    "event keeps failing; reported as stuck, still retrying"
                );
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot report the stuck event yet"),
        }
    }

    async fn park(
        &self,
        message: &jetstream::Message,
        stream: &str,
        stream_seq: u64,
        reject: &Reject,
    ) {
        let reason = reject.to_string();
        match crate::dead_letters::park(
            &self.pool,
            stream,
            stream_seq,
            &message.subject,
            &reason,
            &message.payload,
        )
        .await
        {
            Ok(()) => {
                self.stats.parked.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("saga_dead_letters_total").increment(1);
                tracing::warn!(subject = %message.subject, stream_seq, %reason, "message parked in the dead-letter table");
                ack(message).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot park message yet; it will come back");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
}

/// A message on its way to a lane, with when the puller received it.
struct Arrived {
    message: jetstream::Message,
    decoded: Result<Envelope, Reject>,
    at: Instant,
}

/// How far apart a lane's events have lately arrived: a moving average of
/// the gaps, each weighing a fifth. A gap longer than a second counts as one
/// second, so an idle spell makes the lane quiet without swamping the average.
#[derive(Debug)]
struct Pace {
    last: Option<Instant>,
    mean_gap_secs: f64,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            last: None,
            mean_gap_secs: 1.0,
        }
    }
}

impl Pace {
    fn arrived(&mut self, at: Instant) {
        if let Some(last) = self.last {
            let gap = at.saturating_duration_since(last).as_secs_f64().min(1.0);
            self.mean_gap_secs += (gap - self.mean_gap_secs) / 5.0;
        }
        self.last = Some(at);
    }

    fn closer_than(&self, gap: Duration) -> bool {
        self.mean_gap_secs < gap.as_secs_f64()
    }
}

/// An event that passed steps 1 to 3, on its way to the inbox step.
struct Ready<E> {
    message: jetstream::Message,
    envelope: Envelope,
    typed: E,
    stream: String,
    stream_seq: u64,
    delivered: i64,
    span: tracing::Span,
}

fn handled(envelope: &Envelope, outcome: &'static str) {
    metrics::counter!("saga_events_handled_total", "event_type" => envelope.event_type.clone(), "outcome" => outcome)
        .increment(1);
}

async fn ack(message: &jetstream::Message) {
    if let Err(e) = message.ack().await {
        // The effects are committed; a redelivery is absorbed by the inbox.
        tracing::warn!(error = %e, "ack failed; the inbox will absorb the redelivery");
    }
}

//! Publishes committed outbox rows to JetStream: right after their commit
//! (the [`Publisher`], used by the code that committed them: the rows of
//! the transactions that commit while its earlier sends are out go
//! together, as one atomic batch from [`ATOMIC_WHILE_AHEAD_FROM`] rows, or
//! from [`ATOMIC_WHILE_BEHIND_FROM`] while the broker is behind),
//! and as the sweeper of whatever is still unsent after a grace period
//! (the [`Relay`]).
//!
//! One relay per service database is active at a time: it holds a session
//! advisory lock on a dedicated connection and does all its reads and writes on
//! that connection, so losing the connection loses the lock and the relay steps
//! down. Rows are picked by `sent_at IS NULL` in `seq` order (never by "id above
//! the last one sent": ids commit out of order); while one batch is with the
//! broker the next is read (past its last seq), so a backlog drains with
//! PostgreSQL and the broker busy at once. Every `MAX_BATCHES_IN_A_RUN`
//! batches, and whenever one is not full, reading starts again from the first
//! unsent row, which picks up rows that committed late.
//!
//! The relay sends each batch as one JetStream atomic batch (nats-server
//! 2.12+, a stream with `allow_atomic`), which the broker stores with a few
//! fsyncs instead of one per row. Up to [`ATOMIC_BATCHES_IN_FLIGHT`] atomic
//! batches are with the broker at once (under load its PubAck for one takes
//! hundreds of milliseconds, most of it waiting behind other publishes), and
//! the acknowledged ones' rows are marked sent meanwhile. A batch goes while
//! earlier ones are out only if it holds no event of their sagas: were one
//! of those refused, its rows would go again after this batch's, and a
//! saga's events must not pass each other. A batch the broker refuses as a
//! whole (one of its rows is in the stream already, or the stream does not
//! allow atomic batches) goes again row by row, with several PubAcks in
//! flight, where the duplicate window drops the copies; atomic batches go
//! on after it.
//!
//! Only acknowledged rows are marked sent. A crash between PubAck and marking
//! republishes, and JetStream's duplicate window (`Nats-Msg-Id` = event id)
//! or, past it, the consumers' inbox drops the copy. A relay whose publish
//! rounds all fail for [`MOVE_AFTER_FAILING`] moves its client to another
//! node of the cluster (its own may be cut off from the others) and sends
//! the same rows again there.
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode, message::PublishMessage};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Session advisory lock key ("choreo" in ASCII); advisory locks are per database.
const LEADER_LOCK: i64 = 0x63686f72656f;
/// The longest wait between publish rounds that fail. Short: the usual cause
/// is a stream leader election (a few seconds on a cluster), and every second
/// waited past its end is a second every saga stalls.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How long a leading relay's publish rounds fail, one after another,
/// before it asks its client to move to another node
/// ([`crate::runtime::move_to_another_node`]): a node cut off from the rest
/// of its cluster keeps its clients, and every publish through it fails
/// until the cut heals, while the other nodes serve. Longer than a stream
/// leader's election (5.1-8.8 s from a leader's kill to the first event
/// applied, on the harness's 3-node cluster), so an election alone does not
/// move it: a move costs the process's pulls the deliveries they have in
/// flight, which come again after the ack wait.
pub const MOVE_AFTER_FAILING: Duration = Duration::from_secs(12);

/// Batches read one past the other before reading again from the first
/// unsent row (where a row that committed late with a lower seq waits).
const MAX_BATCHES_IN_A_RUN: u32 = 16;

/// Batches a relay has sent whose PubAcks may still be coming.
const BATCHES_IN_FLIGHT: usize = 4;

/// Atomic batches a relay has sent whose PubAcks may still be coming.
/// Measured on drains of 30,000-50,000 rows with the other services busy:
/// 1 out published 1713-2545 rows/s, 2 gave 2572-4910, 4 gave 4199-5799,
/// 8 gave 7922-10340, 16 gave 9526-11412.
const ATOMIC_BATCHES_IN_FLIGHT: usize = 8;

/// The most messages nats-server takes in one atomic batch.
const MAX_ATOMIC_BATCH: usize = 1000;

/// Counters a test or metrics endpoint can read.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Outbox rows this relay published and saw acknowledged.
    pub published: AtomicU64,
    /// Times the relay asked its NATS client to move to another node: its
    /// publishes had failed for [`MOVE_AFTER_FAILING`].
    pub node_moves: AtomicU64,
}

/// The result of one publish round.
#[derive(Debug, Default)]
pub struct Published {
    /// Unsent rows found.
    pub attempted: usize,
    /// The outbox seqs of the rows whose PubAck arrived.
    pub acked: Vec<i64>,
    /// The first publish error, if any row was not acknowledged.
    pub error: Option<String>,
    /// The broker's error code when it refused an atomic batch as a whole
    /// (not when no answer came): its rows are to go again one by one.
    pub batch_refused: Option<ErrorCode>,
}

#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    batch: i64,
    poll: Duration,
    /// Rows younger than this are left to the publisher of their own
    /// transaction; zero: the relay publishes every unsent row, woken by
    /// the outbox's NOTIFY.
    grace: Duration,
    /// Whether batches go as atomic batches; cleared for good when the
    /// stream says it does not allow them.
    atomic: Arc<AtomicBool>,
    stats: Arc<RelayStats>,
    /// Whether this relay holds the leader lock: `None` until its first
    /// try for it has answered. The consumer of the same instance pulls
    /// first while it leads ([`crate::consumer::Consumer::preferred_while`]).
    leading: Arc<tokio::sync::watch::Sender<Option<bool>>>,
}

/// Publishes the rows a transaction wrote right after it committed, and has
/// the acknowledged ones marked sent in batches (one UPDATE for many rows,
/// by [`mark_sent_in_batches`]). Every instance of a service has one.
///
/// The rows queue, in commit order, for one sending task of the
/// publisher's own, which keeps at most [`SENDS_IN_FLIGHT`] sends waiting
/// on their PubAcks. While those are out, the rows of the transactions that
/// commit meanwhile gather in the queue, and the next send takes them all:
/// the broker's group commit. On a quiet system nothing waits, and each
/// transaction's rows go the moment they are queued; at the peak, where
/// the stream's fsyncs are what the sagas wait on, many transactions' rows
/// go as one atomic batch, stored with a few fsyncs (four, measured on
/// nats-server 2.15) instead of one a row.
#[derive(Clone)]
pub struct Publisher {
    queue: tokio::sync::mpsc::Sender<Vec<crate::outbox::Row>>,
    marks: tokio::sync::mpsc::UnboundedSender<i64>,
    /// The `RETURNING` of the outbox INSERTs whose rows this publisher
    /// sends ([`crate::outbox::returning_to_publish`]).
    returning: std::sync::Arc<str>,
}

/// The fewest rows of one send that go as an atomic batch while the broker
/// is behind on this publisher's stream: the send's rows waited while every
/// one of its [`SENDS_IN_FLIGHT`] was out. There each
/// plain publish would queue for an fsync of its own, where an atomic batch
/// takes four for all its rows. Measured (`load`, alternating runs): atomic
/// batches of every size raised the closed loop's peak by 11-27% but cost
/// the open loop at 250 orders/s, where a send holds 1-3 rows, a third
/// more of nats-server's CPU and 35-40 ms of p99; so small ones go row by
/// row (`docs/bench/round-2026-12-04-n.md`).
pub const ATOMIC_WHILE_BEHIND_FROM: usize = 8;

/// The fewest rows of one send that go as an atomic batch while the broker
/// keeps up with this publisher (a send was free when its rows came). Alone,
/// nats-server stages an atomic batch in a store of its own (folders and
/// files made and deleted a batch): batches of 8 and 16 rows cost it more
/// CPU than the same rows one by one, from 32 rows less
/// (`docs/bench/round-2026-12-06-ak.md`). In the whole system, nine
/// alternating pairs against 8 whatever the broker's state: at 420
/// orders/s, about 45% of these runs' peaks, p50 51 ms against 88 and p99
/// 171 ms against 213 (medians; better p99 in six pairs of nine), each
/// hop's PubAck sooner in seven; at 336/s no better (the same median p99,
/// p50 51 ms against 35) (`docs/bench/round-2026-12-07-al.md`).
pub const ATOMIC_WHILE_AHEAD_FROM: usize = 32;

/// A publisher's sends whose PubAcks may still be coming. Its service's
/// stream stores what it is sent one publish or atomic batch at a time, an
/// fsync each, so more sends out at once would only queue inside the
/// broker; queued here instead, the rows of many transactions go as one
/// batch. (The broker's own ceiling is 50 atomic batches in flight per
/// stream.)
const SENDS_IN_FLIGHT: usize = 4;

/// Transactions whose rows may wait in a publisher's queue: past this many
/// (NATS away or stalled, every send waiting out its PubAck timeout) the
/// rows are left to the relay instead of piling up in memory.
const QUEUED_TRANSACTIONS: usize = 512;

impl Publisher {
    /// A publisher on `js` whose acknowledged rows' seqs go to `marks`. Its
    /// sending task runs until the last clone of it is dropped. An event
    /// written while an earlier one of its saga is unsent for longer than
    /// `sweep_after` (the relay's: `RELAY_SWEEP_AFTER_MS`) is left to the
    /// relay, behind that one.
    pub fn new(
        js: jetstream::Context,
        marks: tokio::sync::mpsc::UnboundedSender<i64>,
        sweep_after: Duration,
    ) -> Self {
        let (queue, queued) = tokio::sync::mpsc::channel(QUEUED_TRANSACTIONS);
        tokio::spawn(send_in_turn(js, queued, marks.clone()));
        Publisher {
            queue,
            marks,
            returning: crate::outbox::returning_to_publish(sweep_after).into(),
        }
    }

    /// The `RETURNING` of an outbox INSERT whose rows this publisher sends.
    pub(crate) fn returning(&self) -> &str {
        &self.returning
    }

    /// Whether both send to the same place (the same service's outbox).
    pub fn same_as(&self, other: &Publisher) -> bool {
        self.marks.same_channel(&other.marks)
    }

    /// Queues `rows`, committed, to be sent in order, and returns at once:
    /// the caller, a consumer lane, goes on to its next event without
    /// waiting on the broker. One queue and one sending task keep a
    /// service's events in their commit order into the stream. With the
    /// queue full, the rows stay unsent for the relay.
    pub fn publish(&self, rows: Vec<crate::outbox::Row>) {
        if let Err(full) = self.queue.try_send(rows) {
            tracing::debug!(
                rows = full.into_inner().len(),
                "too many rows waiting on NATS; the relay will send these"
            );
        }
    }
}

/// The publisher's sending task: takes whatever rows have queued (up to
/// [`MAX_ATOMIC_BATCH`]) whenever one of its [`SENDS_IN_FLIGHT`] is free,
/// sends them (from [`ATOMIC_WHILE_AHEAD_FROM`] rows as one atomic batch,
/// or from [`ATOMIC_WHILE_BEHIND_FROM`] when every send was out; fewer row
/// by row), and awaits their PubAcks in a task of its own, which
/// queues the acknowledged rows to be marked sent. A batch refused as a
/// whole (one of its rows already stored, when the relay swept it first) is
/// left to the relay, like any row that fails. On a stream without
/// `allow_atomic` it goes row by row for good.
async fn send_in_turn(
    js: jetstream::Context,
    mut queued: tokio::sync::mpsc::Receiver<Vec<crate::outbox::Row>>,
    marks: tokio::sync::mpsc::UnboundedSender<i64>,
) {
    let sends = Arc::new(tokio::sync::Semaphore::new(SENDS_IN_FLIGHT));
    let atomic = Arc::new(AtomicBool::new(true));
    let mut next: Option<Vec<crate::outbox::Row>> = None;
    loop {
        let (permit, waited) = match sends.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => (
                sends
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed"),
                true,
            ),
        };
        // The broker is behind on this stream (its fsyncs are the queue)
        // when rows waited for a send: every one was out.
        let behind = waited && (next.is_some() || !queued.is_empty());
        let mut rows = match next.take() {
            Some(rows) => rows,
            None => match queued.recv().await {
                Some(rows) => rows,
                None => return,
            },
        };
        while let Ok(more) = queued.try_recv() {
            if rows.len() + more.len() > MAX_ATOMIC_BATCH {
                next = Some(more);
                break;
            }
            rows.extend(more);
        }
        let from = if behind {
            ATOMIC_WHILE_BEHIND_FROM
        } else {
            ATOMIC_WHILE_AHEAD_FROM
        };
        let atomically =
            (from..=MAX_ATOMIC_BATCH).contains(&rows.len()) && atomic.load(Ordering::Relaxed);
        let sending = if atomically {
            send_atomically(&js, rows).await
        } else {
            send_rows(&js, rows).await
        };
        let (marks, atomic) = (marks.clone(), atomic.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let round = sending.acknowledged().await;
            if round.batch_refused == Some(ErrorCode::ATOMIC_PUBLISH_DISABLED) {
                tracing::warn!(
                    "the stream does not allow atomic batches (allow_atomic): rows go one by one after commit, an fsync each"
                );
                atomic.store(false, Ordering::Relaxed);
            }
            if let Some(error) = &round.error {
                tracing::debug!(%error, "publishing after commit failed; the relay will send it");
            }
            for seq in round.acked {
                let _ = marks.send(seq);
            }
        });
    }
}

/// Marks the rows whose seqs `acked` receives sent, many at a time: it waits for one,
/// takes whatever else arrives within `linger` (up to 1000), and writes one
/// UPDATE. A failed UPDATE leaves the rows to the relay (which republishes;
/// the duplicate is dropped downstream). Runs until `shutdown`, then marks
/// what is left.
pub async fn mark_sent_in_batches(
    pool: PgPool,
    mut acked: tokio::sync::mpsc::UnboundedReceiver<i64>,
    linger: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            seq = acked.recv() => seq,
            _ = shutdown.cancelled() => None,
        };
        let mut seqs: Vec<i64> = first.into_iter().collect();
        if seqs.is_empty() {
            // Shut down: take what is queued without waiting.
            while let Ok(seq) = acked.try_recv() {
                seqs.push(seq);
            }
            mark(&pool, &seqs).await;
            return;
        }
        let until = tokio::time::Instant::now() + linger;
        while seqs.len() < 1000 {
            match tokio::time::timeout_at(until, acked.recv()).await {
                Ok(Some(seq)) => seqs.push(seq),
                _ => break,
            }
        }
        mark(&pool, &seqs).await;
    }
}

async fn mark(pool: &PgPool, seqs: &[i64]) {
    if let Err(e) = mark_rows_sent(pool, seqs).await {
        tracing::warn!(error = %e, rows = seqs.len(), "marking published rows failed; the relay will send them again");
    }
}

/// Marks rows sent, found by seq: the key of both the primary key and the
/// unsent rows' partial index, so it reads only the rows it marks whatever
/// the planner's statistics say. (Found by event id, a generic plan made
/// while the outbox was small scanned the whole unsent index and compared
/// each entry with every id: with a backlog of 50,000 rows, one mark of
/// 1000 took up to a second.)
const MARK_SENT: &str =
    "UPDATE choreo_outbox SET sent_at = now() WHERE seq = ANY($1) AND sent_at IS NULL";

/// Marks the rows `seqs` sent (the relay's and the marker's one UPDATE).
async fn mark_rows_sent<'e>(
    db: impl sqlx::PgExecutor<'e>,
    seqs: &[i64],
) -> Result<(), sqlx::Error> {
    if seqs.is_empty() {
        return Ok(());
    }
    sqlx::query(MARK_SENT).bind(seqs).execute(db).await?;
    Ok(())
}

/// How long a PubAck is waited for, counted from when its send was handed
/// to the client, whenever it is awaited: as long as async-nats waits for
/// one (its context's default timeout, which the services keep). Each of
/// async-nats's ack futures counts its timeout from when it is first
/// polled, so awaited one after another, PubAcks lost with a connection
/// (a node killed or cut off under the client) took that long each: a
/// relay's row-by-row batch of 57 stalled 57 times 5 s, 285 s, in a
/// cluster chaos run, its service's events unsent all the while.
pub const PUBACK_WAIT: Duration = Duration::from_secs(5);

/// Rows sent to the broker, their PubAcks still to come.
struct Sending {
    round: Published,
    /// Each PubAck to come with the rows it acknowledges: one row, or a
    /// whole atomic batch.
    in_flight: Vec<(Vec<i64>, jetstream::context::PublishAckFuture)>,
    started: std::time::Instant,
    /// When the last PubAck stops being waited for: [`PUBACK_WAIT`] after
    /// the last message was handed to the client.
    deadline: tokio::time::Instant,
}

/// Sends `rows` in order, stopping at the first that cannot be sent.
async fn send_rows(js: &jetstream::Context, rows: Vec<crate::outbox::Row>) -> Sending {
    let mut sending = Sending::begin(js, rows.len());
    if sending.round.error.is_some() {
        return sending;
    }
    for row in rows {
        let message = PublishMessage::build()
            .headers(headers(&row, None))
            .payload(row.payload.into());
        match js.send_publish(row.subject, message).await {
            Ok(ack) => sending.in_flight.push((vec![row.seq], ack)),
            Err(e) => {
                sending.round.error = Some(e.to_string());
                break;
            }
        }
    }
    sending.all_handed_over();
    sending
}

/// Sends `rows` (at most [`MAX_ATOMIC_BATCH`]) in order as one atomic
/// batch: all but the last as core messages, the last with the commit
/// header, whose PubAck acknowledges the batch (or refuses all of it). One
/// row goes as a plain publish, whose copy of a stored row is acknowledged
/// as a duplicate, not refused. Every message keeps its `Nats-Msg-Id`: the
/// broker refuses a batch that holds one it has stored already, never
/// stores it twice.
async fn send_atomically(js: &jetstream::Context, rows: Vec<crate::outbox::Row>) -> Sending {
    debug_assert!(rows.len() <= MAX_ATOMIC_BATCH);
    if rows.len() < 2 {
        return send_rows(js, rows).await;
    }
    let mut sending = Sending::begin(js, rows.len());
    if sending.round.error.is_some() {
        return sending;
    }
    let client = js.client();
    let batch_id = Uuid::now_v7().to_string();
    let size = rows.len();
    let mut seqs = Vec::with_capacity(size);
    for (i, row) in rows.into_iter().enumerate() {
        seqs.push(row.seq);
        let place = BatchPlace {
            batch_id: &batch_id,
            position: i + 1,
            commit: i + 1 == size,
        };
        let headers = headers(&row, Some(place));
        let sent = if place.commit {
            let message = PublishMessage::build()
                .headers(headers)
                .payload(row.payload.into());
            match js.send_publish(row.subject, message).await {
                Ok(ack) => {
                    sending.in_flight.push((std::mem::take(&mut seqs), ack));
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        } else {
            client
                .publish_with_headers(row.subject, headers, row.payload.into())
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(e) = sent {
            sending.round.error = Some(e);
            break;
        }
    }
    sending.all_handed_over();
    sending
}

/// Waits `backoff` before a failed publish goes again, or, while the
/// client is away from NATS, until it is back (however long that takes):
/// a backlog then goes the moment the broker is back, not up to a backoff
/// later.
async fn retry_after(js: &jetstream::Context, backoff: Duration) {
    const LOOK: Duration = Duration::from_millis(20);
    if away_from_nats(js).is_none() {
        return tokio::time::sleep(backoff).await;
    }
    while away_from_nats(js).is_some() {
        tokio::time::sleep(LOOK).await;
    }
}

/// The client's state while it is not connected to NATS; `None` while it is.
fn away_from_nats(js: &jetstream::Context) -> Option<async_nats::connection::State> {
    let state = js.client().connection_state();
    (state != async_nats::connection::State::Connected).then_some(state)
}

/// A row's place in an atomic batch.
#[derive(Clone, Copy)]
struct BatchPlace<'a> {
    batch_id: &'a str,
    /// 1 for the first row.
    position: usize,
    /// The last row, whose PubAck commits the batch.
    commit: bool,
}

/// The headers a row is published with: its event id as `Nats-Msg-Id`
/// (the broker's duplicate window), its trace context, and its place in
/// an atomic batch if it goes in one.
fn headers(row: &crate::outbox::Row, batch: Option<BatchPlace>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        row.event_id.to_string().as_str(),
    );
    if !row.traceparent.is_empty() {
        headers.insert("traceparent", row.traceparent.as_str());
    }
    if let Some(place) = batch {
        headers.insert("Nats-Batch-Id", place.batch_id);
        headers.insert("Nats-Batch-Sequence", place.position.to_string().as_str());
        if place.commit {
            headers.insert("Nats-Batch-Commit", "1");
        }
    }
    headers
}

/// The JetStream error code behind a failed publish, if the broker gave one.
fn error_code(error: &jetstream::context::PublishError) -> Option<ErrorCode> {
    let source = std::error::Error::source(error)?;
    Some(source.downcast_ref::<jetstream::Error>()?.error_code())
}

impl Sending {
    /// Nothing sent yet of `attempted` rows; already failed if the client
    /// is not connected to NATS right now. Nothing is to be sent then: the
    /// client would keep the messages in its reconnect buffer and send them
    /// once NATS is back, after their PubAcks timed out, while the relay
    /// sends the same rows again. Each copy already stored makes the broker
    /// refuse the relay's atomic batch that holds it, and that batch goes
    /// again row by row, an fsync each.
    fn begin(js: &jetstream::Context, attempted: usize) -> Sending {
        Sending {
            round: Published {
                attempted,
                error: away_from_nats(js)
                    .map(|state| format!("NATS is away ({state}); nothing sent")),
                ..Published::default()
            },
            in_flight: Vec::with_capacity(attempted),
            started: std::time::Instant::now(),
            deadline: tokio::time::Instant::now() + PUBACK_WAIT,
        }
    }

    /// Every message of the send is with the client: its PubAcks are
    /// waited for [`PUBACK_WAIT`] from now.
    fn all_handed_over(&mut self) {
        self.deadline = tokio::time::Instant::now() + PUBACK_WAIT;
    }

    /// Awaits the PubAcks, all at once and none past the send's deadline,
    /// and reports which rows were acknowledged.
    async fn acknowledged(self) -> Published {
        let Sending {
            mut round,
            in_flight,
            started,
            deadline,
        } = self;
        let acks = in_flight.into_iter().map(|(seqs, ack)| async move {
            let answer = match tokio::time::timeout_at(deadline, ack.into_future()).await {
                Ok(answer) => answer,
                Err(_) => Err(jetstream::context::PublishError::new(
                    jetstream::context::PublishErrorKind::TimedOut,
                )),
            };
            (seqs, answer, started.elapsed())
        });
        for (seqs, answer, waited) in futures::future::join_all(acks).await {
            match answer {
                Ok(_) => {
                    if seqs.len() > 1 {
                        metrics::counter!("saga_relay_atomic_batches_total").increment(1);
                    }
                    let latency = waited.as_secs_f64();
                    for seq in seqs {
                        metrics::histogram!("saga_publish_latency_seconds").record(latency);
                        round.acked.push(seq)
                    }
                }
                Err(e) => {
                    if seqs.len() > 1 {
                        let code = error_code(&e);
                        if code.is_some() {
                            metrics::counter!("saga_relay_atomic_batches_refused_total")
                                .increment(1);
                        }
                        round.batch_refused = round.batch_refused.or(code);
                    }
                    round.error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        metrics::counter!("saga_outbox_published_total").increment(round.acked.len() as u64);
        round
    }
}

impl Relay {
    pub fn new(pool: PgPool, js: jetstream::Context, batch: i64, poll: Duration) -> Self {
        Relay {
            pool,
            js,
            batch,
            poll,
            grace: Duration::ZERO,
            atomic: Arc::new(AtomicBool::new(true)),
            stats: Arc::default(),
            leading: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }

    /// Whether this relay leads its database's outbox: `None` until its
    /// first try for the leader lock has answered, then each change.
    pub fn leadership(&self) -> tokio::sync::watch::Receiver<Option<bool>> {
        self.leading.subscribe()
    }

    /// Sends every row on its own, never as an atomic batch (for a stream
    /// without `allow_atomic`, or to compare).
    pub fn row_by_row(self) -> Self {
        self.atomic.store(false, Ordering::SeqCst);
        self
    }

    /// Leaves rows younger than `grace` to the [`Publisher`] of their own
    /// transaction, and polls instead of waking on every insert: the relay
    /// becomes the sweeper of what a crash or an outage left unsent.
    pub fn sweeping_after(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown`: waits for leadership, then relays.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.lead(&shutdown).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "relay lost its database connection; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One term: take the lock (or return when shut down), relay until the connection fails.
    async fn lead(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?.detach();
        loop {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK)
                .fetch_one(&mut conn)
                .await?;
            if locked {
                break;
            }
            self.leading.send_if_modified(|leading| {
                let changed = *leading != Some(false);
                *leading = Some(false);
                changed
            });
            tokio::select! {
                _ = tokio::time::sleep(self.poll * 2) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        tracing::info!("relay is the leader for this database");
        self.leading.send_replace(Some(true));
        let result = self.relay_as_leader(&mut conn, shutdown).await;
        self.leading.send_replace(Some(false));
        let _ = conn.close().await; // closing the session releases the lock
        result
    }

    async fn relay_as_leader(
        &self,
        conn: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        // Woken by every insert only while the relay publishes every row;
        // as the sweeper it polls.
        let mut wakeup = self
            .grace
            .is_zero()
            .then(|| crate::db::Wakeup::new(self.pool.clone(), "choreo_outbox", self.poll));
        if let Some(wakeup) = wakeup.as_mut() {
            wakeup.listen().await;
        }
        let mut backoff = Duration::from_millis(100);
        // Since when every publish round has failed; `None` while they go.
        let mut failing_since: Option<tokio::time::Instant> = None;
        // Batches sent whose PubAcks are still to come, each with the sagas
        // of its rows: while they come the next batch is read and sent, so
        // reading and marking in PostgreSQL overlap the broker's work.
        let mut in_flight: VecDeque<(Sending, HashSet<String>)> = VecDeque::new();
        // This run reads past seq `after`; 0: a new run, from the first unsent row.
        let mut after = 0;
        let mut batches_in_run = 0;
        // Whether this run sends row by row, and how many batches it may
        // read: after the broker refused an atomic batch, the next run sends
        // just that batch row by row, and atomic batches go on after it.
        let (mut row_by_row, mut refused_before) = (false, false);
        let mut batches_this_run = MAX_BATCHES_IN_A_RUN;
        while !shutdown.is_cancelled() {
            if after == 0 {
                batches_in_run = 0;
                let atomic = self.atomic.load(Ordering::Relaxed);
                row_by_row = std::mem::take(&mut refused_before) || !atomic;
                batches_this_run = if row_by_row && atomic {
                    1
                } else {
                    MAX_BATCHES_IN_A_RUN
                };
            }
            batches_in_run += 1;
            let rows = self.unsent(conn, after).await?;
            let full = rows.len() as i64 >= self.batch_size();
            let last = rows.last().map_or(after, |row| row.seq);
            let (mut error, mut refused) = (None, None);
            let sagas: HashSet<String> = if row_by_row {
                HashSet::new()
            } else {
                rows.iter().map(|row| row.saga_id.clone()).collect()
            };
            // An atomic batch goes only once every earlier one that holds an
            // event of its sagas is in the stream (were that refused, this
            // one must not get in first), and while fewer than
            // ATOMIC_BATCHES_IN_FLIGHT are out. The rows of those awaited
            // are marked sent while this batch is with the broker.
            let mut acked_before = Vec::new();
            if !row_by_row {
                let sharing = in_flight
                    .iter()
                    .rposition(|(_, earlier)| !earlier.is_disjoint(&sagas))
                    .map_or(0, |i| i + 1);
                let over = (in_flight.len() + 1).saturating_sub(ATOMIC_BATCHES_IN_FLIGHT);
                for _ in 0..sharing.max(over) {
                    let Some((earlier, _)) = in_flight.pop_front() else {
                        break;
                    };
                    let round = self.acknowledged(earlier).await;
                    acked_before.extend(round.acked);
                    refused = refused.or(round.batch_refused);
                    if round.error.is_some() {
                        error = round.error;
                        break;
                    }
                }
            }
            if error.is_none() {
                let sending = if row_by_row {
                    send_rows(&self.js, rows).await
                } else {
                    send_atomically(&self.js, rows).await
                };
                error = sending.round.error.clone();
                in_flight.push_back((sending, sagas));
            }
            self.mark_sent(conn, &acked_before).await?;
            let go_on = full && error.is_none() && batches_in_run < batches_this_run;
            // Settle the oldest batches: all of them unless more are read now.
            let keep = match (go_on, row_by_row) {
                (false, _) => 0,
                (true, true) => BATCHES_IN_FLIGHT - 1,
                (true, false) => ATOMIC_BATCHES_IN_FLIGHT,
            };
            while in_flight.len() > keep {
                let Some((earlier, _)) = in_flight.pop_front() else {
                    break;
                };
                let round = self.settle(conn, earlier).await?;
                refused = refused.or(round.batch_refused);
                if let Some(failed) = round.error {
                    error.get_or_insert(failed);
                }
            }
            after = if go_on && error.is_none() { last } else { 0 };
            if let Some(error) = error {
                for (earlier, _) in in_flight.drain(..) {
                    let round = self.settle(conn, earlier).await?;
                    refused = refused.or(round.batch_refused);
                }
                if let Some(code) = refused {
                    // Refused as a whole: go again at once, from the first
                    // unsent row, one batch row by row.
                    if code == ErrorCode::ATOMIC_PUBLISH_DISABLED {
                        tracing::warn!(
                            "the stream does not allow atomic batches (allow_atomic): the relay sends row by row, an fsync each"
                        );
                        self.atomic.store(false, Ordering::Relaxed);
                    } else {
                        tracing::debug!(%error, "the broker refused an atomic batch; sending its rows one by one");
                    }
                    refused_before = true;
                    continue;
                }
                tracing::warn!(%error, "publish failed; will retry");
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= MOVE_AFTER_FAILING
                    && crate::runtime::move_to_another_node(&self.js.client(), "relay").await
                {
                    self.stats.node_moves.fetch_add(1, Ordering::Relaxed);
                    failing_since = None;
                }
                tokio::select! {
                    _ = retry_after(&self.js, backoff) => {}
                    _ = shutdown.cancelled() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            backoff = Duration::from_millis(100);
            failing_since = None;
            if full {
                continue; // more rows are waiting
            }
            if let Some(wakeup) = wakeup.as_mut() {
                wakeup.wait(shutdown).await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(self.poll) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
        for (earlier, _) in in_flight {
            self.settle(conn, earlier).await?;
        }
        Ok(())
    }

    /// Rows read and sent at a time: the configured batch, at most what
    /// the broker takes as one atomic batch.
    fn batch_size(&self) -> i64 {
        self.batch.min(MAX_ATOMIC_BATCH as i64)
    }

    /// Up to one batch of unsent rows past the grace period, in seq
    /// order, after seq `after` (0: from the first).
    async fn unsent(
        &self,
        conn: &mut PgConnection,
        after: i64,
    ) -> Result<Vec<crate::outbox::Row>, sqlx::Error> {
        sqlx::query_as(
            "SELECT seq, event_id, saga_id, subject, payload, traceparent FROM choreo_outbox
             WHERE sent_at IS NULL AND seq > $3 AND created_at <= now() - make_interval(secs => $2)
             ORDER BY seq LIMIT $1",
        )
        .bind(self.batch_size())
        .bind(self.grace.as_secs_f64())
        .bind(after)
        .fetch_all(&mut *conn)
        .await
    }

    /// Awaits a sent batch's PubAcks and marks the acknowledged rows sent;
    /// returns what came back.
    async fn settle(
        &self,
        conn: &mut PgConnection,
        sending: Sending,
    ) -> Result<Published, sqlx::Error> {
        let round = self.acknowledged(sending).await;
        self.mark_sent(conn, &round.acked).await?;
        if let Some(error) = &round.error {
            tracing::debug!(%error, unsent = round.attempted - round.acked.len(), "a relay batch was not all acknowledged");
        }
        Ok(round)
    }

    /// Publishes up to one batch of unsent rows, PubAcks in flight together,
    /// and reports which were acknowledged. Does not mark anything sent.
    pub async fn publish(&self, conn: &mut PgConnection) -> Result<Published, sqlx::Error> {
        if self.atomic.load(Ordering::Relaxed) {
            let rows = self.unsent(conn, 0).await?;
            let sending = send_atomically(&self.js, rows);
            let round = self.acknowledged(sending.await).await;
            if round.batch_refused.is_none() {
                return Ok(round);
            }
        }
        let rows = self.unsent(conn, 0).await?;
        let sending = send_rows(&self.js, rows).await;
        Ok(self.acknowledged(sending).await)
    }

    /// Awaits a sent batch's PubAcks and counts the acknowledged rows.
    async fn acknowledged(&self, sending: Sending) -> Published {
        let round = sending.acknowledged().await;
        self.stats
            .published
            .fetch_add(round.acked.len() as u64, Ordering::Relaxed);
        round
    }

    /// Marks acknowledged rows sent.
    pub async fn mark_sent(
        &self,
        conn: &mut PgConnection,
        acked: &[i64],
    ) -> Result<(), sqlx::Error> {
        mark_rows_sent(conn, acked).await
    }
}

/// Samples the outbox backlog and the age of its oldest unsent row into
/// gauges every `every`, until `shutdown`.
pub async fn sample_backlog(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        let sample: Result<(i64, Option<f64>), sqlx::Error> = sqlx::query_as(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM choreo_outbox WHERE sent_at IS NULL",
        )
        .fetch_one(&pool)
        .await;
        if let Ok((backlog, oldest)) = sample {
            metrics::gauge!("saga_outbox_backlog").set(backlog as f64);
            metrics::gauge!("saga_outbox_oldest_unsent_age_seconds").set(oldest.unwrap_or(0.0));
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MARK_SENT;
    use sqlx::{AssertSqlSafe, Connection};

    /// Rows a plan read and threw away again: its nodes' `Rows Removed
    /// by Filter` and `by Index Recheck`, from `EXPLAIN ANALYZE`'s lines.
    fn rows_read_and_dropped(plan: &[String]) -> u64 {
        plan.iter()
            .filter_map(|line| line.split_once("Rows Removed by ")?.1.split_once(": "))
            .map(|(_, n)| n.trim().parse::<u64>().unwrap())
            .sum()
    }

    /// With a backlog of 20,000 unsent rows that the planner's statistics
    /// know nothing of (as after an outage: they were made while the
    /// outbox was nearly empty), and again once they do, marking 1000 rows
    /// sent reads those rows and no others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn marking_rows_sent_reads_only_them_whatever_the_statistics() {
        let (_pg, url) = harness::fresh_database().await.unwrap();
        let no_service_migrations = sqlx::migrate::Migrator::with_migrations(vec![]);
        let pool = crate::db::open(
            &url,
            std::time::Duration::from_secs(10),
            &no_service_migrations,
        )
        .await
        .unwrap();
        let mut conn = pool.acquire().await.unwrap().detach();
        sqlx::query("ANALYZE choreo_outbox")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO choreo_outbox (event_id, subject, event_type, saga_id, payload)
             SELECT gen_random_uuid(), 'x.placed', 'placed', 's' || g, '\\x00'
             FROM generate_series(1, 20000) g",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "PREPARE mark(bigint[]) AS {MARK_SENT}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        // The generic plan: the one a prepared statement settles on after
        // its first five runs. (Those five are planned for their values,
        // and with such stale statistics may scan the table once, hashing
        // the seqs: linear in the table, not in table times batch.)
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut conn)
            .await
            .unwrap();
        for analyzed in [false, true] {
            if analyzed {
                sqlx::query("ANALYZE choreo_outbox")
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            // Every other row of the next 2000 unsent: a batch a relay
            // and a marker shared.
            let seqs: Vec<i64> = sqlx::query_scalar(
                "SELECT seq FROM choreo_outbox WHERE sent_at IS NULL ORDER BY seq LIMIT 2000",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .step_by(2)
            .collect();
            let literal = seqs
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "EXPLAIN ANALYZE EXECUTE mark('{{{literal}}}')"
            )))
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let marked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM choreo_outbox WHERE seq = ANY($1) AND sent_at IS NOT NULL",
            )
            .bind(&seqs)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            assert_eq!(marked, 1000, "analyzed: {analyzed}");
            assert_eq!(
                rows_read_and_dropped(&plan),
                0,
                "analyzed: {analyzed}: the mark read rows it does not mark:\n{}",
                plan.join("\n")
            );
        }
        conn.close().await.unwrap();
    }
}

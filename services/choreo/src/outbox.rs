//! Writing outgoing events into the caller's open transaction, and
//! publishing them the moment that transaction has committed.
//!
//! An event is durable once its outbox row commits; publishing it is a
//! separate step that may fail or never happen (a crash). So there are two
//! ways out: the code that committed publishes its rows at once and marks
//! them sent ([`capture`] and [`Written::publish`], through the
//! [`crate::relay::Publisher`]), and the [`crate::relay`] sweeps whatever is
//! still unsent after a grace period. Duplicates of either are absorbed
//! downstream (JetStream's `Nats-Msg-Id` window, then the consumers' inbox).
use std::cell::RefCell;
use std::sync::Arc;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::envelope::{Envelope, EventPayload};
use crate::relay::Publisher;
use prost::Message;

/// Writes this service's events into its outbox table.
#[derive(Clone)]
pub struct Outbox {
    producer: Arc<str>,
    subject_prefix: Arc<str>,
    /// Publishes rows right after their commit, where [`capture`] runs.
    publisher: Option<Publisher>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("producer", &self.producer)
            .field("subject_prefix", &self.subject_prefix)
            .field("publishes_after_commit", &self.publisher.is_some())
            .finish()
    }
}

/// An outbox row as it was written (and as the relay reads it back).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Row {
    /// Its place in the outbox (the relay publishes in seq order).
    pub seq: i64,
    pub event_id: Uuid,
    /// The saga the event belongs to (the relay keeps a saga's events in order).
    pub saga_id: String,
    pub subject: String,
    pub payload: Vec<u8>,
    pub traceparent: String,
}

tokio::task_local! {
    static WRITTEN: RefCell<Vec<(Publisher, Row)>>;
}

/// What an outbox INSERT returns for each row it writes (in its
/// `RETURNING`, where `choreo_outbox` is the new row): the row's seq, for
/// publishing it right after commit and marking it sent, or NULL when an
/// earlier event of its saga is still unsent past the relay's sweep delay
/// (`RELAY_SWEEP_AFTER_MS`, 2 s by default: `{after_ms}` in the text, filled
/// in by [`returning_to_publish`]). That event is the relay's (its
/// send after commit failed), and this one is left to the relay too, which
/// sends both in seq order: a saga's events do not pass each other on
/// their way to the stream, whichever instance wrote them. An earlier row
/// younger than that is its publisher's, on its way most likely (acknowledged
/// rows are marked sent up to 200 ms later, in batches): counting those too
/// cost 13% of the closed loop's peak, most likely by leaving many a
/// saga's `order.completed` to the relay (`docs/bench/round-2026-12-07-aq.md`;
/// counting only the relay's: no difference). So an event
/// written within that delay of a failed send of its saga can still pass it; the
/// causal chain keeps most from trying (a saga's next event in the happy
/// path is caused by the earlier one, already in the stream), and the
/// barrier absorbs the rest.
const SEQ_TO_PUBLISH: &str = "CASE WHEN EXISTS (
         SELECT FROM choreo_outbox earlier
         WHERE earlier.saga_id = choreo_outbox.saga_id AND earlier.sent_at IS NULL
           AND earlier.created_at < now() - interval '{after_ms} milliseconds')
     THEN NULL ELSE choreo_outbox.seq END";

/// The `RETURNING` of an outbox INSERT whose rows are published after
/// commit: [`SEQ_TO_PUBLISH`] with the relay's `sweep_after`, made once
/// for each [`Publisher`].
pub(crate) fn returning_to_publish(sweep_after: std::time::Duration) -> String {
    format!(
        "RETURNING {} AS seq",
        SEQ_TO_PUBLISH.replace("{after_ms}", &sweep_after.as_millis().to_string())
    )
}

/// The `RETURNING` of an outbox INSERT: [`SEQ_TO_PUBLISH`] where the rows
/// are published after commit, their seq where the relay sends every row.
fn returning(publisher: Option<&Publisher>) -> &str {
    publisher.map_or("RETURNING seq", Publisher::returning)
}

/// The rows a piece of work wrote through outboxes that publish after
/// commit. Publish them only once the transaction they were written in has
/// committed; dropped unpublished, the relay sweeps them later.
#[must_use = "publish the rows once their transaction has committed, or let the relay sweep them"]
#[derive(Default)]
pub struct Written(Vec<(Publisher, Row)>);

impl Written {
    /// Queues the rows, in order, to be sent at once and returns; their
    /// PubAcks are awaited apart and the acknowledged rows marked sent
    /// ([`Publisher::publish`]). A row that fails stays unsent for the relay.
    pub fn publish(self) {
        let mut by_publisher: Vec<(Publisher, Vec<Row>)> = Vec::new();
        for (publisher, row) in self.0 {
            match by_publisher.iter_mut().find(|(p, _)| p.same_as(&publisher)) {
                Some((_, rows)) => rows.push(row),
                None => by_publisher.push((publisher, vec![row])),
            }
        }
        for (publisher, rows) in by_publisher {
            publisher.publish(rows);
        }
    }
}

/// Runs `work` and returns what it wrote through outboxes that publish
/// after commit. The caller publishes those rows if, and only if, the
/// transaction they were written in committed.
pub async fn capture<T>(work: impl Future<Output = T>) -> (T, Written) {
    WRITTEN
        .scope(RefCell::new(Vec::new()), async {
            let result = work.await;
            (result, Written(WRITTEN.with(|w| w.take())))
        })
        .await
}

/// [`capture`] for work that returns `Ok` only after its commit (a gRPC
/// method, a background sweep): publishes what it wrote when it succeeded.
/// The rows queue for the publisher's own task, so the caller never waits
/// on the broker (while NATS is away even handing a message to the client
/// can take its whole timeout; the relay sweeps).
pub async fn publish_after_commit<T, E>(work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let (result, written) = capture(work).await;
    if result.is_ok() {
        written.publish();
    }
    result
}

impl Outbox {
    pub fn new(producer: &str, subject_prefix: &str) -> Self {
        Outbox {
            producer: producer.into(),
            subject_prefix: subject_prefix.into(),
            publisher: None,
        }
    }

    /// This outbox's rows are also published right after their commit,
    /// where the work that writes them runs in [`capture`].
    pub fn publishing_through(mut self, publisher: Publisher) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// The name written in the envelope's `producer` field.
    pub fn producer(&self) -> &str {
        &self.producer
    }

    /// Inserts a new event for `saga_id`, caused by `cause`, into the open transaction `tx`.
    ///
    /// Written at once. In a handler that also runs a compensable step
    /// ([`crate::step`]), it lands before the step's event whichever came
    /// first: the inbox step writes the steps' events at its end.
    pub async fn emit<P: EventPayload>(
        &self,
        tx: &mut PgConnection,
        saga_id: &str,
        cause: Option<&Envelope>,
        payload: &P,
    ) -> Result<Envelope, sqlx::Error> {
        let envelope = self.envelope(saga_id, cause, payload);
        self.insert(tx, &envelope).await?;
        Ok(envelope)
    }

    /// The envelope [`Outbox::emit`] would write, built but not inserted:
    /// for a caller that writes what it knows of the event along with its
    /// own rows first, then [`Outbox::insert`]s it.
    pub fn envelope<P: EventPayload>(
        &self,
        saga_id: &str,
        cause: Option<&Envelope>,
        payload: &P,
    ) -> Envelope {
        let mut envelope = Envelope::new(&self.producer, saga_id, cause, payload);
        // The work that writes the event is its parent in the trace.
        if let Some(traceparent) = crate::telemetry::current_traceparent() {
            envelope.traceparent = traceparent;
        }
        envelope
    }

    /// Inserts an already built envelope (its event id is the dedup key downstream).
    pub async fn insert(
        &self,
        tx: &mut PgConnection,
        envelope: &Envelope,
    ) -> Result<(), sqlx::Error> {
        insert_all(tx, &[(self, envelope)]).await
    }

    /// Runs `statement` and, in that same statement, inserts `envelope`
    /// if the statement returns a row: a write and its event in one round
    /// trip, so a write alone needs no transaction of its own (a statement
    /// is atomic) and one in a transaction costs one statement, not two.
    /// Returns the statement's first row, or `None` when it returned none
    /// (then the event is not written either). Like [`Outbox::insert`], the
    /// row is published after commit where the work runs in [`capture`],
    /// and what the statement runs after commit ([`crate::Effect::after_commit`])
    /// runs as [`crate::inbox::after_commit`] runs it.
    pub async fn insert_with(
        &self,
        conn: &mut PgConnection,
        statement: crate::Effect,
        envelope: &Envelope,
    ) -> Result<Option<sqlx::postgres::PgRow>, sqlx::Error> {
        self.emitted(envelope).insert_with(conn, statement).await
    }

    /// The event `envelope` for the statement of an [`crate::Effect`] to
    /// write ([`crate::Effect::emitting`]).
    pub(crate) fn emitted(&self, envelope: &Envelope) -> Emitted {
        Emitted {
            publisher: self.publisher.clone(),
            event_type: envelope.event_type.clone(),
            row: self.row(envelope),
        }
    }

    /// The outbox row of `envelope`, its seq not known yet.
    fn row(&self, envelope: &Envelope) -> Row {
        Row {
            seq: 0,
            event_id: envelope.id(),
            saga_id: envelope.saga_id.clone(),
            subject: format!("{}.{}", self.subject_prefix, envelope.event_type),
            payload: envelope.encode_to_vec(),
            traceparent: envelope.traceparent.clone(),
        }
    }

    /// Inserts already built envelopes in one statement, in their order:
    /// for work that writes several events in one transaction.
    pub async fn insert_all(
        &self,
        tx: &mut PgConnection,
        envelopes: &[Envelope],
    ) -> Result<(), sqlx::Error> {
        let events: Vec<(&Outbox, &Envelope)> = envelopes.iter().map(|e| (self, e)).collect();
        insert_all(tx, &events).await
    }

    /// Writes a new event as [`Outbox::emit`] does, except inside the inbox
    /// step: there it is written just before the step's transaction commits,
    /// in one statement with every other event its batch writes this way.
    /// For the last write of an event's effects (a step's outcome), never
    /// inside a savepoint that may still roll back: the event would stay.
    pub(crate) async fn emit_at_end<P: EventPayload>(
        &self,
        tx: &mut PgConnection,
        saga_id: &str,
        cause: Option<&Envelope>,
        payload: &P,
    ) -> Result<(), sqlx::Error> {
        let envelope = self.envelope(saga_id, cause, payload);
        if AT_END.try_with(|_| ()).is_err() {
            return self.insert(tx, &envelope).await;
        }
        AT_END.with(|at_end| at_end.borrow_mut().push((self.clone(), envelope)));
        Ok(())
    }
}

/// An event written as a part of another statement: [`Outbox::insert_with`],
/// or an [`crate::Effect`] applied with its inbox insert.
pub(crate) struct Emitted {
    publisher: Option<Publisher>,
    event_type: String,
    row: Row,
}

impl Emitted {
    /// Binds the row's values as `statement`'s next placeholders (they are
    /// encoded as they are bound: no copy), and returns with it the common
    /// table expression `choreo_written` that inserts the row from them
    /// where `condition` (`WHERE ...`, or empty) holds; it returns the
    /// row's `seq`.
    pub(crate) fn bind(
        &self,
        statement: crate::Effect,
        condition: &str,
    ) -> (crate::Effect, String) {
        let first = statement.next_placeholder();
        let statement = statement
            .bind(self.row.event_id)
            .bind(self.row.subject.as_str())
            .bind(self.event_type.as_str())
            .bind(self.row.saga_id.as_str())
            .bind(self.row.payload.as_slice())
            .bind(self.row.traceparent.as_str());
        let values: Vec<String> = (first..statement.next_placeholder())
            .map(|n| format!("${n}"))
            .collect();
        let written = format!(
            "choreo_written AS (
                 INSERT INTO choreo_outbox (event_id, subject, event_type, saga_id, payload, traceparent)
                 SELECT {} {condition}
                 {})",
            values.join(", "),
            returning(self.publisher.as_ref())
        );
        (statement, written)
    }

    /// The scalar query for the written row's seq (NULL: left to the relay,
    /// [`SEQ_TO_PUBLISH`]). Without a publisher the relay publishes the
    /// row, woken by the NOTIFY it sends too.
    pub(crate) fn seq_query(&self) -> &'static str {
        if self.publisher.is_none() {
            "(SELECT seq FROM choreo_written, pg_notify('choreo_outbox', ''))"
        } else {
            "(SELECT seq FROM choreo_written)"
        }
    }

    /// [`Outbox::insert_with`] for this event.
    pub(crate) async fn insert_with(
        self,
        conn: &mut PgConnection,
        mut statement: crate::Effect,
    ) -> Result<Option<sqlx::postgres::PgRow>, sqlx::Error> {
        use sqlx::Row as _;
        let committed = statement.take_committed();
        let (statement, written) = self.bind(statement, "WHERE EXISTS (SELECT FROM choreo_held)");
        let (ctes, held, arguments) = statement.bound()?;
        let seq = self.seq_query();
        let sql = format!(
            "WITH {ctes},
             choreo_held AS ({held}),
             {written}
             SELECT choreo_held.*, {seq} AS choreo_outbox_seq FROM choreo_held"
        );
        let Some(held) = sqlx::query_with(sqlx::AssertSqlSafe(sql), arguments)
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        self.publish_once_committed(held.try_get("choreo_outbox_seq")?);
        committed.into_iter().for_each(crate::inbox::after_commit);
        Ok(Some(held))
    }

    /// Written with `seq` in a transaction that is still open: the row is
    /// published once it commits, where the work runs in [`capture`]
    /// (`None`: left to the relay).
    fn publish_once_committed(mut self, seq: Option<i64>) {
        if let (Some(publisher), Some(seq)) = (self.publisher, left_to_relay_unless(seq)) {
            self.row.seq = seq;
            let row = self.row;
            let _ = WRITTEN.try_with(|written| written.borrow_mut().push((publisher, row)));
        }
    }

    /// Written with `seq` by a statement that has committed: published now
    /// (`None`: left to the relay).
    pub(crate) fn publish(mut self, seq: Option<i64>) {
        if let (Some(publisher), Some(seq)) = (self.publisher, left_to_relay_unless(seq)) {
            self.row.seq = seq;
            publisher.publish(vec![self.row]);
        }
    }
}

/// `seq` as [`SEQ_TO_PUBLISH`] returned it; counts a row left to the relay.
fn left_to_relay_unless(seq: Option<i64>) -> Option<i64> {
    if seq.is_none() {
        metrics::counter!("saga_outbox_left_to_relay_total").increment(1);
        tracing::debug!(
            "an earlier event of this saga is still unsent: the relay sends this one after it"
        );
    }
    seq
}

tokio::task_local! {
    /// The events [`Outbox::emit_at_end`] left for the end of the inbox
    /// step's transaction.
    static AT_END: RefCell<Vec<(Outbox, Envelope)>>;
}

/// Runs `work`, one attempt of the inbox step's transaction, in which
/// [`Outbox::emit_at_end`] leaves its events for [`write_at_end`].
pub(crate) async fn at_end_of<T>(work: impl Future<Output = T>) -> T {
    AT_END.scope(RefCell::new(Vec::new()), work).await
}

/// Writes the events [`Outbox::emit_at_end`] left so far into `tx`, in one
/// statement: the inbox step calls it just before it commits.
pub(crate) async fn write_at_end(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    let events = AT_END.try_with(|at_end| at_end.take()).unwrap_or_default();
    let events: Vec<(&Outbox, &Envelope)> = events.iter().map(|(o, e)| (o, e)).collect();
    insert_all(tx, &events).await
}

/// Inserts `events` into the outbox of the open `tx` in one statement, in
/// their order (their seqs ascend in it), and hands the rows of outboxes
/// that publish after commit to [`capture`]. No events, no statement.
async fn insert_all(
    tx: &mut PgConnection,
    events: &[(&Outbox, &Envelope)],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<Row> = events
        .iter()
        .map(|(outbox, envelope)| outbox.row(envelope))
        .collect();
    // Without a publisher the relay publishes every row, woken at commit
    // by the NOTIFY. With one, nobody waits for it: no NOTIFY, which would
    // serialize this commit with every other notifying one; the rows' seqs
    // come back, for marking them sent once they are published.
    let notify = events.iter().any(|(outbox, _)| outbox.publisher.is_none());
    let returning = if notify {
        returning(None)
    } else {
        returning(
            events
                .iter()
                .find_map(|(outbox, _)| outbox.publisher.as_ref()),
        )
    };
    let seqs: Vec<Option<i64>> = if let [(_, envelope)] = events {
        let row = &rows[0];
        let sql = if notify {
            format!(
                "WITH written AS (
                     INSERT INTO choreo_outbox (event_id, subject, event_type, saga_id, payload, traceparent)
                     VALUES ($1, $2, $3, $4, $5, $6) {returning})
                 SELECT seq FROM written, pg_notify('choreo_outbox', '')"
            )
        } else {
            format!(
                "INSERT INTO choreo_outbox (event_id, subject, event_type, saga_id, payload, traceparent)
                 VALUES ($1, $2, $3, $4, $5, $6) {returning}"
            )
        };
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(row.event_id)
            .bind(&row.subject)
            .bind(&envelope.event_type)
            .bind(&row.saga_id)
            .bind(&row.payload)
            .bind(&row.traceparent)
            .fetch_all(&mut *tx)
            .await?
    } else {
        // Sorted by their place in the arrays before the insert numbers
        // them, so a saga's events keep their order in the outbox.
        let ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        let subjects: Vec<&str> = rows.iter().map(|r| r.subject.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|(_, e)| e.event_type.as_str()).collect();
        let sagas: Vec<&str> = rows.iter().map(|r| r.saga_id.as_str()).collect();
        let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
        let traceparents: Vec<&str> = rows.iter().map(|r| r.traceparent.as_str()).collect();
        let insert = format!(
            "INSERT INTO choreo_outbox (event_id, subject, event_type, saga_id, payload, traceparent)
             SELECT event_id, subject, event_type, saga_id, payload, traceparent
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[])
                 WITH ORDINALITY AS e (event_id, subject, event_type, saga_id, payload, traceparent, n)
             ORDER BY n
             {returning}, event_id"
        );
        let sql = if notify {
            format!(
                "WITH written AS ({insert})
                 SELECT seq, event_id FROM written, pg_notify('choreo_outbox', '')"
            )
        } else {
            insert
        };
        let written: Vec<(Option<i64>, Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&ids)
            .bind(&subjects)
            .bind(&types)
            .bind(&sagas)
            .bind(&payloads)
            .bind(&traceparents)
            .fetch_all(&mut *tx)
            .await?;
        let by_id: std::collections::HashMap<Uuid, Option<i64>> =
            written.into_iter().map(|(seq, id)| (id, seq)).collect();
        ids.iter()
            .map(|id| by_id.get(id).copied().flatten())
            .collect()
    };
    for (((outbox, _), mut row), seq) in events.iter().zip(rows).zip(seqs) {
        if let (Some(publisher), Some(seq)) = (&outbox.publisher, left_to_relay_unless(seq)) {
            row.seq = seq;
            let _ = WRITTEN.try_with(|written| written.borrow_mut().push((publisher.clone(), row)));
        }
    }
    Ok(())
}

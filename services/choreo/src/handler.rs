//! What a service writes: a [`Handler`] for its typed events. The platform
//! decodes each consumed event once (through [`Decode`]) and hands the typed
//! value over inside the inbox transaction.
use sqlx::Arguments;
use sqlx::Postgres;
use sqlx::postgres::PgArguments;
use tracing::Instrument;

use crate::Tx;
use crate::barrier::Claim;
use crate::envelope::{Envelope, Reject};
use crate::inbox::Batched;

/// A service's reaction to the events it consumes. Business rules only: write
/// rows and outgoing events into `tx`; the platform commits and acks.
///
/// Only events of the service's subscription (derived from the choreography)
/// reach it; anything else is acknowledged unread before any decoding.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The service's events, decoded once by the platform.
    type Event: Decode;

    async fn handle(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        event: Self::Event,
    ) -> Result<(), HandleError>;

    /// Whether events of different sagas may share one transaction: when
    /// events queue up, the consumer applies them together and commits once
    /// ([`crate::inbox::apply_batch`]). When the effects lock rows that
    /// several sagas share, such as a product's stock, two batches could take
    /// those rows in opposite orders and wait on each other until
    /// PostgreSQL's deadlock check (a second) breaks the tie: lock them all
    /// in one order first, in [`Handler::before_batch`], or take them last,
    /// in one order, in [`Handler::after_batch`]; or say no here.
    fn batches(&self) -> bool {
        true
    }

    /// Runs in a batch's transaction before the effects of its new events
    /// (`events`, in delivery order; duplicates left out): the place to
    /// lock the shared rows they will touch, all in one order.
    async fn before_batch(
        &self,
        _tx: &mut Tx<'_>,
        _events: &[(&Envelope, &Self::Event)],
    ) -> Result<(), HandleError> {
        Ok(())
    }

    /// Runs in a batch's transaction after the effects of its events and
    /// the insert of their outgoing events, just before the commit: the
    /// place to write what the batch's events decided about shared rows
    /// (kept in [`crate::batch`] meanwhile), so those rows stay locked only
    /// through this and the commit. An error rolls the whole batch back,
    /// and the consumer applies its events one by one.
    async fn after_batch(&self, _tx: &mut Tx<'_>) -> Result<(), HandleError> {
        Ok(())
    }

    /// The whole effect of `event`, when it is one statement: the platform
    /// then applies an event that comes alone as that statement and its
    /// inbox insert together, one statement outside any transaction
    /// (PostgreSQL makes it atomic), in place of BEGIN, the inbox insert,
    /// [`Handler::handle`] and COMMIT: one round trip, not four. If the
    /// effect does not hold, nothing of it is written and the event goes
    /// through [`Handler::handle`] in a transaction as usual. `None` (the
    /// default): always that way.
    ///
    /// For the trigger of a step's action, the effect is the action's
    /// ([`crate::step::act_alone`]): the statement also claims the step's
    /// barrier row and holds only if it could. An event that asks for a
    /// compensation always goes through its transaction.
    fn effect_alone(&self, _envelope: &Envelope, _event: &Self::Event) -> Option<Effect> {
        None
    }

    /// The effects of a batch's new events (in delivery order; duplicates
    /// left out), after [`Handler::before_batch`]: [`Handler::handle`] for
    /// each, in its span. A handler that can write a whole batch in fewer
    /// statements than one per event does it here.
    ///
    /// Not called for a batch in which a compensable step claimed a barrier
    /// row ([`crate::step`]): the platform then runs [`Handler::handle`]
    /// for each event itself, and withdraws each event's untaken claims
    /// before the next event runs.
    async fn handle_all(
        &self,
        tx: &mut Tx<'_>,
        events: Vec<Batched<'_, Self::Event>>,
    ) -> Result<(), HandleError> {
        for Batched {
            envelope,
            event,
            span,
        } in events
        {
            self.handle(tx, envelope, event).instrument(span).await?;
        }
        Ok(())
    }
}

/// An event's whole effect as one statement ([`Handler::effect_alone`]):
/// common table expressions that write (`moved AS (UPDATE ... RETURNING
/// ...), ...`, their placeholders numbered from `$1` in [`Effect::bind`]
/// order) and a query over them that returns a row if, and only if, the
/// effect held (`SELECT ... FROM moved`). Every row of that query is
/// computed, so a function it calls (`pg_notify`, say) runs once per row.
pub struct Effect {
    ctes: &'static str,
    held: &'static str,
    arguments: PgArguments,
    unbound: Option<String>,
    /// The event the statement writes too, if it holds.
    emits: Option<crate::outbox::Emitted>,
    /// What runs once the effect is committed ([`Effect::after_commit`]).
    committed: Vec<Box<dyn FnOnce() + Send>>,
}

impl Effect {
    pub fn new(ctes: &'static str, held: &'static str) -> Self {
        Effect {
            ctes,
            held,
            arguments: PgArguments::default(),
            unbound: None,
            emits: None,
            committed: Vec::new(),
        }
    }

    /// The same effect, running `f` once it is committed, and never if it
    /// is not: applied alone, as soon as its statement returns; [`run`] in
    /// a handler's transaction, once that commits ([`crate::inbox::after_commit`]).
    ///
    /// [`run`]: Effect::run
    pub fn after_commit(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.committed.push(Box::new(f));
        self
    }

    /// What runs once the effect is committed.
    pub(crate) fn take_committed(&mut self) -> Vec<Box<dyn FnOnce() + Send>> {
        std::mem::take(&mut self.committed)
    }

    /// The same effect writing `envelope` through `outbox` too, in its
    /// statement, if it holds (a step's outcome: [`crate::step::act_alone`]).
    pub fn emitting(mut self, outbox: &crate::Outbox, envelope: &Envelope) -> Self {
        self.emits = Some(outbox.emitted(envelope));
        self
    }

    /// The value of the next placeholder.
    pub fn bind<'q, T>(mut self, value: T) -> Self
    where
        T: sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + 'q,
    {
        if let Err(e) = self.arguments.add(value)
            && self.unbound.is_none()
        {
            self.unbound = Some(e.to_string());
        }
        self
    }

    /// Runs the effect's statement on its own, in the caller's transaction
    /// (no inbox): whether it held. An event it emits is written with it
    /// ([`crate::Outbox::insert_with`]).
    pub async fn run(mut self, conn: &mut sqlx::PgConnection) -> Result<bool, sqlx::Error> {
        if let Some(emitted) = self.emits.take() {
            return emitted
                .insert_with(conn, self)
                .await
                .map(|row| row.is_some());
        }
        let committed = self.take_committed();
        let (ctes, held, arguments) = self.bound()?;
        let sql = format!("WITH {ctes} SELECT count(*) > 0 FROM ({held}) AS held");
        let held = sqlx::query_scalar_with(sqlx::AssertSqlSafe(sql), arguments)
            .fetch_one(conn)
            .await?;
        if held {
            committed.into_iter().for_each(crate::inbox::after_commit);
        }
        Ok(held)
    }

    /// The number of the placeholder the next [`Effect::bind`] binds.
    pub(crate) fn next_placeholder(&self) -> usize {
        self.arguments.len() + 1
    }

    /// Its parts, once every value bound could be encoded.
    pub(crate) fn bound(self) -> Result<(&'static str, &'static str, PgArguments), sqlx::Error> {
        match self.unbound {
            Some(e) => Err(sqlx::Error::Encode(e.into())),
            None => Ok((self.ctes, self.held, self.arguments)),
        }
    }

    /// The statement that records `envelope` in the inbox and has this
    /// effect, all or nothing, with its arguments: it fails with
    /// [`SEEN_BEFORE`] or [`DID_NOT_HOLD`], writing nothing, when the
    /// event is not new or the effect does not hold. With `claim` (a
    /// step's action) the statement claims the step's barrier row too, and
    /// the effect holds only if that row is new: otherwise the action was
    /// done or refused before, and the transaction's way tells which. The
    /// event the effect emits comes back with the statement, to be
    /// published ([`crate::outbox::Emitted::publish`]) with the seq it
    /// returns, once it has run.
    pub(crate) fn with_inbox(
        mut self,
        envelope: &Envelope,
        claim: Option<&'static str>,
    ) -> Result<(String, PgArguments, Option<crate::outbox::Emitted>), sqlx::Error> {
        let emits = self.emits.take();
        let id = self.next_placeholder();
        let (ty, saga) = (id + 1, id + 2);
        let mut effect = self
            .bind(envelope.id())
            .bind(envelope.event_type.as_str())
            .bind(envelope.saga_id.as_str());
        let mut claimed = String::new();
        let mut holds = "count(*) > 0";
        if let Some(step) = claim {
            let placeholder = effect.next_placeholder();
            let state = Claim::Action(step).first_state();
            claimed = format!(
                ",
             choreo_claimed AS (
                 INSERT INTO choreo_barrier (saga_id, step, state) VALUES (${saga}, ${placeholder}, '{state}')
                 ON CONFLICT (saga_id, step) DO NOTHING RETURNING saga_id)"
            );
            holds = "count(*) > 0 AND EXISTS (SELECT FROM choreo_claimed)";
            effect = effect.bind(step);
        }
        // The event's row is written unconditionally: where the effect
        // does not hold, the statement fails and takes it back.
        let (mut written, mut seq) = (String::new(), String::new());
        if let Some(emitted) = &emits {
            let (bound, cte) = emitted.bind(effect, "");
            effect = bound;
            written = format!(",\n{cte}");
            seq = format!(", {} AS choreo_outbox_seq", emitted.seq_query());
        }
        let (ctes, held, arguments) = effect.bound()?;
        let sql = format!(
            "WITH {ctes},
             choreo_fresh AS (
                 INSERT INTO choreo_inbox (event_id, event_type, saga_id) VALUES (${id}, ${ty}, ${saga})
                 ON CONFLICT (event_id) DO NOTHING RETURNING event_id){claimed}{written}
             SELECT choreo_applied_alone(EXISTS (SELECT FROM choreo_fresh), {holds}){seq}
             FROM ({held}) AS choreo_held"
        );
        Ok((sql, arguments, emits))
    }
}

/// The SQLSTATE of an [`Effect`] whose event is in the inbox already.
pub(crate) const SEEN_BEFORE: &str = "CH001";
/// The SQLSTATE of an [`Effect`] that did not hold.
pub(crate) const DID_NOT_HOLD: &str = "CH002";

/// The decode table of a set of events: event type and schema version to a
/// typed payload. An unknown type or version is a [`Reject`].
pub trait Decode: Sized + Clone + Send + Sync + 'static {
    fn decode(envelope: &Envelope) -> Result<Self, Reject>;
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The event cannot be read by this service: park it, never retry.
    #[error(transparent)]
    Reject(#[from] Reject),
    /// A database error: retried.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Any other transient failure: retried.
    #[error("{0}")]
    Transient(String),
}

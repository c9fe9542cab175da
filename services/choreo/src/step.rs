//! The skeleton of a compensable step, written once for every service.
//!
//! A service implements [`CompensableStep`] with its business rules only:
//! what the work is, and how to undo it. [`act`] and [`compensate`] own the
//! rest, inside the handler's transaction:
//! - action: the [`barrier`] refuses it if the step was already compensated
//!   (or skips a repeat), then the work runs, then its success or failure
//!   event is written to the outbox;
//! - compensation: the barrier tells whether there is work to undo or the
//!   step was never done (recorded, and the late action refused for good),
//!   then the undo runs and the compensation event, carrying the original
//!   cause, is written.
//!
//! Which events are which comes from the declaration: a step names its
//! [`Step`] ([`CompensableStep::STEP`]), and its [`Handler::handle`] runs the action for
//! the step's trigger and the compensation for the events that compensate
//! it. The build fails where the step's event types are not the ones its
//! declaration names.
//!
//! A step is its service's [`Handler`]: a service writes the step, and the
//! platform routes its events.
use crate::Tx;
use crate::barrier::{self, Claim, Compensation};
use crate::choreography::{Step, same};
use crate::envelope::{Envelope, EventPayload, Reject};
use crate::handler::{Decode, Effect, HandleError, Handler};
use crate::outbox::Outbox;

/// How a step's work ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict<S, F> {
    /// Done: write the success event.
    Succeeded(S),
    /// Cannot be done: write the failure event, which starts compensation.
    Failed(F),
    /// Accepted; the outcome is written later, after commit (a call outside
    /// the system, sent by a task of the service).
    Later,
}

/// A step's work as one statement, and the verdict it comes to
/// ([`CompensableStep::work_as_statement`]).
pub type WorkStatement<S, F> = (Effect, Verdict<S, F>);

/// What the compensation finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// The work was done: undo it.
    Work,
    /// The work was never done (and now never will be): record that.
    NeverDone,
}

/// One compensable step of a choreography: its declaration, its events, and
/// its business rules.
#[async_trait::async_trait]
pub trait CompensableStep: Send + Sync {
    /// The step as the choreography declares it, e.g.
    /// `CHOREOGRAPHY.step("reserve")`: its name (the barrier's), its
    /// trigger, the events that compensate it, and the event types below,
    /// which must be the ones it names (else the build fails).
    const STEP: &'static Step;
    /// The service's events, as the platform decodes them: the trigger
    /// carries [`CompensableStep::Input`], and the events that compensate
    /// the step carry their cause.
    type Event: Decode + Carries<Self::Input> + Cause;
    /// The trigger event, which brings the work its input.
    type Input: EventPayload + Send;
    type Success: EventPayload + Send + Sync;
    type Failure: EventPayload + Send + Sync;
    type Compensated: EventPayload + Send + Sync;

    /// Where the step's events go.
    fn outbox(&self) -> &Outbox;

    /// Does the work for the saga of `envelope` (the trigger).
    async fn work(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        input: Self::Input,
    ) -> Result<Verdict<Self::Success, Self::Failure>, HandleError>;

    /// The work as one statement and the verdict it comes to when the
    /// statement holds, where it is one (`None`, the default, where it is
    /// not): then the platform can apply a trigger that comes alone as that
    /// statement, its outcome event, its barrier claim and its inbox insert
    /// together ([`act_alone`]). `work` must then do the same, by
    /// [`Effect::run`]ning this statement in its transaction (in a batch,
    /// it may come to the same end another way: see [`crate::batch`]); where the
    /// statement does not hold (nothing of it is written), the trigger goes
    /// through `work` in a transaction, which decides what that means.
    fn work_as_statement(
        &self,
        _envelope: &Envelope,
        _input: &Self::Input,
    ) -> Option<WorkStatement<Self::Success, Self::Failure>> {
        None
    }

    /// Undoes the work, or records that it was never done; returns the
    /// compensation event, which carries `cause` on down the chain.
    async fn undo(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        undo: Undo,
        cause: String,
    ) -> Result<Self::Compensated, HandleError>;

    /// Runs in a batch's transaction before its events' effects: where the
    /// step's work locks rows that several sagas share, lock them all here,
    /// in one order ([`Handler::before_batch`]). Nothing, by default.
    async fn before_batch(
        &self,
        _tx: &mut Tx<'_>,
        _events: &[(&Envelope, &Self::Event)],
    ) -> Result<(), HandleError> {
        Ok(())
    }

    /// Runs in a batch's transaction just before its commit
    /// ([`Handler::after_batch`]). Nothing, by default.
    async fn after_batch(&self, _tx: &mut Tx<'_>) -> Result<(), HandleError> {
        Ok(())
    }
}

/// A step is its service's handler: each event goes where the declaration
/// says, and a trigger that comes alone goes as one statement where the work
/// is one. A service that needs more wraps its step in a handler of its own.
#[async_trait::async_trait]
impl<S: CompensableStep + 'static> Handler for S {
    type Event = S::Event;

    /// The step's trigger runs the action ([`act`]); an event that
    /// compensates it runs the compensation ([`compensate`]) with the cause
    /// the event carries. Any other event is not the step's: refused as not
    /// consumed (parked).
    async fn handle(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        event: S::Event,
    ) -> Result<(), HandleError> {
        let declared = declared::<S>();
        let event_type = envelope.event_type.as_str();
        if declared.compensated_by.contains(&event_type) {
            let cause = event.cause(envelope).unwrap_or_default();
            return compensate(self, tx, envelope, cause).await;
        }
        match event
            .into_payload()
            .filter(|_| event_type == declared.trigger)
        {
            Some(input) => act(self, tx, envelope, input).await,
            None => Err(Reject::NotConsumed(envelope.event_type.clone()).into()),
        }
    }

    async fn before_batch(
        &self,
        tx: &mut Tx<'_>,
        events: &[(&Envelope, &S::Event)],
    ) -> Result<(), HandleError> {
        CompensableStep::before_batch(self, tx, events).await
    }

    async fn after_batch(&self, tx: &mut Tx<'_>) -> Result<(), HandleError> {
        CompensableStep::after_batch(self, tx).await
    }

    /// The step's trigger, when `event` is that, as one statement
    /// ([`act_alone`]); `None` for any other event.
    fn effect_alone(&self, envelope: &Envelope, event: &S::Event) -> Option<Effect> {
        if envelope.event_type != declared::<S>().trigger {
            return None;
        }
        act_alone(self, envelope, event.payload()?)
    }
}

/// A service's typed event that may carry the payload `P` (a step's input).
pub trait Carries<P> {
    /// The payload, if the event is one.
    fn payload(&self) -> Option<&P>;
    /// The payload itself, if the event is one.
    fn into_payload(self) -> Option<P>;
}

/// [`Carries`] for each payload of a service's event enum whose variants
/// each hold one payload: `choreo::carries!(SagaEvent { OrderCreated(v1::OrderCreated), ... })`.
#[macro_export]
macro_rules! carries {
    ($enum:ident { $($variant:ident($payload:ty)),* $(,)? }) => {
        $(
            impl $crate::step::Carries<$payload> for $enum {
                fn payload(&self) -> Option<&$payload> {
                    match self {
                        $enum::$variant(payload) => Some(payload),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }

                fn into_payload(self) -> Option<$payload> {
                    match self {
                        $enum::$variant(payload) => Some(payload),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }
            }
        )*
    };
}

/// A service's typed event, as a compensation reads it.
pub trait Cause {
    /// Why the saga is being compensated, as this event tells it: a failure
    /// names its producer and its reason; a compensation or a cancel carries
    /// the cause on. `None` for an event that asks for no compensation.
    fn cause(&self, envelope: &Envelope) -> Option<String>;
}

/// The declaration of step `S`, once its event types are found to be the
/// ones it names: a mismatch fails the build.
const fn declared<S: CompensableStep>() -> &'static Step {
    const {
        let step = S::STEP;
        assert!(
            same(S::Input::EVENT_TYPE, step.trigger),
            "a step's Input is not its declared trigger"
        );
        assert!(
            same(S::Success::EVENT_TYPE, step.success),
            "a step's Success is not its declared success event"
        );
        assert!(
            same(S::Failure::EVENT_TYPE, step.failure),
            "a step's Failure is not its declared failure event"
        );
        assert!(
            same(S::Compensated::EVENT_TYPE, step.compensation),
            "a step's Compensated is not its declared compensation event"
        );
        step
    }
}

/// Runs the step's action for the saga of `envelope`, the step's trigger.
pub async fn act<S: CompensableStep>(
    step: &S,
    tx: &mut Tx<'_>,
    envelope: &Envelope,
    input: S::Input,
) -> Result<(), HandleError> {
    let (saga, name) = (envelope.saga_id.as_str(), declared::<S>().name);
    let claimed = barrier::take_claim(envelope.id(), Claim::Action(name));
    if !claimed && !barrier::action(tx, saga, name).await?.proceeds(name) {
        return Ok(());
    }
    match step.work(tx, envelope, input).await? {
        Verdict::Succeeded(success) => {
            step.outbox()
                .emit_at_end(tx, saga, Some(envelope), &success)
                .await?;
        }
        Verdict::Failed(failure) => {
            tracing::info!(step = name, "step failed");
            step.outbox()
                .emit_at_end(tx, saga, Some(envelope), &failure)
                .await?;
        }
        Verdict::Later => {}
    }
    Ok(())
}

/// The step's action for the trigger `envelope` as one statement, where its
/// work is one ([`CompensableStep::work_as_statement`]): for the step's
/// [`crate::Handler::effect_alone`]. The statement writes the work and its
/// outcome event; the platform adds the inbox insert and the barrier claim,
/// and applies none of it unless the claim is new, so a repeated or refused
/// action goes through [`act`] in a transaction.
pub fn act_alone<S: CompensableStep>(
    step: &S,
    envelope: &Envelope,
    input: &S::Input,
) -> Option<Effect> {
    let saga = envelope.saga_id.as_str();
    let (work, verdict) = step.work_as_statement(envelope, input)?;
    let outcome = match verdict {
        Verdict::Succeeded(success) => step.outbox().envelope(saga, Some(envelope), &success),
        Verdict::Failed(failure) => step.outbox().envelope(saga, Some(envelope), &failure),
        Verdict::Later => return Some(work),
    };
    Some(work.emitting(step.outbox(), &outcome))
}

/// Runs the step's compensation for the saga of `envelope` (a failure or
/// compensation event), passing `cause` on.
pub async fn compensate<S: CompensableStep>(
    step: &S,
    tx: &mut Tx<'_>,
    envelope: &Envelope,
    cause: String,
) -> Result<(), HandleError> {
    let (saga, name) = (envelope.saga_id.as_str(), declared::<S>().name);
    let undo = if barrier::take_claim(envelope.id(), Claim::Compensation(name)) {
        barrier::count_compensation(name, "nothing_to_undo");
        Undo::NeverDone
    } else {
        match barrier::compensation(tx, saga, name).await? {
            Compensation::AlreadyCompensated => return Ok(()),
            Compensation::NothingToUndo => Undo::NeverDone,
            Compensation::Undo => Undo::Work,
        }
    };
    let compensated = step.undo(tx, envelope, undo, cause).await?;
    tracing::info!(step = name, ?undo, "step compensated");
    step.outbox()
        .emit_at_end(tx, saga, Some(envelope), &compensated)
        .await?;
    Ok(())
}

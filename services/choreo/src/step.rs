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
use crate::Tx;
use crate::barrier::{self, Claim, Compensation};
use crate::envelope::{Envelope, EventPayload};
use crate::handler::HandleError;
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

/// What the compensation finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// The work was done: undo it.
    Work,
    /// The work was never done (and now never will be): record that.
    NeverDone,
}

/// One compensable step of a choreography: its name (the barrier's, as the
/// declaration names it), its events, and its business rules.
#[async_trait::async_trait]
pub trait CompensableStep: Send + Sync {
    /// The step's name in the choreography declaration.
    const NAME: &'static str;
    /// What the trigger event brings the work.
    type Input: Send;
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

    /// Undoes the work, or records that it was never done; returns the
    /// compensation event, which carries `cause` on down the chain.
    async fn undo(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        undo: Undo,
        cause: String,
    ) -> Result<Self::Compensated, HandleError>;
}

/// Runs the step's action for the saga of `envelope`, the step's trigger.
pub async fn act<S: CompensableStep>(
    step: &S,
    tx: &mut Tx<'_>,
    envelope: &Envelope,
    input: S::Input,
) -> Result<(), HandleError> {
    let saga = envelope.saga_id.as_str();
    let claimed = barrier::take_claim(envelope.id(), Claim::Action(S::NAME));
    if !claimed && !barrier::action(tx, saga, S::NAME).await?.proceeds(S::NAME) {
        return Ok(());
    }
    match step.work(tx, envelope, input).await? {
        Verdict::Succeeded(success) => {
            step.outbox()
                .emit_at_end(tx, saga, Some(envelope), &success)
                .await?;
        }
        Verdict::Failed(failure) => {
            tracing::info!(step = S::NAME, "step failed");
            step.outbox()
                .emit_at_end(tx, saga, Some(envelope), &failure)
                .await?;
        }
        Verdict::Later => {}
    }
    Ok(())
}

/// Runs the step's compensation for the saga of `envelope` (a failure or
/// compensation event), passing `cause` on.
pub async fn compensate<S: CompensableStep>(
    step: &S,
    tx: &mut Tx<'_>,
    envelope: &Envelope,
    cause: String,
) -> Result<(), HandleError> {
    let saga = envelope.saga_id.as_str();
    let undo = if barrier::take_claim(envelope.id(), Claim::Compensation(S::NAME)) {
        barrier::count_compensation(S::NAME, "nothing_to_undo");
        Undo::NeverDone
    } else {
        match barrier::compensation(tx, saga, S::NAME).await? {
            Compensation::AlreadyCompensated => return Ok(()),
            Compensation::NothingToUndo => Undo::NeverDone,
            Compensation::Undo => Undo::Work,
        }
    };
    let compensated = step.undo(tx, envelope, undo, cause).await?;
    tracing::info!(step = S::NAME, ?undo, "step compensated");
    step.outbox()
        .emit_at_end(tx, saga, Some(envelope), &compensated)
        .await?;
    Ok(())
}

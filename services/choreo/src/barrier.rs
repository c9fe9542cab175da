//! The compensation barrier (DESIGN rule 3) as one mechanism for every service.
//!
//! Each (saga, step) pair gets one row the first time either the step's action
//! or its compensation runs, inside the handler's transaction:
//! - an action after its compensation is refused (no hanging reservation);
//! - a compensation before its action is recorded and needs no undo (null
//!   compensation), and it bars the action for good;
//! - repeats of either are recognised and do nothing.
//!
//! Concurrent callers serialise on the row: `INSERT .. ON CONFLICT` waits for
//! the other transaction and the `UPDATE .. WHERE state = 'done'` locks it.
//!
//! The declaration says which event types trigger a service's steps or ask
//! for their compensation ([`Claim`]). The inbox step claims those rows in
//! its own statement, together with the inbox insert, for the events it
//! records; [`crate::step`] then takes the claim made for its event
//! (`take_claim`) and asks the database only when there is none (a row
//! that existed already, a replay, a caller outside the inbox step).
use std::cell::RefCell;

use sqlx::PgConnection;
use uuid::Uuid;

/// The barrier row an event of a service's subscription claims, by the
/// declaration: it triggers the step's action, or asks for its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Action(&'static str),
    Compensation(&'static str),
}

impl Claim {
    pub fn step(self) -> &'static str {
        match self {
            Claim::Action(step) | Claim::Compensation(step) => step,
        }
    }

    /// The state a first claim writes.
    pub(crate) fn first_state(self) -> &'static str {
        match self {
            Claim::Action(_) => "done",
            Claim::Compensation(_) => "compensated_before_action",
        }
    }
}

/// The claims of a service's event types (see `Subscription::claims`).
pub type Claims = std::collections::BTreeMap<String, Claim>;

/// A barrier row the inbox step inserted for an event, in its transaction:
/// the event's action proceeds, or its compensation finds nothing to undo.
pub(crate) type Claimed = (Uuid, Claim);

tokio::task_local! {
    static CLAIMED: RefCell<Vec<Claimed>>;
}

/// Runs `work` (the handling of events) with the barrier rows the inbox step
/// claimed for them, for [`take_claim`].
pub(crate) async fn with_claims<T>(claimed: Vec<Claimed>, work: impl Future<Output = T>) -> T {
    CLAIMED.scope(RefCell::new(claimed), work).await
}

/// Takes the claim the inbox step made for `event` in this transaction, if it
/// made it: then the row is this event's, newly inserted.
pub(crate) fn take_claim(event: Uuid, claim: Claim) -> bool {
    CLAIMED
        .try_with(|claimed| {
            let mut claimed = claimed.borrow_mut();
            let found = claimed.iter().position(|c| *c == (event, claim));
            found.map(|i| claimed.swap_remove(i)).is_some()
        })
        .unwrap_or(false)
}

/// The claims of `event` its handling did not take (its handler did not run
/// the step): they are removed, and their rows must go with them.
pub(crate) fn untaken_claims(event: Uuid) -> Vec<Claim> {
    CLAIMED
        .try_with(|claimed| {
            let mut claimed = claimed.borrow_mut();
            let untaken = claimed
                .iter()
                .filter(|(id, _)| *id == event)
                .map(|(_, claim)| *claim)
                .collect();
            claimed.retain(|(id, _)| *id != event);
            untaken
        })
        .unwrap_or_default()
}

/// Removes the rows of claims their event's handling did not take, so the
/// barrier is as if the claim was never made.
pub(crate) async fn withdraw(
    tx: &mut PgConnection,
    saga_id: &str,
    claims: &[Claim],
) -> Result<(), sqlx::Error> {
    for claim in claims {
        tracing::debug!(
            step = claim.step(),
            "the handler did not run its step; its claim is withdrawn"
        );
        sqlx::query("DELETE FROM choreo_barrier WHERE saga_id = $1 AND step = $2")
            .bind(saga_id)
            .bind(claim.step())
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// What a step's action may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// First time: do the work.
    Proceed,
    /// The action already ran for this saga: do nothing again.
    AlreadyDone,
    /// The step was compensated first: refuse the late action.
    Refused,
}

impl Action {
    /// Whether the step's work should be done now; says in the log why not.
    pub fn proceeds(self, step: &str) -> bool {
        match self {
            Action::Proceed => true,
            Action::AlreadyDone => {
                tracing::info!(step, "step already done for this saga; nothing to do");
                false
            }
            Action::Refused => {
                tracing::info!(
                    step,
                    "step was compensated before its work arrived; refused"
                );
                false
            }
        }
    }
}

/// What a step's compensation must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensation {
    /// The action ran: undo it now.
    Undo,
    /// The action never ran: nothing to undo, and it never will run.
    NothingToUndo,
    /// The compensation already ran: do nothing again.
    AlreadyCompensated,
}

/// Claims the action of `step` for `saga_id`.
pub async fn action(
    tx: &mut PgConnection,
    saga_id: &str,
    step: &str,
) -> Result<Action, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO choreo_barrier (saga_id, step, state) VALUES ($1, $2, 'done')
         ON CONFLICT (saga_id, step) DO NOTHING",
    )
    .bind(saga_id)
    .bind(step)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(Action::Proceed);
    }
    let state: String =
        sqlx::query_scalar("SELECT state FROM choreo_barrier WHERE saga_id = $1 AND step = $2")
            .bind(saga_id)
            .bind(step)
            .fetch_one(&mut *tx)
            .await?;
    Ok(if state == "done" {
        Action::AlreadyDone
    } else {
        let step = step.to_owned();
        crate::inbox::after_commit(move || {
            metrics::counter!("saga_actions_refused_total", "step" => step).increment(1);
        });
        Action::Refused
    })
}

/// Claims the compensation of `step` for `saga_id`.
pub async fn compensation(
    tx: &mut PgConnection,
    saga_id: &str,
    step: &str,
) -> Result<Compensation, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO choreo_barrier (saga_id, step, state) VALUES ($1, $2, 'compensated_before_action')
         ON CONFLICT (saga_id, step) DO NOTHING",
    )
    .bind(saga_id)
    .bind(step)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        count_compensation(step, "nothing_to_undo");
        return Ok(Compensation::NothingToUndo);
    }
    let undone = sqlx::query(
        "UPDATE choreo_barrier SET state = 'compensated', updated_at = now()
         WHERE saga_id = $1 AND step = $2 AND state = 'done'",
    )
    .bind(saga_id)
    .bind(step)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(if undone == 1 {
        count_compensation(step, "undo");
        Compensation::Undo
    } else {
        Compensation::AlreadyCompensated
    })
}

/// Counted once the handler's transaction commits: a retried attempt does not count twice.
pub(crate) fn count_compensation(step: &str, kind: &'static str) {
    let step = step.to_owned();
    crate::inbox::after_commit(move || {
        metrics::counter!("saga_compensations_total", "step" => step, "kind" => kind).increment(1);
    });
}

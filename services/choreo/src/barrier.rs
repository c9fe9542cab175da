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
use sqlx::PgConnection;

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
fn count_compensation(step: &str, kind: &'static str) {
    let step = step.to_owned();
    crate::inbox::after_commit(move || {
        metrics::counter!("saga_compensations_total", "step" => step, "kind" => kind).increment(1);
    });
}

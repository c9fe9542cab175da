//! Dead letters: where the consumer parks what it cannot read ([`park`]), and
//! the API every service serves beside its own (`choreo.v1.DeadLetters`) to
//! list them and replay one through the same inbox step the consumer uses,
//! once the service can read it.
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::envelope::Envelope;
use crate::grpc::{ApiError, timestamp};
use crate::handler::{HandleError, Handler};
use crate::inbox::{self, Outcome};
use crate::proto::{self as api, dead_letters_server::DeadLetters};

pub use crate::proto::dead_letters_server::{DeadLettersServer, SERVICE_NAME};

pub struct DeadLetterApi<H> {
    pub pool: PgPool,
    pub handler: Arc<H>,
}

/// Records a message this service cannot read. Idempotent per stream sequence.
pub async fn park(
    pool: &PgPool,
    stream: &str,
    stream_seq: u64,
    subject: &str,
    reason: &str,
    raw: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO choreo_dead_letter (stream, stream_seq, subject, reason, raw) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (stream, stream_seq) DO NOTHING",
    )
    .bind(stream)
    .bind(stream_seq as i64)
    .bind(subject)
    .bind(reason)
    .bind(raw)
    .execute(pool)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    stream: String,
    stream_seq: i64,
    subject: String,
    reason: String,
    parked_at: DateTime<Utc>,
    size: i32,
    replays: i32,
}

#[derive(sqlx::FromRow)]
struct WithRaw {
    #[sqlx(flatten)]
    row: Row,
    raw: Vec<u8>,
}

impl Row {
    fn into_proto(self) -> api::DeadLetter {
        api::DeadLetter {
            id: self.id,
            stream: self.stream,
            stream_seq: self.stream_seq.max(0) as u64,
            subject: self.subject,
            reason: self.reason,
            parked_at: Some(timestamp(self.parked_at)),
            size: self.size.max(0) as u32,
            replays: self.replays.max(0) as u32,
            raw: Vec::new(),
        }
    }
}

/// Why a replay did not apply the message.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no dead letter {0}")]
    NotFound(i64),
    #[error("dead letter {id} still cannot be read: {reason}")]
    StillUnreadable { id: i64, reason: String },
    #[error(transparent)]
    Handle(#[from] HandleError),
}

/// Runs dead letter `id` through the inbox step again. Applied or found to be
/// a duplicate: the dead letter is removed. Still unreadable: kept, with the
/// new reason and one more replay counted.
pub async fn replay<H: Handler>(
    pool: &PgPool,
    handler: &H,
    id: i64,
) -> Result<Outcome, ReplayError> {
    let raw: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT raw FROM choreo_dead_letter WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(HandleError::from)?;
    let raw = raw.ok_or(ReplayError::NotFound(id))?;
    let outcome = match Envelope::from_bytes(&raw) {
        // No claims made ahead: a replay is rare, its steps ask the barrier.
        Ok(event) => inbox::apply(pool, handler, &Default::default(), &event).await?,
        Err(reject) => Outcome::Parked(reject),
    };
    match &outcome {
        Outcome::Parked(reject) => {
            let reason = reject.to_string();
            sqlx::query(
                "UPDATE choreo_dead_letter SET reason = $2, replays = replays + 1 WHERE id = $1",
            )
            .bind(id)
            .bind(&reason)
            .execute(pool)
            .await
            .map_err(HandleError::from)?;
            Err(ReplayError::StillUnreadable { id, reason })
        }
        Outcome::Applied | Outcome::Duplicate => {
            sqlx::query("DELETE FROM choreo_dead_letter WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await
                .map_err(HandleError::from)?;
            tracing::info!(dead_letter = id, ?outcome, "dead letter replayed");
            Ok(outcome)
        }
    }
}

#[tonic::async_trait]
impl<H: Handler> DeadLetters for DeadLetterApi<H> {
    async fn list_dead_letters(
        &self,
        request: Request<api::ListDeadLettersRequest>,
    ) -> Result<Response<api::ListDeadLettersResponse>, Status> {
        let limit = match request.get_ref().limit {
            0 => 100,
            n @ 1..=1000 => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "limit {n} is too large; ask for at most 1000"
                )));
            }
        };
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, stream, stream_seq, subject, reason, parked_at, length(raw) AS size, replays
             FROM choreo_dead_letter ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::from)?;
        let dead_letters = rows.into_iter().map(Row::into_proto).collect();
        Ok(Response::new(api::ListDeadLettersResponse { dead_letters }))
    }

    async fn get_dead_letter(
        &self,
        request: Request<api::GetDeadLetterRequest>,
    ) -> Result<Response<api::DeadLetter>, Status> {
        let id = request.get_ref().id;
        if id <= 0 {
            return Err(Status::invalid_argument(
                "id is required: the id of a dead letter, as ListDeadLetters gives it",
            ));
        }
        let row: Option<WithRaw> = sqlx::query_as(
            "SELECT id, stream, stream_seq, subject, reason, parked_at, length(raw) AS size, replays, raw
             FROM choreo_dead_letter WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(ApiError::from)?;
        let WithRaw { row, raw } =
            row.ok_or_else(|| ApiError::NotFound(format!("no dead letter {id}")))?;
        Ok(Response::new(api::DeadLetter {
            raw,
            ..row.into_proto()
        }))
    }

    async fn replay_dead_letter(
        &self,
        request: Request<api::ReplayDeadLetterRequest>,
    ) -> Result<Response<api::ReplayDeadLetterResponse>, Status> {
        let id = request.get_ref().id;
        if id <= 0 {
            return Err(Status::invalid_argument(
                "id is required: the id of a dead letter, as ListDeadLetters gives it",
            ));
        }
        match replay(&self.pool, self.handler.as_ref(), id).await {
            Ok(outcome) => Ok(Response::new(api::ReplayDeadLetterResponse {
                outcome: match outcome {
                    Outcome::Duplicate => "duplicate",
                    _ => "applied",
                }
                .into(),
            })),
            Err(e @ ReplayError::NotFound(_)) => Err(ApiError::NotFound(e.to_string()).into()),
            Err(e @ ReplayError::StillUnreadable { .. }) => {
                Err(ApiError::FailedPrecondition(e.to_string()).into())
            }
            Err(ReplayError::Handle(e)) => Err(ApiError::Unavailable(format!(
                "the message could not be applied now; try again: {}",
                match e {
                    HandleError::Database(_) => "database unavailable".to_owned(),
                    other => other.to_string(),
                }
            ))
            .into()),
        }
    }
}

//! Notification's gRPC API: the messages queued and sent about an order.
use choreo::grpc::{ApiError, timestamp};
use chrono::{DateTime, Utc};
use contracts::notification::v1::{self as api, notification_service_server::NotificationService};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::message::{Kind, Status as MessageStatus};

pub struct NotificationApi {
    pub pool: PgPool,
}

#[derive(sqlx::FromRow)]
struct Row {
    notification_id: Uuid,
    kind: Kind,
    recipient: String,
    channel: String,
    status: MessageStatus,
    queued_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    attempts: i32,
    last_error: Option<String>,
}

/// The API's work; the trait impl below only turns an [`ApiError`] into a status.
impl NotificationApi {
    async fn notifications(
        &self,
        request: Request<api::ListNotificationsRequest>,
    ) -> Result<Response<api::ListNotificationsResponse>, ApiError> {
        let order_id = contracts::parse_order_id(&request.get_ref().order_id)
            .map_err(ApiError::InvalidArgument)?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT notification_id, kind, recipient, channel, status, queued_at, sent_at, attempts, last_error
             FROM notifications WHERE order_id = $1 ORDER BY queued_at, notification_id",
        )
        .bind(order_id)
        .fetch_all(&self.pool)
        .await?;
        let note: Option<String> =
            sqlx::query_scalar("SELECT reason FROM notification_failures WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(&self.pool)
                .await?;
        let notifications = rows
            .into_iter()
            .map(|row| api::Notification {
                notification_id: row.notification_id.to_string(),
                order_id: order_id.to_string(),
                kind: match row.kind {
                    Kind::Confirmation => api::NotificationKind::Confirmation,
                    Kind::Cancellation => api::NotificationKind::Cancellation,
                } as i32,
                recipient: row.recipient,
                channel: row.channel,
                sent_at: row.sent_at.map(timestamp),
                status: match row.status {
                    MessageStatus::Pending => api::NotificationStatus::Pending,
                    MessageStatus::Sent => api::NotificationStatus::Sent,
                    MessageStatus::Withdrawn => api::NotificationStatus::Withdrawn,
                    MessageStatus::Failed => api::NotificationStatus::Failed,
                } as i32,
                queued_at: Some(timestamp(row.queued_at)),
                attempts: row.attempts.max(0) as u32,
                last_error: row.last_error.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(api::ListNotificationsResponse {
            notifications,
            note: note.unwrap_or_default(),
        }))
    }
}

#[tonic::async_trait]
impl NotificationService for NotificationApi {
    async fn list_notifications(
        &self,
        request: Request<api::ListNotificationsRequest>,
    ) -> Result<Response<api::ListNotificationsResponse>, Status> {
        Ok(self.notifications(request).await?)
    }
}

//! Notification's gRPC API: the messages sent about an order.
use choreo::grpc::internal;
use contracts::notification::v1::{self as api, notification_service_server::NotificationService};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub struct NotificationApi {
    pub pool: PgPool,
}

#[tonic::async_trait]
impl NotificationService for NotificationApi {
    async fn list_notifications(
        &self,
        request: Request<api::ListNotificationsRequest>,
    ) -> Result<Response<api::ListNotificationsResponse>, Status> {
        let order_id = contracts::parse_order_id(&request.get_ref().order_id)
            .map_err(Status::invalid_argument)?
            .to_string();
        let order_id = order_id.as_str();
        let rows: Vec<(Uuid, String, String, String, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as(
                "SELECT notification_id, kind, recipient, channel, sent_at FROM notifications
             WHERE order_id = $1 ORDER BY sent_at, notification_id",
            )
            .bind(order_id)
            .fetch_all(&self.pool)
            .await
            .map_err(internal)?;
        let note: Option<String> =
            sqlx::query_scalar("SELECT reason FROM notification_failures WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(internal)?;
        let notifications = rows
            .into_iter()
            .map(|(id, kind, recipient, channel, at)| api::Notification {
                notification_id: id.to_string(),
                order_id: order_id.to_owned(),
                kind: match kind.as_str() {
                    "CONFIRMATION" => api::NotificationKind::Confirmation,
                    "CANCELLATION" => api::NotificationKind::Cancellation,
                    _ => api::NotificationKind::Unspecified,
                } as i32,
                recipient,
                channel,
                sent_at: Some(prost_types::Timestamp {
                    seconds: at.timestamp(),
                    nanos: at.timestamp_subsec_nanos() as i32,
                }),
            })
            .collect();
        Ok(Response::new(api::ListNotificationsResponse {
            notifications,
            note: note.unwrap_or_default(),
        }))
    }
}

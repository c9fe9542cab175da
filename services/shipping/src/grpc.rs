//! Shipping's gRPC API: the shipment of an order.
use choreo::grpc::ApiError;
use contracts::shipping::v1::{self as api, shipping_service_server::ShippingService};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::handler::ShipmentStatus;

pub struct ShippingApi {
    pub pool: PgPool,
}

/// The API's work; the trait impl below only turns an [`ApiError`] into a status.
impl ShippingApi {
    async fn shipment(
        &self,
        request: Request<api::GetShipmentRequest>,
    ) -> Result<Response<api::Shipment>, ApiError> {
        let order_id = contracts::parse_order_id(&request.get_ref().order_id)
            .map_err(ApiError::InvalidArgument)?;
        let row: Option<(Option<Uuid>, ShipmentStatus, String, String, String)> = sqlx::query_as(
            "SELECT shipment_id, status, carrier, destination, reason FROM shipments WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((shipment_id, status, carrier, destination, reason)) = row else {
            return Err(ApiError::NotFound(format!(
                "shipping has no shipment for order {order_id}"
            )));
        };
        let status = match status {
            ShipmentStatus::Scheduled => api::ShipmentStatus::Scheduled,
            ShipmentStatus::Failed => api::ShipmentStatus::Failed,
            ShipmentStatus::Cancelled => api::ShipmentStatus::Cancelled,
            ShipmentStatus::NeverMade => api::ShipmentStatus::NeverMade,
        };
        Ok(Response::new(api::Shipment {
            order_id: order_id.to_string(),
            shipment_id: shipment_id.map(|id| id.to_string()).unwrap_or_default(),
            status: status as i32,
            carrier,
            destination,
            reason,
        }))
    }
}

#[tonic::async_trait]
impl ShippingService for ShippingApi {
    async fn get_shipment(
        &self,
        request: Request<api::GetShipmentRequest>,
    ) -> Result<Response<api::Shipment>, Status> {
        Ok(self.shipment(request).await?)
    }
}

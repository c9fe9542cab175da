//! Shipping's gRPC API: the shipment of an order.
use choreo::grpc::internal;
use contracts::shipping::v1::{self as api, shipping_service_server::ShippingService};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub struct ShippingApi {
    pub pool: PgPool,
}

#[tonic::async_trait]
impl ShippingService for ShippingApi {
    async fn get_shipment(
        &self,
        request: Request<api::GetShipmentRequest>,
    ) -> Result<Response<api::Shipment>, Status> {
        let order_id = contracts::parse_order_id(&request.get_ref().order_id)
            .map_err(Status::invalid_argument)?
            .to_string();
        let order_id = order_id.as_str();
        let row: Option<(Option<Uuid>, String, String, String, String)> = sqlx::query_as(
            "SELECT shipment_id, status, carrier, destination, reason FROM shipments WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(internal)?;
        let Some((shipment_id, status, carrier, destination, reason)) = row else {
            return Err(Status::not_found(format!(
                "shipping has no shipment for order {order_id}"
            )));
        };
        let status = match status.as_str() {
            "SCHEDULED" => api::ShipmentStatus::Scheduled,
            "FAILED" => api::ShipmentStatus::Failed,
            "CANCELLED" => api::ShipmentStatus::Cancelled,
            "NEVER_MADE" => api::ShipmentStatus::NeverMade,
            _ => api::ShipmentStatus::Unspecified,
        };
        Ok(Response::new(api::Shipment {
            order_id: order_id.to_owned(),
            shipment_id: shipment_id.map(|id| id.to_string()).unwrap_or_default(),
            status: status as i32,
            carrier,
            destination,
            reason,
        }))
    }
}

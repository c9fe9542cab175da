//! Inventory's gRPC API: stock levels (read and, for admins, set) and the
//! reservation of an order.
use choreo::grpc::ApiError;
use contracts::inventory::v1::{self as api, inventory_service_server::InventoryService};
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::handler::ReservationStatus;

pub struct InventoryApi {
    pub pool: PgPool,
}

/// Above this a stock level is surely a typo.
const MAX_STOCK: u64 = 1_000_000_000;

fn stock((sku, available, reserved): (String, i64, i64)) -> api::Stock {
    api::Stock {
        sku,
        available: available as u64,
        reserved: reserved as u64,
    }
}

fn reservation_status(status: ReservationStatus) -> api::ReservationStatus {
    match status {
        ReservationStatus::Held => api::ReservationStatus::Held,
        ReservationStatus::Rejected => api::ReservationStatus::Rejected,
        ReservationStatus::Released => api::ReservationStatus::Released,
        ReservationStatus::NeverMade => api::ReservationStatus::NeverMade,
    }
}

/// The API's work; the trait impl below only turns an [`ApiError`] into a status.
impl InventoryApi {
    async fn set(
        &self,
        request: Request<api::SetStockRequest>,
    ) -> Result<Response<api::Stock>, ApiError> {
        let request = request.into_inner();
        let sku = request.sku.trim();
        contracts::check_sku(sku).map_err(ApiError::InvalidArgument)?;
        if request.available > MAX_STOCK {
            return Err(ApiError::InvalidArgument(format!(
                "available {} is out of range: at most {MAX_STOCK}",
                request.available
            )));
        }
        let row: (String, i64, i64) = sqlx::query_as(
            "INSERT INTO stock (sku, available) VALUES ($1, $2)
             ON CONFLICT (sku) DO UPDATE SET available = $2 RETURNING sku, available, reserved",
        )
        .bind(sku)
        .bind(request.available as i64)
        .fetch_one(&self.pool)
        .await?;
        tracing::info!(sku, available = request.available, "stock set");
        Ok(Response::new(stock(row)))
    }

    async fn stock_of(
        &self,
        request: Request<api::GetStockRequest>,
    ) -> Result<Response<api::Stock>, ApiError> {
        let sku = request.get_ref().sku.trim();
        contracts::check_sku(sku).map_err(ApiError::InvalidArgument)?;
        let row: Option<(String, i64, i64)> =
            sqlx::query_as("SELECT sku, available, reserved FROM stock WHERE sku = $1")
                .bind(sku)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| Response::new(stock(r))).ok_or_else(|| {
            ApiError::NotFound(format!("no SKU {sku} in stock; SetStock creates it"))
        })
    }

    async fn all_stock(
        &self,
        _request: Request<api::ListStockRequest>,
    ) -> Result<Response<api::ListStockResponse>, ApiError> {
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT sku, available, reserved FROM stock ORDER BY sku")
                .fetch_all(&self.pool)
                .await?;
        Ok(Response::new(api::ListStockResponse {
            items: rows.into_iter().map(stock).collect(),
        }))
    }

    async fn reservation(
        &self,
        request: Request<api::GetReservationRequest>,
    ) -> Result<Response<api::Reservation>, ApiError> {
        let order_id = contracts::parse_order_id(&request.get_ref().order_id)
            .map_err(ApiError::InvalidArgument)?;
        let head: Option<(ReservationStatus, String)> =
            sqlx::query_as("SELECT status, reason FROM reservations WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(&self.pool)
                .await?;
        let Some((status, reason)) = head else {
            return Err(ApiError::NotFound(format!(
                "inventory has no reservation for order {order_id}"
            )));
        };
        let lines: Vec<(String, i64)> = sqlx::query_as(
            "SELECT sku, quantity FROM reservation_lines WHERE order_id = $1 ORDER BY sku",
        )
        .bind(order_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Response::new(api::Reservation {
            order_id: order_id.to_string(),
            status: reservation_status(status) as i32,
            lines: lines
                .into_iter()
                .map(|(sku, quantity)| api::ReservationLine {
                    sku,
                    quantity: quantity as u32,
                })
                .collect(),
            reason,
        }))
    }
}

#[tonic::async_trait]
impl InventoryService for InventoryApi {
    async fn set_stock(
        &self,
        request: Request<api::SetStockRequest>,
    ) -> Result<Response<api::Stock>, Status> {
        Ok(self.set(request).await?)
    }

    async fn get_stock(
        &self,
        request: Request<api::GetStockRequest>,
    ) -> Result<Response<api::Stock>, Status> {
        Ok(self.stock_of(request).await?)
    }

    async fn list_stock(
        &self,
        request: Request<api::ListStockRequest>,
    ) -> Result<Response<api::ListStockResponse>, Status> {
        Ok(self.all_stock(request).await?)
    }

    async fn get_reservation(
        &self,
        request: Request<api::GetReservationRequest>,
    ) -> Result<Response<api::Reservation>, Status> {
        Ok(self.reservation(request).await?)
    }
}

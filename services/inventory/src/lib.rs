//! The inventory service: holds stock for orders and gives it back when an
//! order is compensated.
pub mod grpc;
pub mod handler;

use std::sync::Arc;

use choreo::runtime::{Context, Parts};
use contracts::inventory::v1::inventory_service_server::{InventoryServiceServer, SERVICE_NAME};

pub fn parts(context: &Context) -> Parts<handler::InventoryHandler> {
    Parts {
        handler: Arc::new(handler::InventoryHandler {
            outbox: context.outbox.clone(),
            config: context.config.clone(),
        }),
        routes: tonic::service::Routes::new(InventoryServiceServer::new(grpc::InventoryApi {
            pool: context.api_pool.clone(),
        })),
        service_names: vec![SERVICE_NAME],
        descriptor: contracts::DESCRIPTOR_SET,
        admin_methods: vec!["/inventory.v1.InventoryService/SetStock"],
        // It keeps no personal data.
        erasures: vec![],
    }
}

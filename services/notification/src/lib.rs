//! The notification service: tells customers their order is on its way, and
//! takes it back when the order is compensated.
pub mod grpc;
pub mod handler;
pub mod sender;

use std::sync::Arc;

use choreo::runtime::{Context, Parts};
use contracts::notification::v1::notification_service_server::{
    NotificationServiceServer, SERVICE_NAME,
};

pub fn parts(context: &Context) -> Parts {
    Parts {
        handler: Arc::new(handler::NotificationHandler {
            outbox: context.outbox.clone(),
            config: context.config.clone(),
            sender: Arc::new(sender::LogSender),
        }),
        routes: tonic::service::Routes::new(NotificationServiceServer::new(
            grpc::NotificationApi {
                pool: context.pool.clone(),
            },
        )),
        service_names: vec![SERVICE_NAME],
        descriptor: contracts::DESCRIPTOR_SET,
    }
}

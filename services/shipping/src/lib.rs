//! The shipping service: schedules a shipment for each reserved order and
//! cancels it when the order is compensated.
pub mod grpc;
pub mod handler;

use std::sync::Arc;

use choreo::runtime::{Context, Parts};
use contracts::shipping::v1::shipping_service_server::{SERVICE_NAME, ShippingServiceServer};

/// Shipping's business settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Rules {
    /// The carrier's name, shown on shipments.
    #[arg(long, env = "CARRIER", default_value = "Parcelo")]
    pub carrier: String,
    /// Country codes the carrier delivers to, comma separated.
    #[arg(
        long,
        env = "SERVED_DESTINATIONS",
        value_delimiter = ',',
        default_value = "US,CA,MX,GB,IE,FR,DE,NL,BE,LU,ES,PT,IT,AT,CH,DK,SE,NO,FI,PL,CZ,JP,AU,NZ"
    )]
    pub served_destinations: Vec<String>,
}

pub fn parts(context: &Context, rules: Rules) -> Parts<handler::ShippingHandler> {
    Parts {
        handler: Arc::new(handler::ShippingHandler {
            outbox: context.outbox.clone(),
            config: context.config.clone(),
            carrier: rules.carrier,
            served: rules
                .served_destinations
                .iter()
                .map(|d| d.trim().to_ascii_uppercase())
                .collect(),
        }),
        routes: tonic::service::Routes::new(ShippingServiceServer::new(grpc::ShippingApi {
            pool: context.api_pool.clone(),
        })),
        service_names: vec![SERVICE_NAME],
        descriptor: contracts::DESCRIPTOR_SET,
        admin_methods: vec![],
        // It keeps no personal data.
        erasures: vec![],
    }
}

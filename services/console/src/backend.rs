//! The console's only source of truth: the four services' gRPC APIs (with
//! the client token for what a client may do, the admin token for the rest)
//! and their metrics endpoints. Nothing is kept here.
use std::time::Duration;

use choreo::auth::Bearer;
use choreo::proto::dead_letters_client::DeadLettersClient;
use contracts::inventory::v1::inventory_service_client::InventoryServiceClient;
use contracts::notification::v1::notification_service_client::NotificationServiceClient;
use contracts::order::v1::order_service_client::OrderServiceClient;
use contracts::shipping::v1::shipping_service_client::ShippingServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::Config;

/// A connection that sends one token with every call.
pub type Conn = InterceptedService<Channel, Bearer>;

/// One service as the console reaches it.
#[derive(Clone)]
pub struct Service {
    pub name: &'static str,
    pub dead_letters: DeadLettersClient<Conn>,
    /// Its Prometheus endpoint, if one is configured.
    pub metrics_url: Option<String>,
}

#[derive(Clone)]
pub struct Backend {
    pub order: OrderServiceClient<Conn>,
    pub inventory: InventoryServiceClient<Conn>,
    /// Inventory with the admin token, for stock changes.
    pub inventory_admin: InventoryServiceClient<Conn>,
    pub shipping: ShippingServiceClient<Conn>,
    pub notification: NotificationServiceClient<Conn>,
    /// Every service, in the saga's lane order, with the admin token.
    pub services: Vec<Service>,
    /// Why admin actions cannot work, when the console has no admin token
    /// but the services ask for tokens.
    pub admin_missing: Option<&'static str>,
}

/// A channel that connects on first use (and again after a service restarts),
/// so the console starts, and shows what is down, whatever runs.
fn channel(addr: &str, ca: Option<&[u8]>) -> anyhow::Result<Channel> {
    Ok(choreo::grpc::endpoint(addr, ca)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy())
}

impl Backend {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let ca = match &config.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("reading SAGA_CA_CERT {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let ca = ca.as_deref();
        let client = Bearer::new(config.client_token.as_deref())?;
        // Without an admin token, admin calls go with the client token and the
        // services answer PERMISSION_DENIED, which the pages show.
        let admin = Bearer::new(
            config
                .admin_token
                .as_deref()
                .or(config.client_token.as_deref()),
        )?;
        let admin_missing = (config.admin_token.is_none() && config.client_token.is_some())
            .then_some(
                "the console has no ADMIN_TOKEN: dead letters, replay and stock changes need it",
            );
        let order = channel(&config.order_addr, ca)?;
        let inventory = channel(&config.inventory_addr, ca)?;
        let shipping = channel(&config.shipping_addr, ca)?;
        let notification = channel(&config.notification_addr, ca)?;
        let with = |channel: &Channel, bearer: &Bearer| {
            InterceptedService::new(channel.clone(), bearer.clone())
        };
        let metrics = |url: &str| (!url.is_empty()).then(|| url.to_owned());
        let services = [
            ("order", &order, &config.order_metrics),
            ("inventory", &inventory, &config.inventory_metrics),
            ("shipping", &shipping, &config.shipping_metrics),
            ("notification", &notification, &config.notification_metrics),
        ]
        .into_iter()
        .map(|(name, channel, url)| Service {
            name,
            dead_letters: DeadLettersClient::new(with(channel, &admin)),
            metrics_url: metrics(url),
        })
        .collect();
        Ok(Backend {
            order: OrderServiceClient::new(with(&order, &client)),
            inventory: InventoryServiceClient::new(with(&inventory, &client)),
            inventory_admin: InventoryServiceClient::new(with(&inventory, &admin)),
            shipping: ShippingServiceClient::new(with(&shipping, &client)),
            notification: NotificationServiceClient::new(with(&notification, &client)),
            services,
            admin_missing,
        })
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// A gRPC error as a person reads it: what failed, and the service's own words.
pub fn explain(what: &str, status: &tonic::Status) -> String {
    use tonic::Code;
    let hint = match status.code() {
        Code::Unavailable | Code::DeadlineExceeded => " (is the service running?)",
        Code::Unauthenticated => " (check the console's CLIENT_TOKEN / ADMIN_TOKEN)",
        Code::PermissionDenied => " (this needs the console's ADMIN_TOKEN)",
        _ => "",
    };
    format!("{what}: {}{hint}", status.message())
}

//! sagactl: a command-line client of the order saga's gRPC APIs, for people
//! who would rather not write gRPC calls.
use std::time::Duration;

use anyhow::Context as _;
use choreo::auth::Bearer;
use choreo::proto::dead_letters_client::DeadLettersClient;
use clap::{Parser, Subcommand};
use contracts::inventory::v1::{
    self as inventory, inventory_service_client::InventoryServiceClient,
};
use contracts::notification::v1::{
    self as notification, notification_service_client::NotificationServiceClient,
};
use contracts::order::v1::{self as order, order_service_client::OrderServiceClient};
use contracts::shipping::v1::{self as shipping, shipping_service_client::ShippingServiceClient};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "Place, read, list, cancel and watch orders; read and set stock")]
struct Cli {
    #[command(flatten)]
    addrs: Addrs,
    #[command(subcommand)]
    command: Command,
}

/// Where each service's gRPC API listens.
#[derive(clap::Args)]
struct Addrs {
    #[arg(
        long,
        env = "ORDER_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    order_addr: String,
    #[arg(
        long,
        env = "INVENTORY_ADDR",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    inventory_addr: String,
    #[arg(
        long,
        env = "SHIPPING_ADDR",
        default_value = "http://127.0.0.1:50053",
        global = true
    )]
    shipping_addr: String,
    #[arg(
        long,
        env = "NOTIFICATION_ADDR",
        default_value = "http://127.0.0.1:50054",
        global = true
    )]
    notification_addr: String,
    /// Bearer token for services that ask for one: the client token, or the
    /// admin token for set-stock, dead-letters and replay.
    #[arg(long, env = "SAGA_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// PEM certificate authority to trust for `https://` addresses.
    #[arg(long, env = "SAGA_CA_CERT", global = true)]
    ca_cert: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Place an order: sagactl place --customer ada --destination DE --contact ada@example.com --item BOOK=2
    Place {
        #[arg(long)]
        customer: String,
        #[arg(long)]
        destination: String,
        #[arg(long, default_value = "")]
        contact: String,
        /// SKU=QUANTITY, repeatable.
        #[arg(long = "item", required = true)]
        items: Vec<String>,
        /// Reuse a key to retry safely; a fresh one is made when omitted.
        #[arg(long)]
        key: Option<String>,
    },
    /// The whole story of one order, timeline included.
    Get { order_id: String },
    /// Orders, newest first.
    List {
        /// pending, reserved, scheduled, completed, cancelling or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
        /// Only orders whose saga is stuck on a step that keeps failing.
        #[arg(long)]
        stuck: bool,
        /// Only this customer's orders (exactly as placed).
        #[arg(long, default_value = "")]
        customer: String,
    },
    /// Cancel an order that is not complete yet.
    Cancel {
        order_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Print each status change of an order until it ends.
    Watch { order_id: String },
    /// Stock of one SKU, or of every SKU.
    Stock { sku: Option<String> },
    /// Set the units available for a SKU.
    SetStock { sku: String, available: u64 },
    /// What inventory, shipping and notification each hold for an order.
    Effects { order_id: String },
    /// Messages a service's consumer could not read and parked, with the reason.
    DeadLetters {
        /// order, inventory, shipping or notification.
        service: String,
    },
    /// Run a parked message through the service's inbox step again (after a
    /// deploy taught it to read it); still unreadable keeps it parked.
    Replay { service: String, id: i64 },
    /// Create or update the JetStream stream and every service's consumer
    /// from the choreography (the setup step; needs the NATS admin login).
    Provision(ProvisionArgs),
    /// Exit 0 when the gRPC server at --addr reports SERVING (for container healthchecks).
    Health {
        #[arg(long)]
        addr: String,
    },
}

/// Where and as whom to provision; what is not given keeps the services' defaults.
#[derive(clap::Args, Debug)]
struct ProvisionArgs {
    #[arg(long, env = "NATS_URL")]
    nats_url: Option<String>,
    #[arg(long, env = "NATS_USER", default_value = choreo::broker_access::ADMIN_USER)]
    nats_user: String,
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    #[arg(long, env = "NATS_PASSWORD_FILE")]
    nats_password_file: Option<std::path::PathBuf>,
    #[arg(long, env = "STREAM")]
    stream: Option<String>,
    #[arg(long, env = "SUBJECT_PREFIX")]
    subject_prefix: Option<String>,
    #[arg(long, env = "STREAM_REPLICAS")]
    stream_replicas: Option<usize>,
    #[arg(long, env = "ACK_WAIT_SECS")]
    ack_wait_secs: Option<u64>,
    #[arg(long, env = "MAX_ACK_PENDING")]
    max_ack_pending: Option<i64>,
}

async fn provision(args: ProvisionArgs) -> anyhow::Result<()> {
    let mut config = choreo::Config::defaults();
    config.nats_url = args.nats_url.unwrap_or(config.nats_url);
    config.nats_user = Some(args.nats_user);
    config.nats_password = args.nats_password;
    config.nats_password_file = args.nats_password_file;
    config.stream = args.stream.unwrap_or(config.stream);
    config.subject_prefix = args.subject_prefix.unwrap_or(config.subject_prefix);
    config.stream_replicas = args.stream_replicas.unwrap_or(config.stream_replicas);
    config.ack_wait_secs = args.ack_wait_secs.unwrap_or(config.ack_wait_secs);
    config.max_ack_pending = args.max_ack_pending.unwrap_or(config.max_ack_pending);
    let consumers = choreo::provision::setup(&config, &contracts::CHOREOGRAPHY).await?;
    for stream in choreo::provision::streams(
        &contracts::CHOREOGRAPHY,
        &config.stream,
        &config.subject_prefix,
    ) {
        println!("stream {}: {}", stream.name, stream.subjects.join(" "));
    }
    for consumer in consumers {
        println!("consumer {consumer}");
    }
    Ok(())
}

impl Addrs {
    /// A connection to `addr` that sends the token, if one was given.
    async fn connect(&self, addr: &str) -> anyhow::Result<InterceptedService<Channel, Bearer>> {
        let bearer = Bearer::new(self.token.as_deref())?;
        Ok(InterceptedService::new(self.channel(addr).await?, bearer))
    }

    /// A channel to `addr`, over TLS for `https://` (trusting --ca-cert).
    async fn channel(&self, addr: &str) -> anyhow::Result<Channel> {
        let ca = match &self.ca_cert {
            Some(path) => {
                Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
            }
            None => None,
        };
        choreo::grpc::endpoint(addr, ca.as_deref())?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .with_context(|| format!("cannot reach {addr}"))
    }

    /// The gRPC address of a service by its name.
    fn service_addr(&self, service: &str) -> anyhow::Result<&str> {
        Ok(match service {
            "order" => &self.order_addr,
            "inventory" => &self.inventory_addr,
            "shipping" => &self.shipping_addr,
            "notification" => &self.notification_addr,
            other => anyhow::bail!(
                "no service {other:?}: say order, inventory, shipping or notification"
            ),
        })
    }
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

fn status_name(status: i32) -> &'static str {
    order::OrderStatus::try_from(status)
        .map(|s| s.as_str_name().trim_start_matches("ORDER_STATUS_"))
        .unwrap_or("?")
}

fn print_order(o: &order::Order) {
    println!("order       {}", o.order_id);
    println!("status      {}", status_name(o.status));
    if !o.reason.is_empty() {
        println!("reason      {}", o.reason);
    }
    if !o.stuck.is_empty() {
        println!("STUCK       {}", o.stuck);
    }
    println!(
        "customer    {} <{}> to {}",
        o.customer, o.contact, o.destination
    );
    let items: Vec<String> = o
        .items
        .iter()
        .map(|i| format!("{} x{}", i.sku, i.quantity))
        .collect();
    println!("items       {}", items.join(", "));
    if !o.timeline.is_empty() {
        println!("timeline");
        for e in &o.timeline {
            println!(
                "  {}  {:<24} {:<13} {}",
                time(&e.occurred_at),
                e.event_type,
                e.producer,
                e.detail
            );
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::DeadLetters { service } => dead_letters(&cli.addrs, &service).await,
        Command::Replay { service, id } => replay(&cli.addrs, &service, id).await,
        Command::Health { addr } => health(&cli.addrs, addr).await,
        Command::Provision(args) => provision(args).await,
        Command::Place {
            customer,
            destination,
            contact,
            items,
            key,
        } => place(&cli.addrs, customer, destination, contact, items, key).await,
        Command::Get { order_id } => get(&cli.addrs, order_id).await,
        Command::List {
            status,
            page_size,
            page_token,
            stuck,
            customer,
        } => {
            let filter = order::ListOrdersRequest {
                page_size,
                page_token,
                stuck_only: stuck,
                customer,
                ..Default::default()
            };
            list(&cli.addrs, status, filter).await
        }
        Command::Cancel { order_id, reason } => cancel(&cli.addrs, order_id, reason).await,
        Command::Watch { order_id } => watch(&cli.addrs, order_id).await,
        Command::Stock { sku } => stock(&cli.addrs, sku).await,
        Command::SetStock { sku, available } => set_stock(&cli.addrs, sku, available).await,
        Command::Effects { order_id } => effects(&cli.addrs, order_id).await,
    }
}

async fn dead_letters(addrs: &Addrs, service: &str) -> anyhow::Result<()> {
    let addr = addrs.service_addr(service)?;
    let parked = DeadLettersClient::new(addrs.connect(addr).await?)
        .list_dead_letters(choreo::proto::ListDeadLettersRequest { limit: 0 })
        .await?
        .into_inner()
        .dead_letters;
    if parked.is_empty() {
        println!("{service}: no dead letters");
    }
    for d in &parked {
        println!(
            "{:>6}  {}  {} #{}  {} bytes  {}{}",
            d.id,
            time(&d.parked_at),
            d.subject,
            d.stream_seq,
            d.size,
            d.reason,
            if d.replays > 0 {
                format!(" (replayed {} times)", d.replays)
            } else {
                String::new()
            }
        );
    }

    Ok(())
}

async fn replay(addrs: &Addrs, service: &str, id: i64) -> anyhow::Result<()> {
    let addr = addrs.service_addr(service)?;
    let replayed = DeadLettersClient::new(addrs.connect(addr).await?)
        .replay_dead_letter(choreo::proto::ReplayDeadLetterRequest { id })
        .await?
        .into_inner();
    println!("dead letter {id}: {}", replayed.outcome);

    Ok(())
}

async fn health(addrs: &Addrs, addr: String) -> anyhow::Result<()> {
    let status = tonic_health::pb::health_client::HealthClient::new(addrs.channel(&addr).await?)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?
        .into_inner()
        .status();
    anyhow::ensure!(
        status == tonic_health::pb::health_check_response::ServingStatus::Serving,
        "{addr} reports {status:?}"
    );
    println!("{addr}: SERVING");

    Ok(())
}

async fn place(
    addrs: &Addrs,
    customer: String,
    destination: String,
    contact: String,
    items: Vec<String>,
    key: Option<String>,
) -> anyhow::Result<()> {
    let items = items
        .iter()
        .map(|item| {
            let (sku, quantity) = item
                .split_once('=')
                .with_context(|| format!("item {item:?} should be SKU=QUANTITY"))?;
            Ok(order::OrderItem {
                sku: sku.to_owned(),
                quantity: quantity
                    .parse()
                    .with_context(|| format!("quantity in {item:?}"))?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key = key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let placed = OrderServiceClient::new(addrs.connect(&addrs.order_addr).await?)
        .place_order(order::PlaceOrderRequest {
            customer,
            destination,
            items,
            idempotency_key: key.clone(),
            contact,
        })
        .await?
        .into_inner();
    println!(
        "{} (idempotency key {key})",
        if placed.created {
            "placed"
        } else {
            "already placed"
        }
    );
    if let Some(o) = placed.order {
        print_order(&o);
    }

    Ok(())
}

async fn get(addrs: &Addrs, order_id: String) -> anyhow::Result<()> {
    let o = OrderServiceClient::new(addrs.connect(&addrs.order_addr).await?)
        .get_order(order::GetOrderRequest { order_id })
        .await?
        .into_inner();
    print_order(&o);

    Ok(())
}

async fn list(
    addrs: &Addrs,
    status: Option<String>,
    filter: order::ListOrdersRequest,
) -> anyhow::Result<()> {
    let status = match status {
        None => order::OrderStatus::Unspecified,
        Some(s) => order::OrderStatus::from_str_name(&format!("ORDER_STATUS_{}", s.to_uppercase()))
            .with_context(|| format!("unknown status {s:?}"))?,
    };
    let page = OrderServiceClient::new(addrs.connect(&addrs.order_addr).await?)
        .list_orders(order::ListOrdersRequest {
            status: status as i32,
            ..filter
        })
        .await?
        .into_inner();
    for o in &page.orders {
        println!(
            "{}  {:<10}  {:<10}  {}",
            o.order_id,
            status_name(o.status),
            o.customer,
            o.reason
        );
    }
    if !page.next_page_token.is_empty() {
        println!("next page: --page-token {}", page.next_page_token);
    }

    Ok(())
}

async fn cancel(addrs: &Addrs, order_id: String, reason: String) -> anyhow::Result<()> {
    let o = OrderServiceClient::new(addrs.connect(&addrs.order_addr).await?)
        .cancel_order(order::CancelOrderRequest { order_id, reason })
        .await?
        .into_inner();
    print_order(&o);

    Ok(())
}

async fn watch(addrs: &Addrs, order_id: String) -> anyhow::Result<()> {
    let mut changes = OrderServiceClient::new(addrs.connect(&addrs.order_addr).await?)
        .watch_order(order::WatchOrderRequest { order_id })
        .await?
        .into_inner();
    while let Some(change) = changes.next().await {
        let change = change?;
        println!(
            "{}  #{}  {:<10}  {}",
            time(&change.at),
            change.sequence,
            status_name(change.status),
            change.reason
        );
    }

    Ok(())
}

async fn stock(addrs: &Addrs, sku: Option<String>) -> anyhow::Result<()> {
    let mut client = InventoryServiceClient::new(addrs.connect(&addrs.inventory_addr).await?);
    let items = match sku {
        Some(sku) => vec![
            client
                .get_stock(inventory::GetStockRequest { sku })
                .await?
                .into_inner(),
        ],
        None => {
            client
                .list_stock(inventory::ListStockRequest {})
                .await?
                .into_inner()
                .items
        }
    };
    println!("{:<16} {:>10} {:>10}", "SKU", "available", "reserved");
    for s in items {
        println!("{:<16} {:>10} {:>10}", s.sku, s.available, s.reserved);
    }

    Ok(())
}

async fn set_stock(addrs: &Addrs, sku: String, available: u64) -> anyhow::Result<()> {
    let s = InventoryServiceClient::new(addrs.connect(&addrs.inventory_addr).await?)
        .set_stock(inventory::SetStockRequest { sku, available })
        .await?
        .into_inner();
    println!(
        "{}: {} available, {} reserved",
        s.sku, s.available, s.reserved
    );

    Ok(())
}

async fn effects(addrs: &Addrs, order_id: String) -> anyhow::Result<()> {
    match InventoryServiceClient::new(addrs.connect(&addrs.inventory_addr).await?)
        .get_reservation(inventory::GetReservationRequest {
            order_id: order_id.clone(),
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let lines: Vec<String> = r
                .lines
                .iter()
                .map(|l| format!("{} x{}", l.sku, l.quantity))
                .collect();
            println!(
                "inventory     {:?} {} {}",
                r.status(),
                lines.join(", "),
                r.reason
            );
        }
        Err(e) => println!("inventory     {}", e.message()),
    }
    match ShippingServiceClient::new(addrs.connect(&addrs.shipping_addr).await?)
        .get_shipment(shipping::GetShipmentRequest {
            order_id: order_id.clone(),
        })
        .await
    {
        Ok(s) => {
            let s = s.into_inner();
            println!(
                "shipping      {:?} {} {} {}",
                s.status(),
                s.shipment_id,
                s.destination,
                s.reason
            );
        }
        Err(e) => println!("shipping      {}", e.message()),
    }
    let n = NotificationServiceClient::new(addrs.connect(&addrs.notification_addr).await?)
        .list_notifications(notification::ListNotificationsRequest { order_id })
        .await?
        .into_inner();
    for m in &n.notifications {
        let when = match m.status() {
            notification::NotificationStatus::Sent => format!("at {}", time(&m.sent_at)),
            notification::NotificationStatus::Pending => {
                format!("queued at {}, {} attempts", time(&m.queued_at), m.attempts)
            }
            _ => format!("queued at {}", time(&m.queued_at)),
        };
        let error = if m.last_error.is_empty() {
            String::new()
        } else {
            format!(" ({})", m.last_error)
        };
        println!(
            "notification  {:?} {:?} to {} by {} {when}{error}",
            m.kind(),
            m.status(),
            m.recipient,
            m.channel,
        );
    }
    if n.notifications.is_empty() {
        println!("notification  none {}", n.note);
    } else if !n.note.is_empty() {
        println!("notification  {}", n.note);
    }

    Ok(())
}

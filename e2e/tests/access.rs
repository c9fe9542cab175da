//! Who may call what: with tokens configured, an anonymous call is refused, a
//! client token cannot do an admin's work, and nothing is written by a
//! refused call. A service will not serve an open API off loopback.
use contracts::inventory::v1::{
    self as inventory, inventory_service_client::InventoryServiceClient,
};
use contracts::order::v1::{self as order, order_service_client::OrderServiceClient};
use e2e::{Options, system};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const CLIENT: &str = "client-token-for-tests";
const ADMIN: &str = "admin-token-for-tests";

async fn channel(port: u16) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn with(
    channel: Channel,
    token: Option<&str>,
) -> InterceptedService<Channel, choreo::auth::Bearer> {
    InterceptedService::new(channel, choreo::auth::Bearer::new(token).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_open_their_roles_calls_and_refused_calls_write_nothing() {
    let sys = system(Options {
        extra_env: vec![
            ("CLIENT_TOKEN".into(), CLIENT.into()),
            ("ADMIN_TOKEN".into(), ADMIN.into()),
        ],
        ..Options::default()
    })
    .await;
    // The harness's own clients carry the admin token.
    sys.set_stock("BOOK", 7).await.unwrap();

    let orders = channel(sys.ports[0]).await;
    let list = order::ListOrdersRequest::default();
    let anonymous = OrderServiceClient::new(with(orders.clone(), None))
        .list_orders(list.clone())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    let wrong = OrderServiceClient::new(with(orders.clone(), Some("guess")))
        .list_orders(list.clone())
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    OrderServiceClient::new(with(orders, Some(CLIENT)))
        .list_orders(list)
        .await
        .expect("a client may list orders");

    let stock = channel(sys.ports[1]).await;
    let mut as_client = InventoryServiceClient::new(with(stock.clone(), Some(CLIENT)));
    let set = inventory::SetStockRequest {
        sku: "BOOK".into(),
        available: 1_000,
    };
    let denied = as_client.set_stock(set.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let anonymous = InventoryServiceClient::new(with(stock.clone(), None))
        .set_stock(set)
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let book = as_client
        .get_stock(inventory::GetStockRequest { sku: "BOOK".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(book.available, 7, "a refused SetStock changed nothing");

    let dead_letters = choreo::proto::dead_letters_client::DeadLettersClient::new(with(
        stock.clone(),
        Some(CLIENT),
    ))
    .list_dead_letters(choreo::proto::ListDeadLettersRequest { limit: 10 })
    .await
    .unwrap_err();
    assert_eq!(dead_letters.code(), Code::PermissionDenied);
    choreo::proto::dead_letters_client::DeadLettersClient::new(with(stock.clone(), Some(ADMIN)))
        .list_dead_letters(choreo::proto::ListDeadLettersRequest { limit: 10 })
        .await
        .expect("the admin reads dead letters");

    // Health stays open for probes.
    tonic_health::pb::health_client::HealthClient::new(stock)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no token");
}

#[test]
fn an_open_api_off_loopback_is_refused_at_start() {
    let started = std::time::Instant::now();
    let out = std::process::Command::new(harness::bin_dir().join("inventory"))
        .env_clear()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/unused")
        .env("GRPC_ADDR", "0.0.0.0:1")
        .env(
            "METRICS_ADDR",
            format!("127.0.0.1:{}", harness::free_port()),
        )
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("refusing to serve the gRPC API on 0.0.0.0:1 without tokens"),
        "{said}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_the_api_speaks_tls_and_nothing_else() {
    // The harness's clients reach every service over TLS, trusting its certificate.
    let sys = system(Options {
        tls: true,
        ..Options::default()
    })
    .await;
    sys.set_stock("BOOK", 3).await.unwrap();
    assert_eq!(sys.stock("BOOK").await.unwrap().available, 3);
    let health = |channel| async move {
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
    };

    // In clear, the same port answers nothing.
    let plain =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", sys.ports[0]))
            .unwrap()
            .connect()
            .await;
    if let Ok(channel) = plain {
        assert!(health(channel).await.is_err(), "plaintext is not served");
    }

    // A client that does not trust the certificate refuses the server.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let untrusted = choreo::grpc::endpoint(&sys.grpc_url(0), Some(other.cert.pem().as_bytes()))
        .unwrap()
        .connect()
        .await;
    assert!(
        untrusted.is_err(),
        "a certificate from elsewhere is refused"
    );

    // sagactl speaks TLS with --ca-cert.
    let cert = sys.logs.join("tls-cert.pem");
    let out = std::process::Command::new(harness::bin_dir().join("sagactl"))
        .arg("--ca-cert")
        .arg(&cert)
        .args(["--inventory-addr", &sys.grpc_url(1), "stock", "BOOK"])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("BOOK"), "{said}");
    let without = std::process::Command::new(harness::bin_dir().join("sagactl"))
        .args(["--inventory-addr", &sys.grpc_url(1), "stock", "BOOK"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&without.stderr);
    assert!(!without.status.success());
    assert!(said.contains("--ca-cert"), "{said}");
}

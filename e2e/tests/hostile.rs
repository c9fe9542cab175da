//! Requests as an attacker would send them: control characters, huge values,
//! and asking a port what else it serves. Each gets a clear status and writes
//! nothing.
use e2e::{Options, OrderStatus, SERVICES, SETTLE, new_key, order_request, system};
use futures::StreamExt;
use tonic::Code;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_and_huge_values_get_invalid_argument_with_a_short_message() {
    let sys = system(Options::default()).await;
    sys.set_stock("BOOK", 10).await.unwrap();
    let mut order = sys.clients.order.clone();

    for (customer, contact) in [
        ("ada\0", "ada@example.com"),
        ("ada", "ada@exa\u{7}mple.com"),
    ] {
        let refused = order
            .place_order(order_request(
                &new_key(),
                customer,
                "DE",
                contact,
                &[("BOOK", 1)],
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains("control character"),
            "{}",
            refused.message()
        );
    }

    let huge = "X".repeat(1 << 20);
    let refused = order
        .place_order(order_request(
            &new_key(),
            "ada",
            "DE",
            "",
            &[(huge.as_str(), 1)],
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().len() < 200,
        "{} bytes",
        refused.message().len()
    );
    assert!(
        refused.message().contains("(1048576 bytes)"),
        "{}",
        refused.message()
    );
    let refused = order
        .get_order(contracts::order::v1::GetOrderRequest {
            order_id: huge.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().len() < 200);

    // A cancel with a NUL in its reason is refused, and the order is untouched.
    let placed = sys.place_one("BOOK").await.unwrap();
    let refused = order
        .cancel_order(contracts::order::v1::CancelOrderRequest {
            order_id: placed.order_id.clone(),
            reason: "changed\0my mind".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let done = sys.wait_terminal(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(done.status(), OrderStatus::Completed, "{}", done.reason);
    assert_eq!(sys.stock("BOOK").await.unwrap().reserved, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_only_what_each_port_serves() {
    let sys = system(Options::default()).await;
    for (service, port) in SERVICES.iter().zip(&sys.ports) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(Ok(answer)) = answers.next().await else {
            panic!("{service}: no reflection answer");
        };
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("{service}: {answer:?}");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        let own = format!("{service}.v1.{}Service", capitalised(service));
        let mut expected = vec![
            "choreo.v1.DeadLetters".to_owned(),
            "grpc.health.v1.Health".to_owned(),
            "grpc.reflection.v1.ServerReflection".to_owned(),
            "grpc.reflection.v1alpha.ServerReflection".to_owned(),
            own,
        ];
        expected.sort();
        assert_eq!(names, expected, "{service}");
    }
}

fn capitalised(name: &str) -> String {
    let mut chars = name.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_calls_to_random_paths_leave_a_bounded_number_of_series() {
    let sys = system(Options::default()).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", sys.ports[0]))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let calls = futures::stream::iter(0..10_000u32)
        .map(|i| {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            async move {
                grpc.ready().await.unwrap();
                let path = format!("/order.v1.OrderService/Nope{i}").parse().unwrap();
                let codec = tonic_prost::ProstCodec::<(), ()>::default();
                grpc.unary(tonic::Request::new(()), path, codec)
                    .await
                    .unwrap_err()
                    .code()
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<Code>>()
        .await;
    assert!(calls.iter().all(|c| *c == Code::Unimplemented));
    let metrics = sys.metrics("order").await.unwrap();
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("saga_grpc_requests_total{"))
        .count();
    assert!(series <= 10, "{series} series:\n{metrics}");
    assert!(
        metrics.contains("saga_grpc_requests_total{method=\"other\",code=\"Unimplemented\"} 10000"),
        "{metrics}"
    );
}

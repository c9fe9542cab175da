//! What an operator sees: Prometheus counters that agree with what happened,
//! and one trace per order across the four services.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use e2e::{Options, OrderStatus, System, order_request};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

const SETTLE: Duration = Duration::from_secs(60);

/// The value of one sample line `name{labels} value`, labels in any order.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn until<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    harness::eventually(what, SETTLE, check).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_what_happened() {
    let sys = System::start(Options::default()).await.unwrap();
    sys.set_stock("BOOK", 10).await.unwrap();
    let happy = sys
        .place(order_request(
            "k1",
            "ada",
            "DE",
            "ada@example.com",
            &[("BOOK", 1)],
        ))
        .await
        .unwrap();
    let unserved = sys
        .place(order_request(
            "k2",
            "bo",
            "AQ",
            "bo@example.com",
            &[("BOOK", 2)],
        ))
        .await
        .unwrap();
    assert_eq!(
        sys.wait_terminal(&happy.order_id, SETTLE)
            .await
            .unwrap()
            .status(),
        OrderStatus::Completed
    );
    assert_eq!(
        sys.wait_terminal(&unserved.order_id, SETTLE)
            .await
            .unwrap()
            .status(),
        OrderStatus::Cancelled
    );
    let bad = sys
        .place(order_request("k3", "", "DE", "", &[("BOOK", 1)]))
        .await;
    assert!(bad.is_err());

    // Inject a duplicate: the first event of the order service's stream
    // again, under a new message id.
    let client = choreo::runtime::connect_once(sys.infra.nats.url(), "test", None)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let first = sys.stream_message("order", 1).await.unwrap();
    assert!(first.subject.ends_with("order.created"));
    js.send_publish(
        first.subject.to_string(),
        PublishMessage::build()
            .payload(first.payload.clone())
            .message_id(uuid::Uuid::new_v4().to_string()),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    // Inventory, which consumes order.created, absorbs the duplicate once;
    // the others' durable consumers filter it out: it never reaches them
    // (the order service records its own events as it writes them).
    for service in ["inventory"] {
        until(&format!("{service} to absorb the duplicate"), || async {
            let m = sys.metrics(service).await.unwrap();
            sample(
                &m,
                "saga_events_handled_total",
                &[("event_type", "order.created"), ("outcome", "duplicate")],
            ) == 1.0
        })
        .await;
    }
    for service in ["order", "shipping", "notification"] {
        let m = sys.metrics(service).await.unwrap();
        for outcome in ["applied", "duplicate", "ignored"] {
            assert_eq!(
                sample(
                    &m,
                    "saga_events_handled_total",
                    &[("event_type", "order.created"), ("outcome", outcome)]
                ),
                0.0,
                "{service} {outcome}"
            );
        }
    }
    let notification = sys.metrics("notification").await.unwrap();
    assert_eq!(
        sample(
            &notification,
            "notifications_total",
            &[("kind", "CONFIRMATION"), ("outcome", "sent")]
        ),
        1.0
    );
    let order = sys.metrics("order").await.unwrap();
    let handled = |event_type| {
        sample(
            &order,
            "saga_events_handled_total",
            &[("event_type", event_type), ("outcome", "applied")],
        )
    };
    assert_eq!(
        handled("order.created"),
        0.0,
        "its own events it records as it writes them"
    );
    assert_eq!(handled("inventory.reserved"), 2.0);
    assert_eq!(handled("shipping.scheduled"), 1.0);
    assert_eq!(handled("shipping.failed"), 1.0);
    assert_eq!(handled("notification.sent"), 1.0);
    assert_eq!(handled("inventory.released"), 1.0);
    let place = "/order.v1.OrderService/PlaceOrder";
    assert_eq!(
        sample(
            &order,
            "saga_grpc_requests_total",
            &[("method", place), ("code", "Ok")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &order,
            "saga_grpc_requests_total",
            &[("method", place), ("code", "InvalidArgument")]
        ),
        1.0
    );
    assert_eq!(sample(&order, "saga_dead_letters_total", &[]), 0.0);
    until("the status gauges to be sampled", || async {
        let m = sys.metrics("order").await.unwrap();
        sample(&m, "saga_orders", &[("status", "COMPLETED")]) == 1.0
            && sample(&m, "saga_orders", &[("status", "CANCELLED")]) == 1.0
    })
    .await;

    let inventory = sys.metrics("inventory").await.unwrap();
    assert_eq!(
        sample(
            &inventory,
            "saga_compensations_total",
            &[("step", "reserve"), ("kind", "undo")]
        ),
        1.0
    );
    assert_eq!(
        sample(&inventory, "saga_outbox_published_total", &[]),
        3.0,
        "reserved x2, released x1"
    );
    assert!(inventory.contains("saga_publish_latency_seconds"));
    until("the outbox backlog gauge", || async {
        let m = sys.metrics("inventory").await.unwrap();
        m.contains("saga_outbox_backlog 0") && m.contains("saga_outbox_oldest_unsent_age_seconds 0")
    })
    .await;
}

/// A minimal OTLP/gRPC trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_the_four_services() {
    let collector = Collector::default();
    let listener =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(listener)
            .await
    });
    let sys = System::start(Options {
        otlp_endpoint: Some(endpoint),
        ..Options::default()
    })
    .await
    .unwrap();
    sys.set_stock("BOOK", 10).await.unwrap();
    let placed = sys
        .place(order_request(
            "t1",
            "ada",
            "DE",
            "ada@example.com",
            &[("BOOK", 1)],
        ))
        .await
        .unwrap();
    assert_eq!(
        sys.wait_terminal(&placed.order_id, SETTLE)
            .await
            .unwrap()
            .status(),
        OrderStatus::Completed
    );

    let wanted = [
        ("order", "/order.v1.OrderService/PlaceOrder"),
        ("inventory", "handle order.created"),
        ("shipping", "handle inventory.reserved"),
        ("notification", "handle shipping.scheduled"),
        ("notification", "send notification"),
        ("order", "handle notification.sent"),
    ];
    let mut chain: Vec<Span> = Vec::new();
    until("spans of every step", || {
        let spans = collector.spans.lock().unwrap().clone();
        let found: Vec<Span> = wanted
            .iter()
            .filter_map(|(service, name)| {
                spans
                    .iter()
                    .find(|s| s.service == *service && s.name == *name)
                    .cloned()
            })
            .collect();
        let complete = found.len() == wanted.len();
        if complete {
            chain = found;
        }
        async move { complete }
    })
    .await;
    let trace = &chain[0].trace_id;
    for span in &chain {
        assert_eq!(
            &span.trace_id, trace,
            "{} {} is in another trace",
            span.service, span.name
        );
    }
    // Each step's handler span is a child of the span that wrote the event it handles.
    let spans = collector.spans.lock().unwrap().clone();
    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let root_of = |span: &Span| {
        let mut current = span;
        let mut hops = Vec::new();
        while let Some(parent) = by_id.get(current.parent_span_id.as_slice()) {
            hops.push(format!("{}:{}", parent.service, parent.name));
            current = parent;
        }
        (current.name.clone(), hops)
    };
    for span in &chain[1..] {
        let (root, hops) = root_of(span);
        assert_eq!(
            root, wanted[0].1,
            "{} {} does not lead back to PlaceOrder: {hops:?}",
            span.service, span.name
        );
    }
    let (_, notification_hops) = root_of(&chain[3]);
    eprintln!("notification handler span ancestry: {notification_hops:?}");
    assert!(
        notification_hops
            .iter()
            .any(|h| h == "shipping:handle inventory.reserved")
            && notification_hops
                .iter()
                .any(|h| h == "inventory:handle order.created"),
        "parent chain goes through the events: {notification_hops:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_demo_every_counter_agrees_with_the_timelines() {
    let sys = System::start(Options::default()).await.unwrap();
    let outcomes = e2e::demo::run(&sys, 6).await.unwrap();
    // What happened, as the order service's timelines (over gRPC) tell it.
    let mut happened: HashMap<String, f64> = HashMap::new();
    for (_, order) in &outcomes {
        for event in &order.timeline {
            *happened.entry(event.event_type.clone()).or_default() += 1.0;
        }
    }
    let count = |t: &str| happened.get(t).copied().unwrap_or(0.0);
    let ended = |s: OrderStatus| outcomes.iter().filter(|(_, o)| o.status() == s).count() as f64;
    assert!(
        count("inventory.released") >= 3.0,
        "the demo compensates: {happened:?}"
    );

    until("every counter to agree", || {
        let sys = &sys;
        let happened = happened.clone();
        async move {
            let order = sys.metrics("order").await.unwrap();
            // The order service applies every event of its orders once,
            // but for its own, which it records as it writes them.
            let applied = happened
                .iter()
                .filter(|(t, _)| !t.starts_with("order."))
                .all(|(t, n)| {
                    sample(
                        &order,
                        "saga_events_handled_total",
                        &[("event_type", t), ("outcome", "applied")],
                    ) == *n
                });
            let statuses = sample(&order, "saga_orders", &[("status", "COMPLETED")])
                == ended(OrderStatus::Completed)
                && sample(&order, "saga_orders", &[("status", "CANCELLED")])
                    == ended(OrderStatus::Cancelled);
            let mut published = true;
            let mut compensated = true;
            for (service, step, undo_event) in [
                ("order", "", ""),
                ("inventory", "reserve", "inventory.released"),
                ("shipping", "ship", "shipping.cancelled"),
                ("notification", "notify", "notification.cancelled"),
            ] {
                let m = sys.metrics(service).await.unwrap();
                let produced: f64 = happened
                    .iter()
                    .filter(|(t, _)| t.starts_with(&format!("{service}.")))
                    .map(|(_, n)| n)
                    .sum();
                published &= sample(&m, "saga_outbox_published_total", &[]) == produced;
                if !step.is_empty() {
                    compensated &= sample(&m, "saga_compensations_total", &[("step", step)])
                        == count(undo_event);
                }
                published &= sample(&m, "saga_dead_letters_total", &[]) == 0.0;
            }
            applied && statuses && published && compensated
        }
    })
    .await;
}

//! Rolling out a new event: services that do not consume a type never read it,
//! so a new type (in a new producer's stream, which the new version's setup
//! step makes) needs no redeploy of the others; a consumed type at a version
//! a service cannot read is parked there with the reason.
use std::time::Duration;

use choreo::{Envelope, EventPayload};
use e2e::{Options, OrderStatus, System, order_request};
use prost::Message;

/// A payload of a type no service of this saga knows (as a new service would write).
#[derive(Clone, PartialEq, prost::Message)]
struct PointsAwarded {
    #[prost(uint32, tag = "1")]
    points: u32,
}
impl EventPayload for PointsAwarded {
    const EVENT_TYPE: &'static str = "loyalty.points_awarded";
    const SCHEMA_VERSION: u32 = 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_event_type_is_read_by_nobody_and_an_unknown_version_is_parked_where_it_is_consumed()
{
    let sys = System::start(Options::default())
        .await
        .expect("system starts");
    sys.set_stock("BOOK", 100).await.unwrap();
    // The new version's setup step makes the new producer's stream.
    let admin = async_nats::jetstream::new(
        choreo::runtime::connect_once(sys.infra.nats.url(), "setup", None)
            .await
            .unwrap(),
    );
    let mut config = choreo::Config::defaults();
    (config.stream, config.subject_prefix) = (sys.stream.clone(), sys.subject_prefix.clone());
    let loyalty = choreo::provision::StreamSpec {
        name: choreo::provision::stream_name(&sys.stream, "loyalty"),
        subjects: vec![format!(
            "{}.{}",
            sys.subject_prefix,
            PointsAwarded::EVENT_TYPE
        )],
    };
    choreo::provision::ensure_stream(&admin, &config, &loyalty, "setup")
        .await
        .unwrap();
    let mut placed = Vec::new();
    for i in 0..10 {
        let order = sys
            .place(order_request(
                &uuid::Uuid::new_v4().to_string(),
                &format!("c{i}"),
                "DE",
                "c@example.com",
                &[("BOOK", 1)],
            ))
            .await
            .unwrap();
        // While the order runs, a new service announces an event of a new type for it.
        let new = Envelope::new(
            "loyalty",
            &order.order_id,
            None,
            &PointsAwarded { points: 5 },
        );
        sys.publish_raw(PointsAwarded::EVENT_TYPE, new.encode_to_vec())
            .await
            .unwrap();
        placed.push(order.order_id);
    }
    for id in &placed {
        let done = sys
            .wait_terminal(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(done.status(), OrderStatus::Completed, "{}", done.reason);
    }

    // order.created at version 99: inventory consumes it (so does order's
    // timeline), shipping and notification never see it.
    let mut future = Envelope::new(
        "order",
        &uuid::Uuid::now_v7().to_string(),
        None,
        &contracts::events::v1::OrderCreated::default(),
    );
    future.schema_version = 99;
    sys.publish_raw("order.created", future.encode_to_vec())
        .await
        .unwrap();
    let mut parked = Vec::new();
    for _ in 0..100 {
        parked = sys.dead_letters("inventory").await.unwrap();
        if !parked.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(
        parked[0]
            .reason
            .contains("unsupported schema version 99 of \"order.created\""),
        "{}",
        parked[0].reason
    );
    assert!(parked[0].subject.ends_with(".order.created"));
    for service in ["shipping", "notification"] {
        assert_eq!(
            sys.dead_letters(service).await.unwrap(),
            vec![],
            "{service} parked something"
        );
    }
    let mut loyalty = admin.get_stream(&loyalty.name).await.unwrap();
    assert_eq!(loyalty.info().await.unwrap().state.messages, 10);
    let order_parked = sys.dead_letters("order").await.unwrap();
    assert!(
        order_parked.iter().all(|d| !d.subject.contains("loyalty")),
        "the order service parked the new type: {order_parked:?}"
    );
}

//! Property tests: any PlaceOrder or cancel request a client can send gets a
//! clear answer from the validators, never a panic, and an error message that
//! stays short whatever the client sent.
use contracts::order::v1 as api;
use order::domain::NewOrder;
use proptest::collection::vec;
use proptest::prelude::*;

/// Any text, control characters and multi-byte characters included.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        "[\\x00-\\x1f a-z@.]{0,40}",
        ".{0,300}",
        Just("X".repeat(5000)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_place_order_request_is_accepted_or_refused_with_a_short_reason(
        customer in text(),
        destination in text(),
        contact in text(),
        key in text(),
        items in vec((text(), any::<u32>()), 0..60),
    ) {
        let request = api::PlaceOrderRequest {
            customer,
            destination,
            contact,
            idempotency_key: key,
            items: items
                .into_iter()
                .map(|(sku, quantity)| api::OrderItem { sku, quantity })
                .collect(),
        };
        match NewOrder::validate(request) {
            Ok(order) => {
                for field in [&order.customer, &order.contact, &order.idempotency_key] {
                    prop_assert!(!field.chars().any(char::is_control), "{field:?}");
                }
                prop_assert!((1..=contracts::MAX_LINES).contains(&order.lines.len()));
            }
            Err(reason) => prop_assert!(!reason.is_empty() && reason.len() < 300, "{} bytes", reason.len()),
        }
    }

    #[test]
    fn order_ids_skus_and_free_text_are_checked_with_short_reasons(value in text()) {
        for checked in [
            contracts::parse_order_id(&value).map(|_| ()),
            contracts::check_sku(&value),
            contracts::check_text("reason", &value),
        ] {
            if let Err(reason) = checked {
                prop_assert!(reason.len() < 300, "{} bytes", reason.len());
            }
        }
    }
}

/// Found by the property above: forty characters that each escape to nine
/// bytes made a reason of 380.
#[test]
fn a_value_of_few_characters_with_long_escapes_comes_back_short() {
    let value = "\u{3347a}".repeat(40);
    for reason in [
        contracts::parse_order_id(&value).unwrap_err(),
        contracts::check_sku(&value).unwrap_err(),
    ] {
        assert!(reason.len() < 300, "{} bytes: {reason}", reason.len());
    }
}

//! Property tests: whatever bytes arrive, reading them as the consumer does
//! (envelope, then the typed, validated event) ends in an event or a reason
//! to park it, never a panic.
use choreo::{Decode, Envelope, Reject};
use contracts::SagaEvent;
use contracts::events::v1 as ev;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};

/// Bytes to a typed event, the consumer's way.
fn read(bytes: &[u8]) -> Result<SagaEvent, Reject> {
    let envelope = Envelope::from_bytes(bytes)?;
    SagaEvent::decode(&envelope)
}

fn valid_order() -> Envelope {
    let order = ev::OrderCreated {
        customer: "ada".into(),
        destination: "DE".into(),
        contact: "ada@example.com".into(),
        lines: vec![
            ev::OrderLine {
                sku: "BOOK".into(),
                quantity: 2,
            },
            ev::OrderLine {
                sku: "PEN".into(),
                quantity: 1,
            },
        ],
    };
    Envelope::new("order", &uuid::Uuid::now_v7().to_string(), None, &order)
}

/// Every outcome is an event that keeps its contract, or a reason.
fn read_or_refused(bytes: &[u8]) -> Result<(), TestCaseError> {
    match read(bytes) {
        Ok(event) => prop_assert!(event.validate().is_ok(), "{event:?}"),
        Err(reject) => prop_assert!(!reject.to_string().is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_are_read_or_refused(bytes in vec(any::<u8>(), 0..600)) {
        read_or_refused(&bytes)?;
    }

    #[test]
    fn mutated_envelopes_are_read_or_refused(
        flips in vec((any::<Index>(), any::<u8>()), 1..8),
        cut in any::<Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = prost::Message::encode_to_vec(&valid_order());
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        read_or_refused(&bytes)?;
    }

    #[test]
    fn arbitrary_payloads_in_a_valid_envelope_are_read_or_refused(
        payload in vec(any::<u8>(), 0..300),
        event_type in select(contracts::CHOREOGRAPHY.events.iter().map(|e| e.name).collect::<Vec<_>>()),
        version in 0u32..3,
    ) {
        let mut envelope = valid_order();
        envelope.event_type = event_type.to_owned();
        envelope.schema_version = version;
        envelope.payload = payload;
        read_or_refused(&prost::Message::encode_to_vec(&envelope))?;
    }

    #[test]
    fn order_lines_are_checked_whatever_they_hold(
        lines in vec(("[A-Za-z0-9_\\-\\x00-\\x1f]{0,70}", any::<u32>()), 0..60),
    ) {
        let lines: Vec<ev::OrderLine> = lines
            .into_iter()
            .map(|(sku, quantity)| ev::OrderLine { sku, quantity })
            .collect();
        if contracts::check_lines(&lines).is_ok() {
            prop_assert!((1..=contracts::MAX_LINES).contains(&lines.len()));
            for (i, line) in lines.iter().enumerate() {
                prop_assert!(contracts::check_sku(&line.sku).is_ok());
                prop_assert!((1..=contracts::MAX_QUANTITY).contains(&line.quantity));
                prop_assert!(lines[..i].iter().all(|l| l.sku != line.sku));
            }
        }
    }
}
